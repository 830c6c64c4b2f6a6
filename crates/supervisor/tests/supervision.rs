//! OTP semantics, driven through the public API with tokio's paused clock.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{Action, Log, Puppet, event, ready, wait_for};
use keel_supervisor::{
    AppError, Application, AutoShutdown, BuildError, ChildError, ChildFuse, ChildSpec, ChildState,
    ControlError, EventKind, ExitReason, Restart, RestartBackoff, Shutdown, StartDecision,
    StartError, Strategy, Supervisor,
};
use tokio::time::Instant;

fn three(log: &Log) -> (Puppet, Puppet, Puppet) {
    (
        Puppet::new("a", log),
        Puppet::new("b", log),
        Puppet::new("c", log),
    )
}

fn tree(strategy: Strategy, children: &[&Puppet]) -> Supervisor {
    children
        .iter()
        .fold(Supervisor::builder("root").strategy(strategy), |b, p| {
            b.child(p.spec())
        })
        .build()
        .expect("valid spec")
}

#[tokio::test(start_paused = true)]
async fn children_start_in_order_and_stop_in_reverse() {
    let log = Log::default();
    let (a, b, c) = three(&log);
    let handle = tree(Strategy::OneForOne, &[&a, &b, &c])
        .start()
        .await
        .expect("start");
    assert_eq!(log.take(), ["start a", "start b", "start c"]);
    assert!(handle.is_ready());
    assert_eq!(handle.shutdown().await, ExitReason::Shutdown);
    assert_eq!(log.take(), ["stop c", "stop b", "stop a"]);
}

#[tokio::test(start_paused = true)]
async fn one_for_one_restarts_only_the_failed_child() {
    let log = Log::default();
    let (a, b, c) = three(&log);
    let sup = tree(Strategy::OneForOne, &[&a, &b, &c]);
    let handle = sup.start().await.expect("start");
    let mut events = handle.events();
    log.take();
    b.crash();
    ready(&mut events, "root/b").await;
    assert_eq!(log.take(), ["start b"]);
    assert_eq!((a.starts(), b.starts(), c.starts()), (1, 2, 1));
    assert_eq!(handle.snapshot().children[1].restarts, 1);
    handle.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn one_for_all_stops_the_others_in_reverse_then_restarts_all_in_order() {
    let log = Log::default();
    let (a, b, c) = three(&log);
    let sup = tree(Strategy::OneForAll, &[&a, &b, &c]);
    let handle = sup.start().await.expect("start");
    let mut events = handle.events();
    log.take();
    b.crash();
    ready(&mut events, "root/c").await;
    assert_eq!(
        log.take(),
        ["stop c", "stop a", "start a", "start b", "start c"]
    );
    handle.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn rest_for_one_restarts_the_failed_child_and_those_after_it() {
    let log = Log::default();
    let (a, b, c) = three(&log);
    let sup = tree(Strategy::RestForOne, &[&a, &b, &c]);
    let handle = sup.start().await.expect("start");
    let mut events = handle.events();
    log.take();
    b.crash();
    ready(&mut events, "root/c").await;
    assert_eq!(log.take(), ["stop c", "start b", "start c"]);
    assert_eq!(a.starts(), 1);
    handle.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn transient_children_restart_only_after_abnormal_exits() {
    let log = Log::default();
    let t = Puppet::new("t", &log);
    let sup = Supervisor::builder("root")
        .child(t.spec().restart(Restart::Transient))
        .build()
        .expect("spec");
    let handle = sup.start().await.expect("start");
    let mut events = handle.events();

    t.send(Action::Panic);
    let exited = event(&mut events, "root/t", |k| {
        matches!(k, EventKind::Exited { .. })
    })
    .await;
    assert!(
        matches!(exited.kind, EventKind::Exited { reason: ExitReason::Panic(ref m) } if m.contains("t panicked"))
    );
    ready(&mut events, "root/t").await;

    t.send(Action::ExitShutdown);
    event(&mut events, "root/t", |k| *k == EventKind::Stopped).await;
    assert_eq!(t.starts(), 2, "a shutdown exit is not restarted");
    assert_eq!(handle.snapshot().children[0].state, ChildState::Stopped);
    handle.shutdown().await;

    // A normal return is not restarted either.
    let t2 = Puppet::new("t2", &log);
    let sup = Supervisor::builder("root")
        .child(t2.spec().restart(Restart::Transient))
        .build()
        .expect("spec");
    let handle = sup.start().await.expect("start");
    let mut events = handle.events();
    t2.send(Action::Exit);
    event(&mut events, "root/t2", |k| *k == EventKind::Stopped).await;
    assert_eq!(t2.starts(), 1);
    assert!(
        handle.is_ready(),
        "a transient child that finished does not block readiness"
    );
    handle.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn temporary_children_are_never_restarted_even_by_a_group_restart() {
    let log = Log::default();
    let (a, b, c) = three(&log);
    let sup = Supervisor::builder("root")
        .strategy(Strategy::OneForAll)
        .child(a.spec())
        .child(b.spec().restart(Restart::Temporary))
        .child(c.spec())
        .build()
        .expect("spec");
    let handle = sup.start().await.expect("start");
    let mut events = handle.events();
    log.take();
    a.crash();
    ready(&mut events, "root/c").await;
    assert_eq!(log.take(), ["stop c", "stop b", "start a", "start c"]);
    let names: Vec<String> = handle
        .snapshot()
        .children
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, ["a", "c"], "the temporary child is removed");

    // A crashing temporary child is not restarted.
    let t = Puppet::new("t", &log);
    let sup = Supervisor::builder("root2")
        .child(t.spec().restart(Restart::Temporary))
        .build()
        .expect("spec");
    let handle2 = sup.start().await.expect("start");
    let mut events = handle2.events();
    t.crash();
    event(&mut events, "root2/t", |k| *k == EventKind::Stopped).await;
    assert_eq!(t.starts(), 1);
    assert!(handle2.snapshot().children.is_empty());
    handle2.shutdown().await;
    handle.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn exceeding_intensity_stops_children_in_reverse_and_escalates() {
    let log = Log::default();
    let (a, b, _) = three(&log);
    let sup = Supervisor::builder("root")
        .intensity(3, Duration::from_secs(5))
        .child(a.spec())
        .child(b.spec())
        .build()
        .expect("spec");
    let handle = sup.start().await.expect("start");
    let mut events = handle.events();
    for _ in 0..3 {
        b.crash();
        ready(&mut events, "root/b").await;
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    log.take();
    b.crash(); // the 4th restart inside 5 s
    // OTP's supervisor exits with `shutdown` when it gives up; the detail
    // is in the event and the snapshot.
    assert_eq!(handle.wait().await, ExitReason::Shutdown);
    assert_eq!(log.take(), ["stop a"], "b had already exited; a is stopped");
    wait_for(&mut events, "escalated", |e| {
        &*e.path == "root"
            && matches!(e.kind, EventKind::Escalated { ref child, restarts: 4 } if &**child == "root/b")
    })
    .await;
    let escalation = handle.snapshot().escalation.expect("escalation recorded");
    assert_eq!(
        (escalation.child.as_str(), escalation.restarts),
        ("root/b", 4)
    );
}

#[tokio::test(start_paused = true)]
async fn restarts_older_than_the_period_are_forgotten() {
    let log = Log::default();
    let a = Puppet::new("a", &log);
    let sup = Supervisor::builder("root")
        .intensity(2, Duration::from_secs(5))
        .child(a.spec())
        .build()
        .expect("spec");
    let handle = sup.start().await.expect("start");
    let mut events = handle.events();
    // Two restarts every 5.001 s, forever within budget.
    for _ in 0..5 {
        a.crash();
        ready(&mut events, "root/a").await;
        a.crash();
        ready(&mut events, "root/a").await;
        tokio::time::advance(Duration::from_millis(5001)).await;
    }
    assert_eq!(a.starts(), 11);
    assert!(handle.exit_reason().is_none());
    handle.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn escalation_travels_through_two_nested_levels() {
    let log = Log::default();
    let leaf = Puppet::new("leaf", &log);
    let mid = Supervisor::builder("mid")
        .intensity(1, Duration::from_secs(5))
        .child(leaf.spec())
        .build()
        .expect("mid");
    let root = Supervisor::builder("root")
        .intensity(1, Duration::from_secs(5))
        .child(mid)
        .build()
        .expect("root");
    let handle = root.start().await.expect("start");
    let mut events = handle.events();

    // Round 1: the leaf's second crash exceeds mid's intensity; mid
    // escalates and root restarts mid (its first restart).
    leaf.crash();
    ready(&mut events, "root/mid/leaf").await;
    leaf.crash();
    event(&mut events, "root/mid", |k| {
        matches!(k, EventKind::Escalated { .. })
    })
    .await;
    event(&mut events, "root/mid", |k| {
        matches!(k, EventKind::Restarted { restarts: 1, .. })
    })
    .await;
    ready(&mut events, "root/mid/leaf").await;
    assert_eq!(leaf.starts(), 3);

    // Round 2: mid escalates again; root's second restart exceeds its own
    // intensity, so root stops and exits with `shutdown` (OTP's reason).
    leaf.crash();
    ready(&mut events, "root/mid/leaf").await;
    leaf.crash();
    event(
        &mut events,
        "root",
        |k| matches!(k, EventKind::Escalated { child, .. } if &**child == "root/mid"),
    )
    .await;
    assert_eq!(handle.wait().await, ExitReason::Shutdown);
    assert_eq!(handle.snapshot().state, ChildState::Stopped);
}

#[tokio::test(start_paused = true)]
async fn a_failed_start_stops_started_children_in_reverse_and_returns_the_error() {
    let log = Log::default();
    let (a, b, c) = three(&log);
    let bad = ChildSpec::new("bad", |_ctx| async {
        Err(ChildError::msg("cannot bind :80"))
    });
    let sup = Supervisor::builder("root")
        .child(a.spec())
        .child(b.spec())
        .child(bad)
        .child(c.spec())
        .build()
        .expect("spec");
    let err = sup.start().await.err().expect("start must fail");
    assert_eq!(
        err,
        StartError::ChildFailed {
            child: "root/bad".into(),
            reason: ExitReason::msg("cannot bind :80"),
        }
    );
    assert_eq!(log.take(), ["start a", "start b", "stop b", "stop a"]);
    assert_eq!(c.starts(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_child_that_ignores_cancellation_is_aborted_at_its_timeout() {
    let log = Log::default();
    let a = Puppet::new("a", &log);
    let stubborn = Puppet::new("stubborn", &log).stubborn();
    let sup = Supervisor::builder("root")
        .child(a.spec())
        .child(
            stubborn
                .spec()
                .shutdown(Shutdown::Timeout(Duration::from_secs(2))),
        )
        .build()
        .expect("spec");
    let handle = sup.start().await.expect("start");
    let mut events = handle.events();
    log.take();
    let t0 = Instant::now();
    handle.shutdown().await;
    // Virtual time: exactly the timeout passed before the abort.
    assert_eq!(Instant::now() - t0, Duration::from_secs(2));
    assert_eq!(
        log.take(),
        ["stop a"],
        "the stubborn child never ran its stop code"
    );
    let e = event(&mut events, "root/stubborn", |k| {
        matches!(k, EventKind::Exited { .. })
    })
    .await;
    assert_eq!(
        e.kind,
        EventKind::Exited {
            reason: ExitReason::Killed
        }
    );
}

#[tokio::test(start_paused = true)]
async fn brutal_kill_does_not_wait_and_infinity_waits() {
    let log = Log::default();
    let brutal = Puppet::new("brutal", &log);
    let slow_stop = ChildSpec::new("patient", |ctx| async move {
        ctx.ready();
        ctx.cancelled().await;
        tokio::time::sleep(Duration::from_secs(600)).await; // long cleanup
        Ok(())
    })
    .shutdown(Shutdown::Infinity);
    let sup = Supervisor::builder("root")
        .child(slow_stop)
        .child(brutal.spec().shutdown(Shutdown::Brutal))
        .build()
        .expect("spec");
    let handle = sup.start().await.expect("start");
    log.take();
    let t0 = Instant::now();
    handle.shutdown().await;
    assert_eq!(
        log.take(),
        Vec::<String>::new(),
        "brutal kill runs no stop code"
    );
    assert_eq!(
        Instant::now() - t0,
        Duration::from_secs(600),
        "infinity waited for the cleanup"
    );
}

#[tokio::test(start_paused = true)]
async fn any_significant_child_exiting_shuts_the_supervisor_down() {
    let log = Log::default();
    let (a, job, _) = three(&log);
    let sup = Supervisor::builder("root")
        .auto_shutdown(AutoShutdown::AnySignificant)
        .child(a.spec())
        .child(job.spec().restart(Restart::Transient).significant(true))
        .build()
        .expect("spec");
    let handle = sup.start().await.expect("start");
    log.take();
    job.send(Action::Exit);
    assert_eq!(handle.wait().await, ExitReason::Shutdown);
    assert_eq!(log.take(), ["stop a"]);
}

#[tokio::test(start_paused = true)]
async fn all_significant_waits_for_every_significant_child() {
    let log = Log::default();
    let (a, j1, j2) = three(&log);
    let sup = Supervisor::builder("root")
        .auto_shutdown(AutoShutdown::AllSignificant)
        .child(a.spec())
        .child(j1.spec().restart(Restart::Temporary).significant(true))
        .child(j2.spec().restart(Restart::Transient).significant(true))
        .build()
        .expect("spec");
    let handle = sup.start().await.expect("start");
    let mut events = handle.events();
    j1.crash(); // temporary: not restarted, counts as exited
    event(&mut events, "root/b", |k| *k == EventKind::Stopped).await;
    assert!(handle.exit_reason().is_none());
    j2.crash(); // transient + abnormal: restarted, still running
    ready(&mut events, "root/c").await;
    assert!(handle.exit_reason().is_none());
    j2.send(Action::Exit);
    assert_eq!(handle.wait().await, ExitReason::Shutdown);
}

#[test]
fn permanent_children_cannot_be_significant() {
    let err = Supervisor::builder("root")
        .child(ChildSpec::new("p", |_| async { Ok(()) }).significant(true))
        .build()
        .expect_err("must be refused");
    assert!(matches!(err, BuildError::PermanentSignificant { .. }));
    let dup = Supervisor::builder("root")
        .child(ChildSpec::new("x", |_| async { Ok(()) }))
        .child(ChildSpec::new("x", |_| async { Ok(()) }))
        .build()
        .expect_err("duplicate names");
    assert!(dup.to_string().contains("two children are named x"));
}

#[tokio::test(start_paused = true)]
async fn deferred_init_does_not_block_siblings_and_readiness_follows() {
    let log = Log::default();
    let later = Puppet::new("later", &log);
    let slow = ChildSpec::new("slow", |ctx| async move {
        ctx.defer("warming the cache");
        tokio::time::sleep(Duration::from_secs(10)).await;
        ctx.ready();
        ctx.cancelled().await;
        Ok(())
    });
    let sup = Supervisor::builder("root")
        .child(slow)
        .child(later.spec())
        .build()
        .expect("spec");
    let mut events = sup.events();
    let t0 = Instant::now();
    let handle = sup.start().await.expect("start");
    assert_eq!(
        Instant::now(),
        t0,
        "start returned without waiting for the slow setup"
    );
    assert_eq!(
        later.starts(),
        1,
        "the sibling started while the first still warms up"
    );
    assert!(!handle.is_ready());
    let why = handle.probe().not_ready();
    assert_eq!(why.len(), 1);
    assert_eq!(
        (why[0].path.as_str(), why[0].reason.as_str()),
        ("root/slow", "warming the cache")
    );
    ready(&mut events, "root/slow").await;
    assert_eq!(Instant::now() - t0, Duration::from_secs(10));
    assert!(handle.is_ready());
    handle.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_child_can_become_not_ready_and_ready_again_without_exiting() {
    let flip = Arc::new(tokio::sync::Notify::new());
    let f = flip.clone();
    let conn = ChildSpec::new("conn", move |ctx| {
        let f = f.clone();
        async move {
            ctx.ready();
            f.notified().await;
            ctx.not_ready("dependency lost");
            f.notified().await;
            ctx.ready();
            ctx.cancelled().await;
            Ok(())
        }
    });
    let sup = Supervisor::builder("root")
        .child(conn)
        .build()
        .expect("spec");
    let handle = sup.start().await.expect("start");
    let mut events = handle.events();
    assert!(handle.is_ready());
    flip.notify_one();
    event(&mut events, "root/conn", |k| {
        matches!(k, EventKind::NotReady { .. })
    })
    .await;
    assert!(!handle.is_ready());
    assert_eq!(handle.probe().not_ready()[0].reason, "dependency lost");
    flip.notify_one();
    ready(&mut events, "root/conn").await;
    assert!(handle.is_ready());
    assert_eq!(handle.snapshot().children[0].restarts, 0, "it never exited");
    handle.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn dynamic_supervisor_adds_removes_restarts_and_caps_children() {
    let log = Log::default();
    let sup = Supervisor::builder("conns")
        .strategy(Strategy::Dynamic {
            max_children: Some(2),
        })
        .build()
        .expect("spec");
    let control = sup.control();
    let handle = sup.start().await.expect("start");
    let (c1, c2, c3) = (
        Puppet::new("c1", &log),
        Puppet::new("c2", &log),
        Puppet::new("c3", &log),
    );
    control.start_child(c1.spec()).await.expect("c1");
    control.start_child(c2.spec()).await.expect("c2");
    let mut events = handle.events();
    let err = control
        .start_child(c3.spec())
        .await
        .expect_err("over the cap");
    assert!(matches!(err, StartError::MaxChildren { max: 2, .. }));
    c1.crash();
    ready(&mut events, "conns/c1").await;
    assert_eq!(c1.starts(), 2);
    control.terminate_child("c2").await.expect("c2 terminated");
    assert!(
        matches!(
            control.terminate_child("c2").await,
            Err(ControlError::NotFound { .. })
        ),
        "a dynamic child is removed when terminated"
    );
    control.start_child(c3.spec()).await.expect("room again");
    let failing = ChildSpec::new("bad", |_| async { Err(ChildError::msg("no")) });
    assert!(matches!(
        control.start_child(failing).await,
        Err(StartError::MaxChildren { .. })
    ));
    control.terminate_child("c3").await.expect("c3 terminated");
    let failing = ChildSpec::new("bad", |_| async { Err(ChildError::msg("no")) });
    let err = control.start_child(failing).await.expect_err("start fails");
    assert!(matches!(err, StartError::ChildFailed { ref child, .. } if child == "conns/bad"));
    let names: Vec<String> = handle
        .snapshot()
        .children
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, ["c1"]);
    handle.shutdown().await;
    assert!(matches!(
        control.start_child(c2.spec()).await,
        Err(StartError::NotRunning(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn backoff_delays_restarts_within_the_cap() {
    let delays = seeded_restart_delays(42).await;
    assert!(
        delays.iter().any(|d| *d > Duration::from_millis(100)),
        "the ceiling grew: {delays:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_seed_makes_restart_jitter_reproducible() {
    let first = seeded_restart_delays(7).await;
    assert_eq!(first, seeded_restart_delays(7).await);
    assert_ne!(first, seeded_restart_delays(8).await);
}

/// Crashes one child with restart backoff eight times under `seed`; checks
/// every delay against the ceiling and the time actually waited, and
/// returns the delays.
async fn seeded_restart_delays(seed: u64) -> Vec<Duration> {
    let log = Log::default();
    let a = Puppet::new("a", &log);
    let backoff = RestartBackoff::new(Duration::from_millis(100), Duration::from_millis(800))
        .reset_after(Duration::from_secs(60));
    let sup = Supervisor::builder("root")
        .intensity(100, Duration::from_secs(5))
        .seed(seed)
        .child(a.spec().backoff(backoff))
        .build()
        .expect("spec");
    let handle = sup.start().await.expect("start");
    let mut events = handle.events();
    let mut delays = Vec::new();
    for attempt in 0..8u32 {
        let crashed_at = Instant::now();
        a.crash();
        let e = event(&mut events, "root/a", |k| {
            matches!(k, EventKind::Restarted { .. })
        })
        .await;
        let EventKind::Restarted { delay, .. } = e.kind else {
            unreachable!()
        };
        assert!(
            delay <= backoff.ceiling(attempt),
            "attempt {attempt}: {delay:?}"
        );
        assert!(delay <= Duration::from_millis(800));
        assert_eq!(handle.snapshot().children[0].state, ChildState::Restarting);
        ready(&mut events, "root/a").await;
        // The timer wheel has millisecond resolution.
        let waited = Instant::now() - crashed_at;
        assert!(
            waited >= delay && waited <= delay + Duration::from_millis(1),
            "{waited:?} vs {delay:?}"
        );
        delays.push(delay);
    }
    handle.shutdown().await;
    delays
}

#[tokio::test(start_paused = true)]
async fn a_fused_child_is_parked_instead_of_escalating_then_tried_again() {
    let log = Log::default();
    let (a, flappy, _) = three(&log);
    let fuse = ChildFuse {
        max_restarts: 2,
        period: Duration::from_secs(10),
        cool_down: Duration::from_secs(30),
    };
    let sup = Supervisor::builder("root")
        .intensity(1, Duration::from_secs(5)) // strict: two plain restarts would escalate
        .child(a.spec())
        .child(flappy.spec().fuse(fuse))
        .build()
        .expect("spec");
    let handle = sup.start().await.expect("start");
    let mut events = handle.events();
    for _ in 0..2 {
        flappy.crash();
        ready(&mut events, "root/b").await;
    }
    flappy.crash(); // third restart inside 10 s: parked
    let parked_at = Instant::now();
    event(&mut events, "root/b", |k| {
        matches!(k, EventKind::Parked { .. })
    })
    .await;
    assert_eq!(handle.snapshot().children[1].state, ChildState::Parked);
    assert!(!handle.is_ready());
    assert!(handle.exit_reason().is_none(), "no escalation");
    ready(&mut events, "root/b").await;
    assert_eq!(Instant::now() - parked_at, Duration::from_secs(30));
    assert_eq!(flappy.starts(), 4);
    assert!(handle.is_ready());
    assert_eq!(a.starts(), 1);
    handle.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn snapshot_serialises_the_whole_tree() {
    let log = Log::default();
    let leaf = Puppet::new("leaf", &log);
    let mid = Supervisor::builder("mid")
        .strategy(Strategy::OneForAll)
        .child(leaf.spec())
        .build()
        .expect("mid");
    let root = Supervisor::builder("root")
        .child(mid)
        .build()
        .expect("root");
    let handle = root.start().await.expect("start");
    let mut events = handle.events();
    leaf.crash();
    ready(&mut events, "root/mid/leaf").await;
    tokio::time::advance(Duration::from_millis(1500)).await;
    let json: serde_json::Value = serde_json::to_value(handle.snapshot()).expect("json");
    assert_eq!(json["name"], "root");
    assert_eq!(json["kind"], "supervisor");
    assert_eq!(json["strategy"], "one_for_one");
    let mid = &json["children"][0];
    assert_eq!(
        (mid["path"].as_str(), mid["strategy"].as_str()),
        (Some("root/mid"), Some("one_for_all"))
    );
    let leaf = &mid["children"][0];
    assert_eq!(leaf["path"], "root/mid/leaf");
    assert_eq!(leaf["kind"], "worker");
    assert_eq!(leaf["state"], "running");
    assert_eq!(leaf["ready"], true);
    assert_eq!(leaf["restarts"], 1);
    assert_eq!(leaf["uptime_ms"], 1500);
    assert_eq!(leaf["last_exit"], "error: leaf crashed");
    handle.shutdown().await;
}

// On the current-thread runtime a task leaves the alive count before anyone
// awaiting it runs again, so the count is exact here.
#[tokio::test(start_paused = true)]
async fn no_task_is_left_running_after_shutdown() {
    let metrics = tokio::runtime::Handle::current().metrics();
    let before = metrics.num_alive_tasks();
    let log = Log::default();
    let leaves: Vec<Puppet> = (0..20)
        .map(|i| Puppet::new(&format!("w{i}"), &log))
        .collect();
    let mid = leaves
        .iter()
        .fold(Supervisor::builder("mid"), |b, p| b.child(p.spec()))
        .build()
        .expect("mid");
    let stubborn = Puppet::new("stubborn", &log).stubborn();
    let root = Supervisor::builder("root")
        .child(mid)
        .child(
            stubborn
                .spec()
                .shutdown(Shutdown::Timeout(Duration::from_millis(50))),
        )
        .build()
        .expect("root");
    let handle = root.start().await.expect("start");
    assert!(metrics.num_alive_tasks() >= before + 23);
    handle.shutdown().await;
    // Aborted tasks are reaped by the supervisor before shutdown returns.
    assert_eq!(metrics.num_alive_tasks(), before);
}

#[tokio::test(start_paused = true)]
async fn start_handler_decides_continue_retry_or_halt() {
    let log = Log::default();
    let a = Puppet::new("a", &log);
    let attempts = Arc::new(AtomicUsize::new(0));
    let n = attempts.clone();
    // Fails twice, then starts.
    let flaky = ChildSpec::new("flaky", move |ctx| {
        let n = n.clone();
        async move {
            if n.fetch_add(1, Ordering::SeqCst) < 2 {
                return Err(ChildError::msg("dependency down"));
            }
            ctx.ready();
            ctx.cancelled().await;
            Ok(())
        }
    });
    let broken = ChildSpec::new("broken", |_| async { Err(ChildError::msg("bad config")) });
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = seen.clone();
    let root = Supervisor::builder("root")
        .on_start_failure(move |f| {
            s.lock().expect("lock").push((f.child.clone(), f.attempt));
            if f.child == "root/flaky" {
                StartDecision::RetryAfter(Duration::from_secs(1))
            } else {
                StartDecision::Continue
            }
        })
        .child(flaky)
        .child(broken)
        .child(a.spec())
        .build()
        .expect("spec");
    let t0 = Instant::now();
    let handle = root
        .start()
        .await
        .expect("start continues past the broken child");
    assert_eq!(Instant::now() - t0, Duration::from_secs(2));
    assert_eq!(
        *seen.lock().expect("lock"),
        [
            ("root/flaky".to_string(), 1),
            ("root/flaky".to_string(), 2),
            ("root/broken".to_string(), 1)
        ]
    );
    assert_eq!(a.starts(), 1);
    let snap = handle.snapshot();
    assert_eq!(snap.children[1].state, ChildState::Failed);
    assert!(
        !handle.is_ready(),
        "a child left out keeps the tree not ready"
    );
    handle.shutdown().await;

    // Halt: the start fails as in OTP.
    let root = Supervisor::builder("root")
        .on_start_failure(|_| StartDecision::Halt)
        .child(ChildSpec::new("broken", |_| async {
            Err(ChildError::msg("bad config"))
        }))
        .build()
        .expect("spec");
    assert!(root.start().await.is_err());
}

#[tokio::test(start_paused = true)]
async fn application_shuts_down_on_request_and_aborts_at_the_deadline() {
    let log = Log::default();
    let a = Puppet::new("a", &log);
    let root = Supervisor::builder("app")
        .child(a.spec())
        .build()
        .expect("spec");
    let exit = Application::new(root)
        .run_until(tokio::time::sleep(Duration::from_secs(1)))
        .await
        .expect("clean exit");
    assert_eq!(exit, ExitReason::Shutdown);
    assert_eq!(log.take(), ["start a", "stop a"]);

    let stubborn = Puppet::new("stubborn", &log).stubborn();
    let root = Supervisor::builder("app")
        .child(stubborn.spec().shutdown(Shutdown::Infinity))
        .build()
        .expect("spec");
    let t0 = Instant::now();
    let err = Application::new(root)
        .shutdown_deadline(Duration::from_secs(5))
        .run_until(async {})
        .await
        .expect_err("deadline");
    assert!(matches!(err, AppError::DeadlineExceeded(d) if d == Duration::from_secs(5)));
    assert_eq!(Instant::now() - t0, Duration::from_secs(5));

    // A tree that escalates ends the application with an error.
    let crasher = ChildSpec::new("crasher", |ctx| async move {
        ctx.ready();
        Err(ChildError::msg("boom"))
    });
    let root = Supervisor::builder("app")
        .intensity(0, Duration::from_secs(5))
        .child(crasher)
        .build()
        .expect("spec");
    let err = Application::new(root)
        .run_until(std::future::pending())
        .await
        .expect_err("escalated");
    assert!(
        matches!(err, AppError::Escalated(ref e) if e.child == "app/crasher" && e.restarts == 1),
        "{err:?}"
    );
}
