//! End-to-end tests of the OAuth client against the hostile fixture servers of `mcp-fixtures`,
//! over real HTTP on 127.0.0.1: the axum authorization server (with its knobs and counters) and
//! the rmcp streamable-HTTP resource server behind bearer authentication.
//!
//! Every request the client sends goes through `ReqwestHttpClient` wrapped in a recorder, so a
//! test can also assert on what was sent (`resource` on every token request, `scope` on
//! refresh). MCP calls are plain JSON-RPC POSTs through the same reqwest client, so the tests
//! see the resource server's 401 and 403 challenges as a client would. The TRACE-level log
//! capture lives in `fixtures_logs.rs`, alone in its binary so that no concurrent test races
//! the subscriber.

use crate::e2e;
use crate::support;

use std::time::Duration;

use e2e::{
    Env, Mcp, REDIRECT, Session, challenge_of, initialize, mcp_post, oauth_error, pre_registered,
    tool_text,
};
use mcp_clock::SharedClock;
use mcp_fixtures::{
    Approval, AuthEventKind, AuthServer, ClientAuth, ClientSpec, Fixtures, InjectedFailure,
    RedirectIss, ResourceServer,
};
use mcp_oauth::{
    AuthAttempts, CallbackParams, ClientConfig, Error, ErrorClass, HttpPolicy, MetadataSource,
    OAuthClient, RegistrationSource, ReqwestHttpClient, Revocation, TokenEndpointAuthMethod,
    select_scope,
};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use url::Url;

// ---------------------------------------------------------------------------------------------
// Discovery

#[tokio::test(flavor = "current_thread")]
async fn discovery_starts_from_the_resource_servers_real_401() {
    let env = Env::start().await;
    let challenge = env.first_401().await;
    assert_eq!(
        challenge.resource_metadata.as_deref(),
        Some(env.fx.resource().resource_metadata_url())
    );
    assert_eq!(challenge.scope.as_deref(), Some("mcp:tools"));

    let discovery = env.client.discover(&env.server, Some(&challenge)).await.unwrap();
    assert_eq!(discovery.source, MetadataSource::OAuth);
    assert_eq!(discovery.issuer(), env.fx.auth().issuer());
    assert_eq!(discovery.resource, env.fx.resource().url());
    let asm = &discovery.authorization_server;
    assert_eq!(asm.token_endpoint.as_ref().unwrap().as_str(), env.fx.auth().token_endpoint());
    assert!(asm.authorization_response_iss_parameter_supported);
    assert!(asm.client_id_metadata_document_supported);

    // The challenge's metadata URL first, then the root RFC 8414 document; nothing else.
    let gets: Vec<String> =
        env.rec.sent().iter().filter(|s| s.method == "GET").map(|s| s.url.to_string()).collect();
    assert_eq!(
        gets,
        [env.fx.resource().resource_metadata_url().to_owned(), env.fx.auth().metadata_url()]
    );
}

#[tokio::test(flavor = "current_thread")]
async fn discovery_finds_a_path_aware_issuer_by_path_insertion() {
    let auth = AuthServer::builder().issuer_path("/tenant1").spawn().await.unwrap();
    let resource = ResourceServer::builder(&auth).spawn().await.unwrap();
    let env = Env::with(Fixtures::from_parts(auth, resource), HttpPolicy::default());
    let (_, discovery) = env.discover().await;
    assert!(discovery.issuer().ends_with("/tenant1"));
    assert_eq!(discovery.issuer(), env.fx.auth().issuer());
    assert_eq!(discovery.source, MetadataSource::OAuth);
    let last_get = env.rec.sent().into_iter().rfind(|s| s.method == "GET").unwrap();
    assert_eq!(last_get.url.path(), "/.well-known/oauth-authorization-server/tenant1");

    // And the endpoints under the path work: a full login against the tenant.
    let registration =
        env.client.register(&discovery, &ClientConfig::new("e2e", REDIRECT)).await.unwrap();
    let (_, tokens) = env.login(&discovery, &registration, Some("mcp:tools")).await;
    Mcp::open(&env, tokens.access_token.secret()).await;
}

#[tokio::test(flavor = "current_thread")]
async fn discovery_falls_back_to_openid_for_a_path_aware_issuer() {
    let auth = AuthServer::builder()
        .issuer_path("/tenant2")
        .rfc8414_metadata(false)
        .spawn()
        .await
        .unwrap();
    let resource = ResourceServer::builder(&auth).spawn().await.unwrap();
    let env = Env::with(Fixtures::from_parts(auth, resource), HttpPolicy::default());
    let (_, discovery) = env.discover().await;
    assert_eq!(discovery.source, MetadataSource::OpenIdConnect);
    assert_eq!(discovery.issuer(), env.fx.auth().issuer());
    let tried: Vec<String> = env
        .rec
        .sent()
        .iter()
        .filter(|s| s.method == "GET")
        .skip(1)
        .map(|s| s.url.path().to_owned())
        .collect();
    assert_eq!(
        tried,
        [
            "/.well-known/oauth-authorization-server/tenant2",
            "/.well-known/openid-configuration/tenant2"
        ]
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_resource_server_advertising_another_resource_is_refused() {
    let auth = AuthServer::builder().spawn().await.unwrap();
    let resource = ResourceServer::builder(&auth)
        .advertised_resource("http://127.0.0.1:1/someone-else")
        .spawn()
        .await
        .unwrap();
    let env = Env::with(Fixtures::from_parts(auth, resource), HttpPolicy::default());
    let challenge = env.first_401().await;
    let err = env.client.discover(&env.server, Some(&challenge)).await.unwrap_err();
    match &err {
        Error::ResourceMismatch { server, found } => {
            assert_eq!(server, env.fx.resource().url());
            assert_eq!(found, "http://127.0.0.1:1/someone-else");
        }
        other => panic!("expected ResourceMismatch, got {other:?}"),
    }
    assert_eq!(env.fx.auth().stats().authorization_requests, 0);
}

#[tokio::test(flavor = "current_thread")]
async fn an_authorization_server_naming_another_issuer_is_refused() {
    // Protected-resource metadata (served here) names the fixture by `localhost`; the fixture's
    // metadata says its issuer is `127.0.0.1`, which is a different issuer identifier.
    let fx = Fixtures::start().await.unwrap();
    let port = Url::parse(fx.auth().issuer()).unwrap().port().unwrap();
    let claimed = format!("http://localhost:{port}");
    let prm = support::serve(move |_, base| {
        support::Reply::json(
            200,
            json!({"resource": format!("{base}/mcp"), "authorization_servers": [claimed]}),
        )
    })
    .await;
    let env = Env::with(fx, HttpPolicy::default());
    let server: Url = format!("{}/mcp", prm.base).parse().unwrap();
    let err = env.client.discover(&server, None).await.unwrap_err();
    match &err {
        Error::IssuerMismatch { expected, found } => {
            assert_eq!(expected, &format!("http://localhost:{port}"));
            assert_eq!(found, env.fx.auth().issuer());
        }
        other => panic!("expected IssuerMismatch, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Registration

#[tokio::test(flavor = "current_thread")]
async fn dynamic_registration_then_a_tool_call() {
    let env = Env::start().await;
    let s = env.logged_in().await;
    assert_eq!(s.registration.source, RegistrationSource::Dynamic);
    assert_eq!(s.registration.auth_method, TokenEndpointAuthMethod::None);
    assert_eq!(env.fx.auth().stats().registrations, 1);
    assert_eq!(s.scope.as_deref(), Some("mcp:tools offline_access"));
    let mut mcp = Mcp::open(&env, s.access()).await;
    assert_eq!(tool_text(&mcp.call_tool(s.access(), "echo", json!({"text": "hi"})).await), "hi");
    assert_eq!(env.fx.resource().stats().tool_calls.get("echo"), Some(&1));
}

#[tokio::test(flavor = "current_thread")]
async fn client_id_metadata_document_served_on_loopback() {
    let doc_server = support::serve(|_, base| {
        support::Reply::json(
            200,
            json!({
                "client_id": format!("{base}/client.json"),
                "client_name": "e2e via CIMD",
                "redirect_uris": [REDIRECT],
                "grant_types": ["authorization_code", "refresh_token"],
                "response_types": ["code"],
                "token_endpoint_auth_method": "none",
            }),
        )
    })
    .await;
    let env = Env::start().await;
    let (challenge, discovery) = env.discover().await;
    let mut config = ClientConfig::new("e2e", REDIRECT);
    let doc_url: Url = format!("{}/client.json", doc_server.base).parse().unwrap();
    config.metadata_document_url = Some(doc_url.clone());
    let registration = env.client.register(&discovery, &config).await.unwrap();
    assert_eq!(registration.source, RegistrationSource::MetadataDocument);
    assert_eq!(registration.client_id, doc_url.as_str());

    let scope = select_scope(Some(&challenge), &discovery);
    let (_, tokens) = env.login(&discovery, &registration, scope.as_deref()).await;
    let stats = env.fx.auth().stats();
    assert_eq!(stats.client_metadata_fetches, 1);
    assert_eq!(stats.registrations, 0);
    assert!(doc_server.paths().iter().all(|p| p == "GET /client.json"));
    // The refresh grant works for the document-identified client too.
    let refreshed = env
        .client
        .refresh(
            &discovery,
            &registration,
            tokens.refresh_token.as_ref().unwrap(),
            scope.as_deref(),
        )
        .await
        .unwrap();
    Mcp::open(&env, refreshed.access_token.secret()).await;
}

#[tokio::test(flavor = "current_thread")]
async fn pre_registered_clients_with_each_authentication_method() {
    use TokenEndpointAuthMethod as M;
    let env = Env::start().await;
    let (challenge, discovery) = env.discover().await;
    let scope = select_scope(Some(&challenge), &discovery);
    for (auth, method) in [
        (ClientAuth::None, M::None),
        (ClientAuth::ClientSecretBasic, M::ClientSecretBasic),
        (ClientAuth::ClientSecretPost, M::ClientSecretPost),
    ] {
        let client =
            env.fx.auth().register_client(ClientSpec::new(auth).redirect_uri(REDIRECT)).unwrap();
        let config = pre_registered(
            env.fx.auth().issuer(),
            client.client_id(),
            client.client_secret(),
            method,
        );
        let registration = env.client.register(&discovery, &config).await.unwrap();
        assert_eq!(registration.source, RegistrationSource::PreRegistered);
        assert_eq!(registration.auth_method, method);
        let (_, tokens) = env.login(&discovery, &registration, scope.as_deref()).await;
        let refreshed = env
            .client
            .refresh(
                &discovery,
                &registration,
                tokens.refresh_token.as_ref().unwrap(),
                scope.as_deref(),
            )
            .await
            .unwrap();
        Mcp::open(&env, refreshed.access_token.secret()).await;

        // What went over the wire for this client's last token request.
        let last = env.rec.posts_to(env.fx.auth().token_endpoint()).pop().unwrap();
        assert_eq!(last.form_value("client_secret").is_some(), method == M::ClientSecretPost);
        assert_eq!(last.form_value("client_id").is_some(), method != M::ClientSecretBasic);
    }
    assert_eq!(env.fx.auth().stats().registrations, 0);
}

#[tokio::test(flavor = "current_thread")]
async fn a_wrong_authentication_method_is_a_terminal_stale_registration() {
    let env = Env::start().await;
    let (_, discovery) = env.discover().await;
    let client = env
        .fx
        .auth()
        .register_client(ClientSpec::new(ClientAuth::ClientSecretBasic).redirect_uri(REDIRECT))
        .unwrap();
    // Registered for client_secret_basic; configured (wrongly) for client_secret_post.
    let config = pre_registered(
        env.fx.auth().issuer(),
        client.client_id(),
        client.client_secret(),
        TokenEndpointAuthMethod::ClientSecretPost,
    );
    let registration = env.client.register(&discovery, &config).await.unwrap();
    let err = env
        .client
        .client_credentials(&discovery, &registration, Some("mcp:tools"))
        .await
        .unwrap_err();
    assert_eq!(oauth_error(&err), (401, "invalid_client"));
    assert_eq!(err.class(), ErrorClass::Terminal);
    assert!(err.is_stale_registration());

    // A wrong secret with the right method: the same classification.
    let config = pre_registered(
        env.fx.auth().issuer(),
        client.client_id(),
        Some("not-the-secret"),
        TokenEndpointAuthMethod::ClientSecretBasic,
    );
    let registration = env.client.register(&discovery, &config).await.unwrap();
    let err = env.client.client_credentials(&discovery, &registration, None).await.unwrap_err();
    assert_eq!(oauth_error(&err).1, "invalid_client");
    assert!(err.is_stale_registration());
    assert_eq!(err.class(), ErrorClass::Terminal);

    // What the caller does next: drop the registration and register again.
    let fresh = env.client.register(&discovery, &ClientConfig::new("e2e", REDIRECT)).await.unwrap();
    assert_eq!(fresh.source, RegistrationSource::Dynamic);
    let (_, tokens) = env.login(&discovery, &fresh, Some("mcp:tools")).await;
    Mcp::open(&env, tokens.access_token.secret()).await;
}

#[tokio::test(flavor = "current_thread")]
async fn offline_access_is_what_earns_a_refresh_token_where_the_server_requires_it() {
    let env = Env::start().await;
    env.fx.auth().knobs().set_refresh_requires_offline_access(true);
    // select_scope adds offline_access because the server lists it: a refresh token comes back.
    let s = env.logged_in().await;
    assert!(s.scope.as_deref().unwrap().split(' ').any(|x| x == "offline_access"));
    assert!(s.tokens.refresh_token.is_some());
    // Without it the response has no refresh token, which is reported as None, not an error.
    let (_, tokens) = env.login(&s.discovery, &s.registration, Some("mcp:tools")).await;
    assert_eq!(tokens.refresh_token, None);
    Mcp::open(&env, tokens.access_token.secret()).await;
}

// ---------------------------------------------------------------------------------------------
// Authorization

#[tokio::test(flavor = "current_thread")]
async fn authorization_code_with_pkce_state_iss_and_resource_everywhere() {
    let env = Env::start().await;
    let (challenge, discovery, registration) = env.discover_and_register().await;
    let scope = select_scope(Some(&challenge), &discovery);
    let (url, pending) = env
        .client
        .authorization_url(&discovery, &registration, REDIRECT, scope.as_deref())
        .unwrap();
    let q = |n: &str| url.query_pairs().find(|(k, _)| k == n).map(|(_, v)| v.into_owned());
    assert_eq!(q("code_challenge_method").as_deref(), Some("S256"));
    assert_eq!(q("resource").as_deref(), Some(env.fx.resource().url()));
    assert!(q("state").unwrap().len() >= 22, "at least 128 bits of state");

    let callback = env.client.authorize_without_browser(&url).await.unwrap();
    assert_eq!(callback.iss.as_deref(), Some(env.fx.auth().issuer()));
    assert_eq!(callback.state.as_ref().unwrap().secret(), pending.state.secret());

    // A tampered iss, a missing iss and a foreign state are refused before any token request.
    let mut wrong_iss = callback.clone();
    wrong_iss.iss = Some("http://127.0.0.1:1".into());
    let err = env
        .client
        .exchange_code(&discovery, &registration, &pending, &wrong_iss)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::IssuerMismatch { .. }), "{err:?}");
    let mut no_iss = callback.clone();
    no_iss.iss = None;
    let err =
        env.client.exchange_code(&discovery, &registration, &pending, &no_iss).await.unwrap_err();
    assert!(matches!(err, Error::IssuerMismatch { .. }), "{err:?}");
    let mut wrong_state = callback.clone();
    wrong_state.state = Some(mcp_oauth::CsrfState::new("forged"));
    let err = env
        .client
        .exchange_code(&discovery, &registration, &pending, &wrong_state)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::UnknownState), "{err:?}");
    assert_eq!(env.fx.auth().stats().authorization_code_requests, 0);

    // A wrong PKCE verifier is refused by the server.
    let mut forged = pending.clone();
    forged.verifier = mcp_oauth::PkceVerifier::new("x".repeat(64));
    let err =
        env.client.exchange_code(&discovery, &registration, &forged, &callback).await.unwrap_err();
    assert_eq!(oauth_error(&err).1, "invalid_grant");
    // The code is bound to the real verifier: the exchange with it succeeds.
    let tokens =
        env.client.exchange_code(&discovery, &registration, &pending, &callback).await.unwrap();
    let s = Session { discovery, registration, scope, tokens };
    let refreshed = env
        .client
        .refresh(&s.discovery, &s.registration, &s.refresh_token(), s.scope.as_deref())
        .await
        .unwrap();
    Mcp::open(&env, refreshed.access_token.secret()).await;

    // RFC 8707: every token request carried the resource.
    let token_posts = env.rec.posts_to(env.fx.auth().token_endpoint());
    assert_eq!(token_posts.len(), 3);
    for post in &token_posts {
        assert_eq!(post.form_value("resource"), Some(env.fx.resource().url()), "{post:?}");
    }
    assert!(token_posts.iter().any(|p| p.form_value("code_verifier").is_some()));
}

#[tokio::test(flavor = "current_thread")]
async fn the_server_refuses_a_changed_resource() {
    let env = Env::start().await;
    let s = env.logged_in().await;
    let mut moved = s.discovery.clone();
    moved.resource = format!("{}/elsewhere", env.fx.resource().base_url());
    let err = env
        .client
        .refresh(&moved, &s.registration, &s.refresh_token(), s.scope.as_deref())
        .await
        .unwrap_err();
    assert_eq!(oauth_error(&err), (400, "invalid_target"));
    assert_eq!(err.class(), ErrorClass::Terminal);

    // The same on the code exchange: the resource differs from the authorization request's.
    let (url, mut pending) = env
        .client
        .authorization_url(&s.discovery, &s.registration, REDIRECT, s.scope.as_deref())
        .unwrap();
    let callback = env.client.authorize_without_browser(&url).await.unwrap();
    pending.resource = moved.resource.clone();
    let err = env
        .client
        .exchange_code(&s.discovery, &s.registration, &pending, &callback)
        .await
        .unwrap_err();
    assert_eq!(oauth_error(&err), (400, "invalid_target"));
}

#[tokio::test(flavor = "current_thread")]
async fn an_expired_token_gets_a_challenge_even_as_400_and_refresh_recovers() {
    let env = Env::start().await;
    env.fx.auth().knobs().set_access_token_lifetime(Duration::from_secs(60));
    let s = env.logged_in().await;
    let mut mcp = Mcp::open(&env, s.access()).await;
    // The server's clock jumps past the access token's lifetime, mid-session.
    env.fx.auth().knobs().set_clock_offset_millis(61_000);
    let resp = mcp.request(s.access(), "tools/list", json!({})).await;
    assert_eq!(resp.status, 401);
    let challenge = challenge_of(&resp);
    assert_eq!(challenge.error.as_deref(), Some("invalid_token"));
    assert_eq!(challenge.error_description.as_deref(), Some("the access token expired"));
    // Servers that answer 400 instead still send a challenge the client can read.
    env.fx.auth().knobs().set_expired_token_status(400);
    let resp = mcp.request(s.access(), "tools/list", json!({})).await;
    assert_eq!(resp.status, 400);
    assert_eq!(challenge_of(&resp).error.as_deref(), Some("invalid_token"));
    // Rediscovery from that challenge finds the same server, and a refresh recovers.
    let again = env.client.discover(&env.server, Some(&challenge)).await.unwrap();
    assert_eq!(again, s.discovery);
    let refreshed = env
        .client
        .refresh(&s.discovery, &s.registration, &s.refresh_token(), s.scope.as_deref())
        .await
        .unwrap();
    let resp = mcp.request(refreshed.access_token.secret(), "tools/list", json!({})).await;
    assert_eq!(resp.status, 200);
}

#[tokio::test(flavor = "current_thread")]
async fn explicit_approval_by_the_test() {
    let env = Env::start().await;
    env.fx.auth().knobs().set_approval(Approval::Manual);
    let (challenge, discovery, registration) = env.discover_and_register().await;
    let scope = select_scope(Some(&challenge), &discovery);
    let (url, pending) = env
        .client
        .authorization_url(&discovery, &registration, REDIRECT, scope.as_deref())
        .unwrap();
    let browser = {
        let client = env.client.clone();
        tokio::spawn(async move { client.authorize_without_browser(&url).await })
    };
    let waiting = env.fx.auth().wait_for_pending_authorization().await;
    assert_eq!(waiting.len(), 1);
    assert_eq!(waiting[0].client_id, registration.client_id);
    assert_eq!(waiting[0].resource.as_deref(), Some(env.fx.resource().url()));
    assert_eq!(Some(waiting[0].scope.as_str()), scope.as_deref());
    assert_eq!(env.fx.auth().approve_pending().unwrap(), 1);
    let callback: CallbackParams = browser.await.unwrap().unwrap();
    let tokens =
        env.client.exchange_code(&discovery, &registration, &pending, &callback).await.unwrap();
    Mcp::open(&env, tokens.access_token.secret()).await;

    // A denial comes back as a typed error.
    let (url, pending) = env
        .client
        .authorization_url(&discovery, &registration, REDIRECT, scope.as_deref())
        .unwrap();
    let browser = {
        let client = env.client.clone();
        tokio::spawn(async move { client.authorize_without_browser(&url).await })
    };
    env.fx.auth().wait_for_pending_authorization().await;
    env.fx.auth().deny_pending().unwrap();
    let callback = browser.await.unwrap().unwrap();
    let err =
        env.client.exchange_code(&discovery, &registration, &pending, &callback).await.unwrap_err();
    assert!(
        matches!(&err, Error::AuthorizationDenied { error, .. } if error == "access_denied"),
        "{err:?}"
    );
    let stats = env.fx.auth().stats();
    assert_eq!((stats.authorizations_approved, stats.authorizations_denied), (1, 1));
}

// ---------------------------------------------------------------------------------------------
// Refresh

#[tokio::test(flavor = "current_thread")]
async fn refresh_rotation_with_strict_reuse_detection() {
    let env = Env::start().await;
    env.fx.auth().knobs().set_reuse_detection(true);
    let s = env.logged_in().await;
    let first = s.refresh_token();
    let r1 = env
        .client
        .refresh(&s.discovery, &s.registration, &first, s.scope.as_deref())
        .await
        .unwrap();
    let second = r1.refresh_token.clone().expect("rotated");
    assert_ne!(second.secret(), first.secret());
    let r2 = env
        .client
        .refresh(&s.discovery, &s.registration, &second, s.scope.as_deref())
        .await
        .unwrap();
    Mcp::open(&env, r2.access_token.secret()).await;
    assert_eq!(env.fx.auth().stats().max_refresh_redemptions(), 1);

    // Redeeming the rotated token again: invalid_grant, terminal, and the family is gone.
    let err = env
        .client
        .refresh(&s.discovery, &s.registration, &first, s.scope.as_deref())
        .await
        .unwrap_err();
    assert_eq!(oauth_error(&err), (400, "invalid_grant"));
    assert_eq!(err.class(), ErrorClass::Terminal);
    assert!(!err.is_stale_registration());
    let stats = env.fx.auth().stats();
    assert_eq!(stats.reuse_detections, 1);
    assert_eq!(stats.families_revoked, 1);
    assert_eq!(stats.max_refresh_redemptions(), 2);
    assert!(
        env.fx
            .auth()
            .events()
            .iter()
            .any(|e| matches!(e.kind, AuthEventKind::ReuseDetected { family_revoked: true, .. }))
    );
    // Every token of the family is dead: the newest access token and refresh token too.
    let resp =
        mcp_post(&env.rec.inner, &env.server, Some(r2.access_token.secret()), None, initialize())
            .await;
    assert_eq!(resp.status, 401);
    assert_eq!(challenge_of(&resp).error.as_deref(), Some("invalid_token"));
    let latest = r2.refresh_token.unwrap();
    let err = env
        .client
        .refresh(&s.discovery, &s.registration, &latest, s.scope.as_deref())
        .await
        .unwrap_err();
    assert_eq!(oauth_error(&err).1, "invalid_grant");
}

#[tokio::test(flavor = "current_thread")]
async fn entra_style_scope_on_refresh_is_sent() {
    let env = Env::start().await;
    env.fx.auth().knobs().set_require_scope_on_refresh(true);
    let s = env.logged_in().await;
    let refreshed = env
        .client
        .refresh(&s.discovery, &s.registration, &s.refresh_token(), s.scope.as_deref())
        .await
        .unwrap();
    let sent = env.rec.posts_to(env.fx.auth().token_endpoint()).pop().unwrap();
    assert_eq!(sent.form_value("scope"), s.scope.as_deref());
    assert_eq!(refreshed.scope, s.scope);
    // The knob is live: without a scope the server refuses.
    let rt = refreshed.refresh_token.unwrap();
    let err = env.client.refresh(&s.discovery, &s.registration, &rt, None).await.unwrap_err();
    assert_eq!(oauth_error(&err), (400, "invalid_request"));
}

#[tokio::test(flavor = "current_thread")]
async fn refresh_without_a_new_refresh_token_keeps_the_old_one() {
    let env = Env::start().await;
    env.fx.auth().knobs().set_omit_refresh_on_refresh(true);
    let s = env.logged_in().await;
    let rt = s.refresh_token();
    let r1 =
        env.client.refresh(&s.discovery, &s.registration, &rt, s.scope.as_deref()).await.unwrap();
    assert_eq!(r1.refresh_token, None);
    // The caller keeps the refresh token it has, and it still works.
    let r2 =
        env.client.refresh(&s.discovery, &s.registration, &rt, s.scope.as_deref()).await.unwrap();
    assert_ne!(r1.access_token, r2.access_token);
    Mcp::open(&env, r2.access_token.secret()).await;
}

#[tokio::test(flavor = "current_thread")]
async fn token_response_variants_omitted_or_string_expires_in_and_lowercase_bearer() {
    let env = Env::start().await;
    env.fx.auth().knobs().set_access_token_lifetime(Duration::from_secs(1234));
    let s = env.logged_in().await;
    assert_eq!(s.tokens.expires_in, Some(Duration::from_secs(1234)));
    assert_eq!(s.tokens.token_type, "Bearer");
    assert!(s.tokens.date.is_some(), "axum sends a Date header");
    let knobs = env.fx.auth().knobs();
    let mut rt = s.refresh_token();
    let mut refresh = async || {
        let r = env
            .client
            .refresh(&s.discovery, &s.registration, &rt, s.scope.as_deref())
            .await
            .unwrap();
        rt = r.refresh_token.clone().unwrap();
        Mcp::open(&env, r.access_token.secret()).await;
        r
    };

    knobs.set_omit_expires_in(true);
    assert_eq!(refresh().await.expires_in, None);

    knobs.set_omit_expires_in(false);
    knobs.update(|k| k.expires_in_as_string = true);
    assert_eq!(refresh().await.expires_in, Some(Duration::from_secs(1234)));

    knobs.update(|k| {
        k.expires_in_as_string = false;
        k.lowercase_token_type = true;
    });
    let r = refresh().await;
    assert_eq!(r.token_type, "bearer");
    assert_eq!(r.expires_in, Some(Duration::from_secs(1234)));
}

// ---------------------------------------------------------------------------------------------
// Transient failures

#[tokio::test(flavor = "current_thread")]
async fn injected_5xx_and_429_are_transient() {
    let env = Env::start().await;
    let s = env.logged_in().await;
    let knobs = env.fx.auth().knobs();
    let mut rt = s.refresh_token();

    // The 2nd token request from now gets a 503.
    knobs.fail_token_requests(InjectedFailure::server_error(2));
    let ok =
        env.client.refresh(&s.discovery, &s.registration, &rt, s.scope.as_deref()).await.unwrap();
    rt = ok.refresh_token.unwrap();
    let err = env
        .client
        .refresh(&s.discovery, &s.registration, &rt, s.scope.as_deref())
        .await
        .unwrap_err();
    assert_eq!(oauth_error(&err), (503, "temporarily_unavailable"));
    assert_eq!(err.class(), ErrorClass::Transient);
    assert_eq!(err.retry_after(), None, "no Retry-After was sent");
    // The refresh token was not consumed: retrying later succeeds with it.
    let ok =
        env.client.refresh(&s.discovery, &s.registration, &rt, s.scope.as_deref()).await.unwrap();
    rt = ok.refresh_token.unwrap();

    // A 502, with Retry-After this time.
    knobs.fail_token_requests(
        InjectedFailure::server_error(1).with_status(502).with_retry_after(Duration::from_secs(2)),
    );
    let err = env
        .client
        .refresh(&s.discovery, &s.registration, &rt, s.scope.as_deref())
        .await
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Transient, "{err:?}");
    assert_eq!(err.retry_after(), Some(Duration::from_secs(2)));

    // 429 with Retry-After: transient, and the delay is surfaced.
    knobs.fail_token_requests(InjectedFailure::too_many_requests(1, Duration::from_secs(7)));
    let err = env
        .client
        .refresh(&s.discovery, &s.registration, &rt, s.scope.as_deref())
        .await
        .unwrap_err();
    assert_eq!(oauth_error(&err).0, 429);
    assert_eq!(err.class(), ErrorClass::Transient);
    assert_eq!(err.retry_after(), Some(Duration::from_secs(7)));
    let ok =
        env.client.refresh(&s.discovery, &s.registration, &rt, s.scope.as_deref()).await.unwrap();
    Mcp::open(&env, ok.access_token.secret()).await;

    let stats = env.fx.auth().stats();
    assert_eq!(stats.injected_failures, 3);
    assert_eq!(stats.max_refresh_redemptions(), 1, "no refresh token was redeemed twice");
}

#[tokio::test(flavor = "current_thread")]
async fn a_slow_token_endpoint_times_out() {
    let env = Env::start().await;
    let s = env.logged_in().await;
    // A client with a short timeout, used only against the slowed-down endpoint.
    let policy = HttpPolicy { timeout: Duration::from_millis(300), ..HttpPolicy::default() };
    let impatient =
        OAuthClient::new(ReqwestHttpClient::new(policy).unwrap(), SharedClock::system());
    env.fx.auth().knobs().set_token_delay(Duration::from_secs(10));
    let err = impatient
        .refresh(&s.discovery, &s.registration, &s.refresh_token(), s.scope.as_deref())
        .await
        .unwrap_err();
    match &err {
        Error::Timeout { url, timeout } => {
            assert_eq!(*url, env.fx.auth().token_endpoint());
            assert_eq!(*timeout, Duration::from_millis(300));
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert_eq!(err.class(), ErrorClass::Transient);
}

#[tokio::test(flavor = "current_thread")]
async fn a_hung_token_endpoint_is_abandoned_on_cancellation() {
    let env = Env::start().await;
    let s = env.logged_in().await;
    let knobs = env.fx.auth().knobs();
    knobs.set_token_hang(true);
    let before = env.fx.auth().stats().refresh_token_requests;
    let cancel = CancellationToken::new();
    let client = env.client.clone().with_cancellation(cancel.clone());
    let (d, r, rt, scope) =
        (s.discovery.clone(), s.registration.clone(), s.refresh_token(), s.scope.clone());
    let refresh = tokio::spawn(async move { client.refresh(&d, &r, &rt, scope.as_deref()).await });
    // Wait until the server holds the request, then cancel.
    let arrived = async {
        while env.fx.auth().stats().refresh_token_requests == before {
            mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(5)).await;
        }
    };
    mcp_clock::within(&mcp_clock::SystemClock, Duration::from_secs(10), arrived)
        .await
        .expect("the request arrives");
    assert!(!refresh.is_finished());
    cancel.cancel();
    let outcome = mcp_clock::within(&mcp_clock::SystemClock, Duration::from_secs(10), refresh)
        .await
        .expect("cancelled promptly");
    let err = outcome.unwrap().unwrap_err();
    assert!(
        matches!(&err, Error::Cancelled { url } if *url == env.fx.auth().token_endpoint()),
        "{err:?}"
    );
    assert_eq!(err.class(), ErrorClass::Other);

    // The refresh token is still good once the server answers again.
    knobs.set_token_hang(false);
    env.client
        .refresh(&s.discovery, &s.registration, &s.refresh_token(), s.scope.as_deref())
        .await
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// Machine clients, revocation, step-up

#[tokio::test(flavor = "current_thread")]
async fn client_credentials_grant_for_a_machine_client() {
    let env = Env::start().await;
    let (_, discovery) = env.discover().await;
    let machine =
        env.fx.auth().register_client(ClientSpec::new(ClientAuth::ClientSecretPost)).unwrap();
    let config = pre_registered(
        env.fx.auth().issuer(),
        machine.client_id(),
        machine.client_secret(),
        TokenEndpointAuthMethod::ClientSecretPost,
    );
    let registration = env.client.register(&discovery, &config).await.unwrap();
    let tokens =
        env.client.client_credentials(&discovery, &registration, Some("mcp:tools")).await.unwrap();
    assert_eq!(tokens.refresh_token, None);
    assert_eq!(tokens.scope.as_deref(), Some("mcp:tools"));
    let mut mcp = Mcp::open(&env, tokens.access_token.secret()).await;
    assert_eq!(
        mcp.request(tokens.access_token.secret(), "tools/list", json!({})).await.status,
        200
    );
    let sent = env.rec.posts_to(env.fx.auth().token_endpoint()).pop().unwrap();
    assert_eq!(sent.form_value("grant_type"), Some("client_credentials"));
    assert_eq!(sent.form_value("resource"), Some(env.fx.resource().url()));
    assert_eq!(env.fx.auth().stats().client_credentials_requests, 1);
}

#[tokio::test(flavor = "current_thread")]
async fn revocation_of_refresh_then_access_token() {
    let env = Env::start().await;
    let client = env
        .fx
        .auth()
        .register_client(ClientSpec::new(ClientAuth::ClientSecretBasic).redirect_uri(REDIRECT))
        .unwrap();
    let (challenge, discovery) = env.discover().await;
    let config = pre_registered(
        env.fx.auth().issuer(),
        client.client_id(),
        client.client_secret(),
        TokenEndpointAuthMethod::ClientSecretBasic,
    );
    let registration = env.client.register(&discovery, &config).await.unwrap();
    let scope = select_scope(Some(&challenge), &discovery);
    let (_, tokens) = env.login(&discovery, &registration, scope.as_deref()).await;
    let mut mcp = Mcp::open(&env, tokens.access_token.secret()).await;

    let outcome = env
        .client
        .revoke(
            &discovery,
            &registration,
            tokens.refresh_token.as_ref(),
            Some(&tokens.access_token),
        )
        .await
        .unwrap();
    assert_eq!(outcome, Revocation::Revoked);
    let revokes = env.rec.posts_to(env.fx.auth().revocation_endpoint());
    let hints: Vec<_> = revokes.iter().map(|r| r.form_value("token_type_hint")).collect();
    assert_eq!(hints, [Some("refresh_token"), Some("access_token")]);
    assert_eq!(env.fx.auth().stats().revocations, 2);

    // The resource server now answers 401 mid-session, and the refresh token is dead.
    let resp = mcp.request(tokens.access_token.secret(), "tools/list", json!({})).await;
    assert_eq!(resp.status, 401);
    let challenge = challenge_of(&resp);
    assert_eq!(challenge.error.as_deref(), Some("invalid_token"));
    assert_eq!(
        challenge.resource_metadata.as_deref(),
        Some(env.fx.resource().resource_metadata_url())
    );
    let err = env
        .client
        .refresh(
            &discovery,
            &registration,
            tokens.refresh_token.as_ref().unwrap(),
            scope.as_deref(),
        )
        .await
        .unwrap_err();
    assert_eq!(oauth_error(&err).1, "invalid_grant");
    assert_eq!(err.class(), ErrorClass::Terminal);
}

#[tokio::test(flavor = "current_thread")]
async fn step_up_on_insufficient_scope_for_the_counter_tool() {
    let env = Env::start().await;
    let s = env.logged_in().await;
    let mut attempts = AuthAttempts::new(3);
    attempts.begin().unwrap();
    let mut mcp = Mcp::open(&env, s.access()).await;
    let refused = mcp.call_tool(s.access(), "counter", json!({})).await;
    assert_eq!(refused.status, 403);
    let challenge = challenge_of(&refused);
    assert!(challenge.is_insufficient_scope());
    assert_eq!(challenge.scope.as_deref(), Some("mcp:tools mcp:write"));
    assert_eq!(env.fx.resource().counter(), 0);

    let wider = attempts.step_up(s.scope.as_deref(), &challenge).unwrap();
    assert_eq!(wider, "mcp:tools offline_access mcp:write");
    attempts.begin().unwrap();
    let (pending, tokens) = env.login(&s.discovery, &s.registration, Some(&wider)).await;
    assert_eq!(pending.scope.as_deref(), Some(wider.as_str()));
    // The same MCP session continues with the new token.
    let answer = mcp.call_tool(tokens.access_token.secret(), "counter", json!({})).await;
    assert_eq!(tool_text(&answer), "1");
    assert_eq!(env.fx.resource().counter(), 1);
    assert_eq!(env.fx.resource().stats().forbidden, 1);
    assert_eq!(attempts.made(), 2);
}

// ---------------------------------------------------------------------------------------------
// Server-side invalidation, refresh-token expiry, introspection

#[tokio::test(flavor = "current_thread")]
async fn server_side_invalidation_mid_session_then_reauthorization() {
    let env = Env::start().await;
    let s = env.logged_in().await;
    let mut mcp = Mcp::open(&env, s.access()).await;
    assert_eq!(mcp.request(s.access(), "tools/list", json!({})).await.status, 200);

    env.fx.auth().revoke_all_tokens();
    let resp = mcp.request(s.access(), "tools/list", json!({})).await;
    assert_eq!(resp.status, 401);
    let challenge = challenge_of(&resp);
    assert_eq!(challenge.error_description.as_deref(), Some("the access token was revoked"));
    // The refresh token went with it: terminal, so the caller authorizes again.
    let err = env
        .client
        .refresh(&s.discovery, &s.registration, &s.refresh_token(), s.scope.as_deref())
        .await
        .unwrap_err();
    assert_eq!(oauth_error(&err).1, "invalid_grant");
    assert_eq!(err.class(), ErrorClass::Terminal);
    assert!(!err.is_stale_registration(), "the registration itself is still good");
    let scope = select_scope(Some(&challenge), &s.discovery);
    let (_, tokens) = env.login(&s.discovery, &s.registration, scope.as_deref()).await;
    let answer = mcp.call_tool(tokens.access_token.secret(), "echo", json!({"text": "back"})).await;
    assert_eq!(tool_text(&answer), "back");
}

#[tokio::test(flavor = "current_thread")]
async fn an_expired_refresh_token_is_terminal() {
    let env = Env::start().await;
    env.fx.auth().knobs().set_refresh_token_lifetime(Some(Duration::from_secs(10)));
    let s = env.logged_in().await;
    env.fx.auth().knobs().set_clock_offset_millis(11_000);
    let err = env
        .client
        .refresh(&s.discovery, &s.registration, &s.refresh_token(), s.scope.as_deref())
        .await
        .unwrap_err();
    assert_eq!(oauth_error(&err), (400, "invalid_grant"));
    assert_eq!(err.class(), ErrorClass::Terminal);
}

#[tokio::test(flavor = "current_thread")]
async fn a_resource_server_validating_by_introspection() {
    let auth = AuthServer::builder().spawn().await.unwrap();
    let resource = ResourceServer::builder(&auth).introspection(true).spawn().await.unwrap();
    let env = Env::with(Fixtures::from_parts(auth, resource), HttpPolicy::default());
    let s = env.logged_in().await;
    let mut mcp = Mcp::open(&env, s.access()).await;
    assert_eq!(tool_text(&mcp.call_tool(s.access(), "echo", json!({"text": "i"})).await), "i");
    assert!(env.fx.auth().stats().introspections >= 2);
    // Revocation through the client is seen by introspection too.
    env.client
        .revoke(&s.discovery, &s.registration, None, Some(&s.tokens.access_token))
        .await
        .unwrap();
    assert_eq!(mcp.request(s.access(), "tools/list", json!({})).await.status, 401);
}

/// RFC 9207 against the fixture, whose metadata says it sends `iss`: a redirect without
/// `iss`, with another server's, or with the issuer plus a trailing slash is refused before
/// the code goes anywhere (exact comparison); the exact issuer is accepted.
#[tokio::test(flavor = "current_thread")]
async fn the_redirect_iss_is_required_and_compared_exactly() {
    let env = Env::start().await;
    let (_, discovery, registration) = env.discover_and_register().await;
    for knob in [RedirectIss::Missing, RedirectIss::Wrong, RedirectIss::TrailingSlash] {
        env.fx.auth().knobs().update(|k| k.redirect_iss = knob);
        let (url, pending) =
            env.client.authorization_url(&discovery, &registration, REDIRECT, None).unwrap();
        let callback = env.client.authorize_without_browser(&url).await.unwrap();
        let before = env.fx.auth().stats().authorization_code_requests;
        let err = env.client.exchange_code(&discovery, &registration, &pending, &callback).await;
        assert!(matches!(err, Err(Error::IssuerMismatch { .. })), "{knob:?}: {err:?}");
        assert_eq!(env.fx.auth().stats().authorization_code_requests, before, "{knob:?}");
    }
    env.fx.auth().knobs().update(|k| k.redirect_iss = RedirectIss::Correct);
    env.login(&discovery, &registration, None).await;
}

/// Metadata without `code_challenge_methods_supported`: the client refuses to start the
/// authorization (MCP 2025-11-25 and later), with a clear error, and sends nothing.
#[tokio::test(flavor = "current_thread")]
async fn missing_pkce_metadata_stops_the_authorization() {
    let env = Env::start().await;
    env.fx.auth().knobs().update(|k| k.omit_pkce_metadata = true);
    let (_, discovery, registration) = env.discover_and_register().await;
    assert_eq!(discovery.authorization_server.code_challenge_methods_supported, None);
    let err = env.client.authorization_url(&discovery, &registration, REDIRECT, None).unwrap_err();
    assert!(matches!(err, Error::PkceUnsupported { .. }), "{err:?}");
    assert!(err.to_string().contains("code_challenge_methods_supported"));
    assert_eq!(env.fx.auth().stats().authorization_requests, 0);
}
