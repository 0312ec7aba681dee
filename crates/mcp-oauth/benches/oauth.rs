//! Benchmarks of the hot, pure parts: WWW-Authenticate parsing, PKCE and authorization URL
//! building, and a client-credentials request with an ES256 client assertion (through a
//! closure seam, so no network is measured).

use criterion::{Criterion, criterion_group, criterion_main};
use mcp_clock::SharedClock;
use mcp_oauth::{
    ClientRegistration, ClientSigningKey, Discovery, HttpRequest, HttpResponse, OAuthClient,
    PkceVerifier, RegistrationSource, TokenEndpointAuthMethod, parse_challenge_header,
    pkce_challenge,
};
use std::hint::black_box;

const MCP_401: &str = r#"Bearer error="invalid_token", error_description="Missing Authorization header", scope="mcp:basic mcp:write", resource_metadata="https://mcp.example.com/.well-known/oauth-protected-resource/mcp""#;
const MULTI: &str = r#"DPoP algs="ES256 PS256", error="use_dpop_nonce", Bearer realm="x", scope="a b", Basic realm="simple", Negotiate abc+/=="#;

// A P-256 key generated for these benchmarks only.
const KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgPgCZ+zY/Qk6Q/CAT
XY9V/PuXKW/EqDeNVl/v6PrE1GmhRANCAARAao1TfTTf784PxaC+gS5JTXfPFtdw
yliqImdfQPj8y0KAc3bmRPsA4VAM+eU6a26HpJ+AHzMic52ZjjiYQFo+
-----END PRIVATE KEY-----
";

fn discovery() -> Discovery {
    serde_json::from_value(serde_json::json!({
        "server": "https://mcp.example.com/mcp",
        "resource": "https://mcp.example.com/mcp",
        "protected_resource": null,
        "authorization_server": {
            "issuer": "https://as.example.com",
            "authorization_endpoint": "https://as.example.com/authorize",
            "token_endpoint": "https://as.example.com/token",
            "code_challenge_methods_supported": ["S256"]
        },
        "source": "OAuth",
    }))
    .unwrap()
}

fn registration(method: TokenEndpointAuthMethod) -> ClientRegistration {
    ClientRegistration {
        client_id: "client-1".into(),
        client_secret: None,
        client_key: Some(ClientSigningKey::es256(KEY)),
        auth_method: method,
        source: RegistrationSource::PreRegistered,
        issuer: "https://as.example.com".into(),
        client_secret_expires_at: None,
    }
}

fn benches(c: &mut Criterion) {
    c.bench_function("parse_mcp_401_challenge", |b| {
        b.iter(|| parse_challenge_header(black_box(MCP_401)).unwrap())
    });
    c.bench_function("parse_four_challenges", |b| {
        b.iter(|| parse_challenge_header(black_box(MULTI)).unwrap())
    });
    let verifier = PkceVerifier::new("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk");
    c.bench_function("pkce_s256_challenge", |b| b.iter(|| pkce_challenge(black_box(&verifier))));

    let body =
        HttpResponse::json(200, &serde_json::json!({"access_token": "a", "token_type": "Bearer"}));
    let client = OAuthClient::new(
        move |_req: HttpRequest| {
            let body = body.clone();
            async move { Ok(body) }
        },
        SharedClock::system(),
    );
    let d = discovery();
    let public = registration(TokenEndpointAuthMethod::None);
    c.bench_function("authorization_url", |b| {
        b.iter(|| {
            client
                .authorization_url(&d, &public, "http://127.0.0.1:8765/cb", Some("mcp:basic"))
                .unwrap()
        })
    });
    let jwt = registration(TokenEndpointAuthMethod::PrivateKeyJwt);
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    c.bench_function("client_credentials_private_key_jwt", |b| {
        b.to_async(&rt).iter(|| async { client.client_credentials(&d, &jwt, None).await.unwrap() })
    });
}

criterion_group!(oauth, benches);
criterion_main!(oauth);
