//! The interactive flow end to end: discovery, dynamic registration, PKCE, the PENDING flow and
//! its state mapping, the callback router, one prompt per key, queued calls resuming.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use connection_factory::{
    AuthorizationHook, AuthorizationReason, AuthorizationRequest, BoxFuture, ConnectionFactory,
    Error, FactoryConfig, HookDecision, OAuthRefresher, callback_router,
};
use flow_state::{FlowManager, MemoryStore, SharedStore};
use mcp_clock::{ManualClock, Timestamp};
use mcp_fixtures::{Approval, Fixtures, KnobSettings};
use mcp_oauth::{ClientConfig, HttpPolicy, OAuthClient, ReqwestHttpClient};
use serde_json::{Value, json};
use token_storage::{Keyring, MemoryTokenStore, TokenStorage, TokenStorageConfig};

/// A browser that visits the authorization URL (following the redirect to the callback).
#[derive(Debug)]
struct Browser {
    http: reqwest::Client,
    prompts: AtomicU64,
    reasons: std::sync::Mutex<Vec<AuthorizationReason>>,
    decision: HookDecision,
}

impl AuthorizationHook for Browser {
    fn authorization_required(&self, request: AuthorizationRequest) -> BoxFuture<'_, HookDecision> {
        self.prompts.fetch_add(1, Ordering::SeqCst);
        self.reasons.lock().unwrap().push(request.reason);
        let http = self.http.clone();
        tokio::spawn(async move {
            let _ = http.get(request.authorization_url).send().await;
        });
        let decision = self.decision;
        Box::pin(async move { decision })
    }
}

struct Setup {
    clock: ManualClock,
    fx: Fixtures,
    factory: ConnectionFactory,
    browser: Arc<Browser>,
    redirect: String,
}

async fn setup(decision: HookDecision) -> Setup {
    let clock = ManualClock::new(Timestamp::from_secs(1_800_000_000));
    let mut knobs = KnobSettings::default();
    knobs.access_token_lifetime = Duration::from_secs(60);
    knobs.refresh_rotation = true;
    knobs.reuse_detection = true;
    knobs.reuse_grace = None;
    let fx = Fixtures::start_with(clock.shared(), knobs).await.unwrap();
    let oauth =
        OAuthClient::new(ReqwestHttpClient::new(HttpPolicy::default()).unwrap(), clock.shared());
    let mut config = TokenStorageConfig::default();
    config.max_date_correction = Duration::ZERO; // hyper's Date header is real time
    let storage = TokenStorage::builder(
        MemoryTokenStore::new().into(),
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
    tokio::spawn(async move { axum::serve(listener, router).await });

    let browser = Arc::new(Browser {
        http: reqwest::Client::builder().no_proxy().build().unwrap(),
        prompts: AtomicU64::new(0),
        reasons: Default::default(),
        decision,
    });
    let factory = ConnectionFactory::new(flows, storage).with_interactive(oauth, browser.clone());
    Setup { clock, fx, factory, browser, redirect }
}

impl Setup {
    fn config(&self, tenant: &str) -> FactoryConfig {
        FactoryConfig::new(self.fx.resource().url(), tenant, "alice", "fixture")
            .connect_timeout(Duration::from_secs(10))
            .oauth_wait_timeout(Duration::from_secs(10))
            .client(ClientConfig::new("factory tests", self.redirect.clone()))
    }

    fn prompts(&self) -> u64 {
        self.browser.prompts.load(Ordering::SeqCst)
    }
}

fn args(text: &str) -> Option<serde_json::Map<String, Value>> {
    json!({ "text": text }).as_object().cloned()
}

fn text(result: &connection_factory::CallToolResult) -> String {
    result.content[0].as_text().expect("text content").text.clone()
}

/// No tokens at connect: discovery, dynamic registration, one prompt, the callback stores the
/// tokens and completes the flow, and the connect goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_without_tokens_authorizes_interactively() {
    let s = setup(HookDecision::Wait).await;
    let conn = s.factory.connect(s.config("tenant-a")).await.unwrap();
    assert_eq!(text(&conn.call_tool("echo", args("hi")).await.unwrap()), "hi");
    assert_eq!(s.prompts(), 1);
    assert_eq!(s.browser.reasons.lock().unwrap()[0], AuthorizationReason::NoTokens);
    let auth = s.fx.auth().stats();
    assert_eq!(auth.registrations, 1, "{auth:?}");
    assert_eq!(auth.authorization_code_requests, 1, "{auth:?}");

    // A second connection for the same key reuses the stored client and tokens: no prompt.
    let again = s.factory.connect(s.config("tenant-a")).await.unwrap();
    assert_eq!(text(&again.call_tool("echo", args("again")).await.unwrap()), "again");
    assert_eq!(s.prompts(), 1);
    assert_eq!(s.fx.auth().stats().registrations, 1);
}

/// Server-side revocation mid-session: the refresh is refused, the interactive fallback prompts
/// once (manual approval), and every queued call resumes after approval.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revocation_falls_back_to_one_prompt_and_queued_calls_resume() {
    let s = setup(HookDecision::Wait).await;
    let conn = Arc::new(s.factory.connect(s.config("tenant-a")).await.unwrap());
    assert_eq!(s.prompts(), 1);
    s.fx.auth().knobs().set_approval(Approval::Manual);
    s.fx.auth().knobs().revoke_all_tokens();
    let calls: Vec<_> = (0..10)
        .map(|i| {
            let conn = conn.clone();
            tokio::spawn(async move { conn.call_tool("echo", args(&format!("q{i}"))).await })
        })
        .collect();
    let pending = s.fx.auth().wait_for_pending_authorization().await;
    assert_eq!(pending.len(), 1, "one prompt for the key");
    s.fx.auth().approve_pending().unwrap();
    for (i, call) in calls.into_iter().enumerate() {
        let result = call.await.unwrap().unwrap_or_else(|e| {
            panic!(
                "call {i}: {e:?} prompts={} {:?} {:?}",
                s.prompts(),
                s.fx.auth().stats(),
                s.factory.counters()
            )
        });
        assert_eq!(text(&result), format!("q{i}"));
    }
    assert_eq!(s.prompts(), 2, "one new prompt for all queued calls");
    assert_eq!(s.browser.reasons.lock().unwrap()[1], AuthorizationReason::RefreshFailed);
    assert_eq!(s.fx.auth().stats().refresh_token_requests, 1, "the dead grant is tried once");
    assert_eq!(s.fx.auth().stats().authorization_code_requests, 2);
}

/// Return-early mode: the request fails at once, the flow stays PENDING, the callback stores
/// the tokens, and the next connect needs no prompt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn return_early_then_the_callback_completes_in_the_background() {
    let s = setup(HookDecision::ReturnEarly).await;
    let err = s.factory.connect(s.config("tenant-a")).await.unwrap_err();
    assert!(matches!(err, Error::AuthorizationRequired { .. }), "{err:?}");
    assert_eq!(s.prompts(), 1);
    for _ in 0..500 {
        if s.fx.auth().stats().authorization_code_requests == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let conn = s.factory.connect(s.config("tenant-a")).await.unwrap();
    assert_eq!(text(&conn.call_tool("echo", args("later")).await.unwrap()), "later");
    assert_eq!(s.prompts(), 1);
    let _ = &s.clock;
}

/// The callback refuses an unknown state, and an `error` with an unknown state changes nothing.
#[tokio::test]
async fn the_callback_refuses_unknown_state() {
    let s = setup(HookDecision::Wait).await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let r = http.get(format!("{}?code=x&state=nope", s.redirect)).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let r =
        http.get(format!("{}?error=access_denied&state=nope", s.redirect)).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let r = http.get(s.redirect.clone()).send().await.unwrap();
    assert_eq!(r.status(), 400);
}

/// The user denies: the error fails the flow (valid state), and the waiting request ends with
/// AuthorizationRequired at once, not after the OAuth wait timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_authorization_fails_the_flow_and_the_request() {
    let s = setup(HookDecision::Wait).await;
    s.fx.auth().knobs().set_approval(Approval::Deny);
    let started = mcp_clock::SystemClock::instant();
    let err = s.factory.connect(s.config("tenant-a")).await.unwrap_err();
    let took = mcp_clock::SystemClock::instant().duration_since(started);
    assert!(matches!(err, Error::AuthorizationRequired { .. }), "{err:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(s.fx.auth().stats().authorizations_denied, 1);
    assert_eq!(s.fx.auth().stats().authorization_code_requests, 0);
}
