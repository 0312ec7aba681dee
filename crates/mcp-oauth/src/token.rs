//! The token endpoint (code exchange, refresh, client credentials), client authentication
//! (none, client_secret_basic, client_secret_post, private_key_jwt with ES256) and RFC 7009
//! revocation.
//!
//! # Token response policy
//! - `token_type` must be `Bearer` (any case), else [`Error::UnsupportedTokenType`].
//! - A missing `expires_in` is returned as `None`: the lifetime is unknown, and the token
//!   store decides (it should treat the token as valid until the server answers 401).
//!   `expires_in` may be a number or a numeric string; anything else is malformed.
//! - A missing `refresh_token` is returned as `None`: after a refresh the caller keeps the
//!   refresh token it already has (RFC 6749 §6).
//! - [`TokenResponse::date`] is the response's `Date` header, so the token store can compute an
//!   absolute expiry on its own clock: `date.unwrap_or(received) + expires_in`.

use std::time::Duration;

use base64::Engine as _;
use mcp_clock::{Clock, Timestamp};
use p256::ecdsa::signature::Signer as _;
use p256::pkcs8::DecodePrivateKey as _;
use serde::Deserialize;
use url::Url;

use crate::client::{OAuthClient, endpoint_error, parse_json};
use crate::discovery::Discovery;
use crate::error::{Endpoint, Error, Result};
use crate::http::{HttpRequest, HttpResponse, Reach};
use crate::registration::{ClientRegistration, ClientSigningKey, TokenEndpointAuthMethod};
use crate::secret::{AccessToken, IdToken, RefreshToken, random_urlsafe};

/// A successful token response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenResponse {
    /// The access token.
    pub access_token: AccessToken,
    /// The token type as sent (always `Bearer` in some case, or `N_A` for an RFC 8693 exchange).
    pub token_type: String,
    /// `expires_in` as given; `None` when the server did not say.
    pub expires_in: Option<Duration>,
    /// A new refresh token, if the server issued one.
    pub refresh_token: Option<RefreshToken>,
    /// The granted scope, if the server said.
    pub scope: Option<String>,
    /// An OpenID Connect ID token, if any.
    pub id_token: Option<IdToken>,
    /// RFC 8693 `issued_token_type`, for token exchanges.
    pub issued_token_type: Option<String>,
    /// The response's `Date` header, when present and valid.
    pub date: Option<Timestamp>,
}

#[derive(Deserialize)]
struct RawTokenResponse {
    access_token: Option<String>,
    token_type: Option<String>,
    expires_in: Option<serde_json::Value>,
    refresh_token: Option<String>,
    scope: Option<String>,
    id_token: Option<String>,
    issued_token_type: Option<String>,
}

pub(crate) fn parse_token_response(
    url: &Url,
    response: &HttpResponse,
    allow_na: bool,
    proof_sent: bool,
) -> Result<TokenResponse> {
    const WHAT: &str = "token response";
    let raw: RawTokenResponse = parse_json(WHAT, url, response)?;
    let access_token = raw
        .access_token
        .filter(|t| !t.is_empty())
        .ok_or_else(|| Error::malformed(WHAT, url, "missing access_token"))?;
    let token_type =
        raw.token_type.ok_or_else(|| Error::malformed(WHAT, url, "missing token_type"))?;
    // A DPoP-bound token is usable only by the holder of the key that signed the request's
    // proof: accepted only when one was sent (RFC 9449 §5).
    let accepted = token_type.eq_ignore_ascii_case("bearer")
        || (allow_na && token_type.eq_ignore_ascii_case("n_a"))
        || (proof_sent && token_type.eq_ignore_ascii_case("dpop"));
    if !accepted {
        return Err(Error::UnsupportedTokenType(token_type));
    }
    let expires_in = match raw.expires_in {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::Number(n)) => Some(
            n.as_u64()
                .or_else(|| n.as_f64().filter(|f| *f >= 0.0 && f.is_finite()).map(|f| f as u64))
                .ok_or_else(|| {
                    Error::malformed(
                        WHAT,
                        url,
                        format!("expires_in {n} is not a non-negative number"),
                    )
                })?,
        ),
        Some(serde_json::Value::String(s)) => Some(s.trim().parse::<u64>().map_err(|_| {
            Error::malformed(WHAT, url, format!("expires_in {s:?} is not a number"))
        })?),
        Some(other) => {
            return Err(Error::malformed(WHAT, url, format!("expires_in {other} is not a number")));
        }
    }
    .map(Duration::from_secs);
    let date = response
        .header("date")
        .and_then(|d| httpdate::parse_http_date(d).ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| Timestamp::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)));
    Ok(TokenResponse {
        access_token: AccessToken::new(access_token),
        token_type,
        expires_in,
        refresh_token: raw.refresh_token.filter(|t| !t.is_empty()).map(RefreshToken::new),
        scope: raw.scope,
        id_token: raw.id_token.map(IdToken::new),
        issued_token_type: raw.issued_token_type,
        date,
    })
}

/// Sign an ES256 JWT with `claims`.
pub(crate) fn sign_es256(key: &ClientSigningKey, claims: &serde_json::Value) -> Result<String> {
    if key.algorithm != "ES256" {
        return Err(Error::InvalidConfig(format!(
            "signing algorithm {} is not supported (only ES256)",
            key.algorithm
        )));
    }
    let signing_key = p256::ecdsa::SigningKey::from_pkcs8_pem(key.pem.secret()).map_err(|e| {
        Error::InvalidConfig(format!("the private key is not a PKCS#8 P-256 key: {e}"))
    })?;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut header = serde_json::json!({"alg": "ES256", "typ": "JWT"});
    if let Some(kid) = &key.key_id {
        header["kid"] = serde_json::Value::String(kid.clone());
    }
    let signing_input =
        format!("{}.{}", b64.encode(header.to_string()), b64.encode(claims.to_string()));
    let signature: p256::ecdsa::Signature = signing_key.sign(signing_input.as_bytes());
    Ok(format!("{signing_input}.{}", b64.encode(signature.to_bytes())))
}

impl OAuthClient {
    /// Add client authentication for `method` to a request's form and headers.
    fn authenticate(
        &self,
        registration: &ClientRegistration,
        method: TokenEndpointAuthMethod,
        audience: &str,
        form: &mut Vec<(&'static str, String)>,
        headers: &mut Vec<(String, String)>,
    ) -> Result<()> {
        let secret = || {
            registration
                .client_secret
                .as_ref()
                .ok_or_else(|| Error::InvalidConfig(format!("{method} needs a client secret")))
        };
        match method {
            TokenEndpointAuthMethod::None => {
                form.push(("client_id", registration.client_id.clone()))
            }
            TokenEndpointAuthMethod::ClientSecretBasic => {
                // RFC 6749 §2.3.1: form-encode both parts before joining them.
                let enc = |s: &str| {
                    url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>()
                };
                let pair = format!("{}:{}", enc(&registration.client_id), enc(secret()?.secret()));
                let basic = base64::engine::general_purpose::STANDARD.encode(pair);
                headers.push(("authorization".into(), format!("Basic {basic}")));
            }
            TokenEndpointAuthMethod::ClientSecretPost => {
                form.push(("client_id", registration.client_id.clone()));
                form.push(("client_secret", secret()?.secret().to_owned()));
            }
            TokenEndpointAuthMethod::PrivateKeyJwt => {
                let key = registration.client_key.as_ref().ok_or_else(|| {
                    Error::InvalidConfig("private_key_jwt needs a private key".into())
                })?;
                let now = self.clock.now().as_secs();
                let claims = serde_json::json!({
                    "iss": registration.client_id,
                    "sub": registration.client_id,
                    "aud": audience,
                    "iat": now,
                    "exp": now + self.config.assertion_lifetime.as_secs(),
                    "jti": random_urlsafe(16),
                });
                form.push(("client_id", registration.client_id.clone()));
                form.push((
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".into(),
                ));
                form.push(("client_assertion", sign_es256(key, &claims)?));
            }
        }
        Ok(())
    }

    /// POST a grant to the token endpoint with the registration's client authentication, after
    /// checking that the registration belongs to the discovered issuer (nothing is sent
    /// otherwise: [`Error::RegistrationIssuerMismatch`]).
    pub(crate) async fn token_request(
        &self,
        discovery: &Discovery,
        registration: &ClientRegistration,
        form: Vec<(&'static str, String)>,
    ) -> Result<TokenResponse> {
        registration.check_issuer(discovery)?;
        let asm = &discovery.authorization_server;
        let url = asm.token_endpoint.clone().ok_or(Error::Unsupported("token endpoint"))?;
        self.post_grant(
            Endpoint::Token,
            &url,
            self.bounds(&discovery.server).reach(&url),
            registration,
            registration.auth_method,
            &asm.issuer,
            form,
            false,
        )
        .await
    }

    #[allow(clippy::too_many_arguments)] // Internal: every argument is a distinct part of the request.
    pub(crate) async fn post_grant(
        &self,
        endpoint: Endpoint,
        url: &Url,
        reach: Reach,
        registration: &ClientRegistration,
        method: TokenEndpointAuthMethod,
        audience: &str,
        mut form: Vec<(&'static str, String)>,
        allow_na: bool,
    ) -> Result<TokenResponse> {
        let mut headers = Vec::new();
        self.authenticate(registration, method, audience, &mut form, &mut headers)?;
        let pairs: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let grant = form
            .iter()
            .find(|(k, _)| *k == "grant_type")
            .map(|(_, v)| v.as_str())
            .unwrap_or_default();
        // With a DPoP key: a proof on each attempt, and one retry when the server asks for its
        // nonce (RFC 9449 §8).
        let dpop = self.dpop.as_ref().filter(|_| endpoint == Endpoint::Token);
        let mut nonce_retried = false;
        loop {
            let mut request = HttpRequest::post_form(url.clone(), &pairs).with_reach(reach);
            request.headers.extend(headers.iter().cloned());
            if let Some(key) = dpop {
                request
                    .headers
                    .push(("dpop".into(), key.proof("POST", url, None, self.clock.now())?));
            }
            tracing::debug!(%url, grant, method = %method, dpop = dpop.is_some(), "token request");
            let response = self.post_no_redirect(request).await?;
            if let (Some(key), Some(nonce)) = (dpop, response.header("dpop-nonce")) {
                key.remember_nonce(url, nonce);
            }
            if !response.is_success() {
                let error = endpoint_error(endpoint, url, &response, self.clock.now());
                if dpop.is_some()
                    && !nonce_retried
                    && error.oauth_code() == Some("use_dpop_nonce")
                    && response.header("dpop-nonce").is_some()
                {
                    nonce_retried = true;
                    tracing::debug!(%url, grant, "the token endpoint wants a DPoP nonce: retrying once");
                    continue;
                }
                tracing::debug!(%url, grant, error = %error, "token request failed");
                return Err(error);
            }
            return parse_token_response(url, &response, allow_na, dpop.is_some());
        }
    }

    /// Refresh: `grant_type=refresh_token` with `scope` (when given; Entra needs it) and the
    /// discovery's `resource`.
    ///
    /// The response may omit `refresh_token`; keep the old one then.
    pub async fn refresh(
        &self,
        discovery: &Discovery,
        registration: &ClientRegistration,
        refresh_token: &RefreshToken,
        scope: Option<&str>,
    ) -> Result<TokenResponse> {
        let mut form = vec![
            ("grant_type", "refresh_token".to_owned()),
            ("refresh_token", refresh_token.secret().to_owned()),
        ];
        if let Some(scope) = scope {
            form.push(("scope", scope.to_owned()));
        }
        if let Some(resource) = self.resource_param(&discovery.resource) {
            form.push(("resource", resource));
        }
        self.token_request(discovery, registration, form).await
    }

    /// The client credentials grant for machine clients (secret or `private_key_jwt`), with
    /// `scope` when given and the discovery's `resource`.
    pub async fn client_credentials(
        &self,
        discovery: &Discovery,
        registration: &ClientRegistration,
        scope: Option<&str>,
    ) -> Result<TokenResponse> {
        let mut form = vec![("grant_type", "client_credentials".to_owned())];
        if let Some(scope) = scope {
            form.push(("scope", scope.to_owned()));
        }
        if let Some(resource) = self.resource_param(&discovery.resource) {
            form.push(("resource", resource));
        }
        self.token_request(discovery, registration, form).await
    }

    /// RFC 7009: revoke the refresh token, then the access token.
    ///
    /// The client authenticates with its registered method when the revocation endpoint accepts
    /// it (or lists nothing), else with the first listed method its credentials allow. A server
    /// that answers `unsupported_token_type` for one token does not stop the other.
    pub async fn revoke(
        &self,
        discovery: &Discovery,
        registration: &ClientRegistration,
        refresh_token: Option<&RefreshToken>,
        access_token: Option<&AccessToken>,
    ) -> Result<Revocation> {
        registration.check_issuer(discovery)?;
        let asm = &discovery.authorization_server;
        let Some(url) = asm.revocation_endpoint.clone() else { return Ok(Revocation::NoEndpoint) };
        let method = match &asm.revocation_endpoint_auth_methods_supported {
            Some(list) if !list.iter().any(|m| m == registration.auth_method.as_str()) => list
                .iter()
                .filter_map(|m| TokenEndpointAuthMethod::from_name(m))
                .find(|m| match m {
                    TokenEndpointAuthMethod::None => true,
                    TokenEndpointAuthMethod::ClientSecretBasic
                    | TokenEndpointAuthMethod::ClientSecretPost => {
                        registration.client_secret.is_some()
                    }
                    TokenEndpointAuthMethod::PrivateKeyJwt => registration.client_key.is_some(),
                })
                .ok_or(Error::Unsupported(
                    "revocation authentication method this client can use",
                ))?,
            _ => registration.auth_method,
        };
        let tokens = [
            refresh_token.map(|t| (t.secret(), "refresh_token")),
            access_token.map(|t| (t.secret(), "access_token")),
        ];
        for (token, hint) in tokens.into_iter().flatten() {
            let mut form = vec![("token", token.to_owned()), ("token_type_hint", hint.to_owned())];
            let mut headers = Vec::new();
            self.authenticate(registration, method, &asm.issuer, &mut form, &mut headers)?;
            let pairs: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let mut request = HttpRequest::post_form(url.clone(), &pairs)
                .with_reach(self.bounds(&discovery.server).reach(&url));
            request.headers.extend(headers);
            let response = self.post_no_redirect(request).await?;
            if response.is_success() {
                continue;
            }
            let error = endpoint_error(Endpoint::Revocation, &url, &response, self.clock.now());
            if error.oauth_code() == Some("unsupported_token_type") {
                tracing::debug!(hint, "revocation endpoint does not revoke this token type");
                continue;
            }
            return Err(error);
        }
        Ok(Revocation::Revoked)
    }
}

/// The outcome of [`OAuthClient::revoke`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Revocation {
    /// The server accepted the revocation of every token given.
    Revoked,
    /// The server has no revocation endpoint; nothing was sent.
    NoEndpoint,
}

#[cfg(test)]
mod tests;
