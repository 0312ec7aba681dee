//! The refresh outcome counters, and the step-ups made so far.

use super::*;

/// Counts of silent-refresh outcomes, summed over every provider of a [`ConnectionFactory`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RefreshCounters {
    /// 401s whose force-refresh this process led (one per refresh redemption, unless a led
    /// refresh ran out of its budget and a later 401 led again: token storage still redeems
    /// once per key).
    pub refreshed: u64,
    /// 401s that joined a refresh another caller of this process was leading.
    pub coalesced: u64,
    /// 401s answered with a token a peer had already stored (no refresh needed).
    pub adopted: u64,
    /// Refreshes the authorization server refused for good (authorization required).
    pub rejected: u64,
    /// Refreshes that failed in a way that may pass.
    pub transient: u64,
    /// Refreshes that did not finish within the budget.
    pub timed_out: u64,
    /// 403 / `insufficient_scope` refusals (no refresh tried).
    pub insufficient_scope: u64,
}

#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) refreshed: AtomicU64,
    pub(super) coalesced: AtomicU64,
    pub(super) adopted: AtomicU64,
    pub(super) rejected: AtomicU64,
    pub(super) transient: AtomicU64,
    pub(super) timed_out: AtomicU64,
    pub(super) insufficient_scope: AtomicU64,
}

impl Counters {
    pub(super) fn snapshot(&self) -> RefreshCounters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RefreshCounters {
            refreshed: get(&self.refreshed),
            coalesced: get(&self.coalesced),
            adopted: get(&self.adopted),
            rejected: get(&self.rejected),
            transient: get(&self.transient),
            timed_out: get(&self.timed_out),
            insufficient_scope: get(&self.insufficient_scope),
        }
    }
}

pub(super) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// The step-ups made so far: for each token key and scope set, the access token the step-up
/// authorization produced. A 403 for the same scope set refusing that very token means the
/// authorization server did not grant the scope: a second prompt would loop.
#[derive(Debug, Default)]
pub(super) struct StepUps(Mutex<HashMap<(TokenKey, String), Secret>>);

impl StepUps {
    pub(super) fn produced(&self, key: &TokenKey, scopes: &str) -> Option<Secret> {
        let map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(&(key.clone(), scopes.to_owned())).cloned()
    }

    pub(super) fn record(&self, key: &TokenKey, scopes: &str, token: Secret) {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        map.insert((key.clone(), scopes.to_owned()), token);
    }
}
