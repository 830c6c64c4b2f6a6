//! The operator's side of the breakers: `POST /breakers/{upstream}/{action}`
//! and the breaker fields of `/status`.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::{Response, StatusCode, header};
use keel_breaker::Breaker;
use keel_http::ProxyBody;
use keel_upstream::breakers::{EndpointGuard, OperatorAction, UpstreamResilience, apply};

use keel_proxy::proxy::Gateway;

/// Answers `POST /breakers/{upstream}/{action}`; `rest` is `{upstream}/{action}`.
pub fn operator(gateway: &Gateway, rest: &str) -> Response<ProxyBody> {
    let json = |status: StatusCode, body: serde_json::Value| {
        let mut response = Response::new(ProxyBody::full(Bytes::from(format!("{body}\n"))));
        *response.status_mut() = status;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/json"),
        );
        response
    };
    let Some((name, action)) = rest.split_once('/') else {
        return json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "use POST /breakers/{upstream}/{melt|reset|disable|enable}"}),
        );
    };
    let Some(upstream) = gateway.upstreams.iter().find(|u| u.name == name) else {
        let known: Vec<&str> = gateway.upstreams.iter().map(|u| u.name.as_str()).collect();
        return json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": format!("unknown upstream {name:?}"), "upstreams": known}),
        );
    };
    let Some(action) = OperatorAction::parse(action) else {
        return json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": format!("unknown action {action:?}; use melt, reset, disable or enable")}),
        );
    };
    if upstream.resilience.breaker.is_none() {
        return json(
            StatusCode::CONFLICT,
            serde_json::json!({"error": format!("breakers are disabled for upstream {name:?} in the config")}),
        );
    }
    let endpoints: Vec<&Breaker> = upstream
        .endpoints
        .iter()
        .filter_map(|e| e.guard.breaker.as_ref())
        .collect();
    apply(&upstream.resilience, &endpoints, action);
    tracing::warn!(upstream = name, ?action, "operator override on breakers");
    json(StatusCode::OK, upstream_status(&upstream.resilience))
}

/// A breaker as shown in `/status`.
pub fn breaker_status(breaker: Option<&Breaker>) -> serde_json::Value {
    match breaker {
        None => serde_json::Value::Null,
        Some(b) => serde_json::to_value(b.snapshot()).unwrap_or(serde_json::Value::Null),
    }
}

/// The upstream-wide breaker as shown in `/status`.
pub fn upstream_status(upstream: &UpstreamResilience) -> serde_json::Value {
    breaker_status(upstream.breaker.as_ref())
}

/// An endpoint's breaker and health as shown in `/status`.
pub fn endpoint_status(guard: &EndpointGuard, checked: bool) -> serde_json::Value {
    serde_json::json!({
        "breaker": breaker_status(guard.breaker.as_ref()),
        "health": if checked {
            serde_json::json!({
                "healthy": guard.is_healthy(),
                "passed": guard.checks_passed.load(Ordering::Relaxed),
                "failed": guard.checks_failed.load(Ordering::Relaxed),
            })
        } else {
            serde_json::Value::Null
        },
    })
}
