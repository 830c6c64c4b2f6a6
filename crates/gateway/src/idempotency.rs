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

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::BodyExt;
use keel_idempotency::engine::{
    Begin, Engine, Guard, LapsedLease, MissingTenant, PassReason, Policy, RequestHead,
    ServerErrors, StoreDown, Tenant,
};

use crate::store::SharedStore;
use keel_config::{
    IdempotencySpec, LapsedLeasePolicy, MissingTenantPolicy, RouteSpec, ServerErrorsPolicy,
};
use keel_http::body::{BodyTooLarge, ProxyBody};
use keel_http::problem::{Problem, ProblemKind};
use keel_idempotency::problem::ProblemKind as ProblemKindLib;
use keel_metrics::{IdempotencyMetrics, Metrics};
use keel_proxy::filter::{
    BoxFuture, Exchange, FilterDecision, RequestContext, RequestFilter, ResponseFilter,
    UpstreamOutcome,
};
use prometheus_client::metrics::counter::Counter;

/// Outcome indexes into [`keel_metrics::IDEMPOTENCY_OUTCOMES`].
mod outcome {
    pub const NEW: usize = 0;
    pub const REPLAYED: usize = 1;
    pub const IN_FLIGHT: usize = 2;
    pub const MISMATCH: usize = 3;
    pub const STORE_ERROR: usize = 4;
    pub const REJECTED: usize = 5;
    pub const PASSED: usize = 6;
    pub const OUTCOME_UNKNOWN: usize = 7;
    pub const STORE_FULL: usize = 8;
    pub const LOCKED_UNKNOWN: usize = 9;
}

/// The engine policy for one route's idempotency spec; `request_timeout`
/// is the route upstream's, used for the default lease.
pub fn policy(config: &IdempotencySpec, request_timeout: Duration, route: &str) -> Policy {
    let mut policy = Policy::default()
        .with_methods(config.methods.clone())
        .with_required(config.required)
        .with_ttl(config.ttl)
        .with_tenant(Tenant::Header(config.tenant_header.clone()))
        // The gateway's documented default: requests without
        // `tenant_header` share one anonymous tenant, unless the route
        // says `missing_tenant = "reject"` (the library's own default).
        .with_missing_tenant(match config.missing_tenant {
            MissingTenantPolicy::Anonymous => MissingTenant::Anonymous,
            MissingTenantPolicy::Reject => MissingTenant::Reject,
        })
        .with_max_body(config.max_body)
        .with_max_response(config.max_response)
        .with_store_down(if config.fail_open {
            StoreDown::FailOpen
        } else {
            StoreDown::FailClosed
        })
        .with_server_errors(match config.server_errors {
            ServerErrorsPolicy::Store => ServerErrors::Store,
            ServerErrorsPolicy::Release => ServerErrors::Release,
        })
        .with_lapsed_lease(match config.lapsed_lease {
            LapsedLeasePolicy::Lock => LapsedLease::Lock,
            LapsedLeasePolicy::Rerun => LapsedLease::Rerun,
        })
        .with_store_retry_after(Duration::from_secs(1))
        // Routes are scoped apart by path already; the route name keeps
        // two routes over the same paths (different hosts) apart too.
        .with_namespace(format!("keel:{route}"));
    policy = match config.lease {
        Some(lease) => policy.with_lease(lease),
        None => policy.with_lease_for_timeout(request_timeout),
    };
    policy
}

/// Makes the filter for each route with idempotency enabled, all sharing
/// one store and gate.
pub struct Filters {
    store: SharedStore,
    metrics: Arc<Metrics>,
    budget: Arc<BufferBudget>,
}

impl Filters {
    /// Filters over `store`; keyed request bodies buffered at once, across
    /// every route and connection, hold at most `buffer_budget` bytes.
    pub fn new(store: SharedStore, metrics: Arc<Metrics>, buffer_budget: u64) -> Self {
        Self {
            store,
            metrics,
            budget: Arc::new(BufferBudget::new(buffer_budget)),
        }
    }

    /// The operator's view of every idempotent route's keys, for the
    /// admin API; `timeout_of` gives a route's upstream request timeout.
    pub fn key_admin(
        &self,
        routes: &[RouteSpec],
        timeout_of: impl Fn(&RouteSpec) -> Duration,
    ) -> KeyAdmin {
        let routes = routes
            .iter()
            .filter_map(|route| {
                let config = route.idempotency.as_ref()?;
                let engine = Engine::with_gate(
                    self.store.store.clone(),
                    self.store.gate.clone(),
                    policy(config, timeout_of(route), &route.name),
                );
                Some(AdminRoute {
                    name: route.name.clone(),
                    path_prefix: route.path_prefix.clone(),
                    engine,
                })
            })
            .collect();
        KeyAdmin { routes }
    }

    /// The filter for `route`, or `None` for a plain route.
    pub fn for_route(
        &self,
        route: &RouteSpec,
        request_timeout: Duration,
    ) -> Option<Arc<dyn RequestFilter>> {
        let config = route.idempotency.as_ref()?;
        let engine = Engine::with_gate(
            self.store.store.clone(),
            self.store.gate.clone(),
            policy(config, request_timeout, &route.name),
        );
        Some(Arc::new(IdempotencyFilter {
            engine,
            metrics: self.metrics.idempotency(&route.name),
            server_errors: config.server_errors,
            max_response: config.max_response,
            body_timeout: request_timeout,
            budget: self.budget.clone(),
        }))
    }
}

/// `GET` and `DELETE /idempotency/keys?route=R&key=K[&path=P][&method=M][&tenant=T]`:
/// what the store holds for one client key, and its release by an
/// operator who has reconciled a key locked as "outcome unknown".
/// `path` defaults to the route's `path_prefix`, `method` to POST, and
/// `tenant` (the raw value of the route's tenant header) to none.
pub struct KeyAdmin {
    routes: Vec<AdminRoute>,
}

struct AdminRoute {
    name: String,
    path_prefix: String,
    engine: Engine,
}

impl keel_admin::IdempotencyKeys for KeyAdmin {
    fn lookup<'a>(
        &'a self,
        query: &'a keel_admin::KeyQuery,
        remove: bool,
    ) -> keel_admin::BoxFuture<'a, Result<keel_admin::KeyAnswer, keel_admin::KeyError>> {
        Box::pin(self.lookup_key(query, remove))
    }
}

impl KeyAdmin {
    /// What the store holds for the key of `query`; with `remove`, also
    /// removes its record.
    async fn lookup_key(
        &self,
        query: &keel_admin::KeyQuery,
        remove: bool,
    ) -> Result<keel_admin::KeyAnswer, keel_admin::KeyError> {
        use keel_admin::KeyError;
        let Some(route) = self.routes.iter().find(|r| r.name == query.route) else {
            let names: Vec<&str> = self.routes.iter().map(|r| r.name.as_str()).collect();
            return Err(KeyError::BadRequest(format!(
                "no idempotent route named {:?}; idempotent routes: {names:?}",
                query.route
            )));
        };
        let path = query
            .path
            .clone()
            .unwrap_or_else(|| route.path_prefix.clone());
        let request_method = match query
            .method
            .as_deref()
            .map(|m| Method::from_bytes(m.as_bytes()))
        {
            None => Method::POST,
            Some(Ok(m)) => m,
            Some(Err(_)) => {
                return Err(KeyError::BadRequest("method= is not an HTTP method".into()));
            }
        };
        let lookup = keel_idempotency::engine::KeyLookup {
            tenant: query.tenant.as_deref().map(str::as_bytes),
            method: &request_method,
            path: &path,
            key: &query.key,
        };
        let before = route
            .engine
            .key_status(&lookup)
            .await
            .map_err(|e| KeyError::Unavailable(e.to_string()))?;
        let mut answer = keel_admin::KeyAnswer {
            route: route.name.clone(),
            method: request_method.as_str().to_owned(),
            path: path.clone(),
            key: query.key.clone(),
            state: before.state.to_owned(),
            status: before.status,
            request_id: before.request_id,
            expires_in_ms: before.expires_in.map(|d| d.as_millis() as u64),
            token: before.token,
            removed: None,
        };
        if remove {
            let removed = route
                .engine
                .remove_key(&lookup)
                .await
                .map_err(|e| KeyError::Unavailable(e.to_string()))?;
            answer.removed = Some(removed);
            tracing::warn!(
                route = %route.name,
                state = before.state,
                removed,
                "idempotency key released by an operator"
            );
        }
        Ok(answer)
    }
}

/// Bytes of keyed request bodies buffered right now, across the process,
/// against a fixed budget: a flood of large keyed uploads is refused with
/// 503 instead of growing memory without bound. One counter, updated
/// once per body chunk, not a lock or a queue.
pub struct BufferBudget {
    used: AtomicU64,
    limit: u64,
}

impl BufferBudget {
    fn new(limit: u64) -> Self {
        Self {
            used: AtomicU64::new(0),
            limit,
        }
    }

    /// Takes `n` more bytes for `held`, or says there is no room.
    fn take(&self, held: &mut u64, n: u64) -> bool {
        let ok = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|&total| total <= self.limit)
            })
            .is_ok();
        if ok {
            *held += n;
        }
        ok
    }

    fn give_back(&self, n: u64) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

/// Bytes one request holds of the [`BufferBudget`]; returned on drop.
struct BudgetHold<'a> {
    budget: &'a BufferBudget,
    held: u64,
}

impl Drop for BudgetHold<'_> {
    fn drop(&mut self) {
        self.budget.give_back(self.held);
    }
}

/// The request filter of one idempotent route.
pub struct IdempotencyFilter {
    engine: Engine,
    metrics: IdempotencyMetrics,
    server_errors: ServerErrorsPolicy,
    max_response: usize,
    /// A keyed body must arrive within this (the upstream's
    /// request_timeout, as a plain route's streamed body would be cut).
    body_timeout: Duration,
    budget: Arc<BufferBudget>,
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

/// A replay, sent as it was stored.
fn respond(response: Response<Bytes>) -> FilterDecision {
    FilterDecision::Respond(response.map(ProxyBody::full))
}

/// A refusal made by the engine (400, 409, 413, 422, 503): its problem
/// body gets this request's id as `request_id`, as every problem the
/// gateway writes does.
fn refuse(response: Response<Bytes>, request_id: &HeaderValue) -> FilterDecision {
    let response = match request_id.to_str() {
        Ok(id) => keel_idempotency::problem::with_request_id(response, id),
        Err(_) => response,
    };
    respond(response)
}

impl IdempotencyFilter {
    /// Buffers a keyed request's body and asks the engine what to do.
    async fn decide(
        &self,
        request_id: HeaderValue,
        parts: http::request::Parts,
        mut body: ProxyBody,
    ) -> FilterDecision {
        // One byte past the limit is enough for the engine to refuse.
        let limit = self.engine.policy().max_body().saturating_add(1);
        let mut hold = BudgetHold {
            budget: &self.budget,
            held: 0,
        };
        // The body is read in place: moved into the reading future, it
        // would take room twice in this one, which is boxed per request.
        let read = within(self.body_timeout, read_up_to(&mut body, limit, &mut hold));
        let body = match read.await {
            None => {
                self.metrics.inc(outcome::REJECTED);
                return FilterDecision::Respond(
                    Problem::new(
                        ProblemKind::RequestTimeout,
                        format!(
                            "the request body did not arrive within {} s",
                            self.body_timeout.as_secs_f64()
                        ),
                    )
                    .into_response(Some(&request_id)),
                );
            }
            Some(Err(ReadError::NoBudget)) => {
                self.metrics.inc(outcome::REJECTED);
                return FilterDecision::Respond(
                    Problem::new(
                        ProblemKind::Unavailable,
                        "the gateway is buffering as many keyed request bodies as it may; retry shortly",
                    )
                    .retry_after(Duration::from_secs(1))
                    .into_response(Some(&request_id)),
                );
            }
            Some(Ok(body)) => body,
            Some(Err(ReadError::TooLarge(limit))) => {
                self.metrics.inc(outcome::REJECTED);
                return FilterDecision::Respond(
                    Problem::new(
                        ProblemKind::BodyTooLarge,
                        format!("the request body is over the {limit}-byte limit"),
                    )
                    .into_response(Some(&request_id)),
                );
            }
            Some(Err(ReadError::Broken(why))) => {
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
        let decision = Box::pin(self.engine.begin(&parts, &body)).await;
        // The body is forwarded as `Bytes` that the request owns from here;
        // the budget counts bytes waiting on the client, not on upstreams.
        drop(hold);
        match decision {
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
                        locked: self.metrics.counter(outcome::LOCKED_UNKNOWN),
                    })),
                }
            }
            Begin::Replay(response) => {
                self.metrics.inc(outcome::REPLAYED);
                respond(response)
            }
            Begin::Reject(response) => {
                self.metrics.inc(reject_outcome(&response));
                refuse(response, &request_id)
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

/// `work`'s output, or `None` if it takes longer than `limit`. Like
/// `tokio::time::timeout`, but the timer is made only if the work has to
/// wait: a keyed body that has already arrived (the usual case) costs none.
/// The timer is boxed when made: held inline, it would more than double
/// this future, and with it the per-request future `decide` boxes.
async fn within<F: std::future::Future>(limit: Duration, work: F) -> Option<F::Output> {
    let mut work = std::pin::pin!(work);
    let mut timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
    std::future::poll_fn(|cx| {
        if let std::task::Poll::Ready(out) = work.as_mut().poll(cx) {
            return std::task::Poll::Ready(Some(out));
        }
        let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            std::task::Poll::Ready(()) => std::task::Poll::Ready(None),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    })
    .await
}

/// The metrics outcome of a refusal, by its problem type.
fn reject_outcome(response: &Response<Bytes>) -> usize {
    match response.extensions().get::<ProblemKindLib>() {
        Some(ProblemKindLib::OutcomeUnknown) => outcome::OUTCOME_UNKNOWN,
        Some(ProblemKindLib::InFlight) => outcome::IN_FLIGHT,
        Some(ProblemKindLib::FingerprintMismatch) => outcome::MISMATCH,
        Some(ProblemKindLib::StoreFull) => outcome::STORE_FULL,
        Some(ProblemKindLib::StoreUnavailable) => outcome::STORE_ERROR,
        _ => outcome::REJECTED,
    }
}

enum ReadError {
    TooLarge(u64),
    Broken(String),
    NoBudget,
}

/// Reads `body` whole, failing past `limit` bytes (or the route's limit),
/// taking each chunk's bytes from the process's buffer budget.
async fn read_up_to(
    body: &mut ProxyBody,
    limit: usize,
    hold: &mut BudgetHold<'_>,
) -> Result<Bytes, ReadError> {
    let mut buf = Collected::default();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    if !hold.budget.take(&mut hold.held, data.len() as u64) {
                        return Err(ReadError::NoBudget);
                    }
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
enum Collected {
    #[default]
    Nothing,
    One(Bytes),
    Joined(BytesMut),
}

impl Collected {
    fn push(&mut self, data: Bytes) {
        match self {
            Collected::Joined(buf) => buf.extend_from_slice(&data),
            Collected::Nothing => *self = Collected::One(data),
            Collected::One(first) if first.is_empty() => *self = Collected::One(data),
            Collected::One(first) => {
                let mut buf = BytesMut::with_capacity(first.len() + data.len());
                buf.extend_from_slice(first);
                buf.extend_from_slice(&data);
                *self = Collected::Joined(buf);
            }
        }
    }

    fn len(&self) -> usize {
        match self {
            Collected::Nothing => 0,
            Collected::One(one) => one.len(),
            Collected::Joined(buf) => buf.len(),
        }
    }

    fn freeze(self) -> Bytes {
        match self {
            Collected::Nothing => Bytes::new(),
            Collected::One(one) => one,
            Collected::Joined(buf) => buf.freeze(),
        }
    }
}

/// Finishes the claim from the upstream's outcome.
struct Finish {
    guard: Guard,
    request_id: HeaderValue,
    max_response: usize,
    release_ambiguous: bool,
    /// Counts keys this gateway locks as "outcome unknown".
    locked: Counter,
}

impl ResponseFilter for Finish {
    fn must_hold(&self, ends_by: tokio::time::Instant) -> bool {
        // The default lease is the request timeout and a margin, so it
        // covers the upstream phase unless a shorter `lease` is set.
        !self.guard.lease_covers(ends_by)
    }

    fn hold<'a>(&'a self, exchange: Exchange<'a>) -> BoxFuture<'a, UpstreamOutcome> {
        // The claim's lease is renewed while the upstream works on the
        // request, so a slow upstream never lets a duplicate in.
        Box::pin(self.guard.hold(exchange))
    }

    fn on_response(
        self: Box<Self>,
        outcome: Result<Response<ProxyBody>, keel_upstream::UpstreamError>,
    ) -> BoxFuture<'static, Response<ProxyBody>> {
        let Finish {
            guard,
            request_id,
            max_response,
            release_ambiguous,
            locked,
        } = *self;
        let end = Ending {
            request_id,
            release_ambiguous,
            locked,
        };
        match outcome {
            Err(failure) => Box::pin(async move {
                if failure.sent {
                    end.lost(guard).await;
                } else {
                    // Never reached the upstream: a retry may run it.
                    log_store_error(guard.release().await.err(), &end.request_id);
                }
                failure.into_problem().into_response(Some(&end.request_id))
            }),
            Ok(response) => {
                // Taken apart before the future is made, so the future
                // holds the parts once, not the response and its parts.
                let (parts, body) = response.into_parts();
                Box::pin(store_response(guard, end, max_response, parts, body))
            }
        }
    }
}

/// How a claim ends when its result is lost.
struct Ending {
    request_id: HeaderValue,
    release_ambiguous: bool,
    locked: Counter,
}

impl Ending {
    /// The request reached the upstream and its result is lost: lock the
    /// key as "outcome unknown", or release it on a route that re-runs
    /// ambiguous requests (`server_errors = "release"`).
    async fn lost(&self, guard: Guard) {
        let result = if self.release_ambiguous {
            Box::pin(guard.release()).await
        } else {
            self.locked.inc();
            Box::pin(guard.outcome_unknown()).await
        };
        log_store_error(result.err(), &self.request_id);
    }
}

/// What reading an upstream's response body for the record came to.
enum Read {
    /// The whole body, within the limit.
    Whole(Bytes),
    /// Past the limit after this much: what was read, to send before the
    /// rest.
    OverLimit { read: Bytes, seen: u64 },
    /// The body broke off.
    Broken(String),
}

/// Reads `body` for the record, up to `max_response` bytes, into `buf`
/// (kept across polls): `Pending` while the body is still coming.
fn poll_read_response(
    body: &mut ProxyBody,
    buf: &mut Collected,
    max_response: usize,
    cx: &mut Context<'_>,
) -> Poll<Read> {
    loop {
        match ready!(Pin::new(&mut *body).poll_frame(cx)) {
            None => return Poll::Ready(Read::Whole(std::mem::take(buf).freeze())),
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    // Trailers are not replayed.
                    continue;
                };
                let seen = (buf.len() + data.len()) as u64;
                buf.push(data);
                if seen > max_response as u64 {
                    let read = std::mem::take(buf).freeze();
                    return Poll::Ready(Read::OverLimit { read, seen });
                }
            }
            Some(Err(error)) => return Poll::Ready(Read::Broken(error.to_string())),
        }
    }
}

/// Buffers the upstream's response (up to the limit), stores it as the
/// key's result and sends it on; streams it unstored when too large.
async fn store_response(
    guard: Guard,
    end: Ending,
    max_response: usize,
    parts: http::response::Parts,
    mut body: ProxyBody,
) -> Response<ProxyBody> {
    let request_id = &end.request_id;
    if parts.status == StatusCode::SWITCHING_PROTOCOLS {
        // Keyed upgrade requests are refused before they are sent, so this
        // is an upstream that switched protocols unasked: the request ran,
        // and a tunnel is no result to replay. (Boxed, as below: a rare
        // path's future stays out of this one's state.)
        Box::pin(end.lost(guard)).await;
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
        log_store_error(result.err(), request_id);
        return Response::from_parts(parts, body);
    }
    // Usually the whole body is there with the head; a body still
    // streaming may take longer than the lease, so it is read under `hold`
    // (renewing), which costs a timer only then.
    let mut buf = Collected::default();
    let first = std::future::poll_fn(|cx| {
        Poll::Ready(poll_read_response(&mut body, &mut buf, max_response, cx))
    })
    .await;
    let read = match first {
        Poll::Ready(read) => read,
        Poll::Pending => {
            let rest = std::future::poll_fn(|cx| {
                poll_read_response(&mut body, &mut buf, max_response, cx)
            });
            Box::pin(guard.hold(rest)).await
        }
    };
    match read {
        Read::Whole(body) => {
            // Every store call is boxed: its future is far larger than this
            // one's own state, and stays out of it (see
            // `the_per_request_futures_stay_small`).
            let result = Box::pin(guard.complete_parts(parts.status, &parts.headers, &body)).await;
            log_store_error(result.err(), request_id);
            Response::from_parts(parts, ProxyBody::full(body))
        }
        Read::OverLimit { read, seen } => {
            // Over the limit while streaming: record "ran, at least this
            // large", then send what we have and stream the rest.
            let result = Box::pin(guard.complete_unbuffered(parts.status, seen)).await;
            log_store_error(result.err(), request_id);
            let body = ProxyBody::Prefixed {
                prefix: Some(read),
                rest: Box::new(body),
            };
            Response::from_parts(parts, body)
        }
        Read::Broken(error) => {
            // The upstream ran the request and broke mid-body: the result
            // is lost.
            Box::pin(end.lost(guard)).await;
            Problem::new(
                ProblemKind::UpstreamBadResponse,
                format!("the upstream's response body broke off: {error}"),
            )
            .into_response(Some(request_id))
        }
    }
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

    fn route(text: &str) -> RouteSpec {
        let spec = keel_config::parse(
            std::path::Path::new("t.toml"),
            &format!(
                "[server]\nlisten = \"127.0.0.1:0\"\n[upstreams.a]\nendpoints = [\"http://127.0.0.1:1\"]\n[[routes]]\npath_prefix = \"/\"\nupstream = \"a\"\n[routes.idempotency]\nenabled = true\n{text}"
            ),
        )
        .expect("valid config");
        spec.routes.into_iter().next().expect("route")
    }

    /// The futures boxed once per idempotent request (the request and
    /// response filters', the engine's claim and completion) stay within glibc's
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
                .header("authorization", "Bearer alice")
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
            Ending {
                request_id: HeaderValue::from_static("id"),
                release_ambiguous: false,
                locked: Counter::default(),
            },
            1024,
            response,
            ProxyBody::full(Bytes::new()),
        );
        let parts = keyed("k3");
        let begin = engine.begin(&parts, b"{}");
        let idempotency = IdempotencyFilter {
            engine: engine.clone(),
            metrics: keel_metrics::Metrics::new().idempotency("r"),
            server_errors: ServerErrorsPolicy::Store,
            max_response: 1024,
            body_timeout: Duration::from_secs(1),
            budget: Arc::new(BufferBudget::new(1 << 20)),
        };
        let decide = idempotency.decide(
            HeaderValue::from_static("id"),
            keyed("k4"),
            ProxyBody::full(Bytes::new()),
        );
        for (what, size) in [
            ("store_response", std::mem::size_of_val(&filter)),
            ("Guard::complete_parts", complete_size),
            ("Engine::begin", std::mem::size_of_val(&begin)),
            ("IdempotencyFilter::decide", std::mem::size_of_val(&decide)),
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
        assert_eq!(p.ttl(), Duration::from_secs(3600));
        assert_eq!(p.max_body(), 2048);
        // Lease follows the upstream timeout unless set.
        assert_eq!(p.lease(), Duration::from_secs(11));
        let r = route("lease = \"3s\"\nserver_errors = \"release\"\nfail_open = true\n");
        let idem = r.idempotency.as_ref().expect("idem");
        assert_eq!(idem.server_errors, ServerErrorsPolicy::Release);
        let p = policy(idem, Duration::from_secs(10), "r");
        assert_eq!(p.lease(), Duration::from_secs(3));
    }

    #[tokio::test]
    async fn a_route_chooses_what_a_request_without_its_tenant_header_gets() {
        let anonymous = http::Request::post("/orders")
            .header("idempotency-key", "k")
            .body(())
            .expect("request");
        let engine_for = |text: &str| {
            let r = route(text);
            Engine::new(
                Arc::new(keel_idempotency::memory::MemoryStore::new()),
                policy(
                    r.idempotency.as_ref().expect("idem"),
                    Duration::from_secs(10),
                    "r",
                ),
            )
        };
        // Default: one shared anonymous tenant, as documented.
        let Begin::Execute(guard) = engine_for("").begin(&anonymous, b"{}").await else {
            panic!("an anonymous request runs by default");
        };
        guard.release().await.expect("release");
        // `reject`: 400, nothing claimed.
        let Begin::Reject(problem) = engine_for("missing_tenant = \"reject\"\n")
            .begin(&anonymous, b"{}")
            .await
        else {
            panic!("refused when the route says reject");
        };
        assert_eq!(problem.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            problem.extensions().get::<ProblemKindLib>(),
            Some(&ProblemKindLib::TenantMissing)
        );
    }

    #[test]
    fn unknown_policy_values_are_config_errors() {
        let errors = keel_config::parse(
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
