//! The auth transport against the fixture servers over real loopback HTTP: silent refresh on a
//! mid-session 401, coalescing, revocation, insufficient scope, the GET SSE stream, detaching.

use crate::common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{args, eventually, text};
use connection_factory::{
    AuthHttpClient, AuthProvider, BoxFuture, ConnectOptions, Connection, Error, Recovery,
    RefreshFn, RefreshingProvider, Refusal, RequestKind, Secret, Tokens,
};
use mcp_clock::{ManualClock, SharedClock, Timestamp};
use mcp_fixtures::{AuthServer, ClientAuth, ClientSpec, Fixtures, KnobSettings, ResourceServer};
use rmcp::transport::streamable_http_client::{
    StreamableHttpClient, StreamableHttpError, StreamableHttpPostResponse,
};
use serde_json::{Value, json};
use tokio::sync::watch;

const LIFETIME: Duration = Duration::from_secs(60);

fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// Fixture servers on a manual clock, with rotation and strict reuse detection (no grace).
async fn fixtures() -> (ManualClock, Fixtures) {
    let clock = ManualClock::new(Timestamp::from_secs(1_800_000_000));
    let mut knobs = KnobSettings::default();
    knobs.access_token_lifetime = LIFETIME;
    knobs.refresh_rotation = true;
    knobs.reuse_detection = true;
    knobs.reuse_grace = None;
    let fx = Fixtures::start_with(clock.shared(), knobs).await.unwrap();
    (clock, fx)
}

/// A refresh-token grant at the fixture's token endpoint with plain reqwest; `gate` holds the
/// redemption until the test opens it.
fn refresher(fx: &Fixtures, client_id: &str, gate: Option<watch::Receiver<bool>>) -> RefreshFn {
    let endpoint = fx.auth().token_endpoint();
    let resource = fx.resource().url().to_owned();
    let client_id = client_id.to_owned();
    let http = http();
    Arc::new(move |rt: Secret| -> BoxFuture<'static, Result<Tokens, Error>> {
        let (endpoint, resource, client_id, http) =
            (endpoint.clone(), resource.clone(), client_id.clone(), http.clone());
        let mut gate = gate.clone();
        Box::pin(async move {
            if let Some(gate) = gate.as_mut() {
                gate.wait_for(|open| *open).await.map_err(|e| Error::provider("gate", e))?;
            }
            let form = [
                ("grant_type", "refresh_token"),
                ("refresh_token", rt.expose()),
                ("client_id", client_id.as_str()),
                ("resource", resource.as_str()),
            ];
            let resp = http
                .post(&endpoint)
                .form(&form)
                .send()
                .await
                .map_err(|e| Error::provider("token endpoint", e))?;
            let status = resp.status();
            let body: Value = resp.json().await.map_err(|e| Error::provider("token body", e))?;
            if status.is_success() {
                let access = body["access_token"].as_str().unwrap().to_owned();
                let refresh = body["refresh_token"].as_str().map(Secret::new);
                Ok(Tokens::new(access, refresh))
            } else if body["error"] == "invalid_grant" {
                Err(Error::AuthorizationRequired { www_authenticate: None })
            } else {
                Err(Error::provider_msg(format!("token endpoint said {status}: {body}")))
            }
        })
    })
}

/// A public client, tokens with `mcp:tools` for the resource, and a reference provider.
fn provider(
    fx: &Fixtures,
    gate: Option<watch::Receiver<bool>>,
) -> (Arc<RefreshingProvider>, Tokens) {
    let client = fx.auth().register_client(ClientSpec::new(ClientAuth::None)).unwrap();
    let issued = fx.auth().issue_tokens(client.client_id(), "mcp:tools", Some(fx.resource().url()));
    let tokens = Tokens::new(issued.access_token(), issued.refresh_token().map(Secret::new));
    let provider = RefreshingProvider::new(
        "tenant-a:alice:fixture",
        tokens.clone(),
        refresher(fx, client.client_id(), gate),
        SharedClock::system(),
    );
    (Arc::new(provider), tokens)
}

fn options() -> ConnectOptions {
    ConnectOptions::default()
        .connect_timeout(Duration::from_secs(10))
        .request_timeout(Duration::from_secs(20))
}

/// Wait until the resource server has seen `n` requests: after connect, rmcp's worker opens
/// the GET SSE stream in the background, and tests that count requests wait for it. The
/// fixture speaks the revisions up to 2025-11-25, so a handshake is three POSTs: the
/// `server/discover` probe (refused), `initialize` and `notifications/initialized`.
async fn requests_seen(fx: &Fixtures, n: u64) {
    eventually("the session's background requests", || fx.resource().stats().requests >= n).await;
}

/// The race: 50 tool calls are in flight when the access token expires, so all 50 are refused
/// with the same token at once, and all 50 call `on_unauthorized` concurrently. With rotation
/// and strict reuse detection, a second redemption of the refresh token would revoke the whole
/// family and fail the calls. The refresh is held until all 50 refusals have happened, so the
/// test does not depend on timing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_401s_redeem_the_refresh_token_once_and_all_succeed() {
    let (clock, fx) = fixtures().await;
    let (gate_tx, gate_rx) = watch::channel(false);
    let (provider, _) = provider(&fx, Some(gate_rx));
    let conn = Connection::connect(
        fx.resource().url(),
        provider.clone(),
        options().max_concurrent_requests(64),
    )
    .await
    .unwrap();
    assert_eq!(text(&conn.call_tool("echo", args("warm")).await.unwrap()), "warm");
    requests_seen(&fx, 5).await; // the GET stream is open before the tokens expire
    assert_eq!(fx.resource().stats().unauthorized, 0);

    clock.advance(LIFETIME + Duration::from_secs(1));
    let conn = Arc::new(conn);
    let calls: Vec<_> = (0..50)
        .map(|i| {
            let conn = conn.clone();
            tokio::spawn(async move { conn.call_tool("echo", args(&format!("call {i}"))).await })
        })
        .collect();
    eventually("50 refusals", || fx.resource().stats().unauthorized >= 50).await;
    gate_tx.send_replace(true);
    for (i, call) in calls.into_iter().enumerate() {
        let result = call.await.unwrap().unwrap_or_else(|e| panic!("call {i}: {e:?}"));
        assert_eq!(text(&result), format!("call {i}"));
    }

    let auth = fx.auth().stats();
    assert_eq!(auth.refresh_token_requests, 1, "{auth:?}");
    assert_eq!(auth.max_refresh_redemptions(), 1);
    assert_eq!(auth.reuse_detections, 0);
    assert_eq!(auth.families_revoked, 0);
    assert_eq!(provider.refreshes(), 1);
    let rs = fx.resource().stats();
    assert_eq!(rs.unauthorized, 50, "{rs:?}");
    assert_eq!(rs.tool_calls["echo"], 51);
}

/// Server-side revocation: the refresh is refused, the call fails with a typed
/// AuthorizationRequired after exactly one request and one redemption, and a later call does
/// not redeem the dead refresh token again.
#[tokio::test]
async fn revocation_gives_up_with_authorization_required_and_no_retry_loop() {
    let (_clock, fx) = fixtures().await;
    let (provider, _) = provider(&fx, None);
    let conn = Connection::connect(fx.resource().url(), provider.clone(), options()).await.unwrap();
    conn.call_tool("echo", args("before")).await.unwrap();
    requests_seen(&fx, 5).await; // the discover probe, initialize, initialized, the GET stream, the call

    fx.auth().revoke_all_tokens();
    let before = fx.resource().stats();
    let err = conn.call_tool("echo", args("after")).await.unwrap_err();
    assert!(matches!(err, Error::AuthorizationRequired { .. }), "{err:?}");
    let after = fx.resource().stats();
    assert_eq!(after.requests - before.requests, 1, "one refused POST, no retry: {after:?}");
    assert_eq!(after.unauthorized - before.unauthorized, 1);
    let auth = fx.auth().stats();
    assert_eq!(auth.refresh_token_requests, 1);
    assert_eq!(provider.tokens(), None, "the rejected credentials are forgotten");

    let err = conn.call_tool("echo", args("again")).await.unwrap_err();
    assert!(matches!(err, Error::AuthorizationRequired { .. }), "{err:?}");
    assert_eq!(fx.auth().stats().refresh_token_requests, 1, "the dead refresh token is not resent");
    assert_eq!(fx.resource().stats().requests - after.requests, 1);
    assert_eq!(fx.resource().stats().tool_calls["echo"], 1);
}

/// A 403 insufficient_scope on `counter` (which needs mcp:write) skips the refresh and surfaces
/// a typed InsufficientScope with the scope the server asked for; the connection stays usable.
#[tokio::test]
async fn insufficient_scope_skips_refresh_and_is_typed() {
    let (_clock, fx) = fixtures().await;
    let (provider, _) = provider(&fx, None);
    let conn = Connection::connect(fx.resource().url(), provider.clone(), options()).await.unwrap();

    let err = conn.call_tool("counter", None).await.unwrap_err();
    match &err {
        Error::InsufficientScope { scope, www_authenticate } => {
            assert!(scope.as_deref().is_some_and(|s| s.contains("mcp:write")), "{err:?}");
            assert!(www_authenticate.contains("insufficient_scope"));
        }
        other => panic!("expected InsufficientScope, got {other:?}"),
    }
    assert_eq!(fx.resource().counter(), 0);
    assert_eq!(fx.resource().stats().forbidden, 1);
    assert_eq!(fx.auth().stats().refresh_token_requests, 0);
    assert_eq!(provider.refreshes(), 0);
    assert_eq!(text(&conn.call_tool("echo", args("still here")).await.unwrap()), "still here");
}

/// One challenge shown to a provider: request, status, rejected token, resource_metadata.
type Seen = (RequestKind, u16, Option<Secret>, Option<String>);

/// A provider whose held token the server does not know: every request is refused once and
/// retried with the good token. Records each challenge it is shown.
#[derive(Debug)]
struct StaleThenGood {
    stale: Secret,
    good: Secret,
    seen: Mutex<Vec<Seen>>,
    calls: AtomicU64,
}

impl StaleThenGood {
    fn new(good: Secret) -> Arc<Self> {
        Arc::new(StaleThenGood {
            stale: Secret::new("at_not-a-token-the-server-knows"),
            good,
            seen: Mutex::default(),
            calls: AtomicU64::new(0),
        })
    }
    fn seen_kind(&self, kind: RequestKind) -> usize {
        self.seen.lock().unwrap().iter().filter(|s| s.0 == kind).count()
    }
}

#[async_trait::async_trait]
impl AuthProvider for StaleThenGood {
    async fn current_token(&self) -> Result<Option<Secret>, Error> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(Some(self.stale.clone()))
    }
    async fn on_unauthorized(
        &self,
        rejected: Option<&Secret>,
        challenge: &Refusal,
    ) -> Result<Recovery, Error> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.seen.lock().unwrap().push((
            challenge.request(),
            challenge.status(),
            rejected.cloned(),
            challenge.resource_metadata(),
        ));
        Ok(Recovery::Retry(self.good.clone()))
    }
}

/// The GET that opens the SSE stream goes through the provider like the POSTs: its 401 reaches
/// `on_unauthorized` with the rejected token and the challenge, and the retried GET opens the
/// stream. Driven through `AuthHttpClient` directly, then through a whole `Connection` (where
/// rmcp's worker opens the stream, and re-opens it the same way on reconnect).
#[tokio::test]
async fn a_401_on_the_get_sse_stream_reaches_the_provider_and_is_retried() {
    let (_clock, fx) = fixtures().await;
    let (_, tokens) = provider(&fx, None);
    let url: Arc<str> = fx.resource().url().into();

    let direct = StaleThenGood::new(tokens.access.clone());
    let client = AuthHttpClient::new(direct.clone()).unwrap();
    let init: rmcp::model::ClientJsonRpcMessage = serde_json::from_value(json!({
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}
    }))
    .unwrap();
    let session = match client.post_message(url.clone(), init, None, None, HashMap::new()).await {
        Ok(
            StreamableHttpPostResponse::Sse(_, Some(s))
            | StreamableHttpPostResponse::Json(_, Some(s)),
        ) => s,
        other => panic!("initialize: {other:?}"),
    };
    let before = fx.resource().stats().unauthorized;
    let stream = client
        .get_stream(url.clone(), Some(session.clone().into()), None, None, HashMap::new())
        .await;
    assert!(stream.is_ok(), "the retried GET opens the stream: {:?}", stream.err());
    assert_eq!(fx.resource().stats().unauthorized - before, 1);
    let seen = direct.seen.lock().unwrap().clone();
    let get = seen.iter().find(|s| s.0 == RequestKind::GetStream).expect("GET challenge");
    assert_eq!(get.1, 401);
    assert_eq!(get.2.as_ref(), Some(&direct.stale));
    assert_eq!(get.3.as_deref(), Some(fx.resource().resource_metadata_url()));

    // The same through a Connection: rmcp's worker opens the stream after the handshake.
    let p = StaleThenGood::new(tokens.access.clone());
    let conn = Connection::connect(&url, p.clone(), options()).await.unwrap();
    assert_eq!(text(&conn.call_tool("echo", args("x")).await.unwrap()), "x");
    eventually("the GET stream's 401", || p.seen_kind(RequestKind::GetStream) >= 1).await;
    assert!(p.seen_kind(RequestKind::Post) >= 2, "initialize and the tool call");

    // Detached, the GET is refused and the provider is not asked.
    // (Detached requests carry the last token used; revoke it so this one is refused.)
    fx.auth().revoke_all_tokens();
    client.detach();
    let calls = direct.calls.load(Ordering::SeqCst);
    let refused =
        client.get_stream(url.clone(), Some(session.into()), None, None, HashMap::new()).await;
    assert!(matches!(refused, Err(StreamableHttpError::AuthRequired(_))), "{:?}", refused.err());
    assert_eq!(direct.calls.load(Ordering::SeqCst), calls);
}

/// Counts every call into the provider it wraps.
#[derive(Debug)]
struct Counting {
    inner: Arc<RefreshingProvider>,
    calls: AtomicU64,
}

#[async_trait::async_trait]
impl AuthProvider for Counting {
    async fn current_token(&self) -> Result<Option<Secret>, Error> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.current_token().await
    }
    async fn on_unauthorized(
        &self,
        rejected: Option<&Secret>,
        challenge: &Refusal,
    ) -> Result<Recovery, Error> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.on_unauthorized(rejected, challenge).await
    }
}

/// Once the connection is dropped (or closed), nothing reaches the provider: not rmcp's
/// session DELETE as the worker winds down, not a later expiry.
#[tokio::test]
async fn the_provider_is_never_called_after_the_connection_is_dropped() {
    for close in [false, true] {
        let (clock, fx) = fixtures().await;
        let (inner, _) = provider(&fx, None);
        let p = Arc::new(Counting { inner, calls: AtomicU64::new(0) });
        let conn = Connection::connect(fx.resource().url(), p.clone(), options()).await.unwrap();
        conn.call_tool("echo", args("x")).await.unwrap();
        requests_seen(&fx, 5).await;
        let calls = p.calls.load(Ordering::SeqCst);
        assert!(calls >= 3, "initialize, initialized, the GET and the call: {calls}");
        let requests = fx.resource().stats().requests;

        if close {
            conn.close().await.unwrap();
        } else {
            drop(conn);
        }
        clock.advance(LIFETIME * 2);
        fx.auth().revoke_all_tokens();
        // The worker sends its session DELETE after the drop: wait for it to arrive.
        eventually("the session DELETE", || fx.resource().stats().requests > requests).await;
        mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(200)).await;
        assert_eq!(p.calls.load(Ordering::SeqCst), calls, "close={close}");
        assert_eq!(fx.auth().stats().refresh_token_requests, 0);
    }
}

/// A provider that fails (the token endpoint is down) gives the caller a typed Provider error,
/// and a connect that the provider cannot authorize fails with AuthorizationRequired.
#[tokio::test]
async fn provider_failures_and_refusals_at_connect_are_typed() {
    let (clock, fx) = fixtures().await;
    let (inner, _) = provider(&fx, None);
    let conn = Connection::connect(fx.resource().url(), inner.clone(), options()).await.unwrap();
    clock.advance(LIFETIME * 2);
    fx.auth().knobs().fail_token_requests(mcp_fixtures::InjectedFailure::server_error(1));
    let err = conn.call_tool("echo", args("x")).await.unwrap_err();
    assert!(matches!(&err, Error::Provider { message, .. } if message.contains("503")), "{err:?}");
    // The tokens survive a transient failure: the next call refreshes and succeeds.
    assert_eq!(text(&conn.call_tool("echo", args("y")).await.unwrap()), "y");
    assert_eq!(inner.refreshes(), 2);
    conn.close().await.unwrap();

    // Revoked before connecting: the handshake's 401 ends in AuthorizationRequired.
    fx.auth().revoke_all_tokens();
    let err = Connection::connect(fx.resource().url(), inner.clone(), options()).await.unwrap_err();
    assert!(matches!(err, Error::AuthorizationRequired { .. }), "{err:?}");
    let err = Connection::connect("ftp://127.0.0.1/mcp", inner, options()).await.unwrap_err();
    assert!(matches!(err, Error::InvalidConfig(_)));
}

/// Tokens never print: not in the provider's, the client's or the connection's Debug, nor in
/// the errors.
#[tokio::test]
async fn secrets_are_redacted() {
    let (_clock, fx) = fixtures().await;
    let (provider, tokens) = provider(&fx, None);
    let conn = Connection::connect(fx.resource().url(), provider.clone(), options()).await.unwrap();
    let access = tokens.access.expose().to_owned();
    let refresh = tokens.refresh.as_ref().unwrap().expose().to_owned();
    fx.auth().revoke_all_tokens();
    let err = conn.call_tool("echo", args("x")).await.unwrap_err();
    for shown in [
        format!("{conn:?}"),
        format!("{provider:?}"),
        format!("{tokens:?}"),
        format!("{err:?} {err}"),
    ] {
        assert!(!shown.contains(&access) && !shown.contains(&refresh), "{shown}");
    }
    assert!(format!("{conn:?}").contains("[redacted]"));
}

/// A provider that always "recovers" with another token the server does not know.
#[derive(Debug, Default)]
struct AlwaysBadRetry {
    good_for_handshake: Mutex<Option<Secret>>,
    recoveries: AtomicU64,
}

#[async_trait::async_trait]
impl AuthProvider for AlwaysBadRetry {
    async fn current_token(&self) -> Result<Option<Secret>, Error> {
        Ok(self.good_for_handshake.lock().unwrap().clone())
    }
    async fn on_unauthorized(
        &self,
        _rejected: Option<&Secret>,
        _challenge: &Refusal,
    ) -> Result<Recovery, Error> {
        let n = self.recoveries.fetch_add(1, Ordering::SeqCst);
        Ok(Recovery::Retry(Secret::new(format!("at_bogus-{n}"))))
    }
}

/// A retried request that is refused again is not retried a second time, and the provider is
/// asked once per request: a server that keeps refusing cannot cause a loop.
#[tokio::test]
async fn a_refused_retry_is_surfaced_not_retried_again() {
    let (_clock, fx) = fixtures().await;
    let (_, tokens) = provider(&fx, None);
    let p = Arc::new(AlwaysBadRetry::default());
    *p.good_for_handshake.lock().unwrap() = Some(tokens.access.clone());
    let conn = Connection::connect(fx.resource().url(), p.clone(), options()).await.unwrap();
    requests_seen(&fx, 4).await; // the discover probe, initialize, initialized, the GET stream
    fx.auth().revoke_all_tokens();
    let before = fx.resource().stats();
    let err = conn.call_tool("echo", args("x")).await.unwrap_err();
    assert!(matches!(err, Error::AuthorizationRequired { .. }), "{err:?}");
    assert_eq!(p.recoveries.load(Ordering::SeqCst), 1);
    let after = fx.resource().stats();
    assert_eq!(after.unauthorized - before.unauthorized, 2, "the request and its one retry");
    assert_eq!(after.requests - before.requests, 2);
}

/// A call that outlives the request timeout fails with a typed Timeout; the timeout runs on the
/// injected clock.
#[tokio::test]
async fn a_request_past_its_timeout_is_a_typed_timeout() {
    let (_clock, fx) = fixtures().await;
    let (p, _) = provider(&fx, None);
    let clock = ManualClock::new(Timestamp::from_secs(1_800_000_000));
    let opts = options().request_timeout(Duration::from_secs(5)).clock(clock.shared());
    let conn = Arc::new(Connection::connect(fx.resource().url(), p, opts).await.unwrap());
    let slow = json!({ "ms": 10_000 }).as_object().cloned();
    let call = tokio::spawn({
        let conn = conn.clone();
        async move { conn.call_tool("slow", slow).await }
    });
    eventually("the slow call to reach the server", || {
        fx.resource().stats().tool_calls.get("slow") == Some(&1)
    })
    .await;
    clock.advance(Duration::from_secs(6));
    let err = call.await.unwrap().unwrap_err();
    assert!(
        matches!(err, Error::Timeout { operation: "call_tool", after } if after == Duration::from_secs(5)),
        "{err:?}"
    );
    assert_eq!(text(&conn.call_tool("echo", args("after")).await.unwrap()), "after");
}

/// The protocol revisions: against a server that speaks MCP 2026-07-28 the client opens with
/// `server/discover` (no `initialize`), and every POST carries `MCP-Protocol-Version:
/// 2026-07-28`, an `Mcp-Method` header naming the body's method and the request `_meta`
/// protocol version. Against servers of 2025-11-25, 2025-06-18 and 2025-03-26 only, the
/// probe is refused (400, as those servers answer an unknown `MCP-Protocol-Version`), the
/// client initializes, and every later POST carries the revision the server chose.
#[tokio::test]
async fn speaks_2026_07_28_and_falls_back_to_older_revisions() {
    let modern = vec!["2025-03-26", "2025-06-18", "2025-11-25", "2026-07-28"];
    for versions in [modern, vec!["2025-11-25"], vec!["2025-06-18"], vec!["2025-03-26"]] {
        let auth = AuthServer::builder().spawn().await.unwrap();
        let resource = ResourceServer::builder(&auth)
            .protocol_versions(versions.clone())
            .spawn()
            .await
            .unwrap();
        let fx = Fixtures::from_parts(auth, resource);
        let (provider, _) = provider(&fx, None);
        let conn = Connection::connect(fx.resource().url(), provider, options()).await.unwrap();
        assert_eq!(conn.list_tools().await.unwrap().len(), 3, "{versions:?}");
        assert_eq!(text(&conn.call_tool("echo", args("hi")).await.unwrap()), "hi");
        conn.close().await.unwrap();

        let posts = fx.resource().stats().posts;
        let methods: Vec<&str> = posts.iter().filter_map(|p| p.method.as_deref()).collect();
        assert_eq!(methods.first(), Some(&"server/discover"), "{versions:?}: {posts:?}");
        assert!(methods.contains(&"tools/list") && methods.contains(&"tools/call"), "{posts:?}");
        let newest = *versions.last().unwrap();
        if newest == "2026-07-28" {
            assert!(!methods.contains(&"initialize"), "{posts:?}");
            for post in &posts {
                assert_eq!(post.protocol_version.as_deref(), Some("2026-07-28"), "{post:?}");
                assert_eq!(post.mcp_method, post.method, "{post:?}");
                assert_eq!(post.meta_protocol_version.as_deref(), Some("2026-07-28"), "{post:?}");
            }
        } else {
            let init = methods.iter().position(|m| *m == "initialize").expect("initialize");
            assert_eq!(init, 1, "{posts:?}");
            for post in &posts[init + 1..] {
                assert_eq!(post.protocol_version.as_deref(), Some(newest), "{post:?}");
                assert_eq!(post.mcp_method, None, "{post:?}");
            }
        }
    }
}
