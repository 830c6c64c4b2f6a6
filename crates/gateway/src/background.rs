//! The gateway's background tasks as supervised children: one active health
//! check per checked endpoint, one metrics watcher per breaker, and the
//! sweeper of the endpoints' idle connection pools. Each runs
//! until the tree cancels it; a task that dies is restarted by its
//! supervisor.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use keel_supervisor::{ChildSpec, Shutdown};
use keel_upstream::health;
use keel_upstream::{Endpoint, Upstream};

/// How often idle upstream connections are looked over.
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// The active health checks, one child per checked endpoint (named
/// `UPSTREAM-N`), for the tree's `health` supervisor.
pub fn health_children<'a>(upstreams: impl IntoIterator<Item = &'a Upstream>) -> Vec<ChildSpec> {
    let mut seen: HashMap<Arc<str>, usize> = HashMap::new();
    health::checks(upstreams)
        .into_iter()
        .map(|check| {
            let n = seen.entry(check.upstream.clone()).or_default();
            let name = format!("{}-{n}", check.upstream);
            *n += 1;
            task_child(name, move || check.clone().run())
        })
        .collect()
}

/// The breaker watchers (they keep `keel_breaker_state` and the transition
/// counters current), one child per breaker (named `UPSTREAM-N`, numbered
/// across the gateway), for the tree's `breakers` supervisor.
pub fn breaker_children<'a>(upstreams: impl IntoIterator<Item = &'a Upstream>) -> Vec<ChildSpec> {
    upstreams
        .into_iter()
        .flat_map(Upstream::breaker_watchers)
        .enumerate()
        .map(|(i, watcher)| {
            let name = format!("{}-{i}", watcher.name());
            task_child(name, move || watcher.clone().run())
        })
        .collect()
}

/// The child (named `pools`) that, every second, closes the idle upstream
/// connections that expired or that their upstream closed. An idle
/// connection has no task of its own watching it (requests drive their
/// connections), so without this one the upstream's FIN would leave it
/// half-closed, holding a socket, until a request or a check-in on its
/// shard came by.
pub fn pool_sweeper<'a>(upstreams: impl IntoIterator<Item = &'a Upstream>) -> ChildSpec {
    let endpoints: Arc<[Arc<Endpoint>]> = upstreams
        .into_iter()
        .flat_map(|upstream| upstream.endpoints.iter().cloned())
        .collect();
    task_child("pools".to_owned(), move || {
        let endpoints = endpoints.clone();
        async move {
            let mut every = tokio::time::interval(SWEEP_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                for endpoint in endpoints.iter() {
                    let closed = endpoint.sweep_idle();
                    if closed > 0 {
                        tracing::debug!(
                            endpoint = endpoint.url,
                            closed,
                            "idle upstream connections closed"
                        );
                    }
                }
            }
        }
    })
}

/// A child that runs the task `make` gives until the tree cancels it. The
/// tasks hold no state worth a graceful stop, so the tree stops them at
/// once (`Shutdown::Brutal`).
fn task_child<F, T>(name: String, make: F) -> ChildSpec
where
    F: Fn() -> T + Send + Sync + 'static,
    T: Future<Output = ()> + Send + 'static,
{
    ChildSpec::new(name, move |ctx| {
        let task = make();
        async move {
            ctx.ready();
            tokio::select! {
                () = task => {}
                () = ctx.cancelled() => {}
            }
            Ok(())
        }
    })
    .shutdown(Shutdown::Brutal)
}
