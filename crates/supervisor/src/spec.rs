//! Child specifications: what to run, when to restart it, how to stop it.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::BoxFuture;
use crate::context::ChildContext;
use crate::node::{Kind, Node};

/// When a child that exited is restarted (OTP's restart types).
///
/// ```
/// use keel_supervisor::Restart;
/// assert_eq!(Restart::default(), Restart::Permanent);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Restart {
    /// Always restarted.
    #[default]
    Permanent,
    /// Restarted only after an abnormal exit (an error or a panic); a normal
    /// return or a [`ChildError::shutdown`] exit leaves it stopped.
    Transient,
    /// Never restarted, not even when a sibling's failure restarts the group
    /// under `one_for_all` or `rest_for_one`; removed once it exits.
    Temporary,
}

/// How a child is stopped (OTP's shutdown values).
///
/// ```
/// use std::time::Duration;
/// use keel_supervisor::Shutdown;
/// assert_eq!(Shutdown::default(), Shutdown::Timeout(Duration::from_secs(5)));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shutdown {
    /// Abort the task at once, without asking (OTP `brutal_kill`).
    Brutal,
    /// Cancel the child's token, wait this long for it to return, then abort
    /// it. OTP's default for workers is 5 s.
    Timeout(Duration),
    /// Cancel and wait as long as it takes; the right value for a child that
    /// is itself a supervisor, which bounds its own children's shutdown.
    Infinity,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown::Timeout(Duration::from_secs(5))
    }
}

/// Opt-in restart delay: exponential backoff with full jitter.
///
/// The n-th consecutive restart waits a random time in `[0, min(cap, base *
/// 2^n)]`, so the delay never exceeds `cap`. The count goes back to zero once
/// the child has stayed up for `reset_after`. Without it (the default) a
/// child is restarted at once, as in OTP.
///
/// ```
/// use std::time::Duration;
/// use keel_supervisor::RestartBackoff;
///
/// let b = RestartBackoff::new(Duration::from_millis(10), Duration::from_secs(1));
/// assert_eq!(b.ceiling(0), Duration::from_millis(10));
/// assert_eq!(b.ceiling(3), Duration::from_millis(80));
/// assert_eq!(b.ceiling(30), Duration::from_secs(1));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestartBackoff {
    /// The ceiling of the first delay.
    pub base: Duration,
    /// No delay is ever longer than this.
    pub cap: Duration,
    /// Uptime after which the child counts as stable again.
    pub reset_after: Duration,
}

impl RestartBackoff {
    /// Backoff from `base` doubling up to `cap`, reset after `cap * 4` of
    /// uptime (at least one second).
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            reset_after: (cap * 4).max(Duration::from_secs(1)),
        }
    }

    /// Sets the uptime after which the attempt count resets.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use keel_supervisor::RestartBackoff;
    /// let b = RestartBackoff::new(Duration::from_millis(10), Duration::from_secs(1))
    ///     .reset_after(Duration::from_secs(30));
    /// assert_eq!(b.reset_after, Duration::from_secs(30));
    /// ```
    pub fn reset_after(mut self, uptime: Duration) -> Self {
        self.reset_after = uptime;
        self
    }

    /// The upper bound of the delay before restart number `attempt`
    /// (counting from zero): `min(cap, base * 2^attempt)`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The delay for restart `attempt`, drawn with full jitter from `random`,
    /// a uniform value in `[0, 1)`.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use keel_supervisor::RestartBackoff;
    /// let b = RestartBackoff::new(Duration::from_millis(100), Duration::from_millis(150));
    /// assert_eq!(b.delay(5, 0.0), Duration::ZERO);
    /// assert!(b.delay(5, 0.999_999) <= Duration::from_millis(150));
    /// ```
    pub fn delay(&self, attempt: u32, random: f64) -> Duration {
        self.ceiling(attempt).mul_f64(random.clamp(0.0, 1.0))
    }
}

/// Opt-in per-child fuse: the manager pattern for a flapping dependency.
///
/// When this child's own restarts exceed `max_restarts` within `period`, it
/// is parked for `cool_down` and then tried again, instead of exhausting the
/// supervisor's restart intensity and escalating. A fused child's restarts
/// are counted against its fuse only, never against the supervisor's
/// intensity.
///
/// ```
/// use std::time::Duration;
/// use keel_supervisor::ChildFuse;
///
/// let fuse = ChildFuse {
///     max_restarts: 5,
///     period: Duration::from_secs(10),
///     cool_down: Duration::from_secs(30),
/// };
/// assert_eq!(fuse.max_restarts, 5);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChildFuse {
    /// Restarts allowed inside `period` before the child is parked.
    pub max_restarts: u32,
    /// The sliding window the restarts are counted in.
    pub period: Duration,
    /// How long a parked child rests before it is started again.
    pub cool_down: Duration,
}

/// Why a child exited, as the supervisor saw it. More reasons may be
/// added, so a `match` on it needs a wildcard arm.
///
/// An error keeps the child's error itself, source chain included, so that
/// whoever reads the reason (an event, a [`crate::StartError`]) can inspect
/// or downcast it.
///
/// ```
/// use std::error::Error;
/// use keel_supervisor::ExitReason;
///
/// assert!(!ExitReason::Normal.is_abnormal());
/// assert!(!ExitReason::Shutdown.is_abnormal());
/// let io = std::io::Error::new(std::io::ErrorKind::AddrInUse, "port 80 taken");
/// let reason = ExitReason::from_error(io);
/// assert!(reason.is_abnormal());
/// let e = reason.error().unwrap();
/// assert_eq!(
///     e.downcast_ref::<std::io::Error>().unwrap().kind(),
///     std::io::ErrorKind::AddrInUse
/// );
/// assert_eq!(reason, ExitReason::msg("port 80 taken"));
/// ```
#[derive(Clone, Debug, serde::Serialize)]
#[serde(tag = "kind", content = "detail", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ExitReason {
    /// The child's function returned `Ok(())`.
    Normal,
    /// The child stopped because it was asked to, or returned
    /// [`ChildError::shutdown`]; also how a supervisor exits when it gives
    /// up (restart intensity) or shuts itself down (auto-shutdown), as in
    /// OTP.
    Shutdown,
    /// The child returned an error, kept as it was returned.
    Error(#[serde(serialize_with = "serialize_error")] Arc<dyn std::error::Error + Send + Sync>),
    /// The child panicked.
    Panic(String),
    /// The child ignored cancellation and was aborted at its shutdown
    /// timeout (or was stopped with [`Shutdown::Brutal`]).
    Killed,
}

fn serialize_error<S: serde::Serializer>(
    e: &Arc<dyn std::error::Error + Send + Sync>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_str(e)
}

impl ExitReason {
    /// True for reasons that restart a [`Restart::Transient`] child.
    pub fn is_abnormal(&self) -> bool {
        matches!(
            self,
            ExitReason::Error(_) | ExitReason::Panic(_) | ExitReason::Killed
        )
    }

    /// An error reason described by a message.
    ///
    /// ```
    /// # use keel_supervisor::ExitReason;
    /// assert_eq!(ExitReason::msg("boom").to_string(), "error: boom");
    /// ```
    pub fn msg(message: impl Into<String>) -> Self {
        let e: Box<dyn std::error::Error + Send + Sync> = message.into().into();
        ExitReason::Error(Arc::from(e))
    }

    /// An error reason that keeps `e` (and its source chain).
    ///
    /// ```
    /// # use keel_supervisor::ExitReason;
    /// let r = ExitReason::from_error(std::fmt::Error);
    /// assert!(r.error().unwrap().is::<std::fmt::Error>());
    /// ```
    pub fn from_error(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        ExitReason::Error(Arc::new(e))
    }

    /// The child's error, for [`ExitReason::Error`].
    ///
    /// ```
    /// # use keel_supervisor::ExitReason;
    /// assert!(ExitReason::Normal.error().is_none());
    /// assert_eq!(ExitReason::msg("x").error().unwrap().to_string(), "x");
    /// ```
    pub fn error(&self) -> Option<&(dyn std::error::Error + Send + Sync + 'static)> {
        match self {
            ExitReason::Error(e) => Some(&**e),
            _ => None,
        }
    }
}

/// Errors compare by what they say (the same error value, or two errors
/// with the same message, are equal), so reasons can be asserted on; the
/// other reasons compare as plain values.
impl PartialEq for ExitReason {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (ExitReason::Normal, ExitReason::Normal)
            | (ExitReason::Shutdown, ExitReason::Shutdown)
            | (ExitReason::Killed, ExitReason::Killed) => true,
            (ExitReason::Error(a), ExitReason::Error(b)) => {
                Arc::ptr_eq(a, b) || a.to_string() == b.to_string()
            }
            (ExitReason::Panic(a), ExitReason::Panic(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for ExitReason {}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::Normal => f.write_str("normal"),
            ExitReason::Shutdown => f.write_str("shutdown"),
            ExitReason::Error(e) => write!(f, "error: {e}"),
            ExitReason::Panic(p) => write!(f, "panic: {p}"),
            ExitReason::Killed => f.write_str("killed"),
        }
    }
}

/// The error a child returns; any `std::error::Error` converts into it with
/// `?`.
///
/// ```
/// use keel_supervisor::ChildError;
///
/// fn parse(port: &str) -> Result<u16, ChildError> {
///     Ok(port.parse::<u16>()?)
/// }
/// assert!(parse("x").is_err());
/// assert!(ChildError::shutdown().is_shutdown());
/// assert!(!ChildError::msg("lost the database").is_shutdown());
/// ```
pub struct ChildError {
    inner: ErrorKind,
}

enum ErrorKind {
    Shutdown,
    Failure(Box<dyn std::error::Error + Send + Sync>),
}

impl ChildError {
    /// An exit that means "stopped on purpose" (OTP's `{shutdown, _}`): a
    /// [`Restart::Transient`] child that returns it is not restarted.
    pub fn shutdown() -> Self {
        Self {
            inner: ErrorKind::Shutdown,
        }
    }

    /// A failure described by a message.
    pub fn msg(message: impl Into<String>) -> Self {
        Self {
            inner: ErrorKind::Failure(message.into().into()),
        }
    }

    /// True for [`ChildError::shutdown`].
    pub fn is_shutdown(&self) -> bool {
        matches!(self.inner, ErrorKind::Shutdown)
    }

    pub(crate) fn into_reason(self) -> ExitReason {
        match self.inner {
            ErrorKind::Shutdown => ExitReason::Shutdown,
            ErrorKind::Failure(e) => ExitReason::Error(Arc::from(e)),
        }
    }
}

impl<E: Into<Box<dyn std::error::Error + Send + Sync>>> From<E> for ChildError {
    fn from(e: E) -> Self {
        Self {
            inner: ErrorKind::Failure(e.into()),
        }
    }
}

impl fmt::Debug for ChildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for ChildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner {
            ErrorKind::Shutdown => f.write_str("shutdown"),
            ErrorKind::Failure(e) => fmt::Display::fmt(e, f),
        }
    }
}

/// What a child's body returns.
pub type ChildResult = Result<(), ChildError>;

pub(crate) type StartFn =
    Arc<dyn Fn(ChildContext) -> BoxFuture<'static, ChildResult> + Send + Sync>;

/// One supervised child: a name, an async body, and its policies.
///
/// The body receives a [`ChildContext`] and runs for the child's whole life.
/// It calls [`ChildContext::ready`] once initialised; the supervisor starts
/// the next sibling only then (OTP's synchronous `init`). A body that has
/// slow setup to do calls [`ChildContext::defer`] first, so siblings are not
/// held up (OTP's `handle_continue`). Returning `Ok(())` is a normal exit;
/// an error or a panic is abnormal.
///
/// A `ChildSpec` value is one child: cloning it makes a new child with the
/// same body and policies but its own state.
///
/// ```
/// use std::time::Duration;
/// use keel_supervisor::{ChildSpec, Restart, Shutdown};
///
/// let spec = ChildSpec::new("ticker", |ctx| async move {
///     ctx.ready();
///     ctx.cancelled().await;
///     Ok(())
/// })
/// .restart(Restart::Transient)
/// .shutdown(Shutdown::Timeout(Duration::from_secs(1)));
/// assert_eq!(spec.name(), "ticker");
/// ```
pub struct ChildSpec {
    pub(crate) start: StartFn,
    pub(crate) restart: Restart,
    pub(crate) shutdown: Shutdown,
    pub(crate) significant: bool,
    pub(crate) backoff: Option<RestartBackoff>,
    pub(crate) fuse: Option<ChildFuse>,
    pub(crate) start_timeout: Option<Duration>,
    pub(crate) node: Arc<Node>,
}

impl ChildSpec {
    /// A permanent worker named `name` whose body is `start`, stopped with
    /// a 5 s timeout.
    pub fn new<F, Fut>(name: impl Into<String>, start: F) -> Self
    where
        F: Fn(ChildContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ChildResult> + Send + 'static,
    {
        Self::from_parts(
            Arc::new(move |ctx| Box::pin(start(ctx))),
            Node::new(name.into(), Kind::Worker, None),
            Shutdown::default(),
        )
    }

    pub(crate) fn from_parts(start: StartFn, node: Arc<Node>, shutdown: Shutdown) -> Self {
        Self {
            start,
            restart: Restart::Permanent,
            shutdown,
            significant: false,
            backoff: None,
            fuse: None,
            start_timeout: None,
            node,
        }
    }

    /// Sets the restart type (default [`Restart::Permanent`]).
    pub fn restart(mut self, restart: Restart) -> Self {
        self.restart = restart;
        self
    }

    /// Sets how the child is stopped (default 5 s timeout; supervisors
    /// default to [`Shutdown::Infinity`]).
    pub fn shutdown(mut self, shutdown: Shutdown) -> Self {
        self.shutdown = shutdown;
        self
    }

    /// Marks the child significant for [`crate::AutoShutdown`]. Only
    /// transient and temporary children may be significant; the supervisor
    /// refuses to build otherwise.
    ///
    /// ```
    /// # use keel_supervisor::{ChildSpec, Restart};
    /// let job = ChildSpec::new("migration", |ctx| async move { ctx.ready(); Ok(()) })
    ///     .restart(Restart::Transient)
    ///     .significant(true);
    /// # let _ = job;
    /// ```
    pub fn significant(mut self, significant: bool) -> Self {
        self.significant = significant;
        self
    }

    /// Opts into a restart delay with exponential backoff and full jitter.
    pub fn backoff(mut self, backoff: RestartBackoff) -> Self {
        self.backoff = Some(backoff);
        self
    }

    /// Opts into a per-child fuse (park instead of escalating).
    pub fn fuse(mut self, fuse: ChildFuse) -> Self {
        self.fuse = Some(fuse);
        self
    }

    /// Fails the child's start if it has not called
    /// [`ChildContext::ready`] or [`ChildContext::defer`] within `timeout`
    /// (OTP waits forever, which stays the default).
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = Some(timeout);
        self
    }

    /// Excludes this child from readiness: the tree may be ready while it is
    /// not (for optional background work). On by default.
    ///
    /// ```
    /// # use keel_supervisor::ChildSpec;
    /// let spec = ChildSpec::new("metrics-push", |ctx| async move { ctx.ready(); Ok(()) })
    ///     .required_for_readiness(false);
    /// # let _ = spec;
    /// ```
    pub fn required_for_readiness(self, required: bool) -> Self {
        self.node.set_required(required);
        self
    }

    /// The child's name.
    pub fn name(&self) -> &str {
        self.node.name()
    }
}

impl Clone for ChildSpec {
    fn clone(&self) -> Self {
        Self {
            start: self.start.clone(),
            restart: self.restart,
            shutdown: self.shutdown,
            significant: self.significant,
            backoff: self.backoff,
            fuse: self.fuse,
            start_timeout: self.start_timeout,
            node: self.node.fresh_copy(),
        }
    }
}

impl fmt::Debug for ChildSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChildSpec")
            .field("name", &self.name())
            .field("restart", &self.restart)
            .field("shutdown", &self.shutdown)
            .field("significant", &self.significant)
            .finish_non_exhaustive()
    }
}
