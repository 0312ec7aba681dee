//! Benchmarks of token storage (`cargo bench -p token-storage`); figures in `BENCHMARKS.md`.
//!
//! - `get_valid_hit/{memory,sled}/2_threads`: a fresh token served from the in-memory view by
//!   two threads at once (reported per operation; ops/s = 1 / time).
//! - `tokens_read/{memory,sled}`: a read that goes to the store (version check, no decrypt).
//! - `store/{memory,sled}`: an interactive store: seal, compare-and-swap (sled: flushed).
//! - `force_refresh_burst/1000`: 1,000 concurrent `force_refresh` calls for one rejected token
//!   against a refresher with 20 ms latency; asserts one refresher call per burst and records the
//!   slowest caller's wait (from the burst's start, not from the caller's first poll) beyond the
//!   refresher's own latency.
//!
//! Under `cargo test --benches` (`cargo xtask benches`, CI) each runs once, as a test: the
//! asserted count then fails the build when it breaks (it is also an integration test:
//! `tests/scenarios.rs`, `a_thousand_forced_refreshes_call_the_refresher_once`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use token_storage::testkit::FakeAuthServer;
use token_storage::{
    EncryptionKey, Keyring, MemoryTokenStore, RefreshError, RefreshRequest, Refresher, SharedClock,
    SharedTokenStore, SledTokenStore, SystemClock, TokenKey, TokenResponse, TokenStorage,
    TokenStorageConfig,
};

const ISS: &str = "https://as.example";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn config() -> TokenStorageConfig {
    let mut c = TokenStorageConfig::default();
    c.storm_limit = u32::MAX;
    c
}

fn storage(store: SharedTokenStore, refresher: Arc<dyn Refresher>) -> TokenStorage {
    let keys = Arc::new(Keyring::new("k1", EncryptionKey::from_bytes([7; 32])).unwrap());
    TokenStorage::builder(store, keys, refresher).config(config()).build()
}

fn stores() -> (Vec<(&'static str, SharedTokenStore)>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let sled = SledTokenStore::open(dir.path()).unwrap();
    (
        vec![
            ("memory", SharedTokenStore::new(MemoryTokenStore::new())),
            ("sled", SharedTokenStore::new(sled)),
        ],
        dir,
    )
}

fn hit_path(c: &mut Criterion) {
    let rt = runtime();
    let (stores, _dir) = stores();
    let mut group = c.benchmark_group("get_valid_hit");
    for (name, store) in stores {
        let server = FakeAuthServer::new(SharedClock::system());
        let storage = storage(store, server.clone());
        let key = TokenKey::new("acme", "alice", "github");
        rt.block_on(storage.store(&key, ISS, server.issue(&key))).unwrap();
        group.bench_function(format!("{name}/2_threads"), |b| {
            b.iter_custom(|iters| {
                let per_thread = iters.div_ceil(2);
                let barrier = Arc::new(Barrier::new(2));
                let start = SystemClock::instant();
                std::thread::scope(|s| {
                    for _ in 0..2 {
                        let (storage, key, barrier, handle) =
                            (storage.clone(), key.clone(), barrier.clone(), rt.handle().clone());
                        s.spawn(move || {
                            barrier.wait();
                            handle.block_on(async {
                                for _ in 0..per_thread {
                                    let set = storage.get_valid(&key, ISS).await.unwrap();
                                    std::hint::black_box(set);
                                }
                            });
                        });
                    }
                });
                SystemClock::instant().duration_since(start)
            });
        });
    }
    group.finish();
}

fn reads_and_writes(c: &mut Criterion) {
    let rt = runtime();
    let (stores, _dir) = stores();
    for (name, store) in stores {
        let server = FakeAuthServer::new(SharedClock::system());
        let storage = storage(store, server.clone());
        let key = TokenKey::new("acme", "alice", name);
        rt.block_on(storage.store(&key, ISS, server.issue(&key))).unwrap();
        c.bench_function(&format!("tokens_read/{name}"), |b| {
            b.to_async(&rt).iter(|| async { storage.tokens(&key).await.unwrap() })
        });
        c.bench_function(&format!("store/{name}"), |b| {
            b.to_async(&rt)
                .iter(|| async { storage.store(&key, ISS, server.issue(&key)).await.unwrap() })
        });
    }
}

/// A refresher with a fixed latency that counts calls and records how long each took.
#[derive(Debug)]
struct Slow {
    latency: Duration,
    calls: AtomicU64,
    last_took_us: AtomicU64,
}

#[async_trait::async_trait]
impl Refresher for Slow {
    async fn refresh(
        &self,
        _: &TokenKey,
        r: &RefreshRequest,
    ) -> Result<TokenResponse, RefreshError> {
        let start = SystemClock::instant();
        self.calls.fetch_add(1, Ordering::SeqCst);
        mcp_clock::Clock::sleep(&mcp_clock::SystemClock, self.latency).await;
        let n = self.calls.load(Ordering::SeqCst);
        let response = TokenResponse::bearer(format!("at-{n}"))
            .expires_in(Duration::from_secs(3600))
            .refresh_token(format!("{}+", r.refresh_token.expose()));
        self.last_took_us.store(
            SystemClock::instant().duration_since(start).as_micros() as u64,
            Ordering::SeqCst,
        );
        Ok(response)
    }
}

fn burst(c: &mut Criterion) {
    let rt = runtime();
    let slow = Arc::new(Slow {
        latency: Duration::from_millis(20),
        calls: AtomicU64::new(0),
        last_took_us: AtomicU64::new(0),
    });
    let storage = storage(SharedTokenStore::new(MemoryTokenStore::new()), slow.clone());
    let key = TokenKey::new("acme", "alice", "github");
    rt.block_on(storage.store(
        &key,
        ISS,
        TokenResponse::bearer("at-0").expires_in(Duration::from_secs(3600)).refresh_token("rt"),
    ))
    .unwrap();
    let worst_per_burst_us = std::sync::Mutex::new(Vec::new());
    let mut group = c.benchmark_group("force_refresh_burst");
    group.sample_size(10);
    group.bench_function("1000", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let rejected =
                    rt.block_on(storage.tokens(&key)).unwrap().unwrap().access_token().clone();
                let calls_before = slow.calls.load(Ordering::SeqCst);
                let start = SystemClock::instant();
                let waits: Vec<Duration> = rt.block_on(async {
                    let tasks: Vec<_> = (0..1000)
                        .map(|_| {
                            let (storage, key, rejected) =
                                (storage.clone(), key.clone(), rejected.clone());
                            tokio::spawn(async move {
                                let set =
                                    storage.force_refresh(&key, ISS, &rejected).await.unwrap();
                                assert_ne!(set.access_token(), &rejected);
                                // From the burst's start: a caller first polled late waited
                                // from the start all the same.
                                SystemClock::instant().duration_since(start)
                            })
                        })
                        .collect();
                    let mut waits = Vec::with_capacity(1000);
                    for t in tasks {
                        waits.push(t.await.unwrap());
                    }
                    waits
                });
                total += SystemClock::instant().duration_since(start);
                assert_eq!(
                    slow.calls.load(Ordering::SeqCst) - calls_before,
                    1,
                    "one refresher call per burst"
                );
                let took = Duration::from_micros(slow.last_took_us.load(Ordering::SeqCst));
                let worst = waits.iter().max().unwrap().saturating_sub(took);
                worst_per_burst_us.lock().unwrap().push(worst.as_micros() as u64);
            }
            total
        });
    });
    group.finish();
    let mut worst = worst_per_burst_us.into_inner().unwrap();
    worst.sort_unstable();
    let at = |q: f64| worst[((worst.len() - 1) as f64 * q) as usize];
    let within = worst.iter().filter(|us| **us <= 5_000).count();
    eprintln!(
        "force_refresh_burst/1000: {} bursts, one refresher call each; the slowest caller of a burst waited beyond the \
         refresher's own latency: median {} us, p90 {} us, max {} us; {} of {} bursts within 5 ms",
        worst.len(),
        at(0.5),
        at(0.9),
        at(1.0),
        within,
        worst.len()
    );
}

criterion_group!(benches, hit_path, reads_and_writes, burst);
criterion_main!(benches);
