//! Observability: the spans a host can filter on. Its own test binary: a thread-local
//! subscriber only sees every callsite reliably when no other test runs beside it.

use crate::common;

use std::sync::Arc;

use common::{args, setup, text};
use connection_factory::HookDecision;

/// A `tracing` writer that keeps what it is given.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Observability: an interactive authorization is traced as spans a host can filter on:
/// `mcp_interactive`, with `mcp_discovery` and `mcp_registration` inside it (the OAuth
/// client's HTTP events carry them), and no token appears in the log.
#[tokio::test]
async fn discovery_registration_and_the_interactive_flow_are_traced_as_spans() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let s = setup(HookDecision::Wait).await;
    let conn = s.factory.connect(s.config("tenant-a")).await.unwrap();
    assert_eq!(text(&conn.call_tool("echo", args("hi")).await.unwrap()), "hi");
    let stored = s.factory.storage().tokens(&s.config("tenant-a").token_key()).await.unwrap();
    let stored = stored.expect("tokens stored by the callback");

    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    for span in ["mcp_interactive{", "mcp_discovery{", "mcp_registration{"] {
        assert!(log.contains(span), "no {span} span in the log:\n{log}");
    }
    assert!(!log.contains(stored.access_token().expose()), "an access token was logged");
    if let Some(refresh) = stored.refresh_token() {
        assert!(!log.contains(refresh.expose()), "a refresh token was logged");
    }
}
