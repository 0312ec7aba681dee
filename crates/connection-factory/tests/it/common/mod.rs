//! The interactive-flow bench shared by the test modules: the fixture servers, a factory with an
//! interactive flow, a callback listener, and a browser that follows the redirect.
#![allow(dead_code)] // not every part is used by every configuration

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use connection_factory::{
    AuthorizationHook, AuthorizationReason, AuthorizationRequest, ConnectionFactory, FactoryConfig,
    HookDecision, OAuthRefresher, callback_router,
};
use flow_state::{FlowManager, MemoryStore, SharedStore};
use mcp_clock::{ManualClock, Timestamp};
use mcp_fixtures::{AuthServer, Fixtures, KnobSettings, ResourceServer, ResourceServerBuilder};
use mcp_oauth::{ClientConfig, HttpPolicy, OAuthClient, ReqwestHttpClient};
use serde_json::{Value, json};
use token_storage::{Keyring, MemoryTokenStore, TokenStorage, TokenStorageConfig};

/// A browser that visits the authorization URL (following the redirect to the callback).
#[derive(Debug)]
pub(crate) struct Browser {
    pub(crate) http: reqwest::Client,
    pub(crate) prompts: AtomicU64,
    /// Calls of `authorization_pending` (requests that found another's prompt).
    pub(crate) pending: AtomicU64,
    pub(crate) reasons: std::sync::Mutex<Vec<AuthorizationReason>>,
    pub(crate) scopes: std::sync::Mutex<Vec<Option<String>>>,
    /// The `expires_at` of every request shown (prompted or pending), in order.
    pub(crate) expiries: std::sync::Mutex<Vec<Timestamp>>,
    pub(crate) decision: HookDecision,
}

impl Browser {
    /// A browser that answers every prompt with `decision`.
    pub(crate) fn new(decision: HookDecision) -> Self {
        Browser {
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
            prompts: AtomicU64::new(0),
            pending: AtomicU64::new(0),
            reasons: Default::default(),
            scopes: Default::default(),
            expiries: Default::default(),
            decision,
        }
    }
}

#[async_trait::async_trait]
impl AuthorizationHook for Browser {
    async fn authorization_required(&self, request: AuthorizationRequest) -> HookDecision {
        self.prompts.fetch_add(1, Ordering::SeqCst);
        self.reasons.lock().unwrap().push(request.reason);
        self.scopes.lock().unwrap().push(request.scopes.clone());
        self.expiries.lock().unwrap().push(request.expires_at);
        let http = self.http.clone();
        tokio::spawn(async move {
            let _ = http.get(request.authorization_url).send().await;
        });
        self.decision
    }

    async fn authorization_pending(&self, request: AuthorizationRequest) -> HookDecision {
        self.expiries.lock().unwrap().push(request.expires_at);
        self.pending.fetch_add(1, Ordering::SeqCst);
        self.decision
    }
}

pub(crate) struct Setup {
    pub(crate) clock: ManualClock,
    pub(crate) fx: Fixtures,
    pub(crate) factory: ConnectionFactory,
    pub(crate) browser: Arc<Browser>,
    pub(crate) redirect: String,
    /// The factory's token storage (what the callback stores into).
    pub(crate) storage: TokenStorage,
}

pub(crate) async fn setup(decision: HookDecision) -> Setup {
    setup_on(decision, MemoryTokenStore::new().into()).await
}

/// [`setup`] over `store` (a fault-injecting wrapper, say).
pub(crate) async fn setup_on(
    decision: HookDecision,
    store: token_storage::SharedTokenStore,
) -> Setup {
    setup_with(decision, store, |k| k).await
}

/// [`setup_on`] with the fixture's knobs changed by `knobs_of` before it starts.
pub(crate) async fn setup_with(
    decision: HookDecision,
    store: token_storage::SharedTokenStore,
    knobs_of: impl FnOnce(KnobSettings) -> KnobSettings,
) -> Setup {
    setup_full(decision, store, SharedStore::new(MemoryStore::new()), knobs_of, |r| r).await
}

/// The whole bench: the token store, the flow store and the fixture's knobs are the caller's.
pub(crate) async fn setup_full(
    decision: HookDecision,
    store: token_storage::SharedTokenStore,
    flow_store: SharedStore,
    knobs_of: impl FnOnce(KnobSettings) -> KnobSettings,
    resource_of: impl FnOnce(ResourceServerBuilder) -> ResourceServerBuilder,
) -> Setup {
    let clock = ManualClock::new(Timestamp::from_secs(1_800_000_000));
    let mut knobs = KnobSettings::default();
    knobs.access_token_lifetime = Duration::from_secs(60);
    knobs.refresh_rotation = true;
    knobs.reuse_detection = true;
    knobs.reuse_grace = None;
    let knobs = knobs_of(knobs);
    let auth = AuthServer::builder().clock(clock.shared()).knobs(knobs).spawn().await.unwrap();
    let resource = resource_of(ResourceServer::builder(&auth)).spawn().await.unwrap();
    let fx = Fixtures::from_parts(auth, resource);
    let oauth =
        OAuthClient::new(ReqwestHttpClient::new(HttpPolicy::default()).unwrap(), clock.shared());
    let mut config = TokenStorageConfig::default();
    config.max_date_correction = Duration::ZERO; // hyper's Date header is real time
    let storage = TokenStorage::builder(
        store,
        Arc::new(Keyring::parse(&"42".repeat(32)).unwrap()),
        Arc::new(OAuthRefresher::new(oauth.clone())),
    )
    .clock(clock.shared())
    .config(config)
    .build();
    let flows = FlowManager::builder(flow_store).clock(clock.shared()).build().unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let redirect = format!("http://{}/callback", listener.local_addr().unwrap());
    let router = callback_router(flows.clone(), storage.clone(), oauth.clone());
    tokio::spawn(async move { axum::serve(listener, router).await });

    let browser = Arc::new(Browser::new(decision));
    let factory = ConnectionFactory::new(flows, storage.clone())
        .unwrap()
        .with_interactive(oauth, browser.clone());
    Setup { clock, fx, factory, browser, redirect, storage }
}

impl Setup {
    pub(crate) fn config(&self, tenant: &str) -> FactoryConfig {
        FactoryConfig::new(self.fx.resource().url(), tenant, "alice", "fixture")
            .connect_timeout(Duration::from_secs(10))
            .oauth_wait_timeout(Duration::from_secs(10))
            .client(ClientConfig::new("factory tests", self.redirect.clone()))
    }

    pub(crate) fn prompts(&self) -> u64 {
        self.browser.prompts.load(Ordering::SeqCst)
    }
}

pub(crate) fn args(text: &str) -> Option<serde_json::Map<String, Value>> {
    json!({ "text": text }).as_object().cloned()
}

pub(crate) fn text(result: &connection_factory::CallToolResult) -> String {
    result.content[0].as_text().expect("text content").text.clone()
}

/// The one bounded wait on real time (mcp-clock's).
#[allow(unused_imports)] // not every test binary waits
pub(crate) use mcp_clock::testing::eventually;
