//! The HTTP vocabulary of the `keel` gateway: the body type that flows
//! through it, the proxy header rules, and its own errors as
//! `application/problem+json`.
//!
//! Every other gateway crate builds on these; of them, this crate depends
//! only on `keel-h1`, whose upstream response body is one kind of
//! [`ProxyBody`] (the crate map is in `docs/ARCHITECTURE.md`).
//!
//! ```
//! use keel_http::{Problem, ProblemKind, ProxyBody};
//!
//! let response = Problem::new(ProblemKind::NoRoute, "no route for /x").into_response(None);
//! assert_eq!(response.status(), 404);
//! let _body: &ProxyBody = response.body();
//! ```

pub mod body;
pub mod headers;
pub mod problem;

pub use body::{BodyFault, BodyTooLarge, BodyWatch, BoxError, ProxyBody};
pub use problem::{Problem, ProblemKind};
