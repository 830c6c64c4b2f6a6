//! Upstreams: endpoints, their connection pools, and load balancing.
//!
//! Every endpoint owns its own pool (sharded stacks of idle HTTP/1.1
//! connections, `keel_h1::Connection`), so pool state is per endpoint and
//! per thread, not global. Balancing reads per-endpoint atomics:
//! round robin bumps one counter per upstream; least-outstanding compares
//! the in-flight counts of two endpoints picked at random (power of two
//! choices), which needs no shared state beyond those counters.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use http::request::Parts;
use http::uri::Authority;
use http::{HeaderValue, Response};
use keel_h1::{Connection, ExtraLines, Pool};
use tokio::net::TcpStream;

use crate::breakers::{BreakerWatcher, EndpointGuard, UpstreamResilience};
use keel_breaker::Permit;
use keel_config::{EndpointSpec, LoadBalancing, UpstreamSpec};
use keel_http::ProxyBody;
use keel_http::headers::next_random;
use keel_metrics::{EndpointMetrics, Metrics};

/// One endpoint of an upstream, with its own connection pool.
///
/// The pool is a few mutex-guarded stacks of idle connections, one picked
/// per worker thread, so threads do not contend on one lock; a connection
/// goes back to the pool when its response body has been read to the end.
#[derive(Debug)]
pub struct Endpoint {
    /// The URL as configured.
    pub url: String,
    /// `host:port` requests are sent to.
    pub authority: Authority,
    /// `authority` as a `Host` header, for requests that came without one.
    host: HeaderValue,
    /// Requests sent and not yet answered.
    pub outstanding: AtomicUsize,
    /// Its metrics.
    pub metrics: EndpointMetrics,
    /// Its breaker and health (outlier ejection).
    pub guard: EndpointGuard,
    connect_timeout: Duration,
    /// Idle connections.
    pool: Arc<IdlePool>,
    /// The same pool, as every response body still streaming from this
    /// endpoint holds it, to put its connection back at the end.
    returns: Arc<dyn Pool>,
    /// The URL shared with every tunnel's drain registration, so one
    /// endpoint's tunnels can be drained (no copy per tunnel).
    drain_key: Arc<str>,
    /// Draining (blue/green): no new requests or tunnels.
    draining: AtomicBool,
}

/// The idle connections of one endpoint: a few mutex-guarded stacks, one
/// picked per worker thread, so threads do not contend on one lock.
#[derive(Debug)]
struct IdlePool {
    idle_timeout: Duration,
    max_idle_per_shard: usize,
    shards: Box<[Mutex<Vec<IdleConnection>>]>,
}

#[derive(Debug)]
struct IdleConnection {
    connection: Box<Connection>,
    since: Instant,
}

thread_local! {
    // Each thread sticks to one shard of every pool, picked at random: no
    // counter shared by the process, and two gateways' threads need no
    // coordination.
    static SHARD: usize = fastrand::usize(..);
}

impl IdlePool {
    fn own_shard(&self) -> &Mutex<Vec<IdleConnection>> {
        &self.shards[SHARD.with(|s| *s) % self.shards.len()]
    }

    /// The most recently used idle connection that is still open: from this
    /// thread's shard first, then from any other shard not locked right now.
    fn checkout(&self) -> Option<Box<Connection>> {
        let own = SHARD.with(|s| *s) % self.shards.len();
        for i in 0..self.shards.len() {
            let index = (own + i) % self.shards.len();
            let mut idle = if i == 0 {
                self.shards[index]
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
            } else {
                match self.shards[index].try_lock() {
                    Ok(idle) => idle,
                    Err(_) => continue,
                }
            };
            while let Some(mut entry) = idle.pop() {
                if entry.since.elapsed() < self.idle_timeout && entry.connection.is_reusable() {
                    return Some(entry.connection);
                }
                // Dropping it closes the connection.
            }
        }
        None
    }

    /// Closes the idle connections that expired or that the upstream
    /// closed (or sent something on unasked), in the shards not locked
    /// right now; how many.
    fn sweep(&self) -> usize {
        let now = Instant::now();
        let mut closed = 0;
        for shard in &self.shards {
            let Ok(mut idle) = shard.try_lock() else {
                continue;
            };
            let before = idle.len();
            idle.retain_mut(|entry| {
                now.duration_since(entry.since) < self.idle_timeout
                    && entry.connection.is_reusable()
            });
            closed += before - idle.len();
        }
        closed
    }
}

impl Pool for IdlePool {
    /// Keeps a connection whose exchange is complete, unless the shard is
    /// full.
    fn checkin(&self, connection: Box<Connection>) {
        let now = Instant::now();
        let mut idle = self
            .own_shard()
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Expire from the bottom: the oldest idle connections sit there.
        let expired = idle
            .iter()
            .take_while(|e| now.duration_since(e.since) >= self.idle_timeout)
            .count();
        idle.drain(..expired);
        if idle.len() < self.max_idle_per_shard {
            idle.push(IdleConnection {
                connection,
                since: now,
            });
        }
    }
}

/// Why a request could not be exchanged with an endpoint.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The TCP connection could not be made: the request was not sent.
    #[error("connect: {0}")]
    Connect(std::io::Error),
    /// Connecting took longer than `connect_timeout`: the request was not sent.
    #[error("connect timed out")]
    ConnectTimeout,
    /// The HTTP exchange failed; `sent` is false when not a byte of the
    /// request reached the connection.
    #[error("{error}")]
    Exchange {
        /// What failed.
        error: keel_h1::Error,
        /// Whether the upstream may have seen the request.
        sent: bool,
    },
}

impl Endpoint {
    fn new(
        endpoint: &EndpointSpec,
        config: &UpstreamSpec,
        metrics: EndpointMetrics,
        guard: EndpointGuard,
    ) -> Self {
        let shards = std::thread::available_parallelism().map_or(2, |n| n.get() * 2);
        let pool = Arc::new(IdlePool {
            idle_timeout: config.idle_timeout,
            max_idle_per_shard: config.max_idle_per_endpoint.div_ceil(shards).max(1),
            shards: (0..shards).map(|_| Mutex::new(Vec::new())).collect(),
        });
        Endpoint {
            url: endpoint.url.clone(),
            authority: endpoint.authority.clone(),
            host: HeaderValue::from_str(endpoint.authority.as_str())
                .unwrap_or_else(|_| HeaderValue::from_static("")),
            outstanding: AtomicUsize::new(0),
            metrics,
            guard,
            connect_timeout: config.connect_timeout,
            returns: pool.clone(),
            pool,
            drain_key: Arc::from(endpoint.url.as_str()),
            draining: AtomicBool::new(false),
        }
    }

    /// The endpoint's authority as a `Host` header value.
    pub fn host_header(&self) -> &HeaderValue {
        &self.host
    }

    /// True while the endpoint is drained: it gets no new requests.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Marks the endpoint draining (no new requests or tunnels) or back in
    /// service; returns the previous state.
    pub fn set_draining(&self, draining: bool) -> bool {
        self.draining.swap(draining, Ordering::Relaxed)
    }

    /// The key its tunnels are registered under for draining (its URL).
    pub fn drain_key(&self) -> Arc<str> {
        self.drain_key.clone()
    }

    /// Closes idle connections that expired or that the upstream closed;
    /// how many. The gateway calls it now and then, so a connection the
    /// upstream closed while idle does not linger half-closed until the
    /// next request finds it.
    pub fn sweep_idle(&self) -> usize {
        self.pool.sweep()
    }

    async fn connect(&self) -> Result<Box<Connection>, SendError> {
        let stream = tokio::time::timeout(
            self.connect_timeout,
            TcpStream::connect(self.authority.as_str()),
        )
        .await
        .map_err(|_| SendError::ConnectTimeout)?
        .map_err(SendError::Connect)?;
        let _ = stream.set_nodelay(true);
        self.metrics.connects.inc();
        self.metrics.open_connections.inc();
        let guard = ConnectionGuard {
            metrics: self.metrics.clone(),
            endpoint: self.drain_key.clone(),
        };
        Ok(Connection::new(stream, Box::new(guard)))
    }

    /// Sends the request (`head`, `extra` header lines, `body`) on a
    /// pooled (or new) connection and returns the response head; the
    /// connection returns to the pool when the body ends.
    pub async fn send(
        &self,
        head: &Parts,
        extra: &ExtraLines<'_>,
        mut body: ProxyBody,
    ) -> Result<Response<ProxyBody>, SendError> {
        // A pooled connection may have been closed by the upstream a moment
        // ago, unseen when it was checked out; a request of which not a
        // byte was written then goes to the next one, up to four times,
        // then on a new connection. A fresh connection gets no second
        // chance.
        let mut stale = 0;
        loop {
            let pooled = if stale < 4 {
                self.pool.checkout()
            } else {
                None
            };
            let (connection, fresh) = match pooled {
                Some(connection) => (connection, false),
                None => (self.connect().await?, true),
            };
            match connection.send(head, extra, body, &self.returns).await {
                Ok(response) => return Ok(response.map(ProxyBody::Upstream)),
                Err(failure) => match failure.unsent {
                    Some(unsent) if !fresh => {
                        body = unsent_body(unsent);
                        stale += 1;
                    }
                    _ => {
                        return Err(SendError::Exchange {
                            sent: failure.sent,
                            error: failure.error,
                        });
                    }
                },
            }
        }
    }
}

/// The body of a request that was not sent, whole again: its first frame,
/// if it was read, goes first.
fn unsent_body(unsent: keel_h1::Unsent<ProxyBody>) -> ProxyBody {
    match unsent.prefix {
        None => unsent.body,
        Some(prefix) => ProxyBody::Prefixed {
            prefix: Some(prefix),
            rest: Box::new(unsent.body),
        },
    }
}

/// An upstream: endpoints, balancing, timeouts.
#[derive(Debug)]
pub struct Upstream {
    /// Name from the config.
    pub name: String,
    /// Endpoints (at least one), shared with their health checks.
    pub endpoints: Vec<Arc<Endpoint>>,
    /// Balancing policy.
    pub balancing: LoadBalancing,
    /// Response-head timeout, over all attempts of a request.
    pub request_timeout: Duration,
    /// Breakers, retries and health checks.
    pub resilience: UpstreamResilience,
    next: AtomicUsize,
}

impl Upstream {
    /// Builds the upstream and its pools from its spec.
    pub fn new(spec: &UpstreamSpec, metrics: &Metrics) -> Self {
        let name = spec.name.as_str();
        let endpoints = spec
            .endpoints
            .iter()
            .zip(1u64..)
            .map(|(endpoint, seed)| {
                let url = endpoint.url.as_str();
                let guard = EndpointGuard::new(name, url, &spec.breaker, seed, metrics);
                Arc::new(Endpoint::new(
                    endpoint,
                    spec,
                    metrics.endpoint(name, url),
                    guard,
                ))
            })
            .collect();
        Upstream {
            name: name.to_owned(),
            endpoints,
            balancing: spec.load_balancing,
            request_timeout: spec.request_timeout,
            resilience: UpstreamResilience::new(
                name,
                &spec.breaker,
                &spec.retry,
                spec.health_check.as_ref(),
                metrics,
            ),
            next: AtomicUsize::new(0),
        }
    }

    /// One watcher per breaker of this upstream (its own, then each
    /// endpoint's), to run as background tasks.
    pub fn breaker_watchers(&self) -> Vec<BreakerWatcher> {
        let name: Arc<str> = Arc::from(self.name.as_str());
        let own =
            self.resilience.breaker.iter().map(|b| {
                BreakerWatcher::new(name.clone(), b.clone(), self.resilience.metrics.clone())
            });
        let endpoints = self.endpoints.iter().filter_map(|e| {
            let breaker = e.guard.breaker.as_ref()?;
            Some(BreakerWatcher::new(
                name.clone(),
                breaker.clone(),
                e.guard.metrics.clone(),
            ))
        });
        own.chain(endpoints).collect()
    }

    /// Picks an endpoint that takes traffic: the balancer's choice when it
    /// is not draining, its breaker admits the request and it passes health
    /// checks, else the next such endpoint in order. Endpoints whose bit is set in `tried` are
    /// used only when no other one is available (retries go elsewhere when
    /// they can). Returns the endpoint's index and its breaker permit, or,
    /// when none is available, the shortest time until a breaker reopens.
    pub fn select_available(&self, tried: u64) -> Result<(usize, Option<Permit<'_>>), Unavailable> {
        let len = self.endpoints.len();
        let start = pick(
            self.balancing,
            len,
            &self.next,
            |i| self.endpoints[i].outstanding.load(Ordering::Relaxed),
            next_random,
        )
        .ok_or(Unavailable::NoEndpoints)?;
        let mut wait: Option<Duration> = None;
        let mut any_healthy = false;
        for pass in 0..2 {
            for offset in 0..len {
                let index = (start + offset) % len;
                let was_tried = index < 64 && tried & (1 << index) != 0;
                if was_tried != (pass == 1) {
                    continue;
                }
                let guard = &self.endpoints[index].guard;
                if !guard.is_healthy() || self.endpoints[index].is_draining() {
                    continue;
                }
                any_healthy = true;
                match guard.allow() {
                    Ok(permit) => return Ok((index, permit)),
                    Err(rejected) => {
                        wait = match (wait, rejected.retry_after) {
                            (Some(a), Some(b)) => Some(a.min(b)),
                            (a, b) => a.or(b),
                        };
                    }
                }
            }
        }
        Err(if any_healthy {
            Unavailable::BreakersOpen(wait)
        } else {
            Unavailable::NoneHealthy
        })
    }
}

/// Why no endpoint can take a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    /// The upstream has no endpoints.
    NoEndpoints,
    /// Every endpoint failed its health checks.
    NoneHealthy,
    /// Every healthy endpoint's breaker is open; the shortest wait, if known.
    BreakersOpen(Option<Duration>),
}

/// The balancing decision, separate from the endpoints so it can be tested
/// with a seeded random source.
fn pick(
    policy: LoadBalancing,
    len: usize,
    next: &AtomicUsize,
    load: impl Fn(usize) -> usize,
    mut random: impl FnMut() -> u64,
) -> Option<usize> {
    match len {
        0 => None,
        1 => Some(0),
        _ => match policy {
            LoadBalancing::RoundRobin => Some(next.fetch_add(1, Ordering::Relaxed) % len),
            LoadBalancing::LeastOutstanding => {
                let a = (random() % len as u64) as usize;
                // A second, different endpoint.
                let b = (a + 1 + (random() % (len as u64 - 1)) as usize) % len;
                Some(if load(b) < load(a) { b } else { a })
            }
        },
    }
}

/// Marks a request as outstanding on an endpoint until dropped.
#[derive(Debug)]
pub struct InFlight<'a> {
    endpoint: &'a Endpoint,
}

impl<'a> InFlight<'a> {
    /// Starts counting a request on `endpoint`.
    pub fn start(endpoint: &'a Endpoint) -> Self {
        endpoint.outstanding.fetch_add(1, Ordering::Relaxed);
        endpoint.metrics.in_flight.inc();
        InFlight { endpoint }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.endpoint.outstanding.fetch_sub(1, Ordering::Relaxed);
        self.endpoint.metrics.in_flight.dec();
    }
}

/// Decrements the open-connection gauge when the connection goes away,
/// including after it became a tunnel; knows its endpoint's drain key.
#[derive(Debug)]
pub struct ConnectionGuard {
    metrics: EndpointMetrics,
    endpoint: Arc<str>,
}

impl ConnectionGuard {
    /// The endpoint's drain key, for a tunnel's registration.
    pub fn endpoint_key(&self) -> Arc<str> {
        self.endpoint.clone()
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.metrics.open_connections.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeded(seed: u64) -> impl FnMut() -> u64 {
        let mut rng = fastrand::Rng::with_seed(seed);
        move || rng.u64(..)
    }

    #[test]
    fn round_robin_cycles() {
        let next = AtomicUsize::new(0);
        let picks: Vec<_> = (0..6)
            .map(|_| pick(LoadBalancing::RoundRobin, 3, &next, |_| 0, seeded(1)))
            .collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2].map(Some));
    }

    #[test]
    fn least_outstanding_avoids_the_busy_endpoint() {
        let next = AtomicUsize::new(0);
        let mut random = seeded(42);
        // Endpoint 1 is busy: with two endpoints both are always compared,
        // so it is never chosen.
        for _ in 0..100 {
            let chosen = pick(
                LoadBalancing::LeastOutstanding,
                2,
                &next,
                |i| if i == 1 { 10 } else { 0 },
                &mut random,
            );
            assert_eq!(chosen, Some(0));
        }
        // With equal load, both get traffic.
        let mut hits = [0; 3];
        for _ in 0..300 {
            let i = pick(
                LoadBalancing::LeastOutstanding,
                3,
                &next,
                |_| 0,
                &mut random,
            )
            .expect("some");
            hits[i] += 1;
        }
        assert!(hits.iter().all(|h| *h > 50), "{hits:?}");
        assert_eq!(
            pick(
                LoadBalancing::LeastOutstanding,
                0,
                &next,
                |_| 0,
                &mut random
            ),
            None
        );
    }
}
