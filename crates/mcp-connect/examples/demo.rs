//! The demo: `cargo xtask demo` (= `cargo run -q -p mcp-connect --example demo`).
//!
//! No setup: it starts the fixture servers (an OAuth authorization server and an MCP resource
//! server) on 127.0.0.1 with 60-second access tokens, refresh-token rotation and strict reuse
//! detection, and drives a [`ConnectionFactory`] (in-memory flow and token stores, an
//! auto-approving hook that plays the browser) through a token's whole life:
//!
//! 1. discovery, dynamic registration and authorization (auto-approved);
//! 2. tool calls;
//! 3. expiry: the clock passes the token's lifetime, the next call refreshes first;
//! 4. a mid-session 401 (the server's clock runs ahead) under a burst of concurrent calls:
//!    one refresh serves them all;
//! 5. server-side revocation: the refresh is refused, the interactive fallback prompts once,
//!    and the queued calls resume;
//! 6. logout: RFC 7009 revocation, then deletion from the store.
//!
//! It prints a timeline and a table of what the servers saw, checks every expectation, and
//! exits non-zero, naming the step, if anything misbehaved. Time is a manual clock shared by
//! the servers and the client, so "a minute later" takes no time; the timeline's milliseconds
//! are real. `DEMO_TRACE=debug` (or `info`, `trace`) also logs what the workspace's crates do.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use connection_factory::{
    AuthProvider, AuthorizationHook, AuthorizationReason, AuthorizationRequest, CallToolResult,
    ConnectOptions, Connection, ConnectionFactory, Error, FactoryConfig, HookDecision,
    OAuthRefresher, Recovery, RefreshCounters, Refusal, Secret, callback_router,
};
use flow_state::{FlowManager, MemoryStore, SharedStore};
use mcp_clock::{ManualClock, SystemClock, Timestamp};
use mcp_fixtures::{AuthStats, Fixtures, KnobSettings, ResourceStats};
use mcp_oauth::{
    AccessToken, ClientConfig, ClientRegistration, HttpPolicy, OAuthClient, RefreshToken,
    RegistrationSource, ReqwestHttpClient, Revocation, TokenEndpointAuthMethod,
};
use serde_json::{Value, json};
use token_storage::{Keyring, MemoryTokenStore, TokenKey, TokenStorage, TokenStorageConfig};

/// How long the fixture's access tokens live.
const LIFETIME: Duration = Duration::from_secs(60);
/// How many calls the 401 burst fires at once (rmcp sends at most 16 POSTs at a time).
const BURST: usize = 16;
/// How long the token endpoint takes during the 401 burst.
const REFRESH_DELAY: Duration = Duration::from_millis(200);
/// How many calls are queued behind the interactive fallback.
const QUEUED: usize = 6;

type Failure = Box<dyn std::error::Error>;

/// The browser: visits the authorization URL and follows the redirect to the callback.
#[derive(Debug)]
struct AutoBrowser {
    http: reqwest::Client,
    prompts: AtomicU64,
    reasons: Mutex<Vec<AuthorizationReason>>,
    timeline: Arc<Timeline>,
}

#[async_trait::async_trait]
impl AuthorizationHook for AutoBrowser {
    async fn authorization_required(&self, request: AuthorizationRequest) -> HookDecision {
        self.prompts.fetch_add(1, Ordering::SeqCst);
        self.reasons.lock().unwrap_or_else(|e| e.into_inner()).push(request.reason);
        let url = request.authorization_url.clone();
        let shown = url.split('?').next().unwrap_or_default().to_owned();
        self.timeline.event(
            "  browser",
            format!(
                "prompt ({:?}): opens {shown}?… scope {:?}; auto-approved",
                request.reason,
                request.scopes.as_deref().unwrap_or("-")
            ),
        );
        let http = self.http.clone();
        tokio::spawn(async move {
            let _ = http.get(url).send().await;
        });
        HookDecision::Wait
    }
}

/// The printed timeline, and the expectations that failed.
#[derive(Debug)]
struct Timeline {
    start: Instant,
    failures: Mutex<Vec<String>>,
}

impl Timeline {
    fn event(&self, step: &str, what: impl AsRef<str>) {
        let ms = SystemClock::instant().duration_since(self.start).as_millis();
        println!("{ms:>6} ms  {step:<22} {}", what.as_ref());
    }

    fn expect(&self, step: &str, ok: bool, what: impl AsRef<str>) {
        if ok {
            self.event(step, format!("ok: {}", what.as_ref()));
        } else {
            self.event(step, format!("UNEXPECTED: {}", what.as_ref()));
            self.failures
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(format!("{step}: {}", what.as_ref()));
        }
    }
}

/// A provider with one fixed token and no recovery: shows that a logged-out token is dead.
#[derive(Debug)]
struct FixedToken(Secret);

#[async_trait::async_trait]
impl AuthProvider for FixedToken {
    async fn current_token(&self) -> Result<Option<Secret>, Error> {
        Ok(Some(self.0.clone()))
    }
    async fn on_unauthorized(
        &self,
        _rejected: Option<&Secret>,
        _challenge: &Refusal,
    ) -> Result<Recovery, Error> {
        Ok(Recovery::AuthorizationRequired)
    }
}

struct Demo {
    clock: ManualClock,
    fx: Fixtures,
    oauth: OAuthClient,
    factory: ConnectionFactory,
    browser: Arc<AutoBrowser>,
    redirect: String,
    timeline: Arc<Timeline>,
    /// The 401 burst: (requests refused, refresh grants that answered them).
    burst: Mutex<(u64, u64)>,
}

impl Demo {
    fn config(&self) -> FactoryConfig {
        FactoryConfig::new(self.fx.resource().url(), "demo", "alice", "fixture")
            .connect_timeout(Duration::from_secs(10))
            .oauth_wait_timeout(Duration::from_secs(10))
            .client(ClientConfig::new("mcp-connect demo", self.redirect.clone()))
    }

    fn key(&self) -> TokenKey {
        self.config().token_key()
    }

    fn prompts(&self) -> u64 {
        self.browser.prompts.load(Ordering::SeqCst)
    }

    fn auth(&self) -> AuthStats {
        self.fx.auth().stats()
    }

    fn resource(&self) -> ResourceStats {
        self.fx.resource().stats()
    }

    /// The stored token set's version (tokens themselves are never printed).
    async fn stored_version(&self) -> Result<String, Failure> {
        let set = self.factory.storage().tokens(&self.key()).await?;
        Ok(set.map_or_else(|| "none".to_owned(), |t| format!("v{}", t.version())))
    }
}

fn args(text: &str) -> Option<serde_json::Map<String, Value>> {
    json!({ "text": text }).as_object().cloned()
}

fn text(result: &CallToolResult) -> String {
    result.content.first().and_then(|c| c.as_text()).map(|t| t.text.clone()).unwrap_or_default()
}

async fn setup() -> Result<Demo, Failure> {
    let timeline = Arc::new(Timeline { start: SystemClock::instant(), failures: Mutex::default() });
    let clock = ManualClock::new(Timestamp::from_secs(1_800_000_000));
    let mut knobs = KnobSettings::default();
    knobs.access_token_lifetime = LIFETIME;
    knobs.refresh_rotation = true;
    knobs.reuse_detection = true;
    knobs.reuse_grace = None;
    let fx = Fixtures::start_with(clock.shared(), knobs).await?;
    timeline.event(
        "start",
        format!(
            "authorization server {} and MCP server {} (60 s access tokens, rotation, strict reuse detection)",
            fx.auth().issuer(),
            fx.resource().url()
        ),
    );

    let oauth = OAuthClient::new(ReqwestHttpClient::new(HttpPolicy::default())?, clock.shared());
    let mut config = TokenStorageConfig::default();
    // The servers' HTTP `Date` header is real time while expiry runs on the manual clock.
    config.max_date_correction = Duration::ZERO;
    // A demo key (in-memory store, gone at exit); real deployments load theirs.
    let storage = TokenStorage::builder(
        MemoryTokenStore::new().into(),
        Arc::new(Keyring::parse(&"d3".repeat(32))?),
        Arc::new(OAuthRefresher::new(oauth.clone())),
    )
    .clock(clock.shared())
    .config(config)
    .build();
    let flows =
        FlowManager::builder(SharedStore::new(MemoryStore::new())).clock(clock.shared()).build()?;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let redirect = format!("http://{}/callback", listener.local_addr()?);
    let router = callback_router(flows.clone(), storage.clone(), oauth.clone());
    tokio::spawn(async move { axum::serve(listener, router).await });
    timeline.event("start", format!("OAuth callback listening on {redirect}"));

    let browser = Arc::new(AutoBrowser {
        http: reqwest::Client::builder().no_proxy().build()?,
        prompts: AtomicU64::new(0),
        reasons: Mutex::default(),
        timeline: timeline.clone(),
    });
    let factory =
        ConnectionFactory::new(flows, storage)?.with_interactive(oauth.clone(), browser.clone());
    Ok(Demo { clock, fx, oauth, factory, browser, redirect, timeline, burst: Mutex::default() })
}

async fn run(d: &Demo) -> Result<(), Failure> {
    let t = &d.timeline;

    // 1. Discovery, registration, authorization.
    let step = "1 connect";
    t.event(step, "no tokens stored: connect (discovery from the 401, registration, PKCE)");
    let conn = Arc::new(d.factory.connect(d.config()).await?);
    let auth = d.auth();
    let client = d.factory.storage().client(&d.key()).await?;
    t.expect(
        step,
        auth.registrations == 1 && client.is_some(),
        format!(
            "registered dynamically as {} at {}",
            client.as_ref().map_or("-", |c| c.client_id.as_str()),
            client.as_ref().map_or("-", |c| c.issuer.as_str())
        ),
    );
    t.expect(
        step,
        d.prompts() == 1 && auth.authorization_code_requests == 1,
        format!("one prompt, one code exchange; token set {} stored", d.stored_version().await?),
    );

    // 2. Tool calls.
    let step = "2 tools";
    let tools = conn.list_tools().await?;
    let names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
    t.expect(step, names.contains(&"echo"), format!("tools/list: {names:?}"));
    let echoed = text(&conn.call_tool("echo", args("hello")).await?);
    t.expect(step, echoed == "hello", format!("tools/call echo \"hello\" -> {echoed:?}"));

    // 3. Expiry: the client knows the token's lifetime and refreshes before using it.
    let step = "3 expiry";
    let before = (d.auth(), d.resource());
    d.clock.advance(LIFETIME + Duration::from_secs(1));
    t.event(step, "61 s pass: the access token has expired");
    let echoed = text(&conn.call_tool("echo", args("after expiry")).await?);
    let after = (d.auth(), d.resource());
    t.expect(
        step,
        echoed == "after expiry"
            && after.0.refresh_token_requests == before.0.refresh_token_requests + 1
            && after.1.unauthorized == before.1.unauthorized,
        format!(
            "the call refreshed first (1 refresh grant, no 401): token set now {}",
            d.stored_version().await?
        ),
    );

    // 4. A mid-session 401 under a burst of calls: one coalesced refresh.
    let step = "4 401 burst";
    let before = (d.auth(), d.resource(), d.factory.counters());
    d.fx.auth().knobs().set_clock_offset_millis(2 * LIFETIME.as_millis() as i64);
    // A slow token endpoint keeps the refresh running while every call meets its 401.
    d.fx.auth().knobs().set_token_delay(REFRESH_DELAY);
    t.event(
        step,
        format!(
            "the server's clock jumps 2 min ahead: it refuses the token the client still trusts; \
             {BURST} calls at once; the token endpoint takes {} ms",
            REFRESH_DELAY.as_millis()
        ),
    );
    let calls: Vec<_> = (0..BURST)
        .map(|i| {
            let conn = conn.clone();
            tokio::spawn(async move { conn.call_tool("echo", args(&format!("burst {i}"))).await })
        })
        .collect();
    let mut ok = 0;
    for (i, call) in calls.into_iter().enumerate() {
        match call.await? {
            Ok(r) if text(&r) == format!("burst {i}") => ok += 1,
            Ok(r) => t.expect(step, false, format!("call {i} answered {:?}", text(&r))),
            Err(e) => t.expect(step, false, format!("call {i} failed: {e}")),
        }
    }
    d.fx.auth().knobs().set_clock_offset_millis(0);
    d.fx.auth().knobs().set_token_delay(Duration::ZERO);
    let after = (d.auth(), d.resource(), d.factory.counters());
    let refreshes = after.0.refresh_token_requests - before.0.refresh_token_requests;
    let refused = after.1.unauthorized - before.1.unauthorized;
    let answered = |c: &connection_factory::RefreshCounters| c.refreshed + c.coalesced + c.adopted;
    let answered = answered(&after.2) - answered(&before.2);
    let coalesced = after.2.coalesced - before.2.coalesced;
    *d.burst.lock().unwrap_or_else(|e| e.into_inner()) = (refused, refreshes);
    t.expect(step, ok == BURST, format!("{ok}/{BURST} calls succeeded"));
    t.expect(
        step,
        refreshes == 1 && refused == BURST as u64 && answered == refused && coalesced + 1 >= refused,
        format!(
            "{refused} requests got a 401, all answered by {refreshes} refresh grant ({coalesced} joined it)"
        ),
    );
    t.expect(
        step,
        after.0.max_refresh_redemptions() <= 1 && after.0.reuse_detections == 0,
        "no refresh token redeemed twice, no reuse detected",
    );

    // 5. Server-side revocation: the refresh is refused; one prompt; queued calls resume.
    let step = "5 revocation";
    let before = (d.auth(), d.factory.counters());
    d.fx.auth().knobs().revoke_all_tokens();
    t.event(step, format!("the server revokes every token; {QUEUED} calls at once"));
    let calls: Vec<_> = (0..QUEUED)
        .map(|i| {
            let conn = conn.clone();
            tokio::spawn(async move { conn.call_tool("echo", args(&format!("queued {i}"))).await })
        })
        .collect();
    let mut ok = 0;
    for (i, call) in calls.into_iter().enumerate() {
        match call.await? {
            Ok(r) if text(&r) == format!("queued {i}") => ok += 1,
            Ok(r) => t.expect(step, false, format!("call {i} answered {:?}", text(&r))),
            Err(e) => t.expect(step, false, format!("call {i} failed: {e}")),
        }
    }
    let after = (d.auth(), d.factory.counters());
    let reasons = d.browser.reasons.lock().unwrap_or_else(|e| e.into_inner()).clone();
    t.expect(
        step,
        after.1.rejected > before.1.rejected
            && after.0.refresh_token_requests == before.0.refresh_token_requests + 1,
        "the silent refresh was refused once (invalid_grant): authorization required",
    );
    t.expect(
        step,
        d.prompts() == 2 && reasons.last() == Some(&AuthorizationReason::RefreshFailed),
        "interactive fallback: one prompt for every waiting call",
    );
    t.expect(
        step,
        ok == QUEUED
            && after.0.authorization_code_requests == before.0.authorization_code_requests + 1,
        format!(
            "resumed: {ok}/{QUEUED} queued calls answered after approval; token set now {}",
            d.stored_version().await?
        ),
    );
    // The connection keeps working on the new grant.
    let echoed = text(&conn.call_tool("echo", args("still here")).await?);
    t.expect(step, echoed == "still here", "the same connection carries on");

    // 6. Logout: RFC 7009 revocation, then deletion.
    let step = "6 logout";
    let key = d.key();
    let tokens = d.factory.storage().tokens(&key).await?.ok_or("no tokens stored")?;
    let stored = d.factory.storage().client(&key).await?.ok_or("no client stored")?;
    let discovery = d.oauth.discover(&d.fx.resource().url().parse()?, None).await?;
    let registration = ClientRegistration {
        client_id: stored.client_id.clone(),
        client_secret: stored
            .client_secret
            .as_ref()
            .map(|s| mcp_oauth::ClientSecret::new(s.expose())),
        client_key: None,
        auth_method: TokenEndpointAuthMethod::from_name(&stored.token_endpoint_auth_method)
            .ok_or("unknown token endpoint auth method")?,
        source: RegistrationSource::Dynamic,
        issuer: stored.issuer.clone(),
        client_secret_expires_at: None,
    };
    let revocations = d.auth().revocations;
    let outcome = d
        .oauth
        .revoke(
            &discovery,
            &registration,
            tokens.refresh_token().map(|r| RefreshToken::new(r.expose())).as_ref(),
            Some(&AccessToken::new(tokens.access_token().expose())),
        )
        .await?;
    d.factory.storage().delete_all(&key).await?;
    let gone = d.factory.storage().tokens(&key).await?.is_none()
        && d.factory.storage().client(&key).await?.is_none();
    t.expect(
        step,
        outcome == Revocation::Revoked && d.auth().revocations == revocations + 2,
        "refresh and access token revoked at the server (RFC 7009)",
    );
    t.expect(step, gone, "tokens and client registration deleted from the store");
    let dead = Connection::connect(
        d.fx.resource().url(),
        Arc::new(FixedToken(Secret::new(tokens.access_token().expose()))),
        ConnectOptions::default().clock(d.clock.shared()),
    )
    .await;
    t.expect(
        step,
        matches!(dead, Err(Error::AuthorizationRequired { .. })),
        "the revoked access token is refused by the MCP server",
    );
    if let Ok(conn) = Arc::try_unwrap(conn) {
        conn.close().await?;
    }
    Ok(())
}

fn table(d: &Demo) -> String {
    let a = d.auth();
    let r = d.resource();
    let c: RefreshCounters = d.factory.counters();
    let fallbacks = d
        .browser
        .reasons
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|r| **r == AuthorizationReason::RefreshFailed)
        .count();
    let (burst_refused, burst_refreshes) = *d.burst.lock().unwrap_or_else(|e| e.into_inner());
    let mut out = String::from("  what the servers and the factory counted\n");
    let mut row = |what: &str, value: String| {
        let _ = writeln!(out, "  {what:<52} {value:>8}");
    };
    row("token requests: authorization_code", a.authorization_code_requests.to_string());
    row("token requests: refresh_token", a.refresh_token_requests.to_string());
    row("token requests: client_credentials", a.client_credentials_requests.to_string());
    row("token requests: other grants", a.other_token_requests.to_string());
    row(
        "refresh redemptions (most for one refresh token)",
        a.max_refresh_redemptions().to_string(),
    );
    row(
        "401 burst: refused requests / refresh grants",
        format!("{burst_refused} / {burst_refreshes}"),
    );
    row("coalesced waiters (401s that joined a refresh)", c.coalesced.to_string());
    row(
        "401s answered by a new token (led/joined/adopted)",
        (c.refreshed + c.coalesced + c.adopted).to_string(),
    );
    row("401s whose silent refresh was refused", c.rejected.to_string());
    row("browser prompts", d.prompts().to_string());
    row("interactive fallbacks (after a refused refresh)", fallbacks.to_string());
    row("reuse detections", a.reuse_detections.to_string());
    row("registrations", a.registrations.to_string());
    row("revocations (RFC 7009)", a.revocations.to_string());
    row("MCP requests / refused with 401", format!("{} / {}", r.requests, r.unauthorized));
    out
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() -> ExitCode {
    if let Some(level) =
        std::env::var("DEMO_TRACE").ok().and_then(|l| l.parse::<tracing::Level>().ok())
    {
        use tracing_subscriber::layer::SubscriberExt as _;
        use tracing_subscriber::util::SubscriberInitExt as _;
        let targets = tracing_subscriber::filter::Targets::new()
            .with_target("connection_factory", level)
            .with_target("token_storage", level)
            .with_target("flow_state", level)
            .with_target("mcp_oauth", level);
        tracing_subscriber::registry()
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .with(targets)
            .init();
    }
    println!(
        "mcp-connect demo: a token's whole life against misbehaving-on-purpose fixture servers\n"
    );
    println!("{:>9}  {:<22} what happened", "elapsed", "step");
    let demo = match setup().await {
        Ok(demo) => demo,
        Err(e) => {
            eprintln!("demo: could not start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = run(&demo).await;
    println!("\n{}", table(&demo));
    let failures = demo.timeline.failures.lock().unwrap_or_else(|e| e.into_inner()).clone();
    match outcome {
        Err(e) => {
            eprintln!("demo: FAILED: a step returned an error: {e}");
            ExitCode::FAILURE
        }
        Ok(()) if !failures.is_empty() => {
            eprintln!("demo: FAILED: {} expectation(s) not met:", failures.len());
            for f in failures {
                eprintln!("  - {f}");
            }
            ExitCode::FAILURE
        }
        Ok(()) => {
            println!("demo: every step behaved");
            ExitCode::SUCCESS
        }
    }
}
