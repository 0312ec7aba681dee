//! Helpers for the process tests: run the real `mcp-connect` binary against fixture servers on
//! 127.0.0.1, play the browser by GETting the printed authorization URL, and read back what the
//! store holds (to prove no secret is printed).

#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use token_storage::{
    Keyring, RefreshError, RefreshRequest, Refresher, SharedTokenStore, SledTokenStore,
    TerminalCode, TokenKey, TokenResponse, TokenStorage,
};

pub const BIN: &str = env!("CARGO_BIN_EXE_mcp-connect");
pub const USER: &str = "alice";
pub const URL_PREFIX: &str = "Authorization URL: ";

/// A store directory in a temp dir.
pub struct Store {
    pub dir: tempfile::TempDir,
}

impl Store {
    pub fn new() -> Self {
        Store { dir: tempfile::tempdir().unwrap() }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// `mcp-connect --store <this> --user alice <args>`, no browser.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.arg("--store").arg(self.path()).args(["--user", USER]).args(args);
        cmd.env("MCP_CONNECT_NO_BROWSER", "1").env_remove("DISPLAY").env_remove("WAYLAND_DISPLAY");
        cmd.stdin(Stdio::null());
        cmd
    }

    /// Run to completion (blocking).
    pub fn run(&self, args: &[&str]) -> Outcome {
        Outcome::from(self.command(args).output().unwrap())
    }

    /// The stored token type and DPoP key (PEM) for `server`, read with the store's own key
    /// file. Call only while no mcp-connect process runs.
    pub async fn dpop(&self, server: &str) -> (Option<String>, Option<String>) {
        let storage = self.storage();
        let key = TokenKey::new("default", USER, server);
        let token_type = storage.tokens(&key).await.unwrap().map(|s| s.token_type().to_owned());
        let pem = storage.dpop_key(&key).await.unwrap().map(|k| k.expose().to_owned());
        (token_type, pem)
    }

    fn storage(&self) -> TokenStorage {
        #[derive(Debug)]
        struct NoRefresh;
        #[async_trait::async_trait]
        impl Refresher for NoRefresh {
            async fn refresh(
                &self,
                _: &TokenKey,
                _: &RefreshRequest,
            ) -> Result<TokenResponse, RefreshError> {
                Err(RefreshError::terminal(TerminalCode::InvalidGrant, None))
            }
        }
        let keys = Keyring::from_file(self.path().join("key")).unwrap();
        let store = SledTokenStore::open(self.path().join("db")).unwrap();
        TokenStorage::builder(SharedTokenStore::new(store), Arc::new(keys), Arc::new(NoRefresh))
            .build()
    }

    /// The secrets stored for `server` right now (access token, refresh token, client secret),
    /// read with the store's own key file. Call only while no mcp-connect process runs.
    pub async fn secrets(&self, server: &str) -> Vec<String> {
        let storage = self.storage();
        let key = TokenKey::new("default", USER, server);
        let mut out = Vec::new();
        if let Some(set) = storage.tokens(&key).await.unwrap() {
            out.push(set.access_token().expose().to_owned());
            if let Some(r) = set.refresh_token() {
                out.push(r.expose().to_owned());
            }
        }
        if let Some(c) = storage.client(&key).await.unwrap()
            && let Some(s) = &c.client_secret
        {
            out.push(s.expose().to_owned());
        }
        out
    }
}

/// A finished process.
#[derive(Debug)]
pub struct Outcome {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Outcome {
    fn from(o: Output) -> Self {
        Outcome {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl Outcome {
    pub fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }

    #[track_caller]
    pub fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(self.code, Some(code), "{self:#?}");
        self
    }
}

/// A running process whose stderr is collected by a thread; the authorization URL, when it
/// prints one, is sent on `urls`.
pub struct Running {
    pub child: Child,
    pub stderr: Arc<Mutex<String>>,
    pub urls: Receiver<String>,
    pub stdout: Option<Receiver<String>>,
    pub stdin: Option<ChildStdin>,
    /// Responses read while waiting for another id (hosts may get them out of order).
    pub early: std::collections::HashMap<u64, serde_json::Value>,
    /// The thread collecting stderr: it ends when the process's stderr closes.
    stderr_reader: Option<std::thread::JoinHandle<()>>,
}

pub fn spawn(mut cmd: Command, with_stdio: bool) -> Running {
    cmd.stderr(Stdio::piped()).stdout(Stdio::piped());
    if with_stdio {
        cmd.stdin(Stdio::piped());
    }
    let mut child = cmd.spawn().unwrap();
    let stderr = Arc::new(Mutex::new(String::new()));
    let (url_tx, urls) = channel();
    let err = BufReader::new(child.stderr.take().unwrap());
    let collected = stderr.clone();
    let stderr_reader = std::thread::spawn(move || {
        for line in err.lines().map_while(Result::ok) {
            if let Some(url) = line.strip_prefix(URL_PREFIX) {
                let _ = url_tx.send(url.to_owned());
            }
            let mut all = collected.lock().unwrap();
            all.push_str(&line);
            all.push('\n');
        }
    });
    let out = BufReader::new(child.stdout.take().unwrap());
    let (out_tx, out_rx) = channel();
    std::thread::spawn(move || {
        for line in out.lines().map_while(Result::ok) {
            if out_tx.send(line).is_err() {
                break;
            }
        }
    });
    let stdin = child.stdin.take();
    Running {
        child,
        stderr,
        urls,
        stdout: Some(out_rx),
        stdin,
        early: Default::default(),
        stderr_reader: Some(stderr_reader),
    }
}

impl Running {
    /// Wait for the process to end (blocking), with everything it printed.
    pub fn finish(mut self) -> Outcome {
        drop(self.stdin.take());
        let status = self.child.wait().unwrap();
        let stdout: Vec<String> = self.stdout.take().unwrap().iter().collect();
        // Everything the process wrote to stderr is collected once its reader has seen the end.
        if let Some(reader) = self.stderr_reader.take() {
            reader.join().expect("the stderr reader panicked");
        }
        Outcome {
            code: status.code(),
            stdout: stdout.join("\n"),
            stderr: self.stderr.lock().unwrap().clone(),
        }
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// What a host does first: `initialize` (id 1, answered with a result), then
    /// `notifications/initialized`.
    pub fn initialize(&mut self) {
        self.send(serde_json::json!({
            "jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {
                "protocolVersion": "2025-06-18", "capabilities": {},
                "clientInfo": { "name": "host", "version": "1" }
            }
        }));
        let answer = self.response(1);
        assert!(answer["result"].is_object(), "{answer}");
        self.send(serde_json::json!({ "jsonrpc": "2.0", "method": "notifications/initialized" }));
    }

    /// Send one JSON-RPC line.
    pub fn send(&mut self, message: serde_json::Value) {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{message}").unwrap();
        stdin.flush().unwrap();
    }

    /// The next stdout line that is a JSON-RPC response to `id`.
    pub fn response(&mut self, id: u64) -> serde_json::Value {
        if let Some(value) = self.early.remove(&id) {
            return value;
        }
        let rx = self.stdout.as_ref().unwrap();
        loop {
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(line) => {
                    let value: serde_json::Value = serde_json::from_str(&line).unwrap();
                    match value.get("id").and_then(serde_json::Value::as_u64) {
                        Some(got) if got == id => return value,
                        Some(got) => {
                            self.early.insert(got, value);
                        }
                        None => {}
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!("no response to {id}; stderr:\n{}", self.stderr())
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("stdout closed before response {id}; stderr:\n{}", self.stderr())
                }
            }
        }
    }
}

/// Play the browser: GET the authorization URL and follow the redirect to the callback.
pub async fn visit(url: &str) {
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let response = http.get(url).send().await.unwrap();
    assert!(response.status().is_success(), "the callback answered {}", response.status());
}

/// The authorization URL a running login prints (waiting up to 30 s for it).
pub fn authorization_url(running: &Running) -> String {
    tokio::task::block_in_place(|| running.urls.recv_timeout(Duration::from_secs(30)))
        .unwrap_or_else(|_| panic!("no authorization URL; stderr:\n{}", running.stderr()))
}

/// Play the browser for a running login, and wait for it to end: the URL it printed and how
/// it ended.
pub async fn complete_login(running: Running) -> (String, Outcome) {
    let url = authorization_url(&running);
    visit(&url).await;
    (url, tokio::task::block_in_place(|| running.finish()))
}

/// `login` with the test as the browser; returns the finished process.
pub async fn login(store: &Store, server: &str) -> Outcome {
    let running = spawn(
        store.command(&["login", server, "--no-browser", "--port", "0", "--timeout", "30"]),
        false,
    );
    let url = tokio::task::block_in_place(|| running.urls.recv_timeout(Duration::from_secs(30)))
        .unwrap_or_else(|_| panic!("no authorization URL; stderr:\n{}", running.stderr()));
    visit(&url).await;
    tokio::task::block_in_place(|| running.finish())
}

/// A free loopback port with nothing listening on it.
pub fn dead_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Every regular file under `dir` with its bytes, for before/after comparisons.
pub fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push((path.clone(), std::fs::read(&path).unwrap()));
            }
        }
    }
    out.sort();
    out
}
