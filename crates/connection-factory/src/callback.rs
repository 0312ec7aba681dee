//! The OAuth callback that completes an interactive authorization:
//! [`complete_authorization`], for any HTTP server, and the axum [`callback_router`] on it
//! (feature `callback-router`).

use flow_state::{FlowError, FlowKey, FlowManager};
use mcp_oauth::{CallbackParams, OAuthClient};
use token_storage::{TokenKey, TokenStorage};

use crate::interactive::{OAuthFlowMeta, StateMeta, state_key};
use crate::oauth_refresher::{convert_response, decode_stored_client};

/// What to answer the browser that brought the callback: an HTTP status and a short text for
/// the user (never a secret).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct CallbackResponse {
    /// The HTTP status: 200 when the authorization completed, was refused by the user or was
    /// already handled; 4xx for an unknown, expired, replaced or corrupt state; 5xx when the
    /// exchange or the store failed.
    pub status: u16,
    /// The text to show.
    pub message: &'static str,
}

/// The OAuth callback (`code`, `state`, `iss`, or `error`), for the host to call from whatever
/// serves its redirect URI. It validates the state through the state mapping
/// ([`STATE_FLOW`](crate::STATE_FLOW)), exchanges the code, stores the tokens, and completes the
/// `mcp_oauth` flow, waking the waiters in whichever process shares the flow store. A repeated
/// callback is harmless; an `error` fails the flow only with a valid, unexpired state and a
/// matching `iss`.
///
/// ```no_run
/// # async fn demo(flows: flow_state::FlowManager, storage: token_storage::TokenStorage, oauth: mcp_oauth::OAuthClient) {
/// use connection_factory::complete_authorization;
/// use mcp_oauth::CallbackParams;
///
/// let url = "http://127.0.0.1:8765/callback?code=abc&state=xyz".parse().unwrap();
/// let params = CallbackParams::parse(&url).unwrap();
/// let answer = complete_authorization(&flows, &storage, &oauth, params).await;
/// println!("{} {}", answer.status, answer.message);
/// # }
/// ```
pub async fn complete_authorization(
    flows: &FlowManager,
    storage: &TokenStorage,
    oauth: &OAuthClient,
    params: CallbackParams,
) -> CallbackResponse {
    let s = Handler { flows, storage, oauth };
    let (status, message) = s.complete(params).await;
    CallbackResponse { status: status.0, message }
}

struct Handler<'a> {
    flows: &'a FlowManager,
    storage: &'a TokenStorage,
    oauth: &'a OAuthClient,
}

/// An HTTP status for the callback's answer.
#[derive(Clone, Copy)]
struct StatusCode(u16);

impl StatusCode {
    const OK: StatusCode = StatusCode(200);
    const BAD_REQUEST: StatusCode = StatusCode(400);
    const CONFLICT: StatusCode = StatusCode(409);
    const INTERNAL_SERVER_ERROR: StatusCode = StatusCode(500);
    const BAD_GATEWAY: StatusCode = StatusCode(502);
}

impl Handler<'_> {
    async fn complete(&self, params: CallbackParams) -> (StatusCode, &'static str) {
        let Some(skey) = params.state.as_ref().map(|st| st.secret()).and_then(state_key) else {
            return (StatusCode::BAD_REQUEST, "unknown or expired authorization state");
        };
        let Ok(Some(mapping)) = self.flows.get::<String>(&skey).await else {
            return (StatusCode::BAD_REQUEST, "unknown or expired authorization state");
        };
        if mapping.status != flow_state::FlowStatus::Pending {
            return (StatusCode::OK, "authorization already handled; you can close this window");
        }
        let Ok(meta) = serde_json::from_value::<StateMeta>(mapping.metadata) else {
            return (StatusCode::BAD_REQUEST, "corrupt authorization state");
        };
        let Ok(okey) =
            FlowKey::scoped(Some(&meta.tenant), crate::factory::OAUTH_FLOW, &meta.flow_id)
        else {
            return (StatusCode::BAD_REQUEST, "corrupt authorization state");
        };
        let flow = match self.flows.get::<String>(&okey).await {
            Ok(Some(flow)) if flow.status == flow_state::FlowStatus::Pending => flow,
            _ => {
                let _ = self.flows.complete_if_pending(&skey, &"gone").await;
                return (
                    StatusCode::OK,
                    "authorization already handled; you can close this window",
                );
            }
        };
        let Ok(fmeta) = serde_json::from_value::<OAuthFlowMeta>(flow.metadata) else {
            return (StatusCode::BAD_REQUEST, "corrupt authorization flow");
        };
        // The state must be the one this flow is waiting for (a replaced flow has a new state).
        if params.state.as_ref().map(|st| st.secret()) != Some(fmeta.pending.state.secret()) {
            let _ = self.flows.complete_if_pending(&skey, &"replaced").await;
            return (StatusCode::BAD_REQUEST, "this authorization was replaced by a newer one");
        }
        let key = TokenKey::new(meta.tenant.as_str(), meta.user.as_str(), meta.server.as_str());
        let registration = match self.storage.client(&key).await {
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
            let _ = self.flows.fail(&okey, FlowError::new("client_changed", message)).await;
            let _ = self.flows.complete_if_pending(&skey, &"failed").await;
            return (StatusCode::CONFLICT, "the client registration changed; please try again");
        }
        // With a server that takes DPoP, the code is exchanged with a proof by this key's DPoP key
        // (made and stored at the first exchange), and the tokens are bound to it.
        let oauth = match crate::dpop::for_grants(self.storage, &key, &fmeta.discovery).await {
            Ok(Some(dpop)) => self.oauth.clone().with_dpop(dpop),
            Ok(None) => self.oauth.clone(),
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
                let _ =
                    self.flows.fail(&okey, FlowError::new(error, "authorization refused")).await;
                let _ = self.flows.complete_if_pending(&skey, &"failed").await;
                return (StatusCode::OK, "authorization was refused; you can close this window");
            }
            Err(e) => {
                tracing::warn!(error = %e, "code exchange failed");
                let _ =
                    self.flows.fail(&okey, FlowError::new("exchange_failed", e.to_string())).await;
                let _ = self.flows.complete_if_pending(&skey, &"failed").await;
                return (StatusCode::BAD_GATEWAY, "the code exchange failed");
            }
        };
        let mut response = convert_response(tokens);
        if response.scope.is_none() {
            // RFC 6749 §5.1: a response without `scope` granted the scope requested. Stored, so a
            // step-up later asks for it again with the challenged scope (not the challenged alone).
            response.scope.clone_from(&fmeta.pending.scope);
        }
        if let Err(e) = self.storage.store(&key, fmeta.discovery.issuer(), response).await {
            tracing::warn!(error = %e, "storing the tokens failed");
            return (StatusCode::INTERNAL_SERVER_ERROR, "storing the tokens failed");
        }
        let _ = self.flows.complete(&okey, &"authorized").await;
        let _ = self.flows.complete_if_pending(&skey, &"done").await;
        tracing::info!(tenant = %meta.tenant, server = %meta.server, "interactive authorization completed");
        (StatusCode::OK, "authorized; you can close this window")
    }
}

#[cfg(feature = "callback-router")]
mod router {
    use axum::extract::{Query, State};
    use axum::routing::get;
    use flow_state::FlowManager;
    use mcp_oauth::{CallbackParams, OAuthClient};
    use serde::Deserialize;
    use token_storage::TokenStorage;

    #[derive(Clone)]
    struct CallbackState {
        flows: FlowManager,
        storage: TokenStorage,
        oauth: OAuthClient,
    }

    /// [`complete_authorization`](super::complete_authorization) as an axum route,
    /// `GET /callback?code&state&iss` (or `error`), for the host to serve on its redirect URI.
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
    ) -> (axum::http::StatusCode, &'static str) {
        let params = CallbackParams {
            code: q.code.map(mcp_oauth::AuthorizationCode::new),
            state: q.state.map(mcp_oauth::CsrfState::new),
            iss: q.iss,
            error: q.error,
            error_description: q.error_description,
        };
        let answer = super::complete_authorization(&s.flows, &s.storage, &s.oauth, params).await;
        let status = axum::http::StatusCode::from_u16(answer.status)
            .unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR);
        (status, answer.message)
    }
}

#[cfg(feature = "callback-router")]
pub use router::{callback_router, callback_router_at};
