//! sled on disk: restart, takeover of a dead owner's PENDING flow, corrupt records.

use std::time::Duration;

use flow_state::{Error, FlowStatus, ManualClock, SharedStore, SledStore};
use serde_json::json;

use crate::harness::{key, manager};

/// Opens the database, waiting briefly for the previous handle's background flusher to release
/// sled's file lock.
fn open(path: &std::path::Path, clock: &ManualClock) -> SharedStore {
    for _ in 0..200 {
        match SledStore::builder(path).clock(clock.shared()).open() {
            Ok(store) => return SharedStore::new(store),
            Err(e) if e.kind() == flow_state::store::StoreErrorKind::Unavailable => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    panic!("sled's lock was never released")
}

/// Opens the raw sled database (as another program would), waiting for the lock likewise.
fn open_raw(path: &std::path::Path) -> sled::Db {
    for _ in 0..200 {
        if let Ok(db) = sled::open(path) {
            return db;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("sled's lock was never released")
}

/// Flows survive a restart; a PENDING flow whose owner died becomes stale and is taken over.
#[tokio::test]
async fn flows_survive_a_restart_and_a_dead_owner_is_taken_over() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::default();
    {
        let store = open(dir.path(), &clock);
        let flows = manager(&store, &clock);
        flows.init(&key("test-type", "done"), json!({"a": 1})).await.unwrap();
        flows.complete(&key("test-type", "done"), &"kept").await.unwrap();
        // A run whose process died mid-handler left exactly this on disk: a PENDING record.
        flows.init(&key("cache", "orphan"), json!(null)).await.unwrap();
        drop(flows);
        drop(store);
    }
    let store = open(dir.path(), &clock);
    let flows = manager(&store, &clock);
    let done = flows.get::<String>(&key("test-type", "done")).await.unwrap().unwrap();
    assert_eq!((done.status, done.result.as_deref()), (FlowStatus::Completed, Some("kept")));
    assert_eq!(done.metadata, json!({"a": 1}));
    let orphan = flows.get::<u32>(&key("cache", "orphan")).await.unwrap().unwrap();
    assert_eq!(orphan.status, FlowStatus::Pending);
    clock.advance(Duration::from_secs(6)); // the stale window of "cache"
    let got: u32 = flows.run(&key("cache", "orphan"), || async { Ok(12) }).await.unwrap();
    assert_eq!(got, 12, "the stale PENDING was taken over");
}

/// Bad input: a corrupt record gives a typed error naming its key, is left as it was, and other
/// keys stay readable.
#[tokio::test]
async fn a_corrupt_record_is_a_typed_error_and_others_stay_readable() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::default();
    let bad = key("test-type", "bad");
    let good = key("test-type", "good");
    {
        let store = open(dir.path(), &clock);
        let flows = manager(&store, &clock);
        flows.init(&good, json!({})).await.unwrap();
    }
    let garbage: &[&[u8]] = &[b"\x01\x02", b"0123456789abcdef{not json"];
    for raw in garbage {
        {
            let db = open_raw(dir.path());
            let tree = db.open_tree("flows").unwrap();
            tree.insert(bad.as_str(), *raw).unwrap();
            db.flush().unwrap();
        }
        let store = open(dir.path(), &clock);
        let flows = manager(&store, &clock);
        for err in [
            flows.get::<u32>(&bad).await.unwrap_err(),
            flows.complete(&bad, &1u32).await.unwrap_err(),
            flows.init(&bad, json!({})).await.unwrap_err(),
        ] {
            match &err {
                Error::Corrupt { key, .. } => assert_eq!(key, &bad),
                other => panic!("expected Corrupt, got {other:?}"),
            }
            assert!(err.to_string().contains(bad.as_str()), "{err}");
        }
        assert_eq!(flows.get::<u32>(&good).await.unwrap().unwrap().status, FlowStatus::Pending);
        drop(flows);
        drop(store);
        let db = open_raw(dir.path());
        let left = db.open_tree("flows").unwrap().get(bad.as_str()).unwrap().unwrap();
        assert_eq!(&*left, *raw, "the corrupt record is left as it was");
    }
}
