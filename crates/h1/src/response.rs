//! The response head: parsed with `httparse` from the connection's read
//! buffer into `http` types that share the buffer's bytes, and the body
//! framing it declares (RFC 9112 section 6.3).

use std::mem::MaybeUninit;

use bytes::BytesMut;
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Version};

use crate::error::Error;

/// The most response headers accepted (hyper's limit too).
pub const MAX_HEADERS: usize = 100;

/// The largest response head accepted, in bytes (nginx's default buffer
/// for it is 4 or 8 KiB; a head over this is an upstream's bug).
pub const MAX_HEAD_SIZE: usize = 64 * 1024;

/// A parsed response head.
#[derive(Debug)]
pub(crate) struct Head {
    pub(crate) status: StatusCode,
    pub(crate) version: Version,
    pub(crate) headers: HeaderMap,
    /// What the framing headers said, noted while the map was built (no
    /// lookups in it afterwards).
    said: Said,
}

/// The framing and persistence headers of a response, as seen in one
/// pass over its headers.
#[derive(Debug, Default)]
struct Said {
    /// `Content-Length`: `Some(Ok(n))` when all values agree on n.
    content_length: Option<Result<u64, Error>>,
    /// `Transfer-Encoding` is present.
    transfer_encoding: bool,
    /// The last coding of the last `Transfer-Encoding` is `chunked`.
    chunked_last: bool,
    /// `Connection: close`.
    close: bool,
    /// `Connection: keep-alive`.
    keep_alive: bool,
}

impl Said {
    fn note(&mut self, name: &HeaderName, value: &[u8]) {
        if name == CONTENT_LENGTH {
            self.content_length = Some(match self.content_length.take() {
                None => content_length(value, None),
                Some(Ok(seen)) => content_length(value, Some(seen)),
                Some(Err(error)) => Err(error),
            });
        } else if name == TRANSFER_ENCODING {
            self.transfer_encoding = true;
            self.chunked_last = value
                .rsplit(|b| *b == b',')
                .next()
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name == CONNECTION {
            for token in value.split(|b| *b == b',') {
                let token = token.trim_ascii();
                self.close |= token.eq_ignore_ascii_case(b"close");
                self.keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        }
    }
}

/// How the response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyFraming {
    /// No body (HEAD, 204, 304).
    Empty,
    /// `Content-Length`.
    Length(u64),
    /// `Transfer-Encoding` ending in `chunked`.
    Chunked,
    /// Until the upstream closes the connection.
    UntilClose,
}

/// Where one header's name and value sit in the read buffer: name start,
/// name end, value start, value end.
pub(crate) type Span = [u32; 4];

/// Room left in a response's header map for what the gateway adds on the
/// way back (a request id, `Via`), so adding them does not regrow it.
const ROOM_FOR_OWN_HEADERS: usize = 4;

/// Parses a complete head from the front of `read` and removes it from
/// there; `None` while the head is incomplete. `spans` is scratch space
/// kept by the connection (cleared here), so that parsing writes and
/// allocates nothing per response beyond the header map.
pub(crate) fn parse_head(
    read: &mut BytesMut,
    spans: &mut Vec<Span>,
) -> Result<Option<Head>, Error> {
    // Uninitialised slots: a response has a handful of headers, and
    // initialising all of them would cost more than parsing them.
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let base = read.as_ptr() as usize;
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        read,
        &mut slots,
    );
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if read.len() > MAX_HEAD_SIZE => {
            return Err(Error::Invalid("response head over 64 KiB"));
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Error::Invalid("more than 100 response headers"));
        }
        Err(_) => return Err(Error::Invalid("malformed response head")),
    };
    if len > MAX_HEAD_SIZE {
        return Err(Error::Invalid("response head over 64 KiB"));
    }
    let status = response
        .code
        .and_then(|code| StatusCode::from_u16(code).ok())
        .ok_or(Error::Invalid("malformed status code"))?;
    let version = match response.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    // Where each name and value sits in the buffer, so that the values can
    // share the buffer's bytes once it is split off (no copy per value).
    // Offsets fit in u32: the head is at most 64 KiB.
    spans.clear();
    spans.extend(response.headers.iter().map(|header| {
        let name = (header.name.as_ptr() as usize - base) as u32;
        let value = (header.value.as_ptr() as usize - base) as u32;
        [
            name,
            name + header.name.len() as u32,
            value,
            value + header.value.len() as u32,
        ]
    }));
    let head = read.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(spans.len() + ROOM_FOR_OWN_HEADERS);
    let mut said = Said::default();
    for &[name_start, name_end, value_start, value_end] in spans.iter() {
        let name = HeaderName::from_bytes(&head[name_start as usize..name_end as usize])
            .map_err(|_| Error::Invalid("malformed header name"))?;
        let value =
            HeaderValue::from_maybe_shared(head.slice(value_start as usize..value_end as usize))
                .map_err(|_| Error::Invalid("malformed header value"))?;
        said.note(&name, value.as_bytes());
        headers.append(name, value);
    }
    Ok(Some(Head {
        status,
        version,
        headers,
        said,
    }))
}

impl Head {
    /// Whether the connection can carry another exchange after this one
    /// (persistence, RFC 9112 section 9.3).
    pub(crate) fn keep_alive(&self) -> bool {
        !self.said.close && (self.version == Version::HTTP_11 || self.said.keep_alive)
    }

    /// The body's framing, and whether the connection stays reusable after
    /// it. A response framed by both `Transfer-Encoding` and
    /// `Content-Length` is read as chunked, loses its `Content-Length`
    /// (a recipient must not pass both on) and closes its connection.
    pub(crate) fn framing(&mut self, request_was_head: bool) -> Result<(BodyFraming, bool), Error> {
        let keep_alive = self.keep_alive();
        let status = self.status.as_u16();
        if request_was_head || status == 204 || status == 304 || (100..200).contains(&status) {
            return Ok((BodyFraming::Empty, keep_alive));
        }
        if self.said.transfer_encoding {
            if self.version == Version::HTTP_10 {
                return Err(Error::Invalid("Transfer-Encoding in an HTTP/1.0 response"));
            }
            let both = self.said.content_length.is_some();
            if both {
                self.headers.remove(CONTENT_LENGTH);
            }
            return Ok(if self.said.chunked_last {
                (BodyFraming::Chunked, keep_alive && !both)
            } else {
                (BodyFraming::UntilClose, false)
            });
        }
        match self.said.content_length.take() {
            Some(length) => Ok((BodyFraming::Length(length?), keep_alive)),
            None => Ok((BodyFraming::UntilClose, false)),
        }
    }
}

/// The length one `Content-Length` value gives, which must agree with the
/// one `seen` before (a list of equal values is allowed, RFC 9110 section
/// 8.6); anything else is an error.
fn content_length(value: &[u8], mut seen: Option<u64>) -> Result<u64, Error> {
    for part in value.split(|b| *b == b',') {
        let part = part.trim_ascii();
        if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
            return Err(Error::Invalid("malformed Content-Length"));
        }
        let n = part
            .iter()
            .fold(0u64, |n, digit| n * 10 + u64::from(digit - b'0'));
        match seen {
            Some(before) if before != n => {
                return Err(Error::Invalid("conflicting Content-Length values"));
            }
            _ => seen = Some(n),
        }
    }
    seen.ok_or(Error::Invalid("malformed Content-Length"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Option<Head>, Error> {
        parse_head(&mut BytesMut::from(text), &mut Vec::new())
    }

    fn framing(text: &str, head_request: bool) -> Result<(BodyFraming, bool), Error> {
        parse(text)?.expect("complete").framing(head_request)
    }

    #[test]
    fn a_head_is_parsed_and_split_off() {
        let mut read =
            BytesMut::from("HTTP/1.1 200 OK\r\nX-A: 1\r\nx-a: 2\r\nContent-Length: 3\r\n\r\nabc");
        let head = parse_head(&mut read, &mut Vec::new())
            .expect("valid")
            .expect("complete");
        assert_eq!(head.status, StatusCode::OK);
        assert_eq!(head.version, Version::HTTP_11);
        let values: Vec<_> = head.headers.get_all("x-a").iter().collect();
        assert_eq!(values, ["1", "2"]);
        assert_eq!(&read[..], b"abc", "the body stays in the buffer");
        assert!(
            parse("HTTP/1.1 200 OK\r\nX-A: 1\r\n")
                .expect("valid")
                .is_none()
        );
    }

    #[test]
    fn malformed_heads_are_errors() {
        for bad in [
            "HTTP/1.1 2000 OK\r\n\r\n",
            "HTTP/2 200 OK\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX A: 1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX-A : 1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX-A: a\0b\r\n\r\n",
            "garbage\r\n\r\n",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        let many = format!("HTTP/1.1 200 OK\r\n{}\r\n", "a: b\r\n".repeat(101));
        assert!(matches!(parse(&many), Err(Error::Invalid(_))));
        let huge = format!("HTTP/1.1 200 OK\r\na: {}", "b".repeat(MAX_HEAD_SIZE));
        assert!(
            matches!(parse(&huge), Err(Error::Invalid(_))),
            "an endless head is cut off"
        );
    }

    proptest::proptest! {
        /// Whatever an upstream sends, parsing its head and reading its
        /// framing end in a head, a wait for more, or an error: never a
        /// panic, and a complete head always leaves the rest in the buffer.
        #[test]
        fn any_bytes_parse_without_panic(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512),
            head_request in proptest::bool::ANY,
        ) {
            let mut read = BytesMut::from(&bytes[..]);
            if let Ok(Some(mut head)) = parse_head(&mut read, &mut Vec::new()) {
                proptest::prop_assert!(read.len() < bytes.len());
                let _ = head.framing(head_request);
            }
        }

        /// Heads made of valid pieces parse, whatever their headers.
        #[test]
        fn valid_heads_parse(
            status in 200u16..600,
            headers in proptest::collection::vec(("[a-z][a-z0-9-]{0,12}", "[ -~]{0,20}"), 0..20),
        ) {
            let mut text = format!("HTTP/1.1 {status} X\r\n");
            for (name, value) in &headers {
                text.push_str(&format!("{name}: {value}\r\n"));
            }
            text.push_str("\r\n");
            let head = parse_head(&mut BytesMut::from(text.as_str()), &mut Vec::new());
            let head = head.expect("valid").expect("complete");
            proptest::prop_assert_eq!(head.status.as_u16(), status);
            proptest::prop_assert_eq!(head.headers.len(), headers.len());
        }
    }

    #[test]
    fn framing_follows_rfc_9112() {
        use BodyFraming::*;
        let ok = |t| framing(t, false).expect("valid");
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"),
            (Length(5), true)
        );
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n"),
            (Length(5), true)
        );
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
            (Chunked, true)
        );
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, Chunked\r\n\r\n"),
            (Chunked, true)
        );
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"),
            (UntilClose, false)
        );
        assert_eq!(ok("HTTP/1.1 200 OK\r\n\r\n"), (UntilClose, false));
        assert_eq!(
            ok("HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n"),
            (Empty, true)
        );
        assert_eq!(ok("HTTP/1.1 304 Not Modified\r\n\r\n"), (Empty, true));
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", true).expect("ok"),
            (Empty, true)
        );
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n"),
            (Length(1), false)
        );
        assert_eq!(
            ok("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n"),
            (Length(1), false)
        );
        assert_eq!(
            ok("HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 1\r\n\r\n"),
            (Length(1), true)
        );

        // Both: chunked wins, Content-Length goes, the connection closes after.
        let mut head =
            parse("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n")
                .expect("valid")
                .expect("complete");
        assert_eq!(head.framing(false).expect("valid"), (Chunked, false));
        assert!(!head.headers.contains_key(CONTENT_LENGTH));

        for bad in [
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 0x5\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
            "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert!(framing(bad, false).is_err(), "{bad:?}");
        }
    }
}
