//! The upstream side of the `keel` gateway: endpoints and their connection
//! pools, load balancing, the breakers (outlier ejection per endpoint, one
//! per upstream with operator overrides), active health checks, and the
//! attempt loop with retries under a budget, all inside the upstream's
//! `request_timeout`.
//!
//! Failures stay typed ([`UpstreamError`]: whose fault, whether the request
//! was sent, whether another attempt could help, when to come back) until
//! the proxy turns one into the client's answer.
//!
//! ```no_run
//! # async fn example(spec: &keel_config::UpstreamSpec) {
//! use http::Request;
//! use keel_http::ProxyBody;
//! use keel_upstream::Upstream;
//!
//! let metrics = keel_metrics::Metrics::new();
//! let upstream = Upstream::new(spec, &metrics);
//! let deadline = tokio::time::Instant::now() + upstream.request_timeout;
//! let request = Request::get("/").body(ProxyBody::Empty).expect("request");
//! let no_extra_lines = |_: &mut http::request::Parts| keel_h1::ExtraLines::new();
//! match keel_upstream::forward(&upstream, request, false, deadline, no_extra_lines).await {
//!     Ok(response) => println!("{}", response.status()),
//!     Err(error) => println!("{error} (sent: {})", error.sent),
//! }
//! # }
//! ```

pub mod breakers;
mod endpoint;
mod error;
pub mod health;
mod retry;
mod send;

pub use endpoint::{ConnectionGuard, Endpoint, InFlight, SendError, Unavailable, Upstream};
pub use error::{ClientFault, ErrorKind, UpstreamError};
pub use retry::{RetrySafe, forward, is_retry_safe, unavailable};
pub use send::{body_failure, body_timeout, send};
