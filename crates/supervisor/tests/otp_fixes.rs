//! The differences from OTP found by the differential test (issue 14), each
//! pinned by a test on tokio's paused clock: stale exits of an earlier
//! incarnation, the escalation exit reason, a stop during a group restart,
//! OTP's terminate/restart/delete_child, and errors kept whole.

mod common;

use std::error::Error;
use std::fmt;
use std::time::Duration;

use common::{Log, Puppet, event, ready};
use keel_supervisor::{
    ChildSpec, ChildState, ControlError, EventKind, ExitReason, Restart, Shutdown, Strategy,
    Supervisor,
};

/// A child that ignores cancellation, stopped only by its 300 ms timeout.
fn stubborn(name: &str, log: &Log) -> (Puppet, ChildSpec) {
    let p = Puppet::new(name, log).stubborn();
    let spec = p
        .spec()
        .shutdown(Shutdown::Timeout(Duration::from_millis(300)));
    (p, spec)
}

#[tokio::test(start_paused = true)]
async fn one_for_all_takes_an_exit_during_the_group_stop_as_part_of_it() {
    let log = Log::default();
    let x = Puppet::new("x", &log);
    let (s, s_spec) = stubborn("s", &log);
    let y = Puppet::new("y", &log);
    let sup = Supervisor::builder("root")
        .strategy(Strategy::OneForAll)
        .intensity(1, Duration::from_secs(5))
        .child(x.spec())
        .child(s_spec)
        .child(y.spec())
        .build()
        .expect("spec");
    let handle = sup.start().await.expect("start");
    let mut events = handle.events();
    y.crash();
    // The supervisor now waits out s's 300 ms; x crashes meanwhile.
    tokio::time::sleep(Duration::from_millis(100)).await;
    x.crash();
    ready(&mut events, "root/y").await;
    // Long after: no second restart came from x's old exit.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!((x.starts(), s.starts(), y.starts()), (2, 2, 2));
    assert_eq!(
        handle.exit_reason(),
        None,
        "one restart, within intensity 1"
    );
    let snap = handle.snapshot();
    let restarts: Vec<u64> = snap.children.iter().map(|c| c.restarts).collect();
    assert_eq!(restarts, [1, 1, 1]);
    assert_eq!(handle.shutdown().await, ExitReason::Shutdown);
}

#[tokio::test(start_paused = true)]
async fn rest_for_one_takes_an_exit_during_the_group_stop_as_part_of_it() {
    let log = Log::default();
    let a = Puppet::new("a", &log);
    let b = Puppet::new("b", &log);
    let (s, s_spec) = stubborn("s", &log);
    let c = Puppet::new("c", &log);
    let sup = Supervisor::builder("root")
        .strategy(Strategy::RestForOne)
        .intensity(1, Duration::from_secs(5))
        .child(a.spec())
        .child(b.spec())
        .child(s_spec)
        .child(c.spec())
        .build()
        .expect("spec");
    let handle = sup.start().await.expect("start");
    let mut events = handle.events();
    // a's crash stops c, then s (300 ms), then b; b crashes while s is
    // being waited for.
    a.crash();
    tokio::time::sleep(Duration::from_millis(100)).await;
    b.crash();
    ready(&mut events, "root/c").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        (a.starts(), b.starts(), s.starts(), c.starts()),
        (2, 2, 2, 2)
    );
    assert_eq!(handle.exit_reason(), None);
    handle.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_supervisor_that_gives_up_exits_shutdown_so_a_transient_parent_child_stays_down() {
    let log = Log::default();
    let leaf = Puppet::new("leaf", &log);
    let mid = Supervisor::builder("mid")
        .intensity(0, Duration::from_secs(5))
        .child(leaf.spec())
        .build()
        .expect("mid");
    let keep = Puppet::new("keep", &log);
    let root = Supervisor::builder("root")
        .intensity(5, Duration::from_secs(5))
        .child(ChildSpec::from(mid).restart(Restart::Transient))
        .child(keep.spec())
        .build()
        .expect("root");
    let handle = root.start().await.expect("start");
    let mut events = handle.events();
    leaf.crash();
    let exited = event(&mut events, "root/mid", |k| {
        matches!(k, EventKind::Exited { .. })
    })
    .await;
    assert_eq!(
        exited.kind,
        EventKind::Exited {
            reason: ExitReason::Shutdown
        }
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(leaf.starts(), 1, "mid was not restarted");
    let snap = handle.snapshot();
    let mid = &snap.children[0];
    assert_eq!(mid.state, ChildState::Stopped);
    let escalation = mid.escalation.as_ref().expect("detail kept");
    assert_eq!(
        (escalation.child.as_str(), escalation.restarts),
        ("root/mid/leaf", 1)
    );
    assert_eq!(handle.exit_reason(), None, "root is unaffected");
    handle.shutdown().await;
}

/// A child whose initialisation takes `init` of tokio time.
fn slow_start(name: &'static str, init: Duration, log: &Log) -> ChildSpec {
    let log = log.clone();
    ChildSpec::new(name, move |ctx| {
        let log = log.clone();
        async move {
            tokio::time::sleep(init).await;
            log.push(format!("start {name}"));
            ctx.ready();
            ctx.cancelled().await;
            log.push(format!("stop {name}"));
            Ok(())
        }
    })
}

#[tokio::test(start_paused = true)]
async fn a_stop_during_a_group_restart_waits_for_it_then_stops_all_in_reverse() {
    let log = Log::default();
    let c = Puppet::new("c", &log);
    let sup = Supervisor::builder("root")
        .strategy(Strategy::OneForAll)
        .child(slow_start("a", Duration::from_millis(100), &log))
        .child(slow_start("b", Duration::from_millis(100), &log))
        .child(c.spec())
        .build()
        .expect("spec");
    let handle = sup.start().await.expect("start");
    log.take();
    c.crash();
    // The group restart is under way (a started, b initialising) when the
    // stop is asked for.
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(log.lines(), ["stop b", "stop a", "start a"]);
    assert_eq!(handle.shutdown().await, ExitReason::Shutdown);
    assert_eq!(
        log.take(),
        [
            "stop b", "stop a", "start a", "start b", "start c", "stop c", "stop b", "stop a"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn terminate_child_keeps_the_spec_for_the_next_group_restart() {
    let log = Log::default();
    let (a, b, c) = (
        Puppet::new("a", &log),
        Puppet::new("b", &log),
        Puppet::new("c", &log),
    );
    let sup = Supervisor::builder("root")
        .strategy(Strategy::OneForAll)
        .child(a.spec())
        .child(b.spec())
        .child(c.spec())
        .build()
        .expect("spec");
    let handle = sup.start().await.expect("start");
    let mut events = handle.events();
    handle.terminate_child("b").await.expect("terminate b");
    assert_eq!(handle.snapshot().children[1].state, ChildState::Stopped);
    // Terminating it again is fine (OTP answers ok too).
    handle
        .terminate_child("b")
        .await
        .expect("terminate b again");
    a.crash();
    ready(&mut events, "root/c").await;
    assert_eq!((a.starts(), b.starts(), c.starts()), (2, 2, 2));
    handle.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn restart_child_and_delete_child_follow_otp() {
    let log = Log::default();
    let a = Puppet::new("a", &log);
    let t = Puppet::new("t", &log);
    let sup = Supervisor::builder("root")
        // No restart allowed: restart_child must not count.
        .intensity(0, Duration::from_secs(5))
        .child(a.spec())
        .child(t.spec().restart(Restart::Temporary))
        .build()
        .expect("spec");
    let handle = sup.start().await.expect("start");
    assert_eq!(
        handle.restart_child("a").await,
        Err(ControlError::Running("root/a".into()))
    );
    assert_eq!(
        handle.delete_child("a").await,
        Err(ControlError::Running("root/a".into()))
    );
    for _ in 0..3 {
        handle.terminate_child("a").await.expect("terminate");
        handle.restart_child("a").await.expect("restart");
    }
    assert_eq!(a.starts(), 4);
    assert_eq!(handle.exit_reason(), None);
    handle.terminate_child("a").await.expect("terminate");
    handle.delete_child("a").await.expect("delete");
    assert!(matches!(
        handle.restart_child("a").await,
        Err(ControlError::NotFound { .. })
    ));
    // A temporary child's spec goes when it is terminated, as in OTP.
    handle.terminate_child("t").await.expect("terminate t");
    assert!(matches!(
        handle.restart_child("t").await,
        Err(ControlError::NotFound { .. })
    ));
    assert!(handle.snapshot().children.is_empty());
    handle.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn restart_child_and_delete_child_refuse_a_dynamic_supervisor() {
    let log = Log::default();
    let sup = Supervisor::builder("conns")
        .strategy(Strategy::Dynamic { max_children: None })
        .build()
        .expect("spec");
    let handle = sup.start().await.expect("start");
    let c = Puppet::new("c", &log);
    handle.start_child(c.spec()).await.expect("c");
    assert_eq!(
        handle.restart_child("c").await,
        Err(ControlError::Dynamic("conns".into()))
    );
    assert_eq!(
        handle.delete_child("c").await,
        Err(ControlError::Dynamic("conns".into()))
    );
    handle.shutdown().await;
}

#[derive(Debug)]
struct Outer(std::io::Error);

impl fmt::Display for Outer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("cannot reach the store")
    }
}

impl Error for Outer {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&self.0)
    }
}

#[tokio::test(start_paused = true)]
async fn a_childs_error_is_kept_with_its_source_chain() {
    let failing = ChildSpec::new("store", |ctx| async move {
        ctx.ready();
        Err(Outer(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "refused",
        )))?
    })
    .restart(Restart::Temporary);
    let sup = Supervisor::builder("root")
        .child(failing)
        .build()
        .expect("spec");
    let mut events = sup.events();
    let handle = sup.start().await.expect("start");
    let exited = event(&mut events, "root/store", |k| {
        matches!(k, EventKind::Exited { .. })
    })
    .await;
    let EventKind::Exited { reason } = exited.kind else {
        unreachable!("matched above")
    };
    let error = reason.error().expect("an error reason");
    let outer = error.downcast_ref::<Outer>().expect("the child's own type");
    assert_eq!(outer.0.kind(), std::io::ErrorKind::ConnectionRefused);
    let source = error.source().expect("source chain kept");
    assert_eq!(source.to_string(), "refused");
    handle.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_failed_restart_is_tried_again_whatever_the_restart_type() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    // A transient child whose second start fails with a `shutdown` reason:
    // as an exit that would leave it stopped, as a failed restart OTP tries
    // it again.
    let starts = Arc::new(AtomicU32::new(0));
    let counter = starts.clone();
    let child = ChildSpec::new("t", move |ctx| {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            match n {
                1 => {
                    ctx.ready();
                    Err(keel_supervisor::ChildError::msg("crash"))
                }
                2 => Err(keel_supervisor::ChildError::shutdown()),
                _ => {
                    ctx.ready();
                    ctx.cancelled().await;
                    Ok(())
                }
            }
        }
    })
    .restart(Restart::Transient);
    let sup = Supervisor::builder("root")
        .intensity(5, Duration::from_secs(5))
        .child(child)
        .build()
        .expect("spec");
    let handle = sup.start().await.expect("start");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(starts.load(Ordering::SeqCst), 3);
    let t = &handle.snapshot().children[0];
    assert_eq!((t.state, t.restarts), (ChildState::Running, 2));
    handle.shutdown().await;
}
