//! The JSON documents of the admin API.
//!
//! Each type is what one endpoint answers (or a part of it). Field names
//! are the wire names; a field that is sometimes absent on the wire is an
//! `Option` skipped when `None`, a field that is sometimes `null` is an
//! `Option` written as `null`. Clients should ignore fields they do not
//! know: new ones may be added.

use serde::{Deserialize, Serialize};

/// `GET /status`: everything an operator looks at first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// The gateway's version (`CARGO_PKG_VERSION` of the binary).
    pub version: String,
    /// Seconds since the process started.
    pub uptime_seconds: u64,
    /// The data-plane address.
    pub listen: String,
    /// Whether every readiness condition holds (what `/readyz` says).
    pub ready: bool,
    /// The readiness conditions.
    pub readiness: Vec<Condition>,
    /// Open downstream connections.
    pub connections: u64,
    /// Whether the shutdown drain has begun.
    pub draining: bool,
    /// The upstreams, in config order.
    pub upstreams: Vec<UpstreamStatus>,
    /// The routes, in match order.
    pub routes: Vec<RouteStatus>,
    /// The supervision tree; `null` only in the moment before it started.
    pub supervision: Option<SupervisionNode>,
    /// The drains (what `GET /drain` answers).
    pub drain: DrainReport,
}

/// One readiness condition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Condition {
    /// Its name (`listeners`, `store`, ...).
    pub name: String,
    /// Whether it holds.
    pub ready: bool,
    /// Why not; absent when it holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `GET /readyz` (200 when `ready`, 503 otherwise).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadinessReport {
    /// Whether every condition holds.
    pub ready: bool,
    /// Every condition.
    pub conditions: Vec<Condition>,
}

impl ReadinessReport {
    /// The report of `conditions`: ready when all of them are.
    ///
    /// ```
    /// use keel_admin::{Condition, ReadinessReport};
    /// let report = ReadinessReport::of(vec![Condition {
    ///     name: "store".into(),
    ///     ready: false,
    ///     reason: Some("connecting".into()),
    /// }]);
    /// assert!(!report.ready);
    /// ```
    pub fn of(conditions: Vec<Condition>) -> Self {
        ReadinessReport {
            ready: conditions.iter().all(|c| c.ready),
            conditions,
        }
    }
}

/// One upstream in `/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpstreamStatus {
    /// Its name in the config.
    pub name: String,
    /// The balancing policy as the config spells it (`round_robin`).
    pub load_balancing: String,
    /// Its endpoints.
    pub endpoints: Vec<EndpointStatus>,
    /// The upstream-wide breaker; `null` when breakers are disabled.
    pub breaker: Option<BreakerSnapshot>,
}

/// One endpoint of an upstream in `/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EndpointStatus {
    /// The URL as configured.
    pub url: String,
    /// Requests sent and not yet answered.
    pub in_flight: u64,
    /// Open connections to it.
    pub open_connections: i64,
    /// Connections opened since start.
    pub connects: u64,
    /// Its breaker and health.
    pub resilience: EndpointResilience,
}

/// An endpoint's breaker and active health checks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EndpointResilience {
    /// Its breaker; `null` when breakers are disabled.
    pub breaker: Option<BreakerSnapshot>,
    /// Its health; `null` when it is not checked.
    pub health: Option<HealthStatus>,
}

/// An endpoint's active health checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthStatus {
    /// False while the checks have ejected it.
    pub healthy: bool,
    /// Checks passed since start.
    pub passed: u64,
    /// Checks failed since start.
    pub failed: u64,
}

/// A circuit breaker: `/status`, and the answer to a breaker override.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BreakerSnapshot {
    /// The breaker's name.
    pub name: String,
    /// Its automatic state.
    pub state: BreakerState,
    /// The operator's override.
    pub mode: BreakerMode,
    /// Milliseconds until calls may pass again, when known.
    pub retry_after_ms: Option<u64>,
    /// Consecutive trips (drives the growing open duration).
    pub consecutive_trips: u32,
    /// Whether its alarm is raised.
    pub alarm: bool,
    /// Outcomes in its rate window.
    pub window: BreakerWindow,
    /// Counters since it was created.
    pub counters: BreakerCounters,
}

/// A breaker's automatic state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Calls pass.
    Closed,
    /// Calls are refused.
    Open,
    /// A few probe calls pass.
    HalfOpen,
    /// A growing share of calls pass.
    Recovering,
}

impl BreakerState {
    /// The wire name (`half_open`).
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
            BreakerState::Recovering => "recovering",
        }
    }
}

/// An operator override of a breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerMode {
    /// No override.
    Normal,
    /// Everything passes; nothing trips.
    Disabled,
    /// Everything passes; what would have been refused is counted.
    MetricsOnly,
    /// Everything is refused (a melt).
    ForcedOpen,
}

impl BreakerMode {
    /// The wire name (`forced_open`).
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerMode::Normal => "normal",
            BreakerMode::Disabled => "disabled",
            BreakerMode::MetricsOnly => "metrics_only",
            BreakerMode::ForcedOpen => "forced_open",
        }
    }
}

/// Outcomes in a breaker's rate window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakerWindow {
    /// Recorded outcomes.
    pub calls: u64,
    /// Failures among them.
    pub failures: u64,
    /// Slow calls among them.
    pub slow: u64,
}

/// A breaker's counters since it was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakerCounters {
    /// Successful outcomes.
    pub successes: u64,
    /// Failed outcomes.
    pub failures: u64,
    /// Slow outcomes.
    pub slow: u64,
    /// Ignored outcomes.
    pub ignored: u64,
    /// Calls refused.
    pub rejected: u64,
    /// Calls `metrics_only` let through that would have been refused.
    pub shadow_rejected: u64,
    /// Calls refused by fault injection.
    pub fault_injected: u64,
    /// Times it opened.
    pub trips: u64,
}

/// One route in `/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteStatus {
    /// Its name (its `path_prefix` when the config gives none).
    pub name: String,
    /// Its path prefix.
    pub path_prefix: String,
    /// Its host, when host-specific.
    pub host: Option<String>,
    /// The upstream it sends to.
    pub upstream: Option<String>,
    /// Whether it is idempotent.
    pub idempotency: bool,
    /// Bytes held by its stale-fallback cache, when it has one.
    pub stale_cache_bytes: Option<u64>,
}

/// One node of the supervision tree (`/status`'s `supervision`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SupervisionNode {
    /// The child's own name.
    pub name: String,
    /// Names from the root down, joined with `/`.
    pub path: String,
    /// `worker` or `supervisor`.
    pub kind: String,
    /// The restart strategy, for supervisors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<String>,
    /// Where it is in its life (`running`, `restarting`, ...).
    pub state: String,
    /// Whether it said it is ready.
    pub ready: bool,
    /// Whether its readiness counts for the tree's.
    pub required: bool,
    /// Why it is not ready, when it said so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// How many times it was restarted.
    pub restarts: u64,
    /// Milliseconds since its current run started, while running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime_ms: Option<u64>,
    /// Why it last exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<String>,
    /// For a supervisor that gave up: the child that tipped it over.
    pub escalation: Option<Escalation>,
    /// Its children in start order (supervisors only; absent when none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<SupervisionNode>,
}

/// Why a supervisor gave up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Escalation {
    /// The path of the child whose exit exceeded the restart intensity.
    pub child: String,
    /// Restarts inside the window, the one refused included.
    pub restarts: u64,
}

/// Where the shutdown sequence is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DrainPhase {
    /// Not draining.
    Serving,
    /// Readiness fails; traffic is still served.
    ShutdownDelay,
    /// Not accepting; connections are being closed.
    Draining,
    /// Everything closed (or cut); the process is about to exit.
    Done,
}

impl DrainPhase {
    /// The wire name (`shutdown_delay`).
    pub fn as_str(self) -> &'static str {
        match self {
            DrainPhase::Serving => "serving",
            DrainPhase::ShutdownDelay => "shutdown_delay",
            DrainPhase::Draining => "draining",
            DrainPhase::Done => "done",
        }
    }
}

/// `GET /drain` (and `POST /drain`, with `started`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainReport {
    /// The shutdown sequence's phase.
    pub phase: DrainPhase,
    /// Connections (downstream and tunnels) still registered.
    pub connections: u64,
    /// The tunnel drain of the shutdown, once it began.
    pub tunnels: Option<DrainProgress>,
    /// The HTTP connection drain of the shutdown, once it began.
    pub http: Option<DrainProgress>,
    /// Every endpoint drain.
    pub endpoints: Vec<EndpointDrainReport>,
    /// `POST /drain` only: whether this request started the shutdown
    /// (false: it was already asked for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<bool>,
}

/// One endpoint drain in `GET /drain`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointDrainReport {
    /// The upstream.
    pub upstream: String,
    /// The endpoint URL, as asked for.
    pub endpoint: String,
    /// Whether the endpoint is still out of service.
    pub draining: bool,
    /// The drain's progress.
    pub progress: DrainProgress,
}

/// A drain's progress.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainProgress {
    /// Connections the drain set out to close.
    pub total: u64,
    /// Of those, asked to close so far.
    pub signalled: u64,
    /// Of those, gone.
    pub closed: u64,
    /// Of those, still connected.
    pub remaining: u64,
    /// Asked to close by force at the deadline.
    pub forced: u64,
    /// Milliseconds since the drain began.
    pub elapsed_ms: u64,
    /// Milliseconds from the start at which every connection will have
    /// been asked.
    pub expected_finish_ms: u64,
    /// The drain is over.
    pub done: bool,
}

/// `POST /upstreams/{name}/endpoints/drain?endpoint=URL` (202).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointDrainStarted {
    /// The upstream.
    pub upstream: String,
    /// The endpoint URL, as asked for.
    pub endpoint: String,
    /// The drain's progress when it started.
    pub progress: DrainProgress,
}

/// `POST /upstreams/{name}/endpoints/resume?endpoint=URL` (200).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointResumed {
    /// The upstream.
    pub upstream: String,
    /// The endpoint URL, as asked for.
    pub endpoint: String,
    /// Whether it was draining before.
    pub was_draining: bool,
}

/// The question of `GET`/`DELETE /idempotency/keys?route=R&key=K[&path=P][&method=M][&tenant=T]`,
/// decoded.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyQuery {
    /// The idempotent route's name.
    pub route: String,
    /// The client's `Idempotency-Key`.
    pub key: String,
    /// The request path (default: the route's `path_prefix`).
    pub path: Option<String>,
    /// The request method (default: POST).
    pub method: Option<String>,
    /// The raw value of the route's tenant header, when the request had one.
    pub tenant: Option<String>,
}

/// What the store holds for one idempotency key (`/idempotency/keys`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyAnswer {
    /// The route.
    pub route: String,
    /// The request method.
    pub method: String,
    /// The request path.
    pub path: String,
    /// The client's key.
    pub key: String,
    /// `free`, `in_flight`, `abandoned`, `completed`, `outcome_unknown` or
    /// `not_stored`.
    pub state: String,
    /// The recorded status code, for `completed` and `not_stored`.
    pub status: Option<u16>,
    /// The `x-request-id` of the request that ran, where recorded.
    pub request_id: Option<String>,
    /// Milliseconds until the lease, record or lock expires by itself.
    pub expires_in_ms: Option<u64>,
    /// The fencing token of the claim, for `in_flight` and `abandoned`.
    pub token: Option<u64>,
    /// `DELETE` only: whether a record was removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removed: Option<bool>,
}

/// The body of a refusal: `{"error": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong and what to do about it.
    pub error: String,
    /// For an unknown upstream: the upstreams there are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstreams: Option<Vec<String>>,
}

impl ErrorBody {
    /// An error body with only a message.
    pub fn new(error: impl Into<String>) -> Self {
        ErrorBody {
            error: error.into(),
            upstreams: None,
        }
    }
}
