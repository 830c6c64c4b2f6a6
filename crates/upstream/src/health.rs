//! Active health checks: every `interval`, a GET of `path` on each endpoint
//! of an upstream that has `[upstreams.NAME.health_check]`. A 2xx within
//! `timeout` passes. `unhealthy_threshold` consecutive failures eject the
//! endpoint (the balancer skips it); `healthy_threshold` consecutive passes
//! re-admit it. Checks bypass the breakers, so they can tell when an
//! ejected endpoint is back.
//!
//! Each check is a bound value with a `run(shutdown)` future, so a
//! supervisor can run it as a child (one per endpoint) and restart it.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use http::{Request, header};
use http_body_util::BodyExt;

use crate::endpoint::{Endpoint, Upstream};
use keel_config::HealthCheckSpec;
use keel_http::body::ProxyBody;

/// The health check of one endpoint.
#[derive(Debug, Clone)]
pub struct HealthCheck {
    /// The upstream's name (for logs).
    pub upstream: Arc<str>,
    /// The endpoint checked.
    pub endpoint: Arc<Endpoint>,
    /// Path, interval, timeout, thresholds.
    pub config: HealthCheckSpec,
}

/// One check per endpoint of every upstream with `health_check` configured.
pub fn checks<'a>(upstreams: impl IntoIterator<Item = &'a Upstream>) -> Vec<HealthCheck> {
    upstreams
        .into_iter()
        .flat_map(|upstream| {
            let config = upstream.resilience.health_check.clone();
            let name: Arc<str> = Arc::from(upstream.name.as_str());
            upstream.endpoints.iter().filter_map(move |endpoint| {
                Some(HealthCheck {
                    upstream: name.clone(),
                    endpoint: endpoint.clone(),
                    config: config.clone()?,
                })
            })
        })
        .collect()
}

/// Consecutive results and the decision they lead to.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Streak {
    passes: u32,
    failures: u32,
}

impl Streak {
    /// Records one result; returns the new health when it changes.
    pub fn record(
        &mut self,
        passed: bool,
        healthy: bool,
        config: &HealthCheckSpec,
    ) -> Option<bool> {
        if passed {
            self.passes = self.passes.saturating_add(1);
            self.failures = 0;
            (!healthy && self.passes >= config.healthy_threshold).then_some(true)
        } else {
            self.failures = self.failures.saturating_add(1);
            self.passes = 0;
            (healthy && self.failures >= config.unhealthy_threshold).then_some(false)
        }
    }
}

impl HealthCheck {
    /// Checks every `interval`; its owner stops it by dropping (cancelling)
    /// the future.
    pub async fn run(self) {
        let mut ticks = tokio::time::interval(self.config.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut streak = Streak::default();
        let guard = &self.endpoint.guard;
        loop {
            ticks.tick().await;
            let passed = self.check_once().await;
            if passed {
                guard.checks_passed.fetch_add(1, Ordering::Relaxed);
                guard.health_metrics.passed.inc();
            } else {
                guard.checks_failed.fetch_add(1, Ordering::Relaxed);
                guard.health_metrics.failed.inc();
            }
            if let Some(healthy) = streak.record(passed, guard.is_healthy(), &self.config) {
                guard.healthy.store(healthy, Ordering::Relaxed);
                guard.health_metrics.healthy.set(i64::from(healthy));
                if healthy {
                    tracing::info!(
                        upstream = &*self.upstream,
                        endpoint = self.endpoint.url,
                        "health checks pass again: endpoint re-admitted"
                    );
                } else {
                    tracing::warn!(
                        upstream = &*self.upstream,
                        endpoint = self.endpoint.url,
                        "health checks failing: endpoint ejected"
                    );
                }
            }
        }
    }

    /// One check: GET `path`, a 2xx response head and body within `timeout`.
    pub async fn check_once(&self) -> bool {
        let Ok(request) = Request::get(self.config.path.as_str())
            .header(header::HOST, self.endpoint.authority.as_str())
            .header(header::USER_AGENT, "keel-health-check")
            .body(ProxyBody::Empty)
        else {
            return false;
        };
        let exchange = async {
            let (head, body) = request.into_parts();
            let extra = keel_h1::ExtraLines::new();
            let response = self.endpoint.send(&head, &extra, body).await.ok()?;
            let ok = response.status().is_success();
            // Read the body so the connection can go back to the pool.
            response.into_body().collect().await.ok()?;
            Some(ok)
        };
        tokio::time::timeout(self.config.timeout, exchange)
            .await
            .ok()
            .flatten()
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn thresholds_eject_and_readmit() {
        let config = HealthCheckSpec {
            path: "/healthz".into(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
        };
        let mut streak = Streak::default();
        let mut healthy = true;
        let mut run = |passed: bool, healthy: &mut bool| {
            if let Some(h) = streak.record(passed, *healthy, &config) {
                *healthy = h;
            }
            *healthy
        };
        assert!(run(false, &mut healthy));
        assert!(run(false, &mut healthy));
        assert!(run(true, &mut healthy), "a pass resets the failure streak");
        assert!(run(false, &mut healthy));
        assert!(run(false, &mut healthy));
        assert!(
            !run(false, &mut healthy),
            "third consecutive failure ejects"
        );
        assert!(!run(true, &mut healthy));
        assert!(run(true, &mut healthy), "second consecutive pass re-admits");
    }
}
