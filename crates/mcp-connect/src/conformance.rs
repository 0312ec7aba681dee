//! The conformance client mode: follows the official MCP conformance suite's client contract
//! (server URL as the last argument, `MCP_CONFORMANCE_SCENARIO` / `MCP_CONFORMANCE_CONTEXT` in
//! the environment, headless authorization).
//!
//! MCP goes through [`connection_factory::Connection`] (`initialize`, `tools/list`,
//! `tools/call` of `test-tool`, else of the first tool listed, with arguments made from its
//! schema); authorization goes through [`ConformanceProvider`], an
//! [`AuthProvider`] on [`mcp_oauth::OAuthClient`]. Nothing branches on the scenario name: what
//! to do is decided from the context JSON the suite hands over (pre-registered credentials, a
//! private key, an identity provider's ID token) and from the authorization server's metadata
//! (`grant_types_supported`, `client_id_metadata_document_supported`, ...):
//!
//! - an ID token in the context and a server that takes the jwt-bearer grant: SEP-990
//!   cross-app access ([`OAuthClient::enterprise_token`]);
//! - a workload assertion in the context and a server that takes the jwt-bearer grant:
//!   SEP-1933 workload identity ([`OAuthClient::jwt_bearer`]);
//! - a server that takes `authorization_code`: PKCE authorization, headless (the authorization
//!   URL is requested without following the redirect, and the code is read from `Location`),
//!   with pre-registered, metadata-document or dynamic registration;
//! - else `client_credentials` with the context's secret or `private_key_jwt` key.
//!
//! When the authorization server advertises ES256 DPoP proofs, the grants carry proofs from a
//! key made for the run (kept in memory only), and a DPoP-bound token goes to the MCP server
//! as `Authorization: DPoP` with a proof per request.
//!
//! A 401 authorizes (again); a 403 `insufficient_scope` steps up to the union of the scopes.
//! At most [`MAX_AUTHORIZATIONS`] authorizations are made in one run.

use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};

use connection_factory::{
    AuthProvider, ConnectOptions, Connection, Error, Recovery, Refusal, Secret,
};
use mcp_clock::SharedClock;
use mcp_oauth::{
    AuthAttempts, AuthorizationServerMetadata, BearerChallenge, ClientConfig, ClientRegistration,
    ClientSecret, ClientSigningKey, Discovery, DpopKey, EnterpriseGrant, HttpPolicy, IdToken,
    OAuthClient, PreRegisteredClient, RegistrationSource, ReqwestHttpClient,
    TokenEndpointAuthMethod, TokenResponse, WorkloadIdentity, select_scope,
};
use serde::Deserialize;
use url::Url;

/// The client ID metadata document URL the suite expects when the server supports CIMD.
const CIMD_URL: &str = "https://conformance-test.local/client-metadata.json";
/// Never listened on: the authorization redirect is read, not followed.
const REDIRECT_URI: &str = "http://localhost:3000/callback";
/// The RFC 7523 grant SEP-990 ends with.
const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// How many authorizations one run may make (the MCP spec's bounded step-up).
const MAX_AUTHORIZATIONS: u32 = 3;

/// What the suite may hand over in `MCP_CONFORMANCE_CONTEXT`.
#[derive(Debug, Default, Deserialize)]
struct Context {
    client_id: Option<String>,
    client_secret: Option<String>,
    private_key_pem: Option<String>,
    signing_algorithm: Option<String>,
    idp_client_id: Option<String>,
    idp_id_token: Option<String>,
    idp_issuer: Option<String>,
    idp_token_endpoint: Option<String>,
    /// A workload identity assertion (SEP-1933) the platform issued for this client.
    valid_jwt: Option<String>,
}

/// The grant a run uses, decided from the context and the authorization server's metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grant {
    /// SEP-990: token exchange at the identity provider, then the jwt-bearer grant.
    CrossApp,
    /// SEP-1933: the jwt-bearer grant with the workload's own assertion.
    WorkloadIdentity,
    /// PKCE authorization code, authorized headlessly.
    AuthorizationCode,
    /// Client credentials with the context's secret or key.
    ClientCredentials,
}

/// What to do, from what the suite handed over and what the server supports. An ID token in
/// the context means cross-app access when the server takes the jwt-bearer grant, a workload
/// assertion means workload identity federation with that grant; otherwise the
/// user-facing authorization code grant is preferred; client credentials are the machine
/// fallback and need credentials from the context.
fn choose_grant(context: &Context, asm: &AuthorizationServerMetadata) -> Result<Grant, Error> {
    if context.idp_id_token.is_some() && asm.supports_grant(JWT_BEARER) {
        return Ok(Grant::CrossApp);
    }
    if context.valid_jwt.is_some() && asm.supports_grant(JWT_BEARER) {
        return Ok(Grant::WorkloadIdentity);
    }
    if asm.supports_grant("authorization_code") {
        return Ok(Grant::AuthorizationCode);
    }
    if asm.supports_grant("client_credentials") && context.client_id.is_some() {
        return Ok(Grant::ClientCredentials);
    }
    Err(Error::provider_msg(format!(
        "the authorization server {} offers no grant this client can use",
        asm.issuer
    )))
}

/// Authorization state, changed only under the async lock (one authorization at a time).
#[derive(Debug)]
struct AuthState {
    attempts: AuthAttempts,
    /// The scope of the current token (granted, else requested).
    scope: Option<String>,
    registration: Option<ClientRegistration>,
    /// The issuer the context's credentials belong to. The suite does not name it: they are
    /// bound to the first authorization server discovered, and never offered to another.
    credentials_issuer: Option<String>,
}

/// The conformance mode's [`AuthProvider`]: authorizes on demand with [`OAuthClient`].
struct ConformanceProvider {
    oauth: OAuthClient,
    server: Url,
    context: Context,
    /// The DPoP key of this run, used with an authorization server that advertises ES256 DPoP
    /// proofs. It lives as long as the process (the conformance client stores nothing).
    dpop: DpopKey,
    /// Whether the current token is DPoP-bound (the token endpoint said `token_type` DPoP).
    dpop_bound: Mutex<bool>,
    token: Mutex<Option<Secret>>,
    auth: tokio::sync::Mutex<AuthState>,
}

impl std::fmt::Debug for ConformanceProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConformanceProvider").field("server", &self.server.as_str()).finish()
    }
}

fn oauth_error(what: &str, e: mcp_oauth::Error) -> Error {
    Error::provider(what.to_owned(), e)
}

impl ConformanceProvider {
    fn current(&self) -> Option<Secret> {
        self.token.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    async fn recover(
        &self,
        rejected: Option<&Secret>,
        challenge: &Refusal,
    ) -> Result<Recovery, Error> {
        let mut state = self.auth.lock().await;
        // Another request authorized while this one waited: use its token.
        if let Some(current) = self.current()
            && Some(&current) != rejected
        {
            return Ok(Recovery::Retry(current));
        }
        let bearer =
            BearerChallenge::from_headers(challenge.www_authenticate().iter().map(String::as_str))
                .map_err(|e| oauth_error("unreadable WWW-Authenticate challenge", e))?;
        let step_up = challenge.is_insufficient_scope();
        let scope = if step_up {
            let bearer = bearer.clone().unwrap_or_default();
            match state.attempts.step_up(state.scope.as_deref(), &bearer) {
                Ok(scope) => Some(scope),
                Err(_) => return Ok(Recovery::InsufficientScope),
            }
        } else {
            state.scope.clone()
        };
        if state.attempts.begin().is_err() {
            eprintln!("conformance: {MAX_AUTHORIZATIONS} authorizations made; giving up");
            return Ok(if step_up {
                Recovery::InsufficientScope
            } else {
                Recovery::AuthorizationRequired
            });
        }
        let tokens = self.authorize(&mut state, bearer.as_ref(), scope, step_up).await?;
        *self.dpop_bound.lock().unwrap_or_else(PoisonError::into_inner) =
            tokens.token_type.eq_ignore_ascii_case("dpop");
        let token = tokens.access_token.clone().into_secret();
        *self.token.lock().unwrap_or_else(PoisonError::into_inner) = Some(token.clone());
        Ok(Recovery::Retry(token))
    }

    /// Discover, pick the grant from the context and the server's metadata, and get a token.
    async fn authorize(
        &self,
        state: &mut AuthState,
        challenge: Option<&BearerChallenge>,
        scope: Option<String>,
        step_up: bool,
    ) -> Result<TokenResponse, Error> {
        let discovery = self
            .oauth
            .discover(&self.server, challenge)
            .await
            .map_err(|e| oauth_error("discovery failed", e))?;
        // DPoP-bound tokens when the authorization server takes ES256 proofs (RFC 9449).
        let oauth = if discovery.authorization_server.supports_dpop_es256() {
            eprintln!("conformance: DPoP (key {})", self.dpop.thumbprint());
            self.oauth.clone().with_dpop(self.dpop.clone())
        } else {
            self.oauth.clone()
        };
        match choose_grant(&self.context, &discovery.authorization_server)? {
            Grant::CrossApp => {
                eprintln!("conformance: cross-app access (token exchange, then jwt-bearer)");
                self.cross_app(&oauth, &discovery, scope).await
            }
            Grant::WorkloadIdentity => {
                eprintln!("conformance: workload identity (jwt-bearer)");
                let registration = self.register(state, &discovery).await?;
                let assertion = self.context.valid_jwt.clone().unwrap_or_default();
                let identity = WorkloadIdentity::fixed(IdToken::new(assertion));
                oauth
                    .jwt_bearer(&discovery, &registration, &identity, scope.as_deref())
                    .await
                    .map_err(|e| oauth_error("jwt-bearer grant failed", e))
            }
            Grant::AuthorizationCode => {
                self.authorization_code(&oauth, state, &discovery, challenge, scope, step_up).await
            }
            Grant::ClientCredentials => {
                eprintln!("conformance: client credentials");
                let registration = self.register(state, &discovery).await?;
                oauth
                    .client_credentials(&discovery, &registration, scope.as_deref())
                    .await
                    .map_err(|e| oauth_error("client credentials grant failed", e))
            }
        }
    }

    async fn authorization_code(
        &self,
        oauth: &OAuthClient,
        state: &mut AuthState,
        discovery: &Discovery,
        challenge: Option<&BearerChallenge>,
        scope: Option<String>,
        step_up: bool,
    ) -> Result<TokenResponse, Error> {
        let registration = self.register(state, discovery).await?;
        // A step-up asks for exactly the union; otherwise keep what was granted, or select.
        let scope = match scope {
            Some(scope) => Some(scope),
            None if step_up => None,
            None => select_scope(challenge, discovery),
        };
        eprintln!(
            "conformance: authorization code (client {:?}, {:?}), scope {scope:?}",
            registration.client_id, registration.source
        );
        let (url, pending) = self
            .oauth
            .authorization_url(discovery, &registration, REDIRECT_URI, scope.as_deref())
            .map_err(|e| oauth_error("could not build the authorization URL", e))?;
        let callback = self
            .oauth
            .authorize_without_browser(&url)
            .await
            .map_err(|e| oauth_error("headless authorization failed", e))?;
        let tokens = oauth
            .exchange_code(discovery, &registration, &pending, &callback)
            .await
            .map_err(|e| oauth_error("code exchange failed", e))?;
        state.scope = tokens.scope.clone().or(pending.scope);
        Ok(tokens)
    }

    async fn cross_app(
        &self,
        oauth: &OAuthClient,
        discovery: &Discovery,
        scope: Option<String>,
    ) -> Result<TokenResponse, Error> {
        let c = &self.context;
        let need = |value: &Option<String>, name: &str| {
            value.clone().ok_or_else(|| Error::InvalidConfig(format!("the context has no {name}")))
        };
        let idp_client = ClientRegistration {
            client_id: need(&c.idp_client_id, "idp_client_id")?,
            client_secret: None,
            client_key: None,
            auth_method: TokenEndpointAuthMethod::None,
            source: RegistrationSource::PreRegistered,
            issuer: c.idp_issuer.clone().unwrap_or_default(),
            client_secret_expires_at: None,
        };
        let endpoint = need(&c.idp_token_endpoint, "idp_token_endpoint")?;
        let grant = EnterpriseGrant {
            idp_token_endpoint: endpoint.parse().map_err(|e| {
                Error::InvalidConfig(format!("idp_token_endpoint {endpoint:?}: {e}"))
            })?,
            idp_client,
            id_token: IdToken::new(need(&c.idp_id_token, "idp_id_token")?),
            scope,
        };
        let registration = self
            .oauth
            .register(discovery, &self.client_config(discovery.issuer())?)
            .await
            .map_err(|e| oauth_error("client identification failed", e))?;
        oauth
            .enterprise_token(discovery, &registration, &grant)
            .await
            .map_err(|e| oauth_error("cross-app access failed", e))
    }

    /// The registration for this issuer: reused, or made (pre-registered, CIMD or DCR).
    async fn register(
        &self,
        state: &mut AuthState,
        discovery: &Discovery,
    ) -> Result<ClientRegistration, Error> {
        if let Some(registration) = &state.registration
            && registration.issuer == discovery.issuer()
        {
            return Ok(registration.clone());
        }
        let issuer = state.credentials_issuer.get_or_insert_with(|| discovery.issuer().to_owned());
        let registration = self
            .oauth
            .register(discovery, &self.client_config(issuer)?)
            .await
            .map_err(|e| oauth_error("client registration failed", e))?;
        state.registration = Some(registration.clone());
        Ok(registration)
    }

    /// How the client identifies itself: the context's credentials (for `issuer`) when it has
    /// some, else a metadata document (used when the server supports it), else dynamic
    /// registration.
    fn client_config(&self, issuer: &str) -> Result<ClientConfig, Error> {
        let mut config = ClientConfig::new("mcp-connect conformance", REDIRECT_URI);
        config.metadata_document_url = Url::parse(CIMD_URL).ok();
        let c = &self.context;
        if let Some(client_id) = &c.client_id {
            let client_key = match (&c.private_key_pem, c.signing_algorithm.as_deref()) {
                (None, _) => None,
                (Some(pem), None | Some("ES256")) => Some(ClientSigningKey::es256(pem.clone())),
                (Some(_), Some(other)) => {
                    return Err(Error::InvalidConfig(format!(
                        "signing algorithm {other} is not supported (ES256 is)"
                    )));
                }
            };
            config.pre_registered = Some(PreRegisteredClient {
                issuer: issuer.to_owned(),
                client_id: client_id.clone(),
                client_secret: c.client_secret.clone().map(ClientSecret::new),
                auth_method: client_key.as_ref().map(|_| TokenEndpointAuthMethod::PrivateKeyJwt),
                client_key,
            });
        }
        Ok(config)
    }
}

#[async_trait::async_trait]
impl AuthProvider for ConformanceProvider {
    async fn current_token(&self) -> Result<Option<Secret>, Error> {
        Ok(self.current())
    }

    async fn on_unauthorized(
        &self,
        rejected: Option<&Secret>,
        challenge: &Refusal,
    ) -> Result<Recovery, Error> {
        self.recover(rejected, challenge).await
    }

    fn dpop_key(&self) -> Option<DpopKey> {
        let bound = *self.dpop_bound.lock().unwrap_or_else(PoisonError::into_inner);
        bound.then(|| self.dpop.clone())
    }
}

/// The conformance mode's provider for `server`, with what the suite handed over.
fn provider(server: Url, context: Context) -> Result<Arc<ConformanceProvider>, Error> {
    let http = ReqwestHttpClient::new(HttpPolicy::default())
        .map_err(|e| oauth_error("could not build the HTTP client", e))?;
    Ok(Arc::new(ConformanceProvider {
        oauth: OAuthClient::new(http, SharedClock::system()),
        server,
        context,
        dpop: DpopKey::generate().map_err(|e| oauth_error("could not make a DPoP key", e))?,
        dpop_bound: Mutex::new(false),
        token: Mutex::new(None),
        auth: tokio::sync::Mutex::new(AuthState {
            attempts: AuthAttempts::new(MAX_AUTHORIZATIONS),
            scope: None,
            registration: None,
            credentials_issuer: None,
        }),
    }))
}

/// Connect, list the tools and call `tool` with `arguments` (an error result is a failure).
async fn session(
    provider: Arc<ConformanceProvider>,
    tool: Option<&str>,
    arguments: serde_json::Map<String, serde_json::Value>,
) -> Result<(), Error> {
    let url = provider.server.to_string();
    let conn = Connection::connect(&url, provider, ConnectOptions::default()).await?;
    let tools = conn.list_tools().await?;
    eprintln!(
        "conformance: tools: {:?}",
        tools.iter().map(|t| t.name.as_ref()).collect::<Vec<&str>>()
    );
    // The tool asked for; else `test-tool` when the server has it; else the first tool the
    // server lists, with arguments made from its input schema (a smoke test of a server).
    // A server without tools has nothing more to try.
    let (tool, arguments) = match tool {
        Some(name) => (name.to_owned(), arguments),
        None => {
            let Some(chosen) = tools.iter().find(|t| t.name == "test-tool").or(tools.first())
            else {
                return conn.close().await;
            };
            (chosen.name.to_string(), sample_arguments(&chosen.input_schema))
        }
    };
    eprintln!("conformance: calling {tool} with {}", serde_json::Value::Object(arguments.clone()));
    let result = conn.call_tool(&tool, Some(arguments)).await?;
    if result.is_error == Some(true) {
        return Err(Error::Protocol(format!("{tool} answered with an error result")));
    }
    conn.close().await
}

/// Arguments for a tool from its JSON Schema: each required property gets a plain value of
/// its type (1 for numbers, "test" for strings, true, [] or {}).
fn sample_arguments(
    schema: &serde_json::Map<String, serde_json::Value>,
) -> serde_json::Map<String, serde_json::Value> {
    use serde_json::Value;
    let required: Vec<&str> = schema
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let properties = schema.get("properties").and_then(Value::as_object);
    required
        .into_iter()
        .map(|name| {
            let kind = properties
                .and_then(|p| p.get(name))
                .and_then(|p| p.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("string");
            let value = match kind {
                "number" | "integer" => Value::from(1),
                "boolean" => Value::Bool(true),
                "array" => Value::Array(Vec::new()),
                "object" => Value::Object(serde_json::Map::new()),
                _ => Value::String("test".into()),
            };
            (name.to_owned(), value)
        })
        .collect()
}

/// Read the environment and run the suite's session: list the tools and call one.
async fn conformance_session(server_url: &str) -> Result<(), Error> {
    let server: Url = server_url
        .parse()
        .map_err(|e| Error::InvalidConfig(format!("server URL {server_url:?}: {e}")))?;
    let context = match std::env::var("MCP_CONFORMANCE_CONTEXT") {
        Ok(json) => serde_json::from_str(&json).map_err(|e| {
            Error::InvalidConfig(format!("MCP_CONFORMANCE_CONTEXT is not the expected JSON: {e}"))
        })?,
        Err(_) => Context::default(),
    };
    session(provider(server, context)?, None, serde_json::Map::new()).await
}

/// Runs the conformance client against `server_url`; returns the process exit code.
///
/// It connects (authorizing as the server demands), lists the tools, calls `test-tool` (else
/// the first tool listed, with arguments made from its schema; none when there is none), and
/// exits 0 only if all of that succeeded. The scenario name
/// (`MCP_CONFORMANCE_SCENARIO`) is only printed; the context JSON
/// (`MCP_CONFORMANCE_CONTEXT`) supplies pre-registered credentials, a private key or an
/// identity provider's token when the suite hands them over.
///
/// ```no_run
/// # async fn run() {
/// let code = mcp_connect::run_conformance("http://localhost:3001/mcp").await;
/// # drop(code);
/// # }
/// ```
pub async fn run_conformance(server_url: &str) -> ExitCode {
    let scenario = std::env::var("MCP_CONFORMANCE_SCENARIO").unwrap_or_default();
    eprintln!("conformance: scenario {scenario:?}, server {server_url}");
    match conformance_session(server_url).await {
        Ok(()) => {
            eprintln!("conformance: connected, listed tools, called a tool");
            ExitCode::SUCCESS
        }
        Err(e) => {
            let mut message = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                message.push_str(": ");
                message.push_str(&cause.to_string());
                source = cause.source();
            }
            eprintln!("conformance: failed: {message}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mcp_fixtures::{AuthServer, Fixtures, ResourceServer};
    use serde_json::json;

    fn metadata(grants: &[&str]) -> AuthorizationServerMetadata {
        serde_json::from_value(json!({
            "issuer": "http://127.0.0.1:1",
            "token_endpoint": "http://127.0.0.1:1/token",
            "grant_types_supported": grants,
        }))
        .unwrap()
    }

    fn context(value: serde_json::Value) -> Context {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn sample_arguments_follow_the_required_properties() {
        let schema = json!({
            "type": "object",
            "properties": {"a": {"type": "number"}, "b": {"type": "integer"}, "s": {"type": "string"}, "o": {}},
            "required": ["a", "b", "s"]
        });
        let args = sample_arguments(schema.as_object().unwrap());
        assert_eq!(serde_json::Value::Object(args), json!({"a": 1, "b": 1, "s": "test"}));
        assert!(sample_arguments(json!({"type": "object"}).as_object().unwrap()).is_empty());
    }

    #[test]
    fn the_grant_follows_the_context_and_the_metadata() {
        let none = Context::default();
        let secret = context(json!({"client_id": "c", "client_secret": "s"}));
        let idp = context(json!({"client_id": "c", "client_secret": "s", "idp_id_token": "t"}));
        let code = metadata(&["authorization_code", "refresh_token"]);
        let cc = metadata(&["client_credentials"]);
        let jwt = metadata(&[JWT_BEARER]);
        let workload = context(json!({"client_id": "w", "valid_jwt": "eyJ.a.b"}));
        assert_eq!(choose_grant(&workload, &jwt).unwrap(), Grant::WorkloadIdentity);
        assert_eq!(choose_grant(&workload, &code).unwrap(), Grant::AuthorizationCode);
        assert_eq!(choose_grant(&none, &code).unwrap(), Grant::AuthorizationCode);
        // Pre-registered credentials alone do not turn a user flow into a machine flow.
        assert_eq!(choose_grant(&secret, &code).unwrap(), Grant::AuthorizationCode);
        assert_eq!(choose_grant(&secret, &cc).unwrap(), Grant::ClientCredentials);
        assert_eq!(choose_grant(&idp, &jwt).unwrap(), Grant::CrossApp);
        // No credentials for a machine-only server, or an ID token the server cannot take.
        assert!(matches!(choose_grant(&none, &cc), Err(Error::Provider { .. })));
        assert!(matches!(choose_grant(&idp, &cc), Ok(Grant::ClientCredentials)));
        assert!(matches!(choose_grant(&none, &jwt), Err(Error::Provider { .. })));
    }

    #[test]
    fn the_context_key_selects_private_key_jwt_and_other_algorithms_are_refused() {
        let server: Url = "http://127.0.0.1:1/mcp".parse().unwrap();
        let es256 = context(json!({"client_id": "c", "private_key_pem": "pem"}));
        let config =
            provider(server.clone(), es256).unwrap().client_config("http://127.0.0.1:1").unwrap();
        let pre = config.pre_registered.unwrap();
        assert_eq!(pre.auth_method, Some(TokenEndpointAuthMethod::PrivateKeyJwt));
        assert!(pre.client_key.is_some());

        let rs256 = context(
            json!({"client_id": "c", "private_key_pem": "pem", "signing_algorithm": "RS256"}),
        );
        let err = provider(server.clone(), rs256)
            .unwrap()
            .client_config("http://127.0.0.1:1")
            .unwrap_err();
        assert!(matches!(&err, Error::InvalidConfig(m) if m.contains("RS256")), "{err:?}");

        let config = provider(server, Context::default())
            .unwrap()
            .client_config("http://127.0.0.1:1")
            .unwrap();
        assert!(config.pre_registered.is_none());
        assert_eq!(config.metadata_document_url.unwrap().as_str(), CIMD_URL);
    }

    /// Against the fixtures: dynamic registration, a headless authorization, then a 403
    /// `insufficient_scope` on `counter` steps up (a second authorization with the union of
    /// the scopes, the registration reused) and the retried call succeeds.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn authorizes_headlessly_and_steps_up_on_insufficient_scope() {
        let auth = AuthServer::builder().client_metadata_documents(false).spawn().await.unwrap();
        let resource = ResourceServer::builder(&auth).spawn().await.unwrap();
        let fx = Fixtures::from_parts(auth, resource);
        let p = provider(fx.resource().url().parse().unwrap(), Context::default()).unwrap();
        session(p.clone(), Some("counter"), serde_json::Map::new()).await.unwrap();

        let stats = fx.auth().stats();
        assert_eq!(stats.registrations, 1, "{stats:?}");
        assert_eq!(stats.authorization_code_requests, 2, "{stats:?}");
        assert_eq!(fx.resource().stats().forbidden, 1);
        assert_eq!(fx.resource().counter(), 1);
        let state = p.auth.lock().await;
        let scope = state.scope.clone().unwrap_or_default();
        assert!(scope.contains("mcp:tools") && scope.contains("mcp:write"), "{scope}");
        assert_eq!(state.attempts.made(), 2);
        // The provider's Debug output carries no token.
        let token = p.current().unwrap();
        assert!(!format!("{p:?}").contains(token.expose()));
    }

    /// A protected-resource document naming another resource aborts before any authorization
    /// request, and the run fails.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_resource_mismatch_aborts_before_authorizing() {
        let auth = AuthServer::builder().client_metadata_documents(false).spawn().await.unwrap();
        let resource = ResourceServer::builder(&auth)
            .advertised_resource("https://evil.example.com/mcp")
            .spawn()
            .await
            .unwrap();
        let fx = Fixtures::from_parts(auth, resource);
        let p = provider(fx.resource().url().parse().unwrap(), Context::default()).unwrap();
        let err = session(p, Some("echo"), serde_json::Map::new()).await.unwrap_err();
        assert!(matches!(err, Error::Provider { .. }), "{err:?}");
        assert_eq!(fx.auth().stats().authorization_requests, 0);
        assert_eq!(fx.auth().stats().token_requests(), 0);
    }

    /// Nothing listening: the run fails with a transport error, and authorizes nothing.
    #[tokio::test]
    async fn an_unreachable_server_fails_the_run() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/mcp", listener.local_addr().unwrap());
        drop(listener);
        let p = provider(url.parse().unwrap(), Context::default()).unwrap();
        let err = session(p.clone(), Some("echo"), serde_json::Map::new()).await.unwrap_err();
        assert!(matches!(err, Error::Transport(_)), "{err:?}");
        assert_eq!(p.auth.lock().await.attempts.made(), 0);
        assert!(run_conformance(&url).await == ExitCode::FAILURE);
    }
}
