//! The refresh-grant seam: [`Refresher`], which the OAuth layer implements, with
//! [`RefreshRequest`], [`TokenResponse`] and [`RefreshError`].

use std::fmt;
use std::time::Duration;

use mcp_clock::Timestamp;
use serde::{Deserialize, Serialize};

use crate::{ClientRegistration, Secret, TokenKey};

/// Runs the refresh-token grant. This crate does no HTTP: the OAuth layer implements this.
///
/// It is called at most once at a time per key in a process, from a task detached from every
/// caller, so its result is always persisted. It is never called again with a refresh token it
/// has already redeemed successfully.
///
/// Written with [`async_trait`](https://docs.rs/async-trait) (dyn-compatible): an
/// implementation writes `async fn` under `#[async_trait::async_trait]`.
///
/// ```
/// use token_storage::{RefreshError, RefreshRequest, Refresher, TokenKey, TokenResponse};
///
/// #[derive(Debug)]
/// struct Rotating;
///
/// #[async_trait::async_trait]
/// impl Refresher for Rotating {
///     async fn refresh(
///         &self,
///         _key: &TokenKey,
///         request: &RefreshRequest,
///     ) -> Result<TokenResponse, RefreshError> {
///         let next = format!("{}+", request.refresh_token.expose());
///         Ok(TokenResponse::bearer("new-access")
///             .expires_in(std::time::Duration::from_secs(3600))
///             .refresh_token(next))
///     }
/// }
/// ```
#[async_trait::async_trait]
pub trait Refresher: Send + Sync + fmt::Debug {
    /// Redeem `request.refresh_token` for `key`.
    async fn refresh(
        &self,
        key: &TokenKey,
        request: &RefreshRequest,
    ) -> Result<TokenResponse, RefreshError>;
}

/// What a [`Refresher`] gets: the refresh token read from the store when the refresh started
/// (never a caller's snapshot), and what else the grant needs.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RefreshRequest {
    /// The refresh token to redeem.
    pub refresh_token: Secret,
    /// The scope granted with the current tokens.
    pub scope: Option<String>,
    /// The issuer the tokens came from.
    pub issuer: String,
    /// The stored client registration, when there is one.
    pub client: Option<ClientRegistration>,
    /// The DPoP key stored for the key ([`TokenStorage::dpop_key`](crate::TokenStorage::dpop_key))
    /// when the tokens are DPoP-bound: proofs of the refresh grant are signed with it.
    pub dpop_key: Option<Secret>,
    /// Whether the current tokens are DPoP-bound (`token_type` `DPoP`): their refresh token is
    /// presented only with a proof by [`RefreshRequest::dpop_key`].
    pub dpop_bound: bool,
}

impl RefreshRequest {
    /// A request to redeem `refresh_token` at `issuer` (for tests of [`Refresher`]s; the
    /// storage builds these itself).
    ///
    /// ```
    /// let r = token_storage::RefreshRequest::new("rt", "https://as.example").scope("read");
    /// assert_eq!(r.scope.as_deref(), Some("read"));
    /// ```
    pub fn new(refresh_token: impl Into<Secret>, issuer: impl Into<String>) -> Self {
        RefreshRequest {
            refresh_token: refresh_token.into(),
            scope: None,
            issuer: issuer.into(),
            client: None,
            dpop_key: None,
            dpop_bound: false,
        }
    }

    /// Set the scope.
    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        self.scope = Some(scope.into());
        self
    }

    /// Set the client registration.
    pub fn client(mut self, client: ClientRegistration) -> Self {
        self.client = Some(client);
        self
    }

    /// Set the DPoP key (PKCS#8 PEM) and whether the tokens are bound to it.
    pub fn dpop_key(mut self, key: Option<Secret>, bound: bool) -> Self {
        self.dpop_key = key;
        self.dpop_bound = bound;
        self
    }
}

/// A successful token-endpoint response, as the OAuth layer parsed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenResponse {
    /// `access_token`.
    pub access_token: Secret,
    /// `token_type` (usually `Bearer`).
    pub token_type: String,
    /// `expires_in`; `None` when the server gave none (the token is then used until rejected).
    pub expires_in: Option<Duration>,
    /// `refresh_token`; `None` keeps the stored one on a refresh.
    pub refresh_token: Option<Secret>,
    /// `refresh_token_expires_in`, when the server gave one.
    pub refresh_token_expires_in: Option<Duration>,
    /// `scope`; `None` keeps the stored scope on a refresh.
    pub scope: Option<String>,
    /// The response's `Date` header: corrects `expires_at` for the time the response spent on
    /// the way (by at most [`crate::TokenStorageConfig::max_date_correction`]).
    pub date: Option<Timestamp>,
}

impl TokenResponse {
    /// A `Bearer` response with `access_token` and nothing else.
    pub fn bearer(access_token: impl Into<Secret>) -> Self {
        TokenResponse {
            access_token: access_token.into(),
            token_type: "Bearer".into(),
            expires_in: None,
            refresh_token: None,
            refresh_token_expires_in: None,
            scope: None,
            date: None,
        }
    }

    /// Set `expires_in`.
    pub fn expires_in(mut self, expires_in: Duration) -> Self {
        self.expires_in = Some(expires_in);
        self
    }

    /// Set `refresh_token`.
    pub fn refresh_token(mut self, refresh_token: impl Into<Secret>) -> Self {
        self.refresh_token = Some(refresh_token.into());
        self
    }

    /// Set `refresh_token_expires_in`.
    pub fn refresh_token_expires_in(mut self, expires_in: Duration) -> Self {
        self.refresh_token_expires_in = Some(expires_in);
        self
    }

    /// Set `scope`.
    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        self.scope = Some(scope.into());
        self
    }

    /// Set the `Date` header's time.
    pub fn date(mut self, date: Timestamp) -> Self {
        self.date = Some(date);
        self
    }
}

/// The OAuth error codes that end a grant for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum TerminalCode {
    /// `invalid_grant`: the refresh token is dead (expired, revoked, or already redeemed).
    InvalidGrant,
    /// `invalid_client`: the client registration is no longer valid; it is deleted too.
    InvalidClient,
    /// `unauthorized_client`: this client may not use the refresh grant.
    UnauthorizedClient,
}

impl fmt::Display for TerminalCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TerminalCode::InvalidGrant => "invalid_grant",
            TerminalCode::InvalidClient => "invalid_client",
            TerminalCode::UnauthorizedClient => "unauthorized_client",
        })
    }
}

/// The kinds of failure that may pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TransientKind {
    /// The request did not reach the server (no connection, refused, DNS): the server cannot
    /// have acted, so retrying with the same refresh token is safe.
    Network,
    /// The request was sent (or may have been) and no answer came: a timeout or a connection
    /// reset after sending. The server may have rotated the refresh token; the attempt is in
    /// doubt.
    Unanswered,
    /// A 5xx answer.
    ServerError(u16),
    /// 429 Too Many Requests (or `slow_down`).
    RateLimited,
    /// `temporarily_unavailable`.
    TemporarilyUnavailable,
}

/// Why a [`Refresher`] failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RefreshError {
    /// The grant is dead: the slot is marked as needing authorization.
    Terminal {
        /// The OAuth error code.
        code: TerminalCode,
        /// `error_description`, if any. Must not contain secrets.
        description: Option<String>,
    },
    /// A failure that may pass: the credentials are kept and the refresh retried with backoff.
    Transient {
        /// What kind.
        kind: TransientKind,
        /// `Retry-After`, if the server sent one.
        retry_after: Option<Duration>,
        /// A short description. Must not contain secrets.
        message: String,
    },
}

impl RefreshError {
    /// Whether the request may have reached the server and been acted on: a transient failure
    /// with no answer ([`TransientKind::Unanswered`]) or a 5xx answer (a server can fail after
    /// rotating). Such an attempt is in doubt; the others ended before the server acted.
    pub fn may_have_acted(&self) -> bool {
        matches!(
            self,
            RefreshError::Transient {
                kind: TransientKind::Unanswered | TransientKind::ServerError(_),
                ..
            }
        )
    }

    /// A terminal error.
    pub fn terminal(code: TerminalCode, description: Option<String>) -> Self {
        RefreshError::Terminal { code, description }
    }

    /// A transient error.
    pub fn transient(kind: TransientKind, message: impl Into<String>) -> Self {
        RefreshError::Transient { kind, retry_after: None, message: message.into() }
    }

    /// A transient error with `Retry-After`.
    pub fn transient_retry_after(
        kind: TransientKind,
        message: impl Into<String>,
        retry_after: Duration,
    ) -> Self {
        RefreshError::Transient { kind, retry_after: Some(retry_after), message: message.into() }
    }
}
