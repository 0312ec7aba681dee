//! The OAuth authorization server fixture: builder and handle.

mod core;
mod http;

use std::sync::Arc;
use std::time::Duration;

use mcp_clock::SharedClock;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use self::core::Config;
pub use self::core::PendingAuthorization;
pub(crate) use self::core::{AuthMethod, Core, TokenProblem, split_scope};
use crate::error::FixtureError;
use crate::knobs::{KnobSettings, Knobs};
use crate::secret::{IssuedTokens, RegisteredClient};
use crate::stats::{AuthEvent, AuthStats};

/// How a client authenticates at the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientAuth {
    /// A public client: `client_id` in the body, no secret.
    None,
    /// HTTP Basic with the client id and secret.
    ClientSecretBasic,
    /// `client_id` and `client_secret` in the form body.
    ClientSecretPost,
}

/// A client to register through [`AuthServerHandle::register_client`].
///
/// ```
/// use mcp_fixtures::{ClientAuth, ClientSpec};
/// let spec = ClientSpec::new(ClientAuth::ClientSecretBasic)
///     .redirect_uri("http://127.0.0.1:4000/callback")
///     .client_id("pre-registered-client")
///     .client_secret("pre-registered-secret");
/// assert_eq!(spec.auth(), ClientAuth::ClientSecretBasic);
/// ```
#[derive(Clone)]
pub struct ClientSpec {
    auth: ClientAuth,
    redirect_uris: Vec<String>,
    grant_types: Vec<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
    name: Option<String>,
}

impl std::fmt::Debug for ClientSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSpec")
            .field("auth", &self.auth)
            .field("redirect_uris", &self.redirect_uris)
            .field("grant_types", &self.grant_types)
            .field("client_id", &self.client_id)
            .field("client_secret", &self.client_secret.as_ref().map(|_| "[redacted]"))
            .field("name", &self.name)
            .finish()
    }
}

impl ClientSpec {
    /// A client authenticating with `auth`, allowed every grant, with no redirect URI yet.
    pub fn new(auth: ClientAuth) -> Self {
        ClientSpec {
            auth,
            redirect_uris: Vec::new(),
            grant_types: vec![
                "authorization_code".into(),
                "refresh_token".into(),
                "client_credentials".into(),
            ],
            client_id: None,
            client_secret: None,
            name: None,
        }
    }
    /// Add a redirect URI.
    pub fn redirect_uri(mut self, uri: impl Into<String>) -> Self {
        self.redirect_uris.push(uri.into());
        self
    }
    /// Use this client id instead of a random one.
    pub fn client_id(mut self, id: impl Into<String>) -> Self {
        self.client_id = Some(id.into());
        self
    }
    /// Use this secret instead of a random one (ignored for [`ClientAuth::None`]).
    pub fn client_secret(mut self, secret: impl Into<String>) -> Self {
        self.client_secret = Some(secret.into());
        self
    }
    /// A display name.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }
    /// The authentication method.
    pub fn auth(&self) -> ClientAuth {
        self.auth
    }
}

/// The OAuth authorization server fixture. Start one with [`AuthServer::builder`].
///
/// It serves, under its issuer (`http://127.0.0.1:PORT` plus an optional path):
/// `/authorize`, `/token`, `/register`, `/revoke`, `/introspect`, `/jwks`, and the RFC 8414 and
/// OpenID metadata at their well-known locations (path-insert and path-append when the issuer
/// has a path).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), mcp_fixtures::FixtureError> {
/// use mcp_clock::ManualClock;
/// use mcp_fixtures::{AuthServer, ClientAuth, ClientSpec};
/// use std::time::Duration;
///
/// let clock = ManualClock::default();
/// let auth = AuthServer::builder().clock(clock.shared()).issuer_path("/tenant1").spawn().await?;
/// assert!(auth.issuer().ends_with("/tenant1"));
/// assert!(auth.metadata_url().ends_with("/.well-known/oauth-authorization-server/tenant1"));
///
/// let client = auth.register_client(ClientSpec::new(ClientAuth::None))?;
/// let tokens = auth.issue_tokens(client.client_id(), "mcp:tools", None);
/// clock.advance(Duration::from_secs(3600)); // every token issued so far is now expired
/// assert!(tokens.refresh_token().is_some());
/// auth.shutdown().await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct AuthServer;

impl AuthServer {
    /// A builder with the defaults: system clock, any free port, scopes
    /// `mcp:tools mcp:read mcp:write offline_access` (default `mcp:tools`), registration and
    /// client ID metadata documents on, both metadata documents served, default knobs.
    pub fn builder() -> AuthServerBuilder {
        AuthServerBuilder {
            clock: SharedClock::system(),
            knobs: KnobSettings::default(),
            port: 0,
            config: Config {
                scopes_supported: ["mcp:tools", "mcp:read", "mcp:write", "offline_access"]
                    .map(String::from)
                    .to_vec(),
                default_scopes: vec!["mcp:tools".into()],
                advertise_scopes: true,
                registration: true,
                client_metadata_documents: true,
                rfc8414_metadata: true,
                openid_metadata: true,
                issuer_path: String::new(),
            },
        }
    }
}

/// Configures and starts an [`AuthServer`].
#[derive(Debug)]
pub struct AuthServerBuilder {
    clock: SharedClock,
    knobs: KnobSettings,
    port: u16,
    config: Config,
}

impl AuthServerBuilder {
    /// The clock that token lifetimes and expiry read (a `ManualClock` in tests).
    pub fn clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }
    /// The knobs to start with.
    pub fn knobs(mut self, knobs: KnobSettings) -> Self {
        self.knobs = knobs;
        self
    }
    /// Listen on this loopback port (0, the default: any free port).
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }
    /// The scopes the server accepts (and advertises in `scopes_supported`).
    pub fn scopes_supported<S: Into<String>>(
        mut self,
        scopes: impl IntoIterator<Item = S>,
    ) -> Self {
        self.config.scopes_supported = scopes.into_iter().map(Into::into).collect();
        self
    }
    /// The scopes granted when an authorization request names none.
    pub fn default_scopes<S: Into<String>>(mut self, scopes: impl IntoIterator<Item = S>) -> Self {
        self.config.default_scopes = scopes.into_iter().map(Into::into).collect();
        self
    }
    /// Whether the metadata lists `scopes_supported` (default true).
    pub fn advertise_scopes(mut self, on: bool) -> Self {
        self.config.advertise_scopes = on;
        self
    }
    /// Serve dynamic client registration (default true).
    pub fn dynamic_registration(mut self, on: bool) -> Self {
        self.config.registration = on;
        self
    }
    /// Accept URL client ids and fetch their metadata documents from loopback (default true).
    pub fn client_metadata_documents(mut self, on: bool) -> Self {
        self.config.client_metadata_documents = on;
        self
    }
    /// Serve the RFC 8414 metadata (default true).
    pub fn rfc8414_metadata(mut self, on: bool) -> Self {
        self.config.rfc8414_metadata = on;
        self
    }
    /// Serve the OpenID metadata (default true).
    pub fn openid_metadata(mut self, on: bool) -> Self {
        self.config.openid_metadata = on;
        self
    }
    /// Give the issuer a path, such as `/tenant1`.
    pub fn issuer_path(mut self, path: impl Into<String>) -> Self {
        let path = path.into();
        self.config.issuer_path = path.trim_end_matches('/').to_owned();
        self
    }

    /// Bind 127.0.0.1 and start serving.
    ///
    /// # Errors
    /// [`FixtureError::Bind`] when the port is taken; [`FixtureError::InvalidConfig`] for an
    /// issuer path without a leading `/` or default scopes outside the supported ones.
    pub async fn spawn(self) -> Result<AuthServerHandle, FixtureError> {
        let cfg = &self.config;
        if !cfg.issuer_path.is_empty() && !cfg.issuer_path.starts_with('/') {
            return Err(FixtureError::InvalidConfig("issuer path must start with '/'".into()));
        }
        if let Some(bad) = cfg.default_scopes.iter().find(|s| !cfg.scopes_supported.contains(s)) {
            return Err(FixtureError::InvalidConfig(format!(
                "default scope {bad} is not supported"
            )));
        }
        let listener = TcpListener::bind(("127.0.0.1", self.port))
            .await
            .map_err(|source| FixtureError::Bind { port: self.port, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| FixtureError::Bind { port: self.port, source })?;
        let base_url = format!("http://{addr}");
        let issuer = format!("{base_url}{}", self.config.issuer_path);
        let core = Arc::new(Core::new(self.clock, Knobs::new(self.knobs), self.config));
        let shutdown = CancellationToken::new();
        let app = http::App {
            core: core.clone(),
            dpop: Arc::new(crate::dpop::DpopChecker::new()),
            issuer: issuer.clone(),
            shutdown: shutdown.clone(),
            http: reqwest::Client::builder()
                .no_proxy()
                .build()
                .map_err(|e| FixtureError::Server(Box::new(e)))?,
        };
        let router = http::router(app);
        let task = crate::serve::spawn(listener, router, shutdown.clone(), "authorization server");
        tracing::debug!(%issuer, "authorization server listening");
        Ok(AuthServerHandle { core, issuer, base_url, shutdown, task: Some(task) })
    }
}

/// A running [`AuthServer`]. The server stops when the handle is dropped or on
/// [`AuthServerHandle::shutdown`].
#[derive(Debug)]
pub struct AuthServerHandle {
    pub(crate) core: Arc<Core>,
    issuer: String,
    base_url: String,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl AuthServerHandle {
    /// The issuer identifier, e.g. `http://127.0.0.1:41234` or `http://127.0.0.1:41234/tenant1`.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }
    /// The server's origin, `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }
    /// The RFC 8414 metadata URL (path-insert form when the issuer has a path).
    pub fn metadata_url(&self) -> String {
        format!(
            "{}/.well-known/oauth-authorization-server{}",
            self.base_url, self.core.config.issuer_path
        )
    }
    /// The authorize endpoint.
    pub fn authorization_endpoint(&self) -> String {
        format!("{}/authorize", self.issuer)
    }
    /// The token endpoint.
    pub fn token_endpoint(&self) -> String {
        format!("{}/token", self.issuer)
    }
    /// The registration endpoint (served only when registration is on).
    pub fn registration_endpoint(&self) -> String {
        format!("{}/register", self.issuer)
    }
    /// The revocation endpoint.
    pub fn revocation_endpoint(&self) -> String {
        format!("{}/revoke", self.issuer)
    }
    /// The introspection endpoint.
    pub fn introspection_endpoint(&self) -> String {
        format!("{}/introspect", self.issuer)
    }
    /// The scopes the server accepts.
    pub fn scopes_supported(&self) -> &[String] {
        &self.core.config.scopes_supported
    }
    /// The knobs, changeable while the server runs.
    pub fn knobs(&self) -> Knobs {
        self.core.knobs.clone()
    }
    /// A snapshot of the counters.
    pub fn stats(&self) -> AuthStats {
        self.core.stats()
    }
    /// The event log so far, oldest first.
    pub fn events(&self) -> Vec<AuthEvent> {
        self.core.events()
    }
    /// The clock the server reads (without the offset knob).
    pub fn clock(&self) -> &SharedClock {
        &self.core.clock
    }
    /// Revoke every token issued so far, now.
    pub fn revoke_all_tokens(&self) {
        self.core.knobs.revoke_all_tokens();
    }

    /// Register a client directly (a pre-registered client).
    ///
    /// # Errors
    /// [`FixtureError::Registration`] when a client with that id already exists.
    pub fn register_client(&self, spec: ClientSpec) -> Result<RegisteredClient, FixtureError> {
        if let Some(id) = &spec.client_id
            && self.core.client(id).is_some()
        {
            return Err(FixtureError::Registration(format!("client {id} already exists")));
        }
        let method = match spec.auth {
            ClientAuth::None => AuthMethod::None,
            ClientAuth::ClientSecretBasic => AuthMethod::Basic,
            ClientAuth::ClientSecretPost => AuthMethod::Post,
        };
        Ok(self.core.register(
            method,
            spec.redirect_uris,
            spec.grant_types,
            spec.name,
            (spec.client_id, spec.client_secret),
            false,
        ))
    }

    /// Mint an access and refresh token for `client_id` without HTTP, as if an authorization
    /// had completed. `scope` is space separated; `resource` binds the token to a resource.
    pub fn issue_tokens(
        &self,
        client_id: &str,
        scope: &str,
        resource: Option<&str>,
    ) -> IssuedTokens {
        self.core.mint(client_id, split_scope(Some(scope)), resource.map(str::to_owned))
    }

    /// The authorization requests waiting for a decision ([`Approval::Manual`](crate::Approval::Manual)).
    pub fn pending_authorizations(&self) -> Vec<PendingAuthorization> {
        self.core.pending()
    }

    /// Wait until at least one authorization request is pending, and return them.
    pub async fn wait_for_pending_authorization(&self) -> Vec<PendingAuthorization> {
        loop {
            let notified = self.core.pending_changed.notified();
            let pending = self.core.pending();
            if !pending.is_empty() {
                return pending;
            }
            // Re-check now and then: a browser that gave up leaves nothing to notify.
            let _ = mcp_clock::within(&mcp_clock::SystemClock, Duration::from_millis(50), notified)
                .await;
        }
    }

    /// Approve every pending authorization request; how many there were.
    ///
    /// # Errors
    /// [`FixtureError::NoPendingAuthorization`] when none is waiting.
    pub fn approve_pending(&self) -> Result<usize, FixtureError> {
        match self.core.decide_pending(true) {
            0 => Err(FixtureError::NoPendingAuthorization),
            n => Ok(n),
        }
    }

    /// Deny every pending authorization request; how many there were.
    ///
    /// # Errors
    /// [`FixtureError::NoPendingAuthorization`] when none is waiting.
    pub fn deny_pending(&self) -> Result<usize, FixtureError> {
        match self.core.decide_pending(false) {
            0 => Err(FixtureError::NoPendingAuthorization),
            n => Ok(n),
        }
    }

    /// Stop the server and wait for it to finish. Hung and pending requests are answered 503.
    ///
    /// # Errors
    /// [`FixtureError::Server`] when the server task panicked.
    pub async fn shutdown(mut self) -> Result<(), FixtureError> {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.await.map_err(|e| FixtureError::Server(Box::new(e)))?;
        }
        Ok(())
    }
}

impl Drop for AuthServerHandle {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
