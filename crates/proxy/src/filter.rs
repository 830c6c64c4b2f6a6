//! The seams where a route's own logic plugs into the life of a request:
//! a [`RequestFilter`] before the upstream is chosen (it may answer by
//! itself), and the [`ResponseFilter`] it may hand back, which sees the
//! upstream's outcome. The idempotency engine is such a pair.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;

use http::header::HeaderValue;
use http::{Request, Response};
use keel_http::ProxyBody;
use keel_http::headers::ForwardedFor;
use keel_upstream::UpstreamError;

/// A boxed future, as filters return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where a request came from: made once per connection.
#[derive(Debug, Clone)]
pub struct Downstream {
    /// The client's address.
    pub peer: SocketAddr,
    /// The scheme the client used (`http`).
    pub proto: &'static str,
    /// The client's address as `X-Forwarded-For` writes it.
    pub forwarded_for: ForwardedFor,
}

/// What a filter knows about the request besides the request itself.
#[derive(Debug)]
pub struct RequestContext<'a> {
    /// The request id (also in the request's headers).
    pub request_id: &'a HeaderValue,
    /// The matched route's name.
    pub route: &'a str,
    /// The client.
    pub downstream: &'a Downstream,
}

/// What a request filter decided.
pub enum FilterDecision {
    /// Send `request` upstream; `on_response` (if any) sees the outcome and
    /// makes the final response.
    Forward {
        /// The request to send (the filter may have buffered its body).
        request: Request<ProxyBody>,
        /// Called with the upstream's answer or failure.
        on_response: Option<Box<dyn ResponseFilter>>,
    },
    /// Answer the client now; nothing goes upstream.
    Respond(Response<ProxyBody>),
}

/// A per-route hook before the upstream is chosen.
pub trait RequestFilter: Send + Sync + 'static {
    /// Inspects (and may consume) the request.
    fn on_request<'a>(
        &'a self,
        ctx: &'a RequestContext<'a>,
        request: Request<ProxyBody>,
    ) -> BoxFuture<'a, FilterDecision>;
}

/// What the upstream phase produced: a response, or why there is none.
pub type UpstreamOutcome = Result<Response<ProxyBody>, UpstreamError>;

/// The upstream phase of one request, borrowed for
/// [`ResponseFilter::hold`] so that the filter can run beside it without
/// boxing it.
pub type Exchange<'a> = Pin<&'a mut (dyn Future<Output = UpstreamOutcome> + Send + 'a)>;

/// A hook that sees the upstream's outcome for one request.
pub trait ResponseFilter: Send + 'static {
    /// Whether the upstream phase, which ends by `ends_by` (it runs under
    /// the upstream's `request_timeout`), must run under
    /// [`hold`](Self::hold); when false it is awaited as it is. The
    /// idempotency filter needs it only when its claim's lease could run
    /// out first.
    fn must_hold(&self, ends_by: tokio::time::Instant) -> bool {
        let _ = ends_by;
        false
    }

    /// Drives the upstream phase (selection, sending, retries, up to the
    /// response head). The idempotency filter renews its claim's lease
    /// here, so a slow upstream is not taken for a dead one; the default
    /// just awaits it.
    fn hold<'a>(&'a self, exchange: Exchange<'a>) -> BoxFuture<'a, UpstreamOutcome> {
        Box::pin(exchange)
    }

    /// Makes the response sent downstream.
    fn on_response(
        self: Box<Self>,
        outcome: Result<Response<ProxyBody>, UpstreamError>,
    ) -> BoxFuture<'static, Response<ProxyBody>>;
}
