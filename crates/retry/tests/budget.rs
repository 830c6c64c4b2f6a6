//! Budgets against small reference models (proptest, paused clock), and
//! under concurrent use.

use keel_retry::{Budget, RatioBudget, TokenBucket};
use proptest::prelude::*;
use std::time::Duration;

#[derive(Debug, Clone)]
enum Op {
    Success,
    Failure,
    Request,
    Retry,
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => Just(Op::Success),
        3 => Just(Op::Failure),
        3 => Just(Op::Request),
        4 => Just(Op::Retry),
        2 => (0u64..3000).prop_map(Op::Advance),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn token_bucket_matches_grpc_rules(max in 1u32..20, ratio_milli in 0u64..2000, ops in proptest::collection::vec(op(), 0..200)) {
        let b = TokenBucket::new(f64::from(max), ratio_milli as f64 / 1000.0);
        let max_m = u64::from(max) * 1000;
        let mut tokens = max_m;
        for op in ops {
            match op {
                Op::Success => { b.on_outcome(true); tokens = (tokens + ratio_milli).min(max_m); }
                Op::Failure => { b.on_outcome(false); tokens = tokens.saturating_sub(1000); }
                Op::Retry => prop_assert_eq!(b.try_retry(), tokens > max_m / 2),
                Op::Request | Op::Advance(_) => b.on_request(),
            }
            prop_assert_eq!((b.tokens() * 1000.0).round() as u64, tokens);
        }
    }

    #[test]
    fn ratio_budget_matches_a_sliding_model(
        ratio_pct in 0u64..100,
        min_per_sec in 0u32..3,
        ops in proptest::collection::vec(op(), 0..200),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().expect("rt");
        rt.block_on(async move {
            let ttl = Duration::from_secs(10);
            let b = RatioBudget::new(ratio_pct as f64 / 100.0, min_per_sec, ttl);
            // Model: events stamped with their 1-second bucket; the window
            // is the current bucket and the nine before it.
            let mut now_ms = 0u64;
            let mut requests: Vec<u64> = Vec::new();
            let mut retries: Vec<u64> = Vec::new();
            let reserve = u64::from(min_per_sec) * 10;
            for op in ops {
                let epoch = now_ms / 1000;
                let live = |v: &Vec<u64>| v.iter().filter(|e| **e + 10 > epoch).count() as u64;
                match op {
                    Op::Request => { b.on_request(); requests.push(epoch); }
                    Op::Retry => {
                        let allowance = reserve + live(&requests) * ratio_pct * 10_000 / 1_000_000;
                        let expect = live(&retries) < allowance;
                        prop_assert_eq!(b.try_retry(), expect);
                        if expect { retries.push(epoch); }
                    }
                    Op::Advance(ms) => { tokio::time::advance(Duration::from_millis(ms)).await; now_ms += ms; }
                    Op::Success | Op::Failure => b.on_outcome(matches!(op, Op::Success)),
                }
                let epoch = now_ms / 1000;
                let live = |v: &Vec<u64>| v.iter().filter(|e| **e + 10 > epoch).count() as u64;
                let allowance = reserve + live(&requests) * ratio_pct * 10_000 / 1_000_000;
                prop_assert_eq!(b.available(), allowance.saturating_sub(live(&retries)));
            }
            Ok(())
        })?;
    }
}

#[test]
fn concurrent_retries_never_overspend_a_ratio_budget() {
    let b = RatioBudget::new(0.2, 0, Duration::from_secs(3600));
    for _ in 0..1000 {
        b.on_request();
    }
    let granted: usize = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8)
            .map(|_| s.spawn(|| (0..500).filter(|_| b.try_retry()).count()))
            .collect();
        hs.into_iter().map(|h| h.join().expect("thread")).sum()
    });
    assert!(granted <= 200, "granted {granted}");
    assert!(granted >= 150, "granted {granted}: far too conservative");
}

#[test]
fn concurrent_failures_drain_a_token_bucket_exactly() {
    let b = TokenBucket::new(1000.0, 0.0);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| (0..100).for_each(|_| b.on_outcome(false)));
        }
    });
    assert_eq!(b.tokens(), 600.0);
    assert!(b.try_retry());
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| (0..100).for_each(|_| b.on_outcome(false)));
        }
    });
    assert_eq!(b.tokens(), 200.0);
    assert!(!b.try_retry());
}
