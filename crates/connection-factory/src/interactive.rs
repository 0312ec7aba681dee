//! The interactive authorization: the host's [`AuthorizationHook`], the PENDING `mcp_oauth` flow
//! with its CSRF state mapping, and the axum [`callback_router`].

use std::fmt;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use flow_state::{FlowError, FlowKey, FlowManager};
use mcp_clock::Timestamp;
use mcp_oauth::{CallbackParams, Discovery, OAuthClient, PendingAuthorization};
use serde::{Deserialize, Serialize};
use token_storage::{TokenKey, TokenStorage};

use crate::oauth_refresher::{convert_response, decode_stored_client};

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

#[derive(Clone)]
struct CallbackState {
    flows: FlowManager,
    storage: TokenStorage,
    oauth: OAuthClient,
}

/// The OAuth callback, `GET /callback?code&state&iss` (or `error`), for the host to serve on
/// its redirect URI. It validates the state through the state mapping, exchanges the code,
/// stores the tokens, and completes the `mcp_oauth` flow, waking the waiters in whichever
/// process shares the flow store. A repeated callback is harmless; an `error` fails the flow
/// only with a valid, unexpired state and a matching `iss`.
pub fn callback_router(
    flows: FlowManager,
    storage: TokenStorage,
    oauth: OAuthClient,
) -> axum::Router {
    callback_router_at("/callback", flows, storage, oauth)
}

/// [`callback_router`] on another path (it must start with `/`), for a redirect URI such as
/// `http://localhost:PORT/oauth/callback`.
///
/// # Panics
/// When `path` does not start with `/` (axum refuses such a route).
pub fn callback_router_at(
    path: &str,
    flows: FlowManager,
    storage: TokenStorage,
    oauth: OAuthClient,
) -> axum::Router {
    axum::Router::new().route(path, get(callback)).with_state(CallbackState {
        flows,
        storage,
        oauth,
    })
}

#[derive(Deserialize)]
struct CallbackQuery {
    code: Option<String>,
    state: Option<String>,
    iss: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

async fn callback(
    State(s): State<CallbackState>,
    Query(q): Query<CallbackQuery>,
) -> (StatusCode, &'static str) {
    let Some(skey) = q.state.as_deref().and_then(state_key) else {
        return (StatusCode::BAD_REQUEST, "unknown or expired authorization state");
    };
    let Ok(Some(mapping)) = s.flows.get::<String>(&skey).await else {
        return (StatusCode::BAD_REQUEST, "unknown or expired authorization state");
    };
    if mapping.status != flow_state::FlowStatus::Pending {
        return (StatusCode::OK, "authorization already handled; you can close this window");
    }
    let Ok(meta) = serde_json::from_value::<StateMeta>(mapping.metadata) else {
        return (StatusCode::BAD_REQUEST, "corrupt authorization state");
    };
    let Ok(okey) = FlowKey::scoped(Some(&meta.tenant), crate::factory::OAUTH_FLOW, &meta.flow_id)
    else {
        return (StatusCode::BAD_REQUEST, "corrupt authorization state");
    };
    let flow = match s.flows.get::<String>(&okey).await {
        Ok(Some(flow)) if flow.status == flow_state::FlowStatus::Pending => flow,
        _ => {
            let _ = s.flows.complete_if_pending(&skey, &"gone").await;
            return (StatusCode::OK, "authorization already handled; you can close this window");
        }
    };
    let Ok(fmeta) = serde_json::from_value::<OAuthFlowMeta>(flow.metadata) else {
        return (StatusCode::BAD_REQUEST, "corrupt authorization flow");
    };
    // The state must be the one this flow is waiting for (a replaced flow has a new state).
    if q.state.as_deref() != Some(fmeta.pending.state.secret()) {
        let _ = s.flows.complete_if_pending(&skey, &"replaced").await;
        return (StatusCode::BAD_REQUEST, "this authorization was replaced by a newer one");
    }
    let key = TokenKey::new(meta.tenant.as_str(), meta.user.as_str(), meta.server.as_str());
    let registration = match s.storage.client(&key).await {
        Ok(Some(stored)) => decode_stored_client(&stored).map(|(_, r)| r),
        _ => None,
    };
    let Some(registration) = registration else {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            "no client registration for this authorization",
        );
    };
    if fmeta.client_id.as_ref().is_some_and(|id| *id != registration.client_id) {
        tracing::warn!("the stored client is not the one this authorization was started with");
        let message = "the stored client registration changed since this authorization started";
        let _ = s.flows.fail(&okey, FlowError::new("client_changed", message)).await;
        let _ = s.flows.complete_if_pending(&skey, &"failed").await;
        return (StatusCode::CONFLICT, "the client registration changed; please try again");
    }
    let params = CallbackParams {
        code: q.code.map(mcp_oauth::AuthorizationCode::new),
        state: q.state.map(mcp_oauth::CsrfState::new),
        iss: q.iss,
        error: q.error,
        error_description: q.error_description,
    };
    // With a server that takes DPoP, the code is exchanged with a proof by this key's DPoP key
    // (made and stored at the first exchange), and the tokens are bound to it.
    let oauth = match crate::dpop::for_grants(&s.storage, &key, &fmeta.discovery).await {
        Ok(Some(dpop)) => s.oauth.clone().with_dpop(dpop),
        Ok(None) => s.oauth.clone(),
        Err(e) => {
            tracing::warn!(error = %e, "the DPoP key could not be read or stored");
            return (StatusCode::INTERNAL_SERVER_ERROR, "the DPoP key could not be stored");
        }
    };
    // `exchange_code` checks the state's expiry and `iss` before it looks at `error`.
    let tokens = match oauth
        .exchange_code(&fmeta.discovery, &registration, &fmeta.pending, &params)
        .await
    {
        Ok(tokens) => tokens,
        Err(mcp_oauth::Error::AuthorizationDenied { error, .. }) => {
            tracing::info!(error = %error, "the authorization server refused the authorization");
            let _ = s.flows.fail(&okey, FlowError::new(error, "authorization refused")).await;
            let _ = s.flows.complete_if_pending(&skey, &"failed").await;
            return (StatusCode::OK, "authorization was refused; you can close this window");
        }
        Err(e) => {
            tracing::warn!(error = %e, "code exchange failed");
            let _ = s.flows.fail(&okey, FlowError::new("exchange_failed", e.to_string())).await;
            let _ = s.flows.complete_if_pending(&skey, &"failed").await;
            return (StatusCode::BAD_GATEWAY, "the code exchange failed");
        }
    };
    let mut response = convert_response(tokens);
    if response.scope.is_none() {
        // RFC 6749 §5.1: a response without `scope` granted the scope requested. Stored, so a
        // step-up later asks for it again with the challenged scope (not the challenged alone).
        response.scope.clone_from(&fmeta.pending.scope);
    }
    if let Err(e) = s.storage.store(&key, fmeta.discovery.issuer(), response).await {
        tracing::warn!(error = %e, "storing the tokens failed");
        return (StatusCode::INTERNAL_SERVER_ERROR, "storing the tokens failed");
    }
    let _ = s.flows.complete(&okey, &"authorized").await;
    let _ = s.flows.complete_if_pending(&skey, &"done").await;
    tracing::info!(tenant = %meta.tenant, server = %meta.server, "interactive authorization completed");
    (StatusCode::OK, "authorized; you can close this window")
}
