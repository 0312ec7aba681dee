//! [`FaultPlan`]: the faults a test arms on a store wrapper, shared by flow-state's
//! [`FaultyStore`](super::FaultyStore) and token-storage's `FaultyTokenStore`, so that both fail
//! the same way (and a fix to the schedule lands in both).

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use mcp_clock::{Clock, SharedClock};

/// Armed faults, each spent by the next operation it applies to:
///
/// - [`FaultPlan::fail_next_write`]: the next write is not applied and fails (the connection
///   dropped before the command arrived);
/// - [`FaultPlan::lose_next_write_reply`]: the next write is applied, then fails (the reply was
///   lost);
/// - [`FaultPlan::fail_next_read`]: the next read fails;
/// - [`FaultPlan::set_delay`]: every operation takes this long on the clock;
/// - [`FaultPlan::set_reply_delay`]: every operation is applied at once and answered this long
///   after (a slow way back: what it read may be stale by the time the caller sees it).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use flow_state::testkit::{FaultPlan, WriteFault};
/// use flow_state::SharedClock;
///
/// let plan = FaultPlan::new(SharedClock::system());
/// plan.lose_next_write_reply();
/// assert_eq!(plan.next_write().await, WriteFault::LoseReply);
/// assert_eq!(plan.next_write().await, WriteFault::None);
/// assert_eq!(plan.injected(), 1);
/// # }
/// ```
#[derive(Debug)]
pub struct FaultPlan {
    clock: SharedClock,
    faults: Mutex<Faults>,
}

#[derive(Debug, Default)]
struct Faults {
    fail_writes: u32,
    lose_replies: u32,
    fail_reads: u32,
    delay: Duration,
    reply_delay: Duration,
    injected: u64,
}

/// What the next write does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteFault {
    /// Fail without applying it.
    Fail,
    /// Apply it, then fail (the reply is lost).
    LoseReply,
    /// Apply it and answer.
    None,
}

impl FaultPlan {
    /// No fault armed; delays run on `clock`.
    pub fn new(clock: SharedClock) -> Self {
        FaultPlan { clock, faults: Mutex::default() }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Faults) -> T) -> T {
        f(&mut self.faults.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Fail the next write without applying it.
    pub fn fail_next_write(&self) {
        self.with(|f| f.fail_writes += 1);
    }

    /// Apply the next write, then report a failure.
    pub fn lose_next_write_reply(&self) {
        self.with(|f| f.lose_replies += 1);
    }

    /// Fail the next read.
    pub fn fail_next_read(&self) {
        self.with(|f| f.fail_reads += 1);
    }

    /// Make every operation take `delay` on the clock.
    pub fn set_delay(&self, delay: Duration) {
        self.with(|f| f.delay = delay);
    }

    /// Answer every operation `delay` after it was applied (on the clock).
    pub fn set_reply_delay(&self, delay: Duration) {
        self.with(|f| f.reply_delay = delay);
    }

    /// Wait the reply delay (a wrapper calls this once an operation was applied).
    pub async fn reply_delay(&self) {
        let delay = self.with(|f| f.reply_delay);
        if !delay.is_zero() {
            self.clock.sleep(delay).await;
        }
    }

    /// Drop every armed fault (and the delays).
    pub fn disarm(&self) {
        self.with(|f| {
            let injected = f.injected;
            *f = Faults { injected, ..Faults::default() };
        });
    }

    /// How many faults were injected so far.
    pub fn injected(&self) -> u64 {
        self.with(|f| f.injected)
    }

    async fn delay(&self) {
        let delay = self.with(|f| f.delay);
        if !delay.is_zero() {
            self.clock.sleep(delay).await;
        }
    }

    /// Wait the delay, then whether the next read fails (spending the fault).
    pub async fn next_read_fails(&self) -> bool {
        self.delay().await;
        self.with(|f| {
            let fail = f.fail_reads > 0;
            if fail {
                f.fail_reads -= 1;
                f.injected += 1;
            }
            fail
        })
    }

    /// Wait the delay, then what the next write does (spending the fault).
    pub async fn next_write(&self) -> WriteFault {
        self.delay().await;
        self.with(|f| {
            if f.fail_writes > 0 {
                f.fail_writes -= 1;
                f.injected += 1;
                WriteFault::Fail
            } else if f.lose_replies > 0 {
                f.lose_replies -= 1;
                f.injected += 1;
                WriteFault::LoseReply
            } else {
                WriteFault::None
            }
        })
    }
}
