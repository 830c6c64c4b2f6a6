//! The breaker itself. All shared state is atomics: the state word packs
//! the automatic state with a generation number so that outcomes of calls
//! admitted in an earlier state can be told apart and ignored.

use crate::config::{Config, Window};
use crate::types::*;
use crate::window::{FuseWindow, RateWindow};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering::*};
use std::time::Duration;
use tokio::sync::broadcast;
use tokio::time::Instant;

const STATE_BITS: u64 = 8;
const TAG_SHIFT: u32 = 48;
const DEADLINE_MASK: u64 = (1 << TAG_SHIFT) - 1;
/// A probe slot whose probe succeeded in the current generation.
const DONE: u64 = DEADLINE_MASK;
const FOREVER: u64 = u64::MAX;

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Keeps what outcomes write off the cache lines that `allow` reads, so
/// recording on one core does not slow asks on another (false sharing).
#[repr(align(128))]
#[derive(Default)]
struct Padded<T>(T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

#[derive(Default)]
struct AtomicCounters {
    successes: AtomicU64,
    failures: AtomicU64,
    slow: AtomicU64,
    ignored: AtomicU64,
    rejected: AtomicU64,
    shadow_rejected: AtomicU64,
    fault_injected: AtomicU64,
    trips: AtomicU64,
}

pub(crate) struct Inner {
    name: Arc<str>,
    cfg: Config,
    base: Instant,
    /// `generation << 8 | state code`.
    state: AtomicU64,
    mode: AtomicU8,
    forced_until: AtomicU64,
    open_until: AtomicU64,
    /// When the current state was entered (closed-since for the alarm,
    /// recovery start).
    entered_at: AtomicU64,
    consecutive_trips: AtomicU32,
    /// Pending `Retry-After` hint in nanoseconds (0: none).
    hint: AtomicU64,
    /// Half-open probe permits: `generation tag << 48 | deadline in µs`.
    probes: Box<[AtomicU64]>,
    /// `generation << 32 | successful probes`.
    probe_ok: AtomicU64,
    /// Admission tickets during gradual recovery.
    ticket: AtomicU64,
    /// Drawn once from `Config::seed`. The open-duration jitter of
    /// generation `g` comes from a generator seeded with
    /// `jitter_seed ^ g`: a function of the seed and the breaker's history,
    /// so it is reproducible and shares no mutable random state.
    jitter_seed: u64,
    alarm: AtomicBool,
    fuse: Padded<Option<FuseWindow>>,
    rate: Padded<Option<RateWindow>>,
    fault_ppm: u64,
    slow_nanos: Option<u64>,
    /// No fault injection and no slow-call policy: a closed ask needs
    /// neither a clock nor a random number.
    plain: bool,
    /// Recovery shares in parts per million, per step.
    steps_ppm: Box<[u64]>,
    counters: Padded<AtomicCounters>,
    events: broadcast::Sender<Event>,
}

/// A circuit breaker. Cheap to clone (an `Arc`); every clone is the same
/// breaker.
///
/// ```
/// use keel_breaker::{Breaker, Config, State};
/// use std::time::Duration;
///
/// // fuse semantics: the 3rd failure within 10 s blows it for 60 s.
/// let b = Breaker::new("payments", Config::fuse(2, Duration::from_secs(10), Duration::from_secs(60))).unwrap();
/// for _ in 0..3 {
///     let permit = b.allow().expect("closed");
///     permit.failure();
/// }
/// assert_eq!(b.state(), State::Open);
/// assert!(b.allow().is_err());
/// ```
#[derive(Clone)]
pub struct Breaker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Breaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Breaker")
            .field("name", &self.inner.name)
            .field("state", &self.state())
            .field("mode", &self.mode())
            .finish()
    }
}

enum Holder<'a> {
    Borrowed(&'a Inner),
    Owned(Arc<Inner>),
}

impl std::ops::Deref for Holder<'_> {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        match self {
            Holder::Borrowed(i) => i,
            Holder::Owned(a) => a,
        }
    }
}

/// Permission for one call. Report how it went with [`success`](Self::success),
/// [`failure`](Self::failure) or [`record`](Self::record). Dropping a permit
/// without reporting counts as [`Outcome::Ignore`] (a half-open probe frees
/// its slot at once).
///
/// ```
/// use keel_breaker::{Breaker, Config};
/// let b = Breaker::new("db", Config::default()).unwrap();
/// let permit = b.allow()?;
/// // ... make the call ...
/// permit.success();
/// assert_eq!(b.snapshot().counters.successes, 1);
/// # Ok::<(), keel_breaker::Rejected>(())
/// ```
pub struct Permit<'a> {
    breaker: Holder<'a>,
    generation: u64,
    /// `(slot index, slot value we wrote)` when this is a half-open probe.
    probe: Option<(usize, u64)>,
    /// Start time in breaker nanoseconds, kept only when slow calls matter.
    start: Option<u64>,
    reported: bool,
}

impl std::fmt::Debug for Permit<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("breaker", &self.breaker.name)
            .field("probe", &self.probe.is_some())
            .finish()
    }
}

impl Permit<'_> {
    /// Reports a success.
    ///
    /// ```
    /// # let b = keel_breaker::Breaker::new("x", Default::default()).unwrap();
    /// b.allow().unwrap().success();
    /// ```
    pub fn success(self) {
        self.record(Outcome::Success);
    }

    /// Reports a failure.
    ///
    /// ```
    /// # let b = keel_breaker::Breaker::new("x", Default::default()).unwrap();
    /// b.allow().unwrap().failure();
    /// assert_eq!(b.snapshot().counters.failures, 1);
    /// ```
    pub fn failure(self) {
        self.record(Outcome::Failure);
    }

    /// Reports a failure with the dependency's `Retry-After`: if it trips
    /// the breaker, the breaker stays open that long.
    ///
    /// ```
    /// use keel_breaker::{Breaker, Config};
    /// use std::time::Duration;
    /// let b = Breaker::new("x", Config::fuse(0, Duration::from_secs(1), Duration::from_secs(5))).unwrap();
    /// b.allow().unwrap().failure_retry_after(Duration::from_secs(42));
    /// let wait = b.allow().unwrap_err().retry_after.unwrap();
    /// assert!(wait > Duration::from_secs(41) && wait <= Duration::from_secs(42));
    /// ```
    pub fn failure_retry_after(self, retry_after: Duration) {
        self.record(Outcome::FailureRetryAfter(retry_after));
    }

    /// True when this permit is one of the half-open probes.
    ///
    /// ```
    /// # let b = keel_breaker::Breaker::new("x", Default::default()).unwrap();
    /// assert!(!b.allow().unwrap().is_probe());
    /// ```
    pub fn is_probe(&self) -> bool {
        self.probe.is_some()
    }

    /// Reports an outcome.
    ///
    /// ```
    /// use keel_breaker::Outcome;
    /// # let b = keel_breaker::Breaker::new("x", Default::default()).unwrap();
    /// b.allow().unwrap().record(Outcome::Ignore);
    /// assert_eq!(b.snapshot().counters.ignored, 1);
    /// ```
    pub fn record(mut self, outcome: Outcome) {
        self.reported = true;
        let probe = self.probe.take();
        self.breaker
            .record(self.generation, outcome, self.start, probe);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.reported
            && let Some((i, token)) = self.probe.take()
        {
            self.breaker.free_probe(i, token);
        }
    }
}

impl Breaker {
    /// Creates a breaker after validating `config`.
    ///
    /// ```
    /// use keel_breaker::{Breaker, Config};
    /// assert!(Breaker::new("db", Config::default()).is_ok());
    /// assert!(Breaker::new("db", Config::default().half_open_probes(0)).is_err());
    /// ```
    pub fn new(name: impl Into<Arc<str>>, config: Config) -> Result<Self, crate::ConfigError> {
        let (tx, _) = broadcast::channel(256);
        Self::with_events(name.into(), config, tx)
    }

    pub(crate) fn with_events(
        name: Arc<str>,
        cfg: Config,
        events: broadcast::Sender<Event>,
    ) -> Result<Self, crate::ConfigError> {
        cfg.validate()?;
        let fuse = cfg
            .failure_count
            .map(|c| FuseWindow::new(c.failure_threshold - 1, nanos(c.window)));
        let rate = cfg.rate.map(|r| match r.window {
            Window::Count(n) => RateWindow::count(n),
            Window::Time { buckets, bucket } => RateWindow::time(buckets, nanos(bucket)),
        });
        let slow_nanos = cfg.rate.and_then(|r| r.slow).map(|s| nanos(s.threshold));
        let steps_ppm = cfg
            .recovery
            .as_ref()
            .map(|r| r.steps.iter().map(|s| (s * 1e6).round() as u64).collect())
            .unwrap_or_default();
        let inner = Inner {
            name,
            base: Instant::now(),
            state: AtomicU64::new(State::Closed.code()),
            mode: AtomicU8::new(Mode::Normal.code()),
            forced_until: AtomicU64::new(FOREVER),
            open_until: AtomicU64::new(0),
            entered_at: AtomicU64::new(0),
            consecutive_trips: AtomicU32::new(0),
            hint: AtomicU64::new(0),
            probes: (0..cfg.half_open_probes)
                .map(|_| AtomicU64::new(0))
                .collect(),
            probe_ok: AtomicU64::new(0),
            ticket: AtomicU64::new(0),
            jitter_seed: fastrand::Rng::with_seed(cfg.seed).u64(..),
            alarm: AtomicBool::new(false),
            fuse: Padded(fuse),
            rate: Padded(rate),
            fault_ppm: (cfg.fault_injection * 1e6).round() as u64,
            plain: slow_nanos.is_none() && cfg.fault_injection == 0.0,
            slow_nanos,
            steps_ppm,
            counters: Padded::default(),
            events,
            cfg,
        };
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// The breaker's name.
    ///
    /// ```
    /// # let b = keel_breaker::Breaker::new("db", Default::default()).unwrap();
    /// assert_eq!(b.name(), "db");
    /// ```
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The configuration it was built with.
    ///
    /// ```
    /// # let b = keel_breaker::Breaker::new("db", Default::default()).unwrap();
    /// assert_eq!(b.config().half_open_probes, 10);
    /// ```
    pub fn config(&self) -> &Config {
        &self.inner.cfg
    }

    /// Asks for permission to make one call. Lock-free and allocation-free;
    /// in the closed state it is two atomic loads.
    ///
    /// ```
    /// # let b = keel_breaker::Breaker::new("db", Default::default()).unwrap();
    /// match b.allow() {
    ///     Ok(permit) => permit.success(),
    ///     Err(rejected) => eprintln!("not now: {rejected}"),
    /// }
    /// ```
    #[inline]
    pub fn allow(&self) -> Result<Permit<'_>, Rejected> {
        let i = &*self.inner;
        // The common case, kept small enough to inline: no override, closed,
        // nothing that needs a clock or a random number.
        if i.plain && i.mode.load(Acquire) == Mode::Normal.code() {
            let w = i.state.load(Acquire);
            if w & 7 == State::Closed.code() {
                return Ok(Permit {
                    breaker: Holder::Borrowed(i),
                    generation: w >> STATE_BITS,
                    probe: None,
                    start: None,
                    reported: false,
                });
            }
        }
        self.allow_slow()
    }

    #[inline(never)]
    fn allow_slow(&self) -> Result<Permit<'_>, Rejected> {
        self.inner.allow().map(|(g, probe, start)| Permit {
            breaker: Holder::Borrowed(&self.inner),
            generation: g,
            probe,
            start,
            reported: false,
        })
    }

    /// Like [`allow`](Self::allow), but the permit owns a handle to the
    /// breaker, so it can move into a spawned task (one `Arc` clone).
    ///
    /// ```
    /// # let b = keel_breaker::Breaker::new("db", Default::default()).unwrap();
    /// let permit: keel_breaker::Permit<'static> = b.allow_owned().unwrap();
    /// drop(b);
    /// permit.success();
    /// ```
    pub fn allow_owned(&self) -> Result<Permit<'static>, Rejected> {
        let i = &*self.inner;
        // The same closed fast path as `allow`: the tower layer asks through
        // here once per call.
        if i.plain && i.mode.load(Acquire) == Mode::Normal.code() {
            let w = i.state.load(Acquire);
            if w & 7 == State::Closed.code() {
                return Ok(Permit {
                    breaker: Holder::Owned(self.inner.clone()),
                    generation: w >> STATE_BITS,
                    probe: None,
                    start: None,
                    reported: false,
                });
            }
        }
        self.inner.allow().map(|(g, probe, start)| Permit {
            breaker: Holder::Owned(self.inner.clone()),
            generation: g,
            probe,
            start,
            reported: false,
        })
    }

    /// Would a call be admitted now (fuse's `ask`)? It reserves nothing,
    /// so use [`allow`](Self::allow) when half-open probes must be counted.
    ///
    /// ```
    /// # let b = keel_breaker::Breaker::new("db", Default::default()).unwrap();
    /// assert!(b.would_allow().is_ok());
    /// ```
    #[doc(alias = "ask")]
    pub fn would_allow(&self) -> Result<(), Rejected> {
        self.inner.peek()
    }

    /// Runs `fut` if admitted; `Err` results are failures.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
    /// use keel_breaker::{Breaker, Config};
    /// let b = Breaker::new("db", Config::default()).unwrap();
    /// let v = b.call(async { Ok::<_, std::io::Error>(7) }).await.unwrap();
    /// assert_eq!(v, 7);
    /// # });
    /// ```
    pub async fn call<T, E, F>(&self, fut: F) -> Result<T, CallError<E>>
    where
        F: Future<Output = Result<T, E>>,
    {
        self.call_with(fut, &DefaultClassifier).await
    }

    /// Runs `fut` if admitted and lets `classifier` decide what its result
    /// means (failure, success, ignore, failure with `Retry-After`). Calls
    /// slower than the slow-call threshold also count as slow.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
    /// use keel_breaker::{Breaker, Config, Outcome};
    /// let b = Breaker::new("db", Config::default()).unwrap();
    /// let not_found_is_fine = |r: Result<&u16, &()>| match r {
    ///     Ok(500..) | Err(_) => Outcome::Failure,
    ///     Ok(_) => Outcome::Success,
    /// };
    /// let code = b.call_with(async { Ok::<u16, ()>(404) }, &not_found_is_fine).await.unwrap();
    /// assert_eq!(code, 404);
    /// assert_eq!(b.snapshot().counters.successes, 1);
    /// # });
    /// ```
    pub async fn call_with<T, E, F, C>(&self, fut: F, classifier: &C) -> Result<T, CallError<E>>
    where
        F: Future<Output = Result<T, E>>,
        C: Classify<T, E> + ?Sized,
    {
        let permit = self.allow()?;
        let result = fut.await;
        permit.record(classifier.classify(result.as_ref()));
        result.map_err(CallError::Inner)
    }

    /// Records an outcome without a permit (for callers that did not ask,
    /// such as first attempts in keel-retry's "breaker blocks only retries"
    /// mode). It counts against the current state.
    ///
    /// ```
    /// use keel_breaker::{Breaker, Config, Outcome, State};
    /// use std::time::Duration;
    /// let b = Breaker::new("db", Config::fuse(0, Duration::from_secs(1), Duration::from_secs(1))).unwrap();
    /// b.record(Outcome::Failure);
    /// assert_eq!(b.state(), State::Open);
    /// ```
    pub fn record(&self, outcome: Outcome) {
        let g = self.inner.state.load(Acquire) >> STATE_BITS;
        self.inner.record(g, outcome, None, None);
    }

    /// Records one failure without a permit (fuse's `melt`).
    ///
    /// ```
    /// # let b = keel_breaker::Breaker::new("db", Default::default()).unwrap();
    /// b.record_failure();
    /// assert_eq!(b.snapshot().counters.failures, 1);
    /// ```
    #[doc(alias = "melt")]
    pub fn record_failure(&self) {
        self.record(Outcome::Failure);
    }

    /// Heals the breaker completely: closed, windows and consecutive trips
    /// cleared, a forced-open override lifted (a `Disabled` or
    /// `MetricsOnly` override stays).
    ///
    /// ```
    /// use keel_breaker::{Breaker, Config, State};
    /// let b = Breaker::new("db", Config::default()).unwrap();
    /// b.force_open(None);
    /// b.reset();
    /// assert_eq!(b.state(), State::Closed);
    /// assert!(b.allow().is_ok());
    /// ```
    pub fn reset(&self) {
        let i = &self.inner;
        if i.mode
            .compare_exchange(
                Mode::ForcedOpen.code(),
                Mode::Normal.code(),
                AcqRel,
                Acquire,
            )
            .is_ok()
        {
            i.emit(EventKind::ModeChanged { mode: Mode::Normal });
        }
        let now = i.now();
        i.hint.store(0, Release);
        loop {
            let w = i.state.load(Acquire);
            if i.transition(w, State::Closed, Reason::Reset, now) {
                break;
            }
        }
    }

    /// Rejects every call, until `for_how_long` has passed if given.
    ///
    /// ```
    /// use keel_breaker::{Breaker, Config, Mode};
    /// let b = Breaker::new("db", Config::default()).unwrap();
    /// b.force_open(None);
    /// assert_eq!(b.mode(), Mode::ForcedOpen);
    /// assert!(b.allow().is_err());
    /// ```
    pub fn force_open(&self, for_how_long: Option<Duration>) {
        let i = &self.inner;
        let until = match for_how_long {
            Some(d) => i.now().saturating_add(nanos(d)),
            None => FOREVER,
        };
        i.forced_until.store(until, Release);
        i.set_mode(Mode::ForcedOpen);
    }

    /// Lets every call through; outcomes are counted but never change the
    /// state (fuse's `circuit_disable`).
    ///
    /// ```
    /// use keel_breaker::{Breaker, Config};
    /// let b = Breaker::new("db", Config::default()).unwrap();
    /// b.force_open(None);
    /// b.disable();
    /// assert!(b.allow().is_ok());
    /// ```
    pub fn disable(&self) {
        self.inner.set_mode(Mode::Disabled);
    }

    /// Lets every call through while the state machine runs as a shadow
    /// (dry run for a new policy): would-be rejections are counted.
    ///
    /// ```
    /// use keel_breaker::{Breaker, Config, Mode};
    /// let b = Breaker::new("db", Config::default()).unwrap();
    /// b.metrics_only();
    /// assert_eq!(b.mode(), Mode::MetricsOnly);
    /// ```
    pub fn metrics_only(&self) {
        self.inner.set_mode(Mode::MetricsOnly);
    }

    /// Removes any operator override (fuse's `circuit_enable`).
    ///
    /// ```
    /// use keel_breaker::{Breaker, Config, Mode};
    /// let b = Breaker::new("db", Config::default()).unwrap();
    /// b.disable();
    /// b.enable();
    /// assert_eq!(b.mode(), Mode::Normal);
    /// ```
    pub fn enable(&self) {
        self.inner.set_mode(Mode::Normal);
    }

    /// Opens the breaker now for `d` (bounded by `max_hint`), as when the
    /// dependency sent `Retry-After: d`. The next automatic transition
    /// (half-open after `d`) proceeds as usual.
    ///
    /// ```
    /// use keel_breaker::{Breaker, Config, State};
    /// use std::time::Duration;
    /// let b = Breaker::new("db", Config::default()).unwrap();
    /// b.open_for(Duration::from_secs(30));
    /// assert_eq!(b.state(), State::Open);
    /// assert!(b.retry_after().unwrap() <= Duration::from_secs(30));
    /// ```
    #[doc(alias = "trip")]
    pub fn open_for(&self, d: Duration) {
        let i = &self.inner;
        let now = i.now();
        i.hint.store(nanos(d).max(1), Release);
        loop {
            let w = i.state.load(Acquire);
            if State::from_code(w) == State::Open {
                let want = now.saturating_add(nanos(d.min(i.cfg.max_hint)));
                i.open_until.fetch_max(want, AcqRel);
                i.hint.store(0, Release);
                return;
            }
            if i.transition(w, State::Open, Reason::OpenedFor, now) {
                return;
            }
        }
    }

    /// The automatic state (operator modes are reported by [`mode`](Self::mode)).
    ///
    /// ```
    /// # let b = keel_breaker::Breaker::new("db", Default::default()).unwrap();
    /// assert_eq!(b.state(), keel_breaker::State::Closed);
    /// ```
    pub fn state(&self) -> State {
        State::from_code(self.inner.state.load(Acquire))
    }

    /// The operator mode.
    ///
    /// ```
    /// # let b = keel_breaker::Breaker::new("db", Default::default()).unwrap();
    /// assert_eq!(b.mode(), keel_breaker::Mode::Normal);
    /// ```
    pub fn mode(&self) -> Mode {
        Mode::from_code(self.inner.mode.load(Acquire))
    }

    /// How long until calls may pass again, when the breaker rejects for
    /// a known time (open, or forced open until a time). For `Retry-After`.
    ///
    /// ```
    /// # let b = keel_breaker::Breaker::new("db", Default::default()).unwrap();
    /// assert_eq!(b.retry_after(), None);
    /// ```
    pub fn retry_after(&self) -> Option<Duration> {
        self.inner.retry_after(self.inner.now())
    }

    /// Whether the alarm is raised. Raised when the breaker opens; cleared
    /// only after it stayed closed for `alarm_clear_after` (checked here
    /// and on recorded outcomes, so a poll may be what clears it).
    ///
    /// ```
    /// # let b = keel_breaker::Breaker::new("db", Default::default()).unwrap();
    /// assert!(!b.alarm());
    /// ```
    pub fn alarm(&self) -> bool {
        self.inner.poll_alarm(self.inner.now());
        self.inner.alarm.load(Acquire)
    }

    /// Subscribes to this breaker's events (state changes, mode changes,
    /// alarms). Slow receivers lose the oldest events, never block the
    /// breaker.
    ///
    /// ```
    /// # let b = keel_breaker::Breaker::new("db", Default::default()).unwrap();
    /// let rx = b.subscribe();
    /// assert!(rx.is_empty());
    /// ```
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    /// A serialisable picture of the state and counters.
    ///
    /// ```
    /// # let b = keel_breaker::Breaker::new("db", Default::default()).unwrap();
    /// b.record_failure();
    /// let s = b.snapshot();
    /// assert_eq!(s.window.failures, 1);
    /// ```
    pub fn snapshot(&self) -> Snapshot {
        let i = &self.inner;
        let now = i.now();
        i.poll_alarm(now);
        let c = &i.counters;
        let window = i
            .rate
            .as_ref()
            .map(|r| {
                let t = r.totals(now);
                WindowTotals {
                    calls: t.calls,
                    failures: t.failures,
                    slow: t.slow,
                }
            })
            .unwrap_or_default();
        Snapshot {
            name: i.name.to_string(),
            state: self.state(),
            mode: self.mode(),
            retry_after_ms: i
                .retry_after(now)
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            consecutive_trips: i.consecutive_trips.load(Acquire),
            alarm: i.alarm.load(Acquire),
            window,
            counters: Counters {
                successes: c.successes.load(Relaxed),
                failures: c.failures.load(Relaxed),
                slow: c.slow.load(Relaxed),
                ignored: c.ignored.load(Relaxed),
                rejected: c.rejected.load(Relaxed),
                shadow_rejected: c.shadow_rejected.load(Relaxed),
                fault_injected: c.fault_injected.load(Relaxed),
                trips: c.trips.load(Relaxed),
            },
        }
    }

    pub(crate) fn emit_removed(&self) {
        self.inner.emit(EventKind::Removed);
    }
}

type Admit = (u64, Option<(usize, u64)>, Option<u64>);

/// The breaker's clock, read on first use and then remembered.
struct LazyNow<'a> {
    inner: &'a Inner,
    value: std::cell::Cell<Option<u64>>,
}

impl<'a> LazyNow<'a> {
    fn new(inner: &'a Inner) -> Self {
        Self {
            inner,
            value: std::cell::Cell::new(None),
        }
    }

    fn get(&self) -> u64 {
        match self.value.get() {
            Some(v) => v,
            None => {
                let v = self.inner.now();
                self.value.set(Some(v));
                v
            }
        }
    }
}

impl Inner {
    #[inline]
    fn now(&self) -> u64 {
        nanos(Instant::now().saturating_duration_since(self.base))
    }

    fn emit(&self, kind: EventKind) {
        // No receiver is fine: events are for whoever listens.
        let _ = self.events.send(Event {
            breaker: self.name.clone(),
            kind,
        });
    }

    fn set_mode(&self, mode: Mode) {
        let old = self.mode.swap(mode.code(), AcqRel);
        if old != mode.code() {
            self.emit(EventKind::ModeChanged { mode });
        }
    }

    fn start(&self) -> Option<u64> {
        self.slow_nanos.map(|_| self.now())
    }

    #[inline]
    fn allow(&self) -> Result<Admit, Rejected> {
        let mode = self.mode.load(Acquire);
        if mode == Mode::Normal.code() {
            return self.decide(true).inspect_err(|_| self.count_rejection());
        }
        match Mode::from_code(mode) {
            Mode::Disabled => Ok((self.generation(), None, self.start())),
            Mode::MetricsOnly => match self.decide(true) {
                Ok(a) => Ok(a),
                Err(_) => {
                    self.counters.shadow_rejected.fetch_add(1, Relaxed);
                    Ok((self.generation(), None, self.start()))
                }
            },
            Mode::ForcedOpen | Mode::Normal => match self.forced(self.now()) {
                Some(r) => {
                    self.counters.rejected.fetch_add(1, Relaxed);
                    Err(r)
                }
                None => self.decide(true).inspect_err(|_| self.count_rejection()),
            },
        }
    }

    #[cold]
    fn count_rejection(&self) {
        self.counters.rejected.fetch_add(1, Relaxed);
    }

    /// The forced-open rejection, or `None` once its time has passed (the
    /// override is then lifted).
    fn forced(&self, now: u64) -> Option<Rejected> {
        if self.mode.load(Acquire) != Mode::ForcedOpen.code() {
            return None;
        }
        let until = self.forced_until.load(Acquire);
        if until == FOREVER {
            return Some(Rejected {
                reason: RejectReason::ForcedOpen,
                retry_after: None,
            });
        }
        if now < until {
            return Some(Rejected {
                reason: RejectReason::ForcedOpen,
                retry_after: Some(Duration::from_nanos(until - now)),
            });
        }
        if self
            .mode
            .compare_exchange(
                Mode::ForcedOpen.code(),
                Mode::Normal.code(),
                AcqRel,
                Acquire,
            )
            .is_ok()
        {
            self.emit(EventKind::ModeChanged { mode: Mode::Normal });
        }
        None
    }

    fn generation(&self) -> u64 {
        self.state.load(Acquire) >> STATE_BITS
    }

    /// The automatic decision. `reserve` false only peeks (fuse's `ask`).
    #[inline]
    fn decide(&self, reserve: bool) -> Result<Admit, Rejected> {
        loop {
            let w = self.state.load(Acquire);
            let generation = w >> STATE_BITS;
            match State::from_code(w) {
                State::Closed => {
                    // The calling thread's generator: no random state shared
                    // between threads on the ask path.
                    if reserve && self.fault_ppm > 0 && fastrand::u64(..1_000_000) < self.fault_ppm
                    {
                        self.counters.fault_injected.fetch_add(1, Relaxed);
                        return Err(self.reject(RejectReason::FaultInjected, None));
                    }
                    return Ok((generation, None, self.start()));
                }
                State::Open => {
                    let now = self.now();
                    let until = self.open_until.load(Acquire);
                    if now < until {
                        return Err(self
                            .reject(RejectReason::Open, Some(Duration::from_nanos(until - now))));
                    }
                    self.transition(w, State::HalfOpen, Reason::OpenElapsed, now);
                }
                State::HalfOpen => {
                    let now = self.now();
                    if !reserve {
                        return if self.free_probe_slot(generation, now / 1000).is_some() {
                            Ok((generation, None, None))
                        } else {
                            Err(self.reject(RejectReason::HalfOpenFull, None))
                        };
                    }
                    return match self.take_probe(generation, now) {
                        Some(p) => Ok((generation, Some(p), self.slow_nanos.map(|_| now))),
                        None => Err(self.reject(RejectReason::HalfOpenFull, None)),
                    };
                }
                State::Recovering => {
                    let now = self.now();
                    let Some(rec) = &self.cfg.recovery else {
                        // Unreachable by construction; closing is the safe answer.
                        self.transition(w, State::Closed, Reason::RecoveryFinished, now);
                        continue;
                    };
                    let step_nanos = nanos(rec.step_duration).max(1);
                    let since = now.saturating_sub(self.entered_at.load(Acquire));
                    let step = (since / step_nanos) as usize;
                    if step >= self.steps_ppm.len() {
                        self.transition(w, State::Closed, Reason::RecoveryFinished, now);
                        continue;
                    }
                    let share = self.steps_ppm[step];
                    // Deterministic sampling: ticket t is admitted when the
                    // admitted count floor(t * share) steps up, so exactly
                    // `share` of the tickets pass, evenly spread.
                    let t = if reserve {
                        self.ticket.fetch_add(1, Relaxed)
                    } else {
                        self.ticket.load(Relaxed)
                    };
                    let (t, share) = (u128::from(t), u128::from(share));
                    if (t + 1) * share / 1_000_000 > t * share / 1_000_000 {
                        return Ok((generation, None, self.slow_nanos.map(|_| now)));
                    }
                    let left = step_nanos - since % step_nanos;
                    return Err(
                        self.reject(RejectReason::Recovering, Some(Duration::from_nanos(left)))
                    );
                }
            }
        }
    }

    fn reject(&self, reason: RejectReason, retry_after: Option<Duration>) -> Rejected {
        Rejected {
            reason,
            retry_after,
        }
    }

    fn peek(&self) -> Result<(), Rejected> {
        let mode = Mode::from_code(self.mode.load(Acquire));
        if mode == Mode::Normal && State::from_code(self.state.load(Acquire)) == State::Closed {
            return Ok(());
        }
        match mode {
            Mode::Disabled | Mode::MetricsOnly => Ok(()),
            Mode::ForcedOpen | Mode::Normal => {
                if let Some(r) = self.forced(self.now()) {
                    return Err(r);
                }
                self.decide(false).map(|_| ())
            }
        }
    }

    fn tag(generation: u64) -> u64 {
        (generation & 0xFFFF) << TAG_SHIFT
    }

    fn slot_free(v: u64, tag: u64, now_us: u64) -> bool {
        let deadline = v & DEADLINE_MASK;
        v == 0 || v & !DEADLINE_MASK != tag || (deadline != DONE && deadline <= now_us)
    }

    fn free_probe_slot(&self, generation: u64, now_us: u64) -> Option<usize> {
        let tag = Self::tag(generation);
        self.probes
            .iter()
            .position(|s| Self::slot_free(s.load(Acquire), tag, now_us))
    }

    /// Reserves a probe slot with one compare-and-swap; concurrent callers
    /// race for the same slot and only one wins it.
    fn take_probe(&self, generation: u64, now: u64) -> Option<(usize, u64)> {
        let tag = Self::tag(generation);
        let now_us = now / 1000;
        let deadline = (now_us + nanos(self.cfg.probe_timeout) / 1000).min(DONE - 1);
        let token = tag | deadline;
        for (i, slot) in self.probes.iter().enumerate() {
            let mut v = slot.load(Acquire);
            while Self::slot_free(v, tag, now_us) {
                match slot.compare_exchange(v, token, AcqRel, Acquire) {
                    Ok(_) => return Some((i, token)),
                    Err(seen) => v = seen,
                }
            }
        }
        None
    }

    fn free_probe(&self, i: usize, token: u64) {
        let _ = self.probes[i].compare_exchange(token, 0, AcqRel, Acquire);
    }

    fn record(
        &self,
        generation: u64,
        outcome: Outcome,
        start: Option<u64>,
        probe: Option<(usize, u64)>,
    ) {
        let c = &self.counters;
        // Reading the clock costs more than the rest of a success; only
        // the slow-call check, the fuse ring, time windows, transitions and
        // the alarm need it, so it is read at most once and only then.
        let clock = LazyNow::new(self);
        let slow = match (self.slow_nanos, start) {
            (Some(th), Some(s)) => clock.get().saturating_sub(s) >= th,
            _ => false,
        };
        match outcome {
            Outcome::Success => c.successes.fetch_add(1, Relaxed),
            Outcome::Failure | Outcome::FailureRetryAfter(_) => c.failures.fetch_add(1, Relaxed),
            Outcome::Ignore => {
                c.ignored.fetch_add(1, Relaxed);
                if let Some((i, token)) = probe {
                    self.free_probe(i, token);
                }
                return;
            }
        };
        if slow {
            c.slow.fetch_add(1, Relaxed);
        }
        if let Outcome::FailureRetryAfter(d) = outcome {
            self.hint.store(nanos(d).max(1), Release);
        }
        if self.mode.load(Acquire) == Mode::Disabled.code() {
            return;
        }
        let failed = outcome.is_failure();
        let w = self.state.load(Acquire);
        if w >> STATE_BITS != generation {
            // Admitted under an earlier state: says nothing about this one.
            return;
        }
        match (State::from_code(w), probe) {
            (State::HalfOpen, Some((i, token))) => {
                if failed || slow {
                    self.transition(w, State::Open, Reason::ProbeFailed, clock.get());
                } else if self.probes[i]
                    .compare_exchange(token, (token & !DEADLINE_MASK) | DONE, AcqRel, Acquire)
                    .is_ok()
                    && self.count_probe_success(generation) >= u64::from(self.cfg.half_open_probes)
                {
                    let to = if self.cfg.recovery.is_some() {
                        State::Recovering
                    } else {
                        State::Closed
                    };
                    self.transition(w, to, Reason::ProbesSucceeded, clock.get());
                }
            }
            (State::HalfOpen, None) => {
                if failed {
                    self.transition(w, State::Open, Reason::Melt, clock.get());
                }
            }
            (State::Closed | State::Recovering, _) => self.evaluate(w, &clock, failed, slow),
            (State::Open, _) => {}
        }
    }

    fn count_probe_success(&self, generation: u64) -> u64 {
        let g = generation & 0xFFFF_FFFF;
        let mut v = self.probe_ok.load(Acquire);
        loop {
            let n = if v >> 32 == g {
                (v & 0xFFFF_FFFF) + 1
            } else {
                1
            };
            match self
                .probe_ok
                .compare_exchange(v, g << 32 | n, AcqRel, Acquire)
            {
                Ok(_) => return n,
                Err(seen) => v = seen,
            }
        }
    }

    fn evaluate(&self, w: u64, clock: &LazyNow<'_>, failed: bool, slow: bool) {
        let mut trip = None;
        if failed
            && let Some(f) = &*self.fuse
            && f.melt(clock.get())
        {
            trip = Some(Reason::FailureCount);
        }
        if let (Some(r), Some(p)) = (&*self.rate, &self.cfg.rate) {
            // Count windows ignore the time.
            let now = if r.needs_time() { clock.get() } else { 0 };
            let t = r.record(now, failed, slow);
            let min = match (State::from_code(w), &self.cfg.recovery) {
                (State::Recovering, Some(rec)) => rec.min_calls,
                _ => p.min_calls,
            };
            if trip.is_none() && t.calls > 0 && t.calls >= u64::from(min) {
                let calls = t.calls as f64;
                if p.failure_rate
                    .is_some_and(|f| t.failures as f64 / calls >= f)
                {
                    trip = Some(Reason::FailureRate);
                } else if p.slow.is_some_and(|s| t.slow as f64 / calls >= s.rate) {
                    trip = Some(Reason::SlowCallRate);
                }
            }
        }
        if let Some(reason) = trip {
            self.transition(w, State::Open, reason, clock.get());
        } else if State::from_code(w) == State::Closed && self.alarm.load(Acquire) {
            self.poll_alarm(clock.get());
        }
    }

    fn open_duration(&self, trips_before: u32, generation: u64) -> u64 {
        let hint = self.hint.load(Acquire);
        if hint != 0 {
            return hint.min(nanos(self.cfg.max_hint));
        }
        let base = nanos(self.cfg.open_duration);
        if trips_before == 0 {
            return base;
        }
        let cap = nanos(self.cfg.open_duration_cap);
        let t = base
            .saturating_mul(1u64.checked_shl(trips_before.min(63)).unwrap_or(u64::MAX))
            .min(cap);
        // Full jitter above the base: never shorter than the base, never
        // longer than the cap.
        fastrand::Rng::with_seed(self.jitter_seed ^ generation).u64(base..=t)
    }

    /// Moves from the observed state word to `to`; false when another
    /// thread changed the state first (the caller then re-reads).
    fn transition(&self, observed: u64, to: State, reason: Reason, now: u64) -> bool {
        let from = State::from_code(observed);
        let generation = (observed >> STATE_BITS) + 1;
        match to {
            State::Open => {
                let d = self.open_duration(self.consecutive_trips.load(Acquire), generation);
                self.open_until.store(now.saturating_add(d), Release);
            }
            State::Recovering | State::Closed => {
                self.entered_at.store(now, Release);
                self.ticket.store(0, Release);
            }
            State::HalfOpen => {}
        }
        let word = generation << STATE_BITS | to.code();
        if self
            .state
            .compare_exchange(observed, word, AcqRel, Acquire)
            .is_err()
        {
            return false;
        }
        match to {
            State::Open => {
                self.hint.store(0, Release);
                self.consecutive_trips.fetch_add(1, AcqRel);
                self.counters.trips.fetch_add(1, Relaxed);
                self.clear_windows();
                if !self.alarm.swap(true, AcqRel) {
                    self.emit(EventKind::AlarmRaised);
                }
            }
            State::Closed => {
                self.consecutive_trips.store(0, Release);
                self.clear_windows();
            }
            State::Recovering => self.clear_windows(),
            State::HalfOpen => {}
        }
        self.emit(EventKind::StateChanged { from, to, reason });
        true
    }

    fn clear_windows(&self) {
        if let Some(f) = &*self.fuse {
            f.clear();
        }
        if let Some(r) = &*self.rate {
            r.clear();
        }
    }

    fn poll_alarm(&self, now: u64) {
        if !self.alarm.load(Acquire) {
            return;
        }
        let w = self.state.load(Acquire);
        if State::from_code(w) != State::Closed
            || self.mode.load(Acquire) == Mode::ForcedOpen.code()
        {
            return;
        }
        let since = self.entered_at.load(Acquire);
        if now.saturating_sub(since) >= nanos(self.cfg.alarm_clear_after)
            && self.alarm.swap(false, AcqRel)
        {
            self.emit(EventKind::AlarmCleared);
        }
    }

    fn retry_after(&self, now: u64) -> Option<Duration> {
        if self.mode.load(Acquire) == Mode::ForcedOpen.code() {
            let until = self.forced_until.load(Acquire);
            return (until != FOREVER && until > now).then(|| Duration::from_nanos(until - now));
        }
        let w = self.state.load(Acquire);
        match State::from_code(w) {
            State::Open => {
                let until = self.open_until.load(Acquire);
                (until > now).then(|| Duration::from_nanos(until - now))
            }
            _ => None,
        }
    }
}
