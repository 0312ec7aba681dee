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
