//! The auth seam: what the transport asks of whoever owns the tokens.

use crate::challenge::Refusal;
use crate::error::Error;
use crate::secret::Secret;

/// What to do after the server refused a request.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Recovery {
    /// Send the request again, once, with this token. A token equal to the rejected one is not
    /// retried: the refusal is surfaced instead.
    Retry(Secret),
    /// Give up: a new (interactive) authorization is needed. The request fails with
    /// [`Error::AuthorizationRequired`].
    AuthorizationRequired,
    /// Give up: the token lacks a scope and a refresh cannot add it. The request fails with
    /// [`Error::InsufficientScope`].
    InsufficientScope,
}

/// The auth seam of an MCP connection. [`AuthHttpClient`](crate::AuthHttpClient) asks it for the
/// token of **every** request (the POSTs, the GET SSE stream and its reconnects, the session
/// DELETE) and tells it about every 401 or 403.
///
/// # Contract
/// - [`current_token`](Self::current_token) is called once per HTTP request, so it must be cheap
///   (a memory read). `Ok(None)` sends the request without credentials.
/// - [`on_unauthorized`](Self::on_unauthorized) is called once per refused request, with the
///   token that request carried. **Concurrent refusals call it concurrently**: 50 requests
///   that fail with the same expired token make 50 calls. The provider must coalesce them, so
///   that one refresh serves all: compare `rejected` with the token it holds now (someone may
///   have refreshed already: return [`Recovery::Retry`] with the newer token), and run the
///   refresh itself single-flight per tenant, user and server. [`RefreshingProvider`] is a
///   reference implementation.
/// - A 403, or a challenge with `error="insufficient_scope"`, should not trigger a refresh
///   ([`Refusal::is_insufficient_scope`]).
/// - An `Err` is for failures that may pass (the token endpoint is down); a definitive refusal
///   is [`Recovery::AuthorizationRequired`].
///
/// The trait is written with [`async_trait`](https://docs.rs/async-trait) and is
/// dyn-compatible: connections hold an `Arc<dyn AuthProvider>`; an implementation writes
/// `async fn` under `#[async_trait::async_trait]`.
///
/// [`RefreshingProvider`]: crate::RefreshingProvider
///
/// ```
/// use connection_factory::{AuthProvider, Refusal, Error, Recovery, Secret};
///
/// /// A fixed token that is never refreshed.
/// #[derive(Debug)]
/// struct Static(Secret);
///
/// #[async_trait::async_trait]
/// impl AuthProvider for Static {
///     async fn current_token(&self) -> Result<Option<Secret>, Error> {
///         Ok(Some(self.0.clone()))
///     }
///     async fn on_unauthorized(
///         &self,
///         _rejected: Option<&Secret>,
///         challenge: &Refusal,
///     ) -> Result<Recovery, Error> {
///         Ok(if challenge.is_insufficient_scope() {
///             Recovery::InsufficientScope
///         } else {
///             Recovery::AuthorizationRequired
///         })
///     }
/// }
///
/// let provider: std::sync::Arc<dyn AuthProvider> = std::sync::Arc::new(Static("t".into()));
/// # drop(provider);
/// ```
#[async_trait::async_trait]
pub trait AuthProvider: Send + Sync + std::fmt::Debug + 'static {
    /// The token to send with the next request, if any.
    async fn current_token(&self) -> Result<Option<Secret>, Error>;

    /// The server refused a request that carried `rejected` (`None`: it carried no token).
    /// Decide whether to retry it, and with which token.
    async fn on_unauthorized(
        &self,
        rejected: Option<&Secret>,
        challenge: &Refusal,
    ) -> Result<Recovery, Error>;

    /// The DPoP key (RFC 9449) the current token is bound to, if any. With one, every request
    /// carries `Authorization: DPoP <token>` and a fresh proof in the `DPoP` header (`htm`,
    /// `htu`, `iat`, `jti`, `ath`, and the server's nonce once known), and a `use_dpop_nonce`
    /// refusal is retried once with the server's nonce without reaching
    /// [`on_unauthorized`](Self::on_unauthorized). Default: `None`, `Authorization: Bearer`.
    fn dpop_key(&self) -> Option<mcp_oauth::DpopKey> {
        None
    }

    /// While the provider waits for the user (an interactive authorization in progress), the
    /// moment that wait ends; `None` otherwise. A [`Connection`](crate::Connection) whose
    /// connect or request timeout passes while this is set widens it once, to this moment
    /// plus the timeout again, so the caller gets the authorization's outcome instead of a
    /// timeout. Default: `None` (nothing interactive).
    fn interaction_deadline(&self) -> Option<mcp_clock::Timestamp> {
        None
    }
}
