//! `mcp-connect import mcp-remote`: a user who switches keeps their login. The test writes an
//! mcp-remote directory as mcp-remote does (`mcp-remote-<version>/<md5 of the URL>_*.json`) with
//! a client and tokens the fixture authorization server issued.

use crate::common;

use std::time::Duration;

use common::Store;
use mcp_fixtures::{ClientAuth, ClientSpec, Fixtures};
use serde_json::json;

/// mcp-remote's files for `server` under `base`: a registered public client and tokens issued
/// to it. Returns the tokens' secrets.
fn mcp_remote_dir(fx: &Fixtures, base: &std::path::Path, server: &str) -> Vec<String> {
    let client = fx
        .auth()
        .register_client(
            ClientSpec::new(ClientAuth::None).redirect_uri("http://localhost:18211/oauth/callback"),
        )
        .unwrap();
    let tokens = fx.auth().issue_tokens(client.client_id(), "mcp:tools", Some(server));
    let dir = base.join("mcp-remote-0.1.29");
    std::fs::create_dir_all(&dir).unwrap();
    let hash = mcp_connect::mcp_remote_hash(server, None, &[]);
    std::fs::write(
        dir.join(format!("{hash}_client_info.json")),
        json!({
            "client_id": client.client_id(),
            "redirect_uris": ["http://localhost:18211/oauth/callback"],
            "token_endpoint_auth_method": "none",
            "client_name": "MCP CLI Proxy"
        })
        .to_string(),
    )
    .unwrap();
    std::fs::write(
        dir.join(format!("{hash}_tokens.json")),
        json!({
            "access_token": tokens.access_token(),
            "token_type": "Bearer",
            "expires_in": tokens.expires_in(),
            "refresh_token": tokens.refresh_token(),
            "scope": "mcp:tools"
        })
        .to_string(),
    )
    .unwrap();
    let mut secrets = vec![tokens.access_token().to_owned()];
    secrets.extend(tokens.refresh_token().map(str::to_owned));
    secrets
}

/// Imported, the login works at once with no browser step and no registration; once the access
/// token expires the imported refresh token is redeemed (once); a second import without
/// `--force` is refused; nothing printed holds a secret; `why` records the import.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mcp_remote_login_is_imported_and_refreshes() {
    let fx = Fixtures::start().await.unwrap();
    // Long enough that the refreshed token is not in its own refresh window (half its life)
    // while the command that refreshed it still runs.
    fx.auth().knobs().set_access_token_lifetime(Duration::from_secs(4));
    let server = fx.resource().url().to_owned();
    let base = tempfile::tempdir().unwrap();
    let secrets = mcp_remote_dir(&fx, base.path(), &server);
    let store = Store::new();
    let from = base.path().to_str().unwrap();

    let imported = store.run(&["import", "mcp-remote", &server, "--from", from]);
    imported.expect_code(0);
    assert!(imported.stdout.contains("with a refresh token"), "{imported:#?}");
    let registrations = fx.auth().stats().registrations;
    let call = store.run(&["call", &server, "echo", r#"{"text":"imported"}"#]);
    call.expect_code(0);
    assert_eq!(call.stdout.trim(), "imported");
    mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(4500)).await;
    let after = store.run(&["call", &server, "echo", r#"{"text":"refreshed"}"#]);
    after.expect_code(0);
    let stats = fx.auth().stats();
    assert_eq!(stats.refresh_token_requests, 1, "{stats:?}");
    assert_eq!(stats.max_refresh_redemptions(), 1);
    assert_eq!(stats.registrations, registrations, "no new registration");
    assert_eq!(stats.authorization_requests, 0, "no browser step");

    let again = store.run(&["import", "mcp-remote", &server, "--from", from]);
    again.expect_code(2);
    assert!(again.stderr.contains("--force"), "{again:#?}");
    let why = store.run(&["why", &server]);
    assert!(why.stdout.contains("import"), "{why:#?}");
    for out in [&imported, &call, &after, &again, &why] {
        for secret in &secrets {
            assert!(!out.all().contains(secret.as_str()), "a secret was printed: {out:#?}");
        }
    }
}

/// Nothing to import (another server's files, a malformed file): invalid input (exit 2) with a
/// message that names the file and quotes none of its contents; nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_malformed_mcp_remote_login_is_refused_clearly() {
    let fx = Fixtures::start().await.unwrap();
    let server = fx.resource().url().to_owned();
    let base = tempfile::tempdir().unwrap();
    let secrets = mcp_remote_dir(&fx, base.path(), "http://127.0.0.1:9/other");
    let store = Store::new();
    let from = base.path().to_str().unwrap();
    let out = store.run(&["import", "mcp-remote", &server, "--from", from]);
    out.expect_code(2);
    assert!(out.stderr.contains("no tokens for this server"), "{out:#?}");

    let hash = mcp_connect::mcp_remote_hash(&server, None, &[]);
    let dir = base.path().join("mcp-remote-0.1.29");
    std::fs::write(
        dir.join(format!("{hash}_tokens.json")),
        format!("{{\"access_token\": 7, \"refresh_token\": \"{}\"}}", secrets[0]),
    )
    .unwrap();
    std::fs::write(dir.join(format!("{hash}_client_info.json")), "{}").unwrap();
    let out = store.run(&["import", "mcp-remote", &server, "--from", from]);
    out.expect_code(2);
    assert!(out.stderr.contains("access_token"), "{out:#?}");
    assert!(!out.all().contains(&secrets[0]), "{out:#?}");
    let status = store.run(&["status"]);
    assert!(status.stdout.contains("No servers stored"), "{status:#?}");
}
