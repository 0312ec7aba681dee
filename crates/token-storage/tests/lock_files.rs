//! The lock-file refresh lease across real processes: a child process holds the lock while its
//! token endpoint hangs; the parent's refresh of the same key waits, and goes ahead as soon as
//! the child is SIGKILLed (the kernel releases the lock of a dead process; no TTL involved).
//!
//! The test re-executes its own binary as the child: this binary has its own `main`
//! (`harness = false`), which plays the child when the environment variable below names a lock
//! directory and runs the tests otherwise, so the child is not counted as a test.

#[path = "it/common/child_harness.rs"]
mod child_harness;
#[path = "it/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use token_storage::testkit::FakeAuthServer;
use token_storage::{
    MemoryTokenStore, RefreshError, RefreshLease, RefreshRequest, Refresher, SharedClock, TokenKey,
    TokenResponse, TokenStorage,
};

const CHILD_DIR: &str = "TOKEN_STORAGE_LOCK_CHILD_DIR";

/// Announces the redemption and never answers.
#[derive(Debug)]
struct Hang;

#[async_trait::async_trait]
impl Refresher for Hang {
    async fn refresh(
        &self,
        _: &TokenKey,
        _: &RefreshRequest,
    ) -> Result<TokenResponse, RefreshError> {
        println!("HOLDING");
        std::future::pending().await
    }
}

fn seed() -> TokenResponse {
    TokenResponse::bearer("at-0").expires_in(HOUR).refresh_token("rt-0")
}

fn main() -> std::process::ExitCode {
    if let Ok(dir) = std::env::var(CHILD_DIR) {
        lock_child(dir);
        return std::process::ExitCode::SUCCESS;
    }
    child_harness::run(&[child_harness::Test {
        name: "a_dead_processes_lock_is_released_at_once",
        run: || child_harness::block_on(a_dead_processes_lock_is_released_at_once()),
    }])
}

/// The child process of `a_dead_processes_lock_is_released_at_once`: takes the lock and hangs.
fn lock_child(dir: String) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let storage =
            TokenStorage::builder(MemoryTokenStore::new().into(), keyring(), Arc::new(Hang))
                .lease(RefreshLease::lock_files(dir))
                .build();
        let set = storage.store(&key(), ISS, seed()).await.unwrap();
        let _ = storage.force_refresh(&key(), ISS, set.access_token()).await;
    });
}

async fn a_dead_processes_lock_is_released_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let locks = dir.path().join("locks");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env(CHILD_DIR, &locks)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.contains("HOLDING") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30)).expect("the child took the lock");

    let server = FakeAuthServer::new(SharedClock::system());
    let storage = TokenStorage::builder(MemoryTokenStore::new().into(), keyring(), server.clone())
        .lease(RefreshLease::lock_files(&locks).wait(Duration::from_secs(20)))
        .build();
    let first = storage.store(&key(), ISS, server.issue(&key())).await.unwrap();
    let refresh = tokio::spawn({
        let (storage, rejected) = (storage.clone(), first.access_token().clone());
        async move { storage.force_refresh(&key(), ISS, &rejected).await }
    });
    mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(300)).await;
    assert!(!refresh.is_finished(), "the refresh waits for the child's lock");
    assert_eq!(server.calls(), 0, "nothing redeemed while another process holds the lock");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let fresh = mcp_clock::within(&mcp_clock::SystemClock, Duration::from_secs(10), refresh)
        .await
        .expect("the lock is released with its process")
        .unwrap()
        .unwrap();
    assert_ne!(fresh.access_token(), first.access_token());
    assert_eq!(server.calls(), 1);
}
