//! `OAuthRefresher`: what it sends, and how each token-endpoint answer is classified.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use connection_factory::{OAuthRefresher, stored_client};
use mcp_clock::SharedClock;
use mcp_oauth::{Discovery, HttpRequest, HttpResponse, OAuthClient};
use token_storage::{
    RefreshError, RefreshRequest, Refresher, TerminalCode, TokenKey, TransientKind,
};

fn discovery() -> Discovery {
    serde_json::from_value(serde_json::json!({
        "server": "http://127.0.0.1:9/mcp",
        "resource": "http://127.0.0.1:9/mcp",
        "protected_resource": null,
        "authorization_server": {
            "issuer": "http://127.0.0.1:9",
            "authorization_endpoint": "http://127.0.0.1:9/authorize",
            "token_endpoint": "http://127.0.0.1:9/token"
        },
        "source": "OAuth"
    }))
    .unwrap()
}

fn registration() -> mcp_oauth::ClientRegistration {
    mcp_oauth::ClientRegistration {
        client_id: "client-1".into(),
        client_secret: None,
        client_key: None,
        auth_method: mcp_oauth::TokenEndpointAuthMethod::None,
        source: mcp_oauth::RegistrationSource::Dynamic,
        issuer: "http://127.0.0.1:9".into(),
        client_secret_expires_at: None,
    }
}

type Seen = Arc<Mutex<Vec<HttpRequest>>>;

/// A refresher whose token endpoint always answers `response` (or the transport error).
fn refresher(
    answer: impl Fn() -> Result<HttpResponse, mcp_oauth::Error> + Send + Sync + 'static,
) -> (OAuthRefresher, Seen) {
    let seen: Seen = Arc::default();
    let log = seen.clone();
    let answer = Arc::new(answer);
    let http = move |req: HttpRequest| {
        log.lock().unwrap().push(req);
        let answer = answer.clone();
        async move { answer() }
    };
    (OAuthRefresher::new(OAuthClient::new(http, SharedClock::system())), seen)
}

fn request() -> RefreshRequest {
    RefreshRequest::new("rt-1", "http://127.0.0.1:9")
        .scope("read write")
        .client(stored_client(&discovery(), &registration()))
}

async fn run(
    answer: impl Fn() -> Result<HttpResponse, mcp_oauth::Error> + Send + Sync + 'static,
) -> Result<token_storage::TokenResponse, RefreshError> {
    let (r, _) = refresher(answer);
    r.refresh(&TokenKey::new("t", "u", "s"), &request()).await
}

fn oauth_error(status: u16, code: &str) -> HttpResponse {
    HttpResponse::json(status, &serde_json::json!({ "error": code, "error_description": "why" }))
}

#[tokio::test]
async fn sends_scope_resource_and_refresh_token_and_converts_the_response() {
    let (r, seen) = refresher(|| {
        Ok(HttpResponse::json(
            200,
            &serde_json::json!({
                "access_token": "at-2", "token_type": "bearer", "expires_in": 600,
                "refresh_token": "rt-2", "scope": "read write"
            }),
        ))
    });
    let out = r.refresh(&TokenKey::new("t", "u", "s"), &request()).await.unwrap();
    assert_eq!(out.access_token.expose(), "at-2");
    assert_eq!(out.refresh_token.as_ref().unwrap().expose(), "rt-2");
    assert_eq!(out.expires_in, Some(Duration::from_secs(600)));
    assert_eq!(out.scope.as_deref(), Some("read write"));

    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    let req = &seen[0];
    assert_eq!(req.url.as_str(), "http://127.0.0.1:9/token");
    assert_eq!(req.form_value("grant_type").as_deref(), Some("refresh_token"));
    assert_eq!(req.form_value("refresh_token").as_deref(), Some("rt-1"));
    assert_eq!(req.form_value("scope").as_deref(), Some("read write"));
    assert_eq!(req.form_value("resource").as_deref(), Some("http://127.0.0.1:9/mcp"));
    assert_eq!(req.form_value("client_id").as_deref(), Some("client-1"));
}

#[tokio::test]
async fn terminal_codes_keep_their_code() {
    for (code, want) in [
        ("invalid_grant", TerminalCode::InvalidGrant),
        ("invalid_client", TerminalCode::InvalidClient),
        ("unauthorized_client", TerminalCode::UnauthorizedClient),
    ] {
        let err = run(move || Ok(oauth_error(400, code))).await.unwrap_err();
        assert!(
            matches!(&err, RefreshError::Terminal { code: c, description } if *c == want && description.as_deref() == Some("why")),
            "{code}: {err:?}"
        );
    }
}

#[tokio::test]
async fn other_refusals_are_terminal_not_retried() {
    for response in [
        oauth_error(400, "invalid_scope"),
        oauth_error(400, "invalid_request"),
        HttpResponse::new(400),
        HttpResponse::new(401),
        // A 200 that does not parse: the server may have rotated already; never redeem again.
        HttpResponse::new(200).with_body(b"not json"),
        HttpResponse::json(200, &serde_json::json!({ "access_token": "x", "token_type": "mac" })),
    ] {
        let status = response.status;
        let err = run(move || Ok(response.clone())).await.unwrap_err();
        assert!(
            matches!(err, RefreshError::Terminal { code: TerminalCode::InvalidGrant, .. }),
            "{status}: {err:?}"
        );
    }
}

#[tokio::test]
async fn server_errors_rate_limits_and_unavailability_are_transient() {
    let cases: Vec<(HttpResponse, TransientKind, Option<Duration>)> = vec![
        (HttpResponse::new(503), TransientKind::ServerError(503), None),
        (
            HttpResponse::new(502).with_header("retry-after", "3"),
            TransientKind::ServerError(502),
            Some(Duration::from_secs(3)),
        ),
        (oauth_error(500, "server_error"), TransientKind::ServerError(500), None),
        (oauth_error(400, "server_error"), TransientKind::ServerError(500), None),
        (
            HttpResponse::new(429).with_header("retry-after", "7"),
            TransientKind::RateLimited,
            Some(Duration::from_secs(7)),
        ),
        (
            oauth_error(429, "slow_down").with_header("retry-after", "2"),
            TransientKind::RateLimited,
            Some(Duration::from_secs(2)),
        ),
        (
            oauth_error(400, "temporarily_unavailable").with_header("retry-after", "5"),
            TransientKind::TemporarilyUnavailable,
            Some(Duration::from_secs(5)),
        ),
    ];
    for (response, kind, retry) in cases {
        let status = response.status;
        let err = run(move || Ok(response.clone())).await.unwrap_err();
        assert!(
            matches!(&err, RefreshError::Transient { kind: k, retry_after, .. } if *k == kind && *retry_after == retry),
            "{status}: {err:?}"
        );
    }
}

/// Issue 12: a token request that may have reached the server and got no answer (a timeout, a
/// connection reset after sending) is `Unanswered`, in doubt: the server may have rotated the
/// refresh token, so token-storage records it and allows one same-token retry. Only a request
/// that never left (no connection) is `Network`, retried as if never sent. Real sockets on
/// 127.0.0.1 through the hardened reqwest client: a closed port refuses the connection; a
/// server that reads the request and closes without answering is the lost answer.
#[tokio::test]
async fn a_request_that_may_have_reached_the_server_is_unanswered_not_network() {
    let err = run(|| {
        Err(mcp_oauth::Error::Timeout {
            url: "http://127.0.0.1:9/token".into(),
            timeout: Duration::from_secs(1),
        })
    })
    .await
    .unwrap_err();
    assert!(
        matches!(err, RefreshError::Transient { kind: TransientKind::Unanswered, .. }),
        "{err:?}"
    );
    assert!(err.may_have_acted());

    let over_http = |port: u16| {
        let mut discovery = serde_json::to_value(discovery()).unwrap();
        discovery["authorization_server"]["token_endpoint"] =
            format!("http://127.0.0.1:{port}/token").into();
        let discovery: Discovery = serde_json::from_value(discovery).unwrap();
        let http = mcp_oauth::ReqwestHttpClient::new(mcp_oauth::HttpPolicy::default()).unwrap();
        let refresher = OAuthRefresher::new(OAuthClient::new(http, SharedClock::system()));
        let request = RefreshRequest::new("rt-1", "http://127.0.0.1:9")
            .client(stored_client(&discovery, &registration()));
        async move { refresher.refresh(&TokenKey::new("t", "u", "s"), &request).await }
    };

    // Nothing listens: the connection is refused, the request never left.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let err = over_http(port).await.unwrap_err();
    assert!(matches!(err, RefreshError::Transient { kind: TransientKind::Network, .. }), "{err:?}");
    assert!(!err.may_have_acted());

    // The server reads the whole request, then closes without answering.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let (socket, _) = listener.accept().await.unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains("rt-1") {
            socket.readable().await.unwrap();
            match socket.try_read(&mut buf) {
                Ok(0) => panic!("the request ended before its body"),
                Ok(n) => seen.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        drop(socket); // acted, then the answer is lost
    });
    let err = over_http(port).await.unwrap_err();
    server.await.unwrap();
    assert!(
        matches!(err, RefreshError::Transient { kind: TransientKind::Unanswered, .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_cancelled_request_is_not_retried() {
    let err = run(|| Err(mcp_oauth::Error::Cancelled { url: "http://127.0.0.1:9/token".into() }))
        .await
        .unwrap_err();
    assert!(matches!(err, RefreshError::Terminal { .. }), "{err:?}");
}

#[tokio::test]
async fn without_a_stored_registration_nothing_is_sent() {
    let (r, seen) = refresher(|| Ok(HttpResponse::new(200)));
    let bare = RefreshRequest::new("rt-1", "http://127.0.0.1:9");
    let err = r.refresh(&TokenKey::new("t", "u", "s"), &bare).await.unwrap_err();
    assert!(matches!(err, RefreshError::Terminal { code: TerminalCode::InvalidGrant, .. }));
    assert!(seen.lock().unwrap().is_empty());

    // A registration stored without discovery metadata is not enough either.
    let plain = RefreshRequest::new("rt-1", "http://127.0.0.1:9")
        .client(token_storage::ClientRegistration::new("client-1", "http://127.0.0.1:9"));
    assert!(r.refresh(&TokenKey::new("t", "u", "s"), &plain).await.is_err());
    assert!(seen.lock().unwrap().is_empty());
}

#[test]
fn the_stored_client_keeps_secrets_out_of_debug() {
    let mut reg = registration();
    reg.client_secret = Some(mcp_oauth::ClientSecret::new("s3cret-value"));
    reg.auth_method = mcp_oauth::TokenEndpointAuthMethod::ClientSecretPost;
    let stored = stored_client(&discovery(), &reg);
    assert_eq!(stored.token_endpoint_auth_method, "client_secret_post");
    assert_eq!(stored.client_secret.as_ref().unwrap().expose(), "s3cret-value");
    assert!(!format!("{stored:?}").contains("s3cret-value"));
}

#[tokio::test]
async fn a_confidential_client_authenticates_with_its_stored_secret() {
    let mut reg = registration();
    reg.client_secret = Some(mcp_oauth::ClientSecret::new("s3cret-value"));
    reg.auth_method = mcp_oauth::TokenEndpointAuthMethod::ClientSecretPost;
    let (r, seen) = refresher(|| Ok(oauth_error(400, "invalid_grant")));
    let req =
        RefreshRequest::new("rt-1", "http://127.0.0.1:9").client(stored_client(&discovery(), &reg));
    assert!(r.refresh(&TokenKey::new("t", "u", "s"), &req).await.is_err());
    let seen = seen.lock().unwrap();
    assert_eq!(seen[0].form_value("client_secret").as_deref(), Some("s3cret-value"));
}

/// A test-only EC P-256 key (PKCS#8).
const TEST_KEY_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgPgCZ+zY/Qk6Q/CAT
XY9V/PuXKW/EqDeNVl/v6PrE1GmhRANCAARAao1TfTTf784PxaC+gS5JTXfPFtdw
yliqImdfQPj8y0KAc3bmRPsA4VAM+eU6a26HpJ+AHzMic52ZjjiYQFo+
-----END PRIVATE KEY-----
";

/// A private_key_jwt client: its key is stored (sealed, redacted, never in `metadata`), comes
/// back through token storage, and the refresh signs a client assertion with it.
#[tokio::test]
async fn a_private_key_jwt_client_refreshes_from_the_store() {
    let mut reg = registration();
    let mut key = mcp_oauth::ClientSigningKey::es256(TEST_KEY_PEM);
    key.key_id = Some("kid-1".into());
    reg.client_key = Some(key);
    reg.auth_method = mcp_oauth::TokenEndpointAuthMethod::PrivateKeyJwt;
    let stored = stored_client(&discovery(), &reg);
    assert_eq!(stored.token_endpoint_auth_method, "private_key_jwt");
    let pem_line = "XY9V/PuXKW/EqDeNVl/v6PrE1GmhRANCAARAao1TfTTf784PxaC+gS5JTXfPFtdw";
    assert!(!format!("{stored:?}").contains(pem_line), "the key shows in Debug");
    assert!(!stored.metadata.to_string().contains(pem_line), "the key is in metadata");

    // Through token storage (sealed at rest) and back.
    let storage = token_storage::TokenStorage::builder(
        token_storage::MemoryTokenStore::new().into(),
        Arc::new(token_storage::Keyring::parse(&"42".repeat(32)).unwrap()),
        Arc::new(refresher(|| Ok(oauth_error(400, "invalid_grant"))).0),
    )
    .build();
    let tkey = TokenKey::new("t", "u", "s");
    storage.store_client(&tkey, &stored).await.unwrap();
    let back = storage.client(&tkey).await.unwrap().unwrap();

    let (r, seen) = refresher(|| Ok(oauth_error(400, "invalid_grant")));
    let req = RefreshRequest::new("rt-1", "http://127.0.0.1:9").client(back);
    assert!(matches!(
        r.refresh(&tkey, &req).await,
        Err(RefreshError::Terminal { code: TerminalCode::InvalidGrant, .. })
    ));
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1, "the grant was sent");
    assert_eq!(
        seen[0].form_value("client_assertion_type").as_deref(),
        Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
    );
    let assertion = seen[0].form_value("client_assertion").expect("a signed client assertion");
    assert_eq!(assertion.split('.').count(), 3, "a JWS");
    assert!(seen[0].form_value("client_secret").is_none(), "the PEM is never sent");
}

/// A DPoP-bound refresh token is presented only with a proof by its key: with the key stored,
/// the grant carries a `DPoP` proof and a `DPoP` answer is accepted; without it, the refresh
/// fails for good before anything is sent (never presented as a bare bearer refresh token).
#[tokio::test]
async fn a_dpop_bound_refresh_token_goes_only_with_its_key() {
    let key = mcp_oauth::DpopKey::generate().unwrap();
    let pem = token_storage::Secret::new(key.to_pkcs8_pem().unwrap().secret());
    let (r, seen) = refresher(|| {
        Ok(HttpResponse::json(
            200,
            &serde_json::json!({"access_token": "at-2", "token_type": "DPoP", "refresh_token": "rt-2"}),
        ))
    });
    let tokens = r
        .refresh(&TokenKey::new("t", "u", "s"), &request().dpop_key(Some(pem), true))
        .await
        .unwrap();
    assert_eq!(tokens.token_type, "DPoP");
    let proof = seen.lock().unwrap()[0].header("dpop").map(str::to_owned);
    assert_eq!(proof.map(|p| p.split('.').count()), Some(3), "a proof went with the grant");

    let (r, seen) = refresher(|| Ok(HttpResponse::new(500)));
    let err = r
        .refresh(&TokenKey::new("t", "u", "s"), &request().dpop_key(None, true))
        .await
        .unwrap_err();
    assert!(matches!(err, RefreshError::Terminal { .. }), "{err:?}");
    assert!(seen.lock().unwrap().is_empty(), "nothing was sent");
}
