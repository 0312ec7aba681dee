//! [`ConnectionFactory`] and its per-(tenant, user, server) [`FactoryProvider`]: tokens through a
//! cached look-up flow over token storage, and a budgeted, coalesced silent refresh on a 401.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use flow_state::{FlowError, FlowKey, FlowManager, FlowStatus, SingleFlight};
use mcp_clock::{Clock as _, SharedClock, Timestamp};
use serde::{Deserialize, Serialize};
use token_storage::{TokenKey, TokenStorage};
use tracing::Instrument as _;

use crate::challenge::Refusal;
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

mod authorize;
mod config;
mod counters;
mod refresh;
mod workload;

pub use config::FactoryConfig;
pub use counters::RefreshCounters;

use authorize::{Registrations, Waiting};
use config::scope_set;
use counters::{Counters, StepUps, bump};
use refresh::{IssuerChecks, Leaders};
use workload::Workload;

/// The flow type of the cached token look-up.
pub const GET_TOKENS_FLOW: &str = "mcp_get_tokens";
/// The flow type of the interactive authorization.
pub const OAUTH_FLOW: &str = "mcp_oauth";
// The kinds recorded on a failed look-up flow (`NO_TOKENS`: no usable tokens).
use crate::error::lookup_kind::{self, NO_TOKENS};

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
    leaders: Leaders,
    registrations: Registrations,
    issuer_checks: IssuerChecks,
    interactive: Option<(OAuthClient, Arc<dyn AuthorizationHook>)>,
    workload: Option<Workload>,
}

impl fmt::Debug for ConnectionFactory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionFactory")
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl ConnectionFactory {
    /// A factory over `flows` and `storage`. They must run on one clock: the factory's budgets
    /// and expiry checks read the flow manager's, token storage refreshes on its own, and two
    /// clocks that disagree would make them judge one token differently.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] when the two clocks are known to read different time sources
    /// (a manual clock and the system clock, say; see [`mcp_clock::SharedClock::same_source`]).
    pub fn new(flows: FlowManager, storage: TokenStorage) -> Result<Self, Error> {
        if flows.clock().same_source(storage.clock()) == Some(false) {
            return Err(Error::InvalidConfig(
                "the flow manager and token storage run on different clocks: build both with \
                 the same one"
                    .into(),
            ));
        }
        Ok(ConnectionFactory {
            registrations: SingleFlight::new(flows.clock().clone()),
            issuer_checks: SingleFlight::new(flows.clock().clone()),
            leaders: SingleFlight::new(flows.clock().clone()),
            flows,
            storage,
            counters: Arc::default(),
            step_ups: Arc::default(),
            interactive: None,
            workload: None,
        })
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

    /// Workload identity (SEP-1933): where the interactive flow would prompt a user, run the
    /// RFC 7523 jwt-bearer grant with `identity`'s current assertion (a file is read again when
    /// it changes) and store the tokens; when they expire or are refused without a refresh
    /// token, the grant runs again. Takes precedence over [`with_interactive`](Self::with_interactive).
    /// [`FactoryConfig::client`] names the client (registered once, as for the browser flow).
    ///
    /// ```
    /// # fn demo(flows: flow_state::FlowManager, storage: token_storage::TokenStorage, oauth: mcp_oauth::OAuthClient) -> Result<(), connection_factory::Error> {
    /// let factory = connection_factory::ConnectionFactory::new(flows, storage)?.with_workload_identity(
    ///     oauth,
    ///     mcp_oauth::WorkloadIdentity::from_file("/var/run/secrets/tokens/mcp"),
    /// );
    /// # Ok(()) }
    /// ```
    pub fn with_workload_identity(
        mut self,
        oauth: OAuthClient,
        identity: mcp_oauth::WorkloadIdentity,
    ) -> Self {
        let grants = SingleFlight::new(self.flows.clock().clone());
        self.workload = Some(Workload { oauth, identity: Arc::new(identity), grants });
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
            issuer_checks: self.issuer_checks.clone(),
            interactive: self.interactive.clone(),
            workload: self.workload.clone(),
            waiting: Waiting::default(),
            dpop: Mutex::default(),
        }))
    }

    /// Connect to `config`'s server with its provider attached for the connection's lifetime.
    pub async fn connect(&self, config: FactoryConfig) -> Result<Connection, Error> {
        let mut options = ConnectOptions::default()
            .connect_timeout(config.connect_timeout)
            .clock(self.clock())
            .env_proxy(config.env_proxy);
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
    leaders: Leaders,
    registrations: Registrations,
    issuer_checks: IssuerChecks,
    interactive: Option<(OAuthClient, Arc<dyn AuthorizationHook>)>,
    workload: Option<Workload>,
    waiting: Waiting,
    /// The DPoP key the token served last is bound to, with that token set's version (`None`
    /// for a Bearer token). The same instance serves every request, so the MCP server's nonce
    /// is learnt once.
    dpop: Mutex<Option<(u64, mcp_oauth::DpopKey)>>,
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

    /// The MCP server's URL.
    fn server(&self) -> Result<url::Url, Error> {
        self.config.server_url.parse().map_err(|e| Error::InvalidConfig(format!("server URL: {e}")))
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
            let result =
                self.flows
                    .run::<CachedToken, _, _>(&self.lookup, move || async move {
                        // The failure's kind is recorded with it (the flow keeps a kind and a
                        // message), so callers match on `Error::kind`, never on the message.
                        let failed = |e: token_storage::Error| {
                            FlowError::new(lookup_kind::of(&e), e.to_string())
                        };
                        let client =
                            storage.client(&key).await.map_err(failed)?.ok_or_else(|| {
                                FlowError::new(NO_TOKENS, "no client registration")
                            })?;
                        storage
                            .get_valid(&key, &client.issuer)
                            .await
                            .map(|set| CachedToken::of(&set))
                            .map_err(failed)
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
                        Ok(set) => {
                            self.bind(&set).await?;
                            Ok(Some(set.access_token().clone()))
                        }
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

    /// Serve `set`'s token with its DPoP key when it is DPoP-bound, as Bearer otherwise. The
    /// key is read from token storage for each new token set (a new authorization, here or in
    /// another process after a logout, may have stored another key); the instance, with the
    /// nonces it learnt, is kept while the stored key is the same. A DPoP-bound token whose key
    /// is not stored is not served.
    async fn bind(&self, set: &token_storage::TokenSet) -> Result<(), Error> {
        if !crate::dpop::is_dpop(set.token_type()) {
            *self.dpop.lock().unwrap_or_else(PoisonError::into_inner) = None;
            return Ok(());
        }
        let bound = self.dpop.lock().unwrap_or_else(PoisonError::into_inner).as_ref().map(|b| b.0);
        if bound == Some(set.version()) {
            return Ok(());
        }
        let key = crate::dpop::stored(&self.storage, &self.key).await?.ok_or_else(|| {
            Error::provider_msg("the stored tokens are DPoP-bound but no DPoP key is stored")
        })?;
        let mut slot = self.dpop.lock().unwrap_or_else(PoisonError::into_inner);
        let key = match slot.take() {
            Some((_, held)) if held.thumbprint() == key.thumbprint() => held,
            _ => key,
        };
        *slot = Some((set.version(), key));
        Ok(())
    }

    /// After a recovery: bind the token it returned, which is the stored one (a refresh,
    /// a peer's tokens, or a new authorization stored it).
    async fn bind_recovered(&self, token: &Secret) -> Result<(), Error> {
        let stored = self
            .storage
            .tokens(&self.key)
            .await
            .map_err(|e| Error::store("reading the stored tokens", e))?;
        match stored {
            Some(set) if set.access_token() == token => self.bind(&set).await,
            _ => Ok(()),
        }
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
}

#[async_trait::async_trait]
impl AuthProvider for FactoryProvider {
    async fn current_token(&self) -> Result<Option<Secret>, Error> {
        self.lookup().await
    }

    fn interaction_deadline(&self) -> Option<Timestamp> {
        self.waiting.deadline()
    }

    fn dpop_key(&self) -> Option<mcp_oauth::DpopKey> {
        self.dpop.lock().unwrap_or_else(PoisonError::into_inner).as_ref().map(|(_, k)| k.clone())
    }

    async fn on_unauthorized(
        &self,
        rejected: Option<&Secret>,
        challenge: &Refusal,
    ) -> Result<Recovery, Error> {
        let recovery = self.recover(rejected, challenge).await?;
        if let Recovery::Retry(token) = &recovery {
            self.bind_recovered(token).await?;
        }
        Ok(recovery)
    }
}

impl FactoryProvider {
    /// Why a request that went out without a token needs the user: nothing was ever stored
    /// ([`AuthorizationReason::NoTokens`]), or tokens are stored but a refresh was refused for
    /// good ([`AuthorizationReason::RefreshFailed`]: the request read the slot after another
    /// request's refresh failed, and found no usable token). Whichever request reaches the
    /// prompt first, the user is told the same thing.
    async fn reason_without_token(&self) -> AuthorizationReason {
        match self.storage.tokens(&self.key).await {
            Ok(Some(set)) if set.needs_authorization().is_some() => {
                AuthorizationReason::RefreshFailed
            }
            _ => AuthorizationReason::NoTokens,
        }
    }

    /// What to do about a refusal (see [`FactoryProvider`]).
    async fn recover(
        &self,
        rejected: Option<&Secret>,
        challenge: &Refusal,
    ) -> Result<Recovery, Error> {
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
                if let Some(workload) = &self.workload {
                    return self.workload_grant(workload, Some(challenge), None).await;
                }
                let reason = self.reason_without_token().await;
                self.interactive(Some(challenge), reason, None).await
            }
        }
    }
}
