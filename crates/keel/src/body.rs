//! The body type that flows through the gateway in both directions. An enum
//! rather than a boxed trait object: no allocation per request, and the
//! size hint passes through so `Content-Length` survives the hop.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::upstream::Checkin;

/// Boxed error used for bodies, as hyper expects.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The request body went over the route's limit while streaming.
#[derive(Debug, thiserror::Error)]
#[error("request body over the {limit}-byte limit")]
pub struct BodyTooLarge {
    /// The limit in bytes.
    pub limit: u64,
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
    },
    /// An upstream response body whose connection returns to the pool at
    /// the end of the body.
    Pooled {
        /// The upstream's body.
        inner: Incoming,
        /// The connection, until the body has ended.
        checkin: Option<Checkin>,
    },
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
        }
    }

    /// A streamed body that fails with [`BodyTooLarge`] past `limit` bytes.
    pub fn limited(inner: Incoming, limit: u64) -> Self {
        ProxyBody::Stream {
            inner,
            remaining: limit,
            limit,
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
            } => match Pin::new(inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        let len = data.len() as u64;
                        if len > *remaining {
                            *remaining = 0;
                            return Poll::Ready(Some(Err(Box::new(BodyTooLarge {
                                limit: *limit,
                            }))));
                        }
                        *remaining -= len;
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
            ProxyBody::Pooled { inner, checkin } => {
                let polled = Pin::new(&mut *inner).poll_frame(cx);
                match polled {
                    Poll::Ready(None) => {
                        if let Some(c) = checkin.take() {
                            c.release();
                        }
                        Poll::Ready(None)
                    }
                    Poll::Ready(Some(Ok(frame))) => {
                        if inner.is_end_stream()
                            && let Some(c) = checkin.take()
                        {
                            c.release();
                        }
                        Poll::Ready(Some(Ok(frame)))
                    }
                    Poll::Ready(Some(Err(e))) => {
                        // A broken body: the connection is not reusable.
                        checkin.take();
                        Poll::Ready(Some(Err(Box::new(e))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
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
            ProxyBody::Stream { inner, .. } | ProxyBody::Pooled { inner, .. } => {
                inner.is_end_stream()
            }
            ProxyBody::Prefixed { prefix, rest } => prefix.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Empty => SizeHint::with_exact(0),
            ProxyBody::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            ProxyBody::Stream { inner, .. } | ProxyBody::Pooled { inner, .. } => inner.size_hint(),
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
