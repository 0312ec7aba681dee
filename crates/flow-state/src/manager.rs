//! The flow manager: every flow operation, over any [`Store`](crate::Store).

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use mcp_clock::{Clock, SharedClock, Timestamp};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::record::{Record, decode_value, encode_value};
use crate::{
    Error, Flight, FlowError, FlowKey, FlowState, FlowStatus, FlowTypeConfig, Inserted,
    SharedStore, SingleFlight, StoreErrorKind, Swapped, Versioned,
};

/// A value shared between the callers of one run, typed by the caller.
type Shared = Arc<dyn Any + Send + Sync>;
type Outcome = Result<Shared, Error>;

/// How long ago a flow last changed status, and whether that is longer than a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Staleness {
    /// The flow's status.
    pub status: FlowStatus,
    /// Time since completion, failure, else creation.
    pub age: Duration,
    /// Whether `age` exceeds the window asked about.
    pub is_stale: bool,
}

/// Coordinates flows: PENDING until completed or failed, waited on without polling, run
/// single-flight with a shared result.
///
/// Cheap to clone; clones share everything.
///
/// # Concurrent calls on the same key
///
/// [`FlowManager::run`] runs at most one handler per key at a time across every manager that
/// shares the store: the one that writes the PENDING record (an atomic insert-if-absent or
/// compare-and-set) runs the handler; everyone else waits for its result. In one process,
/// concurrent callers share one driver task and one result without touching the store again.
///
/// # Cancellation
///
/// Dropping a caller never wedges a key. The handler and the task that records its outcome are
/// detached from the callers: when every caller has gone (even the one that started it), the
/// handler still finishes and its result is recorded for the next caller. A handler that runs
/// past its deadline is dropped and its flow recorded FAILED (kind
/// [`FlowError::TIMEOUT`]); a handler that panics is recorded FAILED (kind
/// [`FlowError::PANICKED`]) and its waiters are woken.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), flow_state::Error> {
/// use flow_state::{FlowKey, FlowManager, MemoryStore, SharedStore};
///
/// let flows = FlowManager::builder(SharedStore::new(MemoryStore::new())).build()?;
/// let key = FlowKey::new("tokens", "alice:github")?.with_tenant("acme")?;
///
/// let first: u32 = flows.run(&key, || async { Ok(42) }).await?;
/// // The COMPLETED result is reused until its TTL; this handler does not run.
/// let again: u32 = flows.run(&key, || async { Ok(7) }).await?;
/// assert_eq!((first, again), (42, 42));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct FlowManager {
    inner: Arc<Inner>,
}

struct Inner {
    store: SharedStore,
    clock: SharedClock,
    defaults: FlowTypeConfig,
    types: HashMap<String, FlowTypeConfig>,
    /// The runs driven by this process, one per key.
    inflight: SingleFlight<FlowKey, Outcome>,
    decoded: DecodedCache,
}

impl fmt::Debug for FlowManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FlowManager")
            .field("store", &self.inner.store)
            .field("defaults", &self.inner.defaults)
            .field("types", &self.inner.types)
            .finish_non_exhaustive()
    }
}

/// Builds a [`FlowManager`]; see [`FlowManager::builder`].
#[derive(Debug)]
pub struct FlowManagerBuilder {
    store: SharedStore,
    clock: SharedClock,
    defaults: FlowTypeConfig,
    types: HashMap<String, FlowTypeConfig>,
}

impl FlowManagerBuilder {
    /// The clock for timestamps, TTLs and timeouts (default: the system clock). Use the same
    /// clock for the store.
    pub fn clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }

    /// The configuration of flow types not named with [`FlowManagerBuilder::flow_type`].
    pub fn defaults(mut self, config: FlowTypeConfig) -> Self {
        self.defaults = config;
        self
    }

    /// The configuration of one flow type.
    pub fn flow_type(mut self, flow_type: impl Into<String>, config: FlowTypeConfig) -> Self {
        self.types.insert(flow_type.into(), config);
        self
    }

    /// Check the configuration and build. A zero or absurd (over 30 days) TTL or timeout, a wait
    /// longer than the TTL, or a handler deadline longer than the stale window is refused.
    pub fn build(self) -> Result<FlowManager, Error> {
        self.defaults.validate("defaults")?;
        for (name, config) in &self.types {
            config.validate(name)?;
        }
        Ok(FlowManager {
            inner: Arc::new(Inner {
                store: self.store,
                clock: self.clock.clone(),
                defaults: self.defaults,
                types: self.types,
                inflight: SingleFlight::new(self.clock),
                decoded: DecodedCache::default(),
            }),
        })
    }
}

/// Which waits may change the flow when they time out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WaitMode {
    /// A caller waiting for an externally completed flow (create-and-wait, wait): on timeout the
    /// flow is recorded FAILED (kept types) or deleted, as nobody else will settle it.
    Owner,
    /// A run() joining another process's handler: never changes the flow; returns when the
    /// PENDING goes stale so the caller can take over.
    Join,
}

enum Waited {
    Settled(Value),
    Stale,
}

impl FlowManager {
    /// Start building a manager over `store`.
    pub fn builder(store: SharedStore) -> FlowManagerBuilder {
        FlowManagerBuilder {
            store,
            clock: SharedClock::system(),
            defaults: FlowTypeConfig::default(),
            types: HashMap::new(),
        }
    }

    /// The clock this manager reads.
    pub fn clock(&self) -> &SharedClock {
        &self.inner.clock
    }

    fn config(&self, key: &FlowKey) -> &FlowTypeConfig {
        self.inner.types.get(key.flow_type()).unwrap_or(&self.inner.defaults)
    }

    fn now(&self) -> Timestamp {
        self.inner.clock.now()
    }

    fn store_error(key: &FlowKey, source: crate::StoreError) -> Error {
        if source.kind() == StoreErrorKind::Corrupt {
            Error::Corrupt { key: key.clone(), message: source.to_string() }
        } else {
            Error::Store { key: key.clone(), source: Box::new(source) }
        }
    }

    async fn read(&self, key: &FlowKey) -> Result<Option<(Versioned, Record)>, Error> {
        match self.inner.store.get(key.as_str()).await {
            Ok(None) => Ok(None),
            Ok(Some(v)) => {
                let record = Record::decode(key, &v.value)?;
                Ok(Some((v, record)))
            }
            Err(e) => Err(Self::store_error(key, e)),
        }
    }

    async fn insert(
        &self,
        key: &FlowKey,
        record: &Record,
        ttl: Duration,
    ) -> Result<Inserted, Error> {
        let bytes = record.encode(key)?;
        self.inner
            .store
            .insert_if_absent(key.as_str(), bytes, ttl)
            .await
            .map_err(|e| Self::store_error(key, e))
    }

    async fn cas(
        &self,
        key: &FlowKey,
        expected: u64,
        record: &Record,
        ttl: Duration,
    ) -> Result<Swapped, Error> {
        let bytes = record.encode(key)?;
        self.inner
            .store
            .compare_and_swap(key.as_str(), expected, bytes, ttl)
            .await
            .map_err(|e| Self::store_error(key, e))
    }

    fn is_stale(&self, record: &Record, config: &FlowTypeConfig) -> bool {
        record.status == FlowStatus::Pending && record.created_at + config.stale_after <= self.now()
    }

    /// Write a new PENDING flow without waiting on it, for flows that must be durable before a
    /// side effect (such as sending a browser to an authorization page). Returns its creation
    /// time.
    ///
    /// A COMPLETED, FAILED or stale PENDING flow is replaced; a live PENDING one is not
    /// ([`Error::AlreadyPending`]), so two callers cannot both start the same interactive flow.
    pub async fn init(&self, key: &FlowKey, metadata: Value) -> Result<Timestamp, Error> {
        self.init_with(key, metadata, true).await
    }

    /// [`FlowManager::init`] that never replaces a COMPLETED flow: it writes a new PENDING flow
    /// only if there is none (or it expired), or it is FAILED, or it is a stale PENDING one.
    /// Atomic over the store's compare-and-set, so a check-then-init cannot wipe a result a
    /// peer completed in between: a COMPLETED flow is [`Error::AlreadySettled`] (left
    /// unchanged, for the caller to read), a live PENDING one [`Error::AlreadyPending`].
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), flow_state::Error> {
    /// use flow_state::{Error, FlowKey, FlowManager, FlowStatus, MemoryStore, SharedStore};
    ///
    /// let flows = FlowManager::builder(SharedStore::new(MemoryStore::new())).build()?;
    /// let key = FlowKey::new("oauth", "alice")?;
    /// flows.init_unless_completed(&key, serde_json::json!({})).await?;
    /// flows.complete(&key, &"tokens stored").await?;
    /// let again = flows.init_unless_completed(&key, serde_json::json!({})).await;
    /// assert!(matches!(again, Err(Error::AlreadySettled { status: FlowStatus::Completed, .. })));
    /// # Ok(()) }
    /// ```
    pub async fn init_unless_completed(
        &self,
        key: &FlowKey,
        metadata: Value,
    ) -> Result<Timestamp, Error> {
        self.init_with(key, metadata, false).await
    }

    async fn init_with(
        &self,
        key: &FlowKey,
        metadata: Value,
        replace_completed: bool,
    ) -> Result<Timestamp, Error> {
        let config = self.config(key).clone();
        loop {
            let now = self.now();
            let record = Record::pending(now, metadata.clone());
            match self.read(key).await? {
                None => {
                    if let Inserted::Inserted { .. } = self.insert(key, &record, config.ttl).await?
                    {
                        return Ok(now);
                    }
                }
                Some((_, current))
                    if current.status == FlowStatus::Pending
                        && !self.is_stale(&current, &config) =>
                {
                    return Err(Error::AlreadyPending {
                        key: key.clone(),
                        created_at: current.created_at,
                    });
                }
                Some((_, current))
                    if current.status == FlowStatus::Completed && !replace_completed =>
                {
                    return Err(Error::AlreadySettled {
                        key: key.clone(),
                        status: FlowStatus::Completed,
                    });
                }
                Some((v, _)) => {
                    if let Swapped::Swapped { .. } =
                        self.cas(key, v.version, &record, config.ttl).await?
                    {
                        return Ok(now);
                    }
                }
            }
        }
    }

    /// Create a PENDING flow (or join the live one) and wait until it is completed, failed,
    /// deleted, or the wait times out.
    ///
    /// An existing COMPLETED flow returns its result at once and an existing FAILED one its
    /// error; a stale PENDING one is replaced. The wait runs until the flow type's wait timeout
    /// after the flow's creation; on timeout a kept-failures type records FAILED (kind
    /// [`FlowError::TIMEOUT`]) so every process sees it, and other types are deleted.
    pub async fn create_and_wait<T: DeserializeOwned>(
        &self,
        key: &FlowKey,
        metadata: Value,
    ) -> Result<T, Error> {
        let config = self.config(key).clone();
        // Subscribe before writing, so that a change right after our write is seen, and a delete
        // of the flow we created is reported as a delete.
        let changes = self.inner.store.subscribe(key.as_str());
        let seen = loop {
            let record = Record::pending(self.now(), metadata.clone());
            match self.read(key).await? {
                None => {
                    if let Inserted::Inserted { .. } = self.insert(key, &record, config.ttl).await?
                    {
                        break Some(record.created_at + config.ttl);
                    }
                }
                Some((v, current)) if self.is_stale(&current, &config) => {
                    if let Swapped::Swapped { .. } =
                        self.cas(key, v.version, &record, config.ttl).await?
                    {
                        break Some(record.created_at + config.ttl);
                    }
                }
                Some((v, _)) => break Some(v.expires_at),
            }
        };
        match self.wait_settled(key, &config, WaitMode::Owner, changes, seen).await? {
            Waited::Settled(value) => decode_value(key, value),
            Waited::Stale => unreachable!("owner waits never report staleness"),
        }
    }

    /// Wait for an existing flow to be completed or failed. See
    /// [`FlowManager::create_and_wait`] for the timeout; a missing flow is
    /// [`Error::NotFound`], one deleted during the wait [`Error::Deleted`].
    pub async fn wait<T: DeserializeOwned>(&self, key: &FlowKey) -> Result<T, Error> {
        let config = self.config(key).clone();
        let changes = self.inner.store.subscribe(key.as_str());
        match self.wait_settled(key, &config, WaitMode::Owner, changes, None).await? {
            Waited::Settled(value) => decode_value(key, value),
            Waited::Stale => unreachable!("owner waits never report staleness"),
        }
    }

    /// Waits on `key` with `changes`, a subscription taken before the caller's first read, so a
    /// change between a read and the wait is never missed. `seen` is the expiry of the record if
    /// the caller already saw (or wrote) it, so its disappearance counts as a delete.
    async fn wait_settled(
        &self,
        key: &FlowKey,
        config: &FlowTypeConfig,
        mode: WaitMode,
        mut changes: crate::Subscription,
        seen: Option<Timestamp>,
    ) -> Result<Waited, Error> {
        let mut last_expiry = seen;
        loop {
            let Some((v, record)) = self.read(key).await? else {
                return Err(match last_expiry {
                    Some(expiry) if expiry > self.now() => Error::Deleted { key: key.clone() },
                    Some(_) => Error::Timeout { key: key.clone() },
                    None => Error::NotFound { key: key.clone() },
                });
            };
            last_expiry = Some(v.expires_at);
            match record.status {
                FlowStatus::Completed => {
                    return Ok(Waited::Settled(record.result.unwrap_or(Value::Null)));
                }
                FlowStatus::Failed => {
                    if !config.keep_failures && mode == WaitMode::Owner {
                        // Delete only this failure, never a newer flow under the same key.
                        let _ = self.inner.store.delete_if(key.as_str(), Some(v.version)).await;
                    }
                    let error = record
                        .error
                        .unwrap_or_else(|| FlowError::new(FlowError::FAILED, "flow failed"));
                    return Err(Error::Failed { key: key.clone(), error });
                }
                FlowStatus::Pending => {}
            }
            let now = self.now();
            let deadline = record.created_at + config.wait_timeout;
            if mode == WaitMode::Join && self.is_stale(&record, config) {
                return Ok(Waited::Stale);
            }
            if now >= deadline {
                if mode == WaitMode::Owner {
                    self.record_timeout(key, config, v.version, record).await?;
                }
                return Err(Error::Timeout { key: key.clone() });
            }
            let mut wake_at = deadline.min(v.expires_at);
            if mode == WaitMode::Join {
                wake_at = wake_at.min(record.created_at + config.stale_after);
            }
            tokio::select! {
                () = changes.changed() => {}
                () = self.inner.clock.sleep_until(wake_at) => {}
            }
        }
    }

    async fn record_timeout(
        &self,
        key: &FlowKey,
        config: &FlowTypeConfig,
        version: u64,
        mut record: Record,
    ) -> Result<(), Error> {
        if config.keep_failures {
            record.status = FlowStatus::Failed;
            record.failed_at = Some(self.now());
            record.error = Some(FlowError::new(
                FlowError::TIMEOUT,
                format!("{} flow timed out", key.flow_type()),
            ));
            self.cas(key, version, &record, config.ttl).await?;
        } else {
            self.inner
                .store
                .delete_if(key.as_str(), Some(version))
                .await
                .map_err(|e| Self::store_error(key, e))?;
        }
        Ok(())
    }

    /// Complete a PENDING (or FAILED) flow with `result` and wake its waiters.
    ///
    /// A missing or expired flow is [`Error::NotFound`]; a COMPLETED one is
    /// [`Error::AlreadySettled`] and is left unchanged.
    pub async fn complete<T: Serialize>(&self, key: &FlowKey, result: &T) -> Result<(), Error> {
        self.settle(key, Ok(encode_value(key, result)?), false).await.map(drop)
    }

    /// Complete the flow only if it is PENDING; returns whether this call made the transition.
    /// Among racing completers exactly one gets `true`. A missing flow is [`Error::NotFound`].
    pub async fn complete_if_pending<T: Serialize>(
        &self,
        key: &FlowKey,
        result: &T,
    ) -> Result<bool, Error> {
        self.settle(key, Ok(encode_value(key, result)?), true).await
    }

    /// Fail a PENDING flow with `error` and wake its waiters. A missing flow is
    /// [`Error::NotFound`]; a COMPLETED or FAILED one is [`Error::AlreadySettled`] and is left
    /// unchanged (a late failure never clobbers a success).
    pub async fn fail(&self, key: &FlowKey, error: FlowError) -> Result<(), Error> {
        self.settle(key, Err(error), false).await.map(drop)
    }

    async fn settle(
        &self,
        key: &FlowKey,
        outcome: Result<Value, FlowError>,
        only_pending: bool,
    ) -> Result<bool, Error> {
        let config = self.config(key).clone();
        loop {
            let Some((v, mut record)) = self.read(key).await? else {
                return Err(Error::NotFound { key: key.clone() });
            };
            let allowed = match (&outcome, record.status) {
                (_, FlowStatus::Pending) => true,
                (Ok(_), FlowStatus::Failed) => !only_pending,
                _ => false,
            };
            if !allowed {
                if only_pending {
                    return Ok(false);
                }
                return Err(Error::AlreadySettled { key: key.clone(), status: record.status });
            }
            record.settle(self.now(), outcome.clone());
            let ttl = config.ttl_for(record.status);
            if let Swapped::Swapped { .. } = self.cas(key, v.version, &record, ttl).await? {
                return Ok(true);
            }
        }
    }

    /// The flow under `key`, with its result decoded as `T`.
    pub async fn get<T: DeserializeOwned>(
        &self,
        key: &FlowKey,
    ) -> Result<Option<FlowState<T>>, Error> {
        match self.read(key).await? {
            None => Ok(None),
            Some((_, record)) => record.into_state(key).map(Some),
        }
    }

    /// Delete the flow; waiters wake with [`Error::Deleted`]. Returns whether a live flow was
    /// deleted.
    pub async fn delete(&self, key: &FlowKey) -> Result<bool, Error> {
        self.inner.store.delete_if(key.as_str(), None).await.map_err(|e| Self::store_error(key, e))
    }

    /// Delete the flow only while it has `status` (for example, drop a COMPLETED cache entry but
    /// leave a PENDING flow to its waiters). Returns whether it was deleted.
    pub async fn delete_if_status(&self, key: &FlowKey, status: FlowStatus) -> Result<bool, Error> {
        self.delete_matching(key, |record| record.status == status).await
    }

    /// Delete the flow only while it is still the generation created at `created_at` and still
    /// has `status`: the check and the delete are one compare-and-delete on the version read, so
    /// a flow replaced, settled or recreated in between (a newer generation) is left alone.
    /// Returns whether it was deleted. This is how a stale flow is replaced without removing a
    /// fresh one that another process put there first.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), flow_state::Error> {
    /// use flow_state::{FlowKey, FlowManager, FlowStatus, MemoryStore, SharedStore};
    ///
    /// let flows = FlowManager::builder(SharedStore::new(MemoryStore::new())).build()?;
    /// let key = FlowKey::new("mcp_oauth", "alice:server")?;
    /// let created = flows.init(&key, serde_json::json!({})).await?;
    /// flows.complete(&key, &"done").await?;
    /// // It settled since it was read as PENDING: left alone.
    /// assert!(!flows.delete_generation(&key, created, FlowStatus::Pending).await?);
    /// assert!(flows.delete_generation(&key, created, FlowStatus::Completed).await?);
    /// # Ok(()) }
    /// ```
    pub async fn delete_generation(
        &self,
        key: &FlowKey,
        created_at: Timestamp,
        status: FlowStatus,
    ) -> Result<bool, Error> {
        self.delete_matching(key, |record| {
            record.status == status && record.created_at == created_at
        })
        .await
    }

    /// Delete the flow while `matches` holds for it: checked on a read, deleted only at that
    /// read's version (re-read if it changed).
    async fn delete_matching(
        &self,
        key: &FlowKey,
        matches: impl Fn(&Record) -> bool,
    ) -> Result<bool, Error> {
        loop {
            let Some((v, record)) = self.read(key).await? else { return Ok(false) };
            if !matches(&record) {
                return Ok(false);
            }
            let deleted = self
                .inner
                .store
                .delete_if(key.as_str(), Some(v.version))
                .await
                .map_err(|e| Self::store_error(key, e))?;
            if deleted {
                return Ok(true);
            }
        }
    }

    /// How long ago the flow last changed status, and whether that exceeds `window`. A PENDING
    /// flow's age counts from its creation. `None` when there is no flow.
    pub async fn staleness(
        &self,
        key: &FlowKey,
        window: Duration,
    ) -> Result<Option<Staleness>, Error> {
        let Some((_, record)) = self.read(key).await? else { return Ok(None) };
        let changed = record.completed_at.or(record.failed_at).unwrap_or(record.created_at);
        let age = self.now().saturating_since(changed);
        Ok(Some(Staleness { status: record.status, age, is_stale: age > window }))
    }

    /// Run `handler` for `key` at most once at a time, and give every concurrent caller its
    /// result (create-with-handler).
    ///
    /// - A COMPLETED result is returned without running anything while it lives, if the flow type
    ///   reuses results (the default); a FAILED one is returned as [`Error::Failed`] only if the
    ///   type keeps failures.
    /// - A live PENDING flow is joined: its result is shared. A stale one is taken over.
    /// - Otherwise this call writes PENDING and runs `handler` in a detached task; see the type
    ///   docs for cancellation. If the flow was completed by someone else while the handler ran,
    ///   the stored result wins.
    pub async fn run<T, F, Fut>(&self, key: &FlowKey, handler: F) -> Result<T, Error>
    where
        T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, FlowError>> + Send + 'static,
    {
        // Hit path: a COMPLETED record this process has already decoded.
        let current =
            self.inner.store.get(key.as_str()).await.map_err(|e| Self::store_error(key, e))?;
        if let Some(v) = &current
            && let Some(value) = self.inner.decoded.get::<T>(key, v.version)
        {
            return Ok(value);
        }
        // One driver per key in this process: the leader spawns it and every caller (the leader
        // too) follows it. The driver leaves the single-flight before it publishes, so a caller
        // that has the result and invalidates the flow finds no run in flight (it would hand
        // back that result).
        let follower = match self.inner.inflight.lead(key.clone(), None) {
            Flight::Follow(follower) => follower,
            Flight::Lead(leader) => {
                let follower = leader.follower();
                let this = self.clone();
                let key = key.clone();
                tokio::spawn(async move {
                    let outcome =
                        this.drive::<T, F, Fut>(&key, handler).await.map(|v| Arc::new(v) as Shared);
                    leader.finish(outcome);
                });
                follower
            }
        };
        let outcome = match follower.wait().await {
            Ok(outcome) => outcome,
            // The driver task died without publishing (its runtime shut down).
            Err(_) => Err(Error::Failed {
                key: key.clone(),
                error: FlowError::new(FlowError::ABORTED, "the task running this flow was stopped"),
            }),
        };
        let shared = outcome?;
        shared.downcast_ref::<T>().cloned().ok_or_else(|| Error::Codec {
            key: key.clone(),
            message: "joined a run whose handler returns another type".into(),
        })
    }

    /// The detached part of [`FlowManager::run`]: take the lead or join, and settle the flow.
    async fn drive<T, F, Fut>(&self, key: &FlowKey, handler: F) -> Result<T, Error>
    where
        T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, FlowError>> + Send + 'static,
    {
        let config = self.config(key).clone();
        let (version, pending) = loop {
            let pending = Record::pending(self.now(), Value::Null);
            match self.read(key).await? {
                None => match self.insert(key, &pending, config.ttl).await? {
                    Inserted::Inserted { version } => break (version, pending),
                    Inserted::Exists(_) => continue,
                },
                Some((v, record)) => match record.status {
                    FlowStatus::Completed if config.reuse_completed => {
                        let value: T = decode_value(key, record.result.unwrap_or(Value::Null))?;
                        self.inner.decoded.put(key, v.version, value.clone());
                        return Ok(value);
                    }
                    FlowStatus::Failed if config.keep_failures => {
                        let error = record
                            .error
                            .unwrap_or_else(|| FlowError::new(FlowError::FAILED, "flow failed"));
                        return Err(Error::Failed { key: key.clone(), error });
                    }
                    FlowStatus::Pending if !self.is_stale(&record, &config) => {
                        let changes = self.inner.store.subscribe(key.as_str());
                        match self
                            .wait_settled(key, &config, WaitMode::Join, changes, Some(v.expires_at))
                            .await?
                        {
                            Waited::Settled(value) => return decode_value(key, value),
                            Waited::Stale => continue,
                        }
                    }
                    _ => match self.cas(key, v.version, &pending, config.ttl).await? {
                        Swapped::Swapped { version } => break (version, pending),
                        Swapped::Conflict(_) => continue,
                    },
                },
            }
        };
        self.lead(key, &config, version, pending, handler).await
    }

    async fn lead<T, F, Fut>(
        &self,
        key: &FlowKey,
        config: &FlowTypeConfig,
        version: u64,
        mut record: Record,
        handler: F,
    ) -> Result<T, Error>
    where
        T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, FlowError>> + Send + 'static,
    {
        // The deadline counts from the PENDING record's creation, the same instant the stale
        // window counts from, so no other process can take over a handler that is still allowed
        // to run.
        let deadline = record.created_at + config.handler_timeout;
        // The handler runs in a task of its own so that a panic is caught and a deadline can
        // drop it.
        let mut task = tokio::spawn(async move { handler().await });
        let outcome = tokio::select! {
            joined = &mut task => match joined {
                Ok(outcome) => outcome,
                Err(e) if e.is_panic() => Err(FlowError::new(FlowError::PANICKED, "the flow handler panicked")),
                Err(_) => Err(FlowError::new(FlowError::ABORTED, "the flow handler was cancelled")),
            },
            () = self.inner.clock.sleep_until(deadline) => {
                task.abort();
                Err(FlowError::new(FlowError::TIMEOUT, format!("the {} handler ran past its deadline", key.flow_type())))
            }
        };
        let stored = match &outcome {
            Ok(value) => Ok(encode_value(key, value)?),
            Err(error) => Err(error.clone()),
        };
        record.settle(self.now(), stored);
        let ttl = config.ttl_for(record.status);
        match self.cas(key, version, &record, ttl).await? {
            Swapped::Swapped { version } => {
                if let Ok(value) = &outcome
                    && config.reuse_completed
                {
                    self.inner.decoded.put(key, version, value.clone());
                }
            }
            Swapped::Conflict(Some(v)) => {
                // Someone settled or replaced the flow while the handler ran. An external
                // completion wins over our own outcome.
                let other = Record::decode(key, &v.value)?;
                if other.status == FlowStatus::Completed {
                    return decode_value(key, other.result.unwrap_or(Value::Null));
                }
            }
            Swapped::Conflict(None) => {}
        }
        outcome.map_err(|error| Error::Failed { key: key.clone(), error })
    }
}

/// Decoded COMPLETED results by key and store version, so cache hits skip JSON decoding. A
/// version is unique in its store, so a match means this exact record.
#[derive(Default)]
struct DecodedCache {
    shards: [Mutex<DecodedShard>; 16],
}

type DecodedShard = HashMap<Arc<str>, (u64, Shared)>;

const DECODED_PER_SHARD: usize = 4096;

impl DecodedCache {
    fn shard(&self, key: &FlowKey) -> &Mutex<DecodedShard> {
        let b = key.as_str().as_bytes();
        let h = b.iter().fold(b.len(), |h, &c| h.wrapping_mul(31).wrapping_add(c as usize));
        &self.shards[h % self.shards.len()]
    }

    fn get<T: Clone + 'static>(&self, key: &FlowKey, version: u64) -> Option<T> {
        let shard = self.shard(key).lock().unwrap_or_else(PoisonError::into_inner);
        match shard.get(key.as_str()) {
            Some((v, value)) if *v == version => value.downcast_ref::<T>().cloned(),
            _ => None,
        }
    }

    fn put<T: Send + Sync + 'static>(&self, key: &FlowKey, version: u64, value: T) {
        let mut shard = self.shard(key).lock().unwrap_or_else(PoisonError::into_inner);
        if shard.len() >= DECODED_PER_SHARD && !shard.contains_key(key.as_str()) {
            shard.clear();
        }
        shard.insert(key.encoded_arc(), (version, Arc::new(value)));
    }
}
