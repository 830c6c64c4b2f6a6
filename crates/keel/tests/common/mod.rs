//! Test support: a real upstream (hyper), the real `keel` binary with a
//! temporary config, and small HTTP client helpers.
#![allow(dead_code, reason = "each test file uses a different subset")]

use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::Role;

pub type BoxBody =
    http_body_util::combinators::BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// A port that was free a moment ago.
pub fn free_addr() -> SocketAddr {
    let listener = StdListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr")
}

/// A body of `chunks` x `chunk` bytes with no declared length (sent chunked).
pub struct ChunkedBody {
    pub chunk: Bytes,
    pub chunks: usize,
}

impl Body for ChunkedBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.chunks == 0 {
            return Poll::Ready(None);
        }
        self.chunks -= 1;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.clone()))))
    }
    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

pub fn full(bytes: impl Into<Bytes>) -> BoxBody {
    Full::new(bytes.into()).map_err(|e| match e {}).boxed()
}

pub fn empty() -> BoxBody {
    full(Bytes::new())
}

/// The test upstream: echoes requests as JSON, and has a few special paths.
pub struct TestUpstream {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
    pub requests: Arc<AtomicUsize>,
}

pub fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0u64, |acc, b| {
        acc.wrapping_mul(31).wrapping_add(u64::from(*b))
    })
}

async fn upstream_handle(mut request: Request<Incoming>) -> Response<BoxBody> {
    let path = request.uri().path().to_owned();
    if path == "/ws" {
        let key = request
            .headers()
            .get("sec-websocket-key")
            .cloned()
            .expect("websocket key");
        let on_upgrade = hyper::upgrade::on(&mut request);
        tokio::spawn(async move {
            let upgraded = on_upgrade.await.expect("upgrade");
            let mut ws =
                WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
            while let Some(Ok(message)) = ws.next().await {
                if message.is_close() {
                    break;
                }
                if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err() {
                    break;
                }
            }
        });
        return Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, "websocket")
            .header(
                "sec-websocket-accept",
                tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes()),
            )
            .body(empty())
            .expect("response");
    }
    if let Some(ms) = path.strip_prefix("/slow/") {
        let ms: u64 = ms.parse().unwrap_or(1000);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        return Response::new(full("slow done"));
    }
    if let Some(code) = path.strip_prefix("/status/") {
        let status = code.parse().unwrap_or(500);
        return Response::builder()
            .status(status)
            .body(empty())
            .expect("response");
    }
    if let Some(n) = path.strip_prefix("/big/") {
        // n chunks of 64 KiB, streamed without Content-Length.
        let chunks: usize = n.parse().unwrap_or(1);
        let body = ChunkedBody {
            chunk: Bytes::from(vec![b'x'; 64 * 1024]),
            chunks,
        };
        return Response::new(body.map_err(|e| match e {}).boxed());
    }
    let method = request.method().to_string();
    let uri = request.uri().to_string();
    let version = format!("{:?}", request.version());
    let mut headers = serde_json::Map::new();
    for name in request.headers().keys() {
        let values: Vec<String> = request
            .headers()
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect();
        headers.insert(name.to_string(), serde_json::Value::from(values.join(", ")));
    }
    let body = request
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let echo = serde_json::json!({
        "method": method,
        "uri": uri,
        "version": version,
        "headers": headers,
        "body_len": body.len(),
        "body_checksum": checksum(&body),
    });
    Response::builder()
        .header("content-type", "application/json")
        .header("connection", "keep-alive, x-upstream-secret")
        .header("x-upstream-secret", "hop")
        .header("keep-alive", "timeout=5")
        .header("x-upstream", "yes")
        .body(full(echo.to_string()))
        .expect("response")
}

impl TestUpstream {
    pub async fn start() -> Self {
        Self::start_at(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// A running `keel serve` child process.
pub struct Keel {
    pub child: Child,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub config: PathBuf,
}

pub fn temp_file(name: &str, contents: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "keel-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("write");
    path
}

impl Keel {
    /// Starts keel with `[server]` filled in and `rest` appended; waits for /healthz.
    ///
    /// The ports come from `free_addr`, which frees them before keel binds
    /// them; if another test took one meanwhile keel exits with 1 (cannot
    /// listen), and this tries again with other ports, at most three times.
    pub async fn start(server_extra: &str, rest: &str) -> Keel {
        let mut attempt = 0;
        loop {
            let listen = free_addr();
            let admin = free_addr();
            let text = format!(
                "[server]\nlisten = \"{listen}\"\nadmin_listen = \"{admin}\"\n{server_extra}\n{rest}\n[log]\nlevel = \"warn\"\n"
            );
            let config = temp_file("keel.toml", &text);
            let child = Command::new(env!("CARGO_BIN_EXE_keel"))
                .args(["serve", "--config"])
                .arg(&config)
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("spawn keel");
            let mut keel = Keel {
                child,
                listen,
                admin,
                config,
            };
            match keel.wait_healthy().await {
                Ok(()) => return keel,
                Err(status) if status.code() == Some(1) && attempt < 2 => attempt += 1,
                Err(status) => panic!("keel exited early: {status}"),
            }
        }
    }

    /// One upstream `app` at `upstream`, one route `/`.
    pub async fn in_front_of(
        upstream: SocketAddr,
        server_extra: &str,
        upstream_extra: &str,
    ) -> Keel {
        Keel::start(
            server_extra,
            &format!(
                "[upstreams.app]\nendpoints = [\"http://{upstream}\"]\n{upstream_extra}\n\n[[routes]]\nname = \"all\"\npath_prefix = \"/\"\nupstream = \"app\"\n"
            ),
        )
        .await
    }

    async fn wait_healthy(&mut self) -> Result<(), std::process::ExitStatus> {
        for _ in 0..400 {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Err(status);
            }
            // The data plane binds before the admin server, so a healthy
            // admin means both are up.
            if let Ok((StatusCode::OK, _, _)) = get(self.admin, "/healthz").await {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("keel did not become healthy");
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.listen, path)
    }
}

impl Drop for Keel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One request on a fresh HTTP/1.1 connection; returns status, headers, body.
pub async fn request(
    addr: SocketAddr,
    request: Request<BoxBody>,
) -> Result<(StatusCode, http::HeaderMap, Bytes), Box<dyn std::error::Error + Send + Sync>> {
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let response = sender.send_request(request).await?;
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, headers, body))
}

pub async fn get(
    addr: SocketAddr,
    path: &str,
) -> Result<(StatusCode, http::HeaderMap, Bytes), Box<dyn std::error::Error + Send + Sync>> {
    request(
        addr,
        Request::get(path)
            .header(header::HOST, addr.to_string())
            .body(empty())
            .expect("request"),
    )
    .await
}

/// Parses the upstream's JSON echo.
pub fn echo(body: &Bytes) -> serde_json::Value {
    serde_json::from_slice(body).expect("upstream echo JSON")
}

/// Sends raw bytes and reads until the peer closes or `timeout`.
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

impl TestUpstream {
    /// The test upstream on a chosen address (to bring an endpoint up
    /// where a gateway already points).
    pub async fn start_at(addr: SocketAddr) -> Self {
        let listener = TcpListener::bind(addr).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let counter = connections.clone();
        let request_counter = requests.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let request_counter = request_counter.clone();
                tokio::spawn(async move {
                    let _ = http1::Builder::new()
                        .serve_connection(
                            TokioIo::new(stream),
                            service_fn(move |r| {
                                request_counter.fetch_add(1, Ordering::SeqCst);
                                async { Ok::<_, Infallible>(upstream_handle(r).await) }
                            }),
                        )
                        .with_upgrades()
                        .await;
                });
            }
        });
        TestUpstream {
            addr,
            connections,
            requests,
        }
    }
}

/// A unique lower-case name for store prefixes and tables.
pub fn unique_name(tag: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "kt_{tag}_{}_{nanos:x}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// A keyed POST; returns status, headers and body.
pub async fn post_keyed(
    addr: SocketAddr,
    path: &str,
    key: Option<&str>,
    authorization: Option<&str>,
    body: &str,
) -> (StatusCode, http::HeaderMap, Bytes) {
    let mut builder = Request::post(path)
        .header(header::HOST, "gw.test")
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    if let Some(auth) = authorization {
        builder = builder.header(header::AUTHORIZATION, auth);
    }
    request(addr, builder.body(full(body.to_owned())).expect("request"))
        .await
        .expect("keyed POST")
}

/// Polls `/readyz` until it answers `want` (10 s at most); returns its body.
pub async fn wait_ready(admin: SocketAddr, want: StatusCode) -> String {
    let mut last = String::new();
    for _ in 0..200 {
        if let Ok((status, _, body)) = get(admin, "/readyz").await {
            last = String::from_utf8_lossy(&body).into_owned();
            if status == want {
                return last;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("/readyz never answered {want}; last: {last}");
}

/// A TCP proxy to `target` on `listen`, stopped (listener and every
/// connection) by `stop`, to make a store go away and come back.
pub struct TcpProxy {
    tasks: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl TcpProxy {
    pub async fn start(listen: SocketAddr, target: String) -> TcpProxy {
        // The previous proxy's listener goes away when its aborted task is
        // dropped, a moment after stop().
        let mut bound = None;
        for _ in 0..100 {
            if let Ok(l) = TcpListener::bind(listen).await {
                bound = Some(l);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let listener = bound.expect("bind proxy");
        let tasks: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let inner = tasks.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut downstream, _)) = listener.accept().await {
                let target = target.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut upstream) = TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await;
                    }
                });
                inner.lock().expect("tasks").push(task);
            }
        });
        tasks.lock().expect("tasks").push(accept);
        TcpProxy { tasks }
    }

    pub fn stop(&self) {
        for task in self.tasks.lock().expect("tasks").drain(..) {
            task.abort();
        }
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `host:port` of a `redis://host:port/...` URL.
pub fn redis_host_port(url: &str) -> String {
    let rest = url.strip_prefix("redis://").unwrap_or(url);
    let hp = rest.split('/').next().unwrap_or(rest);
    hp.rsplit_once('@').map_or(hp, |(_, h)| h).to_owned()
}
