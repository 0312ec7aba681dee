//! mcp-connect's integration tests, one binary (one link): the command line run as a real
//! process (`CARGO_BIN_EXE_mcp-connect`) against the fixture servers on 127.0.0.1, each module
//! one area. `common` starts the fixtures and runs the binary.

mod bad_input;
mod cli;
mod common;
mod flags;
mod fleet;
mod import;
mod why;
