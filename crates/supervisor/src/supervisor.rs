//! The supervisor: builder, handle, and the task that runs a tree level.
//!
//! One supervisor is one tokio task that owns its children's tasks (a
//! `JoinSet`), much as an OTP supervisor is one process linked to its
//! children. It reacts to three things: a child's exit, a command
//! (start or stop a child), and a timer (a delayed restart or the end of a
//! parked child's cool-down). Starting a child blocks the supervisor until
//! the child is initialised, exactly as OTP's synchronous `init` does; exits
//! and stop requests that arrive meanwhile wait until it is over. Every exit
//! is tagged with the incarnation it ends, so one queued while the
//! supervisor was busy is never taken for a crash of a later incarnation.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::{AbortHandle, Id, JoinError, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::context::ChildContext;
use crate::event::{self, Event, EventKind, EventSender};
use crate::node::{ChildState, Escalation, Kind, Node, Snapshot, TreeProbe};
use crate::spec::{ChildError, ChildResult, ChildSpec, ExitReason, Restart, Shutdown};

/// How a supervisor reacts when a child exits and must be restarted.
///
/// ```
/// use keel_supervisor::Strategy;
/// assert_eq!(Strategy::default(), Strategy::OneForOne);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Strategy {
    /// Restart only the child that exited.
    #[default]
    OneForOne,
    /// Stop every other child (reverse start order), then restart all.
    OneForAll,
    /// Stop the children started after the one that exited (reverse
    /// order), then restart it and them in start order.
    RestForOne,
    /// Children of one kind added and removed at run time
    /// ([`SupervisorControl::start_child`]), restarted one for one, at most
    /// `max_children` at once (Elixir's `DynamicSupervisor`).
    Dynamic {
        /// The most children alive at once; `None` for no limit.
        max_children: Option<usize>,
    },
}

impl Strategy {
    fn label(self) -> &'static str {
        match self {
            Strategy::OneForOne => "one_for_one",
            Strategy::OneForAll => "one_for_all",
            Strategy::RestForOne => "rest_for_one",
            Strategy::Dynamic { .. } => "dynamic",
        }
    }
}

/// When a supervisor shuts itself down because significant children
/// exited (OTP 24's `auto_shutdown`).
///
/// ```
/// use keel_supervisor::AutoShutdown;
/// assert_eq!(AutoShutdown::default(), AutoShutdown::Never);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AutoShutdown {
    /// Significant children change nothing.
    #[default]
    Never,
    /// Shut down once any significant child exited and is not restarted.
    AnySignificant,
    /// Shut down once all significant children exited and are not
    /// restarted.
    AllSignificant,
}

/// A top-level child that failed to start, handed to a start handler.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct StartFailure {
    /// The child's path.
    pub child: String,
    /// Why it failed.
    pub reason: ExitReason,
    /// How many times it has failed to start so far (1 on the first).
    pub attempt: u32,
}

/// What a start handler decides about a child that failed to start (the
/// typed answer to what Nerves `shoehorn` decides by reading logs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartDecision {
    /// Leave this child out (state `failed`) and start the rest; the tree
    /// reports not ready while it is out.
    Continue,
    /// Stop what started, in reverse order, and fail the start (OTP).
    Halt,
    /// Wait this long, then try the same child again.
    RetryAfter(Duration),
}

type StartHandler = Arc<dyn Fn(&StartFailure) -> StartDecision + Send + Sync>;

/// Why a supervisor (or one of its dynamic children) could not start.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// A child failed to start and the start was halted.
    #[error("child {child} failed to start: {reason}")]
    ChildFailed {
        /// The child's path.
        child: String,
        /// Why.
        reason: ExitReason,
    },
    /// The dynamic supervisor already has `max_children` children.
    #[error("supervisor {supervisor} already has its maximum of {max} children")]
    MaxChildren {
        /// The supervisor's path.
        supervisor: String,
        /// The limit.
        max: usize,
    },
    /// A child with this name already exists.
    #[error("supervisor {supervisor} already has a child named {name}")]
    DuplicateName {
        /// The supervisor's path.
        supervisor: String,
        /// The name.
        name: String,
    },
    /// The supervisor is not running (it stopped, or was stopped during
    /// the start).
    #[error("supervisor {0} is not running")]
    NotRunning(String),
}

/// Why [`SupervisorControl::terminate_child`],
/// [`restart_child`](SupervisorControl::restart_child) or
/// [`delete_child`](SupervisorControl::delete_child) refused (OTP's
/// `{error, _}` answers).
///
/// ```
/// use keel_supervisor::{ChildSpec, ControlError, Supervisor};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let sup = Supervisor::builder("root")
///     .child(ChildSpec::new("w", |ctx| async move { ctx.ready(); ctx.cancelled().await; Ok(()) }))
///     .build()
///     .unwrap();
/// let handle = sup.start().await.unwrap();
/// assert!(matches!(handle.delete_child("w").await, Err(ControlError::Running { .. })));
/// assert!(matches!(handle.terminate_child("x").await, Err(ControlError::NotFound { .. })));
/// handle.shutdown().await;
/// # }
/// ```
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// No child has this name (OTP's `not_found`).
    #[error("supervisor {supervisor} has no child named {name}")]
    NotFound {
        /// The supervisor's path.
        supervisor: String,
        /// The name asked for.
        name: String,
    },
    /// The child is running; terminate it first (OTP's `running`).
    #[error("child {0} is running")]
    Running(String),
    /// The child waits for a delayed restart or a fuse's cool-down (OTP's
    /// `restarting`).
    #[error("child {0} is waiting to be restarted")]
    Restarting(String),
    /// `restart_child` and `delete_child` do not apply to a dynamic
    /// supervisor, whose children are removed when terminated (OTP's
    /// `simple_one_for_one`).
    #[error("supervisor {0} is dynamic: a terminated child is removed")]
    Dynamic(String),
    /// The child failed to start again (`restart_child`); its spec stays.
    #[error("child {child} failed to start: {reason}")]
    StartFailed {
        /// The child's path.
        child: String,
        /// Why.
        reason: ExitReason,
    },
    /// The supervisor is not running.
    #[error("supervisor {0} is not running")]
    NotRunning(String),
}

/// A supervisor specification that is not valid.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// Two children share a name.
    #[error("supervisor {supervisor}: two children are named {name}; names must be unique")]
    DuplicateName {
        /// The supervisor's name.
        supervisor: String,
        /// The name.
        name: String,
    },
    /// A permanent child was marked significant (OTP refuses this too).
    #[error(
        "supervisor {supervisor}: child {name} is permanent and significant; make it transient or temporary"
    )]
    PermanentSignificant {
        /// The supervisor's name.
        supervisor: String,
        /// The child's name.
        name: String,
    },
    /// A dynamic supervisor was given static children.
    #[error("supervisor {0}: a dynamic supervisor takes children at run time, not in its spec")]
    DynamicWithChildren(String),
}

/// Builds a [`Supervisor`].
///
/// ```
/// use std::time::Duration;
/// use keel_supervisor::{AutoShutdown, ChildSpec, Strategy, Supervisor};
///
/// let sup = Supervisor::builder("app")
///     .strategy(Strategy::RestForOne)
///     .intensity(3, Duration::from_secs(5))
///     .auto_shutdown(AutoShutdown::Never)
///     .child(ChildSpec::new("db", |ctx| async move { ctx.ready(); ctx.cancelled().await; Ok(()) }))
///     .child(ChildSpec::new("api", |ctx| async move { ctx.ready(); ctx.cancelled().await; Ok(()) }))
///     .build()
///     .unwrap();
/// # let _ = sup;
/// ```
pub struct SupervisorBuilder {
    name: String,
    strategy: Strategy,
    intensity: u32,
    period: Duration,
    auto_shutdown: AutoShutdown,
    children: Vec<ChildSpec>,
    seed: Option<u64>,
    on_start_failure: Option<StartHandler>,
}

impl SupervisorBuilder {
    /// Sets the restart strategy (default one for one).
    pub fn strategy(mut self, strategy: Strategy) -> Self {
        self.strategy = strategy;
        self
    }

    /// Sets the restart intensity: more than `max_restarts` restarts within
    /// `period` make the supervisor stop its children and exit with reason
    /// `shutdown` (escalate: its parent decides, as in OTP; the detail is in
    /// [`Snapshot::escalation`]). Default: 3 in 5 s (Elixir's default).
    pub fn intensity(mut self, max_restarts: u32, period: Duration) -> Self {
        self.intensity = max_restarts;
        self.period = period;
        self
    }

    /// Sets the auto-shutdown rule for significant children.
    pub fn auto_shutdown(mut self, auto_shutdown: AutoShutdown) -> Self {
        self.auto_shutdown = auto_shutdown;
        self
    }

    /// Adds a child; children start in the order they are added.
    pub fn child(mut self, child: impl Into<ChildSpec>) -> Self {
        self.children.push(child.into());
        self
    }

    /// Seeds the jitter of restart backoff, for reproducible tests.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Decides what happens when a child fails to start during this
    /// supervisor's start. Without a handler the start halts (OTP).
    ///
    /// ```
    /// use std::time::Duration;
    /// use keel_supervisor::{ChildSpec, StartDecision, Supervisor};
    ///
    /// let sup = Supervisor::builder("root")
    ///     .on_start_failure(|failure| {
    ///         if failure.attempt < 3 {
    ///             StartDecision::RetryAfter(Duration::from_secs(1))
    ///         } else {
    ///             StartDecision::Continue
    ///         }
    ///     })
    ///     .child(ChildSpec::new("cache", |ctx| async move { ctx.ready(); Ok(()) }))
    ///     .build()
    ///     .unwrap();
    /// # let _ = sup;
    /// ```
    pub fn on_start_failure(
        mut self,
        handler: impl Fn(&StartFailure) -> StartDecision + Send + Sync + 'static,
    ) -> Self {
        self.on_start_failure = Some(Arc::new(handler));
        self
    }

    /// Validates the specification.
    pub fn build(self) -> Result<Supervisor, BuildError> {
        let mut seen = std::collections::HashSet::new();
        if matches!(self.strategy, Strategy::Dynamic { .. }) && !self.children.is_empty() {
            return Err(BuildError::DynamicWithChildren(self.name));
        }
        for c in &self.children {
            if !seen.insert(c.name().to_string()) {
                return Err(BuildError::DuplicateName {
                    supervisor: self.name,
                    name: c.name().to_string(),
                });
            }
            if c.significant && c.restart == Restart::Permanent {
                return Err(BuildError::PermanentSignificant {
                    supervisor: self.name,
                    name: c.name().to_string(),
                });
            }
        }
        let node = Node::new(self.name, Kind::Supervisor, Some(self.strategy.label()));
        let (commands, command_rx) = mpsc::unbounded_channel();
        // Unseeded: from this thread's generator, so trees differ.
        let seed = self.seed.unwrap_or_else(|| fastrand::u64(..));
        Ok(Supervisor {
            inner: Arc::new(Inner {
                node,
                strategy: self.strategy,
                intensity: self.intensity,
                period: self.period,
                auto_shutdown: self.auto_shutdown,
                specs: Mutex::new(self.children),
                seed,
                on_start_failure: self.on_start_failure,
                commands,
                command_rx: tokio::sync::Mutex::new(command_rx),
                events: event::channel(),
                running: watch::channel(false).0,
                start_error: Mutex::new(None),
            }),
        })
    }
}

struct Inner {
    node: Arc<Node>,
    strategy: Strategy,
    intensity: u32,
    period: Duration,
    auto_shutdown: AutoShutdown,
    /// The static children. Taken by a run and put back when it ends, so a
    /// restarted supervisor reuses the same children (and their counters).
    specs: Mutex<Vec<ChildSpec>>,
    seed: u64,
    on_start_failure: Option<StartHandler>,
    commands: mpsc::UnboundedSender<Command>,
    command_rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<Command>>,
    events: EventSender,
    running: watch::Sender<bool>,
    start_error: Mutex<Option<StartError>>,
}

enum Command {
    Start(ChildSpec, oneshot::Sender<Result<(), StartError>>),
    Child(ChildOp, String, oneshot::Sender<Result<(), ControlError>>),
}

#[derive(Clone, Copy, Debug)]
enum ChildOp {
    Terminate,
    Restart,
    Delete,
}

/// A validated supervisor specification, ready to start (as the root of a
/// tree with [`Supervisor::start`]) or to nest (as a child of another).
///
/// ```
/// use keel_supervisor::{ChildSpec, Supervisor};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let inner = Supervisor::builder("db")
///     .child(ChildSpec::new("pool", |ctx| async move { ctx.ready(); ctx.cancelled().await; Ok(()) }))
///     .build()
///     .unwrap();
/// let root = Supervisor::builder("root").child(inner).build().unwrap();
/// let handle = root.start().await.unwrap();
/// assert!(handle.is_ready());
/// assert_eq!(handle.snapshot().children[0].children[0].path, "root/db/pool");
/// handle.shutdown().await;
/// # }
/// ```
pub struct Supervisor {
    inner: Arc<Inner>,
}

impl Supervisor {
    /// Starts building a supervisor named `name`.
    pub fn builder(name: impl Into<String>) -> SupervisorBuilder {
        SupervisorBuilder {
            name: name.into(),
            strategy: Strategy::OneForOne,
            intensity: 3,
            period: Duration::from_secs(5),
            auto_shutdown: AutoShutdown::Never,
            children: Vec::new(),
            seed: None,
            on_start_failure: None,
        }
    }

    /// Read access to this supervisor's subtree (readiness, snapshots),
    /// valid before it starts.
    pub fn probe(&self) -> TreeProbe {
        TreeProbe {
            root: self.inner.node.clone(),
        }
    }

    /// Run-time control (add and remove children), valid before it starts
    /// and while it is nested.
    pub fn control(&self) -> SupervisorControl {
        SupervisorControl {
            inner: self.inner.clone(),
        }
    }

    /// Subscribes to the lifecycle events of this tree. Nested supervisors
    /// report on their root's stream, so subscribe at the root.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    /// Starts this supervisor as the root of a tree: its children start in
    /// order, each initialised before the next, and this returns once all
    /// have. If one fails to start (and no start handler says otherwise),
    /// those already started are stopped in reverse order and the error is
    /// returned.
    pub async fn start(self) -> Result<SupervisorHandle, StartError> {
        let inner = self.inner;
        let node = inner.node.clone();
        let generation = {
            let mut s = node.state();
            s.generation += 1;
            s.state = ChildState::Starting;
            s.ready = false;
            s.started_at = Some(Instant::now());
            s.generation
        };
        let token = CancellationToken::new();
        let (init_tx, mut init_rx) = watch::channel(false);
        let ctx = ChildContext {
            node: node.clone(),
            generation,
            token: token.clone(),
            init: init_tx,
            events: inner.events.clone(),
        };
        let (exit_tx, mut exit_rx) = watch::channel(None);
        let run_inner = inner.clone();
        let task = tokio::spawn(async move {
            let result = run(run_inner, ctx).await;
            let reason = match result {
                Ok(()) => ExitReason::Shutdown,
                Err(e) => e.into_reason(),
            };
            {
                let mut s = node.state();
                s.state = ChildState::Stopped;
                s.ready = false;
                s.last_exit = Some(reason.to_string());
            }
            exit_tx.send_replace(Some(reason));
        });
        // Initialised, or ended first (then the exit says why).
        let initialised = loop {
            tokio::select! {
                biased;
                changed = init_rx.changed() => match changed {
                    Ok(()) if *init_rx.borrow() => break true,
                    Ok(()) => {}
                    Err(_) => break false,
                },
                _ = exit_rx.changed() => break false,
            }
        };
        if !initialised {
            let _ = exit_rx.wait_for(Option::is_some).await;
            return Err(start_error(&inner));
        }
        Ok(SupervisorHandle {
            control: SupervisorControl { inner },
            token,
            exit: exit_rx,
            task: task.abort_handle(),
            join: tokio::sync::Mutex::new(Some(task)),
        })
    }
}

fn start_error(inner: &Inner) -> StartError {
    lock(&inner.start_error)
        .take()
        .unwrap_or_else(|| StartError::NotRunning(inner.node.path().to_string()))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl From<Supervisor> for ChildSpec {
    /// Nests a supervisor as a child: permanent, shut down with
    /// [`Shutdown::Infinity`] (it bounds its own children's shutdown).
    fn from(sup: Supervisor) -> Self {
        let inner = sup.inner;
        let node = inner.node.clone();
        ChildSpec::from_parts(
            Arc::new(move |ctx| Box::pin(run(inner.clone(), ctx))),
            node,
            Shutdown::Infinity,
        )
    }
}

impl fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Supervisor")
            .field("name", &self.inner.node.name())
            .field("strategy", &self.inner.strategy)
            .finish_non_exhaustive()
    }
}

/// Adds and removes children of a running supervisor, and reads its state.
///
/// ```
/// use keel_supervisor::{ChildSpec, Strategy, Supervisor};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let sup = Supervisor::builder("conns")
///     .strategy(Strategy::Dynamic { max_children: Some(1) })
///     .build()
///     .unwrap();
/// let control = sup.control();
/// let handle = sup.start().await.unwrap();
/// let conn = |name: &str| ChildSpec::new(name, |ctx| async move {
///     ctx.ready();
///     ctx.cancelled().await;
///     Ok(())
/// });
/// control.start_child(conn("c1")).await.unwrap();
/// assert!(control.start_child(conn("c2")).await.is_err()); // over max_children
/// control.terminate_child("c1").await.unwrap(); // dynamic: removed
/// control.start_child(conn("c2")).await.unwrap();
/// handle.shutdown().await;
/// # }
/// ```
#[derive(Clone)]
pub struct SupervisorControl {
    inner: Arc<Inner>,
}

impl SupervisorControl {
    /// Starts `spec` as a new last child and returns once it is
    /// initialised (or failed to start).
    pub async fn start_child(&self, spec: ChildSpec) -> Result<(), StartError> {
        let (tx, rx) = oneshot::channel();
        let not_running = || StartError::NotRunning(self.inner.node.path().to_string());
        if !*self.inner.running.borrow() {
            return Err(not_running());
        }
        self.inner
            .commands
            .send(Command::Start(spec, tx))
            .map_err(|_| not_running())?;
        rx.await.unwrap_or_else(|_| Err(not_running()))
    }

    /// Stops the child named `name` by its shutdown policy (OTP's
    /// `terminate_child`). Under a static strategy its spec stays: a later
    /// group restart (`one_for_all`, `rest_for_one`) starts it again, and
    /// so does [`restart_child`](Self::restart_child); a temporary child's
    /// spec is removed, as in OTP. Under [`Strategy::Dynamic`] the child is
    /// removed (OTP's `simple_one_for_one`). Terminating a child that is
    /// already stopped succeeds and changes nothing.
    ///
    /// ```
    /// use keel_supervisor::{ChildSpec, Supervisor};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let w = ChildSpec::new("w", |ctx| async move { ctx.ready(); ctx.cancelled().await; Ok(()) });
    /// let handle = Supervisor::builder("root").child(w).build().unwrap().start().await.unwrap();
    /// handle.terminate_child("w").await.unwrap();
    /// handle.restart_child("w").await.unwrap(); // the spec stayed
    /// handle.terminate_child("w").await.unwrap();
    /// handle.delete_child("w").await.unwrap(); // now it is gone
    /// assert!(handle.restart_child("w").await.is_err());
    /// handle.shutdown().await;
    /// # }
    /// ```
    pub async fn terminate_child(&self, name: &str) -> Result<(), ControlError> {
        self.child_op(ChildOp::Terminate, name).await
    }

    /// Starts again a child that was terminated with
    /// [`terminate_child`](Self::terminate_child) (or exited and was not
    /// restarted), and returns once it is initialised (OTP's
    /// `restart_child`). It does not count against the restart intensity.
    /// A child that fails to start keeps its spec.
    ///
    /// ```
    /// use keel_supervisor::{ChildSpec, ControlError, Supervisor};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let w = ChildSpec::new("w", |ctx| async move { ctx.ready(); ctx.cancelled().await; Ok(()) });
    /// let handle = Supervisor::builder("root").child(w).build().unwrap().start().await.unwrap();
    /// assert_eq!(handle.restart_child("w").await, Err(ControlError::Running("root/w".into())));
    /// handle.terminate_child("w").await.unwrap();
    /// handle.restart_child("w").await.unwrap();
    /// handle.shutdown().await;
    /// # }
    /// ```
    pub async fn restart_child(&self, name: &str) -> Result<(), ControlError> {
        self.child_op(ChildOp::Restart, name).await
    }

    /// Removes the spec of a child that is not running (OTP's
    /// `delete_child`). A supervisor restarted by its parent starts its
    /// static children afresh, the deleted one included, as OTP's `init`
    /// does.
    ///
    /// ```
    /// use keel_supervisor::{ChildSpec, ControlError, Supervisor};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let w = ChildSpec::new("w", |ctx| async move { ctx.ready(); ctx.cancelled().await; Ok(()) });
    /// let handle = Supervisor::builder("root").child(w).build().unwrap().start().await.unwrap();
    /// handle.terminate_child("w").await.unwrap();
    /// handle.delete_child("w").await.unwrap();
    /// assert!(matches!(handle.delete_child("w").await, Err(ControlError::NotFound { .. })));
    /// assert!(handle.snapshot().children.is_empty());
    /// handle.shutdown().await;
    /// # }
    /// ```
    pub async fn delete_child(&self, name: &str) -> Result<(), ControlError> {
        self.child_op(ChildOp::Delete, name).await
    }

    async fn child_op(&self, op: ChildOp, name: &str) -> Result<(), ControlError> {
        let (tx, rx) = oneshot::channel();
        let not_running = || ControlError::NotRunning(self.inner.node.path().to_string());
        if !*self.inner.running.borrow() {
            return Err(not_running());
        }
        self.inner
            .commands
            .send(Command::Child(op, name.to_string(), tx))
            .map_err(|_| not_running())?;
        rx.await.unwrap_or_else(|_| Err(not_running()))
    }

    /// Read access to the subtree.
    pub fn probe(&self) -> TreeProbe {
        TreeProbe {
            root: self.inner.node.clone(),
        }
    }

    /// True when every required child of the subtree is running and ready.
    pub fn is_ready(&self) -> bool {
        self.probe().is_ready()
    }

    /// A serialisable snapshot of the subtree.
    pub fn snapshot(&self) -> Snapshot {
        self.probe().snapshot()
    }

    /// Subscribes to the tree's lifecycle events.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }
}

/// A running root supervisor.
///
/// Dropping the handle leaves the tree running; call
/// [`shutdown`](Self::shutdown) to stop it in order, or
/// [`abort`](Self::abort) to kill every task at once.
pub struct SupervisorHandle {
    control: SupervisorControl,
    token: CancellationToken,
    exit: watch::Receiver<Option<ExitReason>>,
    task: AbortHandle,
    /// The root task, awaited by the first waiter so that "stopped" means
    /// every task of the tree has ended.
    join: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::ops::Deref for SupervisorHandle {
    type Target = SupervisorControl;
    fn deref(&self) -> &SupervisorControl {
        &self.control
    }
}

impl SupervisorHandle {
    /// Stops the tree: children in reverse start order, each by its
    /// shutdown policy, nested supervisors first stopping their own. A
    /// restart under way finishes first (OTP's starts are synchronous; a
    /// child that never initialises holds the stop up unless it has a
    /// [`ChildSpec::start_timeout`]). Returns the root's exit reason.
    pub async fn shutdown(&self) -> ExitReason {
        self.token.cancel();
        self.wait().await
    }

    /// Waits until the tree stops on its own (escalation, auto-shutdown) or
    /// is shut down. Both end with [`ExitReason::Shutdown`], as in OTP;
    /// [`Snapshot::escalation`] tells an escalation apart.
    pub async fn wait(&self) -> ExitReason {
        {
            let mut join = self.join.lock().await;
            if let Some(task) = join.as_mut() {
                let _ = task.await;
                *join = None;
            }
        }
        let mut exit = self.exit.clone();
        match exit.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or(ExitReason::Killed),
            Err(_) => ExitReason::Killed,
        }
    }

    /// The exit reason if the tree has stopped.
    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.exit.borrow().clone()
    }

    /// Kills every task of the tree at once, without asking (the last
    /// resort once a shutdown deadline has passed).
    pub fn abort(&self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------
// The run: one supervisor task.

enum Stop {
    Escalate { child: Arc<str>, restarts: usize },
    AutoShutdown,
}

struct Slot {
    key: u64,
    spec: ChildSpec,
    running: Option<RunningChild>,
    /// The generation of the child's latest start; exits of earlier ones
    /// are stale.
    incarnation: u64,
    /// A pending delayed restart (backoff) or the end of a cool-down.
    restart_at: Option<Instant>,
    /// Consecutive restarts, for backoff.
    attempts: u32,
    fuse_window: VecDeque<Instant>,
    started_at: Option<Instant>,
}

struct RunningChild {
    id: Id,
    abort: AbortHandle,
    token: CancellationToken,
}

/// A child's exit, tagged with the incarnation (the node's generation at
/// spawn) it ends, so that an exit queued while the supervisor was busy can
/// never be taken for a crash of a later incarnation of the same child.
struct Exit {
    key: u64,
    incarnation: u64,
    reason: ExitReason,
    /// The child failed to start (during a restart): OTP tries again
    /// whatever its restart type.
    start_failed: bool,
}

struct Run {
    inner: Arc<Inner>,
    /// This supervisor's node in the tree.
    node: Arc<Node>,
    /// Static children have keys below this; run-time ones above.
    n_static: u64,
    /// Static children removed during the run (temporary ones that
    /// exited), kept for the next run.
    removed_static: Vec<(u64, ChildSpec)>,
    path: Arc<str>,
    events: EventSender,
    token: CancellationToken,
    slots: Vec<Slot>,
    tasks: JoinSet<ChildResult>,
    /// Task id to (slot key, incarnation).
    by_task: HashMap<Id, (u64, u64)>,
    pending: VecDeque<Exit>,
    restarts: VecDeque<Instant>,
    next_key: u64,
    /// Restart jitter, seeded by [`SupervisorBuilder::seed`].
    rng: fastrand::Rng,
}

async fn run(inner: Arc<Inner>, ctx: ChildContext) -> ChildResult {
    // One run at a time owns the command queue; a restarted supervisor's
    // new run waits for the old one to have let go (it always has: the
    // parent restarts only after the exit).
    let mut commands = inner.command_rx.lock().await;
    let specs = std::mem::take(&mut *lock(&inner.specs));
    let path = ctx.node.path();
    for s in &specs {
        s.node.attach(&path);
        reset_node(&s.node);
    }
    ctx.node
        .set_children(specs.iter().map(|s| s.node.clone()).collect());
    let mut run = Run {
        node: ctx.node.clone(),
        n_static: specs.len() as u64,
        removed_static: Vec::new(),
        path,
        events: ctx.events.clone(),
        token: ctx.token.clone(),
        slots: Vec::new(),
        tasks: JoinSet::new(),
        by_task: HashMap::new(),
        pending: VecDeque::new(),
        restarts: VecDeque::new(),
        next_key: 0,
        rng: fastrand::Rng::with_seed(inner.seed),
        inner: inner.clone(),
    };
    for spec in specs {
        run.push_slot(spec);
    }
    inner.running.send_replace(true);
    let result = run.supervise(&ctx, &mut commands).await;
    inner.running.send_replace(false);
    // Fail whatever was queued while stopping.
    while let Ok(cmd) = commands.try_recv() {
        run.refuse(cmd);
    }
    // Static children are kept, in start order, for the next run (a
    // restart of this supervisor starts them afresh, as OTP's init does);
    // children added at run time die with the run.
    let n_static = run.n_static;
    let mut statics: Vec<(u64, ChildSpec)> = std::mem::take(&mut run.slots)
        .into_iter()
        .map(|s| (s.key, s.spec))
        .chain(std::mem::take(&mut run.removed_static))
        .filter(|(key, _)| *key < n_static)
        .collect();
    statics.sort_by_key(|(key, _)| *key);
    let statics: Vec<ChildSpec> = statics.into_iter().map(|(_, spec)| spec).collect();
    ctx.node
        .set_children(statics.iter().map(|s| s.node.clone()).collect());
    *lock(&inner.specs) = statics;
    result
}

fn reset_node(node: &Node) {
    let mut s = node.state();
    s.state = ChildState::Idle;
    s.ready = false;
    s.reason = None;
    s.started_at = None;
}

impl Run {
    async fn supervise(
        &mut self,
        ctx: &ChildContext,
        commands: &mut mpsc::UnboundedReceiver<Command>,
    ) -> ChildResult {
        if let Err(e) = self.start_all().await {
            if self.token.is_cancelled() {
                return Ok(());
            }
            *lock(&self.inner.start_error) = Some(e.clone());
            // The typed error travels up as this supervisor's exit, so a
            // parent's own `StartError` names the innermost child.
            return Err(ChildError::from(e));
        }
        ctx.ready();
        let token = self.token.clone();
        loop {
            // A stop requested during a (synchronous) restart is acted on
            // as soon as the restart is over, before exits queued
            // meanwhile could start more restarts.
            if token.is_cancelled() {
                self.stop_all().await;
                return Ok(());
            }
            if let Some(exit) = self.pending.pop_front() {
                if let Err(stop) = self.on_exit(exit).await {
                    return Err(self.stop(stop).await);
                }
                continue;
            }
            let timer = self.next_timer();
            tokio::select! {
                biased;
                _ = token.cancelled() => {
                    self.stop_all().await;
                    return Ok(());
                }
                joined = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    if let Some(exit) = joined.and_then(|j| self.exit_of(j)) {
                        self.pending.push_back(exit);
                    }
                }
                cmd = commands.recv() => {
                    if let Some(cmd) = cmd {
                        self.command(cmd).await;
                    }
                }
                _ = sleep_until_opt(timer), if timer.is_some() => {
                    self.fire_timers().await;
                }
            }
        }
    }

    async fn stop(&mut self, stop: Stop) -> ChildError {
        self.stop_all().await;
        match stop {
            Stop::Escalate { child, restarts } => {
                self.node.state().escalation = Some(Escalation {
                    child: child.to_string(),
                    restarts,
                });
                tracing::warn!(
                    target: "keel_supervisor",
                    supervisor = &*self.path,
                    child = &*child,
                    restarts,
                    intensity = self.inner.intensity,
                    period = ?self.inner.period,
                    "restart intensity exceeded; escalating"
                );
                event::emit(
                    &self.events,
                    self.path.clone(),
                    EventKind::Escalated { child, restarts },
                );
                // OTP's supervisor exits with `shutdown` here: the parent
                // restarts it only if it is permanent, never a transient
                // one. The detail stays in the event and the snapshot.
                ChildError::shutdown()
            }
            Stop::AutoShutdown => {
                event::emit(&self.events, self.path.clone(), EventKind::AutoShutdown);
                ChildError::shutdown()
            }
        }
    }

    fn push_slot(&mut self, spec: ChildSpec) -> usize {
        let key = self.next_key;
        self.next_key += 1;
        self.slots.push(Slot {
            key,
            spec,
            running: None,
            incarnation: 0,
            restart_at: None,
            attempts: 0,
            fuse_window: VecDeque::new(),
            started_at: None,
        });
        self.slots.len() - 1
    }

    fn index(&self, key: u64) -> Option<usize> {
        self.slots.iter().position(|s| s.key == key)
    }

    fn exit_of(&mut self, joined: Result<(Id, ChildResult), JoinError>) -> Option<Exit> {
        let (id, reason) = match joined {
            Ok((id, result)) => (
                id,
                result.map_or_else(ChildError::into_reason, |()| ExitReason::Normal),
            ),
            Err(e) => (e.id(), join_error_reason(e)),
        };
        let (key, incarnation) = self.by_task.remove(&id)?;
        if let Some(i) = self.index(key)
            && self.slots[i].incarnation == incarnation
        {
            self.slots[i].running = None;
        }
        Some(Exit {
            key,
            incarnation,
            reason,
            start_failed: false,
        })
    }

    /// Starts the static children in order.
    async fn start_all(&mut self) -> Result<(), StartError> {
        let keys: Vec<u64> = self.slots.iter().map(|s| s.key).collect();
        for key in keys {
            let mut attempt = 0;
            while let Some(i) = self.index(key) {
                match self.start_slot(i).await {
                    Ok(()) => break,
                    Err(reason) => {
                        attempt += 1;
                        let child = self.slots[i].spec.node.path().to_string();
                        let failure = StartFailure {
                            child: child.clone(),
                            reason: reason.clone(),
                            attempt,
                        };
                        let decision =
                            match (&self.inner.on_start_failure, self.token.is_cancelled()) {
                                (Some(h), false) => h(&failure),
                                _ => StartDecision::Halt,
                            };
                        match decision {
                            StartDecision::Continue => {
                                self.slots[i].spec.node.state().state = ChildState::Failed;
                                break;
                            }
                            StartDecision::RetryAfter(d) => {
                                tokio::select! {
                                    _ = tokio::time::sleep(d) => continue,
                                    _ = self.token.cancelled() => {}
                                }
                            }
                            StartDecision::Halt => {}
                        }
                        self.stop_all().await;
                        return Err(StartError::ChildFailed { child, reason });
                    }
                }
            }
        }
        Ok(())
    }

    /// Spawns the child in slot `i` and waits until it is initialised.
    /// On failure the child is gone (reaped) and its reason returned.
    async fn start_slot(&mut self, i: usize) -> Result<(), ExitReason> {
        let slot = &mut self.slots[i];
        let node = slot.spec.node.clone();
        let now = Instant::now();
        let generation = {
            let mut s = node.state();
            s.generation += 1;
            s.state = ChildState::Starting;
            s.ready = false;
            s.reason = None;
            s.started_at = Some(now);
            s.generation
        };
        let (init_tx, mut init_rx) = watch::channel(false);
        // Not a child token: the supervisor cancels its children itself, one
        // at a time in reverse start order, when it is told to stop.
        let token = CancellationToken::new();
        let ctx = ChildContext {
            node: node.clone(),
            generation,
            token: token.clone(),
            init: init_tx,
            events: self.events.clone(),
        };
        let fut = (slot.spec.start)(ctx);
        let abort = self.tasks.spawn(fut);
        let id = abort.id();
        let key = slot.key;
        slot.running = Some(RunningChild { id, abort, token });
        slot.incarnation = generation;
        slot.started_at = Some(now);
        let deadline = slot.spec.start_timeout.map(|d| now + d);
        self.by_task.insert(id, (key, generation));
        event::emit(&self.events, node.path(), EventKind::Started);

        // A start is synchronous, as OTP's: a stop requested meanwhile waits
        // until it is over (the main loop then stops everything in reverse
        // order). Only the opt-in start timeout cuts it short.
        let mut init_open = true;
        let failure = loop {
            tokio::select! {
                biased;
                changed = init_rx.changed(), if init_open => {
                    match changed {
                        Ok(()) if *init_rx.borrow() => return Ok(()),
                        Ok(()) => {}
                        Err(_) => init_open = false,
                    }
                }
                joined = self.tasks.join_next_with_id() => {
                    let Some(exit) = joined.and_then(|j| self.exit_of(j)) else { continue };
                    if exit.key != key || exit.incarnation != generation {
                        self.pending.push_back(exit);
                    } else if exit.reason == ExitReason::Normal {
                        // Returned before saying ready: it started and
                        // finished. Handle that exit like any other.
                        self.pending.push_back(exit);
                        return Ok(());
                    } else {
                        self.mark_exited(key, &exit.reason);
                        return Err(exit.reason);
                    }
                }
                _ = sleep_until_opt(deadline), if deadline.is_some() => {
                    break ExitReason::msg(format!(
                        "not initialised within its start timeout of {:?}",
                        self.slots[i].spec.start_timeout.unwrap_or_default()
                    ));
                }
            }
        };
        // Timed out while starting: stop it per its policy.
        if let Some(i) = self.index(key) {
            self.terminate(i).await;
        }
        Err(failure)
    }

    fn mark_exited(&self, key: u64, reason: &ExitReason) {
        if let Some(i) = self.index(key) {
            let node = &self.slots[i].spec.node;
            {
                let mut s = node.state();
                s.ready = false;
                s.last_exit = Some(reason.to_string());
                s.state = ChildState::Stopped;
            }
            event::emit(
                &self.events,
                node.path(),
                EventKind::StartFailed {
                    reason: reason.clone(),
                },
            );
        }
    }

    /// Stops the child in slot `i` by its shutdown policy; the slot stays.
    async fn terminate(&mut self, i: usize) {
        let key = self.slots[i].key;
        let incarnation = self.slots[i].incarnation;
        let Some(child) = self.slots[i].running.take() else {
            // It ended on its own while the supervisor was busy (stopping a
            // sibling, say) and its exit is still queued. Stopping it
            // consumes that exit, as OTP's shutdown reads the queued
            // 'EXIT' of a child that is already dead: otherwise the exit
            // would later pass for a crash of the child's next incarnation.
            let queued = self
                .pending
                .iter()
                .position(|e| e.key == key && e.incarnation == incarnation);
            if let Some(exit) = queued.and_then(|pos| self.pending.remove(pos)) {
                self.record_stop(i, exit.reason);
            }
            return;
        };
        child.token.cancel();
        let reason = match self.slots[i].spec.shutdown {
            Shutdown::Brutal => {
                child.abort.abort();
                self.reap(child.id, (key, incarnation), None)
                    .await
                    .unwrap_or(ExitReason::Killed)
            }
            Shutdown::Timeout(d) => {
                match self
                    .reap(child.id, (key, incarnation), Some(Instant::now() + d))
                    .await
                {
                    Some(reason) => reason,
                    None => {
                        child.abort.abort();
                        self.reap(child.id, (key, incarnation), None)
                            .await
                            .unwrap_or(ExitReason::Killed)
                    }
                }
            }
            Shutdown::Infinity => self
                .reap(child.id, (key, incarnation), None)
                .await
                .unwrap_or(ExitReason::Killed),
        };
        let reason = if reason == ExitReason::Normal {
            ExitReason::Shutdown
        } else {
            reason
        };
        self.record_stop(i, reason);
    }

    /// Records that the child in slot `i` was stopped, ending with `reason`.
    fn record_stop(&mut self, i: usize, reason: ExitReason) {
        let node = self.slots[i].spec.node.clone();
        {
            let mut s = node.state();
            s.state = ChildState::Stopped;
            s.ready = false;
            s.last_exit = Some(reason.to_string());
        }
        event::emit(&self.events, node.path(), EventKind::Exited { reason });
        event::emit(&self.events, node.path(), EventKind::Stopped);
    }

    /// Waits for task `id` (slot `key`) to end, until `deadline`. Other
    /// children's exits seen meanwhile are queued. `None` on timeout.
    async fn reap(
        &mut self,
        id: Id,
        (key, incarnation): (u64, u64),
        deadline: Option<Instant>,
    ) -> Option<ExitReason> {
        loop {
            if !self.by_task.contains_key(&id) {
                return Some(ExitReason::Killed);
            }
            tokio::select! {
                joined = self.tasks.join_next_with_id() => {
                    let exit = joined.and_then(|j| self.exit_of(j))?;
                    if exit.key == key && exit.incarnation == incarnation {
                        return Some(exit.reason);
                    }
                    self.pending.push_back(exit);
                }
                _ = sleep_until_opt(deadline), if deadline.is_some() => return None,
            }
        }
    }

    /// Stops every child in reverse start order.
    async fn stop_all(&mut self) {
        for i in (0..self.slots.len()).rev() {
            self.slots[i].restart_at = None;
            if self.slots[i].running.is_some() {
                self.terminate(i).await;
            } else {
                let mut s = self.slots[i].spec.node.state();
                if s.state != ChildState::Failed {
                    s.state = ChildState::Stopped;
                }
                s.ready = false;
            }
        }
        // Anything that exited on its own meanwhile is stopped too.
        self.pending.clear();
    }

    /// OTP's restart intensity: record a restart now; false when the count
    /// inside the window exceeds the intensity.
    fn add_restart(&mut self, now: Instant) -> bool {
        self.restarts.push_back(now);
        let period = self.inner.period;
        while let Some(&t) = self.restarts.front() {
            if now.saturating_duration_since(t) > period {
                self.restarts.pop_front();
            } else {
                break;
            }
        }
        self.restarts.len() <= self.inner.intensity as usize
    }

    async fn on_exit(&mut self, exit: Exit) -> Result<(), Stop> {
        let Some(i) = self.index(exit.key) else {
            return Ok(());
        };
        let slot = &self.slots[i];
        if exit.incarnation != slot.incarnation || slot.running.is_some() {
            // Stale: the end of an earlier incarnation, already accounted
            // for (terminate consumes queued exits, so this is a guard, not
            // a path the supervisor relies on).
            return Ok(());
        }
        let now = Instant::now();
        let node = self.slots[i].spec.node.clone();
        let spec_restart = self.slots[i].spec.restart;
        {
            let mut s = node.state();
            s.ready = false;
            s.last_exit = Some(exit.reason.to_string());
        }
        tracing::info!(
            target: "keel_supervisor",
            child = &*node.path(),
            reason = %exit.reason,
            "child exited"
        );
        if !exit.start_failed {
            // A failed start was reported as `StartFailed` already.
            event::emit(
                &self.events,
                node.path(),
                EventKind::Exited {
                    reason: exit.reason.clone(),
                },
            );
        }
        let restart = match spec_restart {
            Restart::Permanent => true,
            Restart::Transient => exit.start_failed || exit.reason.is_abnormal(),
            Restart::Temporary => false,
        };
        if !restart {
            node.state().state = ChildState::Stopped;
            event::emit(&self.events, node.path(), EventKind::Stopped);
            let significant = self.slots[i].spec.significant;
            if spec_restart == Restart::Temporary {
                self.remove(i);
            }
            if significant && self.auto_shutdown_due() {
                return Err(Stop::AutoShutdown);
            }
            return Ok(());
        }

        if let Some(fuse) = self.slots[i].spec.fuse {
            let slot = &mut self.slots[i];
            slot.fuse_window.push_back(now);
            while let Some(&t) = slot.fuse_window.front() {
                if now.saturating_duration_since(t) > fuse.period {
                    slot.fuse_window.pop_front();
                } else {
                    break;
                }
            }
            if slot.fuse_window.len() > fuse.max_restarts as usize {
                slot.fuse_window.clear();
                slot.restart_at = Some(now + fuse.cool_down);
                node.state().state = ChildState::Parked;
                event::emit(
                    &self.events,
                    node.path(),
                    EventKind::Parked {
                        cool_down: fuse.cool_down,
                    },
                );
                return Ok(());
            }
        } else if !self.add_restart(now) {
            return Err(Stop::Escalate {
                child: node.path(),
                restarts: self.restarts.len(),
            });
        }

        let delay = self.backoff_delay(i, now);
        let group = self.restart_group(i);
        // Stop the rest of the group, last started first.
        for &key in group.iter().rev() {
            if let Some(j) = self.index(key).filter(|_| key != exit.key) {
                self.terminate(j).await;
            }
        }
        // Temporary children are never restarted with the group.
        let group: Vec<u64> = group
            .into_iter()
            .filter(|&key| match self.index(key) {
                Some(j) if self.slots[j].spec.restart == Restart::Temporary && key != exit.key => {
                    self.remove(j);
                    false
                }
                Some(_) => true,
                None => false,
            })
            .collect();
        if delay.is_zero() {
            self.announce_restarts(&group, delay);
            self.restart_keys(&group).await;
        } else {
            for &key in &group {
                if let Some(j) = self.index(key) {
                    self.slots[j].restart_at = Some(now + delay);
                    self.slots[j].spec.node.state().state = ChildState::Restarting;
                }
            }
            self.announce_restarts(&group, delay);
        }
        Ok(())
    }

    fn backoff_delay(&mut self, i: usize, now: Instant) -> Duration {
        let slot = &mut self.slots[i];
        let Some(backoff) = slot.spec.backoff else {
            return Duration::ZERO;
        };
        let stable = slot
            .started_at
            .is_some_and(|t| now.saturating_duration_since(t) >= backoff.reset_after);
        if stable {
            slot.attempts = 0;
        }
        let delay = backoff.delay(slot.attempts, self.rng.f64());
        slot.attempts = slot.attempts.saturating_add(1);
        delay
    }

    /// The keys restarted together with slot `i`, in start order.
    fn restart_group(&self, i: usize) -> Vec<u64> {
        // Parked children wait for their cool-down; children left out at
        // start stay out.
        let parked = |s: &Slot| {
            matches!(
                s.spec.node.state().state,
                ChildState::Parked | ChildState::Failed
            )
        };
        match self.inner.strategy {
            Strategy::OneForOne | Strategy::Dynamic { .. } => vec![self.slots[i].key],
            Strategy::OneForAll => self
                .slots
                .iter()
                .enumerate()
                .filter(|(j, s)| *j == i || !parked(s))
                .map(|(_, s)| s.key)
                .collect(),
            Strategy::RestForOne => self.slots[i..]
                .iter()
                .enumerate()
                .filter(|(j, s)| *j == 0 || !parked(s))
                .map(|(_, s)| s.key)
                .collect(),
        }
    }

    fn announce_restarts(&self, keys: &[u64], delay: Duration) {
        for &key in keys {
            if let Some(j) = self.index(key) {
                let node = &self.slots[j].spec.node;
                let restarts = {
                    let mut s = node.state();
                    s.restarts += 1;
                    s.restarts
                };
                event::emit(
                    &self.events,
                    node.path(),
                    EventKind::Restarted { restarts, delay },
                );
            }
        }
    }

    /// Starts the children `keys` in order. A child that fails to start is
    /// handled as a crash (OTP retries it, counting intensity); under
    /// `one_for_all` and `rest_for_one` the rest of the group stays down
    /// until that crash's group restart brings it back.
    async fn restart_keys(&mut self, keys: &[u64]) {
        for &key in keys {
            if let Some(j) = self.index(key) {
                self.slots[j].restart_at = None;
            }
        }
        let grouped = matches!(
            self.inner.strategy,
            Strategy::OneForAll | Strategy::RestForOne
        );
        for (n, &key) in keys.iter().enumerate() {
            let Some(j) = self.index(key) else { continue };
            if self.slots[j].running.is_some() {
                continue;
            }
            if let Err(reason) = self.start_slot(j).await {
                if self.token.is_cancelled() {
                    return;
                }
                if !grouped {
                    self.pending.push_back(Exit {
                        key,
                        incarnation: self.slots[j].incarnation,
                        reason,
                        start_failed: true,
                    });
                    continue;
                }
                for &rest in &keys[n + 1..] {
                    if let Some(r) = self.index(rest) {
                        self.slots[r].spec.node.state().state = ChildState::Restarting;
                    }
                }
                self.pending.push_front(Exit {
                    key,
                    incarnation: self.slots[j].incarnation,
                    reason,
                    start_failed: true,
                });
                return;
            }
        }
    }

    fn next_timer(&self) -> Option<Instant> {
        self.slots.iter().filter_map(|s| s.restart_at).min()
    }

    async fn fire_timers(&mut self) {
        let now = Instant::now();
        let due: Vec<(u64, bool)> = self
            .slots
            .iter()
            .filter(|s| s.restart_at.is_some_and(|t| t <= now))
            .map(|s| (s.key, s.spec.node.state().state == ChildState::Parked))
            .collect();
        // Parked children coming back count as restarts; delayed restarts
        // were announced when they were scheduled.
        let unparked: Vec<u64> = due.iter().filter(|(_, p)| *p).map(|(k, _)| *k).collect();
        self.announce_restarts(&unparked, Duration::ZERO);
        let keys: Vec<u64> = due.into_iter().map(|(k, _)| k).collect();
        self.restart_keys(&keys).await;
    }

    fn auto_shutdown_due(&self) -> bool {
        let stopped = |s: &Slot| s.running.is_none() && s.restart_at.is_none();
        match self.inner.auto_shutdown {
            AutoShutdown::Never => false,
            AutoShutdown::AnySignificant => true,
            AutoShutdown::AllSignificant => self
                .slots
                .iter()
                .filter(|s| s.spec.significant)
                .all(stopped),
        }
    }

    fn remove(&mut self, i: usize) {
        let slot = self.slots.remove(i);
        self.node.remove_child(&slot.spec.node);
        if slot.key < self.n_static {
            self.removed_static.push((slot.key, slot.spec));
        }
    }

    async fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Start(spec, reply) => {
                let result = self.add_child(spec).await;
                let _ = reply.send(result);
            }
            Command::Child(op, name, reply) => {
                let result = self.child_op(op, &name).await;
                let _ = reply.send(result);
            }
        }
    }

    async fn child_op(&mut self, op: ChildOp, name: &str) -> Result<(), ControlError> {
        let supervisor = self.path.to_string();
        let Some(i) = self.slots.iter().position(|s| s.spec.name() == name) else {
            return Err(ControlError::NotFound {
                supervisor,
                name: name.to_string(),
            });
        };
        let dynamic = matches!(self.inner.strategy, Strategy::Dynamic { .. });
        let path = self.slots[i].spec.node.path().to_string();
        match op {
            ChildOp::Terminate => {
                // A pending delayed restart or cool-down is called off.
                self.slots[i].restart_at = None;
                if self.slots[i].running.is_some() {
                    self.terminate(i).await;
                } else {
                    let mut s = self.slots[i].spec.node.state();
                    if s.state != ChildState::Failed {
                        s.state = ChildState::Stopped;
                    }
                }
                let key = self.slots[i].key;
                if let Some(i) = self.index(key)
                    && (dynamic || self.slots[i].spec.restart == Restart::Temporary)
                {
                    self.remove(i);
                }
                Ok(())
            }
            ChildOp::Restart | ChildOp::Delete if dynamic => Err(ControlError::Dynamic(supervisor)),
            _ if self.slots[i].running.is_some() => Err(ControlError::Running(path)),
            _ if self.slots[i].restart_at.is_some() => Err(ControlError::Restarting(path)),
            ChildOp::Restart => match self.start_slot(i).await {
                Ok(()) => Ok(()),
                Err(reason) => Err(ControlError::StartFailed {
                    child: path,
                    reason,
                }),
            },
            ChildOp::Delete => {
                self.remove(i);
                Ok(())
            }
        }
    }

    async fn add_child(&mut self, spec: ChildSpec) -> Result<(), StartError> {
        let supervisor = self.path.to_string();
        if let Strategy::Dynamic {
            max_children: Some(max),
        } = self.inner.strategy
            && self.slots.len() >= max
        {
            return Err(StartError::MaxChildren { supervisor, max });
        }
        if self.slots.iter().any(|s| s.spec.name() == spec.name()) {
            return Err(StartError::DuplicateName {
                supervisor,
                name: spec.name().to_string(),
            });
        }
        spec.node.attach(&self.path);
        self.node.push_child(spec.node.clone());
        let i = self.push_slot(spec);
        let key = self.slots[i].key;
        match self.start_slot(i).await {
            Ok(()) => Ok(()),
            Err(reason) => {
                let child = self.slots[i].spec.node.path().to_string();
                if let Some(i) = self.index(key) {
                    self.remove(i);
                }
                Err(StartError::ChildFailed { child, reason })
            }
        }
    }

    fn refuse(&self, cmd: Command) {
        let err = StartError::NotRunning(self.path.to_string());
        match cmd {
            Command::Start(_, reply) => {
                let _ = reply.send(Err(err));
            }
            Command::Child(_, _, reply) => {
                let _ = reply.send(Err(ControlError::NotRunning(self.path.to_string())));
            }
        }
    }
}

fn join_error_reason(e: JoinError) -> ExitReason {
    if e.is_panic() {
        let payload = e.into_panic();
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic payload".to_string());
        ExitReason::Panic(msg)
    } else {
        ExitReason::Killed
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
