//! Draining: the shutdown sequence and blue/green endpoint drains, carried
//! out by keel-drain.
//!
//! Every downstream connection (`listener`) and every tunnel (`tunnel`,
//! with its upstream endpoint) is registered in one process-wide
//! [`keel_drain::Registry`] (sharded; registering touches one shard).
//!
//! The shutdown sequence ([`DrainControl::shutdown`]), on SIGTERM/SIGINT or
//! `POST /drain`:
//!
//! 1. `/readyz` turns 503 at once;
//! 2. for `shutdown_delay` traffic is still served normally (load
//!    balancers and Kubernetes notice readiness and stop sending);
//! 3. the listener stops accepting; HTTP/1 connections get
//!    `Connection: close` on their next response and idle ones close,
//!    HTTP/2 connections get GOAWAY; in-flight requests run on;
//! 4. tunnels are closed at the pace of `[drain]` (batches, a percentage,
//!    or gradually), WebSockets with close code 1012 and a reconnect hint;
//! 5. at `deadline` (counted from the signal) whatever is left is cut;
//! 6. the process exits 0.
//!
//! An endpoint drain ([`DrainControl::drain_endpoint`]) marks one upstream
//! endpoint draining (no new requests or tunnels) and closes its tunnels
//! with the same pacing, so clients reconnect through the gateway to the
//! remaining endpoints; [`DrainControl::resume_endpoint`] puts it back.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use keel_admin::{DrainPhase as Phase, DrainProgress, DrainReport, EndpointDrainReport};
use keel_drain::{ConnKind, Drain, DrainPlan, Progress, Target};
use tokio::sync::watch;

use crate::readiness::ReadinessHandle;
use keel_config::{DrainPace, DrainSpec};
use keel_metrics::Metrics;
use keel_proxy::proxy::Proxy;

/// Why an endpoint drain was refused (the admin API's answer).
pub use keel_admin::EndpointDrainError;

/// The tunnel drain plan `[drain]` describes, with `deadline` as its hard
/// deadline.
pub fn plan(config: &DrainSpec, deadline: Duration) -> DrainPlan {
    let plan = match config.pace {
        DrainPace::Batch { size, interval } => DrainPlan::batches(size, interval),
        DrainPace::Percent { percent, interval } => DrainPlan::percent(percent, interval),
        DrainPace::Gradual { over } => DrainPlan::gradual(over),
    };
    plan.deadline(deadline)
        .close_grace(config.close_grace)
        .jitter(config.jitter)
        .reconnect_window(config.reconnect_window)
        .seed(seed())
}

/// A seed that differs between runs (hints and jitter need not be
/// reproducible in production; tests of the plan live in keel-drain).
fn seed() -> u64 {
    fastrand::u64(..)
}

struct EndpointDrain {
    upstream: String,
    endpoint: String,
    drain: Drain,
}

struct Shutdown {
    phase: Phase,
    tunnels: Option<watch::Receiver<Progress>>,
    http: Option<watch::Receiver<Progress>>,
}

/// The drain state shared by the serve command and the admin API.
pub struct DrainControl {
    gateway: Arc<Proxy>,
    metrics: Arc<Metrics>,
    config: DrainSpec,
    requested: watch::Sender<bool>,
    shutdown: Mutex<Shutdown>,
    endpoints: Mutex<Vec<EndpointDrain>>,
}

impl DrainControl {
    /// A control for `gateway` with the `[drain]` settings.
    pub fn new(gateway: Arc<Proxy>, metrics: Arc<Metrics>, config: &DrainSpec) -> Self {
        let (requested, _) = watch::channel(false);
        DrainControl {
            gateway,
            metrics,
            config: config.clone(),
            requested,
            shutdown: Mutex::new(Shutdown {
                phase: Phase::Serving,
                tunnels: None,
                http: None,
            }),
            endpoints: Mutex::new(Vec::new()),
        }
    }

    /// Asks for the shutdown sequence (`POST /drain`); returns false if it
    /// was already asked for.
    pub fn request_shutdown(&self) -> bool {
        !self.requested.send_replace(true)
    }

    /// Resolves once the shutdown sequence is asked for.
    pub async fn shutdown_requested(&self) {
        let mut rx = self.requested.subscribe();
        let _ = rx.wait_for(|asked| *asked).await;
    }

    fn set_phase(&self, phase: Phase) {
        self.shutdown
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .phase = phase;
    }

    /// Runs the shutdown sequence (see the module docs): `ready` is failed
    /// at once, `stop_accepting` is set after `shutdown_delay`; returns
    /// once every connection is closed or the deadline (plus a short grace)
    /// has passed.
    pub async fn shutdown(
        &self,
        ready: &ReadinessHandle,
        stop_accepting: &watch::Sender<bool>,
        listener: &keel_proxy::listener::ConnectionCount,
    ) {
        let began = tokio::time::Instant::now();
        let _ = self.requested.send_replace(true);
        ready.set_not_ready("draining");
        self.set_phase(Phase::ShutdownDelay);
        tracing::info!(delay = ?self.config.shutdown_delay, "draining: readiness failed, still serving");
        tokio::time::sleep(self.config.shutdown_delay.min(self.config.deadline)).await;

        let _ = stop_accepting.send(true);
        // Close connections only once the listening socket is gone, so a
        // client that reconnects at once is refused, not accepted. Bounded,
        // in case the listener is being restarted.
        let _ = tokio::time::timeout(Duration::from_secs(1), listener.listener_closed()).await;
        self.gateway
            .connections
            .set_late_window(self.config.reconnect_window.max(Duration::from_millis(1)));
        let left = self.config.deadline.saturating_sub(began.elapsed());
        let tunnels = keel_drain::start(
            self.gateway.connections.registry(),
            Target::Kind(ConnKind::TUNNEL),
            plan(&self.config, left),
        );
        // HTTP connections are all told at once (their close costs no
        // reconnect storm: the next request opens a new connection), and
        // cut at the deadline if a request is still running.
        let http_plan = DrainPlan::batches(usize::MAX, Duration::from_secs(1))
            .jitter(false)
            .reconnect_window(Duration::ZERO)
            .deadline(left);
        let h1 = keel_drain::start(
            self.gateway.connections.registry(),
            Target::Kind(ConnKind::HTTP1),
            http_plan.clone(),
        );
        let h2 = keel_drain::start(
            self.gateway.connections.registry(),
            Target::Kind(ConnKind::HTTP2),
            http_plan,
        );
        let http = merged(&h1, &h2);
        {
            let mut state = self.shutdown.lock().unwrap_or_else(PoisonError::into_inner);
            state.phase = Phase::Draining;
            state.tunnels = Some(tunnels.watch());
            state.http = Some(http.clone());
        }
        let gauges = self.metrics.drain("shutdown");
        let mut watch = tunnels.watch();
        let report = tokio::spawn(async move {
            loop {
                gauges.set(&watch.borrow_and_update());
                if watch.changed().await.is_err() {
                    return;
                }
            }
        });
        tracing::info!(
            tunnels = tunnels.progress().total,
            http = http.borrow().total,
            "draining: listener closed"
        );
        let (tunnels, _, _) = tokio::join!(tunnels.finished(), h1.finished(), h2.finished());
        report.abort();
        // Tunnels upgraded after the drain began were asked to close when
        // they appeared; wait for them too, and cut them at the deadline.
        while !self.gateway.connections.registry().is_empty()
            && began.elapsed() < self.config.deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !self.gateway.connections.registry().is_empty() {
            let cut = DrainPlan::batches(usize::MAX, Duration::from_secs(1))
                .jitter(false)
                .deadline(Duration::ZERO);
            keel_drain::start(self.gateway.connections.registry(), Target::All, cut)
                .finished()
                .await;
        }
        self.metrics.drain("shutdown").set(&tunnels);
        self.set_phase(Phase::Done);
        tracing::info!(
            closed = tunnels.closed,
            forced = tunnels.forced,
            elapsed_ms = began.elapsed().as_millis() as u64,
            "drained"
        );
    }

    /// Starts draining endpoint `endpoint` of upstream `upstream`: no new
    /// requests or tunnels go there, and its tunnels are closed at the
    /// pace of `[drain]` within `deadline`. Draining an endpoint that is
    /// already draining restarts the pacing over the tunnels left.
    pub fn drain_endpoint(
        &self,
        upstream: &str,
        endpoint: &str,
    ) -> Result<Progress, EndpointDrainError> {
        let (up, target) = self.find(upstream, endpoint)?;
        if !target.is_draining() && up.endpoints.iter().filter(|e| !e.is_draining()).count() <= 1 {
            return Err(EndpointDrainError::LastEndpoint(endpoint.to_owned()));
        }
        target.set_draining(true);
        let drain = keel_drain::start(
            self.gateway.connections.registry(),
            Target::Endpoint(target.drain_key().to_string()),
            plan(&self.config, self.config.deadline),
        );
        let progress = drain.progress();
        let gauges = self.metrics.drain(endpoint);
        let mut watch = drain.watch();
        tokio::spawn(async move {
            loop {
                gauges.set(&watch.borrow_and_update());
                if watch.changed().await.is_err() {
                    return;
                }
            }
        });
        tracing::info!(
            upstream,
            endpoint,
            tunnels = progress.total,
            "draining endpoint"
        );
        let mut drains = self.stop_endpoint_drain(upstream, endpoint);
        drains.push(EndpointDrain {
            upstream: upstream.to_owned(),
            endpoint: endpoint.to_owned(),
            drain,
        });
        Ok(progress)
    }

    /// Puts a drained endpoint back in service (stopping its drain if it
    /// still runs); returns whether it was draining.
    pub fn resume_endpoint(
        &self,
        upstream: &str,
        endpoint: &str,
    ) -> Result<bool, EndpointDrainError> {
        let (_, target) = self.find(upstream, endpoint)?;
        drop(self.stop_endpoint_drain(upstream, endpoint));
        tracing::info!(upstream, endpoint, "endpoint back in service");
        Ok(target.set_draining(false))
    }

    /// Stops and forgets any drain running for the endpoint; returns the
    /// list still locked, for a caller that starts a new one.
    fn stop_endpoint_drain(
        &self,
        upstream: &str,
        endpoint: &str,
    ) -> std::sync::MutexGuard<'_, Vec<EndpointDrain>> {
        let mut drains = self
            .endpoints
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        drains.retain(|d| {
            let same = d.upstream == upstream && d.endpoint == endpoint;
            if same {
                d.drain.abort();
            }
            !same
        });
        drains
    }

    /// The upstream named `upstream` and its endpoint `endpoint` (URL, a
    /// trailing `/` ignored).
    fn find(
        &self,
        upstream: &str,
        endpoint: &str,
    ) -> Result<(&keel_upstream::Upstream, &keel_upstream::Endpoint), EndpointDrainError> {
        let up = self
            .gateway
            .upstreams
            .iter()
            .find(|u| u.name == upstream)
            .ok_or_else(|| EndpointDrainError::NoUpstream(upstream.to_owned()))?;
        let wanted = endpoint.trim_end_matches('/');
        up.endpoints
            .iter()
            .find(|e| e.url.trim_end_matches('/') == wanted)
            .map(|e| (up, &**e))
            .ok_or_else(|| EndpointDrainError::NoEndpoint {
                upstream: upstream.to_owned(),
                endpoint: endpoint.to_owned(),
            })
    }

    /// The `GET /drain` document: the shutdown's phase and progress, and
    /// every endpoint drain.
    pub fn report(&self) -> DrainReport {
        let (phase, tunnels, http) = {
            let s = self.shutdown.lock().unwrap_or_else(PoisonError::into_inner);
            (
                s.phase,
                s.tunnels.as_ref().map(|w| progress(&w.borrow())),
                s.http.as_ref().map(|w| progress(&w.borrow())),
            )
        };
        let endpoints = self
            .endpoints
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|d| EndpointDrainReport {
                upstream: d.upstream.clone(),
                endpoint: d.endpoint.clone(),
                draining: self
                    .find(&d.upstream, &d.endpoint)
                    .is_ok_and(|(_, e)| e.is_draining()),
                progress: progress(&d.drain.progress()),
            })
            .collect();
        DrainReport {
            phase,
            connections: self.gateway.connections.registry().len() as u64,
            tunnels,
            http,
            endpoints,
            started: None,
        }
    }
}

/// A drain's progress as the admin API shows it.
pub fn progress(p: &Progress) -> DrainProgress {
    DrainProgress {
        total: p.total as u64,
        signalled: p.signalled as u64,
        closed: p.closed as u64,
        remaining: p.remaining as u64,
        forced: p.forced as u64,
        elapsed_ms: p.elapsed_ms,
        expected_finish_ms: p.expected_finish_ms,
        done: p.done,
    }
}

/// One progress for two drains (HTTP/1 and HTTP/2), updated as either
/// moves.
fn merged(a: &Drain, b: &Drain) -> watch::Receiver<Progress> {
    let sum = |a: &Progress, b: &Progress| a.combine(b);
    let (mut wa, mut wb) = (a.watch(), b.watch());
    let (tx, rx) = watch::channel(sum(&wa.borrow(), &wb.borrow()));
    tokio::spawn(async move {
        loop {
            tokio::select! {
                r = wa.changed() => if r.is_err() { break },
                r = wb.changed() => if r.is_err() { break },
            }
            let _ = tx.send(sum(&wa.borrow_and_update(), &wb.borrow_and_update()));
        }
        let _ = tx.send(sum(&wa.borrow(), &wb.borrow()));
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_follow_the_strategy() {
        let mut config = DrainSpec {
            pace: DrainPace::Batch {
                size: 3,
                interval: Duration::from_secs(1),
            },
            jitter: false,
            ..DrainSpec::default()
        };
        let at = |p: DrainPlan| -> Vec<u64> {
            p.schedule(7).iter().map(|d| d.as_millis() as u64).collect()
        };
        let d = Duration::from_secs(60);
        assert_eq!(at(plan(&config, d)), [0, 0, 0, 1000, 1000, 1000, 2000]);
        config.pace = DrainPace::Percent {
            percent: 50.0,
            interval: Duration::from_secs(1),
        };
        assert_eq!(at(plan(&config, d)), [0, 0, 0, 0, 1000, 1000, 1000]);
        config.pace = DrainPace::Gradual {
            over: Duration::from_millis(700),
        };
        assert_eq!(at(plan(&config, d)), [0, 100, 200, 300, 400, 500, 600]);
        // The deadline caps the schedule, less a tenth of it so the last
        // ones still hear their close before the cut.
        assert_eq!(
            *at(plan(&config, Duration::from_millis(250)))
                .last()
                .expect("7"),
            225
        );
        // `close_grace = "0s"`: the schedule runs to the deadline itself
        // (what is left then is cut without a close frame).
        config.close_grace = Duration::ZERO;
        assert_eq!(
            *at(plan(&config, Duration::from_millis(250)))
                .last()
                .expect("7"),
            250
        );
        assert_eq!(plan(&config, d).reconnect_window, Duration::from_secs(5));
    }
}
