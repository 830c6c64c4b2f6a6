//! Engine-level cases written against any store, so the same checks run on
//! the memory and embedded stores here and on Redis and PostgreSQL in their
//! own test files (`mod common;` then call these with a store).
//!
//! Each case uses a namespace of its own, so it can share a server with
//! other tests running at the same time.

#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use keel_idempotency::conformance::unique_prefix;
use keel_idempotency::engine::{Begin, Completion, Engine, InFlight, LapsedLease, Policy};
use keel_idempotency::store::{Store, StoreError};

/// The `type` member of a problem+json response.
pub fn problem_type(response: &http::Response<Bytes>) -> String {
    let v: serde_json::Value = serde_json::from_slice(response.body()).expect("problem+json body");
    v["type"].as_str().expect("type member").to_string()
}

pub fn post(key: &str) -> http::Request<()> {
    http::Request::post("/orders")
        .header("authorization", "Bearer tenant-a")
        .header("idempotency-key", key)
        .header("x-request-id", format!("req-{key}"))
        .body(())
        .expect("request")
}

fn policy() -> Policy {
    Policy::default().with_namespace(unique_prefix())
}

/// 64 concurrent requests with one key on a multi-thread runtime: the
/// operation runs exactly once. With `wait` off the 63 others get 409 with
/// `Retry-After` (the operation holds until all 63 have been answered);
/// with `wait` on they all get the replay.
pub async fn exactly_once_64_concurrent(store: Arc<dyn Store>, wait: bool) {
    let mut p = policy();
    if wait {
        p = p.with_in_flight(InFlight::Wait(Duration::from_secs(20)));
    }
    let engine = Engine::new(store, p);
    let executions = Arc::new(AtomicUsize::new(0));
    let answered = Arc::new(AtomicUsize::new(0));
    let all_answered = Arc::new(tokio::sync::Notify::new());
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let (engine, executions, answered, all_answered) = (
            engine.clone(),
            executions.clone(),
            answered.clone(),
            all_answered.clone(),
        );
        tasks.spawn(async move {
            match engine.begin(&post("k64"), b"{\"qty\":1}").await {
                Begin::Execute(mut guard) => {
                    guard.mark_started();
                    executions.fetch_add(1, Ordering::SeqCst);
                    if wait {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    } else {
                        // Hold the claim until every duplicate was refused,
                        // so none of them can arrive after completion.
                        let notified = all_answered.notified();
                        if answered.load(Ordering::SeqCst) < 63 {
                            tokio::time::timeout(Duration::from_secs(20), notified)
                                .await
                                .expect("all duplicates answered");
                        }
                    }
                    let response = http::Response::builder()
                        .status(201)
                        .body(Bytes::from_static(b"order-1"))
                        .expect("response");
                    assert_eq!(
                        guard.complete(&response).await.expect("stored"),
                        Completion::Stored
                    );
                    "executed"
                }
                Begin::Reject(r) => {
                    assert!(!wait, "wait mode must not answer 409 within its bound");
                    assert_eq!(r.status(), 409);
                    assert!(r.headers().contains_key("retry-after"));
                    assert_eq!(problem_type(&r), "urn:keel:problem:idempotency-in-flight");
                    if answered.fetch_add(1, Ordering::SeqCst) + 1 == 63 {
                        all_answered.notify_one();
                    }
                    "rejected"
                }
                Begin::Replay(r) => {
                    assert!(
                        wait,
                        "without wait, duplicates are refused while the first runs"
                    );
                    assert_eq!(r.status(), 201);
                    assert_eq!(r.body(), "order-1");
                    "replayed"
                }
                Begin::PassThrough(reason) => panic!("unexpected pass-through: {reason:?}"),
            }
        });
    }
    let mut outcomes = std::collections::HashMap::new();
    while let Some(r) = tasks.join_next().await {
        *outcomes.entry(r.expect("task")).or_insert(0) += 1;
    }
    assert_eq!(
        executions.load(Ordering::SeqCst),
        1,
        "outcomes: {outcomes:?}"
    );
    let others = if wait { "replayed" } else { "rejected" };
    assert_eq!(outcomes.get(others), Some(&63), "outcomes: {outcomes:?}");
}

/// Two engines on two store instances sharing one backend: 200 keys x 8
/// concurrent duplicates split across both -> exactly 200 executions, one
/// per key.
pub async fn cross_instance_200_keys(a: Arc<dyn Store>, b: Arc<dyn Store>) {
    let p = policy();
    let engines = [Engine::new(a, p.clone()), Engine::new(b, p)];
    let per_key: Arc<Vec<AtomicUsize>> = Arc::new((0..200).map(|_| AtomicUsize::new(0)).collect());
    let mut tasks = tokio::task::JoinSet::new();
    for dup in 0..8 {
        for k in 0..200 {
            let engine = engines[dup % 2].clone();
            let per_key = per_key.clone();
            tasks.spawn(async move {
                let key = format!("shared-{k}");
                match engine.begin(&post(&key), b"{}").await {
                    Begin::Execute(mut guard) => {
                        guard.mark_started();
                        per_key[k].fetch_add(1, Ordering::SeqCst);
                        tokio::task::yield_now().await;
                        let response = http::Response::new(Bytes::from(key));
                        guard.complete(&response).await.expect("stored");
                    }
                    Begin::Reject(r) => assert_eq!(r.status(), 409),
                    Begin::Replay(r) => assert_eq!(r.body(), key.as_str()),
                    Begin::PassThrough(reason) => panic!("unexpected pass-through: {reason:?}"),
                }
            });
        }
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("task");
    }
    let total: usize = per_key.iter().map(|n| n.load(Ordering::SeqCst)).sum();
    assert_eq!(total, 200, "exactly one execution per key");
    assert!(per_key.iter().all(|n| n.load(Ordering::SeqCst) == 1));
}

/// A holder whose lease lapses. By default the key is then locked as
/// "outcome unknown" (the holder may have run the request): the next
/// request gets a 409 and the stale holder's late completion is refused.
/// Under `LapsedLease::Rerun` the next request claims the key with a
/// higher token and executes; the stale holder's completion is refused and
/// cannot overwrite the newer result. Waits on tokio's clock, so it runs
/// instantly under paused time.
pub async fn lease_expiry_fences_stale_holder(store: Arc<dyn Store>) {
    let locking = Engine::new(
        store.clone(),
        policy().with_lease(Duration::from_millis(300)),
    );
    let Begin::Execute(mut vanished) = locking.begin(&post("lapse-lock"), b"x").await else {
        panic!("fresh key must execute");
    };
    vanished.mark_started();
    tokio::time::sleep(Duration::from_millis(700)).await;
    for _ in 0..2 {
        match locking.begin(&post("lapse-lock"), b"x").await {
            Begin::Reject(r) => {
                assert_eq!(r.status(), 409);
                assert_eq!(
                    problem_type(&r),
                    "urn:keel:problem:idempotency-outcome-unknown"
                );
            }
            other => panic!("after the lapse: expected the outcome-unknown 409, got {other:?}"),
        }
    }
    let late = http::Response::new(Bytes::from_static(b"late"));
    assert!(matches!(
        vanished.complete(&late).await,
        Err(StoreError::Fenced)
    ));
    assert!(
        matches!(
            locking.begin(&post("lapse-lock"), b"x").await,
            Begin::Reject(_)
        ),
        "a late completion does not unlock the key"
    );

    let engine = Engine::new(
        store,
        policy()
            .with_lease(Duration::from_millis(300))
            .with_lapsed_lease(LapsedLease::Rerun),
    );
    let Begin::Execute(mut stale) = engine.begin(&post("lease"), b"x").await else {
        panic!("fresh key must execute");
    };
    stale.mark_started();
    match engine.begin(&post("lease"), b"x").await {
        Begin::Reject(r) => assert_eq!(r.status(), 409),
        other => panic!("in flight: expected 409, got {other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    let Begin::Execute(fresh) = engine.begin(&post("lease"), b"x").await else {
        panic!("after the lease, a rerun route's next request must take the key over");
    };
    assert!(
        fresh.token() > stale.token(),
        "the new claim's token must be higher"
    );
    let late = http::Response::new(Bytes::from_static(b"stale"));
    assert!(matches!(
        stale.complete(&late).await,
        Err(StoreError::Fenced)
    ));
    let fresh_response = http::Response::new(Bytes::from_static(b"fresh"));
    fresh
        .complete(&fresh_response)
        .await
        .expect("fresh holder stores");
    match engine.begin(&post("lease"), b"x").await {
        Begin::Replay(r) => assert_eq!(r.body(), "fresh"),
        other => panic!("expected the fresh replay, got {other:?}"),
    }
}
