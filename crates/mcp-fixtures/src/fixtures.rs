//! Both servers at once.

use mcp_clock::SharedClock;

use crate::auth::{AuthServer, AuthServerHandle};
use crate::error::FixtureError;
use crate::knobs::KnobSettings;
use crate::resource::{ResourceServer, ResourceServerHandle};

/// An authorization server and a resource server that trusts it, with the defaults.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), mcp_fixtures::FixtureError> {
/// let fx = mcp_fixtures::Fixtures::start().await?;
/// assert!(fx.resource().url().starts_with("http://127.0.0.1:"));
/// assert!(fx.auth().issuer().starts_with("http://127.0.0.1:"));
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Fixtures {
    auth: AuthServerHandle,
    resource: ResourceServerHandle,
}

impl Fixtures {
    /// Start both with the system clock and default knobs.
    ///
    /// # Errors
    /// As [`AuthServerBuilder::spawn`](crate::AuthServerBuilder::spawn).
    pub async fn start() -> Result<Self, FixtureError> {
        Self::start_with(SharedClock::system(), KnobSettings::default()).await
    }

    /// Start both with this clock and these knobs.
    ///
    /// # Errors
    /// As [`AuthServerBuilder::spawn`](crate::AuthServerBuilder::spawn).
    pub async fn start_with(clock: SharedClock, knobs: KnobSettings) -> Result<Self, FixtureError> {
        let auth = AuthServer::builder().clock(clock).knobs(knobs).spawn().await?;
        let resource = ResourceServer::builder(&auth).spawn().await?;
        Ok(Fixtures { auth, resource })
    }

    /// Pair servers started separately.
    pub fn from_parts(auth: AuthServerHandle, resource: ResourceServerHandle) -> Self {
        Fixtures { auth, resource }
    }

    /// The authorization server.
    pub fn auth(&self) -> &AuthServerHandle {
        &self.auth
    }

    /// The resource server.
    pub fn resource(&self) -> &ResourceServerHandle {
        &self.resource
    }

    /// Stop both and wait for them.
    ///
    /// # Errors
    /// [`FixtureError::Server`] when a server task panicked.
    pub async fn shutdown(self) -> Result<(), FixtureError> {
        self.resource.shutdown().await?;
        self.auth.shutdown().await
    }
}
