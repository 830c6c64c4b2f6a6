//! The request-head handling the gateway does itself, before and while
//! forwarding: the transfer-coding check, the `Host`/`:authority` check,
//! head size, upgrade detection, `X-Forwarded-*`, `Via` and hop-by-hop
//! removal (`keel_http::headers`). Parsing
//! the bytes off the wire is hyper's, fuzzed upstream; this target starts
//! from what hyper hands over: a URI and a header map of any valid bytes.
//!
//! Input: one byte of flags (version, upgrade, address family), then lines
//! separated by `\n`: the request target, then `name:value` header lines.
//! Lines that are not a valid URI, name or value are skipped, as hyper
//! would never hand them over.
//!
//! Checked besides "no panic": an accepted host is printable ASCII without
//! `/ @ ? #` and is a valid header value; HTTP/1.1 is never accepted
//! without exactly one `Host`; after hop-by-hop removal no
//! `Transfer-Encoding`, `TE`, `Connection` (unless kept for an upgrade) or
//! name listed in `Connection` is left.

#![no_main]

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Uri, Version};
use libfuzzer_sys::fuzz_target;

use keel_http::headers;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let version = [
        Version::HTTP_09,
        Version::HTTP_10,
        Version::HTTP_11,
        Version::HTTP_2,
    ][usize::from(flags & 3)];
    let keep_upgrade = flags & 4 != 0;
    let mut lines = rest.split(|&b| b == b'\n');
    let uri = lines
        .next()
        .and_then(|line| Uri::try_from(line).ok())
        .unwrap_or_else(|| Uri::from_static("/"));
    let mut headers = HeaderMap::new();
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            headers.append(name, value);
        }
    }

    let _ = headers::check_transfer_encoding(version, &headers);
    let host = headers::request_host(version, &uri, &headers).map(str::to_owned);
    if let Ok(host) = &host {
        assert!(host.bytes().all(|b| b.is_ascii_graphic()), "{host:?}");
        assert!(!host.contains(['/', '@', '?', '#']), "{host:?}");
        assert!(host.is_empty() || HeaderValue::from_str(host).is_ok());
        if version == Version::HTTP_11 {
            assert_eq!(headers.get_all(header::HOST).iter().count(), 1);
        }
    }
    let _ = headers::head_size(&uri, &headers);
    let upgrade = headers::wants_upgrade(&headers);

    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| n != "close" && n != "keep-alive" && n != "upgrade")
        .collect();
    // In the order the gateway applies them to the upstream request.
    headers::remove_hop_by_hop(&mut headers, keep_upgrade && upgrade);
    for name in [header::TRANSFER_ENCODING, header::TE, header::TRAILER] {
        assert!(!headers.contains_key(&name), "{name} left");
    }
    if !(keep_upgrade && upgrade) {
        assert!(!headers.contains_key(header::CONNECTION));
        assert!(!headers.contains_key(header::UPGRADE));
    }
    for name in listed {
        if name != header::UPGRADE && name != header::CONNECTION {
            assert!(
                !headers.contains_key(&name),
                "{name} listed in Connection, left"
            );
        }
    }
    let client = if flags & 8 == 0 {
        IpAddr::from([flags, 0, 0, 1])
    } else {
        IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, u16::from(flags)])
    };
    headers::append_forwarded(
        &mut headers,
        &headers::ForwardedFor::new(client),
        "http",
        host.as_deref().ok(),
    );
    headers::append_via(&mut headers, version);
    assert!(headers.contains_key("x-forwarded-for"));
    assert!(headers.contains_key(header::VIA));
});
