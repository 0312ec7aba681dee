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
    /// A configuration whose records live `ttl` after each write, and whose waits, handler
    /// deadline and stale window all default to `ttl` as well.
    pub fn new(ttl: Duration) -> Self {
        FlowTypeConfig {
            ttl,
            completed_ttl: ttl,
            wait_timeout: ttl,
            stale_after: ttl,
            handler_timeout: ttl,
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
    /// started). Also sets the stale window and the handler deadline when they were longer.
    pub fn wait_timeout(mut self, timeout: Duration) -> Self {
        self.wait_timeout = timeout;
        self.stale_after = self.stale_after.min(timeout);
        self.handler_timeout = self.handler_timeout.min(timeout);
        self
    }

    /// A PENDING flow older than this is stale: [`crate::FlowManager::init`] may replace it and
    /// [`crate::FlowManager::run`] takes it over (its owner is presumed dead).
    pub fn stale_after(mut self, window: Duration) -> Self {
        self.stale_after = window;
        self
    }

    /// How long a [`crate::FlowManager::run`] handler may run before it is dropped and its flow
    /// recorded FAILED with kind [`crate::FlowError::TIMEOUT`]. Must not exceed the stale
    /// window, or a live handler could be taken over.
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
        if self.handler_timeout > self.stale_after {
            return Err(Error::InvalidConfig(format!(
                "{name}: handler_timeout exceeds stale_after, so a live handler could be taken over"
            )));
        }
        Ok(())
    }
}
