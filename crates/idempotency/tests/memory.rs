//! The memory store against the conformance suite, plus its own limits.

use std::time::Duration;

use keel_idempotency::conformance;
use keel_idempotency::memory::{MemoryConfig, MemoryStore};
use keel_idempotency::store::{Claim, Fingerprint, Lease, Store, StoreError, StoreKey};

#[tokio::test(start_paused = true)]
async fn conformance_paused_time() {
    conformance::run(&MemoryStore::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_multi_thread_real_time() {
    conformance::run(&MemoryStore::new()).await;
}

#[tokio::test(start_paused = true)]
async fn conformance_with_one_shard() {
    conformance::run(&MemoryStore::with_config(MemoryConfig::default().shards(1))).await;
}

fn key(i: usize) -> StoreKey {
    StoreKey::new(format!("k{i}")).expect("valid")
}

const FP: Fingerprint = Fingerprint::from_bytes([1; 32]);
const LONG: Duration = Duration::from_secs(600);

#[tokio::test(start_paused = true)]
async fn bounded_by_entries_refuses_new_claims_and_evicts_nothing() {
    let store = MemoryStore::with_config(MemoryConfig::default().shards(1).max_entries(10));
    // Five live claims and five completed records fill the store.
    for i in 0..10 {
        let Claim::Acquired { token } = store
            .claim(&key(i), FP, Lease::freeing(LONG))
            .await
            .expect("claim")
        else {
            panic!("fresh key");
        };
        if i >= 5 {
            store
                .complete(&key(i), token, b"r", LONG)
                .await
                .expect("complete");
        }
    }
    assert_eq!(store.len(), 10);
    // A full store refuses the new key rather than drop a record that a
    // retry still needs.
    assert!(matches!(
        store.claim(&key(99), FP, Lease::freeing(LONG)).await,
        Err(StoreError::Full(_))
    ));
    for i in 0..10 {
        assert!(
            matches!(
                store.claim(&key(i), FP, Lease::freeing(LONG)).await,
                Ok(Claim::InFlight { .. } | Claim::Completed { .. })
            ),
            "entry {i} was dropped"
        );
    }
    // Expiry frees room.
    tokio::time::advance(LONG + Duration::from_secs(1)).await;
    assert!(matches!(
        store.claim(&key(99), FP, Lease::freeing(LONG)).await,
        Ok(Claim::Acquired { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn bounded_by_bytes() {
    let store = MemoryStore::with_config(MemoryConfig::default().shards(1).max_bytes(64 << 10));
    let payload = vec![7u8; 16 << 10];
    let mut stored = 0;
    for i in 0..20 {
        let Claim::Acquired { token } = store
            .claim(&key(i), FP, Lease::freeing(LONG))
            .await
            .expect("claim")
        else {
            panic!("fresh key");
        };
        match store.complete(&key(i), token, &payload, LONG).await {
            Ok(()) => stored += 1,
            Err(StoreError::Full(_)) => {
                store.release(&key(i), token).await.expect("still held");
            }
            Err(e) => panic!("unexpected {e}"),
        }
        assert!(
            store.bytes() <= 64 << 10,
            "over the byte limit: {}",
            store.bytes()
        );
    }
    assert_eq!(
        stored, 3,
        "three 16 KiB records and their keys fit in 64 KiB"
    );
    // The first records are all still there.
    for i in 0..3 {
        assert!(matches!(
            store.claim(&key(i), FP, Lease::freeing(LONG)).await,
            Ok(Claim::Completed { .. })
        ));
    }
}

#[tokio::test(start_paused = true)]
async fn purge_removes_only_expired() {
    let store = MemoryStore::new();
    for i in 0..10 {
        let lease = if i % 2 == 0 {
            Duration::from_secs(1)
        } else {
            LONG
        };
        store
            .claim(&key(i), FP, Lease::freeing(lease))
            .await
            .expect("claim");
    }
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(store.purge_expired().await.expect("purge"), 5);
    assert_eq!(store.len(), 5);
    assert!(store.bytes() > 0);
}
