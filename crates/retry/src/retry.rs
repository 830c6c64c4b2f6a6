//! The retry engine and its async builder. One loop, read top to bottom:
//! gate, attempt, classify, report, then every reason to stop, then sleep.

use crate::{Backoff, BackoffIter, Budget, Jitter};
use keel_breaker::{Breaker, Outcome, Rejected};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Whether a breaker guards every attempt or only the retries.
///
/// ```
/// use keel_retry::BreakerMode;
/// assert_ne!(BreakerMode::AllAttempts, BreakerMode::RetriesOnly);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerMode {
    /// Every attempt needs the breaker's permission.
    AllAttempts,
    /// First attempts always go (and are recorded); only retries need the
    /// breaker's permission, so an open breaker stops retry storms without
    /// failing requests that would have worked once.
    RetriesOnly,
}

/// What an attempt's result calls for.
///
/// ```
/// use keel_retry::Decision;
/// use std::time::Duration;
/// assert!(Decision::RetryAfter(Duration::from_secs(1)).is_retry());
/// assert!(!Decision::Done.is_retry());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Final: return it.
    Done,
    /// Retry after the backoff delay.
    Retry,
    /// Retry after this delay (a server hint such as `Retry-After`),
    /// bounded by the policy's `max_hint`.
    RetryAfter(Duration),
}

impl Decision {
    /// True for `Retry` and `RetryAfter`.
    ///
    /// ```
    /// assert!(keel_retry::Decision::Retry.is_retry());
    /// ```
    pub fn is_retry(self) -> bool {
        !matches!(self, Decision::Done)
    }
}

/// Why retrying stopped.
///
/// ```
/// use keel_retry::StopReason;
/// assert_eq!(StopReason::Budget.to_string(), "the retry budget is spent");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StopReason {
    /// The result is not retryable.
    NotRetryable,
    /// The maximum number of attempts was made.
    MaxAttempts,
    /// The next delay would end after the deadline.
    Deadline,
    /// The retry budget is spent.
    Budget,
    /// The breaker refused a retry.
    BreakerOpen,
    /// The server asked for a wait longer than `max_hint`.
    HintTooLong,
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StopReason::NotRetryable => "the error is not retryable",
            StopReason::MaxAttempts => "the maximum number of attempts was reached",
            StopReason::Deadline => "the next retry would end after the deadline",
            StopReason::Budget => "the retry budget is spent",
            StopReason::BreakerOpen => "the circuit breaker refused a retry",
            StopReason::HintTooLong => "the server asked to wait longer than max_hint",
        })
    }
}

/// Why a retried call failed.
///
/// ```
/// use keel_retry::{RetryError, StopReason};
/// let e = RetryError::Failed { error: "boom", attempts: 3, reason: StopReason::MaxAttempts };
/// assert_eq!(e.attempts(), 3);
/// assert_eq!(e.into_inner(), Some("boom"));
/// ```
#[derive(Debug, thiserror::Error)]
pub enum RetryError<E> {
    /// The last attempt failed and no retry followed.
    #[error("failed after {attempts} attempt(s), {reason}: {error}")]
    Failed {
        /// The last attempt's error.
        error: E,
        /// Attempts made.
        attempts: u32,
        /// Why no retry followed.
        reason: StopReason,
    },
    /// The deadline passed during an attempt (the attempt was dropped).
    #[error("deadline exceeded during attempt {attempts}")]
    DeadlineExceeded {
        /// Attempts started.
        attempts: u32,
        /// The previous attempt's error, if there was one.
        last: Option<E>,
    },
    /// The breaker rejected the first attempt ([`BreakerMode::AllAttempts`]).
    #[error(transparent)]
    Rejected(Rejected),
    /// The inner service failed `poll_ready` before any attempt was made
    /// (tower layer only); its error, unchanged.
    #[error("the service is not ready: {0}")]
    NotReady(E),
}

impl<E> RetryError<E> {
    /// Attempts made (0 when rejected or not ready before the first).
    ///
    /// ```
    /// use keel_retry::RetryError;
    /// let e: RetryError<()> = RetryError::DeadlineExceeded { attempts: 2, last: None };
    /// assert_eq!(e.attempts(), 2);
    /// ```
    pub fn attempts(&self) -> u32 {
        match self {
            RetryError::Failed { attempts, .. } | RetryError::DeadlineExceeded { attempts, .. } => {
                *attempts
            }
            RetryError::Rejected(_) | RetryError::NotReady(_) => 0,
        }
    }

    /// The operation's last error, if any.
    ///
    /// ```
    /// use keel_retry::RetryError;
    /// let e: RetryError<&str> = RetryError::DeadlineExceeded { attempts: 2, last: Some("x") };
    /// assert_eq!(e.into_inner(), Some("x"));
    /// ```
    pub fn into_inner(self) -> Option<E> {
        match self {
            RetryError::Failed { error, .. } | RetryError::NotReady(error) => Some(error),
            RetryError::DeadlineExceeded { last, .. } => last,
            RetryError::Rejected(_) => None,
        }
    }
}

/// How to retry: attempts, backoff, deadline, hints, budget and breaker.
/// Plain configuration, cheap to clone (the budget and breaker are shared).
///
/// ```
/// use keel_retry::{Backoff, RetryPolicy, TokenBucket};
/// use std::sync::Arc;
/// use std::time::Duration;
/// let policy = RetryPolicy::default()
///     .max_attempts(4)
///     .backoff(Backoff::exponential(Duration::from_millis(50)).cap(Duration::from_secs(1)))
///     .deadline(Duration::from_secs(3))
///     .budget(Arc::new(TokenBucket::grpc()));
/// assert_eq!(policy.attempts(), 4);
/// ```
#[derive(Clone)]
pub struct RetryPolicy {
    max_attempts: u32,
    backoff: Backoff,
    deadline: Option<Duration>,
    max_hint: Duration,
    budget: Option<Arc<dyn Budget>>,
    breaker: Option<(Breaker, BreakerMode)>,
}

impl std::fmt::Debug for RetryPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryPolicy")
            .field("max_attempts", &self.max_attempts)
            .field("backoff", &self.backoff)
            .field("deadline", &self.deadline)
            .field("max_hint", &self.max_hint)
            .field("budget", &self.budget.is_some())
            .field(
                "breaker",
                &self
                    .breaker
                    .as_ref()
                    .map(|(b, m)| (b.name().to_string(), *m)),
            )
            .finish()
    }
}

impl Default for RetryPolicy {
    /// 3 attempts (the SRE book's limit), exponential backoff from 100 ms
    /// with full jitter capped at 10 s, hints up to 60 s, no deadline, no
    /// budget, no breaker.
    fn default() -> Self {
        Self {
            max_attempts: 3,
            backoff: Backoff::exponential(Duration::from_millis(100))
                .cap(Duration::from_secs(10))
                .jitter(Jitter::Full),
            deadline: None,
            max_hint: Duration::from_secs(60),
            budget: None,
            breaker: None,
        }
    }
}

impl RetryPolicy {
    /// Attempts in all, first included (at least 1).
    ///
    /// ```
    /// assert_eq!(keel_retry::RetryPolicy::default().max_attempts(0).attempts(), 1);
    /// ```
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// The configured attempt limit.
    ///
    /// ```
    /// assert_eq!(keel_retry::RetryPolicy::default().attempts(), 3);
    /// ```
    pub fn attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The delays between attempts.
    ///
    /// ```
    /// use keel_retry::{Backoff, RetryPolicy};
    /// let _ = RetryPolicy::default().backoff(Backoff::constant(std::time::Duration::from_millis(10)));
    /// ```
    pub fn backoff(mut self, b: Backoff) -> Self {
        self.backoff = b;
        self
    }

    /// Bounds the whole call, attempts and sleeps together. A retry whose
    /// delay would end after it is not made; an attempt still running at
    /// the deadline is dropped.
    ///
    /// ```
    /// let _ = keel_retry::RetryPolicy::default().deadline(std::time::Duration::from_secs(2));
    /// ```
    pub fn deadline(mut self, d: Duration) -> Self {
        self.deadline = Some(d);
        self
    }

    /// The longest server hint honoured; a longer one stops retrying
    /// ([`StopReason::HintTooLong`]) rather than ignoring the server.
    ///
    /// ```
    /// let _ = keel_retry::RetryPolicy::default().max_hint(std::time::Duration::from_secs(5));
    /// ```
    pub fn max_hint(mut self, d: Duration) -> Self {
        self.max_hint = d;
        self
    }

    /// A retry budget shared with other callers.
    ///
    /// ```
    /// use std::sync::Arc;
    /// let budget = Arc::new(keel_retry::RatioBudget::sre());
    /// let _ = keel_retry::RetryPolicy::default().budget(budget.clone());
    /// ```
    pub fn budget(mut self, b: Arc<dyn Budget>) -> Self {
        self.budget = Some(b);
        self
    }

    /// A breaker consulted per `mode`; outcomes are reported to it.
    ///
    /// ```
    /// use keel_retry::{BreakerMode, RetryPolicy};
    /// let b = keel_breaker::Breaker::new("db", Default::default()).unwrap();
    /// let _ = RetryPolicy::default().breaker(b, BreakerMode::RetriesOnly);
    /// ```
    pub fn breaker(mut self, b: Breaker, mode: BreakerMode) -> Self {
        self.breaker = Some((b, mode));
        self
    }

    /// Runs `op` (given the attempt number, from 1), retrying every error.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap().block_on(async {
    /// use keel_retry::RetryPolicy;
    /// let v = RetryPolicy::default()
    ///     .run(|n| async move { if n < 3 { Err("not yet") } else { Ok(n) } })
    ///     .await
    ///     .unwrap();
    /// assert_eq!(v, 3);
    /// # });
    /// ```
    pub async fn run<T, E, Fut, Op>(&self, op: Op) -> Result<T, RetryError<E>>
    where
        Op: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.execute(op, |r: Result<&T, &E>| {
            if r.is_ok() {
                Decision::Done
            } else {
                Decision::Retry
            }
        })
        .await
    }

    /// The engine: runs `op`, asks `classify` what each result calls for
    /// (`Ok(&value)` or `Err(&error)` in, the classifier shape keel-breaker
    /// shares). A result classified for retry that is `Ok` (such as an HTTP
    /// 503 response) is returned as `Ok` when retrying stops.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap().block_on(async {
    /// use keel_retry::{Decision, RetryPolicy};
    /// let status = RetryPolicy::default()
    ///     .execute(|_| async { Ok::<u16, ()>(503) }, |r| match r {
    ///         Ok(503) => Decision::Retry,
    ///         _ => Decision::Done,
    ///     })
    ///     .await;
    /// assert_eq!(status.unwrap(), 503);
    /// # });
    /// ```
    pub async fn execute<T, E, Fut, Op, Cl>(
        &self,
        mut op: Op,
        mut classify: Cl,
    ) -> Result<T, RetryError<E>>
    where
        Op: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        Cl: FnMut(Result<&T, &E>) -> Decision,
    {
        let mut run = Run::start(self);
        let mut previous: Option<Result<T, E>> = None;
        loop {
            let permit = match self.gate(run.attempt) {
                Ok(permit) => permit,
                Err(rejected) => return run.rejected(rejected, previous),
            };
            let result = match run.deadline {
                None => op(run.attempt).await,
                Some(at) => match tokio::time::timeout_at(at, op(run.attempt)).await {
                    Ok(r) => r,
                    Err(_) => return Err(self.deadline_passed(permit, run.attempt, previous)),
                },
            };
            let decision = classify(result.as_ref());
            match self.after(&mut run, result.is_ok(), decision, permit, true) {
                Err(reason) => return finish(result, run.attempt, reason),
                Ok(delay) => {
                    tokio::time::sleep(delay).await;
                    previous = Some(result);
                    run.attempt += 1;
                }
            }
        }
    }

    /// Gate for attempt `attempt`: the breaker, for every attempt or only
    /// for retries; a first attempt that passes counts as a request for
    /// the budget.
    pub(crate) fn gate(
        &self,
        attempt: u32,
    ) -> Result<Option<keel_breaker::Permit<'static>>, Rejected> {
        let gate = match &self.breaker {
            Some((b, BreakerMode::AllAttempts)) => Some(b),
            Some((b, BreakerMode::RetriesOnly)) if attempt > 1 => Some(b),
            _ => None,
        };
        let permit = gate.map(Breaker::allow_owned).transpose()?;
        if attempt == 1
            && let Some(b) = &self.budget
        {
            b.on_request();
        }
        Ok(permit)
    }

    /// The attempt in flight outlived the deadline: it counts as a failure.
    pub(crate) fn deadline_passed<T, E>(
        &self,
        permit: Option<keel_breaker::Permit<'static>>,
        attempt: u32,
        previous: Option<Result<T, E>>,
    ) -> RetryError<E> {
        self.report(permit, attempt, Outcome::Failure);
        RetryError::DeadlineExceeded {
            attempts: attempt,
            last: previous.and_then(Result::err),
        }
    }

    /// After an attempt: report its outcome to the breaker and the budget,
    /// then either the delay before the next attempt or why there is none.
    /// A result that calls for a retry is reported as the failure it is even
    /// when the request cannot be sent again (`replayable` false); it is
    /// then final.
    pub(crate) fn after(
        &self,
        run: &mut Run,
        ok: bool,
        decision: Decision,
        permit: Option<keel_breaker::Permit<'static>>,
        replayable: bool,
    ) -> Result<Duration, StopReason> {
        let attempt = run.attempt;
        let outcome = match (ok, decision) {
            (true, Decision::Done) => Outcome::Success,
            (_, Decision::RetryAfter(d)) => Outcome::FailureRetryAfter(d),
            _ => Outcome::Failure,
        };
        self.report(permit, attempt, outcome);
        // As in gRPC throttling, only failures worth retrying cost the
        // budget; a final error (say, a bad request) says nothing about
        // the dependency's health.
        if let Some(b) = &self.budget {
            if decision.is_retry() {
                b.on_outcome(false);
            } else if outcome == Outcome::Success {
                b.on_outcome(true);
            }
        }

        // Every reason to stop, cheapest first; the budget last because
        // asking it spends it.
        let hint = match decision {
            Decision::Done => return Err(StopReason::NotRetryable),
            Decision::Retry => None,
            Decision::RetryAfter(d) => Some(d),
        };
        if !replayable {
            return Err(StopReason::NotRetryable);
        }
        if attempt >= self.max_attempts {
            return Err(StopReason::MaxAttempts);
        }
        // The delays are drawn only once a retry is due: a call that
        // succeeds at once never seeds a jitter generator.
        let backoff = run
            .delays
            .get_or_insert_with(|| self.backoff.iter())
            .next()
            .unwrap_or(Duration::ZERO);
        let delay = match hint {
            Some(h) if h > self.max_hint => return Err(StopReason::HintTooLong),
            Some(h) => h,
            None => backoff,
        };
        if let Some(at) = run.deadline
            && Instant::now()
                .checked_add(delay)
                .is_none_or(|end| end >= at)
        {
            return Err(StopReason::Deadline);
        }
        if let Some((b, _)) = &self.breaker
            && b.would_allow().is_err()
        {
            return Err(StopReason::BreakerOpen);
        }
        if let Some(b) = &self.budget
            && !b.try_retry()
        {
            return Err(StopReason::Budget);
        }
        Ok(delay)
    }

    fn report(
        &self,
        permit: Option<keel_breaker::Permit<'static>>,
        attempt: u32,
        outcome: Outcome,
    ) {
        match (permit, &self.breaker) {
            (Some(p), _) => p.record(outcome),
            (None, Some((b, BreakerMode::RetriesOnly))) if attempt == 1 => b.record(outcome),
            _ => {}
        }
    }
}

/// The per-call state of the engine, shared by [`RetryPolicy::execute`]
/// and the tower layer's future.
#[derive(Debug)]
pub(crate) struct Run {
    /// The attempt being made, from 1.
    pub(crate) attempt: u32,
    /// The deadline over the whole call, if any.
    pub(crate) deadline: Option<Instant>,
    delays: Option<BackoffIter>,
}

impl Run {
    pub(crate) fn start(policy: &RetryPolicy) -> Self {
        Run {
            attempt: 1,
            // A deadline too far to represent is no deadline at all.
            deadline: policy.deadline.and_then(|d| Instant::now().checked_add(d)),
            delays: None,
        }
    }

    /// The breaker refused this attempt: the first attempt's refusal is the
    /// error, a retry's ends with the previous result.
    pub(crate) fn rejected<T, E>(
        &self,
        rejected: Rejected,
        previous: Option<Result<T, E>>,
    ) -> Result<T, RetryError<E>> {
        match previous {
            None => Err(RetryError::Rejected(rejected)),
            Some(prev) => finish(prev, self.attempt - 1, StopReason::BreakerOpen),
        }
    }
}

pub(crate) fn finish<T, E>(
    result: Result<T, E>,
    attempts: u32,
    reason: StopReason,
) -> Result<T, RetryError<E>> {
    result.map_err(|error| RetryError::Failed {
        error,
        attempts,
        reason,
    })
}

type Predicate<E> = Box<dyn Fn(&E) -> bool + Send + Sync>;
type HintFn<E> = Box<dyn Fn(&E) -> Option<Duration> + Send + Sync>;

/// Starts an async retry of `op` (given the attempt number, from 1).
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap().block_on(async {
/// use keel_retry::{retry, Backoff};
/// use std::time::Duration;
///
/// #[derive(Debug)]
/// enum ApiError { Busy { retry_after: Option<Duration> }, BadRequest }
///
/// let result = retry(|attempt| async move {
///         if attempt < 2 { Err(ApiError::Busy { retry_after: Some(Duration::from_secs(1)) }) } else { Ok("done") }
///     })
///     .max_attempts(5)
///     .backoff(Backoff::exponential(Duration::from_millis(100)))
///     .deadline(Duration::from_secs(10))
///     .when(|e| matches!(e, ApiError::Busy { .. }))
///     .hint(|e| match e { ApiError::Busy { retry_after } => *retry_after, _ => None })
///     .run()
///     .await;
/// assert_eq!(result.unwrap(), "done");
/// # });
/// ```
pub fn retry<T, E, Fut, Op>(op: Op) -> Retry<Op, E>
where
    Op: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    Retry {
        op,
        policy: RetryPolicy::default(),
        when: None,
        hint: None,
    }
}

/// The builder made by [`retry`]; finish with [`run`](Retry::run).
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap().block_on(async {
/// let builder: keel_retry::Retry<_, &str> = keel_retry::retry(|_| async { Ok::<u8, &str>(1) });
/// assert_eq!(builder.max_attempts(2).run().await.unwrap(), 1);
/// # });
/// ```
pub struct Retry<Op, E> {
    op: Op,
    policy: RetryPolicy,
    when: Option<Predicate<E>>,
    hint: Option<HintFn<E>>,
}

impl<Op, E> std::fmt::Debug for Retry<Op, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retry")
            .field("policy", &self.policy)
            .finish()
    }
}

impl<T, E, Fut, Op> Retry<Op, E>
where
    Op: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    /// Replaces the whole policy.
    ///
    /// ```
    /// let _ = keel_retry::retry(|_| async { Ok::<(), ()>(()) }).policy(Default::default());
    /// ```
    pub fn policy(mut self, p: RetryPolicy) -> Self {
        self.policy = p;
        self
    }

    /// See [`RetryPolicy::max_attempts`].
    ///
    /// ```
    /// let _ = keel_retry::retry(|_| async { Ok::<(), ()>(()) }).max_attempts(2);
    /// ```
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.policy = self.policy.max_attempts(n);
        self
    }

    /// See [`RetryPolicy::backoff`].
    ///
    /// ```
    /// let b = keel_retry::Backoff::constant(std::time::Duration::from_millis(1));
    /// let _ = keel_retry::retry(|_| async { Ok::<(), ()>(()) }).backoff(b);
    /// ```
    pub fn backoff(mut self, b: Backoff) -> Self {
        self.policy = self.policy.backoff(b);
        self
    }

    /// See [`RetryPolicy::deadline`].
    ///
    /// ```
    /// let _ = keel_retry::retry(|_| async { Ok::<(), ()>(()) }).deadline(std::time::Duration::from_secs(1));
    /// ```
    pub fn deadline(mut self, d: Duration) -> Self {
        self.policy = self.policy.deadline(d);
        self
    }

    /// See [`RetryPolicy::max_hint`].
    ///
    /// ```
    /// let _ = keel_retry::retry(|_| async { Ok::<(), ()>(()) }).max_hint(std::time::Duration::from_secs(1));
    /// ```
    pub fn max_hint(mut self, d: Duration) -> Self {
        self.policy = self.policy.max_hint(d);
        self
    }

    /// See [`RetryPolicy::budget`].
    ///
    /// ```
    /// let b = std::sync::Arc::new(keel_retry::TokenBucket::grpc());
    /// let _ = keel_retry::retry(|_| async { Ok::<(), ()>(()) }).budget(b);
    /// ```
    pub fn budget(mut self, b: Arc<dyn Budget>) -> Self {
        self.policy = self.policy.budget(b);
        self
    }

    /// See [`RetryPolicy::breaker`].
    ///
    /// ```
    /// let b = keel_breaker::Breaker::new("x", Default::default()).unwrap();
    /// let _ = keel_retry::retry(|_| async { Ok::<(), ()>(()) }).breaker(b, keel_retry::BreakerMode::RetriesOnly);
    /// ```
    pub fn breaker(mut self, b: Breaker, mode: BreakerMode) -> Self {
        self.policy = self.policy.breaker(b, mode);
        self
    }

    /// Which errors are retryable (default: all).
    ///
    /// ```
    /// let _ = keel_retry::retry(|_| async { Err::<(), i32>(4) }).when(|e| *e >= 500);
    /// ```
    pub fn when(mut self, f: impl Fn(&E) -> bool + Send + Sync + 'static) -> Self {
        self.when = Some(Box::new(f));
        self
    }

    /// Extracts a server hint (`Retry-After`) from an error.
    ///
    /// ```
    /// let _ = keel_retry::retry(|_| async { Err::<(), u64>(4) }).hint(|s| Some(std::time::Duration::from_secs(*s)));
    /// ```
    pub fn hint(mut self, f: impl Fn(&E) -> Option<Duration> + Send + Sync + 'static) -> Self {
        self.hint = Some(Box::new(f));
        self
    }

    /// Runs the operation with retries.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap().block_on(async {
    /// let r = keel_retry::retry(|_| async { Err::<(), _>("down") }).max_attempts(2).run().await;
    /// assert_eq!(r.unwrap_err().attempts(), 2);
    /// # });
    /// ```
    pub async fn run(self) -> Result<T, RetryError<E>> {
        let Retry {
            op,
            policy,
            when,
            hint,
        } = self;
        policy
            .execute(op, |r: Result<&T, &E>| match r {
                Ok(_) => Decision::Done,
                Err(e) if when.as_ref().is_some_and(|w| !w(e)) => Decision::Done,
                Err(e) => match hint.as_ref().and_then(|h| h(e)) {
                    Some(d) => Decision::RetryAfter(d),
                    None => Decision::Retry,
                },
            })
            .await
    }
}
