//! A process-local single-flight that caches nothing (the seed's in-flight refresh map): the
//! workspace's one mechanism for "one at a time per key, the others join". [`SingleFlight::call`]
//! runs the attempt detached, with deadlines; [`SingleFlight::lead`] is the guard style, for a
//! leader that runs the work itself ([`crate::FlowManager::run`]'s driver) or only marks who
//! leads (connection-factory's silent refresh).

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use mcp_clock::{Clock, SharedClock, Timestamp};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Why a [`SingleFlight::call`] returned without a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SingleFlightError {
    /// This caller's own deadline passed; the attempt goes on for the others.
    #[error("gave up waiting for the in-flight attempt (caller deadline)")]
    CallerDeadline,
    /// The attempt was dropped without a value: it ran past its deadline and grace period, or
    /// its [`Leader`] was dropped without finishing.
    #[error("the in-flight attempt was dropped without a value")]
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

type Outcome<V> = Option<Result<V, SingleFlightError>>;

struct Entry<V> {
    id: u64,
    rx: watch::Receiver<Outcome<V>>,
    deadline: Option<Timestamp>,
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
        let now = clock.now();
        let caller_deadline = options.caller_deadline.map(|d| now + d);
        let deadline = now + options.leader_deadline;
        let follower = match self.lead(key, Some(deadline)) {
            Flight::Follow(follower) => follower,
            Flight::Lead(leader) => {
                let follower = leader.follower();
                let token = CancellationToken::new();
                let kept = Arc::new(AtomicBool::new(false));
                let attempt = start(Attempt { token: token.clone(), kept: kept.clone() });
                let clock = clock.clone();
                let give_up = deadline + options.grace;
                tokio::spawn(async move {
                    let mut attempt = std::pin::pin!(attempt);
                    let value = tokio::select! {
                        v = &mut attempt => Some(v),
                        () = clock.sleep_until(deadline) => {
                            token.cancel();
                            tokio::select! {
                                v = &mut attempt => Some(v),
                                () = clock.sleep_until(give_up) => {
                                    if kept.load(Ordering::SeqCst) {
                                        // Past the point of no return: let it finish.
                                        Some(attempt.await)
                                    } else {
                                        None
                                    }
                                }
                            }
                        }
                    };
                    match value {
                        Some(value) => leader.finish(value),
                        // Dropped: its followers are told it was abandoned.
                        None => drop(leader),
                    }
                });
                follower
            }
        };
        follower.wait_until(caller_deadline).await
    }

    /// Lead the flight for `key`, or follow the one in flight: the guard style of
    /// [`SingleFlight::call`], for a leader that does the work itself (or decides not to).
    ///
    /// `deadline` is when the leader means to stop; followers read it with
    /// [`Follower::deadline`] (a flight started by [`SingleFlight::call`] has its attempt's
    /// deadline). The flight ends when its [`Leader`] finishes or is dropped: the key leaves the
    /// map first, then the outcome is published, so a caller that has seen the outcome and
    /// calls again starts a new flight.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use flow_state::{Flight, SingleFlight, SharedClock};
    ///
    /// let checks: SingleFlight<&str, bool> = SingleFlight::new(SharedClock::system());
    /// let Flight::Lead(leader) = checks.lead("acme:alice:github", None) else { unreachable!() };
    /// let Flight::Follow(follower) = checks.lead("acme:alice:github", None) else { unreachable!() };
    /// leader.finish(true);
    /// assert_eq!(follower.wait().await, Ok(true));
    /// assert!(matches!(checks.lead("acme:alice:github", None), Flight::Lead(_)));
    /// # }
    /// ```
    pub fn lead(&self, key: K, deadline: Option<Timestamp>) -> Flight<K, V> {
        let mut map = self.inner.map.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = map.get(&key) {
            return Flight::Follow(Follower {
                rx: entry.rx.clone(),
                deadline: entry.deadline,
                clock: self.inner.clock.clone(),
            });
        }
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(None);
        map.insert(key.clone(), Entry { id, rx, deadline });
        Flight::Lead(Leader { inner: self.inner.clone(), key, id, tx: Some(tx), deadline })
    }
}

/// What [`SingleFlight::lead`] found for a key.
pub enum Flight<K: Hash + Eq, V> {
    /// Nothing was in flight: this caller leads a new flight.
    Lead(Leader<K, V>),
    /// Another caller leads the flight in flight.
    Follow(Follower<V>),
}

impl<K: Hash + Eq, V> fmt::Debug for Flight<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Flight::Lead(leader) => f.debug_tuple("Lead").field(leader).finish(),
            Flight::Follow(follower) => f.debug_tuple("Follow").field(follower).finish(),
        }
    }
}

/// The lead of one flight of a [`SingleFlight`]. [`Leader::finish`] gives its followers the
/// value; dropping it without finishing tells them [`SingleFlightError::Abandoned`]
/// ([`SingleFlightError::Panicked`] when dropped by a panic). Either way the key leaves the map
/// before the outcome is published.
pub struct Leader<K: Hash + Eq, V> {
    inner: Arc<Inner<K, V>>,
    key: K,
    id: u64,
    /// Taken when the outcome is published.
    tx: Option<watch::Sender<Outcome<V>>>,
    deadline: Option<Timestamp>,
}

impl<K: Hash + Eq, V> fmt::Debug for Leader<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Leader").field("deadline", &self.deadline).finish_non_exhaustive()
    }
}

impl<K: Hash + Eq, V> Leader<K, V> {
    /// The deadline this flight was led with.
    pub fn deadline(&self) -> Option<Timestamp> {
        self.deadline
    }

    /// A follower of this very flight, for a leader that hands the work to another task and
    /// waits like its followers.
    pub fn follower(&self) -> Follower<V> {
        let tx = self.tx.as_ref().expect("a leader publishes only when it ends");
        Follower { rx: tx.subscribe(), deadline: self.deadline, clock: self.inner.clock.clone() }
    }

    /// End the flight with `value`: the key leaves the map, then every follower gets `value`.
    pub fn finish(mut self, value: V) {
        self.settle(Ok(value));
    }

    fn settle(&mut self, outcome: Result<V, SingleFlightError>) {
        let Some(tx) = self.tx.take() else { return };
        // Out of the map before the outcome is published, so a caller that calls again as soon
        // as it has the outcome starts a new flight instead of joining this one (nothing is
        // cached).
        {
            let mut map = self.inner.map.lock().unwrap_or_else(PoisonError::into_inner);
            if map.get(&self.key).is_some_and(|e| e.id == self.id) {
                map.remove(&self.key);
            }
        }
        tx.send_replace(Some(outcome));
    }
}

impl<K: Hash + Eq, V> Drop for Leader<K, V> {
    fn drop(&mut self) {
        let error = if std::thread::panicking() {
            SingleFlightError::Panicked
        } else {
            SingleFlightError::Abandoned
        };
        self.settle(Err(error));
    }
}

/// A caller that joined a flight another leads: it waits for the leader's outcome.
/// Dropping it changes nothing for the flight.
pub struct Follower<V> {
    rx: watch::Receiver<Outcome<V>>,
    deadline: Option<Timestamp>,
    clock: SharedClock,
}

impl<V> fmt::Debug for Follower<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Follower").field("deadline", &self.deadline).finish_non_exhaustive()
    }
}

impl<V: Clone> Follower<V> {
    /// The deadline the flight was led with.
    pub fn deadline(&self) -> Option<Timestamp> {
        self.deadline
    }

    /// Wait for the flight's outcome.
    pub async fn wait(self) -> Result<V, SingleFlightError> {
        self.wait_until(None).await
    }

    /// Wait for the flight's outcome until `at` (on the single-flight's clock), then give up
    /// with [`SingleFlightError::CallerDeadline`]; the flight goes on.
    pub async fn wait_until(mut self, at: Option<Timestamp>) -> Result<V, SingleFlightError> {
        let wait = self.rx.wait_for(Option::is_some);
        let outcome = match at {
            None => wait.await.map(|v| v.clone()),
            Some(at) => tokio::select! {
                outcome = wait => outcome.map(|v| v.clone()),
                () = self.clock.sleep_until(at) => return Err(SingleFlightError::CallerDeadline),
            },
        };
        match outcome {
            Ok(Some(result)) => result,
            // The leader ended without publishing (its task was stopped by a panic).
            Ok(None) | Err(_) => Err(SingleFlightError::Panicked),
        }
    }
}
