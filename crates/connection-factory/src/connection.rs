//! An MCP client session whose auth provider stays attached for the session's lifetime.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use mcp_clock::{Clock, SharedClock};
use rmcp::model::{CallToolRequestParams, CallToolResult, Tool};
use rmcp::service::{ClientInitializeError, RunningService, ServiceError};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::{
    AuthRequiredError, InsufficientScopeError, StreamableHttpClientTransportConfig,
};
use rmcp::{RoleClient, ServiceExt};

use crate::client::{AuthHttpClient, ProviderFailure};
use crate::error::Error;
use crate::provider::AuthProvider;

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
/// assert_eq!(options.get_connect_timeout(), Duration::from_secs(5));
/// ```
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    connect_timeout: Duration,
    request_timeout: Duration,
    max_concurrent_requests: usize,
    clock: SharedClock,
}

impl Default for ConnectOptions {
    /// 30 s to connect, 60 s per request, 16 POSTs in flight (rmcp's default), the system clock.
    fn default() -> Self {
        ConnectOptions {
            connect_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(60),
            max_concurrent_requests: 16,
            clock: SharedClock::system(),
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
    /// The clock the timeouts run on.
    pub fn clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }
    /// The connect timeout.
    pub fn get_connect_timeout(&self) -> Duration {
        self.connect_timeout
    }
    /// The per-request timeout.
    pub fn get_request_timeout(&self) -> Duration {
        self.request_timeout
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
    service: Option<RunningService<RoleClient, ()>>,
    client: AuthHttpClient,
    options: ConnectOptions,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("client", &self.client)
            .field("options", &self.options)
            .field("closed", &self.is_closed())
            .finish()
    }
}

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
        let client = AuthHttpClient::new(provider)?;
        let config = StreamableHttpClientTransportConfig::with_uri(url.to_owned())
            .max_concurrent_requests(options.max_concurrent_requests);
        let transport = StreamableHttpClientTransport::with_client(client.clone(), config);
        let handshake = async {
            ().serve(transport).await.map_err(|e| {
                let found = match &e {
                    // Its `source()` does not lead to the transport error: look inside.
                    ClientInitializeError::TransportError { error, .. } => classify(error),
                    other => classify(other),
                };
                found.unwrap_or_else(|| Error::Transport(Arc::new(e)))
            })
        };
        let connected = within(&options.clock, "connect", options.connect_timeout, handshake).await;
        match connected {
            Ok(service) => Ok(Connection { service: Some(service), client, options }),
            Err(e) => {
                client.detach();
                Err(e)
            }
        }
    }

    /// Every tool the server offers (all pages).
    ///
    /// # Errors
    /// As [`Connection::call_tool`].
    pub async fn list_tools(&self) -> Result<Vec<Tool>, Error> {
        let service = self.service()?;
        let timeout = self.options.request_timeout;
        within(&self.options.clock, "list_tools", timeout, async {
            service.list_all_tools().await.map_err(service_error)
        })
        .await
    }

    /// Call the tool `name` with `arguments`. A result with `is_error` set is a successful call.
    ///
    /// # Errors
    /// [`Error::AuthorizationRequired`] / [`Error::InsufficientScope`] when the server refused
    /// the request and the provider gave up; [`Error::Provider`] when the provider failed;
    /// [`Error::Timeout`] after the request timeout; [`Error::Protocol`] for a JSON-RPC error;
    /// [`Error::Closed`] after the session ended; [`Error::Transport`] otherwise.
    pub async fn call_tool(
        &self,
        name: &str,
        arguments: Option<serde_json::Map<String, serde_json::Value>>,
    ) -> Result<CallToolResult, Error> {
        let service = self.service()?;
        let mut params = CallToolRequestParams::new(name.to_owned());
        if let Some(arguments) = arguments {
            params = params.with_arguments(arguments);
        }
        let timeout = self.options.request_timeout;
        within(&self.options.clock, "call_tool", timeout, async {
            service.call_tool(params).await.map_err(service_error)
        })
        .await
    }

    /// Whether the session has ended (closed, or the transport gave up).
    pub fn is_closed(&self) -> bool {
        self.service.as_ref().is_none_or(RunningService::is_closed)
    }

    /// Detach the provider and end the session, waiting for rmcp's worker to stop.
    ///
    /// # Errors
    /// [`Error::Transport`] when the session task panicked.
    pub async fn close(mut self) -> Result<(), Error> {
        self.client.detach();
        if let Some(service) = self.service.take() {
            service.cancel().await.map_err(|e| Error::Transport(Arc::new(e)))?;
        }
        Ok(())
    }

    fn service(&self) -> Result<&RunningService<RoleClient, ()>, Error> {
        match &self.service {
            Some(s) if !s.is_closed() => Ok(s),
            _ => Err(Error::Closed),
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // Detach first: nothing the winding-down worker sends may reach the provider.
        self.client.detach();
    }
}

async fn within<T>(
    clock: &SharedClock,
    operation: &'static str,
    after: Duration,
    work: impl Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    tokio::select! {
        result = work => result,
        () = clock.sleep(after) => Err(Error::Timeout { operation, after }),
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
fn classify(e: &(dyn StdError + 'static)) -> Option<Error> {
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
