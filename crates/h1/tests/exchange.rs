//! Exchanges against scripted upstreams on real loopback sockets: each
//! upstream reads what the test says, answers with exact bytes, and tells
//! the test what it received, so every fault happens at a known point.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Empty, Full};
use keel_h1::{Connection, Error, OnUpgrade, Pool};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// A pool that counts and keeps what is checked in.
#[derive(Debug, Default)]
#[expect(
    clippy::vec_box,
    reason = "the pool trait hands over boxed connections"
)]
struct Kept(Mutex<Vec<Box<Connection>>>);

impl Pool for Kept {
    fn checkin(&self, connection: Box<Connection>) {
        self.0.lock().expect("pool").push(connection);
    }
}

impl Kept {
    fn take(&self) -> Option<Box<Connection>> {
        self.0.lock().expect("pool").pop()
    }
    fn len(&self) -> usize {
        self.0.lock().expect("pool").len()
    }
}

fn pool() -> (Arc<Kept>, Arc<dyn Pool>) {
    let kept = Arc::new(Kept::default());
    let pool: Arc<dyn Pool> = kept.clone();
    (kept, pool)
}

/// A connected pair: the gateway's side as a `Connection`, the upstream's
/// as a plain socket.
async fn pair() -> (Box<Connection>, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let client = TcpStream::connect(listener.local_addr().expect("addr"))
        .await
        .expect("connect");
    let (server, _) = listener.accept().await.expect("accept");
    (Connection::new(client, Box::new(())), server)
}

/// Reads one request head (through the blank line) from the upstream side.
async fn read_head(server: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = server.read(&mut byte).await.expect("read");
        assert_eq!(n, 1, "the request head ended early: {head:?}");
        head.push(byte[0]);
    }
    String::from_utf8(head).expect("ascii head")
}

/// The upstream's side of one exchange: reads the request head, writes
/// `answer`, and gives back the head and the socket (drop it to close).
fn answer_once(
    mut server: TcpStream,
    answer: &'static [u8],
) -> tokio::task::JoinHandle<(String, TcpStream)> {
    tokio::spawn(async move {
        let head = read_head(&mut server).await;
        server.write_all(answer).await.expect("write");
        (head, server)
    })
}

async fn read_exact(server: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut body = vec![0u8; n];
    server.read_exact(&mut body).await.expect("read body");
    body
}

/// Sends `request` on `connection` (its head by reference, as the gateway
/// keeps it for another attempt).
async fn send<B>(
    connection: Box<Connection>,
    request: Request<B>,
    pool: &Arc<dyn Pool>,
) -> Result<http::Response<keel_h1::ResponseBody>, keel_h1::Failure<B>>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<keel_h1::BoxError>,
{
    let (head, body) = request.into_parts();
    connection
        .send(&head, &keel_h1::ExtraLines::new(), body, pool)
        .await
}

/// The whole body of a response that is expected to end well.
async fn body_of(response: http::Response<keel_h1::ResponseBody>) -> Bytes {
    response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes()
}

fn get(path: &str) -> Request<Empty<Bytes>> {
    Request::get(path)
        .header("host", "upstream")
        .body(Empty::new())
        .expect("request")
}

#[tokio::test]
async fn a_response_read_with_its_head_frees_the_connection_at_once() {
    let (connection, mut server) = pair().await;
    let (kept, pool) = pool();
    let upstream = tokio::spawn(async move {
        let first = read_head(&mut server).await;
        server
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nfirst")
            .await
            .expect("write");
        let second = read_head(&mut server).await;
        server
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 6\r\n\r\nsecond")
            .await
            .expect("write");
        (first, second)
    });
    let response = send(connection, get("/a?b=c"), &pool).await.expect("first");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-a"], "1");
    assert_eq!(kept.len(), 1, "back in the pool before the body is read");
    assert_eq!(body_of(response).await, "first");

    let again = kept.take().expect("pooled");
    let response = send(again, get("/next"), &pool).await.expect("second");
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(body_of(response).await, "second");
    let (first, second) = upstream.await.expect("upstream");
    assert_eq!(first, "GET /a?b=c HTTP/1.1\r\nhost: upstream\r\n\r\n");
    assert!(second.starts_with("GET /next HTTP/1.1\r\n"));
}

#[tokio::test]
async fn a_chunked_response_streams_and_returns_the_connection_at_its_end() {
    let (connection, mut server) = pair().await;
    let (kept, pool) = pool();
    let (more_tx, mut more_rx) = mpsc::channel::<()>(1);
    let upstream = tokio::spawn(async move {
        read_head(&mut server).await;
        server
            .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            .await
            .expect("write");
        more_rx.recv().await;
        server
            .write_all(b"6\r\n world\r\n0\r\nx-t: 1\r\n\r\n")
            .await
            .expect("write");
        server
    });
    let response = send(connection, get("/"), &pool).await.expect("response");
    let mut body = response.into_body();
    let first = body
        .frame()
        .await
        .expect("frame")
        .expect("ok")
        .into_data()
        .expect("data");
    assert_eq!(first, "hello");
    assert_eq!(kept.len(), 0, "not back while the body is still coming");
    more_tx.send(()).await.expect("signal");
    let rest = body.collect().await.expect("rest").to_bytes();
    assert_eq!(rest, " world");
    assert_eq!(
        kept.len(),
        1,
        "back once the last chunk and trailers are read"
    );
    drop(upstream.await.expect("upstream"));
}

#[tokio::test]
async fn interim_responses_are_skipped_and_bodies_are_framed_by_length() {
    let (connection, mut server) = pair().await;
    let (_kept, pool) = pool();
    let upstream = tokio::spawn(async move {
        let head = read_head(&mut server).await;
        let body = read_exact(&mut server, 11).await;
        server
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
            .await
            .expect("write");
        (head, body)
    });
    let request = Request::post("/upload")
        .header("host", "upstream")
        .header("expect", "100-continue")
        // A stale framing header never reaches the wire.
        .header("content-length", "999")
        .body(Full::new(Bytes::from_static(b"hello world")))
        .expect("request");
    let response = send(connection, request, &pool).await.expect("response");
    assert_eq!(response.status(), StatusCode::CREATED);
    let (head, body) = upstream.await.expect("upstream");
    assert_eq!(
        head,
        "POST /upload HTTP/1.1\r\nhost: upstream\r\nexpect: 100-continue\r\ncontent-length: 11\r\n\r\n"
    );
    assert_eq!(body, b"hello world");
}

/// A request body that sends one frame, then waits forever.
#[derive(Debug)]
struct Endless(Option<Bytes>);

impl Body for Endless {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.0.take() {
            Some(bytes) => Poll::Ready(Some(Ok(Frame::data(bytes)))),
            None => Poll::Pending,
        }
    }
    fn size_hint(&self) -> SizeHint {
        SizeHint::new()
    }
}

#[tokio::test]
async fn an_early_answer_ends_an_unfinished_upload_and_the_connection() {
    let (connection, mut server) = pair().await;
    let (kept, pool) = pool();
    let upstream = tokio::spawn(async move {
        let head = read_head(&mut server).await;
        // The first chunk, then the answer without reading further.
        let chunk = read_exact(&mut server, b"5\r\nfirst\r\n".len()).await;
        server
            .write_all(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 3\r\n\r\nbig")
            .await
            .expect("write");
        (head, chunk, server)
    });
    let request = Request::put("/big")
        .header("host", "upstream")
        .body(Endless(Some(Bytes::from_static(b"first"))))
        .expect("request");
    let response = send(connection, request, &pool).await.expect("an answer");
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body_of(response).await, "big");
    assert_eq!(
        kept.len(),
        0,
        "the upstream still expects the rest: not reused"
    );
    let (head, chunk, _server) = upstream.await.expect("upstream");
    assert!(head.contains("transfer-encoding: chunked\r\n"), "{head}");
    assert_eq!(chunk, b"5\r\nfirst\r\n");
}

#[tokio::test]
async fn malformed_answers_are_errors_and_never_pooled() {
    for answer in [
        &b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"[..],
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
        b"HTTP/1.1 99 Odd\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
    ] {
        let (connection, server) = pair().await;
        let (kept, pool) = pool();
        let upstream = answer_once(server, answer);
        let failure = send(connection, get("/"), &pool)
            .await
            .expect_err("invalid");
        assert!(
            matches!(failure.error, Error::Invalid(_)),
            "{:?}: {}",
            String::from_utf8_lossy(answer),
            failure.error
        );
        assert!(
            failure.sent && failure.unsent.is_none(),
            "the request was sent"
        );
        assert_eq!(kept.len(), 0);
        drop(upstream.await.expect("upstream"));
    }
}

#[tokio::test]
async fn bodies_cut_short_or_badly_chunked_fail_as_frames() {
    for (answer, what) in [
        (
            &b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"[..],
            "closed",
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
            "closed",
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n",
            "invalid",
        ),
    ] {
        let (connection, server) = pair().await;
        let (kept, pool) = pool();
        let upstream = answer_once(server, answer);
        let response = send(connection, get("/"), &pool).await.expect("a head");
        // Closed after the answer: the body is cut where it is.
        drop(upstream.await.expect("upstream"));
        let error = response
            .into_body()
            .collect()
            .await
            .expect_err("a broken body");
        let error = error.downcast::<Error>().expect("keel_h1::Error");
        match what {
            "closed" => assert!(matches!(*error, Error::Closed), "{error}"),
            _ => assert!(matches!(*error, Error::Invalid(_)), "{error}"),
        }
        assert_eq!(kept.len(), 0, "a broken body's connection is not reused");
    }
}

#[tokio::test]
async fn a_body_until_close_ends_at_the_fin_and_closes() {
    let (connection, server) = pair().await;
    let (kept, pool) = pool();
    let upstream = answer_once(server, b"HTTP/1.1 200 OK\r\n\r\nall of it");
    let response = send(connection, get("/"), &pool).await.expect("head");
    drop(upstream.await.expect("upstream"));
    let body = body_of(response).await;
    assert_eq!(body, "all of it");
    assert_eq!(kept.len(), 0);
}

#[tokio::test]
async fn the_upstream_closing_before_answering_is_an_error_of_a_sent_request() {
    let (connection, server) = pair().await;
    let (_kept, pool) = pool();
    // Reads the head, answers nothing and closes.
    let upstream = tokio::spawn(async move {
        let (_, server) = answer_once(server, b"").await.expect("upstream");
        drop(server);
    });
    let failure = send(connection, get("/"), &pool).await.expect_err("closed");
    upstream.await.expect("upstream");
    assert!(matches!(failure.error, Error::Closed), "{}", failure.error);
    assert!(
        failure.sent && failure.unsent.is_none(),
        "it was written: maybe seen"
    );
}

#[tokio::test]
async fn an_idle_connection_the_upstream_closed_is_not_reusable() {
    let (mut connection, server) = pair().await;
    assert!(connection.is_reusable(), "open and quiet");
    drop(server);
    // Wait for the runtime to see the FIN (an event, bounded by the
    // timeout, not a sleep): is_reusable then sees it without reading.
    let closed = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        loop {
            if !connection.is_reusable() {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(closed.is_ok(), "the FIN was seen");
}

#[tokio::test]
async fn an_upgrade_hands_over_the_socket_and_the_bytes_read_after_the_head() {
    let (connection, server) = pair().await;
    let (kept, pool) = pool();
    let upstream = answer_once(
        server,
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nearly",
    );
    let request = Request::builder()
        .method(Method::GET)
        .uri("/ws")
        .header("host", "upstream")
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .body(Empty::<Bytes>::new())
        .expect("request");
    let mut response = send(connection, request, &pool).await.expect("101");
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    let upgrade = response
        .extensions_mut()
        .remove::<OnUpgrade>()
        .expect("the extension");
    let mut upgraded = upgrade.take().expect("the connection");
    assert!(upgrade.take().is_none(), "taken once");
    assert_eq!(kept.len(), 0);
    let mut pending = upgraded.pending.to_vec();
    while pending.len() < 5 {
        let mut more = [0u8; 16];
        let n = upgraded.stream.read(&mut more).await.expect("read");
        pending.extend_from_slice(&more[..n]);
    }
    assert_eq!(pending, b"early");
    upgraded.stream.write_all(b"ping").await.expect("write");
    let (head, mut server) = upstream.await.expect("upstream");
    assert!(head.contains("upgrade: websocket\r\n"), "{head}");
    assert_eq!(read_exact(&mut server, 4).await, b"ping");
}

/// A request body that fails at once, as a client's broken upload does.
#[derive(Debug)]
struct Broken;

impl Body for Broken {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        Poll::Ready(Some(Err(std::io::ErrorKind::UnexpectedEof.into())))
    }
}

#[tokio::test]
async fn a_body_that_fails_before_anything_is_written_sends_nothing() {
    let (connection, mut server) = pair().await;
    let (_kept, pool) = pool();
    let request = Request::post("/")
        .header("host", "upstream")
        .body(Broken)
        .expect("request");
    let failure = send(connection, request, &pool).await.expect_err("broken");
    assert!(matches!(failure.error, Error::Body(_)), "{}", failure.error);
    assert!(!failure.sent, "not a byte went out");
    assert!(
        failure.unsent.is_none(),
        "a failed body cannot go out again"
    );
    let mut seen = Vec::new();
    server.read_to_end(&mut seen).await.expect("read");
    assert!(seen.is_empty(), "{seen:?}");
}
