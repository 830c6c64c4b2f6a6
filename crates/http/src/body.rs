//! The body type that flows through the gateway in both directions. An enum
//! rather than a boxed trait object: no allocation per request, and the
//! size hint passes through so `Content-Length` survives the hop.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

/// Boxed error used for bodies, as hyper expects.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The request body went over the route's limit while streaming.
#[derive(Debug, thiserror::Error)]
#[error("request body over the {limit}-byte limit")]
pub struct BodyTooLarge {
    /// The limit in bytes.
    pub limit: u64,
}

/// How a request body failed on the client's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFault {
    /// Not valid HTTP framing (a bad chunk size line, say): answered 400.
    Malformed,
    /// The client closed the connection (or its sending half) before the
    /// declared length or the last chunk arrived: logged as 499, answered
    /// 400 in case it is still there to read it.
    Incomplete,
    /// Over the route's `max_body_size` while streaming: answered 413.
    TooLarge,
}

impl BodyFault {
    /// The fault behind an error read from a request body: a
    /// [`BodyTooLarge`], an early end of the stream (an `UnexpectedEof` or
    /// a reset somewhere in the source chain), or else bad framing.
    pub fn of(error: &(dyn std::error::Error + 'static)) -> BodyFault {
        let mut source = Some(error);
        while let Some(e) = source {
            if e.is::<BodyTooLarge>() {
                return BodyFault::TooLarge;
            }
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                use std::io::ErrorKind::{
                    BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof,
                };
                if matches!(
                    io.kind(),
                    UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
                ) {
                    return BodyFault::Incomplete;
                }
            }
            if let Some(hyper) = e.downcast_ref::<hyper::Error>()
                && (hyper.is_incomplete_message() || hyper.is_canceled())
            {
                return BodyFault::Incomplete;
            }
            source = e.source();
        }
        BodyFault::Malformed
    }

    fn code(self) -> u8 {
        match self {
            BodyFault::Malformed => 1,
            BodyFault::Incomplete => 2,
            BodyFault::TooLarge => 3,
        }
    }

    fn from_code(code: u8) -> Option<BodyFault> {
        match code {
            1 => Some(BodyFault::Malformed),
            2 => Some(BodyFault::Incomplete),
            3 => Some(BodyFault::TooLarge),
            _ => None,
        }
    }
}

/// What became of a downstream request body, shared between the body
/// (which records it as it is read, wherever it is read: by the upstream client (keel-h1)
/// streaming it upstream, by the retry loop or a filter buffering it) and
/// the code that classifies a failed exchange. It tells who failed: a body
/// that broke or was cut short is the client's fault, and so is a deadline
/// that passed while the gateway was waiting for the client's next bytes.
///
/// Travels as a request extension (cloning shares the state).
#[derive(Debug, Clone, Default)]
pub struct BodyWatch(Arc<WatchState>);

/// How soon after the client's last bytes the reader is taken to be still
/// waiting on the client: a reader (the upstream client) that was waiting, got
/// bytes and has not asked again yet is between two reads, not blocked by
/// the upstream, unless that lasts longer than this.
const BETWEEN_READS: Duration = Duration::from_millis(100);

#[derive(Debug)]
struct WatchState {
    /// A [`BodyFault`] code; 0 while none.
    fault: AtomicU8,
    /// The body was read to its end.
    ended: AtomicBool,
    /// The last read found no bytes ready: the reader waits on the client.
    waiting: AtomicBool,
    /// The read before the last one was waiting on the client.
    was_waiting: AtomicBool,
    /// When the last bytes came, in microseconds since `created`.
    last_data_us: AtomicU64,
    created: Instant,
    /// Bytes read so far.
    received: AtomicU64,
    /// The route's limit, for [`BodyTooLarge`]'s message.
    limit: AtomicU64,
}

impl Default for WatchState {
    fn default() -> Self {
        WatchState {
            fault: AtomicU8::new(0),
            ended: AtomicBool::new(false),
            waiting: AtomicBool::new(false),
            was_waiting: AtomicBool::new(false),
            last_data_us: AtomicU64::new(0),
            created: Instant::now(),
            received: AtomicU64::new(0),
            limit: AtomicU64::new(u64::MAX),
        }
    }
}

impl WatchState {
    fn now_us(&self) -> u64 {
        u64::try_from(self.created.elapsed().as_micros()).unwrap_or(u64::MAX)
    }
}

impl BodyWatch {
    /// The fault recorded, if the body failed on the client's side.
    pub fn fault(&self) -> Option<BodyFault> {
        BodyFault::from_code(self.0.fault.load(Ordering::Acquire))
    }

    /// True once the whole body was read.
    pub fn ended(&self) -> bool {
        self.0.ended.load(Ordering::Acquire)
    }

    /// True while the body is neither complete nor failed and its reader
    /// is waiting for the client's next bytes: a deadline passing now is
    /// the client's lateness, not the upstream's. A reader that is not
    /// asking for more (the upstream client holding bytes the upstream does not
    /// take) waits on the upstream instead; one that was waiting, just got
    /// bytes and is about to ask again still counts as waiting on the
    /// client.
    pub fn waiting_on_client(&self) -> bool {
        if self.fault().is_some() || self.ended() {
            return false;
        }
        let state = &self.0;
        if state.waiting.load(Ordering::Acquire) {
            return true;
        }
        let since = state
            .now_us()
            .saturating_sub(state.last_data_us.load(Ordering::Acquire));
        state.was_waiting.load(Ordering::Acquire) && Duration::from_micros(since) < BETWEEN_READS
    }

    /// Bytes read from the client so far.
    pub fn received(&self) -> u64 {
        self.0.received.load(Ordering::Relaxed)
    }

    /// The route's body limit.
    pub fn limit(&self) -> u64 {
        self.0.limit.load(Ordering::Relaxed)
    }

    fn record_fault(&self, fault: BodyFault) {
        // The first fault wins.
        let _ = self
            .0
            .fault
            .compare_exchange(0, fault.code(), Ordering::AcqRel, Ordering::Acquire);
        self.0.waiting.store(false, Ordering::Release);
    }

    fn record_data(&self, len: u64, end: bool) {
        let state = &self.0;
        state.received.fetch_add(len, Ordering::Relaxed);
        if end {
            state.ended.store(true, Ordering::Release);
        }
        state.last_data_us.store(state.now_us(), Ordering::Release);
        let was = state.waiting.swap(false, Ordering::AcqRel);
        state.was_waiting.store(was, Ordering::Release);
    }

    fn record_end(&self) {
        self.0.ended.store(true, Ordering::Release);
        self.0.waiting.store(false, Ordering::Release);
    }

    fn record_waiting(&self) {
        self.0.waiting.store(true, Ordering::Release);
    }
}

/// A body streamed from a peer, produced by the gateway, or empty.
#[derive(Debug)]
pub enum ProxyBody {
    /// No body.
    Empty,
    /// A body the gateway made, sent in one frame.
    Full(Option<Bytes>),
    /// A body streamed from the other side, with a byte limit (`u64::MAX`: none).
    Stream {
        /// The peer's body.
        inner: Incoming,
        /// Bytes still allowed.
        remaining: u64,
        /// The configured limit, for the error.
        limit: u64,
        /// For a downstream request body: where its fate is recorded.
        watch: Watch,
    },
    /// An upstream response body, read from its connection, which returns
    /// to its pool at the end of the body.
    Upstream(keel_h1::ResponseBody),
    /// Bytes already read from `rest`, then the remainder of `rest`: a
    /// response the idempotency filter began to buffer and then streamed.
    Prefixed {
        /// Sent first.
        prefix: Option<Bytes>,
        /// Then this.
        rest: Box<ProxyBody>,
    },
}

impl ProxyBody {
    /// A body made of `bytes`.
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        ProxyBody::Full(Some(bytes.into()))
    }

    /// A streamed body without limit.
    pub fn stream(inner: Incoming) -> Self {
        ProxyBody::Stream {
            inner,
            remaining: u64::MAX,
            limit: u64::MAX,
            watch: Watch::Unwatched,
        }
    }

    /// A downstream request body that fails with [`BodyTooLarge`] past
    /// `limit` bytes; [`watch`](Self::watch) gives the watch that records
    /// how reading it goes.
    pub fn request(inner: Incoming, limit: u64) -> Self {
        ProxyBody::Stream {
            inner,
            remaining: limit,
            limit,
            watch: Watch::OnRequest,
        }
    }

    /// The watch of a downstream request body made by
    /// [`request`](Self::request), made on the first call: ask for it
    /// before reading the body, since reads before it are not recorded. A
    /// body the gateway reads whole itself (an idempotent route's) never
    /// needs one, and costs no allocation. `None` for any other body (one
    /// the gateway made or buffered cannot fail on the client's side).
    pub fn watch(&mut self) -> Option<BodyWatch> {
        let ProxyBody::Stream {
            inner,
            remaining,
            limit,
            watch,
        } = self
        else {
            return None;
        };
        match watch {
            Watch::Unwatched => None,
            Watch::On(watch) => Some(watch.clone()),
            Watch::OnRequest => {
                let made = BodyWatch::default();
                made.0.limit.store(*limit, Ordering::Relaxed);
                made.0
                    .received
                    .store(*limit - *remaining, Ordering::Relaxed);
                if inner.is_end_stream() {
                    made.record_end();
                }
                *watch = Watch::On(made.clone());
                Some(made)
            }
        }
    }
}

/// Whether a streamed body is watched.
#[derive(Debug)]
pub enum Watch {
    /// Not a downstream request body.
    Unwatched,
    /// A downstream request body whose watch is not made yet.
    OnRequest,
    /// Watched.
    On(BodyWatch),
}

impl Watch {
    fn get(&self) -> Option<&BodyWatch> {
        match self {
            Watch::On(watch) => Some(watch),
            _ => None,
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Empty => Poll::Ready(None),
            ProxyBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Stream {
                inner,
                remaining,
                limit,
                watch,
            } => match Pin::new(&mut *inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let len = frame.data_ref().map_or(0, |d| d.len() as u64);
                    if len > *remaining {
                        *remaining = 0;
                        if let Some(watch) = watch.get() {
                            watch.record_fault(BodyFault::TooLarge);
                        }
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge { limit: *limit }))));
                    }
                    *remaining -= len;
                    if let Some(watch) = watch.get() {
                        watch.record_data(len, inner.is_end_stream());
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(e))) => {
                    if let Some(watch) = watch.get() {
                        watch.record_fault(BodyFault::of(&e));
                    }
                    Poll::Ready(Some(Err(Box::new(e))))
                }
                Poll::Ready(None) => {
                    if let Some(watch) = watch.get() {
                        watch.record_end();
                    }
                    Poll::Ready(None)
                }
                Poll::Pending => {
                    if let Some(watch) = watch.get() {
                        watch.record_waiting();
                    }
                    Poll::Pending
                }
            },
            ProxyBody::Upstream(inner) => Pin::new(inner).poll_frame(cx),
            ProxyBody::Prefixed { prefix, rest } => match prefix.take() {
                Some(bytes) => Poll::Ready(Some(Ok(Frame::data(bytes)))),
                None => Pin::new(rest.as_mut()).poll_frame(cx),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Empty => true,
            ProxyBody::Full(bytes) => bytes.is_none(),
            ProxyBody::Stream { inner, .. } => inner.is_end_stream(),
            ProxyBody::Upstream(inner) => inner.is_end_stream(),
            ProxyBody::Prefixed { prefix, rest } => prefix.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Empty => SizeHint::with_exact(0),
            ProxyBody::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            ProxyBody::Stream { inner, .. } => inner.size_hint(),
            ProxyBody::Upstream(inner) => inner.size_hint(),
            ProxyBody::Prefixed { prefix, rest } => {
                let extra = prefix.as_ref().map_or(0, |b| b.len() as u64);
                let inner = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower() + extra);
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper + extra);
                }
                hint
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("wrapper")]
    struct Wrapper(#[source] Box<dyn std::error::Error + Send + Sync>);

    #[test]
    fn faults_are_told_apart_through_the_source_chain() {
        let eof = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "cut short");
        assert_eq!(BodyFault::of(&eof), BodyFault::Incomplete);
        let wrapped = Wrapper(Box::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset,
        )));
        assert_eq!(BodyFault::of(&wrapped), BodyFault::Incomplete);
        let too_large = Wrapper(Box::new(BodyTooLarge { limit: 10 }));
        assert_eq!(BodyFault::of(&too_large), BodyFault::TooLarge);
        let framing = std::io::Error::new(std::io::ErrorKind::InvalidInput, "bad chunk size");
        assert_eq!(
            BodyFault::of(&Wrapper(Box::new(framing))),
            BodyFault::Malformed
        );
    }

    #[test]
    fn the_watch_tells_who_the_reader_waits_for() {
        let watch = BodyWatch::default();
        assert!(!watch.waiting_on_client(), "not read yet: nobody waits");
        watch.record_waiting();
        assert!(watch.waiting_on_client());
        // Bytes came and the reader has not asked again yet: still the
        // client's turn, for a moment.
        watch.record_data(3, false);
        assert!(watch.waiting_on_client());
        assert_eq!(watch.received(), 3);
        // Bytes came while nobody waited (they were there already): the
        // reader holds them, so it waits on whoever takes them.
        watch.record_data(3, false);
        assert!(!watch.waiting_on_client());
        watch.record_waiting();
        watch.record_data(1, true);
        assert!(watch.ended());
        assert!(
            !watch.waiting_on_client(),
            "a complete body waits on nobody"
        );

        let failed = BodyWatch::default();
        failed.record_waiting();
        failed.record_fault(BodyFault::Incomplete);
        failed.record_fault(BodyFault::Malformed);
        assert_eq!(
            failed.fault(),
            Some(BodyFault::Incomplete),
            "first fault wins"
        );
        assert!(!failed.waiting_on_client());
    }
}
