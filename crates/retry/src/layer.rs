//! A thin tower adapter over the engine of [`RetryPolicy::execute`],
//! written as a named state machine so a call costs no allocation. The
//! layer never guesses which requests are safe to retry: its [`Policy`]
//! says so by returning a copy (for HTTP: GET, HEAD, OPTIONS, PUT,
//! DELETE, or a request carrying an idempotency key, with its body
//! buffered).

use crate::retry::{Run, finish};
use crate::{Decision, RetryError, RetryPolicy};
use keel_breaker::{Permit, Rejected};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::time::{Instant, Sleep};
use tower_service::Service;

/// What to retry: which requests may be sent again, and what a result
/// calls for. [`RetryPolicy`] says how (attempts, backoff, deadline,
/// budget, breaker); a `Policy` says what.
///
/// Implemented for a pair of closures `(clone_if_safe, classify)` (what
/// [`RetryLayer::new`] takes), and by [`RetryErrors`]; implement it on
/// your own type to name the layer's type, for example in a struct field.
///
/// ```
/// use keel_retry::{Decision, Policy};
///
/// #[derive(Clone, Debug)]
/// struct Req { method: &'static str }
///
/// /// Retries idempotent requests on 503 and on transport errors.
/// #[derive(Clone, Debug)]
/// struct Idempotent503;
///
/// impl<E> Policy<Req, u16, E> for Idempotent503 {
///     fn clone_request(&self, req: &Req) -> Option<Req> {
///         matches!(req.method, "GET" | "PUT" | "DELETE").then(|| req.clone())
///     }
///     fn classify(&self, result: Result<&u16, &E>) -> Decision {
///         match result {
///             Ok(503) | Err(_) => Decision::Retry,
///             Ok(_) => Decision::Done,
///         }
///     }
/// }
/// // A nameable layer: no closure types in it.
/// let _layer: keel_retry::RetryLayer<Idempotent503> =
///     keel_retry::RetryLayer::with_policy(keel_retry::RetryPolicy::default(), Idempotent503);
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a retry policy for requests `{Req}` with results `Result<&{Res}, &{E}>`",
    label = "not a `Policy<{Req}, {Res}, {E}>`",
    note = "a policy is a pair of closures `(Fn(&Req) -> Option<Req>, Fn(Result<&Response, &Error>) -> keel_retry::Decision)` (note: `Result` of references, not a reference to a `Result`), or a type implementing `keel_retry::Policy`"
)]
pub trait Policy<Req, Res, E> {
    /// A copy of `req` to send again, or `None` when it must not be sent
    /// twice (then its first result is final).
    fn clone_request(&self, req: &Req) -> Option<Req>;

    /// What `result` calls for: done, retry after the backoff, or retry
    /// after a server's hint.
    fn classify(&self, result: Result<&Res, &E>) -> Decision;
}

impl<Req, Res, E, R, C> Policy<Req, Res, E> for (R, C)
where
    R: Fn(&Req) -> Option<Req>,
    C: Fn(Result<&Res, &E>) -> Decision,
{
    fn clone_request(&self, req: &Req) -> Option<Req> {
        (self.0)(req)
    }

    fn classify(&self, result: Result<&Res, &E>) -> Decision {
        (self.1)(result)
    }
}

/// The plain policy: every request is safe to send again (it is cloned),
/// every `Err` is retried, every `Ok` is final. Only for requests that
/// really are idempotent.
///
/// ```
/// use keel_retry::{Decision, Policy, RetryErrors};
/// assert_eq!(Policy::<u8, (), &str>::classify(&RetryErrors, Err(&"reset")), Decision::Retry);
/// assert_eq!(Policy::<u8, (), &str>::clone_request(&RetryErrors, &7), Some(7));
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct RetryErrors;

impl<Req: Clone, Res, E> Policy<Req, Res, E> for RetryErrors {
    fn clone_request(&self, req: &Req) -> Option<Req> {
        Some(req.clone())
    }

    fn classify(&self, result: Result<&Res, &E>) -> Decision {
        if result.is_ok() {
            Decision::Done
        } else {
            Decision::Retry
        }
    }
}

/// A tower [`Layer`](tower_layer::Layer) that retries requests its
/// [`Policy`] can copy, for results it calls retryable, as its
/// [`RetryPolicy`] allows.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap().block_on(async {
/// use keel_retry::{Decision, RetryLayer, RetryPolicy};
/// use std::sync::{Arc, atomic::{AtomicU32, Ordering}};
/// use tower::{Layer, Service, ServiceExt};
///
/// #[derive(Clone, Debug)]
/// struct Req { method: &'static str }
///
/// let calls = Arc::new(AtomicU32::new(0));
/// let c = calls.clone();
/// let upstream = tower::service_fn(move |_r: Req| {
///     let n = c.fetch_add(1, Ordering::SeqCst);
///     async move { Ok::<u16, std::convert::Infallible>(if n < 2 { 503 } else { 200 }) }
/// });
/// let layer = RetryLayer::new(
///     RetryPolicy::default(),
///     |r: &Req| (r.method == "GET").then(|| r.clone()),   // only idempotent requests
///     |r: Result<&u16, &std::convert::Infallible>| match r {
///         Ok(503) => Decision::Retry,
///         _ => Decision::Done,
///     },
/// );
/// let mut svc = layer.layer(upstream);
/// assert_eq!(svc.ready().await.unwrap().call(Req { method: "GET" }).await.unwrap(), 200);
/// assert_eq!(calls.load(Ordering::SeqCst), 3);
/// // POST is not safe: one call, the 503 comes back as is.
/// calls.store(0, Ordering::SeqCst);
/// assert_eq!(svc.ready().await.unwrap().call(Req { method: "POST" }).await.unwrap(), 503);
/// assert_eq!(calls.load(Ordering::SeqCst), 1);
/// # });
/// ```
///
/// A classifier takes `Result<&Response, &Error>`, the shape keel-breaker's
/// classifiers take too; the old habit of taking `&Result<..>` is caught
/// where the closures are given:
///
/// ```compile_fail,E0631
/// use keel_retry::{Decision, RetryLayer, RetryPolicy};
/// // error[E0631]: type mismatch in closure arguments
/// //   expected closure signature `for<'a, 'b> fn(Result<&'a _, &'b _>) -> _`
/// //      found closure signature `fn(&Result<u16, std::io::Error>) -> _`
/// let _layer = RetryLayer::new(
///     RetryPolicy::default(),
///     |r: &u8| Some(*r),
///     |r: &Result<u16, std::io::Error>| Decision::Done,
/// );
/// ```
#[derive(Clone, Debug)]
pub struct RetryLayer<P = RetryErrors> {
    config: Arc<RetryPolicy>,
    policy: P,
}

impl<R, C> RetryLayer<(R, C)> {
    /// A layer retrying as `retry_policy` allows; `clone_if_safe(&req)` returns a
    /// copy only for requests that may be sent again; `classify(result)`
    /// decides what a result calls for (it sees `Ok(&response)` or
    /// `Err(&error)`).
    ///
    /// ```
    /// use keel_retry::{Decision, RetryLayer, RetryPolicy};
    /// let _layer = RetryLayer::new(
    ///     RetryPolicy::default(),
    ///     |r: &String| Some(r.clone()),
    ///     |r: Result<&(), &()>| if r.is_err() { Decision::Retry } else { Decision::Done },
    /// );
    /// ```
    pub fn new<Req, Res, E>(retry_policy: RetryPolicy, clone_if_safe: R, classify: C) -> Self
    where
        R: Fn(&Req) -> Option<Req>,
        C: Fn(Result<&Res, &E>) -> Decision,
    {
        Self::with_policy(retry_policy, (clone_if_safe, classify))
    }
}

impl<P> RetryLayer<P> {
    /// A layer retrying the requests and results `policy` (a [`Policy`])
    /// allows, as `retry_policy` (attempts, backoff, deadline, budget,
    /// breaker) allows.
    ///
    /// ```
    /// use keel_retry::{RetryErrors, RetryLayer, RetryPolicy};
    /// let layer: RetryLayer = RetryLayer::with_policy(RetryPolicy::default().max_attempts(2), RetryErrors);
    /// assert_eq!(layer.policy().attempts(), 2);
    /// ```
    pub fn with_policy(retry_policy: RetryPolicy, policy: P) -> Self {
        Self {
            config: Arc::new(retry_policy),
            policy,
        }
    }

    /// The [`RetryPolicy`]: how it retries (attempts, backoff, deadline,
    /// budget, breaker).
    ///
    /// ```
    /// use keel_retry::{RetryErrors, RetryLayer, RetryPolicy};
    /// let layer = RetryLayer::with_policy(RetryPolicy::default(), RetryErrors);
    /// assert_eq!(layer.policy().attempts(), 3);
    /// ```
    pub fn policy(&self) -> &RetryPolicy {
        &self.config
    }
}

impl<S, P: Clone> tower_layer::Layer<S> for RetryLayer<P> {
    type Service = RetryService<S, P>;
    fn layer(&self, inner: S) -> Self::Service {
        RetryService {
            inner,
            config: self.config.clone(),
            policy: self.policy.clone(),
        }
    }
}

/// The service made by [`RetryLayer`].
///
/// ```
/// use keel_retry::{RetryErrors, RetryLayer, RetryPolicy, RetryService};
/// use tower::Layer;
/// let layer = RetryLayer::with_policy(RetryPolicy::default(), RetryErrors);
/// let svc: RetryService<_> = layer.layer(tower::service_fn(|x: u8| async move { Ok::<_, ()>(x) }));
/// assert_eq!(svc.policy().attempts(), 3);
/// ```
#[derive(Clone, Debug)]
pub struct RetryService<S, P = RetryErrors> {
    inner: S,
    config: Arc<RetryPolicy>,
    policy: P,
}

impl<S, P> RetryService<S, P> {
    /// The retry policy: attempts, backoff, deadline, budget, breaker.
    ///
    /// ```
    /// # use keel_retry::{Decision, RetryLayer, RetryPolicy};
    /// # use tower::Layer;
    /// # let layer = RetryLayer::new(RetryPolicy::default(), |r: &u8| Some(*r), |_: Result<&u8, &()>| Decision::Done);
    /// # let svc = layer.layer(tower::service_fn(|x: u8| async move { Ok::<_, ()>(x) }));
    /// assert!(svc.policy().attempts() >= 1);
    /// ```
    pub fn policy(&self) -> &RetryPolicy {
        &self.config
    }

    /// The wrapped service.
    ///
    /// ```
    /// # use keel_retry::{RetryErrors, RetryLayer, RetryPolicy};
    /// # use tower::Layer;
    /// let svc = RetryLayer::with_policy(RetryPolicy::default(), RetryErrors).layer(7u8);
    /// assert_eq!(*svc.get_ref(), 7);
    /// ```
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    ///
    /// ```
    /// # use keel_retry::{RetryErrors, RetryLayer, RetryPolicy};
    /// # use tower::Layer;
    /// let mut svc = RetryLayer::with_policy(RetryPolicy::default(), RetryErrors).layer(7u8);
    /// *svc.get_mut() += 1;
    /// assert_eq!(svc.into_inner(), 8);
    /// ```
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the wrapped service.
    ///
    /// ```
    /// # use keel_retry::{RetryErrors, RetryLayer, RetryPolicy};
    /// # use tower::Layer;
    /// assert_eq!(RetryLayer::with_policy(RetryPolicy::default(), RetryErrors).layer(7u8).into_inner(), 7);
    /// ```
    pub fn into_inner(self) -> S {
        self.inner
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`RetryService`]: the retry loop as a state
    /// machine over the inner service's future, with no allocation per
    /// call. It owns a clone of the service for retries (polled ready
    /// before each), the spare copy of the request, and the breaker permit
    /// of the attempt in flight.
    ///
    /// ```
    /// use keel_retry::{RetryErrors, RetryFuture, RetryLayer, RetryPolicy};
    /// use tower::{Layer, Service};
    ///
    /// let inner = tower::service_fn(|x: u8| std::future::ready(Ok::<_, ()>(x)));
    /// let mut svc = RetryLayer::with_policy(RetryPolicy::default(), RetryErrors).layer(inner);
    /// let fut: RetryFuture<_, u8, RetryErrors> = svc.call(1);
    /// // Send (and Sync) when the service, its future, the request and
    /// // the policy are, as axum and tokio::spawn need.
    /// fn send_sync<T: Send + Sync>(_: &T) {}
    /// send_sync(&fut);
    /// ```
    pub struct RetryFuture<S, Req, P>
    where
        S: Service<Req>,
    {
        #[pin]
        state: State<S::Future>,
        #[pin]
        timer: Timer,
        svc: Option<S>,
        spare: Option<Req>,
        policy: P,
        config: Arc<RetryPolicy>,
        run: Run,
        permit: Option<Permit<'static>>,
        previous: Option<Result<S::Response, S::Error>>,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State<F> {
        Rejected { rejected: Option<Rejected> },
        Calling { #[pin] fut: F },
        Readying,
        Sleeping { until: Instant },
        Done,
    }
}

pin_project_lite::pin_project! {
    /// One timer serves both waits, which never overlap: the whole-call
    /// deadline while an attempt runs, the backoff between attempts. It is
    /// made on the first poll that has to wait for either, so a call that
    /// completes at once costs none.
    #[project = TimerProj]
    enum Timer {
        Idle,
        Armed { #[pin] sleep: Sleep },
    }
}

impl Timer {
    /// Polls the timer set to `at`.
    fn poll_until(mut self: Pin<&mut Self>, at: Instant, cx: &mut Context<'_>) -> Poll<()> {
        if let TimerProj::Armed { mut sleep } = self.as_mut().project() {
            if sleep.deadline() != at {
                sleep.as_mut().reset(at);
            }
            return sleep.poll(cx);
        }
        self.set(Timer::Armed {
            sleep: tokio::time::sleep_until(at),
        });
        match self.project() {
            TimerProj::Armed { sleep } => sleep.poll(cx),
            TimerProj::Idle => Poll::Pending,
        }
    }
}

/// Until when to sleep for `delay` from now; a delay too long to represent
/// sleeps as long as tokio's own `sleep` would (about 30 years).
fn wake_at(delay: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(delay)
        .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365 * 30))
}

impl<S, Req, P> std::fmt::Debug for RetryFuture<S, Req, P>
where
    S: Service<Req>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryFuture")
            .field("run", &self.run)
            .field("permit", &self.permit)
            .finish_non_exhaustive()
    }
}

impl<S, Req, P> Future for RetryFuture<S, Req, P>
where
    S: Service<Req>,
    P: Policy<Req, S::Response, S::Error>,
{
    type Output = Result<S::Response, RetryError<S::Error>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            // Each turn either waits, ends, or yields an attempt's result.
            let polled = match this.state.as_mut().project() {
                StateProj::Rejected { rejected } => {
                    let rejected = rejected.take();
                    this.state.set(State::Done);
                    let rejected = rejected.expect("RetryFuture polled after completion");
                    return Poll::Ready(Err(RetryError::Rejected(rejected)));
                }
                StateProj::Calling { fut } => fut.poll(cx),
                StateProj::Readying => {
                    let svc = this.svc.as_mut().expect("a retry has a service");
                    match svc.poll_ready(cx) {
                        Poll::Ready(Ok(())) => {
                            let req = this.spare.take().expect("a retry has its request");
                            // The copy for the attempt after this one.
                            *this.spare = this.policy.clone_request(&req);
                            let fut = svc.call(req);
                            this.state.set(State::Calling { fut });
                            continue;
                        }
                        // A retry whose service cannot get ready failed,
                        // and is classified like any failure.
                        Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                        Poll::Pending => Poll::Pending,
                    }
                }
                StateProj::Sleeping { until } => {
                    ready!(this.timer.as_mut().poll_until(*until, cx));
                    this.run.attempt += 1;
                    match this.config.gate(this.run.attempt) {
                        Ok(permit) => {
                            *this.permit = permit;
                            this.state.set(State::Readying);
                            continue;
                        }
                        Err(rejected) => {
                            this.state.set(State::Done);
                            return Poll::Ready(this.run.rejected(rejected, this.previous.take()));
                        }
                    }
                }
                StateProj::Done => panic!("RetryFuture polled after completion"),
            };
            let result = match polled {
                Poll::Ready(result) => result,
                // An attempt, or a retry's wait for its service, still
                // going: only the whole-call deadline ends it early.
                Poll::Pending => {
                    let Some(at) = this.run.deadline else {
                        return Poll::Pending;
                    };
                    ready!(this.timer.as_mut().poll_until(at, cx));
                    this.state.set(State::Done);
                    let attempt = this.run.attempt;
                    return Poll::Ready(Err(this.config.deadline_passed(
                        this.permit.take(),
                        attempt,
                        this.previous.take(),
                    )));
                }
            };
            let decision = this.policy.classify(result.as_ref());
            // No copy to send: the result is final, whatever it calls for.
            let replayable = this.spare.is_some() && this.svc.is_some();
            match this.config.after(
                this.run,
                result.is_ok(),
                decision,
                this.permit.take(),
                replayable,
            ) {
                Err(reason) => {
                    this.state.set(State::Done);
                    return Poll::Ready(finish(result, this.run.attempt, reason));
                }
                Ok(delay) => {
                    *this.previous = Some(result);
                    this.state.set(State::Sleeping {
                        until: wake_at(delay),
                    });
                }
            }
        }
    }
}

impl<S, P, Req> Service<Req> for RetryService<S, P>
where
    S: Service<Req> + Clone,
    P: Policy<Req, S::Response, S::Error> + Clone,
{
    type Response = S::Response;
    type Error = RetryError<S::Error>;
    type Future = RetryFuture<S, Req, P>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(RetryError::NotReady)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let run = Run::start(&self.config);
        // The ready service serves the first attempt; a clone, polled ready
        // again, serves the retries of a request that may be sent again.
        let spare = self.policy.clone_request(&req);
        let svc = spare.as_ref().map(|_| self.inner.clone());
        let (state, permit) = match self.config.gate(1) {
            Ok(permit) => (
                State::Calling {
                    fut: self.inner.call(req),
                },
                permit,
            ),
            Err(rejected) => (
                State::Rejected {
                    rejected: Some(rejected),
                },
                None,
            ),
        };
        RetryFuture {
            state,
            timer: Timer::Idle,
            svc,
            spare,
            policy: self.policy.clone(),
            config: self.config.clone(),
            run,
            permit,
            previous: None,
        }
    }
}
