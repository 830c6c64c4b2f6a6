//! The resilience keys of an upstream (`[upstreams.NAME.breaker]`,
//! `.health_check`, `.retry`) and of a route (`[routes.stale]`), with their
//! defaults and checks.

use std::time::Duration;

use serde::Deserialize;

use crate::units::{ConfigDuration, ConfigSize};

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

/// Checks the resilience keys of one upstream. Each error comes with the
/// path of its key within `[upstreams.NAME]` (such as `["breaker",
/// "failures"]`), so `keel check` can point at it; messages name the key.
pub fn validate_upstream(
    name: &str,
    breaker: Option<&BreakerConfig>,
    health: Option<&HealthCheckConfig>,
    retry: Option<&RetryConfig>,
) -> Vec<(&'static [&'static str], String)> {
    let mut errors: Vec<(&'static [&'static str], String)> = Vec::new();
    let mut above_zero = |key: &'static [&'static str], value: Duration| {
        if value.is_zero() {
            errors.push((
                key,
                format!("upstreams.{name}.{} must be above zero", key.join(".")),
            ));
        }
    };
    if let Some(b) = breaker {
        above_zero(&["breaker", "window"], b.window.0);
        above_zero(&["breaker", "open_duration"], b.open_duration.0);
        above_zero(&["breaker", "probe_timeout"], b.probe_timeout.0);
        if b.gradual_recovery {
            above_zero(&["breaker", "recovery_step"], b.recovery_step.0);
        }
    }
    if let Some(h) = health {
        above_zero(&["health_check", "interval"], h.interval.0);
        above_zero(&["health_check", "timeout"], h.timeout.0);
    }
    if let Some(b) = breaker {
        if b.failures == 0 {
            errors.push((
                &["breaker", "failures"],
                format!("upstreams.{name}.breaker.failures must be at least 1"),
            ));
        }
        if b.half_open_probes == 0 {
            errors.push((
                &["breaker", "half_open_probes"],
                format!("upstreams.{name}.breaker.half_open_probes must be at least 1"),
            ));
        }
        let rate_ok = |r: f64| r > 0.0 && r <= 1.0;
        if b.failure_rate.is_some_and(|r| !rate_ok(r)) {
            errors.push((
                &["breaker", "failure_rate"],
                format!(
                    "upstreams.{name}.breaker.failure_rate is a share: above 0 and at most 1 (0.5 is half the calls)"
                ),
            ));
        }
        if !rate_ok(b.upstream_failure_rate) {
            errors.push((
                &["breaker", "upstream_failure_rate"],
                format!(
                    "upstreams.{name}.breaker.upstream_failure_rate is a share: above 0 and at most 1 (0.5 is half the requests)"
                ),
            ));
        }
        if let Some(bad) = b
            .failure_statuses
            .iter()
            .find(|s| !(100..=599).contains(*s))
        {
            errors.push((
                &["breaker", "failure_statuses"],
                format!(
                    "upstreams.{name}.breaker.failure_statuses: {bad} is not an HTTP status (100 to 599)"
                ),
            ));
        }
    }
    if let Some(h) = health {
        let path_ok = h.path.starts_with('/')
            && h.path.parse::<http::uri::PathAndQuery>().is_ok()
            && http::Request::get(h.path.as_str()).body(()).is_ok();
        if !path_ok {
            errors.push((
                &["health_check", "path"],
                format!(
                    "upstreams.{name}.health_check.path {:?} must be a request path starting with \"/\", such as \"/healthz\"",
                    h.path
                ),
            ));
        }
        if h.healthy_threshold == 0 {
            errors.push((
                &["health_check", "healthy_threshold"],
                format!("upstreams.{name}.health_check.healthy_threshold must be at least 1"),
            ));
        }
        if h.unhealthy_threshold == 0 {
            errors.push((
                &["health_check", "unhealthy_threshold"],
                format!("upstreams.{name}.health_check.unhealthy_threshold must be at least 1"),
            ));
        }
    }
    if let Some(r) = retry {
        if r.max_attempts == 0 {
            errors.push((
                &["retry", "max_attempts"],
                format!(
                    "upstreams.{name}.retry.max_attempts must be at least 1 (1 means no retries)"
                ),
            ));
        }
        if !(0.0..=10.0).contains(&r.budget_ratio) {
            errors.push((
                &["retry", "budget_ratio"],
                format!("upstreams.{name}.retry.budget_ratio must be between 0 and 10"),
            ));
        }
        if r.backoff_cap.0 < r.backoff_base.0 {
            errors.push((
                &["retry", "backoff_cap"],
                format!("upstreams.{name}.retry.backoff_cap must not be below backoff_base"),
            ));
        }
        if let Some(bad) = r.statuses.iter().find(|s| !(100..=599).contains(*s)) {
            errors.push((
                &["retry", "statuses"],
                format!(
                    "upstreams.{name}.retry.statuses: {bad} is not an HTTP status (100 to 599)"
                ),
            ));
        }
    }
    errors
}

mod defaults {
    use super::*;

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
