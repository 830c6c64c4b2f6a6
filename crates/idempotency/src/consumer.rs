//! At-most-once processing of messages, on the same stores as HTTP keys.
//!
//! Brokers deliver at least once: a consumer that crashes (or is slow)
//! before acknowledging gets the message again. [`process_once`] claims the
//! event id in the store before running the handler and records success
//! after, so a redelivered message is recognised and skipped, even when the
//! redelivery goes to another consumer instance sharing the store.
//!
//! - Handler succeeds: the event is recorded for `ttl`; redeliveries get
//!   [`Processed::Duplicate`]. Acknowledge in both cases.
//! - Handler fails (`Err`): the claim is released, so a redelivery runs the
//!   handler again. Do not acknowledge (or negatively acknowledge).
//! - Another consumer is processing the same event right now:
//!   [`Processed::InFlight`]; redeliver later (a NAK with that delay).
//! - The consumer crashes or the future is dropped mid-handler: the claim
//!   lapses when its lease ends and a later redelivery runs the handler
//!   again. Pick a lease longer than the handler's worst case.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use keel_idempotency::consumer::{Consumer, Processed};
//! use keel_idempotency::memory::MemoryStore;
//!
//! # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
//! let consumer = Consumer::new(Arc::new(MemoryStore::new()));
//! let ttl = Duration::from_secs(3600);
//! let first = consumer.process_once("order-42", ttl, async { Ok::<_, std::io::Error>("shipped") }).await;
//! assert!(matches!(first, Ok(Processed::Ran("shipped"))));
//! let again = consumer.process_once("order-42", ttl, async { Ok::<_, std::io::Error>("shipped twice!") }).await;
//! assert!(matches!(again, Ok(Processed::Duplicate)));
//! # });
//! ```

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::store::{Claim, Fingerprint, Lease, Store, StoreError, StoreKey};

/// What [`process_once`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Processed<T> {
    /// The handler ran and its success was recorded.
    Ran(T),
    /// The handler ran, but recording it failed (the lease ran out and
    /// another consumer took the event over, or the store went down): a
    /// redelivery may run it again.
    RanNotRecorded(T, String),
    /// The event was processed before; the handler did not run.
    Duplicate,
    /// Another consumer is processing the event now; the handler did not
    /// run. Redeliver after `retry_after`.
    InFlight {
        /// Time left on the other consumer's lease.
        retry_after: Duration,
    },
}

/// Why [`process_once`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError<E> {
    /// The handler returned an error; the claim was released so a
    /// redelivery runs it again.
    #[error("handler failed: {0}")]
    Handler(E),
    /// The store could not be asked; the handler did not run.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Settings for [`Consumer::process_once`].
#[derive(Clone)]
pub struct Consumer {
    store: Arc<dyn Store>,
    lease: Duration,
    namespace: String,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("store", &self.store.name())
            .field("lease", &self.lease)
            .field("namespace", &self.namespace)
            .finish()
    }
}

impl Consumer {
    /// A consumer over `store` with a 30 s lease and namespace `evt`.
    ///
    /// ```
    /// let c = keel_idempotency::consumer::Consumer::new(std::sync::Arc::new(keel_idempotency::memory::MemoryStore::new()));
    /// ```
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            lease: Duration::from_secs(30),
            namespace: "evt".into(),
        }
    }

    /// How long a claim holds while the handler runs (default 30 s).
    ///
    /// ```
    /// # let c = keel_idempotency::consumer::Consumer::new(std::sync::Arc::new(keel_idempotency::memory::MemoryStore::new()));
    /// let c = c.lease(std::time::Duration::from_secs(120));
    /// ```
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// A prefix for the store keys (default `evt`), e.g. one per consumer
    /// group. Printable ASCII, at most 64 characters.
    ///
    /// ```
    /// # let c = keel_idempotency::consumer::Consumer::new(std::sync::Arc::new(keel_idempotency::memory::MemoryStore::new()));
    /// let c = c.namespace("billing");
    /// ```
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// Runs `handler` unless event `event_id` was processed already; see
    /// the [module docs](self).
    ///
    /// ```
    /// # use keel_idempotency::consumer::{Consumer, Processed, ProcessError};
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
    /// # let c = Consumer::new(std::sync::Arc::new(keel_idempotency::memory::MemoryStore::new()));
    /// let ttl = std::time::Duration::from_secs(60);
    /// let failed = c.process_once("e1", ttl, async { Err::<(), _>("db down") }).await;
    /// assert!(matches!(failed, Err(ProcessError::Handler("db down"))));
    /// // The failure released the event: the redelivery runs the handler.
    /// let retried = c.process_once("e1", ttl, async { Ok::<_, &str>(()) }).await;
    /// assert!(matches!(retried, Ok(Processed::Ran(()))));
    /// # });
    /// ```
    pub async fn process_once<T, E, F>(
        &self,
        event_id: &str,
        ttl: Duration,
        handler: F,
    ) -> Result<Processed<T>, ProcessError<E>>
    where
        F: Future<Output = Result<T, E>>,
    {
        let key = event_key(&self.namespace, event_id);
        run(&*self.store, &key, self.lease, ttl, handler).await
    }
}

/// [`Consumer::process_once`] with the default lease and namespace.
///
/// ```
/// use keel_idempotency::consumer::{process_once, Processed};
/// use keel_idempotency::memory::MemoryStore;
/// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
/// let store = MemoryStore::new();
/// let ttl = std::time::Duration::from_secs(60);
/// let r = process_once(&store, "msg-1", ttl, async { Ok::<_, ()>(1) }).await;
/// assert_eq!(r.ok(), Some(Processed::Ran(1)));
/// let r = process_once(&store, "msg-1", ttl, async { Ok::<_, ()>(2) }).await;
/// assert_eq!(r.ok(), Some(Processed::Duplicate));
/// # });
/// ```
pub async fn process_once<S, T, E, F>(
    store: &S,
    event_id: &str,
    ttl: Duration,
    handler: F,
) -> Result<Processed<T>, ProcessError<E>>
where
    S: Store + ?Sized,
    F: Future<Output = Result<T, E>>,
{
    let key = event_key("evt", event_id);
    run(store, &key, Duration::from_secs(30), ttl, handler).await
}

/// The store key of an event: namespace and a digest of the id, so any id
/// (any length, any bytes) maps to a valid key.
fn event_key(namespace: &str, event_id: &str) -> StoreKey {
    let ns: String = namespace
        .chars()
        .map(|c| if c.is_ascii_graphic() { c } else { '_' })
        .take(64)
        .collect();
    let digest = blake3::hash(event_id.as_bytes());
    StoreKey::from_digest(&ns, digest.as_bytes())
}

async fn run<S, T, E, F>(
    store: &S,
    key: &StoreKey,
    lease: Duration,
    ttl: Duration,
    handler: F,
) -> Result<Processed<T>, ProcessError<E>>
where
    S: Store + ?Sized,
    F: Future<Output = Result<T, E>>,
{
    // Events carry no request to compare; every claim uses one fingerprint.
    let fp = Fingerprint::from_bytes([0; 32]);
    let token = match store.claim(key, fp, Lease::freeing(lease)).await? {
        Claim::Acquired { token } => token,
        Claim::Completed { .. } => return Ok(Processed::Duplicate),
        Claim::InFlight { retry_after, .. } => return Ok(Processed::InFlight { retry_after }),
        // Consumer claims free the key when they lapse (a redelivery after
        // a crash runs again, as the module docs say), so a store never
        // reports one abandoned; were it to, waiting is the safe answer.
        Claim::Abandoned { .. } => return Ok(Processed::InFlight { retry_after: lease }),
    };
    match handler.await {
        Ok(value) => match store.complete(key, token, b"", ttl).await {
            Ok(()) => Ok(Processed::Ran(value)),
            Err(e) => Ok(Processed::RanNotRecorded(value, e.to_string())),
        },
        Err(e) => {
            // If the release fails the claim lapses at the end of its lease,
            // which only delays the redelivery.
            let _ = store.release(key, token).await;
            Err(ProcessError::Handler(e))
        }
    }
}
