//! Random identifiers, token fingerprints and the redacted types that carry secrets.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest as _, Sha256};

/// A fresh random string: `prefix` followed by 32 random bytes in base64url.
pub(crate) fn random_token(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    rand::fill(&mut bytes);
    format!("{prefix}{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// base64url(SHA-256(input)) without padding: the PKCE S256 transform.
pub(crate) fn s256(input: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(input.as_bytes()))
}

/// A short, stable, non-reversible name for a token: the first 12 hex digits of its SHA-256.
///
/// Statistics and events name tokens by fingerprint, never by value, so they can be printed.
///
/// ```
/// use mcp_fixtures::TokenFingerprint;
/// let fp = TokenFingerprint::of("rt_secret");
/// assert_eq!(fp.as_str().len(), 12);
/// assert_eq!(fp, TokenFingerprint::of("rt_secret"));
/// assert!(!format!("{fp:?}").contains("secret"));
/// ```
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TokenFingerprint(String);

impl TokenFingerprint {
    /// The fingerprint of `token`.
    pub fn of(token: &str) -> Self {
        let digest = Sha256::digest(token.as_bytes());
        let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
        TokenFingerprint(hex)
    }

    /// The fingerprint as 12 lowercase hex digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for TokenFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenFingerprint({})", self.0)
    }
}

impl fmt::Display for TokenFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Tokens minted directly through [`AuthServerHandle::issue_tokens`](crate::AuthServerHandle::issue_tokens).
///
/// `Debug` shows fingerprints, never the tokens.
#[derive(Clone)]
pub struct IssuedTokens {
    pub(crate) access_token: String,
    pub(crate) refresh_token: Option<String>,
    pub(crate) expires_in: Option<u64>,
    pub(crate) scope: String,
    /// Bound to a DPoP key (`token_type` `DPoP`).
    pub(crate) dpop_bound: bool,
}

impl IssuedTokens {
    /// The bearer access token.
    pub fn access_token(&self) -> &str {
        &self.access_token
    }
    /// The refresh token, when one was issued.
    pub fn refresh_token(&self) -> Option<&str> {
        self.refresh_token.as_deref()
    }
    /// Seconds the access token lives, as the server would report it.
    pub fn expires_in(&self) -> Option<u64> {
        self.expires_in
    }
    /// The granted scope, space separated.
    pub fn scope(&self) -> &str {
        &self.scope
    }
}

impl fmt::Debug for IssuedTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedTokens")
            .field("access_token", &TokenFingerprint::of(&self.access_token))
            .field("refresh_token", &self.refresh_token.as_deref().map(TokenFingerprint::of))
            .field("expires_in", &self.expires_in)
            .field("scope", &self.scope)
            .finish()
    }
}

/// A client registered through [`AuthServerHandle::register_client`](crate::AuthServerHandle::register_client).
///
/// `Debug` redacts the secret.
#[derive(Clone)]
pub struct RegisteredClient {
    pub(crate) client_id: String,
    pub(crate) client_secret: Option<String>,
}

impl RegisteredClient {
    /// The client identifier.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }
    /// The client secret, for confidential clients.
    pub fn client_secret(&self) -> Option<&str> {
        self.client_secret.as_deref()
    }
}

impl fmt::Debug for RegisteredClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegisteredClient")
            .field("client_id", &self.client_id)
            .field("client_secret", &self.client_secret.as_ref().map(|_| "[redacted]"))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s256_is_unpadded_base64url_of_sha256() {
        // SHA-256("abc") = ba7816bf 8f01cfea ... (FIPS 180-2 example), in base64url.
        assert_eq!(s256("abc"), "ungWv48Bz-pBQUDeXa4iI7ADYaOWF3qctBD_YfIAFa0");
    }

    #[test]
    fn random_tokens_differ_and_carry_the_prefix() {
        let a = random_token("at_");
        let b = random_token("at_");
        assert_ne!(a, b);
        assert!(a.starts_with("at_") && a.len() == 3 + 43);
    }

    #[test]
    fn debug_output_redacts_secrets() {
        let tokens = IssuedTokens {
            access_token: "at_SECRETVALUE".into(),
            refresh_token: Some("rt_SECRETVALUE".into()),
            expires_in: Some(60),
            scope: "mcp:tools".into(),
            dpop_bound: false,
        };
        let client =
            RegisteredClient { client_id: "c1".into(), client_secret: Some("SECRETVALUE".into()) };
        let printed = format!("{tokens:?} {client:?}");
        assert!(!printed.contains("SECRETVALUE"), "{printed}");
        assert!(printed.contains("c1") && printed.contains("[redacted]"));
    }
}
