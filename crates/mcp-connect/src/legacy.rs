//! Recognising a server that speaks the legacy HTTP+SSE transport (MCP 2024-11-05): a `GET`
//! that opens an event stream whose first event is `endpoint` (where to POST messages). rmcp has
//! no client for it, and mcp-connect does not speak it (mcp-remote's `--transport sse-only`):
//! such a server gets a clear refusal that names its transport.

use std::time::Duration;

use mcp_clock::SharedClock;

/// How long the check waits for the stream's first event.
const WAIT: Duration = Duration::from_secs(3);

/// Whether `url` answers a `GET` with an event stream that announces an `endpoint`.
pub(crate) async fn speaks_legacy_sse(clock: &SharedClock, url: &url::Url) -> bool {
    let Ok(http) =
        reqwest::Client::builder().no_proxy().redirect(reqwest::redirect::Policy::none()).build()
    else {
        return false;
    };
    let check = async {
        let mut response = http
            .get(url.clone())
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .send()
            .await
            .ok()?;
        let is_stream = response.status().is_success()
            && response
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("text/event-stream"));
        if !is_stream {
            return Some(false);
        }
        let mut seen = Vec::new();
        while seen.len() < 4096 {
            let chunk = response.chunk().await.ok()??;
            seen.extend_from_slice(&chunk);
            let text = String::from_utf8_lossy(&seen);
            if text.contains("\n\n") || text.contains("\r\n\r\n") {
                return Some(
                    text.lines()
                        .any(|l| l.trim() == "event: endpoint" || l.trim() == "event:endpoint"),
                );
            }
        }
        Some(false)
    };
    mcp_clock::within(clock, WAIT, check).await.flatten().unwrap_or(false)
}
