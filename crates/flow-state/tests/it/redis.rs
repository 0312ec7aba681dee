//! The Redis backend against a real redis-server on a free loopback port.

use std::time::Duration;

use flow_state::testkit::{self, RedisServer};
use flow_state::{Error, FlowKey, RedisStore, SharedStore, store::StoreErrorKind};

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
    // Each check gets its own prefix, so each starts with no records. Redis decides expiry on
    // its own clock: the TTL check waits real time.
    testkit::store_conformance_server_time(|clock| {
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

/// Real time, briefly: Redis decides expiry on its own clock, which no manual clock moves.
async fn wait_real(ms: u64) {
    mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(ms)).await;
}

/// A lease on Redis expires on Redis's clock: the holders' manual clock never moves, yet after
/// the TTL (300 ms of real time) the lease is gone, a renewal that failed before it was applied
/// did not extend it, and the next holder takes over with a larger fence; the old holder can
/// neither renew nor release the new lease. (The same on the injected clock, for memory and
/// sled: `lease::an_expired_lease_is_taken_over_with_a_larger_fence`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_lease_expires_on_redis_time() {
    let Some(server) = RedisServer::start() else { return };
    let clock = flow_state::ManualClock::default();
    let store = store(&server, &clock, "leases").await;
    let faulty = flow_state::testkit::FaultyStore::new(store.clone(), clock.shared());
    let leases = flow_state::Leases::new(SharedStore::from_arc(faulty.clone()), clock.shared());
    let ttl = Duration::from_millis(300);
    let key = FlowKey::new("refresh", "alice:srv").unwrap();
    let mut first = leases.try_acquire(&key, ttl).await.unwrap().unwrap();
    assert!(leases.try_acquire(&key, ttl).await.unwrap().is_none(), "exclusive");
    faulty.fail_next_write();
    assert!(leases.renew(&mut first, ttl).await.is_err(), "the renewal failed before applying");
    assert!(leases.is_held(&first).await.unwrap());
    wait_real(500).await;
    assert!(!leases.is_held(&first).await.unwrap(), "expired on Redis's clock");
    let second = leases.try_acquire(&key, ttl * 10).await.unwrap().expect("taken over");
    assert!(second.fence() > first.fence());
    assert!(matches!(leases.renew(&mut first, ttl).await, Err(Error::NotFound { .. })));
    assert!(!leases.release(first).await.unwrap(), "the old holder cannot release the new lease");
    assert!(leases.is_held(&second).await.unwrap());
}

/// A flow on Redis expires on Redis's clock (400 ms of real time, the manager's manual clock
/// still): completing it is then a typed not-found that writes nothing, and `init` writes a new
/// one. (The same on the injected clock: `scenarios::completing_a_missing_or_expired_flow_is_not_found`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_flow_expires_on_redis_time() {
    let Some(server) = RedisServer::start() else { return };
    let clock = flow_state::ManualClock::default();
    let store = store(&server, &clock, "app").await;
    let ms = Duration::from_millis;
    let flows = flow_state::FlowManager::builder(store.clone())
        .clock(clock.shared())
        .defaults(flow_state::FlowTypeConfig::new(ms(400)).wait_timeout(ms(200)))
        .build()
        .unwrap();
    let k = FlowKey::new("short", "x").unwrap();
    flows.init(&k, serde_json::json!(null)).await.unwrap();
    flows.complete(&k, &1u32).await.expect("live before its TTL");
    wait_real(600).await;
    assert!(matches!(flows.complete(&k, &2u32).await, Err(Error::NotFound { .. })));
    assert!(flows.get::<u32>(&k).await.unwrap().is_none());
    assert!(store.get(k.as_str()).await.unwrap().is_none(), "nothing written");
    flows.init(&k, serde_json::json!(null)).await.expect("a new flow over the expired one");
}

/// Race (issue 12, "Redis decides expiry with its own time"): two processes whose clocks
/// disagree by an hour, far more than the lease TTL (10 s), share one Redis. When the scripts
/// judged expiry on the caller's clock, the process an hour ahead saw the other's fresh lease
/// as long expired and took it: two holders. Judged on Redis's clock, only one holds it until
/// it is released; then the other takes it (and the first, whose clock is behind, sees it lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clocks_that_disagree_by_more_than_the_ttl_cannot_both_hold_a_lease() {
    let Some(server) = RedisServer::start() else { return };
    let (behind, ahead) = (flow_state::ManualClock::default(), flow_state::ManualClock::default());
    ahead.advance(Duration::from_secs(3600));
    let a = flow_state::Leases::new(store(&server, &behind, "skew").await, behind.shared());
    let b = flow_state::Leases::new(store(&server, &ahead, "skew").await, ahead.shared());
    let ttl = Duration::from_secs(10);
    let key = FlowKey::new("refresh", "alice:srv").unwrap();
    let mut held = a.try_acquire(&key, ttl).await.unwrap().expect("free");
    assert!(b.try_acquire(&key, ttl).await.unwrap().is_none(), "a holds it, whatever b's clock");
    a.renew(&mut held, ttl).await.expect("still a's");
    assert!(b.try_acquire(&key, ttl).await.unwrap().is_none());
    assert!(a.release(held).await.unwrap());
    let theirs = b.try_acquire(&key, ttl).await.unwrap().expect("free once released");
    assert!(a.try_acquire(&key, ttl).await.unwrap().is_none(), "b holds it, whatever a's clock");
    assert!(b.is_held(&theirs).await.unwrap());
}
