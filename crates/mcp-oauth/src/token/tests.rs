//! Token endpoint, client authentication, revocation and SEP-990 tests.

use std::time::Duration;

use base64::Engine as _;
use p256::ecdsa::signature::Verifier as _;

use super::*;
use crate::testutil::{TEST_KEY_PEM, discovery, json, mock, registration, token_body};
use crate::{
    ClientSecret, EnterpriseGrant, ErrorClass, HttpRequest, RegistrationSource,
    TokenEndpointAuthMethod as M,
};

fn d() -> Discovery {
    discovery(serde_json::json!({}))
}

fn rt() -> RefreshToken {
    RefreshToken::new("rt-old")
}

#[tokio::test]
async fn client_secret_basic_uses_the_header_only() {
    let m = mock(|_| token_body());
    m.client.refresh(&d(), &registration(M::ClientSecretBasic), &rt(), None).await.unwrap();
    let req = m.log.last();
    let expected = base64::engine::general_purpose::STANDARD.encode("client-1:s3cr3t-value");
    assert_eq!(req.header("authorization"), Some(format!("Basic {expected}").as_str()));
    assert_eq!(req.form_value("client_secret"), None);
    assert_eq!(req.form_value("client_id"), None);
}

#[tokio::test]
async fn client_secret_basic_form_encodes_id_and_secret() {
    let m = mock(|_| token_body());
    let mut reg = registration(M::ClientSecretBasic);
    reg.client_id = "a:b c".into();
    reg.client_secret = Some(ClientSecret::new("p@ss/word"));
    m.client.refresh(&d(), &reg, &rt(), None).await.unwrap();
    let expected = base64::engine::general_purpose::STANDARD.encode("a%3Ab+c:p%40ss%2Fword");
    assert_eq!(m.log.last().header("authorization"), Some(format!("Basic {expected}").as_str()));
}

#[tokio::test]
async fn client_secret_post_and_none_use_the_body_only() {
    let m = mock(|_| token_body());
    m.client.refresh(&d(), &registration(M::ClientSecretPost), &rt(), None).await.unwrap();
    let req = m.log.last();
    assert_eq!(req.header("authorization"), None);
    assert_eq!(req.form_value("client_id").as_deref(), Some("client-1"));
    assert_eq!(req.form_value("client_secret").as_deref(), Some("s3cr3t-value"));

    m.client.refresh(&d(), &registration(M::None), &rt(), None).await.unwrap();
    let req = m.log.last();
    assert_eq!(req.header("authorization"), None);
    assert_eq!(req.form_value("client_id").as_deref(), Some("client-1"));
    assert_eq!(req.form_value("client_secret"), None);
}

#[tokio::test]
async fn a_secret_method_without_a_secret_is_a_config_error() {
    let m = mock(|_| token_body());
    let mut reg = registration(M::ClientSecretPost);
    reg.client_secret = None;
    assert!(matches!(
        m.client.refresh(&d(), &reg, &rt(), None).await,
        Err(Error::InvalidConfig(_))
    ));
    assert!(m.log.all().is_empty());
}

fn decode_jwt(jwt: &str) -> (serde_json::Value, serde_json::Value) {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let parts: Vec<&str> = jwt.split('.').collect();
    assert_eq!(parts.len(), 3);
    let key = p256::ecdsa::SigningKey::from_pkcs8_pem(TEST_KEY_PEM).unwrap();
    let sig = p256::ecdsa::Signature::from_slice(&b64.decode(parts[2]).unwrap()).unwrap();
    key.verifying_key()
        .verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &sig)
        .expect("valid ES256 signature");
    (
        serde_json::from_slice(&b64.decode(parts[0]).unwrap()).unwrap(),
        serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap(),
    )
}

#[tokio::test]
async fn client_credentials_with_private_key_jwt() {
    let m = mock(|_| token_body());
    let tokens = m
        .client
        .client_credentials(&d(), &registration(M::PrivateKeyJwt), Some("mcp:basic"))
        .await
        .unwrap();
    assert_eq!(tokens.access_token.secret(), "at-123");
    let req = m.log.last();
    assert_eq!(req.form_value("grant_type").as_deref(), Some("client_credentials"));
    assert_eq!(req.form_value("scope").as_deref(), Some("mcp:basic"));
    assert_eq!(req.form_value("resource").as_deref(), Some("https://mcp.example.com/mcp"));
    assert_eq!(
        req.form_value("client_assertion_type").as_deref(),
        Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
    );
    let (header, claims) = decode_jwt(&req.form_value("client_assertion").unwrap());
    assert_eq!(header["alg"], "ES256");
    assert_eq!(claims["iss"], "client-1");
    assert_eq!(claims["sub"], "client-1");
    assert_eq!(claims["aud"], "https://as.example.com");
    let now = m.clock.now().as_secs();
    assert_eq!(claims["iat"], now);
    assert_eq!(claims["exp"], now + 300);
    assert!(claims["jti"].as_str().unwrap().len() >= 16);
}

#[tokio::test]
async fn a_bad_private_key_is_a_config_error() {
    let m = mock(|_| token_body());
    let mut reg = registration(M::PrivateKeyJwt);
    reg.client_key = Some(crate::ClientSigningKey::es256(
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    ));
    assert!(matches!(
        m.client.client_credentials(&d(), &reg, None).await,
        Err(Error::InvalidConfig(_))
    ));
    reg.client_key = Some(crate::ClientSigningKey {
        algorithm: "RS256".into(),
        ..crate::ClientSigningKey::es256(TEST_KEY_PEM)
    });
    assert!(matches!(
        m.client.client_credentials(&d(), &reg, None).await,
        Err(Error::InvalidConfig(_))
    ));
}

#[tokio::test]
async fn client_credentials_with_basic_secret() {
    let m = mock(|_| token_body());
    m.client.client_credentials(&d(), &registration(M::ClientSecretBasic), None).await.unwrap();
    let req = m.log.last();
    assert_eq!(req.form_value("grant_type").as_deref(), Some("client_credentials"));
    assert_eq!(req.form_value("scope"), None);
    assert!(req.header("authorization").unwrap().starts_with("Basic "));
}

#[tokio::test]
async fn refresh_sends_scope_and_resource() {
    let m = mock(|_| token_body());
    m.client
        .refresh(&d(), &registration(M::None), &rt(), Some("mcp:basic offline_access"))
        .await
        .unwrap();
    let req = m.log.last();
    assert_eq!(req.form_value("grant_type").as_deref(), Some("refresh_token"));
    assert_eq!(req.form_value("refresh_token").as_deref(), Some("rt-old"));
    assert_eq!(req.form_value("scope").as_deref(), Some("mcp:basic offline_access"));
    assert_eq!(req.form_value("resource").as_deref(), Some("https://mcp.example.com/mcp"));
}

fn parse(body: serde_json::Value) -> Result<TokenResponse> {
    parse_token_response(
        &"https://as.example.com/token".parse().unwrap(),
        &json(body),
        false,
        false,
    )
}

#[test]
fn token_response_policies() {
    // Missing expires_in: unknown lifetime, reported as None.
    let t = parse(serde_json::json!({"access_token": "a", "token_type": "Bearer"})).unwrap();
    assert_eq!(t.expires_in, None);
    assert_eq!(t.refresh_token, None, "missing refresh_token: the caller keeps its old one");
    // expires_in as a string, token_type in any case.
    let t = parse(
        serde_json::json!({"access_token": "a", "token_type": "bearer", "expires_in": "120"}),
    )
    .unwrap();
    assert_eq!(t.expires_in, Some(Duration::from_secs(120)));
    // Other token types are refused.
    assert!(matches!(
        parse(serde_json::json!({"access_token": "a", "token_type": "DPoP"})),
        Err(Error::UnsupportedTokenType(t)) if t == "DPoP"
    ));
    assert!(matches!(
        parse(serde_json::json!({"access_token": "a", "token_type": "N_A"})),
        Err(Error::UnsupportedTokenType(_))
    ));
    for bad in [
        serde_json::json!({"token_type": "Bearer"}),
        serde_json::json!({"access_token": "", "token_type": "Bearer"}),
        serde_json::json!({"access_token": "a"}),
        serde_json::json!({"access_token": "a", "token_type": "Bearer", "expires_in": -5}),
        serde_json::json!({"access_token": "a", "token_type": "Bearer", "expires_in": "soon"}),
        serde_json::json!({"access_token": "a", "token_type": "Bearer", "expires_in": [1]}),
    ] {
        assert!(matches!(parse(bad.clone()), Err(Error::Malformed { .. })), "{bad}");
    }
}

#[test]
fn token_response_date_header_is_kept() {
    let response = token_body().with_header("date", "Wed, 21 Oct 2015 07:28:00 GMT");
    let t = parse_token_response(
        &"https://as.example.com/token".parse().unwrap(),
        &response,
        false,
        false,
    )
    .unwrap();
    assert_eq!(t.date, Some(Timestamp::from_secs(1_445_412_480)));
    assert_eq!(t.expires_in, Some(Duration::from_secs(3600)));
    let response = token_body().with_header("date", "yesterday");
    let t = parse_token_response(
        &"https://as.example.com/token".parse().unwrap(),
        &response,
        false,
        false,
    )
    .unwrap();
    assert_eq!(t.date, None);
}

fn oauth_error(status: u16, code: &str) -> HttpResponse {
    HttpResponse::json(
        status,
        &serde_json::json!({"error": code, "error_description": format!("about {code}")}),
    )
}

#[tokio::test]
async fn token_errors_are_classified_for_the_storage_policy() {
    for (response, class) in [
        (oauth_error(400, "invalid_grant"), ErrorClass::Terminal),
        (oauth_error(401, "invalid_client"), ErrorClass::Terminal),
        (oauth_error(400, "unauthorized_client"), ErrorClass::Terminal),
        (oauth_error(400, "invalid_scope"), ErrorClass::Terminal),
        (oauth_error(503, "temporarily_unavailable"), ErrorClass::Transient),
        (oauth_error(400, "temporarily_unavailable"), ErrorClass::Transient),
        (oauth_error(500, "server_error"), ErrorClass::Transient),
        (HttpResponse::new(429), ErrorClass::Transient),
        (HttpResponse::new(502), ErrorClass::Transient),
        (HttpResponse::new(400), ErrorClass::Other),
    ] {
        let r2 = response.clone();
        let m = mock(move |_| r2.clone());
        let err = m.client.refresh(&d(), &registration(M::None), &rt(), None).await.unwrap_err();
        assert_eq!(err.class(), class, "{err:?}");
        if let Error::OAuth { code, description, endpoint, .. } = &err {
            assert_eq!(*endpoint, Endpoint::Token);
            assert_eq!(
                description.as_deref(),
                Some(format!("about {code}").as_str()),
                "the server's words are kept"
            );
        }
    }
    let transport = Error::Transport { url: "x".into(), source: "boom".into() };
    assert_eq!(transport.class(), ErrorClass::Transient);
    assert_eq!(
        Error::Timeout { url: "x".into(), timeout: Duration::from_secs(1) }.class(),
        ErrorClass::Transient
    );
}

#[tokio::test]
async fn token_requests_never_follow_redirects() {
    let m = mock(|_| {
        HttpResponse::new(302).with_header("location", "https://as.example.com/elsewhere")
    });
    let err = m.client.refresh(&d(), &registration(M::None), &rt(), None).await.unwrap_err();
    assert!(matches!(err, Error::Redirect { .. }), "{err:?}");
    assert_eq!(m.log.all().len(), 1);
}

#[tokio::test]
async fn revocation_sends_refresh_then_access_token() {
    let m = mock(|_| HttpResponse::new(200));
    let out = m
        .client
        .revoke(
            &d(),
            &registration(M::ClientSecretPost),
            Some(&rt()),
            Some(&AccessToken::new("at-1")),
        )
        .await
        .unwrap();
    assert_eq!(out, Revocation::Revoked);
    let reqs = m.log.all();
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0].url.path(), "/revoke");
    assert_eq!(reqs[0].form_value("token").as_deref(), Some("rt-old"));
    assert_eq!(reqs[0].form_value("token_type_hint").as_deref(), Some("refresh_token"));
    assert_eq!(reqs[1].form_value("token").as_deref(), Some("at-1"));
    assert_eq!(reqs[1].form_value("token_type_hint").as_deref(), Some("access_token"));
    assert_eq!(reqs[1].form_value("client_secret").as_deref(), Some("s3cr3t-value"));
}

#[tokio::test]
async fn revocation_honours_the_endpoint_auth_methods() {
    let m = mock(|_| HttpResponse::new(200));
    let dd = discovery(
        serde_json::json!({"revocation_endpoint_auth_methods_supported": ["client_secret_basic"]}),
    );
    m.client.revoke(&dd, &registration(M::ClientSecretPost), Some(&rt()), None).await.unwrap();
    let req = m.log.last();
    assert!(req.header("authorization").unwrap().starts_with("Basic "));
    assert_eq!(req.form_value("client_secret"), None);

    let dd = discovery(
        serde_json::json!({"revocation_endpoint_auth_methods_supported": ["private_key_jwt"]}),
    );
    let err = m
        .client
        .revoke(&dd, &registration(M::ClientSecretPost), Some(&rt()), None)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unsupported(_)));
}

#[tokio::test]
async fn revocation_without_endpoint_and_with_unsupported_token_type() {
    let m = mock(|_| HttpResponse::new(200));
    let mut dd = d();
    dd.authorization_server.revocation_endpoint = None;
    assert_eq!(
        m.client.revoke(&dd, &registration(M::None), Some(&rt()), None).await.unwrap(),
        Revocation::NoEndpoint
    );
    assert!(m.log.all().is_empty());

    let m = mock(|r: &HttpRequest| match r.form_value("token_type_hint").as_deref() {
        Some("access_token") => oauth_error(400, "unsupported_token_type"),
        _ => HttpResponse::new(200),
    });
    m.client
        .revoke(&d(), &registration(M::None), Some(&rt()), Some(&AccessToken::new("a")))
        .await
        .unwrap();

    let m = mock(|_| oauth_error(503, "temporarily_unavailable"));
    let err = m
        .client
        .revoke(&d(), &registration(M::None), Some(&rt()), Some(&AccessToken::new("a")))
        .await
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Transient);
    assert_eq!(m.log.all().len(), 1, "stops at the first failure");
}

#[tokio::test]
async fn enterprise_managed_authorization_exchanges_then_redeems() {
    let m = mock(|r: &HttpRequest| match r.url.host_str() {
        Some("idp.example.com") => json(serde_json::json!({
            "access_token": "id-jag-jwt", "token_type": "N_A",
            "issued_token_type": "urn:ietf:params:oauth:token-type:id-jag"
        })),
        _ => token_body(),
    });
    let mut idp_client = registration(M::None);
    idp_client.client_id = "idp-client".into();
    idp_client.issuer = "https://idp.example.com".into();
    idp_client.source = RegistrationSource::PreRegistered;
    let grant = EnterpriseGrant {
        idp_token_endpoint: "https://idp.example.com/token".parse().unwrap(),
        idp_client,
        id_token: crate::IdToken::new("the-id-token"),
        scope: None,
    };
    let tokens =
        m.client.enterprise_token(&d(), &registration(M::ClientSecretBasic), &grant).await.unwrap();
    assert_eq!(tokens.access_token.secret(), "at-123");
    let reqs = m.log.all();
    assert_eq!(reqs[0].url.as_str(), "https://idp.example.com/token");
    assert_eq!(
        reqs[0].form_value("grant_type").as_deref(),
        Some("urn:ietf:params:oauth:grant-type:token-exchange")
    );
    assert_eq!(
        reqs[0].form_value("requested_token_type").as_deref(),
        Some("urn:ietf:params:oauth:token-type:id-jag")
    );
    assert_eq!(reqs[0].form_value("subject_token").as_deref(), Some("the-id-token"));
    assert_eq!(
        reqs[0].form_value("subject_token_type").as_deref(),
        Some("urn:ietf:params:oauth:token-type:id_token")
    );
    assert_eq!(reqs[0].form_value("audience").as_deref(), Some("https://as.example.com"));
    assert_eq!(reqs[0].form_value("resource").as_deref(), Some("https://mcp.example.com/mcp"));
    assert_eq!(reqs[0].form_value("client_id").as_deref(), Some("idp-client"));
    assert_eq!(reqs[1].url.as_str(), "https://as.example.com/token");
    assert_eq!(
        reqs[1].form_value("grant_type").as_deref(),
        Some("urn:ietf:params:oauth:grant-type:jwt-bearer")
    );
    assert_eq!(reqs[1].form_value("assertion").as_deref(), Some("id-jag-jwt"));
    assert!(reqs[1].header("authorization").unwrap().starts_with("Basic "));
}

#[tokio::test]
async fn enterprise_exchange_must_issue_an_id_jag() {
    let m = mock(|_| {
        json(
            serde_json::json!({"access_token": "x", "token_type": "N_A", "issued_token_type": "urn:ietf:params:oauth:token-type:access_token"}),
        )
    });
    let grant = EnterpriseGrant {
        idp_token_endpoint: "https://idp.example.com/token".parse().unwrap(),
        idp_client: registration(M::None),
        id_token: crate::IdToken::new("t"),
        scope: Some("mcp:basic".into()),
    };
    let err = m.client.enterprise_token(&d(), &registration(M::None), &grant).await.unwrap_err();
    assert!(matches!(err, Error::Malformed { .. }), "{err:?}");
    assert_eq!(m.log.all().len(), 1);
}

/// SEP-2352: the grants and revocation refuse a registration whose issuer is not the
/// discovery's, before anything is sent (the old server's secret never reaches the new one);
/// a metadata document client ID is portable.
#[tokio::test]
async fn grants_and_revocation_refuse_a_registration_of_another_issuer() {
    let m = mock(|_| token_body());
    let mut reg = registration(M::ClientSecretPost);
    reg.issuer = "https://old-as.example.com".into();
    let is_mismatch = |r: Result<TokenResponse>| matches!(r, Err(Error::RegistrationIssuerMismatch { ref registered, .. }) if registered == "https://old-as.example.com");
    assert!(is_mismatch(m.client.refresh(&d(), &reg, &rt(), None).await));
    assert!(is_mismatch(m.client.client_credentials(&d(), &reg, None).await));
    let revoked = m.client.revoke(&d(), &reg, Some(&rt()), None).await;
    assert!(matches!(revoked, Err(Error::RegistrationIssuerMismatch { .. })), "{revoked:?}");
    assert!(m.log.all().is_empty(), "nothing was sent");

    let mut cimd = registration(M::None);
    cimd.source = RegistrationSource::MetadataDocument;
    cimd.client_id = "https://client.example.com/meta.json".into();
    cimd.issuer = "https://old-as.example.com".into();
    m.client.refresh(&d(), &cimd, &rt(), None).await.unwrap();
    assert_eq!(m.log.all().len(), 1);
}

fn proof_claims(req: &HttpRequest) -> serde_json::Value {
    let proof = req.header("dpop").expect("a DPoP proof");
    let claims = proof.split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(claims).unwrap(),
    )
    .unwrap()
}

/// RFC 9449 at the token endpoint: each token request carries a fresh proof for `POST` on the
/// token endpoint; a `use_dpop_nonce` answer is retried once with the server's nonce, and the
/// `DPoP` token type is accepted because a proof was sent. A server that keeps asking gets
/// exactly one retry.
#[tokio::test]
async fn dpop_proofs_at_the_token_endpoint_with_one_nonce_retry() {
    let m = mock(|req| {
        let claims = proof_claims(req);
        if claims.get("nonce").and_then(|n| n.as_str()) == Some("as-nonce-1") {
            json(
                serde_json::json!({"access_token": "bound", "token_type": "DPoP", "expires_in": 60}),
            )
        } else {
            crate::HttpResponse::new(400)
                .with_header("content-type", "application/json")
                .with_header("dpop-nonce", "as-nonce-1")
                .with_body(br#"{"error":"use_dpop_nonce"}"#)
        }
    });
    let key = crate::DpopKey::generate().unwrap();
    let client = m.client.clone().with_dpop(key.clone());
    let tokens = client.refresh(&d(), &registration(M::None), &rt(), None).await.unwrap();
    assert_eq!(tokens.token_type, "DPoP");
    let sent = m.log.all();
    assert_eq!(sent.len(), 2, "the request and one retry with the nonce");
    let (first, second) = (proof_claims(&sent[0]), proof_claims(&sent[1]));
    assert_eq!(first["htm"], "POST");
    assert_eq!(first["htu"], "https://as.example.com/token");
    assert!(first.get("nonce").is_none() && first.get("ath").is_none());
    assert_eq!(second["nonce"], "as-nonce-1");
    assert_ne!(first["jti"], second["jti"]);
    // The nonce is remembered: the next grant sends it at once.
    client.refresh(&d(), &registration(M::None), &rt(), None).await.unwrap();
    assert_eq!(m.log.all().len(), 3);

    // A server that never accepts the nonce: one retry, then its error.
    let m = mock(|_| {
        crate::HttpResponse::new(400)
            .with_header("content-type", "application/json")
            .with_header("dpop-nonce", "always-new")
            .with_body(br#"{"error":"use_dpop_nonce"}"#)
    });
    let err =
        m.client.clone().with_dpop(key).refresh(&d(), &registration(M::None), &rt(), None).await;
    assert_eq!(err.unwrap_err().oauth_code(), Some("use_dpop_nonce"));
    assert_eq!(m.log.all().len(), 2);
}

/// A `DPoP` token type is refused when no proof was sent (the client could not use it).
#[tokio::test]
async fn a_dpop_token_type_without_a_proof_is_refused() {
    let m = mock(|_| json(serde_json::json!({"access_token": "bound", "token_type": "DPoP"})));
    let err = m.client.refresh(&d(), &registration(M::None), &rt(), None).await.unwrap_err();
    assert!(matches!(err, Error::UnsupportedTokenType(ref t) if t == "DPoP"), "{err:?}");
    assert!(m.log.last().header("dpop").is_none());
}
