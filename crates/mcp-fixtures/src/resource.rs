//! The MCP resource server fixture: an rmcp streamable-HTTP server behind bearer authentication.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{ProtocolVersion, ServerCapabilities, ServerConfig};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ServerHandler, schemars, tool, tool_handler, tool_router};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::auth::{AuthMethod, AuthServerHandle, Core, TokenProblem};
use crate::dpop::{DpopChecker, DpopRefusal};
use crate::error::FixtureError;
use crate::secret::RegisteredClient;
use crate::stats::{PostRecord, ResourceStats};

/// Largest JSON-RPC body the scope check reads.
const MAX_BODY: usize = 4 * 1024 * 1024;

#[derive(Debug, Default)]
struct Shared {
    counter: AtomicU64,
    stats: Mutex<ResourceStats>,
    /// The authorization server this resource moved to
    /// ([`ResourceServerHandle::switch_authorization_server`]): its metadata names it and its
    /// tokens are the ones accepted.
    moved_to: std::sync::RwLock<Option<Arc<Core>>>,
    /// The protected resource metadata document as served.
    prm: std::sync::RwLock<Value>,
}

impl Shared {
    fn stats(&self) -> std::sync::MutexGuard<'_, ResourceStats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn tool_called(&self, name: &str) {
        *self.stats().tool_calls.entry(name.to_owned()).or_insert(0) += 1;
    }
}

#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
struct EchoArgs {
    /// The text to send back.
    text: String,
}

#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
struct SlowArgs {
    /// How long to sleep, in milliseconds.
    ms: u64,
}

/// The MCP server: tools `echo`, `slow` and `counter`.
#[derive(Debug, Clone)]
struct FixtureTools {
    shared: Arc<Shared>,
    /// The protocol revisions it speaks.
    versions: Arc<[ProtocolVersion]>,
    #[allow(dead_code)] // Read by the code that `tool_handler` generates.
    tool_router: ToolRouter<Self>,
}

#[tool_router]
impl FixtureTools {
    fn new(shared: Arc<Shared>, versions: Arc<[ProtocolVersion]>) -> Self {
        FixtureTools { shared, versions, tool_router: Self::tool_router() }
    }

    #[tool(description = "Send the text back.")]
    fn echo(&self, Parameters(EchoArgs { text }): Parameters<EchoArgs>) -> String {
        self.shared.tool_called("echo");
        text
    }

    #[tool(description = "Sleep for `ms` milliseconds, then answer.")]
    async fn slow(&self, Parameters(SlowArgs { ms }): Parameters<SlowArgs>) -> String {
        self.shared.tool_called("slow");
        // Real time, like a real server's work.
        mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(ms)).await;
        format!("slept {ms} ms")
    }

    #[tool(description = "Add one to a counter shared by every session, and return it.")]
    fn counter(&self) -> String {
        self.shared.tool_called("counter");
        (self.shared.counter.fetch_add(1, Ordering::SeqCst) + 1).to_string()
    }
}

#[tool_handler]
impl ServerHandler for FixtureTools {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_instructions("mcp-fixtures resource server: tools echo, slow, counter")
    }

    fn supported_protocol_versions(&self) -> std::borrow::Cow<'static, [ProtocolVersion]> {
        std::borrow::Cow::Owned(self.versions.to_vec())
    }
}

/// The revisions the fixture speaks unless told otherwise: every one with an `initialize`
/// handshake (2024-11-05 to 2025-11-25), not 2026-07-28.
fn legacy_versions() -> Vec<String> {
    ProtocolVersion::KNOWN_VERSIONS
        .iter()
        .filter(|v| v.has_initialize())
        .map(|v| v.as_str().to_owned())
        .collect()
}

/// The MCP resource server fixture. Start one with [`ResourceServer::builder`].
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), mcp_fixtures::FixtureError> {
/// use mcp_fixtures::{AuthServer, ResourceServer};
///
/// let auth = AuthServer::builder().spawn().await?;
/// let rs = ResourceServer::builder(&auth)
///     .required_scopes(["mcp:read"])
///     .tool_scopes("echo", ["mcp:write"])
///     .anonymous_initialize(true)
///     .spawn()
///     .await?;
/// assert!(rs.url().ends_with("/mcp"));
/// assert!(rs.resource_metadata_url().ends_with("/.well-known/oauth-protected-resource/mcp"));
/// assert_eq!(rs.counter(), 0);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct ResourceServer;

impl ResourceServer {
    /// A builder for a resource server that trusts `auth`, validating tokens in process.
    ///
    /// Defaults: MCP endpoint `/mcp`; the protocol revisions up to 2025-11-25 (the
    /// `initialize` handshake; see [`ResourceServerBuilder::protocol_versions`]); every request
    /// needs `mcp:tools`; the `counter` tool also
    /// needs `mcp:write`; protected-resource metadata at both the path-based and the root
    /// well-known URL; `scopes_supported` copied from the authorization server.
    pub fn builder(auth: &AuthServerHandle) -> ResourceServerBuilder {
        ResourceServerBuilder {
            core: auth.core.clone(),
            issuer: auth.issuer().to_owned(),
            port: 0,
            path: "/mcp".into(),
            required_scopes: vec!["mcp:tools".into()],
            tool_scopes: HashMap::from([("counter".to_owned(), vec!["mcp:write".to_owned()])]),
            scopes_supported: Some(auth.scopes_supported().to_vec()),
            path_metadata: true,
            root_metadata: true,
            scope_in_challenge: true,
            anonymous_initialize: false,
            metadata_location: None,
            advertised_resource: None,
            introspection: false,
            introspection_endpoint: auth.introspection_endpoint(),
            protocol_versions: legacy_versions(),
        }
    }
}

/// Configures and starts a [`ResourceServer`].
#[derive(Debug)]
pub struct ResourceServerBuilder {
    core: Arc<Core>,
    issuer: String,
    port: u16,
    path: String,
    required_scopes: Vec<String>,
    tool_scopes: HashMap<String, Vec<String>>,
    scopes_supported: Option<Vec<String>>,
    path_metadata: bool,
    root_metadata: bool,
    scope_in_challenge: bool,
    anonymous_initialize: bool,
    metadata_location: Option<String>,
    advertised_resource: Option<String>,
    introspection: bool,
    introspection_endpoint: String,
    protocol_versions: Vec<String>,
}

impl ResourceServerBuilder {
    /// The MCP protocol revisions the server speaks (default: 2024-11-05 to 2025-11-25).
    /// Include `2026-07-28` for the stateless revision (`server/discover`, per-request `_meta`,
    /// `MCP-Protocol-Version` and `Mcp-Method` on every POST). A POST whose
    /// `MCP-Protocol-Version` header names a revision not listed is refused with 400 and a
    /// JSON-RPC error, as servers of the older revisions do; `initialize` negotiates among the
    /// listed revisions that still have it.
    pub fn protocol_versions<S: Into<String>>(
        mut self,
        versions: impl IntoIterator<Item = S>,
    ) -> Self {
        self.protocol_versions = versions.into_iter().map(Into::into).collect();
        self
    }

    /// Check tokens with RFC 7662 introspection over HTTP instead of in process (default
    /// false). The server registers itself as a confidential client. Introspection does not
    /// say why a token is inactive, so the expired-token status knob does not apply.
    pub fn introspection(mut self, on: bool) -> Self {
        self.introspection = on;
        self
    }

    /// Listen on this loopback port (0, the default: any free port).
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }
    /// The MCP endpoint path (default `/mcp`).
    pub fn path(mut self, path: impl Into<String>) -> Self {
        self.path = path.into();
        self
    }
    /// The scopes every MCP request needs (default `mcp:tools`).
    pub fn required_scopes<S: Into<String>>(mut self, scopes: impl IntoIterator<Item = S>) -> Self {
        self.required_scopes = scopes.into_iter().map(Into::into).collect();
        self
    }
    /// The extra scopes a call to `tool` needs; an empty list removes the requirement.
    pub fn tool_scopes<S: Into<String>>(
        mut self,
        tool: &str,
        scopes: impl IntoIterator<Item = S>,
    ) -> Self {
        let scopes: Vec<String> = scopes.into_iter().map(Into::into).collect();
        if scopes.is_empty() {
            self.tool_scopes.remove(tool);
        } else {
            self.tool_scopes.insert(tool.to_owned(), scopes);
        }
        self
    }
    /// The `scopes_supported` of the protected-resource metadata (`None`: leave it out).
    pub fn scopes_supported<S: Into<String>>(mut self, scopes: Option<Vec<S>>) -> Self {
        self.scopes_supported = scopes.map(|s| s.into_iter().map(Into::into).collect());
        self
    }
    /// Serve the metadata at `/.well-known/oauth-protected-resource<path>` (default true).
    pub fn path_metadata(mut self, on: bool) -> Self {
        self.path_metadata = on;
        self
    }
    /// Serve the metadata at `/.well-known/oauth-protected-resource` (default true).
    pub fn root_metadata(mut self, on: bool) -> Self {
        self.root_metadata = on;
        self
    }
    /// Put `scope="..."` in 401 challenges (default true).
    pub fn scope_in_challenge(mut self, on: bool) -> Self {
        self.scope_in_challenge = on;
        self
    }

    /// Let `initialize` and notifications through without a token (default false), so the
    /// first 401 comes on `tools/list` or a tool call, as some servers do.
    pub fn anonymous_initialize(mut self, on: bool) -> Self {
        self.anonymous_initialize = on;
        self
    }

    /// Also serve the metadata at this custom path (such as `/custom/metadata/location.json`)
    /// and name it in challenges; only the `WWW-Authenticate` header leads a client there.
    pub fn metadata_location(mut self, path: impl Into<String>) -> Self {
        self.metadata_location = Some(path.into());
        self
    }

    /// Advertise this `resource` in the metadata instead of the real URL, to test that a
    /// client refuses a resource that does not match the server it talks to.
    pub fn advertised_resource(mut self, resource: impl Into<String>) -> Self {
        self.advertised_resource = Some(resource.into());
        self
    }

    /// Bind 127.0.0.1 and start serving.
    ///
    /// # Errors
    /// [`FixtureError::Bind`] when the port is taken; [`FixtureError::InvalidConfig`] for a
    /// path without a leading `/`.
    pub async fn spawn(self) -> Result<ResourceServerHandle, FixtureError> {
        if self.metadata_location.as_ref().is_some_and(|p| !p.starts_with('/')) {
            return Err(FixtureError::InvalidConfig(
                "the metadata location must start with '/'".into(),
            ));
        }
        let versions: Vec<ProtocolVersion> = self
            .protocol_versions
            .iter()
            .map(|v| serde_json::from_value(Value::String(v.clone())))
            .collect::<Result<_, _>>()
            .map_err(|e| FixtureError::InvalidConfig(format!("protocol version: {e}")))?;
        if versions.is_empty() {
            return Err(FixtureError::InvalidConfig("no protocol version".into()));
        }
        if !self.path.starts_with('/') || self.path.len() < 2 {
            return Err(FixtureError::InvalidConfig(
                "the MCP path must start with '/' and name something".into(),
            ));
        }
        let listener = TcpListener::bind(("127.0.0.1", self.port))
            .await
            .map_err(|source| FixtureError::Bind { port: self.port, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| FixtureError::Bind { port: self.port, source })?;
        let base_url = format!("http://{addr}");
        let url = format!("{base_url}{}", self.path);
        let metadata_url = if let Some(custom) = &self.metadata_location {
            format!("{base_url}{custom}")
        } else if self.path_metadata || !self.root_metadata {
            format!("{base_url}/.well-known/oauth-protected-resource{}", self.path)
        } else {
            format!("{base_url}/.well-known/oauth-protected-resource")
        };
        let shared = Arc::new(Shared::default());
        let shutdown = CancellationToken::new();
        let validation = if self.introspection {
            let client = self.core.register(
                AuthMethod::Basic,
                Vec::new(),
                Vec::new(),
                Some("mcp-fixtures resource server".into()),
                (None, None),
                false,
            );
            let http = reqwest::Client::builder()
                .no_proxy()
                .build()
                .map_err(|e| FixtureError::Server(Box::new(e)))?;
            Validation::Introspection {
                endpoint: self.introspection_endpoint.clone(),
                client,
                http,
            }
        } else {
            Validation::InProcess
        };

        let mut prm = json!({
            "resource": self.advertised_resource.clone().unwrap_or_else(|| url.clone()),
            "authorization_servers": [self.issuer],
            "bearer_methods_supported": ["header"],
            "resource_name": "mcp-fixtures",
        });
        if let Some(scopes) = &self.scopes_supported {
            prm["scopes_supported"] = scopes.clone().into();
        }
        *shared.prm.write().unwrap_or_else(|e| e.into_inner()) = prm;
        let guard = Arc::new(Guard {
            core: self.core,
            resource: url.clone(),
            metadata_url: metadata_url.clone(),
            required: self.required_scopes,
            tool_scopes: self.tool_scopes,
            scope_in_challenge: self.scope_in_challenge,
            anonymous_initialize: self.anonymous_initialize,
            validation,
            shared: shared.clone(),
            versions: self.protocol_versions,
            dpop: DpopChecker::new(),
        });

        let factory_shared = shared.clone();
        let versions: Arc<[ProtocolVersion]> = versions.into();
        let config =
            StreamableHttpServerConfig::default().with_cancellation_token(shutdown.child_token());
        let service: StreamableHttpService<FixtureTools, LocalSessionManager> =
            StreamableHttpService::new(
                move || Ok(FixtureTools::new(factory_shared.clone(), versions.clone())),
                Arc::new(LocalSessionManager::default()),
                config,
            );
        let mcp = Router::new()
            .route_service(&self.path, service)
            .route_layer(middleware::from_fn_with_state(guard, bearer_guard));
        let mut router = Router::new();
        let served = |shared: Arc<Shared>| {
            get(move || {
                let doc = shared.prm.read().unwrap_or_else(|e| e.into_inner()).clone();
                async move { axum::Json(doc) }
            })
        };
        if self.path_metadata {
            router = router.route(
                &format!("/.well-known/oauth-protected-resource{}", self.path),
                served(shared.clone()),
            );
        }
        if let Some(custom) = &self.metadata_location {
            router = router.route(custom, served(shared.clone()));
        }
        if self.root_metadata {
            router = router.route("/.well-known/oauth-protected-resource", served(shared.clone()));
        }
        let router = router.merge(mcp);

        let task = crate::serve::spawn(listener, router, shutdown.clone(), "resource server");
        tracing::debug!(%url, "resource server listening");
        Ok(ResourceServerHandle { url, base_url, metadata_url, shared, shutdown, task: Some(task) })
    }
}

/// A running [`ResourceServer`]. It stops when the handle is dropped or on
/// [`ResourceServerHandle::shutdown`].
#[derive(Debug)]
pub struct ResourceServerHandle {
    url: String,
    base_url: String,
    metadata_url: String,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl ResourceServerHandle {
    /// Move this resource to another authorization server (SEP-2352's migration): from now on
    /// its protected resource metadata names `auth` and it accepts `auth`'s tokens only (tokens
    /// validated in process; the introspection mode keeps its endpoint).
    pub fn switch_authorization_server(&self, auth: &AuthServerHandle) {
        *self.shared.moved_to.write().unwrap_or_else(|e| e.into_inner()) = Some(auth.core.clone());
        self.shared.prm.write().unwrap_or_else(|e| e.into_inner())["authorization_servers"] =
            serde_json::json!([auth.issuer()]);
    }

    /// The MCP endpoint, e.g. `http://127.0.0.1:41235/mcp`; also the RFC 8707 resource.
    pub fn url(&self) -> &str {
        &self.url
    }
    /// The origin, `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }
    /// The protected-resource metadata URL that 401 challenges name.
    pub fn resource_metadata_url(&self) -> &str {
        &self.metadata_url
    }
    /// A snapshot of the counters.
    pub fn stats(&self) -> ResourceStats {
        self.shared.stats().clone()
    }
    /// The value of the `counter` tool (how many times it ran).
    pub fn counter(&self) -> u64 {
        self.shared.counter.load(Ordering::SeqCst)
    }
    /// Stop the server and wait for it to finish.
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

impl Drop for ResourceServerHandle {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// How the resource server checks a token.
#[derive(Debug)]
enum Validation {
    /// Ask the authorization server's state directly.
    InProcess,
    /// RFC 7662 introspection over HTTP, as a registered confidential client.
    Introspection { endpoint: String, client: RegisteredClient, http: reqwest::Client },
}

/// What a valid token allows.
#[derive(Debug)]
struct Checked {
    scope: Vec<String>,
    resource: Option<String>,
    /// The DPoP key thumbprint the token is bound to.
    jkt: Option<String>,
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    Unknown,
    Expired,
    Revoked,
    /// Introspection said `active: false` (it does not say why).
    Inactive,
    /// Introspection failed.
    Unreachable,
}

#[derive(Debug)]
struct Guard {
    core: Arc<Core>,
    resource: String,
    metadata_url: String,
    required: Vec<String>,
    tool_scopes: HashMap<String, Vec<String>>,
    scope_in_challenge: bool,
    anonymous_initialize: bool,
    validation: Validation,
    shared: Arc<Shared>,
    versions: Vec<String>,
    /// This server's DPoP proofs and nonce.
    dpop: DpopChecker,
}

impl Guard {
    /// The authorization server whose tokens this resource accepts now.
    fn core(&self) -> Arc<Core> {
        let moved = self.shared.moved_to.read().unwrap_or_else(|e| e.into_inner());
        moved.clone().unwrap_or_else(|| self.core.clone())
    }

    /// Let an accepted request through to the MCP server, unless its `MCP-Protocol-Version`
    /// names a revision this server does not speak: that gets what the SDKs of the older
    /// revisions answer, a 400 with a JSON-RPC error and no id.
    async fn forward(&self, req: Request, next: Next) -> Response {
        let version = req.headers().get("mcp-protocol-version").and_then(|v| v.to_str().ok());
        if let Some(version) = version
            && !self.versions.iter().any(|v| v == version)
        {
            let message = format!("Bad Request: Unsupported protocol version: {version}");
            let body = json!({"jsonrpc": "2.0", "error": {"code": -32000, "message": message}, "id": null});
            return (StatusCode::BAD_REQUEST, axum::Json(body)).into_response();
        }
        next.run(req).await
    }

    async fn check(&self, token: &str) -> Result<Checked, Refusal> {
        let (endpoint, client, http) = match &self.validation {
            Validation::InProcess => {
                return self
                    .core()
                    .check_access(token)
                    .map(|g| Checked { scope: g.scope, resource: g.resource, jkt: g.jkt })
                    .map_err(|p| match p {
                        TokenProblem::Unknown => Refusal::Unknown,
                        TokenProblem::Expired => Refusal::Expired,
                        TokenProblem::Revoked => Refusal::Revoked,
                    });
            }
            Validation::Introspection { endpoint, client, http } => (endpoint, client, http),
        };
        let body = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("token", token)
            .finish();
        let resp = http
            .post(endpoint)
            .basic_auth(client.client_id(), client.client_secret())
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(body)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(|_| Refusal::Unreachable)?;
        if !resp.status().is_success() {
            return Err(Refusal::Unreachable);
        }
        let bytes = resp.bytes().await.map_err(|_| Refusal::Unreachable)?;
        let answer: Value = serde_json::from_slice(&bytes).map_err(|_| Refusal::Unreachable)?;
        let typed = answer["token_type"] == "Bearer" || answer["token_type"] == "DPoP";
        if answer["active"] != Value::Bool(true) || !typed {
            return Err(Refusal::Inactive);
        }
        Ok(Checked {
            scope: crate::auth::split_scope(answer["scope"].as_str()),
            resource: answer["aud"].as_str().map(str::to_owned),
            jkt: answer.pointer("/cnf/jkt").and_then(Value::as_str).map(str::to_owned),
        })
    }

    /// The challenge scheme and its leading parameters: `DPoP algs="ES256"` with the `dpop`
    /// knob on, else `Bearer`.
    fn scheme(&self) -> &'static str {
        if self.core().knobs.get().dpop { "DPoP algs=\"ES256\", " } else { "Bearer " }
    }

    fn unauthorized(&self, status: StatusCode, error: Option<&str>) -> Response {
        self.shared.stats().unauthorized += 1;
        let mut challenge = format!("{}resource_metadata=\"{}\"", self.scheme(), self.metadata_url);
        if self.scope_in_challenge && !self.required.is_empty() {
            challenge.push_str(&format!(", scope=\"{}\"", self.required.join(" ")));
        }
        let mut body = json!({ "error": "invalid_token" });
        if let Some(description) = error {
            challenge.push_str(&format!(
                ", error=\"invalid_token\", error_description=\"{description}\""
            ));
            body["error_description"] = description.into();
        } else {
            body = json!({ "error": "unauthorized", "error_description": "a bearer token is required" });
        }
        if status == StatusCode::UNAUTHORIZED && self.core().knobs.get().omit_challenge {
            return (status, axum::Json(body)).into_response();
        }
        with_challenge(status, &challenge, body)
    }

    fn forbidden(&self, needed: &[String]) -> Response {
        self.shared.stats().forbidden += 1;
        let scope = needed.join(" ");
        let challenge = format!(
            "{}error=\"insufficient_scope\", scope=\"{scope}\", resource_metadata=\"{}\", error_description=\"the token lacks scope {scope}\"",
            self.scheme(),
            self.metadata_url
        );
        let body = json!({ "error": "insufficient_scope", "scope": scope });
        if self.core().knobs.get().omit_forbidden_challenge {
            return (StatusCode::FORBIDDEN, axum::Json(body)).into_response();
        }
        with_challenge(StatusCode::FORBIDDEN, &challenge, body)
    }

    /// RFC 9449 §7: a DPoP-bound token (or any token, with the `dpop` knob on) must come as
    /// `Authorization: DPoP` with a valid proof for this request, carrying this server's nonce,
    /// whose `ath` is the token's hash and whose key is the one the token is bound to.
    /// `None` lets the request through.
    fn dpop_refusal(
        &self,
        req: &Request,
        dpop_scheme: bool,
        token: &str,
        bound: Option<&str>,
    ) -> Option<Response> {
        if !self.core().knobs.get().dpop && bound.is_none() {
            return None;
        }
        let refuse = |error: &str, description: &str| {
            self.shared.stats().dpop_proofs_refused += 1;
            let challenge = format!(
                "DPoP algs=\"ES256\", error=\"{error}\", error_description=\"{description}\", resource_metadata=\"{}\"",
                self.metadata_url
            );
            let body = json!({ "error": error, "error_description": description });
            Some(with_challenge(StatusCode::UNAUTHORIZED, &challenge, body))
        };
        if !dpop_scheme {
            return refuse("invalid_token", "a DPoP-bound token goes in Authorization: DPoP");
        }
        let proof = req.headers().get("dpop").and_then(|v| v.to_str().ok());
        let core = self.core();
        let now = core.now(&core.knobs.get());
        match self.dpop.check(proof, req.method().as_str(), &self.resource, Some(token), now) {
            Ok(jkt) if Some(jkt.as_str()) == bound => {
                self.shared.stats().dpop_accepted += 1;
                None
            }
            Ok(_) => refuse("invalid_token", "the proof is not signed by the token's key"),
            Err(DpopRefusal::UseNonce) => {
                self.shared.stats().dpop_nonce_challenges += 1;
                let challenge = "DPoP algs=\"ES256\", error=\"use_dpop_nonce\", error_description=\"a nonce is required\"";
                let body = json!({ "error": "use_dpop_nonce" });
                let mut resp = with_challenge(StatusCode::UNAUTHORIZED, challenge, body);
                if let Ok(v) = HeaderValue::from_str(self.dpop.nonce()) {
                    resp.headers_mut().insert("dpop-nonce", v);
                }
                Some(resp)
            }
            Err(refusal) => refuse("invalid_dpop_proof", &refusal.to_string()),
        }
    }

    fn audience_ok(&self, resource: Option<&str>) -> bool {
        resource.is_none_or(|r| r.trim_end_matches('/') == self.resource.trim_end_matches('/'))
    }
}

fn with_challenge(status: StatusCode, challenge: &str, body: Value) -> Response {
    let mut resp = (status, axum::Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(challenge) {
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    resp
}

/// The access token of `Authorization: Bearer` or `Authorization: DPoP`, and whether it came
/// as DPoP.
fn access_token(req: &Request) -> Option<(String, bool)> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let dpop = scheme.eq_ignore_ascii_case("dpop");
    ((scheme.eq_ignore_ascii_case("bearer") || dpop) && !token.trim().is_empty())
        .then(|| (token.trim().to_owned(), dpop))
}

/// Names of the tools a JSON-RPC message (or batch) calls.
fn called_tools(message: &Value) -> Vec<String> {
    let one = |m: &Value| {
        (m.get("method").and_then(Value::as_str) == Some("tools/call"))
            .then(|| m.pointer("/params/name").and_then(Value::as_str).map(str::to_owned))
            .flatten()
    };
    match message {
        Value::Array(items) => items.iter().filter_map(one).collect(),
        other => one(other).into_iter().collect(),
    }
}

/// A JSON-RPC message that may pass without a token when anonymous initialize is on.
fn is_handshake(message: &Value) -> bool {
    message
        .get("method")
        .and_then(Value::as_str)
        .is_some_and(|m| m == "initialize" || m.starts_with("notifications/"))
}

async fn bearer_guard(State(guard): State<Arc<Guard>>, req: Request, next: Next) -> Response {
    {
        let mut stats = guard.shared.stats();
        stats.requests += 1;
        for (name, value) in req.headers() {
            if name.as_str().starts_with("x-") {
                let value = String::from_utf8_lossy(value.as_bytes());
                stats.extension_headers.insert(format!("{}: {value}", name.as_str()));
            }
        }
    }
    if let Some(failure) = guard.core().knobs.take_resource_failure() {
        guard.shared.stats().injected_failures += 1;
        return crate::knobs::failure_response(failure);
    }
    let token = access_token(&req);
    let (req, message) = if req.method() == Method::POST {
        let (parts, body) = req.into_parts();
        let Ok(bytes) = axum::body::to_bytes(body, MAX_BODY).await else {
            return (StatusCode::PAYLOAD_TOO_LARGE, "request body too large").into_response();
        };
        let message = serde_json::from_slice::<Value>(&bytes).ok();
        (Request::from_parts(parts, Body::from(bytes)), message)
    } else {
        (req, None)
    };
    if req.method() == Method::POST {
        let header =
            |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let record = PostRecord {
            method: message
                .as_ref()
                .and_then(|m| m.get("method"))
                .and_then(Value::as_str)
                .map(str::to_owned),
            protocol_version: header("mcp-protocol-version"),
            mcp_method: header("mcp-method"),
            with_token: token.is_some(),
            meta_protocol_version: message
                .as_ref()
                .and_then(|m| m.pointer("/params/_meta/io.modelcontextprotocol~1protocolVersion"))
                .and_then(Value::as_str)
                .map(str::to_owned),
        };
        guard.shared.stats().posts.push(record);
    }
    let Some((token, dpop_scheme)) = token else {
        if guard.anonymous_initialize && message.as_ref().is_some_and(is_handshake) {
            return guard.forward(req, next).await;
        }
        return guard.unauthorized(StatusCode::UNAUTHORIZED, None);
    };
    let grant = match guard.check(&token).await {
        Ok(grant) => grant,
        Err(Refusal::Expired) => {
            let status = StatusCode::from_u16(guard.core().knobs.get().expired_token_status)
                .unwrap_or(StatusCode::UNAUTHORIZED);
            return guard.unauthorized(status, Some("the access token expired"));
        }
        Err(Refusal::Revoked) => {
            return guard
                .unauthorized(StatusCode::UNAUTHORIZED, Some("the access token was revoked"));
        }
        Err(Refusal::Unknown) => {
            return guard.unauthorized(StatusCode::UNAUTHORIZED, Some("unknown access token"));
        }
        Err(Refusal::Inactive) => {
            return guard
                .unauthorized(StatusCode::UNAUTHORIZED, Some("the access token is not active"));
        }
        Err(Refusal::Unreachable) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "the authorization server did not answer introspection",
            )
                .into_response();
        }
    };
    if let Some(refused) = guard.dpop_refusal(&req, dpop_scheme, &token, grant.jkt.as_deref()) {
        return refused;
    }
    if !guard.audience_ok(grant.resource.as_deref()) {
        return guard.unauthorized(
            StatusCode::UNAUTHORIZED,
            Some("the access token is for another resource"),
        );
    }
    let lacks = |needed: &[String]| needed.iter().any(|s| !grant.scope.contains(s));
    if lacks(&guard.required) {
        return guard.forbidden(&guard.required);
    }
    for tool in message.as_ref().map(called_tools).unwrap_or_default() {
        if let Some(extra) = guard.tool_scopes.get(&tool)
            && lacks(extra)
        {
            let mut needed = guard.required.clone();
            needed.extend(extra.iter().filter(|s| !guard.required.contains(s)).cloned());
            return guard.forbidden(&needed);
        }
    }
    guard.forward(req, next).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_names_are_found_in_single_messages_and_batches() {
        let single =
            json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"counter"}});
        assert_eq!(called_tools(&single), ["counter"]);
        let batch = json!([single, {"jsonrpc":"2.0","id":2,"method":"tools/list"}]);
        assert_eq!(called_tools(&batch), ["counter"]);
        assert!(called_tools(&json!({"method":"tools/list"})).is_empty());
    }
}
