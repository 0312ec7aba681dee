//! Secrets that never print: [`Secret`].

use std::fmt;
use std::sync::Arc;

/// A secret string (an access token, a refresh token, a client secret).
///
/// `Debug` and `Display` print `[redacted]`; the value is reached only through
/// [`Secret::expose`]. Cloning is cheap (the text is shared).
///
/// ```
/// use token_storage::Secret;
///
/// let token = Secret::new("eyJhbGciOi...");
/// assert_eq!(format!("{token} {token:?}"), "[redacted] Secret([redacted])");
/// assert_eq!(token.expose(), "eyJhbGciOi...");
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Secret(Arc<str>);

impl Secret {
    /// Wrap `value`.
    pub fn new(value: impl Into<Arc<str>>) -> Self {
        Secret(value.into())
    }

    /// The secret text. Do not log it.
    pub fn expose(&self) -> &str {
        &self.0
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
