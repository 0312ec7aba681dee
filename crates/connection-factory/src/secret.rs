//! Bearer tokens that never print.

use std::fmt;
use std::sync::Arc;

/// A bearer token (or a refresh token). `Debug` and `Display` print `<redacted>`; read the value
/// with [`Secret::expose`] only where it goes on the wire.
///
/// Cloning is cheap (the value is shared).
///
/// ```
/// use connection_factory::Secret;
///
/// let token = Secret::new("eyJhbGciOi.secret-part");
/// assert_eq!(format!("{token:?} {token}"), "Secret(<redacted>) <redacted>");
/// assert_eq!(token.expose(), "eyJhbGciOi.secret-part");
/// assert_eq!(token, Secret::new("eyJhbGciOi.secret-part"));
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Secret(Arc<str>);

impl Secret {
    /// Wrap a secret value.
    pub fn new(value: impl Into<Arc<str>>) -> Self {
        Secret(value.into())
    }

    /// The secret value itself. Do not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
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
