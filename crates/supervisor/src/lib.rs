//! OTP-grade supervision trees for tokio tasks.
//!
//! A [`Supervisor`] starts its children in order, each one initialised
//! before the next (OTP's synchronous start), watches them, and restarts
//! them by a [`Strategy`] within a restart intensity: more than `N` restarts
//! in `T` and it stops its children in reverse order and exits with reason
//! `shutdown`, as OTP's does, so that its own parent decides (escalation;
//! the detail is in [`Snapshot::escalation`] and [`EventKind::Escalated`]).
//! Supervisors nest, so a program is a tree whose top is strict and whose
//! leaves may be lenient.
//!
//! The semantics are Erlang/OTP's, checked against OTP 25's own
//! `supervisor` by a differential test (`tests/otp_differential.rs`); the
//! few deliberate differences are listed in `docs/supervisor.md`. Beyond
//! OTP, everything is opt-in:
//!
//! | OTP | here |
//! | --- | --- |
//! | `one_for_one`, `one_for_all`, `rest_for_one` | [`Strategy`] |
//! | `simple_one_for_one`, `DynamicSupervisor` (`max_children`) | [`Strategy::Dynamic`], [`SupervisorControl::start_child`] |
//! | `permanent`, `transient`, `temporary` | [`Restart`] |
//! | `brutal_kill`, timeout, `infinity` | [`Shutdown`] (cooperative cancellation, then abort) |
//! | `intensity`/`period` (default here 3 in 5 s, Elixir's) | [`SupervisorBuilder::intensity`] |
//! | `init/1` returning | [`ChildContext::ready`] |
//! | `handle_continue` | [`ChildContext::defer`], then `ready` |
//! | `significant`, `auto_shutdown` | [`ChildSpec::significant`], [`AutoShutdown`] |
//! | `terminate_child`, `restart_child`, `delete_child` | [`SupervisorControl::terminate_child`], [`restart_child`](SupervisorControl::restart_child), [`delete_child`](SupervisorControl::delete_child) |
//!
//! Beyond OTP, all opt-in so the defaults stay exact: restart delays with
//! exponential backoff and full jitter ([`RestartBackoff`]), a per-child fuse
//! that parks a flapping child instead of escalating ([`ChildFuse`]),
//! readiness as state ([`TreeProbe::is_ready`], with reasons), a typed event
//! stream ([`Event`]), a JSON snapshot of the tree ([`Snapshot`]), and an
//! [`Application`] runner that turns SIGTERM into an orderly shutdown with a
//! deadline and lets a handler decide what to do when a top-level child fails
//! to start ([`StartDecision`]).
//!
//! All timing goes through tokio's clock, so trees can be tested with
//! `tokio::time::pause()`.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use keel_supervisor::{ChildSpec, Restart, Strategy, Supervisor};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let db = ChildSpec::new("db", |ctx| async move {
//!     // Stable state first; the slow connect happens after `defer`.
//!     ctx.defer("connecting");
//!     ctx.ready();
//!     ctx.cancelled().await;
//!     Ok(())
//! });
//! let api = ChildSpec::new("api", |ctx| async move {
//!     ctx.ready();
//!     ctx.cancelled().await;
//!     Ok(())
//! })
//! .restart(Restart::Permanent);
//!
//! let root = Supervisor::builder("app")
//!     .strategy(Strategy::RestForOne) // the api depends on the db
//!     .intensity(3, Duration::from_secs(5))
//!     .child(db)
//!     .child(api)
//!     .build()
//!     .unwrap();
//! let handle = root.start().await.unwrap();
//! assert!(handle.is_ready());
//! handle.shutdown().await; // api stops first, then db
//! # }
//! ```

#![forbid(unsafe_code)]

use std::future::Future;
use std::pin::Pin;

mod app;
mod context;
mod event;
mod node;
mod spec;
mod supervisor;

pub use app::{AppError, Application};
pub use context::ChildContext;
pub use event::{Event, EventKind};
pub use node::{ChildState, Escalation, Kind, NotReady, Snapshot, TreeProbe};
pub use spec::{
    ChildError, ChildFuse, ChildResult, ChildSpec, ExitReason, Restart, RestartBackoff, Shutdown,
};
pub use supervisor::{
    AutoShutdown, BuildError, ControlError, StartDecision, StartError, StartFailure, Strategy,
    Supervisor, SupervisorBuilder, SupervisorControl, SupervisorHandle,
};

/// A boxed, sendable future.
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
