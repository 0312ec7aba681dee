//! The factory scenarios of the LibreChat reference (`librechat-behaviour.md` §5.1,
//! `MCPConnectionFactory.test.ts`, those marked [S] / [S→]) that the other test files do not
//! already pin, adapted to the Rust API. `SCENARIOS.md` maps every scenario to its test.
//!
//! The adaptation: LibreChat's `oauthRequired` listener is [`AuthProvider::on_unauthorized`]
//! (the transport hands it every 401 / 403); `oauthHandled` is [`Recovery::Retry`] with the new
//! token; `oauthFailed` is [`Recovery::AuthorizationRequired`] or a typed [`Error`];
//! `oauthStart` is the [`AuthorizationHook`]; `forceRefreshTokens` calls are refresh-token
//! grants counted by the fixture's authorization server; flows are records in the
//! [`FlowManager`]. Real fixture servers on 127.0.0.1; every timeout runs on a [`ManualClock`].

use crate::common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{args, eventually, text};
use connection_factory::{
    AuthProvider, AuthorizationHook, AuthorizationReason, AuthorizationRequest, ConnectOptions,
    Connection, ConnectionFactory, Error, FactoryConfig, FactoryProvider, GET_TOKENS_FLOW,
    HookDecision, OAUTH_FLOW, OAuthRefresher, Recovery, Refusal, RequestKind, STATE_FLOW, Secret,
    callback_router,
};
use flow_state::{FlowKey, FlowManager, FlowStatus, MemoryStore, SharedStore};
use mcp_clock::{ManualClock, Timestamp};
use mcp_fixtures::{Fixtures, InjectedFailure, KnobSettings};
use mcp_oauth::{ClientConfig, HttpPolicy, OAuthClient, ReqwestHttpClient};
use serde_json::{Value, json};
use token_storage::{Keyring, MemoryTokenStore, TokenKey, TokenStorage, TokenStorageConfig};

/// The user's browser and the host's UI: records every request it is shown, optionally visits
/// the authorization URL (the fixture approves and redirects to the callback), and answers
/// with the configured decision. At each prompt it also records whether the state mapping of
/// each earlier prompt still existed at that moment.
#[derive(Debug)]
struct Hook {
    http: reqwest::Client,
    flows: FlowManager,
    visit: AtomicBool,
    decision: Mutex<HookDecision>,
    requests: Mutex<Vec<AuthorizationRequest>>,
    /// The pending authorizations shown again to a request that joined them.
    replays: Mutex<Vec<AuthorizationRequest>>,
    earlier_states_alive: Mutex<Vec<Vec<bool>>>,
}

#[async_trait::async_trait]
impl AuthorizationHook for Hook {
    async fn authorization_required(&self, request: AuthorizationRequest) -> HookDecision {
        let earlier: Vec<String> =
            self.requests.lock().unwrap().iter().map(|r| state_of(&r.authorization_url)).collect();
        let mut alive = Vec::new();
        for state in earlier {
            let key = FlowKey::new(STATE_FLOW, state).unwrap();
            alive.push(self.flows.get::<Value>(&key).await.unwrap().is_some());
        }
        self.earlier_states_alive.lock().unwrap().push(alive);
        self.requests.lock().unwrap().push(request.clone());
        if self.visit.load(Ordering::SeqCst) {
            let http = self.http.clone();
            tokio::spawn(async move {
                let _ = http.get(request.authorization_url).send().await;
            });
        }
        *self.decision.lock().unwrap()
    }

    async fn authorization_pending(&self, request: AuthorizationRequest) -> HookDecision {
        self.replays.lock().unwrap().push(request);
        *self.decision.lock().unwrap()
    }
}

/// The `state` parameter of an authorization URL.
fn state_of(url: &str) -> String {
    let url = url::Url::parse(url).unwrap();
    url.query_pairs().find(|(k, _)| k == "state").map(|(_, v)| v.into_owned()).unwrap()
}

struct Setup {
    clock: ManualClock,
    fx: Fixtures,
    flows: FlowManager,
    storage: TokenStorage,
    store: Arc<MemoryStore>,
    /// With the interactive flow (the hook above).
    interactive: ConnectionFactory,
    /// Over the same flows and storage, without an interactive flow.
    plain: ConnectionFactory,
    hook: Arc<Hook>,
    redirect: String,
}

/// Fixture servers with rotation and strict reuse detection; access tokens live an hour (a
/// mid-session 401 is made by revoking, or by moving the resource server's clock ahead).
async fn setup(tune: impl FnOnce(&mut TokenStorageConfig)) -> Setup {
    let clock = ManualClock::new(Timestamp::from_secs(1_800_000_000));
    let mut knobs = KnobSettings::default();
    knobs.access_token_lifetime = Duration::from_secs(3600);
    knobs.refresh_rotation = true;
    knobs.reuse_detection = true;
    knobs.reuse_grace = None;
    let fx = Fixtures::start_with(clock.shared(), knobs).await.unwrap();
    let oauth =
        OAuthClient::new(ReqwestHttpClient::new(HttpPolicy::default()).unwrap(), clock.shared());
    let mut config = TokenStorageConfig::default();
    config.max_date_correction = Duration::ZERO; // hyper's Date header is real time
    tune(&mut config);
    let storage = TokenStorage::builder(
        MemoryTokenStore::new().into(),
        Arc::new(Keyring::parse(&"42".repeat(32)).unwrap()),
        Arc::new(OAuthRefresher::new(oauth.clone())),
    )
    .clock(clock.shared())
    .config(config)
    .build();
    let store = Arc::new(MemoryStore::with_clock(clock.shared()));
    let flows = FlowManager::builder(SharedStore::from_arc(store.clone()))
        .clock(clock.shared())
        .build()
        .unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let redirect = format!("http://{}/callback", listener.local_addr().unwrap());
    let router = callback_router(flows.clone(), storage.clone(), oauth.clone());
    tokio::spawn(async move { axum::serve(listener, router).await });

    let hook = Arc::new(Hook {
        http: reqwest::Client::builder().no_proxy().build().unwrap(),
        flows: flows.clone(),
        visit: AtomicBool::new(true),
        decision: Mutex::new(HookDecision::Wait),
        requests: Mutex::default(),
        replays: Mutex::default(),
        earlier_states_alive: Mutex::default(),
    });
    let interactive = ConnectionFactory::new(flows.clone(), storage.clone())
        .unwrap()
        .with_interactive(oauth, hook.clone());
    let plain = ConnectionFactory::new(flows.clone(), storage.clone()).unwrap();
    Setup { clock, fx, flows, storage, store, interactive, plain, hook, redirect }
}

impl Setup {
    /// Connect timeout 10 s and OAuth wait timeout 10 s (refresh budget 4 s), with a client.
    fn config(&self, tenant: &str) -> FactoryConfig {
        self.bare_config(tenant)
            .connect_timeout(Duration::from_secs(10))
            .oauth_wait_timeout(Duration::from_secs(10))
    }

    /// The defaults (30 s connect, 120 s OAuth wait), with a client.
    fn bare_config(&self, tenant: &str) -> FactoryConfig {
        FactoryConfig::new(self.fx.resource().url(), tenant, "alice", "fixture")
            .client(ClientConfig::new("scenario tests", self.redirect.clone()))
    }

    /// Authorize `tenant` interactively (one prompt, approved by the browser); its token.
    async fn authorize(&self, tenant: &str) -> Secret {
        let provider = self.interactive.provider(self.config(tenant)).unwrap();
        let challenge = Refusal::new(401, RequestKind::Post, vec!["Bearer".into()]);
        match provider.on_unauthorized(None, &challenge).await.unwrap() {
            Recovery::Retry(token) => token,
            other => panic!("authorization failed: {other:?}"),
        }
    }

    fn prompts(&self) -> usize {
        self.hook.requests.lock().unwrap().len()
    }

    fn request(&self, n: usize) -> AuthorizationRequest {
        self.hook.requests.lock().unwrap()[n].clone()
    }

    async fn stored(&self, tenant: &str) -> Arc<token_storage::TokenSet> {
        self.storage.tokens(&key(tenant)).await.unwrap().unwrap()
    }

    fn refreshes(&self) -> u64 {
        self.fx.auth().stats().refresh_token_requests
    }
}

fn key(tenant: &str) -> TokenKey {
    TokenKey::new(tenant, "alice", "fixture")
}

fn flow_key(tenant: &str, flow_type: &str) -> FlowKey {
    FlowKey::scoped(Some(tenant), flow_type, "5:alice:fixture").unwrap()
}

fn unauthorized() -> Refusal {
    Refusal::new(401, RequestKind::Post, vec![r#"Bearer error="invalid_token""#.into()])
}

fn retried(recovery: Result<Recovery, Error>) -> Secret {
    match recovery {
        Ok(Recovery::Retry(token)) => token,
        other => panic!("expected a retry, got {other:?}"),
    }
}

/// A moment of real time for spawned work to do what it must not, before a test asserts that
/// nothing happened (a second refresh request, an early prompt). Never used to wait for something
/// to happen: that waits on state ([`waits_on_the_clock`], [`eventually`]).
async fn pause() {
    mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(100)).await;
}

/// Waits until more than `before` sleeps are pending on the manual clock: a task spawned since
/// has taken its deadline (a refresh budget, a flow wait) from the clock's current time, so the
/// next `advance` moves it.
async fn waits_on_the_clock(clock: &ManualClock, before: usize) {
    eventually("a new sleeper on the manual clock", || clock.sleepers() > before).await;
}

/// Counts the refusals that reach the provider it wraps.
#[derive(Debug)]
struct Counting {
    inner: Arc<FactoryProvider>,
    unauthorized: AtomicU64,
}

#[async_trait::async_trait]
impl AuthProvider for Counting {
    async fn current_token(&self) -> Result<Option<Secret>, Error> {
        self.inner.current_token().await
    }

    async fn on_unauthorized(
        &self,
        rejected: Option<&Secret>,
        challenge: &Refusal,
    ) -> Result<Recovery, Error> {
        self.unauthorized.fetch_add(1, Ordering::SeqCst);
        self.inner.on_unauthorized(rejected, challenge).await
    }
}

/// Scenario 2 [S]: a connection whose 401 nothing can recover (here: no interactive flow, and
/// the refresh refused) fails fast with a typed `AuthorizationRequired` instead of waiting for
/// a timeout (the manual clock never moves), and the provider stays attached: the next 401 on
/// the same connection reaches it again and fails the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s02_an_unrecoverable_401_fails_fast_and_the_provider_stays_attached() {
    let s = setup(|_| {}).await;
    s.authorize("tenant-a").await;
    let counting = Arc::new(Counting {
        inner: s.plain.provider(s.config("tenant-a")).unwrap(),
        unauthorized: AtomicU64::new(0),
    });
    let options = ConnectOptions::default().clock(s.clock.shared());
    let conn = Connection::connect(s.fx.resource().url(), counting.clone(), options).await.unwrap();
    assert_eq!(text(&conn.call_tool("echo", args("ok")).await.unwrap()), "ok");
    let before = counting.unauthorized.load(Ordering::SeqCst);

    s.fx.auth().knobs().revoke_all_tokens();
    let err = conn.call_tool("echo", args("one")).await.unwrap_err();
    assert!(matches!(err, Error::AuthorizationRequired { .. }), "{err:?}");
    let after_first = counting.unauthorized.load(Ordering::SeqCst);
    assert!(after_first > before, "the 401 reached the provider");
    let err = conn.call_tool("echo", args("two")).await.unwrap_err();
    assert!(matches!(err, Error::AuthorizationRequired { .. }), "{err:?}");
    assert!(
        counting.unauthorized.load(Ordering::SeqCst) > after_first,
        "the second 401 reached the provider too: it is still attached"
    );
    assert_eq!(s.prompts(), 1, "no interactive flow without one configured");
}

/// Scenarios 14 and 16 [S]: a mid-session 401 whose silent refresh succeeds is retried with the
/// refreshed token; the interactive flow is never started (no prompt, no new authorization),
/// whether the hook would block or return early.
async fn silent_refresh_success_never_prompts(decision: HookDecision) {
    let s = setup(|_| {}).await;
    let first = s.authorize("tenant-a").await;
    *s.hook.decision.lock().unwrap() = decision;
    let conn = s.interactive.connect(s.config("tenant-a")).await.unwrap();
    assert_eq!(text(&conn.call_tool("echo", args("warm")).await.unwrap()), "warm");

    // The resource server's clock jumps past the token's lifetime: the next call gets a 401.
    s.fx.auth().knobs().set_clock_offset_millis(3_601_000);
    assert_eq!(text(&conn.call_tool("echo", args("after")).await.unwrap()), "after");
    let c = s.interactive.counters();
    assert_eq!(c.refreshed, 1, "{c:?}");
    assert_eq!(s.refreshes(), 1);
    assert_ne!(s.stored("tenant-a").await.access_token().expose(), first.expose());
    assert_eq!(s.prompts(), 1, "no prompt after a successful refresh");
    assert_eq!(s.fx.auth().stats().authorization_requests, 1, "no new authorization");
    let flow = s.flows.get::<Value>(&flow_key("tenant-a", OAUTH_FLOW)).await.unwrap().unwrap();
    assert_eq!(flow.status, FlowStatus::Completed, "the first authorization's flow, untouched");
}

/// Scenario 14 [S], blocking mode. See [`silent_refresh_success_never_prompts`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s14_a_successful_silent_refresh_retries_without_the_interactive_flow() {
    silent_refresh_success_never_prompts(HookDecision::Wait).await;
}

/// Scenario 16 [S], return-early mode. See [`silent_refresh_success_never_prompts`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s16_return_early_mode_with_a_successful_silent_refresh_never_prompts() {
    silent_refresh_success_never_prompts(HookDecision::ReturnEarly).await;
}

/// Scenario 17 [S]: the refresh fails with an error (the token endpoint answers 503; one
/// attempt) instead of a refusal: the error does not reach the caller; the interactive flow is
/// started (reason `RefreshFailed`), and the call succeeds with its tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s17_a_refresh_error_is_swallowed_and_the_interactive_flow_runs() {
    let s = setup(|c| c.max_attempts = 1).await;
    let first = s.authorize("tenant-a").await;
    let conn = s.interactive.connect(s.config("tenant-a")).await.unwrap();
    assert_eq!(text(&conn.call_tool("echo", args("warm")).await.unwrap()), "warm");

    s.fx.auth().knobs().fail_token_requests(InjectedFailure::server_error(1));
    s.fx.auth().knobs().set_clock_offset_millis(3_601_000);
    assert_eq!(text(&conn.call_tool("echo", args("after")).await.unwrap()), "after");
    let c = s.interactive.counters();
    assert_eq!(c.transient, 1, "{c:?}");
    assert_eq!(c.refreshed, 0, "{c:?}");
    assert_eq!(s.fx.auth().stats().injected_failures, 1);
    assert_eq!(s.prompts(), 2, "one fallback prompt");
    assert_eq!(s.request(1).reason, AuthorizationReason::RefreshFailed);
    assert_eq!(s.fx.auth().stats().authorization_code_requests, 2);
    assert_ne!(s.stored("tenant-a").await.access_token().expose(), first.expose());
}

/// Scenario 18 [S]: the cached token look-up (a COMPLETED `mcp_get_tokens`) still names the
/// rejected token. The forced refresh bypasses it (no flow of any kind is created for the
/// refresh: the flow store only shrinks), the retry carries the fresh token, the COMPLETED
/// look-up is deleted, and the next look-up serves the fresh token, never the stale one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s18_a_forced_refresh_bypasses_and_deletes_the_cached_lookup() {
    let s = setup(|_| {}).await;
    s.authorize("tenant-a").await;
    let provider = s.plain.provider(s.config("tenant-a")).unwrap();
    let stale = provider.current_token().await.unwrap().unwrap();
    let lookup = flow_key("tenant-a", GET_TOKENS_FLOW);
    let cached = s.flows.get::<Value>(&lookup).await.unwrap().unwrap();
    assert_eq!(cached.status, FlowStatus::Completed);
    let flows_before = s.store.len();

    let fresh = retried(provider.on_unauthorized(Some(&stale), &unauthorized()).await);
    assert_ne!(fresh, stale);
    assert_eq!(s.refreshes(), 1, "the refresh went to the token endpoint");
    assert_eq!(s.stored("tenant-a").await.access_token().expose(), fresh.expose());
    assert!(s.flows.get::<Value>(&lookup).await.unwrap().is_none(), "COMPLETED look-up deleted");
    assert_eq!(s.store.len(), flows_before - 1, "no flow was created for the refresh");
    assert_eq!(provider.current_token().await.unwrap().unwrap(), fresh);
    assert_eq!(s.refreshes(), 1);
}

/// Scenario 21 [S→]: refresh budget 2 s (connect timeout 5 s: 0.4 x 5 s). The token endpoint
/// hangs: at 2,001 ms the caller gives up (a typed timeout; without an interactive flow this
/// is where the fallback would start), but the redemption goes on, still holding the key: a
/// second 401 for the same token joins it instead of redeeming the refresh token again, and
/// gets its settled outcome (timed out) at once, as the seed's joiners of the lingering entry
/// do, instead of waiting a budget of its own on the clock that stands still. Once the endpoint
/// answers, its result is stored and the key is free: the next 401 redeems anew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s21_a_timed_out_refresh_keeps_the_key_and_a_second_401_joins_it() {
    let s = setup(|_| {}).await;
    let first = s.authorize("tenant-a").await;
    let config = s.config("tenant-a").connect_timeout(Duration::from_secs(5));
    assert_eq!(config.refresh_budget(), Duration::from_secs(2));
    let provider = s.plain.provider(config).unwrap();

    s.fx.auth().knobs().set_refresh_hang(true);
    let one = tokio::spawn({
        let (p, t) = (provider.clone(), first.clone());
        async move { p.on_unauthorized(Some(&t), &unauthorized()).await }
    });
    eventually("the refresh request", || s.refreshes() == 1).await;
    s.clock.advance(Duration::from_millis(2001));
    let err = one.await.unwrap().unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");

    let two = tokio::spawn({
        let (p, t) = (provider.clone(), first.clone());
        async move { p.on_unauthorized(Some(&t), &unauthorized()).await }
    });
    let err = mcp_clock::within(&mcp_clock::SystemClock, Duration::from_secs(10), two)
        .await
        .expect("the joiner of a timed-out refresh waited a budget of its own")
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert_eq!(s.plain.counters().timed_out, 2);
    pause().await;
    assert_eq!(s.refreshes(), 1, "the second 401 joined the redemption in flight");

    s.fx.auth().knobs().set_refresh_hang(false);
    eventually("the late redemption", || s.fx.auth().stats().max_refresh_redemptions() == 1).await;
    let mut stored = s.stored("tenant-a").await;
    for _ in 0..2000 {
        if stored.access_token().expose() != first.expose() {
            break;
        }
        mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(5)).await;
        stored = s.stored("tenant-a").await;
    }
    assert_ne!(stored.access_token().expose(), first.expose(), "the late result was stored");
    let rejected = Secret::new(stored.access_token().expose());
    let next = retried(provider.on_unauthorized(Some(&rejected), &unauthorized()).await);
    assert_ne!(next, rejected);
    assert_eq!(s.refreshes(), 2, "the key was free again: a new redemption");
    let auth = s.fx.auth().stats();
    assert_eq!((auth.reuse_detections, auth.families_revoked), (0, 0), "{auth:?}");
}

/// Scenario 22 [S→]: a refresh that hangs for ever. The caller gives up at the budget (2 s);
/// the key stays held until token storage's deadline plus grace (here 3 s + 1 s: LibreChat's
/// 1 s abort grace is token storage's `refresh_deadline` + `refresh_grace`), and not a moment
/// longer: at 3,999 ms a 401 still finds the redemption in flight; after 4 s the key is free
/// and the next 401 sends a second refresh request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s22_a_refresh_that_hangs_for_ever_frees_the_key_after_deadline_and_grace() {
    let s = setup(|c| {
        c.refresh_deadline = Duration::from_secs(3);
        c.refresh_grace = Duration::from_secs(1);
    })
    .await;
    let first = s.authorize("tenant-a").await;
    let config = s.config("tenant-a").connect_timeout(Duration::from_secs(5));
    let provider = s.plain.provider(config).unwrap();

    s.fx.auth().knobs().set_refresh_hang(true);
    let call = |p: Arc<FactoryProvider>, t: Secret| async move {
        p.on_unauthorized(Some(&t), &unauthorized()).await
    };
    let one = tokio::spawn(call(provider.clone(), first.clone()));
    eventually("the refresh request", || s.refreshes() == 1).await;
    s.clock.advance(Duration::from_millis(2001));
    assert!(matches!(one.await.unwrap(), Err(Error::Timeout { .. })));

    s.clock.advance(Duration::from_millis(1998)); // 3,999 ms: cancelled, still in its grace
    // The factory's own hold on the key (its abort grace, 1 s after the 2 s budget) has ended
    // with this step: let its task leave the clock before counting sleepers.
    pause().await;
    let sleepers = s.clock.sleepers();
    let two = tokio::spawn(call(provider.clone(), first.clone()));
    waits_on_the_clock(&s.clock, sleepers).await;
    pause().await;
    assert_eq!(s.refreshes(), 1, "within the grace the key is still held");
    s.clock.advance(Duration::from_millis(2)); // 4,001 ms: abandoned, the key is free
    let _ = two.await.unwrap();
    // The key is released by the abandoned flight's own task, woken by the same clock step that
    // ended `two`; let it run before the next 401 (one that came first would join the abandoned
    // flight and wait out its own budget on the standing clock, which is correct but not this
    // scenario). The key is released right after that task's sleeps on the clock end, so wait
    // for them to end (`sleepers` counted the flight's grace sleep, which is gone now, and not
    // `two`'s budget sleep), then give the task its last moment to leave the map.
    eventually("the abandoned flight's sleeps to end", || s.clock.sleepers() < sleepers).await;
    pause().await;

    let three = tokio::spawn(call(provider.clone(), first.clone()));
    eventually("a second refresh request", || s.refreshes() == 2).await;
    s.fx.auth().knobs().set_refresh_hang(false);
    let fresh = retried(three.await.unwrap());
    assert_ne!(fresh, first);
}

/// A hung refresh with the interactive fallback: nothing is prompted 1 ms before `budget`;
/// just after it, the fallback prompts once (reason `RefreshFailed`) and the 401 is answered
/// with the interactive token.
async fn hung_refresh_prompts_at_the_budget(s: &Setup, config: FactoryConfig, budget: Duration) {
    assert_eq!(config.refresh_budget(), budget);
    let first = s.authorize("tenant-a").await;
    let provider = s.interactive.provider(config).unwrap();
    s.fx.auth().knobs().set_refresh_hang(true);
    let call = tokio::spawn({
        let (p, t) = (provider.clone(), first.clone());
        async move { p.on_unauthorized(Some(&t), &unauthorized()).await }
    });
    eventually("the refresh request", || s.refreshes() == 1).await;
    s.clock.advance(budget - Duration::from_millis(1));
    pause().await;
    assert!(!call.is_finished(), "gave up before the budget");
    assert_eq!(s.prompts(), 1, "no interactive flow before the budget");
    assert_eq!(s.interactive.counters().timed_out, 0);
    s.clock.advance(Duration::from_millis(2));
    let fresh = retried(call.await.unwrap());
    assert_ne!(fresh, first);
    assert_eq!(s.interactive.counters().timed_out, 1);
    assert_eq!(s.prompts(), 2, "one fallback prompt");
    assert_eq!(s.request(1).reason, AuthorizationReason::RefreshFailed);
    assert_eq!(s.stored("tenant-a").await.access_token().expose(), fresh.expose());
    s.fx.auth().knobs().set_refresh_hang(false);
}

/// Scenario 23 [S→]: no timeouts configured (30 s connect, 120 s OAuth wait): the refresh
/// budget is the 5 s cap (0.4 x 30 s = 12 s is more), which leaves the interactive fallback its
/// time: at 4,999 ms nothing is prompted, at 5,001 ms the fallback has prompted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s23_without_timeouts_the_fallback_starts_at_the_five_second_cap() {
    let s = setup(|_| {}).await;
    let config = s.bare_config("tenant-a");
    hung_refresh_prompts_at_the_budget(&s, config, Duration::from_secs(5)).await;
}

/// Scenario 24 [S→]: a 5 s timeout (LibreChat's `initTimeout`: connect and OAuth wait): the
/// budget is 2 s; at 1,999 ms nothing is prompted, at 2,001 ms the fallback has prompted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s24_a_five_second_timeout_starts_the_fallback_at_two_seconds() {
    let s = setup(|_| {}).await;
    let config = s
        .bare_config("tenant-a")
        .connect_timeout(Duration::from_secs(5))
        .oauth_wait_timeout(Duration::from_secs(5));
    hung_refresh_prompts_at_the_budget(&s, config, Duration::from_secs(2)).await;
}

/// Scenario 25 [S→]: a bare 403 (no `insufficient_scope` in the challenge) never refreshes:
/// no refresh request, the stored tokens are not replaced by a refresh, and the interactive
/// flow is started (a step-up, reason `InsufficientScope`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s25_a_403_never_refreshes_and_starts_the_interactive_flow() {
    let s = setup(|_| {}).await;
    let first = s.authorize("tenant-a").await;
    let provider = s.interactive.provider(s.config("tenant-a")).unwrap();
    let forbidden = Refusal::new(403, RequestKind::Post, vec!["Bearer".into()]);
    let token = retried(provider.on_unauthorized(Some(&first), &forbidden).await);
    assert_ne!(token, first);
    assert_eq!(s.refreshes(), 0, "no refresh for a 403");
    let c = s.interactive.counters();
    assert_eq!((c.refreshed, c.coalesced, c.insufficient_scope), (0, 0, 1), "{c:?}");
    assert_eq!(s.prompts(), 2);
    assert_eq!(s.request(1).reason, AuthorizationReason::InsufficientScope);
}

/// Scenarios 30 and 36 [S]: the refresh is refused (revoked grant) while a COMPLETED
/// `mcp_oauth` flow from the first authorization exists. Before the interactive fallback
/// prompts, that flow and its CSRF state mapping are deleted (the hook sees the old state
/// gone at prompt time); the fallback's tokens are stored and served, and the cached look-up
/// (COMPLETED, naming the rejected set) is replaced by one naming the new set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s30_s36_a_refused_refresh_drops_the_completed_flow_and_state_before_prompting() {
    let s = setup(|_| {}).await;
    s.authorize("tenant-a").await;
    let old_state = state_of(&s.request(0).authorization_url);
    let old_mapping = FlowKey::new(STATE_FLOW, &old_state).unwrap();
    assert!(s.flows.get::<Value>(&old_mapping).await.unwrap().is_some());
    let oauth = flow_key("tenant-a", OAUTH_FLOW);
    assert_eq!(s.flows.get::<Value>(&oauth).await.unwrap().unwrap().status, FlowStatus::Completed);
    let provider = s.interactive.provider(s.config("tenant-a")).unwrap();
    let stale = provider.current_token().await.unwrap().unwrap();
    let lookup = flow_key("tenant-a", GET_TOKENS_FLOW);
    let stale_version = s.stored("tenant-a").await.version();
    let cached = s.flows.get::<Value>(&lookup).await.unwrap().unwrap();
    assert_eq!(cached.result.unwrap()["version"], json!(stale_version));

    s.fx.auth().knobs().revoke_all_tokens();
    let fresh = retried(provider.on_unauthorized(Some(&stale), &unauthorized()).await);
    assert_ne!(fresh, stale);
    assert_eq!(s.interactive.counters().rejected, 1);
    assert_eq!(s.prompts(), 2);
    assert_eq!(s.request(1).reason, AuthorizationReason::RefreshFailed);
    assert_eq!(
        s.hook.earlier_states_alive.lock().unwrap()[1],
        vec![false],
        "the old state mapping was deleted before the prompt"
    );
    assert!(s.flows.get::<Value>(&old_mapping).await.unwrap().is_none());
    let new_state = state_of(&s.request(1).authorization_url);
    assert_ne!(new_state, old_state);

    // Scenario 36: the interactive tokens are stored and served; the look-up names them.
    let now = s.stored("tenant-a").await;
    assert_eq!(now.access_token().expose(), fresh.expose());
    assert_eq!(provider.current_token().await.unwrap().unwrap(), fresh);
    let cached = s.flows.get::<Value>(&lookup).await.unwrap().unwrap();
    assert_eq!(cached.status, FlowStatus::Completed);
    assert_eq!(cached.result.unwrap()["version"], json!(now.version()));
    assert_ne!(now.version(), stale_version);
}

/// Scenario 33 [S]: tenant A and tenant B, same user id and server name, meet a 401 at the same
/// moment (the token endpoint is slowed so both refreshes are in flight together): two refresh
/// redemptions, one per tenant, neither joins the other, and each tenant gets and stores its
/// own tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s33_two_tenants_refresh_concurrently_each_with_its_own_tokens() {
    let s = setup(|_| {}).await;
    let a0 = s.authorize("tenant-a").await;
    let b0 = s.authorize("tenant-b").await;
    assert_ne!(a0, b0);
    let pa = s.plain.provider(s.config("tenant-a")).unwrap();
    let pb = s.plain.provider(s.config("tenant-b")).unwrap();
    s.fx.auth().knobs().set_token_delay(Duration::from_millis(300));
    let challenge = unauthorized();
    let (ra, rb) = tokio::join!(
        pa.on_unauthorized(Some(&a0), &challenge),
        pb.on_unauthorized(Some(&b0), &challenge),
    );
    let (a1, b1) = (retried(ra), retried(rb));
    assert_eq!(s.refreshes(), 2, "one refresh per tenant");
    let c = s.plain.counters();
    assert_eq!((c.refreshed, c.coalesced, c.adopted), (2, 0, 0), "{c:?}");
    assert!(a1 != b1 && a1 != a0 && b1 != b0);
    assert_eq!(s.stored("tenant-a").await.access_token().expose(), a1.expose());
    assert_eq!(s.stored("tenant-b").await.access_token().expose(), b1.expose());
    assert_eq!(s.fx.auth().stats().max_refresh_redemptions(), 1);
}

/// Scenario 35 [S / S→]: a look-up is in flight (a PENDING `mcp_get_tokens` at the
/// tenant-scoped key, with a waiter) when a silent refresh succeeds: the look-up is not
/// deleted under its waiter but completed with the refreshed token set, and the waiter wakes
/// with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s35_a_pending_lookup_is_completed_with_the_refreshed_tokens_not_deleted() {
    let s = setup(|_| {}).await;
    let first = s.authorize("tenant-a").await;
    let lookup = flow_key("tenant-a", GET_TOKENS_FLOW);
    s.flows.delete(&lookup).await.unwrap();
    s.flows.init(&lookup, json!({})).await.unwrap();
    let sleepers = s.clock.sleepers();
    let waiter = tokio::spawn({
        let flows = s.flows.clone();
        let lookup = lookup.clone();
        async move { flows.wait::<Value>(&lookup).await }
    });
    // The waiter is in: it sleeps on the clock until its wait times out.
    waits_on_the_clock(&s.clock, sleepers).await;

    let provider = s.plain.provider(s.config("tenant-a")).unwrap();
    let fresh = retried(provider.on_unauthorized(Some(&first), &unauthorized()).await);
    assert_ne!(fresh, first);
    let version = s.stored("tenant-a").await.version();
    let woke = waiter.await.unwrap().unwrap();
    assert_eq!(woke["version"], json!(version), "the waiter got the refreshed set: {woke}");
    let record = s.flows.get::<Value>(&lookup).await.unwrap().expect("not deleted");
    assert_eq!(record.status, FlowStatus::Completed);
    assert_eq!(record.result.unwrap()["version"], json!(version));
    assert_eq!(provider.current_token().await.unwrap().unwrap(), fresh);
}

/// Scenario 8 [S→] (T1): return-early mode with a fresh PENDING authorization (another request
/// prompted; the user has not finished): a second request that needs authorization starts no
/// new one (no new state, nothing deleted) and is not prompted again, but is shown the stored
/// authorization URL and its expiry, and returns early at once instead of blocking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s08_return_early_with_a_fresh_pending_flow_reuses_it_and_returns_at_once() {
    let s = setup(|_| {}).await;
    s.hook.visit.store(false, Ordering::SeqCst);
    *s.hook.decision.lock().unwrap() = HookDecision::ReturnEarly;
    let provider = s.interactive.provider(s.config("tenant-a")).unwrap();
    let challenge = Refusal::new(401, RequestKind::Post, vec!["Bearer".into()]);
    let first = provider.on_unauthorized(None, &challenge).await.unwrap();
    assert_eq!(first, Recovery::AuthorizationRequired);
    assert_eq!(s.prompts(), 1);
    let oauth = flow_key("tenant-a", OAUTH_FLOW);
    let pending = s.flows.get::<Value>(&oauth).await.unwrap().unwrap();
    assert_eq!(pending.status, FlowStatus::Pending);

    s.clock.advance(Duration::from_secs(5)); // still fresh (OAuth wait timeout 10 s)
    let second = tokio::spawn({
        let (p, c) = (provider.clone(), challenge.clone());
        async move { p.on_unauthorized(None, &c).await }
    });
    eventually("the second request to return early", || second.is_finished()).await;
    assert_eq!(second.await.unwrap().unwrap(), Recovery::AuthorizationRequired);
    assert_eq!(s.prompts(), 1, "no second prompt");
    let replays = s.hook.replays.lock().unwrap().clone();
    assert_eq!(replays.len(), 1, "the pending authorization was shown to the second request");
    assert_eq!(replays[0].authorization_url, s.request(0).authorization_url);
    assert_eq!(replays[0].expires_at, s.request(0).expires_at);
    let still = s.flows.get::<Value>(&oauth).await.unwrap().unwrap();
    assert_eq!(still.status, FlowStatus::Pending);
    assert_eq!(still.created_at, pending.created_at, "the PENDING flow was not replaced");
    let mapping = FlowKey::new(STATE_FLOW, state_of(&s.request(0).authorization_url)).unwrap();
    assert!(s.flows.get::<Value>(&mapping).await.unwrap().is_some(), "its state mapping kept");
    assert_eq!(s.fx.auth().stats().registrations, 1);
}

/// The Rust counterpart of scenario 9 [S→]: a PENDING authorization older than the OAuth wait
/// timeout is never reused: the next request starts a new one (a new prompt, a new state),
/// and the old authorization URL can no longer complete the replaced flow (the callback
/// refuses its state), so an expired URL never resolves to the new flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s09_a_stale_pending_flow_is_replaced_and_its_url_is_dead() {
    let s = setup(|_| {}).await;
    s.hook.visit.store(false, Ordering::SeqCst);
    *s.hook.decision.lock().unwrap() = HookDecision::ReturnEarly;
    let provider = s.interactive.provider(s.config("tenant-a")).unwrap();
    let challenge = Refusal::new(401, RequestKind::Post, vec!["Bearer".into()]);
    assert_eq!(
        provider.on_unauthorized(None, &challenge).await.unwrap(),
        Recovery::AuthorizationRequired
    );
    s.clock.advance(Duration::from_secs(10) + Duration::from_millis(1));
    let second = tokio::spawn({
        let (p, c) = (provider.clone(), challenge.clone());
        async move { p.on_unauthorized(None, &c).await }
    });
    // Joining the stale flow instead would wait on the manual clock, which stands still.
    eventually("the second request to return early", || second.is_finished()).await;
    assert_eq!(second.await.unwrap().unwrap(), Recovery::AuthorizationRequired);
    assert_eq!(s.prompts(), 2, "the stale flow was replaced by a new authorization");
    let (old, new) = (s.request(0), s.request(1));
    assert_ne!(state_of(&old.authorization_url), state_of(&new.authorization_url));
    assert!(s.hook.replays.lock().unwrap().is_empty(), "a stale URL is never replayed");

    // The user finishes the old (replaced) authorization: the callback refuses it.
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let r = http.get(old.authorization_url).send().await.unwrap();
    assert_eq!(r.status(), 400, "{:?}", r.text().await);
    let oauth = flow_key("tenant-a", OAUTH_FLOW);
    assert_eq!(s.flows.get::<Value>(&oauth).await.unwrap().unwrap().status, FlowStatus::Pending);
    assert!(s.storage.tokens(&key("tenant-a")).await.unwrap().is_none(), "no tokens stored");
    // The new one completes it.
    let r = http.get(new.authorization_url).send().await.unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    assert_eq!(s.flows.get::<Value>(&oauth).await.unwrap().unwrap().status, FlowStatus::Completed);
}
