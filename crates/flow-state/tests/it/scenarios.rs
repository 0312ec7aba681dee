//! The FlowStateManager scenarios of the behaviour reference (§5.2, 61 to 77), adapted to this
//! API, on every backend.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use flow_state::{Clock, Error, FlowError, FlowKey, FlowStatus};
use serde_json::json;

use crate::harness::{BACKENDS, Backend, CLOCK_BACKENDS, harness, key, settle, within};

/// 61, 63: concurrent create-with-handler calls share the first handler's result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_runs_share_one_handler_result() {
    for backend in BACKENDS {
        let Some(h) = harness(backend).await else { continue };
        let runs = Arc::new(AtomicUsize::new(0));
        let k = key("cache", "alice:srv");
        let calls: Vec<_> = (0..10)
            .map(|i| {
                let (flows, k, runs) = (h.flows.clone(), k.clone(), runs.clone());
                tokio::spawn(async move {
                    flows
                        .run(&k, move || async move {
                            runs.fetch_add(1, Ordering::SeqCst);
                            mcp_clock::Clock::sleep(
                                &mcp_clock::SystemClock,
                                Duration::from_millis(20),
                            )
                            .await;
                            Ok(format!("result-{i}"))
                        })
                        .await
                })
            })
            .collect();
        let mut results = Vec::new();
        for c in calls {
            results.push(within(c).await.unwrap().unwrap());
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1, "{backend:?}");
        assert!(results.windows(2).all(|w| w[0] == w[1]), "{backend:?}: {results:?}");
    }
}

/// 62: a wait with nobody completing the flow times out, measured from creation.
#[tokio::test]
async fn an_unanswered_flow_times_out() {
    for backend in BACKENDS {
        let Some(h) = harness(backend).await else { continue };
        let k = key("test-type", "x");
        let waiter = tokio::spawn({
            let (flows, k) = (h.flows.clone(), k.clone());
            async move { flows.create_and_wait::<String>(&k, json!({})).await }
        });
        h.until(&k, FlowStatus::Pending).await;
        h.clock.advance(Duration::from_millis(9_999));
        settle().await;
        assert!(!waiter.is_finished(), "{backend:?}: timed out early");
        h.clock.advance(Duration::from_millis(1));
        let err = within(waiter).await.unwrap().unwrap_err();
        assert!(matches!(err, Error::Timeout { .. }), "{backend:?}: {err}");
        // Not a kept type: the timed-out flow is gone.
        assert!(h.flows.get::<String>(&k).await.unwrap().is_none());
    }
}

/// 64: a waiter resolves with the result of a later completion.
#[tokio::test]
async fn a_waiter_gets_a_later_completion() {
    for backend in BACKENDS {
        let Some(h) = harness(backend).await else { continue };
        let k = key("test-type", "x");
        let waiter = tokio::spawn({
            let (flows, k) = (h.flows.clone(), k.clone());
            async move { flows.create_and_wait::<String>(&k, json!({})).await }
        });
        h.until(&k, FlowStatus::Pending).await;
        h.clock.advance(Duration::from_millis(500));
        h.flows.complete(&k, &"success").await.unwrap();
        assert_eq!(within(waiter).await.unwrap().unwrap(), "success", "{backend:?}");
    }
}

/// 65: a failure reaches the waiter, and a non-kept failure is deleted.
#[tokio::test]
async fn a_failure_reaches_the_waiter_and_is_deleted() {
    for backend in BACKENDS {
        let Some(h) = harness(backend).await else { continue };
        let k = key("test-type", "x");
        let waiter = tokio::spawn({
            let (flows, k) = (h.flows.clone(), k.clone());
            async move { flows.create_and_wait::<String>(&k, json!({})).await }
        });
        h.until(&k, FlowStatus::Pending).await;
        h.flows.fail(&k, FlowError::new("denied", "failure")).await.unwrap();
        match within(waiter).await.unwrap() {
            Err(Error::Failed { error, .. }) => assert_eq!(error.message, "failure"),
            other => panic!("{backend:?}: {other:?}"),
        }
        assert!(h.flows.get::<String>(&k).await.unwrap().is_none(), "{backend:?}");
    }
}

/// 66: a kept type records FAILED on timeout, with the error and a failed-at time.
#[tokio::test]
async fn a_kept_type_records_its_timeout() {
    for backend in BACKENDS {
        let Some(h) = harness(backend).await else { continue };
        let k = key("kept", "x");
        let waiter = tokio::spawn({
            let (flows, k) = (h.flows.clone(), k.clone());
            async move { flows.create_and_wait::<String>(&k, json!({})).await }
        });
        h.until(&k, FlowStatus::Pending).await;
        h.clock.advance(Duration::from_secs(10));
        assert!(matches!(within(waiter).await.unwrap(), Err(Error::Timeout { .. })));
        let state = h.flows.get::<String>(&k).await.unwrap().unwrap();
        assert_eq!(state.status, FlowStatus::Failed);
        assert_eq!(state.error.unwrap().kind, FlowError::TIMEOUT);
        assert_eq!(state.failed_at, Some(h.clock.now()));
    }
}

/// 67: a kept type's failure reaches the waiter and stays readable.
#[tokio::test]
async fn a_kept_failure_stays_readable() {
    for backend in BACKENDS {
        let Some(h) = harness(backend).await else { continue };
        let k = key("kept", "x");
        let waiter = tokio::spawn({
            let (flows, k) = (h.flows.clone(), k.clone());
            async move { flows.create_and_wait::<String>(&k, json!({})).await }
        });
        h.until(&k, FlowStatus::Pending).await;
        h.flows.fail(&k, FlowError::new("provider", "provider rejected request")).await.unwrap();
        assert!(matches!(within(waiter).await.unwrap(), Err(Error::Failed { .. })));
        let state = h.flows.get::<String>(&k).await.unwrap().unwrap();
        assert_eq!(state.status, FlowStatus::Failed);
        assert_eq!(state.error.unwrap().message, "provider rejected request");
    }
}

/// 68: a late failure never clobbers a success; completing twice is refused; both leave the
/// stored state unchanged.
#[tokio::test]
async fn settled_flows_refuse_late_writes_and_stay_unchanged() {
    for backend in BACKENDS {
        let Some(h) = harness(backend).await else { continue };
        let k = key("test-type", "x");
        h.flows.init(&k, json!({"m": 1})).await.unwrap();
        h.flows.complete(&k, &"first").await.unwrap();
        let before = h.flows.get::<String>(&k).await.unwrap().unwrap();
        let late = h.flows.fail(&k, FlowError::new("late", "late")).await.unwrap_err();
        assert!(
            matches!(late, Error::AlreadySettled { status: FlowStatus::Completed, .. }),
            "{late}"
        );
        let again = h.flows.complete(&k, &"second").await.unwrap_err();
        assert!(matches!(again, Error::AlreadySettled { .. }), "{again}");
        assert!(!h.flows.complete_if_pending(&k, &"third").await.unwrap());
        assert_eq!(h.flows.get::<String>(&k).await.unwrap().unwrap(), before, "{backend:?}");
    }
}

/// Bad input: completing or failing a missing or expired flow is a typed error and writes
/// nothing.
/// (Records expire on the injected clock here; Redis expiry: `redis::a_redis_flow_expires_on_redis_time`.)
#[tokio::test]
async fn completing_a_missing_or_expired_flow_is_not_found() {
    for backend in CLOCK_BACKENDS {
        let Some(h) = harness(backend).await else { continue };
        let k = key("test-type", "x");
        assert!(matches!(h.flows.complete(&k, &1).await, Err(Error::NotFound { .. })));
        assert!(matches!(h.flows.complete_if_pending(&k, &1).await, Err(Error::NotFound { .. })));
        assert!(matches!(
            h.flows.fail(&k, FlowError::new("a", "b")).await,
            Err(Error::NotFound { .. })
        ));
        h.flows.init(&k, json!(null)).await.unwrap();
        h.clock.advance(Duration::from_secs(60));
        assert!(
            matches!(h.flows.complete(&k, &1).await, Err(Error::NotFound { .. })),
            "{backend:?}"
        );
        assert!(h.flows.get::<u32>(&k).await.unwrap().is_none());
    }
}

/// 69: a handler that completes its own flow externally and then returns something else: the
/// stored (external) result wins.
#[tokio::test]
async fn an_external_completion_during_the_handler_wins() {
    for backend in BACKENDS {
        let Some(h) = harness(backend).await else { continue };
        let k = key("cache", "x");
        let (flows, k2) = (h.flows.clone(), k.clone());
        let got: String = h
            .flows
            .run(&k, move || async move {
                flows.complete(&k2, &"fresh-result").await.unwrap();
                Ok("stale-result".to_string())
            })
            .await
            .unwrap();
        assert_eq!(got, "fresh-result", "{backend:?}");
        let stored = h.flows.get::<String>(&k).await.unwrap().unwrap();
        assert_eq!(stored.result.as_deref(), Some("fresh-result"));
    }
}

/// 70: init writes PENDING with metadata and creation time and the configured TTL; it replaces
/// a COMPLETED flow; it refuses a live PENDING one but replaces a stale one; a create-and-wait
/// joins an initialised flow and resolves on completion.
#[tokio::test]
async fn init_writes_pending_and_refuses_a_live_one() {
    for backend in BACKENDS {
        let Some(h) = harness(backend).await else { continue };
        let k = key("test-type", "x");
        let created = h.flows.init(&k, json!({"state": "abc"})).await.unwrap();
        let state = h.flows.get::<String>(&k).await.unwrap().unwrap();
        assert_eq!((state.status, state.created_at), (FlowStatus::Pending, created));
        assert_eq!(state.metadata, json!({"state": "abc"}));
        let stored = h.store.get(k.as_str()).await.unwrap().unwrap();
        let ttl = Duration::from_secs(60);
        if matches!(backend, Backend::Redis) {
            // Redis reports the time it still gives the record, on the caller's clock.
            let left = stored.expires_at.saturating_since(created);
            assert!(left <= ttl && left > ttl - Duration::from_secs(5), "the configured TTL");
        } else {
            assert_eq!(stored.expires_at, created + ttl, "the configured TTL");
        }

        assert!(matches!(h.flows.init(&k, json!({})).await, Err(Error::AlreadyPending { .. })));
        h.clock.advance(Duration::from_secs(10)); // the stale window (= wait timeout)
        let replaced = h.flows.init(&k, json!({"state": "def"})).await.unwrap();
        assert!(replaced > created);

        let waiter = tokio::spawn({
            let (flows, k) = (h.flows.clone(), k.clone());
            async move { flows.create_and_wait::<u32>(&k, json!({"ignored": true})).await }
        });
        h.until(&k, FlowStatus::Pending).await;
        h.flows.complete(&k, &7u32).await.unwrap();
        assert_eq!(within(waiter).await.unwrap().unwrap(), 7);
        // A COMPLETED flow is replaced by init.
        h.flows.init(&k, json!({})).await.unwrap();
        assert_eq!(
            h.flows.get::<u32>(&k).await.unwrap().unwrap().status,
            FlowStatus::Pending,
            "{backend:?}"
        );
    }
}

/// init-unless-completed: writes PENDING over nothing, an expired flow, a FAILED one or a stale
/// PENDING one; refuses a live PENDING one; never replaces a COMPLETED one (the race it closes:
/// a check-then-init that wipes a result a peer completed in between).
/// (Records expire on the injected clock here; Redis expiry: `redis::a_redis_flow_expires_on_redis_time`.)
#[tokio::test]
async fn init_unless_completed_never_replaces_a_completed_flow() {
    for backend in CLOCK_BACKENDS {
        let Some(h) = harness(backend).await else { continue };
        let k = key("kept", "x");
        let created = h.flows.init_unless_completed(&k, json!({"n": 1})).await.unwrap();
        assert!(
            matches!(
                h.flows.init_unless_completed(&k, json!({})).await,
                Err(Error::AlreadyPending { created_at, .. }) if created_at == created
            ),
            "{backend:?}"
        );
        h.flows.complete(&k, &"peer result").await.unwrap();
        let refused = h.flows.init_unless_completed(&k, json!({"n": 2})).await;
        assert!(
            matches!(refused, Err(Error::AlreadySettled { status: FlowStatus::Completed, .. })),
            "{backend:?}: {refused:?}"
        );
        let kept = h.flows.get::<String>(&k).await.unwrap().unwrap();
        assert_eq!(kept.status, FlowStatus::Completed, "{backend:?}");
        assert_eq!(kept.result.as_deref(), Some("peer result"), "{backend:?}");
        assert_eq!(kept.metadata, json!({"n": 1}), "{backend:?}");

        // A FAILED flow (kept failures) is replaced.
        let f = key("kept", "failed");
        h.flows.init(&f, json!({})).await.unwrap();
        h.flows.fail(&f, FlowError::new("access_denied", "denied")).await.unwrap();
        h.flows.init_unless_completed(&f, json!({"n": 3})).await.unwrap();
        assert_eq!(h.flows.get::<String>(&f).await.unwrap().unwrap().status, FlowStatus::Pending);

        // A stale PENDING flow is replaced.
        let p = key("kept", "stale");
        let first = h.flows.init_unless_completed(&p, json!({})).await.unwrap();
        h.clock.advance(Duration::from_secs(10)); // the stale window (= wait timeout)
        let second = h.flows.init_unless_completed(&p, json!({"n": 4})).await.unwrap();
        assert!(second > first, "{backend:?}");

        // An expired COMPLETED flow is gone: a new one is written.
        h.clock.advance(Duration::from_secs(61));
        h.flows.init_unless_completed(&k, json!({"n": 5})).await.unwrap();
        let fresh = h.flows.get::<String>(&k).await.unwrap().unwrap();
        assert_eq!((fresh.status, fresh.metadata), (FlowStatus::Pending, json!({"n": 5})));
    }
}

/// 71: delete removes a flow and wakes its waiters with a typed error; a missing flow deletes
/// nothing.
#[tokio::test]
async fn delete_wakes_waiters_with_deleted() {
    for backend in BACKENDS {
        let Some(h) = harness(backend).await else { continue };
        let k = key("test-type", "x");
        assert!(!h.flows.delete(&k).await.unwrap());
        let waiter = tokio::spawn({
            let (flows, k) = (h.flows.clone(), k.clone());
            async move { flows.create_and_wait::<u32>(&k, json!({})).await }
        });
        h.until(&k, FlowStatus::Pending).await;
        assert!(h.flows.delete(&k).await.unwrap());
        assert!(matches!(within(waiter).await.unwrap(), Err(Error::Deleted { .. })), "{backend:?}");
        assert!(h.flows.get::<u32>(&k).await.unwrap().is_none());
    }
}

/// The seed's invalidation: delete a COMPLETED cache entry, but leave a PENDING flow to its
/// waiters.
#[tokio::test]
async fn delete_if_status_leaves_other_statuses_alone() {
    for backend in BACKENDS {
        let Some(h) = harness(backend).await else { continue };
        let k = key("test-type", "x");
        h.flows.init(&k, json!({})).await.unwrap();
        assert!(!h.flows.delete_if_status(&k, FlowStatus::Completed).await.unwrap());
        assert_eq!(h.flows.get::<u32>(&k).await.unwrap().unwrap().status, FlowStatus::Pending);
        h.flows.complete(&k, &1u32).await.unwrap();
        assert!(h.flows.delete_if_status(&k, FlowStatus::Completed).await.unwrap(), "{backend:?}");
        assert!(h.flows.get::<u32>(&k).await.unwrap().is_none());
    }
}

/// 72, 73 adapted: a COMPLETED run result is served until its TTL, then the handler runs again.
/// (Records expire on the injected clock here; Redis expiry: `redis::a_redis_flow_expires_on_redis_time`.)
#[tokio::test]
async fn completed_results_are_reused_until_their_ttl() {
    for backend in CLOCK_BACKENDS {
        let Some(h) = harness(backend).await else { continue };
        let k = key("cache", "x");
        let runs = Arc::new(AtomicUsize::new(0));
        let run = |n: u32| {
            let (flows, k, runs) = (h.flows.clone(), k.clone(), runs.clone());
            async move {
                flows
                    .run(&k, move || async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        Ok(n)
                    })
                    .await
                    .unwrap()
            }
        };
        assert_eq!(run(1).await, 1);
        h.clock.advance(Duration::from_secs(59));
        assert_eq!(run(2).await, 1, "{backend:?}: reused within its TTL");
        h.clock.advance(Duration::from_secs(1));
        assert_eq!(run(3).await, 3, "{backend:?}: recomputed after its TTL");
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }
}

/// A type that does not reuse results runs its handler on every settled call; a non-kept
/// failure is not served to the next caller.
#[tokio::test]
async fn fresh_types_and_failures_are_not_reused() {
    for backend in BACKENDS {
        let Some(h) = harness(backend).await else { continue };
        let k = key("fresh", "x");
        for n in 0..3u32 {
            let got: u32 = h.flows.run(&k, move || async move { Ok(n) }).await.unwrap();
            assert_eq!(got, n, "{backend:?}");
        }
        let k = key("cache", "y");
        let failed = h
            .flows
            .run::<u32, _, _>(&k, || async { Err(FlowError::new("transient", "503")) })
            .await
            .unwrap_err();
        assert!(matches!(failed, Error::Failed { .. }));
        assert_eq!(h.flows.run(&k, || async { Ok(5u32) }).await.unwrap(), 5, "{backend:?}");
        // A kept type serves its failure until the TTL.
        let k = key("kept", "z");
        let _ =
            h.flows.run::<u32, _, _>(&k, || async { Err(FlowError::new("terminal", "no")) }).await;
        let again = h.flows.run(&k, || async { Ok(6u32) }).await.unwrap_err();
        assert!(matches!(again, Error::Failed { .. }), "{backend:?}: {again}");
    }
}

/// 76: staleness measures from completion, failure, else creation, against a window.
#[tokio::test]
async fn staleness_uses_the_latest_transition() {
    for backend in BACKENDS {
        let Some(h) = harness(backend).await else { continue };
        let k = key("test-type", "x");
        assert!(h.flows.staleness(&k, Duration::from_secs(120)).await.unwrap().is_none());
        h.flows.init(&k, json!({})).await.unwrap();
        h.clock.advance(Duration::from_secs(5));
        let s = h.flows.staleness(&k, Duration::from_secs(3)).await.unwrap().unwrap();
        assert_eq!(
            (s.status, s.age, s.is_stale),
            (FlowStatus::Pending, Duration::from_secs(5), true)
        );
        h.flows.complete(&k, &1u32).await.unwrap();
        h.clock.advance(Duration::from_secs(30));
        let s = h.flows.staleness(&k, Duration::from_secs(120)).await.unwrap().unwrap();
        assert_eq!((s.age, s.is_stale), (Duration::from_secs(30), false), "{backend:?}");
        let s = h.flows.staleness(&k, Duration::from_secs(29)).await.unwrap().unwrap();
        assert!(s.is_stale);
    }
}

/// 77, inverted on purpose: flows of two tenants with the same type and id are separate. LibreChat
/// keys were not tenant-scoped; here a completion under one tenant never reaches another.
#[tokio::test]
async fn tenants_never_share_flows() {
    for backend in BACKENDS {
        let Some(h) = harness(backend).await else { continue };
        let a = FlowKey::new("mcp_oauth", "alice:srv").unwrap().with_tenant("tenant-a").unwrap();
        let b = FlowKey::new("mcp_oauth", "alice:srv").unwrap().with_tenant("tenant-b").unwrap();
        let bare = FlowKey::new("mcp_oauth", "alice:srv").unwrap();
        h.flows.init(&a, json!({})).await.unwrap();
        assert!(matches!(h.flows.complete(&b, &"b-tokens").await, Err(Error::NotFound { .. })));
        assert!(matches!(h.flows.complete(&bare, &"tokens").await, Err(Error::NotFound { .. })));
        h.flows.complete(&a, &"a-tokens").await.unwrap();
        let got: String = h.flows.run(&b, || async { Ok("b-own".to_string()) }).await.unwrap();
        assert_eq!(got, "b-own", "{backend:?}");
    }
}

/// complete-if-pending: among racing completers exactly one wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_if_pending_has_exactly_one_winner() {
    for backend in BACKENDS {
        let Some(h) = harness(backend).await else { continue };
        for round in 0..20 {
            let k = key("test-type", &format!("r{round}"));
            h.flows.init(&k, json!({})).await.unwrap();
            let racers: Vec<_> = (0..16)
                .map(|i| {
                    let (flows, k) = (h.flows.clone(), k.clone());
                    tokio::spawn(async move { flows.complete_if_pending(&k, &i).await.unwrap() })
                })
                .collect();
            let mut winners = 0;
            for r in racers {
                winners += usize::from(r.await.unwrap());
            }
            assert_eq!(winners, 1, "{backend:?} round {round}");
        }
    }
}

/// Bad input: a zero or absurd TTL is refused when the manager is built.
#[test]
fn absurd_configuration_is_refused() {
    use flow_state::{FlowManager, FlowTypeConfig, MemoryStore, SharedStore};
    let store = SharedStore::new(MemoryStore::new());
    let build = |c: FlowTypeConfig| FlowManager::builder(store.clone()).flow_type("t", c).build();
    for bad in [
        FlowTypeConfig::new(Duration::ZERO),
        FlowTypeConfig::new(Duration::from_secs(365 * 24 * 3600)),
        FlowTypeConfig::new(Duration::from_secs(60)).completed_ttl(Duration::ZERO),
        FlowTypeConfig::new(Duration::from_secs(60)).wait_timeout(Duration::from_secs(61)),
        FlowTypeConfig::new(Duration::from_secs(60)).stale_after(Duration::from_secs(1)),
    ] {
        assert!(matches!(build(bad.clone()), Err(Error::InvalidConfig(_))), "{bad:?}");
    }
    assert!(build(FlowTypeConfig::new(Duration::from_secs(60))).is_ok());
}

/// The race: a request read a stale PENDING flow and means to delete it, but between its read
/// and its delete another process deleted it and created a fresh one (a new prompt). Deleting
/// "the PENDING flow" would remove the fresh one (its waiters fail, the user's consent is
/// refused); deleting "this generation" leaves it alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_generation_leaves_a_newer_one_alone() {
    let clock = flow_state::ManualClock::default();
    let store = flow_state::testkit::FaultyStore::new(
        flow_state::SharedStore::new(flow_state::MemoryStore::with_clock(clock.shared())),
        clock.shared(),
    );
    let flows = flow_state::FlowManager::builder(flow_state::SharedStore::from_arc(store.clone()))
        .clock(clock.shared())
        .build()
        .unwrap();
    let k = key("mcp_oauth", "x");
    let stale = flows.init(&k, json!({"n": 1})).await.unwrap();
    clock.advance(Duration::from_secs(5));
    store.hold_next_delete("");
    let deleting = tokio::spawn({
        let (flows, k) = (flows.clone(), k.clone());
        async move { flows.delete_generation(&k, stale, FlowStatus::Pending).await }
    });
    within(store.until_deletes_held(1)).await;
    // Meanwhile another process replaced it (its delete is not held).
    assert!(flows.delete(&k).await.unwrap());
    let fresh = flows.init(&k, json!({"n": 2})).await.unwrap();
    assert_ne!(fresh, stale);
    store.release_delete();
    assert!(!within(deleting).await.unwrap().unwrap(), "the newer generation was not deleted");
    let now = flows.get::<u32>(&k).await.unwrap().expect("the fresh flow is still there");
    assert_eq!((now.status, now.created_at), (FlowStatus::Pending, fresh));
}
