//! An MCP client session whose auth provider stays attached for the session's lifetime.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use mcp_clock::{Clock, SharedClock};
use rmcp::model::{
    CallToolRequestParams, CallToolResult, ClientCapabilities, ClientConfig, ErrorCode,
    Implementation, ProtocolVersion, Tool,
};
use rmcp::service::{ClientInitializeError, RunningService, ServiceError};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::{
    AuthRequiredError, InsufficientScopeError, StreamableHttpClientTransportConfig,
    StreamableHttpError,
};
use rmcp::{ClientLifecycleMode, ClientServiceExt, RoleClient};

use crate::client::{AuthHttpClient, ProviderFailure};
use crate::error::Error;
use crate::provider::AuthProvider;
use crate::secret::Secret;

/// Limits for a [`Connection`].
///
/// ```
/// use connection_factory::ConnectOptions;
/// use std::time::Duration;
///
/// let options = ConnectOptions::default()
///     .connect_timeout(Duration::from_secs(5))
///     .request_timeout(Duration::from_secs(30))
///     .max_concurrent_requests(64);
/// # drop(options);
/// ```
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    connect_timeout: Duration,
    request_timeout: Duration,
    max_concurrent_requests: usize,
    clock: SharedClock,
    reconnect_attempts: u32,
    reconnect_base: Duration,
    reconnect_max: Duration,
    headers: Vec<(String, Secret)>,
    env_proxy: bool,
}

impl Default for ConnectOptions {
    /// 30 s to connect, 60 s per request, 16 POSTs in flight (rmcp's default), the system clock,
    /// 3 reconnect attempts with backoff from 250 ms up to 5 s.
    fn default() -> Self {
        ConnectOptions {
            connect_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(60),
            max_concurrent_requests: 16,
            clock: SharedClock::system(),
            reconnect_attempts: 3,
            reconnect_base: Duration::from_millis(250),
            reconnect_max: Duration::from_secs(5),
            headers: Vec::new(),
            env_proxy: false,
        }
    }
}

impl ConnectOptions {
    /// How long the MCP handshake may take, recovery included.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }
    /// How long one request (`tools/list`, `tools/call`) may take, recovery included.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }
    /// How many POSTs may be in flight at once (at least 1).
    pub fn max_concurrent_requests(mut self, limit: usize) -> Self {
        self.max_concurrent_requests = limit.max(1);
        self
    }
    /// The clock the timeouts and the reconnect backoff run on.
    pub fn clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }
    /// When the session is lost (the transport closed, or the session expired and rmcp's own
    /// re-initialization failed), reconnect at most `attempts` times (0: never), waiting
    /// between attempts with exponential backoff from `base` up to `max`, with jitter (each
    /// wait is drawn between half and all of its step). Then the request fails with
    /// [`Error::Reconnect`].
    pub fn reconnect(mut self, attempts: u32, base: Duration, max: Duration) -> Self {
        self.reconnect_attempts = attempts;
        self.reconnect_base = base;
        self.reconnect_max = max.max(base);
        self
    }
    /// Send the header `name: value` with every request (API keys, gateway headers). The value
    /// is a [`Secret`]: redacted in `Debug` and marked sensitive on the wire. A name or value
    /// HTTP does not allow, or a header the transport owns (`Accept`, `Mcp-Session-Id`,
    /// `Last-Event-ID`), fails the connect with [`Error::InvalidConfig`].
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Secret>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
    /// Send the MCP requests through the proxy the environment names (`HTTPS_PROXY`,
    /// `HTTP_PROXY`, `ALL_PROXY`, minus `NO_PROXY`), as mcp-remote's `--enable-proxy` does.
    /// Default off: requests go straight to the server.
    pub fn env_proxy(mut self, on: bool) -> Self {
        self.env_proxy = on;
        self
    }
}

/// An MCP session over streamable HTTP whose every request goes through an [`AuthProvider`]
/// (see [`AuthHttpClient`]).
///
/// The provider stays attached for as long as the connection lives, so a 401 on any later
/// request (a tool call an hour in, the GET SSE stream, a reconnect) reaches it. Dropping the
/// connection, or [`Connection::close`], detaches it: the provider is not called again.
///
/// ```no_run
/// # async fn demo(provider: std::sync::Arc<dyn connection_factory::AuthProvider>) -> Result<(), connection_factory::Error> {
/// use connection_factory::{ConnectOptions, Connection};
///
/// let conn = Connection::connect("http://127.0.0.1:8080/mcp", provider, ConnectOptions::default()).await?;
/// let tools = conn.list_tools().await?;
/// let args = serde_json::json!({ "text": "hi" });
/// let result = conn.call_tool(&tools[0].name, args.as_object().cloned()).await?;
/// # drop(result);
/// conn.close().await?;
/// # Ok(()) }
/// ```
pub struct Connection {
    url: String,
    provider: Arc<dyn AuthProvider>,
    options: ConnectOptions,
    /// The live session; locked only to read it, and to replace it on a reconnect (which
    /// makes concurrent requests queue behind the reconnect).
    live: tokio::sync::Mutex<Live>,
}

/// One MCP session and the auth client under it.
struct Live {
    service: Option<RunningService<RoleClient, ClientConfig>>,
    client: AuthHttpClient,
    /// Bumped by every reconnect, so requests that failed on the same session reconnect once.
    generation: u64,
    /// Set by `close`: no reconnect after it.
    closed: bool,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Connection");
        d.field("url", &self.url).field("options", &self.options);
        if let Ok(live) = self.live.try_lock() {
            d.field("client", &live.client).field("generation", &live.generation);
        }
        d.field("closed", &self.is_closed()).finish()
    }
}

type Peer = rmcp::service::Peer<RoleClient>;

impl Connection {
    /// Open an MCP session at `url` (http or https), with `provider` supplying the tokens.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a URL that is not http(s); [`Error::AuthorizationRequired`]
    /// or [`Error::InsufficientScope`] when the server refuses the handshake and the provider
    /// cannot recover; [`Error::Timeout`] after the connect timeout; [`Error::Transport`] or
    /// [`Error::Protocol`] otherwise.
    pub async fn connect(
        url: &str,
        provider: Arc<dyn AuthProvider>,
        options: ConnectOptions,
    ) -> Result<Self, Error> {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(Error::InvalidConfig(format!("the MCP URL must be http(s), got {url:?}")));
        }
        let (service, client) = handshake(url, provider.clone(), &options).await?;
        Ok(Connection {
            url: url.to_owned(),
            provider,
            options,
            live: tokio::sync::Mutex::new(Live {
                service: Some(service),
                client,
                generation: 0,
                closed: false,
            }),
        })
    }

    /// Every tool the server offers (all pages).
    ///
    /// # Errors
    /// As [`Connection::call_tool`].
    pub async fn list_tools(&self) -> Result<Vec<Tool>, Error> {
        self.request("list_tools", Resend::Always, |peer| async move {
            peer.list_all_tools().await.map_err(service_error)
        })
        .await
    }

    /// Call the tool `name` with `arguments`. A result with `is_error` set is a successful call.
    ///
    /// # Errors
    /// [`Error::AuthorizationRequired`] / [`Error::InsufficientScope`] when the server refused
    /// the request and the provider gave up; [`Error::Provider`] when the provider failed;
    /// [`Error::Timeout`] after the request timeout; [`Error::Protocol`] for a JSON-RPC error;
    /// [`Error::Reconnect`] when the session was lost and could not be re-established;
    /// [`Error::Closed`] after [`Connection::close`]; [`Error::Transport`] otherwise.
    pub async fn call_tool(
        &self,
        name: &str,
        arguments: Option<serde_json::Map<String, serde_json::Value>>,
    ) -> Result<CallToolResult, Error> {
        let mut params = CallToolRequestParams::new(name.to_owned());
        if let Some(arguments) = arguments {
            params = params.with_arguments(arguments);
        }
        self.request("call_tool", Resend::IfNeverReached, move |peer| {
            let params = params.clone();
            async move { peer.call_tool(params).await.map_err(service_error) }
        })
        .await
    }

    /// Whether the session has ended (closed, or the transport gave up and was not
    /// re-established yet).
    pub fn is_closed(&self) -> bool {
        match self.live.try_lock() {
            Ok(live) => live.closed || live.service.as_ref().is_none_or(RunningService::is_closed),
            Err(_) => false, // a reconnect is in progress
        }
    }

    /// Detach the provider and end the session, waiting for rmcp's worker to stop.
    ///
    /// # Errors
    /// [`Error::Transport`] when the session task panicked.
    pub async fn close(self) -> Result<(), Error> {
        let mut live = self.live.lock().await;
        live.closed = true;
        live.client.detach();
        if let Some(service) = live.service.take() {
            service.cancel().await.map_err(|e| Error::Transport(Arc::new(e)))?;
        }
        Ok(())
    }

    /// Run `op` on the session within the request timeout; if the session turns out lost,
    /// reconnect (bounded, with backoff) and run it once more, all within the same timeout. A
    /// request that may have reached the server before the session was lost is sent again only
    /// when `resend` allows it (reading the tool list may be repeated; a tool call may not).
    async fn request<T, F, Fut>(
        &self,
        operation: &'static str,
        resend: Resend,
        op: F,
    ) -> Result<T, Error>
    where
        F: Fn(Peer) -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        let attempt = async {
            let (peer, generation) = match self.peer().await? {
                Some(found) => found,
                None => self.reconnect(0, None).await?,
            };
            match op(peer).await {
                Err(e) if self.options.reconnect_attempts > 0 && self.session_lost(&e).await => {
                    if resend == Resend::IfNeverReached && !never_reached(&e) {
                        tracing::warn!(error = %e, operation, "the MCP session was lost after the request may have reached the server: not sent again");
                        return Err(Error::Interrupted { operation, cause: Arc::new(e) });
                    }
                    tracing::info!(error = %e, "the MCP session was lost: reconnecting");
                    let (peer, _) = self.reconnect(generation, Some(e)).await?;
                    op(peer).await
                }
                other => other,
            }
        };
        let timeout = self.options.request_timeout;
        timed_for(&self.options.clock, &*self.provider, operation, timeout, attempt).await
    }

    /// The live session's peer and generation; `None` when it has ended (and may reconnect).
    async fn peer(&self) -> Result<Option<(Peer, u64)>, Error> {
        let live = self.live.lock().await;
        if live.closed {
            return Err(Error::Closed);
        }
        match &live.service {
            Some(s) if !s.is_closed() => Ok(Some((s.peer().clone(), live.generation))),
            _ if self.options.reconnect_attempts == 0 => Err(Error::Closed),
            _ => Ok(None),
        }
    }

    /// Whether `e` means the session is gone (and the request was not processed): the
    /// transport closed, or the server expired the session and rmcp's own re-initialization
    /// did not recover it (see `session_lost_in`).
    async fn session_lost(&self, e: &Error) -> bool {
        if matches!(e, Error::Closed) {
            return true;
        }
        if let Error::Transport(t) = e
            && session_lost_in(t.as_ref())
        {
            return true;
        }
        let live = self.live.lock().await;
        !live.closed && live.service.as_ref().is_none_or(RunningService::is_closed)
    }

    /// Replace the session of `generation` with a new one: at most `reconnect_attempts`
    /// handshakes, with exponential backoff and jitter on the injected clock between them. A
    /// session another request already replaced is used as it is. An auth refusal is not
    /// retried (the provider already tried to recover).
    async fn reconnect(&self, generation: u64, cause: Option<Error>) -> Result<(Peer, u64), Error> {
        let mut live = self.live.lock().await;
        if live.closed {
            return Err(Error::Closed);
        }
        if live.generation != generation
            && let Some(s) = &live.service
            && !s.is_closed()
        {
            return Ok((s.peer().clone(), live.generation));
        }
        let attempts = self.options.reconnect_attempts;
        let mut step = self.options.reconnect_base;
        let mut last = cause.unwrap_or(Error::Closed);
        for attempt in 1..=attempts {
            match handshake(&self.url, self.provider.clone(), &self.options).await {
                Ok((service, client)) => {
                    live.client.detach();
                    let peer = service.peer().clone();
                    if let Some(old) = live.service.replace(service) {
                        // The old worker winds down in the background.
                        drop(old);
                    }
                    live.client = client;
                    live.generation += 1;
                    tracing::info!(attempt, "reconnected the MCP session");
                    return Ok((peer, live.generation));
                }
                Err(
                    e @ (Error::AuthorizationRequired { .. } | Error::InsufficientScope { .. }),
                ) => {
                    return Err(e);
                }
                Err(e) => {
                    tracing::warn!(attempt, error = %e, "reconnect failed");
                    last = e;
                    if attempt < attempts {
                        self.options.clock.sleep(mcp_clock::equal_jitter(step)).await;
                        step = (step * 2).min(self.options.reconnect_max);
                    }
                }
            }
        }
        Err(Error::Reconnect { attempts, last: Arc::new(last) })
    }
}

/// Whether a request whose session was lost may be sent again on a new session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resend {
    /// Always: repeating it changes nothing on the server (a read).
    Always,
    /// Only when it provably never reached a live session (see [`never_reached`]).
    IfNeverReached,
}

/// Whether rmcp's transport error chain says the session is gone and the request was not
/// processed, so that it is safe to send again on a new session: the server expired the
/// session (404) and rmcp's re-initialization failed (refused with 404, 502 or 503, or with a
/// JSON-RPC error), the worker's channel closed, or the server could not be reached. A
/// recovery that timed out is not: the server may have processed the request.
fn session_lost_in(e: &(dyn StdError + 'static)) -> bool {
    let mut current: Option<&(dyn StdError + 'static)> = Some(e);
    while let Some(err) = current {
        if let Some(http) = err.downcast_ref::<StreamableHttpError<reqwest::Error>>() {
            match http {
                StreamableHttpError::SessionExpired
                | StreamableHttpError::ReinitializationFailed(_)
                | StreamableHttpError::TransportChannelClosed => return true,
                StreamableHttpError::HttpStatus(status) => {
                    return matches!(status.status, 404 | 502 | 503);
                }
                StreamableHttpError::Client(e) => return e.is_connect(),
                _ => {}
            }
        }
        if let Some(e) = err.downcast_ref::<reqwest::Error>() {
            return e.is_connect();
        }
        current = err.source();
    }
    false
}

/// Whether rmcp's transport error chain proves the request never reached a live session, so
/// the server did not run it: the server did not know the session (404; rmcp's
/// re-initialization after it failed, which rmcp may report as the re-initialization's own
/// 503), the server refused to handle it (503), or the server could not be reached at all. A
/// closed worker channel, a 502 (a gateway that lost the server's answer) or a broken
/// connection may come after the server acted.
fn never_reached(e: &Error) -> bool {
    let Error::Transport(t) = e else { return false };
    let mut current: Option<&(dyn StdError + 'static)> = Some(t.as_ref());
    while let Some(err) = current {
        if let Some(http) = err.downcast_ref::<StreamableHttpError<reqwest::Error>>() {
            return match http {
                StreamableHttpError::SessionExpired
                | StreamableHttpError::ReinitializationFailed(_) => true,
                StreamableHttpError::HttpStatus(status) => matches!(status.status, 404 | 503),
                StreamableHttpError::Client(e) => e.is_connect(),
                _ => false,
            };
        }
        if let Some(e) = err.downcast_ref::<reqwest::Error>() {
            return e.is_connect();
        }
        current = err.source();
    }
    false
}

/// The revisions a [`Connection`] asks for with `server/discover`, newest first.
const MODERN_VERSIONS: [ProtocolVersion; 1] = [ProtocolVersion::V_2026_07_28];

/// What the client tells the server about itself: in `initialize` (2025-11-25 and older, whose
/// negotiation answers with the server's own version when it does not speak 2025-11-25) and
/// in every request's `_meta` (2026-07-28).
fn client_info() -> ClientConfig {
    ClientConfig::new(
        ClientCapabilities::default(),
        Implementation::new("connection-factory", env!("CARGO_PKG_VERSION")),
    )
    .with_protocol_version(ProtocolVersion::LATEST_WITH_INITIALIZE)
}

/// Whether a failed `server/discover` says the server predates 2026-07-28, so that the
/// `initialize` handshake is the way in: a JSON-RPC error other than the 2026-07-28 rejections
/// (rmcp turns an older server's 4xx for the unknown method or the unknown
/// `MCP-Protocol-Version` into one), or a server whose discovery lists only revisions that
/// still have `initialize`, or an answer that is not a discovery result at all.
fn speaks_only_initialize(e: &ClientInitializeError) -> bool {
    match e {
        ClientInitializeError::JsonRpcError(data) => !matches!(
            data.code,
            ErrorCode::MISSING_REQUIRED_CLIENT_CAPABILITY
                | ErrorCode::HEADER_MISMATCH
                | ErrorCode::UNSUPPORTED_PROTOCOL_VERSION
        ),
        ClientInitializeError::NoCompatibleProtocolVersion { server_supported, .. } => {
            server_supported.iter().any(ProtocolVersion::has_initialize)
        }
        // An answer that is not a discovery result (some older servers answer any unknown
        // method with an empty result).
        ClientInitializeError::ExpectedInitResult(_) => true,
        _ => false,
    }
}

/// One MCP handshake at `url`, within the connect timeout: MCP 2026-07-28 first
/// (`server/discover`; every later POST carries `MCP-Protocol-Version`, `Mcp-Method` and the
/// request `_meta`), and when the server turns out older, the `initialize` handshake of
/// 2025-11-25 on a fresh transport (the server answers with the revision it speaks, down to
/// 2025-03-26). No wall-clock probe timeout decides between them: a discovery that needs the
/// provider (a 401 first, then an interactive login) may take as long as the connect timeout.
async fn handshake(
    url: &str,
    provider: Arc<dyn AuthProvider>,
    options: &ConnectOptions,
) -> Result<(RunningService<RoleClient, ClientConfig>, AuthHttpClient), Error> {
    // Every client made, so that a handshake cut short (by the timeout, or by the request
    // budget it runs in being dropped) detaches them all.
    let made = std::sync::Mutex::new(Vec::new());
    let mut guard = DetachUnlessKept { made: &made, keep: false };
    let handshake = async {
        let modern = ClientLifecycleMode::Discover { preferred_versions: MODERN_VERSIONS.to_vec() };
        let result = match attempt(url, &provider, options, modern, &made).await? {
            Err(e) if speaks_only_initialize(&e) => {
                tracing::debug!(error = %e, "the server predates MCP 2026-07-28: initialize");
                attempt(url, &provider, options, ClientLifecycleMode::Initialize, &made).await?
            }
            other => other,
        };
        result.map_err(initialize_error)
    };
    let result =
        timed_for(&options.clock, &*provider, "connect", options.connect_timeout, handshake).await;
    guard.keep = result.is_ok();
    drop(guard);
    result
}

/// Detaches every client of a handshake when dropped, unless the handshake succeeded.
struct DetachUnlessKept<'a> {
    made: &'a std::sync::Mutex<Vec<AuthHttpClient>>,
    keep: bool,
}

impl Drop for DetachUnlessKept<'_> {
    fn drop(&mut self) {
        if !self.keep {
            for client in self.made.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter()
            {
                client.detach();
            }
        }
    }
}

/// One handshake over a new [`AuthHttpClient`] (detached again when it fails).
async fn attempt(
    url: &str,
    provider: &Arc<dyn AuthProvider>,
    options: &ConnectOptions,
    lifecycle: ClientLifecycleMode,
    made: &std::sync::Mutex<Vec<AuthHttpClient>>,
) -> Result<
    Result<(RunningService<RoleClient, ClientConfig>, AuthHttpClient), ClientInitializeError>,
    Error,
> {
    let client = if options.env_proxy {
        AuthHttpClient::with_env_proxy(provider.clone())?
    } else {
        AuthHttpClient::new(provider.clone())?
    };
    let client = client.with_clock(options.clock.clone());
    made.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(client.clone());
    let config = StreamableHttpClientTransportConfig::with_uri(url.to_owned())
        .max_concurrent_requests(options.max_concurrent_requests)
        .custom_headers(header_map(&options.headers)?);
    let transport = StreamableHttpClientTransport::with_client(client.clone(), config);
    let served = client_info().serve_with_lifecycle(transport, lifecycle).await;
    if served.is_err() {
        client.detach();
    }
    Ok(served.map(|service| (service, client)))
}

/// rmcp's handshake failure as this crate's [`Error`].
fn initialize_error(e: ClientInitializeError) -> Error {
    let found = match &e {
        // Its `source()` does not lead to the transport error: look inside.
        ClientInitializeError::TransportError { error, .. } => classify(error),
        other => classify(other),
    };
    found.unwrap_or_else(|| Error::Transport(Arc::new(e)))
}

/// Custom headers (name, value) as rmcp's streamable-HTTP transport config takes them, for a
/// transport built outside [`Connection`], with the checks of [`ConnectOptions::header`];
/// values are marked sensitive. Errors never include a value.
///
/// # Errors
/// [`Error::InvalidConfig`] for a bad name or value, or a header the transport owns.
pub fn header_map(
    headers: &[(String, Secret)],
) -> Result<
    std::collections::HashMap<reqwest::header::HeaderName, reqwest::header::HeaderValue>,
    Error,
> {
    use reqwest::header::{HeaderName, HeaderValue};
    let mut map = std::collections::HashMap::new();
    for (name, value) in headers {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| Error::InvalidConfig(format!("{name:?} is not an HTTP header name")))?;
        if ["accept", "mcp-session-id", "last-event-id"].contains(&name.as_str()) {
            return Err(Error::InvalidConfig(format!(
                "the header {name} is set by the MCP transport and cannot be given"
            )));
        }
        let mut value = HeaderValue::from_str(value.expose()).map_err(|_| {
            Error::InvalidConfig(format!(
                "the value of the header {name} is not a valid HTTP header value"
            ))
        })?;
        value.set_sensitive(true);
        map.insert(name, value);
    }
    Ok(map)
}

impl Drop for Connection {
    fn drop(&mut self) {
        // Detach first: nothing the winding-down worker sends may reach the provider.
        self.live.get_mut().client.detach();
    }
}

/// `work`, unless `clock` says `after` has passed first (`None`): the workspace's one timeout,
/// on the injected clock, so a test moves a `ManualClock` instead of waiting.
pub(crate) use mcp_clock::within;

/// `work` within `after` on `clock`, running out of time as [`Error::Timeout`] for
/// `operation`; except that when `after` passes while `provider` waits for the user
/// ([`AuthProvider::interaction_deadline`]), the limit is widened once, to the end of that wait
/// plus `after` again: the caller sees the authorization's outcome, not a timeout.
async fn timed_for<T>(
    clock: &SharedClock,
    provider: &dyn AuthProvider,
    operation: &'static str,
    after: Duration,
    work: impl Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    let mut work = std::pin::pin!(work);
    let mut deadline = clock.now().saturating_add(after);
    let mut widened = false;
    loop {
        tokio::select! {
            out = &mut work => return out,
            () = clock.sleep_until(deadline) => {
                match provider.interaction_deadline() {
                    Some(until) if !widened && until.saturating_add(after) > deadline => {
                        tracing::debug!(operation, "widening the timeout for the authorization");
                        deadline = until.saturating_add(after);
                        widened = true;
                    }
                    _ => return Err(Error::Timeout { operation, after }),
                }
            }
        }
    }
}

fn service_error(e: ServiceError) -> Error {
    if let Some(typed) = classify(&e) {
        return typed;
    }
    match e {
        ServiceError::McpError(data) => Error::Protocol(data.message.into_owned()),
        ServiceError::TransportClosed | ServiceError::Cancelled { .. } => Error::Closed,
        ServiceError::Timeout { timeout } => {
            Error::Timeout { operation: "request", after: timeout }
        }
        ServiceError::UnexpectedResponse => {
            Error::Protocol("the server answered with an unexpected response type".into())
        }
        other => Error::Transport(Arc::new(other)),
    }
}

/// Find an auth refusal or a provider failure anywhere in an rmcp error's source chain.
pub(crate) fn classify(e: &(dyn StdError + 'static)) -> Option<Error> {
    let mut current: Option<&(dyn StdError + 'static)> = Some(e);
    while let Some(err) = current {
        if let Some(auth) = err.downcast_ref::<AuthRequiredError>() {
            let header = Some(auth.www_authenticate_header.clone()).filter(|h| !h.is_empty());
            return Some(Error::AuthorizationRequired { www_authenticate: header });
        }
        if let Some(scope) = err.downcast_ref::<InsufficientScopeError>() {
            return Some(Error::InsufficientScope {
                scope: scope.required_scope.clone(),
                www_authenticate: scope.www_authenticate_header.clone(),
            });
        }
        // `io::Error::source` skips the wrapped error itself, so look inside explicitly.
        if let Some(failure) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<ProviderFailure>())
        {
            return Some(failure.0.clone());
        }
        current = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmcp::transport::streamable_http_client::StreamableHttpError;

    /// Which failed discoveries lead to `initialize`: a JSON-RPC error that is not one of the
    /// 2026-07-28 rejections, a discovery listing only revisions with `initialize`, and an
    /// answer that is not a discovery result; not a 2026-07-28 rejection or a transport error.
    #[test]
    fn an_older_server_is_recognised_from_the_failed_discovery() {
        let rpc = |code| {
            ClientInitializeError::JsonRpcError(rmcp::model::ErrorData::new(code, "x", None))
        };
        assert!(speaks_only_initialize(&rpc(ErrorCode::METHOD_NOT_FOUND)));
        assert!(speaks_only_initialize(&rpc(ErrorCode::INVALID_REQUEST)));
        assert!(!speaks_only_initialize(&rpc(ErrorCode::HEADER_MISMATCH)));
        assert!(!speaks_only_initialize(&rpc(ErrorCode::MISSING_REQUIRED_CLIENT_CAPABILITY)));
        assert!(!speaks_only_initialize(&rpc(ErrorCode::UNSUPPORTED_PROTOCOL_VERSION)));
        let versions =
            |v: Vec<ProtocolVersion>| ClientInitializeError::NoCompatibleProtocolVersion {
                client_supported: MODERN_VERSIONS.to_vec(),
                server_supported: v,
            };
        assert!(speaks_only_initialize(&versions(vec![ProtocolVersion::V_2025_06_18])));
        assert!(!speaks_only_initialize(&versions(Vec::new())));
        assert!(speaks_only_initialize(&ClientInitializeError::ExpectedInitResult(None)));
        assert!(!speaks_only_initialize(&ClientInitializeError::Cancelled));
    }

    #[test]
    fn refusals_and_provider_failures_are_found_in_the_chain() {
        let refusal: StreamableHttpError<reqwest::Error> = StreamableHttpError::AuthRequired(
            AuthRequiredError::new("Bearer error=\"invalid_token\"".into()),
        );
        assert!(matches!(
            classify(&refusal),
            Some(Error::AuthorizationRequired { www_authenticate: Some(h) }) if h.contains("invalid_token")
        ));
        let scope: StreamableHttpError<reqwest::Error> =
            StreamableHttpError::InsufficientScope(InsufficientScopeError::new(
                "Bearer error=\"insufficient_scope\"".into(),
                Some("a b".into()),
            ));
        assert!(
            matches!(classify(&scope), Some(Error::InsufficientScope { scope: Some(s), .. }) if s == "a b")
        );
        let failed: StreamableHttpError<reqwest::Error> = StreamableHttpError::Io(
            std::io::Error::other(ProviderFailure(Error::provider_msg("token endpoint down"))),
        );
        assert!(
            matches!(classify(&failed), Some(Error::Provider { message, .. }) if message == "token endpoint down")
        );
        let other: StreamableHttpError<reqwest::Error> = StreamableHttpError::UnexpectedEndOfStream;
        assert!(classify(&other).is_none());
    }
}
