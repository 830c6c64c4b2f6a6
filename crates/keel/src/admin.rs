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
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::body::ProxyBody;
use crate::listener::ConnectionCount;
use crate::metrics::Metrics;
use crate::proxy::Gateway;
use crate::readiness::Readiness;

/// What the admin endpoints report on.
pub struct AdminState {
    /// The gateway (routes, upstreams).
    pub gateway: &'static Gateway,
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
}

/// Serves the admin API until `shutdown` turns true.
pub async fn run(
    listener: TcpListener,
    state: Arc<AdminState>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = crate::listener::stopped(&mut shutdown) => return,
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(answer(&state, &request)) }
            });
            let _ = http1::Builder::new()
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
    if request.method() == Method::POST
        && let Some(rest) = request.uri().path().strip_prefix("/breakers/")
    {
        return crate::resilience::breakers::operator(state.gateway, rest);
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

/// The `/status` document.
fn status(state: &AdminState) -> serde_json::Value {
    let gateway = state.gateway;
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
                        "resilience": crate::resilience::breakers::endpoint_status(
                            &e.guard,
                            u.resilience.health_check.is_some(),
                        ),
                    })
                })
                .collect();
            serde_json::json!({
                "name": u.name,
                "load_balancing": format!("{:?}", u.balancing),
                "endpoints": endpoints,
                "breaker": crate::resilience::breakers::upstream_status(&u.resilience),
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
        // Filled in once the gateway runs under keel-supervisor.
        "supervision": serde_json::Value::Null,
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

/// Fetches `/status` from a running gateway.
pub async fn fetch_status(addr: &str) -> Result<serde_json::Value, StatusError> {
    let host = addr
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
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
    let request = Request::get("/status")
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
    if status != StatusCode::OK {
        return Err(StatusError::BadAnswer { addr: host, status });
    }
    serde_json::from_slice(&bytes).map_err(|_| StatusError::BadAnswer { addr: host, status })
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
    let _ = writeln!(
        out,
        "supervision: {}",
        if status["supervision"].is_null() {
            "not yet wired (phase 2)".to_owned()
        } else {
            status["supervision"].to_string()
        }
    );
    out
}
