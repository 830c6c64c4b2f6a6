//! One attempt: a request sent on an endpoint's pool under a deadline,
//! and the typed error when it fails, blamed on whoever failed.

use http::Response;
use http::request::Parts;
use keel_http::{BodyFault, BodyWatch, ProxyBody};

use crate::endpoint::{Endpoint, InFlight, SendError, Upstream};
use crate::error::{ClientFault, ErrorKind, UpstreamError};

/// Sends the request (`head`, `extra` header lines, `body`) on the
/// endpoint's pool by
/// `deadline` (the end of the upstream's `request_timeout` for the
/// request).
///
/// Who failed decides what the failure is: the request body's
/// [`BodyWatch`] (set where the body limit is applied) says whether the client's body broke, was
/// cut short, or was what the exchange was waiting for when the deadline
/// passed. Those are the client's failures (400, 408, 413, or
/// [`ClientFault::Closed`]); everything else is the upstream's.
pub async fn send(
    upstream: &Upstream,
    endpoint: &Endpoint,
    head: &Parts,
    extra: &keel_h1::ExtraLines<'_>,
    mut body: ProxyBody,
    deadline: tokio::time::Instant,
) -> Result<Response<ProxyBody>, UpstreamError> {
    let _in_flight = InFlight::start(endpoint);
    let watch = body.watch();
    match tokio::time::timeout_at(deadline, endpoint.send(head, extra, body)).await {
        Ok(Ok(response)) => Ok(response),
        Ok(Err(error)) => Err(classify(&upstream.name, endpoint, &error, watch.as_ref())),
        Err(_elapsed) => {
            if let Some(watch) = &watch {
                if let Some(fault) = watch.fault() {
                    return Err(body_failure(fault, watch, true));
                }
                if watch.waiting_on_client() {
                    return Err(body_timeout(upstream, Some(watch)));
                }
            }
            Err(UpstreamError::new(
                ErrorKind::Timeout,
                format!(
                    "upstream {:?} did not answer within {:?}",
                    upstream.name, upstream.request_timeout
                ),
                true,
            ))
        }
    }
}

/// The failure for a request body that was still coming, too slowly, when
/// the upstream's `request_timeout` ran out: the client's lateness (408).
pub fn body_timeout(upstream: &Upstream, watch: Option<&BodyWatch>) -> UpstreamError {
    let received = watch.map_or(0, BodyWatch::received);
    tracing::debug!(
        upstream = upstream.name,
        received,
        "request body too slow; not counted against the upstream"
    );
    UpstreamError::new(
        ErrorKind::Client(ClientFault::TooSlow),
        format!(
            "the request body did not arrive within the {:?} request timeout \
             ({received} bytes received)",
            upstream.request_timeout
        ),
        true,
    )
}

/// The failure for a request body that failed on the client's side.
pub fn body_failure(fault: BodyFault, watch: &BodyWatch, sent: bool) -> UpstreamError {
    let detail = match fault {
        BodyFault::Malformed => {
            "the request body is malformed (invalid framing) and could not be read".to_owned()
        }
        BodyFault::Incomplete => format!(
            "the client closed the connection before sending the whole request body \
                 ({} bytes received)",
            watch.received()
        ),
        BodyFault::TooLarge => format!("request body over the {}-byte limit", watch.limit()),
    };
    UpstreamError::new(ErrorKind::Client(fault.into()), detail, sent)
}

/// Maps a send error to the problem the client sees: the client's when its
/// body failed, else the upstream's.
fn classify(
    upstream: &str,
    endpoint: &Endpoint,
    error: &SendError,
    watch: Option<&BodyWatch>,
) -> UpstreamError {
    let (kind, detail, sent) = match error {
        SendError::Connect(_) => (
            ErrorKind::Connect,
            format!("could not connect to upstream {upstream:?}"),
            false,
        ),
        SendError::ConnectTimeout => (
            ErrorKind::ConnectTimeout,
            format!("timed out connecting to upstream {upstream:?}"),
            false,
        ),
        SendError::Exchange {
            error: exchange,
            sent,
        } => {
            // The request body being streamed failed: the watch knows how. A
            // body without a watch (the gateway's own) is judged from its
            // error.
            let fault = watch.and_then(BodyWatch::fault).or_else(|| match exchange {
                keel_h1::Error::Body(body) => Some(BodyFault::of(body.as_ref())),
                _ => None,
            });
            if let Some(fault) = fault {
                let fallback = BodyWatch::default();
                let failure = body_failure(fault, watch.unwrap_or(&fallback), *sent);
                tracing::debug!(
                    upstream,
                    endpoint = endpoint.url,
                    %error,
                    kind = ?failure.kind,
                    "request body failed on the client's side; not counted against the upstream"
                );
                return failure;
            }
            (
                ErrorKind::BadResponse,
                format!("upstream {upstream:?} closed the connection or sent an invalid response"),
                *sent,
            )
        }
    };
    tracing::warn!(upstream, endpoint = endpoint.url, %error, "upstream request failed");
    UpstreamError::new(kind, detail, sent)
}
