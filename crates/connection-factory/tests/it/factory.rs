//! The connection factory end to end against the fixture servers (real loopback HTTP, a manual
//! clock): coalesced silent refresh, the refresh budget, a late refresh that never overwrites,
//! revocation, insufficient scope, tenant isolation.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::{args, eventually, text};
use connection_factory::{
    AuthProvider, ConnectionFactory, Error, FactoryConfig, GET_TOKENS_FLOW, OAUTH_FLOW,
    OAuthRefresher, stored_client,
};
use flow_state::{FlowKey, FlowManager, MemoryStore, SharedStore};
use mcp_clock::{ManualClock, Timestamp};
use mcp_fixtures::{ClientAuth, ClientSpec, Fixtures, KnobSettings};
use mcp_oauth::{HttpPolicy, OAuthClient, ReqwestHttpClient};
use serde_json::{Value, json};
use token_storage::{
    Keyring, MemoryTokenStore, TokenKey, TokenResponse, TokenStorage, TokenStorageConfig,
};

/// What the fixture's tokens really live; the client is told they live an hour, so it keeps
/// sending them and the server answers 401 (a mid-session expiry the client did not foresee).
const LIFETIME: Duration = Duration::from_secs(60);
const CLAIMED: Duration = Duration::from_secs(3600);

struct Setup {
    clock: ManualClock,
    fx: Fixtures,
    store: SharedStore,
    flows: FlowManager,
    storage: TokenStorage,
    factory: ConnectionFactory,
    issuer: String,
    client_id: String,
}

async fn setup() -> Setup {
    let clock = ManualClock::new(Timestamp::from_secs(1_800_000_000));
    let mut knobs = KnobSettings::default();
    knobs.access_token_lifetime = LIFETIME;
    knobs.refresh_rotation = true;
    knobs.reuse_detection = true;
    knobs.reuse_grace = None;
    let fx = Fixtures::start_with(clock.shared(), knobs).await.unwrap();

    let oauth =
        OAuthClient::new(ReqwestHttpClient::new(HttpPolicy::default()).unwrap(), clock.shared());
    let discovery = oauth.discover(&fx.resource().url().parse().unwrap(), None).await.unwrap();
    let client = fx.auth().register_client(ClientSpec::new(ClientAuth::None)).unwrap();
    let registration = mcp_oauth::ClientRegistration {
        client_id: client.client_id().to_owned(),
        client_secret: None,
        client_key: None,
        auth_method: mcp_oauth::TokenEndpointAuthMethod::None,
        source: mcp_oauth::RegistrationSource::Dynamic,
        issuer: discovery.issuer().to_owned(),
        client_secret_expires_at: None,
    };
    let storage = TokenStorage::builder(
        MemoryTokenStore::new().into(),
        Arc::new(Keyring::parse(&"42".repeat(32)).unwrap()),
        Arc::new(OAuthRefresher::new(oauth)),
    )
    .clock(clock.shared())
    .config(storage_config())
    .build();
    for tenant in ["tenant-a", "tenant-b"] {
        storage
            .store_client(&key(tenant), &stored_client(&discovery, &registration))
            .await
            .unwrap();
    }
    let store = SharedStore::new(MemoryStore::new());
    let flows = FlowManager::builder(store.clone()).clock(clock.shared()).build().unwrap();
    let factory = ConnectionFactory::new(flows.clone(), storage.clone()).unwrap();
    Setup {
        clock,
        store,
        issuer: discovery.issuer().to_owned(),
        client_id: client.client_id().to_owned(),
        fx,
        flows,
        storage,
        factory,
    }
}

impl Setup {
    /// Issue fresh tokens at the fixture and store them for `tenant`; returns the access token.
    async fn issue(&self, tenant: &str) -> String {
        let issued = self.fx.auth().issue_tokens(
            &self.client_id,
            "mcp:tools",
            Some(self.fx.resource().url()),
        );
        let response = TokenResponse::bearer(issued.access_token())
            .expires_in(CLAIMED)
            .refresh_token(issued.refresh_token().unwrap())
            .scope("mcp:tools");
        self.storage.store(&key(tenant), &self.issuer, response).await.unwrap();
        issued.access_token().to_owned()
    }

    /// Issue fresh tokens at the fixture and store them under `key`; returns the access token.
    async fn issue_for(&self, key: &TokenKey) -> String {
        let issued = self.fx.auth().issue_tokens(
            &self.client_id,
            "mcp:tools",
            Some(self.fx.resource().url()),
        );
        let response = TokenResponse::bearer(issued.access_token())
            .expires_in(CLAIMED)
            .refresh_token(issued.refresh_token().unwrap())
            .scope("mcp:tools");
        self.storage.store(key, &self.issuer, response).await.unwrap();
        issued.access_token().to_owned()
    }

    fn config(&self, tenant: &str) -> FactoryConfig {
        FactoryConfig::new(self.fx.resource().url(), tenant, "alice", "fixture")
            .connect_timeout(Duration::from_secs(10))
            .oauth_wait_timeout(Duration::from_secs(60))
    }

    async fn stored_refresh(&self, tenant: &str) -> String {
        let set = self.storage.tokens(&key(tenant)).await.unwrap().unwrap();
        set.refresh_token().unwrap().expose().to_owned()
    }

    async fn stored_access(&self, tenant: &str) -> String {
        let set = self.storage.tokens(&key(tenant)).await.unwrap().unwrap();
        set.access_token().expose().to_owned()
    }
}

/// The fixture's HTTP `Date` header is the real time (hyper adds it), while expiry runs on the
/// manual clock: without this, the date correction would make every refreshed token look
/// expired once the manual clock is advanced.
fn storage_config() -> TokenStorageConfig {
    let mut config = TokenStorageConfig::default();
    config.max_date_correction = Duration::ZERO;
    config
}

fn key(tenant: &str) -> TokenKey {
    TokenKey::new(tenant, "alice", "fixture")
}

/// Tokens expire mid-session with rotation and strict reuse detection: 50 concurrent tool
/// calls are refused; the refresh token is redeemed once; all 50 succeed. The race: a 401 that
/// arrives while the refresh is in flight starts a second redemption (which strict reuse
/// detection would punish by revoking the family). The token endpoint holds every refresh until
/// all 50 calls have been refused, so every 401 meets the refresh in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_401s_one_redemption_all_succeed() {
    const CALLS: u64 = 50;
    let s = setup().await;
    s.issue("tenant-a").await;
    // Room for all 50 POSTs at once (the default is 16), so all 50 can be refused together.
    let config = s.config("tenant-a").max_concurrent_requests(64);
    let conn = Arc::new(s.factory.connect(config).await.unwrap());
    assert_eq!(text(&conn.call_tool("echo", args("warm")).await.unwrap()), "warm");

    // The server's tokens expire (the client believes they live an hour, so it sends them); the
    // refresh grant hangs until released, which happens once the server has refused all 50.
    s.fx.auth().knobs().set_refresh_hang(true);
    s.clock.advance(LIFETIME + Duration::from_secs(1));
    let calls: Vec<_> = (0..CALLS)
        .map(|i| {
            let conn = conn.clone();
            tokio::spawn(async move { conn.call_tool("echo", args(&format!("call {i}"))).await })
        })
        .collect();
    eventually("all 50 calls refused", || s.fx.resource().stats().unauthorized == CALLS).await;
    assert_eq!(s.fx.auth().stats().refresh_token_requests, 1, "one redemption in flight");
    s.fx.auth().knobs().set_refresh_hang(false);
    for (i, call) in calls.into_iter().enumerate() {
        let result = call.await.unwrap().unwrap_or_else(|e| panic!("call {i}: {e:?}"));
        assert_eq!(text(&result), format!("call {i}"));
    }

    let auth = s.fx.auth().stats();
    assert_eq!(auth.refresh_token_requests, 1, "{auth:?}");
    assert_eq!(auth.max_refresh_redemptions(), 1);
    assert_eq!(auth.reuse_detections, 0);
    assert_eq!(auth.families_revoked, 0);
    let rs = s.fx.resource().stats();
    assert_eq!(rs.unauthorized, CALLS, "exactly the 50 calls were refused: {rs:?}");
    let c = s.factory.counters();
    assert_eq!(c.refreshed, 1, "one 401 led the refresh: {c:?}");
    // The server counts a refusal before the client has read it: under load a few refused
    // calls reach the factory only after the release, find the refreshed tokens stored and
    // adopt them (no redemption either way; the counts above pin that). Every other one joined
    // the refresh in flight.
    assert!(c.coalesced >= 1, "401s joined the refresh in flight: {c:?}");
    assert_eq!(c.coalesced + c.adopted, CALLS - 1, "the other 49 joined or adopted it: {c:?}");
    assert_eq!(c.rejected + c.transient + c.timed_out, 0, "{c:?}");
}

/// A server that answers an expired token with a bare 401 (no `WWW-Authenticate` header, which
/// rmcp's client does not treat as a challenge): the refusal still reaches the factory, which
/// refreshes once and retries; the call succeeds on the same session.
#[tokio::test]
async fn a_bare_401_without_a_challenge_still_refreshes_and_retries() {
    let s = setup().await;
    s.issue("tenant-a").await;
    let conn = s.factory.connect(s.config("tenant-a")).await.unwrap();
    assert_eq!(text(&conn.call_tool("echo", args("warm")).await.unwrap()), "warm");
    s.fx.auth().knobs().set_omit_challenge(true);
    s.clock.advance(LIFETIME + Duration::from_secs(1));
    assert_eq!(text(&conn.call_tool("echo", args("after")).await.unwrap()), "after");
    let rs = s.fx.resource().stats();
    assert!(rs.unauthorized >= 1, "the server refused the expired token: {rs:?}");
    assert_eq!(s.fx.auth().stats().refresh_token_requests, 1);
    assert_eq!(s.factory.counters().refreshed, 1, "{:?}", s.factory.counters());
}

/// Two OAuth configurations for the same tenant, user and server (other scopes) have their own
/// token keys: their tokens and their refreshes are never shared, even when both connections
/// meet a 401 at the same moment. A plain configuration keeps the bare key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configs_that_differ_in_oauth_settings_never_share_a_refresh() {
    let s = setup().await;
    let plain = s.config("tenant-a");
    assert_eq!(plain.token_key(), key("tenant-a"));
    let narrow = s.config("tenant-a").scopes("mcp:tools");
    let wide = s.config("tenant-a").scopes("mcp:tools mcp:write");
    assert_ne!(narrow.token_key(), wide.token_key());
    assert_ne!(narrow.token_key(), plain.token_key());
    assert_eq!(wide.token_key(), s.config("tenant-a").scopes("mcp:write mcp:tools").token_key());
    let moved = FactoryConfig::new("http://127.0.0.1:1/mcp", "tenant-a", "alice", "fixture")
        .scopes("mcp:tools");
    assert_ne!(moved.token_key(), narrow.token_key(), "the server URL is in the digest");
    let pre = |id: &str| {
        let mut client = mcp_oauth::ClientConfig::new("t", "http://127.0.0.1:9/callback");
        client.pre_registered = Some(mcp_oauth::PreRegisteredClient {
            issuer: "http://127.0.0.1:1".into(),
            client_id: id.into(),
            client_secret: None,
            client_key: None,
            auth_method: None,
        });
        s.config("tenant-a").client(client).token_key()
    };
    assert_ne!(pre("one"), pre("two"), "the client identity is in the digest");

    let (narrow_key, wide_key) = (narrow.token_key(), wide.token_key());
    for k in [&narrow_key, &wide_key] {
        let client = s.storage.client(&key("tenant-a")).await.unwrap().unwrap();
        s.storage.store_client(k, &client).await.unwrap();
    }
    let narrow_token = s.issue_for(&narrow_key).await;
    assert!(s.factory.provider(wide.clone()).unwrap().current_token().await.unwrap().is_none());
    let wide_token = s.issue_for(&wide_key).await;
    let pn = s.factory.provider(narrow.clone()).unwrap();
    assert_eq!(pn.current_token().await.unwrap().unwrap().expose(), narrow_token);

    let conn_n = Arc::new(s.factory.connect(narrow).await.unwrap());
    let conn_w = Arc::new(s.factory.connect(wide).await.unwrap());
    s.clock.advance(LIFETIME + Duration::from_secs(1));
    let calls: Vec<_> = [conn_n, conn_w]
        .into_iter()
        .flat_map(|c| (0..5).map(move |i| (c.clone(), i)))
        .map(|(c, i)| tokio::spawn(async move { c.call_tool("echo", args(&format!("{i}"))).await }))
        .collect();
    for call in calls {
        call.await.unwrap().unwrap();
    }
    let auth = s.fx.auth().stats();
    assert_eq!(auth.refresh_token_requests, 2, "one refresh per configuration: {auth:?}");
    assert_eq!(auth.max_refresh_redemptions(), 1);
    assert_eq!(s.factory.counters().refreshed, 2, "{:?}", s.factory.counters());
    let now_n = s.storage.tokens(&narrow_key).await.unwrap().unwrap();
    let now_w = s.storage.tokens(&wide_key).await.unwrap().unwrap();
    assert_ne!(now_n.access_token().expose(), narrow_token);
    assert_ne!(now_w.access_token().expose(), wide_token);
    assert_ne!(now_n.access_token(), now_w.access_token());
}

/// A hung token endpoint without an interactive flow, on the manual clock: the refused call
/// waits for the refresh until the clock passes the refresh budget (not the 30 s HTTP timeout),
/// then fails; a COMPLETED interactive flow of the tenant is invalidated (not the other
/// tenant's); when the hung refresh finally lands after newer tokens were stored, it does not
/// overwrite them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_token_endpoint_falls_back_within_budget_and_the_late_refresh_never_overwrites() {
    let s = setup().await;
    let old = s.issue("tenant-a").await;
    let config = s.config("tenant-a").connect_timeout(Duration::from_secs(2));
    let budget = config.refresh_budget();
    assert_eq!(budget, Duration::from_millis(800));
    let conn = Arc::new(s.factory.connect(config).await.unwrap());
    assert_eq!(text(&conn.call_tool("echo", args("warm")).await.unwrap()), "warm");

    // A COMPLETED interactive flow for tenant A and for tenant B (same user, same server).
    let oauth_a = FlowKey::scoped(Some("tenant-a"), OAUTH_FLOW, "5:alice:fixture").unwrap();
    let oauth_b = FlowKey::scoped(Some("tenant-b"), OAUTH_FLOW, "5:alice:fixture").unwrap();
    for k in [&oauth_a, &oauth_b] {
        s.flows.init(k, json!({})).await.unwrap();
        s.flows.complete(k, &"done").await.unwrap();
    }

    s.fx.auth().knobs().set_token_hang(true);
    s.clock.advance(LIFETIME + Duration::from_secs(1));
    let call = tokio::spawn({
        let conn = conn.clone();
        async move { conn.call_tool("echo", args("hung")).await }
    });
    eventually("the refresh request", || s.fx.auth().stats().refresh_token_requests == 1).await;
    // Just short of the budget, the call still waits for the refresh.
    s.clock.advance(budget - Duration::from_millis(1));
    mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(50)).await;
    assert!(!call.is_finished(), "gave up before the budget");
    assert_eq!(s.factory.counters().timed_out, 0);
    s.clock.advance(Duration::from_millis(1));
    let err = call.await.unwrap().unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert_eq!(s.factory.counters().timed_out, 1);
    assert!(
        s.flows.get::<String>(&oauth_a).await.unwrap().is_none(),
        "tenant A's flow invalidated"
    );
    assert!(s.flows.get::<String>(&oauth_b).await.unwrap().is_some(), "tenant B's flow untouched");

    // Newer tokens are stored (as an authorization would); then the hung refresh is answered.
    let newer = s.issue("tenant-a").await;
    assert_eq!(s.fx.auth().stats().max_refresh_redemptions(), 0);
    s.fx.auth().knobs().set_token_hang(false);
    eventually("the late redemption", || s.fx.auth().stats().max_refresh_redemptions() == 1).await;
    // A force-refresh for the old token joins the late refresh while it runs (else finds the
    // newer tokens): after it, the late result has landed, or been discarded.
    let _ = s.storage.force_refresh(&key("tenant-a"), &s.issuer, &old.as_str().into()).await;
    assert_eq!(s.stored_access("tenant-a").await, newer, "the late refresh overwrote newer tokens");
    assert_eq!(s.fx.auth().stats().refresh_token_requests, 1);
    // And the connection works with them.
    assert_eq!(text(&conn.call_tool("echo", args("after")).await.unwrap()), "after");
}

/// Server-side revocation: the refresh is refused; the call fails with AuthorizationRequired;
/// the dead refresh token is not redeemed again.
#[tokio::test]
async fn revocation_is_authorization_required_without_a_retry_loop() {
    let s = setup().await;
    s.issue("tenant-a").await;
    let conn = s.factory.connect(s.config("tenant-a")).await.unwrap();
    s.fx.auth().knobs().revoke_all_tokens();
    let err = conn.call_tool("echo", args("x")).await.unwrap_err();
    assert!(matches!(err, Error::AuthorizationRequired { .. }), "{err:?}");
    // The call and (perhaps) the session's GET stream were refused: one refresh for both.
    assert!(s.factory.counters().rejected >= 1, "{:?}", s.factory.counters());
    assert_eq!(s.fx.auth().stats().refresh_token_requests, 1);
    let err = conn.call_tool("echo", args("y")).await.unwrap_err();
    assert!(matches!(err, Error::AuthorizationRequired { .. }), "{err:?}");
    assert_eq!(
        s.fx.auth().stats().refresh_token_requests,
        1,
        "the dead refresh token is not resent"
    );
}

/// A 403 insufficient_scope never triggers a refresh.
#[tokio::test]
async fn insufficient_scope_skips_refresh() {
    let s = setup().await;
    s.issue("tenant-a").await;
    let conn = s.factory.connect(s.config("tenant-a")).await.unwrap();
    let err = conn.call_tool("counter", None).await.unwrap_err();
    assert!(matches!(err, Error::InsufficientScope { .. }), "{err:?}");
    assert_eq!(s.fx.auth().stats().refresh_token_requests, 0);
    assert_eq!(s.factory.counters().insufficient_scope, 1);
}

/// Tenant A and tenant B, same user id and server name: separate tokens, separate cached
/// look-ups, and a refresh for A leaves B's tokens alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_never_share_tokens_or_flows() {
    let s = setup().await;
    let a = s.issue("tenant-a").await;
    let b = s.issue("tenant-b").await;
    assert_ne!(a, b);
    let pa = s.factory.provider(s.config("tenant-a")).unwrap();
    let pb = s.factory.provider(s.config("tenant-b")).unwrap();
    assert_eq!(pa.current_token().await.unwrap().unwrap().expose(), a);
    assert_eq!(pb.current_token().await.unwrap().unwrap().expose(), b);
    let lookup_a = FlowKey::scoped(Some("tenant-a"), GET_TOKENS_FLOW, "5:alice:fixture").unwrap();
    let lookup_b = FlowKey::scoped(Some("tenant-b"), GET_TOKENS_FLOW, "5:alice:fixture").unwrap();
    assert!(s.flows.get::<Value>(&lookup_a).await.unwrap().is_some());
    assert!(s.flows.get::<Value>(&lookup_b).await.unwrap().is_some());

    let conn_a = s.factory.connect(s.config("tenant-a")).await.unwrap();
    s.clock.advance(LIFETIME + Duration::from_secs(1));
    assert_eq!(text(&conn_a.call_tool("echo", args("a")).await.unwrap()), "a");
    let a2 = s.stored_access("tenant-a").await;
    assert_ne!(a2, a, "tenant A refreshed");
    assert_eq!(s.stored_access("tenant-b").await, b, "tenant B untouched");
    assert_eq!(pa.current_token().await.unwrap().unwrap().expose(), a2);
    assert_eq!(pb.current_token().await.unwrap().unwrap().expose(), b);
}

/// Without any stored tokens the provider sends no credentials, and the 401 is
/// AuthorizationRequired (the interactive flow is not part of this crate yet).
#[tokio::test]
async fn no_tokens_is_authorization_required_at_connect() {
    let s = setup().await;
    let err = s.factory.connect(s.config("tenant-a")).await.unwrap_err();
    assert!(matches!(err, Error::AuthorizationRequired { .. }), "{err:?}");
    assert_eq!(s.fx.auth().stats().refresh_token_requests, 0);
}

/// The cached token look-up lives in the flow store (sled or Redis in a deployment): it names
/// the token set (issuer, version, expiry) but never holds a token. The raw bytes of the
/// look-up record, after the first look-up and after a refresh, contain neither the access
/// token nor the refresh token, and the provider still serves the current token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_flow_store_never_holds_a_token() {
    let s = setup().await;
    let first = s.issue("tenant-a").await;
    let first_refresh = s.stored_refresh("tenant-a").await;
    let conn = s.factory.connect(s.config("tenant-a")).await.unwrap();
    assert_eq!(text(&conn.call_tool("echo", args("one")).await.unwrap()), "one");
    let lookup = FlowKey::scoped(Some("tenant-a"), GET_TOKENS_FLOW, "5:alice:fixture").unwrap();
    let raw = s.store.get(lookup.as_str()).await.unwrap().expect("the look-up is cached");
    let text_of = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    let record = text_of(&raw.value);
    assert!(record.contains("version"), "the look-up record names the token set: {record}");
    assert!(!record.contains(&first), "the access token is in the flow store");
    assert!(!record.contains(&first_refresh), "the refresh token is in the flow store");

    // A mid-session 401: the refresh completes or replaces the look-up, still without tokens.
    s.clock.advance(LIFETIME + Duration::from_secs(1));
    assert_eq!(text(&conn.call_tool("echo", args("two")).await.unwrap()), "two");
    let second = s.stored_access("tenant-a").await;
    assert_ne!(second, first);
    let provider = s.factory.provider(s.config("tenant-a")).unwrap();
    assert_eq!(provider.current_token().await.unwrap().unwrap().expose(), second);
    let raw = s.store.get(lookup.as_str()).await.unwrap().expect("the look-up is cached again");
    let record = text_of(&raw.value);
    for secret in [first, second, first_refresh, s.stored_refresh("tenant-a").await] {
        assert!(!record.contains(&secret), "a token is in the flow store: {record}");
    }
}

/// A factory over a flow manager and a token storage on different clocks (a manual clock for
/// one, the system clock or another manual clock for the other) would judge one token by two
/// times: its budgets and expiry checks by one, token storage's refresh by the other. It is
/// refused with a typed error; one clock, shared by both, is accepted.
#[tokio::test]
async fn a_factory_over_two_clocks_is_refused() {
    let manual = ManualClock::new(Timestamp::from_secs(1_800_000_000));
    let oauth =
        OAuthClient::new(ReqwestHttpClient::new(HttpPolicy::default()).unwrap(), manual.shared());
    let storage_on = |clock: mcp_clock::SharedClock| {
        TokenStorage::builder(
            MemoryTokenStore::new().into(),
            Arc::new(Keyring::parse(&"42".repeat(32)).unwrap()),
            Arc::new(OAuthRefresher::new(oauth.clone())),
        )
        .clock(clock)
        .build()
    };
    let flows = FlowManager::builder(SharedStore::new(MemoryStore::new()))
        .clock(manual.shared())
        .build()
        .unwrap();
    let other = ManualClock::new(Timestamp::from_secs(1_800_000_000));
    for clock in [mcp_clock::SharedClock::system(), other.shared()] {
        match ConnectionFactory::new(flows.clone(), storage_on(clock)) {
            Err(Error::InvalidConfig(message)) => assert!(message.contains("clock"), "{message}"),
            Err(other) => panic!("expected InvalidConfig, got {other:?}"),
            Ok(_) => panic!("a factory over two clocks was accepted"),
        }
    }
    assert!(ConnectionFactory::new(flows, storage_on(manual.clone().shared())).is_ok());
}

/// A refresher whose authorization server answers 503 (a failure that may pass).
#[derive(Debug)]
struct ServerInTrouble;

#[async_trait::async_trait]
impl token_storage::Refresher for ServerInTrouble {
    async fn refresh(
        &self,
        _: &TokenKey,
        _: &token_storage::RefreshRequest,
    ) -> Result<TokenResponse, token_storage::RefreshError> {
        Err(token_storage::RefreshError::transient(
            token_storage::TransientKind::ServerError(503),
            "503",
        ))
    }
}

/// A failure of the token look-up crosses a flow, which keeps only a kind and a message (the
/// message is the token-storage error's text): the look-up records the kind, so
/// [`Error::kind`] says what failed and callers (mcp-connect's exit codes) never read the
/// message. A store that is unavailable, then a refresh the authorization server could not
/// answer, each through the real look-up.
#[tokio::test]
async fn a_failed_token_look_up_keeps_its_kind() {
    use connection_factory::ErrorKind;
    use token_storage::testkit::FaultyTokenStore;

    let clock = ManualClock::new(Timestamp::from_secs(1_800_000_000));
    let faulty = FaultyTokenStore::new(MemoryTokenStore::new().into(), clock.shared());
    let storage = TokenStorage::builder(
        token_storage::SharedTokenStore::from_arc(faulty.clone()),
        Arc::new(Keyring::parse(&"42".repeat(32)).unwrap()),
        Arc::new(ServerInTrouble),
    )
    .clock(clock.shared())
    .config({
        // One attempt: no backoff sleep on the manual clock.
        let mut config = storage_config();
        config.max_attempts = 1;
        config.refresh_jitter = Duration::ZERO;
        config
    })
    .build();
    let issuer = "https://as.example";
    let key = key("tenant-a");
    storage.store_client(&key, &token_storage::ClientRegistration::new("c", issuer)).await.unwrap();
    let response =
        TokenResponse::bearer("at").expires_in(Duration::from_secs(600)).refresh_token("rt");
    storage.store(&key, issuer, response).await.unwrap();
    let flows = FlowManager::builder(SharedStore::new(MemoryStore::new()))
        .clock(clock.shared())
        .build()
        .unwrap();
    let factory = ConnectionFactory::new(flows, storage).unwrap();
    let config = FactoryConfig::new("http://127.0.0.1:1/mcp", "tenant-a", "alice", "fixture");
    let provider = factory.provider(config).unwrap();

    faulty.fail_next_read();
    let e = provider.current_token().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::StoreUnavailable, "{e}");

    clock.advance(Duration::from_secs(601));
    let e = provider.current_token().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AuthorizationServerUnavailable, "{e}");
}
