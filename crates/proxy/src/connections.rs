//! The gateway's open connections and tunnels, registered for draining: one
//! value per gateway, shared by its listener, its tunnels and its drain
//! (no process-wide state, so two gateways in one process drain apart).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use keel_drain::{CloseRequest, ConnId, ConnKind, Registration, Registry};

/// The connection registry and the drain's hint for late tunnels.
#[derive(Debug)]
pub struct Connections {
    registry: Registry,
    /// Set once the shutdown drain has started, with the hint window in
    /// milliseconds (0: not draining): a tunnel upgraded after that (its
    /// request was in flight) is asked to close as soon as it exists.
    late_window_ms: AtomicU64,
}

impl Default for Connections {
    fn default() -> Self {
        Connections {
            registry: Registry::new(),
            late_window_ms: AtomicU64::new(0),
        }
    }
}

impl Connections {
    /// The registry the drain walks.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Registers a connection or tunnel (`endpoint`: the upstream endpoint
    /// a tunnel leads to, for an endpoint drain).
    pub fn register(&self, kind: ConnKind, endpoint: Option<std::sync::Arc<str>>) -> Registration {
        self.registry.register(kind, endpoint)
    }

    /// From now on, tunnels registered late are asked to reconnect within
    /// `window` (zero: no longer draining).
    pub fn set_late_window(&self, window: Duration) {
        let ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
        self.late_window_ms.store(ms, Ordering::Relaxed);
    }

    /// Registers a tunnel; when the shutdown drain has already begun, it is
    /// asked at once to leave with the others (a hint spread by its id).
    pub fn register_tunnel(&self, endpoint: Option<std::sync::Arc<str>>) -> Registration {
        let registration = self.registry.register(ConnKind::TUNNEL, endpoint);
        if let Some(close) = self.late_close(registration.id()) {
            self.registry.close(registration.id(), close);
        }
        registration
    }

    /// For a tunnel registered after the shutdown drain began: the close
    /// request to send it at once, or `None`.
    fn late_close(&self, id: ConnId) -> Option<CloseRequest> {
        let window = self.late_window_ms.load(Ordering::Relaxed);
        (window > 0).then(|| {
            // A seeded draw per id: spread, no shared generator state.
            let spread = fastrand::Rng::with_seed(id.get()).u64(..window);
            CloseRequest {
                force: false,
                reconnect_after: Duration::from_millis(spread),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn late_tunnels_get_a_spread_hint_only_while_draining() {
        let connections = Connections::default();
        assert_eq!(connections.late_close(ConnId::new(1)), None);
        connections.set_late_window(Duration::from_secs(1));
        let hints: std::collections::BTreeSet<u128> = (0..100)
            .map(|i| {
                let close = connections.late_close(ConnId::new(i)).expect("draining");
                assert!(!close.force);
                close.reconnect_after.as_millis()
            })
            .collect();
        assert!(
            hints.len() > 80 && hints.iter().all(|h| *h < 1000),
            "{hints:?}"
        );
        connections.set_late_window(Duration::ZERO);
        assert_eq!(connections.late_close(ConnId::new(1)), None);
    }
}
