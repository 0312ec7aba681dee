//! The authorization request: PKCE S256, CSRF `state`, RFC 8707 `resource`, and the callback
//! checks (single-use state with a TTL compared in constant time, RFC 9207 `iss`).

use std::sync::Mutex;
use std::time::Duration;

use base64::Engine as _;
use mcp_clock::{Clock, SharedClock, Timestamp};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use url::Url;

use crate::client::OAuthClient;
use crate::discovery::Discovery;
use crate::error::{Error, Result};
use crate::registration::ClientRegistration;
use crate::secret::{AuthorizationCode, CsrfState, PkceVerifier, ct_eq, random_urlsafe};
use crate::token::TokenResponse;

/// The S256 code challenge of `verifier` (RFC 7636 §4.2).
///
/// ```
/// use mcp_oauth::{pkce_challenge, PkceVerifier};
/// // The example from RFC 7636 appendix B.
/// let v = PkceVerifier::new("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk");
/// assert_eq!(pkce_challenge(&v), "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM");
/// ```
pub fn pkce_challenge(verifier: &PkceVerifier) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(Sha256::digest(verifier.secret().as_bytes()))
}

/// An authorization request waiting for its callback.
///
/// Holds the `state` (256 random bits) and the PKCE verifier; `Debug` redacts both. It
/// serializes (secrets included) so a shared flow store can carry it between processes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PendingAuthorization {
    /// The CSRF state sent with the request.
    pub state: CsrfState,
    /// The PKCE verifier.
    pub verifier: PkceVerifier,
    /// The redirect URI sent (repeated on the code exchange).
    pub redirect_uri: String,
    /// The resource indicator sent (empty: none was sent).
    pub resource: String,
    /// The scope requested, if any.
    pub scope: Option<String>,
    /// The issuer the request went to.
    pub issuer: String,
    /// The client ID used.
    pub client_id: String,
    /// When the request was made.
    pub created_at: Timestamp,
    /// How long it stays valid.
    pub ttl: Duration,
}

impl PendingAuthorization {
    fn expired(&self, now: Timestamp) -> bool {
        now.saturating_since(self.created_at) >= self.ttl
    }
}

/// The query parameters of the redirect back to the client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallbackParams {
    /// `code`.
    pub code: Option<AuthorizationCode>,
    /// `state`.
    pub state: Option<CsrfState>,
    /// `iss` (RFC 9207).
    pub iss: Option<String>,
    /// `error`.
    pub error: Option<String>,
    /// `error_description`.
    pub error_description: Option<String>,
}

impl CallbackParams {
    /// The parameters of a callback (or `Location`) URL.
    ///
    /// ```
    /// use mcp_oauth::CallbackParams;
    /// let url = "http://127.0.0.1:8765/callback?code=abc&state=xyz".parse().unwrap();
    /// let p = CallbackParams::from_url(&url);
    /// assert_eq!(p.code.unwrap().secret(), "abc");
    /// ```
    pub fn from_url(url: &Url) -> Self {
        Self::collect(url).0
    }

    /// The parameters of a callback URL, refusing one that repeats `code`, `state`, `iss`,
    /// `error` or `error_description` (which of two `state`s would be checked, and which
    /// `code` sent?).
    ///
    /// ```
    /// use mcp_oauth::CallbackParams;
    /// let twice = "http://127.0.0.1:1/cb?code=a&state=s&state=t".parse().unwrap();
    /// assert!(CallbackParams::parse(&twice).is_err());
    /// ```
    ///
    /// # Errors
    /// [`Error::Malformed`] naming the repeated parameter (the URL is shown without its query).
    pub fn parse(url: &Url) -> Result<Self> {
        match Self::collect(url) {
            (params, None) => Ok(params),
            (_, Some(name)) => Err(Error::malformed(
                "authorization callback",
                url,
                format!("the parameter {name} appears more than once"),
            )
            .without_query()),
        }
    }

    /// The parameters, and the first one that was repeated.
    fn collect(url: &Url) -> (Self, Option<&'static str>) {
        let mut p = CallbackParams::default();
        let mut repeated = None;
        for (k, v) in url.query_pairs() {
            let v = v.into_owned();
            let (name, was_set) = match &*k {
                "code" => ("code", p.code.replace(AuthorizationCode::new(v)).is_some()),
                "state" => ("state", p.state.replace(CsrfState::new(v)).is_some()),
                "iss" => ("iss", p.iss.replace(v).is_some()),
                "error" => ("error", p.error.replace(v).is_some()),
                "error_description" => {
                    ("error_description", p.error_description.replace(v).is_some())
                }
                _ => continue,
            };
            if was_set {
                repeated.get_or_insert(name);
            }
        }
        (p, repeated)
    }
}

/// Pending authorizations by `state`: single use, with a TTL, looked up in constant time per
/// entry.
///
/// ```
/// use mcp_oauth::{Error, PendingAuthorizations};
/// use mcp_clock::SharedClock;
/// let pending = PendingAuthorizations::new(SharedClock::system());
/// assert!(matches!(pending.take("no-such-state"), Err(Error::UnknownState)));
/// ```
#[derive(Debug)]
pub struct PendingAuthorizations {
    clock: SharedClock,
    entries: Mutex<Vec<PendingAuthorization>>,
}

impl PendingAuthorizations {
    /// An empty set.
    pub fn new(clock: SharedClock) -> Self {
        PendingAuthorizations { clock, entries: Mutex::new(Vec::new()) }
    }

    /// Remember `pending` until its callback arrives or it expires.
    pub fn insert(&self, pending: PendingAuthorization) {
        let now = self.clock.now();
        let mut entries = self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        entries.retain(|p| !p.expired(now));
        entries.push(pending);
    }

    /// Take the pending authorization whose state is `state`. It cannot be taken twice.
    pub fn take(&self, state: &str) -> Result<PendingAuthorization> {
        let now = self.clock.now();
        let mut entries = self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // Compare against every entry so timing does not reveal which prefix matched.
        let mut found = None;
        for (i, p) in entries.iter().enumerate() {
            if ct_eq(p.state.secret(), state) {
                found = Some(i);
            }
        }
        let pending = found.map(|i| entries.swap_remove(i)).ok_or(Error::UnknownState)?;
        entries.retain(|p| !p.expired(now));
        if pending.expired(now) {
            return Err(Error::StateExpired);
        }
        Ok(pending)
    }

    /// How many are waiting (expired ones included until the next insert or take).
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len()
    }

    /// True when none are waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl OAuthClient {
    /// Build the authorization URL for the browser, and the pending state to keep until the
    /// callback.
    ///
    /// Refuses a server whose `code_challenge_methods_supported` lacks `S256` or is absent (MCP
    /// 2025-11-25 and 2026-07-28: the client must not proceed without it), except for the
    /// 2025-03-26 default endpoints, used when the server publishes no metadata at all.
    pub fn authorization_url(
        &self,
        discovery: &Discovery,
        registration: &ClientRegistration,
        redirect_uri: &str,
        scope: Option<&str>,
    ) -> Result<(Url, PendingAuthorization)> {
        let asm = &discovery.authorization_server;
        match &asm.code_challenge_methods_supported {
            Some(methods) if methods.iter().any(|m| m == "S256") => {}
            Some(methods) => return Err(Error::PkceUnsupported { methods: methods.clone() }),
            // 2025-03-26 without any metadata: the default endpoints, where S256 is assumed.
            None if discovery.source == crate::MetadataSource::LegacyDefaultEndpoints => {}
            None => return Err(Error::PkceUnsupported { methods: Vec::new() }),
        }
        let mut url = asm
            .authorization_endpoint
            .clone()
            .ok_or(Error::Unsupported("authorization endpoint"))?;
        let verifier = PkceVerifier::new(random_urlsafe(48));
        let state = CsrfState::new(random_urlsafe(32));
        let resource = self.resource_param(&discovery.resource);
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("response_type", "code")
                .append_pair("client_id", &registration.client_id)
                .append_pair("redirect_uri", redirect_uri)
                .append_pair("code_challenge", &pkce_challenge(&verifier))
                .append_pair("code_challenge_method", "S256")
                .append_pair("state", state.secret());
            if let Some(resource) = &resource {
                q.append_pair("resource", resource);
            }
            if let Some(scope) = scope {
                q.append_pair("scope", scope);
            }
            for (name, value) in &self.config().extra_authorization_params {
                if !crate::client::RESERVED_AUTHORIZATION_PARAMS.contains(&name.as_str()) {
                    q.append_pair(name, value);
                }
            }
        }
        let pending = PendingAuthorization {
            state,
            verifier,
            redirect_uri: redirect_uri.to_owned(),
            resource: resource.unwrap_or_default(),
            scope: scope.map(str::to_owned),
            issuer: asm.issuer.clone(),
            client_id: registration.client_id.clone(),
            created_at: self.clock.now(),
            ttl: self.config.authorization_ttl,
        };
        Ok((url, pending))
    }

    /// Visit the authorization URL without a browser and read the callback parameters from the
    /// redirect's `Location`, without following it.
    ///
    /// For authorization servers that approve without user interaction (test and conformance
    /// servers, some machine setups). Anything but a redirect is [`Error::HttpStatus`].
    pub async fn authorize_without_browser(
        &self,
        authorization_url: &Url,
    ) -> Result<CallbackParams> {
        // The URL carries the `state` and the redirect the `code`: errors name neither.
        let response = self
            .send(crate::http::HttpRequest::get(authorization_url.clone()))
            .await
            .map_err(Error::without_query)?;
        if !response.is_redirect() {
            return Err(Error::HttpStatus {
                url: authorization_url.to_string(),
                status: response.status,
                retry_after: crate::client::retry_after(&response, self.clock.now()),
            }
            .without_query());
        }
        let location = response.header("location").unwrap_or_default();
        let target = authorization_url.join(location).map_err(|e| {
            Error::InvalidUrl { url: location.to_owned(), reason: e.to_string() }.without_query()
        })?;
        CallbackParams::parse(&target)
    }

    /// Check the callback against `pending` and exchange its code for tokens.
    ///
    /// Checks first that `pending` was made with this discovery's issuer and this
    /// registration's client ID, then, in order: the `state` (constant time), its TTL, the RFC 9207 `iss` (required
    /// when the server advertises it, compared whenever present, by exact string comparison),
    /// and only then an `error` in the callback, then the code, which is sent with the PKCE
    /// verifier, the redirect URI and the same `resource`. An `error` in a callback that fails
    /// the `state` or `iss` checks is neither acted on nor shown: it may come from an attacker
    /// (a mix-up or a forged redirect).
    pub async fn exchange_code(
        &self,
        discovery: &Discovery,
        registration: &ClientRegistration,
        pending: &PendingAuthorization,
        callback: &CallbackParams,
    ) -> Result<TokenResponse> {
        // The pending request must be this discovery's and this registration's.
        if pending.issuer != discovery.issuer() {
            return Err(Error::IssuerMismatch {
                expected: discovery.issuer().to_owned(),
                found: pending.issuer.clone(),
            });
        }
        if pending.client_id != registration.client_id {
            return Err(Error::InvalidConfig(format!(
                "the pending authorization was made for client {:?}, not {:?}",
                pending.client_id, registration.client_id
            )));
        }
        match &callback.state {
            Some(s) if ct_eq(s.secret(), pending.state.secret()) => {}
            _ => return Err(Error::UnknownState),
        }
        if pending.expired(self.clock.now()) {
            return Err(Error::StateExpired);
        }
        let asm = &discovery.authorization_server;
        match &callback.iss {
            Some(iss) if *iss != pending.issuer => {
                return Err(Error::IssuerMismatch {
                    expected: pending.issuer.clone(),
                    found: iss.clone(),
                });
            }
            None if asm.authorization_response_iss_parameter_supported => {
                return Err(Error::IssuerMismatch {
                    expected: pending.issuer.clone(),
                    found: String::new(),
                });
            }
            _ => {}
        }
        if let Some(error) = &callback.error {
            return Err(Error::AuthorizationDenied {
                error: error.clone(),
                description: callback.error_description.clone(),
            });
        }
        let code = callback.code.as_ref().ok_or(Error::AuthorizationDenied {
            error: "missing_code".into(),
            description: Some("the callback carries neither a code nor an error".into()),
        })?;
        let mut form = vec![
            ("grant_type", "authorization_code".to_owned()),
            ("code", code.secret().to_owned()),
            ("redirect_uri", pending.redirect_uri.clone()),
            ("code_verifier", pending.verifier.secret().to_owned()),
        ];
        // The resource the authorization request carried, if it carried one.
        if !pending.resource.is_empty() {
            form.push(("resource", pending.resource.clone()));
        }
        self.token_request(discovery, registration, form).await
    }
}

#[cfg(test)]
mod tests;
