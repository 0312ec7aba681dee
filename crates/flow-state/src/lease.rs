//! Leases: a time-limited, exclusive hold on a key across every process that shares a store.

use std::time::Duration;

use mcp_clock::{Clock, SharedClock, Timestamp};

use crate::{Error, FlowKey, Inserted, SharedStore, StoreErrorKind, Swapped};

/// Exclusive, expiring holds on keys, shared by every process that uses the same store.
///
/// A lease is a store record written with insert-if-absent. Its value is a random owner token:
/// renewal, [`Leases::is_held`] and release compare it, not the record's version, so a renewal
/// whose reply was lost (applied, then reported as failed) does not lose the lease: the next
/// renewal finds the owner token and goes on; nor does an acquisition whose reply was lost (the
/// retry finds its own token and takes the lease). Expiry is judged by the store: on the
/// injected clock for memory and sled, on the server's clock for Redis, so processes whose
/// clocks disagree never both hold a Redis lease. Its first version is its
/// fencing token: versions are unique and increasing across the store, so a later holder
/// always has a larger fence than an earlier one. A holder that dies simply stops renewing, and
/// the lease expires after its TTL, so another process takes over.
///
/// Use a lease around a side effect that must happen once across processes (redeeming a rotating
/// refresh token), re-read the protected state after acquiring it (a peer may already have done
/// the work), renew it while the side effect is slow, and write the result with a
/// compare-and-set that fails if someone else wrote meanwhile.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), flow_state::Error> {
/// use flow_state::{FlowKey, Leases, MemoryStore, SharedClock, SharedStore};
/// use std::time::Duration;
///
/// let leases = Leases::new(SharedStore::new(MemoryStore::new()), SharedClock::system());
/// let key = FlowKey::new("refresh", "alice:github")?.with_tenant("acme")?;
/// let lease = leases.try_acquire(&key, Duration::from_secs(30)).await?.expect("free");
/// assert!(leases.try_acquire(&key, Duration::from_secs(30)).await?.is_none(), "exclusive");
/// leases.release(lease).await?;
/// assert!(leases.try_acquire(&key, Duration::from_secs(30)).await?.is_some());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Leases {
    store: SharedStore,
    clock: SharedClock,
}

/// A held lease; see [`Leases`].
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a lease should be released when the work is done"]
pub struct Lease {
    key: FlowKey,
    fence: u64,
    owner: [u8; 16],
    expires_at: Timestamp,
}

impl Lease {
    /// The fencing token: larger for every later holder of any lease in the store.
    pub fn fence(&self) -> u64 {
        self.fence
    }

    /// When the lease expires unless renewed.
    pub fn expires_at(&self) -> Timestamp {
        self.expires_at
    }

    /// The key the lease holds.
    pub fn key(&self) -> &FlowKey {
        &self.key
    }
}

/// A held lease as a Redis script of another component checks it, atomically with its own
/// write (feature `redis`): from [`Leases::redis_fence`], for a lease in a
/// [`RedisStore`](crate::RedisStore). The script defines [`RedisFence::LUA`]'s function and
/// calls `fence_holds(KEYS[i], ARGV[j])` with [`RedisFence::key`] and [`RedisFence::owner`]:
/// true while the lease record is live on Redis's clock and holds this owner token.
///
/// Only for a script on the same server ([`RedisFence::server`], compared with
/// [`RedisLocation::server_of`](crate::store::RedisLocation::server_of) of the script's own
/// connection). In a Redis Cluster every key of one script must hash to one slot: give the
/// lease store a prefix that carries the other component's hash tag (for example
/// `{tokens}:leases` beside token records under `{tokens}:`), so `{tokens}:leases:L<key>`
/// lands on the records' slot.
#[cfg(feature = "redis")]
#[derive(Clone, PartialEq, Eq)]
pub struct RedisFence {
    /// The server and database of the lease store.
    pub server: String,
    /// The lease record's Redis key.
    pub key: String,
    /// The owner token the record holds while the lease is ours.
    pub owner: Vec<u8>,
}

#[cfg(feature = "redis")]
impl std::fmt::Debug for RedisFence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisFence")
            .field("server", &self.server)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

#[cfg(feature = "redis")]
impl RedisFence {
    /// The Lua function `fence_holds(key, owner)`, to prepend to a script: whether the lease
    /// record under `key` is a live record of the [`RedisStore`](crate::RedisStore) format
    /// (judged by `TIME`) holding `owner`. Written next to the store's own scripts, so the
    /// record format has one home.
    pub const LUA: &'static str = crate::store::redis::FENCE_HOLDS;
}

/// Lease records live beside flow records; flow keys never start with `L`.
fn lease_key(key: &FlowKey) -> String {
    format!("L{}", key.as_str())
}

impl Leases {
    /// Leases over `store`, expiring on `clock`.
    pub fn new(store: SharedStore, clock: SharedClock) -> Self {
        Leases { store, clock }
    }

    fn error(key: &FlowKey, e: crate::StoreError) -> Error {
        if e.kind() == StoreErrorKind::Corrupt {
            Error::Corrupt { key: key.clone(), message: e.to_string() }
        } else {
            Error::Store { key: key.clone(), source: Box::new(e) }
        }
    }

    /// Take the lease for `ttl` if nobody holds it.
    ///
    /// An insert that fails may have been applied with its reply lost: the record is read
    /// back, and if it holds this attempt's owner token the lease is ours (never left held by
    /// nobody until its TTL). If it cannot be read back either, the error is returned, and the
    /// record, if it was written, expires after `ttl`.
    pub async fn try_acquire(&self, key: &FlowKey, ttl: Duration) -> Result<Option<Lease>, Error> {
        self.try_acquire_as(key, ttl, owner_token()).await
    }

    /// [`Leases::try_acquire`] with the owner token `owner`: a record that already holds it
    /// (an earlier insert of this attempt whose reply was lost) is taken as ours.
    async fn try_acquire_as(
        &self,
        key: &FlowKey,
        ttl: Duration,
        owner: [u8; 16],
    ) -> Result<Option<Lease>, Error> {
        let now = self.clock.now();
        let ours = |v: &crate::Versioned| {
            (*v.value == owner).then(|| Lease {
                key: key.clone(),
                fence: v.version,
                owner,
                expires_at: v.expires_at,
            })
        };
        match self.store.insert_if_absent(&lease_key(key), owner.to_vec(), ttl).await {
            Ok(Inserted::Inserted { version }) => {
                Ok(Some(Lease { key: key.clone(), fence: version, owner, expires_at: now + ttl }))
            }
            Ok(Inserted::Exists(v)) => Ok(ours(&v)),
            Err(e) => match self.store.get(&lease_key(key)).await {
                // Applied, and its reply lost.
                Ok(Some(v)) if *v.value == owner => Ok(ours(&v)),
                _ => Err(Self::error(key, e)),
            },
        }
    }

    /// The lease record if it is still `lease`'s (its owner token).
    async fn ours(&self, lease: &Lease) -> Result<Option<u64>, Error> {
        match self.store.get(&lease_key(&lease.key)).await {
            Ok(Some(v)) if *v.value == lease.owner => Ok(Some(v.version)),
            Ok(_) => Ok(None),
            Err(e) => Err(Self::error(&lease.key, e)),
        }
    }

    /// Take the lease for `ttl`, waiting up to `wait` for its holder to release it or for it to
    /// expire. Waiting does not poll: it sleeps until a change or the current lease's expiry.
    ///
    /// One owner token serves the whole wait. An insert that fails on an unavailable store (a
    /// connection that sat idle through a server restart, a lost reply) is tried once more
    /// after a short pause: were the first applied after all, the second finds this owner
    /// token and takes the lease. If that fails too, a record of ours that can be found is
    /// released before the error is returned.
    pub async fn acquire(
        &self,
        key: &FlowKey,
        ttl: Duration,
        wait: Duration,
    ) -> Result<Lease, Error> {
        let deadline = self.clock.now() + wait;
        let mut changes = self.store.subscribe(&lease_key(key));
        let owner = owner_token();
        let mut failed = false;
        loop {
            match self.try_acquire_as(key, ttl, owner).await {
                Ok(Some(lease)) => return Ok(lease),
                Ok(None) => {}
                Err(e) if !failed && unavailable(&e) => {
                    failed = true;
                    self.clock.sleep(Duration::from_millis(20)).await;
                    continue;
                }
                Err(e) => {
                    if let Ok(Some(v)) = self.store.get(&lease_key(key)).await
                        && *v.value == owner
                    {
                        let _ = self.store.delete_if(&lease_key(key), Some(v.version)).await;
                    }
                    return Err(e);
                }
            }
            let held_until = match self.store.get(&lease_key(key)).await {
                Ok(Some(v)) => v.expires_at,
                Ok(None) => continue,
                Err(e) => return Err(Self::error(key, e)),
            };
            if self.clock.now() >= deadline {
                return Err(Error::Timeout { key: key.clone() });
            }
            tokio::select! {
                () = changes.changed() => {}
                () = self.clock.sleep_until(held_until.min(deadline)) => {}
            }
        }
    }

    /// Extend the lease by `ttl` from now. Fails with [`Error::NotFound`] if it was lost (it
    /// expired, and possibly another process holds it now). A store error leaves the lease as it
    /// was (perhaps renewed: the next renewal or [`Leases::is_held`] tells).
    pub async fn renew(&self, lease: &mut Lease, ttl: Duration) -> Result<(), Error> {
        let now = self.clock.now();
        let Some(version) = self.ours(lease).await? else {
            return Err(Error::NotFound { key: lease.key.clone() });
        };
        match self
            .store
            .compare_and_swap(&lease_key(&lease.key), version, lease.owner.to_vec(), ttl)
            .await
        {
            Ok(Swapped::Swapped { .. }) => {
                lease.expires_at = now + ttl;
                Ok(())
            }
            Ok(Swapped::Conflict(_)) => Err(Error::NotFound { key: lease.key.clone() }),
            Err(e) => Err(Self::error(&lease.key, e)),
        }
    }

    /// Whether `lease` is still held (not expired, not taken over).
    pub async fn is_held(&self, lease: &Lease) -> Result<bool, Error> {
        Ok(self.ours(lease).await?.is_some())
    }

    /// `lease` as a Redis script can check it atomically with its own write, when the lease
    /// store is a [`RedisStore`](crate::RedisStore) (or a wrapper that forwards
    /// [`Store::redis_location`](crate::Store::redis_location)); `None` otherwise.
    #[cfg(feature = "redis")]
    pub fn redis_fence(&self, lease: &Lease) -> Option<RedisFence> {
        let at = self.store.redis_location(&lease_key(&lease.key))?;
        Some(RedisFence { server: at.server, key: at.key, owner: lease.owner.to_vec() })
    }

    /// Give the lease up. Returns whether it was still held.
    pub async fn release(&self, lease: Lease) -> Result<bool, Error> {
        let Some(version) = self.ours(&lease).await? else { return Ok(false) };
        self.store
            .delete_if(&lease_key(&lease.key), Some(version))
            .await
            .map_err(|e| Self::error(&lease.key, e))
    }
}

fn unavailable(e: &Error) -> bool {
    matches!(e, Error::Store { source, .. } if source.kind() == StoreErrorKind::Unavailable)
}

/// A random owner token (falls back to the time and a counter if the OS has no randomness).
fn owner_token() -> [u8; 16] {
    let mut owner = [0u8; 16];
    if getrandom::fill(&mut owner).is_err() {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        owner[..8].copy_from_slice(&n.to_be_bytes());
        owner[8..].copy_from_slice(&u64::from(std::process::id()).to_be_bytes());
    }
    owner
}
