//! Fault-injection support for `exactly_once.rs`: an upstream that counts
//! executions per `Idempotency-Key` and can hold requests or stream a slow
//! body, a raw upstream that answers 101 unasked, a private `redis-server`
//! child that can be paused (SIGSTOP), resumed and killed, and client
//! helpers that tell a replay from an execution.
#![allow(dead_code, reason = "each test uses a different subset")]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::common::{BoxBody, full};

/// Polls `check` every 10 ms until it holds; panics with `what` after
/// `within`.
pub async fn wait_until(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Shared state of a [`CountingUpstream`].
#[derive(Default)]
struct State {
    /// Executions per `Idempotency-Key` value ("" for none).
    per_key: Mutex<HashMap<String, usize>>,
    /// Executions in all.
    total: AtomicUsize,
    /// Slow-body chunks handed to the connection so far (all requests).
    chunks_sent: AtomicUsize,
    /// Requests on `/hold...` currently waiting for [`CountingUpstream::open`].
    holding: AtomicUsize,
}

/// The fault suite's upstream. Every request it receives is counted as an
/// execution of its `Idempotency-Key` (the request reached the service).
/// The body it answers names the key and the execution number, so a
/// replay (same body) is told apart from a second execution.
///
/// Paths:
/// - `/hold...`: waits until the test calls [`CountingUpstream::open`]
///   (at once when already open), then answers 200;
/// - `/slowbody...`: sends the head at once and 6 chunks, one a second;
/// - `/big...`: a 64 KiB body;
/// - anything else: a short body at once.
pub struct CountingUpstream {
    pub addr: SocketAddr,
    state: Arc<State>,
    open: watch::Sender<bool>,
}

/// Slow-body shape: this many chunks, one per interval.
pub const SLOW_CHUNKS: usize = 6;
pub const SLOW_INTERVAL: Duration = Duration::from_secs(1);

/// A body fed by a channel (for the slow response).
struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok(Frame::data(b))))
    }
}

async fn handle(
    state: Arc<State>,
    mut open: watch::Receiver<bool>,
    request: Request<Incoming>,
) -> Response<BoxBody> {
    let path = request.uri().path().to_owned();
    let key = request
        .headers()
        .get("idempotency-key")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    let n = {
        let mut per_key = state.per_key.lock().expect("counts");
        let n = per_key.entry(key.clone()).or_default();
        *n += 1;
        *n
    };
    state.total.fetch_add(1, Ordering::SeqCst);
    // The request's body is read whole, as a service would.
    let _ = request.into_body().collect().await;
    let text = format!("ran {path} key={key} execution={n}\n");
    if path.starts_with("/hold") {
        state.holding.fetch_add(1, Ordering::SeqCst);
        let _ = open.wait_for(|open| *open).await;
        state.holding.fetch_sub(1, Ordering::SeqCst);
        return Response::new(full(text));
    }
    if path.starts_with("/slowbody") {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let state = state.clone();
        tokio::spawn(async move {
            for i in 0..SLOW_CHUNKS {
                tokio::time::sleep(SLOW_INTERVAL).await;
                let chunk = if i == 0 {
                    Bytes::from(text.clone())
                } else {
                    Bytes::from(format!("chunk {i}\n"))
                };
                if tx.send(chunk).await.is_err() {
                    return;
                }
                state.chunks_sent.fetch_add(1, Ordering::SeqCst);
            }
        });
        return Response::builder()
            .header(header::CONTENT_TYPE, "text/plain")
            .body(ChannelBody(rx).map_err(|e| match e {}).boxed())
            .expect("response");
    }
    if path.starts_with("/big") {
        let mut body = text.into_bytes();
        body.resize(64 * 1024, b'.');
        return Response::new(full(body));
    }
    Response::builder()
        .header(header::CONTENT_TYPE, "text/plain")
        .body(full(text))
        .expect("response")
}

impl CountingUpstream {
    /// Starts on a free port with `/hold` closed.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(State::default());
        let (open, _) = watch::channel(false);
        let accept_state = state.clone();
        let accept_open = open.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = accept_state.clone();
                let open = accept_open.subscribe();
                tokio::spawn(async move {
                    let _ = http1::Builder::new()
                        .serve_connection(
                            TokioIo::new(stream),
                            service_fn(move |r| {
                                let state = state.clone();
                                let open = open.clone();
                                async move { Ok::<_, Infallible>(handle(state, open, r).await) }
                            }),
                        )
                        .await;
                });
            }
        });
        CountingUpstream { addr, state, open }
    }

    /// How many times the request with `key` was executed.
    pub fn executions(&self, key: &str) -> usize {
        self.state
            .per_key
            .lock()
            .expect("counts")
            .get(key)
            .copied()
            .unwrap_or(0)
    }

    /// Executions of every key.
    pub fn total(&self) -> usize {
        self.state.total.load(Ordering::SeqCst)
    }

    /// Slow-body chunks sent so far.
    pub fn chunks_sent(&self) -> usize {
        self.state.chunks_sent.load(Ordering::SeqCst)
    }

    /// Requests waiting on `/hold` right now.
    pub fn holding(&self) -> usize {
        self.state.holding.load(Ordering::SeqCst)
    }

    /// Lets every held request (and every later one) answer.
    pub fn open(&self) {
        self.open.send_replace(true);
    }

    /// Waits (bounded) until `n` requests are held on `/hold`.
    pub async fn wait_holding(&self, n: usize, within: Duration) {
        wait_until(
            &format!("{n} requests held at the upstream"),
            within,
            || self.holding() >= n,
        )
        .await;
    }
}

/// A raw upstream that answers every request `101 Switching Protocols`
/// whether or not it asked to upgrade, counting executions per key.
pub struct SwitchingUpstream {
    pub addr: SocketAddr,
    per_key: Arc<Mutex<HashMap<String, usize>>>,
}

impl SwitchingUpstream {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let per_key: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let counts = per_key.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let counts = counts.clone();
                tokio::spawn(async move {
                    let Some(head) = read_head(&mut stream).await else {
                        return;
                    };
                    let key = head_value(&head, "idempotency-key").unwrap_or_default();
                    *counts.lock().expect("counts").entry(key).or_default() += 1;
                    let _ = stream
                        .write_all(
                            b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: surprise\r\n\r\n",
                        )
                        .await;
                    // Keep the "tunnel" open a while, then close it.
                    let mut sink = [0u8; 1024];
                    let _ = tokio::time::timeout(Duration::from_secs(5), async {
                        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
                    })
                    .await;
                });
            }
        });
        SwitchingUpstream { addr, per_key }
    }

    pub fn executions(&self, key: &str) -> usize {
        self.per_key
            .lock()
            .expect("counts")
            .get(key)
            .copied()
            .unwrap_or(0)
    }
}

/// Reads a request head (and a `content-length` body) from `stream`;
/// returns the head's text.
async fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let length: usize = head_value(&head, "content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut have = buf.len() - end;
    while have < length {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        have += n;
    }
    Some(head)
}

fn head_value(head: &str, name: &str) -> Option<String> {
    head.lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(n, _)| n.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim().to_owned())
}

/// One answer from the gateway.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn replayed(&self) -> bool {
        self.header("idempotent-replayed") == Some("true")
    }

    /// The problem+json `type`, or "" for another body.
    pub fn problem(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v["type"].as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub const OUTCOME_UNKNOWN: &str = "urn:keel:problem:idempotency-outcome-unknown";
pub const IN_FLIGHT: &str = "urn:keel:problem:idempotency-in-flight";
pub const STORE_FULL: &str = "urn:keel:problem:idempotency-store-full";
pub const STORE_UNAVAILABLE: &str = "urn:keel:problem:idempotency-store-unavailable";
pub const NOT_STORED: &str = "urn:keel:problem:idempotency-response-not-stored";
pub const UPGRADE_REFUSED: &str = "urn:keel:problem:idempotency-upgrade-refused";
pub const REQUEST_TIMEOUT: &str = "urn:keel:problem:request-timeout";

/// A keyed POST with extra headers; an error when the connection breaks.
pub async fn send(
    gw: SocketAddr,
    path: &str,
    key: Option<&str>,
    authorization: Option<&str>,
    extra: &[(&str, &str)],
    body: &str,
) -> Result<Reply, Box<dyn std::error::Error + Send + Sync>> {
    let mut builder = Request::post(path)
        .header(header::HOST, "gw.test")
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    if let Some(auth) = authorization {
        builder = builder.header(header::AUTHORIZATION, auth);
    }
    for (name, value) in extra {
        builder = builder.header(*name, *value);
    }
    let (status, headers, body) =
        crate::common::request(gw, builder.body(full(body.to_owned())).expect("request")).await?;
    Ok(Reply {
        status,
        headers,
        body,
    })
}

/// A keyed POST that must get an answer.
pub async fn post(gw: SocketAddr, path: &str, key: &str, authorization: Option<&str>) -> Reply {
    send(gw, path, Some(key), authorization, &[], "{}")
        .await
        .unwrap_or_else(|e| panic!("POST {path} key={key}: {e}"))
}

/// What a retry of a key that executed once may get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryAnswer {
    Replay,
    OutcomeUnknown,
}

/// Checks that `reply` (a retry of a key that already executed) is the
/// replay (`first`, when known, is the body the execution answered) or the
/// outcome-unknown 409, never a new execution.
pub fn retry_answer(what: &str, reply: &Reply, first: Option<&Bytes>) -> RetryAnswer {
    match reply.status {
        StatusCode::CONFLICT if reply.problem() == OUTCOME_UNKNOWN => RetryAnswer::OutcomeUnknown,
        _ if reply.replayed() => {
            if let Some(first) = first {
                assert_eq!(&reply.body, first, "{what}: the replay's body differs");
            }
            RetryAnswer::Replay
        }
        status => panic!(
            "{what}: expected the replay or 409 outcome-unknown, got {status} \
             (replayed header {:?}): {}",
            reply.header("idempotent-replayed"),
            reply.text()
        ),
    }
}

/// The value of one sample in keel's OpenMetrics text, 0 when absent.
pub fn metric(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// `keel_idempotency_outcomes_total{route="ROUTE",outcome="OUTCOME"}`.
pub async fn outcome_count(admin: SocketAddr, route: &str, outcome: &str) -> f64 {
    let (_, _, body) = crate::common::get(admin, "/metrics")
        .await
        .expect("metrics");
    metric(
        &String::from_utf8_lossy(&body),
        &format!("keel_idempotency_outcomes_total{{route=\"{route}\",outcome=\"{outcome}\"}}"),
    )
}

/// `GET` (or `DELETE`) `ADMIN/idempotency/keys?...` as JSON.
pub async fn key_admin(
    admin: SocketAddr,
    method: http::Method,
    query: &str,
) -> (StatusCode, serde_json::Value) {
    let (status, _, body) = crate::common::request(
        admin,
        Request::builder()
            .method(method)
            .uri(format!("/idempotency/keys?{query}"))
            .header(header::HOST, admin.to_string())
            .body(crate::common::empty())
            .expect("request"),
    )
    .await
    .expect("admin request");
    let json = serde_json::from_slice(&body)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&body).into()));
    (status, json)
}

/// Runs `keel ARGS...` to its end (off the async runtime); returns the
/// exit success, stdout and stderr.
pub async fn keel_command(args: Vec<String>) -> (bool, String, String) {
    tokio::task::spawn_blocking(move || {
        let out = Command::new(env!("CARGO_BIN_EXE_keel"))
            .args(&args)
            .output()
            .expect("run keel");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .expect("keel command")
}

/// `postgres://user@host:port/db` -> (`host:port`, a URL of the same
/// database through `via`).
pub fn postgres_through(url: &str, via: SocketAddr) -> (String, String) {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let (userinfo, hostpath) = rest.rsplit_once('@').unwrap_or(("", rest));
    let (hostport, db) = hostpath.split_once('/').unwrap_or((hostpath, ""));
    let target = if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:5432")
    };
    let at = if userinfo.is_empty() {
        String::new()
    } else {
        format!("{userinfo}@")
    };
    (target, format!("postgres://{at}{via}/{db}"))
}

/// Drops the table a test's gateway created (`<prefix>_idempotency`).
pub async fn drop_table(url: &str, prefix: &str) {
    if let Ok((client, connection)) = tokio_postgres::connect(url, tokio_postgres::NoTls).await {
        tokio::spawn(connection);
        let _ = client
            .batch_execute(&format!("DROP TABLE IF EXISTS {prefix}_idempotency"))
            .await;
    }
}

/// Sends a keyed POST whose head declares `declared` body bytes, sends
/// `sent` of them and stalls; returns what the gateway answered (head and
/// body, or "" when it closed without a word) and how long it took from
/// the connect.
pub async fn stalled_body(
    gw: SocketAddr,
    key: &str,
    declared: usize,
    sent: usize,
    give_up: Duration,
) -> (String, Duration) {
    let started = Instant::now();
    let mut stream = TcpStream::connect(gw).await.expect("connect");
    let head = format!(
        "POST /stall HTTP/1.1\r\nhost: gw.test\r\nidempotency-key: {key}\r\ncontent-type: application/octet-stream\r\ncontent-length: {declared}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.expect("head");
    // The gateway may answer (and close) before taking every byte.
    let _ = stream.write_all(&vec![b'x'; sent]).await;
    let answer = read_answer(&mut stream, give_up).await;
    (answer, started.elapsed())
}

/// Reads one response (head, and a `content-length` body) for at most
/// `within`; returns what arrived.
async fn read_answer(stream: &mut TcpStream, within: Duration) -> String {
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    let _ = tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
            }
            if let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&out[..end]).into_owned();
                let length: usize = head_value(&head, "content-length")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                if out.len() >= end + 4 + length {
                    break;
                }
            }
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Sends raw bytes and reads one response for at most `within`.
pub async fn raw_head(gw: SocketAddr, bytes: &[u8], within: Duration) -> String {
    let mut stream = TcpStream::connect(gw).await.expect("connect");
    stream.write_all(bytes).await.expect("write");
    read_answer(&mut stream, within).await
}
