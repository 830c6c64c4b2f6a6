//! Resilience around the upstream request: what the gateway does when a
//! dependency is sick.
//!
//! * [`breakers`]: one keel-breaker per endpoint (outlier ejection: an open
//!   endpoint gets no traffic) and one per upstream (trips on the failure
//!   rate of whole requests, and carries operator overrides);
//! * [`health`]: active HTTP health checks, one background task per
//!   endpoint, shaped as a bound value plus `run(shutdown)` so a supervisor
//!   can own them;
//! * [`retry`]: the attempt loop of phase 6: a breaker permit around each
//!   attempt, retries of safe requests to another endpoint with keel-retry's
//!   backoff, a per-upstream budget, the upstream timeout over all attempts;
//! * [`stale`]: a bounded per-route cache of GET/HEAD responses that answers
//!   only when the upstream failed or its breakers are open.
//!
//! Nothing here takes a lock on the request path except the stale cache,
//! which is sharded and only touched on routes that enable it.

pub mod breakers;
pub mod health;
pub mod retry;
pub mod stale;

use tokio::sync::watch;

use crate::proxy::Gateway;

pub use breakers::{EndpointGuard, UpstreamResilience};
#[allow(
    unused_imports,
    reason = "the hook the idempotency filter sets on requests it made safe to repeat"
)]
pub use retry::RetrySafe;
pub use stale::StaleCache;

/// Starts the background parts: health checks and breaker event watchers.
/// Each task ends when `shutdown` turns true. The supervision wiring can
/// instead take [`health::checks`] and [`breakers::watchers`] and run each
/// as a child.
pub fn start(gateway: &'static Gateway, shutdown: &watch::Receiver<bool>) {
    for watcher in breakers::watchers(gateway) {
        tokio::spawn(watcher.run(shutdown.clone()));
    }
}

/// The active health checks, one supervised child per checked endpoint
/// (named `UPSTREAM-N`), for the gateway tree's `health` supervisor. A check
/// that dies is restarted by it; shutting the tree down stops them.
pub fn health_children(gateway: &'static Gateway) -> Vec<keel_supervisor::ChildSpec> {
    let mut seen: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    health::checks(gateway)
        .into_iter()
        .map(|check| {
            let n = seen.entry(check.upstream).or_default();
            let name = format!("{}-{n}", check.upstream);
            *n += 1;
            let health::HealthCheck {
                upstream,
                endpoint,
                config,
            } = check;
            keel_supervisor::ChildSpec::new(name, move |ctx| {
                let check = health::HealthCheck {
                    upstream,
                    endpoint,
                    config: config.clone(),
                };
                async move {
                    ctx.ready();
                    // The check's own stop signal is never raised: the
                    // supervisor stops it by cancellation.
                    let (_never, stop) = watch::channel(false);
                    tokio::select! {
                        () = check.run(stop) => {}
                        () = ctx.cancelled() => {}
                    }
                    Ok(())
                }
            })
            .shutdown(keel_supervisor::Shutdown::Brutal)
        })
        .collect()
}
