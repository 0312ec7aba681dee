//! [`Client`]: the commands (`login`, `tools`, `call`, `status`, `logout`, `proxy`) over one
//! store directory, with their errors mapped onto [`Error`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use connection_factory::{
    CallToolResult, Connection, ConnectionFactory, FactoryConfig, OAuthRefresher, Tool,
    callback_router_at,
};
use flow_state::{FlowManager, MemoryStore, SharedStore};
use mcp_clock::{Clock as _, SharedClock, Timestamp};
use mcp_oauth::{ClientConfig, HttpPolicy, OAuthClient, ReqwestHttpClient};
use serde::Serialize;
use token_storage::{SharedTokenStore, TokenKey, TokenSet, TokenStorage};

use crate::error::Error;
use crate::events::{Event, EventLog, RecordingRefresher};
use crate::login::{BrowserHook, LoginOptions};
use crate::store::{LockedSledStore, StoreDir, StoreLocked, StoreUnreadable, chain, find};

/// The first of the derived callback ports ([`callback_port_for`]): each server gets a port
/// of its own from here on, and a dynamically registered client (whose redirect URI names the
/// port) keeps its port from one login to the next.
pub const DEFAULT_CALLBACK_PORT: u16 = 33418;

/// How long to wait for a TCP connection to the server before calling it unreachable.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// The connect timeout of the MCP handshake outside the browser step.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How much longer than the browser step a second process waits for the login lock.
const LOGIN_LOCK_SLACK: Duration = Duration::from_secs(30);

/// Who the tokens are for, and where they are kept.
///
/// ```
/// use mcp_connect::ClientOptions;
/// use std::time::Duration;
///
/// let options = ClientOptions::new("/tmp/my-store").tenant("acme").user("alice").lock_wait(Duration::from_secs(5));
/// assert_eq!(options.store(), std::path::Path::new("/tmp/my-store"));
/// ```
#[derive(Debug, Clone)]
pub struct ClientOptions {
    store: PathBuf,
    tenant: String,
    user: String,
    lock_wait: Duration,
    headers: Vec<(String, connection_factory::Secret)>,
    static_client: Option<crate::flags::StaticClient>,
    scope: Option<String>,
    resource: Option<String>,
    send_resource: bool,
    request_timeout: Duration,
    authorize_params: Vec<(String, String)>,
    ignore_tools: Vec<String>,
    allow_http: bool,
    allow_private_network: bool,
    use_env_proxy: bool,
    client_metadata: serde_json::Map<String, serde_json::Value>,
    client_metadata_url: Option<url::Url>,
    silent: bool,
    workload_identity: Option<WorkloadSource>,
}

/// Where a workload's identity assertion comes from (SEP-1933).
#[derive(Debug, Clone)]
enum WorkloadSource {
    File(PathBuf),
    Env(String),
}

impl ClientOptions {
    /// The store directory `store`, tenant `default`, the user from `$USER` (else `default`),
    /// a 10 s bound on every lock wait.
    pub fn new(store: impl Into<PathBuf>) -> Self {
        ClientOptions {
            store: store.into(),
            tenant: "default".into(),
            user: std::env::var("USER")
                .ok()
                .filter(|u| !u.is_empty())
                .unwrap_or_else(|| "default".into()),
            lock_wait: Duration::from_secs(10),
            headers: Vec::new(),
            static_client: None,
            scope: None,
            resource: None,
            send_resource: true,
            request_timeout: CONNECT_TIMEOUT,
            authorize_params: Vec::new(),
            ignore_tools: Vec::new(),
            allow_http: false,
            allow_private_network: false,
            use_env_proxy: false,
            client_metadata: serde_json::Map::new(),
            client_metadata_url: None,
            silent: false,
            workload_identity: None,
        }
    }

    /// Workload identity (SEP-1933): get tokens with the RFC 7523 jwt-bearer grant and the
    /// assertion in the file at `path` (read again when it changes, as Kubernetes and cloud
    /// platforms rotate them), instead of a browser login; again whenever they expire or are
    /// refused. The client is registered dynamically, or given with
    /// [`ClientOptions::static_client`] (name its `issuer` then).
    pub fn workload_identity_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.workload_identity = Some(WorkloadSource::File(path.into()));
        self
    }

    /// [`ClientOptions::workload_identity_file`] with the assertion in the environment variable
    /// `name` (read at each grant).
    pub fn workload_identity_env(mut self, name: impl Into<String>) -> Self {
        self.workload_identity = Some(WorkloadSource::Env(name.into()));
        self
    }

    /// Use this client registered out of band instead of dynamic registration. Tokens obtained
    /// with it are kept apart from those of other clients for the same server (the stored
    /// server name gets a `#` digest), so pass it to every command for that server.
    pub fn static_client(mut self, client: crate::flags::StaticClient) -> Self {
        self.static_client = Some(client);
        self
    }

    /// Send this RFC 8707 `resource` in authorization and token requests instead of the one the
    /// server's metadata names.
    pub fn resource(mut self, resource: impl Into<String>) -> Self {
        self.resource = Some(resource.into());
        self
    }

    /// Send no `resource` parameter at all (some servers, such as Microsoft Entra, reject it).
    pub fn disable_resource_parameter(mut self) -> Self {
        self.send_resource = false;
        self
    }

    /// Ask for these scopes (space separated) instead of the server's choice. Like
    /// [`ClientOptions::static_client`], this keeps the tokens apart: pass it to every command.
    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        self.scope = Some(scope.into()).filter(|s| !s.trim().is_empty());
        self
    }

    /// Send the header `name: value` with every request to the MCP server (not to the
    /// authorization server). The value is kept as a secret: never printed or logged.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), connection_factory::Secret::new(value.into())));
        self
    }

    /// How long the MCP server may take to answer the handshake (outside the browser step) and
    /// each request before the command fails with [`Error::Timeout`]. Default 30 s.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Add `name=value` to the authorization URL (mcp-remote's `--authorize-param`, e.g.
    /// `prompt=consent`). The protocol's own parameters cannot be replaced.
    ///
    /// # Errors
    /// [`Error::Usage`] when `name` is one the protocol sets itself (`state`, `redirect_uri`,
    /// `scope`, ...; use `--scope` and `--resource` for those two) or empty.
    pub fn authorize_param(
        mut self,
        name: impl Into<String>,
        value: impl Into<String>,
    ) -> Result<Self, Error> {
        let name = name.into();
        if name.is_empty() {
            return Err(Error::Usage("an --authorize-param has an empty name".into()));
        }
        if mcp_oauth::RESERVED_AUTHORIZATION_PARAMS.contains(&name.as_str()) {
            return Err(Error::Usage(format!(
                "--authorize-param cannot set {name:?}: the client sets it itself (use --scope or --resource for those)"
            )));
        }
        self.authorize_params.push((name, value.into()));
        Ok(self)
    }

    /// Hide the tools whose names match `pattern` (`*` for any run of characters, any case):
    /// `tools` does not list them, `call` refuses them, and `proxy` removes them from the host's
    /// `tools/list` and answers a call of one with an error without sending it.
    pub fn ignore_tool(mut self, pattern: impl Into<String>) -> Self {
        self.ignore_tools.push(pattern.into());
        self
    }

    /// Let the OAuth side use plain `http` to hosts that are not loopback (mcp-remote's
    /// `--allow-http`): tokens and secrets then cross the network in the clear.
    pub fn allow_http(mut self) -> Self {
        self.allow_http = true;
        self
    }

    /// Let discovery and the OAuth requests reach private (`10/8`, `172.16/12`, `192.168/16`,
    /// `fc00::/7`), CGNAT (`100.64/10`, Tailscale) and link-local addresses, which are refused
    /// by default. Cloud metadata addresses stay refused.
    pub fn allow_private_network(mut self) -> Self {
        self.allow_private_network = true;
        self
    }

    /// Send the OAuth and the MCP requests through the proxy named by `HTTPS_PROXY` /
    /// `HTTP_PROXY` / `ALL_PROXY` (minus `NO_PROXY`), as mcp-remote's `--enable-proxy` does; the
    /// direct reachability probe of the server is skipped.
    pub fn enable_proxy(mut self) -> Self {
        self.use_env_proxy = true;
        self
    }

    /// More RFC 7591 client metadata for dynamic registration (mcp-remote's
    /// `--static-oauth-client-metadata`); see [`parse_client_metadata`](crate::parse_client_metadata).
    pub fn client_metadata(mut self, metadata: serde_json::Map<String, serde_json::Value>) -> Self {
        self.client_metadata = metadata;
        self
    }

    /// Identify as the client whose metadata document is at `url` (a client ID metadata
    /// document, mcp-remote's `--client-metadata-url`) where the authorization server supports
    /// them; its `redirect_uris` must name the callback (`http://127.0.0.1:PORT/callback`).
    ///
    /// # Errors
    /// [`Error::Usage`] unless `url` is https (or http on loopback) with a path.
    pub fn client_metadata_url(mut self, url: &str) -> Result<Self, Error> {
        let parsed = url::Url::parse(url)
            .map_err(|e| Error::Usage(format!("--client-metadata-url {url:?}: {e}")))?;
        let loopback = matches!(parsed.host_str(), Some("127.0.0.1" | "localhost" | "[::1]"));
        if !(parsed.scheme() == "https" || (parsed.scheme() == "http" && loopback))
            || parsed.path() == "/"
        {
            return Err(Error::Usage(format!(
                "--client-metadata-url {url:?}: must be an https URL with a path"
            )));
        }
        self.client_metadata_url = Some(parsed);
        Ok(self)
    }

    /// No notices on stderr (mcp-remote's `--silent`): only errors, and the authorization URL
    /// when no browser could be opened for it.
    pub fn silent(mut self) -> Self {
        self.silent = true;
        self
    }

    /// Whether requests go through the environment's proxy.
    pub(crate) fn uses_env_proxy(&self) -> bool {
        self.use_env_proxy
    }

    /// Whether a `--header` gives the `Authorization` itself (an API key, a token from
    /// elsewhere): then mcp-connect sends it as given and does no OAuth for the server.
    pub(crate) fn user_authorization(&self) -> bool {
        self.headers.iter().any(|(name, _)| name.trim().eq_ignore_ascii_case("authorization"))
    }

    /// The HTTP policy of the OAuth side.
    pub(crate) fn http_policy(&self) -> HttpPolicy {
        let mut policy = HttpPolicy::default();
        policy.ssrf.allow_http = self.allow_http;
        policy.ssrf.allow_private = self.allow_private_network;
        policy.ssrf.allow_link_local = self.allow_private_network;
        policy.use_env_proxy = self.use_env_proxy;
        policy
    }

    /// The tenant the tokens belong to.
    pub fn tenant(mut self, tenant: impl Into<String>) -> Self {
        self.tenant = tenant.into();
        self
    }

    /// The user the tokens belong to.
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = user.into();
        self
    }

    /// How long to wait for the store lock (and a peer's refresh) before failing with
    /// [`Error::StoreLocked`].
    pub fn lock_wait(mut self, wait: Duration) -> Self {
        self.lock_wait = wait;
        self
    }

    /// The store directory.
    pub fn store(&self) -> &Path {
        &self.store
    }

    /// The `resource` given instead of the discovered one.
    pub(crate) fn resource_override(&self) -> Option<&str> {
        self.resource.as_deref()
    }
}

/// The default store directory: `$XDG_DATA_HOME/mcp-connect`, else
/// `$HOME/.local/share/mcp-connect`, else `./.mcp-connect`.
///
/// ```
/// assert!(mcp_connect::default_store_dir().ends_with("mcp-connect") || mcp_connect::default_store_dir().ends_with(".mcp-connect"));
/// ```
pub fn default_store_dir() -> PathBuf {
    if let Some(data) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(data).join("mcp-connect");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(home).join(".local/share/mcp-connect");
    }
    PathBuf::from(".mcp-connect")
}

/// What `login` did.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct LoginReport {
    /// The server URL.
    pub server: String,
    /// Whether the user went through the browser (false: valid tokens were already stored, or
    /// another process logged in meanwhile).
    pub prompted: bool,
    /// The server's status after login.
    pub status: ServerStatus,
}

/// What is stored for one server. Never a secret.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct ServerStatus {
    /// The server URL.
    pub server: String,
    /// The issuer the tokens come from.
    pub issuer: Option<String>,
    /// The registered client id.
    pub client_id: Option<String>,
    /// When the access token expires (Unix seconds), if known.
    pub expires_at: Option<u64>,
    /// Seconds until the access token expires (negative: expired), if known.
    pub expires_in: Option<i64>,
    /// Whether a refresh token is held.
    pub has_refresh_token: bool,
    /// Why a new login is needed, when it is.
    pub needs_login: Option<String>,
    /// The newest event of this server's credentials (see [`Client::why`]).
    pub last_event: Option<Event>,
}

/// What `logout` did.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct LogoutReport {
    /// The server URL.
    pub server: String,
    /// `revoked`, `no_endpoint` (the server offers no revocation), `nothing_to_revoke`, or
    /// `failed: <why>`.
    pub revocation: String,
    /// Whether anything was stored (and is deleted now).
    pub deleted: bool,
}

/// Returned by [`Client::settle`]: while it lives, no refresh of this store redeems a refresh
/// token. Keep it until the process exits.
#[derive(Debug)]
#[must_use = "refreshes may start again once it is dropped"]
pub struct Settled {
    _leases: Vec<crate::store::FileLock>,
}

/// A server URL and its token key.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) url: url::Url,
    pub(crate) key: TokenKey,
}

impl Target {
    pub(crate) fn as_str(&self) -> &str {
        self.url.as_str()
    }
}

/// The commands over one store directory. Cheap to clone.
///
/// ```no_run
/// # async fn demo() -> Result<(), mcp_connect::Error> {
/// use mcp_connect::{Client, ClientOptions, LoginOptions};
///
/// let client = Client::open(ClientOptions::new(mcp_connect::default_store_dir())).await?;
/// client.login("https://mcp.example.com/mcp", &LoginOptions::default()).await?;
/// for tool in client.tools("https://mcp.example.com/mcp").await? {
///     println!("{}", tool.name);
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Client {
    options: ClientOptions,
    dir: StoreDir,
    oauth: OAuthClient,
    storage: TokenStorage,
    flows: FlowManager,
    clock: SharedClock,
    tools: Arc<crate::ignore::ToolFilter>,
    events: EventLog,
}

impl Client {
    /// Open (or create) the store directory and its key.
    ///
    /// # Errors
    /// [`Error::StoreLocked`], [`Error::StoreCorrupted`] (an unreadable key file) or
    /// [`Error::Store`]; [`Error::Usage`] for a header HTTP does not allow.
    pub async fn open(options: ClientOptions) -> Result<Self, Error> {
        let root = options.store.clone();
        let clock = SharedClock::system();
        let dir = StoreDir::open(root.clone(), options.lock_wait, clock.clone(), options.silent)
            .map_err(|e| store_error(&root, &e))?;
        let keys = dir.keyring().await.map_err(|e| store_error(&root, &e))?;
        let http = ReqwestHttpClient::new(options.http_policy())
            .map_err(|e| Error::Mcp(format!("cannot build the HTTP client: {e}")))?
            .with_clock(clock.clone());
        let oauth = OAuthClient::new(http, clock.clone()).with_config(mcp_oauth::OAuthConfig {
            send_resource: options.send_resource,
            resource_override: options.resource.clone(),
            extra_authorization_params: options.authorize_params.clone(),
            allow_insecure_http: options.allow_http,
            allow_internal_endpoints: options.allow_private_network,
            ..mcp_oauth::OAuthConfig::default()
        });
        let events = EventLog::new(root.join("events.log"), clock.clone());
        let refresher =
            RecordingRefresher::new(Arc::new(OAuthRefresher::new(oauth.clone())), events.clone());
        let storage = TokenStorage::builder(
            SharedTokenStore::new(LockedSledStore::new(dir.clone())),
            Arc::new(keys),
            Arc::new(refresher),
        )
        .clock(clock.clone())
        .lease(dir.refresh_lease())
        .build();
        let flows = FlowManager::builder(SharedStore::new(MemoryStore::new()))
            .clock(clock.clone())
            .build()
            .map_err(|e| Error::Mcp(format!("cannot build the flow manager: {e}")))?;
        let tools = Arc::new(crate::ignore::ToolFilter::new(options.ignore_tools.clone()));
        let client = Client { options, dir, oauth, storage, flows, clock, tools, events };
        // A bad header is invalid input before anything else happens.
        client.header_map()?;
        Ok(client)
    }

    /// Call before the process exits: waits (bounded by the lock wait) for refreshes in flight
    /// to store their result, and holds every refresh lease of the store until the returned
    /// guard is dropped, so that no refresh token is redeemed by a task that the exit would cut
    /// off before it stores the rotated token (a lost refresh token).
    ///
    /// A refresh of a key that has never been refreshed before, starting during this call, is
    /// not covered.
    pub async fn settle(&self) -> Settled {
        Settled { _leases: self.dir.hold_refresh_leases().await }
    }

    /// The `--header`s with their values (for mcp-remote's file names; never printed).
    pub(crate) fn header_values(&self) -> Vec<(String, String)> {
        self.options.headers.iter().map(|(n, v)| (n.clone(), v.expose().to_owned())).collect()
    }

    pub(crate) fn oauth(&self) -> &OAuthClient {
        &self.oauth
    }

    pub(crate) fn storage(&self) -> &TokenStorage {
        &self.storage
    }

    pub(crate) fn events(&self) -> &EventLog {
        &self.events
    }

    pub(crate) fn clock(&self) -> &SharedClock {
        &self.clock
    }

    /// The `--ignore-tool` filter.
    pub(crate) fn tool_filter(&self) -> &crate::ignore::ToolFilter {
        &self.tools
    }

    /// The options this client was opened with.
    pub fn options(&self) -> &ClientOptions {
        &self.options
    }

    pub(crate) fn target(&self, url: &str) -> Result<Target, Error> {
        let parsed =
            url::Url::parse(url).map_err(|e| Error::Usage(format!("{url:?} is not a URL: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
            return Err(Error::Usage(format!("{url:?} is not an http(s) URL")));
        }
        // The factory's key: the URL, plus a digest when a static client or scopes are given.
        let key = self.config_for(parsed.as_str()).token_key();
        Ok(Target { url: parsed, key })
    }

    fn store_err(&self) -> impl Fn(token_storage::Error) -> Error + '_ {
        move |e| store_error(&self.options.store, &e)
    }

    /// Is anything listening at the server's address? (Not asked through a proxy: the proxy
    /// may be the only way there.)
    async fn probe(&self, target: &Target) -> Result<(), Error> {
        if self.options.use_env_proxy {
            return Ok(());
        }
        let unreachable =
            |reason: String| Error::Unreachable { url: target.as_str().to_owned(), reason };
        let addrs = target.url.socket_addrs(|| None).map_err(|e| unreachable(e.to_string()))?;
        let mut last = String::from("no address");
        for addr in addrs {
            let connected =
                mcp_clock::within(&self.clock, PROBE_TIMEOUT, tokio::net::TcpStream::connect(addr));
            match connected.await {
                Some(Ok(_)) => return Ok(()),
                Some(Err(e)) => last = format!("{addr}: {e}"),
                None => last = format!("{addr}: no answer within {PROBE_TIMEOUT:?}"),
            }
        }
        Err(unreachable(last))
    }

    /// Read what is stored for `target`: store trouble surfaces here, typed, before any
    /// network call.
    async fn stored(
        &self,
        target: &Target,
    ) -> Result<(Option<Arc<TokenSet>>, Option<token_storage::ClientRegistration>), Error> {
        let tokens = self.storage.tokens(&target.key).await.map_err(self.store_err())?;
        let client = self.storage.client(&target.key).await.map_err(self.store_err())?;
        Ok((tokens, client))
    }

    fn usable(&self, tokens: Option<&TokenSet>, client_stored: bool) -> bool {
        let now = self.clock.now();
        client_stored
            && tokens.is_some_and(|t| {
                t.needs_authorization().is_none()
                    && (t.refresh_token().is_some() || t.expires_at().is_none_or(|at| at > now))
            })
    }

    fn factory_config(&self, target: &Target) -> FactoryConfig {
        self.config_for(target.as_str())
    }

    fn config_for(&self, url: &str) -> FactoryConfig {
        let mut config =
            FactoryConfig::new(url, self.options.tenant.as_str(), self.options.user.as_str(), url)
                .connect_timeout(self.options.request_timeout)
                .request_timeout(self.options.request_timeout)
                .env_proxy(self.options.use_env_proxy);
        for (name, value) in &self.options.headers {
            config = config.header(name.clone(), value.clone());
        }
        if let Some(scope) = &self.options.scope {
            config = config.scopes(scope.clone());
        }
        if self.options.static_client.is_some()
            || self.options.client_metadata_url.is_some()
            || self.options.workload_identity.is_some()
        {
            // Only the interactive flow (login) uses the redirect URI; the client's identity
            // is part of the token key for every command. A workload registers with it too
            // (its grant runs wherever a command needs tokens).
            // The issuer is not needed here (the key digest names the client id only); a login
            // binds the credentials to an issuer (`static_issuer`).
            config =
                config.client(self.client_config(
                    format!("http://127.0.0.1:{DEFAULT_CALLBACK_PORT}/callback"),
                    "",
                ));
        }
        config
    }

    /// How this client identifies itself at the authorization server for a login.
    fn client_config(&self, redirect: String, issuer: &str) -> ClientConfig {
        let mut config = ClientConfig::new("mcp-connect", redirect);
        config.extra_metadata = self.options.client_metadata.clone();
        config.metadata_document_url = self.options.client_metadata_url.clone();
        if let Some(client) = &self.options.static_client {
            config.pre_registered = Some(mcp_oauth::PreRegisteredClient {
                issuer: issuer.to_owned(),
                client_id: client.client_id.clone(),
                client_secret: client.client_secret.as_deref().map(mcp_oauth::ClientSecret::new),
                client_key: None,
                auth_method: None,
            });
        }
        config
    }

    /// The issuer `--static-oauth-client-info` credentials are presented to: the `issuer` the
    /// JSON names, or else the authorization server this MCP server names at login (trust on
    /// first use, as mcp-remote binds them to the server). The stored registration keeps that
    /// issuer, and mcp-oauth refuses to present its credentials to another (SEP-2352).
    async fn static_issuer(&self, target: &Target) -> Result<String, Error> {
        let Some(client) = &self.options.static_client else { return Ok(String::new()) };
        if let Some(issuer) = &client.issuer {
            return Ok(issuer.clone());
        }
        let discovery = self.oauth.discover(&target.url, None).await.map_err(|e| {
            Error::Authorization(format!(
                "cannot find the authorization server of {} for --static-oauth-client-info: {}",
                target.as_str(),
                crate::store::chain(&e)
            ))
        })?;
        Ok(discovery.issuer().to_owned())
    }

    /// The `--header`s as rmcp's transport takes them (the proxy builds its own transport).
    pub(crate) fn header_map(
        &self,
    ) -> Result<
        std::collections::HashMap<reqwest::header::HeaderName, reqwest::header::HeaderValue>,
        Error,
    > {
        connection_factory::header_map(&self.options.headers).map_err(|e| match e {
            connection_factory::Error::InvalidConfig(m) => Error::Usage(m),
            other => Error::Usage(chain(&other)),
        })
    }

    /// A factory without an interactive flow: a refused refresh ends in
    /// [`Error::NotLoggedIn`].
    pub(crate) fn factory(&self) -> Result<ConnectionFactory, connection_factory::Error> {
        let factory = ConnectionFactory::new(self.flows.clone(), self.storage.clone())?;
        Ok(match &self.options.workload_identity {
            Some(WorkloadSource::File(path)) => factory.with_workload_identity(
                self.oauth.clone(),
                mcp_oauth::WorkloadIdentity::from_file(path),
            ),
            Some(WorkloadSource::Env(name)) => factory.with_workload_identity(
                self.oauth.clone(),
                mcp_oauth::WorkloadIdentity::from_env(name),
            ),
            None => factory,
        })
    }

    pub(crate) fn provider(
        &self,
        target: &Target,
    ) -> Result<Arc<dyn connection_factory::AuthProvider>, Error> {
        if self.options.user_authorization() {
            return Ok(Arc::new(UserAuthorization));
        }
        let provider = self
            .factory()
            .and_then(|factory| factory.provider(self.factory_config(target)))
            .map_err(|e| connect_error(target, e))?;
        Ok(provider)
    }

    /// Discovery, registration and authorization in the browser for `url`, unless usable
    /// tokens are stored (then the session is only checked). One process at a time runs the
    /// browser step for a server; another one waits for it and then uses its tokens.
    ///
    /// # Errors
    /// [`Error::Unreachable`], [`Error::NotMcp`], [`Error::RegistrationRefused`],
    /// [`Error::Authorization`], [`Error::BrowserTimeout`], store errors.
    pub async fn login(&self, url: &str, options: &LoginOptions) -> Result<LoginReport, Error> {
        let target = self.target(url)?;
        if self.options.user_authorization() {
            return Err(Error::Usage(
                "a --header 'Authorization: ...' is the credentials itself: there is nothing to log in (drop the header to log in with OAuth)".into(),
            ));
        }
        if self.options.workload_identity.is_some() {
            // No browser: the first request's 401 runs the workload's grant.
            let conn = self.connect(&target).await?;
            let _ = conn.close().await;
            let status = self.status_of(&target.key).await?;
            return Ok(LoginReport { server: target.as_str().to_owned(), prompted: false, status });
        }
        self.probe(&target).await?;
        self.stored(&target).await?;
        let _lock = self.login_lock(&target, options).await?;
        self.login_locked(&target, options, false).await
    }

    async fn login_lock(
        &self,
        target: &Target,
        options: &LoginOptions,
    ) -> Result<crate::store::FileLock, Error> {
        self.dir
            .lock_login(&target.key, options.timeout + LOGIN_LOCK_SLACK)
            .await
            .map_err(self.store_err())
    }

    /// Make sure usable tokens are stored for `target`, logging in (under the login lock) if
    /// not. Whether this process prompted.
    pub(crate) async fn ensure_authorized(
        &self,
        target: &Target,
        options: &LoginOptions,
    ) -> Result<bool, Error> {
        let (tokens, client) = self.stored(target).await?;
        if self.usable(tokens.as_deref(), client.is_some()) {
            return Ok(false);
        }
        self.probe(target).await?;
        let _lock = self.login_lock(target, options).await?;
        // A peer may have logged in while this process waited for the lock.
        let (tokens, client) = self.stored(target).await?;
        if self.usable(tokens.as_deref(), client.is_some()) {
            tracing::info!(server = target.as_str(), "another process logged in");
            return Ok(false);
        }
        Ok(self.login_locked(target, options, false).await?.prompted)
    }

    /// The login proper, under the login lock. `stale`: the stored authorization is known to
    /// be refused, whatever the store says.
    async fn login_locked(
        &self,
        target: &Target,
        options: &LoginOptions,
        stale: bool,
    ) -> Result<LoginReport, Error> {
        let (tokens, client) = self.stored(target).await?;
        let listener = callback_listener(target, options, client.as_ref()).await?;
        let port = listener
            .local_addr()
            .map_err(|e| Error::Usage(format!("cannot read the callback address: {e}")))?
            .port();
        let redirect = options.redirect_uri(port);
        // A client registered for another callback port cannot complete this login: register
        // again (only when there are no usable tokens that make the browser step unneeded).
        if let Some(client) = &client
            && !client.redirect_uris.is_empty()
            && !client.redirect_uris.contains(&redirect)
            && (stale || !self.usable(tokens.as_deref(), true))
        {
            self.storage.delete_client(&target.key).await.map_err(self.store_err())?;
        }
        let router = callback_router_at(
            &options.callback_path,
            self.flows.clone(),
            self.storage.clone(),
            self.oauth.clone(),
        );
        let server = tokio::spawn(async move { axum::serve(listener, router).await });
        let hook = Arc::new(BrowserHook::new(options.clone(), self.clock.clone()));
        let factory = self
            .factory()
            .map_err(|e| connect_error(target, e))?
            .with_interactive(self.oauth.clone(), hook.clone());
        let client_before = client.as_ref().map(|c| c.client_id.clone());
        let issuer = self.static_issuer(target).await?;
        let config = self
            .factory_config(target)
            .client(self.client_config(redirect.clone(), &issuer))
            .oauth_wait_timeout(options.timeout)
            .connect_timeout(options.timeout + self.options.request_timeout);
        let result = factory.connect(config).await;
        hook.stop();
        server.abort();
        let result =
            self.explain_not_mcp(target, result.map_err(|e| login_error(target, options, e))).await;
        let conn = result.inspect_err(|e| {
            self.events.record(&target.key, "login", format!("the login failed: {e}"));
        })?;
        let _ = conn.close().await;
        let client_after = self.storage.client(&target.key).await.map_err(self.store_err())?;
        if let Some(after) = &client_after
            && client_before.as_deref() != Some(after.client_id.as_str())
        {
            let how = if self.options.static_client.is_some() {
                "the --static-oauth-client-info client is bound to"
            } else {
                "registered a new client at"
            };
            self.events.record(
                &target.key,
                "registration",
                format!("{how} {} (client id {})", after.issuer, after.client_id),
            );
        }
        if hook.prompted() {
            let why = if stale { " after the authorization was refused" } else { "" };
            self.events.record(&target.key, "login", format!("browser step completed{why}"));
        }
        // The redirect URI is recorded only once the authorization server accepted it for this
        // client (a completed browser step); a login that found usable tokens proved nothing.
        if hook.prompted()
            && let Some(mut client) = client_after
            && !client.redirect_uris.contains(&redirect)
        {
            client.redirect_uris = vec![redirect];
            self.storage.store_client(&target.key, &client).await.map_err(self.store_err())?;
        }
        let status = self.status_of(&target.key).await?;
        Ok(LoginReport { server: target.as_str().to_owned(), prompted: hook.prompted(), status })
    }

    /// Open an MCP session to `target` with the stored tokens (silent refresh on a 401).
    async fn connect(&self, target: &Target) -> Result<Connection, Error> {
        self.probe(target).await?;
        if self.options.user_authorization() {
            return self.connect_as_given(target).await;
        }
        self.stored(target).await?;
        let connected = self
            .factory()
            .map_err(|e| connect_error(target, e))?
            .connect(self.factory_config(target))
            .await
            .map_err(|e| connect_error(target, e));
        let connected = self.explain_not_mcp(target, connected).await;
        self.note(target, connected).await
    }

    /// A request's error; a refusal of the user's own `Authorization` header is named as such.
    fn request_error(&self, target: &Target, e: connection_factory::Error) -> Error {
        match e {
            connection_factory::Error::AuthorizationRequired { .. }
                if self.options.user_authorization() =>
            {
                refused_header(target)
            }
            other => request_error(target, other),
        }
    }

    /// A session whose credentials are the `Authorization` header the user gave: no stored
    /// token, no refresh, no login; a refusal is the user's to fix.
    async fn connect_as_given(&self, target: &Target) -> Result<Connection, Error> {
        let mut options = connection_factory::ConnectOptions::default()
            .connect_timeout(self.options.request_timeout)
            .request_timeout(self.options.request_timeout)
            .clock(self.clock.clone())
            .env_proxy(self.options.use_env_proxy);
        for (name, value) in &self.options.headers {
            options = options.header(name.clone(), value.clone());
        }
        let connected = Connection::connect(target.as_str(), Arc::new(UserAuthorization), options)
            .await
            .map_err(|e| match e {
                connection_factory::Error::AuthorizationRequired { .. } => refused_header(target),
                other => connect_error(target, other),
            });
        self.explain_not_mcp(target, connected).await
    }

    /// A server that does not answer as streamable HTTP may speak the legacy HTTP+SSE
    /// transport (MCP 2024-11-05): say so, instead of "not an MCP server".
    pub(crate) async fn explain_not_mcp<T>(
        &self,
        target: &Target,
        outcome: Result<T, Error>,
    ) -> Result<T, Error> {
        match outcome {
            Err(Error::NotMcp { url, detail })
                if crate::legacy::speaks_legacy_sse(&self.clock, &target.url).await =>
            {
                Err(Error::NotMcp {
                    url,
                    detail: format!(
                        "it speaks the legacy HTTP+SSE transport of MCP 2024-11-05, which mcp-connect does not support; ask for its streamable HTTP endpoint (often /mcp where this is /sse) ({detail})"
                    ),
                })
            }
            other => other,
        }
    }

    /// Record why a command needs a new login (from what the store says now).
    async fn note<T>(&self, target: &Target, outcome: Result<T, Error>) -> Result<T, Error> {
        if let Err(Error::NotLoggedIn { .. }) = &outcome {
            let why = match self.status_of(&target.key).await {
                Ok(status) => status.needs_login.unwrap_or_else(|| {
                    "the server refused the stored authorization and it could not be refreshed"
                        .into()
                }),
                Err(e) => format!("the store could not be read: {e}"),
            };
            self.events.record(&target.key, "login-needed", why);
        }
        outcome
    }

    /// What happened to the credentials of `url`, newest first: logins, registrations, every
    /// refresh request with its outcome and the process that sent it, why a new login was
    /// needed, logouts. Never a secret.
    ///
    /// # Errors
    /// [`Error::Usage`] for a URL that is not http(s).
    pub fn why(&self, url: &str) -> Result<Vec<Event>, Error> {
        let target = self.target(url)?;
        Ok(self.events.of(&target.key))
    }

    /// The server's tools.
    ///
    /// # Errors
    /// [`Error::NotLoggedIn`] when no usable authorization is stored; see [`Client::login`].
    pub async fn tools(&self, url: &str) -> Result<Vec<Tool>, Error> {
        let target = self.target(url)?;
        let conn = self.connect(&target).await?;
        let tools = conn.list_tools().await.map_err(|e| self.request_error(&target, e));
        let _ = conn.close().await;
        let tools = self.note(&target, tools).await;
        let mut tools = tools?;
        tools.retain(|tool| !self.tools.hides(&tool.name));
        Ok(tools)
    }

    /// Call `tool` with `arguments`. A result with `isError` is returned as it is.
    ///
    /// # Errors
    /// As [`Client::tools`].
    pub async fn call(
        &self,
        url: &str,
        tool: &str,
        arguments: Option<serde_json::Map<String, serde_json::Value>>,
    ) -> Result<CallToolResult, Error> {
        let target = self.target(url)?;
        if self.tools.hides(tool) {
            return Err(Error::Usage(format!("the tool {tool:?} is hidden by --ignore-tool")));
        }
        let conn = self.connect(&target).await?;
        let result =
            conn.call_tool(tool, arguments).await.map_err(|e| self.request_error(&target, e));
        let _ = conn.close().await;
        self.note(&target, result).await
    }

    async fn status_of(&self, key: &TokenKey) -> Result<ServerStatus, Error> {
        let tokens = self.storage.tokens(key).await.map_err(self.store_err())?;
        let client = self.storage.client(key).await.map_err(self.store_err())?;
        let now = self.clock.now();
        let expires_at = tokens.as_ref().and_then(|t| t.expires_at());
        let needs_login = match (&tokens, &client) {
            (_, None) => Some("no client registration".to_owned()),
            (None, _) => Some("no tokens".to_owned()),
            (Some(t), _) => t.needs_authorization().map(|r| r.to_string()),
        };
        Ok(ServerStatus {
            server: key.server().to_owned(),
            issuer: tokens
                .as_ref()
                .map(|t| t.issuer().to_owned())
                .or_else(|| client.as_ref().map(|c| c.issuer.clone())),
            client_id: client.map(|c| c.client_id),
            expires_at: expires_at.map(Timestamp::as_secs),
            expires_in: expires_at.map(|at| signed_secs(at, now)),
            has_refresh_token: tokens.as_ref().is_some_and(|t| t.refresh_token().is_some()),
            needs_login,
            last_event: self.events.of(key).into_iter().next(),
        })
    }

    /// What is stored for each server of this tenant and user.
    ///
    /// # Errors
    /// Store errors.
    pub async fn status(&self) -> Result<Vec<ServerStatus>, Error> {
        let keys = self
            .storage
            .list(&self.options.tenant, &self.options.user)
            .await
            .map_err(self.store_err())?;
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            out.push(self.status_of(&key).await?);
        }
        Ok(out)
    }

    /// Revoke the stored tokens at the authorization server (RFC 7009), then delete the tokens
    /// and the client registration. A failed revocation is reported, and the local copy is
    /// deleted all the same.
    ///
    /// # Errors
    /// Store errors.
    pub async fn logout(&self, url: &str) -> Result<LogoutReport, Error> {
        let target = self.target(url)?;
        let (tokens, client) = self.stored(&target).await?;
        let deleted = tokens.is_some() || client.is_some();
        let revocation = match (&tokens, &client) {
            (Some(tokens), Some(client)) => self.revoke(tokens, client).await,
            _ => "nothing_to_revoke".to_owned(),
        };
        if deleted {
            self.storage.delete_all(&target.key).await.map_err(self.store_err())?;
            self.events.record(
                &target.key,
                "logout",
                format!("tokens and client deleted (revocation: {revocation})"),
            );
        }
        Ok(LogoutReport { server: target.as_str().to_owned(), revocation, deleted })
    }

    async fn revoke(
        &self,
        tokens: &TokenSet,
        client: &token_storage::ClientRegistration,
    ) -> String {
        let Some((discovery, registration)) = decode_client(client) else {
            return "failed: the stored client registration lacks the server metadata".into();
        };
        let refresh = tokens.refresh_token().cloned().map(mcp_oauth::RefreshToken::from);
        let access = mcp_oauth::AccessToken::new(tokens.access_token().expose());
        match self.oauth.revoke(&discovery, &registration, refresh.as_ref(), Some(&access)).await {
            Ok(mcp_oauth::Revocation::Revoked) => "revoked".into(),
            Ok(mcp_oauth::Revocation::NoEndpoint) => "no_endpoint".into(),
            Ok(_) => "revoked".into(),
            Err(e) => format!("failed: {e}"),
        }
    }

    /// Bridge stdin/stdout (newline-delimited JSON-RPC, as desktop hosts speak it) to the
    /// server's streamable HTTP endpoint, logging in first if needed (one browser prompt
    /// between all processes), with silent refresh on a 401. Returns when stdin closes.
    ///
    /// # Errors
    /// Login errors (see [`Client::login`]), or [`Error::Mcp`] when the session ends.
    pub async fn proxy(&self, url: &str, options: &LoginOptions) -> Result<(), Error> {
        let target = self.target(url)?;
        if !self.options.user_authorization() && self.options.workload_identity.is_none() {
            self.ensure_authorized(&target, options).await?;
        }
        crate::proxy::run(self, &target, options).await
    }

    /// A new login after the authorization was refused mid-session: under the login lock, so
    /// one process prompts; a peer that logged in meanwhile left tokens that work, and then
    /// there is no prompt.
    pub(crate) async fn relogin(
        &self,
        target: &Target,
        options: &LoginOptions,
    ) -> Result<(), Error> {
        if self.options.workload_identity.is_some() {
            return Err(Error::Authorization(format!(
                "the server {} refused the tokens of the workload identity grant; check that the \
                 authorization server trusts the workload's assertion",
                target.as_str()
            )));
        }
        self.events.record(
            &target.key,
            "relogin",
            "the server refused the authorization mid-session and it could not be refreshed: a new login starts",
        );
        let _lock = self.login_lock(target, options).await?;
        if let Ok(factory) = self.factory()
            && let Ok(conn) = factory.connect(self.factory_config(target)).await
        {
            tracing::info!(server = target.as_str(), "another process logged in");
            let _ = conn.close().await;
            return Ok(());
        }
        self.login_locked(target, options, true).await.map(drop)
    }
}

/// How many ports after the derived one a login tries when it is taken.
const CALLBACK_PORT_TRIES: u16 = 10;
/// The span of derived callback ports: `DEFAULT_CALLBACK_PORT ..` this many.
const CALLBACK_PORT_SPAN: u16 = 2000;

/// The callback port derived from the server URL: stable for one server, different (almost
/// always) for two, so that two logins to two servers at once do not collide.
///
/// ```
/// let a = mcp_connect::callback_port_for("https://a.example.com/mcp");
/// assert_eq!(a, mcp_connect::callback_port_for("https://a.example.com/mcp"));
/// assert_ne!(a, mcp_connect::callback_port_for("https://b.example.com/mcp"));
/// assert!(a >= mcp_connect::DEFAULT_CALLBACK_PORT);
/// ```
pub fn callback_port_for(server: &str) -> u16 {
    // FNV-1a: stable across builds and Rust versions (a port that moved would cost a new
    // registration), and no secret is involved.
    let hash = server
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    let offset = u16::try_from(hash % u64::from(CALLBACK_PORT_SPAN)).unwrap_or_default();
    DEFAULT_CALLBACK_PORT + offset
}

/// The loopback listener of a login's callback: `--port` when given; otherwise the port of the
/// stored client's redirect URI (so the registration stays valid), then the port derived from
/// the server URL and the next free ones.
async fn callback_listener(
    target: &Target,
    options: &LoginOptions,
    client: Option<&token_storage::ClientRegistration>,
) -> Result<tokio::net::TcpListener, Error> {
    let candidates: Vec<u16> = match options.port {
        Some(port) => vec![port],
        None => {
            let registered = client.into_iter().flat_map(|c| &c.redirect_uris).find_map(|uri| {
                let url = url::Url::parse(uri).ok()?;
                matches!(url.host_str(), Some("127.0.0.1" | "localhost" | "[::1]"))
                    .then(|| url.port())
                    .flatten()
            });
            let derived = callback_port_for(target.as_str());
            registered
                .into_iter()
                .chain((0..CALLBACK_PORT_TRIES).filter_map(|i| derived.checked_add(i)))
                .collect()
        }
    };
    let mut last = None;
    for port in &candidates {
        match tokio::net::TcpListener::bind((options.host.bind(), *port)).await {
            Ok(listener) => return Ok(listener),
            Err(e) => last = Some(e),
        }
    }
    let ports: Vec<String> = candidates.iter().map(u16::to_string).collect();
    Err(Error::Usage(format!(
        "cannot listen for the OAuth callback on {} port {}: {}",
        options.host.bind(),
        ports.join(", "),
        last.map_or_else(|| "no port".to_owned(), |e| e.to_string())
    )))
}

/// The provider of a session whose credentials are the user's own `Authorization` header: it
/// adds no token, and a refusal is final (no refresh, no login).
#[derive(Debug)]
struct UserAuthorization;

#[async_trait::async_trait]
impl connection_factory::AuthProvider for UserAuthorization {
    async fn current_token(
        &self,
    ) -> Result<Option<connection_factory::Secret>, connection_factory::Error> {
        Ok(None)
    }

    async fn on_unauthorized(
        &self,
        _rejected: Option<&connection_factory::Secret>,
        _challenge: &connection_factory::Refusal,
    ) -> Result<connection_factory::Recovery, connection_factory::Error> {
        Ok(connection_factory::Recovery::AuthorizationRequired)
    }
}

/// The server refused the `Authorization` header the user gave.
fn refused_header(target: &Target) -> Error {
    Error::Authorization(format!(
        "{} refused the Authorization header given with --header (mcp-connect sends it as given and does no OAuth when one is given)",
        target.as_str()
    ))
}

fn signed_secs(at: Timestamp, now: Timestamp) -> i64 {
    let secs = |d: Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
    if at >= now { secs(at.saturating_since(now)) } else { -secs(now.saturating_since(at)) }
}

/// The discovery and mcp-oauth registration connection-factory's `stored_client` keeps in the
/// stored registration's metadata.
fn decode_client(
    stored: &token_storage::ClientRegistration,
) -> Option<(mcp_oauth::Discovery, mcp_oauth::ClientRegistration)> {
    let discovery = serde_json::from_value(stored.metadata.get("discovery")?.clone()).ok()?;
    let mut registration: mcp_oauth::ClientRegistration =
        serde_json::from_value(stored.metadata.get("registration")?.clone()).ok()?;
    registration.client_secret = stored.client_secret.clone().map(mcp_oauth::ClientSecret::from);
    Some((discovery, registration))
}

/// A token-storage error as the CLI reports it.
pub(crate) fn store_error(root: &Path, e: &token_storage::Error) -> Error {
    if let Some(locked) = find::<StoreLocked>(e) {
        return Error::StoreLocked(locked.to_string());
    }
    if let Some(unreadable) = find::<StoreUnreadable>(e) {
        return Error::StoreCorrupted { path: root.to_owned(), detail: unreadable.detail.clone() };
    }
    match e {
        token_storage::Error::Decrypt { .. } | token_storage::Error::KeyProvider { .. } => {
            Error::StoreCorrupted { path: root.to_owned(), detail: e.to_string() }
        }
        _ => Error::Store(chain(e)),
    }
}

/// The typed cause deep inside a connection-factory error, when it says more than the
/// factory's own variant: token storage's transient and wait failures, the store's locks, an
/// authorization server that is in trouble for now.
fn typed_cause(e: &connection_factory::Error) -> Option<Error> {
    use token_storage::Error as T;
    if let Some(locked) = find::<StoreLocked>(e) {
        return Some(Error::StoreLocked(locked.to_string()));
    }
    if find::<StoreUnreadable>(e).is_some() {
        return Some(Error::Store(chain(e)));
    }
    if let Some(cause) = find::<T>(e) {
        return match cause {
            T::RefreshUnavailable { .. } => Some(Error::AuthorizationServerUnavailable(chain(e))),
            T::LeaseWait { .. } | T::Timeout { .. } => Some(Error::RefreshWait(chain(e))),
            T::StoreUnavailable { .. } | T::Store { .. } | T::WriteStorm { .. } => {
                Some(Error::Store(chain(e)))
            }
            T::Decrypt { .. } | T::KeyProvider { .. } => Some(Error::Store(chain(e))),
            _ => None,
        };
    }
    if let Some(oauth) = find::<mcp_oauth::Error>(e)
        && oauth.class() == mcp_oauth::ErrorClass::Transient
    {
        return Some(Error::AuthorizationServerUnavailable(chain(e)));
    }
    None
}

/// A connection-factory error from the provider whose cause has no type this crate knows:
/// decided by its kind (a failure that crossed the factory's look-up flow keeps only its kind
/// and message) and by mcp-oauth's typed refusals, never by the message.
fn provider_error(e: &connection_factory::Error) -> Error {
    use connection_factory::ErrorKind as K;
    if let Some(typed) = typed_cause(e) {
        return typed;
    }
    let text = chain(e);
    match e.kind() {
        K::AuthorizationServerUnavailable => return Error::AuthorizationServerUnavailable(text),
        K::RefreshWait => return Error::RefreshWait(text),
        // This crate's store is unavailable only while another process holds it
        // (`store::locked`); typed, that is `StoreLocked`, which `typed_cause` found above.
        K::StoreUnavailable => return Error::StoreLocked(text),
        K::Store => return Error::Store(text),
        _ => {}
    }
    match find::<mcp_oauth::Error>(e) {
        Some(mcp_oauth::Error::SsrfRefused { kind: "private" | "link-local", .. }) => {
            Error::Authorization(format!("{text} (--allow-private-network allows it)"))
        }
        Some(mcp_oauth::Error::InsecureUrl { .. }) => {
            Error::Authorization(format!("{text} (--allow-http allows it)"))
        }
        _ => Error::Authorization(text),
    }
}

/// An error while opening the MCP session.
pub(crate) fn connect_error(target: &Target, e: connection_factory::Error) -> Error {
    use connection_factory::Error as E;
    let url = target.as_str().to_owned();
    match e {
        E::AuthorizationRequired { .. } => Error::NotLoggedIn { url },
        E::Transport(_) | E::Protocol(_) => {
            typed_cause(&e).unwrap_or_else(|| Error::NotMcp { url, detail: chain(&e) })
        }
        _ if e.kind() == connection_factory::ErrorKind::Registration => {
            Error::RegistrationRefused(chain(&e))
        }
        E::Provider { .. } => provider_error(&e),
        E::Store { .. } => typed_cause(&e).unwrap_or_else(|| Error::Store(chain(&e))),
        E::InvalidConfig(m) => Error::Usage(m),
        E::Timeout { operation, after } => Error::Timeout { operation: operation.into(), after },
        other => typed_cause(&other).unwrap_or_else(|| Error::Mcp(chain(&other))),
    }
}

/// An error of a request on an open session.
pub(crate) fn request_error(target: &Target, e: connection_factory::Error) -> Error {
    use connection_factory::Error as E;
    match e {
        E::AuthorizationRequired { .. } => Error::NotLoggedIn { url: target.as_str().to_owned() },
        E::Provider { .. } => provider_error(&e),
        // The session was lost after the request may have reached the server: it is not sent
        // again (a tool call must not run twice); the MCP session failed.
        E::Interrupted { .. } => Error::Mcp(chain(&e)),
        E::Store { .. } => typed_cause(&e).unwrap_or_else(|| Error::Store(chain(&e))),
        E::Timeout { operation, after } => Error::Timeout { operation: operation.into(), after },
        other => typed_cause(&other).unwrap_or_else(|| Error::Mcp(chain(&other))),
    }
}

fn login_error(target: &Target, options: &LoginOptions, e: connection_factory::Error) -> Error {
    use connection_factory::Error as E;
    match e {
        E::Timeout { operation, .. } if operation != "connect" => {
            Error::BrowserTimeout { after: options.timeout }
        }
        E::Timeout { .. } => Error::BrowserTimeout { after: options.timeout },
        E::AuthorizationRequired { .. } => Error::Authorization(
            "the authorization was denied or did not complete (see the browser window)".into(),
        ),
        other => connect_error(target, other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--allow-private-network`, `--allow-http` and `--enable-proxy` reach the OAuth side's
    /// HTTP policy; by default private and link-local addresses and plain http are refused.
    #[test]
    fn network_flags_shape_the_http_policy() {
        let private: std::net::IpAddr = "10.1.2.3".parse().unwrap();
        let cgnat: std::net::IpAddr = "100.100.1.1".parse().unwrap();
        let link_local: std::net::IpAddr = "169.254.1.1".parse().unwrap();
        let metadata: std::net::IpAddr = "169.254.169.254".parse().unwrap();
        let default = ClientOptions::new("/tmp/x").http_policy();
        for ip in [private, cgnat, link_local, metadata] {
            assert!(default.ssrf.refuses(ip).is_some(), "{ip}");
        }
        assert!(!default.ssrf.allow_http && !default.use_env_proxy);
        let open = ClientOptions::new("/tmp/x")
            .allow_private_network()
            .allow_http()
            .enable_proxy()
            .http_policy();
        for ip in [private, cgnat, link_local] {
            assert!(open.ssrf.refuses(ip).is_none(), "{ip}");
        }
        assert!(open.ssrf.refuses(metadata).is_some(), "cloud metadata stays refused");
        assert!(open.ssrf.allow_http && open.use_env_proxy);
    }

    /// A provider failure that crossed the factory's token look-up flow (which keeps a kind and
    /// a message) is decided by its kind, never by its message: none of these messages holds
    /// what the old text matching looked for, and the last reads like a refresh wait but is a
    /// store failure. The kinds are those connection-factory's look-up records (pinned there by
    /// `a_failed_token_look_up_keeps_its_kind`).
    #[test]
    fn a_provider_failure_is_decided_by_its_kind_not_its_message() {
        let crossed = |kind: &str, message: &str| {
            connection_factory::Error::provider(
                "token look-up",
                flow_state::Error::Failed {
                    key: flow_state::FlowKey::new("mcp_get_tokens", "k").unwrap(),
                    error: flow_state::FlowError::new(kind, message),
                },
            )
        };
        let decided = |kind: &str, message: &str| provider_error(&crossed(kind, message));
        assert!(matches!(
            decided("refresh_unavailable", "503"),
            Error::AuthorizationServerUnavailable(_)
        ));
        assert!(matches!(decided("refresh_wait", "a peer"), Error::RefreshWait(_)));
        assert!(matches!(decided("store_unavailable", "held"), Error::StoreLocked(_)));
        assert!(matches!(decided("store", "bad record"), Error::Store(_)));
        assert!(matches!(
            decided("store", "gave up waiting for the token refresh; is unavailable for now"),
            Error::Store(_)
        ));
        assert!(matches!(decided("something_else", "x"), Error::Authorization(_)));
    }

    /// The OAuth client's typed refusals of an address get the flag that allows them: private
    /// and link-local addresses `--allow-private-network`, plain http `--allow-http`; an
    /// address no flag allows (cloud metadata) gets no hint.
    #[test]
    fn refused_addresses_are_decided_by_the_oauth_clients_error() {
        let refused = |e: mcp_oauth::Error| {
            provider_error(&connection_factory::Error::provider("discovery", e))
        };
        let url = || "https://10.0.0.1/".to_owned();
        for kind in ["private", "link-local"] {
            let e = refused(mcp_oauth::Error::SsrfRefused { url: url(), kind });
            assert!(
                matches!(&e, Error::Authorization(m) if m.contains("--allow-private-network")),
                "{e:?}"
            );
        }
        let e = refused(mcp_oauth::Error::SsrfRefused { url: url(), kind: "cloud metadata" });
        assert!(matches!(&e, Error::Authorization(m) if !m.contains("--allow")), "{e:?}");
        let e = refused(mcp_oauth::Error::InsecureUrl { url: url() });
        assert!(matches!(&e, Error::Authorization(m) if m.contains("--allow-http")), "{e:?}");
    }

    /// A failed registration is exit 6 by the factory's error kind.
    #[test]
    fn a_failed_registration_is_decided_by_its_kind() {
        let target = Target {
            url: "https://mcp.example/mcp".parse().unwrap(),
            key: TokenKey::new("local", "me", "https://mcp.example/mcp"),
        };
        let e = connection_factory::Error::provider("registration", std::io::Error::other("no"));
        assert_eq!(e.kind(), connection_factory::ErrorKind::Registration);
        assert!(matches!(connect_error(&target, e), Error::RegistrationRefused(_)));
    }
}
