//! [`FaultyStore`] (feature `test-util`): a [`Store`] wrapper that fails the way a store across a
//! network does, for tests of the layers above.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use mcp_clock::{BoxFuture, SharedClock};

use super::{FaultPlan, WriteFault};

use crate::{
    Inserted, SharedStore, Store, StoreError, StoreErrorKind, Subscription, Swapped, Versioned,
};

/// A [`Store`] over another one with the faults of a [`FaultPlan`] (armed through it: the
/// wrapper dereferences to its plan), reported as [`StoreErrorKind::Unavailable`]:
///
/// - [`FaultPlan::fail_next_write`]: the next write is not applied (the connection dropped
///   before the command arrived);
/// - [`FaultPlan::lose_next_write_reply`]: the next write is applied, then fails (the reply was
///   lost);
/// - [`FaultPlan::fail_next_read`]: the next read fails;
/// - [`FaultPlan::set_delay`]: every operation takes this long on the clock;
/// - [`FaultPlan::set_reply_delay`]: every operation is answered this long after it was applied;
/// - [`FaultPlan::hold_next_delete`]: the next `delete_if` of a matching key waits until
///   released;
/// - [`FaultPlan::count_reads_of`]: `get`s of matching keys are counted.
///
/// Writes are `insert_if_absent`, `compare_and_swap` and `delete_if`.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use flow_state::{MemoryStore, SharedClock, SharedStore, testkit::FaultyStore};
/// use std::time::Duration;
///
/// let faulty = FaultyStore::new(SharedStore::new(MemoryStore::new()), SharedClock::system());
/// let store = SharedStore::from_arc(faulty.clone());
/// faulty.lose_next_write_reply();
/// assert!(store.insert_if_absent("k", b"v".to_vec(), Duration::from_secs(9)).await.is_err());
/// assert!(store.get("k").await.unwrap().is_some(), "applied, then the reply was lost");
/// # }
/// ```
pub struct FaultyStore {
    inner: SharedStore,
    plan: FaultPlan,
}

impl fmt::Debug for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultyStore").field("inner", &self.inner).finish_non_exhaustive()
    }
}

/// The arming methods ([`FaultPlan::fail_next_write`], ...) are the plan's.
impl std::ops::Deref for FaultyStore {
    type Target = FaultPlan;

    fn deref(&self) -> &FaultPlan {
        &self.plan
    }
}

impl FaultyStore {
    /// Wrap `inner`; delays run on `clock`.
    pub fn new(inner: SharedStore, clock: SharedClock) -> Arc<Self> {
        Arc::new(FaultyStore { inner, plan: FaultPlan::new(clock) })
    }

    fn error(key: &str, what: &str) -> StoreError {
        StoreError::new(StoreErrorKind::Unavailable, format!("injected fault: {what}"))
            .with_key(key)
    }

    /// `op` is called only when the write is to be applied (a backend may apply a write when
    /// its method is called, before its future is polled).
    async fn write<'a, T>(
        &'a self,
        key: &str,
        op: impl FnOnce() -> BoxFuture<'a, Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let result = match self.plan.next_write().await {
            WriteFault::Fail => Err(Self::error(key, "write failed before it was applied")),
            WriteFault::LoseReply => match op().await {
                Ok(_) => Err(Self::error(key, "write applied, reply lost")),
                Err(e) => Err(e),
            },
            WriteFault::None => op().await,
        };
        self.plan.reply_delay().await;
        result
    }
}

#[async_trait::async_trait]
impl Store for FaultyStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        self.plan.note_read(key);
        if self.plan.next_read_fails().await {
            return Err(Self::error(key, "read failed"));
        }
        let read = self.inner.get(key).await;
        self.plan.reply_delay().await;
        read
    }

    async fn insert_if_absent(
        &self,
        key: &str,
        value: Vec<u8>,
        ttl: Duration,
    ) -> Result<Inserted, StoreError> {
        self.write(key, move || self.inner.insert_if_absent(key, value, ttl)).await
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: u64,
        value: Vec<u8>,
        ttl: Duration,
    ) -> Result<Swapped, StoreError> {
        self.write(key, move || self.inner.compare_and_swap(key, expected, value, ttl)).await
    }

    async fn delete_if(&self, key: &str, expected: Option<u64>) -> Result<bool, StoreError> {
        self.plan.before_delete(key).await;
        self.write(key, move || self.inner.delete_if(key, expected)).await
    }

    fn subscribe(&self, key: &str) -> Subscription {
        self.inner.subscribe(key)
    }

    #[cfg(feature = "redis")]
    fn redis_location(&self, key: &str) -> Option<crate::store::RedisLocation> {
        self.inner.redis_location(key)
    }
}
