//! `mcp-connect`: see the crate docs and `mcp-connect --help`.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// A command-line MCP client with OAuth.
#[derive(Debug, Parser)]
#[command(name = "mcp-connect", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Client mode for the official MCP conformance suite (server URL last).
    #[command(hide = true)]
    Conformance {
        /// The MCP server URL (the suite appends it).
        url: String,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Conformance { url } => mcp_connect::run_conformance(&url).await,
    }
}
