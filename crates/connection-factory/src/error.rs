//! The crate's one error type.

use std::error::Error as StdError;
use std::sync::Arc;
use std::time::Duration;

/// Why an auth provider, the auth layer or a [`Connection`](crate::Connection) failed.
///
/// Cheap to clone (sources are shared), so one refresh outcome can be handed to every request
/// that waited on it. Third-party errors are reachable through [`std::error::Error::source`].
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The server refused the credentials and the provider could not recover silently: a new
    /// authorization is needed.
    #[error(
        "authorization required: the server refused the credentials and silent recovery was not possible"
    )]
    AuthorizationRequired {
        /// The `WWW-Authenticate` value of the refusal, when there was one.
        www_authenticate: Option<String>,
    },
    /// The token lacks a scope the server wants (403 `insufficient_scope`); a refresh cannot help.
    #[error("insufficient scope{}", scope.as_deref().map(|s| format!(": the server wants {s:?}")).unwrap_or_default())]
    InsufficientScope {
        /// The scope the server asked for, if it said.
        scope: Option<String>,
        /// The `WWW-Authenticate` value of the refusal.
        www_authenticate: String,
    },
    /// The auth provider failed for a reason that may pass (token endpoint down, store error).
    #[error("the auth provider failed: {message}")]
    Provider {
        /// What the provider was doing.
        message: String,
        /// The underlying error, if any.
        #[source]
        source: Option<Arc<dyn StdError + Send + Sync>>,
    },
    /// A store (the token storage or the flow store) could not be read or written. Nothing was
    /// decided on the strength of it: a failed read is not taken as "nothing stored", so no
    /// client is registered again and no authorization is started. Retrying later may help.
    #[error("store failure while {message}")]
    Store {
        /// What the provider was doing.
        message: String,
        /// The store's own error.
        #[source]
        source: Arc<dyn StdError + Send + Sync>,
    },
    /// The HTTP transport or the MCP session failed.
    #[error("MCP transport error")]
    Transport(#[source] Arc<dyn StdError + Send + Sync>),
    /// An operation did not finish in time.
    #[error("{operation} timed out after {after:?}")]
    Timeout {
        /// What timed out: `connect`, `list_tools`, `call_tool`, ...
        operation: &'static str,
        /// The limit that passed.
        after: Duration,
    },
    /// The server answered with a JSON-RPC error or something the protocol does not allow.
    #[error("MCP protocol error: {0}")]
    Protocol(String),
    /// The connection was closed.
    #[error("the connection is closed")]
    Closed,
    /// The MCP session was lost (the transport closed, or the session expired) and every
    /// reconnect attempt failed; the last failure is the source.
    #[error("the MCP session was lost and {attempts} reconnect attempts failed")]
    Reconnect {
        /// How many reconnects were tried.
        attempts: u32,
        /// Why the last one failed.
        #[source]
        last: Arc<Error>,
    },
    /// The MCP session was lost after the request may have reached the server (its answer
    /// never came). It was not sent again, since the server may have run it (a tool call must
    /// not run twice); the next request reconnects.
    #[error(
        "the MCP session was lost after the {operation} request may have reached the server; it was not sent again"
    )]
    Interrupted {
        /// The request: `call_tool`, ...
        operation: &'static str,
        /// How the session was lost.
        #[source]
        cause: Arc<Error>,
    },
    /// The configuration cannot work (e.g. a URL that is not http(s)).
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
}

impl Error {
    /// A [`Error::Provider`] with a message and an underlying error.
    ///
    /// ```
    /// use connection_factory::Error;
    ///
    /// let io = std::io::Error::other("connection refused");
    /// let e = Error::provider("token endpoint unreachable", io);
    /// assert_eq!(e.to_string(), "the auth provider failed: token endpoint unreachable");
    /// assert!(std::error::Error::source(&e).is_some());
    /// ```
    pub fn provider(
        message: impl Into<String>,
        source: impl StdError + Send + Sync + 'static,
    ) -> Self {
        Error::Provider { message: message.into(), source: Some(Arc::new(source)) }
    }

    /// A [`Error::Store`]: `message` says what was being done.
    pub(crate) fn store(
        message: impl Into<String>,
        source: impl StdError + Send + Sync + 'static,
    ) -> Self {
        Error::Store { message: message.into(), source: Arc::new(source) }
    }

    /// A [`Error::Provider`] with only a message.
    pub fn provider_msg(message: impl Into<String>) -> Self {
        Error::Provider { message: message.into(), source: None }
    }
}
