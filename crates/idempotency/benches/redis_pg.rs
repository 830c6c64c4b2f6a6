//! Claim+complete pairs per second for the Redis and PostgreSQL stores on
//! loopback, sequential and with 16 concurrent tasks (and replays: claims
//! of a completed key), next to the floor
//! set by the network: two bare round trips (Redis `SET NX PX` then `SET
//! XX PX`, the naive lock-then-store; PostgreSQL two prepared `SELECT 1`)
//! measured in the same run.
//!
//! ```text
//! KEEL_TEST_REDIS_URL=redis://127.0.0.1:6379/ \
//! KEEL_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test \
//!     cargo bench -p keel-idempotency --bench redis_pg
//! ```
//!
//! Each benchmark is bounded (10 samples, 3 s of measurement). After the
//! criterion groups, an interleaved comparison alternates the store and
//! its floor in 0.5 s rounds (6 rounds each) and prints the median rates
//! and their ratio, which stays meaningful on a busy shared machine where
//! absolute numbers drift between benchmarks. Records are written with a
//! 60 s TTL under a fresh prefix / table, deleted at the end. A missing
//! server skips its part.

#![allow(missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use keel_idempotency::postgres::{PostgresOptions, PostgresStore};
use keel_idempotency::redis::{RedisOptions, RedisStore};
use keel_idempotency::store::{Claim, Fingerprint, Lease, Store, StoreKey};
use tokio::runtime::Runtime;

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(60);
const CONCURRENCY: u64 = 16;
const PAYLOAD: &[u8] = b"HTTP/1.1 201 Created\r\ncontent-type: application/json\r\n\r\n{\"id\":42}";

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn unique(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("bench_{tag}_{}_{nanos:x}", std::process::id())
}

/// One new request: claim a fresh key, then complete it.
async fn pair<S: Store + ?Sized>(store: &S, prefix: &str, n: u64) {
    let key = StoreKey::new(format!("{prefix}:{n}")).expect("key");
    match store
        .claim(
            &key,
            Fingerprint::from_bytes([5; 32]),
            Lease::freeing(LEASE),
        )
        .await
    {
        Ok(Claim::Acquired { token }) => store
            .complete(&key, token, PAYLOAD, TTL)
            .await
            .expect("complete"),
        other => panic!("fresh key {key}: {other:?}"),
    }
}

/// The naive Redis pair: lock with `SET NX PX`, store with `SET XX PX`.
async fn redis_floor_pair(mut conn: redis::aio::MultiplexedConnection, prefix: &str, n: u64) {
    let k = format!("{prefix}:{{floor-{n}}}");
    let _: Option<String> = redis::cmd("SET")
        .arg(&k)
        .arg("f")
        .arg("NX")
        .arg("PX")
        .arg(30_000)
        .query_async(&mut conn)
        .await
        .expect("set nx");
    let _: Option<String> = redis::cmd("SET")
        .arg(&k)
        .arg(PAYLOAD)
        .arg("XX")
        .arg("PX")
        .arg(60_000)
        .query_async(&mut conn)
        .await
        .expect("set xx");
}

/// Two bare PostgreSQL round trips: prepared `SELECT 1`, twice.
async fn pg_floor_pair(pool: deadpool_postgres::Pool) {
    for _ in 0..2 {
        let client = pool.get().await.expect("pool");
        let stmt = client.prepare_cached("SELECT 1").await.expect("prepare");
        client.query_one(&stmt, &[]).await.expect("select");
    }
}

/// What one benchmarked pair runs: given a sequence number, one pair.
trait PairOp: Clone + Send + Sync + 'static {
    fn run(&self, n: u64) -> impl Future<Output = ()> + Send;
}

#[derive(Clone)]
struct StorePair<S>(S, Arc<str>);
impl<S: Store + Clone> PairOp for StorePair<S> {
    async fn run(&self, n: u64) {
        pair(&self.0, &self.1, n).await;
    }
}

/// A replay: claim of a key completed beforehand (one round trip).
#[derive(Clone)]
struct Replay<S>(S, Arc<StoreKey>);
impl<S: Store + Clone> PairOp for Replay<S> {
    async fn run(&self, _: u64) {
        match self
            .0
            .claim(
                &self.1,
                Fingerprint::from_bytes([5; 32]),
                Lease::freeing(LEASE),
            )
            .await
        {
            Ok(Claim::Completed { .. }) => {}
            other => panic!("replay: {other:?}"),
        }
    }
}

/// Completes `key` once so that later claims replay it.
fn replay_of<S: Store + Clone>(rt: &Runtime, store: &S, key: &str) -> Replay<S> {
    let key = StoreKey::new(key).expect("key");
    rt.block_on(async {
        match store
            .claim(
                &key,
                Fingerprint::from_bytes([5; 32]),
                Lease::freeing(LEASE),
            )
            .await
        {
            Ok(Claim::Acquired { token }) => store
                .complete(&key, token, PAYLOAD, TTL)
                .await
                .expect("complete"),
            other => panic!("replay setup: {other:?}"),
        }
    });
    Replay(store.clone(), Arc::new(key))
}

#[derive(Clone)]
struct RedisFloor(redis::aio::MultiplexedConnection, Arc<str>);
impl PairOp for RedisFloor {
    async fn run(&self, n: u64) {
        redis_floor_pair(self.0.clone(), &self.1, n).await;
    }
}

#[derive(Clone)]
struct PgFloor(deadpool_postgres::Pool);
impl PairOp for PgFloor {
    async fn run(&self, _: u64) {
        pg_floor_pair(self.0.clone()).await;
    }
}

/// Runs `iters` pairs split over `tasks` tasks and returns the wall time.
fn run_pairs<P: PairOp>(
    rt: &Runtime,
    op: &P,
    seq: &Arc<AtomicU64>,
    iters: u64,
    tasks: u64,
) -> Duration {
    rt.block_on(async {
        let start = Instant::now();
        let mut handles = Vec::new();
        for t in 0..tasks {
            let (op, seq) = (op.clone(), seq.clone());
            let share = iters / tasks + u64::from(t < iters % tasks);
            handles.push(tokio::spawn(async move {
                for _ in 0..share {
                    op.run(seq.fetch_add(1, Ordering::Relaxed)).await;
                }
            }));
        }
        for h in handles {
            h.await.expect("bench task");
        }
        start.elapsed()
    })
}

/// Pairs per second over one `ROUND` with `tasks` tasks.
fn rate<P: PairOp>(rt: &Runtime, op: &P, seq: &Arc<AtomicU64>, tasks: u64) -> f64 {
    const ROUND: Duration = Duration::from_millis(500);
    rt.block_on(async {
        let done = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let mut handles = Vec::new();
        for _ in 0..tasks {
            let (op, seq, done) = (op.clone(), seq.clone(), done.clone());
            handles.push(tokio::spawn(async move {
                while start.elapsed() < ROUND {
                    op.run(seq.fetch_add(1, Ordering::Relaxed)).await;
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        for h in handles {
            h.await.expect("bench task");
        }
        done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
    })
}

/// Alternates `store` and `floor` rounds and prints median pairs/s and the
/// ratio.
fn interleaved<A: PairOp, B: PairOp>(
    rt: &Runtime,
    name: &str,
    store: &A,
    floor: &B,
    seq: &Arc<AtomicU64>,
    tasks: u64,
) {
    const ROUNDS: usize = 6;
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        a.push(rate(rt, store, seq, tasks));
        b.push(rate(rt, floor, seq, tasks));
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (a, b) = (median(&mut a), median(&mut b));
    println!(
        "interleaved {name:<40} tasks={tasks:<3} store {a:>9.0} pairs/s   floor {b:>9.0} pairs/s   store/floor {:.2}",
        a / b
    );
}

fn bench_redis(c: &mut Criterion) {
    let Some(url) = keel_testkit::service_url(keel_testkit::REDIS) else {
        return;
    };
    let rt = runtime();
    let prefix: Arc<str> = unique("redis").into();
    let seq = Arc::new(AtomicU64::new(0));
    let conn = rt
        .block_on(async {
            redis::Client::open(url.as_str())?
                .get_multiplexed_async_connection()
                .await
        })
        .expect("raw connection");
    let floor = RedisFloor(conn.clone(), prefix.clone());
    let mut stores = Vec::new();
    for connections in [1, 2] {
        let store = rt
            .block_on(RedisStore::connect(
                &url,
                RedisOptions::default()
                    .prefix(&*prefix)
                    .fence_grace(TTL)
                    .connections(connections),
            ))
            .expect("connect to redis");
        stores.push((connections, StorePair(store, prefix.clone())));
    }

    let mut group = c.benchmark_group("redis");
    group.throughput(Throughput::Elements(1));
    for (connections, store) in &stores {
        for tasks in [1, CONCURRENCY] {
            group.bench_function(
                format!("claim+complete/conns={connections}/tasks={tasks}"),
                |b| b.iter_custom(|iters| run_pairs(&rt, store, &seq, iters, tasks)),
            );
        }
    }
    let replay = replay_of(&rt, &stores[0].1.0, &format!("{prefix}:replayed"));
    for tasks in [1, CONCURRENCY] {
        group.bench_function(format!("replay/conns=1/tasks={tasks}"), |b| {
            b.iter_custom(|iters| run_pairs(&rt, &replay, &seq, iters, tasks))
        });
    }
    for tasks in [1, CONCURRENCY] {
        group.bench_function(format!("floor-2-round-trips/tasks={tasks}"), |b| {
            b.iter_custom(|iters| run_pairs(&rt, &floor, &seq, iters, tasks))
        });
    }
    group.finish();

    for (connections, store) in &stores {
        for tasks in [1, CONCURRENCY] {
            interleaved(
                &rt,
                &format!("redis claim+complete conns={connections}"),
                store,
                &floor,
                &seq,
                tasks,
            );
        }
    }

    // Clean up: everything under the prefix.
    rt.block_on(async {
        let mut conn = conn.clone();
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{prefix}:*"))
                .arg("COUNT")
                .arg(10_000)
                .query_async(&mut conn)
                .await
                .expect("scan");
            if !keys.is_empty() {
                let _: i64 = redis::cmd("UNLINK")
                    .arg(&keys)
                    .query_async(&mut conn)
                    .await
                    .expect("unlink");
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    });
}

fn bench_postgres(c: &mut Criterion) {
    let Some(url) = keel_testkit::service_url(keel_testkit::POSTGRES) else {
        return;
    };
    let rt = runtime();
    let table = unique("pg");
    let seq = Arc::new(AtomicU64::new(0));
    let options = || {
        PostgresOptions::default()
            .table(&table)
            .expect("table name")
            .pool_size(CONCURRENCY as usize)
            .op_timeout(Duration::from_secs(5))
    };
    let store = PostgresStore::connect(&url, options()).expect("postgres store");
    rt.block_on(store.ensure_schema()).expect("schema");
    // The same table through connections that do not wait for the WAL
    // flush at commit (`synchronous_commit=off`, set in the URL): shows how
    // much of the sequential figure is the disk's fsync latency.
    let sep = if url.contains('?') { '&' } else { '?' };
    let async_commit = PostgresStore::connect(
        &format!("{url}{sep}options=-c%20synchronous_commit%3Doff"),
        options(),
    )
    .expect("postgres store");
    let stores = [
        ("sync", StorePair(store, "k".into())),
        ("async", StorePair(async_commit, "k".into())),
    ];
    let pool = {
        let config: tokio_postgres::Config = url.parse().expect("url");
        let manager = deadpool_postgres::Manager::from_config(
            config,
            tokio_postgres::NoTls,
            deadpool_postgres::ManagerConfig {
                recycling_method: deadpool_postgres::RecyclingMethod::Fast,
            },
        );
        deadpool_postgres::Pool::builder(manager)
            .max_size(CONCURRENCY as usize)
            .build()
            .expect("pool")
    };
    let floor = PgFloor(pool.clone());

    let mut group = c.benchmark_group("postgres");
    group.throughput(Throughput::Elements(1));
    for (commit, store) in &stores {
        for tasks in [1, CONCURRENCY] {
            group.bench_function(
                format!("claim+complete/commit={commit}/tasks={tasks}"),
                |b| b.iter_custom(|iters| run_pairs(&rt, store, &seq, iters, tasks)),
            );
        }
    }
    let replay = replay_of(&rt, &stores[0].1.0, "replayed");
    for tasks in [1, CONCURRENCY] {
        group.bench_function(format!("replay/tasks={tasks}"), |b| {
            b.iter_custom(|iters| run_pairs(&rt, &replay, &seq, iters, tasks))
        });
    }
    for tasks in [1, CONCURRENCY] {
        group.bench_function(format!("floor-2-round-trips/tasks={tasks}"), |b| {
            b.iter_custom(|iters| run_pairs(&rt, &floor, &seq, iters, tasks))
        });
    }
    group.finish();

    for (commit, store) in &stores {
        for tasks in [1, CONCURRENCY] {
            interleaved(
                &rt,
                &format!("postgres claim+complete commit={commit}"),
                store,
                &floor,
                &seq,
                tasks,
            );
        }
    }

    rt.block_on(async {
        let client = pool.get().await.expect("pool");
        client
            .batch_execute(&format!(
                "DROP TABLE IF EXISTS {table}; DROP SEQUENCE IF EXISTS {table}_fence_seq; \
                 DROP FUNCTION IF EXISTS {table}_claim(text, bytea, bigint); \
                 DROP FUNCTION IF EXISTS {table}_claim_v2(text, bytea, bigint, bigint);"
            ))
            .await
            .expect("drop bench table");
    });
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_redis, bench_postgres
}
criterion_main!(benches);
