//! MCP connections whose OAuth handling lives as long as the connection.
//!
//! The factory:
//!
//! - [`ConnectionFactory`]: makes [`Connection`]s for (tenant, user, server) triples
//!   ([`FactoryConfig`]) over one injected [`flow_state::FlowManager`] and one
//!   [`token_storage::TokenStorage`], so look-ups and refreshes are shared by every connection
//!   of the process. Its [`FactoryProvider`] reads the current token through a cached,
//!   tenant-scoped look-up flow ([`GET_TOKENS_FLOW`]), and on a 401 force-refreshes with the
//!   rejected token (one redemption per key, bounded by [`FactoryConfig::refresh_budget`]),
//!   invalidates the cached look-up and retries; on a refused or timed-out refresh it
//!   invalidates the tenant's COMPLETED [`OAUTH_FLOW`] and falls back to the interactive flow
//!   (or fails the request without one). A 403 / `insufficient_scope` never refreshes: it
//!   steps up (an interactive authorization for the union of the held and the challenged
//!   scopes), at most once per scope set and token, then fails with [`Error::InsufficientScope`].
//!   Refreshes are coalesced per [`FactoryConfig::token_key`] (tenant, user, server and a digest
//!   of the OAuth configuration). Outcomes are counted ([`RefreshCounters`]) and traced (span
//!   `mcp_refresh`, field `outcome`: refreshed, coalesced, adopted, rejected, transient,
//!   timed_out; the interactive flow in `mcp_interactive`, with discovery and registration in
//!   `mcp_discovery` and `mcp_registration` inside it).
//! - [`OAuthRefresher`]: token storage's refresh grant over [`mcp_oauth::OAuthClient`], with a
//!   conservative terminal / transient classification; [`stored_client`] stores what it needs.
//!
//! - The interactive flow ([`ConnectionFactory::with_interactive`], a [`FactoryConfig::client`]):
//!   on no tokens, or after a failed silent refresh, discovery from the challenge, registration
//!   (a stored client is reused), a PKCE authorization URL, a PENDING `mcp_oauth` flow with a
//!   CSRF state mapping ([`STATE_FLOW`]), and the host's [`AuthorizationHook`] (blocking or
//!   return-early). A fresh PENDING flow is joined (one prompt per key; the hook's
//!   `authorization_pending` decides whether the joiner waits), a stale one replaced by the one
//!   request that claims it. Concurrent first connects register one client. While the user
//!   authorizes, the connection's connect and request timeouts are widened by the OAuth wait.
//!   [`complete_authorization`], called with the callback's parameters from whatever serves the
//!   redirect URI, validates the state, exchanges the code, stores the tokens and completes the
//!   flow; queued requests resume. [`callback_router`] (`GET /callback`, feature
//!   `callback-router`, on by default) is it as an axum route.
//!
//!
//! The auth transport underneath:
//!
//! - [`AuthProvider`]: the seam. The transport asks it for the token of every request and tells
//!   it about every 401 or 403 ([`Refusal`]); it answers with a [`Recovery`]. Token storage and
//!   the OAuth client plug in behind it.
//! - [`AuthHttpClient`]: rmcp's streamable-HTTP client with the provider in front of **every**
//!   request (POSTs, the GET SSE stream, its reconnects, the session DELETE): bearer injection,
//!   and one recovery plus one retry per refused request.
//! - [`Connection`]: an rmcp client session over that client (`connect`, `list_tools`,
//!   `call_tool`, `close`) with typed [`Error`]s. The provider stays attached until the
//!   connection is dropped. A lost session (transport closed, session expired and rmcp's own
//!   re-initialization failed, server unreachable) is reconnected a bounded number of times
//!   with exponential backoff and jitter on the injected clock ([`ConnectOptions::reconnect`]),
//!   then the request fails with [`Error::Reconnect`].
//! - [`RefreshingProvider`]: a reference provider whose refresh on a burst of 401s is coalesced
//!   with [`flow_state::SingleFlight`], so the refresh token is redeemed once.
//!
//! ```no_run
//! # async fn demo() -> Result<(), connection_factory::Error> {
//! use connection_factory::{ConnectOptions, Connection, RefreshingProvider, Secret, Tokens};
//! use mcp_clock::SharedClock;
//! use std::sync::Arc;
//!
//! let provider = RefreshingProvider::new(
//!     "tenant:user:server",
//!     Tokens::new("access-token", Some(Secret::new("refresh-token"))),
//!     Arc::new(|_refresh_token: Secret| -> connection_factory::BoxFuture<'static, _> {
//!         Box::pin(async { Err(connection_factory::Error::AuthorizationRequired { www_authenticate: None }) })
//!     }),
//!     SharedClock::system(),
//! );
//! let conn = Connection::connect("http://127.0.0.1:8080/mcp", Arc::new(provider), ConnectOptions::default()).await?;
//! let tools = conn.list_tools().await?;
//! # drop(tools);
//! # Ok(()) }
//! ```

mod callback;
mod challenge;
mod client;
mod connection;
mod dpop;
mod error;
mod factory;
mod interactive;
mod oauth_refresher;
mod provider;
mod refreshing;
mod secret;

pub use callback::{CallbackResponse, complete_authorization};
#[cfg(feature = "callback-router")]
pub use callback::{callback_router, callback_router_at};
pub use challenge::{Refusal, RequestKind};
pub use client::AuthHttpClient;
pub use connection::{ConnectOptions, Connection, header_map};
pub use error::{Error, ErrorKind};
pub use factory::{
    ConnectionFactory, FactoryConfig, FactoryProvider, GET_TOKENS_FLOW, OAUTH_FLOW, RefreshCounters,
};
pub use interactive::{
    AuthorizationHook, AuthorizationReason, AuthorizationRequest, HookDecision, STATE_FLOW,
};
/// The boxed future a [`RefreshFn`] returns: the workspace's one alias, [`mcp_clock::BoxFuture`].
pub use mcp_clock::BoxFuture;
pub use oauth_refresher::{OAuthRefresher, stored_client};
pub use provider::{AuthProvider, Recovery};
pub use refreshing::{RefreshFn, RefreshingProvider, Tokens};
pub use rmcp::model::{CallToolResult, Tool};
pub use secret::Secret;
