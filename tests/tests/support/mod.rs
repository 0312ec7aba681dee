//! What the fleet tests share: the children's storage over one Redis, the refresh grant over
//! raw HTTP, child processes with their stdout lines on a channel, and the fleet itself
//! (Redis and the fixture authorization server with strict rotation and reuse detection).

#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use flow_state::testkit::RedisServer;
use flow_state::{RedisStore, SharedStore};
use mcp_clock::SystemClock;
use mcp_fixtures::{AuthServer, AuthServerHandle, ClientAuth, ClientSpec};
use token_storage::{
    EncryptionKey, Keyring, RedisTokenStore, RefreshError, RefreshLease, RefreshRequest, Refresher,
    SharedClock, SharedTokenStore, TerminalCode, TokenKey, TokenResponse, TokenStorage,
    TokenStorageConfig, TransientKind,
};

/// The store lease's TTL. The holder renews every third of it, so a renewal must be delayed by
/// two thirds (2 s) before a waiting process could take the lease from a live holder: long
/// enough that a loaded machine does not lose a live holder's lease (which the takeover test
/// would see as a second redemption), short enough to keep the takeover test quick.
pub const LEASE_TTL: Duration = Duration::from_secs(3);
pub const WAIT: Duration = Duration::from_secs(20);
/// The refresh grant over raw HTTP (public client, `client_id` in the form).
#[derive(Debug)]
pub struct HttpRefresher {
    pub http: reqwest::Client,
    pub token_endpoint: String,
    pub client_id: String,
    /// Print `SENT` just before each request leaves (the chaos run kills the sender then).
    pub announce: bool,
}

#[async_trait::async_trait]
impl Refresher for HttpRefresher {
    async fn refresh(
        &self,
        _: &TokenKey,
        r: &RefreshRequest,
    ) -> Result<TokenResponse, RefreshError> {
        // Only a refused connection proves the request never left; anything later may have
        // reached the token endpoint (in doubt).
        let failed = |e: reqwest::Error| {
            let kind =
                if e.is_connect() { TransientKind::Network } else { TransientKind::Unanswered };
            RefreshError::transient(kind, e.to_string())
        };
        if self.announce {
            println!("SENT");
        }
        let resp = self
            .http
            .post(&self.token_endpoint)
            .form(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", r.refresh_token.expose()),
                ("client_id", &self.client_id),
            ])
            .send()
            .await
            .map_err(failed)?;
        let status = resp.status();
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        if status.is_success() {
            let mut t = TokenResponse::bearer(body["access_token"].as_str().unwrap_or_default());
            if let Some(e) = body["expires_in"].as_u64() {
                t = t.expires_in(Duration::from_secs(e));
            }
            if let Some(rt) = body["refresh_token"].as_str() {
                t = t.refresh_token(rt);
            }
            Ok(t)
        } else if body["error"] == "invalid_grant" {
            let description = body["error_description"].as_str().map(str::to_owned);
            Err(RefreshError::terminal(TerminalCode::InvalidGrant, description))
        } else {
            Err(RefreshError::transient(
                TransientKind::ServerError(status.as_u16()),
                format!("token endpoint answered {status}"),
            ))
        }
    }
}

/// The parent's refresher: it only seeds the store.
#[derive(Debug)]
pub struct Never;

#[async_trait::async_trait]
impl Refresher for Never {
    async fn refresh(
        &self,
        _: &TokenKey,
        _: &RefreshRequest,
    ) -> Result<TokenResponse, RefreshError> {
        panic!("the parent never refreshes")
    }
}

pub fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is set for fleet children"))
}

pub fn key() -> TokenKey {
    TokenKey::new("acme", "alice", "fixture")
}

pub fn keyring() -> Arc<Keyring> {
    Arc::new(Keyring::new("k1", EncryptionKey::from_bytes([9; 32])).unwrap())
}

/// The storage every process of the fleet builds: Redis tokens, a Redis lease.
pub async fn fleet_storage(
    redis: &str,
    prefix: &str,
    refresher: Arc<dyn Refresher>,
) -> TokenStorage {
    let store = RedisTokenStore::builder(redis).prefix(prefix).connect().await.unwrap();
    fleet_storage_over(SharedTokenStore::new(store), redis, prefix, refresher).await
}

/// [`fleet_storage`] over `store` (the Redis token store, wrapped).
pub async fn fleet_storage_over(
    store: SharedTokenStore,
    redis: &str,
    prefix: &str,
    refresher: Arc<dyn Refresher>,
) -> TokenStorage {
    let flows =
        RedisStore::builder(redis).prefix(format!("{prefix}-leases")).connect().await.unwrap();
    let mut config = TokenStorageConfig::default();
    config.refresh_jitter = Duration::ZERO;
    TokenStorage::builder(store, keyring(), refresher)
        .lease(
            RefreshLease::store(SharedStore::new(flows), SharedClock::system())
                .ttl(LEASE_TTL)
                .wait(WAIT),
        )
        .config(config)
        .build()
}

/// A child process with its stdout lines on a channel.
pub struct Proc {
    pub child: Child,
    pub stdin: Option<ChildStdin>,
    pub lines: mpsc::Receiver<String>,
}

impl Proc {
    pub fn spawn(role: &str, vars: &[(&str, String)]) -> Proc {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.env("FLEET_ROLE", role)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in vars {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let stdin = child.stdin.take();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc { child, stdin, lines }
    }

    /// The rest of the first line containing `marker` (the harness may print before it).
    pub fn expect(&self, marker: &str, within: Duration) -> String {
        let deadline = SystemClock::instant() + within;
        loop {
            let left = deadline.saturating_duration_since(SystemClock::instant());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no {marker:?} line from the child within {within:?}"));
            if let Some(i) = line.find(marker) {
                return line[i + marker.len()..].trim().to_owned();
            }
        }
    }

    pub fn go(&mut self) {
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(b"go\n").unwrap();
        stdin.flush().unwrap();
    }

    pub fn finish(mut self) {
        let deadline = SystemClock::instant() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "child failed: {status}");
                return;
            }
            assert!(SystemClock::instant() < deadline, "child did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Fleet {
    pub redis: RedisServer,
    pub auth: AuthServerHandle,
    pub client_id: String,
    pub prefix: String,
}

impl Fleet {
    /// Redis, the fixture AS (strict rotation, reuse detection), a public client, and tokens
    /// for [`key`] in the shared store whose access token has already expired.
    pub async fn start(prefix: &str) -> Option<Fleet> {
        Fleet::start_with(prefix, false).await
    }

    /// [`Fleet::start`], with Redis persisting to an append-only file.
    pub async fn start_with(prefix: &str, append_only: bool) -> Option<Fleet> {
        let redis = RedisServer::start_with(append_only)?;
        let auth = AuthServer::builder().spawn().await.unwrap();
        auth.knobs().set_refresh_rotation(true);
        auth.knobs().set_reuse_detection(true);
        let client = auth.register_client(ClientSpec::new(ClientAuth::None)).unwrap();
        let issued = auth.issue_tokens(client.client_id(), "mcp:tools", None);
        let seed = TokenResponse::bearer(issued.access_token())
            .expires_in(Duration::from_millis(1))
            .refresh_token(issued.refresh_token().unwrap());
        let storage = fleet_storage(&redis.url(), prefix, Arc::new(Never)).await;
        storage.store(&key(), auth.issuer(), seed).await.unwrap();
        mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(5)).await;
        Some(Fleet {
            client_id: client.client_id().to_owned(),
            redis,
            auth,
            prefix: prefix.to_owned(),
        })
    }

    pub fn vars(&self) -> Vec<(&'static str, String)> {
        vec![
            ("FLEET_REDIS", self.redis.url()),
            ("FLEET_PREFIX", self.prefix.clone()),
            ("FLEET_TOKEN_ENDPOINT", self.auth.token_endpoint()),
            ("FLEET_CLIENT_ID", self.client_id.clone()),
            ("FLEET_ISSUER", self.auth.issuer().to_owned()),
        ]
    }
}
