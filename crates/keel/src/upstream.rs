//! Upstreams: endpoints, their connection pools, and load balancing.
//!
//! Every endpoint owns its own pool (a hyper-util client), so pool state is
//! per endpoint rather than global. Balancing reads per-endpoint atomics:
//! round robin bumps one counter per upstream; least-outstanding compares
//! the in-flight counts of two endpoints picked at random (power of two
//! choices), which needs no shared state beyond those counters.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use http::uri::{Authority, Scheme};
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::body::ProxyBody;
use crate::config::{LoadBalancing, UpstreamConfig, endpoint_authority};
use crate::headers::next_random;
use crate::metrics::{EndpointMetrics, Metrics};

/// One endpoint of an upstream.
#[derive(Debug)]
pub struct Endpoint {
    /// The URL as configured.
    pub url: String,
    /// `host:port` requests are sent to.
    pub authority: Authority,
    /// Its connection pool.
    pub client: Client<CountingConnector, ProxyBody>,
    /// Requests sent and not yet answered.
    pub outstanding: AtomicUsize,
    /// Its metrics.
    pub metrics: EndpointMetrics,
}

/// An upstream: endpoints, balancing, timeouts.
#[derive(Debug)]
pub struct Upstream {
    /// Name from the config.
    pub name: String,
    /// Endpoints (at least one).
    pub endpoints: Vec<Endpoint>,
    /// Balancing policy.
    pub balancing: LoadBalancing,
    /// Response-head timeout.
    pub request_timeout: Duration,
    next: AtomicUsize,
}

impl Upstream {
    /// Builds the upstream and its pools from config.
    pub fn from_config(name: &str, config: &UpstreamConfig, metrics: &Metrics) -> Self {
        let endpoints = config
            .endpoints
            .get_ref()
            .iter()
            .filter_map(|url| {
                let url = url.get_ref();
                let authority = endpoint_authority(url).ok()?;
                let endpoint_metrics = metrics.endpoint(name, url);
                let mut http = HttpConnector::new();
                http.set_nodelay(true);
                http.set_connect_timeout(Some(config.connect_timeout.0));
                let connector = CountingConnector {
                    http,
                    metrics: endpoint_metrics.clone(),
                };
                let client = Client::builder(TokioExecutor::new())
                    .pool_timer(TokioTimer::new())
                    .pool_idle_timeout(config.idle_timeout.0)
                    .pool_max_idle_per_host(config.max_idle_per_endpoint)
                    .set_host(false)
                    .build(connector);
                Some(Endpoint {
                    url: url.clone(),
                    authority,
                    client,
                    outstanding: AtomicUsize::new(0),
                    metrics: endpoint_metrics,
                })
            })
            .collect();
        Upstream {
            name: name.to_owned(),
            endpoints,
            balancing: config.load_balancing,
            request_timeout: config.request_timeout.0,
            next: AtomicUsize::new(0),
        }
    }

    /// Picks the endpoint for the next request.
    pub fn select(&self) -> Option<&Endpoint> {
        let index = pick(
            self.balancing,
            self.endpoints.len(),
            &self.next,
            |i| self.endpoints[i].outstanding.load(Ordering::Relaxed),
            next_random,
        )?;
        self.endpoints.get(index)
    }
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

/// The scheme every upstream uses today (TLS upstreams are a later step).
pub fn scheme() -> Scheme {
    Scheme::HTTP
}

/// An HTTP connector that keeps the open-connection gauge right.
#[derive(Debug, Clone)]
pub struct CountingConnector {
    http: HttpConnector,
    metrics: EndpointMetrics,
}

impl tower_service::Service<Uri> for CountingConnector {
    type Response = CountedIo;
    type Error = <HttpConnector as tower_service::Service<Uri>>::Error;
    type Future = Pin<Box<dyn Future<Output = Result<CountedIo, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.http.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.http.call(uri);
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let io = connecting.await?;
            metrics.connects.inc();
            metrics.open_connections.inc();
            Ok(CountedIo {
                io,
                guard: ConnectionGuard { metrics },
            })
        })
    }
}

/// Decrements the open-connection gauge when the connection goes away,
/// including after it became a tunnel.
#[derive(Debug)]
pub struct ConnectionGuard {
    metrics: EndpointMetrics,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.metrics.open_connections.dec();
    }
}

/// An upstream connection with its gauge guard.
#[derive(Debug)]
pub struct CountedIo {
    io: TokioIo<TcpStream>,
    guard: ConnectionGuard,
}

impl CountedIo {
    /// The raw socket and the guard, for tunnels.
    pub fn into_parts(self) -> (TcpStream, ConnectionGuard) {
        (self.io.into_inner(), self.guard)
    }
}

impl Connection for CountedIo {
    fn connected(&self) -> Connected {
        self.io.connected()
    }
}

impl Read for CountedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl Write for CountedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeded(seed: u64) -> impl FnMut() -> u64 {
        let mut state = seed;
        move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        }
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
