//! Property test: random interleavings of get-valid, force-refresh, interactive logins, caller
//! cancellation and clock advances across many tasks and three keys in two tenants, against a
//! fake authorization server with strict rotation and reuse detection (a refresh token presented
//! twice revokes its family).
//!
//! Invariants:
//! - no refresh token is ever redeemed twice (the server detects no reuse);
//! - a refresh result only ever replaces the set it was derived from (same grant family, later
//!   issue): a newer token is never overwritten by an older one. Checked independently of the
//!   service: a recording store logs which version each write replaced, and the family of every
//!   version is known from the login that stored it or the refresh hook that reported it;
//! - no caller receives another key's (tenant's, user's) token;
//! - no caller is told to re-authorize while a valid refresh token exists (in this model one
//!   always does: the server never revokes except on reuse).

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use proptest::prelude::*;
use token_storage::testkit::FakeAuthServer;
use token_storage::testkit::Issued;
use token_storage::{
    BoxFuture, Error, ManualClock, MemoryTokenStore, RefreshError, Secret, SharedTokenStore, Swap,
    TokenKey, TokenStorage, TokenStore, TransientKind, Versioned,
};

/// A memory store that logs every successful write as (expected version, new version).
#[derive(Debug, Default)]
struct Recording {
    inner: MemoryTokenStore,
    writes: Mutex<Vec<(Option<u64>, u64)>>,
}

impl TokenStore for Recording {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Versioned>, Error>> {
        self.inner.get(key)
    }
    fn compare_and_swap<'a>(
        &'a self,
        key: &'a str,
        expected: Option<u64>,
        value: Vec<u8>,
    ) -> BoxFuture<'a, Result<Swap, Error>> {
        Box::pin(async move {
            let r = self.inner.compare_and_swap(key, expected, value).await?;
            if let Swap::Swapped { version } = r {
                self.writes.lock().unwrap().push((expected, version));
            }
            Ok(r)
        })
    }
    fn delete<'a>(
        &'a self,
        key: &'a str,
        expected: Option<u64>,
    ) -> BoxFuture<'a, Result<bool, Error>> {
        self.inner.delete(key, expected)
    }
    fn keys_with_prefix<'a>(
        &'a self,
        prefix: &'a str,
    ) -> BoxFuture<'a, Result<Vec<String>, Error>> {
        self.inner.keys_with_prefix(prefix)
    }
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
    FailNext,
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
    storage: TokenStorage,
    server: Arc<FakeAuthServer>,
    clock: ManualClock,
    keys: [TokenKey; 3],
    logins: [tokio::sync::Mutex<()>; 3],
    violations: Mutex<Vec<String>>,
    /// The grant family and issue of every stored version, from logins and refreshes.
    stored: Arc<Mutex<HashMap<u64, (Issued, bool)>>>,
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
            Err(Error::AuthorizationRequired { reason, .. }) => self.violation(format!(
                "{what} on {key} was told to re-authorize ({reason}) while a valid refresh token exists"
            )),
            Err(Error::RefreshUnavailable { .. } | Error::Timeout { .. }) => {}
            Err(other) => self.violation(format!("{what} on {key}: unexpected {other:?}")),
        }
    }

    async fn login(&self, i: usize) {
        // Logins for one key are serialized with their issue, so a later issue is a later store.
        let _serial = self.logins[i].lock().await;
        let response = self.server.issue(&self.keys[i]);
        match self.storage.store(&self.keys[i], ISS, response).await {
            Ok(set) => {
                let issued = FakeAuthServer::parse(set.access_token().expose()).unwrap();
                self.stored.lock().unwrap().insert(set.version(), (issued, false));
            }
            Err(e) => self.violation(format!("login on {}: {e:?}", self.keys[i])),
        }
    }
}

async fn run_task(world: Arc<World>, ops: Vec<Op>) {
    let mut seen: HashMap<usize, Secret> = HashMap::new();
    for op in ops {
        match op {
            Op::Get(i) => {
                let r = world.storage.get_valid(&world.keys[i], ISS).await;
                world.check(&world.keys[i], "get_valid", &r);
                if let Ok(set) = r {
                    seen.entry(i).or_insert_with(|| set.access_token().clone());
                }
            }
            Op::Force { key: i, stale } => {
                let rejected = match (stale, seen.get(&i)) {
                    (true, Some(s)) => s.clone(),
                    _ => match world.storage.tokens(&world.keys[i]).await {
                        Ok(Some(set)) => set.access_token().clone(),
                        other => {
                            world.violation(format!("tokens on {}: {other:?}", world.keys[i]));
                            continue;
                        }
                    },
                };
                let r = world.storage.force_refresh(&world.keys[i], ISS, &rejected).await;
                world.check(&world.keys[i], "force_refresh", &r);
                if let Ok(set) = r {
                    seen.insert(i, set.access_token().clone());
                }
            }
            Op::Login(i) => world.login(i).await,
            Op::Cancel { key: i, force, polls } => {
                let (storage, key) = (world.storage.clone(), world.keys[i].clone());
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
        tokio::time::sleep(Duration::from_millis(1)).await;
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

fn run(tasks: Vec<Vec<Op>>) -> Result<(), TestCaseError> {
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let clock = ManualClock::default();
        let server = FakeAuthServer::new(clock.shared());
        let mut config = config();
        config.refresh_buffer = Duration::from_secs(60);
        config.refresh_jitter = Duration::from_secs(30);
        config.caller_deadline = Some(Duration::from_secs(20));
        config.max_attempts = 2;
        config.backoff_base = Duration::from_secs(1);
        config.failure_ttl = Duration::from_secs(2);
        config.storm_limit = u32::MAX;
        let violations = Arc::new(Mutex::new(Vec::new()));
        let stored: Arc<Mutex<HashMap<u64, (Issued, bool)>>> = Arc::default();
        let recording = Arc::new(Recording::default());
        let storage = TokenStorage::builder(
            SharedTokenStore::from_arc(recording.clone()),
            keyring(),
            server.clone(),
        )
        .clock(clock.shared())
        .config(config)
        .on_refresh({
            let violations = violations.clone();
            let stored = stored.clone();
            move |key, old, new| {
                let issued = FakeAuthServer::parse(new.access_token().expose()).unwrap();
                stored.lock().unwrap().insert(new.version(), (issued, true));
                let (o, n) = (
                    FakeAuthServer::parse(old.access_token().expose()).unwrap(),
                    FakeAuthServer::parse(new.access_token().expose()).unwrap(),
                );
                if o.family != n.family || n.n <= o.n || o.key != key.to_string() || n.key != o.key
                {
                    violations
                        .lock()
                        .unwrap()
                        .push(format!("refresh on {key} replaced {o:?} with {n:?}"));
                }
            }
        })
        .build();
        let world = Arc::new(World {
            storage,
            server,
            clock,
            keys: keys(),
            logins: Default::default(),
            violations: Mutex::new(Vec::new()),
            stored: stored.clone(),
        });
        for i in 0..3 {
            world.login(i).await;
        }
        let handles: Vec<_> =
            tasks.into_iter().map(|ops| tokio::spawn(run_task(world.clone(), ops))).collect();
        drive(&world, handles).await;
        // Let detached refreshes settle, then every key still works.
        let finals: Vec<_> = (0..3)
            .map(|i| {
                let world = world.clone();
                tokio::spawn(async move {
                    let key = world.keys[i].clone();
                    world.clock.advance(Duration::from_secs(5));
                    let r = world.storage.get_valid(&key, ISS).await;
                    world.check(&key, "final get_valid", &r);
                })
            })
            .collect();
        drive(&world, finals).await;
        // Every refresh write replaced a version of its own family with a lower issue number.
        let stored = stored.lock().unwrap().clone();
        let mut refreshes = 0;
        for (expected, version) in recording.writes.lock().unwrap().iter() {
            let Some((new, true)) = stored.get(version) else { continue };
            refreshes += 1;
            match expected.and_then(|e| stored.get(&e)) {
                Some((old, _))
                    if old.family == new.family && old.n < new.n && old.key == new.key => {}
                other => world.violation(format!(
                    "refresh {new:?} (v{version}) replaced {other:?} (v{expected:?})"
                )),
            }
        }
        REFRESHES.fetch_add(refreshes, std::sync::atomic::Ordering::Relaxed);
        let mut all = world.violations.lock().unwrap().clone();
        all.extend(violations.lock().unwrap().iter().cloned());
        let reuse = world.server.reuse_detected();
        prop_assert_eq!(reuse, 0, "a refresh token was redeemed twice; violations: {:?}", all);
        prop_assert!(all.is_empty(), "violations: {:#?}", all);
        Ok(())
    })
}

/// Refresh writes seen across all cases, to show the property exercised refreshes at all.
static REFRESHES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, max_shrink_iters: 200, ..ProptestConfig::default() })]

    #[test]
    fn random_interleavings_keep_the_invariants(
        tasks in prop::collection::vec(prop::collection::vec(op(), 1..16), 2..8)
    ) {
        run(tasks)?;
    }
}

#[test]
fn the_property_exercises_refreshes() {
    // A fixed schedule: two tasks racing 401s and expiry on one key.
    let ops = vec![
        Op::Force { key: 0, stale: false },
        Op::Advance(3600),
        Op::Get(0),
        Op::Force { key: 0, stale: true },
    ];
    let before = REFRESHES.load(std::sync::atomic::Ordering::Relaxed);
    run(vec![ops.clone(), ops]).unwrap();
    assert!(REFRESHES.load(std::sync::atomic::Ordering::Relaxed) > before);
}
