//! Flow records: status, timestamps, metadata, result and error.

use std::fmt;

use mcp_clock::Timestamp;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{Error, FlowKey};

/// Where a flow is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FlowStatus {
    /// Started and waiting for a result.
    Pending,
    /// Finished with a result.
    Completed,
    /// Finished with an error.
    Failed,
}

impl fmt::Display for FlowStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FlowStatus::Pending => "PENDING",
            FlowStatus::Completed => "COMPLETED",
            FlowStatus::Failed => "FAILED",
        })
    }
}

/// The error a flow failed with: a machine-readable kind and a message.
///
/// ```
/// let e = flow_state::FlowError::new("invalid_grant", "the refresh token was revoked");
/// assert_eq!(e.to_string(), "invalid_grant: the refresh token was revoked");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowError {
    /// A short machine-readable kind, such as `invalid_grant` or [`FlowError::TIMEOUT`].
    pub kind: String,
    /// A human-readable message.
    pub message: String,
}

impl FlowError {
    /// The kind recorded when a flow or its handler ran out of time.
    pub const TIMEOUT: &'static str = "timeout";
    /// The kind recorded when a handler panicked.
    pub const PANICKED: &'static str = "panicked";
    /// The kind of a run whose handler or driver task was stopped (cancelled, or its runtime
    /// shut down) before it had an outcome.
    pub const ABORTED: &'static str = "aborted";
    /// The kind of a FAILED flow that recorded no error of its own.
    pub const FAILED: &'static str = "failed";

    /// A new error.
    pub fn new(kind: impl Into<String>, message: impl Into<String>) -> Self {
        FlowError { kind: kind.into(), message: message.into() }
    }
}

impl fmt::Display for FlowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl std::error::Error for FlowError {}

/// A flow as read from the store, with its result decoded as `T`.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct FlowState<T> {
    /// The status.
    pub status: FlowStatus,
    /// When the flow (this generation of it) was created.
    pub created_at: Timestamp,
    /// When it completed.
    pub completed_at: Option<Timestamp>,
    /// When it failed.
    pub failed_at: Option<Timestamp>,
    /// Free-form metadata given when it was created.
    pub metadata: Value,
    /// The result, when COMPLETED.
    pub result: Option<T>,
    /// The error, when FAILED.
    pub error: Option<FlowError>,
}

impl<T> FlowState<T> {
    /// The time the flow last changed status: completion, failure, else creation.
    pub fn settled_or_created_at(&self) -> Timestamp {
        self.completed_at.or(self.failed_at).unwrap_or(self.created_at)
    }
}

/// The stored form of a flow.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Record {
    #[serde(rename = "s")]
    pub(crate) status: FlowStatus,
    #[serde(rename = "c")]
    pub(crate) created_at: Timestamp,
    #[serde(rename = "d", default, skip_serializing_if = "Option::is_none")]
    pub(crate) completed_at: Option<Timestamp>,
    #[serde(rename = "f", default, skip_serializing_if = "Option::is_none")]
    pub(crate) failed_at: Option<Timestamp>,
    #[serde(rename = "m", default, skip_serializing_if = "Value::is_null")]
    pub(crate) metadata: Value,
    #[serde(rename = "r", default, skip_serializing_if = "Option::is_none")]
    pub(crate) result: Option<Value>,
    #[serde(rename = "e", default, skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<FlowError>,
}

impl Record {
    pub(crate) fn pending(now: Timestamp, metadata: Value) -> Self {
        Record {
            status: FlowStatus::Pending,
            created_at: now,
            completed_at: None,
            failed_at: None,
            metadata,
            result: None,
            error: None,
        }
    }

    /// Turns this record into COMPLETED (with the result) or FAILED (with the error) at `now`.
    pub(crate) fn settle(&mut self, now: Timestamp, outcome: Result<Value, FlowError>) {
        match outcome {
            Ok(value) => {
                self.status = FlowStatus::Completed;
                self.completed_at = Some(now);
                self.result = Some(value);
                self.error = None;
            }
            Err(error) => {
                self.status = FlowStatus::Failed;
                self.failed_at = Some(now);
                self.error = Some(error);
            }
        }
    }

    pub(crate) fn encode(&self, key: &FlowKey) -> Result<Vec<u8>, Error> {
        serde_json::to_vec(self)
            .map_err(|e| Error::Codec { key: key.clone(), message: e.to_string() })
    }

    pub(crate) fn decode(key: &FlowKey, bytes: &[u8]) -> Result<Self, Error> {
        serde_json::from_slice(bytes)
            .map_err(|e| Error::Corrupt { key: key.clone(), message: e.to_string() })
    }

    pub(crate) fn into_state<T: DeserializeOwned>(
        self,
        key: &FlowKey,
    ) -> Result<FlowState<T>, Error> {
        let result = match self.result {
            Some(v) => Some(decode_value(key, v)?),
            None => None,
        };
        Ok(FlowState {
            status: self.status,
            created_at: self.created_at,
            completed_at: self.completed_at,
            failed_at: self.failed_at,
            metadata: self.metadata,
            result,
            error: self.error,
        })
    }
}

pub(crate) fn decode_value<T: DeserializeOwned>(key: &FlowKey, v: Value) -> Result<T, Error> {
    serde_json::from_value(v).map_err(|e| Error::Codec { key: key.clone(), message: e.to_string() })
}

pub(crate) fn encode_value<T: Serialize>(key: &FlowKey, v: &T) -> Result<Value, Error> {
    serde_json::to_value(v).map_err(|e| Error::Codec { key: key.clone(), message: e.to_string() })
}
