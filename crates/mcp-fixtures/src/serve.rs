//! Serving a router on a bound loopback listener until shut down, shared by both servers.

use axum::Router;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Serves `router` on `listener` until `shutdown` is cancelled. Accepted sockets get
/// `TCP_NODELAY`: without it the second small write of each SSE response waits for the
/// client's delayed ACK (about 40 ms).
pub(crate) fn spawn(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
    what: &'static str,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let served = axum::serve(
            listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            }),
            router,
        )
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "{what} stopped with an error");
        }
    })
}
