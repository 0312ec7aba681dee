//! The sled store: flows on disk, surviving a restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use mcp_clock::{Clock, SharedClock};

use super::{
    Inserted, KeyNotifier, Store, StoreError, StoreErrorKind, Subscription, Swapped, Versioned,
    decode_header, encode_header,
};

/// Expired records are swept from disk after this many writes.
const SWEEP_EVERY: u32 = 4096;

/// How a [`SledStore`] makes writes durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Durability {
    /// sled flushes its log in the background every so many milliseconds (sled's own default is
    /// 500). A crash can lose the last interval's writes but never tears a record. This is the
    /// default: flows are short-lived coordination state, and a lost PENDING flow is recreated.
    Periodic {
        /// Milliseconds between background flushes.
        every_ms: u64,
    },
    /// Every write is flushed to disk before it returns.
    EveryWrite,
}

impl Default for Durability {
    fn default() -> Self {
        Durability::Periodic { every_ms: 500 }
    }
}

/// A [`Store`] on sled, the embedded default. Feature `sled`.
///
/// sled lets one process hold a database at a time. Records carry their version and absolute
/// expiry in a 16-byte header; expired records are invisible at once and swept from disk every
/// few thousand writes and at open.
///
/// ```
/// # fn main() -> Result<(), flow_state::store::StoreError> {
/// let dir = tempfile::tempdir().unwrap();
/// let store = flow_state::SledStore::open(dir.path())?;
/// # drop(store); Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct SledStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    db: sled::Db,
    tree: sled::Tree,
    clock: SharedClock,
    durability: Durability,
    notifier: Arc<KeyNotifier>,
    writes: AtomicU32,
}

/// Options for opening a [`SledStore`].
#[derive(Debug, Clone)]
pub struct SledStoreBuilder {
    path: PathBuf,
    clock: SharedClock,
    durability: Durability,
    tree: String,
}

impl SledStoreBuilder {
    /// The clock TTLs run on (default: the system clock).
    pub fn clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }

    /// How writes are made durable (default: [`Durability::Periodic`] every 500 ms).
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// The sled tree to keep records in (default `flows`), so several stores can share one
    /// database directory.
    pub fn tree(mut self, name: impl Into<String>) -> Self {
        self.tree = name.into();
        self
    }

    /// Open (or create) the database.
    pub fn open(self) -> Result<SledStore, StoreError> {
        let flush_every_ms = match self.durability {
            Durability::Periodic { every_ms } => Some(every_ms.max(1)),
            Durability::EveryWrite => None,
        };
        let db = sled::Config::new()
            .path(&self.path)
            .flush_every_ms(flush_every_ms)
            .open()
            .map_err(|e| open_error(&self.path, e))?;
        let tree = db.open_tree(self.tree.as_bytes()).map_err(|e| open_error(&self.path, e))?;
        let store = SledStore {
            inner: Arc::new(Inner {
                db,
                tree,
                clock: self.clock,
                durability: self.durability,
                notifier: KeyNotifier::new(),
                writes: AtomicU32::new(0),
            }),
        };
        store.sweep()?;
        Ok(store)
    }
}

fn open_error(path: &Path, e: sled::Error) -> StoreError {
    let kind = match e {
        sled::Error::Corruption { .. } => StoreErrorKind::Corrupt,
        sled::Error::Io(_) => StoreErrorKind::Unavailable,
        _ => StoreErrorKind::Backend,
    };
    StoreError::new(kind, format!("could not open the sled database at {}", path.display()))
        .with_source(e)
}

fn backend(key: &str, e: sled::Error) -> StoreError {
    StoreError::new(StoreErrorKind::Backend, "sled operation failed").with_key(key).with_source(e)
}

impl SledStore {
    /// Open (or create) a store at `path` with the defaults.
    pub fn open(path: impl AsRef<Path>) -> Result<SledStore, StoreError> {
        SledStore::builder(path).open()
    }

    /// Options for opening a store at `path`.
    pub fn builder(path: impl AsRef<Path>) -> SledStoreBuilder {
        SledStoreBuilder {
            path: path.as_ref().to_path_buf(),
            clock: SharedClock::system(),
            durability: Durability::default(),
            tree: "flows".into(),
        }
    }

    /// Flush every write so far to disk.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.inner.db.flush_async().await.map(drop).map_err(|e| backend("(flush)", e))
    }

    /// Remove expired records from disk; returns how many were removed. Corrupt records are
    /// left in place for a person to inspect.
    pub fn sweep(&self) -> Result<usize, StoreError> {
        let now = self.inner.clock.now();
        let mut removed = 0;
        for item in self.inner.tree.iter() {
            let (k, raw) = item.map_err(|e| backend("(sweep)", e))?;
            let key = String::from_utf8_lossy(&k);
            let Ok(v) = decode_header(&key, &raw) else { continue };
            if v.expires_at <= now
                && self
                    .inner
                    .tree
                    .compare_and_swap(&k, Some(raw), None::<&[u8]>)
                    .map_err(|e| backend(&key, e))?
                    .is_ok()
            {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Read the raw record and decode its header.
    fn read(&self, key: &str) -> Result<Option<(sled::IVec, Versioned)>, StoreError> {
        match self.inner.tree.get(key.as_bytes()).map_err(|e| backend(key, e))? {
            None => Ok(None),
            Some(raw) => {
                let v = decode_header(key, &raw)?;
                Ok(Some((raw, v)))
            }
        }
    }

    /// Swap `old` for `new` atomically; `Ok(false)` if a concurrent write got there first.
    async fn swap(
        &self,
        key: &str,
        old: Option<sled::IVec>,
        new: Option<Vec<u8>>,
    ) -> Result<bool, StoreError> {
        let swapped = self
            .inner
            .tree
            .compare_and_swap(key.as_bytes(), old, new)
            .map_err(|e| backend(key, e))?
            .is_ok();
        if swapped {
            if self.inner.durability == Durability::EveryWrite {
                self.inner.db.flush_async().await.map_err(|e| backend(key, e))?;
            }
            self.inner.notifier.notify(key);
            if self.inner.writes.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
                self.sweep()?;
            }
        }
        Ok(swapped)
    }

    fn next_version(&self, key: &str) -> Result<u64, StoreError> {
        // Monotonic across restarts: sled persists the id generator.
        self.inner.db.generate_id().map_err(|e| backend(key, e))
    }
}

#[async_trait::async_trait]
impl Store for SledStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        let now = self.inner.clock.now();
        self.read(key).map(|r| r.map(|(_, v)| v).filter(|v| v.expires_at > now))
    }

    async fn insert_if_absent(
        &self,
        key: &str,
        value: Vec<u8>,
        ttl: Duration,
    ) -> Result<Inserted, StoreError> {
        loop {
            let now = self.inner.clock.now();
            let current = self.read(key)?;
            if let Some((_, v)) = &current
                && v.expires_at > now
            {
                return Ok(Inserted::Exists(v.clone()));
            }
            let version = self.next_version(key)?;
            let record = encode_header(version, now + ttl, &value);
            if self.swap(key, current.map(|(raw, _)| raw), Some(record)).await? {
                return Ok(Inserted::Inserted { version });
            }
        }
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: u64,
        value: Vec<u8>,
        ttl: Duration,
    ) -> Result<Swapped, StoreError> {
        loop {
            let now = self.inner.clock.now();
            let Some((raw, v)) = self.read(key)? else { return Ok(Swapped::Conflict(None)) };
            if v.expires_at <= now {
                return Ok(Swapped::Conflict(None));
            }
            if v.version != expected {
                return Ok(Swapped::Conflict(Some(v)));
            }
            let version = self.next_version(key)?;
            let record = encode_header(version, now + ttl, &value);
            if self.swap(key, Some(raw), Some(record)).await? {
                return Ok(Swapped::Swapped { version });
            }
        }
    }

    async fn delete_if(&self, key: &str, expected: Option<u64>) -> Result<bool, StoreError> {
        loop {
            let now = self.inner.clock.now();
            let Some((raw, v)) = self.read(key)? else { return Ok(false) };
            let live = v.expires_at > now;
            if live && expected.is_some_and(|e| e != v.version) {
                return Ok(false);
            }
            if self.swap(key, Some(raw), None).await? {
                return Ok(live);
            }
        }
    }

    fn subscribe(&self, key: &str) -> Subscription {
        self.inner.notifier.subscribe(key)
    }
}
