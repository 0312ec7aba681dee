//! The store trait that flows live in, and the pieces backends share: what an author of a
//! [`Store`] backend needs ([`Versioned`], [`Inserted`], [`Swapped`], [`StoreError`],
//! [`KeyNotifier`], [`Subscription`]). Users of the flow engine need only [`SharedStore`] and a
//! backend, which the crate root re-exports.
//!
//! A [`Store`] is a key-value map with per-record TTLs and versions. Its methods map onto atomic
//! backend operations, so that the engine's guarantees hold across tasks, processes and replicas:
//!
//! | method | memory | sled | Redis |
//! |---|---|---|---|
//! | [`Store::get`] | shard lock + lookup | `get` | Lua: `TIME`, `HMGET` |
//! | [`Store::insert_if_absent`] | shard lock | `compare_and_swap(None → new)` | Lua: `TIME`, `HSET` + `PEXPIRE` if absent or expired |
//! | [`Store::compare_and_swap`] | shard lock | `compare_and_swap(old → new)` | Lua: `TIME`, compare version, `HSET` + `PEXPIRE` |
//! | [`Store::delete_if`] | shard lock | `compare_and_swap(old → None)` | Lua: `TIME`, compare version, `DEL` |
//! | [`Store::subscribe`] | [`KeyNotifier`] | [`KeyNotifier`] | pub/sub into a [`KeyNotifier`] |
//!
//! Versions are unique across the whole store (never reused for another value, even after a
//! delete), so a compare-and-set can never succeed against a different generation of a key
//! (no ABA).
//!
//! # Whose clock decides expiry
//!
//! - **Memory and sled**: the store's injected clock (`with_clock` / `clock`), which is the
//!   caller's: one process (sled admits one per database), so one clock. Tests drive a manual
//!   clock to expire records.
//! - **Redis**: the server's clock (`TIME` inside each script). Processes whose clocks disagree
//!   still agree on which records are live, so two of them can never both hold a lease however
//!   far apart their clocks are. The injected clock only reports [`Versioned::expires_at`] (the
//!   caller's now plus the time Redis still gives the record); a manual clock cannot expire a
//!   Redis record: tests wait real (short) time for that.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use mcp_clock::Timestamp;
use tokio::sync::watch;

pub(crate) mod memory;
/// The error codes a Redis server answers while it cannot serve for a while: loading its data
/// after a restart (`LOADING`), a replica promoted or demoted in a failover (`READONLY`,
/// `MASTERDOWN`), a cluster moving slots or without quorum (`TRYAGAIN`, `CLUSTERDOWN`). A
/// command refused with one of them was not applied: a backend reports it as unavailable
/// ([`StoreErrorKind::Unavailable`]), to be retried, never as a broken store. The one list
/// for the workspace's Redis backends (token-storage's `RedisTokenStore` reads it too).
///
/// ```
/// assert!(flow_state::store::REDIS_UNAVAILABLE_CODES.contains(&"LOADING"));
/// ```
pub const REDIS_UNAVAILABLE_CODES: &[&str] =
    &["LOADING", "READONLY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN"];

#[cfg(feature = "redis")]
pub(crate) mod redis;
#[cfg(feature = "sled")]
pub(crate) mod sled;

/// A stored value with its version and absolute expiry.
#[derive(Clone, PartialEq, Eq)]
pub struct Versioned {
    /// The version written with this value; unique across the store.
    pub version: u64,
    /// The value's bytes.
    pub value: Arc<[u8]>,
    /// When the value expires, on the caller's clock (for Redis, which decides expiry on its
    /// own clock: the caller's now plus the time Redis still gives the value).
    pub expires_at: Timestamp,
}

impl fmt::Debug for Versioned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Versioned")
            .field("version", &self.version)
            .field("len", &self.value.len())
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// The outcome of [`Store::insert_if_absent`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inserted {
    /// The value was written with this version.
    Inserted {
        /// The new version.
        version: u64,
    },
    /// A live value was already there; nothing was written.
    Exists(Versioned),
}

/// The outcome of [`Store::compare_and_swap`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Swapped {
    /// The value was replaced; this is its new version.
    Swapped {
        /// The new version.
        version: u64,
    },
    /// The stored version was not the expected one (or the key is gone); nothing was written.
    Conflict(Option<Versioned>),
}

/// What went wrong in a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// The backend could not be reached or refused the operation; retrying may help.
    Unavailable,
    /// A stored record could not be read (truncated, tampered, written by another program).
    Corrupt,
    /// Anything else the backend reported.
    Backend,
}

/// An error from a [`Store`].
#[derive(Debug, Clone)]
pub struct StoreError {
    kind: StoreErrorKind,
    key: Option<String>,
    message: String,
    source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl StoreError {
    /// A new error of `kind` with a human-readable `message`.
    pub fn new(kind: StoreErrorKind, message: impl Into<String>) -> Self {
        StoreError { kind, key: None, message: message.into(), source: None }
    }

    /// Name the key the error concerns.
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Attach the backend's own error, reachable through [`std::error::Error::source`].
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Arc::new(source));
        self
    }

    /// What kind of error this is.
    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }

    /// The key concerned, when known.
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.key {
            Some(key) => write!(f, "{} (key {key})", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// A key-value store with TTLs, unique versions and change notifications.
///
/// Every method is one atomic operation on the backend. Expired values behave exactly as absent
/// ones. Every successful write or delete notifies the key's subscribers.
///
/// Written with [`async_trait`](https://docs.rs/async-trait): an implementation writes
/// `async fn` under `#[async_trait::async_trait]`, and the trait stays dyn-compatible
/// ([`SharedStore`] is an `Arc<dyn Store>`).
#[async_trait::async_trait]
pub trait Store: Send + Sync + fmt::Debug {
    /// The live value under `key`, if any.
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError>;

    /// Write `value` with `ttl` only if no live value is under `key`.
    async fn insert_if_absent(
        &self,
        key: &str,
        value: Vec<u8>,
        ttl: Duration,
    ) -> Result<Inserted, StoreError>;

    /// Replace the value under `key` with `value` and `ttl` only if its version is `expected`.
    async fn compare_and_swap(
        &self,
        key: &str,
        expected: u64,
        value: Vec<u8>,
        ttl: Duration,
    ) -> Result<Swapped, StoreError>;

    /// Delete the value under `key` if its version is `expected` (any live version when `None`).
    /// Returns whether a live value was deleted.
    async fn delete_if(&self, key: &str, expected: Option<u64>) -> Result<bool, StoreError>;

    /// A subscription that is notified after every write or delete of `key` in this store.
    fn subscribe(&self, key: &str) -> Subscription;

    /// Where `key`'s record lives on a Redis server, for a script of another component that
    /// must check the record atomically with its own write (a fenced write under a
    /// [`Lease`](crate::Lease): [`Leases::redis_fence`](crate::Leases::redis_fence)). `None`,
    /// the default, for a store that is not Redis; a wrapper forwards its inner store's.
    #[cfg(feature = "redis")]
    fn redis_location(&self, key: &str) -> Option<RedisLocation> {
        let _ = key;
        None
    }
}

/// A record's place on a Redis server (feature `redis`): see [`Store::redis_location`].
#[cfg(feature = "redis")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisLocation {
    /// The server and database, as [`RedisLocation::server_of`] names them.
    pub server: String,
    /// The record's Redis key.
    pub key: String,
}

#[cfg(feature = "redis")]
impl RedisLocation {
    /// The server and database a Redis URL connects to (`127.0.0.1:6379/0`), so two
    /// components can tell whether they talk to one server; `None` if `url` does not parse.
    /// Two spellings of one host (a name and its address) compare unequal: the safe side.
    pub fn server_of(url: &str) -> Option<String> {
        let client = ::redis::Client::open(url).ok()?;
        let info = client.get_connection_info();
        Some(format!("{}/{}", info.addr(), info.redis_settings().db()))
    }
}

/// A cloneable, shareable [`Store`]: `Arc<dyn Store>` with a name.
#[derive(Clone, Debug)]
pub struct SharedStore(Arc<dyn Store>);

impl SharedStore {
    /// Share `store`.
    pub fn new(store: impl Store + 'static) -> Self {
        SharedStore(Arc::new(store))
    }

    /// Share an already shared store.
    pub fn from_arc(store: Arc<dyn Store>) -> Self {
        SharedStore(store)
    }
}

impl std::ops::Deref for SharedStore {
    type Target = dyn Store;
    fn deref(&self) -> &(dyn Store + 'static) {
        &*self.0
    }
}

/// Per-key change notifications inside one process, for store backends.
///
/// A backend calls [`KeyNotifier::notify`] after each write or delete (the Redis backend does
/// it when a pub/sub message arrives) and hands out [`KeyNotifier::subscribe`] from
/// [`Store::subscribe`]. A notification that happens after `subscribe` returned and before the
/// subscriber waits is never lost.
#[derive(Debug, Default)]
pub struct KeyNotifier {
    keys: Mutex<HashMap<Box<str>, watch::Sender<u64>>>,
}

impl KeyNotifier {
    /// A notifier with no subscribers.
    pub fn new() -> Arc<Self> {
        Arc::new(KeyNotifier::default())
    }

    /// Subscribe to changes of `key`.
    pub fn subscribe(self: &Arc<Self>, key: &str) -> Subscription {
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        let rx = match keys.get(key) {
            Some(tx) => tx.subscribe(),
            None => {
                let (tx, rx) = watch::channel(0);
                keys.insert(key.into(), tx);
                rx
            }
        };
        Subscription { rx, key: key.into(), notifier: Some(self.clone()) }
    }

    /// Wake every subscriber of `key`.
    pub fn notify(&self, key: &str) {
        let keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(tx) = keys.get(key) {
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Wake every subscriber of every key: after a reconnect, or on a backend's fallback poll,
    /// when a notification may have been missed. Waiters re-read and go back to sleep.
    pub fn notify_all(&self) {
        let keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        for tx in keys.values() {
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// How many keys have live subscribers (for tests of subscription clean-up).
    pub fn watched_keys(&self) -> usize {
        self.keys.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    fn release(&self, key: &str) {
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        if keys.get(key).is_some_and(|tx| tx.receiver_count() == 0) {
            keys.remove(key);
        }
    }
}

/// A subscription to one key's changes; see [`Store::subscribe`].
#[derive(Debug)]
pub struct Subscription {
    rx: watch::Receiver<u64>,
    key: Box<str>,
    notifier: Option<Arc<KeyNotifier>>,
}

impl Subscription {
    /// Wait for the next change after the last one seen (or after subscribing).
    ///
    /// If the notifier has gone away this never returns; callers always race it with a timer.
    pub async fn changed(&mut self) {
        if self.rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(notifier) = self.notifier.take() {
            // Drop our receiver first so the count no longer includes it.
            let (_, placeholder) = watch::channel(0);
            drop(std::mem::replace(&mut self.rx, placeholder));
            notifier.release(&self.key);
        }
    }
}

/// Prefixes a backend record with its version and expiry (big-endian, 16 bytes).
#[cfg_attr(not(feature = "sled"), allow(dead_code))] // Used by the on-disk backends.
pub(crate) fn encode_header(version: u64, expires_at: Timestamp, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + value.len());
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(&expires_at.as_millis().to_be_bytes());
    out.extend_from_slice(value);
    out
}

/// Splits a backend record into version, expiry and value.
#[cfg_attr(not(feature = "sled"), allow(dead_code))] // Used by the on-disk backends.
pub(crate) fn decode_header(key: &str, raw: &[u8]) -> Result<Versioned, StoreError> {
    if raw.len() < 16 {
        return Err(StoreError::new(
            StoreErrorKind::Corrupt,
            format!("record is {} bytes, shorter than its 16-byte header", raw.len()),
        )
        .with_key(key));
    }
    let (version, rest) = raw.split_at(8);
    let (expires, value) = rest.split_at(8);
    Ok(Versioned {
        version: u64::from_be_bytes(version.try_into().expect("8 bytes")),
        expires_at: Timestamp::from_millis(u64::from_be_bytes(
            expires.try_into().expect("8 bytes"),
        )),
        value: value.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn _dyn_compatible(_: &dyn Store) {}

    #[test]
    fn subscriptions_clean_up_after_themselves() {
        let n = KeyNotifier::new();
        let a = n.subscribe("k");
        let b = n.subscribe("k");
        assert_eq!(n.watched_keys(), 1);
        drop(a);
        assert_eq!(n.watched_keys(), 1);
        drop(b);
        assert_eq!(n.watched_keys(), 0);
    }

    #[tokio::test]
    async fn a_notification_before_the_wait_is_not_lost() {
        let n = KeyNotifier::new();
        let mut s = n.subscribe("k");
        n.notify("k");
        mcp_clock::within(&mcp_clock::SystemClock, Duration::from_secs(5), s.changed())
            .await
            .expect("woken");
    }

    #[test]
    fn a_short_record_is_corrupt_and_names_its_key() {
        let e = decode_header("the-key", &[1, 2, 3]).unwrap_err();
        assert_eq!(e.kind(), StoreErrorKind::Corrupt);
        assert_eq!(e.key(), Some("the-key"));
        let v = decode_header("k", &encode_header(7, Timestamp::from_millis(9), b"xy")).unwrap();
        assert_eq!(
            (v.version, v.expires_at, &*v.value),
            (7, Timestamp::from_millis(9), &b"xy"[..])
        );
    }
}
