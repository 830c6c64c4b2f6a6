//! Tunnels for upgraded connections (WebSocket and other `Upgrade`s).
//!
//! The gateway is meant to hold very many idle tunnels, so an idle tunnel
//! holds no copy buffer: each direction waits for readability with no
//! buffer alive, then reads into a per-thread scratch buffer and writes
//! straight out without awaiting. Only when the destination cannot take
//! everything at once is the remainder copied to the heap, and freed as
//! soon as it is written.
//!
//! Every tunnel is registered in the drain registry (`crate::drain`) with
//! its upstream endpoint. Asked gently to close, a WebSocket tunnel stops
//! forwarding the upstream's bytes at the next frame boundary (it tracks
//! frame headers, a few bytes of state per direction), sends the client a
//! close frame with code 1012 and the reconnect hint, and ends once the
//! client's close frame has gone through; asked by force (the deadline),
//! any tunnel is cut. Other upgrades have no close frame: they are cut.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker, ready};

use bytes::Bytes;
use http::HeaderMap;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use keel_drain::{CloseRequest, ConnKind, Registration};
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;

use crate::upstream::CountedIo;

const SCRATCH_SIZE: usize = 16 * 1024;

thread_local! {
    // One scratch buffer per worker thread, borrowed only between a
    // readiness wake-up and the end of the non-blocking write.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH_SIZE].into_boxed_slice());
}

/// True when a 101 response switched to WebSocket.
pub fn is_websocket(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("websocket"))
}

/// Waits for both sides to finish upgrading, then copies bytes both ways
/// until both sides have closed.
pub async fn splice(downstream: OnUpgrade, upstream: OnUpgrade, websocket: bool) {
    let (down, up) = match tokio::try_join!(downstream, upstream) {
        Ok(both) => both,
        Err(error) => {
            tracing::debug!(%error, "upgrade failed");
            return;
        }
    };
    let down = match down.downcast::<crate::listener::ServerIo>() {
        Ok(parts) => (parts.io.into_inner().into_tcp(), parts.read_buf),
        Err(other) => {
            tracing::debug!("downstream upgrade is not a plain TCP stream; buffered copy");
            return fallback(other, up).await;
        }
    };
    let (up_stream, up_pending, guard, endpoint) = match up.downcast::<CountedIo>() {
        Ok(parts) => {
            let endpoint = parts.io.endpoint_key();
            let (stream, guard) = parts.io.into_parts();
            (stream, parts.read_buf, guard, endpoint)
        }
        Err(_) => {
            tracing::warn!("upstream upgrade is not a TCP stream; closing the tunnel");
            return;
        }
    };
    let up_stream = forget_wakers(up_stream);
    let down = (forget_wakers(down.0), down.1);
    // A task of its own, so the long-lived future holds only the tunnel's
    // state, not the (larger) upgrade futures above.
    let registration = crate::drain::registry().register(ConnKind::Tunnel, Some(endpoint));
    if let Some(close) = crate::drain::late_close(registration.id()) {
        // Upgraded while the gateway drains: leave with the others.
        crate::drain::registry().close(registration.id(), close);
    }
    tokio::spawn(async move {
        let _guard = guard;
        let result = run(
            down.0,
            down.1,
            up_stream,
            up_pending,
            Some(registration),
            websocket,
        )
        .await;
        if let Err(error) = result {
            tracing::debug!(%error, "tunnel closed with an error");
        }
    });
}

/// Replaces the wakers the HTTP connection tasks left in the socket's
/// read and write slots with no-op ones. The tunnel takes over a write
/// slot only when a write could not finish at once, so without this the
/// finished connection task (a few KiB) would stay allocated, through its
/// waker, for as long as the tunnel is idle.
fn forget_wakers(stream: TcpStream) -> TcpStream {
    let mut cx = Context::from_waker(Waker::noop());
    let _ = stream.poll_read_ready(&mut cx);
    let _ = stream.poll_write_ready(&mut cx);
    stream
}

/// Copies both ways between two sockets; `*_pending` are bytes already read
/// from that side by the HTTP parser.
#[cfg(test)]
pub async fn tunnel(
    a: TcpStream,
    a_pending: Bytes,
    b: TcpStream,
    b_pending: Bytes,
) -> io::Result<()> {
    run(a, a_pending, b, b_pending, None, false).await
}

/// How many read-and-write rounds one direction may do in one poll before
/// it yields, so a busy tunnel cannot starve the other tasks of its thread.
const ROUNDS_PER_POLL: usize = 32;

/// Copies both ways between `a` (the client) and `b` (the upstream) until
/// both sides have closed, the drain closes the tunnel, or it is cut.
fn run(
    a: TcpStream,
    a_pending: Bytes,
    b: TcpStream,
    b_pending: Bytes,
    registration: Option<Registration>,
    websocket: bool,
) -> Tunnel {
    let frames = || websocket.then(Frames::default);
    Tunnel {
        client: a,
        upstream: b,
        to_upstream: Half::new(&a_pending, frames()),
        to_client: Half::new(&b_pending, frames()),
        registration,
        websocket,
        close: None,
        close_sent: false,
    }
}

/// A tunnel as one hand-written future: the two sockets, a few bytes of
/// state per direction, and the drain registration. Both directions wait
/// through the sockets' own readiness slots (no intrusive waiter lists, no
/// per-direction futures), which keeps an idle tunnel's task to a few
/// hundred bytes.
struct Tunnel {
    client: TcpStream,
    upstream: TcpStream,
    to_upstream: Half,
    to_client: Half,
    registration: Option<Registration>,
    websocket: bool,
    /// The gentle close asked by the drain, once asked.
    close: Option<CloseRequest>,
    /// Set once the close frame went out to the client.
    close_sent: bool,
}

/// One direction of a tunnel.
struct Half {
    /// Bytes the destination has not taken yet: the HTTP parser's leftovers
    /// at first, then only what a write could not take at once. Empty (no
    /// allocation) while idle.
    out: Vec<u8>,
    written: usize,
    frames: Option<Frames>,
    /// Towards the client: forward up to the next frame boundary, then
    /// send the close frame.
    stopping: bool,
    /// Towards the client: `out` holds the close frame.
    closing: bool,
    done: bool,
}

impl Half {
    fn new(pending: &[u8], mut frames: Option<Frames>) -> Self {
        if let Some(frames) = frames.as_mut() {
            frames.feed(pending, false);
        }
        Self {
            out: pending.to_vec(),
            written: 0,
            frames,
            stopping: false,
            closing: false,
            done: false,
        }
    }

    fn at_boundary(&self) -> bool {
        self.frames.as_ref().is_none_or(Frames::at_boundary)
    }

    fn saw_close(&self) -> bool {
        self.frames.as_ref().is_some_and(|f| f.saw_close)
    }
}

impl Future for Tunnel {
    type Output = io::Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(registration) = this.registration.as_mut() {
            while let Poll::Ready(request) = registration.poll_closing(cx) {
                if request.force || !this.websocket {
                    // The deadline, or an upgrade with no close frame: cut.
                    tracing::debug!("tunnel cut by the drain");
                    return Poll::Ready(Ok(()));
                }
                if this.close.is_none() {
                    this.close = Some(request);
                    this.to_client.stopping = true;
                }
            }
        }
        // Towards the client first: its close frame going out is what the
        // other direction waits for.
        let to_client = poll_half(
            &mut this.to_client,
            &this.upstream,
            &mut this.client,
            Direction::ToClient,
            this.close.as_ref(),
            &mut this.close_sent,
            cx,
        )?;
        let to_upstream = poll_half(
            &mut this.to_upstream,
            &this.client,
            &mut this.upstream,
            Direction::ToUpstream,
            None,
            &mut this.close_sent,
            cx,
        )?;
        if to_client.is_ready() && to_upstream.is_ready() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }
}

/// Moves one direction along as far as it goes without waiting; `Ready`
/// once it is finished.
///
/// Towards the client, a gentle close stops forwarding at the next frame
/// boundary and sends the close frame instead, then half-closes. Towards
/// the upstream, the copy ends once the client's close frame has gone
/// through after ours. End of stream half-closes the destination: the
/// other direction may still be talking.
fn poll_half(
    half: &mut Half,
    src: &TcpStream,
    dst: &mut TcpStream,
    direction: Direction,
    close: Option<&CloseRequest>,
    close_sent: &mut bool,
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>> {
    for _ in 0..ROUNDS_PER_POLL {
        if half.done {
            return Poll::Ready(Ok(()));
        }
        while half.written < half.out.len() {
            ready!(dst.poll_write_ready(cx))?;
            match dst.try_write(&half.out[half.written..]) {
                Ok(n) => half.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        if !half.out.is_empty() {
            // Written out: free it, so an idle tunnel holds no buffer.
            half.out = Vec::new();
            half.written = 0;
        }
        if half.closing {
            *close_sent = true;
            half.done = true;
            half_close(dst, cx);
            continue;
        }
        if direction == Direction::ToClient && half.stopping && half.at_boundary() {
            let reason = close.map(CloseRequest::close_reason).unwrap_or_default();
            half.out = close_frame(CloseRequest::WEBSOCKET_CODE, &reason);
            half.closing = true;
            continue;
        }
        if direction == Direction::ToUpstream && *close_sent && half.saw_close() {
            // Both close frames exchanged: the client waits for us to
            // close the connection.
            half.done = true;
            continue;
        }
        ready!(src.poll_read_ready(cx))?;
        let stopping = half.stopping;
        let frames = &mut half.frames;
        let step = SCRATCH.with_borrow_mut(|scratch| -> io::Result<Step> {
            let n = match src.try_read(scratch) {
                Ok(0) => return Ok(Step::Eof),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Step::Done),
                Err(e) => return Err(e),
            };
            // While stopping, what follows the frame boundary is dropped:
            // the client is told to go instead.
            let n = match frames.as_mut() {
                Some(frames) => frames.feed(&scratch[..n], stopping),
                None => n,
            };
            let mut written = 0;
            while written < n {
                match dst.try_write(&scratch[written..n]) {
                    Ok(m) => written += m,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
            Ok(if written == n {
                Step::Done
            } else {
                Step::Rest(scratch[written..n].to_vec())
            })
        });
        match step? {
            Step::Done => {}
            Step::Rest(rest) => half.out = rest,
            Step::Eof => {
                half.done = true;
                half_close(dst, cx);
            }
        }
    }
    // Still busy after a full round: let the thread's other tasks run.
    cx.waker().wake_by_ref();
    Poll::Pending
}

/// Shuts the write side of `dst` (`FIN`); a peer already gone is fine.
fn half_close(dst: &mut TcpStream, cx: &mut Context<'_>) {
    // A TCP shutdown completes at once: it never returns `Pending`.
    let _ = Pin::new(dst).poll_shutdown(cx);
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    ToUpstream,
    ToClient,
}

enum Step {
    Done,
    Eof,
    Rest(Vec<u8>),
}

/// An unmasked (server to client) close frame; the reason is cut to fit
/// the 125-byte control-frame payload.
fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    let mut reason = &reason.as_bytes()[..reason.len().min(123)];
    while std::str::from_utf8(reason).is_err() {
        reason = &reason[..reason.len() - 1];
    }
    let mut frame = Vec::with_capacity(4 + reason.len());
    frame.push(0x88);
    frame.push(2 + reason.len() as u8);
    frame.extend_from_slice(&code.to_be_bytes());
    frame.extend_from_slice(reason);
    frame
}

/// Where a WebSocket byte stream is relative to its frames: enough to stop
/// at a boundary and to notice a close frame, without buffering payloads.
#[derive(Debug, Default)]
struct Frames {
    header: [u8; 14],
    header_len: u8,
    payload_left: u64,
    in_close: bool,
    saw_close: bool,
}

impl Frames {
    fn at_boundary(&self) -> bool {
        self.header_len == 0 && self.payload_left == 0
    }

    /// Follows `data` and returns how many bytes of it to forward: all of
    /// it, or with `stop`, up to the first frame boundary.
    fn feed(&mut self, data: &[u8], stop: bool) -> usize {
        let mut i = 0;
        loop {
            if (stop && self.at_boundary()) || i == data.len() {
                return i;
            }
            if self.payload_left > 0 {
                let n =
                    (data.len() - i).min(usize::try_from(self.payload_left).unwrap_or(usize::MAX));
                self.payload_left -= n as u64;
                i += n;
                if self.payload_left == 0 && self.in_close {
                    self.saw_close = true;
                }
                continue;
            }
            self.header[usize::from(self.header_len)] = data[i];
            self.header_len += 1;
            i += 1;
            let len = usize::from(self.header_len);
            if let Some((total, payload, opcode)) = frame_header(&self.header[..len])
                && total == len
            {
                self.header_len = 0;
                self.payload_left = payload;
                self.in_close = opcode == 0x8;
                if payload == 0 && self.in_close {
                    self.saw_close = true;
                }
            }
        }
    }
}

/// `(header length, payload length, opcode)` once `h` holds a whole frame
/// header (RFC 6455 section 5.2).
fn frame_header(h: &[u8]) -> Option<(usize, u64, u8)> {
    let (&b0, &b1) = (h.first()?, h.get(1)?);
    let len7 = b1 & 0x7f;
    let ext = match len7 {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let total = 2 + ext + if b1 & 0x80 != 0 { 4 } else { 0 };
    if h.len() < total {
        return None;
    }
    let payload = match ext {
        0 => u64::from(len7),
        2 => u64::from(u16::from_be_bytes([h[2], h[3]])),
        _ => u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]]),
    };
    Some((total, payload, b0 & 0x0f))
}

/// For upgraded connections that are not plain TCP (none today): a
/// buffered copy, correct but without the idle-memory property.
async fn fallback(down: Upgraded, up: Upgraded) {
    let mut down = TokioIo::new(down);
    let mut up = TokioIo::new(up);
    if let Err(error) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
        tracing::debug!(%error, "tunnel closed with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn copies_both_ways_with_pending_bytes_and_half_close() {
        let (mut client, proxy_a) = super::tests_pair().await;
        let (proxy_b, mut server) = super::tests_pair().await;
        let task = tokio::spawn(tunnel(
            proxy_a,
            Bytes::from_static(b"early-"),
            proxy_b,
            Bytes::from_static(b"hello-"),
        ));
        let big = vec![7u8; 1 << 20];
        client.write_all(&big).await.expect("write");
        client.shutdown().await.expect("shutdown");
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.expect("read");
        assert_eq!(&got[..6], b"early-");
        assert_eq!(got.len(), 6 + big.len());
        server.write_all(b"world").await.expect("write");
        drop(server);
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.expect("read");
        assert_eq!(back, b"hello-world");
        task.await.expect("join").expect("tunnel");
    }

    fn frame(opcode: u8, payload: &[u8], mask: bool) -> Vec<u8> {
        let mut f = vec![0x80 | opcode];
        let m = if mask { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => f.push(m | n as u8),
            n if n <= 0xffff => {
                f.push(m | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(m | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if mask {
            f.extend_from_slice(&[1, 2, 3, 4]);
        }
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn frames_stop_at_boundaries_across_chunks() {
        let mut stream = frame(0x2, &[9; 300], false);
        let first = stream.len();
        stream.extend(frame(0x1, &[7; 70_000], true));
        stream.extend(frame(0x8, &[3, 0xe8], true));
        // Fed a byte at a time without stopping: every frame is followed,
        // and the close frame is noticed.
        let mut f = Frames::default();
        for b in &stream {
            assert_eq!(f.feed(std::slice::from_ref(b), false), 1);
        }
        assert!(f.saw_close && f.at_boundary());
        // Stopping in the middle of the first frame forwards its rest only.
        let mut f = Frames::default();
        assert_eq!(f.feed(&stream[..10], false), 10);
        assert_eq!(f.feed(&stream[10..], true), first - 10);
        assert!(f.at_boundary() && !f.saw_close);
        // At a boundary, stopping forwards nothing.
        assert_eq!(f.feed(&stream[first..], true), 0);
    }

    #[test]
    fn close_frame_carries_code_and_reason() {
        let f = close_frame(1012, "keel drain; reconnect_after_ms=5");
        assert_eq!(f[0], 0x88);
        assert_eq!(usize::from(f[1]), f.len() - 2);
        assert_eq!(u16::from_be_bytes([f[2], f[3]]), 1012);
        assert_eq!(&f[4..], b"keel drain; reconnect_after_ms=5");
        assert_eq!(close_frame(1012, &"é".repeat(100)).len(), 4 + 122);
    }
}
#[cfg(test)]
mod size_probe {
    #[tokio::test]
    async fn an_idle_tunnel_future_stays_small() {
        let (a, b) = super::tests_pair().await;
        let (c, d) = super::tests_pair().await;
        let reg = crate::drain::registry().register(keel_drain::ConnKind::Tunnel, None);
        let f = super::run(
            a,
            bytes::Bytes::new(),
            c,
            bytes::Bytes::new(),
            Some(reg),
            true,
        );
        // The idle-memory budget: the tunnel future was 1.6 KiB as an
        // async block with drain support, and is a few hundred bytes as a
        // hand-written one; a regression past 512 B should be a decision.
        assert!(
            std::mem::size_of_val(&f) <= 512,
            "{}",
            std::mem::size_of_val(&f)
        );
        drop((b, d));
    }
}
#[cfg(test)]
async fn tests_pair() -> (TcpStream, TcpStream) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
    (client.expect("connect"), server.expect("accept").0)
}
