//! The crate's one error type, and how each error maps onto the token-storage policy.

use std::fmt;
use std::time::Duration;

/// Which OAuth endpoint answered with an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Endpoint {
    /// The authorization server's token endpoint.
    Token,
    /// The RFC 7591 registration endpoint.
    Registration,
    /// The RFC 7009 revocation endpoint.
    Revocation,
    /// The identity provider's token endpoint during an RFC 8693 token exchange (SEP-990).
    TokenExchange,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Endpoint::Token => "token endpoint",
            Endpoint::Registration => "registration endpoint",
            Endpoint::Revocation => "revocation endpoint",
            Endpoint::TokenExchange => "identity provider token endpoint",
        })
    }
}

/// How the token-storage policy should treat an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorClass {
    /// The credentials are dead: drop the refresh token (or the registration) and authorize again.
    /// `invalid_grant`, `invalid_client`, `unauthorized_client` and the other OAuth error codes.
    Terminal,
    /// Try again later with the same credentials: network failures, timeouts, 5xx, 429,
    /// `temporarily_unavailable`, `server_error`.
    Transient,
    /// Neither: a local configuration problem, a refused URL, a cancelled request, or a server
    /// that does not follow the protocol. Retrying will not help; the credentials may still be good.
    Other,
}

/// Every error this crate returns.
///
/// [`Error::class`] maps an error onto the token-storage policy; [`Error::is_stale_registration`]
/// tells the caller to replace its client registration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A URL could not be parsed or used.
    #[error("invalid URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A plain-HTTP URL that is not on a loopback address.
    #[error("refused {url}: HTTPS is required except on loopback addresses")]
    InsecureUrl {
        /// The refused URL.
        url: String,
    },
    /// The SSRF policy refused the address a URL names or resolves to.
    #[error("refused {url}: {kind} addresses are not allowed by the SSRF policy")]
    SsrfRefused {
        /// The refused URL.
        url: String,
        /// The kind of address (`private`, `link-local`, `cloud metadata`, `loopback`, ...).
        kind: &'static str,
    },
    /// The request did not finish in time.
    #[error("request to {url} timed out after {timeout:?}")]
    Timeout {
        /// The request URL.
        url: String,
        /// The timeout that passed.
        timeout: Duration,
    },
    /// The request's cancellation token fired.
    #[error("request to {url} was cancelled")]
    Cancelled {
        /// The request URL.
        url: String,
    },
    /// Connecting, sending or receiving failed.
    #[error("HTTP transport error talking to {url}")]
    Transport {
        /// The request URL.
        url: String,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The response body is larger than the cap (1 MiB by default).
    #[error("response body from {url} is larger than {limit} bytes")]
    BodyTooLarge {
        /// The request URL.
        url: String,
        /// The cap in bytes.
        limit: usize,
    },
    /// A redirect that the request kind does not allow (token requests: none; discovery:
    /// same origin only, bounded).
    #[error("refused redirect from {from} to {to}: {reason}")]
    Redirect {
        /// The URL that answered with a redirect.
        from: String,
        /// The `Location` it pointed to.
        to: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// An HTTP status the protocol step does not expect, without an OAuth error body.
    #[error("unexpected HTTP status {status} from {url}")]
    HttpStatus {
        /// The request URL.
        url: String,
        /// The status code.
        status: u16,
        /// The response's `Retry-After` as a delay, when it sent one (see [`Error::retry_after`]).
        retry_after: Option<Duration>,
    },
    /// A document or response that does not parse or lacks a required member: malformed JSON,
    /// a wrong content type, a missing `issuer` or `access_token`.
    #[error("malformed {what} from {url}: {reason}")]
    Malformed {
        /// What was being read (`protected resource metadata`, `token response`, ...).
        what: &'static str,
        /// Where it came from.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// No metadata document was found at any of the well-known locations.
    #[error("no {what} found (tried {})", tried.join(", "))]
    MetadataNotFound {
        /// What was looked for.
        what: &'static str,
        /// Every URL tried, in order.
        tried: Vec<String>,
    },
    /// The protected-resource metadata names a resource that does not cover the MCP server.
    #[error(
        "protected resource metadata names resource {found}, which does not cover the server {server}"
    )]
    ResourceMismatch {
        /// The MCP server URL.
        server: String,
        /// The `resource` member of the metadata.
        found: String,
    },
    /// The authorization server metadata, or the `iss` callback parameter, names another issuer.
    #[error("issuer mismatch: expected {expected}, got {found}")]
    IssuerMismatch {
        /// The issuer we expected.
        expected: String,
        /// What the server said (empty when the `iss` parameter was missing).
        found: String,
    },
    /// Client credentials registered with one authorization server were about to be used with
    /// another (MCP 2026-07-28, SEP-2352: credentials are bound to their issuer). Nothing was
    /// sent; register with the new server instead.
    #[error("the client registration belongs to issuer {registered}, not {discovered}")]
    RegistrationIssuerMismatch {
        /// The issuer the registration belongs to.
        registered: String,
        /// The issuer discovery names now.
        discovered: String,
    },
    /// The authorization server does not advertise PKCE S256: `code_challenge_methods_supported`
    /// lacks it, or is absent (MCP 2025-11-25 and later: the client must not proceed).
    #[error(
        "the authorization server does not advertise PKCE S256 (code_challenge_methods_supported: {methods:?})"
    )]
    PkceUnsupported {
        /// The methods it lists.
        methods: Vec<String>,
    },
    /// A required endpoint or capability is not available.
    #[error("the authorization server offers no {0}")]
    Unsupported(&'static str),
    /// The callback's `state` does not belong to a pending authorization (or was already used).
    #[error("unknown or already used authorization state")]
    UnknownState,
    /// The pending authorization is older than its time to live.
    #[error("the authorization expired before the callback arrived")]
    StateExpired,
    /// The authorization server redirected back with an error instead of a code.
    #[error("authorization was refused: {error}")]
    AuthorizationDenied {
        /// The OAuth error code (`access_denied`, ...).
        error: String,
        /// The server's `error_description`, if any.
        description: Option<String>,
    },
    /// An OAuth error response (RFC 6749 §5.2) from an endpoint, with the server's code kept.
    #[error("{endpoint} answered {status} with OAuth error {code:?}")]
    OAuth {
        /// The endpoint that answered.
        endpoint: Endpoint,
        /// The HTTP status.
        status: u16,
        /// The OAuth `error` code.
        code: String,
        /// The `error_description`, if any.
        description: Option<String>,
        /// The `error_uri`, if any.
        uri: Option<String>,
        /// The response's `Retry-After` as a delay, when it sent one (see [`Error::retry_after`]).
        retry_after: Option<Duration>,
    },
    /// A token response whose `token_type` is not `Bearer`.
    #[error("unsupported token type {0:?} (only Bearer is supported)")]
    UnsupportedTokenType(String),
    /// Step-up authorization was tried as many times as allowed.
    #[error("gave up after {attempts} authorization attempts for the same request")]
    StepUpLimit {
        /// How many attempts were made.
        attempts: u32,
    },
    /// A `WWW-Authenticate` header that does not follow RFC 9110 §11.6.1.
    #[error("invalid WWW-Authenticate header at byte {position}: {reason}")]
    InvalidChallenge {
        /// Byte offset of the problem.
        position: usize,
        /// What was expected.
        reason: &'static str,
    },
    /// A private key or client configuration that cannot be used.
    #[error("invalid client configuration: {0}")]
    InvalidConfig(String),
}

impl Error {
    /// Whether the request certainly never reached the server: it was refused before sending
    /// (a URL the policy refuses) or no connection could be made, so the server cannot have
    /// acted on it. `false` whenever it may have: a timeout, a connection reset or a body that
    /// broke off after the request went out, any answer. A refresh-token grant that fails
    /// without this is in doubt (the server may have rotated the token).
    ///
    /// ```
    /// let e = mcp_oauth::Error::Timeout { url: "https://as.example/token".into(), timeout: std::time::Duration::from_secs(5) };
    /// assert!(!e.never_sent());
    /// ```
    pub fn never_sent(&self) -> bool {
        match self {
            Error::InvalidUrl { .. } | Error::InsecureUrl { .. } | Error::SsrfRefused { .. } => {
                true
            }
            Error::Transport { source, .. } => source.downcast_ref::<NotSent>().is_some(),
            _ => false,
        }
    }

    /// How the token-storage policy should treat this error.
    ///
    /// ```
    /// use mcp_oauth::{Endpoint, Error, ErrorClass};
    /// let e = Error::OAuth {
    ///     endpoint: Endpoint::Token,
    ///     status: 400,
    ///     code: "invalid_grant".into(),
    ///     description: None,
    ///     uri: None,
    ///     retry_after: None,
    /// };
    /// assert_eq!(e.class(), ErrorClass::Terminal);
    /// ```
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::Timeout { .. } | Error::Transport { .. } => ErrorClass::Transient,
            Error::HttpStatus { status, .. } if *status == 429 || *status >= 500 => {
                ErrorClass::Transient
            }
            Error::OAuth { status, code, .. } => {
                if *status == 429
                    || *status >= 500
                    || code == "temporarily_unavailable"
                    || code == "server_error"
                    || code == "slow_down"
                {
                    ErrorClass::Transient
                } else {
                    ErrorClass::Terminal
                }
            }
            Error::UnsupportedTokenType(_) => ErrorClass::Terminal,
            _ => ErrorClass::Other,
        }
    }

    /// True when the server no longer knows our client: `invalid_client` from the token or
    /// revocation endpoint. The caller should drop the stored registration and register again.
    ///
    /// `unauthorized_client` is not: the server knows the client and refuses it this grant
    /// (RFC 6749 §5.2); registering again would not change that, and for a pre-registered or
    /// workload client would only hide the refusal.
    pub fn is_stale_registration(&self) -> bool {
        matches!(self, Error::OAuth { code, endpoint: Endpoint::Token | Endpoint::Revocation, .. }
            if code == "invalid_client")
    }

    /// How long the server asked us to wait before trying again: its `Retry-After` header on an
    /// error response (typically 429 or 503), as delta-seconds or an HTTP-date. An HTTP-date is
    /// measured from the response's own `Date` header when present (so clock skew does not
    /// matter), else from the client's clock; a date in the past is a zero delay. Longer delays
    /// are clamped to one hour.
    ///
    /// ```
    /// use mcp_oauth::{Endpoint, Error, ErrorClass};
    /// use std::time::Duration;
    /// let e = Error::OAuth {
    ///     endpoint: Endpoint::Token,
    ///     status: 429,
    ///     code: "slow_down".into(),
    ///     description: None,
    ///     uri: None,
    ///     retry_after: Some(Duration::from_secs(7)),
    /// };
    /// assert_eq!(e.class(), ErrorClass::Transient);
    /// assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));
    /// ```
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::OAuth { retry_after, .. } | Error::HttpStatus { retry_after, .. } => {
                *retry_after
            }
            _ => None,
        }
    }

    /// The server's OAuth error code, when this is an OAuth error response.
    pub fn oauth_code(&self) -> Option<&str> {
        match self {
            Error::OAuth { code, .. } => Some(code),
            Error::AuthorizationDenied { error, .. } => Some(error),
            _ => None,
        }
    }

    /// This error with the query and fragment cut from every URL it names, for errors about a
    /// request whose URL carries secrets (the authorization URL's `state`, a redirect's `code`).
    pub(crate) fn without_query(self) -> Self {
        let cut = |url: String| match url::Url::parse(&url) {
            Ok(mut u) => {
                u.set_query(None);
                u.set_fragment(None);
                u.to_string()
            }
            // Not a URL: keep nothing after a '?' or '#'.
            Err(_) => url.split(['?', '#']).next().unwrap_or_default().to_owned(),
        };
        match self {
            Error::InvalidUrl { url, reason } => Error::InvalidUrl { url: cut(url), reason },
            Error::InsecureUrl { url } => Error::InsecureUrl { url: cut(url) },
            Error::SsrfRefused { url, kind } => Error::SsrfRefused { url: cut(url), kind },
            Error::Timeout { url, timeout } => Error::Timeout { url: cut(url), timeout },
            Error::Cancelled { url } => Error::Cancelled { url: cut(url) },
            Error::Transport { url, source } => {
                // The HTTP client's own message may quote the URL too.
                let message = source.to_string().replace(&url, &cut(url.clone()));
                let plain = Box::new(std::io::Error::other(message));
                let source: Box<dyn std::error::Error + Send + Sync> =
                    if source.downcast_ref::<NotSent>().is_some() {
                        Box::new(NotSent(plain))
                    } else {
                        plain
                    };
                Error::Transport { url: cut(url), source }
            }
            Error::BodyTooLarge { url, limit } => Error::BodyTooLarge { url: cut(url), limit },
            Error::Redirect { from, to, reason } => {
                Error::Redirect { from: cut(from), to: cut(to), reason }
            }
            Error::HttpStatus { url, status, retry_after } => {
                Error::HttpStatus { url: cut(url), status, retry_after }
            }
            Error::Malformed { what, url, reason } => {
                Error::Malformed { what, url: cut(url), reason }
            }
            other => other,
        }
    }

    pub(crate) fn malformed(what: &'static str, url: &url::Url, reason: impl Into<String>) -> Self {
        Error::Malformed { what, url: url.to_string(), reason: reason.into() }
    }
}

/// A `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The source of an [`Error::Transport`] whose request never left: no connection could be
/// made (see [`Error::never_sent`]). Displays as the error it wraps.
#[derive(Debug)]
pub(crate) struct NotSent(pub(crate) Box<dyn std::error::Error + Send + Sync>);

impl fmt::Display for NotSent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for NotSent {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}
