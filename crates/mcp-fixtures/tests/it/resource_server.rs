//! The MCP resource server through real HTTP on 127.0.0.1: protected-resource metadata,
//! challenges, scope checks, and tool calls with rmcp's own streamable-HTTP client.

use crate::common;

use std::time::Duration;

use common::*;
use mcp_clock::ManualClock;
use mcp_fixtures::{AuthServer, ClientAuth, ClientSpec, Fixtures, KnobSettings, ResourceServer};
use rmcp::model::CallToolRequestParams;
use rmcp::service::RunningService;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::{RoleClient, ServiceExt};
use serde_json::{Value, json};

const INITIALIZE: &str = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"0"}}}"#;

async fn post_mcp(url: &str, token: Option<&str>, body: &str) -> reqwest::Response {
    let mut req = http()
        .post(url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(body.to_owned());
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    req.send().await.unwrap()
}

fn challenge(resp: &reqwest::Response) -> String {
    resp.headers()["www-authenticate"].to_str().unwrap().to_owned()
}

async fn connect(url: &str, token: &str) -> RunningService<RoleClient, ()> {
    let config =
        StreamableHttpClientTransportConfig::with_uri(url.to_owned()).auth_header(token.to_owned());
    let transport = StreamableHttpClientTransport::with_client(http(), config);
    mcp_clock::within(&mcp_clock::SystemClock, Duration::from_secs(10), ().serve(transport))
        .await
        .expect("handshake hangs")
        .expect("handshake")
}

fn text(result: &rmcp::model::CallToolResult) -> String {
    result.content[0].as_text().expect("text content").text.clone()
}

fn args(v: Value) -> serde_json::Map<String, Value> {
    v.as_object().unwrap().clone()
}

#[tokio::test]
async fn protected_resource_metadata_at_path_and_root() {
    let fx = Fixtures::start().await.unwrap();
    let rs = fx.resource();
    assert_eq!(
        rs.resource_metadata_url(),
        format!("{}/.well-known/oauth-protected-resource/mcp", rs.base_url())
    );
    for url in [
        rs.resource_metadata_url().to_owned(),
        format!("{}/.well-known/oauth-protected-resource", rs.base_url()),
    ] {
        let doc: Value = http().get(&url).send().await.unwrap().json().await.unwrap();
        assert_eq!(doc["resource"], rs.url());
        assert_eq!(doc["authorization_servers"], json!([fx.auth().issuer()]));
        assert_eq!(
            doc["scopes_supported"],
            json!(["mcp:tools", "mcp:read", "mcp:write", "offline_access"])
        );
    }
}

#[tokio::test]
async fn metadata_locations_can_be_switched_off() {
    let auth = AuthServer::builder().spawn().await.unwrap();
    let rs = ResourceServer::builder(&auth)
        .root_metadata(false)
        .scopes_supported(None::<Vec<String>>)
        .spawn()
        .await
        .unwrap();
    let root = http()
        .get(format!("{}/.well-known/oauth-protected-resource", rs.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(root.status(), 404);
    let doc: Value =
        http().get(rs.resource_metadata_url()).send().await.unwrap().json().await.unwrap();
    assert!(doc.get("scopes_supported").is_none());
    let rs = ResourceServer::builder(&auth).path_metadata(false).spawn().await.unwrap();
    assert_eq!(
        rs.resource_metadata_url(),
        format!("{}/.well-known/oauth-protected-resource", rs.base_url())
    );
    let path = http()
        .get(format!("{}/.well-known/oauth-protected-resource/mcp", rs.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(path.status(), 404);
}

#[tokio::test]
async fn missing_and_unknown_tokens_get_401_with_a_correct_challenge() {
    let fx = Fixtures::start().await.unwrap();
    let rs = fx.resource();
    let resp = post_mcp(rs.url(), None, INITIALIZE).await;
    assert_eq!(resp.status(), 401);
    assert_eq!(
        challenge(&resp),
        format!("Bearer resource_metadata=\"{}\", scope=\"mcp:tools\"", rs.resource_metadata_url())
    );
    let resp = post_mcp(rs.url(), Some("at_made_up"), INITIALIZE).await;
    assert_eq!(resp.status(), 401);
    let c = challenge(&resp);
    assert!(c.starts_with(&format!(
        "Bearer resource_metadata=\"{}\", scope=\"mcp:tools\"",
        rs.resource_metadata_url()
    )));
    assert!(c.contains("error=\"invalid_token\""), "{c}");
    assert_eq!(rs.stats().unauthorized, 2);
}

#[tokio::test]
async fn expired_tokens_get_401_or_the_status_the_knob_says() {
    let clock = ManualClock::default();
    let fx = Fixtures::start_with(clock.shared(), KnobSettings::default()).await.unwrap();
    fx.auth().knobs().set_access_token_lifetime(Duration::from_secs(30));
    let client = register(fx.auth(), ClientAuth::None);
    let tokens = fx.auth().issue_tokens(&client.id, "mcp:tools", Some(fx.resource().url()));
    assert_eq!(
        post_mcp(fx.resource().url(), Some(tokens.access_token()), INITIALIZE).await.status(),
        200
    );
    clock.advance(Duration::from_secs(30));
    let resp = post_mcp(fx.resource().url(), Some(tokens.access_token()), INITIALIZE).await;
    assert_eq!(resp.status(), 401);
    assert!(challenge(&resp).contains("error=\"invalid_token\""));
    fx.auth().knobs().set_expired_token_status(400);
    let resp = post_mcp(fx.resource().url(), Some(tokens.access_token()), INITIALIZE).await;
    assert_eq!(resp.status(), 400, "the misbehaving server answers 400 for an expired token");
}

#[tokio::test]
async fn the_omit_challenge_knob_answers_401_without_www_authenticate() {
    let clock = ManualClock::default();
    let fx = Fixtures::start_with(clock.shared(), KnobSettings::default()).await.unwrap();
    fx.auth().knobs().set_access_token_lifetime(Duration::from_secs(30));
    let client = register(fx.auth(), ClientAuth::None);
    let tokens = fx.auth().issue_tokens(&client.id, "mcp:tools", Some(fx.resource().url()));
    clock.advance(Duration::from_secs(30));
    let resp = post_mcp(fx.resource().url(), Some(tokens.access_token()), INITIALIZE).await;
    assert_eq!(resp.status(), 401);
    assert!(resp.headers().get("www-authenticate").is_some(), "a challenge by default");
    fx.auth().knobs().set_omit_challenge(true);
    let resp = post_mcp(fx.resource().url(), Some(tokens.access_token()), INITIALIZE).await;
    assert_eq!(resp.status(), 401);
    assert!(resp.headers().get("www-authenticate").is_none(), "a bare 401");
    let resp = post_mcp(fx.resource().url(), None, INITIALIZE).await;
    assert_eq!(resp.status(), 401);
    assert!(resp.headers().get("www-authenticate").is_none(), "a bare 401 without a token too");
}

#[tokio::test]
async fn tokens_for_another_resource_or_without_the_base_scope_are_refused() {
    let fx = Fixtures::start().await.unwrap();
    let client = register(fx.auth(), ClientAuth::None);
    let elsewhere = fx.auth().issue_tokens(&client.id, "mcp:tools", Some("http://127.0.0.1:1/mcp"));
    let resp = post_mcp(fx.resource().url(), Some(elsewhere.access_token()), INITIALIZE).await;
    assert_eq!(resp.status(), 401);
    let read_only = fx.auth().issue_tokens(&client.id, "mcp:read", None);
    let resp = post_mcp(fx.resource().url(), Some(read_only.access_token()), INITIALIZE).await;
    assert_eq!(resp.status(), 403);
    assert!(
        challenge(&resp).starts_with("Bearer error=\"insufficient_scope\", scope=\"mcp:tools\"")
    );
}

#[tokio::test]
async fn tools_echo_slow_and_counter_through_the_rmcp_client() {
    let fx = Fixtures::start().await.unwrap();
    let client = register(fx.auth(), ClientAuth::None);
    let tokens =
        fx.auth().issue_tokens(&client.id, "mcp:tools mcp:write", Some(fx.resource().url()));
    let mcp = connect(fx.resource().url(), tokens.access_token()).await;
    let mut names: Vec<String> =
        mcp.list_all_tools().await.unwrap().into_iter().map(|t| t.name.to_string()).collect();
    names.sort();
    assert_eq!(names, ["counter", "echo", "slow"]);
    let echoed = mcp
        .call_tool(CallToolRequestParams::new("echo").with_arguments(args(json!({"text": "hi"}))))
        .await
        .unwrap();
    assert_eq!(text(&echoed), "hi");
    let slept = mcp
        .call_tool(CallToolRequestParams::new("slow").with_arguments(args(json!({"ms": 20}))))
        .await
        .unwrap();
    assert_eq!(text(&slept), "slept 20 ms");
    for expected in ["1", "2"] {
        assert_eq!(
            text(&mcp.call_tool(CallToolRequestParams::new("counter")).await.unwrap()),
            expected
        );
    }
    assert_eq!(fx.resource().counter(), 2);
    let stats = fx.resource().stats();
    assert_eq!(
        (stats.tool_calls["echo"], stats.tool_calls["slow"], stats.tool_calls["counter"]),
        (1, 1, 2)
    );
    mcp.cancel().await.unwrap();
}

#[tokio::test]
async fn a_tool_that_needs_more_scope_gets_403_insufficient_scope() {
    let fx = Fixtures::start().await.unwrap();
    let client = register(fx.auth(), ClientAuth::None);
    let tokens = fx.auth().issue_tokens(&client.id, "mcp:tools", Some(fx.resource().url()));
    // Raw HTTP: the exact challenge.
    let call = r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"counter","arguments":{}}}"#;
    let resp = post_mcp(fx.resource().url(), Some(tokens.access_token()), call).await;
    assert_eq!(resp.status(), 403);
    let c = challenge(&resp);
    assert!(
        c.starts_with("Bearer error=\"insufficient_scope\", scope=\"mcp:tools mcp:write\""),
        "{c}"
    );
    assert!(
        c.contains(&format!("resource_metadata=\"{}\"", fx.resource().resource_metadata_url()))
    );
    // Through rmcp: echo works, counter fails with the challenge, and never ran.
    let mcp = connect(fx.resource().url(), tokens.access_token()).await;
    mcp.call_tool(CallToolRequestParams::new("echo").with_arguments(args(json!({"text": "x"}))))
        .await
        .unwrap();
    let err = mcp.call_tool(CallToolRequestParams::new("counter")).await.unwrap_err();
    assert!(err.auth_challenge().is_some_and(|c| c.contains("insufficient_scope")), "{err:?}");
    assert_eq!(fx.resource().counter(), 0);
    assert_eq!(fx.resource().stats().forbidden, 2);
}

#[tokio::test]
async fn tool_scopes_are_configurable() {
    let auth = AuthServer::builder().spawn().await.unwrap();
    let rs = ResourceServer::builder(&auth)
        .required_scopes(["mcp:read"])
        .tool_scopes("counter", Vec::<String>::new())
        .tool_scopes("echo", ["mcp:write"])
        .spawn()
        .await
        .unwrap();
    let client = register(&auth, ClientAuth::None);
    let tokens = auth.issue_tokens(&client.id, "mcp:read", None);
    let mcp = connect(rs.url(), tokens.access_token()).await;
    assert_eq!(text(&mcp.call_tool(CallToolRequestParams::new("counter")).await.unwrap()), "1");
    let err = mcp
        .call_tool(CallToolRequestParams::new("echo").with_arguments(args(json!({"text": "x"}))))
        .await
        .unwrap_err();
    assert!(
        err.auth_challenge().is_some_and(|c| c.contains("scope=\"mcp:read mcp:write\"")),
        "{err:?}"
    );
}

#[tokio::test]
async fn revoking_mid_session_turns_the_next_call_into_a_401_challenge() {
    let fx = Fixtures::start().await.unwrap();
    let client = register(fx.auth(), ClientAuth::None);
    let tokens = fx.auth().issue_tokens(&client.id, "mcp:tools", Some(fx.resource().url()));
    let mcp = connect(fx.resource().url(), tokens.access_token()).await;
    mcp.call_tool(
        CallToolRequestParams::new("echo").with_arguments(args(json!({"text": "before"}))),
    )
    .await
    .unwrap();
    fx.auth().revoke_all_tokens();
    let err = mcp
        .call_tool(
            CallToolRequestParams::new("echo").with_arguments(args(json!({"text": "after"}))),
        )
        .await
        .unwrap_err();
    assert!(err.is_authorization_required(), "{err:?}");
    let c = err.auth_challenge().unwrap();
    assert!(c.contains("error=\"invalid_token\"") && c.contains("resource_metadata="), "{c}");
}

#[tokio::test]
async fn a_full_oauth_flow_then_a_tool_call() {
    let fx = Fixtures::start().await.unwrap();
    let client = register(fx.auth(), ClientAuth::ClientSecretBasic);
    let tokens = code_flow(
        fx.auth(),
        &client,
        Some("mcp:tools mcp:write offline_access"),
        Some(fx.resource().url()),
    )
    .await;
    let mcp = connect(fx.resource().url(), &s(&tokens, "access_token")).await;
    assert_eq!(text(&mcp.call_tool(CallToolRequestParams::new("counter")).await.unwrap()), "1");
    let rt = s(&tokens, "refresh_token");
    let refreshed: Value = refresh(fx.auth(), &client, &rt, None).await.json().await.unwrap();
    let mcp2 = connect(fx.resource().url(), &s(&refreshed, "access_token")).await;
    assert_eq!(text(&mcp2.call_tool(CallToolRequestParams::new("counter")).await.unwrap()), "2");
    assert_eq!(fx.auth().stats().max_refresh_redemptions(), 1);
}

#[tokio::test]
async fn the_scope_can_be_left_out_of_challenges() {
    let auth = AuthServer::builder().spawn().await.unwrap();
    let rs = ResourceServer::builder(&auth).scope_in_challenge(false).spawn().await.unwrap();
    let resp = post_mcp(rs.url(), None, INITIALIZE).await;
    assert_eq!(
        challenge(&resp),
        format!("Bearer resource_metadata=\"{}\"", rs.resource_metadata_url())
    );
}

#[tokio::test]
async fn anonymous_initialize_lets_the_handshake_through_and_nothing_else() {
    let auth = AuthServer::builder().spawn().await.unwrap();
    let rs = ResourceServer::builder(&auth).anonymous_initialize(true).spawn().await.unwrap();
    assert_eq!(post_mcp(rs.url(), None, INITIALIZE).await.status(), 200);
    let list = r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#;
    let resp = post_mcp(rs.url(), None, list).await;
    assert_eq!(resp.status(), 401);
    assert!(challenge(&resp).contains("scope=\"mcp:tools\""));
    // Off (the default): even initialize needs a token.
    let strict = ResourceServer::builder(&auth).spawn().await.unwrap();
    assert_eq!(post_mcp(strict.url(), None, INITIALIZE).await.status(), 401);
}

#[tokio::test]
async fn injected_failures_hit_the_nth_mcp_request_before_the_token_check() {
    let fx = Fixtures::start().await.unwrap();
    let client = register(fx.auth(), ClientAuth::None);
    let tokens = fx.auth().issue_tokens(&client.id, "mcp:tools", None);
    fx.auth().knobs().fail_resource_requests(mcp_fixtures::InjectedFailure::too_many_requests(
        2,
        Duration::from_secs(4),
    ));
    assert_eq!(
        post_mcp(fx.resource().url(), Some(tokens.access_token()), INITIALIZE).await.status(),
        200
    );
    let failed = post_mcp(fx.resource().url(), None, INITIALIZE).await;
    assert_eq!(failed.status(), 429);
    assert_eq!(failed.headers()["retry-after"], "4");
    assert_eq!(
        post_mcp(fx.resource().url(), Some(tokens.access_token()), INITIALIZE).await.status(),
        200
    );
    assert_eq!(fx.resource().stats().injected_failures, 1);
    assert_eq!(fx.auth().stats().injected_failures, 0, "the token endpoint is not affected");
}

#[tokio::test]
async fn metadata_at_a_custom_location_named_only_by_the_challenge() {
    let auth = AuthServer::builder().spawn().await.unwrap();
    let rs = ResourceServer::builder(&auth)
        .metadata_location("/custom/metadata/location.json")
        .path_metadata(false)
        .root_metadata(false)
        .advertised_resource("https://evil.example.com/mcp")
        .spawn()
        .await
        .unwrap();
    let custom = format!("{}/custom/metadata/location.json", rs.base_url());
    assert_eq!(rs.resource_metadata_url(), custom);
    let resp = post_mcp(rs.url(), None, INITIALIZE).await;
    assert!(challenge(&resp).contains(&format!("resource_metadata=\"{custom}\"")));
    let doc: Value = http().get(&custom).send().await.unwrap().json().await.unwrap();
    assert_eq!(doc["resource"], "https://evil.example.com/mcp");
    for gone in
        ["/.well-known/oauth-protected-resource", "/.well-known/oauth-protected-resource/mcp"]
    {
        assert_eq!(
            http().get(format!("{}{gone}", rs.base_url())).send().await.unwrap().status(),
            404
        );
    }
    let bad = ResourceServer::builder(&auth).metadata_location("no-slash").spawn().await;
    assert!(matches!(bad, Err(mcp_fixtures::FixtureError::InvalidConfig(_))));
}

#[tokio::test]
async fn introspection_mode_checks_tokens_over_http() {
    let auth = AuthServer::builder().spawn().await.unwrap();
    let rs = ResourceServer::builder(&auth).introspection(true).spawn().await.unwrap();
    let client = register(&auth, ClientAuth::None);
    let tokens = auth.issue_tokens(&client.id, "mcp:tools mcp:write", Some(rs.url()));
    let mcp = connect(rs.url(), tokens.access_token()).await;
    assert_eq!(text(&mcp.call_tool(CallToolRequestParams::new("counter")).await.unwrap()), "1");
    assert!(auth.stats().introspections >= 2, "every MCP request was introspected");
    // A refresh token is not a bearer token, even though introspection calls it active.
    let resp = post_mcp(rs.url(), Some(tokens.refresh_token().unwrap()), INITIALIZE).await;
    assert_eq!(resp.status(), 401);
    auth.revoke_all_tokens();
    let resp = post_mcp(rs.url(), Some(tokens.access_token()), INITIALIZE).await;
    assert_eq!(resp.status(), 401);
    assert!(challenge(&resp).contains("error=\"invalid_token\""));
}

const DISCOVER: &str = r#"{"jsonrpc":"2.0","id":1,"method":"server/discover","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientInfo":{"name":"t","version":"0"},"io.modelcontextprotocol/clientCapabilities":{}}}}"#;

async fn post_versioned(url: &str, token: &str, version: &str, body: &str) -> reqwest::Response {
    http()
        .post(url)
        .bearer_auth(token)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", version)
        .header("mcp-method", "server/discover")
        .body(body.to_owned())
        .send()
        .await
        .unwrap()
}

/// The protocol-version knob: by default the server speaks the revisions up to 2025-11-25 and
/// refuses a POST naming 2026-07-28 the way those servers do (400, a JSON-RPC error, no id);
/// with 2026-07-28 listed it answers `server/discover` with the listed revisions. Every POST is
/// recorded with its version and method headers.
#[tokio::test]
async fn the_protocol_versions_knob_selects_the_revisions_spoken() {
    let auth = AuthServer::builder().spawn().await.unwrap();
    let client = auth.register_client(mcp_fixtures::ClientSpec::new(ClientAuth::None)).unwrap();
    let token = auth.issue_tokens(client.client_id(), "mcp:tools", None).access_token().to_owned();

    let legacy = ResourceServer::builder(&auth).spawn().await.unwrap();
    let resp = post_versioned(legacy.url(), &token, "2026-07-28", DISCOVER).await;
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["id"], Value::Null);
    assert!(body["error"]["message"].as_str().unwrap().contains("2026-07-28"), "{body}");
    let posts = legacy.stats().posts;
    assert_eq!(posts.len(), 1);
    assert_eq!(posts[0].method.as_deref(), Some("server/discover"));
    assert_eq!(posts[0].protocol_version.as_deref(), Some("2026-07-28"));
    assert_eq!(posts[0].mcp_method.as_deref(), Some("server/discover"));
    assert_eq!(posts[0].meta_protocol_version.as_deref(), Some("2026-07-28"));

    let modern = ResourceServer::builder(&auth)
        .protocol_versions(["2025-11-25", "2026-07-28"])
        .spawn()
        .await
        .unwrap();
    let resp = post_versioned(modern.url(), &token, "2026-07-28", DISCOVER).await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(text.contains(r#""supportedVersions":["2025-11-25","2026-07-28"]"#), "{text}");

    let none: [&str; 0] = [];
    let err = ResourceServer::builder(&auth).protocol_versions(none).spawn().await.unwrap_err();
    assert!(matches!(err, mcp_fixtures::FixtureError::InvalidConfig(_)), "{err:?}");
}

/// SEP-2352's migration, on the fixture: after `switch_authorization_server` the protected
/// resource metadata names the new authorization server (at both locations) and only its
/// tokens are accepted; the old server's tokens, still valid there, are refused.
#[tokio::test]
async fn a_resource_can_move_to_another_authorization_server() {
    let fx = Fixtures::start().await.unwrap();
    let rs = fx.resource();
    let client = fx.auth().register_client(ClientSpec::new(ClientAuth::None)).unwrap();
    let old = fx.auth().issue_tokens(client.client_id(), "mcp:tools", Some(rs.url()));
    assert_eq!(post_mcp(rs.url(), Some(old.access_token()), INITIALIZE).await.status(), 200);

    let other = AuthServer::builder().spawn().await.unwrap();
    rs.switch_authorization_server(&other);
    for url in [
        rs.resource_metadata_url().to_owned(),
        format!("{}/.well-known/oauth-protected-resource", rs.base_url()),
    ] {
        let doc: Value = http().get(&url).send().await.unwrap().json().await.unwrap();
        assert_eq!(doc["authorization_servers"], json!([other.issuer()]), "{url}");
    }
    assert_eq!(post_mcp(rs.url(), Some(old.access_token()), INITIALIZE).await.status(), 401);
    let theirs = other.register_client(ClientSpec::new(ClientAuth::None)).unwrap();
    let new = other.issue_tokens(theirs.client_id(), "mcp:tools", Some(rs.url()));
    assert_eq!(post_mcp(rs.url(), Some(new.access_token()), INITIALIZE).await.status(), 200);
}
