//! The data-plane listener: accepts connections and serves each one with
//! HTTP/1.1 (keep-alive, upgrades) or HTTP/2 with prior knowledge.
//!
//! The protocol is sniffed with `peek` instead of hyper-util's auto builder
//! so the connection stays a plain socket: after an upgrade the tunnel gets
//! the raw `TcpStream` back ([`ServerStream::into_tcp`]) and can wait on it
//! without buffers. The sniffer also waits for the whole first request head
//! (or preface), so a slow client holds no parser state until it has sent
//! one.
//!
//! Every phase of a connection has a deadline, kept by one watchdog per
//! connection ([`Activity`]):
//!
//! - a new connection: its first request head (HTTP/1) or the HTTP/2
//!   preface within `header_read_timeout` of the accept;
//! - HTTP/1 between requests: the first byte of the next request within
//!   `idle_timeout`, then the rest of its head within `header_read_timeout`;
//! - HTTP/2 with no open stream for `idle_timeout`: GOAWAY, and the
//!   connection is cut if the client has not closed it, with no stream
//!   left, `http2_keep_alive_timeout` later (the same grace applies to the
//!   GOAWAY of a drain);
//! - HTTP/2 at any time: a PING after `http2_keep_alive_interval` without a
//!   frame from the client, and the connection closed if it is not answered
//!   within `http2_keep_alive_timeout` (hyper's keep-alive), so a dead peer
//!   is found even while streams are open.
//!
//! A request in progress has no deadline here (the upstream's timeouts bound
//! it).
//!
//! A listener is a value with a `run` future that ends on shutdown, so the
//! supervision tree can own it as a child and restart it.

use std::cell::RefCell;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use keel_drain::{ConnKind, Registration};
use tokio::io::{Interest, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

pub use crate::activity::ConnectionSettings;
use crate::activity::{Activity, Expiry, Phase, ServerStream, Tracked};
use crate::filter::Downstream;
use crate::gate::Gates;
use crate::proxy::Proxy;
use keel_http::headers::ForwardedFor;

const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

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
    gateway: Arc<Proxy>,
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    settings: ConnectionSettings,
    connections: ConnectionCount,
}

impl DataPlane {
    /// Binds `addr`.
    pub async fn bind(
        addr: SocketAddr,
        gateway: Arc<Proxy>,
        settings: &ConnectionSettings,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let mut h1 = http1::Builder::new();
        // The head and idle deadlines are the connection's watchdog's
        // (`Activity`), which tells the wait for a request from the head
        // itself; hyper's own header timer (30 s by default once a timer is
        // set) is turned off.
        h1.keep_alive(true)
            .header_read_timeout(None)
            .max_buf_size((settings.max_header_size * 2).max(8192));
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .keep_alive_interval(settings.http2_keep_alive_interval)
            .keep_alive_timeout(settings.http2_keep_alive_timeout)
            .max_header_list_size(u32::try_from(settings.max_header_size * 2).unwrap_or(u32::MAX));
        Ok(DataPlane {
            listener: Some(listener),
            gateway,
            http1: h1,
            http2: h2,
            settings: settings.clone(),
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
                _ = stopped(&mut stop) => break,
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
        let accepted = Instant::now();
        let _ = stream.set_nodelay(true);
        let settings = &self.settings;
        let head_limit = (settings.max_header_size * 2).max(8192);
        let sniffed = tokio::time::timeout_at(
            accepted + settings.header_read_timeout,
            sniff(&stream, head_limit),
        )
        .await;
        let is_h2 = match sniffed {
            Ok(Some(sniffed)) => sniffed == Sniffed::Http2,
            Ok(None) => return,
            Err(_) => {
                tracing::debug!(%peer, "no request head or HTTP/2 preface in time; closing");
                return;
            }
        };
        let activity = Arc::new(if is_h2 {
            Activity::new(Phase::Idle(Instant::now()), false, settings)
        } else {
            // The first head's deadline counts from the accept.
            Activity::new(Phase::Head(accepted), true, settings)
        });
        let gateway = self.gateway.clone();
        let proto = "http";
        let downstream = Downstream {
            peer,
            proto,
            forwarded_for: ForwardedFor::with_proto(peer.ip(), proto),
        };
        let tracker = activity.clone();
        let service = service_fn(move |request| {
            let in_flight = tracker.request_started();
            let gateway = gateway.clone();
            let downstream = downstream.clone();
            async move {
                let response = gateway.handle(request, &downstream).await;
                Ok::<_, Infallible>(response.map(|body| Tracked {
                    body,
                    in_flight: Some(in_flight),
                }))
            }
        });
        // Registered for draining: a gentle close is the same graceful
        // shutdown as the stop signal (`Connection: close` on the next
        // response and idle connections closed; GOAWAY on HTTP/2), a forced
        // one (the deadline) cuts the connection, in-flight or not.
        let kind = if is_h2 {
            ConnKind::HTTP2
        } else {
            ConnKind::HTTP1
        };
        let mut drain = self.gateway.connections.register(kind, None);
        let mut control = Control {
            activity: &activity,
            shutdown: &mut shutdown,
            drain: &mut drain,
            goaway_grace: is_h2.then_some(settings.http2_keep_alive_timeout),
        };
        if is_h2 {
            let connection = self.http2.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            control
                .drive(connection, |c| c.graceful_shutdown(), peer)
                .await;
        } else {
            let io = TokioIo::new(ServerStream {
                stream,
                activity: activity.clone(),
            });
            let connection = self.http1.serve_connection(io, service).with_upgrades();
            tokio::pin!(connection);
            control
                .drive(connection, |c| c.graceful_shutdown(), peer)
                .await;
        }
    }
}

/// What a connection answers to besides its own I/O: the listener's stop,
/// the drain registry, and its watchdog.
struct Control<'a> {
    activity: &'a Activity,
    shutdown: &'a mut watch::Receiver<bool>,
    drain: &'a mut Registration,
    /// HTTP/2: how long a connection with no stream may take to close
    /// after a GOAWAY before it is cut. `None` for HTTP/1.
    goaway_grace: Option<Duration>,
}

impl Control<'_> {
    /// Serves `connection` until it ends, the drain's deadline cuts it, or
    /// its watchdog fires: HTTP/1 is then closed; HTTP/2 gets GOAWAY first
    /// and is cut only if it is still open, with no stream, after the grace.
    async fn drive<C>(
        &mut self,
        mut connection: Pin<&mut C>,
        graceful_shutdown: impl Fn(Pin<&mut C>),
        peer: SocketAddr,
    ) where
        C: Future<Output = Result<(), hyper::Error>>,
    {
        // The watchers are polled only when one of them was woken, not on
        // every wake-up of the connection's I/O (see `gate`).
        let gates = Gates::new();
        let mut closing = false;
        loop {
            let shutdown = &mut *self.shutdown;
            let drain = &mut *self.drain;
            let activity = self.activity;
            let watched = gates.gate(async move {
                tokio::select! {
                    biased;
                    forced = drain_step(shutdown, drain, closing) => Watched::Drain { forced },
                    expiry = activity.expired() => Watched::Expiry(expiry),
                }
            });
            let event = tokio::select! {
                biased;
                result = connection.as_mut() => {
                    log_end(result);
                    return;
                }
                watched = watched => match watched {
                    Watched::Drain { forced: true } => {
                        tracing::debug!("connection cut at the drain deadline");
                        return;
                    }
                    Watched::Drain { forced: false } => None,
                    Watched::Expiry(expiry) => Some(expiry),
                },
            };
            match (event, self.goaway_grace) {
                // Asked to close (listener stop or drain).
                (None, grace) => {
                    closing = true;
                    graceful_shutdown(connection.as_mut());
                    if let Some(grace) = grace {
                        self.activity.going_away(grace);
                    }
                }
                (Some(Expiry::Head), _) => {
                    tracing::debug!(%peer, "request head not read in time; closing");
                    return;
                }
                (Some(Expiry::Idle), None) => {
                    tracing::debug!(%peer, "idle connection closed");
                    return;
                }
                (Some(Expiry::Idle), Some(_)) if self.activity.is_going_away() => {
                    tracing::debug!(%peer, "no answer to GOAWAY; connection cut");
                    return;
                }
                (Some(Expiry::Idle), Some(grace)) => {
                    tracing::debug!(%peer, "idle HTTP/2 connection: GOAWAY");
                    closing = true;
                    graceful_shutdown(connection.as_mut());
                    self.activity.going_away(grace);
                }
            }
        }
    }
}

/// Until the connection is closing: resolves (false) once the listener
/// stops or the drain asks it to close. Then: resolves (true) once the
/// drain forces it closed.
/// What woke a connection's watchers.
enum Watched {
    /// The drain: asked to close, or (`forced`) cut now.
    Drain { forced: bool },
    /// The watchdog.
    Expiry(Expiry),
}

async fn drain_step(
    shutdown: &mut watch::Receiver<bool>,
    drain: &mut Registration,
    closing: bool,
) -> bool {
    if closing {
        forced(drain).await;
        true
    } else {
        asked_to_close(shutdown, drain).await;
        false
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
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

fn log_end(result: Result<(), hyper::Error>) {
    if let Err(error) = result {
        tracing::debug!(%error, "connection ended with an error");
    }
}

/// The protocol of a new connection, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sniffed {
    /// HTTP/1.x: a complete first request head (or bytes the parser will
    /// reject anyway) is waiting in the socket.
    Http1,
    /// The whole HTTP/2 preface is waiting in the socket.
    Http2,
}

thread_local! {
    // Where the sniffer peeks, one per worker thread, borrowed only for
    // the non-blocking peek and the scan that follows it.
    static PEEK: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Looks at what a new connection sent without consuming it, until the
/// protocol is known and the first request head (HTTP/1) or the preface
/// (HTTP/2) is complete; `None` if the client closed or half-closed first.
/// Bounded by the caller's deadline. `head_limit`: the most bytes looked
/// at; a head that fills them goes to the parser (which answers 431).
///
/// A slow client costs one small peek per segment here, before any HTTP
/// connection state exists: the parser's buffers and state are made only
/// for a complete head. It does not spin: `peek` leaves the socket
/// readable, so a peek that shows nothing new clears the readiness (inside
/// `try_io`, which keeps any newer event) and the loop waits for the next
/// segment.
async fn sniff(stream: &TcpStream, head_limit: usize) -> Option<Sniffed> {
    let mut seen = 0;
    loop {
        let ready = stream.ready(Interest::READABLE).await.ok()?;
        let peeked = stream.try_io(Interest::READABLE, || {
            PEEK.with_borrow_mut(|buf| {
                if buf.len() < head_limit {
                    buf.resize(head_limit, 0);
                }
                let buf = &mut buf[..head_limit];
                let mut read_buf = ReadBuf::new(buf);
                let mut cx = Context::from_waker(Waker::noop());
                match stream.poll_peek(&mut cx, &mut read_buf) {
                    Poll::Ready(Ok(0)) => Ok((0, None)),
                    Poll::Ready(Ok(n)) if n > seen => {
                        Ok((n, classify(read_buf.filled(), n == head_limit)))
                    }
                    Poll::Ready(Ok(_)) | Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
                    Poll::Ready(Err(error)) => Err(error),
                }
            })
        });
        match peeked {
            Ok((0, _)) => return None,
            Ok((_, Some(sniffed))) => return Some(sniffed),
            Ok((n, None)) => seen = n,
            // Nothing new: wait for the next segment, unless the client has
            // half-closed (its readiness is never cleared, and the head or
            // preface can no longer be completed).
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                if ready.is_read_closed() {
                    return None;
                }
            }
            Err(_) => return None,
        }
    }
}

/// What the first bytes of a connection say; `None`: wait for more.
fn classify(bytes: &[u8], full: bool) -> Option<Sniffed> {
    let n = bytes.len().min(H2_PREFACE.len());
    if bytes[..n] == H2_PREFACE[..n] {
        return (n == H2_PREFACE.len()).then_some(Sniffed::Http2);
    }
    let complete = bytes
        .windows(2)
        .enumerate()
        .any(|(i, w)| w == b"\n\n" || (w == b"\n\r" && bytes.get(i + 2) == Some(&b'\n')));
    // A control character is never part of a valid head: the parser will
    // reject it (400) without waiting for more.
    let invalid = bytes
        .iter()
        .any(|&b| (b < 0x20 && !matches!(b, b'\r' | b'\n' | b'\t')) || b == 0x7f);
    (full || complete || invalid).then_some(Sniffed::Http1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_waits_for_a_whole_head_or_preface() {
        let head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        for end in 1..head.len() {
            assert_eq!(classify(&head[..end], false), None, "{end}");
        }
        assert_eq!(classify(head, false), Some(Sniffed::Http1));
        assert_eq!(
            classify(b"GET / HTTP/1.1\nHost: a\n\n", false),
            Some(Sniffed::Http1)
        );
        assert_eq!(
            classify(b"GET / HTTP/1.1\r\nHost: a\r\n", true),
            Some(Sniffed::Http1)
        );
        // TLS or other binary: to the parser at once, for its 400.
        assert_eq!(
            classify(b"\x16\x03\x01\x02\x00", false),
            Some(Sniffed::Http1)
        );
        for end in 1..H2_PREFACE.len() {
            assert_eq!(classify(&H2_PREFACE[..end], false), None, "{end}");
        }
        assert_eq!(classify(H2_PREFACE, false), Some(Sniffed::Http2));
        let mut more = H2_PREFACE.to_vec();
        more.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        assert_eq!(classify(&more, false), Some(Sniffed::Http2));
        // PRI is also an HTTP/1 method name: only the whole preface is HTTP/2.
        assert_eq!(
            classify(b"PRI /x HTTP/1.1\r\n\r\n", false),
            Some(Sniffed::Http1)
        );
    }
}
