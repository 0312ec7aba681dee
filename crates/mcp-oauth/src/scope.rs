//! Scope selection and step-up authorization.
//!
//! Selection (MCP 2025-11-25 and SEP-835): the challenge's `scope`, else every scope in the
//! protected resource's `scopes_supported`, else no `scope` parameter at all. `offline_access`
//! is added only when a scope is being requested, the authorization server lists it in
//! `scopes_supported`, and it offers the refresh_token grant (or does not say).

use crate::challenge::BearerChallenge;
use crate::discovery::Discovery;
use crate::error::{Error, Result};

/// The scope to request, or `None` to leave the parameter out.
///
/// ```
/// use mcp_oauth::{select_scope, BearerChallenge};
/// # fn discovery() -> mcp_oauth::Discovery {
/// #     serde_json::from_value(serde_json::json!({
/// #         "server": "https://mcp.example.com/mcp", "resource": "https://mcp.example.com/mcp",
/// #         "protected_resource": null, "source": "OAuth",
/// #         "authorization_server": {"issuer": "https://as.example.com", "scopes_supported": ["offline_access"]}
/// #     })).unwrap()
/// # }
/// let challenge = BearerChallenge { scope: Some("files:read".into()), ..Default::default() };
/// assert_eq!(select_scope(Some(&challenge), &discovery()).as_deref(), Some("files:read offline_access"));
/// assert_eq!(select_scope(None, &discovery()), None);
/// ```
pub fn select_scope(challenge: Option<&BearerChallenge>, discovery: &Discovery) -> Option<String> {
    let base =
        challenge.and_then(|c| c.scope.clone()).filter(|s| !s.trim().is_empty()).or_else(|| {
            discovery
                .protected_resource
                .as_ref()
                .and_then(|p| p.scopes_supported.as_ref())
                .filter(|s| !s.is_empty())
                .map(|s| s.join(" "))
        })?;
    let asm = &discovery.authorization_server;
    let refresh_offered =
        asm.grant_types_supported.as_ref().is_none_or(|g| g.iter().any(|x| x == "refresh_token"));
    if asm.lists_scope("offline_access") && refresh_offered {
        return Some(union_scopes(&base, "offline_access"));
    }
    Some(base)
}

/// The union of two space-separated scope lists, in first-seen order.
///
/// ```
/// assert_eq!(mcp_oauth::union_scopes("a b", "b c"), "a b c");
/// ```
pub fn union_scopes(a: &str, b: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for s in a.split_ascii_whitespace().chain(b.split_ascii_whitespace()) {
        if !out.contains(&s) {
            out.push(s);
        }
    }
    out.join(" ")
}

/// Counts authorization attempts for one request and computes step-up scopes.
///
/// Every authorization for the same request (the first, and each after a 401 or a 403
/// `insufficient_scope`) goes through [`AuthAttempts::begin`], which fails once `max` attempts
/// have been made.
///
/// ```
/// use mcp_oauth::{AuthAttempts, BearerChallenge};
/// let mut attempts = AuthAttempts::new(3);
/// attempts.begin().unwrap();
/// let challenge = BearerChallenge {
///     error: Some("insufficient_scope".into()),
///     scope: Some("write".into()),
///     ..Default::default()
/// };
/// assert_eq!(attempts.step_up(Some("read"), &challenge).unwrap(), "read write");
/// attempts.begin().unwrap();
/// attempts.begin().unwrap();
/// assert!(attempts.begin().is_err());
/// ```
#[derive(Debug, Clone)]
pub struct AuthAttempts {
    max: u32,
    made: u32,
}

impl AuthAttempts {
    /// Allow at most `max` attempts (at least one).
    pub fn new(max: u32) -> Self {
        AuthAttempts { max: max.max(1), made: 0 }
    }

    /// Start another attempt, or fail with [`Error::StepUpLimit`].
    pub fn begin(&mut self) -> Result<u32> {
        if self.made >= self.max {
            return Err(Error::StepUpLimit { attempts: self.made });
        }
        self.made += 1;
        Ok(self.made)
    }

    /// Attempts made so far.
    pub fn made(&self) -> u32 {
        self.made
    }

    /// The scope to request after a 403 `insufficient_scope`: the union of what was granted or
    /// requested and what the challenge asks for. The attempt count ([`AuthAttempts::begin`])
    /// bounds how often this can go round.
    pub fn step_up(&self, current: Option<&str>, challenge: &BearerChallenge) -> Result<String> {
        let union = union_scopes(
            current.unwrap_or_default(),
            challenge.scope.as_deref().unwrap_or_default(),
        );
        if self.made >= self.max {
            return Err(Error::StepUpLimit { attempts: self.made });
        }
        Ok(union)
    }
}

#[cfg(test)]
mod tests;
