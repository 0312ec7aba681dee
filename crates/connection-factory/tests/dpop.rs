//! DPoP (RFC 9449) on MCP requests: a provider whose token is DPoP-bound makes every request
//! carry `Authorization: DPoP` and a fresh, valid proof, and a `use_dpop_nonce` refusal from
//! the MCP server is answered with the server's nonce, once, without asking the provider.
//!
//! The server is rmcp's streamable-HTTP server behind a gate on 127.0.0.1 that checks proofs
//! the way RFC 9449 §4.3 and §7.1 say (signature with the embedded key, `typ`, `htm`, `htu`,
//! `ath`, unique `jti`, and its nonce).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use connection_factory::{
    AuthProvider, BoxFuture, Challenge, ConnectOptions, Connection, Error, Recovery, Secret,
};
use mcp_oauth::DpopKey;
use p256::ecdsa::signature::Verifier as _;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::model::{ServerCapabilities, ServerConfig};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ServerHandler, tool, tool_handler, tool_router};
use serde_json::Value;
use sha2::{Digest, Sha256};

const TOKEN: &str = "at_dpop_bound";
const NONCE: &str = "rs-nonce-1";
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

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
    jtis: Mutex<HashSet<String>>,
    /// Everything wrong with the proofs seen (empty when all were valid).
    problems: Mutex<Vec<String>>,
}

fn json_part(part: &str) -> Option<Value> {
    serde_json::from_slice(&B64.decode(part).ok()?).ok()
}

/// Check one proof for `method` on the gate's URL with `token`; `Ok(has_nonce)`.
fn check(gate: &Gate, proof: &str, method: &str, token: &str) -> Result<bool, String> {
    let parts: Vec<&str> = proof.split('.').collect();
    let [h, c, sig] = parts[..] else { return Err("not a JWS".into()) };
    let (header, claims) = (json_part(h).ok_or("header")?, json_part(c).ok_or("claims")?);
    if header["typ"] != "dpop+jwt" || header["alg"] != "ES256" {
        return Err(format!("header {header}"));
    }
    let coord = |n: &str| B64.decode(header["jwk"][n].as_str().unwrap_or_default()).ok();
    let (Some(x), Some(y)) = (coord("x"), coord("y")) else { return Err("jwk".into()) };
    let sec1 = [&[4u8][..], &x, &y].concat();
    let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(&sec1).map_err(|e| e.to_string())?;
    let sig = p256::ecdsa::Signature::from_slice(&B64.decode(sig).map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    key.verify(format!("{h}.{c}").as_bytes(), &sig).map_err(|_| "bad signature".to_owned())?;
    if claims["htm"] != method || claims["htu"] != *gate.url.lock().unwrap() {
        return Err(format!("htm/htu {claims}"));
    }
    if claims["ath"] != B64.encode(Sha256::digest(token.as_bytes())) {
        return Err("ath".into());
    }
    if !claims["iat"].is_u64() {
        return Err("iat".into());
    }
    let jti = claims["jti"].as_str().ok_or("jti")?.to_owned();
    if !gate.jtis.lock().unwrap().insert(jti) {
        return Err("a replayed jti".into());
    }
    Ok(claims["nonce"] == NONCE)
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
    match check(gate, &proof, req.method().as_str(), token) {
        Err(problem) => {
            gate.problems.lock().unwrap().push(problem);
            Some(refuse("DPoP error=\"invalid_dpop_proof\""))
        }
        Ok(false) => {
            gate.nonce_challenges.fetch_add(1, Ordering::SeqCst);
            let mut resp = refuse("DPoP error=\"use_dpop_nonce\"");
            resp.headers_mut().insert("dpop-nonce", NONCE.parse().unwrap());
            Some(resp)
        }
        Ok(true) if token == TOKEN => {
            gate.accepted.fetch_add(1, Ordering::SeqCst);
            None
        }
        Ok(true) => Some(refuse("DPoP error=\"invalid_token\"")),
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
    assert_eq!(provider.key.nonce(&url).as_deref(), Some(NONCE));
}
