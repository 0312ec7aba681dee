//! Registration tests through the HTTP seam.

use super::*;
use crate::testutil::{discovery, json, mock};
use crate::{HttpResponse, TokenEndpointAuthMethod as M};

fn config() -> ClientConfig {
    ClientConfig::new("test client", "http://127.0.0.1:8765/callback")
}

fn pre(secret: bool) -> PreRegisteredClient {
    PreRegisteredClient {
        issuer: "https://as.example.com".into(),
        client_id: "pre-registered-client".into(),
        client_secret: secret.then(|| ClientSecret::new("pre-registered-secret")),
        client_key: None,
        auth_method: None,
    }
}

#[tokio::test]
async fn pre_registered_client_wins_and_sends_nothing() {
    let m = mock(|_| HttpResponse::new(500));
    let d = discovery(serde_json::json!({"client_id_metadata_document_supported": true}));
    let mut c = config();
    c.pre_registered = Some(pre(true));
    c.metadata_document_url = Some("https://client.example.com/meta.json".parse().unwrap());
    let r = m.client.register(&d, &c).await.unwrap();
    assert_eq!(r.source, RegistrationSource::PreRegistered);
    assert_eq!(r.client_id, "pre-registered-client");
    assert_eq!(
        r.auth_method,
        M::ClientSecretBasic,
        "RFC 8414 default when the server lists nothing"
    );
    assert!(m.log.all().is_empty());

    let d = discovery(
        serde_json::json!({"token_endpoint_auth_methods_supported": ["client_secret_post"]}),
    );
    assert_eq!(m.client.register(&d, &c).await.unwrap().auth_method, M::ClientSecretPost);
    c.pre_registered = Some(pre(false));
    let d = discovery(serde_json::json!({"token_endpoint_auth_methods_supported": ["none"]}));
    assert_eq!(m.client.register(&d, &c).await.unwrap().auth_method, M::None);
}

#[tokio::test]
async fn metadata_document_url_when_supported() {
    let m = mock(|_| HttpResponse::new(500));
    let mut c = config();
    c.metadata_document_url =
        Some("https://conformance-test.local/client-metadata.json".parse().unwrap());
    let d = discovery(serde_json::json!({"client_id_metadata_document_supported": true}));
    let r = m.client.register(&d, &c).await.unwrap();
    assert_eq!(r.client_id, "https://conformance-test.local/client-metadata.json");
    assert_eq!(r.source, RegistrationSource::MetadataDocument);
    assert_eq!(r.auth_method, M::None);
    assert!(m.log.all().is_empty());

    c.metadata_document_url = Some("https://client.example.com/".parse().unwrap());
    assert!(matches!(m.client.register(&d, &c).await, Err(Error::InvalidConfig(_))));
}

#[tokio::test]
async fn metadata_document_url_may_be_plain_http_on_loopback_only() {
    let m = mock(|_| HttpResponse::new(500));
    let d = discovery(serde_json::json!({"client_id_metadata_document_supported": true}));
    let mut c = config();
    c.metadata_document_url = Some("http://127.0.0.1:4000/client.json".parse().unwrap());
    let r = m.client.register(&d, &c).await.unwrap();
    assert_eq!(r.client_id, "http://127.0.0.1:4000/client.json");
    assert_eq!(r.source, RegistrationSource::MetadataDocument);
    c.metadata_document_url = Some("http://client.example.com/client.json".parse().unwrap());
    assert!(matches!(m.client.register(&d, &c).await, Err(Error::InvalidConfig(_))));
    assert!(m.log.all().is_empty());
}

/// `extra_metadata` (mcp-connect's `--static-oauth-client-metadata`) reaches the registration
/// request, but never replaces the fields the protocol needs.
#[tokio::test]
async fn extra_metadata_is_sent_without_replacing_the_protocols_fields() {
    let m = mock(|_| {
        let mut r = json(serde_json::json!({"client_id": "test-client-id"}));
        r.status = 201;
        r
    });
    let mut c = config();
    c.extra_metadata = serde_json::json!({
        "client_name": "My Desktop",
        "scope": "mcp:tools offline_access",
        "logo_uri": "https://example.com/logo.png",
        "redirect_uris": ["https://evil.example/cb"],
        "grant_types": ["client_credentials"],
    })
    .as_object()
    .unwrap()
    .clone();
    let d = discovery(serde_json::json!({"token_endpoint_auth_methods_supported": ["none"]}));
    m.client.register(&d, &c).await.unwrap();
    let body: serde_json::Value = serde_json::from_slice(&m.log.last().body).unwrap();
    assert_eq!(body["client_name"], "My Desktop");
    assert_eq!(body["scope"], "mcp:tools offline_access");
    assert_eq!(body["logo_uri"], "https://example.com/logo.png");
    assert_eq!(body["redirect_uris"], serde_json::json!(["http://127.0.0.1:8765/callback"]));
    assert_eq!(body["grant_types"], serde_json::json!(["authorization_code", "refresh_token"]));
}

#[tokio::test]
async fn dynamic_registration_when_metadata_documents_are_not_supported() {
    let m = mock(|_| {
        let mut r = json(
            serde_json::json!({"client_id": "test-client-id", "client_secret": "test-client-secret"}),
        );
        r.status = 201;
        r
    });
    let mut c = config();
    c.metadata_document_url = Some("https://client.example.com/meta.json".parse().unwrap());
    let d = discovery(serde_json::json!({
        "grant_types_supported": ["authorization_code", "refresh_token"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"]
    }));
    let r = m.client.register(&d, &c).await.unwrap();
    assert_eq!(r.source, RegistrationSource::Dynamic);
    assert_eq!(r.client_id, "test-client-id");
    assert_eq!(r.client_secret.as_ref().unwrap().secret(), "test-client-secret");
    assert_eq!(r.auth_method, M::ClientSecretBasic);
    let req = m.log.last();
    assert_eq!(req.url.as_str(), "https://as.example.com/register");
    let body: serde_json::Value = serde_json::from_slice(&req.body).unwrap();
    assert_eq!(body["grant_types"], serde_json::json!(["authorization_code", "refresh_token"]));
    assert_eq!(body["application_type"], "native");
    assert_eq!(body["token_endpoint_auth_method"], "client_secret_basic");
    assert_eq!(body["redirect_uris"], serde_json::json!(["http://127.0.0.1:8765/callback"]));
    assert_eq!(body["response_types"], serde_json::json!(["code"]));
}

#[tokio::test]
async fn dynamic_registration_follows_the_server_chosen_method() {
    for (listed, answer, expected) in [
        (
            "none",
            serde_json::json!({"client_id": "c", "token_endpoint_auth_method": "none"}),
            M::None,
        ),
        (
            "client_secret_post",
            serde_json::json!({"client_id": "c", "client_secret": "s", "token_endpoint_auth_method": "client_secret_post"}),
            M::ClientSecretPost,
        ),
        (
            "client_secret_basic",
            serde_json::json!({"client_id": "c", "client_secret": "s", "token_endpoint_auth_method": "client_secret_basic"}),
            M::ClientSecretBasic,
        ),
    ] {
        let answer2 = answer.clone();
        let m = mock(move |_| json(answer2.clone()));
        let d = discovery(serde_json::json!({"token_endpoint_auth_methods_supported": [listed]}));
        let r = m.client.register(&d, &config()).await.unwrap();
        assert_eq!(r.auth_method, expected, "{listed}");
        let body: serde_json::Value = serde_json::from_slice(&m.log.last().body).unwrap();
        assert_eq!(body["token_endpoint_auth_method"], listed);
    }
}

#[tokio::test]
async fn refresh_token_grant_is_left_out_when_not_offered() {
    let m = mock(|_| json(serde_json::json!({"client_id": "c"})));
    let d = discovery(serde_json::json!({"grant_types_supported": ["authorization_code"]}));
    m.client.register(&d, &config()).await.unwrap();
    let body: serde_json::Value = serde_json::from_slice(&m.log.last().body).unwrap();
    assert_eq!(body["grant_types"], serde_json::json!(["authorization_code"]));
}

#[tokio::test]
async fn registration_errors_are_typed() {
    let m = mock(|_| {
        HttpResponse::json(
            400,
            &serde_json::json!({"error": "invalid_redirect_uri", "error_description": "no"}),
        )
    });
    let err = m.client.register(&discovery(serde_json::json!({})), &config()).await.unwrap_err();
    assert!(
        matches!(err, Error::OAuth { endpoint: Endpoint::Registration, ref code, .. } if code == "invalid_redirect_uri")
    );

    let m = mock(|_| json(serde_json::json!({"client_secret": "x"})));
    let err = m.client.register(&discovery(serde_json::json!({})), &config()).await.unwrap_err();
    assert!(matches!(err, Error::Malformed { .. }), "{err:?}");

    let m = mock(|_| {
        json(
            serde_json::json!({"client_id": "c", "token_endpoint_auth_method": "client_secret_basic"}),
        )
    });
    let err = m.client.register(&discovery(serde_json::json!({})), &config()).await.unwrap_err();
    assert!(matches!(err, Error::Malformed { .. }), "secret method without a secret: {err:?}");

    let m = mock(|_| HttpResponse::new(500));
    let mut d = discovery(serde_json::json!({}));
    d.authorization_server.registration_endpoint = None;
    assert!(matches!(m.client.register(&d, &config()).await, Err(Error::Unsupported(_))));
}

#[tokio::test]
async fn registration_never_follows_redirects() {
    let m = mock(|_| {
        HttpResponse::new(307).with_header("location", "https://as.example.com/elsewhere")
    });
    let err = m.client.register(&discovery(serde_json::json!({})), &config()).await.unwrap_err();
    assert!(matches!(err, Error::Redirect { .. }), "{err:?}");
    assert_eq!(m.log.all().len(), 1);
}

#[test]
fn stale_registration_is_detected_from_invalid_client() {
    let e = Error::OAuth {
        endpoint: Endpoint::Token,
        status: 401,
        code: "invalid_client".into(),
        description: None,
        uri: None,
        retry_after: None,
    };
    assert!(e.is_stale_registration());
    let e = Error::OAuth {
        endpoint: Endpoint::Token,
        status: 400,
        code: "invalid_grant".into(),
        description: None,
        uri: None,
        retry_after: None,
    };
    assert!(!e.is_stale_registration());
    // The server knows the client and refuses it this grant: not a stale registration.
    let e = Error::OAuth {
        endpoint: Endpoint::Token,
        status: 400,
        code: "unauthorized_client".into(),
        description: None,
        uri: None,
        retry_after: None,
    };
    assert!(!e.is_stale_registration());
}

#[tokio::test]
async fn an_unrequested_secret_does_not_change_the_method() {
    // The conformance suite's default: only `none` listed, and the registration answer carries a
    // secret but no method.
    let m = mock(|_| {
        json(
            serde_json::json!({"client_id": "test-client-id", "client_secret": "test-client-secret"}),
        )
    });
    let d = discovery(serde_json::json!({"token_endpoint_auth_methods_supported": ["none"]}));
    assert_eq!(m.client.register(&d, &config()).await.unwrap().auth_method, M::None);
    // With no list at all, RFC 8414's default applies to a client that holds a secret.
    let d = discovery(serde_json::json!({}));
    assert_eq!(m.client.register(&d, &config()).await.unwrap().auth_method, M::ClientSecretBasic);
    // No secret and no method: a public client, whatever was asked for.
    let m = mock(|_| json(serde_json::json!({"client_id": "c"})));
    let d = discovery(
        serde_json::json!({"token_endpoint_auth_methods_supported": ["client_secret_post"]}),
    );
    assert_eq!(m.client.register(&d, &config()).await.unwrap().auth_method, M::None);
}

/// SEP-2352: a pre-registered client belongs to its issuer. When discovery names another
/// authorization server, its credentials are not used: the client registers dynamically with
/// the new server, whose registration request carries no trace of the old secret.
#[tokio::test]
async fn a_pre_registered_client_of_another_issuer_registers_anew() {
    let m = mock(|_| {
        let mut r = json(serde_json::json!({"client_id": "new-as-client"}));
        r.status = 201;
        r
    });
    let mut c = config();
    let mut other = pre(true);
    other.issuer = "https://old-as.example.com".into();
    c.pre_registered = Some(other);
    let d = discovery(serde_json::json!({}));
    let r = m.client.register(&d, &c).await.unwrap();
    assert_eq!(r.source, RegistrationSource::Dynamic);
    assert_eq!(r.client_id, "new-as-client");
    assert_eq!(r.issuer, "https://as.example.com");
    let sent = m.log.last();
    assert_eq!(sent.url.as_str(), "https://as.example.com/register");
    let body = String::from_utf8_lossy(&sent.body);
    assert!(!body.contains("pre-registered"), "{body}");
    assert!(sent.header("authorization").is_none());
}

/// Without dynamic registration or metadata documents at the new server, the client is not
/// identified at all: a typed error, nothing sent.
#[tokio::test]
async fn a_pre_registered_client_of_another_issuer_is_refused_without_registration() {
    let m = mock(|_| HttpResponse::new(500));
    let mut c = config();
    let mut other = pre(true);
    other.issuer = "https://as.example.com/".into(); // exact comparison: another issuer
    c.pre_registered = Some(other);
    let mut d = discovery(serde_json::json!({}));
    d.authorization_server.registration_endpoint = None;
    let err = m.client.register(&d, &c).await.unwrap_err();
    assert!(
        matches!(&err, Error::RegistrationIssuerMismatch { registered, discovered }
            if registered == "https://as.example.com/" && discovered == "https://as.example.com"),
        "{err:?}"
    );
    assert!(!err.to_string().contains("pre-registered-secret"));
    assert!(m.log.all().is_empty());
}

/// SEP-837: `application_type` follows the redirect URIs: `native` for loopback and private-use
/// schemes, `web` for HTTPS redirects to a web host.
#[test]
fn application_type_follows_the_redirect_uris() {
    let t =
        |uris: &[&str]| application_type(&uris.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    assert_eq!(t(&["http://127.0.0.1:8765/callback"]), "native");
    assert_eq!(t(&["http://localhost:3000/callback"]), "native");
    assert_eq!(t(&["com.example.app:/oauth"]), "native");
    assert_eq!(t(&["https://app.example.com/callback"]), "web");
    assert_eq!(t(&["https://app.example.com/cb", "http://127.0.0.1:1/cb"]), "native");
    assert_eq!(t(&[]), "native");
}

/// A metadata document URL with a fragment is refused (it cannot be a client ID).
#[tokio::test]
async fn a_metadata_document_url_with_a_fragment_is_refused() {
    let m = mock(|_| HttpResponse::new(500));
    let d = discovery(serde_json::json!({"client_id_metadata_document_supported": true}));
    let mut c = config();
    c.metadata_document_url = Some("https://client.example.com/meta.json#x".parse().unwrap());
    assert!(
        matches!(m.client.register(&d, &c).await, Err(Error::InvalidConfig(ref e)) if e.contains("fragment"))
    );
    assert!(m.log.all().is_empty());
}
