//! The `mcp-connect` binary as users run it: real processes against the fixture servers on
//! 127.0.0.1, the test playing the browser.

use crate::common;

use std::time::Duration;

use common::{Store, URL_PREFIX, login, spawn, visit};
use mcp_fixtures::Fixtures;
use serde_json::{Value, json};

async fn fixtures(lifetime: Duration) -> Fixtures {
    let fx = Fixtures::start().await.unwrap();
    let knobs = fx.auth().knobs();
    knobs.set_access_token_lifetime(lifetime);
    knobs.set_refresh_rotation(true);
    knobs.set_reuse_detection(true);
    knobs.set_reuse_grace(None);
    fx
}

/// The refresh-window tests' tokens: 8 s, so the refresh window (half the lifetime, capped at
/// the buffer) opens at 4 s at the latest. Processes cannot share a manual clock, so the tests
/// use real time with bounds that cannot race: they sleep past the window's opening (4.3 s),
/// and [`still_before`] fails a test whose process ended after the old token's expiry (a slow
/// machine would otherwise turn the refresh ahead into a plain expiry and pass vacuously).
const WINDOW_LIFETIME: Duration = Duration::from_secs(8);
const INTO_THE_WINDOW: Duration = Duration::from_millis(4300);

/// Fails unless the time now is before `expires_at` (Unix seconds, as `status` prints it):
/// everything so far happened while the old access token was still valid.
#[track_caller]
fn still_before(expires_at: u64, what: &str) {
    use mcp_clock::Clock as _;
    let now = mcp_clock::SharedClock::system().now();
    assert!(
        now < mcp_clock::Timestamp::from_secs(expires_at),
        "{what} ended after the old token expired (now {now}, expiry {expires_at} s): the \
         machine was too slow for this test to see a refresh ahead of expiry"
    );
}

/// The stored access token's expiry (Unix seconds) of the only server in `store`.
fn expires_at(store: &Store) -> u64 {
    let status = store.run(&["--json", "status"]);
    let parsed: Value = serde_json::from_str(&status.stdout).unwrap();
    parsed["servers"][0]["expires_at"].as_u64().unwrap()
}

#[track_caller]
fn assert_no_secret(outputs: &[String], secrets: &[String]) {
    assert!(!secrets.is_empty());
    for output in outputs {
        for secret in secrets {
            assert!(!output.contains(secret.as_str()), "a secret was printed in:\n{output}");
        }
    }
}

/// The whole life of one server: login in the browser, tools, call, a call after the access
/// token expired (silent refresh), status in text and JSON, logout with revocation. No output
/// (debug logs included) contains a token or a client secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_tools_call_status_logout() {
    let fx = fixtures(Duration::from_secs(2)).await;
    let server = fx.resource().url().to_owned();
    let store = Store::new();
    let mut outputs = Vec::new();
    let mut secrets = Vec::new();

    let login = login(&store, &server).await;
    login.expect_code(0);
    assert!(login.stdout.contains("Logged in"), "{login:#?}");
    assert!(login.stderr.contains(URL_PREFIX));
    outputs.push(login.all());
    secrets.extend(store.secrets(&server).await);

    // A second login with valid tokens stored: no browser step.
    let again = store.run(&["login", &server, "--no-browser", "--port", "0", "--timeout", "5"]);
    again.expect_code(0);
    assert!(again.stdout.contains("Already authorized"), "{again:#?}");
    assert!(!again.stderr.contains(URL_PREFIX), "{again:#?}");
    outputs.push(again.all());

    let tools = store.run(&["-vv", "tools", &server]);
    tools.expect_code(0);
    assert!(tools.stdout.contains("echo"), "{tools:#?}");
    assert!(tools.stderr.contains("DEBUG"), "debug logs are on: {tools:#?}");
    outputs.push(tools.all());

    let call = store.run(&["call", &server, "echo", r#"{"text":"hello"}"#]);
    call.expect_code(0);
    assert_eq!(call.stdout.trim(), "hello");

    // The access token expires; the next call refreshes silently.
    mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(2500)).await;
    let call = store.run(&["-vv", "call", &server, "echo", r#"{"text":"later"}"#]);
    call.expect_code(0);
    assert_eq!(call.stdout.trim(), "later");
    outputs.push(call.all());
    secrets.extend(store.secrets(&server).await);
    let stats = fx.auth().stats();
    assert!(stats.refresh_token_requests >= 1, "{stats:?}");
    assert_eq!(stats.max_refresh_redemptions(), 1, "{stats:?}");
    assert_eq!((stats.registrations, stats.authorization_code_requests), (1, 1), "{stats:?}");

    let status = store.run(&["status"]);
    status.expect_code(0);
    assert!(status.stdout.contains(&server), "{status:#?}");
    assert!(status.stdout.contains(fx.auth().issuer()), "{status:#?}");
    assert!(status.stdout.contains("refresh token: held"), "{status:#?}");
    outputs.push(status.all());
    let status = store.run(&["--json", "status"]);
    status.expect_code(0);
    let parsed: Value = serde_json::from_str(&status.stdout).unwrap();
    let entry = &parsed["servers"][0];
    assert_eq!(entry["server"], json!(server));
    assert_eq!(entry["issuer"], json!(fx.auth().issuer()));
    assert_eq!(entry["has_refresh_token"], json!(true));
    assert!(entry["client_id"].as_str().is_some_and(|c| !c.is_empty()));
    assert!(entry["expires_at"].as_u64().is_some());
    outputs.push(status.all());

    // Bad arguments: exit 2, nothing sent.
    store.run(&["call", &server, "echo", "[1]"]).expect_code(2);
    store.run(&["tools", "ftp://example.invalid/"]).expect_code(2);

    assert_no_secret(&outputs, &secrets);

    let logout = store.run(&["logout", &server]);
    logout.expect_code(0);
    assert!(logout.stdout.contains("revocation: revoked"), "{logout:#?}");
    assert!(fx.auth().stats().revocations >= 1);
    assert!(store.run(&["status"]).stdout.contains("No servers stored"));
    assert!(store.run(&["logout", &server]).stdout.contains("Nothing stored"));
    let tools = store.run(&["tools", &server]);
    tools.expect_code(5);
    assert!(tools.stderr.contains("mcp-connect login"), "{tools:#?}");
}

/// DPoP with no flag: the authorization server advertises ES256 DPoP and both fixture servers
/// require proofs with nonces. `login` makes and stores a DPoP key and gets `DPoP` tokens; a
/// call, and a call after the access token expired (a refresh with a proof by the same key,
/// in a new process that read the key back), go through without a refused proof; the key never
/// prints, and `logout` deletes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_call_and_refresh_with_dpop_when_the_server_advertises_it() {
    let fx = fixtures(Duration::from_secs(2)).await;
    fx.auth().knobs().set_dpop(true);
    let server = fx.resource().url().to_owned();
    let store = Store::new();

    let login = login(&store, &server).await;
    login.expect_code(0);
    let (token_type, pem) = store.dpop(&server).await;
    assert_eq!(token_type.as_deref(), Some("DPoP"));
    let pem = pem.expect("a DPoP key is stored");
    let call = store.run(&["-vv", "call", &server, "echo", r#"{"text":"hello"}"#]);
    call.expect_code(0);
    assert_eq!(call.stdout.trim(), "hello");

    mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(2500)).await;
    let later = store.run(&["-vv", "call", &server, "echo", r#"{"text":"later"}"#]);
    later.expect_code(0);
    assert_eq!(later.stdout.trim(), "later");
    assert_eq!(store.dpop(&server).await, (Some("DPoP".into()), Some(pem.clone())), "same key");

    let (a, r) = (fx.auth().stats(), fx.resource().stats());
    assert_eq!(a.max_refresh_redemptions(), 1, "{a:?}");
    assert!(!a.refresh_redemptions.is_empty(), "a refresh happened: {a:?}");
    assert_eq!((a.dpop_proofs_refused, a.reuse_detections), (0, 0), "{a:?}");
    assert!(a.dpop_nonce_challenges >= 1, "{a:?}");
    assert_eq!(r.dpop_proofs_refused, 0, "{r:?}");
    assert!(r.dpop_accepted >= 2, "{r:?}");
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    for output in [login.all(), call.all(), later.all()] {
        assert!(!output.contains(&body) && !output.contains("PRIVATE KEY"), "{output}");
    }

    store.run(&["logout", &server]).expect_code(0);
    assert_eq!(store.dpop(&server).await, (None, None), "logout deletes the key");
}

/// The race this pins: two desktop hosts each start `mcp-connect proxy` for the same server with
/// nothing stored. Both need a login, then both keep refreshing 2-second rotating tokens under
/// strict reuse detection. One browser prompt between them (the other waits on the login lock
/// and adopts the stored tokens), and no refresh token presented twice (a second redemption
/// would revoke the family and break both sessions).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxies_share_one_login_and_never_redeem_a_refresh_token_twice() {
    let fx = fixtures(Duration::from_secs(2)).await;
    let server = fx.resource().url().to_owned();
    let store = Store::new();
    let args = ["-vv", "proxy", server.as_str(), "--no-browser", "--port", "0", "--timeout", "30"];
    let mut proxies = [spawn(store.command(&args), true), spawn(store.command(&args), true)];

    let mut url = None;
    for _ in 0..3000 {
        url = proxies.iter().find_map(|p| p.urls.try_recv().ok());
        if url.is_some() {
            break;
        }
        mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(10)).await;
    }
    let url = url.expect("one proxy prints the authorization URL");
    visit(&url).await;

    for proxy in &mut proxies {
        proxy.send(json!({
            "jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {
                "protocolVersion": "2025-06-18", "capabilities": {},
                "clientInfo": { "name": "host", "version": "1" }
            }
        }));
        let init = proxy.response(1);
        assert!(init["result"]["serverInfo"].is_object(), "{init}");
        proxy.send(json!({ "jsonrpc": "2.0", "method": "notifications/initialized" }));
    }
    // Each round: let the access token expire, then put three calls into each proxy at once,
    // so both processes find it expired together and race to refresh (the token endpoint is
    // slowed down to widen the window).
    fx.auth().knobs().set_token_delay(Duration::from_millis(150));
    for round in 0..3u64 {
        mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(2200)).await;
        for (i, proxy) in proxies.iter_mut().enumerate() {
            for n in 0..3u64 {
                let id = 10 + round * 10 + n;
                proxy.send(json!({
                    "jsonrpc": "2.0", "id": id, "method": "tools/call",
                    "params": { "name": "echo", "arguments": { "text": format!("{i}/{id}") } }
                }));
            }
        }
        for (i, proxy) in proxies.iter_mut().enumerate() {
            for n in 0..3u64 {
                let id = 10 + round * 10 + n;
                let response = proxy.response(id);
                assert_eq!(
                    response["result"]["content"][0]["text"],
                    json!(format!("{i}/{id}")),
                    "{response}\nstats: {:?}",
                    fx.auth().stats()
                );
            }
        }
    }
    let [a, b] = proxies;
    let outcomes = [a.finish(), b.finish()];
    for outcome in &outcomes {
        outcome.expect_code(0);
    }
    let prompts = outcomes.iter().filter(|o| o.stderr.contains(URL_PREFIX)).count();
    assert_eq!(prompts, 1, "one browser prompt between the two: {outcomes:#?}");

    let stats = fx.auth().stats();
    assert_eq!((stats.registrations, stats.authorization_code_requests), (1, 1), "{stats:?}");
    assert!(stats.refresh_token_requests >= 3, "tokens rotated while both ran: {stats:?}");
    assert_eq!(stats.max_refresh_redemptions(), 1, "{stats:?}");
    assert_eq!((stats.reuse_detections, stats.families_revoked), (0, 0), "{stats:?}");
    let outputs: Vec<String> = outcomes.iter().map(|o| o.all()).collect();
    assert_no_secret(&outputs, &store.secrets(&server).await);
}

/// Server-side revocation mid-session: the refresh is refused, the proxy starts one new login
/// and holds the host's requests (the one that met the refusal, and one sent while the browser
/// step is open); once the user completes it, both are sent again and answered with their
/// results, on the same proxy, with one prompt. No request of the host is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_carries_the_hosts_requests_through_a_new_login() {
    let fx = fixtures(Duration::from_secs(3600)).await;
    let server = fx.resource().url().to_owned();
    let store = Store::new();
    login(&store, &server).await.expect_code(0);
    let args = ["proxy", server.as_str(), "--no-browser", "--port", "0", "--timeout", "30"];
    let mut proxy = spawn(store.command(&args), true);
    proxy.initialize();
    let call = |id: u64| {
        json!({
            "jsonrpc": "2.0", "id": id, "method": "tools/call",
            "params": { "name": "echo", "arguments": { "text": format!("ok {id}") } }
        })
    };
    proxy.send(call(2));
    let first = proxy.response(2);
    assert_eq!(first["result"]["content"][0]["text"], json!("ok 2"), "{first}\n{}", proxy.stderr());

    fx.auth().revoke_all_tokens();
    proxy.send(call(3));
    let url = tokio::task::block_in_place(|| proxy.urls.recv_timeout(Duration::from_secs(30)))
        .unwrap_or_else(|_| panic!("no new authorization URL; stderr:\n{}", proxy.stderr()));
    // Sent while the browser step is open: held too.
    proxy.send(call(4));
    visit(&url).await;
    for id in [3, 4] {
        let answer = proxy.response(id);
        assert_eq!(
            answer["result"]["content"][0]["text"],
            json!(format!("ok {id}")),
            "{answer}\n{}",
            proxy.stderr()
        );
    }
    let outcome = proxy.finish();
    outcome.expect_code(0);
    assert_eq!(outcome.stderr.matches(URL_PREFIX).count(), 1, "one new prompt: {outcome:#?}");
    assert_eq!(fx.auth().stats().authorization_code_requests, 2);
}

/// The same, but the user never completes the browser step: when its limit passes, the held
/// request is answered with a JSON-RPC error that says what to do (never a hang).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_request_gets_an_error_when_the_new_login_fails() {
    let fx = fixtures(Duration::from_secs(3600)).await;
    let server = fx.resource().url().to_owned();
    let store = Store::new();
    login(&store, &server).await.expect_code(0);
    let args = ["proxy", server.as_str(), "--no-browser", "--port", "0", "--timeout", "2"];
    let mut proxy = spawn(store.command(&args), true);
    proxy.initialize();
    proxy.send(json!({
        "jsonrpc": "2.0", "id": 4, "method": "tools/call",
        "params": { "name": "echo", "arguments": { "text": "before" } }
    }));
    assert_eq!(proxy.response(4)["result"]["content"][0]["text"], json!("before"));
    fx.auth().revoke_all_tokens();
    proxy.send(json!({
        "jsonrpc": "2.0", "id": 5, "method": "tools/call",
        "params": { "name": "echo", "arguments": { "text": "never" } }
    }));
    let refused = proxy.response(5);
    let message = refused["error"]["message"].as_str().unwrap_or_default().to_owned();
    assert!(message.contains("not authorized"), "{refused}\n{}", proxy.stderr());
    assert!(proxy.stderr().contains("the new login failed"), "{}", proxy.stderr());
    proxy.finish().expect_code(0);
    assert_eq!(
        fx.resource().stats().tool_calls.get("echo").copied().unwrap_or(0),
        1,
        "only the first"
    );
}

/// The lost-refresh-token race: a command finds its access token inside the refresh window,
/// starts the refresh in the background and has its answer before the (slow) token endpoint
/// answers. It must not exit before the rotated tokens are stored: once the server has rotated
/// them, the old refresh token is dead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_does_not_exit_before_its_background_refresh_is_stored() {
    let fx = fixtures(WINDOW_LIFETIME).await;
    let server = fx.resource().url().to_owned();
    let store = Store::new();
    login(&store, &server).await.expect_code(0);
    let before = expires_at(&store);
    mcp_clock::Clock::sleep(&mcp_clock::SystemClock, INTO_THE_WINDOW).await;
    fx.auth().knobs().set_token_delay(Duration::from_millis(800));
    let call = store.run(&["call", &server, "echo", r#"{"text":"in the window"}"#]);
    still_before(before, "the call");
    call.expect_code(0);
    let stats = fx.auth().stats();
    assert_eq!(stats.refresh_token_requests, 1, "{stats:?}");
    fx.auth().knobs().set_token_delay(Duration::ZERO);
    assert!(expires_at(&store) > before, "the refreshed tokens were stored before the exit");
    store.run(&["call", &server, "echo", r#"{"text":"next"}"#]).expect_code(0);
    assert_eq!(fx.auth().stats().max_refresh_redemptions(), 1);
}

/// The race this pins: a host writes `initialize`, `notifications/initialized` and its first
/// requests back to back. rmcp's worker takes the message after `initialize` for the
/// `initialized` notification, so a request that overtook the notification on the way into
/// the transport ended the session ("Transport channel closed"). Ten proxies, each fed the
/// whole opening at once, all answer every request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_reach_the_server_in_the_order_the_host_sent_them() {
    let fx = fixtures(Duration::from_secs(3600)).await;
    let server = fx.resource().url().to_owned();
    let store = Store::new();
    login(&store, &server).await.expect_code(0);
    for _ in 0..10 {
        let mut proxy = spawn(store.command(&["proxy", server.as_str()]), true);
        proxy.send(json!({
            "jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {
                "protocolVersion": "2025-06-18", "capabilities": {},
                "clientInfo": { "name": "host", "version": "1" }
            }
        }));
        proxy.send(json!({ "jsonrpc": "2.0", "method": "notifications/initialized" }));
        for id in 2..6 {
            proxy.send(json!({
                "jsonrpc": "2.0", "id": id, "method": "tools/call",
                "params": { "name": "echo", "arguments": { "text": format!("m{id}") } }
            }));
        }
        assert!(proxy.response(1)["result"].is_object());
        for id in 2..6 {
            let response = proxy.response(id);
            assert_eq!(
                response["result"]["content"][0]["text"],
                json!(format!("m{id}")),
                "{response}"
            );
        }
        proxy.finish().expect_code(0);
    }
}

/// A host stops its proxy with SIGTERM (more often than by closing stdin) right after a request
/// that started a refresh ahead of expiry, while the token endpoint is still answering, and
/// keeps stdin open: the proxy exits cleanly, and only after the rotated tokens are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_stopped_by_sigterm_stores_its_refresh_first() {
    let fx = fixtures(WINDOW_LIFETIME).await;
    let server = fx.resource().url().to_owned();
    let store = Store::new();
    login(&store, &server).await.expect_code(0);
    let before = expires_at(&store);
    mcp_clock::Clock::sleep(&mcp_clock::SystemClock, INTO_THE_WINDOW).await;
    fx.auth().knobs().set_token_delay(Duration::from_millis(800));
    let mut proxy = spawn(store.command(&["proxy", server.as_str()]), true);
    proxy.send(json!({
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": { "name": "host", "version": "1" }
        }
    }));
    assert!(proxy.response(1)["result"].is_object());
    let pid = proxy.child.id().to_string();
    let killed = std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(killed.success());
    // The host keeps the pipe open: the proxy must exit all the same (bounded).
    let mut status = None;
    for _ in 0..200 {
        status = proxy.child.try_wait().unwrap();
        if status.is_some() {
            break;
        }
        mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(50)).await;
    }
    let status = status.unwrap_or_else(|| panic!("still running; stderr:\n{}", proxy.stderr()));
    still_before(before, "the proxy");
    assert_eq!(status.code(), Some(0), "stderr:\n{}", proxy.stderr());
    assert_eq!(fx.auth().stats().refresh_token_requests, 1, "{:?}", fx.auth().stats());
    fx.auth().knobs().set_token_delay(Duration::ZERO);
    assert!(expires_at(&store) > before, "the refreshed tokens were stored before the exit");
}

/// The 401 path across processes, through the binary: the tokens live an hour as far as the
/// client knows, but the server's clock jumps two hours ahead, so the server refuses them while
/// the client believes they are good (no refresh ahead is possible). Two `mcp-connect call`
/// processes are refused at once; the race this pins is both redeeming the one refresh token
/// (strict reuse detection would then revoke the family). The token endpoint holds the refresh
/// until both processes have been refused, so the second 401 meets the first one's refresh in
/// flight: exactly one redemption, and both calls succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_refused_at_once_redeem_the_refresh_token_once() {
    let fx = fixtures(Duration::from_secs(3600)).await;
    let server = fx.resource().url().to_owned();
    let store = Store::new();
    login(&store, &server).await.expect_code(0);
    store.run(&["call", &server, "echo", r#"{"text":"before"}"#]).expect_code(0);
    let before = fx.resource().stats().unauthorized;
    assert_eq!(fx.auth().stats().refresh_token_requests, 0);

    fx.auth().knobs().set_refresh_hang(true);
    fx.auth().knobs().set_clock_offset_millis(2 * 3600 * 1000);
    let calls: Vec<_> = (0..2)
        .map(|i| {
            let text = format!(r#"{{"text":"process {i}"}}"#);
            spawn(store.command(&["-vv", "call", &server, "echo", &text]), false)
        })
        .collect();
    let mut refused = false;
    for _ in 0..3000 {
        if fx.resource().stats().unauthorized >= before + 2 {
            refused = true;
            break;
        }
        mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(10)).await;
    }
    let stderr: Vec<String> = calls.iter().map(|c| c.stderr()).collect();
    assert!(refused, "both processes were refused: {:?}\n{stderr:#?}", fx.resource().stats());
    fx.auth().knobs().set_refresh_hang(false);
    let outcomes: Vec<_> =
        tokio::task::block_in_place(|| calls.into_iter().map(|c| c.finish()).collect());
    for (i, outcome) in outcomes.iter().enumerate() {
        outcome.expect_code(0);
        assert_eq!(outcome.stdout.trim(), format!("process {i}"), "{outcome:#?}");
        assert!(!outcome.stderr.contains(URL_PREFIX), "no login was needed: {outcome:#?}");
    }
    let stats = fx.auth().stats();
    assert_eq!(stats.refresh_token_requests, 1, "one redemption between the two: {stats:?}");
    assert_eq!(stats.max_refresh_redemptions(), 1, "{stats:?}");
    assert_eq!((stats.reuse_detections, stats.families_revoked), (0, 0), "{stats:?}");
    assert_eq!(stats.authorization_code_requests, 1, "{stats:?}");
    assert_eq!(fx.resource().stats().unauthorized, before + 2, "each process was refused once");
}

/// The race this pins: the host starts the proxy on tokens the server revoked while it was
/// closed (they look valid locally). The host's `initialize` is the first request refused, the
/// refresh is refused too, and rmcp's transport dies with its first request: the proxy used to
/// exit ("the MCP session ended") and the host showed the server as failed. Now the proxy holds
/// the `initialize` through one new login, opens a new transport, and answers it; the session
/// then works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_started_on_revoked_tokens_logs_in_again_before_answering_initialize() {
    let fx = fixtures(Duration::from_secs(3600)).await;
    let server = fx.resource().url().to_owned();
    let store = Store::new();
    login(&store, &server).await.expect_code(0);
    fx.auth().revoke_all_tokens();
    let args = ["proxy", server.as_str(), "--no-browser", "--port", "0", "--timeout", "30"];
    let mut proxy = spawn(store.command(&args), true);
    proxy.send(json!({
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": { "name": "host", "version": "1" }
        }
    }));
    let url = tokio::task::block_in_place(|| proxy.urls.recv_timeout(Duration::from_secs(30)))
        .unwrap_or_else(|_| panic!("no new authorization URL; stderr:\n{}", proxy.stderr()));
    visit(&url).await;
    let init = proxy.response(1);
    assert!(init["result"]["serverInfo"].is_object(), "{init}\n{}", proxy.stderr());
    proxy.send(json!({ "jsonrpc": "2.0", "method": "notifications/initialized" }));
    proxy.send(json!({
        "jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": { "name": "echo", "arguments": { "text": "after" } }
    }));
    let answer = proxy.response(2);
    assert_eq!(answer["result"]["content"][0]["text"], json!("after"), "{answer}");
    let outcome = proxy.finish();
    outcome.expect_code(0);
    assert_eq!(outcome.stderr.matches(URL_PREFIX).count(), 1, "one new prompt: {outcome:#?}");
    assert_eq!(fx.auth().stats().authorization_code_requests, 2);
}
