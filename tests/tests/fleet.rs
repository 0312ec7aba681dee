//! A fleet of real OS processes sharing one Redis: token-storage over `RedisTokenStore` with a
//! `RefreshLease` over flow-state's `RedisStore`, refreshing against the fixture authorization
//! server with strict rotation and reuse detection; and a flow-state flow that one process waits
//! on and another completes.
//!
//! The test binary re-executes itself as the children (`fleet_child`, which does nothing unless
//! `FLEET_ROLE` is set). Every wait is bounded.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use flow_state::testkit::RedisServer;
use flow_state::{FlowKey, FlowManager, RedisStore, SharedStore};
use mcp_clock::{Clock, SystemClock};
use mcp_fixtures::{AuthServer, AuthServerHandle, ClientAuth, ClientSpec, InjectedFailure};
use token_storage::{
    BoxFuture, EncryptionKey, Error, Keyring, RedisTokenStore, RefreshError, RefreshLease,
    RefreshRequest, Refresher, SharedClock, SharedTokenStore, TerminalCode, TokenKey,
    TokenResponse, TokenStorage, TokenStorageConfig, TransientKind,
};

const LEASE_TTL: Duration = Duration::from_millis(900);
const WAIT: Duration = Duration::from_secs(20);

/// The refresh grant over raw HTTP (public client, `client_id` in the form).
#[derive(Debug)]
struct HttpRefresher {
    http: reqwest::Client,
    token_endpoint: String,
    client_id: String,
}

impl Refresher for HttpRefresher {
    fn refresh<'a>(
        &'a self,
        _: &'a TokenKey,
        r: &'a RefreshRequest,
    ) -> BoxFuture<'a, Result<TokenResponse, RefreshError>> {
        Box::pin(async move {
            let network =
                |e: reqwest::Error| RefreshError::transient(TransientKind::Network, e.to_string());
            let resp = self
                .http
                .post(&self.token_endpoint)
                .form(&[
                    ("grant_type", "refresh_token"),
                    ("refresh_token", r.refresh_token.expose()),
                    ("client_id", &self.client_id),
                ])
                .send()
                .await
                .map_err(network)?;
            let status = resp.status();
            let body: serde_json::Value = resp.json().await.unwrap_or_default();
            if status.is_success() {
                let mut t =
                    TokenResponse::bearer(body["access_token"].as_str().unwrap_or_default());
                if let Some(e) = body["expires_in"].as_u64() {
                    t = t.expires_in(Duration::from_secs(e));
                }
                if let Some(rt) = body["refresh_token"].as_str() {
                    t = t.refresh_token(rt);
                }
                Ok(t)
            } else if body["error"] == "invalid_grant" {
                let description = body["error_description"].as_str().map(str::to_owned);
                Err(RefreshError::terminal(TerminalCode::InvalidGrant, description))
            } else {
                Err(RefreshError::transient(
                    TransientKind::ServerError(status.as_u16()),
                    format!("token endpoint answered {status}"),
                ))
            }
        })
    }
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is set for fleet children"))
}

fn key() -> TokenKey {
    TokenKey::new("acme", "alice", "fixture")
}

fn keyring() -> Arc<Keyring> {
    Arc::new(Keyring::new("k1", EncryptionKey::from_bytes([9; 32])).unwrap())
}

/// The storage every process of the fleet builds: Redis tokens, a Redis lease.
async fn fleet_storage(redis: &str, prefix: &str, refresher: Arc<dyn Refresher>) -> TokenStorage {
    let store = RedisTokenStore::builder(redis).prefix(prefix).connect().await.unwrap();
    let flows =
        RedisStore::builder(redis).prefix(format!("{prefix}-leases")).connect().await.unwrap();
    let mut config = TokenStorageConfig::default();
    config.refresh_jitter = Duration::ZERO;
    TokenStorage::builder(SharedTokenStore::new(store), keyring(), refresher)
        .lease(
            RefreshLease::store(SharedStore::new(flows), SharedClock::system())
                .ttl(LEASE_TTL)
                .wait(WAIT),
        )
        .config(config)
        .build()
}

/// Not a test on its own: the child processes of the fleet tests.
#[test]
fn fleet_child() {
    let Ok(role) = std::env::var("FLEET_ROLE") else { return };
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async move {
        let redis = env("FLEET_REDIS");
        let prefix = env("FLEET_PREFIX");
        if role == "complete" {
            let store = RedisStore::builder(&redis).prefix(&prefix).connect().await.unwrap();
            let flows = FlowManager::builder(SharedStore::new(store)).build().unwrap();
            let key =
                FlowKey::new("mcp_oauth", "alice:fixture").unwrap().with_tenant("acme").unwrap();
            flows.complete(&key, &"code-from-the-callback").await.unwrap();
            println!("COMPLETED");
            return;
        }
        let refresher = Arc::new(HttpRefresher {
            http: reqwest::Client::new(),
            token_endpoint: env("FLEET_TOKEN_ENDPOINT"),
            client_id: env("FLEET_CLIENT_ID"),
        });
        let issuer = env("FLEET_ISSUER");
        let storage = fleet_storage(&redis, &prefix, refresher).await;
        match role.as_str() {
            "burst" => {
                println!("READY");
                let mut line = String::new();
                tokio::task::spawn_blocking(move || std::io::stdin().read_line(&mut line))
                    .await
                    .unwrap()
                    .unwrap();
                let mut calls = Vec::new();
                for _ in 0..25 {
                    let (storage, issuer) = (storage.clone(), issuer.clone());
                    calls.push(tokio::spawn(
                        async move { storage.get_valid(&key(), &issuer).await },
                    ));
                }
                let (mut ok, mut versions) = (0, BTreeSet::new());
                for call in calls {
                    match call.await.unwrap() {
                        Ok(set) => {
                            ok += 1;
                            versions.insert(set.version());
                        }
                        Err(e) => eprintln!("call failed: {e}"),
                    }
                }
                println!("RESULT ok={ok} versions={versions:?}");
            }
            "hold" | "takeover" => {
                let stored = storage.tokens(&key()).await.unwrap().unwrap();
                let clock = SharedClock::system();
                let started = clock.now();
                println!("REFRESHING");
                let fresh = storage.force_refresh(&key(), &issuer, stored.access_token()).await;
                match fresh {
                    Ok(set) => println!(
                        "RESULT ok version={} waited_ms={}",
                        set.version(),
                        clock.now().saturating_since(started).as_millis()
                    ),
                    Err(e) => println!("RESULT error {e}"),
                }
            }
            "restart" => {
                // Read until the server has gone away and come back (bounded), then refresh.
                println!("READY");
                let deadline = SystemClock::instant() + Duration::from_secs(20);
                let (mut errors, mut recovered) = (0, false);
                while SystemClock::instant() < deadline {
                    match storage.tokens(&key()).await {
                        Ok(Some(_)) if errors > 0 => {
                            recovered = true;
                            break;
                        }
                        Ok(Some(_)) => {}
                        Ok(None) => panic!("the tokens were lost"),
                        Err(Error::StoreUnavailable { .. }) => errors += 1,
                        Err(e) => panic!("not the typed transient error: {e:?}"),
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                assert!(recovered, "no outage seen and recovered from ({errors} errors)");
                println!("RECOVERED errors={errors}");
                let mut line = String::new();
                tokio::task::spawn_blocking(move || std::io::stdin().read_line(&mut line))
                    .await
                    .unwrap()
                    .unwrap();
                // A connection not used during the outage (the lease store's) reports it on
                // its first command after the restart: a typed transient error, retried.
                let stored = storage.tokens(&key()).await.unwrap().unwrap();
                let mut transient = 0;
                let set = loop {
                    match storage.force_refresh(&key(), &issuer, stored.access_token()).await {
                        Ok(set) => break set,
                        Err(Error::StoreUnavailable { .. }) if transient < 20 => {
                            transient += 1;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err(e) => panic!("refresh after the restart: {e:?}"),
                    }
                };
                println!("RESULT version={} transient={transient}", set.version());
            }
            other => panic!("unknown role {other}"),
        }
    });
}

/// A child process with its stdout lines on a channel.
struct Proc {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl Proc {
    fn spawn(role: &str, vars: &[(&str, String)]) -> Proc {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["fleet_child", "--exact", "--nocapture", "--test-threads=1"])
            .env("FLEET_ROLE", role)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in vars {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let stdin = child.stdin.take();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc { child, stdin, lines }
    }

    /// The rest of the first line containing `marker` (the harness may print before it).
    fn expect(&self, marker: &str, within: Duration) -> String {
        let deadline = SystemClock::instant() + within;
        loop {
            let left = deadline.saturating_duration_since(SystemClock::instant());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no {marker:?} line from the child within {within:?}"));
            if let Some(i) = line.find(marker) {
                return line[i + marker.len()..].trim().to_owned();
            }
        }
    }

    fn go(&mut self) {
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(b"go\n").unwrap();
        stdin.flush().unwrap();
    }

    fn finish(mut self) {
        let deadline = SystemClock::instant() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "child failed: {status}");
                return;
            }
            assert!(SystemClock::instant() < deadline, "child did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Fleet {
    redis: RedisServer,
    auth: AuthServerHandle,
    client_id: String,
    prefix: String,
}

impl Fleet {
    /// Redis, the fixture AS (strict rotation, reuse detection), a public client, and tokens
    /// for [`key`] in the shared store whose access token has already expired.
    async fn start(prefix: &str) -> Option<Fleet> {
        Fleet::start_with(prefix, false).await
    }

    /// [`Fleet::start`], with Redis persisting to an append-only file.
    async fn start_with(prefix: &str, append_only: bool) -> Option<Fleet> {
        let redis = RedisServer::start_with(append_only)?;
        let auth = AuthServer::builder().spawn().await.unwrap();
        auth.knobs().set_refresh_rotation(true);
        auth.knobs().set_reuse_detection(true);
        let client = auth.register_client(ClientSpec::new(ClientAuth::None)).unwrap();
        let issued = auth.issue_tokens(client.client_id(), "mcp:tools", None);
        let seed = TokenResponse::bearer(issued.access_token())
            .expires_in(Duration::from_millis(1))
            .refresh_token(issued.refresh_token().unwrap());
        #[derive(Debug)]
        struct Never;
        impl Refresher for Never {
            fn refresh<'a>(
                &'a self,
                _: &'a TokenKey,
                _: &'a RefreshRequest,
            ) -> BoxFuture<'a, Result<TokenResponse, RefreshError>> {
                Box::pin(async { panic!("the parent never refreshes") })
            }
        }
        let storage = fleet_storage(&redis.url(), prefix, Arc::new(Never)).await;
        storage.store(&key(), auth.issuer(), seed).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        Some(Fleet {
            client_id: client.client_id().to_owned(),
            redis,
            auth,
            prefix: prefix.to_owned(),
        })
    }

    fn vars(&self) -> Vec<(&'static str, String)> {
        vec![
            ("FLEET_REDIS", self.redis.url()),
            ("FLEET_PREFIX", self.prefix.clone()),
            ("FLEET_TOKEN_ENDPOINT", self.auth.token_endpoint()),
            ("FLEET_CLIENT_ID", self.client_id.clone()),
            ("FLEET_ISSUER", self.auth.issuer().to_owned()),
        ]
    }
}

/// Race: 4 processes x 25 concurrent calls, every access token expired at once, one rotating
/// refresh token. Per-process single-flight alone would redeem it up to 4 times (and trip reuse
/// detection); the Redis lease plus the re-read under it must make it exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_processes_redeem_a_rotating_refresh_token_once() {
    let Some(fleet) = Fleet::start("burst").await else { return };
    let vars = fleet.vars();
    let mut procs: Vec<Proc> = (0..4).map(|_| Proc::spawn("burst", &vars)).collect();
    for p in &procs {
        p.expect("READY", Duration::from_secs(20));
    }
    for p in &mut procs {
        p.go();
    }
    let mut versions = BTreeSet::new();
    for p in procs {
        let result = p.expect("RESULT ", Duration::from_secs(30));
        let rest = result.strip_prefix("ok=25 versions={").unwrap_or_else(|| panic!("{result}"));
        let v: Vec<&str> = rest.trim_end_matches('}').split(", ").collect();
        assert_eq!(v.len(), 1, "one token per process: {result}");
        versions.insert(v[0].to_owned());
        p.finish();
    }
    assert_eq!(versions.len(), 1, "every process got the same new token: {versions:?}");
    let stats = fleet.auth.stats();
    assert_eq!(stats.refresh_token_requests, 1, "{stats:?}");
    assert_eq!(stats.max_refresh_redemptions(), 1, "{stats:?}");
}

/// The holder of the lease hangs at the token endpoint past several TTLs while a successor
/// waits: the holder's renewals keep the successor out (it never reaches the endpoint). Then the
/// holder is SIGKILLed; the successor takes over once the lease expires, with no
/// re-authorization and no second redemption.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_lease_holder_is_taken_over_after_the_ttl() {
    let Some(fleet) = Fleet::start("takeover").await else { return };
    let vars = fleet.vars();
    let knobs = fleet.auth.knobs();
    knobs.set_token_hang(true);
    let holder = Proc::spawn("hold", &vars);
    holder.expect("REFRESHING", Duration::from_secs(20));
    let deadline = SystemClock::instant() + Duration::from_secs(20);
    while fleet.auth.stats().refresh_token_requests == 0 {
        assert!(SystemClock::instant() < deadline, "the holder never reached the token endpoint");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let successor = Proc::spawn("takeover", &vars);
    successor.expect("REFRESHING", Duration::from_secs(20));
    // Three TTLs: without renewal the successor would take the lease and reach the endpoint.
    tokio::time::sleep(LEASE_TTL * 3).await;
    let stats = fleet.auth.stats();
    assert_eq!(
        stats.refresh_token_requests, 1,
        "the renewed lease kept the successor out: {stats:?}"
    );
    drop(holder); // SIGKILL, and reaped.
    // If the fixture still finishes the dead request once released, it gets a 503 instead of
    // redeeming; otherwise the successor's first attempt does, and it retries.
    knobs.fail_token_requests(InjectedFailure::server_error(1));
    knobs.set_token_hang(false);
    let result = successor.expect("RESULT ", Duration::from_secs(30));
    let waited: u128 = result
        .strip_prefix("ok version=")
        .and_then(|r| r.split(" waited_ms=").nth(1))
        .unwrap_or_else(|| panic!("the successor refreshed: {result}"))
        .parse()
        .unwrap();
    let floor = (LEASE_TTL * 3).as_millis();
    assert!(waited >= floor, "the successor waited for the holder: {waited} ms < {floor} ms");
    successor.finish();
    let stats = fleet.auth.stats();
    assert_eq!(stats.max_refresh_redemptions(), 1, "{stats:?}");
    assert_eq!(stats.authorization_code_requests, 0, "no re-authorization: {stats:?}");
}

/// redis-server restarted (append-only file on) under two processes: each sees typed transient
/// errors, then its tokens again; then both refresh at once, once between them, with the lease
/// held in the restarted server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_is_survived_by_every_process() {
    let Some(mut fleet) = Fleet::start_with("restart", true).await else { return };
    let vars = fleet.vars();
    let mut procs: Vec<Proc> = (0..2).map(|_| Proc::spawn("restart", &vars)).collect();
    for p in &procs {
        p.expect("READY", Duration::from_secs(20));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    fleet.redis.stop();
    tokio::time::sleep(Duration::from_millis(300)).await;
    fleet.redis.restart();
    for p in &procs {
        let errors: u64 = p.expect("RECOVERED errors=", Duration::from_secs(25)).parse().unwrap();
        assert!(errors >= 1);
    }
    for p in &mut procs {
        p.go();
    }
    let mut versions = BTreeSet::new();
    for p in procs {
        let result = p.expect("RESULT version=", Duration::from_secs(30));
        versions.insert(result.split(' ').next().unwrap().to_owned());
        p.finish();
    }
    assert_eq!(versions.len(), 1, "{versions:?}");
    let stats = fleet.auth.stats();
    assert_eq!(stats.refresh_token_requests, 1, "{stats:?}");
    assert_eq!(stats.max_refresh_redemptions(), 1, "{stats:?}");
}

/// An OAuth callback lands on process B; process A, waiting on the flow, gets the result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_on_another_process_completes_the_wait() {
    let Some(redis) = RedisServer::start() else { return };
    let store = RedisStore::builder(redis.url()).prefix("callbacks").connect().await.unwrap();
    let flows = FlowManager::builder(SharedStore::new(store)).build().unwrap();
    let key = FlowKey::new("mcp_oauth", "alice:fixture").unwrap().with_tenant("acme").unwrap();
    let waiter = tokio::spawn({
        let (flows, key) = (flows.clone(), key.clone());
        async move { flows.create_and_wait::<String>(&key, serde_json::json!({"state": "s"})).await }
    });
    let deadline = SystemClock::instant() + Duration::from_secs(10);
    while flows.get::<String>(&key).await.unwrap().is_none() {
        assert!(SystemClock::instant() < deadline, "the flow was never created");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let b = Proc::spawn(
        "complete",
        &[("FLEET_REDIS", redis.url()), ("FLEET_PREFIX", "callbacks".into())],
    );
    b.expect("COMPLETED", Duration::from_secs(20));
    b.finish();
    let result =
        tokio::time::timeout(Duration::from_secs(10), waiter).await.expect("woken").unwrap();
    assert_eq!(result.unwrap(), "code-from-the-callback");
}
