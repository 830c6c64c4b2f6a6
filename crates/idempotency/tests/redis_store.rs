//! The Redis store against a real Redis (`KEEL_TEST_REDIS_URL`): the
//! conformance suite, two instances sharing the server, fencing across
//! expiry and removal, the record layout (lease deadline on the server's
//! clock, record life, fence), claims written by the previous layout, the
//! server going away and coming back, and round trips counted on the
//! server with `MONITOR`.
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
    Claim, FencingToken, Fingerprint, KeyState, Lease, Store, StoreError, StoreKey,
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
        .claim(k, Fingerprint::from_bytes([1; 32]), Lease::freeing(lease))
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
        .claim(
            &foreign,
            Fingerprint::from_bytes([1; 32]),
            Lease::freeing(LONG),
        )
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
            .claim(k, Fingerprint::from_bytes([1; 32]), Lease::freeing(LONG))
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
            let claim = store.claim(
                &during,
                Fingerprint::from_bytes([1; 32]),
                Lease::freeing(LONG),
            );
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
            let renew = store.renew(&before, token, Lease::freeing(LONG));
            let got = tokio::time::timeout(guard, renew)
                .await
                .unwrap_or_else(|_| panic!("renew hung while the server was {what}"));
            assert!(
                matches!(got, Err(StoreError::Unavailable(_))),
                "{what}, op {op}: {got:?}"
            );
            let got = tokio::time::timeout(guard, store.inspect(&during))
                .await
                .unwrap_or_else(|_| panic!("inspect hung while the server was {what}"));
            assert!(
                matches!(got, Err(StoreError::Unavailable(_))),
                "{what}, op {op}: {got:?}"
            );
            let got = tokio::time::timeout(guard, store.remove(&during))
                .await
                .unwrap_or_else(|_| panic!("remove hung while the server was {what}"));
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
        nowhere.claim(
            &key("x"),
            Fingerprint::from_bytes([1; 32]),
            Lease::freeing(LONG),
        ),
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
    let fp = Fingerprint::from_bytes([3; 32]);

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

    let held: Vec<StoreKey> = (0..N).map(|i| key(&format!("rt-held-{i}"))).collect();
    let mut tokens = Vec::new();
    for k in &held {
        tokens.push(acquire(&store, k, LONG).await);
    }
    let s = sentinel("held").await;
    monitor.count_until(&prefix, &s).await;
    for (k, token) in held.iter().zip(&tokens) {
        store
            .renew(k, *token, Lease::locking(LONG, LONG))
            .await
            .expect("renew");
        assert!(matches!(
            store.inspect(k).await.expect("inspect"),
            Some(KeyState::Held { .. })
        ));
        assert!(store.remove(k).await.expect("remove"));
    }
    let s = sentinel("operator").await;
    let operator = monitor.count_until(&prefix, &s).await;

    eprintln!(
        "redis round trips: {} per new request, {} per replay",
        new_requests as f64 / N as f64,
        replays as f64 / N as f64
    );
    assert_eq!(new_requests, 2 * N, "claim + complete, one command each");
    assert_eq!(replays, N, "a replay is one claim");
    assert_eq!(
        operator,
        3 * N,
        "renew, inspect and remove, one command each"
    );
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

/// The server's clock in milliseconds, as the scripts read it.
async fn server_ms(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(conn).await.expect("time");
    secs * 1000 + micros / 1000
}

async fn get_bytes(conn: &mut redis::aio::MultiplexedConnection, k: &str) -> Vec<u8> {
    let v: Option<Vec<u8>> = redis::cmd("GET")
        .arg(k)
        .query_async(conn)
        .await
        .expect("get");
    v.unwrap_or_else(|| panic!("{k} is missing"))
}

async fn pttl(conn: &mut redis::aio::MultiplexedConnection, k: &str) -> i64 {
    redis::cmd("PTTL")
        .arg(k)
        .query_async(conn)
        .await
        .expect("pttl")
}

/// Splits a claim record `h`, fingerprint, mode, deadline `:` token.
fn claim_record(v: &[u8]) -> (u8, [u8; 32], u8, u64, u64) {
    assert_eq!(v[0], b'h', "a claim record: {v:?}");
    let fp: [u8; 32] = v[1..33].try_into().expect("fingerprint");
    let rest = std::str::from_utf8(&v[34..]).expect("ascii tail");
    let (deadline, token) = rest.split_once(':').expect("deadline:token");
    (
        v[0],
        fp,
        v[33],
        deadline.parse().expect("deadline"),
        token.parse().expect("token"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_carry_the_lease_deadline_on_the_server_clock_and_live_for_the_record_life() {
    let Some(url) = keel_testkit::service_url(keel_testkit::REDIS) else {
        return;
    };
    let prefix = conformance::unique_prefix();
    let store = RedisStore::connect(&url, options(&prefix))
        .await
        .expect("connect");
    let mut conn = raw(&url).await;
    let hold = Duration::from_secs(20);
    let lock = Duration::from_secs(100);

    // Locking: the record lives hold + lock, the fence longer still.
    let k = key("locking");
    let rec = store.record_key(&k);
    let before = server_ms(&mut conn).await;
    let Claim::Acquired { token } = store
        .claim(
            &k,
            Fingerprint::from_bytes([5; 32]),
            Lease::locking(hold, lock),
        )
        .await
        .expect("claim")
    else {
        panic!("fresh key");
    };
    let after = server_ms(&mut conn).await;
    let (_, fp, mode, deadline, t) = claim_record(&get_bytes(&mut conn, &rec).await);
    assert_eq!((fp, mode, t), ([5; 32], b'L', token.get()));
    assert!(
        (before + 20_000..=after + 20_000).contains(&deadline),
        "deadline {deadline} is the server's now + hold ({before}..{after})"
    );
    let record_pttl = pttl(&mut conn, &rec).await;
    assert!(
        record_pttl > 100_000 && record_pttl <= 120_000,
        "record life is hold + lock: {record_pttl}"
    );
    let fence_pttl = pttl(&mut conn, &format!("{rec}:fence")).await;
    assert!(fence_pttl > record_pttl, "the fence outlives the record");

    // Renewal moves the deadline and the record life, and may change the
    // lapse: renewed as freeing, the record lives the hold alone.
    store
        .renew(&k, token, Lease::freeing(Duration::from_secs(40)))
        .await
        .expect("renew");
    let (_, fp, mode, renewed, t) = claim_record(&get_bytes(&mut conn, &rec).await);
    assert_eq!((fp, mode, t), ([5; 32], b'F', token.get()));
    assert!(renewed >= deadline + 20_000 - 1, "{renewed} vs {deadline}");
    let record_pttl = pttl(&mut conn, &rec).await;
    assert!(
        record_pttl > 30_000 && record_pttl <= 40_000,
        "a freeing lease's record lives the hold: {record_pttl}"
    );
    match store.inspect(&k).await.expect("inspect") {
        Some(KeyState::Held {
            fingerprint,
            token: t,
            lease_left,
        }) => {
            assert_eq!((fingerprint, t), (Fingerprint::from_bytes([5; 32]), token));
            assert!(lease_left > Duration::from_secs(30) && lease_left <= Duration::from_secs(40));
        }
        other => panic!("expected Held, got {other:?}"),
    }

    // A lost fence is put back by the renewal, at the holder's token.
    let fence = format!("{rec}:fence");
    let _: i64 = redis::cmd("DEL")
        .arg(&fence)
        .query_async(&mut conn)
        .await
        .expect("del");
    store
        .renew(&k, token, Lease::locking(hold, lock))
        .await
        .expect("renew");
    let restored = get_bytes(&mut conn, &fence).await;
    assert_eq!(restored, token.get().to_string().into_bytes());
    assert!(pttl(&mut conn, &fence).await > pttl(&mut conn, &rec).await);
    cleanup(&url, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_key_stays_locked_until_removed_and_the_old_holder_stays_fenced() {
    let Some(url) = keel_testkit::service_url(keel_testkit::REDIS) else {
        return;
    };
    let prefix = conformance::unique_prefix();
    let a = RedisStore::connect(&url, options(&prefix))
        .await
        .expect("a");
    let b = RedisStore::connect(&url, options(&prefix))
        .await
        .expect("b");
    let mut conn = raw(&url).await;
    let k = key("abandoned");
    let short = Duration::from_millis(100);
    let Claim::Acquired { token } = a
        .claim(
            &k,
            Fingerprint::from_bytes([1; 32]),
            Lease::locking(short, LONG),
        )
        .await
        .expect("claim")
    else {
        panic!("fresh key");
    };
    // Wait for the lapse on the server's clock, with a deadline.
    let rec = a.record_key(&k);
    let (_, _, _, deadline, _) = claim_record(&get_bytes(&mut conn, &rec).await);
    let give_up = tokio::time::Instant::now() + Duration::from_secs(10);
    while server_ms(&mut conn).await < deadline {
        assert!(
            tokio::time::Instant::now() < give_up,
            "the lease never lapsed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The other instance sees the abandoned claim, whatever its own lease.
    for lease in [Lease::freeing(LONG), Lease::locking(LONG, LONG)] {
        assert_eq!(
            b.claim(&k, Fingerprint::from_bytes([2; 32]), lease)
                .await
                .expect("claim"),
            Claim::Abandoned {
                fingerprint: Fingerprint::from_bytes([1; 32])
            }
        );
    }
    match b.inspect(&k).await.expect("inspect") {
        Some(KeyState::Abandoned {
            fingerprint,
            token: t,
            expires_in,
        }) => {
            assert_eq!((fingerprint, t), (Fingerprint::from_bytes([1; 32]), token));
            assert!(expires_in > Duration::from_secs(50) && expires_in <= LONG);
        }
        other => panic!("expected Abandoned, got {other:?}"),
    }
    // The operator removes it, the fence is lost as well (evicted): the
    // server clock still gives the next claim a higher token, and the
    // vanished holder, back late, is fenced.
    assert!(b.remove(&k).await.expect("remove"));
    assert!(!b.remove(&k).await.expect("remove again"), "nothing left");
    let _: i64 = redis::cmd("DEL")
        .arg(format!("{rec}:fence"))
        .query_async(&mut conn)
        .await
        .expect("del fence");
    let next = acquire(&b, &k, LONG).await;
    assert!(next > token, "{next:?} > {token:?}");
    assert!(matches!(
        a.complete(&k, token, b"late", LONG).await,
        Err(StoreError::Fenced)
    ));
    assert!(matches!(
        a.renew(&k, token, Lease::locking(LONG, LONG)).await,
        Err(StoreError::Fenced)
    ));
    assert!(matches!(
        a.release(&k, token).await,
        Err(StoreError::Fenced)
    ));
    b.complete(&k, next, b"reconciled", LONG)
        .await
        .expect("complete");
    cleanup(&url, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_written_by_the_previous_layout_are_held_freeing_claims() {
    let Some(url) = keel_testkit::service_url(keel_testkit::REDIS) else {
        return;
    };
    let prefix = conformance::unique_prefix();
    let store = RedisStore::connect(&url, options(&prefix))
        .await
        .expect("connect");
    let mut conn = raw(&url).await;
    // What the store wrote before lapse-locking: 'f', fingerprint, token,
    // expiring with the lease.
    let write_legacy = async |conn: &mut redis::aio::MultiplexedConnection, k: &StoreKey| {
        let mut v = vec![b'f'];
        v.extend([9; 32]);
        v.extend(b"1234567");
        let _: () = redis::cmd("SET")
            .arg(store.record_key(k))
            .arg(v)
            .arg("PX")
            .arg(60_000)
            .query_async(conn)
            .await
            .expect("set");
    };
    let old = FencingToken::new(1_234_567);
    let k = key("legacy");
    write_legacy(&mut conn, &k).await;
    match store
        .claim(
            &k,
            Fingerprint::from_bytes([1; 32]),
            Lease::locking(LONG, LONG),
        )
        .await
    {
        Ok(Claim::InFlight {
            fingerprint,
            retry_after,
        }) => {
            assert_eq!(fingerprint, Fingerprint::from_bytes([9; 32]));
            assert!(retry_after > Duration::from_secs(50) && retry_after <= LONG);
        }
        other => panic!("expected InFlight, got {other:?}"),
    }
    assert!(matches!(
        store.inspect(&k).await,
        Ok(Some(KeyState::Held { token, .. })) if token == old
    ));
    assert!(matches!(
        store.complete(&k, FencingToken::new(7), b"x", LONG).await,
        Err(StoreError::Fenced)
    ));
    // Its holder, upgraded, renews and completes it.
    store
        .renew(&k, old, Lease::locking(LONG, LONG))
        .await
        .expect("renew a legacy claim");
    store
        .complete(&k, old, b"done", LONG)
        .await
        .expect("complete a legacy claim");
    assert!(matches!(
        store.claim(&k, Fingerprint::from_bytes([1; 32]), Lease::freeing(LONG)).await,
        Ok(Claim::Completed { fingerprint, payload }) if fingerprint == Fingerprint::from_bytes([9; 32]) && payload == b"done"
    ));
    // Released and removed likewise.
    let r = key("legacy-release");
    write_legacy(&mut conn, &r).await;
    store.release(&r, old).await.expect("release");
    let next = acquire(&store, &r, LONG).await;
    assert!(next > old);
    let d = key("legacy-remove");
    write_legacy(&mut conn, &d).await;
    assert!(store.remove(&d).await.expect("remove"));
    assert_eq!(store.inspect(&d).await.expect("inspect"), None);
    cleanup(&url, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_records_are_corrupt_to_inspect_and_an_operator_can_remove_them() {
    let Some(url) = keel_testkit::service_url(keel_testkit::REDIS) else {
        return;
    };
    let prefix = conformance::unique_prefix();
    let store = RedisStore::connect(&url, options(&prefix))
        .await
        .expect("connect");
    let mut conn = raw(&url).await;
    let k = key("foreign");
    let mut claim_like = vec![b'h'];
    claim_like.extend([1; 32]);
    claim_like.extend(b"Xnot-a-deadline");
    for value in [b"not ours".to_vec(), claim_like] {
        let _: () = redis::cmd("SET")
            .arg(store.record_key(&k))
            .arg(value)
            .arg("PX")
            .arg(60_000)
            .query_async(&mut conn)
            .await
            .expect("set");
        let got = store.inspect(&k).await;
        assert!(matches!(got, Err(StoreError::Corrupt(_))), "{got:?}");
        let got = store
            .claim(
                &k,
                Fingerprint::from_bytes([1; 32]),
                Lease::locking(LONG, LONG),
            )
            .await;
        assert!(matches!(got, Err(StoreError::Corrupt(_))), "{got:?}");
        assert!(matches!(
            store
                .renew(&k, FencingToken::new(1), Lease::freeing(LONG))
                .await,
            Err(StoreError::Fenced)
        ));
        assert!(store.remove(&k).await.expect("remove foreign data"));
        acquire(&store, &k, LONG).await;
        assert!(store.remove(&k).await.expect("remove the claim"));
    }
    cleanup(&url, &prefix).await;
}
