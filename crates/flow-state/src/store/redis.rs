//! The Redis store: flows shared by every process and replica of a deployment.
//!
//! Each record is a hash `{v: version, e: expires-at ms, d: bytes}` under `<prefix>:<key>`, with
//! a Redis TTL as well. Every method is a Lua script, so each is one atomic operation and one
//! round trip; versions come from `INCR <prefix>:__version`, unique across the deployment.
//!
//! Expiry is Redis's own business: the scripts read the server's clock (`TIME`; Redis 5 and
//! later replicate a script's effects, not the script, so a replica never re-reads it) and
//! write `e` and the key's `PEXPIRE` from it, so processes whose clocks disagree (by more than a
//! lease's TTL, even) agree on which records are live. The caller's clock is not consulted for
//! expiry at all: [`Versioned::expires_at`] is reported on it (the caller's now plus the
//! remaining time Redis gives the record), so a waiter can sleep until it.
//! Every write publishes the key on `<prefix>:__changes`; one subscriber connection per store
//! turns those messages into local wake-ups, and after a reconnect (or every poll interval, in
//! case a message was missed) every local waiter re-reads.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use mcp_clock::{Clock, SharedClock};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Script, Value};

use super::{
    Inserted, KeyNotifier, RedisLocation, Store, StoreError, StoreErrorKind, Subscription, Swapped,
    Versioned,
};

const CHECK_RECORD: &str = r#"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function record(key)
  local t = redis.call('TYPE', key).ok
  if t == 'none' then return nil end
  if t ~= 'hash' then return redis.error_reply('CORRUPT the value is a ' .. t .. ', not a flow record') end
  local cur = redis.call('HMGET', key, 'v', 'e', 'd')
  if not cur[1] or not cur[2] or not cur[3] or not tonumber(cur[1]) or not tonumber(cur[2]) then
    return redis.error_reply('CORRUPT the hash is missing fields of a flow record')
  end
  return cur
end
local function write(key, counter, now, px, data, channel, name)
  local v = redis.call('INCR', counter)
  redis.call('DEL', key)
  redis.call('HSET', key, 'v', v, 'e', string.format('%d', now + tonumber(px)), 'd', data)
  redis.call('PEXPIRE', key, px)
  redis.call('PUBLISH', channel, name)
  return v
end
"#;

/// `fence_holds(key, owner)`: whether a live lease record (this store's format, judged on
/// `TIME`) under `key` holds `owner`. For scripts of other components:
/// [`RedisFence::LUA`](crate::RedisFence::LUA).
pub(crate) const FENCE_HOLDS: &str = r#"
local function fence_holds(key, owner)
  if redis.call('TYPE', key).ok ~= 'hash' then return false end
  local cur = redis.call('HMGET', key, 'e', 'd')
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  return cur[1] ~= false and cur[2] == owner and tonumber(cur[1]) ~= nil and tonumber(cur[1]) > now
end
"#;

/// KEYS: record. Returns `{}` (absent or expired) or `{v, e, d, now}`.
const GET: &str = r#"
local now = now_ms()
local cur = record(KEYS[1])
if type(cur) == 'table' and cur.err then return cur end
if not cur or tonumber(cur[2]) <= now then return {} end
return {cur[1], cur[2], cur[3], now}
"#;

/// KEYS: record, counter. ARGV: px, data, channel, name. Returns `{1, v}` or `{0, v, e, d, now}`.
const INSERT: &str = r#"
local now = now_ms()
local cur = record(KEYS[1])
if type(cur) == 'table' and cur.err then return cur end
if cur and tonumber(cur[2]) > now then return {0, cur[1], cur[2], cur[3], now} end
return {1, write(KEYS[1], KEYS[2], now, ARGV[1], ARGV[2], ARGV[3], ARGV[4])}
"#;

/// KEYS: record, counter. ARGV: expected, px, data, channel, name. Returns `{0}` (absent or
/// expired), `{1, v}` or `{0, v, e, d, now}`.
const CAS: &str = r#"
local now = now_ms()
local cur = record(KEYS[1])
if type(cur) == 'table' and cur.err then return cur end
if not cur or tonumber(cur[2]) <= now then return {0} end
if cur[1] ~= ARGV[1] then return {0, cur[1], cur[2], cur[3], now} end
return {1, write(KEYS[1], KEYS[2], now, ARGV[2], ARGV[3], ARGV[4], ARGV[5])}
"#;

/// KEYS: record. ARGV: expected ('' for any), channel, name. Returns 1 if a live record went.
const DELETE: &str = r#"
local now = now_ms()
local cur = record(KEYS[1])
if type(cur) == 'table' and cur.err then return cur end
if not cur then return 0 end
local live = tonumber(cur[2]) > now
if live and ARGV[1] ~= '' and cur[1] ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
if live then
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return 1
end
return 0
"#;

/// A [`Store`] on Redis, for fleets. Feature `redis`.
///
/// Connect with [`RedisStore::builder`]; an unreachable server is a typed error naming the
/// address. A value under the store's prefix that is not a flow record (written by another
/// program) is a [`StoreErrorKind::Corrupt`] error, never a panic, and is left as it is.
#[derive(Debug, Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    conn: ConnectionManager,
    /// The server and database, as `RedisLocation::server_of` names them.
    server: String,
    prefix: String,
    clock: SharedClock,
    notifier: Arc<KeyNotifier>,
    get: Script,
    insert: Script,
    cas: Script,
    delete: Script,
    listener: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

/// Options for connecting a [`RedisStore`].
#[derive(Debug, Clone)]
pub struct RedisStoreBuilder {
    url: String,
    prefix: String,
    clock: SharedClock,
    poll_interval: Duration,
    timeout: Duration,
}

impl RedisStoreBuilder {
    /// The key prefix for this deployment (default `flows`); stores with different prefixes on
    /// one server never see each other's records.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The clock the store's own waits run on (the connect timeout, the poll interval, the
    /// reconnect backoff) and that [`Versioned::expires_at`] is reported on (default: the
    /// system clock). Expiry itself is decided by Redis's clock, never this one.
    pub fn clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }

    /// How often local waiters re-read in case a change message was missed (default 2 s).
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// The connection and response timeout of each command (default 2 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Connect, and subscribe to change messages before returning.
    pub async fn connect(self) -> Result<RedisStore, StoreError> {
        let unreachable = |e: RedisError| {
            StoreError::new(
                StoreErrorKind::Unavailable,
                format!("could not connect to Redis at {}", self.url),
            )
            .with_source(e)
        };
        let client = redis::Client::open(self.url.as_str()).map_err(unreachable)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(2);
        let conn = client.get_connection_manager_with_config(config).await.map_err(unreachable)?;
        let notifier = KeyNotifier::new();
        let channel = format!("{}:__changes", self.prefix);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let listener = tokio::spawn(listen(
            client,
            channel,
            notifier.clone(),
            self.clock.clone(),
            self.poll_interval,
            ready_tx,
        ));
        match mcp_clock::within(&self.clock, self.timeout, ready_rx).await {
            Some(Ok(())) => {}
            _ => {
                listener.abort();
                return Err(StoreError::new(
                    StoreErrorKind::Unavailable,
                    format!("could not subscribe to change messages at {}", self.url),
                ));
            }
        }
        Ok(RedisStore {
            inner: Arc::new(Inner {
                conn,
                server: RedisLocation::server_of(&self.url).unwrap_or_default(),
                prefix: self.prefix,
                clock: self.clock,
                notifier,
                get: Script::new(&format!("{CHECK_RECORD}{GET}")),
                insert: Script::new(&format!("{CHECK_RECORD}{INSERT}")),
                cas: Script::new(&format!("{CHECK_RECORD}{CAS}")),
                delete: Script::new(&format!("{CHECK_RECORD}{DELETE}")),
                listener,
            }),
        })
    }
}

/// Turns change messages into local wake-ups, reconnecting with backoff; wakes everyone after
/// each (re)subscription and every `poll` in case a message was missed.
async fn listen(
    client: redis::Client,
    channel: String,
    notifier: Arc<KeyNotifier>,
    clock: SharedClock,
    poll: Duration,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    let mut ready = Some(ready);
    let mut backoff = Duration::from_millis(50);
    loop {
        let subscribed = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, RedisError>(pubsub)
        }
        .await;
        match subscribed {
            Ok(pubsub) => {
                backoff = Duration::from_millis(50);
                // Wake everyone first, then say ready: a subscriber that subscribes once the
                // store is connected must not get this catch-up wake after its first change
                // (under load it landed there, and the store conformance check saw a
                // notification for another key's write).
                notifier.notify_all();
                if let Some(ready) = ready.take() {
                    let _ = ready.send(());
                }
                let mut messages = pubsub.into_on_message();
                loop {
                    tokio::select! {
                        msg = messages.next() => match msg {
                            Some(msg) => match std::str::from_utf8(msg.get_payload_bytes()) {
                                Ok(key) => notifier.notify(key),
                                Err(_) => notifier.notify_all(),
                            },
                            None => break,
                        },
                        () = clock.sleep(poll) => notifier.notify_all(),
                    }
                }
                tracing::warn!(%channel, "lost the Redis change subscription; reconnecting");
            }
            Err(e) => {
                tracing::warn!(%channel, error = %e, "could not subscribe to Redis change messages")
            }
        }
        notifier.notify_all();
        clock.sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

fn map_error(key: &str, e: RedisError) -> StoreError {
    let message = e.to_string();
    if message.contains("CORRUPT") || message.contains("WRONGTYPE") {
        return StoreError::new(
            StoreErrorKind::Corrupt,
            "the value is not a flow record (written by another program?)",
        )
        .with_key(key)
        .with_source(e);
    }
    let kind = if e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.code().is_some_and(|c| super::REDIS_UNAVAILABLE_CODES.contains(&c))
    {
        StoreErrorKind::Unavailable
    } else {
        StoreErrorKind::Backend
    };
    StoreError::new(kind, "Redis command failed").with_key(key).with_source(e)
}

fn corrupt(key: &str, what: &str) -> StoreError {
    StoreError::new(StoreErrorKind::Corrupt, format!("unexpected reply from Redis: {what}"))
        .with_key(key)
}

fn int(key: &str, v: &Value) -> Result<u64, StoreError> {
    match v {
        Value::Int(n) => u64::try_from(*n).map_err(|_| corrupt(key, "negative number")),
        Value::BulkString(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| corrupt(key, "not a number")),
        Value::SimpleString(s) => s.parse().map_err(|_| corrupt(key, "not a number")),
        _ => Err(corrupt(key, "not a number")),
    }
}

/// A record from a script's reply: version `v`, expiry `e` and the server's time `now` (both
/// in Redis's milliseconds), the bytes `d`; its expiry reported on `clock` (the caller's now
/// plus the time Redis still gives the record).
fn versioned(
    key: &str,
    clock: &SharedClock,
    [v, e, d, now]: [&Value; 4],
) -> Result<Versioned, StoreError> {
    let Value::BulkString(data) = d else { return Err(corrupt(key, "record data is not bytes")) };
    let left = int(key, e)?.saturating_sub(int(key, now)?);
    Ok(Versioned {
        version: int(key, v)?,
        expires_at: clock.now() + Duration::from_millis(left),
        value: data.as_slice().into(),
    })
}

impl RedisStore {
    /// Options for connecting to `url` (for example `redis://127.0.0.1:6379`).
    pub fn builder(url: impl Into<String>) -> RedisStoreBuilder {
        RedisStoreBuilder {
            url: url.into(),
            prefix: "flows".into(),
            clock: SharedClock::system(),
            poll_interval: Duration::from_secs(2),
            timeout: Duration::from_secs(2),
        }
    }

    fn key(&self, key: &str) -> String {
        format!("{}:{key}", self.inner.prefix)
    }

    fn counter(&self) -> String {
        format!("{}:__version", self.inner.prefix)
    }

    fn channel(&self) -> String {
        format!("{}:__changes", self.inner.prefix)
    }

    /// A TTL in milliseconds for the scripts: at least 1, at most about 300 years (so the
    /// expiry stays an exact integer in Lua's doubles).
    fn px(ttl: Duration) -> u64 {
        u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).clamp(1, 1 << 43)
    }

    fn versioned(&self, key: &str, record: [&Value; 4]) -> Result<Versioned, StoreError> {
        versioned(key, &self.inner.clock, record)
    }
}

#[async_trait::async_trait]
impl Store for RedisStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        let mut conn = self.inner.conn.clone();
        let reply: Vec<Value> = self
            .inner
            .get
            .key(self.key(key))
            .invoke_async(&mut conn)
            .await
            .map_err(|e| map_error(key, e))?;
        match reply.as_slice() {
            [] => Ok(None),
            [v, e, d, now] => self.versioned(key, [v, e, d, now]).map(Some),
            _ => Err(corrupt(key, "get reply")),
        }
    }

    async fn insert_if_absent(
        &self,
        key: &str,
        value: Vec<u8>,
        ttl: Duration,
    ) -> Result<Inserted, StoreError> {
        let mut conn = self.inner.conn.clone();
        let reply: Vec<Value> = self
            .inner
            .insert
            .key(self.key(key))
            .key(self.counter())
            .arg(Self::px(ttl))
            .arg(value)
            .arg(self.channel())
            .arg(key)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| map_error(key, e))?;
        match reply.as_slice() {
            [flag, version] if int(key, flag)? == 1 => {
                Ok(Inserted::Inserted { version: int(key, version)? })
            }
            [_, v, e, d, now] => Ok(Inserted::Exists(self.versioned(key, [v, e, d, now])?)),
            _ => Err(corrupt(key, "insert reply")),
        }
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: u64,
        value: Vec<u8>,
        ttl: Duration,
    ) -> Result<Swapped, StoreError> {
        let mut conn = self.inner.conn.clone();
        let reply: Vec<Value> = self
            .inner
            .cas
            .key(self.key(key))
            .key(self.counter())
            .arg(expected.to_string())
            .arg(Self::px(ttl))
            .arg(value)
            .arg(self.channel())
            .arg(key)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| map_error(key, e))?;
        match reply.as_slice() {
            [_] => Ok(Swapped::Conflict(None)),
            [flag, version] if int(key, flag)? == 1 => {
                Ok(Swapped::Swapped { version: int(key, version)? })
            }
            [_, v, e, d, now] => Ok(Swapped::Conflict(Some(self.versioned(key, [v, e, d, now])?))),
            _ => Err(corrupt(key, "compare-and-set reply")),
        }
    }

    async fn delete_if(&self, key: &str, expected: Option<u64>) -> Result<bool, StoreError> {
        let mut conn = self.inner.conn.clone();
        let deleted: i64 = self
            .inner
            .delete
            .key(self.key(key))
            .arg(expected.map(|v| v.to_string()).unwrap_or_default())
            .arg(self.channel())
            .arg(key)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| map_error(key, e))?;
        Ok(deleted == 1)
    }

    fn subscribe(&self, key: &str) -> Subscription {
        self.inner.notifier.subscribe(key)
    }

    fn redis_location(&self, key: &str) -> Option<RedisLocation> {
        Some(RedisLocation { server: self.inner.server.clone(), key: self.key(key) })
    }
}
