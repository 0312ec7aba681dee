//! The one secret string type of this workspace: [`Secret`].
//!
//! Tokens, refresh tokens, client secrets, PKCE verifiers, codes and keys cross every crate as
//! a `Secret` (mcp-oauth's typed secrets, such as `AccessToken`, wrap one), so a value moves
//! from the token endpoint to storage to the wire without a copy into a type that prints, and
//! the rules live in one place:
//!
//! - `Debug` prints `Secret([redacted])` and `Display` prints `[redacted]`; the value is reached
//!   only through [`Secret::expose`];
//! - equality is constant-time (no timing oracle on a compared token);
//! - the text is wiped from memory when the last clone is dropped (clones share it);
//! - serde sees the plain string (a secret is sealed at rest by its store, not here).
//!
//! ```
//! use mcp_secret::Secret;
//!
//! let token = Secret::new("eyJhbGciOi.secret-part");
//! assert_eq!(format!("{token:?} {token}"), "Secret([redacted]) [redacted]");
//! assert_eq!(token.expose(), "eyJhbGciOi.secret-part");
//! assert_eq!(token, Secret::from("eyJhbGciOi.secret-part"));
//! ```

use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use subtle::ConstantTimeEq;
use zeroize::Zeroize;

/// A secret string. See the [crate] documentation.
#[derive(Clone)]
pub struct Secret(Arc<Wiped>);

/// The text, wiped when dropped.
struct Wiped(String);

impl Drop for Wiped {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl Secret {
    /// Wrap `value`.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(Arc::new(Wiped(value.into())))
    }

    /// The secret text. Never log or display it.
    pub fn expose(&self) -> &str {
        &self.0.0
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret::new(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Secret::new(value)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl PartialEq for Secret {
    /// Constant-time in the length of the shorter value.
    fn eq(&self, other: &Self) -> bool {
        self.expose().as_bytes().ct_eq(other.expose().as_bytes()).into()
    }
}

impl Eq for Secret {}

impl Hash for Secret {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.expose().hash(state);
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.expose())
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Secret::new)
    }
}

/// Constant-time comparison of two strings (for values that are not yet a [`Secret`], such as
/// a `state` read from a callback).
///
/// ```
/// assert!(mcp_secret::ct_eq("abc", "abc"));
/// assert!(!mcp_secret::ct_eq("abc", "abd"));
/// ```
pub fn ct_eq(a: &str, b: &str) -> bool {
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_never_prints_and_serializes_as_its_string() {
        let s = Secret::new("v-secret-value");
        let printed = format!("{s:?} {s} {s:#?}");
        assert!(!printed.contains("v-secret"), "{printed}");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"v-secret-value\"");
        let back: Secret = serde_json::from_str("\"v-secret-value\"").unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn equality_is_by_value() {
        assert_eq!(Secret::new("a"), Secret::new("a"));
        assert_ne!(Secret::new("a"), Secret::new("ab"));
        assert_ne!(Secret::new("ab"), Secret::new("a"));
        let mut set = std::collections::HashSet::new();
        set.insert(Secret::new("a"));
        assert!(set.contains(&Secret::new("a")));
    }
}
