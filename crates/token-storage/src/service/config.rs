//! [`TokenStorageConfig`]: the tunables of a [`TokenStorage`].

use super::*;

/// Tunables of a [`TokenStorage`]. Start from [`TokenStorageConfig::default`].
///
/// ```
/// use std::time::Duration;
/// let mut config = token_storage::TokenStorageConfig::default();
/// config.refresh_buffer = Duration::from_secs(120);
/// config.storm_limit = 10;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TokenStorageConfig {
    /// Refresh this long before the access token expires (capped at half its lifetime).
    pub refresh_buffer: Duration,
    /// Plus a random extra of up to this much, so replicas and keys do not refresh in lockstep.
    pub refresh_jitter: Duration,
    /// How far the response's `Date` header may move `expires_at` earlier.
    pub max_date_correction: Duration,
    /// A refresh still running after this long is told to stop (before its next redemption).
    pub refresh_deadline: Duration,
    /// A stopped refresh that has not finished after this much longer is dropped, freeing the key.
    pub refresh_grace: Duration,
    /// How long a caller waits for a refresh before giving up (the refresh goes on); `None`:
    /// until the refresh ends.
    pub caller_deadline: Option<Duration>,
    /// Attempts per refresh when failures are transient.
    pub max_attempts: u32,
    /// Backoff before the second attempt; doubled each time, with jitter.
    pub backoff_base: Duration,
    /// The longest backoff; a `Retry-After` longer than this ends the refresh at once.
    pub backoff_max: Duration,
    /// After a refresh fails transiently, further refreshes of the key fail at once for this
    /// long (or the server's `Retry-After`, if longer) instead of calling the server again.
    pub failure_ttl: Duration,
    /// More than this many token writes for one key within `storm_window` stop with
    /// [`Error::WriteStorm`].
    pub storm_limit: u32,
    /// The storm-brake window.
    pub storm_window: Duration,
}

impl Default for TokenStorageConfig {
    fn default() -> Self {
        TokenStorageConfig {
            refresh_buffer: Duration::from_secs(60),
            refresh_jitter: Duration::from_secs(30),
            max_date_correction: Duration::from_secs(300),
            refresh_deadline: Duration::from_secs(60),
            refresh_grace: Duration::from_secs(10),
            caller_deadline: Some(Duration::from_secs(30)),
            max_attempts: 3,
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(10),
            failure_ttl: Duration::from_secs(10),
            storm_limit: 30,
            storm_window: Duration::from_secs(60),
        }
    }
}
