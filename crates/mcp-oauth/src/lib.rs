//! An OAuth 2.1 client for MCP: discovery, registration, authorization, token requests and
//! revocation, behind a one-method HTTP seam.
//!
//! # The flow
//! 1. A request to the MCP server gets a 401; parse its `WWW-Authenticate` headers with
//!    [`BearerChallenge::from_headers`].
//! 2. [`OAuthClient::discover`] finds the protected-resource metadata (RFC 9728) and the
//!    authorization server metadata (RFC 8414 / OpenID), or applies the 2025-03-26 fallbacks.
//! 3. [`OAuthClient::register`] picks the client identity: pre-registered, client ID metadata
//!    document, or dynamic registration (RFC 7591).
//! 4. [`select_scope`] chooses the scope; [`OAuthClient::authorization_url`] builds the browser
//!    URL with PKCE S256, `state` and `resource`, and returns a [`PendingAuthorization`].
//! 5. On the callback, [`OAuthClient::exchange_code`] checks `state`, TTL and `iss`, and
//!    exchanges the code. [`OAuthClient::refresh`], [`OAuthClient::client_credentials`] and
//!    [`OAuthClient::revoke`] cover the rest of the token life cycle;
//!    [`OAuthClient::jwt_bearer`] is the workload identity grant ([`WorkloadIdentity`]).
//! 6. A 403 `insufficient_scope` goes through [`AuthAttempts`] for step-up with bounded retries.
//!
//! ```no_run
//! use mcp_clock::SharedClock;
//! use mcp_oauth::{
//!     AuthAttempts, BearerChallenge, ClientConfig, HttpPolicy, OAuthClient, ReqwestHttpClient,
//!     select_scope,
//! };
//! # async fn run(www_authenticate: Vec<String>) -> Result<(), mcp_oauth::Error> {
//! let client = OAuthClient::new(ReqwestHttpClient::new(HttpPolicy::default())?, SharedClock::system());
//! let server = "https://mcp.example.com/mcp".parse().unwrap();
//! let challenge = BearerChallenge::from_headers(www_authenticate.iter().map(String::as_str))?;
//!
//! let discovery = client.discover(&server, challenge.as_ref()).await?;
//! let config = ClientConfig::new("my client", "http://127.0.0.1:8765/callback");
//! let registration = client.register(&discovery, &config).await?;
//!
//! let mut attempts = AuthAttempts::new(3);
//! attempts.begin()?;
//! let scope = select_scope(challenge.as_ref(), &discovery);
//! let (browser_url, pending) =
//!     client.authorization_url(&discovery, &registration, &config.redirect_uris[0], scope.as_deref())?;
//! // ... send the user to `browser_url`; the loopback listener receives the callback URL ...
//! # let callback_url = browser_url.clone();
//! let callback = mcp_oauth::CallbackParams::parse(&callback_url)?;
//! let tokens = client.exchange_code(&discovery, &registration, &pending, &callback).await?;
//! # let _ = tokens;
//! # Ok(()) }
//! ```
//!
//! Errors are one [`Error`] enum; [`Error::class`] maps each onto the token-storage policy
//! (terminal or transient), and [`Error::retry_after`] carries a server's `Retry-After`.
//!
//! # Why not the `oauth2` crate
//! `oauth2` 5 was considered for grant mechanics and not used. Its client authenticates only
//! with HTTP Basic or request-body secrets (no `private_key_jwt`, which needs ES256 signing);
//! its error type drops the HTTP status of an OAuth error response and its success type drops
//! the `Date` header (we need both: transient/terminal classification and expiry anchoring);
//! and its token response fails to parse an `expires_in` sent as a string. Every grant here is a
//! form POST of a few fields, so the grants are written directly on the HTTP seam, which also
//! keeps one redirect, body-size and SSRF policy for every request.
//!
//! # Stale registrations
//! [`Error::is_stale_registration`] (an `invalid_client` from the token endpoint) and
//! [`ClientRegistration::secret_expired`] tell the caller to drop the stored registration and
//! call [`OAuthClient::register`] again.
//!
//! # HTTP
//! Everything goes through [`HttpClient`]; [`ReqwestHttpClient`] is the hardened production
//! implementation (see its docs). The seam never follows redirects: token, registration and
//! revocation requests refuse them, and discovery follows same-origin redirects up to
//! [`OAuthConfig::max_discovery_redirects`]. HTTPS comes from reqwest's rustls support, which
//! this crate's default `rustls` feature enables (as does rmcp's `reqwest` feature); without
//! any reqwest TLS feature in the build, HTTPS requests fail with [`Error::Transport`].

mod authorize;
mod challenge;
mod client;
mod discovery;
mod dpop;
mod enterprise;
mod error;
mod http;
mod registration;
mod reqwest_client;
mod scope;
mod secret;
mod token;
mod workload;

#[cfg(test)]
mod testutil;

pub use authorize::{CallbackParams, PendingAuthorization, PendingAuthorizations, pkce_challenge};
pub use challenge::{
    BearerChallenge, Challenge, parse_challenge_header, parse_challenges, parse_challenges_lenient,
};
pub use client::{OAuthClient, OAuthConfig, RESERVED_AUTHORIZATION_PARAMS};
pub use discovery::{
    AuthorizationServerMetadata, CacheUpdate, Discovery, DiscoveryCache, MetadataSource,
    ProtectedResourceMetadata,
};
pub use dpop::DpopKey;
pub use enterprise::EnterpriseGrant;
pub use error::{Endpoint, Error, ErrorClass, Result};
pub use http::{
    HttpClient, HttpRequest, HttpResponse, Method, Reach, SharedHttpClient, SsrfPolicy, check_url,
};
pub use registration::{
    ClientConfig, ClientRegistration, ClientSigningKey, PROTOCOL_REGISTRATION_FIELDS,
    PreRegisteredClient, RegistrationSource, TokenEndpointAuthMethod,
};
pub use reqwest_client::{HttpPolicy, ReqwestHttpClient};
pub use scope::{AuthAttempts, select_scope, union_scopes};
pub use secret::{
    AccessToken, AuthorizationCode, ClientSecret, CsrfState, IdToken, PkceVerifier, PrivateKeyPem,
    RefreshToken,
};
pub use token::{Revocation, TokenResponse};
pub use workload::WorkloadIdentity;
