//! A reference [`AuthProvider`]: in-memory tokens, one coalesced refresh per burst of 401s.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use flow_state::{CallOptions, SingleFlight};
use mcp_clock::{BoxFuture, SharedClock};

use crate::challenge::Refusal;
use crate::error::Error;
use crate::provider::{AuthProvider, Recovery};
use crate::secret::Secret;

/// An access token and, optionally, the refresh token that renews it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    /// The bearer token.
    pub access: Secret,
    /// The refresh token, if the server issued one.
    pub refresh: Option<Secret>,
}

impl Tokens {
    /// An access token and an optional refresh token.
    pub fn new(access: impl Into<Secret>, refresh: Option<Secret>) -> Self {
        Tokens { access: access.into(), refresh }
    }
}

/// Redeems a refresh token: `Ok` with the new tokens (a response without a refresh token keeps
/// the old one), `Err(Error::AuthorizationRequired { .. })` when the server rejected the grant
/// (`invalid_grant`), any other `Err` for a failure that may pass.
pub type RefreshFn = Arc<dyn Fn(Secret) -> BoxFuture<'static, Result<Tokens, Error>> + Send + Sync>;

type Flight = Result<Recovery, Error>;

/// A reference [`AuthProvider`] that shows the contract: tokens in memory, and a refresh on a
/// 401 that is **coalesced** with [`flow_state::SingleFlight`] and **keyed by the rejected
/// token**, so a burst of concurrent 401s redeems the refresh token exactly once.
///
/// On [`AuthProvider::on_unauthorized`]:
/// 1. a 403 or `insufficient_scope` → [`Recovery::InsufficientScope`], no refresh;
/// 2. the provider already holds a token other than the rejected one (a peer refreshed) →
///    retry with it, no refresh;
/// 3. otherwise join the refresh in flight for this provider's key, or start one. The attempt
///    checks step 2 again before redeeming, so a caller that arrives just after a refresh
///    settled does not redeem the rotated-out token;
/// 4. a rejected refresh (`invalid_grant`) forgets the tokens, so the dead refresh token is
///    never sent again, and every waiter gets [`Recovery::AuthorizationRequired`].
///
/// [`ConnectionFactory`](crate::ConnectionFactory)'s own provider does the same over token
/// storage (encrypted, shared across processes, one redemption per rotation under faults);
/// this type is for hosts that keep their tokens in memory, and the per-call figures of the
/// `auth_overhead` bench.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), connection_factory::Error> {
/// use connection_factory::{AuthProvider, Refusal, Recovery, RefreshingProvider, RequestKind, Secret, Tokens};
/// use mcp_clock::SharedClock;
/// use std::sync::Arc;
///
/// let provider = RefreshingProvider::new(
///     "acme:alice:github",
///     Tokens::new("at-1", Some(Secret::new("rt-1"))),
///     Arc::new(|_rt: Secret| -> connection_factory::BoxFuture<'static, _> {
///         Box::pin(async { Ok(Tokens::new("at-2", Some(Secret::new("rt-2")))) })
///     }),
///     SharedClock::system(),
/// );
/// let expired = Refusal::new(401, RequestKind::Post, vec!["Bearer error=\"invalid_token\"".into()]);
/// let rejected = Secret::new("at-1");
/// let (a, b) = tokio::join!(
///     provider.on_unauthorized(Some(&rejected), &expired),
///     provider.on_unauthorized(Some(&rejected), &expired),
/// );
/// assert_eq!(a?, Recovery::Retry(Secret::new("at-2")));
/// assert_eq!(b?, Recovery::Retry(Secret::new("at-2")));
/// assert_eq!(provider.refreshes(), 1);
/// # Ok(()) }
/// ```
pub struct RefreshingProvider {
    key: String,
    tokens: Arc<Mutex<Option<Tokens>>>,
    refresh: RefreshFn,
    flights: SingleFlight<String, Flight>,
    options: CallOptions,
    refreshes: Arc<AtomicU64>,
}

impl fmt::Debug for RefreshingProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefreshingProvider")
            .field("key", &self.key)
            .field("tokens", &*self.tokens.lock().unwrap_or_else(PoisonError::into_inner))
            .field("refreshes", &self.refreshes())
            .finish_non_exhaustive()
    }
}

impl RefreshingProvider {
    /// A provider for `key` (tenant, user and server) holding `tokens`, refreshing with
    /// `refresh`. A refresh is told to stop after 10 s and abandoned 1 s later; change that with
    /// [`RefreshingProvider::refresh_deadline`].
    pub fn new(
        key: impl Into<String>,
        tokens: Tokens,
        refresh: RefreshFn,
        clock: SharedClock,
    ) -> Self {
        RefreshingProvider {
            key: key.into(),
            tokens: Arc::new(Mutex::new(Some(tokens))),
            refresh,
            flights: SingleFlight::new(clock),
            options: CallOptions::new(Duration::from_secs(10)).grace(Duration::from_secs(1)),
            refreshes: Arc::default(),
        }
    }

    /// Stop a refresh after `deadline` and abandon it `grace` later.
    pub fn refresh_deadline(mut self, deadline: Duration, grace: Duration) -> Self {
        self.options = CallOptions::new(deadline).grace(grace);
        self
    }

    /// How many times the refresh function was called.
    pub fn refreshes(&self) -> u64 {
        self.refreshes.load(Ordering::SeqCst)
    }

    /// The tokens held now (`None` after the server rejected the refresh token).
    pub fn tokens(&self) -> Option<Tokens> {
        lock(&self.tokens).clone()
    }
}

fn lock(m: &Mutex<Option<Tokens>>) -> std::sync::MutexGuard<'_, Option<Tokens>> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Steps 2 and the "nothing to refresh with" cases: `Err(refresh token)` when a refresh is due.
fn settled(tokens: &Option<Tokens>, rejected: Option<&Secret>) -> Result<Recovery, Secret> {
    match tokens {
        None => Ok(Recovery::AuthorizationRequired),
        Some(t) if Some(&t.access) != rejected => Ok(Recovery::Retry(t.access.clone())),
        Some(Tokens { refresh: None, .. }) => Ok(Recovery::AuthorizationRequired),
        Some(Tokens { refresh: Some(rt), .. }) => Err(rt.clone()),
    }
}

#[async_trait::async_trait]
impl AuthProvider for RefreshingProvider {
    async fn current_token(&self) -> Result<Option<Secret>, Error> {
        let token = lock(&self.tokens).as_ref().map(|t| t.access.clone());
        Ok(token)
    }

    async fn on_unauthorized(
        &self,
        rejected: Option<&Secret>,
        challenge: &Refusal,
    ) -> Result<Recovery, Error> {
        if challenge.is_insufficient_scope() {
            return Ok(Recovery::InsufficientScope);
        }
        if let Ok(done) = settled(&lock(&self.tokens), rejected) {
            return Ok(done);
        }
        let tokens = self.tokens.clone();
        let refresh = self.refresh.clone();
        let refreshes = self.refreshes.clone();
        let rejected = rejected.cloned();
        let flight = self.flights.call(self.key.clone(), self.options, move |_cancel| async move {
            let rt = match settled(&lock(&tokens), rejected.as_ref()) {
                Ok(done) => return Ok(done),
                Err(rt) => rt,
            };
            refreshes.fetch_add(1, Ordering::SeqCst);
            match refresh(rt.clone()).await {
                Ok(mut fresh) => {
                    if fresh.refresh.is_none() {
                        fresh.refresh = Some(rt);
                    }
                    let access = fresh.access.clone();
                    *lock(&tokens) = Some(fresh);
                    tracing::debug!("refreshed after a 401");
                    Ok(Recovery::Retry(access))
                }
                Err(Error::AuthorizationRequired { .. }) => {
                    // Never send a refresh token the server has rejected again.
                    *lock(&tokens) = None;
                    tracing::debug!("refresh rejected; authorization required");
                    Ok(Recovery::AuthorizationRequired)
                }
                Err(other) => Err(other),
            }
        });
        flight.await.map_err(|e| Error::provider("the coalesced refresh did not finish", e))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::challenge::RequestKind;

    fn expired() -> Refusal {
        Refusal::new(401, RequestKind::Post, vec!["Bearer error=\"invalid_token\"".into()])
    }

    fn provider(result: Result<Tokens, Error>) -> RefreshingProvider {
        RefreshingProvider::new(
            "t:u:s",
            Tokens::new("at-1", Some(Secret::new("rt-1"))),
            Arc::new(move |_| {
                let result = result.clone();
                Box::pin(async move { result })
            }),
            SharedClock::system(),
        )
    }

    #[tokio::test]
    async fn a_token_older_than_the_held_one_is_answered_without_a_refresh() {
        let p = provider(Ok(Tokens::new("at-2", None)));
        let first = p.on_unauthorized(Some(&Secret::new("at-1")), &expired()).await.unwrap();
        assert_eq!(first, Recovery::Retry(Secret::new("at-2")));
        // The refresh token was kept, since the response had none.
        assert_eq!(p.tokens().unwrap().refresh, Some(Secret::new("rt-1")));
        // A late 401 for at-1 (sent before the refresh) adopts at-2.
        let late = p.on_unauthorized(Some(&Secret::new("at-1")), &expired()).await.unwrap();
        assert_eq!(late, Recovery::Retry(Secret::new("at-2")));
        assert_eq!(p.refreshes(), 1);
    }

    #[tokio::test]
    async fn insufficient_scope_never_refreshes() {
        let p = provider(Ok(Tokens::new("at-2", None)));
        let forbidden = Refusal::new(
            403,
            RequestKind::Post,
            vec!["Bearer error=\"insufficient_scope\"".into()],
        );
        let r = p.on_unauthorized(Some(&Secret::new("at-1")), &forbidden).await.unwrap();
        assert_eq!(r, Recovery::InsufficientScope);
        assert_eq!(p.refreshes(), 0);
    }

    #[tokio::test]
    async fn a_rejected_refresh_forgets_the_tokens_and_is_not_retried() {
        let p = provider(Err(Error::AuthorizationRequired { www_authenticate: None }));
        let r = p.on_unauthorized(Some(&Secret::new("at-1")), &expired()).await.unwrap();
        assert_eq!(r, Recovery::AuthorizationRequired);
        assert_eq!(p.tokens(), None);
        assert_eq!(p.current_token().await.unwrap(), None);
        let again = p.on_unauthorized(None, &expired()).await.unwrap();
        assert_eq!(again, Recovery::AuthorizationRequired);
        assert_eq!(p.refreshes(), 1);
    }

    #[tokio::test]
    async fn a_transient_failure_keeps_the_tokens_and_reports_an_error() {
        let p = provider(Err(Error::provider_msg("token endpoint down")));
        let r = p.on_unauthorized(Some(&Secret::new("at-1")), &expired()).await;
        assert!(
            matches!(r, Err(Error::Provider { message, .. }) if message == "token endpoint down")
        );
        assert_eq!(p.tokens().unwrap().access, Secret::new("at-1"));
    }

    #[test]
    fn debug_redacts_tokens() {
        let p = provider(Ok(Tokens::new("at-2", None)));
        let shown = format!("{p:?}");
        assert!(!shown.contains("at-1") && !shown.contains("rt-1"), "{shown}");
        assert!(shown.contains("t:u:s"));
    }
}
