//! The reqwest client's hardening, over real HTTP on 127.0.0.1.

use crate::support;

use std::time::Duration;

use std::net::{IpAddr, Ipv4Addr};

use mcp_clock::SharedClock;
use mcp_oauth::{
    Error, HttpClient, HttpPolicy, HttpRequest, OAuthClient, OAuthConfig, Reach, ReqwestHttpClient,
    SsrfPolicy,
};
use support::{Reply, serve};
use tokio_util::sync::CancellationToken;

fn client(policy: HttpPolicy) -> ReqwestHttpClient {
    ReqwestHttpClient::new(policy).unwrap()
}

fn get(url: &str) -> HttpRequest {
    HttpRequest::get(url.parse().unwrap())
}

#[tokio::test]
async fn round_trip_with_headers_and_body() {
    let server = serve(|req, _| {
        assert_eq!(req.header("content-type"), Some("application/x-www-form-urlencoded"));
        Reply::json(200, serde_json::json!({"got": req.form_value("a")}))
            .header("www-authenticate", "Bearer scope=\"a\"")
            .header("www-authenticate", "DPoP algs=\"ES256\"")
    })
    .await;
    let request =
        HttpRequest::post_form(format!("{}/token", server.base).parse().unwrap(), &[("a", "b c")]);
    let response = client(HttpPolicy::default()).call(request).await.unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.body, br#"{"got":"b c"}"#);
    assert_eq!(
        response.header_values("WWW-Authenticate").count(),
        2,
        "repeated headers are all kept"
    );
}

#[tokio::test]
async fn redirects_are_never_followed_by_the_seam() {
    let server = serve(|req, base| match req.path() {
        "/a" => Reply::status(302).header("location", &format!("{base}/b")),
        _ => Reply::json(200, serde_json::json!({})),
    })
    .await;
    let response =
        client(HttpPolicy::default()).call(get(&format!("{}/a", server.base))).await.unwrap();
    assert_eq!(response.status, 302);
    assert_eq!(server.paths(), ["GET /a"]);
}

#[tokio::test]
async fn bodies_over_the_cap_are_refused() {
    let server = serve(|req, _| {
        let mut r = Reply::status(200);
        r.body = vec![b'x'; 2 * 1024 * 1024];
        r.no_length = req.path() == "/streamed";
        r
    })
    .await;
    let c = client(HttpPolicy::default());
    for path in ["/declared", "/streamed"] {
        let err = c.call(get(&format!("{}{path}", server.base))).await.unwrap_err();
        assert!(matches!(err, Error::BodyTooLarge { limit: 1_048_576, .. }), "{path}: {err:?}");
    }
    let small = client(HttpPolicy { max_body_bytes: 2 * 1024 * 1024, ..HttpPolicy::default() });
    assert_eq!(
        small.call(get(&format!("{}/declared", server.base))).await.unwrap().body.len(),
        2 * 1024 * 1024
    );
}

#[tokio::test]
async fn every_request_has_a_timeout() {
    let server = serve(|_, _| Reply { delay: Duration::from_secs(30), ..Reply::status(200) }).await;
    let c = client(HttpPolicy { timeout: Duration::from_millis(200), ..HttpPolicy::default() });
    let err = c.call(get(&format!("{}/slow", server.base))).await.unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert_eq!(err.class(), mcp_oauth::ErrorClass::Transient);
}

#[tokio::test]
async fn the_cancellation_token_abandons_the_request() {
    let server = serve(|_, _| Reply { delay: Duration::from_secs(30), ..Reply::status(200) }).await;
    let c = client(HttpPolicy::default());
    let mut request = get(&format!("{}/slow", server.base));
    let cancel = CancellationToken::new();
    request.cancel = cancel.clone();
    let canceller = tokio::spawn(async move {
        mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(100)).await;
        cancel.cancel();
    });
    let err = c.call(request).await.unwrap_err();
    assert!(matches!(err, Error::Cancelled { .. }), "{err:?}");
    canceller.await.unwrap();
}

#[tokio::test]
async fn https_is_required_off_loopback_and_nothing_is_sent() {
    let c = client(HttpPolicy::default());
    let err = c.call(get("http://mcp.example.com/x")).await.unwrap_err();
    assert!(matches!(err, Error::InsecureUrl { .. }), "{err:?}");
    // A literal private address is refused before any connection is attempted.
    let err = c.call(get("https://10.0.0.1/x")).await.unwrap_err();
    assert!(matches!(err, Error::SsrfRefused { kind: "private", .. }), "{err:?}");
    let err = c.call(get("https://169.254.169.254/latest/meta-data")).await.unwrap_err();
    assert!(matches!(err, Error::SsrfRefused { kind: "cloud metadata", .. }), "{err:?}");
}

#[tokio::test]
async fn the_ssrf_policy_applies_to_resolved_names() {
    let server = serve(|_, _| Reply::status(204)).await;
    let port = server.base.rsplit(':').next().unwrap().to_owned();
    let strict = client(HttpPolicy {
        ssrf: SsrfPolicy { allow_loopback: false, ..SsrfPolicy::default() },
        ..HttpPolicy::default()
    });
    // `localhost` passes the URL check (plain HTTP on loopback) but resolves to a refused address.
    let err = strict.call(get(&format!("http://localhost:{port}/x"))).await.unwrap_err();
    assert!(matches!(err, Error::SsrfRefused { kind: "loopback", .. }), "{err:?}");
    assert!(server.seen().is_empty(), "no request reached the server");
    let relaxed = client(HttpPolicy::default());
    assert_eq!(relaxed.call(get(&format!("http://localhost:{port}/x"))).await.unwrap().status, 204);
}

/// A name that resolves inward is refused for a [`Reach::PublicOnly`] request, whatever the
/// policy allows (the default allows loopback), and nothing reaches the address; the same name
/// with [`Reach::Policy`] is reached. The name is answered by [`HttpPolicy::hosts`], the
/// resolver's own table, as a DNS server under an attacker's control would answer it.
#[tokio::test]
async fn a_public_only_request_refuses_a_name_that_resolves_inward() {
    let server = serve(|_, _| Reply::status(204)).await;
    let port = server.base.rsplit(':').next().unwrap().to_owned();
    let policy = HttpPolicy {
        ssrf: SsrfPolicy { allow_http: true, ..SsrfPolicy::default() },
        hosts: [("Rebind.Example.NET".to_owned(), vec![Ipv4Addr::LOCALHOST.into()])].into(),
        ..HttpPolicy::default()
    };
    let c = client(policy);
    let url = format!("http://rebind.example.net:{port}/token");
    let err = c.call(get(&url).with_reach(Reach::PublicOnly)).await.unwrap_err();
    assert!(matches!(err, Error::SsrfRefused { kind: "loopback", .. }), "{err:?}");
    assert!(server.seen().is_empty(), "no request reached the server");
    // A literal loopback address is refused before any connection.
    let literal = format!("http://127.0.0.1:{port}/token");
    let err = c.call(get(&literal).with_reach(Reach::PublicOnly)).await.unwrap_err();
    assert!(matches!(err, Error::SsrfRefused { kind: "loopback", .. }), "{err:?}");
    assert!(server.seen().is_empty(), "no request reached the server");
    // Under the policy alone, both are reached.
    assert_eq!(c.call(get(&url)).await.unwrap().status, 204);
    assert_eq!(c.call(get(&literal)).await.unwrap().status, 204);
    assert_eq!(server.paths(), ["GET /token", "GET /token"]);
}

/// End to end through discovery: a server judged public (it is named, not a loopback literal)
/// whose metadata names an authorization server on another name that resolves to loopback is
/// refused at that name, and nothing is sent there (before this, a name slipped past the rule
/// that refuses a literal `127.0.0.1` in the same place). The server's own name resolving to
/// loopback is the user's choice and is reached.
#[tokio::test]
async fn discovery_of_a_public_server_refuses_an_authorization_server_whose_name_resolves_inward() {
    let server = serve(|req, _| {
        let port = req.header("host").unwrap().rsplit(':').next().unwrap().to_owned();
        match req.path() {
            "/.well-known/oauth-protected-resource/mcp" => Reply::json(
                200,
                serde_json::json!({
                    "resource": format!("http://mcp.example.com:{port}/mcp"),
                    "authorization_servers": [format!("http://as.example.net:{port}")],
                }),
            ),
            _ => Reply::json(
                200,
                serde_json::json!({
                    "issuer": format!("http://as.example.net:{port}"),
                    "authorization_endpoint": format!("http://as.example.net:{port}/authorize"),
                    "token_endpoint": format!("http://as.example.net:{port}/token"),
                    "code_challenge_methods_supported": ["S256"],
                }),
            ),
        }
    })
    .await;
    let port = server.base.rsplit(':').next().unwrap().to_owned();
    let loopback: Vec<IpAddr> = vec![Ipv4Addr::LOCALHOST.into()];
    let policy = HttpPolicy {
        ssrf: SsrfPolicy { allow_http: true, ..SsrfPolicy::default() },
        hosts: [
            ("mcp.example.com".to_owned(), loopback.clone()),
            ("as.example.net".to_owned(), loopback),
        ]
        .into(),
        ..HttpPolicy::default()
    };
    let config = OAuthConfig { allow_insecure_http: true, ..OAuthConfig::default() };
    let oauth =
        OAuthClient::new(client(policy.clone()), SharedClock::system()).with_config(config.clone());
    let mcp: url::Url = format!("http://mcp.example.com:{port}/mcp").parse().unwrap();
    let err = oauth.discover(&mcp, None).await.unwrap_err();
    assert!(matches!(err, Error::SsrfRefused { kind: "loopback", .. }), "{err:?}");
    assert_eq!(server.paths(), ["GET /.well-known/oauth-protected-resource/mcp"]);

    // With the opt-in the same discovery goes through.
    let opted_in = OAuthClient::new(client(policy), SharedClock::system())
        .with_config(OAuthConfig { allow_internal_endpoints: true, ..config });
    let d = opted_in.discover(&mcp, None).await.unwrap();
    assert_eq!(d.issuer(), format!("http://as.example.net:{port}"));
}

#[tokio::test]
async fn connection_failures_are_transient_transport_errors() {
    // Bind then drop a listener to get a port nobody listens on.
    let port =
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
    let err = client(HttpPolicy::default())
        .call(get(&format!("http://127.0.0.1:{port}/x")))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Transport { .. }), "{err:?}");
    assert_eq!(err.class(), mcp_oauth::ErrorClass::Transient);
}
