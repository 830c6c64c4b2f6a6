//! Typed lifecycle events, delivered as a broadcast stream.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;

use crate::spec::ExitReason;

/// Something that happened to one node of a tree.
///
/// ```
/// use keel_supervisor::{ChildSpec, EventKind, Supervisor};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let sup = Supervisor::builder("root")
///     .child(ChildSpec::new("w", |ctx| async move { ctx.ready(); ctx.cancelled().await; Ok(()) }))
///     .build()
///     .unwrap();
/// let mut events = sup.events();
/// let handle = sup.start().await.unwrap();
/// let first = events.recv().await.unwrap();
/// assert_eq!(&*first.path, "root/w");
/// assert_eq!(first.kind, EventKind::Started);
/// handle.shutdown().await;
/// # }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Event {
    /// The node's path, names from the root joined with `/`.
    pub path: Arc<str>,
    /// What happened.
    pub kind: EventKind,
}

/// The kinds of [`Event`].
///
/// More may be added, so a `match` on it needs a wildcard arm.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum EventKind {
    /// Its body was spawned.
    Started,
    /// It said it is ready.
    Ready,
    /// It said it is initialised but not ready, or no longer ready.
    NotReady {
        /// The reason it gave.
        reason: String,
    },
    /// Its body ended.
    Exited {
        /// Why.
        reason: ExitReason,
    },
    /// It failed to start.
    StartFailed {
        /// Why.
        reason: ExitReason,
    },
    /// It is being started again; `restarts` counts restarts so far.
    Restarted {
        /// Restarts of this child so far, this one included.
        restarts: u64,
        /// The delay before the new start (zero without backoff).
        delay: Duration,
    },
    /// Its fuse blew; it rests for `cool_down`.
    Parked {
        /// How long it rests.
        cool_down: Duration,
    },
    /// A supervisor exceeded its restart intensity, stopped its children
    /// and exited with reason `shutdown` (OTP's) for its parent to decide.
    Escalated {
        /// The path of the child whose exit exceeded the intensity.
        child: Arc<str>,
        /// Restarts in the window when it gave up, the refused one
        /// included.
        restarts: usize,
    },
    /// A supervisor shut itself down because significant children exited.
    AutoShutdown,
    /// It was stopped and will not run again.
    Stopped,
}

pub(crate) type EventSender = broadcast::Sender<Event>;

pub(crate) fn channel() -> EventSender {
    broadcast::channel(1024).0
}

pub(crate) fn emit(tx: &EventSender, path: Arc<str>, kind: EventKind) {
    tracing::debug!(target: "keel_supervisor", path = &*path, event = ?kind, "lifecycle");
    // Nobody listening is fine: events are for whoever subscribed.
    let _ = tx.send(Event { path, kind });
}
