//! Idle and slow clients against the real binary, over raw TCP sockets:
//! every phase of a connection on every protocol and listener ends within
//! its configured timeout, and not before it (so the timer is what closes
//! it, not an immediate refusal).
//!
//! The timeouts are short and distinct, so that each test can tell which one
//! fired: `header_read_timeout` 1 s, `idle_timeout` 2 s, and the HTTP/2
//! GOAWAY grace (`http2_keep_alive_timeout`) 1 s.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{Keel, TestUpstream, empty};
use http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HEADER_READ: Duration = Duration::from_secs(1);
const IDLE: Duration = Duration::from_secs(2);
const GOAWAY_GRACE: Duration = Duration::from_secs(1);
/// How much earlier than its timeout a close may be seen (timer and clock
/// granularity).
const EARLY: Duration = Duration::from_millis(150);
/// How much later than its timeout a close may come on a busy machine.
const LATE: Duration = Duration::from_millis(1500);

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame.
const SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];

const FRAME_SETTINGS: u8 = 0x4;
const FRAME_PING: u8 = 0x6;
const FRAME_GOAWAY: u8 = 0x7;

fn server(extra: &str) -> String {
    format!(
        "idle_timeout = \"{}ms\"\nheader_read_timeout = \"{}ms\"\nhttp2_keep_alive_timeout = \"{}ms\"\n{extra}",
        IDLE.as_millis(),
        HEADER_READ.as_millis(),
        GOAWAY_GRACE.as_millis()
    )
}

async fn keel(extra: &str) -> (Keel, TestUpstream) {
    let upstream = TestUpstream::start().await;
    let keel = Keel::in_front_of(upstream.addr, &server(extra), "").await;
    (keel, upstream)
}

/// Asserts that `elapsed` is `expected` give or take the margins.
#[track_caller]
fn assert_within(what: &str, elapsed: Duration, expected: Duration) {
    assert!(
        elapsed + EARLY >= expected,
        "{what}: closed after {elapsed:?}, before its timeout of {expected:?}"
    );
    assert!(
        elapsed <= expected + LATE,
        "{what}: closed after {elapsed:?}, well after its timeout of {expected:?}"
    );
}

/// Reads (and discards) until the peer closes; returns when that happened.
/// A reset counts as a close. Gives up after 15 s.
async fn wait_closed(stream: &mut TcpStream) -> Instant {
    let until = Instant::now() + Duration::from_secs(15);
    let mut buf = [0u8; 4096];
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return Instant::now(),
            Ok(Ok(_)) => {}
            Err(_) => panic!("the connection was still open after 15 s"),
        }
    }
}

/// Sends one byte of `bytes` every `every`, until the peer closes (a write
/// or a read fails or reads EOF); returns when that happened.
async fn dribble(stream: &mut TcpStream, bytes: &[u8], every: Duration) -> Instant {
    let mut buf = [0u8; 4096];
    for byte in bytes.iter().cycle().take(200) {
        if stream.write_all(&[*byte]).await.is_err() {
            return Instant::now();
        }
        match tokio::time::timeout(every, stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return Instant::now(),
            Ok(Ok(n)) => panic!(
                "unexpected answer to a partial head: {:?}",
                String::from_utf8_lossy(&buf[..n])
            ),
            Err(_) => {}
        }
    }
    panic!("the connection was still open after 200 slow bytes");
}

/// Reads one response with a `Content-Length` body off a raw HTTP/1 socket.
async fn read_response(stream: &mut TcpStream) -> String {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("response in time")
            .expect("read");
        assert!(n > 0, "closed before the response was complete");
        data.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&data).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text[..end]
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .expect("content-length");
            if data.len() >= end + 4 + length {
                return text;
            }
        }
    }
}

/// Reads one HTTP/2 frame: (type, payload).
async fn read_frame(stream: &mut TcpStream, within: Duration) -> Option<(u8, Vec<u8>)> {
    let mut head = [0u8; 9];
    match tokio::time::timeout(within, stream.read_exact(&mut head)).await {
        Ok(Ok(_)) => {}
        Ok(Err(_)) => return None,
        Err(_) => panic!("no frame within {within:?}"),
    }
    let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).await.ok()?;
    Some((head[3], payload))
}

async fn connect(addr: SocketAddr) -> (TcpStream, Instant) {
    let stream = TcpStream::connect(addr).await.expect("connect");
    (stream, Instant::now())
}

fn get_request(addr: SocketAddr) -> Vec<u8> {
    format!("GET /x HTTP/1.1\r\nHost: {addr}\r\n\r\n").into_bytes()
}

#[tokio::test]
async fn idle_http1_connection_is_closed_after_idle_timeout() {
    let (keel, _upstream) = keel("").await;
    let (mut stream, _) = connect(keel.listen).await;
    stream
        .write_all(&get_request(keel.listen))
        .await
        .expect("write");
    let response = read_response(&mut stream).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    // Kept alive for idle_timeout (2 s), not header_read_timeout (1 s).
    let idle_from = Instant::now();
    let closed = wait_closed(&mut stream).await;
    assert_within("idle HTTP/1", closed - idle_from, IDLE);
}

#[tokio::test]
async fn new_connection_without_a_request_is_closed_after_header_read_timeout() {
    let (keel, _upstream) = keel("").await;
    let (mut stream, opened) = connect(keel.listen).await;
    let closed = wait_closed(&mut stream).await;
    assert_within("silent new connection", closed - opened, HEADER_READ);
}

#[tokio::test]
async fn slow_http1_heads_are_closed_after_header_read_timeout() {
    let (keel, _upstream) = keel("").await;
    let every = Duration::from_millis(100);

    // On a new connection: from the accept.
    let (mut stream, opened) = connect(keel.listen).await;
    let closed = dribble(&mut stream, b"GET / HTTP/1.1\r\nX-Slow: yes\r\n", every).await;
    assert_within("slow first head", closed - opened, HEADER_READ);

    // On a kept-alive connection: from the first byte of the next head,
    // however long the connection was idle before it.
    let (mut stream, _) = connect(keel.listen).await;
    stream
        .write_all(&get_request(keel.listen))
        .await
        .expect("write");
    let response = read_response(&mut stream).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let started = Instant::now();
    let closed = dribble(&mut stream, b"GET / HTTP/1.1\r\nX-Slow: yes\r\n", every).await;
    assert_within("slow second head", closed - started, HEADER_READ);
}

#[tokio::test]
async fn idle_http2_gets_goaway_and_is_closed() {
    let (keel, _upstream) = keel("").await;
    let (mut stream, _) = connect(keel.listen).await;
    stream.write_all(PREFACE).await.expect("write");
    stream.write_all(SETTINGS).await.expect("write");
    let sent = Instant::now();
    // The server's SETTINGS, its ACK of ours, maybe a WINDOW_UPDATE; then
    // nothing until the idle timeout, then GOAWAY (and a PING the client
    // never answers).
    let mut goaway = None;
    let mut kinds = Vec::new();
    while let Some((kind, payload)) = read_frame(&mut stream, Duration::from_secs(15)).await {
        kinds.push(kind);
        if kind == FRAME_GOAWAY && goaway.is_none() {
            goaway = Some(Instant::now());
            let error_code = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
            assert_eq!(error_code, 0, "GOAWAY with NO_ERROR");
        }
    }
    let closed = Instant::now();
    assert!(kinds.contains(&FRAME_SETTINGS), "{kinds:?}");
    let goaway = goaway.unwrap_or_else(|| panic!("no GOAWAY; frames: {kinds:?}"));
    assert_within("GOAWAY on idle HTTP/2", goaway - sent, IDLE);
    // A client that does not answer the GOAWAY is cut after the grace.
    assert_within("idle HTTP/2 close", closed - goaway, GOAWAY_GRACE);
}

#[tokio::test]
async fn idle_http2_client_that_answers_is_closed_at_idle_timeout() {
    let (keel, _upstream) = keel("").await;
    let stream = TcpStream::connect(keel.listen).await.expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    let connection = tokio::spawn(connection);
    let response = sender
        .send_request(
            Request::get(format!("http://{}/x", keel.listen))
                .body(empty())
                .expect("request"),
        )
        .await
        .expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    response.into_body().collect().await.expect("body");
    let idle_from = Instant::now();
    // hyper's client answers the GOAWAY's PING, so the server closes at
    // once, without waiting out the grace.
    let ended = tokio::time::timeout(Duration::from_secs(15), connection).await;
    assert!(ended.is_ok(), "the HTTP/2 connection was still open");
    let elapsed = idle_from.elapsed();
    assert_within("idle HTTP/2 (answering client)", elapsed, IDLE);
    assert!(
        elapsed < IDLE + GOAWAY_GRACE,
        "closed after {elapsed:?}: the grace was waited out for a client that answered"
    );
}

#[tokio::test]
async fn partial_http2_preface_is_closed_after_header_read_timeout() {
    let (keel, _upstream) = keel("").await;
    let (mut stream, opened) = connect(keel.listen).await;
    stream.write_all(&PREFACE[..16]).await.expect("write");
    let closed = wait_closed(&mut stream).await;
    assert_within("partial preface", closed - opened, HEADER_READ);

    // The rest of the preface sent byte by byte, too slowly: the deadline
    // counts from the accept, not from the last byte.
    let (mut stream, opened) = connect(keel.listen).await;
    let closed = dribble(&mut stream, PREFACE, Duration::from_millis(100)).await;
    assert_within("slow preface", closed - opened, HEADER_READ);
}

#[tokio::test]
async fn half_closed_partial_preface_is_closed_at_once() {
    let (keel, _upstream) = keel("").await;
    let (mut stream, opened) = connect(keel.listen).await;
    stream.write_all(&PREFACE[..16]).await.expect("write");
    stream.shutdown().await.expect("half-close");
    let closed = wait_closed(&mut stream).await;
    assert!(
        closed - opened < HEADER_READ / 2,
        "a half-closed partial preface was held for {:?}",
        closed - opened
    );
}

#[tokio::test]
async fn half_closed_partial_head_is_closed_at_once() {
    let (keel, _upstream) = keel("").await;
    let (mut stream, opened) = connect(keel.listen).await;
    stream
        .write_all(b"GET /x HTTP/1.1\r\nHost: a\r\n")
        .await
        .expect("write");
    stream.shutdown().await.expect("half-close");
    let closed = wait_closed(&mut stream).await;
    assert!(
        closed - opened < HEADER_READ / 2,
        "a half-closed partial head was held for {:?}",
        closed - opened
    );
}

#[tokio::test]
async fn heads_and_prefaces_in_several_segments_are_served() {
    // The sniffer waits for new bytes after each partial peek: a pause
    // between segments (shorter than the timeout) loses nothing.
    let (keel, _upstream) = keel("").await;
    let pause = Duration::from_millis(300);

    let (mut stream, _) = connect(keel.listen).await;
    let request = get_request(keel.listen);
    for part in request.chunks(7) {
        stream.write_all(part).await.expect("write");
        tokio::time::sleep(pause / 4).await;
    }
    let response = read_response(&mut stream).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");

    let (mut stream, _) = connect(keel.listen).await;
    stream.write_all(&PREFACE[..5]).await.expect("write");
    tokio::time::sleep(pause).await;
    stream.write_all(&PREFACE[5..20]).await.expect("write");
    tokio::time::sleep(pause).await;
    stream.write_all(&PREFACE[20..]).await.expect("write");
    stream.write_all(SETTINGS).await.expect("write");
    let (kind, _) = read_frame(&mut stream, Duration::from_secs(2))
        .await
        .expect("a frame");
    assert_eq!(kind, FRAME_SETTINGS, "the server's SETTINGS first");
}

#[tokio::test]
async fn unanswered_http2_pings_close_a_busy_connection() {
    // A dead peer with a request in flight: the idle timer does not run,
    // the keep-alive PING finds it.
    let (keel, _upstream) = keel("http2_keep_alive_interval = \"1s\"").await;
    let (mut stream, _) = connect(keel.listen).await;
    stream.write_all(PREFACE).await.expect("write");
    stream.write_all(SETTINGS).await.expect("write");
    // HEADERS on stream 1, END_STREAM | END_HEADERS: GET /slow/10000 with
    // literal header fields (no Huffman, no indexing).
    let mut block = vec![0x82, 0x86]; // :method GET, :scheme http
    for (index, value) in [(4u8, "/slow/10000"), (1, "h2.test")] {
        block.push(index); // literal without indexing, indexed name
        block.push(u8::try_from(value.len()).expect("short"));
        block.extend_from_slice(value.as_bytes());
    }
    let len = u8::try_from(block.len()).expect("short block");
    let mut frame = vec![0, 0, len, 0x1, 0x5, 0, 0, 0, 1];
    frame.extend_from_slice(&block);
    stream.write_all(&frame).await.expect("write");
    let sent = Instant::now();
    let mut ping = None;
    let mut kinds = Vec::new();
    while let Some((kind, _)) = read_frame(&mut stream, Duration::from_secs(15)).await {
        kinds.push(kind);
        if kind == FRAME_PING && ping.is_none() {
            ping = Some(Instant::now());
        }
    }
    let closed = Instant::now();
    let ping = ping.unwrap_or_else(|| panic!("no PING; frames: {kinds:?}"));
    assert_within("keep-alive PING", ping - sent, Duration::from_secs(1));
    // Closed one keep-alive timeout (1 s) after the PING, with the upstream
    // still working on the request (10 s).
    assert_within("unanswered PING", closed - ping, Duration::from_secs(1));
}

#[tokio::test]
async fn slow_heads_on_the_admin_port_are_closed_after_header_read_timeout() {
    let (keel, _upstream) = keel("").await;
    let (mut stream, opened) = connect(keel.admin).await;
    let closed = dribble(
        &mut stream,
        b"GET /healthz HTTP/1.1\r\nX-Slow: yes\r\n",
        Duration::from_millis(100),
    )
    .await;
    assert_within("slow admin head", closed - opened, HEADER_READ);

    // An idle admin connection too.
    let (mut stream, opened) = connect(keel.admin).await;
    let closed = wait_closed(&mut stream).await;
    assert_within("idle admin connection", closed - opened, HEADER_READ);
}

#[tokio::test]
async fn admin_connections_over_the_cap_wait_for_a_slot() {
    let (keel, _upstream) = keel("admin_max_connections = 2").await;
    // Two silent connections take both slots (until header_read_timeout).
    let (mut a, opened) = connect(keel.admin).await;
    let (mut b, _) = connect(keel.admin).await;
    // A third is accepted by the kernel but served only once a slot frees.
    let third = tokio::spawn({
        let admin = keel.admin;
        async move {
            let stream = TcpStream::connect(admin).await.expect("connect");
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .expect("handshake");
            tokio::spawn(connection);
            let response = sender
                .send_request(
                    Request::get("/healthz")
                        .header(header::HOST, admin.to_string())
                        .body(empty())
                        .expect("request"),
                )
                .await
                .expect("response");
            (response.status(), Instant::now())
        }
    });
    let (status, answered) = tokio::time::timeout(Duration::from_secs(10), third)
        .await
        .expect("answered in time")
        .expect("task");
    assert_eq!(status, StatusCode::OK);
    assert_within("admin request over the cap", answered - opened, HEADER_READ);
    wait_closed(&mut a).await;
    wait_closed(&mut b).await;
}
