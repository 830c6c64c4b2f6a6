//! One call through each crate's tower layer over a ready `service_fn`:
//! keel's breaker and retry layers beside tower-resilience's and tower's
//! own `tower::retry`. See docs/BENCHMARKS.md, "Tower layers".
//!
//! * `cargo bench -p keel-retry --bench tower_layers` runs criterion.
//! * `TOWER_CALLS=<variant>:<n> target/release/deps/tower_layers-*` makes
//!   `n` calls through `variant` and exits, for `valgrind --tool=callgrind`
//!   (instruction counts do not depend on what else the machine runs).

use criterion::Criterion;
use std::convert::Infallible;
use std::hint::black_box;
use std::time::Duration;
use tower::{Layer, Service, ServiceExt};

const VARIANTS: [&str; 6] = [
    "bare",
    "keel_breaker",
    "keel_retry",
    "tower_retry",
    "tower_resilience_breaker",
    "tower_resilience_retry",
];

fn ok_service() -> impl Service<(), Response = (), Error = Infallible, Future: Send> + Clone + Send
{
    tower::service_fn(|_: ()| std::future::ready(Ok::<(), Infallible>(())))
}

/// tower's retry policy for the comparison: retry errors up to 3 attempts.
#[derive(Clone)]
struct TowerAttempts(usize);

impl<E> tower::retry::Policy<(), (), E> for TowerAttempts {
    type Future = std::future::Ready<()>;
    fn retry(&mut self, _: &mut (), result: &mut Result<(), E>) -> Option<Self::Future> {
        (result.is_err() && self.0 > 1).then(|| {
            self.0 -= 1;
            std::future::ready(())
        })
    }
    fn clone_request(&mut self, _: &()) -> Option<()> {
        Some(())
    }
}

/// Makes `n` calls through `svc` on a current-thread runtime.
fn calls<S>(svc: S, n: u64) -> Duration
where
    S: Service<()>,
    S::Error: std::fmt::Debug,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let mut svc = svc;
    rt.block_on(async {
        let start = std::time::Instant::now();
        for _ in 0..n {
            let r = svc.ready().await.expect("ready").call(()).await;
            black_box(r.is_ok());
        }
        start.elapsed()
    })
}

fn run(variant: &str, n: u64) -> Duration {
    match variant {
        "bare" => calls(ok_service(), n),
        "keel_breaker" => {
            let breaker = keel_breaker::Breaker::new("bench", keel_breaker::Config::default())
                .expect("config");
            calls(
                keel_breaker::BreakerLayer::new(breaker).layer(ok_service()),
                n,
            )
        }
        "keel_retry" => calls(
            keel_retry::RetryLayer::new(
                keel_retry::RetryPolicy::default(),
                |_: &()| Some(()),
                |r: Result<&(), &Infallible>| {
                    if r.is_err() {
                        keel_retry::Decision::Retry
                    } else {
                        keel_retry::Decision::Done
                    }
                },
            )
            .layer(ok_service()),
            n,
        ),
        "tower_retry" => calls(
            tower::retry::RetryLayer::new(TowerAttempts(3)).layer(ok_service()),
            n,
        ),
        "tower_resilience_breaker" => calls(
            tower_resilience_circuitbreaker::CircuitBreakerLayer::builder()
                .failure_rate_threshold(0.5)
                .sliding_window_size(100)
                .build()
                .expect("tower-resilience config")
                .layer(ok_service()),
            n,
        ),
        "tower_resilience_retry" => calls(
            tower_resilience_retry::RetryLayer::<(), (), Infallible>::builder()
                .max_attempts(3)
                .exponential_backoff(Duration::from_millis(100))
                .build()
                .layer(ok_service()),
            n,
        ),
        other => panic!("unknown variant {other:?}; one of {VARIANTS:?}"),
    }
}

fn main() {
    if let Ok(spec) = std::env::var("TOWER_CALLS") {
        let (variant, n) = spec.split_once(':').expect("TOWER_CALLS=<variant>:<n>");
        run(variant, n.parse().expect("a number of calls"));
        return;
    }
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
        .configure_from_args();
    let mut g = c.benchmark_group("tower");
    for variant in VARIANTS {
        g.bench_function(variant, |b| b.iter_custom(|iters| run(variant, iters)));
    }
    g.finish();
    c.final_summary();
}
