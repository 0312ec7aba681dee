//! Flow keys: tenant, flow type and id as separate typed parts.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use crate::Error;

/// The identity of a flow: an optional tenant, a flow type and an id.
///
/// The three parts are kept apart, and the encoded form ([`FlowKey::as_str`], also its
/// `Display`) escapes them, so a key with no tenant and a key of any tenant can never collide,
/// whatever the strings contain. `Display` and [`FromStr`] round-trip.
///
/// ```
/// use flow_state::FlowKey;
///
/// let global = FlowKey::new("mcp_oauth", "tenant:acme:alice:github")?;
/// let scoped = FlowKey::new("mcp_oauth", "alice:github")?.with_tenant("acme")?;
/// assert_ne!(global, scoped);
/// assert_ne!(global.as_str(), scoped.as_str());
/// assert_eq!(scoped.to_string().parse::<FlowKey>()?, scoped);
/// assert_eq!(scoped.tenant(), Some("acme"));
/// # Ok::<(), flow_state::Error>(())
/// ```
#[derive(Clone)]
pub struct FlowKey(Arc<Parts>);

struct Parts {
    // The encoded form, computed once: stores and maps key on it.
    encoded: Arc<str>,
    tenant: Option<Box<str>>,
    flow_type: Box<str>,
    id: Box<str>,
}

// Identity is the encoded form, which is injective in the three parts.
impl PartialEq for FlowKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.encoded == other.0.encoded
    }
}
impl Eq for FlowKey {}
impl std::hash::Hash for FlowKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.encoded.hash(state);
    }
}
impl PartialOrd for FlowKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for FlowKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.encoded.cmp(&other.0.encoded)
    }
}

const NO_TENANT: &str = "~";
const TENANT_MARK: char = '@';

impl FlowKey {
    /// A key with no tenant. `flow_type` and `id` must not be empty.
    pub fn new(flow_type: impl AsRef<str>, id: impl AsRef<str>) -> Result<Self, Error> {
        Self::build(None, flow_type.as_ref(), id.as_ref())
    }

    /// The same flow type and id under `tenant` (which must not be empty).
    pub fn with_tenant(self, tenant: impl AsRef<str>) -> Result<Self, Error> {
        Self::build(Some(tenant.as_ref()), &self.0.flow_type, &self.0.id)
    }

    /// A key with an optional tenant.
    pub fn scoped(tenant: Option<&str>, flow_type: &str, id: &str) -> Result<Self, Error> {
        Self::build(tenant, flow_type, id)
    }

    fn build(tenant: Option<&str>, flow_type: &str, id: &str) -> Result<Self, Error> {
        if flow_type.is_empty() {
            return Err(Error::InvalidKey("the flow type is empty".into()));
        }
        if id.is_empty() {
            return Err(Error::InvalidKey("the flow id is empty".into()));
        }
        if tenant.is_some_and(str::is_empty) {
            return Err(Error::InvalidKey("the tenant is empty (use no tenant instead)".into()));
        }
        let mut encoded = String::with_capacity(
            flow_type.len() + id.len() + tenant.map_or(1, |t| t.len() + 1) + 2,
        );
        match tenant {
            None => encoded.push_str(NO_TENANT),
            Some(t) => {
                encoded.push(TENANT_MARK);
                escape_into(t, &mut encoded);
            }
        }
        encoded.push(':');
        escape_into(flow_type, &mut encoded);
        encoded.push(':');
        escape_into(id, &mut encoded);
        Ok(FlowKey(Arc::new(Parts {
            encoded: encoded.into(),
            tenant: tenant.map(Box::from),
            flow_type: flow_type.into(),
            id: id.into(),
        })))
    }

    /// The tenant, if any.
    pub fn tenant(&self) -> Option<&str> {
        self.0.tenant.as_deref()
    }

    /// The flow type.
    pub fn flow_type(&self) -> &str {
        &self.0.flow_type
    }

    /// The flow id.
    pub fn id(&self) -> &str {
        &self.0.id
    }

    pub(crate) fn encoded_arc(&self) -> Arc<str> {
        self.0.encoded.clone()
    }

    /// The encoded, collision-free form used as the store key.
    pub fn as_str(&self) -> &str {
        &self.0.encoded
    }
}

/// Escapes `%` and `:` so that `:` can separate the parts.
fn escape_into(part: &str, out: &mut String) {
    for c in part.chars() {
        match c {
            '%' => out.push_str("%25"),
            ':' => out.push_str("%3A"),
            c => out.push(c),
        }
    }
}

fn unescape(part: &str) -> Result<String, Error> {
    let mut out = String::with_capacity(part.len());
    let mut rest = part;
    while let Some(pos) = rest.find('%') {
        out.push_str(&rest[..pos]);
        let code = rest.get(pos + 1..pos + 3);
        match code {
            Some("25") => out.push('%'),
            Some("3A") => out.push(':'),
            _ => return Err(Error::InvalidKey(format!("bad escape in key part {part:?}"))),
        }
        rest = &rest[pos + 3..];
    }
    out.push_str(rest);
    Ok(out)
}

impl FromStr for FlowKey {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let mut parts = s.split(':');
        let (Some(tenant), Some(flow_type), Some(id), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Error::InvalidKey(format!("{s:?} does not have three parts")));
        };
        let tenant = if tenant == NO_TENANT {
            None
        } else if let Some(t) = tenant.strip_prefix(TENANT_MARK) {
            Some(unescape(t)?)
        } else {
            return Err(Error::InvalidKey(format!("{s:?} has no tenant marker")));
        };
        let key = Self::build(tenant.as_deref(), &unescape(flow_type)?, &unescape(id)?)?;
        // Reject non-canonical spellings (for example an escaped character that needs none), so
        // that parse-then-display is the identity.
        if key.as_str() != s {
            return Err(Error::InvalidKey(format!("{s:?} is not in canonical form")));
        }
        Ok(key)
    }
}

impl fmt::Display for FlowKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for FlowKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FlowKey({})", self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn part() -> impl Strategy<Value = String> {
        // Weighted towards the separator and escape characters.
        proptest::string::string_regex("[a-z:%@~3A25]{1,8}").unwrap()
    }

    proptest! {
        #[test]
        fn display_then_parse_round_trips(t in proptest::option::of(part()), ty in part(), id in part()) {
            let key = FlowKey::scoped(t.as_deref(), &ty, &id).unwrap();
            let parsed: FlowKey = key.to_string().parse().unwrap();
            prop_assert_eq!(parsed.tenant(), t.as_deref());
            prop_assert_eq!(parsed.flow_type(), ty.as_str());
            prop_assert_eq!(parsed.id(), id.as_str());
            prop_assert_eq!(parsed, key);
        }

        #[test]
        fn distinct_parts_never_collide(
            a in (proptest::option::of(part()), part(), part()),
            b in (proptest::option::of(part()), part(), part()),
        ) {
            let ka = FlowKey::scoped(a.0.as_deref(), &a.1, &a.2).unwrap();
            let kb = FlowKey::scoped(b.0.as_deref(), &b.1, &b.2).unwrap();
            prop_assert_eq!(a == b, ka.as_str() == kb.as_str());
        }
    }

    #[test]
    fn tenant_prefix_in_the_id_does_not_impersonate_a_tenant() {
        // LibreChat encoded tenants as an id prefix `tenant:<t>:`; here that string is just an id.
        let forged = FlowKey::new("mcp_oauth", "tenant:acme:alice:srv").unwrap();
        let real = FlowKey::new("mcp_oauth", "alice:srv").unwrap().with_tenant("acme").unwrap();
        assert_ne!(forged.as_str(), real.as_str());
        assert_eq!(forged.tenant(), None);
    }

    #[test]
    fn malformed_keys_are_refused_with_a_typed_error() {
        for bad in [
            "", "a:b", "~:a:b:c", "x:a:b", "~::b", "~:a:", "@:a:b", "~:a%2:b", "~:a%3a:b",
            "~:%41:b",
        ] {
            assert!(matches!(bad.parse::<FlowKey>(), Err(Error::InvalidKey(_))), "{bad:?}");
        }
        assert!(FlowKey::new("", "x").is_err());
        assert!(FlowKey::new("t", "").is_err());
        assert!(FlowKey::new("t", "x").unwrap().with_tenant("").is_err());
    }
}
