//! The authorization server's HTTP endpoints (axum).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use url::Url;

use super::core::{AuthMethod, AuthorizeRequest, Client, Core, OAuthError, split_scope};
use crate::dpop::{DpopChecker, DpopRefusal};
use crate::stats::AuthEventKind;

/// What every handler shares.
#[derive(Debug, Clone)]
pub(crate) struct App {
    pub(crate) core: Arc<Core>,
    /// The token endpoint's DPoP proofs and nonce (knob `dpop`).
    pub(crate) dpop: Arc<DpopChecker>,
    /// `http://127.0.0.1:PORT` plus the issuer path.
    pub(crate) issuer: String,
    pub(crate) shutdown: CancellationToken,
    pub(crate) http: reqwest::Client,
}

impl App {
    pub(crate) fn endpoint(&self, name: &str) -> String {
        format!("{}/{name}", self.issuer)
    }
}

pub(crate) fn router(app: App) -> Router {
    let cfg = &app.core.config;
    let p = cfg.issuer_path.clone();
    let mut r = Router::new()
        .route(&format!("{p}/authorize"), get(authorize))
        .route(&format!("{p}/token"), post(token))
        .route(&format!("{p}/revoke"), post(revoke))
        .route(&format!("{p}/introspect"), post(introspect))
        .route(&format!("{p}/jwks"), get(|| async { axum::Json(json!({ "keys": [] })) }));
    if cfg.registration {
        r = r.route(&format!("{p}/register"), post(register));
    }
    if cfg.rfc8414_metadata {
        r = r.route(&format!("/.well-known/oauth-authorization-server{p}"), get(oauth_metadata));
    }
    if cfg.openid_metadata {
        r = r.route(&format!("{p}/.well-known/openid-configuration"), get(openid_metadata));
        if !p.is_empty() {
            r = r.route(&format!("/.well-known/openid-configuration{p}"), get(openid_metadata));
        }
    }
    r.with_state(app)
}

/// The jwt-bearer grant type (RFC 7523).
const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

fn grant_types_supported(app: &App) -> Vec<&'static str> {
    let mut grants = vec!["authorization_code", "refresh_token", "client_credentials"];
    if !app.core.knobs.get().workload_assertions.is_empty() {
        grants.push(JWT_BEARER);
    }
    grants
}

/// The RFC 8414 document.
pub(crate) fn metadata(app: &App) -> Value {
    let cfg = &app.core.config;
    let methods = ["none", "client_secret_basic", "client_secret_post"];
    let mut m = json!({
        "issuer": app.issuer,
        "authorization_endpoint": app.endpoint("authorize"),
        "token_endpoint": app.endpoint("token"),
        "revocation_endpoint": app.endpoint("revoke"),
        "introspection_endpoint": app.endpoint("introspect"),
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": grant_types_supported(app),
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": methods,
        "revocation_endpoint_auth_methods_supported": methods,
        "introspection_endpoint_auth_methods_supported": methods,
        "authorization_response_iss_parameter_supported": true,
        "client_id_metadata_document_supported": cfg.client_metadata_documents,
    });
    if cfg.registration {
        m["registration_endpoint"] = app.endpoint("register").into();
    }
    if cfg.advertise_scopes {
        m["scopes_supported"] = cfg.scopes_supported.clone().into();
    }
    if app.core.knobs.get().omit_pkce_metadata
        && let Some(doc) = m.as_object_mut()
    {
        doc.remove("code_challenge_methods_supported");
    }
    if app.core.knobs.get().dpop {
        m["dpop_signing_alg_values_supported"] = json!(["ES256"]);
    }
    m
}

async fn oauth_metadata(State(app): State<App>) -> Response {
    axum::Json(metadata(&app)).into_response()
}

async fn openid_metadata(State(app): State<App>) -> Response {
    let mut m = metadata(&app);
    m["jwks_uri"] = app.endpoint("jwks").into();
    m["subject_types_supported"] = json!(["public"]);
    m["id_token_signing_alg_values_supported"] = json!(["RS256"]);
    axum::Json(m).into_response()
}

/// Parse `application/x-www-form-urlencoded`; a parameter given twice is an error (RFC 6749 §3.1).
fn parse_params(raw: &str) -> Result<HashMap<String, String>, OAuthError> {
    let mut out = HashMap::new();
    for (k, v) in url::form_urlencoded::parse(raw.as_bytes()) {
        if out.insert(k.to_string(), v.to_string()).is_some() {
            return Err(OAuthError::new(
                "invalid_request",
                format!("parameter {k} given more than once"),
            ));
        }
    }
    Ok(out)
}

fn oauth_error(err: &OAuthError, basic: bool) -> Response {
    let status = StatusCode::from_u16(err.status).unwrap_or(StatusCode::BAD_REQUEST);
    let mut resp =
        (status, axum::Json(json!({ "error": err.error, "error_description": err.description })))
            .into_response();
    if status == StatusCode::UNAUTHORIZED && basic {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"mcp-fixtures\""),
        );
    }
    no_store(&mut resp);
    resp
}

fn no_store(resp: &mut Response) {
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp.headers_mut().insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
}

fn is_loopback_host(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        None => false,
    }
}

/// Exact match, or RFC 8252 §7.3: loopback redirect URIs match on any port.
fn redirect_matches(registered: &str, given: &str) -> bool {
    if registered == given {
        return true;
    }
    match (Url::parse(registered), Url::parse(given)) {
        (Ok(mut a), Ok(mut b)) if a.scheme() == "http" && is_loopback_host(&a) => {
            let _ = a.set_port(None);
            let _ = b.set_port(None);
            a == b
        }
        _ => false,
    }
}

/// Find a client by id, fetching its metadata document when the id is a URL.
async fn resolve_client(app: &App, client_id: &str) -> Result<Client, OAuthError> {
    if let Some(client) = app.core.client(client_id) {
        return Ok(client);
    }
    let is_url = client_id.starts_with("https://") || client_id.starts_with("http://");
    if !(app.core.config.client_metadata_documents && is_url) {
        return Err(OAuthError::new("invalid_client", "unknown client"));
    }
    let url = Url::parse(client_id)
        .map_err(|_| OAuthError::new("invalid_client", "client id is not a valid URL"))?;
    if !is_loopback_host(&url) {
        return Err(OAuthError::new(
            "invalid_client",
            "the fixture fetches client metadata from loopback only",
        ));
    }
    let fetch = async {
        let resp = app.http.get(url.clone()).timeout(Duration::from_secs(5)).send().await.ok()?;
        if !resp.status().is_success() {
            return None;
        }
        let body = resp.bytes().await.ok()?;
        serde_json::from_slice::<Value>(&body).ok()
    };
    let doc = fetch.await.ok_or_else(|| {
        OAuthError::new("invalid_client", "client metadata document could not be fetched")
    })?;
    if doc.get("client_id").and_then(Value::as_str) != Some(client_id) {
        return Err(OAuthError::new(
            "invalid_client",
            "client metadata document names another client_id",
        ));
    }
    let method = doc.get("token_endpoint_auth_method").and_then(Value::as_str).unwrap_or("none");
    if method != "none" {
        return Err(OAuthError::new(
            "invalid_client",
            format!("unsupported token_endpoint_auth_method {method}"),
        ));
    }
    let client = Client {
        id: client_id.to_owned(),
        secret: None,
        method: AuthMethod::None,
        redirect_uris: strings(doc.get("redirect_uris")),
        grant_types: strings(doc.get("grant_types")),
        name: doc.get("client_name").and_then(Value::as_str).map(str::to_owned),
    };
    app.core.insert_metadata_client(client.clone());
    Ok(client)
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
        .unwrap_or_default()
}

fn bad_request(text: impl Into<String>) -> Response {
    (StatusCode::BAD_REQUEST, text.into()).into_response()
}

fn redirect_with(redirect_uri: &str, pairs: &[(&str, &str)]) -> Response {
    let Ok(mut url) = Url::parse(redirect_uri) else { return bad_request("invalid redirect_uri") };
    {
        let mut q = url.query_pairs_mut();
        for (k, v) in pairs {
            q.append_pair(k, v);
        }
    }
    let mut resp = StatusCode::FOUND.into_response();
    if let Ok(v) = HeaderValue::from_str(url.as_str()) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    no_store(&mut resp);
    resp
}

async fn authorize(State(app): State<App>, RawQuery(query): RawQuery) -> Response {
    let params = match parse_params(query.as_deref().unwrap_or("")) {
        Ok(p) => p,
        Err(e) => return bad_request(e.description),
    };
    let Some(client_id) = params.get("client_id") else {
        return bad_request("client_id is required");
    };
    let client = match resolve_client(&app, client_id).await {
        Ok(c) => c,
        Err(e) => return bad_request(e.description),
    };
    let Some(redirect_uri) = params.get("redirect_uri") else {
        return bad_request("redirect_uri is required");
    };
    if !client.redirect_uris.iter().any(|r| redirect_matches(r, redirect_uri)) {
        return bad_request("redirect_uri is not registered for this client");
    }
    let state = params.get("state").cloned();
    let issuer = match app.core.knobs.get().redirect_iss {
        crate::knobs::RedirectIss::Correct => Some(app.issuer.clone()),
        crate::knobs::RedirectIss::Missing => None,
        crate::knobs::RedirectIss::Wrong => Some("https://evil.example.com".to_owned()),
        crate::knobs::RedirectIss::TrailingSlash => Some(format!("{}/", app.issuer)),
    };
    let fail = |error: &str, description: &str| {
        let mut pairs = vec![("error", error), ("error_description", description)];
        if let Some(iss) = &issuer {
            pairs.push(("iss", iss.as_str()));
        }
        if let Some(s) = &state {
            pairs.push(("state", s.as_str()));
        }
        redirect_with(redirect_uri, &pairs)
    };
    if params.get("response_type").map(String::as_str) != Some("code") {
        return fail("unsupported_response_type", "only response_type=code is supported");
    }
    let Some(challenge) = params.get("code_challenge") else {
        return fail("invalid_request", "code_challenge is required (PKCE)");
    };
    if params.get("code_challenge_method").map(String::as_str) != Some("S256") {
        return fail("invalid_request", "code_challenge_method must be S256");
    }
    let scope = match app.core.resolve_scope(split_scope(params.get("scope").map(String::as_str))) {
        Ok(s) => s,
        Err(e) => return fail(e.error, &e.description),
    };
    let resource = params.get("resource").cloned();
    let seen = format!("authorize {}", resource.as_deref().unwrap_or("-"));
    app.core.record(|s| s.resource_parameters.push(seen), None);
    if let Some(r) = &resource
        && Url::parse(r).map(|u| u.fragment().is_some()).unwrap_or(true)
    {
        return fail("invalid_target", "resource must be an absolute URI without a fragment");
    }
    let req = AuthorizeRequest {
        client_id: client.id.clone(),
        redirect_uri: redirect_uri.clone(),
        challenge: challenge.clone(),
        scope,
        resource,
    };
    app.core.authorization_requested(&req);
    let approved = match app.core.knobs.get().approval {
        crate::knobs::Approval::Auto => true,
        crate::knobs::Approval::Deny => false,
        crate::knobs::Approval::Manual => {
            let decision = app.core.wait_for_decision(&req);
            tokio::select! {
                d = decision => d.unwrap_or(false),
                () = app.shutdown.cancelled() => {
                    return (StatusCode::SERVICE_UNAVAILABLE, "server shutting down").into_response();
                }
            }
        }
    };
    if !approved {
        app.core.denied(&client.id);
        return fail("access_denied", "the user denied the request");
    }
    let code = app.core.approve(req);
    let mut pairs = vec![("code", code.as_str())];
    if let Some(iss) = &issuer {
        pairs.push(("iss", iss.as_str()));
    }
    if let Some(s) = &state {
        pairs.push(("state", s.as_str()));
    }
    redirect_with(redirect_uri, &pairs)
}

/// The client authentication a request presented: (client id, secret, method).
fn presented_client(
    headers: &HeaderMap,
    params: &HashMap<String, String>,
) -> Result<(String, Option<String>, AuthMethod), OAuthError> {
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("basic"))
        .map(|(_, creds)| creds.trim().to_owned());
    if let Some(creds) = basic {
        if params.contains_key("client_secret") {
            return Err(OAuthError::new(
                "invalid_request",
                "more than one client authentication method",
            ));
        }
        let decoded = STANDARD
            .decode(creds)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| OAuthError::new("invalid_client", "malformed Basic credentials"))?;
        let (id, secret) = decoded.split_once(':').ok_or_else(|| {
            OAuthError::new("invalid_client", "Basic credentials without a colon")
        })?;
        let (id, secret) = (form_decode(id), form_decode(secret));
        if params.get("client_id").is_some_and(|body_id| *body_id != id) {
            return Err(OAuthError::new(
                "invalid_client",
                "client_id differs from the Basic credentials",
            ));
        }
        return Ok((id, Some(secret), AuthMethod::Basic));
    }
    let id = params
        .get("client_id")
        .cloned()
        .ok_or_else(|| OAuthError::new("invalid_client", "no client authentication"))?;
    match params.get("client_secret") {
        Some(secret) => Ok((id, Some(secret.clone()), AuthMethod::Post)),
        None => Ok((id, None, AuthMethod::None)),
    }
}

/// RFC 6749 §2.3.1: Basic credentials are form-urlencoded before base64.
fn form_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

async fn authenticated(
    app: &App,
    headers: &HeaderMap,
    params: &HashMap<String, String>,
) -> Result<Client, (OAuthError, bool)> {
    let (id, secret, method) = presented_client(headers, params).map_err(|e| (e, false))?;
    let basic = method == AuthMethod::Basic;
    resolve_client(app, &id).await.map_err(|e| (e, basic))?;
    app.core.authenticate(&id, secret.as_deref(), method).map_err(|e| (e, basic))
}

fn form_body(body: &Bytes) -> Result<HashMap<String, String>, OAuthError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| OAuthError::new("invalid_request", "body is not UTF-8"))?;
    parse_params(text)
}

async fn token(State(app): State<App>, headers: HeaderMap, body: Bytes) -> Response {
    let parsed = form_body(&body);
    let grant = parsed.as_ref().ok().and_then(|p| p.get("grant_type").cloned()).unwrap_or_default();
    let resource = parsed.as_ref().ok().and_then(|p| p.get("resource").cloned());
    let seen = format!("token {grant} {}", resource.as_deref().unwrap_or("-"));
    app.core.record(|s| s.resource_parameters.push(seen), None);
    app.core.record(
        |s| match grant.as_str() {
            "authorization_code" => s.authorization_code_requests += 1,
            "refresh_token" => s.refresh_token_requests += 1,
            "client_credentials" => s.client_credentials_requests += 1,
            _ => {
                s.other_token_requests += 1;
                s.jwt_bearer_requests += u64::from(grant == JWT_BEARER);
            }
        },
        None,
    );
    let knobs = app.core.knobs.get();
    if !knobs.token_delay.is_zero() {
        tokio::select! {
            // Real time, like a real server's latency (the fixture's own clock may be manual).
            () = mcp_clock::Clock::sleep(&mcp_clock::SystemClock, knobs.token_delay) => {}
            () = app.shutdown.cancelled() => return StatusCode::SERVICE_UNAVAILABLE.into_response(),
        }
    }
    if knobs.hangs(&grant) {
        tokio::select! {
            () = app.core.knobs.hang_cleared(&grant) => {}
            () = app.shutdown.cancelled() => return StatusCode::SERVICE_UNAVAILABLE.into_response(),
        }
    }
    if let Some(failure) = app.core.knobs.take_failure() {
        app.core.record(
            |s| s.injected_failures += 1,
            Some(AuthEventKind::FailureInjected { status: failure.status() }),
        );
        return crate::knobs::failure_response(failure);
    }
    let params = match parsed {
        Ok(p) => p,
        Err(e) => return oauth_error(&e, false),
    };
    let client = match authenticated(&app, &headers, &params).await {
        Ok(c) => c,
        Err((e, basic)) => {
            refused(&app, &grant, &e);
            return oauth_error(&e, basic);
        }
    };
    let jkt = match token_proof(&app, &headers) {
        Ok(jkt) => jkt,
        Err(resp) => return *resp,
    };
    let jkt = jkt.as_deref();
    let answer = match grant.as_str() {
        "authorization_code" => app.core.exchange_code(&client, &params, jkt),
        "refresh_token" => app.core.refresh(&client, &params, jkt),
        "client_credentials" => app.core.client_credentials(&client, &params, jkt),
        JWT_BEARER => app.core.jwt_bearer(&client, &params),
        "" => Err(OAuthError::new("invalid_request", "grant_type is required")),
        other => Err(OAuthError::new(
            "unsupported_grant_type",
            format!("grant_type {other} is not supported"),
        )),
    };
    if grant == "refresh_token" {
        // The server has acted (rotated, refused, or detected reuse): now the answer may come
        // late, or be lost.
        let delay = app.core.knobs.get().refresh_delay;
        if !delay.is_zero() {
            tokio::select! {
                () = mcp_clock::Clock::sleep(&mcp_clock::SystemClock, delay) => {}
                () = app.shutdown.cancelled() => return StatusCode::SERVICE_UNAVAILABLE.into_response(),
            }
        }
        if app.core.knobs.take_lost_refresh_answer() {
            app.core.record(|s| s.lost_answers += 1, None);
            return StatusCode::BAD_GATEWAY.into_response();
        }
    }
    match answer {
        Ok(answer) => {
            let t = answer.tokens;
            let knobs = app.core.knobs.get();
            let token_type = match (t.dpop_bound, knobs.lowercase_token_type) {
                (true, _) => "DPoP",
                (false, true) => "bearer",
                (false, false) => "Bearer",
            };
            let mut body = json!({
                "access_token": t.access_token,
                "token_type": token_type,
                "scope": t.scope,
            });
            if knobs.omit_scope {
                body.as_object_mut().map(|b| b.remove("scope"));
            }
            if let Some(e) = t.expires_in {
                body["expires_in"] =
                    if knobs.expires_in_as_string { e.to_string().into() } else { e.into() };
            }
            if let Some(rt) = t.refresh_token {
                body["refresh_token"] = rt.into();
            }
            let mut resp = axum::Json(body).into_response();
            no_store(&mut resp);
            resp
        }
        Err(e) => {
            refused(&app, &grant, &e);
            oauth_error(&e, false)
        }
    }
}

/// The DPoP proof of a token request (RFC 9449 §5): with the knob on, required and checked
/// (its thumbprint binds the tokens); with it off, ignored (a server without DPoP; tokens bound
/// while it was on are then refused a refresh). `Err` is the answer: `400 invalid_dpop_proof`,
/// or `400 use_dpop_nonce` with `DPoP-Nonce`.
fn token_proof(app: &App, headers: &HeaderMap) -> Result<Option<String>, Box<Response>> {
    if !app.core.knobs.get().dpop {
        return Ok(None);
    }
    let proof = headers.get("dpop").and_then(|v| v.to_str().ok());
    let now = app.core.now(&app.core.knobs.get());
    match app.dpop.check(proof, "POST", &app.endpoint("token"), None, now) {
        Ok(jkt) => Ok(Some(jkt)),
        Err(DpopRefusal::UseNonce) => {
            app.core.record(|s| s.dpop_nonce_challenges += 1, None);
            let e = OAuthError::new("use_dpop_nonce", "use the DPoP-Nonce of this response");
            let mut resp = oauth_error(&e, false);
            if let Ok(v) = HeaderValue::from_str(app.dpop.nonce()) {
                resp.headers_mut().insert("dpop-nonce", v);
            }
            Err(Box::new(resp))
        }
        Err(refusal) => {
            app.core.record(|s| s.dpop_proofs_refused += 1, None);
            let e = OAuthError::new("invalid_dpop_proof", refusal.to_string());
            Err(Box::new(oauth_error(&e, false)))
        }
    }
}

fn refused(app: &App, grant: &str, e: &OAuthError) {
    tracing::debug!(grant, error = e.error, description = %e.description, "token request refused");
    app.core.record(
        |_| {},
        Some(AuthEventKind::TokenRequestRefused {
            grant: grant.to_owned(),
            error: e.error.to_owned(),
        }),
    );
}

async fn revoke(State(app): State<App>, headers: HeaderMap, body: Bytes) -> Response {
    let params = match form_body(&body) {
        Ok(p) => p,
        Err(e) => return oauth_error(&e, false),
    };
    let client = match authenticated(&app, &headers, &params).await {
        Ok(c) => c,
        Err((e, basic)) => return oauth_error(&e, basic),
    };
    let Some(token) = params.get("token") else {
        return oauth_error(&OAuthError::new("invalid_request", "token is required"), false);
    };
    app.core.revoke(&client, token);
    StatusCode::OK.into_response()
}

async fn introspect(State(app): State<App>, headers: HeaderMap, body: Bytes) -> Response {
    let params = match form_body(&body) {
        Ok(p) => p,
        Err(e) => return oauth_error(&e, false),
    };
    if let Err((e, basic)) = authenticated(&app, &headers, &params).await {
        return oauth_error(&e, basic);
    }
    let Some(token) = params.get("token") else {
        return oauth_error(&OAuthError::new("invalid_request", "token is required"), false);
    };
    let mut resp = axum::Json(app.core.introspect(token)).into_response();
    no_store(&mut resp);
    resp
}

fn registration_error(error: &'static str, description: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(json!({ "error": error, "error_description": description })),
    )
        .into_response()
}

async fn register(State(app): State<App>, body: Bytes) -> Response {
    let Ok(doc) = serde_json::from_slice::<Value>(&body) else {
        return registration_error("invalid_client_metadata", "body is not JSON");
    };
    let redirect_uris = strings(doc.get("redirect_uris"));
    if redirect_uris.iter().any(|r| Url::parse(r).map(|u| u.fragment().is_some()).unwrap_or(true)) {
        return registration_error(
            "invalid_redirect_uri",
            "redirect_uris must be absolute URIs without fragments",
        );
    }
    let method_name = doc
        .get("token_endpoint_auth_method")
        .and_then(Value::as_str)
        .unwrap_or("client_secret_basic");
    let Some(method) = AuthMethod::parse(method_name) else {
        return registration_error(
            "invalid_client_metadata",
            "unsupported token_endpoint_auth_method",
        );
    };
    let mut grant_types = strings(doc.get("grant_types"));
    if grant_types.is_empty() {
        grant_types.push("authorization_code".to_owned());
    }
    let supported = ["authorization_code", "refresh_token", "client_credentials", JWT_BEARER];
    if grant_types.iter().any(|g| !supported.contains(&g.as_str())) {
        return registration_error("invalid_client_metadata", "unsupported grant type");
    }
    if grant_types.iter().any(|g| g == "authorization_code") && redirect_uris.is_empty() {
        return registration_error(
            "invalid_redirect_uri",
            "redirect_uris are required for authorization_code",
        );
    }
    let name = doc.get("client_name").and_then(Value::as_str).map(str::to_owned);
    let registered = app.core.register(
        method,
        redirect_uris.clone(),
        grant_types.clone(),
        name.clone(),
        (None, None),
        true,
    );
    let now = app.core.now(&app.core.knobs.get());
    let mut answer = json!({
        "client_id": registered.client_id,
        "client_id_issued_at": now.as_secs(),
        "redirect_uris": redirect_uris,
        "token_endpoint_auth_method": method.as_str(),
        "grant_types": grant_types,
        "response_types": ["code"],
    });
    if let Some(secret) = registered.client_secret {
        answer["client_secret"] = secret.into();
        answer["client_secret_expires_at"] = 0.into();
    }
    if let Some(name) = name {
        answer["client_name"] = name.into();
    }
    if let Some(scope) = doc.get("scope") {
        answer["scope"] = scope.clone();
    }
    let mut resp = (StatusCode::CREATED, axum::Json(answer)).into_response();
    no_store(&mut resp);
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_redirects_match_on_any_port() {
        assert!(redirect_matches("http://127.0.0.1:1234/cb", "http://127.0.0.1:9999/cb"));
        assert!(!redirect_matches("http://127.0.0.1:1234/cb", "http://127.0.0.1:1234/other"));
        assert!(!redirect_matches("https://app.example/cb", "https://app.example:444/cb"));
    }

    #[test]
    fn repeated_parameters_are_refused() {
        assert!(parse_params("a=1&b=2").is_ok());
        assert_eq!(parse_params("a=1&a=2").unwrap_err().error, "invalid_request");
    }

    #[test]
    fn basic_credentials_are_form_decoded() {
        assert_eq!(form_decode("a%3Ab+c"), "a:b c");
    }
}
