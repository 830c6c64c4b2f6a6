//! The embedded store's leases across restarts: a claim whose holder died
//! (`kill -9` of a child process, or a store dropped mid-request) is read
//! back with its lease and locks its key once the lease lapses; renewals
//! and removals are logged; compaction carries abandoned claims until
//! their lock ends. The store's clock is moved with its test hook
//! (`advance_clock`), so no test waits for a lease to run out.

#![cfg(feature = "embedded")]

#[path = "support/kill9.rs"]
mod kill9;

use std::sync::Arc;
use std::time::Duration;

use keel_idempotency::embedded::{EmbeddedConfig, EmbeddedStore};
use keel_idempotency::engine::{Begin, Engine, KeyLookup, Policy};
use keel_idempotency::store::{
    Claim, FencingToken, Fingerprint, KeyState, Lease, Store, StoreError, StoreKey,
};

const HOLD: Duration = Duration::from_secs(30);
const LOCK: Duration = Duration::from_secs(3600);
const SECOND: Duration = Duration::from_secs(1);

fn key(k: &str) -> StoreKey {
    StoreKey::new(k).expect("valid")
}

fn fp(n: u8) -> Fingerprint {
    Fingerprint::from_bytes([n; 32])
}

fn locking() -> Lease {
    Lease::locking(HOLD, LOCK)
}

fn freeing() -> Lease {
    Lease::freeing(HOLD)
}

async fn acquire(store: &EmbeddedStore, k: &StoreKey, lease: Lease) -> FencingToken {
    match store.claim(k, fp(1), lease).await {
        Ok(Claim::Acquired { token }) => token,
        other => panic!("{k} should be free, got {other:?}"),
    }
}

async fn held_token(store: &EmbeddedStore, k: &StoreKey) -> FencingToken {
    match store.inspect(k).await {
        Ok(Some(KeyState::Held { token, .. })) => token,
        other => panic!("{k} should be held, got {other:?}"),
    }
}

async fn assert_abandoned(store: &EmbeddedStore, k: &StoreKey, token: FencingToken) {
    for lease in [locking(), freeing()] {
        match store.claim(k, fp(2), lease).await {
            Ok(Claim::Abandoned { fingerprint }) => assert_eq!(fingerprint, fp(1), "{k}"),
            other => panic!("{k} should be abandoned, got {other:?}"),
        }
    }
    match store.inspect(k).await {
        Ok(Some(KeyState::Abandoned {
            fingerprint,
            token: t,
            expires_in,
        })) => {
            assert_eq!((fingerprint, t), (fp(1), token), "{k}");
            assert!(expires_in <= LOCK, "{k}: locked for {expires_in:?}");
        }
        other => panic!("{k} should inspect as abandoned, got {other:?}"),
    }
}

const CHILD_DIR: &str = "KEEL_IDEM_LEASE_CRASH_DIR";

fn request() -> http::Request<()> {
    http::Request::post("/payments")
        .header("authorization", "Bearer alice")
        .header("idempotency-key", "held-at-crash")
        .header("x-request-id", "req-held")
        .body(())
        .expect("request")
}

fn lookup() -> KeyLookup<'static> {
    KeyLookup {
        tenant: Some(b"Bearer alice"),
        method: &http::Method::POST,
        path: "/payments",
        key: "held-at-crash",
    }
}

/// The child half of `a_claim_held_at_kill_9_locks_its_key_after_restart`:
/// starts a request through the engine (durable claims, the default), takes
/// a freeing claim on another key, prints both tokens and waits to be
/// killed with both claims held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by a_claim_held_at_kill_9_locks_its_key_after_restart as a child process"]
async fn lease_holder_child() {
    let dir = std::env::var(CHILD_DIR).expect("run by the parent test");
    let store = EmbeddedStore::open_dir(&dir).expect("open");
    let engine = Engine::new(Arc::new(store.clone()), Policy::default());
    let Begin::Execute(mut guard) = engine.begin(&request(), b"amount=5").await else {
        panic!("fresh key must execute");
    };
    guard.mark_started();
    let held = guard.token().expect("a held claim");
    let free = acquire(&store, &key("free-at-crash"), freeing()).await;
    println!("HELD {} {}", held.get(), free.get());
    tokio::time::sleep(Duration::from_secs(600)).await;
    drop(guard);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_held_at_kill_9_locks_its_key_after_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    // SIGKILL while both claims are held: no destructor, no release.
    let line = kill9::run_until_then_kill("lease_holder_child", CHILD_DIR, dir.path(), "HELD ")
        .await
        .expect("the child did not take its claims");
    let tokens: Vec<u64> = line
        .split_whitespace()
        .map(|t| t.parse().expect("a token"))
        .collect();
    let (held, free) = (FencingToken::new(tokens[0]), FencingToken::new(tokens[1]));

    let store = EmbeddedStore::open_dir(dir.path()).expect("reopen");
    let policy = Policy::default();
    let engine = Engine::new(Arc::new(store.clone()), policy.clone());
    // Read back as it was: held by the dead request, until its lease ends.
    let status = engine.key_status(&lookup()).await.expect("status");
    assert_eq!(
        (status.state, status.token),
        ("in_flight", Some(held.get()))
    );
    assert_eq!(held_token(&store, &key("free-at-crash")).await, free);

    store.advance_clock(policy.lease() + SECOND);
    // The lease lapsed with no outcome recorded: the request may have run,
    // so the key is locked, not run again.
    let status = engine.key_status(&lookup()).await.expect("status");
    assert_eq!(
        (status.state, status.token),
        ("abandoned", Some(held.get()))
    );
    let Begin::Reject(r) = engine.begin(&request(), b"amount=5").await else {
        panic!("a retry after the restart must not execute");
    };
    assert_eq!(r.status(), 409);
    let problem: serde_json::Value = serde_json::from_slice(r.body()).expect("problem+json");
    assert_eq!(
        problem["type"],
        "urn:keel:problem:idempotency-outcome-unknown"
    );
    // The freeing claim freed its key: taken over with a higher token.
    let again = acquire(&store, &key("free-at-crash"), freeing()).await;
    assert!(again > free && again > held, "{again:?}");

    // The operator reconciles the locked key and removes it; the removal
    // outlives another restart and tokens go on increasing.
    assert!(engine.remove_key(&lookup()).await.expect("remove"));
    drop(engine);
    drop(store);
    let store = EmbeddedStore::open_dir(dir.path()).expect("reopen again");
    let engine = Engine::new(Arc::new(store.clone()), Policy::default());
    assert_eq!(
        engine.key_status(&lookup()).await.expect("status").state,
        "free"
    );
    let Begin::Execute(guard) = engine.begin(&request(), b"amount=5").await else {
        panic!("a removed key runs again");
    };
    assert!(guard.token().expect("held") > again);
    guard.release().await.expect("release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_left_held_by_a_dropped_store_lapses_by_its_lease_after_reopen() {
    for durable in [true, false] {
        let dir = tempfile::tempdir().expect("tempdir");
        let (locked, freed) = (key("locked"), key("freed"));
        let (tl, tf) = {
            let store = EmbeddedStore::open_dir(dir.path())
                .expect("open")
                .durable_claims(durable);
            (
                acquire(&store, &locked, locking()).await,
                acquire(&store, &freed, freeing()).await,
            )
            // Dropped with both claims held, as a process that stops.
        };
        let store = EmbeddedStore::open_dir(dir.path()).expect("reopen");
        assert_eq!(held_token(&store, &locked).await, tl, "durable {durable}");
        assert_eq!(held_token(&store, &freed).await, tf, "durable {durable}");
        assert!(matches!(
            store.claim(&locked, fp(1), locking()).await,
            Ok(Claim::InFlight { retry_after, .. }) if retry_after <= HOLD
        ));
        // The holder is gone; nobody renews, completes or releases.
        store.advance_clock(HOLD + SECOND);
        assert_abandoned(&store, &locked, tl).await;
        let again = acquire(&store, &freed, locking()).await;
        assert!(again > tl && again > tf, "durable {durable}: {again:?}");
        // The lock ends by itself.
        store.advance_clock(LOCK);
        assert!(acquire(&store, &locked, freeing()).await > again);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_are_logged_and_survive_a_restart() {
    for durable in [true, false] {
        let dir = tempfile::tempdir().expect("tempdir");
        let k = key("renewed");
        let lease = Lease::locking(Duration::from_secs(10), LOCK);
        let token = {
            let store = EmbeddedStore::open_dir(dir.path())
                .expect("open")
                .durable_claims(durable);
            let token = acquire(&store, &k, lease).await;
            store.advance_clock(Duration::from_secs(8));
            store.renew(&k, token, lease).await.expect("renew");
            token
        };
        // The renewal's deadlines are what the log holds: 18 s from the
        // claim on the old store's clock, not the first lease's 10 s.
        let store = EmbeddedStore::open_dir(dir.path()).expect("reopen");
        match store.inspect(&k).await {
            Ok(Some(KeyState::Held {
                token: t,
                lease_left,
                ..
            })) => {
                assert_eq!(t, token);
                assert!(
                    lease_left > Duration::from_secs(10) && lease_left <= Duration::from_secs(18),
                    "durable {durable}: {lease_left:?}"
                );
            }
            other => panic!("durable {durable}: expected Held, got {other:?}"),
        }
        // The holder died with the old store: its late renewal after the
        // restart is refused once the lease lapsed.
        store.advance_clock(Duration::from_secs(19));
        assert!(matches!(
            store.renew(&k, token, lease).await,
            Err(StoreError::Fenced)
        ));
        assert_abandoned(&store, &k, token).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_racing_its_completion_cannot_outlive_the_result() {
    let dir = tempfile::tempdir().expect("tempdir");
    let k = key("raced");
    {
        let store = EmbeddedStore::open_dir(dir.path()).expect("open");
        let token = acquire(&store, &k, locking()).await;
        // The completion is queued first (join! polls in order); the
        // renewal that follows it is fenced, so no claim record can follow
        // the result in the log.
        let (completed, renewed) = tokio::join!(
            store.complete(&k, token, b"result", LOCK),
            store.renew(&k, token, locking()),
        );
        completed.expect("complete");
        assert!(matches!(renewed, Err(StoreError::Fenced)), "{renewed:?}");
    }
    let store = EmbeddedStore::open_dir(dir.path()).expect("reopen");
    assert!(matches!(
        store.claim(&k, fp(1), locking()).await,
        Ok(Claim::Completed { payload, .. }) if payload == b"result"
    ));
}

fn small_segments() -> EmbeddedConfig {
    EmbeddedConfig::default().segment_bytes(4096)
}

/// Claims and releases `n` keys: dead records enough to make compaction
/// move what is live.
async fn churn(store: &EmbeddedStore, n: usize) -> FencingToken {
    let mut last = FencingToken::new(0);
    for i in 0..n {
        let k = key(&format!("churn-{i}"));
        last = acquire(store, &k, freeing()).await;
        store.release(&k, last).await.expect("release");
    }
    // The purge waits for the compaction the writes started.
    store.purge_expired().await.expect("purge");
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_keeps_abandoned_claims_until_their_lock_ends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let k = key("abandoned");
    let token = {
        let store = EmbeddedStore::open_dir_with(dir.path(), small_segments()).expect("open");
        let token = acquire(&store, &k, Lease::locking(SECOND, LOCK)).await;
        store.advance_clock(2 * SECOND);
        assert_abandoned(&store, &k, token).await;
        churn(&store, 400).await;
        let stats = store.stats();
        assert!(stats.segments <= 3, "dead segments were kept: {stats:?}");
        assert_eq!(stats.entries, 1);
        // Purged it is not: its lock has not ended.
        assert_abandoned(&store, &k, token).await;
        token
    };
    let store = EmbeddedStore::open_dir_with(dir.path(), small_segments()).expect("reopen");
    store.advance_clock(2 * SECOND);
    assert_abandoned(&store, &k, token).await;
    // Once the lock ends, a purge drops it and compaction lets it go.
    store.advance_clock(LOCK);
    assert_eq!(store.purge_expired().await.expect("purge"), 1);
    let last = churn(&store, 400).await;
    assert_eq!(store.stats().entries, 0);
    drop(store);
    let store = EmbeddedStore::open_dir_with(dir.path(), small_segments()).expect("reopen");
    assert!(matches!(store.inspect(&k).await, Ok(None)));
    assert!(acquire(&store, &k, freeing()).await > last);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removals_survive_restart_and_compaction_with_tokens_increasing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (held, done, lapsed) = (key("held"), key("done"), key("lapsed"));
    let highest = {
        let store = EmbeddedStore::open_dir_with(dir.path(), small_segments()).expect("open");
        let th = acquire(&store, &held, locking()).await;
        let td = acquire(&store, &done, locking()).await;
        store
            .complete(&done, td, b"result", LOCK)
            .await
            .expect("complete");
        let tl = acquire(&store, &lapsed, Lease::locking(SECOND, LOCK)).await;
        store.advance_clock(2 * SECOND);
        for k in [&held, &done, &lapsed] {
            assert!(store.remove(k).await.expect("remove"), "{k}");
            assert!(!store.remove(k).await.expect("remove again"), "{k}");
        }
        // The removed holder stays fenced.
        assert!(matches!(
            store.complete(&held, th, b"late", LOCK).await,
            Err(StoreError::Fenced)
        ));
        assert!(tl > td && td > th);
        tl
    };
    // Once after a plain restart, once after compaction dropped the
    // removal records with the records they removed (and the churn's
    // records, which carried the highest tokens: the segment headers keep
    // the counter).
    let mut highest = highest;
    for round in 0..2 {
        let store = EmbeddedStore::open_dir_with(dir.path(), small_segments()).expect("reopen");
        for k in [&held, &done, &lapsed] {
            assert!(
                matches!(store.inspect(k).await, Ok(None)),
                "round {round}: {k} is free"
            );
        }
        let last = churn(&store, 400).await;
        assert!(last > highest, "round {round}: {last:?}");
        highest = last;
        let stats = store.stats();
        assert!(stats.segments <= 3, "round {round}: {stats:?}");
        assert_eq!(stats.entries, 0, "round {round}");
    }
    let store = EmbeddedStore::open_dir_with(dir.path(), small_segments()).expect("reopen");
    for k in [&held, &done, &lapsed] {
        let t = acquire(&store, k, locking()).await;
        assert!(t > highest, "{k}: {t:?} must exceed {highest:?}");
    }
}
