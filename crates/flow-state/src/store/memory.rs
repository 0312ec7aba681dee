//! The in-memory store: sharded maps under short locks, expiry on the injected clock.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use mcp_clock::{Clock, SharedClock, Timestamp};

use super::{Inserted, KeyNotifier, Store, StoreError, Subscription, Swapped, Versioned};

const SHARDS: usize = 64;
/// Expired entries in a shard are swept after this many writes to it.
const SWEEP_EVERY: u32 = 512;

#[derive(Debug)]
struct Entry {
    version: u64,
    value: Arc<[u8]>,
    expires_at: Timestamp,
}

#[derive(Debug, Default)]
struct Shard {
    map: HashMap<Box<str>, Entry>,
    writes: u32,
}

impl Shard {
    fn live(&self, key: &str, now: Timestamp) -> Option<&Entry> {
        self.map.get(key).filter(|e| e.expires_at > now)
    }

    fn wrote(&mut self, now: Timestamp) {
        self.writes += 1;
        if self.writes >= SWEEP_EVERY {
            self.writes = 0;
            self.map.retain(|_, e| e.expires_at > now);
        }
    }
}

/// A [`Store`] in this process's memory, for single-process hosts and tests.
///
/// Values expire on the injected clock: an expired value is invisible at once and its memory is
/// reclaimed by a sweep every few hundred writes to its shard.
///
/// ```
/// use flow_state::{MemoryStore, SharedStore};
/// let store = SharedStore::new(MemoryStore::new());
/// # let _ = store;
/// ```
#[derive(Debug)]
pub struct MemoryStore {
    shards: Box<[Mutex<Shard>]>,
    hasher: std::collections::hash_map::RandomState,
    next_version: AtomicU64,
    clock: SharedClock,
    notifier: Arc<KeyNotifier>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new()
    }
}

impl MemoryStore {
    /// An empty store on the system clock.
    pub fn new() -> Self {
        MemoryStore::with_clock(SharedClock::system())
    }

    /// An empty store whose TTLs run on `clock`.
    pub fn with_clock(clock: SharedClock) -> Self {
        MemoryStore {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: Default::default(),
            next_version: AtomicU64::new(1),
            clock,
            notifier: KeyNotifier::new(),
        }
    }

    /// How many entries are held, live or expired but not yet swept.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).map.len()).sum()
    }

    /// Whether the store holds no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn shard(&self, key: &str) -> std::sync::MutexGuard<'_, Shard> {
        let index = (self.hasher.hash_one(key) as usize) % SHARDS;
        self.shards[index].lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn version(&self) -> u64 {
        self.next_version.fetch_add(1, Ordering::Relaxed)
    }

    fn get_now(&self, key: &str) -> Option<Versioned> {
        let now = self.clock.now();
        let shard = self.shard(key);
        shard.live(key, now).map(|e| Versioned {
            version: e.version,
            value: e.value.clone(),
            expires_at: e.expires_at,
        })
    }

    fn insert_now(&self, key: &str, value: Vec<u8>, ttl: Duration) -> Inserted {
        let now = self.clock.now();
        let outcome = {
            let mut shard = self.shard(key);
            if let Some(e) = shard.live(key, now) {
                return Inserted::Exists(Versioned {
                    version: e.version,
                    value: e.value.clone(),
                    expires_at: e.expires_at,
                });
            }
            let version = self.version();
            shard
                .map
                .insert(key.into(), Entry { version, value: value.into(), expires_at: now + ttl });
            shard.wrote(now);
            Inserted::Inserted { version }
        };
        self.notifier.notify(key);
        outcome
    }

    fn cas_now(&self, key: &str, expected: u64, value: Vec<u8>, ttl: Duration) -> Swapped {
        let now = self.clock.now();
        let version = {
            let mut shard = self.shard(key);
            let current = shard.live(key, now).map(|e| (e.version, e.value.clone(), e.expires_at));
            match current {
                Some((v, _, _)) if v == expected => {}
                other => {
                    return Swapped::Conflict(other.map(|(version, value, expires_at)| {
                        Versioned { version, value, expires_at }
                    }));
                }
            }
            let version = self.version();
            shard
                .map
                .insert(key.into(), Entry { version, value: value.into(), expires_at: now + ttl });
            shard.wrote(now);
            version
        };
        self.notifier.notify(key);
        Swapped::Swapped { version }
    }

    fn delete_now(&self, key: &str, expected: Option<u64>) -> bool {
        let now = self.clock.now();
        let deleted = {
            let mut shard = self.shard(key);
            match shard.map.get(key) {
                Some(e) if e.expires_at <= now => {
                    shard.map.remove(key);
                    false
                }
                Some(e) if expected.is_none_or(|v| v == e.version) => {
                    shard.map.remove(key);
                    true
                }
                _ => false,
            }
        };
        if deleted {
            self.notifier.notify(key);
        }
        deleted
    }
}

#[async_trait::async_trait]
impl Store for MemoryStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        Ok(self.get_now(key))
    }

    async fn insert_if_absent(
        &self,
        key: &str,
        value: Vec<u8>,
        ttl: Duration,
    ) -> Result<Inserted, StoreError> {
        Ok(self.insert_now(key, value, ttl))
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: u64,
        value: Vec<u8>,
        ttl: Duration,
    ) -> Result<Swapped, StoreError> {
        Ok(self.cas_now(key, expected, value, ttl))
    }

    async fn delete_if(&self, key: &str, expected: Option<u64>) -> Result<bool, StoreError> {
        Ok(self.delete_now(key, expected))
    }

    fn subscribe(&self, key: &str) -> Subscription {
        self.notifier.subscribe(key)
    }
}
