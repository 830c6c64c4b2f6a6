//! Malformed and hostile requests against the real `keel` binary, as a
//! regression suite: each case is the raw bytes a client sends, what the
//! gateway must answer (a status, with the problem type where the gateway
//! answers itself, or a closed connection), and whether anything may reach
//! the upstream.
//!
//! Some answers come from hyper's HTTP/1 parser (a plain 400, 431 or 505,
//! no problem body): they are here because the gateway relies on them, so a
//! hyper upgrade that changed them would show. The rest are the gateway's
//! own checks (`headers::request_host`, `headers::check_transfer_encoding`).
//! Every problem+json answer must carry the request's id as `request_id`.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::{Keel, TestUpstream, echo, empty, full, post_keyed, request, wait_ready};
use http::{HeaderMap, Request, StatusCode, header};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What a case must get back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// This status; with `Some(type)`, a problem+json answer of that type
    /// written by the gateway (else the parser's plain answer).
    Status(u16, Option<&'static str>),
    /// The connection closes (or resets) with no response at all.
    Closed,
}

struct Case {
    name: &'static str,
    raw: &'static [u8],
    expect: Expect,
    /// Whether the request reaches the upstream.
    reaches: bool,
    /// Whether the gateway closes the connection after answering (it must
    /// when the framing is in doubt, RFC 9112 section 6.3).
    closes: bool,
}

const BAD_REQUEST_TYPE: &str = "urn:keel:problem:bad-request";
const BAD_REQUEST: Option<&str> = Some(BAD_REQUEST_TYPE);
const NOT_IMPLEMENTED: Option<&str> = Some("urn:keel:problem:not-implemented");

const fn case(
    name: &'static str,
    raw: &'static [u8],
    expect: Expect,
    reaches: bool,
    closes: bool,
) -> Case {
    Case {
        name,
        raw,
        expect,
        reaches,
        closes,
    }
}

use Expect::{Closed, Status};

/// The HTTP/1 corpus. `reaches: true` only for requests that are valid.
const HTTP1: &[Case] = &[
    // -- the controls: valid requests that must go through --
    case(
        "plain GET",
        b"GET /ok HTTP/1.1\r\nHost: a.test\r\n\r\n",
        Status(200, None),
        true,
        false,
    ),
    case(
        "Host with port",
        b"GET /ok HTTP/1.1\r\nHost: a.test:8080\r\n\r\n",
        Status(200, None),
        true,
        false,
    ),
    case(
        "Host IPv4",
        b"GET /ok HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        Status(200, None),
        true,
        false,
    ),
    case(
        "Host IPv6 literal with port",
        b"GET /ok HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n",
        Status(200, None),
        true,
        false,
    ),
    case(
        "HTTP/1.0 without Host",
        b"GET /ok HTTP/1.0\r\n\r\n",
        Status(200, None),
        true,
        true, // HTTP/1.0 closes by default
    ),
    case(
        "chunked body",
        b"POST /ok HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        Status(200, None),
        true,
        false,
    ),
    case(
        "chunked in capitals",
        b"POST /ok HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: CHUNKED\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        Status(200, None),
        true,
        false,
    ),
    case(
        "bare LF line ends (RFC 9112 2.2 lets a recipient accept them)",
        b"GET /ok HTTP/1.1\nHost: a.test\n\n",
        Status(200, None),
        true,
        false,
    ),
    // -- Host (RFC 9112 section 3.2): 400, nothing upstream --
    case(
        "no Host",
        b"GET / HTTP/1.1\r\n\r\n",
        Status(400, BAD_REQUEST),
        false,
        false,
    ),
    case(
        "two Host, same value",
        b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: a.test\r\n\r\n",
        Status(400, BAD_REQUEST),
        false,
        false,
    ),
    case(
        "two Host, different values",
        b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: evil.test\r\n\r\n",
        Status(400, BAD_REQUEST),
        false,
        false,
    ),
    case(
        "two Host apart",
        b"GET / HTTP/1.1\r\nHost: a.test\r\nX-A: 1\r\nhost: evil.test\r\n\r\n",
        Status(400, BAD_REQUEST),
        false,
        false,
    ),
    case(
        "empty Host",
        b"GET / HTTP/1.1\r\nHost: \r\n\r\n",
        Status(400, BAD_REQUEST),
        false,
        false,
    ),
    case(
        "Host: a b/c@d",
        b"GET / HTTP/1.1\r\nHost: a b/c@d\r\n\r\n",
        Status(400, BAD_REQUEST),
        false,
        false,
    ),
    case(
        "Host with userinfo",
        b"GET / HTTP/1.1\r\nHost: user@a.test\r\n\r\n",
        Status(400, BAD_REQUEST),
        false,
        false,
    ),
    case(
        "Host with a path",
        b"GET / HTTP/1.1\r\nHost: a.test/x\r\n\r\n",
        Status(400, BAD_REQUEST),
        false,
        false,
    ),
    case(
        "Host port out of range",
        b"GET / HTTP/1.1\r\nHost: a.test:99999\r\n\r\n",
        Status(400, BAD_REQUEST),
        false,
        false,
    ),
    case(
        "Host port not a number",
        b"GET / HTTP/1.1\r\nHost: a.test:http\r\n\r\n",
        Status(400, BAD_REQUEST),
        false,
        false,
    ),
    case(
        "Host unclosed IPv6 literal",
        b"GET / HTTP/1.1\r\nHost: [::1\r\n\r\n",
        Status(400, BAD_REQUEST),
        false,
        false,
    ),
    case(
        "Host bad percent-encoding",
        b"GET / HTTP/1.1\r\nHost: %zz.test\r\n\r\n",
        Status(400, BAD_REQUEST),
        false,
        false,
    ),
    case(
        "Host with obs-text",
        b"GET / HTTP/1.1\r\nHost: caf\xe9.test\r\n\r\n",
        Status(400, BAD_REQUEST),
        false,
        false,
    ),
    case(
        "Host with a tab inside",
        b"GET / HTTP/1.1\r\nHost: a\tb\r\n\r\n",
        Status(400, BAD_REQUEST),
        false,
        false,
    ),
    case(
        "HTTP/1.0 with two Host",
        b"GET / HTTP/1.0\r\nHost: a.test\r\nHost: b.test\r\n\r\n",
        Status(400, BAD_REQUEST),
        false,
        true, // HTTP/1.0 closes by default
    ),
    case(
        "absolute form without Host",
        b"GET http://a.test/ HTTP/1.1\r\n\r\n",
        Status(400, BAD_REQUEST),
        false,
        false,
    ),
    case(
        "absolute form with userinfo",
        b"GET http://u@a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n",
        Status(400, BAD_REQUEST),
        false,
        false,
    ),
    // -- transfer codings (RFC 9112 section 6.1): only a lone chunked --
    case(
        "gzip, chunked",
        b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        Status(501, NOT_IMPLEMENTED),
        false,
        true,
    ),
    case(
        "chunked, chunked",
        b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        Status(501, NOT_IMPLEMENTED),
        false,
        true,
    ),
    case(
        "two Transfer-Encoding lines",
        b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        Status(501, NOT_IMPLEMENTED),
        false,
        true,
    ),
    case(
        "unknown coding, chunked",
        b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: x-custom, chunked\r\n\r\n0\r\n\r\n",
        Status(501, NOT_IMPLEMENTED),
        false,
        true,
    ),
    case(
        "chunked, gzip (chunked not last)",
        b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
        Status(400, None),
        false,
        true,
    ),
    case(
        "gzip alone",
        b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: gzip\r\n\r\nhello",
        Status(400, None),
        false,
        true,
    ),
    case(
        "Transfer-Encoding in HTTP/1.0",
        b"POST / HTTP/1.0\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        Status(400, None),
        false,
        true,
    ),
    // -- request smuggling: refused by the parser, nothing upstream --
    // Content-Length with Transfer-Encoding: RFC 9112 6.3 lets a server
    // read the body by Transfer-Encoding alone if it then closes the
    // connection; hyper does so (and drops Content-Length), so the
    // upstream gets the empty chunked body and the request hidden behind
    // it is never read.
    case(
        "Content-Length and Transfer-Encoding",
        b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a.test\r\n\r\n",
        Status(200, None),
        true,
        true,
    ),
    case(
        "Transfer-Encoding then Content-Length",
        b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\nContent-Length: 40\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a.test\r\n\r\n",
        Status(200, None),
        true,
        true,
    ),
    case(
        "two different Content-Length",
        b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\nContent-Length: 40\r\n\r\nhello",
        Status(400, None),
        false,
        true,
    ),
    case(
        "Content-Length list",
        b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5, 40\r\n\r\nhello",
        Status(400, None),
        false,
        true,
    ),
    case(
        "negative Content-Length",
        b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: -1\r\n\r\n",
        Status(400, None),
        false,
        true,
    ),
    case(
        "Content-Length with a sign",
        b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: +5\r\n\r\nhello",
        Status(400, None),
        false,
        true,
    ),
    case(
        "obs-fold",
        b"GET / HTTP/1.1\r\nHost: a.test\r\nX-A: one\r\n two\r\n\r\n",
        Status(400, None),
        false,
        true,
    ),
    case(
        "obs-fold of Transfer-Encoding",
        b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding:\r\n chunked\r\nContent-Length: 5\r\n\r\nhello",
        Status(400, None),
        false,
        true,
    ),
    case(
        "bare CR in a header value",
        b"GET / HTTP/1.1\r\nHost: a.test\r\nX-A: a\rb\r\n\r\n",
        Status(400, None),
        false,
        true,
    ),
    case(
        "NUL in a header value",
        b"GET / HTTP/1.1\r\nHost: a.test\r\nX-A: a\0b\r\n\r\n",
        Status(400, None),
        false,
        true,
    ),
    case(
        "space before the colon",
        b"GET / HTTP/1.1\r\nHost : a.test\r\n\r\n",
        Status(400, None),
        false,
        true,
    ),
    case(
        "whitespace before the first header",
        b"GET / HTTP/1.1\r\n Host: a.test\r\n\r\n",
        Status(400, None),
        false,
        true,
    ),
    case(
        "header name with a separator",
        b"GET / HTTP/1.1\r\nHost: a.test\r\nX(A): b\r\n\r\n",
        Status(400, None),
        false,
        true,
    ),
    case(
        "method with a separator",
        b"G@T / HTTP/1.1\r\nHost: a.test\r\n\r\n",
        Status(400, None),
        false,
        true,
    ),
    case(
        "space in the target",
        b"GET /a b HTTP/1.1\r\nHost: a.test\r\n\r\n",
        Status(400, None),
        false,
        true,
    ),
    case(
        "unknown HTTP version",
        b"GET / HTTP/1.2\r\nHost: a.test\r\n\r\n",
        Status(400, None),
        false,
        true,
    ),
    case(
        "invalid chunk size",
        b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        // The client's broken body is its own fault, never the upstream's
        // (502): see tests/blame.rs.
        Status(400, BAD_REQUEST),
        false,
        true,
    ),
    case(
        "chunk size overflow",
        b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff\r\nhello\r\n0\r\n\r\n",
        Status(400, BAD_REQUEST),
        false,
        true,
    ),
    case(
        "TLS to the plain port",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        Status(400, None),
        false,
        true,
    ),
];

/// What came back on one raw connection.
#[derive(Debug)]
struct RawAnswer {
    status: Option<u16>,
    headers: HeaderMap,
    body: Vec<u8>,
    /// Bytes after the first response (a second response would mean a
    /// request hidden in the first one's body was read).
    rest: Vec<u8>,
    /// The peer closed the connection (within 300 ms of answering).
    closed: bool,
}

/// Sends `bytes` and reads one response (by its `Content-Length`), or
/// until the peer closes, 5 s at most; then waits up to 300 ms for the
/// connection to close or for more bytes.
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> RawAnswer {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    // The peer may close before taking it all in.
    let _ = stream.write_all(bytes).await;
    let mut buf = Vec::new();
    let mut deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut answered = false;
    let closed = loop {
        if !answered && parse_response(&buf).is_some() {
            answered = true;
            deadline = tokio::time::Instant::now() + Duration::from_millis(300);
        }
        let mut chunk = [0u8; 8192];
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => break false,
        }
    };
    match parse_response(&buf) {
        Some((mut answer, used)) => {
            answer.rest = buf[used..].to_vec();
            answer.closed = closed;
            answer
        }
        None => RawAnswer {
            status: None,
            headers: HeaderMap::new(),
            body: Vec::new(),
            rest: buf,
            closed,
        },
    }
}

/// A whole response at the start of `buf`, and its length, if there is one.
fn parse_response(buf: &[u8]) -> Option<(RawAnswer, usize)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&buf[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let mut headers = HeaderMap::new();
    for line in lines {
        let (name, value) = line.split_once(':')?;
        headers.append(
            http::HeaderName::from_bytes(name.trim().as_bytes()).ok()?,
            http::HeaderValue::from_str(value.trim()).ok()?,
        );
    }
    let length: usize = headers
        .get(header::CONTENT_LENGTH)
        .map_or(Some(0), |v| v.to_str().ok()?.parse().ok())?;
    let body = buf.get(end + 4..end + 4 + length)?.to_vec();
    let answer = RawAnswer {
        status: Some(status),
        headers,
        body,
        rest: Vec::new(),
        closed: false,
    };
    Some((answer, end + 4 + length))
}

/// Checks a problem+json answer written by the gateway: its type, and the
/// request's id in the body, equal to the `x-request-id` header.
fn check_problem(headers: &HeaderMap, body: &[u8], want_type: &str) -> Result<(), String> {
    if headers.get(header::CONTENT_TYPE).map(|v| v.as_bytes()) != Some(b"application/problem+json")
    {
        return Err(format!("not problem+json: {headers:?}"));
    }
    let body: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("problem body: {e}"))?;
    if body["type"] != want_type {
        return Err(format!("type {} instead of {want_type}", body["type"]));
    }
    let id = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .ok_or("no x-request-id")?;
    if body["request_id"] != id {
        return Err(format!(
            "request_id {} but x-request-id {id}",
            body["request_id"]
        ));
    }
    Ok(())
}

/// Upstream requests after a case, given a moment so that a request
/// smuggled behind the first would be counted too.
async fn settled(upstream: &TestUpstream) -> usize {
    tokio::time::sleep(Duration::from_millis(50)).await;
    upstream.requests()
}

#[tokio::test]
async fn http1_corpus() {
    let upstream = TestUpstream::start().await;
    let keel = Keel::in_front_of(upstream.addr, "", "").await;
    let mut failures = Vec::new();
    let mut reached = 0;
    for case in HTTP1 {
        let before = settled(&upstream).await;
        let answer = exchange(keel.listen, case.raw).await;
        let after = settled(&upstream).await;
        let got = match answer.status {
            Some(status) => Status(status, None),
            None => Closed,
        };
        let mut wrong = Vec::new();
        match (case.expect, got) {
            (Status(want, problem), Status(status, _)) if want == status => {
                if let Some(problem) = problem
                    && let Err(e) = check_problem(&answer.headers, &answer.body, problem)
                {
                    wrong.push(e);
                }
            }
            (Closed, Closed) => {}
            (want, _) => wrong.push(format!(
                "expected {want:?}, got {got:?} {:?}",
                String::from_utf8_lossy(&answer.body)
            )),
        }
        if answer.closed != case.closes {
            wrong.push(format!(
                "connection {}",
                if answer.closed { "closed" } else { "kept open" }
            ));
        }
        if !answer.rest.is_empty() {
            wrong.push(format!(
                "more after the answer: {:?}",
                String::from_utf8_lossy(&answer.rest)
            ));
        }
        let reached_now = after - before;
        if reached_now != usize::from(case.reaches) {
            wrong.push(format!(
                "{reached_now} request(s) reached the upstream, expected {}",
                usize::from(case.reaches)
            ));
        }
        reached += usize::from(case.reaches);
        if !wrong.is_empty() {
            failures.push(format!("{}: {}", case.name, wrong.join("; ")));
        }
    }
    // Over a second for anything smuggled to arrive late.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        failures.is_empty(),
        "{} of {} cases:\n{}",
        failures.len(),
        HTTP1.len(),
        failures.join("\n")
    );
    assert_eq!(
        upstream.requests(),
        reached,
        "requests reached the upstream"
    );
    // And the gateway is still up.
    let answer = exchange(keel.listen, b"GET /ok HTTP/1.1\r\nHost: a.test\r\n\r\n").await;
    assert_eq!(answer.status, Some(200));
}

#[tokio::test]
async fn oversized_heads_are_refused_before_the_upstream() {
    let upstream = TestUpstream::start().await;
    let keel = Keel::in_front_of(upstream.addr, "max_header_size = \"2KiB\"", "").await;
    // Over the gateway's limit: its own 431.
    let over = format!(
        "GET / HTTP/1.1\r\nHost: a.test\r\nX-Big: {}\r\n\r\n",
        "y".repeat(3000)
    );
    let answer = exchange(keel.listen, over.as_bytes()).await;
    assert_eq!(answer.status, Some(431));
    check_problem(
        &answer.headers,
        &answer.body,
        "urn:keel:problem:headers-too-large",
    )
    .expect("problem");
    // Far over: the parser's backstop.
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: a.test\r\nX-Big: {}\r\n\r\n",
        "z".repeat(64 * 1024)
    );
    assert_eq!(
        exchange(keel.listen, huge.as_bytes()).await.status,
        Some(431)
    );
    // Many small headers adding up.
    let mut many = String::from("GET / HTTP/1.1\r\nHost: a.test\r\n");
    for i in 0..400 {
        many.push_str(&format!("X-H{i}: {i}\r\n"));
    }
    many.push_str("\r\n");
    assert_eq!(
        exchange(keel.listen, many.as_bytes()).await.status,
        Some(431)
    );
    // A head that never ends.
    let endless = format!(
        "GET / HTTP/1.1\r\nHost: a.test\r\nX-A: {}",
        "a".repeat(64 * 1024)
    );
    let answer = exchange(keel.listen, endless.as_bytes()).await;
    assert!(
        matches!(answer.status, Some(431) | None),
        "{:?}",
        answer.status
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(upstream.requests(), 0);
}

#[tokio::test]
async fn absolute_form_is_routed_and_sent_by_its_authority() {
    let a = TestUpstream::start().await;
    let b = TestUpstream::start().await;
    let keel = Keel::start("", &host_routes(a.addr, b.addr)).await;
    // RFC 9112 3.2.2: the target's authority is the host, Host is ignored;
    // the upstream gets the same host the gateway routed on.
    let answer = exchange(
        keel.listen,
        b"GET http://a.test/x HTTP/1.1\r\nHost: b.test\r\n\r\n",
    )
    .await;
    assert_eq!(answer.status, Some(200));
    let seen = echo(&Bytes::from(answer.body));
    assert_eq!(seen["headers"]["host"], "a.test");
    assert_eq!(seen["uri"], "/x");
    assert_eq!((a.requests(), b.requests()), (1, 0));
}

/// Two upstreams: `a.test` goes to `a`, every other host to `b`.
fn host_routes(a: SocketAddr, b: SocketAddr) -> String {
    format!(
        r#"
[upstreams.a]
endpoints = ["http://{a}"]

[upstreams.b]
endpoints = ["http://{b}"]

[[routes]]
name = "a"
path_prefix = "/"
host = "a.test"
upstream = "a"

[[routes]]
name = "rest"
path_prefix = "/"
upstream = "b"
"#
    )
}

/// One request over HTTP/2 with prior knowledge (hyper's client: the URI's
/// authority is sent as `:authority`, a `Host` header as it is).
async fn h2(
    addr: SocketAddr,
    request: Request<common::BoxBody>,
) -> Result<(StatusCode, HeaderMap, Bytes), hyper::Error> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let response = sender.send_request(request).await?;
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, headers, body))
}

#[tokio::test]
async fn http2_authority_and_host() {
    let a = TestUpstream::start().await;
    let b = TestUpstream::start().await;
    let keel = Keel::start("", &host_routes(a.addr, b.addr)).await;
    let get = |uri: &str, hosts: &[&str]| {
        let mut builder = Request::get(uri);
        for host in hosts {
            builder = builder.header(header::HOST, *host);
        }
        builder.body(empty()).expect("request")
    };

    // :authority alone: routed by it, sent upstream as Host.
    let (status, _, body) = h2(keel.listen, get("http://a.test/1", &[]))
        .await
        .expect("h2");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(echo(&body)["headers"]["host"], "a.test");
    assert_eq!((a.requests(), b.requests()), (1, 0));

    // Both, naming the same host (case and default port aside): routed by
    // :authority, which the upstream gets as Host.
    for host in ["a.test", "A.Test", "a.test:80"] {
        let (status, _, body) = h2(keel.listen, get("http://a.test/2", &[host]))
            .await
            .expect("h2");
        assert_eq!(status, StatusCode::OK, "{host}");
        assert_eq!(echo(&body)["headers"]["host"], "a.test", "{host}");
    }
    assert_eq!((a.requests(), b.requests()), (4, 0));

    // :authority and Host in conflict: 400, nothing upstream (before, the
    // gateway routed by Host while an upstream could read :authority).
    for (uri, host) in [
        ("http://a.test/3", "b.test"),
        ("http://b.test/3", "a.test"),
        ("http://a.test/3", "a.test:8080"),
        ("http://a.test:8080/3", "a.test"),
    ] {
        let (status, headers, body) = h2(keel.listen, get(uri, &[host])).await.expect("h2");
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri} {host}");
        check_problem(&headers, &body, "urn:keel:problem:bad-request").expect("problem");
    }
    // Two Host headers, an invalid one, userinfo in :authority.
    for request in [
        get("http://a.test/4", &["a.test", "a.test"]),
        get("http://a.test/4", &["a b/c@d"]),
        get("http://user@a.test/4", &[]),
    ] {
        let (status, headers, body) = h2(keel.listen, request).await.expect("h2");
        assert_eq!(status, StatusCode::BAD_REQUEST);
        check_problem(&headers, &body, "urn:keel:problem:bad-request").expect("problem");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!((a.requests(), b.requests()), (4, 0));
}

/// HTTP/2 frames made by hand, for what a well-behaved client library
/// will not send: `:scheme` without `:authority`, repeated pseudo-headers,
/// connection-specific headers.
mod raw_h2 {
    use super::*;

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len()).expect("frame size");
        let mut out = len.to_be_bytes()[1..].to_vec();
        out.extend([kind, flags]);
        out.extend(stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// A literal header field without indexing, new name, no Huffman.
    pub fn literal(name: &str, value: &str) -> Vec<u8> {
        let (name, value) = (name.as_bytes(), value.as_bytes());
        assert!(name.len() < 127 && value.len() < 127);
        let mut out = vec![0x00, name.len() as u8];
        out.extend_from_slice(name);
        out.push(value.len() as u8);
        out.extend_from_slice(value);
        out
    }

    /// `:method GET`, `:scheme http`, `:path /` from the static table.
    pub const GET_HTTP_ROOT: [u8; 3] = [0x82, 0x86, 0x84];

    #[derive(Debug, PartialEq, Eq)]
    pub enum H2Answer {
        /// A response whose `:status` is in HPACK's static table.
        Status(u16),
        /// A response with some other first header byte.
        OtherHeaders(u8),
        /// RST_STREAM with this error code.
        Reset(u32),
        /// GOAWAY with this error code, or the connection closed.
        Gone(Option<u32>),
    }

    /// Sends one request (stream 1) with `block` as its header block and
    /// END_STREAM, and reads until its answer.
    pub async fn send(addr: SocketAddr, block: &[u8]) -> H2Answer {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let mut out = PREFACE.to_vec();
        out.extend(frame(0x4, 0, 0, &[]));
        out.extend(frame(0x1, 0x5, 1, block));
        stream.write_all(&out).await.expect("write");
        let mut buf = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            while buf.len() >= 9 {
                let len =
                    usize::from(buf[0]) << 16 | usize::from(buf[1]) << 8 | usize::from(buf[2]);
                if buf.len() < 9 + len {
                    break;
                }
                let (kind, flags) = (buf[3], buf[4]);
                let id = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
                let payload: Vec<u8> = buf[9..9 + len].to_vec();
                buf.drain(..9 + len);
                let code = |p: &[u8], at: usize| {
                    p.get(at..at + 4)
                        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                };
                match (kind, id) {
                    (0x4, 0) if flags & 1 == 0 => {
                        let _ = stream.write_all(&frame(0x4, 1, 0, &[])).await;
                    }
                    (0x1, 1) => {
                        // Skip padding and priority when flagged.
                        let mut p = &payload[..];
                        if flags & 0x8 != 0 {
                            let pad = usize::from(p[0]);
                            p = &p[1..p.len() - pad];
                        }
                        if flags & 0x20 != 0 {
                            p = &p[5..];
                        }
                        return match p.first() {
                            Some(&b @ 0x88..=0x8e) => H2Answer::Status(
                                [200, 204, 206, 304, 400, 404, 500][usize::from(b - 0x88)],
                            ),
                            other => H2Answer::OtherHeaders(other.copied().unwrap_or(0)),
                        };
                    }
                    (0x3, 1) => return H2Answer::Reset(code(&payload, 0).unwrap_or(0)),
                    (0x7, 0) => return H2Answer::Gone(code(&payload, 4)),
                    _ => {}
                }
            }
            let mut chunk = [0u8; 8192];
            match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                _ => return H2Answer::Gone(None),
            }
        }
    }
}

#[tokio::test]
async fn http2_hand_made_frames() {
    use raw_h2::{GET_HTTP_ROOT, H2Answer, literal, send};
    const PROTOCOL_ERROR: u32 = 0x1;
    let a = TestUpstream::start().await;
    let b = TestUpstream::start().await;
    let keel = Keel::start("", &host_routes(a.addr, b.addr)).await;
    let block = |extra: &[(&str, &str)]| {
        let mut block = GET_HTTP_ROOT.to_vec();
        for (name, value) in extra {
            block.extend(literal(name, value));
        }
        block
    };

    // Host without :authority: RFC 9113 8.3.1 allows it; routed by Host.
    assert_eq!(
        send(keel.listen, &block(&[("host", "a.test")])).await,
        H2Answer::Status(200)
    );
    assert_eq!((a.requests(), b.requests()), (1, 0));
    // Neither: malformed for an http URI.
    assert_eq!(send(keel.listen, &block(&[])).await, H2Answer::Status(400));
    // :authority and Host in conflict, by hand too.
    assert_eq!(
        send(
            keel.listen,
            &block(&[(":authority", "a.test"), ("host", "b.test")])
        )
        .await,
        H2Answer::Status(400)
    );
    // An empty :authority.
    let empty_authority = send(
        keel.listen,
        &block(&[(":authority", ""), ("host", "a.test")]),
    )
    .await;
    assert!(
        matches!(
            empty_authority,
            H2Answer::Status(400) | H2Answer::Reset(PROTOCOL_ERROR)
        ),
        "{empty_authority:?}"
    );
    // Refused by the HTTP/2 layer before the gateway sees them.
    for (what, extra) in [
        (
            "two :authority",
            &[(":authority", "a.test"), (":authority", "b.test")][..],
        ),
        (
            "transfer-encoding",
            &[(":authority", "a.test"), ("transfer-encoding", "chunked")],
        ),
        (
            "connection",
            &[(":authority", "a.test"), ("connection", "keep-alive")],
        ),
        (
            "upper-case name",
            &[(":authority", "a.test"), ("X-Upper", "1")],
        ),
        (
            "pseudo-header after a regular one",
            &[("x-a", "1"), (":authority", "a.test")],
        ),
    ] {
        let answer = send(keel.listen, &block(extra)).await;
        assert!(
            matches!(
                answer,
                H2Answer::Reset(PROTOCOL_ERROR) | H2Answer::Gone(Some(PROTOCOL_ERROR))
            ),
            "{what}: {answer:?}"
        );
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!((a.requests(), b.requests()), (1, 0));
}

#[tokio::test]
async fn idempotency_problems_carry_the_request_id() {
    let upstream = TestUpstream::start().await;
    let config = format!(
        r#"
[store]
kind = "memory"

[upstreams.app]
endpoints = ["http://{}"]
request_timeout = "5s"

[[routes]]
name = "strict"
path_prefix = "/"
upstream = "app"

[routes.idempotency]
enabled = true
required = true
max_body = "1KiB"
"#,
        upstream.addr
    );
    let keel = Keel::start("", &config).await;
    wait_ready(keel.admin, StatusCode::OK).await;
    let gw = keel.listen;

    // 400: no key, then a key that is too long.
    let (status, headers, body) = post_keyed(gw, "/pay", None, None, "{}").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    check_problem(&headers, &body, "urn:keel:problem:idempotency-key-missing").expect("400");
    let long = "k".repeat(256);
    let (status, headers, body) = post_keyed(gw, "/pay", Some(&long), None, "{}").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    check_problem(&headers, &body, "urn:keel:problem:idempotency-key-invalid").expect("400");
    // A client's own x-request-id is the one in the body.
    let (status, headers, body) = request(
        gw,
        Request::post("/pay")
            .header(header::HOST, "gw.test")
            .header("x-request-id", "client-id-1")
            .body(full("{}"))
            .expect("request"),
    )
    .await
    .expect("request");
    assert_eq!(status, StatusCode::BAD_REQUEST);
    check_problem(&headers, &body, "urn:keel:problem:idempotency-key-missing").expect("400");
    assert_eq!(headers["x-request-id"], "client-id-1");

    // 413 over the route's idempotent body limit (the engine's refusal).
    let (status, headers, body) =
        post_keyed(gw, "/pay", Some("k-big"), None, &"x".repeat(2048)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&body).expect("json")["request_id"],
        headers["x-request-id"].to_str().expect("id")
    );

    // 422: the key again with another body.
    let (status, _, _) = post_keyed(gw, "/pay", Some("k-1"), None, r#"{"a":1}"#).await;
    assert_eq!(status, StatusCode::OK);
    let (status, headers, body) = post_keyed(gw, "/pay", Some("k-1"), None, r#"{"a":2}"#).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    check_problem(&headers, &body, "urn:keel:problem:idempotency-key-reused").expect("422");
    // A replay is the stored response, not a problem: untouched.
    let (status, headers, body) = post_keyed(gw, "/pay", Some("k-1"), None, r#"{"a":1}"#).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["idempotent-replayed"], "true");
    assert!(echo(&body).get("request_id").is_none());

    // 409: the first request with the key still running.
    let first = tokio::spawn(post_keyed(gw, "/slow/1500", Some("k-slow"), None, "{}"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, headers, body) = post_keyed(gw, "/slow/1500", Some("k-slow"), None, "{}").await;
    assert_eq!(status, StatusCode::CONFLICT);
    check_problem(&headers, &body, "urn:keel:problem:idempotency-in-flight").expect("409");
    assert_eq!(first.await.expect("first").0, StatusCode::OK);

    // 409: ran, but its response was too large to keep.
    let (status, _, _) = post_keyed(gw, "/big/32", Some("k-large"), None, "{}").await;
    assert_eq!(status, StatusCode::OK);
    let (status, headers, body) = post_keyed(gw, "/big/32", Some("k-large"), None, "{}").await;
    assert_eq!(status, StatusCode::CONFLICT);
    check_problem(
        &headers,
        &body,
        "urn:keel:problem:idempotency-response-not-stored",
    )
    .expect("409");
}
