//! `application/problem+json` (RFC 9457) answers written the one way every
//! Keel crate writes them: the same body shape and the same `Retry-After`
//! rule, so a client parses one format whichever part of Keel refused it.
//!
//! ```
//! use std::time::Duration;
//! use keel_problem::Problem;
//!
//! let response = Problem {
//!     type_uri: "urn:example:problem:busy",
//!     title: "Busy",
//!     status: http::StatusCode::SERVICE_UNAVAILABLE,
//!     detail: "try again shortly",
//!     request_id: Some("req-1"),
//!     original_request_id: None,
//!     retry_after: Some(Duration::from_millis(1500)),
//! }
//! .to_response();
//! assert_eq!(response.status(), 503);
//! assert_eq!(response.headers()["content-type"], keel_problem::CONTENT_TYPE);
//! assert_eq!(response.headers()["retry-after"], "2");
//! let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
//! assert_eq!(body["request_id"], "req-1");
//! ```

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

/// The content type of every problem answer.
pub const CONTENT_TYPE: &str = "application/problem+json";

/// One problem answer, borrowed from its maker's own problem type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Problem<'a> {
    /// The stable `type` URI clients branch on.
    pub type_uri: &'a str,
    /// A short, fixed title for the type.
    pub title: &'a str,
    /// The HTTP status, also written in the body.
    pub status: StatusCode,
    /// What happened this time, for humans.
    pub detail: &'a str,
    /// The id of the request answered, written as `request_id`.
    pub request_id: Option<&'a str>,
    /// The id of an earlier request involved, written as
    /// `original_request_id`.
    pub original_request_id: Option<&'a str>,
    /// When to come back, sent as `Retry-After` (see [`retry_after_secs`]).
    pub retry_after: Option<Duration>,
}

impl Problem<'_> {
    /// The JSON body (keys in a fixed, sorted order).
    ///
    /// ```
    /// let p = keel_problem::Problem {
    ///     type_uri: "urn:x", title: "X", status: http::StatusCode::CONFLICT,
    ///     detail: "d", request_id: None, original_request_id: None, retry_after: None,
    /// };
    /// assert_eq!(p.body(), r#"{"detail":"d","status":409,"title":"X","type":"urn:x"}"#);
    /// ```
    pub fn body(&self) -> String {
        let mut body = serde_json::json!({
            "type": self.type_uri,
            "title": self.title,
            "status": self.status.as_u16(),
            "detail": self.detail,
        });
        if let Some(id) = self.original_request_id {
            body["original_request_id"] = serde_json::Value::from(id);
        }
        if let Some(id) = self.request_id {
            body["request_id"] = serde_json::Value::from(id);
        }
        body.to_string()
    }

    /// The response: status, `content-type`, `Retry-After` and the body.
    /// Headers of the maker's own (request ids, caching) are its to add.
    pub fn to_response(&self) -> Response<Bytes> {
        let mut response = Response::new(Bytes::from(self.body()));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
        if let Some(after) = self.retry_after {
            headers.insert(
                header::RETRY_AFTER,
                HeaderValue::from(retry_after_secs(after)),
            );
        }
        response
    }
}

/// `Retry-After` in whole seconds: rounded up, and never 0, since "retry
/// now" invites a hot loop.
///
/// ```
/// use std::time::Duration;
/// assert_eq!(keel_problem::retry_after_secs(Duration::ZERO), 1);
/// assert_eq!(keel_problem::retry_after_secs(Duration::from_millis(1001)), 2);
/// assert_eq!(keel_problem::retry_after_secs(Duration::from_secs(3)), 3);
/// ```
pub fn retry_after_secs(after: Duration) -> u64 {
    (after.as_secs() + u64::from(after.subsec_nanos() > 0)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_lands_in_the_body_and_headers() {
        let response = Problem {
            type_uri: "urn:keel:problem:idempotency-in-flight",
            title: "In flight",
            status: StatusCode::CONFLICT,
            detail: "wait \"quoted\"",
            request_id: Some("r-2"),
            original_request_id: Some("r-1"),
            retry_after: Some(Duration::from_millis(1)),
        }
        .to_response();
        assert_eq!(response.status(), 409);
        assert_eq!(response.headers()["retry-after"], "1");
        let body: serde_json::Value = serde_json::from_slice(response.body()).expect("json");
        assert_eq!(body["detail"], "wait \"quoted\"");
        assert_eq!(body["original_request_id"], "r-1");
        assert_eq!(body["request_id"], "r-2");
        assert_eq!(body["status"], 409);
    }
}
