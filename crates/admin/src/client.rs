//! The client side: requests to a running gateway's admin API, answered
//! with the DTOs, and their rendering for a terminal (`keel status`,
//! `keel drain`).

use std::fmt::Write as _;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;

use crate::backend::BreakerAction;
use crate::dto::{
    BreakerSnapshot, DrainProgress, DrainReport, EndpointDrainStarted, EndpointResumed, KeyAnswer,
    KeyQuery, Status, SupervisionNode,
};
use crate::query::{key_path, percent_encode};

/// How long connecting to the admin API may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a request to the admin API failed.
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
    /// Answered something else than the document asked for.
    #[error("the admin API at {addr} answered {status}: is this a keel admin address?")]
    BadAnswer {
        /// The address tried.
        addr: String,
        /// What it said.
        status: StatusCode,
    },
    /// Refused the request, saying why in `error` (when it did).
    #[error("{status}: {}", error.as_deref().unwrap_or("refused"))]
    Refused {
        /// What it said.
        status: StatusCode,
        /// The `error` of its [`ErrorBody`](crate::ErrorBody).
        error: Option<String>,
    },
}

/// `host:port` from an admin address given as `host:port` or a URL.
fn admin_host(addr: &str) -> String {
    addr.trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned()
}

/// Sends one request without a body to a gateway's admin API (`addr` as
/// `host:port` or `http://host:port`); returns the status and the body.
pub async fn admin_request(
    addr: &str,
    method: Method,
    path: &str,
) -> Result<(StatusCode, Bytes), StatusError> {
    let host = admin_host(addr);
    let unreachable = |source: Box<dyn std::error::Error + Send + Sync>| StatusError::Unreachable {
        addr: host.clone(),
        source,
    };
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&host))
        .await
        .map_err(|e| unreachable(Box::new(e)))?
        .map_err(|e| unreachable(Box::new(e)))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(Box::new(e)))?;
    tokio::spawn(connection);
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, host.as_str())
        .body(Empty::new())
        .map_err(|e| unreachable(Box::new(e)))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| unreachable(Box::new(e)))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| unreachable(Box::new(e)))?
        .to_bytes();
    Ok((status, body))
}

/// Sends a request and reads the answer as `T` when `accepted(status)`;
/// otherwise the refusal, with the `error` of its body.
async fn request_json<T: DeserializeOwned>(
    addr: &str,
    method: Method,
    path: &str,
    accepted: impl Fn(StatusCode) -> bool,
) -> Result<T, StatusError> {
    let (status, body) = admin_request(addr, method, path).await?;
    if !accepted(status) {
        let error = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error")?.as_str().map(str::to_owned));
        return Err(StatusError::Refused { status, error });
    }
    serde_json::from_slice(&body).map_err(|_| StatusError::BadAnswer {
        addr: admin_host(addr),
        status,
    })
}

/// `GET /status`.
pub async fn fetch_status(addr: &str) -> Result<Status, StatusError> {
    let (status, body) = admin_request(addr, Method::GET, "/status").await?;
    let bad = || StatusError::BadAnswer {
        addr: admin_host(addr),
        status,
    };
    if status != StatusCode::OK {
        return Err(bad());
    }
    serde_json::from_slice(&body).map_err(|_| bad())
}

/// `GET /drain`.
pub async fn fetch_drain(addr: &str) -> Result<DrainReport, StatusError> {
    request_json(addr, Method::GET, "/drain", |s| s == StatusCode::OK).await
}

/// `POST /drain`: starts the gateway's shutdown sequence.
pub async fn start_drain(addr: &str) -> Result<DrainReport, StatusError> {
    request_json(addr, Method::POST, "/drain", |s| s == StatusCode::ACCEPTED).await
}

/// `POST /upstreams/{upstream}/endpoints/drain?endpoint=URL`.
pub async fn drain_endpoint(
    addr: &str,
    upstream: &str,
    endpoint: &str,
) -> Result<EndpointDrainStarted, StatusError> {
    let path = endpoint_path(upstream, "drain", endpoint);
    request_json(addr, Method::POST, &path, |s| s.is_success()).await
}

/// `POST /upstreams/{upstream}/endpoints/resume?endpoint=URL`.
pub async fn resume_endpoint(
    addr: &str,
    upstream: &str,
    endpoint: &str,
) -> Result<EndpointResumed, StatusError> {
    let path = endpoint_path(upstream, "resume", endpoint);
    request_json(addr, Method::POST, &path, |s| s.is_success()).await
}

fn endpoint_path(upstream: &str, action: &str, endpoint: &str) -> String {
    format!(
        "/upstreams/{}/endpoints/{action}?endpoint={}",
        percent_encode(upstream),
        percent_encode(endpoint)
    )
}

/// `POST /breakers/{upstream}/{action}`: the upstream-wide breaker after
/// the override.
pub async fn breaker_action(
    addr: &str,
    upstream: &str,
    action: BreakerAction,
) -> Result<BreakerSnapshot, StatusError> {
    let path = format!("/breakers/{}/{}", percent_encode(upstream), action.as_str());
    request_json(addr, Method::POST, &path, |s| s.is_success()).await
}

/// `GET /idempotency/keys` (or `DELETE` with `release`: the key's record
/// is removed so the next request with it runs).
pub async fn idempotency_key(
    addr: &str,
    query: &KeyQuery,
    release: bool,
) -> Result<KeyAnswer, StatusError> {
    let method = if release { Method::DELETE } else { Method::GET };
    request_json(addr, method, &key_path(query), |s| s.is_success()).await
}

/// One breaker on one line: state, override, time left, trips.
fn breaker_line(breaker: Option<&BreakerSnapshot>) -> String {
    let Some(b) = breaker else {
        return "off".to_owned();
    };
    let state = b.state.as_str().to_uppercase();
    let mode = match b.mode {
        crate::BreakerMode::Normal => String::new(),
        mode => format!(" [{}]", mode.as_str().to_uppercase()),
    };
    let left = b
        .retry_after_ms
        .map(|ms| format!(" retry in {:.1}s", ms as f64 / 1000.0))
        .unwrap_or_default();
    format!(
        "{state}{mode}{left} trips {} rejected {}",
        b.counters.trips, b.counters.rejected
    )
}

/// Renders `/status` for a terminal (`keel status`).
pub fn render_status(status: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "keel {}  listen {}  up {}s  {}  connections {}{}",
        status.version,
        status.listen,
        status.uptime_seconds,
        if status.ready { "READY" } else { "NOT READY" },
        status.connections,
        if status.draining { "  DRAINING" } else { "" },
    );
    for condition in &status.readiness {
        let _ = writeln!(
            out,
            "  readiness {:<12} {}{}",
            condition.name,
            if condition.ready { "ok" } else { "not ready" },
            condition
                .reason
                .as_ref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default(),
        );
    }
    let _ = writeln!(out, "upstreams:");
    for upstream in &status.upstreams {
        let _ = writeln!(out, "  {} ({})", upstream.name, upstream.load_balancing);
        let _ = writeln!(
            out,
            "    breaker {}",
            breaker_line(upstream.breaker.as_ref())
        );
        for e in &upstream.endpoints {
            let _ = writeln!(
                out,
                "    {:<28} in_flight {} open {} connects {}",
                e.url, e.in_flight, e.open_connections, e.connects
            );
            let health = match &e.resilience.health {
                None => "not checked".to_owned(),
                Some(h) => format!(
                    "{} (passed {}, failed {})",
                    if h.healthy { "healthy" } else { "EJECTED" },
                    h.passed,
                    h.failed
                ),
            };
            let _ = writeln!(
                out,
                "      breaker {}  health {health}",
                breaker_line(e.resilience.breaker.as_ref()),
            );
        }
    }
    let _ = writeln!(out, "routes:");
    for r in &status.routes {
        let _ = writeln!(
            out,
            "  {:<20} -> {}{}",
            r.path_prefix,
            r.upstream.as_deref().unwrap_or("-"),
            if r.idempotency { "  [idempotent]" } else { "" }
        );
    }
    let _ = writeln!(out, "drain: {}", status.drain.phase.as_str());
    for e in &status.drain.endpoints {
        let p = &e.progress;
        let _ = writeln!(
            out,
            "  {} {}: {} closed {}/{}{}",
            e.upstream,
            e.endpoint,
            if e.draining { "draining" } else { "resumed" },
            p.closed,
            p.total,
            if p.done { " (done)" } else { "" },
        );
    }
    let _ = writeln!(out, "supervision:");
    match &status.supervision {
        None => {
            let _ = writeln!(out, "  (not reported)");
        }
        Some(root) => render_tree(&mut out, root, 1),
    }
    out
}

/// One line per node of the supervision tree, indented by depth.
fn render_tree(out: &mut String, node: &SupervisionNode, depth: usize) {
    let _ = writeln!(
        out,
        "{:indent$}{:<12} {:<10} {:<9} restarts {}{}",
        "",
        node.name,
        node.state,
        if node.ready { "ready" } else { "not ready" },
        node.restarts,
        node.reason
            .as_ref()
            .map(|r| format!("  ({r})"))
            .unwrap_or_default(),
        indent = depth * 2
    );
    for child in &node.children {
        render_tree(out, child, depth + 1);
    }
}

/// One line of `keel drain` output for a drain in `phase` (as
/// [`DrainPhase::as_str`](crate::DrainPhase::as_str) spells it) with
/// `progress` (none yet: the phase alone), `wall` after the command
/// started: a bar on a terminal (`tty`), words otherwise.
///
/// ```
/// use std::time::Duration;
/// use keel_admin::{DrainProgress, progress_line};
/// let p = DrainProgress { total: 10, closed: 5, remaining: 5, elapsed_ms: 1000, ..Default::default() };
/// assert_eq!(
///     progress_line("draining", Some(&p), Duration::from_secs(1), false),
///     "drain: draining closed 5/10 rate 5/s left ~1s"
/// );
/// assert_eq!(progress_line("shutdown_delay", None, Duration::ZERO, false), "drain: shutdown_delay");
/// ```
pub fn progress_line(
    phase: &str,
    progress: Option<&DrainProgress>,
    wall: Duration,
    tty: bool,
) -> String {
    let Some(p) = progress else {
        return format!("drain: {phase}");
    };
    let (total, closed, forced) = (p.total, p.closed, p.forced);
    let elapsed = p.elapsed_ms.max(1);
    let rate = closed as f64 * 1000.0 / elapsed as f64;
    let left_ms = p.expected_finish_ms.saturating_sub(elapsed);
    let left = if p.remaining == 0 {
        "0s".to_owned()
    } else if rate > 0.0 {
        format!(
            "{:.0}s",
            (left_ms as f64 / 1000.0).max(p.remaining as f64 / rate)
        )
    } else {
        format!("{:.0}s", left_ms as f64 / 1000.0)
    };
    let forced = if forced > 0 {
        format!("  forced {forced}")
    } else {
        String::new()
    };
    if tty {
        const WIDTH: u64 = 30;
        let filled = (closed * WIDTH).checked_div(total).unwrap_or(WIDTH);
        format!(
            "[{}{}] {closed}/{total} closed  {rate:.0}/s  ~{left} left  ({phase}, {:.0}s){forced}",
            "#".repeat(filled as usize),
            ".".repeat((WIDTH - filled.min(WIDTH)) as usize),
            wall.as_secs_f64()
        )
    } else {
        format!("drain: {phase} closed {closed}/{total} rate {rate:.0}/s left ~{left}{forced}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_for_a_terminal_and_for_logs() {
        let p = DrainProgress {
            total: 1000,
            signalled: 600,
            closed: 500,
            remaining: 500,
            forced: 0,
            elapsed_ms: 2000,
            expected_finish_ms: 4000,
            done: false,
        };
        let bar = progress_line("draining", Some(&p), Duration::from_secs(3), true);
        assert!(
            bar.starts_with(&format!(
                "[{}{}] 500/1000 closed  250/s  ~2s left",
                "#".repeat(15),
                ".".repeat(15)
            )),
            "{bar}"
        );
        let plain = progress_line("draining", Some(&p), Duration::from_secs(3), false);
        assert_eq!(plain, "drain: draining closed 500/1000 rate 250/s left ~2s");
        let done = DrainProgress::default();
        assert!(
            progress_line("done", Some(&done), Duration::ZERO, true)
                .starts_with(&format!("[{}] 0/0", "#".repeat(30)))
        );
        assert_eq!(
            progress_line("shutdown_delay", None, Duration::ZERO, false),
            "drain: shutdown_delay"
        );
        let forced = DrainProgress { forced: 3, ..p };
        assert!(
            progress_line("draining", Some(&forced), Duration::ZERO, false).ends_with("  forced 3")
        );
    }

    #[test]
    fn addresses_may_be_urls() {
        assert_eq!(admin_host("http://127.0.0.1:9901/"), "127.0.0.1:9901");
        assert_eq!(admin_host("127.0.0.1:9901"), "127.0.0.1:9901");
    }
}
