//! Scope selection and step-up tests (the conformance suite's scope scenarios).

use super::*;
use crate::testutil::discovery;

fn challenge(scope: Option<&str>) -> BearerChallenge {
    BearerChallenge { scope: scope.map(str::to_owned), ..Default::default() }
}

#[test]
fn the_challenge_scope_comes_first() {
    let d = discovery(serde_json::json!({}));
    assert_eq!(select_scope(Some(&challenge(Some("mcp:basic"))), &d).as_deref(), Some("mcp:basic"));
}

#[test]
fn else_every_scope_the_resource_supports() {
    let d = discovery(serde_json::json!({}));
    assert_eq!(select_scope(Some(&challenge(None)), &d).as_deref(), Some("mcp:basic mcp:read"));
    assert_eq!(
        select_scope(Some(&challenge(Some("  "))), &d).as_deref(),
        Some("mcp:basic mcp:read")
    );
    assert_eq!(select_scope(None, &d).as_deref(), Some("mcp:basic mcp:read"));
}

#[test]
fn else_the_scope_is_omitted() {
    let mut d = discovery(serde_json::json!({"scopes_supported": ["offline_access"]}));
    d.protected_resource.as_mut().unwrap().scopes_supported = None;
    assert_eq!(select_scope(None, &d), None);
    d.protected_resource = None;
    assert_eq!(select_scope(Some(&challenge(None)), &d), None);
}

#[test]
fn offline_access_only_when_the_server_lists_it() {
    let d = discovery(serde_json::json!({"scopes_supported": ["mcp:basic", "offline_access"]}));
    assert_eq!(
        select_scope(Some(&challenge(Some("mcp:basic"))), &d).as_deref(),
        Some("mcp:basic offline_access")
    );
    let d = discovery(serde_json::json!({"scopes_supported": ["mcp:basic"]}));
    assert_eq!(select_scope(Some(&challenge(Some("mcp:basic"))), &d).as_deref(), Some("mcp:basic"));
    let d = discovery(serde_json::json!({
        "scopes_supported": ["offline_access"],
        "grant_types_supported": ["authorization_code"]
    }));
    assert_eq!(
        select_scope(Some(&challenge(Some("a"))), &d).as_deref(),
        Some("a"),
        "no refresh grant offered"
    );
    let d = discovery(serde_json::json!({"scopes_supported": ["offline_access"]}));
    assert_eq!(
        select_scope(Some(&challenge(Some("offline_access a"))), &d).as_deref(),
        Some("offline_access a"),
        "not added twice"
    );
}

#[test]
fn step_up_takes_the_union_and_is_bounded() {
    let mut attempts = AuthAttempts::new(3);
    assert_eq!(attempts.begin().unwrap(), 1);
    let c = BearerChallenge {
        error: Some("insufficient_scope".into()),
        scope: Some("mcp:write mcp:basic".into()),
        ..Default::default()
    };
    assert_eq!(attempts.step_up(Some("mcp:basic"), &c).unwrap(), "mcp:basic mcp:write");
    assert_eq!(attempts.step_up(None, &c).unwrap(), "mcp:write mcp:basic");
    assert_eq!(attempts.begin().unwrap(), 2);
    assert_eq!(attempts.begin().unwrap(), 3);
    assert!(matches!(
        attempts.step_up(Some("mcp:basic"), &c),
        Err(Error::StepUpLimit { attempts: 3 })
    ));
    assert!(matches!(attempts.begin(), Err(Error::StepUpLimit { attempts: 3 })));
    assert_eq!(attempts.made(), 3);
}

#[test]
fn union_keeps_order_and_drops_duplicates() {
    assert_eq!(union_scopes("", ""), "");
    assert_eq!(union_scopes("a  b", " b a c "), "a b c");
}

proptest::proptest! {
    /// The union holds every scope of both sides once, and adding the same scopes again
    /// changes nothing (so repeated step-ups converge).
    #[test]
    fn union_is_complete_and_idempotent(a in "[a-c: ]{0,12}", b in "[a-c: ]{0,12}") {
        let u = union_scopes(&a, &b);
        let parts: Vec<&str> = u.split(' ').filter(|s| !s.is_empty()).collect();
        for s in a.split_ascii_whitespace().chain(b.split_ascii_whitespace()) {
            proptest::prop_assert!(parts.contains(&s));
        }
        let mut dedup = parts.clone();
        dedup.sort_unstable();
        dedup.dedup();
        proptest::prop_assert_eq!(dedup.len(), parts.len());
        proptest::prop_assert_eq!(union_scopes(&u, &b), u.clone());
    }
}
