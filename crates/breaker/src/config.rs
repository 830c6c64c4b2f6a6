//! Breaker configuration: plain data, validated once by [`Config::validate`]
//! (called by [`Breaker::new`](crate::Breaker::new)), separate from the
//! running state so one `Config` can stamp out many breakers.

use std::time::Duration;

/// Why a [`Config`] was refused.
///
/// ```
/// use keel_breaker::{Config, ConfigError};
/// let err = Config::default().half_open_probes(0).validate().unwrap_err();
/// assert_eq!(err, ConfigError::Zero { what: "half_open_probes" });
/// assert_eq!(err.to_string(), "half_open_probes must be at least 1");
/// ```
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// A rate (failure rate, slow-call rate, fault-injection rate, recovery
    /// step) was outside `0.0..=1.0` or not a number.
    #[error("{what} must be a number between 0.0 and 1.0, got {value}")]
    Rate {
        /// Which setting.
        what: &'static str,
        /// The value given.
        value: f64,
    },
    /// A size or count that must be positive was zero.
    #[error("{what} must be at least 1")]
    Zero {
        /// Which setting.
        what: &'static str,
    },
    /// A duration that must be positive was zero.
    #[error("{what} must be longer than zero")]
    ZeroDuration {
        /// Which setting.
        what: &'static str,
    },
    /// The open-duration cap is below the base open duration.
    #[error("open_duration_cap ({cap:?}) is shorter than open_duration ({base:?}); raise the cap")]
    CapBelowBase {
        /// The base open duration.
        base: Duration,
        /// The cap.
        cap: Duration,
    },
    /// Gradual recovery steps must grow and end at 1.0.
    #[error(
        "recovery steps must be increasing shares in (0, 1] ending at 1.0, got {0:?}; try [0.1, 0.25, 0.5, 1.0]"
    )]
    RecoverySteps(Vec<f64>),
}

/// The window over which the failure rate and slow-call rate are computed.
///
/// ```
/// use keel_breaker::Window;
/// use std::time::Duration;
/// let last_100 = Window::Count(100);
/// let last_10s = Window::Time { buckets: 10, bucket: Duration::from_secs(1) };
/// assert_ne!(last_100, last_10s);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// The last `n` recorded outcomes (a circular buffer).
    Count(u32),
    /// `buckets` buckets of `bucket` each; outcomes older than
    /// `buckets * bucket` fall out.
    Time {
        /// Number of buckets.
        buckets: u32,
        /// Length of one bucket.
        bucket: Duration,
    },
}

/// Trip on `failure_threshold` failures within `window`: the count policy
/// of Erlang's fuse (`{standard, MaxR, MaxT}`, where `MaxR` is
/// `failure_threshold - 1` failures tolerated and `MaxT` is `window`).
///
/// ```
/// use keel_breaker::FailureCount;
/// use std::time::Duration;
/// // The 5th failure within 10 s trips.
/// let p = FailureCount { failure_threshold: 5, window: Duration::from_secs(10) };
/// // The same in fuse's terms: 4 failures tolerated within 10 s.
/// assert_eq!(p, FailureCount::fuse(4, Duration::from_secs(10)));
///
/// // A threshold of 0 would trip before any failure: refused.
/// use keel_breaker::{Config, ConfigError};
/// let zero = FailureCount { failure_threshold: 0, window: Duration::from_secs(10) };
/// assert_eq!(
///     Config::default().failure_count(zero).validate(),
///     Err(ConfigError::Zero { what: "failure_count.failure_threshold" })
/// );
/// ```
#[doc(
    alias = "CountPolicy",
    alias = "max_r",
    alias = "max_t",
    alias = "fuse"
)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailureCount {
    /// Failures within `window` that trip the breaker (at least 1).
    #[doc(alias = "max_r")]
    pub failure_threshold: u32,
    /// How long a failure is remembered.
    #[doc(alias = "max_t")]
    pub window: Duration,
}

impl FailureCount {
    /// fuse's terms: tolerate `max_r` failures within `max_t`; the
    /// `(max_r + 1)`-th trips.
    ///
    /// ```
    /// use keel_breaker::FailureCount;
    /// use std::time::Duration;
    /// assert_eq!(FailureCount::fuse(0, Duration::from_secs(1)).failure_threshold, 1);
    /// ```
    pub fn fuse(max_r: u32, max_t: Duration) -> Self {
        Self {
            failure_threshold: max_r.saturating_add(1),
            window: max_t,
        }
    }
}

/// resilience4j-style rate policy: trips when the failure rate (and/or the
/// slow-call rate) over `window` reaches its threshold, once at least
/// `min_calls` outcomes are in the window.
///
/// ```
/// use keel_breaker::{RatePolicy, Window};
/// let p = RatePolicy::default();
/// assert_eq!(p.window, Window::Count(100));
/// assert_eq!(p.failure_rate, Some(0.5));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RatePolicy {
    /// Count- or time-based window.
    pub window: Window,
    /// Outcomes needed in the window before the rates can trip.
    pub min_calls: u32,
    /// Failure-rate threshold in `0.0..=1.0` (`None`: not checked).
    pub failure_rate: Option<f64>,
    /// Slow-call policy (`None`: calls are never slow).
    pub slow: Option<SlowPolicy>,
}

impl Default for RatePolicy {
    /// resilience4j's defaults: 50 % over the last 100 calls, 100 minimum.
    fn default() -> Self {
        Self {
            window: Window::Count(100),
            min_calls: 100,
            failure_rate: Some(0.5),
            slow: None,
        }
    }
}

/// Calls taking at least `threshold` are slow; the breaker trips when the
/// share of slow calls reaches `rate`.
///
/// ```
/// use keel_breaker::SlowPolicy;
/// use std::time::Duration;
/// let s = SlowPolicy { threshold: Duration::from_millis(500), rate: 0.8 };
/// assert_eq!(s.rate, 0.8);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlowPolicy {
    /// Duration from which a call counts as slow.
    pub threshold: Duration,
    /// Slow-call rate threshold in `0.0..=1.0`.
    pub rate: f64,
}

/// Gradual recovery: after the half-open probes succeed, admit
/// `steps[0]` of the calls for `step_duration`, then `steps[1]`, ... and
/// close fully after the last step. A trip during recovery opens again.
///
/// ```
/// use keel_breaker::Recovery;
/// let r = Recovery::default();
/// assert_eq!(r.steps, vec![0.1, 0.25, 0.5, 1.0]);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Recovery {
    /// Shares of traffic admitted at each step, increasing, ending at 1.0.
    pub steps: Vec<f64>,
    /// How long each step lasts.
    pub step_duration: Duration,
    /// Outcomes needed before the failure rate can trip during recovery
    /// (lower than the closed `min_calls`, since only a share of calls pass).
    pub min_calls: u32,
}

impl Default for Recovery {
    fn default() -> Self {
        Self {
            steps: vec![0.1, 0.25, 0.5, 1.0],
            step_duration: Duration::from_secs(5),
            min_calls: 10,
        }
    }
}

/// Everything a breaker needs to know, combinable: any of the count
/// policy, the rate policy (with slow calls) may trip it.
///
/// ```
/// use keel_breaker::{Config, FailureCount};
/// use std::time::Duration;
/// let cfg = Config::default()
///     .failure_count(FailureCount { failure_threshold: 4, window: Duration::from_secs(1) })
///     .open_duration(Duration::from_secs(2))
///     .half_open_probes(2);
/// assert!(cfg.validate().is_ok());
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The failure-count policy (`None`: off).
    #[doc(alias = "count")]
    pub failure_count: Option<FailureCount>,
    /// Failure-rate / slow-call window (`None`: off).
    pub rate: Option<RatePolicy>,
    /// Open duration after the first trip (fuse's `reset`).
    pub open_duration: Duration,
    /// Upper bound of the open duration as it grows on consecutive trips.
    pub open_duration_cap: Duration,
    /// Upper bound for a `Retry-After` hint used as open duration.
    pub max_hint: Duration,
    /// Probe calls admitted in half-open; all must succeed to close.
    pub half_open_probes: u32,
    /// A probe that has not reported after this frees its permit.
    pub probe_timeout: Duration,
    /// Gradual recovery after half-open (`None`: close at once).
    pub recovery: Option<Recovery>,
    /// Share of healthy asks rejected on purpose (fuse's fault injection).
    pub fault_injection: f64,
    /// The alarm clears only after the breaker stayed closed this long.
    pub alarm_clear_after: Duration,
    /// Seed for the open-duration jitter: the same seed and the same
    /// sequence of transitions give the same open durations. (Fault
    /// injection draws from the calling thread's generator instead, so
    /// asks share no random state.)
    pub seed: u64,
}

impl Default for Config {
    /// resilience4j-like defaults: 50 % failure rate over the last 100 calls
    /// (100 minimum), open 60 s (growing to at most 10 min), 10 probes.
    fn default() -> Self {
        Self {
            failure_count: None,
            rate: Some(RatePolicy::default()),
            open_duration: Duration::from_secs(60),
            open_duration_cap: Duration::from_secs(600),
            max_hint: Duration::from_secs(600),
            half_open_probes: 10,
            probe_timeout: Duration::from_secs(30),
            recovery: None,
            fault_injection: 0.0,
            alarm_clear_after: Duration::from_secs(30),
            seed: 0x5eed_4b65_656c,
        }
    }
}

impl Config {
    /// A config in fuse's terms, with only the failure-count policy: trip
    /// on the `(max_r+1)`-th failure within `max_t`, stay open for `reset`.
    ///
    /// ```
    /// use keel_breaker::Config;
    /// use std::time::Duration;
    /// let cfg = Config::fuse(5, Duration::from_secs(10), Duration::from_secs(60));
    /// assert!(cfg.rate.is_none());
    /// ```
    pub fn fuse(max_r: u32, max_t: Duration, reset: Duration) -> Self {
        Self {
            failure_count: Some(FailureCount::fuse(max_r, max_t)),
            rate: None,
            open_duration: reset,
            open_duration_cap: reset.max(Duration::from_secs(600)),
            ..Self::default()
        }
    }

    /// Sets the failure-count policy.
    ///
    /// ```
    /// use keel_breaker::{Config, FailureCount};
    /// use std::time::Duration;
    /// let c = Config::default().failure_count(FailureCount { failure_threshold: 2, window: Duration::from_secs(1) });
    /// assert!(c.failure_count.is_some());
    /// ```
    #[doc(alias = "count")]
    pub fn failure_count(mut self, policy: FailureCount) -> Self {
        self.failure_count = Some(policy);
        self
    }

    /// Sets (or with `None` removes) the rate policy.
    ///
    /// ```
    /// use keel_breaker::Config;
    /// assert!(Config::default().rate(None).rate.is_none());
    /// ```
    pub fn rate(mut self, policy: Option<RatePolicy>) -> Self {
        self.rate = policy;
        self
    }

    /// Sets the base open duration.
    ///
    /// ```
    /// use keel_breaker::Config;
    /// use std::time::Duration;
    /// let c = Config::default().open_duration(Duration::from_secs(5));
    /// assert_eq!(c.open_duration, Duration::from_secs(5));
    /// ```
    pub fn open_duration(mut self, d: Duration) -> Self {
        self.open_duration = d;
        self
    }

    /// Sets the cap of the growing open duration.
    ///
    /// ```
    /// use keel_breaker::Config;
    /// use std::time::Duration;
    /// let c = Config::default().open_duration_cap(Duration::from_secs(120));
    /// assert_eq!(c.open_duration_cap, Duration::from_secs(120));
    /// ```
    pub fn open_duration_cap(mut self, d: Duration) -> Self {
        self.open_duration_cap = d;
        self
    }

    /// Sets the number of half-open probes.
    ///
    /// ```
    /// use keel_breaker::Config;
    /// assert_eq!(Config::default().half_open_probes(3).half_open_probes, 3);
    /// ```
    pub fn half_open_probes(mut self, n: u32) -> Self {
        self.half_open_probes = n;
        self
    }

    /// Sets how long an unreported probe holds its permit.
    ///
    /// ```
    /// use keel_breaker::Config;
    /// use std::time::Duration;
    /// let c = Config::default().probe_timeout(Duration::from_secs(2));
    /// assert_eq!(c.probe_timeout, Duration::from_secs(2));
    /// ```
    pub fn probe_timeout(mut self, d: Duration) -> Self {
        self.probe_timeout = d;
        self
    }

    /// Turns on gradual recovery.
    ///
    /// ```
    /// use keel_breaker::{Config, Recovery};
    /// assert!(Config::default().recovery(Recovery::default()).recovery.is_some());
    /// ```
    pub fn recovery(mut self, r: Recovery) -> Self {
        self.recovery = Some(r);
        self
    }

    /// Rejects about `rate` of healthy asks on purpose.
    ///
    /// ```
    /// use keel_breaker::Config;
    /// assert_eq!(Config::default().fault_injection(0.01).fault_injection, 0.01);
    /// ```
    pub fn fault_injection(mut self, rate: f64) -> Self {
        self.fault_injection = rate;
        self
    }

    /// Sets the alarm's hysteresis.
    ///
    /// ```
    /// use keel_breaker::Config;
    /// use std::time::Duration;
    /// let c = Config::default().alarm_clear_after(Duration::from_secs(9));
    /// assert_eq!(c.alarm_clear_after, Duration::from_secs(9));
    /// ```
    pub fn alarm_clear_after(mut self, d: Duration) -> Self {
        self.alarm_clear_after = d;
        self
    }

    /// Sets the seed of the open-duration jitter ([`Config::seed`]).
    ///
    /// ```
    /// use keel_breaker::Config;
    /// assert_eq!(Config::default().seed(7).seed, 7);
    /// ```
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Checks every setting; [`Breaker::new`](crate::Breaker::new) calls it.
    ///
    /// ```
    /// use keel_breaker::{Config, ConfigError};
    /// let err = Config::default().fault_injection(2.0).validate().unwrap_err();
    /// assert!(matches!(err, ConfigError::Rate { .. }));
    /// ```
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn rate(what: &'static str, value: f64) -> Result<(), ConfigError> {
            if (0.0..=1.0).contains(&value) {
                Ok(())
            } else {
                Err(ConfigError::Rate { what, value })
            }
        }
        fn dur(what: &'static str, d: Duration) -> Result<(), ConfigError> {
            if d.is_zero() {
                Err(ConfigError::ZeroDuration { what })
            } else {
                Ok(())
            }
        }
        rate("fault_injection", self.fault_injection)?;
        dur("open_duration", self.open_duration)?;
        dur("probe_timeout", self.probe_timeout)?;
        if self.open_duration_cap < self.open_duration {
            return Err(ConfigError::CapBelowBase {
                base: self.open_duration,
                cap: self.open_duration_cap,
            });
        }
        if self.half_open_probes == 0 {
            return Err(ConfigError::Zero {
                what: "half_open_probes",
            });
        }
        if let Some(c) = &self.failure_count {
            if c.failure_threshold == 0 {
                return Err(ConfigError::Zero {
                    what: "failure_count.failure_threshold",
                });
            }
            dur("failure_count.window", c.window)?;
        }
        if let Some(r) = &self.rate {
            if let Some(f) = r.failure_rate {
                rate("rate.failure_rate", f)?;
            }
            if let Some(s) = &r.slow {
                rate("rate.slow.rate", s.rate)?;
            }
            match r.window {
                Window::Count(0) => {
                    return Err(ConfigError::Zero {
                        what: "window size",
                    });
                }
                Window::Time { buckets: 0, .. } => {
                    return Err(ConfigError::Zero {
                        what: "window buckets",
                    });
                }
                Window::Time { bucket, .. } => dur("window bucket", bucket)?,
                Window::Count(_) => {}
            }
        }
        if let Some(rec) = &self.recovery {
            dur("recovery.step_duration", rec.step_duration)?;
            let ok = !rec.steps.is_empty()
                && rec.steps.windows(2).all(|w| w[0] < w[1])
                && rec.steps.iter().all(|s| *s > 0.0 && *s <= 1.0)
                && rec.steps.last() == Some(&1.0);
            if !ok {
                return Err(ConfigError::RecoverySteps(rec.steps.clone()));
            }
        }
        Ok(())
    }
}
