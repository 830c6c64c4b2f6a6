//! Idempotent routes: the [`RequestFilter`] over keel-idempotency's engine.
//!
//! Per request on a route with `[routes.idempotency] enabled = true`:
//!
//! 1. A request the engine will not act on (method not covered, no key on
//!    a route that does not require one) streams through untouched; only
//!    keyed requests have their body buffered (up to `max_body`, 413 past
//!    it) to be fingerprinted.
//! 2. `engine.begin` claims the key atomically in the shared store. A
//!    replay or a refusal (400, 409 with `Retry-After`, 422, 503 with
//!    `Retry-After`) is answered here; nothing goes upstream.
//! 3. On `Execute` the claim is marked started right before forwarding, and
//!    the [`ResponseFilter`] finishes it: a response is buffered up to
//!    `max_response` and stored (a larger one is streamed to the client
//!    and recorded as "ran, too large to replay"); a request the upstream
//!    never received (`sent == false`) releases the claim so a retry runs;
//!    a request lost after it was sent locks the key as "outcome unknown"
//!    (or releases it where `server_errors = "release"`).

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use keel_idempotency::engine::{
    Begin, Engine, Guard, PassReason, Policy, RequestHead, ServerErrors, StoreDown, Tenant,
};

use crate::body::{BodyTooLarge, ProxyBody};
use crate::config::{IdempotencyConfig, RouteConfig, ServerErrorsPolicy};
use crate::metrics::{IdempotencyMetrics, Metrics};
use crate::problem::{Problem, ProblemKind};
use crate::proxy::{
    BoxFuture, FilterDecision, RequestContext, RequestFilter, ResponseFilter, UpstreamFailure,
};
use crate::store::SharedStore;

/// Outcome indexes into [`crate::metrics::IDEMPOTENCY_OUTCOMES`].
mod outcome {
    pub const NEW: usize = 0;
    pub const REPLAYED: usize = 1;
    pub const IN_FLIGHT: usize = 2;
    pub const MISMATCH: usize = 3;
    pub const STORE_ERROR: usize = 4;
    pub const REJECTED: usize = 5;
    pub const PASSED: usize = 6;
}

/// The engine policy for one route's `[routes.idempotency]`;
/// `request_timeout` is the route upstream's, used for the default lease.
pub fn policy(config: &IdempotencyConfig, request_timeout: Duration, route: &str) -> Policy {
    let methods: Vec<Method> = config
        .methods
        .iter()
        .filter_map(|m| Method::from_bytes(m.get_ref().as_bytes()).ok())
        .collect();
    let tenant = http::HeaderName::from_bytes(config.tenant_header.get_ref().as_bytes())
        .map_or(Tenant::Header(header::AUTHORIZATION), Tenant::Header);
    let size = |s: u64| usize::try_from(s).unwrap_or(usize::MAX);
    let mut policy = Policy::default()
        .methods(methods)
        .required(config.required)
        .ttl(config.ttl.0)
        .tenant(tenant)
        .max_body(size(config.max_body.0))
        .max_response(size(config.max_response.0))
        .store_down(if config.fail_open {
            StoreDown::FailOpen
        } else {
            StoreDown::FailClosed
        })
        .server_errors(match config.server_errors {
            ServerErrorsPolicy::Store => ServerErrors::Store,
            ServerErrorsPolicy::Release => ServerErrors::Release,
        })
        .store_retry_after(Duration::from_secs(1))
        // Routes are scoped apart by path already; the route name keeps
        // two routes over the same paths (different hosts) apart too.
        .namespace(format!("keel:{route}"));
    policy = match &config.lease {
        Some(lease) => policy.lease(lease.0),
        None => policy.lease_for_timeout(request_timeout),
    };
    policy
}

/// Makes the filter for each route with idempotency enabled, all sharing
/// one store and gate.
pub struct Filters {
    store: SharedStore,
    metrics: Arc<Metrics>,
}

impl Filters {
    /// Filters over `store`.
    pub fn new(store: SharedStore, metrics: Arc<Metrics>) -> Self {
        Self { store, metrics }
    }

    /// The filter for `route`, or `None` for a plain route.
    pub fn for_route(
        &self,
        route: &RouteConfig,
        request_timeout: Duration,
    ) -> Option<Arc<dyn RequestFilter>> {
        let config = route.idempotency.as_ref().filter(|i| i.enabled)?;
        let name = route
            .name
            .clone()
            .unwrap_or_else(|| route.path_prefix.get_ref().clone());
        let engine = Engine::with_gate(
            self.store.store.clone(),
            self.store.gate.clone(),
            policy(config, request_timeout, &name),
        );
        Some(Arc::new(IdempotencyFilter {
            engine,
            metrics: self.metrics.idempotency(&name),
            server_errors: config.server_errors,
            max_response: usize::try_from(config.max_response.0).unwrap_or(usize::MAX),
        }))
    }
}

/// The request filter of one idempotent route.
pub struct IdempotencyFilter {
    engine: Engine,
    metrics: IdempotencyMetrics,
    server_errors: ServerErrorsPolicy,
    max_response: usize,
}

impl RequestFilter for IdempotencyFilter {
    fn on_request<'a>(
        &'a self,
        ctx: &'a RequestContext<'a>,
        request: Request<ProxyBody>,
    ) -> BoxFuture<'a, FilterDecision> {
        if !self.engine.needs_body(RequestHead::from(&request)) {
            // Not keyed: stream it through, no buffering, no store call.
            if self.engine.covers(request.method()) {
                self.metrics.inc(outcome::PASSED);
            }
            return Box::pin(std::future::ready(FilterDecision::Forward {
                request,
                on_response: None,
            }));
        }
        // The request is taken apart here, not in the future, so the future
        // holds its parts once (it stays small enough for the allocator's
        // per-thread cache).
        let (parts, body) = request.into_parts();
        Box::pin(self.decide(ctx.request_id.clone(), parts, body))
    }
}

fn respond(response: Response<Bytes>) -> FilterDecision {
    FilterDecision::Respond(response.map(ProxyBody::full))
}

impl IdempotencyFilter {
    /// Buffers a keyed request's body and asks the engine what to do.
    async fn decide(
        &self,
        request_id: HeaderValue,
        parts: http::request::Parts,
        body: ProxyBody,
    ) -> FilterDecision {
        // One byte past the limit is enough for the engine to refuse.
        let limit = self.engine.policy().get_max_body().saturating_add(1);
        let body = match read_up_to(body, limit).await {
            Ok(body) => body,
            Err(ReadError::TooLarge(limit)) => {
                self.metrics.inc(outcome::REJECTED);
                return FilterDecision::Respond(
                    Problem::new(
                        ProblemKind::BodyTooLarge,
                        format!("the request body is over the {limit}-byte limit"),
                    )
                    .into_response(Some(&request_id)),
                );
            }
            Err(ReadError::Broken(why)) => {
                self.metrics.inc(outcome::REJECTED);
                return FilterDecision::Respond(
                    Problem::new(
                        ProblemKind::BadRequest,
                        format!("could not read the request body: {why}"),
                    )
                    .into_response(Some(&request_id)),
                );
            }
        };
        match Box::pin(self.engine.begin(&parts, &body)).await {
            Begin::Execute(mut guard) => {
                self.metrics.inc(outcome::NEW);
                // From here a lost result locks the key instead of
                // releasing it: the request is about to leave.
                guard.mark_started();
                FilterDecision::Forward {
                    request: Request::from_parts(parts, ProxyBody::full(body)),
                    on_response: Some(Box::new(Finish {
                        guard,
                        request_id,
                        max_response: self.max_response,
                        release_ambiguous: self.server_errors == ServerErrorsPolicy::Release,
                    })),
                }
            }
            Begin::Replay(response) => {
                self.metrics.inc(outcome::REPLAYED);
                respond(response)
            }
            Begin::Reject(response) => {
                self.metrics.inc(match response.status() {
                    StatusCode::CONFLICT => outcome::IN_FLIGHT,
                    StatusCode::UNPROCESSABLE_ENTITY => outcome::MISMATCH,
                    StatusCode::SERVICE_UNAVAILABLE => outcome::STORE_ERROR,
                    _ => outcome::REJECTED,
                });
                respond(response)
            }
            Begin::PassThrough(reason) => {
                self.metrics.inc(if reason == PassReason::StoreUnavailable {
                    outcome::STORE_ERROR
                } else {
                    outcome::PASSED
                });
                FilterDecision::Forward {
                    request: Request::from_parts(parts, ProxyBody::full(body)),
                    on_response: None,
                }
            }
        }
    }
}

enum ReadError {
    TooLarge(u64),
    Broken(String),
}

/// Reads `body` whole, failing past `limit` bytes (or the route's limit).
async fn read_up_to(mut body: ProxyBody, limit: usize) -> Result<Bytes, ReadError> {
    let mut buf = Collected::default();
    while let Some(frame) =
        std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await
    {
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    buf.push(data);
                    if buf.len() >= limit {
                        return Ok(buf.freeze());
                    }
                }
            }
            Err(e) => {
                if let Some(too_large) = e.downcast_ref::<BodyTooLarge>() {
                    return Err(ReadError::TooLarge(too_large.limit));
                }
                return Err(ReadError::Broken(e.to_string()));
            }
        }
    }
    Ok(buf.freeze())
}

/// Body bytes gathered frame by frame: the usual single-frame body is kept
/// as is, without a copy; only a second frame starts a buffer.
#[derive(Default)]
struct Collected {
    first: Bytes,
    rest: Option<BytesMut>,
}

impl Collected {
    fn push(&mut self, data: Bytes) {
        match &mut self.rest {
            Some(buf) => buf.extend_from_slice(&data),
            None if self.first.is_empty() => self.first = data,
            None => {
                let mut buf = BytesMut::with_capacity(self.first.len() + data.len());
                buf.extend_from_slice(&self.first);
                buf.extend_from_slice(&data);
                self.rest = Some(buf);
            }
        }
    }

    fn len(&self) -> usize {
        self.rest.as_ref().map_or(self.first.len(), BytesMut::len)
    }

    fn freeze(self) -> Bytes {
        self.rest.map_or(self.first, BytesMut::freeze)
    }
}

/// Finishes the claim from the upstream's outcome.
struct Finish {
    guard: Guard,
    request_id: HeaderValue,
    max_response: usize,
    release_ambiguous: bool,
}

impl ResponseFilter for Finish {
    fn on_response(
        self: Box<Self>,
        outcome: Result<Response<ProxyBody>, UpstreamFailure>,
    ) -> BoxFuture<'static, Response<ProxyBody>> {
        let Finish {
            guard,
            request_id,
            max_response,
            release_ambiguous,
        } = *self;
        match outcome {
            Err(failure) => Box::pin(async move {
                let result = if !failure.sent || release_ambiguous {
                    guard.release().await
                } else {
                    guard.outcome_unknown().await
                };
                log_store_error(result.err(), &request_id);
                failure.problem.into_response(Some(&request_id))
            }),
            Ok(response) => {
                // Taken apart before the future is made, so the future
                // holds the parts once, not the response and its parts.
                let (parts, body) = response.into_parts();
                Box::pin(store_response(
                    guard,
                    request_id,
                    max_response,
                    release_ambiguous,
                    parts,
                    body,
                ))
            }
        }
    }
}

/// Buffers the upstream's response (up to the limit), stores it as the
/// key's result and sends it on; streams it unstored when too large.
async fn store_response(
    guard: Guard,
    request_id: HeaderValue,
    max_response: usize,
    release_ambiguous: bool,
    parts: http::response::Parts,
    mut body: ProxyBody,
) -> Response<ProxyBody> {
    if parts.status == StatusCode::SWITCHING_PROTOCOLS {
        // A tunnel is not a result to replay; let a retry run again.
        log_store_error(Box::pin(guard.release()).await.err(), &request_id);
        return Response::from_parts(parts, body);
    }
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(len) = declared
        && len > max_response as u64
    {
        // Too large to keep: record that it ran, then stream it.
        let result = Box::pin(guard.complete_unbuffered(parts.status, len)).await;
        log_store_error(result.err(), &request_id);
        return Response::from_parts(parts, body);
    }
    let mut buf = Collected::default();
    loop {
        let frame = std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await;
        match frame {
            None => break,
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    // Trailers are not replayed.
                    continue;
                };
                if buf.len() + data.len() > max_response {
                    // Over the limit while streaming: record "ran, at
                    // least this large", then send what we have and
                    // stream the rest.
                    let seen = (buf.len() + data.len()) as u64;
                    let result = Box::pin(guard.complete_unbuffered(parts.status, seen)).await;
                    log_store_error(result.err(), &request_id);
                    buf.push(data);
                    let body = ProxyBody::Prefixed {
                        prefix: Some(buf.freeze()),
                        rest: Box::new(body),
                    };
                    return Response::from_parts(parts, body);
                }
                buf.push(data);
            }
            Some(Err(error)) => {
                // The upstream ran the request and broke mid-body: the
                // result is lost.
                let result = if release_ambiguous {
                    Box::pin(guard.release()).await
                } else {
                    Box::pin(guard.outcome_unknown()).await
                };
                log_store_error(result.err(), &request_id);
                return Problem::new(
                    ProblemKind::UpstreamBadResponse,
                    format!("the upstream's response body broke off: {error}"),
                )
                .into_response(Some(&request_id));
            }
        }
    }
    let body = buf.freeze();
    // Every store call is boxed: its future is far larger than this one's
    // own state, and stays out of it (see `the_per_request_futures_stay_small`).
    let result = Box::pin(guard.complete_parts(parts.status, &parts.headers, &body)).await;
    log_store_error(result.err(), &request_id);
    Response::from_parts(parts, ProxyBody::full(body))
}

fn log_store_error(error: Option<keel_idempotency::store::StoreError>, request_id: &HeaderValue) {
    if let Some(error) = error {
        tracing::warn!(
            request_id = request_id.to_str().unwrap_or("-"),
            %error,
            "could not record the idempotent request's outcome"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(text: &str) -> RouteConfig {
        let config = crate::config::parse(
            std::path::Path::new("t.toml"),
            &format!(
                "[server]\nlisten = \"127.0.0.1:0\"\n[upstreams.a]\nendpoints = [\"http://127.0.0.1:1\"]\n[[routes]]\npath_prefix = \"/\"\nupstream = \"a\"\n[routes.idempotency]\nenabled = true\n{text}"
            ),
        )
        .expect("valid config");
        config.routes.into_iter().next().expect("route")
    }

    /// The futures boxed once per idempotent request (the response
    /// filter's, the engine's claim and completion) stay within glibc's
    /// per-thread cache sizes (1,032 bytes): above them each allocation
    /// takes the slow path and, with a store growing beside it, sweeps the
    /// fast bins (`malloc_consolidate`) every time.
    #[tokio::test]
    async fn the_per_request_futures_stay_small() {
        let engine = Engine::new(
            Arc::new(keel_idempotency::memory::MemoryStore::new()),
            Policy::default(),
        );
        let keyed = |key: &str| {
            Request::post("/orders")
                .header("idempotency-key", key)
                .body(())
                .expect("request")
                .into_parts()
                .0
        };
        let execute = |parts: http::request::Parts| {
            let engine = engine.clone();
            async move {
                match engine.begin(&parts, b"{}").await {
                    Begin::Execute(guard) => guard,
                    _ => panic!("a fresh key runs"),
                }
            }
        };
        let (response, ()) = Response::new(()).into_parts();
        let guard = execute(keyed("k1")).await;
        let complete = guard.complete_parts(response.status, &response.headers, b"ok");
        let complete_size = std::mem::size_of_val(&complete);
        drop(complete);
        let filter = store_response(
            execute(keyed("k2")).await,
            HeaderValue::from_static("id"),
            1024,
            false,
            response,
            ProxyBody::full(Bytes::new()),
        );
        let parts = keyed("k3");
        let begin = engine.begin(&parts, b"{}");
        for (what, size) in [
            ("store_response", std::mem::size_of_val(&filter)),
            ("Guard::complete_parts", complete_size),
            ("Engine::begin", std::mem::size_of_val(&begin)),
        ] {
            assert!(
                size <= 1024,
                "{what}'s future is {size} bytes, past glibc's per-thread cache"
            );
        }
    }

    #[test]
    fn collected_keeps_one_frame_and_joins_several() {
        let mut one = Collected::default();
        one.push(Bytes::from_static(b"abc"));
        assert_eq!(one.len(), 3);
        assert_eq!(one.freeze(), "abc");
        let mut many = Collected::default();
        for part in ["ab", "", "cd", "e"] {
            many.push(Bytes::from(part));
        }
        assert_eq!(many.len(), 5);
        assert_eq!(many.freeze(), "abcde");
    }

    #[test]
    fn config_maps_to_the_engine_policy() {
        let r = route("ttl = \"1h\"\nmax_body = \"2KiB\"\n");
        let p = policy(
            r.idempotency.as_ref().expect("idem"),
            Duration::from_secs(10),
            "r",
        );
        assert_eq!(p.get_ttl(), Duration::from_secs(3600));
        assert_eq!(p.get_max_body(), 2048);
        // Lease follows the upstream timeout unless set.
        assert_eq!(p.get_lease(), Duration::from_secs(11));
        let r = route("lease = \"3s\"\nserver_errors = \"release\"\nfail_open = true\n");
        let idem = r.idempotency.as_ref().expect("idem");
        assert_eq!(idem.server_errors, ServerErrorsPolicy::Release);
        let p = policy(idem, Duration::from_secs(10), "r");
        assert_eq!(p.get_lease(), Duration::from_secs(3));
    }

    #[test]
    fn unknown_policy_values_are_config_errors() {
        let errors = crate::config::parse(
            std::path::Path::new("t.toml"),
            "[server]\nlisten = \"127.0.0.1:0\"\n[upstreams.a]\nendpoints = [\"http://127.0.0.1:1\"]\n[[routes]]\npath_prefix = \"/\"\nupstream = \"a\"\n[routes.idempotency]\nserver_errors = \"maybe\"\n",
        )
        .expect_err("invalid");
        assert!(
            errors[0]
                .to_string()
                .starts_with("t.toml:9:17: unknown variant `maybe`"),
            "{}",
            errors[0]
        );
    }
}
