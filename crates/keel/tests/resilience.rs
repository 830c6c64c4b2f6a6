//! End to end: breakers, outlier ejection, health checks, stale fallback,
//! retries and operator overrides, with the real `keel` binary in front of
//! test upstreams that count every request they receive.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{BoxBody, Keel, empty, free_addr, full, get, request};
use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

const OK: u8 = 0;
const FAIL_503: u8 = 1;
const FAIL_503_RETRY_AFTER: u8 = 2;

/// An upstream whose behaviour the test switches, counting what reaches it.
#[derive(Clone)]
struct Controlled {
    addr: SocketAddr,
    /// Requests other than health checks.
    hits: Arc<AtomicUsize>,
    health_hits: Arc<AtomicUsize>,
    connections: Arc<AtomicUsize>,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: Arc<AtomicUsize>,
    mode: Arc<AtomicU8>,
    delay_ms: Arc<AtomicU64>,
    health_ok: Arc<AtomicBool>,
    /// `x-request-id` of every non-health request, in arrival order.
    ids: Arc<Mutex<Vec<String>>>,
}

impl Controlled {
    async fn start() -> Controlled {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let up = Controlled {
            addr: listener.local_addr().expect("addr"),
            hits: Arc::default(),
            health_hits: Arc::default(),
            connections: Arc::default(),
            in_flight: Arc::default(),
            max_in_flight: Arc::default(),
            mode: Arc::default(),
            delay_ms: Arc::default(),
            health_ok: Arc::new(AtomicBool::new(true)),
            ids: Arc::default(),
        };
        let server = up.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                server.connections.fetch_add(1, Ordering::SeqCst);
                let server = server.clone();
                tokio::spawn(async move {
                    let _ = http1::Builder::new()
                        .serve_connection(
                            TokioIo::new(stream),
                            service_fn(move |r| {
                                let server = server.clone();
                                async move { Ok::<_, Infallible>(server.handle(r).await) }
                            }),
                        )
                        .await;
                });
            }
        });
        up
    }

    async fn handle(&self, request: Request<Incoming>) -> Response<BoxBody> {
        if request.uri().path() == "/healthz" {
            self.health_hits.fetch_add(1, Ordering::SeqCst);
            let status = if self.health_ok.load(Ordering::SeqCst) {
                StatusCode::OK
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            };
            return Response::builder()
                .status(status)
                .body(empty())
                .expect("response");
        }
        let n = self.hits.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some(id) = request.headers().get("x-request-id") {
            self.ids
                .lock()
                .expect("ids")
                .push(id.to_str().unwrap_or("-").to_owned());
        }
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let delay = self.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        let response = match self.mode.load(Ordering::SeqCst) {
            FAIL_503 => Response::builder().status(StatusCode::SERVICE_UNAVAILABLE),
            FAIL_503_RETRY_AFTER => Response::builder()
                .status(StatusCode::SERVICE_UNAVAILABLE)
                .header(header::RETRY_AFTER, "120"),
            _ => {
                let builder = Response::builder()
                    .header("x-hit", n.to_string())
                    .header(header::VARY, "accept-language");
                if request.uri().path() == "/nostore" {
                    builder.header(header::CACHE_CONTROL, "no-store")
                } else {
                    builder.header(header::CACHE_CONTROL, "max-age=0")
                }
            }
        };
        let body = format!("answer {n} for {}", request.uri());
        response.body(full(body)).expect("response")
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }
}

async fn send(
    keel: &Keel,
    method: Method,
    path: &str,
    extra: &[(&str, &str)],
) -> (StatusCode, http::HeaderMap, Bytes) {
    let mut builder = Request::builder()
        .method(method.clone())
        .uri(path)
        .header(header::HOST, "app.test");
    for (name, value) in extra {
        builder = builder.header(*name, *value);
    }
    let body = if method == Method::GET || method == Method::HEAD {
        empty()
    } else {
        full("payload")
    };
    request(keel.listen, builder.body(body).expect("request"))
        .await
        .expect("request through keel")
}

async fn status_json(keel: &Keel) -> serde_json::Value {
    let (status, _, body) = get(keel.admin, "/status").await.expect("status");
    assert_eq!(status, StatusCode::OK);
    serde_json::from_slice(&body).expect("status JSON")
}

async fn admin_post(keel: &Keel, path: &str) -> (StatusCode, serde_json::Value) {
    let (status, _, body) = request(
        keel.admin,
        Request::post(path)
            .header(header::HOST, keel.admin.to_string())
            .body(empty())
            .expect("request"),
    )
    .await
    .expect("admin");
    (
        status,
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
    )
}

async fn metrics(keel: &Keel) -> String {
    let (_, _, body) = get(keel.admin, "/metrics").await.expect("metrics");
    String::from_utf8_lossy(&body).into_owned()
}

fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name_and_labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn retry_after(headers: &http::HeaderMap) -> u64 {
    headers
        .get(header::RETRY_AFTER)
        .expect("Retry-After")
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds")
}

/// Polls `/status` until `check` holds (the gateway's state, not time, is
/// what the test waits for).
async fn wait_for_status(keel: &Keel, what: &str, check: impl Fn(&serde_json::Value) -> bool) {
    for _ in 0..400 {
        if check(&status_json(keel).await) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!(
        "timed out waiting for {what}: {:#}",
        status_json(keel).await
    );
}

fn endpoint_breaker(status: &serde_json::Value, i: usize) -> &serde_json::Value {
    &status["upstreams"][0]["endpoints"][i]["resilience"]["breaker"]
}

#[tokio::test]
async fn a_failing_upstream_trips_the_breaker_then_reads_go_stale_and_writes_fail_fast() {
    let up = Controlled::start().await;
    let keel = Keel::start(
        "",
        &format!(
            "[upstreams.app]\nendpoints = [\"http://{}\"]\n\
             [upstreams.app.breaker]\nfailures = 3\nopen_duration = \"60s\"\n\
             [upstreams.app.retry]\nenabled = false\n\
             [[routes]]\nname = \"all\"\npath_prefix = \"/\"\nupstream = \"app\"\n\
             [routes.stale]\nmax_age = \"10m\"\n",
            up.addr
        ),
    )
    .await;

    // A good answer is kept (for this Accept-Language); no-store is not.
    let (status, headers, fresh) = send(
        &keel,
        Method::GET,
        "/item?id=7",
        &[("accept-language", "fr")],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        headers.get("keel-stale").is_none(),
        "fresh answers are not stale"
    );
    let (status, _, _) = send(&keel, Method::GET, "/nostore", &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(up.hits(), 2);

    // The upstream starts failing: its 503s pass through until the third
    // failure opens the endpoint's breaker.
    up.set(FAIL_503);
    for _ in 0..3 {
        let (status, _, _) = send(&keel, Method::POST, "/orders", &[]).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    }
    assert_eq!(up.hits(), 5);
    let connections = up.connections.load(Ordering::SeqCst);

    // Open: a cached GET is served stale, marked, with its age; nothing
    // reaches the upstream, not even a connection attempt.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, headers, body) = send(
        &keel,
        Method::GET,
        "/item?id=7",
        &[("accept-language", "fr")],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, fresh, "the last good answer");
    assert_eq!(headers["keel-stale"], "true");
    let age: u64 = headers[header::AGE]
        .to_str()
        .expect("age")
        .parse()
        .expect("age");
    assert!(age >= 1, "Age counts the time since it was stored: {age}");

    // Another variant (Vary: Accept-Language), a no-store answer, an unseen
    // path and a write: all 503 problem+json with the time left open.
    for (method, path, lang) in [
        (Method::GET, "/item?id=7", "de"),
        (Method::GET, "/nostore", "fr"),
        (Method::GET, "/never-seen", "fr"),
        (Method::POST, "/orders", "fr"),
        (Method::PUT, "/item?id=7", "fr"),
    ] {
        let (status, headers, body) =
            send(&keel, method.clone(), path, &[("accept-language", lang)]).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{method} {path}");
        assert_eq!(headers[header::CONTENT_TYPE], "application/problem+json");
        let wait = retry_after(&headers);
        assert!((55..=60).contains(&wait), "Retry-After {wait}");
        let problem: serde_json::Value = serde_json::from_slice(&body).expect("problem");
        assert_eq!(problem["type"], "urn:keel:problem:unavailable");
    }
    assert_eq!(up.hits(), 5, "fail fast: no request reached the upstream");
    assert_eq!(
        up.connections.load(Ordering::SeqCst),
        connections,
        "fail fast: no connection was attempted"
    );

    let status = status_json(&keel).await;
    assert_eq!(endpoint_breaker(&status, 0)["state"], "open");
    let text = metrics(&keel).await;
    assert_eq!(
        metric(&text, "keel_stale_responses_total{route=\"all\"}"),
        1.0
    );
    assert!(
        metric(
            &text,
            &format!(
                "keel_breaker_rejections_total{{upstream=\"app\",endpoint=\"http://{}\"}}",
                up.addr
            )
        ) >= 5.0,
        "{text}"
    );
    assert!(text.contains("keel_breaker_state{"), "{text}");
    assert!(
        text.contains("keel_breaker_transitions_total{") && text.contains("to=\"open\""),
        "{text}"
    );
}

#[tokio::test]
async fn an_upstream_retry_after_sets_the_open_time() {
    let up = Controlled::start().await;
    let keel = Keel::in_front_of(
        up.addr,
        "",
        "[upstreams.app.breaker]\nfailures = 1\nopen_duration = \"5s\"\n\
         [upstreams.app.retry]\nenabled = false\n",
    )
    .await;
    up.set(FAIL_503_RETRY_AFTER);
    let (status, _, _) = send(&keel, Method::GET, "/a", &[]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let (status, headers, _) = send(&keel, Method::GET, "/a", &[]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let wait = retry_after(&headers);
    assert!(
        (110..=120).contains(&wait),
        "the upstream's Retry-After (120 s), not open_duration (5 s): {wait}"
    );
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn recovery_goes_through_bounded_probes_then_gradually_to_closed() {
    let up = Controlled::start().await;
    let keel = Keel::in_front_of(
        up.addr,
        "",
        "[upstreams.app.breaker]\nfailures = 2\nopen_duration = \"1s\"\nhalf_open_probes = 2\n\
         recovery_step = \"300ms\"\n\
         [upstreams.app.retry]\nenabled = false\n",
    )
    .await;
    up.set(FAIL_503);
    for _ in 0..2 {
        send(&keel, Method::GET, "/x", &[]).await;
    }
    wait_for_status(&keel, "the breaker to open", |s| {
        endpoint_breaker(s, 0)["state"] == "open"
    })
    .await;

    // The upstream is back but slow, so the probes stay in flight while
    // 20 concurrent requests arrive after the open time.
    up.set(OK);
    up.delay_ms.store(300, Ordering::SeqCst);
    up.max_in_flight.store(0, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let before = up.hits();
    let keel = Arc::new(keel);
    let wave: Vec<_> = (0..20)
        .map(|_| {
            let keel = keel.clone();
            tokio::spawn(async move { send(&keel, Method::GET, "/x", &[]).await.0 })
        })
        .collect();
    let mut ok = 0;
    for task in wave {
        match task.await.expect("task") {
            StatusCode::OK => ok += 1,
            StatusCode::SERVICE_UNAVAILABLE => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(ok, 2, "exactly the two probes went through");
    assert_eq!(up.hits() - before, 2);
    assert!(up.max_in_flight.load(Ordering::SeqCst) <= 2);

    // The probes succeeded: gradual recovery, then closed.
    up.delay_ms.store(0, Ordering::SeqCst);
    let mut seen_recovering = false;
    let mut closed = false;
    for _ in 0..200 {
        let state = endpoint_breaker(&status_json(&keel).await, 0)["state"].clone();
        seen_recovering |= state == "recovering";
        if state == "closed" {
            closed = true;
            break;
        }
        send(&keel, Method::GET, "/x", &[]).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(seen_recovering, "the breaker went through gradual recovery");
    assert!(closed, "and closed");
    let (status, _, _) = send(&keel, Method::GET, "/x", &[]).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn with_one_dead_endpoint_reads_see_no_errors_and_posts_are_never_retried() {
    let live = Controlled::start().await;
    let dead = free_addr();
    let keel = Keel::start(
        "",
        &format!(
            "[upstreams.app]\nendpoints = [\"http://{}\", \"http://{dead}\"]\n\
             load_balancing = \"round_robin\"\n\
             [upstreams.app.retry]\nbackoff_base = \"1ms\"\nbackoff_cap = \"5ms\"\n\
             [[routes]]\nname = \"all\"\npath_prefix = \"/\"\nupstream = \"app\"\n",
            live.addr
        ),
    )
    .await;

    // POSTs first, while the dead endpoint still gets its turn: those that
    // land on it fail with 502 and are not tried again on the live one.
    let mut posts_ok = 0;
    let mut posts_failed = 0;
    for _ in 0..4 {
        match send(&keel, Method::POST, "/orders", &[]).await.0 {
            StatusCode::OK => posts_ok += 1,
            StatusCode::BAD_GATEWAY => posts_failed += 1,
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(
        (posts_ok, posts_failed),
        (2, 2),
        "round robin over two endpoints"
    );
    assert_eq!(
        live.hits(),
        2,
        "each POST reached the live endpoint at most once"
    );

    // Safe methods: the dead endpoint's failures are retried on the live
    // one until its breaker ejects it; no client sees an error.
    for i in 0..30 {
        let method = if i % 3 == 0 { Method::PUT } else { Method::GET };
        let (status, _, _) = send(&keel, method.clone(), "/things", &[]).await;
        assert_eq!(status, StatusCode::OK, "{method} #{i}");
    }
    assert_eq!(live.hits(), 32);
    let ids = live.ids.lock().expect("ids").clone();
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        unique.len(),
        ids.len(),
        "no request reached the live endpoint twice"
    );
    let status = status_json(&keel).await;
    assert_eq!(endpoint_breaker(&status, 1)["state"], "open", "{status:#}");
    assert_eq!(endpoint_breaker(&status, 0)["state"], "closed");
    // Ejected: later POSTs all go to the live endpoint.
    for _ in 0..4 {
        assert_eq!(
            send(&keel, Method::POST, "/orders", &[]).await.0,
            StatusCode::OK
        );
    }
    let text = metrics(&keel).await;
    assert!(
        metric(&text, "keel_upstream_retries_total{upstream=\"app\"}") >= 1.0,
        "{text}"
    );
}

#[tokio::test]
async fn the_retry_budget_bounds_upstream_attempts() {
    let up = Controlled::start().await;
    let keel = Keel::in_front_of(
        up.addr,
        "",
        "[upstreams.app.breaker]\nenabled = false\n\
         [upstreams.app.retry]\nmax_attempts = 3\nbudget_ratio = 0.2\nbudget_min_per_second = 1\n\
         backoff_base = \"1ms\"\nbackoff_cap = \"2ms\"\n",
    )
    .await;
    up.set(FAIL_503);
    let requests = 60;
    for _ in 0..requests {
        let (status, _, _) = send(&keel, Method::GET, "/x", &[]).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    }
    // Without a budget: 3 attempts each. With it: the requests, plus 20 %
    // of them, plus the floor of 1 per second over the 10 s window.
    let attempts = up.hits();
    let bound = requests + requests / 5 + 10;
    assert!(attempts > requests, "some retries were made: {attempts}");
    assert!(
        attempts <= bound,
        "{attempts} attempts, budget allows {bound}"
    );
    let text = metrics(&keel).await;
    assert!(
        metric(&text, "keel_retry_budget_exhausted_total{upstream=\"app\"}") > 0.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, "keel_upstream_retries_total{upstream=\"app\"}") as usize,
        attempts - requests
    );
}

#[tokio::test]
async fn health_checks_eject_and_readmit_an_endpoint() {
    let a = Controlled::start().await;
    let b = Controlled::start().await;
    let keel = Keel::start(
        "",
        &format!(
            "[upstreams.app]\nendpoints = [\"http://{}\", \"http://{}\"]\n\
             [upstreams.app.health_check]\npath = \"/healthz\"\ninterval = \"50ms\"\ntimeout = \"200ms\"\n\
             healthy_threshold = 2\nunhealthy_threshold = 2\n\
             [[routes]]\nname = \"all\"\npath_prefix = \"/\"\nupstream = \"app\"\n",
            a.addr, b.addr
        ),
    )
    .await;
    let health = |s: &serde_json::Value| {
        s["upstreams"][0]["endpoints"][0]["resilience"]["health"]["healthy"].clone()
    };
    wait_for_status(&keel, "checks to run", |s| {
        s["upstreams"][0]["endpoints"][0]["resilience"]["health"]["passed"]
            .as_u64()
            .is_some_and(|n| n >= 1)
    })
    .await;

    a.health_ok.store(false, Ordering::SeqCst);
    wait_for_status(&keel, "endpoint a to be ejected", |s| health(s) == false).await;
    let before = a.hits();
    for _ in 0..20 {
        assert_eq!(send(&keel, Method::GET, "/x", &[]).await.0, StatusCode::OK);
    }
    assert_eq!(a.hits(), before, "an ejected endpoint gets no traffic");
    let rendered = std::process::Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["status", "--admin", &keel.admin.to_string()])
        .output()
        .expect("keel status");
    let rendered = String::from_utf8_lossy(&rendered.stdout);
    assert!(rendered.contains("EJECTED"), "{rendered}");

    a.health_ok.store(true, Ordering::SeqCst);
    wait_for_status(&keel, "endpoint a to be re-admitted", |s| health(s) == true).await;
    for _ in 0..20 {
        assert_eq!(send(&keel, Method::GET, "/x", &[]).await.0, StatusCode::OK);
    }
    assert!(a.hits() > before, "re-admitted endpoints get traffic again");
    assert!(a.health_hits.load(Ordering::SeqCst) >= 4);
    // The checks run as supervised children of the gateway's tree.
    wait_for_status(&keel, "health checks in the supervision tree", |s| {
        s["supervision"]["children"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| {
                c["name"] == "health"
                    && c["children"].as_array().is_some_and(|checks| {
                        !checks.is_empty() && checks.iter().all(|k| k["state"] == "running")
                    })
            })
    })
    .await;
    let text = metrics(&keel).await;
    assert!(
        text.contains("keel_health_checks_total{") && text.contains("result=\"fail\""),
        "{text}"
    );
}

#[tokio::test]
async fn operator_overrides_work_and_are_reported() {
    let up = Controlled::start().await;
    let keel = Keel::in_front_of(
        up.addr,
        "",
        "[upstreams.app.breaker]\nfailures = 2\nopen_duration = \"60s\"\n\
         [upstreams.app.retry]\nenabled = false\n",
    )
    .await;
    let status_line = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_keel"))
            .args(["status", "--admin", &keel.admin.to_string()])
            .output()
            .expect("keel status");
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    // melt: every request refused at once, none reaches the upstream.
    let (code, body) = admin_post(&keel, "/breakers/app/melt").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(body["mode"], "forced_open");
    let (status, headers, _) = send(&keel, Method::GET, "/x", &[]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(headers.contains_key(header::RETRY_AFTER));
    assert_eq!(up.hits(), 0);
    assert_eq!(
        status_json(&keel).await["upstreams"][0]["breaker"]["mode"],
        "forced_open"
    );
    assert!(status_line().contains("[FORCED_OPEN]"), "{}", status_line());

    // reset: traffic flows again.
    admin_post(&keel, "/breakers/app/reset").await;
    assert_eq!(send(&keel, Method::GET, "/x", &[]).await.0, StatusCode::OK);

    // disable: failures are let through without tripping anything.
    let (code, _) = admin_post(&keel, "/breakers/app/disable").await;
    assert_eq!(code, StatusCode::OK);
    up.set(FAIL_503);
    for _ in 0..6 {
        send(&keel, Method::GET, "/x", &[]).await;
    }
    assert_eq!(up.hits(), 7, "disabled breakers let everything through");
    assert_eq!(
        endpoint_breaker(&status_json(&keel).await, 0)["mode"],
        "disabled"
    );
    assert!(status_line().contains("[DISABLED]"));

    // enable: the next failures open the endpoint's breaker again.
    admin_post(&keel, "/breakers/app/enable").await;
    for _ in 0..2 {
        send(&keel, Method::GET, "/x", &[]).await;
    }
    let hits = up.hits();
    assert!(hits <= 9, "{hits}");
    let (status, headers, _) = send(&keel, Method::GET, "/x", &[]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers[header::CONTENT_TYPE], "application/problem+json");
    assert_eq!(up.hits(), hits, "open again after enable");
    assert!(status_line().contains("OPEN"));

    // Bad requests to the admin API are explained.
    assert_eq!(
        admin_post(&keel, "/breakers/nope/melt").await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        admin_post(&keel, "/breakers/app/explode").await.0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn bad_resilience_keys_are_reported_with_their_place() {
    let path = common::temp_file(
        "bad.toml",
        "[server]\nlisten = \"127.0.0.1:0\"\n[upstreams.app]\nendpoints = [\"http://127.0.0.1:1\"]\n\
         [upstreams.app.breaker]\nfailures = 0\n[upstreams.app.retry]\nmax_atempts = 2\n\
         [[routes]]\npath_prefix = \"/\"\nupstream = \"app\"\n",
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("keel check");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("max_atempts"), "{stderr}");
}
