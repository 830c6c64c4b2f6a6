//! `process_once` semantics beyond the doc examples: a concurrent duplicate
//! is told to wait, a crashed handler's claim lapses with its lease, and a
//! fenced completion is reported.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use keel_idempotency::consumer::{Consumer, ProcessError, Processed};
use keel_idempotency::memory::MemoryStore;
use keel_idempotency::store::StoreError;

const TTL: Duration = Duration::from_secs(3600);

#[tokio::test(start_paused = true)]
async fn duplicate_while_running_is_in_flight_then_duplicate() {
    let consumer = Consumer::new(Arc::new(MemoryStore::new())).lease(Duration::from_secs(10));
    let (release, wait) = tokio::sync::oneshot::channel::<()>();
    let c = consumer.clone();
    let first = tokio::spawn(async move {
        c.process_once("evt-1", TTL, async move {
            let _ = wait.await;
            Ok::<_, StoreError>("done")
        })
        .await
    });
    tokio::task::yield_now().await;
    let runs = AtomicUsize::new(0);
    let dup = consumer
        .process_once("evt-1", TTL, async {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, StoreError>("again")
        })
        .await
        .expect("store up");
    match dup {
        Processed::InFlight { retry_after } => assert!(retry_after <= Duration::from_secs(10)),
        other => panic!("expected InFlight, got {other:?}"),
    }
    release.send(()).expect("first still waiting");
    assert!(matches!(
        first.await.expect("task"),
        Ok(Processed::Ran("done"))
    ));
    let later = consumer
        .process_once("evt-1", TTL, async { Ok::<_, StoreError>("third") })
        .await
        .expect("store up");
    assert_eq!(later, Processed::Duplicate);
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn crashed_handler_lapses_with_its_lease_and_late_success_is_not_recorded() {
    let consumer = Consumer::new(Arc::new(MemoryStore::new())).lease(Duration::from_secs(5));
    // A handler that outlives its lease (a crash or a hang, as seen by the
    // store): meanwhile a redelivery after the lease takes over.
    let c = consumer.clone();
    let slow = tokio::spawn(async move {
        c.process_once("evt-2", TTL, async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok::<_, StoreError>("slow")
        })
        .await
    });
    tokio::time::sleep(Duration::from_secs(6)).await;
    let redelivered = consumer
        .process_once("evt-2", TTL, async { Ok::<_, StoreError>("redelivered") })
        .await
        .expect("store up");
    assert_eq!(redelivered, Processed::Ran("redelivered"));
    match slow.await.expect("task") {
        Ok(Processed::RanNotRecorded("slow", why)) => assert!(why.contains("fenced"), "{why}"),
        other => panic!("expected RanNotRecorded, got {other:?}"),
    }
}

#[tokio::test]
async fn handler_error_is_returned_and_released() {
    let store = MemoryStore::new();
    let r = keel_idempotency::consumer::process_once(&store, "evt-3", TTL, async {
        Err::<(), _>("boom")
    })
    .await;
    assert!(matches!(r, Err(ProcessError::Handler("boom"))));
    let r =
        keel_idempotency::consumer::process_once(&store, "evt-3", TTL, async { Ok::<_, &str>(7) })
            .await;
    assert!(matches!(r, Ok(Processed::Ran(7))));
}
