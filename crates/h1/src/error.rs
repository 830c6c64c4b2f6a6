//! What can go wrong in an exchange with an upstream.

/// The error type of request bodies, as `http-body` bodies box it.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why an exchange with an upstream failed.
///
/// ```
/// let error = keel_h1::Error::Invalid("malformed response head");
/// assert_eq!(error.to_string(), "invalid response: malformed response head");
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading from or writing to the connection failed.
    #[error("upstream connection: {0}")]
    Io(#[from] std::io::Error),
    /// The upstream closed the connection before its response was complete.
    #[error("the upstream closed the connection before the response was complete")]
    Closed,
    /// The upstream's response is not valid HTTP/1.1 (what is wrong).
    #[error("invalid response: {0}")]
    Invalid(&'static str),
    /// The request body failed (on the client's side, for a proxied body).
    #[error("request body: {0}")]
    Body(#[source] BoxError),
}
