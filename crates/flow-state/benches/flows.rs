//! flow-state benchmarks; see BENCHMARKS.md at the workspace root for results.
//!
//! `cargo bench -p flow-state --all-features --bench flows`

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use criterion::{Criterion, criterion_group};
use flow_state::{
    FlowKey, FlowManager, FlowTypeConfig, MemoryStore, SharedStore, SledStore, SystemClock,
};
use serde_json::json;

const KEYS: usize = 1_024;
const THREADS: usize = 2;

fn manager(store: SharedStore) -> FlowManager {
    FlowManager::builder(store)
        .defaults(FlowTypeConfig::new(Duration::from_secs(3_600)))
        .build()
        .unwrap()
}

fn keys() -> Arc<Vec<FlowKey>> {
    Arc::new(
        (0..KEYS)
            .map(|i| {
                FlowKey::new("tokens", format!("user-{i}:server"))
                    .unwrap()
                    .with_tenant("t")
                    .unwrap()
            })
            .collect(),
    )
}

/// Runs `per_thread` on `THREADS` threads, each with its own current-thread runtime, and returns
/// the wall time for all of them.
fn on_threads<F, Fut>(iters: u64, f: F) -> Duration
where
    F: Fn(u64, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let f = Arc::new(f);
    let barrier = Arc::new(std::sync::Barrier::new(THREADS + 1));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let (f, barrier) = (f.clone(), barrier.clone());
            std::thread::spawn(move || {
                let rt =
                    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                barrier.wait();
                rt.block_on(f(iters / THREADS as u64, t));
            })
        })
        .collect();
    barrier.wait();
    let start = SystemClock::instant();
    for h in handles {
        h.join().unwrap();
    }
    SystemClock::instant().duration_since(start)
}

/// A cached COMPLETED hit on 2 threads, side by side with moka's `future::Cache::get_with`.
fn cached_hit(c: &mut Criterion) {
    let mut group = c.benchmark_group("cached_hit_2_threads");
    group.throughput(criterion::Throughput::Elements(1));
    let keys = keys();
    let flows = manager(SharedStore::new(MemoryStore::new()));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        for k in keys.iter() {
            let v: u64 = flows.run(k, || async { Ok(7u64) }).await.unwrap();
            assert_eq!(v, 7);
        }
    });
    group.bench_function("flow_state_run", |b| {
        let (flows, keys) = (flows.clone(), keys.clone());
        b.iter_custom(move |iters| {
            let (flows, keys) = (flows.clone(), keys.clone());
            on_threads(iters, move |n, t| {
                let (flows, keys) = (flows.clone(), keys.clone());
                async move {
                    for i in 0..n as usize {
                        let k = &keys[(i * 7 + t * 13) % KEYS];
                        let v: u64 = flows.run(k, || async { Ok(0u64) }).await.unwrap();
                        std::hint::black_box(v);
                    }
                }
            })
        })
    });
    let cache: moka::future::Cache<FlowKey, u64> = moka::future::Cache::new(100_000);
    rt.block_on(async {
        for k in keys.iter() {
            cache.get_with(k.clone(), async { 7u64 }).await;
        }
    });
    group.bench_function("moka_get_with", |b| {
        let (cache, keys) = (cache.clone(), keys.clone());
        b.iter_custom(move |iters| {
            let (cache, keys) = (cache.clone(), keys.clone());
            on_threads(iters, move |n, t| {
                let (cache, keys) = (cache.clone(), keys.clone());
                async move {
                    for i in 0..n as usize {
                        let k = &keys[(i * 7 + t * 13) % KEYS];
                        let v = cache.get_with_by_ref(k, async { 0u64 }).await;
                        std::hint::black_box(v);
                    }
                }
            })
        })
    });
    group.finish();
}

/// 1,000 concurrent callers on one cold key with a 1 ms handler: the time until the last caller
/// has the result (one handler run each time).
fn cold_key(c: &mut Criterion) {
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let flows = manager(SharedStore::new(MemoryStore::new()));
    let generation = Arc::new(AtomicUsize::new(0));
    c.bench_function("cold_key_1000_callers_1ms_handler", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let g = generation.fetch_add(1, Ordering::Relaxed);
                let key = FlowKey::new("cold", format!("k{g}")).unwrap();
                let runs = Arc::new(AtomicUsize::new(0));
                total += rt.block_on(async {
                    let start = SystemClock::instant();
                    let callers: Vec<_> = (0..1_000)
                        .map(|_| {
                            let (flows, key, runs) = (flows.clone(), key.clone(), runs.clone());
                            tokio::spawn(async move {
                                flows
                                    .run(&key, move || async move {
                                        runs.fetch_add(1, Ordering::Relaxed);
                                        // A 1 ms handler: tokio's timer wheel rounds a 1 ms sleep up
                                        // to the next tick (often 2 ms), so sleep on a blocking thread.
                                        tokio::task::spawn_blocking(|| {
                                            std::thread::sleep(Duration::from_millis(1))
                                        })
                                        .await
                                        .unwrap();
                                        Ok(1u64)
                                    })
                                    .await
                                    .unwrap()
                            })
                        })
                        .collect();
                    for c in callers {
                        c.await.unwrap();
                    }
                    SystemClock::instant().duration_since(start)
                });
                assert_eq!(runs.load(Ordering::Relaxed), 1, "exactly one handler run");
            }
            total
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));
    targets = cached_hit, cold_key
}

fn percentiles(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let at = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
    println!(
        "{name}: n={} p50={:?} p99={:?} max={:?}",
        samples.len(),
        at(0.50),
        at(0.99),
        samples[samples.len() - 1]
    );
}

/// Wake latency in memory: from the call to complete() until the waiter has the result, on a
/// multi-thread runtime (the waiter usually wakes on the other worker) and on a current-thread
/// runtime (the waiter runs as soon as the completer yields).
fn wake_latency() {
    let multi =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    wake_latency_on("wake_latency_memory_multi_thread (complete -> waiter has result)", &multi);
    let current = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    wake_latency_on("wake_latency_memory_current_thread (complete -> waiter has result)", &current);
}

fn wake_latency_on(name: &str, rt: &tokio::runtime::Runtime) {
    let flows = manager(SharedStore::new(MemoryStore::new()));
    // The completer runs in a spawned task, as a callback handler would: `block_on` runs its
    // future on the calling thread, outside the runtime's workers, so every wake from there is
    // a cross-thread unpark that no server would pay.
    let samples = rt
        .block_on(rt.spawn(async move {
            let mut samples = Vec::new();
            for i in 0..5_000 {
                let key = FlowKey::new("wake", format!("k{i}")).unwrap();
                flows.init(&key, json!(null)).await.unwrap();
                let (tx, rx) = tokio::sync::oneshot::channel();
                let waiter = tokio::spawn({
                    let (flows, key) = (flows.clone(), key.clone());
                    async move {
                        let _: u64 = flows.wait(&key).await.unwrap();
                        tx.send(SystemClock::instant()).unwrap();
                    }
                });
                // Let the waiter reach its wait.
                tokio::time::sleep(Duration::from_micros(50)).await;
                let start = SystemClock::instant();
                flows.complete(&key, &1u64).await.unwrap();
                let woke = rx.await.unwrap();
                waiter.await.unwrap();
                samples.push(woke.saturating_duration_since(start));
            }
            samples
        }))
        .unwrap();
    percentiles(name, samples);
}

/// sled: PENDING to COMPLETED round trip (init + complete), default durability.
fn sled_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let store = SharedStore::new(SledStore::open(dir.path()).unwrap());
    let flows = manager(store);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let samples = rt.block_on(async {
        let mut samples = Vec::new();
        for i in 0..20_000 {
            let key = FlowKey::new("rt", format!("k{i}")).unwrap();
            let start = SystemClock::instant();
            flows.init(&key, json!(null)).await.unwrap();
            flows.complete(&key, &1u64).await.unwrap();
            samples.push(SystemClock::instant().duration_since(start));
        }
        samples
    });
    percentiles("sled_pending_to_completed_round_trip (periodic flush)", samples);
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    pages * 4096
}

/// 100,000 live PENDING flows in memory: resident memory added.
fn pending_memory() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let store = SharedStore::new(MemoryStore::new());
    let flows = manager(store.clone());
    let before = rss_bytes();
    rt.block_on(async {
        for i in 0..100_000 {
            let key = FlowKey::new("mcp_oauth", format!("user-{i}:server"))
                .unwrap()
                .with_tenant("tenant")
                .unwrap();
            flows.init(&key, json!(null)).await.unwrap();
        }
    });
    let after = rss_bytes();
    println!(
        "pending_100k_memory: {:.1} MB resident added ({} bytes per flow)",
        (after - before) as f64 / 1e6,
        (after - before) / 100_000
    );
    drop(flows);
    drop(store);
}

fn main() {
    pending_memory();
    wake_latency();
    sled_round_trip();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
