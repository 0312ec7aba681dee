//! [`OAuthRefresher`]: token-storage's [`Refresher`] over mcp-oauth's refresh grant, and the
//! mapping of OAuth errors onto token-storage's terminal / transient policy.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use mcp_oauth::{Discovery, DpopKey, Endpoint, OAuthClient, RefreshToken, TokenEndpointAuthMethod};
use token_storage::{
    RefreshError, RefreshRequest, Refresher, TerminalCode, TokenKey, TokenResponse, TransientKind,
};

/// The `metadata` member under which a stored client registration keeps the discovery result.
const DISCOVERY: &str = "discovery";
/// The `metadata` member under which a stored client registration keeps the mcp-oauth
/// registration, without its secret (kept in the redacted `client_secret`) and without a
/// private key (`metadata` shows in `Debug`, so no secret may go there).
const REGISTRATION: &str = "registration";
/// The `metadata` member naming a `private_key_jwt` key's algorithm and key ID; its PEM is in
/// the redacted, sealed `client_secret`.
const CLIENT_KEY: &str = "client_key";

/// Runs the refresh-token grant for [`token_storage::TokenStorage`] with
/// [`OAuthClient::refresh`], sending the stored scope and the discovery's `resource`.
///
/// What the grant needs besides the refresh token (the token endpoint, the resource, the
/// client and how it authenticates) comes from the client registration stored for the key
/// ([`stored_client`] writes it), so a refresh works in any process that shares the store.
///
/// DPoP (RFC 9449): with a DPoP key stored for the key ([`RefreshRequest::dpop_key`]) and a server
/// that advertises ES256 DPoP, or tokens that are `DPoP`-bound, the grant carries a proof by that
/// key (a `use_dpop_nonce` answer is retried once with the server's nonce). A `DPoP`-bound
/// refresh token with no stored key is not sent: `Terminal(InvalidGrant)`.
///
/// Errors are classified conservatively (**only what is safe to retry is transient**):
///
/// | mcp-oauth error | [`RefreshError`] |
/// |---|---|
/// | OAuth `invalid_grant` / `invalid_client` / `unauthorized_client` | `Terminal` with that code |
/// | 5xx (with or without an OAuth body), OAuth `server_error` | `Transient(ServerError)` |
/// | 429, OAuth `slow_down` | `Transient(RateLimited)`, with `Retry-After` |
/// | OAuth `temporarily_unavailable` | `Transient(TemporarilyUnavailable)`, with `Retry-After` |
/// | no connection could be made ([`mcp_oauth::Error::never_sent`]) | `Transient(Network)`: retried freely |
/// | timeout; connection reset or broken off after sending | `Transient(Unanswered)`: in doubt, the server may have rotated |
/// | anything else: other OAuth codes, other statuses, a malformed or non-Bearer response, a refused URL, a cancelled request, no stored registration | `Terminal(InvalidGrant)`, with a description |
///
/// A malformed 200 is terminal on purpose: the server may have rotated the refresh token
/// already, and redeeming the old one again would trip reuse detection.
///
/// ```
/// use connection_factory::OAuthRefresher;
/// use mcp_clock::SharedClock;
/// use mcp_oauth::{HttpRequest, HttpResponse, OAuthClient};
///
/// let http = |_req: HttpRequest| async { Ok(HttpResponse::new(503)) };
/// let refresher = OAuthRefresher::new(OAuthClient::new(http, SharedClock::system()));
/// # drop(refresher);
/// ```
#[derive(Clone)]
pub struct OAuthRefresher {
    client: OAuthClient,
    /// The DPoP keys used so far, by thumbprint: each keeps the nonces servers sent it.
    dpop_keys: Arc<Mutex<HashMap<String, DpopKey>>>,
}

impl fmt::Debug for OAuthRefresher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OAuthRefresher").finish_non_exhaustive()
    }
}

impl OAuthRefresher {
    /// A refresher that sends its grants with `client`.
    pub fn new(client: OAuthClient) -> Self {
        OAuthRefresher { client, dpop_keys: Arc::default() }
    }

    /// The DPoP key in `pem`, the same instance (with the nonces it learnt) each time.
    fn dpop_key(&self, pem: &token_storage::Secret) -> Result<DpopKey, mcp_oauth::Error> {
        let key = crate::dpop::decode(pem)?;
        let mut keys = self.dpop_keys.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(keys.entry(key.thumbprint().to_owned()).or_insert(key).clone())
    }
}

/// The token-storage client registration for `registration`, carrying `discovery` and the
/// mcp-oauth registration in its `metadata` (the client secret goes in the redacted
/// `client_secret`), so that [`OAuthRefresher`] can refresh from the store alone.
///
/// A `private_key_jwt` client's private key (PKCS#8 PEM) goes in `client_secret`, which such a
/// client does not otherwise use: it is redacted in `Debug` and sealed with the rest of the
/// record by token storage. Its algorithm and key ID go in `metadata` (nothing secret goes
/// there). So a `private_key_jwt` client refreshes from the store alone, in any process that
/// shares it and holds the storage key.
///
/// ```
/// # use mcp_oauth::*;
/// # fn demo(discovery: Discovery, registration: ClientRegistration) {
/// let stored = connection_factory::stored_client(&discovery, &registration);
/// assert_eq!(stored.client_id, registration.client_id);
/// # }
/// ```
pub fn stored_client(
    discovery: &Discovery,
    registration: &mcp_oauth::ClientRegistration,
) -> token_storage::ClientRegistration {
    let mut stored = token_storage::ClientRegistration::new(
        registration.client_id.clone(),
        discovery.issuer().to_owned(),
    );
    let key = match (&registration.auth_method, &registration.client_key) {
        (TokenEndpointAuthMethod::PrivateKeyJwt, Some(key)) => Some(key),
        _ => None,
    };
    if let Some(key) = key {
        stored = stored.client_secret(key.pem.secret().to_owned());
    } else if let Some(secret) = &registration.client_secret {
        stored = stored.client_secret(secret.secret().to_owned());
    }
    stored = stored.auth_method(registration.auth_method.as_str());
    let mut public = registration.clone();
    public.client_secret = None;
    public.client_key = None;
    stored.metadata = serde_json::json!({
        DISCOVERY: discovery,
        REGISTRATION: public,
    });
    if let Some(key) = key {
        stored.metadata[CLIENT_KEY] =
            serde_json::json!({ "algorithm": key.algorithm, "key_id": key.key_id });
    }
    stored
}

/// The discovery and mcp-oauth registration kept in a stored client registration.
pub(crate) fn decode_stored_client(
    stored: &token_storage::ClientRegistration,
) -> Option<(Discovery, mcp_oauth::ClientRegistration)> {
    let discovery: Discovery =
        serde_json::from_value(stored.metadata.get(DISCOVERY)?.clone()).ok()?;
    let secret = stored.client_secret.clone().map(mcp_oauth::ClientSecret::from);
    let registration = match stored.metadata.get(REGISTRATION) {
        Some(value) => {
            let mut registration: mcp_oauth::ClientRegistration =
                serde_json::from_value(value.clone()).ok()?;
            match stored.metadata.get(CLIENT_KEY) {
                Some(key) if registration.auth_method == TokenEndpointAuthMethod::PrivateKeyJwt => {
                    let pem = stored.client_secret.as_ref()?.expose();
                    registration.client_key = Some(mcp_oauth::ClientSigningKey {
                        pem: mcp_oauth::PrivateKeyPem::new(pem),
                        algorithm: key.get("algorithm")?.as_str()?.to_owned(),
                        key_id: key.get("key_id").and_then(|k| k.as_str()).map(str::to_owned),
                    });
                }
                _ => registration.client_secret = secret,
            }
            registration
        }
        None => mcp_oauth::ClientRegistration {
            client_id: stored.client_id.clone(),
            client_secret: secret,
            client_key: None,
            auth_method: TokenEndpointAuthMethod::from_name(&stored.token_endpoint_auth_method)?,
            source: mcp_oauth::RegistrationSource::PreRegistered,
            issuer: stored.issuer.clone(),
            client_secret_expires_at: None,
        },
    };
    Some((discovery, registration))
}

#[async_trait::async_trait]
impl Refresher for OAuthRefresher {
    async fn refresh(
        &self,
        key: &TokenKey,
        request: &RefreshRequest,
    ) -> Result<TokenResponse, RefreshError> {
        let Some((discovery, registration)) =
            request.client.as_ref().and_then(decode_stored_client)
        else {
            tracing::warn!(
                server = key.server(),
                "no usable client registration stored: cannot refresh"
            );
            return Err(RefreshError::terminal(
                TerminalCode::InvalidGrant,
                Some("no usable client registration is stored for this key".into()),
            ));
        };
        // A DPoP-bound refresh token is presented only with a proof by its key; with a
        // server that takes DPoP, the stored key signs the grant.
        let client = match (&request.dpop_key, request.dpop_bound) {
            (None, true) => {
                tracing::warn!(server = key.server(), "DPoP-bound tokens without their key");
                return Err(RefreshError::terminal(
                    TerminalCode::InvalidGrant,
                    Some("the refresh token is DPoP-bound and no DPoP key is stored".into()),
                ));
            }
            (Some(pem), bound) if bound || discovery.authorization_server.supports_dpop_es256() => {
                let dpop = self.dpop_key(pem).map_err(|e| {
                    RefreshError::terminal(
                        TerminalCode::InvalidGrant,
                        Some(format!("the stored DPoP key is unusable: {e}")),
                    )
                })?;
                self.client.clone().with_dpop(dpop)
            }
            _ => self.client.clone(),
        };
        let refresh_token = RefreshToken::from(request.refresh_token.clone());
        match client
            .refresh(&discovery, &registration, &refresh_token, request.scope.as_deref())
            .await
        {
            Ok(response) => Ok(convert_response(response)),
            Err(error) => Err(classify(&error)),
        }
    }
}

pub(crate) fn convert_response(response: mcp_oauth::TokenResponse) -> TokenResponse {
    TokenResponse {
        access_token: response.access_token.into_secret(),
        token_type: response.token_type,
        expires_in: response.expires_in,
        refresh_token: response.refresh_token.map(mcp_oauth::RefreshToken::into_secret),
        refresh_token_expires_in: None,
        scope: response.scope,
        date: response.date,
    }
}

/// Map an mcp-oauth error from a refresh grant onto token-storage's policy (see
/// [`OAuthRefresher`]). Only what is safe to retry is transient.
pub(crate) fn classify(error: &mcp_oauth::Error) -> RefreshError {
    use mcp_oauth::Error as E;
    let retry_after = error.retry_after();
    let transient = |kind: TransientKind, message: String| RefreshError::Transient {
        kind,
        retry_after,
        message,
    };
    match error {
        // The request may have reached the server (which may have rotated the refresh token)
        // and no answer came: in doubt, never retried as if it had not been sent.
        E::Timeout { timeout, .. } => transient(
            TransientKind::Unanswered,
            format!("token request timed out after {timeout:?}"),
        ),
        E::Transport { .. } if error.never_sent() => {
            transient(TransientKind::Network, "token endpoint unreachable".into())
        }
        E::Transport { .. } => transient(
            TransientKind::Unanswered,
            "the token request failed after it was sent (connection reset or broken off)".into(),
        ),
        E::HttpStatus { status: 429, .. } => {
            transient(TransientKind::RateLimited, "token endpoint answered 429".into())
        }
        E::HttpStatus { status, .. } if (500..=599).contains(status) => transient(
            TransientKind::ServerError(*status),
            format!("token endpoint answered {status}"),
        ),
        E::OAuth { endpoint: Endpoint::Token, status, code, description, .. } => {
            let message = format!("token endpoint answered {status} {code}");
            match code.as_str() {
                "invalid_grant" => {
                    RefreshError::terminal(TerminalCode::InvalidGrant, description.clone())
                }
                "invalid_client" => {
                    RefreshError::terminal(TerminalCode::InvalidClient, description.clone())
                }
                "unauthorized_client" => {
                    RefreshError::terminal(TerminalCode::UnauthorizedClient, description.clone())
                }
                "temporarily_unavailable" => {
                    transient(TransientKind::TemporarilyUnavailable, message)
                }
                "slow_down" => transient(TransientKind::RateLimited, message),
                _ if *status == 429 => transient(TransientKind::RateLimited, message),
                _ if (500..=599).contains(status) => {
                    transient(TransientKind::ServerError(*status), message)
                }
                "server_error" => transient(TransientKind::ServerError(500), message),
                _ => RefreshError::terminal(
                    TerminalCode::InvalidGrant,
                    Some(format!("refresh refused: {code}")),
                ),
            }
        }
        other => RefreshError::terminal(
            TerminalCode::InvalidGrant,
            Some(format!("refresh failed and is not safe to retry: {other}")),
        ),
    }
}
