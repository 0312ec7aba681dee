//! The event log behind `mcp-connect why`: what happened to each server's credentials, kept in
//! the store directory (`events.log`, one JSON object per line, mode 0600) by every process that
//! uses it.
//!
//! Recorded: completed browser logins and the client registrations they made, every refresh
//! request with its outcome (rotated, refused with the server's code, unavailable, no answer so
//! the token is in doubt) and the process that sent it, the reason a command needed a new login,
//! re-logins started by a proxy, and logouts with their revocation. Never a token, a refresh
//! token, a client secret or a header value: an event holds a kind, a short text built from
//! error codes and messages that carry no secret by contract, the process id and the time.
//!
//! Appends are single `write` calls on a file opened with `O_APPEND`, so lines of processes
//! writing at once do not interleave. Past [`MAX_BYTES`] the older half is dropped.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;

use mcp_clock::{Clock as _, SharedClock};
use serde::{Deserialize, Serialize};
use token_storage::{
    RefreshError, RefreshRequest, Refresher, TokenKey, TokenResponse, TransientKind,
};

/// The size past which the log drops its older half.
pub(crate) const MAX_BYTES: u64 = 1 << 20;

/// One thing that happened to a server's credentials.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Event {
    /// When (Unix seconds).
    pub at: u64,
    /// The token key (`tenant/user/server`).
    pub key: String,
    /// The process that did it.
    pub pid: u32,
    /// `login`, `registration`, `refresh`, `login-needed`, `relogin` or `logout`.
    pub kind: String,
    /// What happened, without secrets.
    pub detail: String,
}

/// The store's event log.
#[derive(Debug, Clone)]
pub(crate) struct EventLog {
    path: PathBuf,
    clock: SharedClock,
}

impl EventLog {
    pub(crate) fn new(path: PathBuf, clock: SharedClock) -> Self {
        EventLog { path, clock }
    }

    /// Append an event. A log that cannot be written is reported at debug level and otherwise
    /// ignored: the log explains, it never decides.
    pub(crate) fn record(&self, key: &TokenKey, kind: &str, detail: impl Into<String>) {
        let event = Event {
            at: self.clock.now().as_secs(),
            key: key.to_string(),
            pid: std::process::id(),
            kind: kind.to_owned(),
            detail: detail.into(),
        };
        if let Err(e) = self.append(&event) {
            tracing::debug!(error = %e, "the event log could not be written");
        }
    }

    fn append(&self, event: &Event) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(event).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut options = std::fs::OpenOptions::new();
        options.create(true).append(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&self.path)?;
        file.write_all(&line)?;
        if file.metadata()?.len() > MAX_BYTES {
            self.drop_older_half()?;
        }
        Ok(())
    }

    /// Keep the newer half of the lines (written to a temporary file, then renamed over).
    fn drop_older_half(&self) -> std::io::Result<()> {
        let text = std::fs::read_to_string(&self.path)?;
        let lines: Vec<&str> = text.lines().collect();
        let kept = lines[lines.len() / 2..].join("\n") + "\n";
        let tmp = self.path.with_extension(format!("tmp{}", std::process::id()));
        let mut options = std::fs::OpenOptions::new();
        options.create(true).write(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        options.open(&tmp)?.write_all(kept.as_bytes())?;
        std::fs::rename(&tmp, &self.path)
    }

    /// The events of `key`, newest first (lines that do not parse are skipped).
    pub(crate) fn of(&self, key: &TokenKey) -> Vec<Event> {
        let wanted = key.to_string();
        let Ok(text) = std::fs::read_to_string(&self.path) else { return Vec::new() };
        let mut events: Vec<Event> = text
            .lines()
            .filter_map(|line| serde_json::from_str::<Event>(line).ok())
            .filter(|event| event.key == wanted)
            .collect();
        events.reverse();
        events
    }
}

/// A [`Refresher`] that records each refresh request it sends, with its outcome.
#[derive(Debug)]
pub(crate) struct RecordingRefresher {
    inner: Arc<dyn Refresher>,
    log: EventLog,
}

impl RecordingRefresher {
    pub(crate) fn new(inner: Arc<dyn Refresher>, log: EventLog) -> Self {
        RecordingRefresher { inner, log }
    }
}

#[async_trait::async_trait]
impl Refresher for RecordingRefresher {
    async fn refresh(
        &self,
        key: &TokenKey,
        request: &RefreshRequest,
    ) -> Result<TokenResponse, RefreshError> {
        let outcome = self.inner.refresh(key, request).await;
        self.log.record(key, "refresh", describe(&outcome));
        outcome
    }
}

/// A refresh outcome in words (codes and secret-free messages only).
fn describe(outcome: &Result<TokenResponse, RefreshError>) -> String {
    match outcome {
        Ok(response) => {
            let rotated = if response.refresh_token.is_some() {
                "a new refresh token"
            } else {
                "the same refresh token"
            };
            match response.expires_in {
                Some(life) => format!(
                    "ok: a new access token for {}s, {rotated} (sent by this process)",
                    life.as_secs()
                ),
                None => format!("ok: a new access token, {rotated} (sent by this process)"),
            }
        }
        Err(RefreshError::Terminal { code, description }) => format!(
            "refused by the authorization server ({code}{}): a new login is needed",
            description.as_deref().map(|d| format!(": {d}")).unwrap_or_default()
        ),
        Err(e @ RefreshError::Transient { kind, message, .. }) => {
            let doubt = if e.may_have_acted() {
                "; the server may have rotated the token (in doubt)"
            } else {
                ""
            };
            let what = match kind {
                TransientKind::Unanswered => "no answer",
                _ => "unavailable for now",
            };
            format!("{what}: {message}{doubt}")
        }
        Err(other) => format!("failed: {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_kept_per_key_newest_first_and_the_log_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let clock = mcp_clock::ManualClock::new(mcp_clock::Timestamp::from_secs(1_000));
        let log = EventLog::new(dir.path().join("events.log"), clock.shared());
        let a = TokenKey::new("t", "u", "https://a.example/mcp");
        let b = TokenKey::new("t", "u", "https://b.example/mcp");
        log.record(&a, "login", "first");
        clock.advance(std::time::Duration::from_secs(5));
        log.record(&b, "login", "other server");
        log.record(&a, "refresh", "second");
        let events = log.of(&a);
        assert_eq!(
            events.iter().map(|e| e.detail.as_str()).collect::<Vec<_>>(),
            ["second", "first"]
        );
        assert_eq!((events[0].at, events[1].at), (1_005, 1_000));
        assert_eq!(events[0].pid, std::process::id());

        let long = "x".repeat(4096);
        for _ in 0..(MAX_BYTES / 4096 + 10) {
            log.record(&b, "refresh", long.clone());
        }
        let size = std::fs::metadata(dir.path().join("events.log")).unwrap().len();
        assert!(size <= MAX_BYTES, "{size}");
        assert!(!log.of(&b).is_empty());
    }
}
