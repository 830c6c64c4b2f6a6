//! The gateway's background tasks as supervised children: one active health
//! check per checked endpoint, one metrics watcher per breaker. Each runs
//! until the tree cancels it; a task that dies is restarted by its
//! supervisor.

use std::collections::HashMap;

use keel_supervisor::{ChildSpec, Shutdown};
use keel_upstream::Upstream;
use keel_upstream::breakers::BreakerWatcher;
use keel_upstream::health::{self, HealthCheck};

/// The active health checks, one child per checked endpoint (named
/// `UPSTREAM-N`), for the tree's `health` supervisor.
pub fn health_children<'a>(upstreams: impl IntoIterator<Item = &'a Upstream>) -> Vec<ChildSpec> {
    let mut seen: HashMap<std::sync::Arc<str>, usize> = HashMap::new();
    health::checks(upstreams)
        .into_iter()
        .map(|check| {
            let n = seen.entry(check.upstream.clone()).or_default();
            let name = format!("{}-{n}", check.upstream);
            *n += 1;
            ChildSpec::new(name, move |ctx| {
                let check: HealthCheck = check.clone();
                async move {
                    ctx.ready();
                    tokio::select! {
                        () = check.run() => {}
                        () = ctx.cancelled() => {}
                    }
                    Ok(())
                }
            })
            .shutdown(Shutdown::Brutal)
        })
        .collect()
}

/// The breaker watchers (they keep `keel_breaker_state` and the transition
/// counters current), one child per breaker, for the tree's `breakers`
/// supervisor.
pub fn breaker_children<'a>(upstreams: impl IntoIterator<Item = &'a Upstream>) -> Vec<ChildSpec> {
    upstreams
        .into_iter()
        .flat_map(Upstream::breaker_watchers)
        .enumerate()
        .map(|(i, watcher)| {
            let name = format!("{}-{i}", watcher.name());
            ChildSpec::new(name, move |ctx| {
                let watcher: BreakerWatcher = watcher.clone();
                async move {
                    ctx.ready();
                    tokio::select! {
                        () = watcher.run() => {}
                        () = ctx.cancelled() => {}
                    }
                    Ok(())
                }
            })
            .shutdown(Shutdown::Brutal)
        })
        .collect()
}
