//! The configuration file: its schema (serde), defaults, and the checks that
//! `keel check` runs. Every error names `FILE:LINE:COL` so an editor can jump
//! to it: syntax and schema errors take the span toml reports, semantic
//! errors (an unknown upstream, a bad URL) the span of the offending value.

//!
//! ```
//! let config = keel_config::parse(
//!     std::path::Path::new("keel.toml"),
//!     "[server]\nlisten = \"127.0.0.1:8080\"\n",
//! )
//! .expect("a valid config");
//! assert_eq!(config.server.listen.get_ref(), "127.0.0.1:8080");
//! ```

pub mod resilience;
pub mod units;

pub use resilience::{BreakerConfig, HealthCheckConfig, RetryConfig, StaleConfig};

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

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
    pub breaker: Option<crate::resilience::BreakerConfig>,
    /// `[upstreams.NAME.health_check]`; no active checks when absent.
    #[serde(default)]
    pub health_check: Option<crate::resilience::HealthCheckConfig>,
    /// `[upstreams.NAME.retry]`; on with defaults when absent.
    #[serde(default)]
    pub retry: Option<crate::resilience::RetryConfig>,
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
    pub stale: Option<crate::resilience::StaleConfig>,
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
}

/// A config error with its place in the file.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    /// The config file.
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// 1-based column (in characters).
    pub col: usize,
    /// What is wrong and, where possible, what to do.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.col,
            self.message
        )
    }
}

/// Turns a byte offset into a 1-based line and column.
fn line_col(source: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(source.len());
    let before = source.get(..offset).unwrap_or(source);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before[line_start..].chars().count() + 1;
    (line, col)
}

/// One step of a key path in the file: a table key or an array index.
#[derive(Debug, Clone, Copy)]
enum Seg<'k> {
    Key(&'k str),
    Index(usize),
}

impl<'k> From<&'k str> for Seg<'k> {
    fn from(key: &'k str) -> Self {
        Seg::Key(key)
    }
}

impl From<usize> for Seg<'_> {
    fn from(index: usize) -> Self {
        Seg::Index(index)
    }
}

/// A key path, as `at!["routes", 0, "idempotency", "ttl"]`.
macro_rules! at {
    ($($seg:expr),+ $(,)?) => {
        &[$(Seg::from($seg)),+]
    };
}

/// Collects semantic errors with their spans.
struct Checker<'a> {
    file: &'a Path,
    source: &'a str,
    /// The document as parsed, to find where a key was written.
    doc: &'a DeTable<'a>,
    errors: Vec<ConfigError>,
}

impl Checker<'_> {
    fn error(&mut self, span: Range<usize>, message: impl Into<String>) {
        let (line, col) = line_col(self.source, span.start);
        self.errors.push(ConfigError {
            file: self.file.to_owned(),
            line,
            col,
            message: message.into(),
        });
    }

    /// The value written at `path`, if it is written.
    fn value(&self, path: &[Seg<'_>]) -> Option<&Spanned<DeValue<'_>>> {
        let mut value: Option<&Spanned<DeValue<'_>>> = None;
        for seg in path {
            value = match (seg, value.map(Spanned::get_ref)) {
                (Seg::Key(key), None) => self.doc.get(*key),
                (Seg::Key(key), Some(DeValue::Table(table))) => table.get(*key),
                (Seg::Index(i), Some(DeValue::Array(array))) => array.get(*i),
                _ => None,
            };
            value?;
        }
        value
    }

    /// Where the value at `path` is written. A key left out (its default
    /// is in use) points at the nearest table on its path that is written,
    /// or at the start of the file.
    fn span(&self, path: &[Seg<'_>]) -> Range<usize> {
        (0..=path.len())
            .rev()
            .find_map(|n| self.value(&path[..n]).map(Spanned::span))
            .unwrap_or(0..0)
    }

    /// Whether `path` is written in the file.
    fn written(&self, path: &[Seg<'_>]) -> bool {
        self.value(path).is_some()
    }

    /// An error at the value written at `path`.
    fn error_at(&mut self, path: &[Seg<'_>], message: impl Into<String>) {
        let span = self.span(path);
        self.error(span, message);
    }

    /// The duration at `path` (named `name` in the message) must not be
    /// zero; `why` says what zero would do.
    fn above_zero(&mut self, path: &[Seg<'_>], name: &str, value: Duration, why: &str) {
        if value.is_zero() {
            self.error_at(path, format!("{name} must be above zero: {why}"));
        }
    }
}

/// Reads, parses and validates a config file.
pub fn load(file: &Path) -> Result<Config, Vec<ConfigError>> {
    let source = std::fs::read_to_string(file).map_err(|e| {
        vec![ConfigError {
            file: file.to_owned(),
            line: 1,
            col: 1,
            message: format!("cannot read the config file: {e}"),
        }]
    })?;
    parse(file, &source)
}

/// Parses and validates config text; `file` is only used in messages.
/// Never panics, whatever the text (fuzzed: `fuzz/`).
pub fn parse(file: &Path, source: &str) -> Result<Config, Vec<ConfigError>> {
    let syntax_error = |e: toml::de::Error| {
        let (line, col) = e.span().map_or((1, 1), |span| line_col(source, span.start));
        vec![ConfigError {
            file: file.to_owned(),
            line,
            col,
            message: e.message().trim().to_owned(),
        }]
    };
    let doc = DeTable::parse(source).map_err(syntax_error)?;
    let config =
        Config::deserialize(toml::de::Deserializer::from(doc.clone())).map_err(syntax_error)?;
    let mut checker = Checker {
        file,
        source,
        doc: doc.get_ref(),
        errors: Vec::new(),
    };
    validate(&config, &mut checker);
    if checker.errors.is_empty() {
        Ok(config)
    } else {
        Err(checker.errors)
    }
}

/// Most worker threads `server.workers` may ask for: far more than any
/// machine has cores, far fewer than would exhaust memory (each thread
/// reserves a stack, and the runtime per-thread queues).
pub const MAX_WORKERS: usize = 1024;

/// Bounds of `server.max_header_size`: hyper needs room for a request
/// line, and a head of a megabyte is an attack, not a request.
const HEADER_SIZE_RANGE: std::ops::RangeInclusive<u64> = 1024..=(1 << 20);

/// The methods routes may name: those of RFC 9110 and PATCH (RFC 5789).
const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

fn check_addr(c: &mut Checker<'_>, key: &str, value: &Spanned<String>) -> Option<SocketAddr> {
    let addr = value.get_ref().parse::<SocketAddr>().ok();
    if addr.is_none() {
        c.error(
            value.span(),
            format!(
                "{key} = {:?} is not an address; write IP:PORT such as \"127.0.0.1:8080\"",
                value.get_ref()
            ),
        );
    }
    addr
}

/// Whether two listeners would fight over one socket: the same port
/// (other than 0, "any free port") on the same address, or on an
/// unspecified address that covers the other (`0.0.0.0` covers IPv4,
/// `[::]` both families, as Linux binds it dual-stack).
fn addrs_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    if a.port() != b.port() || a.port() == 0 {
        return false;
    }
    let (a, b) = (a.ip().to_canonical(), b.ip().to_canonical());
    let covers = |x: std::net::IpAddr, y: std::net::IpAddr| {
        x.is_unspecified() && (x.is_ipv6() || y.is_ipv4())
    };
    a == b || covers(a, b) || covers(b, a)
}

fn check_method(c: &mut Checker<'_>, method: &Spanned<String>) {
    let text = method.get_ref();
    if METHODS.contains(&text.as_str()) {
        return;
    }
    let upper = text.to_ascii_uppercase();
    let message = if METHODS.contains(&upper.as_str()) {
        format!("{text:?} is not an HTTP method; write it in capitals: {upper:?}")
    } else {
        format!(
            "{text:?} is not an HTTP method; use one of {}",
            METHODS.join(", ")
        )
    };
    // A default (span 0..0) is always valid, so this is a written value.
    c.error(method.span(), message);
}

/// Checks an upstream endpoint URL; returns its scheme-less authority on success.
pub fn endpoint_authority(url: &str) -> Result<http::uri::Authority, String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a URL ({e}); write \"http://host:port\""))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(format!(
                "{url:?}: https upstreams are not supported yet; use http://"
            ));
        }
        _ => return Err(format!("{url:?}: write the URL as \"http://host:port\"")),
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!(
            "{url:?}: an endpoint is scheme, host and port only; the request path is kept as sent"
        ));
    }
    uri.authority()
        .cloned()
        .ok_or_else(|| format!("{url:?}: missing host"))
}

/// An error and its causes, `: `-separated.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// What is wrong with a Redis URL, as the store opens it
/// (`redis::Client::open` parses without connecting), as a predicate for
/// "store.url ..."; never repeats the URL, which may hold a password.
fn redis_url_error(url: &str) -> Option<String> {
    if url.starts_with("rediss://") {
        return Some(
            "uses TLS (rediss://), which this build does not support; use redis://".to_owned(),
        );
    }
    if !url.starts_with("redis://") {
        return Some("must start with redis://".to_owned());
    }
    let error = redis::Client::open(url).err()?;
    Some(format!(
        "is not a Redis URL the store can open ({})",
        redis_reason(&error)
    ))
}

/// A Redis error without the " - InvalidClientConfig" its text carries.
fn redis_reason(error: &redis::RedisError) -> String {
    chain(error).replace(&format!(" - {:?}", error.kind()), "")
}

/// What is wrong with a PostgreSQL URL, as the store opens it:
/// `tokio_postgres::Config` parses it, and connecting needs a host and as
/// many ports as hosts (or one).
fn postgres_url_error(url: &str) -> Option<String> {
    if !["postgres://", "postgresql://"]
        .iter()
        .any(|s| url.starts_with(s))
    {
        return Some("must start with postgres:// or postgresql://".to_owned());
    }
    let problem = match url.parse::<tokio_postgres::Config>() {
        Err(e) => chain(&e),
        Ok(config) => {
            let hosts = config.get_hosts().len().max(config.get_hostaddrs().len());
            let ports = config.get_ports().len();
            if hosts == 0 {
                "it names no host".to_owned()
            } else if ports > 1 && ports != hosts {
                format!("it names {hosts} hosts but {ports} ports")
            } else {
                return None;
            }
        }
    };
    Some(format!(
        "is not a PostgreSQL URL the store can open ({problem})"
    ))
}

/// The rule `RedisStore` holds key prefixes to.
fn redis_prefix_ok(prefix: &str) -> bool {
    !prefix.is_empty()
        && prefix.len() <= 64
        && prefix
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'{' && b != b'}')
}

fn validate(config: &Config, c: &mut Checker<'_>) {
    validate_server(config, c);
    validate_store(&config.store, c);
    validate_upstreams(config, c);
    validate_routes(config, c);
    validate_drain(&config.drain, c);
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&config.log.level) {
        c.error_at(
            at!["log", "level"],
            format!(
                "log.level {:?} is not a log filter ({e}); write a level such as \"info\" or directives such as \"keel=debug,info\"",
                config.log.level
            ),
        );
    }
}

fn validate_server(config: &Config, c: &mut Checker<'_>) {
    let server = &config.server;
    let listen = check_addr(c, "listen", &server.listen);
    if let Some(admin) = &server.admin_listen
        && let Some(admin_addr) = check_addr(c, "admin_listen", admin)
        && let Some(listen) = listen
        && addrs_overlap(admin_addr, listen)
    {
        c.error(
            admin.span(),
            format!(
                "admin_listen {:?} takes the same port as listen {:?}; give the admin API a port of its own",
                admin.get_ref(),
                server.listen.get_ref()
            ),
        );
    }
    if server.workers > MAX_WORKERS {
        c.error_at(
            at!["server", "workers"],
            format!(
                "server.workers = {} is too many; use at most {MAX_WORKERS}, or 0 for one per core",
                server.workers
            ),
        );
    }
    c.above_zero(
        at!["server", "idle_timeout"],
        "server.idle_timeout",
        server.idle_timeout.get_ref().0,
        "\"0s\" closes every connection before its request is read (the default is \"60s\")",
    );
    for (key, timeout, why) in [
        (
            "header_read_timeout",
            &server.header_read_timeout,
            "\"0s\" closes every connection before its request head is read (the default is \"10s\")",
        ),
        (
            "http2_keep_alive_interval",
            &server.http2_keep_alive_interval,
            "it is how often an idle HTTP/2 connection is pinged",
        ),
        (
            "http2_keep_alive_timeout",
            &server.http2_keep_alive_timeout,
            "\"0s\" would drop every HTTP/2 connection at its first ping",
        ),
    ] {
        c.above_zero(
            at!["server", key],
            &format!("server.{key}"),
            timeout.get_ref().0,
            why,
        );
    }
    if *server.admin_max_connections.get_ref() == 0 {
        c.error(
            server.admin_max_connections.span(),
            "server.admin_max_connections must be at least 1",
        );
    }
    if !HEADER_SIZE_RANGE.contains(&server.max_header_size.0) {
        c.error_at(
            at!["server", "max_header_size"],
            "server.max_header_size must be between 1KiB and 1MiB (the default is \"16KiB\")",
        );
    }
    let budget = server.buffer_budget.get_ref().0;
    let largest_keyed_body = config
        .routes
        .iter()
        .filter_map(|r| r.idempotency.as_ref().filter(|i| i.enabled))
        .map(|i| i.max_body.0)
        .max();
    if let Some(largest) = largest_keyed_body
        && budget <= largest
    {
        c.error(
            server.buffer_budget.span(),
            format!(
                "server.buffer_budget ({budget} bytes) must be above the largest idempotent route's max_body ({largest} bytes), or every such body is refused"
            ),
        );
    }
}

fn validate_store(store: &StoreConfig, c: &mut Checker<'_>) {
    let kind = *store.kind.get_ref();
    if let Some(durable) = &store.durable_claims
        && kind != StoreKind::Embedded
    {
        c.error(
            durable.span(),
            "store.durable_claims is only used by kind = \"embedded\"; remove it",
        );
    }
    if let Some(path) = &store.path {
        if kind != StoreKind::Embedded {
            c.error_at(
                at!["store", "path"],
                "store.path is only used by kind = \"embedded\"; remove it",
            );
        } else if path.trim().is_empty() {
            c.error_at(
                at!["store", "path"],
                "store.path is empty; name a directory such as \"keel-data\"",
            );
        }
    }
    let memory_limits = [
        ("max_bytes", &store.max_bytes),
        ("max_bytes_per_tenant", &store.max_bytes_per_tenant),
    ];
    for (key, limit) in memory_limits {
        // A span of 0..0 is the default: only a value written in the file
        // is questioned.
        let written = limit.span() != (0..0);
        if written && kind != StoreKind::Memory {
            c.error(
                limit.span(),
                format!("store.{key} is only used by kind = \"memory\"; remove it"),
            );
        } else if limit.get_ref().0 < 1024 {
            c.error(limit.span(), format!("store.{key} must be at least 1KiB"));
        }
    }
    if store.max_bytes_per_tenant.get_ref().0 > store.max_bytes.get_ref().0 {
        c.error(
            store.max_bytes_per_tenant.span(),
            "store.max_bytes_per_tenant cannot be above store.max_bytes",
        );
    }
    c.above_zero(
        at!["store", "timeout"],
        "store.timeout",
        store.timeout.0,
        "no store operation could finish (the default is \"2s\")",
    );
    if kind == StoreKind::Redis && !redis_prefix_ok(&store.prefix) {
        c.error_at(
            at!["store", "prefix"],
            format!(
                "store.prefix {:?} cannot prefix Redis keys; use 1 to 64 printable ASCII characters without spaces, '{{' or '}}'",
                store.prefix
            ),
        );
    }
    if let Some(nodes) = &store.cluster_nodes {
        if kind != StoreKind::Redis {
            c.error(
                nodes.span(),
                "store.cluster_nodes is only used by kind = \"redis\"; remove it",
            );
        } else if let Some(url) = &store.url {
            c.error(
                url.span(),
                "give either store.url (one Redis server) or store.cluster_nodes (a Redis Cluster), not both",
            );
        } else if nodes.get_ref().is_empty() {
            c.error(nodes.span(), "store.cluster_nodes needs at least one node");
        }
        let mut all_ok = true;
        for node in nodes.get_ref() {
            if let Some(problem) = redis_url_error(node.get_ref()) {
                all_ok = false;
                c.error(
                    node.span(),
                    format!("a cluster node {problem}; write \"redis://HOST:PORT/\""),
                );
            }
        }
        if all_ok
            && kind == StoreKind::Redis
            && !nodes.get_ref().is_empty()
            && let Err(e) = redis::cluster::ClusterClientBuilder::new(
                nodes.get_ref().iter().map(|n| n.get_ref().as_str()),
            )
            .build()
        {
            c.error(
                nodes.span(),
                format!(
                    "store.cluster_nodes do not make one cluster client ({}); give every node the same user and password, and no database number",
                    redis_reason(&e)
                ),
            );
        }
    }
    match kind {
        StoreKind::Memory | StoreKind::Embedded => {
            if let Some(url) = &store.url {
                c.error(
                    url.span(),
                    "store.url is only used by kind = \"redis\" or \"postgres\"; remove it",
                );
            }
        }
        // A cluster's nodes stand in for the URL (checked above).
        StoreKind::Redis if store.cluster_nodes.is_some() => {}
        StoreKind::Redis | StoreKind::Postgres => {
            let (problem, example) = if kind == StoreKind::Redis {
                (
                    store.url.as_ref().map(|u| redis_url_error(u.get_ref())),
                    "redis://[:PASSWORD@]HOST:PORT/[DB]",
                )
            } else {
                (
                    store.url.as_ref().map(|u| postgres_url_error(u.get_ref())),
                    "postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE",
                )
            };
            match (&store.url, problem.flatten()) {
                (None, _) => c.error(
                    store.kind.span(),
                    format!("this store kind needs url = \"{example}\""),
                ),
                (Some(url), Some(problem)) => c.error(
                    url.span(),
                    format!("store.url {problem}; write \"{example}\""),
                ),
                (Some(_), None) => {}
            }
        }
    }
}

fn validate_upstreams(config: &Config, c: &mut Checker<'_>) {
    for (name, upstream) in &config.upstreams {
        let name = name.as_str();
        if upstream.endpoints.get_ref().is_empty() {
            c.error(
                upstream.endpoints.span(),
                format!(
                    "upstream {name:?} has no endpoints; list at least one \"http://host:port\""
                ),
            );
        }
        for endpoint in upstream.endpoints.get_ref() {
            if let Err(message) = endpoint_authority(endpoint.get_ref()) {
                c.error(endpoint.span(), message);
            }
        }
        for (key, message) in crate::resilience::validate_upstream(
            name,
            upstream.breaker.as_ref(),
            upstream.health_check.as_ref(),
            upstream.retry.as_ref(),
        ) {
            let mut path = vec![Seg::Key("upstreams"), Seg::Key(name)];
            path.extend(key.iter().map(|k| Seg::Key(k)));
            c.error_at(&path, message);
        }
        c.above_zero(
            at!["upstreams", name, "connect_timeout"],
            &format!("upstreams.{name}.connect_timeout"),
            upstream.connect_timeout.0,
            "no connection could be made (the default is \"2s\")",
        );
        c.above_zero(
            at!["upstreams", name, "request_timeout"],
            &format!("upstreams.{name}.request_timeout"),
            upstream.request_timeout.0,
            "every request would time out (the default is \"30s\")",
        );
    }
}

fn validate_routes(config: &Config, c: &mut Checker<'_>) {
    if config.routes.is_empty() {
        c.error(0..0, "no [[routes]]: add at least one route");
    }
    let mut seen: Vec<(&str, Option<String>)> = Vec::new();
    for (i, route) in config.routes.iter().enumerate() {
        let prefix = route.path_prefix.get_ref();
        if !prefix.starts_with('/') {
            c.error(
                route.path_prefix.span(),
                format!("path_prefix {prefix:?} must start with \"/\""),
            );
        }
        if let Some(host) = &route.host {
            let bare = host
                .parse::<http::uri::Authority>()
                .ok()
                .filter(|a| a.port().is_none() && a.as_str() == a.host() && !a.host().is_empty());
            if bare.is_none() {
                c.error_at(
                    at!["routes", i, "host"],
                    format!(
                        "routes.host {host:?} is not a host name; write the name alone, without scheme, port or path, such as \"api.example.com\""
                    ),
                );
            }
        }
        let host = route.host.as_ref().map(|h| h.to_ascii_lowercase());
        if route.methods.is_none() && seen.iter().any(|(p, h)| *p == prefix && *h == host) {
            c.error(
                route.path_prefix.span(),
                format!("another route already has path_prefix {prefix:?} for the same host"),
            );
        }
        seen.push((prefix, host));
        if !config.upstreams.contains_key(route.upstream.get_ref()) {
            let known: Vec<&str> = config.upstreams.keys().map(String::as_str).collect();
            c.error(
                route.upstream.span(),
                format!(
                    "unknown upstream {:?}; defined upstreams: [{}]",
                    route.upstream.get_ref(),
                    known.join(", ")
                ),
            );
        }
        for method in route.methods.iter().flatten() {
            check_method(c, method);
        }
        if let Some(idem) = &route.idempotency {
            for method in &idem.methods {
                check_method(c, method);
            }
            c.above_zero(
                at!["routes", i, "idempotency", "ttl"],
                "routes.idempotency.ttl",
                idem.ttl.0,
                "a result would be forgotten as soon as it is stored (the default is \"24h\")",
            );
            if let Some(lease) = &idem.lease {
                c.above_zero(
                    at!["routes", i, "idempotency", "lease"],
                    "routes.idempotency.lease",
                    lease.0,
                    "every claim would lapse at once; leave it out for the upstream's request_timeout plus a margin",
                );
            }
            if http::HeaderName::from_bytes(idem.tenant_header.get_ref().as_bytes()).is_err() {
                c.error(
                    idem.tenant_header.span(),
                    format!(
                        "tenant_header {:?} is not a valid header name",
                        idem.tenant_header.get_ref()
                    ),
                );
            }
        }
        if let Some(stale) = route.stale.as_ref().filter(|s| s.enabled) {
            c.above_zero(
                at!["routes", i, "stale", "max_age"],
                "routes.stale.max_age",
                stale.max_age.0,
                "nothing kept could ever be served (the default is \"5m\")",
            );
            if stale.max_entry_size.0 > stale.max_bytes.0 {
                c.error_at(
                    at!["routes", i, "stale", "max_entry_size"],
                    "routes.stale.max_entry_size cannot be above routes.stale.max_bytes",
                );
            }
        }
    }
}

fn validate_drain(drain: &DrainConfig, c: &mut Checker<'_>) {
    if drain.batch_size == 0 {
        c.error_at(
            at!["drain", "batch_size"],
            "drain.batch_size must be at least 1",
        );
    }
    if !(drain.percent > 0.0 && drain.percent <= 100.0) {
        c.error_at(
            at!["drain", "percent"],
            "drain.percent must be above 0 and at most 100",
        );
    }
    c.above_zero(
        at!["drain", "deadline"],
        "drain.deadline",
        drain.deadline.0,
        "connections would be cut the moment the drain starts (the default is \"30s\")",
    );
    if !drain.deadline.0.is_zero() && drain.shutdown_delay.0 >= drain.deadline.0 {
        // Point at whichever of the two is written (the deadline when both).
        let key = if c.written(at!["drain", "deadline"]) {
            "deadline"
        } else {
            "shutdown_delay"
        };
        c.error_at(
            at!["drain", key],
            "drain.shutdown_delay must be shorter than drain.deadline (both count from the signal)",
        );
    }
    c.above_zero(
        at!["drain", "batch_interval"],
        "drain.batch_interval",
        drain.batch_interval.0,
        "write the time between two batches, such as \"2s\"",
    );
    c.above_zero(
        at!["drain", "gradual_over"],
        "drain.gradual_over",
        drain.gradual_over.0,
        "write the length of a gradual drain, such as \"20s\"",
    );
}

impl Config {
    /// The data-plane address (validated).
    pub fn listen_addr(&self) -> SocketAddr {
        self.server
            .listen
            .get_ref()
            .parse()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 8080)))
    }

    /// The admin address (validated), if any.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.server
            .admin_listen
            .as_ref()
            .and_then(|a| a.get_ref().parse().ok())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn load_balancing_prints_as_the_config_spells_it() {
        use serde::de::value::{Error, StrDeserializer};
        for lb in [
            super::LoadBalancing::LeastOutstanding,
            super::LoadBalancing::RoundRobin,
        ] {
            let parsed: super::LoadBalancing =
                serde::Deserialize::deserialize(StrDeserializer::<Error>::new(lb.as_str()))
                    .expect("the config's own spelling");
            assert_eq!(parsed, lb);
        }
    }

    use super::*;

    const GOOD: &str = r#"
[server]
listen = "127.0.0.1:8080"
admin_listen = "127.0.0.1:9901"

[store]
kind = "embedded"
path = "keel-data"

[upstreams.app]
endpoints = ["http://127.0.0.1:3000"]

[[routes]]
path_prefix = "/"
upstream = "app"

[routes.idempotency]
enabled = true
required = false
methods = ["POST", "PATCH"]
ttl = "24h"
tenant_header = "authorization"

[drain]
shutdown_delay = "5s"
batch_size = 10000
batch_interval = "2s"
deadline = "30s"
"#;

    #[test]
    fn durable_claims_is_an_embedded_store_setting() {
        let config = parse(Path::new("k.toml"), GOOD).expect("valid");
        assert!(config.store.durable_claims(), "on by default");
        let text = GOOD.replace(
            "path = \"keel-data\"",
            "path = \"keel-data\"\ndurable_claims = false",
        );
        let config = parse(Path::new("k.toml"), &text).expect("valid");
        assert!(!config.store.durable_claims());

        let text = GOOD.replace(
            "kind = \"embedded\"\npath = \"keel-data\"",
            "kind = \"redis\"\nurl = \"redis://127.0.0.1/\"\ndurable_claims = false",
        );
        let errs = errors(&text);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with("k.toml:9:18: store.durable_claims is only used by kind"),
            "{errs:?}"
        );
    }

    fn errors(text: &str) -> Vec<String> {
        match parse(Path::new("k.toml"), text) {
            Ok(_) => Vec::new(),
            Err(errors) => errors.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn contract_example_parses() {
        let config = parse(Path::new("k.toml"), GOOD).expect("valid");
        assert_eq!(*config.store.kind.get_ref(), StoreKind::Embedded);
        let idem = config.routes[0].idempotency.as_ref().expect("idempotency");
        assert!(idem.enabled);
        assert_eq!(idem.ttl.0, Duration::from_secs(86_400));
        assert_eq!(config.drain.batch_interval.0, Duration::from_secs(2));
        assert_eq!(
            config.upstreams["app"].load_balancing,
            LoadBalancing::LeastOutstanding
        );
    }

    #[test]
    fn unknown_key_points_at_the_key() {
        let text = GOOD.replace("admin_listen", "admin_lsten");
        let errs = errors(&text);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with("k.toml:4:1: unknown field `admin_lsten`"),
            "{errs:?}"
        );
    }

    #[test]
    fn unknown_upstream_points_at_the_value() {
        let text = GOOD.replace("upstream = \"app\"", "upstream = \"nope\"");
        let errs = errors(&text);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with("k.toml:15:12: unknown upstream \"nope\""),
            "{errs:?}"
        );
    }

    #[test]
    fn bad_duration_and_size() {
        let text = GOOD.replace("ttl = \"24h\"", "ttl = \"24 hours\"");
        let errs = errors(&text);
        assert!(errs[0].starts_with("k.toml:21:7:"), "{errs:?}");
        assert!(errs[0].contains("no spaces allowed"), "{errs:?}");
        let text = GOOD.replace("ttl = \"24h\"", "ttl = \"24hours\"");
        assert!(errors(&text)[0].contains("unknown unit"));
        let text = GOOD.replace(
            "admin_listen = \"127.0.0.1:9901\"",
            "max_body_size = \"ten\"",
        );
        let errs = errors(&text);
        assert!(errs[0].starts_with("k.toml:4:17:"), "{errs:?}");
    }

    #[test]
    fn semantic_checks() {
        let text = GOOD.replace("http://127.0.0.1:3000", "https://x:1");
        assert!(errors(&text)[0].contains("https upstreams are not supported"));
        let text = GOOD.replace("path_prefix = \"/\"", "path_prefix = \"api\"");
        assert!(errors(&text)[0].contains("must start with"));
        let text = GOOD.replace(
            "kind = \"embedded\"\npath = \"keel-data\"",
            "kind = \"redis\"",
        );
        assert!(errors(&text)[0].contains("needs url"));
        let text = GOOD.replace("\"POST\", \"PATCH\"", "\"post\"");
        assert!(errors(&text)[0].contains("not an HTTP method"));
        let text = GOOD.replace("127.0.0.1:8080", "localhost");
        assert!(errors(&text)[0].starts_with("k.toml:3:10: listen = \"localhost\""));
        let text = GOOD.replace("kind = \"embedded\"", "kind = \"sqlite\"");
        assert!(
            errors(&text)[0].starts_with("k.toml:7:8:"),
            "{:?}",
            errors(&text)
        );
        assert!(errors("[server\n").len() == 1);
    }

    /// One error, starting with `want` (`LINE:COL: message`).
    #[track_caller]
    fn assert_error(text: &str, want: &str) {
        let errs = errors(text);
        assert_eq!(errs.len(), 1, "{errs:?}\n---\n{text}");
        assert!(
            errs[0].starts_with(&format!("k.toml:{want}")),
            "want k.toml:{want}\ngot  {}\n---\n{text}",
            errs[0]
        );
    }

    #[test]
    fn errors_point_at_the_key_even_inside_nested_tables() {
        let drain = |extra: &str| GOOD.replace("deadline = \"30s\"", extra);
        assert_error(
            &drain("deadline = \"30s\"\nstrategy = \"percent\"\npercent = 0.0"),
            "30:11: drain.percent must be above 0",
        );
        assert_error(
            &drain("deadline = \"3s\""),
            "28:12: drain.shutdown_delay must be shorter than drain.deadline",
        );
        // Only shutdown_delay is written (deadline is the default 30s).
        assert_error(
            &GOOD
                .replace("deadline = \"30s\"", "")
                .replace("shutdown_delay = \"5s\"", "shutdown_delay = \"40s\""),
            "25:18: drain.shutdown_delay must be shorter",
        );
        assert_error(
            &GOOD.replace("batch_interval = \"2s\"", "batch_interval = \"0s\""),
            "27:18: drain.batch_interval must be above zero",
        );
        assert_error(
            &GOOD.replace("batch_size = 10000", "batch_size = 0"),
            "26:14: drain.batch_size must be at least 1",
        );
        assert_error(
            &GOOD.replace("ttl = \"24h\"", "ttl = \"0s\""),
            "21:7: routes.idempotency.ttl must be above zero",
        );
        // A dotted key at the top level points at its value too.
        let without_drain = &GOOD[..GOOD.find("[drain]").expect("drain")];
        assert_error(
            &format!("drain.percent = 101.0{without_drain}"),
            "1:17: drain.percent must be above 0",
        );
    }

    #[test]
    fn a_key_left_out_points_at_its_table() {
        let checker_errors = |text: &str, path: &[Seg<'_>]| {
            let doc = DeTable::parse(text).expect("toml");
            let c = Checker {
                file: Path::new("k.toml"),
                source: text,
                doc: doc.get_ref(),
                errors: Vec::new(),
            };
            line_col(text, c.span(path).start)
        };
        let text = "[server]\nlisten = \"x\"\n\n[[routes]]\na = 1\n[[routes]]\nb = 2\n";
        assert_eq!(checker_errors(text, at!["server", "listen"]), (2, 10));
        assert_eq!(checker_errors(text, at!["routes", 1, "b"]), (7, 5));
        // Absent key: its table (the header of the second [[routes]]).
        let (line, _) = checker_errors(text, at!["routes", 1, "idempotency", "ttl"]);
        assert!(line == 6 || line == 7, "{line}");
        assert_eq!(checker_errors(text, at!["drain", "percent"]), (1, 1));
    }

    #[test]
    fn store_urls_are_parsed_as_the_stores_parse_them() {
        let store = |body: &str| {
            GOOD.replace(
                "kind = \"embedded\"\npath = \"keel-data\"",
                &format!("kind = {body}"),
            )
        };
        assert_error(
            &store("\"redis\"\nurl = \"redis://:pw@[::1\""),
            "8:7: store.url is not a Redis URL the store can open (Redis URL did not parse); write \"redis://",
        );
        assert!(
            errors(&store("\"redis\"\nurl = \"redis://:pw@[::1\""))[0].contains("write \"redis://")
        );
        assert!(!errors(&store("\"redis\"\nurl = \"redis://:pw@[::1\""))[0].contains("pw"));
        assert_error(
            &store("\"redis\"\nurl = \"rediss://h:6379/\""),
            "8:7: store.url uses TLS (rediss://), which this build does not support",
        );
        assert_error(
            &store("\"redis\"\nurl = \"redis://h:6379/\"\nprefix = \"a{b\""),
            "9:10: store.prefix \"a{b\" cannot prefix Redis keys",
        );
        assert!(errors(&store("\"redis\"\nurl = \"redis://h:6379/2\"")).is_empty());
        assert_error(
            &store("\"postgres\"\nurl = \"postgres://u@h:notaport/db\""),
            "8:7: store.url is not a PostgreSQL URL the store can open (invalid connection string: invalid value for option `port`)",
        );
        assert_error(
            &store("\"postgres\"\nurl = \"postgres:///db\""),
            "8:7: store.url is not a PostgreSQL URL the store can open (it names no host)",
        );
        assert!(errors(&store("\"postgres\"\nurl = \"postgresql://u:p@h1,h2/db\"")).is_empty());
        assert_error(
            &store("\"redis\"\ncluster_nodes = [\"redis://:p@a:1/\", \"redis://:q@b:2/\"]"),
            "8:17: store.cluster_nodes do not make one cluster client (Cannot use different password among initial nodes.); give every node",
        );
        assert_error(
            &store("\"redis\"\nurl = \"redis://h/\"\ntimeout = \"0s\""),
            "9:11: store.timeout must be above zero",
        );
        assert_error(
            &GOOD.replace("path = \"keel-data\"", "path = \"\""),
            "8:8: store.path is empty",
        );
        assert_error(
            &store("\"memory\"\npath = \"x\""),
            "8:8: store.path is only used by kind = \"embedded\"",
        );
    }

    #[test]
    fn listeners_must_not_share_a_socket() {
        let pair = |listen: &str, admin: &str| {
            GOOD.replace("127.0.0.1:8080", listen)
                .replace("127.0.0.1:9901", admin)
        };
        for (listen, admin) in [
            ("127.0.0.1:8080", "127.0.0.1:8080"),
            ("0.0.0.0:8080", "127.0.0.1:8080"),
            ("127.0.0.1:8080", "0.0.0.0:8080"),
            ("[::]:8080", "127.0.0.1:8080"),
            ("[::1]:8080", "[::]:8080"),
            ("[::ffff:127.0.0.1]:8080", "127.0.0.1:8080"),
        ] {
            assert_error(
                &pair(listen, admin),
                &format!(
                    "4:16: admin_listen \"{admin}\" takes the same port as listen \"{listen}\""
                ),
            );
        }
        for (listen, admin) in [
            ("127.0.0.1:8080", "127.0.0.2:8080"),
            ("0.0.0.0:8080", "[::1]:8080"),
            ("127.0.0.1:0", "127.0.0.1:0"),
            ("0.0.0.0:8080", "0.0.0.0:8081"),
        ] {
            assert!(errors(&pair(listen, admin)).is_empty(), "{listen} {admin}");
        }
    }

    #[test]
    fn resilience_errors_point_at_their_key() {
        let with = |table: &str| {
            GOOD.replace(
                "endpoints = [\"http://127.0.0.1:3000\"]",
                &format!("endpoints = [\"http://127.0.0.1:3000\"]\n{table}"),
            )
        };
        assert_error(
            &with("[upstreams.app.breaker]\nfailures = 0"),
            "13:12: upstreams.app.breaker.failures must be at least 1",
        );
        assert_error(
            &with("[upstreams.app.breaker]\nwindow = \"0s\""),
            "13:10: upstreams.app.breaker.window must be above zero",
        );
        assert_error(
            &with("[upstreams.app.breaker]\nprobe_timeout = \"0s\""),
            "13:17: upstreams.app.breaker.probe_timeout must be above zero",
        );
        assert_error(
            &with("[upstreams.app.health_check]\npath = \"/a b\""),
            "13:8: upstreams.app.health_check.path \"/a b\" must be a request path",
        );
        assert_error(
            &with("[upstreams.app.retry]\nstatuses = [503, 1000]"),
            "13:12: upstreams.app.retry.statuses: 1000 is not an HTTP status",
        );
        assert_error(
            &with("connect_timeout = \"0s\""),
            "12:19: upstreams.app.connect_timeout must be above zero",
        );
    }

    #[test]
    fn routes_checks() {
        assert_error(
            &GOOD.replace(
                "path_prefix = \"/\"",
                "path_prefix = \"/\"\nhost = \"a.example:80\"",
            ),
            "15:8: routes.host \"a.example:80\" is not a host name",
        );
        assert!(
            errors(&GOOD.replace(
                "path_prefix = \"/\"",
                "path_prefix = \"/\"\nhost = \"A.example\""
            ))
            .is_empty()
        );
        assert_error(
            &GOOD.replace("ttl = \"24h\"", "ttl = \"24h\"\nlease = \"0s\""),
            "22:9: routes.idempotency.lease must be above zero",
        );
        assert_error(
            &GOOD.replace("\"POST\", \"PATCH\"", "\"POST\", \"POTS\""),
            "20:20: \"POTS\" is not an HTTP method; use one of GET, HEAD, POST",
        );
        assert_error(
            &format!("{GOOD}\n[routes.stale]\nmax_age = \"0s\""),
            "31:11: routes.stale.max_age must be above zero",
        );
    }

    #[test]
    fn server_limits() {
        let server = |line: &str| {
            GOOD.replace(
                "admin_listen = \"127.0.0.1:9901\"",
                &format!("admin_listen = \"127.0.0.1:9901\"\n{line}"),
            )
        };
        assert_error(
            &server("workers = 100000000"),
            "5:11: server.workers = 100000000 is too many; use at most 1024",
        );
        assert!(errors(&server("workers = 1024")).is_empty());
        assert_error(
            &server("idle_timeout = \"0s\""),
            "5:16: server.idle_timeout must be above zero",
        );
        assert_error(
            &server("max_header_size = \"0B\""),
            "5:19: server.max_header_size must be between 1KiB and 1MiB",
        );
        assert_error(
            &server("max_header_size = \"2MiB\""),
            "5:19: server.max_header_size must be between 1KiB and 1MiB",
        );
        assert_error(
            &GOOD.replace("[drain]", "[log]\nlevel = \"keel=loud\"\n[drain]"),
            "25:9: log.level \"keel=loud\" is not a log filter",
        );
    }

    #[test]
    fn server_timeouts_have_defaults_and_must_be_above_zero() {
        let config = parse(Path::new("k.toml"), GOOD).expect("valid");
        let server = &config.server;
        assert_eq!(server.idle_timeout.get_ref().0, Duration::from_secs(60));
        assert_eq!(
            server.header_read_timeout.get_ref().0,
            Duration::from_secs(10)
        );
        assert_eq!(
            server.http2_keep_alive_interval.get_ref().0,
            Duration::from_secs(30)
        );
        assert_eq!(
            server.http2_keep_alive_timeout.get_ref().0,
            Duration::from_secs(15)
        );
        assert_eq!(*server.admin_max_connections.get_ref(), 64);

        let text = GOOD.replace(
            "admin_listen = \"127.0.0.1:9901\"",
            "admin_listen = \"127.0.0.1:9901\"\nheader_read_timeout = \"2s\"\nhttp2_keep_alive_interval = \"5s\"\nhttp2_keep_alive_timeout = \"3s\"\nadmin_max_connections = 8",
        );
        let config = parse(Path::new("k.toml"), &text).expect("valid");
        assert_eq!(
            config.server.header_read_timeout.get_ref().0,
            Duration::from_secs(2)
        );
        assert_eq!(*config.server.admin_max_connections.get_ref(), 8);

        for key in [
            "idle_timeout",
            "header_read_timeout",
            "http2_keep_alive_interval",
            "http2_keep_alive_timeout",
        ] {
            let text = GOOD.replace(
                "admin_listen = \"127.0.0.1:9901\"",
                &format!("admin_listen = \"127.0.0.1:9901\"\n{key} = \"0s\""),
            );
            let errs = errors(&text);
            assert_eq!(errs.len(), 1, "{errs:?}");
            let at = format!(
                "k.toml:5:{}: server.{key} must be above zero",
                key.len() + 4
            );
            assert!(errs[0].starts_with(&at), "{errs:?}");
        }
        let text = GOOD.replace(
            "admin_listen = \"127.0.0.1:9901\"",
            "admin_listen = \"127.0.0.1:9901\"\nadmin_max_connections = 0",
        );
        let errs = errors(&text);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with("k.toml:5:25: server.admin_max_connections must be at least 1"),
            "{errs:?}"
        );
    }

    #[test]
    fn line_col_counts_characters() {
        assert_eq!(line_col("ab\ncdé f", 8), (2, 5));
        assert_eq!(line_col("", 10), (1, 1));
    }

    /// The parser never panics, and what it accepts is within the bounds
    /// `serve` needs: thousands of random and mutated documents on stable
    /// (the `fuzz/` target does the same with coverage guidance).
    mod no_panic {
        use super::*;
        use proptest::prelude::*;

        const SEEDS: [&str; 4] = [
            GOOD,
            include_str!("../../../examples/keel-embedded.toml"),
            include_str!("../../../examples/keel-redis.toml"),
            include_str!("../../../examples/keel-postgres.toml"),
        ];

        /// Pieces of TOML and of bad values to splice in.
        const SNIPPETS: &[&str] = &[
            "\n",
            " ",
            "=",
            "\"",
            "'",
            "[",
            "]",
            "{",
            "}",
            ",",
            ".",
            "#",
            "\\",
            "é",
            "\u{0}",
            "\r\n",
            "'''",
            "\"\"\"",
            "[[routes]]\n",
            "[drain]\n",
            "[store]\n",
            "[server]\n",
            "[log]\n",
            "[upstreams.app]\n",
            "[upstreams.app.breaker]\n",
            "[upstreams.app.retry]\n",
            "[upstreams.app.health_check]\n",
            "[routes.idempotency]\n",
            "[routes.stale]\n",
            "0",
            "-1",
            "1.5",
            "nan",
            "-inf",
            "1e400",
            "99999999999999999999",
            "true",
            "1979-05-27T07:32:00Z",
            "\"0s\"",
            "\"30 s\"",
            "\"365d\"",
            "\"366d\"",
            "\"0B\"",
            "\"1GiB\"",
            "\"POTS\"",
            "\"get\"",
            "\"redis://:pw@[::1\"",
            "\"postgres:///db\"",
            "\"127.0.0.1:8080\"",
            "\"0.0.0.0:8080\"",
            "\"[::]:9901\"",
            "kind = \"redis\"\n",
            "kind = \"postgres\"\n",
            "kind = \"memory\"\n",
            "url = ",
            "cluster_nodes = [\"redis://a:1/\"]\n",
            "workers = ",
            "percent = ",
            "deadline = ",
            "ttl = ",
            "lease = ",
            "methods = ",
            "host = ",
            "level = ",
            "prefix = ",
            "path = ",
            "failures = ",
            "statuses = ",
            "max_header_size = ",
            "admin_listen = ",
            "enabled = true\n",
            "[]",
            "[\"\"]",
        ];

        fn boundary(text: &str, at: usize) -> usize {
            let mut at = at % (text.len() + 1);
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            at
        }

        /// `seed` with `edits` (position, length, snippet, kind) applied.
        fn mutate(seed: &str, edits: &[(usize, usize, usize, u8)]) -> String {
            let mut text = seed.to_owned();
            for &(pos, len, snippet, kind) in edits {
                let start = boundary(&text, pos);
                let end = boundary(&text, start + len % 24).max(start);
                let snippet = SNIPPETS[snippet % SNIPPETS.len()];
                match kind % 3 {
                    0 => text.replace_range(start..end, ""),
                    1 => text.insert_str(start, snippet),
                    _ => text.replace_range(start..end, snippet),
                }
            }
            text
        }

        /// Parses `text`; checks the errors' places and, when accepted, the
        /// bounds `serve` relies on.
        fn check(text: &str) {
            match parse(Path::new("f.toml"), text) {
                Err(errors) => {
                    assert!(!errors.is_empty());
                    let lines = text.split('\n').count();
                    for e in &errors {
                        assert!(e.line >= 1 && e.line <= lines && e.col >= 1, "{e}");
                        assert!(!e.message.is_empty());
                    }
                }
                Ok(config) => {
                    assert!(config.server.workers <= MAX_WORKERS);
                    assert!(!config.server.idle_timeout.get_ref().0.is_zero());
                    assert!(HEADER_SIZE_RANGE.contains(&config.server.max_header_size.0));
                    assert!(!config.store.timeout.0.is_zero());
                    assert!(!config.routes.is_empty());
                    assert!(config.drain.shutdown_delay.0 < config.drain.deadline.0);
                    if let Some(admin) = config.admin_addr() {
                        assert!(!addrs_overlap(admin, config.listen_addr()));
                    }
                    for upstream in config.upstreams.values() {
                        assert!(!upstream.request_timeout.0.is_zero());
                        assert!(!upstream.connect_timeout.0.is_zero());
                    }
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn mutated_configs(
                seed in 0..SEEDS.len(),
                edits in prop::collection::vec(
                    (any::<usize>(), any::<usize>(), any::<usize>(), any::<u8>()),
                    1..6,
                ),
            ) {
                check(&mutate(SEEDS[seed], &edits));
            }

            #[test]
            fn arbitrary_text(text in any::<String>()) {
                check(&text);
            }

            #[test]
            fn spliced_snippets(pieces in prop::collection::vec(0..SNIPPETS.len(), 0..40)) {
                let text: String = pieces.iter().map(|&i| SNIPPETS[i]).collect();
                check(&text);
            }
        }
    }
}
