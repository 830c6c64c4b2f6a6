//! The gateway's supervision tree (keel-supervisor), started in stages:
//!
//! ```text
//! keel (one_for_one, 10 restarts in 60 s)
//! ├── listener   the data plane; ready once accepting
//! ├── admin      /healthz /readyz /metrics /status
//! ├── store      the idempotency store connector (deferred: never blocks)
//! ├── health     upstream health checks, one child per checked endpoint
//! ├── breakers   breaker watchers (state metrics), one child per breaker
//! ├── pools      closes idle upstream connections that expired or that
//! │              their upstream closed, every second
//! └── drain      the shutdown sequence: its stop is the whole drain
//! ```
//!
//! Sockets are bound before the tree starts, so a busy port fails
//! `keel serve` at once (exit 1) instead of a child looping on it; a
//! restarted listener binds its address anew. The store connector defers
//! its readiness, so the data plane and `/healthz` are up while the store
//! is still unreachable, and `/readyz` says why. Shutdown is in reverse
//! start order, after the drain has finished.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use keel_admin::{AdminBackend, AdminLimits};
use keel_supervisor::{
    BuildError, ChildContext, ChildResult, ChildSpec, EventKind, RestartBackoff, Supervisor,
    TreeProbe,
};
use tokio::net::TcpListener;
use tokio::sync::{Mutex, watch};

use crate::readiness::ReadinessHandle;
use keel_metrics::Metrics;
use keel_proxy::listener::{ConnectionSettings, DataPlane};
use keel_proxy::proxy::Proxy;

/// Where the admin state finds the tree's probe (set once the tree is built).
pub type ProbeSlot = Arc<OnceLock<TreeProbe>>;

/// The children, bound and ready to run.
pub struct Children {
    /// The bound data plane and what it needs to bind again after a restart.
    pub data_plane: DataPlane,
    /// The data-plane address.
    pub listen: SocketAddr,
    /// The gateway the data plane serves.
    pub gateway: Arc<Proxy>,
    /// Connection settings, for a rebind.
    pub settings: ConnectionSettings,
    /// `listeners` readiness.
    pub listeners_ready: ReadinessHandle,
    /// The bound admin listener, what it answers from, and its limits.
    pub admin: Option<(TcpListener, Arc<dyn AdminBackend>, AdminLimits)>,
    /// The store connector, when a route is idempotent.
    pub store: Option<ChildSpec>,
    /// Upstream health checks, one child per checked endpoint.
    pub health: Vec<ChildSpec>,
    /// Breaker watchers, one child per breaker.
    pub breakers: Vec<ChildSpec>,
    /// The idle-pool sweeper.
    pub pools: ChildSpec,
    /// Tells the servers to stop accepting (the drain).
    pub shutdown: watch::Receiver<bool>,
    /// Stops the admin server: later than `shutdown`, so `GET /drain`
    /// answers through the drain.
    pub admin_shutdown: watch::Receiver<bool>,
    /// The drain: started last, so the tree's shutdown stops it first, and
    /// its stop is the whole drain sequence; the listeners stop after it.
    pub drain: Option<ChildSpec>,
}

/// Builds the tree; `probe` receives its probe for `/status`.
pub fn tree(children: Children, probe: &ProbeSlot) -> Result<Supervisor, BuildError> {
    let Children {
        data_plane,
        listen,
        gateway,
        settings,
        listeners_ready,
        admin,
        store,
        health,
        breakers,
        pools,
        shutdown,
        admin_shutdown,
        drain,
    } = children;
    let data_plane = Arc::new(Mutex::new(Some(data_plane)));
    let listener_shutdown = shutdown.clone();
    let listener = ChildSpec::new("listener", move |ctx| {
        let data_plane = data_plane.clone();
        let shutdown = listener_shutdown.clone();
        let ready = listeners_ready.clone();
        let settings = settings.clone();
        let gateway = gateway.clone();
        async move {
            let bound = data_plane.lock().await.take();
            let plane = match bound {
                Some(plane) => plane,
                None => DataPlane::bind(listen, gateway, &settings).await?,
            };
            ctx.ready();
            ready.set_ready();
            serve_until_cancelled(&ctx, plane.run(shutdown)).await
        }
    })
    .backoff(RestartBackoff::new(
        Duration::from_millis(100),
        Duration::from_secs(5),
    ));
    let mut builder = Supervisor::builder("keel")
        .intensity(10, Duration::from_secs(60))
        .child(listener);
    if let Some((listener, backend, limits)) = admin {
        let addr = listener.local_addr().ok();
        let bound = Arc::new(Mutex::new(Some(listener)));
        builder = builder.child(
            ChildSpec::new("admin", move |ctx| {
                let bound = bound.clone();
                let backend = backend.clone();
                let shutdown = admin_shutdown.clone();
                async move {
                    let taken = bound.lock().await.take();
                    let listener = match (taken, addr) {
                        (Some(l), _) => l,
                        (None, Some(addr)) => TcpListener::bind(addr).await?,
                        (None, None) => return Err("the admin listener has no address".into()),
                    };
                    ctx.ready();
                    let server = keel_admin::serve(listener, backend, limits, shutdown);
                    serve_until_cancelled(&ctx, server).await
                }
            })
            .backoff(RestartBackoff::new(
                Duration::from_millis(100),
                Duration::from_secs(5),
            )),
        );
    }
    if let Some(store) = store {
        builder = builder.child(store);
    }
    if !health.is_empty() {
        let mut checks = Supervisor::builder("health").intensity(20, Duration::from_secs(60));
        for check in health {
            checks = checks.child(check);
        }
        builder = builder.child(checks.build()?);
    }
    if !breakers.is_empty() {
        let mut watchers = Supervisor::builder("breakers").intensity(20, Duration::from_secs(60));
        for watcher in breakers {
            watchers = watchers.child(watcher);
        }
        builder = builder.child(watchers.build()?);
    }
    builder = builder.child(pools);
    if let Some(drain) = drain {
        builder = builder.child(drain);
    }
    let root = builder.build()?;
    let _ = probe.set(root.probe());
    Ok(root)
}

/// Runs a server; when it stops on its own (the drain's shutdown signal),
/// waits to be cancelled so a permanent child is not restarted mid-drain.
async fn serve_until_cancelled(
    ctx: &ChildContext,
    server: impl Future<Output = ()>,
) -> ChildResult {
    tokio::select! {
        () = server => {}
        () = ctx.cancelled() => return Ok(()),
    }
    ctx.cancelled().await;
    Ok(())
}

/// Counts restarts into `keel_supervisor_restarts_total{child}`.
pub fn count_restarts(root: &Supervisor, metrics: Arc<Metrics>) {
    let mut events = root.events();
    tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(event) => {
                    if let EventKind::Restarted { .. } = event.kind {
                        metrics.supervisor_restart(&event.path);
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(start_paused = true)]
    async fn restarts_are_counted_per_child() {
        let metrics = Arc::new(Metrics::new());
        let runs = Arc::new(AtomicU32::new(0));
        let counter = runs.clone();
        let root = Supervisor::builder("keel")
            .child(ChildSpec::new("flaky", move |ctx| {
                let counter = counter.clone();
                async move {
                    // Crashes after starting on its first two runs, then
                    // stays up.
                    ctx.ready();
                    if counter.fetch_add(1, Ordering::SeqCst) < 2 {
                        return Err("boom".into());
                    }
                    ctx.cancelled().await;
                    Ok(())
                }
            }))
            .build()
            .expect("tree");
        count_restarts(&root, metrics.clone());
        let handle = root.start().await.expect("start");
        for _ in 0..100 {
            if metrics
                .encode()
                .contains(r#"keel_supervisor_restarts_total{child="keel/flaky"} 2"#)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let text = metrics.encode();
        assert!(
            text.contains(r#"keel_supervisor_restarts_total{child="keel/flaky"} 2"#),
            "{text}"
        );
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        handle.shutdown().await;
    }
}
