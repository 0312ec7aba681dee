//! `proxy`: newline-delimited JSON-RPC on stdin/stdout (what desktop hosts speak to a local
//! MCP server) pumped to and from rmcp's streamable-HTTP client transport over
//! connection-factory's [`AuthHttpClient`], so every request carries the current token and a
//! 401 is answered with a silent refresh.
//!
//! A request refused for want of authorization is held through one new login and sent again
//! (the host's `initialize` too, on a new transport: rmcp's dies with its first request); a
//! request the transport cannot deliver otherwise (the session is gone, the login failed) is
//! answered to the host with a JSON-RPC error naming the cause, so the host never waits for a
//! response that will not come.

use connection_factory::AuthHttpClient;
use rmcp::RoleClient;
use rmcp::model::{ClientJsonRpcMessage, ServerJsonRpcMessage};
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::{StreamableHttpClientTransport, Transport};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::sync::mpsc;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};

use crate::client::{Client, Target};
use crate::error::Error;
use crate::login::LoginOptions;
use crate::store::chain;

/// How long closing the session (its DELETE) and flushing stdout may take at the end.
const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// JSON-RPC "internal error".
const INTERNAL_ERROR: i64 = -32603;
/// JSON-RPC "parse error".
const PARSE_ERROR: i64 = -32700;
/// JSON-RPC "invalid params" (a call of a tool hidden by `--ignore-tool`).
const INVALID_PARAMS: i64 = -32602;

enum Event {
    /// SIGTERM or SIGINT: hosts stop their servers with a signal more often than by closing
    /// stdin. The proxy ends as if stdin had closed, so the exit settles refreshes in flight.
    Stop,
    FromHost(std::io::Result<Option<String>>),
    FromServer(Option<Box<ServerJsonRpcMessage>>),
    /// A message refused for want of authorization, to send again now that a new login
    /// completed (once: it is not held a second time).
    Resend(Box<ClientJsonRpcMessage>),
}

/// Pump messages until the host closes stdin (Ok) or the server side ends (an error).
///
/// When a request is refused because the authorization is gone for good (the refresh was
/// refused too), a new login starts in the background under the login lock (one at a time; a
/// peer's fresh login is used without a prompt), and the request is held until it completes,
/// then sent again (the server refused it, so it did not run) and answered as if nothing had
/// happened. Only when the login fails (or the browser step times out) does the host get a
/// JSON-RPC error for it.
pub(crate) async fn run(
    client: &Client,
    target: &Target,
    options: &LoginOptions,
) -> Result<(), Error> {
    let relogin = Arc::new(ReloginState::default());
    let (resend_tx, mut resend_rx) = mpsc::channel::<ClientJsonRpcMessage>(64);
    let mut transport = open_transport(client, target)?;
    // rmcp's transport dies with its first request when that fails (the host's `initialize`
    // refused for want of authorization, on tokens revoked while the host was closed): until
    // the session is established, a dead transport is replaced by a new one for the next
    // message (the `initialize` sent again after the new login, or the host's own retry)
    // instead of ending the proxy.
    let (mut established, mut dead) = (false, false);

    let (out_tx, mut out_rx) = mpsc::channel::<String>(64);
    let writer = tokio::spawn(async move {
        let mut stdout = tokio::io::stdout();
        while let Some(line) = out_rx.recv().await {
            let written = async {
                stdout.write_all(line.as_bytes()).await?;
                stdout.write_all(b"\n").await?;
                stdout.flush().await
            };
            if written.await.is_err() {
                break;
            }
        }
    });
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let server = target.as_str().to_owned();
    let stop = stop_signal();
    tokio::pin!(stop);
    let outcome = loop {
        let event = tokio::select! {
            () = &mut stop => Event::Stop,
            line = lines.next_line() => Event::FromHost(line),
            message = Transport::<RoleClient>::receive(&mut transport), if !dead => Event::FromServer(message.map(Box::new)),
            Some(message) = resend_rx.recv() => Event::Resend(Box::new(message)),
        };
        match event {
            Event::FromHost(Ok(None)) => break Ok(()),
            // Bytes that are not UTF-8 are a broken host, not the end of its input.
            Event::FromHost(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
                break Err(Error::Usage(
                    "the host wrote bytes to stdin that are not UTF-8; JSON-RPC over stdio is UTF-8 text".into(),
                ));
            }
            Event::FromHost(Err(e)) => {
                break Err(Error::Mcp(format!("cannot read stdin: {e}")));
            }
            Event::Stop => {
                tracing::info!("stopped by a signal");
                break Ok(());
            }
            Event::FromHost(Ok(Some(line))) if line.trim().is_empty() => {}
            Event::FromHost(Ok(Some(line))) => {
                if let Some((id, tool)) = hidden_call(client, &line) {
                    let message = format!("the tool {tool:?} is hidden by --ignore-tool");
                    let _ = out_tx.send(error_response(id, INVALID_PARAMS, &message)).await;
                    continue;
                }
                match serde_json::from_str::<ClientJsonRpcMessage>(&line) {
                    Ok(message) => {
                        let id = match &message {
                            ClientJsonRpcMessage::Request(request) => {
                                serde_json::to_value(&request.id).ok()
                            }
                            _ => None,
                        };
                        let held = message.clone();
                        if dead {
                            transport = open_transport(client, target)?;
                            dead = false;
                        }
                        let sent = enqueue(transport.send(message));
                        let relogin = Relogin {
                            state: relogin.clone(),
                            client: client.clone(),
                            target: target.clone(),
                            options: options.clone(),
                            resend: Some((held, resend_tx.clone())),
                        };
                        tokio::spawn(deliver(sent, id, out_tx.clone(), relogin));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the host sent a line that is not a JSON-RPC message");
                        let id = serde_json::from_str::<serde_json::Value>(&line)
                            .ok()
                            .and_then(|v| v.get("id").cloned())
                            .unwrap_or(serde_json::Value::Null);
                        let _ = out_tx
                            .send(error_response(id, PARSE_ERROR, "not a JSON-RPC message"))
                            .await;
                    }
                }
            }
            Event::FromServer(Some(message)) => {
                // The first server message is the answer to `initialize`.
                established = true;
                match to_host(client, &message) {
                    Ok(line) => {
                        if out_tx.send(line).await.is_err() {
                            break Ok(());
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "a server message could not be encoded"),
                }
            }
            Event::Resend(message) => {
                let id = match message.as_ref() {
                    ClientJsonRpcMessage::Request(request) => {
                        serde_json::to_value(&request.id).ok()
                    }
                    _ => None,
                };
                if dead {
                    transport = open_transport(client, target)?;
                    dead = false;
                }
                let sent = enqueue(transport.send(*message));
                let relogin = Relogin {
                    state: relogin.clone(),
                    client: client.clone(),
                    target: target.clone(),
                    options: options.clone(),
                    resend: None,
                };
                tokio::spawn(deliver(sent, id, out_tx.clone(), relogin));
            }
            Event::FromServer(None) if !established => {
                tracing::info!(
                    "the transport ended before the session was established; a new one carries the next message"
                );
                dead = true;
            }
            Event::FromServer(None) => {
                break Err(Error::Mcp(format!("the MCP session with {server} ended")));
            }
        }
    };
    // rmcp's worker waits for `notifications/initialized` without watching for cancellation, so
    // closing a session the host stopped right after `initialize` would never end: bound it.
    let clock = client.clock().clone();
    let closed =
        mcp_clock::within(&clock, CLOSE_TIMEOUT, Transport::<RoleClient>::close(&mut transport));
    if closed.await.is_none() {
        tracing::debug!("the MCP session did not close in time; dropping it");
    }
    drop(transport);
    drop(out_tx);
    let _ = mcp_clock::within(&clock, CLOSE_TIMEOUT, writer).await;
    outcome
}

/// rmcp's streamable-HTTP client transport to `target` over connection-factory's
/// [`AuthHttpClient`] (the client's token provider, headers and proxy settings).
fn open_transport(
    client: &Client,
    target: &Target,
) -> Result<StreamableHttpClientTransport<AuthHttpClient>, Error> {
    let provider = client.provider(target)?;
    let http = if client.options().uses_env_proxy() {
        AuthHttpClient::with_env_proxy(provider)
    } else {
        AuthHttpClient::new(provider)
    };
    let http =
        http.map_err(|e| Error::Mcp(format!("cannot build the HTTP client: {}", chain(&e))))?;
    let config = StreamableHttpClientTransportConfig::with_uri(target.as_str().to_owned())
        .custom_headers(client.header_map()?);
    Ok(StreamableHttpClientTransport::with_client(http, config))
}

/// The id and tool name of a host's `tools/call` of a tool hidden by `--ignore-tool` (remembers
/// `tools/list` requests, whose answers [`to_host`] filters).
fn hidden_call(client: &Client, line: &str) -> Option<(serde_json::Value, String)> {
    let filter = client.tool_filter();
    if filter.is_empty() {
        return None;
    }
    let message: serde_json::Value = serde_json::from_str(line).ok()?;
    let tool = filter.inspect_host_message(&message)?;
    Some((message.get("id").cloned().unwrap_or(serde_json::Value::Null), tool))
}

/// A server message as the host gets it: a `tools/list` answer without hidden tools.
fn to_host(client: &Client, message: &ServerJsonRpcMessage) -> serde_json::Result<String> {
    let filter = client.tool_filter();
    if filter.is_empty() {
        return serde_json::to_string(message);
    }
    let mut value = serde_json::to_value(message)?;
    filter.filter_server_message(&mut value);
    serde_json::to_string(&value)
}

/// Resolves on SIGTERM or SIGINT (never, if the handlers cannot be installed).
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => std::future::pending().await,
        }
    }
    #[cfg(not(unix))]
    {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

type Sending<E> = Pin<Box<dyn Future<Output = Result<(), E>> + Send>>;

/// Put a message on the transport's queue now, in the order the host sent it.
///
/// rmcp's send future queues its message only when first polled, and the worker takes the
/// message after `initialize` for the `initialized` notification: spawned unpolled, a request
/// sent right behind the notification could overtake it and end the session. One poll here
/// queues the message (the queue is FIFO); the rest (waiting for the POST) runs in a task.
fn enqueue<E: Send + 'static>(
    send: impl Future<Output = Result<(), E>> + Send + 'static,
) -> Sending<E> {
    let mut send: Sending<E> = Box::pin(send);
    match send.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(result) => Box::pin(std::future::ready(result)),
        Poll::Pending => send,
    }
}

/// The proxy's new logins: whether one runs, and how the last one ended.
#[derive(Debug)]
struct ReloginState {
    busy: AtomicBool,
    /// How many logins ended, and whether the last one succeeded.
    ended: tokio::sync::watch::Sender<(u64, bool)>,
}

impl Default for ReloginState {
    fn default() -> Self {
        ReloginState {
            busy: AtomicBool::new(false),
            ended: tokio::sync::watch::channel((0, false)).0,
        }
    }
}

/// What a failed delivery needs to start a new login and send the message again after it.
struct Relogin {
    state: Arc<ReloginState>,
    client: Client,
    target: Target,
    options: LoginOptions,
    /// The message and where to send it again; `None` once it was sent again.
    resend: Option<(ClientJsonRpcMessage, mpsc::Sender<ClientJsonRpcMessage>)>,
}

impl Relogin {
    /// Start a new login unless one runs; wait (bounded by the browser step's limit) until one
    /// ends. Whether it succeeded.
    async fn wait_for_login(&self) -> bool {
        let mut ended = self.state.ended.subscribe();
        let seen = ended.borrow_and_update().0;
        if !self.state.busy.swap(true, Ordering::SeqCst) {
            let (state, client, target, options) = (
                self.state.clone(),
                self.client.clone(),
                self.target.clone(),
                self.options.clone(),
            );
            tokio::spawn(async move {
                let ok = match client.relogin(&target, &options).await {
                    Ok(()) => true,
                    Err(e) => {
                        eprintln!("mcp-connect: the new login failed: {e}");
                        false
                    }
                };
                state.busy.store(false, Ordering::SeqCst);
                state.ended.send_modify(|(count, last)| {
                    *count += 1;
                    *last = ok;
                });
            });
        }
        let limit = self.options.timeout + LOGIN_SLACK;
        let changed = async {
            loop {
                if ended.changed().await.is_err() {
                    return false;
                }
                let (count, ok) = *ended.borrow_and_update();
                if count != seen {
                    return ok;
                }
            }
        };
        mcp_clock::within(self.client.clock(), limit, changed).await.unwrap_or(false)
    }
}

/// How much longer than the browser step a held request waits for the new login (the login
/// lock may first wait for a peer's).
const LOGIN_SLACK: std::time::Duration = std::time::Duration::from_secs(30);

/// Wait for one message to be delivered. When it was refused for want of authorization, hold
/// it until a new login ends (starting one, one at a time) and send it again once; otherwise,
/// or when the login fails, answer the host's request with an error.
async fn deliver<E: std::error::Error + 'static>(
    sent: Sending<E>,
    id: Option<serde_json::Value>,
    out: mpsc::Sender<String>,
    mut relogin: Relogin,
) {
    let Err(e) = sent.await else { return };
    let cause = chain(&e);
    let refused = is_auth_failure(&e);
    let server = relogin.target.as_str().to_owned();
    tracing::warn!(error = %cause, "the request could not be delivered");
    // Refused again right after a new login: the server does not take fresh tokens either;
    // another prompt would not help, so the host gets the error.
    if refused
        && let Some((message, again)) = relogin.resend.take()
        && relogin.wait_for_login().await
        && again.send(message).await.is_ok()
    {
        return;
    }
    if let Some(id) = id {
        let _ =
            out.send(error_response(id, INTERNAL_ERROR, &describe(&server, &cause, refused))).await;
    }
}

/// Whether a send failed for want of authorization: a 401 the provider could not recover
/// from (a new login is needed), found typed in the transport error.
fn is_auth_failure(e: &(dyn std::error::Error + 'static)) -> bool {
    connection_factory::Error::from_transport(e)
        .is_some_and(|e| e.kind() == connection_factory::ErrorKind::AuthorizationRequired)
}

fn describe(server: &str, cause: &str, refused: bool) -> String {
    if refused {
        format!(
            "mcp-connect: not authorized for {server}: complete the browser step mcp-connect started (or run `mcp-connect login {server}`), then retry ({cause})"
        )
    } else {
        format!("mcp-connect: the request could not be delivered to {server}: {cause}")
    }
}

fn error_response(id: serde_json::Value, code: i64, message: &str) -> String {
    serde_json::json!({
        "jsonrpc": "2.0",
        "id": id,
        "error": { "code": code, "message": message },
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmcp::transport::streamable_http_client::{AuthRequiredError, StreamableHttpError};

    /// A send is held for a new login only when the transport error carries a refusal the
    /// provider could not recover from (typed), not when its text happens to say so.
    #[test]
    fn only_a_typed_refusal_is_an_auth_failure() {
        let refused: StreamableHttpError<std::io::Error> =
            StreamableHttpError::AuthRequired(AuthRequiredError::new("Bearer".into()));
        assert!(is_auth_failure(&refused));
        let text: StreamableHttpError<std::io::Error> =
            StreamableHttpError::UnexpectedServerResponse(
                "authorization required: Auth required".into(),
            );
        assert!(!is_auth_failure(&text));
        let closed: StreamableHttpError<std::io::Error> =
            StreamableHttpError::TransportChannelClosed;
        assert!(!is_auth_failure(&closed));
    }
}
