//! Proxy header semantics: hop-by-hop removal (RFC 9110 section 7.6.1),
//! `X-Forwarded-*`, `Via`, and request ids.

use std::cell::RefCell;
use std::io::Write;
use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use keel_retry::SplitMix64;

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

/// Appends this hop to `X-Forwarded-For`, `-Proto` and `-Host`.
pub fn append_forwarded(
    headers: &mut HeaderMap,
    client: IpAddr,
    proto: &'static str,
    host: Option<&str>,
) {
    // The address is written on the stack: at most 45 bytes (an
    // IPv4-mapped IPv6 address).
    let mut ip = [0u8; 48];
    let ip = {
        let mut cursor = std::io::Cursor::new(&mut ip[..]);
        let _ = write!(cursor, "{client}");
        let n = usize::try_from(cursor.position()).unwrap_or(0);
        &ip[..n]
    };
    append_list(headers, X_FORWARDED_FOR, ip, || None);
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

thread_local! {
    // A per-thread generator: request ids need uniqueness, not secrecy, and
    // a thread-local state keeps id generation off any shared cache line.
    // Seeded apart per thread (time and a counter, from `from_entropy`)
    // and per process (its id), so gateways started together differ too.
    static ID_STATE: RefCell<SplitMix64> = RefCell::new(SplitMix64::new(
        SplitMix64::from_entropy().next_u64() ^ u64::from(std::process::id()),
    ));
}

/// Next pseudo-random number from this thread's generator.
pub fn next_random() -> u64 {
    ID_STATE.with_borrow_mut(SplitMix64::next_u64)
}

/// A new request id: 32 lowercase hex digits.
pub fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 32];
    let (a, b) = (next_random(), next_random());
    for (i, byte) in out.iter_mut().enumerate() {
        let word = if i < 16 { a } else { b };
        let shift = (i % 16) * 4;
        *byte = HEX[((word >> shift) & 0xf) as usize];
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
            "2001:db8::1".parse().expect("ip"),
            "http",
            Some("api.test:8080"),
        );
        assert_eq!(h[X_FORWARDED_FOR], "2001:db8::1");
        assert_eq!(h[X_FORWARDED_PROTO], "http");
        assert_eq!(h[X_FORWARDED_HOST], "api.test:8080");
        // A host other than the Host header's (HTTP/2 :authority) is copied.
        append_forwarded(
            &mut h,
            "255.255.255.255".parse().expect("ip"),
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
        append_forwarded(&mut h, "10.1.2.3".parse().expect("ip"), "http", None);
        assert_eq!(h[X_FORWARDED_FOR].as_bytes(), b"caf\xe9, 10.1.2.3");
        assert!(!h.contains_key(X_FORWARDED_HOST));
    }

    #[test]
    fn forwarded_headers_append() {
        let mut h = HeaderMap::new();
        h.insert(X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.1"));
        append_forwarded(
            &mut h,
            "127.0.0.1".parse().expect("ip"),
            "http",
            Some("a.test"),
        );
        assert_eq!(h[X_FORWARDED_FOR], "10.0.0.1, 127.0.0.1");
        assert_eq!(h[X_FORWARDED_PROTO], "http");
        assert_eq!(h[X_FORWARDED_HOST], "a.test");
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
