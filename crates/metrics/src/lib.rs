//! Prometheus metrics. Handles for every (route, method class, status class)
//! are created at start-up, so the request path only increments atomics: no
//! map lookup and no lock per request. The latency histogram is our own
//! atomic one for the same reason (prometheus-client's takes a lock).
//!
//! Every metric name of the gateway is defined in this one file.
//!
//! ```
//! let metrics = keel_metrics::Metrics::new();
//! assert!(metrics.encode().contains("keel_"));
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::{Method, StatusCode};
use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

/// Method classes used as a label; anything else is `other`.
const METHOD_CLASSES: [&str; 8] = [
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other",
];
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
/// Request-side failure outcomes (`keel_client_failures_total`): a bad
/// request or body (400, 413, 431), a body too slow (408), a client that
/// closed its connection mid-body (logged as 499). None of them counts
/// against an upstream.
pub const CLIENT_OUTCOMES: [&str; 3] = ["client_error", "client_timeout", "client_closed"];
/// Causes of `keel_upstream_failures_total`: attempts that counted against
/// an upstream (connection refused or timed out, an invalid answer or a
/// reset, no answer in time, a configured failure status).
pub const UPSTREAM_FAILURE_CAUSES: [&str; 4] = ["connect", "bad_response", "timeout", "status"];
/// Upper bounds in seconds.
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

fn method_class(method: &Method) -> usize {
    match *method {
        Method::GET => 0,
        Method::HEAD => 1,
        Method::POST => 2,
        Method::PUT => 3,
        Method::PATCH => 4,
        Method::DELETE => 5,
        Method::OPTIONS => 6,
        _ => 7,
    }
}

fn status_class(status: StatusCode) -> usize {
    (usize::from(status.as_u16() / 100)).clamp(1, 5) - 1
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    method: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteOutcomeLabels {
    route: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamCauseLabels {
    upstream: String,
    cause: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    upstream: String,
    endpoint: String,
}

/// A lock-free histogram: one atomic per bucket.
#[derive(Clone, Debug, Default)]
pub struct AtomicHistogram {
    inner: Arc<HistogramInner>,
}

#[derive(Debug, Default)]
struct HistogramInner {
    buckets: [AtomicU64; BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl AtomicHistogram {
    /// Records one observation.
    pub fn observe(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        let index = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        self.inner.buckets[index].fetch_add(1, Ordering::Relaxed);
        self.inner
            .sum_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }
}

impl TypedMetric for AtomicHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let mut buckets = [(0.0, 0u64); BUCKETS.len() + 1];
        let mut count = 0;
        for (i, slot) in buckets.iter_mut().enumerate() {
            let n = self.inner.buckets[i].load(Ordering::Relaxed);
            *slot = (BUCKETS.get(i).copied().unwrap_or(f64::MAX), n);
            count += n;
        }
        let sum = self.inner.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// Pre-made handles for one route.
#[derive(Debug)]
pub struct RouteMetrics {
    requests: Vec<Counter>,
    latency: AtomicHistogram,
    /// In [`CLIENT_OUTCOMES`] order.
    client_failures: Vec<Counter>,
}

impl RouteMetrics {
    /// Counts one finished request.
    pub fn record(&self, method: &Method, status: StatusCode, elapsed: Duration) {
        let index = method_class(method) * STATUS_CLASSES.len() + status_class(status);
        if let Some(counter) = self.requests.get(index) {
            counter.inc();
        }
        self.latency.observe(elapsed);
    }

    /// Counts one request-side failure by its label in [`CLIENT_OUTCOMES`]
    /// (other labels are ignored).
    pub fn client_failure(&self, outcome: &str) {
        if let Some(counter) = CLIENT_OUTCOMES
            .iter()
            .position(|o| *o == outcome)
            .and_then(|i| self.client_failures.get(i))
        {
            counter.inc();
        }
    }
}

/// Gauges and counters for one upstream endpoint.
#[derive(Debug, Clone, Default)]
pub struct EndpointMetrics {
    /// Open upstream connections (idle or busy).
    pub open_connections: Gauge,
    /// Connections opened since start.
    pub connects: Counter,
    /// Requests sent and not yet answered.
    pub in_flight: Gauge,
}

/// The registry and families.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabel, AtomicHistogram>,
    open_connections: Family<EndpointLabels, Gauge>,
    connects: Family<EndpointLabels, Counter>,
    in_flight: Family<EndpointLabels, Gauge>,
    idempotency: Family<OutcomeLabels, Counter>,
    restarts: Family<ChildLabel, Counter>,
    drain: Family<DrainLabels, Gauge>,
    client_failures: Family<RouteOutcomeLabels, Counter>,
    /// `keel_tunnel_closes_mid_message_total`, counted by the tunnels.
    pub tunnel_closes_mid_message: Counter,
    resilience: ResilienceFamilies,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    route: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChildLabel {
    child: String,
}

/// Idempotency outcome labels, in [`IdempotencyMetrics`] order.
pub const IDEMPOTENCY_OUTCOMES: [&str; 10] = [
    "new",
    "replayed",
    "in_flight_conflict",
    "mismatch",
    "store_error",
    "rejected",
    "passed_through",
    // A retry answered 409 because its key is locked as "outcome unknown"
    // (recorded as lost, or left by a holder whose lease lapsed).
    "outcome_unknown",
    // A new key refused because the store is full (or the tenant over its
    // share).
    "store_full",
    // A key this gateway locked as "outcome unknown" (the request was sent
    // and its result lost).
    "locked_unknown",
];

/// Pre-made idempotency outcome counters for one route.
#[derive(Debug, Clone)]
pub struct IdempotencyMetrics {
    counters: Vec<Counter>,
}

impl IdempotencyMetrics {
    /// Counts one outcome by its index in [`IDEMPOTENCY_OUTCOMES`].
    pub fn inc(&self, outcome: usize) {
        if let Some(counter) = self.counters.get(outcome) {
            counter.inc();
        }
    }

    /// One outcome's counter (a shared handle), for code that counts
    /// after the route's filter has returned.
    pub fn counter(&self, outcome: usize) -> Counter {
        self.counters.get(outcome).cloned().unwrap_or_default()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DrainLabels {
    /// `shutdown` or the drained endpoint's URL.
    target: String,
    /// `total`, `signalled`, `closed`, `remaining`, `forced`.
    state: String,
}

/// Gauges for one drain's progress (`keel_drain_connections`).
#[derive(Debug, Clone, Default)]
pub struct DrainGauges {
    total: Gauge,
    signalled: Gauge,
    closed: Gauge,
    remaining: Gauge,
    forced: Gauge,
}

impl DrainGauges {
    /// Copies a progress report into the gauges.
    pub fn set(&self, progress: &keel_drain::Progress) {
        let g = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        self.total.set(g(progress.total));
        self.signalled.set(g(progress.signalled));
        self.closed.set(g(progress.closed));
        self.remaining.set(g(progress.remaining));
        self.forced.set(g(progress.forced));
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// An empty registry with the gateway's families.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("keel");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<RouteLabel, AtomicHistogram>::default();
        let open_connections = Family::<EndpointLabels, Gauge>::default();
        let connects = Family::<EndpointLabels, Counter>::default();
        let in_flight = Family::<EndpointLabels, Gauge>::default();
        registry.register(
            "requests",
            "Requests answered, by route, method class and status class",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request head to response head, by route",
            latency.clone(),
        );
        registry.register(
            "upstream_open_connections",
            "Open pooled connections to each upstream endpoint",
            open_connections.clone(),
        );
        registry.register(
            "upstream_connects",
            "Connections opened to each upstream endpoint",
            connects.clone(),
        );
        registry.register(
            "upstream_in_flight_requests",
            "Requests sent to each upstream endpoint and not yet answered",
            in_flight.clone(),
        );
        let idempotency = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "idempotency_outcomes",
            "Keyed requests on idempotent routes, by route and outcome",
            idempotency.clone(),
        );
        let restarts = Family::<ChildLabel, Counter>::default();
        registry.register(
            "supervisor_restarts",
            "Restarts of each child of the gateway's supervision tree",
            restarts.clone(),
        );
        let drain = Family::<DrainLabels, Gauge>::default();
        registry.register(
            "drain_connections",
            "Connections of a drain (target: shutdown or an endpoint) by state: total, signalled, closed, remaining, forced",
            drain.clone(),
        );
        let client_failures = Family::<RouteOutcomeLabels, Counter>::default();
        registry.register(
            "client_failures",
            "Requests that failed on the client's side (never counted against an upstream), by route and outcome: client_error (400/413/431), client_timeout (408, body too slow), client_closed (closed mid-body, logged as 499)",
            client_failures.clone(),
        );
        let tunnel_closes_mid_message = Counter::default();
        registry.register(
            "tunnel_closes_mid_message",
            "Drained WebSocket tunnels whose close frame went inside a fragmented message, at a frame boundary, because the message outlasted the close grace or close_message_limit",
            tunnel_closes_mid_message.clone(),
        );
        let resilience = ResilienceFamilies::register(&mut registry);
        Metrics {
            registry,
            requests,
            latency,
            open_connections,
            connects,
            in_flight,
            idempotency,
            restarts,
            drain,
            client_failures,
            tunnel_closes_mid_message,
            resilience,
        }
    }

    /// Creates the idempotency outcome counters for a route.
    pub fn idempotency(&self, route: &str) -> IdempotencyMetrics {
        let counters = IDEMPOTENCY_OUTCOMES
            .iter()
            .map(|outcome| {
                self.idempotency
                    .get_or_create(&OutcomeLabels {
                        route: route.to_owned(),
                        outcome: (*outcome).to_owned(),
                    })
                    .clone()
            })
            .collect();
        IdempotencyMetrics { counters }
    }

    /// Counts one restart of the supervision tree's child at `path`.
    pub fn supervisor_restart(&self, path: &str) {
        self.restarts
            .get_or_create(&ChildLabel {
                child: path.to_owned(),
            })
            .inc();
    }

    /// Breaker, retry, stale and health-check families.
    pub fn resilience(&self) -> &ResilienceFamilies {
        &self.resilience
    }

    /// Creates the handles for a route.
    pub fn route(&self, route: &str) -> RouteMetrics {
        let mut requests = Vec::with_capacity(METHOD_CLASSES.len() * STATUS_CLASSES.len());
        for method in METHOD_CLASSES {
            for status in STATUS_CLASSES {
                let labels = RequestLabels {
                    route: route.to_owned(),
                    method: method.to_owned(),
                    status: status.to_owned(),
                };
                requests.push(self.requests.get_or_create(&labels).clone());
            }
        }
        let latency = self
            .latency
            .get_or_create(&RouteLabel {
                route: route.to_owned(),
            })
            .clone();
        let client_failures = CLIENT_OUTCOMES
            .iter()
            .map(|outcome| {
                self.client_failures
                    .get_or_create(&RouteOutcomeLabels {
                        route: route.to_owned(),
                        outcome: (*outcome).to_owned(),
                    })
                    .clone()
            })
            .collect();
        RouteMetrics {
            requests,
            latency,
            client_failures,
        }
    }

    /// Creates the handles for an upstream endpoint.
    pub fn endpoint(&self, upstream: &str, endpoint: &str) -> EndpointMetrics {
        let labels = EndpointLabels {
            upstream: upstream.to_owned(),
            endpoint: endpoint.to_owned(),
        };
        EndpointMetrics {
            open_connections: self.open_connections.get_or_create(&labels).clone(),
            connects: self.connects.get_or_create(&labels).clone(),
            in_flight: self.in_flight.get_or_create(&labels).clone(),
        }
    }

    /// The progress gauges of the drain of `target`.
    pub fn drain(&self, target: &str) -> DrainGauges {
        let g = |state: &str| {
            self.drain
                .get_or_create(&DrainLabels {
                    target: target.to_owned(),
                    state: state.to_owned(),
                })
                .clone()
        };
        DrainGauges {
            total: g("total"),
            signalled: g("signalled"),
            closed: g("closed"),
            remaining: g("remaining"),
            forced: g("forced"),
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabel {
    upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransitionLabels {
    upstream: String,
    endpoint: String,
    to: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HealthLabels {
    upstream: String,
    endpoint: String,
    result: String,
}

/// The resilience families (breakers, retries, stale responses, health
/// checks). Request paths hold pre-made handles; only the background breaker
/// watchers create label sets on the fly (one per transition).
#[derive(Debug, Clone, Default)]
pub struct ResilienceFamilies {
    breaker_state: Family<EndpointLabels, Gauge>,
    transitions: Family<TransitionLabels, Counter>,
    rejections: Family<EndpointLabels, Counter>,
    stale: Family<RouteLabel, Counter>,
    retries: Family<UpstreamLabel, Counter>,
    budget_exhausted: Family<UpstreamLabel, Counter>,
    health: Family<HealthLabels, Counter>,
    healthy: Family<EndpointLabels, Gauge>,
    upstream_failures: Family<UpstreamCauseLabels, Counter>,
}

/// Handles for one upstream's failure counters, in
/// [`UPSTREAM_FAILURE_CAUSES`] order.
#[derive(Debug, Clone, Default)]
pub struct UpstreamFailureMetrics {
    counters: Vec<Counter>,
}

impl UpstreamFailureMetrics {
    /// Counts one failed attempt by its cause in [`UPSTREAM_FAILURE_CAUSES`].
    pub fn inc(&self, cause: &str) {
        if let Some(counter) = UPSTREAM_FAILURE_CAUSES
            .iter()
            .position(|c| *c == cause)
            .and_then(|i| self.counters.get(i))
        {
            counter.inc();
        }
    }
}

/// Handles for one breaker (`endpoint` is empty for the upstream-wide one).
#[derive(Debug, Clone)]
pub struct BreakerMetrics {
    /// 0 closed, 1 open, 2 half-open, 3 recovering, 4 forced open, 5 disabled.
    pub state: Gauge,
    /// Requests refused because this breaker was open.
    pub rejections: Counter,
    transitions: Family<TransitionLabels, Counter>,
    upstream: String,
    endpoint: String,
}

impl BreakerMetrics {
    /// Counts a transition into `to` (called by the breaker watcher).
    pub fn transition(&self, to: &str) {
        self.transitions
            .get_or_create(&TransitionLabels {
                upstream: self.upstream.clone(),
                endpoint: self.endpoint.clone(),
                to: to.to_owned(),
            })
            .inc();
    }
}

/// Handles for one upstream's retries.
#[derive(Debug, Clone, Default)]
pub struct RetryMetrics {
    /// Retries made.
    pub retries: Counter,
    /// Retries refused because the budget was spent.
    pub budget_exhausted: Counter,
}

/// Handles for one endpoint's health checks.
#[derive(Debug, Clone, Default)]
pub struct HealthMetrics {
    /// Checks passed.
    pub passed: Counter,
    /// Checks failed.
    pub failed: Counter,
    /// 1 while the endpoint takes traffic, 0 while ejected.
    pub healthy: Gauge,
}

impl ResilienceFamilies {
    fn register(registry: &mut Registry) -> Self {
        let f = ResilienceFamilies::default();
        registry.register(
            "breaker_state",
            "Breaker state: 0 closed, 1 open, 2 half-open, 3 recovering, 4 forced open, 5 disabled (endpoint=\"\" is the upstream-wide breaker)",
            f.breaker_state.clone(),
        );
        registry.register(
            "breaker_transitions",
            "Breaker state changes, by the state entered",
            f.transitions.clone(),
        );
        registry.register(
            "breaker_rejections",
            "Requests refused because a breaker was open",
            f.rejections.clone(),
        );
        registry.register(
            "stale_responses",
            "Responses served stale from the route's cache",
            f.stale.clone(),
        );
        registry.register(
            "upstream_retries",
            "Retried upstream attempts",
            f.retries.clone(),
        );
        registry.register(
            "retry_budget_exhausted",
            "Retries refused because the upstream's retry budget was spent",
            f.budget_exhausted.clone(),
        );
        registry.register(
            "health_checks",
            "Active health checks, by result",
            f.health.clone(),
        );
        registry.register(
            "endpoint_healthy",
            "1 while an endpoint passes its health checks",
            f.healthy.clone(),
        );
        registry.register(
            "upstream_failures",
            "Attempts that counted against an upstream, by cause: connect, bad_response (invalid answer or reset), timeout, status (a configured failure status); client-side failures are never counted here",
            f.upstream_failures.clone(),
        );
        f
    }

    /// Handles for one upstream's failure counters.
    pub fn upstream_failures(&self, upstream: &str) -> UpstreamFailureMetrics {
        let counters = UPSTREAM_FAILURE_CAUSES
            .iter()
            .map(|cause| {
                self.upstream_failures
                    .get_or_create(&UpstreamCauseLabels {
                        upstream: upstream.to_owned(),
                        cause: (*cause).to_owned(),
                    })
                    .clone()
            })
            .collect();
        UpstreamFailureMetrics { counters }
    }

    /// Handles for one breaker.
    pub fn breaker(&self, upstream: &str, endpoint: &str) -> BreakerMetrics {
        let labels = EndpointLabels {
            upstream: upstream.to_owned(),
            endpoint: endpoint.to_owned(),
        };
        BreakerMetrics {
            state: self.breaker_state.get_or_create(&labels).clone(),
            rejections: self.rejections.get_or_create(&labels).clone(),
            transitions: self.transitions.clone(),
            upstream: upstream.to_owned(),
            endpoint: endpoint.to_owned(),
        }
    }

    /// Handles for one upstream's retries.
    pub fn retry(&self, upstream: &str) -> RetryMetrics {
        let labels = UpstreamLabel {
            upstream: upstream.to_owned(),
        };
        RetryMetrics {
            retries: self.retries.get_or_create(&labels).clone(),
            budget_exhausted: self.budget_exhausted.get_or_create(&labels).clone(),
        }
    }

    /// Handles for one endpoint's health checks.
    pub fn health(&self, upstream: &str, endpoint: &str) -> HealthMetrics {
        let labels = |result: &str| HealthLabels {
            upstream: upstream.to_owned(),
            endpoint: endpoint.to_owned(),
            result: result.to_owned(),
        };
        let healthy = self
            .healthy
            .get_or_create(&EndpointLabels {
                upstream: upstream.to_owned(),
                endpoint: endpoint.to_owned(),
            })
            .clone();
        healthy.set(1);
        // One statement per handle: a family's read guard lives until the
        // end of its statement, and a second get_or_create on the same
        // family in that statement would wait for it forever.
        let passed = self.health.get_or_create(&labels("pass")).clone();
        let failed = self.health.get_or_create(&labels("fail")).clone();
        HealthMetrics {
            passed,
            failed,
            healthy,
        }
    }

    /// The stale-served counter of a route.
    pub fn stale(&self, route: &str) -> Counter {
        self.stale
            .get_or_create(&RouteLabel {
                route: route.to_owned(),
            })
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_route_method_and_status_class() {
        let metrics = Metrics::new();
        let route = metrics.route("api");
        route.record(&Method::POST, StatusCode::CREATED, Duration::from_millis(3));
        route.record(&Method::POST, StatusCode::OK, Duration::from_millis(30));
        route.record(
            &Method::from_bytes(b"BREW").expect("m"),
            StatusCode::BAD_GATEWAY,
            Duration::ZERO,
        );
        let text = metrics.encode();
        assert!(
            text.contains(r#"keel_requests_total{route="api",method="POST",status="2xx"} 2"#),
            "{text}"
        );
        assert!(text.contains(r#"keel_requests_total{route="api",method="other",status="5xx"} 1"#));
        assert!(
            text.contains(r#"keel_request_duration_seconds_count{route="api"} 3"#),
            "{text}"
        );
        assert!(
            text.contains(r#"keel_request_duration_seconds_bucket{le="0.005",route="api"} 2"#)
                || text
                    .contains(r#"keel_request_duration_seconds_bucket{route="api",le="0.005"} 2"#),
            "{text}"
        );
    }
}
