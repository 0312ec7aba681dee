//! Helpers shared by the integration tests: a loopback HTTP client and the OAuth client steps.
#![allow(dead_code)] // Each test binary uses a different subset.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use mcp_fixtures::{AuthServerHandle, ClientAuth, ClientSpec, RegisteredClient};
use serde_json::Value;
use sha2::{Digest as _, Sha256};
use url::Url;

pub(crate) const REDIRECT: &str = "http://127.0.0.1:9/callback";

/// A client that does not follow redirects and never uses a proxy.
pub(crate) fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .expect("reqwest client")
}

/// A client as the tests use it: id, secret and how it authenticates.
#[derive(Clone)]
pub(crate) struct TestClient {
    pub(crate) id: String,
    pub(crate) secret: Option<String>,
    pub(crate) auth: ClientAuth,
}

pub(crate) fn register(auth: &AuthServerHandle, method: ClientAuth) -> TestClient {
    let c: RegisteredClient =
        auth.register_client(ClientSpec::new(method).redirect_uri(REDIRECT)).expect("register");
    TestClient {
        id: c.client_id().to_owned(),
        secret: c.client_secret().map(str::to_owned),
        auth: method,
    }
}

/// POST a form to `url`, authenticating as `client`.
pub(crate) async fn post_form(
    url: &str,
    client: &TestClient,
    form: &[(&str, &str)],
) -> reqwest::Response {
    let mut form: Vec<(String, String)> =
        form.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let mut req = http().post(url);
    match client.auth {
        ClientAuth::ClientSecretBasic => {
            req = req.basic_auth(&client.id, client.secret.as_deref());
        }
        ClientAuth::ClientSecretPost => {
            form.push(("client_id".into(), client.id.clone()));
            form.push(("client_secret".into(), client.secret.clone().unwrap_or_default()));
        }
        _ => form.push(("client_id".into(), client.id.clone())),
    }
    req.form(&form).send().await.expect("token endpoint reachable")
}

static VERIFIERS: AtomicU64 = AtomicU64::new(0);

pub(crate) fn pkce() -> (String, String) {
    let n = VERIFIERS.fetch_add(1, Ordering::Relaxed);
    let verifier = format!("verifier-{n:08}-abcdefghijklmnopqrstuvwxyz0123456789");
    let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
    (verifier, challenge)
}

/// The authorize URL for `client`.
pub(crate) fn authorize_url(
    auth: &AuthServerHandle,
    client_id: &str,
    challenge: &str,
    scope: Option<&str>,
    resource: Option<&str>,
) -> Url {
    let mut url = Url::parse(&auth.authorization_endpoint()).unwrap();
    {
        let mut q = url.query_pairs_mut();
        q.append_pair("response_type", "code")
            .append_pair("client_id", client_id)
            .append_pair("redirect_uri", REDIRECT)
            .append_pair("code_challenge", challenge)
            .append_pair("code_challenge_method", "S256")
            .append_pair("state", "st-123");
        if let Some(s) = scope {
            q.append_pair("scope", s);
        }
        if let Some(r) = resource {
            q.append_pair("resource", r);
        }
    }
    url
}

/// The query parameters of a redirect's `Location`.
pub(crate) fn location_params(resp: &reqwest::Response) -> HashMap<String, String> {
    assert_eq!(resp.status(), 302, "authorize should redirect");
    let location = resp.headers()["location"].to_str().unwrap();
    let url = Url::parse(location).unwrap();
    assert!(location.starts_with(REDIRECT), "{location}");
    url.query_pairs().into_owned().collect()
}

/// Run the browser step (auto-approve) and return the code and its verifier.
pub(crate) async fn authorize(
    auth: &AuthServerHandle,
    client_id: &str,
    scope: Option<&str>,
    resource: Option<&str>,
) -> (String, String) {
    let (verifier, challenge) = pkce();
    let resp = http()
        .get(authorize_url(auth, client_id, &challenge, scope, resource))
        .send()
        .await
        .unwrap();
    let params = location_params(&resp);
    (params.get("code").cloned().expect("a code"), verifier)
}

/// The whole authorization-code flow; returns the token response JSON.
pub(crate) async fn code_flow(
    auth: &AuthServerHandle,
    client: &TestClient,
    scope: Option<&str>,
    resource: Option<&str>,
) -> Value {
    let (code, verifier) = authorize(auth, &client.id, scope, resource).await;
    let mut form = vec![
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        ("redirect_uri", REDIRECT),
        ("code_verifier", verifier.as_str()),
    ];
    if let Some(r) = resource {
        form.push(("resource", r));
    }
    let resp = post_form(&auth.token_endpoint(), client, &form).await;
    assert_eq!(resp.status(), 200, "code exchange");
    resp.json().await.unwrap()
}

/// A refresh request; returns the raw response.
pub(crate) async fn refresh(
    auth: &AuthServerHandle,
    client: &TestClient,
    rt: &str,
    scope: Option<&str>,
) -> reqwest::Response {
    let mut form = vec![("grant_type", "refresh_token"), ("refresh_token", rt)];
    if let Some(s) = scope {
        form.push(("scope", s));
    }
    post_form(&auth.token_endpoint(), client, &form).await
}

/// The JSON body and OAuth `error` of a refused request.
pub(crate) async fn oauth_error(resp: reqwest::Response) -> (u16, String) {
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap();
    (status, body["error"].as_str().unwrap_or_default().to_owned())
}

/// Introspect `token` as `client`; whether it is active.
pub(crate) async fn active(auth: &AuthServerHandle, client: &TestClient, token: &str) -> bool {
    let resp = post_form(&auth.introspection_endpoint(), client, &[("token", token)]).await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    body["active"].as_bool().unwrap()
}

pub(crate) fn s(v: &Value, key: &str) -> String {
    v[key].as_str().unwrap_or_else(|| panic!("{key} missing in {v}")).to_owned()
}
