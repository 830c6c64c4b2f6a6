//! Breakers around upstreams: one per endpoint, one per upstream.
//!
//! The endpoint breaker does outlier ejection: it counts connect errors,
//! timeouts and failure statuses of that endpoint (fuse's "N failures within
//! a window", optionally a failure rate), and while it is open the balancer
//! skips the endpoint. The upstream breaker sees whole requests (after
//! retries) and opens on a failure rate, so a sick upstream with several
//! endpoints is shed as one; it also carries the operator's overrides.
//!
//! Both are keel-breaker breakers: asking is two atomic loads when closed,
//! half-open probes are reserved by compare-and-swap (never more in flight
//! than configured), and recovery after the probes is gradual.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use http::{HeaderMap, StatusCode, header};
use keel_breaker::{
    Breaker, Config, EventKind, Mode, Outcome, Permit, RatePolicy, Recovery, Rejected, State,
    Window,
};
use keel_retry::{Backoff, Jitter, RatioBudget};

use keel_config::{BreakerSpec, HealthCheckSpec, RetrySpec};
use keel_metrics::{BreakerMetrics, HealthMetrics, Metrics, RetryMetrics, UpstreamFailureMetrics};

/// A set of HTTP statuses, as a bitmap: membership is one shift and mask.
#[derive(Debug, Clone, Default)]
pub struct StatusSet([u64; 10]);

impl StatusSet {
    /// The set of `codes` (values outside 0..640 are ignored).
    pub fn new(codes: &[u16]) -> Self {
        let mut set = StatusSet::default();
        for code in codes {
            if let Some(word) = set.0.get_mut(usize::from(*code / 64)) {
                *word |= 1 << (code % 64);
            }
        }
        set
    }

    /// Whether `status` is in the set.
    pub fn contains(&self, status: StatusCode) -> bool {
        let code = status.as_u16();
        self.0
            .get(usize::from(code / 64))
            .is_some_and(|w| w & (1 << (code % 64)) != 0)
    }
}

/// The resilience state of one endpoint: its breaker and health.
#[derive(Debug)]
pub struct EndpointGuard {
    /// `None` when breakers are disabled for the upstream.
    pub breaker: Option<Breaker>,
    /// False while active health checks have ejected the endpoint.
    pub healthy: AtomicBool,
    /// Health checks passed / failed since start.
    pub checks_passed: AtomicU64,
    /// See `checks_passed`.
    pub checks_failed: AtomicU64,
    /// Breaker metric handles.
    pub metrics: BreakerMetrics,
    /// Health-check metric handles.
    pub health_metrics: HealthMetrics,
}

impl EndpointGuard {
    /// Builds the guard of endpoint `url` of upstream `upstream`.
    pub fn new(
        upstream: &str,
        url: &str,
        config: &BreakerSpec,
        seed: u64,
        metrics: &Metrics,
    ) -> Self {
        let breaker = config
            .enabled
            .then(|| {
                built(Breaker::new(
                    format!("{upstream} {url}"),
                    endpoint_config(config, seed),
                ))
            })
            .flatten();
        EndpointGuard {
            breaker,
            healthy: AtomicBool::new(true),
            checks_passed: AtomicU64::new(0),
            checks_failed: AtomicU64::new(0),
            metrics: metrics.resilience().breaker(upstream, url),
            health_metrics: metrics.resilience().health(upstream, url),
        }
    }

    /// Whether the endpoint passes its health checks (always, without checks).
    #[inline]
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// A permit for one attempt, or why not. `Ok(None)`: no breaker.
    #[inline]
    pub fn allow(&self) -> Result<Option<Permit<'_>>, Rejected> {
        allow_counted(self.breaker.as_ref(), &self.metrics)
    }
}

/// Retry settings of one upstream, ready to use.
#[derive(Debug)]
pub struct RetrySettings {
    /// Attempts per request, the first included.
    pub max_attempts: u32,
    /// Statuses worth another attempt.
    pub statuses: StatusSet,
    /// Full-jitter exponential backoff, capped.
    pub backoff: Backoff,
    /// The shared budget.
    pub budget: RatioBudget,
    /// Largest request body kept for a retry.
    pub max_body: u64,
    /// Metric handles.
    pub metrics: RetryMetrics,
}

/// The resilience state of one upstream.
#[derive(Debug)]
pub struct UpstreamResilience {
    /// The upstream-wide breaker (`None` when breakers are disabled).
    pub breaker: Option<Breaker>,
    /// Its metric handles.
    pub metrics: BreakerMetrics,
    /// Statuses that count as failures.
    pub failure_statuses: StatusSet,
    /// Upper bound for an upstream `Retry-After` used as open time.
    pub max_retry_after: Duration,
    /// Retries (`None`: off).
    pub retry: Option<RetrySettings>,
    /// Active health checks (`None`: off).
    pub health_check: Option<HealthCheckSpec>,
    /// Attempts that counted against the upstream, by cause (never the
    /// client's failures).
    pub failures: UpstreamFailureMetrics,
}

impl UpstreamResilience {
    /// Builds it from the upstream's breaker, retry and health-check specs.
    pub fn new(
        name: &str,
        config: &BreakerSpec,
        r: &RetrySpec,
        health_check: Option<&HealthCheckSpec>,
        metrics: &Metrics,
    ) -> Self {
        let breaker = config
            .enabled
            .then(|| built(Breaker::new(name.to_owned(), upstream_config(config))))
            .flatten();
        let retry = (r.enabled && r.max_attempts > 1).then(|| RetrySettings {
            max_attempts: r.max_attempts,
            statuses: StatusSet::new(&r.statuses),
            backoff: Backoff::exponential(r.backoff_base)
                .cap(r.backoff_cap)
                .jitter(Jitter::Full),
            budget: RatioBudget::new(
                r.budget_ratio,
                r.budget_min_per_second,
                Duration::from_secs(10),
            ),
            max_body: r.max_body,
            metrics: metrics.resilience().retry(name),
        });
        UpstreamResilience {
            breaker,
            metrics: metrics.resilience().breaker(name, ""),
            failure_statuses: StatusSet::new(&config.failure_statuses),
            max_retry_after: config.max_retry_after,
            retry,
            health_check: health_check.cloned(),
            failures: metrics.resilience().upstream_failures(name),
        }
    }

    /// A permit for one request, or why not. `Ok(None)`: no breaker.
    #[inline]
    pub fn allow(&self) -> Result<Option<Permit<'_>>, Rejected> {
        allow_counted(self.breaker.as_ref(), &self.metrics)
    }

    /// What an upstream answer means to the breakers: a configured failure
    /// status is a failure; a 503 or 429 with `Retry-After` is a failure
    /// that sets the open time if it trips the breaker.
    pub fn outcome_of(&self, status: StatusCode, headers: &HeaderMap) -> Outcome {
        if matches!(status.as_u16(), 503 | 429)
            && let Some(hint) = retry_after(headers)
        {
            return Outcome::FailureRetryAfter(hint.min(self.max_retry_after));
        }
        if self.failure_statuses.contains(status) {
            Outcome::Failure
        } else {
            Outcome::Success
        }
    }
}

/// The upstream's `Retry-After`, in seconds or as an HTTP date.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(header::RETRY_AFTER)?.to_str().ok()?;
    keel_retry::parse_retry_after(value, SystemTime::now()).ok()
}

fn common_config(c: &BreakerSpec, mut config: Config) -> Config {
    config = config
        .open_duration(c.open_duration)
        .open_duration_cap(c.max_open_duration.max(c.open_duration))
        .half_open_probes(c.half_open_probes.max(1))
        .probe_timeout(c.probe_timeout);
    config.max_hint = c.max_retry_after;
    if let Some(step_duration) = c.recovery_step {
        config = config.recovery(Recovery {
            step_duration,
            ..Recovery::default()
        });
    }
    config
}

/// fuse's count policy (and optionally a rate) for one endpoint.
fn endpoint_config(c: &BreakerSpec, seed: u64) -> Config {
    let mut config = Config::fuse(c.failures.saturating_sub(1), c.window, c.open_duration);
    config.rate = c.failure_rate.map(|rate| RatePolicy {
        window: Window::Count(100),
        min_calls: c.min_calls,
        failure_rate: Some(rate),
        slow: None,
    });
    common_config(c, config.seed(seed))
}

/// A failure-rate policy over whole requests for the upstream.
fn upstream_config(c: &BreakerSpec) -> Config {
    let config = Config::default().rate(Some(RatePolicy {
        window: Window::Count(100),
        min_calls: c.min_calls,
        failure_rate: Some(c.upstream_failure_rate),
        slow: None,
    }));
    common_config(c, config)
}

/// A permit from `breaker` (none when there is no breaker), counting a
/// refusal in `metrics`.
#[inline]
fn allow_counted<'a>(
    breaker: Option<&'a Breaker>,
    metrics: &BreakerMetrics,
) -> Result<Option<Permit<'a>>, Rejected> {
    let Some(breaker) = breaker else {
        return Ok(None);
    };
    breaker.allow().map(Some).inspect_err(|_| {
        metrics.rejections.inc();
    })
}

/// The gauge value for a breaker: its state, or its override.
pub fn state_code(breaker: &Breaker) -> i64 {
    match breaker.mode() {
        Mode::ForcedOpen => 4,
        Mode::Disabled => 5,
        Mode::Normal | Mode::MetricsOnly => match breaker.state() {
            State::Closed => 0,
            State::Open => 1,
            State::HalfOpen => 2,
            State::Recovering => 3,
        },
    }
}

/// The breaker, or `None` with an error logged. keel-config checks every
/// setting keel-breaker validates, so a refusal here is a bug to report,
/// not a state to run in silently.
fn built<E: std::fmt::Display>(breaker: Result<Breaker, E>) -> Option<Breaker> {
    match breaker {
        Ok(breaker) => Some(breaker),
        Err(error) => {
            tracing::error!(%error, "breaker settings refused; running without this breaker");
            None
        }
    }
}

/// Keeps a breaker's metrics current from its events; a background task.
#[derive(Debug, Clone)]
pub struct BreakerWatcher {
    name: std::sync::Arc<str>,
    breaker: Breaker,
    metrics: BreakerMetrics,
}

impl BreakerWatcher {
    /// A watcher of `breaker` (of upstream `name`) keeping `metrics`.
    pub fn new(name: std::sync::Arc<str>, breaker: Breaker, metrics: BreakerMetrics) -> Self {
        BreakerWatcher {
            name,
            breaker,
            metrics,
        }
    }

    /// The upstream the breaker belongs to.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs until the breaker is gone; its owner stops it by dropping
    /// (cancelling) the future.
    pub async fn run(self) {
        let mut events = self.breaker.subscribe();
        self.metrics.state.set(state_code(&self.breaker));
        loop {
            match events.recv().await {
                Ok(event) => {
                    if let EventKind::StateChanged { to, .. } = event.kind {
                        self.metrics.transition(match to {
                            State::Closed => "closed",
                            State::Open => "open",
                            State::HalfOpen => "half_open",
                            State::Recovering => "recovering",
                        });
                    }
                    self.metrics.state.set(state_code(&self.breaker));
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    self.metrics.state.set(state_code(&self.breaker));
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    }
}

/// The operator actions of `POST /breakers/{upstream}/{action}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperatorAction {
    /// Blow the upstream's breaker now: every request is refused (or served
    /// stale) until `reset` or `enable`.
    Melt,
    /// Close every breaker of the upstream and lift a melt.
    Reset,
    /// Let everything through; outcomes are counted but change nothing.
    Disable,
    /// Back to normal operation.
    Enable,
}

/// Applies `action` to the upstream's breakers (melt: the upstream-wide
/// one; the others: all of them).
pub fn apply(upstream: &UpstreamResilience, endpoints: &[&Breaker], action: OperatorAction) {
    let all = upstream.breaker.iter().chain(endpoints.iter().copied());
    match action {
        OperatorAction::Melt => {
            if let Some(b) = &upstream.breaker {
                b.force_open(None);
            }
        }
        OperatorAction::Reset => all.for_each(|b| {
            b.enable();
            b.reset();
        }),
        OperatorAction::Disable => all.for_each(Breaker::disable),
        OperatorAction::Enable => all.for_each(Breaker::enable),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_sets_hold_exactly_their_codes() {
        let set = StatusSet::new(&[502, 503, 504, 700]);
        assert!(set.contains(StatusCode::BAD_GATEWAY));
        assert!(set.contains(StatusCode::GATEWAY_TIMEOUT));
        assert!(!set.contains(StatusCode::INTERNAL_SERVER_ERROR));
        assert!(!set.contains(StatusCode::OK));
    }

    #[test]
    fn the_endpoint_breaker_opens_at_the_configured_failures_and_honours_retry_after() {
        let metrics = Metrics::new();
        let config = BreakerSpec {
            failures: 3,
            ..BreakerSpec::default()
        };
        let guard = EndpointGuard::new("app", "http://a", &config, 1, &metrics);
        for _ in 0..2 {
            guard.allow().expect("closed").expect("breaker").failure();
        }
        assert!(guard.allow().is_ok(), "two failures are tolerated");
        let upstream =
            UpstreamResilience::new("app", &config, &RetrySpec::default(), None, &metrics);
        let mut headers = HeaderMap::new();
        headers.insert(header::RETRY_AFTER, "42".parse().expect("value"));
        let outcome = upstream.outcome_of(StatusCode::SERVICE_UNAVAILABLE, &headers);
        assert_eq!(outcome, Outcome::FailureRetryAfter(Duration::from_secs(42)));
        guard
            .allow()
            .expect("closed")
            .expect("breaker")
            .record(outcome);
        let rejected = guard.allow().expect_err("third failure opens it");
        let wait = rejected.retry_after.expect("retry after");
        assert!(wait > Duration::from_secs(41) && wait <= Duration::from_secs(42));
        assert_eq!(guard.metrics.rejections.get(), 1);
        assert_eq!(
            upstream.outcome_of(StatusCode::INTERNAL_SERVER_ERROR, &HeaderMap::new()),
            Outcome::Success,
            "500 is not a failure unless configured"
        );
    }

    #[test]
    fn operator_actions_reach_every_breaker() {
        let metrics = Metrics::new();
        let breaker = BreakerSpec::default();
        let upstream =
            UpstreamResilience::new("app", &breaker, &RetrySpec::default(), None, &metrics);
        let endpoint = EndpointGuard::new("app", "http://a", &breaker, 1, &metrics);
        let endpoints = [endpoint.breaker.as_ref().expect("breaker")];
        apply(&upstream, &endpoints, OperatorAction::Melt);
        assert!(upstream.allow().is_err());
        apply(&upstream, &endpoints, OperatorAction::Reset);
        assert!(upstream.allow().is_ok());
        apply(&upstream, &endpoints, OperatorAction::Disable);
        assert_eq!(endpoints[0].mode(), Mode::Disabled);
        apply(&upstream, &endpoints, OperatorAction::Enable);
        assert_eq!(endpoints[0].mode(), Mode::Normal);
    }
}
