//! Discovery: RFC 9728 protected-resource metadata, RFC 8414 / OpenID Connect authorization
//! server metadata, the 2025-03-26 fallbacks, and a discovery cache.
//!
//! Order of the protected-resource metadata locations: the challenge's `resource_metadata`
//! (same origin only), then `/.well-known/oauth-protected-resource/<path>`, then the root
//! `/.well-known/oauth-protected-resource`. The metadata's `resource` must have the server's
//! origin and a path that is a segment prefix of the server's path.
//!
//! Authorization server metadata for issuer `https://as/<path>` is tried at
//! `/.well-known/oauth-authorization-server/<path>`, `/.well-known/openid-configuration/<path>`,
//! then `/<path>/.well-known/openid-configuration` (for an issuer without a path: the RFC 8414
//! URL, then OpenID's). The document's `issuer` must equal the expected issuer exactly (simple
//! string comparison, no normalisation: MCP 2026-07-28, RFC 8414 §3.3).
//!
//! Without any protected-resource metadata the 2025-03-26 rules apply: authorization server
//! metadata at the MCP server's origin root, else `/authorize`, `/token` and `/register` there.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use mcp_clock::{Clock, SharedClock, Timestamp};
use serde::{Deserialize, Serialize};
use url::Url;

use crate::challenge::BearerChallenge;
use crate::client::{OAuthClient, parse_json};
use crate::error::{Error, Result};
use crate::http::{Reach, SsrfPolicy, check_url, same_origin};

/// RFC 9728 protected-resource metadata (the members MCP uses).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProtectedResourceMetadata {
    /// The resource identifier.
    pub resource: String,
    /// Issuers of the authorization servers that protect it.
    #[serde(default)]
    pub authorization_servers: Vec<String>,
    /// Scopes the resource understands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes_supported: Option<Vec<String>>,
    /// How the bearer token may be sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bearer_methods_supported: Option<Vec<String>>,
    /// A human-readable name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_name: Option<String>,
}

/// RFC 8414 authorization server metadata (the members this client uses).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthorizationServerMetadata {
    /// The issuer identifier.
    pub issuer: String,
    /// Where the browser goes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization_endpoint: Option<Url>,
    /// Where tokens come from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_endpoint: Option<Url>,
    /// RFC 7591 dynamic registration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration_endpoint: Option<Url>,
    /// RFC 7009 revocation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revocation_endpoint: Option<Url>,
    /// Client authentication methods the revocation endpoint accepts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revocation_endpoint_auth_methods_supported: Option<Vec<String>>,
    /// Scopes the server knows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes_supported: Option<Vec<String>>,
    /// Response types.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_types_supported: Option<Vec<String>>,
    /// Grant types (absent means `authorization_code` and `implicit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant_types_supported: Option<Vec<String>>,
    /// PKCE methods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code_challenge_methods_supported: Option<Vec<String>>,
    /// Client authentication methods at the token endpoint (absent means `client_secret_basic`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_endpoint_auth_methods_supported: Option<Vec<String>>,
    /// RFC 9207: the server sends `iss` on the authorization response.
    #[serde(default)]
    pub authorization_response_iss_parameter_supported: bool,
    /// The server accepts client ID metadata document URLs as client IDs.
    #[serde(default)]
    pub client_id_metadata_document_supported: bool,
    /// RFC 9449: the JWS algorithms the server accepts in DPoP proofs (it issues DPoP-bound
    /// tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dpop_signing_alg_values_supported: Option<Vec<String>>,
}

impl AuthorizationServerMetadata {
    /// Default endpoints under `origin` (the 2025-03-26 fallback).
    fn legacy_defaults(origin: &Url) -> Self {
        let at = |p: &str| origin.join(p).ok();
        AuthorizationServerMetadata {
            issuer: origin.as_str().trim_end_matches('/').to_owned(),
            authorization_endpoint: at("/authorize"),
            token_endpoint: at("/token"),
            registration_endpoint: at("/register"),
            revocation_endpoint: None,
            revocation_endpoint_auth_methods_supported: None,
            scopes_supported: None,
            response_types_supported: None,
            grant_types_supported: None,
            code_challenge_methods_supported: None,
            token_endpoint_auth_methods_supported: None,
            authorization_response_iss_parameter_supported: false,
            client_id_metadata_document_supported: false,
            dpop_signing_alg_values_supported: None,
        }
    }

    /// True when `grant_types_supported` lists `grant` (or is absent and `grant` is
    /// `authorization_code`).
    pub fn supports_grant(&self, grant: &str) -> bool {
        match &self.grant_types_supported {
            Some(list) => list.iter().any(|g| g == grant),
            None => grant == "authorization_code",
        }
    }

    /// True when the server takes DPoP proofs signed with ES256 (the algorithm [`crate::DpopKey`]
    /// uses).
    pub fn supports_dpop_es256(&self) -> bool {
        self.dpop_signing_alg_values_supported
            .as_ref()
            .is_some_and(|algs| algs.iter().any(|a| a == "ES256"))
    }

    /// True when `scopes_supported` lists `scope`.
    pub fn lists_scope(&self, scope: &str) -> bool {
        self.scopes_supported.as_ref().is_some_and(|s| s.iter().any(|x| x == scope))
    }

    fn validate(&self, url: &Url, allow_http: bool) -> Result<()> {
        let scheme_only = SsrfPolicy { allow_http, ..SsrfPolicy::allow_all() };
        for endpoint in [
            &self.authorization_endpoint,
            &self.token_endpoint,
            &self.registration_endpoint,
            &self.revocation_endpoint,
        ]
        .into_iter()
        .flatten()
        {
            check_url(endpoint, &scheme_only).map_err(|e| {
                Error::malformed(
                    "authorization server metadata",
                    url,
                    format!("endpoint {endpoint}: {e}"),
                )
            })?;
        }
        Ok(())
    }
}

/// Where the authorization server metadata came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum MetadataSource {
    /// RFC 8414 `oauth-authorization-server`.
    OAuth,
    /// OpenID Connect discovery.
    OpenIdConnect,
    /// 2025-03-26: metadata at the MCP server's origin root, no protected-resource metadata.
    LegacyRootMetadata,
    /// 2025-03-26: no metadata at all; default endpoints at the MCP server's origin.
    LegacyDefaultEndpoints,
}

/// The result of discovery for one MCP server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Discovery {
    /// The MCP server URL.
    pub server: Url,
    /// The RFC 8707 resource indicator to send: the metadata's `resource`, else the server URL.
    pub resource: String,
    /// The protected-resource metadata, when the server publishes one.
    pub protected_resource: Option<ProtectedResourceMetadata>,
    /// The authorization server metadata (or the legacy defaults).
    pub authorization_server: AuthorizationServerMetadata,
    /// Where it came from.
    pub source: MetadataSource,
}

impl Discovery {
    /// The issuer of the authorization server.
    pub fn issuer(&self) -> &str {
        &self.authorization_server.issuer
    }
}

fn well_known(origin: &Url, path: &str) -> Option<Url> {
    origin.join(path).ok()
}

fn trimmed_path(url: &Url) -> String {
    url.path().trim_end_matches('/').to_owned()
}

/// Does `resource` cover `server`: same origin, and a path that is a segment prefix?
fn resource_covers(resource: &Url, server: &Url) -> bool {
    if !same_origin(resource, server) {
        return false;
    }
    let r = trimmed_path(resource);
    let s = trimmed_path(server);
    r.is_empty() || s == r || s.starts_with(&format!("{r}/"))
}

/// The protected-resource metadata locations for `server`, in the order they are tried.
pub(crate) fn resource_metadata_urls(
    server: &Url,
    challenge: Option<&BearerChallenge>,
) -> Vec<Url> {
    let mut urls = Vec::new();
    if let Some(hint) = challenge.and_then(|c| c.resource_metadata.as_deref()) {
        match server.join(hint) {
            Ok(u) if same_origin(&u, server) => urls.push(u),
            Ok(u) => tracing::warn!(url = %u, "ignoring cross-origin resource_metadata URL"),
            Err(e) => tracing::warn!(error = %e, "ignoring unparsable resource_metadata URL"),
        }
    }
    let path = trimmed_path(server);
    if !path.is_empty() {
        urls.extend(well_known(server, &format!("/.well-known/oauth-protected-resource{path}")));
    }
    urls.extend(well_known(server, "/.well-known/oauth-protected-resource"));
    urls.dedup();
    urls
}

/// The authorization server metadata locations for `issuer`, in the MCP specification's order.
pub(crate) fn authorization_server_metadata_urls(issuer: &Url) -> Vec<(Url, MetadataSource)> {
    let path = trimmed_path(issuer);
    let mut out = Vec::new();
    if path.is_empty() {
        out.extend(
            well_known(issuer, "/.well-known/oauth-authorization-server")
                .map(|u| (u, MetadataSource::OAuth)),
        );
        out.extend(
            well_known(issuer, "/.well-known/openid-configuration")
                .map(|u| (u, MetadataSource::OpenIdConnect)),
        );
    } else {
        out.extend(
            well_known(issuer, &format!("/.well-known/oauth-authorization-server{path}"))
                .map(|u| (u, MetadataSource::OAuth)),
        );
        out.extend(
            well_known(issuer, &format!("/.well-known/openid-configuration{path}"))
                .map(|u| (u, MetadataSource::OpenIdConnect)),
        );
        out.extend(
            well_known(issuer, &format!("{path}/.well-known/openid-configuration"))
                .map(|u| (u, MetadataSource::OpenIdConnect)),
        );
    }
    out
}

/// How far in a discovery's URLs may point, judged from the MCP server's own address: a server
/// on a public address may not send the client to loopback or private addresses (its metadata
/// naming `http://127.0.0.1:8080/token` or `https://10.0.0.5/register` would make the client a
/// proxy into the user's machine or network). A server that is itself on loopback or a private
/// address may, and so may any server with [`OAuthConfig::allow_internal_endpoints`](crate::OAuthConfig).
///
/// Literal addresses and `localhost` are judged here, before anything is sent; a name is judged
/// when it is resolved: a URL on another host than a public server's own is sent with
/// [`Reach::PublicOnly`], and the HTTP client refuses internal addresses for it. A server named
/// by a host name counts as public (its addresses are not known here); URLs on its own host
/// are judged by the client's [`SsrfPolicy`] alone, as the server itself is.
#[derive(Debug, Clone)]
pub(crate) struct Bounds {
    internal_allowed: bool,
    server_host: Option<String>,
}

impl Bounds {
    pub(crate) fn of(server: &Url, opted_in: bool) -> Self {
        Bounds {
            internal_allowed: opted_in || internal_kind(server).is_some(),
            server_host: server.host_str().map(str::to_ascii_lowercase),
        }
    }

    /// Refuse `url` when it is a literal internal address the server may not send us to.
    pub(crate) fn check(&self, url: &Url) -> Result<()> {
        match internal_kind(url) {
            Some(kind) if !self.internal_allowed => {
                Err(Error::SsrfRefused { url: url.to_string(), kind })
            }
            _ => Ok(()),
        }
    }

    /// The reach of a request to `url`.
    pub(crate) fn reach(&self, url: &Url) -> Reach {
        let own_host = url.host_str().map(str::to_ascii_lowercase) == self.server_host;
        if self.internal_allowed || own_host { Reach::Policy } else { Reach::PublicOnly }
    }
}

/// `loopback`, `private`, `link-local`, ... for a URL whose host is such a literal address (or
/// `localhost`), `None` for a public address or a name.
fn internal_kind(url: &Url) -> Option<&'static str> {
    if crate::http::is_loopback_host(url) {
        return Some("loopback");
    }
    let ip = match url.host()? {
        url::Host::Ipv4(ip) => std::net::IpAddr::V4(ip),
        url::Host::Ipv6(ip) => std::net::IpAddr::V6(ip),
        url::Host::Domain(_) => return None,
    };
    SsrfPolicy { allow_loopback: false, ..SsrfPolicy::default() }.refuses(ip)
}

impl OAuthClient {
    /// Discover how `server` is protected.
    ///
    /// `challenge` is the Bearer challenge of the 401 that started this, if any: its
    /// `resource_metadata` is tried first.
    pub async fn discover(
        &self,
        server: &Url,
        challenge: Option<&BearerChallenge>,
    ) -> Result<Discovery> {
        match self.fetch_resource_metadata(server, challenge).await? {
            Some(prm) => {
                let issuer_s = prm.authorization_servers.first().ok_or_else(|| {
                    Error::malformed(
                        "protected resource metadata",
                        server,
                        "no authorization_servers",
                    )
                })?;
                let issuer = Url::parse(issuer_s).map_err(|e| Error::InvalidUrl {
                    url: issuer_s.clone(),
                    reason: e.to_string(),
                })?;
                let bounds = self.bounds(server);
                bounds.check(&issuer)?;
                let (asm, source) =
                    self.fetch_authorization_server_metadata(&issuer, issuer_s, &bounds).await?;
                for endpoint in [
                    &asm.authorization_endpoint,
                    &asm.token_endpoint,
                    &asm.registration_endpoint,
                    &asm.revocation_endpoint,
                ]
                .into_iter()
                .flatten()
                {
                    bounds.check(endpoint)?;
                }
                Ok(Discovery {
                    server: server.clone(),
                    resource: prm.resource.clone(),
                    protected_resource: Some(prm),
                    authorization_server: asm,
                    source,
                })
            }
            None => self.discover_legacy(server).await,
        }
    }

    async fn fetch_resource_metadata(
        &self,
        server: &Url,
        challenge: Option<&BearerChallenge>,
    ) -> Result<Option<ProtectedResourceMetadata>> {
        let mut bad = None;
        // Every candidate is on the server's own origin.
        for url in resource_metadata_urls(server, challenge) {
            let Some((final_url, response)) = self.get_document(&url, Reach::Policy).await? else {
                continue;
            };
            let prm: ProtectedResourceMetadata = match parse_json(
                "protected resource metadata",
                &final_url,
                &response,
            ) {
                Ok(prm) => prm,
                Err(e) => {
                    tracing::warn!(url = %final_url, error = %e, "skipping unusable protected resource metadata");
                    bad = Some(e);
                    continue;
                }
            };
            let resource = Url::parse(&prm.resource).map_err(|e| {
                Error::malformed(
                    "protected resource metadata",
                    &final_url,
                    format!("resource: {e}"),
                )
            })?;
            if !resource_covers(&resource, server) {
                return Err(Error::ResourceMismatch {
                    server: server.to_string(),
                    found: prm.resource,
                });
            }
            return Ok(Some(prm));
        }
        match bad {
            Some(e) => Err(e),
            None => Ok(None),
        }
    }

    async fn fetch_authorization_server_metadata(
        &self,
        issuer: &Url,
        expected: &str,
        bounds: &Bounds,
    ) -> Result<(AuthorizationServerMetadata, MetadataSource)> {
        let candidates = authorization_server_metadata_urls(issuer);
        let mut bad = None;
        for (url, source) in &candidates {
            let Some((final_url, response)) = self.get_document(url, bounds.reach(url)).await?
            else {
                continue;
            };
            match self.parse_asm(&final_url, &response) {
                Ok(asm) => {
                    if asm.issuer != expected {
                        return Err(Error::IssuerMismatch {
                            expected: expected.to_owned(),
                            found: asm.issuer,
                        });
                    }
                    return Ok((asm, *source));
                }
                Err(e) => {
                    tracing::warn!(url = %final_url, error = %e, "skipping unusable authorization server metadata");
                    bad = Some(e);
                }
            }
        }
        Err(bad.unwrap_or_else(|| Error::MetadataNotFound {
            what: "authorization server metadata",
            tried: candidates.iter().map(|(u, _)| u.to_string()).collect(),
        }))
    }

    fn parse_asm(
        &self,
        url: &Url,
        response: &crate::http::HttpResponse,
    ) -> Result<AuthorizationServerMetadata> {
        // Parse as a JSON value first so a missing issuer is reported as such.
        let value: serde_json::Value = parse_json("authorization server metadata", url, response)?;
        if value.get("issuer").and_then(|v| v.as_str()).is_none_or(str::is_empty) {
            return Err(Error::malformed("authorization server metadata", url, "missing issuer"));
        }
        let asm: AuthorizationServerMetadata = serde_json::from_value(value)
            .map_err(|e| Error::malformed("authorization server metadata", url, e.to_string()))?;
        asm.validate(url, self.config().allow_insecure_http)?;
        Ok(asm)
    }

    async fn discover_legacy(&self, server: &Url) -> Result<Discovery> {
        let origin = server
            .join("/")
            .map_err(|e| Error::InvalidUrl { url: server.to_string(), reason: e.to_string() })?;
        // The server's own origin.
        for (url, _) in authorization_server_metadata_urls(&origin) {
            let Some((final_url, response)) = self.get_document(&url, Reach::Policy).await? else {
                continue;
            };
            let asm = self.parse_asm(&final_url, &response)?;
            let issuer = Url::parse(&asm.issuer).map_err(|e| {
                Error::malformed(
                    "authorization server metadata",
                    &final_url,
                    format!("issuer: {e}"),
                )
            })?;
            if !same_origin(&issuer, server) {
                return Err(Error::IssuerMismatch {
                    expected: origin.to_string(),
                    found: asm.issuer,
                });
            }
            return Ok(Discovery {
                server: server.clone(),
                resource: server.to_string(),
                protected_resource: None,
                authorization_server: asm,
                source: MetadataSource::LegacyRootMetadata,
            });
        }
        Ok(Discovery {
            server: server.clone(),
            resource: server.to_string(),
            protected_resource: None,
            authorization_server: AuthorizationServerMetadata::legacy_defaults(&origin),
            source: MetadataSource::LegacyDefaultEndpoints,
        })
    }
}

/// What [`DiscoveryCache::insert`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CacheUpdate {
    /// Stored; the issuer is unchanged or there was no entry.
    Stored,
    /// Stored, and the issuer differs from the one cached before: credentials bound to the old
    /// issuer must be dropped.
    IssuerChanged {
        /// The issuer cached before.
        previous: String,
    },
}

#[derive(Debug)]
struct CacheEntry {
    discovery: Discovery,
    stored_at: Timestamp,
    unauthorized: u32,
}

/// Discovery results per MCP server, with a time to live on an injected clock.
///
/// An entry is dropped when it is older than the TTL, when
/// [`DiscoveryCache::record_unauthorized`] has been called `max_unauthorized` times in a row
/// for its server, or replaced (and reported) when a new discovery names another issuer.
///
/// ```
/// use mcp_oauth::DiscoveryCache;
/// use mcp_clock::SharedClock;
/// use std::time::Duration;
/// let cache = DiscoveryCache::new(SharedClock::system(), Duration::from_secs(3600), 2);
/// assert!(cache.get(&"https://mcp.example.com/mcp".parse().unwrap()).is_none());
/// ```
#[derive(Debug)]
pub struct DiscoveryCache {
    clock: SharedClock,
    ttl: Duration,
    max_unauthorized: u32,
    entries: Mutex<HashMap<String, CacheEntry>>,
}

impl DiscoveryCache {
    /// A cache whose entries live `ttl` and are dropped after `max_unauthorized` consecutive 401s.
    pub fn new(clock: SharedClock, ttl: Duration, max_unauthorized: u32) -> Self {
        DiscoveryCache {
            clock,
            ttl,
            max_unauthorized: max_unauthorized.max(1),
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, CacheEntry>> {
        self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The cached discovery for `server`, if fresh.
    pub fn get(&self, server: &Url) -> Option<Discovery> {
        let now = self.clock.now();
        let mut entries = self.lock();
        let fresh = entries
            .get(server.as_str())
            .is_some_and(|e| now.saturating_since(e.stored_at) < self.ttl);
        if !fresh {
            entries.remove(server.as_str());
            return None;
        }
        entries.get(server.as_str()).map(|e| e.discovery.clone())
    }

    /// Store `discovery`, reporting an issuer change.
    pub fn insert(&self, discovery: Discovery) -> CacheUpdate {
        let now = self.clock.now();
        let key = discovery.server.to_string();
        let mut entries = self.lock();
        let previous = entries.get(&key).map(|e| e.discovery.issuer().to_owned());
        entries.insert(
            key,
            CacheEntry { discovery: discovery.clone(), stored_at: now, unauthorized: 0 },
        );
        match previous {
            Some(p) if p != discovery.issuer() => CacheUpdate::IssuerChanged { previous: p },
            _ => CacheUpdate::Stored,
        }
    }

    /// A request to `server` got a 401 despite a fresh token. Returns true when this dropped the
    /// entry (the caller should discover again).
    pub fn record_unauthorized(&self, server: &Url) -> bool {
        let mut entries = self.lock();
        let Some(entry) = entries.get_mut(server.as_str()) else { return false };
        entry.unauthorized += 1;
        if entry.unauthorized >= self.max_unauthorized {
            entries.remove(server.as_str());
            return true;
        }
        false
    }

    /// A request to `server` succeeded: reset its 401 count.
    pub fn record_success(&self, server: &Url) {
        if let Some(entry) = self.lock().get_mut(server.as_str()) {
            entry.unauthorized = 0;
        }
    }

    /// Drop the entry for `server`.
    pub fn invalidate(&self, server: &Url) {
        self.lock().remove(server.as_str());
    }
}

#[cfg(test)]
mod tests;
