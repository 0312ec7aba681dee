//! Fixture servers that misbehave on purpose, for testing MCP clients' OAuth.
//!
//! - [`AuthServer`]: an OAuth 2.1 authorization server (RFC 8414 and OpenID metadata, dynamic
//!   client registration, client ID metadata documents, PKCE S256, authorization code, refresh
//!   token and client credentials grants, revocation, introspection) whose [`Knobs`] model the
//!   servers MCP clients meet in production: short-lived tokens, refresh-token rotation with
//!   strict reuse detection, missing `expires_in`, Entra-style scope on refresh, slow or hung
//!   token endpoints, injected 5xx and 429s, server-side revocation, clock skew.
//! - [`ResourceServer`]: an rmcp streamable-HTTP MCP server (tools `echo`, `slow`, `counter`)
//!   behind bearer authentication against that authorization server, with RFC 9728 metadata,
//!   `WWW-Authenticate` challenges and 403 `insufficient_scope` for the `counter` tool.
//! - [`AuthStats`], [`AuthEvent`] and [`ResourceStats`]: what a test can assert on, such as
//!   "no refresh token was redeemed twice" ([`AuthStats::max_refresh_redemptions`]).
//!
//! | knob ([`Knobs`] setter) | what the server does | binary flag |
//! | --- | --- | --- |
//! | `set_access_token_lifetime` | access tokens live this long | `--access-token-lifetime` |
//! | `set_refresh_token_lifetime` | refresh tokens expire | `--refresh-token-lifetime` |
//! | `set_refresh_rotation` | rotate refresh tokens (default on) | `--no-rotation` |
//! | `set_reuse_detection`, `set_reuse_grace` | a rotated token redeemed again revokes its family, except within the grace window | `--reuse-detection`, `--reuse-grace-ms` |
//! | `set_omit_expires_in` | no `expires_in` in token responses | `--omit-expires-in` |
//! | `update(\|k\| k.expires_in_as_string = true)`, `lowercase_token_type` | `"expires_in": "3600"`, `"token_type": "bearer"` | `--expires-in-as-string`, `--lowercase-token-type` |
//! | `set_omit_refresh_on_refresh` | no refresh token in refresh responses | `--omit-refresh-on-refresh` |
//! | `set_require_scope_on_refresh` | refresh without `scope` is `invalid_request` (Entra) | `--require-scope-on-refresh` |
//! | `set_refresh_requires_offline_access` | refresh tokens only with `offline_access` | `--refresh-requires-offline-access` |
//! | `set_expired_token_status` | the resource server's status for an expired token (400) | `--expired-token-status` |
//! | `set_omit_challenge` | the resource server's 401s carry no `WWW-Authenticate` header | `--omit-challenge` |
//! | `set_token_delay`, `set_token_hang` | slow or hung token endpoint | `--token-delay-ms`, `--token-hang` |
//! | `set_refresh_hang` | only `refresh_token` grants hang (an authorization still completes) | |
//! | `fail_token_requests`, `fail_resource_requests` | 5xx or 429 + `Retry-After` on the Nth request | `--fail-nth`, `--resource-fail-nth`, ... |
//! | `revoke_all_tokens` | server-side invalidation of every token | |
//! | `set_clock_offset_millis` | the server's clock runs ahead or behind | `--clock-offset-ms` |
//! | `set_withheld_scopes` | approved authorizations grant the requested scope without these (down-scoping) | |
//! | `set_approval` | authorize auto-approves, waits for the test, or denies | `--deny` |
//! | `set_dpop` | DPoP required with nonces at the token endpoint and the resource server; tokens bound to the proof's key | `--dpop` |
//!
//! Everything binds 127.0.0.1. Time comes from an injected [`mcp_clock::SharedClock`], so a
//! test expires every token at once by advancing a `ManualClock`.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), mcp_fixtures::FixtureError> {
//! use mcp_fixtures::{ClientAuth, ClientSpec, Fixtures};
//! use std::time::Duration;
//!
//! let fx = Fixtures::start().await?;
//! fx.auth().knobs().set_access_token_lifetime(Duration::from_secs(5));
//! fx.auth().knobs().set_reuse_detection(true);
//! let client = fx.auth().register_client(ClientSpec::new(ClientAuth::None))?;
//! let tokens = fx.auth().issue_tokens(client.client_id(), "mcp:tools", Some(fx.resource().url()));
//! assert_eq!(tokens.expires_in(), Some(5));
//! assert_eq!(fx.auth().stats().max_refresh_redemptions(), 0);
//! # Ok(()) }
//! ```

mod auth;
mod dpop;
mod error;
mod fixtures;
mod knobs;
mod resource;
mod secret;
mod serve;
mod stats;

pub use auth::{
    AuthServer, AuthServerBuilder, AuthServerHandle, ClientAuth, ClientSpec, PendingAuthorization,
};
pub use dpop::{DpopChecker, DpopRefusal};
pub use error::FixtureError;
pub use fixtures::Fixtures;
pub use knobs::{Approval, InjectedFailure, KnobSettings, Knobs, RedirectIss};
pub use resource::{ResourceServer, ResourceServerBuilder, ResourceServerHandle};
pub use secret::{IssuedTokens, RegisteredClient, TokenFingerprint};
pub use stats::{AuthEvent, AuthEventKind, AuthStats, PostRecord, ResourceStats};
