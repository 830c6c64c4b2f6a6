//! The circuit-breaker seam around the store.
//!
//! When the store is down, every request would otherwise wait for a
//! connection timeout before the engine could fail open or closed. A
//! [`StoreGate`] remembers recent failures and refuses calls for a while, so
//! a dead store costs microseconds. The engine asks [`StoreGate::allow`]
//! before each claim and reports each store call's result.
//!
//! [`ConsecutiveFailures`] is the built-in gate; a full breaker (such as
//! `keel-breaker`) plugs in by implementing the trait.
//!
//! ```
//! use keel_idempotency::gate::{ConsecutiveFailures, StoreGate};
//! use std::time::Duration;
//!
//! # tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap().block_on(async {
//! let gate = ConsecutiveFailures::new(3, Duration::from_secs(1));
//! for _ in 0..3 {
//!     assert!(gate.allow());
//!     gate.on_failure();
//! }
//! assert!(!gate.allow()); // open: the store is not even tried
//! tokio::time::advance(Duration::from_secs(1)).await;
//! assert!(gate.allow()); // one probe after the cool-down
//! assert!(!gate.allow()); // ...and only one
//! gate.on_success();
//! assert!(gate.allow()); // closed again
//! # });
//! ```

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Decides whether the store may be called, from the results of earlier
/// calls.
pub trait StoreGate: Send + Sync + 'static {
    /// True if the store may be called now. When false, the engine treats
    /// the store as unavailable without calling it.
    fn allow(&self) -> bool;
    /// A store call succeeded (including fenced answers: the store is up).
    fn on_success(&self);
    /// A store call failed as unavailable.
    fn on_failure(&self);
}

/// A gate that never refuses: every request tries the store.
///
/// ```
/// use keel_idempotency::gate::{AlwaysAllow, StoreGate};
/// AlwaysAllow.on_failure();
/// assert!(AlwaysAllow.allow());
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct AlwaysAllow;

impl StoreGate for AlwaysAllow {
    fn allow(&self) -> bool {
        true
    }
    fn on_success(&self) {}
    fn on_failure(&self) {}
}

/// Opens after `threshold` consecutive failures; after `cool_down` lets one
/// probe through, which closes it on success or re-opens it on failure.
/// Lock-free, reading tokio's clock.
#[derive(Debug)]
pub struct ConsecutiveFailures {
    threshold: u32,
    cool_down: Duration,
    failures: AtomicU32,
    /// When the gate (re)opened, in nanoseconds since `base`; `u64::MAX`
    /// while closed.
    opened_at: AtomicU64,
    base: Instant,
}

impl Default for ConsecutiveFailures {
    /// Five consecutive failures open it for one second.
    fn default() -> Self {
        Self::new(5, Duration::from_secs(1))
    }
}

impl ConsecutiveFailures {
    /// A gate opening after `threshold` (at least 1) consecutive failures
    /// for `cool_down`.
    ///
    /// ```
    /// use keel_idempotency::gate::{ConsecutiveFailures, StoreGate};
    /// let gate = ConsecutiveFailures::new(1, std::time::Duration::from_secs(5));
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
    /// gate.on_failure();
    /// assert!(!gate.allow());
    /// # });
    /// ```
    pub fn new(threshold: u32, cool_down: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            cool_down,
            failures: AtomicU32::new(0),
            opened_at: AtomicU64::new(u64::MAX),
            base: Instant::now(),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX - 1)
    }

    /// True while the gate refuses calls (ignoring a due probe).
    ///
    /// ```
    /// use keel_idempotency::gate::ConsecutiveFailures;
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
    /// assert!(!ConsecutiveFailures::default().is_open());
    /// # });
    /// ```
    pub fn is_open(&self) -> bool {
        self.opened_at.load(Ordering::Acquire) != u64::MAX
    }
}

impl StoreGate for ConsecutiveFailures {
    fn allow(&self) -> bool {
        let opened = self.opened_at.load(Ordering::Acquire);
        if opened == u64::MAX {
            return true;
        }
        let now = self.now();
        let cool = u64::try_from(self.cool_down.as_nanos()).unwrap_or(u64::MAX);
        if now.saturating_sub(opened) < cool {
            return false;
        }
        // Exactly one caller wins the probe; moving `opened_at` to now keeps
        // the others out for another cool-down.
        self.opened_at
            .compare_exchange(opened, now, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    fn on_success(&self) {
        // Read before writing: on the hot path the gate is closed and this
        // touches a shared cache line only to read it.
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        if self.opened_at.load(Ordering::Relaxed) != u64::MAX {
            self.opened_at.store(u64::MAX, Ordering::Release);
        }
    }

    fn on_failure(&self) {
        let n = self
            .failures
            .fetch_add(1, Ordering::AcqRel)
            .saturating_add(1);
        if n >= self.threshold {
            self.opened_at.store(self.now(), Ordering::Release);
        }
    }
}

/// A [`keel_breaker::Breaker`] as the store gate: the store is skipped
/// (fail-closed 503 or fail-open, per route) while the breaker is open, so a
/// dead store costs an atomic load instead of a timeout, and recovers with
/// the breaker's half-open and gradual-recovery rules.
///
/// ```
/// use std::time::Duration;
/// use keel_breaker::{Breaker, Config};
/// use keel_idempotency::gate::{BreakerGate, StoreGate};
///
/// // Blow on the 3rd failure within 10 s, stay open 5 s (fuse's rule).
/// let breaker = Breaker::new(
///     "idempotency-store",
///     Config::fuse(2, Duration::from_secs(10), Duration::from_secs(5)),
/// )
/// .unwrap();
/// let gate = BreakerGate::new(breaker);
/// for _ in 0..3 {
///     assert!(gate.allow());
///     gate.on_failure();
/// }
/// assert!(!gate.allow(), "open: the store is not called");
/// ```
#[cfg(feature = "breaker")]
#[derive(Clone, Debug)]
pub struct BreakerGate {
    breaker: keel_breaker::Breaker,
}

#[cfg(feature = "breaker")]
impl BreakerGate {
    /// Gates the store with `breaker`.
    pub fn new(breaker: keel_breaker::Breaker) -> Self {
        Self { breaker }
    }

    /// The breaker, for `/status`, metrics and operator overrides.
    pub fn breaker(&self) -> &keel_breaker::Breaker {
        &self.breaker
    }
}

#[cfg(feature = "breaker")]
impl StoreGate for BreakerGate {
    fn allow(&self) -> bool {
        // The engine reports every call's outcome through `on_success` and
        // `on_failure`, without a permit, so admission is `would_allow` (fuse's `ask`).
        self.breaker.would_allow().is_ok()
    }

    fn on_success(&self) {
        self.breaker.record(keel_breaker::Outcome::Success);
    }

    fn on_failure(&self) {
        self.breaker.record(keel_breaker::Outcome::Failure);
    }
}
