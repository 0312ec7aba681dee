//! [`ConnectionFactory`] and its per-(tenant, user, server) [`FactoryProvider`]: tokens through a
//! cached look-up flow over token storage, and a budgeted, coalesced silent refresh on a 401.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use flow_state::{FlowError, FlowKey, FlowManager, FlowStatus, SingleFlight};
use mcp_clock::{BoxFuture, Clock as _, SharedClock, Timestamp};
use serde::{Deserialize, Serialize};
use token_storage::{TokenKey, TokenStorage};
use tracing::Instrument as _;

use crate::challenge::Challenge;
use crate::connection::{ConnectOptions, Connection, within};
use crate::error::Error;
use crate::interactive::{
    AuthorizationHook, AuthorizationReason, AuthorizationRequest, HookDecision, OAuthFlowMeta,
    StateMeta, state_key,
};
use crate::oauth_refresher::{decode_stored_client, stored_client};
use crate::provider::{AuthProvider, Recovery};
use crate::secret::Secret;
use mcp_oauth::OAuthClient;

/// The flow type of the cached token look-up.
pub const GET_TOKENS_FLOW: &str = "mcp_get_tokens";
/// The flow type of the interactive authorization.
pub const OAUTH_FLOW: &str = "mcp_oauth";
/// The cap of the silent-refresh budget.
const REFRESH_CAP: Duration = Duration::from_secs(5);
/// The flow type of the claim to replace one stale PENDING authorization.
const REPLACE_FLOW: &str = "mcp_oauth_replace";
/// How many times a prompt looks again after another request changed the flow under it.
const PROMPT_ROUNDS: usize = 4;
/// How long after its budget a timed-out refresh still answers the 401s that join it with its
/// outcome (LibreChat's abort grace), unless it settles first.
const LEAD_GRACE: Duration = Duration::from_secs(1);
/// The kind recorded on a look-up flow that found no usable tokens.
const NO_TOKENS: &str = "authorization_required";

/// What one connection of the factory is for: the server, who it is for, and its time limits.
///
/// ```
/// use connection_factory::FactoryConfig;
/// use std::time::Duration;
///
/// let config = FactoryConfig::new("http://127.0.0.1:8080/mcp", "acme", "alice", "github")
///     .connect_timeout(Duration::from_secs(10))
///     .oauth_wait_timeout(Duration::from_secs(120));
/// // min(5 s, 0.4 x min(10 s, 120 s))
/// assert_eq!(config.refresh_budget(), Duration::from_secs(4));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FactoryConfig {
    server_url: String,
    tenant: String,
    user: String,
    server_name: String,
    connect_timeout: Duration,
    request_timeout: Option<Duration>,
    oauth_wait_timeout: Duration,
    scopes: Option<String>,
    client: Option<mcp_oauth::ClientConfig>,
    max_concurrent_requests: Option<usize>,
    headers: Vec<(String, Secret)>,
}

impl FactoryConfig {
    /// A configuration with a 30 s connect timeout and a 120 s OAuth wait timeout.
    pub fn new(
        server_url: impl Into<String>,
        tenant: impl Into<String>,
        user: impl Into<String>,
        server_name: impl Into<String>,
    ) -> Self {
        FactoryConfig {
            server_url: server_url.into(),
            tenant: tenant.into(),
            user: user.into(),
            server_name: server_name.into(),
            connect_timeout: Duration::from_secs(30),
            request_timeout: None,
            oauth_wait_timeout: Duration::from_secs(120),
            scopes: None,
            client: None,
            max_concurrent_requests: None,
            headers: Vec::new(),
        }
    }

    /// How long connecting may take, recovery included.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long one request of connections made by [`ConnectionFactory::connect`] may take,
    /// recovery included (default: [`ConnectOptions`]'s, 60 s). While an interactive
    /// authorization is in progress, this and the connect timeout are widened by the OAuth
    /// wait (see [`AuthProvider::interaction_deadline`]).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = Some(timeout);
        self
    }

    /// How long an interactive authorization may take.
    pub fn oauth_wait_timeout(mut self, timeout: Duration) -> Self {
        self.oauth_wait_timeout = timeout;
        self
    }

    /// The scopes to ask for in an interactive authorization, instead of the ones the challenge
    /// or the server's metadata suggest (a step-up still adds the challenged scopes).
    pub fn scopes(mut self, scopes: impl Into<String>) -> Self {
        self.scopes = Some(scopes.into());
        self
    }

    /// How the client identifies itself for the interactive flow (pre-registered client,
    /// metadata document or dynamic registration) and its redirect URI (the first one). Without
    /// it there is no interactive flow.
    pub fn client(mut self, client: mcp_oauth::ClientConfig) -> Self {
        self.client = Some(client);
        self
    }

    /// How many requests a connection made by [`ConnectionFactory::connect`] keeps in flight at
    /// once (default: [`ConnectOptions`]'s, 16); more wait in rmcp's queue.
    pub fn max_concurrent_requests(mut self, limit: usize) -> Self {
        self.max_concurrent_requests = Some(limit.max(1));
        self
    }

    /// Send the header `name: value` with every MCP request of connections made by
    /// [`ConnectionFactory::connect`] (see [`ConnectOptions::header`]). Not part of the token
    /// key.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Secret>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// How long a silent refresh after a 401 may take before the provider falls back:
    /// `min(5 s, 0.4 x min(connect timeout, OAuth wait timeout))`, leaving the rest for the
    /// interactive fallback.
    pub fn refresh_budget(&self) -> Duration {
        REFRESH_CAP.min(self.connect_timeout.min(self.oauth_wait_timeout).mul_f64(0.4))
    }

    /// The token-storage key, which is also the key refreshes are coalesced on: tenant, user,
    /// and the server name plus a digest of the OAuth configuration.
    ///
    /// The digest covers the server URL (the resource), the scopes (as a set) and the client's
    /// fixed identity (a pre-registered client ID or a metadata document URL), so two
    /// configurations for the same tenant, user and server that would be granted different
    /// tokens never share tokens or a refresh. A plain configuration (no scopes, no fixed client
    /// identity: dynamic registration or none) keeps the bare server name, the key hosts and
    /// earlier versions use; tokens of another issuer under it are not served.
    ///
    /// ```
    /// use connection_factory::FactoryConfig;
    ///
    /// let plain = FactoryConfig::new("http://127.0.0.1:8080/mcp", "acme", "alice", "github");
    /// assert_eq!(plain.token_key().server(), "github");
    /// let read = plain.clone().scopes("repo:read");
    /// let write = plain.clone().scopes("repo:read repo:write");
    /// assert!(read.token_key().server().starts_with("github#"));
    /// assert_ne!(read.token_key(), write.token_key());
    /// assert_eq!(write.token_key(), plain.scopes("repo:write  repo:read").token_key());
    /// ```
    pub fn token_key(&self) -> TokenKey {
        TokenKey::new(self.tenant.as_str(), self.user.as_str(), self.key_server())
    }

    /// The server part of the token key: the name, plus `#` and the configuration digest unless
    /// the configuration is plain.
    fn key_server(&self) -> String {
        use sha2::Digest as _;
        let scopes = self.scopes.as_deref().map(scope_set).filter(|s| !s.is_empty());
        let client = self.client.as_ref().and_then(|c| {
            c.pre_registered
                .as_ref()
                .map(|p| format!("client_id:{}", p.client_id))
                .or_else(|| c.metadata_document_url.as_ref().map(|u| format!("metadata:{u}")))
        });
        if scopes.is_none() && client.is_none() {
            return self.server_name.clone();
        }
        let mut hash = sha2::Sha256::new();
        for part in [Some(self.server_url.as_str()), scopes.as_deref(), client.as_deref()] {
            let part = part.unwrap_or("");
            hash.update((part.len() as u64).to_be_bytes());
            hash.update(part.as_bytes());
        }
        let digest = hash.finalize();
        let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        format!("{}#{hex}", self.server_name)
    }

    fn flow_id(&self) -> String {
        // Tenant is its own typed part of the FlowKey; user and server are joined unambiguously.
        format!("{}:{}", self.user.len(), self.user) + ":" + &self.key_server()
    }

    fn flow_key(&self, flow_type: &str) -> Result<FlowKey, Error> {
        FlowKey::scoped(Some(&self.tenant), flow_type, &self.flow_id())
            .map_err(|e| Error::InvalidConfig(e.to_string()))
    }
}

/// Counts of silent-refresh outcomes, summed over every provider of a [`ConnectionFactory`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RefreshCounters {
    /// 401s whose force-refresh this process led (one per refresh redemption, unless a led
    /// refresh ran out of its budget and a later 401 led again: token storage still redeems
    /// once per key).
    pub refreshed: u64,
    /// 401s that joined a refresh another caller of this process was leading.
    pub coalesced: u64,
    /// 401s answered with a token a peer had already stored (no refresh needed).
    pub adopted: u64,
    /// Refreshes the authorization server refused for good (authorization required).
    pub rejected: u64,
    /// Refreshes that failed in a way that may pass.
    pub transient: u64,
    /// Refreshes that did not finish within the budget.
    pub timed_out: u64,
    /// 403 / `insufficient_scope` refusals (no refresh tried).
    pub insufficient_scope: u64,
}

#[derive(Debug, Default)]
struct Counters {
    refreshed: AtomicU64,
    coalesced: AtomicU64,
    adopted: AtomicU64,
    rejected: AtomicU64,
    transient: AtomicU64,
    timed_out: AtomicU64,
    insufficient_scope: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> RefreshCounters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RefreshCounters {
            refreshed: get(&self.refreshed),
            coalesced: get(&self.coalesced),
            adopted: get(&self.adopted),
            rejected: get(&self.rejected),
            transient: get(&self.transient),
            timed_out: get(&self.timed_out),
            insufficient_scope: get(&self.insufficient_scope),
        }
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// The step-ups made so far: for each token key and scope set, the access token the step-up
/// authorization produced. A 403 for the same scope set refusing that very token means the
/// authorization server did not grant the scope: a second prompt would loop.
#[derive(Debug, Default)]
struct StepUps(Mutex<HashMap<(TokenKey, String), Secret>>);

impl StepUps {
    fn produced(&self, key: &TokenKey, scopes: &str) -> Option<Secret> {
        let map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(&(key.clone(), scopes.to_owned())).cloned()
    }

    fn record(&self, key: &TokenKey, scopes: &str, token: Secret) {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        map.insert((key.clone(), scopes.to_owned()), token);
    }
}

/// The refreshes led right now, per token key (which includes the configuration digest), with
/// the leader's deadline: a 401 that finds its key here joins that refresh (`coalesced`)
/// instead of leading one, and waits no longer than the leader does. A led refresh that ran
/// out of its budget stays here until the refresh itself settles or [`LEAD_GRACE`] passes, so
/// a 401 arriving meanwhile gets the leader's outcome (timed out) at once instead of waiting a
/// budget of its own on the same hung refresh (the seed's scenario 21).
#[derive(Debug, Default)]
struct Leaders {
    map: Mutex<HashMap<TokenKey, (u64, Timestamp)>>,
    next: AtomicU64,
}

/// Leadership of one refresh; ends when dropped.
struct Lead {
    leaders: Arc<Leaders>,
    key: TokenKey,
    id: u64,
}

impl Leaders {
    /// Lead the refresh of `key` until `deadline`, or the deadline of the refresh led now.
    fn lead(self: &Arc<Self>, key: &TokenKey, deadline: Timestamp) -> Result<Lead, Timestamp> {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, led_until)) = map.get(key) {
            return Err(*led_until);
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        map.insert(key.clone(), (id, deadline));
        Ok(Lead { leaders: self.clone(), key: key.clone(), id })
    }
}

impl Drop for Lead {
    fn drop(&mut self) {
        let mut map = self.leaders.map.lock().unwrap_or_else(PoisonError::into_inner);
        if map.get(&self.key).is_some_and(|(id, _)| *id == self.id) {
            map.remove(&self.key);
        }
    }
}

/// When a pending authorization request expires (the callback refuses its state after that).
fn request_expiry(pending: &mcp_oauth::PendingAuthorization) -> Timestamp {
    pending.created_at.saturating_add(pending.ttl)
}

/// A scope list as a set: split, deduplicated, sorted, joined with spaces.
fn scope_set(scopes: &str) -> String {
    let mut v: Vec<&str> = scopes.split_ascii_whitespace().collect();
    v.sort_unstable();
    v.dedup();
    v.join(" ")
}

/// What the cached look-up flow holds: which token set to serve, never the token itself (the
/// flow store may be sled or Redis; tokens are sealed by token storage and served from its
/// in-process cache).
#[derive(Clone, Serialize, Deserialize)]
struct CachedToken {
    /// The issuer the tokens must come from (the stored client registration's).
    issuer: String,
    /// The token set's version when it was looked up.
    version: u64,
    /// Milliseconds since the epoch.
    expires_at: Option<u64>,
}

impl CachedToken {
    fn of(set: &token_storage::TokenSet) -> Self {
        CachedToken {
            issuer: set.issuer().to_owned(),
            version: set.version(),
            expires_at: set.expires_at().map(|t| t.as_millis()),
        }
    }
}

/// Makes MCP connections for (tenant, user, server) triples, sharing one flow manager and one
/// token storage, so refreshes and look-ups are coalesced across every connection.
///
/// Token storage must have been built with a [`Refresher`](token_storage::Refresher) such as
/// [`OAuthRefresher`](crate::OAuthRefresher), and the client registration stored for each key
/// (see [`stored_client`](crate::stored_client)): its issuer is the one tokens must come from.
#[derive(Clone)]
pub struct ConnectionFactory {
    flows: FlowManager,
    storage: TokenStorage,
    counters: Arc<Counters>,
    step_ups: Arc<StepUps>,
    leaders: Arc<Leaders>,
    registrations: Registrations,
    interactive: Option<(OAuthClient, Arc<dyn AuthorizationHook>)>,
}

/// The client registrations in flight, per (token key, issuer): concurrent first connects with
/// no stored client join one registration instead of each registering a client (the last one
/// stored would win, and a pending authorization could name a client that is no longer
/// stored). Process-local; across processes the host serializes logins (mcp-connect's login
/// lock).
type Registrations = SingleFlight<(TokenKey, String), Result<mcp_oauth::ClientRegistration, Error>>;

/// How long a registration may run before callers stop waiting for it (it is kept running once
/// its request went out: its result is stored for the next caller).
const REGISTRATION_DEADLINE: Duration = Duration::from_secs(60);

impl fmt::Debug for ConnectionFactory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionFactory")
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl ConnectionFactory {
    /// A factory over `flows` and `storage`. Time comes from the flow manager's clock.
    pub fn new(flows: FlowManager, storage: TokenStorage) -> Self {
        ConnectionFactory {
            registrations: SingleFlight::new(flows.clock().clone()),
            flows,
            storage,
            counters: Arc::default(),
            step_ups: Arc::default(),
            leaders: Arc::default(),
            interactive: None,
        }
    }

    /// Enable the interactive flow: discovery, registration and authorization with `oauth`, the
    /// user prompted through `hook`. Serve [`callback_router`](crate::callback_router) on the
    /// redirect URI with the same flow manager and storage.
    pub fn with_interactive(
        mut self,
        oauth: OAuthClient,
        hook: Arc<dyn AuthorizationHook>,
    ) -> Self {
        self.interactive = Some((oauth, hook));
        self
    }

    /// The auth provider for `config`'s (tenant, user, server).
    pub fn provider(&self, config: FactoryConfig) -> Result<Arc<FactoryProvider>, Error> {
        Ok(Arc::new(FactoryProvider {
            key: config.token_key(),
            lookup: config.flow_key(GET_TOKENS_FLOW)?,
            oauth: config.flow_key(OAUTH_FLOW)?,
            config,
            flows: self.flows.clone(),
            storage: self.storage.clone(),
            counters: self.counters.clone(),
            step_ups: self.step_ups.clone(),
            leaders: self.leaders.clone(),
            registrations: self.registrations.clone(),
            interactive: self.interactive.clone(),
            waiting: Waiting::default(),
        }))
    }

    /// Connect to `config`'s server with its provider attached for the connection's lifetime.
    pub async fn connect(&self, config: FactoryConfig) -> Result<Connection, Error> {
        let mut options =
            ConnectOptions::default().connect_timeout(config.connect_timeout).clock(self.clock());
        if let Some(limit) = config.max_concurrent_requests {
            options = options.max_concurrent_requests(limit);
        }
        if let Some(timeout) = config.request_timeout {
            options = options.request_timeout(timeout);
        }
        for (name, value) in &config.headers {
            options = options.header(name.clone(), value.clone());
        }
        let url = config.server_url.clone();
        Connection::connect(&url, self.provider(config)?, options).await
    }

    /// The token storage this factory uses.
    pub fn storage(&self) -> &TokenStorage {
        &self.storage
    }

    /// The flow manager this factory uses.
    pub fn flows(&self) -> &FlowManager {
        &self.flows
    }

    /// The refresh outcomes so far.
    pub fn counters(&self) -> RefreshCounters {
        self.counters.snapshot()
    }

    fn clock(&self) -> SharedClock {
        self.flows.clock().clone()
    }
}

/// The [`AuthProvider`] of one (tenant, user, server): see [`ConnectionFactory`].
///
/// - The current token comes from a cached look-up flow (type [`GET_TOKENS_FLOW`], tenant-scoped)
///   over [`TokenStorage::get_valid`]; an expired cached token is dropped and looked up again.
/// - A 401 force-refreshes with the rejected token (token storage runs one refresh per key for
///   the whole process), within [`FactoryConfig::refresh_budget`]. On success the cached
///   look-up is invalidated (deleted if COMPLETED, completed with the fresh token if PENDING)
///   and the request retried. On failure or timeout a COMPLETED [`OAUTH_FLOW`] of the same
///   tenant is invalidated and the request fails: [`Recovery::AuthorizationRequired`] for a
///   refused grant, [`Error::Provider`] for a failure that may pass.
/// - A 403 / `insufficient_scope` skips the refresh. With the interactive flow it steps up:
///   newer stored tokens are tried first, else the user authorizes the union of the held and
///   the challenged scopes ([`AuthorizationReason::InsufficientScope`]). When the refused token
///   is the one a step-up for the same scope set produced (the server did not grant the scope),
///   or without an interactive flow: [`Recovery::InsufficientScope`].
pub struct FactoryProvider {
    config: FactoryConfig,
    key: TokenKey,
    lookup: FlowKey,
    oauth: FlowKey,
    flows: FlowManager,
    storage: TokenStorage,
    counters: Arc<Counters>,
    step_ups: Arc<StepUps>,
    leaders: Arc<Leaders>,
    registrations: Registrations,
    interactive: Option<(OAuthClient, Arc<dyn AuthorizationHook>)>,
    waiting: Waiting,
}

/// The interactive authorizations this provider is in right now, and when the last of their
/// waits ends (for [`AuthProvider::interaction_deadline`]).
#[derive(Debug, Default)]
struct Waiting(Mutex<(usize, Option<Timestamp>)>);

/// One interactive authorization in progress; ends when dropped.
struct InInteraction<'a>(&'a Waiting);

impl Waiting {
    fn enter(&self, until: Timestamp) -> InInteraction<'_> {
        self.extend(until);
        self.0.lock().unwrap_or_else(PoisonError::into_inner).0 += 1;
        InInteraction(self)
    }

    fn extend(&self, until: Timestamp) {
        let mut w = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        w.1 = Some(w.1.map_or(until, |t| t.max(until)));
    }

    fn deadline(&self) -> Option<Timestamp> {
        let w = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if w.0 > 0 { w.1 } else { None }
    }
}

impl Drop for InInteraction<'_> {
    fn drop(&mut self) {
        let mut w = self.0.0.lock().unwrap_or_else(PoisonError::into_inner);
        w.0 -= 1;
        if w.0 == 0 {
            w.1 = None;
        }
    }
}

impl fmt::Debug for FactoryProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FactoryProvider").field("key", &self.key).finish_non_exhaustive()
    }
}

impl FactoryProvider {
    /// The configuration this provider serves.
    pub fn config(&self) -> &FactoryConfig {
        &self.config
    }

    async fn issuer(&self) -> Result<Option<String>, Error> {
        let client = self
            .storage
            .client(&self.key)
            .await
            .map_err(|e| Error::store("reading the client registration", e))?;
        Ok(client.map(|c| c.issuer))
    }

    async fn lookup(&self) -> Result<Option<Secret>, Error> {
        for _ in 0..2 {
            let (storage, key) = (self.storage.clone(), self.key.clone());
            let result = self
                .flows
                .run::<CachedToken, _, _>(&self.lookup, move || async move {
                    let client = storage
                        .client(&key)
                        .await
                        .map_err(|e| FlowError::new("store", e.to_string()))?
                        .ok_or_else(|| FlowError::new(NO_TOKENS, "no client registration"))?;
                    match storage.get_valid(&key, &client.issuer).await {
                        Ok(set) => Ok(CachedToken::of(&set)),
                        Err(e) if e.is_authorization_required() => {
                            Err(FlowError::new(NO_TOKENS, e.to_string()))
                        }
                        Err(e) => Err(FlowError::new("store", e.to_string())),
                    }
                })
                .await;
            match result {
                Ok(cached) => {
                    let now = self.flows.clock().now().as_millis();
                    if cached.expires_at.is_some_and(|at| at <= now) {
                        self.invalidate_lookup(None).await;
                        continue;
                    }
                    // The token itself comes from token storage (memory while fresh): the set
                    // the look-up found, or a newer one.
                    return match self.storage.get_valid(&self.key, &cached.issuer).await {
                        Ok(set) => Ok(Some(Secret::new(set.access_token().expose()))),
                        Err(e) if e.is_authorization_required() => {
                            self.invalidate_lookup(None).await;
                            Ok(None)
                        }
                        Err(e) => Err(Error::provider("reading the tokens", e)),
                    };
                }
                Err(flow_state::Error::Failed { error, .. }) if error.kind == NO_TOKENS => {
                    return Ok(None);
                }
                // A store failure here fails the request as a provider failure (nothing is
                // prompted on the way: the look-up only reads).
                Err(e) => return Err(Error::provider("token look-up", e)),
            }
        }
        // Still expired after a fresh look-up: send it; the 401 path refreshes.
        Ok(None)
    }

    /// Whether `set`'s access token has expired by this provider's clock.
    fn expired(&self, set: &token_storage::TokenSet) -> bool {
        set.expires_at().is_some_and(|at| at <= self.flows.clock().now())
    }

    /// Drop the cached look-up if COMPLETED; complete it with `fresh` if PENDING.
    async fn invalidate_lookup(&self, fresh: Option<&CachedToken>) {
        let _ = self.flows.delete_if_status(&self.lookup, FlowStatus::Completed).await;
        if let Some(fresh) = fresh {
            let _ = self.flows.complete_if_pending(&self.lookup, fresh).await;
        }
    }

    async fn refresh(&self, rejected: &Secret, challenge: &Challenge) -> Result<Recovery, Error> {
        let recovery = self.silent_refresh(rejected).await;
        match recovery {
            Ok(Recovery::AuthorizationRequired)
            | Err(Error::Timeout { .. })
            | Err(Error::Provider { .. })
                if self.interactive.is_some() && self.config.client.is_some() =>
            {
                self.interactive(Some(challenge), AuthorizationReason::RefreshFailed, None).await
            }
            other => other,
        }
    }

    async fn silent_refresh(&self, rejected: &Secret) -> Result<Recovery, Error> {
        let span = tracing::info_span!(
            "mcp_refresh",
            tenant = self.key.tenant(),
            server = self.key.server(),
            outcome = tracing::field::Empty,
        );
        async {
            let record = |outcome: &'static str, counter: &AtomicU64| {
                tracing::Span::current().record("outcome", outcome);
                bump(counter);
            };
            let Some(issuer) = self.issuer().await? else {
                record("rejected", &self.counters.rejected);
                return self.fall_back(Some(rejected)).await;
            };
            let rejected_ts = token_storage::Secret::new(rejected.expose());
            // Lead or join first, then read: a refresh that finished before this 401 led is
            // then seen as stored (adopted), not led again.
            let budget = self.config.refresh_budget();
            let now = self.flows.clock().now();
            let lead = self.leaders.lead(&self.key, now.saturating_add(budget));
            let led = lead.is_ok();
            let before = self.storage.tokens(&self.key).await.ok().flatten();
            let adopted = before.as_ref().is_some_and(|s| *s.access_token() != rejected_ts);
            if let Some(set) = before
                .as_ref()
                .filter(|s| adopted && s.needs_authorization().is_none() && !self.expired(s))
            {
                // A peer already stored newer tokens: use them, without joining whatever
                // refresh may still be in flight for the key.
                drop(lead);
                record("adopted", &self.counters.adopted);
                self.invalidate_lookup(Some(&CachedToken::of(set))).await;
                return Ok(Recovery::Retry(Secret::new(set.access_token().expose())));
            }
            // A joiner waits no longer than the leader: not at all once the leader timed out
            // (unless newer tokens are stored already: they are served).
            let wait = match &lead {
                Err(led_until) if !adopted => budget.min(led_until.saturating_since(now)),
                _ => budget,
            };
            let (storage, key, issuer) = (self.storage.clone(), self.key.clone(), issuer.clone());
            let rejected_owned = rejected_ts.clone();
            let mut refresh =
                Box::pin(
                    async move { storage.force_refresh(&key, &issuer, &rejected_owned).await },
                );
            let outcome = if wait.is_zero() {
                None
            } else {
                within(self.flows.clock(), wait, &mut refresh).await
            };
            match (outcome.is_none(), lead) {
                // Timed out leading: the lead lasts until the refresh itself settles, or the
                // abort grace after the deadline passes (the seed's lock release).
                (true, Ok(lead)) => {
                    let clock = self.flows.clock().clone();
                    let until = now.saturating_add(budget).saturating_add(LEAD_GRACE);
                    tokio::spawn(async move {
                        tokio::select! {
                            _ = refresh => {}
                            () = clock.sleep_until(until) => {}
                        }
                        drop(lead);
                    });
                }
                (_, lead) => drop(lead),
            }
            match outcome {
                Some(Ok(set)) if *set.access_token() != rejected_ts => {
                    if adopted {
                        record("adopted", &self.counters.adopted);
                    } else if led {
                        record("refreshed", &self.counters.refreshed);
                    } else {
                        record("coalesced", &self.counters.coalesced);
                    }
                    self.invalidate_lookup(Some(&CachedToken::of(&set))).await;
                    Ok(Recovery::Retry(Secret::new(set.access_token().expose())))
                }
                Some(Ok(_)) => {
                    record("rejected", &self.counters.rejected);
                    self.fall_back(Some(rejected)).await
                }
                Some(Err(e)) if e.is_authorization_required() => {
                    record("rejected", &self.counters.rejected);
                    self.fall_back(Some(rejected)).await
                }
                Some(Err(
                    e @ (token_storage::Error::StoreUnavailable { .. }
                    | token_storage::Error::Store { .. }
                    | token_storage::Error::Decrypt { .. }
                    | token_storage::Error::KeyProvider { .. }),
                )) => {
                    // The store failed, not the authorization: no prompt over it.
                    record("transient", &self.counters.transient);
                    Err(Error::store("refreshing the tokens", e))
                }
                Some(Err(e)) => {
                    record("transient", &self.counters.transient);
                    if let Recovery::Retry(token) = self.fall_back(Some(rejected)).await? {
                        return Ok(Recovery::Retry(token));
                    }
                    Err(Error::provider("silent refresh failed", e))
                }
                None => {
                    record("timed_out", &self.counters.timed_out);
                    tracing::warn!(?wait, "silent refresh did not finish within its budget");
                    if let Recovery::Retry(token) = self.fall_back(Some(rejected)).await? {
                        return Ok(Recovery::Retry(token));
                    }
                    Err(Error::Timeout { operation: "silent refresh", after: wait })
                }
            }
        }
        .instrument(span)
        .await
    }

    /// The silent refresh failed: a COMPLETED interactive flow of this tenant is stale now, and
    /// so is its state mapping.
    ///
    /// Unless usable tokens other than `rejected` are stored by now (a re-authorization that
    /// finished while this refresh failed): then that COMPLETED flow is current, and the request
    /// is retried with its token.
    async fn fall_back(&self, rejected: Option<&Secret>) -> Result<Recovery, Error> {
        // Read the flow before the tokens: the callback stores tokens before it completes the
        // flow, so a COMPLETED flow read here whose tokens are not newer is really stale.
        let flow = self
            .flows
            .get::<serde_json::Value>(&self.oauth)
            .await
            .map_err(|e| Error::store("reading the authorization flow", e))?;
        let stored = self
            .storage
            .tokens(&self.key)
            .await
            .map_err(|e| Error::store("reading the stored tokens", e))?;
        if let Some(set) = stored
            && set.needs_authorization().is_none()
            && rejected.is_none_or(|r| set.access_token().expose() != r.expose())
        {
            bump(&self.counters.adopted);
            return Ok(Recovery::Retry(Secret::new(set.access_token().expose())));
        }
        if let Some(flow) = flow
            && flow.status == FlowStatus::Completed
        {
            if let Ok(meta) = serde_json::from_value::<OAuthFlowMeta>(flow.metadata)
                && let Some(skey) = state_key(meta.pending.state.secret())
            {
                let _ = self.flows.delete(&skey).await;
            }
            let _ = self.flows.delete_if_status(&self.oauth, FlowStatus::Completed).await;
        }
        self.invalidate_lookup(None).await;
        Ok(Recovery::AuthorizationRequired)
    }

    /// Step-up after a 403 / `insufficient_scope`: no refresh (it cannot add a scope), but a new
    /// interactive authorization for the union of the held scopes and the challenged ones.
    ///
    /// Bounded: when the token refused now is the one a step-up for the same scope set already
    /// produced, the authorization server did not grant the scope, and the request fails with
    /// [`Recovery::InsufficientScope`] instead of prompting again. Without an interactive flow
    /// it fails the same way at once.
    async fn step_up(
        &self,
        rejected: Option<&Secret>,
        challenge: &Challenge,
    ) -> Result<Recovery, Error> {
        if self.interactive.is_none() || self.config.client.is_none() {
            return Ok(Recovery::InsufficientScope);
        }
        let held = self
            .storage
            .tokens(&self.key)
            .await
            .map_err(|e| Error::store("reading the stored tokens", e))?;
        let held_scope = held.as_ref().and_then(|s| s.scope().map(str::to_owned));
        let held_scope = held_scope.or_else(|| self.config.scopes.clone()).unwrap_or_default();
        let target = mcp_oauth::union_scopes(&held_scope, &challenge.scope().unwrap_or_default());
        let set = scope_set(&target);
        if let Some(rejected) = rejected
            && self.step_ups.produced(&self.key, &set).as_ref() == Some(rejected)
        {
            tracing::info!(scopes = %set, "step-up already made for this scope set; not granted");
            return Ok(Recovery::InsufficientScope);
        }
        // A peer's step-up (or refresh) may have stored newer tokens: try them first. Otherwise
        // the COMPLETED authorization is spent for this purpose: a new one is needed.
        if let Recovery::Retry(token) = self.fall_back(rejected).await? {
            return Ok(Recovery::Retry(token));
        }
        match self
            .interactive(Some(challenge), AuthorizationReason::InsufficientScope, Some(&target))
            .await?
        {
            Recovery::Retry(token) if Some(&token) != rejected => {
                self.step_ups.record(&self.key, &set, token.clone());
                Ok(Recovery::Retry(token))
            }
            Recovery::Retry(_) => Ok(Recovery::InsufficientScope),
            other => Ok(other),
        }
    }

    /// The interactive flow: reuse a fresh PENDING flow (no second prompt), else discover,
    /// register (reusing the stored client), build the PKCE URL, create the PENDING flow and
    /// its state mapping, and prompt. Then wait for the callback (or return early).
    async fn interactive(
        &self,
        challenge: Option<&Challenge>,
        reason: AuthorizationReason,
        step_up: Option<&str>,
    ) -> Result<Recovery, Error> {
        let Some((oauth, hook)) = &self.interactive else {
            return Ok(Recovery::AuthorizationRequired);
        };
        let Some(client_config) = &self.config.client else {
            return Ok(Recovery::AuthorizationRequired);
        };
        let span = tracing::info_span!(
            "mcp_interactive",
            tenant = self.key.tenant(),
            server = self.key.server(),
            ?reason,
        );
        async {
            let wait = self.config.oauth_wait_timeout;
            let _interaction = self.waiting.enter(self.flows.clock().now().saturating_add(wait));
            let decision = match self
                .prompt(oauth, hook.as_ref(), client_config, challenge, reason, step_up)
                .await?
            {
                Some(decision) => decision,
                None => HookDecision::Wait, // joined a fresh PENDING flow: no second prompt
            };
            if decision == HookDecision::ReturnEarly {
                return Ok(Recovery::AuthorizationRequired);
            }
            self.waiting.extend(self.flows.clock().now().saturating_add(wait));
            let waited =
                within(self.flows.clock(), wait, self.flows.wait::<serde_json::Value>(&self.oauth))
                    .await;
            match waited {
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::info!(error = %e, "interactive authorization did not complete");
                    return Ok(Recovery::AuthorizationRequired);
                }
                None => {
                    return Err(Error::Timeout {
                        operation: "interactive authorization",
                        after: wait,
                    });
                }
            }
            self.invalidate_lookup(None).await;
            match self.lookup().await? {
                Some(token) => Ok(Recovery::Retry(token)),
                None => Ok(Recovery::AuthorizationRequired),
            }
        }
        .instrument(span)
        .await
    }

    /// The client registration for `discovery`'s issuer: the stored one, else one new
    /// registration, stored before anyone uses it. Single-flight per (token key, issuer), so
    /// that concurrent first connects register one client and every pending authorization
    /// names the client that is stored. A failed read of the stored client is
    /// [`Error::Store`], never "no client" (a good registration is not registered over).
    async fn registration(
        &self,
        oauth: &OAuthClient,
        discovery: &mcp_oauth::Discovery,
        client_config: &mcp_oauth::ClientConfig,
    ) -> Result<mcp_oauth::ClientRegistration, Error> {
        let flight = (self.key.clone(), discovery.issuer().to_owned());
        let (storage, key) = (self.storage.clone(), self.key.clone());
        let (oauth, discovery, client_config) =
            (oauth.clone(), discovery.clone(), client_config.clone());
        let options = flow_state::CallOptions::new(REGISTRATION_DEADLINE);
        let span = tracing::info_span!("mcp_registration", issuer = discovery.issuer());
        self.registrations
            .call_with(flight, options, move |attempt| {
                async move {
                    let stored = storage
                        .client(&key)
                        .await
                        .map_err(|e| Error::store("reading the client registration", e))?;
                    if let Some((d, r)) = stored.as_ref().and_then(decode_stored_client)
                        && d.issuer() == discovery.issuer()
                    {
                        return Ok(r);
                    }
                    // From here on the authorization server may create a client: whatever
                    // happens to the callers, the result is stored.
                    attempt.keep();
                    let r = oauth
                        .register(&discovery, &client_config)
                        .await
                        .map_err(|e| Error::provider("registration", e))?;
                    storage
                        .store_client(&key, &stored_client(&discovery, &r))
                        .await
                        .map_err(|e| Error::store("storing the client registration", e))?;
                    Ok(r)
                }
                .instrument(span)
            })
            .await
            .map_err(|e| Error::provider("registration", e))?
    }

    /// When this factory replaces a PENDING authorization created at `created_at`: after the
    /// OAuth wait timeout (nobody waits for it any more), or when its authorization request
    /// expires, whichever comes first. Also the expiry the hook is shown.
    fn replaced_at(&self, created_at: Timestamp, meta: Option<&OAuthFlowMeta>) -> Timestamp {
        let waited = created_at.saturating_add(self.config.oauth_wait_timeout);
        match meta {
            Some(m) => waited.min(request_expiry(&m.pending)),
            None => waited,
        }
    }

    /// Claim the right to replace the stale PENDING authorization created at `created_at`:
    /// exactly one request per generation wins (an atomic insert of a claim flow named by the
    /// generation), so two requests that both found it stale never both replace it, and the
    /// loser never deletes the winner's new flow. The winner completes the claim flow once the
    /// new flow exists (or it gave up); losers wait on it. Returns the claim and whether this
    /// request won it.
    async fn claim_replacement(&self, created_at: Timestamp) -> Result<(FlowKey, bool), Error> {
        let id = format!("{}@{}", self.config.flow_id(), created_at.as_millis());
        let claim = FlowKey::scoped(Some(&self.config.tenant), REPLACE_FLOW, &id)
            .map_err(|e| Error::InvalidConfig(e.to_string()))?;
        match self.flows.init_unless_completed(&claim, serde_json::Value::Null).await {
            Ok(_) => Ok((claim, true)),
            Err(
                flow_state::Error::AlreadyPending { .. } | flow_state::Error::AlreadySettled { .. },
            ) => Ok((claim, false)),
            Err(e) => Err(Error::store("claiming the stale authorization", e)),
        }
    }

    /// Start a new authorization and prompt; or join a fresh PENDING one (no prompt: the hook's
    /// [`AuthorizationHook::authorization_pending`] decides, `None` when the flow does not carry
    /// its URL or was completed by a peer). A stale PENDING one is replaced by the one request
    /// that claims it; a request that loses the claim, or loses the race to create the new
    /// flow, looks again and joins the flow that won.
    async fn prompt(
        &self,
        oauth: &OAuthClient,
        hook: &dyn AuthorizationHook,
        client_config: &mcp_oauth::ClientConfig,
        challenge: Option<&Challenge>,
        reason: AuthorizationReason,
        step_up: Option<&str>,
    ) -> Result<Option<HookDecision>, Error> {
        // Each round either ends or saw another request change the flow (create or replace
        // it); a few rounds settle any realistic contention.
        for _ in 0..PROMPT_ROUNDS {
            let current = self
                .flows
                .get::<serde_json::Value>(&self.oauth)
                .await
                .map_err(|e| Error::store("reading the authorization flow", e))?;
            match current {
                // The fallback deleted any COMPLETED flow before coming here: one seen now was
                // completed by a peer's authorization since, so it is joined, not replaced.
                Some(flow) if flow.status == FlowStatus::Completed => return Ok(None),
                Some(flow) if flow.status == FlowStatus::Pending => {
                    let meta = serde_json::from_value::<OAuthFlowMeta>(flow.metadata.clone()).ok();
                    let replaced_at = self.replaced_at(flow.created_at, meta.as_ref());
                    if self.flows.clock().now() < replaced_at {
                        return Ok(self.join(hook, meta, reason, replaced_at).await);
                    }
                    let (claim, won) = self.claim_replacement(flow.created_at).await?;
                    if !won {
                        // Another request replaces it: wait until it has, then join.
                        let (flows, wait) = (&self.flows, self.config.oauth_wait_timeout);
                        let replaced = flows.wait::<serde_json::Value>(&claim);
                        let _ = within(flows.clock(), wait, replaced).await;
                        continue;
                    }
                    let started = self
                        .replace(
                            &flow,
                            meta.as_ref(),
                            &claim,
                            (oauth, hook, client_config),
                            (challenge, reason, step_up),
                        )
                        .await;
                    // Whatever happened, the claim is settled: its losers look again.
                    let _ = self.flows.complete_if_pending(&claim, &"replaced").await;
                    match started? {
                        Some(decision) => return Ok(Some(decision)),
                        None => continue,
                    }
                }
                _ => {}
            }
            match self.start(oauth, hook, client_config, challenge, reason, step_up, None).await? {
                Some(decision) => return Ok(Some(decision)),
                // Lost the race to create it: look again, and join the one that won.
                None => continue,
            }
        }
        Ok(None)
    }

    /// Replace the `stale` PENDING flow this request claimed (`claim`): its state mapping goes
    /// (its callback is refused), the flow itself only while it is still that generation, then
    /// a new authorization starts.
    async fn replace(
        &self,
        stale: &flow_state::FlowState<serde_json::Value>,
        meta: Option<&OAuthFlowMeta>,
        claim: &FlowKey,
        (oauth, hook, client_config): (
            &OAuthClient,
            &dyn AuthorizationHook,
            &mcp_oauth::ClientConfig,
        ),
        (challenge, reason, step_up): (Option<&Challenge>, AuthorizationReason, Option<&str>),
    ) -> Result<Option<HookDecision>, Error> {
        if let Some(skey) = meta.and_then(|m| state_key(m.pending.state.secret())) {
            let _ = self.flows.delete(&skey).await;
        }
        let now = self
            .flows
            .get::<serde_json::Value>(&self.oauth)
            .await
            .map_err(|e| Error::store("reading the authorization flow", e))?;
        if now.is_some_and(|f| f.status == FlowStatus::Pending && f.created_at == stale.created_at)
        {
            self.flows
                .delete_if_status(&self.oauth, FlowStatus::Pending)
                .await
                .map_err(|e| Error::store("replacing the stale authorization", e))?;
        }
        self.start(oauth, hook, client_config, challenge, reason, step_up, Some(claim)).await
    }

    /// A fresh PENDING authorization exists: no second prompt, but the hook sees it (its URL,
    /// scopes, and `expires_at`, when this factory will replace it) and decides whether this
    /// request waits for it. `None` when the flow does not carry its URL.
    async fn join(
        &self,
        hook: &dyn AuthorizationHook,
        meta: Option<OAuthFlowMeta>,
        reason: AuthorizationReason,
        expires_at: Timestamp,
    ) -> Option<HookDecision> {
        let Some(OAuthFlowMeta { pending, authorization_url: Some(url), .. }) = meta else {
            return None;
        };
        let request = AuthorizationRequest {
            authorization_url: url,
            scopes: pending.scope,
            reason,
            expires_at,
        };
        Some(hook.authorization_pending(request).await)
    }

    /// Discover, register (single-flight), build the PKCE URL, create the PENDING flow (only
    /// where none is live) and its state mapping, and prompt. `None` when another request's
    /// flow was created first. `claim`, when this replaces a stale flow, is completed once the
    /// new flow and its state mapping exist, before the hook is called.
    #[allow(clippy::too_many_arguments)]
    async fn start(
        &self,
        oauth: &OAuthClient,
        hook: &dyn AuthorizationHook,
        client_config: &mcp_oauth::ClientConfig,
        challenge: Option<&Challenge>,
        reason: AuthorizationReason,
        step_up: Option<&str>,
        claim: Option<&FlowKey>,
    ) -> Result<Option<HookDecision>, Error> {
        let oauth_err = |what: &'static str| move |e: mcp_oauth::Error| Error::provider(what, e);
        let server: url::Url = self
            .config
            .server_url
            .parse()
            .map_err(|e| Error::InvalidConfig(format!("server URL: {e}")))?;
        let bearer = match challenge {
            Some(c) => mcp_oauth::BearerChallenge::from_headers(
                c.www_authenticate().iter().map(String::as_str),
            )
            .ok()
            .flatten(),
            None => None,
        };
        let discovery = oauth
            .discover(&server, bearer.as_ref())
            .instrument(tracing::info_span!("mcp_discovery", server = %server))
            .await
            .map_err(oauth_err("discovery"))?;
        let registration = self.registration(oauth, &discovery, client_config).await?;
        // Configured scopes are what the token key promises: they win over the server's choice.
        let selected = self
            .config
            .scopes
            .clone()
            .or_else(|| mcp_oauth::select_scope(bearer.as_ref(), &discovery));
        let scope = match step_up {
            Some(target) => {
                Some(mcp_oauth::union_scopes(target, selected.as_deref().unwrap_or_default()))
            }
            None => selected,
        };
        let redirect = client_config
            .redirect_uris
            .first()
            .ok_or_else(|| Error::InvalidConfig("the client config has no redirect URI".into()))?;
        let (url, pending) = oauth
            .authorization_url(&discovery, &registration, redirect, scope.as_deref())
            .map_err(oauth_err("authorization URL"))?;
        let state = pending.state.secret().to_owned();
        let request_expiry = request_expiry(&pending);
        let meta = serde_json::to_value(OAuthFlowMeta {
            pending,
            discovery,
            authorization_url: Some(url.to_string()),
            client_id: Some(registration.client_id.clone()),
        })
        .map_err(|e| Error::provider("encoding the pending authorization", e))?;
        // A peer's authorization may have completed while this one was being prepared: it is
        // joined, never replaced (atomically: no check-then-init window).
        let created_at = match self.flows.init_unless_completed(&self.oauth, meta).await {
            Ok(created_at) => created_at,
            Err(
                flow_state::Error::AlreadyPending { .. } | flow_state::Error::AlreadySettled { .. },
            ) => {
                return Ok(None);
            }
            Err(e) => return Err(Error::store("creating the authorization flow", e)),
        };
        let expires_at =
            created_at.saturating_add(self.config.oauth_wait_timeout).min(request_expiry);
        let mapping = serde_json::to_value(StateMeta {
            tenant: self.config.tenant.clone(),
            user: self.config.user.clone(),
            server: self.config.key_server(),
            flow_id: self.config.flow_id(),
        })
        .map_err(|e| Error::provider("encoding the state mapping", e))?;
        let skey = state_key(&state).ok_or_else(|| Error::provider_msg("invalid state"))?;
        self.flows
            .init(&skey, mapping)
            .await
            .map_err(|e| Error::store("creating the state mapping", e))?;
        if let Some(claim) = claim {
            let _ = self.flows.complete_if_pending(claim, &"replaced").await;
        }
        tracing::info!("interactive authorization started");
        let request = AuthorizationRequest {
            authorization_url: url.to_string(),
            scopes: scope,
            reason,
            expires_at,
        };
        Ok(Some(hook.authorization_required(request).await))
    }
}

impl AuthProvider for FactoryProvider {
    fn current_token(&self) -> BoxFuture<'_, Result<Option<Secret>, Error>> {
        Box::pin(self.lookup())
    }

    fn interaction_deadline(&self) -> Option<Timestamp> {
        self.waiting.deadline()
    }

    fn on_unauthorized<'a>(
        &'a self,
        rejected: Option<&'a Secret>,
        challenge: &'a Challenge,
    ) -> BoxFuture<'a, Result<Recovery, Error>> {
        Box::pin(async move {
            if challenge.is_insufficient_scope() {
                bump(&self.counters.insufficient_scope);
                return self.step_up(rejected, challenge).await;
            }
            match rejected {
                Some(rejected) => self.refresh(rejected, challenge).await,
                None => {
                    // The request carried no token: tokens stored since (a peer's login or
                    // refresh) are used before anyone is prompted.
                    if let Recovery::Retry(token) = self.fall_back(None).await? {
                        return Ok(Recovery::Retry(token));
                    }
                    self.interactive(Some(challenge), AuthorizationReason::NoTokens, None).await
                }
            }
        })
    }
}
