//! The Redis backend against a real redis-server on a free loopback port.

use std::time::Duration;

use flow_state::testkit::{self, RedisServer};
use flow_state::{Error, FlowKey, RedisStore, SharedStore, StoreErrorKind};

use crate::harness::{manager, within};

async fn store(server: &RedisServer, clock: &flow_state::ManualClock, prefix: &str) -> SharedStore {
    SharedStore::new(
        RedisStore::builder(server.url())
            .prefix(prefix)
            .clock(clock.shared())
            .connect()
            .await
            .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_conforms() {
    let Some(server) = RedisServer::start() else { return };
    let url = server.url();
    let n = std::sync::atomic::AtomicUsize::new(0);
    // Each check gets its own prefix, so each starts with no records.
    testkit::store_conformance(|clock| {
        let prefix = format!("conf{}", n.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let builder = RedisStore::builder(url.clone()).prefix(prefix).clock(clock.shared());
        async move { SharedStore::new(builder.connect().await.unwrap()) }
    })
    .await;
}

/// Two "processes" (two stores with their own connections and subscriptions) share flows: a
/// waiter on one is woken by a completion on the other through pub/sub.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_on_one_replica_wakes_a_waiter_on_another() {
    let Some(server) = RedisServer::start() else { return };
    let clock = flow_state::ManualClock::default();
    let a = manager(&store(&server, &clock, "app").await, &clock);
    let b = manager(&store(&server, &clock, "app").await, &clock);
    let key = FlowKey::new("test-type", "alice:srv").unwrap().with_tenant("acme").unwrap();
    a.init(&key, serde_json::json!({})).await.unwrap();
    let waiter = tokio::spawn({
        let (a, key) = (a.clone(), key.clone());
        async move { a.wait::<String>(&key).await }
    });
    crate::harness::settle().await;
    b.complete(&key, &"from-b").await.unwrap();
    assert_eq!(within(waiter).await.unwrap().unwrap(), "from-b");
}

/// Prefixes isolate deployments on one server.
#[tokio::test]
async fn prefixes_isolate_deployments() {
    let Some(server) = RedisServer::start() else { return };
    let clock = flow_state::ManualClock::default();
    let a = manager(&store(&server, &clock, "one").await, &clock);
    let b = manager(&store(&server, &clock, "two").await, &clock);
    let key = FlowKey::new("test-type", "x").unwrap();
    a.init(&key, serde_json::json!({})).await.unwrap();
    assert!(b.get::<u32>(&key).await.unwrap().is_none());
}

/// Bad input: Redis unreachable at start is a typed error naming the address.
#[tokio::test]
async fn an_unreachable_server_is_a_typed_error_naming_the_address() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("redis://127.0.0.1:{port}");
    let err =
        RedisStore::builder(&url).timeout(Duration::from_millis(300)).connect().await.unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Unavailable);
    assert!(err.to_string().contains(&format!("127.0.0.1:{port}")), "{err}");
}

/// Bad input: a value under our prefix written by another program is a typed error, and is
/// left as it was.
#[tokio::test]
async fn a_foreign_value_under_the_prefix_is_corrupt_not_a_panic() {
    let Some(server) = RedisServer::start() else { return };
    let clock = flow_state::ManualClock::default();
    let flows = manager(&store(&server, &clock, "app").await, &clock);
    let key = FlowKey::new("test-type", "x").unwrap();
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let raw = format!("app:{}", key.as_str());
    for (what, setup) in [("a string", 0), ("a hash of someone else's", 1)] {
        let _: () = redis::cmd("DEL").arg(&raw).query_async(&mut conn).await.unwrap();
        if setup == 0 {
            let _: () =
                redis::cmd("SET").arg(&raw).arg("hello").query_async(&mut conn).await.unwrap();
        } else {
            let _: () = redis::cmd("HSET")
                .arg(&raw)
                .arg("v")
                .arg("abc")
                .query_async(&mut conn)
                .await
                .unwrap();
        }
        for err in [
            flows.get::<u32>(&key).await.unwrap_err(),
            flows.init(&key, serde_json::json!({})).await.unwrap_err(),
            flows.complete(&key, &1u32).await.unwrap_err(),
            flows.delete(&key).await.unwrap_err(),
        ] {
            assert!(matches!(err, Error::Corrupt { .. }), "{what}: {err:?}");
        }
        let exists: i64 = redis::cmd("EXISTS").arg(&raw).query_async(&mut conn).await.unwrap();
        assert_eq!(exists, 1, "{what}: left as it was");
    }
}
