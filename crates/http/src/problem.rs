//! Errors made by the gateway itself, answered as `application/problem+json`
//! (RFC 9457). Each kind has a stable `type` URI that clients may match on.

use std::time::Duration;

use http::{HeaderValue, Response, StatusCode, header};

use crate::body::ProxyBody;

/// What went wrong, as far as the client needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemKind {
    /// The request is not valid HTTP the gateway can forward.
    BadRequest,
    /// No route matches the request.
    NoRoute,
    /// Request body over the limit.
    BodyTooLarge,
    /// Request head over the limit.
    HeadersTooLarge,
    /// The upstream could not be reached (the request was never sent).
    UpstreamUnreachable,
    /// The upstream closed the connection or answered something that is not HTTP.
    UpstreamBadResponse,
    /// The upstream did not answer in time.
    UpstreamTimeout,
    /// A dependency is unavailable; try again after `Retry-After`.
    Unavailable,
    /// The client did not send its request body in time.
    RequestTimeout,
    /// The client closed its connection (or its sending half) before its
    /// request body was complete. Answered 400 in case it only half-closed
    /// and still reads; logged and counted as 499.
    ClientClosed,
    /// The request uses something the gateway does not implement (a
    /// transfer coding other than `chunked`).
    NotImplemented,
}

impl ProblemKind {
    /// The HTTP status for this kind.
    pub fn status(self) -> StatusCode {
        match self {
            ProblemKind::BadRequest => StatusCode::BAD_REQUEST,
            ProblemKind::NoRoute => StatusCode::NOT_FOUND,
            ProblemKind::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ProblemKind::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProblemKind::UpstreamUnreachable | ProblemKind::UpstreamBadResponse => {
                StatusCode::BAD_GATEWAY
            }
            ProblemKind::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ProblemKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ProblemKind::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ProblemKind::ClientClosed => StatusCode::BAD_REQUEST,
            ProblemKind::NotImplemented => StatusCode::NOT_IMPLEMENTED,
        }
    }

    /// The stable `type` URI.
    pub fn type_uri(self) -> &'static str {
        match self {
            ProblemKind::BadRequest => "urn:keel:problem:bad-request",
            ProblemKind::NoRoute => "urn:keel:problem:no-route",
            ProblemKind::BodyTooLarge => "urn:keel:problem:body-too-large",
            ProblemKind::HeadersTooLarge => "urn:keel:problem:headers-too-large",
            ProblemKind::UpstreamUnreachable => "urn:keel:problem:upstream-unreachable",
            ProblemKind::UpstreamBadResponse => "urn:keel:problem:upstream-bad-response",
            ProblemKind::UpstreamTimeout => "urn:keel:problem:upstream-timeout",
            ProblemKind::Unavailable => "urn:keel:problem:unavailable",
            ProblemKind::RequestTimeout => "urn:keel:problem:request-timeout",
            ProblemKind::ClientClosed => "urn:keel:problem:request-body-incomplete",
            ProblemKind::NotImplemented => "urn:keel:problem:not-implemented",
        }
    }

    /// A short human title.
    pub fn title(self) -> &'static str {
        match self {
            ProblemKind::BadRequest => "Bad request",
            ProblemKind::NoRoute => "No route for this request",
            ProblemKind::BodyTooLarge => "Request body too large",
            ProblemKind::HeadersTooLarge => "Request headers too large",
            ProblemKind::UpstreamUnreachable => "Upstream unreachable",
            ProblemKind::UpstreamBadResponse => "Upstream sent an invalid response",
            ProblemKind::UpstreamTimeout => "Upstream timed out",
            ProblemKind::Unavailable => "Service unavailable",
            ProblemKind::RequestTimeout => "Request body not received in time",
            ProblemKind::ClientClosed => "Request body incomplete",
            ProblemKind::NotImplemented => "Not implemented by the gateway",
        }
    }

    /// Whether the request (the client) failed, not the upstream: a bad or
    /// oversized request, a body that broke, was cut short or came too
    /// slowly. These never count against an upstream (breakers, outlier
    /// ejection, retries, upstream failure metrics).
    pub fn is_request_side(self) -> bool {
        matches!(
            self,
            ProblemKind::BadRequest
                | ProblemKind::BodyTooLarge
                | ProblemKind::HeadersTooLarge
                | ProblemKind::RequestTimeout
                | ProblemKind::ClientClosed
                | ProblemKind::NotImplemented
        )
    }

    /// Whether the upstream failed: it could not be reached, answered
    /// garbage or reset the connection, or did not answer in time.
    pub fn is_upstream_side(self) -> bool {
        matches!(
            self,
            ProblemKind::UpstreamUnreachable
                | ProblemKind::UpstreamBadResponse
                | ProblemKind::UpstreamTimeout
        )
    }

    /// The outcome label of the access log and of
    /// `keel_client_failures_total` for an answer of this kind.
    pub fn outcome(self) -> &'static str {
        match self {
            ProblemKind::BadRequest | ProblemKind::BodyTooLarge | ProblemKind::HeadersTooLarge => {
                "client_error"
            }
            ProblemKind::RequestTimeout => "client_timeout",
            ProblemKind::ClientClosed => "client_closed",
            ProblemKind::NoRoute => "no_route",
            ProblemKind::UpstreamUnreachable
            | ProblemKind::UpstreamBadResponse
            | ProblemKind::UpstreamTimeout => "upstream_error",
            ProblemKind::Unavailable => "unavailable",
            ProblemKind::NotImplemented => "client_error",
        }
    }
}

/// A gateway error: its kind, a detail line, and an optional retry hint.
#[derive(Debug, Clone)]
pub struct Problem {
    /// The kind (status and type).
    pub kind: ProblemKind,
    /// Human-readable detail for this occurrence.
    pub detail: String,
    /// Sent as `Retry-After` (seconds, rounded up).
    pub retry_after: Option<Duration>,
}

impl Problem {
    /// A problem of `kind` with `detail`.
    pub fn new(kind: ProblemKind, detail: impl Into<String>) -> Self {
        Problem {
            kind,
            detail: detail.into(),
            retry_after: None,
        }
    }

    /// Adds a `Retry-After` hint.
    pub fn retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// The problem+json response; `request_id` goes in the body as well as
    /// the header. The kind rides along as a response extension, so the
    /// logging phase can tell who failed.
    pub fn into_response(self, request_id: Option<&HeaderValue>) -> Response<ProxyBody> {
        let response = keel_problem::Problem {
            type_uri: self.kind.type_uri(),
            title: self.kind.title(),
            status: self.kind.status(),
            detail: &self.detail,
            request_id: request_id.and_then(|v| v.to_str().ok()),
            original_request_id: None,
            retry_after: self.retry_after,
        }
        .to_response();
        let mut response = response.map(ProxyBody::full);
        response.extensions_mut().insert(self.kind);
        let headers = response.headers_mut();
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(id) = request_id {
            headers.insert(crate::headers::X_REQUEST_ID, id.clone());
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Body;

    #[test]
    fn problem_json_with_retry_after() {
        let id = HeaderValue::from_static("abc");
        let response = Problem::new(ProblemKind::Unavailable, "store down")
            .retry_after(Duration::from_millis(1500))
            .into_response(Some(&id));
        assert_eq!(response.status(), 503);
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        assert_eq!(response.headers()["x-request-id"], "abc");
        assert!(response.body().size_hint().exact().is_some());
    }

    #[test]
    fn statuses_match_the_contract() {
        assert_eq!(ProblemKind::UpstreamUnreachable.status(), 502);
        assert_eq!(ProblemKind::UpstreamBadResponse.status(), 502);
        assert_eq!(ProblemKind::UpstreamTimeout.status(), 504);
        assert_eq!(ProblemKind::BodyTooLarge.status(), 413);
        assert_eq!(ProblemKind::HeadersTooLarge.status(), 431);
        assert_eq!(ProblemKind::BadRequest.status(), 400);
        assert_eq!(ProblemKind::RequestTimeout.status(), 408);
        assert_eq!(ProblemKind::ClientClosed.status(), 400);
    }

    #[test]
    fn every_kind_is_blamed_on_one_side_at_most() {
        use ProblemKind::*;
        let all = [
            BadRequest,
            NoRoute,
            BodyTooLarge,
            HeadersTooLarge,
            UpstreamUnreachable,
            UpstreamBadResponse,
            UpstreamTimeout,
            Unavailable,
            RequestTimeout,
            ClientClosed,
        ];
        for kind in all {
            assert!(
                !(kind.is_request_side() && kind.is_upstream_side()),
                "{kind:?}"
            );
            assert_eq!(
                kind.is_request_side(),
                kind.outcome().starts_with("client_"),
                "{kind:?}"
            );
        }
        let response = Problem::new(ClientClosed, "gone").into_response(None);
        assert_eq!(
            response.extensions().get::<ProblemKind>(),
            Some(&ClientClosed)
        );
        assert_eq!(ProblemKind::NotImplemented.status(), 501);
    }
}
