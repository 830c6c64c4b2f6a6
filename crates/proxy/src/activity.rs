//! One downstream connection's watchdog ([`Activity`]): which phase it is
//! in (waiting for a head, idle, busy) and the deadline of that phase, and
//! the socket wrapper ([`ServerStream`]) that reports reads to it. The
//! listener drives connections with it; a tunnel takes the raw socket back
//! out of it.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use keel_http::body::{BoxError, ProxyBody};

/// Downstream connection settings (`[server]`).
#[derive(Debug, Clone)]
pub struct ConnectionSettings {
    /// How long a connection may sit with no request: HTTP/1 until the
    /// first byte of the next request, HTTP/2 with no open stream.
    pub idle_timeout: Duration,
    /// How long a request head may take from its first byte (from the
    /// accept on a new connection, which also covers the protocol sniff
    /// and the HTTP/2 preface).
    pub header_read_timeout: Duration,
    /// HTTP/2: a PING after this long without a frame from the client.
    pub http2_keep_alive_interval: Duration,
    /// HTTP/2: how long a PING may go unanswered; also the grace after a
    /// GOAWAY for a connection with no stream left.
    pub http2_keep_alive_timeout: Duration,
    /// Request-head limit, which hyper enforces as a backstop at twice this.
    pub max_header_size: usize,
}

impl Default for ConnectionSettings {
    /// The `[server]` defaults.
    fn default() -> Self {
        ConnectionSettings {
            idle_timeout: Duration::from_secs(60),
            header_read_timeout: Duration::from_secs(10),
            http2_keep_alive_interval: Duration::from_secs(30),
            http2_keep_alive_timeout: Duration::from_secs(15),
            max_header_size: 16 * 1024,
        }
    }
}

/// Why the watchdog fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expiry {
    /// A request head (or the preface) took too long.
    Head,
    /// No request for the idle limit.
    Idle,
}

/// Where a connection is between requests.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Phase {
    /// Reading a request head (HTTP/1) or the preface, since then.
    Head(Instant),
    /// No request in progress since then.
    Idle(Instant),
    /// At least one request in progress: no deadline.
    Busy,
}

#[derive(Debug)]
pub(crate) struct ActivityState {
    phase: Phase,
    in_flight: usize,
    /// The idle limit: `idle_timeout`, or the GOAWAY grace once going away.
    idle_limit: Duration,
    going_away: bool,
}

/// One connection's watchdog: which phase it is in and since when, from
/// the requests (started in the service, ended when the response body is
/// done) and, on HTTP/1, from the socket's reads (the first byte after an
/// idle spell starts a head).
#[derive(Debug)]
pub(crate) struct Activity {
    state: Mutex<ActivityState>,
    /// HTTP/1 only: true while idle, so that a read starts a head; a
    /// read otherwise costs one atomic load.
    awaiting_head: AtomicBool,
    /// HTTP/1: reads start heads.
    tracks_heads: bool,
    header_read_timeout: Duration,
}

impl Activity {
    pub(crate) fn new(phase: Phase, tracks_heads: bool, settings: &ConnectionSettings) -> Activity {
        Activity {
            state: Mutex::new(ActivityState {
                phase,
                in_flight: 0,
                idle_limit: settings.idle_timeout,
                going_away: false,
            }),
            awaiting_head: AtomicBool::new(false),
            tracks_heads,
            header_read_timeout: settings.header_read_timeout,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ActivityState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A request head has been read: no deadline until its response is done.
    pub(crate) fn request_started(self: &Arc<Self>) -> InFlight {
        let mut state = self.lock();
        state.in_flight += 1;
        state.phase = Phase::Busy;
        self.awaiting_head.store(false, Ordering::Relaxed);
        drop(state);
        InFlight(self.clone())
    }

    pub(crate) fn request_done(&self) {
        let mut state = self.lock();
        state.in_flight = state.in_flight.saturating_sub(1);
        if state.in_flight == 0 {
            state.phase = Phase::Idle(Instant::now());
            if self.tracks_heads {
                self.awaiting_head.store(true, Ordering::Relaxed);
            }
        }
    }

    /// HTTP/1: bytes arrived; after an idle spell, they start a head.
    pub(crate) fn bytes_read(&self) {
        if self.awaiting_head.load(Ordering::Relaxed)
            && self.awaiting_head.swap(false, Ordering::Relaxed)
        {
            let mut state = self.lock();
            if let Phase::Idle(_) = state.phase {
                state.phase = Phase::Head(Instant::now());
            }
        }
    }

    /// A GOAWAY has been sent: with no stream, the connection has `grace`
    /// to close before it is cut.
    pub(crate) fn going_away(&self, grace: Duration) {
        let mut state = self.lock();
        if state.going_away {
            return;
        }
        state.going_away = true;
        state.idle_limit = grace;
        if let Phase::Idle(_) = state.phase {
            state.phase = Phase::Idle(Instant::now());
        }
    }

    pub(crate) fn is_going_away(&self) -> bool {
        self.lock().going_away
    }

    /// The current phase's deadline, and the shortest limit a phase can
    /// have (see `expired`).
    pub(crate) fn deadline(&self) -> (Option<(Instant, Expiry)>, Duration) {
        let state = self.lock();
        let deadline = match state.phase {
            Phase::Head(since) => Some((since + self.header_read_timeout, Expiry::Head)),
            Phase::Idle(since) => Some((since + state.idle_limit, Expiry::Idle)),
            Phase::Busy => None,
        };
        let shortest = if self.tracks_heads {
            state.idle_limit.min(self.header_read_timeout)
        } else {
            state.idle_limit
        };
        (deadline, shortest)
    }

    /// Resolves when the current phase has outlived its deadline.
    ///
    /// Phase changes wake nobody (they happen on every request, and a wake
    /// would cost a poll of the whole connection): the watchdog sleeps
    /// until the current deadline, or for the shortest limit a phase can
    /// have if that is sooner, and looks again. A phase that begins after
    /// the watchdog last looked ends no sooner than that shortest limit
    /// after its start, so the watchdog has looked again by then and sleeps
    /// until its exact deadline.
    pub(crate) async fn expired(&self) -> Expiry {
        loop {
            let now = Instant::now();
            let (deadline, shortest) = self.deadline();
            let look_again = now + shortest;
            let wake = match deadline {
                Some((at, expiry)) if at <= now => return expiry,
                Some((at, _)) => at.min(look_again),
                None => look_again,
            };
            tokio::time::sleep_until(wake).await;
        }
    }
}

/// A request in progress; dropped when its response body is done (or
/// dropped).
pub(crate) struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.request_done();
    }
}

/// The response body, which ends its request's [`InFlight`] when done.
pub(crate) struct Tracked {
    pub(crate) body: ProxyBody,
    pub(crate) in_flight: Option<InFlight>,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.in_flight = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The downstream socket of an HTTP/1 connection: the `TcpStream`, whose
/// reads tell the connection's watchdog when a request head starts.
pub struct ServerStream {
    pub(crate) stream: TcpStream,
    pub(crate) activity: Arc<Activity>,
}

/// What an upgraded downstream connection is (`Upgraded::downcast`).
pub type ServerIo = TokioIo<ServerStream>;

impl ServerStream {
    /// The socket, for a tunnel after an upgrade.
    pub fn into_tcp(self) -> TcpStream {
        self.stream
    }
}

impl AsyncRead for ServerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.bytes_read();
        }
        polled
    }
}

impl AsyncWrite for ServerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
