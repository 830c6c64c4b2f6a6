//! The admin server: HTTP/1.1, a few routes, answers from an
//! [`AdminBackend`].
//!
//! | route | answer |
//! | --- | --- |
//! | `GET /healthz` | `ok` |
//! | `GET /readyz` | [`ReadinessReport`](crate::ReadinessReport), 200 or 503 |
//! | `GET /metrics` | OpenMetrics text |
//! | `GET /status` | [`Status`](crate::Status) |
//! | `GET /drain` | [`DrainReport`](crate::DrainReport) |
//! | `POST /drain` | [`DrainReport`](crate::DrainReport) with `started`, 202 |
//! | `POST /upstreams/{name}/endpoints/drain?endpoint=URL` | [`EndpointDrainStarted`](crate::EndpointDrainStarted), 202 |
//! | `POST /upstreams/{name}/endpoints/resume?endpoint=URL` | [`EndpointResumed`](crate::EndpointResumed) |
//! | `POST /breakers/{upstream}/{melt,reset,disable,enable}` | [`BreakerSnapshot`](crate::BreakerSnapshot) |
//! | `GET`, `DELETE /idempotency/keys?route=R&key=K...` | [`KeyAnswer`](crate::KeyAnswer) |
//!
//! Refusals are [`ErrorBody`] JSON (`{"error": ...}`) or a line of text
//! for a wrong method or path.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::backend::{
    AdminBackend, BreakerAction, BreakerActionError, EndpointDrainError, KeyError,
};
use crate::dto::{EndpointDrainStarted, EndpointResumed, ErrorBody};
use crate::query::{key_query, percent_decode, query_param};

/// The body of every admin response.
pub type AdminBody = Full<Bytes>;

/// Connection limits of the admin listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminLimits {
    /// A request head must be read within this, counted from the accept
    /// or from the end of the previous response (so it also bounds the
    /// wait between requests on a kept-alive connection).
    pub header_read_timeout: Duration,
    /// Connections served at once; further ones wait in the listen
    /// backlog until one ends.
    pub max_connections: usize,
}

impl Default for AdminLimits {
    /// 10 s to send a request head, 64 connections.
    fn default() -> Self {
        AdminLimits {
            header_read_timeout: Duration::from_secs(10),
            max_connections: 64,
        }
    }
}

/// Serves the admin API on `listener` until `shutdown` turns true (or its
/// sender is dropped).
///
/// Connections are HTTP/1.1; at most `limits.max_connections` are served
/// at once. A connection already being served finishes its current
/// request after `shutdown`.
pub async fn serve(
    listener: TcpListener,
    backend: Arc<dyn AdminBackend>,
    limits: AdminLimits,
    mut shutdown: watch::Receiver<bool>,
) {
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
            _ = stopped(&mut shutdown) => return,
        };
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut shutdown) => return,
        };
        let backend = backend.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = service_fn(move |request: Request<Incoming>| {
                let backend = backend.clone();
                async move { Ok::<_, Infallible>(answer(&*backend, &request).await) }
            });
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// The answer to one admin request (any body the request has is ignored).
pub async fn answer<B>(backend: &dyn AdminBackend, request: &Request<B>) -> Response<AdminBody> {
    let path = request.uri().path();
    let method = request.method();
    let query = request.uri().query().unwrap_or("");
    if path == "/idempotency/keys" {
        return keys(backend, method, query).await;
    }
    if path == "/drain" {
        return match *method {
            Method::GET => json_pretty(StatusCode::OK, &backend.drain_report()),
            Method::POST => {
                let started = backend.start_drain();
                let mut report = backend.drain_report();
                report.started = Some(started);
                json_pretty(StatusCode::ACCEPTED, &report)
            }
            _ => text(StatusCode::METHOD_NOT_ALLOWED, "GET or POST\n"),
        };
    }
    if let Some(response) = endpoint_drain(backend, method, path, query) {
        return response;
    }
    if method == Method::POST
        && let Some(rest) = path.strip_prefix("/breakers/")
    {
        return breakers(backend, rest);
    }
    if method != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    match path {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            let report = backend.readiness();
            let status = if report.ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            json_compact(status, &report)
        }
        "/metrics" => respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            backend.metrics_text(),
        ),
        "/status" => json_pretty(StatusCode::OK, &backend.status()),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// `POST /upstreams/{name}/endpoints/{drain,resume}?endpoint=URL`; `None`
/// for another path.
fn endpoint_drain(
    backend: &dyn AdminBackend,
    method: &Method,
    path: &str,
    query: &str,
) -> Option<Response<AdminBody>> {
    let rest = path.strip_prefix("/upstreams/")?;
    let (upstream, action) = rest.split_once("/endpoints/")?;
    if action != "drain" && action != "resume" {
        return None;
    }
    if *method != Method::POST {
        return Some(text(StatusCode::METHOD_NOT_ALLOWED, "POST only\n"));
    }
    let upstream = percent_decode(upstream);
    let Some(endpoint) = query_param(query, "endpoint") else {
        return Some(json_pretty(
            StatusCode::BAD_REQUEST,
            &ErrorBody::new("the endpoint URL is missing: add ?endpoint=URL"),
        ));
    };
    let failed = |error: EndpointDrainError| {
        let status = match error {
            EndpointDrainError::LastEndpoint(_) => StatusCode::CONFLICT,
            EndpointDrainError::NoUpstream(_) | EndpointDrainError::NoEndpoint { .. } => {
                StatusCode::NOT_FOUND
            }
        };
        json_pretty(status, &ErrorBody::new(error.to_string()))
    };
    Some(if action == "drain" {
        match backend.drain_endpoint(&upstream, &endpoint) {
            Ok(progress) => json_pretty(
                StatusCode::ACCEPTED,
                &EndpointDrainStarted {
                    upstream,
                    endpoint,
                    progress,
                },
            ),
            Err(error) => failed(error),
        }
    } else {
        match backend.resume_endpoint(&upstream, &endpoint) {
            Ok(was_draining) => json_pretty(
                StatusCode::OK,
                &EndpointResumed {
                    upstream,
                    endpoint,
                    was_draining,
                },
            ),
            Err(error) => failed(error),
        }
    })
}

/// `POST /breakers/{upstream}/{action}`; `rest` is `{upstream}/{action}`.
fn breakers(backend: &dyn AdminBackend, rest: &str) -> Response<AdminBody> {
    let Some((name, action)) = rest.split_once('/') else {
        return json_compact(
            StatusCode::NOT_FOUND,
            &ErrorBody::new("use POST /breakers/{upstream}/{melt|reset|disable|enable}"),
        );
    };
    let unknown = |name: &str, upstreams: Vec<String>| {
        json_compact(
            StatusCode::NOT_FOUND,
            &ErrorBody {
                error: BreakerActionError::UnknownUpstream(name.to_owned()).to_string(),
                upstreams: Some(upstreams),
            },
        )
    };
    let upstreams = backend.upstream_names();
    if !upstreams.iter().any(|u| u == name) {
        return unknown(name, upstreams);
    }
    let Some(action) = BreakerAction::parse(action) else {
        return json_compact(
            StatusCode::NOT_FOUND,
            &ErrorBody::new(format!(
                "unknown action {action:?}; use melt, reset, disable or enable"
            )),
        );
    };
    match backend.breaker_action(name, action) {
        Ok(snapshot) => json_compact(StatusCode::OK, &snapshot),
        Err(BreakerActionError::UnknownUpstream(_)) => unknown(name, backend.upstream_names()),
        Err(error @ BreakerActionError::Disabled(_)) => {
            json_compact(StatusCode::CONFLICT, &ErrorBody::new(error.to_string()))
        }
    }
}

/// `GET` and `DELETE /idempotency/keys`.
async fn keys(backend: &dyn AdminBackend, method: &Method, query: &str) -> Response<AdminBody> {
    let Some(keys) = backend.idempotency_keys() else {
        return json_compact(
            StatusCode::NOT_FOUND,
            &ErrorBody::new("no route is idempotent"),
        );
    };
    if method != Method::GET && method != Method::DELETE {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET or DELETE\n");
    }
    let question = match key_query(query) {
        Ok(question) => question,
        Err(why) => return json_pretty(StatusCode::BAD_REQUEST, &ErrorBody::new(why)),
    };
    match keys.lookup(&question, method == Method::DELETE).await {
        Ok(answer) => json_pretty(StatusCode::OK, &answer),
        Err(error) => {
            let status = match error {
                KeyError::BadRequest(_) => StatusCode::BAD_REQUEST,
                KeyError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            };
            json_pretty(status, &ErrorBody::new(error.to_string()))
        }
    }
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<AdminBody> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

fn text(status: StatusCode, body: &'static str) -> Response<AdminBody> {
    respond(status, "text/plain", body.to_owned())
}

/// The document as a JSON value: through `serde_json::Value`, whose maps
/// keep their keys sorted, so the documents read the same as they always
/// have whatever order the structs declare their fields in.
fn to_value(document: &impl Serialize) -> serde_json::Value {
    serde_json::to_value(document).unwrap_or_else(
        |error| serde_json::json!({ "error": format!("cannot encode the answer: {error}") }),
    )
}

/// One line of JSON (`/readyz`, breaker overrides).
fn json_compact(status: StatusCode, document: &impl Serialize) -> Response<AdminBody> {
    respond(
        status,
        "application/json",
        format!("{}\n", to_value(document)),
    )
}

/// Indented JSON (`/status`, drains, keys).
fn json_pretty(status: StatusCode, document: &impl Serialize) -> Response<AdminBody> {
    respond(
        status,
        "application/json",
        format!("{:#}\n", to_value(document)),
    )
}
