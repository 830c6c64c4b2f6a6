//! Redis store: one round trip per operation, Cluster-safe keys, native TTL.
//!
//! # Layout
//!
//! Each [`StoreKey`] owns two Redis keys that share one hash tag, so a Lua
//! script may touch both on Redis Cluster:
//!
//! - `<prefix>:{<key>}`: a string holding the record: `f`, the 32-byte
//!   fingerprint and the holder's token while in flight, with a `PX` expiry
//!   equal to the lease; `c`, the fingerprint and the payload once
//!   completed, with a `PX` expiry equal to the TTL. One `SET ... PX`
//!   writes value and expiry together; Redis expires records on its own,
//!   there is nothing to sweep.
//! - `<prefix>:{<key>}:fence`: the last fencing token issued for the key.
//!   It outlives the record (its expiry is the record's plus a grace, one
//!   hour by default), so a claim after a release or an expiry still gets a
//!   higher token.
//!
//! A token is `max(last + 1, server TIME in microseconds)`: the counter keeps
//! tokens increasing if the server clock steps back, and the clock keeps
//! them increasing if the counter itself was evicted or expired.
//!
//! Braces and `%` in a key are percent-encoded before they go between the
//! braces, so a client key cannot move the hash tag.
//!
//! # Round trips
//!
//! [`Store::claim`], [`Store::complete`] and [`Store::release`] are each one
//! `EVALSHA` of a small Lua script, so a new request costs two round trips
//! (claim, complete) and a replay one (claim). The scripts are loaded when
//! the store connects; if the server lost them (a restart, `SCRIPT FLUSH`),
//! the first call after that reloads them once (`NOSCRIPT`, `SCRIPT LOAD`,
//! `EVALSHA`).
//!
//! # Failures
//!
//! Every operation is bounded by [`RedisOptions::op_timeout`] (300 ms by
//! default). A refused connection, a dropped one or no answer in time is
//! [`StoreError::Unavailable`], so a dead Redis costs the caller at most the
//! timeout; the [`ConnectionManager`] reconnects in the background and the
//! store works again as soon as the server is back. Note that a timed-out
//! `claim` may still have been applied by the server: the key then stays
//! claimed until its lease runs out, which is the safe direction.
//!
//! ```
//! use std::time::Duration;
//! use keel_idempotency::redis::{RedisOptions, RedisStore};
//! use keel_idempotency::store::{Claim, Fingerprint, Lease, Store, StoreKey};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # // Runs against the test server when one is configured (CI), else skips.
//! # let Ok(url) = std::env::var("KEEL_TEST_REDIS_URL") else { return Ok(()) };
//! # let prefix = keel_idempotency::conformance::unique_prefix();
//! let store = RedisStore::connect(&url, RedisOptions::default().prefix(&prefix)).await?;
//! let key = StoreKey::new("tenant1:POST:/orders:abc").unwrap();
//! let fp = Fingerprint([1; 32]);
//! let Claim::Acquired { token } = store.claim(&key, fp, Lease::freeing(Duration::from_secs(30))).await? else {
//!     panic!("a fresh key is free");
//! };
//! // A duplicate while the operation runs: come back later.
//! assert!(matches!(
//!     store.claim(&key, fp, Lease::freeing(Duration::from_secs(30))).await?,
//!     Claim::InFlight { .. }
//! ));
//! // ... run the operation, then keep its result for a minute ...
//! store.complete(&key, token, b"201 Created", Duration::from_secs(60)).await?;
//! // Retries replay it.
//! let Claim::Completed { payload, .. } = store.claim(&key, fp, Lease::freeing(Duration::from_secs(30))).await?
//! else {
//!     panic!("completed");
//! };
//! assert_eq!(payload, b"201 Created");
//! # let rec = store.record_key(&key);
//! # let mut conn = redis::Client::open(url.as_str())?.get_multiplexed_async_connection().await?;
//! # let _: i64 = redis::cmd("DEL").arg(&rec).arg(format!("{rec}:fence")).query_async(&mut conn).await?;
//! # Ok(())
//! # }
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use redis::Value;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::store::{
    BoxFuture, Claim, FencingToken, Fingerprint, Lease, Store, StoreError, StoreKey,
};

/// Settings of a [`RedisStore`]; configuration, separate from the running
/// store.
///
/// ```
/// use std::time::Duration;
/// use keel_idempotency::redis::RedisOptions;
///
/// let options = RedisOptions::default()
///     .prefix("payments-idem")
///     .op_timeout(Duration::from_millis(200))
///     .connections(2);
/// assert_eq!(options.prefix_str(), "payments-idem");
/// ```
#[derive(Clone, Debug)]
pub struct RedisOptions {
    prefix: String,
    op_timeout: Duration,
    fence_grace: Duration,
    connections: usize,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            prefix: "keel-idem".to_owned(),
            op_timeout: Duration::from_millis(300),
            fence_grace: Duration::from_secs(3600),
            connections: 1,
        }
    }
}

impl RedisOptions {
    /// The prefix of every key the store writes (default `keel-idem`):
    /// 1 to 64 printable ASCII characters without `{` or `}`. Checked when
    /// the store is built.
    ///
    /// ```
    /// # use keel_idempotency::redis::RedisOptions;
    /// assert_eq!(RedisOptions::default().prefix("a").prefix_str(), "a");
    /// ```
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The configured key prefix.
    ///
    /// ```
    /// # use keel_idempotency::redis::RedisOptions;
    /// assert_eq!(RedisOptions::default().prefix_str(), "keel-idem");
    /// ```
    pub fn prefix_str(&self) -> &str {
        &self.prefix
    }

    /// The most one operation may take, connecting included, before it
    /// fails with [`StoreError::Unavailable`] (default 300 ms).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use keel_idempotency::redis::RedisOptions;
    /// let o = RedisOptions::default().op_timeout(Duration::from_millis(50));
    /// ```
    pub fn op_timeout(mut self, timeout: Duration) -> Self {
        self.op_timeout = timeout;
        self
    }

    /// How long the per-key fence counter outlives the record (default one
    /// hour). Past it, tokens still increase thanks to the server clock.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use keel_idempotency::redis::RedisOptions;
    /// let o = RedisOptions::default().fence_grace(Duration::from_secs(600));
    /// ```
    pub fn fence_grace(mut self, grace: Duration) -> Self {
        self.fence_grace = grace;
        self
    }

    /// How many multiplexed connections [`RedisStore::connect`] opens
    /// (default 1, at least 1). Operations are spread over them round-robin,
    /// so no single connection's writer is a bottleneck.
    ///
    /// ```
    /// # use keel_idempotency::redis::RedisOptions;
    /// let o = RedisOptions::default().connections(4);
    /// ```
    pub fn connections(mut self, n: usize) -> Self {
        self.connections = n.max(1);
        self
    }
}

/// Why a [`RedisStore`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The URL could not be parsed.
    #[error("invalid Redis URL: {0}")]
    InvalidUrl(String),
    /// The key prefix is not usable.
    #[error(
        "invalid Redis key prefix {0:?}: use 1 to 64 printable ASCII characters without '{{' or '}}'"
    )]
    InvalidPrefix(String),
    /// The server could not be reached, or refused to load the scripts.
    #[error("cannot reach Redis: {0}")]
    Unavailable(String),
}

/// Claims, completes or releases keys with one Lua script call each.
///
/// Cheap to clone: clones share the connections.
///
/// ```no_run
/// use keel_idempotency::redis::{RedisOptions, RedisStore};
///
/// # async fn demo() -> Result<(), keel_idempotency::redis::SetupError> {
/// // Does not touch the network; connects on first use.
/// let lazy = RedisStore::lazy("redis://127.0.0.1:6379/", RedisOptions::default())?;
/// // Connects and loads the scripts now.
/// let eager = RedisStore::connect("redis://127.0.0.1:6379/", RedisOptions::default()).await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    conns: Vec<ConnectionManager>,
    next: AtomicUsize,
    prefix: String,
    op_timeout: Duration,
    fence_grace_ms: u64,
    scripts: Scripts,
}

struct Scripts {
    claim: redis::Script,
    complete: redis::Script,
    release: redis::Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.inner.prefix)
            .field("connections", &self.inner.conns.len())
            .field("op_timeout", &self.inner.op_timeout)
            .finish_non_exhaustive()
    }
}

// Record values: "f" .. fingerprint (32 bytes) .. token in flight,
// "c" .. fingerprint (32 bytes) .. payload once completed. A plain string
// (rather than a hash) lets one SET write value and expiry together and
// keeps each script to the fewest inner commands.

// KEYS[1] record, KEYS[2] fence; ARGV: fingerprint, lease ms, fence grace ms.
// Replies: {1, token} acquired, {2, record, pttl} in flight, {3, record}.
const CLAIM_LUA: &str = r"
local v = redis.call('GET', KEYS[1])
if v then
  local s = string.byte(v, 1)
  if s == 99 then
    return {3, v}
  elseif s == 102 then
    return {2, v, redis.call('PTTL', KEYS[1])}
  end
  return redis.error_reply('KEELCORRUPT unknown record state')
end
local now = redis.call('TIME')
local now_us = tonumber(now[1]) * 1000000 + tonumber(now[2])
local last = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
local token_s = string.format('%.0f', math.max(last + 1, now_us))
local fence_px = string.format('%.0f', tonumber(ARGV[2]) + tonumber(ARGV[3]))
redis.call('SET', KEYS[2], token_s, 'PX', fence_px)
redis.call('SET', KEYS[1], 'f' .. ARGV[1] .. token_s, 'PX', ARGV[2])
return {1, token_s}
";

// KEYS[1] record, KEYS[2] fence; ARGV: token, payload, ttl ms, grace ms.
const COMPLETE_LUA: &str = r"
local v = redis.call('GET', KEYS[1])
if not v or string.byte(v, 1) ~= 102 or string.sub(v, 34) ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], 'c' .. string.sub(v, 2, 33) .. ARGV[2], 'PX', ARGV[3])
redis.call('PEXPIRE', KEYS[2], string.format('%.0f', tonumber(ARGV[3]) + tonumber(ARGV[4])))
return 1
";

// KEYS[1] record; ARGV: token. The fence key stays, so the next token is
// higher.
const RELEASE_LUA: &str = r"
local v = redis.call('GET', KEYS[1])
if not v or string.byte(v, 1) ~= 102 or string.sub(v, 34) ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
return 1
";

impl RedisStore {
    /// Connects to `url` (e.g. `redis://127.0.0.1:6379/`), opening
    /// [`RedisOptions::connections`] connections and loading the scripts,
    /// within [`RedisOptions::op_timeout`] per step.
    ///
    /// ```no_run
    /// # use keel_idempotency::redis::{RedisOptions, RedisStore};
    /// # async fn demo() -> Result<(), keel_idempotency::redis::SetupError> {
    /// let store = RedisStore::connect("redis://127.0.0.1:6379/", RedisOptions::default()).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect(url: &str, options: RedisOptions) -> Result<Self, SetupError> {
        let store = Self::lazy(url, options)?;
        store.load_scripts().await?;
        Ok(store)
    }

    /// Builds the store without touching the network: connections open on
    /// first use, so a process can start while Redis is down and fail its
    /// operations with [`StoreError::Unavailable`] until Redis is back.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime: the connection manager spawns its
    /// reconnection task on the current runtime.
    ///
    /// ```
    /// use keel_idempotency::redis::{RedisOptions, RedisStore, SetupError};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let store = RedisStore::lazy("redis://127.0.0.1:1/", RedisOptions::default());
    /// assert!(store.is_ok());
    /// let bad = RedisStore::lazy("redis://h/", RedisOptions::default().prefix("a{b"));
    /// assert!(matches!(bad, Err(SetupError::InvalidPrefix(_))));
    /// # }
    /// ```
    pub fn lazy(url: &str, options: RedisOptions) -> Result<Self, SetupError> {
        validate_prefix(&options.prefix)?;
        let client = redis::Client::open(url).map_err(|e| SetupError::InvalidUrl(e.to_string()))?;
        // Retries stay short: the store's own timeout bounds each operation,
        // and a later operation starts a fresh reconnect anyway.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(options.op_timeout))
            .set_response_timeout(Some(options.op_timeout))
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(options.op_timeout);
        let conns = (0..options.connections)
            .map(|_| ConnectionManager::new_lazy_with_config(client.clone(), config.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| SetupError::InvalidUrl(e.to_string()))?;
        Ok(Self::build(conns, options))
    }

    /// Uses an existing [`ConnectionManager`] (for TLS, ACL users, custom
    /// retry settings...), loading the scripts through it.
    /// [`RedisOptions::connections`] is ignored: the store uses this one.
    ///
    /// ```no_run
    /// # use keel_idempotency::redis::{RedisOptions, RedisStore};
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// let client = redis::Client::open("redis://127.0.0.1:6379/")?;
    /// let manager = redis::aio::ConnectionManager::new(client).await?;
    /// let store = RedisStore::from_manager(manager, RedisOptions::default()).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn from_manager(
        manager: ConnectionManager,
        options: RedisOptions,
    ) -> Result<Self, SetupError> {
        validate_prefix(&options.prefix)?;
        let store = Self::build(vec![manager], options);
        store.load_scripts().await?;
        Ok(store)
    }

    fn build(conns: Vec<ConnectionManager>, options: RedisOptions) -> Self {
        Self {
            inner: Arc::new(Inner {
                conns,
                next: AtomicUsize::new(0),
                prefix: options.prefix,
                op_timeout: options.op_timeout,
                fence_grace_ms: millis(options.fence_grace),
                scripts: Scripts {
                    claim: redis::Script::new(CLAIM_LUA),
                    complete: redis::Script::new(COMPLETE_LUA),
                    release: redis::Script::new(RELEASE_LUA),
                },
            }),
        }
    }

    /// The key prefix this store writes under.
    ///
    /// ```
    /// # use keel_idempotency::redis::{RedisOptions, RedisStore};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let store = RedisStore::lazy("redis://127.0.0.1/", RedisOptions::default().prefix("p")).unwrap();
    /// assert_eq!(store.prefix(), "p");
    /// # }
    /// ```
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The Redis key of `key`'s record, e.g. `keel-idem:{abc}`; the fence
    /// counter is the same with `:fence` appended.
    ///
    /// ```
    /// # use keel_idempotency::redis::{RedisOptions, RedisStore};
    /// # use keel_idempotency::store::StoreKey;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let store = RedisStore::lazy("redis://127.0.0.1/", RedisOptions::default()).unwrap();
    /// let key = StoreKey::new("a{b}").unwrap();
    /// assert_eq!(store.record_key(&key), "keel-idem:{a%7Bb%7D}");
    /// # }
    /// ```
    pub fn record_key(&self, key: &StoreKey) -> String {
        record_key(&self.inner.prefix, key)
    }

    /// Loads the three scripts on every connection, so that later calls
    /// are a single `EVALSHA`.
    async fn load_scripts(&self) -> Result<(), SetupError> {
        for conn in &self.inner.conns {
            for script in [
                &self.inner.scripts.claim,
                &self.inner.scripts.complete,
                &self.inner.scripts.release,
            ] {
                let mut conn = conn.clone();
                let load = script.load_async(&mut conn);
                match tokio::time::timeout(self.inner.op_timeout, load).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(SetupError::Unavailable(e.to_string())),
                    Err(_) => {
                        return Err(SetupError::Unavailable(format!(
                            "no answer within {:?}",
                            self.inner.op_timeout
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    fn conn(&self) -> ConnectionManager {
        let i = self.inner.next.fetch_add(1, Ordering::Relaxed) % self.inner.conns.len();
        self.inner.conns[i].clone()
    }

    async fn eval(&self, invocation: redis::ScriptInvocation<'_>) -> Result<Value, StoreError> {
        let mut conn = self.conn();
        let call = invocation.invoke_async::<Value>(&mut conn);
        match tokio::time::timeout(self.inner.op_timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(map_error(&e)),
            Err(_) => Err(StoreError::Unavailable(format!(
                "redis: no answer within {:?}",
                self.inner.op_timeout
            ))),
        }
    }

    async fn claim_impl(
        &self,
        key: &StoreKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let rec = self.record_key(key);
        let fence = fence_key(&rec);
        let mut inv = self.inner.scripts.claim.prepare_invoke();
        inv.key(&rec)
            .key(&fence)
            .arg(&fingerprint.0[..])
            .arg(millis(lease))
            .arg(self.inner.fence_grace_ms);
        decode_claim(self.eval(inv).await?)
    }

    async fn complete_impl(
        &self,
        key: &StoreKey,
        token: FencingToken,
        payload: &[u8],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let rec = self.record_key(key);
        let fence = fence_key(&rec);
        let mut inv = self.inner.scripts.complete.prepare_invoke();
        inv.key(&rec)
            .key(&fence)
            .arg(token.0.to_string())
            .arg(payload)
            .arg(millis(ttl))
            .arg(self.inner.fence_grace_ms);
        decode_done(self.eval(inv).await?)
    }

    async fn release_impl(&self, key: &StoreKey, token: FencingToken) -> Result<(), StoreError> {
        let rec = self.record_key(key);
        let mut inv = self.inner.scripts.release.prepare_invoke();
        inv.key(&rec).arg(token.0.to_string());
        decode_done(self.eval(inv).await?)
    }
}

impl Store for RedisStore {
    fn claim<'a>(
        &'a self,
        key: &'a StoreKey,
        fingerprint: Fingerprint,
        lease: Lease,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        Box::pin(self.claim_impl(key, fingerprint, lease.hold))
    }

    // TEMPORARY (issue 12 in progress): replaced by the store's own renew,
    // inspect and remove before this lands.
    fn renew<'a>(
        &'a self,
        _key: &'a StoreKey,
        _token: FencingToken,
        _lease: Lease,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async { Err(StoreError::Unavailable("renew: not implemented".into())) })
    }

    fn inspect<'a>(
        &'a self,
        _key: &'a StoreKey,
    ) -> BoxFuture<'a, Result<Option<crate::store::KeyState>, StoreError>> {
        Box::pin(async { Err(StoreError::Unavailable("inspect: not implemented".into())) })
    }

    fn remove<'a>(&'a self, _key: &'a StoreKey) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async { Err(StoreError::Unavailable("remove: not implemented".into())) })
    }

    fn complete<'a>(
        &'a self,
        key: &'a StoreKey,
        token: FencingToken,
        payload: &'a [u8],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.complete_impl(key, token, payload, ttl))
    }

    fn release<'a>(
        &'a self,
        key: &'a StoreKey,
        token: FencingToken,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.release_impl(key, token))
    }

    fn name(&self) -> &'static str {
        "redis"
    }
}

fn validate_prefix(prefix: &str) -> Result<(), SetupError> {
    let ok = !prefix.is_empty()
        && prefix.len() <= 64
        && prefix
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'{' && b != b'}');
    if ok {
        Ok(())
    } else {
        Err(SetupError::InvalidPrefix(prefix.to_owned()))
    }
}

/// `<prefix>:{<escaped key>}`. Escaping `{`, `}` and `%` keeps the hash tag
/// exactly the escaped key (never empty, never cut short by a `}` inside
/// the key), and is injective, so two keys never share a record.
fn record_key(prefix: &str, key: &StoreKey) -> String {
    let mut out = String::with_capacity(prefix.len() + key.as_str().len() + 8);
    out.push_str(prefix);
    out.push_str(":{");
    for c in key.as_str().chars() {
        match c {
            '{' => out.push_str("%7B"),
            '}' => out.push_str("%7D"),
            '%' => out.push_str("%25"),
            c => out.push(c),
        }
    }
    out.push('}');
    out
}

fn fence_key(record_key: &str) -> String {
    format!("{record_key}:fence")
}

/// Whole milliseconds, rounded up so a sub-millisecond lease still expires
/// later than now, at least 1 (Redis refuses `PX 0`) and at most ten years,
/// so sums computed in Lua (whose numbers are doubles) stay exact integers.
fn millis(d: Duration) -> u64 {
    const CAP: u128 = 10 * 365 * 24 * 3600 * 1000;
    let ms = d.as_nanos().div_ceil(1_000_000).clamp(1, CAP);
    u64::try_from(ms).unwrap_or(1)
}

fn map_error(e: &redis::RedisError) -> StoreError {
    // WRONGTYPE means someone else's data lives under our key, and
    // KEELCORRUPT is the claim script finding a record it did not write:
    // waiting will not fix either. Everything else (I/O, LOADING, READONLY
    // after a failover, OOM, MASTERDOWN...) is the server being unable to
    // serve right now.
    match e.code() {
        Some("WRONGTYPE" | "KEELCORRUPT") => StoreError::Corrupt(format!("redis: {e}")),
        _ => StoreError::Unavailable(format!("redis: {e}")),
    }
}

fn corrupt(what: &str, value: &Value) -> StoreError {
    StoreError::Corrupt(format!("redis: unexpected {what} reply {value:?}"))
}

fn decode_claim(value: Value) -> Result<Claim, StoreError> {
    let Value::Array(items) = value else {
        return Err(corrupt("claim", &value));
    };
    let mut items = items.into_iter();
    match (items.next(), items.next(), items.next()) {
        (Some(Value::Int(1)), Some(token), None) => {
            let token = as_u64(&token).ok_or_else(|| corrupt("claim token", &token))?;
            Ok(Claim::Acquired {
                token: FencingToken(token),
            })
        }
        (Some(Value::Int(2)), Some(Value::BulkString(record)), Some(Value::Int(pttl))) => {
            let fingerprint = record_fingerprint(&record)?;
            // PTTL can read 0 in the last millisecond; -1 would mean a
            // record without expiry, which this store never writes.
            if pttl == -1 {
                return Err(StoreError::Corrupt(
                    "redis: in-flight record without expiry".to_owned(),
                ));
            }
            let ms = u64::try_from(pttl).unwrap_or(0).max(1);
            Ok(Claim::InFlight {
                fingerprint,
                retry_after: Duration::from_millis(ms),
            })
        }
        (Some(Value::Int(3)), Some(Value::BulkString(mut record)), None) => {
            let fingerprint = record_fingerprint(&record)?;
            // The payload is the rest: shift it down in place rather than
            // copy a possibly large body.
            record.drain(..RECORD_HEADER);
            Ok(Claim::Completed {
                fingerprint,
                payload: record,
            })
        }
        (kind, record, extra) => Err(StoreError::Corrupt(format!(
            "redis: unexpected claim reply {kind:?} {record:?} {extra:?}"
        ))),
    }
}

/// State byte plus fingerprint, in front of the token or payload.
const RECORD_HEADER: usize = 33;

fn record_fingerprint(record: &[u8]) -> Result<Fingerprint, StoreError> {
    record
        .get(1..RECORD_HEADER)
        .and_then(|fp| <[u8; 32]>::try_from(fp).ok())
        .map(Fingerprint)
        .ok_or_else(|| StoreError::Corrupt("redis: record shorter than its header".to_owned()))
}

fn decode_done(value: Value) -> Result<(), StoreError> {
    match value {
        Value::Int(1) => Ok(()),
        Value::Int(0) => Err(StoreError::Fenced),
        other => Err(corrupt("complete/release", &other)),
    }
}

fn as_u64(value: &Value) -> Option<u64> {
    match value {
        Value::Int(i) => u64::try_from(*i).ok(),
        Value::BulkString(s) => std::str::from_utf8(s).ok()?.parse().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CRC16/XMODEM over the hash tag, as Redis Cluster computes slots.
    fn slot(key: &str) -> u16 {
        let bytes = key.as_bytes();
        let tagged = bytes.iter().position(|&b| b == b'{').and_then(|open| {
            let close = bytes[open + 1..].iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &bytes[open + 1..open + 1 + close])
        });
        let mut crc: u16 = 0;
        for &b in tagged.unwrap_or(bytes) {
            crc ^= u16::from(b) << 8;
            for _ in 0..8 {
                crc = if crc & 0x8000 != 0 {
                    (crc << 1) ^ 0x1021
                } else {
                    crc << 1
                };
            }
        }
        crc % 16384
    }

    #[test]
    fn crc16_matches_redis_reference() {
        // From the Redis Cluster specification: CRC16 of "123456789" is 0x31C3.
        assert_eq!(slot("123456789"), 0x31C3);
        assert_eq!(slot("{user1000}.following"), slot("{user1000}.followers"));
    }

    #[test]
    fn record_and_fence_share_a_slot_whatever_the_key() {
        for raw in ["abc", "}x", "{", "}", "a}b{c", "%7B", "{}", "t:POST:/o:{k}"] {
            let key = StoreKey::new(raw).expect("valid key");
            let rec = record_key("p", &key);
            assert_eq!(slot(&rec), slot(&fence_key(&rec)), "key {raw:?} -> {rec}");
        }
    }

    #[test]
    fn escaping_is_injective() {
        let a = record_key("p", &StoreKey::new("%7B").expect("valid"));
        let b = record_key("p", &StoreKey::new("{").expect("valid"));
        assert_ne!(a, b);
    }

    #[test]
    fn prefixes_are_validated() {
        assert!(validate_prefix("keel-idem").is_ok());
        for bad in ["", "a{", "b}", "with space", &"x".repeat(65)] {
            assert!(validate_prefix(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn millis_rounds_up_and_is_never_zero() {
        assert_eq!(millis(Duration::ZERO), 1);
        assert_eq!(millis(Duration::from_micros(1)), 1);
        assert_eq!(millis(Duration::from_micros(1500)), 2);
        assert_eq!(millis(Duration::from_secs(2)), 2000);
        assert_eq!(millis(Duration::MAX), 10 * 365 * 24 * 3600 * 1000);
    }

    #[test]
    fn malformed_replies_are_corrupt_not_panics() {
        let bad = [
            Value::Nil,
            Value::Array(vec![]),
            Value::Array(vec![Value::Int(1), Value::Int(-5)]),
            Value::Array(vec![
                Value::Int(2),
                Value::BulkString(vec![b'f'; 3]),
                Value::Int(5),
            ]),
            Value::Array(vec![
                Value::Int(2),
                Value::BulkString(vec![b'f'; 40]),
                Value::Int(-1),
            ]),
            Value::Array(vec![Value::Int(3), Value::BulkString(vec![b'c'; 10])]),
            Value::Array(vec![Value::Int(3), Value::Nil]),
            Value::Array(vec![Value::Int(9)]),
        ];
        for v in bad {
            assert!(
                matches!(decode_claim(v.clone()), Err(StoreError::Corrupt(_))),
                "{v:?}"
            );
        }
        let mut record = vec![b'c'];
        record.extend([7; 32]);
        record.extend(b"body");
        assert_eq!(
            decode_claim(Value::Array(vec![Value::Int(3), Value::BulkString(record)]))
                .expect("valid"),
            Claim::Completed {
                fingerprint: Fingerprint([7; 32]),
                payload: b"body".to_vec()
            }
        );
        assert!(matches!(
            decode_done(Value::Nil),
            Err(StoreError::Corrupt(_))
        ));
        assert!(matches!(
            decode_done(Value::Int(0)),
            Err(StoreError::Fenced)
        ));
    }
}
