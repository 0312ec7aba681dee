//! Client identity, in priority order: a pre-registered client from configuration, a client ID
//! metadata document URL when the server supports it, else RFC 7591 dynamic registration.

use std::fmt;

use mcp_clock::Clock as _;
use serde::{Deserialize, Serialize};
use url::Url;

use crate::client::{OAuthClient, endpoint_error, parse_json};
use crate::discovery::Discovery;
use crate::error::{Endpoint, Error, Result};
use crate::http::HttpRequest;
use crate::secret::{ClientSecret, PrivateKeyPem};

/// How the client authenticates at the token (or revocation) endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum TokenEndpointAuthMethod {
    /// A public client: `client_id` in the body, no secret.
    None,
    /// HTTP Basic with the form-encoded client ID and secret.
    ClientSecretBasic,
    /// `client_id` and `client_secret` in the body.
    ClientSecretPost,
    /// An RFC 7523 client assertion signed with the client's private key (ES256).
    PrivateKeyJwt,
}

impl TokenEndpointAuthMethod {
    /// The registered name (`client_secret_basic`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            TokenEndpointAuthMethod::None => "none",
            TokenEndpointAuthMethod::ClientSecretBasic => "client_secret_basic",
            TokenEndpointAuthMethod::ClientSecretPost => "client_secret_post",
            TokenEndpointAuthMethod::PrivateKeyJwt => "private_key_jwt",
        }
    }

    /// The method called `name`, if this client implements it.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "none" => TokenEndpointAuthMethod::None,
            "client_secret_basic" => TokenEndpointAuthMethod::ClientSecretBasic,
            "client_secret_post" => TokenEndpointAuthMethod::ClientSecretPost,
            "private_key_jwt" => TokenEndpointAuthMethod::PrivateKeyJwt,
            _ => return None,
        })
    }
}

impl fmt::Display for TokenEndpointAuthMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a [`ClientRegistration`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum RegistrationSource {
    /// Configuration.
    PreRegistered,
    /// A client ID metadata document URL used as the client ID.
    MetadataDocument,
    /// RFC 7591 dynamic registration.
    Dynamic,
}

/// A private key for `private_key_jwt` client authentication.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientSigningKey {
    /// The PKCS#8 PEM private key (EC P-256).
    pub pem: PrivateKeyPem,
    /// The JWS algorithm; only `ES256` is implemented.
    pub algorithm: String,
    /// The key ID to put in the JWT header, if any.
    pub key_id: Option<String>,
}

impl ClientSigningKey {
    /// An ES256 key from PKCS#8 PEM.
    pub fn es256(pem: impl Into<String>) -> Self {
        ClientSigningKey { pem: PrivateKeyPem::new(pem), algorithm: "ES256".into(), key_id: None }
    }
}

/// The client as an authorization server knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientRegistration {
    /// The client ID.
    pub client_id: String,
    /// The client secret, for the `client_secret_*` methods.
    pub client_secret: Option<ClientSecret>,
    /// The private key, for `private_key_jwt`.
    pub client_key: Option<ClientSigningKey>,
    /// How the client authenticates at the token endpoint.
    pub auth_method: TokenEndpointAuthMethod,
    /// Where this registration came from.
    pub source: RegistrationSource,
    /// The issuer this registration belongs to.
    pub issuer: String,
    /// When the secret expires (seconds since the epoch; RFC 7591 `client_secret_expires_at`,
    /// `None` or 0 for never).
    pub client_secret_expires_at: Option<u64>,
}

impl ClientRegistration {
    /// True when the server-issued secret has expired at `now` (RFC 7591
    /// `client_secret_expires_at`): the registration is stale and must be replaced, like one the
    /// token endpoint rejects with `invalid_client` ([`Error::is_stale_registration`]).
    ///
    /// ```
    /// use mcp_oauth::{ClientRegistration, RegistrationSource, TokenEndpointAuthMethod};
    /// use mcp_clock::Timestamp;
    /// let mut reg = ClientRegistration {
    ///     client_id: "c".into(),
    ///     client_secret: None,
    ///     client_key: None,
    ///     auth_method: TokenEndpointAuthMethod::None,
    ///     source: RegistrationSource::Dynamic,
    ///     issuer: "https://as.example.com".into(),
    ///     client_secret_expires_at: Some(1_000),
    /// };
    /// assert!(!reg.secret_expired(Timestamp::from_secs(999)));
    /// assert!(reg.secret_expired(Timestamp::from_secs(1_000)));
    /// reg.client_secret_expires_at = None;
    /// assert!(!reg.secret_expired(Timestamp::MAX));
    /// ```
    pub fn secret_expired(&self, now: mcp_clock::Timestamp) -> bool {
        self.client_secret_expires_at.is_some_and(|at| now.as_secs() >= at)
    }

    /// Refuse to use this registration with `discovery`'s authorization server unless it
    /// belongs to it (exact issuer comparison). A metadata document client ID is portable: it
    /// names the client, not a registration, and carries no secret.
    pub(crate) fn check_issuer(&self, discovery: &Discovery) -> Result<()> {
        if self.source == RegistrationSource::MetadataDocument || self.issuer == discovery.issuer()
        {
            return Ok(());
        }
        Err(Error::RegistrationIssuerMismatch {
            registered: self.issuer.clone(),
            discovered: discovery.issuer().to_owned(),
        })
    }
}

/// A client registered out of band, with one authorization server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreRegisteredClient {
    /// The issuer of the authorization server that knows this client (compared exactly with
    /// the discovered issuer). The credentials are used with that server only (MCP 2026-07-28,
    /// SEP-2352): with another, [`OAuthClient::register`] identifies the client as it would
    /// without them.
    pub issuer: String,
    /// The client ID.
    pub client_id: String,
    /// The client secret, if it has one.
    pub client_secret: Option<ClientSecret>,
    /// The private key, for `private_key_jwt`.
    pub client_key: Option<ClientSigningKey>,
    /// The authentication method; chosen from the server's list when `None`.
    pub auth_method: Option<TokenEndpointAuthMethod>,
}

/// How this client identifies itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// `client_name` for dynamic registration.
    pub client_name: String,
    /// Redirect URIs (loopback callbacks).
    pub redirect_uris: Vec<String>,
    /// A client registered out of band, used first when present.
    pub pre_registered: Option<PreRegisteredClient>,
    /// An HTTPS URL of this client's metadata document (plain HTTP only on a loopback host),
    /// used as the client ID when the server supports client ID metadata documents.
    pub metadata_document_url: Option<Url>,
    /// More RFC 7591 client metadata for dynamic registration (`client_name`, `scope`,
    /// `logo_uri`, `software_id`, ...; mcp-connect's `--static-oauth-client-metadata`). The
    /// fields the protocol needs as they are ([`PROTOCOL_REGISTRATION_FIELDS`]) are not taken
    /// from here.
    pub extra_metadata: serde_json::Map<String, serde_json::Value>,
}

/// The registration fields [`ClientConfig::extra_metadata`] cannot replace: the redirect URIs,
/// grant and response types and the authentication method the client was built for.
///
/// ```
/// assert!(mcp_oauth::PROTOCOL_REGISTRATION_FIELDS.contains(&"redirect_uris"));
/// ```
pub const PROTOCOL_REGISTRATION_FIELDS: &[&str] = &[
    "redirect_uris",
    "grant_types",
    "response_types",
    "token_endpoint_auth_method",
    "application_type",
];

impl ClientConfig {
    /// A config for a native client with one redirect URI.
    pub fn new(client_name: impl Into<String>, redirect_uri: impl Into<String>) -> Self {
        ClientConfig {
            client_name: client_name.into(),
            redirect_uris: vec![redirect_uri.into()],
            pre_registered: None,
            metadata_document_url: None,
            extra_metadata: serde_json::Map::new(),
        }
    }
}

/// Choose a secret-based or public method from what the server lists (`None` for the list
/// means RFC 8414's default, `client_secret_basic`).
pub(crate) fn choose_auth_method(
    supported: Option<&[String]>,
    has_secret: bool,
    has_key: bool,
) -> Option<TokenEndpointAuthMethod> {
    use TokenEndpointAuthMethod as M;
    let default = [String::from("client_secret_basic")];
    let supported = supported.unwrap_or(&default);
    let candidates: &[M] = match (has_key, has_secret) {
        (true, _) => &[M::PrivateKeyJwt],
        (false, true) => &[M::ClientSecretBasic, M::ClientSecretPost],
        (false, false) => &[M::None],
    };
    candidates.iter().copied().find(|m| supported.iter().any(|s| s == m.as_str()))
}

/// SEP-837 / OpenID registration: `web` when every redirect URI is HTTPS on a host other than
/// loopback (a client served from the web), else `native` (loopback or private-use scheme
/// redirects of an application on the user's device).
pub(crate) fn application_type(redirect_uris: &[String]) -> &'static str {
    let web = !redirect_uris.is_empty()
        && redirect_uris.iter().all(|uri| {
            Url::parse(uri)
                .is_ok_and(|u| u.scheme() == "https" && !crate::http::is_loopback_host(&u))
        });
    if web { "web" } else { "native" }
}

#[derive(Deserialize)]
struct RegistrationResponse {
    client_id: String,
    client_secret: Option<String>,
    token_endpoint_auth_method: Option<String>,
    client_secret_expires_at: Option<u64>,
}

impl OAuthClient {
    /// Identify the client to the discovered authorization server: the pre-registered client
    /// when it belongs to this issuer, else the metadata document URL (when supported), else
    /// dynamic registration.
    ///
    /// # Errors
    /// [`Error::RegistrationIssuerMismatch`] when the pre-registered client belongs to another
    /// issuer and the server offers neither metadata documents nor dynamic registration: its
    /// credentials are never offered to another server.
    pub async fn register(
        &self,
        discovery: &Discovery,
        config: &ClientConfig,
    ) -> Result<ClientRegistration> {
        let asm = &discovery.authorization_server;
        let supported = asm.token_endpoint_auth_methods_supported.as_deref();
        let other_issuer = config.pre_registered.as_ref().filter(|pre| pre.issuer != asm.issuer);
        if let Some(pre) = other_issuer {
            tracing::info!(
                registered = %pre.issuer,
                discovered = %asm.issuer,
                "the pre-registered client belongs to another issuer: registering anew"
            );
        }
        if let Some(pre) = config.pre_registered.as_ref().filter(|pre| pre.issuer == asm.issuer) {
            // The configured method; else one the server lists that the credentials allow; else
            // what the credentials imply (the server's list may be incomplete).
            let implied = if pre.client_key.is_some() {
                TokenEndpointAuthMethod::PrivateKeyJwt
            } else if pre.client_secret.is_some() {
                TokenEndpointAuthMethod::ClientSecretBasic
            } else {
                TokenEndpointAuthMethod::None
            };
            let auth_method = pre
                .auth_method
                .or_else(|| {
                    choose_auth_method(
                        supported,
                        pre.client_secret.is_some(),
                        pre.client_key.is_some(),
                    )
                })
                .unwrap_or(implied);
            return Ok(ClientRegistration {
                client_id: pre.client_id.clone(),
                client_secret: pre.client_secret.clone(),
                client_key: pre.client_key.clone(),
                auth_method,
                source: RegistrationSource::PreRegistered,
                issuer: asm.issuer.clone(),
                client_secret_expires_at: None,
            });
        }
        if let Some(url) = &config.metadata_document_url
            && asm.client_id_metadata_document_supported
        {
            // HTTPS, except on loopback (the same rule as every other URL this crate uses), so
            // a local authorization server can fetch a document served by a local test.
            let secure = url.scheme() == "https"
                || (url.scheme() == "http" && crate::http::is_loopback_host(url));
            if !secure || url.path() == "/" || url.fragment().is_some() {
                return Err(Error::InvalidConfig(format!(
                    "client metadata document URL {url} must be HTTPS (or loopback HTTP) with a path and no fragment"
                )));
            }
            return Ok(ClientRegistration {
                client_id: url.to_string(),
                client_secret: None,
                client_key: None,
                auth_method: TokenEndpointAuthMethod::None,
                source: RegistrationSource::MetadataDocument,
                issuer: asm.issuer.clone(),
                client_secret_expires_at: None,
            });
        }
        let endpoint = match (&asm.registration_endpoint, other_issuer) {
            (Some(endpoint), _) => endpoint.clone(),
            (None, Some(pre)) => {
                return Err(Error::RegistrationIssuerMismatch {
                    registered: pre.issuer.clone(),
                    discovered: asm.issuer.clone(),
                });
            }
            (None, None) => {
                return Err(Error::Unsupported(
                    "registration endpoint, and no client is pre-registered",
                ));
            }
        };
        let requested = match supported {
            Some(list) => [
                TokenEndpointAuthMethod::None,
                TokenEndpointAuthMethod::ClientSecretBasic,
                TokenEndpointAuthMethod::ClientSecretPost,
            ]
            .into_iter()
            .find(|m| list.iter().any(|s| s == m.as_str()))
            .unwrap_or(TokenEndpointAuthMethod::None),
            None => TokenEndpointAuthMethod::None,
        };
        let mut grant_types = vec!["authorization_code"];
        if asm.grant_types_supported.as_ref().is_none_or(|g| g.iter().any(|x| x == "refresh_token"))
        {
            grant_types.push("refresh_token");
        }
        let mut body = serde_json::json!({
            "client_name": config.client_name,
            "redirect_uris": config.redirect_uris,
            "grant_types": grant_types,
            "response_types": ["code"],
            "token_endpoint_auth_method": requested.as_str(),
            "application_type": application_type(&config.redirect_uris),
        });
        if let Some(fields) = body.as_object_mut() {
            for (name, value) in &config.extra_metadata {
                if !PROTOCOL_REGISTRATION_FIELDS.contains(&name.as_str()) {
                    fields.insert(name.clone(), value.clone());
                }
            }
        }
        let request = HttpRequest::post_json(endpoint.clone(), &body)
            .with_reach(self.bounds(&discovery.server).reach(&endpoint));
        let response = self.post_no_redirect(request).await?;
        if !response.is_success() {
            return Err(endpoint_error(
                Endpoint::Registration,
                &endpoint,
                &response,
                self.clock.now(),
            ));
        }
        let reg: RegistrationResponse = parse_json("registration response", &endpoint, &response)?;
        if reg.client_id.is_empty() {
            return Err(Error::malformed("registration response", &endpoint, "empty client_id"));
        }
        let secret = reg.client_secret.filter(|s| !s.is_empty()).map(ClientSecret::new);
        let auth_method = match reg.token_endpoint_auth_method.as_deref() {
            Some(name) => TokenEndpointAuthMethod::from_name(name).ok_or_else(|| {
                Error::malformed(
                    "registration response",
                    &endpoint,
                    format!("unsupported auth method {name:?}"),
                )
            })?,
            // The server accepted what we asked for. Without a secret the client is public. A
            // secret handed to a client that asked to be public is unused, except when the server
            // lists no methods at all: then RFC 8414's default, client_secret_basic, applies.
            None => match (secret.is_some(), requested, supported) {
                (false, _, _) => TokenEndpointAuthMethod::None,
                (true, TokenEndpointAuthMethod::None, None) => {
                    TokenEndpointAuthMethod::ClientSecretBasic
                }
                (true, requested, _) => requested,
            },
        };
        if matches!(
            auth_method,
            TokenEndpointAuthMethod::ClientSecretBasic | TokenEndpointAuthMethod::ClientSecretPost
        ) && secret.is_none()
        {
            return Err(Error::malformed(
                "registration response",
                &endpoint,
                "secret-based method without a secret",
            ));
        }
        Ok(ClientRegistration {
            client_id: reg.client_id,
            client_secret: secret,
            client_key: None,
            auth_method,
            source: RegistrationSource::Dynamic,
            issuer: asm.issuer.clone(),
            client_secret_expires_at: reg.client_secret_expires_at.filter(|t| *t != 0),
        })
    }
}

#[cfg(test)]
mod tests;
