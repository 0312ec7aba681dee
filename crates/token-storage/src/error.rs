//! The crate's one error type: [`Error`], with [`ReauthReason`] and [`DecryptFailure`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::TokenKey;
use crate::refresher::TerminalCode;

/// What went wrong in token storage. Callers act on the variant:
///
/// - [`Error::AuthorizationRequired`]: send the user through the browser again.
/// - [`Error::RefreshUnavailable`], [`Error::Timeout`], [`Error::LeaseWait`],
///   [`Error::WriteStorm`]: try again later;
///   the stored credentials are untouched.
/// - [`Error::Decrypt`]: the stored record is unreadable with the configured keys; it is left as
///   it was for a person to inspect (or to remove with `TokenStorage::delete_all`).
/// - [`Error::StoreUnavailable`]: the backend is away for now (Redis restarting); try again.
/// - [`Error::Store`], [`Error::KeyProvider`]: configuration or backend trouble.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No usable credentials: the user must authorize again.
    #[error("authorization required for {key}: {reason}")]
    AuthorizationRequired {
        /// The slot concerned.
        key: TokenKey,
        /// Why.
        reason: ReauthReason,
    },
    /// The refresh failed for a reason that may pass (network, 5xx, 429,
    /// `temporarily_unavailable`); the stored credentials are kept.
    #[error("token refresh for {key} is unavailable for now: {message}")]
    RefreshUnavailable {
        /// The slot concerned.
        key: TokenKey,
        /// What the refresher reported.
        message: String,
        /// When the server asked to be left alone for a while.
        retry_after: Option<Duration>,
    },
    /// A refresh waited this long for a peer's refresh lease and gave up (a peer is refreshing
    /// the same key, or died holding its lease): try again later; nothing was sent.
    #[error("gave up after {waited:?} waiting for the refresh lease of {key} (a peer holds it)")]
    LeaseWait {
        /// The slot concerned.
        key: TokenKey,
        /// How long the refresh waited.
        waited: Duration,
    },
    /// The caller's wait for a refresh ended (its deadline), or the refresh itself hung past its
    /// deadline and was abandoned.
    #[error("gave up waiting for the token refresh of {key}")]
    Timeout {
        /// The slot concerned.
        key: TokenKey,
    },
    /// More token writes for one key within the window than allowed: something is looping.
    #[error("too many token writes for {key}: more than {limit} within {window:?}")]
    WriteStorm {
        /// The slot concerned.
        key: TokenKey,
        /// The configured limit.
        limit: u32,
        /// The configured window.
        window: Duration,
    },
    /// A stored record could not be decrypted or decoded. It was left as it was.
    #[error("stored record {record} is unreadable: {reason}")]
    Decrypt {
        /// The store key of the record.
        record: String,
        /// What exactly failed.
        reason: DecryptFailure,
    },
    /// The encryption keys could not be loaded.
    #[error("encryption key provider: {message}")]
    KeyProvider {
        /// What is wrong.
        message: String,
    },
    /// The store backend could not be reached (a connection refused or dropped, a timeout):
    /// retrying later may help; nothing stored was changed by the failed call.
    #[error("token store unavailable: {message}")]
    StoreUnavailable {
        /// What failed, naming the backend's address.
        message: String,
        /// The backend's own error.
        #[source]
        source: Option<Arc<dyn std::error::Error + Send + Sync>>,
    },
    /// The store backend failed.
    #[error("token store: {message}")]
    Store {
        /// What failed.
        message: String,
        /// The backend's own error.
        #[source]
        source: Option<Arc<dyn std::error::Error + Send + Sync>>,
    },
}

impl Error {
    /// A store error with the backend's own error as its source.
    pub fn store(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error::Store { message: message.into(), source: Some(Arc::new(source)) }
    }

    /// Whether this error tells the user to authorize again.
    pub fn is_authorization_required(&self) -> bool {
        matches!(self, Error::AuthorizationRequired { .. })
    }
}

/// Why a slot needs a new authorization.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ReauthReason {
    /// Nothing is stored for the key.
    Missing,
    /// The access token has expired (or was rejected) and there is no refresh token.
    NoRefreshToken,
    /// The refresh token's own expiry has passed.
    RefreshTokenExpired,
    /// The stored tokens were issued by another authorization server than the one expected.
    IssuerChanged {
        /// The issuer in the stored record.
        stored: String,
        /// The issuer the caller expected.
        expected: String,
    },
    /// A refresh was sent and its answer lost (a timeout, a reset connection), and the server
    /// refused the refresh token when it was presented again: it had rotated it, and the
    /// successor never arrived.
    RotationLostInFlight,
    /// The authorization server rejected the refresh for good.
    Rejected {
        /// The OAuth error code.
        code: TerminalCode,
        /// The server's `error_description`, if any.
        description: Option<String>,
    },
}

impl fmt::Display for ReauthReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReauthReason::Missing => f.write_str("no tokens stored"),
            ReauthReason::NoRefreshToken => {
                f.write_str("access token expired or rejected and no refresh token available")
            }
            ReauthReason::RefreshTokenExpired => f.write_str("the refresh token has expired"),
            ReauthReason::RotationLostInFlight => f.write_str(
                "rotation lost in flight: the refresh was answered but the answer never arrived, \
                 and the refresh token was refused when presented again",
            ),
            ReauthReason::IssuerChanged { stored, expected } => {
                write!(f, "stored tokens were issued by {stored}, not {expected}")
            }
            ReauthReason::Rejected { code, description: None } => {
                write!(f, "the authorization server answered {code}")
            }
            ReauthReason::Rejected { code, description: Some(d) } => {
                write!(f, "the authorization server answered {code} ({d})")
            }
        }
    }
}

/// Why a stored record could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecryptFailure {
    /// The record is shorter than its header says.
    #[error("record truncated")]
    Truncated,
    /// The record does not start with a known format marker.
    #[error("unknown record format")]
    UnknownFormat,
    /// The record names no key id.
    #[error("record has no key id")]
    MissingKeyId,
    /// The record was sealed with a key the key provider does not have.
    #[error("record was sealed with unknown key id {0:?}")]
    UnknownKeyId(String),
    /// Authentication failed: the record was tampered with, sealed with another key of the
    /// same id, or moved under another key.
    #[error("authentication failed (tampered, wrong key, or moved)")]
    Authentication,
    /// The record decrypted but its contents could not be decoded.
    #[error("decrypted contents malformed")]
    Malformed,
    /// The record is authentic but older than one this process already read for the same key
    /// (its sealed generation is lower): an older sealed blob was written back under the name.
    /// The record is left as it is.
    #[error("record rolled back: generation {found} is older than generation {seen} already read")]
    RolledBack {
        /// The generation of the record found.
        found: u64,
        /// The newest generation read before.
        seen: u64,
    },
}
