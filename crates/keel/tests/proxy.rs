//! End to end: the real `keel` binary between a real client and a real upstream.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{ChunkedBody, Keel, TestUpstream, echo, empty, full, get, raw, request};
use futures_util::{SinkExt, StreamExt};
use http::{Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn methods_headers_and_request_ids() {
    let upstream = TestUpstream::start().await;
    let keel = Keel::in_front_of(upstream.addr, "via = true", "").await;

    for method in ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] {
        let (status, headers, body) = request(
            keel.listen,
            Request::builder()
                .method(method)
                .uri("/things/1?x=y")
                .header(header::HOST, "shop.test")
                .header(header::CONNECTION, "keep-alive, x-secret")
                .header("x-secret", "must not pass")
                .header("keep-alive", "timeout=5")
                .header("te", "trailers")
                .header("x-forwarded-for", "10.1.2.3")
                .header("x-custom", "kept")
                .body(full("payload"))
                .expect("request"),
        )
        .await
        .expect("request through keel");
        assert_eq!(status, StatusCode::OK, "{method}");
        let seen = echo(&body);
        assert_eq!(seen["method"], method);
        assert_eq!(seen["uri"], "/things/1?x=y");
        assert_eq!(seen["version"], "HTTP/1.1");
        let h = &seen["headers"];
        assert_eq!(h["host"], "shop.test", "Host is preserved");
        assert_eq!(h["x-custom"], "kept");
        assert!(h.get("x-secret").is_none(), "listed in Connection: {h}");
        assert!(h.get("keep-alive").is_none(), "{h}");
        assert!(h.get("te").is_none(), "{h}");
        assert_eq!(h["x-forwarded-for"], "10.1.2.3, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "shop.test");
        assert_eq!(h["via"], "1.1 keel");
        assert_eq!(seen["body_len"], 7);
        // request id: generated, sent upstream, returned downstream
        let id = headers["x-request-id"].to_str().expect("id");
        assert_eq!(id.len(), 32);
        assert_eq!(h["x-request-id"], id);
        // response hop-by-hop headers from the upstream are removed
        assert!(headers.get("x-upstream-secret").is_none());
        assert!(headers.get("keep-alive").is_none());
        assert_eq!(headers["x-upstream"], "yes");
        assert_eq!(headers["via"], "1.1 keel");
    }

    // A client-supplied request id is kept both ways.
    let (_, headers, body) = request(
        keel.listen,
        Request::get("/")
            .header(header::HOST, "shop.test")
            .header("x-request-id", "client-chosen-id")
            .body(empty())
            .expect("request"),
    )
    .await
    .expect("request");
    assert_eq!(headers["x-request-id"], "client-chosen-id");
    assert_eq!(echo(&body)["headers"]["x-request-id"], "client-chosen-id");
}

#[tokio::test]
async fn streaming_large_and_chunked_bodies_both_ways() {
    let upstream = TestUpstream::start().await;
    let keel = Keel::in_front_of(upstream.addr, "max_body_size = \"64MiB\"", "").await;

    // 16 MiB upload without Content-Length: chunked on both hops.
    let chunk = Bytes::from((0..=255u8).cycle().take(64 * 1024).collect::<Vec<u8>>());
    let chunks = 256;
    let body = ChunkedBody {
        chunk: chunk.clone(),
        chunks,
    };
    let (status, _, response) = request(
        keel.listen,
        Request::post("/upload")
            .header(header::HOST, "a.test")
            .body(body.map_err(|e| match e {}).boxed())
            .expect("request"),
    )
    .await
    .expect("upload");
    assert_eq!(status, StatusCode::OK);
    let seen = echo(&response);
    let expected: Vec<u8> = std::iter::repeat_n(chunk.as_ref(), chunks)
        .flatten()
        .copied()
        .collect();
    assert_eq!(seen["body_len"], expected.len());
    assert_eq!(seen["body_checksum"], common::checksum(&expected));
    assert_eq!(seen["headers"]["transfer-encoding"], "chunked");

    // 8 MiB upload with Content-Length keeps its length.
    let (status, _, response) = request(
        keel.listen,
        Request::put("/upload")
            .header(header::HOST, "a.test")
            .body(full(vec![9u8; 8 << 20]))
            .expect("request"),
    )
    .await
    .expect("upload");
    assert_eq!(status, StatusCode::OK);
    let seen = echo(&response);
    assert_eq!(seen["headers"]["content-length"], (8 << 20).to_string());
    assert_eq!(seen["body_len"], 8 << 20);

    // 20 MiB download streamed from the upstream.
    let (status, headers, body) = get(keel.listen, "/big/320").await.expect("download");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.len(), 320 * 64 * 1024);
    assert!(body.iter().all(|b| *b == b'x'));
    assert_eq!(headers["transfer-encoding"], "chunked");
}

#[tokio::test]
async fn upstream_connections_are_reused() {
    let upstream = TestUpstream::start().await;
    let keel = Keel::in_front_of(upstream.addr, "", "").await;
    // Sequential requests, each on a new downstream connection: the
    // upstream side should keep using one pooled connection.
    for _ in 0..30 {
        let (status, _, _) = get(keel.listen, "/").await.expect("request");
        assert_eq!(status, StatusCode::OK);
    }
    assert!(
        upstream.connections() <= 2,
        "30 requests opened {} upstream connections",
        upstream.connections()
    );
    let (_, _, metrics) = get(keel.admin, "/metrics").await.expect("metrics");
    let metrics = String::from_utf8_lossy(&metrics).into_owned();
    assert!(
        metrics.contains(r#"keel_requests_total{route="all",method="GET",status="2xx"} 30"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("keel_upstream_open_connections{"),
        "{metrics}"
    );
    assert!(
        metrics.contains("keel_request_duration_seconds_bucket"),
        "{metrics}"
    );
}

#[tokio::test]
async fn http2_prior_knowledge_downstream() {
    let upstream = TestUpstream::start().await;
    let keel = Keel::in_front_of(upstream.addr, "", "").await;
    let stream = TcpStream::connect(keel.listen).await.expect("connect");
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(connection);
    let mut tasks = Vec::new();
    for i in 0..20 {
        let mut sender = sender.clone();
        let uri = format!("http://h2.test/item/{i}");
        tasks.push(tokio::spawn(async move {
            let response = sender
                .send_request(
                    Request::builder()
                        .method(Method::POST)
                        .uri(uri)
                        .body(full(vec![1u8; 1000]))
                        .expect("request"),
                )
                .await
                .expect("h2 response");
            assert_eq!(response.version(), http::Version::HTTP_2);
            assert_eq!(response.status(), StatusCode::OK);
            assert!(response.headers().contains_key("x-request-id"));
            let body = response
                .into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes();
            let seen = echo(&body);
            assert_eq!(seen["uri"], format!("/item/{i}"));
            assert_eq!(seen["version"], "HTTP/1.1");
            assert_eq!(seen["headers"]["host"], "h2.test");
            assert_eq!(seen["body_len"], 1000);
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }
}

#[tokio::test]
async fn websocket_echo_through_the_tunnel() {
    let upstream = TestUpstream::start().await;
    let keel = Keel::in_front_of(upstream.addr, "", "").await;
    let (mut ws, response) = tokio_tungstenite::connect_async(format!("ws://{}/ws", keel.listen))
        .await
        .expect("websocket through keel");
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert!(response.headers().contains_key("x-request-id"));
    for i in 0..50 {
        let text = format!("hello {i}");
        ws.send(Message::text(text.clone())).await.expect("send");
        let back = ws.next().await.expect("message").expect("ok");
        assert_eq!(back.into_text().expect("text").as_str(), text);
    }
    let big = vec![42u8; 1 << 20];
    ws.send(Message::binary(big.clone())).await.expect("send");
    let back = ws.next().await.expect("message").expect("ok");
    assert_eq!(back.into_data().as_ref(), big.as_slice());
    ws.close(None).await.expect("close");
    // The gateway still serves plain requests afterwards.
    assert_eq!(get(keel.listen, "/").await.expect("get").0, StatusCode::OK);
}

fn problem(body: &Bytes) -> serde_json::Value {
    serde_json::from_slice(body).expect("problem+json")
}

#[tokio::test]
async fn upstream_down_is_502_and_slow_is_504() {
    let down = common::free_addr();
    let keel = Keel::start(
        "",
        &format!(
            r#"
[upstreams.down]
endpoints = ["http://{down}"]

[upstreams.slow]
endpoints = ["http://{slow}"]
request_timeout = "300ms"

[[routes]]
path_prefix = "/down"
upstream = "down"

[[routes]]
path_prefix = "/slow"
upstream = "slow"
"#,
            slow = TestUpstream::start().await.addr
        ),
    )
    .await;
    let (status, headers, body) = get(keel.listen, "/down/x").await.expect("request");
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(headers[header::CONTENT_TYPE], "application/problem+json");
    let p = problem(&body);
    assert_eq!(p["type"], "urn:keel:problem:upstream-unreachable");
    assert_eq!(p["status"], 502);
    assert_eq!(
        p["request_id"],
        headers["x-request-id"].to_str().expect("id")
    );

    let (status, headers, body) = get(keel.listen, "/slow/3000").await.expect("request");
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(headers[header::CONTENT_TYPE], "application/problem+json");
    assert_eq!(problem(&body)["type"], "urn:keel:problem:upstream-timeout");

    let (status, _, body) = get(keel.listen, "/nowhere").await.expect("request");
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(problem(&body)["type"], "urn:keel:problem:no-route");
}

#[tokio::test]
async fn limits_431_413_and_malformed_400() {
    let upstream = TestUpstream::start().await;
    let keel = Keel::in_front_of(
        upstream.addr,
        "max_header_size = \"2KiB\"\nmax_body_size = \"1MiB\"",
        "",
    )
    .await;

    // Headers over the limit: problem+json 431.
    let (status, headers, body) = request(
        keel.listen,
        Request::get("/")
            .header(header::HOST, "a.test")
            .header("x-big", "y".repeat(3000))
            .body(empty())
            .expect("request"),
    )
    .await
    .expect("request");
    assert_eq!(status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(headers[header::CONTENT_TYPE], "application/problem+json");
    assert_eq!(problem(&body)["type"], "urn:keel:problem:headers-too-large");
    // Far over: the parser's own backstop still answers 431.
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nx-big: {}\r\n\r\n",
        "z".repeat(64 * 1024)
    );
    assert!(
        raw(keel.listen, huge.as_bytes())
            .await
            .starts_with("HTTP/1.1 431")
    );

    // Declared body over the limit: answered before the body is read.
    let answer = raw(
        keel.listen,
        b"POST / HTTP/1.1\r\nHost: a\r\nConnection: close\r\nContent-Length: 2097152\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer.contains("urn:keel:problem:body-too-large"),
        "{answer}"
    );
    // Chunked body that grows over the limit while streaming.
    let response = request(
        keel.listen,
        Request::post("/")
            .header(header::HOST, "a.test")
            .body(
                ChunkedBody {
                    chunk: Bytes::from(vec![1u8; 64 * 1024]),
                    chunks: 40,
                }
                .map_err(|e| match e {})
                .boxed(),
            )
            .expect("request"),
    )
    .await;
    if let Ok((status, _, body)) = response {
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(problem(&body)["type"], "urn:keel:problem:body-too-large");
    }

    // Malformed requests: 400, and the gateway keeps running.
    for garbage in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: nope\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nbad header\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    ] {
        let answer = raw(keel.listen, garbage).await;
        assert!(
            answer.starts_with("HTTP/1.1 400"),
            "{garbage:?} -> {answer:?}"
        );
    }
    let answer = raw(keel.listen, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("urn:keel:problem:bad-request"), "{answer}");
    assert_eq!(
        get(keel.listen, "/").await.expect("still up").0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn admin_endpoints_and_status_command() {
    let upstream = TestUpstream::start().await;
    let keel = Keel::in_front_of(upstream.addr, "", "load_balancing = \"round_robin\"").await;
    let (status, _, body) = get(keel.admin, "/readyz").await.expect("readyz");
    assert_eq!(status, StatusCode::OK, "{body:?}");
    let (status, _, body) = get(keel.admin, "/status").await.expect("status");
    assert_eq!(status, StatusCode::OK);
    let doc: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(doc["upstreams"][0]["name"], "app");
    // As the config spells it, not as Rust's Debug would.
    assert_eq!(doc["upstreams"][0]["load_balancing"], "round_robin");
    assert_eq!(doc["routes"][0]["path_prefix"], "/");

    let admin = keel.admin.to_string();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_keel"))
            .args(["status", "--admin", &admin])
            .output()
    })
    .await
    .expect("join")
    .expect("keel status");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert!(stdout.contains("READY"), "{stdout}");
    assert!(
        stdout.contains(&format!("http://{}", upstream.addr)),
        "{stdout}"
    );

    let nobody = common::free_addr().to_string();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_keel"))
            .args(["status", "--admin", &nobody])
            .output()
    })
    .await
    .expect("join")
    .expect("keel status");
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot reach the admin API"));
}

#[tokio::test]
async fn sigterm_drains_and_exits_zero() {
    let upstream = TestUpstream::start().await;
    let mut keel = Keel::start(
        "",
        &format!(
            "[upstreams.app]\nendpoints = [\"http://{}\"]\n[[routes]]\npath_prefix = \"/\"\nupstream = \"app\"\n[drain]\nshutdown_delay = \"300ms\"\ndeadline = \"5s\"\n",
            upstream.addr
        ),
    )
    .await;
    // A slow request in flight is allowed to finish.
    let listen = keel.listen;
    let slow = tokio::spawn(async move { get(listen, "/slow/600").await });
    // Wait until the gateway reports it in flight upstream.
    let mut in_flight = false;
    for _ in 0..200 {
        let (_, _, body) = get(keel.admin, "/status").await.expect("status");
        let doc: serde_json::Value = serde_json::from_slice(&body).expect("json");
        if doc["upstreams"][0]["endpoints"][0]["in_flight"] == 1 {
            in_flight = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(in_flight, "the slow request never reached the upstream");
    let pid = keel.child.id().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(killed.success());
    // Readiness fails at once while traffic is still served.
    let mut not_ready = false;
    for _ in 0..40 {
        if let Ok((StatusCode::SERVICE_UNAVAILABLE, _, _)) = get(keel.admin, "/readyz").await {
            not_ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(not_ready, "/readyz should fail during the drain");
    let (status, _, body) = slow.await.expect("join").expect("slow request");
    assert_eq!((status, body.as_ref()), (StatusCode::OK, &b"slow done"[..]));
    let exit = tokio::task::spawn_blocking(move || keel.child.wait())
        .await
        .expect("join")
        .expect("wait");
    assert_eq!(exit.code(), Some(0));
}

#[tokio::test]
async fn load_balancing_spreads_requests_over_endpoints() {
    let a = TestUpstream::start().await;
    let b = TestUpstream::start().await;
    let c = TestUpstream::start().await;
    let d = TestUpstream::start().await;
    let keel = Keel::start(
        "",
        &format!(
            r#"
[upstreams.rr]
endpoints = ["http://{a}", "http://{b}"]
load_balancing = "round_robin"

[upstreams.p2c]
endpoints = ["http://{c}", "http://{d}"]

[[routes]]
path_prefix = "/rr"
upstream = "rr"

[[routes]]
path_prefix = "/p2c"
upstream = "p2c"
"#,
            a = a.addr,
            b = b.addr,
            c = c.addr,
            d = d.addr
        ),
    )
    .await;
    for _ in 0..20 {
        assert_eq!(get(keel.listen, "/rr").await.expect("rr").0, StatusCode::OK);
        assert_eq!(
            get(keel.listen, "/p2c").await.expect("p2c").0,
            StatusCode::OK
        );
    }
    // Round robin alternates exactly.
    assert_eq!((a.requests(), b.requests()), (10, 10));
    // Least-outstanding with equal (zero) load picks at random between the two.
    assert_eq!(c.requests() + d.requests(), 20);
    assert!(
        c.requests() > 0 && d.requests() > 0,
        "{} / {}",
        c.requests(),
        d.requests()
    );
}

#[tokio::test]
async fn json_access_log_has_one_line_per_request() {
    let upstream = TestUpstream::start().await;
    let listen = common::free_addr();
    let admin = common::free_addr();
    let config = common::temp_file(
        "keel.toml",
        &format!(
            "[server]\nlisten = \"{listen}\"\nadmin_listen = \"{admin}\"\n\
             [upstreams.app]\nendpoints = [\"http://{}\"]\n\
             [[routes]]\nname = \"app\"\npath_prefix = \"/\"\nupstream = \"app\"\n\
             [log]\nformat = \"json\"\nlevel = \"info\"\n",
            upstream.addr
        ),
    );
    let log = common::temp_file("keel.log", "");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["serve", "--config"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .stdout(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("spawn keel");
    let mut up = false;
    for _ in 0..400 {
        if let Ok((StatusCode::OK, _, _)) = get(admin, "/healthz").await {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(up, "keel did not start");
    let (_, headers, _) = request(
        listen,
        Request::get("/logged")
            .header(header::HOST, "a.test")
            .header("x-request-id", "log-me-123")
            .body(empty())
            .expect("request"),
    )
    .await
    .expect("request");
    assert_eq!(headers["x-request-id"], "log-me-123");
    // The line is written before the response completes; poll the file briefly.
    let mut line = None;
    for _ in 0..100 {
        let text = std::fs::read_to_string(&log).expect("read log");
        line = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["request_id"] == "log-me-123");
        if line.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    let line = line.expect("a JSON access-log line for the request");
    assert_eq!(line["route"], "app");
    assert_eq!(line["status"], 200);
    assert_eq!(line["method"], "GET");
    assert!(line["duration_us"].is_u64());
    assert_eq!(line["level"], "INFO");
}

#[tokio::test]
async fn bodiless_responses_return_connections_to_the_pool() {
    let upstream = TestUpstream::start().await;
    // Breakers and retries off: this test counts exactly one upstream
    // request per client request, 503s included (tests/resilience.rs covers
    // what they do).
    let keel = Keel::in_front_of(
        upstream.addr,
        "",
        "[upstreams.app.breaker]\nenabled = false\n[upstreams.app.retry]\nenabled = false\n",
    )
    .await;
    for _ in 0..10 {
        let (status, headers, body) = request(
            keel.listen,
            Request::head("/")
                .header(header::HOST, "a.test")
                .body(empty())
                .expect("request"),
        )
        .await
        .expect("HEAD");
        assert_eq!(status, StatusCode::OK);
        assert!(body.is_empty());
        assert!(headers.contains_key(header::CONTENT_LENGTH), "{headers:?}");
        let (status, _, body) = get(keel.listen, "/status/204").await.expect("204");
        assert_eq!(status, StatusCode::NO_CONTENT);
        assert!(body.is_empty());
        let (status, _, _) = get(keel.listen, "/status/503").await.expect("503");
        assert_eq!(
            status,
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream statuses pass through"
        );
        let (status, _, body) = get(keel.listen, "/after").await.expect("GET");
        assert_eq!(status, StatusCode::OK);
        assert_eq!(echo(&body)["uri"], "/after");
    }
    assert_eq!(upstream.requests(), 40);
    assert!(
        upstream.connections() <= 2,
        "40 sequential requests opened {} upstream connections",
        upstream.connections()
    );
}
