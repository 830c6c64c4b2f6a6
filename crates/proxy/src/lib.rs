//! The data plane of the `keel` gateway: the listener that accepts and
//! watches downstream connections, the life of one request top to bottom
//! ([`Proxy::handle`]: checks on the head, the route, the route's filter,
//! the upstream phase from `keel-upstream`, the stale cache, the response
//! headers, a protocol upgrade spliced into a tunnel, logging), and the
//! drain registry every connection and tunnel is in.
//!
//! Module map, each using only the ones before it: `activity` (a
//! connection's watchdog), `connections` (the drain registry), `filter`
//! (the route's hooks), `stale`, `route`, `tunnel`, `proxy` (a request),
//! `listener` (a connection).
//!
//! ```no_run
//! # async fn example(gateway: std::sync::Arc<keel_proxy::Proxy>) -> std::io::Result<()> {
//! use keel_proxy::{ConnectionSettings, DataPlane};
//!
//! let plane = DataPlane::bind("127.0.0.1:8080".parse().unwrap(), gateway, &ConnectionSettings::default()).await?;
//! let (_stop, stopped) = tokio::sync::watch::channel(false);
//! plane.run(stopped).await;
//! # Ok(())
//! # }
//! ```

mod activity;
pub mod connections;
pub mod filter;
mod gate;
pub mod listener;
pub mod proxy;
pub mod route;
pub mod stale;
pub mod tunnel;

pub use activity::{ConnectionSettings, ServerIo, ServerStream};
pub use connections::Connections;
pub use filter::{
    BoxFuture, Downstream, Exchange, FilterDecision, RequestContext, RequestFilter, ResponseFilter,
    UpstreamOutcome,
};
pub use listener::{ConnectionCount, DataPlane};
pub use proxy::{Proxy, ProxySettings};
pub use route::{Route, Router};
pub use stale::StaleCache;
pub use tunnel::ClosePolicy;
