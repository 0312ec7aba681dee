//! The reqwest client's hardening, over real HTTP on 127.0.0.1.

mod support;

use std::time::Duration;

use mcp_oauth::{Error, HttpClient, HttpPolicy, HttpRequest, ReqwestHttpClient, SsrfPolicy};
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
