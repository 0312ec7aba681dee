//! A flow-state engine: PENDING / COMPLETED / FAILED flows with TTLs, waits without polling,
//! and single-flight handlers with a shared result, over pluggable stores.
//!
//! It knows nothing of OAuth, HTTP or MCP. The layers above use it for interactive flows that
//! stay PENDING until a browser callback arrives, for cached look-ups, and for single-flight
//! refreshes.
//!
//! - [`FlowManager`]: every operation on flows ([`init`](FlowManager::init),
//!   [`create_and_wait`](FlowManager::create_and_wait), [`complete`](FlowManager::complete),
//!   [`complete_if_pending`](FlowManager::complete_if_pending), [`fail`](FlowManager::fail),
//!   [`get`](FlowManager::get), [`delete`](FlowManager::delete),
//!   [`delete_if_status`](FlowManager::delete_if_status),
//!   [`staleness`](FlowManager::staleness) and [`run`](FlowManager::run)).
//! - [`FlowKey`]: tenant, flow type and id as separate typed parts that cannot collide.
//! - [`Store`]: the small store trait, with [`MemoryStore`], `SledStore` (feature `sled`) and
//!   `RedisStore` (feature `redis`). What only a backend's author needs (the record and outcome
//!   types, store errors, change notifications) is in [`store`].
//! - [`SingleFlight`]: a process-local single-flight that caches nothing.
//! - [`Leases`]: exclusive, expiring holds on a key across processes, with fencing tokens.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), flow_state::Error> {
//! use flow_state::{FlowKey, FlowManager, MemoryStore, SharedStore};
//! use serde_json::json;
//!
//! let flows = FlowManager::builder(SharedStore::new(MemoryStore::new())).build()?;
//! let key = FlowKey::new("mcp_oauth", "alice:github")?.with_tenant("acme")?;
//!
//! flows.init(&key, json!({ "state": "r4nd0m" })).await?;
//! let waiter = tokio::spawn({
//!     let (flows, key) = (flows.clone(), key.clone());
//!     async move { flows.wait::<String>(&key).await }
//! });
//! flows.complete(&key, &"tokens").await?;
//! assert_eq!(waiter.await.unwrap()?, "tokens");
//! # Ok(()) }
//! ```

mod config;
mod error;
mod key;
mod lease;
mod manager;
mod record;
mod single_flight;
pub mod store;
#[cfg(feature = "test-util")]
pub mod testkit;

pub use config::FlowTypeConfig;
pub use error::Error;
pub use key::FlowKey;
#[cfg(feature = "redis")]
pub use lease::RedisFence;
pub use lease::{Lease, Leases};
pub use manager::{FlowManager, FlowManagerBuilder, Staleness};
#[cfg(feature = "test-util")]
pub use mcp_clock::ManualClock;
pub use mcp_clock::{Clock, SharedClock, SystemClock, Timestamp};
pub use record::{FlowError, FlowState, FlowStatus};
pub use single_flight::{
    Attempt, CallOptions, Flight, Follower, Leader, SingleFlight, SingleFlightError,
};
pub use store::memory::MemoryStore;
#[cfg(feature = "redis")]
pub use store::redis::{RedisStore, RedisStoreBuilder};
#[cfg(feature = "sled")]
pub use store::sled::{Durability, SledStore, SledStoreBuilder};
pub use store::{SharedStore, Store};
// What only backend authors need lives in `store`; the crate's own code names it from the root.
pub(crate) use store::{Inserted, StoreError, StoreErrorKind, Subscription, Swapped, Versioned};
pub use tokio_util::sync::CancellationToken;
