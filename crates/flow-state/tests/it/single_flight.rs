//! The process-local single-flight: scenarios 19 to 24 of §5.1 of the behaviour reference.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use flow_state::{CallOptions, CancellationToken, ManualClock, SingleFlight, SingleFlightError};
use tokio::sync::{Notify, watch};

use crate::harness::{settle, within};

type Refreshes = SingleFlight<&'static str, u32>;

/// The seed's budget: a refresh gets 2 s (a share of a 5 s connect timeout), then 1 s of grace.
fn options() -> CallOptions {
    CallOptions::new(Duration::from_millis(2_000))
        .grace(Duration::from_millis(1_000))
        .caller_deadline(Duration::from_millis(2_000))
}

/// A refresh that waits until [`Refresher::release`] (a level, not an edge: a release before the
/// refresh starts waiting is not lost, as `Notify::notify_waiters` would lose it).
struct Refresher {
    calls: AtomicUsize,
    /// Refreshes waiting for the release right now.
    waiting: AtomicUsize,
    release: watch::Sender<bool>,
    tokens: std::sync::Mutex<Vec<CancellationToken>>,
}

impl Refresher {
    fn new() -> Arc<Self> {
        Arc::new(Refresher {
            calls: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            release: watch::Sender::new(false),
            tokens: Default::default(),
        })
    }

    fn release(&self) {
        self.release.send_replace(true);
    }

    fn start(
        self: &Arc<Self>,
        hang_forever: bool,
    ) -> impl FnOnce(CancellationToken) -> futures_like::Fut {
        let this = self.clone();
        move |token| {
            this.calls.fetch_add(1, Ordering::SeqCst);
            this.tokens.lock().unwrap().push(token);
            let this = this.clone();
            let mut released = this.release.subscribe();
            Box::pin(async move {
                if hang_forever {
                    std::future::pending::<()>().await;
                }
                this.waiting.fetch_add(1, Ordering::SeqCst);
                let _ = released.wait_for(|r| *r).await;
                this.waiting.fetch_sub(1, Ordering::SeqCst);
                7
            })
        }
    }

    fn token(&self, i: usize) -> CancellationToken {
        self.tokens.lock().unwrap()[i].clone()
    }
}

/// Lets spawned tasks run (yields only, no real time) until `done` holds.
async fn until(what: &str, done: impl Fn() -> bool) {
    for _ in 0..100_000 {
        if done() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("never happened: {what}");
}

mod futures_like {
    pub(crate) type Fut = std::pin::Pin<Box<dyn std::future::Future<Output = u32> + Send>>;
}

/// A 60 s attempt whose callers also give up after 60 s (so each holds a sleep on the clock).
fn caller_with_deadline() -> CallOptions {
    CallOptions::new(Duration::from_secs(60)).caller_deadline(Duration::from_secs(60))
}

/// 19: two concurrent calls while the refresh waits to be released: one refresh, both get it.
#[tokio::test]
async fn concurrent_calls_share_one_attempt() {
    let clock = ManualClock::default();
    let sf: Refreshes = SingleFlight::new(clock.shared());
    let r = Refresher::new();
    let a = tokio::spawn({
        let (sf, r) = (sf.clone(), r.clone());
        async move { sf.call("t:u:s", caller_with_deadline(), r.start(false)).await }
    });
    let b = tokio::spawn({
        let (sf, r) = (sf.clone(), r.clone());
        async move { sf.call("t:u:s", caller_with_deadline(), r.start(false)).await }
    });
    // Both callers are in: the one attempt waits for its release and holds a deadline sleep on
    // the clock, and each caller holds a sleep on the clock for its own deadline.
    until("the attempt to wait", || r.waiting.load(Ordering::SeqCst) == 1).await;
    until("both callers to wait", || clock.sleepers() >= 3).await;
    r.release();
    assert_eq!(within(a).await.unwrap(), Ok(7));
    assert_eq!(within(b).await.unwrap(), Ok(7));
    assert_eq!(r.calls.load(Ordering::SeqCst), 1);
    assert_eq!(sf.in_flight(), 0, "nothing is cached after it settles");
}

/// After an attempt settles, the next call starts a fresh one (no cached result).
#[tokio::test]
async fn a_settled_attempt_is_not_reused() {
    let sf: Refreshes = SingleFlight::new(ManualClock::default().shared());
    let n = Arc::new(AtomicUsize::new(0));
    for expected in 1..=3u32 {
        let n = n.clone();
        let got = sf
            .call("k", CallOptions::new(Duration::from_secs(1)), move |_| async move {
                n.fetch_add(1, Ordering::SeqCst) as u32 + 1
            })
            .await;
        assert_eq!(got, Ok(expected));
    }
}

/// Race: the attempt's task published its result before removing its entry, so a caller woken
/// by the result on another worker thread that called again at once could join the settled
/// attempt and get its old result (token-storage's Redis restart test saw a force-refresh
/// answered with the set it had just rejected). The entry is removed before the result is
/// sent. Two thousand back-to-back pairs on two worker threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_made_right_after_a_result_starts_a_new_attempt() {
    let sf: Refreshes = SingleFlight::new(ManualClock::default().shared());
    let n = Arc::new(AtomicUsize::new(0));
    let call = || {
        let n = n.clone();
        sf.call("k", CallOptions::new(Duration::from_secs(1)), move |_| async move {
            n.fetch_add(1, Ordering::SeqCst) as u32 + 1
        })
    };
    for round in 0..2000 {
        let first = call().await.unwrap();
        let second = call().await.unwrap();
        assert_eq!(second, first + 1, "round {round}: the second call got the settled result");
    }
}

/// 20, 21: a refresh that does not resolve in its budget: at the deadline the caller is released
/// and the attempt's signal is cancelled, but the entry stays for the grace period so a second
/// caller joins it; once released, the entry is gone.
#[tokio::test]
async fn a_slow_attempt_is_signalled_and_joinable_until_released() {
    let clock = ManualClock::default();
    let sf: Refreshes = SingleFlight::new(clock.shared());
    let r = Refresher::new();
    let first = tokio::spawn({
        let (sf, r) = (sf.clone(), r.clone());
        async move { sf.call("k", options(), r.start(false)).await }
    });
    until("the attempt to wait", || r.waiting.load(Ordering::SeqCst) == 1).await;
    until("the caller's and the attempt's deadlines", || clock.sleepers() == 2).await;
    clock.advance(Duration::from_millis(1_999));
    settle().await;
    assert!(!r.token(0).is_cancelled(), "24: not aborted before the budget");
    assert!(!first.is_finished());
    clock.advance(Duration::from_millis(2));
    assert_eq!(within(first).await.unwrap(), Err(SingleFlightError::CallerDeadline));
    settle().await;
    assert!(r.token(0).is_cancelled(), "the refresh signal is aborted at the budget");
    assert_eq!(sf.in_flight(), 1);
    let sleepers = clock.sleepers();
    let second = tokio::spawn({
        let (sf, r) = (sf.clone(), r.clone());
        async move { sf.call("k", caller_with_deadline(), r.start(false)).await }
    });
    until("the second caller to wait", || clock.sleepers() > sleepers).await;
    assert_eq!(r.calls.load(Ordering::SeqCst), 1, "the second call joined");
    r.release();
    assert_eq!(within(second).await.unwrap(), Ok(7));
    assert_eq!(sf.in_flight(), 0);
}

/// 22: a refresh that hangs for ever is dropped after its deadline plus grace, and the next call
/// starts a second attempt with a new signal.
#[tokio::test]
async fn a_hung_attempt_is_dropped_after_its_grace() {
    let clock = ManualClock::default();
    let sf: Refreshes = SingleFlight::new(clock.shared());
    let r = Refresher::new();
    let first = tokio::spawn({
        let (sf, r) = (sf.clone(), r.clone());
        async move { sf.call("k", options(), r.start(true)).await }
    });
    settle().await;
    clock.advance(Duration::from_millis(2_001));
    assert_eq!(within(first).await.unwrap(), Err(SingleFlightError::CallerDeadline));
    settle().await;
    assert_eq!(sf.in_flight(), 1);
    assert!(r.token(0).is_cancelled());
    clock.advance(Duration::from_millis(1_000));
    settle().await;
    assert_eq!(sf.in_flight(), 0, "dropped after deadline + grace");
    let second = tokio::spawn({
        let (sf, r) = (sf.clone(), r.clone());
        async move { sf.call("k", options(), r.start(false)).await }
    });
    settle().await;
    assert_eq!(r.calls.load(Ordering::SeqCst), 2, "a second attempt");
    assert!(!r.token(1).is_cancelled(), "with a new signal");
    r.release();
    assert_eq!(within(second).await.unwrap(), Ok(7));
}

/// A caller without its own deadline that joined a hung attempt is told it was abandoned.
#[tokio::test]
async fn joiners_of_an_abandoned_attempt_are_told() {
    let clock = ManualClock::default();
    let sf: Refreshes = SingleFlight::new(clock.shared());
    let r = Refresher::new();
    let opts = CallOptions::new(Duration::from_secs(2)).grace(Duration::from_secs(1));
    let caller = tokio::spawn({
        let (sf, r) = (sf.clone(), r.clone());
        async move { sf.call("k", opts, r.start(true)).await }
    });
    settle().await;
    clock.advance(Duration::from_secs(3));
    assert_eq!(within(caller).await.unwrap(), Err(SingleFlightError::Abandoned));
}

/// Per-key: two tenants' keys never join each other's attempt (scenario 33).
#[tokio::test]
async fn different_keys_never_share_an_attempt() {
    let sf: SingleFlight<String, String> = SingleFlight::new(ManualClock::default().shared());
    let opts = CallOptions::new(Duration::from_secs(5));
    let (a, b) = tokio::join!(
        sf.call("tenant-a:user:srv".into(), opts, |_| async {
            mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(10)).await;
            "a".to_string()
        }),
        sf.call("tenant-b:user:srv".into(), opts, |_| async { "b".to_string() }),
    );
    assert_eq!((a.unwrap(), b.unwrap()), ("a".to_string(), "b".to_string()));
}

/// A panicking attempt releases its key and tells its callers.
#[tokio::test]
async fn a_panicking_attempt_releases_the_key() {
    let sf: Refreshes = SingleFlight::new(ManualClock::default().shared());
    let got =
        sf.call("k", CallOptions::new(Duration::from_secs(5)), |_| async { panic!("bug") }).await;
    assert_eq!(got, Err(SingleFlightError::Panicked));
    assert_eq!(sf.in_flight(), 0);
    assert_eq!(
        sf.call("k", CallOptions::new(Duration::from_secs(5)), |_| async { 1 }).await,
        Ok(1)
    );
}

/// Race: an attempt that has sent a request the server acts on (a rotating refresh) is past its
/// deadline and grace before the answer comes. Were it dropped there, the key would be free and
/// the next call would start a second attempt that repeats the side effect; an attempt that
/// called [`flow_state::Attempt::keep`] is not dropped: the next call joins it and gets its
/// value, and only one attempt ever runs.
#[tokio::test]
async fn a_kept_attempt_is_not_dropped_after_its_grace() {
    let clock = ManualClock::default();
    let sf: Refreshes = SingleFlight::new(clock.shared());
    let starts = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(Notify::new());
    let opts = CallOptions::new(Duration::from_secs(2)).grace(Duration::from_secs(1));
    let start = |starts: Arc<AtomicUsize>, release: Arc<Notify>| {
        move |attempt: flow_state::Attempt| {
            starts.fetch_add(1, Ordering::SeqCst);
            async move {
                attempt.keep();
                release.notified().await;
                7
            }
        }
    };
    let first = tokio::spawn({
        let (sf, s, r) = (sf.clone(), starts.clone(), release.clone());
        async move { sf.call_with("k", opts, start(s, r)).await }
    });
    settle().await;
    clock.advance(Duration::from_secs(10));
    settle().await;
    assert_eq!(sf.in_flight(), 1, "a kept attempt stays past deadline + grace");
    let second = tokio::spawn({
        let (sf, s, r) = (sf.clone(), starts.clone(), release.clone());
        async move { sf.call_with("k", opts, start(s, r)).await }
    });
    settle().await;
    assert_eq!(starts.load(Ordering::SeqCst), 1, "the next call joins the kept attempt");
    release.notify_one();
    assert_eq!(within(first).await.unwrap(), Ok(7));
    assert_eq!(within(second).await.unwrap(), Ok(7));
}
