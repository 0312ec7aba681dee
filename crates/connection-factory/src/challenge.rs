//! What the resource server said when it refused a request.

use std::fmt;

/// Which kind of request the server refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RequestKind {
    /// A JSON-RPC message POSTed to the MCP endpoint (initialize, tool calls, notifications).
    Post,
    /// The GET that opens (or re-opens, on reconnect) the server-to-client SSE stream.
    GetStream,
    /// The DELETE that ends the MCP session.
    DeleteSession,
}

impl fmt::Display for RequestKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RequestKind::Post => "POST",
            RequestKind::GetStream => "GET (SSE stream)",
            RequestKind::DeleteSession => "DELETE (session)",
        })
    }
}

/// A 401 or 403 from the MCP server: the status, the request it refused and the raw
/// `WWW-Authenticate` header values. (One parsed challenge of that header is
/// [`mcp_oauth::Challenge`].)
///
/// The full challenge grammar is for the OAuth client to parse; [`Refusal::param`] and its
/// shortcuts read the three parameters the transport layer needs (`error`, `scope`,
/// `resource_metadata`).
///
/// ```
/// use connection_factory::{Refusal, RequestKind};
///
/// let c = Refusal::new(
///     403,
///     RequestKind::Post,
///     vec![r#"Bearer error="insufficient_scope", scope="mcp:tools mcp:write""#.into()],
/// );
/// assert!(c.is_insufficient_scope());
/// assert_eq!(c.scope(), Some("mcp:tools mcp:write".to_owned()));
/// assert_eq!(c.resource_metadata(), None);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    status: u16,
    request: RequestKind,
    www_authenticate: Vec<String>,
}

impl Refusal {
    /// A challenge with this HTTP status (401 or 403) and these `WWW-Authenticate` values.
    pub fn new(status: u16, request: RequestKind, www_authenticate: Vec<String>) -> Self {
        Refusal { status, request, www_authenticate }
    }

    /// The HTTP status: 401 or 403.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// The request the server refused.
    pub fn request(&self) -> RequestKind {
        self.request
    }

    /// The raw `WWW-Authenticate` header values, in the order received.
    pub fn www_authenticate(&self) -> &[String] {
        &self.www_authenticate
    }

    /// The first value of the auth-param `name` (case-insensitive) in any challenge of any
    /// header value, unquoted, as mcp-oauth's parser reads them (the workspace's one
    /// `WWW-Authenticate` parser, fuzzed): a malformed challenge yields nothing, the challenges
    /// before it in the same value are kept.
    pub fn param(&self, name: &str) -> Option<String> {
        mcp_oauth::parse_challenges_lenient(self.www_authenticate.iter().map(String::as_str))
            .iter()
            .find_map(|c| c.param(name).map(str::to_owned))
    }

    /// The challenge as mcp-oauth reads it for discovery and scope selection (`None` when no
    /// `Bearer` or `DPoP` challenge parses).
    pub(crate) fn bearer(&self) -> Option<mcp_oauth::BearerChallenge> {
        mcp_oauth::BearerChallenge::from_headers(self.www_authenticate.iter().map(String::as_str))
            .ok()
            .flatten()
    }

    /// The `error` parameter, e.g. `invalid_token` or `insufficient_scope`.
    pub fn error(&self) -> Option<String> {
        self.param("error")
    }

    /// The `scope` parameter: the scopes the server wants.
    pub fn scope(&self) -> Option<String> {
        self.param("scope")
    }

    /// The `resource_metadata` parameter (RFC 9728): where the protected-resource metadata is.
    pub fn resource_metadata(&self) -> Option<String> {
        self.param("resource_metadata")
    }

    /// Whether this is a 403, or names `error="insufficient_scope"`: a refresh cannot help, a
    /// step-up authorization might.
    pub fn is_insufficient_scope(&self) -> bool {
        self.status == 403 || self.error().as_deref() == Some("insufficient_scope")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(h: &str) -> Refusal {
        Refusal::new(401, RequestKind::Post, vec![h.to_owned()])
    }

    #[test]
    fn reads_quoted_and_bare_params() {
        let ch = c(
            r#"Bearer realm="mcp", error=invalid_token, error_description="the \"token\" expired", resource_metadata="http://127.0.0.1:1/.well-known/oauth-protected-resource/mcp""#,
        );
        assert_eq!(ch.error().as_deref(), Some("invalid_token"));
        assert_eq!(ch.param("ERROR_DESCRIPTION").as_deref(), Some("the \"token\" expired"));
        assert_eq!(
            ch.resource_metadata().as_deref(),
            Some("http://127.0.0.1:1/.well-known/oauth-protected-resource/mcp")
        );
        assert_eq!(ch.scope(), None);
        assert!(!ch.is_insufficient_scope());
    }

    /// What mcp-oauth's parser refuses yields no parameter (before it had its own parser,
    /// this crate read `unterminated` and an empty `error` out of these).
    #[test]
    fn scheme_only_and_garbage_have_no_params() {
        assert_eq!(c("Bearer").error(), None);
        assert_eq!(c("").error(), None);
        assert_eq!(c(r#"Bearer error="unterminated"#).error(), None);
        assert_eq!(c("Bearer ,,, =x, error=").error(), None);
        // A good challenge before a broken one in the same value is still read.
        assert_eq!(
            c(r#"Bearer error="invalid_token", Broken "x"#).error().as_deref(),
            Some("invalid_token")
        );
    }

    #[test]
    fn a_parameter_value_is_not_taken_for_a_name() {
        let ch = c(r#"Bearer realm="error=fake", error="insufficient_scope""#);
        assert_eq!(ch.error().as_deref(), Some("insufficient_scope"));
        assert!(ch.is_insufficient_scope());
    }

    #[test]
    fn later_header_values_are_searched() {
        let ch = Refusal::new(
            401,
            RequestKind::GetStream,
            vec!["Basic realm=\"x\"".into(), "Bearer scope=\"a b\"".into()],
        );
        assert_eq!(ch.scope().as_deref(), Some("a b"));
    }
}
