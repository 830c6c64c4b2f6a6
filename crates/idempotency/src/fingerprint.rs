//! The request fingerprint: a 128-bit XXH3 digest of what makes two
//! requests "the same".
//!
//! Method, path, query, body and any headers the route names are hashed,
//! each with its length, so that no two different requests can be framed
//! into the same byte stream. With canonical JSON on, a JSON body is parsed
//! and re-written with object keys sorted and insignificant whitespace
//! removed before hashing, so a client that re-serialises its body between
//! retries still matches; a body that is not valid JSON is hashed as is.
//!
//! # Why a non-cryptographic hash
//!
//! The fingerprint is compared only with the one stored under the same
//! store key, and store keys are scoped to the caller (the tenant is part
//! of them): it separates one caller's own requests under one key, to
//! catch a client that reuses a key for a different request by mistake.
//! It is no secret and no authenticator. An accidental collision of two
//! different requests under one key has a chance of 2^-128 with XXH3-128,
//! as with any 128-bit digest. A client that deliberately builds two
//! colliding bodies only gets its own first response back for its own
//! second request; in a key space shared by anonymous callers, anyone who
//! knows a key and its request can already get its response by sending
//! that request, so a collision opens nothing new. The fingerprint of a
//! request with a 1 KiB body costs about 1,100 instructions with XXH3,
//! where BLAKE3 took about 11,000.
//!
//! # Records written before: BLAKE3 fingerprints
//!
//! Earlier versions of Keel stored a 32-byte BLAKE3 fingerprint. A fingerprint
//! now carries its kind in its bytes ([`Fingerprint::kind`]): 16 bytes of
//! XXH3-128 and a fixed 16-byte tag that a BLAKE3 digest ends with only by
//! a 2^-128 chance. A stored fingerprint without the tag is a BLAKE3 one,
//! and [`FingerprintConfig::matches`] recomputes the BLAKE3 fingerprint of
//! the request to compare with it, so a retry that crosses an upgrade is
//! replayed, not refused. Stores keep 32 bytes as before: no schema change.
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

use crate::store::{Fingerprint, FingerprintKind};

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

    /// The fingerprint of one request (XXH3-128, [`FingerprintKind::Xxh3`]).
    ///
    /// ```
    /// # use keel_idempotency::fingerprint::FingerprintConfig;
    /// # use keel_idempotency::store::FingerprintKind;
    /// # use http::{HeaderMap, Method};
    /// let c = FingerprintConfig::default();
    /// let uri: http::Uri = "/a".parse().unwrap();
    /// let h = HeaderMap::new();
    /// assert_ne!(c.digest(&Method::POST, &uri, &h, b"1"), c.digest(&Method::POST, &uri, &h, b"2"));
    /// assert_eq!(c.digest(&Method::POST, &uri, &h, b"1").kind(), FingerprintKind::Xxh3);
    /// ```
    pub fn digest(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Fingerprint {
        let mut h = Xxh3(xxhash_rust::xxh3::Xxh3Default::new());
        self.frame(
            &mut h,
            b"keel-idempotency-fingerprint-v2",
            method,
            uri,
            headers,
            body,
        );
        Fingerprint::from_xxh3(h.0.digest128())
    }

    /// The BLAKE3 fingerprint earlier versions of Keel stored
    /// ([`FingerprintKind::Blake3`]), byte for byte: what
    /// [`FingerprintConfig::matches`] compares a record written then with.
    ///
    /// ```
    /// # use keel_idempotency::fingerprint::FingerprintConfig;
    /// # use keel_idempotency::store::FingerprintKind;
    /// # use http::{HeaderMap, Method};
    /// let c = FingerprintConfig::default();
    /// let uri: http::Uri = "/a".parse().unwrap();
    /// let old = c.digest_blake3(&Method::POST, &uri, &HeaderMap::new(), b"1");
    /// assert_eq!(old.kind(), FingerprintKind::Blake3);
    /// ```
    pub fn digest_blake3(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Fingerprint {
        let mut h = blake3::Hasher::new();
        self.frame(
            &mut h,
            b"keel-idempotency-fingerprint-v1",
            method,
            uri,
            headers,
            body,
        );
        Fingerprint::from_bytes(*h.finalize().as_bytes())
    }

    /// Whether `stored` (a claim's or a record's fingerprint) is the
    /// fingerprint of this request, whose own fingerprint is `current`
    /// ([`FingerprintConfig::digest`]). A stored BLAKE3 fingerprint (a
    /// record written by an earlier version) is compared with this request's BLAKE3
    /// fingerprint, computed only then.
    ///
    /// ```
    /// # use keel_idempotency::fingerprint::FingerprintConfig;
    /// # use http::{HeaderMap, Method};
    /// let c = FingerprintConfig::default();
    /// let uri: http::Uri = "/a".parse().unwrap();
    /// let h = HeaderMap::new();
    /// let now = c.digest(&Method::POST, &uri, &h, b"1");
    /// let old = c.digest_blake3(&Method::POST, &uri, &h, b"1");
    /// assert!(c.matches(old, now, &Method::POST, &uri, &h, b"1"));
    /// assert!(!c.matches(old, c.digest(&Method::POST, &uri, &h, b"2"), &Method::POST, &uri, &h, b"2"));
    /// ```
    pub fn matches(
        &self,
        stored: Fingerprint,
        current: Fingerprint,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: &[u8],
    ) -> bool {
        match stored.kind() {
            FingerprintKind::Xxh3 => stored == current,
            FingerprintKind::Blake3 => stored == self.digest_blake3(method, uri, headers, body),
        }
    }

    /// Feeds the request's fields, each with its length, to `h`, after the
    /// `domain` tag of the fingerprint's version.
    fn frame(
        &self,
        h: &mut impl Sink,
        domain: &[u8],
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: &[u8],
    ) {
        field(h, domain);
        field(h, method.as_str().as_bytes());
        field(h, uri.path().as_bytes());
        // An absent query and an empty one (`/a?`) are different requests
        // to some servers; keep them apart.
        match uri.query() {
            Some(q) => {
                h.put(b"?");
                field(h, q.as_bytes());
            }
            None => {
                h.put(b"-");
            }
        }
        for name in &self.headers {
            field(h, name.as_str().as_bytes());
            let values = headers.get_all(name);
            h.put(&(values.iter().count() as u64).to_be_bytes());
            for v in values {
                field(h, v.as_bytes());
            }
        }
        match self.canonical_json.then(|| canonical_json(body)).flatten() {
            Some(canonical) => h.body(b"J", &canonical),
            None => h.body(b"B", body),
        }
    }
}

/// A hash the fingerprint's fields are fed to: XXH3 now, BLAKE3 for the
/// fingerprints of records written before.
trait Sink {
    fn put(&mut self, bytes: &[u8]);

    /// The body after its `kind` tag: as a field, as BLAKE3 always had it.
    fn body(&mut self, kind: &[u8], body: &[u8]) {
        self.put(kind);
        field(self, body);
    }
}

impl Sink for blake3::Hasher {
    fn put(&mut self, bytes: &[u8]) {
        self.update(bytes);
    }
}

struct Xxh3(xxhash_rust::xxh3::Xxh3Default);

impl Sink for Xxh3 {
    fn put(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// The body's length and its own XXH3-128: hashed in one call, from
    /// where it lies, not copied through the streaming hasher's buffer.
    fn body(&mut self, kind: &[u8], body: &[u8]) {
        self.put(kind);
        self.put(&(body.len() as u64).to_be_bytes());
        self.put(&xxhash_rust::xxh3::xxh3_128(body).to_be_bytes());
    }
}

fn field(h: &mut (impl Sink + ?Sized), bytes: &[u8]) {
    h.put(&(bytes.len() as u64).to_be_bytes());
    h.put(bytes);
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
