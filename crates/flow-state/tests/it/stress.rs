//! Stress: many tasks on few keys on a multi-thread runtime. Each test names the race it pins.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use flow_state::FlowManager;
use serde_json::json;

use crate::harness::{BACKENDS, harness, key, manager, within};

const TASKS: usize = 1_000;
const KEYS: usize = 16;

struct Counters {
    active: Vec<AtomicUsize>,
    runs: Vec<AtomicUsize>,
    overlaps: AtomicUsize,
}

impl Counters {
    fn new() -> Arc<Self> {
        Arc::new(Counters {
            active: (0..KEYS).map(|_| AtomicUsize::new(0)).collect(),
            runs: (0..KEYS).map(|_| AtomicUsize::new(0)).collect(),
            overlaps: AtomicUsize::new(0),
        })
    }
}

async fn hammer(managers: Vec<FlowManager>, flow_type: &'static str, counters: Arc<Counters>) {
    let tasks: Vec<_> = (0..TASKS)
        .map(|i| {
            let flows = managers[i % managers.len()].clone();
            let counters = counters.clone();
            tokio::spawn(async move {
                let k = i % KEYS;
                let flow_key = key(flow_type, &format!("user-{k}"));
                let c = counters.clone();
                flows
                    .run(&flow_key, move || async move {
                        if c.active[k].fetch_add(1, Ordering::SeqCst) != 0 {
                            c.overlaps.fetch_add(1, Ordering::SeqCst);
                        }
                        let generation = c.runs[k].fetch_add(1, Ordering::SeqCst);
                        tokio::task::yield_now().await;
                        c.active[k].fetch_sub(1, Ordering::SeqCst);
                        Ok((k, generation))
                    })
                    .await
                    .map(|(got_key, _)| assert_eq!(got_key, k, "a caller got another key's result"))
            })
        })
        .collect();
    for t in tasks {
        within(t).await.unwrap().unwrap();
    }
}

/// The race: two callers both see no live flow and both start a handler for the same key, in one
/// process or in two processes sharing a store (two managers here). With results reused, each
/// key must run exactly once; no caller may hang or get another key's result.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cached_key_runs_its_handler_exactly_once() {
    for backend in BACKENDS {
        let Some(h) = harness(backend).await else { continue };
        let other_process = manager(&h.store, &h.clock);
        let counters = Counters::new();
        hammer(vec![h.flows.clone(), other_process], "cache", counters.clone()).await;
        for k in 0..KEYS {
            assert_eq!(counters.runs[k].load(Ordering::SeqCst), 1, "{backend:?} key {k}");
        }
        assert_eq!(counters.overlaps.load(Ordering::SeqCst), 0);
    }
}

/// The race: a settled flow is replaced by a new generation while late callers of the old one
/// are still arriving. With no reuse, handlers run again, but never two at a time for a key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn handlers_of_one_key_never_overlap_across_generations() {
    for backend in BACKENDS {
        let Some(h) = harness(backend).await else { continue };
        let other_process = manager(&h.store, &h.clock);
        let counters = Counters::new();
        hammer(vec![h.flows.clone(), other_process], "fresh", counters.clone()).await;
        assert_eq!(
            counters.overlaps.load(Ordering::SeqCst),
            0,
            "{backend:?}: two handlers ran at once"
        );
        let total: usize = counters.runs.iter().map(|r| r.load(Ordering::SeqCst)).sum();
        assert!((KEYS..=TASKS).contains(&total), "{backend:?}: {total}");
    }
}

/// The race: a completion lands between a waiter's read of PENDING and its wait (a lost
/// wake-up). Hundreds of waiters and completers interleave; every waiter must return.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_waiter_misses_its_wake_up() {
    for backend in BACKENDS {
        let Some(h) = harness(backend).await else { continue };
        for k in 0..KEYS {
            h.flows.init(&key("test-type", &format!("k{k}")), json!({})).await.unwrap();
        }
        let waiters: Vec<_> = (0..TASKS)
            .map(|i| {
                let flows = h.flows.clone();
                tokio::spawn(async move {
                    flows.wait::<usize>(&key("test-type", &format!("k{}", i % KEYS))).await
                })
            })
            .collect();
        for k in 0..KEYS {
            let flows = h.flows.clone();
            tokio::spawn(async move {
                flows.complete(&key("test-type", &format!("k{k}")), &k).await.unwrap()
            });
        }
        for (i, w) in waiters.into_iter().enumerate() {
            assert_eq!(within(w).await.unwrap().unwrap(), i % KEYS, "{backend:?}");
        }
    }
}

/// The race: a run has published its result but has not yet left the in-flight map when its
/// caller invalidates the flow (deletes the record) and runs it again. The second run must run
/// its handler, never hand back the invalidated result (connection-factory's token look-up
/// depends on this: an expired token, deleted, must not come back). Eight tasks on four worker
/// threads, each invalidating and re-running its own key many times, make the preemption in
/// that window likely.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deleted_result_is_never_handed_to_the_next_run() {
    for backend in BACKENDS {
        let Some(h) = harness(backend).await else { continue };
        let rounds: u64 = match backend {
            crate::harness::Backend::Memory => 2_000,
            _ => 300,
        };
        let tasks: Vec<_> = (0..8)
            .map(|t| {
                let flows = h.flows.clone();
                tokio::spawn(async move {
                    let flow_key = key("cache", &format!("invalidated-{t}"));
                    for round in 0..rounds {
                        let got: u64 =
                            flows.run(&flow_key, move || async move { Ok(round) }).await?;
                        assert_eq!(
                            got, round,
                            "{backend:?} task {t}: an invalidated result came back"
                        );
                        flows.delete(&flow_key).await?;
                    }
                    Ok::<_, flow_state::Error>(())
                })
            })
            .collect();
        for t in tasks {
            within(t).await.unwrap().unwrap();
        }
    }
}

/// The count `benches/flows.rs` (`cold_key_1000_callers_1ms_handler`) asserts, as a test: 1,000
/// callers on one cold key, in one process, while the handler runs. The race: a caller arrives
/// between the map look-up and the PENDING write of another and starts a second handler. The
/// handler holds until every caller has called `run`, so all 1,000 overlap the one run; exactly
/// one handler run, and every caller gets its result.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_callers_on_a_cold_key_run_the_handler_once() {
    for backend in BACKENDS {
        let Some(h) = harness(backend).await else { continue };
        let flow_key = key("cache", "cold");
        let runs = Arc::new(AtomicUsize::new(0));
        let arrived = Arc::new(AtomicUsize::new(0));
        let callers: Vec<_> = (0..TASKS)
            .map(|_| {
                let (flows, flow_key, runs, arrived) =
                    (h.flows.clone(), flow_key.clone(), runs.clone(), arrived.clone());
                tokio::spawn(async move {
                    let arrivals = arrived.clone();
                    arrivals.fetch_add(1, Ordering::SeqCst);
                    flows
                        .run(&flow_key, move || async move {
                            runs.fetch_add(1, Ordering::SeqCst);
                            while arrived.load(Ordering::SeqCst) < TASKS {
                                tokio::task::yield_now().await;
                            }
                            Ok(7u64)
                        })
                        .await
                })
            })
            .collect();
        for c in callers {
            assert_eq!(within(c).await.unwrap().unwrap(), 7, "{backend:?}");
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1, "{backend:?}: exactly one handler run");
    }
}
