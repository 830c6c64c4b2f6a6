//! `application/problem+json` (RFC 9457) answers, one stable `type` per kind.
//!
//! ```
//! use keel_idempotency::problem::{Problem, ProblemKind};
//!
//! let p = Problem::new(ProblemKind::InFlight, "the first request is still running")
//!     .retry_after(std::time::Duration::from_millis(1500));
//! let response = p.to_response();
//! assert_eq!(response.status(), 409);
//! assert_eq!(response.headers()["retry-after"], "2");
//! assert_eq!(response.headers()["content-type"], "application/problem+json");
//! let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
//! assert_eq!(body["type"], "urn:keel:problem:idempotency-in-flight");
//! ```

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

/// The content type of every problem answer.
pub use keel_problem::CONTENT_TYPE;

/// Each kind of refusal the engine makes; its [`type_uri`](Self::type_uri)
/// never changes, so clients can branch on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ProblemKind {
    /// 400: the route requires a key and none was sent.
    KeyMissing,
    /// 400: the key is empty, too long or not printable ASCII.
    KeyInvalid,
    /// 422: the key was used before for a different request.
    FingerprintMismatch,
    /// 409 with `Retry-After`: the first request with this key is running.
    InFlight,
    /// 413: the body is over the route's limit for idempotent requests.
    BodyTooLarge,
    /// 503 with `Retry-After`: the store cannot be reached (fail-closed).
    StoreUnavailable,
    /// 409: an earlier request with this key may have run but its outcome
    /// was lost; it will not be run again under this key.
    OutcomeUnknown,
    /// 409: an earlier request with this key ran, but its response was too
    /// large to keep for replay.
    ResponseNotStored,
    /// 503 with `Retry-After`: the store is at capacity (or the tenant over
    /// its share) and takes no new keys until records expire.
    StoreFull,
    /// 400: a keyed request asked to upgrade the connection; a tunnel is no
    /// result that can be recorded or replayed.
    UpgradeRefused,
    /// 400: a keyed request carried no tenant (the policy's tenant source,
    /// by default `Authorization`, was absent) and the route does not
    /// admit anonymous callers; see
    /// [`MissingTenant`](crate::engine::MissingTenant).
    TenantMissing,
}

impl ProblemKind {
    /// The stable `type` URI.
    ///
    /// ```
    /// use keel_idempotency::problem::ProblemKind;
    /// assert_eq!(ProblemKind::KeyMissing.type_uri(), "urn:keel:problem:idempotency-key-missing");
    /// ```
    pub fn type_uri(self) -> &'static str {
        match self {
            Self::KeyMissing => "urn:keel:problem:idempotency-key-missing",
            Self::KeyInvalid => "urn:keel:problem:idempotency-key-invalid",
            Self::FingerprintMismatch => "urn:keel:problem:idempotency-key-reused",
            Self::InFlight => "urn:keel:problem:idempotency-in-flight",
            Self::BodyTooLarge => "urn:keel:problem:idempotency-body-too-large",
            Self::StoreUnavailable => "urn:keel:problem:idempotency-store-unavailable",
            Self::OutcomeUnknown => "urn:keel:problem:idempotency-outcome-unknown",
            Self::ResponseNotStored => "urn:keel:problem:idempotency-response-not-stored",
            Self::StoreFull => "urn:keel:problem:idempotency-store-full",
            Self::UpgradeRefused => "urn:keel:problem:idempotency-upgrade-refused",
            Self::TenantMissing => "urn:keel:problem:idempotency-tenant-missing",
        }
    }

    /// The HTTP status.
    ///
    /// ```
    /// use keel_idempotency::problem::ProblemKind;
    /// assert_eq!(ProblemKind::FingerprintMismatch.status(), 422);
    /// ```
    pub fn status(self) -> StatusCode {
        match self {
            Self::KeyMissing | Self::KeyInvalid | Self::UpgradeRefused | Self::TenantMissing => {
                StatusCode::BAD_REQUEST
            }
            Self::FingerprintMismatch => StatusCode::UNPROCESSABLE_ENTITY,
            Self::InFlight | Self::OutcomeUnknown | Self::ResponseNotStored => StatusCode::CONFLICT,
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::StoreUnavailable | Self::StoreFull => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The short, fixed `title`.
    ///
    /// ```
    /// use keel_idempotency::problem::ProblemKind;
    /// assert!(!ProblemKind::InFlight.title().is_empty());
    /// ```
    pub fn title(self) -> &'static str {
        match self {
            Self::KeyMissing => "Idempotency-Key header required",
            Self::KeyInvalid => "Invalid Idempotency-Key",
            Self::FingerprintMismatch => "Idempotency-Key reused for a different request",
            Self::InFlight => "A request with this Idempotency-Key is in progress",
            Self::BodyTooLarge => "Request body too large for an idempotent request",
            Self::StoreUnavailable => "Idempotency store unavailable",
            Self::OutcomeUnknown => "Outcome of the earlier request is unknown",
            Self::ResponseNotStored => "Earlier response was not stored",
            Self::StoreFull => "Idempotency store full",
            Self::UpgradeRefused => "Idempotent requests cannot upgrade the connection",
            Self::TenantMissing => "Idempotent request without a caller identity",
        }
    }
}

/// One problem answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Its kind.
    pub kind: ProblemKind,
    /// What happened and what to do next, for humans.
    pub detail: String,
    /// When to retry, for `Retry-After` (rounded up to whole seconds).
    pub retry_after: Option<Duration>,
    /// The `x-request-id` of the earlier request, where one is involved.
    pub original_request_id: Option<String>,
    /// The id of this request (its `x-request-id`), written in the body as
    /// `request_id` so a client can quote it; see [`Problem::request_id`].
    pub request_id: Option<String>,
}

impl Problem {
    /// A problem of `kind` with `detail`.
    ///
    /// ```
    /// use keel_idempotency::problem::{Problem, ProblemKind};
    /// assert_eq!(Problem::new(ProblemKind::KeyMissing, "send one").kind, ProblemKind::KeyMissing);
    /// ```
    pub fn new(kind: ProblemKind, detail: impl Into<String>) -> Self {
        Self {
            kind,
            detail: detail.into(),
            retry_after: None,
            original_request_id: None,
            request_id: None,
        }
    }

    /// Adds `Retry-After`.
    ///
    /// ```
    /// use keel_idempotency::problem::{Problem, ProblemKind};
    /// let p = Problem::new(ProblemKind::InFlight, "").retry_after(std::time::Duration::ZERO);
    /// assert_eq!(p.to_response().headers()["retry-after"], "1");
    /// ```
    pub fn retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// Adds this request's id, written in the body as `request_id`. The
    /// library sets no header for it: echoing `x-request-id` is the
    /// server's business.
    ///
    /// ```
    /// use keel_idempotency::problem::{Problem, ProblemKind};
    /// let r = Problem::new(ProblemKind::KeyMissing, "send one").request_id("req-1").to_response();
    /// let body: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
    /// assert_eq!(body["request_id"], "req-1");
    /// ```
    pub fn request_id(mut self, id: impl Into<String>) -> Self {
        self.request_id = Some(id.into());
        self
    }

    /// The full response: status, `content-type`, `Retry-After` and the
    /// JSON body, with the [`ProblemKind`] as a response extension.
    ///
    /// ```
    /// use keel_idempotency::problem::{Problem, ProblemKind};
    /// let r = Problem::new(ProblemKind::BodyTooLarge, "limit 1 MiB").to_response();
    /// assert_eq!(r.status(), 413);
    /// assert_eq!(r.extensions().get(), Some(&ProblemKind::BodyTooLarge));
    /// ```
    pub fn to_response(&self) -> Response<Bytes> {
        let mut response = keel_problem::Problem {
            type_uri: self.kind.type_uri(),
            title: self.kind.title(),
            status: self.kind.status(),
            detail: &self.detail,
            request_id: self.request_id.as_deref(),
            original_request_id: self.original_request_id.as_deref(),
            retry_after: self.retry_after,
        }
        .to_response();
        // The kind rides along, so a caller (metrics) can tell refusals of
        // one status apart without reading the body.
        response.extensions_mut().insert(self.kind);
        if let Some(id) = self
            .original_request_id
            .as_deref()
            .and_then(|v| HeaderValue::from_str(v).ok())
        {
            response
                .headers_mut()
                .insert(crate::engine::ORIGINAL_REQUEST_ID, id);
        }
        response
    }
}

/// Adds `"request_id": request_id` to the body of a problem answer that is
/// already built, such as [`Begin::Reject`](crate::engine::Begin::Reject)'s,
/// so every problem a server sends can carry the id of the request it
/// answers. Anything else is returned as it is: a response that is not
/// `application/problem+json`, a body that is not a JSON object, or one
/// that already has a `request_id`.
///
/// ```
/// use keel_idempotency::problem::{Problem, ProblemKind, with_request_id};
/// let refused = Problem::new(ProblemKind::InFlight, "wait").to_response();
/// let refused = with_request_id(refused, "req-7");
/// let body: serde_json::Value = serde_json::from_slice(refused.body()).unwrap();
/// assert_eq!(body["request_id"], "req-7");
/// assert_eq!(body["type"], "urn:keel:problem:idempotency-in-flight");
/// ```
pub fn with_request_id(response: Response<Bytes>, request_id: &str) -> Response<Bytes> {
    let is_problem = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(CONTENT_TYPE.as_bytes()));
    if !is_problem {
        return response;
    }
    let Ok(serde_json::Value::Object(mut body)) =
        serde_json::from_slice::<serde_json::Value>(response.body())
    else {
        return response;
    };
    if body.contains_key("request_id") {
        return response;
    }
    body.insert(
        "request_id".to_owned(),
        serde_json::Value::String(request_id.to_owned()),
    );
    let bytes = Bytes::from(serde_json::Value::Object(body).to_string());
    let (mut parts, _) = response.into_parts();
    // A length set by the caller would now be wrong; the body says it.
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(response: &Response<Bytes>) -> serde_json::Value {
        serde_json::from_slice(response.body()).expect("problem+json")
    }

    #[test]
    fn problem_carries_the_request_id_when_given() {
        let plain = Problem::new(ProblemKind::FingerprintMismatch, "new key").to_response();
        assert!(body(&plain).get("request_id").is_none());
        let with = Problem::new(ProblemKind::FingerprintMismatch, "new key")
            .request_id("abc")
            .to_response();
        assert_eq!(with.status(), 422);
        assert_eq!(body(&with)["request_id"], "abc");
        assert_eq!(body(&with)["status"], 422);
    }

    #[test]
    fn request_id_added_to_every_built_problem() {
        for kind in [
            ProblemKind::KeyMissing,
            ProblemKind::KeyInvalid,
            ProblemKind::FingerprintMismatch,
            ProblemKind::InFlight,
            ProblemKind::BodyTooLarge,
            ProblemKind::StoreUnavailable,
            ProblemKind::OutcomeUnknown,
            ProblemKind::ResponseNotStored,
            ProblemKind::StoreFull,
            ProblemKind::UpgradeRefused,
            ProblemKind::TenantMissing,
        ] {
            let mut p = Problem::new(kind, "detail \"quoted\"").retry_after(Duration::from_secs(2));
            p.original_request_id = Some("first".into());
            let before = p.to_response();
            let after = with_request_id(before.clone(), "id-\"1\"");
            assert_eq!(after.status(), before.status());
            assert_eq!(after.headers(), before.headers());
            let (b, a) = (body(&before), body(&after));
            assert_eq!(a["request_id"], "id-\"1\"", "{kind:?}");
            let mut a = a;
            a.as_object_mut().expect("object").remove("request_id");
            assert_eq!(a, b, "{kind:?}: nothing else changes");
        }
    }

    #[test]
    fn request_id_left_alone_where_it_does_not_belong() {
        // Already there: kept.
        let own = Problem::new(ProblemKind::InFlight, "")
            .request_id("mine")
            .to_response();
        assert_eq!(body(&with_request_id(own, "other"))["request_id"], "mine");
        // Not a problem: untouched.
        let replay = Response::new(Bytes::from_static(b"{\"ok\":true}"));
        let same = with_request_id(replay, "x");
        assert_eq!(same.body().as_ref(), b"{\"ok\":true}");
        // A problem body that is not an object: untouched.
        let mut odd = Response::new(Bytes::from_static(b"[1]"));
        odd.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
        assert_eq!(with_request_id(odd, "x").body().as_ref(), b"[1]");
    }
}
