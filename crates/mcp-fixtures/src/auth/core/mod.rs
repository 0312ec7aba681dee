//! The authorization server's state and rules, independent of HTTP.
//!
//! By protocol area: `clients.rs` (registration, client authentication), `authorize.rs`
//! (scopes, pending authorizations, codes), `tokens.rs` (the grants, refresh token families,
//! validation, introspection, revocation); here the types and the shared state.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use mcp_clock::{Clock, SharedClock, Timestamp};
use tokio::sync::{Notify, oneshot};

use crate::knobs::{KnobSettings, Knobs};
use crate::secret::{IssuedTokens, RegisteredClient, TokenFingerprint, random_token, s256};
use crate::stats::{AuthEvent, AuthEventKind, AuthStats};

/// How long an authorization code lives.
const CODE_LIFETIME: Duration = Duration::from_secs(60);
/// How many events the log keeps (oldest dropped first).
const EVENT_LOG_LIMIT: usize = 10_000;

/// A client authentication method at the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AuthMethod {
    None,
    Basic,
    Post,
}

impl AuthMethod {
    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s {
            "none" => Some(AuthMethod::None),
            "client_secret_basic" => Some(AuthMethod::Basic),
            "client_secret_post" => Some(AuthMethod::Post),
            _ => None,
        }
    }
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            AuthMethod::None => "none",
            AuthMethod::Basic => "client_secret_basic",
            AuthMethod::Post => "client_secret_post",
        }
    }
}

/// An OAuth error answer: status, `error`, `error_description`.
#[derive(Debug, Clone)]
pub(crate) struct OAuthError {
    pub(crate) status: u16,
    pub(crate) error: &'static str,
    pub(crate) description: String,
}

impl OAuthError {
    pub(crate) fn new(error: &'static str, description: impl Into<String>) -> Self {
        let status = if error == "invalid_client" { 401 } else { 400 };
        OAuthError { status, error, description: description.into() }
    }
}

/// The server's fixed configuration, set by the builder.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) scopes_supported: Vec<String>,
    pub(crate) default_scopes: Vec<String>,
    pub(crate) advertise_scopes: bool,
    pub(crate) registration: bool,
    pub(crate) client_metadata_documents: bool,
    pub(crate) rfc8414_metadata: bool,
    pub(crate) openid_metadata: bool,
    pub(crate) issuer_path: String,
}

#[derive(Clone)]
pub(crate) struct Client {
    pub(crate) id: String,
    pub(crate) secret: Option<String>,
    pub(crate) method: AuthMethod,
    pub(crate) redirect_uris: Vec<String>,
    pub(crate) grant_types: Vec<String>,
    pub(crate) name: Option<String>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("id", &self.id)
            .field("secret", &self.secret.as_ref().map(|_| "[redacted]"))
            .field("method", &self.method)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Code {
    client_id: String,
    redirect_uri: String,
    challenge: String,
    scope: Vec<String>,
    resource: Option<String>,
    expires: Timestamp,
    /// The family issued from this code, once redeemed.
    redeemed_family: Option<u64>,
}

#[derive(Debug)]
struct Access {
    client_id: String,
    scope: Vec<String>,
    resource: Option<String>,
    issued: Timestamp,
    expires: Timestamp,
    revoked: bool,
    family: Option<u64>,
    /// The DPoP key thumbprint the token is bound to (`cnf.jkt`).
    jkt: Option<String>,
}

#[derive(Debug)]
struct Refresh {
    client_id: String,
    scope: Vec<String>,
    resource: Option<String>,
    family: u64,
    issued: Timestamp,
    expires: Option<Timestamp>,
    superseded_at: Option<Timestamp>,
    revoked: bool,
    /// The DPoP key thumbprint the refresh token is bound to.
    jkt: Option<String>,
}

#[derive(Debug, Default)]
struct Family {
    revoked: bool,
    latest_refresh: Option<String>,
}

/// A validated access token, as the resource server sees it.
#[derive(Debug, Clone)]
pub(crate) struct Grant {
    pub(crate) client_id: String,
    pub(crate) scope: Vec<String>,
    pub(crate) resource: Option<String>,
    pub(crate) issued: Timestamp,
    pub(crate) expires: Timestamp,
    /// The DPoP key thumbprint the token is bound to (`cnf.jkt`).
    pub(crate) jkt: Option<String>,
}

/// Why an access token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokenProblem {
    Unknown,
    Expired,
    Revoked,
}

/// An authorization request waiting for the test to approve or deny it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingAuthorization {
    /// The requesting client.
    pub client_id: String,
    /// The requested (or defaulted) scope, space separated.
    pub scope: String,
    /// The redirect URI the answer goes to.
    pub redirect_uri: String,
    /// The `resource` parameter, if any.
    pub resource: Option<String>,
    /// The client's registered name, if any.
    pub client_name: Option<String>,
}

#[derive(Debug)]
struct Pending {
    info: PendingAuthorization,
    decide: oneshot::Sender<bool>,
}

/// What the authorize endpoint validated, ready for a decision.
#[derive(Debug, Clone)]
pub(crate) struct AuthorizeRequest {
    pub(crate) client_id: String,
    pub(crate) redirect_uri: String,
    pub(crate) challenge: String,
    pub(crate) scope: Vec<String>,
    pub(crate) resource: Option<String>,
}

/// The successful token endpoint answer.
#[derive(Debug)]
pub(crate) struct TokenAnswer {
    pub(crate) tokens: IssuedTokens,
}

#[derive(Debug, Default)]
struct Inner {
    clients: HashMap<String, Client>,
    codes: HashMap<String, Code>,
    access: HashMap<String, Access>,
    refresh: HashMap<String, Refresh>,
    families: Vec<Family>,
    pending: Vec<Pending>,
    stats: AuthStats,
    events: Vec<AuthEvent>,
    revoke_all_seen: u64,
}

/// The shared core of one authorization server. `Debug` shows counts, never tokens or secrets.
pub(crate) struct Core {
    pub(crate) clock: SharedClock,
    pub(crate) knobs: Knobs,
    pub(crate) config: Config,
    inner: Mutex<Inner>,
    pub(crate) pending_changed: Notify,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        f.debug_struct("Core")
            .field("config", &self.config)
            .field("knobs", &self.knobs.get())
            .field("clients", &inner.clients.len())
            .field("access_tokens", &inner.access.len())
            .field("refresh_tokens", &inner.refresh.len())
            .field("pending_authorizations", &inner.pending.len())
            .finish_non_exhaustive()
    }
}

fn join(scope: &[String]) -> String {
    scope.join(" ")
}

pub(crate) fn split_scope(scope: Option<&str>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for s in scope.unwrap_or("").split(' ').filter(|s| !s.is_empty()) {
        if !out.iter().any(|o| o == s) {
            out.push(s.to_owned());
        }
    }
    out
}

mod authorize;
mod clients;
mod tokens;

impl Core {
    pub(crate) fn new(clock: SharedClock, knobs: Knobs, config: Config) -> Self {
        Core {
            clock,
            knobs,
            config,
            inner: Mutex::new(Inner::default()),
            pending_changed: Notify::new(),
        }
    }

    /// The server's time: the injected clock plus the offset knob.
    pub(crate) fn now(&self, knobs: &KnobSettings) -> Timestamp {
        let now = self.clock.now();
        let offset = knobs.clock_offset_millis;
        if offset >= 0 {
            now + Duration::from_millis(offset.unsigned_abs())
        } else {
            now - Duration::from_millis(offset.unsigned_abs())
        }
    }

    /// Lock the state, first applying any "revoke every token" the knobs asked for.
    fn lock(&self, now: Timestamp) -> MutexGuard<'_, Inner> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let generation = self.knobs.revoke_all_generation();
        if generation != inner.revoke_all_seen {
            inner.revoke_all_seen = generation;
            inner.access.values_mut().for_each(|a| a.revoked = true);
            inner.refresh.values_mut().for_each(|r| r.revoked = true);
            inner.families.iter_mut().for_each(|f| f.revoked = true);
            inner.codes.clear();
            push_event(&mut inner, now, AuthEventKind::AllTokensRevoked);
        }
        inner
    }

    pub(crate) fn stats(&self) -> AuthStats {
        let k = self.knobs.get();
        self.lock(self.now(&k)).stats.clone()
    }

    pub(crate) fn events(&self) -> Vec<AuthEvent> {
        let k = self.knobs.get();
        self.lock(self.now(&k)).events.clone()
    }

    pub(crate) fn record(&self, change: impl FnOnce(&mut AuthStats), event: Option<AuthEventKind>) {
        let k = self.knobs.get();
        let now = self.now(&k);
        let mut inner = self.lock(now);
        change(&mut inner.stats);
        if let Some(event) = event {
            push_event(&mut inner, now, event);
        }
    }
}

fn push_event(inner: &mut Inner, at: Timestamp, kind: AuthEventKind) {
    if inner.events.len() >= EVENT_LOG_LIMIT {
        inner.events.remove(0);
    }
    inner.events.push(AuthEvent { at, kind });
}
