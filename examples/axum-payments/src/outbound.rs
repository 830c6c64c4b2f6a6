//! The outbound call to the payment provider: the one place this service
//! uses keel-breaker and keel-retry.
//!
//! The provider here is an in-process stand-in for a remote API, with the
//! two failures that matter to exactly-once: a refused connection (nothing
//! was sent, safe to retry and to report as "not executed") and a timeout
//! after the charge was made (the answer is lost, the charge may stand).
//!
//! ```
//! use keel_example_axum_payments::outbound::{Charge, Outbound, Provider, Reachability};
//! # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
//! let provider = Provider::new();
//! let outbound = Outbound::new(provider.clone());
//! assert_eq!(outbound.charge("alice", "{\"amount\":5}").await, Charge::Done(1));
//! provider.set(Reachability::Refusing);
//! assert!(matches!(outbound.charge("alice", "{}").await, Charge::NotSent { .. }));
//! assert_eq!(provider.charges(), 1);
//! # });
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use keel_breaker::{Breaker, Config};
use keel_retry::{Backoff, BreakerMode, Jitter, RetryError, retry};

/// How the provider answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Reachability {
    /// It charges and answers.
    Up = 0,
    /// It refuses the connection: nothing is sent.
    Refusing = 1,
    /// It charges, but its answer never arrives (a timeout).
    LosesAnswers = 2,
}

/// Why one call to the provider failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProviderError {
    /// The connection was refused: the request was never sent.
    Refused,
    /// The request was sent and no answer came in time.
    TimedOut,
}

impl std::fmt::Display for ProviderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Refused => "connection refused",
            Self::TimedOut => "timed out waiting for the answer",
        })
    }
}

impl std::error::Error for ProviderError {}

/// The in-process payment provider. Cheap to clone (shared state).
#[derive(Clone, Debug, Default)]
pub struct Provider {
    mode: Arc<AtomicU8>,
    charges: Arc<AtomicU64>,
}

impl Provider {
    /// A provider that is up and has made no charge.
    ///
    /// ```
    /// let provider = keel_example_axum_payments::outbound::Provider::new();
    /// assert_eq!(provider.charges(), 0);
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Changes how it answers from now on.
    ///
    /// ```
    /// use keel_example_axum_payments::outbound::{Provider, Reachability};
    /// Provider::new().set(Reachability::Refusing);
    /// ```
    pub fn set(&self, reachability: Reachability) {
        self.mode.store(reachability as u8, Ordering::SeqCst);
    }

    /// How many charges it has made: the number that must equal the
    /// number of distinct payments.
    ///
    /// ```
    /// assert_eq!(keel_example_axum_payments::outbound::Provider::new().charges(), 0);
    /// ```
    pub fn charges(&self) -> u64 {
        self.charges.load(Ordering::SeqCst)
    }

    async fn charge(&self, _user: &str, _body: &str) -> Result<u64, ProviderError> {
        match self.mode.load(Ordering::SeqCst) {
            1 => Err(ProviderError::Refused),
            2 => {
                self.charges.fetch_add(1, Ordering::SeqCst);
                Err(ProviderError::TimedOut)
            }
            _ => Ok(self.charges.fetch_add(1, Ordering::SeqCst) + 1),
        }
    }
}

/// What became of a charge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Charge {
    /// Charged; the provider's payment number.
    Done(u64),
    /// Certainly not charged: the breaker refused the call, or every
    /// attempt's connection was refused. The handler says "not executed".
    NotSent {
        /// When to try again, if the breaker knows.
        retry_after: Option<Duration>,
    },
    /// Maybe charged: a request was sent and its answer lost.
    Unknown(String),
}

/// The provider behind a circuit breaker, called with capped, jittered
/// retries of refused connections only (a refused connection sent
/// nothing; a timeout may have charged, so it is never retried).
#[derive(Clone)]
pub struct Outbound {
    provider: Provider,
    breaker: Breaker,
}

impl Outbound {
    /// Calls `provider` through a breaker with the default settings.
    ///
    /// ```
    /// use keel_example_axum_payments::outbound::{Outbound, Provider};
    /// let outbound = Outbound::new(Provider::new());
    /// ```
    pub fn new(provider: Provider) -> Self {
        let breaker = Breaker::new("payment-provider", Config::default())
            .expect("the default breaker config is valid");
        Self { provider, breaker }
    }

    /// The breaker, for operators (and tests) to force open or inspect.
    ///
    /// ```
    /// use keel_example_axum_payments::outbound::{Outbound, Provider};
    /// assert_eq!(Outbound::new(Provider::new()).breaker().name(), "payment-provider");
    /// ```
    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    /// Charges `user` for `body`.
    ///
    /// ```
    /// use keel_example_axum_payments::outbound::{Charge, Outbound, Provider};
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
    /// let outbound = Outbound::new(Provider::new());
    /// outbound.breaker().force_open(None);
    /// assert!(matches!(outbound.charge("bob", "{}").await, Charge::NotSent { .. }));
    /// # });
    /// ```
    pub async fn charge(&self, user: &str, body: &str) -> Charge {
        let result = retry(|_attempt| self.provider.charge(user, body))
            .max_attempts(3)
            .backoff(
                Backoff::exponential(Duration::from_millis(20))
                    .cap(Duration::from_millis(200))
                    .jitter(Jitter::Full),
            )
            .deadline(Duration::from_secs(5))
            .breaker(self.breaker.clone(), BreakerMode::AllAttempts)
            .when(|e: &ProviderError| *e == ProviderError::Refused)
            .run()
            .await;
        match result {
            Ok(payment) => Charge::Done(payment),
            // The breaker refused the first attempt: nothing was sent.
            Err(RetryError::Rejected(rejected)) => Charge::NotSent {
                retry_after: rejected.retry_after,
            },
            // Only refusals are retried, so a last error that is a refusal
            // means every attempt was refused: nothing was sent.
            Err(RetryError::Failed {
                error: ProviderError::Refused,
                ..
            }) => Charge::NotSent { retry_after: None },
            Err(other) => Charge::Unknown(other.to_string()),
        }
    }
}
