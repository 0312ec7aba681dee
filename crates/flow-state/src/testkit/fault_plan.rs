//! [`FaultPlan`]: the faults a test arms on a store wrapper, shared by flow-state's
//! [`FaultyStore`](super::FaultyStore) and token-storage's `FaultyTokenStore`, so that both fail
//! the same way (and a fix to the schedule lands in both).

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use mcp_clock::{Clock, SharedClock};
use tokio::sync::{Semaphore, watch};

/// Armed faults, each spent by the next operation it applies to:
///
/// - [`FaultPlan::fail_next_write`]: the next write is not applied and fails (the connection
///   dropped before the command arrived);
/// - [`FaultPlan::lose_next_write_reply`]: the next write is applied, then fails (the reply was
///   lost);
/// - [`FaultPlan::fail_next_read`]: the next read fails;
/// - [`FaultPlan::set_delay`]: every operation takes this long on the clock;
/// - [`FaultPlan::set_reply_delay`]: every operation is applied at once and answered this long
///   after (a slow way back: what it read may be stale by the time the caller sees it);
/// - [`FaultPlan::hold_next_delete`]: the next delete of a key waits at the store until
///   [`FaultPlan::release_delete`] (the window between a caller's read and its delete, held
///   open while the test acts in it);
/// - [`FaultPlan::count_reads_of`]: count the reads of some keys ([`FaultPlan::reads_counted`]),
///   so a test knows a caller got as far as reading them.
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
    /// How many deletes were held so far.
    held: watch::Sender<u64>,
    /// One permit per released delete.
    release: Semaphore,
}

#[derive(Debug, Default)]
struct Faults {
    fail_writes: u32,
    lose_replies: u32,
    fail_reads: u32,
    delay: Duration,
    reply_delay: Duration,
    /// The next delete of a key containing this is held.
    hold_delete: Option<String>,
    /// Reads of keys containing this are counted.
    count_reads: Option<String>,
    reads_counted: u64,
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
        FaultPlan {
            clock,
            faults: Mutex::default(),
            held: watch::Sender::new(0),
            release: Semaphore::new(0),
        }
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

    /// Hold the next delete of a key that contains `key_part` (`""`: any key) at the store
    /// until [`FaultPlan::release_delete`]; it is applied then (subject to the other faults).
    /// [`FaultPlan::until_deletes_held`] waits for it to arrive.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use flow_state::{MemoryStore, SharedClock, SharedStore, testkit::FaultyStore};
    /// use std::time::Duration;
    ///
    /// let faulty = FaultyStore::new(SharedStore::new(MemoryStore::new()), SharedClock::system());
    /// let store = SharedStore::from_arc(faulty.clone());
    /// store.insert_if_absent("flow:k", b"v".to_vec(), Duration::from_secs(9)).await.unwrap();
    /// faulty.hold_next_delete("flow:");
    /// let delete = tokio::spawn({
    ///     let store = store.clone();
    ///     async move { store.delete_if("flow:k", None).await }
    /// });
    /// faulty.until_deletes_held(1).await;
    /// assert!(store.get("flow:k").await.unwrap().is_some(), "held, not applied yet");
    /// faulty.release_delete();
    /// assert!(delete.await.unwrap().unwrap());
    /// # }
    /// ```
    pub fn hold_next_delete(&self, key_part: impl Into<String>) {
        let key_part = key_part.into();
        self.with(|f| f.hold_delete = Some(key_part));
    }

    /// Let one held delete go on.
    pub fn release_delete(&self) {
        self.release.add_permits(1);
    }

    /// How many deletes were held so far (released or not).
    pub fn deletes_held(&self) -> u64 {
        *self.held.borrow()
    }

    /// Wait until `n` deletes were held in all (no clock: it waits for the caller whose delete
    /// is held to get there).
    pub async fn until_deletes_held(&self, n: u64) {
        let mut held = self.held.subscribe();
        let _ = held.wait_for(|held| *held >= n).await;
    }

    /// Count, from now on, the reads of keys that contain `key_part`.
    pub fn count_reads_of(&self, key_part: impl Into<String>) {
        let key_part = key_part.into();
        self.with(|f| f.count_reads = Some(key_part));
    }

    /// How many reads [`FaultPlan::count_reads_of`] counted.
    pub fn reads_counted(&self) -> u64 {
        self.with(|f| f.reads_counted)
    }

    /// A wrapper calls this before it applies a delete of `key`: it waits here while the delete
    /// is held.
    pub async fn before_delete(&self, key: &str) {
        let hold = self.with(|f| {
            let hold = f.hold_delete.as_deref().is_some_and(|part| key.contains(part));
            if hold {
                f.hold_delete = None;
                f.injected += 1;
            }
            hold
        });
        if hold {
            self.held.send_modify(|held| *held += 1);
            if let Ok(permit) = self.release.acquire().await {
                permit.forget();
            }
        }
    }

    /// A wrapper calls this for each read of `key`.
    pub fn note_read(&self, key: &str) {
        self.with(|f| {
            if f.count_reads.as_deref().is_some_and(|part| key.contains(part)) {
                f.reads_counted += 1;
            }
        });
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
