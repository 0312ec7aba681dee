//! [`FaultyStore`] (feature `test-util`): a [`Store`] wrapper that fails the way a store across a
//! network does, for tests of the layers above.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use mcp_clock::{Clock, SharedClock};

use crate::store::BoxFuture;
use crate::{
    Inserted, SharedStore, Store, StoreError, StoreErrorKind, Subscription, Swapped, Versioned,
};

/// A [`Store`] over another one with faults a test arms one at a time:
///
/// - [`FaultyStore::fail_next_write`]: the next write is not applied and reports
///   [`StoreErrorKind::Unavailable`] (the connection dropped before the command arrived);
/// - [`FaultyStore::lose_next_write_reply`]: the next write is applied, then reports
///   [`StoreErrorKind::Unavailable`] (the reply was lost);
/// - [`FaultyStore::fail_next_read`]: the next read fails;
/// - [`FaultyStore::set_delay`]: every operation takes this long on the clock.
///
/// Writes are `insert_if_absent`, `compare_and_set` and `delete_if`.
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
    clock: SharedClock,
    faults: Mutex<Faults>,
}

#[derive(Default)]
struct Faults {
    fail_writes: u32,
    lose_replies: u32,
    fail_reads: u32,
    delay: Duration,
    injected: u64,
}

impl fmt::Debug for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultyStore").field("inner", &self.inner).finish_non_exhaustive()
    }
}

enum Plan {
    Fail,
    LoseReply,
    Pass,
}

impl FaultyStore {
    /// Wrap `inner`; delays run on `clock`.
    pub fn new(inner: SharedStore, clock: SharedClock) -> Arc<Self> {
        Arc::new(FaultyStore { inner, clock, faults: Mutex::default() })
    }

    fn with<T>(&self, f: impl FnOnce(&mut Faults) -> T) -> T {
        f(&mut self.faults.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Fail the next write without applying it.
    pub fn fail_next_write(&self) {
        self.with(|f| f.fail_writes += 1);
    }

    /// Apply the next write, then report a failure.
    pub fn lose_next_write_reply(&self) {
        self.with(|f| f.lose_replies += 1);
    }

    /// Fail the next read.
    pub fn fail_next_read(&self) {
        self.with(|f| f.fail_reads += 1);
    }

    /// Make every operation take `delay` on the clock.
    pub fn set_delay(&self, delay: Duration) {
        self.with(|f| f.delay = delay);
    }

    /// Drop every armed fault (and the delay).
    pub fn disarm(&self) {
        self.with(|f| {
            let injected = f.injected;
            *f = Faults { injected, ..Faults::default() };
        });
    }

    /// How many faults were injected so far.
    pub fn injected(&self) -> u64 {
        self.with(|f| f.injected)
    }

    fn error(key: &str, what: &str) -> StoreError {
        StoreError::new(StoreErrorKind::Unavailable, format!("injected fault: {what}"))
            .with_key(key)
    }

    async fn delay(&self) {
        let delay = self.with(|f| f.delay);
        if !delay.is_zero() {
            self.clock.sleep(delay).await;
        }
    }

    /// `op` is called only when the write is to be applied (a backend may apply a write when
    /// its method is called, before its future is polled).
    async fn write<'a, T>(
        &'a self,
        key: &str,
        op: impl FnOnce() -> BoxFuture<'a, Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        self.delay().await;
        let plan = self.with(|f| {
            if f.fail_writes > 0 {
                f.fail_writes -= 1;
                f.injected += 1;
                Plan::Fail
            } else if f.lose_replies > 0 {
                f.lose_replies -= 1;
                f.injected += 1;
                Plan::LoseReply
            } else {
                Plan::Pass
            }
        });
        match plan {
            Plan::Fail => Err(Self::error(key, "write failed before it was applied")),
            Plan::LoseReply => {
                op().await?;
                Err(Self::error(key, "write applied, reply lost"))
            }
            Plan::Pass => op().await,
        }
    }
}

impl Store for FaultyStore {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Versioned>, StoreError>> {
        Box::pin(async move {
            self.delay().await;
            let fail = self.with(|f| {
                let fail = f.fail_reads > 0;
                if fail {
                    f.fail_reads -= 1;
                    f.injected += 1;
                }
                fail
            });
            if fail {
                return Err(Self::error(key, "read failed"));
            }
            self.inner.get(key).await
        })
    }

    fn insert_if_absent<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Inserted, StoreError>> {
        Box::pin(self.write(key, move || self.inner.insert_if_absent(key, value, ttl)))
    }

    fn compare_and_set<'a>(
        &'a self,
        key: &'a str,
        expected: u64,
        value: Vec<u8>,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Swapped, StoreError>> {
        Box::pin(self.write(key, move || self.inner.compare_and_set(key, expected, value, ttl)))
    }

    fn delete_if<'a>(
        &'a self,
        key: &'a str,
        expected: Option<u64>,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(self.write(key, move || self.inner.delete_if(key, expected)))
    }

    fn subscribe(&self, key: &str) -> Subscription {
        self.inner.subscribe(key)
    }
}
