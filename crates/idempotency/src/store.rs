//! The storage seam: one small trait that every store implements.
//!
//! A store knows nothing of HTTP. It keeps, per [`StoreKey`], either a live
//! claim (someone is executing the operation under a lease) or a completed
//! result (an opaque payload the engine encoded), each with an expiry. Three
//! operations, each a single atomic step in the store (never
//! check-then-act):
//!
//! - [`Store::claim`]: take the key if it is free, or tell who has it;
//! - [`Store::complete`]: replace the caller's claim with a result, but only
//!   while the caller still holds it (fencing);
//! - [`Store::release`]: give the claim up so that a retry may execute.
//!
//! Every store must pass [`crate::conformance`].
//!
//! # Fencing
//!
//! A claim's lease can expire while its holder is still running (a long GC
//! pause, a hung upstream). The next claim then wins with a higher
//! [`FencingToken`], and the old holder's late `complete` or `release` is
//! refused with [`StoreError::Fenced`], so it cannot overwrite the newer
//! record. Tokens issued for one key strictly increase over the life of the
//! store, across expiry and release.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

/// A boxed, sendable future: what the object-safe [`Store`] methods return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The full lookup key of one idempotent operation.
///
/// The engine builds it from the tenant, the method, the route and the
/// client's key, then hashes it, so a store sees a short printable-ASCII
/// string (at most [`StoreKey::MAX_LEN`] bytes) it can use as is.
///
/// ```
/// use keel_idempotency::store::StoreKey;
///
/// let key = StoreKey::new("t1:POST:/orders:abc").unwrap();
/// assert_eq!(key.as_str(), "t1:POST:/orders:abc");
/// assert!(StoreKey::new("").is_none());
/// assert!(StoreKey::new("tab\tinside").is_none());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StoreKey(String);

impl StoreKey {
    /// The longest key a store must accept, in bytes.
    pub const MAX_LEN: usize = 200;

    /// Wraps `key` if it is 1 to [`Self::MAX_LEN`] bytes of printable ASCII
    /// (`'!'..='~'`), otherwise `None`.
    pub fn new(key: impl Into<String>) -> Option<Self> {
        let key = key.into();
        let ok = !key.is_empty()
            && key.len() <= Self::MAX_LEN
            && key.bytes().all(|b| b.is_ascii_graphic());
        ok.then_some(Self(key))
    }

    /// The key as a string slice.
    ///
    /// ```
    /// # use keel_idempotency::store::StoreKey;
    /// assert_eq!(StoreKey::new("k").unwrap().as_str(), "k");
    /// ```
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for StoreKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A digest of the request (method, path, query, body and chosen headers).
///
/// Stored with the claim and the result so that a key reused for a different
/// request is caught (422).
///
/// ```
/// use keel_idempotency::store::Fingerprint;
///
/// let fp = Fingerprint([7; 32]);
/// assert_eq!(fp.to_hex().len(), 64);
/// assert_eq!(Fingerprint::from_hex(&fp.to_hex()), Some(fp));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// Lower-case hex, 64 characters.
    pub fn to_hex(&self) -> String {
        use std::fmt::Write;
        self.0.iter().fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
    }

    /// Parses 64 hex characters, as written by [`Fingerprint::to_hex`].
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

/// Identifies one claim of a key; strictly increasing per key.
///
/// ```
/// use keel_idempotency::store::FencingToken;
/// assert!(FencingToken(2) > FencingToken(1));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FencingToken(pub u64);

/// What [`Store::claim`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The key was free (never used, released, or its lease or record
    /// expired): the caller now holds it under a lease and must
    /// [`complete`](Store::complete) or [`release`](Store::release) it with
    /// this token.
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
}

/// A place to keep claims and results.
///
/// Implementations: [`crate::memory`], [`crate::embedded`], [`crate::redis`]
/// and [`crate::postgres`]; each passes [`crate::conformance`].
pub trait Store: Send + Sync + 'static {
    /// Atomically claims `key` for `lease` with `fingerprint`, or reports the
    /// live claim or stored result that is already there.
    fn claim<'a>(
        &'a self,
        key: &'a StoreKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, StoreError>>;

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
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        (**self).claim(key, fingerprint, lease)
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
