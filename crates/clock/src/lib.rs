//! The one module in this workspace that reads time.
//!
//! Everything that expires, times out or is stamped with a date reads a [`Clock`]: the
//! [`SystemClock`] in production, and a [`ManualClock`] (feature `test-util`) in tests, which
//! moves only when the test calls [`ManualClock::advance`]. A clippy lint (`clippy.toml` at the
//! workspace root) refuses direct reads of `Instant::now` and `SystemTime::now` everywhere else.
//!
//! Time is wall-clock milliseconds since the Unix epoch ([`Timestamp`]), because records outlive
//! the process that wrote them (sled on disk, Redis across replicas) and must be compared by
//! other processes.
//!
//! ```
//! use mcp_clock::{Clock, SharedClock, SystemClock};
//! use std::time::Duration;
//!
//! let clock = SharedClock::new(SystemClock);
//! let now = clock.now();
//! assert!(now + Duration::from_secs(1) > now);
//! ```

use std::fmt;
use std::future::Future;
use std::ops::{Add, Sub};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// A boxed, sendable future; the return type of [`Clock::sleep_until`].
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A point in wall-clock time: milliseconds since the Unix epoch.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The Unix epoch.
    pub const EPOCH: Timestamp = Timestamp(0);
    /// The largest representable time; "never".
    pub const MAX: Timestamp = Timestamp(u64::MAX);

    /// A timestamp from milliseconds since the Unix epoch.
    pub const fn from_millis(millis: u64) -> Self {
        Timestamp(millis)
    }

    /// A timestamp from whole seconds since the Unix epoch (saturating).
    pub const fn from_secs(secs: u64) -> Self {
        Timestamp(secs.saturating_mul(1000))
    }

    /// Milliseconds since the Unix epoch.
    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// Whole seconds since the Unix epoch.
    pub const fn as_secs(self) -> u64 {
        self.0 / 1000
    }

    /// The time from `earlier` to `self`, or zero when `earlier` is later.
    pub fn saturating_since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }

    /// `self + d`, saturating at [`Timestamp::MAX`].
    pub fn saturating_add(self, d: Duration) -> Timestamp {
        Timestamp(self.0.saturating_add(duration_millis(d)))
    }

    /// `self - d`, saturating at the epoch.
    pub fn saturating_sub(self, d: Duration) -> Timestamp {
        Timestamp(self.0.saturating_sub(duration_millis(d)))
    }
}

fn duration_millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Add<Duration> for Timestamp {
    type Output = Timestamp;
    fn add(self, rhs: Duration) -> Timestamp {
        self.saturating_add(rhs)
    }
}

impl Sub<Duration> for Timestamp {
    type Output = Timestamp;
    fn sub(self, rhs: Duration) -> Timestamp {
        self.saturating_sub(rhs)
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Timestamp({}ms)", self.0)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:03}s", self.0 / 1000, self.0 % 1000)
    }
}

/// A source of time and of timers.
///
/// Implementations must be cheap to call: [`Clock::now`] sits on hot paths.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// The current wall-clock time.
    fn now(&self) -> Timestamp;

    /// A future that completes once [`Clock::now`] has reached `deadline`.
    fn sleep_until(&self, deadline: Timestamp) -> BoxFuture<'static, ()>;

    /// A future that completes after `duration` has passed on this clock.
    fn sleep(&self, duration: Duration) -> BoxFuture<'static, ()> {
        self.sleep_until(self.now() + duration)
    }

    /// Which time source this is, when the clock can tell: two clocks with the same identity
    /// always agree (every [`SystemClock`]; the clones of one `ManualClock`), two with different
    /// ones may not. `None` (the default): unknown. See [`SharedClock::same_source`].
    fn identity(&self) -> Option<usize> {
        None
    }
}

/// `work`, unless `clock` says `after` has passed first (`None`): the one timeout of this
/// workspace, on the injected clock, so a test moves a manual clock instead of waiting.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use mcp_clock::{SharedClock, within};
/// use std::time::Duration;
///
/// let clock = SharedClock::system();
/// assert_eq!(within(&clock, Duration::from_secs(5), async { 7 }).await, Some(7));
/// assert_eq!(within(&clock, Duration::ZERO, std::future::pending::<()>()).await, None);
/// # }
/// ```
pub async fn within<C: Clock + ?Sized, T>(
    clock: &C,
    after: Duration,
    work: impl Future<Output = T>,
) -> Option<T> {
    let mut work = std::pin::pin!(work);
    let mut timer = clock.sleep(after);
    std::future::poll_fn(|cx| {
        if let std::task::Poll::Ready(out) = work.as_mut().poll(cx) {
            return std::task::Poll::Ready(Some(out));
        }
        timer.as_mut().poll(cx).map(|()| None)
    })
    .await
}

/// The operating system's clock, with tokio timers.
///
/// Sleeping needs a tokio runtime with the time driver enabled.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl SystemClock {
    /// A monotonic instant, for measuring elapsed time in benchmarks and tools.
    ///
    /// Not for expiry logic: that uses [`Clock::now`] so tests can drive it.
    #[allow(clippy::disallowed_methods)] // This is the clock module.
    pub fn instant() -> std::time::Instant {
        std::time::Instant::now()
    }
}

impl Clock for SystemClock {
    #[allow(clippy::disallowed_methods)] // This is the clock module.
    fn now(&self) -> Timestamp {
        let since = std::time::SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        Timestamp(duration_millis(since))
    }

    #[allow(clippy::disallowed_methods)] // This is the clock module.
    fn sleep_until(&self, deadline: Timestamp) -> BoxFuture<'static, ()> {
        let wait = deadline.saturating_since(self.now());
        Box::pin(tokio::time::sleep(wait))
    }

    fn identity(&self) -> Option<usize> {
        // Every system clock reads the one system time.
        Some(0)
    }
}

/// A cloneable, shareable [`Clock`]: `Arc<dyn Clock>` with a name.
#[derive(Clone, Debug)]
pub struct SharedClock(Arc<dyn Clock>);

impl SharedClock {
    /// Share `clock`.
    pub fn new(clock: impl Clock) -> Self {
        SharedClock(Arc::new(clock))
    }

    /// The system clock.
    pub fn system() -> Self {
        SharedClock::new(SystemClock)
    }

    /// Whether `self` and `other` are known to read one time source (see [`Clock::identity`]):
    /// `Some(false)` when they surely do not (a manual clock and the system clock, two manual
    /// clocks), `None` when a clock cannot tell.
    ///
    /// ```
    /// use mcp_clock::SharedClock;
    /// assert_eq!(SharedClock::system().same_source(&SharedClock::system()), Some(true));
    /// ```
    pub fn same_source(&self, other: &SharedClock) -> Option<bool> {
        Some(self.identity()? == other.identity()?)
    }
}

impl Default for SharedClock {
    fn default() -> Self {
        SharedClock::system()
    }
}

impl Clock for SharedClock {
    fn now(&self) -> Timestamp {
        self.0.now()
    }
    fn sleep_until(&self, deadline: Timestamp) -> BoxFuture<'static, ()> {
        self.0.sleep_until(deadline)
    }
    fn identity(&self) -> Option<usize> {
        self.0.identity()
    }
}

/// A random duration between zero and `max`, both included (uniform, to the microsecond).
///
/// ```
/// use std::time::Duration;
/// let d = mcp_clock::jitter(Duration::from_millis(10));
/// assert!(d <= Duration::from_millis(10));
/// assert_eq!(mcp_clock::jitter(Duration::ZERO), Duration::ZERO);
/// ```
pub fn jitter(max: Duration) -> Duration {
    let spread = u64::try_from(max.as_micros()).unwrap_or(u64::MAX);
    if spread == 0 {
        return Duration::ZERO;
    }
    // Without an entropy source the delay is the least one: no jitter, never a panic.
    let draw = getrandom::u64().unwrap_or(0) % spread.saturating_add(1);
    Duration::from_micros(draw)
}

/// "Equal jitter" for a backoff step: between half of `step` and all of it, so retries spread
/// out without ever coming sooner than half the step.
///
/// ```
/// use std::time::Duration;
/// let step = Duration::from_secs(2);
/// let d = mcp_clock::equal_jitter(step);
/// assert!(d >= step / 2 && d <= step);
/// ```
pub fn equal_jitter(step: Duration) -> Duration {
    let half = step / 2;
    half + jitter(step - half)
}

#[cfg(feature = "test-util")]
pub use manual::ManualClock;

#[cfg(feature = "test-util")]
pub mod testing;

#[cfg(feature = "test-util")]
mod manual {
    use super::{BoxFuture, Clock, SharedClock, Timestamp};
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::sync::watch;

    /// A clock that moves only when told to. Sleepers wake when [`ManualClock::advance`] or
    /// [`ManualClock::set`] moves time past their deadline.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use mcp_clock::{Clock, ManualClock, Timestamp};
    /// use std::time::Duration;
    ///
    /// let clock = ManualClock::new(Timestamp::from_secs(1_000));
    /// let sleeper = tokio::spawn(clock.sleep(Duration::from_secs(5)));
    /// clock.advance(Duration::from_secs(5));
    /// sleeper.await.unwrap();
    /// assert_eq!(clock.now(), Timestamp::from_secs(1_005));
    /// # }
    /// ```
    #[derive(Clone, Debug)]
    pub struct ManualClock {
        now: Arc<watch::Sender<Timestamp>>,
    }

    impl ManualClock {
        /// A manual clock showing `start`.
        pub fn new(start: Timestamp) -> Self {
            ManualClock { now: Arc::new(watch::Sender::new(start)) }
        }

        /// Move time forward by `by`, waking every sleeper whose deadline has come.
        pub fn advance(&self, by: Duration) {
            self.now.send_modify(|now| *now = *now + by);
        }

        /// Set the time to `to` (which may go backwards, to model a clock step).
        pub fn set(&self, to: Timestamp) {
            self.now.send_replace(to);
        }

        /// This clock as a [`SharedClock`].
        pub fn shared(&self) -> SharedClock {
            SharedClock::new(self.clone())
        }

        /// How many sleeps on this clock are pending: futures made by [`Clock::sleep`] or
        /// [`Clock::sleep_until`] (through any clone) and not yet dropped. A test waits for this
        /// to grow before it advances the clock, so the sleeper it means to wake has already
        /// taken its deadline from the time before the advance.
        ///
        /// ```
        /// # #[tokio::main(flavor = "current_thread")] async fn main() {
        /// use mcp_clock::{Clock, ManualClock};
        /// use std::time::Duration;
        ///
        /// let clock = ManualClock::default();
        /// let sleep = clock.sleep(Duration::from_secs(1));
        /// assert_eq!(clock.sleepers(), 1);
        /// drop(sleep);
        /// assert_eq!(clock.sleepers(), 0);
        /// # }
        /// ```
        pub fn sleepers(&self) -> usize {
            self.now.receiver_count()
        }
    }

    impl Default for ManualClock {
        fn default() -> Self {
            // An arbitrary, realistic start: 2026-01-01T00:00:00Z.
            ManualClock::new(Timestamp::from_secs(1_767_225_600))
        }
    }

    impl Clock for ManualClock {
        fn now(&self) -> Timestamp {
            *self.now.borrow()
        }

        fn sleep_until(&self, deadline: Timestamp) -> BoxFuture<'static, ()> {
            let mut rx = self.now.subscribe();
            Box::pin(async move {
                // `wait_for` checks the current value first, so an advance that happened before
                // the first poll is never missed. The sender lives as long as any clone of the
                // clock; if every clone is gone, time can no longer move and we sleep for ever.
                if rx.wait_for(|now| *now >= deadline).await.is_err() {
                    std::future::pending::<()>().await;
                }
            })
        }

        fn identity(&self) -> Option<usize> {
            // The clones of one manual clock share its time; never 0 (the system clock's).
            Some(Arc::as_ptr(&self.now) as usize)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_arithmetic_saturates() {
        assert_eq!(Timestamp::MAX + Duration::from_secs(1), Timestamp::MAX);
        assert_eq!(Timestamp::EPOCH - Duration::from_secs(1), Timestamp::EPOCH);
        assert_eq!(
            Timestamp::from_secs(2).saturating_since(Timestamp::from_secs(5)),
            Duration::ZERO
        );
        assert_eq!(
            Timestamp::from_secs(5).saturating_since(Timestamp::from_secs(2)),
            Duration::from_secs(3)
        );
    }

    #[test]
    fn system_clock_is_after_2020() {
        assert!(SystemClock.now() > Timestamp::from_secs(1_577_836_800));
    }

    #[cfg(feature = "test-util")]
    #[tokio::test(flavor = "current_thread")]
    async fn manual_clock_wakes_only_past_the_deadline() {
        let clock = ManualClock::new(Timestamp::from_secs(100));
        let mut sleeper = tokio::spawn(clock.sleep(Duration::from_secs(10)));
        clock.advance(Duration::from_secs(9));
        tokio::task::yield_now().await;
        // Real time: the manual clock has not reached the deadline, however long we wait.
        #[allow(clippy::disallowed_methods)] // This is the clock module.
        let woke = tokio::time::timeout(Duration::from_millis(20), &mut sleeper).await;
        assert!(woke.is_err());
        clock.advance(Duration::from_secs(1));
        sleeper.await.unwrap();
    }

    #[cfg(feature = "test-util")]
    #[test]
    fn clocks_know_whether_they_read_one_time_source() {
        let manual = ManualClock::new(Timestamp::from_secs(100));
        let system = SharedClock::system();
        assert_eq!(manual.shared().same_source(&manual.clone().shared()), Some(true));
        assert_eq!(manual.shared().same_source(&system), Some(false));
        let other = ManualClock::new(Timestamp::from_secs(100));
        assert_eq!(manual.shared().same_source(&other.shared()), Some(false));
        #[derive(Debug)]
        struct Opaque;
        impl Clock for Opaque {
            fn now(&self) -> Timestamp {
                Timestamp::EPOCH
            }
            fn sleep_until(&self, _: Timestamp) -> BoxFuture<'static, ()> {
                Box::pin(std::future::pending())
            }
        }
        assert_eq!(SharedClock::new(Opaque).same_source(&system), None);
    }
}
