//! A 401 when rmcp's worker re-opens the GET SSE stream (a reconnect, mid-session) reaches the
//! provider and the reconnect is retried with the recovered token.
//!
//! The fixture servers cannot end a GET stream on demand, so this test serves rmcp's own
//! streamable-HTTP server behind a small gate on 127.0.0.1: the first GET stream ends at once
//! (with `retry: 10`), which makes rmcp's client reconnect, and reconnects are refused unless
//! they carry the second token.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use connection_factory::{
    AuthProvider, BoxFuture, Challenge, ConnectOptions, Connection, Error, Recovery, RequestKind,
    Secret,
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

async fn gate(State(gate): State<Arc<Gate>>, req: Request, next: Next) -> Response {
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

impl AuthProvider for Recorder {
    fn current_token(&self) -> BoxFuture<'_, Result<Option<Secret>, Error>> {
        Box::pin(async move { Ok(self.held.lock().unwrap().clone()) })
    }
    fn on_unauthorized<'a>(
        &'a self,
        rejected: Option<&'a Secret>,
        challenge: &'a Challenge,
    ) -> BoxFuture<'a, Result<Recovery, Error>> {
        self.seen.lock().unwrap().push((challenge.request(), rejected.cloned()));
        let second = Secret::new(SECOND);
        *self.held.lock().unwrap() = Some(second.clone());
        Box::pin(async move { Ok(Recovery::Retry(second)) })
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
        tokio::time::sleep(Duration::from_millis(10)).await;
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
