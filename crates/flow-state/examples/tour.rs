//! A tour of flow-state: `cargo run -p flow-state --example tour --features sled`.
//!
//! Prints a short timeline and exits non-zero if anything behaved unexpectedly.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use flow_state::{
    FlowKey, FlowManager, FlowStatus, FlowTypeConfig, SharedStore, SledStore, SystemClock,
};
use serde_json::json;

fn step(n: u32, what: &str) {
    println!("[{n}] {what}");
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let store = SharedStore::new(SledStore::open(dir.path())?);
    let flows = FlowManager::builder(store.clone())
        .flow_type(
            "mcp_oauth",
            FlowTypeConfig::new(Duration::from_secs(900))
                .wait_timeout(Duration::from_secs(600))
                .keep_failures(true),
        )
        .flow_type("mcp_get_tokens", FlowTypeConfig::new(Duration::from_secs(60)))
        .build()?;
    let start = SystemClock::instant();

    step(1, "100 concurrent look-ups of the same tokens: one handler run, one shared result");
    let key = FlowKey::new("mcp_get_tokens", "alice:github")?.with_tenant("acme")?;
    let runs = Arc::new(AtomicUsize::new(0));
    let callers: Vec<_> = (0..100)
        .map(|_| {
            let (flows, key, runs) = (flows.clone(), key.clone(), runs.clone());
            tokio::spawn(async move {
                flows
                    .run(&key, move || async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(20))
                            .await;
                        Ok("access-token-v1".to_string())
                    })
                    .await
            })
        })
        .collect();
    for c in callers {
        assert_eq!(c.await??, "access-token-v1");
    }
    println!("    handler runs: {}", runs.load(Ordering::SeqCst));
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    step(2, "the same user id under another tenant gets its own flow");
    let other = FlowKey::new("mcp_get_tokens", "alice:github")?.with_tenant("globex")?;
    let theirs: String = flows.run(&other, || async { Ok("globex-token".to_string()) }).await?;
    assert_eq!(theirs, "globex-token");
    println!("    acme and globex keys: {key} / {other}");

    step(3, "an interactive flow: PENDING until the callback completes it; waiters wake at once");
    let oauth = FlowKey::new("mcp_oauth", "alice:github")?.with_tenant("acme")?;
    flows.init(&oauth, json!({ "state": "csrf-state-id" })).await?;
    let waiter = tokio::spawn({
        let (flows, oauth) = (flows.clone(), oauth.clone());
        async move { flows.wait::<String>(&oauth).await }
    });
    mcp_clock::Clock::sleep(&mcp_clock::SystemClock, Duration::from_millis(10)).await;
    let woke_from = SystemClock::instant();
    flows.complete(&oauth, &"tokens-from-callback").await?;
    let got = waiter.await??;
    println!(
        "    waiter got {got:?} {:?} after the callback",
        SystemClock::instant().duration_since(woke_from)
    );

    step(4, "a late failure cannot clobber the success");
    let late = flows.fail(&oauth, flow_state::FlowError::new("late", "too late")).await;
    println!(
        "    fail() -> {}",
        late.as_ref().map(|_| "ok".to_string()).unwrap_or_else(|e| e.to_string())
    );
    assert!(late.is_err());

    step(5, "a restart: the database is reopened and the completed flow is still there");
    drop(flows);
    drop(store);
    let store = SharedStore::new(SledStore::open(dir.path())?);
    let flows = FlowManager::builder(store).build()?;
    let state = flows.get::<String>(&oauth).await?.ok_or("flow lost across the restart")?;
    assert_eq!(state.status, FlowStatus::Completed);
    println!("    {} {:?}", state.status, state.result);

    println!(
        "tour finished in {:?}: every step behaved",
        SystemClock::instant().duration_since(start)
    );
    Ok(())
}
