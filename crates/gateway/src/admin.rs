//! The admin server (`admin_listen`): `/healthz`, `/readyz`, `/metrics`,
//! `/status`; and the client side used by `keel status`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body::Body;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::drain::{DrainControl, EndpointDrainError};
use crate::readiness::Readiness;
use keel_http::body::ProxyBody;
use keel_metrics::Metrics;
use keel_proxy::listener::ConnectionCount;
use keel_proxy::proxy::Gateway;

/// What the admin endpoints report on.
pub struct AdminState {
    /// The gateway (routes, upstreams).
    pub gateway: Arc<Gateway>,
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
    /// Readiness conditions.
    pub readiness: Readiness,
    /// Data-plane address.
    pub listen: SocketAddr,
    /// Open downstream connections.
    pub connections: ConnectionCount,
    /// Process start.
    pub started: Instant,
    /// Set once a drain has begun.
    pub draining: watch::Receiver<bool>,
    /// The shutdown sequence and endpoint drains.
    pub drain: Arc<DrainControl>,
    /// The supervision tree, once built.
    pub supervision: crate::supervision::ProbeSlot,
    /// Idempotency keys (`/idempotency/keys`), when a route is idempotent.
    pub keys: Option<crate::idempotency::KeyAdmin>,
    /// Connection limits of the admin listener.
    pub limits: AdminLimits,
}

/// Connection limits of the admin listener (`[server]`).
#[derive(Debug, Clone, Copy)]
pub struct AdminLimits {
    /// A request head must be read within this, counted from the accept
    /// or from the end of the previous response (so it also bounds the
    /// wait between requests on a kept-alive connection).
    pub header_read_timeout: std::time::Duration,
    /// Connections served at once; further ones wait in the listen
    /// backlog until one ends.
    pub max_connections: usize,
}

/// Serves the admin API until `shutdown` turns true.
pub async fn run(
    listener: TcpListener,
    state: Arc<AdminState>,
    mut shutdown: watch::Receiver<bool>,
) {
    let limits = state.limits;
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    loop {
        // A free slot first: at the cap, new connections wait in the
        // backlog instead of each holding a task and buffers.
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => return,
            },
            _ = keel_proxy::listener::stopped(&mut shutdown) => return,
        };
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = keel_proxy::listener::stopped(&mut shutdown) => return,
        };
        let state = state.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = service_fn(move |request: Request<Incoming>| {
                let state = state.clone();
                async move {
                    if request.uri().path() == "/idempotency/keys" {
                        return Ok::<_, Infallible>(keys_answer(&state, &request).await);
                    }
                    Ok::<_, Infallible>(answer(&state, &request))
                }
            });
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::full(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

fn answer(state: &AdminState, request: &Request<Incoming>) -> Response<ProxyBody> {
    if let Some(response) = drain_answer(state, request) {
        return response;
    }
    if request.method() == Method::POST
        && let Some(rest) = request.uri().path().strip_prefix("/breakers/")
    {
        return crate::breaker_admin::operator(&state.gateway, rest);
    }
    if request.method() != Method::GET {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    match request.uri().path() {
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => {
            let report = state.readiness.report();
            let ready = report.iter().all(|c| c.ready);
            let body = serde_json::json!({ "ready": ready, "conditions": report });
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            text(status, "application/json", format!("{body}\n"))
        }
        "/metrics" => text(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            state.metrics.encode(),
        ),
        "/status" => text(
            StatusCode::OK,
            "application/json",
            format!("{:#}\n", status(state)),
        ),
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

/// `/idempotency/keys`: see [`crate::idempotency::KeyAdmin`].
async fn keys_answer(state: &AdminState, request: &Request<Incoming>) -> Response<ProxyBody> {
    let Some(keys) = &state.keys else {
        return text(
            StatusCode::NOT_FOUND,
            "application/json",
            "{\"error\":\"no route is idempotent\"}\n".into(),
        );
    };
    if request.method() != Method::GET && request.method() != Method::DELETE {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET or DELETE\n".into(),
        );
    }
    let query = request.uri().query().unwrap_or("");
    let (status, body) = keys.answer(request.method(), query, percent_decode).await;
    text(status, "application/json", format!("{body:#}\n"))
}

/// The `/status` document.
fn status(state: &AdminState) -> serde_json::Value {
    let gateway = &state.gateway;
    let upstreams: Vec<_> = gateway
        .upstreams
        .iter()
        .map(|u| {
            let endpoints: Vec<_> = u
                .endpoints
                .iter()
                .map(|e| {
                    serde_json::json!({
                        "url": e.url,
                        "in_flight": e.outstanding.load(Ordering::Relaxed),
                        "open_connections": e.metrics.open_connections.get(),
                        "connects": e.metrics.connects.get(),
                        "resilience": crate::breaker_admin::endpoint_status(
                            &e.guard,
                            u.resilience.health_check.is_some(),
                        ),
                    })
                })
                .collect();
            serde_json::json!({
                "name": u.name,
                "load_balancing": u.balancing.as_str(),
                "endpoints": endpoints,
                "breaker": crate::breaker_admin::upstream_status(&u.resilience),
            })
        })
        .collect();
    let routes: Vec<_> = gateway
        .router
        .routes()
        .iter()
        .map(|r| {
            serde_json::json!({
                "name": r.name,
                "path_prefix": r.prefix,
                "host": r.host,
                "upstream": gateway.upstreams.get(r.upstream).map(|u| u.name.as_str()),
                "idempotency": r.filter.is_some(),
                "stale_cache_bytes": r.stale.as_ref().map(|c| c.bytes()),
            })
        })
        .collect();
    let report = state.readiness.report();
    serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": state.started.elapsed().as_secs(),
        "listen": state.listen.to_string(),
        "ready": report.iter().all(|c| c.ready),
        "readiness": report,
        "connections": state.connections.get(),
        "draining": *state.draining.borrow(),
        "upstreams": upstreams,
        "routes": routes,
        // Null only in the moment before the supervision tree has started.
        "supervision": state
            .supervision
            .get()
            .and_then(|probe| serde_json::to_value(probe.snapshot()).ok())
            .unwrap_or(serde_json::Value::Null),
        "drain": state.drain.report(),
    })
}

/// Errors of `keel status`.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// Could not connect or talk HTTP.
    #[error("cannot reach the admin API at {addr}: {source}")]
    Unreachable {
        /// The address tried.
        addr: String,
        /// Why.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Answered something else than the status document.
    #[error("the admin API at {addr} answered {status}: is this a keel admin address?")]
    BadAnswer {
        /// The address tried.
        addr: String,
        /// What it said.
        status: StatusCode,
    },
}

/// `host:port` from an admin address given as `host:port` or a URL.
fn admin_host(addr: &str) -> String {
    addr.trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned()
}

/// Fetches `/status` from a running gateway.
pub async fn fetch_status(addr: &str) -> Result<serde_json::Value, StatusError> {
    let (status, body) = admin_request(addr, Method::GET, "/status").await?;
    if status != StatusCode::OK || body.is_null() {
        return Err(StatusError::BadAnswer {
            addr: admin_host(addr),
            status,
        });
    }
    Ok(body)
}

/// One breaker of `/status` on one line: state, override, time left, trips.
fn breaker_line(b: &serde_json::Value) -> String {
    if b.is_null() {
        return "off".to_owned();
    }
    let state = b["state"].as_str().unwrap_or("-").to_uppercase();
    let mode = match b["mode"].as_str() {
        Some("normal") | None => String::new(),
        Some(mode) => format!(" [{}]", mode.to_uppercase()),
    };
    let left = b["retry_after_ms"]
        .as_u64()
        .map(|ms| format!(" retry in {:.1}s", ms as f64 / 1000.0))
        .unwrap_or_default();
    format!(
        "{state}{mode}{left} trips {} rejected {}",
        b["counters"]["trips"], b["counters"]["rejected"]
    )
}

/// Renders `/status` for a terminal.
pub fn render_status(status: &serde_json::Value) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_owned();
    let _ = writeln!(
        out,
        "keel {}  listen {}  up {}s  {}  connections {}{}",
        s(&status["version"]),
        s(&status["listen"]),
        status["uptime_seconds"],
        if status["ready"].as_bool() == Some(true) {
            "READY"
        } else {
            "NOT READY"
        },
        status["connections"],
        if status["draining"].as_bool() == Some(true) {
            "  DRAINING"
        } else {
            ""
        },
    );
    for condition in status["readiness"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  readiness {:<12} {}{}",
            s(&condition["name"]),
            if condition["ready"].as_bool() == Some(true) {
                "ok"
            } else {
                "not ready"
            },
            condition["reason"]
                .as_str()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default(),
        );
    }
    let _ = writeln!(out, "upstreams:");
    for upstream in status["upstreams"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  {} ({})",
            s(&upstream["name"]),
            s(&upstream["load_balancing"])
        );
        let _ = writeln!(out, "    breaker {}", breaker_line(&upstream["breaker"]));
        for e in upstream["endpoints"].as_array().into_iter().flatten() {
            let _ = writeln!(
                out,
                "    {:<28} in_flight {:<4} open {:<4} connects {}",
                s(&e["url"]),
                e["in_flight"],
                e["open_connections"],
                e["connects"]
            );
            let r = &e["resilience"];
            let health = &r["health"];
            let _ = writeln!(
                out,
                "      breaker {}  health {}",
                breaker_line(&r["breaker"]),
                if health.is_null() {
                    "not checked".to_owned()
                } else {
                    format!(
                        "{} (passed {}, failed {})",
                        if health["healthy"].as_bool() == Some(true) {
                            "healthy"
                        } else {
                            "EJECTED"
                        },
                        health["passed"],
                        health["failed"]
                    )
                }
            );
        }
    }
    let _ = writeln!(out, "routes:");
    for r in status["routes"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  {:<20} -> {}{}",
            s(&r["path_prefix"]),
            s(&r["upstream"]),
            if r["idempotency"].as_bool() == Some(true) {
                "  [idempotent]"
            } else {
                ""
            }
        );
    }
    if let Some(phase) = status["drain"]["phase"].as_str() {
        let _ = writeln!(out, "drain: {phase}");
        for e in status["drain"]["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let p = &e["progress"];
            let _ = writeln!(
                out,
                "  {} {}: {} closed {}/{}{}",
                s(&e["upstream"]),
                s(&e["endpoint"]),
                if e["draining"].as_bool() == Some(true) {
                    "draining"
                } else {
                    "resumed"
                },
                p["closed"],
                p["total"],
                if p["done"].as_bool() == Some(true) {
                    " (done)"
                } else {
                    ""
                },
            );
        }
    }
    let _ = writeln!(out, "supervision:");
    render_tree(&mut out, &status["supervision"], 1);
    out
}

/// One line per node of the supervision snapshot, indented by depth.
fn render_tree(out: &mut String, node: &serde_json::Value, depth: usize) {
    use std::fmt::Write as _;
    if node.is_null() {
        let _ = writeln!(out, "  (not reported)");
        return;
    }
    let text = |v: &serde_json::Value| v.as_str().map(str::to_owned).unwrap_or_default();
    let _ = writeln!(
        out,
        "{:indent$}{:<12} {:<10} {:<9} restarts {}{}",
        "",
        text(&node["name"]),
        text(&node["state"]),
        if node["ready"].as_bool() == Some(true) {
            "ready"
        } else {
            "not ready"
        },
        node["restarts"],
        node["reason"]
            .as_str()
            .map(|r| format!("  ({r})"))
            .unwrap_or_default(),
        indent = depth * 2
    );
    for child in node["children"].as_array().into_iter().flatten() {
        render_tree(out, child, depth + 1);
    }
}

/// The drain endpoints: `POST /drain` (start the shutdown sequence),
/// `GET /drain` (progress), `POST /upstreams/{name}/endpoints/drain?endpoint=URL`
/// and `POST /upstreams/{name}/endpoints/resume?endpoint=URL`.
fn drain_answer(state: &AdminState, request: &Request<Incoming>) -> Option<Response<ProxyBody>> {
    let json =
        |status, value: serde_json::Value| text(status, "application/json", format!("{value:#}\n"));
    let path = request.uri().path();
    let method = request.method();
    if path == "/drain" {
        return Some(match *method {
            Method::GET => json(StatusCode::OK, state.drain.report()),
            Method::POST => {
                let started = state.drain.request_shutdown();
                let mut report = state.drain.report();
                report["started"] = serde_json::Value::Bool(started);
                json(StatusCode::ACCEPTED, report)
            }
            _ => text(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "GET or POST\n".into(),
            ),
        });
    }
    let rest = path.strip_prefix("/upstreams/")?;
    let (upstream, action) = rest.split_once("/endpoints/")?;
    if action != "drain" && action != "resume" {
        return None;
    }
    if *method != Method::POST {
        return Some(text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "POST only\n".into(),
        ));
    }
    let upstream = percent_decode(upstream);
    let Some(endpoint) = request
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("endpoint="))
        .map(percent_decode)
    else {
        return Some(json(
            StatusCode::BAD_REQUEST,
            serde_json::json!({"error": "the endpoint URL is missing: add ?endpoint=URL"}),
        ));
    };
    let failed = |error: EndpointDrainError| {
        let status = match error {
            EndpointDrainError::LastEndpoint(_) => StatusCode::CONFLICT,
            _ => StatusCode::NOT_FOUND,
        };
        json(status, serde_json::json!({"error": error.to_string()}))
    };
    Some(if action == "drain" {
        match state.drain.drain_endpoint(&upstream, &endpoint) {
            Ok(progress) => json(
                StatusCode::ACCEPTED,
                serde_json::json!({"upstream": upstream, "endpoint": endpoint, "progress": progress}),
            ),
            Err(error) => failed(error),
        }
    } else {
        match state.drain.resume_endpoint(&upstream, &endpoint) {
            Ok(was) => json(
                StatusCode::OK,
                serde_json::json!({"upstream": upstream, "endpoint": endpoint, "was_draining": was}),
            ),
            Err(error) => failed(error),
        }
    })
}

/// Decodes `%XX` escapes (and `+` as a space) in a query value; invalid
/// escapes are kept as they are.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Encodes a query value for [`admin_request`] callers.
pub fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect()
}

/// Sends one request to a gateway's admin API; returns the status and the
/// JSON body (`Null` when the body is not JSON).
pub async fn admin_request(
    addr: &str,
    method: Method,
    path: &str,
) -> Result<(StatusCode, serde_json::Value), StatusError> {
    let host = admin_host(addr);
    let unreachable = |source: Box<dyn std::error::Error + Send + Sync>| StatusError::Unreachable {
        addr: host.clone(),
        source,
    };
    let stream = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::net::TcpStream::connect(&host),
    )
    .await
    .map_err(|e| unreachable(Box::new(e)))?
    .map_err(|e| unreachable(Box::new(e)))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, ProxyBody>(TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(Box::new(e)))?;
    tokio::spawn(connection);
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, host.as_str())
        .body(ProxyBody::Empty)
        .map_err(|e| unreachable(Box::new(e)))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| unreachable(Box::new(e)))?;
    let status = response.status();
    let mut body = response.into_body();
    let mut bytes = Vec::new();
    while let Some(frame) =
        std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await
    {
        let frame = frame.map_err(|e| unreachable(Box::new(e)))?;
        if let Some(data) = frame.data_ref() {
            bytes.extend_from_slice(data);
        }
    }
    Ok((
        status,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    ))
}

#[cfg(test)]
mod drain_tests {
    use super::*;

    #[test]
    fn query_values_round_trip() {
        let url = "http://127.0.0.1:3001/a b";
        assert_eq!(percent_decode(&percent_encode(url)), url);
        assert_eq!(percent_decode("http://x:1"), "http://x:1");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%4"), "%4");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
