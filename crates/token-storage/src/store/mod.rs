//! The store trait token records live in: [`TokenStore`], with
//! [`MemoryTokenStore`](crate::MemoryTokenStore) and (feature `sled`) `SledTokenStore`,
//! (feature `redis`) `RedisTokenStore`.
//!
//! This module is for backend authors: [`Versioned`], [`Swapped`] and [`Fence`] appear only in
//! [`TokenStore`]'s methods. Users of [`TokenStorage`](crate::TokenStorage) need only
//! [`SharedTokenStore`] and a backend, which the crate root re-exports.
//!
//! Records are opaque sealed bytes with a version. Every method is one atomic backend operation:
//!
//! | method | memory | sled | Redis |
//! |---|---|---|---|
//! | [`TokenStore::get`] | lock + lookup | `get` | `HGETALL` |
//! | [`TokenStore::compare_and_swap`] | lock | `compare_and_swap(old → new)` | Lua: compare version, `SET` (`SET NX` when absent) |
//! | [`TokenStore::compare_and_swap_fenced`] | lease check, then swap | lease check, then swap | Lua: lease check and swap in one script (a `flow_state::RedisStore` lease on the same server), else lease check, then swap |
//! | [`TokenStore::delete_if`] | lock | `compare_and_swap(old → None)` | Lua: compare version, `DEL` |
//! | [`TokenStore::keys_with_prefix`] | range scan | `scan_prefix` | `ZRANGEBYLEX` on an index kept by the writes |
//!
//! Versions are unique across the whole store and increase with every write (a persisted
//! counter: sled's id generator, Redis `INCR`), so a compare-and-swap can never succeed against
//! another generation of a key (no ABA), even after a delete and a restart.

use std::fmt;
use std::sync::Arc;

use crate::Error;
pub use crate::lease::Fence;

pub(crate) mod memory;
#[cfg(feature = "redis")]
pub(crate) mod redis;
#[cfg(feature = "sled")]
pub(crate) mod sled;

/// A stored record with its version.
#[derive(Clone, PartialEq, Eq)]
pub struct Versioned {
    /// The version written with this value; unique across the store, larger for later writes.
    pub version: u64,
    /// The sealed record.
    pub value: Arc<[u8]>,
}

impl fmt::Debug for Versioned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Versioned")
            .field("version", &self.version)
            .field("len", &self.value.len())
            .finish()
    }
}

/// The outcome of [`TokenStore::compare_and_swap`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Swapped {
    /// Written; this is the new version.
    Swapped {
        /// The new version.
        version: u64,
    },
    /// The stored version was not the expected one; nothing was written. Holds what is there.
    Conflict(Option<Versioned>),
}

/// A versioned key-value store for sealed token records. Dyn-compatible: use it as
/// [`SharedTokenStore`]. Written with [`async_trait`](https://docs.rs/async-trait): an
/// implementation writes `async fn` under `#[async_trait::async_trait]`.
#[async_trait::async_trait]
pub trait TokenStore: Send + Sync + fmt::Debug {
    /// The record under `key`, if any.
    async fn get(&self, key: &str) -> Result<Option<Versioned>, Error>;

    /// Write `value` under `key` only if the stored version is `expected` (`None`: only if
    /// nothing is stored).
    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<u64>,
        value: Vec<u8>,
    ) -> Result<Swapped, Error>;

    /// Delete the record under `key` if its version is `expected` (any version when `None`).
    /// Returns whether a record was deleted.
    async fn delete_if(&self, key: &str, expected: Option<u64>) -> Result<bool, Error>;

    /// Every stored key that starts with `prefix`, in any order.
    async fn keys_with_prefix(&self, prefix: &str) -> Result<Vec<String>, Error>;

    /// [`TokenStore::compare_and_swap`] made only while the refresh lease `fence` holds:
    /// `Ok(None)` if the fence was found lost (nothing written).
    ///
    /// The default checks the fence ([`Fence::holds`], one round trip to the lease store),
    /// then swaps: the weaker fence, since a lease that lapses between the two (a process
    /// paused, a slow reply) does not stop the write. A backend that can check the lease in
    /// the same atomic step as the swap overrides it: `RedisTokenStore` does, with one Lua
    /// script, when the lease is a `flow_state::RedisStore` lease on the same server. What each
    /// backend guarantees: [`RefreshLease`](crate::RefreshLease).
    async fn compare_and_swap_fenced(
        &self,
        key: &str,
        expected: Option<u64>,
        value: Vec<u8>,
        fence: &Fence<'_>,
    ) -> Result<Option<Swapped>, Error> {
        check_then_swap(self, key, expected, value, fence).await
    }
}

/// The default fenced write: check the fence, then compare-and-swap (one round trip apart).
pub(crate) async fn check_then_swap<S: TokenStore + ?Sized>(
    store: &S,
    key: &str,
    expected: Option<u64>,
    value: Vec<u8>,
    fence: &Fence<'_>,
) -> Result<Option<Swapped>, Error> {
    if !fence.holds().await? {
        return Ok(None);
    }
    store.compare_and_swap(key, expected, value).await.map(Some)
}

/// A cloneable, shareable [`TokenStore`].
#[derive(Clone, Debug)]
pub struct SharedTokenStore(Arc<dyn TokenStore>);

impl SharedTokenStore {
    /// Share `store`.
    pub fn new(store: impl TokenStore + 'static) -> Self {
        SharedTokenStore(Arc::new(store))
    }

    /// Share an already shared store.
    pub fn from_arc(store: Arc<dyn TokenStore>) -> Self {
        SharedTokenStore(store)
    }
}

impl std::ops::Deref for SharedTokenStore {
    type Target = dyn TokenStore;
    fn deref(&self) -> &(dyn TokenStore + 'static) {
        &*self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn _dyn_compatible(_: &dyn TokenStore) {}
}
