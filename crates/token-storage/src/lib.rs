//! Keyed, encrypted, versioned OAuth token storage with a refresh that never spends a refresh
//! token twice (the seed's `MCPTokenStorage`).
//!
//! - [`TokenStorage`]: store, [`get_valid`](TokenStorage::get_valid) (refresh ahead of expiry,
//!   serving the still-valid token meanwhile), [`force_refresh`](TokenStorage::force_refresh)
//!   (after a 401: refresh only if the rejected token is still the stored one), client
//!   registrations, the DPoP key of each key
//!   ([`dpop_key_or_insert`](TokenStorage::dpop_key_or_insert)), uninstall and listing.
//! - [`Refresher`]: the refresh grant, supplied by the OAuth layer (this crate does no HTTP),
//!   failing with a terminal or transient [`RefreshError`].
//! - [`TokenStore`]: the small compare-and-swap store trait, with [`MemoryTokenStore`] and
//!   (feature `sled`) `SledTokenStore`, (feature `redis`) `RedisTokenStore`. What only a
//!   backend's author needs ([`Versioned`](store::Versioned), [`Swapped`](store::Swapped),
//!   [`Fence`](store::Fence)) is in [`store`].
//! - [`KeyProvider`] / [`Keyring`]: XChaCha20-Poly1305 encryption at rest, with rotating key ids.
//! - [`RefreshLease`]: the cross-process lease around each redemption, over a flow-state store
//!   (Redis, for fleets) or lock files (processes on one host).
//! - [`Secret`]: tokens and client secrets, redacted in `Debug` and `Display`.
//!
//! Every refresh for a key in the process runs once, detached from its callers, re-reads the
//! store before redeeming and commits with compare-and-swap on the version it read; see
//! [`TokenStorage`] for the details.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), token_storage::Error> {
//! use std::sync::Arc;
//! use std::time::Duration;
//! use token_storage::*;
//!
//! #[derive(Debug)]
//! struct NoRefresh;
//! #[async_trait::async_trait]
//! impl Refresher for NoRefresh {
//!     async fn refresh(&self, _: &TokenKey, _: &RefreshRequest)
//!         -> Result<TokenResponse, RefreshError> {
//!         Err(RefreshError::terminal(TerminalCode::UnauthorizedClient, None))
//!     }
//! }
//!
//! let keys = Keyring::parse(&"42".repeat(32))?;
//! let storage = TokenStorage::builder(MemoryTokenStore::new().into(), Arc::new(keys), Arc::new(NoRefresh)).build();
//! let key = TokenKey::new("acme", "alice", "github");
//! storage.store(&key, "https://as.example", TokenResponse::bearer("at").expires_in(Duration::from_secs(600))).await?;
//! assert_eq!(storage.list("acme", "alice").await?, vec![key.clone()]);
//! assert!(storage.list("other-tenant", "alice").await?.is_empty());
//! storage.delete_all(&key).await?;
//! assert!(storage.get_valid(&key, "https://as.example").await.unwrap_err().is_authorization_required());
//! # Ok(()) }
//! ```

mod crypto;
mod error;
mod key;
mod lease;
mod lock_file;
mod model;
mod refresher;
mod secret;
mod service;
pub mod store;
#[cfg(feature = "test-util")]
pub mod testkit;

pub use crypto::{EncryptionKey, KeyProvider, Keyring};
pub use error::{DecryptFailure, Error, ReauthReason};
pub use key::TokenKey;
pub use lease::RefreshLease;
pub use lock_file::{FileLock, lock_file_name};
#[cfg(feature = "test-util")]
pub use mcp_clock::ManualClock;
pub use mcp_clock::{Clock, SharedClock, SystemClock, Timestamp};
pub use model::{ClientRegistration, TokenSet};
pub use refresher::{
    RefreshError, RefreshRequest, Refresher, TerminalCode, TokenResponse, TransientKind,
};
pub use secret::Secret;
pub use service::{TokenStorage, TokenStorageBuilder, TokenStorageConfig};
pub use store::memory::MemoryTokenStore;
#[cfg(feature = "redis")]
pub use store::redis::{RedisTokenStore, RedisTokenStoreBuilder};
#[cfg(feature = "sled")]
pub use store::sled::SledTokenStore;
pub use store::{SharedTokenStore, TokenStore};
