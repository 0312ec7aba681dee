//! One place that builds managers, so API churn touches one function.

use std::time::Duration;

use flow_state::testkit::RedisServer;
use flow_state::{
    FlowKey, FlowManager, FlowStatus, FlowTypeConfig, ManualClock, MemoryStore, RedisStore,
    SharedStore, SledStore,
};

/// A manager over a store, with the manual clock both read.
pub(crate) struct Harness {
    pub(crate) flows: FlowManager,
    pub(crate) clock: ManualClock,
    pub(crate) store: SharedStore,
    // Keeps a sled directory or a redis-server alive for the harness's lifetime.
    pub(crate) _dir: Option<tempfile::TempDir>,
    pub(crate) _redis: Option<RedisServer>,
}

/// Which backend a test runs on.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Backend {
    Memory,
    Sled,
    Redis,
}

/// Every backend; Redis runs when redis-server is on PATH (and must be, under CI).
pub(crate) const BACKENDS: [Backend; 3] = [Backend::Memory, Backend::Sled, Backend::Redis];

/// The backends whose records expire on the injected clock, so a test can expire one by
/// advancing the manual clock. Redis decides expiry on its own clock (`TIME`): its expiry tests
/// wait real (short) time instead (`redis.rs`).
pub(crate) const CLOCK_BACKENDS: [Backend; 2] = [Backend::Memory, Backend::Sled];

/// `kept`: interactive flows that keep failures (wait 10 s, ttl 60 s).
/// `cache`: run() results reused (ttl 60 s, handler deadline 5 s).
/// anything else: the defaults below (ttl 60 s, waits 10 s, no reuse of failures).
///
/// Returns `None` for Redis only when the Redis tests are skipped on purpose
/// (`MCP_TEST_SKIP_REDIS=1`); without redis-server the Redis leg fails, naming the fix.
pub(crate) async fn harness(backend: Backend) -> Option<Harness> {
    let clock = ManualClock::default();
    let (store, dir, redis) = match backend {
        Backend::Memory => (SharedStore::new(MemoryStore::with_clock(clock.shared())), None, None),
        Backend::Sled => {
            let dir = tempfile::tempdir().unwrap();
            let store = SledStore::builder(dir.path()).clock(clock.shared()).open().unwrap();
            (SharedStore::new(store), Some(dir), None)
        }
        Backend::Redis => {
            let server = RedisServer::start()?;
            let store =
                RedisStore::builder(server.url()).clock(clock.shared()).connect().await.unwrap();
            (SharedStore::new(store), None, Some(server))
        }
    };
    let flows = manager(&store, &clock);
    Some(Harness { flows, clock, store, _dir: dir, _redis: redis })
}

impl Harness {
    /// Waits until the flow exists with `status` (a spawned task has written it), so a test can
    /// move the clock knowing the flow's creation time is already fixed.
    pub(crate) async fn until(&self, key: &FlowKey, status: FlowStatus) {
        within(async {
            loop {
                if self
                    .flows
                    .get::<serde_json::Value>(key)
                    .await
                    .ok()
                    .flatten()
                    .is_some_and(|s| s.status == status)
                {
                    return;
                }
                mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(1)).await;
            }
        })
        .await
    }
}

pub(crate) fn manager(store: &SharedStore, clock: &ManualClock) -> FlowManager {
    let secs = Duration::from_secs;
    FlowManager::builder(store.clone())
        .clock(clock.shared())
        .defaults(FlowTypeConfig::new(secs(60)).wait_timeout(secs(10)))
        .flow_type("kept", FlowTypeConfig::new(secs(60)).wait_timeout(secs(10)).keep_failures(true))
        .flow_type(
            "cache",
            FlowTypeConfig::new(secs(60)).handler_timeout(secs(5)).stale_after(secs(6)),
        )
        .flow_type(
            "fresh",
            FlowTypeConfig::new(secs(60))
                .handler_timeout(secs(5))
                .stale_after(secs(6))
                .reuse_completed(false),
        )
        .build()
        .unwrap()
}

pub(crate) fn key(flow_type: &str, id: &str) -> FlowKey {
    FlowKey::new(flow_type, id).unwrap()
}

/// Lets spawned tasks run until they block (they wait on the store or the manual clock).
pub(crate) async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(5)).await;
}

/// Awaits `fut`, failing the test instead of hanging if it never finishes (a lost wake-up).
pub(crate) async fn within<T>(fut: impl std::future::Future<Output = T>) -> T {
    mcp_clock::within(&mcp_clock::SystemClock, Duration::from_secs(20), fut)
        .await
        .expect("no answer: a waiter hung")
}
