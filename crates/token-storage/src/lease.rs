//! The cross-process refresh lease: [`RefreshLease`], which makes sure that one process of
//! many redeems a rotating refresh token.
//!
//! Two implementations behind one small type, chosen by the deployment:
//!
//! - [`RefreshLease::store`]: a [`flow_state::Leases`] over any flow-state store. With a
//!   `flow_state::RedisStore` this is the lease of a fleet: identified by a random owner token
//!   in the lease value (so a lost renewal reply cannot lose it), renewed through the whole
//!   refresh, expiring after its TTL when the holder dies.
//! - [`RefreshLease::lock_files`]: an advisory lock (`flock`) on one file per key in a
//!   directory, for several processes on one host that share a store which is not Redis (a
//!   `TokenStore` of the host's own; sled itself admits one process per database). The kernel
//!   drops the lock when its holder dies, so it needs no TTL and no renewal. Local file systems
//!   only: advisory locks over NFS are unreliable.
//!
//! Why one type and not a `Store`-compatible lock-file store: a lease is all the refresh needs
//! (take, renew, check, release), and a lock file gives exactly that with the kernel's crash
//! release, where a TTL store would have to guess how long a dead holder takes to expire.
//!
//! # The fence: what each backend guarantees
//!
//! The records a refresh writes under the lease before and instead of a result (the in-doubt
//! intent before the first send, the claim of the one same-token retry, the needs-authorization
//! marker) are *fenced*: made only while the lease holds, so a refresher whose lease lapsed
//! cannot write over the new holder's records (the model in `tests/it/model`, rule
//! `fenced_commit`). The commit is made under the lease too; if the lease is found lost by
//! then (the holder was paused past the TTL with its request out, which the protocol assumes
//! away), the result is still offered to the compare-and-swap on the version read: the
//! redemption has spent the old refresh token, the new set is the only live one, and any writer
//! since (a new holder's intent, a login) wins the swap. Every write is a compare-and-swap on
//! the version read under the lease, so none replaces a newer generation. What "while the lease
//! holds" means depends on the lease:
//!
//! - **Lock files** (any token store: memory, sled, or one of the host's own): the kernel holds
//!   the lock for as long as the process lives, so every write made under it is under the
//!   lease; nothing can take it over from a live holder. This is the strongest fence.
//! - **A Redis lease and a `RedisTokenStore` on one server** ([`RefreshLease::store`] over a
//!   `flow_state::RedisStore` that connects to the same address and database as the token
//!   store): each fenced write is one Lua script that checks the lease record (live on Redis's
//!   clock, holding our owner token) and does the compare-and-swap
//!   ([`TokenStore::compare_and_swap_fenced`](crate::TokenStore::compare_and_swap_fenced)).
//!   A lease that lapses a moment before the write stops it; no pause of the holder can slip
//!   a write past it. In a Redis Cluster give the lease store the prefix `{<token prefix>}:leases`,
//!   so the lease record shares the token records' hash slot (the key layout is in the
//!   `RedisTokenStore` docs). This is the fence for fleets.
//! - **Any other store lease** ([`RefreshLease::store`] with a token store elsewhere: memory,
//!   sled, another Redis server, one of the host's own): the lease is checked (its owner token
//!   read back) immediately before each write, one round trip before it (the trait's default
//!   fenced write). A holder paused past the TTL between the two could still write.
//!
//! For every store lease the check before each *send* stays one round trip before the request
//! (nothing can make a network request atomic with a store): renewal every third of the TTL
//! and that check are what the protocol relies on; keep the TTL well above any plausible pause
//! of a process (the model pins this assumption: a pause past the TTL after the last check
//! defeats any lease without fencing at the authorization server). Expiry of a store lease is
//! judged by the flow-state store: on Redis's own clock for `flow_state::RedisStore` (so skewed
//! clocks across the fleet cannot make two holders), on the injected clock for memory and sled.
//! A lease insert whose reply was lost is recognised by its owner token when the acquire is
//! retried (`flow_state::Leases`), so it is taken rather than left held by nobody.
//! - **No lease** (one process): the single-flight is the only writer in the process; writes
//!   are compare-and-swap only.
//!
//! A commit that the store refuses on a transient error is retried under the renewed lease
//! until it lands; one that cannot be written at all once the lease is gone is kept in memory
//! and served, and the next refresh of this process (under the lease again) writes it instead
//! of redeeming again.

use std::fmt;
use std::path::{Path, PathBuf};

use std::time::Duration;

use flow_state::{FlowKey, Lease, Leases, SharedStore, store::StoreErrorKind};
use mcp_clock::SharedClock;

use crate::key::RecordKind;
use crate::lock_file::{FileLock, lock_file_name};
use crate::{Error, TokenKey};

/// How processes that share a token store agree on which of them redeems a refresh token.
/// Give one to [`TokenStorageBuilder::lease`](crate::TokenStorageBuilder::lease).
///
/// Under the lease the refresh re-reads the stored tokens and skips the network call when a
/// peer already rotated them; it renews the lease every third of its TTL for the whole refresh,
/// checks it before every send, and makes every write (in-doubt records, the commit, a failure
/// marker) only while it holds, with compare-and-swap on the version it read. See the module
/// docs for what the fence guarantees with each kind of lease.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use std::time::Duration;
/// use token_storage::{RefreshLease, SharedClock};
/// use flow_state::{MemoryStore, SharedStore};
///
/// // A fleet passes a `flow_state::RedisStore` here.
/// let fleet = RefreshLease::store(SharedStore::new(MemoryStore::new()), SharedClock::system())
///     .ttl(Duration::from_secs(5))
///     .wait(Duration::from_secs(20));
/// let one_host = RefreshLease::lock_files(std::env::temp_dir().join("my-app-refresh-locks"));
/// # drop((fleet, one_host));
/// # }
/// ```
#[derive(Clone)]
pub struct RefreshLease {
    kind: Kind,
    ttl: Duration,
    wait: Duration,
    /// The clock every wait of the lease sleeps on.
    clock: SharedClock,
}

#[derive(Clone)]
enum Kind {
    Store(Leases),
    Files(PathBuf),
}

impl fmt::Debug for RefreshLease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("RefreshLease");
        match &self.kind {
            Kind::Store(leases) => d.field("store", leases),
            Kind::Files(dir) => d.field("lock_files", dir),
        };
        d.field("ttl", &self.ttl).field("wait", &self.wait).finish()
    }
}

/// A lease held for one refresh.
pub(crate) enum Held {
    Store { leases: Leases, lease: Lease, ttl: Duration },
    File(FileLock),
}

impl RefreshLease {
    /// Leases in `store` (a `flow_state::RedisStore` for a fleet), expiring on `clock`.
    pub fn store(store: SharedStore, clock: SharedClock) -> Self {
        RefreshLease {
            kind: Kind::Store(Leases::new(store, clock.clone())),
            ttl: Duration::from_secs(10),
            wait: Duration::from_secs(30),
            clock,
        }
    }

    /// Advisory locks on files in `dir` (created when missing), for processes on one host.
    /// Waits for a peer's lock sleep on the system clock; [`RefreshLease::clock`] changes it.
    pub fn lock_files(dir: impl Into<PathBuf>) -> Self {
        RefreshLease {
            kind: Kind::Files(dir.into()),
            ttl: Duration::from_secs(10),
            wait: Duration::from_secs(30),
            clock: SharedClock::system(),
        }
    }

    /// The clock the lease's waits sleep on (for lock files; a store lease keeps the clock it
    /// was made with for its expiry).
    pub fn clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }

    /// How long a store lease lasts without renewal (default 10 s): how long the fleet waits
    /// for a crashed holder. Renewed every third of it while the refresh runs.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl.max(Duration::from_millis(30));
        self
    }

    /// How long a refresh waits for a peer's lease before giving up with
    /// [`Error::LeaseWait`] (default 30 s). A refresh ahead of expiry, while the token is still
    /// valid, never waits: it only tries the lease.
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    pub(crate) fn renew_every(&self) -> Duration {
        self.ttl / 3
    }

    /// Take the lease of `key` if nobody holds it, without waiting.
    pub(crate) async fn try_acquire(&self, key: &TokenKey) -> Result<Option<Held>, Error> {
        match &self.kind {
            Kind::Store(leases) => {
                let flow_key = flow_key(key)?;
                match leases.try_acquire(&flow_key, self.ttl).await {
                    Ok(Some(lease)) => {
                        Ok(Some(Held::Store { leases: leases.clone(), lease, ttl: self.ttl }))
                    }
                    Ok(None) => Ok(None),
                    Err(e) => Err(lease_error(key, self.wait, e)),
                }
            }
            Kind::Files(dir) => Ok(FileLock::try_acquire(&lock_path(dir, key))?.map(Held::File)),
        }
    }

    /// Take the lease of `key`, waiting for a peer's to end.
    pub(crate) async fn acquire(&self, key: &TokenKey) -> Result<Held, Error> {
        match &self.kind {
            Kind::Store(leases) => {
                let flow_key = flow_key(key)?;
                // A connection that sat idle through a server restart fails its first command
                // and reconnects: `Leases::acquire` tries once more with the same owner token,
                // so an insert that was applied with its reply lost is taken, not orphaned.
                let lease = leases
                    .acquire(&flow_key, self.ttl, self.wait)
                    .await
                    .map_err(|e| lease_error(key, self.wait, e))?;
                Ok(Held::Store { leases: leases.clone(), lease, ttl: self.ttl })
            }
            Kind::Files(dir) => FileLock::acquire(&lock_path(dir, key), self.wait, &self.clock)
                .await?
                .map(Held::File)
                .ok_or_else(|| Error::LeaseWait { key: key.clone(), waited: self.wait }),
        }
    }
}

/// The lease a fenced write is made under, as a [`TokenStore`](crate::TokenStore) sees it: see
/// [`TokenStore::compare_and_swap_fenced`](crate::TokenStore::compare_and_swap_fenced). The
/// refresh makes one from the lease it holds.
pub struct Fence<'a> {
    kind: FenceKind<'a>,
}

enum FenceKind<'a> {
    Store { leases: &'a Leases, lease: &'a Lease },
    File,
}

impl fmt::Debug for Fence<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            FenceKind::Store { lease, .. } => {
                f.debug_struct("Fence").field("fence", &lease.fence()).finish_non_exhaustive()
            }
            FenceKind::File => f.write_str("Fence(lock file)"),
        }
    }
}

impl<'a> Fence<'a> {
    /// The fence of `lease`, held in `leases` (a store lease, as [`RefreshLease::store`]
    /// takes them).
    pub fn store(leases: &'a Leases, lease: &'a Lease) -> Self {
        Fence { kind: FenceKind::Store { leases, lease } }
    }

    /// Whether the lease still holds: one round trip to the lease store, so it may lapse
    /// right after this answers. A lock file always holds (the kernel keeps it for the life
    /// of the process).
    pub async fn holds(&self) -> Result<bool, Error> {
        match &self.kind {
            FenceKind::Store { leases, lease } => {
                leases.is_held(lease).await.map_err(|e| match e {
                    flow_state::Error::Store { source, .. }
                        if source.kind() == StoreErrorKind::Unavailable =>
                    {
                        Error::StoreUnavailable {
                            message: format!("the refresh lease store is unavailable ({source})"),
                            source: Some(std::sync::Arc::new(*source)),
                        }
                    }
                    other => Error::store("could not check the refresh lease", other),
                })
            }
            FenceKind::File => Ok(true),
        }
    }

    /// The lease as a Redis script checks it atomically with a write, for a store lease in a
    /// `flow_state::RedisStore`; `None` otherwise.
    #[cfg(feature = "redis")]
    pub fn redis(&self) -> Option<flow_state::RedisFence> {
        match &self.kind {
            FenceKind::Store { leases, lease } => leases.redis_fence(lease),
            FenceKind::File => None,
        }
    }
}

/// The flow-state key of `key`'s store lease.
fn flow_key(key: &TokenKey) -> Result<FlowKey, Error> {
    FlowKey::new("token_refresh", key.record(RecordKind::Tokens))
        .map_err(|e| Error::store("could not name the refresh lease", e))
}

/// The lock file of `key` in `dir`.
fn lock_path(dir: &Path, key: &TokenKey) -> PathBuf {
    dir.join(lock_file_name(&key.record(RecordKind::Tokens)))
}

fn lease_error(key: &TokenKey, wait: Duration, e: flow_state::Error) -> Error {
    match e {
        flow_state::Error::Timeout { .. } => Error::LeaseWait { key: key.clone(), waited: wait },
        flow_state::Error::Store { source, .. } if source.kind() == StoreErrorKind::Unavailable => {
            Error::StoreUnavailable {
                message: format!("the refresh lease store is unavailable ({source})"),
                source: Some(std::sync::Arc::new(*source)),
            }
        }
        other => Error::store("the refresh lease failed", other),
    }
}

impl Held {
    /// Extend a store lease: `Ok(false)` if it was lost (expired, and perhaps taken by a peer);
    /// an error if the store could not be asked (the lease may or may not have been renewed).
    pub(crate) async fn renew(&mut self, key: &TokenKey) -> Result<bool, Error> {
        match self {
            Held::Store { leases, lease, ttl } => match leases.renew(lease, *ttl).await {
                Ok(()) => Ok(true),
                Err(flow_state::Error::NotFound { .. }) => Ok(false),
                Err(e) => Err(lease_error(key, *ttl, e)),
            },
            Held::File(_) => Ok(true),
        }
    }

    /// Whether the lease still holds.
    pub(crate) async fn still_held(&self, key: &TokenKey) -> Result<bool, Error> {
        match self {
            Held::Store { leases, lease, .. } => {
                leases.is_held(lease).await.map_err(|e| lease_error(key, Duration::ZERO, e))
            }
            Held::File(_) => Ok(true),
        }
    }

    /// The lease as a fenced write sees it.
    pub(crate) fn write_fence(&self) -> Fence<'_> {
        match self {
            Held::Store { leases, lease, .. } => Fence::store(leases, lease),
            Held::File(_) => Fence { kind: FenceKind::File },
        }
    }

    /// The fencing token of a store lease.
    pub(crate) fn fence(&self) -> Option<u64> {
        match self {
            Held::Store { lease, .. } => Some(lease.fence()),
            Held::File(_) => None,
        }
    }

    /// Give the lease up (a failure only means it expires on its own).
    pub(crate) async fn release(self) {
        match self {
            Held::Store { leases, lease, .. } => {
                let _ = leases.release(lease).await;
            }
            Held::File(file) => drop(file),
        }
    }
}
