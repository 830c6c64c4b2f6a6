//! Random crash schedules against a reference model of OTP's restart
//! intensity: the supervisor must escalate exactly when the model does.

mod common;

use std::time::Duration;

use common::{Log, Puppet};
use keel_supervisor::{EventKind, Strategy, Supervisor};
use proptest::prelude::*;
use tokio::time::Instant;

/// OTP's rule, written as plainly as possible: every restart is
/// timestamped, and the supervisor gives up when more than `intensity` of
/// them lie within `period` of now (inclusive).
struct Model {
    intensity: usize,
    period: Duration,
    all_restarts: Vec<Instant>,
}

impl Model {
    fn restart_escalates(&mut self, now: Instant) -> bool {
        self.all_restarts.push(now);
        let in_window = self
            .all_restarts
            .iter()
            .filter(|&&t| now - t <= self.period)
            .count();
        in_window > self.intensity
    }
}

fn run_case(
    intensity: u32,
    period_ms: u64,
    children: usize,
    strategy: Strategy,
    steps: &[(u64, usize)],
) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    rt.block_on(async {
        let log = Log::default();
        let puppets: Vec<Puppet> = (0..children)
            .map(|i| Puppet::new(&format!("c{i}"), &log))
            .collect();
        let sup = puppets
            .iter()
            .fold(
                Supervisor::builder("root")
                    .strategy(strategy)
                    .intensity(intensity, Duration::from_millis(period_ms)),
                |b, p| b.child(p.spec()),
            )
            .build()
            .expect("spec");
        let handle = sup.start().await.expect("start");
        let mut events = handle.events();
        let mut model = Model {
            intensity: intensity as usize,
            period: Duration::from_millis(period_ms),
            all_restarts: Vec::new(),
        };
        for (n, &(advance_ms, child)) in steps.iter().enumerate() {
            tokio::time::advance(Duration::from_millis(advance_ms)).await;
            let victim = &puppets[child % children];
            let starts_before = victim.starts();
            let expect_escalation = model.restart_escalates(Instant::now());
            victim.crash();
            let escalated = loop {
                let e = tokio::time::timeout(Duration::from_secs(3600), events.recv())
                    .await
                    .expect("the supervisor reacts")
                    .expect("event stream open");
                match e.kind {
                    EventKind::Escalated { .. } if &*e.path == "root" => break true,
                    EventKind::Ready
                        if victim.starts() == starts_before + 1 && handle.is_ready() =>
                    {
                        break false;
                    }
                    _ => {}
                }
            };
            assert_eq!(
                escalated, expect_escalation,
                "step {n}: supervisor escalated={escalated}, model says {expect_escalation}"
            );
            if escalated {
                // OTP's reason for giving up; the detail is in the snapshot.
                assert_eq!(handle.wait().await, keel_supervisor::ExitReason::Shutdown);
                assert!(handle.snapshot().escalation.is_some());
                return;
            }
        }
        handle.shutdown().await;
    });
}

fn strategy() -> impl proptest::strategy::Strategy<Value = keel_supervisor::Strategy> {
    prop_oneof![
        Just(keel_supervisor::Strategy::OneForOne),
        Just(keel_supervisor::Strategy::OneForAll),
        Just(keel_supervisor::Strategy::RestForOne),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn escalates_exactly_when_the_model_does(
        intensity in 0u32..5,
        period_ms in 1u64..3000,
        children in 1usize..4,
        strategy in strategy(),
        steps in prop::collection::vec((0u64..1500, 0usize..4), 1..30),
    ) {
        run_case(intensity, period_ms, children, strategy, &steps);
    }
}

#[test]
fn boundary_restart_exactly_at_the_period_still_counts() {
    // Two restarts exactly `period` apart are both inside the window.
    run_case(1, 1000, 1, Strategy::OneForOne, &[(0, 0), (1000, 0)]);
    // One millisecond later the first has left the window.
    run_case(
        1,
        1000,
        1,
        Strategy::OneForOne,
        &[(0, 0), (1001, 0), (1001, 0)],
    );
}
