//! The small public vocabulary: states, modes, outcomes, rejections, events
//! and snapshots.

use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;

/// The breaker's automatic state.
///
/// ```
/// use keel_breaker::{Breaker, Config, State};
/// let b = Breaker::new("db", Config::default()).unwrap();
/// assert_eq!(b.state(), State::Closed);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Calls pass; outcomes are recorded and may trip the breaker.
    Closed,
    /// Calls are rejected until the open duration has passed.
    Open,
    /// A fixed number of probe calls pass; the rest are rejected.
    HalfOpen,
    /// Gradual recovery: a growing share of calls pass.
    Recovering,
}

impl State {
    pub(crate) const fn code(self) -> u64 {
        match self {
            State::Closed => 0,
            State::Open => 1,
            State::HalfOpen => 2,
            State::Recovering => 3,
        }
    }

    pub(crate) const fn from_code(c: u64) -> State {
        match c & 7 {
            0 => State::Closed,
            1 => State::Open,
            2 => State::HalfOpen,
            _ => State::Recovering,
        }
    }
}

/// An operator override that outranks the automatic state.
///
/// ```
/// use keel_breaker::{Breaker, Config, Mode};
/// let b = Breaker::new("db", Config::default()).unwrap();
/// b.disable();
/// assert_eq!(b.mode(), Mode::Disabled);
/// b.enable();
/// assert_eq!(b.mode(), Mode::Normal);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// No override: the state decides.
    Normal,
    /// Every call passes; outcomes are counted but never change the state.
    Disabled,
    /// Every call passes, but the state machine runs as a shadow: what it
    /// would have rejected is counted as `shadow_rejected`.
    MetricsOnly,
    /// Every call is rejected (until a time, if one was given).
    ForcedOpen,
}

impl Mode {
    pub(crate) const fn from_code(c: u8) -> Mode {
        match c {
            0 => Mode::Normal,
            1 => Mode::Disabled,
            2 => Mode::MetricsOnly,
            _ => Mode::ForcedOpen,
        }
    }

    pub(crate) const fn code(self) -> u8 {
        match self {
            Mode::Normal => 0,
            Mode::Disabled => 1,
            Mode::MetricsOnly => 2,
            Mode::ForcedOpen => 3,
        }
    }
}

/// What a call's result means to the breaker.
///
/// ```
/// use keel_breaker::Outcome;
/// use std::time::Duration;
/// let o = Outcome::FailureRetryAfter(Duration::from_secs(30));
/// assert!(o.is_failure());
/// assert!(!Outcome::Ignore.is_failure());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The dependency is healthy.
    Success,
    /// The dependency failed.
    Failure,
    /// The dependency failed and asked not to be called for this long
    /// (`Retry-After`); if this failure trips the breaker, it stays open
    /// that long (bounded by [`Config::max_hint`](crate::Config::max_hint)).
    FailureRetryAfter(Duration),
    /// Says nothing about the dependency (for example a client error).
    Ignore,
}

impl Outcome {
    /// True for `Failure` and `FailureRetryAfter`.
    ///
    /// ```
    /// assert!(keel_breaker::Outcome::Failure.is_failure());
    /// ```
    pub fn is_failure(self) -> bool {
        matches!(self, Outcome::Failure | Outcome::FailureRetryAfter(_))
    }
}

/// Decides what a call's result means: `Ok(&response)` or `Err(&error)`
/// in, an [`Outcome`] out. Implemented for closures of that shape.
///
/// keel-retry's classifiers take the same `Result<&T, &E>`, so one
/// function body can serve a breaker and a retry layer side by side.
///
/// ```
/// use keel_breaker::{Classify, Outcome};
/// let by_code = |r: Result<&u16, &()>| match r {
///     Ok(code) if *code >= 500 => Outcome::Failure,
///     Ok(_) => Outcome::Success,
///     Err(()) => Outcome::Failure,
/// };
/// assert_eq!(by_code.classify(Ok(&503)), Outcome::Failure);
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot classify a `Result<&{T}, &{E}>`",
    label = "not a classifier for `Result<&{T}, &{E}>`",
    note = "a classifier is a `Fn(Result<&Response, &Error>) -> keel_breaker::Outcome` (note: `Result` of references, not a reference to a `Result`), or a type implementing `Classify<Response, Error>`"
)]
pub trait Classify<T, E> {
    /// Classifies one result.
    fn classify(&self, result: Result<&T, &E>) -> Outcome;
}

impl<T, E, F> Classify<T, E> for F
where
    F: Fn(Result<&T, &E>) -> Outcome,
{
    fn classify(&self, result: Result<&T, &E>) -> Outcome {
        self(result)
    }
}

/// The default classifier: `Ok` is a success, `Err` a failure.
///
/// ```
/// use keel_breaker::{Classify, DefaultClassifier, Outcome};
/// assert_eq!(DefaultClassifier.classify(Err::<&(), _>(&"boom")), Outcome::Failure);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultClassifier;

impl<T, E> Classify<T, E> for DefaultClassifier {
    fn classify(&self, result: Result<&T, &E>) -> Outcome {
        if result.is_ok() {
            Outcome::Success
        } else {
            Outcome::Failure
        }
    }
}

/// Why a call was not admitted.
///
/// ```
/// use keel_breaker::RejectReason;
/// assert_eq!(RejectReason::Open.to_string(), "open");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// The breaker is open.
    Open,
    /// Half-open and every probe permit is taken.
    HalfOpenFull,
    /// Recovering and this call fell outside the admitted share.
    Recovering,
    /// An operator forced the breaker open.
    ForcedOpen,
    /// Fault injection rejected a healthy call on purpose.
    FaultInjected,
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RejectReason::Open => "open",
            RejectReason::HalfOpenFull => "half-open with every probe taken",
            RejectReason::Recovering => "recovering and this call is outside the admitted share",
            RejectReason::ForcedOpen => "forced open by an operator",
            RejectReason::FaultInjected => "fault injection",
        })
    }
}

/// A call the breaker did not admit, with how long to wait (for a
/// `Retry-After` header) when the breaker knows.
///
/// ```
/// use keel_breaker::{Breaker, Config, RejectReason};
/// use std::time::Duration;
/// let b = Breaker::new("db", Config::default()).unwrap();
/// b.force_open(Some(Duration::from_secs(5)));
/// let r = b.allow().unwrap_err();
/// assert_eq!(r.reason, RejectReason::ForcedOpen);
/// assert!(r.retry_after.unwrap() <= Duration::from_secs(5));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("circuit breaker rejected the call: {reason}")]
pub struct Rejected {
    /// Why.
    pub reason: RejectReason,
    /// How long until the breaker may admit calls again, if known.
    pub retry_after: Option<Duration>,
}

impl Rejected {
    /// Whole seconds for a `Retry-After` header: the wait rounded up, at
    /// least 1 (a client told 0 would come straight back), or `None` when
    /// the breaker does not know.
    ///
    /// ```
    /// use keel_breaker::{RejectReason, Rejected};
    /// use std::time::Duration;
    /// let r = Rejected { reason: RejectReason::Open, retry_after: Some(Duration::from_millis(29_001)) };
    /// assert_eq!(r.retry_after_secs(), Some(30));
    /// let r = Rejected { reason: RejectReason::Open, retry_after: Some(Duration::ZERO) };
    /// assert_eq!(r.retry_after_secs(), Some(1));
    /// ```
    pub fn retry_after_secs(&self) -> Option<u64> {
        self.retry_after
            .map(|d| (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1))
    }
}

/// The error of [`Breaker::call`](crate::Breaker::call): rejected, or the
/// operation's own error.
///
/// ```
/// use keel_breaker::{CallError, RejectReason, Rejected};
/// let e: CallError<std::io::Error> = Rejected { reason: RejectReason::Open, retry_after: None }.into();
/// assert!(e.rejected().is_some());
/// ```
#[derive(Debug, thiserror::Error)]
pub enum CallError<E> {
    /// The breaker did not admit the call.
    #[error(transparent)]
    Rejected(#[from] Rejected),
    /// The operation ran and failed.
    #[error("{0}")]
    Inner(E),
}

impl<E> CallError<E> {
    /// The rejection, if this is one.
    ///
    /// ```
    /// use keel_breaker::CallError;
    /// assert!(CallError::Inner("boom").rejected().is_none());
    /// ```
    pub fn rejected(&self) -> Option<&Rejected> {
        match self {
            CallError::Rejected(r) => Some(r),
            CallError::Inner(_) => None,
        }
    }

    /// The operation's error, if this is one.
    ///
    /// ```
    /// use keel_breaker::CallError;
    /// assert_eq!(CallError::Inner("boom").into_inner(), Some("boom"));
    /// ```
    pub fn into_inner(self) -> Option<E> {
        match self {
            CallError::Rejected(_) => None,
            CallError::Inner(e) => Some(e),
        }
    }
}

/// Why the state changed.
///
/// ```
/// use keel_breaker::Reason;
/// assert_ne!(Reason::FailureRate, Reason::FailureCount);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// fuse's count window blew.
    FailureCount,
    /// The failure rate reached its threshold.
    FailureRate,
    /// The slow-call rate reached its threshold.
    SlowCallRate,
    /// A half-open probe failed (or was slow).
    ProbeFailed,
    /// A manual melt (or permit-less failure) while half-open or recovering.
    Melt,
    /// The open duration passed.
    OpenElapsed,
    /// Every half-open probe succeeded.
    ProbesSucceeded,
    /// The last gradual-recovery step passed.
    RecoveryFinished,
    /// An operator reset the breaker.
    Reset,
    /// An operator (or a `Retry-After` hint) opened it for a given time.
    OpenedFor,
}

/// What happened to a breaker.
///
/// ```
/// use keel_breaker::{EventKind, State, Reason};
/// let k = EventKind::StateChanged { from: State::Closed, to: State::Open, reason: Reason::FailureRate };
/// assert!(matches!(k, EventKind::StateChanged { .. }));
/// ```
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum EventKind {
    /// The automatic state changed.
    StateChanged {
        /// The previous state.
        from: State,
        /// The new state.
        to: State,
        /// Why.
        reason: Reason,
    },
    /// An operator changed the mode.
    ModeChanged {
        /// The new mode.
        mode: Mode,
    },
    /// The alarm was raised (the breaker opened).
    AlarmRaised,
    /// The alarm cleared (closed for `alarm_clear_after`).
    AlarmCleared,
    /// The breaker was removed from its registry.
    Removed,
}

/// An event with the name of the breaker it concerns.
///
/// ```
/// use keel_breaker::{Breaker, Config, EventKind};
/// # tokio_test_shim::run(async {
/// let b = Breaker::new("db", Config::default()).unwrap();
/// let mut events = b.subscribe();
/// b.disable();
/// let e = events.recv().await.unwrap();
/// assert_eq!(&*e.breaker, "db");
/// assert!(matches!(e.kind, EventKind::ModeChanged { .. }));
/// # });
/// # mod tokio_test_shim { pub fn run<F: std::future::Future>(f: F) -> F::Output {
/// #     tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(f) } }
/// ```
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    /// The breaker's name.
    pub breaker: Arc<str>,
    /// What happened.
    #[serde(flatten)]
    pub kind: EventKind,
}

/// Outcomes currently in the rate window.
///
/// ```
/// let w = keel_breaker::WindowTotals::default();
/// assert_eq!(w.calls, 0);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct WindowTotals {
    /// Recorded outcomes.
    pub calls: u64,
    /// Failures among them.
    pub failures: u64,
    /// Slow calls among them.
    pub slow: u64,
}

/// Counters since the breaker was created (monotonic).
///
/// ```
/// let c = keel_breaker::Counters::default();
/// assert_eq!(c.rejected, 0);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    /// Successful outcomes.
    pub successes: u64,
    /// Failed outcomes (melts included).
    pub failures: u64,
    /// Slow outcomes (also counted as success or failure).
    pub slow: u64,
    /// Outcomes classified `Ignore`.
    pub ignored: u64,
    /// Calls rejected.
    pub rejected: u64,
    /// Calls `MetricsOnly` mode let through that would have been rejected.
    pub shadow_rejected: u64,
    /// Calls rejected by fault injection (also in `rejected`).
    pub fault_injected: u64,
    /// Times the breaker opened.
    pub trips: u64,
}

/// A serialisable picture of one breaker, for `/status` and metrics.
///
/// ```
/// use keel_breaker::{Breaker, Config, State};
/// let b = Breaker::new("db", Config::default()).unwrap();
/// let s = b.snapshot();
/// assert_eq!(s.state, State::Closed);
/// assert_eq!(s.name, "db");
/// ```
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Snapshot {
    /// The breaker's name.
    pub name: String,
    /// Automatic state.
    pub state: State,
    /// Operator mode.
    pub mode: Mode,
    /// How long until calls may pass again, in milliseconds, when known.
    pub retry_after_ms: Option<u64>,
    /// Consecutive trips (drives the growing open duration).
    pub consecutive_trips: u32,
    /// Whether the alarm is raised.
    pub alarm: bool,
    /// Outcomes in the rate window (zero when there is no rate policy).
    pub window: WindowTotals,
    /// Monotonic counters.
    pub counters: Counters,
}
