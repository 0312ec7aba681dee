//! The store conformance suite against memory and sled, and sled across a restart.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use token_storage::testkit::{FakeAuthServer, store_conformance};
use token_storage::{
    ClientRegistration, ManualClock, MemoryTokenStore, SharedTokenStore, SledTokenStore, Swap,
    TokenStorage, TokenStore,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_conforms() {
    store_conformance(|| SharedTokenStore::new(MemoryTokenStore::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_store_conforms() {
    let dirs = Arc::new(Mutex::new(Vec::new()));
    store_conformance(|| {
        let dir = tempfile::tempdir().unwrap();
        let store = SledTokenStore::open(dir.path()).unwrap();
        dirs.lock().unwrap().push(dir);
        SharedTokenStore::new(store)
    })
    .await;
}

/// Store, drop, reopen, read back; versions keep increasing after the restart (no ABA).
#[tokio::test]
async fn sled_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::default();
    let server = FakeAuthServer::new(clock.shared());
    let key = key();
    let client = ClientRegistration::new("c1", ISS).client_secret("cs");
    let open = || {
        TokenStorage::builder(
            SledTokenStore::open(dir.path()).unwrap().into(),
            keyring(),
            server.clone(),
        )
        .clock(clock.shared())
        .build()
    };
    let (before, version) = {
        let storage = open();
        storage.store_client(&key, &client).await.unwrap();
        let first = storage.store(&key, ISS, server.issue(&key)).await.unwrap();
        let second = storage.force_refresh(&key, ISS, first.access_token()).await.unwrap();
        (second.clone(), second.version())
    };
    let storage = open();
    let after = storage.tokens(&key).await.unwrap().unwrap();
    assert_eq!(*after, *before);
    assert_eq!(storage.client(&key).await.unwrap(), Some(client));
    assert_eq!(storage.list("acme", "alice").await.unwrap(), vec![key.clone()]);
    let third = storage.force_refresh(&key, ISS, after.access_token()).await.unwrap();
    assert!(third.version() > version, "{} then {}", version, third.version());
    assert_eq!(server.reuse_detected(), 0);
}

/// A sled version from before a restart never matches a record written after it.
#[tokio::test]
async fn sled_versions_are_not_reused_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let v1 = {
        let store = SledTokenStore::open(dir.path()).unwrap();
        let Swap::Swapped { version } =
            store.compare_and_swap("k", None, b"a".to_vec()).await.unwrap()
        else {
            panic!()
        };
        assert!(store.delete("k", Some(version)).await.unwrap());
        version
    };
    let store = SledTokenStore::open(dir.path()).unwrap();
    let Swap::Swapped { version } = store.compare_and_swap("k", None, b"b".to_vec()).await.unwrap()
    else {
        panic!()
    };
    assert!(version > v1);
    assert!(matches!(
        store.compare_and_swap("k", Some(v1), b"c".to_vec()).await.unwrap(),
        Swap::Conflict(_)
    ));
}
