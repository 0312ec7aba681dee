//! The store conformance suite on the memory and sled backends.

use flow_state::{MemoryStore, SharedStore, SledStore, testkit};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_conforms() {
    testkit::store_conformance(|clock| {
        let store = SharedStore::new(MemoryStore::with_clock(clock.shared()));
        async move { store }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_store_conforms() {
    let root = tempfile::tempdir().unwrap();
    let counter = std::sync::atomic::AtomicUsize::new(0);
    testkit::store_conformance(|clock| {
        let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let store = SledStore::builder(root.path().join(n.to_string()))
            .clock(clock.shared())
            .open()
            .unwrap();
        async move { SharedStore::new(store) }
    })
    .await;
}
