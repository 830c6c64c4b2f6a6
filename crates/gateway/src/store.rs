//! The idempotency store from `[store]`, connected by a supervised child.
//!
//! A remote store is never a precondition of start-up ("it's about the
//! guarantees"): the gateway builds a [`StoreSlot`] that answers
//! "unavailable" until the connector child has opened the store, and a
//! [`HealthGate`] that refuses store calls while the connector says the
//! store is down. Idempotent routes then fail closed (503 problem+json with
//! `Retry-After`, or fail open where configured) within microseconds, plain
//! routes are untouched, and `/readyz` reports `store: <why>`.
//!
//! The connector opens the store (embedded: the log directory; redis: a lazily
//! connecting client; postgres: a pool and the table), then probes it with
//! a claim and a release on a health key every second. A failed probe, or
//! a failed store call on the request path (which wakes the connector at
//! once), flips readiness and the gate; probing goes on with backoff and
//! full jitter, so a store that comes back is picked up without a restart.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use keel_idempotency::gate::{ConsecutiveFailures, StoreGate};
use keel_idempotency::store::{
    BoxFuture, Claim, FencingToken, Fingerprint, KeyState, Lease, Store, StoreError, StoreKey,
};
use keel_supervisor::{ChildContext, ChildResult, ChildSpec, RestartBackoff};
use tokio::sync::Notify;

use crate::readiness::ReadinessHandle;
use keel_config::{StoreBackend, StoreSpec};

/// How often a healthy store is probed.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// How often expired records are purged (stores that do not expire keys).
const PURGE_EVERY: Duration = Duration::from_secs(60);

/// The store every idempotent route shares; empty until connected.
#[derive(Default)]
pub struct StoreSlot {
    store: OnceLock<Arc<dyn Store>>,
}

impl StoreSlot {
    fn get(&self) -> Result<&Arc<dyn Store>, StoreError> {
        self.store
            .get()
            .ok_or_else(|| StoreError::Unavailable("the store is not connected yet".into()))
    }
}

impl Store for StoreSlot {
    fn claim<'a>(
        &'a self,
        key: &'a StoreKey,
        fingerprint: Fingerprint,
        lease: Lease,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        match self.get() {
            Ok(store) => store.claim(key, fingerprint, lease),
            Err(e) => Box::pin(async move { Err(e) }),
        }
    }

    fn claim_now(
        &self,
        key: &StoreKey,
        fingerprint: Fingerprint,
        lease: Lease,
    ) -> Option<Result<Claim, StoreError>> {
        self.get().ok()?.claim_now(key, fingerprint, lease)
    }

    fn complete_now(
        &self,
        key: &StoreKey,
        token: FencingToken,
        payload: Vec<u8>,
        ttl: Duration,
    ) -> Result<Result<(), StoreError>, Vec<u8>> {
        match self.get() {
            Ok(store) => store.complete_now(key, token, payload, ttl),
            Err(_) => Err(payload),
        }
    }

    fn renew<'a>(
        &'a self,
        key: &'a StoreKey,
        token: FencingToken,
        lease: Lease,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        match self.get() {
            Ok(store) => store.renew(key, token, lease),
            Err(e) => Box::pin(async move { Err(e) }),
        }
    }

    fn inspect<'a>(
        &'a self,
        key: &'a StoreKey,
    ) -> BoxFuture<'a, Result<Option<KeyState>, StoreError>> {
        match self.get() {
            Ok(store) => store.inspect(key),
            Err(e) => Box::pin(async move { Err(e) }),
        }
    }

    fn remove<'a>(&'a self, key: &'a StoreKey) -> BoxFuture<'a, Result<bool, StoreError>> {
        match self.get() {
            Ok(store) => store.remove(key),
            Err(e) => Box::pin(async move { Err(e) }),
        }
    }

    fn complete<'a>(
        &'a self,
        key: &'a StoreKey,
        token: FencingToken,
        payload: &'a [u8],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        match self.get() {
            Ok(store) => store.complete(key, token, payload, ttl),
            Err(e) => Box::pin(async move { Err(e) }),
        }
    }

    fn release<'a>(
        &'a self,
        key: &'a StoreKey,
        token: FencingToken,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        match self.get() {
            Ok(store) => store.release(key, token),
            Err(e) => Box::pin(async move { Err(e) }),
        }
    }

    fn purge_expired(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        match self.get() {
            Ok(store) => store.purge_expired(),
            Err(e) => Box::pin(async move { Err(e) }),
        }
    }

    fn name(&self) -> &'static str {
        self.store.get().map_or("unconnected", |s| s.name())
    }
}

/// The gate around the store: closed while the connector says the store is
/// down, and a consecutive-failures breaker for failures it has not seen
/// yet. Lock-free: two atomics and the breaker's atomics per request.
pub struct HealthGate {
    up: AtomicBool,
    breaker: ConsecutiveFailures,
    wake: Notify,
}

impl Default for HealthGate {
    fn default() -> Self {
        Self {
            up: AtomicBool::new(false),
            breaker: ConsecutiveFailures::new(3, Duration::from_millis(500)),
            wake: Notify::new(),
        }
    }
}

impl StoreGate for HealthGate {
    fn allow(&self) -> bool {
        self.up.load(Ordering::Acquire) && self.breaker.allow()
    }

    fn on_success(&self) {
        self.breaker.on_success();
    }

    fn on_failure(&self) {
        self.breaker.on_failure();
        // Let the connector probe now rather than at its next tick.
        self.wake.notify_one();
    }
}

/// What the routes and the connector share.
#[derive(Clone)]
pub struct SharedStore {
    /// The store (behind its slot).
    pub store: Arc<StoreSlot>,
    /// The gate every engine uses.
    pub gate: Arc<HealthGate>,
    settings: Arc<Settings>,
}

struct Settings {
    /// Shown in reasons: a path or a URL without its password.
    location: String,
    spec: StoreSpec,
}

impl SharedStore {
    /// The store `spec` describes, not connected yet.
    pub fn new(spec: &StoreSpec) -> Self {
        let location = match &spec.backend {
            StoreBackend::Memory { .. } => "memory".to_owned(),
            StoreBackend::Embedded { path, .. } => format!("embedded at {}", path.display()),
            StoreBackend::RedisCluster { nodes, .. } => format!(
                "redis cluster at {}",
                nodes
                    .iter()
                    .map(|n| redact(n))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            StoreBackend::Redis { url, .. } => format!("redis at {}", redact(url)),
            StoreBackend::Postgres { url, .. } => format!("postgres at {}", redact(url)),
        };
        Self {
            store: Arc::default(),
            gate: Arc::default(),
            settings: Arc::new(Settings {
                location,
                spec: spec.clone(),
            }),
        }
    }

    /// The connector as a supervised child: it defers its readiness (so
    /// the rest of the tree starts at once), then connects and probes
    /// forever, flipping `ready` (the `store` readiness condition).
    pub fn connector(&self, ready: ReadinessHandle) -> ChildSpec {
        let shared = self.clone();
        ChildSpec::new("store", move |ctx| {
            let shared = shared.clone();
            let ready = ready.clone();
            async move { shared.connect_loop(ctx, ready).await }
        })
    }

    async fn connect_loop(self, ctx: ChildContext, ready: ReadinessHandle) -> ChildResult {
        let where_ = &self.settings.location;
        ctx.defer(format!("store: connecting to {where_}"));
        ready.set_not_ready(format!("store: connecting to {where_}"));
        let backoff = RestartBackoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let mut jitter = fastrand::Rng::new();
        let mut attempt = 0u32;
        let mut last_purge = tokio::time::Instant::now();
        let health_key = StoreKey::new(format!("keel-health:{}", std::process::id()))
            .ok_or_else(|| keel_supervisor::ChildError::msg("invalid health key"))?;
        loop {
            let result = match self.open().await {
                Ok(store) => probe(store, &health_key, self.settings.spec.timeout).await,
                Err(e) => Err(e),
            };
            let wait = match result {
                Ok(()) => {
                    if !self.gate.up.swap(true, Ordering::AcqRel) {
                        tracing::info!(store = %where_, "idempotency store is reachable");
                    }
                    self.gate.breaker.on_success();
                    ready.set_ready();
                    ctx.ready();
                    attempt = 0;
                    if last_purge.elapsed() >= PURGE_EVERY {
                        last_purge = tokio::time::Instant::now();
                        if let Ok(store) = self.store.get() {
                            let _ = store.purge_expired().await;
                        }
                    }
                    PROBE_EVERY
                }
                Err(why) => {
                    let reason = format!("store: {where_}: {why}");
                    if self.gate.up.swap(false, Ordering::AcqRel) || attempt == 0 {
                        tracing::warn!(%reason, "idempotency store is unreachable");
                    }
                    ready.set_not_ready(reason.clone());
                    ctx.not_ready(reason);
                    let delay = backoff.delay(attempt, jitter.f64());
                    attempt = attempt.saturating_add(1);
                    delay
                }
            };
            tokio::select! {
                _ = ctx.cancelled() => return Ok(()),
                _ = tokio::time::sleep(wait) => {}
                _ = self.gate.wake.notified() => {}
            }
        }
    }

    /// The store, opened on first success.
    async fn open(&self) -> Result<&Arc<dyn Store>, String> {
        if let Some(store) = self.store.store.get() {
            return Ok(store);
        }
        let timeout = self.settings.spec.timeout;
        let store: Arc<dyn Store> = match &self.settings.spec.backend {
            &StoreBackend::Memory {
                max_bytes,
                max_bytes_per_tenant,
            } => Arc::new(keel_idempotency::memory::MemoryStore::with_config(
                keel_idempotency::memory::MemoryConfig::default()
                    .max_bytes(max_bytes)
                    .max_tenant_bytes(max_bytes_per_tenant),
            )),
            StoreBackend::Embedded {
                path,
                durable_claims,
            } => {
                let (path, durable) = (path.clone(), *durable_claims);
                let opened = tokio::task::spawn_blocking(move || {
                    keel_idempotency::embedded::EmbeddedStore::open_dir(path)
                        .map(|store| store.durable_claims(durable))
                })
                .await
                .map_err(|e| e.to_string())?;
                Arc::new(opened.map_err(|e| e.to_string())?)
            }
            StoreBackend::Redis { url, prefix } => {
                use keel_idempotency::redis::RedisStore;
                let store = RedisStore::lazy(url, redis_options(prefix, timeout));
                Arc::new(store.map_err(|e| e.to_string())?)
            }
            StoreBackend::RedisCluster { nodes, prefix } => {
                use keel_idempotency::redis::RedisStore;
                let store = RedisStore::lazy_cluster(nodes, redis_options(prefix, timeout));
                Arc::new(store.map_err(|e| e.to_string())?)
            }
            StoreBackend::Postgres { url, prefix } => {
                use keel_idempotency::postgres::{PostgresOptions, PostgresStore};
                let options = PostgresOptions::default()
                    .table(&postgres_table(prefix))
                    .map_err(|e| e.to_string())?
                    .op_timeout(timeout);
                let store = PostgresStore::connect(url, options).map_err(|e| e.to_string())?;
                tokio::time::timeout(timeout * 2, store.ensure_schema())
                    .await
                    .map_err(|_| "timed out creating the table".to_owned())?
                    .map_err(|e| e.to_string())?;
                Arc::new(store)
            }
        };
        // Only the connector sets the slot, so this never loses a race.
        let _ = self.store.store.set(store);
        self.store.get().map_err(|e| e.to_string())
    }
}

/// The options of a Redis store (one server or a cluster).
fn redis_options(prefix: &str, timeout: Duration) -> keel_idempotency::redis::RedisOptions {
    keel_idempotency::redis::RedisOptions::default()
        .prefix(prefix.to_owned())
        .op_timeout(timeout)
        .connections(2)
}

/// One claim and release on the health key, under `timeout`.
async fn probe(store: &Arc<dyn Store>, key: &StoreKey, timeout: Duration) -> Result<(), String> {
    let work = async {
        match store
            .claim(
                key,
                Fingerprint::from_bytes([0; 32]),
                Lease::freeing(Duration::from_secs(5)),
            )
            .await
        {
            Ok(Claim::Acquired { token }) => match store.release(key, token).await {
                Ok(()) | Err(StoreError::Fenced) => Ok(()),
                Err(e) => Err(e.to_string()),
            },
            // Someone else's probe (another gateway sharing the store): it
            // answered, so it is up.
            Ok(_) | Err(StoreError::Fenced) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
}

/// `[store] prefix` as a PostgreSQL table name: `<prefix>_idempotency`,
/// lower case, non-identifier characters replaced.
pub fn postgres_table(prefix: &str) -> String {
    let mut name: String = prefix
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    if !name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_') {
        name.insert(0, '_');
    }
    name.push_str("_idempotency");
    name
}

/// A URL without its password, for logs and `/readyz`.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{}@{}", &url[..scheme + 3], user, &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_sql_identifiers() {
        assert_eq!(postgres_table("keel"), "keel_idempotency");
        assert_eq!(postgres_table("Keel-Test.1"), "keel_test_1_idempotency");
        assert_eq!(postgres_table("9x"), "_9x_idempotency");
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("redis://user:secret@host:6379/"),
            "redis://user@host:6379/"
        );
        assert_eq!(redact("redis://host:6379/"), "redis://host:6379/");
    }

    #[tokio::test(start_paused = true)]
    async fn the_slot_is_unavailable_until_connected_and_the_gate_follows_probes() {
        let shared = SharedStore::new(&StoreSpec::default());
        let key = StoreKey::new("k").expect("key");
        assert!(matches!(
            shared
                .store
                .claim(
                    &key,
                    Fingerprint::from_bytes([1; 32]),
                    Lease::freeing(Duration::from_secs(1))
                )
                .await,
            Err(StoreError::Unavailable(_))
        ));
        assert!(!shared.gate.allow());
        let readiness = crate::readiness::Readiness::default();
        let handle = readiness.register("store", "starting");
        let root = keel_supervisor::Supervisor::builder("t")
            .child(shared.connector(handle))
            .build()
            .expect("tree");
        let running = root.start().await.expect("start");
        for _ in 0..100 {
            if readiness.is_ready() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(readiness.is_ready());
        assert!(shared.gate.allow());
        assert!(matches!(
            shared
                .store
                .claim(
                    &key,
                    Fingerprint::from_bytes([1; 32]),
                    Lease::freeing(Duration::from_secs(1))
                )
                .await,
            Ok(Claim::Acquired { .. })
        ));
        running.shutdown().await;
    }
}
