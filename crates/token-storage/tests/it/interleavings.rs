//! Property test: random interleavings of get-valid, force-refresh, interactive logins, caller
//! cancellation, clock advances and faults, across many tasks in two `TokenStorage`s (two
//! processes) that share one token store and one refresh lease, on three keys in two tenants,
//! against the fault-model authorization server (strict rotation and reuse detection, tokens
//! burnt on arrival, answers lost or failed after acting, an optional reuse grace window) and a
//! faulty token store (writes failed before applying, or applied with their reply lost). The
//! lease store is not faulted here: its lease lasts three hours (longer than any clock jump),
//! so a failed release would hold the key for hours; `tests/faults.rs` pins the lease-store
//! faults one by one.
//!
//! Invariants:
//! - no refresh token whose answer was delivered is presented again (the server counts every
//!   such replay); the only second presentations are in-doubt retries after a lost answer;
//! - no rotated token is lost: at the end (faults disarmed, one more refresh per key), every
//!   slot either holds a refresh token the server still honours, or needs authorization
//!   because a rotation was lost in flight under strict reuse detection (explained by a lost
//!   answer);
//! - a refresh result only ever replaces the set it was derived from (same grant family, later
//!   issue), and an in-doubt or failure marker only ever marks the set it was derived from.
//!   Checked independently of the service: a recording store logs every applied write (the
//!   version it replaced and the sealed bytes), and the test decodes each one itself; a write
//!   that is not a login's tokens is a refresh's or a marker;
//! - the `on_refresh` hook reports exactly the write its refresh made (the version it replaced,
//!   the version it created), and `store` returns the set the login stored;
//! - no caller receives another key's (tenant's, user's) token;
//! - no caller is told to re-authorize unless a rotation was lost in flight.
//!
//! Across the random cases, refreshes must have happened during the schedules (not only in the
//! final round), and a refresher that always times out must fail the property.

use crate::common;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use flow_state::testkit::FaultyStore;
use flow_state::{MemoryStore, SharedStore};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestError, TestRunner};
use token_storage::testkit::{FakeAuthServer, FaultyTokenStore, Issued};
use token_storage::{
    Clock, Error, ManualClock, MemoryTokenStore, ReauthReason, RefreshError, RefreshLease,
    RefreshRequest, Refresher, Secret, SharedClock, SharedTokenStore, TokenKey, TokenResponse,
    TokenStorage, TokenStore, TransientKind,
    store::{Swapped, Versioned},
};
use tokio::sync::Notify;

/// A memory store that logs every successful write (see [`Write`]).
///
/// A successful write yields once before it reports back, as a store across a network (Redis)
/// does between applying a write and its reply: the service must not assume that nothing else
/// happens between its compare-and-swap and its next step. [`Recording::hold_next`] holds the
/// next successful write's reply until [`Recording::release`], for the targeted scenarios below.
#[derive(Debug, Default)]
struct Recording {
    inner: MemoryTokenStore,
    writes: Mutex<Vec<Write>>,
    /// Hold the reply of the n-th next successful write (0: none).
    hold: std::sync::atomic::AtomicU32,
    landed: Notify,
    released: Notify,
}

impl Recording {
    /// Hold the reply of the next successful write (it is applied at once) until
    /// [`Recording::release`]; [`Recording::landed`] wakes when it has been applied.
    fn hold_next(&self) {
        self.hold_nth(1);
    }

    /// Like [`Recording::hold_next`], for the `n`-th next successful write.
    fn hold_nth(&self, n: u32) {
        self.hold.store(n, Ordering::SeqCst);
    }

    async fn landed(&self) {
        self.landed.notified().await;
    }

    fn release(&self) {
        self.released.notify_one();
    }
}

#[async_trait::async_trait]
impl TokenStore for Recording {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, Error> {
        self.inner.get(key).await
    }
    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<u64>,
        value: Vec<u8>,
    ) -> Result<Swapped, Error> {
        let r = self.inner.compare_and_swap(key, expected, value.clone()).await?;
        if let Swapped::Swapped { version } = r {
            let write = Write { record: key.to_owned(), expected, version, value, replied: false };
            self.writes.lock().unwrap().push(write);
            let held = self
                .hold
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok_and(|n| n == 1);
            if held {
                self.landed.notify_one();
                self.released.notified().await;
            } else {
                tokio::task::yield_now().await;
            }
            // Not reached when the writer was dropped meanwhile (a refresh abandoned past
            // its deadline and grace): the write stands, but nobody heard of it.
            let mut writes = self.writes.lock().unwrap();
            if let Some(w) = writes.iter_mut().find(|w| w.version == version) {
                w.replied = true;
            }
        }
        Ok(r)
    }
    async fn delete_if(&self, key: &str, expected: Option<u64>) -> Result<bool, Error> {
        self.inner.delete_if(key, expected).await
    }
    async fn keys_with_prefix(&self, prefix: &str) -> Result<Vec<String>, Error> {
        self.inner.keys_with_prefix(prefix).await
    }
}

/// One successful compare-and-swap.
#[derive(Debug, Clone)]
struct Write {
    record: String,
    expected: Option<u64>,
    version: u64,
    value: Vec<u8>,
    /// Whether its reply reached the writer.
    replied: bool,
}

/// What a write stored: the token's issue, and whether it is a marker (in doubt, or needing
/// authorization) of that token rather than a new one.
#[derive(Debug, Clone, PartialEq)]
struct Decoded {
    issued: Issued,
    marker: bool,
}

/// What the token written by `write` is, read back from its sealed bytes by a storage of
/// its own (same keyring, a store holding just this record).
async fn decode(write: &Write) -> Decoded {
    let store = MemoryTokenStore::new();
    store.compare_and_swap(&write.record, None, write.value.clone()).await.unwrap();
    let reader = TokenStorage::builder(
        store.into(),
        keyring(),
        FakeAuthServer::new(ManualClock::default().shared()),
    )
    .build();
    for key in keys() {
        if let Some(set) = reader.tokens(&key).await.unwrap() {
            return Decoded {
                issued: FakeAuthServer::parse(set.access_token().expose()).unwrap(),
                marker: set.in_doubt() || set.needs_authorization().is_some(),
            };
        }
    }
    panic!("write v{} to {} is no token record", write.version, write.record)
}

#[derive(Debug, Clone)]
enum Op {
    Get(usize),
    /// A 401 for the token this task saw last (possibly stale by now), or the current one.
    Force {
        key: usize,
        stale: bool,
    },
    Login(usize),
    /// Start a call and drop it after a few polls.
    Cancel {
        key: usize,
        force: bool,
        polls: u8,
    },
    Advance(u64),
    /// The next token request fails before the server acts.
    FailNext,
    /// The server acts on the next token request, then its answer is lost.
    LoseAnswer,
    /// The server acts on the next token request, then answers 502.
    FailAfterActing,
    /// The next token-store write fails before it is applied.
    FailWrite,
    /// The next token-store write is applied, then reported failed (its reply is lost).
    LoseWriteReply,
    Yield,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..3usize).prop_map(Op::Get),
        4 => (0..3usize, any::<bool>()).prop_map(|(key, stale)| Op::Force { key, stale }),
        1 => (0..3usize).prop_map(Op::Login),
        2 => (0..3usize, any::<bool>(), 0..4u8).prop_map(|(key, force, polls)| Op::Cancel { key, force, polls }),
        2 => prop_oneof![0..5u64, 50..70u64, 3500..3700u64].prop_map(Op::Advance),
        1 => Just(Op::FailNext),
        1 => Just(Op::LoseAnswer),
        1 => Just(Op::FailAfterActing),
        1 => Just(Op::FailWrite),
        1 => Just(Op::LoseWriteReply),
        1 => Just(Op::Yield),
    ]
}

fn keys() -> [TokenKey; 3] {
    [
        TokenKey::new("t1", "alice", "github"),
        TokenKey::new("t2", "alice", "github"),
        TokenKey::new("t1", "bob", "github"),
    ]
}

struct World {
    /// Two processes over one token store and one lease store.
    storages: [TokenStorage; 2],
    server: Arc<FakeAuthServer>,
    tokens: Arc<FaultyTokenStore>,
    leases: Arc<FaultyStore>,
    /// How many token-store replies were armed to be lost: a writer may then never learn that
    /// its write landed (a later writer replaced it before the retry looked).
    lost_replies: std::sync::atomic::AtomicUsize,
    clock: ManualClock,
    keys: [TokenKey; 3],
    logins: [tokio::sync::Mutex<()>; 3],
    violations: Mutex<Vec<String>>,
    /// The tokens every interactive login got from the server.
    logins_issued: Mutex<Vec<Issued>>,
}

impl World {
    fn violation(&self, v: String) {
        self.violations.lock().unwrap().push(v);
    }

    fn check(
        &self,
        key: &TokenKey,
        what: &str,
        outcome: &Result<Arc<token_storage::TokenSet>, Error>,
    ) {
        match outcome {
            Ok(set) => match FakeAuthServer::parse(set.access_token().expose()) {
                Some(issued) if issued.key == key.to_string() => {}
                other => self.violation(format!("{what} on {key} received a token of {other:?}")),
            },
            Err(Error::AuthorizationRequired { reason: ReauthReason::RotationLostInFlight, .. })
                if self.server.lost_answers() > 0 => {}
            Err(Error::AuthorizationRequired { reason, .. }) => self.violation(format!(
                "{what} on {key} was told to re-authorize ({reason}) while a valid refresh token exists"
            )),
            Err(
                Error::RefreshUnavailable { .. }
                | Error::Timeout { .. }
                | Error::LeaseWait { .. }
                | Error::StoreUnavailable { .. },
            ) => {}
            Err(other) => self.violation(format!("{what} on {key}: unexpected {other:?}")),
        }
    }

    async fn login(&self, i: usize) {
        // Logins for one key are serialized with their issue, so a later issue is a later store.
        let _serial = self.logins[i].lock().await;
        let response = self.server.issue(&self.keys[i]);
        let issued = FakeAuthServer::parse(response.access_token.expose()).unwrap();
        self.logins_issued.lock().unwrap().push(issued.clone());
        match self.storages[i % 2].store(&self.keys[i], ISS, response).await {
            Ok(set) => {
                let returned = FakeAuthServer::parse(set.access_token().expose()).unwrap();
                if returned != issued {
                    self.violation(format!("login of {issued:?} returned {returned:?}"));
                }
            }
            // The login's write failed (applied or not): the user would log in again.
            Err(Error::StoreUnavailable { .. }) => {}
            Err(e) => self.violation(format!("login on {}: {e:?}", self.keys[i])),
        }
    }
}

async fn run_task(world: Arc<World>, process: usize, ops: Vec<Op>) {
    let storage = world.storages[process].clone();
    let mut seen: HashMap<usize, Secret> = HashMap::new();
    for op in ops {
        match op {
            Op::Get(i) => {
                let r = storage.get_valid(&world.keys[i], ISS).await;
                world.check(&world.keys[i], "get_valid", &r);
                if let Ok(set) = r {
                    seen.entry(i).or_insert_with(|| set.access_token().clone());
                }
            }
            Op::Force { key: i, stale } => {
                let rejected = match (stale, seen.get(&i)) {
                    (true, Some(s)) => s.clone(),
                    _ => match storage.tokens(&world.keys[i]).await {
                        Ok(Some(set)) => set.access_token().clone(),
                        Err(Error::StoreUnavailable { .. }) => continue,
                        other => {
                            world.violation(format!("tokens on {}: {other:?}", world.keys[i]));
                            continue;
                        }
                    },
                };
                let r = storage.force_refresh(&world.keys[i], ISS, &rejected).await;
                world.check(&world.keys[i], "force_refresh", &r);
                if let Ok(set) = r {
                    seen.insert(i, set.access_token().clone());
                }
            }
            Op::Login(i) => world.login(i).await,
            Op::Cancel { key: i, force, polls } => {
                let (storage, key) = (storage.clone(), world.keys[i].clone());
                let call = tokio::spawn(async move {
                    if force {
                        let current = storage.tokens(&key).await.ok().flatten();
                        if let Some(set) = current {
                            let _ = storage.force_refresh(&key, ISS, set.access_token()).await;
                        }
                    } else {
                        let _ = storage.get_valid(&key, ISS).await;
                    }
                });
                for _ in 0..polls {
                    tokio::task::yield_now().await;
                }
                call.abort();
            }
            Op::Advance(secs) => world.clock.advance(Duration::from_secs(secs)),
            Op::FailNext => {
                world.server.fail_next(RefreshError::transient(TransientKind::Network, "reset"))
            }
            Op::LoseAnswer => world.server.lose_next_answer(),
            Op::FailAfterActing => world.server.fail_next_after_acting(RefreshError::transient(
                TransientKind::ServerError(502),
                "bad gateway",
            )),
            Op::FailWrite => world.tokens.fail_next_write(),
            Op::LoseWriteReply => {
                world.lost_replies.fetch_add(1, Ordering::SeqCst);
                world.tokens.lose_next_write_reply();
            }
            Op::Yield => tokio::task::yield_now().await,
        }
    }
}

/// Keeps time moving (backoffs, deadlines and the fake's sleeps run on the manual clock) until
/// every task has finished.
async fn drive(world: &World, handles: Vec<tokio::task::JoinHandle<()>>) {
    let mut ticks = 0;
    while !handles.iter().all(|h| h.is_finished()) {
        world.clock.advance(Duration::from_millis(500));
        mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(1)).await;
        ticks += 1;
        if ticks > 20_000 {
            world.violation("tasks did not finish".into());
            for h in &handles {
                h.abort();
            }
            break;
        }
    }
    for h in handles {
        if let Err(e) = h.await
            && !e.is_cancelled()
        {
            world.violation(format!("task panicked: {e}"));
        }
    }
}

/// Which refresher the storages use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The fault-model server, strict (no reuse grace window).
    Strict,
    /// The fault-model server with a 30 s reuse grace window.
    Grace,
    /// A refresher whose every call times out (10 s, then no answer): the property must fail.
    TimesOut,
}

/// Every call waits 10 s on the clock, then reports no answer: an HTTP timeout.
#[derive(Debug)]
struct TimesOut(SharedClock);

#[async_trait::async_trait]
impl Refresher for TimesOut {
    async fn refresh(
        &self,
        _: &TokenKey,
        _: &RefreshRequest,
    ) -> Result<TokenResponse, RefreshError> {
        self.0.sleep(Duration::from_secs(10)).await;
        Err(RefreshError::transient(TransientKind::Unanswered, "timed out"))
    }
}

/// What one case saw, for the checks across cases.
#[derive(Debug, Default, Clone, Copy)]
struct Seen {
    /// Refresh writes during the random schedule (before the final round).
    refreshes: usize,
    lost_answers: u64,
    store_faults: u64,
}

fn run(tasks: Vec<Vec<Op>>) -> Result<(), TestCaseError> {
    run_with(tasks, Mode::Strict).map(drop)
}

fn run_with(tasks: Vec<Vec<Op>>, mode: Mode) -> Result<Seen, TestCaseError> {
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let clock = ManualClock::default();
        let server = FakeAuthServer::new(clock.shared());
        if mode == Mode::Grace {
            server.set_reuse_grace(Duration::from_secs(30));
        }
        let refresher: Arc<dyn Refresher> = match mode {
            Mode::TimesOut => Arc::new(TimesOut(clock.shared())),
            _ => server.clone(),
        };
        let mut config = config();
        config.refresh_buffer = Duration::from_secs(60);
        config.refresh_jitter = Duration::from_secs(30);
        config.caller_deadline = Some(Duration::from_secs(20));
        config.max_attempts = 2;
        config.backoff_base = Duration::from_secs(1);
        config.failure_ttl = Duration::from_secs(2);
        config.storm_limit = u32::MAX;
        let violations = Arc::new(Mutex::new(Vec::new()));
        // (replaced version, new version) of every `on_refresh` call.
        let reported: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
        let recording = Arc::new(Recording::default());
        let tokens = FaultyTokenStore::new(SharedTokenStore::from_arc(recording.clone()), clock.shared());
        let leases = FaultyStore::new(
            SharedStore::new(MemoryStore::with_clock(clock.shared())),
            clock.shared(),
        );
        let build = || {
            TokenStorage::builder(SharedTokenStore::from_arc(tokens.clone()), keyring(), refresher.clone())
                .clock(clock.shared())
                .config(config.clone())
                .lease(
                    // Longer than the largest clock jump: a jump past the TTL is a holder
                    // paused past its lease with a request out, which no client-side rule can
                    // close (tests/faults.rs pins the lapsed-lease races one by one).
                    RefreshLease::store(SharedStore::from_arc(leases.clone()), clock.shared())
                        .ttl(Duration::from_secs(3 * 3600))
                        .wait(Duration::from_secs(20)),
                )
                .on_refresh({
                    let violations = violations.clone();
                    let reported = reported.clone();
                    move |key, old, new| {
                        reported.lock().unwrap().push((old.version(), new.version()));
                        let (o, n) = (
                            FakeAuthServer::parse(old.access_token().expose()).unwrap(),
                            FakeAuthServer::parse(new.access_token().expose()).unwrap(),
                        );
                        if o.family != n.family
                            || n.n <= o.n
                            || o.key != key.to_string()
                            || n.key != o.key
                        {
                            violations
                                .lock()
                                .unwrap()
                                .push(format!("refresh on {key} replaced {o:?} with {n:?}"));
                        }
                    }
                })
                .build()
        };
        let world = Arc::new(World {
            storages: [build(), build()],
            server,
            tokens: tokens.clone(),
            leases,
            lost_replies: Default::default(),
            clock,
            keys: keys(),
            logins: Default::default(),
            violations: Mutex::new(Vec::new()),
            logins_issued: Mutex::default(),
        });
        for i in 0..3 {
            world.login(i).await;
        }
        let handles: Vec<_> = tasks
            .into_iter()
            .enumerate()
            .map(|(i, ops)| tokio::spawn(run_task(world.clone(), i % 2, ops)))
            .collect();
        drive(&world, handles).await;
        let scheduled = recording.writes.lock().unwrap().len();
        // The final round, faults disarmed: let detached refreshes settle, then one more
        // refresh of every key (it resolves a record left in doubt) must succeed, unless a
        // rotation was lost in flight under strict reuse detection.
        world.server.disarm();
        world.tokens.disarm();
        world.leases.disarm();
        world.clock.advance(Duration::from_secs(60));
        let finals: Vec<_> = (0..3)
            .map(|i| {
                let world = world.clone();
                tokio::spawn(async move {
                    let key = world.keys[i].clone();
                    let storage = &world.storages[i % 2];
                    let current = match storage.tokens(&key).await {
                        Ok(Some(set)) => set,
                        other => {
                            world.violation(format!("final read of {key}: {other:?}"));
                            return;
                        }
                    };
                    if current.needs_authorization().is_some() {
                        world.check(&key, "final state", &Err(Error::AuthorizationRequired {
                            key: key.clone(),
                            reason: current.needs_authorization().unwrap().clone(),
                        }));
                        return;
                    }
                    // A caller's wait may end (its deadline) while a detached refresh or a
                    // peer's lease is still in the way: ask again, a few times.
                    // A flight of the schedule that holds the lease is not dropped at its
                    // deadline: it may still give up on a failure armed before the disarm, and
                    // that failure is cached for `failure_ttl` (the storm brake): wait it out.
                    let mut r = storage.force_refresh(&key, ISS, current.access_token()).await;
                    for _ in 0..3 {
                        match r {
                            Err(Error::Timeout { .. } | Error::LeaseWait { .. }) => {}
                            Err(Error::RefreshUnavailable { .. }) => {
                                world.clock.sleep(Duration::from_secs(3)).await;
                            }
                            _ => break,
                        }
                        r = storage.force_refresh(&key, ISS, current.access_token()).await;
                    }
                    match &r {
                        Ok(_) => world.check(&key, "final force_refresh", &r),
                        Err(Error::AuthorizationRequired { .. }) => {
                            world.check(&key, "final force_refresh", &r)
                        }
                        Err(e) => world.violation(format!(
                            "final force_refresh on {key} failed with every fault disarmed: {e}"
                        )),
                    }
                })
            })
            .collect();
        drive(&world, finals).await;
        // No rotated token lost: every slot still usable holds a refresh token the server
        // honours.
        for key in &world.keys {
            match world.storages[0].tokens(key).await {
                Ok(Some(set)) if set.needs_authorization().is_none() => {
                    let rt = set.refresh_token().map(|r| r.expose().to_owned()).unwrap_or_default();
                    if mode != Mode::TimesOut && !world.server.is_live(&rt) {
                        world.violation(format!(
                            "{key} holds a refresh token the server no longer honours: a rotated token was lost"
                        ));
                    }
                }
                Ok(Some(_)) => {}
                other => world.violation(format!("final state of {key}: {other:?}")),
            }
        }
        // Every refresh write replaced a version of its own family with a lower issue number,
        // and its hook reported exactly that write; a marker marks the very set it replaced.
        // What each version holds is decoded from the store's own log, so a write whose writer
        // never heard back is known as well as any other.
        let writes = recording.writes.lock().unwrap().clone();
        let mut issues = HashMap::new();
        for w in &writes {
            issues.insert(w.version, decode(w).await);
        }
        let logins = world.logins_issued.lock().unwrap().clone();
        let reported = reported.lock().unwrap().clone();
        let mut refreshes = 0;
        for (i, w) in writes.iter().enumerate() {
            let new = &issues[&w.version];
            if logins.contains(&new.issued) && !new.marker {
                continue;
            }
            let version = w.version;
            let expected = w.expected;
            let old = expected.and_then(|e| issues.get(&e));
            // A marker (in doubt, needs authorization), or an in-doubt intent taken back (the
            // same set, unmarked): marks or unmarks the very set it replaced.
            let unmarked = old.is_some_and(|o| o.marker && o.issued == new.issued);
            if new.marker || unmarked {
                if old.map(|o| &o.issued) != Some(&new.issued) {
                    world.violation(format!(
                        "marker {new:?} (v{version}) replaced {old:?} (v{expected:?})"
                    ));
                }
                continue;
            }
            if i < scheduled {
                refreshes += 1;
            }
            match old {
                Some(o)
                    if o.issued.family == new.issued.family
                        && o.issued.n < new.issued.n
                        && o.issued.key == new.issued.key => {}
                other => world.violation(format!(
                    "refresh {new:?} (v{version}) replaced {other:?} (v{expected:?})"
                )),
            }
            let hooked = reported.iter().filter(|r| r.1 == version).collect::<Vec<_>>();
            let exact = world.lost_replies.load(Ordering::SeqCst) == 0;
            let wrong = hooked.iter().any(|r| **r != (expected.unwrap_or_default(), version));
            if wrong || hooked.len() > 1 || (exact && w.replied && hooked.is_empty()) {
                world.violation(format!(
                    "refresh write v{version} over v{expected:?} was reported as {hooked:?}"
                ));
            }
        }
        for r in &reported {
            if !writes.iter().any(|w| (w.expected, w.version) == (Some(r.0), r.1)) {
                world.violation(format!(
                    "on_refresh reported v{} over v{}: no such write",
                    r.1, r.0
                ));
            }
        }
        let mut all = world.violations.lock().unwrap().clone();
        all.extend(violations.lock().unwrap().iter().cloned());
        let server = &world.server;
        prop_assert_eq!(
            server.replays_after_delivery(),
            0,
            "a refresh token whose answer was delivered was presented again; violations: {:?}",
            all
        );
        prop_assert!(
            server.reuse_detected() <= server.lost_answers(),
            "{} second presentations for {} lost answers; violations: {:?}",
            server.reuse_detected(),
            server.lost_answers(),
            all
        );
        prop_assert!(all.is_empty(), "violations: {:#?}", all);
        Ok(Seen {
            refreshes,
            lost_answers: server.lost_answers(),
            store_faults: world.tokens.injected() + world.leases.injected(),
        })
    })
}

fn tasks() -> impl Strategy<Value = Vec<Vec<Op>>> {
    prop::collection::vec(prop::collection::vec(op(), 1..14), 2..7)
}

/// The property over random cases (256 by default; `PROPTEST_CASES` overrides), half of them
/// against a server with a reuse grace window. Across the cases, refreshes must have happened
/// during the random schedules, and the faults must have fired: a property that never
/// refreshes, or never meets a fault, proves nothing.
#[test]
fn random_interleavings_keep_the_invariants() {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256);
    let config = Config {
        cases,
        max_shrink_iters: 200,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        source_file: Some(file!()),
        ..Config::default()
    };
    let seen: Mutex<Vec<Seen>> = Mutex::default();
    let mut runner = TestRunner::new(config);
    let result = runner.run(&(tasks(), any::<bool>()), |(tasks, grace)| {
        let seen_case = run_with(tasks, if grace { Mode::Grace } else { Mode::Strict })?;
        seen.lock().unwrap().push(seen_case);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let seen = seen.into_inner().unwrap();
    let with_refreshes = seen.iter().filter(|s| s.refreshes > 0).count();
    let with_lost = seen.iter().filter(|s| s.lost_answers > 0).count();
    let with_store_faults = seen.iter().filter(|s| s.store_faults > 0).count();
    eprintln!(
        "{} cases: {with_refreshes} with refreshes during the schedule, {with_lost} with lost answers, \
         {with_store_faults} with store faults",
        seen.len()
    );
    assert!(with_lost * 10 >= seen.len(), "only {with_lost} cases lost an answer");
    assert!(
        with_store_faults * 10 >= seen.len(),
        "only {with_store_faults} cases had store faults"
    );
    assert!(
        with_refreshes * 4 >= seen.len(),
        "only {with_refreshes} of {} cases refreshed during their schedule",
        seen.len()
    );
}

/// The property can fail: with a refresher whose every call times out, a schedule that lets
/// the tokens expire ends with slots that cannot be refreshed, and the property says so.
#[test]
fn a_refresher_that_always_times_out_fails_the_property() {
    let ops = vec![Op::Force { key: 0, stale: false }, Op::Advance(3600), Op::Get(0)];
    match run_with(vec![ops.clone(), ops], Mode::TimesOut) {
        Err(e) => assert!(e.to_string().contains("final force_refresh"), "{e}"),
        Ok(seen) => panic!("the property passed with a refresher that always times out: {seen:?}"),
    }
    let runner_result =
        TestRunner::new(Config { cases: 16, failure_persistence: None, ..Config::default() })
            .run(&tasks(), |tasks| run_with(tasks, Mode::TimesOut).map(drop));
    assert!(
        matches!(runner_result, Err(TestError::Fail(..))),
        "random cases with a refresher that always times out passed: {runner_result:?}"
    );
}

/// The minimal input proptest shrank a CI failure to (a refresh's hook reported a login's
/// tokens as its result; see the two scenarios below). With the yield after each write in
/// [`Recording`] it failed in most runs before the fix; it is run several times because the
/// tasks still race on two worker threads.
#[test]
fn the_shrunk_ci_failure_keeps_the_invariants() {
    use Op::*;
    let f = |key, stale| Force { key, stale };
    let c = |key, force, polls| Cancel { key, force, polls };
    let tasks = vec![
        vec![
            c(0, false, 2),
            f(2, true),
            Get(2),
            f(2, true),
            f(2, false),
            f(1, false),
            f(2, false),
            Get(2),
            Get(0),
            c(2, true, 1),
            FailNext,
            Advance(4),
        ],
        vec![
            Get(1),
            FailNext,
            Get(1),
            Advance(3589),
            Yield,
            Advance(2),
            Get(2),
            FailNext,
            f(2, false),
            f(1, true),
            Advance(1),
            c(2, true, 1),
        ],
        vec![Get(1), Get(0)],
        vec![Yield, f(2, false)],
        vec![Login(1)],
        vec![
            FailNext,
            Advance(0),
            Yield,
            c(0, false, 2),
            f(2, true),
            Advance(57),
            f(0, true),
            f(2, false),
            Login(2),
        ],
        vec![
            Get(0),
            FailNext,
            c(1, true, 1),
            Yield,
            c(0, true, 2),
            Advance(1),
            Advance(66),
            Login(2),
            Get(1),
        ],
    ];
    for round in 0..20 {
        if let Err(e) = run(tasks.clone()) {
            panic!("round {round}: {e}");
        }
    }
}

/// What the `on_refresh` hook reported: (old version, old issue, new version, new issue).
type Reports = Arc<Mutex<Vec<(u64, Issued, u64, Issued)>>>;

fn held_fixture() -> (TokenStorage, Arc<Recording>, Arc<FakeAuthServer>, Reports) {
    let clock = ManualClock::default();
    let server = FakeAuthServer::new(clock.shared());
    let recording = Arc::new(Recording::default());
    let reports: Reports = Arc::default();
    let storage = TokenStorage::builder(
        SharedTokenStore::from_arc(recording.clone()),
        keyring(),
        server.clone(),
    )
    .clock(clock.shared())
    .config(config())
    .on_refresh({
        let reports = reports.clone();
        move |_, old, new| {
            let parse = |s: &token_storage::TokenSet| {
                FakeAuthServer::parse(s.access_token().expose()).unwrap()
            };
            reports.lock().unwrap().push((old.version(), parse(old), new.version(), parse(new)));
        }
    })
    .build();
    (storage, recording, server, reports)
}

fn issued(set: &token_storage::TokenSet) -> Issued {
    FakeAuthServer::parse(set.access_token().expose()).unwrap()
}

/// Race (the CI failure): a refresh's compare-and-swap lands, and before its reply comes back
/// an interactive login replaces the refreshed tokens and puts its own set in the in-memory
/// view. The refresh must still report the set *it* wrote (same grant family, later issue, the
/// version it created) to the hook and its caller, not the login's set it finds in the view;
/// and the view keeps the login's newer set.
#[tokio::test]
async fn a_login_between_a_refresh_write_and_its_reply_is_not_reported_as_the_refresh() {
    let (storage, recording, server, reports) = held_fixture();
    let key = key();
    let first = storage.store(&key, ISS, server.issue(&key)).await.unwrap();
    // The refresh writes its in-doubt intent, then its result: hold the result's reply.
    recording.hold_nth(2);
    let refresh = tokio::spawn({
        let (storage, key, rejected) = (storage.clone(), key.clone(), first.access_token().clone());
        async move { storage.force_refresh(&key, ISS, &rejected).await }
    });
    recording.landed().await;
    let refreshed_version = recording.writes.lock().unwrap().last().unwrap().version;
    let login = storage.store(&key, ISS, server.issue(&key)).await.unwrap();
    assert!(login.version() > refreshed_version);
    recording.release();
    let refreshed = refresh.await.unwrap().unwrap();

    let reports = reports.lock().unwrap().clone();
    assert_eq!(reports.len(), 1, "one refresh, one report: {reports:?}");
    let (old_version, old, new_version, new) = reports[0].clone();
    assert_eq!(old, issued(&first), "the refresh replaced its own intent on the first set");
    assert!(old_version > first.version());
    assert_eq!(
        new_version, refreshed_version,
        "the hook reported a version the refresh did not write"
    );
    assert_eq!(new.family, issued(&first).family, "the hook reported another grant as the refresh");
    assert!(new.n > issued(&first).n);
    assert_eq!((refreshed.version(), issued(&refreshed)), (new_version, new));
    // Nothing newer was overwritten: the login's set is stored and served.
    assert_eq!(storage.tokens(&key).await.unwrap().unwrap().version(), login.version());
    let served = storage.get_valid(&key, ISS).await.unwrap();
    assert_eq!((served.version(), issued(&served)), (login.version(), issued(&login)));
    assert_eq!(server.reuse_detected(), 0);
}

/// Race, the other way round: a login's compare-and-swap lands, and before its reply comes back
/// a refresh redeems the login's refresh token and commits. `store` must return the set the
/// login wrote, not the refresh's set it finds in the view.
#[tokio::test]
async fn a_refresh_between_a_login_write_and_its_reply_is_not_returned_as_the_login() {
    let (storage, recording, server, reports) = held_fixture();
    let key = key();
    storage.store(&key, ISS, server.issue(&key)).await.unwrap();
    let response = server.issue(&key);
    let login_token = response.access_token.clone();
    recording.hold_next();
    let login = tokio::spawn({
        let (storage, key) = (storage.clone(), key.clone());
        async move { storage.store(&key, ISS, response).await }
    });
    recording.landed().await;
    let login_version = recording.writes.lock().unwrap().last().unwrap().version;
    let refreshed = storage.force_refresh(&key, ISS, &login_token).await.unwrap();
    assert!(refreshed.version() > login_version);
    recording.release();
    let login = login.await.unwrap().unwrap();

    assert_eq!(login.version(), login_version, "store returned a version it did not write");
    assert_eq!(login.access_token(), &login_token, "store returned tokens it did not store");
    let reports = reports.lock().unwrap().clone();
    assert_eq!(reports.len(), 1, "{reports:?}");
    // It replaced its own in-doubt intent on the login's set.
    assert!(reports[0].0 > login_version, "{reports:?}");
    assert_eq!(reports[0].1, FakeAuthServer::parse(login_token.expose()).unwrap());
    assert_eq!(reports[0].2, refreshed.version());
    // The view keeps the refresh's newer set.
    let served = storage.get_valid(&key, ISS).await.unwrap();
    assert_eq!(served.version(), refreshed.version());
    assert_eq!(server.reuse_detected(), 0);
}

/// The second CI failure (a regression case of the file above, failing again in about 2 runs of
/// 100 on two worker threads): several token-store faults armed at once failed every try of an
/// in-doubt intent, one of which had been applied with its reply lost, and a claimed retry left
/// unsent that way read as a rotation lost in flight. `faults.rs` pins the race itself
/// (`an_intent_applied_with_its_reply_lost_on_the_last_try_is_not_left_unsent`); the case is run
/// 50 times here (13 failures in 650 runs before the fix, 0 in 600 after).
#[test]
fn the_second_ci_failure_keeps_the_invariants() {
    use Op::*;
    let f = |key, stale| Force { key, stale };
    let c = |key, force, polls| Cancel { key, force, polls };
    let tasks = vec![
        vec![Yield, f(0, false), Get(0), f(1, true), FailWrite, Get(0), f(1, true), f(1, true)],
        vec![f(2, true), FailWrite, LoseWriteReply, f(1, false)],
        vec![c(2, true, 0), Login(1), FailWrite, f(0, true), FailWrite, f(1, false)],
        vec![f(1, true), c(2, false, 2), c(1, false, 2), FailWrite, Get(0)],
        vec![
            Get(1),
            f(2, false),
            LoseWriteReply,
            FailWrite,
            Get(1),
            Get(0),
            Get(1),
            FailWrite,
            f(2, false),
            Get(0),
            FailWrite,
            LoseWriteReply,
        ],
        vec![Yield, f(1, true), f(2, true), Advance(69), LoseAnswer, LoseAnswer, FailWrite, Get(2)],
    ];
    for round in 0..50 {
        if let Err(e) = run(tasks.clone()) {
            panic!("round {round}: {e}");
        }
    }
}
