//! The Redis token store and the cross-process refresh lease, inside one test process: the
//! conformance suite, bad input (an unreachable server, a foreign value), a Redis restart with
//! the append-only file on, and two storages (as two processes would) sharing one store.
//! The tests with real OS processes are in the workspace's `tests/` crate (`fleet.rs`).
#![cfg(feature = "redis")]

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use flow_state::testkit::RedisServer;
use flow_state::{MemoryStore, RedisStore, SharedStore};
use token_storage::testkit::{FakeAuthServer, store_conformance};
use token_storage::{
    DecryptFailure, Error, MemoryTokenStore, RedisTokenStore, RefreshLease, SharedClock,
    SharedTokenStore, TokenStorage, TokenStore,
    store::{Fence, Swapped},
};

static PREFIXES: AtomicUsize = AtomicUsize::new(0);

async fn connect(server: &RedisServer) -> RedisTokenStore {
    let prefix = format!("test{}", PREFIXES.fetch_add(1, Ordering::SeqCst));
    RedisTokenStore::builder(server.url())
        .prefix(prefix)
        .timeout(Duration::from_millis(500))
        .connect()
        .await
        .expect("connect to the test redis-server")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_conforms() {
    let Some(server) = RedisServer::start() else { return };
    store_conformance(|| {
        tokio::task::block_in_place(|| {
            let store = tokio::runtime::Handle::current().block_on(connect(&server));
            SharedTokenStore::new(store)
        })
    })
    .await;
}

#[tokio::test]
async fn an_unreachable_server_is_a_typed_error_naming_the_address() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("redis://127.0.0.1:{port}");
    let err = RedisTokenStore::builder(&url)
        .timeout(Duration::from_millis(300))
        .connect()
        .await
        .expect_err("nothing listens there");
    assert!(matches!(err, Error::StoreUnavailable { .. }), "{err:?}");
    assert!(err.to_string().contains(&format!("127.0.0.1:{port}")), "{err}");
}

#[tokio::test]
async fn a_password_in_the_url_is_not_shown() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let err = RedisTokenStore::builder(format!("redis://:hunter2@127.0.0.1:{port}"))
        .timeout(Duration::from_millis(300))
        .connect()
        .await
        .unwrap_err();
    assert!(!err.to_string().contains("hunter2"), "{err}");
    assert!(!format!("{err:?}").contains("hunter2"));
}

/// A Redis that cannot serve for a while is unavailable (transient, to be retried), never a
/// broken store: here a replica cut off from its master, as in a failover, which answers
/// `MASTERDOWN` to reads and `READONLY` to writes (`LOADING` after a restart, the flake this
/// pins, is the same family: `REDIS_UNAVAILABLE_CODES`). Both the token store and flow-state's
/// store (the lease's) say so; once the server serves again, so do they.
#[tokio::test]
async fn a_redis_that_cannot_serve_for_a_while_is_unavailable_not_broken() {
    use flow_state::Store as _;
    let Some(server) = RedisServer::start() else { return };
    let store = connect(&server).await;
    let flows = RedisStore::builder(server.url()).connect().await.unwrap();
    store.compare_and_swap("k", None, b"v".to_vec()).await.unwrap();
    let client = redis::Client::open(server.url()).unwrap();
    let mut raw = client.get_multiplexed_async_connection().await.unwrap();
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("replica-serve-stale-data")
        .arg("no")
        .query_async(&mut raw)
        .await
        .unwrap();
    let _: () =
        redis::cmd("REPLICAOF").arg("127.0.0.1").arg(dead).query_async(&mut raw).await.unwrap();

    let unavailable = |r: Result<(), Error>, what: &str| match r {
        Err(Error::StoreUnavailable { .. }) => {}
        other => panic!("{what}: expected StoreUnavailable, got {other:?}"),
    };
    unavailable(store.get("k").await.map(|_| ()), "a read (MASTERDOWN)");
    unavailable(store.compare_and_swap("k", Some(1), b"w".to_vec()).await.map(|_| ()), "a write");
    match flows.get("flow").await {
        Err(e) => assert_eq!(e.kind(), flow_state::store::StoreErrorKind::Unavailable, "{e:?}"),
        Ok(v) => panic!("flow-state read served by a replica without its master: {v:?}"),
    }

    let _: () = redis::cmd("REPLICAOF").arg("NO").arg("ONE").query_async(&mut raw).await.unwrap();
    assert!(store.get("k").await.unwrap().is_some(), "served again, the record intact");
}

/// Values under our prefix written by another program: typed errors on every read and
/// conditional write, left as they are; an unconditional delete (uninstall) clears them.
#[tokio::test]
async fn a_foreign_value_is_a_typed_error_not_a_panic() {
    let Some(server) = RedisServer::start() else { return };
    let store = RedisTokenStore::builder(server.url()).prefix("p").connect().await.unwrap();
    let client = redis::Client::open(server.url()).unwrap();
    let mut raw = client.get_multiplexed_async_connection().await.unwrap();
    let _: () =
        redis::cmd("SET").arg("{p}:r:str").arg("hello").query_async(&mut raw).await.unwrap();
    let _: () =
        redis::cmd("HSET").arg("{p}:r:hash").arg("x").arg("1").query_async(&mut raw).await.unwrap();
    let _: () = redis::cmd("HSET")
        .arg("{p}:r:nan")
        .arg("v")
        .arg("seven")
        .arg("d")
        .arg("x")
        .query_async(&mut raw)
        .await
        .unwrap();
    let foreign = |r: Result<_, Error>, what: &str| match r {
        Err(Error::Decrypt { reason: DecryptFailure::UnknownFormat, record }) => {
            assert!(!record.is_empty());
        }
        other => panic!("{what}: expected a typed foreign-value error, got {other:?}"),
    };
    for key in ["str", "hash", "nan"] {
        foreign(store.get(key).await.map(|_| ()), key);
        foreign(store.compare_and_swap(key, None, b"x".to_vec()).await.map(|_| ()), key);
        foreign(store.compare_and_swap(key, Some(1), b"x".to_vec()).await.map(|_| ()), key);
        foreign(store.delete_if(key, Some(1)).await.map(|_| ()), key);
    }
    let value: String = redis::cmd("GET").arg("{p}:r:str").query_async(&mut raw).await.unwrap();
    assert_eq!(value, "hello", "left as it was");
    assert!(store.delete_if("str", None).await.unwrap(), "an unconditional delete clears it");
    assert_eq!(store.get("str").await.unwrap(), None);
}

fn storage_on(
    store: SharedTokenStore,
    server: &Arc<FakeAuthServer>,
    lease: Option<RefreshLease>,
) -> TokenStorage {
    let mut config = config();
    config.storm_limit = u32::MAX;
    let mut b = TokenStorage::builder(store, keyring(), server.clone()).config(config);
    if let Some(lease) = lease {
        b = b.lease(lease);
    }
    b.build()
}

/// Race: two storages (two processes' worth of single-flight) over one Redis store, 20
/// concurrent 401s each for the same token. Returns the refresh calls that reached the server
/// and the reuse detections. `with_lease` false is the control: without the
/// lease both redeem (and trip reuse detection), which proves the test can see the race.
/// `None` when the Redis tests are skipped (`MCP_TEST_SKIP_REDIS=1`).
async fn two_storages_race(with_lease: bool) -> Option<(u64, u64)> {
    let redis = RedisServer::start()?;
    let server = FakeAuthServer::new(SharedClock::system());
    server.set_latency(Duration::from_millis(50));
    let store = connect(&redis).await;
    let flows = RedisStore::builder(redis.url()).prefix("leases").connect().await.unwrap();
    let lease = with_lease.then(|| {
        RefreshLease::store(SharedStore::new(flows.clone()), SharedClock::system())
            .ttl(Duration::from_secs(2))
    });
    let a = storage_on(SharedTokenStore::new(store.clone()), &server, lease.clone());
    let b = storage_on(SharedTokenStore::new(store), &server, lease);
    let first = a.store(&key(), ISS, server.issue(&key())).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..40 {
        let s = if i % 2 == 0 { a.clone() } else { b.clone() };
        let rejected = first.access_token().clone();
        tasks.push(tokio::spawn(async move { s.force_refresh(&key(), ISS, &rejected).await }));
    }
    let mut tokens = std::collections::BTreeSet::new();
    for t in tasks {
        if let Ok(set) = t.await.unwrap() {
            tokens.insert(set.access_token().expose().to_owned());
        }
    }
    if with_lease {
        assert_eq!(tokens.len(), 1, "every caller got the one new token");
        assert!(!tokens.contains(first.access_token().expose()));
    }
    Some((server.calls(), server.reuse_detected()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_lease_makes_two_storages_redeem_once() {
    let Some(counts) = two_storages_race(true).await else { return };
    assert_eq!(counts, (1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_lease_two_storages_redeem_twice() {
    let Some((calls, reused)) = two_storages_race(false).await else { return };
    assert!(calls >= 2 && reused >= 1, "the control must show the race: {calls} calls");
}

/// The same race with lock files over one shared store (`flock` conflicts between two open
/// files even inside one process, so two storages here stand for two processes on one host).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_files_make_two_storages_redeem_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = FakeAuthServer::new(SharedClock::system());
    server.set_latency(Duration::from_millis(50));
    let store = Arc::new(MemoryTokenStore::new());
    let lease = RefreshLease::lock_files(dir.path().join("locks"));
    let a = storage_on(SharedTokenStore::from_arc(store.clone()), &server, Some(lease.clone()));
    let b = storage_on(SharedTokenStore::from_arc(store), &server, Some(lease));
    let first = a.store(&key(), ISS, server.issue(&key())).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..40 {
        let s = if i % 2 == 0 { a.clone() } else { b.clone() };
        let rejected = first.access_token().clone();
        tasks.push(tokio::spawn(async move { s.force_refresh(&key(), ISS, &rejected).await }));
    }
    for t in tasks {
        let set = t.await.unwrap().unwrap();
        assert_ne!(set.access_token(), first.access_token());
    }
    assert_eq!((server.calls(), server.reuse_detected()), (1, 0));
}

/// A store lease over a memory flow store whose holder never renews (a crashed process: its
/// lease is simply left in the store) blocks refreshes only until the TTL, then one takes over.
/// On a manual clock: at 1 ms before the TTL the refresh still waits and nothing is redeemed;
/// just after it, the refresh takes over and redeems once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_holders_lease_expires_and_the_refresh_takes_over() {
    let clock = token_storage::ManualClock::default();
    let flows = SharedStore::new(MemoryStore::with_clock(clock.shared()));
    let ttl = Duration::from_secs(2);
    let server = FakeAuthServer::new(SharedClock::system());
    let tokens = Arc::new(MemoryTokenStore::new());
    let storage = storage_on(
        SharedTokenStore::from_arc(tokens.clone()),
        &server,
        Some(RefreshLease::store(flows.clone(), clock.shared()).ttl(ttl)),
    );
    let first = storage.store(&key(), ISS, server.issue(&key())).await.unwrap();
    // The dead holder's lease, under the key the refresh uses.
    let leases = flow_state::Leases::new(flows, clock.shared());
    let record = tokens.keys_with_prefix("").await.unwrap().pop().unwrap();
    let lease_key = flow_state::FlowKey::new("token_refresh", &record).unwrap();
    let dead = leases.try_acquire(&lease_key, ttl).await.unwrap();
    assert!(dead.is_some());
    let sleepers = clock.sleepers();
    let refresh = tokio::spawn({
        let (storage, rejected) = (storage.clone(), first.access_token().clone());
        async move { storage.force_refresh(&key(), ISS, &rejected).await }
    });
    // The refresh waits on the clock for the dead lease's expiry.
    eventually("the refresh to wait for the lease", || clock.sleepers() > sleepers).await;
    clock.advance(ttl - Duration::from_millis(1));
    mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(50)).await;
    assert!(!refresh.is_finished(), "the refresh waits for the dead lease until its TTL");
    assert_eq!(server.redemptions(), 0);
    clock.advance(Duration::from_millis(2));
    let fresh = mcp_clock::within(&mcp_clock::SystemClock, Duration::from_secs(10), refresh)
        .await
        .expect("the refresh took over at the TTL")
        .unwrap()
        .unwrap();
    assert_ne!(fresh.access_token(), first.access_token());
    assert_eq!(server.redemptions(), 1);
}

/// redis-server restarted (append-only file on): calls fail with a typed transient error while
/// it is down, succeed again after, and nothing committed is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_is_transient_and_loses_nothing() {
    let Some(mut redis) = RedisServer::start_with(true) else { return };
    let server = FakeAuthServer::new(SharedClock::system());
    let store = connect(&redis).await;
    let storage = storage_on(SharedTokenStore::new(store), &server, None);
    let first = storage.store(&key(), ISS, server.issue(&key())).await.unwrap();
    let second = storage.force_refresh(&key(), ISS, first.access_token()).await.unwrap();
    redis.stop();
    let err = storage.tokens(&key()).await.expect_err("redis is down");
    assert!(matches!(err, Error::StoreUnavailable { .. }), "{err:?}");
    let err = storage.force_refresh(&key(), ISS, second.access_token()).await.unwrap_err();
    assert!(matches!(err, Error::StoreUnavailable { .. }), "{err:?}");
    redis.restart();
    let mut back = None;
    for _ in 0..100 {
        match storage.tokens(&key()).await {
            Ok(set) => {
                back = set;
                break;
            }
            Err(Error::StoreUnavailable { .. }) => {
                mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(50)).await
            }
            Err(e) => panic!("unexpected error while redis comes back: {e:?}"),
        }
    }
    let back = back.expect("the tokens survived the restart");
    assert_eq!(back.access_token(), second.access_token());
    let third = storage.force_refresh(&key(), ISS, second.access_token()).await.unwrap();
    assert_ne!(third.access_token(), second.access_token());
    assert!(third.version() > second.version(), "versions keep increasing after a restart");
    assert_eq!(server.reuse_detected(), 0);
}

/// One storage `a` on Redis whose refresh lease (`ttl`, `wait`) goes through a faulty wrapper of
/// a Redis lease store, its token store, a peer's `Leases` on the same lease store (the real
/// time of `clock`), and the tokens `a` stored first.
struct FaultyLease {
    a: TokenStorage,
    store: RedisTokenStore,
    faulty: Arc<flow_state::testkit::FaultyStore>,
    peer: flow_state::Leases,
    server: Arc<FakeAuthServer>,
    first: Arc<token_storage::TokenSet>,
    clock: SharedClock,
}

async fn faulty_lease(redis: &RedisServer, ttl: Duration, wait: Duration) -> FaultyLease {
    let clock = SharedClock::system();
    let server = FakeAuthServer::new(clock.clone());
    let store = connect(redis).await;
    let flows = RedisStore::builder(redis.url()).prefix("leases").connect().await.unwrap();
    let faulty =
        flow_state::testkit::FaultyStore::new(SharedStore::new(flows.clone()), clock.clone());
    let lease = RefreshLease::store(SharedStore::from_arc(faulty.clone()), clock.clone())
        .ttl(ttl)
        .wait(wait);
    let a = storage_on(SharedTokenStore::new(store.clone()), &server, Some(lease));
    let first = a.store(&key(), ISS, server.issue(&key())).await.unwrap();
    let peer = flow_state::Leases::new(SharedStore::new(flows), clock.clone());
    FaultyLease { a, store, faulty, peer, server, first, clock }
}

/// The lease key of `key`'s refresh, as the storage names it, from the token store's one record.
async fn lease_key(store: &RedisTokenStore) -> flow_state::FlowKey {
    let record = store.keys_with_prefix("").await.unwrap().pop().expect("the token record");
    flow_state::FlowKey::new("token_refresh", &record).unwrap()
}

/// Race (issue 12, "a lease lost just before sending"): `a` writes its in-doubt intent under
/// the lease, then finds the lease lost at the check before sending (its lease store answers
/// 1.4 s late, so the lease lapses between the intent and the check, and a peer takes it).
/// Nothing was sent, but the intent stayed at "sent": the next holder (here `a` itself, once
/// the peer is gone) read it as a token that may be spent and spent its one same-token retry
/// on the first presentation; that answer lost, the slot ended in "rotation lost in flight"
/// with no rotation lost at all. The flight takes its own intent back (a compare-and-swap on
/// the intent's version), so the next holder sends normally, keeps its retry, and the server's
/// grace window answers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_lost_before_sending_leaves_the_next_holder_its_retry() {
    let Some(redis) = RedisServer::start() else { return };
    let FaultyLease { a, store, faulty: slow, peer, server, first, clock } =
        faulty_lease(&redis, Duration::from_millis(1000), Duration::from_secs(20)).await;
    server.set_reuse_grace(Duration::from_secs(60));
    let lease_key = lease_key(&store).await;
    // Every lease operation of `a` takes 1.4 s: acquired at ~1.4 s (expiring at ~2.4 s), the
    // intent written at once (its fence is checked in the same script), the check before the
    // send reads at ~2.8 s; renewals (a read, then a write) come too late to extend the lease.
    slow.set_delay(Duration::from_millis(1400));
    server.lose_next_answer();
    let refresh = tokio::spawn({
        let (a, rejected) = (a.clone(), first.access_token().clone());
        async move { a.force_refresh(&key(), ISS, &rejected).await }
    });
    let in_doubt = || async { a.tokens(&key()).await.unwrap().unwrap().in_doubt() };
    assert!(
        mcp_clock::testing::within_real_time(Duration::from_secs(5), in_doubt).await,
        "a wrote its intent"
    );
    let mut held = None;
    for _ in 0..500 {
        held = peer.try_acquire(&lease_key, Duration::from_secs(60)).await.unwrap();
        if held.is_some() {
            break;
        }
        mcp_clock::Clock::sleep(&clock, Duration::from_millis(10)).await;
    }
    let held = held.expect("the peer took the lapsed lease");
    assert_eq!(server.calls(), 0, "a sent nothing");
    let taken_back = mcp_clock::testing::within_real_time(Duration::from_secs(3), || async {
        !a.tokens(&key()).await.unwrap().unwrap().in_doubt()
    })
    .await;
    slow.disarm();
    assert!(peer.release(held).await.unwrap());
    let refreshed = mcp_clock::within(&clock, Duration::from_secs(20), refresh)
        .await
        .expect("the refresh ends")
        .unwrap();
    assert!(taken_back, "the intent of a flight that never sent was left at \"sent\"");
    let refreshed =
        refreshed.expect("the next holder kept its retry: the grace window answered it");
    assert_ne!(refreshed.access_token(), first.access_token());
    assert_eq!(server.calls(), 2, "one lost presentation and its one retry");
    assert_eq!(server.replays_after_delivery(), 0);
}

/// Race (issue 12, "an orphaned lease"): the insert that takes the refresh lease is applied on
/// Redis but its reply is lost. The acquire was retried with a new owner token, found the
/// lease it had just written itself, held by nobody, and waited out its TTL (30 s here, past
/// the 3 s wait: the refresh failed). The retry keeps the owner token and recognises its own
/// record: the refresh goes on at once, and releases the lease at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acquire_whose_reply_was_lost_takes_its_own_lease() {
    let Some(redis) = RedisServer::start() else { return };
    let FaultyLease { a, store, faulty, peer, server, first, .. } =
        faulty_lease(&redis, Duration::from_secs(30), Duration::from_secs(3)).await;
    faulty.lose_next_write_reply();
    let refreshed = a.force_refresh(&key(), ISS, first.access_token()).await;
    assert_eq!(faulty.injected(), 1, "the lease insert's reply was lost");
    let refreshed = refreshed.expect("the acquire took the lease it had written");
    assert_ne!(refreshed.access_token(), first.access_token());
    let lease = peer.try_acquire(&lease_key(&store).await, Duration::from_secs(1)).await.unwrap();
    assert!(lease.is_some(), "the lease was released, not left to its TTL");
    assert_eq!((server.calls(), server.reuse_detected()), (1, 0));
}

/// Race (issue 12, "fenced commit on Redis"): a holder checks its lease, the check's answer
/// is slow to come back (800 ms, past the 400 ms TTL), and meanwhile the lease lapses and a
/// peer takes it and reads the record it is going to write over. With the lease checked one
/// round trip before the compare-and-swap, the holder's write then landed on the version the
/// peer had read: a write made under a lapsed lease, and the peer's own write, made under its
/// lease, conflicted. With the lease record and the token record on one server (the lease
/// store's prefix carries the token store's hash tag, as a cluster needs), the check and the
/// swap are one script: the holder's write lands while its lease holds or not at all, and the
/// peer's write on what it read under its lease lands. A write attempted once the peer holds
/// the lease is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_lease_lapses_after_the_check_cannot_beat_the_new_holder() {
    let Some(redis) = RedisServer::start() else { return };
    let clock = SharedClock::system();
    let prefix = format!("fenced{}", PREFIXES.fetch_add(1, Ordering::SeqCst));
    let store = RedisTokenStore::builder(redis.url()).prefix(&prefix).connect().await.unwrap();
    let flows = RedisStore::builder(redis.url())
        .prefix(format!("{{{prefix}}}:leases"))
        .connect()
        .await
        .unwrap();
    // The holder's way to the lease store; its answers come back late once armed.
    let slow =
        flow_state::testkit::FaultyStore::new(SharedStore::new(flows.clone()), clock.clone());
    let holder = flow_state::Leases::new(SharedStore::from_arc(slow.clone()), clock.clone());
    let peer = flow_state::Leases::new(SharedStore::new(flows), clock.clone());
    let lease_key = flow_state::FlowKey::new("token_refresh", "r").unwrap();
    let Swapped::Swapped { version: first } =
        store.compare_and_swap("r", None, b"first".to_vec()).await.unwrap()
    else {
        panic!("written")
    };
    let lease = holder.try_acquire(&lease_key, Duration::from_millis(400)).await.unwrap().unwrap();
    slow.set_reply_delay(Duration::from_millis(800));
    let fence = Fence::store(&holder, &lease);
    let write = store.compare_and_swap_fenced("r", Some(first), b"holder".to_vec(), &fence);
    let take_over = async {
        loop {
            if let Some(held) = peer.try_acquire(&lease_key, Duration::from_secs(30)).await.unwrap()
            {
                let read = store.get("r").await.unwrap().unwrap();
                return (held, read);
            }
            mcp_clock::Clock::sleep(&clock, Duration::from_millis(10)).await;
        }
    };
    let (holders_write, (peers_lease, peers_read)) = tokio::join!(write, take_over);
    let landed = holders_write.unwrap();
    let peers_write =
        store.compare_and_swap("r", Some(peers_read.version), b"peer".to_vec()).await.unwrap();
    assert!(
        matches!(peers_write, Swapped::Swapped { .. }),
        "a write made after the holder's lease lapsed beat the new holder's ({landed:?})"
    );
    // Once the peer holds the lease, the old holder's fenced writes are refused.
    let stale = store.compare_and_swap_fenced("r", Some(peers_read.version), b"x".to_vec(), &fence);
    assert_eq!(stale.await.unwrap(), None, "refused: the lease is the peer's");
    assert_eq!(&*store.get("r").await.unwrap().unwrap().value, b"peer");
    assert!(peer.release(peers_lease).await.unwrap());
}
