//! The in-memory store.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use super::{Swapped, TokenStore, Versioned};
use crate::Error;

/// A [`TokenStore`] in process memory: for tests and for hosts that keep nothing on disk.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), token_storage::Error> {
/// use token_storage::store::Swapped;
/// use token_storage::{MemoryTokenStore, TokenStore};
///
/// let store = MemoryTokenStore::new();
/// let Swapped::Swapped { version } = store.compare_and_swap("k", None, b"v1".to_vec()).await? else {
///     unreachable!()
/// };
/// // A writer that read nothing loses against the one that wrote first.
/// assert!(matches!(store.compare_and_swap("k", None, b"v2".to_vec()).await?, Swapped::Conflict(Some(_))));
/// assert!(matches!(store.compare_and_swap("k", Some(version), b"v2".to_vec()).await?, Swapped::Swapped { .. }));
/// # Ok(()) }
/// ```
#[derive(Debug, Default)]
pub struct MemoryTokenStore {
    inner: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    records: BTreeMap<String, Versioned>,
    last_version: u64,
}

impl MemoryTokenStore {
    /// An empty store.
    pub fn new() -> Self {
        MemoryTokenStore::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.inner.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

#[async_trait::async_trait]
impl TokenStore for MemoryTokenStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, Error> {
        let found = self.with(|s| s.records.get(key).cloned());
        Ok(found)
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<u64>,
        value: Vec<u8>,
    ) -> Result<Swapped, Error> {
        let outcome = self.with(|s| {
            let current = s.records.get(key);
            if current.map(|v| v.version) != expected {
                return Swapped::Conflict(current.cloned());
            }
            s.last_version += 1;
            let version = s.last_version;
            s.records.insert(key.to_owned(), Versioned { version, value: Arc::from(value) });
            Swapped::Swapped { version }
        });
        Ok(outcome)
    }

    async fn delete_if(&self, key: &str, expected: Option<u64>) -> Result<bool, Error> {
        let deleted = self.with(|s| match s.records.get(key) {
            Some(v) if expected.is_none_or(|e| e == v.version) => {
                s.records.remove(key);
                true
            }
            _ => false,
        });
        Ok(deleted)
    }

    async fn keys_with_prefix(&self, prefix: &str) -> Result<Vec<String>, Error> {
        let keys = self.with(|s| {
            s.records
                .range::<str, _>((std::ops::Bound::Included(prefix), std::ops::Bound::Unbounded))
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(k, _)| k.clone())
                .collect()
        });
        Ok(keys)
    }
}
