//! The memory store against the conformance suite, plus its own limits.

use std::time::Duration;

use keel_idempotency::conformance;
use keel_idempotency::memory::{MemoryConfig, MemoryStore};
use keel_idempotency::store::{Claim, Fingerprint, Store, StoreError, StoreKey};

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

const FP: Fingerprint = Fingerprint([1; 32]);
const LONG: Duration = Duration::from_secs(600);

#[tokio::test(start_paused = true)]
async fn bounded_by_entries_evicts_completed_never_live_claims() {
    let store = MemoryStore::with_config(MemoryConfig::default().shards(1).max_entries(10));
    // Five live claims and five completed records fill the store.
    for i in 0..10 {
        let Claim::Acquired { token } = store.claim(&key(i), FP, LONG).await.expect("claim") else {
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
    // More claims evict completed records, never the live ones.
    for i in 10..15 {
        assert!(matches!(
            store.claim(&key(i), FP, LONG).await,
            Ok(Claim::Acquired { .. })
        ));
        assert!(store.len() <= 10);
    }
    for i in 0..5 {
        assert!(
            matches!(
                store.claim(&key(i), FP, LONG).await,
                Ok(Claim::InFlight { .. })
            ),
            "live claim {i} was evicted"
        );
    }
    // Now the store is full of live claims: refuse rather than evict one.
    assert!(matches!(
        store.claim(&key(99), FP, LONG).await,
        Err(StoreError::Unavailable(_))
    ));
    // Expiry frees room.
    tokio::time::advance(LONG + Duration::from_secs(1)).await;
    assert!(matches!(
        store.claim(&key(99), FP, LONG).await,
        Ok(Claim::Acquired { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn bounded_by_bytes() {
    let store = MemoryStore::with_config(MemoryConfig::default().shards(1).max_bytes(64 << 10));
    let payload = vec![7u8; 16 << 10];
    for i in 0..20 {
        let Claim::Acquired { token } = store.claim(&key(i), FP, LONG).await.expect("claim") else {
            panic!("fresh key");
        };
        store
            .complete(&key(i), token, &payload, LONG)
            .await
            .expect("room is made");
        assert!(
            store.bytes() <= 64 << 10,
            "over the byte limit: {}",
            store.bytes()
        );
    }
    // The newest record is there.
    assert!(matches!(
        store.claim(&key(19), FP, LONG).await,
        Ok(Claim::Completed { .. })
    ));
    // A record bigger than the whole store is refused, and the claim stays.
    let Claim::Acquired { token } = store.claim(&key(100), FP, LONG).await.expect("claim") else {
        panic!("fresh key");
    };
    assert!(matches!(
        store
            .complete(&key(100), token, &vec![0u8; 128 << 10], LONG)
            .await,
        Err(StoreError::Unavailable(_))
    ));
    store
        .release(&key(100), token)
        .await
        .expect("the claim is still held");
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
        store.claim(&key(i), FP, lease).await.expect("claim");
    }
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(store.purge_expired().await.expect("purge"), 5);
    assert_eq!(store.len(), 5);
    assert!(store.bytes() > 0);
}
