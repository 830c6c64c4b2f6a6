//! The Redis store on a real Redis Cluster: three primaries started by the
//! test itself (see `keel_testkit::redis_server`), the conformance suite, two
//! instances sharing the cluster, keys spread over every primary with each
//! record and its fence in one slot, scripts lost on every node, a slot
//! moved to another primary under a live claim, and a primary going away.
//!
//! Skips (with the reason printed) when `redis-server` is not installed,
//! unless `CI=true`, where that is a failure.

#![cfg(feature = "redis")]

use std::time::Duration;

use keel_idempotency::conformance;
use keel_idempotency::redis::{RedisOptions, RedisStore, SetupError};
use keel_idempotency::store::{Claim, Fingerprint, KeyState, Lease, Store, StoreError, StoreKey};
use keel_testkit::redis_server::Cluster;

const LONG: Duration = Duration::from_secs(60);

/// Generous timeout: these tests check behaviour on a busy machine; the
/// outage check sets its own short one.
fn options(prefix: &str) -> RedisOptions {
    RedisOptions::default()
        .prefix(prefix)
        .op_timeout(Duration::from_secs(2))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn key(s: &str) -> StoreKey {
    StoreKey::new(s).expect("valid key")
}

/// The slot of `redis_key`, as the cluster computes it.
fn slot(cluster: &Cluster, redis_key: &str) -> u16 {
    let reply = cluster.cli(cluster.live(), &["CLUSTER", "KEYSLOT", redis_key]);
    reply
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("CLUSTER KEYSLOT answered {reply:?}"))
}

#[test]
fn passes_the_conformance_suite_on_a_three_primary_cluster_and_spreads_keys() {
    let Some(cluster) = Cluster::start() else {
        return;
    };
    let urls = cluster.urls();
    let prefix = conformance::unique_prefix();
    runtime().block_on(async {
        let store = RedisStore::connect_cluster(&urls, options(&prefix).connections(2))
            .await
            .expect("connect to the cluster");
        conformance::run(&store).await;

        // Two instances, each seeded with a different single node: each
        // discovers the whole cluster from it.
        let a = RedisStore::connect_cluster(&urls[..1], options(&prefix))
            .await
            .expect("a");
        let b = RedisStore::connect_cluster(&urls[2..], options(&prefix))
            .await
            .expect("b");
        conformance::run_shared(&a, &b).await;

        // Every node forgets the scripts (a restart, SCRIPT FLUSH): the
        // next call reloads them on every primary and goes through.
        for i in 0..3 {
            assert_eq!(cluster.cli(i, &["SCRIPT", "FLUSH"]).trim(), "OK");
        }
        for i in 0..30 {
            let k = key(&format!("after-flush-{i}"));
            let got = store
                .claim(
                    &k,
                    Fingerprint::from_bytes([1; 32]),
                    Lease::locking(LONG, LONG),
                )
                .await;
            assert!(matches!(got, Ok(Claim::Acquired { .. })), "{k}: {got:?}");
            assert!(matches!(
                store.inspect(&k).await,
                Ok(Some(KeyState::Held { .. }))
            ));
        }
    });

    // The keys really are spread: every primary holds some, none all.
    let counts = cluster.key_counts();
    let total: u64 = counts.iter().sum();
    eprintln!("keys per primary: {counts:?}");
    assert!(total >= 400, "the run left its keys: {counts:?}");
    assert!(
        counts.iter().all(|&n| n > 0 && n < total),
        "keys spread over all three primaries: {counts:?}"
    );
    // Record and fence of a key share a slot, whatever the key; different
    // keys land in many slots.
    let store_keys = ["abc", "t1:POST:/orders:{odd}key", "}{", "%7B"];
    let mut slots = std::collections::HashSet::new();
    runtime().block_on(async {
        let store = RedisStore::lazy_cluster(&urls, options(&prefix)).expect("lazy");
        for raw in store_keys {
            let rec = store.record_key(&key(raw));
            let s = slot(&cluster, &rec);
            assert_eq!(s, slot(&cluster, &format!("{rec}:fence")), "{rec}");
            slots.insert(s);
        }
    });
    assert!(slots.len() > 1, "keys hash to different slots: {slots:?}");
}

#[test]
fn a_claim_survives_its_slot_moving_to_another_primary_and_a_dead_primary_is_unavailable_fast() {
    let Some(mut cluster) = Cluster::start() else {
        return;
    };
    let urls = cluster.urls();
    let prefix = conformance::unique_prefix();
    let rt = runtime();
    let store = rt.block_on(async {
        RedisStore::connect_cluster(&urls, options(&prefix))
            .await
            .expect("connect to the cluster")
    });
    let k = key("moving");
    let rec = store.record_key(&k);
    let fence = format!("{rec}:fence");
    let Claim::Acquired { token } = rt
        .block_on(store.claim(
            &k,
            Fingerprint::from_bytes([4; 32]),
            Lease::locking(LONG, LONG),
        ))
        .expect("claim")
    else {
        panic!("fresh key");
    };

    // Move the key's slot to another primary by hand, the way
    // `redis-cli --cluster reshard` does.
    let s = slot(&cluster, &rec);
    let from = cluster.owner_of_slot(s);
    let to = (from + 1) % 3;
    let (from_id, to_id) = (cluster.node_id(from), cluster.node_id(to));
    let slot_s = s.to_string();
    cluster.cli_ok(to, &["CLUSTER", "SETSLOT", &slot_s, "IMPORTING", &from_id]);
    cluster.cli_ok(from, &["CLUSTER", "SETSLOT", &slot_s, "MIGRATING", &to_id]);
    let in_slot = cluster.cli(from, &["CLUSTER", "GETKEYSINSLOT", &slot_s, "100"]);
    let mut in_slot: Vec<&str> = in_slot.lines().map(str::trim).collect();
    in_slot.sort_unstable();
    let mut expected = vec![rec.as_str(), fence.as_str()];
    expected.sort_unstable();
    assert_eq!(in_slot, expected, "record and fence live in one slot");
    let to_port = cluster.ports()[to].to_string();
    let mut migrate = vec!["MIGRATE", "127.0.0.1", &to_port, "", "0", "5000", "KEYS"];
    migrate.extend(in_slot.iter().copied());
    cluster.cli_ok(from, &migrate);
    for i in 0..3 {
        cluster.cli_ok(i, &["CLUSTER", "SETSLOT", &slot_s, "NODE", &to_id]);
    }
    assert_eq!(cluster.owner_of_slot(s), to);

    // The store still routes to the old owner; the redirection takes it to
    // the new one, where the claim is intact.
    rt.block_on(async {
        match store.inspect(&k).await.expect("inspect after the move") {
            Some(KeyState::Held {
                fingerprint,
                token: t,
                ..
            }) => assert_eq!((fingerprint, t), (Fingerprint::from_bytes([4; 32]), token)),
            other => panic!("expected Held, got {other:?}"),
        }
        store
            .renew(&k, token, Lease::locking(LONG, LONG))
            .await
            .expect("renew after the move");
        store
            .complete(&k, token, b"moved", LONG)
            .await
            .expect("complete after the move");
        match store
            .claim(&k, Fingerprint::from_bytes([4; 32]), Lease::freeing(LONG))
            .await
        {
            Ok(Claim::Completed { payload, .. }) => assert_eq!(payload, b"moved"),
            other => panic!("expected Completed, got {other:?}"),
        }
    });

    // A primary dies: keys in its slots are unavailable, fast (within the
    // store's timeout, not a hang), never a wrong answer.
    let victim = 0;
    let dead_key = (0..10_000)
        .map(|i| key(&format!("on-victim-{i}")))
        .find(|k| cluster.owner_of_slot(slot(&cluster, &store.record_key(k))) == victim)
        .expect("some key hashes to the victim's slots");
    cluster.kill(victim);
    rt.block_on(async {
        let quick = RedisStore::lazy_cluster(
            &urls[1..],
            RedisOptions::default()
                .prefix(&prefix)
                .op_timeout(Duration::from_millis(300)),
        )
        .expect("lazy");
        for s in [&store, &quick] {
            let got = tokio::time::timeout(
                Duration::from_secs(10),
                s.claim(
                    &dead_key,
                    Fingerprint::from_bytes([1; 32]),
                    Lease::freeing(LONG),
                ),
            )
            .await
            .expect("a dead primary must not hang the store");
            assert!(matches!(got, Err(StoreError::Unavailable(_))), "{got:?}");
        }
    });
}

#[test]
fn a_cluster_with_no_node_answering_is_unavailable() {
    // Needs no Redis: nothing listens on port 1.
    runtime().block_on(async {
        let opts = || {
            RedisOptions::default()
                .prefix("nowhere")
                .op_timeout(Duration::from_millis(200))
        };
        let lazy = RedisStore::lazy_cluster(["redis://127.0.0.1:1/"], opts()).expect("lazy");
        let got = tokio::time::timeout(
            Duration::from_secs(5),
            lazy.claim(
                &key("x"),
                Fingerprint::from_bytes([1; 32]),
                Lease::freeing(LONG),
            ),
        )
        .await
        .expect("no hang");
        assert!(matches!(got, Err(StoreError::Unavailable(_))), "{got:?}");
        let eager = tokio::time::timeout(
            Duration::from_secs(5),
            RedisStore::connect_cluster(["redis://127.0.0.1:1/"], opts()),
        )
        .await
        .expect("no hang");
        assert!(
            matches!(eager, Err(SetupError::Unavailable(_))),
            "{eager:?}"
        );
        assert!(matches!(
            RedisStore::lazy_cluster(["not a url"], opts()),
            Err(SetupError::InvalidUrl(_))
        ));
        assert!(matches!(
            RedisStore::lazy_cluster(["redis://127.0.0.1:1/"], opts().prefix("{")),
            Err(SetupError::InvalidPrefix(_))
        ));
    });
}
