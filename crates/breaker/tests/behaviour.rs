//! Behaviour of one breaker driven as a user would, on tokio's paused clock.

use keel_breaker::*;
use std::time::Duration;
use tokio::time::advance;

const S: Duration = Duration::from_secs(1);

fn fuse(max_r: u32, max_t: Duration, reset: Duration) -> Breaker {
    Breaker::new("t", Config::fuse(max_r, max_t, reset).half_open_probes(1)).expect("config")
}

fn fail(b: &Breaker) {
    b.allow().expect("admitted").failure();
}

fn ok(b: &Breaker) {
    b.allow().expect("admitted").success();
}

#[tokio::test(start_paused = true)]
async fn fuse_blows_on_the_third_melt_within_max_t_and_heals_after_reset() {
    let b = fuse(2, 10 * S, 60 * S);
    fail(&b);
    advance(4 * S).await;
    fail(&b);
    assert_eq!(b.state(), State::Closed);
    // The first melt is now 11 s old: forgotten, so this is only the 2nd.
    advance(7 * S).await;
    fail(&b);
    assert_eq!(b.state(), State::Closed);
    fail(&b);
    assert_eq!(b.state(), State::Open);
    let r = b.allow().expect_err("open");
    assert_eq!(r.reason, RejectReason::Open);
    assert_eq!(r.retry_after, Some(60 * S));
    advance(59 * S).await;
    assert!(b.allow().is_err());
    advance(S).await;
    let probe = b.allow().expect("half-open probe");
    assert!(probe.is_probe());
    assert_eq!(b.state(), State::HalfOpen);
    probe.success();
    assert_eq!(b.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn failure_rate_needs_min_calls_then_trips_at_threshold() {
    let cfg = Config::default().rate(Some(RatePolicy {
        window: Window::Count(10),
        min_calls: 10,
        failure_rate: Some(0.5),
        slow: None,
    }));
    let b = Breaker::new("rate", cfg).expect("config");
    for _ in 0..4 {
        fail(&b);
    }
    for _ in 0..5 {
        ok(&b);
    }
    assert_eq!(b.state(), State::Closed, "9 calls < min_calls");
    fail(&b);
    assert_eq!(b.state(), State::Open, "5/10 failed = 50 %");
    let mut rx = b.subscribe();
    b.reset();
    assert!(matches!(
        rx.try_recv().expect("event").kind,
        EventKind::StateChanged {
            to: State::Closed,
            reason: Reason::Reset,
            ..
        }
    ));
}

#[tokio::test(start_paused = true)]
async fn time_window_forgets_old_failures() {
    let cfg = Config::default().rate(Some(RatePolicy {
        window: Window::Time {
            buckets: 5,
            bucket: S,
        },
        min_calls: 4,
        failure_rate: Some(0.75),
        slow: None,
    }));
    let b = Breaker::new("time", cfg).expect("config");
    fail(&b);
    fail(&b);
    fail(&b);
    advance(6 * S).await;
    fail(&b);
    assert_eq!(b.state(), State::Closed, "old failures fell out");
    fail(&b);
    fail(&b);
    ok(&b);
    assert_eq!(b.state(), State::Open, "3 of 4 in the window failed");
}

#[tokio::test(start_paused = true)]
async fn slow_calls_trip_the_slow_call_rate() {
    let cfg = Config::default().rate(Some(RatePolicy {
        window: Window::Count(4),
        min_calls: 4,
        failure_rate: None,
        slow: Some(SlowPolicy {
            threshold: Duration::from_millis(500),
            rate: 0.5,
        }),
    }));
    let b = Breaker::new("slow", cfg).expect("config");
    for i in 0..4 {
        let r = b
            .call(async {
                let d = if i % 2 == 0 { 600 } else { 10 };
                tokio::time::sleep(Duration::from_millis(d)).await;
                Ok::<_, ()>(())
            })
            .await;
        assert!(r.is_ok());
    }
    assert_eq!(b.snapshot().counters.slow, 2);
    assert_eq!(b.state(), State::Open);
    assert_eq!(
        b.snapshot().counters.successes,
        4,
        "slow calls still succeeded"
    );
}

#[tokio::test(start_paused = true)]
async fn half_open_admits_exactly_n_probes_and_failure_reopens() {
    let cfg = Config::fuse(0, S, 10 * S).half_open_probes(3);
    let b = Breaker::new("probes", cfg).expect("config");
    fail(&b);
    advance(10 * S).await;
    let p: Vec<_> = (0..3).map(|_| b.allow().expect("probe")).collect();
    let r = b.allow().expect_err("4th probe refused");
    assert_eq!(r.reason, RejectReason::HalfOpenFull);
    let mut p = p.into_iter();
    p.next().expect("p").success();
    p.next().expect("p").failure();
    assert_eq!(b.state(), State::Open);
    // The last probe reports after the reopen: ignored, stays open.
    p.next().expect("p").success();
    assert_eq!(b.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn a_probe_that_never_reports_frees_its_permit_after_the_timeout() {
    let cfg = Config::fuse(0, S, S)
        .half_open_probes(1)
        .probe_timeout(5 * S);
    let b = Breaker::new("stuck", cfg).expect("config");
    fail(&b);
    advance(S).await;
    let lost = b.allow().expect("probe");
    std::mem::forget(lost); // never reports, never drops
    assert!(b.allow().is_err());
    advance(5 * S).await;
    let again = b.allow().expect("expired permit is free again");
    again.success();
    assert_eq!(b.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn dropping_a_probe_without_reporting_frees_it_at_once() {
    let b = Breaker::new("drop", Config::fuse(0, S, S).half_open_probes(1)).expect("config");
    fail(&b);
    advance(S).await;
    drop(b.allow().expect("probe"));
    assert!(b.allow().is_ok());
}

#[tokio::test(start_paused = true)]
async fn open_duration_grows_with_consecutive_trips_within_the_cap() {
    let cfg = Config::fuse(0, S, 10 * S)
        .open_duration_cap(45 * S)
        .half_open_probes(1)
        .seed(42);
    let b = Breaker::new("grow", cfg).expect("config");
    fail(&b);
    let mut waits = vec![b.retry_after().expect("open")];
    for _ in 0..6 {
        advance(*waits.last().expect("w")).await;
        fail(&b); // the probe fails: reopen
        waits.push(b.retry_after().expect("open"));
    }
    assert_eq!(waits[0], 10 * S);
    for (k, w) in waits.iter().enumerate().skip(1) {
        let bound = (10 * S * (1 << k)).min(45 * S);
        assert!(
            *w >= 10 * S && *w <= bound,
            "trip {k}: {w:?} not in [10s, {bound:?}]"
        );
    }
    assert_eq!(b.snapshot().consecutive_trips, 7);
    // A successful probe closes and resets the growth.
    advance(45 * S).await;
    ok(&b);
    fail(&b);
    assert_eq!(b.retry_after(), Some(10 * S));
}

#[tokio::test(start_paused = true)]
async fn a_seed_makes_the_open_duration_jitter_reproducible() {
    async fn waits(seed: u64) -> Vec<Duration> {
        let cfg = Config::fuse(0, S, 10 * S)
            .open_duration_cap(1000 * S)
            .half_open_probes(1)
            .seed(seed);
        let b = Breaker::new("seeded", cfg).expect("config");
        fail(&b);
        let mut waits = vec![b.retry_after().expect("open")];
        for _ in 0..6 {
            advance(*waits.last().expect("w")).await;
            fail(&b);
            waits.push(b.retry_after().expect("open"));
        }
        waits
    }
    let first = waits(42).await;
    assert_eq!(first, waits(42).await);
    assert_ne!(first, waits(43).await);
}

#[tokio::test(start_paused = true)]
async fn retry_after_hint_sets_the_open_duration_bounded_by_max_hint() {
    let mut cfg = Config::fuse(0, S, 10 * S);
    cfg.max_hint = 100 * S;
    let b = Breaker::new("hint", cfg).expect("config");
    b.allow().expect("ok").failure_retry_after(30 * S);
    assert_eq!(b.retry_after(), Some(30 * S));
    b.reset();
    b.allow().expect("ok").failure_retry_after(3600 * S);
    assert_eq!(b.retry_after(), Some(100 * S));
    b.reset();
    b.open_for(7 * S);
    assert_eq!(b.state(), State::Open);
    assert_eq!(b.retry_after(), Some(7 * S));
    // A hint while open extends, never shortens.
    b.open_for(2 * S);
    assert_eq!(b.retry_after(), Some(7 * S));
}

#[tokio::test(start_paused = true)]
async fn gradual_recovery_admits_the_configured_shares_then_closes() {
    let cfg = Config::fuse(0, S, S)
        .half_open_probes(1)
        .recovery(Recovery {
            steps: vec![0.1, 0.5, 1.0],
            step_duration: 10 * S,
            min_calls: 1000,
        });
    let b = Breaker::new("ramp", cfg).expect("config");
    fail(&b);
    advance(S).await;
    ok(&b); // probe
    assert_eq!(b.state(), State::Recovering);
    let admitted = |b: &Breaker| {
        (0..1000)
            .filter(|_| match b.allow() {
                Ok(p) => {
                    p.record(Outcome::Ignore);
                    true
                }
                Err(r) => {
                    assert_eq!(r.reason, RejectReason::Recovering);
                    false
                }
            })
            .count()
    };
    assert_eq!(admitted(&b), 100);
    advance(10 * S).await;
    assert_eq!(admitted(&b), 500);
    advance(10 * S).await;
    assert_eq!(admitted(&b), 1000);
    advance(10 * S).await;
    assert!(b.allow().is_ok());
    assert_eq!(b.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn failures_during_recovery_reopen() {
    let cfg = Config::fuse(1, 10 * S, S)
        .half_open_probes(1)
        .recovery(Recovery::default());
    let b = Breaker::new("ramp", cfg).expect("config");
    fail(&b);
    fail(&b);
    advance(S).await;
    ok(&b);
    assert_eq!(b.state(), State::Recovering);
    b.record_failure();
    b.record_failure();
    assert_eq!(b.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn overrides_outrank_the_state() {
    let b = fuse(0, S, 10 * S);
    b.disable();
    for _ in 0..5 {
        fail(&b);
    }
    assert_eq!(b.state(), State::Closed, "disabled: counted, never trips");
    assert_eq!(b.snapshot().counters.failures, 5);
    b.enable();
    b.force_open(Some(3 * S));
    let r = b.allow().expect_err("forced");
    assert_eq!(
        (r.reason, r.retry_after),
        (RejectReason::ForcedOpen, Some(3 * S))
    );
    advance(3 * S).await;
    assert!(b.allow().is_ok(), "timed force-open lifts itself");
    assert_eq!(b.mode(), Mode::Normal);
    b.force_open(None);
    assert!(b.allow().is_err());
    b.reset();
    assert!(b.allow().is_ok(), "reset lifts forced open");
}

#[tokio::test(start_paused = true)]
async fn metrics_only_passes_everything_and_counts_would_be_rejections() {
    let b = fuse(0, S, 10 * S);
    b.metrics_only();
    fail(&b);
    assert_eq!(b.state(), State::Open, "the shadow state machine runs");
    for _ in 0..3 {
        assert!(b.allow().is_ok());
    }
    assert_eq!(b.snapshot().counters.shadow_rejected, 3);
}

#[tokio::test(start_paused = true)]
async fn fault_injection_rejects_about_the_configured_share() {
    let cfg = Config::default().fault_injection(0.1).seed(7);
    let b = Breaker::new("chaos", cfg).expect("config");
    let rejected = (0..10_000).filter(|_| b.allow().is_err()).count();
    assert!((800..1200).contains(&rejected), "{rejected} of 10000");
    assert_eq!(b.snapshot().counters.fault_injected, rejected as u64);
}

#[tokio::test(start_paused = true)]
async fn alarm_clears_only_after_staying_closed() {
    let cfg = Config::fuse(0, S, S)
        .half_open_probes(1)
        .alarm_clear_after(30 * S);
    let b = Breaker::new("alarm", cfg).expect("config");
    let mut rx = b.subscribe();
    fail(&b);
    assert!(b.alarm());
    advance(S).await;
    ok(&b);
    assert_eq!(b.state(), State::Closed);
    advance(29 * S).await;
    assert!(b.alarm(), "closed 29 s: still raised");
    advance(S).await;
    assert!(!b.alarm());
    let kinds: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok().map(|e| e.kind)).collect();
    assert_eq!(
        kinds,
        vec![
            EventKind::AlarmRaised,
            EventKind::StateChanged {
                from: State::Closed,
                to: State::Open,
                reason: Reason::FailureCount
            },
            EventKind::StateChanged {
                from: State::Open,
                to: State::HalfOpen,
                reason: Reason::OpenElapsed
            },
            EventKind::StateChanged {
                from: State::HalfOpen,
                to: State::Closed,
                reason: Reason::ProbesSucceeded
            },
            EventKind::AlarmCleared,
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn outcomes_of_calls_admitted_before_a_trip_do_not_count_after_it() {
    let b = Breaker::new("gen", Config::fuse(1, 10 * S, S).half_open_probes(1)).expect("config");
    let old = b.allow().expect("ok");
    fail(&b);
    fail(&b);
    assert_eq!(b.state(), State::Open);
    advance(S).await;
    let probe = b.allow().expect("probe");
    old.failure(); // from the closed period: must not reopen
    assert_eq!(b.state(), State::HalfOpen);
    probe.success();
    assert_eq!(b.state(), State::Closed);
}

#[test]
fn snapshot_serialises_to_json() {
    let b = Breaker::new("json", Config::default()).expect("config");
    b.record_failure();
    let v: serde_json::Value = serde_json::to_value(b.snapshot()).expect("json");
    assert_eq!(v["name"], "json");
    assert_eq!(v["state"], "closed");
    assert_eq!(v["mode"], "normal");
    assert_eq!(v["counters"]["failures"], 1);
    let e = serde_json::to_value(Event {
        breaker: "json".into(),
        kind: EventKind::StateChanged {
            from: State::Closed,
            to: State::Open,
            reason: Reason::FailureRate,
        },
    })
    .expect("json");
    assert_eq!(e["event"], "state_changed");
    assert_eq!(e["to"], "open");
}

#[test]
fn bad_config_is_a_clear_error() {
    let err = Breaker::new(
        "bad",
        Config::default().recovery(Recovery {
            steps: vec![0.5, 0.2],
            ..Recovery::default()
        }),
    )
    .expect_err("bad steps");
    assert!(err.to_string().contains("try [0.1, 0.25, 0.5, 1.0]"));
    let err = Breaker::new(
        "bad",
        Config::default().open_duration_cap(Duration::from_secs(1)),
    )
    .expect_err("cap");
    assert!(matches!(err, ConfigError::CapBelowBase { .. }));
}

#[test]
fn registry_shares_breakers_and_events() {
    let reg = Registry::new(Config::fuse(0, S, S));
    let mut rx = reg.subscribe();
    let a = reg.get_or_insert("app").expect("ok");
    let ep = reg.get_or_insert("app/http://127.0.0.1:3000").expect("ok");
    ep.record_failure();
    assert_eq!(
        reg.get("app/http://127.0.0.1:3000").expect("b").state(),
        State::Open
    );
    assert_eq!(a.state(), State::Closed);
    let mut names = Vec::new();
    while let Ok(e) = rx.try_recv() {
        names.push(e.breaker.to_string());
    }
    assert!(names.iter().all(|n| n == "app/http://127.0.0.1:3000") && !names.is_empty());
    reg.remove("app");
    assert_eq!(reg.names(), vec!["app/http://127.0.0.1:3000"]);
}

#[tokio::test(start_paused = true)]
async fn tower_layer_rejects_without_calling_the_inner_service() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tower::{Layer, Service, ServiceExt};
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let inner = tower::service_fn(move |fail: bool| {
        c.fetch_add(1, Ordering::SeqCst);
        async move { if fail { Err("boom") } else { Ok("fine") } }
    });
    let b = fuse(1, 10 * S, 5 * S);
    let mut svc = BreakerLayer::new(b.clone()).layer(inner);
    assert_eq!(
        svc.ready()
            .await
            .expect("ready")
            .call(false)
            .await
            .expect("ok"),
        "fine"
    );
    for _ in 0..2 {
        let e = svc
            .ready()
            .await
            .expect("ready")
            .call(true)
            .await
            .expect_err("err");
        assert_eq!(e.into_inner(), Some("boom"));
    }
    let e = svc
        .ready()
        .await
        .expect("ready")
        .call(false)
        .await
        .expect_err("open");
    assert_eq!(e.rejected().expect("rejected").retry_after, Some(5 * S));
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

/// A classifier named as a plain function pointer, so the layered service
/// can be stored in a struct field with a spelled-out type.
fn by_status(r: Result<&u16, &std::convert::Infallible>) -> Outcome {
    match r {
        Ok(500..) => Outcome::Failure,
        _ => Outcome::Success,
    }
}

type Classified<S> = BreakerService<S, fn(Result<&u16, &std::convert::Infallible>) -> Outcome>;

#[tokio::test(start_paused = true)]
async fn tower_layer_classifies_ok_responses_and_its_service_type_can_be_named() {
    use tower::{Layer, Service, ServiceExt};
    struct Client<S> {
        svc: Classified<S>,
    }
    let inner = tower::service_fn(|code: u16| async move { Ok::<u16, _>(code) });
    let b = fuse(1, 10 * S, 5 * S);
    let layer = BreakerLayer::new(b.clone())
        .classify(by_status as fn(Result<&u16, &std::convert::Infallible>) -> Outcome);
    let mut client = Client {
        svc: layer.layer(inner),
    };
    for code in [200, 503, 503] {
        let got = client.svc.ready().await.expect("ready").call(code).await;
        assert_eq!(
            got.expect("admitted"),
            code,
            "Ok responses come back as they are"
        );
    }
    // Two 503s classified as failures tripped fuse(1, ..).
    assert_eq!(b.state(), State::Open);
    let e = client.svc.ready().await.expect("ready").call(200).await;
    assert!(e.expect_err("open").rejected().is_some());
    assert_eq!(b.snapshot().counters.successes, 1);
    assert_eq!(b.snapshot().counters.failures, 2);
}

#[tokio::test(start_paused = true)]
async fn a_tower_call_dropped_before_completion_frees_its_half_open_probe() {
    use tower::{Layer, Service, ServiceExt};
    let inner = tower::service_fn(|ok: bool| async move { if ok { Ok(()) } else { Err("boom") } });
    let b = fuse(0, 10 * S, 5 * S);
    let mut svc = BreakerLayer::new(b.clone()).layer(inner);
    let _ = svc.ready().await.expect("ready").call(false).await;
    assert_eq!(b.state(), State::Open);
    advance(5 * S).await;
    // The one probe permit is held by this future; a second call is refused.
    let probe = svc.ready().await.expect("ready").call(true);
    let refused = svc.ready().await.expect("ready").call(true).await;
    assert_eq!(
        refused
            .expect_err("probe taken")
            .rejected()
            .map(|r| r.reason),
        Some(RejectReason::HalfOpenFull)
    );
    // Dropped unpolled: the permit goes back at once, and the next call is
    // the probe that closes the breaker.
    drop(probe);
    svc.ready()
        .await
        .expect("ready")
        .call(true)
        .await
        .expect("probe admitted");
    assert_eq!(b.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn tower_layer_passes_the_inner_readiness_error_through_unchanged() {
    use std::task::{Context, Poll};
    use tower::{Layer, ServiceExt};
    #[derive(Debug)]
    struct NeverReady;
    impl tower::Service<()> for NeverReady {
        type Response = ();
        type Error = &'static str;
        type Future = std::future::Ready<Result<(), &'static str>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Err("overloaded"))
        }
        fn call(&mut self, _: ()) -> Self::Future {
            std::future::ready(Ok(()))
        }
    }
    let b = fuse(0, 10 * S, 5 * S);
    let mut svc = BreakerLayer::new(b.clone()).layer(NeverReady);
    let e = svc.ready().await.expect_err("not ready");
    assert_eq!(e.into_inner(), Some("overloaded"));
    assert_eq!(b.state(), State::Closed, "readiness is not a call outcome");
}
