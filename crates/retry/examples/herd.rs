//! Discrete-event herd simulation in the spirit of the AWS backoff
//! simulator: N clients each need one write to a resource that accepts one
//! write per time slot (1 slot = 1 ms). All start at slot 0; among the
//! clients that try in the same slot one wins, the rest fail and back off
//! with the strategy under test (keel-retry's own `Backoff`, base 10 ms,
//! cap 10 s), then try again. We count total calls (the work the resource
//! absorbs) and the slot at which the last client succeeds.
//!
//! Run: `cargo run --release -p keel-retry --example herd`
//! (optional args: number of seeds to average over, default 10).

use keel_retry::{Backoff, BackoffIter, Jitter, fastrand};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

#[derive(Clone, Copy)]
enum Strategy {
    NoBackoff,
    Exponential,
    Full,
    Equal,
    Decorrelated,
}

impl Strategy {
    fn name(self) -> &'static str {
        match self {
            Strategy::NoBackoff => "no backoff",
            Strategy::Exponential => "exponential, no jitter",
            Strategy::Full => "full jitter",
            Strategy::Equal => "equal jitter",
            Strategy::Decorrelated => "decorrelated jitter",
        }
    }

    fn backoff(self, seed: u64) -> Option<BackoffIter> {
        let base = Backoff::exponential(Duration::from_millis(10)).cap(Duration::from_secs(10));
        let jitter = match self {
            Strategy::NoBackoff => return None,
            Strategy::Exponential => Jitter::None,
            Strategy::Full => Jitter::Full,
            Strategy::Equal => Jitter::Equal,
            Strategy::Decorrelated => Jitter::Decorrelated,
        };
        Some(base.jitter(jitter).iter_seeded(seed))
    }
}

struct Outcome {
    calls: u64,
    completion_slot: u64,
}

fn simulate(n: u32, strategy: Strategy, seed: u64) -> Outcome {
    let mut arbiter = fastrand::Rng::with_seed(seed ^ 0xDEAD_BEEF);
    let mut clients: Vec<Option<BackoffIter>> = (0..n)
        .map(|i| strategy.backoff(seed.wrapping_mul(1_000_003).wrapping_add(u64::from(i))))
        .collect();
    let mut queue: BinaryHeap<Reverse<(u64, u32)>> = (0..n).map(|i| Reverse((0, i))).collect();
    let (mut calls, mut last) = (0u64, 0u64);
    let mut contenders = Vec::new();
    while let Some(Reverse((slot, first))) = queue.pop() {
        contenders.clear();
        contenders.push(first);
        while let Some(Reverse((s, c))) = queue.peek().copied() {
            if s != slot {
                break;
            }
            queue.pop();
            contenders.push(c);
        }
        calls += contenders.len() as u64;
        let winner = arbiter.usize(..contenders.len());
        last = slot;
        for (k, c) in contenders.iter().enumerate() {
            if k == winner {
                continue;
            }
            let delay = clients[*c as usize]
                .as_mut()
                .and_then(Iterator::next)
                .map_or(0, |d| d.as_millis() as u64);
            queue.push(Reverse((slot + 1 + delay, *c)));
        }
    }
    Outcome {
        calls,
        completion_slot: last + 1,
    }
}

fn main() {
    let seeds: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10)
        .max(1);
    println!("| clients | strategy | total calls | calls per client | completion (ms) |");
    println!("| ---: | --- | ---: | ---: | ---: |");
    for n in [10u32, 100, 1000] {
        for s in [
            Strategy::NoBackoff,
            Strategy::Exponential,
            Strategy::Full,
            Strategy::Equal,
            Strategy::Decorrelated,
        ] {
            let (mut calls, mut done) = (0u64, 0u64);
            for seed in 0..seeds {
                let o = simulate(n, s, seed + 1);
                calls += o.calls;
                done += o.completion_slot;
            }
            let calls = calls as f64 / seeds as f64;
            let done = done as f64 / seeds as f64;
            println!(
                "| {n} | {} | {calls:.0} | {:.1} | {done:.0} |",
                s.name(),
                calls / f64::from(n)
            );
        }
    }
    println!("\nmean over {seeds} seeds; 1 slot = 1 ms; backoff base 10 ms, cap 10 s");
}
