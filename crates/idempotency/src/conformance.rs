//! The conformance suite every [`Store`] must pass.
//!
//! The same checks run against the memory, embedded, Redis and PostgreSQL
//! stores, so the engine can rely on one contract. A store written by a user
//! can run them too:
//!
//! ```
//! # #[cfg(any())] // needs a real store
//! # async fn demo() {
//! let store = my_crate::MyStore::connect().await;
//! keel_idempotency::conformance::run(&store).await;
//! # }
//! ```
//!
//! Every case uses keys of its own, under a prefix unique to the run, so the
//! suite can share a Redis or PostgreSQL server with other tests running at
//! the same time. Lease and TTL cases wait on tokio's clock, so they run
//! instantly under paused time with stores that read tokio's clock, and take
//! a fraction of a second against real servers.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::store::{
    Claim, FencingToken, Fingerprint, KeyState, Lease, Store, StoreError, StoreKey,
};

/// The lease the suite uses where it waits for expiry.
pub const SHORT_LEASE: Duration = Duration::from_millis(300);

/// A lease long enough never to expire during a case.
pub const LONG_LEASE: Duration = Duration::from_secs(60);

const TTL: Duration = Duration::from_secs(600);

/// Runs every single-instance case against `store`, panicking with the
/// case's name on the first failure.
pub async fn run<S: Store + ?Sized>(store: &S) {
    let p = unique_prefix();
    claim_then_in_flight(store, &p).await;
    complete_then_replay(store, &p).await;
    wrong_token_is_fenced(store, &p).await;
    release_frees_key_with_higher_token(store, &p).await;
    complete_is_once(store, &p).await;
    keys_are_independent(store, &p).await;
    payloads_round_trip(store, &p).await;
    lease_expiry_fences_old_holder(store, &p).await;
    completed_record_expires(store, &p).await;
    concurrent_claims_one_winner(store, &p).await;
    many_keys_concurrent(store, &p).await;
    expired_lease_cannot_complete(store, &p).await;
    reclaim_records_new_fingerprint(store, &p).await;
    purge_keeps_live_records(store, &p).await;
    lapsed_locking_lease_abandons_the_key(store, &p).await;
    abandoned_lock_ends_by_itself(store, &p).await;
    renewal_keeps_the_claim_past_its_first_lease(store, &p).await;
    renewal_is_fenced(store, &p).await;
    inspect_reports_each_state(store, &p).await;
    remove_frees_every_state_and_fences(store, &p).await;
}

/// Runs the cross-instance case: two store instances `a` and `b` backed by
/// the same server, 200 keys with 8 concurrent duplicate claims each, split
/// across both; exactly 200 claims may win.
pub async fn run_shared<S: Store + ?Sized>(a: &S, b: &S) {
    let p = unique_prefix();
    let fp = fp(1);
    let keys: Vec<StoreKey> = (0..200).map(|i| key(&p, &format!("shared-{i}"))).collect();
    let mut claims = Vec::new();
    for k in &keys {
        for dup in 0..8 {
            let s = if dup % 2 == 0 { a } else { b };
            claims.push(async move { (k, s.claim(k, fp, Lease::freeing(LONG_LEASE)).await) });
        }
    }
    let results = join_all(claims).await;
    let mut winners = HashSet::new();
    for (k, r) in results {
        match r.unwrap_or_else(|e| panic!("[run_shared] claim {k} failed: {e}")) {
            Claim::Acquired { .. } => {
                assert!(winners.insert(k.clone()), "[run_shared] {k} acquired twice");
            }
            Claim::InFlight { .. } => {}
            other => panic!("[run_shared] unexpected {other:?}"),
        }
    }
    assert_eq!(
        winners.len(),
        200,
        "[run_shared] every key must be won exactly once"
    );
}

/// A prefix unique to this process and call, for keys that must not collide
/// with other tests sharing the server.
///
/// ```
/// let a = keel_idempotency::conformance::unique_prefix();
/// let b = keel_idempotency::conformance::unique_prefix();
/// assert_ne!(a, b);
/// ```
pub fn unique_prefix() -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "conf-{}-{nanos:x}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

fn key(prefix: &str, name: &str) -> StoreKey {
    StoreKey::new(format!("{prefix}:{name}")).expect("suite keys are valid")
}

fn fp(n: u8) -> Fingerprint {
    Fingerprint::from_bytes([n; 32])
}

fn locking(hold: Duration) -> Lease {
    Lease::locking(hold, TTL)
}

async fn acquire<S: Store + ?Sized>(
    store: &S,
    k: &StoreKey,
    lease: Duration,
    case: &str,
) -> FencingToken {
    match store.claim(k, fp(1), Lease::freeing(lease)).await {
        Ok(Claim::Acquired { token }) => token,
        other => panic!("[{case}] expected Acquired for {k}, got {other:?}"),
    }
}

async fn claim_then_in_flight<S: Store + ?Sized>(store: &S, p: &str) {
    let case = "claim_then_in_flight";
    let k = key(p, case);
    acquire(store, &k, LONG_LEASE, case).await;
    match store.claim(&k, fp(2), Lease::freeing(LONG_LEASE)).await {
        Ok(Claim::InFlight {
            fingerprint,
            retry_after,
        }) => {
            assert_eq!(
                fingerprint,
                fp(1),
                "[{case}] in-flight claim keeps the holder's fingerprint"
            );
            assert!(
                retry_after > Duration::ZERO && retry_after <= LONG_LEASE,
                "[{case}] retry_after {retry_after:?} must be within the lease"
            );
        }
        other => panic!("[{case}] expected InFlight, got {other:?}"),
    }
}

async fn complete_then_replay<S: Store + ?Sized>(store: &S, p: &str) {
    let case = "complete_then_replay";
    let k = key(p, case);
    let token = acquire(store, &k, LONG_LEASE, case).await;
    store
        .complete(&k, token, b"result", TTL)
        .await
        .unwrap_or_else(|e| panic!("[{case}] complete failed: {e}"));
    for _ in 0..2 {
        match store.claim(&k, fp(9), Lease::freeing(LONG_LEASE)).await {
            Ok(Claim::Completed {
                fingerprint,
                payload,
            }) => {
                assert_eq!(fingerprint, fp(1), "[{case}] stored fingerprint");
                assert_eq!(payload, b"result", "[{case}] stored payload");
            }
            other => panic!("[{case}] expected Completed, got {other:?}"),
        }
    }
}

async fn wrong_token_is_fenced<S: Store + ?Sized>(store: &S, p: &str) {
    let case = "wrong_token_is_fenced";
    let k = key(p, case);
    let token = acquire(store, &k, LONG_LEASE, case).await;
    let wrong = FencingToken::new(token.get().wrapping_add(1000));
    assert!(
        matches!(
            store.complete(&k, wrong, b"x", TTL).await,
            Err(StoreError::Fenced)
        ),
        "[{case}] complete with a foreign token must be fenced"
    );
    assert!(
        matches!(store.release(&k, wrong).await, Err(StoreError::Fenced)),
        "[{case}] release with a foreign token must be fenced"
    );
    let missing = key(p, "never-claimed");
    assert!(
        matches!(
            store.complete(&missing, token, b"x", TTL).await,
            Err(StoreError::Fenced)
        ),
        "[{case}] complete of an unclaimed key must be fenced"
    );
    // The holder is unaffected.
    store
        .complete(&k, token, b"ok", TTL)
        .await
        .unwrap_or_else(|e| panic!("[{case}] holder's complete failed: {e}"));
}

async fn release_frees_key_with_higher_token<S: Store + ?Sized>(store: &S, p: &str) {
    let case = "release_frees_key_with_higher_token";
    let k = key(p, case);
    let first = acquire(store, &k, LONG_LEASE, case).await;
    store
        .release(&k, first)
        .await
        .unwrap_or_else(|e| panic!("[{case}] release failed: {e}"));
    let second = acquire(store, &k, LONG_LEASE, case).await;
    assert!(
        second > first,
        "[{case}] token after release {second:?} must exceed {first:?}"
    );
    assert!(
        matches!(
            store.complete(&k, first, b"late", TTL).await,
            Err(StoreError::Fenced)
        ),
        "[{case}] the released token must be fenced"
    );
    assert!(
        matches!(store.release(&k, first).await, Err(StoreError::Fenced)),
        "[{case}] releasing twice must be fenced"
    );
}

async fn complete_is_once<S: Store + ?Sized>(store: &S, p: &str) {
    let case = "complete_is_once";
    let k = key(p, case);
    let token = acquire(store, &k, LONG_LEASE, case).await;
    store
        .complete(&k, token, b"first", TTL)
        .await
        .unwrap_or_else(|e| panic!("[{case}] complete failed: {e}"));
    assert!(
        matches!(
            store.complete(&k, token, b"second", TTL).await,
            Err(StoreError::Fenced)
        ),
        "[{case}] a second complete must be fenced"
    );
    assert!(
        matches!(store.release(&k, token).await, Err(StoreError::Fenced)),
        "[{case}] release after complete must be fenced"
    );
    match store.claim(&k, fp(1), Lease::freeing(LONG_LEASE)).await {
        Ok(Claim::Completed { payload, .. }) => assert_eq!(payload, b"first", "[{case}]"),
        other => panic!("[{case}] expected Completed, got {other:?}"),
    }
}

async fn keys_are_independent<S: Store + ?Sized>(store: &S, p: &str) {
    let case = "keys_are_independent";
    let a = key(p, "indep-a");
    let b = key(p, "indep-b");
    let ta = acquire(store, &a, LONG_LEASE, case).await;
    let tb = acquire(store, &b, LONG_LEASE, case).await;
    store
        .complete(&a, ta, b"A", TTL)
        .await
        .unwrap_or_else(|e| panic!("[{case}] complete a: {e}"));
    match store.claim(&b, fp(1), Lease::freeing(LONG_LEASE)).await {
        Ok(Claim::InFlight { .. }) => {}
        other => panic!("[{case}] b must still be in flight, got {other:?}"),
    }
    store
        .complete(&b, tb, b"B", TTL)
        .await
        .unwrap_or_else(|e| panic!("[{case}] complete b: {e}"));
    for (k, want) in [(&a, b"A"), (&b, b"B")] {
        match store.claim(k, fp(1), Lease::freeing(LONG_LEASE)).await {
            Ok(Claim::Completed { payload, .. }) => assert_eq!(payload, want, "[{case}]"),
            other => panic!("[{case}] expected Completed, got {other:?}"),
        }
    }
}

async fn payloads_round_trip<S: Store + ?Sized>(store: &S, p: &str) {
    let case = "payloads_round_trip";
    let all_bytes: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
    let large: Vec<u8> = (0..(1 << 20))
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    for (name, payload) in [
        ("empty", Vec::new()),
        ("all-bytes", all_bytes),
        ("1MiB", large),
    ] {
        let k = key(p, &format!("{case}-{name}"));
        let token = acquire(store, &k, LONG_LEASE, case).await;
        store
            .complete(&k, token, &payload, TTL)
            .await
            .unwrap_or_else(|e| panic!("[{case}/{name}] complete failed: {e}"));
        match store.claim(&k, fp(1), Lease::freeing(LONG_LEASE)).await {
            Ok(Claim::Completed { payload: got, .. }) => {
                assert!(
                    got == payload,
                    "[{case}/{name}] payload changed in the store"
                );
            }
            other => panic!("[{case}/{name}] expected Completed, got {other:?}"),
        }
    }
}

async fn lease_expiry_fences_old_holder<S: Store + ?Sized>(store: &S, p: &str) {
    let case = "lease_expiry_fences_old_holder";
    let k = key(p, case);
    let old = acquire(store, &k, SHORT_LEASE, case).await;
    tokio::time::sleep(SHORT_LEASE * 2).await;
    let new = acquire(store, &k, LONG_LEASE, case).await;
    assert!(
        new > old,
        "[{case}] token after expiry {new:?} must exceed {old:?}"
    );
    assert!(
        matches!(
            store.complete(&k, old, b"stale", TTL).await,
            Err(StoreError::Fenced)
        ),
        "[{case}] the expired holder's completion must be refused"
    );
    assert!(
        matches!(store.release(&k, old).await, Err(StoreError::Fenced)),
        "[{case}] the expired holder's release must be refused"
    );
    store
        .complete(&k, new, b"fresh", TTL)
        .await
        .unwrap_or_else(|e| panic!("[{case}] new holder's complete failed: {e}"));
    match store.claim(&k, fp(1), Lease::freeing(LONG_LEASE)).await {
        Ok(Claim::Completed { payload, .. }) => assert_eq!(payload, b"fresh", "[{case}]"),
        other => panic!("[{case}] expected Completed, got {other:?}"),
    }
}

async fn completed_record_expires<S: Store + ?Sized>(store: &S, p: &str) {
    let case = "completed_record_expires";
    let k = key(p, case);
    let first = acquire(store, &k, LONG_LEASE, case).await;
    store
        .complete(&k, first, b"short-lived", SHORT_LEASE)
        .await
        .unwrap_or_else(|e| panic!("[{case}] complete failed: {e}"));
    tokio::time::sleep(SHORT_LEASE * 2).await;
    let second = acquire(store, &k, LONG_LEASE, case).await;
    assert!(
        second > first,
        "[{case}] token after TTL expiry must exceed the first"
    );
}

async fn concurrent_claims_one_winner<S: Store + ?Sized>(store: &S, p: &str) {
    let case = "concurrent_claims_one_winner";
    let k = key(p, case);
    let results =
        join_all((0..64).map(|_| store.claim(&k, fp(1), Lease::freeing(LONG_LEASE)))).await;
    let mut acquired = 0;
    for r in results {
        match r {
            Ok(Claim::Acquired { .. }) => acquired += 1,
            Ok(Claim::InFlight { .. }) => {}
            other => panic!("[{case}] unexpected {other:?}"),
        }
    }
    assert_eq!(
        acquired, 1,
        "[{case}] exactly one of 64 concurrent claims may win"
    );
}

async fn many_keys_concurrent<S: Store + ?Sized>(store: &S, p: &str) {
    let case = "many_keys_concurrent";
    let keys: Vec<StoreKey> = (0..100).map(|i| key(p, &format!("{case}-{i}"))).collect();
    let claims = keys.iter().flat_map(|k| {
        (0..8).map(
            move |_| async move { (k, store.claim(k, fp(1), Lease::freeing(LONG_LEASE)).await) },
        )
    });
    let mut winners = HashSet::new();
    for (k, r) in join_all(claims).await {
        match r {
            Ok(Claim::Acquired { .. }) => {
                assert!(winners.insert(k.clone()), "[{case}] {k} won twice")
            }
            Ok(Claim::InFlight { .. }) => {}
            other => panic!("[{case}] unexpected {other:?}"),
        }
    }
    assert_eq!(
        winners.len(),
        100,
        "[{case}] every key must be won exactly once"
    );
}

async fn expired_lease_cannot_complete<S: Store + ?Sized>(store: &S, p: &str) {
    let case = "expired_lease_cannot_complete";
    let k = key(p, case);
    let token = acquire(store, &k, SHORT_LEASE, case).await;
    tokio::time::sleep(SHORT_LEASE * 2).await;
    // Nobody claimed the key again, but the lease is over: the key is no
    // longer held by this token, so a late completion is refused (the
    // engine must not assume its result was stored).
    assert!(
        matches!(
            store.complete(&k, token, b"late", TTL).await,
            Err(StoreError::Fenced)
        ),
        "[{case}] completing after the lease ran out must be fenced"
    );
    assert!(
        matches!(store.release(&k, token).await, Err(StoreError::Fenced)),
        "[{case}] releasing after the lease ran out must be fenced"
    );
    let next = acquire(store, &k, LONG_LEASE, case).await;
    assert!(next > token, "[{case}] {next:?} must exceed {token:?}");
}

async fn reclaim_records_new_fingerprint<S: Store + ?Sized>(store: &S, p: &str) {
    let case = "reclaim_records_new_fingerprint";
    let k = key(p, case);
    let first = acquire(store, &k, LONG_LEASE, case).await;
    store
        .release(&k, first)
        .await
        .unwrap_or_else(|e| panic!("[{case}] release failed: {e}"));
    let second = match store.claim(&k, fp(7), Lease::freeing(LONG_LEASE)).await {
        Ok(Claim::Acquired { token }) => token,
        other => panic!("[{case}] expected Acquired, got {other:?}"),
    };
    match store.claim(&k, fp(1), Lease::freeing(LONG_LEASE)).await {
        Ok(Claim::InFlight { fingerprint, .. }) => assert_eq!(
            fingerprint,
            fp(7),
            "[{case}] the new holder's fingerprint replaces the released one"
        ),
        other => panic!("[{case}] expected InFlight, got {other:?}"),
    }
    store
        .complete(&k, second, b"second", TTL)
        .await
        .unwrap_or_else(|e| panic!("[{case}] complete failed: {e}"));
    match store.claim(&k, fp(1), Lease::freeing(LONG_LEASE)).await {
        Ok(Claim::Completed {
            fingerprint,
            payload,
        }) => {
            assert_eq!(fingerprint, fp(7), "[{case}] completed fingerprint");
            assert_eq!(payload, b"second", "[{case}]");
        }
        other => panic!("[{case}] expected Completed, got {other:?}"),
    }
}

async fn purge_keeps_live_records<S: Store + ?Sized>(store: &S, p: &str) {
    let case = "purge_keeps_live_records";
    let held = key(p, "purge-held");
    let done = key(p, "purge-done");
    acquire(store, &held, LONG_LEASE, case).await;
    let token = acquire(store, &done, LONG_LEASE, case).await;
    store
        .complete(&done, token, b"kept", TTL)
        .await
        .unwrap_or_else(|e| panic!("[{case}] complete failed: {e}"));
    store
        .purge_expired()
        .await
        .unwrap_or_else(|e| panic!("[{case}] purge failed: {e}"));
    assert!(
        matches!(
            store.claim(&held, fp(1), Lease::freeing(LONG_LEASE)).await,
            Ok(Claim::InFlight { .. })
        ),
        "[{case}] a live claim must survive a purge"
    );
    match store.claim(&done, fp(1), Lease::freeing(LONG_LEASE)).await {
        Ok(Claim::Completed { payload, .. }) => assert_eq!(payload, b"kept", "[{case}]"),
        other => panic!("[{case}] a live result must survive a purge, got {other:?}"),
    }
}

/// Polls all futures concurrently on the current task and returns their
/// outputs in order; enough for the suite without a futures dependency.
async fn lapsed_locking_lease_abandons_the_key<S: Store + ?Sized>(store: &S, p: &str) {
    let case = "lapsed_locking_lease_abandons_the_key";
    let k = key(p, case);
    let token = match store.claim(&k, fp(1), locking(SHORT_LEASE)).await {
        Ok(Claim::Acquired { token }) => token,
        other => panic!("[{case}] expected Acquired, got {other:?}"),
    };
    tokio::time::sleep(SHORT_LEASE * 2).await;
    for attempt in 0..2 {
        match store.claim(&k, fp(1), locking(LONG_LEASE)).await {
            Ok(Claim::Abandoned { fingerprint }) => assert_eq!(fingerprint, fp(1), "[{case}]"),
            other => panic!(
                "[{case}] claim {attempt} after the lapse: expected Abandoned, got {other:?}"
            ),
        }
    }
    match store.claim(&k, fp(2), Lease::freeing(LONG_LEASE)).await {
        Ok(Claim::Abandoned { fingerprint }) => assert_eq!(fingerprint, fp(1), "[{case}]"),
        other => panic!("[{case}] a freeing claim must not take a locked key over: {other:?}"),
    }
    for (what, refused) in [
        ("renew", store.renew(&k, token, locking(LONG_LEASE)).await),
        ("complete", store.complete(&k, token, b"late", TTL).await),
        ("release", store.release(&k, token).await),
    ] {
        assert!(
            matches!(refused, Err(StoreError::Fenced)),
            "[{case}] the lapsed holder's {what} must be fenced: {refused:?}"
        );
    }
    match store.inspect(&k).await {
        Ok(Some(KeyState::Abandoned {
            fingerprint,
            token: t,
            expires_in,
        })) => {
            assert_eq!((fingerprint, t), (fp(1), token), "[{case}]");
            assert!(
                expires_in <= TTL,
                "[{case}] lock {expires_in:?} within the TTL"
            );
        }
        other => panic!("[{case}] inspect: expected Abandoned, got {other:?}"),
    }
}

async fn abandoned_lock_ends_by_itself<S: Store + ?Sized>(store: &S, p: &str) {
    let case = "abandoned_lock_ends_by_itself";
    let k = key(p, case);
    let lease = Lease::locking(SHORT_LEASE, SHORT_LEASE);
    let first = match store.claim(&k, fp(1), lease).await {
        Ok(Claim::Acquired { token }) => token,
        other => panic!("[{case}] expected Acquired, got {other:?}"),
    };
    tokio::time::sleep(SHORT_LEASE * 3).await;
    let second = acquire(store, &k, LONG_LEASE, case).await;
    assert!(second > first, "[{case}] {second:?} must exceed {first:?}");
}

async fn renewal_keeps_the_claim_past_its_first_lease<S: Store + ?Sized>(store: &S, p: &str) {
    let case = "renewal_keeps_the_claim_past_its_first_lease";
    let k = key(p, case);
    let lease = locking(SHORT_LEASE);
    let token = match store.claim(&k, fp(1), lease).await {
        Ok(Claim::Acquired { token }) => token,
        other => panic!("[{case}] expected Acquired, got {other:?}"),
    };
    // Renew at half the lease three times: 1.5 leases in all, past the
    // first lease's end, and the claim is still live.
    for round in 0..3 {
        tokio::time::sleep(SHORT_LEASE / 2).await;
        store
            .renew(&k, token, lease)
            .await
            .unwrap_or_else(|e| panic!("[{case}] renewal {round} failed: {e}"));
    }
    match store.claim(&k, fp(1), lease).await {
        Ok(Claim::InFlight { retry_after, .. }) => assert!(
            retry_after <= SHORT_LEASE,
            "[{case}] retry_after {retry_after:?} within the renewed lease"
        ),
        other => panic!("[{case}] expected InFlight, got {other:?}"),
    }
    store
        .complete(&k, token, b"done", TTL)
        .await
        .unwrap_or_else(|e| panic!("[{case}] complete after renewals failed: {e}"));
}

async fn renewal_is_fenced<S: Store + ?Sized>(store: &S, p: &str) {
    let case = "renewal_is_fenced";
    let k = key(p, case);
    let token = acquire(store, &k, LONG_LEASE, case).await;
    let foreign = FencingToken::new(token.get().wrapping_add(1000));
    assert!(
        matches!(
            store.renew(&k, foreign, locking(LONG_LEASE)).await,
            Err(StoreError::Fenced)
        ),
        "[{case}] renewal with a foreign token must be fenced"
    );
    store
        .complete(&k, token, b"done", TTL)
        .await
        .unwrap_or_else(|e| panic!("[{case}] complete failed: {e}"));
    assert!(
        matches!(
            store.renew(&k, token, locking(LONG_LEASE)).await,
            Err(StoreError::Fenced)
        ),
        "[{case}] renewal after completion must be fenced"
    );
    let free = key(p, "renewal_is_fenced-free");
    assert!(
        matches!(
            store.renew(&free, token, locking(LONG_LEASE)).await,
            Err(StoreError::Fenced)
        ),
        "[{case}] renewal of a free key must be fenced"
    );
    // A freeing lease that lapsed cannot be renewed either, even though
    // nobody took the key over.
    let lapsed = key(p, "renewal_is_fenced-lapsed");
    let t = acquire(store, &lapsed, SHORT_LEASE, case).await;
    tokio::time::sleep(SHORT_LEASE * 2).await;
    assert!(
        matches!(
            store.renew(&lapsed, t, Lease::freeing(LONG_LEASE)).await,
            Err(StoreError::Fenced)
        ),
        "[{case}] renewal after the lease lapsed must be fenced"
    );
}

async fn inspect_reports_each_state<S: Store + ?Sized>(store: &S, p: &str) {
    let case = "inspect_reports_each_state";
    let k = key(p, case);
    assert!(
        matches!(store.inspect(&k).await, Ok(None)),
        "[{case}] a fresh key is free"
    );
    let token = acquire(store, &k, LONG_LEASE, case).await;
    match store.inspect(&k).await {
        Ok(Some(KeyState::Held {
            fingerprint,
            token: t,
            lease_left,
        })) => {
            assert_eq!((fingerprint, t), (fp(1), token), "[{case}]");
            assert!(lease_left <= LONG_LEASE, "[{case}] {lease_left:?}");
        }
        other => panic!("[{case}] expected Held, got {other:?}"),
    }
    store
        .complete(&k, token, b"kept", TTL)
        .await
        .unwrap_or_else(|e| panic!("[{case}] complete failed: {e}"));
    match store.inspect(&k).await {
        Ok(Some(KeyState::Completed {
            fingerprint,
            payload,
            expires_in,
        })) => {
            assert_eq!(
                (fingerprint, payload.as_slice()),
                (fp(1), &b"kept"[..]),
                "[{case}]"
            );
            assert!(expires_in <= TTL, "[{case}] {expires_in:?}");
        }
        other => panic!("[{case}] expected Completed, got {other:?}"),
    }
}

async fn remove_frees_every_state_and_fences<S: Store + ?Sized>(store: &S, p: &str) {
    let case = "remove_frees_every_state_and_fences";
    let held = key(p, "remove-held");
    let old = acquire(store, &held, LONG_LEASE, case).await;
    assert!(
        store
            .remove(&held)
            .await
            .unwrap_or_else(|e| panic!("[{case}] remove: {e}")),
        "[{case}] removing a held key reports it was there"
    );
    let new = acquire(store, &held, LONG_LEASE, case).await;
    assert!(new > old, "[{case}] {new:?} must exceed {old:?}");
    assert!(
        matches!(
            store.complete(&held, old, b"late", TTL).await,
            Err(StoreError::Fenced)
        ),
        "[{case}] the removed holder stays fenced"
    );
    let done = key(p, "remove-completed");
    let t = acquire(store, &done, LONG_LEASE, case).await;
    store
        .complete(&done, t, b"r", TTL)
        .await
        .unwrap_or_else(|e| panic!("[{case}] complete failed: {e}"));
    assert!(
        store
            .remove(&done)
            .await
            .unwrap_or_else(|e| panic!("[{case}] remove: {e}")),
        "[{case}] removing a result reports it was there"
    );
    assert!(
        acquire(store, &done, LONG_LEASE, case).await > t,
        "[{case}] a removed result's key is free, with a higher token"
    );
    let lapsed = key(p, "remove-abandoned");
    let t = match store.claim(&lapsed, fp(1), locking(SHORT_LEASE)).await {
        Ok(Claim::Acquired { token }) => token,
        other => panic!("[{case}] expected Acquired, got {other:?}"),
    };
    tokio::time::sleep(SHORT_LEASE * 2).await;
    assert!(
        store
            .remove(&lapsed)
            .await
            .unwrap_or_else(|e| panic!("[{case}] remove: {e}")),
        "[{case}] removing an abandoned key reports it was there"
    );
    assert!(
        acquire(store, &lapsed, LONG_LEASE, case).await > t,
        "[{case}] an operator's removal frees an abandoned key"
    );
    let never = key(p, "remove-never");
    assert!(
        !store
            .remove(&never)
            .await
            .unwrap_or_else(|e| panic!("[{case}] remove: {e}")),
        "[{case}] removing a free key reports nothing was there"
    );
}

async fn join_all<F: std::future::Future>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut set = Vec::new();
    for f in futures {
        set.push(Box::pin(f));
    }
    let mut out: Vec<Option<F::Output>> = set.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (slot, fut) in out.iter_mut().zip(set.iter_mut()) {
            if slot.is_none() {
                match fut.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}
