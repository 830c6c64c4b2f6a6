//! Drain plans carried out on tokio's paused clock, against connections
//! that behave as real ones do (close when asked, or ignore a gentle ask).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_drain::{CloseRequest, ConnKind, DrainPlan, Registry, Target};
use tokio::time::Instant;

#[derive(Clone, Copy, PartialEq)]
enum Behaviour {
    /// Closes as soon as it is asked.
    Polite,
    /// Ignores a gentle ask, closes when forced.
    Deaf,
    /// Never closes (a hung connection).
    Stuck,
}

type Closes = Arc<Mutex<Vec<(Duration, CloseRequest)>>>;

/// Registers `n` connections that record when (since `t0`) and how they
/// were asked to close.
fn connections(
    registry: &Registry,
    n: usize,
    endpoint: Option<&str>,
    behaviour: Behaviour,
    t0: Instant,
) -> Closes {
    let closes: Closes = Arc::default();
    for _ in 0..n {
        let mut conn = registry.register(ConnKind::TUNNEL, endpoint.map(Arc::from));
        let closes = closes.clone();
        tokio::spawn(async move {
            loop {
                let req = conn.closing().await;
                closes
                    .lock()
                    .expect("lock")
                    .push((t0.elapsed(), req.clone()));
                match behaviour {
                    Behaviour::Polite => return,
                    Behaviour::Deaf if req.force => return,
                    Behaviour::Deaf => {}
                    Behaviour::Stuck => std::future::pending::<()>().await,
                }
            }
        });
    }
    closes
}

fn times(closes: &Closes) -> Vec<Duration> {
    let mut t: Vec<Duration> = closes
        .lock()
        .expect("lock")
        .iter()
        .map(|(t, _)| *t)
        .collect();
    t.sort();
    t
}

#[tokio::test(start_paused = true)]
async fn fixed_batches_follow_the_plan_with_jitter_inside_each_interval() {
    let registry = Registry::new();
    let t0 = Instant::now();
    let closes = connections(&registry, 100, None, Behaviour::Polite, t0);
    tokio::task::yield_now().await;
    let plan = DrainPlan::batches(10, Duration::from_secs(2)).deadline(Duration::from_secs(60));
    let drain = keel_drain::start(&registry, Target::All, plan);
    assert!(drain.progress().expected_finish_ms <= 20_000);
    let done = drain.finished().await;
    assert_eq!(
        (
            done.total,
            done.signalled,
            done.closed,
            done.remaining,
            done.forced
        ),
        (100, 100, 100, 0, 0)
    );
    assert!(done.done);
    let t = times(&closes);
    for (batch, chunk) in t.chunks(10).enumerate() {
        let lo = Duration::from_secs(2 * batch as u64);
        let hi = lo + Duration::from_secs(2);
        for at in chunk {
            assert!(
                *at >= lo && *at <= hi,
                "batch {batch}: closed at {at:?}, outside {lo:?}..{hi:?}"
            );
        }
    }
    // Jitter spreads each batch: no two closes at the same millisecond.
    let distinct: std::collections::HashSet<u128> = t.iter().map(|d| d.as_millis()).collect();
    assert!(
        distinct.len() > 90,
        "closes bunched together: {} distinct",
        distinct.len()
    );
    assert!(registry.is_empty());
}

#[tokio::test(start_paused = true)]
async fn percent_pacing_closes_a_share_of_the_initial_count_per_interval() {
    let registry = Registry::new();
    let t0 = Instant::now();
    let closes = connections(&registry, 1000, None, Behaviour::Polite, t0);
    tokio::task::yield_now().await;
    let plan = DrainPlan::percent(25.0, Duration::from_millis(100)).jitter(false);
    let done = keel_drain::start(&registry, Target::All, plan)
        .finished()
        .await;
    assert_eq!(done.closed, 1000);
    let t = times(&closes);
    for (i, chunk) in t.chunks(250).enumerate() {
        assert!(
            chunk
                .iter()
                .all(|d| *d == Duration::from_millis(100 * i as u64)),
            "batch {i}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn gradual_pacing_spreads_closes_evenly_over_the_duration() {
    let registry = Registry::new();
    let t0 = Instant::now();
    let closes = connections(&registry, 1000, None, Behaviour::Polite, t0);
    tokio::task::yield_now().await;
    let plan = DrainPlan::gradual(Duration::from_secs(10))
        .jitter(false)
        .deadline(Duration::from_secs(30));
    keel_drain::start(&registry, Target::All, plan)
        .finished()
        .await;
    let t = times(&closes);
    let mut per_second = [0usize; 11];
    for d in &t {
        per_second[d.as_secs() as usize] += 1;
    }
    assert_eq!(&per_second[..10], &[100; 10], "{per_second:?}");
    assert!(per_second[10] <= 1);
}

#[tokio::test(start_paused = true)]
async fn the_deadline_forces_what_is_left() {
    let registry = Registry::new();
    let t0 = Instant::now();
    let closes = connections(&registry, 10, None, Behaviour::Deaf, t0);
    tokio::task::yield_now().await;
    // One per 10 s would take 100 s; the deadline is 5 s.
    let plan = DrainPlan::batches(1, Duration::from_secs(10))
        .jitter(false)
        .deadline(Duration::from_secs(5));
    let done = keel_drain::start(&registry, Target::All, plan)
        .finished()
        .await;
    assert_eq!((done.closed, done.forced, done.remaining), (10, 10, 0));
    assert!(
        done.elapsed_ms == 5_000,
        "forced exactly at the deadline: {}",
        done.elapsed_ms
    );
    let closes = closes.lock().expect("lock");
    let gentle: Vec<_> = closes.iter().filter(|(_, r)| !r.force).collect();
    let forced: Vec<_> = closes.iter().filter(|(_, r)| r.force).collect();
    // The first on schedule; the nine the pace did not reach, all at
    // once a close grace (a tenth of the deadline here) before it, so
    // each hears its close and hint before the cut.
    assert_eq!(gentle.len(), 10, "everyone is asked before the cut");
    assert_eq!(gentle[0].0, Duration::ZERO);
    assert!(
        gentle[1..]
            .iter()
            .all(|(t, r)| *t == Duration::from_millis(4_500)
                && r.reconnect_after < Duration::from_secs(5)),
        "{gentle:?}"
    );
    assert_eq!(
        forced.len(),
        10,
        "the deaf one is forced too (an ask upgraded to force)"
    );
    assert!(forced.iter().all(|(t, _)| *t == Duration::from_secs(5)));
}

#[tokio::test(start_paused = true)]
async fn a_stuck_connection_does_not_hold_the_drain_past_the_grace() {
    let registry = Registry::new();
    let t0 = Instant::now();
    let _polite = connections(&registry, 5, None, Behaviour::Polite, t0);
    let _stuck = connections(&registry, 1, None, Behaviour::Stuck, t0);
    tokio::task::yield_now().await;
    let plan = DrainPlan::batches(10, Duration::from_secs(1)).deadline(Duration::from_secs(3));
    let done = keel_drain::start(&registry, Target::All, plan)
        .finished()
        .await;
    assert!(done.done);
    assert_eq!((done.closed, done.remaining), (5, 1));
    assert_eq!(done.elapsed_ms, 4_000, "deadline 3 s + 1 s grace");
}

#[tokio::test(start_paused = true)]
async fn an_endpoint_drain_leaves_other_connections_alone() {
    let registry = Registry::new();
    let t0 = Instant::now();
    let blue = connections(
        &registry,
        30,
        Some("http://blue:3000"),
        Behaviour::Polite,
        t0,
    );
    let green = connections(
        &registry,
        20,
        Some("http://green:3000"),
        Behaviour::Polite,
        t0,
    );
    let plain = registry.register(ConnKind::HTTP1, None);
    tokio::task::yield_now().await;
    let plan = DrainPlan::batches(10, Duration::from_millis(100));
    let done = keel_drain::start(&registry, Target::Endpoint("http://blue:3000".into()), plan)
        .finished()
        .await;
    assert_eq!(done.total, 30);
    assert_eq!(blue.lock().expect("lock").len(), 30);
    assert!(green.lock().expect("lock").is_empty());
    assert!(plain.requested().is_none());
    assert_eq!(registry.len(), 21);
}

#[tokio::test(start_paused = true)]
async fn reconnect_hints_are_spread_within_the_window() {
    let registry = Registry::new();
    let t0 = Instant::now();
    let closes = connections(&registry, 200, None, Behaviour::Polite, t0);
    tokio::task::yield_now().await;
    let plan =
        DrainPlan::batches(200, Duration::from_secs(1)).reconnect_window(Duration::from_secs(10));
    keel_drain::start(&registry, Target::All, plan)
        .finished()
        .await;
    let hints: Vec<Duration> = closes
        .lock()
        .expect("lock")
        .iter()
        .map(|(_, r)| r.reconnect_after)
        .collect();
    assert!(hints.iter().all(|h| *h < Duration::from_secs(10)));
    let early = hints
        .iter()
        .filter(|h| **h < Duration::from_secs(5))
        .count();
    assert!(
        (70..130).contains(&early),
        "hints not uniform: {early} of 200 under half the window"
    );
}

#[tokio::test(start_paused = true)]
async fn progress_is_observable_and_monotonic() {
    let registry = Registry::new();
    let t0 = Instant::now();
    let _c = connections(&registry, 50, None, Behaviour::Polite, t0);
    tokio::task::yield_now().await;
    let drain = keel_drain::start(
        &registry,
        Target::All,
        DrainPlan::batches(10, Duration::from_secs(1)),
    );
    let mut watch = drain.watch();
    let mut last = drain.progress();
    assert_eq!((last.total, last.closed, last.remaining), (50, 0, 50));
    while watch.changed().await.is_ok() {
        let p = watch.borrow_and_update().clone();
        assert!(p.signalled >= last.signalled && p.closed >= last.closed);
        assert_eq!(p.closed + p.remaining, p.total);
        last = p;
        if last.done {
            break;
        }
    }
    assert!(last.done && last.closed == 50);
}

#[test]
fn registry_survives_concurrent_registration_from_many_threads() {
    let registry = Registry::new();
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                let mut held = Vec::new();
                for i in 0..10_000 {
                    held.push(registry.register(ConnKind::HTTP1, None));
                    if i % 3 == 0 {
                        held.pop();
                    }
                }
            });
        }
    });
    assert_eq!(registry.len(), 0);
}

/// A kind the library does not know is drained on its own, and kinds are
/// compared by name, not by where the name is stored.
#[tokio::test(start_paused = true)]
async fn user_defined_kinds_are_drained_on_their_own() {
    const MQTT: ConnKind = ConnKind::new("mqtt");
    let registry = Registry::new();
    let t0 = Instant::now();
    let tunnels = connections(&registry, 4, None, Behaviour::Polite, t0);
    let mut mqtt = Vec::new();
    for _ in 0..6 {
        mqtt.push(registry.register(MQTT, None));
    }
    // The same name built at run time is the same kind.
    let name: &'static str = String::from("mqtt").leak();
    let late = registry.register(ConnKind::new(name), None);
    let other = registry.register(ConnKind::new("mqtt_admin"), None);
    assert_eq!(registry.count(&Target::Kind(MQTT)), 7);
    assert_eq!(registry.count(&Target::Kind(ConnKind::TUNNEL)), 4);

    let plan = DrainPlan::batches(100, Duration::from_millis(100)).jitter(false);
    let drain = keel_drain::start(&registry, Target::Kind(MQTT), plan);
    // The first batch is due at once; the paused clock runs the drain to it.
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert!(mqtt.iter().all(|c| c.requested().is_some()));
    assert!(late.requested().is_some());
    assert!(other.requested().is_none());
    drop(mqtt);
    drop(late);
    let done = drain.finished().await;
    assert_eq!((done.total, done.closed, done.remaining), (7, 7, 0));
    assert!(tunnels.lock().expect("lock").is_empty());
    assert_eq!(registry.len(), 5);
}
