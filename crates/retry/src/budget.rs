//! Retry budgets: a cap on retries shared by every caller of a client, so
//! that a sick dependency sees at most a bounded extra load. Both budgets
//! are atomics only; share them with `Arc`.

use std::sync::atomic::{AtomicU64, Ordering::*};
use std::time::Duration;
use tokio::time::Instant;

/// A shared allowance of retries. Implementations must be lock-free: every
/// call of every task goes through them.
///
/// ```
/// use keel_retry::{Budget, TokenBucket};
/// let b = TokenBucket::grpc();
/// b.on_outcome(false);
/// assert!(b.try_retry());
/// ```
pub trait Budget: Send + Sync {
    /// A first attempt was made (ratio budgets earn from these).
    fn on_request(&self) {}
    /// An attempt finished, successfully or not.
    fn on_outcome(&self, success: bool) {
        let _ = success;
    }
    /// May a retry be made now? `true` consumes the allowance.
    fn try_retry(&self) -> bool;
}

/// gRPC's retry throttling: a bucket of `max` tokens (starting full);
/// each failure costs 1, each success adds `ratio`; no retries while the
/// bucket holds `max / 2` tokens or fewer.
///
/// ```
/// use keel_retry::{Budget, TokenBucket};
/// let b = TokenBucket::new(10.0, 0.1);
/// for _ in 0..5 { b.on_outcome(false); }
/// assert!(!b.try_retry(), "5 of 10 tokens left: at the threshold");
/// for _ in 0..10 { b.on_outcome(true); }
/// assert!(b.try_retry());
/// ```
#[derive(Debug)]
pub struct TokenBucket {
    /// Thousandths of a token, so fractional success credit stays exact.
    milli: AtomicU64,
    max: u64,
    credit: u64,
}

impl TokenBucket {
    /// A bucket of `max` tokens earning `ratio` per success. Negative or
    /// non-finite values are treated as zero.
    ///
    /// ```
    /// let b = keel_retry::TokenBucket::new(4.0, 0.5);
    /// assert_eq!(b.tokens(), 4.0);
    /// ```
    pub fn new(max: f64, ratio: f64) -> Self {
        let milli = |x: f64| {
            if x.is_finite() && x > 0.0 {
                (x * 1000.0).round() as u64
            } else {
                0
            }
        };
        let max = milli(max);
        Self {
            milli: AtomicU64::new(max),
            max,
            credit: milli(ratio),
        }
    }

    /// gRPC's example values: 10 tokens, 0.1 per success.
    ///
    /// ```
    /// assert_eq!(keel_retry::TokenBucket::grpc().tokens(), 10.0);
    /// ```
    pub fn grpc() -> Self {
        Self::new(10.0, 0.1)
    }

    /// Tokens now.
    ///
    /// ```
    /// use keel_retry::Budget;
    /// let b = keel_retry::TokenBucket::grpc();
    /// b.on_outcome(false);
    /// assert_eq!(b.tokens(), 9.0);
    /// ```
    pub fn tokens(&self) -> f64 {
        self.milli.load(Acquire) as f64 / 1000.0
    }
}

impl Budget for TokenBucket {
    fn on_outcome(&self, success: bool) {
        let _ = self.milli.fetch_update(AcqRel, Acquire, |t| {
            Some(if success {
                (t + self.credit).min(self.max)
            } else {
                t.saturating_sub(1000)
            })
        });
    }

    fn try_retry(&self) -> bool {
        self.milli.load(Acquire) > self.max / 2
    }
}

struct Bucket {
    epoch: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
}

const NO_EPOCH: u64 = u64::MAX;

/// Retries at most `ratio` of the requests made in the last `ttl`, plus a
/// floor of `min_per_sec` retries per second so that a quiet client can
/// still retry (Finagle / Envoy / SRE-book style).
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
/// use keel_retry::{Budget, RatioBudget};
/// use std::time::Duration;
/// let b = RatioBudget::new(0.1, 0, Duration::from_secs(10));
/// for _ in 0..100 { b.on_request(); }
/// let granted = (0..50).filter(|_| b.try_retry()).count();
/// assert_eq!(granted, 10);
/// # });
/// ```
pub struct RatioBudget {
    ratio_ppm: u64,
    reserve: u64,
    buckets: Box<[Bucket]>,
    bucket_nanos: u64,
    base: Instant,
}

impl std::fmt::Debug for RatioBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RatioBudget")
            .field("ratio", &(self.ratio_ppm as f64 / 1e6))
            .field("reserve", &self.reserve)
            .finish()
    }
}

const BUCKETS: u64 = 10;

impl RatioBudget {
    /// At most `ratio` retries per request over `ttl`, and at least
    /// `min_per_sec * ttl` retries per `ttl`.
    ///
    /// ```
    /// let b = keel_retry::RatioBudget::new(0.2, 3, std::time::Duration::from_secs(10));
    /// assert_eq!(b.available(), 30);
    /// ```
    pub fn new(ratio: f64, min_per_sec: u32, ttl: Duration) -> Self {
        let ratio = if ratio.is_finite() {
            ratio.clamp(0.0, 1000.0)
        } else {
            0.0
        };
        let ttl_nanos = u64::try_from(ttl.as_nanos())
            .unwrap_or(u64::MAX)
            .max(BUCKETS);
        Self {
            ratio_ppm: (ratio * 1e6).round() as u64,
            reserve: (u128::from(min_per_sec) * u128::from(ttl_nanos) / 1_000_000_000) as u64,
            buckets: (0..BUCKETS)
                .map(|_| Bucket {
                    epoch: AtomicU64::new(NO_EPOCH),
                    requests: AtomicU64::new(0),
                    retries: AtomicU64::new(0),
                })
                .collect(),
            bucket_nanos: ttl_nanos / BUCKETS,
            base: Instant::now(),
        }
    }

    /// The SRE book's client rule: retries under 10 % of requests
    /// (with a floor of 10 per second over 10 s).
    ///
    /// ```
    /// let b = keel_retry::RatioBudget::sre();
    /// assert_eq!(b.available(), 100);
    /// ```
    pub fn sre() -> Self {
        Self::new(0.1, 10, Duration::from_secs(10))
    }

    fn epoch(&self) -> u64 {
        let nanos = u64::try_from(
            Instant::now()
                .saturating_duration_since(self.base)
                .as_nanos(),
        )
        .unwrap_or(u64::MAX - 1);
        nanos / self.bucket_nanos
    }

    fn current(&self, epoch: u64) -> &Bucket {
        let b = &self.buckets[(epoch % BUCKETS) as usize];
        let seen = b.epoch.load(Acquire);
        if seen != epoch
            && b.epoch
                .compare_exchange(seen, epoch, AcqRel, Acquire)
                .is_ok()
        {
            b.requests.store(0, Release);
            b.retries.store(0, Release);
        }
        b
    }

    fn totals(&self, epoch: u64) -> (u64, u64) {
        let (mut req, mut ret) = (0, 0);
        for b in self.buckets.iter() {
            let e = b.epoch.load(Acquire);
            if e != NO_EPOCH && e <= epoch && epoch - e < BUCKETS {
                req += b.requests.load(Acquire);
                ret += b.retries.load(Acquire);
            }
        }
        (req, ret)
    }

    fn allowance(&self, requests: u64) -> u64 {
        self.reserve + (u128::from(requests) * u128::from(self.ratio_ppm) / 1_000_000) as u64
    }

    /// Retries that could be granted now.
    ///
    /// ```
    /// use keel_retry::Budget;
    /// let b = keel_retry::RatioBudget::new(0.5, 0, std::time::Duration::from_secs(1));
    /// b.on_request();
    /// b.on_request();
    /// assert_eq!(b.available(), 1);
    /// ```
    pub fn available(&self) -> u64 {
        let (req, ret) = self.totals(self.epoch());
        self.allowance(req).saturating_sub(ret)
    }
}

impl Budget for RatioBudget {
    fn on_request(&self) {
        self.current(self.epoch()).requests.fetch_add(1, AcqRel);
    }

    fn try_retry(&self) -> bool {
        let epoch = self.epoch();
        let b = self.current(epoch);
        // Take first, then check: concurrent callers can never both take
        // the last retry.
        b.retries.fetch_add(1, AcqRel);
        let (req, ret) = self.totals(epoch);
        if ret > self.allowance(req) {
            // Saturating: a bucket reset in between must not wrap.
            let _ = b
                .retries
                .fetch_update(AcqRel, Acquire, |x| Some(x.saturating_sub(1)));
            false
        } else {
            true
        }
    }
}
