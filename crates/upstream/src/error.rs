//! Why the upstream phase produced no response, typed: whose fault it was,
//! whether the request may have reached the upstream, whether another
//! attempt could do better. The proxy turns it into the client's
//! problem+json answer in one place ([`UpstreamError::into_problem`]).

use std::fmt;
use std::time::Duration;

use keel_http::{BodyFault, Problem, ProblemKind};

/// What went wrong, and on whose side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The TCP connection could not be made.
    Connect,
    /// Connecting took longer than `connect_timeout`.
    ConnectTimeout,
    /// The upstream closed the connection or answered with invalid HTTP.
    BadResponse,
    /// No response head within the upstream's `request_timeout`.
    Timeout,
    /// The upstream has no endpoints.
    NoEndpoints,
    /// No endpoint may take the request now: its breakers are open or no
    /// endpoint passes its health checks. Refused before sending.
    Unavailable,
    /// The client's request body failed; the upstream is not to blame.
    Client(ClientFault),
}

/// How the client's request body failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientFault {
    /// Invalid framing.
    Malformed,
    /// The client closed its connection before the body was complete.
    Closed,
    /// Over the route's body limit.
    TooLarge,
    /// Still arriving when the upstream's `request_timeout` ran out.
    TooSlow,
}

impl From<BodyFault> for ClientFault {
    fn from(fault: BodyFault) -> Self {
        match fault {
            BodyFault::Malformed => ClientFault::Malformed,
            BodyFault::Incomplete => ClientFault::Closed,
            BodyFault::TooLarge => ClientFault::TooLarge,
        }
    }
}

/// Why the upstream did not produce a response.
///
/// ```
/// use keel_upstream::{ErrorKind, UpstreamError};
///
/// let refused = UpstreamError::new(ErrorKind::Connect, "could not connect", false);
/// assert!(refused.is_upstream_side() && refused.retryable());
/// assert_eq!(refused.into_problem().kind.status(), 502);
/// ```
#[derive(Debug, Clone)]
pub struct UpstreamError {
    /// What went wrong.
    pub kind: ErrorKind,
    /// One line for the client and the log.
    pub detail: String,
    /// False when the request certainly never reached the upstream
    /// (connection refused, refused by a breaker), so an idempotency claim
    /// can be released.
    pub sent: bool,
    /// When to try again, for the client's `Retry-After`.
    pub retry_after: Option<Duration>,
}

impl UpstreamError {
    /// An error of `kind`.
    pub fn new(kind: ErrorKind, detail: impl Into<String>, sent: bool) -> Self {
        UpstreamError {
            kind,
            detail: detail.into(),
            sent,
            retry_after: None,
        }
    }

    /// Adds a retry hint.
    #[must_use]
    pub fn with_retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// Whether the upstream failed (it counts against its breakers and in
    /// `keel_upstream_failures_total`).
    pub fn is_upstream_side(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::Connect
                | ErrorKind::ConnectTimeout
                | ErrorKind::BadResponse
                | ErrorKind::Timeout
                | ErrorKind::NoEndpoints
        )
    }

    /// Whether the client's request failed.
    pub fn is_client_side(&self) -> bool {
        matches!(self.kind, ErrorKind::Client(_))
    }

    /// Whether another attempt, on another endpoint, could do better: the
    /// upstream refused or broke the exchange. A timeout (connecting or
    /// waiting for the head) is not retried: it spent the time the request
    /// had.
    pub fn retryable(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::Connect | ErrorKind::BadResponse | ErrorKind::NoEndpoints
        )
    }

    /// The `keel_upstream_failures_total` cause, for an upstream-side error.
    pub fn cause(&self) -> &'static str {
        match self.kind {
            // A connect timeout: the request was never sent.
            ErrorKind::Connect | ErrorKind::NoEndpoints | ErrorKind::ConnectTimeout => "connect",
            ErrorKind::Timeout if !self.sent => "connect",
            ErrorKind::Timeout => "timeout",
            _ => "bad_response",
        }
    }

    /// The problem kind the client is answered with.
    pub fn problem_kind(&self) -> ProblemKind {
        match self.kind {
            ErrorKind::Connect | ErrorKind::NoEndpoints => ProblemKind::UpstreamUnreachable,
            ErrorKind::ConnectTimeout | ErrorKind::Timeout => ProblemKind::UpstreamTimeout,
            ErrorKind::BadResponse => ProblemKind::UpstreamBadResponse,
            ErrorKind::Unavailable => ProblemKind::Unavailable,
            ErrorKind::Client(ClientFault::Malformed) => ProblemKind::BadRequest,
            ErrorKind::Client(ClientFault::Closed) => ProblemKind::ClientClosed,
            ErrorKind::Client(ClientFault::TooLarge) => ProblemKind::BodyTooLarge,
            ErrorKind::Client(ClientFault::TooSlow) => ProblemKind::RequestTimeout,
        }
    }

    /// The client's answer: the one boundary where an upstream error
    /// becomes problem+json.
    pub fn into_problem(self) -> Problem {
        let problem = Problem::new(self.problem_kind(), self.detail);
        match self.retry_after {
            Some(after) => problem.retry_after(after),
            None => problem,
        }
    }
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.detail)
    }
}

impl std::error::Error for UpstreamError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_is_blamed_on_one_side_at_most_and_maps_as_before() {
        let kinds = [
            ErrorKind::Connect,
            ErrorKind::ConnectTimeout,
            ErrorKind::BadResponse,
            ErrorKind::Timeout,
            ErrorKind::NoEndpoints,
            ErrorKind::Unavailable,
            ErrorKind::Client(ClientFault::Malformed),
            ErrorKind::Client(ClientFault::Closed),
            ErrorKind::Client(ClientFault::TooLarge),
            ErrorKind::Client(ClientFault::TooSlow),
        ];
        for kind in kinds {
            let error = UpstreamError::new(kind, "x", true);
            assert!(
                !(error.is_upstream_side() && error.is_client_side()),
                "{kind:?}"
            );
            assert_eq!(
                error.is_upstream_side(),
                error.problem_kind().is_upstream_side(),
                "{kind:?}"
            );
            assert_eq!(
                error.is_client_side(),
                error.problem_kind().is_request_side(),
                "{kind:?}"
            );
            assert!(!error.retryable() || error.is_upstream_side(), "{kind:?}");
        }
        let slow = UpstreamError::new(ErrorKind::Unavailable, "open", false)
            .with_retry_after(Duration::from_millis(1500));
        assert_eq!(
            slow.into_problem().retry_after,
            Some(Duration::from_millis(1500))
        );
    }
}
