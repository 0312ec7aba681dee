//! Typed secrets: tokens, client secrets, PKCE verifiers, codes, private keys.
//!
//! Each is a named wrapper of the workspace's one secret type, [`mcp_secret::Secret`]: `Debug`
//! prints `AccessToken([redacted])` and `Display` `[redacted]`; the value is reached only
//! through `secret()`; equality is constant-time; the text is wiped from memory when the last
//! clone is dropped. The names keep an access token from being passed where a refresh token
//! goes; `into_secret` / `From` hand the value to token storage without a copy.
//!
//! ```
//! use mcp_oauth::AccessToken;
//! use mcp_secret::Secret;
//!
//! let token = AccessToken::new("at-123");
//! assert_eq!(format!("{token:?} {token}"), "AccessToken([redacted]) [redacted]");
//! let stored: Secret = token.clone().into();
//! assert_eq!(stored.expose(), token.secret());
//! ```

use std::fmt;

use mcp_secret::Secret;
use serde::{Deserialize, Serialize};

macro_rules! secret_type {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        ///
        /// `Debug` and `Display` print `[redacted]`; [`Self::secret`] returns the value.
        #[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Secret);

        impl $name {
            /// Wrap a secret value.
            pub fn new(value: impl Into<String>) -> Self {
                $name(Secret::new(value))
            }

            /// The secret value.
            ///
            /// # Security Warning
            /// Never log or display what this returns.
            pub fn secret(&self) -> &str {
                self.0.expose()
            }

            /// The value as the workspace's [`Secret`] (shared, not copied).
            pub fn into_secret(self) -> Secret {
                self.0
            }
        }

        impl From<$name> for Secret {
            fn from(value: $name) -> Secret {
                value.0
            }
        }

        impl From<Secret> for $name {
            fn from(value: Secret) -> $name {
                $name(value)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "([redacted])"))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("[redacted]")
            }
        }
    };
}

secret_type!(
    /// An OAuth access token.
    AccessToken
);
secret_type!(
    /// An OAuth refresh token.
    RefreshToken
);
secret_type!(
    /// A client secret (RFC 6749 §2.3.1).
    ClientSecret
);
secret_type!(
    /// A PKCE code verifier (RFC 7636).
    PkceVerifier
);
secret_type!(
    /// An authorization code from the callback.
    AuthorizationCode
);
secret_type!(
    /// The CSRF `state` of an authorization request.
    CsrfState
);
secret_type!(
    /// An OpenID Connect ID token, or an identity assertion (ID-JAG) derived from one.
    IdToken
);
secret_type!(
    /// A private key in PKCS#8 PEM form, for `private_key_jwt` client authentication.
    PrivateKeyPem
);

/// `n` random bytes from the operating system, base64url without padding.
pub(crate) fn random_urlsafe(n: usize) -> String {
    use base64::Engine as _;
    let mut buf = vec![0u8; n];
    // getrandom fails only when the OS has no entropy source at all; there is nothing sensible
    // to fall back to, and continuing with zero bytes would be a security bug.
    #[allow(clippy::expect_used)]
    getrandom::fill(&mut buf).expect("the operating system's random number generator failed");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf)
}

/// Constant-time string comparison.
pub(crate) use mcp_secret::ct_eq;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let values = [
            format!("{:?} {}", AccessToken::new("v-access"), AccessToken::new("v-access")),
            format!("{:?} {}", RefreshToken::new("v-refresh"), RefreshToken::new("v-refresh")),
            format!("{:?} {}", ClientSecret::new("v-secret"), ClientSecret::new("v-secret")),
            format!("{:?} {}", PkceVerifier::new("v-verifier"), PkceVerifier::new("v-verifier")),
            format!("{:?} {}", AuthorizationCode::new("v-code"), AuthorizationCode::new("v-code")),
            format!("{:?} {}", CsrfState::new("v-state"), CsrfState::new("v-state")),
            format!("{:?} {}", IdToken::new("v-id"), IdToken::new("v-id")),
            format!("{:?} {}", PrivateKeyPem::new("v-key"), PrivateKeyPem::new("v-key")),
        ];
        for v in &values {
            assert!(!v.contains("v-"), "{v}");
            assert!(v.contains("([redacted]) [redacted]"), "{v}");
        }
        assert_eq!(format!("{:?}", AccessToken::new("x")), "AccessToken([redacted])");
    }

    #[test]
    fn secrets_compare_by_value_and_serialize_transparently() {
        assert_eq!(RefreshToken::new("a"), RefreshToken::new("a"));
        assert_ne!(RefreshToken::new("a"), RefreshToken::new("ab"));
        assert_eq!(serde_json::to_string(&AccessToken::new("t")).unwrap(), "\"t\"");
        assert!(ct_eq("abc", "abc") && !ct_eq("abc", "abd") && !ct_eq("abc", "ab"));
    }

    #[test]
    fn random_values_have_the_requested_entropy() {
        assert_eq!(random_urlsafe(32).len(), 43);
        assert_ne!(random_urlsafe(32), random_urlsafe(32));
    }
}
