//! The gateway assembled: [`build_proxy`] turns a spec into the request
//! handler, [`start`] binds the listeners, builds the supervision tree and
//! starts it, and [`Running`] waits for SIGTERM, SIGINT or `POST /drain`
//! and drains.
//!
//! Sockets are bound before the tree starts, so a busy port fails at once;
//! each component is then a child of the tree (a bound value plus a future
//! it runs), and readiness is a set of conditions each component flips for
//! itself.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin_backend::GatewayAdmin;
use crate::drain::DrainControl;
use crate::readiness::{Readiness, ReadinessHandle};
use keel_config::{RouteSpec, Spec};
use keel_metrics::Metrics;
use keel_proxy::filter::RequestFilter;
use keel_proxy::listener::{ConnectionCount, ConnectionSettings, DataPlane};
use keel_proxy::proxy::{Proxy, ProxySettings};
use keel_proxy::route::{Route, Router};
use keel_upstream::Upstream;

/// A fatal start-up or runtime error (exit code 1).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Could not bind a listener.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Could not install signal handlers.
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    /// The supervision tree could not be built or started.
    #[error("supervision tree: {0}")]
    Tree(String),
    /// The supervision tree gave up (restart intensity exceeded).
    #[error("the supervision tree stopped: {0}")]
    TreeExited(keel_supervisor::ExitReason),
}

/// Makes the request filter for a route (`None`: a plain route). `start`
/// passes a factory that builds the idempotency engine's filter from
/// the route's idempotency spec and the shared store.
pub type FilterFactory<'a> = &'a dyn Fn(&RouteSpec) -> Option<Arc<dyn RequestFilter>>;

/// No filters: every route is a plain proxy route.
pub fn no_filters(_: &RouteSpec) -> Option<Arc<dyn RequestFilter>> {
    None
}

/// Builds the gateway's routing table and upstream pools from a spec.
pub fn build_proxy(spec: &Spec, metrics: &Metrics, filters: FilterFactory<'_>) -> Proxy {
    let upstreams = spec
        .upstreams
        .iter()
        .map(|upstream| Upstream::new(upstream, metrics))
        .collect();
    let routes = spec
        .routes
        .iter()
        .map(|r| Route {
            metrics: metrics.route(&r.name),
            name: r.name.clone(),
            prefix: r.path_prefix.clone(),
            host: r.host.clone(),
            methods: r.methods.clone(),
            upstream: r.upstream,
            max_body_size: r.max_body_size,
            filter: filters(r),
            stale: r.stale.as_ref().map(|s| {
                keel_proxy::stale::StaleCache::new(s, metrics.resilience().stale(&r.name))
            }),
        })
        .collect();
    Proxy {
        router: Router::new(routes),
        upstreams,
        settings: ProxySettings {
            max_header_size: spec.server.max_header_size,
            via: spec.server.via,
            access_log: spec.log.access_log,
            tunnel_close: keel_proxy::tunnel::ClosePolicy {
                // The grace the drain plan leaves before its deadline.
                message_wait: crate::drain::plan(&spec.drain, spec.drain.deadline)
                    .effective_close_grace(),
                message_limit: spec.drain.close_message_limit,
                mid_message: metrics.tunnel_closes_mid_message.clone(),
            },
        },
        unmatched: metrics.route("-"),
        connections: Arc::default(),
    }
}

/// A started gateway.
pub struct Running {
    /// Data-plane address actually bound.
    pub listen: SocketAddr,
    /// Admin address actually bound, if any.
    pub admin: Option<SocketAddr>,
    connections: ConnectionCount,
    tree: keel_supervisor::SupervisorHandle,
    readiness: Readiness,
    drain: Arc<DrainControl>,
    /// Stops the admin server when the drain is over (dropped on exit).
    _exit: watch::Sender<bool>,
    /// SIGTERM and SIGINT, caught from before the first listener is bound.
    signals: Signals,
}

/// SIGTERM and SIGINT handlers, installed before anything is bound: a
/// signal sent as soon as `/healthz` answers (a deploy that changes its
/// mind) is a drain, not the default action that kills the process.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Self, ServeError> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate()).map_err(ServeError::Signals)?,
            int: signal(SignalKind::interrupt()).map_err(ServeError::Signals)?,
        })
    }

    /// Resolves at the first SIGTERM or SIGINT received since `install`.
    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// Binds everything and starts serving; returns once the listeners are up.
pub async fn start(spec: &Spec) -> Result<Running, ServeError> {
    let started = Instant::now();
    let signals = Signals::install()?;
    let metrics = Arc::new(Metrics::new());
    let readiness = Readiness::default();
    let listeners_ready = readiness.register("listeners", "starting");
    // The store is a dependency only when some route is idempotent.
    let store = spec
        .has_idempotent_routes()
        .then(|| crate::store::SharedStore::new(&spec.store));
    let store_child = store
        .as_ref()
        .map(|s| s.connector(readiness.register("store", "store: starting")));
    let filters = store
        .map(|s| crate::idempotency::Filters::new(s, metrics.clone(), spec.server.buffer_budget));
    let timeout_of = |route: &RouteSpec| spec.upstream_of(route).request_timeout;
    let idempotent = |route: &RouteSpec| filters.as_ref()?.for_route(route, timeout_of(route));
    let gateway = Arc::new(build_proxy(spec, &metrics, &idempotent));
    let (shutdown, shutdown_rx) = watch::channel(false);

    let server = &spec.server;
    let settings = ConnectionSettings {
        idle_timeout: server.idle_timeout,
        header_read_timeout: server.header_read_timeout,
        http2_keep_alive_interval: server.http2_keep_alive_interval,
        http2_keep_alive_timeout: server.http2_keep_alive_timeout,
        max_header_size: server.max_header_size,
    };
    let addr = server.listen;
    let data_plane = DataPlane::bind(addr, gateway.clone(), &settings)
        .await
        .map_err(|source| ServeError::Bind {
            what: "listen",
            addr,
            source,
        })?;
    let listen = data_plane.local_addr().unwrap_or(addr);
    let connections = data_plane.connections();
    let drain = Arc::new(DrainControl::new(
        gateway.clone(),
        metrics.clone(),
        &spec.drain,
    ));
    // The admin server outlives the listener: `GET /drain` answers until
    // the drain is over.
    let (exit, exit_rx) = watch::channel(false);

    let mut admin = None;
    let mut admin_child = None;
    let probe = crate::supervision::ProbeSlot::default();
    if let Some(admin_addr) = server.admin_listen {
        let listener = TcpListener::bind(admin_addr)
            .await
            .map_err(|source| ServeError::Bind {
                what: "admin_listen",
                addr: admin_addr,
                source,
            })?;
        admin = Some(listener.local_addr().unwrap_or(admin_addr));
        let backend = Arc::new(GatewayAdmin {
            gateway: gateway.clone(),
            metrics: metrics.clone(),
            readiness: readiness.clone(),
            listen,
            connections: connections.clone(),
            started,
            draining: shutdown_rx.clone(),
            supervision: probe.clone(),
            drain: drain.clone(),
            keys: filters
                .as_ref()
                .map(|f| f.key_admin(&spec.routes, timeout_of)),
        });
        let limits = keel_admin::AdminLimits {
            header_read_timeout: server.header_read_timeout,
            max_connections: server.admin_max_connections,
        };
        admin_child = Some((
            listener,
            backend as Arc<dyn keel_admin::AdminBackend>,
            limits,
        ));
    }
    let root = crate::supervision::tree(
        crate::supervision::Children {
            data_plane,
            listen,
            gateway: gateway.clone(),
            settings,
            listeners_ready: listeners_ready.clone(),
            admin: admin_child,
            store: store_child,
            health: crate::background::health_children(&gateway.upstreams),
            breakers: crate::background::breaker_children(&gateway.upstreams),
            pools: crate::background::pool_sweeper(&gateway.upstreams),
            shutdown: shutdown_rx,
            admin_shutdown: exit_rx,
            drain: Some(drain_child(
                drain.clone(),
                listeners_ready.clone(),
                shutdown,
                connections.clone(),
            )),
        },
        &probe,
    )
    .map_err(|e| ServeError::Tree(e.to_string()))?;
    crate::supervision::count_restarts(&root, metrics.clone());
    let tree = root
        .start()
        .await
        .map_err(|e| ServeError::Tree(e.to_string()))?;
    // The admin address only when there is one, as an address (not
    // `Some(..)`): an absent field is what a log reader expects.
    tracing::info!(%listen, admin = admin.map(tracing::field::display), "keel is serving");
    Ok(Running {
        listen,
        admin,
        connections,
        tree,
        readiness,
        drain,
        _exit: exit,
        signals,
    })
}

impl Running {
    /// Waits up to `within` for every readiness condition (the store
    /// connected, for instance); true if they all hold.
    pub async fn wait_ready(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while !self.readiness.is_ready() {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    /// Drains and stops the gateway now, as `POST /drain` would: for an
    /// embedding program (and tests) that decides itself when to stop.
    pub async fn drain_now(self) -> Result<(), ServeError> {
        self.drain.request_shutdown();
        self.wait_and_drain().await
    }

    /// Waits for SIGTERM, SIGINT or `POST /drain`, then runs the shutdown
    /// sequence (`crate::drain`): readiness fails at once, traffic is still
    /// served for `shutdown_delay`, then the listener stops accepting and
    /// connections are closed at the `[drain]` pace, up to `deadline`.
    pub async fn wait_and_drain(mut self) -> Result<(), ServeError> {
        tokio::select! {
            () = self.signals.recv() => tracing::info!("signal received: draining"),
            () = self.drain.shutdown_requested() => tracing::info!("drain requested on the admin API"),
            reason = self.tree.wait() => return Err(ServeError::TreeExited(reason)),
        }
        // Stop the tree in reverse start order: the drain child first (its
        // stop is the drain sequence), then the health checks, the store
        // connector, the admin server and the listener.
        self.tree.shutdown().await;
        tracing::info!(open = self.connections.get(), "drained");
        Ok(())
    }
}

/// The drain as a child of the tree: ready at once, and when the tree shuts
/// it down (first, being the last started), it runs the whole drain
/// sequence (`crate::drain`) before returning. The drain bounds itself by
/// its deadline, so the child is stopped with `Shutdown::Infinity`.
fn drain_child(
    drain: Arc<DrainControl>,
    listeners_ready: ReadinessHandle,
    stop_accepting: watch::Sender<bool>,
    connections: ConnectionCount,
) -> keel_supervisor::ChildSpec {
    let stop_accepting = Arc::new(stop_accepting);
    keel_supervisor::ChildSpec::new("drain", move |ctx| {
        let (drain, ready, stop, connections) = (
            drain.clone(),
            listeners_ready.clone(),
            stop_accepting.clone(),
            connections.clone(),
        );
        async move {
            ctx.ready();
            ctx.cancelled().await;
            drain.shutdown(&ready, &stop, &connections).await;
            Ok(())
        }
    })
    .shutdown(keel_supervisor::Shutdown::Infinity)
}
