//! The life of a request through the gateway, top to bottom:
//!
//! 1. **request id** — reuse the client's `x-request-id` or make one;
//! 2. **limits and checks on the head** — request head size (431); a
//!    transfer coding other than `chunked` (501); `Host`/`:authority`
//!    missing, repeated, invalid or in conflict (400); declared body size
//!    (413, once the route is known);
//! 3. **route match** — longest path prefix, host, methods (404 otherwise);
//! 4. **request filter** — the route's [`RequestFilter`], if any. This is
//!    where the idempotency engine plugs in: it may answer directly (replay,
//!    409, 422, 503) or let the request go upstream with a
//!    [`ResponseFilter`] that sees the outcome (to store the response, or
//!    release its claim when the request never reached the upstream);
//! 5. **upstream selection** — the upstream's balancer picks an endpoint,
//!    skipping endpoints whose breaker is open or that fail health checks
//!    (`resilience`);
//! 6. **upstream request** — hop-by-hop headers out, forwarded headers in,
//!    sent on the endpoint's pool under the response-head timeout, holding
//!    a breaker permit; requests safe to repeat are retried on another
//!    endpoint within the upstream's retry budget and timeout; on routes
//!    with `[routes.stale]`, a failed read is answered from the stale cache;
//! 7. **response filter** — the route filter's hook, then response headers
//!    (hop-by-hop out, `x-request-id`, `Via`), and protocol upgrades spliced
//!    into a tunnel;
//! 8. **logging** — metrics and one access-log line, saying who failed
//!    when the gateway answered for a failure: the client (a malformed, cut
//!    short or too slow request body: 400, 499, 408, never counted against
//!    the upstream) or the upstream (502, 504).
//!
//! [`Proxy::handle`] is the entry point; each phase is a small function
//! below, in that order.

use std::time::Instant;

use http::header::{self, HeaderValue};
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;

use crate::filter::{Downstream, FilterDecision, RequestContext};
use crate::route::{Route, Router};
use keel_h1::ExtraLines;
use keel_http::body::ProxyBody;
use keel_http::headers::{
    CodingError, HostError, X_REQUEST_ID, append_forwarded, append_via, check_transfer_encoding,
    has_forwarded, head_size, new_request_id, remove_hop_by_hop, wants_upgrade,
};
use keel_http::problem::{Problem, ProblemKind};
use keel_metrics::RouteMetrics;
use keel_upstream::Upstream;

/// Settings that apply to every request.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// Request head limit in bytes.
    pub max_header_size: usize,
    /// Add `Via`.
    pub via: bool,
    /// Write one info line per request.
    pub access_log: bool,
    /// How drained WebSocket tunnels place their close frame.
    pub tunnel_close: crate::tunnel::ClosePolicy,
}

/// The gateway: routes, upstreams and settings, shared by all connections.
#[derive(Debug)]
pub struct Proxy {
    /// Routing table.
    pub router: Router,
    /// Upstreams, indexed by `Route::upstream`.
    pub upstreams: Vec<Upstream>,
    /// Global settings.
    pub settings: ProxySettings,
    /// Metrics for requests that matched no route.
    pub unmatched: RouteMetrics,
    /// Open connections and tunnels, for the drain.
    pub connections: std::sync::Arc<crate::connections::Connections>,
}

/// The result of the phases before logging.
struct Handled<'g> {
    route: Option<&'g Route>,
    response: Response<ProxyBody>,
}

impl Proxy {
    /// Serves one request; never fails: gateway errors become problem+json.
    pub async fn handle(
        &self,
        mut request: Request<Incoming>,
        downstream: &Downstream,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let method = request.method().clone();

        // 1. request id
        let request_id = request_id(&request);
        request
            .headers_mut()
            .insert(X_REQUEST_ID, request_id.clone());

        let Handled {
            route,
            mut response,
        } = self
            .route_and_forward(request, &request_id, downstream)
            .await;

        // 8. logging
        response
            .headers_mut()
            .insert(X_REQUEST_ID, request_id.clone());
        let elapsed = started.elapsed();
        // Who failed, when the gateway answered for a failure: the problem
        // kind travels on the response as an extension.
        let kind = response.extensions().get::<ProblemKind>().copied();
        // "-": not a gateway-made failure (the upstream's answer, whatever
        // its status, a replay, a stale answer).
        let outcome = kind.map_or("-", ProblemKind::outcome);
        // A client that closed its connection mid-body most likely never
        // reads the answer: logged and counted as 499, as nginx does.
        let logged_status = match kind {
            Some(ProblemKind::ClientClosed) => CLIENT_CLOSED,
            _ => response.status(),
        };
        let metrics = route.map_or(&self.unmatched, |r| &r.metrics);
        metrics.record(&method, logged_status, elapsed);
        if kind.is_some_and(ProblemKind::is_request_side) {
            metrics.client_failure(outcome);
        }
        if self.settings.access_log {
            tracing::info!(
                target: "keel::access",
                request_id = request_id.to_str().unwrap_or("-"),
                route = route.map_or("-", |r| r.name.as_str()),
                method = %method,
                status = logged_status.as_u16(),
                outcome,
                duration_us = elapsed.as_micros() as u64,
                "request"
            );
        }
        response
    }

    /// Phases 2 to 7.
    async fn route_and_forward(
        &self,
        mut request: Request<Incoming>,
        request_id: &HeaderValue,
        downstream: &Downstream,
    ) -> Handled<'_> {
        let fail = |route, problem: Problem| Handled {
            route,
            response: problem.into_response(Some(request_id)),
        };

        // 2. limits on the head
        if head_size(request.uri(), request.headers()) > self.settings.max_header_size {
            return fail(
                None,
                Problem::new(
                    ProblemKind::HeadersTooLarge,
                    format!(
                        "the request head is over the {}-byte limit",
                        self.settings.max_header_size
                    ),
                ),
            );
        }
        // 2b. framing and host, which the gateway and the upstream must
        // read alike
        if let Err(error) = check_transfer_encoding(request.version(), request.headers()) {
            let kind = match error {
                CodingError::NotImplemented => ProblemKind::NotImplemented,
                CodingError::Http10 => ProblemKind::BadRequest,
            };
            let mut handled = fail(None, Problem::new(kind, error.detail()));
            // The body's framing is in doubt: read no further request on
            // this connection.
            if request.version() < Version::HTTP_2 {
                handled
                    .response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            return handled;
        }
        let host_value = match request_host(&mut request) {
            Ok(host) => host,
            Err(error) => {
                return fail(None, Problem::new(ProblemKind::BadRequest, error.detail()));
            }
        };
        // Checked: a valid host is printable ASCII.
        let host = host_value.to_str().unwrap_or_default();

        // 3. route match
        let Some(route) = self
            .router
            .find(Some(host), request.method(), request.uri().path())
        else {
            return fail(
                None,
                Problem::new(
                    ProblemKind::NoRoute,
                    format!("no route for {} {}", request.method(), request.uri().path()),
                ),
            );
        };
        if let Some(problem) = check_declared_length(&request, route.max_body_size) {
            return fail(Some(route), problem);
        }
        let downstream_upgrade = (request.version() == Version::HTTP_11
            && wants_upgrade(request.headers()))
        .then(|| hyper::upgrade::on(&mut request));
        // The body carries its watch: whoever reads the body records on it
        // whether the client failed (see `send`).
        let request = request.map(|body| ProxyBody::request(body, route.max_body_size));

        // 4. request filter
        let (request, on_response) = match &route.filter {
            None => (request, None),
            Some(filter) => {
                let ctx = RequestContext {
                    request_id,
                    route: &route.name,
                    downstream,
                };
                match filter.on_request(&ctx, request).await {
                    FilterDecision::Respond(response) => {
                        return Handled {
                            route: Some(route),
                            response,
                        };
                    }
                    FilterDecision::Forward {
                        request,
                        on_response,
                    } => (request, on_response),
                }
            }
        };

        // 5. upstream selection and 6. upstream request, under the breakers,
        // with retries (keel_upstream::forward picks each attempt's
        // endpoint with Upstream::select_available)
        let upstream = &self.upstreams[route.upstream];
        let stale_key = route.stale.as_ref().and_then(|c| c.key(&request, host));
        let upgrade = downstream_upgrade.is_some();
        let ends_by = tokio::time::Instant::now() + upstream.request_timeout;
        let forward = keel_upstream::forward(upstream, request, upgrade, ends_by, |head| {
            self.upstream_head(head, host, downstream, upgrade)
        });
        let outcome = if let Some(hook) = on_response.as_ref().filter(|h| h.must_hold(ends_by)) {
            let mut forward = std::pin::pin!(forward);
            hook.hold(forward.as_mut()).await
        } else {
            forward.await
        };

        // 6b. stale fallback: a failed read answered from the route's cache
        let outcome = match (&route.stale, stale_key) {
            (Some(cache), Some(key)) => cache.through(key, outcome).await,
            _ => outcome,
        };

        // 7. response filter
        let mut response = match on_response {
            Some(hook) => hook.on_response(outcome).await,
            None => match outcome {
                Ok(response) => response,
                Err(failure) => failure.into_problem().into_response(Some(request_id)),
            },
        };
        self.filter_response(&mut response, downstream_upgrade);
        Handled {
            route: Some(route),
            response,
        }
    }

    /// Turns the downstream request's head into the one sent upstream, and
    /// gives this hop's header lines that are written as they are.
    fn upstream_head<'a>(
        &self,
        parts: &mut Parts,
        host: &'a str,
        downstream: &'a Downstream,
        upgrade: bool,
    ) -> ExtraLines<'a> {
        // origin-form on the upstream connection
        if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
            let path = parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/"));
            parts.uri = Uri::from(path);
        }
        let downstream_version = parts.version;
        parts.version = Version::HTTP_11;
        let headers = &mut parts.headers;
        remove_hop_by_hop(headers, upgrade);
        // Host is preserved: HTTP/2 clients send :authority instead, which
        // became Host for the HTTP/1.1 upstream (`request_host`). A request
        // with no host at all gets the endpoint's (keel_upstream::forward).
        let mut extra = ExtraLines::new();
        if has_forwarded(headers) {
            // A hop before this one: ours are appended to its values.
            append_forwarded(
                headers,
                &downstream.forwarded_for,
                downstream.proto,
                Some(host),
            );
        } else {
            // The first hop, the usual case: lines formatted once per
            // connection, and the host, written as they are.
            extra.push(downstream.forwarded_for.first_hop_lines());
            extra.push(host.as_bytes());
            extra.push(b"\r\n");
        }
        if self.settings.via {
            append_via(headers, downstream_version);
        }
        extra
    }

    /// Response headers and upgrades.
    fn filter_response(
        &self,
        response: &mut Response<ProxyBody>,
        downstream_upgrade: Option<hyper::upgrade::OnUpgrade>,
    ) {
        let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
        let websocket = switching && crate::tunnel::is_websocket(response.headers());
        remove_hop_by_hop(response.headers_mut(), switching);
        if self.settings.via {
            append_via(response.headers_mut(), Version::HTTP_11);
        }
        if switching {
            let upstream_upgrade = response
                .extensions_mut()
                .remove::<keel_h1::OnUpgrade>()
                .and_then(|upgrade| upgrade.take());
            match (downstream_upgrade, upstream_upgrade) {
                (Some(down), Some(up)) => {
                    tokio::spawn(crate::tunnel::splice(
                        down,
                        up,
                        websocket,
                        self.settings.tunnel_close.clone(),
                        self.connections.clone(),
                    ));
                }
                _ => {
                    *response = Problem::new(
                        ProblemKind::UpstreamBadResponse,
                        "the upstream switched protocols without being asked",
                    )
                    .into_response(response.headers().get(X_REQUEST_ID));
                }
            }
        }
    }
}

/// The status logged and counted (never sent) for a request whose client
/// closed its connection before its body was complete.
const CLIENT_CLOSED: StatusCode = match StatusCode::from_u16(499) {
    Ok(status) => status,
    Err(_) => StatusCode::BAD_REQUEST,
};

/// The client's request id, or a new one when absent or unusable.
fn request_id(request: &Request<Incoming>) -> HeaderValue {
    match request.headers().get(X_REQUEST_ID) {
        Some(id) if !id.is_empty() && id.len() <= 200 => id.clone(),
        _ => new_request_id(),
    }
}

/// The host the client asked for, checked (see [`keel_http::headers::request_host`]).
/// When it is not the request's `Host` byte for byte (HTTP/2 `:authority`,
/// an HTTP/1.1 absolute-form target), `Host` is set to it, so the
/// upstream reads the host the gateway routed on. Usually it is the `Host`
/// header itself, returned shared (a reference count), not copied.
fn request_host(request: &mut Request<Incoming>) -> Result<HeaderValue, HostError> {
    let (value, same) = {
        let host =
            keel_http::headers::request_host(request.version(), request.uri(), request.headers())?;
        match request.headers().get(header::HOST) {
            Some(value) if value.as_bytes() == host.as_bytes() => (value.clone(), true),
            // Checked above: a valid host is a valid header value.
            _ => (
                HeaderValue::from_str(host).unwrap_or_else(|_| HeaderValue::from_static("")),
                false,
            ),
        }
    };
    if !same && !value.is_empty() {
        request.headers_mut().insert(header::HOST, value.clone());
    }
    Ok(value)
}

/// 413 early when `Content-Length` already says the body is too large.
fn check_declared_length(request: &Request<Incoming>, limit: u64) -> Option<Problem> {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse::<u64>()
        .ok()?;
    (declared > limit).then(|| {
        Problem::new(
            ProblemKind::BodyTooLarge,
            format!("the request body ({declared} bytes) is over the {limit}-byte limit"),
        )
    })
}
