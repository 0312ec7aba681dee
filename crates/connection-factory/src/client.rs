//! The rmcp HTTP client whose every request goes through an [`AuthProvider`].

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

use mcp_clock::{Clock as _, SharedClock};
use mcp_oauth::DpopKey;
use reqwest::header::{HeaderName, HeaderValue};
use rmcp::model::ClientJsonRpcMessage;
use rmcp::transport::common::client_side_sse::BoxedSseResponse;
use rmcp::transport::streamable_http_client::{
    AuthRequiredError, InsufficientScopeError, StreamableHttpClient, StreamableHttpError,
    StreamableHttpPostResponse, StreamableHttpResponseLimits,
};

use crate::challenge::{Refusal, RequestKind};
use crate::error::Error;
use crate::provider::{AuthProvider, Recovery};
use crate::secret::Secret;

type HttpError = StreamableHttpError<reqwest::Error>;

/// Carries an [`Error`] from the provider through rmcp's transport error (as the source of a
/// `std::io::Error`), so that [`Connection`](crate::Connection) can hand it back typed.
#[derive(Debug)]
pub(crate) struct ProviderFailure(pub(crate) Error);

impl fmt::Display for ProviderFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for ProviderFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.0)
    }
}

#[derive(Debug, Default)]
struct Slot {
    provider: Option<Arc<dyn AuthProvider>>,
    /// The last token a request carried, kept for requests made after detaching (rmcp's
    /// session DELETE when the worker winds down), which must not reach the provider.
    last_token: Option<Secret>,
    /// The DPoP key `last_token` is bound to, if any (a bound token is never sent as Bearer).
    last_dpop: Option<DpopKey>,
}

/// rmcp's streamable-HTTP client (reqwest) with an [`AuthProvider`] in front of every request.
///
/// For each request (the POSTs, the GET SSE stream and its reconnects, the session DELETE) it
/// asks the provider for the current token and sends it as `Authorization: Bearer`. On a 401
/// or a 403, it calls
/// [`AuthProvider::on_unauthorized`] with the token the request carried and, on
/// [`Recovery::Retry`], sends the request **once** more with the new token. A second refusal is
/// returned as it is, so a server that keeps refusing cannot cause a loop.
///
/// The `auth_header` rmcp passes in is ignored: the provider is the only source of tokens.
///
/// A refusal is a 401 or 403 **with** a `WWW-Authenticate` header (as RFC 6750 and RFC 9728
/// require), or a bare 401 or 403 without one, which some servers send: rmcp's reqwest client
/// reports that as an unexpected response or a status error, and this client hands it to the
/// provider as a [`Refusal`] with no header (a 403 is a missing scope: a step-up). A server that reports an expired token with another
/// status (such as 400) surfaces as a transport error without reaching the provider.
///
/// Clones share one attachment. [`AuthHttpClient::detach`] (done by dropping the
/// [`Connection`](crate::Connection)) cuts every clone off from the provider: no provider call
/// starts after it returns, and later requests (rmcp's session clean-up) carry the last token
/// used, without recovery.
///
/// ```
/// # #[derive(Debug)] struct P;
/// # #[async_trait::async_trait]
/// # impl connection_factory::AuthProvider for P {
/// #     async fn current_token(&self) -> Result<Option<connection_factory::Secret>, connection_factory::Error> { Ok(None) }
/// #     async fn on_unauthorized(&self, _: Option<&connection_factory::Secret>, _: &connection_factory::Refusal) -> Result<connection_factory::Recovery, connection_factory::Error> { Ok(connection_factory::Recovery::AuthorizationRequired) }
/// # }
/// use connection_factory::AuthHttpClient;
/// use std::sync::Arc;
///
/// let client = AuthHttpClient::new(Arc::new(P))?;
/// assert!(client.is_attached());
/// let clone = client.clone();
/// client.detach();
/// assert!(!clone.is_attached());
/// # Ok::<(), connection_factory::Error>(())
/// ```
#[derive(Clone)]
pub struct AuthHttpClient {
    http: reqwest::Client,
    slot: Arc<Mutex<Slot>>,
    /// The clock of DPoP proofs' `iat`.
    clock: SharedClock,
}

impl fmt::Debug for AuthHttpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let slot = self.lock();
        f.debug_struct("AuthHttpClient")
            .field("provider", &slot.provider)
            .field("last_token", &slot.last_token)
            .finish_non_exhaustive()
    }
}

impl AuthHttpClient {
    /// A client with its own reqwest connection pool (no proxy, no redirects: a bearer token
    /// is never sent on to another URL).
    ///
    /// # Errors
    /// [`Error::Transport`] when the HTTP client cannot be built.
    pub fn new(provider: Arc<dyn AuthProvider>) -> Result<Self, Error> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| Error::Transport(Arc::new(e)))?;
        Ok(Self::with_reqwest(http, provider))
    }

    /// Like [`AuthHttpClient::new`], but through the proxy the environment names
    /// (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`, minus `NO_PROXY`). Still no redirects.
    ///
    /// # Errors
    /// [`Error::Transport`] when the HTTP client cannot be built.
    pub fn with_env_proxy(provider: Arc<dyn AuthProvider>) -> Result<Self, Error> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| Error::Transport(Arc::new(e)))?;
        Ok(Self::with_reqwest(http, provider))
    }

    pub(crate) fn with_reqwest(http: reqwest::Client, provider: Arc<dyn AuthProvider>) -> Self {
        AuthHttpClient {
            http,
            slot: Arc::new(Mutex::new(Slot {
                provider: Some(provider),
                last_token: None,
                last_dpop: None,
            })),
            clock: SharedClock::system(),
        }
    }

    /// This client with `clock` for the `iat` of DPoP proofs (default: the system clock).
    pub fn with_clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }

    /// The `Authorization` of a request carrying `token`: Bearer (as rmcp's auth header), or
    /// with a DPoP key, `DPoP <token>` and a fresh proof for `method` on `uri`.
    fn credentials(
        &self,
        dpop: Option<&DpopKey>,
        token: Option<&Secret>,
        method: &str,
        uri: &str,
    ) -> Result<(Option<String>, Headers), HttpError> {
        let (Some(key), Some(token)) = (dpop, token) else {
            return Ok((token.map(|t| t.expose().to_owned()), Headers::new()));
        };
        let url: url::Url = uri
            .parse()
            .map_err(|e| layer_error(Error::InvalidConfig(format!("the MCP URL {uri:?}: {e}"))))?;
        let proof = key
            .proof(method, &url, Some(token.expose()), self.clock.now())
            .map_err(|e| layer_error(Error::provider("signing a DPoP proof", e)))?;
        let header = |v: String| {
            HeaderValue::from_str(&v).map_err(|_| {
                layer_error(Error::provider_msg("the token cannot be sent in a header"))
            })
        };
        let mut headers = Headers::new();
        headers.insert(reqwest::header::AUTHORIZATION, header(format!("DPoP {}", token.expose()))?);
        headers.insert(HeaderName::from_static("dpop"), header(proof)?);
        Ok((None, headers))
    }

    /// RFC 9449 §9: the server refused a DPoP request for want of its nonce. rmcp's transport
    /// does not hand back the `DPoP-Nonce` response header, so ask for it with a `ping` (a
    /// request without effects, refused for the same reason before it is processed) and
    /// remember it. Returns whether a nonce was learnt.
    async fn fetch_nonce(&self, key: &DpopKey, token: &Secret, uri: &str) -> bool {
        let Ok((_, headers)) = self.credentials(Some(key), Some(token), "POST", uri) else {
            return false;
        };
        let body = r#"{"jsonrpc":"2.0","id":"dpop-nonce","method":"ping"}"#;
        let request = self
            .http
            .post(uri)
            .headers(headers.into_iter().collect())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(reqwest::header::ACCEPT, "application/json, text/event-stream")
            .body(body);
        let Ok(response) = request.send().await else { return false };
        let nonce = response.headers().get("dpop-nonce").and_then(|v| v.to_str().ok());
        match (nonce, uri.parse::<url::Url>()) {
            (Some(nonce), Ok(url)) => {
                key.remember_nonce(&url, nonce);
                true
            }
            _ => false,
        }
    }

    /// Cut this client and all its clones off from the provider. Idempotent.
    pub fn detach(&self) {
        self.lock().provider = None;
    }

    /// Whether the provider is still attached.
    pub fn is_attached(&self) -> bool {
        self.lock().provider.is_some()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn provider(&self) -> Option<Arc<dyn AuthProvider>> {
        self.lock().provider.clone()
    }

    fn remember(&self, token: Option<&Secret>, dpop: Option<&DpopKey>) {
        if let Some(token) = token {
            let mut slot = self.lock();
            if slot.last_token.as_ref() != Some(token) {
                slot.last_token = Some(token.clone());
            }
            slot.last_dpop = dpop.cloned();
        }
    }

    /// Send with the current token; on a refusal, ask the provider and retry once. `method` and
    /// `uri` are the request's, for DPoP proofs.
    async fn authorized<T, F, Fut>(
        &self,
        kind: RequestKind,
        method: &str,
        uri: &str,
        send: F,
    ) -> Result<T, HttpError>
    where
        F: Fn(Option<String>, Headers) -> Fut,
        Fut: Future<Output = Result<T, HttpError>>,
    {
        let Some(provider) = self.provider() else {
            let (token, dpop) = {
                let slot = self.lock();
                (slot.last_token.clone(), slot.last_dpop.clone())
            };
            return self.send_as(&send, kind, dpop.as_ref(), token.as_ref(), method, uri).await;
        };
        let token = provider.current_token().await.map_err(layer_error)?;
        let dpop = provider.dpop_key();
        drop(provider);
        self.remember(token.as_ref(), dpop.as_ref());
        let first = self.send_as(&send, kind, dpop.as_ref(), token.as_ref(), method, uri).await;
        let challenge = match &first {
            Err(StreamableHttpError::AuthRequired(e)) => {
                Refusal::new(401, kind, vec![e.www_authenticate_header.clone()])
            }
            Err(StreamableHttpError::InsufficientScope(e)) => {
                Refusal::new(403, kind, vec![e.www_authenticate_header.clone()])
            }
            Err(e) if bare_unauthorized(e) => Refusal::new(401, kind, Vec::new()),
            Err(e) if bare_forbidden(e) => Refusal::new(403, kind, Vec::new()),
            _ => return first,
        };
        // Dropping the connection while the request was in flight detaches the provider.
        let Some(provider) = self.provider() else { return first };
        let recovery = provider.on_unauthorized(token.as_ref(), &challenge).await;
        let dpop = provider.dpop_key();
        drop(provider);
        match recovery.map_err(layer_error)? {
            Recovery::Retry(fresh) if Some(&fresh) != token.as_ref() => {
                tracing::debug!(request = %kind, status = challenge.status(), "retrying once with a recovered token");
                self.remember(Some(&fresh), dpop.as_ref());
                self.send_as(&send, kind, dpop.as_ref(), Some(&fresh), method, uri).await
            }
            Recovery::Retry(_) => first,
            Recovery::AuthorizationRequired => {
                let header = challenge.www_authenticate().first().cloned().unwrap_or_default();
                Err(StreamableHttpError::AuthRequired(AuthRequiredError::new(header)))
            }
            Recovery::InsufficientScope => {
                let header = challenge.www_authenticate().first().cloned().unwrap_or_default();
                Err(StreamableHttpError::InsufficientScope(InsufficientScopeError::new(
                    header,
                    challenge.scope(),
                )))
            }
        }
    }
}

impl AuthHttpClient {
    /// One request with `token` (DPoP-bound when `dpop` is set). A DPoP server that refuses it
    /// for want of its nonce (`use_dpop_nonce`) gets it once more with the nonce.
    async fn send_as<T, F, Fut>(
        &self,
        send: &F,
        kind: RequestKind,
        dpop: Option<&DpopKey>,
        token: Option<&Secret>,
        method: &str,
        uri: &str,
    ) -> Result<T, HttpError>
    where
        F: Fn(Option<String>, Headers) -> Fut,
        Fut: Future<Output = Result<T, HttpError>>,
    {
        let (auth, headers) = self.credentials(dpop, token, method, uri)?;
        let result = send(auth, headers).await;
        if let (Some(key), Some(t), Err(StreamableHttpError::AuthRequired(e))) =
            (dpop, token, &result)
            && Refusal::new(401, kind, vec![e.www_authenticate_header.clone()]).error().as_deref()
                == Some("use_dpop_nonce")
            && self.fetch_nonce(key, t, uri).await
        {
            tracing::debug!(request = %kind, "retrying once with the server's DPoP nonce");
            let (auth, headers) = self.credentials(Some(key), Some(t), method, uri)?;
            return send(auth, headers).await;
        }
        result
    }
}

/// `base` with `extra` added (the credentials of one attempt).
fn merged(base: &Headers, extra: Headers) -> Headers {
    let mut all = base.clone();
    all.extend(extra);
    all
}

/// A 401 without a `WWW-Authenticate` header, as rmcp's reqwest client reports it: an
/// unexpected response (`HTTP 401 Unauthorized: <body>`) on a POST, the HTTP client's status
/// error on the GET stream and the session DELETE.
fn bare_unauthorized(e: &HttpError) -> bool {
    match e {
        StreamableHttpError::UnexpectedServerResponse(message) => message.starts_with("HTTP 401 "),
        StreamableHttpError::Client(e) => e.status() == Some(reqwest::StatusCode::UNAUTHORIZED),
        _ => false,
    }
}

/// A 403 without a `WWW-Authenticate` header (as [`bare_unauthorized`]): the provider treats it
/// as a missing scope (a step-up), as the seed does for any 403.
fn bare_forbidden(e: &HttpError) -> bool {
    match e {
        StreamableHttpError::UnexpectedServerResponse(message) => message.starts_with("HTTP 403 "),
        StreamableHttpError::Client(e) => e.status() == Some(reqwest::StatusCode::FORBIDDEN),
        _ => false,
    }
}

fn layer_error(e: Error) -> HttpError {
    StreamableHttpError::Io(std::io::Error::other(ProviderFailure(e)))
}

type Headers = HashMap<HeaderName, HeaderValue>;

impl StreamableHttpClient for AuthHttpClient {
    type Error = reqwest::Error;

    async fn post_message(
        &self,
        uri: Arc<str>,
        message: ClientJsonRpcMessage,
        session_id: Option<Arc<str>>,
        _auth_header: Option<String>,
        custom_headers: Headers,
    ) -> Result<StreamableHttpPostResponse, HttpError> {
        self.authorized(RequestKind::Post, "POST", &uri, |token, extra| {
            self.http.post_message(
                uri.clone(),
                message.clone(),
                session_id.clone(),
                token,
                merged(&custom_headers, extra),
            )
        })
        .await
    }

    async fn post_message_with_max_sse_event_size(
        &self,
        uri: Arc<str>,
        message: ClientJsonRpcMessage,
        session_id: Option<Arc<str>>,
        _auth_header: Option<String>,
        custom_headers: Headers,
        max_sse_event_size: usize,
    ) -> Result<StreamableHttpPostResponse, HttpError> {
        self.authorized(RequestKind::Post, "POST", &uri, |token, extra| {
            self.http.post_message_with_max_sse_event_size(
                uri.clone(),
                message.clone(),
                session_id.clone(),
                token,
                merged(&custom_headers, extra),
                max_sse_event_size,
            )
        })
        .await
    }

    async fn post_message_with_response_limits(
        &self,
        uri: Arc<str>,
        message: ClientJsonRpcMessage,
        session_id: Option<Arc<str>>,
        _auth_header: Option<String>,
        custom_headers: Headers,
        limits: StreamableHttpResponseLimits,
    ) -> Result<StreamableHttpPostResponse, HttpError> {
        self.authorized(RequestKind::Post, "POST", &uri, |token, extra| {
            self.http.post_message_with_response_limits(
                uri.clone(),
                message.clone(),
                session_id.clone(),
                token,
                merged(&custom_headers, extra),
                limits,
            )
        })
        .await
    }

    async fn delete_session(
        &self,
        uri: Arc<str>,
        session_id: Arc<str>,
        _auth_header: Option<String>,
        custom_headers: Headers,
    ) -> Result<(), HttpError> {
        self.authorized(RequestKind::DeleteSession, "DELETE", &uri, |token, extra| {
            self.http.delete_session(
                uri.clone(),
                session_id.clone(),
                token,
                merged(&custom_headers, extra),
            )
        })
        .await
    }

    async fn get_stream(
        &self,
        uri: Arc<str>,
        session_id: Option<Arc<str>>,
        last_event_id: Option<String>,
        _auth_header: Option<String>,
        custom_headers: Headers,
    ) -> Result<BoxedSseResponse, HttpError> {
        self.authorized(RequestKind::GetStream, "GET", &uri, |token, extra| {
            self.http.get_stream(
                uri.clone(),
                session_id.clone(),
                last_event_id.clone(),
                token,
                merged(&custom_headers, extra),
            )
        })
        .await
    }

    async fn get_stream_with_max_sse_event_size(
        &self,
        uri: Arc<str>,
        session_id: Option<Arc<str>>,
        last_event_id: Option<String>,
        _auth_header: Option<String>,
        custom_headers: Headers,
        max_sse_event_size: usize,
    ) -> Result<BoxedSseResponse, HttpError> {
        self.authorized(RequestKind::GetStream, "GET", &uri, |token, extra| {
            self.http.get_stream_with_max_sse_event_size(
                uri.clone(),
                session_id.clone(),
                last_event_id.clone(),
                token,
                merged(&custom_headers, extra),
                max_sse_event_size,
            )
        })
        .await
    }
}
