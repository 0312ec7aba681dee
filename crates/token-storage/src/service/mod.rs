//! The service (the seed's `MCPTokenStorage`): [`TokenStorage`] and its configuration.
//!
//! By job: `config.rs` (the tunables), `builder.rs`, `view.rs` (the decrypted in-memory view,
//! the storm brake, the failure cache, sealed reads and writes), `engine.rs` (the refresh: the
//! flight, the lease, the in-doubt intent, fenced writes, the commit), and here the public API.
//!
//! How the races of a rotating refresh token are closed:
//!
//! - **One redemption per key in the process.** Refreshes run through a
//!   [`flow_state::SingleFlight`]; concurrent callers join the one in flight.
//! - **Detached.** The refresh runs in its own task; a caller that times out or is dropped only
//!   ends its own wait, and the rotated refresh token is persisted regardless.
//! - **Re-read before redeeming.** The refresh reads the store when it starts (never a caller's
//!   snapshot) and skips the network call when the tokens were already replaced (a 401 for a
//!   token that is no longer current, or a peer that already refreshed). The cross-process
//!   [`RefreshLease`] (when configured) is taken before the re-read, renewed throughout (every
//!   attempt, backoff sleep and commit), checked before every send, and released at the end.
//! - **In doubt.** Before the first send the record is marked in doubt (the intent), so a
//!   refresher that dies with its request out leaves a record that the next refresher sees: it
//!   claims the one same-token retry in the store, then presents the token once more (a server
//!   with a reuse grace window answers with the successor); a refusal, a second lost answer, or
//!   a record whose retry was claimed already ends in
//!   [`ReauthReason::RotationLostInFlight`](crate::ReauthReason::RotationLostInFlight).
//! - **Fenced writes.** The intent, the retry claim and the failure marker are written only
//!   while the lease holds (see [`RefreshLease`] for what each backend's fence guarantees). A
//!   commit whose lease lapsed is still offered to the compare-and-swap on the version read
//!   (the token is spent; any writer since wins); one that cannot be written is kept in memory
//!   and served, and the next refresh writes it instead of redeeming again.
//! - **Compare-and-swap commit.** The result is written only if the stored version is still the
//!   one read before redeeming; otherwise it is discarded and logged (an interactive login, or
//!   an uninstall, won). A commit that fails on a transient store error is retried under the
//!   renewed lease until it lands.
//! - **No replay after abandonment.** The cancellation token is checked immediately before each
//!   call to the [`Refresher`], so an attempt past its deadline never redeems.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use flow_state::{Attempt, CallOptions, SingleFlight, SingleFlightError};
use mcp_clock::{Clock, SharedClock, Timestamp};
use tracing::{debug, info, warn};

use crate::error::{DecryptFailure, ReauthReason};
use crate::key::{RecordKind, user_prefix};
use crate::lease::{Held, RefreshLease};
use crate::model::{ClientRecord, Doubt, TokenRecord};
use crate::refresher::{RefreshError, RefreshRequest, Refresher, TerminalCode, TransientKind};
use crate::store::{SharedTokenStore, Swapped, TokenStore, Versioned};
use crate::{
    ClientRegistration, Error, KeyProvider, Secret, TokenKey, TokenResponse, TokenSet, crypto,
};

mod builder;
mod config;
mod engine;
mod view;

pub use builder::TokenStorageBuilder;
pub use config::TokenStorageConfig;
use view::{open_client, open_dpop_key, open_tokens, usable};

/// Called after a refresh result is persisted: (key, the set it replaced, the new set).
type RefreshHook = Arc<dyn Fn(&TokenKey, &TokenSet, &TokenSet) + Send + Sync>;

/// Keyed, encrypted, versioned token storage with a refresh that never spends a refresh token
/// twice in a process.
///
/// Cheap to clone; clones share everything. Holds a decrypted in-memory view of the records it
/// has read or written, so [`TokenStorage::get_valid`] on a fresh token touches neither the
/// store nor the cipher. The view is this process's: when several processes share a store
/// (Redis), tokens another process rotated are picked up when this one's view reaches
/// its refresh time (the refresh re-reads the store first) or when a 401 leads to
/// [`TokenStorage::force_refresh`], which always reads the store. Such processes need a
/// [`RefreshLease`] ([`TokenStorageBuilder::lease`]) so that one of them redeems a rotating
/// refresh token and the others adopt its result.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), token_storage::Error> {
/// use std::sync::Arc;
/// use std::time::Duration;
/// use token_storage::*;
///
/// #[derive(Debug)]
/// struct Rotating;
/// #[async_trait::async_trait]
/// impl Refresher for Rotating {
///     async fn refresh(&self, _: &TokenKey, r: &RefreshRequest)
///         -> Result<TokenResponse, RefreshError> {
///         let n = r.refresh_token.expose().trim_start_matches("rt").parse::<u32>().unwrap() + 1;
///         Ok(TokenResponse::bearer(format!("at{n}"))
///             .expires_in(Duration::from_secs(3600))
///             .refresh_token(format!("rt{n}")))
///     }
/// }
///
/// let keys = Keyring::new("k1", EncryptionKey::from_bytes([7; 32]))?;
/// let storage = TokenStorage::builder(MemoryTokenStore::new().into(), Arc::new(keys), Arc::new(Rotating)).build();
/// let key = TokenKey::new("acme", "alice", "github");
/// let issuer = "https://github.example";
/// storage
///     .store(&key, issuer, TokenResponse::bearer("at1").expires_in(Duration::from_secs(3600)).refresh_token("rt1"))
///     .await?;
/// assert_eq!(storage.get_valid(&key, issuer).await?.access_token().expose(), "at1");
///
/// // The server rejected at1 mid-session: one refresh, and the new token.
/// let fresh = storage.force_refresh(&key, issuer, &Secret::new("at1")).await?;
/// assert_eq!(fresh.access_token().expose(), "at2");
/// // A second 401 for the old token does not refresh again.
/// assert_eq!(storage.force_refresh(&key, issuer, &Secret::new("at1")).await?.version(), fresh.version());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct TokenStorage {
    inner: Arc<Inner>,
}

impl fmt::Debug for TokenStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenStorage")
            .field("store", &self.inner.store)
            .field("refresher", &self.inner.refresher)
            .field("config", &self.inner.config)
            .field("refreshes_in_flight", &self.inner.flights.in_flight())
            .finish_non_exhaustive()
    }
}

type FlightResult = Result<Arc<TokenSet>, Error>;

struct Inner {
    store: SharedTokenStore,
    keys: Arc<dyn KeyProvider>,
    refresher: Arc<dyn Refresher>,
    clock: SharedClock,
    config: TokenStorageConfig,
    on_refresh: Option<RefreshHook>,
    lease: Option<RefreshLease>,
    flights: SingleFlight<TokenKey, FlightResult>,
    views: RwLock<HashMap<TokenKey, View>>,
    /// Bumped by every uninstall, so a read that raced it does not put the deleted set back
    /// into the view.
    deletions: AtomicU64,
    slots: Mutex<HashMap<TokenKey, SlotState>>,
}

/// A decrypted token set and when to refresh it (drawn once per version, with jitter).
#[derive(Clone)]
struct View {
    set: Arc<TokenSet>,
    refresh_at: Option<Timestamp>,
}

#[derive(Default)]
struct SlotState {
    failure: Option<(Timestamp, Error)>,
    /// A refresh result whose commit failed on the store, and the refresh token of the set it
    /// was derived from.
    pending: Option<(Option<Secret>, TokenSet)>,
    writes: VecDeque<Timestamp>,
    background: bool,
}

/// What started a refresh.
#[derive(Clone)]
enum Trigger {
    /// The token is inside its refresh window or expired; the caller saw version `seen`.
    Due { seen: u64 },
    /// The server rejected this access token.
    Rejected(Secret),
}

impl<T: TokenStore + 'static> From<T> for SharedTokenStore {
    fn from(store: T) -> Self {
        SharedTokenStore::new(store)
    }
}

fn auth(key: &TokenKey, reason: ReauthReason) -> Error {
    Error::AuthorizationRequired { key: key.clone(), reason }
}

impl TokenStorage {
    /// Store tokens from an interactive authorization (or any other fresh grant) for `key`,
    /// issued by `issuer`. They replace whatever was stored, including a slot marked as needing
    /// authorization. `expires_at` is computed now, on the storage's clock.
    ///
    /// Fails with [`Error::Decrypt`] if the stored record is unreadable (it is not overwritten
    /// silently: [`TokenStorage::delete_all`] clears it), and with [`Error::WriteStorm`] past
    /// the storm brake.
    pub async fn store(
        &self,
        key: &TokenKey,
        issuer: &str,
        response: TokenResponse,
    ) -> Result<Arc<TokenSet>, Error> {
        let inner = &self.inner;
        let now = inner.clock.now();
        inner.check_storm(key, now)?;
        let set = TokenSet::from_response(response, issuer, now, inner.config.max_date_correction);
        let record = key.record(RecordKind::Tokens);
        loop {
            let current = inner.store.get(&record).await?;
            let mut set = set.clone();
            if let Some(current) = &current {
                set.generation = open_tokens(&*inner.keys, &record, current)?.generation;
            }
            match inner.write_tokens(key, current.map(|v| v.version), set).await? {
                Ok(stored) => {
                    inner.record_write(key, now);
                    inner.clear_failure(key);
                    info!(%key, version = stored.version, "stored tokens");
                    return Ok(stored);
                }
                Err(_) => continue,
            }
        }
    }

    /// A valid access token for `key` from `issuer`.
    ///
    /// - Fresh: served from memory.
    /// - Inside the refresh window (buffer plus jitter before expiry): served at once while one
    ///   background refresh runs.
    /// - Expired (or past its refresh window with no expiry known): waits for the refresh,
    ///   joining one already in flight.
    ///
    /// Fails with [`Error::AuthorizationRequired`] when nothing usable is stored, when the slot
    /// was marked after a terminal refresh error, or when the stored tokens come from another
    /// issuer (they are kept, not served).
    pub async fn get_valid(&self, key: &TokenKey, issuer: &str) -> Result<Arc<TokenSet>, Error> {
        let now = self.inner.clock.now();
        if let Some(set) = self.inner.fresh_view(key, issuer, now) {
            return Ok(set);
        }
        let inner = &self.inner;
        let Some(view) = inner.load(key).await? else {
            return Err(auth(key, ReauthReason::Missing));
        };
        let set = usable(key, view.set, issuer)?;
        match (set.expires_at, view.refresh_at) {
            (Some(expires_at), Some(refresh_at)) if now >= refresh_at => {
                if now < expires_at {
                    inner.start_background(key, issuer, set.version, now);
                    Ok(set)
                } else {
                    inner.run_flight(key, issuer, Trigger::Due { seen: set.version }).await
                }
            }
            _ => Ok(set),
        }
    }

    /// The server rejected `rejected` (a 401 mid-session): refresh, unless the stored access
    /// token is already another one, which is then returned at once. Concurrent calls for a key
    /// share one refresh.
    pub async fn force_refresh(
        &self,
        key: &TokenKey,
        issuer: &str,
        rejected: &Secret,
    ) -> Result<Arc<TokenSet>, Error> {
        let set = self.inner.run_flight(key, issuer, Trigger::Rejected(rejected.clone())).await?;
        if set.access_token != *rejected {
            return Ok(set);
        }
        // We joined a refresh started for another reason that settled on the rejected token
        // (it found it current and not yet due): start our own.
        self.inner.run_flight(key, issuer, Trigger::Rejected(rejected.clone())).await
    }

    /// The clock expiry, backoff and deadlines run on.
    pub fn clock(&self) -> &SharedClock {
        &self.inner.clock
    }

    /// The stored token set for `key`, as it is (no refresh, no validity check).
    pub async fn tokens(&self, key: &TokenKey) -> Result<Option<Arc<TokenSet>>, Error> {
        Ok(self.inner.load(key).await?.map(|v| v.set))
    }

    /// Store (or replace) the client registration for `key`.
    pub async fn store_client(
        &self,
        key: &TokenKey,
        client: &ClientRegistration,
    ) -> Result<(), Error> {
        let record = key.record(RecordKind::Client);
        let plain = serde_json::to_vec(&ClientRecord::from_registration(client))
            .map_err(|e| Error::store("could not encode the client registration", e))?;
        let sealed = crypto::seal(&*self.inner.keys, &record, &plain)?;
        loop {
            let current = self.inner.store.get(&record).await?;
            if let Some(current) = &current {
                open_client(&*self.inner.keys, &record, current)?;
            }
            let expected = current.map(|v| v.version);
            if let Swapped::Swapped { .. } =
                self.inner.store.compare_and_swap(&record, expected, sealed.clone()).await?
            {
                return Ok(());
            }
        }
    }

    /// The client registration stored for `key`.
    pub async fn client(&self, key: &TokenKey) -> Result<Option<ClientRegistration>, Error> {
        Ok(self.inner.load_client(key).await?.map(|(_, c)| c))
    }

    /// Delete the client registration for `key`; returns whether there was one.
    pub async fn delete_client(&self, key: &TokenKey) -> Result<bool, Error> {
        self.inner.store.delete_if(&key.record(RecordKind::Client), None).await
    }

    /// The DPoP key (RFC 9449) stored for `key`, as the caller stored it (a PKCS#8 PEM), sealed
    /// like the tokens. `None` when there is none.
    ///
    /// Fails with [`Error::Decrypt`] when the record is unreadable.
    pub async fn dpop_key(&self, key: &TokenKey) -> Result<Option<Secret>, Error> {
        self.inner.load_dpop_key(key).await
    }

    /// The DPoP key for `key`: the stored one, else `candidate`, stored only where none is
    /// (an insert-if-absent on the store), so concurrent first uses, in any process sharing the
    /// store, all get the one key that was stored first. A stored key is never replaced: the
    /// tokens are bound to it. [`TokenStorage::delete_all`] deletes it with the tokens.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), token_storage::Error> {
    /// # use token_storage::*; use std::sync::Arc;
    /// # #[derive(Debug)] struct R; #[async_trait::async_trait] impl Refresher for R { async fn refresh(&self, _: &TokenKey, _: &RefreshRequest)
    /// #   -> Result<TokenResponse, RefreshError> { Err(RefreshError::terminal(TerminalCode::InvalidGrant, None)) } }
    /// let keys = Keyring::parse(&"42".repeat(32))?;
    /// let storage = TokenStorage::builder(MemoryTokenStore::new().into(), Arc::new(keys), Arc::new(R)).build();
    /// let key = TokenKey::new("acme", "alice", "github");
    /// let first = storage.dpop_key_or_insert(&key, Secret::new("pem-1")).await?;
    /// let second = storage.dpop_key_or_insert(&key, Secret::new("pem-2")).await?;
    /// assert_eq!((first.expose(), second.expose()), ("pem-1", "pem-1"));
    /// # Ok(()) }
    /// ```
    pub async fn dpop_key_or_insert(
        &self,
        key: &TokenKey,
        candidate: Secret,
    ) -> Result<Secret, Error> {
        let inner = &self.inner;
        if let Some(stored) = inner.load_dpop_key(key).await? {
            return Ok(stored);
        }
        let record = key.record(RecordKind::DpopKey);
        let plain = serde_json::to_vec(&serde_json::json!({ "pem": candidate.expose() }))
            .map_err(|e| Error::store("could not encode the DPoP key", e))?;
        let sealed = crypto::seal(&*inner.keys, &record, &plain)?;
        match inner.store.compare_and_swap(&record, None, sealed).await? {
            Swapped::Swapped { .. } => {
                info!(%key, "stored a new DPoP key");
                Ok(candidate)
            }
            Swapped::Conflict(Some(theirs)) => open_dpop_key(&*inner.keys, &record, &theirs),
            // Deleted between the insert and its refusal: try once more from the start.
            Swapped::Conflict(None) => Box::pin(self.dpop_key_or_insert(key, candidate)).await,
        }
    }

    /// Delete everything stored for `key` (uninstall): tokens, client registration and DPoP
    /// key. A refresh in flight for the key finds its result discarded.
    pub async fn delete_all(&self, key: &TokenKey) -> Result<(), Error> {
        let inner = &self.inner;
        inner.store.delete_if(&key.record(RecordKind::Tokens), None).await?;
        inner.store.delete_if(&key.record(RecordKind::Client), None).await?;
        inner.store.delete_if(&key.record(RecordKind::DpopKey), None).await?;
        inner.deletions.fetch_add(1, Ordering::SeqCst);
        inner.views.write().unwrap_or_else(PoisonError::into_inner).remove(key);
        inner.slots.lock().unwrap_or_else(PoisonError::into_inner).remove(key);
        info!(%key, "deleted tokens and client registration");
        Ok(())
    }

    /// Every key with a record for `user` in `tenant` (an unknown tenant or user: none).
    pub async fn list(&self, tenant: &str, user: &str) -> Result<Vec<TokenKey>, Error> {
        let prefix = user_prefix(tenant, user);
        let records = self.inner.store.keys_with_prefix(&prefix).await?;
        let keys: BTreeSet<TokenKey> = records
            .iter()
            .filter_map(|r| TokenKey::from_record(r))
            .map(|(k, _)| k)
            .filter(|k| k.tenant() == tenant && k.user() == user)
            .collect();
        Ok(keys.into_iter().collect())
    }
}
