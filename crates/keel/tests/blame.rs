//! Who failed: the client's faults never count against the upstream.
//!
//! The real `keel` binary in front of the test upstream, with breakers
//! configured so that five failures would open the endpoint breaker and the
//! upstream-wide one (`failures = 5`, `min_calls = 5`). Each test sends five
//! faulty requests from one client over raw TCP (a malformed chunked body,
//! an upload cut short, a body slower than `request_timeout`), checks what
//! that client got (400, 408, or a closed connection logged as 499), then
//! that ANOTHER client's GET still gets 200, that `/metrics` counts the
//! client's failures and no upstream failure, and that `/status` shows both
//! breakers closed with no failure recorded. A positive control shows five
//! real upstream failures (connections reset by the upstream) DO open the
//! breaker, so the checks can fail.
//!
//! No sleep waits for luck: every wait polls with a deadline.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{Keel, TestUpstream, free_addr, get};
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// Breakers that five failures would open (the endpoint's at its fifth
/// failure; the upstream-wide one at 50 % of at least five requests), open
/// long enough not to close again during a test, and a short timeout.
const BREAKER: &str = "request_timeout = \"1s\"\n\
    [upstreams.app.breaker]\n\
    failures = 5\n\
    window = \"60s\"\n\
    min_calls = 5\n\
    upstream_failure_rate = 0.5\n\
    open_duration = \"60s\"\n";

/// keel with a JSON access log written to a file.
struct Logged {
    keel: Keel,
    log: PathBuf,
}

impl Logged {
    async fn start(upstream: SocketAddr) -> Logged {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let listen = free_addr();
            let admin = free_addr();
            let config = common::temp_file(
                "keel.toml",
                &format!(
                    "[server]\nlisten = \"{listen}\"\nadmin_listen = \"{admin}\"\n\
                     [upstreams.app]\nendpoints = [\"http://{upstream}\"]\n{BREAKER}\n\
                     [[routes]]\nname = \"all\"\npath_prefix = \"/\"\nupstream = \"app\"\n\
                     [log]\nformat = \"json\"\nlevel = \"info\"\n"
                ),
            );
            let log = config.with_file_name("keel.log");
            let child = Command::new(env!("CARGO_BIN_EXE_keel"))
                .args(["serve", "--config"])
                .arg(&config)
                .env_remove("RUST_LOG")
                .stdout(std::fs::File::create(&log).expect("log file"))
                .stderr(Stdio::inherit())
                .spawn()
                .expect("spawn keel");
            let mut keel = Keel {
                child,
                listen,
                admin,
                config,
            };
            // Healthy, or exited (a port taken meanwhile: try other ports).
            loop {
                assert!(Instant::now() < deadline, "keel did not start");
                if let Some(status) = keel.child.try_wait().expect("try_wait") {
                    assert_eq!(status.code(), Some(1), "keel exited: {status}");
                    break;
                }
                // Healthy, still ours (a port taken by another test's keel
                // would make ours exit), and the data plane takes connections.
                if let Ok((StatusCode::OK, _, _)) = get(admin, "/healthz").await
                    && keel.child.try_wait().expect("try_wait").is_none()
                    && TcpStream::connect(listen).await.is_ok()
                {
                    return Logged { keel, log };
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
    }

    /// The access-log lines (JSON) for route `all`.
    fn access_lines(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["route"] == "all")
            .collect()
    }

    /// Polls the access log until `want` lines match `pred` (5 s at most).
    async fn wait_access(&self, want: usize, pred: impl Fn(&serde_json::Value) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let lines = self.access_lines();
            let n = lines.iter().filter(|l| pred(l)).count();
            if n >= want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{n} of {want} access-log lines matched: {lines:#?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn metrics(keel: &Keel) -> String {
    let (_, _, body) = get(keel.admin, "/metrics").await.expect("metrics");
    String::from_utf8_lossy(&body).into_owned()
}

/// The value of the first sample starting with `name_and_labels`.
fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name_and_labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// The sum of every sample of `name`.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Polls `/metrics` until `name_and_labels` reaches `want` (5 s at most),
/// then returns a fresh scrape: one scrape reads the families one after
/// the other, so a request finishing meanwhile may be in a later family
/// and not yet in an earlier one.
async fn wait_metric(keel: &Keel, name_and_labels: &str, want: f64) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = metrics(keel).await;
        if metric(&text, name_and_labels) >= want {
            return metrics(keel).await;
        }
        assert!(
            Instant::now() < deadline,
            "{name_and_labels} never reached {want}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn status_json(keel: &Keel) -> serde_json::Value {
    let (status, _, body) = get(keel.admin, "/status").await.expect("status");
    assert_eq!(status, StatusCode::OK);
    serde_json::from_slice(&body).expect("status JSON")
}

/// Both breakers of upstream `app` are closed and recorded `failures`
/// failures; the endpoint's breaker ignored at least `ignored` outcomes.
async fn assert_breakers(keel: &Keel, failures: u64, ignored: u64) {
    let status = status_json(keel).await;
    let upstream = &status["upstreams"][0]["breaker"];
    let endpoint = &status["upstreams"][0]["endpoints"][0]["resilience"]["breaker"];
    for (name, breaker) in [("upstream", upstream), ("endpoint", endpoint)] {
        assert_eq!(breaker["state"], "closed", "{name} breaker: {status:#}");
        assert_eq!(
            breaker["counters"]["trips"], 0,
            "{name} breaker: {status:#}"
        );
        assert_eq!(
            breaker["counters"]["failures"], failures,
            "{name} breaker: {status:#}"
        );
    }
    let seen = endpoint["counters"]["ignored"].as_u64().unwrap_or(0)
        + upstream["counters"]["ignored"].as_u64().unwrap_or(0);
    assert!(seen >= ignored, "client faults ignored: {status:#}");
}

/// Nothing was counted against the upstream.
fn assert_no_upstream_failure(text: &str) {
    assert!(
        text.contains("keel_upstream_failures_total{"),
        "the family exists: {text}"
    );
    assert_eq!(
        metric_sum(text, "keel_upstream_failures_total{"),
        0.0,
        "{text}"
    );
    assert_eq!(metric_sum(text, "keel_upstream_retries_total{"), 0.0);
    assert_eq!(metric_sum(text, "keel_retry_budget_exhausted_total{"), 0.0);
    assert_eq!(metric_sum(text, "keel_breaker_transitions_total{"), 0.0);
}

/// Another client: a GET gets the upstream's 200.
async fn another_client_gets_200(keel: &Keel) {
    let (status, _, body) = get(keel.listen, "/other-client").await.expect("GET");
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
}

/// Reads one response (head and `Content-Length` body) or until the peer
/// closes, within `within`; returns what was read.
async fn read_response(stream: &mut TcpStream, within: Duration) -> String {
    let deadline = Instant::now() + within;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = find(&out, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&out[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if out.len() >= end + 4 + len {
                break;
            }
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The status code of a raw response ("HTTP/1.1 400 Bad Request ...").
fn status_of(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn malformed_chunked_bodies_are_the_clients_fault() {
    let upstream = TestUpstream::start().await;
    let logged = Logged::start(upstream.addr).await;
    let keel = &logged.keel;

    // POST (never retried) and PUT (safe to retry, but a chunked body is
    // streamed, not kept).
    for (i, method) in ["POST", "PUT", "POST", "PUT", "POST"].iter().enumerate() {
        let mut stream = TcpStream::connect(keel.listen).await.expect("connect");
        let request = format!(
            "{method} /upload/{i} HTTP/1.1\r\nHost: app.test\r\n\
             Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.expect("write");
        let response = read_response(&mut stream, Duration::from_secs(5)).await;
        assert_eq!(status_of(&response), 400, "{method}: {response}");
        assert!(
            response.contains("urn:keel:problem:bad-request"),
            "{response}"
        );
    }

    another_client_gets_200(keel).await;
    let text = wait_metric(
        keel,
        "keel_client_failures_total{route=\"all\",outcome=\"client_error\"}",
        5.0,
    )
    .await;
    assert_eq!(
        metric(
            &text,
            "keel_client_failures_total{route=\"all\",outcome=\"client_error\"}"
        ),
        5.0,
        "{text}"
    );
    assert_no_upstream_failure(&text);
    assert_breakers(keel, 0, 5).await;
    logged
        .wait_access(5, |l| l["status"] == 400 && l["outcome"] == "client_error")
        .await;
    logged
        .wait_access(1, |l| l["status"] == 200 && l["outcome"] == "-")
        .await;
}

#[tokio::test]
async fn uploads_cut_short_are_the_clients_fault() {
    let upstream = TestUpstream::start().await;
    let logged = Logged::start(upstream.addr).await;
    let keel = &logged.keel;

    // A declared length, part of the body, then the client closes: its
    // sending half only (it still reads: it gets a 400), or the whole
    // connection (nothing to answer: logged as 499).
    let cases = [
        ("POST", true),
        ("PUT", true),
        ("POST", false),
        ("PUT", false),
        ("POST", false),
    ];
    for (i, (method, half)) in cases.iter().enumerate() {
        let mut stream = TcpStream::connect(keel.listen).await.expect("connect");
        let request = format!(
            "{method} /upload/{i} HTTP/1.1\r\nHost: app.test\r\n\
             Content-Length: 1000\r\n\r\n0123456789"
        );
        stream.write_all(request.as_bytes()).await.expect("write");
        if *half {
            stream.shutdown().await.expect("half close");
            let response = read_response(&mut stream, Duration::from_secs(5)).await;
            assert_eq!(status_of(&response), 400, "{method}: {response}");
            assert!(
                response.contains("urn:keel:problem:request-body-incomplete"),
                "{response}"
            );
        } else {
            drop(stream);
        }
    }

    // The gateway saw all five (the closed ones leave no answer to wait
    // for: the counter says when they were handled).
    let text = wait_metric(
        keel,
        "keel_client_failures_total{route=\"all\",outcome=\"client_closed\"}",
        5.0,
    )
    .await;
    another_client_gets_200(keel).await;
    assert_eq!(
        metric(
            &text,
            "keel_client_failures_total{route=\"all\",outcome=\"client_closed\"}"
        ),
        5.0,
        "{text}"
    );
    assert_no_upstream_failure(&text);
    // Counted as 499 (4xx), never as a 5xx.
    let mut counted: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("keel_requests_total{route=\"all\"") && !l.ends_with(" 0"))
        .collect();
    counted.sort_unstable();
    assert_eq!(
        counted,
        [
            "keel_requests_total{route=\"all\",method=\"POST\",status=\"4xx\"} 3",
            "keel_requests_total{route=\"all\",method=\"PUT\",status=\"4xx\"} 2",
        ],
        "{text}"
    );
    assert_breakers(keel, 0, 5).await;
    logged
        .wait_access(5, |l| l["status"] == 499 && l["outcome"] == "client_closed")
        .await;
}

#[tokio::test]
async fn bodies_slower_than_the_timeout_are_the_clients_fault() {
    let upstream = TestUpstream::start().await;
    let logged = Logged::start(upstream.addr).await;
    let keel = &logged.keel;

    // Five concurrent uploads dripping one byte every 100 ms of a declared
    // 100: `request_timeout = 1s` passes while the gateway waits for the
    // client's bytes. POST is streamed to the upstream; PUT is read in full
    // first (it could be retried). Each gets 408 at about 1 s.
    let answered = Arc::new(AtomicUsize::new(0));
    let mut uploads = Vec::new();
    for (i, method) in ["POST", "PUT", "POST", "PUT", "POST"].iter().enumerate() {
        let addr = keel.listen;
        let answered = answered.clone();
        uploads.push(tokio::spawn(async move {
            let stream = TcpStream::connect(addr).await.expect("connect");
            let (mut read, mut write) = stream.into_split();
            let head = format!(
                "{method} /upload/{i} HTTP/1.1\r\nHost: app.test\r\nContent-Length: 100\r\n\r\n"
            );
            write.write_all(head.as_bytes()).await.expect("write head");
            let started = Instant::now();
            let drip = tokio::spawn(async move {
                for _ in 0..100 {
                    if write.write_all(b"x").await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            });
            let mut out = Vec::new();
            let mut buf = [0u8; 4096];
            let deadline = started + Duration::from_secs(5);
            while find(&out, b"\r\n\r\n").is_none() {
                match tokio::time::timeout_at(deadline, read.read(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
                    _ => break,
                }
            }
            drip.abort();
            answered.fetch_add(1, Ordering::SeqCst);
            (
                method.to_string(),
                String::from_utf8_lossy(&out).into_owned(),
                started.elapsed(),
            )
        }));
    }
    for upload in uploads {
        let (method, response, took) = upload.await.expect("upload task");
        assert_eq!(status_of(&response), 408, "{method}: {response}");
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(4),
            "{method} answered after {took:?}"
        );
    }
    assert_eq!(answered.load(Ordering::SeqCst), 5);

    another_client_gets_200(keel).await;
    let text = wait_metric(
        keel,
        "keel_client_failures_total{route=\"all\",outcome=\"client_timeout\"}",
        5.0,
    )
    .await;
    assert_no_upstream_failure(&text);
    assert_breakers(keel, 0, 5).await;
    logged
        .wait_access(5, |l| {
            l["status"] == 408 && l["outcome"] == "client_timeout"
        })
        .await;

    // The other way round: the whole body sent, the upstream late. That is
    // the upstream's timeout (504), counted against it.
    let mut stream = TcpStream::connect(keel.listen).await.expect("connect");
    stream
        .write_all(b"POST /slow/3000 HTTP/1.1\r\nHost: app.test\r\nContent-Length: 5\r\n\r\nhello")
        .await
        .expect("write");
    let response = read_response(&mut stream, Duration::from_secs(5)).await;
    assert_eq!(status_of(&response), 504, "{response}");
    let text = wait_metric(
        keel,
        "keel_upstream_failures_total{upstream=\"app\",cause=\"timeout\"}",
        1.0,
    )
    .await;
    assert_eq!(metric_sum(&text, "keel_upstream_failures_total{"), 1.0);
    assert_breakers(keel, 1, 5).await;
}

/// An upstream that reads the request head and resets the connection.
async fn resetting_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let mut seen = Vec::new();
                while find(&seen, b"\r\n\r\n").is_none() {
                    match stream.read(&mut buf).await {
                        Ok(n) if n > 0 => seen.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                let _ = stream.set_zero_linger();
                drop(stream);
            });
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn upstream_resets_do_open_the_breaker() {
    let (addr, accepted) = resetting_upstream().await;
    let keel = Keel::in_front_of(addr, "", BREAKER).await;

    // Five POSTs (never retried): the upstream resets each one.
    for i in 0..5 {
        let mut stream = TcpStream::connect(keel.listen).await.expect("connect");
        let request = format!(
            "POST /upload/{i} HTTP/1.1\r\nHost: app.test\r\nContent-Length: 5\r\n\r\nhello"
        );
        stream.write_all(request.as_bytes()).await.expect("write");
        let response = read_response(&mut stream, Duration::from_secs(5)).await;
        assert_eq!(status_of(&response), 502, "{response}");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 5);

    // Now another client is refused without reaching the upstream.
    let (status, _, body) = get(keel.listen, "/other-client").await.expect("GET");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        String::from_utf8_lossy(&body)
            .contains("circuit breakers of upstream \\\"app\\\" are open"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 5);

    let text = metrics(&keel).await;
    assert_eq!(
        metric(
            &text,
            "keel_upstream_failures_total{upstream=\"app\",cause=\"bad_response\"}"
        ),
        5.0,
        "{text}"
    );
    assert_eq!(metric_sum(&text, "keel_client_failures_total{"), 0.0);
    let status = status_json(&keel).await;
    let endpoint = &status["upstreams"][0]["endpoints"][0]["resilience"]["breaker"];
    assert_eq!(endpoint["state"], "open", "{status:#}");
    assert_eq!(endpoint["counters"]["failures"], 5, "{status:#}");
    assert_eq!(
        status["upstreams"][0]["breaker"]["state"], "open",
        "{status:#}"
    );
}
