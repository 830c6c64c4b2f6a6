//! The PostgreSQL store against a real server (`KEEL_TEST_POSTGRES_URL`):
//! the conformance suite, two instances sharing the database, concurrent
//! schema creation, the upgrade of a table of the previous version (with
//! that version's processes still running), fencing across expiry and
//! sweeping, abandoned rows surviving sweeps, the server going away and
//! coming back, and round trips counted on the wire.
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
    Claim, FencingToken, Fingerprint, KeyState, Lease, Store, StoreError, StoreKey,
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
        .claim(k, Fingerprint::from_bytes([1; 32]), Lease::freeing(lease))
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
    // database, each also racing to create the schema. 1,600 claims at
    // once queue for the two pools' connections; on a loaded machine that
    // wait alone can pass 2 s, and this case is about one winner per key,
    // not latency, so each operation gets longer.
    let patient = || options(&table).op_timeout(Duration::from_secs(15));
    let a = PostgresStore::connect(&url, patient()).expect("a");
    let b = PostgresStore::connect(&url, patient()).expect("b");
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
                    Fingerprint::from_bytes([1; 32]),
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
            .claim(
                &live,
                Fingerprint::from_bytes([1; 32]),
                Lease::freeing(LONG)
            )
            .await,
        Ok(Claim::Completed { .. })
    ));
    drop_schema(&url, &table).await;
}

async fn claim_until_ok(store: &PostgresStore, k: &StoreKey) -> Claim {
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
                store.claim(
                    &during,
                    Fingerprint::from_bytes([1; 32]),
                    Lease::freeing(LONG),
                ),
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
        nowhere.claim(
            &during,
            Fingerprint::from_bytes([1; 32]),
            Lease::freeing(LONG),
        ),
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
    let fp = Fingerprint::from_bytes([3; 32]);
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
                .claim(
                    &done,
                    Fingerprint::from_bytes([1; 32]),
                    Lease::freeing(LONG)
                )
                .await,
            Ok(Claim::Completed { .. })
        ));
        assert!(matches!(
            store
                .claim(
                    &held,
                    Fingerprint::from_bytes([1; 32]),
                    Lease::freeing(LONG)
                )
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

/// Engine level, the issue's cases on a real PostgreSQL: 64 concurrent
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

/// The schema of the version before leases could lock (commit 6fc3382,
/// `migration_sql`), verbatim: the table an existing deployment has.
fn old_ddl(t: &str) -> String {
    format!(
        r"CREATE SEQUENCE IF NOT EXISTS {t}_fence_seq;
CREATE TABLE IF NOT EXISTS {t} (
    key         text        PRIMARY KEY,
    state       smallint    NOT NULL CHECK (state IN (1, 2)),
    token       bigint      NOT NULL,
    fingerprint bytea       NOT NULL,
    payload     bytea,
    expires_at  timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS {t}_expires_at_idx ON {t} (expires_at);
CREATE OR REPLACE FUNCTION {t}_claim(
    p_key text, p_fingerprint bytea, p_lease_ms bigint,
    OUT o_kind smallint, OUT o_token bigint, OUT o_fingerprint bytea,
    OUT o_payload bytea, OUT o_remaining_ms bigint)
LANGUAGE plpgsql VOLATILE AS $keel$
DECLARE
    cur record;
BEGIN
    FOR attempt IN 1..16 LOOP
        SELECT r.state, r.fingerprint, r.payload, r.expires_at INTO cur
          FROM {t} r
         WHERE r.key = p_key AND r.expires_at > clock_timestamp();
        IF FOUND THEN
            o_fingerprint := cur.fingerprint;
            IF cur.state = 2 THEN
                o_kind := 3;
                o_payload := cur.payload;
            ELSE
                o_kind := 2;
                o_remaining_ms := GREATEST(1, ceil(extract(epoch FROM cur.expires_at - clock_timestamp()) * 1000))::bigint;
            END IF;
            RETURN;
        END IF;
        INSERT INTO {t} AS r (key, state, token, fingerprint, payload, expires_at)
        VALUES (p_key, 1, nextval('{t}_fence_seq'), p_fingerprint, NULL,
                clock_timestamp() + p_lease_ms * interval '1 millisecond')
        ON CONFLICT (key) DO UPDATE
            SET state = 1, token = EXCLUDED.token, fingerprint = EXCLUDED.fingerprint,
                payload = NULL, expires_at = EXCLUDED.expires_at
            WHERE r.expires_at <= clock_timestamp()
        RETURNING r.token INTO o_token;
        IF FOUND THEN
            o_kind := 1;
            RETURN;
        END IF;
    END LOOP;
    RAISE EXCEPTION 'keel-idempotency: claim of % kept losing races', p_key
        USING ERRCODE = '40001';
END
$keel$;
"
    )
}

/// A process of the previous version, talking to the same table with that
/// version's statements.
struct OldProcess {
    client: tokio_postgres::Client,
    table: String,
}

impl OldProcess {
    async fn new(url: &str, table: &str) -> Self {
        Self {
            client: sql(url).await,
            table: table.to_owned(),
        }
    }

    /// The old claim: `(kind, token)`, kind 1 acquired, 2 in flight, 3
    /// completed.
    async fn claim(&self, key: &str, lease: Duration) -> (i16, Option<i64>) {
        let row = self
            .client
            .query_one(
                &format!(
                    "SELECT o_kind, o_token FROM {}_claim($1::text, $2::bytea, $3::bigint)",
                    self.table
                ),
                &[&key, &&[1u8; 32][..], &(lease.as_millis() as i64)],
            )
            .await
            .expect("old claim");
        (row.get(0), row.get(1))
    }

    /// The old completion; whether it took.
    async fn complete(&self, key: &str, token: i64, payload: &[u8]) -> bool {
        let n = self
            .client
            .execute(
                &format!(
                    "UPDATE {} SET state = 2, payload = $3::bytea, \
                     expires_at = clock_timestamp() + interval '60 seconds' \
                     WHERE key = $1::text AND token = $2::bigint AND state = 1 \
                     AND expires_at > clock_timestamp()",
                    self.table
                ),
                &[&key, &token, &payload],
            )
            .await
            .expect("old complete");
        n == 1
    }
}

fn token_of(t: Option<i64>) -> FencingToken {
    FencingToken::new(u64::try_from(t.expect("a token")).expect("positive token"))
}

/// A deployment of the previous version: its table, rows its processes
/// wrote (a live claim, a result, a lapsed claim), then processes of the
/// new version starting at once. The setup adds the lease columns in
/// place; the old rows read as before; the old version's processes still
/// running during the rolling upgrade keep working alongside the new ones,
/// and neither misreads the other's rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_schema_table_is_migrated_in_place_and_its_rows_still_work() {
    let Some(url) = keel_testkit::service_url(keel_testkit::POSTGRES) else {
        return;
    };
    let table = unique_table();
    let admin = sql(&url).await;
    admin
        .batch_execute(&old_ddl(&table))
        .await
        .expect("old schema");
    let old = OldProcess::new(&url, &table).await;
    let (kind, held) = old.claim("old-held", LONG).await;
    assert_eq!(kind, 1);
    let (kind, done) = old.claim("old-done", LONG).await;
    assert_eq!(kind, 1);
    assert!(
        old.complete("old-done", done.expect("token"), b"old result")
            .await
    );
    let (kind, lapsed) = old.claim("old-lapsed", Duration::from_millis(200)).await;
    assert_eq!(kind, 1);
    tokio::time::sleep(Duration::from_millis(400)).await;

    // Four processes of the new version start at once on the old table.
    let stores: Vec<PostgresStore> = (0..4)
        .map(|_| PostgresStore::connect(&url, options(&table).pool_size(1)).expect("store"))
        .collect();
    let mut tasks = Vec::new();
    for store in &stores {
        let store = store.clone();
        tasks.push(tokio::spawn(async move { store.ensure_schema().await }));
    }
    for t in tasks {
        t.await.expect("task").expect("the upgrade runs");
    }
    let columns: i64 = admin
        .query_one(
            "SELECT count(*) FROM information_schema.columns \
             WHERE table_name = $1 AND column_name IN ('lease_until', 'lease_token')",
            &[&table],
        )
        .await
        .expect("columns")
        .get(0);
    assert_eq!(columns, 2, "both lease columns were added");
    let store = &stores[0];
    let fp = Fingerprint::from_bytes([1; 32]);
    let lock = Lease::locking(LONG, LONG);

    // The old live claim: in flight, its lease ending at its expiry, and
    // its token still holds it (renewable, completable).
    let held = token_of(held);
    match store.claim(&key("old-held"), fp, lock).await {
        Ok(Claim::InFlight {
            fingerprint,
            retry_after,
        }) => {
            assert_eq!(fingerprint, fp);
            assert!(
                retry_after <= LONG && retry_after > LONG / 2,
                "{retry_after:?}"
            );
        }
        other => panic!("old live claim: {other:?}"),
    }
    match store.inspect(&key("old-held")).await {
        Ok(Some(KeyState::Held { token, .. })) => assert_eq!(token, held),
        other => panic!("old live claim: {other:?}"),
    }
    store
        .renew(&key("old-held"), held, lock)
        .await
        .expect("the old holder's token renews");
    store
        .complete(&key("old-held"), held, b"finished", LONG)
        .await
        .expect("the old holder's token completes");

    // The old result replays.
    match store.claim(&key("old-done"), fp, lock).await {
        Ok(Claim::Completed { payload, .. }) => assert_eq!(payload, b"old result"),
        other => panic!("old result: {other:?}"),
    }
    assert!(matches!(
        store.inspect(&key("old-done")).await,
        Ok(Some(KeyState::Completed { .. }))
    ));

    // The old lapsed claim freed its key, as that version meant: not
    // abandoned.
    match store.claim(&key("old-lapsed"), fp, lock).await {
        Ok(Claim::Acquired { token }) => assert!(token > token_of(lapsed)),
        other => panic!("old lapsed claim: {other:?}"),
    }

    // An old process still running: its claims and completions work, and
    // the new version reads its rows right.
    let (kind, t) = old.claim("during-upgrade", LONG).await;
    assert_eq!(kind, 1);
    assert!(matches!(
        store.inspect(&key("during-upgrade")).await,
        Ok(Some(KeyState::Held { token, .. })) if token == token_of(t)
    ));
    assert!(
        old.complete("during-upgrade", t.expect("token"), b"old")
            .await
    );

    // The old version takes over a row the new one wrote, once it expired:
    // the stale lease deadline left behind must not make it look
    // abandoned while the old holder is live.
    let short = Lease::locking(Duration::from_millis(150), Duration::from_millis(150));
    assert!(matches!(
        store.claim(&key("handover"), fp, short).await,
        Ok(Claim::Acquired { .. })
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (kind, t) = old.claim("handover", LONG).await;
    assert_eq!(kind, 1, "the expired row is the old version's to take");
    match store.claim(&key("handover"), fp, lock).await {
        Ok(Claim::InFlight { .. }) => {}
        other => panic!("a live old holder reads as {other:?}"),
    }
    assert!(old.complete("handover", t.expect("token"), b"old").await);

    // And it never takes over a key the new version locked.
    let locking = Lease::locking(Duration::from_millis(150), LONG);
    assert!(matches!(
        store.claim(&key("locked"), fp, locking).await,
        Ok(Claim::Acquired { .. })
    ));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(matches!(
        store.claim(&key("locked"), fp, lock).await,
        Ok(Claim::Abandoned { .. })
    ));
    assert_eq!(
        old.claim("locked", LONG).await.0,
        2,
        "the old version sees a locked key as in flight"
    );

    // An old process restarting reruns its setup: harmless to both.
    admin
        .batch_execute(&old_ddl(&table))
        .await
        .expect("old setup again");
    let fresh = PostgresStore::connect(&url, options(&table)).expect("store");
    conformance::run(&fresh).await;
    drop_schema(&url, &table).await;
}

/// The upgrade's `ALTER TABLE` needs the table's exclusive lock. Behind a
/// long transaction it gives up after the operation timeout rather than
/// make every claim queue behind it, and the next attempt succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_blocked_by_a_long_transaction_gives_up_and_retries() {
    let Some(url) = keel_testkit::service_url(keel_testkit::POSTGRES) else {
        return;
    };
    let table = unique_table();
    let mut long = sql(&url).await;
    long.batch_execute(&old_ddl(&table))
        .await
        .expect("old schema");
    let reader = long.transaction().await.expect("begin");
    reader
        .query(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .expect("a read holding its lock");

    let store =
        PostgresStore::connect(&url, options(&table).op_timeout(Duration::from_millis(300)))
            .expect("store");
    let started = std::time::Instant::now();
    let got = store.ensure_schema().await;
    assert!(
        matches!(got, Err(StoreError::Unavailable(_))),
        "blocked upgrade: {got:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "gave up after {:?}",
        started.elapsed()
    );
    // Meanwhile the old version's claims were never stuck behind it.
    let old = OldProcess::new(&url, &table).await;
    let claimed = tokio::time::timeout(Duration::from_secs(2), old.claim("meanwhile", LONG))
        .await
        .expect("an old claim is not queued behind the upgrade");
    assert_eq!(claimed.0, 1);

    reader.commit().await.expect("the long transaction ends");
    store.ensure_schema().await.expect("the upgrade runs now");
    match store
        .claim(
            &key("meanwhile"),
            Fingerprint::from_bytes([1; 32]),
            Lease::freeing(LONG),
        )
        .await
    {
        Ok(Claim::InFlight { .. }) => {}
        other => panic!("{other:?}"),
    }
    drop_schema(&url, &table).await;
}

/// A lapsed locking claim stays through sweeps until its lock ends, then
/// the sweep deletes it and the key is free; removing a row that expired
/// but was not swept yet reports nothing live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_rows_survive_sweeps_until_their_lock_ends() {
    let Some(url) = keel_testkit::service_url(keel_testkit::POSTGRES) else {
        return;
    };
    let table = unique_table();
    let store = PostgresStore::connect(&url, options(&table)).expect("store");
    let fp = Fingerprint::from_bytes([1; 32]);
    let k = key("abandoned");
    let lease = Lease::locking(Duration::from_millis(200), Duration::from_millis(1200));
    let Ok(Claim::Acquired { token: first }) = store.claim(&k, fp, lease).await else {
        panic!("a fresh key is free");
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(store.purge_expired().await.expect("purge"), 0);
    assert!(matches!(
        store.claim(&k, fp, Lease::freeing(LONG)).await,
        Ok(Claim::Abandoned { .. })
    ));
    match store.inspect(&k).await {
        Ok(Some(KeyState::Abandoned {
            token, expires_in, ..
        })) => {
            assert_eq!(token, first);
            assert!(expires_in <= Duration::from_millis(1200), "{expires_in:?}");
        }
        other => panic!("{other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(matches!(store.inspect(&k).await, Ok(None)));
    assert_eq!(store.purge_expired().await.expect("purge"), 1);
    let second = acquire(&store, &k, LONG).await;
    assert!(second > first);

    let expired = key("expired-unswept");
    acquire(&store, &expired, Duration::from_millis(50)).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(
        !store.remove(&expired).await.expect("remove"),
        "an expired row is nothing live"
    );
    let count: i64 = sql(&url)
        .await
        .query_one(
            &format!("SELECT count(*) FROM {table} WHERE key = $1"),
            &[&expired.as_str()],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(count, 0, "but it is gone");
    drop_schema(&url, &table).await;
}
