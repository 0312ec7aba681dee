//! Leases on every backend: exclusivity, expiry and takeover, renewal, fencing.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use flow_state::{Error, FlowKey, Leases};

use crate::harness::{BACKENDS, CLOCK_BACKENDS, Harness, harness, within};

const TTL: Duration = Duration::from_secs(10);

/// Leases over a faulty wrapper of `h`'s store, and the wrapper (to arm its faults).
fn faulty_leases(h: &Harness) -> (Arc<flow_state::testkit::FaultyStore>, Leases) {
    let faulty = flow_state::testkit::FaultyStore::new(h.store.clone(), h.clock.shared());
    let leases = Leases::new(flow_state::SharedStore::from_arc(faulty.clone()), h.clock.shared());
    (faulty, leases)
}

fn key() -> FlowKey {
    FlowKey::new("refresh", "alice:srv").unwrap().with_tenant("acme").unwrap()
}

/// A crashed holder stops renewing; after the TTL another process takes over, with a larger
/// fence, and the old holder can neither renew nor release the new holder's lease. (On the
/// injected clock; Redis's own clock: `redis::a_redis_lease_expires_on_redis_time`.)
#[tokio::test]
async fn an_expired_lease_is_taken_over_with_a_larger_fence() {
    for backend in CLOCK_BACKENDS {
        let Some(h) = harness(backend).await else { continue };
        let leases = Leases::new(h.store.clone(), h.clock.shared());
        let mut first = leases.try_acquire(&key(), TTL).await.unwrap().unwrap();
        assert!(leases.try_acquire(&key(), TTL).await.unwrap().is_none(), "{backend:?}");
        h.clock.advance(TTL);
        assert!(!leases.is_held(&first).await.unwrap());
        let second =
            leases.try_acquire(&key(), TTL).await.unwrap().expect("taken over after the TTL");
        assert!(second.fence() > first.fence(), "{backend:?}");
        assert!(matches!(leases.renew(&mut first, TTL).await, Err(Error::NotFound { .. })));
        assert!(
            !leases.release(first).await.unwrap(),
            "the old holder cannot release the new lease"
        );
        assert!(leases.is_held(&second).await.unwrap());
    }
}

/// Renewal keeps the lease past its first TTL and keeps its fence.
#[tokio::test]
async fn renewal_extends_the_lease() {
    for backend in BACKENDS {
        let Some(h) = harness(backend).await else { continue };
        let leases = Leases::new(h.store.clone(), h.clock.shared());
        let mut lease = leases.try_acquire(&key(), TTL).await.unwrap().unwrap();
        let fence = lease.fence();
        h.clock.advance(Duration::from_secs(8));
        leases.renew(&mut lease, TTL).await.unwrap();
        h.clock.advance(Duration::from_secs(8));
        assert!(leases.is_held(&lease).await.unwrap(), "{backend:?}");
        assert!(leases.try_acquire(&key(), TTL).await.unwrap().is_none());
        assert_eq!(lease.fence(), fence);
        assert!(leases.release(lease).await.unwrap());
    }
}

/// A waiter in `acquire` wakes when the holder releases, without polling.
#[tokio::test]
async fn acquire_waits_for_a_release() {
    for backend in BACKENDS {
        let Some(h) = harness(backend).await else { continue };
        let leases = Leases::new(h.store.clone(), h.clock.shared());
        let held = leases.try_acquire(&key(), TTL).await.unwrap().unwrap();
        let waiter = tokio::spawn({
            let leases = leases.clone();
            async move { leases.acquire(&key(), TTL, Duration::from_secs(60)).await }
        });
        crate::harness::settle().await;
        assert!(!waiter.is_finished());
        assert!(leases.release(held).await.unwrap());
        let got = within(waiter).await.unwrap().unwrap();
        assert!(leases.is_held(&got).await.unwrap(), "{backend:?}");
        // And a waiter gives up at its own deadline.
        let late = tokio::spawn({
            let leases = leases.clone();
            async move { leases.acquire(&key(), Duration::from_secs(120), Duration::from_secs(5)).await }
        });
        crate::harness::settle().await;
        h.clock.advance(Duration::from_secs(5));
        assert!(matches!(within(late).await.unwrap(), Err(Error::Timeout { .. })), "{backend:?}");
    }
}

/// The race: many processes reach for the lease at once; exactly one holds it at any moment.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_one_holder_at_a_time() {
    for backend in BACKENDS {
        let Some(h) = harness(backend).await else { continue };
        let holders = Arc::new(AtomicUsize::new(0));
        let overlaps = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..64)
            .map(|_| {
                let leases = Leases::new(h.store.clone(), h.clock.shared());
                let (holders, overlaps) = (holders.clone(), overlaps.clone());
                tokio::spawn(async move {
                    let lease =
                        leases.acquire(&key(), TTL, Duration::from_secs(3_600)).await.unwrap();
                    if holders.fetch_add(1, Ordering::SeqCst) != 0 {
                        overlaps.fetch_add(1, Ordering::SeqCst);
                    }
                    tokio::task::yield_now().await;
                    holders.fetch_sub(1, Ordering::SeqCst);
                    assert!(leases.release(lease).await.unwrap());
                })
            })
            .collect();
        for t in tasks {
            within(t).await.unwrap();
        }
        assert_eq!(overlaps.load(Ordering::SeqCst), 0, "{backend:?}");
    }
}

/// Race: a renewal is applied by the store but its reply is lost (a connection reset after the
/// command ran). Were the lease identified by its record version, the holder would still hold
/// the old version, and every later renewal (and the release) would find a "newer" record and
/// report the lease lost for good, although nobody else ever took it. With an owner token in
/// the lease value, the next renewal finds its own token and goes on.
#[tokio::test]
async fn a_lost_renew_reply_does_not_lose_the_lease() {
    for backend in BACKENDS {
        let Some(h) = harness(backend).await else { continue };
        let (faulty, leases) = faulty_leases(&h);
        let mut lease = leases.try_acquire(&key(), TTL).await.unwrap().unwrap();
        h.clock.advance(Duration::from_secs(5));
        faulty.lose_next_write_reply();
        assert!(leases.renew(&mut lease, TTL).await.is_err(), "{backend:?}: the reply was lost");
        assert_eq!(faulty.injected(), 1);
        assert!(leases.is_held(&lease).await.unwrap(), "{backend:?}: the renewal was applied");
        h.clock.advance(Duration::from_secs(5));
        leases.renew(&mut lease, TTL).await.unwrap_or_else(|e| {
            panic!("{backend:?}: the next renewal must find the lease still ours: {e}")
        });
        h.clock.advance(Duration::from_secs(8));
        assert!(leases.is_held(&lease).await.unwrap(), "{backend:?}");
        assert!(leases.try_acquire(&key(), TTL).await.unwrap().is_none(), "{backend:?}");
        assert!(leases.release(lease).await.unwrap(), "{backend:?}: the release finds it too");
    }
}

/// A renewal that failed before it was applied leaves the lease as it was: still held until
/// its old expiry, then lost. (On the injected clock; Redis's own clock:
/// `redis::a_redis_lease_expires_on_redis_time`.)
#[tokio::test]
async fn a_failed_renewal_is_not_applied() {
    for backend in CLOCK_BACKENDS {
        let Some(h) = harness(backend).await else { continue };
        let (faulty, leases) = faulty_leases(&h);
        let mut lease = leases.try_acquire(&key(), TTL).await.unwrap().unwrap();
        h.clock.advance(Duration::from_secs(5));
        faulty.fail_next_write();
        assert!(leases.renew(&mut lease, TTL).await.is_err());
        h.clock.advance(Duration::from_secs(5));
        assert!(!leases.is_held(&lease).await.unwrap(), "{backend:?}: expired at its old time");
        assert!(matches!(leases.renew(&mut lease, TTL).await, Err(Error::NotFound { .. })));
    }
}

/// Race: the insert that takes a lease is applied but its reply is lost. `try_acquire` reported
/// the error and left the record held by nobody until its TTL (no caller knew its owner
/// token); it reads the record back, finds its own owner token and takes the lease.
#[tokio::test]
async fn a_try_acquire_whose_reply_was_lost_takes_its_own_lease() {
    for backend in BACKENDS {
        let Some(h) = harness(backend).await else { continue };
        let (faulty, leases) = faulty_leases(&h);
        faulty.lose_next_write_reply();
        let lease = leases
            .try_acquire(&key(), TTL)
            .await
            .unwrap_or_else(|e| panic!("{backend:?}: the applied insert is ours: {e}"));
        assert_eq!(faulty.injected(), 1);
        let lease = lease.expect("held by this attempt");
        assert!(leases.is_held(&lease).await.unwrap(), "{backend:?}");
        assert!(leases.release(lease).await.unwrap(), "{backend:?}: released, not orphaned");
        assert!(leases.try_acquire(&key(), TTL).await.unwrap().is_some(), "{backend:?}");
    }
}
