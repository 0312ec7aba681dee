//! DPoP (RFC 9449) on MCP requests: a provider whose token is DPoP-bound makes every request
//! carry `Authorization: DPoP` and a fresh, valid proof, and a `use_dpop_nonce` refusal from
//! the MCP server is answered with the server's nonce, once, without asking the provider.
//!
//! The server is rmcp's streamable-HTTP server behind a gate on 127.0.0.1 that checks proofs
//! with mcp-fixtures' `DpopChecker` (RFC 9449 §4.3 and §7.1: signature with the embedded key,
//! `typ`, `htm`, `htu`, `iat`, `ath`, unique `jti`, and its nonce).
//!
//! Then the factory end to end against the fixture servers with their `dpop` knob on: login,
//! calls, a refresh after a mid-session 401, a restart over the same sled store, a new key after
//! a logout; and a server without DPoP keeping Bearer.

use crate::common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use common::{Browser, args, text};
use connection_factory::{
    AuthProvider, ConnectOptions, Connection, ConnectionFactory, Error, FactoryConfig,
    HookDecision, OAuthRefresher, Recovery, Refusal, Secret, callback_router,
};
use flow_state::{FlowManager, MemoryStore, SharedStore};
use mcp_clock::{Clock as _, SystemClock};
use mcp_clock::{ManualClock, Timestamp};
use mcp_fixtures::{AuthServer, Fixtures, KnobSettings, ResourceServer};
use mcp_fixtures::{DpopChecker, DpopRefusal};
use mcp_oauth::DpopKey;
use mcp_oauth::{ClientConfig, HttpPolicy, OAuthClient, ReqwestHttpClient};
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::model::{ServerCapabilities, ServerConfig};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ServerHandler, tool, tool_handler, tool_router};
use token_storage::{Keyring, SledTokenStore, TokenStorage, TokenStorageConfig};

const TOKEN: &str = "at_dpop_bound";

#[derive(Debug, Clone)]
struct Ping {
    #[allow(dead_code)] // Read by the code that `tool_handler` generates.
    tool_router: ToolRouter<Self>,
}

#[tool_router]
impl Ping {
    #[tool(description = "Answer pong.")]
    fn pong(&self) -> String {
        "pong".into()
    }
}

#[tool_handler]
impl ServerHandler for Ping {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
    }
}

#[derive(Debug, Default)]
struct Gate {
    url: Mutex<String>,
    accepted: AtomicU64,
    nonce_challenges: AtomicU64,
    checker: DpopChecker,
    /// Everything wrong with the proofs seen (empty when all were valid).
    problems: Mutex<Vec<String>>,
}

/// The gate's verdict on a request: `None` lets it through.
fn verdict(gate: &Gate, req: &Request) -> Option<Response> {
    let header_value = |name: &str| {
        let value = req.headers().get(name).and_then(|v| v.to_str().ok());
        value.map(str::to_owned).unwrap_or_default()
    };
    let (auth, proof) = (header_value("authorization"), header_value("dpop"));
    let refuse = |challenge: &'static str| {
        (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, challenge)]).into_response()
    };
    let Some(token) = auth.strip_prefix("DPoP ") else {
        gate.problems.lock().unwrap().push(format!("Authorization {auth:?}"));
        return Some(refuse("DPoP"));
    };
    let url = gate.url.lock().unwrap().clone();
    let proof = (!proof.is_empty()).then_some(proof.as_str());
    // Real time: the transport signs with the system clock here.
    let now = SystemClock.now();
    match gate.checker.check(proof, req.method().as_str(), &url, Some(token), now) {
        Err(DpopRefusal::UseNonce) => {
            gate.nonce_challenges.fetch_add(1, Ordering::SeqCst);
            let mut resp = refuse("DPoP error=\"use_dpop_nonce\"");
            resp.headers_mut().insert("dpop-nonce", gate.checker.nonce().parse().unwrap());
            Some(resp)
        }
        Err(problem) => {
            gate.problems.lock().unwrap().push(problem.to_string());
            Some(refuse("DPoP error=\"invalid_dpop_proof\""))
        }
        Ok(_) if token == TOKEN => {
            gate.accepted.fetch_add(1, Ordering::SeqCst);
            None
        }
        Ok(_) => Some(refuse("DPoP error=\"invalid_token\"")),
    }
}

async fn gate(State(gate): State<Arc<Gate>>, req: Request, next: Next) -> Response {
    match verdict(&gate, &req) {
        Some(refused) => refused,
        None => next.run(req).await,
    }
}

async fn serve(g: Arc<Gate>) -> String {
    let service: StreamableHttpService<Ping, LocalSessionManager> = StreamableHttpService::new(
        || Ok(Ping { tool_router: Ping::tool_router() }),
        Arc::new(LocalSessionManager::default()),
        StreamableHttpServerConfig::default(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/mcp", listener.local_addr().unwrap());
    *g.url.lock().unwrap() = url.clone();
    let router = axum::Router::new()
        .route_service("/mcp", service)
        .layer(middleware::from_fn_with_state(g, gate));
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    url
}

/// Holds a DPoP-bound token; counts the refusals it is shown.
#[derive(Debug)]
struct Bound {
    key: DpopKey,
    refusals: AtomicU64,
}

#[async_trait::async_trait]
impl AuthProvider for Bound {
    async fn current_token(&self) -> Result<Option<Secret>, Error> {
        Ok(Some(Secret::new(TOKEN)))
    }
    async fn on_unauthorized(&self, _: Option<&Secret>, _: &Refusal) -> Result<Recovery, Error> {
        self.refusals.fetch_add(1, Ordering::SeqCst);
        Ok(Recovery::AuthorizationRequired)
    }
    fn dpop_key(&self) -> Option<DpopKey> {
        Some(self.key.clone())
    }
}

#[tokio::test]
async fn dpop_bound_requests_carry_fresh_proofs_and_learn_the_nonce_once() {
    let g = Arc::new(Gate::default());
    let url = serve(g.clone()).await;
    let provider =
        Arc::new(Bound { key: DpopKey::generate().unwrap(), refusals: AtomicU64::new(0) });
    let options = ConnectOptions::default().connect_timeout(Duration::from_secs(10));
    let conn = Connection::connect(&url, provider.clone(), options).await.unwrap();
    assert_eq!(conn.list_tools().await.unwrap().len(), 1);
    let result = conn.call_tool("pong", None).await.unwrap();
    assert_eq!(result.content[0].as_text().unwrap().text, "pong");
    conn.close().await.unwrap();

    assert_eq!(*g.problems.lock().unwrap(), Vec::<String>::new(), "every proof was valid");
    assert_eq!(g.nonce_challenges.load(Ordering::SeqCst), 2, "the request and the nonce probe");
    assert!(g.accepted.load(Ordering::SeqCst) >= 3, "discover, tools/list, tools/call");
    assert_eq!(provider.refusals.load(Ordering::SeqCst), 0, "the nonce is not the provider's");
    let url = url.parse().unwrap();
    assert_eq!(provider.key.nonce(&url).as_deref(), Some(g.checker.nonce()));
}

/// The factory over a sled token store in `dir` with the fixture's clock: its interactive flow
/// (a browser that follows the redirect to this factory's callback listener, which it returns
/// so a restart can stop it), and the key's configuration.
async fn factory_over(
    dir: &std::path::Path,
    clock: &ManualClock,
    fx: &Fixtures,
    browser: Arc<Browser>,
) -> (ConnectionFactory, TokenStorage, tokio::task::JoinHandle<()>, FactoryConfig) {
    let oauth =
        OAuthClient::new(ReqwestHttpClient::new(HttpPolicy::default()).unwrap(), clock.shared());
    let mut config = TokenStorageConfig::default();
    config.max_date_correction = Duration::ZERO; // hyper's Date header is real time
    // A restart: the previous factory's tasks (an MCP session winding down, a detached
    // refresh) may hold the database a moment after it is dropped. Wait for its lock (real
    // time, bounded).
    let mut store = SledTokenStore::open(dir);
    for _ in 0..1000 {
        if store.is_ok() {
            break;
        }
        mcp_clock::Clock::sleep(&SystemClock, Duration::from_millis(10)).await;
        store = SledTokenStore::open(dir);
    }
    let store = store.unwrap();
    let storage = TokenStorage::builder(
        store.into(),
        Arc::new(Keyring::parse(&"42".repeat(32)).unwrap()),
        Arc::new(OAuthRefresher::new(oauth.clone())),
    )
    .clock(clock.shared())
    .config(config)
    .build();
    let flows = FlowManager::builder(SharedStore::new(MemoryStore::new()))
        .clock(clock.shared())
        .build()
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let redirect = format!("http://{}/callback", listener.local_addr().unwrap());
    let router = callback_router(flows.clone(), storage.clone(), oauth.clone());
    let callback = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    let factory =
        ConnectionFactory::new(flows, storage.clone()).unwrap().with_interactive(oauth, browser);
    let config = FactoryConfig::new(fx.resource().url(), "acme", "alice", "fixture")
        .connect_timeout(Duration::from_secs(10))
        .oauth_wait_timeout(Duration::from_secs(10))
        .client(ClientConfig::new("dpop tests", redirect));
    (factory, storage, callback, config)
}

fn thumbprint(pem: &Secret) -> String {
    let pem = mcp_oauth::PrivateKeyPem::new(pem.expose());
    DpopKey::from_pkcs8_pem(&pem).unwrap().thumbprint().to_owned()
}

/// End to end against the fixture servers with the `dpop` knob on (proofs and nonces required
/// at the token endpoint and the MCP server, tokens bound to the key): the factory sees
/// `dpop_signing_alg_values_supported` in the metadata, makes one key for the (tenant, user,
/// server), exchanges the code with proofs (learning the nonce), calls tools with
/// `Authorization: DPoP` and proofs, refreshes after a mid-session 401 with a proof by the same
/// key; after a restart (a new factory over the same sled directory) it reads the same key back
/// and refreshes the bound refresh token with it. No proof is ever refused, no second prompt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_factory_logs_in_calls_and_refreshes_with_dpop_across_a_restart() {
    let clock = ManualClock::new(Timestamp::from_secs(1_800_000_000));
    let mut knobs = KnobSettings::default();
    knobs.access_token_lifetime = Duration::from_secs(60);
    knobs.reuse_detection = true;
    knobs.dpop = true;
    let auth = AuthServer::builder().clock(clock.shared()).knobs(knobs).spawn().await.unwrap();
    let resource = ResourceServer::builder(&auth).spawn().await.unwrap();
    let fx = Fixtures::from_parts(auth, resource);
    let browser = Arc::new(Browser::new(HookDecision::Wait));
    let dir = tempfile::tempdir().unwrap();

    let (factory, storage, callback, config) =
        factory_over(dir.path(), &clock, &fx, browser.clone()).await;
    let key = config.token_key();
    let conn = factory.connect(config.clone()).await.unwrap();
    assert_eq!(text(&conn.call_tool("echo", args("one")).await.unwrap()), "one");
    let pem = storage.dpop_key(&key).await.unwrap().expect("a DPoP key was stored");
    let jkt = thumbprint(&pem);
    assert_eq!(storage.tokens(&key).await.unwrap().unwrap().token_type(), "DPoP");
    let a = fx.auth().stats();
    assert_eq!((a.authorization_code_requests, a.dpop_nonce_challenges), (2, 1), "{a:?}");

    // A mid-session 401 (the token expired): a refresh with a proof, then the call.
    clock.advance(Duration::from_secs(120));
    assert_eq!(text(&conn.call_tool("echo", args("two")).await.unwrap()), "two");
    let a = fx.auth().stats();
    assert_eq!(a.max_refresh_redemptions(), 1, "{a:?}");
    assert_eq!(a.refresh_redemptions.len(), 1, "one refresh: {a:?}");
    conn.close().await.unwrap();
    drop((factory, storage));
    callback.abort();
    let _ = callback.await;

    // The restart: the same key is read back, and the bound refresh token works with it.
    let (factory, storage, _callback, config) =
        factory_over(dir.path(), &clock, &fx, browser.clone()).await;
    assert_eq!(thumbprint(&storage.dpop_key(&key).await.unwrap().unwrap()), jkt);
    let conn = factory.connect(config.clone()).await.unwrap();
    assert_eq!(text(&conn.call_tool("echo", args("three")).await.unwrap()), "three");
    clock.advance(Duration::from_secs(120));
    assert_eq!(text(&conn.call_tool("echo", args("four")).await.unwrap()), "four");
    conn.close().await.unwrap();

    let (a, r) = (fx.auth().stats(), fx.resource().stats());
    assert_eq!(browser.prompts.load(Ordering::SeqCst), 1, "one login");
    assert_eq!((a.refresh_redemptions.len(), a.max_refresh_redemptions()), (2, 1), "{a:?}");
    assert_eq!((a.dpop_proofs_refused, a.reuse_detections), (0, 0), "{a:?}");
    assert_eq!(r.dpop_proofs_refused, 0, "{r:?}");
    assert!(r.dpop_accepted >= 4, "{r:?}");
    assert!(r.dpop_nonce_challenges >= 1, "{r:?}");
    assert_eq!(storage.tokens(&key).await.unwrap().unwrap().token_type(), "DPoP");
}

/// A server whose metadata does not advertise DPoP keeps Bearer tokens: no key is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_dpop_keeps_bearer_and_no_key_is_made() {
    let s = common::setup(HookDecision::Wait).await;
    let config = s.config("acme");
    let conn = s.factory.connect(config.clone()).await.unwrap();
    assert_eq!(text(&conn.call_tool("echo", args("hi")).await.unwrap()), "hi");
    let key = config.token_key();
    assert_eq!(s.storage.dpop_key(&key).await.unwrap(), None);
    assert_eq!(s.storage.tokens(&key).await.unwrap().unwrap().token_type(), "Bearer");
    assert_eq!(s.fx.resource().stats().dpop_accepted, 0);
}

/// A logout and a new authorization (another key) while a connection lives: its next request
/// signs with the new key, read back for the new token set, and is not refused (it would be,
/// signed by the old key: the new tokens are bound to the new one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_authorization_with_a_new_key_is_used_by_a_live_connection() {
    let clock = ManualClock::new(Timestamp::from_secs(1_800_000_000));
    let mut knobs = KnobSettings::default();
    knobs.dpop = true;
    let auth = AuthServer::builder().clock(clock.shared()).knobs(knobs).spawn().await.unwrap();
    let resource = ResourceServer::builder(&auth).spawn().await.unwrap();
    let fx = Fixtures::from_parts(auth, resource);
    let browser = Arc::new(Browser::new(HookDecision::Wait));
    let dir = tempfile::tempdir().unwrap();
    let (factory, storage, _callback, config) =
        factory_over(dir.path(), &clock, &fx, browser.clone()).await;
    let key = config.token_key();
    let live = factory.connect(config.clone()).await.unwrap();
    assert_eq!(text(&live.call_tool("echo", args("one")).await.unwrap()), "one");
    let first = thumbprint(&storage.dpop_key(&key).await.unwrap().unwrap());

    // Logout (everything of the key goes), then a new authorization makes a new key.
    storage.delete_all(&key).await.unwrap();
    let other = factory.connect(config.clone()).await.unwrap();
    assert_eq!(text(&other.call_tool("echo", args("two")).await.unwrap()), "two");
    let second = thumbprint(&storage.dpop_key(&key).await.unwrap().unwrap());
    assert_ne!(first, second);
    assert_eq!(browser.prompts.load(Ordering::SeqCst), 2);

    let refused = fx.resource().stats().dpop_proofs_refused;
    assert_eq!(text(&live.call_tool("echo", args("three")).await.unwrap()), "three");
    let r = fx.resource().stats();
    assert_eq!(r.dpop_proofs_refused, refused, "no proof by the old key: {r:?}");
    assert_eq!(fx.auth().stats().refresh_redemptions.len(), 0, "no refresh was needed");
}
