//! `mcp-connect`: a command-line MCP client with OAuth on the workspace's crates.
//!
//! The binary (`src/main.rs`) is a thin clap front end over this library:
//!
//! - [`Client`]: the commands (`login`, `tools`, `call`, `status`, `logout`, `proxy`) over one
//!   store directory ([`ClientOptions`]); [`LoginOptions`] for the browser step.
//! - [`Error`]: one error type with an exit code per variant ([`Error::exit_code`]).
//! - `conformance`: the client mode that the official MCP conformance suite drives
//!   (`mcp-connect conformance <server-url>`).
//!
//! # Several processes, one host
//!
//! Two desktop hosts may each start `mcp-connect proxy` for the same server, and a `login` or
//! `tools` may run beside them. They share one store directory and coordinate through
//! `flock` locks in it, which the kernel releases when a holder dies:
//!
//! - **Tokens.** sled admits one process per database, so no process keeps it open: every
//!   store operation takes the store lock (`store.lock`), opens the database, runs one
//!   get / compare-and-swap / delete / scan, closes it and releases the lock. Token storage's
//!   records are versioned and written with compare-and-swap, so a write based on a stale read
//!   loses safely.
//! - **Refresh.** Token storage runs each refresh under its cross-process lease
//!   ([`token_storage::RefreshLease::lock_files`], `refresh-locks/`): the holder re-reads the
//!   record, skips the network call when a peer has rotated the tokens already, and commits
//!   with compare-and-swap. A refresh token is therefore redeemed by one process once, which is
//!   what strict reuse detection demands; the others adopt the stored result.
//! - **Login.** The browser step runs under a per-server login lock (`login-locks/`). A second
//!   process that needs a login waits for the lock (the browser timeout plus 30 s), then
//!   re-reads the store and uses the tokens the first one stored: one prompt between them.
//! - **Exit.** [`Client::settle`] (called by the binary before it exits) waits for refreshes
//!   in flight to store their result and holds the refresh leases until the process ends, so
//!   no rotated refresh token is lost to an exit between redemption and storage.
//! - **Bounded waits.** Every lock wait is bounded (`--lock-timeout`, default 10 s; the login
//!   lock by the browser timeout): a store held by a hung process ends in
//!   [`Error::StoreLocked`] (exit 8), never in a hang.
//!
//! ```no_run
//! # async fn demo() -> Result<(), mcp_connect::Error> {
//! use mcp_connect::{Client, ClientOptions};
//!
//! let client = Client::open(ClientOptions::new("/tmp/mcp-connect-store").tenant("acme")).await?;
//! for server in client.status().await? {
//!     println!("{} expires in {:?}s", server.server, server.expires_in);
//! }
//! # Ok(()) }
//! ```

mod client;
mod conformance;
mod error;
mod events;
mod flags;
mod ignore;
mod import;
mod legacy;
mod login;
mod proxy;
mod store;

pub use client::{
    Client, ClientOptions, DEFAULT_CALLBACK_PORT, LoginReport, LogoutReport, ServerStatus, Settled,
    callback_port_for, default_store_dir,
};
pub use conformance::run_conformance;
pub use error::Error;
pub use events::Event;
pub use flags::{
    StaticClient, parse_authorize_param, parse_client_metadata, parse_header, parse_header_file,
};
pub use import::{ImportReport, mcp_remote_hash};
pub use login::{AUTHORIZATION_URL_PREFIX, LoginOptions, NO_BROWSER_ENV};

/// The exit-code table printed by `mcp-connect --help`.
///
/// ```
/// assert!(mcp_connect::EXIT_CODES.contains("8   the token store is locked"));
/// ```
pub const EXIT_CODES: &str = error::EXIT_CODES;
