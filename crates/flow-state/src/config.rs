//! Per-flow-type configuration.

use std::time::Duration;

use crate::Error;

/// The longest TTL or timeout the manager accepts; anything longer is a mistake.
pub(crate) const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 60 * 60);

/// How flows of one type live, wait and are reused.
///
/// ```
/// use flow_state::FlowTypeConfig;
/// use std::time::Duration;
///
/// // Interactive OAuth: wait up to 10 minutes for the browser, keep failures for status pages.
/// let oauth = FlowTypeConfig::new(Duration::from_secs(15 * 60))
///     .wait_timeout(Duration::from_secs(10 * 60))
///     .keep_failures(true);
/// # let _ = oauth;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowTypeConfig {
    pub(crate) ttl: Duration,
    pub(crate) completed_ttl: Duration,
    pub(crate) wait_timeout: Duration,
    pub(crate) stale_after: Duration,
    pub(crate) handler_timeout: Duration,
    pub(crate) reuse_completed: bool,
    pub(crate) keep_failures: bool,
}

impl Default for FlowTypeConfig {
    /// LibreChat's MCP values: records live 15 minutes, waits and handlers get 10.
    fn default() -> Self {
        FlowTypeConfig::new(Duration::from_secs(15 * 60)).wait_timeout(Duration::from_secs(10 * 60))
    }
}

impl FlowTypeConfig {
    /// A configuration whose records live `ttl` after each write, whose waits and stale window
    /// default to `ttl` as well, and whose handler deadline defaults to the stale window less
    /// its margin (see [`FlowTypeConfig::handler_timeout`]).
    pub fn new(ttl: Duration) -> Self {
        FlowTypeConfig {
            ttl,
            completed_ttl: ttl,
            wait_timeout: ttl,
            stale_after: ttl,
            handler_timeout: ttl - margin(ttl),
            reuse_completed: true,
            keep_failures: false,
        }
    }

    /// How long a COMPLETED record lives (default: the TTL). With
    /// [`FlowTypeConfig::reuse_completed`] this is how long a result is served as a cache.
    pub fn completed_ttl(mut self, ttl: Duration) -> Self {
        self.completed_ttl = ttl;
        self
    }

    /// How long waiters wait, measured from the flow's creation (not from when each waiter
    /// started). Also sets the stale window when it was longer, and the handler deadline when
    /// it was longer than the new stale window less its margin.
    pub fn wait_timeout(mut self, timeout: Duration) -> Self {
        self.wait_timeout = timeout;
        self.stale_after = self.stale_after.min(timeout);
        self.handler_timeout =
            self.handler_timeout.min(self.stale_after - margin(self.stale_after));
        self
    }

    /// A PENDING flow older than this is stale: [`crate::FlowManager::init`] may replace it and
    /// [`crate::FlowManager::run`] takes it over (its owner is presumed dead).
    pub fn stale_after(mut self, window: Duration) -> Self {
        self.stale_after = window;
        self
    }

    /// How long a [`crate::FlowManager::run`] handler may run before it is dropped and its flow
    /// recorded FAILED with kind [`crate::FlowError::TIMEOUT`]. Must end before the stale
    /// window by a margin (a tenth of the window, at most 5 s), or a live handler could be taken
    /// over while it records its result; the manager's builder refuses it otherwise.
    pub fn handler_timeout(mut self, timeout: Duration) -> Self {
        self.handler_timeout = timeout;
        self
    }

    /// Whether [`crate::FlowManager::run`] serves a COMPLETED result as a cache until its TTL
    /// (default true). When false, every call after a settled run starts a new run.
    pub fn reuse_completed(mut self, reuse: bool) -> Self {
        self.reuse_completed = reuse;
        self
    }

    /// Whether a FAILED flow is kept and served to later callers until its TTL (default false:
    /// a waiter that sees the failure deletes it, and the next run starts afresh).
    pub fn keep_failures(mut self, keep: bool) -> Self {
        self.keep_failures = keep;
        self
    }

    /// How long a record with `status` lives after it is written.
    pub(crate) fn ttl_for(&self, status: crate::FlowStatus) -> Duration {
        if status == crate::FlowStatus::Completed { self.completed_ttl } else { self.ttl }
    }

    pub(crate) fn validate(&self, name: &str) -> Result<(), Error> {
        let check = |what: &str, d: Duration| {
            if d.is_zero() {
                Err(Error::InvalidConfig(format!("{name}: {what} is zero")))
            } else if d > MAX_DURATION {
                Err(Error::InvalidConfig(format!(
                    "{name}: {what} of {}s is longer than the 30-day limit",
                    d.as_secs()
                )))
            } else {
                Ok(())
            }
        };
        check("ttl", self.ttl)?;
        check("completed_ttl", self.completed_ttl)?;
        check("wait_timeout", self.wait_timeout)?;
        check("stale_after", self.stale_after)?;
        check("handler_timeout", self.handler_timeout)?;
        if self.wait_timeout > self.ttl {
            return Err(Error::InvalidConfig(format!(
                "{name}: wait_timeout exceeds ttl, so flows would expire under their waiters"
            )));
        }
        if self.stale_after > self.ttl {
            return Err(Error::InvalidConfig(format!(
                "{name}: stale_after exceeds ttl, so a PENDING record would expire before it is stale"
            )));
        }
        let margin = margin(self.stale_after);
        if self.handler_timeout + margin > self.stale_after {
            return Err(Error::InvalidConfig(format!(
                "{name}: handler_timeout of {:?} does not end {margin:?} before stale_after of {:?}, \
                 so a live handler could be taken over",
                self.handler_timeout, self.stale_after
            )));
        }
        Ok(())
    }
}

/// How long before the stale window a handler's deadline must fall: a tenth of the window,
/// at most 5 s (time to record the result, and clock skew between processes).
pub(crate) fn margin(stale_after: Duration) -> Duration {
    (stale_after / 10).min(Duration::from_secs(5))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Race: a handler whose deadline is its record's stale window (or later) is still running,
    /// or still writing its result, when another process finds the record stale and takes it
    /// over: two handlers for one flow. And a stale window past the TTL lets the record expire
    /// first, so a new flow starts beside a live one. Both are refused when the manager is
    /// built.
    #[test]
    fn a_handler_deadline_at_the_stale_window_is_refused() {
        let s = Duration::from_secs;
        let bad = [
            FlowTypeConfig::new(s(60)).handler_timeout(s(60)),
            FlowTypeConfig::new(s(60)).handler_timeout(s(58)),
            FlowTypeConfig::new(s(60)).stale_after(s(10)).handler_timeout(s(10)),
            FlowTypeConfig::new(s(60)).stale_after(s(61)),
            FlowTypeConfig::new(s(60)).stale_after(s(120)).handler_timeout(s(30)),
        ];
        for config in bad {
            let e = config.validate("t").unwrap_err();
            assert!(matches!(e, Error::InvalidConfig(_)), "{config:?}");
        }
        for good in [
            FlowTypeConfig::new(s(60)),
            FlowTypeConfig::default(),
            FlowTypeConfig::new(s(60)).wait_timeout(s(10)),
            FlowTypeConfig::new(s(60)).stale_after(s(10)).handler_timeout(s(9)),
            FlowTypeConfig::new(Duration::from_millis(10)),
        ] {
            good.validate("t").unwrap_or_else(|e| panic!("{good:?}: {e}"));
        }
    }
}
