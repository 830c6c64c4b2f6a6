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
//! tower layer share.

mod backoff;
mod budget;
mod hint;
mod layer;
mod retry;

pub use backoff::{Backoff, BackoffIter, Jitter, SplitMix64};
pub use budget::{Budget, RatioBudget, TokenBucket};
pub use hint::{HintError, parse_http_date, parse_rate_limit_reset, parse_retry_after};
pub use layer::{RetryFuture, RetryLayer, RetryService};
pub use retry::{BreakerMode, Decision, Retry, RetryError, RetryPolicy, StopReason, retry};
