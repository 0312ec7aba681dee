//! Bad input: each failure gets a clear message and its documented exit code, and what the store
//! held before (a logged-in server) is still there afterwards.

use crate::common;

use std::time::Duration;

use common::{Store, dead_port, login, snapshot};
use futures::StreamExt as _;
use mcp_clock::SystemClock;
use mcp_fixtures::{Approval, AuthServer, Fixtures, ResourceServer};
use serde_json::Value;

/// A store logged in to a fixture server.
async fn logged_in() -> (Fixtures, Store, String) {
    let fx = Fixtures::start().await.unwrap();
    let server = fx.resource().url().to_owned();
    let store = Store::new();
    login(&store, &server).await.expect_code(0);
    (fx, store, server)
}

#[track_caller]
fn assert_still_logged_in(store: &Store, server: &str) {
    let status = store.run(&["--json", "status"]);
    status.expect_code(0);
    let parsed: Value = serde_json::from_str(&status.stdout).unwrap();
    let entry = parsed["servers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["server"] == server)
        .unwrap_or_else(|| panic!("{server} is no longer stored: {status:#?}"));
    assert_eq!(entry["has_refresh_token"], Value::from(true), "{status:#?}");
    assert!(entry["needs_login"].is_null(), "{status:#?}");
    store.run(&["call", server, "echo", r#"{"text":"still here"}"#]).expect_code(0);
}

/// Nothing listens at the address: exit 3 for `tools` and `login`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_exit_3() {
    let (_fx, store, server) = logged_in().await;
    let dead = format!("http://127.0.0.1:{}/mcp", dead_port());
    for args in [vec!["tools", dead.as_str()], vec!["login", dead.as_str(), "--port", "0"]] {
        let out = store.run(&args);
        out.expect_code(3);
        assert!(out.stderr.contains("cannot reach"), "{out:#?}");
    }
    let out = store.run(&["--json", "tools", dead.as_str()]);
    out.expect_code(3);
    let parsed: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(parsed["error"]["exit_code"], Value::from(3), "{out:#?}");
    assert!(parsed["error"]["message"].as_str().unwrap().contains("cannot reach"), "{out:#?}");
    assert_still_logged_in(&store, &server);
}

/// A web server that is not MCP (a 404 page, an HTML page): exit 4 for `tools` and `login`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_is_not_mcp_is_exit_4() {
    use axum::http::StatusCode;
    use axum::response::Html;
    let (_fx, store, server) = logged_in().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new()
        .route("/html", axum::routing::any(|| async { Html("<html><body>hello</body></html>") }))
        .fallback(|| async { (StatusCode::NOT_FOUND, Html("<html>not found</html>")) });
    tokio::spawn(async move { axum::serve(listener, app).await });
    for path in ["/mcp", "/html"] {
        let url = format!("{base}{path}");
        for args in [vec!["tools", url.as_str()], vec!["login", url.as_str(), "--port", "0"]] {
            let out = store.run(&args);
            out.expect_code(4);
            assert!(out.stderr.contains("does not answer as an MCP server"), "{out:#?}");
        }
    }
    assert_still_logged_in(&store, &server);
}

/// The authorization server offers no registration (no dynamic registration, no client
/// metadata documents): exit 6 naming the registration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_registration_is_exit_6() {
    let (_fx, store, server) = logged_in().await;
    let auth = AuthServer::builder()
        .dynamic_registration(false)
        .client_metadata_documents(false)
        .spawn()
        .await
        .unwrap();
    let resource = ResourceServer::builder(&auth).spawn().await.unwrap();
    let out = store.run(&["login", resource.url(), "--port", "0", "--no-browser"]);
    out.expect_code(6);
    assert!(out.stderr.contains("registration"), "{out:#?}");
    assert_eq!(auth.stats().authorization_requests, 0);
    assert_still_logged_in(&store, &server);
}

/// The user never completes the browser step: after `--timeout` the login ends with exit 7 and
/// a message that says so (and how to allow more time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_step_never_completed_is_exit_7() {
    let (_fx, store, server) = logged_in().await;
    let other = Fixtures::start().await.unwrap();
    other.auth().knobs().set_approval(Approval::Manual);
    let started = SystemClock::instant();
    let out = store.run(&["login", other.resource().url(), "--port", "0", "--timeout", "2"]);
    out.expect_code(7);
    assert!(out.stderr.contains("not completed within 2s"), "{out:#?}");
    assert!(out.stderr.contains("--timeout"), "{out:#?}");
    let took = SystemClock::instant() - started;
    assert!(took < Duration::from_secs(30), "bounded: {took:?}");
    assert_still_logged_in(&store, &server);
}

/// A store that cannot be read (a different key file; a damaged database): exit 9, and the
/// store is left as it was, so restoring the key or the files brings everything back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_store_is_exit_9_and_left_untouched() {
    let (_fx, store, server) = logged_in().await;
    let key = store.path().join("key");
    let original_key = std::fs::read(&key).unwrap();
    std::fs::write(&key, format!("default:{}\n", "11".repeat(32))).unwrap();
    for args in [vec!["status"], vec!["tools", server.as_str()], vec!["logout", server.as_str()]] {
        let out = store.run(&args);
        out.expect_code(9);
        assert!(out.stderr.contains("unreadable"), "{out:#?}");
        assert!(out.stderr.contains("left untouched"), "{out:#?}");
    }
    std::fs::write(&key, original_key).unwrap();
    assert_still_logged_in(&store, &server);

    let db = store.path().join("db");
    let before = snapshot(&db);
    for (path, _) in &before {
        std::fs::write(path, b"this is not a sled database").unwrap();
    }
    let damaged = snapshot(&db);
    let out = store.run(&["status"]);
    out.expect_code(9);
    assert!(out.stderr.contains("unreadable"), "{out:#?}");
    assert_eq!(snapshot(&db), damaged, "the damaged store was not written to");
    for (path, bytes) in &before {
        std::fs::write(path, bytes).unwrap();
    }
    assert_still_logged_in(&store, &server);
}

/// Another process holds the store lock and does not let go: after `--lock-timeout` the command
/// ends with exit 8 instead of hanging; once the lock is free everything is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_store_is_exit_8_not_a_hang() {
    let (_fx, store, server) = logged_in().await;
    let lock =
        std::fs::OpenOptions::new().write(true).open(store.path().join("store.lock")).unwrap();
    lock.lock().unwrap();
    let started = SystemClock::instant();
    for args in
        [vec!["--lock-timeout", "1", "status"], vec!["--lock-timeout", "1", "tools", &server]]
    {
        let out = store.run(&args);
        out.expect_code(8);
        assert!(out.stderr.contains("locked by another process"), "{out:#?}");
    }
    let took = SystemClock::instant() - started;
    assert!(took < Duration::from_secs(20), "bounded: {took:?}");
    lock.unlock().unwrap();
    assert_still_logged_in(&store, &server);
}

/// `--json` with `proxy`: stdout is the host's JSON-RPC stream, so the error (exit 3 here) is
/// printed as JSON on stderr and stdout stays empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_prints_json_errors_on_stderr_never_on_stdout() {
    let store = Store::new();
    let dead = format!("http://127.0.0.1:{}/mcp", dead_port());
    let out = store.run(&["--json", "proxy", dead.as_str(), "--port", "0"]);
    out.expect_code(3);
    assert!(out.stdout.is_empty(), "{out:#?}");
    let line =
        out.stderr.lines().find(|l| l.starts_with('{')).unwrap_or_else(|| panic!("{out:#?}"));
    let parsed: Value = serde_json::from_str(line).unwrap();
    assert_eq!(parsed["error"]["exit_code"], Value::from(3), "{out:#?}");
}

/// Bytes on stdin that are not UTF-8 are invalid input (exit 2, said on stderr), not the end
/// of the host's input (which was exit 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_on_a_proxys_stdin_is_exit_2_not_an_end() {
    use std::io::Write as _;
    let (_fx, store, server) = logged_in().await;
    let mut proxy = common::spawn(store.command(&["proxy", server.as_str()]), true);
    proxy.send(serde_json::json!({
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": { "name": "host", "version": "1" }
        }
    }));
    assert!(proxy.response(1)["result"].is_object());
    let stdin = proxy.stdin.as_mut().unwrap();
    stdin.write_all(b"{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"ping\xff\xfe\"}\n").unwrap();
    stdin.flush().unwrap();
    // The process ends by itself: it does not wait for stdin to close.
    let status = tokio::task::block_in_place(|| {
        for _ in 0..300 {
            if let Some(status) = proxy.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    });
    assert!(status.is_some(), "the proxy did not stop; stderr:\n{}", proxy.stderr());
    let out = tokio::task::block_in_place(|| proxy.finish());
    out.expect_code(2);
    assert!(out.stderr.contains("not UTF-8"), "{out:#?}");
}

/// A store logged in to a fixture server whose access tokens live one second, then past expiry.
async fn logged_in_and_expired() -> (Fixtures, Store, String) {
    let fx = Fixtures::start().await.unwrap();
    fx.auth().knobs().set_access_token_lifetime(Duration::from_secs(1));
    let server = fx.resource().url().to_owned();
    let store = Store::new();
    login(&store, &server).await.expect_code(0);
    mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(1500)).await;
    (fx, store, server)
}

/// The token endpoint answers 503 to the refresh: exit 12 ("unavailable for now", not
/// "authorization failed" and not "log in again"); the stored credentials are kept and the same
/// command works once the server is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authorization_server_in_trouble_is_exit_12_and_keeps_the_credentials() {
    let (fx, store, server) = logged_in_and_expired().await;
    fx.auth()
        .knobs()
        .fail_token_requests(mcp_fixtures::InjectedFailure::server_error(1).times(1000));
    let out = store.run(&["tools", &server]);
    out.expect_code(12);
    assert!(out.stderr.contains("unavailable for now"), "{out:#?}");
    assert!(fx.auth().stats().injected_failures >= 1);
    fx.auth().knobs().clear_failure();
    assert_still_logged_in(&store, &server);
}

/// Another process holds the refresh lease of the server's tokens and does not let go: the
/// command gives up after `--lock-timeout` with exit 13, having sent no refresh request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peers_refresh_that_does_not_end_is_exit_13() {
    let (fx, store, server) = logged_in_and_expired().await;
    // One refresh creates the lease's lock file.
    store.run(&["tools", &server]).expect_code(0);
    let locks: Vec<_> = std::fs::read_dir(store.path().join("refresh-locks"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "lock"))
        .collect();
    assert_eq!(locks.len(), 1, "{locks:?}");
    mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(1500)).await;
    let lock = std::fs::OpenOptions::new().write(true).open(&locks[0]).unwrap();
    lock.lock().unwrap();
    let refreshes = fx.auth().stats().refresh_token_requests;
    let out = store.run(&["--lock-timeout", "1", "tools", &server]);
    out.expect_code(13);
    assert!(out.stderr.contains("refreshing the tokens"), "{out:#?}");
    assert_eq!(fx.auth().stats().refresh_token_requests, refreshes, "nothing was sent");
    lock.unlock().unwrap();
    assert_still_logged_in(&store, &server);
}

/// `status` and `why` only read: while a peer holds a refresh lease (a refresh in progress)
/// they answer at once instead of waiting for it at their exit. The bound (20 s against a 600 s
/// lock wait) only tells "answered" from "waited".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_why_never_wait_on_a_peers_refresh() {
    let (_fx, store, server) = logged_in_and_expired().await;
    store.run(&["tools", &server]).expect_code(0);
    let lock_path = std::fs::read_dir(store.path().join("refresh-locks"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "lock"))
        .unwrap();
    let lock = std::fs::OpenOptions::new().write(true).open(&lock_path).unwrap();
    lock.lock().unwrap();
    for args in
        [vec!["--lock-timeout", "600", "status"], vec!["--lock-timeout", "600", "why", &server]]
    {
        let mut child = store.command(&args).stdout(std::process::Stdio::null()).spawn().unwrap();
        let mut waited = Duration::ZERO;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            assert!(waited < Duration::from_secs(20), "{args:?} waited for the peer's refresh");
            mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(50)).await;
            waited += Duration::from_millis(50);
        };
        assert!(status.success(), "{args:?}");
    }
    lock.unlock().unwrap();
}

/// A tool that takes longer than `--request-timeout`: exit 14 naming the request, and the same
/// call with a longer limit succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_the_request_timeout_is_exit_14() {
    let (_fx, store, server) = logged_in().await;
    let out = store.run(&["--request-timeout", "1", "call", &server, "slow", r#"{"ms":3000}"#]);
    out.expect_code(14);
    assert!(out.stderr.contains("did not answer call_tool"), "{out:#?}");
    let out = store.run(&["--request-timeout", "10", "call", &server, "slow", r#"{"ms":100}"#]);
    out.expect_code(0);
}

/// An MCP server that accepts the connection and never answers: exit 14 after
/// `--request-timeout`, not a hang and not "not an MCP server".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mcp_server_that_never_answers_is_exit_14() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/mcp", listener.local_addr().unwrap());
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = held.clone();
    let silent = tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            keep.lock().unwrap().push(socket);
        }
    });
    let store = Store::new();
    let out = tokio::task::block_in_place(|| store.run(&["--request-timeout", "1", "tools", &url]));
    out.expect_code(14);
    assert!(out.stderr.contains("did not answer"), "{out:#?}");
    silent.abort();
}

/// An MCP server whose metadata names an authorization server at a private address (as a
/// hostile server might, to reach the user's network): refused before any request is sent to
/// it, with a message naming the address kind and the flag that allows it. (The flag's effect on
/// the policy is pinned by a unit test: tests reach only loopback.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_authorization_server_is_refused_without_the_flag() {
    use axum::http::{StatusCode, header};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let prm = serde_json::json!({
        "resource": format!("{base}/mcp"),
        "authorization_servers": ["https://10.255.255.1"],
    });
    let challenge =
        format!("Bearer resource_metadata=\"{base}/.well-known/oauth-protected-resource/mcp\"");
    let app = axum::Router::new()
        .route(
            "/.well-known/oauth-protected-resource/mcp",
            axum::routing::get(move || async move { axum::Json(prm) }),
        )
        .fallback(move || async move {
            (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, challenge)], "")
        });
    tokio::spawn(async move { axum::serve(listener, app).await });
    let store = Store::new();
    let url = format!("{base}/mcp");
    let out = store.run(&["login", &url, "--port", "0", "--no-browser", "--timeout", "5"]);
    out.expect_code(6);
    assert!(out.stderr.contains("private addresses are not allowed"), "{out:#?}");
    assert!(out.stderr.contains("--allow-private-network"), "{out:#?}");
}

/// A server that speaks only the legacy HTTP+SSE transport (MCP 2024-11-05: POST refused, GET
/// opens an event stream announcing an `endpoint`): exit 4 with a message that names the
/// transport and what to ask for instead; `--transport sse-only` is refused up front.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legacy_sse_server_is_named_as_such() {
    use axum::http::{StatusCode, header};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let sse = || async {
        let stream = futures::stream::iter([Ok::<_, std::convert::Infallible>(
            "event: endpoint\ndata: /messages?sessionId=1\n\n",
        )])
        .chain(futures::stream::pending());
        ([(header::CONTENT_TYPE, "text/event-stream")], axum::body::Body::from_stream(stream))
    };
    let app = axum::Router::new()
        .route("/sse", axum::routing::get(sse).post(|| async { StatusCode::METHOD_NOT_ALLOWED }));
    tokio::spawn(async move { axum::serve(listener, app).await });
    let store = Store::new();
    let url = format!("{base}/sse");
    let out = store.run(&["tools", &url]);
    out.expect_code(4);
    assert!(out.stderr.contains("legacy HTTP+SSE transport"), "{out:#?}");
    let out = store.run(&["login", &url, "--port", "0", "--no-browser", "--timeout", "5"]);
    out.expect_code(4);
    assert!(out.stderr.contains("legacy HTTP+SSE transport"), "{out:#?}");
    let out = store.run(&["tools", &url, "--transport", "sse-only"]);
    out.expect_code(2);
    assert!(out.stderr.contains("sse-only"), "{out:#?}");
}
