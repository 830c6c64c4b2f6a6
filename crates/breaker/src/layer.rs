//! A thin tower adapter: admit through the breaker, classify the result.
//! The breaker does all the work; this module only translates.

use crate::{Breaker, CallError, Classify, DefaultClassifier};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tower_service::Service;

/// A tower [`Layer`](tower_layer::Layer) that guards a service with a
/// breaker. Rejected calls fail with [`CallError::Rejected`] without
/// reaching the inner service.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
/// use keel_breaker::{Breaker, BreakerLayer, CallError, Config, Outcome};
/// use std::time::Duration;
/// use tower::{Layer, Service, ServiceExt};
///
/// let breaker = Breaker::new("api", Config::fuse(0, Duration::from_secs(1), Duration::from_secs(9))).unwrap();
/// // Status codes >= 500 are failures.
/// let layer = BreakerLayer::new(breaker.clone())
///     .classify(|r: &Result<u16, std::convert::Infallible>| match r {
///         Ok(code) if *code >= 500 => Outcome::Failure,
///         _ => Outcome::Success,
///     });
/// let mut svc = layer.layer(tower::service_fn(|_req: ()| async { Ok::<u16, std::convert::Infallible>(503) }));
/// assert_eq!(svc.ready().await.unwrap().call(()).await.unwrap(), 503);
/// let err = svc.ready().await.unwrap().call(()).await.unwrap_err();
/// assert!(matches!(err, CallError::Rejected(_)));
/// # });
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
    /// Uses `classifier` to decide what a result means.
    ///
    /// ```
    /// use keel_breaker::{BreakerLayer, Outcome};
    /// let b = keel_breaker::Breaker::new("api", Default::default()).unwrap();
    /// let _layer = BreakerLayer::new(b).classify(|_: &Result<(), ()>| Outcome::Ignore);
    /// ```
    pub fn classify<C2>(self, classifier: C2) -> BreakerLayer<C2> {
        BreakerLayer {
            breaker: self.breaker,
            classifier,
        }
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
}

/// The response future of [`BreakerService`].
///
/// ```
/// fn _is_send<T: Send>() {}
/// _is_send::<keel_breaker::BreakerFuture<u16, std::io::Error>>();
/// ```
pub type BreakerFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, CallError<E>>> + Send>>;

impl<S, C, Req> Service<Req> for BreakerService<S, C>
where
    S: Service<Req>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: Send + 'static,
    C: Classify<S::Response, S::Error> + Clone + Send + 'static,
{
    type Response = S::Response;
    type Error = CallError<S::Error>;
    type Future = BreakerFuture<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(CallError::Inner)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let permit = match self.breaker.allow_owned() {
            Ok(p) => p,
            Err(r) => return Box::pin(std::future::ready(Err(CallError::Rejected(r)))),
        };
        let fut = self.inner.call(req);
        let classifier = self.classifier.clone();
        Box::pin(async move {
            let result = fut.await;
            permit.record(classifier.classify(&result));
            result.map_err(CallError::Inner)
        })
    }
}
