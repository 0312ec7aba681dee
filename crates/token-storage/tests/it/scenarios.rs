//! The token-storage scenarios of the behaviour reference (§5.3), adapted, and the races of
//! anchors §d items 1 to 9.

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use token_storage::testkit::FakeAuthServer;
use token_storage::{
    ClientRegistration, Clock, DecryptFailure, Error, ReauthReason, RefreshError, RefreshRequest,
    Refresher, Secret, SharedTokenStore, TerminalCode, TokenKey, TokenResponse, TokenStorage,
    TokenStore, TransientKind,
};

fn reason(e: Error) -> ReauthReason {
    match e {
        Error::AuthorizationRequired { reason, .. } => reason,
        other => panic!("expected AuthorizationRequired, got {other:?}"),
    }
}

async fn login(f: &Fixture, key: &TokenKey) -> Arc<token_storage::TokenSet> {
    f.storage.store(key, ISS, f.server.issue(key)).await.unwrap()
}

/// 79, 83, 111: a stored set round-trips; the record at rest is encrypted; expiry is absolute.
#[tokio::test]
async fn store_round_trips_encrypted_with_absolute_expiry() {
    let f = fixture();
    let key = key();
    let now = f.clock.now();
    let response = TokenResponse::bearer("access-abc")
        .expires_in(HOUR)
        .refresh_token("refresh-xyz")
        .refresh_token_expires_in(HOUR * 24)
        .scope("read write");
    let stored = f.storage.store(&key, ISS, response).await.unwrap();
    assert_eq!(stored.expires_at(), Some(now + HOUR));
    assert_eq!(stored.refresh_token_expires_at(), Some(now + HOUR * 24));
    assert_eq!(stored.obtained_at(), now);

    let raw = f.store.keys_with_prefix("").await.unwrap();
    assert_eq!(raw.len(), 1);
    let bytes = f.store.get(&raw[0]).await.unwrap().unwrap().value;
    for secret in ["access-abc", "refresh-xyz"] {
        assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()), "{secret} in clear");
    }

    // A second storage over the same store (a restart) reads it back.
    let other = TokenStorage::builder(
        SharedTokenStore::from_arc(f.store.clone()),
        keyring(),
        f.server.clone(),
    )
    .clock(f.clock.shared())
    .build();
    let read = other.get_valid(&key, ISS).await.unwrap();
    assert_eq!(read.access_token().expose(), "access-abc");
    assert_eq!(read.token_type(), "Bearer");
    assert_eq!(read.refresh_token().map(Secret::expose), Some("refresh-xyz"));
    assert_eq!(read.scope(), Some("read write"));
    assert_eq!(read.issuer(), ISS);
    assert_eq!(
        (read.expires_at(), read.obtained_at(), read.version()),
        (stored.expires_at(), now, stored.version())
    );
}

/// 81: no lifetime given: served until the server rejects it.
#[tokio::test]
async fn a_token_without_lifetime_is_served_until_rejected() {
    let f = fixture();
    let key = key();
    f.server.set_lifetime(None);
    let first = login(&f, &key).await;
    assert_eq!(first.expires_at(), None);
    f.clock.advance(HOUR * 24 * 400);
    assert_eq!(f.storage.get_valid(&key, ISS).await.unwrap().version(), first.version());
    assert_eq!(f.server.calls(), 0);
    let fresh = f.storage.force_refresh(&key, ISS, first.access_token()).await.unwrap();
    assert_ne!(fresh.access_token(), first.access_token());
}

/// 82, 83: versions increase on every write; a refresh without a new refresh token keeps the
/// old one (non-rotating server).
#[tokio::test]
async fn a_non_rotating_server_keeps_the_refresh_token() {
    let f = fixture();
    let key = key();
    f.server.set_rotation(false);
    let first = login(&f, &key).await;
    let second = f.storage.force_refresh(&key, ISS, first.access_token()).await.unwrap();
    assert!(second.version() > first.version());
    assert_eq!(second.refresh_token(), first.refresh_token());
    let third = f.storage.force_refresh(&key, ISS, second.access_token()).await.unwrap();
    assert!(third.version() > second.version());
    assert_eq!(f.server.redemptions(), 2);
}

/// 84, 92: the client registration is stored encrypted and handed to the refresher.
#[tokio::test]
async fn client_registration_is_encrypted_and_reaches_the_refresher() {
    #[derive(Debug, Default)]
    struct Spy(std::sync::Mutex<Option<RefreshRequest>>);
    #[async_trait::async_trait]
    impl Refresher for Spy {
        async fn refresh(
            &self,
            _: &TokenKey,
            r: &RefreshRequest,
        ) -> Result<TokenResponse, RefreshError> {
            *self.0.lock().unwrap() = Some(r.clone());
            Ok(TokenResponse::bearer("at-2").expires_in(HOUR))
        }
    }
    let spy = Arc::new(Spy::default());
    let store = Arc::new(token_storage::MemoryTokenStore::new());
    let clock = token_storage::ManualClock::default();
    let storage =
        TokenStorage::builder(SharedTokenStore::from_arc(store.clone()), keyring(), spy.clone())
            .clock(clock.shared())
            .build();
    let key = key();
    let client = ClientRegistration::new("client-1", ISS)
        .client_secret("client-secret-value")
        .redirect_uri("http://127.0.0.1:3000/cb")
        .metadata(serde_json::json!({"token_endpoint": "https://as.example/token"}));
    storage.store_client(&key, &client).await.unwrap();
    assert_eq!(storage.client(&key).await.unwrap(), Some(client.clone()));
    for record in store.keys_with_prefix("").await.unwrap() {
        let bytes = store.get(&record).await.unwrap().unwrap().value;
        assert!(!bytes.windows(19).any(|w| w == b"client-secret-value"));
    }
    storage
        .store(
            &key,
            ISS,
            TokenResponse::bearer("at-1").expires_in(HOUR).refresh_token("rt-1").scope("s1"),
        )
        .await
        .unwrap();
    clock.advance(HOUR);
    let got = storage.get_valid(&key, ISS).await.unwrap();
    assert_eq!(got.access_token().expose(), "at-2");
    assert_eq!(got.scope(), Some("s1"), "scope kept when the response has none");
    let seen = spy.0.lock().unwrap().clone().unwrap();
    assert_eq!(seen.refresh_token.expose(), "rt-1");
    assert_eq!(seen.client, Some(client));
    assert_eq!((seen.issuer.as_str(), seen.scope.as_deref()), (ISS, Some("s1")));
}

/// 88, 89: valid → served without a call; missing or expired without refresh token →
/// authorization required.
#[tokio::test]
async fn missing_or_unrefreshable_tokens_require_authorization() {
    let f = fixture();
    let key = key();
    assert_eq!(reason(f.storage.get_valid(&key, ISS).await.unwrap_err()), ReauthReason::Missing);
    f.storage.store(&key, ISS, TokenResponse::bearer("at").expires_in(HOUR)).await.unwrap();
    assert_eq!(f.storage.get_valid(&key, ISS).await.unwrap().access_token().expose(), "at");
    f.clock.advance(HOUR);
    assert_eq!(
        reason(f.storage.get_valid(&key, ISS).await.unwrap_err()),
        ReauthReason::NoRefreshToken
    );
    // 97: force-refresh without a refresh token never calls the server.
    assert_eq!(
        reason(f.storage.force_refresh(&key, ISS, &Secret::new("at")).await.unwrap_err()),
        ReauthReason::NoRefreshToken
    );
    assert_eq!(f.server.calls(), 0);
}

/// An expired refresh token is not presented.
#[tokio::test]
async fn an_expired_refresh_token_is_not_presented() {
    let f = fixture();
    let key = key();
    let response = f.server.issue(&key).refresh_token_expires_in(HOUR / 2);
    f.storage.store(&key, ISS, response).await.unwrap();
    f.clock.advance(HOUR);
    assert_eq!(
        reason(f.storage.get_valid(&key, ISS).await.unwrap_err()),
        ReauthReason::RefreshTokenExpired
    );
    assert_eq!(f.server.calls(), 0);
}

/// 90, 103: expired → refreshed with the stored refresh token; sequential refreshes redeem the
/// rotated token each time (nothing cached).
#[tokio::test]
async fn expired_tokens_refresh_with_rotation() {
    let f = fixture();
    let key = key();
    let first = login(&f, &key).await;
    f.clock.advance(HOUR);
    let second = f.storage.get_valid(&key, ISS).await.unwrap();
    assert_ne!(second.access_token(), first.access_token());
    assert_ne!(second.refresh_token(), first.refresh_token());
    f.clock.advance(HOUR);
    let third = f.storage.get_valid(&key, ISS).await.unwrap();
    assert_ne!(third.refresh_token(), second.refresh_token());
    assert_eq!((f.server.redemptions(), f.server.reuse_detected()), (2, 0));
}

/// 96: a 401 refreshes even when the token is valid locally; a later 401 for the same old
/// token returns the new one without another call (anchors §d 4).
#[tokio::test]
async fn force_refresh_only_if_the_rejected_token_is_still_current() {
    let f = fixture();
    let key = key();
    let first = login(&f, &key).await;
    let second = f.storage.force_refresh(&key, ISS, first.access_token()).await.unwrap();
    assert_ne!(second.access_token(), first.access_token());
    let again = f.storage.force_refresh(&key, ISS, first.access_token()).await.unwrap();
    assert_eq!(again.version(), second.version());
    assert_eq!(f.server.calls(), 1);
    // The stale view is gone: get_valid serves the new token.
    assert_eq!(f.storage.get_valid(&key, ISS).await.unwrap().version(), second.version());
}

/// Race (100, anchors §d 1 and 4): a burst of 401s for one token on one key: one redemption,
/// every caller gets the same new token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_401s_redeems_once() {
    let f = fixture();
    let key = key();
    let first = login(&f, &key).await;
    f.server.set_latency(Duration::from_secs(1));
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (storage, key, rejected) =
            (f.storage.clone(), key.clone(), first.access_token().clone());
        tasks.push(tokio::spawn(async move { storage.force_refresh(&key, ISS, &rejected).await }));
    }
    eventually("the redemption to start", || f.server.calls() == 1).await;
    mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(20)).await;
    f.clock.advance(Duration::from_secs(1));
    let mut versions = std::collections::HashSet::new();
    for t in tasks {
        versions.insert(t.await.unwrap().unwrap().version());
    }
    assert_eq!(versions.len(), 1);
    assert_eq!((f.server.calls(), f.server.reuse_detected()), (1, 0));
}

/// The count `benches/token_storage.rs` (`force_refresh_burst/1000`) asserts, as a test: 1,000
/// concurrent `force_refresh` calls for one rejected token. The race: a caller reads the
/// rejected token as still current after another has started the refresh, and redeems again. The
/// refresher holds until all 1,000 callers have called `force_refresh`, so they all overlap the
/// one redemption; exactly one refresher call, and every caller gets the one new token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_forced_refreshes_call_the_refresher_once() {
    const CALLERS: usize = 1000;
    #[derive(Debug)]
    struct HeldUntilAllArrived {
        arrived: Arc<AtomicUsize>,
        calls: AtomicUsize,
    }
    #[async_trait::async_trait]
    impl Refresher for HeldUntilAllArrived {
        async fn refresh(
            &self,
            _: &TokenKey,
            r: &RefreshRequest,
        ) -> Result<TokenResponse, RefreshError> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            while self.arrived.load(Ordering::SeqCst) < CALLERS {
                tokio::task::yield_now().await;
            }
            Ok(TokenResponse::bearer(format!("at-{n}"))
                .expires_in(HOUR)
                .refresh_token(format!("{}+", r.refresh_token.expose())))
        }
    }
    let arrived = Arc::new(AtomicUsize::new(0));
    let refresher =
        Arc::new(HeldUntilAllArrived { arrived: arrived.clone(), calls: AtomicUsize::new(0) });
    let storage = TokenStorage::builder(
        SharedTokenStore::new(token_storage::MemoryTokenStore::new()),
        keyring(),
        refresher.clone(),
    )
    .clock(token_storage::ManualClock::default().shared())
    .config(config())
    .build();
    let key = key();
    let first = storage
        .store(&key, ISS, TokenResponse::bearer("at-0").expires_in(HOUR).refresh_token("rt"))
        .await
        .unwrap();
    let tasks: Vec<_> = (0..CALLERS)
        .map(|_| {
            let (storage, key, rejected, arrived) =
                (storage.clone(), key.clone(), first.access_token().clone(), arrived.clone());
            tokio::spawn(async move {
                arrived.fetch_add(1, Ordering::SeqCst);
                storage.force_refresh(&key, ISS, &rejected).await
            })
        })
        .collect();
    let mut tokens = std::collections::HashSet::new();
    for t in tasks {
        tokens.insert(t.await.unwrap().unwrap().access_token().expose().to_owned());
    }
    assert_eq!(refresher.calls.load(Ordering::SeqCst), 1, "one refresher call for the burst");
    assert_eq!(tokens.into_iter().collect::<Vec<_>>(), ["at-1"], "every caller got the new token");
}

/// 101, anchors §d 7: inside the refresh window the old token is served at once while one
/// background refresh runs; then the new one is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_ahead_serves_the_valid_token_meanwhile() {
    let f = fixture();
    let key = key();
    let first = login(&f, &key).await;
    f.server.set_latency(Duration::from_secs(5));
    // 60 s buffer, no jitter: at expiry - 30 s we are inside the window.
    f.clock.advance(HOUR - Duration::from_secs(30));
    // The old access token, not the old store version: the refresh's in-doubt intent is a
    // store write of the same tokens (issue 12), which may land while these calls run.
    for _ in 0..50 {
        let got = f.storage.get_valid(&key, ISS).await.unwrap();
        assert_eq!(got.access_token(), first.access_token());
    }
    eventually("the background refresh to start", || f.server.calls() == 1).await;
    f.clock.advance(Duration::from_secs(5));
    eventually("the background refresh to land", || f.server.redemptions() == 1).await;
    let mut fresh = None;
    for _ in 0..200 {
        let got = f.storage.get_valid(&key, ISS).await.unwrap();
        if got.access_token() != first.access_token() {
            fresh = Some(got);
            break;
        }
        mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(1)).await;
    }
    assert!(fresh.is_some(), "the refreshed token is served after the background refresh");
    assert_eq!(f.server.calls(), 1);
}

/// A token endpoint that answers 5 s after it issued the tokens (issue 12's slow server): the
/// new access token's lifetime counts from when the request left, the earliest the server can
/// have issued it, not from when the answer arrived. Counted from the arrival, the client
/// believes a token valid for 5 s after the server has expired it, and sends it into 401s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_answers_lifetime_counts_from_the_requests_departure() {
    let f = fixture();
    let key = key();
    let first = login(&f, &key).await;
    f.server.set_latency(Duration::from_secs(5));
    let sent = f.clock.now();
    let refresh = tokio::spawn({
        let (storage, key, rejected) =
            (f.storage.clone(), key.clone(), first.access_token().clone());
        async move { storage.force_refresh(&key, ISS, &rejected).await }
    });
    eventually("the request to reach the server", || f.server.calls() == 1).await;
    // In steps: the server's sleep may start just after the request was counted.
    while !refresh.is_finished() {
        f.clock.advance(Duration::from_secs(1));
        mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(1)).await;
    }
    let fresh = refresh.await.unwrap().unwrap();
    assert!(f.clock.now().saturating_since(sent) >= Duration::from_secs(5));
    assert_eq!(fresh.expires_at(), Some(sent + HOUR), "counted from the departure");
    // Obtained on arrival: the refresh-ahead window is a fraction of the life left then.
    assert_eq!(fresh.obtained_at(), f.clock.now());
}

/// Race (102): the refresh token rotated between a caller's read and the redemption: the
/// redemption uses the stored (rotated) token, never the snapshot.
#[tokio::test]
async fn the_refresh_uses_the_stored_token_not_a_snapshot() {
    let f = fixture();
    let key = key();
    let first = login(&f, &key).await;
    // Another storage (a restarted process) rotates behind this one's view.
    let other = TokenStorage::builder(
        SharedTokenStore::from_arc(f.store.clone()),
        keyring(),
        f.server.clone(),
    )
    .clock(f.clock.shared())
    .config(config())
    .build();
    let rotated = other.force_refresh(&key, ISS, first.access_token()).await.unwrap();
    // This storage still has `first` in view; the 401 for a token that is no longer current
    // returns the rotated set without a call.
    let got = f.storage.force_refresh(&key, ISS, first.access_token()).await.unwrap();
    assert_eq!(got.version(), rotated.version());
    // A 401 for the rotated token redeems the rotated refresh token: no reuse.
    f.storage.force_refresh(&key, ISS, rotated.access_token()).await.unwrap();
    assert_eq!((f.server.redemptions(), f.server.reuse_detected()), (2, 0));
}

/// 104: different keys (servers, users, tenants) are not coalesced and never see each other's
/// tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_isolated() {
    let f = fixture();
    let keys = [
        TokenKey::new("t1", "alice", "github"),
        TokenKey::new("t2", "alice", "github"),
        TokenKey::new("t1", "alice", "linear"),
        TokenKey::new("t1", "bob", "github"),
    ];
    let mut firsts = Vec::new();
    for key in &keys {
        firsts.push(login(&f, key).await);
    }
    f.server.set_latency(Duration::from_secs(1));
    let mut tasks = Vec::new();
    for (key, first) in keys.iter().zip(&firsts) {
        let (storage, key, rejected) =
            (f.storage.clone(), key.clone(), first.access_token().clone());
        tasks.push(tokio::spawn(async move {
            (key.clone(), storage.force_refresh(&key, ISS, &rejected).await)
        }));
    }
    eventually("one redemption per key", || f.server.calls() == 4).await;
    f.clock.advance(Duration::from_secs(1));
    for t in tasks {
        let (key, got) = t.await.unwrap();
        let issued = FakeAuthServer::parse(got.unwrap().access_token().expose()).unwrap();
        assert_eq!(issued.key, key.to_string());
    }
    assert_eq!(
        f.storage.list("t1", "alice").await.unwrap(),
        vec![keys[0].clone(), keys[2].clone()]
    );
    assert_eq!(f.storage.list("t2", "alice").await.unwrap(), vec![keys[1].clone()]);
    assert!(f.storage.list("unknown", "alice").await.unwrap().is_empty());
    assert!(f.storage.list("t1", "ali").await.unwrap().is_empty());
}

/// 91, 98, 105, anchors §d 6: a transient failure keeps the credentials, reaches every joiner,
/// is cached briefly (no storm on the server), and the next refresh after it redeems again.
#[tokio::test]
async fn transient_failures_keep_credentials_and_are_cached_briefly() {
    let mut config = config();
    config.max_attempts = 1;
    config.failure_ttl = Duration::from_secs(10);
    let f = fixture_with(config, |b| b);
    let key = key();
    let first = login(&f, &key).await;
    f.server.fail_next(RefreshError::transient(TransientKind::Network, "connection reset"));
    let e = f.storage.force_refresh(&key, ISS, first.access_token()).await.unwrap_err();
    assert!(matches!(e, Error::RefreshUnavailable { .. }), "{e:?}");
    // Cached: a storm of callers does not reach the server.
    for _ in 0..20 {
        let e = f.storage.force_refresh(&key, ISS, first.access_token()).await.unwrap_err();
        assert!(matches!(e, Error::RefreshUnavailable { .. }));
    }
    assert_eq!(f.server.calls(), 1);
    // Credentials kept (the failure came before sending: not left in doubt).
    let kept = f.storage.tokens(&key).await.unwrap().unwrap();
    assert_eq!(kept.access_token(), first.access_token());
    assert_eq!(kept.refresh_token(), first.refresh_token());
    assert!(!kept.in_doubt());
    f.clock.advance(Duration::from_secs(10));
    let fresh = f.storage.force_refresh(&key, ISS, first.access_token()).await.unwrap();
    assert_ne!(fresh.access_token(), first.access_token());
    assert_eq!((f.server.calls(), f.server.reuse_detected()), (2, 0));
}

/// Transient failures are retried with backoff on the injected clock, within one refresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_with_backoff() {
    let f = fixture();
    let key = key();
    let first = login(&f, &key).await;
    f.server.fail_next(RefreshError::transient(TransientKind::ServerError(503), "busy"));
    f.server.fail_next(RefreshError::transient(TransientKind::TemporarilyUnavailable, "busy"));
    let task = tokio::spawn({
        let (storage, key, rejected) =
            (f.storage.clone(), key.clone(), first.access_token().clone());
        async move { storage.force_refresh(&key, ISS, &rejected).await }
    });
    eventually("the first attempt", || f.server.calls() == 1).await;
    mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(20)).await;
    assert_eq!(f.server.calls(), 1, "no retry before the backoff has passed");
    // Backoff is at most backoff_base * 2^n; advance in steps until all three attempts ran.
    for _ in 0..20 {
        f.clock.advance(Duration::from_millis(500));
        mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(5)).await;
    }
    let fresh = task.await.unwrap().unwrap();
    assert_ne!(fresh.access_token(), first.access_token());
    assert_eq!((f.server.calls(), f.server.redemptions()), (3, 1));
}

/// A Retry-After longer than the longest backoff ends the refresh at once and holds further
/// refreshes off until it has passed.
#[tokio::test]
async fn retry_after_is_respected() {
    let f = fixture();
    let key = key();
    let first = login(&f, &key).await;
    f.server.fail_next(RefreshError::transient_retry_after(
        TransientKind::RateLimited,
        "slow down",
        Duration::from_secs(120),
    ));
    match f.storage.force_refresh(&key, ISS, first.access_token()).await.unwrap_err() {
        Error::RefreshUnavailable { retry_after, .. } => {
            assert_eq!(retry_after, Some(Duration::from_secs(120)))
        }
        other => panic!("{other:?}"),
    }
    f.clock.advance(Duration::from_secs(60));
    assert!(f.storage.force_refresh(&key, ISS, first.access_token()).await.is_err());
    assert_eq!(f.server.calls(), 1);
    f.clock.advance(Duration::from_secs(60));
    assert!(f.storage.force_refresh(&key, ISS, first.access_token()).await.is_ok());
}

/// 93: unauthorized_client marks the slot; no further calls until a new authorization.
#[tokio::test]
async fn unauthorized_client_marks_the_slot() {
    let f = fixture();
    let key = key();
    let first = login(&f, &key).await;
    f.server.fail_next(RefreshError::terminal(TerminalCode::UnauthorizedClient, None));
    let e = f.storage.force_refresh(&key, ISS, first.access_token()).await.unwrap_err();
    assert!(matches!(
        reason(e),
        ReauthReason::Rejected { code: TerminalCode::UnauthorizedClient, .. }
    ));
    let marked = f.storage.tokens(&key).await.unwrap().unwrap();
    assert!(marked.refresh_token().is_none());
    assert!(f.storage.get_valid(&key, ISS).await.unwrap_err().is_authorization_required());
    assert_eq!(f.server.calls(), 1);
    // A new login clears the mark.
    login(&f, &key).await;
    assert!(f.storage.get_valid(&key, ISS).await.is_ok());
}

/// 94, 99, 110: invalid_client deletes the client registration and the refresh token, and every
/// waiter is told to re-authorize.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_client_deletes_the_registration_and_reaches_every_waiter() {
    let f = fixture();
    let key = key();
    f.storage.store_client(&key, &ClientRegistration::new("c1", ISS)).await.unwrap();
    let first = login(&f, &key).await;
    f.server.set_latency(Duration::from_secs(1));
    f.server.fail_next(RefreshError::terminal(
        TerminalCode::InvalidClient,
        Some("client not found".into()),
    ));
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let (storage, key, rejected) =
            (f.storage.clone(), key.clone(), first.access_token().clone());
        tasks.push(tokio::spawn(async move { storage.force_refresh(&key, ISS, &rejected).await }));
    }
    eventually("the call", || f.server.calls() == 1).await;
    mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(20)).await;
    f.clock.advance(Duration::from_secs(1));
    for t in tasks {
        match reason(t.await.unwrap().unwrap_err()) {
            ReauthReason::Rejected { code: TerminalCode::InvalidClient, description } => {
                assert_eq!(description.as_deref(), Some("client not found"))
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(f.storage.client(&key).await.unwrap(), None);
    assert!(f.storage.tokens(&key).await.unwrap().unwrap().refresh_token().is_none());
    assert_eq!(f.server.calls(), 1);
}

/// Race (anchors §d 5): invalid_grant because a peer redeemed and stored first: the peer's
/// newer tokens are adopted; the user is not sent to the browser.
#[tokio::test]
async fn invalid_grant_adopts_a_peers_rotation() {
    /// Plays the peer: stores a rotated set through another storage, then answers like a server
    /// that saw the old refresh token already redeemed.
    #[derive(Debug)]
    struct PeerWins {
        peer: std::sync::Mutex<Option<(TokenStorage, TokenResponse)>>,
    }
    #[async_trait::async_trait]
    impl Refresher for PeerWins {
        async fn refresh(
            &self,
            key: &TokenKey,
            _: &RefreshRequest,
        ) -> Result<TokenResponse, RefreshError> {
            let peer = self.peer.lock().unwrap().take();
            if let Some((storage, response)) = peer {
                storage.store(key, ISS, response).await.unwrap();
            }
            Err(RefreshError::terminal(TerminalCode::InvalidGrant, None))
        }
    }
    let clock = token_storage::ManualClock::default();
    let store = SharedTokenStore::new(token_storage::MemoryTokenStore::new());
    let peer = TokenStorage::builder(store.clone(), keyring(), FakeAuthServer::new(clock.shared()))
        .clock(clock.shared())
        .build();
    let refresher = Arc::new(PeerWins {
        peer: std::sync::Mutex::new(Some((
            peer.clone(),
            TokenResponse::bearer("peer-at").expires_in(HOUR).refresh_token("peer-rt"),
        ))),
    });
    let storage = TokenStorage::builder(store, keyring(), refresher).clock(clock.shared()).build();
    let key = key();
    storage
        .store(&key, ISS, TokenResponse::bearer("at-1").expires_in(HOUR).refresh_token("rt-1"))
        .await
        .unwrap();
    let got = storage.force_refresh(&key, ISS, &Secret::new("at-1")).await.unwrap();
    assert_eq!(got.access_token().expose(), "peer-at");
    assert_eq!(got.refresh_token().map(Secret::expose), Some("peer-rt"));
    assert!(storage.tokens(&key).await.unwrap().unwrap().needs_authorization().is_none());
}

/// Race (anchors §d 3, the stale-write guard): a refresh that lands after an interactive login
/// stored newer tokens is discarded; it never overwrites them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_refresh_never_overwrites_a_newer_login() {
    let f = fixture();
    let key = key();
    let first = login(&f, &key).await;
    f.server.set_latency(Duration::from_secs(5));
    let task = tokio::spawn({
        let (storage, key, rejected) =
            (f.storage.clone(), key.clone(), first.access_token().clone());
        async move { storage.force_refresh(&key, ISS, &rejected).await }
    });
    eventually("the redemption to start", || f.server.calls() == 1).await;
    let interactive = login(&f, &key).await;
    f.clock.advance(Duration::from_secs(5));
    let got = task.await.unwrap().unwrap();
    assert_eq!(got.version(), interactive.version(), "the caller gets the newer login");
    assert_eq!(f.server.redemptions(), 1, "the refresh did redeem");
    let stored = f.storage.tokens(&key).await.unwrap().unwrap();
    assert_eq!(stored.access_token(), interactive.access_token());
    assert_eq!(stored.version(), interactive.version());
}

/// Race: an uninstall while a refresh is in flight: the result is discarded, nothing comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_in_flight_does_not_resurrect_deleted_tokens() {
    let f = fixture();
    let key = key();
    let first = login(&f, &key).await;
    f.server.set_latency(Duration::from_secs(5));
    let task = tokio::spawn({
        let (storage, key, rejected) =
            (f.storage.clone(), key.clone(), first.access_token().clone());
        async move { storage.force_refresh(&key, ISS, &rejected).await }
    });
    eventually("the redemption to start", || f.server.calls() == 1).await;
    f.storage.delete_all(&key).await.unwrap();
    f.clock.advance(Duration::from_secs(5));
    assert_eq!(reason(task.await.unwrap().unwrap_err()), ReauthReason::Missing);
    assert!(f.storage.tokens(&key).await.unwrap().is_none());
    assert!(f.storage.list("acme", "alice").await.unwrap().is_empty());
}

/// 108, 109, anchors §d 2: callers that give up (deadline or dropped future) end only their own
/// wait; with every caller gone, the detached refresh still persists the rotated token and runs
/// the hook once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_that_leave_do_not_lose_the_rotated_token() {
    let hooks = Arc::new(AtomicUsize::new(0));
    let mut config = config();
    config.caller_deadline = Some(Duration::from_secs(2));
    let f = fixture_with(config, |b| {
        let hooks = hooks.clone();
        b.on_refresh(move |_, old, new| {
            assert!(new.version() > old.version());
            hooks.fetch_add(1, Ordering::SeqCst);
        })
    });
    let key = key();
    let first = login(&f, &key).await;
    f.server.set_latency(Duration::from_secs(5));
    let spawn = || {
        let (storage, key, rejected) =
            (f.storage.clone(), key.clone(), first.access_token().clone());
        tokio::spawn(async move { storage.force_refresh(&key, ISS, &rejected).await })
    };
    let dropped = spawn();
    eventually("the redemption to start", || f.server.calls() == 1).await;
    // The second caller must have taken its deadline from the clock before the clock moves (a
    // deadline taken after the advance would never pass, and the test would hang).
    let sleepers = f.clock.sleepers();
    let timed_out = spawn();
    eventually("the second caller to wait", || f.clock.sleepers() > sleepers).await;
    dropped.abort();
    f.clock.advance(Duration::from_secs(2));
    assert!(matches!(timed_out.await.unwrap(), Err(Error::Timeout { .. })));
    // Every caller has gone; the redemption is still in flight.
    f.clock.advance(Duration::from_secs(3));
    eventually("the rotated token to be persisted", || hooks.load(Ordering::SeqCst) == 1).await;
    let stored = f.storage.tokens(&key).await.unwrap().unwrap();
    assert_ne!(stored.refresh_token(), first.refresh_token());
    assert_eq!(
        (f.server.calls(), f.server.reuse_detected(), hooks.load(Ordering::SeqCst)),
        (1, 0, 1)
    );
}

/// 106, 107: a refresh told to stop during its backoff never calls the server again; a
/// refresh that hangs past its deadline after sending is kept (issue 12: never abandon a sent
/// request), and the next call joins it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_refresh_is_abandoned_and_never_replays() {
    let mut config = config();
    config.caller_deadline = None;
    config.refresh_deadline = Duration::from_secs(60);
    config.refresh_grace = Duration::from_secs(10);
    config.backoff_base = Duration::from_secs(200);
    config.backoff_max = Duration::from_secs(200);
    let f = fixture_with(config, |b| b);
    let key = key();
    let first = login(&f, &key).await;
    // A transient failure, then a backoff longer than the deadline: cancelled in the backoff.
    f.server.fail_next(RefreshError::transient(TransientKind::Network, "reset"));
    let task = tokio::spawn({
        let (storage, key, rejected) =
            (f.storage.clone(), key.clone(), first.access_token().clone());
        async move { storage.force_refresh(&key, ISS, &rejected).await }
    });
    eventually("the first attempt", || f.server.calls() == 1).await;
    mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(10)).await;
    f.clock.advance(Duration::from_secs(61));
    assert!(matches!(task.await.unwrap(), Err(Error::Timeout { .. })));
    f.clock.advance(Duration::from_secs(300));
    mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(20)).await;
    assert_eq!(f.server.calls(), 1, "no replay after the deadline");

    // A redemption that hangs past deadline + grace: it was sent, and the server burns the
    // refresh token on arrival, so the flight is kept, never abandoned (issue 12); a later call
    // joins it instead of presenting the spent token again, and both get its answer.
    f.server.set_latency(Duration::from_secs(1000));
    let hung = tokio::spawn({
        let (storage, key, rejected) =
            (f.storage.clone(), key.clone(), first.access_token().clone());
        async move { storage.force_refresh(&key, ISS, &rejected).await }
    });
    eventually("the hung attempt", || f.server.calls() == 2).await;
    mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(10)).await;
    f.clock.advance(Duration::from_secs(60));
    mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(10)).await;
    f.clock.advance(Duration::from_secs(10));
    mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(20)).await;
    assert!(!hung.is_finished(), "a sent refresh is not abandoned at deadline + grace");
    let joined = tokio::spawn({
        let (storage, key, rejected) =
            (f.storage.clone(), key.clone(), first.access_token().clone());
        async move { storage.force_refresh(&key, ISS, &rejected).await }
    });
    mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(20)).await;
    assert_eq!(f.server.calls(), 2, "the later call joined the sent refresh");
    f.clock.advance(Duration::from_secs(1000));
    let (a, b) = (hung.await.unwrap().unwrap(), joined.await.unwrap().unwrap());
    assert_eq!(a.access_token(), b.access_token());
    assert_ne!(a.access_token(), first.access_token());
    assert_eq!(f.server.reuse_detected(), 0);
}

/// Anchors §d 9: a record from another issuer is not served, and not destroyed.
#[tokio::test]
async fn tokens_from_another_issuer_are_not_served() {
    let f = fixture();
    let key = key();
    login(&f, &key).await;
    match reason(f.storage.get_valid(&key, "https://evil.example").await.unwrap_err()) {
        ReauthReason::IssuerChanged { stored, expected } => {
            assert_eq!((stored.as_str(), expected.as_str()), (ISS, "https://evil.example"))
        }
        other => panic!("{other:?}"),
    }
    assert!(
        f.storage.force_refresh(&key, "https://evil.example", &Secret::new("x")).await.is_err()
    );
    assert_eq!(f.server.calls(), 0);
    assert!(f.storage.get_valid(&key, ISS).await.is_ok());
}

/// The storm brake: more than N writes for a key within the window stop with a typed error.
#[tokio::test]
async fn the_storm_brake_stops_a_write_loop() {
    let mut config = config();
    config.storm_limit = 3;
    config.storm_window = Duration::from_secs(60);
    let f = fixture_with(config, |b| b);
    let key = key();
    let mut last = login(&f, &key).await;
    for _ in 0..2 {
        last = f.storage.force_refresh(&key, ISS, last.access_token()).await.unwrap();
    }
    let e = f.storage.force_refresh(&key, ISS, last.access_token()).await.unwrap_err();
    assert!(matches!(e, Error::WriteStorm { limit: 3, .. }), "{e:?}");
    assert_eq!(f.server.calls(), 2, "the brake stops before redeeming");
    assert!(matches!(
        f.storage.store(&key, ISS, f.server.issue(&key)).await,
        Err(Error::WriteStorm { .. })
    ));
    // Other keys are not braked; the window passes.
    login(&f, &TokenKey::new("acme", "alice", "other")).await;
    f.clock.advance(Duration::from_secs(60));
    assert!(f.storage.force_refresh(&key, ISS, last.access_token()).await.is_ok());
}

/// Rollback (issue 12, crypto.rs ~185): an older sealed blob of the same key written back
/// under its name (a store restored from a backup, or a hostile write with store access) is
/// authentic, and was served. Its generation, bound into the associated data, is older than
/// the one this process read: a typed error, and the record is left as it is (nothing is
/// overwritten or deleted); a refresh is not attempted over it.
#[tokio::test]
async fn a_rolled_back_record_is_refused_and_kept() {
    let f = fixture();
    let key = key();
    let first = login(&f, &key).await;
    let record = f.store.keys_with_prefix("").await.unwrap().pop().unwrap();
    let old = f.store.get(&record).await.unwrap().unwrap();
    let fresh = f.storage.force_refresh(&key, ISS, first.access_token()).await.unwrap();
    assert_eq!(f.storage.get_valid(&key, ISS).await.unwrap().version(), fresh.version());
    let current = f.store.get(&record).await.unwrap().unwrap().version;
    f.store.compare_and_swap(&record, Some(current), old.value.to_vec()).await.unwrap();
    f.clock.advance(HOUR); // the view is due: the next call reads the store
    let calls = f.server.calls();
    for e in [
        f.storage.get_valid(&key, ISS).await.unwrap_err(),
        f.storage.force_refresh(&key, ISS, fresh.access_token()).await.unwrap_err(),
        f.storage.tokens(&key).await.unwrap_err(),
    ] {
        match &e {
            Error::Decrypt { reason: DecryptFailure::RolledBack { found, seen }, .. } => {
                assert!(found < seen, "{e}");
                assert!(e.to_string().contains("rolled back"), "{e}");
                assert!(!e.to_string().contains(first.access_token().expose()));
            }
            other => panic!("expected a rolled-back record, got {other:?}"),
        }
    }
    assert_eq!(f.server.calls(), calls, "no refresh over a rolled-back record");
    assert_eq!(&*f.store.get(&record).await.unwrap().unwrap().value, &*old.value, "kept as it is");
}

/// Bad input: a tampered, truncated or foreign record gives a typed error and stays as it was;
/// no refresh is attempted over it and an interactive store does not overwrite it silently.
#[tokio::test]
async fn unreadable_records_are_reported_and_kept() {
    let f = fixture();
    let key = key();
    login(&f, &key).await;
    let record = f.store.keys_with_prefix("").await.unwrap().pop().unwrap();
    let original = f.store.get(&record).await.unwrap().unwrap();
    let cases: Vec<(Vec<u8>, DecryptFailure)> = vec![
        (
            {
                let mut b = original.value.to_vec();
                let n = b.len();
                b[n - 3] ^= 1;
                b
            },
            DecryptFailure::Authentication,
        ),
        (original.value[..original.value.len() / 2].to_vec(), DecryptFailure::Authentication),
        (original.value[..10].to_vec(), DecryptFailure::Truncated),
        (b"plaintext".to_vec(), DecryptFailure::UnknownFormat),
    ];
    for (bytes, expected) in cases {
        let current = f.store.get(&record).await.unwrap().unwrap().version;
        f.store.compare_and_swap(&record, Some(current), bytes.clone()).await.unwrap();
        let reader = TokenStorage::builder(
            SharedTokenStore::from_arc(f.store.clone()),
            keyring(),
            f.server.clone(),
        )
        .clock(f.clock.shared())
        .build();
        for e in [
            reader.get_valid(&key, ISS).await.unwrap_err(),
            reader.force_refresh(&key, ISS, &Secret::new("x")).await.unwrap_err(),
            reader.store(&key, ISS, f.server.issue(&key)).await.unwrap_err(),
        ] {
            match e {
                Error::Decrypt { reason, .. } => assert_eq!(reason, expected),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            &*f.store.get(&record).await.unwrap().unwrap().value,
            &bytes[..],
            "left as it was"
        );
    }
    assert_eq!(f.server.calls(), 0);
    // A wrong key.
    f.store
        .compare_and_swap(
            &record,
            Some(f.store.get(&record).await.unwrap().unwrap().version),
            original.value.to_vec(),
        )
        .await
        .unwrap();
    let wrong = Arc::new(
        token_storage::Keyring::new("k1", token_storage::EncryptionKey::from_bytes([8; 32]))
            .unwrap(),
    );
    let reader =
        TokenStorage::builder(SharedTokenStore::from_arc(f.store.clone()), wrong, f.server.clone())
            .build();
    assert!(matches!(
        reader.tokens(&key).await,
        Err(Error::Decrypt { reason: DecryptFailure::Authentication, .. })
    ));
    let other_id = Arc::new(
        token_storage::Keyring::new("k2", token_storage::EncryptionKey::from_bytes([7; 32]))
            .unwrap(),
    );
    let reader = TokenStorage::builder(
        SharedTokenStore::from_arc(f.store.clone()),
        other_id,
        f.server.clone(),
    )
    .build();
    assert!(matches!(
        reader.tokens(&key).await,
        Err(Error::Decrypt { reason: DecryptFailure::UnknownKeyId(_), .. })
    ));
    // A record moved under another user's key fails.
    let mallory = TokenKey::new("acme", "mallory", "github");
    let moved = record.replace("/alice/", "/mallory/");
    f.store.compare_and_swap(&moved, None, original.value.to_vec()).await.unwrap();
    assert!(matches!(
        f.storage.tokens(&mallory).await,
        Err(Error::Decrypt { reason: DecryptFailure::Authentication, .. })
    ));
    // The explicit uninstall clears an unreadable record.
    f.storage.delete_all(&mallory).await.unwrap();
    assert!(f.storage.tokens(&mallory).await.unwrap().is_none());
}
