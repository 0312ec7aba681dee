//! Tests of the `WWW-Authenticate` parser.

use super::*;
use proptest::prelude::*;

fn p(s: &str) -> Vec<Challenge> {
    parse_challenge_header(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
}

fn ch(scheme: &str, params: &[(&str, &str)]) -> Challenge {
    Challenge {
        scheme: scheme.into(),
        token68: None,
        params: params.iter().map(|(a, b)| ((*a).into(), (*b).into())).collect(),
    }
}

#[test]
fn mcp_bearer_challenge_with_spaces_in_scope() {
    let c = p(
        r#"Bearer error="invalid_token", error_description="Missing Authorization header", scope="mcp:basic mcp:write", resource_metadata="http://localhost:3000/.well-known/oauth-protected-resource/mcp""#,
    );
    let b = BearerChallenge::from_challenge(&c[0]).unwrap();
    assert_eq!(b.error.as_deref(), Some("invalid_token"));
    assert_eq!(b.error_description.as_deref(), Some("Missing Authorization header"));
    assert_eq!(b.scope.as_deref(), Some("mcp:basic mcp:write"));
    assert_eq!(
        b.resource_metadata.as_deref(),
        Some("http://localhost:3000/.well-known/oauth-protected-resource/mcp")
    );
}

#[test]
fn several_challenges_in_one_header() {
    let c = p(r#"Newauth realm="apps", type=1, title="Login to \"apps\"", Basic realm="simple""#);
    assert_eq!(
        c,
        vec![
            ch("Newauth", &[("realm", "apps"), ("type", "1"), ("title", "Login to \"apps\"")]),
            ch("Basic", &[("realm", "simple")]),
        ]
    );
}

#[test]
fn challenges_across_headers_and_other_schemes_are_recorded() {
    let c = parse_challenges([
        r#"DPoP algs="ES256 PS256", error="use_dpop_nonce""#,
        "bearer scope=read",
    ])
    .unwrap();
    assert_eq!(c.len(), 2);
    assert!(c[0].is_scheme("dpop"));
    assert_eq!(c[0].param("ALGS"), Some("ES256 PS256"));
    let b = BearerChallenge::from_headers([r#"DPoP algs="ES256""#, "bearer scope=read"])
        .unwrap()
        .unwrap();
    assert_eq!(b.scope.as_deref(), Some("read"));
    assert!(!b.dpop, "a Bearer challenge wins over a DPoP one, wherever it stands");
}

#[test]
fn token68_and_bare_schemes() {
    assert_eq!(p("Basic"), vec![ch("Basic", &[])]);
    let c = p("Negotiate abc+/==, Bearer, Basic realm=x");
    assert_eq!(c[0].token68.as_deref(), Some("abc+/=="));
    assert_eq!(c[1], ch("Bearer", &[]));
    assert_eq!(c[2], ch("Basic", &[("realm", "x")]));
    assert_eq!(p("Negotiate abc")[0].token68.as_deref(), Some("abc"));
}

#[test]
fn case_insensitive_names_and_whitespace() {
    let c = p("  BEARER   Error = \"insufficient_scope\" ,  SCOPE=\"a b\" ,, ");
    let b = BearerChallenge::from_challenge(&c[0]).unwrap();
    assert!(b.is_insufficient_scope());
    assert_eq!(b.scope.as_deref(), Some("a b"));
}

#[test]
fn unquoted_url_value_is_accepted() {
    let c = p(
        "Bearer resource_metadata=https://x.example/.well-known/oauth-protected-resource, scope=a",
    );
    assert_eq!(
        c[0].param("resource_metadata"),
        Some("https://x.example/.well-known/oauth-protected-resource")
    );
    assert_eq!(c[0].param("scope"), Some("a"));
}

#[test]
fn malformed_headers_are_typed_errors() {
    for bad in [
        r#"Bearer error="unterminated"#,
        "Bearer error=\"x\", scope=",
        "=foo",
        "Bearer a=\"x\" b=\"y\"",
        "Bearer a=\"\\\u{1}\"",
        "Bearer \"quoted\"",
        "Bearer a=\"x\u{7f}\"",
    ] {
        assert!(
            matches!(parse_challenge_header(bad), Err(Error::InvalidChallenge { .. })),
            "{bad:?}"
        );
    }
}

#[test]
fn non_ascii_in_quoted_values() {
    let c = p("Bearer realm=\"café ☕\"");
    assert_eq!(c[0].param("realm"), Some("café ☕"));
}

fn token() -> impl Strategy<Value = String> {
    "[A-Za-z0-9!#$%&'*+.^_`|~-]{1,12}"
}

fn challenge() -> impl Strategy<Value = Challenge> {
    // A challenge names each auth-param once (RFC 9110 §11.2; the parser refuses a repeat, a
    // case-insensitive match): a generated repeat is dropped.
    let params = proptest::collection::vec((token(), "[ -~\u{a0}-\u{2ff}\t]{0,16}"), 0..5)
        .prop_map(|params| {
            let mut seen = std::collections::HashSet::new();
            params.into_iter().filter(|(name, _)| seen.insert(name.to_ascii_lowercase())).collect()
        });
    let t68 = "[A-Za-z0-9._~+/-]{1,16}=*";
    (token(), prop_oneof![params.prop_map(Ok), t68.prop_map(Err)]).prop_map(|(scheme, rest)| {
        match rest {
            Ok(params) => Challenge { scheme, token68: None, params },
            Err(t) => Challenge { scheme, token68: Some(t), params: Vec::new() },
        }
    })
}

proptest! {
    /// Rendering challenges and parsing them back gives the same challenges.
    #[test]
    fn render_then_parse_round_trips(cs in proptest::collection::vec(challenge(), 1..4)) {
        let header = cs.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
        let parsed = parse_challenge_header(&header).unwrap();
        prop_assert_eq!(parsed, cs);
    }

    /// The parser never panics, whatever the input.
    #[test]
    fn parse_never_panics(s in "\\PC{0,64}") {
        let _ = parse_challenge_header(&s);
    }
}

#[test]
fn a_trailing_equals_is_token68_not_an_empty_param() {
    // RFC 9110: `error=` matches token68, and a parameter value cannot be empty.
    assert_eq!(p("Bearer error=")[0].token68.as_deref(), Some("error="));
}

/// One malformed challenge does not hide a good Bearer challenge: a bad header value next to a
/// good one, or a fault after the Bearer challenge in the same value. Only when no Bearer
/// challenge survives is the parse error returned.
#[test]
fn a_malformed_challenge_does_not_hide_the_bearer_one() {
    let good = r#"Bearer resource_metadata="https://rs/.well-known/x", scope="a b""#;
    let b = BearerChallenge::from_headers([r#"Broken "unterminated"#, good]).unwrap().unwrap();
    assert_eq!(b.scope.as_deref(), Some("a b"));
    let same_value = format!(r#"{good}, DPoP algs="ES256" junk"#);
    let b = BearerChallenge::from_headers([same_value.as_str()]).unwrap().unwrap();
    assert_eq!(b.resource_metadata.as_deref(), Some("https://rs/.well-known/x"));
    assert!(BearerChallenge::from_headers([r#"Broken "unterminated"#]).is_err());
    // A server that takes only DPoP-bound tokens sends a DPoP challenge alone: its parameters
    // are read from it.
    let dpop = BearerChallenge::from_headers([r#"DPoP algs="ES256""#]).unwrap().unwrap();
    assert!(dpop.dpop);
    assert_eq!(dpop.algs.as_deref(), Some("ES256"));
    assert_eq!(BearerChallenge::from_headers([r#"Basic realm="x""#]).unwrap(), None);
    // Empty list elements are allowed (RFC 9110 §5.6.1).
    let c = parse_challenge_header(r#", , Bearer scope="s", , error="invalid_token",,"#).unwrap();
    assert_eq!(c.len(), 1);
    assert_eq!((c[0].param("scope"), c[0].param("error")), (Some("s"), Some("invalid_token")));
}

/// A parameter given twice in one challenge is refused (which one would count?).
#[test]
fn a_duplicate_parameter_is_refused() {
    let err = parse_challenge_header(r#"Bearer scope="a", SCOPE="b""#).unwrap_err();
    assert!(
        matches!(err, Error::InvalidChallenge { reason: "duplicate auth-param", .. }),
        "{err:?}"
    );
    assert!(BearerChallenge::from_headers([r#"Bearer scope="a", scope="b""#]).is_err());
}
