//! The data-plane listener: accepts connections and serves each one with
//! HTTP/1.1 (keep-alive, upgrades) or HTTP/2 with prior knowledge.
//!
//! The protocol is sniffed with `peek` instead of hyper-util's auto builder
//! so the connection stays a plain `TokioIo<TcpStream>`: after an upgrade
//! the tunnel gets the raw socket back and can wait on it without buffers.
//!
//! A listener is a value with a `run` future that ends on shutdown, so the
//! supervision tree can own it as a child and restart it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use keel_drain::{ConnKind, Registration};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::proxy::{Downstream, Gateway};

const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Downstream connection settings.
#[derive(Debug, Clone)]
pub struct ConnectionSettings {
    /// How long a connection may wait for a request head.
    pub idle_timeout: Duration,
    /// Request-head limit, which hyper enforces as a backstop at twice this.
    pub max_header_size: usize,
}

/// Counts open downstream connections (including tunnels until upgrade),
/// and tells when the listening socket has closed.
#[derive(Debug, Clone)]
pub struct ConnectionCount {
    open: Arc<AtomicUsize>,
    /// True once the listener stopped accepting and closed its socket.
    closed: Arc<watch::Sender<bool>>,
}

impl Default for ConnectionCount {
    fn default() -> Self {
        Self {
            open: Arc::default(),
            closed: Arc::new(watch::Sender::new(false)),
        }
    }
}

impl ConnectionCount {
    /// Open connections now.
    pub fn get(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Waits until the listening socket is closed (new connections are
    /// refused), so that a drain closes connections only after that.
    pub async fn listener_closed(&self) {
        let mut rx = self.closed.subscribe();
        let _ = rx.wait_for(|closed| *closed).await;
    }
}

struct Counted(ConnectionCount);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A bound data-plane listener.
pub struct DataPlane {
    /// Taken out by `run`, so the socket closes (new connections are
    /// refused) as soon as it stops accepting, while open connections drain.
    listener: Option<TcpListener>,
    gateway: &'static Gateway,
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    idle_timeout: Duration,
    connections: ConnectionCount,
}

impl DataPlane {
    /// Binds `addr`.
    pub async fn bind(
        addr: SocketAddr,
        gateway: &'static Gateway,
        settings: &ConnectionSettings,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let mut h1 = http1::Builder::new();
        h1.timer(TokioTimer::new())
            .keep_alive(true)
            .header_read_timeout(settings.idle_timeout)
            .max_buf_size((settings.max_header_size * 2).max(8192));
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(settings.max_header_size * 2).unwrap_or(u32::MAX));
        Ok(DataPlane {
            listener: Some(listener),
            gateway,
            http1: h1,
            http2: h2,
            idle_timeout: settings.idle_timeout,
            connections: ConnectionCount::default(),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match &self.listener {
            Some(listener) => listener.local_addr(),
            None => Err(std::io::ErrorKind::NotConnected.into()),
        }
    }

    /// The open-connection counter.
    pub fn connections(&self) -> ConnectionCount {
        self.connections.clone()
    }

    /// Accepts until `shutdown` turns true; then open connections are told
    /// to finish (HTTP/1 closes after the current response, HTTP/2 sends
    /// GOAWAY).
    pub async fn run(mut self, shutdown: watch::Receiver<bool>) {
        let Some(listener) = self.listener.take() else {
            return;
        };
        let this = Arc::new(self);
        let mut stop = shutdown;
        // Connections are told to finish only once the socket is closed, so
        // that a client that sees its connection close and reconnects is
        // refused rather than accepted by a listener on its way out.
        let (connections_stop, connection_shutdown) = watch::channel(false);
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = crate::listener::stopped(&mut stop) => break,
            };
            match accepted {
                Ok((stream, peer)) => {
                    this.connections.open.fetch_add(1, Ordering::Relaxed);
                    let counted = Counted(this.connections.clone());
                    let this = this.clone();
                    let shutdown = connection_shutdown.clone();
                    tokio::spawn(async move {
                        let _counted = counted;
                        this.serve(stream, peer, shutdown).await;
                    });
                }
                Err(error) => {
                    // Out of file descriptors and the like: back off briefly
                    // instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        drop(listener);
        this.connections.closed.send_replace(true);
        let _ = connections_stop.send(true);
    }

    async fn serve(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let _ = stream.set_nodelay(true);
        let is_h2 = match tokio::time::timeout(self.idle_timeout, sniff_h2(&stream)).await {
            Ok(Some(is_h2)) => is_h2,
            _ => return,
        };
        let gateway = self.gateway;
        let downstream = Downstream {
            peer,
            proto: "http",
        };
        let service = service_fn(move |request| async move {
            Ok::<_, Infallible>(gateway.handle(request, downstream).await)
        });
        let io = TokioIo::new(stream);
        // Registered for draining: a gentle close is the same graceful
        // shutdown as the stop signal (`Connection: close` on the next
        // response and idle connections closed; GOAWAY on HTTP/2), a forced
        // one (the deadline) cuts the connection, in-flight or not.
        let kind = if is_h2 {
            ConnKind::Http2
        } else {
            ConnKind::Http1
        };
        let mut drain = crate::drain::registry().register(kind, None);
        if is_h2 {
            let connection = self.http2.serve_connection(io, service);
            tokio::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => log_end(result),
                _ = asked_to_close(&mut shutdown, &mut drain) => {
                    connection.as_mut().graceful_shutdown();
                    tokio::select! {
                        result = connection.as_mut() => log_end(result),
                        () = forced(&mut drain) => tracing::debug!("connection cut at the drain deadline"),
                    }
                }
            }
        } else {
            let connection = self.http1.serve_connection(io, service).with_upgrades();
            tokio::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => log_end(result),
                _ = asked_to_close(&mut shutdown, &mut drain) => {
                    connection.as_mut().graceful_shutdown();
                    tokio::select! {
                        result = connection.as_mut() => log_end(result),
                        () = forced(&mut drain) => tracing::debug!("connection cut at the drain deadline"),
                    }
                }
            }
        }
    }
}

/// Resolves once the listener stops or the drain asks this connection to
/// close.
async fn asked_to_close(shutdown: &mut watch::Receiver<bool>, drain: &mut Registration) {
    tokio::select! {
        () = stopped(shutdown) => {}
        _ = drain.closing() => {}
    }
}

/// Resolves once the drain forces this connection closed.
async fn forced(drain: &mut Registration) {
    while !drain.requested().is_some_and(|r| r.force) {
        drain.closing().await;
    }
}

/// Resolves once the shutdown flag is true (or its sender is gone).
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

fn log_end(result: Result<(), hyper::Error>) {
    if let Err(error) = result {
        tracing::debug!(%error, "connection ended with an error");
    }
}

/// Looks at the first bytes without consuming them: `Some(true)` for the
/// HTTP/2 preface, `Some(false)` for anything else, `None` if the client
/// closed first.
async fn sniff_h2(stream: &TcpStream) -> Option<bool> {
    let mut buf = [0u8; 24];
    loop {
        let n = stream.peek(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        if buf[..n] != H2_PREFACE[..n] {
            return Some(false);
        }
        if n == H2_PREFACE.len() {
            return Some(true);
        }
        // A prefix of the preface: the rest is on its way. peek would return
        // the same bytes at once, so wait a moment (bounded by the caller's
        // idle timeout).
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
