//! A fleet of real OS processes sharing one Redis: token-storage over `RedisTokenStore` with a
//! `RefreshLease` over flow-state's `RedisStore`, refreshing against the fixture authorization
//! server with strict rotation and reuse detection; MCP tool calls through `connection-factory`
//! (a Redis-backed `FlowManager` and that token storage) against the fixture resource server;
//! and a flow-state flow that one process waits on and another completes.
//!
//! The test binary re-executes itself as the children. It has its own `main` (`harness = false`,
//! the runner in `crates/token-storage/tests/common/child_harness.rs`): it plays a child when
//! `FLEET_ROLE` is set and runs the tests otherwise, so the child is not counted as a test.
//! Every wait is bounded.

#[path = "../../crates/token-storage/tests/it/common/child_harness.rs"]
mod child_harness;
mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use connection_factory::{
    CallToolResult, Connection, ConnectionFactory, FactoryConfig, OAuthRefresher, stored_client,
};
use flow_state::testkit::RedisServer;
use flow_state::{FlowKey, FlowManager, RedisStore, SharedStore};
use mcp_clock::{Clock, SystemClock};
use mcp_fixtures::{ClientAuth, ClientSpec, Fixtures, InjectedFailure, KnobSettings};
use mcp_oauth::{HttpPolicy, OAuthClient, ReqwestHttpClient};
use support::{Fleet, HttpRefresher, LEASE_TTL, Never, Proc, env, fleet_storage, key};
use token_storage::{Error, SharedClock, TokenResponse};

/// How long the fixture's access tokens really live in the MCP fleet test. The client is told
/// they live [`CLAIMED`], so it keeps sending them once the server's clock has moved past this:
/// every call meets a 401 (a mid-session expiry the client did not foresee).
const LIFETIME: Duration = Duration::from_secs(60);
const CLAIMED: Duration = Duration::from_secs(3600);
/// Concurrent tool calls per process in the MCP fleet test.
const CALLS: usize = 25;

fn main() -> std::process::ExitCode {
    if let Ok(role) = std::env::var("FLEET_ROLE") {
        fleet_child(role);
        return std::process::ExitCode::SUCCESS;
    }
    child_harness::run(&[
        child_harness::Test {
            name: "four_processes_of_mcp_tool_calls_redeem_a_rotating_refresh_token_once",
            run: || {
                child_harness::block_on(
                    four_processes_of_mcp_tool_calls_redeem_a_rotating_refresh_token_once(),
                )
            },
        },
        child_harness::Test {
            name: "a_killed_lease_holder_is_taken_over_after_the_ttl",
            run: || child_harness::block_on(a_killed_lease_holder_is_taken_over_after_the_ttl()),
        },
        child_harness::Test {
            name: "a_redis_restart_is_survived_by_every_process",
            run: || child_harness::block_on(a_redis_restart_is_survived_by_every_process()),
        },
        child_harness::Test {
            name: "a_callback_on_another_process_completes_the_wait",
            run: || child_harness::block_on(a_callback_on_another_process_completes_the_wait()),
        },
        child_harness::Test {
            name: "foreign_values_under_the_fleet_prefixes_are_typed_errors",
            run: || {
                child_harness::block_on(foreign_values_under_the_fleet_prefixes_are_typed_errors())
            },
        },
    ])
}

/// The child processes of the fleet tests, by role.
fn fleet_child(role: String) {
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
        if role == "mcp" {
            mcp_child(&redis, &prefix).await;
            return;
        }
        let refresher = Arc::new(HttpRefresher {
            http: reqwest::Client::new(),
            token_endpoint: env("FLEET_TOKEN_ENDPOINT"),
            client_id: env("FLEET_CLIENT_ID"),
            announce: false,
        });
        let issuer = env("FLEET_ISSUER");
        let storage = fleet_storage(&redis, &prefix, refresher).await;
        match role.as_str() {
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
                    mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(10))
                        .await;
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
                            mcp_clock::Clock::sleep(
                                &mcp_clock::SystemClock,
                                Duration::from_millis(20),
                            )
                            .await;
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

fn oauth_client() -> OAuthClient {
    OAuthClient::new(ReqwestHttpClient::new(HttpPolicy::default()).unwrap(), SharedClock::system())
}

fn echo_args(text: &str) -> Option<serde_json::Map<String, serde_json::Value>> {
    serde_json::json!({ "text": text }).as_object().cloned()
}

/// An error and its sources, joined.
fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        out = format!("{out}: {e}");
        source = e.source();
    }
    out
}

fn text(result: &CallToolResult) -> String {
    result.content[0].as_text().expect("text content").text.clone()
}

/// A connection factory over the shared Redis (flows and tokens), refreshing with
/// [`OAuthRefresher`] from the client registration the parent stored.
async fn mcp_factory(redis: &str, prefix: &str) -> ConnectionFactory {
    let refresher = Arc::new(OAuthRefresher::new(oauth_client()));
    let storage = fleet_storage(redis, prefix, refresher).await;
    let flows =
        RedisStore::builder(redis).prefix(format!("{prefix}-flows")).connect().await.unwrap();
    let flows = FlowManager::builder(SharedStore::new(flows)).build().unwrap();
    ConnectionFactory::new(flows, storage).unwrap()
}

/// `factory.connect(config)` for [`key`], with room for [`CALLS`] requests at once: rmcp's
/// default of 16 POSTs in flight would hold the rest back until the refresh has landed, and
/// they would never meet a 401.
async fn mcp_connect(
    factory: &ConnectionFactory,
    url: &str,
) -> Result<Connection, connection_factory::Error> {
    let config = FactoryConfig::new(url, "acme", "alice", "fixture").max_concurrent_requests(CALLS);
    factory.connect(config).await
}

/// One process of the MCP fleet ([`mcp_factory`]): it opens one MCP session, warms it up with a
/// tool call, says `READY`, and on `go` makes [`CALLS`] concurrent `echo` calls on that session.
async fn mcp_child(redis: &str, prefix: &str) {
    let factory = mcp_factory(redis, prefix).await;
    let conn = Arc::new(mcp_connect(&factory, &env("FLEET_MCP_URL")).await.unwrap());
    assert_eq!(text(&conn.call_tool("echo", echo_args("warm")).await.unwrap()), "warm");
    println!("READY");
    let mut line = String::new();
    tokio::task::spawn_blocking(move || std::io::stdin().read_line(&mut line))
        .await
        .unwrap()
        .unwrap();
    let calls: Vec<_> = (0..CALLS)
        .map(|i| {
            let conn = conn.clone();
            tokio::spawn(async move {
                let sent = format!("{}-{i}", std::process::id());
                match conn.call_tool("echo", echo_args(&sent)).await {
                    Ok(result) if text(&result) == sent => true,
                    Ok(result) => {
                        eprintln!("call {i}: echoed {:?}, not {sent:?}", text(&result));
                        false
                    }
                    Err(e) => {
                        eprintln!("call {i} failed: {e:?}");
                        false
                    }
                }
            })
        })
        .collect();
    let mut ok = 0;
    for call in calls {
        if call.await.unwrap() {
            ok += 1;
        }
    }
    let c = factory.counters();
    let version = factory.storage().tokens(&key()).await.unwrap().unwrap().version();
    println!(
        "RESULT ok={ok} version={version} recovered={} failed={}",
        c.refreshed + c.coalesced + c.adopted,
        c.rejected + c.transient + c.timed_out + c.insufficient_scope
    );
    Arc::into_inner(conn).expect("every call finished").close().await.unwrap();
}

/// The MCP fleet: Redis, the fixture authorization server (rotation, strict reuse detection, no
/// grace) and resource server, a public client whose registration is stored for [`key`], and
/// tokens for it that the client believes live an hour while the server lets them live
/// [`LIFETIME`].
struct McpFleet {
    redis: RedisServer,
    fx: Fixtures,
    prefix: String,
}

impl McpFleet {
    async fn start(prefix: &str) -> Option<McpFleet> {
        let redis = RedisServer::start()?;
        let mut knobs = KnobSettings::default();
        knobs.access_token_lifetime = LIFETIME;
        knobs.refresh_rotation = true;
        knobs.reuse_detection = true;
        knobs.reuse_grace = None;
        let fx = Fixtures::start_with(SharedClock::system(), knobs).await.unwrap();
        let discovery =
            oauth_client().discover(&fx.resource().url().parse().unwrap(), None).await.unwrap();
        let client = fx.auth().register_client(ClientSpec::new(ClientAuth::None)).unwrap();
        let registration = mcp_oauth::ClientRegistration {
            client_id: client.client_id().to_owned(),
            client_secret: None,
            client_key: None,
            auth_method: mcp_oauth::TokenEndpointAuthMethod::None,
            source: mcp_oauth::RegistrationSource::Dynamic,
            issuer: discovery.issuer().to_owned(),
            client_secret_expires_at: None,
        };
        let storage = fleet_storage(&redis.url(), prefix, Arc::new(Never)).await;
        storage.store_client(&key(), &stored_client(&discovery, &registration)).await.unwrap();
        let issued =
            fx.auth().issue_tokens(client.client_id(), "mcp:tools", Some(fx.resource().url()));
        let seed = TokenResponse::bearer(issued.access_token())
            .expires_in(CLAIMED)
            .refresh_token(issued.refresh_token().unwrap())
            .scope("mcp:tools");
        storage.store(&key(), discovery.issuer(), seed).await.unwrap();
        Some(McpFleet { redis, fx, prefix: prefix.to_owned() })
    }

    fn vars(&self) -> Vec<(&'static str, String)> {
        vec![
            ("FLEET_REDIS", self.redis.url()),
            ("FLEET_PREFIX", self.prefix.clone()),
            ("FLEET_MCP_URL", self.fx.resource().url().to_owned()),
        ]
    }
}

/// Race: 4 processes x 25 concurrent MCP tool calls through `connection-factory`, every access
/// token expired at once on the server, one rotating refresh token under strict reuse detection.
/// Every call is refused with a 401 and recovers by a silent refresh. Per-process single-flight
/// alone would redeem the refresh token up to 4 times (the second redemption trips reuse
/// detection and revokes the family, so calls fail); the Redis lease plus the re-read under it
/// must make it exactly once, and every call must succeed.
async fn four_processes_of_mcp_tool_calls_redeem_a_rotating_refresh_token_once() {
    let Some(fleet) = McpFleet::start("mcp").await else { return };
    let vars = fleet.vars();
    let mut procs: Vec<Proc> = (0..4).map(|_| Proc::spawn("mcp", &vars)).collect();
    for p in &procs {
        p.expect("READY", Duration::from_secs(20));
    }
    let warm = fleet.fx.resource().stats();
    assert_eq!(warm.unauthorized, 0, "the seeded token works until it expires: {warm:?}");
    assert_eq!(warm.tool_calls.get("echo"), Some(&4), "{warm:?}");

    // Every access token expires at once on the server (its clock jumps past their lifetime);
    // the token endpoint answers slowly (a second: ample room on a loaded machine), so all 100
    // calls are sent with the old token before any refresh lands: each of them is refused.
    let knobs = fleet.fx.auth().knobs();
    knobs.set_token_delay(Duration::from_secs(1));
    knobs.set_clock_offset_millis(
        i64::try_from((LIFETIME + Duration::from_secs(1)).as_millis()).unwrap(),
    );
    for p in &mut procs {
        p.go();
    }
    let (mut versions, mut recovered) = (BTreeSet::new(), 0);
    for p in procs {
        let result = p.expect("RESULT ", Duration::from_secs(30));
        let field = |name: &str| -> u64 {
            result
                .split(' ')
                .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
                .unwrap_or_else(|| panic!("no {name} in {result}"))
                .parse()
                .unwrap()
        };
        assert_eq!(field("ok"), CALLS as u64, "every call succeeded: {result}");
        assert_eq!(field("failed"), 0, "no refresh failed: {result}");
        assert!(field("recovered") >= CALLS as u64, "every call met a 401 and recovered: {result}");
        recovered += field("recovered");
        versions.insert(field("version"));
        p.finish();
    }
    assert_eq!(versions.len(), 1, "every process sees the same rotated token: {versions:?}");

    let auth = fleet.fx.auth().stats();
    assert_eq!(auth.refresh_token_requests, 1, "one refresh for the fleet: {auth:?}");
    assert_eq!(auth.refresh_redemptions.len(), 1, "{auth:?}");
    assert_eq!(auth.max_refresh_redemptions(), 1, "{auth:?}");
    assert_eq!(auth.reuse_detections, 0, "{auth:?}");
    assert_eq!(auth.families_revoked, 0, "{auth:?}");
    assert_eq!(auth.authorization_code_requests, 0, "no re-authorization: {auth:?}");
    let rs = fleet.fx.resource().stats();
    assert!(rs.unauthorized >= 4 * CALLS as u64, "every call met a 401: {rs:?}");
    assert_eq!(recovered, rs.unauthorized, "every 401 recovered: {rs:?}");
    assert_eq!(rs.tool_calls.get("echo"), Some(&(4 + 4 * CALLS as u64)), "{rs:?}");
}

/// The holder of the lease hangs at the token endpoint past several TTLs while a successor
/// waits: the holder's renewals keep the successor out (it never reaches the endpoint). Then the
/// holder is SIGKILLed; the successor takes over once the lease expires, with no
/// re-authorization and no second redemption.
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
        mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(5)).await;
    }
    let successor = Proc::spawn("takeover", &vars);
    successor.expect("REFRESHING", Duration::from_secs(20));
    // Two TTLs: without renewal the successor would take the lease and reach the endpoint.
    mcp_clock::Clock::sleep(&mcp_clock::SystemClock, LEASE_TTL * 2).await;
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
    // A lower bound by construction (the successor was waiting before the two TTLs slept
    // above), so it cannot race: it catches a successor that did not wait at all.
    let floor = (LEASE_TTL * 2).as_millis();
    assert!(waited >= floor, "the successor waited for the holder: {waited} ms < {floor} ms");
    successor.finish();
    let stats = fleet.auth.stats();
    assert_eq!(stats.max_refresh_redemptions(), 1, "{stats:?}");
    assert_eq!(stats.authorization_code_requests, 0, "no re-authorization: {stats:?}");
}

/// redis-server restarted (append-only file on) under two processes: each sees typed transient
/// errors, then its tokens again; then both refresh at once, once between them, with the lease
/// held in the restarted server.
async fn a_redis_restart_is_survived_by_every_process() {
    let Some(mut fleet) = Fleet::start_with("restart", true).await else { return };
    let vars = fleet.vars();
    let mut procs: Vec<Proc> = (0..2).map(|_| Proc::spawn("restart", &vars)).collect();
    for p in &procs {
        p.expect("READY", Duration::from_secs(20));
    }
    mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(100)).await;
    fleet.redis.stop();
    mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(300)).await;
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
        mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(5)).await;
    }
    let b = Proc::spawn(
        "complete",
        &[("FLEET_REDIS", redis.url()), ("FLEET_PREFIX", "callbacks".into())],
    );
    b.expect("COMPLETED", Duration::from_secs(20));
    b.finish();
    let result = mcp_clock::within(&mcp_clock::SystemClock, Duration::from_secs(10), waiter)
        .await
        .expect("woken")
        .unwrap();
    assert_eq!(result.unwrap(), "code-from-the-callback");
}

/// Bad input through the whole stack: values under the fleet's Redis prefixes written by another
/// program (a string where a record belongs).
///
/// - At the token record: connecting fails with a typed error, not a panic and not "no tokens"
///   (so nothing re-authorizes over it); the value is left as it was.
/// - At the refresh lease: the 401's refresh fails with a typed error before the token endpoint
///   is reached (the rotating refresh token is not spent), the stored tokens are intact, and once
///   the value is gone the next call refreshes and succeeds.
async fn foreign_values_under_the_fleet_prefixes_are_typed_errors() {
    let Some(fleet) = McpFleet::start("foreign").await else { return };
    let client = redis::Client::open(fleet.redis.url()).unwrap();
    let mut raw = client.get_multiplexed_async_connection().await.unwrap();
    let records: Vec<String> =
        redis::cmd("KEYS").arg("{foreign}:r:*").query_async(&mut raw).await.unwrap();
    let tokens = records
        .iter()
        .find(|k| k.ends_with("/tokens"))
        .unwrap_or_else(|| panic!("no token record among {records:?}"))
        .clone();
    let record = tokens.strip_prefix("{foreign}:r:").unwrap();
    let lease =
        format!("foreign-leases:L{}", FlowKey::new("token_refresh", record).unwrap().as_str());
    let factory = mcp_factory(&fleet.redis.url(), "foreign").await;
    let url = fleet.fx.resource().url().to_owned();

    // The token record.
    let aside = format!("{tokens}.aside");
    let _: () = redis::cmd("RENAME").arg(&tokens).arg(&aside).query_async(&mut raw).await.unwrap();
    let _: () = redis::cmd("SET").arg(&tokens).arg("hello").query_async(&mut raw).await.unwrap();
    let err = mcp_connect(&factory, &url).await.expect_err("the token record is not ours");
    assert!(matches!(err, connection_factory::Error::Provider { .. }), "{err:?}");
    assert!(chain(&err).contains("unreadable"), "{}", chain(&err));
    let value: String = redis::cmd("GET").arg(&tokens).query_async(&mut raw).await.unwrap();
    assert_eq!(value, "hello", "left as it was");
    let _: () = redis::cmd("RENAME").arg(&aside).arg(&tokens).query_async(&mut raw).await.unwrap();

    // The refresh lease, met by a mid-session 401.
    let conn = mcp_connect(&factory, &url).await.unwrap();
    assert_eq!(text(&conn.call_tool("echo", echo_args("warm")).await.unwrap()), "warm");
    let stored = factory.storage().tokens(&key()).await.unwrap().unwrap();
    let _: () = redis::cmd("SET").arg(&lease).arg("hello").query_async(&mut raw).await.unwrap();
    let offset = LIFETIME + Duration::from_secs(1);
    fleet.fx.auth().knobs().set_clock_offset_millis(i64::try_from(offset.as_millis()).unwrap());
    let err =
        conn.call_tool("echo", echo_args("refused")).await.expect_err("the lease is not ours");
    // A store failure on the recovery path is `Error::Store` (never a prompt).
    assert!(matches!(err, connection_factory::Error::Store { .. }), "{err:?}");
    assert!(chain(&err).contains("corrupt"), "{}", chain(&err));
    let auth = fleet.fx.auth().stats();
    assert_eq!(auth.refresh_token_requests, 0, "the refresh token was not spent: {auth:?}");
    let value: String = redis::cmd("GET").arg(&lease).query_async(&mut raw).await.unwrap();
    assert_eq!(value, "hello", "left as it was");
    let now = factory.storage().tokens(&key()).await.unwrap().unwrap();
    assert_eq!(now.version(), stored.version(), "the stored tokens are intact");
    assert_eq!(now.access_token(), stored.access_token());

    let _: () = redis::cmd("DEL").arg(&lease).query_async(&mut raw).await.unwrap();
    assert_eq!(text(&conn.call_tool("echo", echo_args("after")).await.unwrap()), "after");
    let auth = fleet.fx.auth().stats();
    assert_eq!(auth.refresh_token_requests, 1, "{auth:?}");
    assert_eq!(auth.reuse_detections, 0, "{auth:?}");
    assert_eq!(auth.authorization_code_requests, 0, "no re-authorization: {auth:?}");
    conn.close().await.unwrap();
}
