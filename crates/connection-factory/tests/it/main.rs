//! connection-factory's integration tests, one binary (one link): each module is one area,
//! against real HTTP servers on 127.0.0.1 (the fixture servers or a test's own) and a manual
//! clock. `common` is the interactive-flow bench several modules share.

mod auth_transport;
mod common;
mod dpop;
mod factory;
mod interactive;
mod oauth_refresher;
mod reconnect;
mod scenarios;
mod spans;
mod workload;
