//! [`OAuthClient`]: the handle every protocol step hangs off, and the request helpers they share
//! (redirect rules, JSON documents, OAuth error bodies).

use std::sync::Arc;
use std::time::Duration;

use mcp_clock::SharedClock;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::error::{Endpoint, Error, Result};
use crate::http::{HttpClient, HttpRequest, HttpResponse, SharedHttpClient, same_origin};

/// Settings of an [`OAuthClient`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthConfig {
    /// Same-origin redirects followed while fetching a metadata document. Default 5.
    pub max_discovery_redirects: u8,
    /// How long a pending authorization (its `state` and PKCE verifier) stays valid. Default 10 min.
    pub authorization_ttl: Duration,
    /// Lifetime of `private_key_jwt` client assertions. Default 5 min.
    pub assertion_lifetime: Duration,
}

impl Default for OAuthConfig {
    fn default() -> Self {
        OAuthConfig {
            max_discovery_redirects: 5,
            authorization_ttl: Duration::from_secs(600),
            assertion_lifetime: Duration::from_secs(300),
        }
    }
}

/// The OAuth 2.1 client for MCP: discovery, registration, authorization, token requests and
/// revocation, over an [`HttpClient`] and a [`mcp_clock::Clock`].
///
/// Cheap to clone. Every request it sends carries its cancellation token
/// ([`OAuthClient::with_cancellation`]).
///
/// ```
/// use mcp_oauth::{HttpPolicy, OAuthClient, ReqwestHttpClient};
/// use mcp_clock::SharedClock;
/// let http = ReqwestHttpClient::new(HttpPolicy::default()).unwrap();
/// let client = OAuthClient::new(http, SharedClock::system());
/// # let _ = client;
/// ```
#[derive(Debug, Clone)]
pub struct OAuthClient {
    pub(crate) http: SharedHttpClient,
    pub(crate) clock: SharedClock,
    pub(crate) config: Arc<OAuthConfig>,
    pub(crate) cancel: CancellationToken,
}

impl OAuthClient {
    /// A client with the default [`OAuthConfig`].
    pub fn new(http: impl HttpClient + 'static, clock: SharedClock) -> Self {
        OAuthClient {
            http: SharedHttpClient::new(http),
            clock,
            config: Arc::new(OAuthConfig::default()),
            cancel: CancellationToken::new(),
        }
    }

    /// This client with `config`.
    pub fn with_config(mut self, config: OAuthConfig) -> Self {
        self.config = Arc::new(config);
        self
    }

    /// This client with every request tied to `cancel`: once it fires, requests in flight and
    /// later ones fail with [`Error::Cancelled`].
    pub fn with_cancellation(mut self, cancel: CancellationToken) -> Self {
        self.cancel = cancel;
        self
    }

    /// The settings in use.
    pub fn config(&self) -> &OAuthConfig {
        &self.config
    }

    pub(crate) async fn send(&self, mut request: HttpRequest) -> Result<HttpResponse> {
        if self.cancel.is_cancelled() {
            return Err(Error::Cancelled { url: request.url.to_string() });
        }
        request.cancel = self.cancel.clone();
        let url = request.url.to_string();
        tokio::select! {
            biased;
            () = self.cancel.cancelled() => Err(Error::Cancelled { url }),
            r = self.http.call(request) => r,
        }
    }

    /// GET a metadata document, following same-origin redirects up to the configured bound.
    /// `Ok(None)` for 4xx answers (the caller tries the next location).
    pub(crate) async fn get_document(&self, url: &Url) -> Result<Option<(Url, HttpResponse)>> {
        let mut current = url.clone();
        let mut hops = 0u8;
        loop {
            let response = self.send(HttpRequest::get(current.clone())).await?;
            if response.is_redirect() {
                let location = response.header("location").unwrap_or_default();
                let next = current.join(location).map_err(|e| Error::InvalidUrl {
                    url: location.to_owned(),
                    reason: e.to_string(),
                })?;
                if !same_origin(&current, &next) {
                    return Err(Error::Redirect {
                        from: current.to_string(),
                        to: next.to_string(),
                        reason: "discovery redirects must stay on the same origin",
                    });
                }
                if hops >= self.config.max_discovery_redirects {
                    return Err(Error::Redirect {
                        from: current.to_string(),
                        to: next.to_string(),
                        reason: "too many redirects",
                    });
                }
                hops += 1;
                current = next;
                continue;
            }
            return match response.status {
                200..=299 => Ok(Some((current, response))),
                400..=499 if response.status != 429 => Ok(None),
                status => Err(Error::HttpStatus { url: current.to_string(), status }),
            };
        }
    }

    /// POST to an endpoint that must not redirect; 3xx is an error.
    pub(crate) async fn post_no_redirect(&self, request: HttpRequest) -> Result<HttpResponse> {
        let url = request.url.clone();
        let response = self.send(request).await?;
        if (300..400).contains(&response.status) {
            return Err(Error::Redirect {
                from: url.to_string(),
                to: response.header("location").unwrap_or_default().to_owned(),
                reason: "OAuth endpoint requests never follow redirects",
            });
        }
        Ok(response)
    }
}

/// Parse a JSON body, insisting on a JSON content type when one is given.
pub(crate) fn parse_json<T: DeserializeOwned>(
    what: &'static str,
    url: &Url,
    response: &HttpResponse,
) -> Result<T> {
    if let Some(ct) = response.header("content-type") {
        let mime = ct.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
        if mime != "application/json" && !mime.ends_with("+json") {
            return Err(Error::malformed(
                what,
                url,
                format!("content type {mime:?}, expected application/json"),
            ));
        }
    }
    serde_json::from_slice(&response.body).map_err(|e| Error::malformed(what, url, e.to_string()))
}

#[derive(Deserialize)]
struct OAuthErrorBody {
    error: String,
    error_description: Option<String>,
    error_uri: Option<String>,
}

/// An error response from `endpoint`: an OAuth error if the body is one, else the bare status.
pub(crate) fn endpoint_error(endpoint: Endpoint, url: &Url, response: &HttpResponse) -> Error {
    match serde_json::from_slice::<OAuthErrorBody>(&response.body) {
        Ok(body) => Error::OAuth {
            endpoint,
            status: response.status,
            code: body.error,
            description: body.error_description,
            uri: body.error_uri,
        },
        Err(_) => Error::HttpStatus { url: url.to_string(), status: response.status },
    }
}
