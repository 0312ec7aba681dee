//! flow-state benchmarks; see BENCHMARKS.md at the workspace root for results.
//!
//! `cargo bench -p flow-state --all-features --bench flows`
//!
//! Under `cargo test --benches` (what `cargo xtask benches` and CI run) every part runs once,
//! small, without timing: the counts asserted here (one handler run per 1,000-caller burst)
//! then fail the build when they break.

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

/// Criterion's rule: without `--bench` (as under `cargo test --benches`), or with `--test`, the
/// benches run once as tests. The parts outside criterion then use small sizes.
fn test_mode() -> bool {
    let args: Vec<String> = std::env::args().collect();
    !args.iter().any(|a| a == "--bench") || args.iter().any(|a| a == "--test")
}

/// `full` when measuring, `quick` in test mode.
fn size(full: usize, quick: usize) -> usize {
    if test_mode() { quick } else { full }
}

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

/// 1,000 concurrent callers on one cold key with a 1 ms handler: the time from the burst's start
/// until the last (slowest) caller has the result, one handler run each time. Besides
/// criterion's mean, prints the distribution of the slowest caller over the bursts.
fn cold_key(c: &mut Criterion) {
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let flows = manager(SharedStore::new(MemoryStore::new()));
    let generation = Arc::new(AtomicUsize::new(0));
    let slowest = Arc::new(std::sync::Mutex::new(Vec::new()));
    c.bench_function("cold_key_1000_callers_1ms_handler", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let g = generation.fetch_add(1, Ordering::Relaxed);
                let key = FlowKey::new("cold", format!("k{g}")).unwrap();
                let runs = Arc::new(AtomicUsize::new(0));
                let burst = rt.block_on(async {
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
                                    .unwrap();
                                // When this caller had its result.
                                SystemClock::instant()
                            })
                        })
                        .collect();
                    // The slowest caller's wait, from the burst's start.
                    let mut last = start;
                    for c in callers {
                        last = last.max(c.await.unwrap());
                    }
                    last.duration_since(start)
                });
                total += burst;
                slowest.lock().unwrap().push(burst);
                assert_eq!(runs.load(Ordering::Relaxed), 1, "exactly one handler run");
            }
            total
        })
    });
    let bursts = std::mem::take(&mut *slowest.lock().unwrap());
    percentiles("cold_key_1000_callers_1ms_handler, slowest caller of each burst", bursts);
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
            for i in 0..size(5_000, 50) {
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
                mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_micros(50)).await;
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
        for i in 0..size(20_000, 100) {
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

/// The records one interactive login writes, as connection-factory writes them: the PENDING
/// `mcp_oauth` flow (tenant-scoped) carrying the pending authorization (PKCE verifier, state,
/// redirect URI, resource, scope), the discovery it was built from (protected resource and
/// authorization server metadata) and the authorization URL; and the `mcp_oauth_state` mapping
/// from the state to that flow. Field names follow connection-factory's `OAuthFlowMeta` and
/// `StateMeta`; values have realistic lengths.
fn login_records(i: usize) -> [(FlowKey, serde_json::Value); 2] {
    let state = format!("{i:0>43}");
    let flow_id = format!("user-{i}:server");
    let server = "https://mcp.example.com/mcp";
    let issuer = "https://auth.example.com";
    let pending = json!({
        "state": state,
        "code_verifier": format!("{i:x>86}"),
        "redirect_uri": "http://127.0.0.1:8765/callback",
        "resource": server,
        "scope": "mcp:tools mcp:resources offline_access",
        "issuer": issuer,
        "client_id": "b4c1d2e3-5f60-4718-9a2b-3c4d5e6f7081",
        "created_at": 1_800_000_000_000u64,
    });
    let discovery = json!({
        "resource": {
            "resource": server,
            "authorization_servers": [issuer],
            "scopes_supported": ["mcp:tools", "mcp:resources", "offline_access"],
            "bearer_methods_supported": ["header"],
        },
        "resource_metadata_url": "https://mcp.example.com/.well-known/oauth-protected-resource/mcp",
        "authorization_server": {
            "issuer": issuer,
            "authorization_endpoint": format!("{issuer}/authorize"),
            "token_endpoint": format!("{issuer}/token"),
            "registration_endpoint": format!("{issuer}/register"),
            "revocation_endpoint": format!("{issuer}/revoke"),
            "response_types_supported": ["code"],
            "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["none", "client_secret_basic", "client_secret_post", "private_key_jwt"],
            "scopes_supported": ["mcp:tools", "mcp:resources", "offline_access"],
            "client_id_metadata_document_supported": true,
        },
    });
    let authorization_url = format!(
        "{issuer}/authorize?response_type=code&client_id=b4c1d2e3-5f60-4718-9a2b-3c4d5e6f7081\
         &redirect_uri=http%3A%2F%2F127.0.0.1%3A8765%2Fcallback&scope=mcp%3Atools+mcp%3Aresources+offline_access\
         &state={state}&code_challenge={i:y>43}&code_challenge_method=S256\
         &resource=https%3A%2F%2Fmcp.example.com%2Fmcp"
    );
    let flow = FlowKey::new("mcp_oauth", &flow_id).unwrap().with_tenant("tenant").unwrap();
    let mapping = FlowKey::new("mcp_oauth_state", &state).unwrap();
    [
        (
            flow,
            json!({ "pending": pending, "discovery": discovery, "authorization_url": authorization_url }),
        ),
        (
            mapping,
            json!({ "tenant": "tenant", "user": format!("user-{i}"), "server": server, "flow_id": flow_id }),
        ),
    ]
}

/// 100,000 logins in progress in memory: resident memory added by the two records each login
/// writes ([`login_records`]: the PENDING authorization with its discovery, and the state
/// mapping), so 200,000 records.
fn pending_memory() {
    let logins = size(100_000, 100);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let store = SharedStore::new(MemoryStore::new());
    let flows = manager(store.clone());
    let before = rss_bytes();
    rt.block_on(async {
        for i in 0..logins {
            for (key, metadata) in login_records(i) {
                flows.init(&key, metadata).await.unwrap();
            }
        }
    });
    let after = rss_bytes();
    println!(
        "pending_logins_memory ({logins} logins, 2 records each: the pending authorization with \
         its discovery, and the state mapping): {:.1} MB resident added ({} bytes per login)",
        (after.saturating_sub(before)) as f64 / 1e6,
        after.saturating_sub(before) / logins as u64
    );
    drop(flows);
    drop(store);
}

/// flow-state's cached hit beside moka's, in the same process, taking turns: `rounds` runs of
/// `ops` hits each on 2 threads; prints the median, min and max throughput of each (the median,
/// not the best run, is the figure BENCHMARKS.md reports).
fn moka_paired() {
    let (rounds, ops) = (size(5, 1), size(2_000_000, 2_000) as u64);
    let keys = keys();
    let flows = manager(SharedStore::new(MemoryStore::new()));
    let cache: moka::future::Cache<FlowKey, u64> = moka::future::Cache::new(100_000);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        for k in keys.iter() {
            let v: u64 = flows.run(k, || async { Ok(7u64) }).await.unwrap();
            assert_eq!(v, 7);
            cache.get_with(k.clone(), async { 7u64 }).await;
        }
    });
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for _ in 0..rounds {
        let (f, k) = (flows.clone(), keys.clone());
        let took = on_threads(ops, move |n, t| {
            let (flows, keys) = (f.clone(), k.clone());
            async move {
                for i in 0..n as usize {
                    let k = &keys[(i * 7 + t * 13) % KEYS];
                    let v: u64 = flows.run(k, || async { Ok(0u64) }).await.unwrap();
                    assert_eq!(v, 7, "a cached hit");
                }
            }
        });
        ours.push(ops as f64 / took.as_secs_f64());
        let (c, k) = (cache.clone(), keys.clone());
        let took = on_threads(ops, move |n, t| {
            let (cache, keys) = (c.clone(), k.clone());
            async move {
                for i in 0..n as usize {
                    let k = &keys[(i * 7 + t * 13) % KEYS];
                    std::hint::black_box(cache.get_with_by_ref(k, async { 0u64 }).await);
                }
            }
        });
        theirs.push(ops as f64 / took.as_secs_f64());
    }
    let summary = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    let (om, omin, omax) = summary(&mut ours);
    let (tm, tmin, tmax) = summary(&mut theirs);
    println!(
        "cached hit on 2 threads, {rounds} paired runs of {ops} hits: flow-state median {:.1} M/s \
         (min {:.1}, max {:.1}); moka get_with median {:.1} M/s (min {:.1}, max {:.1}); \
         ratio of medians {:.2}",
        om / 1e6,
        omin / 1e6,
        omax / 1e6,
        tm / 1e6,
        tmin / 1e6,
        tmax / 1e6,
        om / tm
    );
}

fn main() {
    pending_memory();
    moka_paired();
    wake_latency();
    sled_round_trip();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
