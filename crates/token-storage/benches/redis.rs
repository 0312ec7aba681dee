//! Redis figures for `BENCHMARKS.md` (section "Redis"):
//!
//! - commands per read through Redis, counted with `INFO commandstats` before and after;
//! - read throughput (50 concurrent callers) beside `redis-benchmark` running the command our
//!   read path sends (`HGETALL` of the stored record, one command per request, no pipelining,
//!   50 connections) on the same key of the same server in the same run;
//! - wake-up latency across processes: a flow completed in this process wakes a waiter in a
//!   child process, which completes a reply flow that wakes this one (ping-pong);
//! - criterion timings of a read through Redis and of a fresh `get_valid` hit.
//!
//! `cargo bench -p token-storage --features redis --bench redis`. Needs `redis-server` and
//! `redis-benchmark` on `PATH` (`MCP_TEST_SKIP_REDIS=1` skips it on purpose). Under
//! `cargo test --benches` (`cargo xtask benches`) every part runs once, small, without timing.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use criterion::Criterion;
use flow_state::testkit::RedisServer;
use flow_state::{FlowKey, FlowManager, RedisStore, SharedStore};
use mcp_clock::SystemClock;
use token_storage::{
    EncryptionKey, Keyring, RedisTokenStore, RefreshError, RefreshRequest, Refresher,
    SharedTokenStore, TokenKey, TokenResponse, TokenStorage, TokenStore,
};

const CHILD: &str = "TOKEN_STORAGE_REDIS_BENCH_CHILD";
const CHILD_ROUNDS: &str = "TOKEN_STORAGE_REDIS_BENCH_ROUNDS";

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

#[derive(Debug)]
struct NoRefresh;
#[async_trait::async_trait]
impl Refresher for NoRefresh {
    async fn refresh(
        &self,
        _: &TokenKey,
        _: &RefreshRequest,
    ) -> Result<TokenResponse, RefreshError> {
        panic!("the benchmark never refreshes")
    }
}

fn flow(name: &str, i: usize) -> FlowKey {
    FlowKey::new("bench", format!("{name}-{i}")).unwrap()
}

async fn flows(url: &str) -> FlowManager {
    let store = RedisStore::builder(url).prefix("bench-flows").connect().await.unwrap();
    FlowManager::builder(SharedStore::new(store)).build().unwrap()
}

/// The child: wait for each ping, answer with a pong.
async fn child(url: String, rounds: usize) {
    let flows = flows(&url).await;
    println!("READY");
    for i in 0..rounds {
        flows.wait::<u64>(&flow("ping", i)).await.unwrap();
        flows.complete(&flow("pong", i), &0u64).await.unwrap();
    }
}

/// Every command count in `INFO commandstats`, except INFO itself.
async fn commands(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(conn).await.unwrap();
    info.lines()
        .filter(|l| l.starts_with("cmdstat_") && !l.starts_with("cmdstat_info:"))
        .filter_map(|l| l.split("calls=").nth(1)?.split(',').next()?.parse::<u64>().ok())
        .sum()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn main() {
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    if let Ok(url) = std::env::var(CHILD) {
        let rounds = std::env::var(CHILD_ROUNDS).unwrap().parse().unwrap();
        rt.block_on(child(url, rounds));
        return;
    }
    let rounds = size(500, 10);
    let Some(server) = RedisServer::start() else { return };
    let url = server.url();
    let key = TokenKey::new("acme", "alice", "github");
    let (storage, store) = rt.block_on(async {
        let store = RedisTokenStore::builder(&url).prefix("bench").connect().await.unwrap();
        let keys = Keyring::new("k1", EncryptionKey::from_bytes([7; 32])).unwrap();
        let storage = TokenStorage::builder(
            SharedTokenStore::new(store.clone()),
            Arc::new(keys),
            Arc::new(NoRefresh),
        )
        .build();
        let response =
            TokenResponse::bearer("at").expires_in(Duration::from_secs(86_400)).refresh_token("rt");
        storage.store(&key, "https://as.example", response).await.unwrap();
        (storage, store)
    });

    // 1. Commands per read.
    rt.block_on(async {
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut raw = client.get_multiplexed_async_connection().await.unwrap();
        let n = size(1000, 10) as u64;
        let before = commands(&mut raw).await;
        for _ in 0..n {
            storage.tokens(&key).await.unwrap().unwrap();
        }
        let reads = commands(&mut raw).await - before;
        let before = commands(&mut raw).await;
        for _ in 0..n {
            storage.get_valid(&key, "https://as.example").await.unwrap();
        }
        let hits = commands(&mut raw).await - before;
        println!(
            "commands per read through Redis (TokenStorage::tokens): {:.2} ({reads} for {n})",
            reads as f64 / n as f64
        );
        println!(
            "commands per fresh get_valid hit: {:.2} ({hits} for {n}; served from the in-memory view)",
            hits as f64 / n as f64
        );
    });

    // 2. Throughput beside redis-benchmark running our read's command (HGETALL of the stored
    // record), 50 connections / callers each, one command per request.
    let total = size(100_000, 500);
    let record = rt.block_on(store.keys_with_prefix("")).unwrap().pop().expect("the stored record");
    // The record's Redis key: the one hash under the bench prefix (its layout is the store's).
    let redis_key: String = rt.block_on(async {
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut raw = client.get_multiplexed_async_connection().await.unwrap();
        let mut hashes = Vec::new();
        let keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut raw).await.unwrap();
        for k in keys {
            let kind: String = redis::cmd("TYPE").arg(&k).query_async(&mut raw).await.unwrap();
            if kind == "hash" {
                hashes.push(k);
            }
        }
        assert_eq!(hashes.len(), 1, "one stored record: {hashes:?}");
        hashes.pop().unwrap()
    });
    let ours = rt.block_on(async {
        let started = SystemClock::instant();
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (store, record) = (store.clone(), record.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..total / 50 {
                    store.get(&record).await.unwrap().expect("present");
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let took = SystemClock::instant() - started;
        total as f64 / took.as_secs_f64()
    });
    let storage_ops = rt.block_on(async {
        let started = SystemClock::instant();
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (storage, key) = (storage.clone(), key.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..total / 50 {
                    storage.tokens(&key).await.unwrap().unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let took = SystemClock::instant() - started;
        total as f64 / took.as_secs_f64()
    });
    let port = server.addr().port().to_string();
    let out = Command::new("redis-benchmark")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-n",
            &total.to_string(),
            "-c",
            "50",
            "-P",
            "1",
            "-q",
            "HGETALL",
            &redis_key,
        ])
        .output()
        .expect("redis-benchmark");
    let text = String::from_utf8_lossy(&out.stdout);
    let theirs: f64 = text
        .split(['\r', '\n'])
        .filter_map(|l| l.trim().strip_prefix("HGETALL "))
        .filter_map(|l| l.split(": ").nth(1)?.split_whitespace().next()?.parse().ok())
        .next_back()
        .unwrap_or_else(|| panic!("no rate in redis-benchmark's output: {text}"));
    println!("redis-benchmark -n {total} -c 50 -P 1 HGETALL <the record>: {theirs:.0} requests/s");
    println!(
        "RedisTokenStore::get, 50 concurrent callers: {ours:.0} reads/s ({:.2}x redis-benchmark)",
        ours / theirs
    );
    println!(
        "TokenStorage::tokens (read through Redis, version check), 50 callers: {storage_ops:.0} reads/s ({:.2}x)",
        storage_ops / theirs
    );

    // 3. Wake-up latency across processes (ping-pong).
    rt.block_on(async {
        let flows = flows(&url).await;
        for i in 0..rounds {
            flows.init(&flow("ping", i), serde_json::json!({})).await.unwrap();
            flows.init(&flow("pong", i), serde_json::json!({})).await.unwrap();
        }
        let mut child = Command::new(std::env::current_exe().unwrap())
            .env(CHILD, &url)
            .env(CHILD_ROUNDS, rounds.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut ready = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut ready).unwrap();
        assert_eq!(ready.trim(), "READY");
        let mut rtts = Vec::with_capacity(rounds);
        for i in 0..rounds {
            let started = SystemClock::instant();
            flows.complete(&flow("ping", i), &0u64).await.unwrap();
            mcp_clock::within(&mcp_clock::SystemClock, Duration::from_secs(5), flows.wait::<u64>(&flow("pong", i)))
                .await
                .expect("the child answers")
                .unwrap();
            rtts.push(SystemClock::instant() - started);
        }
        child.wait().unwrap();
        rtts.sort();
        println!(
            "cross-process ping-pong over {rounds} rounds (complete -> waiter in the other process -> complete -> waiter here): \
             round trip p50 {:?}, p99 {:?}, max {:?}; one wake-up (half) p50 {:?}, p99 {:?}",
            percentile(&rtts, 0.5),
            percentile(&rtts, 0.99),
            rtts[rtts.len() - 1],
            percentile(&rtts, 0.5) / 2,
            percentile(&rtts, 0.99) / 2,
        );
    });

    // 4. Criterion timings.
    let mut c = Criterion::default().configure_from_args();
    c.bench_function("redis/tokens_read", |b| b.to_async(&rt).iter(|| storage.tokens(&key)));
    c.bench_function("redis/get_valid_hit", |b| {
        b.to_async(&rt).iter(|| storage.get_valid(&key, "https://as.example"))
    });
    c.final_summary();
}
