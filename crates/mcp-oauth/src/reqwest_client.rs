//! The production [`HttpClient`]: reqwest 0.13 with the hardening this crate promises.
//!
//! - never follows a redirect (callers decide, see [`crate::OAuthClient`]);
//! - HTTPS required except on loopback; the [`SsrfPolicy`] is applied to literal addresses
//!   before connecting and to every address a host name resolves to (a custom DNS resolver),
//!   so DNS cannot smuggle a refused address past the URL check; a [`Reach::PublicOnly`]
//!   request is held to [`SsrfPolicy::public_only`] the same two ways;
//! - every request has a timeout covering connect, send and the whole body;
//! - the body is capped (1 MiB by default) while it streams in;
//! - the request's [`tokio_util::sync::CancellationToken`] abandons it at any point;
//! - no proxy from the environment (a proxy would resolve names where we cannot check them).

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::http::{HttpClient, HttpRequest, HttpResponse, Method, Reach, SsrfPolicy, check_url};

/// Limits and policies of a [`ReqwestHttpClient`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpPolicy {
    /// Time allowed for one request, from connecting to the last body byte. Default 30 s.
    pub timeout: Duration,
    /// Largest response body accepted. Default 1 MiB.
    pub max_body_bytes: usize,
    /// Which addresses may be contacted.
    pub ssrf: SsrfPolicy,
    /// Send requests through the proxy named by `HTTPS_PROXY` / `HTTP_PROXY` / `ALL_PROXY`
    /// (minus `NO_PROXY`), as mcp-remote's `--enable-proxy` does. Default false. Through a
    /// proxy, host names are resolved by the proxy: the SSRF policy then checks literal IP
    /// addresses in URLs only.
    pub use_env_proxy: bool,
    /// Names answered without DNS, like entries in `/etc/hosts` (or curl's `--resolve`): a
    /// name listed here resolves to these addresses only. The SSRF policy still judges them.
    /// Default empty.
    pub hosts: BTreeMap<String, Vec<IpAddr>>,
}

impl Default for HttpPolicy {
    fn default() -> Self {
        HttpPolicy {
            timeout: Duration::from_secs(30),
            max_body_bytes: 1024 * 1024,
            ssrf: SsrfPolicy::default(),
            use_env_proxy: false,
            hosts: BTreeMap::new(),
        }
    }
}

/// An [`HttpClient`] on reqwest 0.13 (the version rmcp 3.x uses).
///
/// ```
/// use mcp_oauth::{HttpPolicy, ReqwestHttpClient};
/// let client = ReqwestHttpClient::new(HttpPolicy::default()).unwrap();
/// # let _ = client;
/// ```
#[derive(Clone)]
pub struct ReqwestHttpClient {
    client: reqwest::Client,
    /// The client for [`Reach::PublicOnly`] requests: its resolver refuses every internal
    /// address.
    public_client: reqwest::Client,
    policy: Arc<HttpPolicy>,
    /// The clock the whole-request timeout runs on.
    clock: mcp_clock::SharedClock,
}

impl fmt::Debug for ReqwestHttpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReqwestHttpClient").field("policy", &self.policy).finish_non_exhaustive()
    }
}

/// The error a refused DNS answer carries through reqwest, recognised again on the way out.
#[derive(Debug)]
struct DnsRefused {
    kind: &'static str,
}

impl fmt::Display for DnsRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the name resolves only to {} addresses, refused by the SSRF policy", self.kind)
    }
}

impl std::error::Error for DnsRefused {}

/// Resolves names with the system resolver (or [`HttpPolicy::hosts`]) and drops every address
/// the policy refuses.
#[derive(Debug)]
struct PolicyResolver {
    ssrf: SsrfPolicy,
    hosts: Arc<BTreeMap<String, Vec<IpAddr>>>,
}

impl reqwest::dns::Resolve for PolicyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let ssrf = self.ssrf.clone();
        let host = name.as_str().to_owned();
        let listed = self.hosts.get(&host.to_ascii_lowercase()).cloned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = match listed {
                Some(ips) => ips.into_iter().map(|ip| SocketAddr::new(ip, 0)).collect(),
                None => tokio::net::lookup_host((host.as_str(), 0)).await?.collect(),
            };
            let mut refused = None;
            let allowed: Vec<SocketAddr> = addrs
                .into_iter()
                .filter(|a| match ssrf.refuses(a.ip()) {
                    Some(kind) => {
                        refused = Some(kind);
                        false
                    }
                    None => true,
                })
                .collect();
            if allowed.is_empty() {
                let kind = refused.unwrap_or("unresolvable");
                return Err(
                    Box::new(DnsRefused { kind }) as Box<dyn std::error::Error + Send + Sync>
                );
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

impl ReqwestHttpClient {
    /// A client with `policy`.
    pub fn new(policy: HttpPolicy) -> Result<Self> {
        let hosts = Arc::new(
            policy
                .hosts
                .iter()
                .map(|(name, ips)| (name.to_ascii_lowercase(), ips.clone()))
                .collect(),
        );
        let build = |ssrf: SsrfPolicy| {
            let builder = reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(policy.timeout)
                .connect_timeout(policy.timeout)
                .user_agent(concat!("mcp-oauth/", env!("CARGO_PKG_VERSION")));
            // reqwest reads the proxy variables unless told not to; our resolver would
            // otherwise judge the proxy's address rather than the target's.
            let builder = if policy.use_env_proxy {
                builder
            } else {
                builder.no_proxy().dns_resolver(PolicyResolver { ssrf, hosts: Arc::clone(&hosts) })
            };
            builder
                .build()
                .map_err(|e| Error::InvalidConfig(format!("cannot build the HTTP client: {e}")))
        };
        let client = build(policy.ssrf.clone())?;
        let public_client = build(policy.ssrf.public_only())?;
        Ok(ReqwestHttpClient {
            client,
            public_client,
            policy: Arc::new(policy),
            clock: mcp_clock::SharedClock::system(),
        })
    }

    /// This client with the whole-request timeout ([`HttpPolicy::timeout`]) on `clock` (the
    /// system clock by default). reqwest's own connect and read timeouts stay on wall time.
    pub fn with_clock(mut self, clock: mcp_clock::SharedClock) -> Self {
        self.clock = clock;
        self
    }

    /// The policy this client enforces.
    pub fn policy(&self) -> &HttpPolicy {
        &self.policy
    }

    async fn send(&self, request: &HttpRequest) -> Result<HttpResponse> {
        let url_s = request.url.to_string();
        let method = match request.method {
            Method::Get => reqwest::Method::GET,
            Method::Post => reqwest::Method::POST,
        };
        let client = match request.reach {
            Reach::PublicOnly => &self.public_client,
            Reach::Policy => &self.client,
        };
        let mut builder = client.request(method, request.url.clone());
        for (name, value) in &request.headers {
            builder = builder.header(name.as_str(), value.as_str());
        }
        if request.method == Method::Post {
            builder = builder.body(request.body.clone());
        }
        let mut response = builder.send().await.map_err(|e| transport_error(&url_s, e))?;
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .map(|(n, v)| {
                (n.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned())
            })
            .collect();
        let limit = self.policy.max_body_bytes;
        if response.content_length().is_some_and(|len| len > limit as u64) {
            return Err(Error::BodyTooLarge { url: url_s, limit });
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| transport_error(&url_s, e))? {
            if body.len() + chunk.len() > limit {
                return Err(Error::BodyTooLarge { url: url_s, limit });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(HttpResponse { status, headers, body })
    }
}

fn transport_error(url: &str, e: reqwest::Error) -> Error {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(err) = source {
        if let Some(refused) = err.downcast_ref::<DnsRefused>() {
            return Error::SsrfRefused { url: url.to_owned(), kind: refused.kind };
        }
        source = err.source();
    }
    if e.is_connect() {
        // No connection: the request never left, so the server cannot have acted on it.
        return Error::Transport {
            url: url.to_owned(),
            source: Box::new(crate::error::NotSent(Box::new(e))),
        };
    }
    Error::Transport { url: url.to_owned(), source: Box::new(e) }
}

#[async_trait::async_trait]
impl HttpClient for ReqwestHttpClient {
    async fn call(&self, request: HttpRequest) -> Result<HttpResponse> {
        check_url(&request.url, &self.policy.ssrf.for_reach(request.reach))?;
        let url = request.url.to_string();
        let timeout = self.policy.timeout;
        tracing::debug!(method = %request.method, url = %crate::http::redact_query(&request.url), "oauth http request");
        tokio::select! {
            biased;
            () = request.cancel.cancelled() => Err(Error::Cancelled { url }),
            outcome = mcp_clock::within(&self.clock, timeout, self.send(&request)) => match outcome {
                Some(result) => result.map_err(|e| match e {
                    Error::Transport { source, .. } if is_timeout(source.as_ref()) => Error::Timeout { url: url.clone(), timeout },
                    other => other,
                }),
                None => Err(Error::Timeout { url, timeout }),
            },
        }
    }
}

fn is_timeout(e: &(dyn std::error::Error + Send + Sync + 'static)) -> bool {
    e.downcast_ref::<reqwest::Error>().is_some_and(reqwest::Error::is_timeout)
}
