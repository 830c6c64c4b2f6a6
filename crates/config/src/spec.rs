//! The typed, validated spec the gateway is built from: what [`crate::parse`]
//! and [`crate::load`] return once every check has passed. Plain Rust
//! types only (addresses, durations, sizes, methods, header names, enums
//! with their own fields, indexes between sections), with every default
//! filled in, so runtime code neither re-parses text nor sees a TOML type.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::uri::Authority;
use http::{HeaderName, Method};
use serde::Deserialize;

/// A whole gateway: what one config file describes.
#[derive(Debug, Clone)]
pub struct Spec {
    /// `[server]`.
    pub server: ServerSpec,
    /// `[store]`.
    pub store: StoreSpec,
    /// `[upstreams.NAME]`, ordered by name; [`RouteSpec::upstream`]
    /// indexes into it.
    pub upstreams: Vec<UpstreamSpec>,
    /// `[[routes]]`, in file order.
    pub routes: Vec<RouteSpec>,
    /// `[drain]`.
    pub drain: DrainSpec,
    /// `[log]`.
    pub log: LogSpec,
}

impl Spec {
    /// The upstream `route` forwards to.
    pub fn upstream_of(&self, route: &RouteSpec) -> &UpstreamSpec {
        // An index the conversion took from `upstreams` itself.
        &self.upstreams[route.upstream]
    }

    /// Whether any route runs the idempotency engine (then the store is
    /// a dependency of the gateway).
    pub fn has_idempotent_routes(&self) -> bool {
        self.routes.iter().any(|r| r.idempotency.is_some())
    }
}

/// `[server]`: listeners, limits and downstream timeouts.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerSpec {
    /// Data-plane address.
    pub listen: SocketAddr,
    /// Admin address; no admin server when `None`.
    pub admin_listen: Option<SocketAddr>,
    /// How long a downstream connection may sit with no request.
    pub idle_timeout: Duration,
    /// How long a request head (and a new connection's sniff and HTTP/2
    /// preface) may take; also the admin listener's head limit.
    pub header_read_timeout: Duration,
    /// HTTP/2: PING after this long without a frame from the client.
    pub http2_keep_alive_interval: Duration,
    /// HTTP/2: how long a PING (or a GOAWAY) may go unanswered.
    pub http2_keep_alive_timeout: Duration,
    /// Admin connections served at once (at least 1).
    pub admin_max_connections: usize,
    /// Largest request head accepted (1KiB to 1MiB); 431 above.
    pub max_header_size: usize,
    /// Largest request body accepted by default; 413 above.
    pub max_body_size: u64,
    /// Add a `Via` header to requests and responses.
    pub via: bool,
    /// Worker threads (at most [`crate::MAX_WORKERS`]); 0 means one per core.
    pub workers: usize,
    /// Bytes of keyed request bodies buffered at once, across connections.
    pub buffer_budget: u64,
}

/// `[store]`: where idempotency records live.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreSpec {
    /// The store and its own settings.
    pub backend: StoreBackend,
    /// How long one store operation may take (above zero).
    pub timeout: Duration,
}

/// A store kind with the settings only it takes.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreBackend {
    /// In-process map, lost on restart.
    Memory {
        /// Bytes held in all (claims and results).
        max_bytes: usize,
        /// Bytes one tenant's keys may hold.
        max_bytes_per_tenant: usize,
    },
    /// An on-disk database.
    Embedded {
        /// Its directory.
        path: PathBuf,
        /// Whether a claim is synced before the request goes upstream.
        durable_claims: bool,
    },
    /// One Redis server.
    Redis {
        /// `redis://` URL (checked to open).
        url: String,
        /// Key prefix.
        prefix: String,
    },
    /// A Redis Cluster, discovered from its seed nodes.
    RedisCluster {
        /// `redis://` URLs of the seed nodes (at least one; checked to
        /// make one cluster client).
        nodes: Vec<String>,
        /// Key prefix.
        prefix: String,
    },
    /// PostgreSQL.
    Postgres {
        /// `postgres://` URL (checked to parse, with a host).
        url: String,
        /// Table name prefix.
        prefix: String,
    },
}

/// `[upstreams.NAME]`.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamSpec {
    /// Its name.
    pub name: String,
    /// Its endpoints (at least one), in file order.
    pub endpoints: Vec<EndpointSpec>,
    /// Load-balancing policy.
    pub load_balancing: LoadBalancing,
    /// TCP connect timeout (above zero).
    pub connect_timeout: Duration,
    /// From sending the request to the whole response head (above zero).
    pub request_timeout: Duration,
    /// How long a pooled idle connection is kept.
    pub idle_timeout: Duration,
    /// Idle connections kept per endpoint.
    pub max_idle_per_endpoint: usize,
    /// Breakers (defaults when the table is absent).
    pub breaker: BreakerSpec,
    /// Retries (defaults when the table is absent).
    pub retry: RetrySpec,
    /// Active health checks; `None`: off.
    pub health_check: Option<HealthCheckSpec>,
}

/// One endpoint of an upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSpec {
    /// The URL as configured (`http://host:port`), for metrics, logs and
    /// the admin API.
    pub url: String,
    /// `host:port` requests are sent to.
    pub authority: Authority,
}

/// How an upstream spreads requests over its endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LoadBalancing {
    /// Power of two choices, least outstanding requests.
    #[default]
    LeastOutstanding,
    /// Each endpoint in turn.
    RoundRobin,
}

impl LoadBalancing {
    /// The name as the config spells it (`least_outstanding`,
    /// `round_robin`), for `/status` and `keel status`.
    pub fn as_str(self) -> &'static str {
        match self {
            LoadBalancing::LeastOutstanding => "least_outstanding",
            LoadBalancing::RoundRobin => "round_robin",
        }
    }
}

/// `routes.idempotency.missing_tenant`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum MissingTenantPolicy {
    /// Requests without `tenant_header` share one anonymous tenant: two
    /// such callers with the same key and request get one execution
    /// (default; for upstreams whose callers all send the header, or may
    /// share keys).
    #[default]
    Anonymous,
    /// A keyed request without `tenant_header` gets 400
    /// `idempotency-tenant-missing` and nothing is claimed or forwarded.
    Reject,
}

/// `routes.idempotency.lapsed_lease`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LapsedLeasePolicy {
    /// Lock the key as "outcome unknown" for the TTL: the request may have
    /// run, so it never runs twice (default). `keel idempotency release`
    /// frees it after reconciliation.
    #[default]
    Lock,
    /// Free the key: a retry runs the request again (at-least-once after a
    /// crash, for operations safe to repeat).
    Rerun,
}

/// `routes.idempotency.server_errors`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ServerErrorsPolicy {
    /// Store 5xx answers and replay them; a request lost after it was sent
    /// locks the key as "outcome unknown" (default).
    #[default]
    Store,
    /// Release the key on 5xx answers and on requests lost after they were
    /// sent, so a retry runs again (only for operations safe to re-run).
    Release,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[upstreams.NAME.breaker]`: the endpoint breakers and the upstream's.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerSpec {
    /// Breakers on; when off, `failure_statuses` and `max_retry_after`
    /// still say what counts as a failure.
    pub enabled: bool,
    /// An endpoint's breaker opens at this many failures (at least 1)
    /// within `window`.
    pub failures: u32,
    /// The window for `failures` (above zero).
    pub window: Duration,
    /// Also open an endpoint at this failure rate (above 0, at most 1).
    pub failure_rate: Option<f64>,
    /// Calls needed before a failure rate counts.
    pub min_calls: u32,
    /// The upstream breaker's failure rate (above 0, at most 1).
    pub upstream_failure_rate: f64,
    /// Open time after the first trip (above zero).
    pub open_duration: Duration,
    /// Repeated trips double the open time up to this.
    pub max_open_duration: Duration,
    /// Probes let through at once when half open (at least 1).
    pub half_open_probes: u32,
    /// A probe that has not answered after this frees its slot (above zero).
    pub probe_timeout: Duration,
    /// Gradual recovery after the probes: the length of each step (above
    /// zero); `None`: all traffic at once.
    pub recovery_step: Option<Duration>,
    /// Statuses that count as failures (each 100 to 599).
    pub failure_statuses: Vec<u16>,
    /// An upstream `Retry-After` sets the open time, up to this.
    pub max_retry_after: Duration,
}

/// `[upstreams.NAME.retry]`.
#[derive(Debug, Clone, PartialEq)]
pub struct RetrySpec {
    /// Retries on.
    pub enabled: bool,
    /// Attempts per request, the first included (at least 1).
    pub max_attempts: u32,
    /// Statuses worth another attempt (each 100 to 599).
    pub statuses: Vec<u16>,
    /// First backoff step (full jitter).
    pub backoff_base: Duration,
    /// Longest backoff (not below `backoff_base`).
    pub backoff_cap: Duration,
    /// Share of requests retries may add (0 to 10).
    pub budget_ratio: f64,
    /// Retries per second always allowed.
    pub budget_min_per_second: u32,
    /// Request bodies up to this size are kept for a retry.
    pub max_body: u64,
}

/// `[upstreams.NAME.health_check]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckSpec {
    /// Path requested with GET (a request path starting with `/`).
    pub path: String,
    /// Time between checks (above zero).
    pub interval: Duration,
    /// A check that takes longer fails (above zero).
    pub timeout: Duration,
    /// Consecutive passes that re-admit an endpoint (at least 1).
    pub healthy_threshold: u32,
    /// Consecutive failures that eject an endpoint (at least 1).
    pub unhealthy_threshold: u32,
}

/// `[[routes]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteSpec {
    /// Name in metrics, logs and the admin API (the path prefix unless set).
    pub name: String,
    /// Path prefix (starts with `/`); the longest match wins.
    pub path_prefix: String,
    /// Only requests for this host, lowercased.
    pub host: Option<String>,
    /// Only these methods; `None`: all.
    pub methods: Option<Vec<Method>>,
    /// Index of its upstream in [`Spec::upstreams`].
    pub upstream: usize,
    /// Largest request body (the route's own, else `server.max_body_size`).
    pub max_body_size: u64,
    /// The idempotency engine; `None`: off.
    pub idempotency: Option<IdempotencySpec>,
    /// The stale cache; `None`: off.
    pub stale: Option<StaleSpec>,
}

/// `[routes.idempotency]` of a route that has it enabled.
#[derive(Debug, Clone, PartialEq)]
pub struct IdempotencySpec {
    /// A matching request without a key gets 400.
    pub required: bool,
    /// Methods that take keys.
    pub methods: Vec<Method>,
    /// How long a completed record is kept (above zero).
    pub ttl: Duration,
    /// Header whose (hashed) value scopes the key.
    pub tenant_header: HeaderName,
    /// What a keyed request without `tenant_header` gets.
    pub missing_tenant: MissingTenantPolicy,
    /// Forward without idempotency when the store is down (else 503).
    pub fail_open: bool,
    /// How long a claim holds; `None`: the upstream's request timeout plus
    /// a margin.
    pub lease: Option<Duration>,
    /// Largest request body fingerprinted (413 above).
    pub max_body: usize,
    /// Largest response body kept for replay.
    pub max_response: usize,
    /// What a 5xx answer or an ambiguous failure does to the key.
    pub server_errors: ServerErrorsPolicy,
    /// What a claim whose lease lapsed makes of its key.
    pub lapsed_lease: LapsedLeasePolicy,
}

/// `[routes.stale]` of a route that has it enabled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleSpec {
    /// Oldest response served (above zero).
    pub max_age: Duration,
    /// Total bytes kept across the route.
    pub max_bytes: u64,
    /// Responses with larger bodies are not kept (at most `max_bytes`).
    pub max_entry_size: u64,
}

/// `[drain]`: graceful shutdown pacing.
#[derive(Debug, Clone, PartialEq)]
pub struct DrainSpec {
    /// Readiness fails, traffic still served, for this long (below
    /// `deadline`).
    pub shutdown_delay: Duration,
    /// Everything still open is closed at this point (above zero).
    pub deadline: Duration,
    /// How tunnel closes are paced.
    pub pace: DrainPace,
    /// Spread each batch's closes randomly across its interval.
    pub jitter: bool,
    /// Reconnect hint window; zero sends no hint.
    pub reconnect_window: Duration,
    /// Time left before the deadline for the last closes.
    pub close_grace: Duration,
    /// Bytes of a fragmented WebSocket message a close waits for.
    pub close_message_limit: u64,
}

/// `[drain] strategy` with the keys it reads.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DrainPace {
    /// `size` tunnels every `interval` (Phoenix).
    Batch {
        /// Tunnels per batch (at least 1).
        size: usize,
        /// Time between batches (above zero).
        interval: Duration,
    },
    /// `percent` % of the tunnels every `interval` (Socket Drano).
    Percent {
        /// Share per interval (above 0, at most 100).
        percent: f64,
        /// Time between batches (above zero).
        interval: Duration,
    },
    /// Evenly over `over` (Envoy).
    Gradual {
        /// Length of the drain (above zero).
        over: Duration,
    },
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSpec {
    /// A `tracing` filter (checked to parse); `RUST_LOG` wins.
    pub level: String,
    /// Text or JSON lines.
    pub format: LogFormat,
    /// One info line per request.
    pub access_log: bool,
}
