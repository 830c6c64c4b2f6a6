//! Proxy header semantics: hop-by-hop removal (RFC 9110 section 7.6.1),
//! `X-Forwarded-*`, `Via`, request ids, and the checks on the request head
//! the gateway makes itself before routing: the host (`Host` and
//! `:authority`, RFC 9112 section 3.2, RFC 9113 section 8.3.1) and the
//! transfer coding (RFC 9112 section 6.1).
//!
//! Everything here is a pure function of an `http` head, with no other
//! dependency on the gateway, so the fuzz target in `fuzz/` compiles this
//! file as a dependency, so keep it free of other keel crates.

use std::cell::RefCell;
use std::io::Write;
use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Uri, Version};

/// `x-request-id`.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Headers that describe one hop and never cross the proxy.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers, including every name listed in `Connection`.
/// With `keep_upgrade`, `Connection: upgrade` and `Upgrade` are put back so a
/// protocol switch can pass end to end.
pub fn remove_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most messages carry none: one pass over the names, comparing without
    // hashing, spares nine hashed removals. (A name listed in Connection
    // needs a Connection header, itself hop-by-hop.)
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    // Names listed in Connection are only known at run time; collect them
    // first (rare, so the Vec is usually never allocated).
    let mut listed: Vec<HeaderName> = Vec::new();
    for value in headers.get_all(header::CONNECTION) {
        if let Ok(text) = value.to_str() {
            for token in text.split(',') {
                let token = token.trim();
                if token.is_empty()
                    || token.eq_ignore_ascii_case("close")
                    || token.eq_ignore_ascii_case("keep-alive")
                    || token.eq_ignore_ascii_case("upgrade")
                {
                    continue;
                }
                if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                    listed.push(name);
                }
            }
        }
    }
    for name in listed {
        headers.remove(name);
    }
    let upgrade = if keep_upgrade {
        headers.remove(header::UPGRADE)
    } else {
        None
    };
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    if let Some(protocol) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, protocol);
    }
}

/// True when the request asks to switch protocols (`Connection: upgrade` + `Upgrade`).
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

/// Appends `value` to a comma-separated header, creating it when absent.
fn append_list(
    headers: &mut HeaderMap,
    name: HeaderName,
    value: &[u8],
    alone: impl FnOnce() -> Option<HeaderValue>,
) {
    let value = match headers.get(&name) {
        Some(existing) if !existing.is_empty() => {
            let mut joined = Vec::with_capacity(existing.len() + 2 + value.len());
            joined.extend_from_slice(existing.as_bytes());
            joined.extend_from_slice(b", ");
            joined.extend_from_slice(value);
            HeaderValue::from_maybe_shared(bytes::Bytes::from(joined)).ok()
        }
        // The common first hop: a shared or static value where there is
        // one, else one copy of the bytes.
        _ => alone().or_else(|| HeaderValue::from_bytes(value).ok()),
    };
    if let Some(value) = value {
        headers.insert(name, value);
    }
}

/// A client's address as `X-Forwarded-For` writes it: formatted once per
/// connection, then shared by every request on it (a clone is a reference
/// count, not a copy). It also holds the first hop's forwarded header lines
/// as bytes ([`first_hop_lines`](Self::first_hop_lines)), for a request
/// that carries no `X-Forwarded-*` of its own: those are written as they
/// are, never through the request's header map.
///
/// ```
/// use keel_http::headers::ForwardedFor;
///
/// let client = ForwardedFor::new("10.1.2.3".parse().unwrap());
/// assert_eq!(client.value(), "10.1.2.3");
/// assert_eq!(
///     client.first_hop_lines(),
///     b"x-forwarded-for: 10.1.2.3\r\nx-forwarded-proto: http\r\nx-forwarded-host: "
/// );
/// ```
#[derive(Debug, Clone)]
pub struct ForwardedFor {
    value: HeaderValue,
    lines: bytes::Bytes,
}

impl ForwardedFor {
    /// The address `client`, formatted, for a client that speaks `http`.
    pub fn new(client: IpAddr) -> Self {
        Self::with_proto(client, "http")
    }

    /// The address `client`, formatted, for a client that used `proto`
    /// (`http` or `https`).
    pub fn with_proto(client: IpAddr, proto: &'static str) -> Self {
        const FOR: &[u8] = b"x-forwarded-for: ";
        // The address is written on the stack first: at most 45 bytes (an
        // IPv4-mapped IPv6 address).
        let mut buf = [0u8; 48];
        let mut cursor = std::io::Cursor::new(&mut buf[..]);
        let _ = write!(cursor, "{client}");
        let n = usize::try_from(cursor.position()).unwrap_or(0);
        let mut lines = Vec::with_capacity(96);
        lines.extend_from_slice(FOR);
        lines.extend_from_slice(&buf[..n]);
        lines.extend_from_slice(b"\r\nx-forwarded-proto: ");
        lines.extend_from_slice(proto.as_bytes());
        lines.extend_from_slice(b"\r\nx-forwarded-host: ");
        let lines = bytes::Bytes::from(lines);
        // An address is digits, dots, colons and hex: always a valid value.
        let value = HeaderValue::from_maybe_shared(lines.slice(FOR.len()..FOR.len() + n))
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        ForwardedFor { value, lines }
    }

    /// The formatted address.
    pub fn value(&self) -> &HeaderValue {
        &self.value
    }

    /// `X-Forwarded-For` and `-Proto` as complete header lines, then the
    /// start of `X-Forwarded-Host`: the host and a CRLF complete it.
    pub fn first_hop_lines(&self) -> &[u8] {
        &self.lines
    }
}

/// True when the request carries any `X-Forwarded-*` header of its own (a
/// hop before this one): this hop's values are then appended to them.
/// One pass over the names, no hashing.
pub fn has_forwarded(headers: &HeaderMap) -> bool {
    headers.keys().any(|name| {
        name == X_FORWARDED_FOR || name == X_FORWARDED_PROTO || name == X_FORWARDED_HOST
    })
}

/// Appends this hop to `X-Forwarded-For`, `-Proto` and `-Host`.
pub fn append_forwarded(
    headers: &mut HeaderMap,
    client: &ForwardedFor,
    proto: &'static str,
    host: Option<&str>,
) {
    append_list(headers, X_FORWARDED_FOR, client.value.as_bytes(), || {
        Some(client.value.clone())
    });
    append_list(headers, X_FORWARDED_PROTO, proto.as_bytes(), || {
        Some(HeaderValue::from_static(proto))
    });
    if let Some(host) = host {
        // Usually the request's own Host value: shared, not copied.
        let shared = headers
            .get(header::HOST)
            .filter(|v| v.as_bytes() == host.as_bytes())
            .cloned();
        append_list(headers, X_FORWARDED_HOST, host.as_bytes(), || shared);
    }
}

/// Appends this hop to `Via`.
pub fn append_via(headers: &mut HeaderMap, version: http::Version) {
    let protocol = match version {
        http::Version::HTTP_2 => "2 keel",
        http::Version::HTTP_10 => "1.0 keel",
        _ => "1.1 keel",
    };
    append_list(headers, header::VIA, protocol.as_bytes(), || {
        Some(HeaderValue::from_static(protocol))
    });
}

/// Size of a request head as it was on the wire, near enough to enforce a limit.
pub fn head_size(uri: &http::Uri, headers: &HeaderMap) -> usize {
    let mut size = uri.path_and_query().map_or(1, |p| p.as_str().len()) + 16;
    for (name, value) in headers {
        size += name.as_str().len() + value.len() + 4;
    }
    size
}

/// Why a request's host cannot be used; each is a 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostError {
    /// No `Host` where one is required: an HTTP/1.1 request, or an HTTP/2
    /// request without `:authority`.
    Missing,
    /// More than one `Host` field line.
    Repeated,
    /// A `Host` or `:authority` that is not `uri-host [ ":" port ]` with a
    /// non-empty host (an `http` URI never has an empty host, RFC 9110
    /// section 4.2.1), or that carries userinfo.
    Invalid,
    /// HTTP/2: `:authority` and `Host` name different hosts.
    Conflict,
}

impl HostError {
    /// A detail line for the client.
    pub fn detail(self) -> &'static str {
        match self {
            HostError::Missing => "an HTTP/1.1 request needs a Host header",
            HostError::Repeated => "the request has more than one Host header",
            HostError::Invalid => "the Host header or :authority is not a valid host[:port]",
            HostError::Conflict => "the Host header and :authority name different hosts",
        }
    }
}

/// The host a request is for, checked as RFC 9112 section 3.2 and RFC 9113
/// section 8.3.1 say; the gateway routes on it and the upstream gets it as
/// `Host`, so both read the same one.
///
/// - Any version: at most one `Host`, and a `Host` or authority present
///   must be a valid `uri-host [ ":" port ]`.
/// - HTTP/1.1: exactly one `Host`; with an absolute-form target the
///   target's authority is the host (section 3.2.2: `Host` is ignored).
/// - HTTP/2 (and 3): `:authority` takes precedence; with both, they must
///   name the same host after normalisation (case, default port), else
///   [`HostError::Conflict`]; with neither, [`HostError::Missing`].
/// - HTTP/1.0: `Host` is optional; `""` when there is none.
pub fn request_host<'a>(
    version: Version,
    uri: &'a Uri,
    headers: &'a HeaderMap,
) -> Result<&'a str, HostError> {
    let mut values = headers.get_all(header::HOST).iter();
    let host = match (values.next(), values.next()) {
        (Some(_), Some(_)) => return Err(HostError::Repeated),
        (Some(value), None) => Some(valid_host(value.as_bytes())?),
        (None, _) => None,
    };
    let authority = match uri.authority() {
        Some(authority) => Some(valid_host(authority.as_str().as_bytes())?),
        None => None,
    };
    if version == Version::HTTP_2 || version == Version::HTTP_3 {
        return match (authority, host) {
            (Some(authority), Some(host)) => {
                let default_port = match uri.scheme_str() {
                    Some(s) if s.eq_ignore_ascii_case("https") => 443,
                    _ => 80,
                };
                if same_host(authority, host, default_port) {
                    Ok(authority)
                } else {
                    Err(HostError::Conflict)
                }
            }
            (Some(one), None) | (None, Some(one)) => Ok(one),
            (None, None) => Err(HostError::Missing),
        };
    }
    if version == Version::HTTP_11 {
        let host = host.ok_or(HostError::Missing)?;
        return Ok(authority.unwrap_or(host));
    }
    Ok(authority.or(host).unwrap_or(""))
}

/// `value` as text when it is `uri-host [ ":" port ]` (RFC 3986 section
/// 3.2.2) with a non-empty host and a port of at most 65535.
fn valid_host(value: &[u8]) -> Result<&str, HostError> {
    let (host_ok, port) = if value.first() == Some(&b'[') {
        let (host, port) = split_host_port(value).ok_or(HostError::Invalid)?;
        (valid_ip_literal(host), port)
    } else {
        // One pass: the reg-name ends at the first byte it cannot hold,
        // which must be the port's colon or the end.
        let end = reg_name_len(value).ok_or(HostError::Invalid)?;
        match &value[end..] {
            [] => (end > 0, None),
            [b':', port @ ..] => (end > 0, Some(port)),
            _ => return Err(HostError::Invalid),
        }
    };
    let port_ok = port.is_none_or(|p| p.is_empty() || parse_port(p).is_some());
    if !(host_ok && port_ok) {
        return Err(HostError::Invalid);
    }
    // Every byte checked is ASCII.
    std::str::from_utf8(value).map_err(|_| HostError::Invalid)
}

/// Splits `host[:port]`; the host keeps the brackets of an IP literal.
/// `None` when something follows an IP literal other than `:port`.
fn split_host_port(value: &[u8]) -> Option<(&[u8], Option<&[u8]>)> {
    let end = if value.first() == Some(&b'[') {
        value.iter().position(|&b| b == b']')? + 1
    } else {
        // A reg-name has no colon: the first one starts the port.
        value.iter().position(|&b| b == b':').unwrap_or(value.len())
    };
    let (host, rest) = value.split_at(end);
    match rest {
        [] => Some((host, None)),
        [b':', port @ ..] => Some((host, Some(port))),
        _ => None,
    }
}

/// 1 to 5 digits, at most 65535.
fn parse_port(port: &[u8]) -> Option<u16> {
    if port.is_empty() || port.len() > 5 {
        return None;
    }
    let mut n = 0u32;
    for &b in port {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n * 10 + u32::from(b - b'0');
    }
    u16::try_from(n).ok()
}

/// `unreserved / sub-delims` (RFC 3986 section 2) as a table: every
/// request's host is checked byte by byte against it.
const UNRESERVED_OR_SUB_DELIM: [bool; 256] = {
    let mut table = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        table[i] = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
            );
        i += 1;
    }
    table
};

/// `unreserved / sub-delims` (RFC 3986 section 2).
fn unreserved_or_sub_delim(b: u8) -> bool {
    UNRESERVED_OR_SUB_DELIM[usize::from(b)]
}

/// How many bytes at the start of `value` a
/// `reg-name = *( unreserved / pct-encoded / sub-delims )` takes (possibly
/// 0; it covers `IPv4address`); `None` for a `%` not followed by two hex
/// digits.
fn reg_name_len(value: &[u8]) -> Option<usize> {
    let mut i = 0;
    while let Some(&b) = value.get(i) {
        if unreserved_or_sub_delim(b) {
            i += 1;
        } else if b == b'%' {
            let hex = |j: usize| value.get(j).is_some_and(u8::is_ascii_hexdigit);
            if !(hex(i + 1) && hex(i + 2)) {
                return None;
            }
            i += 3;
        } else {
            break;
        }
    }
    Some(i)
}

/// `IP-literal = "[" ( IPv6address / IPvFuture ) "]"`.
fn valid_ip_literal(host: &[u8]) -> bool {
    let Some(inner) = host.strip_prefix(b"[").and_then(|h| h.strip_suffix(b"]")) else {
        return false;
    };
    match inner {
        // IPvFuture = "v" 1*HEXDIG "." 1*( unreserved / sub-delims / ":" )
        [b'v' | b'V', rest @ ..] => {
            let Some(dot) = rest.iter().position(|&b| b == b'.') else {
                return false;
            };
            let (version, tail) = (&rest[..dot], &rest[dot + 1..]);
            !version.is_empty()
                && version.iter().all(u8::is_ascii_hexdigit)
                && !tail.is_empty()
                && tail
                    .iter()
                    .all(|&b| b == b':' || unreserved_or_sub_delim(b))
        }
        _ => std::str::from_utf8(inner)
            .ok()
            .and_then(|s| s.parse::<std::net::Ipv6Addr>().ok())
            .is_some(),
    }
}

/// Whether two valid hosts name the same one after RFC 3986's case and
/// scheme-based normalisation: the host compared without regard to case,
/// an empty or absent port taken as `default_port`. Percent-encodings are
/// compared as written (only their case is ignored), so `%61` and `a`
/// differ: stricter than the RFC, never looser.
fn same_host(a: &str, b: &str, default_port: u16) -> bool {
    fn parts(s: &str, default_port: u16) -> Option<(&[u8], u16)> {
        let (host, port) = split_host_port(s.as_bytes())?;
        let port = match port {
            None | Some([]) => default_port,
            Some(p) => parse_port(p)?,
        };
        Some((host, port))
    }
    match (parts(a, default_port), parts(b, default_port)) {
        (Some((ha, pa)), Some((hb, pb))) => pa == pb && ha.eq_ignore_ascii_case(hb),
        _ => false,
    }
}

/// Why a request's transfer coding is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodingError {
    /// A transfer coding other than a lone `chunked` (501, RFC 9112
    /// section 6.1): the gateway would strip the coding and send the
    /// still-coded content upstream as if it were not.
    NotImplemented,
    /// `Transfer-Encoding` in an HTTP/1.0 request, whose framing RFC 9112
    /// section 6.1 says to treat as faulty (400).
    Http10,
}

impl CodingError {
    /// A detail line for the client.
    pub fn detail(self) -> &'static str {
        match self {
            CodingError::NotImplemented => {
                "the gateway accepts no transfer coding but a lone chunked"
            }
            CodingError::Http10 => "an HTTP/1.0 request cannot have a Transfer-Encoding",
        }
    }
}

/// `Ok` when the request has no `Transfer-Encoding` or exactly `chunked`
/// (names are case-insensitive; empty list elements are ignored, as
/// RFC 9110 section 5.6.1 asks of recipients).
pub fn check_transfer_encoding(version: Version, headers: &HeaderMap) -> Result<(), CodingError> {
    // One lookup: most requests have no Transfer-Encoding at all.
    let values = headers.get_all(header::TRANSFER_ENCODING);
    if values.iter().next().is_none() {
        return Ok(());
    }
    let mut codings = values
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|c| !c.is_empty());
    if version < Version::HTTP_11 {
        return Err(CodingError::Http10);
    }
    match (codings.next(), codings.next()) {
        (Some(only), None) if only.eq_ignore_ascii_case(b"chunked") => Ok(()),
        _ => Err(CodingError::NotImplemented),
    }
}

thread_local! {
    // A per-thread generator: request ids need uniqueness, not secrecy, and
    // a thread-local state keeps id generation off any shared cache line.
    // Seeded apart per thread (fastrand's thread-local generator) and per
    // process (its id), so gateways started together differ too.
    static ID_STATE: RefCell<fastrand::Rng> = RefCell::new(fastrand::Rng::with_seed(
        fastrand::u64(..) ^ u64::from(std::process::id()),
    ));
}

/// Next pseudo-random number from this thread's generator.
pub fn next_random() -> u64 {
    ID_STATE.with_borrow_mut(|rng| rng.u64(..))
}

/// Each byte's two lowercase hex digits.
const HEX_PAIRS: [[u8; 2]; 256] = {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut pairs = [[0u8; 2]; 256];
    let mut byte = 0;
    while byte < 256 {
        pairs[byte] = [HEX[byte >> 4], HEX[byte & 0xf]];
        byte += 1;
    }
    pairs
};

/// A new request id: 32 lowercase hex digits (a byte at a time, through a
/// table: this runs for every request that comes without an id).
pub fn new_request_id() -> HeaderValue {
    let mut out = [0u8; 32];
    let random = [next_random(), next_random()];
    for (digits, byte) in out
        .chunks_exact_mut(2)
        .zip(random.iter().flat_map(|word| word.to_le_bytes()))
    {
        digits.copy_from_slice(&HEX_PAIRS[usize::from(byte)]);
    }
    HeaderValue::from_bytes(&out).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_listed_names_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-kept", HeaderValue::from_static("yes"));
        remove_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-kept"], "yes");
    }

    #[test]
    fn upgrade_survives_when_asked() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(wants_upgrade(&h));
        remove_hop_by_hop(&mut h, true);
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "upgrade");
    }

    #[test]
    fn forwarded_headers_on_the_first_hop() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("api.test:8080"));
        append_forwarded(
            &mut h,
            &ForwardedFor::new("2001:db8::1".parse().expect("ip")),
            "http",
            Some("api.test:8080"),
        );
        assert_eq!(h[X_FORWARDED_FOR], "2001:db8::1");
        assert_eq!(h[X_FORWARDED_PROTO], "http");
        assert_eq!(h[X_FORWARDED_HOST], "api.test:8080");
        // A host other than the Host header's (HTTP/2 :authority) is copied.
        append_forwarded(
            &mut h,
            &ForwardedFor::new("255.255.255.255".parse().expect("ip")),
            "http",
            Some("other.test"),
        );
        assert_eq!(h[X_FORWARDED_FOR], "2001:db8::1, 255.255.255.255");
        assert_eq!(h[X_FORWARDED_HOST], "api.test:8080, other.test");
        // An existing value with obs-text keeps its bytes.
        let mut h = HeaderMap::new();
        h.insert(
            X_FORWARDED_FOR,
            HeaderValue::from_bytes(b"caf\xe9").expect("obs-text"),
        );
        append_forwarded(
            &mut h,
            &ForwardedFor::new("10.1.2.3".parse().expect("ip")),
            "http",
            None,
        );
        assert_eq!(h[X_FORWARDED_FOR].as_bytes(), b"caf\xe9, 10.1.2.3");
        assert!(!h.contains_key(X_FORWARDED_HOST));
    }

    #[test]
    fn forwarded_headers_append() {
        let mut h = HeaderMap::new();
        h.insert(X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.1"));
        append_forwarded(
            &mut h,
            &ForwardedFor::new("127.0.0.1".parse().expect("ip")),
            "http",
            Some("a.test"),
        );
        assert_eq!(h[X_FORWARDED_FOR], "10.0.0.1, 127.0.0.1");
        assert_eq!(h[X_FORWARDED_PROTO], "http");
        assert_eq!(h[X_FORWARDED_HOST], "a.test");
    }

    fn head(version: Version, uri: &str, hosts: &[&[u8]]) -> (Version, Uri, HeaderMap) {
        let mut headers = HeaderMap::new();
        for host in hosts {
            headers.append(
                header::HOST,
                HeaderValue::from_bytes(host).expect("header value"),
            );
        }
        (version, uri.parse().expect("uri"), headers)
    }

    fn host_of(version: Version, uri: &str, hosts: &[&[u8]]) -> Result<String, HostError> {
        let (version, uri, headers) = head(version, uri, hosts);
        request_host(version, &uri, &headers).map(str::to_owned)
    }

    #[test]
    fn host_syntax_is_uri_host_and_port() {
        for good in [
            &b"a.test"[..],
            b"A.Test:8080",
            b"127.0.0.1",
            b"127.0.0.1:80",
            b"[::1]",
            b"[::1]:443",
            b"[2001:db8::ffff:1.2.3.4]",
            b"[v1.fe80::a+en1]",
            b"xn--bcher-kva.example",
            b"a-b_c~d!$&'()*+,;=",
            b"%41pi.test",
            b"a.test:",
            b"a.test:65535",
        ] {
            let text = String::from_utf8_lossy(good).into_owned();
            assert_eq!(
                host_of(Version::HTTP_11, "/", &[good]),
                Ok(text),
                "{good:?}"
            );
        }
        for bad in [
            &b""[..],
            b"a b/c@d",
            b"a b",
            b"a/b",
            b"user@a.test",
            b"a.test:65536",
            b"a.test:99999",
            b"a.test:x",
            b"a.test:80:80",
            b":80",
            b"[::1",
            b"[::1]x",
            b"[::1]:x",
            b"[a.test]",
            b"[::1%25eth0]",
            b"[v1]",
            b"[v.x]",
            b"%zz",
            b"%4",
            b"caf\xe9",
            b"a\tb",
            b"a?b",
            b"a#b",
            b"a\"b",
        ] {
            assert_eq!(
                host_of(Version::HTTP_11, "/", &[bad]),
                Err(HostError::Invalid),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn http11_needs_exactly_one_host() {
        assert_eq!(host_of(Version::HTTP_11, "/", &[]), Err(HostError::Missing));
        assert_eq!(
            host_of(Version::HTTP_11, "/", &[b"a.test", b"a.test"]),
            Err(HostError::Repeated)
        );
        assert_eq!(
            host_of(Version::HTTP_11, "/", &[b"a.test", b"b.test"]),
            Err(HostError::Repeated)
        );
        // Absolute form: the target's authority is the host, Host is
        // still required and must be valid.
        assert_eq!(
            host_of(Version::HTTP_11, "http://a.test/x", &[b"b.test"]).as_deref(),
            Ok("a.test")
        );
        assert_eq!(
            host_of(Version::HTTP_11, "http://a.test/x", &[]),
            Err(HostError::Missing)
        );
        assert_eq!(
            host_of(Version::HTTP_11, "http://u@a.test/x", &[b"a.test"]),
            Err(HostError::Invalid)
        );
        // HTTP/1.0: optional, but one at most and valid.
        assert_eq!(host_of(Version::HTTP_10, "/", &[]).as_deref(), Ok(""));
        assert_eq!(
            host_of(Version::HTTP_10, "/", &[b"a.test"]).as_deref(),
            Ok("a.test")
        );
        assert_eq!(
            host_of(Version::HTTP_10, "/", &[b"a", b"b"]),
            Err(HostError::Repeated)
        );
        assert_eq!(
            host_of(Version::HTTP_10, "/", &[b""]),
            Err(HostError::Invalid)
        );
    }

    #[test]
    fn http2_authority_wins_and_must_agree_with_host() {
        let h2 = Version::HTTP_2;
        assert_eq!(host_of(h2, "http://a.test/", &[]).as_deref(), Ok("a.test"));
        assert_eq!(host_of(h2, "/", &[b"a.test"]).as_deref(), Ok("a.test"));
        assert_eq!(host_of(h2, "/", &[]), Err(HostError::Missing));
        for same in [&b"a.test"[..], b"A.TEST", b"a.test:80", b"a.test:"] {
            assert_eq!(
                host_of(h2, "http://a.test/", &[same]).as_deref(),
                Ok("a.test"),
                "{same:?}"
            );
        }
        assert_eq!(
            host_of(h2, "https://a.test:443/", &[b"a.test"]).as_deref(),
            Ok("a.test:443")
        );
        for other in [&b"b.test"[..], b"a.test:8080", b"a.test.", b"%61.test"] {
            assert_eq!(
                host_of(h2, "http://a.test/", &[other]),
                Err(HostError::Conflict),
                "{other:?}"
            );
        }
        assert_eq!(
            host_of(h2, "https://a.test/", &[b"a.test:80"]),
            Err(HostError::Conflict)
        );
        assert_eq!(
            host_of(h2, "http://a.test/", &[b"a.test", b"a.test"]),
            Err(HostError::Repeated)
        );
        assert_eq!(
            host_of(h2, "http://a.test/", &[b"a b"]),
            Err(HostError::Invalid)
        );
        assert_eq!(
            host_of(h2, "http://u:p@a.test/", &[]),
            Err(HostError::Invalid)
        );
    }

    fn te(version: Version, values: &[&str]) -> Result<(), CodingError> {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(
                header::TRANSFER_ENCODING,
                HeaderValue::from_str(v).expect("value"),
            );
        }
        check_transfer_encoding(version, &headers)
    }

    #[test]
    fn only_a_lone_chunked_coding_is_accepted() {
        let v11 = Version::HTTP_11;
        assert_eq!(te(v11, &[]), Ok(()));
        for ok in [
            &["chunked"][..],
            &["Chunked"],
            &["CHUNKED"],
            &["chunked,"],
            &[", chunked"],
        ] {
            assert_eq!(te(v11, ok), Ok(()), "{ok:?}");
        }
        for refused in [
            &["gzip, chunked"][..],
            &["chunked, chunked"],
            &["chunked", "chunked"],
            &["gzip", "chunked"],
            &["gzip"],
            &["identity"],
            &["chunked, gzip"],
            &["x-custom, chunked"],
            &[""],
            &["chunked;q=1"],
        ] {
            assert_eq!(
                te(v11, refused),
                Err(CodingError::NotImplemented),
                "{refused:?}"
            );
        }
        assert_eq!(te(Version::HTTP_10, &["chunked"]), Err(CodingError::Http10));
    }

    proptest::proptest! {
        /// The head checks, hop-by-hop removal and forwarded headers never
        /// panic, whatever the header bytes; a host that is accepted is
        /// ASCII without whitespace, `/`, `@`, `?` or `#`, and survives as a
        /// header value. (The same functions as `fuzz/fuzz_targets/request_head.rs`.)
        #[test]
        fn head_handling_never_panics(
            hosts in proptest::collection::vec(
                proptest::collection::vec(proptest::prelude::any::<u8>(), 0..24), 0..3),
            host_like in "[a-zA-Z0-9.:\\[\\]%@ _-]{0,24}",
            authority in proptest::option::of("[a-zA-Z0-9.:\\[\\]%@_-]{1,24}"),
            connection in "[a-zA-Z0-9, -]{0,40}",
            coding in "[a-zA-Z, ;=]{0,20}",
            version in 0u8..4,
            ip in proptest::prelude::any::<[u8; 16]>(),
        ) {
            let version = [Version::HTTP_09, Version::HTTP_10, Version::HTTP_11, Version::HTTP_2][usize::from(version)];
            let mut headers = HeaderMap::new();
            for h in hosts.iter().map(Vec::as_slice).chain([host_like.as_bytes()]) {
                if let Ok(v) = HeaderValue::from_bytes(h) {
                    headers.append(header::HOST, v);
                }
            }
            if let Ok(v) = HeaderValue::from_str(&connection) {
                headers.append(header::CONNECTION, v);
            }
            if let Ok(v) = HeaderValue::from_str(&coding) {
                headers.append(header::TRANSFER_ENCODING, v);
            }
            let uri: Uri = authority
                .as_deref()
                .and_then(|a| format!("http://{a}/p").parse().ok())
                .unwrap_or_else(|| Uri::from_static("/p"));
            let _ = check_transfer_encoding(version, &headers);
            let host = request_host(version, &uri, &headers).map(str::to_owned);
            if let Ok(host) = &host {
                proptest::prop_assert!(host.bytes().all(|b| b.is_ascii_graphic()));
                proptest::prop_assert!(!host.contains(['/', '@', '?', '#']));
                proptest::prop_assert!(host.is_empty() || HeaderValue::from_str(host).is_ok());
            }
            let _ = head_size(&uri, &headers);
            let _ = wants_upgrade(&headers);
            let client = if ip[0] % 2 == 0 {
                IpAddr::from([ip[1], ip[2], ip[3], ip[4]])
            } else {
                IpAddr::from(ip)
            };
            // In the order the gateway applies them to the upstream request.
            remove_hop_by_hop(&mut headers, ip[5] % 2 == 0);
            proptest::prop_assert!(!headers.contains_key(header::TRANSFER_ENCODING));
            append_forwarded(&mut headers, &ForwardedFor::new(client), "http", host.as_deref().ok());
            append_via(&mut headers, version);
            proptest::prop_assert!(headers.contains_key(X_FORWARDED_FOR));
        }
    }

    #[test]
    fn request_ids_are_distinct_hex() {
        let a = new_request_id();
        let b = new_request_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(a.as_bytes().iter().all(u8::is_ascii_hexdigit));
    }
}
