//! In-memory store: sharded, bounded, with TTL expiry on tokio's clock.
//!
//! Keys are spread over many shards, each behind its own short-held mutex,
//! so concurrent requests on different keys rarely meet and no single lock
//! serialises the process. Time is read from [`tokio::time::Instant`], so
//! tests running with paused time (`#[tokio::test(start_paused = true)]`)
//! can expire leases and records instantly and deterministically.
//!
//! The store is bounded by entry count and by bytes (key + payload + a fixed
//! overhead per entry). When a shard is full it first drops expired entries,
//! then evicts the completed records closest to expiry. Live claims are
//! never evicted, since that could let an operation run twice: if a shard is
//! full of live claims, [`Store::claim`] fails with
//! [`StoreError::Unavailable`] and the engine applies the route's
//! store-down policy.
//!
//! Nothing here survives a restart: use [`crate::embedded`] for that, and a
//! shared store (Redis, PostgreSQL) across instances.
//!
//! ```
//! use keel_idempotency::memory::MemoryStore;
//! use keel_idempotency::store::{Claim, Fingerprint, Store, StoreKey};
//! use std::time::Duration;
//!
//! # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
//! let store = MemoryStore::new();
//! let key = StoreKey::new("tenant:POST:/orders:k1").unwrap();
//! let fp = Fingerprint([1; 32]);
//! let Claim::Acquired { token } = store.claim(&key, fp, Duration::from_secs(30)).await.unwrap()
//! else { panic!("a fresh key is free") };
//! store.complete(&key, token, b"response", Duration::from_secs(3600)).await.unwrap();
//! assert!(matches!(
//!     store.claim(&key, fp, Duration::from_secs(30)).await.unwrap(),
//!     Claim::Completed { .. }
//! ));
//! # });
//! ```

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use crate::store::{BoxFuture, Claim, FencingToken, Fingerprint, Store, StoreError, StoreKey};

/// Bytes charged per entry on top of its key and payload (map slot,
/// bookkeeping), so that many tiny records still count against the limit.
const ENTRY_OVERHEAD: usize = 96;

/// Limits of a [`MemoryStore`].
///
/// ```
/// use keel_idempotency::memory::MemoryConfig;
/// let config = MemoryConfig::default().max_entries(10_000).max_bytes(64 << 20);
/// assert_eq!(config.entries(), 10_000);
/// ```
#[derive(Clone, Debug)]
pub struct MemoryConfig {
    max_entries: usize,
    max_bytes: usize,
    shards: usize,
}

impl Default for MemoryConfig {
    /// One million entries, 256 MiB, shards scaled to the machine's cores.
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(4, |n| n.get());
        Self {
            max_entries: 1_000_000,
            max_bytes: 256 << 20,
            shards: (cores * 16).next_power_of_two().clamp(16, 1024),
        }
    }
}

impl MemoryConfig {
    /// Caps the number of entries (claims and records together).
    ///
    /// ```
    /// # use keel_idempotency::memory::MemoryConfig;
    /// assert_eq!(MemoryConfig::default().max_entries(5).entries(), 5);
    /// ```
    pub fn max_entries(mut self, n: usize) -> Self {
        self.max_entries = n.max(1);
        self
    }

    /// Caps the bytes held (keys, payloads and a fixed overhead per entry).
    ///
    /// ```
    /// # use keel_idempotency::memory::MemoryConfig;
    /// assert_eq!(MemoryConfig::default().max_bytes(1 << 20).bytes(), 1 << 20);
    /// ```
    pub fn max_bytes(mut self, n: usize) -> Self {
        self.max_bytes = n.max(1);
        self
    }

    /// Sets the number of shards (rounded up to a power of two). More shards
    /// mean less contention; each shard enforces an equal share of the
    /// limits.
    ///
    /// ```
    /// # use keel_idempotency::memory::MemoryConfig;
    /// assert_eq!(MemoryConfig::default().shards(3).shard_count(), 4);
    /// ```
    pub fn shards(mut self, n: usize) -> Self {
        self.shards = n.clamp(1, 1 << 16).next_power_of_two();
        self
    }

    /// The entry limit.
    ///
    /// ```
    /// # use keel_idempotency::memory::MemoryConfig;
    /// assert!(MemoryConfig::default().entries() > 0);
    /// ```
    pub fn entries(&self) -> usize {
        self.max_entries
    }

    /// The byte limit.
    ///
    /// ```
    /// # use keel_idempotency::memory::MemoryConfig;
    /// assert!(MemoryConfig::default().bytes() > 0);
    /// ```
    pub fn bytes(&self) -> usize {
        self.max_bytes
    }

    /// The shard count.
    ///
    /// ```
    /// # use keel_idempotency::memory::MemoryConfig;
    /// assert!(MemoryConfig::default().shard_count().is_power_of_two());
    /// ```
    pub fn shard_count(&self) -> usize {
        self.shards
    }
}

enum State {
    InFlight { token: FencingToken },
    Completed { payload: Box<[u8]> },
}

struct Entry {
    fingerprint: Fingerprint,
    expires: Instant,
    state: State,
}

impl Entry {
    fn cost(key: &StoreKey, payload_len: usize) -> usize {
        key.as_str().len() + payload_len + ENTRY_OVERHEAD
    }
}

#[derive(Default)]
struct Shard {
    map: HashMap<StoreKey, Entry>,
    bytes: usize,
    /// Tokens come from one counter per shard: it only grows, so the tokens
    /// of any key (which always lives in the same shard) strictly increase,
    /// across release, expiry and eviction.
    last_token: u64,
}

impl Shard {
    fn remove(&mut self, key: &StoreKey) {
        if let Some(old) = self.map.remove(key) {
            self.bytes -= Entry::cost(key, payload_len(&old));
        }
    }

    /// Makes room for one more entry of `cost` bytes, or says the shard is
    /// full of live claims.
    fn make_room(
        &mut self,
        now: Instant,
        cost: usize,
        max_entries: usize,
        max_bytes: usize,
    ) -> bool {
        let fits = |s: &Self| s.map.len() < max_entries && s.bytes + cost <= max_bytes;
        if fits(self) {
            return true;
        }
        self.purge(now);
        if fits(self) {
            return true;
        }
        // Evict the completed records nearest to expiry, a batch at a time
        // so that a full shard does not pay a scan on every insert. Only
        // their expiry times are gathered (no key is cloned): the batch's
        // cut-off is the batch-th earliest, and one pass removes that many
        // completed records at or before it.
        let mut expiries: Vec<Instant> = self
            .map
            .values()
            .filter(|e| matches!(e.state, State::Completed { .. }))
            .map(|e| e.expires)
            .collect();
        let batch = (self.map.len() / 16).max(1).min(expiries.len());
        if batch > 0 {
            let (_, cutoff, _) = expiries.select_nth_unstable(batch - 1);
            let cutoff = *cutoff;
            drop(expiries);
            let (mut left, mut freed) = (batch, 0);
            self.map.retain(|k, e| {
                let evict =
                    left > 0 && e.expires <= cutoff && matches!(e.state, State::Completed { .. });
                if evict {
                    left -= 1;
                    freed += Entry::cost(k, payload_len(e));
                }
                !evict
            });
            self.bytes -= freed;
        }
        while !fits(self) {
            // A very large payload may need more than one batch.
            let Some(key) = self
                .map
                .iter()
                .filter(|(_, e)| matches!(e.state, State::Completed { .. }))
                .min_by_key(|(_, e)| e.expires)
                .map(|(k, _)| k.clone())
            else {
                return false;
            };
            self.remove(&key);
        }
        true
    }

    fn purge(&mut self, now: Instant) -> u64 {
        let before = self.map.len();
        let mut freed = 0;
        self.map.retain(|k, e| {
            let keep = e.expires > now;
            if !keep {
                freed += Entry::cost(k, payload_len(e));
            }
            keep
        });
        self.bytes -= freed;
        (before - self.map.len()) as u64
    }
}

fn payload_len(e: &Entry) -> usize {
    match &e.state {
        State::InFlight { .. } => 0,
        State::Completed { payload } => payload.len(),
    }
}

/// One shard on cache lines of its own, so that threads working on
/// neighbouring shards do not invalidate each other's lines (false sharing).
#[repr(align(128))]
#[derive(Default)]
struct Padded(Mutex<Shard>);

/// A sharded, bounded in-memory [`Store`]. See the [module docs](self).
pub struct MemoryStore {
    shards: Box<[Padded]>,
    mask: usize,
    seed: u64,
    shard_entries: usize,
    shard_bytes: usize,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("shards", &self.shards.len())
            .field("len", &self.len())
            .finish()
    }
}

impl MemoryStore {
    /// A store with the [default limits](MemoryConfig::default).
    ///
    /// ```
    /// let store = keel_idempotency::memory::MemoryStore::new();
    /// assert!(store.is_empty());
    /// ```
    pub fn new() -> Self {
        Self::with_config(MemoryConfig::default())
    }

    /// A store with the given limits.
    ///
    /// ```
    /// use keel_idempotency::memory::{MemoryConfig, MemoryStore};
    /// let store = MemoryStore::with_config(MemoryConfig::default().max_entries(100));
    /// assert_eq!(store.len(), 0);
    /// ```
    pub fn with_config(config: MemoryConfig) -> Self {
        let n = config.shards;
        Self {
            shards: (0..n).map(|_| Padded::default()).collect(),
            mask: n - 1,
            seed: RandomState::new().hash_one(0x6b65_656cu64),
            shard_entries: config.max_entries.div_ceil(n),
            shard_bytes: config.max_bytes.div_ceil(n),
        }
    }

    /// Entries held (live claims and records, expired ones not yet purged
    /// included).
    ///
    /// ```
    /// assert_eq!(keel_idempotency::memory::MemoryStore::new().len(), 0);
    /// ```
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(&s.0).map.len()).sum()
    }

    /// True when no entry is held.
    ///
    /// ```
    /// assert!(keel_idempotency::memory::MemoryStore::new().is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes charged against the limit.
    ///
    /// ```
    /// assert_eq!(keel_idempotency::memory::MemoryStore::new().bytes(), 0);
    /// ```
    pub fn bytes(&self) -> usize {
        self.shards.iter().map(|s| lock(&s.0).bytes).sum()
    }

    fn shard(&self, key: &StoreKey) -> MutexGuard<'_, Shard> {
        lock(&self.shards[shard_hash(key.as_str().as_bytes(), self.seed) as usize & self.mask].0)
    }

    /// The synchronous core of [`Store::claim`].
    fn claim_now(
        &self,
        key: &StoreKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let now = Instant::now();
        let mut guard = self.shard(key);
        let shard = &mut *guard;
        if let Some(e) = shard.map.get_mut(key) {
            if e.expires > now {
                return Ok(match &e.state {
                    State::InFlight { .. } => Claim::InFlight {
                        fingerprint: e.fingerprint,
                        retry_after: e.expires - now,
                    },
                    State::Completed { payload } => Claim::Completed {
                        fingerprint: e.fingerprint,
                        payload: payload.to_vec(),
                    },
                });
            }
            // Expired: take the slot over in place (no key copy, no
            // rehash); the claim needs no more room than the old entry.
            shard.last_token += 1;
            let token = FencingToken(shard.last_token);
            shard.bytes -= payload_len(e);
            e.fingerprint = fingerprint;
            e.expires = now + lease;
            e.state = State::InFlight { token };
            return Ok(Claim::Acquired { token });
        }
        let cost = Entry::cost(key, 0);
        let (max_entries, max_bytes) = (self.shard_entries, self.shard_bytes);
        if !shard.make_room(now, cost, max_entries, max_bytes) {
            return Err(StoreError::Unavailable(
                "memory store is full of in-flight claims; raise MemoryConfig::max_entries or max_bytes".into(),
            ));
        }
        shard.last_token += 1;
        let token = FencingToken(shard.last_token);
        shard.bytes += cost;
        shard.map.insert(
            key.clone(),
            Entry {
                fingerprint,
                expires: now + lease,
                state: State::InFlight { token },
            },
        );
        Ok(Claim::Acquired { token })
    }

    /// Checks that `token` holds `key` right now, under the shard lock.
    fn held(shard: &Shard, key: &StoreKey, token: FencingToken, now: Instant) -> bool {
        matches!(
            shard.map.get(key),
            Some(Entry { state: State::InFlight { token: t }, expires, .. }) if *t == token && *expires > now
        )
    }

    fn complete_now(
        &self,
        key: &StoreKey,
        token: FencingToken,
        payload: &[u8],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let now = Instant::now();
        let mut shard = self.shard(key);
        if !Self::held(&shard, key, token, now) {
            return Err(StoreError::Fenced);
        }
        // The claim's own slot is reused: only the payload needs room.
        let extra = payload.len();
        let (max_entries, max_bytes) = (self.shard_entries, self.shard_bytes);
        if shard.bytes + extra > max_bytes {
            // Take the claim out while making room so it cannot be evicted
            // or counted, then put the record in its place.
            let Some(entry) = shard.map.remove(key) else {
                return Err(StoreError::Fenced);
            };
            shard.bytes -= Entry::cost(key, 0);
            let cost = Entry::cost(key, extra);
            if !shard.make_room(now, cost, max_entries, max_bytes) {
                shard.bytes += Entry::cost(key, 0);
                shard.map.insert(key.clone(), entry);
                return Err(StoreError::Unavailable(format!(
                    "memory store has no room for a {extra}-byte record; raise MemoryConfig::max_bytes"
                )));
            }
            shard.bytes += cost;
            shard.map.insert(
                key.clone(),
                Entry {
                    fingerprint: entry.fingerprint,
                    expires: now + ttl,
                    state: State::Completed {
                        payload: payload.into(),
                    },
                },
            );
            return Ok(());
        }
        shard.bytes += extra;
        if let Some(e) = shard.map.get_mut(key) {
            e.expires = now + ttl;
            e.state = State::Completed {
                payload: payload.into(),
            };
        }
        Ok(())
    }

    fn release_now(&self, key: &StoreKey, token: FencingToken) -> Result<(), StoreError> {
        let now = Instant::now();
        let mut shard = self.shard(key);
        if !Self::held(&shard, key, token, now) {
            return Err(StoreError::Fenced);
        }
        shard.remove(key);
        Ok(())
    }

    fn purge_now(&self) -> u64 {
        let now = Instant::now();
        self.shards.iter().map(|s| lock(&s.0).purge(now)).sum()
    }
}

/// A cheap multiplicative hash for picking the shard, so each operation
/// runs the map's keyed (DoS-resistant) hash only once. Keys crafted to land
/// in one shard can only make that shard busier, never break the map, whose
/// own hasher is randomly keyed.
fn shard_hash(bytes: &[u8], seed: u64) -> u64 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut h = seed;
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        h = (h.rotate_left(5) ^ u64::from_le_bytes(w)).wrapping_mul(K);
    }
    for &b in chunks.remainder() {
        h = (h.rotate_left(5) ^ u64::from(b)).wrapping_mul(K);
    }
    // Fold the well-mixed high bits down to where the mask reads.
    h ^ (h >> 32)
}

/// Locks a shard, recovering from poisoning: every critical section leaves
/// the shard consistent before anything that could panic.
fn lock(m: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Store for MemoryStore {
    fn claim<'a>(
        &'a self,
        key: &'a StoreKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        let r = self.claim_now(key, fingerprint, lease);
        Box::pin(std::future::ready(r))
    }

    fn complete<'a>(
        &'a self,
        key: &'a StoreKey,
        token: FencingToken,
        payload: &'a [u8],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let r = self.complete_now(key, token, payload, ttl);
        Box::pin(std::future::ready(r))
    }

    fn release<'a>(
        &'a self,
        key: &'a StoreKey,
        token: FencingToken,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let r = self.release_now(key, token);
        Box::pin(std::future::ready(r))
    }

    fn purge_expired(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        let n = self.purge_now();
        Box::pin(std::future::ready(Ok(n)))
    }

    fn name(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_full_store_evicts_the_records_nearest_to_expiry_first() {
        // 64 records with TTLs in shuffled order fill one shard; each new
        // record must evict those that expire soonest (a batch of
        // 64 / 16 = 4 at a time), never a later one while an earlier one
        // is still held.
        let store = MemoryStore::with_config(MemoryConfig::default().shards(1).max_entries(64));
        let ttl = |i: usize| Duration::from_secs(100 + ((i * 37) % 64) as u64);
        let long = Duration::from_secs(600);
        let fp = Fingerprint([1; 32]);
        let key = |i: usize| StoreKey::new(format!("k{i}")).expect("valid");
        let put = |i: usize, ttl: Duration| {
            let store = &store;
            async move {
                let Claim::Acquired { token } =
                    store.claim(&key(i), fp, long).await.expect("claim")
                else {
                    panic!("fresh key");
                };
                store
                    .complete(&key(i), token, b"r", ttl)
                    .await
                    .expect("complete");
            }
        };
        for i in 0..64 {
            put(i, ttl(i)).await;
        }
        let start = Instant::now();
        for n in 0..12 {
            put(1000 + n, long).await;
            let shard = lock(&store.shards[0].0);
            let held: Vec<Duration> = shard
                .map
                .values()
                .map(|e| e.expires - start)
                .filter(|left| *left < long)
                .collect();
            let evicted = 64 - held.len();
            assert!(evicted > n, "room made for {} records", n + 1);
            assert_eq!(evicted % 4, 0, "evicted in batches of 4");
            assert_eq!(
                held.iter().min().copied(),
                Some(Duration::from_secs(100 + evicted as u64)),
                "the {evicted} records nearest to expiry go first"
            );
            assert_eq!(
                shard.bytes,
                shard.map.keys().map(|k| Entry::cost(k, 1)).sum::<usize>()
            );
        }
    }
}
