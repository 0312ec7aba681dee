//! The authorization server through real HTTP on 127.0.0.1: endpoints, client authentication
//! and every knob.

use crate::common;

use std::time::Duration;

use common::*;
use mcp_clock::{Clock, ManualClock, SystemClock};
use mcp_fixtures::{
    Approval, AuthEventKind, AuthServer, AuthServerHandle, ClientAuth, FixtureError,
    InjectedFailure, TokenFingerprint,
};
use serde_json::{Value, json};

async fn server() -> AuthServerHandle {
    AuthServer::builder().spawn().await.unwrap()
}

async fn manual() -> (AuthServerHandle, ManualClock) {
    let clock = ManualClock::default();
    (AuthServer::builder().clock(clock.shared()).spawn().await.unwrap(), clock)
}

#[tokio::test]
async fn metadata_is_served_at_the_path_aware_locations() {
    let auth = AuthServer::builder().issuer_path("/tenant1").spawn().await.unwrap();
    let base = auth.base_url().to_owned();
    for url in [
        format!("{base}/.well-known/oauth-authorization-server/tenant1"),
        format!("{base}/tenant1/.well-known/openid-configuration"),
        format!("{base}/.well-known/openid-configuration/tenant1"),
    ] {
        let doc: Value = http().get(&url).send().await.unwrap().json().await.unwrap();
        assert_eq!(doc["issuer"], auth.issuer(), "{url}");
        assert_eq!(doc["token_endpoint"], format!("{base}/tenant1/token"));
        assert_eq!(doc["code_challenge_methods_supported"], json!(["S256"]));
        assert_eq!(
            doc["scopes_supported"],
            json!(["mcp:tools", "mcp:read", "mcp:write", "offline_access"])
        );
        assert_eq!(doc["client_id_metadata_document_supported"], true);
        assert!(doc["registration_endpoint"].is_string());
    }
    let root =
        http().get(format!("{base}/.well-known/oauth-authorization-server")).send().await.unwrap();
    assert_eq!(root.status(), 404, "the root metadata URL is a trap when the issuer has a path");
}

#[tokio::test]
async fn metadata_documents_and_registration_can_be_switched_off() {
    let auth = AuthServer::builder()
        .rfc8414_metadata(false)
        .dynamic_registration(false)
        .advertise_scopes(false)
        .spawn()
        .await
        .unwrap();
    let r = http().get(auth.metadata_url()).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let oidc: Value = http()
        .get(format!("{}/.well-known/openid-configuration", auth.issuer()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(oidc.get("registration_endpoint").is_none() && oidc.get("scopes_supported").is_none());
    assert_eq!(oidc["jwks_uri"], format!("{}/jwks", auth.issuer()));
    let reg = http().post(auth.registration_endpoint()).json(&json!({})).send().await.unwrap();
    assert_eq!(reg.status(), 404);
}

#[tokio::test]
async fn dynamic_registration_then_code_flow_redirects_with_code_state_and_iss() {
    let auth = server().await;
    let reg = http()
        .post(auth.registration_endpoint())
        .json(&json!({
            "redirect_uris": [REDIRECT],
            "token_endpoint_auth_method": "none",
            "grant_types": ["authorization_code", "refresh_token"],
            "client_name": "test client",
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(reg.status(), 201);
    let reg: Value = reg.json().await.unwrap();
    assert!(reg.get("client_secret").is_none(), "public clients get no secret");
    let client = TestClient { id: s(&reg, "client_id"), secret: None, auth: ClientAuth::None };

    let (verifier, challenge) = pkce();
    let resp =
        http().get(authorize_url(&auth, &client.id, &challenge, None, None)).send().await.unwrap();
    let params = location_params(&resp);
    assert_eq!(params["state"], "st-123");
    assert_eq!(params["iss"], auth.issuer());
    let form = [
        ("grant_type", "authorization_code"),
        ("code", params["code"].as_str()),
        ("redirect_uri", REDIRECT),
        ("code_verifier", verifier.as_str()),
    ];
    let resp = post_form(&auth.token_endpoint(), &client, &form).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["cache-control"], "no-store");
    let tokens: Value = resp.json().await.unwrap();
    assert_eq!(tokens["token_type"], "Bearer");
    assert_eq!(tokens["expires_in"], 3600);
    assert_eq!(tokens["scope"], "mcp:tools", "the default scope when none is asked");
    assert!(tokens["refresh_token"].is_string());

    let stats = auth.stats();
    assert_eq!(stats.registrations, 1);
    assert_eq!(stats.authorization_requests, 1);
    assert_eq!(stats.authorizations_approved, 1);
    assert_eq!(stats.authorization_code_requests, 1);

    // The code is single-use, and a second redemption revokes what the first issued.
    let again = post_form(&auth.token_endpoint(), &client, &form).await;
    assert_eq!(oauth_error(again).await, (400, "invalid_grant".into()));
    let confidential = register(&auth, ClientAuth::ClientSecretBasic);
    assert!(!active(&auth, &confidential, &s(&tokens, "access_token")).await);
}

#[tokio::test]
async fn registration_refuses_bad_metadata() {
    let auth = server().await;
    for (body, error) in [
        (json!({"redirect_uris": []}), "invalid_redirect_uri"),
        (json!({"redirect_uris": ["not a url"]}), "invalid_redirect_uri"),
        (
            json!({"redirect_uris": [REDIRECT], "token_endpoint_auth_method": "private_key_jwt"}),
            "invalid_client_metadata",
        ),
    ] {
        let resp = http().post(auth.registration_endpoint()).json(&body).send().await.unwrap();
        assert_eq!(oauth_error(resp).await, (400, error.to_owned()), "{body}");
    }
    let not_json = http().post(auth.registration_endpoint()).body("{").send().await.unwrap();
    assert_eq!(oauth_error(not_json).await.1, "invalid_client_metadata");
    assert_eq!(auth.stats().registrations, 0);
}

#[tokio::test]
async fn pkce_verifier_must_match_the_challenge() {
    let auth = server().await;
    let client = register(&auth, ClientAuth::None);
    let (code, _verifier) = authorize(&auth, &client.id, None, None).await;
    let (wrong, _) = pkce();
    let form = [
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        ("redirect_uri", REDIRECT),
        ("code_verifier", wrong.as_str()),
    ];
    let resp = post_form(&auth.token_endpoint(), &client, &form).await;
    assert_eq!(oauth_error(resp).await, (400, "invalid_grant".into()));

    // Without a challenge, or with plain, the authorize endpoint redirects with an error.
    let mut url = authorize_url(&auth, &client.id, "x", None, None);
    let query: Vec<(String, String)> =
        url.query_pairs().into_owned().filter(|(k, _)| k != "code_challenge_method").collect();
    url.query_pairs_mut().clear().extend_pairs(query).append_pair("code_challenge_method", "plain");
    let params = location_params(&http().get(url).send().await.unwrap());
    assert_eq!(params["error"], "invalid_request");
    assert_eq!(params["state"], "st-123");
}

#[tokio::test]
async fn authorize_refuses_unknown_scopes_and_unregistered_redirects() {
    let auth = server().await;
    let client = register(&auth, ClientAuth::None);
    let (_, challenge) = pkce();
    let resp = http()
        .get(authorize_url(&auth, &client.id, &challenge, Some("admin"), None))
        .send()
        .await
        .unwrap();
    assert_eq!(location_params(&resp)["error"], "invalid_scope");

    let mut url = authorize_url(&auth, &client.id, &challenge, None, None);
    let query: Vec<(String, String)> =
        url.query_pairs()
            .into_owned()
            .map(|(k, v)| {
                if k == "redirect_uri" {
                    (k, "http://127.0.0.1:9/elsewhere".into())
                } else {
                    (k, v)
                }
            })
            .collect();
    url.query_pairs_mut().clear().extend_pairs(query);
    let resp = http().get(url).send().await.unwrap();
    assert_eq!(resp.status(), 400, "no redirect to an unregistered URI");
}

#[tokio::test]
async fn client_authentication_methods_are_enforced() {
    let auth = server().await;
    for method in [ClientAuth::None, ClientAuth::ClientSecretBasic, ClientAuth::ClientSecretPost] {
        let client = register(&auth, method);
        let tokens = code_flow(&auth, &client, None, None).await;
        assert!(tokens["access_token"].is_string(), "{method:?}");
    }
    // A basic client that sends its secret in the body, and a wrong secret: 401 invalid_client.
    let basic = register(&auth, ClientAuth::ClientSecretBasic);
    let as_post = TestClient { auth: ClientAuth::ClientSecretPost, ..basic.clone() };
    let resp =
        post_form(&auth.token_endpoint(), &as_post, &[("grant_type", "client_credentials")]).await;
    assert_eq!(oauth_error(resp).await, (401, "invalid_client".into()));
    let wrong = TestClient { secret: Some("wrong".into()), ..basic.clone() };
    let resp =
        post_form(&auth.token_endpoint(), &wrong, &[("grant_type", "client_credentials")]).await;
    assert_eq!(resp.headers()["www-authenticate"], "Basic realm=\"mcp-fixtures\"");
    assert_eq!(oauth_error(resp).await, (401, "invalid_client".into()));
    let ok =
        post_form(&auth.token_endpoint(), &basic, &[("grant_type", "client_credentials")]).await;
    assert_eq!(ok.status(), 200);
}

#[tokio::test]
async fn client_credentials_issue_no_refresh_token_and_need_a_confidential_client() {
    let auth = server().await;
    let client = register(&auth, ClientAuth::ClientSecretPost);
    let resp = post_form(
        &auth.token_endpoint(),
        &client,
        &[("grant_type", "client_credentials"), ("scope", "mcp:read")],
    )
    .await;
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["scope"], "mcp:read");
    assert!(body.get("refresh_token").is_none());
    let public = register(&auth, ClientAuth::None);
    let resp =
        post_form(&auth.token_endpoint(), &public, &[("grant_type", "client_credentials")]).await;
    assert_eq!(oauth_error(resp).await, (400, "unauthorized_client".into()));
    assert_eq!(auth.stats().client_credentials_requests, 2);
}

/// Serve one JSON document on loopback; returns its URL.
async fn serve_document(make: impl FnOnce(&str) -> Value) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/client.json", listener.local_addr().unwrap());
    let doc = make(&url);
    let app = axum::Router::new()
        .route("/client.json", axum::routing::get(move || async move { axum::Json(doc) }));
    let task = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, task)
}

#[tokio::test]
async fn client_id_metadata_documents_are_fetched_from_the_url() {
    let auth = server().await;
    let (url, task) = serve_document(|url| {
        json!({ "client_id": url, "client_name": "cimd", "redirect_uris": [REDIRECT], "token_endpoint_auth_method": "none" })
    })
    .await;
    let client = TestClient { id: url.clone(), secret: None, auth: ClientAuth::None };
    let tokens = code_flow(&auth, &client, Some("mcp:tools"), None).await;
    assert!(tokens["access_token"].is_string());
    let stats = auth.stats();
    assert_eq!(stats.client_metadata_fetches, 1, "fetched once, then remembered");
    assert_eq!(stats.registrations, 0);
    task.abort();

    let (bad, task) = serve_document(
        |_| json!({ "client_id": "http://127.0.0.1:1/other.json", "redirect_uris": [REDIRECT] }),
    )
    .await;
    let (_, challenge) = pkce();
    let resp = http().get(authorize_url(&auth, &bad, &challenge, None, None)).send().await.unwrap();
    assert_eq!(resp.status(), 400, "a document naming another client_id is refused");
    task.abort();
}

#[tokio::test]
async fn access_token_lifetime_knob_and_the_injected_clock() {
    let (auth, clock) = manual().await;
    auth.knobs().set_access_token_lifetime(Duration::from_secs(10));
    let client = register(&auth, ClientAuth::ClientSecretBasic);
    let tokens = code_flow(&auth, &client, None, None).await;
    assert_eq!(tokens["expires_in"], 10);
    let at = s(&tokens, "access_token");
    clock.advance(Duration::from_secs(9));
    assert!(active(&auth, &client, &at).await);
    clock.advance(Duration::from_secs(1));
    assert!(!active(&auth, &client, &at).await, "expired after exactly the lifetime");
    // The refresh token still works and gets a fresh access token.
    let resp = refresh(&auth, &client, &s(&tokens, "refresh_token"), None).await;
    let new: Value = resp.json().await.unwrap();
    assert!(active(&auth, &client, &s(&new, "access_token")).await);
}

#[tokio::test]
async fn rotation_on_kills_the_old_refresh_token_without_revoking_the_family() {
    let auth = server().await;
    let client = register(&auth, ClientAuth::None);
    let rt0 = s(&code_flow(&auth, &client, None, None).await, "refresh_token");
    let first: Value = refresh(&auth, &client, &rt0, None).await.json().await.unwrap();
    let rt1 = s(&first, "refresh_token");
    assert_ne!(rt0, rt1);
    assert_eq!(
        oauth_error(refresh(&auth, &client, &rt0, None).await).await,
        (400, "invalid_grant".into())
    );
    assert_eq!(
        refresh(&auth, &client, &rt1, None).await.status(),
        200,
        "no reuse detection: the family lives"
    );
    let stats = auth.stats();
    assert_eq!(stats.refresh_redemptions[&TokenFingerprint::of(&rt0)], 2);
    assert_eq!(stats.max_refresh_redemptions(), 2);
    assert_eq!(stats.families_revoked, 0);
}

#[tokio::test]
async fn rotation_off_returns_the_same_refresh_token_which_stays_valid() {
    let auth = server().await;
    auth.knobs().set_refresh_rotation(false);
    let client = register(&auth, ClientAuth::None);
    let rt = s(&code_flow(&auth, &client, None, None).await, "refresh_token");
    for _ in 0..3 {
        let body: Value = refresh(&auth, &client, &rt, None).await.json().await.unwrap();
        assert_eq!(body["refresh_token"], rt.as_str());
    }
    assert_eq!(auth.stats().refresh_redemptions[&TokenFingerprint::of(&rt)], 3);
}

#[tokio::test]
async fn strict_reuse_detection_revokes_the_whole_family() {
    let auth = server().await;
    auth.knobs().set_reuse_detection(true);
    let client = register(&auth, ClientAuth::ClientSecretPost);
    let rt0 = s(&code_flow(&auth, &client, None, None).await, "refresh_token");
    let first: Value = refresh(&auth, &client, &rt0, None).await.json().await.unwrap();
    let (rt1, at1) = (s(&first, "refresh_token"), s(&first, "access_token"));
    assert!(active(&auth, &client, &at1).await);

    assert_eq!(
        oauth_error(refresh(&auth, &client, &rt0, None).await).await,
        (400, "invalid_grant".into())
    );
    assert!(!active(&auth, &client, &at1).await, "access tokens of the family die too");
    assert_eq!(oauth_error(refresh(&auth, &client, &rt1, None).await).await.1, "invalid_grant");
    let stats = auth.stats();
    assert_eq!((stats.reuse_detections, stats.families_revoked), (1, 1));
    let events = auth.events();
    assert!(events.iter().any(|e| e.kind
        == AuthEventKind::ReuseDetected {
            refresh_token: TokenFingerprint::of(&rt0),
            family_revoked: true
        }));
    let printed = format!("{events:?} {stats:?}");
    assert!(
        !printed.contains(&rt0) && !printed.contains(&at1),
        "events and stats never show tokens"
    );
}

#[tokio::test]
async fn reuse_grace_window_accepts_a_rotated_token_briefly() {
    let (auth, clock) = manual().await;
    auth.knobs().update(|k| {
        k.reuse_detection = true;
        k.reuse_grace = Some(Duration::from_secs(30));
    });
    let client = register(&auth, ClientAuth::None);
    let rt0 = s(&code_flow(&auth, &client, None, None).await, "refresh_token");
    let rt1 = s(
        &refresh(&auth, &client, &rt0, None).await.json::<Value>().await.unwrap(),
        "refresh_token",
    );
    clock.advance(Duration::from_secs(30));
    let again: Value = refresh(&auth, &client, &rt0, None).await.json().await.unwrap();
    assert_eq!(
        again["refresh_token"],
        rt1.as_str(),
        "within grace: the family's current refresh token"
    );
    assert!(again["access_token"].is_string());
    clock.advance(Duration::from_secs(1));
    assert_eq!(oauth_error(refresh(&auth, &client, &rt0, None).await).await.1, "invalid_grant");
    assert_eq!(auth.stats().reuse_detections, 1);
    assert_eq!(oauth_error(refresh(&auth, &client, &rt1, None).await).await.1, "invalid_grant");
}

#[tokio::test]
async fn omit_expires_in_leaves_it_out_but_tokens_still_expire() {
    let (auth, clock) = manual().await;
    auth.knobs().update(|k| {
        k.omit_expires_in = true;
        k.access_token_lifetime = Duration::from_secs(60);
    });
    let client = register(&auth, ClientAuth::ClientSecretBasic);
    let tokens = code_flow(&auth, &client, None, None).await;
    assert!(tokens.get("expires_in").is_none(), "{tokens}");
    clock.advance(Duration::from_secs(60));
    assert!(!active(&auth, &client, &s(&tokens, "access_token")).await);
}

#[tokio::test]
async fn omit_refresh_on_refresh_keeps_the_old_refresh_token_valid() {
    let auth = server().await;
    auth.knobs().set_omit_refresh_on_refresh(true);
    let client = register(&auth, ClientAuth::None);
    let rt = s(&code_flow(&auth, &client, None, None).await, "refresh_token");
    for _ in 0..2 {
        let body: Value = refresh(&auth, &client, &rt, None).await.json().await.unwrap();
        assert!(body.get("refresh_token").is_none() && body["access_token"].is_string(), "{body}");
    }
}

#[tokio::test]
async fn require_scope_on_refresh_refuses_refreshes_without_scope() {
    let auth = server().await;
    auth.knobs().set_require_scope_on_refresh(true);
    let client = register(&auth, ClientAuth::None);
    let rt = s(&code_flow(&auth, &client, Some("mcp:tools mcp:read"), None).await, "refresh_token");
    assert_eq!(
        oauth_error(refresh(&auth, &client, &rt, None).await).await,
        (400, "invalid_request".into())
    );
    let narrowed: Value =
        refresh(&auth, &client, &rt, Some("mcp:read")).await.json().await.unwrap();
    assert_eq!(narrowed["scope"], "mcp:read");
    let rt = s(&narrowed, "refresh_token");
    let wider = refresh(&auth, &client, &rt, Some("mcp:write")).await;
    assert_eq!(oauth_error(wider).await.1, "invalid_scope");
}

#[tokio::test]
async fn refresh_tokens_can_require_offline_access() {
    let auth = server().await;
    auth.knobs().set_refresh_requires_offline_access(true);
    let client = register(&auth, ClientAuth::None);
    assert!(
        code_flow(&auth, &client, Some("mcp:tools"), None).await.get("refresh_token").is_none()
    );
    assert!(
        code_flow(&auth, &client, Some("mcp:tools offline_access"), None).await["refresh_token"]
            .is_string()
    );
}

#[tokio::test]
async fn slow_token_endpoint_answers_no_sooner_than_the_delay() {
    let auth = server().await;
    auth.knobs().set_token_delay(Duration::from_millis(300));
    let client = register(&auth, ClientAuth::ClientSecretBasic);
    let started = SystemClock::instant();
    let resp =
        post_form(&auth.token_endpoint(), &client, &[("grant_type", "client_credentials")]).await;
    assert_eq!(resp.status(), 200);
    let waited = SystemClock::instant().duration_since(started);
    assert!(waited >= Duration::from_millis(300), "answered after {waited:?}, before the delay");
}

#[tokio::test]
async fn hung_token_endpoint_never_answers_until_the_knob_is_cleared() {
    let auth = server().await;
    auth.knobs().set_token_hang(true);
    let client = register(&auth, ClientAuth::ClientSecretBasic);
    let url = auth.token_endpoint();
    let hung = {
        let client = client.clone();
        tokio::spawn(async move {
            post_form(&url, &client, &[("grant_type", "client_credentials")]).await.status()
        })
    };
    // Wait (bounded) until the server has counted the request, then make sure it is still hanging.
    for _ in 0..1000 {
        if auth.stats().client_credentials_requests == 1 {
            break;
        }
        mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(10)).await;
    }
    assert_eq!(auth.stats().client_credentials_requests, 1);
    mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(200)).await;
    assert!(!hung.is_finished(), "a hung endpoint must not answer");
    auth.knobs().set_token_hang(false);
    assert_eq!(
        mcp_clock::within(&mcp_clock::SystemClock, Duration::from_secs(10), hung)
            .await
            .unwrap()
            .unwrap(),
        200
    );
}

#[tokio::test]
async fn shutdown_releases_hung_requests() {
    let auth = server().await;
    auth.knobs().set_token_hang(true);
    let client = register(&auth, ClientAuth::ClientSecretBasic);
    let url = auth.token_endpoint();
    let hung = tokio::spawn(async move {
        post_form(&url, &client, &[("grant_type", "client_credentials")]).await.status()
    });
    for _ in 0..1000 {
        if auth.stats().client_credentials_requests == 1 {
            break;
        }
        mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(10)).await;
    }
    assert_eq!(auth.stats().client_credentials_requests, 1);
    mcp_clock::within(&mcp_clock::SystemClock, Duration::from_secs(10), auth.shutdown())
        .await
        .expect("shutdown must not wait for ever")
        .unwrap();
    assert_eq!(hung.await.unwrap(), 503);
}

#[tokio::test]
async fn injected_5xx_and_429_hit_exactly_the_nth_request() {
    let auth = server().await;
    let client = register(&auth, ClientAuth::ClientSecretBasic);
    let cc = [("grant_type", "client_credentials")];
    auth.knobs().fail_token_requests(InjectedFailure::server_error(2));
    let statuses = [
        post_form(&auth.token_endpoint(), &client, &cc).await.status(),
        post_form(&auth.token_endpoint(), &client, &cc).await.status(),
        post_form(&auth.token_endpoint(), &client, &cc).await.status(),
    ];
    assert_eq!(statuses.map(|s| s.as_u16()), [200, 503, 200]);

    auth.knobs().fail_token_requests(
        InjectedFailure::too_many_requests(1, Duration::from_secs(7)).times(2),
    );
    for _ in 0..2 {
        let resp = post_form(&auth.token_endpoint(), &client, &cc).await;
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()["retry-after"], "7");
    }
    assert_eq!(post_form(&auth.token_endpoint(), &client, &cc).await.status(), 200);
    assert_eq!(auth.stats().injected_failures, 3);
}

#[tokio::test]
async fn revoke_all_tokens_invalidates_everything_issued_so_far() {
    let auth = server().await;
    let client = register(&auth, ClientAuth::ClientSecretBasic);
    let tokens = code_flow(&auth, &client, None, None).await;
    auth.revoke_all_tokens();
    assert!(!active(&auth, &client, &s(&tokens, "access_token")).await);
    assert_eq!(
        oauth_error(refresh(&auth, &client, &s(&tokens, "refresh_token"), None).await).await.1,
        "invalid_grant"
    );
    assert!(auth.events().iter().any(|e| e.kind == AuthEventKind::AllTokensRevoked));
    // Tokens issued afterwards work.
    let fresh = code_flow(&auth, &client, None, None).await;
    assert!(active(&auth, &client, &s(&fresh, "access_token")).await);
}

#[tokio::test]
async fn clock_offset_moves_the_servers_time() {
    let (auth, clock) = manual().await;
    auth.knobs().set_access_token_lifetime(Duration::from_secs(600));
    let client = register(&auth, ClientAuth::ClientSecretBasic);
    let at = s(&code_flow(&auth, &client, None, None).await, "access_token");
    auth.knobs().set_clock_offset_millis(600_000);
    assert!(!active(&auth, &client, &at).await, "the server jumped ahead past the expiry");
    auth.knobs().set_clock_offset_millis(0);
    assert!(active(&auth, &client, &at).await);
    auth.knobs().set_clock_offset_millis(-5_000);
    let late = s(&code_flow(&auth, &client, None, None).await, "access_token");
    let resp =
        post_form(&auth.introspection_endpoint(), &client, &[("token", late.as_str())]).await;
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["iat"].as_u64().unwrap(), (clock.now() - Duration::from_secs(5)).as_secs());
    assert_eq!(body["exp"].as_u64().unwrap(), (clock.now() + Duration::from_secs(595)).as_secs());
}

#[tokio::test]
async fn revocation_endpoint_revokes_a_refresh_tokens_family_for_its_own_client_only() {
    let auth = server().await;
    let client = register(&auth, ClientAuth::ClientSecretBasic);
    let other = register(&auth, ClientAuth::ClientSecretBasic);
    let tokens = code_flow(&auth, &client, None, None).await;
    let (at, rt) = (s(&tokens, "access_token"), s(&tokens, "refresh_token"));
    let resp = post_form(&auth.revocation_endpoint(), &other, &[("token", rt.as_str())]).await;
    assert_eq!(resp.status(), 200);
    assert!(active(&auth, &client, &at).await, "another client cannot revoke it");
    let resp = post_form(&auth.revocation_endpoint(), &client, &[("token", rt.as_str())]).await;
    assert_eq!(resp.status(), 200);
    assert!(!active(&auth, &client, &at).await);
    assert_eq!(auth.stats().revocations, 2);
}

#[tokio::test]
async fn manual_approval_holds_the_browser_until_the_test_decides() {
    let auth = server().await;
    auth.knobs().set_approval(Approval::Manual);
    assert!(matches!(auth.approve_pending(), Err(FixtureError::NoPendingAuthorization)));
    let client = register(&auth, ClientAuth::None);
    let (_, challenge) = pkce();
    let url = authorize_url(&auth, &client.id, &challenge, Some("mcp:read"), None);
    let browser = tokio::spawn(http().get(url.clone()).send());
    let pending = mcp_clock::within(
        &mcp_clock::SystemClock,
        Duration::from_secs(10),
        auth.wait_for_pending_authorization(),
    )
    .await
    .unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(
        (pending[0].client_id.as_str(), pending[0].scope.as_str()),
        (client.id.as_str(), "mcp:read")
    );
    assert!(!browser.is_finished());
    assert_eq!(auth.approve_pending().unwrap(), 1);
    let resp = browser.await.unwrap().unwrap();
    assert!(location_params(&resp).contains_key("code"));

    let browser = tokio::spawn(http().get(url).send());
    mcp_clock::within(
        &mcp_clock::SystemClock,
        Duration::from_secs(10),
        auth.wait_for_pending_authorization(),
    )
    .await
    .unwrap();
    assert_eq!(auth.deny_pending().unwrap(), 1);
    assert_eq!(location_params(&browser.await.unwrap().unwrap())["error"], "access_denied");
    let stats = auth.stats();
    assert_eq!((stats.authorizations_approved, stats.authorizations_denied), (1, 1));
}

#[tokio::test]
async fn deny_mode_refuses_at_once() {
    let auth = server().await;
    auth.knobs().set_approval(Approval::Deny);
    let client = register(&auth, ClientAuth::None);
    let (_, challenge) = pkce();
    let resp =
        http().get(authorize_url(&auth, &client.id, &challenge, None, None)).send().await.unwrap();
    let params = location_params(&resp);
    assert_eq!((params["error"].as_str(), params["state"].as_str()), ("access_denied", "st-123"));
}

#[tokio::test]
async fn resource_indicator_must_stay_the_same_from_authorize_to_token() {
    let auth = server().await;
    let client = register(&auth, ClientAuth::None);
    let (code, verifier) = authorize(&auth, &client.id, None, Some("http://127.0.0.1:1/mcp")).await;
    let form = [
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        ("redirect_uri", REDIRECT),
        ("code_verifier", verifier.as_str()),
        ("resource", "http://127.0.0.1:2/mcp"),
    ];
    let resp = post_form(&auth.token_endpoint(), &client, &form).await;
    assert_eq!(oauth_error(resp).await, (400, "invalid_target".into()));
}

#[tokio::test]
async fn debug_output_of_the_handle_never_shows_tokens_or_secrets() {
    let auth = server().await;
    let client = register(&auth, ClientAuth::ClientSecretBasic);
    let tokens = code_flow(&auth, &client, None, None).await;
    let printed = format!("{auth:?} {:?} {:?}", auth.stats(), auth.events());
    for secret in
        [s(&tokens, "access_token"), s(&tokens, "refresh_token"), client.secret.clone().unwrap()]
    {
        assert!(!printed.contains(&secret), "leaked in {printed}");
    }
    assert!(printed.contains("access_tokens: 1"), "{printed}");
    let spec =
        mcp_fixtures::ClientSpec::new(ClientAuth::ClientSecretPost).client_secret("s3cr3t-value");
    assert!(!format!("{spec:?}").contains("s3cr3t-value"));
}

/// The race: many requests redeem the same refresh token at once. The server must serialise
/// them so that exactly one rotation happens and every other redemption is seen as reuse; a
/// server that checked and rotated in separate steps would let two succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_redemptions_of_one_refresh_token_rotate_exactly_once() {
    let auth = server().await;
    auth.knobs().set_reuse_detection(true);
    let client = register(&auth, ClientAuth::None);
    let rt = s(&code_flow(&auth, &client, None, None).await, "refresh_token");
    let url = auth.token_endpoint();
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let (url, client, rt) = (url.clone(), client.clone(), rt.clone());
            tokio::spawn(async move {
                post_form(
                    &url,
                    &client,
                    &[("grant_type", "refresh_token"), ("refresh_token", rt.as_str())],
                )
                .await
                .status()
                .as_u16()
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        if t.await.unwrap() == 200 {
            ok += 1;
        }
    }
    assert_eq!(ok, 1, "exactly one redemption wins");
    let stats = auth.stats();
    assert_eq!(stats.refresh_redemptions[&TokenFingerprint::of(&rt)], 32);
    // The first late redemption is the reuse that revokes the family; the rest meet a revoked
    // token.
    assert_eq!(stats.reuse_detections, 1);
    assert_eq!(stats.families_revoked, 1);
}

#[tokio::test]
async fn refresh_token_lifetime_knob_expires_refresh_tokens() {
    let (auth, clock) = manual().await;
    auth.knobs().set_refresh_token_lifetime(Some(Duration::from_secs(100)));
    let client = register(&auth, ClientAuth::None);
    let rt0 = s(&code_flow(&auth, &client, None, None).await, "refresh_token");
    clock.advance(Duration::from_secs(100));
    let rt1 = s(
        &refresh(&auth, &client, &rt0, None).await.json::<Value>().await.unwrap(),
        "refresh_token",
    );
    clock.advance(Duration::from_secs(101));
    assert_eq!(
        oauth_error(refresh(&auth, &client, &rt1, None).await).await,
        (400, "invalid_grant".into())
    );
}

#[tokio::test]
async fn sloppy_token_responses_string_expires_in_and_lowercase_bearer() {
    let auth = server().await;
    auth.knobs().update(|k| {
        k.expires_in_as_string = true;
        k.lowercase_token_type = true;
    });
    let client = register(&auth, ClientAuth::None);
    let tokens = code_flow(&auth, &client, None, None).await;
    assert_eq!(tokens["expires_in"], "3600");
    assert_eq!(tokens["token_type"], "bearer");
}

#[tokio::test]
async fn scopes_and_client_metadata_documents_are_configurable() {
    let bad = AuthServer::builder().default_scopes(["nope"]).spawn().await;
    assert!(matches!(bad, Err(FixtureError::InvalidConfig(_))));
    let auth = AuthServer::builder()
        .scopes_supported(["files:read", "files:write"])
        .default_scopes(["files:read"])
        .client_metadata_documents(false)
        .spawn()
        .await
        .unwrap();
    let doc: Value = http().get(auth.metadata_url()).send().await.unwrap().json().await.unwrap();
    assert_eq!(doc["scopes_supported"], json!(["files:read", "files:write"]));
    assert_eq!(doc["client_id_metadata_document_supported"], false);
    let client = register(&auth, ClientAuth::None);
    assert_eq!(code_flow(&auth, &client, None, None).await["scope"], "files:read");
    let (_, challenge) = pkce();
    let url_client = "http://127.0.0.1:9/client.json";
    let resp =
        http().get(authorize_url(&auth, url_client, &challenge, None, None)).send().await.unwrap();
    assert_eq!(resp.status(), 400, "URL client ids are unknown clients when documents are off");
}

#[tokio::test]
async fn withheld_scopes_are_left_out_of_approved_grants() {
    let auth = server().await;
    let client = register(&auth, ClientAuth::None);
    auth.knobs().set_withheld_scopes(["mcp:write"]);
    let tokens = code_flow(&auth, &client, Some("mcp:tools mcp:write"), None).await;
    assert_eq!(tokens["scope"], "mcp:tools", "down-scoped");
    let form = [
        ("grant_type", "refresh_token"),
        ("refresh_token", tokens["refresh_token"].as_str().unwrap()),
    ];
    let refreshed: Value =
        post_form(&auth.token_endpoint(), &client, &form).await.json().await.unwrap();
    assert_eq!(refreshed["scope"], "mcp:tools", "a refresh does not bring it back");
    auth.knobs().set_withheld_scopes(Vec::<String>::new());
    let tokens = code_flow(&auth, &client, Some("mcp:tools mcp:write"), None).await;
    assert_eq!(tokens["scope"], "mcp:tools mcp:write");
}

#[tokio::test]
async fn refresh_hang_holds_only_refresh_grants() {
    let auth = server().await;
    let client = register(&auth, ClientAuth::None);
    let tokens = code_flow(&auth, &client, None, None).await;
    auth.knobs().set_refresh_hang(true);
    let hung = {
        let (client, url) = (client.clone(), auth.token_endpoint());
        let refresh = s(&tokens, "refresh_token");
        tokio::spawn(async move {
            let form = [("grant_type", "refresh_token"), ("refresh_token", refresh.as_str())];
            post_form(&url, &client, &form).await.status()
        })
    };
    for _ in 0..1000 {
        if auth.stats().refresh_token_requests == 1 {
            break;
        }
        mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(10)).await;
    }
    assert_eq!(auth.stats().refresh_token_requests, 1);
    // An authorization code grant still answers while the refresh hangs.
    let again = code_flow(&auth, &client, None, None).await;
    assert!(again["access_token"].is_string());
    assert!(!hung.is_finished(), "the refresh must still hang");
    auth.knobs().set_refresh_hang(false);
    assert_eq!(
        mcp_clock::within(&mcp_clock::SystemClock, Duration::from_secs(10), hung)
            .await
            .unwrap()
            .unwrap(),
        200
    );
}

/// Issue 12's fault knobs over HTTP, both after the server has acted. A lost answer (a 502)
/// leaves the refresh token spent: presenting it again is a reuse. A late answer
/// (`refresh_delay`) is late after the rotation: a second presentation made while the first
/// answer is still on its way is already a reuse.
#[tokio::test]
async fn refresh_answers_can_be_lost_or_late_after_the_server_acted() {
    let auth = server().await;
    auth.knobs().set_reuse_detection(true);
    let client = register(&auth, ClientAuth::None);
    let rt0 = s(&code_flow(&auth, &client, None, None).await, "refresh_token");
    auth.knobs().lose_refresh_answers(1);
    let lost = refresh(&auth, &client, &rt0, None).await;
    assert_eq!(lost.status(), 502);
    assert!(!lost.text().await.unwrap().contains("refresh_token"), "no token in a lost answer");
    assert_eq!(auth.stats().lost_answers, 1);
    assert_eq!(
        oauth_error(refresh(&auth, &client, &rt0, None).await).await,
        (400, "invalid_grant".into()),
        "acted before the answer was lost: the token is spent"
    );
    assert_eq!((auth.stats().reuse_detections, auth.stats().lost_answers), (1, 1));

    let rt = s(&code_flow(&auth, &client, None, None).await, "refresh_token");
    auth.knobs().set_refresh_delay(Duration::from_millis(300));
    let started = SystemClock::instant();
    let first = refresh(&auth, &client, &rt, None);
    let second = async {
        // The first request is counted (acted on) while its answer waits out the delay.
        while auth.stats().refresh_redemptions.get(&TokenFingerprint::of(&rt)) != Some(&1) {
            mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(1)).await;
        }
        oauth_error(refresh(&auth, &client, &rt, None).await).await
    };
    let (first, second) = tokio::join!(first, second);
    assert_eq!(first.status(), 200, "the late answer carries the rotated tokens");
    assert_eq!(second, (400, "invalid_grant".into()), "rotated before the first answer came");
    let waited = SystemClock::instant().duration_since(started);
    assert!(waited >= Duration::from_millis(300), "answered after {waited:?}, before the delay");
    assert_eq!(auth.stats().reuse_detections, 2);
}
