//! In-memory store: sharded, bounded, with TTL expiry on tokio's clock.
//!
//! Keys are spread over many shards, each behind its own short-held mutex,
//! so concurrent requests on different keys rarely meet and no single lock
//! serialises the process. Time is read from [`tokio::time::Instant`], so
//! tests running with paused time (`#[tokio::test(start_paused = true)]`)
//! can expire leases and records instantly and deterministically.
//!
//! The store is bounded by entry count and by bytes (key + payload + a fixed
//! overhead per entry), and each tenant (see [`StoreKey::tenant`]) by a
//! share of the bytes. Nothing is evicted before its time: a completed
//! record dropped early would let a retry run its operation again. When a
//! shard is full it drops expired entries; if that is not enough, or the
//! key's tenant is over its share, [`Store::claim`] fails with
//! [`StoreError::Full`] and the engine answers 503 for that key alone, while
//! every record already held keeps answering retries.
//!
//! Nothing here survives a restart: use [`crate::embedded`] for that, and a
//! shared store (Redis, PostgreSQL) across instances.
//!
//! ```
//! use keel_idempotency::memory::MemoryStore;
//! use keel_idempotency::store::{Claim, Fingerprint, Lease, Store, StoreKey};
//! use std::time::Duration;
//!
//! # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
//! let store = MemoryStore::new();
//! let key = StoreKey::new("tenant:POST:/orders:k1").unwrap();
//! let fp = Fingerprint::from_bytes([1; 32]);
//! let Claim::Acquired { token } = store.claim(&key, fp, Lease::freeing(Duration::from_secs(30))).await.unwrap()
//! else { panic!("a fresh key is free") };
//! store.complete(&key, token, b"response", Duration::from_secs(3600)).await.unwrap();
//! assert!(matches!(
//!     store.claim(&key, fp, Lease::freeing(Duration::from_secs(30))).await.unwrap(),
//!     Claim::Completed { .. }
//! ));
//! # });
//! ```

use std::hash::{BuildHasher, RandomState};

use hashbrown::HashTable;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use crate::store::{
    BoxFuture, Claim, FencingToken, Fingerprint, KeyState, Lease, Store, StoreError, StoreKey,
};

/// Bytes charged per entry on top of its key and payload (map slot,
/// bookkeeping), so that many tiny records still count against the limit.
const ENTRY_OVERHEAD: usize = 96;

/// A completion this small (an "outcome unknown" or "too large to keep"
/// record) is never refused for room: it replaces a claim that is already
/// charged, and refusing it would leave the key without any outcome.
const SMALL_RECORD: usize = 512;

/// Tenants are charged in this many buckets (a tenant's digest picks one),
/// so the per-tenant accounting is a fixed array of counters, with no map
/// or lock of its own.
const TENANT_BUCKETS: usize = 1024;

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
    max_tenant_bytes: usize,
    shards: usize,
}

impl Default for MemoryConfig {
    /// One million entries, 256 MiB, a quarter of the bytes per tenant,
    /// shards scaled to the machine's cores.
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(4, |n| n.get());
        Self {
            max_entries: 1_000_000,
            max_bytes: 256 << 20,
            max_tenant_bytes: 64 << 20,
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

    /// Caps the bytes one tenant's keys may hold (default a quarter of
    /// [`MemoryConfig::max_bytes`]'s default, 64 MiB), so one tenant's flood
    /// is refused before it fills the store for the others. Keys without a
    /// tenant ([`StoreKey::tenant`] 0) are bound by the store's limits only.
    /// Tenants are counted in 1,024 buckets by digest, so two tenants may
    /// share one bucket's allowance.
    ///
    /// ```
    /// # use keel_idempotency::memory::MemoryConfig;
    /// assert_eq!(MemoryConfig::default().max_tenant_bytes(1 << 20).tenant_bytes(), 1 << 20);
    /// ```
    pub fn max_tenant_bytes(mut self, n: usize) -> Self {
        self.max_tenant_bytes = n.max(1);
        self
    }

    /// The per-tenant byte limit.
    ///
    /// ```
    /// # use keel_idempotency::memory::MemoryConfig;
    /// assert_eq!(MemoryConfig::default().tenant_bytes(), 64 << 20);
    /// ```
    pub fn tenant_bytes(&self) -> usize {
        self.max_tenant_bytes
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
    /// A claim; held while `lease_until` is ahead, then (if the entry still
    /// lives, which only a locking lease makes it do) abandoned.
    Claimed {
        token: FencingToken,
        lease_until: Instant,
    },
    Completed {
        payload: Box<[u8]>,
    },
}

struct Entry {
    fingerprint: Fingerprint,
    /// When the entry is gone: a record's TTL, a claim's lease (freeing) or
    /// lease plus lock (locking).
    expires: Instant,
    state: State,
}

impl Entry {
    fn cost(key: &StoreKey, payload_len: usize) -> usize {
        key.as_str().len() + payload_len + ENTRY_OVERHEAD
    }

    /// Held by `token` right now.
    fn held_by(&self, token: FencingToken, now: Instant) -> bool {
        matches!(self.state, State::Claimed { token: t, lease_until } if t == token && lease_until > now)
    }
}

/// One map slot: the key, its hash (kept for the table's rehashing) and
/// the entry.
struct Slot {
    key: StoreKey,
    hash: u64,
    entry: Entry,
}

/// A key with its hash under the store's secret seeds, computed once per
/// operation: it picks the shard and finds the slot.
struct Located<'k> {
    key: &'k StoreKey,
    hash: u64,
}

#[derive(Default)]
struct Shard {
    map: HashTable<Slot>,
    bytes: usize,
    /// Tokens come from one counter per shard: it only grows, so the tokens
    /// of any key (which always lives in the same shard) strictly increase,
    /// across release, lapse, expiry and removal.
    last_token: u64,
    /// Set when a result was refused for room: new keys are refused until
    /// the shard is back under 7/8 of its bytes, so it does not go on
    /// running requests whose results cannot be kept.
    saturated: bool,
}

impl Shard {
    fn get(&self, at: &Located<'_>) -> Option<&Entry> {
        self.map
            .find(at.hash, |slot| slot.key == *at.key)
            .map(|slot| &slot.entry)
    }

    fn get_mut(&mut self, at: &Located<'_>) -> Option<&mut Entry> {
        self.map
            .find_mut(at.hash, |slot| slot.key == *at.key)
            .map(|slot| &mut slot.entry)
    }

    /// Adds an entry for a key the shard does not hold.
    fn insert(&mut self, at: &Located<'_>, entry: Entry) {
        let slot = Slot {
            key: at.key.clone(),
            hash: at.hash,
            entry,
        };
        self.map.insert_unique(at.hash, slot, |slot| slot.hash);
    }

    fn remove(&mut self, at: &Located<'_>, tenants: &Tenants) -> bool {
        match self.map.find_entry(at.hash, |slot| slot.key == *at.key) {
            Ok(found) => {
                let (old, _) = found.remove();
                let cost = Entry::cost(at.key, payload_len(&old.entry));
                self.bytes -= cost;
                tenants.uncharge(at.key, cost);
                true
            }
            Err(_) => false,
        }
    }

    /// Makes room for one more entry of `cost` bytes by dropping expired
    /// entries, or says the shard is full.
    fn make_room(
        &mut self,
        now: Instant,
        cost: usize,
        max_entries: usize,
        max_bytes: usize,
        tenants: &Tenants,
    ) -> bool {
        let fits = |s: &Self| s.map.len() < max_entries && s.bytes + cost <= max_bytes;
        if self.saturated {
            if self.bytes > refill(max_bytes) {
                self.purge(now, tenants);
            }
            if self.bytes > refill(max_bytes) {
                return false;
            }
            self.saturated = false;
        }
        if fits(self) {
            return true;
        }
        self.purge(now, tenants);
        fits(self)
    }

    fn purge(&mut self, now: Instant, tenants: &Tenants) -> u64 {
        let before = self.map.len();
        let mut freed = 0;
        self.map.retain(|slot| {
            let keep = slot.entry.expires > now;
            if !keep {
                let cost = Entry::cost(&slot.key, payload_len(&slot.entry));
                freed += cost;
                tenants.uncharge(&slot.key, cost);
            }
            keep
        });
        self.bytes -= freed;
        (before - self.map.len()) as u64
    }
}

/// Bytes held per tenant bucket, shared by all shards (a tenant's keys are
/// spread over every shard). Counters, not a lock: a claim that races
/// another of the same tenant may pass the share by one entry, no more.
struct Tenants {
    bytes: Box<[AtomicUsize]>,
    /// Set when a tenant's result was refused for room: its new keys are
    /// refused too until it is back under [`refill`] of its share, so it
    /// does not go on running requests whose results cannot be kept.
    saturated: Box<[AtomicBool]>,
    limit: usize,
}

/// The share of a limit below which a saturated tenant or shard takes new
/// keys again: 7/8.
fn refill(limit: usize) -> usize {
    limit - limit / 8
}

impl Tenants {
    fn new(limit: usize) -> Self {
        Self {
            bytes: (0..TENANT_BUCKETS).map(|_| AtomicUsize::new(0)).collect(),
            saturated: (0..TENANT_BUCKETS)
                .map(|_| AtomicBool::new(false))
                .collect(),
            limit,
        }
    }

    fn index(key: &StoreKey) -> Option<usize> {
        match key.tenant() {
            0 => None,
            t => Some((t % TENANT_BUCKETS as u64) as usize),
        }
    }

    fn bucket(&self, key: &StoreKey) -> Option<&AtomicUsize> {
        Self::index(key).map(|i| &self.bytes[i])
    }

    /// Whether `key`'s tenant has room for `cost` more bytes.
    fn has_room(&self, key: &StoreKey, cost: usize) -> bool {
        self.bucket(key)
            .is_none_or(|b| b.load(Ordering::Relaxed) + cost <= self.limit)
    }

    /// Whether `key`'s tenant may take a new key: it has room for the claim
    /// and is not saturated (a saturated one is cleared once it is back
    /// under 7/8 of its share).
    fn takes_new_key(&self, key: &StoreKey, cost: usize) -> bool {
        let Some(i) = Self::index(key) else {
            return true;
        };
        let used = self.bytes[i].load(Ordering::Relaxed);
        if self.saturated[i].load(Ordering::Relaxed) {
            if used > refill(self.limit) {
                return false;
            }
            self.saturated[i].store(false, Ordering::Relaxed);
        }
        used + cost <= self.limit
    }

    fn saturate(&self, key: &StoreKey) {
        if let Some(i) = Self::index(key) {
            self.saturated[i].store(true, Ordering::Relaxed);
        }
    }

    fn charge(&self, key: &StoreKey, cost: usize) {
        if let Some(b) = self.bucket(key) {
            b.fetch_add(cost, Ordering::Relaxed);
        }
    }

    fn uncharge(&self, key: &StoreKey, cost: usize) {
        if let Some(b) = self.bucket(key) {
            b.fetch_sub(cost, Ordering::Relaxed);
        }
    }
}

fn payload_len(e: &Entry) -> usize {
    match &e.state {
        State::Claimed { .. } => 0,
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
    /// SipHash-1-3 under random keys, for keys whose text a caller chose.
    hasher: RandomState,
    /// Random keys of the folded-multiply hash of digest keys.
    seeds: [u64; 4],
    shard_entries: usize,
    shard_bytes: usize,
    tenants: Tenants,
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
            hasher: RandomState::new(),
            seeds: std::array::from_fn(|i| RandomState::new().hash_one(i)),
            shard_entries: config.max_entries.div_ceil(n),
            shard_bytes: config.max_bytes.div_ceil(n),
            tenants: Tenants::new(config.max_tenant_bytes),
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

    /// `key` with its hash, computed once per operation.
    ///
    /// Keys are hashed under random keys, so no one outside can aim keys at
    /// one slot of the map (a flood of colliding keys would make every
    /// operation on the shard walk them all). A key whose text a caller
    /// chose ([`StoreKey::new`]: it may come straight from a client) gets
    /// SipHash-1-3 under std's random keys, as a `HashMap` would. A key the
    /// engine made ends with a BLAKE3 digest of the client's key and its
    /// scope: a client cannot choose those bits without a BLAKE3 preimage
    /// search, nor see how the secret seeds mix them, so a folded multiply
    /// of half the digest (128 bits) with four random seeds spreads them as
    /// well, at a tenth of SipHash's cost over the whole key.
    fn locate<'k>(&self, key: &'k StoreKey) -> Located<'k> {
        let hash = match key.digest_tail() {
            Some(tail) => digest_hash(tail, &self.seeds),
            None => self.hasher.hash_one(key.as_str()),
        };
        Located { key, hash }
    }

    /// The shard of a located key, locked. It reads the hash's bits 32 and
    /// up (a shard's map reads the low bits and the top 7).
    fn shard(&self, at: &Located<'_>) -> MutexGuard<'_, Shard> {
        lock(&self.shards[(at.hash >> 32) as usize & self.mask].0)
    }

    /// The synchronous core of [`Store::claim`] (and all of [`Store::claim_now`]).
    fn claim_sync(
        &self,
        key: &StoreKey,
        fingerprint: Fingerprint,
        lease: Lease,
    ) -> Result<Claim, StoreError> {
        let now = Instant::now();
        let at = self.locate(key);
        let mut guard = self.shard(&at);
        let shard = &mut *guard;
        // The map alone is borrowed, so the counters stay writable.
        if let Some(slot) = shard.map.find_mut(at.hash, |slot| slot.key == *at.key) {
            let e = &mut slot.entry;
            if e.expires > now {
                return Ok(match &e.state {
                    State::Claimed { lease_until, .. } if *lease_until > now => Claim::InFlight {
                        fingerprint: e.fingerprint,
                        retry_after: *lease_until - now,
                    },
                    State::Claimed { .. } => Claim::Abandoned {
                        fingerprint: e.fingerprint,
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
            let token = FencingToken::new(shard.last_token);
            let freed = payload_len(e);
            shard.bytes -= freed;
            self.tenants.uncharge(key, freed);
            e.fingerprint = fingerprint;
            e.expires = now + lease.record_life();
            e.state = State::Claimed {
                token,
                lease_until: now + lease.hold,
            };
            return Ok(Claim::Acquired { token });
        }
        let cost = Entry::cost(key, 0);
        if !self.tenants.takes_new_key(key, cost) {
            return Err(StoreError::Full(
                "this tenant's share of the memory store is used up; retry once its records expire"
                    .into(),
            ));
        }
        let (max_entries, max_bytes) = (self.shard_entries, self.shard_bytes);
        if !shard.make_room(now, cost, max_entries, max_bytes, &self.tenants) {
            return Err(StoreError::Full(
                "the memory store is at capacity; raise its max_entries or max_bytes".into(),
            ));
        }
        shard.last_token += 1;
        let token = FencingToken::new(shard.last_token);
        shard.bytes += cost;
        self.tenants.charge(key, cost);
        shard.insert(
            &at,
            Entry {
                fingerprint,
                expires: now + lease.record_life(),
                state: State::Claimed {
                    token,
                    lease_until: now + lease.hold,
                },
            },
        );
        Ok(Claim::Acquired { token })
    }

    fn renew_now(
        &self,
        key: &StoreKey,
        token: FencingToken,
        lease: Lease,
    ) -> Result<(), StoreError> {
        let now = Instant::now();
        let at = self.locate(key);
        let mut shard = self.shard(&at);
        match shard.get_mut(&at) {
            Some(e) if e.held_by(token, now) => {
                e.expires = now + lease.record_life();
                e.state = State::Claimed {
                    token,
                    lease_until: now + lease.hold,
                };
                Ok(())
            }
            _ => Err(StoreError::Fenced),
        }
    }

    /// `payload` borrowed (copied in) or owned (kept as it is).
    fn complete_sync<P: AsRef<[u8]> + Into<Box<[u8]>>>(
        &self,
        key: &StoreKey,
        token: FencingToken,
        payload: P,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let now = Instant::now();
        let at = self.locate(key);
        let mut guard = self.shard(&at);
        let shard = &mut *guard;
        // The claim's own slot is reused: only the payload needs room. Room
        // is checked before the one lookup of the key (a purge may drop
        // it, and then the caller is fenced, as it should be).
        let extra = payload.as_ref().len();
        if extra > SMALL_RECORD {
            if !self.tenants.has_room(key, extra) {
                self.tenants.saturate(key);
                return Err(StoreError::Full(format!(
                    "this tenant's share of the memory store has no room for a {extra}-byte record"
                )));
            }
            if shard.bytes + extra > self.shard_bytes {
                shard.purge(now, &self.tenants);
                if shard.bytes + extra > self.shard_bytes {
                    shard.saturated = true;
                    return Err(StoreError::Full(format!(
                        "the memory store has no room for a {extra}-byte record; raise its max_bytes"
                    )));
                }
            }
        }
        let Some(e) = shard.get_mut(&at).filter(|e| e.held_by(token, now)) else {
            return Err(StoreError::Fenced);
        };
        e.expires = now + ttl;
        e.state = State::Completed {
            payload: payload.into(),
        };
        shard.bytes += extra;
        self.tenants.charge(key, extra);
        Ok(())
    }

    fn release_now(&self, key: &StoreKey, token: FencingToken) -> Result<(), StoreError> {
        let now = Instant::now();
        let at = self.locate(key);
        let mut shard = self.shard(&at);
        if !shard.get(&at).is_some_and(|e| e.held_by(token, now)) {
            return Err(StoreError::Fenced);
        }
        shard.remove(&at, &self.tenants);
        Ok(())
    }

    fn inspect_now(&self, key: &StoreKey) -> Option<KeyState> {
        let now = Instant::now();
        let at = self.locate(key);
        let shard = self.shard(&at);
        let e = shard.get(&at).filter(|e| e.expires > now)?;
        Some(match &e.state {
            State::Claimed { token, lease_until } if *lease_until > now => KeyState::Held {
                fingerprint: e.fingerprint,
                token: *token,
                lease_left: *lease_until - now,
            },
            State::Claimed { token, .. } => KeyState::Abandoned {
                fingerprint: e.fingerprint,
                token: *token,
                expires_in: e.expires - now,
            },
            State::Completed { payload } => KeyState::Completed {
                fingerprint: e.fingerprint,
                payload: payload.to_vec(),
                expires_in: e.expires - now,
            },
        })
    }

    fn remove_now(&self, key: &StoreKey) -> bool {
        let now = Instant::now();
        let at = self.locate(key);
        let mut shard = self.shard(&at);
        let live = shard.get(&at).is_some_and(|e| e.expires > now);
        shard.remove(&at, &self.tenants) && live
    }

    fn purge_now(&self) -> u64 {
        let now = Instant::now();
        self.shards
            .iter()
            .map(|s| lock(&s.0).purge(now, &self.tenants))
            .sum()
    }
}

/// The hash of a digest key's last 32 hex digits (128 bits of its
/// digest): two folded multiplies (the 128-bit product's halves xored), each
/// of two words under two of the store's random seeds. See
/// [`MemoryStore::locate`] for why this is enough for digests, and only
/// for them.
fn digest_hash(tail: &[u8; 32], seeds: &[u64; 4]) -> u64 {
    let word = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&tail[8 * i..8 * i + 8]);
        u64::from_le_bytes(w)
    };
    let fold = |a: u64, b: u64| {
        let p = u128::from(a) * u128::from(b);
        (p as u64) ^ ((p >> 64) as u64)
    };
    fold(word(0) ^ seeds[0], word(1) ^ seeds[1]) ^ fold(word(2) ^ seeds[2], word(3) ^ seeds[3])
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
        lease: Lease,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        let r = self.claim_sync(key, fingerprint, lease);
        Box::pin(std::future::ready(r))
    }

    fn claim_now(
        &self,
        key: &StoreKey,
        fingerprint: Fingerprint,
        lease: Lease,
    ) -> Option<Result<Claim, StoreError>> {
        Some(self.claim_sync(key, fingerprint, lease))
    }

    fn complete_now(
        &self,
        key: &StoreKey,
        token: FencingToken,
        payload: Vec<u8>,
        ttl: Duration,
    ) -> Result<Result<(), StoreError>, Vec<u8>> {
        Ok(self.complete_sync(key, token, payload, ttl))
    }

    fn renew<'a>(
        &'a self,
        key: &'a StoreKey,
        token: FencingToken,
        lease: Lease,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let r = self.renew_now(key, token, lease);
        Box::pin(std::future::ready(r))
    }

    fn inspect<'a>(
        &'a self,
        key: &'a StoreKey,
    ) -> BoxFuture<'a, Result<Option<KeyState>, StoreError>> {
        let r = self.inspect_now(key);
        Box::pin(std::future::ready(Ok(r)))
    }

    fn remove<'a>(&'a self, key: &'a StoreKey) -> BoxFuture<'a, Result<bool, StoreError>> {
        let r = self.remove_now(key);
        Box::pin(std::future::ready(Ok(r)))
    }

    fn complete<'a>(
        &'a self,
        key: &'a StoreKey,
        token: FencingToken,
        payload: &'a [u8],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let r = self.complete_sync(key, token, payload, ttl);
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

    const LONG: Duration = Duration::from_secs(600);

    fn key(i: usize, tenant: u64) -> StoreKey {
        StoreKey::new(format!("k{i}"))
            .expect("valid")
            .with_tenant(tenant)
    }

    async fn put(store: &MemoryStore, k: &StoreKey, payload: &[u8]) -> Result<(), StoreError> {
        let fp = Fingerprint::from_bytes([1; 32]);
        let Claim::Acquired { token } = store.claim(k, fp, Lease::freeing(LONG)).await? else {
            panic!("fresh key {k}");
        };
        store.complete(k, token, payload, LONG).await
    }

    fn accounted(store: &MemoryStore) -> usize {
        store
            .shards
            .iter()
            .map(|s| {
                let shard = lock(&s.0);
                let sum: usize = shard
                    .map
                    .iter()
                    .map(|slot| Entry::cost(&slot.key, payload_len(&slot.entry)))
                    .sum();
                assert_eq!(shard.bytes, sum, "a shard's byte count matches its entries");
                sum
            })
            .sum()
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_store_refuses_new_claims_and_keeps_every_record() {
        let store = MemoryStore::with_config(MemoryConfig::default().shards(1).max_entries(64));
        for i in 0..64 {
            put(&store, &key(i, 0), b"r").await.expect("room");
        }
        let refused = store
            .claim(
                &key(1000, 0),
                Fingerprint::from_bytes([1; 32]),
                Lease::freeing(LONG),
            )
            .await;
        assert!(matches!(refused, Err(StoreError::Full(_))), "{refused:?}");
        for i in 0..64 {
            assert!(
                matches!(
                    store
                        .claim(
                            &key(i, 0),
                            Fingerprint::from_bytes([1; 32]),
                            Lease::freeing(LONG)
                        )
                        .await,
                    Ok(Claim::Completed { .. })
                ),
                "record {i} is still replayed"
            );
        }
        // Once records expire, room comes back by itself.
        tokio::time::advance(LONG + Duration::from_secs(1)).await;
        put(&store, &key(1000, 0), b"r")
            .await
            .expect("room after expiry");
        assert_eq!(store.len(), 1);
        assert_eq!(accounted(&store), store.bytes());
    }

    #[tokio::test(start_paused = true)]
    async fn one_tenant_cannot_take_another_tenants_room() {
        let big = vec![7u8; 100 << 10];
        let store = MemoryStore::with_config(
            MemoryConfig::default()
                .shards(4)
                .max_bytes(4 << 20)
                .max_tenant_bytes(1 << 20),
        );
        put(&store, &key(0, 1), &big)
            .await
            .expect("victim's record");
        let mut flooded = 0;
        for i in 1..400 {
            match put(&store, &key(i, 2), &big).await {
                Ok(()) => flooded += 1,
                Err(StoreError::Full(_)) => {}
                Err(e) => panic!("unexpected {e}"),
            }
        }
        assert!(
            (8..=10).contains(&flooded),
            "the flooding tenant keeps about its 1 MiB share: {flooded} records"
        );
        // Once a result was refused, the tenant takes no new keys: it does
        // not go on running requests whose results cannot be kept.
        assert!(matches!(
            store
                .claim(
                    &key(9000, 2),
                    Fingerprint::from_bytes([1; 32]),
                    Lease::freeing(LONG)
                )
                .await,
            Err(StoreError::Full(_))
        ));
        assert!(matches!(
            store
                .claim(
                    &key(0, 1),
                    Fingerprint::from_bytes([1; 32]),
                    Lease::freeing(LONG)
                )
                .await,
            Ok(Claim::Completed { .. })
        ));
        // The victim still has room of its own.
        put(&store, &key(5000, 1), &big)
            .await
            .expect("victim's second record");
        assert_eq!(accounted(&store), store.bytes());
        let charged: usize = store
            .tenants
            .bytes
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .sum();
        assert_eq!(
            charged,
            store.bytes(),
            "every byte is charged to its tenant"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_tenant_whose_result_was_refused_takes_no_new_keys_until_it_has_room() {
        let store = MemoryStore::with_config(
            MemoryConfig::default()
                .shards(4)
                .max_bytes(8 << 20)
                .max_tenant_bytes(1 << 20),
        );
        let record = vec![1u8; 300 << 10];
        for i in 0..3 {
            put(&store, &key(i, 3), &record).await.expect("room");
        }
        // The fourth result does not fit the share: refused, and the
        // tenant is saturated, although a claim (100 bytes) would fit.
        assert!(matches!(
            put(&store, &key(3, 3), &record).await,
            Err(StoreError::Full(_))
        ));
        let fresh_key = key(99, 3);
        let fresh = || {
            store.claim(
                &fresh_key,
                Fingerprint::from_bytes([1; 32]),
                Lease::freeing(LONG),
            )
        };
        assert!(matches!(fresh().await, Err(StoreError::Full(_))));
        // Another tenant is not affected.
        put(&store, &key(0, 4), &record)
            .await
            .expect("another tenant");
        // Back under 7/8 of the share: new keys again.
        assert!(store.remove(&key(0, 3)).await.expect("remove"));
        assert!(matches!(fresh().await, Ok(Claim::Acquired { .. })));
    }

    #[tokio::test(start_paused = true)]
    async fn a_shard_whose_result_was_refused_takes_no_new_keys_until_it_has_room() {
        let store = MemoryStore::with_config(MemoryConfig::default().shards(1).max_bytes(1 << 20));
        let record = vec![1u8; 300 << 10];
        for i in 0..3 {
            put(&store, &key(i, 0), &record).await.expect("room");
        }
        assert!(matches!(
            put(&store, &key(3, 0), &record).await,
            Err(StoreError::Full(_))
        ));
        let fresh_key = key(99, 0);
        let fresh = || {
            store.claim(
                &fresh_key,
                Fingerprint::from_bytes([1; 32]),
                Lease::freeing(LONG),
            )
        };
        assert!(matches!(fresh().await, Err(StoreError::Full(_))));
        assert!(store.remove(&key(0, 0)).await.expect("remove"));
        assert!(matches!(fresh().await, Ok(Claim::Acquired { .. })));
    }

    #[tokio::test(start_paused = true)]
    async fn small_outcome_records_are_never_refused() {
        let store = MemoryStore::with_config(MemoryConfig::default().shards(1).max_bytes(400));
        let k = key(1, 0);
        let Claim::Acquired { token } = store
            .claim(&k, Fingerprint::from_bytes([1; 32]), Lease::freeing(LONG))
            .await
            .expect("room for a claim")
        else {
            panic!("fresh key");
        };
        assert!(matches!(
            store.complete(&k, token, &[0; 1000], LONG).await,
            Err(StoreError::Full(_))
        ));
        store
            .complete(&k, token, &[0; 300], LONG)
            .await
            .expect("a small record replaces its claim");
    }
}
