//! A 401 when rmcp's worker re-opens the GET SSE stream (a reconnect, mid-session) reaches the
//! provider and the reconnect is retried with the recovered token.
//!
//! The fixture servers cannot end a GET stream on demand, so this test serves rmcp's own
//! streamable-HTTP server behind a small gate on 127.0.0.1: the first GET stream ends at once
//! (with `retry: 10`), which makes rmcp's client reconnect, and reconnects are refused unless
//! they carry the second token.
//!
//! The servers here speak the revisions with sessions (up to 2025-11-25): like servers of
//! those revisions, they refuse the client's MCP 2026-07-28 `server/discover` probe with 400
//! (`older_revision_only`), and the client initializes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use connection_factory::{
    AuthProvider, ConnectOptions, Connection, Error, Recovery, Refusal, RequestKind, Secret,
};
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{ServerCapabilities, ServerConfig};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ServerHandler, schemars, tool, tool_handler, tool_router};
use serde_json::json;

#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
struct EchoArgs {
    /// The text to send back.
    text: String,
}

#[derive(Debug, Clone)]
struct Echo {
    #[allow(dead_code)] // Read by the code that `tool_handler` generates.
    tool_router: ToolRouter<Self>,
}

#[tool_router]
impl Echo {
    fn new() -> Self {
        Echo { tool_router: Self::tool_router() }
    }

    #[tool(description = "Send the text back.")]
    fn echo(&self, Parameters(EchoArgs { text }): Parameters<EchoArgs>) -> String {
        text
    }
}

#[tool_handler]
impl ServerHandler for Echo {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
    }
}

const FIRST: &str = "at_first";
const SECOND: &str = "at_second";
const CHALLENGE: &str = r#"Bearer error="invalid_token", resource_metadata="http://127.0.0.1/.well-known/oauth-protected-resource/mcp""#;

#[derive(Debug, Default)]
struct Gate {
    gets: AtomicU64,
    /// The token of each GET, in order.
    get_tokens: Mutex<Vec<Option<String>>>,
}

/// What a server of a revision before 2026-07-28 answers a POST naming that revision in
/// `MCP-Protocol-Version` (the client's `server/discover` probe): 400 with a JSON-RPC error.
fn older_revision_only(req: &Request) -> Option<Response> {
    let version = req.headers().get("mcp-protocol-version")?.to_str().ok()?;
    (version == "2026-07-28").then(|| {
        let body = json!({"jsonrpc": "2.0", "id": null,
            "error": {"code": -32000, "message": "Bad Request: Unsupported protocol version"}});
        (StatusCode::BAD_REQUEST, axum::Json(body)).into_response()
    })
}

async fn gate(State(gate): State<Arc<Gate>>, req: Request, next: Next) -> Response {
    if let Some(refused) = older_revision_only(&req) {
        return refused;
    }
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let refuse =
        || (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, CHALLENGE)]).into_response();
    if req.method() == Method::GET {
        let n = gate.gets.fetch_add(1, Ordering::SeqCst);
        gate.get_tokens.lock().unwrap().push(token.clone());
        if n == 0 {
            // The first stream ends at once and asks for a reconnect 10 ms later.
            return Response::builder()
                .header(header::CONTENT_TYPE, "text/event-stream")
                .body(Body::from("retry: 10\n\n"))
                .unwrap();
        }
        // The first token has "expired" by the time of the reconnect.
        if token.as_deref() != Some(SECOND) {
            return refuse();
        }
        return next.run(req).await;
    }
    match token.as_deref() {
        Some(FIRST | SECOND) => next.run(req).await,
        _ => refuse(),
    }
}

async fn serve(gate_state: Arc<Gate>) -> String {
    let service: StreamableHttpService<Echo, LocalSessionManager> = StreamableHttpService::new(
        || Ok(Echo::new()),
        Arc::new(LocalSessionManager::default()),
        StreamableHttpServerConfig::default(),
    );
    let router = axum::Router::new()
        .route_service("/mcp", service)
        .layer(middleware::from_fn_with_state(gate_state, gate));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/mcp", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    url
}

/// Holds FIRST; any refusal is answered with SECOND. Records what it is shown.
#[derive(Debug, Default)]
struct Recorder {
    held: Mutex<Option<Secret>>,
    seen: Mutex<Vec<(RequestKind, Option<Secret>)>>,
}

#[async_trait::async_trait]
impl AuthProvider for Recorder {
    async fn current_token(&self) -> Result<Option<Secret>, Error> {
        Ok(self.held.lock().unwrap().clone())
    }
    async fn on_unauthorized(
        &self,
        rejected: Option<&Secret>,
        challenge: &Refusal,
    ) -> Result<Recovery, Error> {
        self.seen.lock().unwrap().push((challenge.request(), rejected.cloned()));
        let second = Secret::new(SECOND);
        *self.held.lock().unwrap() = Some(second.clone());
        Ok(Recovery::Retry(second))
    }
}

#[tokio::test]
async fn a_401_on_a_get_stream_reconnect_reaches_the_provider_and_is_retried() {
    let gate_state = Arc::new(Gate::default());
    let url = serve(gate_state.clone()).await;
    let provider = Arc::new(Recorder::default());
    *provider.held.lock().unwrap() = Some(Secret::new(FIRST));
    let options = ConnectOptions::default().connect_timeout(Duration::from_secs(10));
    let conn = Connection::connect(&url, provider.clone(), options).await.unwrap();

    // The first GET ends, the reconnect is refused, the provider recovers, the retry is let in.
    for _ in 0..1000 {
        if gate_state.gets.load(Ordering::SeqCst) >= 3 {
            break;
        }
        mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(10)).await;
    }
    let tokens = gate_state.get_tokens.lock().unwrap().clone();
    assert_eq!(
        tokens.iter().take(3).map(Option::as_deref).collect::<Vec<_>>(),
        [Some(FIRST), Some(FIRST), Some(SECOND)],
        "first GET, refused reconnect, retried reconnect"
    );
    let seen = provider.seen.lock().unwrap().clone();
    assert_eq!(seen, [(RequestKind::GetStream, Some(Secret::new(FIRST)))]);

    // The session carries on with the recovered token.
    let args = json!({ "text": "after reconnect" }).as_object().cloned();
    let result = conn.call_tool("echo", args).await.unwrap();
    assert_eq!(result.content[0].as_text().unwrap().text, "after reconnect");
    assert_eq!(provider.seen.lock().unwrap().len(), 1, "no further refusals");
}

/// An MCP server whose sessions the test can kill (every request of a dead session gets 404,
/// "session expired") and whose `initialize` POSTs it can refuse (503) a number of times.
#[derive(Debug, Default)]
struct Sessions {
    known: Mutex<std::collections::HashSet<String>>,
    dead: Mutex<std::collections::HashSet<String>>,
    refuse_inits: AtomicU64,
    inits: AtomicU64,
    /// Lose the answer of the next `tools/call`: the server runs it, then the session dies
    /// and the client gets a 502 (a gateway lost the server's answer).
    lose_next_call: std::sync::atomic::AtomicBool,
    /// `tools/call` POSTs that reached the server.
    calls: AtomicU64,
}

impl Sessions {
    fn kill_all(&self) {
        let known: Vec<String> = self.known.lock().unwrap().drain().collect();
        self.dead.lock().unwrap().extend(known);
    }
    fn inits(&self) -> u64 {
        self.inits.load(Ordering::SeqCst)
    }
}

async fn sessions_gate(State(g): State<Arc<Sessions>>, req: Request, next: Next) -> Response {
    if let Some(refused) = older_revision_only(&req) {
        return refused;
    }
    let sid = req.headers().get("mcp-session-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
    if let Some(sid) = &sid
        && g.dead.lock().unwrap().contains(sid)
    {
        return StatusCode::NOT_FOUND.into_response();
    }
    let req = if req.method() == Method::POST {
        let (parts, body) = req.into_parts();
        let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
        if String::from_utf8_lossy(&bytes).contains("\"tools/call\"") {
            g.calls.fetch_add(1, Ordering::SeqCst);
            if g.lose_next_call.swap(false, Ordering::SeqCst) {
                let req = Request::from_parts(parts, Body::from(bytes));
                drop(next.run(req).await); // it ran; its answer is lost
                g.kill_all();
                return StatusCode::BAD_GATEWAY.into_response();
            }
        }
        Request::from_parts(parts, Body::from(bytes))
    } else {
        req
    };
    if req.method() == Method::POST && sid.is_none() {
        g.inits.fetch_add(1, Ordering::SeqCst);
        let refused = g
            .refuse_inits
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if refused {
            return StatusCode::SERVICE_UNAVAILABLE.into_response();
        }
    }
    let resp = next.run(req).await;
    if let Some(new) = resp.headers().get("mcp-session-id").and_then(|v| v.to_str().ok()) {
        g.known.lock().unwrap().insert(new.to_owned());
    }
    resp
}

async fn serve_sessions(g: Arc<Sessions>) -> String {
    let service: StreamableHttpService<Echo, LocalSessionManager> = StreamableHttpService::new(
        || Ok(Echo::new()),
        Arc::new(LocalSessionManager::default()),
        StreamableHttpServerConfig::default(),
    );
    let router = axum::Router::new()
        .route_service("/mcp", service)
        .layer(middleware::from_fn_with_state(g, sessions_gate));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/mcp", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    url
}

/// No credentials (the server has no auth); a refusal is final.
#[derive(Debug)]
struct Anonymous;

#[async_trait::async_trait]
impl AuthProvider for Anonymous {
    async fn current_token(&self) -> Result<Option<Secret>, Error> {
        Ok(None)
    }
    async fn on_unauthorized(&self, _: Option<&Secret>, _: &Refusal) -> Result<Recovery, Error> {
        Ok(Recovery::AuthorizationRequired)
    }
}

const STEP: Duration = Duration::from_secs(1);
const MAX_STEP: Duration = Duration::from_secs(4);

async fn session_conn(g: &Arc<Sessions>, clock: &mcp_clock::ManualClock) -> Connection {
    let url = serve_sessions(g.clone()).await;
    let options = ConnectOptions::default()
        .clock(clock.shared())
        .request_timeout(Duration::from_secs(3600))
        .reconnect(3, STEP, MAX_STEP);
    Connection::connect(&url, Arc::new(Anonymous), options).await.unwrap()
}

/// Await `task`, moving the manual clock past every backoff wait until it finishes.
async fn drive<T>(clock: &mcp_clock::ManualClock, task: tokio::task::JoinHandle<T>) -> T {
    for _ in 0..2000 {
        if task.is_finished() {
            return task.await.unwrap();
        }
        clock.advance(MAX_STEP);
        mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(5)).await;
    }
    panic!("the request never finished");
}

fn echo_args(text: &str) -> Option<serde_json::Map<String, serde_json::Value>> {
    json!({ "text": text }).as_object().cloned()
}

/// The server forgets the session and refuses the next initializes: the connection
/// reconnects with backoff on the injected clock, and the request succeeds on the new session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_session_is_reconnected_with_backoff_and_the_request_retried() {
    let g = Arc::new(Sessions::default());
    let clock = mcp_clock::ManualClock::default();
    let conn = Arc::new(session_conn(&g, &clock).await);
    assert_eq!(
        conn.call_tool("echo", echo_args("one")).await.unwrap().content[0].as_text().unwrap().text,
        "one"
    );
    assert_eq!(g.inits(), 1);

    g.kill_all();
    g.refuse_inits.store(2, Ordering::SeqCst);
    let call = tokio::spawn({
        let conn = conn.clone();
        async move { conn.call_tool("echo", echo_args("two")).await }
    });
    let result = drive(&clock, call).await.unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(result.content[0].as_text().unwrap().text, "two");
    assert_eq!(g.refuse_inits.load(Ordering::SeqCst), 0, "both refusals were met");
    let inits = g.inits();
    assert!((3..=4).contains(&inits), "{inits} initializes");
    // The new session serves later calls without another reconnect.
    assert_eq!(
        conn.call_tool("echo", echo_args("three")).await.unwrap().content[0]
            .as_text()
            .unwrap()
            .text,
        "three"
    );
    assert_eq!(g.inits(), inits);
    assert!(!conn.is_closed());
}

/// A server that never takes a new session: the reconnects are bounded (3 here), spaced by
/// backoff on the injected clock, and the request ends with a typed Reconnect error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_are_bounded_then_a_typed_error() {
    let g = Arc::new(Sessions::default());
    let clock = mcp_clock::ManualClock::default();
    let conn = Arc::new(session_conn(&g, &clock).await);
    conn.list_tools().await.unwrap();
    g.kill_all();
    g.refuse_inits.store(u64::MAX, Ordering::SeqCst);
    let call = tokio::spawn({
        let conn = conn.clone();
        async move { conn.call_tool("echo", echo_args("never")).await }
    });
    // Without the clock moving, the first reconnect fails and the backoff waits: no second.
    let mut seen = g.inits();
    for _ in 0..1000 {
        mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(50)).await;
        let now = g.inits();
        if now == seen && now >= 2 {
            break;
        }
        seen = now;
    }
    assert!(!call.is_finished(), "the backoff runs on the injected clock");
    assert!((2..=3).contains(&g.inits()), "one reconnect before the clock moves: {}", g.inits());
    let err = drive(&clock, call).await.unwrap_err();
    assert!(matches!(err, Error::Reconnect { attempts: 3, .. }), "{err:?}");
    let tries = g.inits() - 1;
    // Ours (3), plus at most one re-initialization by rmcp itself.
    assert!((3..=4).contains(&tries), "{tries} initializes after the loss");
    assert!(std::error::Error::source(&err).is_some(), "the last failure is the source");
}

/// The race: the session is lost after a tool call reached the server (it ran; its answer was
/// lost: a 502 from a gateway, and the session gone). The request used to be sent again on a new session, so
/// the tool ran twice. A call that may have been processed is not re-sent now: it fails with
/// `Error::Interrupted`, the tool ran once, and the next call reconnects and succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_call_whose_answer_was_lost_is_not_sent_again() {
    let g = Arc::new(Sessions::default());
    let clock = mcp_clock::ManualClock::default();
    let conn = Arc::new(session_conn(&g, &clock).await);
    conn.call_tool("echo", echo_args("one")).await.unwrap();
    assert_eq!(g.calls.load(Ordering::SeqCst), 1);

    g.lose_next_call.store(true, Ordering::SeqCst);
    let call = tokio::spawn({
        let conn = conn.clone();
        async move { conn.call_tool("echo", echo_args("twice?")).await }
    });
    let err = drive(&clock, call).await.unwrap_err();
    assert!(matches!(err, Error::Interrupted { operation: "call_tool", .. }), "{err:?}");
    assert_eq!(g.calls.load(Ordering::SeqCst), 2, "the lost call reached the server once");

    let next = tokio::spawn({
        let conn = conn.clone();
        async move { conn.call_tool("echo", echo_args("three")).await }
    });
    let result = drive(&clock, next).await.unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(result.content[0].as_text().unwrap().text, "three");
    assert_eq!(g.calls.load(Ordering::SeqCst), 3);
}

/// The reconnect counts within the request's budget: with a 2 s request timeout and backoff
/// steps of at least 2 s, a server that never takes a new session ends the request with a
/// timeout at 2 s, not after every reconnect attempt and its backoff (which used to run
/// outside the request timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reconnect_runs_within_the_request_timeout() {
    let g = Arc::new(Sessions::default());
    let clock = mcp_clock::ManualClock::default();
    let url = serve_sessions(g.clone()).await;
    let options = ConnectOptions::default()
        .clock(clock.shared())
        .request_timeout(Duration::from_secs(2))
        .reconnect(3, MAX_STEP, MAX_STEP);
    let conn = Arc::new(Connection::connect(&url, Arc::new(Anonymous), options).await.unwrap());
    conn.list_tools().await.unwrap();
    g.kill_all();
    g.refuse_inits.store(u64::MAX, Ordering::SeqCst);
    let call = tokio::spawn({
        let conn = conn.clone();
        async move { conn.call_tool("echo", echo_args("never")).await }
    });
    let err = drive(&clock, call).await.unwrap_err();
    assert!(matches!(err, Error::Timeout { operation: "call_tool", .. }), "{err:?}");
    assert!(g.inits() - 1 < 4, "not every reconnect attempt ran: {}", g.inits());
}
