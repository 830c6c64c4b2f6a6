//! Stale fallback for reads: a bounded per-route cache of GET and HEAD
//! responses that answers **only** when the upstream failed (connect error,
//! timeout, 500/502/503/504) or its breakers are open. It is not a CDN:
//! fresh traffic always goes upstream, and each good answer refreshes the
//! entry.
//!
//! Entries are keyed by method, host, path and query, and by the request's
//! values of the headers the response names in `Vary`. Responses with
//! `Cache-Control: no-store` or `private` (or `Vary: *`, or answers to a
//! request with `Authorization` unless marked `public`) are never kept. An
//! entry is served while its age is within the response's `stale-if-error`
//! (RFC 5861), bounded by the route's `max_age`, or `max_age` alone.
//!
//! The cache is split into shards, each a small mutex-guarded map with its
//! own byte budget and oldest-first eviction, so requests on different keys
//! rarely meet on a lock, and only routes that enable it pay for it.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::BodyExt;
use prometheus_client::metrics::counter::Counter;
use tokio::time::Instant;

use keel_config::StaleSpec;
use keel_http::body::ProxyBody;
use keel_upstream::{ErrorKind, UpstreamError};

/// The header marking a response served from the stale cache.
pub const KEEL_STALE: HeaderName = HeaderName::from_static("keel-stale");

const SHARDS: usize = 16;

/// A route's stale cache.
#[derive(Debug)]
pub struct StaleCache {
    shards: Box<[Mutex<Shard>]>,
    hasher: std::hash::RandomState,
    max_age: Duration,
    shard_bytes: usize,
    max_entry: u64,
    served: Counter,
}

#[derive(Debug, Default)]
struct Shard {
    entries: HashMap<String, Vec<Entry>>,
    /// Insertion order for eviction: (key, sequence number of the entry).
    order: VecDeque<(String, u64)>,
    bytes: usize,
    next_seq: u64,
}

#[derive(Debug)]
struct Entry {
    vary: Vec<(HeaderName, Option<HeaderValue>)>,
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    stored: Instant,
    /// The upstream's own `Age` when it was stored.
    base_age: u64,
    /// Served stale only while younger than this.
    limit: Duration,
    size: usize,
    seq: u64,
}

/// What identifies a request in the cache; made before the request goes
/// upstream.
#[derive(Debug)]
pub struct StaleKey {
    key: String,
    head: bool,
    headers: HeaderMap,
}

impl StaleCache {
    /// An empty cache; `served` counts stale answers.
    pub fn new(config: &StaleSpec, served: Counter) -> Self {
        StaleCache {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            hasher: std::hash::RandomState::new(),
            max_age: config.max_age,
            shard_bytes: usize::try_from(config.max_bytes / SHARDS as u64).unwrap_or(usize::MAX),
            max_entry: config.max_entry_size,
            served,
        }
    }

    /// The key of a cacheable request (GET or HEAD without `no-store`).
    pub fn key<B>(&self, request: &Request<B>, host: &str) -> Option<StaleKey> {
        let head = match *request.method() {
            Method::GET => false,
            Method::HEAD => true,
            _ => return None,
        };
        if has_directive(request.headers(), "no-store") {
            return None;
        }
        let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
        Some(StaleKey {
            key: format!(
                "{} {} {}",
                request.method(),
                host.to_ascii_lowercase(),
                path
            ),
            head,
            headers: request.headers().clone(),
        })
    }

    fn shard(&self, key: &str) -> &Mutex<Shard> {
        &self.shards[(self.hasher.hash_one(key) as usize) % SHARDS]
    }

    /// Passes the upstream's outcome through the cache: a storable good
    /// answer is kept (its body, small by construction, is read first);
    /// a failure is replaced by the stale entry when there is one young
    /// enough.
    pub async fn through(
        &self,
        key: StaleKey,
        outcome: Result<Response<ProxyBody>, UpstreamError>,
    ) -> Result<Response<ProxyBody>, UpstreamError> {
        match outcome {
            Ok(response) if is_error_status(response.status()) => {
                Ok(self.lookup(&key).unwrap_or(response))
            }
            Ok(response) => match self.storable(&key, &response) {
                Some(limit) => {
                    let (parts, body) = response.into_parts();
                    match read_body(body).await {
                        Ok(bytes) => {
                            self.store(&key, &parts, bytes.clone(), limit);
                            Ok(Response::from_parts(parts, ProxyBody::full(bytes)))
                        }
                        Err(failure) => self.lookup(&key).map(Ok).unwrap_or(Err(failure)),
                    }
                }
                None => Ok(response),
            },
            // The client's own failure (a broken or slow body) is its to
            // see: stale content answers only for the upstream.
            Err(failure) if failure.is_client_side() => Err(failure),
            Err(failure) => self.lookup(&key).map(Ok).unwrap_or(Err(failure)),
        }
    }

    /// How long a response may be served stale, if it may be kept at all.
    fn storable(&self, key: &StaleKey, response: &Response<ProxyBody>) -> Option<Duration> {
        if !matches!(
            response.status().as_u16(),
            200 | 203 | 204 | 300 | 301 | 404 | 410
        ) {
            return None;
        }
        let headers = response.headers();
        if has_directive(headers, "no-store") || has_directive(headers, "private") {
            return None;
        }
        if key.headers.contains_key(header::AUTHORIZATION) && !has_directive(headers, "public") {
            return None;
        }
        if vary_names(headers).any(|name| name == "*") {
            return None;
        }
        let len = if key.head {
            0
        } else {
            response.body().size_hint().exact()?
        };
        if len > self.max_entry {
            return None;
        }
        let limit = directive_value(headers, "stale-if-error").map_or(self.max_age, |secs| {
            Duration::from_secs(secs).min(self.max_age)
        });
        (!limit.is_zero()).then_some(limit)
    }

    fn store(&self, key: &StaleKey, parts: &http::response::Parts, body: Bytes, limit: Duration) {
        let vary: Vec<(HeaderName, Option<HeaderValue>)> = vary_names(&parts.headers)
            .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
            .map(|name| {
                let value = key.headers.get(&name).cloned();
                (name, value)
            })
            .collect();
        let size = body.len()
            + key.key.len()
            + parts
                .headers
                .iter()
                .map(|(n, v)| n.as_str().len() + v.len() + 32)
                .sum::<usize>();
        if size > self.shard_bytes {
            return;
        }
        let base_age = parts
            .headers
            .get(header::AGE)
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or(0);
        let mut shard = self
            .shard(&key.key)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let shard = &mut *shard;
        let seq = shard.next_seq;
        shard.next_seq += 1;
        let variants = shard.entries.entry(key.key.clone()).or_default();
        if let Some(old) = variants.iter().position(|e| e.vary == vary) {
            let old = variants.swap_remove(old);
            shard.bytes -= old.size;
        }
        variants.push(Entry {
            vary,
            status: parts.status,
            headers: parts.headers.clone(),
            body,
            stored: Instant::now(),
            base_age,
            limit,
            size,
            seq,
        });
        shard.bytes += size;
        shard.order.push_back((key.key.clone(), seq));
        // Oldest first until the shard is within its budget.
        while shard.bytes > self.shard_bytes {
            let Some((old_key, old_seq)) = shard.order.pop_front() else {
                break;
            };
            if let Some(variants) = shard.entries.get_mut(&old_key) {
                if let Some(i) = variants.iter().position(|e| e.seq == old_seq) {
                    let old = variants.swap_remove(i);
                    shard.bytes -= old.size;
                }
                if variants.is_empty() {
                    shard.entries.remove(&old_key);
                }
            }
        }
        // Entries replaced in place leave stale order records; drop them
        // once they are the majority so the queue stays bounded.
        if shard.order.len() > 2 * shard.entries.values().map(Vec::len).sum::<usize>() + 64 {
            let live: std::collections::HashSet<u64> =
                shard.entries.values().flatten().map(|e| e.seq).collect();
            shard.order.retain(|(_, seq)| live.contains(seq));
        }
    }

    /// The stale answer for `key`, if one is young enough.
    fn lookup(&self, key: &StaleKey) -> Option<Response<ProxyBody>> {
        let shard = self
            .shard(&key.key)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let entry = shard.entries.get(&key.key)?.iter().find(|e| {
            e.vary
                .iter()
                .all(|(name, value)| key.headers.get(name) == value.as_ref())
        })?;
        let age = entry.stored.elapsed();
        if age > entry.limit {
            return None;
        }
        let mut response = Response::new(if key.head {
            ProxyBody::Empty
        } else {
            ProxyBody::full(entry.body.clone())
        });
        *response.status_mut() = entry.status;
        *response.headers_mut() = entry.headers.clone();
        let age_secs = age.as_secs().saturating_add(entry.base_age);
        drop(shard);
        let headers = response.headers_mut();
        headers.insert(header::AGE, HeaderValue::from(age_secs));
        headers.insert(KEEL_STALE, HeaderValue::from_static("true"));
        self.served.inc();
        Some(response)
    }

    /// Bytes held, across shards (for `/status`).
    pub fn bytes(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).bytes)
            .sum()
    }
}

/// RFC 5861 lets a cache serve stale on these.
fn is_error_status(status: StatusCode) -> bool {
    matches!(status.as_u16(), 500 | 502 | 503 | 504)
}

fn cache_control(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

fn has_directive(headers: &HeaderMap, name: &str) -> bool {
    cache_control(headers).any(|d| {
        d.split('=')
            .next()
            .is_some_and(|n| n.trim().eq_ignore_ascii_case(name))
    })
}

fn directive_value(headers: &HeaderMap, name: &str) -> Option<u64> {
    cache_control(headers).find_map(|d| {
        let (n, v) = d.split_once('=')?;
        n.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().trim_matches('"').parse().ok())?
    })
}

fn vary_names(headers: &HeaderMap) -> impl Iterator<Item = String> {
    headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty())
}

async fn read_body(body: ProxyBody) -> Result<Bytes, UpstreamError> {
    match body.collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(_) => Err(UpstreamError::new(
            ErrorKind::BadResponse,
            "the upstream's response body broke off",
            true,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(max_bytes: u64) -> StaleCache {
        StaleCache::new(
            &StaleSpec {
                max_age: Duration::from_secs(300),
                max_bytes,
                max_entry_size: 4096,
            },
            Counter::default(),
        )
    }

    fn key(cache: &StaleCache, path: &str, headers: &[(&str, &str)]) -> StaleKey {
        let mut request = Request::get(path);
        for (n, v) in headers {
            request = request.header(*n, *v);
        }
        cache
            .key(&request.body(()).expect("request"), "Shop.Test")
            .expect("GET is cacheable")
    }

    fn response(headers: &[(&str, &str)], body: impl Into<Bytes>) -> Response<ProxyBody> {
        let mut response = Response::builder();
        for (n, v) in headers {
            response = response.header(*n, *v);
        }
        response.body(ProxyBody::full(body)).expect("response")
    }

    fn failure() -> UpstreamError {
        UpstreamError::new(ErrorKind::Connect, "down", false)
    }

    #[test]
    fn what_may_be_kept_and_for_how_long() {
        let c = cache(1 << 20);
        let k = key(&c, "/a", &[]);
        let limit = |h: &[(&str, &str)]| c.storable(&k, &response(h, "x"));
        assert_eq!(limit(&[]), Some(Duration::from_secs(300)));
        assert_eq!(
            limit(&[("cache-control", "max-age=0, stale-if-error=30")]),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            limit(&[("cache-control", "stale-if-error=99999")]),
            Some(Duration::from_secs(300)),
            "capped by max_age"
        );
        assert_eq!(limit(&[("cache-control", "no-store")]), None);
        assert_eq!(limit(&[("cache-control", "Private")]), None);
        assert_eq!(limit(&[("vary", "*")]), None);
        let authorized = key(&c, "/a", &[("authorization", "Bearer t")]);
        assert_eq!(c.storable(&authorized, &response(&[], "x")), None);
        assert!(
            c.storable(&authorized, &response(&[("cache-control", "public")], "x"))
                .is_some()
        );
        let post = Request::post("/a").body(()).expect("request");
        assert!(c.key(&post, "h").is_none(), "only GET and HEAD");
    }

    #[tokio::test]
    async fn serves_only_on_failure_per_vary_variant_and_marks_it() {
        let c = cache(1 << 20);
        let fr = || key(&c, "/p?q=1", &[("accept-language", "fr")]);
        let fresh = c
            .through(
                fr(),
                Ok(response(&[("vary", "Accept-Language")], "bonjour")),
            )
            .await
            .expect("fresh");
        assert!(fresh.headers().get(KEEL_STALE).is_none());
        // A good answer is never replaced by the cache.
        let again = c
            .through(fr(), Ok(response(&[("vary", "Accept-Language")], "salut")))
            .await
            .expect("fresh");
        assert!(again.headers().get(KEEL_STALE).is_none());
        // A failure is: with the latest good answer, marked.
        let stale = c.through(fr(), Err(failure())).await.expect("stale");
        assert_eq!(stale.headers()[KEEL_STALE], "true");
        assert_eq!(stale.headers()[header::AGE], "0");
        let body = read_body(stale.into_body()).await.expect("body");
        assert_eq!(body, "salut");
        // So is an upstream 503.
        let mut unavailable = response(&[], "");
        *unavailable.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        let stale = c.through(fr(), Ok(unavailable)).await.expect("stale");
        assert_eq!(stale.status(), StatusCode::OK);
        // Another variant, or another query, has nothing to serve.
        let de = key(&c, "/p?q=1", &[("accept-language", "de")]);
        assert!(c.through(de, Err(failure())).await.is_err());
        let other = key(&c, "/p?q=2", &[("accept-language", "fr")]);
        assert!(c.through(other, Err(failure())).await.is_err());
        assert_eq!(c.served.get(), 2);
    }

    #[tokio::test]
    async fn stays_within_its_byte_budget() {
        let budget = 16 * 2048;
        let c = cache(budget);
        for i in 0..500 {
            let k = key(&c, &format!("/item/{i}"), &[]);
            c.through(k, Ok(response(&[], vec![b'x'; 200])))
                .await
                .expect("fresh");
        }
        let held = c.bytes();
        assert!(held <= budget as usize, "{held} bytes held");
        assert!(held > budget as usize / 2, "the budget is used: {held}");
        // The newest entries survive, the oldest were evicted.
        assert!(
            c.through(key(&c, "/item/499", &[]), Err(failure()))
                .await
                .is_ok()
        );
        assert!(
            c.through(key(&c, "/item/0", &[]), Err(failure()))
                .await
                .is_err()
        );
    }
}
