//! # keel-breaker: a circuit breaker with fuse's speed and resilience4j's policies
//!
//! A breaker sits in front of a dependency and stops calling it while it is
//! sick. It knows nothing about HTTP: it guards any operation, and offers a
//! tower [`BreakerLayer`] for services.
//!
//! ## The model
//!
//! * **Closed**: calls pass; each outcome is recorded. Any configured policy
//!   may trip the breaker:
//!   * [`FailureCount`]: `failure_threshold` failures within `window`
//!     trip it (Erlang fuse's `{standard, MaxR, MaxT}` with
//!     `MaxR = failure_threshold - 1`, `MaxT = window`);
//!   * [`RatePolicy`] (resilience4j): the failure rate, or the slow-call
//!     rate ([`SlowPolicy`]), over a count-based or time-based [`Window`]
//!     reaches its threshold once `min_calls` outcomes were recorded.
//! * **Open**: every call is rejected with [`Rejected`], which carries the
//!   time left (for a `Retry-After` header). The first open lasts
//!   [`Config::open_duration`] (fuse's `reset`); consecutive trips grow it
//!   exponentially with full jitter, never past
//!   [`Config::open_duration_cap`]. A dependency's own `Retry-After`
//!   ([`Outcome::FailureRetryAfter`], [`Breaker::open_for`]) can set it.
//! * **Half-open**: exactly [`Config::half_open_probes`] probe calls are
//!   admitted. Each permit is reserved with one compare-and-swap, so
//!   concurrent callers can never exceed the count, and a probe that never
//!   reports frees its permit after [`Config::probe_timeout`]: the breaker
//!   cannot get stuck half-open. All probes succeeding closes it; any
//!   failure reopens it.
//! * **Recovering** (optional, [`Recovery`]): instead of letting the full
//!   load hit a dependency that just came back, admit 10 %, 25 %, 50 %,
//!   then 100 % of calls, tripping again if the failure rate climbs.
//!
//! Operator overrides ([`Mode`]) outrank the state: [`Breaker::disable`]
//! (pass all, still count), [`Breaker::metrics_only`] (pass all, run the
//! state machine as a dry run), [`Breaker::force_open`] (reject all,
//! optionally until a time), [`Breaker::enable`], plus
//! [`Breaker::record_failure`] and [`Breaker::reset`]. Fault injection ([`Config::fault_injection`])
//! rejects a share of healthy calls to exercise callers' failure paths.
//!
//! Every transition is published as a typed [`Event`]; an alarm is raised
//! when the breaker opens and cleared only after it stayed closed for
//! [`Config::alarm_clear_after`] (hysteresis). [`Breaker::snapshot`] gives a
//! serde-serialisable [`Snapshot`] of state and counters.
//!
//! ## Example
//!
//! ```
//! use keel_breaker::{Breaker, Config, FailureCount, RatePolicy, Window, State};
//! use std::time::Duration;
//!
//! let config = Config::default()
//!     .failure_count(FailureCount { failure_threshold: 5, window: Duration::from_secs(10) })
//!     .rate(Some(RatePolicy { window: Window::Count(20), min_calls: 10, ..RatePolicy::default() }))
//!     .open_duration(Duration::from_secs(5))
//!     .half_open_probes(3);
//! let breaker = Breaker::new("inventory", config)?;
//!
//! match breaker.allow() {
//!     Ok(permit) => {
//!         // ... call the dependency ...
//!         permit.success();
//!     }
//!     Err(rejected) => println!("skipped: {rejected}, retry in {:?}", rejected.retry_after),
//! }
//! assert_eq!(breaker.state(), State::Closed);
//! # Ok::<(), keel_breaker::ConfigError>(())
//! ```
//!
//! ## With tower
//!
//! [`BreakerLayer`] guards a tower service: rejected calls fail with
//! [`CallError::Rejected`], the service's own errors come back unchanged
//! in [`CallError::Inner`], and the response future [`BreakerFuture`] is a
//! named type that costs no allocation. Classifiers take
//! `Result<&Response, &Error>`, as keel-retry's do. keel-retry's crate
//! documentation has a `ServiceBuilder` stack of retry, this breaker and
//! tower's timeout.
//!
//! ## fuse's words
//!
//! Readers coming from Erlang's fuse find its terms as search aliases in
//! the documentation: `CountPolicy`, `max_r`, `max_t` lead to
//! [`FailureCount`] (and [`FailureCount::fuse`], [`Config::fuse`] take
//! fuse's numbers as they are), `melt` to [`Breaker::record_failure`],
//! `ask` to [`Breaker::would_allow`].
//!
//! ## Compared with fuse and resilience4j
//!
//! | | fuse (Erlang) | resilience4j | keel-breaker |
//! | --- | --- | --- | --- |
//! | count window (MaxR in MaxT) | yes | no | yes |
//! | failure-rate / slow-call windows | no | yes | yes, combinable with the count window |
//! | half-open | no: full load after `reset` | fixed probes; can get stuck if probes never finish | fixed probes reserved by CAS, expiring |
//! | gradual recovery | no | no | 10 % -> 25 % -> 50 % -> 100 % |
//! | growing open duration | no | interval function | exponential, full jitter, capped |
//! | `Retry-After` sets open time | no | no | yes |
//! | overrides | disable/enable, melt, reset | disabled, forced open, metrics only | all of both, plus timed force-open |
//! | ask cost | ~0.5 us (ETS read) | lock-free state, ring buffer | two atomic loads when closed (see `docs/breaker-retry.md`) |
//!
//! ## Performance notes
//!
//! [`Breaker::allow`] in the closed state reads two atomics and writes
//! nothing, so it scales with cores. Outcomes are recorded with atomic
//! read-modify-writes into ring or bucket windows (no lock). A
//! [`Registry`] is sharded and only used to look breakers up by name;
//! request paths keep a [`Breaker`] handle.
#![doc(html_root_url = "https://docs.rs/keel-breaker")]

mod breaker;
mod config;
mod layer;
mod registry;
mod types;
mod window;

pub use breaker::{Breaker, Permit};
pub use config::{Config, ConfigError, FailureCount, RatePolicy, Recovery, SlowPolicy, Window};
pub use layer::{BreakerFuture, BreakerLayer, BreakerService};
pub use registry::Registry;
pub use types::{
    CallError, Classify, Counters, DefaultClassifier, Event, EventKind, Mode, Outcome, Reason,
    RejectReason, Rejected, Snapshot, State, WindowTotals,
};
