//! The PostgreSQL store against a real server (`KEEL_TEST_POSTGRES_URL`):
//! the conformance suite, two instances sharing the database, concurrent
//! schema creation, fencing across expiry and sweeping, the server going
//! away and coming back, and round trips counted on the wire.
//!
//! Every test uses a table of its own and drops it at the end, so it can
//! share the database with other tests and other people.

#![cfg(feature = "postgres")]

mod common;
mod net_support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use keel_idempotency::conformance;
use keel_idempotency::postgres::{PostgresOptions, PostgresStore, SetupError};
use keel_idempotency::store::{
    Claim, FencingToken, Fingerprint, Lease, Store, StoreError, StoreKey,
};
use net_support::{Mode, Proxy};

const LONG: Duration = Duration::from_secs(60);

/// A table name unique to this process and call (at most 40 bytes).
fn unique_table() -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "keel_t_{}_{nanos:x}_{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

fn options(table: &str) -> PostgresOptions {
    PostgresOptions::default()
        .table(table)
        .expect("valid table")
        .op_timeout(Duration::from_secs(2))
        .pool_size(8)
}

async fn sql(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to postgres");
    tokio::spawn(conn);
    client
}

async fn drop_schema(url: &str, table: &str) {
    sql(url)
        .await
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {table}; \
             DROP SEQUENCE IF EXISTS {table}_fence_seq; \
             DROP FUNCTION IF EXISTS {table}_claim_v2(text, bytea, bigint, bigint); \
             DROP FUNCTION IF EXISTS {table}_claim(text, bytea, bigint);"
        ))
        .await
        .expect("drop test schema");
}

fn key(s: &str) -> StoreKey {
    StoreKey::new(s).expect("valid key")
}

async fn acquire(store: &PostgresStore, k: &StoreKey, lease: Duration) -> FencingToken {
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
    let Some(url) = keel_testkit::service_url(keel_testkit::POSTGRES) else {
        return;
    };
    let table = unique_table();
    let store = PostgresStore::connect(&url, options(&table)).expect("store");
    conformance::run(&store).await;
    drop_schema(&url, &table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_sharing_postgres_elect_one_winner_per_key() {
    let Some(url) = keel_testkit::service_url(keel_testkit::POSTGRES) else {
        return;
    };
    let table = unique_table();
    // Two stores with pools of their own: two engine instances on one
    // database, each also racing to create the schema.
    let a = PostgresStore::connect(&url, options(&table)).expect("a");
    let b = PostgresStore::connect(&url, options(&table)).expect("b");
    conformance::run_shared(&a, &b).await;
    drop_schema(&url, &table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_creation_is_safe_when_many_processes_start_at_once() {
    let Some(url) = keel_testkit::service_url(keel_testkit::POSTGRES) else {
        return;
    };
    let table = unique_table();
    let stores: Vec<PostgresStore> = (0..8)
        .map(|_| PostgresStore::connect(&url, options(&table).pool_size(1)).expect("store"))
        .collect();
    let mut tasks = Vec::new();
    for (i, store) in stores.iter().cloned().enumerate() {
        tasks.push(tokio::spawn(async move {
            // Half create explicitly, half on first use.
            if i % 2 == 0 {
                store.ensure_schema().await?;
            }
            store
                .claim(
                    &key("first-use"),
                    Fingerprint([1; 32]),
                    Lease::freeing(LONG),
                )
                .await
        }));
    }
    let mut acquired = 0;
    for t in tasks {
        match t.await.expect("task") {
            Ok(Claim::Acquired { .. }) => acquired += 1,
            Ok(Claim::InFlight { .. }) => {}
            other => panic!("schema race: {other:?}"),
        }
    }
    assert_eq!(acquired, 1);
    // The expiry index exists.
    let client = sql(&url).await;
    let idx = client
        .query_one(
            "SELECT count(*) FROM pg_indexes WHERE tablename = $1 AND indexdef LIKE '%(expires_at)%'",
            &[&table],
        )
        .await
        .expect("pg_indexes");
    assert_eq!(idx.get::<_, i64>(0), 1);
    drop_schema(&url, &table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_qualified_tables_and_manual_migrations_work() {
    let Some(url) = keel_testkit::service_url(keel_testkit::POSTGRES) else {
        return;
    };
    let schema = unique_table();
    let qualified = format!("{schema}.idem");
    let client = sql(&url).await;
    client
        .batch_execute(&format!("CREATE SCHEMA {schema}"))
        .await
        .expect("create schema");
    client
        .batch_execute(&PostgresStore::migration_sql(&qualified).expect("sql"))
        .await
        .expect("migration runs");
    // Running it twice is harmless.
    client
        .batch_execute(&PostgresStore::migration_sql(&qualified).expect("sql"))
        .await
        .expect("migration is idempotent");
    let store =
        PostgresStore::connect(&url, options(&qualified).create_schema(false)).expect("store");
    let k = key("in-schema");
    let token = acquire(&store, &k, LONG).await;
    store
        .complete(&k, token, b"ok", LONG)
        .await
        .expect("complete");
    let n: i64 = client
        .query_one(&format!("SELECT count(*) FROM {qualified}"), &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 1);
    client
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .expect("drop schema");

    assert!(matches!(
        PostgresOptions::default().table("idem; DROP TABLE users"),
        Err(SetupError::InvalidTable(_))
    ));
    assert!(matches!(
        PostgresOptions::default().table(&"t".repeat(41)),
        Err(SetupError::InvalidTable(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_increase_across_release_expiry_and_purge() {
    let Some(url) = keel_testkit::service_url(keel_testkit::POSTGRES) else {
        return;
    };
    let table = unique_table();
    let store = PostgresStore::connect(&url, options(&table)).expect("store");
    let k = key("tokens");
    let mut last = acquire(&store, &k, LONG).await;
    for round in 0..4 {
        store.release(&k, last).await.expect("release");
        let t = acquire(&store, &k, Duration::from_millis(30)).await;
        assert!(t > last, "round {round}: after release {t:?} > {last:?}");
        tokio::time::sleep(Duration::from_millis(60)).await;
        // The expired row is swept away entirely: the sequence still
        // remembers.
        assert!(store.purge_expired().await.expect("purge") >= 1);
        let t2 = acquire(&store, &k, LONG).await;
        assert!(
            t2 > t,
            "round {round}: after expiry and purge {t2:?} > {t:?}"
        );
        assert!(matches!(
            store.complete(&k, t, b"stale", LONG).await,
            Err(StoreError::Fenced)
        ));
        last = t2;
    }
    drop_schema(&url, &table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweeper_deletes_expired_rows_and_keeps_live_ones() {
    let Some(url) = keel_testkit::service_url(keel_testkit::POSTGRES) else {
        return;
    };
    let table = unique_table();
    let store = PostgresStore::connect(&url, options(&table)).expect("store");
    for i in 0..30 {
        let k = key(&format!("short-{i}"));
        let token = acquire(&store, &k, LONG).await;
        store
            .complete(&k, token, b"x", Duration::from_millis(20))
            .await
            .expect("complete");
    }
    acquire(&store, &key("short-lease"), Duration::from_millis(20)).await;
    let live = key("live");
    let token = acquire(&store, &live, LONG).await;
    store
        .complete(&live, token, b"keep", LONG)
        .await
        .expect("complete");

    let sweeper = store.spawn_sweeper(Duration::from_millis(50));
    let client = sql(&url).await;
    let count = format!("SELECT count(*) FROM {table}");
    let mut remaining = i64::MAX;
    for _ in 0..100 {
        remaining = client.query_one(&count, &[]).await.expect("count").get(0);
        if remaining == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sweeper.abort();
    assert_eq!(remaining, 1, "only the live record stays");
    assert!(matches!(
        store
            .claim(&live, Fingerprint([1; 32]), Lease::freeing(LONG))
            .await,
        Ok(Claim::Completed { .. })
    ));
    drop_schema(&url, &table).await;
}

async fn claim_until_ok(store: &PostgresStore, k: &StoreKey) -> Claim {
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

fn proxied(url: &str, proxy: &Proxy) -> String {
    let url = net_support::redirect(url, proxy.addr());
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}sslmode=disable")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_or_hung_server_is_unavailable_fast_and_the_store_recovers() {
    let Some(url) = keel_testkit::service_url(keel_testkit::POSTGRES) else {
        return;
    };
    let table = unique_table();
    let proxy = Proxy::start(&net_support::host_port(&url, 5432)).await;
    let store = PostgresStore::connect(
        &proxied(&url, &proxy),
        options(&table)
            .op_timeout(Duration::from_millis(300))
            .pool_size(4),
    )
    .expect("store");
    let (before, during) = (key("before"), key("during"));
    // The first connection is made through the proxy under the tight
    // 300 ms budget; on a loaded machine it may need a second try.
    let Claim::Acquired { token } = claim_until_ok(&store, &before).await else {
        panic!("a fresh key must be acquired");
    };

    let guard = Duration::from_secs(5);
    for (mode, what) in [(Mode::Down, "down"), (Mode::Blackhole, "hung")] {
        proxy.set(mode);
        for op in 0..3 {
            let got = tokio::time::timeout(
                guard,
                store.claim(&during, Fingerprint([1; 32]), Lease::freeing(LONG)),
            )
            .await
            .unwrap_or_else(|_| panic!("claim hung while the server was {what}"));
            assert!(
                matches!(got, Err(StoreError::Unavailable(_))),
                "{what}, op {op}: {got:?}"
            );
            let got = tokio::time::timeout(guard, store.complete(&before, token, b"x", LONG))
                .await
                .unwrap_or_else(|_| panic!("complete hung while the server was {what}"));
            assert!(
                matches!(got, Err(StoreError::Unavailable(_))),
                "{what}, op {op}: {got:?}"
            );
        }
        proxy.set(Mode::Up);
        assert!(matches!(
            claim_until_ok(&store, &before).await,
            Claim::InFlight { .. }
        ));
    }
    store
        .complete(&before, token, b"after", LONG)
        .await
        .expect("complete after recovery");

    // A backend killed by the server (failover, admin): the pool drops the
    // dead connection and the store carries on.
    let admin = sql(&url).await;
    let killed = admin
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE pid <> pg_backend_pid() AND query LIKE '%' || $1 || '%'",
            &[&table],
        )
        .await
        .expect("terminate our backends");
    assert!(!killed.is_empty(), "the store's connections were found");
    assert!(matches!(
        claim_until_ok(&store, &before).await,
        Claim::Completed { .. }
    ));

    // Nothing listening at all.
    let nowhere = PostgresStore::connect(
        "postgres://postgres@127.0.0.1:1/test",
        options(&table).op_timeout(Duration::from_millis(200)),
    )
    .expect("store");
    let got = tokio::time::timeout(
        guard,
        nowhere.claim(&during, Fingerprint([1; 32]), Lease::freeing(LONG)),
    )
    .await
    .expect("no hang");
    assert!(matches!(got, Err(StoreError::Unavailable(_))), "{got:?}");
    drop_schema(&url, &table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_request_is_two_round_trips_and_replay_is_one() {
    let Some(url) = keel_testkit::service_url(keel_testkit::POSTGRES) else {
        return;
    };
    let table = unique_table();
    let proxy = Proxy::start(&net_support::host_port(&url, 5432)).await;
    // One pooled connection, so that after one warm-up request its
    // statements are prepared: we count the steady state.
    let store = PostgresStore::connect(&proxied(&url, &proxy), options(&table).pool_size(1))
        .expect("store");
    let fp = Fingerprint([3; 32]);
    let warm = key("warm-up");
    let t = acquire(&store, &warm, LONG).await;
    store.complete(&warm, t, b"x", LONG).await.expect("warm-up");

    const N: u64 = 20;
    let keys: Vec<StoreKey> = (0..N).map(|i| key(&format!("rt-{i}"))).collect();
    let start = proxy.round_trips();
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
    let new_requests = proxy.round_trips() - start;
    let start = proxy.round_trips();
    for k in &keys {
        assert!(matches!(
            store
                .claim(k, fp, Lease::freeing(LONG))
                .await
                .expect("replay"),
            Claim::Completed { .. }
        ));
    }
    let replays = proxy.round_trips() - start;
    eprintln!(
        "postgres round trips: {} per new request, {} per replay",
        new_requests as f64 / N as f64,
        replays as f64 / N as f64
    );
    assert_eq!(new_requests, 2 * N, "claim + complete, one statement each");
    assert_eq!(replays, N, "a replay is one claim");
    drop_schema(&url, &table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_and_in_flight_duplicates_are_pure_reads() {
    let Some(url) = keel_testkit::service_url(keel_testkit::POSTGRES) else {
        return;
    };
    let table = unique_table();
    let store = PostgresStore::connect(&url, options(&table)).expect("store");
    let (done, held) = (key("done"), key("held"));
    let token = acquire(&store, &done, LONG).await;
    store
        .complete(&done, token, b"201", LONG)
        .await
        .expect("complete");
    acquire(&store, &held, LONG).await;

    // A write or a row lock (what `ON CONFLICT DO UPDATE ... WHERE false`
    // takes) would change the tuple's ctid or xmax.
    let client = sql(&url).await;
    let version = format!("SELECT ctid::text, xmax::text FROM {table} WHERE key = $1");
    let before_done: (String, String) = {
        let r = client
            .query_one(&version, &[&done.as_str()])
            .await
            .expect("row");
        (r.get(0), r.get(1))
    };
    let before_held: (String, String) = {
        let r = client
            .query_one(&version, &[&held.as_str()])
            .await
            .expect("row");
        (r.get(0), r.get(1))
    };
    for _ in 0..5 {
        assert!(matches!(
            store
                .claim(&done, Fingerprint([1; 32]), Lease::freeing(LONG))
                .await,
            Ok(Claim::Completed { .. })
        ));
        assert!(matches!(
            store
                .claim(&held, Fingerprint([1; 32]), Lease::freeing(LONG))
                .await,
            Ok(Claim::InFlight { .. })
        ));
    }
    let r = client
        .query_one(&version, &[&done.as_str()])
        .await
        .expect("row");
    assert_eq!((r.get::<_, String>(0), r.get::<_, String>(1)), before_done);
    let r = client
        .query_one(&version, &[&held.as_str()])
        .await
        .expect("row");
    assert_eq!((r.get::<_, String>(0), r.get::<_, String>(1)), before_held);
    drop_schema(&url, &table).await;
}

/// Engine level, the cases on a real PostgreSQL: 64 concurrent
/// requests with one key run the operation once (409 mode and wait mode),
/// and two engine instances on two pools split 200 keys x 8 duplicates with
/// exactly 200 executions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engines_on_postgres_execute_exactly_once() {
    let Some(url) = keel_testkit::service_url(keel_testkit::POSTGRES) else {
        return;
    };
    let table = unique_table();
    let store = std::sync::Arc::new(PostgresStore::connect(&url, options(&table)).expect("store"));
    common::exactly_once_64_concurrent(store.clone(), false).await;
    common::exactly_once_64_concurrent(store, true).await;
    let a = PostgresStore::connect(&url, options(&table)).expect("a");
    let b = PostgresStore::connect(&url, options(&table)).expect("b");
    common::cross_instance_200_keys(std::sync::Arc::new(a), std::sync::Arc::new(b)).await;
    drop_schema(&url, &table).await;
}
