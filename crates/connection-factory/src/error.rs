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

    /// What kind of failure this is, for callers that decide by it (exit codes, retries,
    /// prompts) instead of reading messages. The kind of a failure that crossed the factory's
    /// token look-up flow (which keeps only a kind and a message) is the kind the look-up
    /// recorded; otherwise it comes from the typed cause (token storage, the OAuth client).
    ///
    /// ```
    /// use connection_factory::{Error, ErrorKind};
    ///
    /// let refused = Error::AuthorizationRequired { www_authenticate: None };
    /// assert_eq!(refused.kind(), ErrorKind::AuthorizationRequired);
    /// assert_eq!(Error::provider_msg("token endpoint down").kind(), ErrorKind::Other);
    /// ```
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Provider { message, .. } if message == REGISTRATION => ErrorKind::Registration,
            Error::AuthorizationRequired { .. } => ErrorKind::AuthorizationRequired,
            Error::InsufficientScope { .. } => ErrorKind::InsufficientScope,
            Error::Timeout { .. } => ErrorKind::Timeout,
            Error::Store { .. } => cause_kind(self).unwrap_or(ErrorKind::Store),
            Error::Reconnect { last, .. } => last.kind(),
            Error::Interrupted { cause, .. } => cause.kind(),
            _ => cause_kind(self).unwrap_or(ErrorKind::Other),
        }
    }

    /// The refusal or provider failure carried in an rmcp transport error's source chain (what
    /// an [`AuthHttpClient`](crate::AuthHttpClient) request, and so an rmcp transport built on
    /// it, fails with), as this crate's error: a 401 the provider could not recover from is
    /// [`Error::AuthorizationRequired`], a 403 `insufficient_scope` [`Error::InsufficientScope`],
    /// and a provider failure the provider's own error. `None` when the chain carries none.
    pub fn from_transport(error: &(dyn StdError + 'static)) -> Option<Error> {
        crate::connection::classify(error)
    }
}

/// The message of the [`Error::Provider`] a failed client registration is.
pub(crate) const REGISTRATION: &str = "registration";

/// What kind of failure an [`Error`] is: [`Error::kind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A new authorization is needed (the user must go through the browser again).
    AuthorizationRequired,
    /// The token lacks a scope the server wants.
    InsufficientScope,
    /// Registering the client with the authorization server failed (refused, or not answered).
    Registration,
    /// The authorization server is unavailable for now (a refresh failed on the network, a
    /// 5xx, a 429, `temporarily_unavailable`); the stored credentials are kept.
    AuthorizationServerUnavailable,
    /// A refresh did not end in time: a peer holds the refresh lease, or the wait for the
    /// refresh ran out. Nothing was sent; try again later.
    RefreshWait,
    /// The token store is unavailable for now (unreachable, or locked by another process).
    StoreUnavailable,
    /// The token store failed, or a record in it cannot be read.
    Store,
    /// An operation did not finish in time ([`Error::Timeout`]).
    Timeout,
    /// Anything else (transport, protocol, configuration, a provider failure of no known kind).
    Other,
}

/// The look-up flow's failure kinds: the [`flow_state::FlowError`] kind the factory's token
/// look-up records for each kind of token-storage failure, so that the kind survives the flow.
pub(crate) mod lookup_kind {
    use super::ErrorKind;

    /// No usable tokens: a new authorization is needed.
    pub(crate) const NO_TOKENS: &str = "authorization_required";
    /// [`ErrorKind::AuthorizationServerUnavailable`].
    pub(crate) const REFRESH_UNAVAILABLE: &str = "refresh_unavailable";
    /// [`ErrorKind::RefreshWait`].
    pub(crate) const REFRESH_WAIT: &str = "refresh_wait";
    /// [`ErrorKind::StoreUnavailable`].
    pub(crate) const STORE_UNAVAILABLE: &str = "store_unavailable";
    /// [`ErrorKind::Store`] (and every other failure: what the look-up recorded before it
    /// recorded kinds).
    pub(crate) const STORE: &str = "store";

    /// The kind to record for a token-storage failure.
    pub(crate) fn of(e: &token_storage::Error) -> &'static str {
        match super::storage_kind(e) {
            ErrorKind::AuthorizationRequired => NO_TOKENS,
            ErrorKind::AuthorizationServerUnavailable => REFRESH_UNAVAILABLE,
            ErrorKind::RefreshWait => REFRESH_WAIT,
            ErrorKind::StoreUnavailable => STORE_UNAVAILABLE,
            _ => STORE,
        }
    }

    /// The error kind of a recorded kind; `None` for kinds the look-up does not record.
    pub(crate) fn kind(recorded: &str) -> Option<ErrorKind> {
        Some(match recorded {
            NO_TOKENS => ErrorKind::AuthorizationRequired,
            REFRESH_UNAVAILABLE => ErrorKind::AuthorizationServerUnavailable,
            REFRESH_WAIT => ErrorKind::RefreshWait,
            STORE_UNAVAILABLE => ErrorKind::StoreUnavailable,
            STORE => ErrorKind::Store,
            _ => return None,
        })
    }
}

fn storage_kind(e: &token_storage::Error) -> ErrorKind {
    use token_storage::Error as T;
    match e {
        T::AuthorizationRequired { .. } => ErrorKind::AuthorizationRequired,
        T::RefreshUnavailable { .. } => ErrorKind::AuthorizationServerUnavailable,
        T::LeaseWait { .. } | T::Timeout { .. } => ErrorKind::RefreshWait,
        T::StoreUnavailable { .. } => ErrorKind::StoreUnavailable,
        _ => ErrorKind::Store,
    }
}

/// The kind of the first typed cause in `e`'s source chain that has one, looking through the
/// shared `Arc<dyn Error>` sources this crate and token storage wrap causes in.
fn cause_kind(e: &(dyn StdError + 'static)) -> Option<ErrorKind> {
    type Shared = Arc<dyn StdError + Send + Sync>;
    let mut current = Some(e);
    while let Some(err) = current {
        if let Some(storage) = err.downcast_ref::<token_storage::Error>() {
            return Some(storage_kind(storage));
        }
        if let Some(flow_state::Error::Failed { error, .. }) =
            err.downcast_ref::<flow_state::Error>()
            && let Some(kind) = lookup_kind::kind(&error.kind)
        {
            return Some(kind);
        }
        if let Some(oauth) = err.downcast_ref::<mcp_oauth::Error>()
            && oauth.class() == mcp_oauth::ErrorClass::Transient
        {
            return Some(ErrorKind::AuthorizationServerUnavailable);
        }
        if let Some(shared) = err.downcast_ref::<Shared>()
            && let Some(kind) = cause_kind(&**shared)
        {
            return Some(kind);
        }
        current = err.source();
    }
    None
}
