//! Test support: a scripted server behind the HTTP seam, recording every request.

use std::sync::{Arc, Mutex};

use mcp_clock::ManualClock;
use serde_json::Value;

use crate::{HttpRequest, HttpResponse, OAuthClient};

/// Requests the mock saw, in order.
#[derive(Clone, Default)]
pub(crate) struct Log(Arc<Mutex<Vec<HttpRequest>>>);

impl Log {
    pub(crate) fn all(&self) -> Vec<HttpRequest> {
        self.0.lock().unwrap().clone()
    }

    /// `"GET /path"` for each request.
    pub(crate) fn lines(&self) -> Vec<String> {
        self.all().iter().map(|r| format!("{} {}", r.method, r.url.path())).collect()
    }

    pub(crate) fn last(&self) -> HttpRequest {
        self.all().last().cloned().expect("no request was sent")
    }
}

pub(crate) struct Mock {
    pub(crate) client: OAuthClient,
    pub(crate) log: Log,
    pub(crate) clock: ManualClock,
}

/// A client whose every request is answered by `handler`.
pub(crate) fn mock(handler: impl Fn(&HttpRequest) -> HttpResponse + Send + Sync + 'static) -> Mock {
    let log = Log::default();
    let clock = ManualClock::default();
    let seen = log.clone();
    let http = move |req: HttpRequest| {
        let response = handler(&req);
        seen.0.lock().unwrap().push(req);
        async move { Ok(response) }
    };
    Mock { client: OAuthClient::new(http, clock.shared()), log, clock }
}

pub(crate) fn json(v: Value) -> HttpResponse {
    HttpResponse::json(200, &v)
}

pub(crate) fn not_found() -> HttpResponse {
    HttpResponse::new(404)
}

pub(crate) fn url(s: &str) -> url::Url {
    s.parse().unwrap()
}

/// Authorization server metadata for `issuer` with endpoints under `base`.
pub(crate) fn asm(issuer: &str, base: &str) -> Value {
    serde_json::json!({
        "issuer": issuer,
        "authorization_endpoint": format!("{base}/authorize"),
        "token_endpoint": format!("{base}/token"),
        "registration_endpoint": format!("{base}/register"),
        "revocation_endpoint": format!("{base}/revoke"),
        "code_challenge_methods_supported": ["S256"],
        "response_types_supported": ["code"],
    })
}

/// A test-only EC P-256 key (PKCS#8), generated for these tests.
pub(crate) const TEST_KEY_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgPgCZ+zY/Qk6Q/CAT
XY9V/PuXKW/EqDeNVl/v6PrE1GmhRANCAARAao1TfTTf784PxaC+gS5JTXfPFtdw
yliqImdfQPj8y0KAc3bmRPsA4VAM+eU6a26HpJ+AHzMic52ZjjiYQFo+
-----END PRIVATE KEY-----
";

/// A discovery result for `https://as.example.com` protecting `https://mcp.example.com/mcp`,
/// with `extra` merged into the authorization server metadata.
pub(crate) fn discovery(extra: Value) -> crate::Discovery {
    let mut a = asm("https://as.example.com", "https://as.example.com");
    if let (Some(a), Some(extra)) = (a.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            a.insert(k.clone(), v.clone());
        }
    }
    serde_json::from_value(serde_json::json!({
        "server": "https://mcp.example.com/mcp",
        "resource": "https://mcp.example.com/mcp",
        "protected_resource": {
            "resource": "https://mcp.example.com/mcp",
            "authorization_servers": ["https://as.example.com"],
            "scopes_supported": ["mcp:basic", "mcp:read"]
        },
        "authorization_server": a,
        "source": "OAuth",
    }))
    .unwrap()
}

/// A registration with `method` and matching credentials.
pub(crate) fn registration(method: crate::TokenEndpointAuthMethod) -> crate::ClientRegistration {
    use crate::TokenEndpointAuthMethod as M;
    crate::ClientRegistration {
        client_id: "client-1".into(),
        client_secret: matches!(method, M::ClientSecretBasic | M::ClientSecretPost)
            .then(|| crate::ClientSecret::new("s3cr3t-value")),
        client_key: (method == M::PrivateKeyJwt)
            .then(|| crate::ClientSigningKey::es256(TEST_KEY_PEM)),
        auth_method: method,
        source: crate::RegistrationSource::PreRegistered,
        issuer: "https://as.example.com".into(),
        client_secret_expires_at: None,
    }
}

/// A successful token response body.
pub(crate) fn token_body() -> HttpResponse {
    json(serde_json::json!({
        "access_token": "at-123", "token_type": "Bearer", "expires_in": 3600, "refresh_token": "rt-456"
    }))
}
