//! Tunnels for upgraded connections (WebSocket and other `Upgrade`s).
//!
//! The gateway is meant to hold very many idle tunnels, so an idle tunnel
//! holds no copy buffer: each direction waits for readability with no
//! buffer alive, then reads into a per-thread scratch buffer and writes
//! straight out without awaiting. Only when the destination cannot take
//! everything at once is the remainder copied to the heap, and freed as
//! soon as it is written.
//!
//! Every tunnel is registered in the drain registry (`Connections`) with
//! its upstream endpoint. Asked gently to close, a WebSocket tunnel stops
//! forwarding the upstream's bytes at the end of the message in flight (it
//! tracks frame headers and fragmentation, a few bytes of state per
//! direction; a message longer than the close grace or
//! `close_message_limit` is cut at a frame boundary instead), sends the
//! client a close frame with code 1012 and the reconnect hint, forwards the
//! client's answering close frame to the upstream, and then sends each side
//! a FIN and reads until each side's own FIN (at most [`LINGER`]), so
//! neither peer sees a reset. Other upgrades have no close frame: asked
//! gently, they get a FIN both ways and are read until both FINs (at most
//! [`LINGER`]). Asked by force (the deadline), any tunnel is cut.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker, ready};

use bytes::Bytes;
use http::HeaderMap;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use keel_drain::{CloseRequest, Registration};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Duration, Sleep};

use keel_upstream::ConnectionGuard;

use crate::connections::Connections;

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

/// Waits for the client's side to finish upgrading, then copies bytes
/// both ways between it and the upstream's upgraded connection until both
/// sides have closed.
pub async fn splice(
    downstream: OnUpgrade,
    upstream: keel_h1::Upgraded,
    websocket: bool,
    policy: ClosePolicy,
    connections: Arc<Connections>,
) {
    let down = match downstream.await {
        Ok(down) => down,
        Err(error) => {
            tracing::debug!(%error, "upgrade failed");
            return;
        }
    };
    let keel_h1::Upgraded {
        stream: up_stream,
        pending: up_pending,
        attached,
    } = upstream;
    let Ok(guard) = attached.downcast::<ConnectionGuard>() else {
        tracing::warn!("upstream connection without its guard; closing the tunnel");
        return;
    };
    let endpoint = guard.endpoint_key();
    let down = match down.downcast::<crate::activity::ServerIo>() {
        Ok(parts) => (parts.io.into_inner().into_tcp(), parts.read_buf),
        Err(other) => {
            tracing::debug!("downstream upgrade is not a plain TCP stream; buffered copy");
            return fallback(other, up_stream, up_pending, guard).await;
        }
    };
    let up_stream = forget_wakers(up_stream);
    let down = (forget_wakers(down.0), down.1);
    // A task of its own, so the long-lived future holds only the tunnel's
    // state, not the (larger) upgrade futures above.
    // Upgraded while the gateway drains: asked at once to leave with the
    // others.
    let registration = connections.register_tunnel(Some(endpoint));
    tokio::spawn(async move {
        let _guard = guard;
        let result = run(
            down.0,
            down.1,
            up_stream,
            up_pending,
            Some(registration),
            websocket,
            policy,
        )
        .await;
        if let Err(error) = result {
            tracing::debug!(%error, "tunnel closed with an error");
        }
    });
}

/// Replaces the wakers the HTTP tasks left in the socket's read and write
/// slots (the client connection's task; on the upstream side, the task of
/// the request that drove the exchange) with no-op ones. The tunnel takes
/// over a write slot only when a write could not finish at once, so
/// without this the finished task (a few KiB) would stay allocated,
/// through its waker, for as long as the tunnel is idle.
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
    run(
        a,
        a_pending,
        b,
        b_pending,
        None,
        false,
        ClosePolicy::default(),
    )
    .await
}

/// How many read-and-write rounds one direction may do in one poll before
/// it yields, so a busy tunnel cannot starve the other tasks of its thread.
const ROUNDS_PER_POLL: usize = 32;

/// How long a closed WebSocket tunnel waits, once both close frames have
/// gone through, for both peers to close their side. Dropping a socket
/// with unread bytes makes the kernel reset the connection (and discard
/// what it had not sent yet, the forwarded close frame included), so the
/// tunnel reads and discards until each peer's FIN; this bounds it for a
/// peer that never closes.
const LINGER: Duration = Duration::from_secs(2);

/// How a drained WebSocket tunnel places its close frame: after the end of
/// a fragmented message in flight toward the client (clients such as
/// Python's `websockets` take a close between fragments for a protocol
/// error), unless the message goes on for longer than `message_wait` or
/// `message_limit` bytes; then at the next frame boundary, which RFC 6455
/// allows, counted in `mid_message`. Built from `[drain]` in `serve`.
#[derive(Debug, Clone, Default)]
pub struct ClosePolicy {
    /// The longest wait for the end of a message (`[drain] close_grace`).
    pub message_wait: Duration,
    /// The most bytes forwarded while waiting for it
    /// (`[drain] close_message_limit`).
    pub message_limit: u64,
    /// Closes that went inside a message because a bound was hit.
    pub mid_message: Counter,
}

/// Copies both ways between `a` (the client) and `b` (the upstream) until
/// both sides have closed, the drain closes the tunnel, or it is cut.
fn run(
    a: TcpStream,
    a_pending: Bytes,
    b: TcpStream,
    b_pending: Bytes,
    registration: Option<Registration>,
    websocket: bool,
    policy: ClosePolicy,
) -> Tunnel {
    let frames = || websocket.then(Frames::default);
    Tunnel {
        client: a,
        upstream: b,
        to_upstream: Half::new(&a_pending, frames()),
        to_client: Half::new(&b_pending, frames()),
        registration,
        websocket,
        policy,
        close: None,
        close_sent: false,
        wait: Wait::Nothing,
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
    policy: ClosePolicy,
    /// The gentle close asked by the drain, once asked.
    close: Option<CloseRequest>,
    /// Set once the close frame went out to the client.
    close_sent: bool,
    /// The timer of the closing handshake, if one runs.
    wait: Wait,
}

/// What a closing tunnel is waiting for, with its deadline.
enum Wait {
    Nothing,
    /// The end of the message in flight toward the client.
    MessageEnd(Pin<Box<Sleep>>),
    /// Both peers' FIN, after both close frames went through.
    Linger(Pin<Box<Sleep>>),
}

/// Where a direction stops forwarding to send the close frame instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// Not closing: forward everything.
    Never,
    /// After the message in flight (and its interleaved control frames).
    MessageEnd,
    /// At the next frame boundary.
    FrameEnd,
}

/// One direction of a tunnel.
struct Half {
    /// Bytes the destination has not taken yet: the HTTP parser's leftovers
    /// at first, then only what a write could not take at once. Empty (no
    /// allocation) while idle.
    out: Vec<u8>,
    written: usize,
    frames: Option<Frames>,
    /// Towards the client: where to put the close frame.
    stop: Stop,
    /// Towards the client: bytes forwarded while waiting for a message end.
    waited_bytes: u64,
    /// Towards the client: `out` holds the close frame.
    closing: bool,
    /// The closing handshake is through in this direction: read what the
    /// source still sends and drop it, until its FIN.
    discard: bool,
    /// The source's FIN came while the close frame was still to be sent.
    eof: bool,
    done: bool,
}

impl Half {
    fn new(pending: &[u8], mut frames: Option<Frames>) -> Self {
        if let Some(frames) = frames.as_mut() {
            frames.feed(pending, Stop::Never);
        }
        Self {
            out: pending.to_vec(),
            written: 0,
            frames,
            stop: Stop::Never,
            waited_bytes: 0,
            closing: false,
            discard: false,
            eof: false,
            done: false,
        }
    }

    fn at(&self, stop: Stop) -> bool {
        self.frames.as_ref().is_none_or(|f| f.at(stop))
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
                if request.force {
                    // The deadline: cut.
                    tracing::debug!("tunnel cut by the drain");
                    return Poll::Ready(Ok(()));
                }
                if this.close.is_none() {
                    this.close = Some(request);
                    if !this.websocket {
                        // No close frame to send: FIN both ways at once.
                        this.to_client.stop = Stop::FrameEnd;
                        this.to_upstream.stop = Stop::FrameEnd;
                    } else if this.policy.message_wait.is_zero() {
                        this.to_client.stop = Stop::FrameEnd;
                    } else {
                        this.to_client.stop = Stop::MessageEnd;
                        this.wait = Wait::MessageEnd(Box::pin(tokio::time::sleep(
                            this.policy.message_wait,
                        )));
                    }
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
            &this.policy,
            &mut this.close_sent,
            cx,
        )?;
        let to_upstream = poll_half(
            &mut this.to_upstream,
            &this.client,
            &mut this.upstream,
            Direction::ToUpstream,
            None,
            &this.policy,
            &mut this.close_sent,
            cx,
        )?;
        if to_client.is_ready() && to_upstream.is_ready() {
            return Poll::Ready(Ok(()));
        }
        let over = |half: &Half| half.discard || half.done;
        let handshake_over = if this.websocket {
            this.close_sent && over(&this.to_upstream)
        } else {
            over(&this.to_client) && over(&this.to_upstream)
        };
        match &mut this.wait {
            Wait::MessageEnd(_) if this.close_sent => this.wait = Wait::Nothing,
            Wait::MessageEnd(timer) => {
                if timer.as_mut().poll(cx).is_ready() {
                    // The message did not end within the grace: close at
                    // the next frame boundary rather than not at all.
                    this.wait = Wait::Nothing;
                    this.to_client.stop = Stop::FrameEnd;
                    this.policy.mid_message.inc();
                    cx.waker().wake_by_ref();
                }
                return Poll::Pending;
            }
            _ => {}
        }
        if handshake_over && matches!(this.wait, Wait::Nothing) {
            this.wait = Wait::Linger(Box::pin(tokio::time::sleep(LINGER)));
        }
        if let Wait::Linger(timer) = &mut this.wait
            && timer.as_mut().poll(cx).is_ready()
        {
            tracing::debug!("a peer kept its side open after the close handshake");
            return Poll::Ready(Ok(()));
        }
        Poll::Pending
    }
}

/// Moves one direction along as far as it goes without waiting; `Ready`
/// once it is finished.
///
/// Towards the client, a gentle close stops forwarding where `half.stop`
/// says and sends the close frame instead, then half-closes and discards
/// what the upstream still sends. Towards the upstream, once the client's
/// close frame has gone through after ours, it half-closes and discards
/// the rest. Either way the direction is finished only at its source's
/// FIN, so no socket is dropped with unread bytes (which would reset it).
/// End of stream half-closes the destination: the other direction may
/// still be talking.
#[allow(clippy::too_many_arguments)]
fn poll_half(
    half: &mut Half,
    src: &TcpStream,
    dst: &mut TcpStream,
    direction: Direction,
    close: Option<&CloseRequest>,
    policy: &ClosePolicy,
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
            // Our close frame is out: FIN after it, then wait for the
            // upstream's FIN, dropping what it still sends.
            *close_sent = true;
            half.closing = false;
            half.discard = true;
            half.done = half.eof;
            half_close(dst, cx);
            continue;
        }
        if half.stop != Stop::Never && !half.discard && half.frames.is_none() {
            // An upgrade with no close frame, asked to close: FIN, then
            // read until the source's FIN.
            half.discard = true;
            half_close(dst, cx);
            continue;
        }
        if direction == Direction::ToClient
            && half.stop != Stop::Never
            && !half.discard
            && half.at(half.stop)
        {
            let reason = close.map(CloseRequest::close_reason).unwrap_or_default();
            half.out = close_frame(CloseRequest::WEBSOCKET_CODE, &reason);
            half.closing = true;
            continue;
        }
        if direction == Direction::ToUpstream && *close_sent && !half.discard && half.saw_close() {
            // Both close frames exchanged: FIN after the client's, then
            // wait for the client's FIN.
            half.discard = true;
            half_close(dst, cx);
            continue;
        }
        ready!(src.poll_read_ready(cx))?;
        let stop = if half.discard { Stop::Never } else { half.stop };
        let discard = half.discard;
        let frames = &mut half.frames;
        let (step, forwarded) =
            SCRATCH.with_borrow_mut(|scratch| -> io::Result<(Step, usize)> {
                let n = match src.try_read(scratch) {
                    Ok(0) => return Ok((Step::Eof, 0)),
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok((Step::Done, 0)),
                    Err(e) => return Err(e),
                };
                if discard {
                    return Ok((Step::Done, 0));
                }
                // While stopping, what follows the stop point is dropped: the
                // client is told to go instead.
                let n = match frames.as_mut() {
                    Some(frames) => frames.feed(&scratch[..n], stop),
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
                    (Step::Done, n)
                } else {
                    (Step::Rest(scratch[written..n].to_vec()), n)
                })
            })?;
        if half.stop == Stop::MessageEnd {
            half.waited_bytes += forwarded as u64;
            if half.waited_bytes > policy.message_limit {
                // A message longer than the limit: close inside it.
                half.stop = Stop::FrameEnd;
                policy.mid_message.inc();
            }
        }
        match step {
            Step::Done => {}
            Step::Rest(rest) => half.out = rest,
            Step::Eof
                if direction == Direction::ToClient
                    && half.stop != Stop::Never
                    && !half.discard
                    && half.at(Stop::FrameEnd) =>
            {
                // The upstream left before the close frame went out: the
                // client still gets it (at the frame boundary), then FIN.
                half.eof = true;
                half.stop = Stop::FrameEnd;
            }
            Step::Eof => {
                half.done = true;
                if !half.discard {
                    half_close(dst, cx);
                }
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

/// Where a WebSocket byte stream is relative to its frames and messages:
/// enough to stop at a frame or message boundary and to notice a close
/// frame, without buffering payloads.
#[derive(Debug, Default)]
struct Frames {
    header: [u8; 14],
    header_len: u8,
    payload_left: u64,
    in_close: bool,
    saw_close: bool,
    /// Between the first and the final fragment of a data message (control
    /// frames may come in between).
    in_message: bool,
}

impl Frames {
    fn at_frame_boundary(&self) -> bool {
        self.header_len == 0 && self.payload_left == 0
    }

    /// True when the stream is at a point where `stop` says to stop.
    fn at(&self, stop: Stop) -> bool {
        match stop {
            Stop::Never => false,
            Stop::FrameEnd => self.at_frame_boundary(),
            Stop::MessageEnd => self.at_frame_boundary() && !self.in_message,
        }
    }

    /// Follows `data` and returns how many bytes of it to forward: all of
    /// it, or up to the first point where `stop` says to stop.
    fn feed(&mut self, data: &[u8], stop: Stop) -> usize {
        let mut i = 0;
        loop {
            if self.at(stop) || i == data.len() {
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
                let fin = self.header[0] & 0x80 != 0;
                self.header_len = 0;
                self.payload_left = payload;
                self.in_close = opcode == 0x8;
                // A data frame (continuation, text, binary) without FIN
                // leaves a message open; with FIN it ends one. Control
                // frames come between fragments and change nothing.
                if opcode <= 0x2 {
                    self.in_message = !fin;
                }
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

/// For a client connection that is not plain TCP (none today): a
/// buffered copy, correct but without the idle-memory property.
async fn fallback(
    down: Upgraded,
    mut up: TcpStream,
    up_pending: Bytes,
    guard: Box<ConnectionGuard>,
) {
    let _guard = guard;
    let mut down = TokioIo::new(down);
    let copied = async {
        down.write_all(&up_pending).await?;
        tokio::io::copy_bidirectional(&mut down, &mut up).await
    };
    if let Err(error) = copied.await {
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
            assert_eq!(f.feed(std::slice::from_ref(b), Stop::Never), 1);
        }
        assert!(f.saw_close && f.at_frame_boundary());
        // Stopping in the middle of the first frame forwards its rest only.
        let mut f = Frames::default();
        assert_eq!(f.feed(&stream[..10], Stop::Never), 10);
        assert_eq!(f.feed(&stream[10..], Stop::FrameEnd), first - 10);
        assert!(f.at_frame_boundary() && !f.saw_close);
        // At a boundary, stopping forwards nothing.
        assert_eq!(f.feed(&stream[first..], Stop::FrameEnd), 0);
    }

    /// A binary message in three fragments with a ping between the first
    /// two, then a one-frame text message.
    fn fragmented() -> (Vec<u8>, usize, usize) {
        let mut stream = fragment(0x2, false, &[1; 200]);
        let first = stream.len();
        stream.extend(frame(0x9, b"ping", false));
        stream.extend(fragment(0x0, false, &[2; 70_000]));
        stream.extend(fragment(0x0, true, &[3; 10]));
        let message_end = stream.len();
        stream.extend(frame(0x1, b"next", false));
        (stream, first, message_end)
    }

    fn fragment(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut f = frame(opcode, payload, false);
        if !fin {
            f[0] &= 0x7f;
        }
        f
    }

    #[test]
    fn frames_stop_at_the_end_of_a_fragmented_message() {
        let (stream, first, message_end) = fragmented();
        // Asked to stop inside the first fragment: the ping and the other
        // fragments still go, the next message does not.
        let mut f = Frames::default();
        assert_eq!(f.feed(&stream[..10], Stop::Never), 10);
        assert!(f.in_message);
        assert_eq!(f.feed(&stream[10..], Stop::MessageEnd), message_end - 10);
        assert!(f.at(Stop::MessageEnd));
        // A byte at a time, the same point.
        let mut f = Frames::default();
        let mut forwarded = f.feed(&stream[..1], Stop::Never);
        for b in &stream[1..] {
            forwarded += f.feed(std::slice::from_ref(b), Stop::MessageEnd);
        }
        assert_eq!(forwarded, message_end);
        // Asked at a message boundary, it stops at once.
        assert_eq!(f.feed(&stream[message_end..], Stop::MessageEnd), 0);
        // Inside the first fragment, a frame stop stops at its end.
        let mut f = Frames::default();
        assert_eq!(f.feed(&stream[..10], Stop::Never), 10);
        assert_eq!(f.feed(&stream[10..], Stop::FrameEnd), first - 10);
        assert!(f.in_message && !f.at(Stop::MessageEnd));
    }

    /// A gentle close with a fragmented message in flight toward the
    /// client, through a tunnel registered like the gateway's.
    struct Drained {
        client: TcpStream,
        upstream: TcpStream,
        registry: keel_drain::Registry,
        id: keel_drain::ConnId,
        mid_message: Counter,
        task: tokio::task::JoinHandle<io::Result<()>>,
    }

    async fn drained(message_wait: Duration, message_limit: u64) -> Drained {
        drained_tunnel(true, message_wait, message_limit).await
    }

    async fn drained_tunnel(
        websocket: bool,
        message_wait: Duration,
        message_limit: u64,
    ) -> Drained {
        let (client, proxy_a) = tests_pair().await;
        let (proxy_b, upstream) = tests_pair().await;
        let registry = keel_drain::Registry::new();
        let registration = registry.register(keel_drain::ConnKind::TUNNEL, None);
        let id = registration.id();
        let mid_message = Counter::default();
        let policy = ClosePolicy {
            message_wait,
            message_limit,
            mid_message: mid_message.clone(),
        };
        let task = tokio::spawn(run(
            proxy_a,
            Bytes::new(),
            proxy_b,
            Bytes::new(),
            Some(registration),
            websocket,
            policy,
        ));
        Drained {
            client,
            upstream,
            registry,
            id,
            mid_message,
            task,
        }
    }

    impl Drained {
        /// The upstream sends `fragment` (a message's first), the client
        /// gets it, then the drain asks the tunnel to close.
        async fn first_fragment_then_close(&mut self, fragment: &[u8]) {
            self.upstream.write_all(fragment).await.expect("write");
            assert_eq!(
                read_exactly(&mut self.client, fragment.len()).await,
                fragment
            );
            self.close();
        }

        fn close(&self) {
            let asked = self.registry.close(
                self.id,
                CloseRequest {
                    force: false,
                    reconnect_after: Duration::from_millis(7),
                },
            );
            assert!(asked);
        }
    }

    async fn read_exactly(from: &mut TcpStream, n: usize) -> Vec<u8> {
        let mut got = vec![0; n];
        from.read_exact(&mut got).await.expect("read");
        got
    }

    fn masked_close() -> Vec<u8> {
        frame(0x8, &1012u16.to_be_bytes(), true)
    }

    #[tokio::test(start_paused = true)]
    async fn the_close_frame_waits_for_the_message_end_and_both_sides_end_with_fin() {
        let (stream, first, message_end) = fragmented();
        let mut t = drained(Duration::from_secs(1), 1 << 20).await;
        t.first_fragment_then_close(&stream[..first]).await;
        // The rest of the message (and the ping inside it) still goes to
        // the client; the next message does not; then the close frame.
        t.upstream.write_all(&stream[first..]).await.expect("write");
        let rest = read_exactly(&mut t.client, message_end - first).await;
        assert_eq!(rest, stream[first..message_end]);
        let close = close_frame(1012, "keel drain; reconnect_after_ms=7");
        assert_eq!(read_exactly(&mut t.client, close.len()).await, close);
        assert_eq!(t.mid_message.get(), 0);
        // The client answers; the upstream gets that close frame, then FIN,
        // though it went on streaming in between.
        t.upstream
            .write_all(&frame(0x2, &[5; 5000], false))
            .await
            .expect("write");
        t.client.write_all(&masked_close()).await.expect("write");
        let mut up = Vec::new();
        t.upstream
            .read_to_end(&mut up)
            .await
            .expect("no reset toward the upstream");
        assert_eq!(up, masked_close());
        // The client's side: FIN after the close frame.
        let mut tail = Vec::new();
        t.client
            .read_to_end(&mut tail)
            .await
            .expect("no reset toward the client");
        assert!(tail.is_empty());
        // The tunnel ends once both peers have closed, never before.
        assert!(!t.task.is_finished());
        t.upstream
            .write_all(&frame(0x8, &1012u16.to_be_bytes(), false))
            .await
            .expect("write");
        drop(t.upstream);
        drop(t.client);
        t.task.await.expect("join").expect("tunnel");
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_that_outlasts_the_grace_is_closed_at_a_frame_boundary() {
        let (stream, first, _) = fragmented();
        let mut t = drained(Duration::from_secs(1), 1 << 20).await;
        t.first_fragment_then_close(&stream[..first]).await;
        // The upstream stalls inside the message: after the grace, the close
        // frame goes at the frame boundary, and it is counted.
        let close = close_frame(1012, "keel drain; reconnect_after_ms=7");
        assert_eq!(read_exactly(&mut t.client, close.len()).await, close);
        assert_eq!(t.mid_message.get(), 1);
        t.client.write_all(&masked_close()).await.expect("write");
        drop(t.client);
        let mut up = Vec::new();
        t.upstream.read_to_end(&mut up).await.expect("read");
        assert_eq!(up, masked_close());
        drop(t.upstream);
        t.task.await.expect("join").expect("tunnel");
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_past_the_byte_limit_is_closed_at_a_frame_boundary() {
        let (stream, first, _) = fragmented();
        let mut t = drained(Duration::from_secs(60), 100).await;
        t.first_fragment_then_close(&stream[..first]).await;
        // More than 100 bytes of the message go by: the close frame follows
        // the frame the limit was crossed in, well before the grace.
        t.upstream.write_all(&stream[first..]).await.expect("write");
        let ping = frame(0x9, b"ping", false);
        let big = fragment(0x0, false, &[2; 70_000]);
        let got = read_exactly(&mut t.client, ping.len() + big.len()).await;
        assert_eq!(got, [ping, big].concat());
        let close = close_frame(1012, "keel drain; reconnect_after_ms=7");
        assert_eq!(read_exactly(&mut t.client, close.len()).await, close);
        assert_eq!(t.mid_message.get(), 1);
        drop((t.client, t.upstream));
        t.task.await.expect("join").ok();
    }

    #[tokio::test(start_paused = true)]
    async fn another_upgrade_asked_to_close_gets_fin_both_ways_and_no_reset() {
        let mut t = drained_tunnel(false, Duration::from_secs(1), 1 << 20).await;
        t.client.write_all(b"hello").await.expect("write");
        assert_eq!(read_exactly(&mut t.upstream, 5).await, b"hello");
        t.close();
        // Both sides read FIN; what the upstream still sends is dropped.
        t.upstream.write_all(&[1; 50_000]).await.expect("write");
        let mut rest = Vec::new();
        t.client
            .read_to_end(&mut rest)
            .await
            .expect("no reset toward the client");
        let mut up = Vec::new();
        t.upstream
            .read_to_end(&mut up)
            .await
            .expect("no reset toward the upstream");
        assert!(up.is_empty());
        assert!(!t.task.is_finished(), "it waits for both peers' FIN");
        drop((t.client, t.upstream));
        t.task.await.expect("join").expect("tunnel");
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_never_closes_is_let_go_after_the_linger() {
        let mut t = drained(Duration::from_secs(1), 1 << 20).await;
        t.close();
        let close = close_frame(1012, "keel drain; reconnect_after_ms=7");
        assert_eq!(read_exactly(&mut t.client, close.len()).await, close);
        t.client.write_all(&masked_close()).await.expect("write");
        assert_eq!(
            read_exactly(&mut t.upstream, masked_close().len()).await,
            masked_close()
        );
        // Neither peer closes: the tunnel ends LINGER later on its own.
        let started = tokio::time::Instant::now();
        t.task.await.expect("join").expect("tunnel");
        assert!(started.elapsed() >= LINGER);
        drop((t.client, t.upstream));
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
        let connections = crate::connections::Connections::default();
        let reg = connections.register(keel_drain::ConnKind::TUNNEL, None);
        let f = super::run(
            a,
            bytes::Bytes::new(),
            c,
            bytes::Bytes::new(),
            Some(reg),
            true,
            super::ClosePolicy::default(),
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
