//! Claim+complete pairs per second: the memory store on one and two threads
//! beside a single-`Mutex<HashMap>` baseline doing the same work, and the
//! embedded (append-only log) store.
//!
//! Run: `cargo bench -p keel-idempotency --bench stores`

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use keel_idempotency::memory::MemoryStore;
use keel_idempotency::store::{
    Claim, FencingToken, Fingerprint, Lease, Store, StoreError, StoreKey,
};

const FP: Fingerprint = Fingerprint::from_bytes([3; 32]);
const LEASE: Duration = Duration::from_secs(30);
/// Records complete with a zero TTL, so the next use of the same key finds
/// an expired record and claims again: the map stays the size of the key
/// pool while every iteration does a full claim + complete.
const TTL: Duration = Duration::ZERO;
const POOL: usize = 65_536;

/// Polls a future that is ready at once (the memory store's are).
fn now<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("memory store futures are ready at once"),
    }
}

fn keys(thread: usize) -> Vec<StoreKey> {
    (0..POOL)
        .map(|i| StoreKey::new(format!("idem:t{thread}:{i:064x}")).expect("valid"))
        .collect()
}

/// Token, payload once completed, expiry.
type Slot = (FencingToken, Option<Vec<u8>>, Instant);

/// The same semantics as the memory store under one global lock.
#[derive(Default)]
struct MutexMap {
    map: Mutex<HashMap<StoreKey, Slot>>,
    next: std::sync::atomic::AtomicU64,
}

impl MutexMap {
    fn claim(&self, key: &StoreKey) -> Claim {
        let now = Instant::now();
        let mut map = self.map.lock().expect("not poisoned");
        if let Some((_, payload, expires)) = map.get(key)
            && *expires > now
        {
            return match payload {
                None => Claim::InFlight {
                    fingerprint: FP,
                    retry_after: *expires - now,
                },
                Some(p) => Claim::Completed {
                    fingerprint: FP,
                    payload: p.clone(),
                },
            };
        }
        let token =
            FencingToken::new(self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1);
        map.insert(key.clone(), (token, None, now + LEASE));
        Claim::Acquired { token }
    }

    fn complete(
        &self,
        key: &StoreKey,
        token: FencingToken,
        payload: &[u8],
    ) -> Result<(), StoreError> {
        let now = Instant::now();
        let mut map = self.map.lock().expect("not poisoned");
        match map.get_mut(key) {
            Some((t, p @ None, expires)) if *t == token && *expires > now => {
                *p = Some(payload.to_vec());
                *expires = now + TTL;
                Ok(())
            }
            _ => Err(StoreError::Fenced),
        }
    }
}

fn memory_pairs(store: &MemoryStore, keys: &[StoreKey], iters: u64) {
    for i in 0..iters as usize {
        let k = &keys[i % POOL];
        let Ok(Claim::Acquired { token }) = now(store.claim(k, FP, Lease::freeing(LEASE))) else {
            panic!("key must be free");
        };
        now(store.complete(k, token, b"{\"id\":1}", TTL)).expect("complete");
    }
}

fn mutex_pairs(map: &MutexMap, keys: &[StoreKey], iters: u64) {
    for i in 0..iters as usize {
        let k = &keys[i % POOL];
        let Claim::Acquired { token } = map.claim(k) else {
            panic!("key must be free");
        };
        map.complete(k, token, b"{\"id\":1}").expect("complete");
    }
}

/// Runs `work` on `threads` threads, each doing `iters / threads` pairs on
/// its own pool of keys, and returns the wall time from the common start to
/// the last finish. One thread runs inline (no spawn in the measurement).
fn on_threads<S: Sync>(
    shared: &S,
    pools: &[Vec<StoreKey>],
    threads: usize,
    iters: u64,
    work: fn(&S, &[StoreKey], u64),
) -> Duration {
    if threads == 1 {
        let t = Instant::now();
        work(shared, &pools[0], iters);
        return t.elapsed();
    }
    let barrier = std::sync::Barrier::new(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = pools[..threads]
            .iter()
            .map(|pool| {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    let t = Instant::now();
                    work(shared, pool, iters / threads as u64);
                    (t, Instant::now())
                })
            })
            .collect();
        let spans: Vec<_> = handles
            .into_iter()
            .map(|h| h.join().expect("no panic"))
            .collect();
        let start = spans.iter().map(|s| s.0).min().expect("threads");
        let end = spans.iter().map(|s| s.1).max().expect("threads");
        end - start
    })
}

fn memory(c: &mut Criterion) {
    let pools: Vec<Vec<StoreKey>> = (0..2).map(keys).collect();
    let mut g = c.benchmark_group("claim_complete");
    g.throughput(Throughput::Elements(1));
    for threads in [1, 2] {
        let store = MemoryStore::new();
        g.bench_function(format!("memory/{threads}t"), |b| {
            b.iter_custom(|iters| on_threads(&store, &pools, threads, iters, memory_pairs))
        });
        let map = MutexMap::default();
        g.bench_function(format!("mutex_hashmap/{threads}t"), |b| {
            b.iter_custom(|iters| on_threads(&map, &pools, threads, iters, mutex_pairs))
        });
    }
    g.finish();
}

fn embedded(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut g = c.benchmark_group("claim_complete");
    g.throughput(Throughput::Elements(1));
    g.sample_size(10);
    // Every claim takes a key never used before in this store (a counter,
    // not a pool that wraps), so every iteration is a new claim and a
    // durable completion, never a replay.
    let fresh = Arc::new(AtomicU64::new(0));
    let key = |n: u64| StoreKey::new(format!("idem:{n:064x}")).expect("valid");
    for (name, durable_claims) in [("embedded/1t", true), ("embedded_fast_claims/1t", false)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(
            keel_idempotency::embedded::EmbeddedStore::open_dir(dir.path())
                .expect("open")
                .durable_claims(durable_claims),
        );
        g.bench_function(name, |b| {
            b.iter(|| {
                rt.block_on(async {
                    let k = key(fresh.fetch_add(1, Ordering::Relaxed));
                    let Ok(Claim::Acquired { token }) =
                        store.claim(&k, FP, Lease::freeing(LEASE)).await
                    else {
                        panic!("key must be free");
                    };
                    store
                        .complete(&k, token, b"{\"id\":1}", TTL)
                        .await
                        .expect("complete");
                })
            })
        });
    }
    // 64 callers at once: group commit puts their writes in shared
    // appends, one fdatasync each.
    let mt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let store =
        Arc::new(keel_idempotency::embedded::EmbeddedStore::open_dir(dir.path()).expect("open"));
    g.bench_function("embedded/64_concurrent", |b| {
        b.iter_custom(|iters| {
            let (store, fresh) = (store.clone(), fresh.clone());
            mt.block_on(async move {
                let start = Instant::now();
                let mut tasks = tokio::task::JoinSet::new();
                for _ in 0..64u64 {
                    let (store, fresh) = (store.clone(), fresh.clone());
                    tasks.spawn(async move {
                        for _ in 0..iters.div_ceil(64) {
                            let k = key(fresh.fetch_add(1, Ordering::Relaxed));
                            let Ok(Claim::Acquired { token }) =
                                store.claim(&k, FP, Lease::freeing(LEASE)).await
                            else {
                                panic!("key must be free");
                            };
                            store
                                .complete(&k, token, b"{\"id\":1}", TTL)
                                .await
                                .expect("complete");
                        }
                    });
                }
                while tasks.join_next().await.is_some() {}
                start.elapsed()
            })
        })
    });
    g.finish();
    recovery(c, &mt);
}

/// Opening a store replays its log: the restart time of a gateway with
/// 100,000 stored results of 200 bytes each.
fn recovery(c: &mut Criterion, mt: &tokio::runtime::Runtime) {
    const KEYS: u64 = 100_000;
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = Arc::new(
            keel_idempotency::embedded::EmbeddedStore::open_dir(dir.path())
                .expect("open")
                .durable_claims(false),
        );
        mt.block_on(async {
            let mut tasks = tokio::task::JoinSet::new();
            for t in 0..64 {
                let store = store.clone();
                tasks.spawn(async move {
                    for n in (t..KEYS).step_by(64) {
                        let k = StoreKey::new(format!("idem:{n:064x}")).expect("valid");
                        let Ok(Claim::Acquired { token }) =
                            store.claim(&k, FP, Lease::freeing(LEASE)).await
                        else {
                            panic!("key must be free");
                        };
                        store
                            .complete(&k, token, &[7; 200], Duration::from_secs(3600))
                            .await
                            .expect("complete");
                    }
                });
            }
            while tasks.join_next().await.is_some() {}
        });
    }
    let mut g = c.benchmark_group("embedded_open");
    g.sample_size(10);
    g.bench_function("100k_results", |b| {
        b.iter(|| {
            let store =
                keel_idempotency::embedded::EmbeddedStore::open_dir(dir.path()).expect("reopen");
            assert_eq!(store.stats().entries, KEYS as usize);
        })
    });
    g.finish();
}

criterion_group!(benches, memory, embedded);
criterion_main!(benches);
