//! The interactive authorization: the host's [`AuthorizationHook`] and the PENDING `mcp_oauth`
//! flow with its CSRF state mapping (the callback that completes it is in `callback.rs`).

use std::fmt;

use flow_state::FlowKey;
use mcp_clock::Timestamp;
use mcp_oauth::{Discovery, PendingAuthorization};
use serde::{Deserialize, Serialize};

/// The flow type of the CSRF state mapping (not tenant-scoped: the callback knows only the
/// state; the mapping names the tenant).
pub const STATE_FLOW: &str = "mcp_oauth_state";

/// Why the user is asked to authorize.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuthorizationReason {
    /// No usable tokens are stored.
    NoTokens,
    /// The silent refresh after a 401 was refused, failed or ran out of its budget.
    RefreshFailed,
    /// The server refused the token for a missing scope (403 `insufficient_scope`): step-up to
    /// the union of the held and the challenged scopes.
    InsufficientScope,
}

/// What the host's UI gets: where to send the user, and until when the request is valid.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AuthorizationRequest {
    /// The authorization URL to open in the browser.
    pub authorization_url: String,
    /// The scope asked for.
    pub scopes: Option<String>,
    /// Why.
    pub reason: AuthorizationReason,
    /// When the pending authorization expires.
    pub expires_at: Timestamp,
}

/// What the hook wants the waiting request to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HookDecision {
    /// Block until the callback completes the flow (within the OAuth wait timeout).
    Wait,
    /// Fail the request now with `AuthorizationRequired`; the flow stays PENDING and the
    /// callback still stores the tokens for the next request.
    ReturnEarly,
}

/// The host's UI for interactive authorization. Called at most once per PENDING flow (one
/// prompt per tenant, user and server at a time).
///
/// Written with [`async_trait`](https://docs.rs/async-trait) (dyn-compatible): an
/// implementation writes `async fn` under `#[async_trait::async_trait]`.
///
/// ```
/// use connection_factory::{AuthorizationHook, AuthorizationRequest, HookDecision};
///
/// #[derive(Debug)]
/// struct Print;
///
/// #[async_trait::async_trait]
/// impl AuthorizationHook for Print {
///     async fn authorization_required(&self, request: AuthorizationRequest) -> HookDecision {
///         println!("open {}", request.authorization_url);
///         HookDecision::ReturnEarly
///     }
/// }
/// ```
#[async_trait::async_trait]
pub trait AuthorizationHook: Send + Sync + fmt::Debug + 'static {
    /// The user must authorize: show `request`, and say whether the request should wait.
    async fn authorization_required(&self, request: AuthorizationRequest) -> HookDecision;

    /// Another request already prompted for this tenant, user and server, and that
    /// authorization is still PENDING and fresh: the user is not prompted again. `request` is
    /// that authorization (its URL, scopes and expiry; the reason is this request's), for the
    /// host to show again if it wishes (it is not a new authorization). Say whether this request
    /// waits for it. The default waits; a host in return-early mode returns
    /// [`HookDecision::ReturnEarly`] here too.
    async fn authorization_pending(&self, request: AuthorizationRequest) -> HookDecision {
        drop(request);
        HookDecision::Wait
    }
}

/// What the PENDING `mcp_oauth` flow carries.
#[derive(Serialize, Deserialize)]
pub(crate) struct OAuthFlowMeta {
    pub(crate) pending: PendingAuthorization,
    pub(crate) discovery: Discovery,
    /// The authorization URL the user was sent to (shown again to a request that joins).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) authorization_url: Option<String>,
    /// The client the authorization URL names: the callback exchanges the code with the
    /// stored registration only if it is this client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) client_id: Option<String>,
}

/// What the state mapping carries: which flow and key the state belongs to.
#[derive(Serialize, Deserialize)]
pub(crate) struct StateMeta {
    pub(crate) tenant: String,
    pub(crate) user: String,
    pub(crate) server: String,
    pub(crate) flow_id: String,
}

pub(crate) fn state_key(state: &str) -> Option<FlowKey> {
    FlowKey::new(STATE_FLOW, state).ok()
}
