//! The store conformance suite against memory and sled, and sled across a restart.

use crate::common;

use std::sync::{Arc, Mutex};

use common::*;
use token_storage::testkit::{FakeAuthServer, store_conformance};
use token_storage::{
    ClientRegistration, Error, ManualClock, MemoryTokenStore, Secret, SharedTokenStore,
    SledTokenStore, TokenKey, TokenStorage, TokenStore,
    store::{Swapped, Versioned},
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
        let Swapped::Swapped { version } =
            store.compare_and_swap("k", None, b"a".to_vec()).await.unwrap()
        else {
            panic!()
        };
        assert!(store.delete_if("k", Some(version)).await.unwrap());
        version
    };
    let store = SledTokenStore::open(dir.path()).unwrap();
    let Swapped::Swapped { version } =
        store.compare_and_swap("k", None, b"b".to_vec()).await.unwrap()
    else {
        panic!()
    };
    assert!(version > v1);
    assert!(matches!(
        store.compare_and_swap("k", Some(v1), b"c".to_vec()).await.unwrap(),
        Swapped::Conflict(_)
    ));
}

/// The DPoP key of a (tenant, user, server) is stored sealed next to its tokens: a restart (a
/// new storage over the same sled directory) reads the same key, a second candidate never
/// replaces it, it is listed under its key, and `delete_all` deletes it with the tokens.
#[tokio::test]
async fn the_dpop_key_survives_a_restart_and_goes_with_the_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::default();
    let server = FakeAuthServer::new(clock.shared());
    let (key, other) = (key(), TokenKey::new("acme", "alice", "gitlab"));
    let open = || {
        TokenStorage::builder(
            SledTokenStore::open(dir.path()).unwrap().into(),
            keyring(),
            server.clone(),
        )
        .clock(clock.shared())
        .build()
    };
    {
        let storage = open();
        assert_eq!(storage.dpop_key(&key).await.unwrap(), None);
        let stored = storage.dpop_key_or_insert(&key, Secret::new("pem-one")).await.unwrap();
        assert_eq!(stored.expose(), "pem-one");
        storage.dpop_key_or_insert(&other, Secret::new("pem-other")).await.unwrap();
        storage.store(&key, ISS, server.issue(&key)).await.unwrap();
    }
    let storage = open();
    assert_eq!(storage.dpop_key(&key).await.unwrap().unwrap().expose(), "pem-one");
    let again = storage.dpop_key_or_insert(&key, Secret::new("pem-two")).await.unwrap();
    assert_eq!(again.expose(), "pem-one", "a stored key is never replaced");
    storage.delete_all(&key).await.unwrap();
    assert_eq!(storage.dpop_key(&key).await.unwrap(), None);
    assert_eq!(storage.dpop_key(&other).await.unwrap().unwrap().expose(), "pem-other");
    assert_eq!(storage.list("acme", "alice").await.unwrap(), vec![other]);
}

/// A memory store whose every operation yields first, as a round trip to a real backend
/// does, so concurrent callers interleave between their read and their write.
#[derive(Debug, Default)]
struct RoundTrips(MemoryTokenStore);

#[async_trait::async_trait]
impl TokenStore for RoundTrips {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, Error> {
        tokio::task::yield_now().await;
        self.0.get(key).await
    }
    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<u64>,
        value: Vec<u8>,
    ) -> Result<Swapped, Error> {
        tokio::task::yield_now().await;
        self.0.compare_and_swap(key, expected, value).await
    }
    async fn delete_if(&self, key: &str, expected: Option<u64>) -> Result<bool, Error> {
        self.0.delete_if(key, expected).await
    }
    async fn keys_with_prefix(&self, prefix: &str) -> Result<Vec<String>, Error> {
        self.0.keys_with_prefix(prefix).await
    }
}

/// The race: concurrent first uses each find no key and each generate one; were the insert
/// not an insert-if-absent, the last writer would replace a key whose tokens are already bound
/// to it, and callers would sign with different keys. 32 tasks over two storages sharing one
/// store (two processes) start together; every one gets the same, first stored, key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_uses_store_one_dpop_key() {
    for _round in 0..20 {
        let store = SharedTokenStore::new(RoundTrips::default());
        let server = FakeAuthServer::new(ManualClock::default().shared());
        let storages: Vec<TokenStorage> = (0..2)
            .map(|_| TokenStorage::builder(store.clone(), keyring(), server.clone()).build())
            .collect();
        let barrier = Arc::new(tokio::sync::Barrier::new(32));
        let tasks: Vec<_> = (0..32)
            .map(|i| {
                let (storage, barrier) = (storages[i % 2].clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    let candidate = Secret::new(format!("pem-{i}"));
                    storage.dpop_key_or_insert(&key(), candidate).await.unwrap()
                })
            })
            .collect();
        let mut got = Vec::new();
        for t in tasks {
            got.push(t.await.unwrap());
        }
        let stored = storages[0].dpop_key(&key()).await.unwrap().unwrap();
        assert!(got.iter().all(|k| *k == stored), "one key for everyone");
    }
}
