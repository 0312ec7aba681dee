//! DPoP (RFC 9449) on MCP requests: a provider whose token is DPoP-bound makes every request
//! carry `Authorization: DPoP` and a fresh, valid proof, and a `use_dpop_nonce` refusal from
//! the MCP server is answered with the server's nonce, once, without asking the provider.
//!
//! The server is rmcp's streamable-HTTP server behind a gate on 127.0.0.1 that checks proofs
//! with mcp-fixtures' `DpopChecker` (RFC 9449 §4.3 and §7.1: signature with the embedded key,
//! `typ`, `htm`, `htu`, `iat`, `ath`, unique `jti`, and its nonce).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use connection_factory::{
    AuthProvider, BoxFuture, Challenge, ConnectOptions, Connection, Error, Recovery, Secret,
};
use mcp_clock::{Clock as _, SystemClock};
use mcp_fixtures::{DpopChecker, DpopRefusal};
use mcp_oauth::DpopKey;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::model::{ServerCapabilities, ServerConfig};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ServerHandler, tool, tool_handler, tool_router};

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

impl AuthProvider for Bound {
    fn current_token(&self) -> BoxFuture<'_, Result<Option<Secret>, Error>> {
        Box::pin(async { Ok(Some(Secret::new(TOKEN))) })
    }
    fn on_unauthorized<'a>(
        &'a self,
        _: Option<&'a Secret>,
        _: &'a Challenge,
    ) -> BoxFuture<'a, Result<Recovery, Error>> {
        self.refusals.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Ok(Recovery::AuthorizationRequired) })
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
