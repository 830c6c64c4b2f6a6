//! Model-based test in the spirit of fuse's QuickCheck models: random
//! sequences of asks, outcomes, time steps and operator commands run
//! against the real breaker (on tokio's paused clock) and against a small
//! reference model written for clarity, not speed (gradual recovery
//! included). After every step the
//! two must agree on admission, state, mode, retry-after and counters.

use keel_breaker::*;
use proptest::prelude::*;
use std::collections::VecDeque;
use std::time::Duration;

#[derive(Debug, Clone)]
enum Op {
    Allow,
    Report(usize, Outcome),
    Drop(usize),
    Melt,
    Advance(u64),
    Reset,
    Disable,
    Enable,
    MetricsOnly,
    ForceOpen(Option<u64>),
    OpenFor(u64),
}

fn op() -> impl Strategy<Value = Op> {
    let outcome = prop_oneof![
        4 => Just(Outcome::Success),
        4 => Just(Outcome::Failure),
        1 => Just(Outcome::Ignore),
    ];
    prop_oneof![
        14 => Just(Op::Allow),
        10 => (any::<usize>(), outcome).prop_map(|(i, o)| Op::Report(i, o)),
        1 => any::<usize>().prop_map(Op::Drop),
        2 => Just(Op::Melt),
        6 => (0u64..4000).prop_map(Op::Advance),
        1 => Just(Op::Reset),
        1 => Just(Op::Disable),
        2 => Just(Op::Enable),
        1 => Just(Op::MetricsOnly),
        1 => proptest::option::of(1u64..5000).prop_map(Op::ForceOpen),
        1 => (1u64..5000).prop_map(Op::OpenFor),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Slot {
    Free,
    Held { id: u64, deadline_us: u64 },
    Done,
}

#[derive(Debug, Clone)]
struct MPermit {
    id: u64,
    generation: u64,
    probe: Option<usize>,
}

/// The reference model. Time is in nanoseconds since the breaker's birth.
struct Model {
    max_r: usize,
    max_t: u64,
    window: usize,
    min_calls: usize,
    rate: f64,
    open_ns: u64,
    max_hint_ns: u64,
    probes: usize,
    probe_timeout_ns: u64,
    /// Gradual recovery: (shares in ppm, step length, min calls).
    recovery: Option<(Vec<u64>, u64, usize)>,
    entered_at: u64,
    ticket: u64,

    now: u64,
    state: State,
    generation: u64,
    mode: Mode,
    forced_until: Option<u64>,
    open_until: u64,
    hint: Option<u64>,
    melts: VecDeque<u64>,
    outcomes: VecDeque<bool>,
    slots: Vec<Slot>,
    probe_ok: usize,
    next_id: u64,
    counters: Counters,
}

impl Model {
    fn clear_windows(&mut self) {
        self.melts.clear();
        self.outcomes.clear();
    }

    fn goto(&mut self, to: State) {
        self.generation += 1;
        self.state = to;
        match to {
            State::Open => {
                let d = self
                    .hint
                    .take()
                    .map_or(self.open_ns, |h| h.min(self.max_hint_ns));
                self.open_until = self.now + d;
                self.counters.trips += 1;
                self.clear_windows();
            }
            State::HalfOpen => {
                self.slots = vec![Slot::Free; self.probes];
                self.probe_ok = 0;
            }
            State::Closed | State::Recovering => {
                self.entered_at = self.now;
                self.ticket = 0;
                self.clear_windows();
            }
        }
    }

    fn reject(&mut self, reason: RejectReason, wait: Option<u64>) -> Result<MPermit, Rejected> {
        self.counters.rejected += 1;
        Err(Rejected {
            reason,
            retry_after: wait.map(Duration::from_nanos),
        })
    }

    fn permit(&mut self, probe: Option<usize>) -> MPermit {
        self.next_id += 1;
        MPermit {
            id: self.next_id,
            generation: self.generation,
            probe,
        }
    }

    fn decide(&mut self) -> Result<MPermit, Rejected> {
        loop {
            match self.state {
                State::Closed => return Ok(self.permit(None)),
                State::Open => {
                    if self.now < self.open_until {
                        let w = self.open_until - self.now;
                        return self.reject(RejectReason::Open, Some(w));
                    }
                    self.goto(State::HalfOpen);
                }
                State::HalfOpen => {
                    let now_us = self.now / 1000;
                    let free = self.slots.iter().position(|s| match s {
                        Slot::Free => true,
                        Slot::Held { deadline_us, .. } => *deadline_us <= now_us,
                        Slot::Done => false,
                    });
                    return match free {
                        Some(i) => {
                            let p = self.permit(Some(i));
                            self.slots[i] = Slot::Held {
                                id: p.id,
                                deadline_us: now_us + self.probe_timeout_ns / 1000,
                            };
                            Ok(p)
                        }
                        None => self.reject(RejectReason::HalfOpenFull, None),
                    };
                }
                State::Recovering => {
                    let Some((steps, step_ns, _)) = self.recovery.clone() else {
                        unreachable!("recovering without a recovery config")
                    };
                    let since = self.now - self.entered_at;
                    let step = (since / step_ns) as usize;
                    if step >= steps.len() {
                        self.goto(State::Closed);
                        continue;
                    }
                    let (t, share) = (u128::from(self.ticket), u128::from(steps[step]));
                    self.ticket += 1;
                    if (t + 1) * share / 1_000_000 > t * share / 1_000_000 {
                        return Ok(self.permit(None));
                    }
                    let left = step_ns - since % step_ns;
                    return self.reject(RejectReason::Recovering, Some(left));
                }
            }
        }
    }

    fn allow(&mut self) -> Result<MPermit, Rejected> {
        match self.mode {
            Mode::Normal => self.decide(),
            Mode::Disabled => Ok(self.permit(None)),
            Mode::MetricsOnly => match self.decide() {
                Ok(p) => Ok(p),
                Err(_) => {
                    self.counters.rejected -= 1; // the shadow decision is not a rejection
                    self.counters.shadow_rejected += 1;
                    Ok(self.permit(None))
                }
            },
            Mode::ForcedOpen => match self.forced_until {
                None => self.reject(RejectReason::ForcedOpen, None),
                Some(u) if self.now < u => {
                    self.reject(RejectReason::ForcedOpen, Some(u - self.now))
                }
                Some(_) => {
                    self.mode = Mode::Normal;
                    self.decide()
                }
            },
        }
    }

    fn free_slot(&mut self, p: &MPermit) {
        if let Some(i) = p.probe
            && let Slot::Held { id, .. } = self.slots[i]
            && id == p.id
            && p.generation == self.generation
        {
            self.slots[i] = Slot::Free;
        }
    }

    fn record(&mut self, p: &MPermit, outcome: Outcome) {
        match outcome {
            Outcome::Success => self.counters.successes += 1,
            Outcome::Ignore => {
                self.counters.ignored += 1;
                self.free_slot(p);
                return;
            }
            _ => self.counters.failures += 1,
        }
        if self.mode == Mode::Disabled || p.generation != self.generation {
            return;
        }
        let failed = outcome.is_failure();
        match (self.state, p.probe) {
            (State::HalfOpen, Some(i)) => {
                if failed {
                    self.goto(State::Open);
                } else if matches!(self.slots[i], Slot::Held { id, .. } if id == p.id) {
                    self.slots[i] = Slot::Done;
                    self.probe_ok += 1;
                    if self.probe_ok >= self.probes {
                        let to = if self.recovery.is_some() {
                            State::Recovering
                        } else {
                            State::Closed
                        };
                        self.goto(to);
                    }
                }
            }
            (State::HalfOpen, None) if failed => self.goto(State::Open),
            (State::Closed | State::Recovering, _) => {
                let min_calls = match (self.state, &self.recovery) {
                    (State::Recovering, Some((_, _, m))) => *m,
                    _ => self.min_calls,
                };
                let mut trip = false;
                if failed {
                    self.melts.push_back(self.now);
                    if self.melts.len() > self.max_r + 1 {
                        self.melts.pop_front();
                    }
                    trip = self.melts.len() == self.max_r + 1
                        && self.now - self.melts[0] <= self.max_t;
                }
                self.outcomes.push_back(failed);
                if self.outcomes.len() > self.window {
                    self.outcomes.pop_front();
                }
                let calls = self.outcomes.len();
                let fails = self.outcomes.iter().filter(|f| **f).count();
                if calls > 0 && calls >= min_calls && fails as f64 / calls as f64 >= self.rate {
                    trip = true;
                }
                if trip {
                    self.goto(State::Open);
                }
            }
            _ => {}
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        if self.mode == Mode::ForcedOpen {
            return self
                .forced_until
                .filter(|u| *u > self.now)
                .map(|u| Duration::from_nanos(u - self.now));
        }
        (self.state == State::Open && self.open_until > self.now)
            .then(|| Duration::from_nanos(self.open_until - self.now))
    }
}

fn ms(x: u64) -> Duration {
    Duration::from_millis(x)
}

type Params = (u32, u64, u32, u32, u32, u64);

fn run(params: Params, recovery: Option<(u64, u32)>, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let (max_r, max_t_ms, window, min_calls, probes, open_ms) = params;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let mut cfg = Config::fuse(max_r, ms(max_t_ms), ms(open_ms))
            .rate(Some(RatePolicy {
                window: Window::Count(window),
                min_calls,
                failure_rate: Some(0.6),
                slow: None,
            }))
            .half_open_probes(probes)
            .probe_timeout(ms(3000));
        // Fixed open duration so the model needs no random numbers.
        cfg.open_duration_cap = cfg.open_duration;
        cfg.max_hint = ms(4000);
        let steps = vec![0.1, 0.25, 0.5, 1.0];
        if let Some((step_ms, rec_min)) = recovery {
            cfg = cfg.recovery(Recovery {
                steps: steps.clone(),
                step_duration: ms(step_ms),
                min_calls: rec_min,
            });
        }
        let b = Breaker::new("model", cfg).expect("config");
        let mut m = Model {
            max_r: max_r as usize,
            max_t: max_t_ms * 1_000_000,
            window: window as usize,
            min_calls: min_calls as usize,
            rate: 0.6,
            open_ns: open_ms * 1_000_000,
            max_hint_ns: 4_000_000_000,
            probes: probes as usize,
            probe_timeout_ns: 3_000_000_000,
            recovery: recovery.map(|(step_ms, rec_min)| {
                let ppm = steps.iter().map(|s| (s * 1e6f64).round() as u64).collect();
                (ppm, step_ms * 1_000_000, rec_min as usize)
            }),
            entered_at: 0,
            ticket: 0,
            now: 0,
            state: State::Closed,
            generation: 0,
            mode: Mode::Normal,
            forced_until: None,
            open_until: 0,
            hint: None,
            melts: VecDeque::new(),
            outcomes: VecDeque::new(),
            slots: Vec::new(),
            probe_ok: 0,
            next_id: 0,
            counters: Counters::default(),
        };
        let mut held: Vec<(Permit<'_>, MPermit)> = Vec::new();
        for (step, op) in ops.into_iter().enumerate() {
            match op.clone() {
                Op::Allow => {
                    let real = b.allow();
                    let model = m.allow();
                    match (real, model) {
                        (Ok(r), Ok(mp)) => {
                            prop_assert_eq!(
                                r.is_probe(),
                                mp.probe.is_some(),
                                "step {} {:?}",
                                step,
                                op
                            );
                            held.push((r, mp));
                        }
                        (Err(r), Err(mr)) => prop_assert_eq!(r, mr, "step {}", step),
                        (r, mr) => prop_assert!(
                            false,
                            "step {step}: real {:?} model {:?}",
                            r.map(|_| ()),
                            mr.map(|_| ())
                        ),
                    }
                }
                Op::Report(i, outcome) if !held.is_empty() => {
                    let (r, mp) = held.remove(i % held.len());
                    r.record(outcome);
                    m.record(&mp, outcome);
                }
                Op::Drop(i) if !held.is_empty() => {
                    let (r, mp) = held.remove(i % held.len());
                    drop(r);
                    m.free_slot(&mp);
                }
                Op::Report(..) | Op::Drop(_) => {}
                Op::Melt => {
                    b.record_failure();
                    let mp = MPermit {
                        id: 0,
                        generation: m.generation,
                        probe: None,
                    };
                    m.record(&mp, Outcome::Failure);
                }
                Op::Advance(x) => {
                    tokio::time::advance(ms(x)).await;
                    m.now += x * 1_000_000;
                }
                Op::Reset => {
                    b.reset();
                    if m.mode == Mode::ForcedOpen {
                        m.mode = Mode::Normal;
                    }
                    m.hint = None;
                    m.goto(State::Closed);
                }
                Op::Disable => {
                    b.disable();
                    m.mode = Mode::Disabled;
                }
                Op::Enable => {
                    b.enable();
                    m.mode = Mode::Normal;
                }
                Op::MetricsOnly => {
                    b.metrics_only();
                    m.mode = Mode::MetricsOnly;
                }
                Op::ForceOpen(d) => {
                    b.force_open(d.map(ms));
                    m.forced_until = d.map(|x| m.now + x * 1_000_000);
                    m.mode = Mode::ForcedOpen;
                }
                Op::OpenFor(x) => {
                    b.open_for(ms(x));
                    let ns = x * 1_000_000;
                    if m.state == State::Open {
                        m.open_until = m.open_until.max(m.now + ns.min(m.max_hint_ns));
                    } else {
                        m.hint = Some(ns);
                        m.goto(State::Open);
                    }
                }
            }
            prop_assert_eq!(b.state(), m.state, "state after step {} {:?}", step, op);
            prop_assert_eq!(b.mode(), m.mode, "mode after step {} {:?}", step, op);
            prop_assert_eq!(
                b.retry_after(),
                m.retry_after(),
                "retry_after after step {}",
                step
            );
            let c = b.snapshot().counters;
            prop_assert_eq!(c.successes, m.counters.successes);
            prop_assert_eq!(c.failures, m.counters.failures);
            prop_assert_eq!(c.ignored, m.counters.ignored);
            prop_assert_eq!(
                c.rejected,
                m.counters.rejected,
                "rejected after step {}",
                step
            );
            prop_assert_eq!(c.shadow_rejected, m.counters.shadow_rejected);
            prop_assert_eq!(c.trips, m.counters.trips, "trips after step {}", step);
        }
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn breaker_matches_the_reference_model(
        params in (0u32..4, 100u64..5000, 1u32..8, 1u32..8, 1u32..4, 100u64..3000),
        recovery in proptest::option::of((200u64..3000, 1u32..6)),
        ops in proptest::collection::vec(op(), 1..80),
    ) {
        run(params, recovery, ops)?;
    }
}
