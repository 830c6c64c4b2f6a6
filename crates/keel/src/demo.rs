//! `keel demo`: the gateway in front of a built-in sample API, with
//! ready-to-paste curl commands.
//!
//! The demo is a config like any other (see [`demo_config`]), so adding the
//! embedded store and idempotent routes is a change to that text and to the
//! printed walkthrough, nothing else.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use keel_config as config;
use keel_http::body::ProxyBody;

/// The sample API's state.
#[derive(Default)]
struct SampleApi {
    executions: AtomicU64,
    flaky: AtomicU64,
    orders: Mutex<HashMap<u64, String>>,
}

fn json(status: StatusCode, body: String) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::full(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

/// The request body, up to 1 MiB (the sample API's limit; a larger or
/// broken body reads as empty).
async fn read_body(body: Incoming) -> Bytes {
    use http_body_util::{BodyExt, Limited};
    Limited::new(body, 1 << 20)
        .collect()
        .await
        .map(|collected| collected.to_bytes())
        .unwrap_or_default()
}

impl SampleApi {
    async fn handle(self: Arc<Self>, mut request: Request<Incoming>) -> Response<ProxyBody> {
        let path = request.uri().path().to_owned();
        match (request.method().clone(), path.as_str()) {
            (Method::GET, "/ws") => {
                let Some(key) = request.headers().get("sec-websocket-key").cloned() else {
                    return json(
                        StatusCode::BAD_REQUEST,
                        r#"{"error":"not a WebSocket handshake"}"#.into(),
                    );
                };
                let on_upgrade = hyper::upgrade::on(&mut request);
                tokio::spawn(async move {
                    if let Ok(upgraded) = on_upgrade.await {
                        let _ = crate::demo_ws::echo(upgraded).await;
                    }
                });
                let mut response = Response::new(ProxyBody::Empty);
                *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                let headers = response.headers_mut();
                headers.insert(
                    header::CONNECTION,
                    header::HeaderValue::from_static("upgrade"),
                );
                headers.insert(
                    header::UPGRADE,
                    header::HeaderValue::from_static("websocket"),
                );
                if let Ok(accept) =
                    header::HeaderValue::from_str(&crate::demo_ws::accept_key(key.as_bytes()))
                {
                    headers.insert("sec-websocket-accept", accept);
                }
                response
            }
            (Method::POST, "/orders") => {
                // `?delay_ms=N` makes the order slow, to show the 409 a
                // duplicate gets while the first is still running.
                let delay = request
                    .uri()
                    .query()
                    .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("delay_ms=")))
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
                    .min(10_000);
                let body = read_body(request.into_body()).await;
                if delay > 0 {
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                }
                let execution = self.executions.fetch_add(1, Ordering::SeqCst) + 1;
                let id = execution;
                let order = format!(
                    r#"{{"id":{id},"executions":{execution},"request":{}}}"#,
                    serde_json::Value::from(String::from_utf8_lossy(&body).into_owned())
                );
                self.orders
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(id, order.clone());
                json(StatusCode::CREATED, order)
            }
            (Method::GET, p) if p.starts_with("/orders/") => {
                let order = p["/orders/".len()..].parse::<u64>().ok().and_then(|id| {
                    self.orders
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .get(&id)
                        .cloned()
                });
                match order {
                    Some(order) => json(StatusCode::OK, order),
                    None => json(StatusCode::NOT_FOUND, r#"{"error":"no such order"}"#.into()),
                }
            }
            (Method::GET, "/slow") => {
                let ms = request
                    .uri()
                    .query()
                    .and_then(|q| q.strip_prefix("ms="))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(3000u64)
                    .min(60_000);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                json(StatusCode::OK, format!(r#"{{"slept_ms":{ms}}}"#))
            }
            (Method::GET, "/flaky") => {
                let n = self.flaky.fetch_add(1, Ordering::Relaxed);
                if n.is_multiple_of(2) {
                    json(
                        StatusCode::SERVICE_UNAVAILABLE,
                        r#"{"error":"flaky: try again"}"#.into(),
                    )
                } else {
                    json(StatusCode::OK, r#"{"ok":true}"#.into())
                }
            }
            (Method::GET, "/executions") => json(
                StatusCode::OK,
                format!(
                    r#"{{"executions":{}}}"#,
                    self.executions.load(Ordering::SeqCst)
                ),
            ),
            _ => json(StatusCode::NOT_FOUND, r#"{"error":"not found"}"#.into()),
        }
    }
}

/// Starts the sample API on an ephemeral port.
async fn start_sample_api() -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let api = Arc::new(SampleApi::default());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let api = api.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    let api = api.clone();
                    async move { Ok::<_, Infallible>(api.handle(request).await) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    Ok(addr)
}

/// The demo's config text: the embedded store in `store`, idempotency on
/// `POST /orders`.
pub fn demo_config(listen: &str, admin: &str, api: SocketAddr, store: &Path) -> String {
    // TOML basic strings escape backslashes and quotes; a temp path has
    // neither on Unix, but be safe.
    let store = store
        .display()
        .to_string()
        .replace('\\', "\\\\")
        .replace('"', "\\\"");
    format!(
        r#"
[server]
listen = "{listen}"
admin_listen = "{admin}"

[store]
kind = "embedded"
path = "{store}"

# An interactive demo: stop at once on Ctrl-C.
[drain]
shutdown_delay = "0s"

[upstreams.sample]
endpoints = ["http://{api}"]
request_timeout = "2s"

# The same API with room for the slow orders of the 409 example.
[upstreams.orders]
endpoints = ["http://{api}"]
request_timeout = "10s"

[[routes]]
name = "orders"
path_prefix = "/orders"
upstream = "orders"

[routes.idempotency]
enabled = true
methods = ["POST"]

[[routes]]
path_prefix = "/"
upstream = "sample"
"#
    )
}

/// A temporary folder for the embedded store, removed when dropped.
struct TempDir(std::path::PathBuf);

impl TempDir {
    /// Removes folders left by demos that were killed (their process is
    /// gone), then makes this one's.
    fn new() -> std::io::Result<Self> {
        // Only where /proc tells which processes are alive (Linux).
        let procfs = Path::new("/proc/self").exists();
        if let Ok(entries) = std::fs::read_dir(std::env::temp_dir())
            && procfs
        {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let Some(pid) = name
                    .to_str()
                    .and_then(|n| n.strip_prefix("keel-demo-"))
                    .and_then(|rest| rest.split('-').next())
                    .and_then(|pid| pid.parse::<u32>().ok())
                else {
                    continue;
                };
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path =
            std::env::temp_dir().join(format!("keel-demo-{}-{nanos:08x}", std::process::id()));
        std::fs::create_dir_all(&path)?;
        Ok(Self(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the demo until interrupted.
pub async fn run(listen: String, admin: String) -> Result<(), Box<dyn std::error::Error>> {
    let api = start_sample_api().await?;
    let store = TempDir::new()?;
    let text = demo_config(&listen, &admin, api, &store.0);
    let config = config::parse(Path::new("<demo>"), &text).map_err(|errors| {
        errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    })?;
    keel_gateway::telemetry::init(&config.log);
    let running = keel_gateway::serve::start(&config).await?;
    if !running.wait_ready(Duration::from_secs(10)).await {
        eprintln!("keel demo: the embedded store is not ready yet; see /readyz");
    }
    let gw = running.listen;
    let admin = running
        .admin
        .map_or_else(|| "-".to_owned(), |a| a.to_string());
    let store_dir = store.0.display();
    let post = format!("curl -si -X POST http://{gw}/orders -H 'content-type: application/json'");
    println!(
        r#"
keel demo: the gateway on http://{gw} in front of a sample API on http://{api}
Idempotency keys are on for POST /orders, kept in an embedded store in {store_dir}
Try, in this order:

  # 1. create an order with an Idempotency-Key: 201, executions 1
  {post} -H 'Idempotency-Key: order-1' -d '{{"sku":"42"}}'

  # 2. retry it with the same key and body: the same 201 and body, replayed by
  #    the gateway (Idempotent-Replayed: true, Original-Request-Id), not run again
  {post} -H 'Idempotency-Key: order-1' -d '{{"sku":"42"}}'

  # ... the sample API ran it once: {{"executions":1}}
  curl -s http://{gw}/executions

  # 3. the same key with a different body: 422 problem+json, nothing runs
  {post} -H 'Idempotency-Key: order-1' -d '{{"sku":"43"}}'

  # 4. a duplicate while the first is still running (a 3 s order): 409 with Retry-After
  curl -s -o /dev/null -X POST 'http://{gw}/orders?delay_ms=3000' -H 'Idempotency-Key: order-2' -d '{{"sku":"7"}}' & sleep 1; curl -si -X POST 'http://{gw}/orders?delay_ms=3000' -H 'Idempotency-Key: order-2' -d '{{"sku":"7"}}'; wait

  # read an order back
  curl -si http://{gw}/orders/1

  # a slow endpoint: the upstream takes 3s, the route's request_timeout is 2s -> 504 problem+json
  curl -si http://{gw}/slow

  # a flaky endpoint: every other call fails upstream with 503; the gateway
  # retries the GET on another attempt (budgeted, full jitter), so you see 200
  curl -si http://{gw}/flaky

  # WebSocket echo through the gateway's tunnel (the 101 handshake with curl;
  # with websocat installed: websocat ws://{gw}/ws)
  curl -si --max-time 2 http://{gw}/ws -H 'Connection: Upgrade' -H 'Upgrade: websocket' \
       -H 'Sec-WebSocket-Version: 13' -H 'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=='

  # the gateway's own view: readiness, the supervision tree, idempotency outcomes
  curl -s http://{admin}/readyz
  curl -s http://{admin}/status
  curl -s http://{admin}/metrics | grep -E 'keel_(requests|idempotency)'
  keel status --admin {admin}

Press Ctrl-C to stop (the store folder is removed on exit).
"#
    );
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    running.wait_and_drain().await?;
    drop(store);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_config_is_valid() {
        let text = demo_config(
            "127.0.0.1:0",
            "127.0.0.1:0",
            "127.0.0.1:3000".parse().expect("addr"),
            Path::new("/tmp/keel \"demo\""),
        );
        config::parse(Path::new("demo"), &text).expect("valid");
    }
}
