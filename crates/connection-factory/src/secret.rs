//! Tokens and header values that never print: token storage's [`Secret`], the one secret string
//! type at this crate's boundary (the value crosses from token storage to the wire with no
//! conversion, and prints `[redacted]` everywhere).
//!
//! ```
//! use connection_factory::Secret;
//!
//! let token = Secret::new("eyJhbGciOi.secret-part");
//! assert_eq!(format!("{token:?} {token}"), "Secret([redacted]) [redacted]");
//! assert_eq!(token.expose(), "eyJhbGciOi.secret-part");
//! assert_eq!(token, token_storage::Secret::new("eyJhbGciOi.secret-part"));
//! ```

pub use token_storage::Secret;
