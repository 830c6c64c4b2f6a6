//! The retry engine, builder and tower layer, driven as a user would on
//! tokio's paused clock (sleeps are exact, so elapsed time is checkable).

use keel_breaker::{Breaker, Config, Outcome, State};
use keel_retry::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::time::Duration;
use tokio::time::Instant;

const MS: Duration = Duration::from_millis(1);
const S: Duration = Duration::from_secs(1);

fn constant(d: Duration) -> Backoff {
    Backoff::constant(d)
}

#[tokio::test(start_paused = true)]
async fn retries_until_success_sleeping_the_backoff() {
    let start = Instant::now();
    let r = retry(|n| async move { if n < 4 { Err(n) } else { Ok(n) } })
        .max_attempts(5)
        .backoff(Backoff::exponential(100 * MS))
        .run()
        .await;
    assert_eq!(r.expect("ok"), 4);
    assert_eq!(start.elapsed(), 700 * MS, "100 + 200 + 400 ms of backoff");
}

#[tokio::test(start_paused = true)]
async fn gives_up_after_max_attempts_with_the_last_error() {
    let calls = AtomicU32::new(0);
    let r = retry(|n| {
        calls.fetch_add(1, SeqCst);
        async move { Err::<(), _>(format!("fail {n}")) }
    })
    .max_attempts(3)
    .backoff(constant(10 * MS))
    .run()
    .await;
    match r {
        Err(RetryError::Failed {
            error,
            attempts: 3,
            reason: StopReason::MaxAttempts,
        }) => {
            assert_eq!(error, "fail 3")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(calls.load(SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn non_retryable_errors_stop_at_once() {
    let r = retry(|_| async { Err::<(), u16>(400) })
        .when(|code| *code >= 500)
        .run()
        .await;
    assert!(matches!(
        r,
        Err(RetryError::Failed {
            attempts: 1,
            reason: StopReason::NotRetryable,
            ..
        })
    ));
}

#[tokio::test(start_paused = true)]
async fn the_deadline_bounds_attempts_and_sleeps_together() {
    let start = Instant::now();
    // Each attempt takes 300 ms and fails; 1 s backoff: the second sleep
    // would end past the 2 s deadline, so retrying stops before it.
    let r = retry(|_| async {
        tokio::time::sleep(300 * MS).await;
        Err::<(), _>("slow failure")
    })
    .max_attempts(100)
    .backoff(constant(S))
    .deadline(2 * S)
    .run()
    .await;
    assert!(
        matches!(
            r,
            Err(RetryError::Failed {
                attempts: 2,
                reason: StopReason::Deadline,
                ..
            })
        ),
        "{r:?}"
    );
    assert!(start.elapsed() <= 2 * S);

    // An attempt still running at the deadline is cut off.
    let start = Instant::now();
    let r = retry(|n| async move {
        tokio::time::sleep(if n == 1 { 100 * MS } else { 10 * S }).await;
        Err::<(), _>(n)
    })
    .backoff(constant(100 * MS))
    .deadline(S)
    .run()
    .await;
    match r {
        Err(RetryError::DeadlineExceeded {
            attempts: 2,
            last: Some(1),
        }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(start.elapsed(), S);
}

#[tokio::test(start_paused = true)]
async fn server_hints_set_the_delay_within_max_hint() {
    let start = Instant::now();
    let r = retry(|n| async move { if n == 1 { Err(Some(7 * S)) } else { Ok(()) } })
        .backoff(constant(MS))
        .hint(|h: &Option<Duration>| *h)
        .run()
        .await;
    assert!(r.is_ok());
    assert_eq!(start.elapsed(), 7 * S);

    let r = retry(|_| async { Err::<(), _>(Some(3600 * S)) })
        .max_hint(60 * S)
        .hint(|h: &Option<Duration>| *h)
        .run()
        .await;
    assert!(matches!(
        r,
        Err(RetryError::Failed {
            attempts: 1,
            reason: StopReason::HintTooLong,
            ..
        })
    ));

    // A parsed Retry-After header drives the hint.
    let now = std::time::SystemTime::now();
    let hint = parse_retry_after("2", now).expect("seconds");
    let start = Instant::now();
    let r = retry(|n| async move { if n == 1 { Err(hint) } else { Ok(()) } })
        .hint(|h| Some(*h))
        .run()
        .await;
    assert!(r.is_ok());
    assert_eq!(start.elapsed(), 2 * S);
}

#[tokio::test(start_paused = true)]
async fn a_spent_budget_stops_retries_across_callers() {
    let budget = Arc::new(TokenBucket::new(4.0, 0.1));
    let calls = Arc::new(AtomicU32::new(0));
    let mut handles = Vec::new();
    for _ in 0..4 {
        let (budget, calls) = (budget.clone(), calls.clone());
        handles.push(tokio::spawn(async move {
            retry(|_| {
                calls.fetch_add(1, SeqCst);
                async { Err::<(), _>("down") }
            })
            .max_attempts(10)
            .backoff(constant(10 * MS))
            .budget(budget)
            .run()
            .await
        }));
    }
    let mut reasons = Vec::new();
    for h in handles {
        match h.await.expect("task") {
            Err(RetryError::Failed { reason, .. }) => reasons.push(reason),
            other => panic!("{other:?}"),
        }
    }
    assert!(reasons.iter().all(|r| *r == StopReason::Budget));
    // 4 tokens, no retry at 2 or below: 2 failures' worth of retries
    // were possible in all, far from 4 x 10 attempts.
    assert!(calls.load(SeqCst) <= 6, "{} calls", calls.load(SeqCst));
}

#[tokio::test(start_paused = true)]
async fn breaker_all_attempts_rejects_before_calling() {
    let b = Breaker::new("all", Config::fuse(0, S, 60 * S)).expect("config");
    b.record_failure();
    let calls = AtomicU32::new(0);
    let r = retry(|_| {
        calls.fetch_add(1, SeqCst);
        async { Ok::<_, ()>(()) }
    })
    .breaker(b.clone(), BreakerMode::AllAttempts)
    .run()
    .await;
    assert!(matches!(r, Err(RetryError::Rejected(_))));
    assert_eq!(calls.load(SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn breaker_retries_only_lets_first_attempts_through_and_learns_from_them() {
    let b = Breaker::new("retries-only", Config::fuse(1, 10 * S, 60 * S)).expect("config");
    let calls = Arc::new(AtomicU32::new(0));
    let policy = RetryPolicy::default()
        .max_attempts(5)
        .backoff(constant(MS))
        .breaker(b.clone(), BreakerMode::RetriesOnly);
    let c = calls.clone();
    let r = policy
        .run(move |_| {
            c.fetch_add(1, SeqCst);
            async { Err::<(), _>("down") }
        })
        .await;
    // Attempt 1 (recorded) and 2 (through a permit) failed: the breaker
    // blew, so the third attempt was refused.
    assert!(
        matches!(
            r,
            Err(RetryError::Failed {
                attempts: 2,
                reason: StopReason::BreakerOpen,
                ..
            })
        ),
        "{r:?}"
    );
    assert_eq!(b.state(), State::Open);
    // With the breaker open, first attempts still go, retries do not.
    calls.store(0, SeqCst);
    let c = calls.clone();
    let r = policy
        .run(move |n| {
            c.fetch_add(1, SeqCst);
            async move { if n == 1 { Err("down") } else { Ok(()) } }
        })
        .await;
    assert!(matches!(
        r,
        Err(RetryError::Failed {
            attempts: 1,
            reason: StopReason::BreakerOpen,
            ..
        })
    ));
    assert_eq!(calls.load(SeqCst), 1);
    let c = calls.clone();
    let ok = policy
        .run(move |_| {
            c.fetch_add(1, SeqCst);
            async { Ok::<_, ()>(5) }
        })
        .await;
    assert_eq!(ok.expect("first attempt is not blocked"), 5);
}

#[tokio::test(start_paused = true)]
async fn retry_after_from_an_attempt_opens_the_breaker_that_long() {
    let b = Breaker::new("hinted", Config::fuse(0, S, S)).expect("config");
    let r = RetryPolicy::default()
        .breaker(b.clone(), BreakerMode::AllAttempts)
        .execute(
            |_| async { Ok::<u16, ()>(429) },
            |_| Decision::RetryAfter(30 * S),
        )
        .await;
    assert_eq!(r.expect("429 is returned as is"), 429);
    assert_eq!(b.state(), State::Open);
    assert_eq!(b.retry_after(), Some(30 * S));
}

#[derive(Clone, Debug)]
struct Req {
    method: &'static str,
}

#[tokio::test(start_paused = true)]
async fn tower_layer_retries_only_requests_it_is_told_are_safe() {
    use tower::{Layer, Service, ServiceExt};
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let upstream = tower::service_fn(move |_r: Req| {
        let n = c.fetch_add(1, SeqCst);
        async move {
            match n % 3 {
                0 => Err("connection reset"),
                1 => Ok(503u16),
                _ => Ok(200u16),
            }
        }
    });
    let layer = RetryLayer::new(
        RetryPolicy::default().max_attempts(5).backoff(constant(MS)),
        |r: &Req| matches!(r.method, "GET" | "PUT" | "DELETE").then(|| r.clone()),
        |r: Result<&u16, &&str>| match r {
            Err(_) | Ok(503) => Decision::Retry,
            Ok(_) => Decision::Done,
        },
    );
    let mut svc = layer.layer(upstream);
    let got = svc
        .ready()
        .await
        .expect("ready")
        .call(Req { method: "GET" })
        .await;
    assert_eq!(got.expect("retried to success"), 200);
    assert_eq!(calls.load(SeqCst), 3);
    calls.store(0, SeqCst);
    let got = svc
        .ready()
        .await
        .expect("ready")
        .call(Req { method: "POST" })
        .await;
    match got {
        Err(RetryError::Failed {
            error: "connection reset",
            attempts: 1,
            reason: StopReason::NotRetryable,
        }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(calls.load(SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn tower_layer_returns_the_last_response_when_attempts_run_out() {
    use tower::{Layer, Service, ServiceExt};
    let upstream = tower::service_fn(|_r: Req| async { Ok::<u16, ()>(503) });
    let layer = RetryLayer::new(
        RetryPolicy::default().max_attempts(3).backoff(constant(MS)),
        |r: &Req| Some(r.clone()),
        |r: Result<&u16, &()>| {
            if r == Ok(&503) {
                Decision::Retry
            } else {
                Decision::Done
            }
        },
    );
    let mut svc = layer.layer(upstream);
    let got = svc
        .ready()
        .await
        .expect("ready")
        .call(Req { method: "GET" })
        .await;
    assert_eq!(got.expect("the 503 itself"), 503);
    let _ = Outcome::Success;
}

#[tokio::test(start_paused = true)]
async fn enormous_delays_and_deadlines_do_not_overflow() {
    let r = retry(|_| async { Err::<(), _>("down") })
        .backoff(Backoff::custom(|_, _| Duration::MAX))
        .deadline(S)
        .run()
        .await;
    assert!(
        matches!(
            r,
            Err(RetryError::Failed {
                attempts: 1,
                reason: StopReason::Deadline,
                ..
            })
        ),
        "{r:?}"
    );
    let r = retry(|n| async move { if n < 2 { Err("once") } else { Ok(()) } })
        .backoff(constant(MS))
        .deadline(Duration::MAX)
        .run()
        .await;
    assert!(r.is_ok());
}

#[tokio::test(start_paused = true)]
async fn only_retryable_failures_cost_budget_tokens() {
    let budget = Arc::new(TokenBucket::new(10.0, 0.5));
    for _ in 0..3 {
        let _ = retry(|_| async { Err::<(), u16>(400) })
            .when(|code| *code >= 500)
            .budget(budget.clone())
            .run()
            .await;
    }
    assert_eq!(
        budget.tokens(),
        10.0,
        "final errors are not the dependency's fault"
    );
    let _ = retry(|_| async { Err::<(), u16>(503) })
        .max_attempts(2)
        .backoff(constant(MS))
        .when(|code| *code >= 500)
        .budget(budget.clone())
        .run()
        .await;
    assert_eq!(budget.tokens(), 8.0, "two retryable failures");
    let _ = retry(|_| async { Ok::<(), u16>(()) })
        .budget(budget.clone())
        .run()
        .await;
    assert_eq!(budget.tokens(), 8.5);
}

/// A named policy: idempotent methods are retried on 503 and on errors.
#[derive(Clone, Debug)]
struct Idempotent503;

impl<E> Policy<Req, u16, E> for Idempotent503 {
    fn clone_request(&self, req: &Req) -> Option<Req> {
        matches!(req.method, "GET" | "PUT" | "DELETE").then(|| req.clone())
    }
    fn classify(&self, result: Result<&u16, &E>) -> Decision {
        match result {
            Ok(503) | Err(_) => Decision::Retry,
            Ok(_) => Decision::Done,
        }
    }
}

#[tokio::test(start_paused = true)]
async fn tower_layer_with_a_named_policy_can_be_stored_and_sleeps_the_backoff() {
    use tower::{Layer, Service, ServiceExt};
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let upstream = tower::service_fn(move |_r: Req| {
        let n = c.fetch_add(1, SeqCst);
        async move { Ok::<u16, ()>(if n < 2 { 503 } else { 200 }) }
    });
    // The field's type is spelled out: no closure types in it.
    struct Client<S> {
        svc: RetryService<S, Idempotent503>,
    }
    let config = RetryPolicy::default()
        .max_attempts(5)
        .backoff(Backoff::exponential(100 * MS));
    let mut client = Client {
        svc: RetryLayer::with_policy(config, Idempotent503).layer(upstream),
    };
    let start = Instant::now();
    let got = client
        .svc
        .ready()
        .await
        .expect("ready")
        .call(Req { method: "PUT" })
        .await;
    assert_eq!(got.expect("retried to success"), 200);
    assert_eq!(calls.load(SeqCst), 3);
    assert_eq!(start.elapsed(), 300 * MS, "100 + 200 ms of backoff");
}

#[tokio::test(start_paused = true)]
async fn tower_layer_deadline_covers_a_hung_attempt_and_reports_it_to_the_breaker() {
    use tower::{Layer, Service, ServiceExt};
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    // The first attempt fails fast, the second hangs forever.
    let upstream = tower::service_fn(move |_r: Req| {
        let n = c.fetch_add(1, SeqCst);
        async move {
            if n == 0 {
                Err("reset")
            } else {
                std::future::pending::<Result<u16, &str>>().await
            }
        }
    });
    let b = Breaker::new("hung", Config::fuse(5, 60 * S, S)).expect("config");
    let config = RetryPolicy::default()
        .max_attempts(5)
        .backoff(constant(100 * MS))
        .deadline(2 * S)
        .breaker(b.clone(), BreakerMode::AllAttempts);
    let mut svc = RetryLayer::with_policy(config, Idempotent503).layer(upstream);
    let start = Instant::now();
    let got = svc
        .ready()
        .await
        .expect("ready")
        .call(Req { method: "GET" })
        .await;
    match got {
        Err(RetryError::DeadlineExceeded {
            attempts: 2,
            last: Some("reset"),
        }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(
        start.elapsed(),
        2 * S,
        "the deadline spans attempts and sleeps"
    );
    assert_eq!(calls.load(SeqCst), 2);
    assert_eq!(
        b.snapshot().counters.failures,
        2,
        "the reset and the hung attempt"
    );
}

#[tokio::test(start_paused = true)]
async fn tower_layer_with_an_open_breaker_rejects_without_calling() {
    use tower::{Layer, Service, ServiceExt};
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let upstream = tower::service_fn(move |_r: Req| {
        c.fetch_add(1, SeqCst);
        async { Ok::<u16, ()>(200) }
    });
    let b = Breaker::new("open", Config::fuse(0, S, 10 * S)).expect("config");
    b.record_failure();
    let config = RetryPolicy::default().breaker(b, BreakerMode::AllAttempts);
    let mut svc = RetryLayer::with_policy(config, Idempotent503).layer(upstream);
    let got = svc
        .ready()
        .await
        .expect("ready")
        .call(Req { method: "GET" })
        .await;
    assert!(matches!(got, Err(RetryError::Rejected(_))), "{got:?}");
    assert_eq!(calls.load(SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn tower_layer_passes_a_readiness_error_through_as_not_ready() {
    use std::task::{Context, Poll};
    use tower::{Layer, ServiceExt};
    #[derive(Clone, Debug)]
    struct Overloaded;
    impl tower::Service<Req> for Overloaded {
        type Response = u16;
        type Error = &'static str;
        type Future = std::future::Ready<Result<u16, &'static str>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Err("overloaded"))
        }
        fn call(&mut self, _: Req) -> Self::Future {
            std::future::ready(Ok(200))
        }
    }
    let mut svc = RetryLayer::with_policy(RetryPolicy::default(), Idempotent503).layer(Overloaded);
    match svc.ready().await {
        Err(RetryError::NotReady("overloaded")) => {}
        other => panic!("{other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn tower_layer_default_policy_retries_errors_of_cloneable_requests() {
    use tower::{Layer, Service, ServiceExt};
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let upstream = tower::service_fn(move |x: u8| {
        let n = c.fetch_add(1, SeqCst);
        async move { if n < 2 { Err("reset") } else { Ok(x) } }
    });
    let config = RetryPolicy::default().backoff(constant(MS));
    let mut svc: RetryService<_> = RetryLayer::with_policy(config, RetryErrors).layer(upstream);
    let got = svc.ready().await.expect("ready").call(9).await;
    assert_eq!(got.expect("third attempt"), 9);
    assert_eq!(calls.load(SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn tower_layer_reports_a_failed_unsafe_request_to_the_breaker_without_retrying_it() {
    use tower::{Layer, Service, ServiceExt};
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let upstream = tower::service_fn(move |_r: Req| {
        c.fetch_add(1, SeqCst);
        async { Ok::<u16, ()>(503) }
    });
    // fuse(0, ..): the first failure trips it.
    let b = Breaker::new("unsafe", Config::fuse(0, 10 * S, 10 * S)).expect("config");
    let config = RetryPolicy::default()
        .max_attempts(5)
        .breaker(b.clone(), BreakerMode::AllAttempts);
    let mut svc = RetryLayer::with_policy(config, Idempotent503).layer(upstream);
    let got = svc
        .ready()
        .await
        .expect("ready")
        .call(Req { method: "POST" })
        .await;
    assert_eq!(got.expect("the 503 itself"), 503);
    assert_eq!(calls.load(SeqCst), 1, "a POST is never sent twice");
    assert_eq!(
        b.snapshot().counters.failures,
        1,
        "but its 503 is a failure"
    );
    assert_eq!(b.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn tower_layer_classifies_a_retry_whose_service_cannot_get_ready_and_retries_again() {
    use std::sync::Mutex;
    use std::task::{Context, Poll};
    use tower::{Layer, Service, ServiceExt};
    /// Readiness answers and call results are scripted, shared by clones.
    #[derive(Clone)]
    struct Scripted {
        ready: Arc<Mutex<Vec<Result<(), &'static str>>>>,
        results: Arc<Mutex<Vec<Result<u16, &'static str>>>>,
    }
    impl Service<Req> for Scripted {
        type Response = u16;
        type Error = &'static str;
        type Future = std::future::Ready<Result<u16, &'static str>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(self.ready.lock().expect("lock").remove(0))
        }
        fn call(&mut self, _: Req) -> Self::Future {
            std::future::ready(self.results.lock().expect("lock").remove(0))
        }
    }
    let inner = Scripted {
        // The caller's readiness, the first retry's (busy), the second's.
        ready: Arc::new(Mutex::new(vec![Ok(()), Err("busy"), Ok(())])),
        results: Arc::new(Mutex::new(vec![Err("reset"), Ok(200)])),
    };
    let results = inner.results.clone();
    let config = RetryPolicy::default()
        .max_attempts(3)
        .backoff(constant(10 * MS));
    let mut svc = RetryLayer::with_policy(config, Idempotent503).layer(inner);
    let start = Instant::now();
    let got = svc
        .ready()
        .await
        .expect("ready")
        .call(Req { method: "GET" })
        .await;
    assert_eq!(got.expect("third attempt answers"), 200);
    assert!(results.lock().expect("lock").is_empty(), "two calls made");
    assert_eq!(
        start.elapsed(),
        20 * MS,
        "two backoffs: after the reset and after busy"
    );
}
