//! A process-local single-flight that caches nothing (the seed's in-flight refresh map).

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use mcp_clock::{Clock, SharedClock};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Why a [`SingleFlight::call`] returned without a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SingleFlightError {
    /// This caller's own deadline passed; the attempt goes on for the others.
    #[error("gave up waiting for the in-flight attempt (caller deadline)")]
    CallerDeadline,
    /// The attempt ran past its deadline and grace period and was dropped.
    #[error("the in-flight attempt hung past its deadline and was dropped")]
    Abandoned,
    /// The attempt panicked.
    #[error("the in-flight attempt panicked")]
    Panicked,
}

/// Deadlines for one [`SingleFlight::call`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallOptions {
    /// When an attempt started by this call is told to stop (its [`CancellationToken`] is
    /// cancelled), measured from its start.
    pub leader_deadline: Duration,
    /// How long after its deadline a cancelled attempt may still finish before it is dropped and
    /// removed, so that later calls start a new one.
    pub grace: Duration,
    /// When this caller stops waiting, measured from the call; the attempt goes on.
    pub caller_deadline: Option<Duration>,
}

impl CallOptions {
    /// An attempt deadline with no grace period and no separate caller deadline.
    pub fn new(leader_deadline: Duration) -> Self {
        CallOptions { leader_deadline, grace: Duration::ZERO, caller_deadline: None }
    }

    /// Set the grace period after the attempt deadline.
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Set this caller's own deadline.
    pub fn caller_deadline(mut self, deadline: Duration) -> Self {
        self.caller_deadline = Some(deadline);
        self
    }
}

/// What an attempt started by [`SingleFlight::call_with`] gets: the token cancelled at its
/// deadline, and a way to say it may no longer be dropped.
///
/// An attempt that has started a side effect which cannot be taken back (a request that may
/// have reached a server which rotates credentials on arrival) calls [`Attempt::keep`]: from
/// then on it is never dropped at its deadline plus grace; it runs until it ends (its own I/O
/// timeouts bound it), and callers still leave at their own deadlines.
#[derive(Debug, Clone)]
pub struct Attempt {
    token: CancellationToken,
    kept: Arc<AtomicBool>,
}

impl Attempt {
    /// The token cancelled at the attempt's deadline.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Whether the attempt's deadline has passed.
    pub fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Never drop this attempt at its deadline plus grace from now on: it has done something
    /// whose result must not be thrown away.
    pub fn keep(&self) {
        self.kept.store(true, Ordering::SeqCst);
    }

    /// Whether [`Attempt::keep`] was called.
    pub fn is_kept(&self) -> bool {
        self.kept.load(Ordering::SeqCst)
    }
}

type Slot<V> = watch::Receiver<Option<Result<V, SingleFlightError>>>;

struct Entry<V> {
    id: u64,
    rx: Slot<V>,
}

struct Inner<K, V> {
    map: Mutex<HashMap<K, Entry<V>>>,
    clock: SharedClock,
    next_id: AtomicU64,
}

/// Concurrent calls for a key join one in-flight attempt; nothing is cached after it settles.
///
/// - Calls for a key while an attempt is in flight wait for that attempt's value.
/// - After the attempt settles, the next call starts a fresh one.
/// - Each caller may have its own deadline: it is released with
///   [`SingleFlightError::CallerDeadline`] while the attempt goes on.
/// - The attempt runs detached from its callers. At its own deadline its
///   [`CancellationToken`] is cancelled; if it still has not finished after the grace period it
///   is dropped and removed, so a hung attempt never holds the key for ever.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use flow_state::{CallOptions, SingleFlight, SharedClock};
/// use std::time::Duration;
///
/// let refreshes: SingleFlight<&str, u32> = SingleFlight::new(SharedClock::system());
/// let options = CallOptions::new(Duration::from_secs(60)).grace(Duration::from_secs(1));
/// let (a, b) = tokio::join!(
///     refreshes.call("acme:alice:github", options, |_cancel| async { 1 }),
///     refreshes.call("acme:alice:github", options, |_cancel| async { 2 }),
/// );
/// assert_eq!(a, b); // one attempt, one shared value
/// assert_eq!(refreshes.in_flight(), 0);
/// # }
/// ```
pub struct SingleFlight<K, V> {
    inner: Arc<Inner<K, V>>,
}

impl<K, V> Clone for SingleFlight<K, V> {
    fn clone(&self) -> Self {
        SingleFlight { inner: self.inner.clone() }
    }
}

impl<K, V> fmt::Debug for SingleFlight<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let in_flight = self.inner.map.lock().unwrap_or_else(PoisonError::into_inner).len();
        f.debug_struct("SingleFlight").field("in_flight", &in_flight).finish()
    }
}

impl<K, V> SingleFlight<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// An empty single-flight whose deadlines run on `clock`.
    pub fn new(clock: SharedClock) -> Self {
        SingleFlight {
            inner: Arc::new(Inner { map: Mutex::default(), clock, next_id: AtomicU64::new(0) }),
        }
    }

    /// How many attempts are in flight.
    pub fn in_flight(&self) -> usize {
        self.inner.map.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Join the attempt in flight for `key`, or start one with `start` (which receives the token
    /// that is cancelled at the attempt's deadline).
    pub async fn call<F, Fut>(
        &self,
        key: K,
        options: CallOptions,
        start: F,
    ) -> Result<V, SingleFlightError>
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = V> + Send + 'static,
    {
        self.call_with(key, options, |attempt| start(attempt.token().clone())).await
    }

    /// [`SingleFlight::call`], whose attempt gets an [`Attempt`]: one that called
    /// [`Attempt::keep`] is not dropped at its deadline plus grace.
    pub async fn call_with<F, Fut>(
        &self,
        key: K,
        options: CallOptions,
        start: F,
    ) -> Result<V, SingleFlightError>
    where
        F: FnOnce(Attempt) -> Fut,
        Fut: Future<Output = V> + Send + 'static,
    {
        let clock = &self.inner.clock;
        let caller_deadline = options.caller_deadline.map(|d| clock.now() + d);
        let mut rx = {
            let mut map = self.inner.map.lock().unwrap_or_else(PoisonError::into_inner);
            match map.get(&key) {
                Some(entry) => entry.rx.clone(),
                None => {
                    let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
                    let (tx, rx) = watch::channel(None);
                    map.insert(key.clone(), Entry { id, rx: rx.clone() });
                    let token = CancellationToken::new();
                    let kept = Arc::new(AtomicBool::new(false));
                    let attempt = start(Attempt { token: token.clone(), kept: kept.clone() });
                    let inner = self.inner.clone();
                    let deadline = clock.now() + options.leader_deadline;
                    let give_up = deadline + options.grace;
                    tokio::spawn(async move {
                        let remove = RemoveOnDrop { inner: &inner, key, id };
                        let mut attempt = std::pin::pin!(attempt);
                        let result = tokio::select! {
                            v = &mut attempt => Ok(v),
                            () = inner.clock.sleep_until(deadline) => {
                                token.cancel();
                                tokio::select! {
                                    v = &mut attempt => Ok(v),
                                    () = inner.clock.sleep_until(give_up) => {
                                        if kept.load(Ordering::SeqCst) {
                                            // Past the point of no return: let it finish.
                                            Ok(attempt.await)
                                        } else {
                                            Err(SingleFlightError::Abandoned)
                                        }
                                    }
                                }
                            }
                        };
                        // Settled: out of the map before the result is published, so a caller
                        // that calls again as soon as it has the result starts a new attempt
                        // instead of joining this one (nothing is cached).
                        drop(remove);
                        tx.send_replace(Some(result));
                    });
                    rx
                }
            }
        };
        let wait = rx.wait_for(Option::is_some);
        let outcome = match caller_deadline {
            None => wait.await.map(|v| v.clone()),
            Some(at) => tokio::select! {
                outcome = wait => outcome.map(|v| v.clone()),
                () = clock.sleep_until(at) => return Err(SingleFlightError::CallerDeadline),
            },
        };
        match outcome {
            Ok(Some(result)) => result,
            // The attempt's task ended without a value: it panicked.
            Ok(None) | Err(_) => Err(SingleFlightError::Panicked),
        }
    }
}

struct RemoveOnDrop<'a, K: Hash + Eq, V> {
    inner: &'a Inner<K, V>,
    key: K,
    id: u64,
}

impl<K: Hash + Eq, V> Drop for RemoveOnDrop<'_, K, V> {
    fn drop(&mut self) {
        let mut map = self.inner.map.lock().unwrap_or_else(PoisonError::into_inner);
        if map.get(&self.key).is_some_and(|e| e.id == self.id) {
            map.remove(&self.key);
        }
    }
}
