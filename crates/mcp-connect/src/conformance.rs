//! The conformance client mode: follows the official MCP conformance suite's client contract
//! (server URL as the last argument, `MCP_CONFORMANCE_SCENARIO` / `MCP_CONFORMANCE_CONTEXT` in
//! the environment, headless authorization).

/// Runs the conformance client against `server_url`; returns the process exit code.
pub async fn run_conformance(server_url: &str) -> std::process::ExitCode {
    eprintln!("mcp-connect conformance: not implemented yet ({server_url})");
    std::process::ExitCode::FAILURE
}
