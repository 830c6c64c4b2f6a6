//! The storage seam: one small trait that every store implements.
//!
//! A store knows nothing of HTTP. It keeps, per [`StoreKey`], a live claim
//! (someone is executing the operation under a lease), an abandoned claim
//! (the lease lapsed with no outcome recorded), or a completed result (an
//! opaque payload the engine encoded), each with an expiry. Its operations
//! are each a single atomic step in the store (never check-then-act):
//!
//! - [`Store::claim`]: take the key if it is free, or tell what holds it;
//! - [`Store::renew`]: extend the caller's lease while the work runs;
//! - [`Store::complete`]: replace the caller's claim with a result, but only
//!   while the caller still holds it (fencing);
//! - [`Store::release`]: give the claim up so that a retry may execute;
//! - [`Store::inspect`] and [`Store::remove`]: an operator's view of a key,
//!   and the release of a key locked after a lapse.
//!
//! Every store must pass the `conformance` suite (cargo feature
//! `conformance`).
//!
//! # Key states
//!
//! ```text
//!            claim                complete
//!   free ──────────► held ─────────────────► completed ──(ttl)──► free
//!    ▲                │ ▲ renew
//!    │      release   │ └──┘
//!    ├────────────────┤
//!    │                │ lease lapses
//!    │                ▼
//!    │ (Lapse::Free)  lapsed ──(Lapse::Lock)──► abandoned ──(lock time)──► free
//!    └────────────────┘                         (operator remove ──► free)
//! ```
//!
//! # Fencing
//!
//! A claim's lease can lapse while its holder is still running (a long GC
//! pause, a store it could not reach to renew). From then on the holder's
//! late `renew`, `complete` or `release` is refused with
//! [`StoreError::Fenced`], so it cannot overwrite what the key became. Under
//! [`Lapse::Free`] the next claim wins with a higher [`FencingToken`].
//! Tokens issued for one key strictly increase over the life of the store,
//! across lapse, release, expiry and removal.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

/// A boxed, sendable future: what the object-safe [`Store`] methods return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The full lookup key of one idempotent operation.
///
/// The engine builds it from the tenant, the method, the route and the
/// client's key, then hashes it, so a store sees a short printable-ASCII
/// string (at most [`StoreKey::MAX_LEN`] bytes) it can use as is. Beside
/// the string it carries a digest of the tenant, so a store that bounds its
/// capacity (the memory store) can give each tenant a share of its own, and
/// whether the string ends with such a digest (the keys the engine and
/// [`crate::consumer`] make do; [`StoreKey::new`]'s keys do not), so the
/// memory store may hash those cheaply. Like the tenant, that mark is part
/// of the key's identity (`==`) but not of its text: stores that index
/// keys by text (all but the memory store) see one record either way.
///
/// ```
/// use keel_idempotency::store::StoreKey;
///
/// let key = StoreKey::new("t1:POST:/orders:abc").unwrap();
/// assert_eq!(key.as_str(), "t1:POST:/orders:abc");
/// assert_eq!(key.tenant(), 0);
/// assert_eq!(key.with_tenant(7).tenant(), 7);
/// assert!(StoreKey::new("").is_none());
/// assert!(StoreKey::new("tab\tinside").is_none());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct StoreKey {
    /// Shared, so a store that keeps the key (the memory store's map)
    /// takes it without a copy.
    key: std::sync::Arc<str>,
    tenant: u64,
    /// The text ends with 64 hex digits of a digest the engine computed
    /// (not text a caller chose).
    digest: bool,
}

/// Hashes the key string alone: the engine's keys already digest the
/// tenant, so hashing the tenant again would only cost every map lookup
/// (keys equal as a whole have equal strings, so `Hash` agrees with `Eq`).
impl std::hash::Hash for StoreKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.key.hash(state);
    }
}

impl StoreKey {
    /// The longest key a store must accept, in bytes.
    pub const MAX_LEN: usize = 200;

    /// Wraps `key` if it is 1 to [`Self::MAX_LEN`] bytes of printable ASCII
    /// (`'!'..='~'`), otherwise `None`. The key belongs to no tenant (0).
    pub fn new(key: impl Into<String>) -> Option<Self> {
        let key = key.into();
        let ok = !key.is_empty()
            && key.len() <= Self::MAX_LEN
            && key.bytes().all(|b| b.is_ascii_graphic());
        ok.then(|| Self {
            key: key.into(),
            tenant: 0,
            digest: false,
        })
    }

    /// The key `namespace:` and the 64 lower-case hex digits of `digest`
    /// (a digest the caller computed from the key's parts), or the digits
    /// alone if that is too long; the memory store may then hash it
    /// cheaply. `namespace` must be printable ASCII (the engine and the
    /// consumer keep theirs so).
    pub(crate) fn from_digest(namespace: &str, digest: &[u8; 32]) -> Self {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        debug_assert!(namespace.bytes().all(|b| b.is_ascii_graphic()));
        // Laid out on the stack, so the key's one allocation is its own.
        let mut buf = [0u8; Self::MAX_LEN];
        let start = if namespace.len() + 1 + 64 <= Self::MAX_LEN {
            buf[..namespace.len()].copy_from_slice(namespace.as_bytes());
            buf[namespace.len()] = b':';
            namespace.len() + 1
        } else {
            0
        };
        for (pair, byte) in buf[start..start + 64].chunks_exact_mut(2).zip(digest) {
            pair[0] = HEX[usize::from(byte >> 4)];
            pair[1] = HEX[usize::from(byte & 0xf)];
        }
        let text = std::str::from_utf8(&buf[..start + 64]).expect("printable ASCII");
        Self {
            key: text.into(),
            tenant: 0,
            digest: true,
        }
    }

    /// The 32 hex digits that end a key made by
    /// [`from_digest`](Self::from_digest) (half of its digest: 128 bits),
    /// or `None` for a key whose text a caller chose.
    pub(crate) fn digest_tail(&self) -> Option<&[u8; 32]> {
        if !self.digest {
            return None;
        }
        let bytes = self.key.as_bytes();
        bytes[bytes.len() - 32..].try_into().ok()
    }

    /// The same key, charged to `tenant` (a digest of the tenant; 0 for
    /// none).
    ///
    /// ```
    /// # use keel_idempotency::store::StoreKey;
    /// let key = StoreKey::new("k").unwrap().with_tenant(42);
    /// assert_eq!((key.as_str(), key.tenant()), ("k", 42));
    /// ```
    pub fn with_tenant(mut self, tenant: u64) -> Self {
        self.tenant = tenant;
        self
    }

    /// The tenant digest the key is charged to; 0 for none.
    ///
    /// ```
    /// # use keel_idempotency::store::StoreKey;
    /// assert_eq!(StoreKey::new("k").unwrap().tenant(), 0);
    /// ```
    pub fn tenant(&self) -> u64 {
        self.tenant
    }

    /// The key as a string slice.
    ///
    /// ```
    /// # use keel_idempotency::store::StoreKey;
    /// assert_eq!(StoreKey::new("k").unwrap().as_str(), "k");
    /// ```
    pub fn as_str(&self) -> &str {
        &self.key
    }
}

impl std::fmt::Display for StoreKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.key)
    }
}

/// A digest of the request (method, path, query, body and chosen headers).
///
/// Stored with the claim and the result so that a key reused for a different
/// request is caught (422). Always 32 bytes in a store; what they hold is
/// told by [`Fingerprint::kind`] (see [`crate::fingerprint`]).
///
/// ```
/// use keel_idempotency::store::Fingerprint;
///
/// let fp = Fingerprint::from_bytes([7; 32]);
/// assert_eq!(fp.as_bytes(), &[7; 32]);
/// assert_eq!(fp.to_hex().len(), 64);
/// assert_eq!(Fingerprint::from_hex(&fp.to_hex()), Some(fp));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

/// How a [`Fingerprint`] was computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FingerprintKind {
    /// XXH3-128 (16 bytes) followed by [`Fingerprint::XXH3_TAG`]: what
    /// the engine computes.
    Xxh3,
    /// Any other 32 bytes: a BLAKE3 digest, as earlier versions of Keel
    /// stored (or bytes a caller chose, such as a consumer's constant).
    Blake3,
}

impl Fingerprint {
    /// The last 16 bytes of an XXH3 fingerprint. A BLAKE3 digest ends with
    /// them only by a 2^-128 chance.
    pub const XXH3_TAG: [u8; 16] = *b"keel-fp:xxh3-128";

    /// The fingerprint of an XXH3-128 digest: its 16 bytes (big endian)
    /// and [`Fingerprint::XXH3_TAG`].
    ///
    /// ```
    /// # use keel_idempotency::store::{Fingerprint, FingerprintKind};
    /// let fp = Fingerprint::from_xxh3(7);
    /// assert_eq!(fp.kind(), FingerprintKind::Xxh3);
    /// assert_eq!(fp.as_bytes()[15], 7);
    /// assert_eq!(Fingerprint::from_bytes([7; 32]).kind(), FingerprintKind::Blake3);
    /// ```
    pub const fn from_xxh3(digest: u128) -> Self {
        let mut bytes = [0u8; 32];
        let d = digest.to_be_bytes();
        let mut i = 0;
        while i < 16 {
            bytes[i] = d[i];
            bytes[16 + i] = Self::XXH3_TAG[i];
            i += 1;
        }
        Self(bytes)
    }

    /// How the fingerprint was computed, told by its last 16 bytes.
    pub fn kind(&self) -> FingerprintKind {
        if self.0[16..] == Self::XXH3_TAG {
            FingerprintKind::Xxh3
        } else {
            FingerprintKind::Blake3
        }
    }

    /// The fingerprint with these 32 bytes (a store reading one back).
    ///
    /// ```
    /// # use keel_idempotency::store::Fingerprint;
    /// assert_eq!(Fingerprint::from_bytes([1; 32]), Fingerprint::from([1; 32]));
    /// ```
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The 32 bytes (what a store writes).
    ///
    /// ```
    /// # use keel_idempotency::store::Fingerprint;
    /// assert_eq!(Fingerprint::from_bytes([2; 32]).as_bytes()[0], 2);
    /// ```
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lower-case hex, 64 characters.
    ///
    /// ```
    /// # use keel_idempotency::store::Fingerprint;
    /// assert!(Fingerprint::from_bytes([0xab; 32]).to_hex().starts_with("abab"));
    /// ```
    pub fn to_hex(&self) -> String {
        use std::fmt::Write;
        self.0.iter().fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
    }

    /// Parses 64 hex characters, as written by [`Fingerprint::to_hex`].
    ///
    /// ```
    /// # use keel_idempotency::store::Fingerprint;
    /// assert_eq!(Fingerprint::from_hex("zz"), None);
    /// ```
    pub fn from_hex(hex: &str) -> Option<Self> {
        if hex.len() != 64 || !hex.is_ascii() {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Self(out))
    }
}

impl From<[u8; 32]> for Fingerprint {
    fn from(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }
}

/// Identifies one claim of a key; strictly increasing per key.
///
/// ```
/// use keel_idempotency::store::FencingToken;
/// assert!(FencingToken::new(2) > FencingToken::new(1));
/// assert_eq!(FencingToken::new(7).get(), 7);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FencingToken(u64);

impl FencingToken {
    /// The token numbered `n` (a store issuing or reading one back).
    ///
    /// ```
    /// # use keel_idempotency::store::FencingToken;
    /// assert_eq!(FencingToken::new(3).get(), 3);
    /// ```
    pub const fn new(n: u64) -> Self {
        Self(n)
    }

    /// Its number.
    ///
    /// ```
    /// # use keel_idempotency::store::FencingToken;
    /// assert_eq!(FencingToken::new(9).get(), 9);
    /// ```
    pub const fn get(self) -> u64 {
        self.0
    }
}

/// The terms of a claim: how long it holds without renewal, and what its
/// lapse means.
///
/// A claim lapses when its holder neither finishes nor [renews](Store::renew)
/// it in time: the holder crashed, or lost the store. Since the holder may
/// have sent the request before it vanished, the safe reading of a lapse is
/// "outcome unknown": with [`Lapse::Lock`] the key stays locked (claims get
/// [`Claim::Abandoned`]) until the lock's time is up or an operator
/// [removes](Store::remove) the key. [`Lapse::Free`] lets the next claim
/// take the key over instead: at-least-once after a crash, for operations
/// that are safe to run twice.
///
/// ```
/// use keel_idempotency::store::{Lapse, Lease};
/// use std::time::Duration;
///
/// let lease = Lease::locking(Duration::from_secs(10), Duration::from_secs(86_400));
/// assert_eq!(lease.hold, Duration::from_secs(10));
/// assert_eq!(lease.lapse, Lapse::Lock(Duration::from_secs(86_400)));
/// assert_eq!(Lease::freeing(Duration::from_secs(10)).lapse, Lapse::Free);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    /// How long the claim holds from its claim or last renewal.
    pub hold: Duration,
    /// What the key becomes when the claim lapses.
    pub lapse: Lapse,
}

/// What a lapsed claim makes of its key; see [`Lease`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lapse {
    /// The key stays locked as abandoned for this long after the lapse.
    Lock(Duration),
    /// The key is free: the next claim acquires it.
    Free,
}

impl Lease {
    /// A lease of `hold` whose lapse locks the key for `lock_for`.
    ///
    /// ```
    /// # use keel_idempotency::store::Lease;
    /// # use std::time::Duration;
    /// let lease = Lease::locking(Duration::from_secs(5), Duration::from_secs(60));
    /// assert_eq!(lease.record_life(), Duration::from_secs(65));
    /// ```
    pub fn locking(hold: Duration, lock_for: Duration) -> Self {
        Self {
            hold,
            lapse: Lapse::Lock(lock_for),
        }
    }

    /// A lease of `hold` whose lapse frees the key.
    ///
    /// ```
    /// # use keel_idempotency::store::Lease;
    /// # use std::time::Duration;
    /// assert_eq!(Lease::freeing(Duration::from_secs(5)).record_life(), Duration::from_secs(5));
    /// ```
    pub fn freeing(hold: Duration) -> Self {
        Self {
            hold,
            lapse: Lapse::Free,
        }
    }

    /// How long, from the claim or its last renewal, the store keeps the
    /// claim's record: the hold, plus the lock after a lapse.
    pub fn record_life(&self) -> Duration {
        match self.lapse {
            Lapse::Lock(lock_for) => self.hold.saturating_add(lock_for),
            Lapse::Free => self.hold,
        }
    }
}

/// What [`Store::claim`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The key was free (never used, released, removed, or its record
    /// expired, or its lease lapsed under [`Lapse::Free`]): the caller now
    /// holds it under a lease and must [`complete`](Store::complete) or
    /// [`release`](Store::release) it with this token, and
    /// [`renew`](Store::renew) it while the work runs.
    Acquired {
        /// The caller's fencing token.
        token: FencingToken,
    },
    /// Another caller holds a live lease on the key.
    InFlight {
        /// The fingerprint the holder claimed with.
        fingerprint: Fingerprint,
        /// Time left on the holder's lease (a fair `Retry-After`).
        retry_after: Duration,
    },
    /// A result is stored for the key.
    Completed {
        /// The fingerprint of the request that produced the result.
        fingerprint: Fingerprint,
        /// The engine's encoded result, byte for byte as completed.
        payload: Vec<u8>,
    },
    /// A claim lapsed under [`Lapse::Lock`]: its holder vanished without
    /// recording an outcome, so the operation may or may not have run. The
    /// key stays locked until the lock's time is up or an operator removes
    /// it.
    Abandoned {
        /// The fingerprint the vanished holder claimed with.
        fingerprint: Fingerprint,
    },
}

/// What a key holds, as [`Store::inspect`] reports it to an operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyState {
    /// A live claim.
    Held {
        /// The holder's fingerprint.
        fingerprint: Fingerprint,
        /// The holder's token.
        token: FencingToken,
        /// Time left on the lease.
        lease_left: Duration,
    },
    /// A claim whose lease lapsed under [`Lapse::Lock`].
    Abandoned {
        /// The vanished holder's fingerprint.
        fingerprint: Fingerprint,
        /// The vanished holder's token.
        token: FencingToken,
        /// Time left before the lock ends by itself.
        expires_in: Duration,
    },
    /// A stored result.
    Completed {
        /// The fingerprint of the request that produced it.
        fingerprint: Fingerprint,
        /// The engine's encoded result.
        payload: Vec<u8>,
        /// Time left before the result expires.
        expires_in: Duration,
    },
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store could not be reached or did not answer in time. The engine
    /// fails closed (503) or open, per route.
    #[error("idempotency store unavailable: {0}")]
    Unavailable(String),
    /// The token no longer holds the key: the lease expired and another
    /// claim won, or the claim was completed or released already.
    #[error("claim was fenced off: the key is no longer held by this token")]
    Fenced,
    /// The store held something it could not read.
    #[error("idempotency store returned corrupt data: {0}")]
    Corrupt(String),
    /// The store is healthy but has no room for a new claim (a bounded
    /// memory store at capacity, a tenant over its share, a full disk).
    /// Existing claims and results are kept; new claims are refused until
    /// records expire.
    #[error("idempotency store is full: {0}")]
    Full(String),
}

/// A place to keep claims and results.
///
/// Implementations: [`crate::memory`], [`crate::embedded`], [`crate::redis`]
/// and [`crate::postgres`]; each passes the `conformance` suite.
pub trait Store: Send + Sync + 'static {
    /// Atomically claims `key` under `lease` with `fingerprint`, or reports
    /// the live claim, stored result or abandoned claim already there.
    fn claim<'a>(
        &'a self,
        key: &'a StoreKey,
        fingerprint: Fingerprint,
        lease: Lease,
    ) -> BoxFuture<'a, Result<Claim, StoreError>>;

    /// [`Store::claim`] done at once, for a store whose operations never
    /// wait (the memory store); `None`, the default, means "call `claim`".
    /// The engine asks this first: it saves boxing a future per request.
    fn claim_now(
        &self,
        key: &StoreKey,
        fingerprint: Fingerprint,
        lease: Lease,
    ) -> Option<Result<Claim, StoreError>> {
        let _ = (key, fingerprint, lease);
        None
    }

    /// [`Store::complete`] done at once, as [`Store::claim_now`], with the
    /// payload handed over: a store that keeps the bytes (the memory store)
    /// takes them without a copy. `Err(payload)`, the default, hands the
    /// payload back: call `complete`. An answer given at once is final:
    /// the engine does not retry it (only a store that answers at once,
    /// with no connection to lose, should implement this).
    fn complete_now(
        &self,
        key: &StoreKey,
        token: FencingToken,
        payload: Vec<u8>,
        ttl: Duration,
    ) -> Result<Result<(), StoreError>, Vec<u8>> {
        let _ = (key, token, ttl);
        Err(payload)
    }

    /// Extends the live claim held by `token` to `lease.hold` from now (and
    /// its record's life to [`Lease::record_life`] from now). Fails with
    /// [`StoreError::Fenced`] unless `key` is claimed by exactly `token`
    /// with its lease not yet lapsed.
    fn renew<'a>(
        &'a self,
        key: &'a StoreKey,
        token: FencingToken,
        lease: Lease,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// What `key` holds now, or `None` if it is free. For operators: not on
    /// any request's path.
    fn inspect<'a>(
        &'a self,
        key: &'a StoreKey,
    ) -> BoxFuture<'a, Result<Option<KeyState>, StoreError>>;

    /// Removes whatever `key` holds (a claim, an abandoned claim or a
    /// result), returning whether there was anything. For an operator who
    /// has reconciled an abandoned key; the next claim acquires it with a
    /// higher token than any before, so a late holder stays fenced.
    fn remove<'a>(&'a self, key: &'a StoreKey) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Replaces the claim held by `token` with `payload`, kept for `ttl`.
    /// Fails with [`StoreError::Fenced`] unless `key` is claimed, in flight,
    /// by exactly `token`.
    fn complete<'a>(
        &'a self,
        key: &'a StoreKey,
        token: FencingToken,
        payload: &'a [u8],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Gives up the claim held by `token`, so the next claim acquires the
    /// key. Fails with [`StoreError::Fenced`] unless `key` is claimed, in
    /// flight, by exactly `token`.
    fn release<'a>(
        &'a self,
        key: &'a StoreKey,
        token: FencingToken,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Deletes expired records, returning how many went. Stores whose
    /// backend expires keys itself (Redis) keep the default, which does
    /// nothing.
    fn purge_expired(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async { Ok(0) })
    }

    /// A short name for logs and metrics (`"memory"`, `"redis"`, ...).
    fn name(&self) -> &'static str;
}

impl<S: Store + ?Sized> Store for std::sync::Arc<S> {
    fn claim<'a>(
        &'a self,
        key: &'a StoreKey,
        fingerprint: Fingerprint,
        lease: Lease,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        (**self).claim(key, fingerprint, lease)
    }

    fn claim_now(
        &self,
        key: &StoreKey,
        fingerprint: Fingerprint,
        lease: Lease,
    ) -> Option<Result<Claim, StoreError>> {
        (**self).claim_now(key, fingerprint, lease)
    }

    fn complete_now(
        &self,
        key: &StoreKey,
        token: FencingToken,
        payload: Vec<u8>,
        ttl: Duration,
    ) -> Result<Result<(), StoreError>, Vec<u8>> {
        (**self).complete_now(key, token, payload, ttl)
    }

    fn renew<'a>(
        &'a self,
        key: &'a StoreKey,
        token: FencingToken,
        lease: Lease,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        (**self).renew(key, token, lease)
    }

    fn inspect<'a>(
        &'a self,
        key: &'a StoreKey,
    ) -> BoxFuture<'a, Result<Option<KeyState>, StoreError>> {
        (**self).inspect(key)
    }

    fn remove<'a>(&'a self, key: &'a StoreKey) -> BoxFuture<'a, Result<bool, StoreError>> {
        (**self).remove(key)
    }

    fn complete<'a>(
        &'a self,
        key: &'a StoreKey,
        token: FencingToken,
        payload: &'a [u8],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        (**self).complete(key, token, payload, ttl)
    }

    fn release<'a>(
        &'a self,
        key: &'a StoreKey,
        token: FencingToken,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        (**self).release(key, token)
    }

    fn purge_expired(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        (**self).purge_expired()
    }

    fn name(&self) -> &'static str {
        (**self).name()
    }
}
