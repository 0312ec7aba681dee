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
mod error;
mod fixtures;
mod knobs;
mod resource;
mod secret;
mod stats;

pub use auth::{
    AuthServer, AuthServerBuilder, AuthServerHandle, ClientAuth, ClientSpec, PendingAuthorization,
};
pub use error::FixtureError;
pub use fixtures::Fixtures;
pub use knobs::{Approval, InjectedFailure, KnobSettings, Knobs};
pub use resource::{ResourceServer, ResourceServerBuilder, ResourceServerHandle};
pub use secret::{IssuedTokens, RegisteredClient, TokenFingerprint};
pub use stats::{AuthEvent, AuthEventKind, AuthStats, ResourceStats};
