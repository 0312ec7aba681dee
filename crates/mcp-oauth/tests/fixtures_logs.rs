//! A full run against the fixture servers with every tracing event captured at TRACE level
//! (this crate, the fixtures, rmcp, hyper), proving that no token, secret, code, state or PKCE
//! verifier reaches the logs or the `Debug`/`Display` output of the values involved.
//!
//! The only test in its binary, with a global subscriber: tracing caches per-callsite interest,
//! so a thread-local subscriber next to concurrently running tests can miss events.

#[path = "it/e2e/mod.rs"]
mod e2e;

use std::io::Write;
use std::sync::{Arc, Mutex};

use e2e::{Env, Mcp, REDIRECT, pre_registered, tool_text};
use mcp_fixtures::{ClientAuth, ClientSpec};
use mcp_oauth::{TokenEndpointAuthMethod, select_scope};
use serde_json::json;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[tokio::test(flavor = "current_thread")]
async fn a_full_run_at_trace_level_logs_no_secret() {
    let logs = Captured::default();
    let sink = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || sink.clone())
        .finish();
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let env = Env::start().await;
    env.fx.auth().knobs().set_reuse_detection(true);
    let client = env
        .fx
        .auth()
        .register_client(ClientSpec::new(ClientAuth::ClientSecretBasic).redirect_uri(REDIRECT))
        .unwrap();
    let secret = client.client_secret().unwrap().to_owned();
    let (challenge, discovery) = env.discover().await;
    let config = pre_registered(
        env.fx.auth().issuer(),
        client.client_id(),
        Some(&secret),
        TokenEndpointAuthMethod::ClientSecretBasic,
    );
    let registration = env.client.register(&discovery, &config).await.unwrap();
    let scope = select_scope(Some(&challenge), &discovery);
    let (url, pending) = env
        .client
        .authorization_url(&discovery, &registration, REDIRECT, scope.as_deref())
        .unwrap();
    let callback = env.client.authorize_without_browser(&url).await.unwrap();
    let tokens =
        env.client.exchange_code(&discovery, &registration, &pending, &callback).await.unwrap();
    let mut mcp = Mcp::open(&env, tokens.access_token.secret()).await;
    tool_text(&mcp.call_tool(tokens.access_token.secret(), "echo", json!({"text": "x"})).await);
    let first_rt = tokens.refresh_token.clone().unwrap();
    let refreshed =
        env.client.refresh(&discovery, &registration, &first_rt, scope.as_deref()).await.unwrap();
    // Errors are logged too: a reuse detection and a failed exchange.
    let reuse = env
        .client
        .refresh(&discovery, &registration, &first_rt, scope.as_deref())
        .await
        .unwrap_err();
    let replay =
        env.client.exchange_code(&discovery, &registration, &pending, &callback).await.unwrap_err();
    env.client
        .revoke(
            &discovery,
            &registration,
            refreshed.refresh_token.as_ref(),
            Some(&refreshed.access_token),
        )
        .await
        .unwrap();

    let logged = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(logged.contains("token request"), "the capture works");
    // Both sides and the HTTP stack were captured, not only this crate.
    for target in ["mcp_oauth::", "mcp_fixtures::", "hyper_util::"] {
        assert!(logged.contains(target), "no {target} events captured");
    }
    let debug = format!(
        "{pending:?} {callback:?} {tokens:?} {refreshed:?} {registration:?} {config:?} {reuse:?} {replay:?} {reuse} {replay}"
    );
    let basic = base64(format!("{}:{secret}", client.client_id()).as_bytes());
    let mut secrets = vec![
        secret.as_str(),
        basic.as_str(),
        pending.verifier.secret(),
        pending.state.secret(),
        callback.code.as_ref().unwrap().secret(),
        tokens.access_token.secret(),
        first_rt.secret(),
        refreshed.access_token.secret(),
    ];
    let latest_rt = refreshed.refresh_token.clone().unwrap();
    secrets.push(latest_rt.secret());
    for s in secrets {
        assert!(!logged.contains(s), "a secret reached the logs");
        assert!(!debug.contains(s), "a secret reached Debug or Display output");
    }
}
