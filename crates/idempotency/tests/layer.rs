//! The tower layer in front of an axum router and a plain tower service.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::body::Body;
use axum::routing::{get, post};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use keel_idempotency::engine::{Engine, Policy};
use keel_idempotency::layer::IdempotencyLayer;
use keel_idempotency::memory::MemoryStore;
use tower::{Layer, ServiceExt};

fn engine(policy: Policy) -> Engine {
    Engine::new(Arc::new(MemoryStore::new()), policy)
}

fn router(engine: Engine, runs: Arc<AtomicUsize>) -> Router {
    Router::new()
        .route(
            "/orders",
            post(move |body: String| {
                let runs = runs.clone();
                async move {
                    let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                    (
                        axum::http::StatusCode::CREATED,
                        [("set-cookie", "s=1")],
                        format!("order {n}: {body}"),
                    )
                }
            }),
        )
        .route("/orders", get(|| async { "list" }))
        .layer(IdempotencyLayer::new(engine))
}

fn post_req(key: &str, body: &'static str) -> http::Request<Body> {
    http::Request::post("/orders")
        .header("authorization", "Bearer alice")
        .header("idempotency-key", key)
        .header("x-request-id", "r-1")
        .body(Body::from(body))
        .expect("request")
}

async fn text(
    r: http::Response<impl http_body::Body<Data = Bytes, Error = impl std::fmt::Debug>>,
) -> String {
    let bytes = r.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8(bytes.to_vec()).expect("utf-8")
}

#[tokio::test]
async fn axum_router_runs_once_and_replays() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = router(engine(Policy::default()), runs.clone());
    let first = app
        .clone()
        .oneshot(post_req("k", "a"))
        .await
        .expect("infallible");
    assert_eq!(first.status(), 201);
    assert_eq!(first.headers()["set-cookie"], "s=1");
    assert_eq!(text(first).await, "order 1: a");
    let again = app
        .clone()
        .oneshot(post_req("k", "a"))
        .await
        .expect("infallible");
    assert_eq!(again.status(), 201);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.headers()["original-request-id"], "r-1");
    assert!(!again.headers().contains_key("set-cookie"));
    assert_eq!(text(again).await, "order 1: a");
    let other = app
        .clone()
        .oneshot(post_req("k", "b"))
        .await
        .expect("infallible");
    assert_eq!(other.status(), 422);
    assert_eq!(other.headers()["content-type"], "application/problem+json");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    // Without a key (optional by default) and for GET, requests pass.
    let no_key = http::Request::post("/orders")
        .body(Body::from("c"))
        .expect("request");
    assert_eq!(
        text(app.clone().oneshot(no_key).await.expect("infallible")).await,
        "order 2: c"
    );
    let list = http::Request::get("/orders")
        .header("idempotency-key", "k")
        .body(Body::empty())
        .expect("request");
    assert_eq!(
        text(app.oneshot(list).await.expect("infallible")).await,
        "list"
    );
}

#[tokio::test]
async fn axum_body_limit_is_413() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = router(engine(Policy::default().with_max_body(4)), runs.clone());
    let r = app
        .oneshot(post_req("k", "12345"))
        .await
        .expect("infallible");
    assert_eq!(r.status(), 413);
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn service_error_locks_the_key_as_outcome_unknown() {
    let e = engine(Policy::default());
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let failing = tower::service_fn(move |_req: http::Request<_>| {
        c.fetch_add(1, Ordering::SeqCst);
        async {
            Err::<http::Response<Full<Bytes>>, _>(std::io::Error::other(
                "connection reset after sending",
            ))
        }
    });
    let svc = IdempotencyLayer::new(e).layer(failing);
    let req = || {
        http::Request::post("/pay")
            .header("authorization", "Bearer alice")
            .header("idempotency-key", "p")
            .body(Full::new(Bytes::from_static(b"x")))
            .expect("request")
    };
    assert!(svc.clone().oneshot(req()).await.is_err());
    // The guard finishes on a spawned task.
    tokio::task::yield_now().await;
    let retry = svc.oneshot(req()).await.expect("answered by the engine");
    assert_eq!(retry.status(), 409);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the operation is not run again"
    );
}

#[tokio::test(start_paused = true)]
async fn a_handler_slower_than_the_lease_still_runs_once() {
    let runs = Arc::new(AtomicUsize::new(0));
    let counter = runs.clone();
    let app = Router::new()
        .route(
            "/orders",
            post(move || {
                let runs = counter.clone();
                async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    // Ten leases of work: the layer renews the claim.
                    tokio::time::sleep(std::time::Duration::from_secs(30)).await;
                    "charged"
                }
            }),
        )
        .layer(IdempotencyLayer::new(engine(
            Policy::default().with_lease(std::time::Duration::from_secs(3)),
        )));
    let first = tokio::spawn(app.clone().oneshot(post_req("slow", "{}")));
    tokio::time::sleep(std::time::Duration::from_secs(20)).await;
    let duplicate = app
        .clone()
        .oneshot(post_req("slow", "{}"))
        .await
        .expect("infallible");
    assert_eq!(duplicate.status(), 409, "the first is still running");
    let first = first.await.expect("task").expect("infallible");
    assert_eq!(text(first).await, "charged");
    let retry = app
        .oneshot(post_req("slow", "{}"))
        .await
        .expect("infallible");
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_handler_that_did_not_run_releases_the_key_and_the_retry_runs() {
    use keel_idempotency::engine::NotExecuted;
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let app = Router::new()
        .route(
            "/orders",
            post(move || {
                let calls = counter.clone();
                async move {
                    // The first call's outbound request is refused (its
                    // breaker is open): nothing happened, and it says so.
                    if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                        return axum::response::IntoResponse::into_response((
                            axum::http::StatusCode::BAD_GATEWAY,
                            axum::Extension(NotExecuted),
                            "payment provider unavailable",
                        ));
                    }
                    axum::response::IntoResponse::into_response((
                        axum::http::StatusCode::CREATED,
                        "charged",
                    ))
                }
            }),
        )
        .layer(IdempotencyLayer::new(engine(Policy::default())));
    let first = app
        .clone()
        .oneshot(post_req("ne", "{}"))
        .await
        .expect("infallible");
    assert_eq!(first.status(), 502);
    assert!(!first.headers().contains_key("idempotent-replayed"));
    let retry = app
        .clone()
        .oneshot(post_req("ne", "{}"))
        .await
        .expect("infallible");
    assert_eq!(retry.status(), 201, "the released key runs again");
    assert_eq!(text(retry).await, "charged");
    let again = app.oneshot(post_req("ne", "{}")).await.expect("infallible");
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(text(again).await, "charged");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn cookie_authenticated_callers_never_share_a_key_under_the_default_tenant() {
    // The default tenant is the Authorization header; a service that
    // authenticates with cookies and keeps that default gets a 400 for
    // every keyed request, never one caller's response replayed to another.
    let runs = Arc::new(AtomicUsize::new(0));
    let app = router(engine(Policy::default()), runs.clone());
    let as_cookie = |session: &str| {
        http::Request::post("/orders")
            .header("cookie", format!("session={session}"))
            .header("idempotency-key", "same")
            .body(Body::from("{}"))
            .expect("request")
    };
    for session in ["alice", "bob"] {
        let r = app
            .clone()
            .oneshot(as_cookie(session))
            .await
            .expect("infallible");
        assert_eq!(r.status(), 400);
        assert!(!r.headers().contains_key("idempotent-replayed"));
        assert!(text(r).await.contains("idempotency-tenant-missing"));
    }
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}
