//! Phase 6, the upstream request, with its resilience: the upstream-wide
//! breaker first, then for each attempt an endpoint whose breaker admits
//! it (holding the permit until the response head), and for requests that
//! are safe to repeat, retries on another endpoint with full-jitter backoff,
//! paid from the upstream's retry budget, all inside the upstream's
//! `request_timeout`.
//!
//! Only the upstream's failures count: an attempt that failed because of
//! the client's request body (malformed, cut short, too large, too slow)
//! is recorded as `Ignore` by both breakers, is never retried, takes
//! nothing from the budget and is not in `keel_upstream_failures_total`.

use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{Method, Request, Response, header};
use http_body::Body;
use http_body_util::BodyExt;
use keel_breaker::Outcome;
use keel_retry::Budget;
use tokio::time::Instant;

use keel_h1::ExtraLines;
use keel_http::{BodyFault, BodyWatch, ProxyBody};

use crate::endpoint::{Endpoint, Unavailable, Upstream};
use crate::error::{ErrorKind, UpstreamError};
use crate::send::{body_failure, body_timeout, send};

/// A request extension that marks a request as safe to repeat whatever its
/// method, for a request filter that knows the upstream treats repeats as
/// one: `request.extensions_mut().insert(RetrySafe)`. The idempotency
/// filter does not set it: its key keeps the gateway's clients from
/// running a POST twice, but a POST resent after it may have reached one
/// endpoint could run again on another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetrySafe;

/// Whether a request may be sent more than once: GET, HEAD, OPTIONS, PUT,
/// DELETE (idempotent by definition), or anything marked [`RetrySafe`].
pub fn is_retry_safe<B>(request: &Request<B>) -> bool {
    matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
    ) || request.extensions().get::<RetrySafe>().is_some()
}

/// A request body kept so the request can be sent again: the whole small
/// body, read once (`None`: no body). The head needs no copy: attempts
/// send the same head by reference.
struct Kept(Option<Bytes>);

impl Kept {
    fn body(&self) -> ProxyBody {
        self.0.clone().map_or(ProxyBody::Empty, ProxyBody::full)
    }
}

/// Keeps the body for retries when it is small; a kept body is read in
/// full first, bounded by `max_body` and by `deadline`. Reading it fails
/// only on the client's side: running out of time waits on the client
/// alone, and `too_slow` makes that failure (408, never the upstream's).
/// An empty body (most retry-safe requests: GETs) needs no read, watch or
/// timer.
async fn keep(
    body: ProxyBody,
    max_body: u64,
    deadline: Instant,
    too_slow: impl FnOnce(Option<&BodyWatch>) -> UpstreamError,
) -> Result<(ProxyBody, Option<Kept>), UpstreamError> {
    if body.is_end_stream() || body.size_hint().exact() == Some(0) {
        return Ok((ProxyBody::Empty, Some(Kept(None))));
    }
    if body.size_hint().exact().is_none_or(|n| n > max_body) {
        return Ok((body, None));
    }
    let mut body = body;
    let watch = body.watch();
    let bytes = match tokio::time::timeout_at(deadline, collect(body, watch.as_ref())).await {
        Ok(read) => read?,
        Err(_elapsed) => return Err(too_slow(watch.as_ref())),
    };
    Ok((ProxyBody::full(bytes.clone()), Some(Kept(Some(bytes)))))
}

async fn collect(body: ProxyBody, watch: Option<&BodyWatch>) -> Result<Bytes, UpstreamError> {
    match body.collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) => {
            let fault = watch
                .and_then(BodyWatch::fault)
                .unwrap_or_else(|| BodyFault::of(error.as_ref()));
            let fallback = BodyWatch::default();
            Err(body_failure(fault, watch.unwrap_or(&fallback), false))
        }
    }
}

/// The answer when no endpoint can take the request.
pub fn unavailable(upstream: &Upstream, why: Unavailable) -> UpstreamError {
    match why {
        Unavailable::NoEndpoints => UpstreamError::new(
            ErrorKind::NoEndpoints,
            "the upstream has no endpoints",
            false,
        ),
        Unavailable::NoneHealthy => {
            let wait = upstream
                .resilience
                .health_check
                .as_ref()
                .map_or(Duration::from_secs(1), |h| h.interval);
            UpstreamError::new(
                ErrorKind::Unavailable,
                format!(
                    "no endpoint of upstream {:?} passes its health checks",
                    upstream.name
                ),
                false,
            )
            .with_retry_after(wait)
        }
        Unavailable::BreakersOpen(wait) => UpstreamError::new(
            ErrorKind::Unavailable,
            format!(
                "the circuit breakers of upstream {:?} are open",
                upstream.name
            ),
            false,
        )
        .with_retry_after(wait.unwrap_or(Duration::from_secs(1))),
    }
}

/// Sends `request` to `upstream` under its breakers, retrying when safe,
/// and ends by `deadline` (the upstream's `request_timeout` from the
/// start; every wait below is bounded by it). `prepare` turns the
/// downstream request's head into the one sent upstream (headers,
/// origin-form URI), once, and gives the header lines to append to it as
/// they are: every attempt sends that head, by reference.
/// A head without `Host` (an HTTP/1.0 client's) gets the endpoint's
/// authority. `upgrade` requests are never retried.
pub async fn forward<'x>(
    upstream: &Upstream,
    request: Request<ProxyBody>,
    upgrade: bool,
    deadline: Instant,
    prepare: impl FnOnce(&mut Parts) -> ExtraLines<'x>,
) -> Result<Response<ProxyBody>, UpstreamError> {
    let resilience = &upstream.resilience;

    // The upstream-wide breaker: open means no endpoint is even tried.
    let upstream_permit = match resilience.allow() {
        Ok(permit) => permit,
        Err(rejected) => {
            return Err(unavailable(
                upstream,
                Unavailable::BreakersOpen(rejected.retry_after),
            ));
        }
    };

    let retry = resilience
        .retry
        .as_ref()
        .filter(|_| !upgrade && is_retry_safe(&request));
    let (mut head, body) = request.into_parts();
    let (mut first, kept) = match retry {
        Some(settings) => {
            let read = keep(body, settings.max_body, deadline, |watch| {
                body_timeout(upstream, watch)
            })
            .await;
            let kept = match read {
                Ok(kept) => kept,
                Err(client_failure) => {
                    if let Some(permit) = upstream_permit {
                        permit.record(Outcome::Ignore);
                    }
                    return Err(client_failure);
                }
            };
            // Only requests that can reach the upstream earn retries.
            settings.budget.on_request();
            kept
        }
        None => (body, None),
    };
    let extra = prepare(&mut head);
    let host_from_endpoint = !head.headers.contains_key(header::HOST);
    let max_attempts = match (&kept, retry) {
        (Some(_), Some(settings)) => settings.max_attempts,
        _ => 1,
    };

    let mut tried = 0u64;
    let mut backoff = None;
    let mut attempt = 1;
    let outcome = loop {
        let (index, permit) = match upstream.select_available(tried) {
            Ok(selected) => selected,
            Err(why) => break Err(unavailable(upstream, why)),
        };
        if index < 64 {
            tried |= 1 << index;
        }
        let endpoint: &Endpoint = &upstream.endpoints[index];
        if host_from_endpoint {
            head.headers
                .insert(header::HOST, endpoint.host_header().clone());
        }
        let body = match kept.as_ref().filter(|_| attempt > 1) {
            Some(kept) => kept.body(),
            None => std::mem::replace(&mut first, ProxyBody::Empty),
        };
        let result = send(upstream, endpoint, &head, &extra, body, deadline).await;

        // What this attempt says about the endpoint, and whether another
        // attempt could do better.
        let (verdict, worth_retrying) = match &result {
            Ok(response) => {
                let verdict = resilience.outcome_of(response.status(), response.headers());
                let again = retry.is_some_and(|s| s.statuses.contains(response.status()));
                (verdict, again)
            }
            // A timeout spends the deadline: no time for another attempt.
            Err(failure) if failure.is_upstream_side() => (Outcome::Failure, failure.retryable()),
            // The client, not the upstream, failed: nothing to learn
            // about the endpoint, and no point in another attempt.
            Err(_) => (Outcome::Ignore, false),
        };
        if verdict.is_failure() {
            resilience.failures.inc(failure_cause(&result));
        }
        if let Some(permit) = permit {
            permit.record(verdict);
        }
        let Some(settings) = retry.filter(|_| worth_retrying && attempt < max_attempts) else {
            break result;
        };
        if !settings.budget.try_retry() {
            settings.metrics.budget_exhausted.inc();
            break result;
        }
        let delay = backoff
            .get_or_insert_with(|| settings.backoff.iter())
            .next()
            .unwrap_or_default();
        if Instant::now() + delay >= deadline {
            break result;
        }
        // The failed answer is dropped (its connection is not reused).
        drop(result);
        settings.metrics.retries.inc();
        tokio::time::sleep(delay).await;
        attempt += 1;
    };

    if let Some(permit) = upstream_permit {
        match &outcome {
            Ok(response) => {
                permit.record(resilience.outcome_of(response.status(), response.headers()))
            }
            // Refused by the breakers, or the client's failure.
            Err(failure) if !failure.is_upstream_side() => permit.record(Outcome::Ignore),
            Err(_) => permit.failure(),
        }
    }
    outcome
}

/// The `keel_upstream_failures_total` cause of an attempt that counted
/// against the upstream.
fn failure_cause(result: &Result<Response<ProxyBody>, UpstreamError>) -> &'static str {
    match result {
        Ok(_) => "status",
        Err(failure) => failure.cause(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_idempotent_or_marked_requests_are_safe() {
        for method in ["GET", "HEAD", "OPTIONS", "PUT", "DELETE"] {
            let r = Request::builder().method(method).body(()).expect("request");
            assert!(is_retry_safe(&r), "{method}");
        }
        for method in ["POST", "PATCH"] {
            let mut r = Request::builder().method(method).body(()).expect("request");
            assert!(!is_retry_safe(&r), "{method}");
            r.extensions_mut().insert(RetrySafe);
            assert!(is_retry_safe(&r), "{method} marked safe");
        }
    }

    #[tokio::test]
    async fn small_bodies_are_kept_and_large_or_unsized_ones_are_not() {
        let later = Instant::now() + Duration::from_secs(3600);
        let late = |_: Option<&BodyWatch>| -> UpstreamError { unreachable!("no timeout") };
        let (body, kept) = keep(ProxyBody::full("hello"), 16, later, late)
            .await
            .expect("kept");
        let kept = kept.expect("small body kept");
        assert_eq!(collect(kept.body(), None).await.expect("body"), "hello");
        assert_eq!(collect(kept.body(), None).await.expect("body"), "hello");
        assert_eq!(collect(body, None).await.expect("body"), "hello");

        let big = ProxyBody::full(vec![0u8; 17]);
        assert!(keep(big, 16, later, late).await.expect("ok").1.is_none());
        let (body, kept) = keep(ProxyBody::Empty, 0, later, late).await.expect("ok");
        assert!(body.is_end_stream());
        assert!(kept.expect("an empty body is kept").body().is_end_stream());
    }
}
