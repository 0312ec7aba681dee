//! The service (the seed's `MCPTokenStorage`): [`TokenStorage`] and its configuration.
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
use crate::store::{SharedTokenStore, Swap, TokenStore, Versioned};
use crate::{
    ClientRegistration, Error, KeyProvider, Secret, TokenKey, TokenResponse, TokenSet, crypto,
};

/// Tunables of a [`TokenStorage`]. Start from [`TokenStorageConfig::default`].
///
/// ```
/// use std::time::Duration;
/// let mut config = token_storage::TokenStorageConfig::default();
/// config.refresh_buffer = Duration::from_secs(120);
/// config.storm_limit = 10;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TokenStorageConfig {
    /// Refresh this long before the access token expires (capped at half its lifetime).
    pub refresh_buffer: Duration,
    /// Plus a random extra of up to this much, so replicas and keys do not refresh in lockstep.
    pub refresh_jitter: Duration,
    /// How far the response's `Date` header may move `expires_at` earlier.
    pub max_date_correction: Duration,
    /// A refresh still running after this long is told to stop (before its next redemption).
    pub refresh_deadline: Duration,
    /// A stopped refresh that has not finished after this much longer is dropped, freeing the key.
    pub refresh_grace: Duration,
    /// How long a caller waits for a refresh before giving up (the refresh goes on); `None`:
    /// until the refresh ends.
    pub caller_deadline: Option<Duration>,
    /// Attempts per refresh when failures are transient.
    pub max_attempts: u32,
    /// Backoff before the second attempt; doubled each time, with jitter.
    pub backoff_base: Duration,
    /// The longest backoff; a `Retry-After` longer than this ends the refresh at once.
    pub backoff_max: Duration,
    /// After a refresh fails transiently, further refreshes of the key fail at once for this
    /// long (or the server's `Retry-After`, if longer) instead of calling the server again.
    pub failure_ttl: Duration,
    /// More than this many token writes for one key within `storm_window` stop with
    /// [`Error::WriteStorm`].
    pub storm_limit: u32,
    /// The storm-brake window.
    pub storm_window: Duration,
}

impl Default for TokenStorageConfig {
    fn default() -> Self {
        TokenStorageConfig {
            refresh_buffer: Duration::from_secs(60),
            refresh_jitter: Duration::from_secs(30),
            max_date_correction: Duration::from_secs(300),
            refresh_deadline: Duration::from_secs(60),
            refresh_grace: Duration::from_secs(10),
            caller_deadline: Some(Duration::from_secs(30)),
            max_attempts: 3,
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(10),
            failure_ttl: Duration::from_secs(10),
            storm_limit: 30,
            storm_window: Duration::from_secs(60),
        }
    }
}

/// Options for building a [`TokenStorage`].
pub struct TokenStorageBuilder {
    store: SharedTokenStore,
    keys: Arc<dyn KeyProvider>,
    refresher: Arc<dyn Refresher>,
    clock: SharedClock,
    config: TokenStorageConfig,
    on_refresh: Option<RefreshHook>,
    lease: Option<RefreshLease>,
}

/// Called after a refresh result is persisted: (key, the set it replaced, the new set).
type RefreshHook = Arc<dyn Fn(&TokenKey, &TokenSet, &TokenSet) + Send + Sync>;

impl fmt::Debug for TokenStorageBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenStorageBuilder")
            .field("store", &self.store)
            .field("refresher", &self.refresher)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl TokenStorageBuilder {
    /// Run `hook` after every refresh result is persisted, with the key, the set it replaced
    /// and the new set (the one this refresh wrote, with the version it created, even when a
    /// login replaced it again before the write's reply came back). It runs inside the
    /// detached refresh, so it runs even when every caller has gone (the place to tell live
    /// connections about the new token). Keep it quick.
    pub fn on_refresh(
        mut self,
        hook: impl Fn(&TokenKey, &TokenSet, &TokenSet) + Send + Sync + 'static,
    ) -> Self {
        self.on_refresh = Some(Arc::new(hook));
        self
    }

    /// Coordinate refreshes with other processes that share the store (default: none, for a
    /// store only this process uses). See [`RefreshLease`].
    pub fn lease(mut self, lease: RefreshLease) -> Self {
        self.lease = Some(lease);
        self
    }

    /// The clock expiry, backoff and deadlines run on (default: the system clock).
    pub fn clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }

    /// The tunables (default: [`TokenStorageConfig::default`]).
    pub fn config(mut self, config: TokenStorageConfig) -> Self {
        self.config = config;
        self
    }

    /// Build the service.
    pub fn build(self) -> TokenStorage {
        let flights = SingleFlight::new(self.clock.clone());
        TokenStorage {
            inner: Arc::new(Inner {
                store: self.store,
                keys: self.keys,
                refresher: self.refresher,
                clock: self.clock,
                config: self.config,
                on_refresh: self.on_refresh,
                lease: self.lease,
                flights,
                views: RwLock::default(),
                deletions: AtomicU64::new(0),
                slots: Mutex::default(),
            }),
        }
    }
}

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
/// impl Refresher for Rotating {
///     fn refresh<'a>(&'a self, _: &'a TokenKey, r: &'a RefreshRequest)
///         -> BoxFuture<'a, Result<TokenResponse, RefreshError>> {
///         let n = r.refresh_token.expose().trim_start_matches("rt").parse::<u32>().unwrap() + 1;
///         Box::pin(async move {
///             Ok(TokenResponse::bearer(format!("at{n}"))
///                 .expires_in(Duration::from_secs(3600))
///                 .refresh_token(format!("rt{n}")))
///         })
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

/// How many times an in-doubt record is tried on transient store errors before the refresh
/// gives up without sending.
const COMMIT_TRIES: u32 = 4;

/// Whether a store error may pass (the backend was unreachable).
fn transient_store(e: &Error) -> bool {
    matches!(e, Error::StoreUnavailable { .. })
}

/// A held lease, renewed in the background while the refresh runs.
struct LeaseGuard {
    held: tokio::sync::Mutex<Held>,
    lost: std::sync::atomic::AtomicBool,
}

impl LeaseGuard {
    fn new(held: Held) -> Self {
        LeaseGuard { held: tokio::sync::Mutex::new(held), lost: Default::default() }
    }

    /// Renew every `every` for as long as it is polled; stops renewing once the lease is lost.
    async fn keep_renewed(
        &self,
        key: &TokenKey,
        every: Duration,
        clock: &SharedClock,
    ) -> std::convert::Infallible {
        loop {
            clock.sleep(every).await;
            if self.lost.load(Ordering::SeqCst) {
                continue;
            }
            match self.held.lock().await.renew(key).await {
                Ok(true) => {}
                Ok(false) => {
                    warn!(%key, "the refresh lease was lost");
                    self.lost.store(true, Ordering::SeqCst);
                }
                // Perhaps applied: the owner token tells at the next renewal or check.
                Err(e) => warn!(%key, error = %e, "could not renew the refresh lease"),
            }
        }
    }

    /// Whether the lease still holds.
    async fn check(&self, key: &TokenKey) -> Result<bool, Error> {
        if self.lost.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let held = self.held.lock().await.still_held(key).await?;
        if !held {
            self.lost.store(true, Ordering::SeqCst);
        }
        Ok(held)
    }
}

fn auth(key: &TokenKey, reason: ReauthReason) -> Error {
    Error::AuthorizationRequired { key: key.clone(), reason }
}

fn random_up_to(max: Duration) -> Duration {
    let millis = u64::try_from(max.as_millis()).unwrap_or(u64::MAX);
    if millis == 0 {
        return Duration::ZERO;
    }
    Duration::from_millis(getrandom::u64().unwrap_or(0) % (millis + 1))
}

impl TokenStorage {
    /// A builder over `store`, sealing records with `keys`, refreshing through `refresher`.
    pub fn builder(
        store: SharedTokenStore,
        keys: Arc<dyn KeyProvider>,
        refresher: Arc<dyn Refresher>,
    ) -> TokenStorageBuilder {
        TokenStorageBuilder {
            store,
            keys,
            refresher,
            clock: SharedClock::system(),
            config: TokenStorageConfig::default(),
            on_refresh: None,
            lease: None,
        }
    }

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
            if let Swap::Swapped { .. } =
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
        self.inner.store.delete(&key.record(RecordKind::Client), None).await
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
    /// # #[derive(Debug)] struct R; impl Refresher for R { fn refresh<'a>(&'a self, _: &'a TokenKey, _: &'a RefreshRequest)
    /// #   -> BoxFuture<'a, Result<TokenResponse, RefreshError>> { Box::pin(async { Err(RefreshError::terminal(TerminalCode::InvalidGrant, None)) }) } }
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
            Swap::Swapped { .. } => {
                info!(%key, "stored a new DPoP key");
                Ok(candidate)
            }
            Swap::Conflict(Some(theirs)) => open_dpop_key(&*inner.keys, &record, &theirs),
            // Deleted between the insert and its refusal: try once more from the start.
            Swap::Conflict(None) => Box::pin(self.dpop_key_or_insert(key, candidate)).await,
        }
    }

    /// Delete everything stored for `key` (uninstall): tokens, client registration and DPoP
    /// key. A refresh in flight for the key finds its result discarded.
    pub async fn delete_all(&self, key: &TokenKey) -> Result<(), Error> {
        let inner = &self.inner;
        inner.store.delete(&key.record(RecordKind::Tokens), None).await?;
        inner.store.delete(&key.record(RecordKind::Client), None).await?;
        inner.store.delete(&key.record(RecordKind::DpopKey), None).await?;
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

/// The set if it may be served for `issuer`, else why not.
fn usable(key: &TokenKey, set: Arc<TokenSet>, issuer: &str) -> Result<Arc<TokenSet>, Error> {
    if let Some(reason) = &set.needs_authorization {
        return Err(auth(key, reason.clone()));
    }
    if set.issuer != issuer {
        return Err(auth(
            key,
            ReauthReason::IssuerChanged { stored: set.issuer.clone(), expected: issuer.to_owned() },
        ));
    }
    Ok(set)
}

fn open_tokens(keys: &dyn KeyProvider, record: &str, v: &Versioned) -> Result<TokenSet, Error> {
    let (plain, generation) = crypto::open_generation(keys, record, &v.value)?;
    let parsed: TokenRecord = serde_json::from_slice(&plain).map_err(|_| Error::Decrypt {
        record: record.to_owned(),
        reason: DecryptFailure::Malformed,
    })?;
    Ok(parsed.into_set(v.version, generation))
}

fn open_dpop_key(keys: &dyn KeyProvider, record: &str, v: &Versioned) -> Result<Secret, Error> {
    let malformed =
        || Error::Decrypt { record: record.to_owned(), reason: DecryptFailure::Malformed };
    let plain = crypto::open(keys, record, &v.value)?;
    let parsed: serde_json::Value = serde_json::from_slice(&plain).map_err(|_| malformed())?;
    let pem = parsed.get("pem").and_then(|p| p.as_str()).ok_or_else(malformed)?;
    Ok(Secret::new(pem))
}

fn open_client(
    keys: &dyn KeyProvider,
    record: &str,
    v: &Versioned,
) -> Result<ClientRegistration, Error> {
    let plain = crypto::open(keys, record, &v.value)?;
    let parsed: ClientRecord = serde_json::from_slice(&plain).map_err(|_| Error::Decrypt {
        record: record.to_owned(),
        reason: DecryptFailure::Malformed,
    })?;
    Ok(parsed.into_registration())
}

impl Inner {
    fn fresh_view(&self, key: &TokenKey, issuer: &str, now: Timestamp) -> Option<Arc<TokenSet>> {
        let views = self.views.read().unwrap_or_else(PoisonError::into_inner);
        let view = views.get(key)?;
        let fresh = view.set.needs_authorization.is_none()
            && view.set.issuer == issuer
            && view.refresh_at.is_none_or(|at| now < at);
        fresh.then(|| view.set.clone())
    }

    fn slot<T>(&self, key: &TokenKey, f: impl FnOnce(&mut SlotState) -> T) -> T {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        f(slots.entry(key.clone()).or_default())
    }

    fn check_storm(&self, key: &TokenKey, now: Timestamp) -> Result<(), Error> {
        let (limit, window) = (self.config.storm_limit, self.config.storm_window);
        self.slot(key, |s| {
            while s.writes.front().is_some_and(|t| now.saturating_since(*t) >= window) {
                s.writes.pop_front();
            }
            if s.writes.len() >= limit as usize {
                warn!(%key, limit, ?window, "storm brake: too many token writes");
                return Err(Error::WriteStorm { key: key.clone(), limit, window });
            }
            Ok(())
        })
    }

    fn record_write(&self, key: &TokenKey, now: Timestamp) {
        self.slot(key, |s| s.writes.push_back(now));
    }

    fn clear_failure(&self, key: &TokenKey) {
        self.slot(key, |s| s.failure = None);
    }

    fn cached_failure(&self, key: &TokenKey, now: Timestamp) -> Option<Error> {
        self.slot(key, |s| match &s.failure {
            Some((until, e)) if now < *until => Some(e.clone()),
            _ => None,
        })
    }

    /// Install a decrypted set as the view of `key` unless a newer one is there; returns the
    /// view that is in place afterwards (which may be that newer one).
    fn install(&self, key: &TokenKey, set: Arc<TokenSet>) -> View {
        self.install_unless_deleted(key, set, None)
    }

    /// [`Inner::install`], skipped if an uninstall happened since `deletions` was read.
    fn install_unless_deleted(
        &self,
        key: &TokenKey,
        set: Arc<TokenSet>,
        deletions: Option<u64>,
    ) -> View {
        let refresh_at = set.expires_at.map(|expires_at| {
            let lifetime = expires_at.saturating_since(set.obtained_at);
            let ahead = (self.config.refresh_buffer + random_up_to(self.config.refresh_jitter))
                .min(lifetime / 2);
            expires_at - ahead
        });
        let view = View { set, refresh_at };
        let mut views = self.views.write().unwrap_or_else(PoisonError::into_inner);
        if deletions.is_some_and(|d| d != self.deletions.load(Ordering::SeqCst)) {
            return view;
        }
        match views.get(key) {
            Some(existing) if existing.set.version >= view.set.version => existing.clone(),
            _ => {
                views.insert(key.clone(), view.clone());
                view
            }
        }
    }

    /// Read the stored token set, decrypting only when the version is not the one in view.
    async fn load(&self, key: &TokenKey) -> Result<Option<View>, Error> {
        let record = key.record(RecordKind::Tokens);
        let deletions = self.deletions.load(Ordering::SeqCst);
        let Some(stored) = self.store.get(&record).await? else {
            self.views.write().unwrap_or_else(PoisonError::into_inner).remove(key);
            return Ok(None);
        };
        {
            let views = self.views.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(view) = views.get(key)
                && view.set.version == stored.version
            {
                return Ok(Some(view.clone()));
            }
        }
        let set = open_tokens(&*self.keys, &record, &stored)?;
        self.check_generation(key, &record, &set)?;
        Ok(Some(self.install_unless_deleted(key, Arc::new(set), Some(deletions))))
    }

    /// Refuse a record written after the one in view (a larger store version) whose sealed
    /// generation is older: an older sealed blob written back under the same name (a
    /// rollback). The record is left as it is.
    fn check_generation(&self, key: &TokenKey, record: &str, set: &TokenSet) -> Result<(), Error> {
        let views = self.views.read().unwrap_or_else(PoisonError::into_inner);
        match views.get(key) {
            // A newer write (larger version) with an older generation. An older version is
            // only a read that raced a write, not a rollback.
            Some(view)
                if set.version > view.set.version && set.generation < view.set.generation =>
            {
                warn!(%key, found = set.generation, seen = view.set.generation, "refusing a rolled-back token record");
                Err(Error::Decrypt {
                    record: record.to_owned(),
                    reason: DecryptFailure::RolledBack {
                        found: set.generation,
                        seen: view.set.generation,
                    },
                })
            }
            _ => Ok(()),
        }
    }

    async fn load_dpop_key(&self, key: &TokenKey) -> Result<Option<Secret>, Error> {
        let record = key.record(RecordKind::DpopKey);
        match self.store.get(&record).await? {
            None => Ok(None),
            Some(v) => Ok(Some(open_dpop_key(&*self.keys, &record, &v)?)),
        }
    }

    async fn load_client(
        &self,
        key: &TokenKey,
    ) -> Result<Option<(u64, ClientRegistration)>, Error> {
        let record = key.record(RecordKind::Client);
        match self.store.get(&record).await? {
            None => Ok(None),
            Some(v) => Ok(Some((v.version, open_client(&*self.keys, &record, &v)?))),
        }
    }

    /// Seal and compare-and-swap a token set whose `generation` is that of the record at
    /// `expected`; `Ok(written)` with the set as written (its new version and generation),
    /// `Err(current)` on a conflict.
    async fn write_tokens(
        &self,
        key: &TokenKey,
        expected: Option<u64>,
        set: TokenSet,
    ) -> Result<Result<Arc<TokenSet>, Option<Versioned>>, Error> {
        let (record, set, sealed) = self.seal_tokens(key, set)?;
        let swap = self.store.compare_and_swap(&record, expected, sealed).await?;
        Ok(self.swapped(key, set, swap))
    }

    /// The record name, `set` with the generation it is written with, and its sealed bytes.
    fn seal_tokens(
        &self,
        key: &TokenKey,
        mut set: TokenSet,
    ) -> Result<(String, TokenSet, Vec<u8>), Error> {
        let record = key.record(RecordKind::Tokens);
        let plain = serde_json::to_vec(&TokenRecord::from_set(&set))
            .map_err(|e| Error::store("could not encode the token set", e))?;
        // `set.generation` is the generation of the record it replaces: the next one is larger,
        // and never below the clock (so a slot deleted and logged into again by another process
        // does not restart below the generation a reader has seen).
        set.generation = (set.generation + 1).max(self.clock.now().as_millis());
        let sealed = crypto::seal_generation(&*self.keys, &record, set.generation, &plain)?;
        Ok((record, set, sealed))
    }

    /// The outcome of writing `set` (sealed by [`Inner::seal_tokens`]).
    fn swapped(
        &self,
        key: &TokenKey,
        mut set: TokenSet,
        swap: Swap,
    ) -> Result<Arc<TokenSet>, Option<Versioned>> {
        match swap {
            Swap::Swapped { version } => {
                set.version = version;
                let written = Arc::new(set);
                // Between the swap and this line another writer (a login, a refresh) may have
                // replaced this version and put its newer set in the view; the view keeps that
                // one, but the caller gets the set this write stored: a login's own tokens, a
                // refresh's own result for the `on_refresh` hook (never another grant's tokens
                // reported as "the set the refresh replaced `old` with").
                self.install(key, written.clone());
                Ok(written)
            }
            Swap::Conflict(current) => Err(current),
        }
    }

    fn start_background(self: &Arc<Self>, key: &TokenKey, issuer: &str, seen: u64, now: Timestamp) {
        let start = self.slot(key, |s| {
            let failing = s.failure.as_ref().is_some_and(|(until, _)| now < *until);
            let start = !s.background && !failing;
            s.background |= start;
            start
        });
        if !start {
            return;
        }
        debug!(%key, "refreshing ahead of expiry in the background");
        let (inner, key, issuer) = (self.clone(), key.clone(), issuer.to_owned());
        tokio::spawn(async move {
            if let Err(e) = inner.run_flight(&key, &issuer, Trigger::Due { seen }).await {
                debug!(%key, error = %e, "background refresh failed");
            }
            inner.slot(&key, |s| s.background = false);
        });
    }

    async fn run_flight(
        self: &Arc<Self>,
        key: &TokenKey,
        issuer: &str,
        trigger: Trigger,
    ) -> Result<Arc<TokenSet>, Error> {
        let mut options =
            CallOptions::new(self.config.refresh_deadline).grace(self.config.refresh_grace);
        if let Some(d) = self.config.caller_deadline {
            options = options.caller_deadline(d);
        }
        let (inner, owned_key, issuer) = (self.clone(), key.clone(), issuer.to_owned());
        let outcome = self
            .flights
            .call_with(key.clone(), options, move |attempt| async move {
                inner.refresh(owned_key, issuer, trigger, attempt).await
            })
            .await;
        match outcome {
            Ok(result) => result,
            Err(SingleFlightError::CallerDeadline | SingleFlightError::Abandoned) => {
                Err(Error::Timeout { key: key.clone() })
            }
            Err(e) => Err(Error::RefreshUnavailable {
                key: key.clone(),
                message: e.to_string(),
                retry_after: None,
            }),
        }
    }

    /// The shared refresh of one key; runs detached from every caller.
    ///
    /// Under the cross-process lease (when configured), renewed in the background for the whole
    /// critical section: the re-read, every attempt, every backoff sleep and the commit. A lease
    /// found lost before a request is sent ends the attempt; the refresh then starts over
    /// (takes the lease again and re-reads, finding a peer's rotation).
    async fn refresh(
        self: Arc<Self>,
        key: TokenKey,
        issuer: String,
        trigger: Trigger,
        attempt: Attempt,
    ) -> Result<Arc<TokenSet>, Error> {
        let mut restarts = 0;
        loop {
            let guard = match &self.lease {
                Some(lease) => {
                    // Refreshing ahead of expiry never queues behind a peer's refresh: while the
                    // token is valid, only try the lease; the peer's result will be read later.
                    let ahead = self.valid_ahead(&key, &trigger);
                    let held = if let Some(valid) = ahead {
                        match lease.try_acquire(&key).await? {
                            Some(held) => held,
                            None => {
                                debug!(%key, "a peer holds the refresh lease; serving the valid token");
                                return Ok(valid);
                            }
                        }
                    } else {
                        lease.acquire(&key).await?
                    };
                    debug!(%key, fence = ?held.fence(), "took the refresh lease");
                    // A holder is never dropped at the flight's deadline: a dropped holder
                    // would leave a store lease to expire on its own (the fleet waits a whole
                    // TTL) and could leave its in-doubt intent half done. Every step under the
                    // lease is bounded (store timeouts, the HTTP timeout, the attempt budget),
                    // and the deadline still stops the flight at its next check before a send.
                    attempt.keep();
                    Some(LeaseGuard::new(held))
                }
                None => None,
            };
            let work = self.refresh_held(&key, &issuer, &trigger, &attempt, guard.as_ref());
            let result = match (&guard, &self.lease) {
                (Some(guard), Some(lease)) => {
                    tokio::select! {
                        r = work => r,
                        never = guard.keep_renewed(&key, lease.renew_every(), &self.clock) => match never {},
                    }
                }
                _ => work.await,
            };
            if let Some(guard) = guard {
                guard.held.into_inner().release().await;
            }
            match result {
                Ok(Some(set)) => return Ok(set),
                Ok(None)
                    if restarts < self.config.max_attempts.max(1) && !attempt.is_cancelled() =>
                {
                    restarts += 1;
                    warn!(%key, restarts, "the refresh lease was lost before sending; starting over");
                }
                Ok(None) => {
                    return Err(Error::RefreshUnavailable {
                        key,
                        message: "the refresh lease was lost before the request was sent".into(),
                        retry_after: None,
                    });
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// For a refresh ahead of expiry: the set in view if it is still valid.
    fn valid_ahead(&self, key: &TokenKey, trigger: &Trigger) -> Option<Arc<TokenSet>> {
        if !matches!(trigger, Trigger::Due { .. }) {
            return None;
        }
        let now = self.clock.now();
        let views = self.views.read().unwrap_or_else(PoisonError::into_inner);
        let set = &views.get(key)?.set;
        let valid = set.needs_authorization.is_none() && set.expires_at.is_some_and(|e| now < e);
        valid.then(|| set.clone())
    }

    /// The refresh proper, under the lease when there is one. `Ok(None)`: the lease was found
    /// lost before a request was sent; nothing was sent since.
    async fn refresh_held(
        &self,
        key: &TokenKey,
        issuer: &str,
        trigger: &Trigger,
        attempt: &Attempt,
        guard: Option<&LeaseGuard>,
    ) -> Result<Option<Arc<TokenSet>>, Error> {
        let (key, issuer) = (key.clone(), issuer.to_owned());
        let Some(view) = self.load(&key).await? else {
            return Err(auth(&key, ReauthReason::Missing));
        };
        let mut current = usable(&key, view.set, &issuer)?;
        let now = self.clock.now();
        let still_valid = current.expires_at.is_none_or(|e| now < e);
        match trigger {
            Trigger::Rejected(rejected) if current.access_token != *rejected => {
                debug!(%key, version = current.version, "rejected token already replaced");
                return Ok(Some(current));
            }
            Trigger::Due { .. } if view.refresh_at.is_none_or(|at| now < at) => {
                debug!(%key, version = current.version, "already refreshed");
                return Ok(Some(current));
            }
            Trigger::Due { seen } if current.version != *seen && still_valid => {
                // A peer refreshed while this one waited: its token is valid, use it.
                debug!(%key, version = current.version, "a peer refreshed meanwhile");
                return Ok(Some(current));
            }
            _ => {}
        }
        if let Some(pending) = self.pending_commit(&key, &current) {
            // An earlier refresh's answer that could not be written yet: write it now, never
            // redeem its spent refresh token again.
            info!(%key, "writing a refresh result held in memory since a failed commit");
            return self.commit_set(&key, &current, pending, guard).await;
        }
        let serve_or = |reason| {
            // Refreshing ahead of expiry cannot proceed, but the token is still good.
            if matches!(trigger, Trigger::Due { .. }) && still_valid {
                Ok(Some(current.clone()))
            } else {
                Err(auth(&key, reason))
            }
        };
        let Some(refresh_token) = current.refresh_token.clone() else {
            return serve_or(ReauthReason::NoRefreshToken);
        };
        if current.refresh_token_expires_at.is_some_and(|e| e <= now) {
            return serve_or(ReauthReason::RefreshTokenExpired);
        }
        if let Some(e) = self.cached_failure(&key, now) {
            debug!(%key, "refresh failed recently; not calling the server again yet");
            return Err(e);
        }
        self.check_storm(&key, now)?;
        let client = self.load_client(&key).await?;
        // A DPoP-bound refresh token goes with its key (read only for bound tokens: a Bearer
        // set's refresh costs no extra store read).
        let dpop_bound = current.token_type.eq_ignore_ascii_case("dpop");
        let dpop_key = if dpop_bound { self.load_dpop_key(&key).await? } else { None };
        let request = RefreshRequest {
            refresh_token,
            scope: current.scope.clone(),
            issuer: current.issuer.clone(),
            client: client.as_ref().map(|(_, c)| c.clone()),
            dpop_key,
            dpop_bound,
        };
        // In doubt (issue 12): before the first send, the intent goes into the store, so
        // whoever refreshes next (this flight after a lost answer, or a peer after this process
        // died with its request out) knows the refresh token may be spent. A set found in doubt
        // gets one same-token retry, claimed in the store before it is sent; a set whose retry
        // was claimed already is not presented again.
        let mut retry = match current.doubt {
            Doubt::RetryClaimed => {
                warn!(%key, "the in-doubt refresh token's one retry was claimed by a refresh that did not finish: its rotation was lost in flight");
                let reason = ReauthReason::RotationLostInFlight;
                return self.terminal(&key, &issuer, &current, client, None, reason, guard).await;
            }
            Doubt::Sent => {
                info!(%key, "the refresh token is in doubt (a request may have reached the server unanswered): retrying it once");
                true
            }
            Doubt::No => false,
        };
        let doubt = if retry { Doubt::RetryClaimed } else { Doubt::Sent };
        // The level before this flight's latest in-doubt write: restored if the flight stops
        // without a request that may have reached the server since that write.
        let mut prior = current.doubt;
        match self.record_doubt(&key, &current, doubt, guard).await? {
            Fenced::Written(marked) => current = marked,
            Fenced::Out => return Ok(None),
            Fenced::Conflict(newer) => return self.adopt(&key, &issuer, newer).map(Some),
        }
        let mut tries = 0;
        loop {
            if attempt.is_cancelled() {
                warn!(%key, "refresh abandoned past its deadline before reaching the token endpoint");
                self.restore_doubt(&key, &current, prior, guard).await;
                return Err(Error::Timeout { key });
            }
            // No request without the lease.
            if let Some(guard) = guard {
                match guard.check(&key).await {
                    Ok(true) => {}
                    Ok(false) => {
                        // Nothing went out since this flight's latest in-doubt write: take it
                        // back, or the next holder would spend its one same-token retry on a
                        // token never sent. The lease is gone, so this write cannot be fenced;
                        // it is a compare-and-swap on the version of that very write, which
                        // only lands if nobody wrote since, and whoever acts on the intent
                        // (claims the retry, marks the slot) writes first, so it cannot have
                        // acted on it. A new holder that read the intent and has not written
                        // yet finds its write conflicting and reads again.
                        self.restore_doubt(&key, &current, prior, None).await;
                        return Ok(None);
                    }
                    Err(e) => {
                        warn!(%key, error = %e, "could not check the refresh lease; not sending");
                        return Err(Error::RefreshUnavailable {
                            key,
                            message: format!("could not check the refresh lease: {e}"),
                            retry_after: None,
                        });
                    }
                }
            }
            tries += 1;
            debug!(%key, attempt = tries, version = current.version, retry, "redeeming the refresh token");
            // From here the request may reach the server, which rotates on arrival: the
            // answer must be waited for and committed, never dropped at the flight's deadline.
            attempt.keep();
            let sent_at = self.clock.now();
            match self.refresher.refresh(&key, &request).await {
                Ok(response) => {
                    return self.commit(&key, &current, response, sent_at, guard).await;
                }
                Err(RefreshError::Terminal { code, description }) => {
                    let reason = if retry {
                        warn!(%key, %code, "the in-doubt refresh token was refused: its rotation was lost in flight");
                        ReauthReason::RotationLostInFlight
                    } else {
                        ReauthReason::Rejected { code, description }
                    };
                    return self
                        .terminal(&key, &issuer, &current, client, Some(code), reason, guard)
                        .await;
                }
                Err(e @ RefreshError::Transient { .. }) => {
                    let may_have_acted = e.may_have_acted();
                    let RefreshError::Transient { kind, retry_after, message } = e else {
                        unreachable!()
                    };
                    warn!(%key, attempt = tries, ?kind, %message, may_have_acted, "refresh failed transiently");
                    if retry && kind == TransientKind::Unanswered {
                        // The one same-token retry went unanswered too: presenting the token a
                        // third time is not allowed. (A 5xx *answer* to the retry is retried
                        // within the attempt budget: the server is there, and one that rotated
                        // before failing refuses the next presentation, which then ends here
                        // as a rotation lost in flight, or answers it from its grace window.)
                        warn!(%key, "the retry of the in-doubt refresh token went unanswered: its rotation was lost in flight");
                        let reason = ReauthReason::RotationLostInFlight;
                        return self
                            .terminal(&key, &issuer, &current, client, None, reason, guard)
                            .await;
                    }
                    if may_have_acted && !retry {
                        // The server may have rotated: claim the one same-token retry in the
                        // store before anything else, so a peer taking over after a crash
                        // does not present the token a third time.
                        prior = Doubt::Sent;
                        match self.record_doubt(&key, &current, Doubt::RetryClaimed, guard).await? {
                            Fenced::Written(marked) => current = marked,
                            Fenced::Out => return Ok(None),
                            Fenced::Conflict(newer) => {
                                return self.adopt(&key, &issuer, newer).map(Some);
                            }
                        }
                        retry = true;
                    }
                    let delay = self.backoff(tries, retry_after);
                    let give_up = tries >= self.config.max_attempts.max(1)
                        || retry_after.is_some_and(|r| r > self.config.backoff_max);
                    if give_up {
                        self.restore_doubt(&key, &current, prior, guard).await;
                        let now = self.clock.now();
                        let until =
                            now + self.config.failure_ttl.max(retry_after.unwrap_or_default());
                        let error =
                            Error::RefreshUnavailable { key: key.clone(), message, retry_after };
                        self.slot(&key, |s| s.failure = Some((until, error.clone())));
                        return Err(error);
                    }
                    tokio::select! {
                        () = self.clock.sleep(delay) => {}
                        () = attempt.token().cancelled() => {}
                    }
                }
            }
        }
    }

    /// Record in the store, under the lease, that a refresh of `current` may reach (or may
    /// have reached) the server: `doubt` is [`Doubt::Sent`] before the first send, and
    /// [`Doubt::RetryClaimed`] before the one same-token retry. Transient store errors are
    /// retried (bounded); failing still, the error is returned and nothing is sent.
    async fn record_doubt(
        &self,
        key: &TokenKey,
        current: &TokenSet,
        doubt: Doubt,
        guard: Option<&LeaseGuard>,
    ) -> Result<Fenced, Error> {
        let mut marked = current.clone();
        marked.doubt = doubt;
        let mut tries = 0;
        loop {
            tries += 1;
            match self.write_fenced(key, current.version, &marked, guard).await {
                Err(e) if tries < COMMIT_TRIES && transient_store(&e) => {
                    warn!(%key, attempt = tries, error = %e, "could not record the refresh as in doubt; retrying");
                    self.clock.sleep(self.backoff(tries, None)).await;
                }
                Err(e) => {
                    warn!(%key, error = %e, "could not record the refresh as in doubt; not sending");
                    return Err(e);
                }
                Ok(Fenced::Conflict(Some(newer))) if tries > 1 => {
                    // Perhaps our own record, whose reply was lost.
                    match self.own_write(key, &newer, &marked)? {
                        Some(ours) => return Ok(Fenced::Written(ours)),
                        None => return Ok(Fenced::Conflict(Some(newer))),
                    }
                }
                Ok(outcome) => return Ok(outcome),
            }
        }
    }

    /// Take back this flight's latest in-doubt write (`current`), restoring the level `prior`
    /// it replaced, when the flight stops (deadline, or giving up) with no request since that
    /// write that can have reached the server: every failure since was known to be before
    /// sending (a lost answer is never followed by this: it is claimed or ends the refresh).
    /// Otherwise an intent left by a flight that never sent would read as a spent token, and a
    /// claimed retry that was never sent as a rotation lost in flight. Best effort, fenced by
    /// `guard`; with `None` (the lease was found lost before sending), fenced by the version of
    /// that write alone, which any later writer replaces.
    async fn restore_doubt(
        &self,
        key: &TokenKey,
        current: &TokenSet,
        prior: Doubt,
        guard: Option<&LeaseGuard>,
    ) {
        if current.doubt == prior {
            return;
        }
        let mut clean = current.clone();
        clean.doubt = prior;
        if let Err(e) = self.write_fenced(key, current.version, &clean, guard).await {
            debug!(%key, error = %e, "could not take back the in-doubt record");
        }
    }

    /// `newer` (found by a conflict) as `written` with its version, if it is that very set (a
    /// write of ours whose reply was lost).
    fn own_write(
        &self,
        key: &TokenKey,
        newer: &Versioned,
        written: &TokenSet,
    ) -> Result<Option<Arc<TokenSet>>, Error> {
        let mut found = open_tokens(&*self.keys, &key.record(RecordKind::Tokens), newer)?;
        let generation = found.generation;
        (found.version, found.generation) = (written.version, written.generation);
        if found != *written || generation <= written.generation {
            return Ok(None);
        }
        (found.version, found.generation) = (newer.version, generation);
        let found = Arc::new(found);
        self.install(key, found.clone());
        Ok(Some(found))
    }

    /// A write of the token record that lands only while the lease holds (when there is one):
    /// [`Fenced::Out`] if the lease was found lost (nothing written). What the fence
    /// guarantees with each kind of lease: see the `lease` module.
    async fn write_fenced(
        &self,
        key: &TokenKey,
        expected: u64,
        set: &TokenSet,
        guard: Option<&LeaseGuard>,
    ) -> Result<Fenced, Error> {
        let written = match guard {
            Some(guard) => {
                // One step with the lease check where the backend can (a Redis script when
                // the lease lives on the same server); else the check, then the write.
                let lost = || {
                    warn!(%key, "the refresh lease was lost: not writing under it");
                    guard.lost.store(true, Ordering::SeqCst);
                    Ok(Fenced::Out)
                };
                if guard.lost.load(Ordering::SeqCst) {
                    return lost();
                }
                let (record, set, sealed) = self.seal_tokens(key, set.clone())?;
                let held = guard.held.lock().await;
                let fence = held.write_fence();
                let Some(swap) = self
                    .store
                    .compare_and_swap_fenced(&record, Some(expected), sealed, &fence)
                    .await?
                else {
                    return lost();
                };
                self.swapped(key, set, swap)
            }
            None => self.write_tokens(key, Some(expected), set.clone()).await?,
        };
        Ok(match written {
            Ok(written) => Fenced::Written(written),
            Err(newer) => Fenced::Conflict(newer),
        })
    }

    /// A refresh result that an earlier commit could not write, if it was derived from the
    /// generation `current` still holds (same refresh token, no marker: a peer may have
    /// recorded that generation in doubt since).
    fn pending_commit(&self, key: &TokenKey, current: &TokenSet) -> Option<TokenSet> {
        if current.needs_authorization.is_some() {
            return None;
        }
        self.slot(key, |s| match &s.pending {
            Some((base, set)) if *base == current.refresh_token => Some(set.clone()),
            _ => None,
        })
    }

    fn backoff(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let exp = self
            .config
            .backoff_base
            .saturating_mul(1 << attempt.saturating_sub(1).min(16))
            .min(self.config.backoff_max);
        // Equal jitter: between half and all of the exponential delay.
        let delay = exp / 2 + random_up_to(exp / 2);
        delay.max(retry_after.unwrap_or_default())
    }

    /// Persist a refresh result if nothing newer was stored since `current` was read.
    async fn commit(
        &self,
        key: &TokenKey,
        current: &TokenSet,
        response: TokenResponse,
        sent_at: Timestamp,
        guard: Option<&LeaseGuard>,
    ) -> Result<Option<Arc<TokenSet>>, Error> {
        // Lifetimes count from when the request left, not from when the answer came: the
        // server may have issued the tokens at any time in between, and a late answer (2 s on
        // a 3 s token) would otherwise make us send tokens the server has already expired.
        let mut set = TokenSet::from_response(
            response,
            &current.issuer,
            sent_at,
            self.config.max_date_correction,
        );
        // Obtained now: the refresh-ahead window is a fraction of the life left on arrival,
        // so a token is never due the moment it lands.
        let now = self.clock.now();
        set.obtained_at = now;
        if set.refresh_token.is_none() {
            // A non-rotating server: the old refresh token stays.
            set.refresh_token = current.refresh_token.clone();
            set.refresh_token_expires_at = current.refresh_token_expires_at;
        }
        if set.scope.is_none() {
            set.scope = current.scope.clone();
        }
        self.record_write(key, now);
        self.commit_set(key, current, set, guard).await
    }

    /// Write `set`, derived from `current`, with a compare-and-swap under the lease (offered
    /// on the version read even if the lease lapsed: see the `lease` module).
    ///
    /// A transient store error is retried with backoff under the lease (which the flight keeps
    /// renewing) until the write lands: releasing the lease with the rotated set only in
    /// memory would let a peer re-read the old generation and present its spent refresh token
    /// (the model's "commit retries capped, then release" counterexample). The set is held in
    /// memory meanwhile. A conflict whose stored value is this very set (a write whose reply
    /// was lost) counts as written; a conflict with a peer's failure marker of the set this
    /// refresh read does not beat this valid new set. If the lease is found lost and the
    /// unfenced write fails too, the set stays in memory and is served; the next refresh writes
    /// it instead of redeeming again.
    async fn commit_set(
        &self,
        key: &TokenKey,
        current: &TokenSet,
        mut set: TokenSet,
        guard: Option<&LeaseGuard>,
    ) -> Result<Option<Arc<TokenSet>>, Error> {
        let record = key.record(RecordKind::Tokens);
        let mut expected = current.version;
        set.doubt = Doubt::No;
        set.generation = current.generation;
        let mut tries = 0u32;
        let served = |set: &TokenSet| {
            let mut served = set.clone();
            served.version = current.version;
            Arc::new(served)
        };
        loop {
            tries += 1;
            let outcome = match self.write_fenced(key, expected, &set, guard).await {
                Ok(Fenced::Out) => {
                    // The lease lapsed while the request was out (a pause past the TTL, which
                    // the protocol assumes away). The redemption has spent the old refresh
                    // token: the new set is the only live one, so it is still offered to the
                    // compare-and-swap on the version read (any writer since wins, and a peer
                    // that re-read that version finds this set instead of presenting the spent
                    // token). Only if the store refuses it too is it held in memory.
                    warn!(%key, "the refresh lease was lost before the commit; committing on the version read");
                    match self.write_tokens(key, Some(expected), set.clone()).await {
                        Ok(Ok(stored)) => Ok(stored),
                        Ok(Err(newer)) => Err(newer),
                        Err(e) => {
                            warn!(%key, error = %e, "could not write the refreshed tokens without the lease; holding them in memory");
                            self.slot(key, |s| {
                                s.pending = Some((current.refresh_token.clone(), set.clone()))
                            });
                            return Ok(Some(served(&set)));
                        }
                    }
                }
                Ok(Fenced::Written(stored)) => Ok(stored),
                Ok(Fenced::Conflict(newer)) => Err(newer),
                Err(e) if transient_store(&e) => {
                    warn!(%key, attempt = tries, error = %e, "could not write the refreshed tokens; retrying under the lease");
                    self.slot(key, |s| {
                        s.pending = Some((current.refresh_token.clone(), set.clone()))
                    });
                    self.clock.sleep(self.backoff(tries.min(16), None)).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            match outcome {
                Ok(stored) => {
                    self.slot(key, |s| s.pending = None);
                    self.clear_failure(key);
                    info!(%key, from = current.version, to = stored.version, "refreshed tokens");
                    if let Some(hook) = &self.on_refresh {
                        hook(key, current, &stored);
                    }
                    return Ok(Some(stored));
                }
                Err(Some(newer)) => {
                    if tries > 1
                        && let Some(stored) = self.own_write(key, &newer, &set)?
                    {
                        // Our own write, whose reply was lost.
                        self.slot(key, |s| s.pending = None);
                        self.clear_failure(key);
                        info!(%key, from = current.version, to = stored.version, "refreshed tokens (the write's reply was lost)");
                        if let Some(hook) = &self.on_refresh {
                            hook(key, current, &stored);
                        }
                        return Ok(Some(stored));
                    }
                    let found = open_tokens(&*self.keys, &record, &newer)?;
                    if found.needs_authorization.is_some()
                        && found.refresh_token.is_none()
                        && found.access_token == current.access_token
                    {
                        // A peer's failure marker of the very set this refresh read (it
                        // presented a token this refresh had already spent): never beats the
                        // valid new set in hand. A marker of any other set is newer news.
                        warn!(%key, marker = newer.version, "replacing a peer's failure marker with a valid refreshed set");
                        expected = newer.version;
                        set.generation = found.generation;
                        continue;
                    }
                    warn!(
                        %key,
                        read = current.version,
                        stored = newer.version,
                        "discarding a refresh result: the tokens were replaced while it ran"
                    );
                    self.slot(key, |s| s.pending = None);
                    return self.adopt(key, &current.issuer, Some(newer)).map(Some);
                }
                Err(None) => {
                    warn!(%key, read = current.version, "discarding a refresh result: the tokens were deleted while it ran");
                    self.slot(key, |s| s.pending = None);
                    return self.adopt(key, &current.issuer, None).map(Some);
                }
            }
        }
    }

    /// Serve what a conflict found in place of the set we read.
    fn adopt(
        &self,
        key: &TokenKey,
        issuer: &str,
        newer: Option<Versioned>,
    ) -> Result<Arc<TokenSet>, Error> {
        let Some(newer) = newer else { return Err(auth(key, ReauthReason::Missing)) };
        let set = open_tokens(&*self.keys, &key.record(RecordKind::Tokens), &newer)?;
        usable(key, self.install(key, Arc::new(set)).set, issuer)
    }

    /// A terminal refresh error (`code`; `None` for a rotation lost in flight found without
    /// an answer): adopt a peer's newer tokens if there are any, else mark the slot under the
    /// lease (and drop the client registration on `invalid_client`). A lease found lost leaves
    /// no marker: the slot is a peer's now, and this refresh ends transiently.
    #[allow(clippy::too_many_arguments)]
    async fn terminal(
        &self,
        key: &TokenKey,
        issuer: &str,
        current: &TokenSet,
        client: Option<(u64, ClientRegistration)>,
        code: Option<TerminalCode>,
        reason: ReauthReason,
        guard: Option<&LeaseGuard>,
    ) -> Result<Option<Arc<TokenSet>>, Error> {
        let record = key.record(RecordKind::Tokens);
        let stored = self.store.get(&record).await?;
        if stored.as_ref().map(|v| v.version) != Some(current.version) {
            info!(%key, ?code, "refresh rejected, but newer tokens were stored meanwhile: adopting them");
            return self.adopt(key, issuer, stored).map(Some);
        }
        warn!(%key, ?code, "refresh rejected for good; the slot needs authorization");
        if code == Some(TerminalCode::InvalidClient)
            && let Some((version, _)) = client
        {
            self.store.delete(&key.record(RecordKind::Client), Some(version)).await?;
        }
        let mut marked = current.clone();
        marked.doubt = Doubt::No;
        marked.refresh_token = None;
        marked.refresh_token_expires_at = None;
        marked.needs_authorization = Some(reason.clone());
        match self.write_fenced(key, current.version, &marked, guard).await? {
            Fenced::Written(_) => Err(auth(key, reason)),
            Fenced::Conflict(newer) => self.adopt(key, issuer, newer).map(Some),
            Fenced::Out => Err(Error::RefreshUnavailable {
                key: key.clone(),
                message: "the refresh lease was lost before the refusal could be recorded".into(),
                retry_after: None,
            }),
        }
    }
}

/// How a write under the lease ended.
enum Fenced {
    /// Written: the set as stored, with its new version.
    Written(Arc<TokenSet>),
    /// The stored version was another: what is there.
    Conflict(Option<Versioned>),
    /// The lease was found lost: nothing written.
    Out,
}
