//! `mcp-connect`: a command-line MCP client with OAuth on the workspace's crates.
//!
//! The binary (`src/main.rs`) is a thin clap front end over this library:
//!
//! - `cli`: the commands (`login`, `tools`, `call`, `status`, `logout`, `proxy`), their
//!   options and exit codes.
//! - `conformance`: the client mode that the official MCP conformance suite drives
//!   (`mcp-connect conformance <server-url>`).

mod conformance;

pub use conformance::run_conformance;
