//! The response body, decoded from the connection it arrives on; the
//! connection goes back to its pool the moment the body has ended.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};

use crate::conn::{Connection, Pool};
use crate::error::{BoxError, Error};
use crate::response::BodyFraming;

/// The longest chunk size line (with extensions) or trailer line accepted.
const MAX_LINE: usize = 4096;
/// The most trailer bytes accepted (they are read and dropped).
const MAX_TRAILERS: usize = 16 * 1024;

/// A response body from an upstream.
///
/// A body that was already in the read buffer with its head is held as
/// bytes and its connection is back in the pool before the body is even
/// polled; a longer one is read from the connection as it is polled.
/// Dropping a body that has not ended closes its connection.
///
/// ```
/// use http_body::Body;
///
/// let body = keel_h1::ResponseBody::empty();
/// assert!(body.is_end_stream());
/// ```
#[derive(Debug)]
pub struct ResponseBody(Inner);

#[derive(Debug)]
enum Inner {
    Done,
    Full(Bytes),
    Streaming(Box<Streaming>),
}

#[derive(Debug)]
struct Streaming {
    connection: Box<Connection>,
    decoder: Decoder,
    keep_alive: bool,
    pool: Arc<dyn Pool>,
}

/// What one poll of a streaming body came to.
enum Step {
    /// Data, and whether the body ended with it.
    Data(Bytes, bool),
    End,
    Failed(Error),
}

impl Streaming {
    fn poll_step(&mut self, cx: &mut Context<'_>) -> Poll<Step> {
        loop {
            let read = &mut self.connection.read;
            match self.decoder.decode(read) {
                // Ended with this frame (the rest already buffered): the
                // connection goes back now, not a poll later.
                Ok(Decoded::Data(bytes)) => {
                    return Poll::Ready(match self.decoder.settle(read) {
                        Ok(ended) => Step::Data(bytes, ended),
                        Err(error) => Step::Failed(error),
                    });
                }
                Ok(Decoded::End) => return Poll::Ready(Step::End),
                Ok(Decoded::NeedMore) => {}
                Err(error) => return Poll::Ready(Step::Failed(error)),
            }
            match ready!(self.connection.poll_fill(cx)) {
                Ok(0) if self.decoder == Decoder::UntilClose => {
                    self.keep_alive = false;
                    return Poll::Ready(Step::End);
                }
                Ok(0) => return Poll::Ready(Step::Failed(Error::Closed)),
                Ok(_) => {}
                Err(error) => return Poll::Ready(Step::Failed(Error::Io(error))),
            }
        }
    }
}

impl ResponseBody {
    /// A body with nothing in it.
    pub fn empty() -> Self {
        ResponseBody(Inner::Done)
    }

    pub(crate) fn full(bytes: Bytes) -> Self {
        ResponseBody(if bytes.is_empty() {
            Inner::Done
        } else {
            Inner::Full(bytes)
        })
    }

    pub(crate) fn streaming(
        connection: Box<Connection>,
        framing: BodyFraming,
        keep_alive: bool,
        pool: &Arc<dyn Pool>,
    ) -> Self {
        let decoder = match framing {
            BodyFraming::Empty | BodyFraming::Length(0) => Decoder::Length(0),
            BodyFraming::Length(n) => Decoder::Length(n),
            BodyFraming::Chunked => Decoder::Chunked(Chunked::Size, 0),
            BodyFraming::UntilClose => Decoder::UntilClose,
        };
        ResponseBody(Inner::Streaming(Box::new(Streaming {
            connection,
            decoder,
            keep_alive,
            pool: pool.clone(),
        })))
    }

    /// Ends the body: its connection goes back to the pool when the
    /// exchange left it clean (persistent, nothing unread), else closes.
    fn finish(&mut self) {
        if let Inner::Streaming(streaming) = std::mem::replace(&mut self.0, Inner::Done) {
            let Streaming {
                connection,
                keep_alive,
                pool,
                ..
            } = *streaming;
            if keep_alive && connection.read.is_empty() {
                pool.checkin(connection);
            }
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let step = match &mut this.0 {
            Inner::Done => return Poll::Ready(None),
            Inner::Full(_) => {
                let Inner::Full(bytes) = std::mem::replace(&mut this.0, Inner::Done) else {
                    return Poll::Ready(None);
                };
                return Poll::Ready(Some(Ok(Frame::data(bytes))));
            }
            Inner::Streaming(streaming) => ready!(streaming.poll_step(cx)),
        };
        Poll::Ready(match step {
            Step::Data(bytes, ended) => {
                if ended {
                    this.finish();
                }
                Some(Ok(Frame::data(bytes)))
            }
            Step::End => {
                this.finish();
                None
            }
            Step::Failed(error) => {
                // A broken body: its connection is not reusable.
                this.0 = Inner::Done;
                Some(Err(error.into()))
            }
        })
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.0, Inner::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Inner::Done => SizeHint::with_exact(0),
            Inner::Full(bytes) => SizeHint::with_exact(bytes.len() as u64),
            Inner::Streaming(streaming) => match streaming.decoder {
                Decoder::Length(n) => SizeHint::with_exact(n),
                _ => SizeHint::new(),
            },
        }
    }
}

/// What one decoding step found.
#[derive(Debug, PartialEq, Eq)]
enum Decoded {
    Data(Bytes),
    End,
    NeedMore,
}

/// The body's framing and how far into it the reader is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decoder {
    /// Bytes left.
    Length(u64),
    /// Where in the chunked coding, and trailer bytes seen.
    Chunked(Chunked, usize),
    UntilClose,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunked {
    /// Expecting a chunk size line.
    Size,
    /// Inside a chunk: bytes left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one.
    Trailers,
    Ended,
}

impl Decoder {
    /// The next data in `read`, the end, or the need for more bytes.
    fn decode(&mut self, read: &mut BytesMut) -> Result<Decoded, Error> {
        if self.settle(read)? {
            return Ok(Decoded::End);
        }
        let remaining = match self {
            Decoder::Length(n) | Decoder::Chunked(Chunked::Data(n), _) => n,
            Decoder::UntilClose => {
                return Ok(if read.is_empty() {
                    Decoded::NeedMore
                } else {
                    Decoded::Data(read.split().freeze())
                });
            }
            Decoder::Chunked(..) => return Ok(Decoded::NeedMore),
        };
        if read.is_empty() {
            return Ok(Decoded::NeedMore);
        }
        let take = usize::try_from(*remaining)
            .unwrap_or(usize::MAX)
            .min(read.len());
        *remaining -= take as u64;
        if let Decoder::Chunked(state @ Chunked::Data(0), _) = self {
            *state = Chunked::DataEnd;
        }
        Ok(Decoded::Data(read.split_to(take).freeze()))
    }

    /// Consumes the framing that `read` holds up to the next data or the
    /// end; true once the body has ended.
    fn settle(&mut self, read: &mut BytesMut) -> Result<bool, Error> {
        let (state, trailers) = match self {
            Decoder::Length(n) => return Ok(*n == 0),
            Decoder::UntilClose => return Ok(false),
            Decoder::Chunked(state, trailers) => (state, trailers),
        };
        loop {
            match *state {
                Chunked::Data(_) => return Ok(false),
                Chunked::Ended => return Ok(true),
                Chunked::DataEnd => {
                    if read.len() < 2 {
                        return Ok(false);
                    }
                    if &read[..2] != b"\r\n" {
                        return Err(Error::Invalid("chunk data not followed by CRLF"));
                    }
                    read.advance(2);
                    *state = Chunked::Size;
                }
                Chunked::Size => {
                    let Some(end) = line(read)? else {
                        return Ok(false);
                    };
                    let size = chunk_size(&read[..end])?;
                    read.advance(end + 2);
                    *state = if size == 0 {
                        Chunked::Trailers
                    } else {
                        Chunked::Data(size)
                    };
                }
                Chunked::Trailers => {
                    let Some(end) = line(read)? else {
                        return Ok(false);
                    };
                    read.advance(end + 2);
                    if end == 0 {
                        *state = Chunked::Ended;
                    } else {
                        *trailers += end;
                        if *trailers > MAX_TRAILERS {
                            return Err(Error::Invalid("response trailers over 16 KiB"));
                        }
                    }
                }
            }
        }
    }
}

/// The length of the CRLF-terminated line at the front of `read`, without
/// the CRLF; `None` while incomplete.
fn line(read: &BytesMut) -> Result<Option<usize>, Error> {
    let window = &read[..read.len().min(MAX_LINE + 2)];
    match window.iter().position(|b| *b == b'\n') {
        Some(0) => Err(Error::Invalid("bare LF in chunked coding")),
        Some(lf) if window[lf - 1] == b'\r' => Ok(Some(lf - 1)),
        Some(_) => Err(Error::Invalid("bare LF in chunked coding")),
        None if read.len() > MAX_LINE => Err(Error::Invalid("chunk line over 4 KiB")),
        None => Ok(None),
    }
}

/// A chunk size line: hex digits, then optional whitespace and extensions
/// (ignored).
fn chunk_size(line: &[u8]) -> Result<u64, Error> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return Err(Error::Invalid("malformed chunk size"));
    }
    let rest = line[digits..].trim_ascii_start();
    if !(rest.is_empty() || rest[0] == b';')
        || rest.iter().any(|b| b.is_ascii_control() && *b != b'\t')
    {
        return Err(Error::Invalid("malformed chunk size"));
    }
    Ok(line[..digits].iter().fold(0u64, |n, digit| {
        let value = match digit {
            b'0'..=b'9' => digit - b'0',
            b'a'..=b'f' => digit - b'a' + 10,
            _ => digit - b'A' + 10,
        };
        (n << 4) | u64::from(value)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `wire` fed in pieces of `step` bytes; the data, and whether
    /// the end was reached with nothing left over.
    fn decode_all(
        mut decoder: Decoder,
        wire: &[u8],
        step: usize,
    ) -> Result<(Vec<u8>, bool), Error> {
        let mut read = BytesMut::new();
        let mut data = Vec::new();
        let mut fed = 0;
        loop {
            match decoder.decode(&mut read)? {
                Decoded::Data(bytes) => data.extend_from_slice(&bytes),
                Decoded::End => return Ok((data, read.is_empty() && fed == wire.len())),
                Decoded::NeedMore if fed == wire.len() => return Ok((data, false)),
                Decoded::NeedMore => {
                    let next = (fed + step).min(wire.len());
                    read.extend_from_slice(&wire[fed..next]);
                    fed = next;
                }
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_reads() {
        let wire =
            b"5\r\nhello\r\n1;ext=\"x\"\r\n \r\nA \r\n0123456789\r\n0\r\nx-trailer: 1\r\n\r\n";
        for step in [1, 2, 3, 7, wire.len()] {
            let (data, clean) =
                decode_all(Decoder::Chunked(Chunked::Size, 0), wire, step).expect("valid");
            assert_eq!(data, b"hello 0123456789", "step {step}");
            assert!(clean, "step {step}");
        }
    }

    #[test]
    fn malformed_chunked_bodies_are_errors() {
        for bad in [
            &b"x\r\nhello\r\n0\r\n\r\n"[..],
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b"-5\r\nhello\r\n0\r\n\r\n",
            b"5 x\r\nhello\r\n0\r\n\r\n",
            b"11111111111111111\r\n",
            b"0\r\nbad trailer\n\r\n",
        ] {
            assert!(
                decode_all(Decoder::Chunked(Chunked::Size, 0), bad, 1).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = [b"5;".as_slice(), &[b'a'; MAX_LINE], b"\r\n"].concat();
        assert!(decode_all(Decoder::Chunked(Chunked::Size, 0), &long, 64).is_err());
        let trailers = [
            b"0\r\n".as_slice(),
            &b"x: yyyyyyyyyyyyyyyyyyyy\r\n".repeat(1000),
            b"\r\n",
        ]
        .concat();
        assert!(decode_all(Decoder::Chunked(Chunked::Size, 0), &trailers, 512).is_err());
    }

    #[test]
    fn a_cut_chunked_body_never_ends() {
        let (data, ended) =
            decode_all(Decoder::Chunked(Chunked::Size, 0), b"5\r\nhel", 2).expect("valid so far");
        assert_eq!(data, b"hel");
        assert!(!ended);
    }

    #[test]
    fn length_bodies_stop_at_their_length() {
        let (data, _) = decode_all(Decoder::Length(5), b"helloEXTRA", 3).expect("valid");
        assert_eq!(data, b"hello");
        let (data, clean) = decode_all(Decoder::Length(5), b"hello", 2).expect("valid");
        assert_eq!((data.as_slice(), clean), (&b"hello"[..], true));
    }

    proptest::proptest! {
        /// Whatever bytes an upstream sends as a chunked body, decoding
        /// ends in data, an end, a wait for more or an error: never a
        /// panic.
        #[test]
        fn any_bytes_decode_without_panic(
            wire in proptest::collection::vec(proptest::num::u8::ANY, 0..512),
            step in 1usize..64,
        ) {
            let _ = decode_all(Decoder::Chunked(Chunked::Size, 0), &wire, step);
            let _ = decode_all(Decoder::Length(wire.len() as u64 / 2), &wire, step);
        }

        /// Any body, chunked any way and read in any pieces, comes out whole.
        #[test]
        fn chunked_round_trip(body in proptest::collection::vec(proptest::num::u8::ANY, 0..600),
                              cuts in proptest::collection::vec(1usize..50, 1..20),
                              step in 1usize..40) {
            let mut wire = Vec::new();
            let mut framing = crate::request::Framing::Chunked;
            let mut at = 0;
            for cut in cuts.iter().cycle() {
                if at >= body.len() { break; }
                let end = (at + cut).min(body.len());
                framing.encode(&Bytes::copy_from_slice(&body[at..end]), &mut wire).expect("encode");
                at = end;
            }
            framing.finish(&mut wire).expect("finish");
            let (data, clean) = decode_all(Decoder::Chunked(Chunked::Size, 0), &wire, step).expect("valid");
            proptest::prop_assert_eq!(data, body);
            proptest::prop_assert!(clean);
        }
    }
}
