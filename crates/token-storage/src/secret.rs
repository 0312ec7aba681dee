//! Secrets that never print: [`Secret`], the workspace's one secret type (`mcp_secret::Secret`:
//! redacted in `Debug` and `Display`, compared in constant time, wiped when dropped).
//!
//! ```
//! use token_storage::Secret;
//!
//! let token = Secret::new("eyJhbGciOi...");
//! assert_eq!(format!("{token} {token:?}"), "[redacted] Secret([redacted])");
//! assert_eq!(token.expose(), "eyJhbGciOi...");
//! ```

pub use mcp_secret::Secret;
