//! The HTTP seam: one dyn-compatible method, plus the request and response types it carries.
//!
//! Everything in this crate that talks to a server goes through [`HttpClient::call`]. The
//! production implementation is [`crate::ReqwestHttpClient`]; unit tests pass a closure. The
//! seam never follows redirects: the callers decide (token requests refuse them, discovery
//! follows same-origin redirects a bounded number of times).

use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use url::{Host, Url};

use crate::error::{Error, Result};

/// The HTTP methods this crate uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Method {
    /// `GET`.
    Get,
    /// `POST`.
    Post,
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Method::Get => "GET",
            Method::Post => "POST",
        })
    }
}

/// An HTTP request handed to the seam.
///
/// `Debug` shows the method, URL, header names and body length, never header values or the
/// body (they carry client secrets, codes, verifiers and tokens).
#[derive(Clone)]
#[non_exhaustive]
pub struct HttpRequest {
    /// The method.
    pub method: Method,
    /// The absolute URL.
    pub url: Url,
    /// Header names and values, in order.
    pub headers: Vec<(String, String)>,
    /// The body (empty for `GET`).
    pub body: Vec<u8>,
    /// Fires to abandon the request.
    pub cancel: CancellationToken,
    /// Which addresses the request may reach beyond what its URL says (default
    /// [`Reach::Policy`]).
    pub reach: Reach,
}

/// Which addresses one request may reach, on top of the client's [`SsrfPolicy`].
///
/// A public MCP server's metadata may not send the client to the user's machine or network: a
/// URL it names on another host is [`Reach::PublicOnly`], and an [`HttpClient`] that resolves
/// names refuses loopback, private, link-local and metadata answers for it (as it refuses such
/// literal addresses before sending). [`crate::ReqwestHttpClient`] does.
///
/// ```
/// use mcp_oauth::{HttpRequest, Reach};
/// let request = HttpRequest::get("https://auth.example.com/.well-known/oauth-authorization-server".parse().unwrap());
/// assert_eq!(request.reach, Reach::Policy);
/// assert_eq!(request.with_reach(Reach::PublicOnly).reach, Reach::PublicOnly);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Reach {
    /// What the client's [`SsrfPolicy`] allows: the MCP server the user chose and its own host,
    /// endpoints the user configured, and every endpoint of a server that is itself on a
    /// loopback or private address (or with `OAuthConfig::allow_internal_endpoints`).
    #[default]
    Policy,
    /// Public addresses only, whatever the policy allows: the URL came from the metadata of a
    /// server judged public and names another host.
    PublicOnly,
}

impl HttpRequest {
    /// A `GET` request that accepts JSON.
    pub fn get(url: Url) -> Self {
        HttpRequest {
            method: Method::Get,
            url,
            headers: vec![("accept".into(), "application/json".into())],
            body: Vec::new(),
            cancel: CancellationToken::new(),
            reach: Reach::Policy,
        }
    }

    /// A `POST` of an `application/x-www-form-urlencoded` body.
    pub fn post_form(url: Url, form: &[(&str, &str)]) -> Self {
        let body = url::form_urlencoded::Serializer::new(String::new()).extend_pairs(form).finish();
        HttpRequest {
            method: Method::Post,
            url,
            headers: vec![
                ("content-type".into(), "application/x-www-form-urlencoded".into()),
                ("accept".into(), "application/json".into()),
            ],
            body: body.into_bytes(),
            cancel: CancellationToken::new(),
            reach: Reach::Policy,
        }
    }

    /// A `POST` of a JSON body.
    pub fn post_json(url: Url, json: &serde_json::Value) -> Self {
        HttpRequest {
            method: Method::Post,
            url,
            headers: vec![
                ("content-type".into(), "application/json".into()),
                ("accept".into(), "application/json".into()),
            ],
            body: json.to_string().into_bytes(),
            cancel: CancellationToken::new(),
            reach: Reach::Policy,
        }
    }

    /// This request with `reach`.
    pub fn with_reach(mut self, reach: Reach) -> Self {
        self.reach = reach;
        self
    }

    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The body parsed as an `application/x-www-form-urlencoded` form.
    pub fn form(&self) -> Vec<(String, String)> {
        url::form_urlencoded::parse(&self.body).into_owned().collect()
    }

    /// The value of form field `name` in the body.
    pub fn form_value(&self, name: &str) -> Option<String> {
        self.form().into_iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }
}

impl fmt::Debug for HttpRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.headers.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("HttpRequest")
            .field("method", &self.method)
            .field("url", &redact_query(&self.url))
            .field("headers", &names)
            .field("body_len", &self.body.len())
            .field("reach", &self.reach)
            .finish()
    }
}

/// A URL with its query values replaced, for logs (authorization URLs carry `state` and
/// callbacks carry `code`).
pub(crate) fn redact_query(url: &Url) -> String {
    if url.query().is_none() {
        return url.to_string();
    }
    let mut u = url.clone();
    let names: Vec<String> = url.query_pairs().map(|(k, _)| k.into_owned()).collect();
    u.query_pairs_mut().clear().extend_pairs(names.iter().map(|k| (k.as_str(), "_")));
    u.to_string()
}

/// An HTTP response returned by the seam.
#[derive(Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// Header names and values, in order (a repeated header appears once per value).
    pub headers: Vec<(String, String)>,
    /// The body, at most the client's cap.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// A response with `status`, no headers and an empty body.
    pub fn new(status: u16) -> Self {
        HttpResponse { status, headers: Vec::new(), body: Vec::new() }
    }

    /// A response with a JSON body and `content-type: application/json`.
    pub fn json(status: u16, body: &serde_json::Value) -> Self {
        HttpResponse {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.to_string().into_bytes(),
        }
    }

    /// This response with one more header.
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// This response with `body`.
    pub fn with_body(mut self, body: &[u8]) -> Self {
        self.body = body.to_vec();
        self
    }

    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Every value of header `name` (case-insensitive), in order.
    pub fn header_values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// True for 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// True for the redirect statuses 301, 302, 303, 307 and 308.
    pub fn is_redirect(&self) -> bool {
        matches!(self.status, 301 | 302 | 303 | 307 | 308)
    }
}

impl fmt::Debug for HttpResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.headers.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("HttpResponse")
            .field("status", &self.status)
            .field("headers", &names)
            .field("body_len", &self.body.len())
            .finish()
    }
}

/// The HTTP seam: send one request, get one response. Written with
/// [`async_trait`](https://docs.rs/async-trait) (dyn-compatible): an implementation writes
/// `async fn call` under `#[async_trait::async_trait]`.
///
/// Implementations must not follow redirects. Any `Fn(HttpRequest) -> impl Future` closure is an
/// `HttpClient`, which is how unit tests script a server:
///
/// ```
/// use mcp_oauth::{HttpClient, HttpRequest, HttpResponse, SharedHttpClient};
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let http = SharedHttpClient::new(|req: HttpRequest| async move {
///     assert_eq!(req.url.path(), "/.well-known/oauth-protected-resource");
///     Ok(HttpResponse::new(404))
/// });
/// let url = "https://mcp.example.com/.well-known/oauth-protected-resource".parse().unwrap();
/// let response = http.call(HttpRequest::get(url)).await.unwrap();
/// assert_eq!(response.status, 404);
/// # }
/// ```
#[async_trait::async_trait]
pub trait HttpClient: Send + Sync {
    /// Send `request` and return the response, whatever its status.
    async fn call(&self, request: HttpRequest) -> Result<HttpResponse>;
}

#[async_trait::async_trait]
impl<F, Fut> HttpClient for F
where
    F: Fn(HttpRequest) -> Fut + Send + Sync,
    Fut: Future<Output = Result<HttpResponse>> + Send + 'static,
{
    async fn call(&self, request: HttpRequest) -> Result<HttpResponse> {
        self(request).await
    }
}

/// A cloneable, shareable [`HttpClient`].
#[derive(Clone)]
pub struct SharedHttpClient(Arc<dyn HttpClient>);

impl SharedHttpClient {
    /// Share `client`.
    pub fn new(client: impl HttpClient + 'static) -> Self {
        SharedHttpClient(Arc::new(client))
    }
}

impl fmt::Debug for SharedHttpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SharedHttpClient(..)")
    }
}

#[async_trait::async_trait]
impl HttpClient for SharedHttpClient {
    async fn call(&self, request: HttpRequest) -> Result<HttpResponse> {
        self.0.call(request).await
    }
}

/// Which addresses the HTTP client may talk to (server-side request forgery protection).
///
/// Literal IP addresses in URLs are checked before any connection, and host names are checked
/// after DNS resolution, so a name that resolves to a refused address is refused too.
/// Cloud metadata addresses (`169.254.169.254`, `fd00:ec2::254`, `100.100.100.200`) are refused
/// unless [`SsrfPolicy::allow_cloud_metadata`], even when link-local addresses are allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SsrfPolicy {
    /// Loopback (`127.0.0.0/8`, `::1`). Allowed by default: local MCP servers and their
    /// authorization servers live there, and they are the only place plain HTTP is allowed.
    pub allow_loopback: bool,
    /// Private ranges (`10/8`, `172.16/12`, `192.168/16`, CGNAT `100.64/10`, `fc00::/7`).
    pub allow_private: bool,
    /// Link-local (`169.254/16`, `fe80::/10`).
    pub allow_link_local: bool,
    /// Cloud instance metadata services.
    pub allow_cloud_metadata: bool,
    /// Plain `http` to hosts that are not loopback (mcp-remote's `--allow-http`). Default false:
    /// tokens and secrets would cross the network in the clear.
    pub allow_http: bool,
}

impl Default for SsrfPolicy {
    fn default() -> Self {
        SsrfPolicy {
            allow_loopback: true,
            allow_private: false,
            allow_link_local: false,
            allow_cloud_metadata: false,
            allow_http: false,
        }
    }
}

impl SsrfPolicy {
    /// Every address allowed (for tests and trusted deployments); plain `http` still only to
    /// loopback.
    pub fn allow_all() -> Self {
        SsrfPolicy {
            allow_loopback: true,
            allow_private: true,
            allow_link_local: true,
            allow_cloud_metadata: true,
            allow_http: false,
        }
    }

    /// This policy for a [`Reach::PublicOnly`] request: no loopback, private, link-local or
    /// metadata address; plain `http` as this policy says.
    pub fn public_only(&self) -> Self {
        SsrfPolicy {
            allow_loopback: false,
            allow_private: false,
            allow_link_local: false,
            allow_cloud_metadata: false,
            allow_http: self.allow_http,
        }
    }

    /// The policy that applies to a request with `reach`.
    pub fn for_reach(&self, reach: Reach) -> Self {
        match reach {
            Reach::Policy => self.clone(),
            Reach::PublicOnly => self.public_only(),
        }
    }

    /// `None` when `ip` is allowed, else the kind of address that is refused.
    pub fn refuses(&self, ip: IpAddr) -> Option<&'static str> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
            v4 => v4,
        };
        let kind = address_kind(ip)?;
        let allowed = match kind {
            "cloud metadata" => self.allow_cloud_metadata,
            "loopback" => self.allow_loopback,
            "link-local" => self.allow_link_local,
            _ => self.allow_private,
        };
        (!allowed).then_some(kind)
    }
}

fn address_kind(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            // AWS instance metadata, Alibaba's, ECS task metadata and EKS pod identity.
            if matches!(o, [169, 254, 169, 254] | [100, 100, 100, 200] | [169, 254, 170, 2 | 23]) {
                Some("cloud metadata")
            } else if v4.is_loopback() || v4.is_unspecified() {
                // 0.0.0.0 reaches the local host on common stacks: loopback, not "public".
                Some("loopback")
            } else if v4.is_link_local() {
                Some("link-local")
            } else if v4.is_private()
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
                || (o[0] == 198 && (o[1] & 0xfe) == 18)
            {
                // RFC 1918, CGNAT 100.64/10, benchmarking 198.18/15.
                Some("private")
            } else if v4.is_multicast() {
                Some("multicast")
            } else if o[0] >= 240 || o[0] == 0 {
                // 240/4 reserved (and the broadcast address), 0/8 "this network".
                Some("reserved")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let embedded = |hi: u16, lo: u16| {
                let [a, b] = hi.to_be_bytes();
                let [c, d] = lo.to_be_bytes();
                std::net::Ipv4Addr::new(a, b, c, d)
            };
            if s == [0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254] {
                Some("cloud metadata")
            } else if v6.is_loopback() || v6.is_unspecified() {
                Some("loopback")
            } else if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                // NAT64 (RFC 6052): the IPv4 address it translates to decides.
                address_kind(IpAddr::V4(embedded(s[6], s[7])))
            } else if s[0] == 0x2002 {
                // 6to4 (RFC 3056): the IPv4 address in bits 16..48.
                address_kind(IpAddr::V4(embedded(s[1], s[2])))
            } else if s[..6] == [0; 6] {
                // IPv4-compatible (deprecated, ::a.b.c.d).
                address_kind(IpAddr::V4(embedded(s[6], s[7])))
            } else if (s[0] & 0xffc0) == 0xfe80 {
                Some("link-local")
            } else if (s[0] & 0xfe00) == 0xfc00 {
                Some("private")
            } else if (s[0] & 0xff00) == 0xff00 {
                Some("multicast")
            } else {
                None
            }
        }
    }
}

/// True when `url`'s host is `localhost` or a loopback IP literal.
pub(crate) fn is_loopback_host(url: &Url) -> bool {
    match url.host() {
        Some(Host::Domain(d)) => {
            // Only `localhost` itself: a subdomain of it is resolved by DNS, which could answer
            // with a public address and carry plain HTTP off the machine.
            d.trim_end_matches('.').eq_ignore_ascii_case("localhost")
        }
        Some(Host::Ipv4(ip)) => ip.is_loopback(),
        Some(Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// Check `url` before any connection: `http` or `https` only, HTTPS unless the host is loopback
/// (or [`SsrfPolicy::allow_http`]), no credentials in the URL, and literal IP addresses against
/// the SSRF policy.
pub fn check_url(url: &Url, policy: &SsrfPolicy) -> Result<()> {
    match url.scheme() {
        "https" => {}
        "http" if is_loopback_host(url) || policy.allow_http => {}
        "http" => return Err(Error::InsecureUrl { url: url.to_string() }),
        other => {
            return Err(Error::InvalidUrl {
                url: url.to_string(),
                reason: format!("unsupported scheme {other:?}"),
            });
        }
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(Error::InvalidUrl {
            url: url.to_string(),
            reason: "credentials in the URL".into(),
        });
    }
    let ip = match url.host() {
        Some(Host::Ipv4(ip)) => IpAddr::V4(ip),
        Some(Host::Ipv6(ip)) => IpAddr::V6(ip),
        Some(Host::Domain(_)) => return Ok(()),
        None => return Err(Error::InvalidUrl { url: url.to_string(), reason: "no host".into() }),
    };
    match policy.refuses(ip) {
        Some(kind) => Err(Error::SsrfRefused { url: url.to_string(), kind }),
        None => Ok(()),
    }
}

/// Same scheme, host and port.
pub(crate) fn same_origin(a: &Url, b: &Url) -> bool {
    a.origin() == b.origin()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(s: &str) -> Url {
        s.parse().unwrap()
    }

    #[test]
    fn https_is_required_except_on_loopback() {
        let p = SsrfPolicy::default();
        assert!(check_url(&u("https://as.example.com/token"), &p).is_ok());
        assert!(check_url(&u("http://localhost:8080/token"), &p).is_ok());
        assert!(check_url(&u("http://127.0.0.1:8080/token"), &p).is_ok());
        assert!(check_url(&u("http://[::1]:8080/token"), &p).is_ok());
        assert!(matches!(
            check_url(&u("http://as.example.com/token"), &p),
            Err(Error::InsecureUrl { .. })
        ));
        assert!(matches!(
            check_url(&u("ftp://as.example.com/x"), &p),
            Err(Error::InvalidUrl { .. })
        ));
        assert!(matches!(
            check_url(&u("https://user:pw@as.example.com/x"), &p),
            Err(Error::InvalidUrl { .. })
        ));
    }

    /// `allow_http` (mcp-connect's `--allow-http`) lets plain http reach other hosts; the SSRF
    /// address rules still apply.
    #[test]
    fn allow_http_admits_plain_http_but_not_refused_addresses() {
        let p = SsrfPolicy { allow_http: true, ..SsrfPolicy::default() };
        assert!(check_url(&u("http://as.example.com/token"), &p).is_ok());
        assert!(matches!(
            check_url(&u("http://10.0.0.5/token"), &p),
            Err(Error::SsrfRefused { .. })
        ));
        assert!(!SsrfPolicy::allow_all().allow_http, "allow_all is about addresses only");
    }

    #[test]
    fn ssrf_policy_refuses_private_link_local_and_metadata_literals() {
        let p = SsrfPolicy::default();
        for (url, kind) in [
            ("https://10.1.2.3/x", "private"),
            ("https://192.168.0.1/x", "private"),
            ("https://172.16.0.1/x", "private"),
            ("https://100.64.0.1/x", "private"),
            ("https://[fd12::1]/x", "private"),
            ("https://169.254.1.1/x", "link-local"),
            ("https://[fe80::1]/x", "link-local"),
            ("https://169.254.169.254/latest/meta-data", "cloud metadata"),
            ("https://[fd00:ec2::254]/x", "cloud metadata"),
            ("https://[::ffff:169.254.169.254]/x", "cloud metadata"),
            ("https://169.254.170.2/v2/credentials", "cloud metadata"),
            ("https://169.254.170.23/v1/credentials", "cloud metadata"),
            ("https://198.18.0.1/x", "private"),
            ("https://198.19.255.1/x", "private"),
            ("https://240.0.0.1/x", "reserved"),
            ("https://255.255.255.255/x", "reserved"),
            ("https://224.0.0.1/x", "multicast"),
            ("https://[ff02::1]/x", "multicast"),
            // NAT64, 6to4 and IPv4-compatible addresses are judged by the IPv4 inside.
            ("https://[64:ff9b::a9fe:a9fe]/x", "cloud metadata"),
            ("https://[64:ff9b::a00:1]/x", "private"),
            ("https://[2002:a9fe:a9fe::1]/x", "cloud metadata"),
            ("https://[2002:a00:1::1]/x", "private"),
            ("https://[::10.0.0.1]/x", "private"),
        ] {
            match check_url(&u(url), &p) {
                Err(Error::SsrfRefused { kind: k, .. }) => assert_eq!(k, kind, "{url}"),
                other => panic!("{url}: {other:?}"),
            }
        }
        assert!(check_url(&u("https://93.184.216.34/x"), &p).is_ok());
        assert!(check_url(&u("https://198.20.0.1/x"), &p).is_ok());
        assert!(
            check_url(&u("https://[64:ff9b::5db8:d822]/x"), &p).is_ok(),
            "NAT64 to a public address"
        );
        assert!(check_url(&u("https://[2606:4700::1]/x"), &p).is_ok());
        // Loopback is allowed by default, and 0.0.0.0 is judged as loopback.
        let loopback_off = SsrfPolicy { allow_loopback: false, ..SsrfPolicy::allow_all() };
        for url in ["https://0.0.0.0/x", "https://[::]/x", "https://127.0.0.1/x"] {
            assert!(
                matches!(
                    check_url(&u(url), &loopback_off),
                    Err(Error::SsrfRefused { kind: "loopback", .. })
                ),
                "{url}"
            );
        }
    }

    #[test]
    fn ssrf_policy_is_configuration() {
        let mut p =
            SsrfPolicy { allow_private: true, allow_link_local: true, ..SsrfPolicy::default() };
        assert!(check_url(&u("https://10.1.2.3/x"), &p).is_ok());
        assert!(check_url(&u("https://169.254.1.1/x"), &p).is_ok());
        // Metadata stays refused unless allowed by name.
        assert!(check_url(&u("https://169.254.169.254/x"), &p).is_err());
        p.allow_cloud_metadata = true;
        assert!(check_url(&u("https://169.254.169.254/x"), &p).is_ok());
        p.allow_loopback = false;
        assert!(matches!(
            check_url(&u("http://127.0.0.1:1/x"), &p),
            Err(Error::SsrfRefused { kind: "loopback", .. })
        ));
    }

    #[test]
    fn request_debug_hides_headers_values_and_body() {
        let mut req = HttpRequest::post_form(
            u("https://as.example.com/token?code=abc"),
            &[("client_secret", "s3cr3t")],
        );
        req.headers.push(("authorization".into(), "Basic czNjcjN0".into()));
        let dbg = format!("{req:?}");
        assert!(
            !dbg.contains("s3cr3t") && !dbg.contains("czNjcjN0") && !dbg.contains("abc"),
            "{dbg}"
        );
        assert!(dbg.contains("authorization"));
    }
}
