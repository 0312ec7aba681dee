//! [`FaultyTokenStore`]: a [`TokenStore`] wrapper that fails the way a store across a network
//! does.

use std::fmt;
use std::sync::Arc;

use flow_state::testkit::{FaultPlan, WriteFault};
use mcp_clock::SharedClock;

use crate::Error;
use crate::store::{Fence, SharedTokenStore, Swapped, TokenStore, Versioned};

/// A [`TokenStore`] over another one with the faults of flow-state's [`FaultPlan`] (armed
/// through it: the wrapper dereferences to its plan), reported as [`Error::StoreUnavailable`]:
///
/// - [`FaultPlan::fail_next_write`]: the next write is not applied;
/// - [`FaultPlan::lose_next_write_reply`]: the next write is applied, then fails (the reply was
///   lost);
/// - [`FaultPlan::fail_next_read`]: the next read fails;
/// - [`FaultPlan::set_delay`]: every operation takes this long on the clock;
/// - [`FaultPlan::set_reply_delay`]: every operation is answered this long after it was applied;
/// - [`FaultPlan::hold_next_delete`]: the next `delete` of a matching key waits until released;
/// - [`FaultPlan::count_reads_of`]: `get`s of matching keys are counted.
///
/// Writes are `compare_and_swap` (fenced or not) and `delete`; reads are `get` and
/// `keys_with_prefix`.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use token_storage::{MemoryTokenStore, SharedClock, SharedTokenStore, testkit::FaultyTokenStore};
///
/// let faulty = FaultyTokenStore::new(MemoryTokenStore::new().into(), SharedClock::system());
/// let store = SharedTokenStore::from_arc(faulty.clone());
/// faulty.fail_next_write();
/// assert!(store.compare_and_swap("k", None, b"v".to_vec()).await.is_err());
/// assert!(store.get("k").await.unwrap().is_none(), "not applied");
/// # }
/// ```
pub struct FaultyTokenStore {
    inner: SharedTokenStore,
    plan: FaultPlan,
}

impl fmt::Debug for FaultyTokenStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultyTokenStore").field("inner", &self.inner).finish_non_exhaustive()
    }
}

/// The arming methods ([`FaultPlan::fail_next_write`], ...) are the plan's.
impl std::ops::Deref for FaultyTokenStore {
    type Target = FaultPlan;

    fn deref(&self) -> &FaultPlan {
        &self.plan
    }
}

impl FaultyTokenStore {
    /// Wrap `inner`; delays run on `clock`.
    pub fn new(inner: SharedTokenStore, clock: SharedClock) -> Arc<Self> {
        Arc::new(FaultyTokenStore { inner, plan: FaultPlan::new(clock) })
    }

    fn error(what: &str) -> Error {
        Error::StoreUnavailable { message: format!("injected fault: {what}"), source: None }
    }

    /// `op` is called only when the operation is to happen (a backend may act when its method
    /// is called, before its future is polled).
    async fn read<'a, T>(
        &'a self,
        op: impl FnOnce() -> mcp_clock::BoxFuture<'a, Result<T, Error>>,
    ) -> Result<T, Error> {
        if self.plan.next_read_fails().await {
            return Err(Self::error("read failed"));
        }
        let read = op().await;
        self.plan.reply_delay().await;
        read
    }

    async fn write<'a, T>(
        &'a self,
        op: impl FnOnce() -> mcp_clock::BoxFuture<'a, Result<T, Error>>,
    ) -> Result<T, Error> {
        let result = match self.plan.next_write().await {
            WriteFault::Fail => Err(Self::error("write failed before it was applied")),
            WriteFault::LoseReply => match op().await {
                Ok(_) => Err(Self::error("write applied, reply lost")),
                Err(e) => Err(e),
            },
            WriteFault::None => op().await,
        };
        self.plan.reply_delay().await;
        result
    }
}

#[async_trait::async_trait]
impl TokenStore for FaultyTokenStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, Error> {
        self.plan.note_read(key);
        self.read(move || self.inner.get(key)).await
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<u64>,
        value: Vec<u8>,
    ) -> Result<Swapped, Error> {
        self.write(move || self.inner.compare_and_swap(key, expected, value)).await
    }

    async fn delete_if(&self, key: &str, expected: Option<u64>) -> Result<bool, Error> {
        self.plan.before_delete(key).await;
        self.write(move || self.inner.delete_if(key, expected)).await
    }

    async fn keys_with_prefix(&self, prefix: &str) -> Result<Vec<String>, Error> {
        self.read(move || self.inner.keys_with_prefix(prefix)).await
    }

    async fn compare_and_swap_fenced(
        &self,
        key: &str,
        expected: Option<u64>,
        value: Vec<u8>,
        fence: &Fence<'_>,
    ) -> Result<Option<Swapped>, Error> {
        self.write(move || self.inner.compare_and_swap_fenced(key, expected, value, fence)).await
    }
}
