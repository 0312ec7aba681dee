//! Authorization request and callback tests.

use std::time::Duration;

use super::*;
use crate::testutil::{discovery, mock, registration, token_body};
use crate::{HttpResponse, TokenEndpointAuthMethod as M};

fn query(url: &Url, name: &str) -> Option<String> {
    url.query_pairs().find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
}

#[test]
fn authorization_url_carries_pkce_state_and_resource() {
    let m = mock(|_| HttpResponse::new(500));
    let d = discovery(serde_json::json!({}));
    let (url, pending) = m
        .client
        .authorization_url(&d, &registration(M::None), "http://127.0.0.1:1/cb", Some("mcp:basic"))
        .unwrap();
    assert_eq!(url.path(), "/authorize");
    assert_eq!(query(&url, "response_type").as_deref(), Some("code"));
    assert_eq!(query(&url, "client_id").as_deref(), Some("client-1"));
    assert_eq!(query(&url, "code_challenge_method").as_deref(), Some("S256"));
    assert_eq!(query(&url, "code_challenge").unwrap(), pkce_challenge(&pending.verifier));
    assert_eq!(query(&url, "resource").as_deref(), Some("https://mcp.example.com/mcp"));
    assert_eq!(query(&url, "scope").as_deref(), Some("mcp:basic"));
    let state = query(&url, "state").unwrap();
    assert_eq!(state, pending.state.secret());
    // 32 random bytes, base64url: 256 bits of entropy.
    assert_eq!(state.len(), 43);
    assert!(pending.verifier.secret().len() >= 43 && pending.verifier.secret().len() <= 128);

    let (url, _) = m
        .client
        .authorization_url(&d, &registration(M::None), "http://127.0.0.1:1/cb", None)
        .unwrap();
    assert_eq!(query(&url, "scope"), None, "no scope parameter when none is selected");
}

/// `extra_authorization_params` (mcp-connect's `--authorize-param`) are appended, but never
/// replace or repeat a parameter the protocol sets itself.
#[test]
fn extra_authorization_params_are_appended_but_never_replace_the_protocols() {
    let m = mock(|_| HttpResponse::new(500));
    let client = m.client.clone().with_config(crate::OAuthConfig {
        extra_authorization_params: vec![
            ("prompt".into(), "consent".into()),
            ("state".into(), "attacker".into()),
            ("redirect_uri".into(), "https://evil.example/cb".into()),
        ],
        ..crate::OAuthConfig::default()
    });
    let d = discovery(serde_json::json!({}));
    let (url, pending) = client
        .authorization_url(&d, &registration(M::None), "http://127.0.0.1:1/cb", None)
        .unwrap();
    assert_eq!(query(&url, "prompt").as_deref(), Some("consent"));
    let states: Vec<_> = url.query_pairs().filter(|(k, _)| k == "state").collect();
    assert_eq!(states.len(), 1, "{url}");
    assert_eq!(states[0].1, pending.state.secret());
    let redirects: Vec<_> = url.query_pairs().filter(|(k, _)| k == "redirect_uri").collect();
    assert_eq!(redirects.len(), 1, "{url}");
    assert_eq!(redirects[0].1, "http://127.0.0.1:1/cb");
}

#[test]
fn states_and_verifiers_are_unique() {
    let m = mock(|_| HttpResponse::new(500));
    let d = discovery(serde_json::json!({}));
    let mut seen = std::collections::HashSet::new();
    for _ in 0..200 {
        let (_, p) = m
            .client
            .authorization_url(&d, &registration(M::None), "http://127.0.0.1:1/cb", None)
            .unwrap();
        assert!(seen.insert(p.state.secret().to_owned()));
        assert!(seen.insert(p.verifier.secret().to_owned()));
    }
}

#[test]
fn pkce_without_s256_is_refused() {
    let m = mock(|_| HttpResponse::new(500));
    let d = discovery(serde_json::json!({"code_challenge_methods_supported": ["plain"]}));
    let err = m
        .client
        .authorization_url(&d, &registration(M::None), "http://127.0.0.1:1/cb", None)
        .unwrap_err();
    assert!(matches!(err, Error::PkceUnsupported { ref methods } if methods == &["plain"]));
    // An empty list refuses.
    let d = discovery(serde_json::json!({"code_challenge_methods_supported": []}));
    let err = m.client.authorization_url(&d, &registration(M::None), "http://127.0.0.1:1/cb", None);
    assert!(matches!(err, Err(Error::PkceUnsupported { .. })));
    // An absent list refuses too (MCP 2025-11-25 and later), with a clear error...
    let mut d = discovery(serde_json::json!({}));
    d.authorization_server.code_challenge_methods_supported = None;
    let err = m
        .client
        .authorization_url(&d, &registration(M::None), "http://127.0.0.1:1/cb", None)
        .unwrap_err();
    assert!(matches!(err, Error::PkceUnsupported { ref methods } if methods.is_empty()));
    assert!(err.to_string().contains("code_challenge_methods_supported"), "{err}");
    // ...except on the 2025-03-26 default endpoints, where there is no metadata to read.
    d.source = crate::MetadataSource::LegacyDefaultEndpoints;
    assert!(
        m.client
            .authorization_url(&d, &registration(M::None), "http://127.0.0.1:1/cb", None)
            .is_ok()
    );
}

fn callback(pending: &PendingAuthorization, iss: Option<&str>) -> CallbackParams {
    CallbackParams {
        code: Some(AuthorizationCode::new("test-auth-code")),
        state: Some(pending.state.clone()),
        iss: iss.map(str::to_owned),
        ..Default::default()
    }
}

#[tokio::test]
async fn code_exchange_sends_verifier_redirect_uri_and_the_same_resource() {
    let m = mock(|_| token_body());
    let d = discovery(serde_json::json!({}));
    let reg = registration(M::None);
    let (_, pending) = m.client.authorization_url(&d, &reg, "http://127.0.0.1:1/cb", None).unwrap();
    let tokens =
        m.client.exchange_code(&d, &reg, &pending, &callback(&pending, None)).await.unwrap();
    assert_eq!(tokens.access_token.secret(), "at-123");
    let req = m.log.last();
    assert_eq!(req.url.as_str(), "https://as.example.com/token");
    assert_eq!(req.form_value("grant_type").as_deref(), Some("authorization_code"));
    assert_eq!(req.form_value("code").as_deref(), Some("test-auth-code"));
    assert_eq!(req.form_value("code_verifier").as_deref(), Some(pending.verifier.secret()));
    assert_eq!(req.form_value("redirect_uri").as_deref(), Some("http://127.0.0.1:1/cb"));
    assert_eq!(req.form_value("resource").as_deref(), Some("https://mcp.example.com/mcp"));
    assert_eq!(req.form_value("client_id").as_deref(), Some("client-1"));
}

#[tokio::test]
async fn callback_checks_state_error_ttl_and_iss() {
    let m = mock(|_| token_body());
    let d = discovery(serde_json::json!({"authorization_response_iss_parameter_supported": true}));
    let reg = registration(M::None);
    let (_, pending) = m.client.authorization_url(&d, &reg, "http://127.0.0.1:1/cb", None).unwrap();

    let mut wrong = callback(&pending, Some("https://as.example.com"));
    wrong.state = Some(CsrfState::new("forged"));
    assert!(matches!(
        m.client.exchange_code(&d, &reg, &pending, &wrong).await,
        Err(Error::UnknownState)
    ));

    let mut denied = callback(&pending, Some("https://as.example.com"));
    denied.error = Some("access_denied".into());
    assert!(matches!(
        m.client.exchange_code(&d, &reg, &pending, &denied).await,
        Err(Error::AuthorizationDenied { ref error, .. }) if error == "access_denied"
    ));

    // The server advertises RFC 9207: iss is required and must match.
    assert!(matches!(
        m.client.exchange_code(&d, &reg, &pending, &callback(&pending, None)).await,
        Err(Error::IssuerMismatch { .. })
    ));
    assert!(matches!(
        m.client
            .exchange_code(
                &d,
                &reg,
                &pending,
                &callback(&pending, Some("https://evil.example.com"))
            )
            .await,
        Err(Error::IssuerMismatch { .. })
    ));
    assert!(m.log.all().is_empty(), "no code was sent to the token endpoint");
    m.client
        .exchange_code(&d, &reg, &pending, &callback(&pending, Some("https://as.example.com")))
        .await
        .unwrap();

    m.clock.advance(Duration::from_secs(601));
    assert!(matches!(
        m.client
            .exchange_code(&d, &reg, &pending, &callback(&pending, Some("https://as.example.com")))
            .await,
        Err(Error::StateExpired)
    ));
}

/// MCP 2026-07-28: the callback is checked in the order state, its expiry, `iss`, and only
/// then `error`; an `error` (and its description) from a callback that fails the state or the
/// `iss` checks is not acted on or shown. `iss` is compared exactly (no trailing-slash
/// normalisation).
#[tokio::test]
async fn an_error_is_acted_on_only_after_state_and_iss_pass() {
    let m = mock(|_| token_body());
    let d = discovery(serde_json::json!({"authorization_response_iss_parameter_supported": true}));
    let reg = registration(M::None);
    let (_, pending) = m.client.authorization_url(&d, &reg, "http://127.0.0.1:1/cb", None).unwrap();
    let with_error = |state: Option<CsrfState>, iss: Option<&str>| CallbackParams {
        code: None,
        state,
        iss: iss.map(str::to_owned),
        error: Some("access_denied".into()),
        error_description: Some("ATTACKER TEXT".into()),
    };
    let good = Some(pending.state.clone());
    let cases = [
        (with_error(Some(CsrfState::new("forged")), Some("https://as.example.com")), "state"),
        (with_error(None, Some("https://as.example.com")), "state"),
        (with_error(good.clone(), Some("https://evil.example.com")), "iss"),
        (with_error(good.clone(), Some("https://as.example.com/")), "iss"),
        (with_error(good.clone(), None), "iss"),
    ];
    for (cb, what) in cases {
        let err = m.client.exchange_code(&d, &reg, &pending, &cb).await.unwrap_err();
        match what {
            "state" => assert!(matches!(err, Error::UnknownState), "{err:?}"),
            _ => assert!(matches!(err, Error::IssuerMismatch { .. }), "{err:?}"),
        }
        assert!(!format!("{err} {err:?}").contains("ATTACKER"), "{err:?}");
    }
    // Only a callback that passes both carries its error to the caller.
    let err = m
        .client
        .exchange_code(
            &d,
            &reg,
            &pending,
            &with_error(good.clone(), Some("https://as.example.com")),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::AuthorizationDenied { ref error, .. } if error == "access_denied")
    );
    // An expired state is reported as expired, whatever error the callback carries.
    m.clock.advance(Duration::from_secs(601));
    let err = m
        .client
        .exchange_code(&d, &reg, &pending, &with_error(good, Some("https://as.example.com")))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::StateExpired), "{err:?}");
    assert!(m.log.all().is_empty(), "no code was sent to the token endpoint");
}

#[tokio::test]
async fn a_mismatched_iss_is_refused_even_when_not_advertised() {
    let m = mock(|_| token_body());
    let d = discovery(serde_json::json!({}));
    let reg = registration(M::None);
    let (_, pending) = m.client.authorization_url(&d, &reg, "http://127.0.0.1:1/cb", None).unwrap();
    let err = m
        .client
        .exchange_code(&d, &reg, &pending, &callback(&pending, Some("https://x.example")))
        .await;
    assert!(matches!(err, Err(Error::IssuerMismatch { .. })));
}

#[test]
fn pending_states_are_single_use_and_expire() {
    let m = mock(|_| HttpResponse::new(500));
    let d = discovery(serde_json::json!({}));
    let store = PendingAuthorizations::new(m.clock.shared());
    let (_, a) = m
        .client
        .authorization_url(&d, &registration(M::None), "http://127.0.0.1:1/cb", None)
        .unwrap();
    let (_, b) = m
        .client
        .authorization_url(&d, &registration(M::None), "http://127.0.0.1:1/cb", None)
        .unwrap();
    let (sa, sb) = (a.state.secret().to_owned(), b.state.secret().to_owned());
    store.insert(a);
    store.insert(b);
    assert_eq!(store.len(), 2);
    assert_eq!(store.take(&sa).unwrap().state.secret(), sa);
    assert!(matches!(store.take(&sa), Err(Error::UnknownState)), "single use");
    assert!(
        matches!(store.take(&sa[..sa.len() - 1]), Err(Error::UnknownState)),
        "a prefix is not a match"
    );
    m.clock.advance(Duration::from_secs(600));
    assert!(matches!(store.take(&sb), Err(Error::StateExpired)));
    assert!(store.is_empty());
}

#[test]
fn callback_params_parse_from_a_location_header() {
    let url: Url = "http://localhost:3000/callback?code=test-auth-code&state=abc&iss=https%3A%2F%2Fas.example.com".parse().unwrap();
    let p = CallbackParams::from_url(&url);
    assert_eq!(p.code.unwrap().secret(), "test-auth-code");
    assert_eq!(p.state.unwrap().secret(), "abc");
    assert_eq!(p.iss.as_deref(), Some("https://as.example.com"));
}

#[tokio::test]
async fn authorize_without_browser_reads_the_redirect() {
    let m = mock(|r| {
        let state = r.url.query_pairs().find(|(k, _)| k == "state").unwrap().1.into_owned();
        HttpResponse::new(302)
            .with_header("location", &format!("http://127.0.0.1:1/cb?code=c0de&state={state}"))
    });
    let d = discovery(serde_json::json!({}));
    let (url, pending) = m
        .client
        .authorization_url(&d, &registration(M::None), "http://127.0.0.1:1/cb", None)
        .unwrap();
    let callback = m.client.authorize_without_browser(&url).await.unwrap();
    assert_eq!(callback.code.unwrap().secret(), "c0de");
    assert_eq!(callback.state.unwrap(), pending.state);
    assert_eq!(m.log.all().len(), 1, "the redirect to the callback is not followed");

    let m = mock(|_| HttpResponse::new(200));
    assert!(matches!(
        m.client.authorize_without_browser(&url).await,
        Err(Error::HttpStatus { status: 200, .. })
    ));
}

#[test]
fn pending_authorizations_survive_serialization() {
    let m = mock(|_| HttpResponse::new(500));
    let d = discovery(serde_json::json!({}));
    let (_, p) = m
        .client
        .authorization_url(&d, &registration(M::None), "http://127.0.0.1:1/cb", None)
        .unwrap();
    let back: PendingAuthorization =
        serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
    assert_eq!(back.state, p.state);
    assert_eq!(back.verifier, p.verifier);
    assert_eq!((back.created_at, back.ttl, back.resource), (p.created_at, p.ttl, p.resource));
}

#[tokio::test]
async fn missing_code_or_endpoints_are_typed_errors() {
    let m = mock(|_| token_body());
    let d = discovery(serde_json::json!({}));
    let reg = registration(M::None);
    let (_, pending) = m.client.authorization_url(&d, &reg, "http://127.0.0.1:1/cb", None).unwrap();
    let mut no_code = callback(&pending, None);
    no_code.code = None;
    assert!(matches!(
        m.client.exchange_code(&d, &reg, &pending, &no_code).await,
        Err(Error::AuthorizationDenied { ref error, .. }) if error == "missing_code"
    ));
    let mut no_token = d.clone();
    no_token.authorization_server.token_endpoint = None;
    assert!(matches!(
        m.client.exchange_code(&no_token, &reg, &pending, &callback(&pending, None)).await,
        Err(Error::Unsupported("token endpoint"))
    ));
    let mut no_authorize = d.clone();
    no_authorize.authorization_server.authorization_endpoint = None;
    assert!(matches!(
        m.client.authorization_url(&no_authorize, &reg, "http://127.0.0.1:1/cb", None),
        Err(Error::Unsupported("authorization endpoint"))
    ));
    assert!(m.log.all().is_empty());
}

/// Pins the replay race: the same callback delivered many times at once (a browser retry, a
/// replayed redirect) must redeem its state exactly once.
#[test]
fn concurrent_takes_of_one_state_succeed_exactly_once() {
    let m = mock(|_| HttpResponse::new(500));
    let d = discovery(serde_json::json!({}));
    let store = std::sync::Arc::new(PendingAuthorizations::new(m.clock.shared()));
    for round in 0..20 {
        let (_, p) = m
            .client
            .authorization_url(&d, &registration(M::None), "http://127.0.0.1:1/cb", None)
            .unwrap();
        let state = p.state.secret().to_owned();
        store.insert(p);
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(16));
        let wins: usize = (0..16)
            .map(|_| {
                let (store, state, barrier) = (store.clone(), state.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    store.take(&state).is_ok()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| usize::from(h.join().unwrap()))
            .sum();
        assert_eq!(wins, 1, "round {round}");
    }
    assert!(store.is_empty());
}

/// `exchange_code` refuses a pending authorization made for another issuer or another client
/// than the discovery and registration it is given, before looking at the callback or sending
/// anything.
#[tokio::test]
async fn the_pending_request_must_match_the_discovery_and_registration() {
    let m = mock(|_| token_body());
    let d = discovery(serde_json::json!({}));
    let reg = registration(M::None);
    let (_, pending) = m.client.authorization_url(&d, &reg, "http://127.0.0.1:1/cb", None).unwrap();
    let mut other_as = pending.clone();
    other_as.issuer = "https://other-as.example.com".into();
    let err = m.client.exchange_code(&d, &reg, &other_as, &callback(&other_as, None)).await;
    assert!(matches!(err, Err(Error::IssuerMismatch { .. })), "{err:?}");
    let mut other_client = reg.clone();
    other_client.client_id = "client-2".into();
    let err = m.client.exchange_code(&d, &other_client, &pending, &callback(&pending, None)).await;
    assert!(matches!(err, Err(Error::InvalidConfig(ref m)) if m.contains("client-2")), "{err:?}");
    assert!(m.log.all().is_empty());
}

/// The authorization URL carries the `state` (and the redirect the `code`): when the headless
/// authorization fails, the error names the endpoint but neither secret.
#[tokio::test]
async fn headless_authorization_errors_carry_no_state_or_code() {
    let d = discovery(serde_json::json!({}));
    let reg = registration(M::None);
    for answer in [500u16, 302] {
        let m = mock(move |_| {
            let r = HttpResponse::new(answer);
            if answer == 302 {
                r.with_header("location", "http://[bad/cb?code=SECRET-CODE")
            } else {
                r
            }
        });
        let (url, pending) =
            m.client.authorization_url(&d, &reg, "http://127.0.0.1:1/cb", None).unwrap();
        let err = m.client.authorize_without_browser(&url).await.unwrap_err();
        let shown = format!("{err} {err:?}");
        assert!(!shown.contains(pending.state.secret()), "{shown}");
        assert!(!shown.contains("SECRET-CODE"), "{shown}");
    }
    // A transport failure whose message quotes the URL.
    let failing = |req: crate::HttpRequest| async move {
        Err(Error::Transport {
            url: req.url.to_string(),
            source: format!("error sending request for url ({})", req.url).into(),
        })
    };
    let client = OAuthClient::new(failing, mcp_clock::ManualClock::default().shared());
    let (url, pending) = client.authorization_url(&d, &reg, "http://127.0.0.1:1/cb", None).unwrap();
    let err = client.authorize_without_browser(&url).await.unwrap_err();
    let shown = format!("{err} {err:?} {}", std::error::Error::source(&err).unwrap());
    assert!(!shown.contains(pending.state.secret()), "{shown}");
    assert!(shown.contains("as.example.com/authorize"), "{shown}");
}

/// A callback that repeats a parameter is refused, naming the parameter but not the values.
#[test]
fn a_callback_with_a_repeated_parameter_is_refused() {
    for query in ["code=a&code=b&state=s", "code=a&state=s&state=t", "code=a&state=s&iss=x&iss=y"] {
        let url: Url = format!("http://127.0.0.1:1/cb?{query}").parse().unwrap();
        let err = CallbackParams::parse(&url).unwrap_err();
        assert!(matches!(err, Error::Malformed { .. }), "{err:?}");
        assert!(!err.to_string().contains("code=a"), "{err}");
    }
    let url: Url = "http://127.0.0.1:1/cb?code=a&state=s&iss=x&other=1&other=2".parse().unwrap();
    assert_eq!(CallbackParams::parse(&url).unwrap().iss.as_deref(), Some("x"));
}
