//! A thin tower adapter over [`RetryPolicy::execute`]. The layer never
//! guesses which requests are safe to retry: the caller's `clone_if_safe`
//! says so by returning a copy (for HTTP: GET, HEAD, OPTIONS, PUT, DELETE,
//! or a request carrying an idempotency key, with its body buffered).

use crate::{Decision, RetryError, RetryPolicy};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tower_service::Service;

/// A tower [`Layer`](tower_layer::Layer) that retries requests
/// `clone_if_safe` can copy, for results `classify` calls retryable.
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
#[derive(Clone, Debug)]
pub struct RetryLayer<R, C> {
    policy: RetryPolicy,
    clone_if_safe: R,
    classify: C,
}

impl<R, C> RetryLayer<R, C> {
    /// A layer retrying with `policy`; `clone_if_safe(&req)` returns a copy
    /// only for requests that may be sent again; `classify(&result)`
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
    pub fn new(policy: RetryPolicy, clone_if_safe: R, classify: C) -> Self {
        Self {
            policy,
            clone_if_safe,
            classify,
        }
    }
}

impl<S, R: Clone, C: Clone> tower_layer::Layer<S> for RetryLayer<R, C> {
    type Service = RetryService<S, R, C>;
    fn layer(&self, inner: S) -> Self::Service {
        RetryService {
            inner,
            policy: self.policy.clone(),
            clone_if_safe: self.clone_if_safe.clone(),
            classify: self.classify.clone(),
        }
    }
}

/// The service made by [`RetryLayer`].
///
/// ```
/// use keel_retry::{Decision, RetryLayer, RetryPolicy};
/// use tower::Layer;
/// let layer = RetryLayer::new(RetryPolicy::default(), |r: &u8| Some(*r), |_: Result<&u8, &()>| Decision::Done);
/// let svc = layer.layer(tower::service_fn(|x: u8| async move { Ok::<_, ()>(x) }));
/// assert_eq!(svc.policy().attempts(), 3);
/// ```
#[derive(Clone, Debug)]
pub struct RetryService<S, R, C> {
    inner: S,
    policy: RetryPolicy,
    clone_if_safe: R,
    classify: C,
}

impl<S, R, C> RetryService<S, R, C> {
    /// The retry policy.
    ///
    /// ```
    /// # use keel_retry::{Decision, RetryLayer, RetryPolicy};
    /// # use tower::Layer;
    /// # let layer = RetryLayer::new(RetryPolicy::default(), |r: &u8| Some(*r), |_: Result<&u8, &()>| Decision::Done);
    /// # let svc = layer.layer(tower::service_fn(|x: u8| async move { Ok::<_, ()>(x) }));
    /// assert!(svc.policy().attempts() >= 1);
    /// ```
    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }
}

/// The response future of [`RetryService`].
///
/// ```
/// fn _is_send<T: Send>() {}
/// _is_send::<keel_retry::RetryFuture<u16, std::io::Error>>();
/// ```
pub type RetryFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, RetryError<E>>> + Send>>;

impl<S, R, C, Req> Service<Req> for RetryService<S, R, C>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: Send + 'static,
    Req: Send + 'static,
    R: Fn(&Req) -> Option<Req> + Clone + Send + 'static,
    C: Fn(Result<&S::Response, &S::Error>) -> Decision + Clone + Send + 'static,
{
    type Response = S::Response;
    type Error = RetryError<S::Error>;
    type Future = RetryFuture<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner
            .poll_ready(cx)
            .map_err(|error| RetryError::Failed {
                error,
                attempts: 0,
                reason: crate::StopReason::NotRetryable,
            })
    }

    fn call(&mut self, req: Req) -> Self::Future {
        // The ready service serves the first attempt; clones (polled ready
        // again) serve retries.
        let ready = {
            let clone = self.inner.clone();
            std::mem::replace(&mut self.inner, clone)
        };
        let Some(template) = (self.clone_if_safe)(&req) else {
            let mut svc = ready;
            let fut = svc.call(req);
            return Box::pin(async move {
                fut.await.map_err(|error| RetryError::Failed {
                    error,
                    attempts: 1,
                    reason: crate::StopReason::NotRetryable,
                })
            });
        };
        let policy = self.policy.clone();
        let clone_if_safe = self.clone_if_safe.clone();
        let classify = self.classify.clone();
        let base = ready.clone();
        let mut first = Some((ready, req));
        // The copy for the next attempt is made when a retry is decided, so
        // a request that cannot be copied ends retrying with the last real
        // result. Per-request state: this lock is never shared by requests.
        let spare: Arc<Mutex<Option<Req>>> = Arc::new(Mutex::new(None));
        let spare_in = spare.clone();
        Box::pin(async move {
            let result = policy
                .execute(
                    move |_attempt| {
                        let next = match first.take() {
                            Some((svc, req)) => Some((svc, req, false)),
                            None => spare_in
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .take()
                                .map(|r| (base.clone(), r, true)),
                        };
                        async move {
                            let Some((mut svc, req, poll)) = next else {
                                return Err(Attempt::NoCopy);
                            };
                            if poll {
                                std::future::poll_fn(|cx| svc.poll_ready(cx))
                                    .await
                                    .map_err(Attempt::Failed)?;
                            }
                            svc.call(req).await.map_err(Attempt::Failed)
                        }
                    },
                    move |r: &Result<S::Response, Attempt<S::Error>>| {
                        let decision = match r {
                            Ok(resp) => classify(Ok(resp)),
                            Err(Attempt::Failed(e)) => classify(Err(e)),
                            Err(Attempt::NoCopy) => Decision::Done,
                        };
                        if !decision.is_retry() {
                            return decision;
                        }
                        match clone_if_safe(&template) {
                            Some(copy) => {
                                *spare.lock().unwrap_or_else(|e| e.into_inner()) = Some(copy);
                                decision
                            }
                            None => Decision::Done,
                        }
                    },
                )
                .await;
            result.map_err(|e| match e {
                RetryError::Failed {
                    error: Attempt::Failed(error),
                    attempts,
                    reason,
                } => RetryError::Failed {
                    error,
                    attempts,
                    reason,
                },
                RetryError::Failed {
                    error: Attempt::NoCopy,
                    attempts,
                    ..
                } => RetryError::NotReplayable {
                    attempts: attempts.saturating_sub(1),
                },
                RetryError::DeadlineExceeded { attempts, last } => RetryError::DeadlineExceeded {
                    attempts,
                    last: last.and_then(|a| match a {
                        Attempt::Failed(e) => Some(e),
                        Attempt::NoCopy => None,
                    }),
                },
                RetryError::Rejected(r) => RetryError::Rejected(r),
                RetryError::NotReplayable { attempts } => RetryError::NotReplayable { attempts },
            })
        })
    }
}

/// An attempt's failure inside the layer: the service's error, or no copy
/// of the request could be made for this retry.
enum Attempt<E> {
    Failed(E),
    NoCopy,
}
