//! The Redis store against a real Redis (`KEEL_TEST_REDIS_URL`): the
//! conformance suite, two instances sharing the server, fencing across
//! expiry, the server going away and coming back, and round trips counted
//! on the server with `MONITOR`.
//!
//! Every test writes under a prefix of its own and deletes its keys at the
//! end, so it can share the server with other tests and other people.

#![cfg(feature = "redis")]

mod common;
mod net_support;

use std::time::Duration;

use keel_idempotency::conformance;
use keel_idempotency::redis::{RedisOptions, RedisStore, SetupError};
use keel_idempotency::store::{
    Claim, FencingToken, Fingerprint, Lease, Store, StoreError, StoreKey,
};
use net_support::{Mode, Proxy};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const LONG: Duration = Duration::from_secs(60);

/// Generous timeout: these tests check behaviour, not speed, on a busy
/// shared machine; the outage test sets its own short one.
fn options(prefix: &str) -> RedisOptions {
    RedisOptions::default()
        .prefix(prefix)
        .op_timeout(Duration::from_secs(2))
}

async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis")
}

/// Deletes every key under `prefix:`.
async fn cleanup(url: &str, prefix: &str) {
    let mut conn = raw(url).await;
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .expect("scan");
        if !keys.is_empty() {
            let _: i64 = redis::cmd("DEL")
                .arg(&keys)
                .query_async(&mut conn)
                .await
                .expect("del");
        }
        if next == 0 {
            return;
        }
        cursor = next;
    }
}

fn key(s: &str) -> StoreKey {
    StoreKey::new(s).expect("valid key")
}

async fn acquire(store: &RedisStore, k: &StoreKey, lease: Duration) -> FencingToken {
    match store
        .claim(k, Fingerprint([1; 32]), Lease::freeing(lease))
        .await
    {
        Ok(Claim::Acquired { token }) => token,
        other => panic!("expected Acquired, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_the_conformance_suite() {
    let Some(url) = keel_testkit::service_url(keel_testkit::REDIS) else {
        return;
    };
    let prefix = conformance::unique_prefix();
    let store = RedisStore::connect(&url, options(&prefix).connections(2))
        .await
        .expect("connect");
    conformance::run(&store).await;
    cleanup(&url, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_the_suite_through_an_existing_connection_manager() {
    let Some(url) = keel_testkit::service_url(keel_testkit::REDIS) else {
        return;
    };
    let prefix = conformance::unique_prefix();
    let client = redis::Client::open(url.as_str()).expect("url");
    let manager = redis::aio::ConnectionManager::new(client)
        .await
        .expect("manager");
    let store = RedisStore::from_manager(manager, options(&prefix))
        .await
        .expect("store");
    conformance::run(&store).await;
    cleanup(&url, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_sharing_redis_elect_one_winner_per_key() {
    let Some(url) = keel_testkit::service_url(keel_testkit::REDIS) else {
        return;
    };
    let prefix = conformance::unique_prefix();
    // Two separately connected stores: two engine instances on one Redis.
    let a = RedisStore::connect(&url, options(&prefix))
        .await
        .expect("a");
    let b = RedisStore::connect(&url, options(&prefix))
        .await
        .expect("b");
    conformance::run_shared(&a, &b).await;
    cleanup(&url, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_use_native_expiry_and_cluster_safe_keys() {
    let Some(url) = keel_testkit::service_url(keel_testkit::REDIS) else {
        return;
    };
    let prefix = conformance::unique_prefix();
    let store = RedisStore::connect(&url, options(&prefix))
        .await
        .expect("connect");
    let mut conn = raw(&url).await;
    let k = key("t1:POST:/orders:{odd}key");
    let rec = store.record_key(&k);
    assert_eq!(rec, format!("{prefix}:{{t1:POST:/orders:%7Bodd%7Dkey}}"));

    let token = acquire(&store, &k, LONG).await;
    let pttl: i64 = redis::cmd("PTTL")
        .arg(&rec)
        .query_async(&mut conn)
        .await
        .expect("pttl");
    assert!(
        pttl > 0 && pttl <= 60_000,
        "lease is the record's PX: {pttl}"
    );
    let fence_pttl: i64 = redis::cmd("PTTL")
        .arg(format!("{rec}:fence"))
        .query_async(&mut conn)
        .await
        .expect("pttl");
    assert!(fence_pttl > pttl, "the fence outlives the record");

    store
        .complete(&k, token, b"done", Duration::from_secs(86_400))
        .await
        .expect("complete");
    let pttl: i64 = redis::cmd("PTTL")
        .arg(&rec)
        .query_async(&mut conn)
        .await
        .expect("pttl");
    assert!(
        pttl > 60_000 && pttl <= 86_400_000,
        "completed record keeps the TTL: {pttl}"
    );

    // Absurd durations are capped (ten years), not turned into a Redis error.
    let huge = key("huge-lease");
    let token = acquire(&store, &huge, Duration::MAX).await;
    let pttl: i64 = redis::cmd("PTTL")
        .arg(store.record_key(&huge))
        .query_async(&mut conn)
        .await
        .expect("pttl");
    assert!(pttl > 300_000_000_000, "capped at ten years: {pttl}");
    store
        .complete(&huge, token, b"x", Duration::MAX)
        .await
        .expect("complete with a huge TTL");
    cleanup(&url, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_increase_across_release_expiry_and_a_lost_fence() {
    let Some(url) = keel_testkit::service_url(keel_testkit::REDIS) else {
        return;
    };
    let prefix = conformance::unique_prefix();
    let store = RedisStore::connect(&url, options(&prefix))
        .await
        .expect("connect");
    let mut conn = raw(&url).await;
    let k = key("tokens");
    let mut last = acquire(&store, &k, LONG).await;
    for round in 0..5 {
        // Released.
        store.release(&k, last).await.expect("release");
        let t = acquire(&store, &k, Duration::from_millis(30)).await;
        assert!(t > last, "round {round}: after release {t:?} > {last:?}");
        // Expired.
        tokio::time::sleep(Duration::from_millis(60)).await;
        let t2 = acquire(&store, &k, LONG).await;
        assert!(t2 > t, "round {round}: after expiry {t2:?} > {t:?}");
        assert!(matches!(
            store.complete(&k, t, b"stale", LONG).await,
            Err(StoreError::Fenced)
        ));
        // The fence counter evicted (maxmemory) or expired: the server
        // clock still moves tokens forward.
        let _: i64 = redis::cmd("DEL")
            .arg(format!("{}:fence", store.record_key(&k)))
            .query_async(&mut conn)
            .await
            .expect("del fence");
        store.release(&k, t2).await.expect("release");
        let t3 = acquire(&store, &k, LONG).await;
        assert!(t3 > t2, "round {round}: after a lost fence {t3:?} > {t2:?}");
        last = t3;
    }
    cleanup(&url, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefixes_isolate_stores_and_foreign_data_is_corrupt() {
    let Some(url) = keel_testkit::service_url(keel_testkit::REDIS) else {
        return;
    };
    let p1 = conformance::unique_prefix();
    let p2 = conformance::unique_prefix();
    let s1 = RedisStore::connect(&url, options(&p1)).await.expect("s1");
    let s2 = RedisStore::connect(&url, options(&p2)).await.expect("s2");
    let k = key("same-key");
    acquire(&s1, &k, LONG).await;
    acquire(&s2, &k, LONG).await;

    let mut conn = raw(&url).await;
    let foreign = key("foreign");
    let _: () = redis::cmd("SET")
        .arg(s1.record_key(&foreign))
        .arg("not ours")
        .query_async(&mut conn)
        .await
        .expect("set");
    let got = s1
        .claim(&foreign, Fingerprint([1; 32]), Lease::freeing(LONG))
        .await;
    assert!(matches!(got, Err(StoreError::Corrupt(_))), "{got:?}");

    assert!(matches!(
        RedisStore::connect(&url, RedisOptions::default().prefix("")).await,
        Err(SetupError::InvalidPrefix(_))
    ));
    cleanup(&url, &p1).await;
    cleanup(&url, &p2).await;
}

/// Retries `claim` until the store answers, for at most ~10 s: reconnecting
/// happens in the background, so the first calls after the server is back
/// may still fail.
async fn claim_until_ok(store: &RedisStore, k: &StoreKey) -> Claim {
    for _ in 0..100 {
        match store
            .claim(k, Fingerprint([1; 32]), Lease::freeing(LONG))
            .await
        {
            Ok(c) => return c,
            Err(StoreError::Unavailable(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => panic!("unexpected {e}"),
        }
    }
    panic!("the store did not recover");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_or_hung_server_is_unavailable_fast_and_the_store_recovers() {
    let Some(url) = keel_testkit::service_url(keel_testkit::REDIS) else {
        return;
    };
    let prefix = conformance::unique_prefix();
    let proxy = Proxy::start(&net_support::host_port(&url, 6379)).await;
    let store = RedisStore::connect(
        &net_support::redirect(&url, proxy.addr()),
        RedisOptions::default()
            .prefix(&prefix)
            .op_timeout(Duration::from_millis(200)),
    )
    .await
    .expect("connect through the proxy");
    // Setup under the tight 200 ms budget may need a second try on a
    // loaded machine; the test is about what happens next.
    let Claim::Acquired { token } = claim_until_ok(&store, &key("before")).await else {
        panic!("a fresh key must be acquired");
    };

    // The guard only keeps a broken store from hanging the test; the store
    // itself must give up after its 200 ms timeout.
    let guard = Duration::from_secs(5);
    let (during, before) = (key("during"), key("before"));
    for (mode, what) in [(Mode::Down, "down"), (Mode::Blackhole, "hung")] {
        proxy.set(mode);
        for op in 0..3 {
            let claim = store.claim(&during, Fingerprint([1; 32]), Lease::freeing(LONG));
            let got = tokio::time::timeout(guard, claim)
                .await
                .unwrap_or_else(|_| panic!("claim hung while the server was {what}"));
            assert!(
                matches!(got, Err(StoreError::Unavailable(_))),
                "{what}, op {op}: {got:?}"
            );
            let complete = store.complete(&before, token, b"x", LONG);
            let got = tokio::time::timeout(guard, complete)
                .await
                .unwrap_or_else(|_| panic!("complete hung while the server was {what}"));
            assert!(
                matches!(got, Err(StoreError::Unavailable(_))),
                "{what}, op {op}: {got:?}"
            );
        }
        proxy.set(Mode::Up);
        // Back: the store reconnects by itself, and the claim made before
        // the outage is still held.
        assert!(matches!(
            claim_until_ok(&store, &key("before")).await,
            Claim::InFlight { .. }
        ));
    }
    store
        .complete(&key("before"), token, b"after", LONG)
        .await
        .expect("complete after recovery");

    // Nothing listening at all.
    let nowhere = RedisStore::lazy(
        "redis://127.0.0.1:1/",
        RedisOptions::default().op_timeout(Duration::from_millis(200)),
    )
    .expect("lazy");
    let got = tokio::time::timeout(
        guard,
        nowhere.claim(&key("x"), Fingerprint([1; 32]), Lease::freeing(LONG)),
    )
    .await
    .expect("no hang");
    assert!(matches!(got, Err(StoreError::Unavailable(_))), "{got:?}");
    assert!(matches!(
        RedisStore::connect(
            "redis://127.0.0.1:1/",
            RedisOptions::default().op_timeout(Duration::from_millis(200))
        )
        .await,
        Err(SetupError::Unavailable(_))
    ));
    cleanup(&url, &prefix).await;
}

/// Reads `MONITOR` on a raw connection and counts the commands the store's
/// own connection sent: the store writes under `prefix`, which reveals its
/// client address, and every command from that address counts (scripts'
/// inner calls show as `lua` and do not). A sentinel command marks the end.
struct Monitor {
    lines: BufReader<tokio::net::TcpStream>,
}

impl Monitor {
    async fn start(url: &str) -> Self {
        let mut stream = tokio::net::TcpStream::connect(net_support::host_port(url, 6379))
            .await
            .expect("monitor connection");
        stream.write_all(b"MONITOR\r\n").await.expect("monitor");
        let mut lines = BufReader::new(stream);
        let mut ok = String::new();
        lines.read_line(&mut ok).await.expect("monitor reply");
        assert_eq!(ok.trim_end(), "+OK", "MONITOR refused: {ok}");
        Self { lines }
    }

    /// Commands sent from the store's connection until `sentinel` shows up.
    async fn count_until(&mut self, prefix: &str, sentinel: &str) -> usize {
        let mut store_addr: Option<String> = None;
        let mut pending_lines = Vec::new();
        loop {
            let mut line = String::new();
            self.lines.read_line(&mut line).await.expect("monitor line");
            if line.contains(sentinel) {
                break;
            }
            // +<time> [<db> <addr>] "CMD" ...
            let Some(addr) = line
                .split_once('[')
                .and_then(|(_, rest)| rest.split_once(']'))
                .and_then(|(inside, _)| inside.split_whitespace().nth(1))
            else {
                continue;
            };
            if addr == "lua" {
                continue;
            }
            if store_addr.is_none() && line.contains(prefix) {
                store_addr = Some(addr.to_owned());
            }
            pending_lines.push(addr.to_owned());
        }
        let addr = store_addr.expect("saw the store's commands");
        pending_lines.iter().filter(|a| **a == addr).count()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_request_is_two_round_trips_and_replay_is_one() {
    let Some(url) = keel_testkit::service_url(keel_testkit::REDIS) else {
        return;
    };
    let prefix = conformance::unique_prefix();
    // One connection, scripts loaded at connect: what we count is the
    // steady state.
    let store = RedisStore::connect(&url, options(&prefix))
        .await
        .expect("connect");
    let mut sentinel_conn = raw(&url).await;
    let mut sentinel = async |name: &str| {
        let _: Option<String> = redis::cmd("GET")
            .arg(format!("{prefix}-sentinel-{name}"))
            .query_async(&mut sentinel_conn)
            .await
            .expect("sentinel");
        format!("{prefix}-sentinel-{name}")
    };
    const N: usize = 20;
    let keys: Vec<StoreKey> = (0..N).map(|i| key(&format!("rt-{i}"))).collect();
    let fp = Fingerprint([3; 32]);

    let mut monitor = Monitor::start(&url).await;
    for k in &keys {
        match store
            .claim(k, fp, Lease::freeing(LONG))
            .await
            .expect("claim")
        {
            Claim::Acquired { token } => store
                .complete(k, token, b"201", LONG)
                .await
                .expect("complete"),
            other => panic!("fresh key: {other:?}"),
        }
    }
    let s = sentinel("new").await;
    let new_requests = monitor.count_until(&prefix, &s).await;

    for k in &keys {
        assert!(matches!(
            store
                .claim(k, fp, Lease::freeing(LONG))
                .await
                .expect("replay"),
            Claim::Completed { .. }
        ));
    }
    let s = sentinel("replay").await;
    let replays = monitor.count_until(&prefix, &s).await;

    eprintln!(
        "redis round trips: {} per new request, {} per replay",
        new_requests as f64 / N as f64,
        replays as f64 / N as f64
    );
    assert_eq!(new_requests, 2 * N, "claim + complete, one command each");
    assert_eq!(replays, N, "a replay is one claim");
    cleanup(&url, &prefix).await;
}

/// Engine level, the cases on a real Redis: 64 concurrent requests
/// with one key run the operation once (409 mode and wait mode), and two
/// engine instances on two connections split 200 keys x 8 duplicates with
/// exactly 200 executions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engines_on_redis_execute_exactly_once() {
    let Some(url) = keel_testkit::service_url(keel_testkit::REDIS) else {
        return;
    };
    let prefix = conformance::unique_prefix();
    let store = std::sync::Arc::new(
        RedisStore::connect(&url, options(&prefix))
            .await
            .expect("store"),
    );
    common::exactly_once_64_concurrent(store.clone(), false).await;
    common::exactly_once_64_concurrent(store, true).await;
    let a = RedisStore::connect(&url, options(&prefix))
        .await
        .expect("a");
    let b = RedisStore::connect(&url, options(&prefix))
        .await
        .expect("b");
    common::cross_instance_200_keys(std::sync::Arc::new(a), std::sync::Arc::new(b)).await;
    cleanup(&url, &prefix).await;
}
