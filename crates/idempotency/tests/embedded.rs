//! The embedded (log) store: conformance, durability across reopen, and a
//! hard crash (`SIGKILL`) of a child process between completion and replay.

#![cfg(feature = "embedded")]

#[path = "support/kill9.rs"]
mod kill9;

use std::sync::Arc;
use std::time::Duration;

use keel_idempotency::conformance;
use keel_idempotency::embedded::{EmbeddedConfig, EmbeddedStore};
use keel_idempotency::engine::{Begin, Engine, Policy};
use keel_idempotency::store::{
    Claim, FencingToken, Fingerprint, KeyState, Lease, Store, StoreError, StoreKey,
};

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
    let fp = Fingerprint::from_bytes([1; 32]);
    let first = {
        let store = EmbeddedStore::open_dir(dir.path()).expect("open");
        let Claim::Acquired { token } = store
            .claim(&key, fp, Lease::freeing(Duration::from_secs(60)))
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
        .claim(&key, fp, Lease::freeing(Duration::from_millis(1)))
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
        .claim(&other, fp, Lease::freeing(Duration::from_secs(60)))
        .await
        .expect("claim");
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(store.purge_expired().await.expect("purge"), 1);
    assert!(matches!(
        store
            .claim(&other, fp, Lease::freeing(Duration::from_secs(60)))
            .await,
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
        .header("authorization", "Bearer alice")
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
    let completed = kill9::run_until_then_kill("crash_child", CHILD_DIR, dir.path(), "COMPLETED")
        .await
        .is_some();
    // Killed with SIGKILL: no destructors, no flush, no clean close of the
    // database.
    assert!(completed, "the child did not complete its record");

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

fn small_segments() -> EmbeddedConfig {
    EmbeddedConfig::default().segment_bytes(4096)
}

fn log_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    files.sort();
    files
}

async fn acquire(store: &EmbeddedStore, key: &StoreKey, lease: Duration) -> FencingToken {
    match store
        .claim(key, Fingerprint::from_bytes([1; 32]), Lease::freeing(lease))
        .await
    {
        Ok(Claim::Acquired { token }) => token,
        other => panic!("{key} should be free, got {other:?}"),
    }
}

async fn assert_replays(store: &EmbeddedStore, key: &StoreKey, payload: &[u8]) {
    match store
        .claim(
            key,
            Fingerprint::from_bytes([1; 32]),
            Lease::freeing(Duration::from_secs(60)),
        )
        .await
    {
        Ok(Claim::Completed { payload: p, .. }) => assert_eq!(p, payload, "{key}"),
        other => panic!("{key} should replay, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_reclaims_dead_segments_and_keeps_live_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keep = StoreKey::new("keep").expect("valid");
    let mut last = FencingToken::new(0);
    {
        let store = EmbeddedStore::open_dir_with(dir.path(), small_segments()).expect("open");
        let t = acquire(&store, &keep, Duration::from_secs(60)).await;
        store
            .complete(&keep, t, b"kept result", Duration::from_secs(600))
            .await
            .expect("complete");
        // 400 claims given back: 800 dead records, about 14 segments'
        // worth at 4 KiB each.
        for i in 0..400 {
            let key = StoreKey::new(format!("churn-{i}")).expect("valid");
            last = acquire(&store, &key, Duration::from_secs(60)).await;
            store.release(&key, last).await.expect("release");
        }
        // Nothing has expired; the purge waits for the compaction the
        // last writes started, so the files are settled.
        assert_eq!(store.purge_expired().await.expect("purge"), 0);
        let stats = store.stats();
        assert!(
            stats.segments <= 3,
            "dead segments were not compacted: {stats:?}"
        );
        assert_eq!(log_files(dir.path()).len(), stats.segments);
        assert!(stats.bytes < 4 * 4096, "the log kept dead bytes: {stats:?}");
        assert_eq!(stats.entries, 1);
        assert_replays(&store, &keep, b"kept result").await;
    }
    // After a restart the moved record is still the one found, released
    // keys are free, and tokens go on increasing.
    let store = EmbeddedStore::open_dir_with(dir.path(), small_segments()).expect("reopen");
    assert_eq!(store.stats().entries, 1);
    assert_replays(&store, &keep, b"kept result").await;
    let again = acquire(
        &store,
        &StoreKey::new("churn-7").expect("valid"),
        Duration::from_secs(60),
    )
    .await;
    assert!(again > last, "{again:?} must exceed {last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purged_records_are_compacted_away() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open_dir_with(dir.path(), small_segments()).expect("open");
    for i in 0..200 {
        let key = StoreKey::new(format!("short-{i}")).expect("valid");
        let t = acquire(&store, &key, Duration::from_secs(60)).await;
        store
            .complete(&key, t, &[7; 100], Duration::from_millis(1))
            .await
            .expect("complete");
    }
    let before = store.stats();
    assert!(before.segments > 5, "{before:?}");
    tokio::time::sleep(Duration::from_millis(5)).await;
    // The purge returns once the writer has compacted what it freed.
    assert_eq!(store.purge_expired().await.expect("purge"), 200);
    let stats = store.stats();
    assert!(stats.segments <= 2, "expired records were kept: {stats:?}");
    assert_eq!(stats.entries, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_append_is_cut_off_and_earlier_records_survive() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (
        StoreKey::new("a").expect("valid"),
        StoreKey::new("b").expect("valid"),
    );
    {
        let store = EmbeddedStore::open_dir(dir.path()).expect("open");
        for key in [&a, &b] {
            let t = acquire(&store, key, Duration::from_secs(60)).await;
            store
                .complete(key, t, key.as_str().as_bytes(), Duration::from_secs(600))
                .await
                .expect("complete");
        }
    }
    // A crash in the middle of the last append: its tail never reached
    // the disk.
    let newest = log_files(dir.path()).pop().expect("a segment");
    let len = std::fs::metadata(&newest).expect("stat").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&newest)
        .and_then(|f| f.set_len(len - 5))
        .expect("tear");
    {
        let store = EmbeddedStore::open_dir(dir.path()).expect("reopen");
        assert!(store.stats().truncated_on_open > 0);
        assert_replays(&store, &a, b"a").await;
        // b's result was the torn record: its claim is what the log holds.
        assert!(matches!(
            store
                .claim(
                    &b,
                    Fingerprint::from_bytes([1; 32]),
                    Lease::freeing(Duration::from_secs(60))
                )
                .await,
            Ok(Claim::InFlight { .. })
        ));
        let c = StoreKey::new("c").expect("valid");
        let t = acquire(&store, &c, Duration::from_secs(60)).await;
        store
            .complete(&c, t, b"c", Duration::from_secs(600))
            .await
            .expect("writes go on after the cut");
    }
    let store = EmbeddedStore::open_dir(dir.path()).expect("reopen again");
    assert_eq!(store.stats().truncated_on_open, 0);
    assert_replays(&store, &a, b"a").await;
    assert_replays(&store, &StoreKey::new("c").expect("valid"), b"c").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_sealed_segment_is_reported_with_file_and_offset() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = EmbeddedStore::open_dir_with(dir.path(), small_segments()).expect("open");
        // Live claims only: nothing is dead, nothing is compacted.
        for i in 0..120 {
            let key = StoreKey::new(format!("live-{i}")).expect("valid");
            acquire(&store, &key, Duration::from_secs(600)).await;
        }
        assert!(store.stats().segments >= 2);
    }
    let first = log_files(dir.path()).remove(0);
    let mut bytes = std::fs::read(&first).expect("read");
    bytes[1000] ^= 0xff;
    std::fs::write(&first, bytes).expect("damage");
    let err = EmbeddedStore::open_dir(dir.path()).expect_err("damage must not be opened over");
    let msg = err.to_string();
    let name = first.file_name().and_then(|n| n.to_str()).expect("name");
    assert!(
        matches!(err, StoreError::Corrupt(_)) && msg.contains(name) && msg.contains("byte"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_earlier_versions_file_is_refused_not_ignored() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("idempotency.redb"), b"old").expect("write");
    let msg = EmbeddedStore::open_dir(dir.path())
        .expect_err("must not start empty over old records")
        .to_string();
    assert!(
        msg.contains("idempotency.redb") && msg.contains("earlier keel"),
        "{msg}"
    );
}

/// One step of the model test.
#[derive(Clone, Debug)]
enum Op {
    Claim(usize),
    Complete(usize, usize),
    /// Completes with a 1 ms TTL and waits it out: the key is free again.
    CompleteExpiring(usize, usize),
    CompleteStale(usize),
    Release(usize),
    /// Renews the holder's claim, or tries a stale token on anything else.
    Renew(usize),
    /// An operator's removal, whatever the key holds.
    Remove(usize),
    Inspect(usize),
    Purge,
    Reopen,
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    prop_oneof![
        4 => (0..6usize).prop_map(Op::Claim),
        2 => (0..6usize, 0..700usize).prop_map(|(k, n)| Op::Complete(k, n)),
        2 => (0..6usize, 0..700usize).prop_map(|(k, n)| Op::CompleteExpiring(k, n)),
        1 => (0..6usize).prop_map(Op::CompleteStale),
        2 => (0..6usize).prop_map(Op::Release),
        1 => (0..6usize).prop_map(Op::Renew),
        1 => (0..6usize).prop_map(Op::Remove),
        1 => (0..6usize).prop_map(Op::Inspect),
        1 => Just(Op::Purge),
        1 => Just(Op::Reopen),
    ]
}

/// What the store must hold for one key.
#[derive(Clone, Debug, PartialEq)]
enum Model {
    InFlight(FencingToken),
    Completed(Vec<u8>),
}

/// Runs `ops` against a store with 4 KiB segments (so records rotate,
/// compact and get moved) and a plain map, reopening the store where the
/// ops say, and checks every answer against the map. Claims alternate
/// between locking and freeing leases (none lapses: the clock stays put).
async fn model_run(ops: Vec<Op>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let open = || EmbeddedStore::open_dir_with(dir.path(), small_segments()).expect("open");
    let keys: Vec<StoreKey> = (0..6)
        .map(|i| StoreKey::new(format!("model-key-{i}")).expect("valid"))
        .collect();
    let mut store = open();
    let mut model: std::collections::HashMap<usize, Model> = Default::default();
    let mut last_token = FencingToken::new(0);
    let fp = Fingerprint::from_bytes([9; 32]);
    let lease = |step: usize| {
        if step.is_multiple_of(2) {
            Lease::locking(Duration::from_secs(600), Duration::from_secs(600))
        } else {
            Lease::freeing(Duration::from_secs(600))
        }
    };
    for (step, op) in ops.into_iter().enumerate() {
        match op {
            Op::Claim(k) => {
                let got = store.claim(&keys[k], fp, lease(step)).await.expect("claim");
                match (model.get(&k), got) {
                    (None, Claim::Acquired { token }) => {
                        assert!(token > last_token, "step {step}: token went back");
                        last_token = token;
                        model.insert(k, Model::InFlight(token));
                    }
                    (Some(Model::InFlight(_)), Claim::InFlight { .. }) => {}
                    (Some(Model::Completed(p)), Claim::Completed { payload, .. }) => {
                        assert_eq!(&payload, p, "step {step}: replayed payload");
                    }
                    (want, got) => panic!("step {step}: claim {k}: model {want:?}, store {got:?}"),
                }
            }
            Op::Complete(k, n) => {
                if let Some(Model::InFlight(token)) = model.get(&k).cloned() {
                    let payload: Vec<u8> = (0..n).map(|i| (i * 7 + k) as u8).collect();
                    store
                        .complete(&keys[k], token, &payload, Duration::from_secs(600))
                        .await
                        .expect("complete");
                    model.insert(k, Model::Completed(payload));
                }
            }
            Op::CompleteExpiring(k, n) => {
                if let Some(Model::InFlight(token)) = model.get(&k).cloned() {
                    let payload = vec![k as u8; n];
                    store
                        .complete(&keys[k], token, &payload, Duration::from_millis(1))
                        .await
                        .expect("complete");
                    // Expiry is on the wall clock: wait it out.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    model.remove(&k);
                    store.purge_expired().await.expect("purge");
                }
            }
            Op::CompleteStale(k) => {
                let stale = match model.get(&k) {
                    Some(Model::InFlight(t)) => FencingToken::new(t.get() - 1),
                    _ => last_token,
                };
                assert!(
                    matches!(
                        store
                            .complete(&keys[k], stale, b"late", Duration::from_secs(600))
                            .await,
                        Err(StoreError::Fenced)
                    ),
                    "step {step}: a stale token completed key {k}"
                );
            }
            Op::Release(k) => {
                if let Some(Model::InFlight(token)) = model.get(&k).cloned() {
                    store.release(&keys[k], token).await.expect("release");
                    model.remove(&k);
                }
            }
            Op::Renew(k) => match model.get(&k) {
                Some(Model::InFlight(token)) => store
                    .renew(&keys[k], *token, lease(step))
                    .await
                    .expect("renew"),
                _ => assert!(
                    matches!(
                        store.renew(&keys[k], last_token, lease(step)).await,
                        Err(StoreError::Fenced)
                    ),
                    "step {step}: renewed key {k}, which is not held"
                ),
            },
            Op::Remove(k) => {
                let was = store.remove(&keys[k]).await.expect("remove");
                assert_eq!(was, model.remove(&k).is_some(), "step {step}: remove {k}");
            }
            Op::Inspect(k) => match (model.get(&k), store.inspect(&keys[k]).await) {
                (None, Ok(None)) => {}
                (Some(Model::InFlight(t)), Ok(Some(KeyState::Held { token, .. }))) => {
                    assert_eq!(token, *t, "step {step}: inspect {k}");
                }
                (Some(Model::Completed(p)), Ok(Some(KeyState::Completed { payload, .. }))) => {
                    assert_eq!(&payload, p, "step {step}: inspect {k}");
                }
                (want, got) => panic!("step {step}: inspect {k}: model {want:?}, store {got:?}"),
            },
            Op::Purge => {
                // Expiring keys were purged when they expired: nothing is
                // left to remove, but the compactor is woken.
                assert_eq!(store.purge_expired().await.expect("purge"), 0);
            }
            Op::Reopen => {
                drop(store);
                store = open();
            }
        }
        let stats = store.stats();
        assert_eq!(stats.entries, model.len(), "step {step}: {stats:?}");
    }
    // Everything the model holds survives one more restart.
    drop(store);
    let store = open();
    for (k, want) in &model {
        match (
            want,
            store
                .claim(&keys[*k], fp, Lease::freeing(Duration::from_secs(600)))
                .await,
        ) {
            (Model::InFlight(_), Ok(Claim::InFlight { .. })) => {}
            (Model::Completed(p), Ok(Claim::Completed { payload, .. })) => assert_eq!(&payload, p),
            (want, got) => panic!("after reopen, key {k}: model {want:?}, store {got:?}"),
        }
    }
    assert_eq!(log_files(dir.path()).len(), store.stats().segments);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 48, ..Default::default() })]

    /// Random claims, completions, releases, renewals, removals,
    /// inspections, purges and restarts agree with a plain map, through
    /// segment rotation and compaction.
    #[test]
    fn the_log_store_agrees_with_a_map(ops in proptest::collection::vec(op(), 1..200)) {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(model_run(ops));
    }
}
