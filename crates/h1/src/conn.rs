//! One upstream connection and one exchange on it, driven from the task
//! of the request it carries.

use std::any::Any;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker, ready};

use bytes::{Bytes, BytesMut};
use http::request::Parts;
use http::{Method, Response};
use http_body::Body;
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;

use crate::body::ResponseBody;
use crate::error::{BoxError, Error};
use crate::request::{ExtraLines, Framing, encode_head};
use crate::response::{BodyFraming, Head, Span, parse_head};

/// What a read asks the buffer to have room for.
const READ_SIZE: usize = 16 * 1024;
/// Below this much room, the buffer grows before a read.
const MIN_ROOM: usize = 2 * 1024;
/// A request body is written out once this much of it is queued.
const FLUSH_AT: usize = 64 * 1024;
/// The most write buffer a connection keeps between requests: a large
/// upload's buffer is let go, so an idle pooled connection holds no more
/// than a request head needs.
const WRITE_KEEP: usize = 8 * 1024;

/// Where a connection goes back once an exchange on it is complete.
pub trait Pool: Send + Sync + std::fmt::Debug {
    /// Takes back a connection that can carry another exchange.
    fn checkin(&self, connection: Box<Connection>);
}

/// One upstream HTTP/1.1 connection: the socket, the bytes read from it
/// and not yet used, a write buffer kept between requests, and whatever
/// its owner attached (a guard that counts open connections, say).
pub struct Connection {
    stream: TcpStream,
    pub(crate) read: BytesMut,
    write: Vec<u8>,
    /// Scratch space for parsing response heads.
    spans: Vec<Span>,
    attached: Box<dyn Any + Send + Sync>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("stream", &self.stream)
            .field("buffered", &self.read.len())
            .finish_non_exhaustive()
    }
}

/// A failed exchange: why, whether the upstream may have seen the
/// request, and the request's body when none of it was sent (the request
/// can go out on another connection as it is).
#[derive(Debug)]
pub struct Failure<B> {
    /// Why the exchange failed.
    pub error: Error,
    /// Whether any byte of the request reached the connection.
    pub sent: bool,
    /// The body, when the request can be sent elsewhere: not a byte of it
    /// was written, and the body did not fail.
    pub unsent: Option<Unsent<B>>,
}

impl<B> Failure<B> {
    fn before_sending(error: Error) -> Self {
        Failure {
            error,
            sent: false,
            unsent: None,
        }
    }

    fn after_sending(error: Error) -> Self {
        Failure {
            error,
            sent: true,
            unsent: None,
        }
    }
}

/// The body of a request that was not sent, and the body's first frame
/// when it had already been read (send it before the rest).
#[derive(Debug)]
pub struct Unsent<B> {
    /// The body, without `prefix`.
    pub body: B,
    /// The first bytes of the body, already read from it.
    pub prefix: Option<Bytes>,
}

/// The connection of a `101 Switching Protocols` response, for a tunnel.
#[derive(Debug)]
pub struct Upgraded {
    /// The socket.
    pub stream: TcpStream,
    /// Bytes the upstream sent after the 101 head, already read.
    pub pending: Bytes,
    /// What the connection's owner attached to it.
    pub attached: Box<dyn Any + Send + Sync>,
}

/// The response extension of a `101 Switching Protocols` answer: the
/// upgraded connection, taken once.
///
/// ```
/// let upgrade = keel_h1::OnUpgrade::default();
/// assert!(upgrade.take().is_none());
/// ```
#[derive(Debug, Clone, Default)]
pub struct OnUpgrade(Arc<Mutex<Option<Upgraded>>>);

impl OnUpgrade {
    /// The upgraded connection, the first time.
    pub fn take(&self) -> Option<Upgraded> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

/// How the request's sending ended.
enum Sent {
    /// The whole request is written.
    Complete,
    /// The upstream answered before the request body was all sent: what
    /// is left of it is not sent and the connection is not reused.
    Answered(Head),
}

/// Where the request's sending is.
struct Sending {
    /// Bytes of `write` already written.
    written: usize,
    /// Whether any byte reached the socket.
    any_written: bool,
    framing: Framing,
    body_done: bool,
}

impl Connection {
    /// A connection over `stream`; `attached` lives as long as the
    /// connection does (and moves into its tunnel after an upgrade).
    pub fn new(stream: TcpStream, attached: Box<dyn Any + Send + Sync>) -> Box<Self> {
        Box::new(Connection {
            stream,
            read: BytesMut::new(),
            write: Vec::new(),
            spans: Vec::new(),
            attached,
        })
    }

    /// Whether an idle connection can carry a request: the upstream has
    /// neither closed it nor sent anything unasked. Asks the runtime's
    /// readiness, so a connection with nothing to read costs no syscall.
    pub fn is_reusable(&mut self) -> bool {
        if !self.read.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        match self.stream.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(self.stream.try_read(&mut probe),
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }

    /// Sends a request (`head`, the `extra` header lines, and `body`) and
    /// reads the response head. The head is only read, so a caller can
    /// send it again elsewhere.
    ///
    /// The head is written first, with the body's first frame when it is
    /// ready; the rest of the body follows as it comes, while an answer
    /// from the upstream (a 413 before the upload is done, say) stops the
    /// sending. Interim (1xx) responses other than 101 are skipped. The
    /// response body reads from this connection and gives it back to
    /// `pool` at its end; a body already read with the head is given back
    /// at once. A `101` answer carries the connection as an [`OnUpgrade`]
    /// extension.
    ///
    /// The request's `Content-Length` and `Transfer-Encoding` headers are
    /// replaced by the framing of its body (its exact size when known,
    /// else chunked).
    pub async fn send<B>(
        mut self: Box<Self>,
        head: &Parts,
        extra: &ExtraLines<'_>,
        mut body: B,
        pool: &Arc<dyn Pool>,
    ) -> Result<Response<ResponseBody>, Failure<B>>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        let head_request = head.method == Method::HEAD;
        let mut sending = Sending {
            written: 0,
            any_written: false,
            framing: Framing::of(
                &head.method,
                &head.headers,
                body.is_end_stream(),
                body.size_hint().exact(),
            ),
            body_done: body.is_end_stream(),
        };
        self.write.clear();
        encode_head(
            &mut self.write,
            &head.method,
            &head.uri,
            &head.headers,
            extra,
            sending.framing,
        );
        // The body's first frame, when ready, goes out with the head: one
        // write for a small request.
        let mut prefix = None;
        if !sending.body_done {
            let first = poll_fn(|cx| match Pin::new(&mut body).poll_frame(cx) {
                Poll::Pending => Poll::Ready(Ok(None)),
                Poll::Ready(Some(Ok(frame))) => Poll::Ready(Ok(Some(frame.into_data().ok()))),
                Poll::Ready(None) => Poll::Ready(Ok(Some(None))),
                Poll::Ready(Some(Err(error))) => Poll::Ready(Err(error)),
            })
            .await;
            match first {
                Ok(None) => {}
                Ok(Some(Some(data))) => {
                    if let Err(error) = sending.framing.encode(&data, &mut self.write) {
                        return Err(Failure::before_sending(error));
                    }
                    prefix = Some(data);
                }
                Ok(Some(None)) => sending.body_done = true,
                Err(error) => return Err(Failure::before_sending(Error::Body(error.into()))),
            }
        }
        if sending.body_done
            && let Err(error) = sending.framing.finish(&mut self.write)
        {
            return Err(Failure::before_sending(error));
        }

        let sent = poll_fn(|cx| self.poll_send(cx, &mut body, &mut sending)).await;
        let answered = match sent {
            Ok(Sent::Complete) => None,
            Ok(Sent::Answered(head)) => Some(head),
            Err(error) => {
                let sent = sending.any_written;
                // A body that failed cannot be sent again.
                let whole = !sent && !matches!(error, Error::Body(_));
                let unsent = whole.then(|| Unsent { body, prefix });
                return Err(Failure {
                    error,
                    sent,
                    unsent,
                });
            }
        };
        // The request body is done with (or abandoned): the client's side
        // of the exchange is over.
        drop(body);
        if self.write.capacity() > WRITE_KEEP {
            self.write = Vec::new();
        }
        let early = answered.is_some();
        let head = match answered {
            Some(head) => head,
            None => self.read_head().await.map_err(Failure::after_sending)?,
        };
        self.respond(head, head_request, early, pool)
            .map_err(Failure::after_sending)
    }

    /// The response for `head`, with the body that follows it.
    fn respond(
        mut self: Box<Self>,
        mut head: Head,
        head_request: bool,
        early: bool,
        pool: &Arc<dyn Pool>,
    ) -> Result<Response<ResponseBody>, Error> {
        let mut response = Response::new(ResponseBody::empty());
        *response.status_mut() = head.status;
        *response.version_mut() = head.version;
        if head.status == http::StatusCode::SWITCHING_PROTOCOLS {
            let pending = self.read.split().freeze();
            let Connection {
                stream, attached, ..
            } = *self;
            let upgrade = OnUpgrade::default();
            *upgrade.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(Upgraded {
                stream,
                pending,
                attached,
            });
            response.extensions_mut().insert(upgrade);
            *response.headers_mut() = head.headers;
            return Ok(response);
        }
        let (framing, keep_alive) = head.framing(head_request)?;
        *response.headers_mut() = head.headers;
        // An answer that came before the request was all sent leaves the
        // upstream expecting the rest: the connection is not reused.
        let keep_alive = keep_alive && !early;
        let buffered = self.read.len() as u64;
        let body = match framing {
            BodyFraming::Empty => Some(Bytes::new()),
            BodyFraming::Length(n) if n <= buffered => {
                Some(self.read.split_to(n as usize).freeze())
            }
            _ => None,
        };
        *response.body_mut() = match body {
            Some(bytes) => {
                // The whole body came with the head: the connection is free
                // now (if nothing follows that should not).
                if keep_alive && self.read.is_empty() {
                    pool.checkin(self);
                }
                ResponseBody::full(bytes)
            }
            None => ResponseBody::streaming(self, framing, keep_alive, pool),
        };
        Ok(response)
    }

    /// Reads until a final response head (interim 1xx heads other than
    /// 101 are dropped).
    async fn read_head(&mut self) -> Result<Head, Error> {
        loop {
            if let Some(head) = self.final_head()? {
                return Ok(head);
            }
            match poll_fn(|cx| self.poll_fill(cx)).await {
                Ok(0) => return Err(Error::Closed),
                Ok(_) => {}
                Err(error) => return Err(Error::Io(error)),
            }
        }
    }

    /// The first final head in the read buffer, dropping interim ones.
    fn final_head(&mut self) -> Result<Option<Head>, Error> {
        while !self.read.is_empty() {
            let Some(head) = parse_head(&mut self.read, &mut self.spans)? else {
                return Ok(None);
            };
            if !head.status.is_informational()
                || head.status == http::StatusCode::SWITCHING_PROTOCOLS
            {
                return Ok(Some(head));
            }
        }
        Ok(None)
    }

    /// Writes what is queued, then the body as it comes; between writes
    /// that cannot go on, looks for an early answer.
    fn poll_send<B>(
        &mut self,
        cx: &mut Context<'_>,
        body: &mut B,
        sending: &mut Sending,
    ) -> Poll<Result<Sent, Error>>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        loop {
            while sending.written < self.write.len() {
                match Pin::new(&mut self.stream).poll_write(cx, &self.write[sending.written..]) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(Error::Io(io::ErrorKind::WriteZero.into())));
                    }
                    Poll::Ready(Ok(n)) => {
                        sending.written += n;
                        sending.any_written = true;
                    }
                    Poll::Ready(Err(error)) => return Poll::Ready(Err(Error::Io(error))),
                    Poll::Pending => return self.poll_answer(cx),
                }
            }
            self.write.clear();
            sending.written = 0;
            if sending.body_done {
                return Poll::Ready(Ok(Sent::Complete));
            }
            // Queue body frames until the body waits, ends or fills the queue.
            loop {
                match Pin::new(&mut *body).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Ok(data) = frame.into_data()
                            && let Err(error) = sending.framing.encode(&data, &mut self.write)
                        {
                            return Poll::Ready(Err(error));
                        }
                        if self.write.len() >= FLUSH_AT {
                            break;
                        }
                    }
                    Poll::Ready(None) => {
                        if let Err(error) = sending.framing.finish(&mut self.write) {
                            return Poll::Ready(Err(error));
                        }
                        sending.body_done = true;
                        break;
                    }
                    Poll::Ready(Some(Err(error))) => {
                        return Poll::Ready(Err(Error::Body(error.into())));
                    }
                    Poll::Pending if self.write.is_empty() => return self.poll_answer(cx),
                    Poll::Pending => break,
                }
            }
        }
    }

    /// While the request cannot be sent further: a final answer that came
    /// early ends the sending; an interim one is dropped; the upstream
    /// closing is an error.
    fn poll_answer(&mut self, cx: &mut Context<'_>) -> Poll<Result<Sent, Error>> {
        loop {
            match ready!(self.poll_fill(cx)) {
                Ok(0) => return Poll::Ready(Err(Error::Closed)),
                Ok(_) => match self.final_head() {
                    Ok(Some(head)) => return Poll::Ready(Ok(Sent::Answered(head))),
                    Ok(None) => {}
                    Err(error) => return Poll::Ready(Err(error)),
                },
                Err(error) => return Poll::Ready(Err(Error::Io(error))),
            }
        }
    }

    /// Reads what the socket has into the read buffer: the count, 0 at
    /// the end of the stream.
    ///
    /// Through tokio's `AsyncRead`, which takes a read that did not fill
    /// the buffer as the socket drained and forgets its readiness: the
    /// next [`is_reusable`](Self::is_reusable) then knows without a
    /// syscall that nothing came since (a `try_read` would leave the
    /// readiness set, and the check would cost a `recvfrom` per request).
    pub(crate) fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.read.capacity() - self.read.len() < MIN_ROOM {
            self.read.reserve(READ_SIZE);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.stream), cx, &mut self.read)
    }
}
