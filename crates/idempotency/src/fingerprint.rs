//! The request fingerprint: a BLAKE3 digest of what makes two requests "the
//! same".
//!
//! Method, path, query, body and any headers the route names are hashed,
//! each with its length, so that no two different requests can be framed
//! into the same byte stream. With canonical JSON on, a JSON body is parsed
//! and re-written with object keys sorted and insignificant whitespace
//! removed before hashing, so a client that re-serialises its body between
//! retries still matches; a body that is not valid JSON is hashed as is.
//!
//! ```
//! use keel_idempotency::fingerprint::FingerprintConfig;
//! use http::{HeaderMap, Method};
//!
//! let config = FingerprintConfig::default().canonical_json(true);
//! let h = HeaderMap::new();
//! let uri: http::Uri = "/orders?x=1".parse().unwrap();
//! let a = config.digest(&Method::POST, &uri, &h, br#"{"b":1, "a":[1,2]}"#);
//! let b = config.digest(&Method::POST, &uri, &h, br#"{"a":[1,2],"b":1}"#);
//! assert_eq!(a, b);
//! let c = config.digest(&Method::POST, &uri, &h, br#"{"a":[2,1],"b":1}"#);
//! assert_ne!(a, c);
//! ```

use http::{HeaderMap, HeaderName, Method, Uri};

use crate::store::Fingerprint;

/// What goes into a request's fingerprint.
#[derive(Clone, Debug, Default)]
pub struct FingerprintConfig {
    headers: Vec<HeaderName>,
    canonical_json: bool,
}

impl FingerprintConfig {
    /// Includes header `name` (all its values, in order) in the digest.
    ///
    /// ```
    /// # use keel_idempotency::fingerprint::FingerprintConfig;
    /// let c = FingerprintConfig::default().include_header(http::header::CONTENT_TYPE);
    /// assert_eq!(c.headers().len(), 1);
    /// ```
    pub fn include_header(mut self, name: HeaderName) -> Self {
        self.headers.push(name);
        self
    }

    /// Hashes JSON bodies in canonical form (sorted keys, no insignificant
    /// whitespace).
    ///
    /// ```
    /// # use keel_idempotency::fingerprint::FingerprintConfig;
    /// assert!(FingerprintConfig::default().canonical_json(true).is_canonical_json());
    /// ```
    pub fn canonical_json(mut self, on: bool) -> Self {
        self.canonical_json = on;
        self
    }

    /// The headers included.
    ///
    /// ```
    /// # use keel_idempotency::fingerprint::FingerprintConfig;
    /// assert!(FingerprintConfig::default().headers().is_empty());
    /// ```
    pub fn headers(&self) -> &[HeaderName] {
        &self.headers
    }

    /// Whether canonical JSON is on.
    ///
    /// ```
    /// # use keel_idempotency::fingerprint::FingerprintConfig;
    /// assert!(!FingerprintConfig::default().is_canonical_json());
    /// ```
    pub fn is_canonical_json(&self) -> bool {
        self.canonical_json
    }

    /// The fingerprint of one request.
    ///
    /// ```
    /// # use keel_idempotency::fingerprint::FingerprintConfig;
    /// # use http::{HeaderMap, Method};
    /// let c = FingerprintConfig::default();
    /// let uri: http::Uri = "/a".parse().unwrap();
    /// let h = HeaderMap::new();
    /// assert_ne!(c.digest(&Method::POST, &uri, &h, b"1"), c.digest(&Method::POST, &uri, &h, b"2"));
    /// ```
    pub fn digest(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Fingerprint {
        let mut h = blake3::Hasher::new();
        field(&mut h, b"keel-idempotency-fingerprint-v1");
        field(&mut h, method.as_str().as_bytes());
        field(&mut h, uri.path().as_bytes());
        // An absent query and an empty one (`/a?`) are different requests
        // to some servers; keep them apart.
        match uri.query() {
            Some(q) => {
                h.update(b"?");
                field(&mut h, q.as_bytes());
            }
            None => {
                h.update(b"-");
            }
        }
        for name in &self.headers {
            field(&mut h, name.as_str().as_bytes());
            let values = headers.get_all(name);
            h.update(&(values.iter().count() as u64).to_be_bytes());
            for v in values {
                field(&mut h, v.as_bytes());
            }
        }
        match self.canonical_json.then(|| canonical_json(body)).flatten() {
            Some(canonical) => {
                h.update(b"J");
                field(&mut h, &canonical);
            }
            None => {
                h.update(b"B");
                field(&mut h, body);
            }
        }
        Fingerprint::from_bytes(*h.finalize().as_bytes())
    }
}

fn field(h: &mut blake3::Hasher, bytes: &[u8]) {
    h.update(&(bytes.len() as u64).to_be_bytes());
    h.update(bytes);
}

/// The canonical form of a JSON document: object keys sorted, no
/// insignificant whitespace, numbers and strings as `serde_json` writes
/// them. `None` when `body` is not JSON.
///
/// ```
/// use keel_idempotency::fingerprint::canonical_json;
/// assert_eq!(canonical_json(br#"{ "b": 2, "a": {"d": 1, "c": 0} }"#).unwrap(), br#"{"a":{"c":0,"d":1},"b":2}"#);
/// assert!(canonical_json(b"not json").is_none());
/// ```
pub fn canonical_json(body: &[u8]) -> Option<Vec<u8>> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let mut out = Vec::with_capacity(body.len());
    write_canonical(&value, &mut out);
    Some(out)
}

/// Sorts keys itself rather than relying on `serde_json`'s map order, which
/// another crate in the build could change by enabling `preserve_order`.
fn write_canonical(value: &serde_json::Value, out: &mut Vec<u8>) {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_scalar(&Value::String(k.clone()), out);
                out.push(b':');
                write_canonical(v, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(v, out);
            }
            out.push(b']');
        }
        scalar => write_scalar(scalar, out),
    }
}

fn write_scalar(value: &serde_json::Value, out: &mut Vec<u8>) {
    // Writing a scalar into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, value);
}
