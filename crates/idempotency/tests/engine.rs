//! The engine driven as the gateway drives it, on the memory store (and the
//! embedded store for the shared cases), plus a store that is down.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::{post, problem_type};
use http::{HeaderMap, Request, Response, StatusCode};
use keel_idempotency::codec::Record;
use keel_idempotency::engine::{
    Begin, Completion, Engine, InFlight, KeyLookup, LapsedLease, MissingTenant, NotExecuted,
    PassReason, Policy, RequestHead, ServerErrors, StoreDown, Tenant,
};
use keel_idempotency::fingerprint::FingerprintConfig;
use keel_idempotency::gate::{AlwaysAllow, ConsecutiveFailures};
use keel_idempotency::memory::{MemoryConfig, MemoryStore};
use keel_idempotency::store::{
    BoxFuture, Claim, FencingToken, Fingerprint, KeyState, Lease, Store, StoreError, StoreKey,
};
use proptest::prelude::*;

fn memory() -> Arc<dyn Store> {
    Arc::new(MemoryStore::new())
}

fn engine(policy: Policy) -> Engine {
    Engine::new(memory(), policy)
}

async fn execute(
    engine: &Engine,
    req: &Request<()>,
    body: &[u8],
) -> keel_idempotency::engine::Guard {
    match engine.begin(req, body).await {
        Begin::Execute(g) => g,
        other => panic!("expected Execute, got {other:?}"),
    }
}

async fn rejected(engine: &Engine, req: &Request<()>, body: &[u8]) -> Response<Bytes> {
    match engine.begin(req, body).await {
        Begin::Reject(r) => r,
        other => panic!("expected Reject, got {other:?}"),
    }
}

async fn replayed(engine: &Engine, req: &Request<()>, body: &[u8]) -> Response<Bytes> {
    match engine.begin(req, body).await {
        Begin::Replay(r) => r,
        other => panic!("expected Replay, got {other:?}"),
    }
}

fn respond(status: u16, body: &'static str) -> Response<Bytes> {
    Response::builder()
        .status(status)
        .body(Bytes::from_static(body.as_bytes()))
        .expect("response")
}

// ---- the shared, store-generic cases ----

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_64_concurrent_same_key_runs_once_409() {
    common::exactly_once_64_concurrent(memory(), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_64_concurrent_same_key_runs_once_wait_mode() {
    common::exactly_once_64_concurrent(memory(), true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_cross_instance_200_keys() {
    // One memory store seen through two handles: the shape of two
    // instances sharing a server.
    let store = memory();
    common::cross_instance_200_keys(store.clone(), store).await;
}

#[tokio::test(start_paused = true)]
async fn memory_lease_expiry_fences_stale_holder() {
    common::lease_expiry_fences_stale_holder(memory()).await;
}

#[cfg(feature = "embedded")]
mod embedded {
    use super::*;
    use keel_idempotency::embedded::EmbeddedStore;

    fn store(dir: &tempfile::TempDir) -> Arc<dyn Store> {
        Arc::new(EmbeddedStore::open_dir(dir.path()).expect("open"))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn embedded_64_concurrent_same_key_runs_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        common::exactly_once_64_concurrent(store(&dir), false).await;
        common::exactly_once_64_concurrent(store(&dir), true).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn embedded_cross_instance_200_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = EmbeddedStore::open_dir(dir.path()).expect("open");
        common::cross_instance_200_keys(Arc::new(a.clone()), Arc::new(a)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn embedded_lease_expiry_fences_stale_holder() {
        let dir = tempfile::tempdir().expect("tempdir");
        common::lease_expiry_fences_stale_holder(store(&dir)).await;
    }
}

// ---- key handling ----

#[tokio::test]
async fn key_validation() {
    let e = engine(Policy::default().with_max_key_len(10));
    for (value, why) in [
        ("", "empty"),
        ("\"\"", "empty string"),
        ("12345678901", "too long"),
        ("a b", "space in a bare key"),
        ("\"abc", "unterminated"),
    ] {
        let req = Request::post("/x")
            .header("idempotency-key", value)
            .body(())
            .expect("req");
        let r = rejected(&e, &req, b"").await;
        assert_eq!(r.status(), 400, "{why}");
        assert_eq!(
            problem_type(&r),
            "urn:keel:problem:idempotency-key-invalid",
            "{why}"
        );
        assert_eq!(r.headers()["content-type"], "application/problem+json");
    }
    let non_ascii = http::HeaderValue::from_bytes("caf\u{e9}".as_bytes())
        .expect("obs-text is a valid header value");
    let req = Request::post("/x")
        .header("idempotency-key", non_ascii)
        .body(())
        .expect("req");
    assert_eq!(rejected(&e, &req, b"").await.status(), 400);
    let req = Request::post("/x")
        .header("idempotency-key", "a")
        .header("idempotency-key", "b")
        .body(())
        .expect("req");
    assert_eq!(rejected(&e, &req, b"").await.status(), 400);
    // Quoted and bare forms name the same key.
    let quoted = Request::post("/x")
        .header("authorization", "Bearer t")
        .header("idempotency-key", "\"k-1\"")
        .body(())
        .expect("req");
    let bare = Request::post("/x")
        .header("authorization", "Bearer t")
        .header("idempotency-key", "k-1")
        .body(())
        .expect("req");
    execute(&e, &quoted, b"")
        .await
        .complete(&respond(200, "one"))
        .await
        .expect("stored");
    assert_eq!(replayed(&e, &bare, b"").await.body(), "one");
}

#[tokio::test]
async fn methods_required_and_optional() {
    let optional = engine(Policy::default());
    let no_key = Request::post("/x").body(()).expect("req");
    assert!(matches!(
        optional.begin(&no_key, b"").await,
        Begin::PassThrough(PassReason::NoKey)
    ));
    for method in ["GET", "HEAD", "OPTIONS", "DELETE", "PUT"] {
        let req = Request::builder()
            .method(method)
            .uri("/x")
            .header("idempotency-key", "k")
            .body(())
            .expect("req");
        assert!(
            matches!(
                optional.begin(&req, b"").await,
                Begin::PassThrough(PassReason::MethodNotCovered)
            ),
            "{method} passes through by default"
        );
    }
    let patch = Request::patch("/x")
        .header("authorization", "Bearer t")
        .header("idempotency-key", "k")
        .body(())
        .expect("req");
    drop(execute(&optional, &patch, b"").await);

    let required = engine(
        Policy::default()
            .with_required(true)
            .with_methods([http::Method::PUT]),
    );
    let put = Request::put("/x").body(()).expect("req");
    let r = rejected(&required, &put, b"").await;
    assert_eq!(r.status(), 400);
    assert_eq!(problem_type(&r), "urn:keel:problem:idempotency-key-missing");
    let post = Request::post("/x").body(()).expect("req");
    assert!(matches!(
        required.begin(&post, b"").await,
        Begin::PassThrough(PassReason::MethodNotCovered)
    ));
}

// ---- fingerprint ----

#[tokio::test]
async fn same_key_different_request_is_422() {
    let e = engine(Policy::default());
    execute(&e, &post("fp"), b"{\"a\":1}")
        .await
        .complete(&respond(201, "ok"))
        .await
        .expect("stored");
    let r = rejected(&e, &post("fp"), b"{\"a\":2}").await;
    assert_eq!(r.status(), 422);
    assert_eq!(problem_type(&r), "urn:keel:problem:idempotency-key-reused");
    // The query is part of the fingerprint too.
    let with_query = Request::post("/orders?dry_run=1")
        .header("authorization", "Bearer tenant-a")
        .header("idempotency-key", "fp")
        .body(())
        .expect("req");
    assert_eq!(rejected(&e, &with_query, b"{\"a\":1}").await.status(), 422);
    // So is an in-flight claim's fingerprint.
    let _held = execute(&e, &post("fp2"), b"one").await;
    assert_eq!(rejected(&e, &post("fp2"), b"two").await.status(), 422);
    // A different path is a different operation, not a reuse.
    let other_path = Request::post("/refunds")
        .header("authorization", "Bearer tenant-a")
        .header("idempotency-key", "fp")
        .body(())
        .expect("req");
    drop(execute(&e, &other_path, b"{\"a\":2}").await);
}

#[tokio::test]
async fn selected_headers_join_the_fingerprint() {
    let e =
        engine(Policy::default().with_fingerprint(
            FingerprintConfig::default().include_header(http::header::CONTENT_TYPE),
        ));
    let req = |ct: &str| {
        Request::post("/x")
            .header("authorization", "Bearer t")
            .header("idempotency-key", "h")
            .header("content-type", ct)
            .body(())
            .expect("req")
    };
    execute(&e, &req("application/json"), b"{}")
        .await
        .complete(&respond(200, "ok"))
        .await
        .expect("stored");
    assert_eq!(
        replayed(&e, &req("application/json"), b"{}").await.body(),
        "ok"
    );
    assert_eq!(rejected(&e, &req("text/plain"), b"{}").await.status(), 422);
}

#[tokio::test]
async fn canonical_json_matches_reserialised_bodies() {
    let first = br#"{"amount": 100, "currency": "EUR", "meta": {"b": 2, "a": 1}}"#;
    let reordered = br#"{"meta":{"a":1,"b":2},"currency":"EUR","amount":100}"#;
    let canonical = engine(
        Policy::default().with_fingerprint(FingerprintConfig::default().canonical_json(true)),
    );
    execute(&canonical, &post("j"), first)
        .await
        .complete(&respond(201, "paid"))
        .await
        .expect("stored");
    assert_eq!(
        replayed(&canonical, &post("j"), reordered).await.body(),
        "paid"
    );
    let changed = br#"{"meta":{"a":1,"b":2},"currency":"EUR","amount":101}"#;
    assert_eq!(
        rejected(&canonical, &post("j"), changed).await.status(),
        422
    );
    // Without canonical JSON the byte-level difference is a mismatch.
    let raw = engine(Policy::default());
    execute(&raw, &post("j"), first)
        .await
        .complete(&respond(201, "paid"))
        .await
        .expect("stored");
    assert_eq!(rejected(&raw, &post("j"), reordered).await.status(), 422);
}

/// A store as an earlier version of Keel wrote to it: every claim carries
/// the request's BLAKE3 fingerprint (`old`) in place of the engine's.
struct WrittenBefore {
    inner: Arc<dyn Store>,
    old: Fingerprint,
}

impl Store for WrittenBefore {
    fn claim<'a>(
        &'a self,
        key: &'a StoreKey,
        _: Fingerprint,
        lease: Lease,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        self.inner.claim(key, self.old, lease)
    }
    fn renew<'a>(
        &'a self,
        key: &'a StoreKey,
        token: FencingToken,
        lease: Lease,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.inner.renew(key, token, lease)
    }
    fn inspect<'a>(
        &'a self,
        key: &'a StoreKey,
    ) -> BoxFuture<'a, Result<Option<KeyState>, StoreError>> {
        self.inner.inspect(key)
    }
    fn remove<'a>(&'a self, key: &'a StoreKey) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.inner.remove(key)
    }
    fn complete<'a>(
        &'a self,
        key: &'a StoreKey,
        token: FencingToken,
        payload: &'a [u8],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.inner.complete(key, token, payload, ttl)
    }
    fn release<'a>(
        &'a self,
        key: &'a StoreKey,
        token: FencingToken,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.inner.release(key, token)
    }
    fn name(&self) -> &'static str {
        "written-before"
    }
}

/// Records written with the BLAKE3 fingerprints of earlier versions, read
/// back by this one over the same (durable) store: the same request is
/// replayed (or sees its claim in flight), a different one is still a
/// mismatch.
async fn blake3_records_still_compare(store: Arc<dyn Store>) {
    let body = br#"{"sku":"A1","qty":2}"#;
    let req = post("upgrade");
    let config = FingerprintConfig::default();
    let (head, ()) = req.clone().into_parts();
    let old = config.digest_blake3(&head.method, &head.uri, &head.headers, body);
    assert_eq!(old.kind(), keel_idempotency::FingerprintKind::Blake3);
    let new = config.digest(&head.method, &head.uri, &head.headers, body);
    assert_eq!(new.kind(), keel_idempotency::FingerprintKind::Xxh3);
    assert_ne!(old, new);

    let policy = Policy::default().with_namespace("upgrade".into());
    let before = Engine::new(
        Arc::new(WrittenBefore {
            inner: store.clone(),
            old,
        }),
        policy.clone(),
    );
    execute(&before, &req, body)
        .await
        .complete(&respond(201, "created before the upgrade"))
        .await
        .expect("stored");
    let held = execute(&before, &post("upgrade-held"), body).await;

    let after = Engine::new(store, policy);
    let replay = replayed(&after, &req, body).await;
    assert_eq!(replay.status(), 201);
    assert_eq!(replay.body(), "created before the upgrade");
    let other = rejected(&after, &req, br#"{"sku":"A1","qty":3}"#).await;
    assert_eq!(other.status(), 422);
    assert_eq!(
        problem_type(&other),
        "urn:keel:problem:idempotency-key-reused"
    );
    // A claim an earlier version holds: the same request waits its turn
    // (409), a different one is a mismatch (422).
    let in_flight = rejected(&after, &post("upgrade-held"), body).await;
    assert_eq!(in_flight.status(), 409);
    assert_eq!(
        rejected(&after, &post("upgrade-held"), b"other")
            .await
            .status(),
        422
    );
    drop(held);
}

#[tokio::test]
async fn blake3_fingerprints_of_earlier_versions_still_match_memory() {
    blake3_records_still_compare(memory()).await;
}

#[cfg(feature = "embedded")]
#[tokio::test]
async fn blake3_fingerprints_of_earlier_versions_still_match_embedded_after_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = keel_idempotency::embedded::EmbeddedStore::open_dir(dir.path()).expect("open");
    let body = b"paid";
    let req = post("reopen");
    let (head, ()) = req.clone().into_parts();
    let old =
        FingerprintConfig::default().digest_blake3(&head.method, &head.uri, &head.headers, body);
    let before = Engine::new(
        Arc::new(WrittenBefore {
            inner: Arc::new(store),
            old,
        }),
        Policy::default(),
    );
    execute(&before, &req, body)
        .await
        .complete(&respond(200, "ok"))
        .await
        .expect("stored");
    drop(before);
    // The upgraded process opens the same log.
    let reopened = keel_idempotency::embedded::EmbeddedStore::open_dir(dir.path()).expect("reopen");
    let after = Engine::new(Arc::new(reopened), Policy::default());
    assert_eq!(replayed(&after, &req, body).await.body(), "ok");
    assert_eq!(rejected(&after, &req, b"paid twice").await.status(), 422);
}

// ---- tenants ----

fn tenant_request(auth: &str, key: &str) -> Request<()> {
    Request::post("/orders")
        .header("authorization", auth)
        .header("idempotency-key", key)
        .body(())
        .expect("req")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Two tenants using the same key never see each other's records: the
    /// second tenant executes its own operation, and each replays its own.
    #[test]
    fn tenants_are_isolated(
        a in "Bearer [a-zA-Z0-9]{1,24}",
        b in "Bearer [a-zA-Z0-9]{1,24}",
        key in "[!-~&&[^\"]]{1,64}",
    ) {
        prop_assume!(a != b);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async {
            let e = engine(Policy::default());
            let body_a: &'static str = "for-a";
            execute(&e, &tenant_request(&a, &key), b"same body").await
                .complete(&respond(201, body_a)).await.expect("stored");
            let guard_b = match e.begin(&tenant_request(&b, &key), b"same body").await {
                Begin::Execute(g) => g,
                other => panic!("tenant b must not see tenant a's record: {other:?}"),
            };
            guard_b.complete(&respond(201, "for-b")).await.expect("stored");
            assert_eq!(replayed(&e, &tenant_request(&a, &key), b"same body").await.body(), "for-a");
            assert_eq!(replayed(&e, &tenant_request(&b, &key), b"same body").await.body(), "for-b");
        });
    }
}

#[tokio::test]
async fn tenant_from_a_function_or_header() {
    let by_account = Policy::default().with_tenant(Tenant::Function(Arc::new(|head| {
        head.headers
            .get("x-account")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    })));
    let e = engine(by_account);
    let req = |acct: &str, auth: &str| {
        Request::post("/x")
            .header("x-account", acct)
            .header("authorization", auth)
            .header("idempotency-key", "k")
            .body(())
            .expect("req")
    };
    execute(&e, &req("acct-1", "token-1"), b"")
        .await
        .complete(&respond(200, "one"))
        .await
        .expect("stored");
    // Same account, rotated token: same tenant.
    assert_eq!(
        replayed(&e, &req("acct-1", "token-2"), b"").await.body(),
        "one"
    );
    drop(execute(&e, &req("acct-2", "token-1"), b"").await);

    let by_header = engine(
        Policy::default().with_tenant(Tenant::Header(http::HeaderName::from_static("x-api-key"))),
    );
    let req = |key: &str| {
        Request::post("/x")
            .header("x-api-key", key)
            .header("idempotency-key", "k")
            .body(())
            .expect("req")
    };
    execute(&by_header, &req("a"), b"")
        .await
        .complete(&respond(200, "a"))
        .await
        .expect("stored");
    drop(execute(&by_header, &req("b"), b"").await);
}

#[tokio::test]
async fn a_keyed_request_without_a_tenant_is_refused_unless_anonymous_is_chosen() {
    let anonymous = |key: &str| {
        Request::post("/orders")
            .header("cookie", format!("session={key}"))
            .header("idempotency-key", "same")
            .body(())
            .expect("req")
    };
    // Default: the tenant is Authorization; without it, a clear 400 and
    // nothing claimed (two cookie-authenticated callers never share).
    let e = engine(Policy::default());
    let r = rejected(&e, &anonymous("alice"), b"{}").await;
    assert_eq!(r.status(), 400);
    assert_eq!(
        problem_type(&r),
        "urn:keel:problem:idempotency-tenant-missing"
    );
    let r = rejected(&e, &anonymous("bob"), b"{}").await;
    assert_eq!(r.status(), 400);
    // An empty Authorization names nobody either.
    let empty = Request::post("/orders")
        .header("authorization", " ")
        .header("idempotency-key", "same")
        .body(())
        .expect("req");
    assert_eq!(
        problem_type(&rejected(&e, &empty, b"{}").await),
        "urn:keel:problem:idempotency-tenant-missing"
    );
    // Without a key nothing is shared, so the request passes as before.
    let no_key = Request::post("/orders").body(()).expect("req");
    assert!(matches!(
        e.begin(&no_key, b"").await,
        Begin::PassThrough(PassReason::NoKey)
    ));

    // A function that finds no user refuses the same way.
    let by_user = engine(Policy::default().with_tenant(Tenant::function(
        |head: &RequestHead<'_>| head.extensions.get::<String>().cloned(),
    )));
    let r = rejected(&by_user, &anonymous("alice"), b"{}").await;
    assert_eq!(
        problem_type(&r),
        "urn:keel:problem:idempotency-tenant-missing"
    );

    // Opted in: one shared anonymous tenant, as documented.
    let shared = engine(Policy::default().with_missing_tenant(MissingTenant::Anonymous));
    execute(&shared, &anonymous("alice"), b"{}")
        .await
        .complete(&respond(201, "alice's"))
        .await
        .expect("stored");
    assert_eq!(
        replayed(&shared, &anonymous("bob"), b"{}").await.body(),
        "alice's"
    );

    // A single-principal service has no tenant to miss.
    let single = engine(Policy::default().with_tenant(Tenant::Single));
    drop(execute(&single, &anonymous("alice"), b"{}").await);
}

#[tokio::test]
async fn the_tenant_function_reads_what_middleware_put_in_the_extensions() {
    #[derive(Clone)]
    struct User(&'static str);
    let e = engine(
        Policy::default().with_tenant(Tenant::function(|head: &RequestHead<'_>| {
            head.extensions.get::<User>().map(|u| u.0.to_owned())
        })),
    );
    let as_user = |user: &'static str| {
        Request::post("/orders")
            .extension(User(user))
            .header("idempotency-key", "k")
            .body(())
            .expect("req")
    };
    execute(&e, &as_user("alice"), b"{}")
        .await
        .complete(&respond(201, "for alice"))
        .await
        .expect("stored");
    // Bob, same key and body: his own execution, not alice's replay.
    execute(&e, &as_user("bob"), b"{}")
        .await
        .complete(&respond(201, "for bob"))
        .await
        .expect("stored");
    assert_eq!(
        replayed(&e, &as_user("alice"), b"{}").await.body(),
        "for alice"
    );
    assert_eq!(replayed(&e, &as_user("bob"), b"{}").await.body(), "for bob");
    // The head built from request parts carries the extensions too.
    let (parts, ()) = as_user("alice").into_parts();
    assert!(matches!(e.begin(&parts, b"{}").await, Begin::Replay(_)));
}

// ---- limits ----

#[tokio::test]
async fn body_over_limit_is_413() {
    let e = engine(Policy::default().with_max_body(8));
    let r = rejected(&e, &post("big"), b"123456789").await;
    assert_eq!(r.status(), 413);
    assert_eq!(
        problem_type(&r),
        "urn:keel:problem:idempotency-body-too-large"
    );
    drop(execute(&e, &post("big"), b"12345678").await);
}

#[tokio::test]
async fn response_too_large_keeps_a_record_not_a_rerun() {
    let e = engine(Policy::default().with_max_response(4));
    let guard = execute(&e, &post("huge"), b"").await;
    assert_eq!(
        guard
            .complete(&respond(200, "12345"))
            .await
            .expect("recorded"),
        Completion::TooLarge
    );
    let r = rejected(&e, &post("huge"), b"").await;
    assert_eq!(r.status(), 409);
    assert_eq!(
        problem_type(&r),
        "urn:keel:problem:idempotency-response-not-stored"
    );
    assert_eq!(r.headers()["original-request-id"], "req-huge");
    assert!(!r.headers().contains_key("retry-after"));
    // Exactly at the limit is stored.
    let guard = execute(&e, &post("fits"), b"").await;
    assert_eq!(
        guard.complete(&respond(200, "1234")).await.expect("stored"),
        Completion::Stored
    );
}

// ---- replays ----

#[tokio::test]
async fn replay_headers_and_set_cookie() {
    let e =
        engine(Policy::default().with_replay_header(http::HeaderName::from_static("x-order-id")));
    let response = Response::builder()
        .status(201)
        .header("content-type", "application/json")
        .header("location", "/orders/7")
        .header("x-order-id", "7")
        .header("set-cookie", "session=secret")
        .header("x-internal", "not on the list")
        .body(Bytes::from_static(b"{\"id\":7}"))
        .expect("response");
    execute(&e, &post("h"), b"")
        .await
        .complete(&response)
        .await
        .expect("stored");
    let r = replayed(&e, &post("h"), b"").await;
    assert_eq!(r.status(), 201);
    assert_eq!(r.body(), "{\"id\":7}");
    assert_eq!(r.headers()["content-type"], "application/json");
    assert_eq!(r.headers()["location"], "/orders/7");
    assert_eq!(r.headers()["x-order-id"], "7");
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    assert_eq!(r.headers()["original-request-id"], "req-h");
    assert!(
        !r.headers().contains_key("set-cookie"),
        "Set-Cookie must not be replayed by default"
    );
    assert!(!r.headers().contains_key("x-internal"));

    let cookies = engine(Policy::default().with_replay_header(http::header::SET_COOKIE));
    let response = Response::builder()
        .header("set-cookie", "a=1")
        .header("set-cookie", "b=2")
        .body(Bytes::new())
        .expect("response");
    execute(&cookies, &post("c"), b"")
        .await
        .complete(&response)
        .await
        .expect("stored");
    let r = replayed(&cookies, &post("c"), b"").await;
    let got: Vec<_> = r.headers().get_all("set-cookie").iter().collect();
    assert_eq!(
        got,
        ["a=1", "b=2"],
        "explicitly allowed cookies replay, all of them, in order"
    );
}

// ---- outcome policy ----

#[tokio::test]
async fn not_processed_statuses_release_the_key() {
    let e = engine(Policy::default());
    for status in [408, 409, 425, 429] {
        let key = format!("s{status}");
        let guard = execute(&e, &post(&key), b"").await;
        assert_eq!(
            guard
                .complete(&respond(status, "later"))
                .await
                .expect("released"),
            Completion::Released
        );
        drop(execute(&e, &post(&key), b"").await);
    }
}

#[tokio::test]
async fn server_errors_are_final_unless_the_route_releases_them() {
    let e = engine(Policy::default());
    execute(&e, &post("500"), b"")
        .await
        .complete(&respond(500, "boom"))
        .await
        .expect("stored");
    let r = replayed(&e, &post("500"), b"").await;
    assert_eq!(r.status(), 500);
    assert_eq!(r.body(), "boom");

    let e = engine(Policy::default().with_server_errors(ServerErrors::Release));
    let done = execute(&e, &post("503"), b"")
        .await
        .complete(&respond(503, "down"))
        .await;
    assert_eq!(done.expect("released"), Completion::Released);
    drop(execute(&e, &post("503"), b"").await);
    // 4xx other than the "not processed" ones are stored even so.
    execute(&e, &post("400"), b"")
        .await
        .complete(&respond(400, "bad"))
        .await
        .expect("stored");
    assert_eq!(replayed(&e, &post("400"), b"").await.status(), 400);
}

#[tokio::test]
async fn a_response_marked_not_executed_releases_the_key_whatever_its_status() {
    let e = engine(Policy::default());
    let mut refused = respond(502, "upstream refused");
    refused.extensions_mut().insert(NotExecuted);
    let mut guard = execute(&e, &post("ne"), b"").await;
    // The handler was invoked: only its own word releases the key.
    guard.mark_started();
    assert_eq!(
        guard.complete(&refused).await.expect("released"),
        Completion::Released
    );
    execute(&e, &post("ne"), b"")
        .await
        .complete(&respond(201, "charged"))
        .await
        .expect("stored");
    assert_eq!(replayed(&e, &post("ne"), b"").await.body(), "charged");
    // The same 502 without the mark is stored: it may have run.
    execute(&e, &post("ne2"), b"")
        .await
        .complete(&respond(502, "upstream refused"))
        .await
        .expect("stored");
    assert_eq!(replayed(&e, &post("ne2"), b"").await.status(), 502);
}

#[tokio::test]
async fn a_route_may_name_statuses_that_release() {
    let e = engine(Policy::default().with_release_statuses([StatusCode::SERVICE_UNAVAILABLE]));
    let done = execute(&e, &post("r503"), b"")
        .await
        .complete(&respond(503, "breaker open"))
        .await;
    assert_eq!(done.expect("released"), Completion::Released);
    drop(execute(&e, &post("r503"), b"").await);
    // Other 5xx are still stored on this route.
    execute(&e, &post("r500"), b"")
        .await
        .complete(&respond(500, "boom"))
        .await
        .expect("stored");
    assert_eq!(replayed(&e, &post("r500"), b"").await.status(), 500);
    // The unbuffered path follows the same list.
    let guard = execute(&e, &post("u503"), b"").await;
    assert_eq!(
        guard
            .complete_unbuffered(StatusCode::SERVICE_UNAVAILABLE, 10)
            .await
            .expect("released"),
        Completion::Released
    );
    // And another route's engine, without the list, stores its 503.
    let other = engine(Policy::default());
    execute(&other, &post("r503"), b"")
        .await
        .complete(&respond(503, "down"))
        .await
        .expect("stored");
    assert_eq!(replayed(&other, &post("r503"), b"").await.status(), 503);
}

#[tokio::test]
async fn outcome_unknown_and_never_ran() {
    let e = engine(Policy::default());
    let mut guard = execute(&e, &post("lost"), b"").await;
    guard.mark_started();
    guard.outcome_unknown().await.expect("recorded");
    let r = rejected(&e, &post("lost"), b"").await;
    assert_eq!(r.status(), 409);
    assert_eq!(
        problem_type(&r),
        "urn:keel:problem:idempotency-outcome-unknown"
    );
    assert_eq!(r.headers()["original-request-id"], "req-lost");

    // Connection refused before anything was sent: release, retry runs.
    execute(&e, &post("refused"), b"")
        .await
        .release()
        .await
        .expect("released");
    drop(execute(&e, &post("refused"), b"").await);
}

#[tokio::test]
async fn dropped_guard_releases_if_not_started_else_locks_unknown() {
    let e = engine(Policy::default());
    drop(execute(&e, &post("d1"), b"").await);
    // The drop finishes on a spawned task; let it run.
    tokio::task::yield_now().await;
    let guard = execute(&e, &post("d1"), b"").await;

    let mut started = execute(&e, &post("d2"), b"").await;
    started.mark_started();
    drop(started);
    tokio::task::yield_now().await;
    let r = rejected(&e, &post("d2"), b"").await;
    assert_eq!(
        problem_type(&r),
        "urn:keel:problem:idempotency-outcome-unknown"
    );

    // A cancelled handler future is the same as a drop.
    let e2 = e.clone();
    let task = tokio::spawn(async move {
        let mut g = execute(&e2, &post("d3"), b"").await;
        g.mark_started();
        std::future::pending::<()>().await;
        drop(g);
    });
    tokio::task::yield_now().await;
    task.abort();
    let _ = task.await;
    tokio::task::yield_now().await;
    let r = rejected(&e, &post("d3"), b"").await;
    assert_eq!(
        problem_type(&r),
        "urn:keel:problem:idempotency-outcome-unknown"
    );
    guard.release().await.expect("released");
}

#[tokio::test(start_paused = true)]
async fn wait_mode_gives_up_after_its_bound() {
    let e = engine(Policy::default().with_in_flight(InFlight::Wait(Duration::from_secs(2))));
    let _held = execute(&e, &post("w"), b"").await;
    let started = tokio::time::Instant::now();
    let r = rejected(&e, &post("w"), b"").await;
    assert_eq!(r.status(), 409);
    assert!(r.headers().contains_key("retry-after"));
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "waited its bound first"
    );
}

#[tokio::test(start_paused = true)]
async fn wait_mode_replays_when_the_first_finishes() {
    let e = engine(Policy::default().with_in_flight(InFlight::Wait(Duration::from_secs(10))));
    let guard = execute(&e, &post("w2"), b"").await;
    let e2 = e.clone();
    let waiter = tokio::spawn(async move { e2.begin(&post("w2"), b"").await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    guard.complete(&respond(201, "done")).await.expect("stored");
    match waiter.await.expect("task") {
        Begin::Replay(r) => assert_eq!(r.body(), "done"),
        other => panic!("expected the replay, got {other:?}"),
    }
}

// ---- store down ----

/// A store that is down: every call fails as unavailable, and calls are
/// counted.
#[derive(Default)]
struct DownStore {
    calls: AtomicUsize,
}

impl Store for DownStore {
    fn claim<'a>(
        &'a self,
        _: &'a StoreKey,
        _: Fingerprint,
        _: Lease,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Err(StoreError::Unavailable("connection refused".into())) })
    }
    fn complete<'a>(
        &'a self,
        _: &'a StoreKey,
        _: FencingToken,
        _: &'a [u8],
        _: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Err(StoreError::Unavailable("connection refused".into())) })
    }
    fn release<'a>(
        &'a self,
        _: &'a StoreKey,
        _: FencingToken,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Err(StoreError::Unavailable("connection refused".into())) })
    }
    fn renew<'a>(
        &'a self,
        _: &'a StoreKey,
        _: FencingToken,
        _: Lease,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Err(StoreError::Unavailable("connection refused".into())) })
    }
    fn inspect<'a>(
        &'a self,
        _: &'a StoreKey,
    ) -> BoxFuture<'a, Result<Option<KeyState>, StoreError>> {
        Box::pin(async { Err(StoreError::Unavailable("connection refused".into())) })
    }
    fn remove<'a>(&'a self, _: &'a StoreKey) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async { Err(StoreError::Unavailable("connection refused".into())) })
    }
    fn name(&self) -> &'static str {
        "down"
    }
}

#[tokio::test(start_paused = true)]
async fn store_down_fails_closed_by_default_with_a_gate() {
    let store = Arc::new(DownStore::default());
    let gate = Arc::new(ConsecutiveFailures::new(3, Duration::from_secs(5)));
    let e = Engine::with_gate(store.clone(), gate, Policy::default());
    for _ in 0..10 {
        let r = rejected(&e, &post("k"), b"").await;
        assert_eq!(r.status(), 503);
        assert_eq!(
            problem_type(&r),
            "urn:keel:problem:idempotency-store-unavailable"
        );
        assert_eq!(r.headers()["retry-after"], "2");
    }
    assert_eq!(
        store.calls.load(Ordering::SeqCst),
        3,
        "the gate stops calling a dead store"
    );
    tokio::time::advance(Duration::from_secs(5)).await;
    assert_eq!(rejected(&e, &post("k"), b"").await.status(), 503);
    assert_eq!(
        store.calls.load(Ordering::SeqCst),
        4,
        "one probe after the cool-down"
    );
}

#[tokio::test(start_paused = true)]
async fn a_keel_breaker_gate_stops_calling_a_dead_store_and_probes_after_its_open_time() {
    use keel_breaker::{Breaker, Config};
    use keel_idempotency::gate::BreakerGate;

    let store = Arc::new(DownStore::default());
    // Blow on the 3rd failure within 10 s; open for 5 s.
    let breaker = Breaker::new(
        "idempotency-store",
        Config::fuse(2, Duration::from_secs(10), Duration::from_secs(5)),
    )
    .expect("config");
    let gate = Arc::new(BreakerGate::new(breaker.clone()));
    let e = Engine::with_gate(store.clone(), gate, Policy::default());
    for _ in 0..10 {
        assert_eq!(rejected(&e, &post("k"), b"").await.status(), 503);
    }
    assert_eq!(
        store.calls.load(Ordering::SeqCst),
        3,
        "calls stop once the breaker opens"
    );
    assert_eq!(breaker.state(), keel_breaker::State::Open);
    tokio::time::advance(Duration::from_secs(5)).await;
    assert_eq!(rejected(&e, &post("k"), b"").await.status(), 503);
    assert!(
        store.calls.load(Ordering::SeqCst) > 3,
        "the store is tried again after the open time"
    );
}

#[tokio::test]
async fn store_down_fails_open_per_route() {
    let store = Arc::new(DownStore::default());
    let e = Engine::with_gate(
        store,
        Arc::new(AlwaysAllow),
        Policy::default().with_store_down(StoreDown::FailOpen),
    );
    assert!(matches!(
        e.begin(&post("k"), b"").await,
        Begin::PassThrough(PassReason::StoreUnavailable)
    ));
    // Validation still applies when failing open.
    let bad = Request::post("/x")
        .header("idempotency-key", "")
        .body(())
        .expect("req");
    assert_eq!(rejected(&e, &bad, b"").await.status(), 400);
}

/// A store whose records are unreadable: a payload that is not a record,
/// or a store-level `Corrupt` error.
struct GarbageStore {
    store_error: bool,
}

impl Store for GarbageStore {
    fn claim<'a>(
        &'a self,
        _: &'a StoreKey,
        fp: Fingerprint,
        _: Lease,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        let r = if self.store_error {
            Err(StoreError::Corrupt("bad row".into()))
        } else {
            Ok(Claim::Completed {
                fingerprint: fp,
                payload: b"not a record".to_vec(),
            })
        };
        Box::pin(async move { r })
    }
    fn complete<'a>(
        &'a self,
        _: &'a StoreKey,
        _: FencingToken,
        _: &'a [u8],
        _: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async { Err(StoreError::Fenced) })
    }
    fn release<'a>(
        &'a self,
        _: &'a StoreKey,
        _: FencingToken,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async { Err(StoreError::Fenced) })
    }
    fn renew<'a>(
        &'a self,
        _: &'a StoreKey,
        _: FencingToken,
        _: Lease,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async { Err(StoreError::Fenced) })
    }
    fn inspect<'a>(
        &'a self,
        _: &'a StoreKey,
    ) -> BoxFuture<'a, Result<Option<KeyState>, StoreError>> {
        Box::pin(async { Err(StoreError::Corrupt("bad row".into())) })
    }
    fn remove<'a>(&'a self, _: &'a StoreKey) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async { Ok(false) })
    }
    fn name(&self) -> &'static str {
        "garbage"
    }
}

#[tokio::test]
async fn unreadable_record_is_refused_not_rerun_even_failing_open() {
    assert!(Record::decode(b"not a record").is_err());
    for store_error in [false, true] {
        let e = Engine::new(
            Arc::new(GarbageStore { store_error }),
            Policy::default().with_store_down(StoreDown::FailOpen),
        );
        let r = rejected(&e, &post("k"), b"").await;
        assert_eq!(r.status(), 503, "store_error={store_error}");
        assert_eq!(
            problem_type(&r),
            "urn:keel:problem:idempotency-store-unavailable"
        );
    }
}

#[tokio::test]
async fn complete_parts_and_unbuffered() {
    let e = engine(Policy::default());
    let mut headers = HeaderMap::new();
    headers.insert("content-type", "text/plain".parse().expect("value"));
    let guard = execute(&e, &post("parts"), b"").await;
    let done = guard
        .complete_parts(StatusCode::ACCEPTED, &headers, b"queued")
        .await;
    assert_eq!(done.expect("stored"), Completion::Stored);
    let r = replayed(&e, &post("parts"), b"").await;
    assert_eq!(
        (r.status(), r.headers()["content-type"].to_str().ok()),
        (StatusCode::ACCEPTED, Some("text/plain"))
    );

    let guard = execute(&e, &post("stream"), b"").await;
    assert_eq!(
        guard
            .complete_unbuffered(StatusCode::OK, 10 << 20)
            .await
            .expect("recorded"),
        Completion::TooLarge
    );
    assert_eq!(
        problem_type(&rejected(&e, &post("stream"), b"").await),
        "urn:keel:problem:idempotency-response-not-stored"
    );
    let guard = execute(&e, &post("stream-429"), b"").await;
    assert_eq!(
        guard
            .complete_unbuffered(StatusCode::TOO_MANY_REQUESTS, 10)
            .await
            .expect("released"),
        Completion::Released
    );
}

// ---- faults: slow work, vanished holders, a store that stalls or fills ----

/// A memory store with switchable faults, counting the calls of each kind.
#[derive(Default)]
struct Faulty {
    inner: MemoryStore,
    /// While set, every call fails as unavailable (a stalled or cut store).
    down: std::sync::atomic::AtomicBool,
    /// The next this-many `complete` calls fail as unavailable.
    fail_completes: AtomicUsize,
    claims: AtomicUsize,
    renews: AtomicUsize,
    completes: AtomicUsize,
}

impl Faulty {
    fn over(inner: MemoryStore) -> Arc<Self> {
        Arc::new(Self {
            inner,
            ..Self::default()
        })
    }

    fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    fn fault(&self) -> Option<StoreError> {
        self.down
            .load(Ordering::SeqCst)
            .then(|| StoreError::Unavailable("stalled".into()))
    }
}

impl Store for Faulty {
    fn claim<'a>(
        &'a self,
        k: &'a StoreKey,
        f: Fingerprint,
        l: Lease,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        self.claims.fetch_add(1, Ordering::SeqCst);
        match self.fault() {
            Some(e) => Box::pin(async move { Err(e) }),
            None => self.inner.claim(k, f, l),
        }
    }
    fn renew<'a>(
        &'a self,
        k: &'a StoreKey,
        t: FencingToken,
        l: Lease,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.renews.fetch_add(1, Ordering::SeqCst);
        match self.fault() {
            Some(e) => Box::pin(async move { Err(e) }),
            None => self.inner.renew(k, t, l),
        }
    }
    fn complete<'a>(
        &'a self,
        k: &'a StoreKey,
        t: FencingToken,
        p: &'a [u8],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.completes.fetch_add(1, Ordering::SeqCst);
        let scripted = self
            .fail_completes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        match self
            .fault()
            .or_else(|| scripted.then(|| StoreError::Unavailable("timeout".into())))
        {
            Some(e) => Box::pin(async move { Err(e) }),
            None => self.inner.complete(k, t, p, ttl),
        }
    }
    fn release<'a>(
        &'a self,
        k: &'a StoreKey,
        t: FencingToken,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        match self.fault() {
            Some(e) => Box::pin(async move { Err(e) }),
            None => self.inner.release(k, t),
        }
    }
    fn inspect<'a>(
        &'a self,
        k: &'a StoreKey,
    ) -> BoxFuture<'a, Result<Option<KeyState>, StoreError>> {
        self.inner.inspect(k)
    }
    fn remove<'a>(&'a self, k: &'a StoreKey) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.inner.remove(k)
    }
    fn name(&self) -> &'static str {
        "faulty"
    }
}

fn faulty_engine(store: &Arc<Faulty>, policy: Policy) -> Engine {
    Engine::with_gate(store.clone(), Arc::new(AlwaysAllow), policy)
}

fn lookup(key: &str) -> KeyLookup<'_> {
    KeyLookup {
        tenant: Some(b"Bearer tenant-a"),
        method: &http::Method::POST,
        path: "/orders",
        key,
    }
}

#[tokio::test(start_paused = true)]
async fn a_slow_request_keeps_its_key_held_past_the_lease() {
    let store = Faulty::over(MemoryStore::new());
    let e = faulty_engine(&store, Policy::default().with_lease(Duration::from_secs(3)));
    let mut guard = execute(&e, &post("slow"), b"").await;
    guard.mark_started();
    // The response takes ten leases (a body streamed slowly); a duplicate
    // sent in the middle is told to wait, never run or locked out.
    let work = guard.hold(tokio::time::sleep(Duration::from_secs(30)));
    let duplicate = async {
        tokio::time::sleep(Duration::from_secs(20)).await;
        rejected(&e, &post("slow"), b"").await
    };
    let ((), dup) = tokio::join!(work, duplicate);
    assert_eq!(dup.status(), 409);
    assert_eq!(problem_type(&dup), "urn:keel:problem:idempotency-in-flight");
    let renewals = store.renews.load(Ordering::SeqCst);
    assert!(
        (29..=31).contains(&renewals),
        "renewed every second (a third of the lease): {renewals}"
    );
    assert_eq!(
        guard.complete(&respond(201, "made")).await.expect("stored"),
        Completion::Stored
    );
    assert_eq!(replayed(&e, &post("slow"), b"").await.body(), "made");
}

/// The store round trips of the idempotent path: a new request claims and
/// completes (2), a replay claims (1); renewal adds calls only to requests
/// that outlive a third of the lease.
#[tokio::test(start_paused = true)]
async fn a_new_request_costs_two_store_calls_and_a_replay_one() {
    let store = Faulty::over(MemoryStore::new());
    let e = faulty_engine(&store, Policy::default().with_lease(Duration::from_secs(3)));
    let calls = |s: &Faulty| {
        s.claims.load(Ordering::SeqCst)
            + s.renews.load(Ordering::SeqCst)
            + s.completes.load(Ordering::SeqCst)
    };
    let mut guard = execute(&e, &post("trips"), b"").await;
    guard.mark_started();
    guard
        .hold(tokio::time::sleep(Duration::from_millis(200)))
        .await;
    guard.complete(&respond(201, "made")).await.expect("stored");
    assert_eq!(calls(&store), 2, "claim and complete");
    replayed(&e, &post("trips"), b"").await;
    assert_eq!(calls(&store), 3, "a replay is one claim");
}

#[tokio::test(start_paused = true)]
async fn a_request_within_a_third_of_the_lease_costs_no_renewal() {
    let store = Faulty::over(MemoryStore::new());
    let e = faulty_engine(&store, Policy::default().with_lease(Duration::from_secs(3)));
    let mut guard = execute(&e, &post("quick"), b"").await;
    guard.mark_started();
    guard
        .hold(tokio::time::sleep(Duration::from_millis(900)))
        .await;
    guard.complete(&respond(200, "ok")).await.expect("stored");
    assert_eq!(store.renews.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn renewal_rides_out_a_store_blip_shorter_than_the_lease() {
    let store = Faulty::over(MemoryStore::new());
    let e = faulty_engine(&store, Policy::default().with_lease(Duration::from_secs(3)));
    let mut guard = execute(&e, &post("blip"), b"").await;
    guard.mark_started();
    let blip = async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        store.set_down(true);
        tokio::time::sleep(Duration::from_millis(1400)).await;
        store.set_down(false);
    };
    tokio::join!(
        guard.hold(tokio::time::sleep(Duration::from_secs(10))),
        blip
    );
    assert_eq!(
        guard.complete(&respond(200, "ok")).await.expect("stored"),
        Completion::Stored,
        "the lease never lapsed: the blip was retried within it"
    );
}

#[tokio::test(start_paused = true)]
async fn a_store_outage_past_the_lease_locks_the_key_never_frees_it() {
    let store = Faulty::over(MemoryStore::new());
    let e = faulty_engine(
        &store,
        Policy::default()
            .with_lease(Duration::from_secs(3))
            .with_record_retry(Duration::from_secs(2)),
    );
    let mut guard = execute(&e, &post("outage"), b"").await;
    guard.mark_started();
    // The store stalls while the request is at the upstream, and stays
    // away past the lease and the write retries.
    store.set_down(true);
    guard.hold(tokio::time::sleep(Duration::from_secs(2))).await;
    assert!(matches!(
        guard.complete(&respond(201, "made")).await,
        Err(StoreError::Unavailable(_))
    ));
    tokio::time::sleep(Duration::from_secs(5)).await;
    store.set_down(false);
    let retry = rejected(&e, &post("outage"), b"").await;
    assert_eq!(retry.status(), 409);
    assert_eq!(
        problem_type(&retry),
        "urn:keel:problem:idempotency-outcome-unknown"
    );
    assert!(
        store.completes.load(Ordering::SeqCst) > 3,
        "the write was retried"
    );
    let status = e.key_status(&lookup("outage")).await.expect("inspect");
    assert_eq!(status.state, "abandoned");
}

#[tokio::test(start_paused = true)]
async fn an_outcome_write_is_retried_until_the_store_answers() {
    let store = Faulty::over(MemoryStore::new());
    let e = faulty_engine(&store, Policy::default());
    let mut guard = execute(&e, &post("retried"), b"").await;
    guard.mark_started();
    store.fail_completes.store(4, Ordering::SeqCst);
    assert_eq!(
        guard.complete(&respond(201, "made")).await.expect("stored"),
        Completion::Stored
    );
    assert_eq!(store.completes.load(Ordering::SeqCst), 5);
    assert_eq!(replayed(&e, &post("retried"), b"").await.body(), "made");
}

#[tokio::test(start_paused = true)]
async fn a_vanished_holder_locks_the_key_until_an_operator_releases_it() {
    let e = engine(Policy::default().with_lease(Duration::from_secs(3)));
    let mut guard = execute(&e, &post("crash"), b"").await;
    guard.mark_started();
    // The process dies with the request at the upstream: no drop handler,
    // no completion, no renewal.
    std::mem::forget(guard);
    assert_eq!(rejected(&e, &post("crash"), b"").await.status(), 409);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let r = rejected(&e, &post("crash"), b"").await;
    assert_eq!(
        problem_type(&r),
        "urn:keel:problem:idempotency-outcome-unknown"
    );
    assert!(r.headers().get("retry-after").is_none());
    // A different body under the same key is still a different request.
    assert_eq!(rejected(&e, &post("crash"), b"other").await.status(), 422);
    // Still locked an hour later, well inside the TTL.
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(rejected(&e, &post("crash"), b"").await.status(), 409);
    let status = e.key_status(&lookup("crash")).await.expect("inspect");
    assert_eq!((status.state, status.token.is_some()), ("abandoned", true));
    assert!(e.remove_key(&lookup("crash")).await.expect("remove"));
    assert_eq!(
        e.key_status(&lookup("crash")).await.expect("inspect").state,
        "free"
    );
    let guard = execute(&e, &post("crash"), b"").await;
    guard.release().await.expect("the new holder releases");
}

#[tokio::test(start_paused = true)]
async fn an_abandoned_lock_ends_with_the_ttl() {
    let e = engine(
        Policy::default()
            .with_lease(Duration::from_secs(3))
            .with_ttl(Duration::from_secs(60)),
    );
    let mut guard = execute(&e, &post("ttl"), b"").await;
    guard.mark_started();
    std::mem::forget(guard);
    tokio::time::sleep(Duration::from_secs(62)).await;
    assert_eq!(rejected(&e, &post("ttl"), b"").await.status(), 409);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let guard = execute(&e, &post("ttl"), b"").await;
    guard.release().await.expect("the new holder releases");
}

#[tokio::test(start_paused = true)]
async fn a_rerun_route_frees_a_vanished_holders_key() {
    let e = engine(
        Policy::default()
            .with_lease(Duration::from_secs(3))
            .with_lapsed_lease(LapsedLease::Rerun),
    );
    let mut guard = execute(&e, &post("rerun"), b"").await;
    guard.mark_started();
    std::mem::forget(guard);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let guard = execute(&e, &post("rerun"), b"").await;
    guard.release().await.expect("the new holder releases");
}

#[tokio::test]
async fn a_full_store_refuses_new_keys_with_503_and_replays_the_rest() {
    let e = engine_over(MemoryStore::with_config(
        MemoryConfig::default().shards(1).max_entries(4),
    ));
    for i in 0..4 {
        let key = format!("k{i}");
        execute(&e, &post(&key), b"")
            .await
            .complete(&respond(201, "made"))
            .await
            .expect("stored");
    }
    let full = rejected(&e, &post("k4"), b"").await;
    assert_eq!(full.status(), 503);
    assert_eq!(
        problem_type(&full),
        "urn:keel:problem:idempotency-store-full"
    );
    assert!(full.headers().contains_key("retry-after"));
    for i in 0..4 {
        let key = format!("k{i}");
        assert_eq!(replayed(&e, &post(&key), b"").await.body(), "made");
    }
}

#[tokio::test]
async fn a_response_without_room_is_recorded_as_ran() {
    let e = engine_over(MemoryStore::with_config(
        MemoryConfig::default().shards(1).max_bytes(2048),
    ));
    let big: &'static str = Box::leak("x".repeat(4096).into_boxed_str());
    let guard = execute(&e, &post("big"), b"").await;
    assert_eq!(
        guard.complete(&respond(201, big)).await.expect("recorded"),
        Completion::TooLarge
    );
    let r = rejected(&e, &post("big"), b"").await;
    assert_eq!(r.status(), 409);
    assert_eq!(
        problem_type(&r),
        "urn:keel:problem:idempotency-response-not-stored"
    );
}

fn engine_over(store: MemoryStore) -> Engine {
    Engine::new(Arc::new(store), Policy::default())
}

#[tokio::test]
async fn keyed_requests_cannot_upgrade() {
    let e = engine(Policy::default());
    let upgrade = Request::post("/orders")
        .header("idempotency-key", "ws")
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .body(())
        .expect("req");
    let r = rejected(&e, &upgrade, b"").await;
    assert_eq!(r.status(), 400);
    assert_eq!(
        problem_type(&r),
        "urn:keel:problem:idempotency-upgrade-refused"
    );
    let unkeyed = Request::post("/orders")
        .header("upgrade", "websocket")
        .body(())
        .expect("req");
    assert!(matches!(
        e.begin(&unkeyed, b"").await,
        Begin::PassThrough(PassReason::NoKey)
    ));
}
