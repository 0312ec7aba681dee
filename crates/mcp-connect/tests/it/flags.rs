//! mcp-remote's flags on the `mcp-connect` binary, against the fixture servers on 127.0.0.1.

use crate::common;

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
    proxy.initialize();
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
    common::complete_login(spawn(store.command(&args), false)).await.1
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
    mcp_clock::Clock::sleep(&mcp_clock::SystemClock, std::time::Duration::from_millis(2500)).await;
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

/// `login` through the test's browser with `args` (after `login <server> --no-browser`);
/// returns the authorization URL the process printed and the finished process.
async fn login_seen(store: &Store, server: &str, args: &[&str]) -> (url::Url, common::Outcome) {
    let mut all = vec!["login", server, "--no-browser", "--timeout", "30"];
    all.extend_from_slice(args);
    let (url, outcome) = common::complete_login(spawn(store.command(&all), false)).await;
    (url::Url::parse(&url).unwrap(), outcome)
}

fn query(url: &url::Url, name: &str) -> Vec<String> {
    url.query_pairs().filter(|(k, _)| k == name).map(|(_, v)| v.into_owned()).collect()
}

/// `--authorize-param k=v` (repeatable) reaches the authorization URL; one that names a
/// parameter the client sets itself is invalid input (exit 2) before anything is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorize_params_reach_the_authorization_url_and_reserved_ones_are_refused() {
    let fx = Fixtures::start().await.unwrap();
    let server = fx.resource().url().to_owned();
    let store = Store::new();
    let (url, out) = login_seen(
        &store,
        &server,
        &[
            "--port",
            "0",
            "--authorize-param",
            "prompt=consent",
            "--authorize-param",
            "hd=example.com",
        ],
    )
    .await;
    out.expect_code(0);
    assert_eq!(query(&url, "prompt"), ["consent"], "{url}");
    assert_eq!(query(&url, "hd"), ["example.com"], "{url}");
    assert_eq!(query(&url, "state").len(), 1, "{url}");

    let requests = fx.auth().stats().authorization_requests;
    for bad in ["state=x", "redirect_uri=https://evil.example/cb", "noequals"] {
        let out = store.run(&["login", &server, "--no-browser", "--authorize-param", bad]);
        out.expect_code(2);
        assert!(out.stderr.contains("--authorize-param"), "{out:#?}");
    }
    assert_eq!(fx.auth().stats().authorization_requests, requests, "nothing was sent");
}

/// `--header-file`: its headers reach the MCP server like `--header`'s, `${VAR}` expanded,
/// comments skipped; a bad line is named by its number and its value is not repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_file_is_read_like_header_flags() {
    let fx = Fixtures::start().await.unwrap();
    let server = fx.resource().url().to_owned();
    let store = Store::new();
    login(&store, &server).await.expect_code(0);
    let file = store.dir.path().join("headers");
    std::fs::write(
        &file,
        "# the team's key\nX-File-Key: ${MCP_CONNECT_TEST_API_KEY}\n\nX-Plain: p\n",
    )
    .unwrap();
    let mut cmd =
        store.command(&["-vv", "tools", &server, "--header-file", file.to_str().unwrap()]);
    cmd.env("MCP_CONNECT_TEST_API_KEY", HEADER_VALUE);
    let out = common::Outcome::from(cmd.output().unwrap());
    out.expect_code(0);
    let seen = fx.resource().stats().extension_headers;
    assert!(seen.contains(&format!("x-file-key: {HEADER_VALUE}")), "{seen:?}");
    assert!(seen.contains("x-plain: p"), "{seen:?}");
    assert!(!out.all().contains(HEADER_VALUE), "{out:#?}");

    std::fs::write(&file, format!("X-Ok: 1\nbroken {HEADER_VALUE}\n")).unwrap();
    let out = store.run(&["tools", &server, "--header-file", file.to_str().unwrap()]);
    out.expect_code(2);
    assert!(out.stderr.contains("line 2"), "{out:#?}");
    assert!(!out.all().contains(HEADER_VALUE), "{out:#?}");
}

/// `--ignore-tool`: `tools` does not list a hidden tool and `call` refuses it (exit 2) without
/// calling it; the proxy removes it from the host's `tools/list` and answers a call of it with
/// an error that never reaches the server, while other tools work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignored_tools_are_hidden_and_refused_without_reaching_the_server() {
    let fx = Fixtures::start().await.unwrap();
    let server = fx.resource().url().to_owned();
    let store = Store::new();
    login(&store, &server).await.expect_code(0);
    let calls = || fx.resource().stats().tool_calls.get("counter").copied().unwrap_or(0);

    let tools = store.run(&["tools", &server, "--ignore-tool", "COUNT*", "--ignore-tool", "sl*w"]);
    tools.expect_code(0);
    let names: Vec<&str> = tools.stdout.lines().map(|l| l.split('\t').next().unwrap()).collect();
    assert_eq!(names, ["echo"], "{tools:#?}");
    let call = store.run(&["call", &server, "counter", "--ignore-tool", "count*"]);
    call.expect_code(2);
    assert!(call.stderr.contains("hidden by --ignore-tool"), "{call:#?}");
    assert_eq!(calls(), 0);

    let mut proxy = spawn(store.command(&["proxy", &server, "--ignore-tool", "counter"]), true);
    proxy.initialize();
    proxy.send(json!({ "jsonrpc": "2.0", "id": 2, "method": "tools/list" }));
    let list = proxy.response(2);
    let listed: Vec<&str> = list["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert!(listed.contains(&"echo") && !listed.contains(&"counter"), "{list}");
    proxy.send(json!({
        "jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": { "name": "counter" }
    }));
    let refused = proxy.response(3);
    assert_eq!(refused["error"]["code"], json!(-32602), "{refused}");
    proxy.send(json!({
        "jsonrpc": "2.0", "id": 4, "method": "tools/call",
        "params": { "name": "echo", "arguments": { "text": "shown" } }
    }));
    assert_eq!(proxy.response(4)["result"]["content"][0]["text"], json!("shown"));
    tokio::task::block_in_place(|| proxy.finish()).expect_code(0);
    assert_eq!(calls(), 0, "the hidden tool never reached the server");
}

/// `--debug`: debug logs go to `debug.log` in the store directory (mode 0600), not to the
/// terminal, and hold no token, refresh token or client secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_writes_a_private_log_without_secrets() {
    let fx = Fixtures::start().await.unwrap();
    fx.auth().knobs().set_access_token_lifetime(std::time::Duration::from_secs(1));
    let server = fx.resource().url().to_owned();
    let store = Store::new();
    let (_, out) = login_seen(&store, &server, &["--port", "0", "--debug"]).await;
    out.expect_code(0);
    assert!(!out.stderr.contains("DEBUG"), "logs go to the file: {out:#?}");
    mcp_clock::Clock::sleep(&mcp_clock::SystemClock, std::time::Duration::from_millis(1500)).await;
    // Past expiry: the call refreshes, so the log covers a refresh too.
    let call = store.run(&["--debug", "call", &server, "echo", r#"{"text":"x"}"#]);
    call.expect_code(0);
    assert!(fx.auth().stats().refresh_token_requests >= 1);
    let log_path = store.path().join("debug.log");
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("DEBUG"), "{log}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&log_path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    let secrets = store.secrets(&server).await;
    assert!(!secrets.is_empty());
    for secret in secrets {
        assert!(!log.contains(&secret), "a secret is in the debug log");
    }
}

/// A store directory (and key file) readable by others is made private (0700 / 0600), with a
/// warning; the tokens in it still work.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loose_store_is_made_private_with_a_warning() {
    use std::os::unix::fs::PermissionsExt as _;
    let fx = Fixtures::start().await.unwrap();
    let server = fx.resource().url().to_owned();
    let store = Store::new();
    login(&store, &server).await.expect_code(0);
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let key = store.path().join("key");
    assert_eq!((mode(&store.path()), mode(&key)), (0o700, 0o600));
    std::fs::set_permissions(store.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = store.run(&["tools", &server]);
    out.expect_code(0);
    assert!(out.stderr.contains("warning") && out.stderr.contains("0700"), "{out:#?}");
    assert!(out.stderr.contains("0600"), "{out:#?}");
    assert_eq!((mode(&store.path()), mode(&key)), (0o700, 0o600));
    let mut loose = Vec::new();
    for (path, _) in common::snapshot(&store.path()) {
        if mode(&path) & 0o077 != 0 {
            loose.push(path);
        }
    }
    assert!(loose.is_empty(), "{loose:?}");
    let again = store.run(&["tools", &server]);
    assert!(!again.stderr.contains("warning"), "{again:#?}");
}

/// Two servers that both need a login at once, with no `--port`: each login listens on the
/// port derived from its server's URL (two different ports), so both prompt and both finish,
/// and a second login to the same server reuses its port (the registration stays valid).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_log_in_at_once_on_their_own_ports() {
    let a = Fixtures::start().await.unwrap();
    let b = Fixtures::start().await.unwrap();
    let (sa, sb) = (a.resource().url().to_owned(), b.resource().url().to_owned());
    assert_ne!(mcp_connect::callback_port_for(&sa), mcp_connect::callback_port_for(&sb));
    let store = Store::new();
    let ra = spawn(store.command(&["login", &sa, "--no-browser", "--timeout", "30"]), false);
    let rb = spawn(store.command(&["login", &sb, "--no-browser", "--timeout", "30"]), false);
    // Both wait in the browser step at the same time.
    let (ua, ub) = (common::authorization_url(&ra), common::authorization_url(&rb));
    let port = |u: &str| {
        let u = url::Url::parse(u).unwrap();
        url::Url::parse(&query(&u, "redirect_uri")[0]).unwrap().port().unwrap()
    };
    let (pa, pb) = (port(&ua), port(&ub));
    assert_ne!(pa, pb);
    let derived =
        |s: &str| mcp_connect::callback_port_for(s)..mcp_connect::callback_port_for(s) + 10;
    assert!(derived(&sa).contains(&pa) && derived(&sb).contains(&pb), "{pa} {pb}");
    common::visit(&ub).await;
    common::visit(&ua).await;
    tokio::task::block_in_place(|| ra.finish()).expect_code(0);
    tokio::task::block_in_place(|| rb.finish()).expect_code(0);
    assert_eq!(a.auth().stats().registrations + b.auth().stats().registrations, 2);
    store.run(&["call", &sa, "echo", r#"{"text":"a"}"#]).expect_code(0);
    store.run(&["call", &sb, "echo", r#"{"text":"b"}"#]).expect_code(0);

    // A login that finds usable tokens on another port proves nothing about that port: the
    // registration keeps its own.
    let again = store.run(&["login", &sa, "--no-browser", "--port", "0"]);
    again.expect_code(0);
    assert!(again.stdout.contains("Already authorized"), "{again:#?}");
    // Refused and logged in again: the same port, and no new registration.
    a.auth().revoke_all_tokens();
    let (url, out) = login_seen(&store, &sa, &[]).await;
    out.expect_code(0);
    assert_eq!(url::Url::parse(&query(&url, "redirect_uri")[0]).unwrap().port(), Some(pa));
    assert_eq!(a.auth().stats().registrations, 1);
}

/// A 200-character server URL and a 120-character user name (lock-file names past 255 bytes
/// before they became digests): login, a call, and a call after expiry (a refresh) all work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_url_and_a_long_user_name_log_in_call_and_refresh() {
    use mcp_fixtures::{AuthServer, ResourceServer};
    let auth = AuthServer::builder().spawn().await.unwrap();
    auth.knobs().set_access_token_lifetime(std::time::Duration::from_secs(1));
    // http://127.0.0.1:PORT is 21 or 22 characters: the path makes up the rest.
    let port_len = auth.base_url().len() - "http://127.0.0.1:".len();
    let path = format!("/tenants/{}/mcp", "t".repeat(200 - 17 - port_len - 13));
    let resource = ResourceServer::builder(&auth).path(path).spawn().await.unwrap();
    let fx = Fixtures::from_parts(auth, resource);
    let long = fx.resource().url().to_owned();
    assert_eq!(long.len(), 200, "{long}");
    let user = "u".repeat(120);
    let store = Store::new();
    // `Store::command` names its own user: build the command here.
    let command = |args: &[&str]| {
        let mut cmd = std::process::Command::new(common::BIN);
        cmd.arg("--store").arg(store.path()).args(["--user", &user]).args(args);
        cmd.env("MCP_CONNECT_NO_BROWSER", "1").stdin(std::process::Stdio::null());
        cmd
    };
    let running =
        spawn(command(&["login", &long, "--no-browser", "--port", "0", "--timeout", "30"]), false);
    common::complete_login(running).await.1.expect_code(0);
    let call = || {
        common::Outcome::from(
            command(&["call", &long, "echo", r#"{"text":"long"}"#]).output().unwrap(),
        )
    };
    let out = call();
    out.expect_code(0);
    assert_eq!(out.stdout.trim(), "long");
    mcp_clock::Clock::sleep(&mcp_clock::SystemClock, std::time::Duration::from_millis(1500)).await;
    let out = call();
    out.expect_code(0);
    assert_eq!(out.stdout.trim(), "long");
    assert!(fx.auth().stats().refresh_token_requests >= 1, "{:?}", fx.auth().stats());
}

/// `--static-oauth-client-metadata`: the registration carries the given client name (the
/// authorization server shows it on its consent page), while the redirect URI stays the
/// callback's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_client_metadata_reaches_the_registration() {
    let fx = Fixtures::start().await.unwrap();
    fx.auth().knobs().set_approval(mcp_fixtures::Approval::Manual);
    let server = fx.resource().url().to_owned();
    let store = Store::new();
    let metadata = r#"{"client_name":"My Desktop","redirect_uris":["https://evil.example/cb"]}"#;
    let running = spawn(
        store.command(&[
            "login",
            &server,
            "--no-browser",
            "--port",
            "0",
            "--timeout",
            "30",
            "--static-oauth-client-metadata",
            metadata,
        ]),
        false,
    );
    let url = common::authorization_url(&running);
    let browser = tokio::spawn(async move { common::visit(&url).await });
    let pending = fx.auth().wait_for_pending_authorization().await;
    assert_eq!(pending[0].client_name.as_deref(), Some("My Desktop"));
    assert!(pending[0].redirect_uri.starts_with("http://127.0.0.1:"), "{pending:?}");
    fx.auth().approve_pending().unwrap();
    browser.await.unwrap();
    tokio::task::block_in_place(|| running.finish()).expect_code(0);
}

/// `--client-metadata-url`: where the authorization server supports client ID metadata
/// documents (and offers no registration), the document's URL is the client id; the server
/// fetches it, nothing is registered, and the login completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_metadata_url_is_the_client_id() {
    use mcp_fixtures::{AuthServer, ResourceServer};
    let port = common::dead_port();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let doc_url = format!("http://{}/client.json", listener.local_addr().unwrap());
    let doc = json!({
        "client_id": doc_url,
        "client_name": "CIMD client",
        "redirect_uris": [format!("http://127.0.0.1:{port}/callback")],
        "grant_types": ["authorization_code", "refresh_token"],
        "token_endpoint_auth_method": "none",
    });
    let app = axum::Router::new()
        .route("/client.json", axum::routing::get(move || async move { axum::Json(doc) }));
    tokio::spawn(async move { axum::serve(listener, app).await });
    let auth = AuthServer::builder()
        .dynamic_registration(false)
        .client_metadata_documents(true)
        .spawn()
        .await
        .unwrap();
    let resource = ResourceServer::builder(&auth).spawn().await.unwrap();
    let fx = Fixtures::from_parts(auth, resource);
    let server = fx.resource().url().to_owned();
    let store = Store::new();
    let out = login_with(&store, &server, port, &["--client-metadata-url", &doc_url]).await;
    out.expect_code(0);
    let stats = fx.auth().stats();
    assert!(stats.client_metadata_fetches >= 1, "{stats:?}");
    assert_eq!(stats.registrations, 0, "{stats:?}");
    let status = store.run(&["--json", "status"]);
    assert!(status.stdout.contains(&doc_url), "the client id is the document URL: {status:#?}");
    // Like a static client, the document's client keeps its own tokens: pass the flag again.
    let call = store.run(&[
        "call",
        &server,
        "echo",
        r#"{"text":"cimd"}"#,
        "--client-metadata-url",
        &doc_url,
    ]);
    call.expect_code(0);

    let bad = store.run(&["login", &server, "--client-metadata-url", "ftp://x/client.json"]);
    bad.expect_code(2);
}

/// `--host localhost --callback-path /oauth/callback` (mcp-remote's redirect URI): the
/// authorization request names that redirect URI, the callback is served there, the login
/// completes; a host that is not loopback is invalid input.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callback_host_and_path_can_be_mcp_remotes() {
    let fx = Fixtures::start().await.unwrap();
    let server = fx.resource().url().to_owned();
    let store = Store::new();
    let (url, out) = login_seen(
        &store,
        &server,
        &["--port", "0", "--host", "localhost", "--callback-path", "/oauth/callback"],
    )
    .await;
    out.expect_code(0);
    let redirect = url::Url::parse(&query(&url, "redirect_uri")[0]).unwrap();
    assert_eq!(redirect.host_str(), Some("localhost"), "{redirect}");
    assert_eq!(redirect.path(), "/oauth/callback", "{redirect}");
    store.run(&["call", &server, "echo", r#"{"text":"ok"}"#]).expect_code(0);
    for bad in [["--host", "example.com"], ["--callback-path", "oauth"]] {
        let out = store.run(&["login", &server, "--no-browser", bad[0], bad[1]]);
        out.expect_code(2);
        assert!(out.stderr.contains(bad[0]), "{out:#?}");
    }
}

/// `--silent`: a successful command prints nothing on stderr (no -v logs, no warning about a
/// loose store it tightened); a login without a browser still prints the URL, the one thing the
/// user cannot do without; errors are still reported.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_leaves_only_errors_and_a_needed_url() {
    use std::os::unix::fs::PermissionsExt as _;
    let fx = Fixtures::start().await.unwrap();
    let server = fx.resource().url().to_owned();
    let store = Store::new();
    let (_, out) = login_seen(&store, &server, &["--port", "0", "--silent"]).await;
    out.expect_code(0);
    std::fs::set_permissions(store.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let call = store.run(&["--silent", "-vv", "call", &server, "echo", r#"{"text":"quiet"}"#]);
    call.expect_code(0);
    assert_eq!(call.stdout.trim(), "quiet");
    assert_eq!(call.stderr, "", "{call:#?}");
    let dead = format!("http://127.0.0.1:{}/mcp", common::dead_port());
    let failed = store.run(&["--silent", "tools", &dead]);
    failed.expect_code(3);
    assert!(failed.stderr.contains("cannot reach"), "{failed:#?}");
}

/// A forward proxy on loopback, as `HTTP_PROXY` names one: every request it gets (absolute-form
/// URI) is recorded as `METHOD host:port/path` and forwarded, the answer streamed back (MCP
/// answers with event streams).
async fn forward_proxy() -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use futures::StreamExt as _;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let forward = move |request: axum::extract::Request| {
        let (log, http) = (log.clone(), http.clone());
        async move {
            let (parts, body) = request.into_parts();
            let uri = parts.uri.to_string();
            let shown = format!(
                "{} {}{}",
                parts.method,
                parts.uri.authority().map(|a| a.as_str()).unwrap_or("?"),
                parts.uri.path()
            );
            log.lock().unwrap().push(shown);
            let body = axum::body::to_bytes(body, 1 << 20).await.unwrap();
            let mut outgoing = http.request(parts.method, &uri).body(body);
            for (name, value) in &parts.headers {
                if name != axum::http::header::HOST && name != "proxy-connection" {
                    outgoing = outgoing.header(name, value);
                }
            }
            let answer = outgoing.send().await.unwrap();
            let mut response = axum::response::Response::builder().status(answer.status());
            for (name, value) in answer.headers() {
                response = response.header(name, value);
            }
            let stream = answer.bytes_stream().map(|chunk| chunk.map_err(std::io::Error::other));
            response.body(axum::body::Body::from_stream(stream)).unwrap()
        }
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new().fallback(forward);
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, seen)
}

/// `--enable-proxy`: with `HTTP_PROXY` naming a proxy, the login's OAuth requests (discovery,
/// registration, code exchange) and the MCP requests go through it; without the flag nothing
/// does, whatever the environment says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enabled_proxy_carries_the_oauth_and_the_mcp_requests() {
    let fx = Fixtures::start().await.unwrap();
    let server = fx.resource().url().to_owned();
    let auth = url::Url::parse(fx.auth().base_url()).unwrap();
    let auth = format!("{}:{}", auth.host_str().unwrap(), auth.port().unwrap());
    let mcp = url::Url::parse(&server).unwrap();
    let mcp = format!("{}:{}", mcp.host_str().unwrap(), mcp.port().unwrap());
    let (proxy, seen) = forward_proxy().await;
    let store = Store::new();
    let with_proxy = |args: &[&str]| {
        let mut cmd = store.command(args);
        for name in ["HTTP_PROXY", "http_proxy"] {
            cmd.env(name, &proxy);
        }
        for name in ["NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"]
        {
            cmd.env_remove(name);
        }
        cmd
    };
    let running = spawn(
        with_proxy(&[
            "login",
            &server,
            "--no-browser",
            "--port",
            "0",
            "--timeout",
            "30",
            "--enable-proxy",
        ]),
        false,
    );
    common::complete_login(running).await.1.expect_code(0);
    let through = seen.lock().unwrap().clone();
    for wanted in
        [format!("POST {auth}/register"), format!("POST {auth}/token"), format!("POST {mcp}/mcp")]
    {
        assert!(through.contains(&wanted), "{wanted} not through the proxy: {through:?}");
    }

    let before = seen.lock().unwrap().len();
    let out =
        common::Outcome::from(with_proxy(&["tools", &server, "--enable-proxy"]).output().unwrap());
    out.expect_code(0);
    assert!(seen.lock().unwrap()[before..].iter().any(|r| r == &format!("POST {mcp}/mcp")));
    let before = seen.lock().unwrap().len();
    let out = common::Outcome::from(with_proxy(&["tools", &server]).output().unwrap());
    out.expect_code(0);
    assert_eq!(
        seen.lock().unwrap().len(),
        before,
        "without the flag nothing goes through the proxy"
    );
}

/// `--header 'Authorization: Bearer …'` (an API key, or a token obtained elsewhere, as
/// mcp-remote users pass one): sent as given, with no login, no stored token and no OAuth
/// beside it; a value the server refuses is named as such (exit 6), even when OAuth tokens are
/// stored for the server (before, the stored token was sent too and the call succeeded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_authorization_header_is_the_credentials() {
    use mcp_fixtures::{ClientAuth, ClientSpec};
    let fx = Fixtures::start().await.unwrap();
    let server = fx.resource().url().to_owned();
    let client = fx.auth().register_client(ClientSpec::new(ClientAuth::None)).unwrap();
    let token = fx.auth().issue_tokens(client.client_id(), "mcp:tools", Some(&server));
    let header = format!("Authorization: Bearer {}", token.access_token());
    let store = Store::new();
    let before = fx.auth().stats();
    let out = store.run(&["call", &server, "echo", r#"{"text":"key"}"#, "--header", &header]);
    out.expect_code(0);
    assert_eq!(out.stdout.trim(), "key");
    assert!(!out.all().contains(token.access_token()), "{out:#?}");
    let after = fx.auth().stats();
    assert_eq!(after.registrations, before.registrations, "no registration");
    assert_eq!(after.token_requests(), before.token_requests(), "no OAuth at all");

    // Logged in with OAuth, then a bogus header: refused, and not rescued by the stored token.
    login(&store, &server).await.expect_code(0);
    let bogus = "Authorization: Bearer not-a-token";
    let out = store.run(&["tools", &server, "--header", bogus]);
    out.expect_code(6);
    assert!(out.stderr.contains("refused the Authorization header"), "{out:#?}");
    let out = store.run(&["login", &server, "--header", bogus]);
    out.expect_code(2);
}

/// `--workload-identity-file` (SEP-1933): a command gets its tokens with the jwt-bearer grant
/// and the assertion in the file, with no browser step; when they have expired, the next
/// command runs the grant again with the assertion the platform has rotated into the file.
/// `-vv` logs never show an assertion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_identity_file_replaces_the_browser_login() {
    let fx = Fixtures::start().await.unwrap();
    let knobs = fx.auth().knobs();
    knobs.set_access_token_lifetime(std::time::Duration::from_secs(60));
    knobs.set_workload_assertions(vec!["wl-assertion-one-5b1e".into()]);
    let server = fx.resource().url().to_owned();
    let store = Store::new();
    let file = store.dir.path().join("workload-token");
    std::fs::write(&file, "wl-assertion-one-5b1e\n").unwrap();
    let flag = file.to_str().unwrap();

    let first = store.run(&[
        "-vv",
        "call",
        &server,
        "echo",
        r#"{"text":"as a workload"}"#,
        "--workload-identity-file",
        flag,
    ]);
    first.expect_code(0);
    assert!(first.stdout.contains("as a workload"), "{first:#?}");
    assert!(!first.stderr.contains(common::URL_PREFIX), "no browser step: {first:#?}");
    let stats = fx.auth().stats();
    assert_eq!((stats.jwt_bearer_requests, stats.authorization_code_requests), (1, 0), "{stats:?}");

    // The platform rotates the assertion; the tokens expire on the server's clock.
    std::fs::write(&file, "wl-assertion-two-93c0\n").unwrap();
    knobs.set_workload_assertions(vec!["wl-assertion-two-93c0".into()]);
    knobs.set_clock_offset_millis(61_000);
    let second = store.run(&[
        "-vv",
        "call",
        &server,
        "echo",
        r#"{"text":"rotated"}"#,
        "--workload-identity-file",
        flag,
    ]);
    second.expect_code(0);
    assert!(second.stdout.contains("rotated"), "{second:#?}");
    assert_eq!(fx.auth().stats().jwt_bearer_requests, 2, "{:?}", fx.auth().stats());
    for output in [first.all(), second.all()] {
        assert!(!output.contains("wl-assertion"), "an assertion was printed:\n{output}");
    }
}
