//! The `keel` gateway assembled: [`start`] turns a [`keel_config::Spec`]
//! (the config, checked and typed once by keel-config) into a running
//! gateway (data plane, admin API, store, health checks, breaker
//! watchers and drain, each a child of one supervision tree) and
//! [`Running::wait_and_drain`] runs it until SIGTERM, SIGINT or
//! `POST /drain`, then drains it.
//!
//! Nothing is process-wide: each gateway owns its state, so tests start
//! several in one process (see the `test-util` feature).
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let spec = keel_config::load(std::path::Path::new("keel.toml"))
//!     .map_err(|errors| format!("{} config errors", errors.len()))?;
//! let running = keel_gateway::start(&spec).await?;
//! println!("serving on {}", running.listen);
//! running.wait_and_drain().await?;
//! # Ok(())
//! # }
//! ```

mod admin_backend;
mod background;
pub mod drain;
pub mod idempotency;
pub mod readiness;
pub mod serve;
pub mod store;
mod supervision;
pub mod telemetry;
#[cfg(feature = "test-util")]
pub mod test_util;

#[cfg(test)]
mod proxy_tests;

pub use serve::{Running, ServeError, build_proxy, start};
