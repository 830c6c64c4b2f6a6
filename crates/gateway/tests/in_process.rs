//! The gateway driven in-process through `keel_gateway::start`: real
//! sockets and a real upstream, no binary. Several gateways run in one
//! process, which also shows that none of them shares state with another.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use keel_gateway::test_util::{get, send, start_toml, upstream};

fn config(upstream: SocketAddr, extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[upstreams.app]
endpoints = ["http://{upstream}"]
request_timeout = "5s"

[drain]
shutdown_delay = "0s"

[[routes]]
name = "api"
path_prefix = "/api"
upstream = "app"
max_body_size = "1KiB"
{extra}
"#
    )
}

async fn counting_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let addr = upstream(move |request| {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            Response::builder()
                .header("x-hit", n.to_string())
                .header("x-seen-host", request.headers()["host"].as_bytes())
                .body(Bytes::from(format!(
                    "{} {}",
                    request.method(),
                    request.uri()
                )))
                .expect("response")
        }
    })
    .await;
    (addr, hits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_goes_through_and_gets_an_id() {
    let (up, hits) = counting_upstream().await;
    let gateway = start_toml(&config(up, "")).await;
    let (status, headers, body) = get(gateway.listen, "example.test", "/api/x?y=1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "GET /api/x?y=1");
    assert_eq!(headers["x-seen-host"], "example.test");
    assert_eq!(headers["x-request-id"].len(), 32);
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    gateway.drain_now().await.expect("drained");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_errors_are_problem_json_and_blame_the_right_side() {
    // An upstream that refuses connections: a port bound and released.
    let refused = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let gateway = start_toml(&config(refused, "")).await;
    let (status, headers, body) = get(gateway.listen, "a.test", "/nowhere").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(headers["content-type"], "application/problem+json");
    let problem: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(problem["type"], "urn:keel:problem:no-route");

    let (status, _, body) = get(gateway.listen, "a.test", "/api").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let problem: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(problem["status"], 502);

    // A body over the route's limit is the client's fault: 413, and the
    // upstream's failure counter does not move.
    let admin = gateway.admin.expect("admin");
    let failures = |text: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with("keel_upstream_failures_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let (_, _, metrics) = get(admin, "admin", "/metrics").await;
    let before = failures(std::str::from_utf8(&metrics).expect("utf8"));
    let big = Request::post("/api")
        .header("host", "a.test")
        .body(Bytes::from(vec![b'x'; 2048]))
        .expect("request");
    let (status, _, _) = send(gateway.listen, big).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    let (_, _, metrics) = get(admin, "admin", "/metrics").await;
    assert_eq!(
        failures(std::str::from_utf8(&metrics).expect("utf8")),
        before
    );
    gateway.drain_now().await.expect("drained");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_post_runs_once_and_is_replayed() {
    let (up, hits) = counting_upstream().await;
    let gateway = start_toml(&config(
        up,
        "[routes.idempotency]\nenabled = true\n\n[store]\nkind = \"memory\"\n",
    ))
    .await;
    assert!(
        gateway.wait_ready(std::time::Duration::from_secs(5)).await,
        "the memory store connects"
    );
    let post = || {
        Request::post("/api/pay")
            .header("host", "a.test")
            .header("idempotency-key", "k-1")
            .body(Bytes::from_static(b"{\"amount\":1}"))
            .expect("request")
    };
    let (first, first_headers, first_body) = send(gateway.listen, post()).await;
    let (second, second_headers, second_body) = send(gateway.listen, post()).await;
    assert_eq!(first, StatusCode::OK);
    assert_eq!(second, StatusCode::OK);
    assert_eq!(first_body, second_body);
    assert_eq!(first_headers["x-hit"], "1");
    assert_eq!(second_headers["idempotent-replayed"], "true");
    assert_eq!(hits.load(Ordering::SeqCst), 1, "the upstream ran it once");
    gateway.drain_now().await.expect("drained");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_in_one_process_keep_to_themselves() {
    let (up_a, hits_a) = counting_upstream().await;
    let (up_b, hits_b) = counting_upstream().await;
    let a = start_toml(&config(up_a, "")).await;
    let b = start_toml(&config(up_b, "")).await;
    for _ in 0..3 {
        assert_eq!(get(a.listen, "a.test", "/api").await.0, StatusCode::OK);
    }
    assert_eq!(get(b.listen, "b.test", "/api").await.0, StatusCode::OK);
    assert_eq!(hits_a.load(Ordering::SeqCst), 3);
    assert_eq!(hits_b.load(Ordering::SeqCst), 1);
    // Draining one leaves the other serving: their connection registries
    // and drain state are their own.
    a.drain_now().await.expect("a drained");
    assert_eq!(get(b.listen, "b.test", "/api").await.0, StatusCode::OK);
    assert_eq!(hits_b.load(Ordering::SeqCst), 2);
    b.drain_now().await.expect("b drained");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_lets_the_request_in_flight_finish() {
    let (slow, started) = {
        let started = Arc::new(tokio::sync::Notify::new());
        let notify = started.clone();
        let addr = upstream(move |_request| {
            let notify = notify.clone();
            async move {
                notify.notify_one();
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                Response::new(Bytes::from_static(b"done"))
            }
        })
        .await;
        (addr, started)
    };
    let gateway = start_toml(&config(slow, "")).await;
    let listen = gateway.listen;
    let in_flight = tokio::spawn(async move { get(listen, "a.test", "/api").await });
    // Drain only once the upstream has the request.
    started.notified().await;
    gateway.drain_now().await.expect("drained");
    let (status, headers, body) = in_flight.await.expect("the request task");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "done");
    // HTTP/1.1: told to close after this response, not cut.
    assert_eq!(headers["connection"], "close");
    // The listener is gone: a new connection is refused.
    assert!(tokio::net::TcpStream::connect(listen).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_shows_every_task_in_the_supervision_tree() {
    let (up, _) = counting_upstream().await;
    let gateway = start_toml(&config(
        up,
        "\n[upstreams.app.health_check]\npath = \"/healthz\"\ninterval = \"1s\"\n",
    ))
    .await;
    let (status, _, body) = get(gateway.admin.expect("admin"), "admin", "/status").await;
    assert_eq!(status, StatusCode::OK);
    let status: serde_json::Value = serde_json::from_slice(&body).expect("json");
    let children: Vec<&str> = status["supervision"]["children"]
        .as_array()
        .expect("tree")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(
        children,
        ["listener", "admin", "health", "breakers", "pools", "drain"]
    );
    gateway.drain_now().await.expect("drained");
}

/// An upstream on raw sockets: on each connection it reads one request
/// (its head, then until the bytes end with `body`), writes `answer(n)`
/// for the n-th connection and closes. Returns its address and the count
/// of connections accepted.
async fn raw_upstream(
    body: &'static [u8],
    answer: impl Fn(usize) -> Vec<u8> + Send + Sync + 'static,
) -> (SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let n = count.fetch_add(1, Ordering::SeqCst) + 1;
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") || !seen.ends_with(body) {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => seen.extend_from_slice(&buf[..k]),
                    }
                }
                let _ = stream.write_all(&answer(n)).await;
            });
        }
    });
    (addr, accepted)
}

/// The `keel_upstream_open_connections` gauge summed over endpoints.
async fn open_upstream_connections(admin: SocketAddr) -> f64 {
    let (_, _, metrics) = get(admin, "admin", "/metrics").await;
    std::str::from_utf8(&metrics)
        .expect("utf8")
        .lines()
        .filter(|l| l.starts_with("keel_upstream_open_connections{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_the_upstream_closes_while_idle_are_swept_and_never_fail_a_post() {
    // An upstream that answers one request per connection and then closes
    // it without saying so (as a server whose keep-alive timeout is short
    // does), counting the connections it accepted.
    let (up, accepted) = raw_upstream(b"ping", |n| {
        let body = format!("connection {n}");
        format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    })
    .await;
    let gateway = start_toml(&config(up, "")).await;
    let admin = gateway.admin.expect("admin");
    let post = || {
        Request::post("/api/pay")
            .header("host", "a.test")
            .body(Bytes::from_static(b"ping"))
            .expect("request")
    };
    let (status, _, body) = send(gateway.listen, post()).await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"connection 1"[..]));
    // The sweeper closes the half-closed idle connection within a second
    // or so; wait for that event (bounded), not for a fixed time.
    let mut swept = false;
    for _ in 0..100 {
        if open_upstream_connections(admin).await == 0.0 {
            swept = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(swept, "the closed idle connection was not swept");
    // A POST, which is never retried, goes out on a new connection.
    let (status, _, body) = send(gateway.listen, post()).await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"connection 2"[..]));
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    gateway.drain_now().await.expect("drained");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_any_host_reaches_the_upstream_with_the_endpoints() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (up, hits) = counting_upstream().await;
    let gateway = start_toml(&config(up, "")).await;
    let mut client = tokio::net::TcpStream::connect(gateway.listen)
        .await
        .expect("connect");
    client
        .write_all(b"GET /api/old HTTP/1.0\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    client.read_to_end(&mut answer).await.expect("read");
    let answer = String::from_utf8_lossy(&answer).to_lowercase();
    assert!(answer.starts_with("http/1.0 200"), "{answer}");
    assert!(
        answer.contains(&format!("x-seen-host: {up}\r\n")),
        "the endpoint's authority as Host: {answer}"
    );
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    gateway.drain_now().await.expect("drained");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_hop_writes_one_line_of_each_forwarded_header() {
    // The upstream answers with every X-Forwarded-* line it received.
    let up = upstream(|request| async move {
        let mut seen = Vec::new();
        for name in ["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"] {
            for value in request.headers().get_all(name) {
                seen.push(format!("{name}={}", value.to_str().expect("ascii")));
            }
        }
        Response::new(Bytes::from(seen.join("|")))
    })
    .await;
    let gateway = start_toml(&config(up, "")).await;
    let (status, _, body) = get(gateway.listen, "shop.test:8443", "/api/x").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        "x-forwarded-for=127.0.0.1|x-forwarded-proto=http|x-forwarded-host=shop.test:8443"
    );
    // With a hop before: its values come first, in one line each.
    let request = Request::get("/api/x")
        .header("host", "shop.test")
        .header("x-forwarded-proto", "https")
        .body(Bytes::new())
        .expect("request");
    let (_, _, body) = send(gateway.listen, request).await;
    assert_eq!(
        body,
        "x-forwarded-for=127.0.0.1|x-forwarded-proto=https, http|x-forwarded-host=shop.test"
    );
    gateway.drain_now().await.expect("drained");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_answers_malformed_http_gets_the_blame_and_a_502() {
    // Answers with two Content-Lengths that disagree (a response a proxy
    // must not guess at).
    let (up, _) = raw_upstream(b"", |_| {
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nabc".to_vec()
    })
    .await;
    let gateway = start_toml(&config(up, "")).await;
    let admin = gateway.admin.expect("admin");
    let (status, headers, body) = get(gateway.listen, "a.test", "/api/x").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(headers["content-type"], "application/problem+json");
    let problem: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(problem["type"], "urn:keel:problem:upstream-bad-response");
    let (_, _, metrics) = get(admin, "admin", "/metrics").await;
    let text = std::str::from_utf8(&metrics).expect("utf8");
    let bad: f64 = text
        .lines()
        .filter(|l| l.starts_with("keel_upstream_failures_total{") && l.contains("bad_response"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    // The GET is retried (retry-safe), each attempt blamed on the upstream.
    assert!(bad >= 1.0, "{text}");
    gateway.drain_now().await.expect("drained");
}
