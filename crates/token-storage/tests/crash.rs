//! Crash safety: a process killed with SIGKILL in the middle of refreshing leaves a readable
//! store holding either the old or the new token set, never a torn one.
//!
//! The test re-executes its own binary as the child, lets it refresh in a loop against sled, and
//! kills it at varying points. This binary has its own `main` (`harness = false`): it plays the
//! child when the environment variable below names a database and runs the tests otherwise, so
//! the child is not counted as a test.

#[path = "it/common/child_harness.rs"]
mod child_harness;
#[path = "it/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use token_storage::{
    Error, ReauthReason, RefreshError, RefreshRequest, Refresher, SledTokenStore, TerminalCode,
    TokenKey, TokenResponse, TokenStorage,
};

const CHILD_DB: &str = "TOKEN_STORAGE_CRASH_CHILD_DB";
const CHILD_HANG: &str = "TOKEN_STORAGE_CRASH_CHILD_HANG";

/// Rotates `rt-<n>` into `at-<n+1>` / `rt-<n+1>`; in hang mode, announces the redemption and
/// never answers.
#[derive(Debug)]
struct Counting {
    hang: bool,
}

#[async_trait::async_trait]
impl Refresher for Counting {
    async fn refresh(
        &self,
        _: &TokenKey,
        r: &RefreshRequest,
    ) -> Result<TokenResponse, RefreshError> {
        let n: u64 = r.refresh_token.expose().trim_start_matches("rt-").parse().unwrap();
        if self.hang {
            println!("redeeming {n}");
            std::future::pending::<()>().await;
        }
        Ok(TokenResponse::bearer(format!("at-{}", n + 1))
            .expires_in(HOUR)
            .refresh_token(format!("rt-{}", n + 1)))
    }
}

fn storage(dir: &str, hang: bool) -> TokenStorage {
    let mut config = config();
    config.storm_limit = u32::MAX;
    TokenStorage::builder(
        SledTokenStore::open(dir).unwrap().into(),
        keyring(),
        Arc::new(Counting { hang }),
    )
    .config(config)
    .build()
}

fn seed() -> TokenResponse {
    TokenResponse::bearer("at-0").expires_in(HOUR).refresh_token("rt-0")
}

fn main() -> std::process::ExitCode {
    if let Ok(dir) = std::env::var(CHILD_DB) {
        crash_child(dir);
        return std::process::ExitCode::SUCCESS;
    }
    child_harness::run(&[
        child_harness::Test {
            name: "sigkill_mid_refresh_never_tears_a_record",
            run: sigkill_mid_refresh_never_tears_a_record,
        },
        child_harness::Test {
            name: "a_refresher_killed_after_sending_leaves_the_token_in_doubt",
            run: a_refresher_killed_after_sending_leaves_the_token_in_doubt,
        },
    ])
}

/// The child process of `sigkill_mid_refresh_never_tears_a_record`: refreshes in a loop.
fn crash_child(dir: String) {
    let hang = std::env::var(CHILD_HANG).is_ok();
    if std::env::var("CRASH_TRACE").is_ok() {
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(std::io::stderr)
            .init();
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let storage = storage(&dir, hang);
        let key = key();
        if storage.tokens(&key).await.unwrap().is_none() {
            storage.store(&key, ISS, seed()).await.unwrap();
        }
        loop {
            let current = storage.tokens(&key).await.unwrap().unwrap();
            let next = storage.force_refresh(&key, ISS, current.access_token()).await.unwrap();
            println!("committed {}", next.access_token().expose().trim_start_matches("at-"));
        }
    });
}

/// Runs the child until it has printed `lines` lines starting with `prefix`, then SIGKILLs it.
/// Returns the number on the last such line.
fn run_and_kill(dir: &str, hang: bool, prefix: &str, lines: usize) -> u64 {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.env(CHILD_DB, dir).stdout(Stdio::piped()).stderr(Stdio::null());
    if hang {
        cmd.env(CHILD_HANG, "1");
    }
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let prefix = prefix.to_owned();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            // The harness may print `test crash_child ... ` on the same line first.
            if let Some(n) = line.find(&prefix).map(|i| &line[i + prefix.len()..])
                && tx.send(n.trim().parse::<u64>().unwrap()).is_err()
            {
                break;
            }
        }
    });
    let mut last = 0;
    for _ in 0..lines {
        last = rx.recv_timeout(Duration::from_secs(60)).expect("the child makes progress");
    }
    child.kill().unwrap(); // SIGKILL on Unix.
    child.wait().unwrap();
    last
}

fn sigkill_mid_refresh_never_tears_a_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_str().unwrap().to_owned();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let key = key();
    rt.block_on(async {
        let s = storage(&path, false);
        s.store(&key, ISS, seed()).await.unwrap();
    });
    let read_back = |min: u64| {
        rt.block_on(async {
            let s = storage(&path, false);
            let set = s.tokens(&key).await.expect("readable after a crash").expect("present");
            let at: u64 = set.access_token().expose().trim_start_matches("at-").parse().unwrap();
            let rt: u64 =
                set.refresh_token().unwrap().expose().trim_start_matches("rt-").parse().unwrap();
            assert_eq!(at, rt, "a torn record: access token {at} with refresh token {rt}");
            assert!(at >= min, "a committed refresh was lost: stored {at}, committed {min}");
            at
        })
    };
    // Kill while refreshing in a tight loop, at several points.
    let mut stored = 0;
    for lines in [1, 3, 8, 20, 45] {
        let committed = run_and_kill(&path, false, "committed ", lines);
        stored = read_back(committed);
    }
    // Kill while the redemption is in flight and nothing was written yet: the old set stays.
    let redeeming = run_and_kill(&path, true, "redeeming ", 1);
    assert_eq!(redeeming, stored);
    assert_eq!(read_back(stored), stored);
}

/// A strict server after a redemption whose answer never came: every refresh token presented
/// again is refused (reuse), and each presentation is counted.
#[derive(Debug, Default)]
struct Refusing {
    presented: std::sync::Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl Refresher for Refusing {
    async fn refresh(
        &self,
        _: &TokenKey,
        r: &RefreshRequest,
    ) -> Result<TokenResponse, RefreshError> {
        self.presented.lock().unwrap().push(r.refresh_token.expose().to_owned());
        Err(RefreshError::terminal(TerminalCode::InvalidGrant, None))
    }
}

/// Race (issue 12, the model's `in_doubt_before_send`): a process is SIGKILLed after its
/// request reached the token endpoint and before any answer. The in-doubt intent written
/// before the send is in the store, so the next refresher (another process) knows the refresh
/// token may be spent: it presents it once more (the one same-token retry) and, refused,
/// reports the rotation lost in flight instead of a plain rejection. Without the intent the
/// record looks untouched and the successor's refusal reads as an ordinary `invalid_grant`.
fn a_refresher_killed_after_sending_leaves_the_token_in_doubt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_str().unwrap().to_owned();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let key = key();
    rt.block_on(async {
        let s = storage(&path, false);
        s.store(&key, ISS, seed()).await.unwrap();
    });
    let redeeming = run_and_kill(&path, true, "redeeming ", 1);
    assert_eq!(redeeming, 0);
    rt.block_on(async {
        let refusing = Arc::new(Refusing::default());
        let s = TokenStorage::builder(
            SledTokenStore::open(&path).unwrap().into(),
            keyring(),
            refusing.clone(),
        )
        .config(config())
        .build();
        let found = s.tokens(&key).await.unwrap().expect("present");
        assert!(found.in_doubt(), "the killed refresher left no in-doubt intent");
        assert_eq!(found.refresh_token().unwrap().expose(), "rt-0");
        match s.force_refresh(&key, ISS, found.access_token()).await {
            Err(Error::AuthorizationRequired {
                reason: ReauthReason::RotationLostInFlight,
                ..
            }) => {}
            other => panic!("expected a rotation lost in flight, got {other:?}"),
        }
        assert_eq!(*refusing.presented.lock().unwrap(), ["rt-0"], "one same-token retry");
        let marked = s.tokens(&key).await.unwrap().unwrap();
        assert!(!marked.in_doubt() && marked.needs_authorization().is_some());
    });
}
