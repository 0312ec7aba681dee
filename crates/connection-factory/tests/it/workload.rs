//! Workload identity (SEP-1933) through the factory: tokens from the RFC 7523 jwt-bearer grant
//! with the assertion a platform writes to a file, against the fixture authorization server
//! (which trusts the assertions its knobs list) and resource server on 127.0.0.1.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::{args, text};
use connection_factory::{ConnectionFactory, FactoryConfig, OAuthRefresher};
use flow_state::{FlowManager, MemoryStore, SharedStore};
use mcp_clock::{ManualClock, Timestamp};
use mcp_fixtures::{AuthServer, Fixtures, KnobSettings, ResourceServer};
use mcp_oauth::{ClientConfig, HttpPolicy, OAuthClient, ReqwestHttpClient, WorkloadIdentity};
use token_storage::{Keyring, MemoryTokenStore, TokenStorage, TokenStorageConfig};

/// The race and the rotation this pins: a workload's tokens come from its assertion with no
/// prompt; they carry no refresh token, so when they expire every request meets a 401 at
/// once. The eight requests share one new grant, made with the assertion the platform has
/// rotated into the file since (the old one is no longer trusted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_gets_tokens_from_its_assertion_file_and_again_when_they_expire() {
    let clock = ManualClock::new(Timestamp::from_secs(1_800_000_000));
    let mut knobs = KnobSettings::default();
    knobs.access_token_lifetime = Duration::from_secs(60);
    knobs.workload_assertions = vec!["assertion-1".into()];
    let auth = AuthServer::builder().clock(clock.shared()).knobs(knobs).spawn().await.unwrap();
    let resource = ResourceServer::builder(&auth).spawn().await.unwrap();
    let fx = Fixtures::from_parts(auth, resource);
    let oauth =
        OAuthClient::new(ReqwestHttpClient::new(HttpPolicy::default()).unwrap(), clock.shared());
    let mut config = TokenStorageConfig::default();
    config.max_date_correction = Duration::ZERO;
    let storage = TokenStorage::builder(
        MemoryTokenStore::new().into(),
        Arc::new(Keyring::parse(&"42".repeat(32)).unwrap()),
        Arc::new(OAuthRefresher::new(oauth.clone())),
    )
    .clock(clock.shared())
    .config(config)
    .build();
    let flows = FlowManager::builder(SharedStore::new(MemoryStore::new()))
        .clock(clock.shared())
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "assertion-1\n").unwrap();
    let factory = ConnectionFactory::new(flows, storage)
        .unwrap()
        .with_workload_identity(oauth, WorkloadIdentity::from_file(&file));
    let config = FactoryConfig::new(fx.resource().url(), "acme", "svc", "fixture")
        .max_concurrent_requests(8)
        .client(ClientConfig::new("workload", "http://127.0.0.1:9/callback"));

    let conn = Arc::new(factory.connect(config).await.unwrap());
    assert_eq!(text(&conn.call_tool("echo", args("first")).await.unwrap()), "first");
    let stats = fx.auth().stats();
    assert_eq!((stats.jwt_bearer_requests, stats.registrations), (1, 1), "{stats:?}");
    assert_eq!(stats.authorization_code_requests, 0, "no browser step: {stats:?}");

    // The platform rotates the assertion; the tokens expire.
    std::fs::write(&file, "assertion-2-rotated\n").unwrap();
    fx.auth().knobs().set_workload_assertions(vec!["assertion-2-rotated".into()]);
    clock.advance(Duration::from_secs(61));
    let calls: Vec<_> = (0..8)
        .map(|i| {
            let conn = conn.clone();
            tokio::spawn(async move { conn.call_tool("echo", args(&format!("after {i}"))).await })
        })
        .collect();
    for (i, call) in calls.into_iter().enumerate() {
        let result = call.await.unwrap();
        let result = result.unwrap_or_else(|e| panic!("call {i}: {e:?}; {:?}", fx.auth().stats()));
        assert_eq!(text(&result), format!("after {i}"));
    }
    let stats = fx.auth().stats();
    assert_eq!(stats.jwt_bearer_requests, 2, "one new grant for the eight: {stats:?}");
    assert_eq!(stats.registrations, 1, "the client was registered once: {stats:?}");
    assert_eq!(stats.authorization_code_requests, 0, "{stats:?}");
}
