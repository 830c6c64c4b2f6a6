//! The versioned binary encoding of what the engine stores for a key.
//!
//! Stores keep opaque bytes; this module decides what they mean. The format
//! is small and hand-written so that no serialisation crate is needed and
//! so that a record written by one version of Keel is either read exactly or
//! refused with a clear error by another (never misread):
//!
//! ```text
//! magic "KI" | version u8 (1) | kind u8 | fields...
//! kind 1 (response):      status u16 | request id | header count u16 | (name, value)* | body
//! kind 2 (outcome unknown): request id
//! kind 3 (too large):     status u16 | request id | body length u64
//! strings and byte fields: length u32 (big endian) then the bytes
//! ```
//!
//! ```
//! use keel_idempotency::codec::{Record, StoredResponse};
//!
//! let record = Record::Response(StoredResponse {
//!     status: 201,
//!     request_id: Some("req-1".into()),
//!     headers: vec![("content-type".into(), b"application/json".to_vec())],
//!     body: br#"{"id":1}"#.to_vec(),
//! });
//! let bytes = record.encode();
//! assert_eq!(Record::decode(&bytes).unwrap(), record);
//! assert!(Record::decode(b"garbage").is_err());
//! ```

const MAGIC: &[u8; 2] = b"KI";
const VERSION: u8 = 1;
const KIND_RESPONSE: u8 = 1;
const KIND_UNKNOWN: u8 = 2;
const KIND_TOO_LARGE: u8 = 3;

/// A response kept for replay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredResponse {
    /// The HTTP status code.
    pub status: u16,
    /// The `x-request-id` of the request that executed, if it had one.
    pub request_id: Option<String>,
    /// The allow-listed headers, lower-case names, in order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The body, byte for byte.
    pub body: Vec<u8>,
}

/// What the engine stores as the final outcome of a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// The operation ran and this is its response.
    Response(StoredResponse),
    /// The operation may have run but its result never came back (the
    /// connection was lost after the request was sent, the handler was
    /// cancelled). It must not run again under this key.
    OutcomeUnknown {
        /// The `x-request-id` of the request that executed.
        request_id: Option<String>,
    },
    /// The operation ran; its response was delivered but was too large to
    /// keep.
    TooLarge {
        /// The status the first request got.
        status: u16,
        /// The `x-request-id` of the request that executed.
        request_id: Option<String>,
        /// The size of the body that was not kept.
        body_len: u64,
    },
}

/// A payload that is not a record this version can read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("stored idempotency record is unreadable: {0}")]
pub struct DecodeError(&'static str);

impl Record {
    /// Encodes the record into the store's opaque payload.
    ///
    /// ```
    /// use keel_idempotency::codec::Record;
    /// let bytes = Record::OutcomeUnknown { request_id: None }.encode();
    /// assert_eq!(&bytes[..2], b"KI");
    /// ```
    pub fn encode(&self) -> Vec<u8> {
        if let Record::Response(r) = self {
            return encode_response(
                r.status,
                r.request_id.as_deref(),
                r.headers.iter().map(|(n, v)| (n.as_str(), v.as_slice())),
                &r.body,
            );
        }
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        match self {
            Record::Response(_) => unreachable!("encoded above"),
            Record::OutcomeUnknown { request_id } => {
                out.push(KIND_UNKNOWN);
                put_opt(&mut out, request_id.as_deref());
            }
            Record::TooLarge {
                status,
                request_id,
                body_len,
            } => {
                out.push(KIND_TOO_LARGE);
                out.extend_from_slice(&status.to_be_bytes());
                put_opt(&mut out, request_id.as_deref());
                out.extend_from_slice(&body_len.to_be_bytes());
            }
        }
        out
    }

    /// Decodes a payload written by [`Record::encode`].
    ///
    /// ```
    /// use keel_idempotency::codec::Record;
    /// let r = Record::TooLarge { status: 200, request_id: Some("r".into()), body_len: 9 };
    /// assert_eq!(Record::decode(&r.encode()), Ok(r));
    /// ```
    pub fn decode(bytes: &[u8]) -> Result<Record, DecodeError> {
        let mut r = Reader(bytes);
        if r.take(2)? != MAGIC {
            return Err(DecodeError("not a keel idempotency record"));
        }
        if r.u8()? != VERSION {
            return Err(DecodeError("written by an unknown version of the codec"));
        }
        let record = match r.u8()? {
            KIND_RESPONSE => {
                let status = r.u16()?;
                let request_id = r.opt_string()?;
                let n = r.u16()?;
                let mut headers = Vec::with_capacity(usize::from(n).min(64));
                for _ in 0..n {
                    let name = String::from_utf8(r.field()?.to_vec())
                        .map_err(|_| DecodeError("header name is not UTF-8"))?;
                    headers.push((name, r.field()?.to_vec()));
                }
                let body = r.field()?.to_vec();
                Record::Response(StoredResponse {
                    status,
                    request_id,
                    headers,
                    body,
                })
            }
            KIND_UNKNOWN => Record::OutcomeUnknown {
                request_id: r.opt_string()?,
            },
            KIND_TOO_LARGE => Record::TooLarge {
                status: r.u16()?,
                request_id: r.opt_string()?,
                body_len: r.u64()?,
            },
            _ => return Err(DecodeError("unknown record kind")),
        };
        if !r.0.is_empty() {
            return Err(DecodeError("trailing bytes"));
        }
        Ok(record)
    }
}

/// The encoding of `Record::Response` with these fields, written straight
/// from borrowed parts (the engine's response, its kept headers): the same
/// bytes as [`Record::encode`], without an owned copy of each header and of
/// the body first. At most `u16::MAX` headers are kept.
///
/// ```
/// use keel_idempotency::codec::{encode_response, Record, StoredResponse};
/// let bytes = encode_response(200, Some("r1"), [("etag", b"\"x\"".as_slice())].into_iter(), b"ok");
/// let record = Record::Response(StoredResponse {
///     status: 200,
///     request_id: Some("r1".into()),
///     headers: vec![("etag".into(), b"\"x\"".to_vec())],
///     body: b"ok".to_vec(),
/// });
/// assert_eq!(bytes, record.encode());
/// ```
pub fn encode_response<'h>(
    status: u16,
    request_id: Option<&str>,
    headers: impl Iterator<Item = (&'h str, &'h [u8])> + Clone,
    body: &[u8],
) -> Vec<u8> {
    // The exact length, so a store that keeps the buffer (the memory
    // store) has nothing to trim.
    let fields = |bytes: usize| 4 + bytes.min(u32::MAX as usize);
    let len = 2
        + 1
        + 1
        + 2
        + fields(request_id.map_or(0, str::len))
        + 2
        + headers
            .clone()
            .take(usize::from(u16::MAX))
            .map(|(name, value)| fields(name.len()) + fields(value.len()))
            .sum::<usize>()
        + fields(body.len());
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(KIND_RESPONSE);
    out.extend_from_slice(&status.to_be_bytes());
    put_opt(&mut out, request_id);
    // The count is written once the headers are.
    let count_at = out.len();
    out.extend_from_slice(&[0, 0]);
    let mut n: u16 = 0;
    for (name, value) in headers.take(usize::from(u16::MAX)) {
        put(&mut out, name.as_bytes());
        put(&mut out, value);
        n += 1;
    }
    out[count_at..count_at + 2].copy_from_slice(&n.to_be_bytes());
    put(&mut out, body);
    out
}

fn put(out: &mut Vec<u8>, bytes: &[u8]) {
    // Fields over 4 GiB cannot be produced: the engine caps stored bodies
    // far below that. Truncating keeps the encoding well-formed regardless.
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&bytes[..len as usize]);
}

/// An absent string is written as length `u32::MAX`, which no real field
/// can have.
fn put_opt(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => put(out, s.as_bytes()),
        None => out.extend_from_slice(&u32::MAX.to_be_bytes()),
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError("truncated"));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let mut a = [0; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_be_bytes(a))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        let mut a = [0; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(a))
    }

    fn field(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u32()?;
        if n == u32::MAX {
            return Err(DecodeError("missing field"));
        }
        self.take(n as usize)
    }

    fn opt_string(&mut self) -> Result<Option<String>, DecodeError> {
        let n = self.u32()?;
        if n == u32::MAX {
            return Ok(None);
        }
        let b = self.take(n as usize)?;
        String::from_utf8(b.to_vec())
            .map(Some)
            .map_err(|_| DecodeError("request id is not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_truncation_is_refused() {
        let r = Record::Response(StoredResponse {
            status: 200,
            request_id: Some("id".into()),
            headers: vec![("a".into(), b"b".to_vec())],
            body: b"hello".to_vec(),
        });
        let bytes = r.encode();
        for n in 0..bytes.len() {
            assert!(Record::decode(&bytes[..n]).is_err(), "prefix {n} accepted");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(Record::decode(&longer).is_err());
        assert_eq!(Record::decode(&bytes), Ok(r));
    }
}
