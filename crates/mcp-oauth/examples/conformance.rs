//! A minimal MCP client that drives the official MCP conformance suite's client auth scenarios
//! with this crate, to check that the crate supplies everything they need. It is a test
//! harness, not the product CLI.
//!
//! ```text
//! cargo build -p mcp-oauth --example conformance
//! ../shared/tools/conformance-client.sh "$PWD/target/debug/examples/conformance"
//! ```
//! The suite passes the MCP server URL as the last argument and what the client holds in
//! `MCP_CONFORMANCE_CONTEXT` (the scenario's name in `MCP_CONFORMANCE_SCENARIO` is not read: the
//! grant is chosen from the context and the authorization server's metadata). The client runs `initialize`,
//! `notifications/initialized`, `tools/list` and `tools/call test-tool`, authorizing on a 401
//! and stepping up on a 403 `insufficient_scope` (at most three authorizations per request).

use std::process::ExitCode;

use mcp_clock::SharedClock;
use mcp_oauth::{
    AuthAttempts, BearerChallenge, ClientConfig, ClientRegistration, ClientSecret,
    ClientSigningKey, Discovery, EnterpriseGrant, Error, HttpClient, HttpPolicy, HttpRequest,
    HttpResponse, OAuthClient, PreRegisteredClient, RegistrationSource, ReqwestHttpClient,
    TokenEndpointAuthMethod, select_scope,
};
use serde_json::{Value, json};
use url::Url;

const CIMD_URL: &str = "https://conformance-test.local/client-metadata.json";
const REDIRECT_URI: &str = "http://localhost:3000/callback";

struct Session {
    http: ReqwestHttpClient,
    oauth: OAuthClient,
    server: Url,
    context: Value,
    token: Option<String>,
    scope: Option<String>,
    registration: Option<ClientRegistration>,
    session_id: Option<String>,
    next_id: u64,
}

type Failure = Box<dyn std::error::Error>;

fn ctx_str<'a>(ctx: &'a Value, key: &str) -> Option<&'a str> {
    ctx.get(key).and_then(Value::as_str)
}

impl Session {
    async fn post(&mut self, body: &Value) -> Result<HttpResponse, Failure> {
        let mut headers = vec![
            ("content-type".to_owned(), "application/json".to_owned()),
            ("accept".to_owned(), "application/json, text/event-stream".to_owned()),
        ];
        if let Some(token) = &self.token {
            headers.push(("authorization".into(), format!("Bearer {token}")));
        }
        if let Some(id) = &self.session_id {
            headers.push(("mcp-session-id".into(), id.clone()));
        }
        let mut request = HttpRequest::post_json(self.server.clone(), body);
        request.headers = headers;
        let response = self.http.call(request).await?;
        if let Some(id) = response.header("mcp-session-id") {
            self.session_id = Some(id.to_owned());
        }
        Ok(response)
    }

    /// Send a JSON-RPC message, authorizing as the server demands.
    async fn send(
        &mut self,
        method: &str,
        params: Value,
        notification: bool,
    ) -> Result<Value, Failure> {
        let mut body = json!({"jsonrpc": "2.0", "method": method, "params": params});
        if !notification {
            self.next_id += 1;
            body["id"] = json!(self.next_id);
        }
        let mut attempts = AuthAttempts::new(3);
        loop {
            let response = self.post(&body).await?;
            let challenge =
                BearerChallenge::from_headers(response.header_values("www-authenticate"))?;
            match response.status {
                200..=299 if notification => return Ok(Value::Null),
                200..=299 => return parse_rpc(&response),
                401 => {
                    attempts.begin()?;
                    let scope = self.scope.clone();
                    self.authorize(challenge.as_ref(), scope.as_deref(), false).await?;
                }
                403 if challenge.as_ref().is_some_and(BearerChallenge::is_insufficient_scope) => {
                    let challenge = challenge.unwrap_or_default();
                    let scope = attempts.step_up(self.scope.as_deref(), &challenge)?;
                    attempts.begin()?;
                    self.authorize(Some(&challenge), Some(&scope), true).await?;
                }
                status => return Err(format!("{method}: HTTP {status}").into()),
            }
        }
    }

    async fn authorize(
        &mut self,
        challenge: Option<&BearerChallenge>,
        scope: Option<&str>,
        step_up: bool,
    ) -> Result<(), Failure> {
        let discovery = self.oauth.discover(&self.server, challenge).await?;
        // The grant comes from what the client holds (the context) and what the authorization
        // server offers, as a real client would choose it: never from the scenario's name.
        let asm = &discovery.authorization_server;
        let jwt_bearer = asm.supports_grant("urn:ietf:params:oauth:grant-type:jwt-bearer");
        if ctx_str(&self.context, "idp_id_token").is_some() && jwt_bearer {
            return self.cross_app(&discovery).await;
        }
        let client_credentials = !asm.supports_grant("authorization_code")
            && asm.supports_grant("client_credentials")
            && ctx_str(&self.context, "client_id").is_some();
        if client_credentials {
            let registration = self.pre_registered(&discovery).await?;
            let tokens = self.oauth.client_credentials(&discovery, &registration, scope).await?;
            self.token = Some(tokens.access_token.secret().to_owned());
            return Ok(());
        }
        let registration = match &self.registration {
            Some(r) if r.issuer == discovery.issuer() => r.clone(),
            _ => {
                let r = self
                    .oauth
                    .register(&discovery, &self.client_config(discovery.issuer()))
                    .await?;
                self.registration = Some(r.clone());
                r
            }
        };
        // A step-up asks for exactly the union; otherwise keep what was granted before, or select.
        let scope = match scope {
            Some(s) => Some(s.to_owned()),
            None if step_up => None,
            None => select_scope(challenge, &discovery),
        };
        let (url, pending) = self.oauth.authorization_url(
            &discovery,
            &registration,
            REDIRECT_URI,
            scope.as_deref(),
        )?;
        let callback = self.oauth.authorize_without_browser(&url).await?;
        let tokens =
            self.oauth.exchange_code(&discovery, &registration, &pending, &callback).await?;
        self.token = Some(tokens.access_token.secret().to_owned());
        self.scope = tokens.scope.or(pending.scope);
        Ok(())
    }

    /// The context's credentials are for the suite's authorization server, which the context
    /// does not name: they are bound to the issuer discovered for this run.
    fn client_config(&self, issuer: &str) -> ClientConfig {
        let mut config = ClientConfig::new("mcp-oauth conformance", REDIRECT_URI);
        config.metadata_document_url = Url::parse(CIMD_URL).ok();
        if let Some(id) = ctx_str(&self.context, "client_id") {
            config.pre_registered = Some(PreRegisteredClient {
                issuer: issuer.to_owned(),
                client_id: id.to_owned(),
                client_secret: ctx_str(&self.context, "client_secret").map(ClientSecret::new),
                client_key: None,
                auth_method: None,
            });
        }
        config
    }

    async fn pre_registered(&self, discovery: &Discovery) -> Result<ClientRegistration, Failure> {
        let mut config = self.client_config(discovery.issuer());
        if let (Some(pre), Some(pem)) =
            (config.pre_registered.as_mut(), ctx_str(&self.context, "private_key_pem"))
        {
            pre.client_key = Some(ClientSigningKey::es256(pem));
            pre.auth_method = Some(TokenEndpointAuthMethod::PrivateKeyJwt);
        }
        Ok(self.oauth.register(discovery, &config).await?)
    }

    async fn cross_app(&mut self, discovery: &Discovery) -> Result<(), Failure> {
        let c = &self.context;
        let missing = |k: &str| format!("context has no {k}");
        let idp_client = ClientRegistration {
            client_id: ctx_str(c, "idp_client_id")
                .ok_or_else(|| missing("idp_client_id"))?
                .to_owned(),
            client_secret: None,
            client_key: None,
            auth_method: TokenEndpointAuthMethod::None,
            source: RegistrationSource::PreRegistered,
            issuer: ctx_str(c, "idp_issuer").unwrap_or_default().to_owned(),
            client_secret_expires_at: None,
        };
        let grant = EnterpriseGrant {
            idp_token_endpoint: ctx_str(c, "idp_token_endpoint")
                .ok_or_else(|| missing("idp_token_endpoint"))?
                .parse()?,
            idp_client,
            id_token: mcp_oauth::IdToken::new(
                ctx_str(c, "idp_id_token").ok_or_else(|| missing("idp_id_token"))?,
            ),
            scope: None,
        };
        let mut registration = self.pre_registered(discovery).await?;
        registration.auth_method = TokenEndpointAuthMethod::ClientSecretBasic;
        let tokens = self.oauth.enterprise_token(discovery, &registration, &grant).await?;
        self.token = Some(tokens.access_token.secret().to_owned());
        Ok(())
    }
}

/// The JSON-RPC result of a JSON or SSE response.
fn parse_rpc(response: &HttpResponse) -> Result<Value, Failure> {
    let text = String::from_utf8_lossy(&response.body);
    let is_sse =
        response.header("content-type").is_some_and(|c| c.starts_with("text/event-stream"));
    let json_text = if is_sse {
        text.lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("")
    } else {
        &text
    };
    let value: Value = serde_json::from_str(json_text)?;
    if let Some(error) = value.get("error") {
        return Err(format!("JSON-RPC error: {error}").into());
    }
    Ok(value.get("result").cloned().unwrap_or(Value::Null))
}

async fn run() -> Result<(), Failure> {
    let server: Url =
        std::env::args().skip(1).next_back().ok_or("usage: conformance <server-url>")?.parse()?;
    let context = std::env::var("MCP_CONFORMANCE_CONTEXT")
        .ok()
        .and_then(|c| serde_json::from_str(&c).ok())
        .unwrap_or(Value::Null);
    let http = ReqwestHttpClient::new(HttpPolicy::default())?;
    let oauth = OAuthClient::new(http.clone(), SharedClock::system());
    let mut s = Session {
        http,
        oauth,
        server,
        context,
        token: None,
        scope: None,
        registration: None,
        session_id: None,
        next_id: 0,
    };
    let init = json!({
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "mcp-oauth-conformance", "version": env!("CARGO_PKG_VERSION")}
    });
    s.send("initialize", init, false).await?;
    s.send("notifications/initialized", json!({}), true).await?;
    s.send("tools/list", json!({}), false).await?;
    s.send("tools/call", json!({"name": "test-tool", "arguments": {}}), false).await?;
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let class = e
                .downcast_ref::<Error>()
                .map(|e| format!(" ({:?})", e.class()))
                .unwrap_or_default();
            eprintln!("conformance client failed: {e}{class}");
            ExitCode::FAILURE
        }
    }
}
