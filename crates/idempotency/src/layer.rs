//! A tower [`Layer`] that puts the [engine](crate::engine) in front of any
//! `http` service (axum routers, hyper services).
//!
//! A thin adapter: it buffers the request body (up to the route's limit)
//! when the engine needs it, asks [`Engine::begin`], and then calls the
//! inner service, replays or refuses. Executed responses are buffered so
//! they can be recorded; an error from the inner service, or a response
//! body that fails mid-way, locks the key as "outcome unknown" (the
//! operation may have run). A response carrying
//! [`NotExecuted`] releases the key instead:
//! the handler says the operation never ran, so the retry runs it.
//! Requests the engine does not cover stream through untouched.
//!
//! ```
//! use std::convert::Infallible;
//! use std::sync::Arc;
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, Full};
//! use keel_idempotency::{Engine, IdempotencyLayer, MemoryStore, Policy};
//! use tower::{Layer, Service, ServiceExt};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let engine = Engine::new(Arc::new(MemoryStore::new()), Policy::default());
//! let handler = tower::service_fn(|_req: http::Request<_>| async {
//!     Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from("created"))))
//! });
//! let mut svc = IdempotencyLayer::new(engine).layer(handler);
//! let request = || http::Request::post("/orders")
//!     .header("authorization", "Bearer alice")
//!     .header("idempotency-key", "k1")
//!     .body(Full::new(Bytes::from("{}")))
//!     .unwrap();
//! let first = svc.ready().await.unwrap().call(request()).await.unwrap();
//! assert!(!first.headers().contains_key("idempotent-replayed"));
//! let again = svc.ready().await.unwrap().call(request()).await.unwrap();
//! assert_eq!(again.headers()["idempotent-replayed"], "true");
//! assert_eq!(again.into_body().collect().await.unwrap().to_bytes(), "created");
//! # });
//! ```

//!
//! # In a `ServiceBuilder` stack
//!
//! Put the idempotency layer outside the layers that can fail the call
//! (timeouts, retries, breakers): it must see their outcome. A timeout
//! inside it surfaces as the inner service's error, which locks the key as
//! "outcome unknown" (the handler may have run), never frees it:
//!
//! ```
//! use std::convert::Infallible;
//! use std::sync::Arc;
//! use std::time::Duration;
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use keel_idempotency::{Engine, IdempotencyLayer, MemoryStore, Policy};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap().block_on(async {
//! let engine = Engine::new(Arc::new(MemoryStore::new()), Policy::default());
//! let slow = tower::service_fn(|_req: http::Request<_>| async {
//!     tokio::time::sleep(Duration::from_secs(60)).await;
//!     Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from("charged"))))
//! });
//! let svc = ServiceBuilder::new()
//!     .layer(IdempotencyLayer::new(engine))
//!     .timeout(Duration::from_secs(5))
//!     .service(slow);
//! let request = || http::Request::post("/charges")
//!     .header("authorization", "Bearer alice")
//!     .header("idempotency-key", "c-1")
//!     .body(Full::new(Bytes::from("{}")))
//!     .unwrap();
//! // The call times out: the handler may have run.
//! assert!(svc.clone().oneshot(request()).await.is_err());
//! tokio::task::yield_now().await; // the key is locked on a spawned task
//! // Its retry is told so, and does not run the handler again.
//! let retry = svc.oneshot(request()).await.unwrap();
//! assert_eq!(retry.status(), 409);
//! # });
//! ```
//!
//! The whole stack, outermost first: idempotency, retry, keel-breaker's
//! breaker, a per-attempt timeout. The retry resends only what surely
//! never reached the operation (here a refused connection); a timeout may
//! have run it, so it is not retried but surfaced, and the key is locked.
//! The idempotency layer hands the inner layers the buffered body, which
//! makes the request cheap to copy for a retry:
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use std::time::Duration;
//! use bytes::Bytes;
//! use http_body_util::{Either, Full};
//! use keel_breaker::{Breaker, BreakerLayer, CallError, Config};
//! use keel_idempotency::{Engine, IdempotencyLayer, MemoryStore, Policy};
//! use keel_retry::{Backoff, Decision, RetryLayer, RetryPolicy};
//! use tower::{BoxError, ServiceBuilder, ServiceExt};
//!
//! #[derive(Debug)]
//! struct Refused; // the connection was refused: nothing was sent
//! impl std::fmt::Display for Refused {
//!     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
//!         f.write_str("connection refused")
//!     }
//! }
//! impl std::error::Error for Refused {}
//!
//! type Body = Either<Full<Bytes>, Full<Bytes>>;
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap().block_on(async {
//! let calls = Arc::new(AtomicU32::new(0));
//! let counted = calls.clone();
//! // Refuses the first attempt, then charges.
//! let charge = tower::service_fn(move |_req: http::Request<Body>| {
//!     let n = counted.fetch_add(1, Ordering::SeqCst);
//!     async move {
//!         if n == 0 {
//!             return Err(BoxError::from(Refused));
//!         }
//!         Ok(http::Response::new(Full::new(Bytes::from("charged"))))
//!     }
//! });
//! let breaker = Breaker::new("payments", Config::default()).unwrap();
//! let svc = ServiceBuilder::new()
//!     .layer(IdempotencyLayer::new(Engine::new(Arc::new(MemoryStore::new()), Policy::default())))
//!     .layer(RetryLayer::new(
//!         RetryPolicy::default()
//!             .max_attempts(3)
//!             .backoff(Backoff::constant(Duration::from_millis(20))),
//!         // A copy to resend: the body is the layer's buffered one.
//!         |req: &http::Request<Body>| {
//!             let mut copy = http::Request::new(req.body().clone());
//!             *copy.method_mut() = req.method().clone();
//!             *copy.uri_mut() = req.uri().clone();
//!             *copy.headers_mut() = req.headers().clone();
//!             Some(copy)
//!         },
//!         |r: Result<&http::Response<Full<Bytes>>, &CallError<BoxError>>| match r {
//!             Err(CallError::Inner(e)) if e.is::<Refused>() => Decision::Retry,
//!             _ => Decision::Done, // a timeout may have charged: never resend
//!         },
//!     ))
//!     .layer(BreakerLayer::new(breaker))
//!     .timeout(Duration::from_secs(5))
//!     .service(charge);
//! let request = || http::Request::post("/charges")
//!     .header("authorization", "Bearer alice")
//!     .header("idempotency-key", "c-2")
//!     .body(Full::new(Bytes::from("{}")))
//!     .unwrap();
//! let first = svc.clone().oneshot(request()).await.unwrap();
//! assert_eq!(first.status(), 200);
//! assert_eq!(calls.load(Ordering::SeqCst), 2, "refused once, then charged");
//! // The client's own retry is a replay: the charge ran once.
//! let again = svc.oneshot(request()).await.unwrap();
//! assert_eq!(again.headers()["idempotent-replayed"], "true");
//! assert_eq!(calls.load(Ordering::SeqCst), 2);
//! # });
//! ```

use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Either, Full, LengthLimitError, Limited};
use tower_layer::Layer;
use tower_service::Service;

use crate::engine::{Begin, Engine, NotExecuted, RequestHead};
use crate::problem::{Problem, ProblemKind};
use crate::store::BoxFuture;

/// The error type of bodies this layer produces.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The request body the inner service receives: the original (streamed)
/// body, or the buffered one.
pub type LayerRequestBody<B> = Either<B, Full<Bytes>>;

/// The response body the layer returns: the inner service's own, or a
/// buffered, replayed or problem body.
pub type LayerResponseBody<B> = Either<B, Full<Bytes>>;

/// The future [`Idempotency`] returns (boxed: the store's operations are
/// boxed futures already, so one more allocation per keyed call is small
/// beside them), named so a stack holding it can be written down.
///
/// ```
/// use keel_idempotency::layer::IdempotencyFuture;
/// fn _named(_: IdempotencyFuture<http_body_util::Full<bytes::Bytes>, std::convert::Infallible>) {}
/// ```
pub type IdempotencyFuture<B, E> = BoxFuture<'static, Result<Response<LayerResponseBody<B>>, E>>;

/// Wraps a service with [`Idempotency`].
#[derive(Clone, Debug)]
pub struct IdempotencyLayer {
    engine: Engine,
}

impl IdempotencyLayer {
    /// A layer driving `engine`.
    ///
    /// ```
    /// use keel_idempotency::{engine::{Engine, Policy}, layer::IdempotencyLayer, memory::MemoryStore};
    /// let layer = IdempotencyLayer::new(Engine::new(std::sync::Arc::new(MemoryStore::new()), Policy::default()));
    /// ```
    pub fn new(engine: Engine) -> Self {
        Self { engine }
    }
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = Idempotency<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotency {
            inner,
            engine: self.engine.clone(),
        }
    }
}

/// The service made by [`IdempotencyLayer`].
#[derive(Clone, Debug)]
pub struct Idempotency<S> {
    inner: S,
    engine: Engine,
}

fn buffered<B>(bytes: Bytes) -> Either<B, Full<Bytes>> {
    Either::Right(Full::new(bytes))
}

fn plain<B>(status: StatusCode, text: &'static str) -> Response<LayerResponseBody<B>> {
    let mut r = Response::new(buffered(Bytes::from_static(text.as_bytes())));
    *r.status_mut() = status;
    r
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for Idempotency<S>
where
    S: Service<Request<LayerRequestBody<ReqB>>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send + 'static,
    ReqB: Body<Data = Bytes> + Send + 'static,
    ReqB::Error: Into<BoxError>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<LayerResponseBody<ResB>>;
    type Error = S::Error;
    type Future = IdempotencyFuture<ResB, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        // The clone that was driven to readiness serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let engine = self.engine.clone();
        Box::pin(async move {
            if !engine.needs_body(RequestHead::from(&req)) {
                let response = inner.call(req.map(Either::Left)).await?;
                return Ok(response.map(Either::Left));
            }
            let (parts, body) = req.into_parts();
            let max = engine.policy().max_body();
            let bytes = match Limited::new(body, max).collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
                    let p = Problem::new(
                        ProblemKind::BodyTooLarge,
                        format!(
                            "idempotent requests on this route accept bodies up to {max} bytes"
                        ),
                    );
                    return Ok(p.to_response().map(buffered));
                }
                Err(_) => {
                    return Ok(plain(
                        StatusCode::BAD_REQUEST,
                        "could not read the request body",
                    ));
                }
            };
            match engine.begin(&parts, &bytes).await {
                Begin::PassThrough(_) => {
                    let response = inner
                        .call(Request::from_parts(parts, buffered(bytes)))
                        .await?;
                    Ok(response.map(Either::Left))
                }
                Begin::Replay(r) | Begin::Reject(r) => Ok(r.map(buffered)),
                Begin::Execute(mut guard) => {
                    guard.mark_started();
                    // The handler and the reading of its body run under
                    // the lease, renewed while they last. On error the
                    // guard is dropped started, which records "outcome
                    // unknown" on a spawned task.
                    let response = guard
                        .hold(inner.call(Request::from_parts(parts, buffered(bytes))))
                        .await?;
                    if response.extensions().get::<NotExecuted>().is_some() {
                        // The handler says the operation never ran: free
                        // the key so the client's retry runs it. The
                        // response streams through; it is not recorded.
                        let _ = guard.release().await;
                        return Ok(response.map(Either::Left));
                    }
                    let (rparts, rbody) = response.into_parts();
                    // Keep only Send values across the awaits below.
                    let collected = guard.hold(rbody.collect()).await.ok().map(|c| c.to_bytes());
                    match collected {
                        Some(body) => {
                            // The client gets its response even if recording
                            // fails; a retry then meets the claim (409), and
                            // once its lease lapses the key stays locked as
                            // "outcome unknown".
                            let _ = guard
                                .complete_parts(rparts.status, &rparts.headers, &body)
                                .await;
                            Ok(Response::from_parts(rparts, buffered(body)))
                        }
                        None => {
                            let _ = guard.outcome_unknown().await;
                            Ok(plain(
                                StatusCode::BAD_GATEWAY,
                                "the response body failed mid-way",
                            ))
                        }
                    }
                }
            }
        })
    }
}
