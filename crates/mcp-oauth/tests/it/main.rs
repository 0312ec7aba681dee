//! mcp-oauth's integration tests, one binary (one link): the client against the fixture
//! servers (`fixtures_e2e`), the authorization flow over loopback HTTP, and the reqwest
//! client's hardening. `fixtures_logs` stays a binary of its own: it installs a process-wide
//! log subscriber.

mod e2e;
mod fixtures_e2e;
mod flow_loopback;
mod http_loopback;
mod support;
