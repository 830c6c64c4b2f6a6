//! What a running child gets from its supervisor.

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::event::{self, EventKind, EventSender};
use crate::node::{ChildState, Node};

/// The handle a child's body uses to report readiness and to learn that it
/// must stop.
///
/// ```
/// use keel_supervisor::{ChildSpec, ChildContext, ChildResult};
///
/// async fn connector(ctx: ChildContext) -> ChildResult {
///     // Initialised: let the supervisor start the next sibling, but say
///     // we are not ready for traffic until the dependency answers.
///     ctx.defer("connecting to the database");
///     tokio::select! {
///         _ = ctx.cancelled() => return Ok(()),
///         _ = tokio::time::sleep(std::time::Duration::from_millis(1)) => {}
///     }
///     ctx.ready();
///     ctx.cancelled().await;
///     Ok(())
/// }
/// let spec = ChildSpec::new("db", connector);
/// # let _ = spec;
/// ```
pub struct ChildContext {
    pub(crate) node: Arc<Node>,
    pub(crate) generation: u64,
    pub(crate) token: CancellationToken,
    pub(crate) init: watch::Sender<bool>,
    pub(crate) events: EventSender,
}

impl ChildContext {
    /// Initialised and ready for work. The supervisor starts the next
    /// sibling once this (or [`defer`](Self::defer)) is called.
    pub fn ready(&self) {
        self.set(true, None);
    }

    /// Initialised, but not ready yet: the supervisor goes on starting
    /// siblings while this child finishes its slow setup (OTP's
    /// `handle_continue`). Call [`ready`](Self::ready) when done.
    pub fn defer(&self, reason: impl Into<String>) {
        self.set(false, Some(reason.into()));
    }

    /// No longer ready (a dependency went away), without exiting. The tree
    /// reports not ready with this reason until [`ready`](Self::ready) is
    /// called again.
    pub fn not_ready(&self, reason: impl Into<String>) {
        self.set(false, Some(reason.into()));
    }

    /// Resolves when the supervisor asks this child to stop. A child that
    /// does not return within its shutdown timeout is aborted.
    pub async fn cancelled(&self) {
        self.token.cancelled().await;
    }

    /// True once the supervisor asked this child to stop.
    pub fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }

    /// The cancellation token, for handing to code that takes one.
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// This child's path in the tree (`root/api/listener`).
    pub fn path(&self) -> Arc<str> {
        self.node.path()
    }

    fn set(&self, ready: bool, reason: Option<String>) {
        let changed = {
            let mut s = self.node.state();
            if s.generation != self.generation {
                return; // a late call from an earlier run
            }
            if s.state == ChildState::Starting {
                s.state = ChildState::Running;
            }
            let changed = s.ready != ready || s.reason != reason;
            s.ready = ready;
            s.reason.clone_from(&reason);
            changed
        };
        self.init.send_replace(true);
        if changed {
            let kind = match reason {
                None => EventKind::Ready,
                Some(reason) => EventKind::NotReady { reason },
            };
            event::emit(&self.events, self.node.path(), kind);
        }
    }
}
