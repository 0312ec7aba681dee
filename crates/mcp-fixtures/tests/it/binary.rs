//! The `mcp-fixtures` binary: flags become knobs, and it prints the URLs it serves.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use serde_json::Value;

/// Kills the child when the test ends, pass or fail.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(args: &[&str]) -> (Running, HashMap<String, String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mcp-fixtures"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the binary starts");
    let stdout = child.stdout.take().unwrap();
    let running = Running(child);
    let mut urls = HashMap::new();
    for line in BufReader::new(stdout).lines().take(4) {
        let line = line.unwrap();
        let (name, url) = line.split_once(' ').unwrap();
        urls.insert(name.to_owned(), url.trim().to_owned());
    }
    (running, urls)
}

#[tokio::test]
async fn flags_become_knobs_and_the_urls_are_printed() {
    let (_running, urls) = start(&[
        "--issuer-path",
        "/tenant1",
        "--access-token-lifetime",
        "7",
        "--pre-registered",
        "cid:csecret",
        "--fail-nth",
        "2",
        "--fail-status",
        "429",
        "--retry-after",
        "3",
    ]);
    let issuer = &urls["issuer"];
    assert!(issuer.starts_with("http://127.0.0.1:") && issuer.ends_with("/tenant1"), "{urls:?}");
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let meta: Value = http.get(&urls["as-metadata"]).send().await.unwrap().json().await.unwrap();
    assert_eq!(meta["issuer"], issuer.as_str());
    let token_endpoint = meta["token_endpoint"].as_str().unwrap().to_owned();

    let cc = || {
        http.post(&token_endpoint)
            .basic_auth("cid", Some("csecret"))
            .form(&[("grant_type", "client_credentials")])
    };
    let first: Value = cc().send().await.unwrap().json().await.unwrap();
    assert_eq!(first["expires_in"], 7);
    let second = cc().send().await.unwrap();
    assert_eq!(second.status(), 429);
    assert_eq!(second.headers()["retry-after"], "3");

    let mcp = http.post(&urls["mcp"]).body("{}").send().await.unwrap();
    assert_eq!(mcp.status(), 401);
    let challenge = mcp.headers()["www-authenticate"].to_str().unwrap().to_owned();
    assert!(
        challenge.contains(&format!("resource_metadata=\"{}\"", urls["resource-metadata"])),
        "{challenge}"
    );
}

#[test]
fn bad_flags_fail_with_a_message() {
    let out = Command::new(env!("CARGO_BIN_EXE_mcp-fixtures"))
        .args(["--pre-registered", "no-colon"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ID:SECRET"));
}
