//! Costs of the retry building blocks: one backoff delay per jitter, and
//! budget bookkeeping (the part every call of every task goes through).

use criterion::{Criterion, criterion_group, criterion_main};
use keel_retry::{Backoff, Budget, Jitter, RatioBudget, TokenBucket};
use std::hint::black_box;
use std::time::Duration;

fn backoff(c: &mut Criterion) {
    let mut g = c.benchmark_group("backoff_next");
    for (name, j) in [
        ("none", Jitter::None),
        ("full", Jitter::Full),
        ("equal", Jitter::Equal),
        ("decorrelated", Jitter::Decorrelated),
    ] {
        let b = Backoff::exponential(Duration::from_millis(10))
            .cap(Duration::from_secs(10))
            .jitter(j)
            .seed(1);
        let mut it = b.iter();
        g.bench_function(name, |bench| {
            bench.iter(|| {
                // Restart now and then so the exponent stays realistic.
                let d = it.next();
                if d == Some(Duration::from_secs(10)) {
                    it.reset();
                }
                black_box(d)
            })
        });
    }
    g.finish();
}

fn budgets(c: &mut Criterion) {
    let mut g = c.benchmark_group("budget");
    let tb = TokenBucket::grpc();
    g.bench_function("token_bucket_outcome_and_check", |b| {
        b.iter(|| {
            tb.on_outcome(black_box(true));
            black_box(tb.try_retry())
        })
    });
    let rb = RatioBudget::sre();
    g.bench_function("ratio_budget_request", |b| b.iter(|| rb.on_request()));
    g.bench_function("ratio_budget_try_retry", |b| {
        b.iter(|| black_box(rb.try_retry()))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(20);
    targets = backoff, budgets
}
criterion_main!(benches);
