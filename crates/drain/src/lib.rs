//! Draining connections without a reconnect storm.
//!
//! When a server holding many long-lived connections leaves (a deploy, a
//! scale-down) or an upstream behind a gateway is replaced, dropping every
//! connection at once makes every client reconnect in the same second. This
//! crate sheds them gradually:
//!
//! - a [`Registry`] of live connections: register on accept, drop the
//!   [`Registration`] on close; O(1), sharded, no single task or lock on the
//!   path. Each connection waits on [`Registration::closing`] beside its own
//!   work and closes the way its protocol does when asked (HTTP/1
//!   `Connection: close`, HTTP/2 GOAWAY, WebSocket close code 1012);
//! - a [`DrainPlan`] with the pacing of Phoenix (fixed batches), Socket
//!   Drano (a percentage per interval) or Envoy (gradual over a duration),
//!   jitter inside each batch, a hard deadline after which whatever is left
//!   is closed by force, and a reconnect hint spread across connections;
//! - [`start`], which carries a plan out on tokio's clock (so plans are
//!   tested with paused time) and reports [`Progress`] at every step.
//!
//! ```
//! use std::time::Duration;
//! use keel_drain::{ConnKind, DrainPlan, Registry, Target};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let registry = Registry::new();
//! for _ in 0..100 {
//!     let mut conn = registry.register(ConnKind::TUNNEL, Some("http://blue:3000".into()));
//!     tokio::spawn(async move {
//!         let close = conn.closing().await;
//!         // A WebSocket tunnel would send close code 1012 here, with
//!         // `close.reconnect_after` in the reason.
//!         assert!(close.reconnect_after < Duration::from_secs(5));
//!     });
//! }
//! // Phoenix-style: 10 every 2 s, so the last are asked at 18-20 s.
//! let plan = DrainPlan::batches(10, Duration::from_secs(2)).deadline(Duration::from_secs(60));
//! let drain = keel_drain::start(&registry, Target::Endpoint("http://blue:3000".into()), plan);
//! let done = drain.finished().await;
//! assert_eq!(done.closed, 100);
//! assert!(done.elapsed_ms <= 20_000);
//! # }
//! ```

#![forbid(unsafe_code)]

mod plan;
mod registry;

pub use plan::{Drain, DrainPlan, Pacing, Progress, start};
pub use registry::{
    CloseRequest, ConnId, ConnKind, Registration, Registry, Target, parse_reconnect_hint,
};
