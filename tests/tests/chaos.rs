//! Issue 12's chaos run: three processes sharing one Redis refresh one rotating refresh token
//! round after round against the fixture authorization server (strict rotation and reuse
//! detection, no grace), while a fault picked at random strikes each round: an answer lost
//! after the server rotated, a late answer, a store write that fails, a store write applied
//! whose reply is lost, the lease holder SIGKILLed with its request out, redis-server
//! restarted. It counts what the issue asks: calls that succeeded, refresh tokens presented
//! twice (each must be an in-doubt retry), tokens lost by the client (0), re-authorizations
//! (each explained by a lost answer or a killed holder under strict reuse detection).
//!
//! `CHAOS_ROUNDS` (default 24, what CI runs) and `CHAOS_SEED` (default 12) set the run; the
//! figure in BENCHMARKS.md is `CHAOS_ROUNDS=200 cargo test -p integration-tests --test chaos`.
//! The children are this binary re-executed (`harness = false`, as `fleet.rs`).

#[path = "../../crates/token-storage/tests/it/common/child_harness.rs"]
mod child_harness;
mod support;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mcp_clock::{Clock as _, SystemClock};
use support::{Fleet, HttpRefresher, Never, Proc, env, fleet_storage, fleet_storage_over, key};
use token_storage::testkit::FaultyTokenStore;
use token_storage::{
    Error, RedisTokenStore, RefreshError, RefreshRequest, Refresher, SharedClock, SharedTokenStore,
    TokenKey, TokenResponse,
};

const PROCESSES: usize = 3;
const ROUND_LIMIT: Duration = Duration::from_secs(40);

fn main() -> std::process::ExitCode {
    if std::env::var("FLEET_ROLE").is_ok() {
        child_harness::block_on(chaos_child());
        return std::process::ExitCode::SUCCESS;
    }
    child_harness::run(&[child_harness::Test {
        name: "random_faults_round_after_round_keep_the_refresh_promises",
        run: || child_harness::block_on(random_faults_round_after_round_keep_the_refresh_promises()),
    }])
}

/// The fault of one round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    None,
    /// The server rotates, then its answer is lost (a 502 without tokens).
    LostAnswer,
    /// The server rotates, then answers 300 ms later.
    LateAnswer,
    /// One process's next store write fails without being applied.
    WriteFails,
    /// One process's next store write is applied, then its reply is lost.
    WriteReplyLost,
    /// The holder's commit of the server's answer fails without being applied.
    CommitFails,
    /// The holder's commit is applied, then its reply is lost.
    CommitReplyLost,
    /// The process whose request is out is SIGKILLed (the server acts, its answer is never read).
    KillHolder,
    /// redis-server stops and starts again (append-only file) before the round.
    RedisRestart,
}

const FAULTS: [Fault; 9] = [
    Fault::None,
    Fault::LostAnswer,
    Fault::LateAnswer,
    Fault::WriteFails,
    Fault::WriteReplyLost,
    Fault::CommitFails,
    Fault::CommitReplyLost,
    Fault::KillHolder,
    Fault::RedisRestart,
];

/// xorshift64*: the run is reproducible from its seed (the faults, not the timing).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n as u64).unwrap()
    }
}

fn number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// How one process's call of a round ended.
#[derive(Debug)]
enum Ended {
    Ok,
    Reauthorize(String),
    Failed(String),
    Killed,
}

#[derive(Debug, Default)]
struct Tally {
    calls: u64,
    ok: u64,
    failed: Vec<String>,
    reauthorizations: u64,
    unexplained_reauthorizations: Vec<String>,
    killed: u64,
    by_fault: BTreeMap<String, u64>,
}

/// The race: every round, three processes present the same rotating refresh token at once
/// while one fault strikes. The promises: no refresh token presented more than twice and the
/// second time only as the in-doubt retry of a request whose answer never arrived (a lost
/// answer, a killed holder); no rotated token lost by the client, so the server never sees an
/// old token again except in such a retry; a re-authorization only where the server rotated and
/// the answer was lost (strict reuse detection refuses the retry). Any other failure of a call
/// is counted and must be a typed transient error that the next round recovers from.
async fn random_faults_round_after_round_keep_the_refresh_promises() {
    let rounds = number("CHAOS_ROUNDS", 24);
    let seed = number("CHAOS_SEED", 12).max(1);
    let Some(mut fleet) = Fleet::start_with("chaos", true).await else { return };
    let vars = fleet.vars();
    let spawn = || {
        let p = Proc::spawn("chaos", &vars);
        p.expect("READY", Duration::from_secs(20));
        p
    };
    let mut procs: Vec<Proc> = (0..PROCESSES).map(|_| spawn()).collect();
    let parent = fleet_storage(&fleet.redis.url(), &fleet.prefix, Arc::new(Never)).await;
    let knobs = fleet.auth.knobs();
    let mut rng = Rng(seed);
    let mut tally = Tally::default();
    let started = SystemClock::instant();
    for round in 0..rounds {
        let fault = FAULTS[rng.below(FAULTS.len())];
        *tally.by_fault.entry(format!("{fault:?}")).or_default() += 1;
        knobs.set_refresh_delay(Duration::ZERO);
        let target = rng.below(PROCESSES);
        let mut orders = vec![String::new(); PROCESSES];
        match fault {
            Fault::None => {}
            Fault::LostAnswer => knobs.lose_refresh_answers(1),
            Fault::LateAnswer => knobs.set_refresh_delay(Duration::from_millis(300)),
            Fault::WriteFails => orders[target] = " fail-write".into(),
            Fault::WriteReplyLost => orders[target] = " lose-reply".into(),
            // Only the holder gets an answer: every process arms it.
            Fault::CommitFails => orders.fill(" fail-commit".into()),
            Fault::CommitReplyLost => orders.fill(" lose-commit-reply".into()),
            // Long enough that the holder is surely killed before its answer arrives.
            Fault::KillHolder => knobs.set_refresh_delay(Duration::from_secs(2)),
            Fault::RedisRestart => {
                fleet.redis.stop();
                SystemClock.sleep(Duration::from_millis(200)).await;
                fleet.redis.restart();
            }
        }
        for (p, order) in procs.iter_mut().zip(&orders) {
            let stdin = p.stdin.as_mut().unwrap();
            writeln!(stdin, "round {round}{order}").unwrap();
            stdin.flush().unwrap();
        }
        let ended = collect_round(&mut procs, round, fault == Fault::KillHolder, &spawn);
        let mut reauthorize = false;
        for e in &ended {
            tally.calls += 1;
            match e {
                Ended::Ok => tally.ok += 1,
                Ended::Killed => tally.killed += 1,
                Ended::Reauthorize(reason) => {
                    reauthorize = true;
                    if !matches!(fault, Fault::LostAnswer | Fault::KillHolder) {
                        tally
                            .unexplained_reauthorizations
                            .push(format!("round {round} ({fault:?}): {reason}"));
                    }
                }
                Ended::Failed(e) => tally.failed.push(format!("round {round} ({fault:?}): {e}")),
            }
        }
        if reauthorize {
            // The user logs in again: a new grant family.
            tally.reauthorizations += 1;
            let issued = fleet.auth.issue_tokens(&fleet.client_id, "mcp:tools", None);
            let fresh = TokenResponse::bearer(issued.access_token())
                .expires_in(Duration::from_secs(3600))
                .refresh_token(issued.refresh_token().unwrap());
            let mut outages = 0;
            loop {
                match parent.store(&key(), fleet.auth.issuer(), fresh.clone()).await {
                    Ok(_) => break,
                    // Its connection may not have been used since a restart.
                    Err(Error::StoreUnavailable { .. }) if outages < 100 => outages += 1,
                    Err(e) => panic!("storing the new login: {e}"),
                }
                SystemClock.sleep(Duration::from_millis(20)).await;
            }
        }
    }
    let elapsed = SystemClock::instant().saturating_duration_since(started);
    let stats = fleet.auth.stats();
    let twice = stats.refresh_redemptions.values().filter(|&&n| n == 2).count();
    let in_doubt_rounds = tally.by_fault.get("LostAnswer").copied().unwrap_or(0)
        + tally.by_fault.get("KillHolder").copied().unwrap_or(0);
    println!(
        "chaos: {rounds} rounds (seed {seed}) in {:.0?}: calls {} ok {} failed {} killed {}, \
         refresh requests {}, refresh tokens presented twice {twice} (rounds in doubt \
         {in_doubt_rounds}), reuse detections {}, re-authorizations {} (unexplained {}), \
         faults {:?}",
        elapsed,
        tally.calls,
        tally.ok,
        tally.failed.len(),
        tally.killed,
        stats.refresh_token_requests,
        stats.reuse_detections,
        tally.reauthorizations,
        tally.unexplained_reauthorizations.len(),
        tally.by_fault,
    );
    for f in &tally.failed {
        println!("chaos: failed call: {f}");
    }
    assert!(stats.max_refresh_redemptions() <= 2, "a refresh token presented 3 times: {stats:?}");
    assert!(
        twice as u64 <= in_doubt_rounds,
        "{twice} tokens presented twice, but only {in_doubt_rounds} rounds left one in doubt"
    );
    assert!(
        stats.reuse_detections <= in_doubt_rounds,
        "reuse detected outside an in-doubt retry (a rotated token was lost): {stats:?}"
    );
    assert!(
        tally.unexplained_reauthorizations.is_empty(),
        "re-authorizations without a lost answer: {:?}",
        tally.unexplained_reauthorizations
    );
    // A call may fail with a typed transient error (a store write that keeps failing, Redis
    // restarting); never more than one in a round's worth, and the next round recovers.
    assert!(tally.failed.len() as u64 <= rounds / 4, "too many failed calls: {:?}", tally.failed);
    for p in procs {
        drop(p);
    }
}

/// Every live process's end of `round`. In a round that kills the holder, the first process to
/// announce a request (`SENT`) is SIGKILLed and replaced.
fn collect_round(
    procs: &mut [Proc],
    round: u64,
    kill: bool,
    spawn: &dyn Fn() -> Proc,
) -> Vec<Ended> {
    let mut ended: Vec<Option<Ended>> = (0..procs.len()).map(|_| None).collect();
    let mut to_kill = kill;
    let deadline = SystemClock::instant() + ROUND_LIMIT;
    let prefix = format!("RESULT {round} ");
    while ended.iter().any(Option::is_none) {
        assert!(SystemClock::instant() < deadline, "round {round} did not end: {ended:?}");
        for i in 0..procs.len() {
            if ended[i].is_some() {
                continue;
            }
            while let Ok(line) = procs[i].lines.try_recv() {
                if to_kill && line.contains("SENT") {
                    to_kill = false;
                    procs[i] = spawn(); // Drops (SIGKILLs and reaps) the holder.
                    ended[i] = Some(Ended::Killed);
                    break;
                }
                if let Some(rest) = line.find(&prefix).map(|at| &line[at + prefix.len()..]) {
                    ended[i] = Some(match rest.split_once(' ') {
                        None if rest == "ok" => Ended::Ok,
                        Some(("reauth", reason)) => Ended::Reauthorize(reason.to_owned()),
                        _ => Ended::Failed(rest.to_owned()),
                    });
                    break;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    ended.into_iter().map(Option::unwrap).collect()
}

/// A chaos process: on `round N [fault]`, arm the fault on its store, read the stored tokens
/// and refresh them as if the server had refused the access token; print `RESULT N ok`,
/// `RESULT N reauth <reason>` or `RESULT N error <error>`. Store outages (Redis restarting)
/// are retried a bounded number of times.
async fn chaos_child() {
    let redis = env("FLEET_REDIS");
    let prefix = env("FLEET_PREFIX");
    let issuer = env("FLEET_ISSUER");
    let store = RedisTokenStore::builder(&redis).prefix(&prefix).connect().await.unwrap();
    let faulty = FaultyTokenStore::new(SharedTokenStore::new(store), SharedClock::system());
    let refresher = Arc::new(CommitFaults {
        http: HttpRefresher {
            http: reqwest::Client::new(),
            token_endpoint: env("FLEET_TOKEN_ENDPOINT"),
            client_id: env("FLEET_CLIENT_ID"),
            announce: true,
        },
        store: faulty.clone(),
        armed: Mutex::new(ArmedCommit::No),
    });
    let storage = fleet_storage_over(
        SharedTokenStore::from_arc(faulty.clone()),
        &redis,
        &prefix,
        refresher.clone(),
    )
    .await;
    println!("READY");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    while let Some(line) = rx.recv().await {
        let mut words = line.split(' ');
        let (Some("round"), Some(round)) = (words.next(), words.next()) else { continue };
        match words.next() {
            Some("fail-write") => faulty.fail_next_write(),
            Some("lose-reply") => faulty.lose_next_write_reply(),
            Some("fail-commit") => refresher.arm(ArmedCommit::Fail),
            Some("lose-commit-reply") => refresher.arm(ArmedCommit::LoseReply),
            _ => {}
        }
        let mut outages = 0;
        let ended = loop {
            let outcome = match storage.tokens(&key()).await {
                Ok(Some(stored)) => {
                    storage.force_refresh(&key(), &issuer, stored.access_token()).await
                }
                Ok(None) => break "error no tokens stored".to_owned(),
                Err(e) => Err(e),
            };
            match outcome {
                Ok(_) => break "ok".to_owned(),
                Err(Error::AuthorizationRequired { reason, .. }) => {
                    break format!("reauth {reason}");
                }
                Err(Error::StoreUnavailable { .. }) if outages < 100 => {
                    outages += 1;
                    SystemClock.sleep(Duration::from_millis(20)).await;
                }
                Err(e) => break format!("error {e}"),
            }
        };
        faulty.disarm();
        refresher.arm(ArmedCommit::No);
        println!("RESULT {round} {ended}");
    }
}

/// The fault armed on the commit of the next answer.
#[derive(Debug, Clone, Copy)]
enum ArmedCommit {
    No,
    Fail,
    LoseReply,
}

/// The refresh grant over HTTP that, when an answer arrives, arms the armed fault on the store:
/// the next write after an answer is its commit.
#[derive(Debug)]
struct CommitFaults {
    http: HttpRefresher,
    store: Arc<FaultyTokenStore>,
    armed: Mutex<ArmedCommit>,
}

impl CommitFaults {
    fn arm(&self, fault: ArmedCommit) {
        *self.armed.lock().unwrap() = fault;
    }
}

#[async_trait::async_trait]
impl Refresher for CommitFaults {
    async fn refresh(
        &self,
        key: &TokenKey,
        request: &RefreshRequest,
    ) -> Result<TokenResponse, RefreshError> {
        let answer = self.http.refresh(key, request).await;
        if answer.is_ok() {
            match std::mem::replace(&mut *self.armed.lock().unwrap(), ArmedCommit::No) {
                ArmedCommit::No => {}
                ArmedCommit::Fail => self.store.fail_next_write(),
                ArmedCommit::LoseReply => self.store.lose_next_write_reply(),
            }
        }
        answer
    }
}
