//! Many threads hammer one half-open breaker: never more probes than
//! permitted, whatever the interleaving. Real threads and real time (the
//! property does not depend on timing, only on the atomics).

use keel_breaker::*;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Barrier};
use std::time::Duration;

const PROBES: u32 = 4;
const THREADS: usize = 16;

fn half_open() -> Breaker {
    let cfg = Config::fuse(0, Duration::from_secs(60), Duration::from_millis(1))
        .half_open_probes(PROBES)
        .probe_timeout(Duration::from_secs(3600));
    let b = Breaker::new("stress", cfg).expect("config");
    b.record_failure();
    std::thread::sleep(Duration::from_millis(5));
    b
}

#[test]
fn held_probes_never_exceed_the_permit_count() {
    let b = half_open();
    let barrier = Arc::new(Barrier::new(THREADS));
    let admitted: usize = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|_| {
                let (b, barrier) = (&b, barrier.clone());
                s.spawn(move || {
                    barrier.wait();
                    let mut mine = Vec::new();
                    for _ in 0..2000 {
                        if let Ok(p) = b.allow() {
                            assert!(p.is_probe());
                            mine.push(p);
                        }
                    }
                    let n = mine.len();
                    std::mem::forget(mine); // keep the permits taken
                    n
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("thread")).sum()
    });
    assert_eq!(admitted, PROBES as usize);
    assert_eq!(b.state(), State::HalfOpen);
}

#[test]
fn concurrent_probes_in_flight_never_exceed_the_permit_count() {
    let b = half_open();
    let in_flight = AtomicUsize::new(0);
    let max_seen = AtomicUsize::new(0);
    let total = AtomicUsize::new(0);
    let barrier = Arc::new(Barrier::new(THREADS));
    std::thread::scope(|s| {
        for _ in 0..THREADS {
            let barrier = barrier.clone();
            let (b, in_flight, max_seen, total) = (&b, &in_flight, &max_seen, &total);
            s.spawn(move || {
                barrier.wait();
                for i in 0..5000 {
                    if let Ok(p) = b.allow() {
                        let now = in_flight.fetch_add(1, SeqCst) + 1;
                        max_seen.fetch_max(now, SeqCst);
                        total.fetch_add(1, SeqCst);
                        if i % 7 == 0 {
                            std::thread::yield_now();
                        }
                        in_flight.fetch_sub(1, SeqCst);
                        drop(p); // unreported: frees the slot for the next probe
                    }
                }
            });
        }
    });
    assert!(
        max_seen.load(SeqCst) <= PROBES as usize,
        "saw {}",
        max_seen.load(SeqCst)
    );
    assert!(total.load(SeqCst) > PROBES as usize, "slots were reused");
    assert_eq!(b.state(), State::HalfOpen);
}

#[test]
fn racing_probe_successes_close_exactly_once() {
    for _ in 0..50 {
        let b = half_open();
        let mut rx = b.subscribe();
        let permits: Vec<_> = (0..PROBES)
            .map(|_| b.allow_owned().expect("probe"))
            .collect();
        std::thread::scope(|s| {
            for p in permits {
                s.spawn(move || p.success());
            }
        });
        assert_eq!(b.state(), State::Closed);
        let closes = std::iter::from_fn(|| rx.try_recv().ok())
            .filter(|e| {
                matches!(
                    e.kind,
                    EventKind::StateChanged {
                        to: State::Closed,
                        ..
                    }
                )
            })
            .count();
        assert_eq!(closes, 1);
    }
}
