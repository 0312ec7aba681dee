//! What is stored: [`TokenSet`] and [`ClientRegistration`], and their encrypted-record forms.

use std::time::Duration;

use mcp_clock::Timestamp;
use serde::{Deserialize, Serialize};

use crate::error::ReauthReason;
use crate::{Secret, TokenResponse};

/// One stored set of tokens for a key, as read back from the store.
///
/// `Debug` prints no secrets.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), token_storage::Error> {
/// use std::sync::Arc;
/// use std::time::Duration;
/// use token_storage::*;
/// # #[derive(Debug)] struct NoRefresh;
/// # #[async_trait::async_trait]
/// # impl Refresher for NoRefresh {
/// #     async fn refresh(&self, _: &TokenKey, _: &RefreshRequest)
/// #         -> Result<TokenResponse, RefreshError> { unreachable!() }
/// # }
///
/// let keys = Arc::new(Keyring::new("k1", EncryptionKey::from_bytes([1; 32]))?);
/// let storage = TokenStorage::builder(MemoryTokenStore::new().into(), keys, Arc::new(NoRefresh)).build();
/// let key = TokenKey::new("acme", "alice", "github");
/// let response = TokenResponse::bearer("at").expires_in(Duration::from_secs(3600)).refresh_token("rt");
/// let set = storage.store(&key, "https://as.example", response).await?;
/// assert_eq!(set.access_token().expose(), "at");
/// assert_eq!(set.expires_at(), Some(set.obtained_at() + Duration::from_secs(3600)));
/// assert!(!format!("{set:?}").contains("\"at\"") && !format!("{set:?}").contains("\"rt\""));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSet {
    pub(crate) access_token: Secret,
    pub(crate) token_type: String,
    pub(crate) expires_at: Option<Timestamp>,
    pub(crate) refresh_token: Option<Secret>,
    pub(crate) refresh_token_expires_at: Option<Timestamp>,
    pub(crate) scope: Option<String>,
    pub(crate) issuer: String,
    pub(crate) obtained_at: Timestamp,
    pub(crate) version: u64,
    pub(crate) needs_authorization: Option<ReauthReason>,
    pub(crate) doubt: Doubt,
    /// The sealed record's generation (bound into its associated data); 0 for a set not read
    /// from the store.
    pub(crate) generation: u64,
}

/// Whether a refresh of a stored set may have reached the server without its answer being
/// stored (issue 12's in-doubt record).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Doubt {
    /// No refresh of this set is outstanding.
    #[default]
    No,
    /// The intent, written under the lease before the first send (or after a lost answer by
    /// a writer that had none): a presentation of the refresh token may have reached the
    /// server. Whoever refreshes next claims the one same-token retry.
    Sent,
    /// The one same-token retry was claimed: a refresh that reads this presents nothing and
    /// reports the rotation lost in flight.
    RetryClaimed,
}

impl TokenSet {
    /// The access token.
    pub fn access_token(&self) -> &Secret {
        &self.access_token
    }

    /// The token type (usually `Bearer`).
    pub fn token_type(&self) -> &str {
        &self.token_type
    }

    /// When the access token expires; `None` when the server gave no lifetime. For a refresh,
    /// the lifetime counts from when the request left (the server may have issued the token
    /// at any time until its answer arrived), so a late answer never makes it look younger.
    pub fn expires_at(&self) -> Option<Timestamp> {
        self.expires_at
    }

    /// The refresh token, if one is held.
    pub fn refresh_token(&self) -> Option<&Secret> {
        self.refresh_token.as_ref()
    }

    /// When the refresh token expires, when the server said.
    pub fn refresh_token_expires_at(&self) -> Option<Timestamp> {
        self.refresh_token_expires_at
    }

    /// The granted scope.
    pub fn scope(&self) -> Option<&str> {
        self.scope.as_deref()
    }

    /// The issuer that granted these tokens.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// When these tokens arrived (on the storage's clock).
    pub fn obtained_at(&self) -> Timestamp {
        self.obtained_at
    }

    /// The store version of this set: every write gets a larger one, never reused.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Why this slot needs a new authorization, when a refresh was rejected for good.
    pub fn needs_authorization(&self) -> Option<&ReauthReason> {
        self.needs_authorization.as_ref()
    }

    /// Whether a refresh of this set may have reached the server without its answer being
    /// stored: the intent is written before the first send, so this holds while a refresh is
    /// in flight, and stays after a lost answer or a refresher that died. The server may have
    /// rotated the refresh token already: the next refresh presents it once more (a server
    /// with a reuse grace window answers with the successor); if that is refused or lost too,
    /// the slot needs authorization with [`ReauthReason::RotationLostInFlight`].
    pub fn in_doubt(&self) -> bool {
        self.doubt != Doubt::No
    }

    /// A new set from `response`, arrived at `now`.
    ///
    /// `expires_at` is `now + expires_in`, moved earlier to `date + expires_in` when the
    /// response's `Date` is earlier than `now` by at most `max_correction` (the time the
    /// response spent on the way). A `Date` in the future is ignored.
    pub(crate) fn from_response(
        response: TokenResponse,
        issuer: &str,
        now: Timestamp,
        max_correction: Duration,
    ) -> TokenSet {
        let issued = match response.date {
            Some(date) if date < now => now - now.saturating_since(date).min(max_correction),
            _ => now,
        };
        TokenSet {
            access_token: response.access_token,
            token_type: response.token_type,
            expires_at: response.expires_in.map(|d| issued + d),
            refresh_token: response.refresh_token,
            refresh_token_expires_at: response.refresh_token_expires_in.map(|d| issued + d),
            scope: response.scope,
            issuer: issuer.to_owned(),
            obtained_at: now,
            version: 0,
            needs_authorization: None,
            doubt: Doubt::No,
            generation: 0,
        }
    }
}

/// A client registration (from dynamic registration or configuration).
///
/// ```
/// use token_storage::ClientRegistration;
///
/// let client = ClientRegistration::new("client-123", "https://as.example")
///     .client_secret("s3cr3t")
///     .redirect_uri("http://127.0.0.1:8080/callback");
/// assert_eq!(client.token_endpoint_auth_method, "client_secret_basic");
/// assert!(!format!("{client:?}").contains("s3cr3t"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientRegistration {
    /// `client_id`.
    pub client_id: String,
    /// `client_secret`, for confidential clients.
    pub client_secret: Option<Secret>,
    /// `token_endpoint_auth_method`.
    pub token_endpoint_auth_method: String,
    /// The issuer the client is registered with.
    pub issuer: String,
    /// `redirect_uris`.
    pub redirect_uris: Vec<String>,
    /// The rest of the registration response and the server metadata a later refresh needs
    /// (token endpoint, supported auth methods, resource), as JSON.
    pub metadata: serde_json::Value,
}

impl ClientRegistration {
    /// A public client (`token_endpoint_auth_method` `none`) until a secret is set.
    pub fn new(client_id: impl Into<String>, issuer: impl Into<String>) -> Self {
        ClientRegistration {
            client_id: client_id.into(),
            client_secret: None,
            token_endpoint_auth_method: "none".into(),
            issuer: issuer.into(),
            redirect_uris: Vec::new(),
            metadata: serde_json::Value::Null,
        }
    }

    /// Set the client secret (and the auth method to `client_secret_basic` if it was `none`).
    pub fn client_secret(mut self, secret: impl Into<Secret>) -> Self {
        self.client_secret = Some(secret.into());
        if self.token_endpoint_auth_method == "none" {
            self.token_endpoint_auth_method = "client_secret_basic".into();
        }
        self
    }

    /// Set the token-endpoint auth method.
    pub fn auth_method(mut self, method: impl Into<String>) -> Self {
        self.token_endpoint_auth_method = method.into();
        self
    }

    /// Add a redirect URI.
    pub fn redirect_uri(mut self, uri: impl Into<String>) -> Self {
        self.redirect_uris.push(uri.into());
        self
    }

    /// Set the metadata.
    pub fn metadata(mut self, metadata: serde_json::Value) -> Self {
        self.metadata = metadata;
        self
    }
}

/// The plaintext form of a token set inside its sealed record.
#[derive(Serialize, Deserialize)]
pub(crate) struct TokenRecord {
    access_token: String,
    token_type: String,
    expires_at: Option<Timestamp>,
    refresh_token: Option<String>,
    refresh_token_expires_at: Option<Timestamp>,
    scope: Option<String>,
    issuer: String,
    obtained_at: Timestamp,
    needs_authorization: Option<ReauthReason>,
    /// A presentation may have reached the server ([`Doubt::Sent`] or later). Absent in
    /// records written before it existed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    in_doubt: bool,
    /// With `in_doubt`: the one same-token retry was claimed ([`Doubt::RetryClaimed`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    retry_claimed: bool,
}

impl TokenRecord {
    pub(crate) fn from_set(set: &TokenSet) -> Self {
        TokenRecord {
            access_token: set.access_token.expose().to_owned(),
            token_type: set.token_type.clone(),
            expires_at: set.expires_at,
            refresh_token: set.refresh_token.as_ref().map(|s| s.expose().to_owned()),
            refresh_token_expires_at: set.refresh_token_expires_at,
            scope: set.scope.clone(),
            issuer: set.issuer.clone(),
            obtained_at: set.obtained_at,
            needs_authorization: set.needs_authorization.clone(),
            in_doubt: set.doubt != Doubt::No,
            retry_claimed: set.doubt == Doubt::RetryClaimed,
        }
    }

    pub(crate) fn into_set(self, version: u64, generation: u64) -> TokenSet {
        TokenSet {
            access_token: Secret::new(self.access_token),
            token_type: self.token_type,
            expires_at: self.expires_at,
            refresh_token: self.refresh_token.map(Secret::new),
            refresh_token_expires_at: self.refresh_token_expires_at,
            scope: self.scope,
            issuer: self.issuer,
            obtained_at: self.obtained_at,
            version,
            needs_authorization: self.needs_authorization,
            doubt: match (self.in_doubt, self.retry_claimed) {
                (false, _) => Doubt::No,
                (true, false) => Doubt::Sent,
                (true, true) => Doubt::RetryClaimed,
            },
            generation,
        }
    }
}

/// The plaintext form of a client registration inside its sealed record.
#[derive(Serialize, Deserialize)]
pub(crate) struct ClientRecord {
    client_id: String,
    client_secret: Option<String>,
    token_endpoint_auth_method: String,
    issuer: String,
    redirect_uris: Vec<String>,
    metadata: serde_json::Value,
}

impl ClientRecord {
    pub(crate) fn from_registration(c: &ClientRegistration) -> Self {
        ClientRecord {
            client_id: c.client_id.clone(),
            client_secret: c.client_secret.as_ref().map(|s| s.expose().to_owned()),
            token_endpoint_auth_method: c.token_endpoint_auth_method.clone(),
            issuer: c.issuer.clone(),
            redirect_uris: c.redirect_uris.clone(),
            metadata: c.metadata.clone(),
        }
    }

    pub(crate) fn into_registration(self) -> ClientRegistration {
        ClientRegistration {
            client_id: self.client_id,
            client_secret: self.client_secret.map(Secret::new),
            token_endpoint_auth_method: self.token_endpoint_auth_method,
            issuer: self.issuer,
            redirect_uris: self.redirect_uris,
            metadata: self.metadata,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn expiry_is_absolute_from_arrival() {
        let now = Timestamp::from_secs(1_000_000);
        let set = TokenSet::from_response(
            TokenResponse::bearer("a").expires_in(HOUR).refresh_token_expires_in(HOUR * 24),
            "iss",
            now,
            Duration::from_secs(300),
        );
        assert_eq!(set.expires_at, Some(now + HOUR));
        assert_eq!(set.refresh_token_expires_at, Some(now + HOUR * 24));
        assert_eq!(set.obtained_at, now);
    }

    #[test]
    fn the_date_header_moves_expiry_earlier_within_bounds() {
        let now = Timestamp::from_secs(1_000_000);
        let max = Duration::from_secs(300);
        let slow = TokenResponse::bearer("a").expires_in(HOUR).date(now - Duration::from_secs(20));
        assert_eq!(
            TokenSet::from_response(slow, "i", now, max).expires_at,
            Some(now + HOUR - Duration::from_secs(20))
        );
        // A wildly skewed server clock moves expiry by at most the bound.
        let skewed = TokenResponse::bearer("a").expires_in(HOUR).date(now - HOUR);
        assert_eq!(
            TokenSet::from_response(skewed, "i", now, max).expires_at,
            Some(now + HOUR - max)
        );
        // A Date in the future is ignored.
        let ahead = TokenResponse::bearer("a").expires_in(HOUR).date(now + HOUR);
        assert_eq!(TokenSet::from_response(ahead, "i", now, max).expires_at, Some(now + HOUR));
    }

    #[test]
    fn no_lifetime_means_no_expiry() {
        let set =
            TokenSet::from_response(TokenResponse::bearer("a"), "i", Timestamp::from_secs(5), HOUR);
        assert_eq!(set.expires_at, None);
    }
}
