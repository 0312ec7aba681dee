//! The interactive flow end to end: discovery, dynamic registration, PKCE, the PENDING flow and
//! its state mapping, the callback router, one prompt per key, queued calls resuming.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::{args, eventually, setup, text};
use connection_factory::{AuthorizationReason, Error, HookDecision};
use mcp_fixtures::Approval;

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

/// The race: a request went out with no token (none was stored yet) while another process (a
/// `login`, a peer's authorization) stored tokens, with no interactive flow of this process
/// behind them. Its 401 must be answered with the stored tokens, not with a browser prompt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_a_token_adopts_tokens_stored_since_without_a_prompt() {
    use connection_factory::{AuthProvider, Recovery, Refusal, RequestKind};
    let s = setup(HookDecision::Wait).await;
    let config = s.config("tenant-a");
    let issuer = s.fx.auth().issuer().to_string();
    let response = token_storage::TokenResponse::bearer("stored-by-a-peer")
        .expires_in(Duration::from_secs(600));
    s.factory.storage().store(&config.token_key(), &issuer, response).await.unwrap();
    let provider = s.factory.provider(config).unwrap();
    let challenge = Refusal::new(401, RequestKind::Post, vec!["Bearer".into()]);
    match provider.on_unauthorized(None, &challenge).await.unwrap() {
        Recovery::Retry(token) => assert_eq!(token.expose(), "stored-by-a-peer"),
        other => panic!("expected the stored token, got {other:?}"),
    }
    assert_eq!(s.prompts(), 0, "no prompt while usable tokens are stored");
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
    // The browser follows the URL in the background; the callback exchanges the code and
    // stores the tokens. Wait for them to be stored (the state the next connect relies on).
    let key = token_storage::TokenKey::new("tenant-a", "alice", "fixture");
    for _ in 0..2000 {
        if s.storage.tokens(&key).await.unwrap().is_some() {
            break;
        }
        mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(5)).await;
    }
    assert!(s.storage.tokens(&key).await.unwrap().is_some(), "the callback stored the tokens");
    assert_eq!(s.fx.auth().stats().authorization_code_requests, 1);
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
    // The OAuth wait timeout runs on the manual clock, which stands still: returning at all
    // means the denial ended the wait.
    let err = s.factory.connect(s.config("tenant-a")).await.unwrap_err();
    assert!(matches!(err, Error::AuthorizationRequired { .. }), "{err:?}");
    assert_eq!(s.fx.auth().stats().authorizations_denied, 1);
    assert_eq!(s.fx.auth().stats().authorization_code_requests, 0);
}

/// Step-up: `counter` needs `mcp:write`, the token holds `mcp:tools`. The 403
/// `insufficient_scope` skips the refresh and prompts once for the union of the held and the
/// challenged scopes; the new token is granted and the call succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insufficient_scope_steps_up_to_the_union_of_scopes() {
    let s = setup(HookDecision::Wait).await;
    let conn = s.factory.connect(s.config("tenant-a")).await.unwrap();
    assert_eq!(s.prompts(), 1);
    let result = conn.call_tool("counter", None).await.unwrap();
    assert!(result.is_error != Some(true), "{result:?}");
    assert_eq!(s.prompts(), 2, "one step-up prompt");
    assert_eq!(s.browser.reasons.lock().unwrap()[1], AuthorizationReason::InsufficientScope);
    let scopes = s.browser.scopes.lock().unwrap()[1].clone().unwrap_or_default();
    let asked: Vec<&str> = scopes.split(' ').collect();
    assert!(asked.contains(&"mcp:tools") && asked.contains(&"mcp:write"), "{scopes}");
    let auth = s.fx.auth().stats();
    assert_eq!(auth.refresh_token_requests, 0, "no refresh for a missing scope: {auth:?}");
    assert_eq!(auth.authorization_code_requests, 2, "{auth:?}");
    assert_eq!(s.factory.counters().insufficient_scope, 1);
    // The stepped-up token serves the next calls without another prompt.
    conn.call_tool("counter", None).await.unwrap();
    assert_eq!(text(&conn.call_tool("echo", args("still")).await.unwrap()), "still");
    assert_eq!(s.prompts(), 2);
}

/// Step-up that the authorization server does not grant (it withholds `mcp:write`): the retry
/// is refused again and the call ends with InsufficientScope; the next call for the same
/// scope set fails the same way without a new prompt (no loop).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_refusal_for_the_same_scope_set_is_insufficient_scope_without_a_loop() {
    let s = setup(HookDecision::Wait).await;
    s.fx.auth().knobs().set_withheld_scopes(["mcp:write"]);
    let conn = s.factory.connect(s.config("tenant-a")).await.unwrap();
    let err = conn.call_tool("counter", None).await.unwrap_err();
    assert!(
        matches!(&err, Error::InsufficientScope { scope: Some(scope), .. } if scope.contains("mcp:write")),
        "{err:?}"
    );
    assert_eq!(s.prompts(), 2, "one step-up prompt");
    let err = conn.call_tool("counter", None).await.unwrap_err();
    assert!(matches!(err, Error::InsufficientScope { .. }), "{err:?}");
    assert_eq!(s.prompts(), 2, "no second prompt for the same scope set");
    assert_eq!(s.fx.auth().stats().authorization_code_requests, 2);
    assert_eq!(s.fx.auth().stats().refresh_token_requests, 0);
    // The connection still works for what the token does allow.
    assert_eq!(text(&conn.call_tool("echo", args("ok")).await.unwrap()), "ok");
}

/// A hung token endpoint with the interactive fallback, deterministic on the manual clock: the
/// refresh after a mid-session 401 hangs; moving the clock past the refresh budget ends the
/// wait; the fallback prompts once, the callback stores newer tokens and the call succeeds.
/// When the hung refresh is finally answered, its late result never overwrites them (the race
/// this pins: a detached refresh committing after a newer authorization).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_refresh_falls_back_to_the_interactive_flow_and_the_late_result_never_overwrites() {
    let s = setup(HookDecision::Wait).await;
    // Tokens the client believes live an hour; the server's clock jumps ahead to expire them.
    s.fx.auth().knobs().set_access_token_lifetime(Duration::from_secs(3600));
    let config = s.config("tenant-a");
    let budget = config.refresh_budget();
    assert_eq!(budget, Duration::from_secs(4));
    let key = config.token_key();
    let conn = Arc::new(s.factory.connect(config).await.unwrap());
    assert_eq!(text(&conn.call_tool("echo", args("warm")).await.unwrap()), "warm");
    let storage = s.factory.storage();
    let first = storage.tokens(&key).await.unwrap().unwrap();
    let issuer = storage.client(&key).await.unwrap().unwrap().issuer;

    s.fx.auth().knobs().set_refresh_hang(true);
    s.fx.auth().knobs().set_clock_offset_millis(3_601_000);
    let call = tokio::spawn({
        let conn = conn.clone();
        async move { conn.call_tool("echo", args("hung")).await }
    });
    // The refresh is at the (hung) token endpoint, so the budget's deadline is set: pass it.
    eventually("the refresh request", || s.fx.auth().stats().refresh_token_requests == 1).await;
    assert_eq!(s.factory.counters().timed_out, 0);
    s.clock.advance(budget);
    let result = call.await.unwrap().unwrap_or_else(|e| panic!("{e:?} {:?}", s.factory.counters()));
    assert_eq!(text(&result), "hung");
    assert_eq!(s.factory.counters().timed_out, 1, "{:?}", s.factory.counters());
    assert_eq!(s.prompts(), 2, "one fallback prompt");
    assert_eq!(s.browser.reasons.lock().unwrap()[1], AuthorizationReason::RefreshFailed);
    let newer = storage.tokens(&key).await.unwrap().unwrap();
    assert_ne!(newer.access_token(), first.access_token());
    assert_eq!(s.fx.auth().stats().max_refresh_redemptions(), 0, "the refresh still hangs");

    // Release the hung refresh. A force-refresh for the old token joins the late refresh if it
    // is still running (else finds the newer tokens): after it, the late result has landed.
    s.fx.auth().knobs().set_refresh_hang(false);
    eventually("the late redemption", || s.fx.auth().stats().max_refresh_redemptions() == 1).await;
    let joined = storage.force_refresh(&key, &issuer, first.access_token()).await;
    let after = storage.tokens(&key).await.unwrap().unwrap();
    assert_eq!(
        after.access_token(),
        newer.access_token(),
        "the late refresh overwrote: {joined:?}"
    );
    assert_eq!(s.fx.auth().stats().refresh_token_requests, 1, "no second refresh");
    assert_eq!(text(&conn.call_tool("echo", args("after")).await.unwrap()), "after");
    assert_eq!(s.prompts(), 2);
}

/// SEP-2352 through the factory: the host's pre-registered client belongs to another
/// authorization server than the one the MCP server now names. Its credentials are not
/// offered: the factory registers anew with the server it discovered (one dynamic
/// registration) and the authorization completes with that registration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pre_registered_client_of_another_issuer_is_not_offered_to_the_new_one() {
    let s = setup(HookDecision::Wait).await;
    let mut client = mcp_oauth::ClientConfig::new("factory tests", s.redirect.clone());
    client.pre_registered = Some(mcp_oauth::PreRegisteredClient {
        issuer: "https://old-as.example.com".into(),
        client_id: "old-as-client".into(),
        client_secret: Some(mcp_oauth::ClientSecret::new("OLD-AS-SECRET")),
        client_key: None,
        auth_method: None,
    });
    let conn = s.factory.connect(s.config("tenant-a").client(client)).await.unwrap();
    assert_eq!(text(&conn.call_tool("echo", args("moved")).await.unwrap()), "moved");
    let auth = s.fx.auth().stats();
    assert_eq!(auth.registrations, 1, "registered anew with the discovered server: {auth:?}");
    assert_eq!(auth.authorization_code_requests, 1, "{auth:?}");
    let events = format!("{:?}", s.fx.auth().events());
    assert!(!events.contains("old-as-client"), "the old client id never reached it: {events}");
}

/// The race: concurrent first connects with no stored client each discovered the server,
/// found no client and registered one; the last one stored won, and the pending flow's URL
/// could name a client that was no longer stored, so the code exchange failed after the user
/// consented. Eight connects at once must register exactly one client, prompt once, and the
/// authorization the user sees names the client that is stored; all eight then succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_first_connects_register_one_client_and_prompt_once() {
    let s = setup(HookDecision::Wait).await;
    s.fx.auth().knobs().set_approval(Approval::Manual);
    let s = Arc::new(s);
    let connects: Vec<_> = (0..8)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move { s.factory.connect(s.config("tenant-a")).await })
        })
        .collect();
    let pending = s.fx.auth().wait_for_pending_authorization().await;
    assert_eq!(pending.len(), 1, "one prompt for the key");
    let key = s.config("tenant-a").token_key();
    let stored = s.storage.client(&key).await.unwrap().expect("a stored client");
    assert_eq!(pending[0].client_id, stored.client_id, "the URL names the stored client");
    s.fx.auth().approve_pending().unwrap();
    for (i, connect) in connects.into_iter().enumerate() {
        let conn = connect.await.unwrap().unwrap_or_else(|e| panic!("connect {i}: {e:?}"));
        assert_eq!(text(&conn.call_tool("echo", args("hi")).await.unwrap()), "hi");
    }
    let auth = s.fx.auth().stats();
    assert_eq!(auth.registrations, 1, "one registration for concurrent first connects: {auth:?}");
    assert_eq!(auth.authorization_code_requests, 1, "{auth:?}");
    assert_eq!(s.prompts(), 1);
    let after = s.storage.client(&key).await.unwrap().unwrap();
    assert_eq!(after.client_id, stored.client_id, "the registration was not replaced");
}

/// A token store whose reads of client records fail while armed (the store is unreachable
/// for that read): the failure the factory used to take as "no client stored".
#[derive(Debug)]
struct ClientReadsFail {
    inner: token_storage::SharedTokenStore,
    armed: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl token_storage::TokenStore for ClientReadsFail {
    async fn get(
        &self,
        key: &str,
    ) -> Result<Option<token_storage::store::Versioned>, token_storage::Error> {
        if key.ends_with("/client") && self.armed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(token_storage::Error::StoreUnavailable {
                message: "injected: client read failed".into(),
                source: None,
            });
        }
        self.inner.get(key).await
    }
    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<u64>,
        value: Vec<u8>,
    ) -> Result<token_storage::store::Swapped, token_storage::Error> {
        self.inner.compare_and_swap(key, expected, value).await
    }
    async fn delete_if(
        &self,
        key: &str,
        expected: Option<u64>,
    ) -> Result<bool, token_storage::Error> {
        self.inner.delete_if(key, expected).await
    }
    async fn keys_with_prefix(&self, prefix: &str) -> Result<Vec<String>, token_storage::Error> {
        self.inner.keys_with_prefix(prefix).await
    }
}

/// A failed read of the stored client is a store failure, not "no client". The race this
/// pins: a request needs an authorization (no tokens stored) while the store is briefly
/// unreachable for the client record; the factory used to take the failed read as "no client",
/// register a second client over the good one and prompt. Now the request fails with
/// `Error::Store`, nobody is prompted, and the stored client is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_client_read_is_a_typed_error_not_a_prompt_or_a_new_registration() {
    use connection_factory::{AuthProvider, Refusal, RequestKind};
    let faulty = Arc::new(ClientReadsFail {
        inner: token_storage::MemoryTokenStore::new().into(),
        armed: false.into(),
    });
    let s = common::setup_on(
        HookDecision::Wait,
        token_storage::SharedTokenStore::from_arc(faulty.clone()),
    )
    .await;
    drop(s.factory.connect(s.config("tenant-a")).await.unwrap());
    assert_eq!(s.prompts(), 1);
    // The tokens are gone (logged out elsewhere); the client registration stays.
    let key = s.config("tenant-a").token_key();
    let client = s.storage.client(&key).await.unwrap().unwrap();
    s.storage.delete_all(&key).await.unwrap();
    s.storage.store_client(&key, &client).await.unwrap();

    faulty.armed.store(true, std::sync::atomic::Ordering::SeqCst);
    let provider = s.factory.provider(s.config("tenant-a")).unwrap();
    let challenge = Refusal::new(401, RequestKind::Post, vec!["Bearer".into()]);
    let err = provider.on_unauthorized(None, &challenge).await.unwrap_err();
    assert!(matches!(err, Error::Store { .. }), "{err:?}");
    assert_eq!(s.prompts(), 1, "a store failure never prompts");
    assert_eq!(s.fx.auth().stats().registrations, 1, "no registration over the stored one");
    faulty.armed.store(false, std::sync::atomic::Ordering::SeqCst);
    let kept = s.storage.client(&key).await.unwrap().unwrap();
    assert_eq!(kept.client_id, client.client_id, "the stored client is kept");
}

/// The race: two requests find the same stale PENDING authorization; the first one's delete
/// is held up in the store while the second deletes it and creates a fresh flow (and prompts);
/// then the first one's delete lands on that fresh flow, and it prompts again (two prompts,
/// the second request's consent refused). Replacement is claimed per generation now: the one
/// request that claims the stale flow replaces it, the other waits and joins the new flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_held_up_delete_of_a_stale_flow_cannot_remove_the_newer_flow() {
    use connection_factory::{AuthProvider, Recovery, Refusal, RequestKind};
    use std::sync::atomic::Ordering::SeqCst;
    let store = flow_state::testkit::FaultyStore::new(
        flow_state::SharedStore::new(flow_state::MemoryStore::new()),
        mcp_clock::SharedClock::system(),
    );
    let s = common::setup_full(
        HookDecision::ReturnEarly,
        token_storage::MemoryTokenStore::new().into(),
        flow_state::SharedStore::from_arc(store.clone()),
        |k| k,
        |r| r,
    )
    .await;
    s.fx.auth().knobs().set_approval(Approval::Manual);
    let provider = s.factory.provider(s.config("tenant-a")).unwrap();
    let challenge = Arc::new(Refusal::new(401, RequestKind::Post, vec!["Bearer".into()]));
    let first = provider.on_unauthorized(None, &challenge).await.unwrap();
    assert_eq!(first, Recovery::AuthorizationRequired);
    assert_eq!(s.prompts(), 1);
    // Nobody waits for it any more: stale for the factory (not yet for the flow manager).
    s.clock.advance(Duration::from_secs(11));
    // The first delete of the `mcp_oauth` flow is held up; reads of claims are counted.
    store.hold_next_delete(":mcp_oauth:");
    store.count_reads_of(":mcp_oauth_replace:");
    let request = || {
        let (provider, challenge) = (provider.clone(), challenge.clone());
        tokio::spawn(async move { provider.on_unauthorized(None, &challenge).await })
    };
    let a = request();
    eventually("the first delete to be held", || store.deletes_held() == 1).await;
    let b = request();
    eventually("the second request to replace or to lose the claim", || {
        b.is_finished() || store.reads_counted() >= 2
    })
    .await;
    store.release_delete();
    assert_eq!(a.await.unwrap().unwrap(), Recovery::AuthorizationRequired);
    assert_eq!(b.await.unwrap().unwrap(), Recovery::AuthorizationRequired);
    assert_eq!(s.prompts(), 2, "one prompt replaced the stale authorization");
    assert_eq!(s.browser.pending.load(SeqCst), 1, "the other request joined it");
}

/// The race: return-early requests that lose the race to create the PENDING flow (they found
/// none, prepared their own, and another was created first) used to wait for the whole OAuth
/// wait without asking the host. Now every one asks `authorization_pending` (the host returns
/// at once); one prompt in all. The OAuth wait runs on the manual clock, which stands still: a
/// request that waits never returns, and the real-time guard fails the test.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn return_early_requests_that_lose_the_race_to_create_the_flow_do_not_block() {
    use connection_factory::{AuthProvider, Recovery, Refusal, RequestKind};
    use std::sync::atomic::Ordering::SeqCst;
    let s = setup(HookDecision::ReturnEarly).await;
    s.fx.auth().knobs().set_approval(Approval::Manual);
    let provider = s.factory.provider(s.config("tenant-a")).unwrap();
    let challenge = Arc::new(Refusal::new(401, RequestKind::Post, vec!["Bearer".into()]));
    let requests: Vec<_> = (0..8)
        .map(|_| {
            let (provider, challenge) = (provider.clone(), challenge.clone());
            tokio::spawn(async move { provider.on_unauthorized(None, &challenge).await })
        })
        .collect();
    for (i, request) in requests.into_iter().enumerate() {
        let outcome = mcp_clock::within(&mcp_clock::SystemClock, Duration::from_secs(10), request)
            .await
            .unwrap_or_else(|| panic!("request {i} blocked instead of returning early"))
            .unwrap()
            .unwrap();
        assert_eq!(outcome, Recovery::AuthorizationRequired);
    }
    assert_eq!(s.prompts(), 1, "one prompt");
    assert_eq!(s.browser.pending.load(SeqCst), 7, "every other request asked the host");
}

/// The default configuration as a host would use it: 30 s to connect, 60 s per request, a
/// 120 s OAuth wait.
fn default_config(s: &common::Setup) -> connection_factory::FactoryConfig {
    connection_factory::FactoryConfig::new(s.fx.resource().url(), "tenant-a", "alice", "fixture")
        .client(mcp_oauth::ClientConfig::new("factory tests", s.redirect.clone()))
}

/// Give broken code its chance to end `task` (a timeout that should not happen): a short
/// real-time window in which correct code must keep waiting. It never makes correct code
/// fail; at worst it lets broken code pass once.
async fn still_running<T>(task: &mut tokio::task::JoinHandle<T>) -> bool
where
    T: std::fmt::Debug,
{
    match mcp_clock::within(&mcp_clock::SystemClock, Duration::from_millis(300), &mut *task).await {
        Some(out) => panic!("ended while the user was still authorizing: {out:?}"),
        None => true,
    }
}

/// The race: the user approves after the request timeout (60 s) but within the OAuth wait
/// (120 s). The request timer used to cut the authorization short with `Timeout` although the
/// user was about to approve; while an interactive authorization is in progress the request
/// timeout is widened by the OAuth wait, and the call ends with the authorization's outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_user_approving_after_the_request_timeout_still_completes_the_call() {
    let s = setup(HookDecision::Wait).await;
    let conn = Arc::new(s.factory.connect(default_config(&s)).await.unwrap());
    s.fx.auth().knobs().set_approval(Approval::Manual);
    s.fx.auth().knobs().revoke_all_tokens();
    let mut call = tokio::spawn({
        let conn = conn.clone();
        async move { conn.call_tool("echo", args("slow user")).await }
    });
    s.fx.auth().wait_for_pending_authorization().await;
    s.clock.advance(Duration::from_secs(61));
    assert!(still_running(&mut call).await);
    s.fx.auth().approve_pending().unwrap();
    let result = call.await.unwrap().unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(text(&result), "slow user");
    assert_eq!(s.prompts(), 2);
}

/// The same at connect: the user approves after the connect timeout (30 s) but within the
/// OAuth wait; the connect succeeds instead of failing with `Timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_user_approving_after_the_connect_timeout_still_connects() {
    let s = Arc::new(setup(HookDecision::Wait).await);
    s.fx.auth().knobs().set_approval(Approval::Manual);
    let mut connect = tokio::spawn({
        let s = s.clone();
        async move { s.factory.connect(default_config(&s)).await.map(drop) }
    });
    s.fx.auth().wait_for_pending_authorization().await;
    s.clock.advance(Duration::from_secs(31));
    assert!(still_running(&mut connect).await);
    s.fx.auth().approve_pending().unwrap();
    connect.await.unwrap().unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(s.prompts(), 1);
}

/// Seed scenario 21, the race: a 401 arrives after the silent refresh led for the same key has
/// already run out of its budget (the refresh itself still hangs at the token endpoint). It
/// used to join the hung refresh and wait a whole budget of its own before falling back; now it
/// gets the leader's outcome (timed out) at once and falls back, with no second redemption.
/// The clock stands still after the first timeout: a request that waits its own budget never
/// returns, and the real-time guard fails the test.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_401_joining_a_refresh_that_already_timed_out_gets_that_outcome_at_once() {
    use connection_factory::{AuthProvider, Recovery, Refusal, RequestKind};
    let s = setup(HookDecision::ReturnEarly).await;
    let config = s.config("tenant-a");
    let key = config.token_key();
    let budget = config.refresh_budget();
    // Log in (return-early: the callback stores the tokens in the background).
    let err = s.factory.connect(config.clone()).await.unwrap_err();
    assert!(matches!(err, Error::AuthorizationRequired { .. }), "{err:?}");
    eventually("the tokens", || s.fx.auth().stats().authorization_code_requests == 1).await;
    let mut stored = None;
    for _ in 0..2000 {
        stored = s.storage.tokens(&key).await.unwrap();
        if stored.is_some() {
            break;
        }
        mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(5)).await;
    }
    let rejected = connection_factory::Secret::new(stored.unwrap().access_token().expose());

    s.fx.auth().knobs().set_refresh_hang(true);
    // The fallback prompts stay pending: no newer tokens are stored meanwhile.
    s.fx.auth().knobs().set_approval(Approval::Manual);
    let provider = s.factory.provider(config).unwrap();
    let challenge = Arc::new(Refusal::new(401, RequestKind::Post, vec!["Bearer".into()]));
    let unauthorized = || {
        let (provider, challenge, rejected) =
            (provider.clone(), challenge.clone(), rejected.clone());
        tokio::spawn(async move { provider.on_unauthorized(Some(&rejected), &challenge).await })
    };
    let first = unauthorized();
    eventually("the refresh request", || s.fx.auth().stats().refresh_token_requests == 1).await;
    s.clock.advance(budget);
    assert_eq!(first.await.unwrap().unwrap(), Recovery::AuthorizationRequired);
    assert_eq!(s.factory.counters().timed_out, 1);

    let second =
        mcp_clock::within(&mcp_clock::SystemClock, Duration::from_secs(10), unauthorized())
            .await
            .expect("the second 401 waited a budget of its own on the hung refresh")
            .unwrap()
            .unwrap();
    assert_eq!(second, Recovery::AuthorizationRequired);
    assert_eq!(s.factory.counters().timed_out, 2);
    assert_eq!(s.fx.auth().stats().refresh_token_requests, 1, "joined: no second redemption");
    s.fx.auth().knobs().set_refresh_hang(false);
}

/// Step-up keeps what was held, with an authorization server that leaves `scope` out of its
/// token responses (RFC 6749 §5.1: the granted scope is then the one requested). `counter`
/// needs `mcp:write`, `slow` needs `mcp:read` (each on top of `mcp:tools`). The held scopes
/// used to be read only from the response's `scope`: the step-up for `slow` asked for its
/// challenge alone and dropped `mcp:write`, so `counter` was refused again and prompted a third
/// time (and so on, alternating). Now the scopes requested are remembered as held: two
/// step-ups in all, and both tools keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step_up_without_scope_in_token_responses_keeps_the_held_scopes() {
    let s = common::setup_full(
        HookDecision::Wait,
        token_storage::MemoryTokenStore::new().into(),
        flow_state::SharedStore::new(flow_state::MemoryStore::new()),
        |mut k| {
            k.omit_scope = true;
            k
        },
        |r| r.tool_scopes("slow", ["mcp:read"]),
    )
    .await;
    let conn = s.factory.connect(s.config("tenant-a")).await.unwrap();
    assert_eq!(s.prompts(), 1);
    let slow = || {
        let args = serde_json::json!({ "ms": 0 }).as_object().cloned();
        conn.call_tool("slow", args)
    };
    conn.call_tool("counter", None).await.unwrap();
    assert_eq!(s.prompts(), 2, "a step-up for mcp:write");
    slow().await.unwrap();
    assert_eq!(s.prompts(), 3, "a step-up for mcp:read");
    let scopes = s.browser.scopes.lock().unwrap()[2].clone().unwrap_or_default();
    assert!(scopes.split(' ').any(|x| x == "mcp:write"), "the held mcp:write kept: {scopes}");
    conn.call_tool("counter", None).await.unwrap();
    slow().await.unwrap();
    assert_eq!(s.prompts(), 3, "no further prompt");
}

/// The replayed authorization's expiry is when the flow is really replaced: a request that
/// joins a PENDING authorization is shown the moment this factory will replace it (the OAuth
/// wait after its creation, here 10 s, before the authorization request's own 600 s), not the
/// request's 600 s expiry; from that moment a new request does replace it (a new prompt), and
/// not a moment before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_authorization_expires_when_the_flow_is_replaced() {
    use connection_factory::{AuthProvider, Refusal, RequestKind};
    use mcp_clock::Clock as _;
    let s = setup(HookDecision::ReturnEarly).await;
    s.fx.auth().knobs().set_approval(Approval::Manual);
    let provider = s.factory.provider(s.config("tenant-a")).unwrap();
    let challenge = Refusal::new(401, RequestKind::Post, vec!["Bearer".into()]);
    let started = s.clock.now();
    provider.on_unauthorized(None, &challenge).await.unwrap();
    s.clock.advance(Duration::from_secs(3));
    provider.on_unauthorized(None, &challenge).await.unwrap();
    assert_eq!((s.prompts(), s.browser.pending.load(std::sync::atomic::Ordering::SeqCst)), (1, 1));
    let expiries = s.browser.expiries.lock().unwrap().clone();
    let replaced_at = started + Duration::from_secs(10);
    assert_eq!(expiries, vec![replaced_at, replaced_at], "prompt and replay name the replacement");
    s.clock.set(replaced_at - Duration::from_millis(1));
    provider.on_unauthorized(None, &challenge).await.unwrap();
    assert_eq!(s.prompts(), 1, "still joined just before the expiry");
    s.clock.advance(Duration::from_millis(1));
    provider.on_unauthorized(None, &challenge).await.unwrap();
    assert_eq!(s.prompts(), 2, "replaced at the expiry shown");
}

/// Seed scenario 25 end to end: a 403 without `WWW-Authenticate` (some servers send none) used
/// to surface as a plain transport error. It takes the step-up path now: no refresh, one
/// step-up prompt (reason `InsufficientScope`), and the call succeeds with the new token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_403_without_a_challenge_steps_up() {
    let s = common::setup_with(
        HookDecision::Wait,
        token_storage::MemoryTokenStore::new().into(),
        |mut k| {
            k.omit_forbidden_challenge = true;
            k
        },
    )
    .await;
    let conn = s.factory.connect(s.config("tenant-a")).await.unwrap();
    assert_eq!(s.prompts(), 1);
    let result = conn.call_tool("counter", None).await.unwrap_or_else(|e| panic!("{e:?}"));
    assert!(result.is_error != Some(true), "{result:?}");
    assert_eq!(s.prompts(), 2, "one step-up prompt");
    assert_eq!(s.browser.reasons.lock().unwrap()[1], AuthorizationReason::InsufficientScope);
    assert_eq!(s.fx.auth().stats().refresh_token_requests, 0, "no refresh for a 403");
}

/// SEP-2352, the authorization server migration: the MCP server moves to another
/// authorization server mid-session. The client pre-registered at the first one (with a
/// secret) must not be presented there: the factory registers anew at the second, the user
/// consents once more, and the session goes on with the second server's tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_moves_to_another_authorization_server_is_registered_there_anew() {
    use mcp_fixtures::{AuthServer, ClientAuth, ClientSpec};
    let s = setup(HookDecision::Wait).await;
    let first = s.fx.auth();
    let pre = first
        .register_client(ClientSpec::new(ClientAuth::ClientSecretBasic).redirect_uri(&s.redirect))
        .unwrap();
    let mut client = mcp_oauth::ClientConfig::new("factory tests", s.redirect.clone());
    client.pre_registered = Some(mcp_oauth::PreRegisteredClient {
        issuer: first.issuer().to_owned(),
        client_id: pre.client_id().to_owned(),
        client_secret: pre.client_secret().map(mcp_oauth::ClientSecret::new),
        client_key: None,
        auth_method: None,
    });
    let config = s.config("tenant-a").client(client);
    let conn = s.factory.connect(config).await.unwrap();
    assert_eq!(text(&conn.call_tool("echo", args("before")).await.unwrap()), "before");
    assert_eq!(s.prompts(), 1);

    let second = AuthServer::builder().clock(s.clock.shared()).spawn().await.unwrap();
    s.fx.resource().switch_authorization_server(&second);
    let after = conn.call_tool("echo", args("after")).await;
    let stats = second.stats();
    assert_eq!(text(&after.unwrap_or_else(|e| panic!("{e:?}; {stats:?}"))), "after");
    assert_eq!(s.prompts(), 2, "one more consent, at the new server");
    assert_eq!(stats.registrations, 1, "a new registration there: {stats:?}");
    let events = format!("{:?}", second.events());
    assert!(!events.contains(pre.client_id()), "the old client reached the new server: {events}");
}

/// A host that serves its redirect URI with its own HTTP stack (no axum, the
/// `callback-router` feature off) completes the authorization by handing the callback's
/// parameters to `complete_authorization`: the connect that prompted goes through with the
/// stored tokens, a repeated callback is answered 200 "already handled" and changes nothing,
/// and a callback with an unknown state is refused with 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_with_its_own_callback_server_completes_the_authorization() {
    use connection_factory::{
        AuthorizationHook, AuthorizationRequest, CallbackResponse, ConnectionFactory,
        FactoryConfig, OAuthRefresher, complete_authorization,
    };
    use flow_state::{FlowManager, MemoryStore, SharedStore};
    use mcp_clock::{ManualClock, Timestamp};
    use mcp_fixtures::Fixtures;
    use mcp_oauth::{CallbackParams, ClientConfig, HttpPolicy, OAuthClient, ReqwestHttpClient};
    use token_storage::{Keyring, MemoryTokenStore, TokenStorage};

    /// The host's UI and callback server in one: it plays the browser up to the redirect, then
    /// does what its own server would do with the request to the redirect URI.
    #[derive(Debug)]
    struct OwnServer {
        flows: FlowManager,
        storage: TokenStorage,
        oauth: OAuthClient,
        answers: Arc<std::sync::Mutex<Vec<CallbackResponse>>>,
    }

    #[async_trait::async_trait]
    impl AuthorizationHook for OwnServer {
        async fn authorization_required(&self, request: AuthorizationRequest) -> HookDecision {
            let browser = reqwest::Client::builder()
                .no_proxy()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap();
            let (flows, storage, oauth) =
                (self.flows.clone(), self.storage.clone(), self.oauth.clone());
            let answers = self.answers.clone();
            tokio::spawn(async move {
                let response = browser.get(request.authorization_url).send().await.unwrap();
                let location = response.headers()["location"].to_str().unwrap().to_owned();
                let callback: url::Url = location.parse().unwrap();
                for _ in 0..2 {
                    let params = CallbackParams::parse(&callback).unwrap();
                    let answer = complete_authorization(&flows, &storage, &oauth, params).await;
                    answers.lock().unwrap().push(answer);
                }
            });
            HookDecision::Wait
        }
    }

    let clock = ManualClock::new(Timestamp::from_secs(1_800_000_000));
    let fx =
        Fixtures::start_with(clock.shared(), mcp_fixtures::KnobSettings::default()).await.unwrap();
    let oauth =
        OAuthClient::new(ReqwestHttpClient::new(HttpPolicy::default()).unwrap(), clock.shared());
    let storage = TokenStorage::builder(
        MemoryTokenStore::new().into(),
        Arc::new(Keyring::parse(&"42".repeat(32)).unwrap()),
        Arc::new(OAuthRefresher::new(oauth.clone())),
    )
    .clock(clock.shared())
    .build();
    let flows = FlowManager::builder(SharedStore::new(MemoryStore::new()))
        .clock(clock.shared())
        .build()
        .unwrap();
    let answers = Arc::new(std::sync::Mutex::new(Vec::new()));
    let host = Arc::new(OwnServer {
        flows: flows.clone(),
        storage: storage.clone(),
        oauth: oauth.clone(),
        answers: answers.clone(),
    });
    let factory = ConnectionFactory::new(flows.clone(), storage.clone())
        .unwrap()
        .with_interactive(oauth.clone(), host);
    // Nothing listens on the redirect URI: the host's own server is the hook above.
    let config = FactoryConfig::new(fx.resource().url(), "tenant-a", "alice", "fixture")
        .connect_timeout(Duration::from_secs(10))
        .oauth_wait_timeout(Duration::from_secs(10))
        .client(ClientConfig::new("own server", "http://127.0.0.1:9/callback"));

    let conn = factory.connect(config.clone()).await.unwrap();
    assert_eq!(text(&conn.call_tool("echo", args("hi")).await.unwrap()), "hi");
    eventually("both callbacks answered", || answers.lock().unwrap().len() == 2).await;
    let answers: Vec<(u16, &str)> =
        answers.lock().unwrap().iter().map(|a| (a.status, a.message)).collect();
    assert_eq!(answers[0], (200, "authorized; you can close this window"));
    assert_eq!(answers[1], (200, "authorization already handled; you can close this window"));
    assert_eq!(fx.auth().stats().authorization_code_requests, 1, "one code exchange");
    assert!(storage.tokens(&config.token_key()).await.unwrap().is_some(), "the tokens were stored");

    let unknown = "http://127.0.0.1:9/callback?code=c&state=not-a-state".parse().unwrap();
    let answer =
        complete_authorization(&flows, &storage, &oauth, CallbackParams::parse(&unknown).unwrap())
            .await;
    assert_eq!((answer.status, answer.message), (400, "unknown or expired authorization state"));
}

/// The race behind a flaky prompt reason: among requests queued on a revoked session, one
/// refreshes and is refused (the slot is marked as needing authorization), and another, sent
/// after that with no usable token to carry, meets the 401 without a token. Whichever of them
/// reaches the prompt first, the user is told the silent refresh failed, not that they never
/// logged in. Pinned without the race: the refusal first, then the tokenless 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tokenless_401_after_a_refused_refresh_prompts_as_a_failed_refresh() {
    use connection_factory::{AuthProvider, Recovery, Refusal, RequestKind};
    let s = setup(HookDecision::ReturnEarly).await;
    let config = s.config("tenant-a");
    let provider = s.factory.provider(config.clone()).unwrap();
    let first = Refusal::new(401, RequestKind::Post, vec!["Bearer".into()]);
    // No tokens at all: the first prompt says so (return-early: no token to retry with).
    let recovery = provider.on_unauthorized(None, &first).await;
    assert!(!matches!(recovery, Ok(Recovery::Retry(_))), "{recovery:?}");
    let key = config.token_key();
    let stored = mcp_clock::testing::within_real_time(Duration::from_secs(10), || async {
        s.storage.tokens(&key).await.unwrap().is_some()
    })
    .await;
    assert!(stored, "the callback stored the first authorization's tokens");
    let held = s.storage.tokens(&key).await.unwrap().expect("tokens");
    s.fx.auth().knobs().revoke_all_tokens();
    let issuer = s.fx.auth().issuer().to_string();
    let refused = s.storage.force_refresh(&key, &issuer, held.access_token()).await;
    assert!(refused.is_err(), "the revoked refresh token is refused");
    let recovery = provider.on_unauthorized(None, &first).await;
    assert!(!matches!(recovery, Ok(Recovery::Retry(_))), "{recovery:?}");
    let reasons = s.browser.reasons.lock().unwrap().clone();
    assert_eq!(reasons, [AuthorizationReason::NoTokens, AuthorizationReason::RefreshFailed]);
}
