//! Waits for tests (feature `test-util`): the one bounded wait on real time, for tests of real
//! servers and processes, and the one wait that only lets other tasks run.
//!
//! A test that drives a [`ManualClock`](crate::ManualClock) waits for spawned tasks with
//! [`settled`] (no time passes); a test of real HTTP servers, real processes or a real Redis
//! waits with [`eventually`] (real time, bounded, said so by the name of the function).

use std::future::Future;
use std::time::Duration;

use crate::{Clock as _, SystemClock};

/// How long [`eventually`] waits before it fails the test.
pub const EVENTUALLY_LIMIT: Duration = Duration::from_secs(10);

const STEP: Duration = Duration::from_millis(5);

/// Wait until `done` holds, checking every 5 ms of real time; panics naming `what` after
/// [`EVENTUALLY_LIMIT`].
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let mut n = 0;
/// mcp_clock::testing::eventually("three checks", || { n += 1; n == 3 }).await;
/// # }
/// ```
pub async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    if !within_real_time(EVENTUALLY_LIMIT, || std::future::ready(done())).await {
        panic!("timed out after {EVENTUALLY_LIMIT:?} waiting for {what}");
    }
}

/// Whether `done` (an async check) held within `limit` of real time, checked every 5 ms.
pub async fn within_real_time<F: Future<Output = bool>>(
    limit: Duration,
    mut done: impl FnMut() -> F,
) -> bool {
    let start = SystemClock::instant();
    loop {
        if done().await {
            return true;
        }
        if SystemClock::instant() - start >= limit {
            return false;
        }
        SystemClock.sleep(STEP).await;
    }
}

/// Let other tasks run (yielding only: no time passes, on any clock) until `done` holds;
/// panics naming `what` after 100,000 yields.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
/// let f = flag.clone();
/// tokio::spawn(async move { f.store(true, std::sync::atomic::Ordering::SeqCst) });
/// mcp_clock::testing::settled("the task ran", || flag.load(std::sync::atomic::Ordering::SeqCst)).await;
/// # }
/// ```
pub async fn settled(what: &str, done: impl Fn() -> bool) {
    for _ in 0..100_000 {
        if done() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("never happened (100,000 yields): {what}");
}
