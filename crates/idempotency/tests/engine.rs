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
    Begin, Completion, Engine, InFlight, PassReason, Policy, ServerErrors, StoreDown, Tenant,
};
use keel_idempotency::fingerprint::FingerprintConfig;
use keel_idempotency::gate::{AlwaysAllow, ConsecutiveFailures};
use keel_idempotency::memory::MemoryStore;
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
    let e = engine(Policy::default().max_key_len(10));
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
        .header("idempotency-key", "\"k-1\"")
        .body(())
        .expect("req");
    let bare = Request::post("/x")
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
        .header("idempotency-key", "k")
        .body(())
        .expect("req");
    drop(execute(&optional, &patch, b"").await);

    let required = engine(
        Policy::default()
            .required(true)
            .methods([http::Method::PUT]),
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
    let e = engine(
        Policy::default()
            .fingerprint(FingerprintConfig::default().include_header(http::header::CONTENT_TYPE)),
    );
    let req = |ct: &str| {
        Request::post("/x")
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
    let canonical =
        engine(Policy::default().fingerprint(FingerprintConfig::default().canonical_json(true)));
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
    let by_account = Policy::default().tenant(Tenant::Function(Arc::new(|head| {
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
        Policy::default().tenant(Tenant::Header(http::HeaderName::from_static("x-api-key"))),
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

// ---- limits ----

#[tokio::test]
async fn body_over_limit_is_413() {
    let e = engine(Policy::default().max_body(8));
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
    let e = engine(Policy::default().max_response(4));
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
    let e = engine(Policy::default().replay_header(http::HeaderName::from_static("x-order-id")));
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

    let cookies = engine(Policy::default().replay_header(http::header::SET_COOKIE));
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

    let e = engine(Policy::default().server_errors(ServerErrors::Release));
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
    let e = engine(Policy::default().in_flight(InFlight::Wait(Duration::from_secs(2))));
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
    let e = engine(Policy::default().in_flight(InFlight::Wait(Duration::from_secs(10))));
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
        Policy::default().store_down(StoreDown::FailOpen),
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

#[tokio::test]
async fn store_failing_at_completion_reports_it() {
    // Claim succeeds on a real store, then the store "goes down" for the
    // completion: the caller learns the result was not recorded.
    struct FlakyComplete(MemoryStore);
    impl Store for FlakyComplete {
        fn claim<'a>(
            &'a self,
            k: &'a StoreKey,
            f: Fingerprint,
            l: Lease,
        ) -> BoxFuture<'a, Result<Claim, StoreError>> {
            self.0.claim(k, f, l)
        }
        fn renew<'a>(
            &'a self,
            k: &'a StoreKey,
            t: FencingToken,
            l: Lease,
        ) -> BoxFuture<'a, Result<(), StoreError>> {
            self.0.renew(k, t, l)
        }
        fn inspect<'a>(
            &'a self,
            k: &'a StoreKey,
        ) -> BoxFuture<'a, Result<Option<KeyState>, StoreError>> {
            self.0.inspect(k)
        }
        fn remove<'a>(&'a self, k: &'a StoreKey) -> BoxFuture<'a, Result<bool, StoreError>> {
            self.0.remove(k)
        }
        fn complete<'a>(
            &'a self,
            _: &'a StoreKey,
            _: FencingToken,
            _: &'a [u8],
            _: Duration,
        ) -> BoxFuture<'a, Result<(), StoreError>> {
            Box::pin(async { Err(StoreError::Unavailable("timeout".into())) })
        }
        fn release<'a>(
            &'a self,
            k: &'a StoreKey,
            t: FencingToken,
        ) -> BoxFuture<'a, Result<(), StoreError>> {
            self.0.release(k, t)
        }
        fn name(&self) -> &'static str {
            "flaky"
        }
    }
    let e = Engine::new(
        Arc::new(FlakyComplete(MemoryStore::new())),
        Policy::default(),
    );
    let guard = execute(&e, &post("k"), b"").await;
    assert!(matches!(
        guard.complete(&respond(200, "ok")).await,
        Err(StoreError::Unavailable(_))
    ));
    // The claim stays until its lease ends: a retry is told to wait, not run.
    assert_eq!(rejected(&e, &post("k"), b"").await.status(), 409);
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
            Policy::default().store_down(StoreDown::FailOpen),
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
