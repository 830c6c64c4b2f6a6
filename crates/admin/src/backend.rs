//! What the admin server asks of the gateway it reports on.

use std::future::Future;
use std::pin::Pin;

use crate::dto::{
    BreakerSnapshot, DrainProgress, DrainReport, KeyAnswer, KeyQuery, ReadinessReport, Status,
};

/// A boxed, sendable future: what the async backend methods return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The gateway side of the admin API: the server does the HTTP (routing,
/// queries, limits) and asks this for the answers.
///
/// Every method but the idempotency one is synchronous and cheap: they
/// read counters and snapshots, and start work (a drain) without waiting
/// for it.
pub trait AdminBackend: Send + Sync + 'static {
    /// `GET /status`.
    fn status(&self) -> Status;

    /// `GET /readyz`.
    fn readiness(&self) -> ReadinessReport;

    /// `GET /metrics`, in the OpenMetrics text format.
    fn metrics_text(&self) -> String;

    /// `GET /drain`: the shutdown's phase and progress, and every endpoint
    /// drain.
    fn drain_report(&self) -> DrainReport;

    /// `POST /drain`: asks for the shutdown sequence; false if it was
    /// already asked for.
    fn start_drain(&self) -> bool;

    /// `POST /upstreams/{upstream}/endpoints/drain?endpoint=URL`: takes the
    /// endpoint out of service and starts closing its tunnels.
    fn drain_endpoint(
        &self,
        upstream: &str,
        endpoint: &str,
    ) -> Result<DrainProgress, EndpointDrainError>;

    /// `POST /upstreams/{upstream}/endpoints/resume?endpoint=URL`: puts the
    /// endpoint back in service; returns whether it was draining.
    fn resume_endpoint(&self, upstream: &str, endpoint: &str) -> Result<bool, EndpointDrainError>;

    /// The upstream names, for `POST /breakers/{upstream}/{action}` to tell
    /// an unknown upstream from an unknown action.
    fn upstream_names(&self) -> Vec<String>;

    /// `POST /breakers/{upstream}/{action}`: applies an operator override;
    /// returns the upstream-wide breaker afterwards.
    fn breaker_action(
        &self,
        upstream: &str,
        action: BreakerAction,
    ) -> Result<BreakerSnapshot, BreakerActionError>;

    /// `/idempotency/keys`, or `None` when no route is idempotent.
    fn idempotency_keys(&self) -> Option<&dyn IdempotencyKeys>;
}

/// `GET` and `DELETE /idempotency/keys`: the idempotency store seen by an
/// operator.
pub trait IdempotencyKeys: Send + Sync {
    /// What the store holds for the key of `query`; with `remove`, also
    /// removes its record so the next request with the key runs.
    fn lookup<'a>(
        &'a self,
        query: &'a KeyQuery,
        remove: bool,
    ) -> BoxFuture<'a, Result<KeyAnswer, KeyError>>;
}

/// Why an idempotency key lookup failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The question is wrong (unknown route, bad method): 400.
    #[error("{0}")]
    BadRequest(String),
    /// The store did not answer: 503.
    #[error("{0}")]
    Unavailable(String),
}

/// Why an endpoint drain or resume was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointDrainError {
    /// No upstream by that name: 404.
    #[error("no upstream named {0:?}")]
    NoUpstream(String),
    /// The upstream has no such endpoint: 404.
    #[error("upstream {upstream:?} has no endpoint {endpoint:?}")]
    NoEndpoint {
        /// The upstream.
        upstream: String,
        /// The URL asked for.
        endpoint: String,
    },
    /// Draining it would leave the upstream with no endpoint in service: 409.
    #[error(
        "{0:?} is the last endpoint in service of its upstream; drain another or resume one first"
    )]
    LastEndpoint(String),
}

/// The operator overrides of `POST /breakers/{upstream}/{action}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BreakerAction {
    /// Blow the upstream's breaker now: every request is refused (or
    /// served stale) until `reset` or `enable`.
    Melt,
    /// Close every breaker of the upstream and lift a melt.
    Reset,
    /// Let everything through; outcomes are counted but change nothing.
    Disable,
    /// Back to normal operation.
    Enable,
}

impl BreakerAction {
    /// The action named in the path (`melt`, `reset`, `disable`, `enable`).
    ///
    /// ```
    /// use keel_admin::BreakerAction;
    /// assert_eq!(BreakerAction::parse("melt"), Some(BreakerAction::Melt));
    /// assert_eq!(BreakerAction::parse("explode"), None);
    /// ```
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "melt" => BreakerAction::Melt,
            "reset" => BreakerAction::Reset,
            "disable" => BreakerAction::Disable,
            "enable" => BreakerAction::Enable,
            _ => return None,
        })
    }

    /// The name in the path.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerAction::Melt => "melt",
            BreakerAction::Reset => "reset",
            BreakerAction::Disable => "disable",
            BreakerAction::Enable => "enable",
        }
    }
}

/// Why a breaker override was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BreakerActionError {
    /// No upstream by that name: 404.
    #[error("unknown upstream {0:?}")]
    UnknownUpstream(String),
    /// The config disables breakers for the upstream: 409.
    #[error("breakers are disabled for upstream {0:?} in the config")]
    Disabled(String),
}
