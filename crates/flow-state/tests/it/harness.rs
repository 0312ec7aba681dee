//! One place that builds managers, so API churn touches one function.

use std::time::Duration;

use flow_state::{
    FlowKey, FlowManager, FlowTypeConfig, ManualClock, MemoryStore, SharedStore, SledStore,
};

/// A manager over a store, with the manual clock both read.
pub(crate) struct Harness {
    pub(crate) flows: FlowManager,
    pub(crate) clock: ManualClock,
    pub(crate) store: SharedStore,
    // Keeps a sled directory alive for the harness's lifetime.
    pub(crate) _dir: Option<tempfile::TempDir>,
}

/// Which backend a test runs on.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Backend {
    Memory,
    Sled,
}

pub(crate) const BACKENDS: [Backend; 2] = [Backend::Memory, Backend::Sled];

/// `kept`: interactive flows that keep failures (wait 10 s, ttl 60 s).
/// `cache`: run() results reused (ttl 60 s, handler deadline 5 s).
/// anything else: the defaults below (ttl 60 s, waits 10 s, no reuse of failures).
pub(crate) fn harness(backend: Backend) -> Harness {
    let clock = ManualClock::default();
    let (store, dir) = match backend {
        Backend::Memory => (SharedStore::new(MemoryStore::with_clock(clock.shared())), None),
        Backend::Sled => {
            let dir = tempfile::tempdir().unwrap();
            let store = SledStore::builder(dir.path()).clock(clock.shared()).open().unwrap();
            (SharedStore::new(store), Some(dir))
        }
    };
    let flows = manager(&store, &clock);
    Harness { flows, clock, store, _dir: dir }
}

pub(crate) fn manager(store: &SharedStore, clock: &ManualClock) -> FlowManager {
    let secs = Duration::from_secs;
    FlowManager::builder(store.clone())
        .clock(clock.shared())
        .defaults(FlowTypeConfig::new(secs(60)).wait_timeout(secs(10)))
        .flow_type("kept", FlowTypeConfig::new(secs(60)).wait_timeout(secs(10)).keep_failures(true))
        .flow_type(
            "cache",
            FlowTypeConfig::new(secs(60)).handler_timeout(secs(5)).stale_after(secs(5)),
        )
        .flow_type(
            "fresh",
            FlowTypeConfig::new(secs(60))
                .handler_timeout(secs(5))
                .stale_after(secs(5))
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
    tokio::time::sleep(Duration::from_millis(5)).await;
}

/// Awaits `fut`, failing the test instead of hanging if it never finishes (a lost wake-up).
pub(crate) async fn within<T>(fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), fut).await.expect("no answer: a waiter hung")
}
