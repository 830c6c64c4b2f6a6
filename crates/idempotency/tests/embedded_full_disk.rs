//! The embedded store on a full disk: the log writer's writes and syncs are
//! made to fail with `ENOSPC` (or `EDQUOT`) by the store's fault hook, at
//! known points. New claims are refused with `StoreError::Full`, nothing
//! stored is lost, and once the fault clears the store works again without
//! a restart.

#![cfg(feature = "embedded")]

use std::time::Duration;

use keel_idempotency::embedded::{EmbeddedStore, FaultError, FaultPoint};
use keel_idempotency::store::{
    Claim, FencingToken, Fingerprint, KeyState, Lease, Store, StoreError, StoreKey,
};

const ENOSPC: i32 = 28;
/// `EDQUOT` on Linux.
const EDQUOT: i32 = 122;
/// Fails every write until the test clears it.
const UNTIL_CLEARED: u32 = u32::MAX;

const HOLD: Duration = Duration::from_secs(30);
const LOCK: Duration = Duration::from_secs(3600);
const TTL: Duration = Duration::from_secs(3600);

fn key(k: &str) -> StoreKey {
    StoreKey::new(k).expect("valid")
}

fn fp() -> Fingerprint {
    Fingerprint::from_bytes([1; 32])
}

fn lease() -> Lease {
    Lease::locking(HOLD, LOCK)
}

async fn acquire(store: &EmbeddedStore, k: &StoreKey) -> FencingToken {
    match store.claim(k, fp(), lease()).await {
        Ok(Claim::Acquired { token }) => token,
        other => panic!("{k} should be free, got {other:?}"),
    }
}

fn is_full<T: std::fmt::Debug>(r: &Result<T, StoreError>) -> bool {
    matches!(r, Err(StoreError::Full(why)) if why.contains("refused until space is freed"))
}

async fn assert_replays(store: &EmbeddedStore, k: &StoreKey, payload: &[u8]) {
    match store.claim(k, fp(), lease()).await {
        Ok(Claim::Completed { payload: p, .. }) => assert_eq!(p, payload, "{k}"),
        other => panic!("{k} should replay, got {other:?}"),
    }
}

async fn assert_in_flight(store: &EmbeddedStore, k: &StoreKey) {
    assert!(
        matches!(
            store.claim(k, fp(), lease()).await,
            Ok(Claim::InFlight { .. })
        ),
        "{k} should be in flight"
    );
}

/// Waits until the writer has handled everything queued so far (a purge
/// goes through the writer's queue and waits for it).
async fn settle(store: &EmbeddedStore) {
    store.purge_expired().await.expect("purge");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_new_claims_keeps_what_is_stored_and_recovers_without_restart() {
    for durable in [true, false] {
        let dir = tempfile::tempdir().expect("tempdir");
        let (done, held, fresh) = (key("done"), key("held"), key("fresh"));
        let store = EmbeddedStore::open_dir(dir.path())
            .expect("open")
            .durable_claims(durable);
        let t = acquire(&store, &done).await;
        store
            .complete(&done, t, b"stored", TTL)
            .await
            .expect("complete");
        let held_token = acquire(&store, &held).await;
        settle(&store).await;
        let log_before = store.stats().bytes;

        store.inject_faults(FaultPoint::Write, UNTIL_CLEARED, FaultError::Os(ENOSPC));
        if !durable {
            // Without durable claims a claim is answered before it is
            // written: the first one after the disk fills is answered (its
            // holder runs, the index keeps it), and the writer learns of
            // the full disk from its write.
            acquire(&store, &key("before-the-writer-knew")).await;
            settle(&store).await;
        }
        // From then on, a new claim waits for its write and is refused.
        for _ in 0..3 {
            let refused = store.claim(&fresh, fp(), lease()).await;
            assert!(is_full(&refused), "durable {durable}: {refused:?}");
            assert!(matches!(store.inspect(&fresh).await, Ok(None)));
        }
        // What is stored still answers: the result is replayed, the held
        // claim is in flight for everyone else.
        assert_replays(&store, &done, b"stored").await;
        assert_in_flight(&store, &held).await;
        assert!(matches!(
            store.inspect(&done).await,
            Ok(Some(KeyState::Completed { payload, .. })) if payload == b"stored"
        ));
        // The holder cannot record its outcome, nor renew, nor release:
        // each returns the error and the claim stays its holder's.
        let completed = store.complete(&held, held_token, b"result", TTL).await;
        assert!(is_full(&completed), "{completed:?}");
        let renewed = store.renew(&held, held_token, lease()).await;
        assert!(is_full(&renewed), "{renewed:?}");
        let released = store.release(&held, held_token).await;
        assert!(is_full(&released), "{released:?}");
        assert!(matches!(
            store.inspect(&held).await,
            Ok(Some(KeyState::Held { token, .. })) if token == held_token
        ));
        // An operator's removal cannot be written either: the key keeps
        // its result.
        let removed = store.remove(&done).await;
        assert!(is_full(&removed), "{removed:?}");
        assert_replays(&store, &done, b"stored").await;
        // Every failed batch was cut back off the log.
        assert_eq!(store.stats().bytes, log_before, "durable {durable}");

        // Space comes back: no restart needed.
        store.inject_faults(FaultPoint::Write, 0, FaultError::Os(ENOSPC));
        let fresh_token = acquire(&store, &fresh).await;
        assert!(fresh_token > held_token);
        store
            .complete(&held, held_token, b"result", TTL)
            .await
            .expect("the holder's retried completion");
        drop(store);

        let store = EmbeddedStore::open_dir(dir.path()).expect("reopen");
        assert_eq!(store.stats().truncated_on_open, 0);
        assert_replays(&store, &done, b"stored").await;
        assert_replays(&store, &held, b"result").await;
        assert_in_flight(&store, &fresh).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_the_full_disk_refuses_lapses_and_locks_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let k = key("never-recorded");
    let token = {
        let store = EmbeddedStore::open_dir(dir.path()).expect("open");
        let token = acquire(&store, &k).await;
        store.inject_faults(FaultPoint::Write, UNTIL_CLEARED, FaultError::Os(ENOSPC));
        // The engine retries the completion; the disk stays full.
        for _ in 0..3 {
            let r = store.complete(&k, token, b"lost", TTL).await;
            assert!(is_full(&r), "{r:?}");
        }
        store.advance_clock(HOLD + Duration::from_secs(1));
        // The claim lapsed with its outcome unrecorded: the key is locked,
        // and the late completion is fenced even once space is back.
        store.inject_faults(FaultPoint::Write, 0, FaultError::Os(ENOSPC));
        assert!(matches!(
            store.claim(&k, fp(), Lease::freeing(HOLD)).await,
            Ok(Claim::Abandoned { .. })
        ));
        assert!(matches!(
            store.complete(&k, token, b"late", TTL).await,
            Err(StoreError::Fenced)
        ));
        token
    };
    // So it is after a restart (the claim's record holds its lease).
    let store = EmbeddedStore::open_dir(dir.path()).expect("reopen");
    store.advance_clock(HOLD + Duration::from_secs(1));
    assert!(matches!(
        store.inspect(&k).await,
        Ok(Some(KeyState::Abandoned { token: t, .. })) if t == token
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_or_quota_failure_is_a_full_disk_too_and_other_errors_are_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open_dir(dir.path()).expect("open");
    // Some filesystems report the lack of space only when syncing.
    store.inject_faults(FaultPoint::Sync, 1, FaultError::Os(ENOSPC));
    let r = store.claim(&key("a"), fp(), lease()).await;
    assert!(is_full(&r), "{r:?}");
    assert_eq!(store.faults_left(FaultPoint::Sync), 0);
    acquire(&store, &key("a")).await;
    if cfg!(target_os = "linux") {
        store.inject_faults(FaultPoint::Write, 1, FaultError::Os(EDQUOT));
        let r = store.claim(&key("b"), fp(), lease()).await;
        assert!(is_full(&r), "quota: {r:?}");
    }
    store.inject_faults(
        FaultPoint::Write,
        1,
        FaultError::Kind(std::io::ErrorKind::StorageFull),
    );
    let r = store.claim(&key("b"), fp(), lease()).await;
    assert!(is_full(&r), "{r:?}");
    // An I/O error is not a full disk: the store is unavailable.
    store.inject_faults(FaultPoint::Write, 1, FaultError::Os(5));
    let r = store.claim(&key("b"), fp(), lease()).await;
    assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
    acquire(&store, &key("b")).await;
    assert_eq!(store.stats().entries, 2);
}
