//! The config file as written: the serde schema with `toml::Spanned`
//! values (so checks can point at them), the units and the defaults.
//! Only `keel-config` reads it; [`crate::parse`] turns it into a
//! [`crate::Spec`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::spec::{
    LapsedLeasePolicy, LoadBalancing, LogFormat, MissingTenantPolicy, ServerErrorsPolicy,
};
use crate::units::{ConfigDuration, ConfigSize};

/// The whole config file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[server]`: listeners, limits and downstream timeouts.
    pub server: ServerConfig,
    /// `[store]`: where idempotency records live.
    #[serde(default)]
    pub store: StoreConfig,
    /// `[upstreams.NAME]`.
    #[serde(default)]
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    /// `[[routes]]`, matched by longest `path_prefix`.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// `[drain]`: graceful shutdown pacing.
    #[serde(default)]
    pub drain: DrainConfig,
    /// `[log]`: level, format, access log.
    #[serde(default)]
    pub log: LogConfig,
}

/// `[server]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Data-plane address.
    pub listen: Spanned<String>,
    /// Admin address; no admin server when absent.
    #[serde(default)]
    pub admin_listen: Option<Spanned<String>>,
    /// How long a downstream connection may sit with no request: HTTP/1
    /// between requests (until the first byte of the next one), HTTP/2 with
    /// no open stream (then GOAWAY).
    #[serde(default = "defaults::server_idle_timeout")]
    pub idle_timeout: Spanned<ConfigDuration>,
    /// How long a request head may take from its first byte to its end
    /// (HTTP/1; on a new connection, from the accept), and a new connection
    /// its protocol sniff and HTTP/2 preface. Also the admin listener's
    /// limit for a request head and for the wait between requests.
    #[serde(default = "defaults::header_read_timeout")]
    pub header_read_timeout: Spanned<ConfigDuration>,
    /// HTTP/2: a PING is sent after this long without a frame from the
    /// client, so that a dead peer is found.
    #[serde(default = "defaults::http2_keep_alive_interval")]
    pub http2_keep_alive_interval: Spanned<ConfigDuration>,
    /// HTTP/2: how long a PING may go unanswered before the connection is
    /// closed; also how long a connection with no stream left may take to
    /// answer a GOAWAY before it is cut.
    #[serde(default = "defaults::http2_keep_alive_timeout")]
    pub http2_keep_alive_timeout: Spanned<ConfigDuration>,
    /// Admin connections served at once; further ones wait in the
    /// listen backlog.
    #[serde(default = "defaults::admin_max_connections")]
    pub admin_max_connections: Spanned<usize>,
    /// Largest request head (request line plus headers) accepted; 431 above.
    #[serde(default = "defaults::max_header_size")]
    pub max_header_size: ConfigSize,
    /// Largest request body accepted; 413 above. Routes may lower or raise it.
    #[serde(default = "defaults::max_body_size")]
    pub max_body_size: ConfigSize,
    /// Add a `Via` header to requests and responses.
    #[serde(default)]
    pub via: bool,
    /// Worker threads; 0 means one per core.
    #[serde(default)]
    pub workers: usize,
    /// Bytes of keyed request bodies (buffered to be fingerprinted) held at
    /// once across all connections; a keyed request past it gets 503 with
    /// `Retry-After`.
    #[serde(default = "defaults::buffer_budget")]
    pub buffer_budget: Spanned<ConfigSize>,
}

/// `[store]` kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// In-process map, lost on restart.
    Memory,
    /// An on-disk database in `path`.
    Embedded,
    /// Redis at `url`.
    Redis,
    /// PostgreSQL at `url`.
    Postgres,
}

/// `[store]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Which store.
    pub kind: Spanned<StoreKind>,
    /// Directory for the embedded store.
    #[serde(default)]
    pub path: Option<String>,
    /// URL for redis and postgres.
    #[serde(default)]
    pub url: Option<Spanned<String>>,
    /// Redis Cluster: seed nodes (`redis://host:port/` each), in place of
    /// `url`; the rest of the cluster is discovered from them.
    #[serde(default)]
    pub cluster_nodes: Option<Spanned<Vec<Spanned<String>>>>,
    /// Key prefix (redis) or table name prefix (postgres), so several
    /// gateways or tenants can share one server.
    #[serde(default = "defaults::store_prefix")]
    pub prefix: String,
    /// How long to wait for the store to answer one operation.
    #[serde(default = "defaults::store_timeout")]
    pub timeout: ConfigDuration,
    /// Embedded store: whether a claim is synced to disk before the
    /// request goes upstream (default true). False saves one of the two
    /// syncs a new request waits for, but a crash while a request is in
    /// flight may lose its claim, so a retry after the restart may run it
    /// again. Completed results are always synced.
    #[serde(default)]
    pub durable_claims: Option<Spanned<bool>>,
    /// Memory store: bytes held in all (claims and results). A full store
    /// refuses new keys with 503; it never drops a result before its TTL.
    #[serde(default = "defaults::memory_max_bytes")]
    pub max_bytes: Spanned<ConfigSize>,
    /// Memory store: bytes one tenant's keys may hold, so one tenant's
    /// flood cannot use up the others' room.
    #[serde(default = "defaults::memory_max_tenant_bytes")]
    pub max_bytes_per_tenant: Spanned<ConfigSize>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            kind: Spanned::new(0..0, StoreKind::Memory),
            path: None,
            url: None,
            cluster_nodes: None,
            prefix: defaults::store_prefix(),
            timeout: defaults::store_timeout(),
            durable_claims: None,
            max_bytes: defaults::memory_max_bytes(),
            max_bytes_per_tenant: defaults::memory_max_tenant_bytes(),
        }
    }
}

impl StoreConfig {
    /// The embedded store's directory (`keel-data` by default).
    pub fn embedded_path(&self) -> PathBuf {
        PathBuf::from(self.path.as_deref().unwrap_or("keel-data"))
    }

    /// Whether the embedded store syncs claims (`true` unless set off).
    pub fn durable_claims(&self) -> bool {
        self.durable_claims.as_ref().is_none_or(|d| *d.get_ref())
    }
}

/// `[upstreams.NAME]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// `http://host:port` URLs.
    pub endpoints: Spanned<Vec<Spanned<String>>>,
    /// Load-balancing policy.
    #[serde(default)]
    pub load_balancing: LoadBalancing,
    /// TCP connect timeout.
    #[serde(default = "defaults::connect_timeout")]
    pub connect_timeout: ConfigDuration,
    /// Time from sending the request to receiving the whole response head.
    #[serde(default = "defaults::request_timeout")]
    pub request_timeout: ConfigDuration,
    /// How long a pooled idle upstream connection is kept.
    #[serde(default = "defaults::upstream_idle_timeout")]
    pub idle_timeout: ConfigDuration,
    /// Idle connections kept per endpoint.
    #[serde(default = "defaults::max_idle_per_endpoint")]
    pub max_idle_per_endpoint: usize,
    /// `[upstreams.NAME.breaker]` (docs/gateway-resilience.md); on with
    /// defaults when absent.
    #[serde(default)]
    pub breaker: Option<BreakerConfig>,
    /// `[upstreams.NAME.health_check]`; no active checks when absent.
    #[serde(default)]
    pub health_check: Option<HealthCheckConfig>,
    /// `[upstreams.NAME.retry]`; on with defaults when absent.
    #[serde(default)]
    pub retry: Option<RetryConfig>,
}

/// `[[routes]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Name used in metrics and logs; defaults to the path prefix.
    #[serde(default)]
    pub name: Option<String>,
    /// Path prefix; the longest matching prefix wins.
    pub path_prefix: Spanned<String>,
    /// Only requests for this host (port ignored, case-insensitive).
    #[serde(default)]
    pub host: Option<String>,
    /// Only these methods; all when absent.
    #[serde(default)]
    pub methods: Option<Vec<Spanned<String>>>,
    /// Name of an `[upstreams.NAME]` table.
    pub upstream: Spanned<String>,
    /// Overrides `server.max_body_size` for this route.
    #[serde(default)]
    pub max_body_size: Option<ConfigSize>,
    /// `[routes.idempotency]`.
    #[serde(default)]
    pub idempotency: Option<IdempotencyConfig>,
    /// `[routes.stale]`: stale fallback for reads (docs/gateway-resilience.md).
    #[serde(default)]
    pub stale: Option<StaleConfig>,
}

/// `[routes.idempotency]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdempotencyConfig {
    /// Turns the engine on for this route.
    #[serde(default)]
    pub enabled: bool,
    /// A matching request without a key gets 400.
    #[serde(default)]
    pub required: bool,
    /// Methods that take keys.
    #[serde(default = "defaults::idempotency_methods")]
    pub methods: Vec<Spanned<String>>,
    /// How long a completed record is kept.
    #[serde(default = "defaults::ttl")]
    pub ttl: ConfigDuration,
    /// Header whose (hashed) value scopes the key.
    #[serde(default = "defaults::tenant_header")]
    pub tenant_header: Spanned<String>,
    /// What a keyed request without `tenant_header` gets: `anonymous`
    /// (default: such requests share one tenant) or `reject` (400).
    #[serde(default)]
    pub missing_tenant: MissingTenantPolicy,
    /// When the store is unreachable, forward without idempotency instead
    /// of answering 503 (fail-open). Default false (fail-closed).
    #[serde(default)]
    pub fail_open: bool,
    /// How long a claim holds before a duplicate may take the key over.
    /// Default: the upstream's request_timeout plus a margin.
    #[serde(default)]
    pub lease: Option<ConfigDuration>,
    /// Largest request body fingerprinted on a keyed request (413 above).
    #[serde(default = "defaults::idempotency_max_body")]
    pub max_body: ConfigSize,
    /// Largest response body kept for replay; larger ones are streamed and
    /// recorded as "too large to replay".
    #[serde(default = "defaults::idempotency_max_body")]
    pub max_response: ConfigSize,
    /// What a 5xx answer or an ambiguous failure does to the key.
    #[serde(default)]
    pub server_errors: ServerErrorsPolicy,
    /// What a claim whose lease lapsed (the gateway holding it crashed or
    /// lost the store) makes of its key: `lock` (default) or `rerun`.
    #[serde(default)]
    pub lapsed_lease: LapsedLeasePolicy,
}

/// `[drain]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrainConfig {
    /// Readiness fails, traffic still served, for this long.
    #[serde(default = "defaults::shutdown_delay")]
    pub shutdown_delay: ConfigDuration,
    /// Tunnels closed per batch.
    #[serde(default = "defaults::batch_size")]
    pub batch_size: u64,
    /// Time between batches.
    #[serde(default = "defaults::batch_interval")]
    pub batch_interval: ConfigDuration,
    /// Everything still open is closed at this point.
    #[serde(default = "defaults::deadline")]
    pub deadline: ConfigDuration,
    /// Pacing of tunnel closes: `batch` (`batch_size` every
    /// `batch_interval`), `percent` (`percent` % every `batch_interval`) or
    /// `gradual` (evenly over `gradual_over`).
    #[serde(default)]
    pub strategy: DrainStrategy,
    /// Share of the tunnels closed per interval with `strategy = "percent"`.
    #[serde(default = "defaults::drain_percent")]
    pub percent: f64,
    /// Duration of a `gradual` drain.
    #[serde(default = "defaults::gradual_over")]
    pub gradual_over: ConfigDuration,
    /// Spread each batch's closes randomly across its interval.
    #[serde(default = "defaults::drain_jitter")]
    pub jitter: bool,
    /// Each closed tunnel's client is told (in the close reason) to wait a
    /// random time below this before reconnecting; `"0s"` sends no hint.
    #[serde(default = "defaults::reconnect_window")]
    pub reconnect_window: ConfigDuration,
    /// A plan that does not fit in the deadline asks the tunnels it has not
    /// reached this long before the deadline (at most a tenth of it), so
    /// each hears its close frame and hint before the cut.
    #[serde(default = "defaults::close_grace")]
    pub close_grace: ConfigDuration,
    /// A WebSocket asked to close while a fragmented message is on its way
    /// to the client gets its close frame after that message ends, unless
    /// more than this many bytes (or more than the close grace) go by
    /// first; then it goes at the next frame boundary.
    #[serde(default = "defaults::close_message_limit")]
    pub close_message_limit: ConfigSize,
}

/// `[drain] strategy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DrainStrategy {
    /// `batch_size` every `batch_interval` (Phoenix).
    #[default]
    Batch,
    /// `percent` % every `batch_interval` (Socket Drano).
    Percent,
    /// Evenly over `gradual_over` (Envoy).
    Gradual,
}

impl Default for DrainConfig {
    fn default() -> Self {
        DrainConfig {
            shutdown_delay: defaults::shutdown_delay(),
            batch_size: defaults::batch_size(),
            batch_interval: defaults::batch_interval(),
            deadline: defaults::deadline(),
            strategy: DrainStrategy::default(),
            percent: defaults::drain_percent(),
            gradual_over: defaults::gradual_over(),
            jitter: defaults::drain_jitter(),
            reconnect_window: defaults::reconnect_window(),
            close_grace: defaults::close_grace(),
            close_message_limit: defaults::close_message_limit(),
        }
    }
}

/// `[log]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// A `tracing` filter such as `"info"` or `"keel=debug"`; `RUST_LOG` wins.
    #[serde(default = "defaults::log_level")]
    pub level: String,
    /// `text` or `json`.
    #[serde(default)]
    pub format: LogFormat,
    /// One info line per request.
    #[serde(default = "defaults::yes")]
    pub access_log: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: defaults::log_level(),
            format: LogFormat::Text,
            access_log: true,
        }
    }
}

/// `[upstreams.NAME.breaker]`: the endpoint breakers (and the upstream's).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    /// Turn breakers off entirely for this upstream.
    #[serde(default = "defaults::yes")]
    pub enabled: bool,
    /// An endpoint's breaker opens at this many failures within `window`.
    #[serde(default = "defaults::failures")]
    pub failures: u32,
    /// The window for `failures`.
    #[serde(default = "defaults::window")]
    pub window: ConfigDuration,
    /// Also open an endpoint at this failure rate (0..1) over its last 100
    /// calls, once `min_calls` were seen. Off when absent.
    #[serde(default)]
    pub failure_rate: Option<f64>,
    /// Calls needed before a failure rate counts (endpoint and upstream).
    #[serde(default = "defaults::min_calls")]
    pub min_calls: u32,
    /// The upstream-wide breaker opens when this share of whole requests
    /// (after retries) failed over its last 100, once `min_calls` were seen.
    #[serde(default = "defaults::upstream_failure_rate")]
    pub upstream_failure_rate: f64,
    /// How long a breaker stays open after its first trip.
    #[serde(default = "defaults::open_duration")]
    pub open_duration: ConfigDuration,
    /// Repeated trips double the open time (with jitter) up to this.
    #[serde(default = "defaults::max_open_duration")]
    pub max_open_duration: ConfigDuration,
    /// Requests let through at once when the open time is over.
    #[serde(default = "defaults::half_open_probes")]
    pub half_open_probes: u32,
    /// A probe that has not answered after this frees its slot.
    #[serde(default = "defaults::probe_timeout")]
    pub probe_timeout: ConfigDuration,
    /// After the probes succeed, admit 10 %, 25 %, 50 %, then 100 % of
    /// traffic, each for `recovery_step`, instead of everything at once.
    #[serde(default = "defaults::yes")]
    pub gradual_recovery: bool,
    /// Length of each gradual-recovery step.
    #[serde(default = "defaults::recovery_step")]
    pub recovery_step: ConfigDuration,
    /// Response statuses that count as failures (connect errors and
    /// timeouts always do).
    #[serde(default = "defaults::failure_statuses")]
    pub failure_statuses: Vec<u16>,
    /// An upstream `Retry-After` on 503/429 sets the open time, up to this.
    #[serde(default = "defaults::max_open_duration")]
    pub max_retry_after: ConfigDuration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            enabled: true,
            failures: defaults::failures(),
            window: defaults::window(),
            failure_rate: None,
            min_calls: defaults::min_calls(),
            upstream_failure_rate: defaults::upstream_failure_rate(),
            open_duration: defaults::open_duration(),
            max_open_duration: defaults::max_open_duration(),
            half_open_probes: defaults::half_open_probes(),
            probe_timeout: defaults::probe_timeout(),
            gradual_recovery: true,
            recovery_step: defaults::recovery_step(),
            failure_statuses: defaults::failure_statuses(),
            max_retry_after: defaults::max_open_duration(),
        }
    }
}

/// `[upstreams.NAME.health_check]`: active checks, off unless present.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    /// Path requested with GET on each endpoint.
    #[serde(default = "defaults::health_path")]
    pub path: String,
    /// Time between checks.
    #[serde(default = "defaults::health_interval")]
    pub interval: ConfigDuration,
    /// A check that takes longer fails.
    #[serde(default = "defaults::health_timeout")]
    pub timeout: ConfigDuration,
    /// Consecutive passes that re-admit an ejected endpoint.
    #[serde(default = "defaults::healthy_threshold")]
    pub healthy_threshold: u32,
    /// Consecutive failures that eject an endpoint.
    #[serde(default = "defaults::unhealthy_threshold")]
    pub unhealthy_threshold: u32,
}

/// `[upstreams.NAME.retry]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Turn retries off for this upstream.
    #[serde(default = "defaults::yes")]
    pub enabled: bool,
    /// Attempts per request, the first included.
    #[serde(default = "defaults::max_attempts")]
    pub max_attempts: u32,
    /// Response statuses worth another attempt (connect failures always are).
    #[serde(default = "defaults::failure_statuses")]
    pub statuses: Vec<u16>,
    /// First backoff step (full jitter: a random wait up to it).
    #[serde(default = "defaults::backoff_base")]
    pub backoff_base: ConfigDuration,
    /// The backoff never waits longer than this.
    #[serde(default = "defaults::backoff_cap")]
    pub backoff_cap: ConfigDuration,
    /// Retries may add at most this share of requests (over 10 s).
    #[serde(default = "defaults::budget_ratio")]
    pub budget_ratio: f64,
    /// ... but at least this many retries per second are always allowed.
    #[serde(default = "defaults::budget_min_per_sec")]
    pub budget_min_per_second: u32,
    /// Request bodies up to this size are kept so the request can be retried;
    /// larger (or unsized) bodies are streamed and never retried.
    #[serde(default = "defaults::max_retry_body")]
    pub max_body: ConfigSize,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            enabled: true,
            max_attempts: defaults::max_attempts(),
            statuses: defaults::failure_statuses(),
            backoff_base: defaults::backoff_base(),
            backoff_cap: defaults::backoff_cap(),
            budget_ratio: defaults::budget_ratio(),
            budget_min_per_second: defaults::budget_min_per_sec(),
            max_body: defaults::max_retry_body(),
        }
    }
}

/// `[routes.stale]`: serve the last good GET/HEAD response when the
/// upstream fails or its breakers are open.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaleConfig {
    /// Turn the cache on (the table's presence alone does too).
    #[serde(default = "defaults::yes")]
    pub enabled: bool,
    /// Oldest response served when the response has no `stale-if-error`
    /// (and the upper bound when it has one).
    #[serde(default = "defaults::stale_max_age")]
    pub max_age: ConfigDuration,
    /// Total bytes kept (bodies plus headers), across the route.
    #[serde(default = "defaults::stale_max_bytes")]
    pub max_bytes: ConfigSize,
    /// Responses with larger bodies are not kept.
    #[serde(default = "defaults::stale_max_entry")]
    pub max_entry_size: ConfigSize,
}

/// Default values, one function each because serde wants functions.
mod defaults {
    use super::*;

    pub fn server_idle_timeout() -> Spanned<ConfigDuration> {
        Spanned::new(0..0, ConfigDuration(Duration::from_secs(60)))
    }
    pub fn header_read_timeout() -> Spanned<ConfigDuration> {
        Spanned::new(0..0, ConfigDuration(Duration::from_secs(10)))
    }
    pub fn http2_keep_alive_interval() -> Spanned<ConfigDuration> {
        Spanned::new(0..0, ConfigDuration(Duration::from_secs(30)))
    }
    pub fn http2_keep_alive_timeout() -> Spanned<ConfigDuration> {
        Spanned::new(0..0, ConfigDuration(Duration::from_secs(15)))
    }
    pub fn admin_max_connections() -> Spanned<usize> {
        Spanned::new(0..0, 64)
    }
    pub fn max_header_size() -> ConfigSize {
        ConfigSize(16 * 1024)
    }
    pub fn max_body_size() -> ConfigSize {
        ConfigSize(10 * 1024 * 1024)
    }
    pub fn store_prefix() -> String {
        "keel".to_owned()
    }
    pub fn store_timeout() -> ConfigDuration {
        ConfigDuration(Duration::from_secs(2))
    }
    pub fn connect_timeout() -> ConfigDuration {
        ConfigDuration(Duration::from_secs(2))
    }
    pub fn request_timeout() -> ConfigDuration {
        ConfigDuration(Duration::from_secs(30))
    }
    pub fn upstream_idle_timeout() -> ConfigDuration {
        ConfigDuration(Duration::from_secs(60))
    }
    pub fn max_idle_per_endpoint() -> usize {
        256
    }
    pub fn idempotency_methods() -> Vec<Spanned<String>> {
        ["POST", "PATCH"]
            .into_iter()
            .map(|m| Spanned::new(0..0, m.to_owned()))
            .collect()
    }
    pub fn ttl() -> ConfigDuration {
        ConfigDuration(Duration::from_secs(24 * 3600))
    }
    pub fn idempotency_max_body() -> ConfigSize {
        ConfigSize(1 << 20)
    }
    pub fn buffer_budget() -> Spanned<ConfigSize> {
        Spanned::new(0..0, ConfigSize(256 << 20))
    }
    pub fn memory_max_bytes() -> Spanned<ConfigSize> {
        Spanned::new(0..0, ConfigSize(256 << 20))
    }
    pub fn memory_max_tenant_bytes() -> Spanned<ConfigSize> {
        Spanned::new(0..0, ConfigSize(64 << 20))
    }
    pub fn tenant_header() -> Spanned<String> {
        Spanned::new(0..0, "authorization".to_owned())
    }
    pub fn shutdown_delay() -> ConfigDuration {
        ConfigDuration(Duration::from_secs(5))
    }
    pub fn batch_size() -> u64 {
        10_000
    }
    pub fn batch_interval() -> ConfigDuration {
        ConfigDuration(Duration::from_secs(2))
    }
    pub fn deadline() -> ConfigDuration {
        ConfigDuration(Duration::from_secs(30))
    }
    pub fn drain_percent() -> f64 {
        25.0
    }
    pub fn gradual_over() -> ConfigDuration {
        ConfigDuration(Duration::from_secs(20))
    }
    pub fn drain_jitter() -> bool {
        true
    }
    pub fn reconnect_window() -> ConfigDuration {
        ConfigDuration(Duration::from_secs(5))
    }
    pub fn close_grace() -> ConfigDuration {
        ConfigDuration(Duration::from_secs(1))
    }
    pub fn close_message_limit() -> ConfigSize {
        ConfigSize(16 << 20)
    }
    pub fn log_level() -> String {
        "info".to_owned()
    }
    pub fn yes() -> bool {
        true
    }
    pub fn failures() -> u32 {
        5
    }
    pub fn window() -> ConfigDuration {
        ConfigDuration(Duration::from_secs(10))
    }
    pub fn min_calls() -> u32 {
        20
    }
    pub fn upstream_failure_rate() -> f64 {
        0.5
    }
    pub fn open_duration() -> ConfigDuration {
        ConfigDuration(Duration::from_secs(10))
    }
    pub fn max_open_duration() -> ConfigDuration {
        ConfigDuration(Duration::from_secs(300))
    }
    pub fn half_open_probes() -> u32 {
        3
    }
    pub fn probe_timeout() -> ConfigDuration {
        ConfigDuration(Duration::from_secs(10))
    }
    pub fn recovery_step() -> ConfigDuration {
        ConfigDuration(Duration::from_secs(5))
    }
    pub fn failure_statuses() -> Vec<u16> {
        vec![502, 503, 504]
    }
    pub fn health_path() -> String {
        "/healthz".to_owned()
    }
    pub fn health_interval() -> ConfigDuration {
        ConfigDuration(Duration::from_secs(5))
    }
    pub fn health_timeout() -> ConfigDuration {
        ConfigDuration(Duration::from_secs(1))
    }
    pub fn healthy_threshold() -> u32 {
        2
    }
    pub fn unhealthy_threshold() -> u32 {
        3
    }
    pub fn max_attempts() -> u32 {
        3
    }
    pub fn backoff_base() -> ConfigDuration {
        ConfigDuration(Duration::from_millis(25))
    }
    pub fn backoff_cap() -> ConfigDuration {
        ConfigDuration(Duration::from_millis(250))
    }
    pub fn budget_ratio() -> f64 {
        0.2
    }
    pub fn budget_min_per_sec() -> u32 {
        3
    }
    pub fn max_retry_body() -> ConfigSize {
        ConfigSize(64 * 1024)
    }
    pub fn stale_max_age() -> ConfigDuration {
        ConfigDuration(Duration::from_secs(300))
    }
    pub fn stale_max_bytes() -> ConfigSize {
        ConfigSize(16 * 1024 * 1024)
    }
    pub fn stale_max_entry() -> ConfigSize {
        ConfigSize(256 * 1024)
    }
}
