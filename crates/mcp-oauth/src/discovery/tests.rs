//! Discovery tests through the HTTP seam.

use std::time::Duration;

use super::*;
use crate::testutil::{asm, json, mock, not_found, url};
use crate::{HttpResponse, parse_challenge_header};

const S: &str = "http://localhost:3000";

fn bearer(header: &str) -> BearerChallenge {
    BearerChallenge::from_challenge(&parse_challenge_header(header).unwrap()[0]).unwrap()
}

fn prm(resource: &str, issuer: &str) -> serde_json::Value {
    serde_json::json!({"resource": resource, "authorization_servers": [issuer], "scopes_supported": ["mcp:basic"]})
}

#[tokio::test]
async fn metadata_default_uses_the_challenge_url_and_rfc8414() {
    let m = mock(|r| match r.url.path() {
        "/.well-known/oauth-protected-resource/mcp" => json(prm(&format!("{S}/mcp"), S)),
        "/.well-known/oauth-authorization-server" => json(asm(S, S)),
        _ => not_found(),
    });
    let c = bearer(&format!(
        r#"Bearer resource_metadata="{S}/.well-known/oauth-protected-resource/mcp""#
    ));
    let d = m.client.discover(&url(&format!("{S}/mcp")), Some(&c)).await.unwrap();
    assert_eq!(
        m.log.lines(),
        [
            "GET /.well-known/oauth-protected-resource/mcp",
            "GET /.well-known/oauth-authorization-server"
        ]
    );
    assert_eq!(d.resource, format!("{S}/mcp"));
    assert_eq!(d.source, MetadataSource::OAuth);
    assert_eq!(d.issuer(), S);
}

#[tokio::test]
async fn var1_probes_the_path_aware_prm_and_falls_back_to_openid() {
    let m = mock(|r| match r.url.path() {
        "/.well-known/oauth-protected-resource/mcp" => json(prm(&format!("{S}/mcp"), S)),
        "/.well-known/openid-configuration" => json(asm(S, S)),
        _ => not_found(),
    });
    let d = m.client.discover(&url(&format!("{S}/mcp")), None).await.unwrap();
    assert_eq!(
        m.log.lines(),
        [
            "GET /.well-known/oauth-protected-resource/mcp",
            "GET /.well-known/oauth-authorization-server",
            "GET /.well-known/openid-configuration"
        ]
    );
    assert_eq!(d.source, MetadataSource::OpenIdConnect);
}

#[tokio::test]
async fn var2_root_prm_and_path_inserted_issuer() {
    let issuer = format!("{S}/tenant1");
    let i2 = issuer.clone();
    let m = mock(move |r| match r.url.path() {
        "/.well-known/oauth-protected-resource" => json(prm(S, &i2)),
        "/.well-known/oauth-authorization-server/tenant1" => json(asm(&i2, S)),
        _ => not_found(),
    });
    let d = m.client.discover(&url(&format!("{S}/mcp")), None).await.unwrap();
    assert_eq!(
        m.log.lines(),
        [
            "GET /.well-known/oauth-protected-resource/mcp",
            "GET /.well-known/oauth-protected-resource",
            "GET /.well-known/oauth-authorization-server/tenant1"
        ]
    );
    assert_eq!(d.resource, S, "the resource indicator is the metadata's resource");
}

#[tokio::test]
async fn var3_custom_prm_url_and_openid_path_append_never_the_root() {
    let issuer = format!("{S}/tenant1");
    let i2 = issuer.clone();
    let m = mock(move |r| match r.url.path() {
        "/custom/metadata/location.json" => json(prm(&format!("{S}/mcp"), &i2)),
        "/tenant1/.well-known/openid-configuration" => json(asm(&i2, S)),
        _ => not_found(),
    });
    let c = bearer(&format!(r#"Bearer resource_metadata="{S}/custom/metadata/location.json""#));
    m.client.discover(&url(&format!("{S}/mcp")), Some(&c)).await.unwrap();
    assert_eq!(
        m.log.lines(),
        [
            "GET /custom/metadata/location.json",
            "GET /.well-known/oauth-authorization-server/tenant1",
            "GET /.well-known/openid-configuration/tenant1",
            "GET /tenant1/.well-known/openid-configuration"
        ]
    );
}

#[tokio::test]
async fn resource_mismatch_aborts_discovery() {
    let m = mock(|r| match r.url.path() {
        "/.well-known/oauth-protected-resource/mcp" => json(prm("https://evil.example.com/mcp", S)),
        _ => json(asm(S, S)),
    });
    let err = m.client.discover(&url(&format!("{S}/mcp")), None).await.unwrap_err();
    assert!(matches!(err, Error::ResourceMismatch { .. }), "{err:?}");
    assert_eq!(m.log.all().len(), 1, "nothing is fetched after a mismatch");
}

#[test]
fn resource_coverage_is_by_path_segment() {
    let s = url("https://mcp.example.com/api/mcp");
    assert!(resource_covers(&url("https://mcp.example.com"), &s));
    assert!(resource_covers(&url("https://mcp.example.com/api"), &s));
    assert!(resource_covers(&url("https://mcp.example.com/api/mcp/"), &s));
    assert!(!resource_covers(&url("https://mcp.example.com/ap"), &s));
    assert!(!resource_covers(&url("https://mcp.example.com/api/mcp/x"), &s));
    assert!(!resource_covers(&url("http://mcp.example.com/api"), &s));
    assert!(!resource_covers(&url("https://mcp.example.com:8443/api"), &s));
}

#[tokio::test]
async fn cross_origin_resource_metadata_hint_is_ignored() {
    let m = mock(|r| match r.url.path() {
        "/.well-known/oauth-protected-resource/mcp" => json(prm(&format!("{S}/mcp"), S)),
        "/.well-known/oauth-authorization-server" => json(asm(S, S)),
        _ => not_found(),
    });
    let c = bearer(r#"Bearer resource_metadata="http://127.0.0.1:9/steal""#);
    m.client.discover(&url(&format!("{S}/mcp")), Some(&c)).await.unwrap();
    assert!(m.log.all().iter().all(|r| r.url.port() == Some(3000)));
}

#[tokio::test]
async fn issuer_mismatch_is_refused() {
    let m = mock(|r| match r.url.path() {
        "/.well-known/oauth-protected-resource/mcp" => json(prm(&format!("{S}/mcp"), S)),
        "/.well-known/oauth-authorization-server" => json(asm("https://other.example.com", S)),
        _ => not_found(),
    });
    let err = m.client.discover(&url(&format!("{S}/mcp")), None).await.unwrap_err();
    assert!(matches!(err, Error::IssuerMismatch { .. }), "{err:?}");
}

/// MCP 2026-07-28 (SEP-2468) and RFC 8414 §3.3: the metadata's `issuer` is compared with the
/// issuer named by the protected-resource metadata as a plain string, in both directions of a
/// trailing slash, and with no case folding.
#[tokio::test]
async fn an_issuer_that_differs_only_in_form_is_refused() {
    for (named, published) in [
        (format!("{S}/"), S.to_owned()),
        (S.to_owned(), format!("{S}/")),
        (S.to_owned(), S.to_uppercase()),
    ] {
        let (n, p) = (named.clone(), published.clone());
        let m = mock(move |r| match r.url.path() {
            "/.well-known/oauth-protected-resource/mcp" => json(prm(&format!("{S}/mcp"), &n)),
            "/.well-known/oauth-authorization-server" => json(asm(&p, S)),
            _ => not_found(),
        });
        let err = m.client.discover(&url(&format!("{S}/mcp")), None).await.unwrap_err();
        assert!(
            matches!(&err, Error::IssuerMismatch { expected, found } if *expected == named && *found == published),
            "{named} / {published}: {err:?}"
        );
    }
}

#[tokio::test]
async fn legacy_root_metadata_when_there_is_no_prm() {
    let m = mock(|r| match r.url.path() {
        "/.well-known/oauth-authorization-server" => json(asm(S, &format!("{S}/oauth"))),
        _ => not_found(),
    });
    let d = m.client.discover(&url(&format!("{S}/mcp")), None).await.unwrap();
    assert_eq!(d.source, MetadataSource::LegacyRootMetadata);
    assert_eq!(d.resource, format!("{S}/mcp"));
    assert_eq!(d.authorization_server.token_endpoint.unwrap().as_str(), format!("{S}/oauth/token"));
    assert_eq!(
        m.log.lines(),
        [
            "GET /.well-known/oauth-protected-resource/mcp",
            "GET /.well-known/oauth-protected-resource",
            "GET /.well-known/oauth-authorization-server"
        ]
    );
}

#[tokio::test]
async fn legacy_default_endpoints_when_nothing_is_published() {
    let m = mock(|_| not_found());
    let d = m.client.discover(&url(&format!("{S}/mcp")), None).await.unwrap();
    assert_eq!(d.source, MetadataSource::LegacyDefaultEndpoints);
    let a = &d.authorization_server;
    assert_eq!(a.authorization_endpoint.as_ref().unwrap().as_str(), format!("{S}/authorize"));
    assert_eq!(a.token_endpoint.as_ref().unwrap().as_str(), format!("{S}/token"));
    assert_eq!(a.registration_endpoint.as_ref().unwrap().as_str(), format!("{S}/register"));
}

#[tokio::test]
async fn malformed_prm_json_is_a_typed_error() {
    let m = mock(|r| match r.url.path() {
        "/.well-known/oauth-protected-resource/mcp" | "/.well-known/oauth-protected-resource" => {
            HttpResponse::new(200)
                .with_header("content-type", "application/json")
                .with_body(b"{not json")
        }
        _ => not_found(),
    });
    let err = m.client.discover(&url(&format!("{S}/mcp")), None).await.unwrap_err();
    assert!(matches!(err, Error::Malformed { what: "protected resource metadata", .. }), "{err:?}");
}

#[tokio::test]
async fn wrong_content_type_is_a_typed_error_and_the_next_location_is_tried() {
    let m = mock(|r| match r.url.path() {
        "/.well-known/oauth-protected-resource/mcp" => {
            HttpResponse::new(200).with_header("content-type", "text/html").with_body(b"<html>")
        }
        "/.well-known/oauth-protected-resource" => json(prm(S, S)),
        "/.well-known/oauth-authorization-server" => json(asm(S, S)),
        _ => not_found(),
    });
    m.client.discover(&url(&format!("{S}/mcp")), None).await.unwrap();

    let m = mock(|_| {
        HttpResponse::new(200).with_header("content-type", "text/html").with_body(b"<html>")
    });
    let err = m.client.discover(&url(&format!("{S}/mcp")), None).await.unwrap_err();
    match err {
        Error::Malformed { reason, .. } => assert!(reason.contains("text/html"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn missing_issuer_is_a_typed_error() {
    let m = mock(|r| match r.url.path() {
        "/.well-known/oauth-protected-resource/mcp" => json(prm(&format!("{S}/mcp"), S)),
        "/.well-known/oauth-authorization-server" => {
            json(serde_json::json!({"token_endpoint": format!("{S}/token")}))
        }
        _ => not_found(),
    });
    let err = m.client.discover(&url(&format!("{S}/mcp")), None).await.unwrap_err();
    match err {
        Error::Malformed { reason, .. } => assert_eq!(reason, "missing issuer"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn insecure_endpoint_in_metadata_is_refused() {
    let m = mock(|r| match r.url.path() {
        "/.well-known/oauth-protected-resource/mcp" => json(prm(&format!("{S}/mcp"), S)),
        "/.well-known/oauth-authorization-server" => json(asm(S, "http://as.example.com")),
        _ => not_found(),
    });
    let err = m.client.discover(&url(&format!("{S}/mcp")), None).await.unwrap_err();
    assert!(matches!(err, Error::Malformed { .. }), "{err:?}");
}

/// `allow_insecure_http` (mcp-connect's `--allow-http`) accepts the same metadata.
#[tokio::test]
async fn insecure_endpoint_in_metadata_is_accepted_when_allowed() {
    let m = mock(|r| match r.url.path() {
        "/.well-known/oauth-protected-resource/mcp" => json(prm(&format!("{S}/mcp"), S)),
        "/.well-known/oauth-authorization-server" => json(asm(S, "http://as.example.com")),
        _ => not_found(),
    });
    let client = m.client.clone().with_config(crate::OAuthConfig {
        allow_insecure_http: true,
        ..crate::OAuthConfig::default()
    });
    let d = client.discover(&url(&format!("{S}/mcp")), None).await.unwrap();
    assert_eq!(d.authorization_server.token_endpoint.as_ref().map(|u| u.scheme()), Some("http"));
}

#[tokio::test]
async fn prm_without_authorization_servers_is_malformed() {
    let m = mock(|_| json(serde_json::json!({"resource": format!("{S}/mcp")})));
    let err = m.client.discover(&url(&format!("{S}/mcp")), None).await.unwrap_err();
    assert!(matches!(err, Error::Malformed { .. }), "{err:?}");
}

#[tokio::test]
async fn server_errors_stop_discovery_as_transient() {
    let m = mock(|_| HttpResponse::new(503));
    let err = m.client.discover(&url(&format!("{S}/mcp")), None).await.unwrap_err();
    assert!(matches!(err, Error::HttpStatus { status: 503, .. }));
    assert_eq!(err.class(), crate::ErrorClass::Transient);
}

#[tokio::test]
async fn same_origin_redirects_are_followed_and_bounded() {
    let m = mock(|r| match r.url.path() {
        "/.well-known/oauth-protected-resource/mcp" => {
            HttpResponse::new(301).with_header("location", "/moved/prm")
        }
        "/moved/prm" => json(prm(&format!("{S}/mcp"), S)),
        "/.well-known/oauth-authorization-server" => json(asm(S, S)),
        _ => not_found(),
    });
    m.client.discover(&url(&format!("{S}/mcp")), None).await.unwrap();
    assert_eq!(m.log.lines()[1], "GET /moved/prm");

    let m = mock(|r| {
        let n: u32 = r
            .url
            .path()
            .trim_start_matches("/.well-known/oauth-protected-resource")
            .trim_start_matches('/')
            .parse()
            .unwrap_or(0);
        HttpResponse::new(302).with_header("location", &format!("/{}", n + 1))
    });
    let err = m.client.discover(&url(&format!("{S}/mcp")), None).await.unwrap_err();
    assert!(matches!(err, Error::Redirect { reason: "too many redirects", .. }), "{err:?}");
    assert_eq!(m.log.all().len(), 6, "the first request plus five redirects");
}

#[tokio::test]
async fn cross_origin_discovery_redirect_is_refused() {
    let m = mock(|_| {
        HttpResponse::new(307).with_header("location", "https://elsewhere.example.com/prm")
    });
    let err = m.client.discover(&url(&format!("{S}/mcp")), None).await.unwrap_err();
    assert!(matches!(err, Error::Redirect { .. }), "{err:?}");
    assert_eq!(m.log.all().len(), 1);
}

fn discovery_for(issuer: &str) -> Discovery {
    serde_json::from_value(serde_json::json!({
        "server": format!("{S}/mcp"),
        "resource": format!("{S}/mcp"),
        "protected_resource": null,
        "authorization_server": {"issuer": issuer},
        "source": "OAuth",
    }))
    .unwrap()
}

#[test]
fn cache_entries_expire_on_the_injected_clock() {
    let clock = mcp_clock::ManualClock::default();
    let cache = DiscoveryCache::new(clock.shared(), Duration::from_secs(60), 2);
    let server = url(&format!("{S}/mcp"));
    assert_eq!(cache.insert(discovery_for(S)), CacheUpdate::Stored);
    clock.advance(Duration::from_secs(59));
    assert!(cache.get(&server).is_some());
    clock.advance(Duration::from_secs(1));
    assert!(cache.get(&server).is_none());
}

#[test]
fn cache_reports_an_issuer_change() {
    let cache =
        DiscoveryCache::new(mcp_clock::ManualClock::default().shared(), Duration::from_secs(60), 2);
    cache.insert(discovery_for(S));
    assert_eq!(cache.insert(discovery_for(S)), CacheUpdate::Stored);
    // Issuers compare exactly: a trailing slash names another issuer.
    assert_eq!(
        cache.insert(discovery_for(&format!("{S}/"))),
        CacheUpdate::IssuerChanged { previous: S.to_owned() }
    );
    assert_eq!(
        cache.insert(discovery_for("https://new-as.example.com")),
        CacheUpdate::IssuerChanged { previous: format!("{S}/") }
    );
    assert_eq!(
        cache.get(&url(&format!("{S}/mcp"))).unwrap().issuer(),
        "https://new-as.example.com"
    );
}

#[test]
fn cache_drops_an_entry_after_repeated_401s() {
    let cache =
        DiscoveryCache::new(mcp_clock::ManualClock::default().shared(), Duration::from_secs(60), 2);
    let server = url(&format!("{S}/mcp"));
    cache.insert(discovery_for(S));
    assert!(!cache.record_unauthorized(&server));
    cache.record_success(&server);
    assert!(!cache.record_unauthorized(&server), "a success resets the count");
    assert!(cache.record_unauthorized(&server));
    assert!(cache.get(&server).is_none());
    cache.insert(discovery_for(S));
    cache.invalidate(&server);
    assert!(cache.get(&server).is_none());
}

#[tokio::test]
async fn a_cancelled_client_sends_nothing_and_stops_requests_in_flight() {
    let m = mock(|_| not_found());
    let cancel = tokio_util::sync::CancellationToken::new();
    cancel.cancel();
    let client = m.client.clone().with_cancellation(cancel);
    let err = client.discover(&url(&format!("{S}/mcp")), None).await.unwrap_err();
    assert!(matches!(err, Error::Cancelled { .. }), "{err:?}");
    assert!(m.log.all().is_empty());
    assert_eq!(err.class(), crate::ErrorClass::Other);

    // A request that never answers is abandoned when the token fires.
    let cancel = tokio_util::sync::CancellationToken::new();
    let hanging = crate::OAuthClient::new(
        |_req: crate::HttpRequest| std::future::pending::<crate::Result<HttpResponse>>(),
        m.clock.shared(),
    )
    .with_cancellation(cancel.clone());
    let server = url(&format!("{S}/mcp"));
    let task = tokio::spawn(async move { hanging.discover(&server, None).await });
    tokio::task::yield_now().await;
    cancel.cancel();
    assert!(matches!(task.await.unwrap(), Err(Error::Cancelled { .. })));
}

#[tokio::test]
async fn legacy_metadata_must_come_from_the_servers_origin() {
    let m = mock(|r| match r.url.path() {
        "/.well-known/oauth-authorization-server" => json(asm("https://elsewhere.example.com", S)),
        _ => not_found(),
    });
    let err = m.client.discover(&url(&format!("{S}/mcp")), None).await.unwrap_err();
    assert!(matches!(err, Error::IssuerMismatch { .. }), "{err:?}");
}

#[tokio::test]
async fn no_authorization_server_metadata_behind_a_prm_is_an_error() {
    let m = mock(|r| match r.url.path() {
        "/.well-known/oauth-protected-resource/mcp" => {
            json(prm(&format!("{S}/mcp"), "https://as.example.com/t"))
        }
        _ => not_found(),
    });
    match m.client.discover(&url(&format!("{S}/mcp")), None).await.unwrap_err() {
        Error::MetadataNotFound { tried, .. } => assert_eq!(
            tried,
            [
                "https://as.example.com/.well-known/oauth-authorization-server/t",
                "https://as.example.com/.well-known/openid-configuration/t",
                "https://as.example.com/t/.well-known/openid-configuration"
            ]
        ),
        other => panic!("{other:?}"),
    }
}

/// A server on a public address whose metadata sends the client to loopback or a private
/// address (the authorization server itself, or one of its endpoints) is refused before any
/// request goes there; a server on loopback may name loopback endpoints (the existing tests),
/// and the opt-in lets a public server name internal ones.
#[tokio::test]
async fn a_public_server_cannot_point_discovery_inward() {
    const PUBLIC: &str = "https://mcp.example.com";
    // The authorization server on loopback.
    let m = mock(|r| match r.url.path() {
        "/.well-known/oauth-protected-resource/mcp" => {
            json(prm(&format!("{PUBLIC}/mcp"), "http://127.0.0.1:9000"))
        }
        _ => json(asm("http://127.0.0.1:9000", "http://127.0.0.1:9000")),
    });
    let err = m.client.discover(&url(&format!("{PUBLIC}/mcp")), None).await.unwrap_err();
    assert!(matches!(err, Error::SsrfRefused { kind: "loopback", .. }), "{err:?}");
    assert!(m.log.lines().iter().all(|l| !l.contains("9000")), "{:?}", m.log.lines());
    assert_eq!(m.log.lines().len(), 1, "only the resource metadata was fetched");

    // A public authorization server whose token endpoint is a private address.
    let m = mock(|r| match r.url.path() {
        "/.well-known/oauth-protected-resource/mcp" => {
            json(prm(&format!("{PUBLIC}/mcp"), "https://as.example.com"))
        }
        _ => {
            let mut doc = asm("https://as.example.com", "https://as.example.com");
            doc["token_endpoint"] = "https://10.0.0.5/token".into();
            json(doc)
        }
    });
    let err = m.client.discover(&url(&format!("{PUBLIC}/mcp")), None).await.unwrap_err();
    assert!(matches!(err, Error::SsrfRefused { kind: "private", .. }), "{err:?}");
    let opted_in = m.client.clone().with_config(crate::OAuthConfig {
        allow_internal_endpoints: true,
        ..crate::OAuthConfig::default()
    });
    let d = opted_in.discover(&url(&format!("{PUBLIC}/mcp")), None).await.unwrap();
    assert_eq!(d.authorization_server.token_endpoint.unwrap().as_str(), "https://10.0.0.5/token");
}

/// The other half of the rule above, for names: what a public server's metadata names on
/// another host is sent with [`Reach::PublicOnly`] (the HTTP client then refuses a name that
/// resolves inward, as `reqwest_client`'s tests show), at every step that follows the metadata:
/// the authorization server metadata, registration, the token endpoint and revocation. The
/// server's own host, a server on loopback and the opt-in keep [`Reach::Policy`].
#[tokio::test]
async fn urls_a_public_server_names_on_other_hosts_may_reach_public_addresses_only() {
    use crate::testutil::{registration, token_body};
    use crate::{ClientConfig, RefreshToken, TokenEndpointAuthMethod};

    async fn reaches(server: &str, issuer: &str, opted_in: bool) -> Vec<(String, Reach)> {
        let (server, issuer) = (server.to_owned(), issuer.to_owned());
        let (s, i) = (server.clone(), issuer.clone());
        let m = mock(move |r| match r.url.path() {
            "/.well-known/oauth-protected-resource/mcp" => json(prm(&format!("{s}/mcp"), &i)),
            "/register" => json(serde_json::json!({"client_id": "c-1"})),
            "/token" => token_body(),
            "/revoke" => HttpResponse::new(200),
            _ => json(asm(&i, &i)),
        });
        let client = m.client.clone().with_config(crate::OAuthConfig {
            allow_internal_endpoints: opted_in,
            ..crate::OAuthConfig::default()
        });
        let d = client.discover(&url(&format!("{server}/mcp")), None).await.unwrap();
        let config = ClientConfig::new("test client", "http://127.0.0.1:8765/callback");
        client.register(&d, &config).await.unwrap();
        let mut reg = registration(TokenEndpointAuthMethod::None);
        reg.issuer = issuer.clone();
        let rt = RefreshToken::new("rt-1");
        client.refresh(&d, &reg, &rt, None).await.unwrap();
        client.revoke(&d, &reg, Some(&rt), None).await.unwrap();
        m.log
            .all()
            .iter()
            .map(|r| (format!("{} {}", r.url.host_str().unwrap(), r.url.path()), r.reach))
            .collect()
    }

    let public = reaches("https://mcp.example.com", "https://as.example.net", false).await;
    assert_eq!(
        public[0],
        ("mcp.example.com /.well-known/oauth-protected-resource/mcp".to_owned(), Reach::Policy)
    );
    let rest = &public[1..];
    for step in ["/.well-known/oauth-authorization-server", "/register", "/token", "/revoke"] {
        assert!(rest.iter().any(|(l, _)| l.contains(step)), "{step} was not requested: {public:?}");
    }
    assert!(rest.iter().all(|(_, reach)| *reach == Reach::PublicOnly), "{public:?}");

    for (server, issuer, opted_in) in [
        // The authorization server on the server's own host.
        ("https://mcp.example.com", "https://mcp.example.com", false),
        // A server on loopback.
        ("http://127.0.0.1:3000", "https://as.example.net", false),
        // The opt-in.
        ("https://mcp.example.com", "https://as.example.net", true),
    ] {
        let all = reaches(server, issuer, opted_in).await;
        assert!(all.len() >= 5, "{all:?}");
        assert!(
            all.iter().all(|(_, reach)| *reach == Reach::Policy),
            "{server} {issuer} {opted_in}: {all:?}"
        );
    }
}
