//! The shared, observable state of a tree: one node per child.
//!
//! The supervisor task is the only writer of its children's lifecycle
//! states; children write their own readiness. Readers (snapshots,
//! `/readyz`) take each node's small lock briefly. Nothing on a request path
//! touches these locks: they change only on lifecycle transitions.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use serde::Serialize;
use tokio::time::Instant;

/// Whether a node is a worker or a supervisor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A plain child task.
    Worker,
    /// A nested supervisor.
    Supervisor,
}

/// Where a child is in its life.
///
/// More may be added, so a `match` on it needs a wildcard arm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ChildState {
    /// Not started yet (or being started again later by its supervisor).
    Idle,
    /// Its body runs but has not called `ready()` or `defer()` yet.
    Starting,
    /// Initialised and running (see `ready` for readiness).
    Running,
    /// Exited; waiting for its restart delay.
    Restarting,
    /// Its fuse blew; resting until the cool-down ends.
    Parked,
    /// Exited and will not be restarted.
    Stopped,
    /// Failed to start and was left out by a start handler's `Continue`.
    Failed,
}

#[derive(Debug)]
pub(crate) struct NodeState {
    pub(crate) state: ChildState,
    pub(crate) ready: bool,
    pub(crate) reason: Option<String>,
    pub(crate) restarts: u64,
    pub(crate) started_at: Option<Instant>,
    pub(crate) last_exit: Option<String>,
    /// For a supervisor: why it last gave up, if it ever did.
    pub(crate) escalation: Option<Escalation>,
    /// Which run of the child this state belongs to; a child's late writes
    /// from an earlier run are ignored.
    pub(crate) generation: u64,
}

#[derive(Debug)]
pub(crate) struct Node {
    name: String,
    kind: Kind,
    strategy: Option<&'static str>,
    path: OnceLock<Arc<str>>,
    required: AtomicBool,
    state: Mutex<NodeState>,
    children: Mutex<Vec<Arc<Node>>>,
}

impl Node {
    pub(crate) fn new(name: String, kind: Kind, strategy: Option<&'static str>) -> Arc<Self> {
        Arc::new(Self {
            name,
            kind,
            strategy,
            path: OnceLock::new(),
            required: AtomicBool::new(true),
            state: Mutex::new(NodeState {
                state: ChildState::Idle,
                ready: false,
                reason: None,
                restarts: 0,
                started_at: None,
                last_exit: None,
                escalation: None,
                generation: 0,
            }),
            children: Mutex::new(Vec::new()),
        })
    }

    /// A node with the same name, kind and flags but fresh state.
    pub(crate) fn fresh_copy(&self) -> Arc<Self> {
        let node = Node::new(self.name.clone(), self.kind, self.strategy);
        node.set_required(self.is_required());
        node
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn path(&self) -> Arc<str> {
        self.path
            .get_or_init(|| Arc::from(self.name.as_str()))
            .clone()
    }

    /// Fixes this node's path under `parent` (the first parent wins).
    pub(crate) fn attach(&self, parent: &str) {
        let _ = self.path.set(Arc::from(format!("{parent}/{}", self.name)));
    }

    pub(crate) fn set_required(&self, required: bool) {
        self.required.store(required, Ordering::Relaxed);
    }

    pub(crate) fn is_required(&self) -> bool {
        self.required.load(Ordering::Relaxed)
    }

    pub(crate) fn state(&self) -> MutexGuard<'_, NodeState> {
        // A panic while holding this lock cannot leave the state half
        // written in a way that matters (every write is a plain field set),
        // so a poisoned lock is still safe to use.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn children(&self) -> MutexGuard<'_, Vec<Arc<Node>>> {
        self.children.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn set_children(&self, children: Vec<Arc<Node>>) {
        *self.children() = children;
    }

    pub(crate) fn push_child(&self, child: Arc<Node>) {
        self.children().push(child);
    }

    pub(crate) fn remove_child(&self, child: &Arc<Node>) {
        self.children().retain(|c| !Arc::ptr_eq(c, child));
    }

    /// Collects the paths and reasons of everything that keeps this subtree
    /// from being ready.
    fn not_ready(&self, out: &mut Vec<NotReady>) {
        if !self.is_required() {
            return;
        }
        let (state, ready, reason) = {
            let s = self.state();
            (s.state, s.ready, s.reason.clone())
        };
        let blocking = match state {
            ChildState::Running => !ready,
            ChildState::Stopped => false,
            _ => true,
        };
        if blocking {
            out.push(NotReady {
                path: self.path().to_string(),
                state,
                reason: reason.unwrap_or_else(|| describe(state).to_string()),
            });
        }
        if state == ChildState::Running {
            let children: Vec<Arc<Node>> = self.children().clone();
            for c in children {
                c.not_ready(out);
            }
        }
    }

    pub(crate) fn snapshot(&self, now: Instant) -> Snapshot {
        let s = self.state();
        let (state, ready, reason, restarts, last_exit, escalation) = (
            s.state,
            s.ready,
            s.reason.clone(),
            s.restarts,
            s.last_exit.clone(),
            s.escalation.clone(),
        );
        let uptime_ms = match (s.state, s.started_at) {
            (ChildState::Running | ChildState::Starting, Some(t)) => Some(
                u64::try_from(now.saturating_duration_since(t).as_millis()).unwrap_or(u64::MAX),
            ),
            _ => None,
        };
        drop(s);
        let children: Vec<Arc<Node>> = self.children().clone();
        Snapshot {
            name: self.name.clone(),
            path: self.path().to_string(),
            kind: self.kind,
            strategy: self.strategy,
            state,
            ready,
            required: self.is_required(),
            reason,
            restarts,
            uptime_ms,
            last_exit,
            escalation,
            children: children.iter().map(|c| c.snapshot(now)).collect(),
        }
    }
}

/// Why a supervisor gave up: the detail its `shutdown` exit reason does not
/// carry (OTP logs it; here it is in the [`Snapshot`] and the
/// [`crate::EventKind::Escalated`] event).
///
/// ```
/// use keel_supervisor::Escalation;
/// let e = Escalation { child: "root/db".into(), restarts: 4 };
/// assert_eq!(
///     serde_json::to_string(&e).unwrap(),
///     r#"{"child":"root/db","restarts":4}"#
/// );
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Escalation {
    /// The path of the child whose exit exceeded the intensity.
    pub child: String,
    /// Restarts inside the window, the one refused included.
    pub restarts: usize,
}

fn describe(state: ChildState) -> &'static str {
    match state {
        ChildState::Idle => "not started",
        ChildState::Starting => "starting",
        ChildState::Running => "running, not ready",
        ChildState::Restarting => "restarting",
        ChildState::Parked => "parked by its fuse",
        ChildState::Stopped => "stopped",
        ChildState::Failed => "failed to start",
    }
}

/// A serialisable picture of a node and everything under it.
///
/// ```
/// use keel_supervisor::{ChildSpec, Supervisor};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let sup = Supervisor::builder("root")
///     .child(ChildSpec::new("worker", |ctx| async move {
///         ctx.ready();
///         ctx.cancelled().await;
///         Ok(())
///     }))
///     .build()
///     .unwrap();
/// let handle = sup.start().await.unwrap();
/// let snap = handle.snapshot();
/// assert_eq!(snap.children[0].path, "root/worker");
/// let json = serde_json::to_string(&snap).unwrap();
/// assert!(json.contains("\"state\":\"running\""));
/// handle.shutdown().await;
/// # }
/// ```
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct Snapshot {
    /// The child's own name.
    pub name: String,
    /// Names from the root down, joined with `/`.
    pub path: String,
    /// Worker or supervisor.
    pub kind: Kind,
    /// The restart strategy, for supervisors.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strategy: Option<&'static str>,
    /// Where it is in its life.
    pub state: ChildState,
    /// Whether it said it is ready.
    pub ready: bool,
    /// Whether its readiness counts for the tree's.
    pub required: bool,
    /// Why it is not ready, when it said so.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// How many times it was restarted.
    pub restarts: u64,
    /// Milliseconds since its current run started, while running.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uptime_ms: Option<u64>,
    /// Why it last exited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<String>,
    /// For a supervisor that exceeded its restart intensity: which child's
    /// exit tipped it over and how many restarts the window held. Its exit
    /// reason is `shutdown`, as in OTP; this is where the detail is kept.
    pub escalation: Option<Escalation>,
    /// Its children, in start order (supervisors only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<Snapshot>,
}

/// One thing that keeps a tree from being ready.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct NotReady {
    /// The child's path.
    pub path: String,
    /// Its state.
    pub state: ChildState,
    /// The reason it gave, or a description of its state.
    pub reason: String,
}

/// Read-only access to a tree's state: readiness and snapshots.
///
/// Cheap to clone; valid before the tree starts and after it stops.
///
/// ```
/// use keel_supervisor::{ChildSpec, Supervisor};
///
/// let sup = Supervisor::builder("root")
///     .child(ChildSpec::new("db", |ctx| async move { ctx.ready(); Ok(()) }))
///     .build()
///     .unwrap();
/// let probe = sup.probe();
/// // Not started yet, so not ready, and it says why.
/// assert!(!probe.is_ready());
/// assert_eq!(probe.not_ready()[0].path, "root");
/// ```
#[derive(Clone, Debug)]
pub struct TreeProbe {
    pub(crate) root: Arc<Node>,
}

impl TreeProbe {
    /// True when every required child in the tree is running and ready.
    pub fn is_ready(&self) -> bool {
        self.not_ready().is_empty()
    }

    /// Everything that keeps the tree from being ready, outermost first.
    pub fn not_ready(&self) -> Vec<NotReady> {
        let mut out = Vec::new();
        self.root.not_ready(&mut out);
        out
    }

    /// A snapshot of the whole tree.
    pub fn snapshot(&self) -> Snapshot {
        self.root.snapshot(Instant::now())
    }
}
