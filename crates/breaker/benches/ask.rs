//! Breaker hot-path benchmarks, keel beside failsafe and tower-resilience,
//! in one run. See docs/breaker-retry.md for the commands and figures.
//!
//! * `ask/1thread/*`: permission for one call, uncontended.
//! * `ask/2threads/*`: the same on two threads sharing one breaker; the
//!   reported time is wall time per iteration where each iteration is one
//!   ask *on each thread*, so the scaling ratio is `2 * t1 / t2`.
//! * `call/*`: permission plus recording a success.
//! * `tower/*`: one call through each crate's tower layer over a ready
//!   `service_fn` (the overhead tower-resilience reports).

use criterion::{Criterion, criterion_group, criterion_main};
use failsafe::CircuitBreaker as _;
use std::hint::black_box;
use std::time::{Duration, Instant};
use tower::{Layer, Service, ServiceExt};

fn keel() -> keel_breaker::Breaker {
    keel_breaker::Breaker::new("bench", keel_breaker::Config::default()).expect("config")
}

fn failsafe() -> impl failsafe::CircuitBreaker + Clone + Send + Sync {
    failsafe::Config::new().build()
}

/// Runs `op` `iters` times on each of `threads` threads at once and
/// returns the wall time.
fn on_threads<F: Fn() + Sync>(threads: usize, iters: u64, op: F) -> Duration {
    run_threads(threads, iters, op).0
}

/// This thread's time on a CPU so far, from the scheduler (nanoseconds).
/// Unlike wall time it does not grow while other processes on this shared
/// 2-core machine hold the CPU, so it isolates the cost of the code itself
/// (cache-line contention between our threads still shows up in it).
fn thread_cpu() -> Duration {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .map(Duration::from_nanos)
        .unwrap_or_default()
}

/// Wall time, and mean on-CPU time per thread.
fn run_threads<F: Fn() + Sync>(threads: usize, iters: u64, op: F) -> (Duration, Duration) {
    let barrier = std::sync::Barrier::new(threads + 1);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    let cpu = thread_cpu();
                    for _ in 0..iters {
                        op();
                    }
                    let cpu = thread_cpu() - cpu;
                    barrier.wait();
                    cpu
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        barrier.wait();
        let wall = start.elapsed();
        let cpu: Duration = handles.into_iter().map(|h| h.join().expect("thread")).sum();
        (wall, cpu / threads as u32)
    })
}

/// Per-thread CPU time per ask: equal at 1 and 2 threads means perfect
/// scaling, whatever else the machine is running.
fn ask_cpu(c: &mut Criterion) {
    for threads in [1usize, 2] {
        let mut g = c.benchmark_group(if threads == 1 {
            "ask_cpu/1thread"
        } else {
            "ask_cpu/2threads"
        });
        // Equal-sized samples: the scheduler's CPU clock advances in ticks,
        // so criterion's smallest linear samples could read as zero.
        g.sampling_mode(criterion::SamplingMode::Flat);
        let k = keel();
        g.bench_function("keel_allow", |b| {
            b.iter_custom(|iters| {
                run_threads(threads, iters, || {
                    let p = black_box(&k).allow();
                    black_box(p.is_ok());
                })
                .1
            })
        });
        let f = failsafe();
        g.bench_function("failsafe_is_call_permitted", |b| {
            b.iter_custom(|iters| {
                run_threads(threads, iters, || {
                    black_box(black_box(&f).is_call_permitted());
                })
                .1
            })
        });
        g.bench_function("keel_allow_success", |b| {
            b.iter_custom(|iters| {
                run_threads(threads, iters, || {
                    if let Ok(p) = black_box(&k).allow() {
                        p.success();
                    }
                })
                .1
            })
        });
        g.finish();
    }
}

fn ask(c: &mut Criterion) {
    for threads in [1usize, 2] {
        let mut g = c.benchmark_group(if threads == 1 {
            "ask/1thread"
        } else {
            "ask/2threads"
        });
        let k = keel();
        g.bench_function("keel_allow", |b| {
            b.iter_custom(|iters| {
                on_threads(threads, iters, || {
                    let p = black_box(&k).allow();
                    black_box(p.is_ok());
                })
            })
        });
        g.bench_function("keel_would_allow", |b| {
            b.iter_custom(|iters| {
                on_threads(threads, iters, || {
                    black_box(black_box(&k).would_allow().is_ok());
                })
            })
        });
        let f = failsafe();
        g.bench_function("failsafe_is_call_permitted", |b| {
            b.iter_custom(|iters| {
                on_threads(threads, iters, || {
                    black_box(black_box(&f).is_call_permitted());
                })
            })
        });
        g.finish();

        let mut g = c.benchmark_group(if threads == 1 {
            "call/1thread"
        } else {
            "call/2threads"
        });
        g.bench_function("keel_allow_success", |b| {
            b.iter_custom(|iters| {
                on_threads(threads, iters, || {
                    if let Ok(p) = black_box(&k).allow() {
                        p.success();
                    }
                })
            })
        });
        g.bench_function("failsafe_call_ok", |b| {
            b.iter_custom(|iters| {
                on_threads(threads, iters, || {
                    let r = black_box(&f).call(|| Ok::<_, ()>(()));
                    black_box(r.is_ok());
                })
            })
        });
        g.finish();
    }
}

fn ok_service()
-> impl Service<(), Response = (), Error = std::convert::Infallible, Future: Send> + Clone {
    tower::service_fn(|_: ()| std::future::ready(Ok::<(), std::convert::Infallible>(())))
}

/// One tower call per iteration on each of `threads` threads, each thread
/// with its own current-thread runtime and a clone of the same service.
fn tower_calls<S>(threads: usize, iters: u64, svc: S) -> Duration
where
    S: Service<()> + Clone + Send,
    S::Error: std::fmt::Debug,
{
    let barrier = std::sync::Barrier::new(threads + 1);
    std::thread::scope(|s| {
        for _ in 0..threads {
            let mut svc = svc.clone();
            let barrier = &barrier;
            s.spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .expect("runtime");
                barrier.wait();
                rt.block_on(async {
                    for _ in 0..iters {
                        let r = svc.ready().await.expect("ready").call(()).await;
                        black_box(r.is_ok());
                    }
                });
                barrier.wait();
            });
        }
        barrier.wait();
        let start = Instant::now();
        barrier.wait();
        start.elapsed()
    })
}

fn tower_layers(c: &mut Criterion) {
    for threads in [1usize, 2] {
        let mut g = c.benchmark_group(if threads == 1 {
            "tower/1thread"
        } else {
            "tower/2threads"
        });
        g.bench_function("bare_service", |b| {
            b.iter_custom(|iters| tower_calls(threads, iters, ok_service()))
        });
        let keel_svc = keel_breaker::BreakerLayer::new(keel()).layer(ok_service());
        g.bench_function("keel_layer", |b| {
            b.iter_custom(|iters| tower_calls(threads, iters, keel_svc.clone()))
        });
        let tr = tower_resilience_circuitbreaker::CircuitBreakerLayer::builder()
            .failure_rate_threshold(0.5)
            .sliding_window_size(100)
            .build()
            .expect("tower-resilience config");
        let tr_svc = tr.layer(ok_service());
        g.bench_function("tower_resilience_layer", |b| {
            b.iter_custom(|iters| tower_calls(threads, iters, tr_svc.clone()))
        });
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    targets = ask, ask_cpu, tower_layers
}
criterion_main!(benches);
