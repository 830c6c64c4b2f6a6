//! Redis store: one round trip per operation, Redis Cluster, native TTL.
//!
//! # Layout
//!
//! Each [`StoreKey`] owns two Redis keys that share one hash tag, so a Lua
//! script may touch both on Redis Cluster:
//!
//! - `<prefix>:{<key>}`: a string holding the record, with a `PX` expiry:
//!   - a claim: `h`, the 32-byte fingerprint, the lapse mode (`L` the lapse
//!     locks the key, `F` it frees it), the lease deadline in milliseconds
//!     of the server's clock, `:` and the holder's token (decimal). Its
//!     expiry is the record life, [`Lease::record_life`]: the hold plus the
//!     lock time under [`Lapse::Lock`], the hold alone under [`Lapse::Free`];
//!   - a result: `c`, the fingerprint and the payload, expiring after the
//!     TTL given to [`Store::complete`].
//!
//!   One `SET ... PX` writes value and expiry together; Redis expires
//!   records on its own, there is nothing to sweep.
//! - `<prefix>:{<key>}:fence`: the last fencing token issued for the key.
//!   It outlives the record (its expiry is the record's plus a grace, one
//!   hour by default, set again on every claim, renewal and completion), so
//!   a claim after a release, a lapse, an expiry or a removal still gets a
//!   higher token.
//!
//! A token is `max(last + 1, server TIME in microseconds)`: the counter keeps
//! tokens increasing if the server clock steps back, and the clock keeps
//! them increasing if the counter itself was evicted or expired.
//!
//! Braces and `%` in a key are percent-encoded before they go between the
//! braces, so a client key cannot move the hash tag.
//!
//! # Leases and lapses
//!
//! Every script reads the time with `TIME` on the server, never the
//! client's clock, so instances whose clocks disagree still agree on when a
//! lease ends. A claim whose deadline is ahead is live: a duplicate gets
//! [`Claim::InFlight`], and only its holder may [renew](Store::renew),
//! [complete](Store::complete) or [release](Store::release) it. Once the
//! deadline has passed, the holder is [fenced](StoreError::Fenced), and the
//! record, still there under [`Lapse::Lock`] until its expiry, answers every
//! claim with [`Claim::Abandoned`]; under [`Lapse::Free`] it expires with
//! the lease (a record caught in its last millisecond counts as free).
//! [`Store::remove`] deletes the record but leaves the fence.
//!
//! ```
//! use std::time::Duration;
//! use keel_idempotency::redis::{RedisOptions, RedisStore};
//! use keel_idempotency::store::{Claim, Fingerprint, KeyState, Lease, Store, StoreKey};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let Ok(url) = std::env::var("KEEL_TEST_REDIS_URL") else { return Ok(()) };
//! # let prefix = keel_idempotency::conformance::unique_prefix();
//! let store = RedisStore::connect(&url, RedisOptions::default().prefix(&prefix)).await?;
//! let key = StoreKey::new("tenant1:POST:/payments:k1").unwrap();
//! // Held for 10 s at a time; if the holder vanishes, the key stays locked
//! // for a day rather than let a retry charge the card twice.
//! let lease = Lease::locking(Duration::from_secs(10), Duration::from_secs(86_400));
//! let Claim::Acquired { token } = store.claim(&key, Fingerprint::from_bytes([1; 32]), lease).await? else {
//!     panic!("a fresh key is free");
//! };
//! store.renew(&key, token, lease).await?; // still working: 10 s more
//! assert!(matches!(store.inspect(&key).await?, Some(KeyState::Held { token: t, .. }) if t == token));
//! // An operator who reconciled the key by hand frees it; a later claim
//! // gets a higher token, so the old holder stays fenced.
//! assert!(store.remove(&key).await?);
//! let Claim::Acquired { token: next } = store.claim(&key, Fingerprint::from_bytes([1; 32]), lease).await? else {
//!     panic!("removed keys are free");
//! };
//! assert!(next > token);
//! # store.remove(&key).await?;
//! # Ok(())
//! # }
//! ```
//!
//! Claims written by a version of this store from before lapse-locking (`f`,
//! fingerprint, token; expiring with the lease) are still read, as held
//! freeing claims, so an upgrade may happen while requests are in flight.
//! The other way round does not work: an older instance reads the new
//! claims as corrupt, so upgrade every instance sharing a prefix together.
//!
//! # Round trips
//!
//! Every operation ([`Store::claim`], [`Store::renew`], [`Store::complete`],
//! [`Store::release`], [`Store::inspect`], [`Store::remove`]) is one
//! `EVALSHA` of a small Lua script, so a new request costs two round trips
//! (claim, complete) plus one per renewal, and a replay one (claim). The
//! scripts are loaded when the store connects; if the server lost them (a
//! restart, `SCRIPT FLUSH`), the first call after that reloads them once
//! (`NOSCRIPT`, `SCRIPT LOAD`, `EVALSHA`).
//!
//! # Failures
//!
//! Every operation is bounded by [`RedisOptions::op_timeout`] (300 ms by
//! default). A refused connection, a dropped one or no answer in time is
//! [`StoreError::Unavailable`], so a dead Redis costs the caller at most the
//! timeout; the [`ConnectionManager`] (or the cluster connection)
//! reconnects in the background and the store works again as soon as the
//! server is back. Note that a timed-out
//! `claim` may still have been applied by the server: the key then stays
//! claimed until its lease runs out, which is the safe direction.
//!
//! A server at `maxmemory` under the `noeviction` policy answers writes
//! with `OOM`: claims, renewals and completions then fail with
//! [`StoreError::Full`], while replays, in-flight answers, inspection,
//! release and removal (reads and deletes) keep working.
//!
//! # Redis Cluster
//!
//! [`RedisStore::connect_cluster`] (or [`RedisStore::lazy_cluster`],
//! [`RedisStore::from_cluster`]) takes the URLs of some of the cluster's
//! nodes and runs the same scripts over the `redis` crate's cluster
//! connection: each call goes to the primary owning its key's slot (the
//! record and the fence share a hash tag, so one slot), redirections
//! (`MOVED`, `ASK`) after a resharding or failover are followed within
//! [`RedisOptions::op_timeout`], and the scripts are loaded on every
//! primary. Keys spread over all primaries.
//!
//! ```no_run
//! use keel_idempotency::redis::{RedisOptions, RedisStore};
//!
//! # async fn demo() -> Result<(), keel_idempotency::redis::SetupError> {
//! let store = RedisStore::connect_cluster(
//!     ["redis://10.0.0.1:6379/", "redis://10.0.0.2:6379/"],
//!     RedisOptions::default().prefix("payments-idem"),
//! )
//! .await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Consistency
//!
//! Each operation is atomic on the primary that runs it, and two callers
//! never both acquire a key, nor does a fenced holder overwrite it, as long
//! as that primary keeps what it acknowledged. It may not:
//!
//! - Replication is asynchronous. When a primary fails and a replica is
//!   promoted (Sentinel, a Cluster failover, a managed service's failover),
//!   writes the old primary acknowledged but had not yet sent to the
//!   replica are lost: a claim (a retry then acquires the key and runs the
//!   operation again), a renewal, or a result (the holder was told it was
//!   stored; a retry runs the operation again).
//! - Persistence decides what a restart of the same server keeps: without
//!   persistence, nothing; with RDB snapshots, what the last snapshot held;
//!   with AOF and `appendfsync everysec` (the usual setting), all but about
//!   the last second. Only AOF with `appendfsync always` keeps every
//!   acknowledged write across a crash, at a cost in latency.
//! - Lease deadlines are on the clock of the primary that wrote them, and
//!   are read on the clock of the primary that serves the key next: after
//!   a failover, a skew between the two clocks shortens or lengthens the
//!   leases live at that moment (keep the servers on NTP). A step of one
//!   server's clock does the same to its own leases; tokens keep
//!   increasing regardless.
//! - An eviction policy other than `noeviction` lets Redis drop records
//!   before their time when memory runs short (every record has an expiry,
//!   so `volatile-*` policies take them too). Use `noeviction`: a full
//!   server then refuses new claims ([`StoreError::Full`]) instead of
//!   forgetting results.
//!
//! Redis's `WAIT numreplicas timeout`, sent after each write, would narrow
//! the failover window to writes not yet on that many replicas; the store
//! does not send it today (it would be an option, at one more round trip
//! per write), so a deployment that cannot afford a second execution after
//! a failover needs a store with synchronous durability (PostgreSQL with
//! synchronous replication) instead.
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
//! let fp = Fingerprint::from_bytes([1; 32]);
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

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

use crate::store::{
    BoxFuture, Claim, FencingToken, Fingerprint, KeyState, Lapse, Lease, Store, StoreError,
    StoreKey,
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

    /// How many multiplexed connections [`RedisStore::connect`] opens, or
    /// cluster connections (each with one connection per node)
    /// [`RedisStore::connect_cluster`] opens (default 1, at least 1).
    /// Operations are spread over them round-robin, so no single
    /// connection's writer is a bottleneck.
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

/// Claims, renews, completes, releases, inspects or removes keys with one
/// Lua script call each.
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
    conns: Vec<Conn>,
    next: AtomicUsize,
    prefix: String,
    op_timeout: Duration,
    fence_grace_ms: u64,
    scripts: Scripts,
}

struct Scripts {
    claim: redis::Script,
    renew: redis::Script,
    complete: redis::Script,
    release: redis::Script,
    inspect: redis::Script,
    remove: redis::Script,
}

impl Scripts {
    fn new() -> Self {
        let script = |body: &str| redis::Script::new(&[PRELUDE_LUA, body].concat());
        Self {
            claim: script(CLAIM_LUA),
            renew: script(RENEW_LUA),
            complete: script(COMPLETE_LUA),
            release: script(RELEASE_LUA),
            inspect: script(INSPECT_LUA),
            remove: script(REMOVE_LUA),
        }
    }

    fn all(&self) -> [&redis::Script; 6] {
        [
            &self.claim,
            &self.renew,
            &self.complete,
            &self.release,
            &self.inspect,
            &self.remove,
        ]
    }
}

/// One connection of the store: to a single server (or a primary behind a
/// proxy or Sentinel-managed address), or to a whole Redis Cluster, which
/// routes each script call to the primary owning its keys' slot and follows
/// `MOVED`/`ASK` redirections.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

// Delegation, so that `redis::Script` (EVALSHA, and SCRIPT LOAD after a
// NOSCRIPT) runs the same way over either kind of connection.
impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.inner.prefix)
            .field(
                "cluster",
                &matches!(self.inner.conns.first(), Some(Conn::Cluster(_))),
            )
            .field("connections", &self.inner.conns.len())
            .field("op_timeout", &self.inner.op_timeout)
            .finish_non_exhaustive()
    }
}

// Record values (a plain string rather than a hash, so one SET writes
// value and expiry together and each script needs the fewest inner
// commands):
//
//   'h' .. fingerprint (32 bytes) .. mode .. deadline .. ':' .. token
//        a claim; mode 'L' (its lapse locks the key) or 'F' (frees it);
//        deadline is the end of the lease in server milliseconds;
//   'c' .. fingerprint (32 bytes) .. payload
//        a completed result;
//   'f' .. fingerprint (32 bytes) .. token
//        a claim written by a version without lapse-locking: held, under a
//        freeing lease, for as long as the key lives.
//
// Every script starts with this prelude (Lua numbers are doubles: server
// microseconds, about 2^51 today, and the ten-year caps stay exact).
const PRELUDE_LUA: &str = r"
local function fmt(n) return string.format('%.0f', n) end
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
-- A claim record's mode, lease deadline (server ms) and token, or nil if
-- the record is not a claim.
local function claim_of(key, v, now_ms)
  local s = string.byte(v, 1)
  if s == 104 then
    local mode, deadline, token = string.match(v, '^([LF])(%d+):(%d+)$', 34)
    if mode then return mode, tonumber(deadline), token end
  elseif s == 102 and string.len(v) > 33 then
    return 'F', now_ms + redis.call('PTTL', key), string.sub(v, 34)
  end
  return nil
end
-- The record of a live claim held by exactly token, or nil.
local function held(key, token, now_ms)
  local v = redis.call('GET', key)
  if not v then return nil end
  local mode, deadline, t = claim_of(key, v, now_ms)
  if mode and t == token and deadline > now_ms then return v end
  return nil
end
-- Keeps the fence at least the holder's token, alive for px ms, so tokens
-- stay ahead of this one after the record goes.
local function keep_fence(key, token, px)
  local last = tonumber(redis.call('GET', key) or '0') or 0
  redis.call('SET', key, fmt(math.max(last, tonumber(token))), 'PX', px)
end
";

// KEYS[1] record, KEYS[2] fence; ARGV: fingerprint, hold ms, mode ('L' or
// 'F'), lock ms (0 for 'F'), fence grace ms.
// Replies: {1, token} acquired, {2, record, lease ms left} in flight,
// {3, record} completed, {4, record} abandoned.
const CLAIM_LUA: &str = r"
local now = now_us()
local now_ms = math.floor(now / 1000)
local v = redis.call('GET', KEYS[1])
if v then
  if string.byte(v, 1) == 99 then
    return {3, v}
  end
  local mode, deadline = claim_of(KEYS[1], v, now_ms)
  if not mode then
    return redis.error_reply('KEELCORRUPT unknown record state')
  end
  if deadline > now_ms then
    return {2, v, deadline - now_ms}
  end
  if mode == 'L' then
    return {4, v}
  end
  -- A freeing lease that lapsed: the key is free.
end
local last = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
local token = fmt(math.max(last + 1, now))
local hold = tonumber(ARGV[2])
local life = hold + tonumber(ARGV[4])
redis.call('SET', KEYS[2], token, 'PX', fmt(life + tonumber(ARGV[5])))
redis.call('SET', KEYS[1], 'h' .. ARGV[1] .. ARGV[3] .. fmt(now_ms + hold) .. ':' .. token,
  'PX', fmt(life))
return {1, token}
";

// KEYS[1] record, KEYS[2] fence; ARGV: token, hold ms, mode, lock ms,
// fence grace ms. Replies 1 renewed, 0 fenced.
const RENEW_LUA: &str = r"
local now_ms = math.floor(now_us() / 1000)
local v = held(KEYS[1], ARGV[1], now_ms)
if not v then
  return 0
end
local hold = tonumber(ARGV[2])
local life = hold + tonumber(ARGV[4])
redis.call('SET', KEYS[1],
  'h' .. string.sub(v, 2, 33) .. ARGV[3] .. fmt(now_ms + hold) .. ':' .. ARGV[1], 'PX', fmt(life))
keep_fence(KEYS[2], ARGV[1], fmt(life + tonumber(ARGV[5])))
return 1
";

// KEYS[1] record, KEYS[2] fence; ARGV: token, payload, ttl ms, grace ms.
// Replies 1 completed, 0 fenced.
const COMPLETE_LUA: &str = r"
local v = held(KEYS[1], ARGV[1], math.floor(now_us() / 1000))
if not v then
  return 0
end
redis.call('SET', KEYS[1], 'c' .. string.sub(v, 2, 33) .. ARGV[2], 'PX', ARGV[3])
keep_fence(KEYS[2], ARGV[1], fmt(tonumber(ARGV[3]) + tonumber(ARGV[4])))
return 1
";

// KEYS[1] record; ARGV: token. Replies 1 released, 0 fenced. The fence key
// stays (it outlives the record by the grace), so the next token is higher.
const RELEASE_LUA: &str = r"
if not held(KEYS[1], ARGV[1], math.floor(now_us() / 1000)) then
  return 0
end
redis.call('DEL', KEYS[1])
return 1
";

// KEYS[1] record. Replies 0 free, {2, record, lease ms left} held,
// {3, record, pttl} completed, {4, record, pttl} abandoned.
const INSPECT_LUA: &str = r"
local v = redis.call('GET', KEYS[1])
if not v then
  return 0
end
if string.byte(v, 1) == 99 then
  return {3, v, redis.call('PTTL', KEYS[1])}
end
local now_ms = math.floor(now_us() / 1000)
local mode, deadline = claim_of(KEYS[1], v, now_ms)
if not mode then
  return redis.error_reply('KEELCORRUPT unknown record state')
end
if deadline > now_ms then
  return {2, v, deadline - now_ms}
end
if mode == 'L' then
  return {4, v, redis.call('PTTL', KEYS[1])}
end
return 0
";

// KEYS[1] record. Replies 1 if something live was removed, else 0. The
// fence is left as it is: claim, renew and complete keep it alive for the
// grace past the record's own expiry, so the next claim's token is higher
// than any issued. A record of unknown state is removed too (and counts):
// that is how an operator clears foreign data from under the prefix.
const REMOVE_LUA: &str = r"
local v = redis.call('GET', KEYS[1])
if not v then
  return 0
end
local live = 1
if string.byte(v, 1) ~= 99 then
  local now_ms = math.floor(now_us() / 1000)
  local mode, deadline = claim_of(KEYS[1], v, now_ms)
  if mode == 'F' and deadline <= now_ms then
    live = 0
  end
end
redis.call('DEL', KEYS[1])
return live
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
            .map(|_| {
                ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
                    .map(Conn::Single)
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| SetupError::InvalidUrl(e.to_string()))?;
        Ok(Self::build(conns, options))
    }

    /// Connects to a Redis Cluster through `nodes`, the URLs of some of its
    /// nodes (`redis://host:port/`; one reachable node is enough, the rest
    /// of the cluster is discovered from it), opening
    /// [`RedisOptions::connections`] cluster connections and loading the
    /// scripts on every primary, within [`RedisOptions::op_timeout`] per
    /// step. The URLs are those [`redis::cluster::ClusterClient::new`]
    /// takes: all with the same user and password, no database number.
    ///
    /// Both Redis keys of a [`StoreKey`] carry one hash tag, so each script
    /// call runs on the one primary that owns the key's slot, and keys
    /// spread over every primary. See [Consistency](self#consistency) for
    /// what a failover may lose.
    ///
    /// ```no_run
    /// # use keel_idempotency::redis::{RedisOptions, RedisStore};
    /// # async fn demo() -> Result<(), keel_idempotency::redis::SetupError> {
    /// let store = RedisStore::connect_cluster(
    ///     ["redis://10.0.0.1:6379/", "redis://10.0.0.2:6379/", "redis://10.0.0.3:6379/"],
    ///     RedisOptions::default().prefix("payments-idem"),
    /// )
    /// .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect_cluster<I>(nodes: I, options: RedisOptions) -> Result<Self, SetupError>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let store = Self::lazy_cluster(nodes, options)?;
        store.load_scripts().await?;
        Ok(store)
    }

    /// Like [`RedisStore::connect_cluster`], without touching the network:
    /// the cluster's slots are fetched in the background and on first use,
    /// and operations fail with [`StoreError::Unavailable`] until some node
    /// answers.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime: each cluster connection spawns its task on
    /// the current runtime.
    ///
    /// ```
    /// use keel_idempotency::redis::{RedisOptions, RedisStore, SetupError};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let store = RedisStore::lazy_cluster(
    ///     ["redis://127.0.0.1:7001/", "redis://127.0.0.1:7002/"],
    ///     RedisOptions::default(),
    /// );
    /// assert!(store.is_ok());
    /// let none = RedisStore::lazy_cluster(Vec::<String>::new(), RedisOptions::default());
    /// assert!(matches!(none, Err(SetupError::InvalidUrl(_))));
    /// # }
    /// ```
    pub fn lazy_cluster<I>(nodes: I, options: RedisOptions) -> Result<Self, SetupError>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        validate_prefix(&options.prefix)?;
        let nodes: Vec<String> = nodes.into_iter().map(|n| n.as_ref().to_owned()).collect();
        // As for a single server, retries stay within the store's own
        // timeout; the cluster client also spends them following a slot
        // that moved (MOVED, ASK) or waiting out TRYAGAIN.
        let max_wait_ms = u64::try_from(options.op_timeout.as_millis()).unwrap_or(u64::MAX);
        let client = ClusterClientBuilder::new(nodes)
            .connection_timeout(options.op_timeout)
            .response_timeout(options.op_timeout)
            .retries(2)
            .min_retry_wait(10)
            .max_retry_wait(max_wait_ms)
            .build()
            .map_err(|e| SetupError::InvalidUrl(e.to_string()))?;
        let config = ClusterConfig::new()
            .set_connection_timeout(options.op_timeout)
            .set_response_timeout(options.op_timeout);
        let conns = (0..options.connections)
            .map(|_| Conn::Cluster(client.get_pending_async_connection_with_config(config.clone())))
            .collect();
        Ok(Self::build(conns, options))
    }

    /// Uses an existing cluster connection (for TLS, ACL users, custom
    /// retry settings...), loading the scripts on every primary through it.
    /// [`RedisOptions::connections`] is ignored: the store uses this one.
    ///
    /// ```no_run
    /// # use keel_idempotency::redis::{RedisOptions, RedisStore};
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// let client = redis::cluster::ClusterClient::builder(["redis://10.0.0.1:6379/"])
    ///     .username("idem")
    ///     .password("secret")
    ///     .build()?;
    /// let conn = client.get_async_connection().await?;
    /// let store = RedisStore::from_cluster(conn, RedisOptions::default()).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn from_cluster(
        conn: ClusterConnection,
        options: RedisOptions,
    ) -> Result<Self, SetupError> {
        validate_prefix(&options.prefix)?;
        let store = Self::build(vec![Conn::Cluster(conn)], options);
        store.load_scripts().await?;
        Ok(store)
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
        let store = Self::build(vec![Conn::Single(manager)], options);
        store.load_scripts().await?;
        Ok(store)
    }

    fn build(conns: Vec<Conn>, options: RedisOptions) -> Self {
        Self {
            inner: Arc::new(Inner {
                conns,
                next: AtomicUsize::new(0),
                prefix: options.prefix,
                op_timeout: options.op_timeout,
                fence_grace_ms: millis(options.fence_grace),
                scripts: Scripts::new(),
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

    /// Loads the scripts on every connection (on a cluster, `SCRIPT LOAD`
    /// goes to every primary), so that later calls are a single `EVALSHA`.
    async fn load_scripts(&self) -> Result<(), SetupError> {
        for conn in &self.inner.conns {
            for script in self.inner.scripts.all() {
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

    fn conn(&self) -> Conn {
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
        lease: Lease,
    ) -> Result<Claim, StoreError> {
        let rec = self.record_key(key);
        let fence = fence_key(&rec);
        let terms = LeaseArgs::of(lease);
        let mut inv = self.inner.scripts.claim.prepare_invoke();
        inv.key(&rec)
            .key(&fence)
            .arg(&fingerprint.as_bytes()[..])
            .arg(terms.hold_ms)
            .arg(terms.mode)
            .arg(terms.lock_ms)
            .arg(self.inner.fence_grace_ms);
        decode_claim(self.eval(inv).await?)
    }

    async fn renew_impl(
        &self,
        key: &StoreKey,
        token: FencingToken,
        lease: Lease,
    ) -> Result<(), StoreError> {
        let rec = self.record_key(key);
        let fence = fence_key(&rec);
        let terms = LeaseArgs::of(lease);
        let mut inv = self.inner.scripts.renew.prepare_invoke();
        inv.key(&rec)
            .key(&fence)
            .arg(token.get().to_string())
            .arg(terms.hold_ms)
            .arg(terms.mode)
            .arg(terms.lock_ms)
            .arg(self.inner.fence_grace_ms);
        decode_done(self.eval(inv).await?)
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
            .arg(token.get().to_string())
            .arg(payload)
            .arg(millis(ttl))
            .arg(self.inner.fence_grace_ms);
        decode_done(self.eval(inv).await?)
    }

    async fn release_impl(&self, key: &StoreKey, token: FencingToken) -> Result<(), StoreError> {
        let rec = self.record_key(key);
        let mut inv = self.inner.scripts.release.prepare_invoke();
        inv.key(&rec).arg(token.get().to_string());
        decode_done(self.eval(inv).await?)
    }

    async fn inspect_impl(&self, key: &StoreKey) -> Result<Option<KeyState>, StoreError> {
        let rec = self.record_key(key);
        let mut inv = self.inner.scripts.inspect.prepare_invoke();
        inv.key(&rec);
        decode_inspect(self.eval(inv).await?)
    }

    async fn remove_impl(&self, key: &StoreKey) -> Result<bool, StoreError> {
        let rec = self.record_key(key);
        let mut inv = self.inner.scripts.remove.prepare_invoke();
        inv.key(&rec);
        match self.eval(inv).await? {
            Value::Int(1) => Ok(true),
            Value::Int(0) => Ok(false),
            other => Err(corrupt("remove", &other)),
        }
    }
}

/// A [`Lease`] as the scripts take it: whole milliseconds and a mode byte.
struct LeaseArgs {
    hold_ms: u64,
    mode: &'static str,
    lock_ms: u64,
}

impl LeaseArgs {
    fn of(lease: Lease) -> Self {
        let (mode, lock_ms) = match lease.lapse {
            Lapse::Lock(lock_for) => ("L", millis(lock_for)),
            Lapse::Free => ("F", 0),
        };
        Self {
            hold_ms: millis(lease.hold),
            mode,
            lock_ms,
        }
    }
}

impl Store for RedisStore {
    fn claim<'a>(
        &'a self,
        key: &'a StoreKey,
        fingerprint: Fingerprint,
        lease: Lease,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        Box::pin(self.claim_impl(key, fingerprint, lease))
    }

    fn renew<'a>(
        &'a self,
        key: &'a StoreKey,
        token: FencingToken,
        lease: Lease,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.renew_impl(key, token, lease))
    }

    fn inspect<'a>(
        &'a self,
        key: &'a StoreKey,
    ) -> BoxFuture<'a, Result<Option<KeyState>, StoreError>> {
        Box::pin(self.inspect_impl(key))
    }

    fn remove<'a>(&'a self, key: &'a StoreKey) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(self.remove_impl(key))
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
    // waiting will not fix either. OOM is a healthy server at `maxmemory`
    // (under `noeviction`): it still reads, so existing results keep
    // replaying, but refuses the write of a new claim or result: full.
    // Everything else (I/O, LOADING, READONLY after a failover,
    // MASTERDOWN, CLUSTERDOWN...) is the server being unable to serve
    // right now.
    match e.code() {
        Some("WRONGTYPE" | "KEELCORRUPT") => StoreError::Corrupt(format!("redis: {e}")),
        Some("OOM") => StoreError::Full(format!("redis: {e}")),
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
    match (items.next(), items.next(), items.next(), items.next()) {
        (Some(Value::Int(1)), Some(token), None, None) => {
            let token = as_u64(&token).ok_or_else(|| corrupt("claim token", &token))?;
            Ok(Claim::Acquired {
                token: FencingToken::new(token),
            })
        }
        (Some(Value::Int(2)), Some(Value::BulkString(record)), Some(Value::Int(ms)), None) => {
            Ok(Claim::InFlight {
                fingerprint: record_fingerprint(&record)?,
                retry_after: time_left(ms, "lease")?,
            })
        }
        (Some(Value::Int(3)), Some(Value::BulkString(record)), None, None) => {
            let (fingerprint, payload) = completed_record(record)?;
            Ok(Claim::Completed {
                fingerprint,
                payload,
            })
        }
        (Some(Value::Int(4)), Some(Value::BulkString(record)), None, None) => {
            Ok(Claim::Abandoned {
                fingerprint: record_fingerprint(&record)?,
            })
        }
        (kind, record, extra, more) => Err(StoreError::Corrupt(format!(
            "redis: unexpected claim reply {kind:?} {record:?} {extra:?} {more:?}"
        ))),
    }
}

fn decode_inspect(value: Value) -> Result<Option<KeyState>, StoreError> {
    let items = match value {
        Value::Int(0) => return Ok(None),
        Value::Array(items) => items,
        other => return Err(corrupt("inspect", &other)),
    };
    let mut items = items.into_iter();
    match (items.next(), items.next(), items.next(), items.next()) {
        (Some(Value::Int(2)), Some(Value::BulkString(record)), Some(Value::Int(ms)), None) => {
            Ok(Some(KeyState::Held {
                fingerprint: record_fingerprint(&record)?,
                token: record_token(&record)?,
                lease_left: time_left(ms, "lease")?,
            }))
        }
        (Some(Value::Int(3)), Some(Value::BulkString(record)), Some(Value::Int(pttl)), None) => {
            let expires_in = time_left(pttl, "result")?;
            let (fingerprint, payload) = completed_record(record)?;
            Ok(Some(KeyState::Completed {
                fingerprint,
                payload,
                expires_in,
            }))
        }
        (Some(Value::Int(4)), Some(Value::BulkString(record)), Some(Value::Int(pttl)), None) => {
            Ok(Some(KeyState::Abandoned {
                fingerprint: record_fingerprint(&record)?,
                token: record_token(&record)?,
                expires_in: time_left(pttl, "abandoned claim")?,
            }))
        }
        (kind, record, extra, more) => Err(StoreError::Corrupt(format!(
            "redis: unexpected inspect reply {kind:?} {record:?} {extra:?} {more:?}"
        ))),
    }
}

/// Milliseconds left, as a script reports them: a lease's rest (at least 1,
/// or the lease would have lapsed) or a record's `PTTL`, which reads 0 in
/// its last millisecond. -1 would be a record without expiry, which this
/// store never writes.
fn time_left(ms: i64, what: &str) -> Result<Duration, StoreError> {
    match u64::try_from(ms) {
        Ok(ms) => Ok(Duration::from_millis(ms.max(1))),
        Err(_) => Err(StoreError::Corrupt(format!(
            "redis: {what} record without expiry ({ms})"
        ))),
    }
}

/// State byte plus fingerprint, in front of the token or payload.
const RECORD_HEADER: usize = 33;

fn record_fingerprint(record: &[u8]) -> Result<Fingerprint, StoreError> {
    record
        .get(1..RECORD_HEADER)
        .and_then(|fp| <[u8; 32]>::try_from(fp).ok())
        .map(Fingerprint::from_bytes)
        .ok_or_else(|| StoreError::Corrupt("redis: record shorter than its header".to_owned()))
}

/// A completed record's fingerprint and payload. The payload is the rest:
/// shifted down in place rather than copied, as it may be large.
fn completed_record(mut record: Vec<u8>) -> Result<(Fingerprint, Vec<u8>), StoreError> {
    let fingerprint = record_fingerprint(&record)?;
    record.drain(..RECORD_HEADER);
    Ok((fingerprint, record))
}

/// The holder's token in a claim record: after the last `:` of an `h`
/// record (`h`, fingerprint, mode, deadline, `:`, token), or the whole
/// tail of a legacy `f` record.
fn record_token(record: &[u8]) -> Result<FencingToken, StoreError> {
    let tail = match record.first() {
        Some(b'h') => record
            .get(RECORD_HEADER + 1..)
            .and_then(|rest| rest.rsplit(|&b| b == b':').next()),
        Some(b'f') => record.get(RECORD_HEADER..),
        _ => None,
    };
    tail.and_then(|t| std::str::from_utf8(t).ok())
        .and_then(|t| t.parse().ok())
        .map(FencingToken::new)
        .ok_or_else(|| StoreError::Corrupt("redis: claim record without a token".to_owned()))
}

fn decode_done(value: Value) -> Result<(), StoreError> {
    match value {
        Value::Int(1) => Ok(()),
        Value::Int(0) => Err(StoreError::Fenced),
        other => Err(corrupt("renew/complete/release", &other)),
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
                fingerprint: Fingerprint::from_bytes([7; 32]),
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

    fn claim_bytes(fp: u8, tail: &[u8]) -> Vec<u8> {
        let mut v = vec![b'h'];
        v.extend([fp; 32]);
        v.extend(tail);
        v
    }

    #[test]
    fn claim_records_give_their_token_whatever_the_fingerprint_bytes() {
        // A fingerprint full of ':' must not be taken for the separator.
        let h = claim_bytes(b':', b"L1700000000000:42");
        assert_eq!(record_token(&h).expect("token"), FencingToken::new(42));
        let mut f = vec![b'f'];
        f.extend([b':'; 32]);
        f.extend(b"17");
        assert_eq!(record_token(&f).expect("token"), FencingToken::new(17));
        for bad in [
            claim_bytes(1, b"L1700000000000:"),
            claim_bytes(1, b""),
            vec![b'f'; 33],
            vec![b'c'; 40],
            vec![],
        ] {
            assert!(
                matches!(record_token(&bad), Err(StoreError::Corrupt(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn abandoned_and_inspect_replies_decode() {
        assert_eq!(
            decode_claim(Value::Array(vec![
                Value::Int(4),
                Value::BulkString(claim_bytes(3, b"L1:5"))
            ]))
            .expect("abandoned"),
            Claim::Abandoned {
                fingerprint: Fingerprint::from_bytes([3; 32])
            }
        );
        assert_eq!(decode_inspect(Value::Int(0)).expect("free"), None);
        assert_eq!(
            decode_inspect(Value::Array(vec![
                Value::Int(2),
                Value::BulkString(claim_bytes(3, b"F1:5")),
                Value::Int(250),
            ]))
            .expect("held"),
            Some(KeyState::Held {
                fingerprint: Fingerprint::from_bytes([3; 32]),
                token: FencingToken::new(5),
                lease_left: Duration::from_millis(250)
            })
        );
        assert_eq!(
            decode_inspect(Value::Array(vec![
                Value::Int(4),
                Value::BulkString(claim_bytes(3, b"L1:5")),
                Value::Int(0),
            ]))
            .expect("abandoned"),
            Some(KeyState::Abandoned {
                fingerprint: Fingerprint::from_bytes([3; 32]),
                token: FencingToken::new(5),
                expires_in: Duration::from_millis(1)
            })
        );
        let mut done = vec![b'c'];
        done.extend([4; 32]);
        done.extend(b"body");
        assert_eq!(
            decode_inspect(Value::Array(vec![
                Value::Int(3),
                Value::BulkString(done),
                Value::Int(9000),
            ]))
            .expect("completed"),
            Some(KeyState::Completed {
                fingerprint: Fingerprint::from_bytes([4; 32]),
                payload: b"body".to_vec(),
                expires_in: Duration::from_secs(9)
            })
        );
        for bad in [
            Value::Nil,
            Value::Int(1),
            Value::Array(vec![]),
            Value::Array(vec![
                Value::Int(2),
                Value::BulkString(claim_bytes(3, b"F1:")),
                Value::Int(5),
            ]),
            Value::Array(vec![
                Value::Int(3),
                Value::BulkString(vec![b'c'; 40]),
                Value::Int(-1),
            ]),
            Value::Array(vec![
                Value::Int(4),
                Value::BulkString(claim_bytes(3, b"L1:5")),
            ]),
            Value::Array(vec![Value::Int(7), Value::Nil, Value::Int(1)]),
        ] {
            assert!(
                matches!(decode_inspect(bad.clone()), Err(StoreError::Corrupt(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn leases_become_script_arguments() {
        let lock = LeaseArgs::of(Lease::locking(
            Duration::from_millis(1500),
            Duration::from_secs(60),
        ));
        assert_eq!((lock.hold_ms, lock.mode, lock.lock_ms), (1500, "L", 60_000));
        let free = LeaseArgs::of(Lease::freeing(Duration::from_micros(1)));
        assert_eq!((free.hold_ms, free.mode, free.lock_ms), (1, "F", 0));
    }
}
