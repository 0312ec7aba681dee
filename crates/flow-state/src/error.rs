//! The crate's error type.

use crate::{FlowError, FlowKey, FlowStatus, StoreError};
use mcp_clock::Timestamp;

/// Everything a flow operation can fail with. Callers match on the variant to decide what to do.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No live flow under the key: never created, expired, or deleted.
    #[error("flow {key} not found (never created, expired, or deleted)")]
    NotFound {
        /// The flow.
        key: FlowKey,
    },
    /// The flow is already COMPLETED (or FAILED, for [`crate::FlowManager::fail`]); nothing was
    /// changed.
    #[error("flow {key} is already {status}")]
    AlreadySettled {
        /// The flow.
        key: FlowKey,
        /// Its status.
        status: FlowStatus,
    },
    /// A live (not stale) PENDING flow exists; nothing was changed.
    #[error("flow {key} is already pending since {created_at}")]
    AlreadyPending {
        /// The flow.
        key: FlowKey,
        /// When the pending flow was created.
        created_at: Timestamp,
    },
    /// The wait ran out (measured from the flow's creation).
    #[error("timed out waiting for flow {key}")]
    Timeout {
        /// The flow.
        key: FlowKey,
    },
    /// The flow was deleted while this caller waited on it.
    #[error("flow {key} was deleted while waiting for it")]
    Deleted {
        /// The flow.
        key: FlowKey,
    },
    /// The flow is FAILED; the stored error says why.
    #[error("flow {key} failed: {error}")]
    Failed {
        /// The flow.
        key: FlowKey,
        /// What the flow failed with.
        error: FlowError,
    },
    /// A result or metadata could not be encoded, or decoded as the type asked for.
    #[error("flow {key}: the result does not encode or decode as the requested type: {message}")]
    Codec {
        /// The flow.
        key: FlowKey,
        /// What the codec said.
        message: String,
    },
    /// The stored record is not a flow record (truncated, tampered, or written by another
    /// program). It is left as it is.
    #[error("flow {key}: the stored record is corrupt: {message}")]
    Corrupt {
        /// The flow.
        key: FlowKey,
        /// What is wrong with it.
        message: String,
    },
    /// The store failed; the source says how.
    #[error("the flow store failed on {key}")]
    Store {
        /// The flow.
        key: FlowKey,
        /// The store's error.
        #[source]
        source: Box<StoreError>,
    },
    /// The manager's configuration was refused when it was built.
    #[error("invalid flow manager configuration: {0}")]
    InvalidConfig(String),
    /// A flow key was empty or malformed.
    #[error("invalid flow key: {0}")]
    InvalidKey(String),
}

impl Error {
    /// Whether retrying the same call later may succeed (the store was unavailable).
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Store { source, .. } if source.kind() == crate::StoreErrorKind::Unavailable)
    }
}
