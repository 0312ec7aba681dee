//! [`FactoryConfig`]: what one connection of the factory is for, and the key digest.

use super::*;

/// The cap of the silent-refresh budget.
const REFRESH_CAP: Duration = Duration::from_secs(5);

/// What one connection of the factory is for: the server, who it is for, and its time limits.
///
/// ```
/// use connection_factory::FactoryConfig;
/// use std::time::Duration;
///
/// let config = FactoryConfig::new("http://127.0.0.1:8080/mcp", "acme", "alice", "github")
///     .connect_timeout(Duration::from_secs(10))
///     .oauth_wait_timeout(Duration::from_secs(120));
/// // min(5 s, 0.4 x min(10 s, 120 s))
/// assert_eq!(config.refresh_budget(), Duration::from_secs(4));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FactoryConfig {
    pub(super) server_url: String,
    pub(super) tenant: String,
    pub(super) user: String,
    pub(super) server_name: String,
    pub(super) connect_timeout: Duration,
    pub(super) request_timeout: Option<Duration>,
    pub(super) oauth_wait_timeout: Duration,
    pub(super) scopes: Option<String>,
    pub(super) client: Option<mcp_oauth::ClientConfig>,
    pub(super) max_concurrent_requests: Option<usize>,
    pub(super) headers: Vec<(String, Secret)>,
    pub(super) env_proxy: bool,
}

impl FactoryConfig {
    /// A configuration with a 30 s connect timeout and a 120 s OAuth wait timeout.
    pub fn new(
        server_url: impl Into<String>,
        tenant: impl Into<String>,
        user: impl Into<String>,
        server_name: impl Into<String>,
    ) -> Self {
        FactoryConfig {
            server_url: server_url.into(),
            tenant: tenant.into(),
            user: user.into(),
            server_name: server_name.into(),
            connect_timeout: Duration::from_secs(30),
            request_timeout: None,
            oauth_wait_timeout: Duration::from_secs(120),
            scopes: None,
            client: None,
            max_concurrent_requests: None,
            headers: Vec::new(),
            env_proxy: false,
        }
    }

    /// How long connecting may take, recovery included.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long one request of connections made by [`ConnectionFactory::connect`] may take,
    /// recovery included (default: [`ConnectOptions`]'s, 60 s). While an interactive
    /// authorization is in progress, this and the connect timeout are widened by the OAuth
    /// wait (see [`AuthProvider::interaction_deadline`]).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = Some(timeout);
        self
    }

    /// Send the MCP requests of connections made by [`ConnectionFactory::connect`] through the
    /// proxy the environment names (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`, minus `NO_PROXY`);
    /// see [`ConnectOptions::env_proxy`]. Default off.
    pub fn env_proxy(mut self, on: bool) -> Self {
        self.env_proxy = on;
        self
    }

    /// How long an interactive authorization may take.
    pub fn oauth_wait_timeout(mut self, timeout: Duration) -> Self {
        self.oauth_wait_timeout = timeout;
        self
    }

    /// The scopes to ask for in an interactive authorization, instead of the ones the challenge
    /// or the server's metadata suggest (a step-up still adds the challenged scopes).
    pub fn scopes(mut self, scopes: impl Into<String>) -> Self {
        self.scopes = Some(scopes.into());
        self
    }

    /// How the client identifies itself for the interactive flow (pre-registered client,
    /// metadata document or dynamic registration) and its redirect URI (the first one). Without
    /// it there is no interactive flow.
    pub fn client(mut self, client: mcp_oauth::ClientConfig) -> Self {
        self.client = Some(client);
        self
    }

    /// How many requests a connection made by [`ConnectionFactory::connect`] keeps in flight at
    /// once (default: [`ConnectOptions`]'s, 16); more wait in rmcp's queue.
    pub fn max_concurrent_requests(mut self, limit: usize) -> Self {
        self.max_concurrent_requests = Some(limit.max(1));
        self
    }

    /// Send the header `name: value` with every MCP request of connections made by
    /// [`ConnectionFactory::connect`] (see [`ConnectOptions::header`]). Not part of the token
    /// key.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Secret>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// How long a silent refresh after a 401 may take before the provider falls back:
    /// `min(5 s, 0.4 x min(connect timeout, OAuth wait timeout))`, leaving the rest for the
    /// interactive fallback.
    pub fn refresh_budget(&self) -> Duration {
        REFRESH_CAP.min(self.connect_timeout.min(self.oauth_wait_timeout).mul_f64(0.4))
    }

    /// The token-storage key, which is also the key refreshes are coalesced on: tenant, user,
    /// and the server name plus a digest of the OAuth configuration.
    ///
    /// The digest covers the server URL (the resource), the scopes (as a set) and the client's
    /// fixed identity (a pre-registered client ID or a metadata document URL), so two
    /// configurations for the same tenant, user and server that would be granted different
    /// tokens never share tokens or a refresh. A plain configuration (no scopes, no fixed client
    /// identity: dynamic registration or none) keeps the bare server name, the key hosts and
    /// earlier versions use; tokens of another issuer under it are not served.
    ///
    /// ```
    /// use connection_factory::FactoryConfig;
    ///
    /// let plain = FactoryConfig::new("http://127.0.0.1:8080/mcp", "acme", "alice", "github");
    /// assert_eq!(plain.token_key().server(), "github");
    /// let read = plain.clone().scopes("repo:read");
    /// let write = plain.clone().scopes("repo:read repo:write");
    /// assert!(read.token_key().server().starts_with("github#"));
    /// assert_ne!(read.token_key(), write.token_key());
    /// assert_eq!(write.token_key(), plain.scopes("repo:write  repo:read").token_key());
    /// ```
    pub fn token_key(&self) -> TokenKey {
        TokenKey::new(self.tenant.as_str(), self.user.as_str(), self.key_server())
    }

    /// The server part of the token key: the name, plus `#` and the configuration digest unless
    /// the configuration is plain.
    pub(super) fn key_server(&self) -> String {
        use sha2::Digest as _;
        let scopes = self.scopes.as_deref().map(scope_set).filter(|s| !s.is_empty());
        let client = self.client.as_ref().and_then(|c| {
            c.pre_registered
                .as_ref()
                .map(|p| format!("client_id:{}", p.client_id))
                .or_else(|| c.metadata_document_url.as_ref().map(|u| format!("metadata:{u}")))
        });
        if scopes.is_none() && client.is_none() {
            return self.server_name.clone();
        }
        let mut hash = sha2::Sha256::new();
        for part in [Some(self.server_url.as_str()), scopes.as_deref(), client.as_deref()] {
            let part = part.unwrap_or("");
            hash.update((part.len() as u64).to_be_bytes());
            hash.update(part.as_bytes());
        }
        let digest = hash.finalize();
        let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        format!("{}#{hex}", self.server_name)
    }

    pub(super) fn flow_id(&self) -> String {
        // Tenant is its own typed part of the FlowKey; user and server are joined unambiguously.
        format!("{}:{}", self.user.len(), self.user) + ":" + &self.key_server()
    }

    pub(super) fn flow_key(&self, flow_type: &str) -> Result<FlowKey, Error> {
        FlowKey::scoped(Some(&self.tenant), flow_type, &self.flow_id())
            .map_err(|e| Error::InvalidConfig(e.to_string()))
    }
}

/// A scope list as a set: split, deduplicated, sorted, joined with spaces.
pub(super) fn scope_set(scopes: &str) -> String {
    let mut v: Vec<&str> = scopes.split_ascii_whitespace().collect();
    v.sort_unstable();
    v.dedup();
    v.join(" ")
}
