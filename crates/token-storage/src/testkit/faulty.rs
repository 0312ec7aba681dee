//! [`FaultyTokenStore`]: a [`TokenStore`] wrapper that fails the way a store across a network
//! does.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use mcp_clock::{Clock, SharedClock};

use crate::refresher::BoxFuture;
use crate::{Error, SharedTokenStore, Swap, TokenStore, Versioned};

/// A [`TokenStore`] over another one with faults a test arms:
///
/// - [`FaultyTokenStore::fail_next_write`]: the next write is not applied and reports
///   [`Error::StoreUnavailable`];
/// - [`FaultyTokenStore::lose_next_write_reply`]: the next write is applied, then reports
///   [`Error::StoreUnavailable`] (the reply was lost);
/// - [`FaultyTokenStore::fail_next_read`]: the next read fails;
/// - [`FaultyTokenStore::set_delay`]: every operation takes this long on the clock.
///
/// Writes are `compare_and_swap` and `delete`; reads are `get` and `keys_with_prefix`.
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

impl fmt::Debug for FaultyTokenStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultyTokenStore").field("inner", &self.inner).finish_non_exhaustive()
    }
}

enum Plan {
    Fail,
    LoseReply,
    Pass,
}

impl FaultyTokenStore {
    /// Wrap `inner`; delays run on `clock`.
    pub fn new(inner: SharedTokenStore, clock: SharedClock) -> Arc<Self> {
        Arc::new(FaultyTokenStore { inner, clock, faults: Mutex::default() })
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

    fn error(what: &str) -> Error {
        Error::StoreUnavailable { message: format!("injected fault: {what}"), source: None }
    }

    async fn delay(&self) {
        let delay = self.with(|f| f.delay);
        if !delay.is_zero() {
            self.clock.sleep(delay).await;
        }
    }

    /// `op` is called only when the operation is to happen (a backend may act when its method
    /// is called, before its future is polled).
    async fn read<'a, T>(
        &'a self,
        op: impl FnOnce() -> BoxFuture<'a, Result<T, Error>>,
    ) -> Result<T, Error> {
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
            return Err(Self::error("read failed"));
        }
        op().await
    }

    async fn write<'a, T>(
        &'a self,
        op: impl FnOnce() -> BoxFuture<'a, Result<T, Error>>,
    ) -> Result<T, Error> {
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
            Plan::Fail => Err(Self::error("write failed before it was applied")),
            Plan::LoseReply => {
                op().await?;
                Err(Self::error("write applied, reply lost"))
            }
            Plan::Pass => op().await,
        }
    }
}

impl TokenStore for FaultyTokenStore {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Versioned>, Error>> {
        Box::pin(self.read(move || self.inner.get(key)))
    }

    fn compare_and_swap<'a>(
        &'a self,
        key: &'a str,
        expected: Option<u64>,
        value: Vec<u8>,
    ) -> BoxFuture<'a, Result<Swap, Error>> {
        Box::pin(self.write(move || self.inner.compare_and_swap(key, expected, value)))
    }

    fn delete<'a>(
        &'a self,
        key: &'a str,
        expected: Option<u64>,
    ) -> BoxFuture<'a, Result<bool, Error>> {
        Box::pin(self.write(move || self.inner.delete(key, expected)))
    }

    fn keys_with_prefix<'a>(
        &'a self,
        prefix: &'a str,
    ) -> BoxFuture<'a, Result<Vec<String>, Error>> {
        Box::pin(self.read(move || self.inner.keys_with_prefix(prefix)))
    }
}
