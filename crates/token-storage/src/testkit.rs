//! Test helpers (feature `test-util`): the [`TokenStore`](crate::TokenStore) conformance suite and
//! [`FakeAuthServer`], a [`Refresher`] with strict rotation and reuse detection that fails the way
//! real token endpoints do, and [`FaultyTokenStore`], a store that fails the way stores do.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use token_storage::{MemoryTokenStore, SharedTokenStore, testkit};
//!
//! testkit::store_conformance(|| SharedTokenStore::new(MemoryTokenStore::new())).await;
//! # }
//! ```

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use mcp_clock::{Clock, SharedClock, Timestamp};

mod faulty;
pub use faulty::FaultyTokenStore;

use crate::{
    RefreshError, RefreshRequest, Refresher, SharedTokenStore, TerminalCode, TokenKey,
    TokenResponse, store::Swapped,
};

/// Runs every conformance check against stores built by `make` (called once per check; each
/// store must start empty). Panics with the name of the first check that fails.
pub async fn store_conformance<F>(make: F)
where
    F: Fn() -> SharedTokenStore,
{
    type Check = fn(SharedTokenStore) -> mcp_clock::BoxFuture<'static, ()>;
    let checks: [(&str, Check); 6] = [
        ("absent keys", |s| Box::pin(absent(s))),
        ("compare-and-swap", |s| Box::pin(compare_and_swap(s))),
        ("versions increase and are never reused", |s| Box::pin(no_aba(s))),
        ("delete-if", |s| Box::pin(delete_if(s))),
        ("keys with a prefix", |s| Box::pin(prefix(s))),
        ("one winner among racing writers", |s| Box::pin(racing_writers(s))),
    ];
    for (name, check) in checks {
        let run = tokio::spawn(check(make()));
        if let Err(e) = run.await {
            panic!("token store conformance check {name:?} failed: {e}");
        }
    }
}

async fn swapped(s: &SharedTokenStore, key: &str, expected: Option<u64>, value: &[u8]) -> u64 {
    match s.compare_and_swap(key, expected, value.to_vec()).await.unwrap() {
        Swapped::Swapped { version } => version,
        Swapped::Conflict(c) => panic!("expected a write to {key} over {expected:?}, got {c:?}"),
    }
}

async fn absent(s: SharedTokenStore) {
    assert_eq!(s.get("k").await.unwrap(), None);
    assert!(!s.delete_if("k", None).await.unwrap());
    assert!(!s.delete_if("k", Some(1)).await.unwrap());
    assert_eq!(
        s.compare_and_swap("k", Some(1), b"x".to_vec()).await.unwrap(),
        Swapped::Conflict(None)
    );
    assert_eq!(s.get("k").await.unwrap(), None);
    assert!(s.keys_with_prefix("").await.unwrap().is_empty());
}

async fn compare_and_swap(s: SharedTokenStore) {
    let v1 = swapped(&s, "k", None, b"one").await;
    // Insert-if-absent loses against the stored value and shows it.
    match s.compare_and_swap("k", None, b"two".to_vec()).await.unwrap() {
        Swapped::Conflict(Some(v)) => assert_eq!((v.version, &*v.value), (v1, &b"one"[..])),
        other => panic!("insert over a stored value must conflict: {other:?}"),
    }
    // A stale expected version loses.
    assert!(matches!(
        s.compare_and_swap("k", Some(v1 + 1000), b"two".to_vec()).await.unwrap(),
        Swapped::Conflict(Some(_))
    ));
    let v2 = swapped(&s, "k", Some(v1), b"two").await;
    let got = s.get("k").await.unwrap().unwrap();
    assert_eq!((got.version, &*got.value), (v2, &b"two"[..]));
    // The writer that read v1 cannot write again.
    assert!(matches!(
        s.compare_and_swap("k", Some(v1), b"three".to_vec()).await.unwrap(),
        Swapped::Conflict(Some(_))
    ));
    // Keys are independent.
    swapped(&s, "k2", None, b"x").await;
    assert_eq!(&*s.get("k").await.unwrap().unwrap().value, b"two");
}

async fn no_aba(s: SharedTokenStore) {
    let v1 = swapped(&s, "k", None, b"a").await;
    let v2 = swapped(&s, "k", Some(v1), b"b").await;
    assert!(v2 > v1, "versions must increase: {v1} then {v2}");
    assert!(s.delete_if("k", Some(v2)).await.unwrap());
    let v3 = swapped(&s, "k", None, b"a").await;
    assert!(v3 > v2, "a re-created key must not reuse a version: {v2} then {v3}");
    for old in [v1, v2] {
        assert!(matches!(
            s.compare_and_swap("k", Some(old), b"stale".to_vec()).await.unwrap(),
            Swapped::Conflict(Some(_))
        ));
    }
    let other = swapped(&s, "other", None, b"x").await;
    assert!(other != v1 && other != v2 && other != v3, "versions are unique across keys");
}

async fn delete_if(s: SharedTokenStore) {
    let v1 = swapped(&s, "k", None, b"a").await;
    assert!(!s.delete_if("k", Some(v1 + 1000)).await.unwrap(), "a stale delete must not delete");
    assert!(s.get("k").await.unwrap().is_some());
    assert!(s.delete_if("k", Some(v1)).await.unwrap());
    assert_eq!(s.get("k").await.unwrap(), None);
    swapped(&s, "k", None, b"b").await;
    assert!(s.delete_if("k", None).await.unwrap());
    assert!(!s.delete_if("k", None).await.unwrap());
}

async fn prefix(s: SharedTokenStore) {
    for key in ["t1/alice/a", "t1/alice/b", "t1/alice2/a", "t2/alice/a", "t0"] {
        swapped(&s, key, None, b"x").await;
    }
    let mut keys = s.keys_with_prefix("t1/alice/").await.unwrap();
    keys.sort();
    assert_eq!(keys, ["t1/alice/a", "t1/alice/b"]);
    assert!(s.keys_with_prefix("t3/").await.unwrap().is_empty());
    assert_eq!(s.keys_with_prefix("").await.unwrap().len(), 5);
}

/// Race: many writers that read the same version compare-and-swap at once; exactly one wins.
async fn racing_writers(s: SharedTokenStore) {
    let v0 = swapped(&s, "k", None, b"start").await;
    let mut tasks = Vec::new();
    for i in 0..32u8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            matches!(
                s.compare_and_swap("k", Some(v0), vec![i]).await.unwrap(),
                Swapped::Swapped { .. }
            )
        }));
    }
    let mut winners = 0;
    for t in tasks {
        winners += usize::from(t.await.unwrap());
    }
    assert_eq!(winners, 1);
}

/// An authorization server's token endpoint with strict refresh-token rotation and reuse
/// detection: each refresh token is good once; presenting a used one revokes its whole family
/// (as Azure Entra and others do).
///
/// It fails the way a real server does: a refresh token is burnt **when the request arrives**,
/// and what happens to the answer afterwards is a separate fault ([`FakeAuthServer::lose_next_answer`],
/// [`FakeAuthServer::fail_next_after_acting`], [`FakeAuthServer::set_latency`], which answers
/// late after acting). [`FakeAuthServer::set_reuse_grace`] models the grace window of Okta and
/// Auth0: a replay within it gets the same successor back.
///
/// Tokens name their key, family and issue number (`at:<key>:<family>:<n>`), so tests can check
/// where a token came from with [`FakeAuthServer::parse`].
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use token_storage::{Refresher, RefreshRequest, SharedClock, TokenKey, testkit::FakeAuthServer};
///
/// let server = FakeAuthServer::new(SharedClock::system());
/// let key = TokenKey::new("t", "u", "s");
/// let login = server.issue(&key);
/// let first = server.redeem(&key, login.refresh_token.as_ref().unwrap().expose()).await.unwrap();
/// assert!(server.redeem(&key, login.refresh_token.as_ref().unwrap().expose()).await.is_err());
/// assert_eq!(server.reuse_detected(), 1);
/// assert_eq!(server.replays_after_delivery(), 1);
/// // The family is revoked: the rotated token is dead too.
/// assert!(server.redeem(&key, first.refresh_token.as_ref().unwrap().expose()).await.is_err());
/// # }
/// ```
pub struct FakeAuthServer {
    clock: SharedClock,
    state: Mutex<FakeState>,
}

impl std::fmt::Debug for FakeAuthServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The issued tokens are secrets too: only counters print.
        self.with(|s| {
            f.debug_struct("FakeAuthServer")
                .field("calls", &s.calls)
                .field("redemptions", &s.redemptions)
                .field("reuse_detected", &s.reuse_detected)
                .finish_non_exhaustive()
        })
    }
}

/// What the server knows of one refresh token it issued.
struct RefreshState {
    family: u64,
    /// When it was first redeemed, and what it was redeemed for.
    used: Option<(Timestamp, TokenResponse)>,
    /// Whether an answer carrying its successor reached the client.
    delivered: bool,
}

/// What becomes of the answer of a request the server acted on.
enum After {
    Deliver,
    Lose,
    Fail(RefreshError),
}

#[derive(Default)]
struct FakeState {
    next: u64,
    refresh_tokens: HashMap<String, RefreshState>,
    revoked: HashSet<u64>,
    latency: Duration,
    lifetime: Option<Duration>,
    rotate: bool,
    reuse_grace: Duration,
    redemptions: u64,
    calls: u64,
    reuse_detected: u64,
    replays_after_delivery: u64,
    lost_answers: u64,
    fail_next: VecDeque<RefreshError>,
    after_next: VecDeque<After>,
}

/// Where a token issued by [`FakeAuthServer`] came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    /// The key it was issued for (`tenant/user/server`).
    pub key: String,
    /// The grant family (one per interactive login).
    pub family: u64,
    /// The issue number, increasing across the whole server.
    pub n: u64,
}

impl FakeAuthServer {
    /// A server issuing one-hour access tokens with rotation, answering at once.
    pub fn new(clock: SharedClock) -> Arc<Self> {
        let state = FakeState {
            lifetime: Some(Duration::from_secs(3600)),
            rotate: true,
            ..FakeState::default()
        };
        Arc::new(FakeAuthServer { clock, state: Mutex::new(state) })
    }

    fn with<T>(&self, f: impl FnOnce(&mut FakeState) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Answer each refresh `latency` (on the server's clock) after acting on it: the refresh
    /// token is burnt when the request arrives, the answer comes later.
    pub fn set_latency(&self, latency: Duration) {
        self.with(|s| s.latency = latency);
    }

    /// The `expires_in` of issued access tokens (`None`: none given).
    pub fn set_lifetime(&self, lifetime: Option<Duration>) {
        self.with(|s| s.lifetime = lifetime);
    }

    /// Whether refreshes return a new refresh token (default) or none (a non-rotating server,
    /// whose refresh tokens stay good).
    pub fn set_rotation(&self, rotate: bool) {
        self.with(|s| s.rotate = rotate);
    }

    /// A replay of a used refresh token within `grace` of its first redemption returns the same
    /// successor instead of revoking the family (Okta's and Auth0's reuse interval). Zero (the
    /// default): strict reuse detection.
    pub fn set_reuse_grace(&self, grace: Duration) {
        self.with(|s| s.reuse_grace = grace);
    }

    /// Fail the next refresh call with `error`, before looking at its refresh token (the
    /// request never reached the token endpoint proper).
    pub fn fail_next(&self, error: RefreshError) {
        self.with(|s| s.fail_next.push_back(error));
    }

    /// Act on the next refresh call (rotate its refresh token), then lose the answer: the
    /// client sees [`TransientKind::Unanswered`](crate::TransientKind::Unanswered), as after a
    /// timeout or a reset connection.
    pub fn lose_next_answer(&self) {
        self.with(|s| s.after_next.push_back(After::Lose));
    }

    /// Act on the next refresh call (rotate its refresh token), then answer `error` (a 5xx
    /// after the rotation was written, say).
    pub fn fail_next_after_acting(&self, error: RefreshError) {
        self.with(|s| s.after_next.push_back(After::Fail(error)));
    }

    /// Drop every armed fault ([`FakeAuthServer::fail_next`], [`FakeAuthServer::lose_next_answer`],
    /// [`FakeAuthServer::fail_next_after_acting`]).
    pub fn disarm(&self) {
        self.with(|s| {
            s.fail_next.clear();
            s.after_next.clear();
        });
    }

    /// Whether `refresh_token` would be honoured now: issued here, never redeemed, its family
    /// not revoked.
    pub fn is_live(&self, refresh_token: &str) -> bool {
        self.with(|s| {
            s.refresh_tokens
                .get(refresh_token)
                .is_some_and(|r| r.used.is_none() && !s.revoked.contains(&r.family))
        })
    }

    /// How many refresh calls arrived (including failed ones).
    pub fn calls(&self) -> u64 {
        self.with(|s| s.calls)
    }

    /// How many refresh tokens were redeemed successfully.
    pub fn redemptions(&self) -> u64 {
        self.with(|s| s.redemptions)
    }

    /// How many times a refresh token was presented a second time (within a grace window or
    /// not).
    pub fn reuse_detected(&self) -> u64 {
        self.with(|s| s.reuse_detected)
    }

    /// How many times a refresh token was presented again after an answer to an earlier
    /// presentation had reached the client: what the client must never do (an in-doubt retry,
    /// after a lost answer, is not counted).
    pub fn replays_after_delivery(&self) -> u64 {
        self.with(|s| s.replays_after_delivery)
    }

    /// How many answers were lost or failed after acting.
    pub fn lost_answers(&self) -> u64 {
        self.with(|s| s.lost_answers)
    }

    /// Revoke every refresh token issued for `key` so far (the user revoked the grant).
    pub fn revoke_all(&self) {
        self.with(|s| {
            let families: Vec<u64> = s.refresh_tokens.values().map(|r| r.family).collect();
            s.revoked.extend(families);
        });
    }

    /// Tokens for a new grant family, as an interactive login would get.
    pub fn issue(&self, key: &TokenKey) -> TokenResponse {
        self.with(|s| {
            s.next += 1;
            let family = s.next;
            s.mint(key, family, true)
        })
    }

    /// Where a token issued by this server came from.
    pub fn parse(token: &str) -> Option<Issued> {
        let mut parts = token.rsplitn(3, ':');
        let n = parts.next()?.parse().ok()?;
        let family = parts.next()?.parse().ok()?;
        let key = parts.next()?.split_once(':')?.1.to_owned();
        Some(Issued { key, family, n })
    }

    /// The token endpoint: redeem `refresh_token` for `key`. The token is burnt on arrival;
    /// the answer comes after the latency, unless a fault loses or replaces it.
    pub async fn redeem(
        &self,
        key: &TokenKey,
        refresh_token: &str,
    ) -> Result<TokenResponse, RefreshError> {
        let now = self.clock.now();
        let (outcome, latency, after) = self.with(|s| {
            s.calls += 1;
            if let Some(e) = s.fail_next.pop_front() {
                return (Err(e), s.latency, After::Deliver);
            }
            let outcome = s.act(key, refresh_token, now);
            let after = s.after_next.pop_front().unwrap_or(After::Deliver);
            (outcome, s.latency, after)
        });
        if !latency.is_zero() {
            self.clock.sleep(latency).await;
        }
        self.with(|s| match after {
            After::Deliver => {
                if outcome.is_ok()
                    && let Some(r) = s.refresh_tokens.get_mut(refresh_token)
                {
                    r.delivered = true;
                }
                outcome
            }
            After::Lose => {
                s.lost_answers += 1;
                Err(RefreshError::transient(
                    crate::TransientKind::Unanswered,
                    "no answer from the token endpoint (lost after the server acted)",
                ))
            }
            After::Fail(e) => {
                s.lost_answers += 1;
                Err(e)
            }
        })
    }
}

impl Issued {
    fn key_of(token: &str) -> Option<String> {
        FakeAuthServer::parse(token).map(|i| i.key)
    }
}

impl FakeState {
    /// The token endpoint's decision, taken when the request arrives.
    fn act(
        &mut self,
        key: &TokenKey,
        refresh_token: &str,
        now: Timestamp,
    ) -> Result<TokenResponse, RefreshError> {
        let dead = |d: &str| RefreshError::terminal(TerminalCode::InvalidGrant, Some(d.into()));
        let Some(r) = self.refresh_tokens.get(refresh_token) else {
            return Err(dead("unknown refresh token"));
        };
        let (family, used, delivered) = (r.family, r.used.clone(), r.delivered);
        if Issued::key_of(refresh_token) != Some(key.to_string()) {
            return Err(dead("refresh token issued for another key"));
        }
        if self.revoked.contains(&family) {
            return Err(dead("grant revoked"));
        }
        if let Some((at, successor)) = used {
            self.reuse_detected += 1;
            if delivered {
                self.replays_after_delivery += 1;
            }
            if now.saturating_since(at) <= self.reuse_grace && !self.reuse_grace.is_zero() {
                return Ok(successor);
            }
            self.revoked.insert(family);
            return Err(dead("refresh token reused; grant revoked"));
        }
        self.redemptions += 1;
        let rotate = self.rotate;
        let response = self.mint(key, family, rotate);
        if rotate && let Some(r) = self.refresh_tokens.get_mut(refresh_token) {
            r.used = Some((now, response.clone()));
        }
        Ok(response)
    }

    fn mint(&mut self, key: &TokenKey, family: u64, with_refresh: bool) -> TokenResponse {
        self.next += 1;
        let n = self.next;
        let mut response = TokenResponse::bearer(format!("at:{key}:{family}:{n}"));
        if let Some(lifetime) = self.lifetime {
            response = response.expires_in(lifetime);
        }
        if with_refresh {
            let rt = format!("rt:{key}:{family}:{n}");
            self.refresh_tokens
                .insert(rt.clone(), RefreshState { family, used: None, delivered: false });
            response = response.refresh_token(rt);
        }
        response
    }
}

#[async_trait::async_trait]
impl Refresher for FakeAuthServer {
    async fn refresh(
        &self,
        key: &TokenKey,
        request: &RefreshRequest,
    ) -> Result<TokenResponse, RefreshError> {
        self.redeem(key, request.refresh_token.expose()).await
    }
}
