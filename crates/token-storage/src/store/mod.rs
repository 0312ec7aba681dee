//! The store trait token records live in: [`TokenStore`], with [`MemoryTokenStore`] and
//! (feature `sled`) `SledTokenStore`, (feature `redis`) `RedisTokenStore`.
//!
//! Records are opaque sealed bytes with a version. Every method is one atomic backend operation:
//!
//! | method | memory | sled | Redis |
//! |---|---|---|---|
//! | [`TokenStore::get`] | lock + lookup | `get` | `HGETALL` |
//! | [`TokenStore::compare_and_swap`] | lock | `compare_and_swap(old → new)` | Lua: compare version, `SET` (`SET NX` when absent) |
//! | [`TokenStore::delete`] | lock | `compare_and_swap(old → None)` | Lua: compare version, `DEL` |
//! | [`TokenStore::keys_with_prefix`] | range scan | `scan_prefix` | `ZRANGEBYLEX` on an index kept by the writes |
//!
//! Versions are unique across the whole store and increase with every write (a persisted
//! counter: sled's id generator, Redis `INCR`), so a compare-and-swap can never succeed against
//! another generation of a key (no ABA), even after a delete and a restart.

use std::fmt;
use std::sync::Arc;

use crate::Error;
use crate::refresher::BoxFuture;

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
pub enum Swap {
    /// Written; this is the new version.
    Swapped {
        /// The new version.
        version: u64,
    },
    /// The stored version was not the expected one; nothing was written. Holds what is there.
    Conflict(Option<Versioned>),
}

/// A versioned key-value store for sealed token records. Dyn-compatible: use it as
/// [`SharedTokenStore`].
pub trait TokenStore: Send + Sync + fmt::Debug {
    /// The record under `key`, if any.
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Versioned>, Error>>;

    /// Write `value` under `key` only if the stored version is `expected` (`None`: only if
    /// nothing is stored).
    fn compare_and_swap<'a>(
        &'a self,
        key: &'a str,
        expected: Option<u64>,
        value: Vec<u8>,
    ) -> BoxFuture<'a, Result<Swap, Error>>;

    /// Delete the record under `key` if its version is `expected` (any version when `None`).
    /// Returns whether a record was deleted.
    fn delete<'a>(
        &'a self,
        key: &'a str,
        expected: Option<u64>,
    ) -> BoxFuture<'a, Result<bool, Error>>;

    /// Every stored key that starts with `prefix`, in any order.
    fn keys_with_prefix<'a>(&'a self, prefix: &'a str)
    -> BoxFuture<'a, Result<Vec<String>, Error>>;
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
