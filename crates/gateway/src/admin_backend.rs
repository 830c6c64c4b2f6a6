//! The gateway behind the admin API: [`GatewayAdmin`] answers keel-admin's
//! [`AdminBackend`] questions from the running gateway's state. The HTTP
//! side (routes, queries, limits) is keel-admin's.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use keel_admin::{
    AdminBackend, BreakerAction, BreakerActionError, BreakerCounters, BreakerMode, BreakerSnapshot,
    BreakerState, BreakerWindow, Condition, DrainProgress, DrainReport, EndpointDrainError,
    EndpointResilience, EndpointStatus, Escalation, HealthStatus, IdempotencyKeys, ReadinessReport,
    RouteStatus, Status, SupervisionNode, UpstreamStatus,
};
use keel_breaker::Breaker;
use tokio::sync::watch;

use crate::drain::DrainControl;
use crate::readiness::Readiness;
use keel_metrics::Metrics;
use keel_proxy::ConnectionCount;
use keel_proxy::Proxy;
use keel_upstream::breakers::{EndpointGuard, OperatorAction};

/// What the admin API reports on.
pub struct GatewayAdmin {
    /// The gateway (routes, upstreams).
    pub gateway: Arc<Proxy>,
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
    /// Readiness conditions.
    pub readiness: Readiness,
    /// Data-plane address.
    pub listen: SocketAddr,
    /// Open downstream connections.
    pub connections: ConnectionCount,
    /// Process start.
    pub started: Instant,
    /// Set once a drain has begun.
    pub draining: watch::Receiver<bool>,
    /// The shutdown sequence and endpoint drains.
    pub drain: Arc<DrainControl>,
    /// The supervision tree, once built.
    pub supervision: crate::supervision::ProbeSlot,
    /// Idempotency keys (`/idempotency/keys`), when a route is idempotent.
    pub keys: Option<crate::idempotency::KeyAdmin>,
}

impl AdminBackend for GatewayAdmin {
    fn status(&self) -> Status {
        let gateway = &self.gateway;
        let upstreams = gateway
            .upstreams
            .iter()
            .map(|u| UpstreamStatus {
                name: u.name.clone(),
                load_balancing: u.balancing.as_str().to_owned(),
                endpoints: u
                    .endpoints
                    .iter()
                    .map(|e| EndpointStatus {
                        url: e.url.clone(),
                        in_flight: e.outstanding.load(Ordering::Relaxed) as u64,
                        open_connections: e.metrics.open_connections.get(),
                        connects: e.metrics.connects.get(),
                        resilience: endpoint_resilience(
                            &e.guard,
                            u.resilience.health_check.is_some(),
                        ),
                    })
                    .collect(),
                breaker: breaker(u.resilience.breaker.as_ref()),
            })
            .collect();
        let routes = gateway
            .router
            .routes()
            .iter()
            .map(|r| RouteStatus {
                name: r.name.clone(),
                path_prefix: r.prefix.clone(),
                host: r.host.clone(),
                upstream: gateway.upstreams.get(r.upstream).map(|u| u.name.clone()),
                idempotency: r.filter.is_some(),
                stale_cache_bytes: r.stale.as_ref().map(|c| c.bytes() as u64),
            })
            .collect();
        let readiness = self.readiness();
        Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_seconds: self.started.elapsed().as_secs(),
            listen: self.listen.to_string(),
            ready: readiness.ready,
            readiness: readiness.conditions,
            connections: self.connections.get() as u64,
            draining: *self.draining.borrow(),
            upstreams,
            routes,
            // None only in the moment before the supervision tree has started.
            supervision: self
                .supervision
                .get()
                .map(|probe| supervision_node(&probe.snapshot())),
            drain: self.drain.report(),
        }
    }

    fn readiness(&self) -> ReadinessReport {
        ReadinessReport::of(
            self.readiness
                .report()
                .into_iter()
                .map(|c| Condition {
                    name: c.name,
                    ready: c.ready,
                    reason: c.reason,
                })
                .collect(),
        )
    }

    fn metrics_text(&self) -> String {
        self.metrics.encode()
    }

    fn drain_report(&self) -> DrainReport {
        self.drain.report()
    }

    fn start_drain(&self) -> bool {
        self.drain.request_shutdown()
    }

    fn drain_endpoint(
        &self,
        upstream: &str,
        endpoint: &str,
    ) -> Result<DrainProgress, EndpointDrainError> {
        self.drain
            .drain_endpoint(upstream, endpoint)
            .map(|p| crate::drain::progress(&p))
    }

    fn resume_endpoint(&self, upstream: &str, endpoint: &str) -> Result<bool, EndpointDrainError> {
        self.drain.resume_endpoint(upstream, endpoint)
    }

    fn upstream_names(&self) -> Vec<String> {
        self.gateway
            .upstreams
            .iter()
            .map(|u| u.name.clone())
            .collect()
    }

    fn breaker_action(
        &self,
        name: &str,
        action: BreakerAction,
    ) -> Result<BreakerSnapshot, BreakerActionError> {
        let upstream = self
            .gateway
            .upstreams
            .iter()
            .find(|u| u.name == name)
            .ok_or_else(|| BreakerActionError::UnknownUpstream(name.to_owned()))?;
        let Some(upstream_breaker) = &upstream.resilience.breaker else {
            return Err(BreakerActionError::Disabled(name.to_owned()));
        };
        let endpoints: Vec<&Breaker> = upstream
            .endpoints
            .iter()
            .filter_map(|e| e.guard.breaker.as_ref())
            .collect();
        let action = match action {
            BreakerAction::Melt => OperatorAction::Melt,
            BreakerAction::Reset => OperatorAction::Reset,
            BreakerAction::Disable => OperatorAction::Disable,
            BreakerAction::Enable => OperatorAction::Enable,
        };
        keel_upstream::breakers::apply(&upstream.resilience, &endpoints, action);
        tracing::warn!(upstream = name, ?action, "operator override on breakers");
        Ok(snapshot(upstream_breaker))
    }

    fn idempotency_keys(&self) -> Option<&dyn IdempotencyKeys> {
        self.keys.as_ref().map(|k| k as &dyn IdempotencyKeys)
    }
}

/// An endpoint's breaker and, when `checked`, its health.
fn endpoint_resilience(guard: &EndpointGuard, checked: bool) -> EndpointResilience {
    EndpointResilience {
        breaker: breaker(guard.breaker.as_ref()),
        health: checked.then(|| HealthStatus {
            healthy: guard.is_healthy(),
            passed: guard.checks_passed.load(Ordering::Relaxed),
            failed: guard.checks_failed.load(Ordering::Relaxed),
        }),
    }
}

fn breaker(breaker: Option<&Breaker>) -> Option<BreakerSnapshot> {
    breaker.map(snapshot)
}

/// A keel-breaker breaker as the admin API shows it.
fn snapshot(breaker: &Breaker) -> BreakerSnapshot {
    let s = breaker.snapshot();
    BreakerSnapshot {
        name: s.name,
        state: match s.state {
            keel_breaker::State::Closed => BreakerState::Closed,
            keel_breaker::State::Open => BreakerState::Open,
            keel_breaker::State::HalfOpen => BreakerState::HalfOpen,
            keel_breaker::State::Recovering => BreakerState::Recovering,
        },
        mode: match s.mode {
            keel_breaker::Mode::Normal => BreakerMode::Normal,
            keel_breaker::Mode::Disabled => BreakerMode::Disabled,
            keel_breaker::Mode::MetricsOnly => BreakerMode::MetricsOnly,
            keel_breaker::Mode::ForcedOpen => BreakerMode::ForcedOpen,
        },
        retry_after_ms: s.retry_after_ms,
        consecutive_trips: s.consecutive_trips,
        alarm: s.alarm,
        window: BreakerWindow {
            calls: s.window.calls,
            failures: s.window.failures,
            slow: s.window.slow,
        },
        counters: BreakerCounters {
            successes: s.counters.successes,
            failures: s.counters.failures,
            slow: s.counters.slow,
            ignored: s.counters.ignored,
            rejected: s.counters.rejected,
            shadow_rejected: s.counters.shadow_rejected,
            fault_injected: s.counters.fault_injected,
            trips: s.counters.trips,
        },
    }
}

/// The wire name of a keel-supervisor enumeration (`running`, `worker`):
/// its serde name, so a state added there shows up here as it is spelled.
fn wire_name(value: &impl serde::Serialize) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => name,
        _ => "unknown".to_owned(),
    }
}

/// A supervision tree snapshot as the admin API shows it.
fn supervision_node(node: &keel_supervisor::Snapshot) -> SupervisionNode {
    SupervisionNode {
        name: node.name.clone(),
        path: node.path.clone(),
        kind: wire_name(&node.kind),
        strategy: node.strategy.map(str::to_owned),
        state: wire_name(&node.state),
        ready: node.ready,
        required: node.required,
        reason: node.reason.clone(),
        restarts: node.restarts,
        uptime_ms: node.uptime_ms,
        last_exit: node.last_exit.clone(),
        escalation: node.escalation.as_ref().map(|e| Escalation {
            child: e.child.clone(),
            restarts: e.restarts as u64,
        }),
        children: node.children.iter().map(supervision_node).collect(),
    }
}
