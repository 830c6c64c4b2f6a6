//! # keel-retry: retries that cannot cause a storm
//!
//! Retrying is how a client survives a blip, and how a fleet of clients
//! turns a blip into an outage. This crate retries any async operation
//! (it knows nothing about HTTP; [`RetryLayer`] adapts it to tower) with
//! every brake a storm needs, together:
//!
//! * **Capped, jittered backoff** ([`Backoff`]): constant, exponential
//!   with [`Jitter::Full`], [`Jitter::Equal`] or [`Jitter::Decorrelated`]
//!   (Marc Brooker's formulas), or any function. The cap is applied before
//!   the jitter and every draw stays inside it: a cap really caps.
//! * **Server hints**: `Retry-After` as seconds or an HTTP date
//!   ([`parse_retry_after`]) and `X-RateLimit-Reset`
//!   ([`parse_rate_limit_reset`]) set the next delay
//!   ([`Decision::RetryAfter`]), bounded by a maximum.
//! * **Retry budgets** shared by every caller of a client, lock-free:
//!   [`TokenBucket`] (gRPC throttling: failures cost a token, successes
//!   earn a fraction, no retries at half or below) and [`RatioBudget`]
//!   (retries at most a fraction of recent requests, with a floor per
//!   second).
//! * **A deadline over the whole call**, attempts and sleeps together, and
//!   a maximum attempt count.
//! * **A circuit breaker** ([`keel_breaker`]) consulted for every attempt,
//!   or — [`BreakerMode::RetriesOnly`] — only for retries, so an open
//!   breaker silences the retry storm without failing first attempts.
//!
//! ## Example
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap().block_on(async {
//! use keel_retry::{retry, Backoff, Jitter, TokenBucket};
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! let budget = Arc::new(TokenBucket::grpc()); // share it across the client
//! let answer = retry(|attempt| async move {
//!         if attempt < 3 { Err("connection reset") } else { Ok(42) }
//!     })
//!     .max_attempts(5)
//!     .backoff(Backoff::exponential(Duration::from_millis(100))
//!         .cap(Duration::from_secs(2))
//!         .jitter(Jitter::Full))
//!     .deadline(Duration::from_secs(5))
//!     .budget(budget)
//!     .run()
//!     .await;
//! assert_eq!(answer.unwrap(), 42);
//! # });
//! ```
//!
//! ## A tower stack: retry, breaker, timeout
//!
//! [`RetryLayer`] and keel-breaker's `BreakerLayer` are ordinary tower
//! layers with named futures, so they stack in a `ServiceBuilder` with
//! tower's own. Outermost first: retry around the breaker around a
//! per-attempt timeout. The breaker sees every attempt (a timeout is a
//! failure); a call the breaker rejects is not retried, since retrying
//! into an open breaker is the storm it exists to stop.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap().block_on(async {
//! use keel_breaker::{Breaker, BreakerLayer, CallError, Config};
//! use keel_retry::{Backoff, Decision, RetryError, RetryLayer, RetryPolicy};
//! use std::sync::{Arc, atomic::{AtomicU32, Ordering}};
//! use std::time::Duration;
//! use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
//!
//! let calls = Arc::new(AtomicU32::new(0));
//! let c = calls.clone();
//! // The first attempt hangs, the second answers.
//! let upstream = tower::service_fn(move |id: u32| {
//!     let n = c.fetch_add(1, Ordering::SeqCst);
//!     async move {
//!         if n == 0 {
//!             std::future::pending::<()>().await;
//!         }
//!         Ok::<_, BoxError>(format!("item {id}"))
//!     }
//! });
//! let breaker = Breaker::new("inventory", Config::fuse(4, Duration::from_secs(10), Duration::from_secs(30)))?;
//! let mut svc = ServiceBuilder::new()
//!     .layer(RetryLayer::new(
//!         RetryPolicy::default()
//!             .max_attempts(3)
//!             .backoff(Backoff::constant(Duration::from_millis(50))),
//!         |id: &u32| Some(*id), // reads are safe to send again
//!         |r: Result<&String, &CallError<BoxError>>| match r {
//!             Err(CallError::Inner(_)) => Decision::Retry, // timeouts, transport errors
//!             Err(CallError::Rejected(_)) | Ok(_) => Decision::Done,
//!         },
//!     ))
//!     .layer(BreakerLayer::new(breaker.clone()))
//!     .timeout(Duration::from_millis(200))
//!     .service(upstream);
//!
//! let start = tokio::time::Instant::now();
//! let item = svc.ready().await.unwrap().call(7).await.unwrap();
//! assert_eq!(item, "item 7");
//! assert_eq!(start.elapsed(), Duration::from_millis(250), "one timeout, one backoff");
//! assert_eq!(breaker.snapshot().counters.failures, 1, "the timeout counted");
//! assert_eq!(calls.load(Ordering::SeqCst), 2);
//! // The error type keeps every layer's meaning, down to the inner error.
//! let _: Option<RetryError<CallError<BoxError>>> = None;
//! # Ok::<(), keel_breaker::ConfigError>(())
//! # }).unwrap();
//! ```
//!
//! ## Why jitter (the herd)
//!
//! `cargo run --release -p keel-retry --example herd` simulates N clients
//! writing to a resource that accepts one write per slot. Without jitter,
//! clients that collided retry together and collide again; full jitter
//! spreads them and does the least total work. The table is in
//! `docs/breaker-retry.md`.
//!
//! ## Compared with fuse and resilience4j
//!
//! | | fuse (Erlang) | resilience4j Retry | keel-retry |
//! | --- | --- | --- | --- |
//! | backoff | none (a fuse only says `blown`) | interval functions, randomized exponential | constant, exponential, full / equal / decorrelated jitter, custom; cap holds with jitter |
//! | retry predicate | n/a | on exception / on result | on error ([`Retry::when`]) or any result ([`Decision`]) |
//! | `Retry-After` / rate-limit reset | no | left to the user | parsed ([`parse_retry_after`]) and honoured, bounded |
//! | retry budget | no | no | token bucket (gRPC) and ratio budget (SRE, Envoy) |
//! | whole-call deadline | no | no (per-attempt time limiter) | attempts and sleeps together |
//! | breaker interplay | the breaker itself | separate decorators | [`BreakerMode::RetriesOnly`]: the breaker blocks only retries |
//!
//! gRPC and Envoy have budgets and hints, the SRE book per-client ratios,
//! Polly and resilience4j a breaker beside retries; here they are one
//! policy ([`RetryPolicy`]) that the async builder ([`retry`]) and the
//! tower layer share. The tower layer adds a [`Policy`] (like
//! `tower::retry::Policy`): which requests may be sent again and what a
//! result calls for, as a pair of closures or a named type.

mod backoff;
mod budget;
mod hint;
mod layer;
mod retry;

pub use backoff::{Backoff, BackoffIter, Jitter};
pub use budget::{Budget, RatioBudget, TokenBucket};
/// The generator behind jitter, re-exported so that callers of
/// [`Backoff::iter_with`] name the same version: a seedable, dependency-free
/// generator (wyrand), fine for jitter, not for secrets.
pub use fastrand;
pub use hint::{HintError, parse_http_date, parse_rate_limit_reset, parse_retry_after};
pub use layer::{Policy, RetryErrors, RetryFuture, RetryLayer, RetryService};
pub use retry::{BreakerMode, Decision, Retry, RetryError, RetryPolicy, StopReason, retry};
