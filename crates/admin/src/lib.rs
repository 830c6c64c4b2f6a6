//! The admin API of the keel gateway, as a typed contract.
//!
//! The admin API is how an operator (or a deploy script) asks a running
//! gateway how it is doing and tells it what to do: `/status`, `/readyz`,
//! `/metrics`, drains, breaker overrides, idempotency keys. Three parts
//! share one definition of every document:
//!
//! - the **DTOs** ([`Status`], [`ReadinessReport`], [`DrainReport`],
//!   [`KeyAnswer`], [`BreakerSnapshot`], [`ErrorBody`], ...): plain
//!   `Serialize + Deserialize` structs whose field names are the wire
//!   names;
//! - the **server** ([`serve`]): routing, query parsing, percent-decoding,
//!   a cap on connections and a header read timeout. It knows nothing of
//!   the gateway: it asks an [`AdminBackend`] for each answer, and the
//!   backend is all a gateway implements;
//! - the **client** ([`fetch_status`], [`start_drain`], [`drain_endpoint`],
//!   [`idempotency_key`], ...), which returns the same DTOs, and the
//!   terminal rendering of `keel status` ([`render_status`]) and
//!   `keel drain` ([`progress_line`]).
//!
//! This crate depends on no other keel crate.
//!
//! ```
//! use std::sync::Arc;
//! use keel_admin::*;
//!
//! /// A gateway with nothing in it.
//! struct Empty;
//!
//! impl AdminBackend for Empty {
//!     fn status(&self) -> Status {
//!         Status {
//!             version: "0.1.0".into(),
//!             uptime_seconds: 3,
//!             listen: "127.0.0.1:8080".into(),
//!             ready: true,
//!             readiness: vec![],
//!             connections: 0,
//!             draining: false,
//!             upstreams: vec![],
//!             routes: vec![],
//!             supervision: None,
//!             drain: self.drain_report(),
//!         }
//!     }
//!     fn readiness(&self) -> ReadinessReport {
//!         ReadinessReport::of(vec![])
//!     }
//!     fn metrics_text(&self) -> String {
//!         "# EOF\n".into()
//!     }
//!     fn drain_report(&self) -> DrainReport {
//!         DrainReport {
//!             phase: DrainPhase::Serving,
//!             connections: 0,
//!             tunnels: None,
//!             http: None,
//!             endpoints: vec![],
//!             started: None,
//!         }
//!     }
//!     fn start_drain(&self) -> bool {
//!         false
//!     }
//!     fn drain_endpoint(&self, upstream: &str, _: &str) -> Result<DrainProgress, EndpointDrainError> {
//!         Err(EndpointDrainError::NoUpstream(upstream.into()))
//!     }
//!     fn resume_endpoint(&self, upstream: &str, _: &str) -> Result<bool, EndpointDrainError> {
//!         Err(EndpointDrainError::NoUpstream(upstream.into()))
//!     }
//!     fn upstream_names(&self) -> Vec<String> {
//!         vec![]
//!     }
//!     fn breaker_action(&self, upstream: &str, _: BreakerAction) -> Result<BreakerSnapshot, BreakerActionError> {
//!         Err(BreakerActionError::UnknownUpstream(upstream.into()))
//!     }
//!     fn idempotency_keys(&self) -> Option<&dyn IdempotencyKeys> {
//!         None
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
//! let addr = listener.local_addr().unwrap().to_string();
//! let (stop, stopped) = tokio::sync::watch::channel(false);
//! let server = tokio::spawn(serve(listener, Arc::new(Empty), AdminLimits::default(), stopped));
//!
//! let status = fetch_status(&addr).await.unwrap();
//! assert!(status.ready);
//! assert!(render_status(&status).starts_with("keel 0.1.0  listen 127.0.0.1:8080  up 3s  READY"));
//! let refused = drain_endpoint(&addr, "app", "http://blue:3000").await.unwrap_err();
//! assert_eq!(refused.to_string(), "404 Not Found: no upstream named \"app\"");
//!
//! stop.send_replace(true);
//! server.await.unwrap();
//! # }
//! ```

#![forbid(unsafe_code)]

mod backend;
mod client;
mod dto;
mod query;
mod server;

pub use backend::{
    AdminBackend, BoxFuture, BreakerAction, BreakerActionError, EndpointDrainError,
    IdempotencyKeys, KeyError,
};
pub use client::{
    StatusError, admin_request, breaker_action, drain_endpoint, fetch_drain, fetch_status,
    idempotency_key, progress_line, render_status, resume_endpoint, start_drain,
};
pub use dto::{
    BreakerCounters, BreakerMode, BreakerSnapshot, BreakerState, BreakerWindow, Condition,
    DrainPhase, DrainProgress, DrainReport, EndpointDrainReport, EndpointDrainStarted,
    EndpointResilience, EndpointResumed, EndpointStatus, ErrorBody, Escalation, HealthStatus,
    KeyAnswer, KeyQuery, ReadinessReport, RouteStatus, Status, SupervisionNode, UpstreamStatus,
};
pub use query::{key_path, key_query, percent_decode, percent_encode, query_param};
pub use server::{AdminBody, AdminLimits, answer, serve};
