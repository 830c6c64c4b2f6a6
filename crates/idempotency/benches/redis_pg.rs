//! Claim+complete pairs per second for the Redis and PostgreSQL stores on
//! loopback, sequential and with 16 concurrent tasks, next to the floor
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
//! Each benchmark is bounded (10 samples, 3 s of measurement). Records are
//! written with a 60 s TTL under a fresh prefix / table, deleted at the
//! end. A missing server skips its group.

#![allow(missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use keel_idempotency::postgres::{PostgresOptions, PostgresStore};
use keel_idempotency::redis::{RedisOptions, RedisStore};
use keel_idempotency::store::{Claim, Fingerprint, Store, StoreKey};
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
    match store.claim(&key, Fingerprint([5; 32]), LEASE).await {
        Ok(Claim::Acquired { token }) => store
            .complete(&key, token, PAYLOAD, TTL)
            .await
            .expect("complete"),
        other => panic!("fresh key {key}: {other:?}"),
    }
}

/// Runs `iters` pairs split over `tasks` tasks and returns the wall time.
fn run_pairs<S: Store + Clone>(
    rt: &Runtime,
    store: &S,
    prefix: &str,
    seq: &Arc<AtomicU64>,
    iters: u64,
    tasks: u64,
) -> Duration {
    rt.block_on(async {
        let start = Instant::now();
        let mut handles = Vec::new();
        for t in 0..tasks {
            let (store, prefix, seq) = (store.clone(), prefix.to_owned(), seq.clone());
            let share = iters / tasks + u64::from(t < iters % tasks);
            handles.push(tokio::spawn(async move {
                for _ in 0..share {
                    pair(&store, &prefix, seq.fetch_add(1, Ordering::Relaxed)).await;
                }
            }));
        }
        for h in handles {
            h.await.expect("bench task");
        }
        start.elapsed()
    })
}

fn bench_redis(c: &mut Criterion) {
    let Some(url) = keel_testkit::service_url(keel_testkit::REDIS) else {
        return;
    };
    let rt = runtime();
    let prefix = unique("redis");
    let seq = Arc::new(AtomicU64::new(0));
    let mut group = c.benchmark_group("redis");
    group.throughput(Throughput::Elements(1));
    for connections in [1, 2] {
        let store = rt
            .block_on(RedisStore::connect(
                &url,
                RedisOptions::default()
                    .prefix(&prefix)
                    .fence_grace(TTL)
                    .connections(connections),
            ))
            .expect("connect to redis");
        for tasks in [1, CONCURRENCY] {
            group.bench_function(
                format!("claim+complete/conns={connections}/tasks={tasks}"),
                |b| b.iter_custom(|iters| run_pairs(&rt, &store, &prefix, &seq, iters, tasks)),
            );
        }
    }

    // The floor: the same two round trips with no script, as a naive
    // store would do them (lock with SET NX PX, then store with SET XX PX).
    let conn = rt
        .block_on(async {
            redis::Client::open(url.as_str())?
                .get_multiplexed_async_connection()
                .await
        })
        .expect("raw connection");
    for tasks in [1, CONCURRENCY] {
        group.bench_function(format!("floor-2-round-trips/tasks={tasks}"), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    let mut handles = Vec::new();
                    for t in 0..tasks {
                        let (mut conn, prefix, seq) = (conn.clone(), prefix.clone(), seq.clone());
                        let share = iters / tasks + u64::from(t < iters % tasks);
                        handles.push(tokio::spawn(async move {
                            for _ in 0..share {
                                let k = format!(
                                    "{prefix}:{{floor-{}}}",
                                    seq.fetch_add(1, Ordering::Relaxed)
                                );
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
                        }));
                    }
                    for h in handles {
                        h.await.expect("bench task");
                    }
                    start.elapsed()
                })
            })
        });
    }
    group.finish();

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
    let store = PostgresStore::connect(
        &url,
        PostgresOptions::default()
            .table(&table)
            .expect("table name")
            .pool_size(CONCURRENCY as usize)
            .op_timeout(Duration::from_secs(5)),
    )
    .expect("postgres store");
    rt.block_on(store.ensure_schema()).expect("schema");
    // The same table through connections that do not wait for the WAL
    // flush at commit (`synchronous_commit=off`, set in the URL): shows how
    // much of the sequential figure is the disk's fsync latency.
    let sep = if url.contains('?') { '&' } else { '?' };
    let async_commit = PostgresStore::connect(
        &format!("{url}{sep}options=-c%20synchronous_commit%3Doff"),
        PostgresOptions::default()
            .table(&table)
            .expect("table name")
            .pool_size(CONCURRENCY as usize)
            .op_timeout(Duration::from_secs(5)),
    )
    .expect("postgres store");
    let mut group = c.benchmark_group("postgres");
    group.throughput(Throughput::Elements(1));
    for (commit, store) in [("sync", &store), ("async", &async_commit)] {
        for tasks in [1, CONCURRENCY] {
            group.bench_function(
                format!("claim+complete/commit={commit}/tasks={tasks}"),
                |b| b.iter_custom(|iters| run_pairs(&rt, store, "k", &seq, iters, tasks)),
            );
        }
    }

    // The floor: two prepared `SELECT 1` round trips on pooled connections.
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
    for tasks in [1, CONCURRENCY] {
        group.bench_function(format!("floor-2-round-trips/tasks={tasks}"), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    let mut handles = Vec::new();
                    for t in 0..tasks {
                        let pool = pool.clone();
                        let share = iters / tasks + u64::from(t < iters % tasks);
                        handles.push(tokio::spawn(async move {
                            for _ in 0..share {
                                for _ in 0..2 {
                                    let client = pool.get().await.expect("pool");
                                    let stmt =
                                        client.prepare_cached("SELECT 1").await.expect("prepare");
                                    client.query_one(&stmt, &[]).await.expect("select");
                                }
                            }
                        }));
                    }
                    for h in handles {
                        h.await.expect("bench task");
                    }
                    start.elapsed()
                })
            })
        });
    }
    group.finish();

    rt.block_on(async {
        let client = pool.get().await.expect("pool");
        client
            .batch_execute(&format!(
                "DROP TABLE IF EXISTS {table}; DROP SEQUENCE IF EXISTS {table}_fence_seq; \
                 DROP FUNCTION IF EXISTS {table}_claim(text, bytea, bigint);"
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
