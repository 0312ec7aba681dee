//! [`OAuthClient`]: the handle every protocol step hangs off, and the request helpers they share
//! (redirect rules, JSON documents, OAuth error bodies).

use std::sync::Arc;
use std::time::Duration;

use mcp_clock::{Clock, SharedClock, Timestamp};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::discovery::Bounds;
use crate::error::{Endpoint, Error, Result};
use crate::http::{HttpClient, HttpRequest, HttpResponse, Reach, SharedHttpClient, same_origin};

/// Settings of an [`OAuthClient`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthConfig {
    /// Same-origin redirects followed while fetching a metadata document. Default 5.
    pub max_discovery_redirects: u8,
    /// How long a pending authorization (its `state` and PKCE verifier) stays valid. Default 10 min.
    pub authorization_ttl: Duration,
    /// Lifetime of `private_key_jwt` client assertions. Default 5 min.
    pub assertion_lifetime: Duration,
    /// Whether authorization and token requests carry the RFC 8707 `resource` parameter.
    /// Default true; some servers (Microsoft Entra) reject it.
    pub send_resource: bool,
    /// The `resource` to send instead of the discovered one. Default `None`.
    pub resource_override: Option<String>,
    /// Extra query parameters of the authorization URL (e.g. `prompt=consent`), after the
    /// protocol's own. A name the protocol sets itself ([`RESERVED_AUTHORIZATION_PARAMS`]) is
    /// not sent twice: such an entry is skipped. Default none.
    pub extra_authorization_params: Vec<(String, String)>,
    /// Accept `http` endpoints on hosts that are not loopback in authorization server metadata
    /// (the HTTP client must allow them too: [`SsrfPolicy::allow_http`](crate::SsrfPolicy)).
    /// Default false.
    pub allow_insecure_http: bool,
    /// Let a server on a public address name loopback or private authorization servers and
    /// endpoints in its metadata (refused by default; servers on loopback or private addresses
    /// may always). Default false.
    pub allow_internal_endpoints: bool,
}

/// The authorization-request parameters the client sets itself, which
/// [`OAuthConfig::extra_authorization_params`] cannot replace.
///
/// ```
/// assert!(mcp_oauth::RESERVED_AUTHORIZATION_PARAMS.contains(&"state"));
/// ```
pub const RESERVED_AUTHORIZATION_PARAMS: &[&str] = &[
    "response_type",
    "client_id",
    "redirect_uri",
    "code_challenge",
    "code_challenge_method",
    "state",
    "resource",
    "scope",
];

impl Default for OAuthConfig {
    fn default() -> Self {
        OAuthConfig {
            max_discovery_redirects: 5,
            authorization_ttl: Duration::from_secs(600),
            assertion_lifetime: Duration::from_secs(300),
            send_resource: true,
            resource_override: None,
            extra_authorization_params: Vec::new(),
            allow_insecure_http: false,
            allow_internal_endpoints: false,
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
    /// The DPoP key token requests are bound to, if any.
    pub(crate) dpop: Option<crate::dpop::DpopKey>,
}

impl OAuthClient {
    /// A client with the default [`OAuthConfig`].
    pub fn new(http: impl HttpClient + 'static, clock: SharedClock) -> Self {
        OAuthClient {
            http: SharedHttpClient::new(http),
            clock,
            config: Arc::new(OAuthConfig::default()),
            cancel: CancellationToken::new(),
            dpop: None,
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

    /// The `resource` parameter to send for `discovered`, per the config (`None`: send none).
    pub(crate) fn resource_param(&self, discovered: &str) -> Option<String> {
        self.config
            .send_resource
            .then(|| self.config.resource_override.clone().unwrap_or_else(|| discovered.to_owned()))
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

    /// How far the URLs of `server`'s discovery may point (see [`Bounds`]).
    pub(crate) fn bounds(&self, server: &Url) -> Bounds {
        Bounds::of(server, self.config.allow_internal_endpoints)
    }

    /// GET a metadata document, following same-origin redirects up to the configured bound.
    /// `Ok(None)` for 4xx answers (the caller tries the next location).
    pub(crate) async fn get_document(
        &self,
        url: &Url,
        reach: Reach,
    ) -> Result<Option<(Url, HttpResponse)>> {
        let mut current = url.clone();
        let mut hops = 0u8;
        loop {
            let response = self.send(HttpRequest::get(current.clone()).with_reach(reach)).await?;
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
                status => Err(Error::HttpStatus {
                    url: current.to_string(),
                    status,
                    retry_after: retry_after(&response, self.clock.now()),
                }),
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
/// `now` is the client's clock, for a `Retry-After` date when the response has no `Date`.
pub(crate) fn endpoint_error(
    endpoint: Endpoint,
    url: &Url,
    response: &HttpResponse,
    now: Timestamp,
) -> Error {
    let retry_after = retry_after(response, now);
    match serde_json::from_slice::<OAuthErrorBody>(&response.body) {
        Ok(body) => Error::OAuth {
            endpoint,
            status: response.status,
            code: body.error,
            description: body.error_description,
            uri: body.error_uri,
            retry_after,
        },
        Err(_) => Error::HttpStatus { url: url.to_string(), status: response.status, retry_after },
    }
}

fn http_date_millis(value: &str) -> Option<u64> {
    let t = httpdate::parse_http_date(value.trim()).ok()?;
    let since = t.duration_since(std::time::UNIX_EPOCH).ok()?;
    Some(u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
}

/// RFC 9110 §10.2.3 `Retry-After`: delta-seconds, or an HTTP-date measured from the response's
/// `Date` (else `now`). `None` when absent or unparsable; a past date is zero.
pub(crate) fn retry_after(response: &HttpResponse, now: Timestamp) -> Option<Duration> {
    let value = response.header("retry-after")?.trim();
    let delay = if let Ok(secs) = value.parse::<u64>() {
        Duration::from_secs(secs)
    } else {
        let at = http_date_millis(value)?;
        let base = response.header("date").and_then(http_date_millis).unwrap_or(now.as_millis());
        Duration::from_millis(at.saturating_sub(base))
    };
    // A server cannot park a client for days: a longer wait is cut to the limit.
    Some(delay.min(MAX_RETRY_AFTER))
}

/// The longest `Retry-After` honoured.
pub(crate) const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

#[cfg(test)]
mod tests {
    use super::*;

    fn with(headers: &[(&str, &str)]) -> HttpResponse {
        headers.iter().fold(HttpResponse::new(429), |r, (n, v)| r.with_header(n, v))
    }

    #[test]
    fn retry_after_as_delta_seconds() {
        let now = Timestamp::from_secs(1_000);
        assert_eq!(retry_after(&with(&[("retry-after", "7")]), now), Some(Duration::from_secs(7)));
        assert_eq!(retry_after(&with(&[("Retry-After", " 0 ")]), now), Some(Duration::ZERO));
        assert_eq!(retry_after(&with(&[]), now), None);
        assert_eq!(retry_after(&with(&[("retry-after", "soon")]), now), None);
        assert_eq!(retry_after(&with(&[("retry-after", "-5")]), now), None);
        // Clamped to one hour, as a number or a far-away date.
        let hour = Some(Duration::from_secs(3600));
        assert_eq!(retry_after(&with(&[("retry-after", "3601")]), now), hour);
        assert_eq!(retry_after(&with(&[("retry-after", "99999999999")]), now), hour);
        let far = with(&[("retry-after", "Fri, 31 Dec 2100 23:59:59 GMT")]);
        assert_eq!(retry_after(&far, now), hour);
    }

    #[test]
    fn retry_after_as_a_date_is_measured_from_the_response_date_else_our_clock() {
        // 1445412480 is Wed, 21 Oct 2015 07:28:00 GMT.
        let date = "Wed, 21 Oct 2015 07:28:00 GMT";
        let later = "Wed, 21 Oct 2015 07:28:30 GMT";
        let skewed = Timestamp::from_secs(1_445_412_480 + 3_600);
        let r = with(&[("retry-after", later), ("date", date)]);
        assert_eq!(
            retry_after(&r, skewed),
            Some(Duration::from_secs(30)),
            "the server's Date wins"
        );
        let r = with(&[("retry-after", later)]);
        let now = Timestamp::from_secs(1_445_412_480 + 10);
        assert_eq!(retry_after(&r, now), Some(Duration::from_secs(20)));
        assert_eq!(retry_after(&r, skewed), Some(Duration::ZERO), "a past date is no wait");
    }

    #[test]
    fn endpoint_errors_carry_retry_after() {
        let url: Url = "https://as.example.com/token".parse().unwrap();
        let now = Timestamp::from_secs(0);
        let oauth =
            HttpResponse::json(503, &serde_json::json!({"error": "temporarily_unavailable"}))
                .with_header("retry-after", "12");
        let e = endpoint_error(Endpoint::Token, &url, &oauth, now);
        assert!(matches!(e, Error::OAuth { status: 503, .. }));
        assert_eq!(e.retry_after(), Some(Duration::from_secs(12)));
        let bare = HttpResponse::new(502).with_header("retry-after", "3");
        let e = endpoint_error(Endpoint::Token, &url, &bare, now);
        assert!(matches!(e, Error::HttpStatus { status: 502, .. }));
        assert_eq!(e.retry_after(), Some(Duration::from_secs(3)));
        assert_eq!(
            endpoint_error(Endpoint::Token, &url, &HttpResponse::new(500), now).retry_after(),
            None
        );
    }
}
