//! The crate's one error type.

use std::io;

/// What can go wrong when starting or driving a fixture server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FixtureError {
    /// The server could not bind its loopback listener.
    #[error("could not bind 127.0.0.1:{port}")]
    Bind {
        /// The port that was asked for (0 means any).
        port: u16,
        /// The I/O error from the operating system.
        #[source]
        source: io::Error,
    },
    /// A builder was given a setting that cannot work.
    #[error("invalid fixture configuration: {0}")]
    InvalidConfig(String),
    /// A client registration asked of the handle was refused.
    #[error("client registration refused: {0}")]
    Registration(String),
    /// No authorization request is waiting for approval.
    #[error("no authorization request is waiting for approval")]
    NoPendingAuthorization,
    /// The server task ended with an error or panicked.
    #[error("the fixture server task failed")]
    Server(#[source] Box<dyn std::error::Error + Send + Sync>),
}
