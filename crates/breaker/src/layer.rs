//! A thin tower adapter: admit through the breaker, classify the result.
//! The breaker does all the work; this module only translates.

use crate::{Breaker, CallError, Classify, DefaultClassifier, Permit, Rejected};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tower_service::Service;

/// A tower [`Layer`](tower_layer::Layer) that guards a service with a
/// breaker. Rejected calls fail with [`CallError::Rejected`] without
/// reaching the inner service; the inner service's own errors come back
/// as [`CallError::Inner`], unchanged.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
/// use keel_breaker::{Breaker, BreakerLayer, CallError, Config, Outcome};
/// use std::convert::Infallible;
/// use std::time::Duration;
/// use tower::{Layer, Service, ServiceExt};
///
/// let breaker = Breaker::new("api", Config::fuse(0, Duration::from_secs(1), Duration::from_secs(9))).unwrap();
/// // Status codes >= 500 are failures.
/// let layer = BreakerLayer::new(breaker.clone())
///     .classify(|r: Result<&u16, &Infallible>| match r {
///         Ok(code) if *code >= 500 => Outcome::Failure,
///         _ => Outcome::Success,
///     });
/// let mut svc = layer.layer(tower::service_fn(|_req: ()| async { Ok::<u16, Infallible>(503) }));
/// assert_eq!(svc.ready().await.unwrap().call(()).await.unwrap(), 503);
/// let err = svc.ready().await.unwrap().call(()).await.unwrap_err();
/// assert!(matches!(err, CallError::Rejected(_)));
/// # });
/// ```
///
/// A classifier takes `Result<&Response, &Error>`, the shape keel-retry's
/// classifiers take too. The old habit of taking `&Result<..>` is caught
/// where the classifier is given, with a message that says so:
///
/// ```compile_fail,E0631
/// use keel_breaker::{Breaker, BreakerLayer, Outcome};
/// let breaker = Breaker::new("api", Default::default()).unwrap();
/// // error[E0631]: type mismatch in closure arguments
/// //   expected closure signature `for<'a, 'b> fn(Result<&'a _, &'b _>) -> _`
/// //      found closure signature `fn(&Result<u16, std::io::Error>) -> _`
/// let _layer = BreakerLayer::new(breaker)
///     .classify(|r: &Result<u16, std::io::Error>| Outcome::Success);
/// ```
#[derive(Clone, Debug)]
pub struct BreakerLayer<C = DefaultClassifier> {
    breaker: Breaker,
    classifier: C,
}

impl BreakerLayer {
    /// Guards with `breaker`; `Err` results are failures.
    ///
    /// ```
    /// let b = keel_breaker::Breaker::new("api", Default::default()).unwrap();
    /// let _layer = keel_breaker::BreakerLayer::new(b);
    /// ```
    pub fn new(breaker: Breaker) -> Self {
        Self {
            breaker,
            classifier: DefaultClassifier,
        }
    }
}

impl<C> BreakerLayer<C> {
    /// Uses `classifier` to decide what a result means. `T` and `E` are
    /// the guarded service's response and error types; a closure names
    /// them in its argument, a classifier generic over them needs them
    /// spelled out (`classify::<Response, Error, _>(c)`).
    ///
    /// ```
    /// use keel_breaker::{BreakerLayer, Outcome};
    /// let b = keel_breaker::Breaker::new("api", Default::default()).unwrap();
    /// let _layer = BreakerLayer::new(b).classify(|_: Result<&(), &()>| Outcome::Ignore);
    /// ```
    pub fn classify<T, E, C2>(self, classifier: C2) -> BreakerLayer<C2>
    where
        C2: Classify<T, E>,
    {
        BreakerLayer {
            breaker: self.breaker,
            classifier,
        }
    }

    /// The guarding breaker.
    ///
    /// ```
    /// let b = keel_breaker::Breaker::new("api", Default::default()).unwrap();
    /// assert_eq!(keel_breaker::BreakerLayer::new(b).breaker().name(), "api");
    /// ```
    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }
}

impl<S, C: Clone> tower_layer::Layer<S> for BreakerLayer<C> {
    type Service = BreakerService<S, C>;
    fn layer(&self, inner: S) -> Self::Service {
        BreakerService {
            inner,
            breaker: self.breaker.clone(),
            classifier: self.classifier.clone(),
        }
    }
}

/// The service made by [`BreakerLayer`].
///
/// ```
/// use tower::Layer;
/// let b = keel_breaker::Breaker::new("api", Default::default()).unwrap();
/// let svc = keel_breaker::BreakerLayer::new(b).layer(tower::service_fn(|x: u8| async move { Ok::<_, ()>(x) }));
/// assert_eq!(svc.breaker().name(), "api");
/// ```
#[derive(Clone, Debug)]
pub struct BreakerService<S, C = DefaultClassifier> {
    inner: S,
    breaker: Breaker,
    classifier: C,
}

impl<S, C> BreakerService<S, C> {
    /// The guarding breaker.
    ///
    /// ```
    /// # use tower::Layer;
    /// # let b = keel_breaker::Breaker::new("api", Default::default()).unwrap();
    /// # let svc = keel_breaker::BreakerLayer::new(b).layer(tower::service_fn(|x: u8| async move { Ok::<_, ()>(x) }));
    /// assert_eq!(svc.breaker().state(), keel_breaker::State::Closed);
    /// ```
    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    /// The guarded service.
    ///
    /// ```
    /// # use tower::Layer;
    /// # let b = keel_breaker::Breaker::new("api", Default::default()).unwrap();
    /// let svc = keel_breaker::BreakerLayer::new(b).layer(7u8);
    /// assert_eq!(*svc.get_ref(), 7);
    /// ```
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The guarded service, mutably.
    ///
    /// ```
    /// # use tower::Layer;
    /// # let b = keel_breaker::Breaker::new("api", Default::default()).unwrap();
    /// let mut svc = keel_breaker::BreakerLayer::new(b).layer(7u8);
    /// *svc.get_mut() += 1;
    /// assert_eq!(svc.into_inner(), 8);
    /// ```
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the guarded service.
    ///
    /// ```
    /// # use tower::Layer;
    /// # let b = keel_breaker::Breaker::new("api", Default::default()).unwrap();
    /// assert_eq!(keel_breaker::BreakerLayer::new(b).layer(7u8).into_inner(), 7);
    /// ```
    pub fn into_inner(self) -> S {
        self.inner
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`BreakerService`]: the inner service's
    /// future `F` and the classifier `C`, with no allocation per call. It
    /// holds the breaker's permit and reports the classified outcome when
    /// the inner future completes; dropped before that, the call counts
    /// as [`Outcome::Ignore`](crate::Outcome::Ignore).
    ///
    /// ```
    /// use keel_breaker::{BreakerFuture, BreakerLayer, DefaultClassifier};
    /// use std::future::Ready;
    /// use tower::{Layer, Service};
    ///
    /// let b = keel_breaker::Breaker::new("api", Default::default()).unwrap();
    /// let mut svc = BreakerLayer::new(b).layer(tower::service_fn(|x: u8| std::future::ready(Ok::<_, ()>(x))));
    /// let fut: BreakerFuture<Ready<Result<u8, ()>>, DefaultClassifier> = svc.call(1);
    /// // Send (and Sync) when the inner future and the classifier are, as
    /// // axum and tokio::spawn need.
    /// fn send_sync<T: Send + Sync>(_: &T) {}
    /// send_sync(&fut);
    /// ```
    pub struct BreakerFuture<F, C> {
        #[pin]
        kind: Kind<F>,
        permit: Option<Permit<'static>>,
        classifier: C,
    }
}

pin_project_lite::pin_project! {
    #[project = KindProj]
    enum Kind<F> {
        Rejected { rejected: Option<Rejected> },
        Called { #[pin] fut: F },
    }
}

impl<F, C> std::fmt::Debug for BreakerFuture<F, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BreakerFuture")
            .field("permit", &self.permit)
            .finish_non_exhaustive()
    }
}

impl<F, C, T, E> Future for BreakerFuture<F, C>
where
    F: Future<Output = Result<T, E>>,
    C: Classify<T, E>,
{
    type Output = Result<T, CallError<E>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.kind.project() {
            KindProj::Rejected { rejected } => Poll::Ready(Err(CallError::Rejected(
                rejected
                    .take()
                    .expect("BreakerFuture polled after completion"),
            ))),
            KindProj::Called { fut } => {
                let result = ready!(fut.poll(cx));
                if let Some(permit) = this.permit.take() {
                    permit.record(this.classifier.classify(result.as_ref()));
                }
                Poll::Ready(result.map_err(CallError::Inner))
            }
        }
    }
}

impl<S, C, Req> Service<Req> for BreakerService<S, C>
where
    S: Service<Req>,
    C: Classify<S::Response, S::Error> + Clone,
{
    type Response = S::Response;
    type Error = CallError<S::Error>;
    type Future = BreakerFuture<S::Future, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(CallError::Inner)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        match self.breaker.allow_owned() {
            Ok(permit) => BreakerFuture {
                kind: Kind::Called {
                    fut: self.inner.call(req),
                },
                permit: Some(permit),
                classifier: self.classifier.clone(),
            },
            Err(rejected) => BreakerFuture {
                kind: Kind::Rejected {
                    rejected: Some(rejected),
                },
                permit: None,
                classifier: self.classifier.clone(),
            },
        }
    }
}
