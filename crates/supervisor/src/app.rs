//! Running a tree as a program: signals, an orderly shutdown, a deadline.

use std::future::Future;
use std::time::Duration;

use crate::node::Escalation;
use crate::spec::ExitReason;
use crate::supervisor::{StartError, Supervisor, SupervisorHandle};

/// Why an [`Application`] ended badly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AppError {
    /// The root supervisor could not start.
    #[error(transparent)]
    Start(#[from] StartError),
    /// The tree stopped on its own with an abnormal reason (its root task
    /// panicked or was aborted).
    #[error("the supervision tree stopped: {0}")]
    TreeFailed(ExitReason),
    /// The root supervisor exceeded its restart intensity and gave up.
    #[error("the supervision tree gave up: {} restarts, the last of {}", .0.restarts, .0.child)]
    Escalated(Escalation),
    /// The orderly shutdown did not finish within the deadline; every task
    /// was aborted.
    #[error("shutdown did not finish within {0:?}; remaining tasks were aborted")]
    DeadlineExceeded(Duration),
    /// The signal handlers could not be installed.
    #[error("cannot listen for signals: {0}")]
    Signals(#[from] std::io::Error),
}

/// Runs a root supervisor the way a binary should: start the tree, wait for
/// SIGTERM or SIGINT (or for the tree to stop on its own), then stop the tree
/// in order within a deadline, aborting whatever is left when it passes.
///
/// Decide what happens when a top-level child fails to start with the root's
/// [`on_start_failure`](crate::SupervisorBuilder::on_start_failure).
///
/// ```
/// use std::time::Duration;
/// use keel_supervisor::{Application, ChildSpec, ExitReason, Supervisor};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let root = Supervisor::builder("app")
///     .child(ChildSpec::new("worker", |ctx| async move {
///         ctx.ready();
///         ctx.cancelled().await;
///         Ok(())
///     }))
///     .build()
///     .unwrap();
/// // In a binary: `Application::new(root).run().await` waits for a signal.
/// let exit = Application::new(root)
///     .shutdown_deadline(Duration::from_secs(30))
///     .run_until(async { /* e.g. an admin "stop" request */ })
///     .await
///     .unwrap();
/// assert_eq!(exit, ExitReason::Shutdown);
/// # }
/// ```
pub struct Application {
    root: Supervisor,
    deadline: Duration,
}

impl Application {
    /// An application around `root`, with a 30 s shutdown deadline.
    pub fn new(root: Supervisor) -> Self {
        Self {
            root,
            deadline: Duration::from_secs(30),
        }
    }

    /// Sets how long the orderly shutdown may take before every task is
    /// aborted.
    pub fn shutdown_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// Runs until SIGTERM or SIGINT (Ctrl-C), then shuts down.
    pub async fn run(self) -> Result<ExitReason, AppError> {
        let signal = shutdown_signal()?;
        self.run_until(signal).await
    }

    /// Runs until `shutdown` resolves, then shuts down.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<ExitReason, AppError> {
        let deadline = self.deadline;
        let handle = self.root.start().await?;
        run_started(handle, deadline, shutdown).await
    }
}

async fn run_started(
    handle: SupervisorHandle,
    deadline: Duration,
    shutdown: impl Future<Output = ()>,
) -> Result<ExitReason, AppError> {
    {
        tokio::select! {
            () = shutdown => {}
            reason = handle.wait() => {
                // A root that gave up exits with `shutdown`, as OTP's does;
                // the program still failed.
                if let Some(escalation) = handle.snapshot().escalation {
                    return Err(AppError::Escalated(escalation));
                }
                return if reason.is_abnormal() {
                    Err(AppError::TreeFailed(reason))
                } else {
                    Ok(reason)
                };
            }
        }
        tracing::info!(target: "keel_supervisor", ?deadline, "shutting down");
        match tokio::time::timeout(deadline, handle.shutdown()).await {
            Ok(reason) => Ok(reason),
            Err(_) => {
                handle.abort();
                Err(AppError::DeadlineExceeded(deadline))
            }
        }
    }
}

/// Resolves on the first SIGTERM or SIGINT.
#[cfg(unix)]
fn shutdown_signal() -> std::io::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

#[cfg(not(unix))]
fn shutdown_signal() -> std::io::Result<impl Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}
