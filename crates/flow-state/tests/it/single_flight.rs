//! The process-local single-flight: scenarios 19 to 24 of §5.1 of the behaviour reference.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use flow_state::{
    CallOptions, CancellationToken, Clock as _, Flight, ManualClock, SingleFlight,
    SingleFlightError,
};
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

/// Lets spawned tasks run (yields only, no real time) until a condition holds.
use mcp_clock::testing::settled as until;

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

// The guard style ([`SingleFlight::lead`]), which `FlowManager::run`'s driver and
// connection-factory's silent refresh use, and what both styles share: panics, cancellation of
// the leader and of followers, and the order of removal and publication.

type Flights = SingleFlight<&'static str, u32>;

fn lead(sf: &Flights, key: &'static str) -> flow_state::Leader<&'static str, u32> {
    match sf.lead(key, None) {
        Flight::Lead(leader) => leader,
        Flight::Follow(_) => panic!("{key}: expected to lead, found a flight in progress"),
    }
}

fn follow(sf: &Flights, key: &'static str) -> flow_state::Follower<u32> {
    match sf.lead(key, None) {
        Flight::Follow(follower) => follower,
        Flight::Lead(_) => panic!("{key}: expected to follow, found nothing in flight"),
    }
}

/// One leader per key; every later caller follows and gets the leader's value; after it, the
/// key is free.
#[tokio::test]
async fn a_led_flight_gives_its_value_to_every_follower() {
    let sf: Flights = SingleFlight::new(ManualClock::default().shared());
    let leader = lead(&sf, "k");
    let followers: Vec<_> = (0..8).map(|_| tokio::spawn(follow(&sf, "k").wait())).collect();
    let own = tokio::spawn(leader.follower().wait());
    assert_eq!(sf.in_flight(), 1);
    leader.finish(7);
    for f in followers {
        assert_eq!(within(f).await.unwrap(), Ok(7));
    }
    assert_eq!(within(own).await.unwrap(), Ok(7), "the leader's own follower");
    assert_eq!(sf.in_flight(), 0);
    drop(lead(&sf, "k"));
}

/// A follower reads the deadline its flight was led with: a 401 that joins a refresh waits no
/// longer than the leader does (connection-factory's silent refresh).
#[tokio::test]
async fn a_follower_reads_the_deadline_of_the_flight() {
    let clock = ManualClock::default();
    let sf: Flights = SingleFlight::new(clock.shared());
    let at = clock.shared().now() + Duration::from_secs(3);
    let leader = match sf.lead("k", Some(at)) {
        Flight::Lead(leader) => leader,
        Flight::Follow(_) => panic!("nothing was in flight"),
    };
    assert_eq!(leader.deadline(), Some(at));
    assert_eq!(follow(&sf, "k").deadline(), Some(at));
    drop(leader);
    // A flight started by `call` has its attempt's deadline.
    let r = Refresher::new();
    let call = tokio::spawn({
        let (sf, r) = (sf.clone(), r.clone());
        async move { sf.call("k", options(), r.start(false)).await }
    });
    until("the attempt to wait", || r.waiting.load(Ordering::SeqCst) == 1).await;
    assert_eq!(follow(&sf, "k").deadline(), Some(clock.shared().now() + Duration::from_secs(2)));
    r.release();
    assert_eq!(within(call).await.unwrap(), Ok(7));
}

/// A leader whose task panics releases the key and tells its followers it panicked (not that
/// it was abandoned, and not a hang); the next caller leads a new flight.
#[tokio::test]
async fn a_leader_that_panics_tells_its_followers_and_frees_the_key() {
    let sf: Flights = SingleFlight::new(ManualClock::default().shared());
    let leader = lead(&sf, "k");
    let followers: Vec<_> = (0..4).map(|_| tokio::spawn(follow(&sf, "k").wait())).collect();
    let task = tokio::spawn(async move {
        let _leader = leader;
        tokio::task::yield_now().await;
        panic!("bug in the leader");
    });
    assert!(within(task).await.unwrap_err().is_panic());
    for f in followers {
        assert_eq!(within(f).await.unwrap(), Err(SingleFlightError::Panicked));
    }
    assert_eq!(sf.in_flight(), 0);
    lead(&sf, "k").finish(1);
}

/// Every caller of an attempt that panics (the one that started it and those that joined) is
/// told, and the key is free.
#[tokio::test]
async fn every_caller_of_a_panicking_attempt_is_told() {
    let sf: Refreshes = SingleFlight::new(ManualClock::default().shared());
    let release = Arc::new(Notify::new());
    let opts = CallOptions::new(Duration::from_secs(5));
    let callers: Vec<_> = (0..4)
        .map(|_| {
            let (sf, release) = (sf.clone(), release.clone());
            tokio::spawn(async move {
                sf.call("k", opts, move |_| async move {
                    release.notified().await;
                    panic!("bug in the attempt")
                })
                .await
            })
        })
        .collect();
    settle().await;
    assert_eq!(sf.in_flight(), 1, "the callers joined one attempt");
    release.notify_one();
    for c in callers {
        assert_eq!(within(c).await.unwrap(), Err(SingleFlightError::Panicked));
    }
    assert_eq!(sf.in_flight(), 0);
}

/// Cancelling the caller that started an attempt does not cancel the attempt: it runs on,
/// detached; a caller that joined it gets its value, and no second attempt starts meanwhile.
#[tokio::test]
async fn cancelling_the_caller_that_started_an_attempt_leaves_it_running() {
    let clock = ManualClock::default();
    let sf: Refreshes = SingleFlight::new(clock.shared());
    let r = Refresher::new();
    let first = tokio::spawn({
        let (sf, r) = (sf.clone(), r.clone());
        async move { sf.call("k", caller_with_deadline(), r.start(false)).await }
    });
    until("the attempt to wait", || r.waiting.load(Ordering::SeqCst) == 1).await;
    first.abort();
    assert!(within(first).await.unwrap_err().is_cancelled());
    settle().await;
    assert_eq!(sf.in_flight(), 1, "the attempt outlives the caller that started it");
    assert!(!r.token(0).is_cancelled(), "and is not told to stop");
    let second = tokio::spawn({
        let (sf, r) = (sf.clone(), r.clone());
        async move { sf.call("k", caller_with_deadline(), r.start(false)).await }
    });
    settle().await;
    assert_eq!(r.calls.load(Ordering::SeqCst), 1, "the next caller joined it");
    r.release();
    assert_eq!(within(second).await.unwrap(), Ok(7));
    assert_eq!(sf.in_flight(), 0);
}

/// A leader cancelled before it finishes (its task aborted, the guard dropped) frees the key and
/// tells its followers the flight was abandoned, so none waits for ever; the next caller leads.
#[tokio::test]
async fn cancelling_a_leader_frees_the_key_and_tells_its_followers() {
    let sf: Flights = SingleFlight::new(ManualClock::default().shared());
    let leader = lead(&sf, "k");
    let followers: Vec<_> = (0..4).map(|_| tokio::spawn(follow(&sf, "k").wait())).collect();
    let task = tokio::spawn(async move {
        std::future::pending::<()>().await;
        leader.finish(1);
    });
    settle().await;
    task.abort();
    assert!(within(task).await.unwrap_err().is_cancelled());
    for f in followers {
        assert_eq!(within(f).await.unwrap(), Err(SingleFlightError::Abandoned));
    }
    assert_eq!(sf.in_flight(), 0);
    lead(&sf, "k").finish(2);
}

/// Cancelled followers change nothing: the attempt runs once, and the callers still waiting
/// (and the leader's own caller) get its value.
#[tokio::test]
async fn cancelled_followers_leave_the_flight_alone() {
    let clock = ManualClock::default();
    let sf: Refreshes = SingleFlight::new(clock.shared());
    let r = Refresher::new();
    let callers: Vec<_> = (0..6)
        .map(|_| {
            let (sf, r) = (sf.clone(), r.clone());
            tokio::spawn(async move { sf.call("k", caller_with_deadline(), r.start(false)).await })
        })
        .collect();
    until("the attempt to wait", || r.waiting.load(Ordering::SeqCst) == 1).await;
    settle().await;
    for c in &callers[..3] {
        c.abort();
    }
    // Guard-style followers, one of them dropped.
    let kept = tokio::spawn(match sf.lead("k", None) {
        Flight::Follow(f) => f.wait(),
        Flight::Lead(_) => panic!("the attempt is in flight"),
    });
    drop(sf.lead("k", None));
    settle().await;
    assert_eq!(sf.in_flight(), 1);
    assert!(!r.token(0).is_cancelled());
    r.release();
    for (i, c) in callers.into_iter().enumerate() {
        match within(c).await {
            Ok(got) => assert_eq!((i, got), (i, Ok(7))),
            Err(e) => assert!(i < 3 && e.is_cancelled(), "caller {i}: {e}"),
        }
    }
    assert_eq!(within(kept).await.unwrap(), Ok(7));
    assert_eq!(r.calls.load(Ordering::SeqCst), 1, "one attempt");
    assert_eq!(sf.in_flight(), 0);
}

/// Race (the order `FlowManager::run` relies on: a caller that has the result and invalidates
/// the flow must find no run in flight): the leader's flight leaves the map, then its outcome is
/// published. A follower on another worker thread that is woken by the outcome and calls again
/// at once must lead a new flight; were the outcome published first, it could find the finished
/// flight still in the map and follow it, reading its old outcome. Ten thousand rounds on two
/// worker threads, half finished and half abandoned flights (with the order reversed, about one
/// round in two thousand hits the window).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_woken_by_the_outcome_leads_a_new_flight() {
    let sf: Flights = SingleFlight::new(ManualClock::default().shared());
    for round in 0..10_000u32 {
        let leader = lead(&sf, "k");
        let follower = follow(&sf, "k");
        let again = tokio::spawn({
            let sf = sf.clone();
            async move {
                let got = follower.wait().await;
                let next = match sf.lead("k", None) {
                    Flight::Lead(leader) => {
                        leader.finish(0);
                        None
                    }
                    Flight::Follow(stale) => Some(stale.wait().await),
                };
                (got, next)
            }
        });
        tokio::task::yield_now().await;
        if round % 2 == 0 {
            leader.finish(round);
        } else {
            drop(leader);
        }
        let (got, next) = within(again).await.unwrap();
        let expected = if round % 2 == 0 { Ok(round) } else { Err(SingleFlightError::Abandoned) };
        assert_eq!(got, expected, "round {round}");
        assert_eq!(next, None, "round {round}: the caller joined the finished flight");
    }
}
