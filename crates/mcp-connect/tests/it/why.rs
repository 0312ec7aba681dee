//! `mcp-connect why`: the story of a server's credentials, newest first, from the event log that
//! every process writes into the store, with no secret in it.

use crate::common;

use std::time::Duration;

use common::{Store, login, spawn};
use mcp_fixtures::Fixtures;
use serde_json::Value;

/// A login, a refresh by a `call` process, a revocation that makes the next refresh fail and a
/// command need a login, a new login and a logout: `why` tells them in that order (newest
/// first), names the process that sent the refresh, and `status` shows the last one. The log
/// holds no token, refresh token or client secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn why_tells_a_refresh_a_revocation_and_a_relogin_newest_first() {
    let fx = Fixtures::start().await.unwrap();
    // Long enough that a refreshed token is not already in its own refresh window (half its
    // lifetime) while the command that refreshed it still runs.
    fx.auth().knobs().set_access_token_lifetime(Duration::from_secs(4));
    let server = fx.resource().url().to_owned();
    let store = Store::new();
    login(&store, &server).await.expect_code(0);
    let mut secrets = store.secrets(&server).await;

    mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(4500)).await;
    let call = spawn(store.command(&["call", &server, "echo", r#"{"text":"x"}"#]), false);
    let call_pid = call.child.id();
    tokio::task::block_in_place(|| call.finish()).expect_code(0);
    assert_eq!(fx.auth().stats().refresh_token_requests, 1);
    secrets.extend(store.secrets(&server).await);

    // Revoked: the next request is refused (401), and the refresh is refused too.
    fx.auth().revoke_all_tokens();
    store.run(&["tools", &server]).expect_code(5);
    login(&store, &server).await.expect_code(0);
    secrets.extend(store.secrets(&server).await);

    let status = store.run(&["status"]);
    assert!(
        status.stdout.contains("last event:") && status.stdout.contains("login"),
        "{status:#?}"
    );

    store.run(&["logout", &server]).expect_code(0);
    let out = store.run(&["--json", "why", &server]);
    out.expect_code(0);
    let parsed: Value = serde_json::from_str(&out.stdout).unwrap();
    let events = parsed["events"].as_array().unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    // The test's logins listen on `--port 0`, a new port each time: the second one registers
    // a client for its port, and says so.
    assert_eq!(
        kinds,
        [
            "logout",
            "login",
            "registration",
            "login-needed",
            "refresh",
            "refresh",
            "login",
            "registration"
        ],
        "{out:#?}"
    );
    let detail = |i: usize| events[i]["detail"].as_str().unwrap();
    assert!(detail(0).contains("revocation: revoked"), "{}", detail(0));
    assert!(detail(3).contains("invalid_grant"), "{}", detail(3));
    assert!(detail(4).contains("refused") && detail(4).contains("invalid_grant"), "{}", detail(4));
    assert!(detail(5).starts_with("ok"), "{}", detail(5));
    assert_eq!(events[5]["pid"].as_u64(), Some(u64::from(call_pid)), "the refreshing process");
    let times: Vec<u64> = events.iter().map(|e| e["at"].as_u64().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "newest first: {times:?}");

    let text = store.run(&["why", &server]);
    text.expect_code(0);
    assert!(text.stdout.contains("(newest first)") && text.stdout.contains("GMT"), "{text:#?}");

    let log = std::fs::read_to_string(store.path().join("events.log")).unwrap();
    assert!(!secrets.is_empty());
    for secret in &secrets {
        assert!(!log.contains(secret.as_str()), "a secret is in the event log");
        assert!(!text.all().contains(secret.as_str()));
    }
}
