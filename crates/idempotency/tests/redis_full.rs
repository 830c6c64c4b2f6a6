//! The Redis store on a Redis of the test's own that reaches `maxmemory`
//! (under `noeviction`): new claims and results are refused as
//! [`StoreError::Full`], while everything already stored keeps answering.
//! The shared Redis is never reconfigured: this one is started for the test
//! (see `keel_testkit::redis_server`) and killed after it.
//!
//! Skips (with the reason printed) when `redis-server` is not installed,
//! unless `CI=true`, where that is a failure.

#![cfg(feature = "redis")]

use std::time::Duration;

use keel_idempotency::redis::{RedisOptions, RedisStore};
use keel_idempotency::store::{Claim, Fingerprint, KeyState, Lease, Store, StoreError, StoreKey};
use keel_testkit::redis_server::Server;

const LONG: Duration = Duration::from_secs(60);

fn key(s: &str) -> StoreKey {
    StoreKey::new(s).expect("valid key")
}

#[test]
fn a_redis_at_maxmemory_is_full_for_new_claims_and_still_replays_results() {
    let Some(server) = Server::start() else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let store = RedisStore::connect(
            &server.url(),
            RedisOptions::default()
                .prefix("full")
                .op_timeout(Duration::from_secs(2)),
        )
        .await
        .expect("connect");
        let fp = Fingerprint::from_bytes([1; 32]);
        let (done, held, fresh) = (key("done"), key("held"), key("fresh"));
        let Claim::Acquired { token } = store
            .claim(&done, fp, Lease::locking(LONG, LONG))
            .await
            .expect("claim")
        else {
            panic!("fresh key");
        };
        store
            .complete(&done, token, b"kept", LONG)
            .await
            .expect("complete");
        let Claim::Acquired { token: held_token } = store
            .claim(&held, fp, Lease::locking(LONG, LONG))
            .await
            .expect("claim")
        else {
            panic!("fresh key");
        };

        // Any write now goes over the limit.
        assert_eq!(
            server
                .cli(&["CONFIG", "SET", "maxmemory-policy", "noeviction"])
                .trim(),
            "OK"
        );
        assert_eq!(
            server.cli(&["CONFIG", "SET", "maxmemory", "1"]).trim(),
            "OK"
        );

        let got = store.claim(&fresh, fp, Lease::locking(LONG, LONG)).await;
        assert!(
            matches!(got, Err(StoreError::Full(_))),
            "new claim: {got:?}"
        );
        let got = store.complete(&held, held_token, b"late", LONG).await;
        assert!(
            matches!(got, Err(StoreError::Full(_))),
            "new result: {got:?}"
        );
        let got = store
            .renew(&held, held_token, Lease::locking(LONG, LONG))
            .await;
        assert!(matches!(got, Err(StoreError::Full(_))), "renewal: {got:?}");
        // What is stored still answers: the result replays, the claim is
        // still held (its refused completion changed nothing).
        match store.claim(&done, fp, Lease::freeing(LONG)).await {
            Ok(Claim::Completed { payload, .. }) => assert_eq!(payload, b"kept"),
            other => panic!("replay while full: {other:?}"),
        }
        assert!(matches!(
            store.claim(&held, fp, Lease::freeing(LONG)).await,
            Ok(Claim::InFlight { .. })
        ));
        assert!(matches!(
            store.inspect(&held).await,
            Ok(Some(KeyState::Held { token, .. })) if token == held_token
        ));
        assert_eq!(store.inspect(&fresh).await.expect("inspect"), None);

        // Room again: the refused key is claimed as if nothing happened,
        // and the held claim completes.
        assert_eq!(
            server.cli(&["CONFIG", "SET", "maxmemory", "0"]).trim(),
            "OK"
        );
        assert!(matches!(
            store.claim(&fresh, fp, Lease::locking(LONG, LONG)).await,
            Ok(Claim::Acquired { .. })
        ));
        store
            .complete(&held, held_token, b"done", LONG)
            .await
            .expect("complete once there is room");
    });
}
