//! The request head as bytes, and the request body's framing.

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, Method, Uri};

use crate::error::Error;

/// Header lines a caller appends to a request head as they are: values it
/// formatted once (per connection, say), so they never pass through a
/// header map on every request. The parts are written one after the other
/// and together must form complete `name: value\r\n` lines of valid
/// names and values; the caller vouches for that.
///
/// ```
/// let mut extra = keel_h1::ExtraLines::new();
/// assert!(extra.push(b"x-forwarded-proto: http\r\n"));
/// assert_eq!(extra.parts().count(), 1);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct ExtraLines<'a> {
    parts: [&'a [u8]; 6],
    len: usize,
}

impl<'a> ExtraLines<'a> {
    /// No lines.
    pub const fn new() -> Self {
        ExtraLines {
            parts: [&[]; 6],
            len: 0,
        }
    }

    /// Adds a part; false (and nothing added) when six are there already.
    pub fn push(&mut self, part: &'a [u8]) -> bool {
        match self.parts.get_mut(self.len) {
            Some(slot) => {
                *slot = part;
                self.len += 1;
                true
            }
            None => false,
        }
    }

    /// The parts, in order.
    pub fn parts(&self) -> impl Iterator<Item = &'a [u8]> + '_ {
        self.parts[..self.len].iter().copied()
    }
}

/// How the request body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body and no `Content-Length` (a GET, say).
    None,
    /// `Content-Length: n`; the count of bytes still to send.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

impl Framing {
    /// The framing for a body: its exact length when the body knows it
    /// (a proxied body with `Content-Length`, or one the gateway holds),
    /// chunked otherwise. An empty body gets `Content-Length: 0` when the
    /// client sent one or the method defines a body, and nothing else.
    pub(crate) fn of(
        method: &Method,
        headers: &HeaderMap,
        empty: bool,
        exact: Option<u64>,
    ) -> Self {
        if empty {
            if headers.contains_key(CONTENT_LENGTH)
                || matches!(*method, Method::POST | Method::PUT | Method::PATCH)
            {
                Framing::Length(0)
            } else {
                Framing::None
            }
        } else {
            exact.map_or(Framing::Chunked, Framing::Length)
        }
    }

    /// Appends `data` to `out`, framed; errors when it overruns the
    /// declared length.
    pub(crate) fn encode(&mut self, data: &Bytes, out: &mut Vec<u8>) -> Result<(), Error> {
        if data.is_empty() {
            return Ok(());
        }
        match self {
            Framing::None => return Err(Error::Body("a body where none was declared".into())),
            Framing::Length(remaining) => {
                let len = data.len() as u64;
                if len > *remaining {
                    return Err(Error::Body(
                        "the request body is longer than its Content-Length".into(),
                    ));
                }
                *remaining -= len;
            }
            Framing::Chunked => {
                write_hex(out, data.len() as u64);
                out.extend_from_slice(b"\r\n");
            }
        }
        out.extend_from_slice(data);
        if *self == Framing::Chunked {
            out.extend_from_slice(b"\r\n");
        }
        Ok(())
    }

    /// Appends the end of the body; errors when a declared length was not
    /// reached.
    pub(crate) fn finish(&self, out: &mut Vec<u8>) -> Result<(), Error> {
        match self {
            Framing::None | Framing::Length(0) => Ok(()),
            Framing::Length(_) => Err(Error::Body(
                "the request body is shorter than its Content-Length".into(),
            )),
            Framing::Chunked => {
                out.extend_from_slice(b"0\r\n\r\n");
                Ok(())
            }
        }
    }
}

/// Appends the request head: request line in origin form, the headers as
/// they are (names lower case, as `http` keeps them), the `extra` lines,
/// then the framing header the body needs. `Content-Length` and `Transfer-Encoding` from
/// `headers` are left out: the framing written is the one the body is sent
/// with, so the two can never disagree.
pub(crate) fn encode_head(
    out: &mut Vec<u8>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    extra: &ExtraLines<'_>,
    framing: Framing,
) {
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    let target = uri.path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(if target.is_empty() {
        b"/"
    } else {
        target.as_bytes()
    });
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        if name == CONTENT_LENGTH || name == TRANSFER_ENCODING {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    for part in extra.parts() {
        out.extend_from_slice(part);
    }
    match framing {
        Framing::None => {}
        Framing::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            write_decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
}

fn write_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

fn write_hex(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 16];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b"0123456789abcdef"[(n % 16) as usize];
        n /= 16;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn head(method: Method, uri: &str, headers: &[(&str, &str)], framing: Framing) -> String {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).expect("name"),
                HeaderValue::from_str(value).expect("value"),
            );
        }
        let mut extra = ExtraLines::new();
        if method == Method::PATCH {
            assert!(extra.push(b"x-extra: "));
            assert!(extra.push(b"1\r\n"));
        }
        let mut out = Vec::new();
        encode_head(
            &mut out,
            &method,
            &uri.parse().expect("uri"),
            &map,
            &extra,
            framing,
        );
        String::from_utf8(out).expect("ascii")
    }

    #[test]
    fn the_head_carries_the_framing_it_is_sent_with() {
        assert_eq!(
            head(
                Method::GET,
                "/a?b=1",
                &[("host", "x"), ("x-a", "1")],
                Framing::None
            ),
            "GET /a?b=1 HTTP/1.1\r\nhost: x\r\nx-a: 1\r\n\r\n"
        );
        // A stale Content-Length or Transfer-Encoding never reaches the wire
        // next to the framing actually used.
        assert_eq!(
            head(
                Method::POST,
                "/",
                &[("content-length", "99"), ("transfer-encoding", "chunked")],
                Framing::Length(1234567890)
            ),
            "POST / HTTP/1.1\r\ncontent-length: 1234567890\r\n\r\n"
        );
        assert_eq!(
            head(Method::PUT, "/", &[], Framing::Chunked),
            "PUT / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        assert_eq!(
            head(Method::OPTIONS, "*", &[], Framing::None),
            "OPTIONS * HTTP/1.1\r\n\r\n"
        );
    }

    #[test]
    fn extra_lines_hold_six_parts() {
        let mut extra = ExtraLines::new();
        for _ in 0..6 {
            assert!(extra.push(b"a"));
        }
        assert!(!extra.push(b"b"), "full");
        assert_eq!(extra.parts().count(), 6);
    }

    #[test]
    fn framing_follows_the_body() {
        let none = HeaderMap::new();
        let mut with_length = HeaderMap::new();
        with_length.insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
        assert_eq!(
            Framing::of(&Method::GET, &none, true, Some(0)),
            Framing::None
        );
        assert_eq!(
            Framing::of(&Method::GET, &with_length, true, Some(0)),
            Framing::Length(0)
        );
        assert_eq!(
            Framing::of(&Method::POST, &none, true, Some(0)),
            Framing::Length(0)
        );
        assert_eq!(
            Framing::of(&Method::POST, &none, false, Some(5)),
            Framing::Length(5)
        );
        assert_eq!(
            Framing::of(&Method::POST, &none, false, None),
            Framing::Chunked
        );
    }

    #[test]
    fn bodies_are_framed_and_checked_against_their_length() {
        let mut out = Vec::new();
        let mut chunked = Framing::Chunked;
        chunked
            .encode(&Bytes::from_static(b"hello world!!!!!!"), &mut out)
            .expect("chunk");
        chunked
            .encode(&Bytes::new(), &mut out)
            .expect("empty frames are skipped");
        chunked.finish(&mut out).expect("end");
        assert_eq!(out, b"11\r\nhello world!!!!!!\r\n0\r\n\r\n");

        let mut out = Vec::new();
        let mut length = Framing::Length(3);
        length
            .encode(&Bytes::from_static(b"ab"), &mut out)
            .expect("within");
        assert!(length.finish(&mut out).is_err(), "one byte short");
        assert!(
            length.encode(&Bytes::from_static(b"cd"), &mut out).is_err(),
            "one over"
        );
        let mut none = Framing::None;
        assert!(none.encode(&Bytes::from_static(b"x"), &mut out).is_err());
    }

    #[test]
    fn numbers_are_written_in_full() {
        for n in [0, 7, 10, 255, 4096, u64::MAX] {
            let mut out = Vec::new();
            write_decimal(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
            let mut out = Vec::new();
            write_hex(&mut out, n);
            assert_eq!(out, format!("{n:x}").as_bytes());
        }
    }
}
