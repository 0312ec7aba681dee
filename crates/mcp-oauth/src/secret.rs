//! Secret newtypes: tokens, client secrets, PKCE verifiers, private keys.
//!
//! Their `Debug` and `Display` print `[redacted]`; the value is reached only through
//! `secret()`, equality is constant-time, and the value is zeroized on drop.

use serde::{Deserialize, Serialize};
use std::fmt;
use subtle::ConstantTimeEq;

macro_rules! secret_type {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        ///
        /// `Debug` and `Display` print `[redacted]`; [`Self::secret`] returns the value.
        #[derive(Clone, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Wrap a secret value.
            pub fn new(value: impl Into<String>) -> Self {
                $name(value.into())
            }

            /// The secret value.
            ///
            /// # Security Warning
            /// Never log or display what this returns.
            pub fn secret(&self) -> &str {
                &self.0
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

        impl PartialEq for $name {
            fn eq(&self, other: &Self) -> bool {
                self.0.as_bytes().ct_eq(other.0.as_bytes()).into()
            }
        }

        impl Eq for $name {}

        impl Drop for $name {
            /// The value is wiped from memory (not only freed).
            fn drop(&mut self) {
                zeroize::Zeroize::zeroize(&mut self.0);
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
pub(crate) fn ct_eq(a: &str, b: &str) -> bool {
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

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
