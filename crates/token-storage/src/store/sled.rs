//! The sled store: tokens on disk, surviving a restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{Swapped, TokenStore, Versioned};
use crate::Error;

/// A [`TokenStore`] on sled, the embedded default. Feature `sled`.
///
/// Each record is an 8-byte big-endian version followed by the sealed bytes, written with one
/// `compare_and_swap`, so a crash leaves either the old record or the new one, never a mix.
/// Every write is flushed to disk before it returns: a rotated refresh token that the
/// authorization server has already issued must not be lost to a crash.
///
/// sled lets one process hold a database at a time.
///
/// ```
/// # fn main() -> Result<(), token_storage::Error> {
/// let dir = tempfile::tempdir().unwrap();
/// let store = token_storage::SledTokenStore::open(dir.path())?;
/// # drop(store); Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct SledTokenStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    db: sled::Db,
    tree: sled::Tree,
    path: PathBuf,
}

fn backend(what: &str, e: sled::Error) -> Error {
    Error::store(format!("sled {what} failed"), e)
}

impl SledTokenStore {
    /// Open (or create) the database at `path`, keeping records in the tree `tokens`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, Error> {
        SledTokenStore::open_tree(path, "tokens")
    }

    /// Open (or create) the database at `path`, keeping records in the tree `tree`, so several
    /// stores can share one database directory.
    pub fn open_tree(path: impl AsRef<Path>, tree: &str) -> Result<Self, Error> {
        let path = path.as_ref().to_path_buf();
        let db = sled::Config::new()
            .path(&path)
            .open()
            .map_err(|e| backend(&format!("open of {}", path.display()), e))?;
        let tree = db.open_tree(tree.as_bytes()).map_err(|e| backend("open_tree", e))?;
        Ok(SledTokenStore { inner: Arc::new(Inner { db, tree, path }) })
    }

    /// The database directory.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    fn read(&self, key: &str) -> Result<Option<(sled::IVec, Versioned)>, Error> {
        let Some(raw) = self.inner.tree.get(key.as_bytes()).map_err(|e| backend("get", e))? else {
            return Ok(None);
        };
        if raw.len() < 8 {
            // Not ours; surface it as an unreadable record rather than guess.
            return Err(Error::Decrypt {
                record: key.to_owned(),
                reason: crate::DecryptFailure::Truncated,
            });
        }
        let version = u64::from_be_bytes(raw[..8].try_into().unwrap_or([0; 8]));
        let value = Arc::from(&raw[8..]);
        Ok(Some((raw, Versioned { version, value })))
    }

    async fn swap(
        &self,
        key: &str,
        old: Option<sled::IVec>,
        new: Option<Vec<u8>>,
    ) -> Result<bool, Error> {
        let swapped = self
            .inner
            .tree
            .compare_and_swap(key.as_bytes(), old, new)
            .map_err(|e| backend("compare_and_swap", e))?
            .is_ok();
        if swapped {
            // `flush` blocks on fsync: keep it off the async workers.
            let db = self.inner.db.clone();
            tokio::task::spawn_blocking(move || db.flush())
                .await
                .map_err(|e| Error::store("the sled flush task failed", e))?
                .map_err(|e| backend("flush", e))?;
        }
        Ok(swapped)
    }
}

#[async_trait::async_trait]
impl TokenStore for SledTokenStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, Error> {
        self.read(key).map(|r| r.map(|(_, v)| v))
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<u64>,
        value: Vec<u8>,
    ) -> Result<Swapped, Error> {
        loop {
            let current = self.read(key)?;
            if current.as_ref().map(|(_, v)| v.version) != expected {
                return Ok(Swapped::Conflict(current.map(|(_, v)| v)));
            }
            // Monotonic across restarts: sled persists its id generator. +1 keeps 0 unused.
            let version = self.inner.db.generate_id().map_err(|e| backend("generate_id", e))? + 1;
            let mut record = Vec::with_capacity(8 + value.len());
            record.extend_from_slice(&version.to_be_bytes());
            record.extend_from_slice(&value);
            if self.swap(key, current.map(|(raw, _)| raw), Some(record)).await? {
                return Ok(Swapped::Swapped { version });
            }
        }
    }

    async fn delete_if(&self, key: &str, expected: Option<u64>) -> Result<bool, Error> {
        loop {
            let raw = self.inner.tree.get(key.as_bytes()).map_err(|e| backend("get", e))?;
            let Some(raw) = raw else { return Ok(false) };
            if let Some(expected) = expected {
                let version =
                    raw.get(..8).map(|b| u64::from_be_bytes(b.try_into().unwrap_or([0; 8])));
                if version != Some(expected) {
                    return Ok(false);
                }
            }
            if self.swap(key, Some(raw), None).await? {
                return Ok(true);
            }
        }
    }

    async fn keys_with_prefix(&self, prefix: &str) -> Result<Vec<String>, Error> {
        self.inner
            .tree
            .scan_prefix(prefix.as_bytes())
            .keys()
            .map(|k| {
                k.map(|k| String::from_utf8_lossy(&k).into_owned()).map_err(|e| backend("scan", e))
            })
            .collect()
    }
}
