//! mcp-fixtures' integration tests, one binary (one link): the authorization server and the
//! resource server over real HTTP on 127.0.0.1, DPoP, and (feature `cli`) the `mcp-fixtures`
//! binary as a real process.

mod auth_server;
#[cfg(feature = "cli")]
mod binary;
mod common;
mod dpop;
mod resource_server;
