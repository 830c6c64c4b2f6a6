//! `keel serve`: builds the gateway from a config, starts the listeners and
//! the admin server, and drains on SIGTERM/SIGINT.
//!
//! Start-up is staged the way the supervision tree will run it: each
//! component is a bound value plus a `run` future that ends on the shared
//! shutdown signal (a future child of keel-supervisor), and readiness is a
//! set of conditions each component flips for itself.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Method;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin::{self, AdminState};
use crate::config::{Config, RouteConfig};
use crate::listener::{ConnectionCount, ConnectionSettings, DataPlane};
use crate::metrics::Metrics;
use crate::proxy::{Gateway, ProxySettings, RequestFilter};
use crate::readiness::{Readiness, ReadinessHandle};
use crate::route::{Route, Router};
use crate::upstream::Upstream;

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
}

/// Makes the request filter for a route (`None`: a plain route). Phase 2
/// passes a factory that builds the idempotency engine's filter from
/// `[routes.idempotency]` and the shared store.
pub type FilterFactory<'a> = &'a dyn Fn(&RouteConfig) -> Option<Arc<dyn RequestFilter>>;

/// No filters: every route is a plain proxy route.
pub fn no_filters(_: &RouteConfig) -> Option<Arc<dyn RequestFilter>> {
    None
}

/// Builds the gateway's routing table and upstream pools from a validated config.
pub fn build_gateway(config: &Config, metrics: &Metrics, filters: FilterFactory<'_>) -> Gateway {
    let names: Vec<&String> = config.upstreams.keys().collect();
    let upstreams = config
        .upstreams
        .iter()
        .map(|(name, upstream)| Upstream::from_config(name, upstream, metrics))
        .collect();
    let routes = config
        .routes
        .iter()
        .map(|r| {
            let name = r
                .name
                .clone()
                .unwrap_or_else(|| r.path_prefix.get_ref().clone());
            let filter = filters(r);
            if filter.is_none() && r.idempotency.as_ref().is_some_and(|i| i.enabled) {
                // The engine (keel-idempotency) is wired in as this route's
                // RequestFilter in the next phase.
                tracing::warn!(
                    route = name,
                    "idempotency is configured but not active in this build"
                );
            }
            let stale =
                r.stale.as_ref().filter(|s| s.enabled).map(|s| {
                    crate::resilience::StaleCache::new(s, metrics.resilience().stale(&name))
                });
            Route {
                metrics: metrics.route(&name),
                name,
                prefix: r.path_prefix.get_ref().clone(),
                host: r.host.as_ref().map(|h| h.to_ascii_lowercase()),
                methods: r.methods.as_ref().map(|ms| {
                    ms.iter()
                        .filter_map(|m| Method::from_bytes(m.get_ref().as_bytes()).ok())
                        .collect()
                }),
                upstream: names
                    .iter()
                    .position(|n| *n == r.upstream.get_ref())
                    .unwrap_or(0),
                max_body_size: r.max_body_size.unwrap_or(config.server.max_body_size).0,
                filter,
                stale,
            }
        })
        .collect();
    Gateway {
        router: Router::new(routes),
        upstreams,
        settings: ProxySettings {
            max_header_size: usize::try_from(config.server.max_header_size.0).unwrap_or(usize::MAX),
            via: config.server.via,
            access_log: config.log.access_log,
        },
        unmatched: metrics.route("-"),
    }
}

/// A started gateway.
pub struct Running {
    /// Data-plane address actually bound.
    pub listen: SocketAddr,
    /// Admin address actually bound, if any.
    pub admin: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    listeners_ready: ReadinessHandle,
    connections: ConnectionCount,
    shutdown_delay: Duration,
    deadline: Duration,
}

/// Binds everything and starts serving; returns once the listeners are up.
pub async fn start(config: &Config) -> Result<Running, ServeError> {
    let started = Instant::now();
    let metrics = Arc::new(Metrics::new());
    let gateway: &'static Gateway =
        Box::leak(Box::new(build_gateway(config, &metrics, &no_filters)));
    let readiness = Readiness::default();
    let listeners_ready = readiness.register("listeners", "starting");
    let (shutdown, shutdown_rx) = watch::channel(false);

    let settings = ConnectionSettings {
        idle_timeout: config.server.idle_timeout.0,
        max_header_size: usize::try_from(config.server.max_header_size.0).unwrap_or(usize::MAX),
    };
    let addr = config.listen_addr();
    let data_plane = DataPlane::bind(addr, gateway, &settings)
        .await
        .map_err(|source| ServeError::Bind {
            what: "listen",
            addr,
            source,
        })?;
    let listen = data_plane.local_addr().unwrap_or(addr);
    let connections = data_plane.connections();

    let mut admin = None;
    if let Some(admin_addr) = config.admin_addr() {
        let listener = TcpListener::bind(admin_addr)
            .await
            .map_err(|source| ServeError::Bind {
                what: "admin_listen",
                addr: admin_addr,
                source,
            })?;
        admin = Some(listener.local_addr().unwrap_or(admin_addr));
        let state = Arc::new(AdminState {
            gateway,
            metrics: metrics.clone(),
            readiness: readiness.clone(),
            listen,
            connections: connections.clone(),
            started,
            draining: shutdown_rx.clone(),
        });
        tokio::spawn(admin::run(listener, state, shutdown_rx.clone()));
    }
    crate::resilience::start(gateway, &shutdown_rx);
    tokio::spawn(data_plane.run(shutdown_rx));
    listeners_ready.set_ready();
    tracing::info!(%listen, admin = ?admin, "keel is serving");
    Ok(Running {
        listen,
        admin,
        shutdown,
        listeners_ready,
        connections,
        shutdown_delay: config.drain.shutdown_delay.0,
        deadline: config.drain.deadline.0,
    })
}

impl Running {
    /// Waits for SIGTERM or SIGINT, then drains: readiness fails at once,
    /// traffic is still served for `shutdown_delay`, then the listener
    /// stops accepting and connections are asked to finish, up to `deadline`.
    pub async fn wait_and_drain(self) -> Result<(), ServeError> {
        wait_for_signal().await?;
        tracing::info!("signal received: draining");
        self.listeners_ready.set_not_ready("draining");
        tokio::time::sleep(self.shutdown_delay).await;
        let _ = self.shutdown.send(true);
        let deadline = Instant::now() + self.deadline;
        while self.connections.get() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::info!(open = self.connections.get(), "drained");
        Ok(())
    }
}

async fn wait_for_signal() -> Result<(), ServeError> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(ServeError::Signals)?;
    tokio::select! {
        _ = term.recv() => {}
        result = tokio::signal::ctrl_c() => result.map_err(ServeError::Signals)?,
    }
    Ok(())
}
