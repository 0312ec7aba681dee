//! The whole flow over real HTTP on 127.0.0.1, through the reqwest client: 401 → discovery →
//! dynamic registration → authorization (read from the redirect) → code exchange → MCP call →
//! refresh → revocation. It also captures every tracing event at TRACE level and proves that no
//! secret reaches the logs or the `Debug` output of the public types.

use crate::support;

use std::io::Write;
use std::sync::{Arc, Mutex};

use mcp_clock::SharedClock;
use mcp_oauth::{
    BearerChallenge, CallbackParams, ClientConfig, Discovery, Error, HttpClient, HttpPolicy,
    HttpRequest, MetadataSource, OAuthClient, PendingAuthorizations, PkceVerifier,
    ReqwestHttpClient, TokenEndpointAuthMethod, pkce_challenge, select_scope,
};
use support::{Reply, Seen, serve};

const ACCESS_1: &str = "access-token-AAAA1111";
const ACCESS_2: &str = "access-token-BBBB2222";
const REFRESH: &str = "refresh-token-CCCC3333";
const CLIENT_SECRET: &str = "client-secret-DDDD4444";
const CODE: &str = "auth-code-EEEE5555";

#[derive(Default)]
struct AsState {
    challenge: Option<String>,
    state: Option<String>,
}

fn handler(st: Arc<Mutex<AsState>>) -> impl Fn(&Seen, &str) -> Reply + Send + Sync + 'static {
    move |req, base| {
        let form = |n: &str| req.form_value(n);
        match (req.method.as_str(), req.path()) {
            ("POST", "/mcp") => match req.header("authorization") {
                Some(a) if a == format!("Bearer {ACCESS_1}") || a == format!("Bearer {ACCESS_2}") => {
                    Reply::json(200, serde_json::json!({"jsonrpc": "2.0", "id": 1, "result": {}}))
                }
                _ => Reply::status(401).header(
                    "www-authenticate",
                    &format!(
                        r#"Bearer error="invalid_token", scope="mcp:basic", resource_metadata="{base}/.well-known/oauth-protected-resource/mcp""#
                    ),
                ),
            },
            ("GET", "/.well-known/oauth-protected-resource/mcp") => Reply::json(
                200,
                serde_json::json!({"resource": format!("{base}/mcp"), "authorization_servers": [base], "scopes_supported": ["mcp:basic", "mcp:write"]}),
            ),
            ("GET", "/.well-known/oauth-authorization-server") => Reply::json(
                200,
                serde_json::json!({
                    "issuer": base,
                    "authorization_endpoint": format!("{base}/authorize"),
                    "token_endpoint": format!("{base}/token"),
                    "registration_endpoint": format!("{base}/register"),
                    "revocation_endpoint": format!("{base}/revoke"),
                    "code_challenge_methods_supported": ["S256"],
                    "token_endpoint_auth_methods_supported": ["client_secret_basic"],
                    "grant_types_supported": ["authorization_code", "refresh_token"],
                    "scopes_supported": ["mcp:basic", "mcp:write", "offline_access"],
                    "authorization_response_iss_parameter_supported": true,
                }),
            ),
            ("POST", "/register") => Reply::json(
                201,
                serde_json::json!({"client_id": "dyn-client", "client_secret": CLIENT_SECRET, "token_endpoint_auth_method": "client_secret_basic"}),
            ),
            ("GET", "/authorize") => {
                let url: url::Url = format!("{base}{}", req.target).parse().unwrap();
                let q = |n: &str| url.query_pairs().find(|(k, _)| k == n).map(|(_, v)| v.into_owned());
                assert_eq!(q("resource").unwrap(), format!("{base}/mcp"));
                assert_eq!(q("scope").unwrap(), "mcp:basic offline_access");
                let mut s = st.lock().unwrap();
                s.challenge = q("code_challenge");
                s.state = q("state");
                let mut back: url::Url = q("redirect_uri").unwrap().parse().unwrap();
                back.query_pairs_mut()
                    .append_pair("code", CODE)
                    .append_pair("state", s.state.as_deref().unwrap())
                    .append_pair("iss", base);
                Reply::status(302).header("location", back.as_str())
            }
            ("POST", "/token") => {
                let basic = req.header("authorization").unwrap_or_default();
                let expected = format!(
                    "Basic {}",
                    base64_encode(format!("dyn-client:{CLIENT_SECRET}").as_bytes())
                );
                if basic != expected {
                    return Reply::json(401, serde_json::json!({"error": "invalid_client"}));
                }
                assert_eq!(form("resource").unwrap(), format!("{base}/mcp"));
                match form("grant_type").as_deref() {
                    Some("authorization_code") => {
                        let verifier = PkceVerifier::new(form("code_verifier").unwrap());
                        let s = st.lock().unwrap();
                        if form("code").as_deref() != Some(CODE)
                            || s.challenge.as_deref() != Some(pkce_challenge(&verifier).as_str())
                        {
                            return Reply::json(400, serde_json::json!({"error": "invalid_grant"}));
                        }
                        Reply::json(
                            200,
                            serde_json::json!({"access_token": ACCESS_1, "token_type": "Bearer", "expires_in": 60, "refresh_token": REFRESH}),
                        )
                        .header("date", "Wed, 21 Oct 2015 07:28:00 GMT")
                    }
                    Some("refresh_token") if form("refresh_token").as_deref() == Some(REFRESH) => {
                        assert_eq!(form("scope").as_deref(), Some("mcp:basic offline_access"));
                        Reply::json(200, serde_json::json!({"access_token": ACCESS_2, "token_type": "bearer"}))
                    }
                    _ => Reply::json(400, serde_json::json!({"error": "invalid_grant", "error_description": "unknown"})),
                }
            }
            ("POST", "/revoke") => Reply::status(200),
            _ => Reply::status(404),
        }
    }
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn mcp_call(
    http: &ReqwestHttpClient,
    base: &str,
    token: Option<&str>,
) -> mcp_oauth::HttpResponse {
    let mut req = HttpRequest::post_json(
        format!("{base}/mcp").parse().unwrap(),
        &serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}),
    );
    if let Some(t) = token {
        req.headers.push(("authorization".into(), format!("Bearer {t}")));
    }
    http.call(req).await.unwrap()
}

#[tokio::test(flavor = "current_thread")]
async fn full_flow_over_loopback_without_leaking_secrets() {
    let logs = Captured::default();
    let sink = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || sink.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let server = serve(handler(Arc::new(Mutex::new(AsState::default())))).await;
    let base = server.base.clone();
    let http = ReqwestHttpClient::new(HttpPolicy::default()).unwrap();
    let client = OAuthClient::new(http.clone(), SharedClock::system());

    // 1. The MCP request is refused with a challenge.
    let denied = mcp_call(&http, &base, None).await;
    assert_eq!(denied.status, 401);
    let challenge =
        BearerChallenge::from_headers(denied.header_values("www-authenticate")).unwrap().unwrap();

    // 2. Discovery and registration.
    let server_url: url::Url = format!("{base}/mcp").parse().unwrap();
    let discovery: Discovery = client.discover(&server_url, Some(&challenge)).await.unwrap();
    assert_eq!(discovery.source, MetadataSource::OAuth);
    let registration = client
        .register(&discovery, &ClientConfig::new("flow test", "http://127.0.0.1:9/callback"))
        .await
        .unwrap();
    assert_eq!(registration.auth_method, TokenEndpointAuthMethod::ClientSecretBasic);

    // 3. Authorization: act as the browser, read the code from the redirect.
    let scope = select_scope(Some(&challenge), &discovery);
    assert_eq!(scope.as_deref(), Some("mcp:basic offline_access"));
    let (auth_url, pending) = client
        .authorization_url(
            &discovery,
            &registration,
            "http://127.0.0.1:9/callback",
            scope.as_deref(),
        )
        .unwrap();
    let pending_debug = format!("{pending:?}");
    let store = PendingAuthorizations::new(SharedClock::system());
    store.insert(pending);
    let redirect = http.call(HttpRequest::get(auth_url)).await.unwrap();
    assert_eq!(redirect.status, 302);
    let callback = CallbackParams::from_url(&redirect.header("location").unwrap().parse().unwrap());
    let pending = store.take(callback.state.as_ref().unwrap().secret()).unwrap();
    let tokens =
        client.exchange_code(&discovery, &registration, &pending, &callback).await.unwrap();
    assert_eq!(tokens.access_token.secret(), ACCESS_1);
    assert_eq!(tokens.expires_in, Some(std::time::Duration::from_secs(60)));
    assert_eq!(tokens.date, Some(mcp_clock::Timestamp::from_secs(1_445_412_480)));
    assert!(matches!(
        store.take(callback.state.as_ref().unwrap().secret()),
        Err(Error::UnknownState)
    ));

    // 4. The MCP call goes through.
    assert_eq!(mcp_call(&http, &base, Some(tokens.access_token.secret())).await.status, 200);

    // 5. Refresh (no new refresh token in the answer), then revoke.
    let refresh_token = tokens.refresh_token.clone().unwrap();
    let refreshed = client
        .refresh(&discovery, &registration, &refresh_token, pending.scope.as_deref())
        .await
        .unwrap();
    assert_eq!(refreshed.access_token.secret(), ACCESS_2);
    assert_eq!(refreshed.refresh_token, None);
    assert_eq!(mcp_call(&http, &base, Some(refreshed.access_token.secret())).await.status, 200);
    let bad = client
        .refresh(&discovery, &registration, &mcp_oauth::RefreshToken::new("stale"), None)
        .await
        .unwrap_err();
    assert_eq!(bad.class(), mcp_oauth::ErrorClass::Terminal);
    client
        .revoke(&discovery, &registration, Some(&refresh_token), Some(&refreshed.access_token))
        .await
        .unwrap();
    let revokes: Vec<Seen> = server.seen().into_iter().filter(|s| s.path() == "/revoke").collect();
    assert_eq!(revokes[0].form_value("token").as_deref(), Some(REFRESH));
    assert_eq!(revokes[1].form_value("token").as_deref(), Some(ACCESS_2));

    // No secret in the logs or in Debug output of the public types.
    let debug = format!(
        "{pending_debug} {pending:?} {callback:?} {tokens:?} {refreshed:?} {registration:?} {discovery:?} {bad:?} {client:?} {http:?}"
    );
    let logged = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(logged.contains("token request"), "the capture works: {logged}");
    let secrets = [
        ACCESS_1,
        ACCESS_2,
        REFRESH,
        CLIENT_SECRET,
        CODE,
        pending.verifier.secret(),
        pending.state.secret(),
        &base64_encode(format!("dyn-client:{CLIENT_SECRET}").as_bytes()),
    ];
    for secret in secrets {
        assert!(!logged.contains(secret), "secret in logs: {secret}");
        assert!(!debug.contains(secret), "secret in Debug: {secret}");
    }
    assert!(debug.contains("[redacted]"));
}
