//! The embedded (log) store: conformance, durability across reopen, and a
//! hard crash (`SIGKILL`) of a child process between completion and replay.

#![cfg(feature = "embedded")]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use keel_idempotency::conformance;
use keel_idempotency::embedded::EmbeddedStore;
use keel_idempotency::engine::{Begin, Engine, Policy};
use keel_idempotency::store::{Claim, Fingerprint, Store, StoreKey};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open_dir(dir.path()).expect("open");
    conformance::run(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite_with_fast_claims() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open_dir(dir.path())
        .expect("open")
        .durable_claims(false);
    conformance::run(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_handles_on_one_file_are_one_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = EmbeddedStore::open_dir(dir.path()).expect("open");
    let b = a.clone();
    conformance::run_shared(&a, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_keep_increasing_across_reopen_and_purge_removes_expired() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = StoreKey::new("k").expect("valid");
    let fp = Fingerprint([1; 32]);
    let first = {
        let store = EmbeddedStore::open_dir(dir.path()).expect("open");
        let Claim::Acquired { token } = store
            .claim(&key, fp, Duration::from_secs(60))
            .await
            .expect("claim")
        else {
            panic!("fresh key");
        };
        store.release(&key, token).await.expect("release");
        token
    };
    let store = EmbeddedStore::open_dir(dir.path()).expect("reopen");
    let Claim::Acquired { token } = store
        .claim(&key, fp, Duration::from_millis(1))
        .await
        .expect("claim")
    else {
        panic!("released key is free");
    };
    assert!(
        token > first,
        "{token:?} must exceed {first:?} after reopen"
    );
    let other = StoreKey::new("kept").expect("valid");
    store
        .claim(&other, fp, Duration::from_secs(60))
        .await
        .expect("claim");
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(store.purge_expired().await.expect("purge"), 1);
    assert!(matches!(
        store.claim(&other, fp, Duration::from_secs(60)).await,
        Ok(Claim::InFlight { .. })
    ));
}

const CHILD_DIR: &str = "KEEL_IDEM_CRASH_DIR";

fn engine(dir: &std::path::Path) -> Engine {
    let store = EmbeddedStore::open_dir(dir).expect("open");
    Engine::new(Arc::new(store), Policy::default())
}

fn request() -> http::Request<()> {
    http::Request::post("/payments")
        .header("idempotency-key", "crash-1")
        .header("x-request-id", "req-before-crash")
        .body(())
        .expect("request")
}

/// The child half of `completed_record_survives_kill_9`: completes a record,
/// says so on stdout, then waits to be killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by completed_record_survives_kill_9 as a child process"]
async fn crash_child() {
    let dir = std::env::var(CHILD_DIR).expect("run by the parent test");
    let engine = engine(dir.as_ref());
    let Begin::Execute(mut guard) = engine.begin(&request(), b"amount=5").await else {
        panic!("fresh key must execute");
    };
    guard.mark_started();
    let response = http::Response::builder()
        .status(201)
        .header("content-type", "text/plain")
        .body("paid")
        .expect("response");
    guard.complete(&response).await.expect("stored");
    println!("COMPLETED");
    tokio::time::sleep(Duration::from_secs(600)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completed_record_survives_kill_9() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "crash_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR, dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("piped");
    let completed = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|l| l.contains("COMPLETED"))
    })
    .await
    .expect("reader");
    assert!(completed, "the child did not complete its record");
    // SIGKILL: no destructors, no flush, no clean close of the database.
    child.kill().expect("kill -9");
    child.wait().expect("reap");

    let engine = engine(dir.path());
    match engine.begin(&request(), b"amount=5").await {
        Begin::Replay(r) => {
            assert_eq!(r.status(), 201);
            assert_eq!(r.body(), "paid");
            assert_eq!(r.headers()["idempotent-replayed"], "true");
            assert_eq!(r.headers()["original-request-id"], "req-before-crash");
        }
        other => panic!("expected the replay after the crash, got {other:?}"),
    }
}
