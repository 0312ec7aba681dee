//! The refresh protocol under faults (issue 12): a lost answer, a slow server, a lapsed lease,
//! a failed write. Each test names the race it pins; each failed before its fix.
//!
//! The fake authorization server burns a refresh token when the request arrives and answers
//! later (or never); the faulty stores fail a write before applying it, or apply it and lose
//! the reply. Two `TokenStorage`s over one store and one lease store stand for two processes.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use flow_state::testkit::FaultyStore;
use flow_state::{MemoryStore, SharedStore};
use token_storage::testkit::{FakeAuthServer, FaultyTokenStore};
use token_storage::{
    Error, ManualClock, MemoryTokenStore, ReauthReason, RefreshError, RefreshLease,
    SharedTokenStore, TerminalCode, TokenKey, TokenSet, TokenStorage, TokenStorageConfig,
    TransientKind,
};

type Outcome = Result<Arc<TokenSet>, Error>;

/// Moves the manual clock in 100 ms steps (letting tasks run in between) until every handle
/// has finished; fails the test after `limit` of manual time.
async fn drive(clock: &ManualClock, handles: &[tokio::task::JoinHandle<Outcome>], limit: Duration) {
    let mut moved = Duration::ZERO;
    while !handles.iter().all(|h| h.is_finished()) {
        assert!(moved <= limit, "the refreshes did not finish within {limit:?} of manual time");
        settle().await;
        clock.advance(Duration::from_millis(100));
        moved += Duration::from_millis(100);
    }
}

/// Lets spawned tasks run (real time, briefly).
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(2)).await;
}

/// Advances the manual clock by `total` in 100 ms steps.
async fn advance(clock: &ManualClock, total: Duration) {
    let mut moved = Duration::ZERO;
    while moved < total {
        settle().await;
        clock.advance(Duration::from_millis(100));
        moved += Duration::from_millis(100);
    }
    settle().await;
}

fn config() -> TokenStorageConfig {
    let mut c = common::config();
    c.caller_deadline = None;
    c.backoff_max = Duration::from_secs(20);
    c
}

/// Two processes: storages over one token store and one lease store, on one clock.
struct Pair {
    a: TokenStorage,
    b: TokenStorage,
    clock: ManualClock,
    server: Arc<FakeAuthServer>,
    leases: Arc<FaultyStore>,
}

/// `a`'s lease goes through a faulty wrapper of the lease store; `b`'s does not.
fn pair(config: TokenStorageConfig, lease: bool) -> Pair {
    let clock = ManualClock::default();
    let server = FakeAuthServer::new(clock.shared());
    let tokens = SharedTokenStore::new(MemoryTokenStore::new());
    let lease_store = SharedStore::new(MemoryStore::with_clock(clock.shared()));
    let leases = FaultyStore::new(lease_store.clone(), clock.shared());
    let build = |leases: SharedStore| {
        let builder = TokenStorage::builder(tokens.clone(), keyring(), server.clone())
            .clock(clock.shared())
            .config(config.clone());
        if lease {
            builder.lease(RefreshLease::store(leases, clock.shared()).ttl(Duration::from_secs(10)))
        } else {
            builder
        }
        .build()
    };
    let a = build(SharedStore::from_arc(leases.clone()));
    let b = build(lease_store);
    Pair { a, b, clock, server, leases }
}

fn force(storage: &TokenStorage, rejected: &TokenSet) -> tokio::task::JoinHandle<Outcome> {
    let (storage, rejected) = (storage.clone(), rejected.access_token().clone());
    tokio::spawn(async move { storage.force_refresh(&key(), ISS, &rejected).await })
}

/// The server's next answer is a 429 asking to wait `secs` (answered: it did not act).
fn rate_limit_next(server: &FakeAuthServer, secs: u64) {
    server.fail_next(RefreshError::transient_retry_after(
        TransientKind::RateLimited,
        "429",
        Duration::from_secs(secs),
    ));
}

fn issued(set: &TokenSet) -> token_storage::testkit::Issued {
    FakeAuthServer::parse(set.access_token().expose()).unwrap()
}

/// The fault model itself: the token is burnt on arrival, so a lost answer leaves it spent; a
/// grace window hands the same successor to a replay; a failure after acting has acted.
#[tokio::test]
async fn the_fake_server_acts_before_it_answers() {
    let clock = ManualClock::default();
    let server = FakeAuthServer::new(clock.shared());
    let k = key();
    let rt = |r: &token_storage::TokenResponse| r.refresh_token.clone().unwrap();
    let login = server.issue(&k);
    server.lose_next_answer();
    let lost = server.redeem(&k, rt(&login).expose()).await.unwrap_err();
    assert!(lost.may_have_acted(), "{lost:?}");
    assert_eq!((server.redemptions(), server.lost_answers()), (1, 1), "acted, answer lost");
    assert!(server.redeem(&k, rt(&login).expose()).await.is_err(), "spent: strict reuse");
    assert_eq!((server.reuse_detected(), server.replays_after_delivery()), (1, 0));

    let login = server.issue(&k);
    server.set_reuse_grace(Duration::from_secs(5));
    server.fail_next_after_acting(RefreshError::transient(TransientKind::ServerError(502), "x"));
    assert!(server.redeem(&k, rt(&login).expose()).await.is_err());
    clock.advance(Duration::from_secs(4));
    let replay = server.redeem(&k, rt(&login).expose()).await.unwrap();
    let again = server.redeem(&k, rt(&login).expose()).await.unwrap();
    assert_eq!(replay, again, "a replay within the grace window gets the same successor");
    assert_eq!(server.replays_after_delivery(), 1, "the second replay came after a delivery");
    clock.advance(Duration::from_secs(2));
    assert!(server.redeem(&k, rt(&login).expose()).await.is_err(), "past the grace window");

    // Late: burnt at arrival, answered after the latency.
    let login = server.issue(&k);
    server.set_latency(Duration::from_secs(2));
    let before = server.redemptions();
    let late = tokio::spawn({
        let (server, k, rt) = (server.clone(), k.clone(), rt(&login));
        async move { server.redeem(&k, rt.expose()).await }
    });
    settle().await;
    assert_eq!(server.redemptions(), before + 1, "acted at arrival");
    assert!(!late.is_finished());
    clock.advance(Duration::from_secs(2));
    late.await.unwrap().unwrap();
}

/// The faulty token store: a failed write is not applied; a write whose reply is lost is.
#[tokio::test]
async fn the_faulty_store_fails_before_or_after_applying() {
    let clock = ManualClock::default();
    let faulty = FaultyTokenStore::new(MemoryTokenStore::new().into(), clock.shared());
    let store = SharedTokenStore::from_arc(faulty.clone());
    faulty.fail_next_write();
    assert!(matches!(
        store.compare_and_swap("k", None, b"a".to_vec()).await,
        Err(Error::StoreUnavailable { .. })
    ));
    assert!(store.get("k").await.unwrap().is_none());
    faulty.lose_next_write_reply();
    assert!(store.compare_and_swap("k", None, b"a".to_vec()).await.is_err());
    assert!(store.get("k").await.unwrap().is_some());
    faulty.fail_next_read();
    assert!(store.get("k").await.is_err());
    assert_eq!(faulty.injected(), 3);
}

/// Race (issue 12, service.rs ~818): the lease was renewed only while the token call was
/// pending, not during the backoff sleep. A 429 with `Retry-After` 9 s under a 10 s lease, and
/// a token endpoint that answers 2 s after acting: the lease lapses during the sleep, a peer
/// takes it, re-reads the old version and redeems; then the first process presents the same
/// refresh token again. Renewed throughout, the lease stays with the first process and the
/// peer finds its rotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_cannot_take_the_lease_during_a_backoff_sleep() {
    let p = pair(config(), true);
    let first = p.a.store(&key(), ISS, p.server.issue(&key())).await.unwrap();
    p.server.set_latency(Duration::from_secs(2));
    rate_limit_next(&p.server, 9);
    let a = force(&p.a, &first);
    advance(&p.clock, Duration::from_secs(1)).await;
    let b = force(&p.b, &first);
    let handles = [a, b];
    drive(&p.clock, &handles, Duration::from_secs(60)).await;
    let [a, b] = handles;
    let (a, b) = (a.await.unwrap().unwrap(), b.await.unwrap().unwrap());
    assert_eq!(p.server.reuse_detected(), 0, "a refresh token was presented twice");
    assert_eq!(p.server.redemptions(), 1);
    assert_eq!(issued(&a), issued(&b), "the peer found the rotation");
}

/// Race: the lease is lost during a backoff sleep (the lease store failed every renewal), and
/// a peer takes it and rotates. The first process must check the lease before it sends: found
/// lost, the attempt ends and the refresh starts over, taking the lease again and re-reading,
/// which finds the peer's rotation. Sending anyway presents a spent refresh token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_lost_during_backoff_ends_the_attempt_before_sending() {
    let p = pair(config(), true);
    let first = p.a.store(&key(), ISS, p.server.issue(&key())).await.unwrap();
    rate_limit_next(&p.server, 12);
    let a = force(&p.a, &first);
    settle().await;
    // Every renewal of a's lease fails; it lapses at 10 s.
    for _ in 0..3 {
        p.leases.fail_next_write();
    }
    advance(&p.clock, Duration::from_secs(1)).await;
    let b = force(&p.b, &first);
    let handles = [a, b];
    drive(&p.clock, &handles, Duration::from_secs(60)).await;
    let [a, b] = handles;
    let (a, b) = (a.await.unwrap(), b.await.unwrap().unwrap());
    assert_eq!(p.server.reuse_detected(), 0, "a sent a refresh token without its lease");
    assert_eq!(p.server.redemptions(), 1);
    assert_eq!(issued(&a.unwrap()), issued(&b), "a started over and found b's rotation");
}

/// Race (issue 12, single_flight.rs ~164): at deadline + grace the refresh future was dropped
/// wherever it was, also after the request reached the server; the next refresher re-read the
/// old version and presented the spent token. Once sent, the flight waits for the answer and
/// commits; a later caller joins it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sent_refresh_is_not_abandoned_at_the_flight_deadline() {
    let mut config = config();
    config.refresh_deadline = Duration::from_secs(5);
    config.refresh_grace = Duration::from_secs(1);
    let f = fixture_with(config, |b| b);
    let first = f.storage.store(&key(), ISS, f.server.issue(&key())).await.unwrap();
    f.server.set_latency(Duration::from_secs(30));
    let a = force(&f.storage, &first);
    advance(&f.clock, Duration::from_secs(8)).await;
    let b = force(&f.storage, &first);
    let handles = [a, b];
    drive(&f.clock, &handles, Duration::from_secs(60)).await;
    let [a, b] = handles;
    let (a, b) = (a.await.unwrap().unwrap(), b.await.unwrap().unwrap());
    assert_eq!(f.server.reuse_detected(), 0, "the spent refresh token was presented again");
    assert_eq!((f.server.calls(), issued(&a)), (1, issued(&b)));
}

/// A storage over `faulty` (one process, no lease).
fn over_faulty(
    clock: &ManualClock,
    server: &Arc<FakeAuthServer>,
    faulty: &Arc<FaultyTokenStore>,
) -> TokenStorage {
    TokenStorage::builder(SharedTokenStore::from_arc(faulty.clone()), keyring(), server.clone())
        .clock(clock.shared())
        .config(config())
        .build()
}

/// Race (issue 12, service.rs ~886): a commit that failed on a transient store error dropped
/// the server's answer: the rotated refresh token was lost, and the next refresh presented the
/// spent one. The commit is retried. (The fault is armed once the request is out, so it hits
/// the commit, not the in-doubt intent written before the send.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_fails_on_a_store_error_keeps_the_rotated_token() {
    let clock = ManualClock::default();
    let server = FakeAuthServer::new(clock.shared());
    let faulty = FaultyTokenStore::new(MemoryTokenStore::new().into(), clock.shared());
    let storage = over_faulty(&clock, &server, &faulty);
    let first = storage.store(&key(), ISS, server.issue(&key())).await.unwrap();
    server.set_latency(Duration::from_secs(2));
    let refreshing = force(&storage, &first);
    eventually("the request is out", || server.calls() == 1).await;
    server.set_latency(Duration::ZERO);
    faulty.fail_next_write();
    drive(&clock, std::slice::from_ref(&refreshing), Duration::from_secs(30)).await;
    let refreshed = refreshing.await.unwrap().expect("the commit is retried");
    assert_eq!(faulty.injected(), 1);
    let stored = storage.tokens(&key()).await.unwrap().unwrap();
    assert_eq!(issued(&stored), issued(&refreshed), "the rotated token is stored");
    let next = storage.force_refresh(&key(), ISS, refreshed.access_token()).await.unwrap();
    assert!(issued(&next).n > issued(&refreshed).n);
    assert_eq!(server.reuse_detected(), 0);
}

/// Race (found by the interleavings property on a fresh clone): a flight that stops before it
/// sends again (its deadline passed during the backoff after an answered 429) takes back its
/// in-doubt intent, since nothing it sent can have acted. That take-back was one write: failed
/// once on the store, it left the intent, so the token read as possibly spent, and a claimed
/// retry left the same way read as a rotation lost in flight (a re-authorization for nothing).
/// The take-back is retried like the intent itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_take_back_of_an_unsent_intent_is_retried() {
    let clock = ManualClock::default();
    let server = FakeAuthServer::new(clock.shared());
    let faulty = FaultyTokenStore::new(MemoryTokenStore::new().into(), clock.shared());
    let mut config = config();
    config.refresh_deadline = Duration::from_secs(5);
    config.refresh_grace = Duration::from_secs(1);
    config.backoff_max = Duration::from_secs(60);
    let storage = TokenStorage::builder(
        SharedTokenStore::from_arc(faulty.clone()),
        keyring(),
        server.clone(),
    )
    .clock(clock.shared())
    .config(config)
    .build();
    let first = storage.store(&key(), ISS, server.issue(&key())).await.unwrap();
    rate_limit_next(&server, 20);
    let refreshing = force(&storage, &first);
    eventually("the 429 is answered", || server.calls() == 1).await;
    // The intent is written; the next write is the take-back, after the backoff.
    assert!(storage.tokens(&key()).await.unwrap().unwrap().in_doubt());
    faulty.fail_next_write();
    drive(&clock, std::slice::from_ref(&refreshing), Duration::from_secs(60)).await;
    let outcome = refreshing.await.unwrap();
    assert!(outcome.is_err(), "the flight ran out of time: {outcome:?}");
    assert_eq!(faulty.injected(), 1, "the take-back failed once");
    assert_eq!(server.calls(), 1, "nothing else was sent");
    let stored = storage.tokens(&key()).await.unwrap().unwrap();
    assert!(!stored.in_doubt(), "the intent of a flight that sent nothing more is taken back");
}

/// Race (found by the interleavings property on a fresh clone, with several store faults armed
/// at once): the in-doubt intent's tries all failed, but one of them had been applied with its
/// reply lost. Giving up left an intent nobody sent: the token then read as possibly spent, and
/// a claimed retry left the same way read as a rotation lost in flight on the next refresh (a
/// re-authorization for nothing). After its last try fails the flight reads the record back: its
/// own intent there is written, and the request goes out under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intent_applied_with_its_reply_lost_on_the_last_try_is_not_left_unsent() {
    let clock = ManualClock::default();
    let server = FakeAuthServer::new(clock.shared());
    let faulty = FaultyTokenStore::new(MemoryTokenStore::new().into(), clock.shared());
    let storage = TokenStorage::builder(
        SharedTokenStore::from_arc(faulty.clone()),
        keyring(),
        server.clone(),
    )
    .clock(clock.shared())
    .config(config())
    .build();
    let first = storage.store(&key(), ISS, server.issue(&key())).await.unwrap();
    // The intent's four tries: three fail before they are applied, the last is applied and
    // its reply lost.
    for _ in 0..3 {
        faulty.fail_next_write();
    }
    faulty.lose_next_write_reply();
    let refreshing = force(&storage, &first);
    drive(&clock, std::slice::from_ref(&refreshing), Duration::from_secs(60)).await;
    let refreshed = refreshing.await.unwrap().expect("the intent was written: the refresh went on");
    assert_eq!(faulty.injected(), 4, "every try of the intent met a fault");
    assert_eq!(server.calls(), 1);
    assert!(issued(&refreshed).n > issued(&first).n);
    let stored = storage.tokens(&key()).await.unwrap().unwrap();
    assert!(!stored.in_doubt() && stored.needs_authorization().is_none());
    assert_eq!(stored.access_token(), refreshed.access_token());
    let next = storage.force_refresh(&key(), ISS, refreshed.access_token()).await.unwrap();
    assert!(issued(&next).n > issued(&refreshed).n);
    assert_eq!(server.reuse_detected(), 0);
}

/// A flight whose lease check fails (the lease store could not be read) sends nothing more and
/// ends; what it sent before (a 429, answered: the server did not act) cannot have spent the
/// token, so its in-doubt intent is taken back. Left in place, the next refresh would spend the
/// token's one in-doubt retry on a token that was never at risk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flight_whose_lease_check_fails_takes_back_its_intent() {
    let p = pair(config(), true);
    let first = p.a.store(&key(), ISS, p.server.issue(&key())).await.unwrap();
    rate_limit_next(&p.server, 3);
    let a = force(&p.a, &first);
    eventually("the 429 is answered", || p.server.calls() == 1).await;
    assert!(p.a.tokens(&key()).await.unwrap().unwrap().in_doubt(), "the intent is written");
    // The check before the next send (after 3 s) is the lease store's next read: the first
    // renewal (a read, then a write) comes at a third of the 10 s lease.
    p.leases.fail_next_read();
    drive(&p.clock, std::slice::from_ref(&a), Duration::from_secs(60)).await;
    let outcome = a.await.unwrap();
    assert!(
        matches!(outcome, Err(token_storage::Error::RefreshUnavailable { .. })),
        "the lease could not be checked: {outcome:?}"
    );
    assert_eq!(p.leases.injected(), 1);
    assert_eq!(p.server.calls(), 1, "nothing was sent without a checked lease");
    let stored = p.a.tokens(&key()).await.unwrap().unwrap();
    assert!(
        !stored.in_doubt(),
        "the intent of a flight that sent nothing that acted is taken back"
    );
}

/// Race: the commit was applied but its reply lost; the retry conflicts with the stored value,
/// which is our own set: that counts as written (not as a peer's newer tokens, nor an error).
/// The hook reports the write over the in-doubt intent it replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_reply_was_lost_counts_as_written() {
    let clock = ManualClock::default();
    let server = FakeAuthServer::new(clock.shared());
    let faulty = FaultyTokenStore::new(MemoryTokenStore::new().into(), clock.shared());
    let hooked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let storage = TokenStorage::builder(
        SharedTokenStore::from_arc(faulty.clone()),
        keyring(),
        server.clone(),
    )
    .clock(clock.shared())
    .config(config())
    .on_refresh({
        let hooked = hooked.clone();
        move |_, old, new| hooked.lock().unwrap().push((old.version(), new.version()))
    })
    .build();
    let first = storage.store(&key(), ISS, server.issue(&key())).await.unwrap();
    server.set_latency(Duration::from_secs(2));
    let refreshing = force(&storage, &first);
    eventually("the request is out", || server.calls() == 1).await;
    let intent = storage.tokens(&key()).await.unwrap().unwrap();
    assert!(intent.in_doubt() && intent.version() > first.version(), "the intent is stored");
    faulty.lose_next_write_reply();
    drive(&clock, std::slice::from_ref(&refreshing), Duration::from_secs(30)).await;
    let refreshed = refreshing.await.unwrap().expect("the lost reply's write counts");
    let stored = storage.tokens(&key()).await.unwrap().unwrap();
    assert_eq!((stored.version(), issued(&stored)), (refreshed.version(), issued(&refreshed)));
    assert!(!stored.in_doubt());
    assert_eq!(*hooked.lock().unwrap(), [(intent.version(), stored.version())]);
    assert_eq!(server.redemptions(), 1);
}

/// Two processes over one token store and one lease; `a`'s token store and lease store are
/// faulty wrappers.
struct FaultyPair {
    a: TokenStorage,
    b: TokenStorage,
    clock: ManualClock,
    server: Arc<FakeAuthServer>,
    tokens: Arc<FaultyTokenStore>,
    leases: Arc<FaultyStore>,
}

fn faulty_pair() -> FaultyPair {
    let clock = ManualClock::default();
    let server = FakeAuthServer::new(clock.shared());
    let shared = SharedTokenStore::new(MemoryTokenStore::new());
    let tokens = FaultyTokenStore::new(shared.clone(), clock.shared());
    let lease_store = SharedStore::new(MemoryStore::with_clock(clock.shared()));
    let leases = FaultyStore::new(lease_store.clone(), clock.shared());
    let build = |tokens: SharedTokenStore, leases: SharedStore| {
        TokenStorage::builder(tokens, keyring(), server.clone())
            .clock(clock.shared())
            .config(config())
            .lease(RefreshLease::store(leases, clock.shared()).ttl(Duration::from_secs(10)))
            .build()
    };
    let a =
        build(SharedTokenStore::from_arc(tokens.clone()), SharedStore::from_arc(leases.clone()));
    let b = build(shared, lease_store);
    FaultyPair { a, b, clock, server, tokens, leases }
}

/// Race (issue 12 section 2, "commit retry"; the model's "commit retries capped, then
/// release"): the commit fails on the store several times in a row. A flight that gave up
/// after a bounded number of tries kept the rotated set in memory and released the lease;
/// the peer then took the lease, re-read the old generation and presented its spent refresh
/// token (reuse detected). The commit is retried under the renewed lease until it lands, and
/// the peer, waiting for the lease, finds the rotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_failing_on_the_store_keeps_the_lease_until_it_lands() {
    let p = faulty_pair();
    let first = p.a.store(&key(), ISS, p.server.issue(&key())).await.unwrap();
    p.server.set_latency(Duration::from_secs(2));
    let a = force(&p.a, &first);
    eventually("a's request is out", || p.server.calls() == 1).await;
    for _ in 0..5 {
        p.tokens.fail_next_write();
    }
    let b = force(&p.b, &first);
    let handles = [a, b];
    drive(&p.clock, &handles, Duration::from_secs(120)).await;
    let [a, b] = handles;
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    assert_eq!(p.tokens.injected(), 5, "every armed write failure struck the commit");
    assert_eq!(p.server.reuse_detected(), 0, "the peer presented the spent refresh token");
    assert_eq!(p.server.redemptions(), 1);
    let (a, b) = (a.expect("a's commit landed"), b.expect("b found the rotation"));
    assert_eq!(issued(&a), issued(&b));
    let stored = p.b.tokens(&key()).await.unwrap().unwrap();
    assert_eq!(issued(&stored), issued(&a), "the rotated set is in the store");
}

/// The lease is lost while the request is out (every renewal fails: a holder paused past the
/// TTL, which the protocol assumes away). The redemption has spent the old refresh token, so
/// the new set is still offered to the compare-and-swap on the version read: nobody wrote since,
/// it lands, and a peer finds it instead of presenting the spent token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_after_the_lease_lapsed_still_lands_on_the_version_read() {
    let p = faulty_pair();
    let first = p.a.store(&key(), ISS, p.server.issue(&key())).await.unwrap();
    p.server.set_latency(Duration::from_secs(12));
    let a = force(&p.a, &first);
    eventually("a's request is out", || p.server.calls() == 1).await;
    for _ in 0..4 {
        p.leases.fail_next_write();
    }
    drive(&p.clock, std::slice::from_ref(&a), Duration::from_secs(60)).await;
    let a = a.await.unwrap().expect("committed");
    p.leases.disarm();
    let stored = p.b.tokens(&key()).await.unwrap().unwrap();
    assert_eq!((issued(&stored), stored.in_doubt()), (issued(&a), false), "the commit landed");
    let b = p.b.force_refresh(&key(), ISS, first.access_token()).await.unwrap();
    assert_eq!(issued(&b), issued(&a), "the peer found the rotation");
    assert_eq!((p.server.redemptions(), p.server.reuse_detected()), (1, 0));
}

/// The lease lapsed while the request was out and the store refuses the commit too: the answer
/// is held in memory and served, and the next refresh of this process, under the lease again,
/// writes it over the in-doubt intent instead of presenting the spent refresh token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_cannot_be_written_is_held_in_memory_for_the_next_refresh() {
    let p = faulty_pair();
    let first = p.a.store(&key(), ISS, p.server.issue(&key())).await.unwrap();
    p.server.set_latency(Duration::from_secs(12));
    let a = force(&p.a, &first);
    eventually("a's request is out", || p.server.calls() == 1).await;
    for _ in 0..4 {
        p.leases.fail_next_write();
    }
    p.tokens.fail_next_write();
    drive(&p.clock, std::slice::from_ref(&a), Duration::from_secs(60)).await;
    let served = a.await.unwrap().expect("served from memory");
    p.leases.disarm(); // the lease store is back
    assert_ne!(served.access_token(), first.access_token());
    assert_eq!(p.tokens.injected(), 1);
    let stored = p.a.tokens(&key()).await.unwrap().unwrap();
    assert_eq!(stored.access_token(), first.access_token(), "not written");
    assert!(stored.in_doubt());
    let again = p.a.force_refresh(&key(), ISS, first.access_token()).await.unwrap();
    assert_eq!(issued(&again), issued(&served), "the held answer was written");
    let stored = p.b.tokens(&key()).await.unwrap().unwrap();
    assert_eq!((issued(&stored), stored.in_doubt()), (issued(&served), false));
    assert_eq!((p.server.redemptions(), p.server.reuse_detected()), (1, 0));
}

/// Race (the model's `fenced_commit` counterexample, in the real code): `a` takes the lease,
/// then stalls reading the store (a slow backend) while its lease lapses (every renewal
/// fails). `b` takes the lease, writes its in-doubt intent and sends. `a`'s read returns that
/// intent; unfenced, `a` claimed the same-token retry over it, `b`'s commit then conflicted
/// and dropped the rotated set, and the slot ended with a rotation lost in flight. The fence
/// refuses `a`'s write: `a` starts over, waits for the lease and finds `b`'s rotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_whose_lease_lapsed_cannot_write_over_the_new_holders_intent() {
    let p = faulty_pair();
    let first = p.a.store(&key(), ISS, p.server.issue(&key())).await.unwrap();
    p.tokens.set_delay(Duration::from_secs(15));
    let a = force(&p.a, &first);
    settle().await;
    for _ in 0..3 {
        p.leases.fail_next_write();
    }
    advance(&p.clock, Duration::from_secs(11)).await;
    p.server.set_latency(Duration::from_secs(40));
    let b = force(&p.b, &first);
    eventually("b's request is out", || p.server.calls() == 1).await;
    let handles = [a, b];
    drive(&p.clock, &handles, Duration::from_secs(200)).await;
    let [a, b] = handles;
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    assert_eq!(p.server.reuse_detected(), 0);
    let (a, b) = (a.expect("a found b's rotation"), b.expect("b's commit landed"));
    assert_eq!(issued(&a), issued(&b));
    assert_eq!((p.server.calls(), p.server.redemptions()), (1, 1));
}

/// In doubt, with a grace window: the answer is lost after the server rotated; the attempt is
/// recorded in the store as in doubt first, then retried with the same refresh token, and the
/// server's grace window answers with the successor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_answer_is_recorded_in_doubt_and_retried_with_the_same_token() {
    let f = fixture_with(config(), |b| b);
    let first = f.storage.store(&key(), ISS, f.server.issue(&key())).await.unwrap();
    f.server.set_reuse_grace(Duration::from_secs(5));
    f.server.lose_next_answer();
    let refreshing = force(&f.storage, &first);
    eventually("the answer was lost", || f.server.lost_answers() == 1).await;
    settle().await;
    let stored = f.storage.tokens(&key()).await.unwrap().unwrap();
    assert!(stored.in_doubt(), "recorded in doubt before the retry");
    assert_eq!(stored.access_token(), first.access_token());
    drive(&f.clock, std::slice::from_ref(&refreshing), Duration::from_secs(30)).await;
    let refreshed = refreshing.await.unwrap().unwrap();
    assert!(!f.storage.tokens(&key()).await.unwrap().unwrap().in_doubt());
    assert_eq!(f.server.redemptions(), 1, "the retry got the same successor");
    assert_eq!(f.server.replays_after_delivery(), 0);
    assert!(issued(&refreshed).n > issued(&first).n);
}

/// In doubt, strict server: the retry of the in-doubt token is refused. That is a rotation
/// lost in flight, a reason of its own, not a generic `invalid_grant`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_rotation_refused_on_retry_is_reported_as_lost_in_flight() {
    let f = fixture_with(config(), |b| b);
    let first = f.storage.store(&key(), ISS, f.server.issue(&key())).await.unwrap();
    f.server.lose_next_answer();
    let refreshing = force(&f.storage, &first);
    drive(&f.clock, std::slice::from_ref(&refreshing), Duration::from_secs(30)).await;
    match refreshing.await.unwrap() {
        Err(Error::AuthorizationRequired {
            reason: ReauthReason::RotationLostInFlight, ..
        }) => {}
        other => panic!("expected a rotation lost in flight, got {other:?}"),
    }
    assert_eq!(f.server.replays_after_delivery(), 0);
}

/// Race (issue 12, service.rs ~895-949): a stale peer presents a refresh token this process has
/// just spent, is refused, and writes its needs-authorization marker over the version both
/// read, before this process's answer arrives. The marker must not beat the valid new token:
/// the commit replaces the marker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_peers_failure_marker_does_not_beat_a_valid_new_token() {
    let p = pair(config(), false);
    let first = p.a.store(&key(), ISS, p.server.issue(&key())).await.unwrap();
    p.server.set_latency(Duration::from_secs(2));
    let a = force(&p.a, &first);
    eventually("a's request arrived", || p.server.calls() == 1).await;
    p.server.set_latency(Duration::ZERO);
    p.server.fail_next(RefreshError::terminal(TerminalCode::InvalidGrant, None));
    let b = p.b.force_refresh(&key(), ISS, first.access_token()).await;
    assert!(matches!(b, Err(Error::AuthorizationRequired { .. })), "{b:?}");
    drive(&p.clock, std::slice::from_ref(&a), Duration::from_secs(30)).await;
    let a = a.await.unwrap().expect("the valid new token wins over the stale marker");
    let served = p.b.get_valid(&key(), ISS).await.expect("the slot works again");
    assert_eq!(issued(&served), issued(&a));
}

/// Lock files are named by a fixed-length digest of the key: a 200-character server URL and a
/// 120-character user name (past 255 bytes as hex) still refresh.
#[tokio::test]
async fn a_long_key_gets_a_lock_file_of_fixed_length() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("https://mcp.example.com/{}", "p".repeat(200 - 24));
    assert_eq!(url.len(), 200);
    let long = TokenKey::new("acme", "u".repeat(120), url);
    let clock = ManualClock::default();
    let server = FakeAuthServer::new(clock.shared());
    let storage = TokenStorage::builder(MemoryTokenStore::new().into(), keyring(), server.clone())
        .clock(clock.shared())
        .config(config())
        .lease(RefreshLease::lock_files(dir.path()))
        .build();
    let first = storage.store(&long, ISS, server.issue(&long)).await.unwrap();
    let refreshed = storage.force_refresh(&long, ISS, first.access_token()).await.unwrap();
    assert_ne!(refreshed.access_token(), first.access_token());
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 1);
    assert_eq!(names[0].len(), 64 + ".lock".len(), "{names:?}");
}

/// Race (the fleet of issue 12): refreshes ahead of expiry queued behind a peer's lease, one
/// after another, each finding a token that was due again by the time it got the lease. While
/// the stored token is valid, a due refresh only tries the lease and serves the valid token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_ahead_never_queues_behind_a_peers_lease() {
    let p = pair(config(), true);
    let first = p.a.store(&key(), ISS, p.server.issue(&key())).await.unwrap();
    p.a.get_valid(&key(), ISS).await.unwrap();
    p.clock.advance(HOUR - Duration::from_secs(30)); // inside a's refresh window, still valid
    p.server.set_latency(Duration::from_secs(20));
    let b = force(&p.b, &first); // b holds the lease while its token call is pending
    eventually("b's request arrived", || p.server.calls() == 1).await;
    let served = p.a.get_valid(&key(), ISS).await.unwrap();
    assert_eq!(served.access_token(), first.access_token());
    eventually("a's refresh ahead ended without waiting for the lease", || {
        format!("{:?}", p.a).contains("refreshes_in_flight: 0")
    })
    .await;
    drive(&p.clock, std::slice::from_ref(&b), Duration::from_secs(60)).await;
    b.await.unwrap().unwrap();
    assert_eq!(p.server.calls(), 1);
}

/// A lease wait that times out is a typed, transient error naming the wait (not the generic
/// "gave up waiting for the token refresh").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_wait_that_times_out_names_the_wait() {
    let clock = ManualClock::default();
    let server = FakeAuthServer::new(clock.shared());
    let tokens = SharedTokenStore::new(MemoryTokenStore::new());
    let lease_store = SharedStore::new(MemoryStore::with_clock(clock.shared()));
    let build = |wait| {
        TokenStorage::builder(tokens.clone(), keyring(), server.clone())
            .clock(clock.shared())
            .config(config())
            .lease(RefreshLease::store(lease_store.clone(), clock.shared()).wait(wait))
            .build()
    };
    let (a, b) = (build(Duration::from_secs(2)), build(Duration::from_secs(30)));
    let first = a.store(&key(), ISS, server.issue(&key())).await.unwrap();
    server.set_latency(Duration::from_secs(20));
    let holder = force(&b, &first);
    eventually("b's request arrived", || server.calls() == 1).await;
    let waiting = force(&a, &first);
    drive(&clock, std::slice::from_ref(&waiting), Duration::from_secs(10)).await;
    match waiting.await.unwrap() {
        Err(e @ Error::LeaseWait { waited, .. }) => {
            assert_eq!(waited, Duration::from_secs(2));
            assert!(e.to_string().contains("refresh lease"), "{e}");
        }
        other => panic!("expected a lease wait error, got {other:?}"),
    }
    drive(&clock, std::slice::from_ref(&holder), Duration::from_secs(60)).await;
    holder.await.unwrap().unwrap();
}
