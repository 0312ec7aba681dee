//! Shared helpers of the end-to-end test binaries: the fixture servers, a recording reqwest
//! client, the login steps, and a minimal MCP streamable-HTTP client for tool calls.

// Each test binary uses a different part of this module.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use mcp_clock::SharedClock;
use mcp_fixtures::Fixtures;
use mcp_oauth::{
    BearerChallenge, ClientConfig, ClientRegistration, ClientSecret, Discovery, Error, HttpClient,
    HttpPolicy, HttpRequest, HttpResponse, OAuthClient, PendingAuthorization, PreRegisteredClient,
    RefreshToken, ReqwestHttpClient, TokenEndpointAuthMethod, TokenResponse, select_scope,
};
use serde_json::{Value, json};
use url::Url;
pub(crate) const REDIRECT: &str = "http://127.0.0.1:9/callback";

/// One request the client sent.
#[derive(Clone)]
pub(crate) struct Sent {
    pub(crate) method: String,
    pub(crate) url: Url,
    pub(crate) form: Vec<(String, String)>,
}

/// Form values are secrets (codes, verifiers, tokens): a failing assertion shows only the keys.
impl std::fmt::Debug for Sent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys: Vec<&str> = self.form.iter().map(|(k, _)| k.as_str()).collect();
        write!(f, "{} {} form keys {keys:?}", self.method, self.url)
    }
}

impl Sent {
    pub(crate) fn form_value(&self, name: &str) -> Option<&str> {
        self.form.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// The production HTTP client, recording each request before sending it.
#[derive(Debug, Clone)]
pub(crate) struct Recorder {
    pub(crate) inner: ReqwestHttpClient,
    pub(crate) log: Arc<Mutex<Vec<Sent>>>,
}

impl Recorder {
    pub(crate) fn new(policy: HttpPolicy) -> Self {
        Recorder { inner: ReqwestHttpClient::new(policy).unwrap(), log: Arc::default() }
    }
    pub(crate) fn sent(&self) -> Vec<Sent> {
        self.log.lock().unwrap().clone()
    }
    /// The POSTs to `url`, in order.
    pub(crate) fn posts_to(&self, url: impl AsRef<str>) -> Vec<Sent> {
        let url = url.as_ref();
        self.sent().into_iter().filter(|s| s.method == "POST" && s.url.as_str() == url).collect()
    }
}

#[async_trait::async_trait]
impl HttpClient for Recorder {
    async fn call(&self, request: HttpRequest) -> mcp_oauth::Result<HttpResponse> {
        let form = if request.header("content-type") == Some("application/x-www-form-urlencoded") {
            request.form()
        } else {
            Vec::new()
        };
        self.log.lock().unwrap().push(Sent {
            method: request.method.to_string(),
            url: request.url.clone(),
            form,
        });
        self.inner.call(request).await
    }
}

/// The fixtures, a recording client and the MCP server URL.
pub(crate) struct Env {
    pub(crate) fx: Fixtures,
    pub(crate) rec: Recorder,
    pub(crate) client: OAuthClient,
    pub(crate) server: Url,
}

impl Env {
    pub(crate) async fn start() -> Env {
        Env::with(Fixtures::start().await.unwrap(), HttpPolicy::default())
    }

    pub(crate) fn with(fx: Fixtures, policy: HttpPolicy) -> Env {
        let rec = Recorder::new(policy);
        let client = OAuthClient::new(rec.clone(), SharedClock::system());
        let server = fx.resource().url().parse().unwrap();
        Env { fx, rec, client, server }
    }

    /// An MCP `initialize` without a token; the 401 challenge it gets.
    pub(crate) async fn first_401(&self) -> BearerChallenge {
        let resp = mcp_post(&self.rec.inner, &self.server, None, None, initialize()).await;
        assert_eq!(resp.status, 401);
        BearerChallenge::from_headers(resp.header_values("www-authenticate")).unwrap().unwrap()
    }

    /// 401 → discovery.
    pub(crate) async fn discover(&self) -> (BearerChallenge, Discovery) {
        let challenge = self.first_401().await;
        let discovery = self.client.discover(&self.server, Some(&challenge)).await.unwrap();
        (challenge, discovery)
    }

    /// 401 → discovery → dynamic registration.
    pub(crate) async fn discover_and_register(
        &self,
    ) -> (BearerChallenge, Discovery, ClientRegistration) {
        let (challenge, discovery) = self.discover().await;
        let registration =
            self.client.register(&discovery, &ClientConfig::new("e2e", REDIRECT)).await.unwrap();
        (challenge, discovery, registration)
    }

    /// Authorization (auto-approved, read from the redirect) and the code exchange.
    pub(crate) async fn login(
        &self,
        discovery: &Discovery,
        registration: &ClientRegistration,
        scope: Option<&str>,
    ) -> (PendingAuthorization, TokenResponse) {
        let (url, pending) =
            self.client.authorization_url(discovery, registration, REDIRECT, scope).unwrap();
        let callback = self.client.authorize_without_browser(&url).await.unwrap();
        assert_eq!(callback.iss.as_deref(), Some(discovery.issuer()), "RFC 9207 iss is sent");
        let tokens =
            self.client.exchange_code(discovery, registration, &pending, &callback).await.unwrap();
        (pending, tokens)
    }

    /// The whole first login of a public client: 401 → discovery → registration → tokens.
    pub(crate) async fn logged_in(&self) -> Session {
        let (challenge, discovery, registration) = self.discover_and_register().await;
        let scope = select_scope(Some(&challenge), &discovery);
        let (pending, tokens) = self.login(&discovery, &registration, scope.as_deref()).await;
        Session { discovery, registration, scope: pending.scope, tokens }
    }
}

pub(crate) struct Session {
    pub(crate) discovery: Discovery,
    pub(crate) registration: ClientRegistration,
    pub(crate) scope: Option<String>,
    pub(crate) tokens: TokenResponse,
}

impl Session {
    pub(crate) fn access(&self) -> &str {
        self.tokens.access_token.secret()
    }
    pub(crate) fn refresh_token(&self) -> RefreshToken {
        self.tokens.refresh_token.clone().expect("a refresh token")
    }
}

pub(crate) fn initialize() -> Value {
    json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "mcp-oauth e2e", "version": "0"}
    }})
}

pub(crate) async fn mcp_post(
    http: &ReqwestHttpClient,
    url: &Url,
    token: Option<&str>,
    session: Option<&str>,
    body: Value,
) -> HttpResponse {
    let mut req = HttpRequest::post_json(url.clone(), &body);
    req.headers.retain(|(n, _)| n != "accept");
    req.headers.push(("accept".into(), "application/json, text/event-stream".into()));
    if let Some(t) = token {
        req.headers.push(("authorization".into(), format!("Bearer {t}")));
    }
    if let Some(s) = session {
        req.headers.push(("mcp-session-id".into(), s.into()));
        req.headers.push(("mcp-protocol-version".into(), "2025-06-18".into()));
    }
    http.call(req).await.unwrap()
}

/// The JSON-RPC message in a JSON or SSE response body.
pub(crate) fn rpc_message(resp: &HttpResponse) -> Value {
    let text = String::from_utf8_lossy(&resp.body);
    if let Ok(v) = serde_json::from_str::<Value>(&text) {
        return v;
    }
    text.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .filter_map(|d| serde_json::from_str::<Value>(d.trim()).ok())
        .find(|v| v.get("id").is_some())
        .unwrap_or_else(|| panic!("no JSON-RPC response in {text:?}"))
}

/// An MCP session on the resource server.
pub(crate) struct Mcp {
    pub(crate) http: ReqwestHttpClient,
    pub(crate) url: Url,
    pub(crate) session: String,
    pub(crate) next_id: u64,
}

impl Mcp {
    pub(crate) async fn open(env: &Env, token: &str) -> Mcp {
        let http = env.rec.inner.clone();
        let resp = mcp_post(&http, &env.server, Some(token), None, initialize()).await;
        assert_eq!(resp.status, 200, "initialize: {:?}", String::from_utf8_lossy(&resp.body));
        let session = resp.header("mcp-session-id").expect("a session id").to_owned();
        assert!(rpc_message(&resp)["result"]["serverInfo"].is_object());
        let note = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
        let resp = mcp_post(&http, &env.server, Some(token), Some(&session), note).await;
        assert!(resp.is_success(), "initialized: {}", resp.status);
        Mcp { http, url: env.server.clone(), session, next_id: 2 }
    }

    pub(crate) async fn request(
        &mut self,
        token: &str,
        method: &str,
        params: Value,
    ) -> HttpResponse {
        let id = self.next_id;
        self.next_id += 1;
        let body = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        mcp_post(&self.http, &self.url, Some(token), Some(&self.session), body).await
    }

    pub(crate) async fn call_tool(&mut self, token: &str, name: &str, args: Value) -> HttpResponse {
        self.request(token, "tools/call", json!({"name": name, "arguments": args})).await
    }
}

pub(crate) fn tool_text(resp: &HttpResponse) -> String {
    assert_eq!(resp.status, 200);
    let msg = rpc_message(resp);
    msg["result"]["content"][0]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("no tool result in {msg}"))
        .to_owned()
}

pub(crate) fn challenge_of(resp: &HttpResponse) -> BearerChallenge {
    BearerChallenge::from_headers(resp.header_values("www-authenticate")).unwrap().unwrap()
}

pub(crate) fn oauth_error(e: &Error) -> (u16, &str) {
    match e {
        Error::OAuth { status, code, .. } => (*status, code.as_str()),
        other => panic!("expected an OAuth error, got {other:?}"),
    }
}

pub(crate) fn pre_registered(
    issuer: &str,
    id: &str,
    secret: Option<&str>,
    method: TokenEndpointAuthMethod,
) -> ClientConfig {
    let mut config = ClientConfig::new("e2e", REDIRECT);
    config.pre_registered = Some(PreRegisteredClient {
        issuer: issuer.into(),
        client_id: id.into(),
        client_secret: secret.map(ClientSecret::new),
        client_key: None,
        auth_method: Some(method),
    });
    config
}
