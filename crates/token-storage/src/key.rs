//! The key a token set lives under: [`TokenKey`].

use std::fmt;
use std::sync::Arc;

/// Tenant, user and server: the slot one token set and one client registration live in.
///
/// The parts are kept apart (escaped when they are joined into a store key), so
/// `("a:b", "c")` and `("a", "b:c")` never collide. The empty tenant is the default tenant.
///
/// ```
/// use token_storage::TokenKey;
///
/// let key = TokenKey::new("acme", "alice", "github");
/// assert_eq!((key.tenant(), key.user(), key.server()), ("acme", "alice", "github"));
/// assert_eq!(key.to_string(), "acme/alice/github");
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TokenKey {
    tenant: Arc<str>,
    user: Arc<str>,
    server: Arc<str>,
}

impl TokenKey {
    /// The key of `server`'s tokens for `user` in `tenant`.
    pub fn new(
        tenant: impl Into<Arc<str>>,
        user: impl Into<Arc<str>>,
        server: impl Into<Arc<str>>,
    ) -> Self {
        TokenKey { tenant: tenant.into(), user: user.into(), server: server.into() }
    }

    /// The tenant ("" for the default tenant).
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// The user.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The server.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The store key of one record kind under this key.
    pub(crate) fn record(&self, kind: RecordKind) -> String {
        let mut out = user_prefix(&self.tenant, &self.user);
        escape_into(&mut out, &self.server);
        out.push('/');
        out.push_str(kind.suffix());
        out
    }

    /// Parses a store key written by [`TokenKey::record`].
    pub(crate) fn from_record(record: &str) -> Option<(TokenKey, RecordKind)> {
        let mut parts = record.strip_prefix(PREFIX)?.split('/');
        let tenant = unescape(parts.next()?)?;
        let user = unescape(parts.next()?)?;
        let server = unescape(parts.next()?)?;
        let kind = match parts.next()? {
            "tokens" => RecordKind::Tokens,
            "client" => RecordKind::Client,
            "dpop-key" => RecordKind::DpopKey,
            _ => return None,
        };
        if parts.next().is_some() {
            return None;
        }
        Some((TokenKey::new(tenant, user, server), kind))
    }
}

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenKey({self})")
    }
}

impl fmt::Display for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.tenant, self.user, self.server)
    }
}

/// The records stored under a [`TokenKey`]: the tokens, the client registration, and the DPoP
/// key the tokens are bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RecordKind {
    Tokens,
    Client,
    DpopKey,
}

impl RecordKind {
    fn suffix(self) -> &'static str {
        match self {
            RecordKind::Tokens => "tokens",
            RecordKind::Client => "client",
            RecordKind::DpopKey => "dpop-key",
        }
    }
}

const PREFIX: &str = "mcp-tokens/v1/";

/// The store-key prefix of every record of `user` in `tenant`.
pub(crate) fn user_prefix(tenant: &str, user: &str) -> String {
    let mut out = String::from(PREFIX);
    escape_into(&mut out, tenant);
    out.push('/');
    escape_into(&mut out, user);
    out.push('/');
    out
}

fn escape_into(out: &mut String, part: &str) {
    for c in part.chars() {
        match c {
            '%' => out.push_str("%25"),
            '/' => out.push_str("%2F"),
            c => out.push(c),
        }
    }
}

fn unescape(part: &str) -> Option<String> {
    let mut out = String::with_capacity(part.len());
    let mut rest = part;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        match rest.get(i..i + 3)? {
            "%25" => out.push('%'),
            "%2F" => out.push('/'),
            _ => return None,
        }
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_never_collide_and_round_trip() {
        let a = TokenKey::new("a/b", "c", "d");
        let b = TokenKey::new("a", "b/c", "d");
        let c = TokenKey::new("a%2Fb", "c", "d");
        let records = [
            a.record(RecordKind::Tokens),
            b.record(RecordKind::Tokens),
            c.record(RecordKind::Tokens),
        ];
        assert_ne!(records[0], records[1]);
        assert_ne!(records[0], records[2]);
        for (key, record) in [a, b, c].into_iter().zip(records) {
            assert_eq!(TokenKey::from_record(&record), Some((key, RecordKind::Tokens)));
        }
    }

    #[test]
    fn a_user_prefix_does_not_match_a_longer_user() {
        let key = TokenKey::new("t", "alice2", "s");
        assert!(!key.record(RecordKind::Client).starts_with(&user_prefix("t", "alice")));
        assert!(key.record(RecordKind::Client).starts_with(&user_prefix("t", "alice2")));
    }

    #[test]
    fn foreign_store_keys_are_not_parsed() {
        assert_eq!(TokenKey::from_record("other/t/u/s/tokens"), None);
        assert_eq!(TokenKey::from_record("mcp-tokens/v1/t/u/s/other"), None);
        assert_eq!(TokenKey::from_record("mcp-tokens/v1/t/u/s/tokens/x"), None);
        assert_eq!(TokenKey::from_record("mcp-tokens/v1/t%zz/u/s/tokens"), None);
    }
}
