//! mcp-remote's flags on the `mcp-connect` binary, against the fixture servers on 127.0.0.1.

mod common;

use common::{Store, login, spawn};
use mcp_fixtures::Fixtures;
use serde_json::json;

/// The header value the tests send: unique, so finding it in an output means it leaked.
const HEADER_VALUE: &str = "hdr-5f1c9e0b7a2d4c68-value";

/// `--header 'X-Api-Key: ${VAR}'` on `tools`, `call` and `proxy`: the header reaches the MCP
/// server with the variable expanded, and no output, debug logs included, contains its value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_reach_the_mcp_server_expanded_and_are_never_printed() {
    let fx = Fixtures::start().await.unwrap();
    let server = fx.resource().url().to_owned();
    let store = Store::new();
    login(&store, &server).await.expect_code(0);
    let arrived =
        || fx.resource().stats().extension_headers.contains(&format!("x-api-key: {HEADER_VALUE}"));
    assert!(!arrived());
    let header = "X-Api-Key: ${MCP_CONNECT_TEST_API_KEY}";
    let mut outputs = Vec::new();

    let mut cmd = store.command(&["-vv", "tools", &server, "--header", header]);
    cmd.env("MCP_CONNECT_TEST_API_KEY", HEADER_VALUE);
    let tools = common::Outcome::from(cmd.output().unwrap());
    tools.expect_code(0);
    assert!(tools.stdout.contains("echo"), "{tools:#?}");
    assert!(tools.stderr.contains("DEBUG"), "debug logs are on: {tools:#?}");
    assert!(arrived(), "{:?}", fx.resource().stats().extension_headers);
    outputs.push(tools.all());

    let before = fx.resource().stats().extension_headers.len();
    let mut cmd = store.command(&[
        "-vv",
        "call",
        &server,
        "echo",
        r#"{"text":"hi"}"#,
        "--header",
        "X-Second: two",
        "--header",
        header,
    ]);
    cmd.env("MCP_CONNECT_TEST_API_KEY", HEADER_VALUE);
    let call = common::Outcome::from(cmd.output().unwrap());
    call.expect_code(0);
    assert_eq!(call.stdout.trim(), "hi");
    assert!(fx.resource().stats().extension_headers.contains("x-second: two"));
    assert!(fx.resource().stats().extension_headers.len() > before);
    outputs.push(call.all());

    // The proxy builds its own transport: the header goes there too.
    let mut cmd = store.command(&[
        "-vv",
        "proxy",
        &server,
        "--header",
        "X-Proxy: ${MCP_CONNECT_TEST_API_KEY}",
    ]);
    cmd.env("MCP_CONNECT_TEST_API_KEY", HEADER_VALUE);
    let mut proxy = spawn(cmd, true);
    proxy.send(json!({
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": { "name": "host", "version": "1" }
        }
    }));
    assert!(proxy.response(1)["result"].is_object());
    proxy.send(json!({ "jsonrpc": "2.0", "method": "notifications/initialized" }));
    proxy.send(json!({
        "jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": { "name": "echo", "arguments": { "text": "via proxy" } }
    }));
    let response = proxy.response(2);
    assert_eq!(response["result"]["content"][0]["text"], json!("via proxy"), "{response}");
    let proxy = tokio::task::block_in_place(|| proxy.finish());
    proxy.expect_code(0);
    assert!(
        fx.resource().stats().extension_headers.contains(&format!("x-proxy: {HEADER_VALUE}")),
        "{:?}",
        fx.resource().stats().extension_headers
    );
    outputs.push(proxy.all());

    for output in &outputs {
        assert!(!output.contains(HEADER_VALUE), "the header value was printed in:\n{output}");
    }
}

/// A bad `--header` is invalid input (exit 2) whose message repeats no value.
#[test]
fn a_bad_header_is_invalid_input_and_its_value_is_not_repeated() {
    let store = Store::new();
    let url = format!("http://127.0.0.1:{}/mcp", common::dead_port());
    for spec in [format!("no colon {HEADER_VALUE}"), "X-Unset: ${MCP_CONNECT_TEST_UNSET}".into()] {
        let out = store.run(&["tools", &url, "--header", &spec]);
        out.expect_code(2);
        assert!(out.stderr.contains("--header"), "{out:#?}");
        assert!(!out.all().contains(HEADER_VALUE), "{out:#?}");
    }
    for spec in [format!("Bad Name: {HEADER_VALUE}"), format!("X-Bad: {HEADER_VALUE}\u{1}")] {
        let out = store.run(&["tools", &url, "--header", &spec]);
        out.expect_code(2);
        assert!(!out.all().contains(HEADER_VALUE), "{out:#?}");
    }
}

/// An authorization server without dynamic registration, with one pre-registered confidential
/// client whose redirect URI is on `port`, and a resource server trusting it.
async fn static_client_fixtures(port: u16) -> Fixtures {
    use mcp_fixtures::{AuthServer, ClientAuth, ClientSpec, ResourceServer};
    let auth = AuthServer::builder().dynamic_registration(false).spawn().await.unwrap();
    auth.register_client(
        ClientSpec::new(ClientAuth::ClientSecretBasic)
            .client_id("static-client")
            .client_secret(CLIENT_SECRET)
            .redirect_uri(format!("http://127.0.0.1:{port}/callback")),
    )
    .unwrap();
    let resource = ResourceServer::builder(&auth).spawn().await.unwrap();
    Fixtures::from_parts(auth, resource)
}

const CLIENT_SECRET: &str = "cs-0b6e2f9d41a7c853";

/// `login` through the test's browser with extra arguments.
async fn login_with(store: &Store, server: &str, port: u16, extra: &[&str]) -> common::Outcome {
    let port = port.to_string();
    let mut args = vec!["-vv", "login", server, "--no-browser", "--port", &port, "--timeout", "30"];
    args.extend_from_slice(extra);
    let running = spawn(store.command(&args), false);
    let url = tokio::task::block_in_place(|| {
        running.urls.recv_timeout(std::time::Duration::from_secs(30))
    })
    .unwrap_or_else(|_| panic!("no authorization URL; stderr:\n{}", running.stderr()));
    common::visit(&url).await;
    tokio::task::block_in_place(|| running.finish())
}

/// `--static-oauth-client-info` (inline JSON and `@file`) with `--scope`: a server that offers
/// no dynamic registration is usable; the client is used as given (no registration request),
/// the scope is the one asked for, the same flags find the tokens for `tools`, and the client
/// secret is never printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_client_logs_in_without_registration_and_with_the_given_scope() {
    let port = common::dead_port();
    let fx = static_client_fixtures(port).await;
    let server = fx.resource().url().to_owned();
    let store = Store::new();
    let info = format!(r#"{{"client_id":"static-client","client_secret":"{CLIENT_SECRET}"}}"#);
    let scope = "mcp:tools mcp:read";

    // Without it, the server cannot be used: registration is refused (exit 6).
    let refused = store.run(&["login", &server, "--no-browser", "--port", "0", "--timeout", "5"]);
    refused.expect_code(6);

    let login =
        login_with(&store, &server, port, &["--static-oauth-client-info", &info, "--scope", scope])
            .await;
    login.expect_code(0);
    assert!(login.stdout.contains("static-client"), "{login:#?}");
    let stats = fx.auth().stats();
    assert_eq!(stats.registrations, 0, "{stats:#?}");
    assert_eq!(stats.authorization_code_requests, 1, "{stats:#?}");
    let asked: Vec<String> = fx
        .auth()
        .events()
        .into_iter()
        .filter_map(|e| match e.kind {
            mcp_fixtures::AuthEventKind::AuthorizationRequested { client_id, scope } => {
                Some(format!("{client_id} {scope}"))
            }
            _ => None,
        })
        .collect();
    assert_eq!(asked, [format!("static-client {scope}")]);

    let file = store.dir.path().join("client.json");
    std::fs::write(&file, &info).unwrap();
    let at_file = format!("@{}", file.display());
    let tools = store.run(&[
        "-vv",
        "tools",
        &server,
        "--static-oauth-client-info",
        &at_file,
        "--scope",
        scope,
    ]);
    tools.expect_code(0);
    assert!(tools.stdout.contains("echo"), "{tools:#?}");
    assert_eq!(fx.auth().stats().registrations, 0);

    let bad = store.run(&[
        "tools",
        &server,
        "--static-oauth-client-info",
        &format!(r#"{{"client_secret":"{CLIENT_SECRET}"}}"#),
    ]);
    bad.expect_code(2);
    for output in [login.all(), tools.all(), bad.all()] {
        assert!(!output.contains(CLIENT_SECRET), "the client secret was printed in:\n{output}");
    }
}

/// `--disable-resource-parameter`: neither the authorization request nor the token requests
/// (code exchange and refresh) carry `resource`, and the tokens work. `--resource URL`: that
/// value is sent instead of the discovered one. Without either, the discovered one is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_resource_parameter_can_be_disabled_or_replaced() {
    let fx = Fixtures::start().await.unwrap();
    fx.auth().knobs().set_access_token_lifetime(std::time::Duration::from_secs(2));
    let server = fx.resource().url().to_owned();
    let flag = "--disable-resource-parameter";

    let store = Store::new();
    login_with(&store, &server, common::dead_port(), &[flag]).await.expect_code(0);
    // The access token expires; the call refreshes it, again without `resource`.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let call = store.run(&["call", &server, "echo", r#"{"text":"no resource"}"#, flag]);
    call.expect_code(0);
    assert_eq!(call.stdout.trim(), "no resource");
    assert_eq!(
        fx.auth().stats().resource_parameters,
        ["authorize -", "token authorization_code -", "token refresh_token -"]
    );

    // Another value (the same resource with a trailing slash, which the server accepts).
    let other = format!("{server}/");
    let store = Store::new();
    login_with(&store, &server, common::dead_port(), &["--resource", &other]).await.expect_code(0);
    let seen = fx.auth().stats().resource_parameters;
    assert_eq!(
        seen[3..],
        [format!("authorize {other}"), format!("token authorization_code {other}")]
    );

    // The default: the discovered resource.
    let store = Store::new();
    login(&store, &server).await.expect_code(0);
    let seen = fx.auth().stats().resource_parameters;
    assert_eq!(
        seen[5..],
        [format!("authorize {server}"), format!("token authorization_code {server}")]
    );

    let both = Store::new().run(&["tools", &server, flag, "--resource", &other]);
    both.expect_code(2);
}
