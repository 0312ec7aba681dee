//! The Redis store: token records shared by every process and replica of a deployment.
//!
//! Layout, all under one hash tag so a cluster keeps them on one slot:
//!
//! - `{<prefix>}:r:<key>`: a hash `{v: version, d: sealed bytes}` per record;
//! - `{<prefix>}:version`: the `INCR` counter versions come from (unique across the deployment);
//! - `{<prefix>}:index`: a sorted set of every record key (score 0), so a prefix listing is one
//!   `ZRANGEBYLEX`, never a `SCAN` of the whole server.
//!
//! The refresh lease's record, for the fenced write: a `flow_state::RedisStore` lease lives at
//! `<lease store prefix>:L<lease key>`. When that store talks to the same server (same address
//! and database), [`TokenStore::compare_and_swap_fenced`] is one script that checks the lease
//! record (live on Redis's clock, holding our owner token) and swaps, so a lease that lapses
//! just before the write stops it. In a Redis Cluster both keys must hash to one slot: give the
//! lease store a prefix that carries this store's hash tag, `{<prefix>}:leases` (then the lease
//! record is `{<prefix>}:leases:L<lease key>`). With a lease elsewhere (another server, lock
//! files) the fence is the trait's default: the lease is checked, then the record swapped.
//!
//! Writes are Lua scripts, so each [`TokenStore`] method is one atomic operation and one round
//! trip. A value under the prefix that is not a token record (written by another program) is an
//! [`Error::Decrypt`] with [`DecryptFailure::UnknownFormat`], never a panic, and is left as it is
//! (an unconditional delete still clears it).

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Script, Value};

use super::{Swapped, TokenStore, Versioned, check_then_swap};
use crate::Error;
use crate::error::DecryptFailure;
use crate::lease::Fence;

/// Fails with a `FOREIGN` error reply unless KEYS[1] is absent or a token record; returns the
/// record's `{v, d}` (or nil).
const RECORD: &str = r#"
local function record(key)
  local t = redis.call('TYPE', key).ok
  if t == 'none' then return nil end
  if t ~= 'hash' then return redis.error_reply('FOREIGN the value is a ' .. t .. ', not a token record') end
  local cur = redis.call('HMGET', key, 'v', 'd')
  if not cur[1] or not cur[2] or not tonumber(cur[1]) then
    return redis.error_reply('FOREIGN the hash is not a token record')
  end
  return cur
end
"#;

/// KEYS: record, counter, index. ARGV: expected version ('' for absent), data, index member.
const CAS: &str = r#"
local cur = record(KEYS[1])
if type(cur) == 'table' and cur.err then return cur end
local stored = ''
if cur then stored = cur[1] end
if stored ~= ARGV[1] then
  if cur then return {0, cur[1], cur[2]} end
  return {0}
end
local v = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], 'v', v, 'd', ARGV[2])
redis.call('ZADD', KEYS[3], 0, ARGV[3])
return {1, v}
"#;

/// Prepended to [`CAS`] with `flow_state::RedisFence::LUA`: KEYS[4] is the lease record, ARGV[4]
/// our owner token; `{2}` when the lease is not ours (nothing written).
const FENCE: &str = r#"
if not fence_holds(KEYS[4], ARGV[4]) then return {2} end
"#;

/// KEYS: record, index. ARGV: expected version ('' for any value, even a foreign one), member.
const DELETE: &str = r#"
if ARGV[1] ~= '' then
  local cur = record(KEYS[1])
  if type(cur) == 'table' and cur.err then return cur end
  if not cur or cur[1] ~= ARGV[1] then return 0 end
end
redis.call('ZREM', KEYS[2], ARGV[2])
return redis.call('DEL', KEYS[1])
"#;

/// A [`TokenStore`] on Redis, for fleets: every process and replica sharing a prefix sees the
/// same records, and compare-and-swap is atomic across them. Feature `redis`.
///
/// Connect with [`RedisTokenStore::builder`]. An unreachable server at start is an
/// [`Error::StoreUnavailable`] naming the address; so is a command that fails while the server
/// is away (the connection is re-established in the background, so the next call may succeed).
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), token_storage::Error> {
/// use token_storage::{RedisTokenStore, TokenStore};
///
/// let store = RedisTokenStore::builder("redis://127.0.0.1:6379").prefix("acme-prod").connect().await?;
/// let tenants_keys = store.keys_with_prefix("acme/").await?;
/// # drop(tenants_keys);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisTokenStore {
    inner: Arc<Inner>,
}

struct Inner {
    conn: ConnectionManager,
    url: String,
    /// The server and database (`flow_state::store::RedisLocation::server_of`).
    server: String,
    prefix: String,
    cas: Script,
    fenced_cas: Script,
    delete: Script,
}

impl std::fmt::Debug for RedisTokenStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTokenStore")
            .field("url", &self.inner.url)
            .field("prefix", &self.inner.prefix)
            .finish_non_exhaustive()
    }
}

/// Options for connecting a [`RedisTokenStore`].
#[derive(Debug, Clone)]
pub struct RedisTokenStoreBuilder {
    url: String,
    prefix: String,
    timeout: Duration,
}

impl RedisTokenStoreBuilder {
    /// The key prefix of this deployment (default `tokens`); stores with different prefixes on
    /// one server never see each other's records.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The connection and response timeout of each command (default 2 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Connect. Fails with [`Error::StoreUnavailable`], naming the address, when the server
    /// cannot be reached.
    pub async fn connect(self) -> Result<RedisTokenStore, Error> {
        let url = self.url;
        let unreachable = |e: RedisError| Error::StoreUnavailable {
            message: format!("could not connect to Redis at {}", redact_url(&url)),
            source: Some(Arc::new(e)),
        };
        let client = redis::Client::open(url.as_str()).map_err(unreachable)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1);
        let conn = client.get_connection_manager_with_config(config).await.map_err(unreachable)?;
        Ok(RedisTokenStore {
            inner: Arc::new(Inner {
                conn,
                server: flow_state::store::RedisLocation::server_of(&url).unwrap_or_default(),
                url: redact_url(&url),
                prefix: self.prefix,
                cas: Script::new(&format!("{RECORD}{CAS}")),
                fenced_cas: Script::new(&format!(
                    "{RECORD}{}{FENCE}{CAS}",
                    flow_state::RedisFence::LUA
                )),
                delete: Script::new(&format!("{RECORD}{DELETE}")),
            }),
        })
    }
}

/// The URL without a password, for messages.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://[redacted]@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

impl RedisTokenStore {
    /// Options for connecting to `url` (for example `redis://127.0.0.1:6379`).
    pub fn builder(url: impl Into<String>) -> RedisTokenStoreBuilder {
        RedisTokenStoreBuilder {
            url: url.into(),
            prefix: "tokens".into(),
            timeout: Duration::from_secs(2),
        }
    }

    fn record(&self, key: &str) -> String {
        format!("{{{}}}:r:{key}", self.inner.prefix)
    }

    fn counter(&self) -> String {
        format!("{{{}}}:version", self.inner.prefix)
    }

    fn index(&self) -> String {
        format!("{{{}}}:index", self.inner.prefix)
    }

    fn error(&self, key: &str, e: RedisError) -> Error {
        if e.code().is_some_and(|c| c == "FOREIGN" || c == "WRONGTYPE")
            || e.to_string().contains("FOREIGN")
        {
            return foreign(key);
        }
        if e.is_io_error()
            || e.is_timeout()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_unrecoverable_error()
            || e.code().is_some_and(|c| flow_state::store::REDIS_UNAVAILABLE_CODES.contains(&c))
        {
            return Error::StoreUnavailable {
                message: format!("Redis at {} is unavailable", self.inner.url),
                source: Some(Arc::new(e)),
            };
        }
        Error::store(format!("Redis command on {key} failed"), e)
    }
}

fn foreign(key: &str) -> Error {
    Error::Decrypt { record: key.to_owned(), reason: DecryptFailure::UnknownFormat }
}

fn int(key: &str, v: &Value) -> Result<u64, Error> {
    match v {
        Value::Int(n) => u64::try_from(*n).map_err(|_| foreign(key)),
        Value::BulkString(b) => {
            std::str::from_utf8(b).ok().and_then(|s| s.parse().ok()).ok_or_else(|| foreign(key))
        }
        Value::SimpleString(s) => s.parse().map_err(|_| foreign(key)),
        _ => Err(foreign(key)),
    }
}

/// The reply of [`CAS`].
fn swap_reply(key: &str, reply: &[Value]) -> Result<Swapped, Error> {
    match reply {
        [_] => Ok(Swapped::Conflict(None)),
        [flag, version] if int(key, flag)? == 1 => {
            Ok(Swapped::Swapped { version: int(key, version)? })
        }
        [_, v, d] => Ok(Swapped::Conflict(Some(versioned(key, v, d)?))),
        _ => Err(foreign(key)),
    }
}

fn versioned(key: &str, v: &Value, d: &Value) -> Result<Versioned, Error> {
    let Value::BulkString(data) = d else { return Err(foreign(key)) };
    Ok(Versioned { version: int(key, v)?, value: data.as_slice().into() })
}

#[async_trait::async_trait]
impl TokenStore for RedisTokenStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, Error> {
        let mut conn = self.inner.conn.clone();
        // HGETALL, not HMGET: a hash of another program's fields must not read as absent.
        let reply: Vec<(Vec<u8>, Value)> = redis::cmd("HGETALL")
            .arg(self.record(key))
            .query_async(&mut conn)
            .await
            .map_err(|e| self.error(key, e))?;
        match reply.as_slice() {
            [] => Ok(None),
            [(a, v), (b, d)] if a == b"v" && b == b"d" => versioned(key, v, d).map(Some),
            [(b, d), (a, v)] if a == b"v" && b == b"d" => versioned(key, v, d).map(Some),
            _ => Err(foreign(key)),
        }
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<u64>,
        value: Vec<u8>,
    ) -> Result<Swapped, Error> {
        let mut conn = self.inner.conn.clone();
        let reply: Vec<Value> = self
            .inner
            .cas
            .key(self.record(key))
            .key(self.counter())
            .key(self.index())
            .arg(expected.map(|v| v.to_string()).unwrap_or_default())
            .arg(value)
            .arg(key)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.error(key, e))?;
        swap_reply(key, &reply)
    }

    /// One script when the lease is a `flow_state::RedisStore` lease on this server: the lease
    /// check and the swap are one atomic step. Otherwise the default (check, then swap).
    async fn compare_and_swap_fenced(
        &self,
        key: &str,
        expected: Option<u64>,
        value: Vec<u8>,
        fence: &Fence<'_>,
    ) -> Result<Option<Swapped>, Error> {
        let Some(lease) = fence.redis().filter(|f| f.server == self.inner.server) else {
            return check_then_swap(self, key, expected, value, fence).await;
        };
        let mut conn = self.inner.conn.clone();
        let reply: Vec<Value> = self
            .inner
            .fenced_cas
            .key(self.record(key))
            .key(self.counter())
            .key(self.index())
            .key(&lease.key)
            .arg(expected.map(|v| v.to_string()).unwrap_or_default())
            .arg(value)
            .arg(key)
            .arg(&lease.owner)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.error(key, e))?;
        match reply.as_slice() {
            [flag] if int(key, flag)? == 2 => Ok(None),
            _ => swap_reply(key, &reply).map(Some),
        }
    }

    async fn delete_if(&self, key: &str, expected: Option<u64>) -> Result<bool, Error> {
        let mut conn = self.inner.conn.clone();
        let deleted: i64 = self
            .inner
            .delete
            .key(self.record(key))
            .key(self.index())
            .arg(expected.map(|v| v.to_string()).unwrap_or_default())
            .arg(key)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.error(key, e))?;
        Ok(deleted == 1)
    }

    async fn keys_with_prefix(&self, prefix: &str) -> Result<Vec<String>, Error> {
        let mut conn = self.inner.conn.clone();
        let (min, max) = if prefix.is_empty() {
            (b"-".to_vec(), b"+".to_vec())
        } else {
            // Every UTF-8 string that starts with `prefix` sorts between `prefix` and
            // `prefix` followed by 0xFF (a byte UTF-8 never contains).
            let mut min = b"[".to_vec();
            min.extend_from_slice(prefix.as_bytes());
            let mut max = min.clone();
            max.push(0xFF);
            (min, max)
        };
        let keys: Vec<Vec<u8>> = redis::cmd("ZRANGEBYLEX")
            .arg(self.index())
            .arg(min)
            .arg(max)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.error(prefix, e))?;
        keys.into_iter().map(|k| String::from_utf8(k).map_err(|_| foreign(&self.index()))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn passwords_are_redacted_from_urls() {
        assert_eq!(
            redact_url("redis://:hunter2@127.0.0.1:6379/0"),
            "redis://[redacted]@127.0.0.1:6379/0"
        );
        assert_eq!(redact_url("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }
}
