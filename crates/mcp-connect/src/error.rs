//! The crate's one error type, with an exit code per variant.

use std::path::PathBuf;
use std::time::Duration;

/// Why a command failed. Each variant has its own exit code ([`Error::exit_code`]), documented
/// in `mcp-connect --help` and the README. Messages never contain a secret.
///
/// ```
/// let e = mcp_connect::Error::NotLoggedIn { url: "http://127.0.0.1:1/mcp".into() };
/// assert_eq!(e.exit_code(), 5);
/// assert!(e.to_string().contains("mcp-connect login http://127.0.0.1:1/mcp"));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Bad arguments (a URL that is not http(s), a bad flag value, arguments that are not a JSON
    /// object), or a proxy's stdin that is not UTF-8. Exit 2.
    #[error("invalid input: {0}")]
    Usage(String),
    /// Nothing answers at the server's address. Exit 3.
    #[error("cannot reach {url}: {reason}")]
    Unreachable {
        /// The server URL.
        url: String,
        /// What the connection attempt said.
        reason: String,
    },
    /// Something answers, but not as an MCP server (a 404, an HTML page). Exit 4.
    #[error("{url} does not answer as an MCP server ({detail})")]
    NotMcp {
        /// The server URL.
        url: String,
        /// What went wrong.
        detail: String,
    },
    /// No usable authorization is stored, or the server refused it and it could not be
    /// refreshed. Exit 5.
    #[error("not authorized for {url}: run `mcp-connect login {url}`")]
    NotLoggedIn {
        /// The server URL.
        url: String,
    },
    /// The authorization failed: denied by the user, refused by the server, a discovery or
    /// code-exchange failure. Exit 6.
    #[error("authorization failed: {0}")]
    Authorization(String),
    /// The authorization server does not let this client register. Exit 6.
    #[error(
        "the authorization server refused client registration ({0}); a pre-registered client is needed for this server"
    )]
    RegistrationRefused(String),
    /// The browser step was not completed in time. Exit 7.
    #[error(
        "the browser step was not completed within {}s; run the command again (--timeout gives more time)", after.as_secs()
    )]
    BrowserTimeout {
        /// The limit that passed.
        after: Duration,
    },
    /// Another process holds the token store (or a login lock) for longer than the wait. Exit 8.
    #[error("the token store is locked by another process: {0}; nothing was changed")]
    StoreLocked(String),
    /// The token store cannot be opened or a record in it cannot be read. It is left as it is.
    /// Exit 9.
    #[error(
        "the token store at {} is unreadable: {detail}; it was left untouched (move it away or pass --store to start afresh)", path.display()
    )]
    StoreCorrupted {
        /// The store directory.
        path: PathBuf,
        /// What failed.
        detail: String,
    },
    /// Another token-store failure (permissions, disk). Exit 10.
    #[error("token store: {0}")]
    Store(String),
    /// The tool ran and reported an error (`isError`). Exit 11.
    #[error("the tool reported an error")]
    ToolError,
    /// The authorization server is in trouble for now (a 5xx, a 429, `temporarily_unavailable`,
    /// no answer): the stored credentials are kept, and the same command later may work. Exit 12.
    #[error(
        "the authorization server is unavailable for now ({0}); the stored credentials are kept: try again later"
    )]
    AuthorizationServerUnavailable(String),
    /// Another process (or task) was refreshing the same tokens and did not finish within the
    /// wait; this process sent nothing. Exit 13.
    #[error(
        "another process is refreshing the tokens and did not finish in time ({0}); nothing was sent: try again (--lock-timeout waits longer)"
    )]
    RefreshWait(String),
    /// The MCP server did not answer in time (the handshake or a request). Exit 14.
    #[error(
        "the MCP server did not answer {operation} within {}s (--request-timeout waits longer)", after.as_secs()
    )]
    Timeout {
        /// What timed out: `connect`, `list_tools`, `call_tool`, ...
        operation: String,
        /// The limit that passed.
        after: Duration,
    },
    /// The MCP session failed (a protocol error, a transport failure). Exit 1.
    #[error("MCP session: {0}")]
    Mcp(String),
}

impl Error {
    /// The process exit code for this error.
    ///
    /// | code | meaning |
    /// |---|---|
    /// | 0 | success |
    /// | 1 | the MCP session failed |
    /// | 2 | invalid input |
    /// | 3 | server unreachable |
    /// | 4 | not an MCP server |
    /// | 5 | not authorized: run `login` |
    /// | 6 | authorization failed or registration refused |
    /// | 7 | the browser step timed out |
    /// | 8 | the store is locked |
    /// | 9 | the store is unreadable |
    /// | 10 | other store failure |
    /// | 11 | the tool reported an error |
    /// | 12 | the authorization server is unavailable for now |
    /// | 13 | a peer's token refresh did not finish in time |
    /// | 14 | the MCP server did not answer in time |
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Mcp(_) => 1,
            Error::Usage(_) => 2,
            Error::Unreachable { .. } => 3,
            Error::NotMcp { .. } => 4,
            Error::NotLoggedIn { .. } => 5,
            Error::Authorization(_) | Error::RegistrationRefused(_) => 6,
            Error::BrowserTimeout { .. } => 7,
            Error::StoreLocked(_) => 8,
            Error::StoreCorrupted { .. } => 9,
            Error::Store(_) => 10,
            Error::ToolError => 11,
            Error::AuthorizationServerUnavailable(_) => 12,
            Error::RefreshWait(_) => 13,
            Error::Timeout { .. } => 14,
        }
    }
}

/// The exit-code table for `--help`.
pub(crate) const EXIT_CODES: &str = "\
Exit codes:
  0   success
  1   the MCP session failed (protocol or transport error)
  2   invalid input (bad URL or flag, arguments that are not a JSON object, a proxy's
      stdin that is not UTF-8)
  3   the server is unreachable
  4   the server is not an MCP server (404, HTML, ...)
  5   not authorized: run `mcp-connect login <url>`
  6   authorization failed (denied, registration refused, code exchange failed)
  7   the browser step timed out (--timeout)
  8   the token store is locked by another process
  9   the token store is unreadable (left untouched)
  10  other token-store failure
  11  the tool reported an error (call)
  12  the authorization server is unavailable for now (5xx, 429, no answer): try again
  13  another process's token refresh did not finish in time (--lock-timeout)
  14  the MCP server did not answer in time (--request-timeout)";
