//! Jitter stays in its range and never exceeds the cap, over many seeded
//! samples; the distributions have the shape the formulas promise.

use keel_retry::{Backoff, Jitter, fastrand};
use proptest::prelude::*;
use std::time::Duration;

const MS: Duration = Duration::from_millis(1);

fn ceiling(base: Duration, n: u32, cap: Duration) -> Duration {
    (base * 2u32.saturating_pow(n.min(30))).min(cap)
}

#[test]
fn each_jitter_stays_in_its_range_over_seeded_samples() {
    let base = 10 * MS;
    let cap = 1000 * MS;
    for seed in 0..500 {
        for jitter in [
            Jitter::None,
            Jitter::Full,
            Jitter::Equal,
            Jitter::Decorrelated,
        ] {
            let b = Backoff::exponential(base)
                .cap(cap)
                .jitter(jitter)
                .seed(seed);
            let mut prev = base;
            for (n, d) in b.iter().take(20).enumerate() {
                let t = ceiling(base, n as u32, cap);
                assert!(d <= cap, "{jitter:?} seed {seed} n {n}: {d:?} > cap");
                match jitter {
                    Jitter::None => assert_eq!(d, t),
                    Jitter::Full => assert!(d <= t),
                    Jitter::Equal => assert!(d >= t / 2 && d <= t, "{d:?} vs {t:?}"),
                    Jitter::Decorrelated => {
                        assert!(d >= base && d <= (prev * 3).min(cap), "{d:?} prev {prev:?}")
                    }
                }
                prev = d;
            }
        }
    }
}

fn mean_and_bins(jitter: Jitter, t: Duration) -> (f64, [u32; 10]) {
    // Constant backoff so every sample draws against the same ceiling.
    let b = Backoff::constant(t).jitter(jitter).seed(12345);
    let mut bins = [0u32; 10];
    let mut sum = 0.0;
    let n = 20_000;
    for d in b.iter().take(n) {
        let x = d.as_secs_f64() / t.as_secs_f64();
        sum += x;
        bins[((x * 10.0) as usize).min(9)] += 1;
    }
    (sum / n as f64, bins)
}

#[test]
fn full_jitter_is_uniform_over_zero_to_t() {
    let (mean, bins) = mean_and_bins(Jitter::Full, Duration::from_secs(1));
    assert!((mean - 0.5).abs() < 0.01, "mean {mean}");
    // 2000 expected per bin; 5 sigma is about 210.
    for b in bins {
        assert!((1790..=2210).contains(&b), "bins {bins:?}");
    }
}

#[test]
fn equal_jitter_is_uniform_over_half_t_to_t() {
    let (mean, bins) = mean_and_bins(Jitter::Equal, Duration::from_secs(1));
    assert!((mean - 0.75).abs() < 0.01, "mean {mean}");
    assert_eq!(
        bins[..5].iter().sum::<u32>(),
        0,
        "nothing below t/2: {bins:?}"
    );
    for b in &bins[5..] {
        assert!((3700..=4300).contains(b), "bins {bins:?}");
    }
}

#[test]
fn decorrelated_jitter_grows_then_hovers_below_the_cap() {
    let cap = Duration::from_secs(10);
    let mut late = Vec::new();
    for seed in 0..200 {
        let d: Vec<_> = Backoff::exponential(100 * MS)
            .cap(cap)
            .jitter(Jitter::Decorrelated)
            .seed(seed)
            .iter()
            .take(40)
            .collect();
        late.extend_from_slice(&d[30..]);
    }
    let mean = late.iter().map(Duration::as_secs_f64).sum::<f64>() / late.len() as f64;
    // Once the cap binds, draws are uniform in [base, cap] most of the time.
    assert!(mean > 3.0 && mean < 7.5, "mean {mean}");
    assert!(late.iter().all(|d| *d <= cap));
}

#[test]
fn seeds_make_it_reproducible_and_different_seeds_differ() {
    let b = |s| Backoff::exponential(MS).jitter(Jitter::Full).seed(s);
    let a: Vec<_> = b(1).iter().take(10).collect();
    assert_eq!(a, b(1).iter().take(10).collect::<Vec<_>>());
    assert_ne!(a, b(2).iter().take(10).collect::<Vec<_>>());
    // The three ways to seed give the same stream.
    let full = Backoff::exponential(MS).jitter(Jitter::Full);
    let seeded: Vec<_> = full.iter_seeded(99).take(100).collect();
    assert_eq!(
        seeded,
        full.clone().seed(99).iter().take(100).collect::<Vec<_>>()
    );
    assert_eq!(
        seeded,
        full.iter_with(fastrand::Rng::with_seed(99))
            .take(100)
            .collect::<Vec<_>>()
    );
    // An explicit seed wins over the configured one.
    assert_eq!(seeded, b(1).iter_seeded(99).take(100).collect::<Vec<_>>());
}

#[test]
fn huge_exponents_saturate_at_the_cap() {
    let b = Backoff::exponential(Duration::from_secs(1))
        .factor(10.0)
        .cap(Duration::from_secs(60));
    assert_eq!(b.iter().nth(5000), Some(Duration::from_secs(60)));
    let uncapped = Backoff::exponential(Duration::from_secs(1)).cap(Duration::MAX);
    assert!(uncapped.iter().nth(2000).is_some(), "no overflow panic");
}

proptest! {
    #[test]
    fn the_cap_holds_for_any_configuration(
        base_ms in 0u64..10_000,
        cap_ms in 0u64..100_000,
        factor in 1.0f64..5.0,
        seed in any::<u64>(),
        jitter in prop_oneof![Just(Jitter::None), Just(Jitter::Full), Just(Jitter::Equal), Just(Jitter::Decorrelated)],
    ) {
        let cap = Duration::from_millis(cap_ms);
        let b = Backoff::exponential(Duration::from_millis(base_ms)).factor(factor).cap(cap).jitter(jitter).seed(seed);
        for d in b.iter().take(64) {
            prop_assert!(d <= cap);
        }
        let c = Backoff::custom(move |n, prev| prev * 2 + Duration::from_millis(u64::from(n) * base_ms)).cap(cap).jitter(jitter).seed(seed);
        for d in c.iter().take(64) {
            prop_assert!(d <= cap);
        }
    }
}
