//! Shared fixtures for the integration tests.
#![allow(dead_code, unreachable_pub)] // Each test binary uses a different part.

use std::sync::Arc;
use std::time::Duration;

use token_storage::testkit::FakeAuthServer;
use token_storage::{
    EncryptionKey, Keyring, ManualClock, MemoryTokenStore, SharedTokenStore, TokenKey,
    TokenStorage, TokenStorageBuilder, TokenStorageConfig,
};

pub const ISS: &str = "https://as.example";
pub const HOUR: Duration = Duration::from_secs(3600);

pub fn keyring() -> Arc<Keyring> {
    Arc::new(Keyring::new("k1", EncryptionKey::from_bytes([7; 32])).unwrap())
}

pub fn key() -> TokenKey {
    TokenKey::new("acme", "alice", "github")
}

/// A config without jitter, so refresh times are exact in tests.
pub fn config() -> TokenStorageConfig {
    let mut c = TokenStorageConfig::default();
    c.refresh_jitter = Duration::ZERO;
    c
}

pub struct Fixture {
    pub storage: TokenStorage,
    pub clock: ManualClock,
    pub server: Arc<FakeAuthServer>,
    pub store: Arc<MemoryTokenStore>,
}

pub fn fixture() -> Fixture {
    fixture_with(config(), |b| b)
}

pub fn fixture_with(
    config: TokenStorageConfig,
    extra: impl FnOnce(TokenStorageBuilder) -> TokenStorageBuilder,
) -> Fixture {
    let clock = ManualClock::default();
    let server = FakeAuthServer::new(clock.shared());
    let store = Arc::new(MemoryTokenStore::new());
    let builder =
        TokenStorage::builder(SharedTokenStore::from_arc(store.clone()), keyring(), server.clone())
            .clock(clock.shared())
            .config(config);
    Fixture { storage: extra(builder).build(), clock, server, store }
}

/// The one bounded wait on real time (mcp-clock's).
#[allow(unused_imports)] // not every test binary waits
pub use mcp_clock::testing::eventually;
