//! Cancel safety: dropped callers, panicking and hung handlers never wedge a key.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use flow_state::{Error, FlowError, FlowStatus};
use tokio::sync::oneshot;

use crate::harness::{BACKENDS, harness, key, settle, within};

/// The race: the only caller (the one that started the handler) is cancelled mid-run. The
/// handler must still finish detached and record its result, and the next caller must get that
/// result without running the handler again.
#[tokio::test]
async fn dropping_every_caller_lets_the_handler_finish_and_record() {
    for backend in BACKENDS {
        let Some(h) = harness(backend).await else { continue };
        let k = key("cache", "x");
        let runs = Arc::new(AtomicUsize::new(0));
        let (release, released) = oneshot::channel::<()>();
        let caller = tokio::spawn({
            let (flows, k, runs) = (h.flows.clone(), k.clone(), runs.clone());
            async move {
                flows
                    .run(&k, move || async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        released.await.ok();
                        Ok(41u32)
                    })
                    .await
            }
        });
        h.until(&k, FlowStatus::Pending).await;
        caller.abort();
        assert!(caller.await.unwrap_err().is_cancelled());
        assert_eq!(h.flows.get::<u32>(&k).await.unwrap().unwrap().status, FlowStatus::Pending);
        release.send(()).unwrap();
        settle().await;
        let state = within(async {
            loop {
                let s = h.flows.get::<u32>(&k).await.unwrap().unwrap();
                if s.status != FlowStatus::Pending {
                    return s;
                }
                tokio::task::yield_now().await;
            }
        })
        .await;
        assert_eq!(state.result, Some(41), "{backend:?}");
        let again: u32 = h.flows.run(&k, || async { Ok(0) }).await.unwrap();
        assert_eq!((again, runs.load(Ordering::SeqCst)), (41, 1), "{backend:?}");
    }
}

/// A panicking handler records FAILED (kind panicked) and wakes every waiter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_fails_the_flow_and_wakes_waiters() {
    for backend in BACKENDS {
        let Some(h) = harness(backend).await else { continue };
        let k = key("kept", "x");
        let callers: Vec<_> = (0..8)
            .map(|_| {
                let (flows, k) = (h.flows.clone(), k.clone());
                tokio::spawn(async move {
                    flows
                        .run::<u32, _, _>(&k, || async {
                            mcp_clock::Clock::sleep(
                                &mcp_clock::SystemClock,
                                Duration::from_millis(10),
                            )
                            .await;
                            panic!("handler bug")
                        })
                        .await
                })
            })
            .collect();
        for c in callers {
            match within(c).await.unwrap() {
                Err(Error::Failed { error, .. }) => assert_eq!(error.kind, FlowError::PANICKED),
                other => panic!("{backend:?}: {other:?}"),
            }
        }
        let state = h.flows.get::<u32>(&k).await.unwrap().unwrap();
        assert_eq!(state.status, FlowStatus::Failed);
    }
}

/// A handler that hangs past its deadline is dropped and its flow recorded FAILED (timeout);
/// the key is free for the next run.
#[tokio::test]
async fn a_hung_handler_times_out_and_frees_the_key() {
    for backend in BACKENDS {
        let Some(h) = harness(backend).await else { continue };
        let k = key("cache", "x");
        let caller = tokio::spawn({
            let (flows, k) = (h.flows.clone(), k.clone());
            async move { flows.run::<u32, _, _>(&k, std::future::pending).await }
        });
        h.until(&k, FlowStatus::Pending).await;
        h.clock.advance(Duration::from_secs(5)); // the handler deadline of "cache"
        match within(caller).await.unwrap() {
            Err(Error::Failed { error, .. }) => {
                assert_eq!(error.kind, FlowError::TIMEOUT, "{backend:?}")
            }
            other => panic!("{backend:?}: {other:?}"),
        }
        assert_eq!(h.flows.run(&k, || async { Ok(9u32) }).await.unwrap(), 9, "{backend:?}");
    }
}

/// A waiter that is dropped changes nothing: the flow stays PENDING for the others.
#[tokio::test]
async fn a_dropped_waiter_leaves_the_flow_alone() {
    for backend in BACKENDS {
        let Some(h) = harness(backend).await else { continue };
        let k = key("test-type", "x");
        h.flows.init(&k, serde_json::json!({})).await.unwrap();
        let dropped = tokio::spawn({
            let (flows, k) = (h.flows.clone(), k.clone());
            async move { flows.wait::<u32>(&k).await }
        });
        let kept = tokio::spawn({
            let (flows, k) = (h.flows.clone(), k.clone());
            async move { flows.wait::<u32>(&k).await }
        });
        settle().await;
        dropped.abort();
        settle().await;
        assert_eq!(h.flows.get::<u32>(&k).await.unwrap().unwrap().status, FlowStatus::Pending);
        h.flows.complete(&k, &3u32).await.unwrap();
        assert_eq!(within(kept).await.unwrap().unwrap(), 3, "{backend:?}");
    }
}
