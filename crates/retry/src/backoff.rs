//! Backoff strategies. The cap is applied before jitter, and every jitter
//! draws inside `[0, capped]`, so no delay ever exceeds the cap.

use std::sync::Arc;
use std::time::Duration;

/// How a delay is randomised (Marc Brooker's names).
///
/// ```
/// use keel_retry::Jitter;
/// assert_ne!(Jitter::Full, Jitter::Equal);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Jitter {
    /// `t`: no randomness (clients that fail together retry together).
    None,
    /// `random(0, t)`: the least total work.
    Full,
    /// `t/2 + random(0, t/2)`: never shorter than half.
    Equal,
    /// `min(cap, random(base, prev * 3))`: grows from the previous delay.
    Decorrelated,
}

type CustomFn = Arc<dyn Fn(u32, Duration) -> Duration + Send + Sync>;

#[derive(Clone)]
enum Kind {
    Constant(Duration),
    Exponential { base: Duration, factor: f64 },
    Custom(CustomFn),
}

impl std::fmt::Debug for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Kind::Constant(d) => f.debug_tuple("Constant").field(d).finish(),
            Kind::Exponential { base, factor } => f
                .debug_struct("Exponential")
                .field("base", base)
                .field("factor", factor)
                .finish(),
            Kind::Custom(_) => f.write_str("Custom"),
        }
    }
}

/// A backoff strategy (configuration); [`Backoff::iter`] gives the delays.
///
/// With `t = min(cap, base * factor^n)` for the n-th retry (from 0):
/// full jitter draws `random(0, t)`, equal `t/2 + random(0, t/2)`,
/// decorrelated `min(cap, random(base, prev * 3))`. The cap holds with
/// jitter included.
///
/// ```
/// use keel_retry::{Backoff, Jitter};
/// use std::time::Duration;
/// let b = Backoff::exponential(Duration::from_millis(100))
///     .cap(Duration::from_secs(2))
///     .jitter(Jitter::Full)
///     .seed(7);
/// let delays: Vec<_> = b.iter().take(10).collect();
/// assert!(delays.iter().all(|d| *d <= Duration::from_secs(2)));
/// ```
#[derive(Debug, Clone)]
pub struct Backoff {
    kind: Kind,
    cap: Duration,
    jitter: Jitter,
    seed: Option<u64>,
}

impl Backoff {
    /// The same delay every time (jitter, if set, randomises it).
    ///
    /// ```
    /// use keel_retry::Backoff;
    /// use std::time::Duration;
    /// let mut it = Backoff::constant(Duration::from_secs(1)).iter();
    /// assert_eq!(it.next(), Some(Duration::from_secs(1)));
    /// ```
    pub fn constant(delay: Duration) -> Self {
        Self {
            kind: Kind::Constant(delay),
            cap: delay,
            jitter: Jitter::None,
            seed: None,
        }
    }

    /// `base * 2^n`, capped at 30 s unless [`cap`](Self::cap) says
    /// otherwise; no jitter unless [`jitter`](Self::jitter) says so.
    ///
    /// ```
    /// use keel_retry::Backoff;
    /// use std::time::Duration;
    /// let d: Vec<_> = Backoff::exponential(Duration::from_millis(10)).iter().take(3).collect();
    /// assert_eq!(d, [10, 20, 40].map(Duration::from_millis));
    /// ```
    pub fn exponential(base: Duration) -> Self {
        Self {
            kind: Kind::Exponential { base, factor: 2.0 },
            cap: Duration::from_secs(30),
            jitter: Jitter::None,
            seed: None,
        }
    }

    /// gRPC's connection backoff: 1 s, x1.6, capped at 120 s, with
    /// jitter (equal jitter here, which keeps gRPC's "at least most of
    /// the delay" spirit while never exceeding the cap).
    ///
    /// ```
    /// use keel_retry::Backoff;
    /// use std::time::Duration;
    /// let mut it = Backoff::grpc().seed(1).iter();
    /// let first = it.next().unwrap();
    /// assert!(first >= Duration::from_millis(500) && first <= Duration::from_secs(1));
    /// ```
    pub fn grpc() -> Self {
        Self::exponential(Duration::from_secs(1))
            .factor(1.6)
            .cap(Duration::from_secs(120))
            .jitter(Jitter::Equal)
    }

    /// Any function of (retry number from 0, previous delay); the cap and
    /// jitter still apply.
    ///
    /// ```
    /// use keel_retry::Backoff;
    /// use std::time::Duration;
    /// let linear = Backoff::custom(|n, _prev| Duration::from_secs(u64::from(n) + 1))
    ///     .cap(Duration::from_secs(3));
    /// let d: Vec<_> = linear.iter().take(5).collect();
    /// assert_eq!(d, [1, 2, 3, 3, 3].map(Duration::from_secs));
    /// ```
    pub fn custom(f: impl Fn(u32, Duration) -> Duration + Send + Sync + 'static) -> Self {
        Self {
            kind: Kind::Custom(Arc::new(f)),
            cap: Duration::MAX,
            jitter: Jitter::None,
            seed: None,
        }
    }

    /// Growth factor for exponential backoff (ignored by the others).
    /// Values below 1.0 are treated as 1.0.
    ///
    /// ```
    /// use keel_retry::Backoff;
    /// use std::time::Duration;
    /// let d: Vec<_> = Backoff::exponential(Duration::from_secs(1)).factor(3.0).iter().take(3).collect();
    /// assert_eq!(d, [1, 3, 9].map(Duration::from_secs));
    /// ```
    pub fn factor(mut self, factor: f64) -> Self {
        if let Kind::Exponential { factor: f, .. } = &mut self.kind {
            *f = if factor.is_finite() {
                factor.max(1.0)
            } else {
                1.0
            };
        }
        self
    }

    /// The largest delay ever produced, jitter included.
    ///
    /// ```
    /// use keel_retry::Backoff;
    /// use std::time::Duration;
    /// let b = Backoff::exponential(Duration::from_secs(1)).cap(Duration::from_secs(5));
    /// assert_eq!(b.iter().nth(10), Some(Duration::from_secs(5)));
    /// ```
    pub fn cap(mut self, cap: Duration) -> Self {
        self.cap = cap;
        self
    }

    /// Sets the jitter.
    ///
    /// ```
    /// use keel_retry::{Backoff, Jitter};
    /// use std::time::Duration;
    /// let b = Backoff::exponential(Duration::from_secs(1)).jitter(Jitter::Equal).seed(1);
    /// let d = b.iter().next().unwrap();
    /// assert!(d >= Duration::from_millis(500) && d <= Duration::from_secs(1));
    /// ```
    pub fn jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    /// Fixes the random seed (tests, simulations). Without it every
    /// iterator is seeded differently.
    ///
    /// ```
    /// use keel_retry::{Backoff, Jitter};
    /// use std::time::Duration;
    /// let b = Backoff::exponential(Duration::from_secs(1)).jitter(Jitter::Full).seed(9);
    /// assert_eq!(b.iter().take(5).collect::<Vec<_>>(), b.iter().take(5).collect::<Vec<_>>());
    /// ```
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// The configured cap.
    ///
    /// ```
    /// use keel_retry::Backoff;
    /// use std::time::Duration;
    /// assert_eq!(Backoff::exponential(Duration::from_secs(1)).max_delay(), Duration::from_secs(30));
    /// ```
    pub fn max_delay(&self) -> Duration {
        self.cap
    }

    /// An endless iterator of delays, seeded by [`seed`](Self::seed) if
    /// set, otherwise differently on every call (forked from the calling
    /// thread's generator), so clients that start together still jitter
    /// apart.
    ///
    /// ```
    /// use keel_retry::Backoff;
    /// use std::time::Duration;
    /// let mut it = Backoff::constant(Duration::from_millis(5)).iter();
    /// assert_eq!(it.nth(100), Some(Duration::from_millis(5)));
    /// ```
    pub fn iter(&self) -> BackoffIter {
        let rng = self
            .seed
            .map_or_else(fastrand::Rng::new, fastrand::Rng::with_seed);
        self.iter_with(rng)
    }

    /// An endless iterator of delays seeded with `seed`, whatever
    /// [`seed`](Self::seed) says: the same seed gives the same delays
    /// (simulations, one reproducible stream per client).
    ///
    /// ```
    /// use keel_retry::{Backoff, Jitter};
    /// use std::time::Duration;
    /// let b = Backoff::exponential(Duration::from_secs(1)).jitter(Jitter::Full);
    /// let a: Vec<_> = b.iter_seeded(5).take(5).collect();
    /// assert_eq!(a, b.iter_seeded(5).take(5).collect::<Vec<_>>());
    /// assert_eq!(a, b.clone().seed(5).iter().take(5).collect::<Vec<_>>());
    /// assert!(a[0] <= Duration::from_secs(1));
    /// ```
    pub fn iter_seeded(&self, seed: u64) -> BackoffIter {
        self.iter_with(fastrand::Rng::with_seed(seed))
    }

    /// An iterator drawing its jitter from `rng` ([`fastrand::Rng`],
    /// re-exported as [`keel_retry::fastrand`](crate::fastrand) so callers
    /// name the same version), for callers that already own a generator:
    /// `rng.fork()` gives each client its own stream.
    ///
    /// ```
    /// use keel_retry::{Backoff, Jitter, fastrand};
    /// use std::time::Duration;
    /// let b = Backoff::exponential(Duration::from_secs(1)).jitter(Jitter::Full);
    /// let mut clients = fastrand::Rng::with_seed(5);
    /// let mut it = b.iter_with(clients.fork());
    /// assert!(it.next().unwrap() <= Duration::from_secs(1));
    /// ```
    pub fn iter_with(&self, rng: fastrand::Rng) -> BackoffIter {
        BackoffIter {
            backoff: self.clone(),
            rng,
            n: 0,
            prev: self.floor(),
        }
    }

    /// The base delay, capped: the "previous delay" of the first retry and
    /// decorrelated jitter's floor.
    fn floor(&self) -> Duration {
        let base = match &self.kind {
            Kind::Constant(d) => *d,
            Kind::Exponential { base, .. } => *base,
            Kind::Custom(f) => f(0, Duration::ZERO),
        };
        base.min(self.cap)
    }
}

/// The delays of a [`Backoff`], endless; [`reset`](Self::reset) it after a
/// success (gRPC's rule).
///
/// ```
/// use keel_retry::Backoff;
/// use std::time::Duration;
/// let mut it = Backoff::exponential(Duration::from_millis(1)).iter();
/// it.next();
/// it.next();
/// it.reset();
/// assert_eq!(it.next(), Some(Duration::from_millis(1)));
/// ```
#[derive(Debug, Clone)]
pub struct BackoffIter {
    backoff: Backoff,
    rng: fastrand::Rng,
    n: u32,
    prev: Duration,
}

fn to_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl BackoffIter {
    /// Starts over from the first delay.
    ///
    /// ```
    /// # let mut it = keel_retry::Backoff::exponential(std::time::Duration::from_millis(1)).iter();
    /// it.reset();
    /// ```
    pub fn reset(&mut self) {
        self.n = 0;
        self.prev = self.backoff.floor();
    }

    /// The delay before jitter for the current retry: `min(cap, ...)`.
    fn ceiling(&self) -> Duration {
        let cap = self.backoff.cap;
        match &self.backoff.kind {
            Kind::Constant(d) => (*d).min(cap),
            Kind::Exponential { base, factor } => {
                let t = base.as_secs_f64() * factor.powi(self.n.min(1024) as i32);
                if !t.is_finite() || t >= cap.as_secs_f64() {
                    cap
                } else {
                    Duration::from_secs_f64(t).min(cap)
                }
            }
            Kind::Custom(f) => f(self.n, self.prev).min(cap),
        }
    }
}

impl Iterator for BackoffIter {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let cap = self.backoff.cap;
        let t = self.ceiling();
        let delay = match self.backoff.jitter {
            Jitter::None => t,
            Jitter::Full => Duration::from_nanos(self.rng.u64(0..=to_nanos(t))),
            Jitter::Equal => {
                let t = to_nanos(t);
                let half = t / 2;
                Duration::from_nanos(self.rng.u64(half..=t))
            }
            Jitter::Decorrelated => {
                let lo = to_nanos(self.backoff.floor());
                let hi = to_nanos(self.prev).saturating_mul(3).min(to_nanos(cap));
                Duration::from_nanos(self.rng.u64(lo..=hi.max(lo)))
            }
        };
        self.n = self.n.saturating_add(1);
        self.prev = delay;
        Some(delay.min(cap))
    }
}
