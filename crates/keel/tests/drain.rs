//! End-to-end tests of draining with the real binary: the shutdown
//! sequence on SIGTERM (readiness first, in-flight requests complete, paced
//! WebSocket closes with code 1012 and a reconnect hint, exit 0), the
//! deadline cutting a client that ignores the close, and a blue/green
//! endpoint drain driven by `keel drain`.

mod common;

use std::net::SocketAddr;
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Keel, TestUpstream, empty, get};
use futures_util::StreamExt;
use http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// How many WebSocket clients the file-descriptor limit allows, up to
/// `want` (each costs four descriptors in this process and keel).
fn clients_allowed(want: usize) -> usize {
    let soft = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| {
            limits
                .lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).map(str::to_owned))
        })
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1024);
    want.min(soft.saturating_sub(200) / 3)
}

fn sigterm(keel: &Keel) {
    let status = Command::new("kill")
        .args(["-TERM", &keel.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

async fn wait_exit(keel: &mut Keel, within: Duration) -> (ExitStatus, Instant) {
    let until = Instant::now() + within;
    loop {
        if let Some(status) = keel.child.try_wait().expect("try_wait") {
            return (status, Instant::now());
        }
        assert!(
            Instant::now() < until,
            "keel did not exit within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// keel in front of `upstream` (one upstream `app`, one route `/`) with
/// `drain` as the body of its `[drain]` section.
async fn keel_draining(upstream: SocketAddr, drain: &str) -> Keel {
    Keel::start(
        "",
        &format!(
            "[upstreams.app]\nendpoints = [\"http://{upstream}\"]\n\n[[routes]]\npath_prefix = \"/\"\nupstream = \"app\"\n\n[drain]\n{drain}"
        ),
    )
    .await
}

/// What a WebSocket client saw when the gateway closed it.
#[derive(Debug)]
struct Closed {
    at: Instant,
    code: Option<u16>,
    reason: String,
}

/// Opens a WebSocket through keel and waits for the server to close it.
async fn ws_client(addr: SocketAddr) -> tokio::task::JoinHandle<Closed> {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .expect("websocket through keel");
    tokio::spawn(async move {
        let mut closed = Closed {
            at: Instant::now(),
            code: None,
            reason: String::new(),
        };
        while let Some(message) = ws.next().await {
            match message {
                Ok(Message::Close(frame)) => {
                    closed.at = Instant::now();
                    if let Some(frame) = frame {
                        closed.code = Some(u16::from(frame.code));
                        closed.reason = frame.reason.to_string();
                    }
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        closed
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_order_and_exits_zero() {
    let upstream = TestUpstream::start().await;
    let (delay, interval, batch, deadline) = (
        Duration::from_millis(1000),
        Duration::from_millis(400),
        100usize,
        Duration::from_secs(20),
    );
    let mut keel = keel_draining(
        upstream.addr,
        &format!(
            "shutdown_delay = \"1s\"\nbatch_size = {batch}\nbatch_interval = \"400ms\"\n\
             deadline = \"20s\"\njitter = false\nreconnect_window = \"5s\"\n"
        ),
    )
    .await;

    let n = clients_allowed(1000);
    if n < 1000 {
        eprintln!("only {n} WebSocket clients: the open-file limit is low");
    }
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        clients.push(ws_client(keel.listen).await);
    }

    // An HTTP/1.1 keep-alive connection and an HTTP/2 connection, both used
    // once before the signal.
    let stream = TcpStream::connect(keel.listen).await.expect("connect");
    let (mut h1, h1_conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("h1");
    let h1_conn = tokio::spawn(h1_conn);
    let get_req = |path: &str| {
        Request::get(path)
            .header(header::HOST, "keel.test")
            .body(empty())
            .expect("request")
    };
    let r = h1
        .send_request(get_req("/before"))
        .await
        .expect("h1 request");
    assert_eq!(r.status(), StatusCode::OK);
    r.into_body().collect().await.expect("body");

    let stream = TcpStream::connect(keel.listen).await.expect("connect");
    let (mut h2, h2_conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2");
    let h2_conn = tokio::spawn(h2_conn);
    let r = h2
        .send_request(
            Request::get(format!("http://{}/h2", keel.listen))
                .body(empty())
                .expect("request"),
        )
        .await
        .expect("h2 request");
    assert_eq!(r.status(), StatusCode::OK);

    // A slow request in flight across the whole shutdown delay and the
    // listener's close.
    let listen = keel.listen;
    let slow = tokio::spawn(async move { get(listen, "/slow/2500").await });
    tokio::time::sleep(Duration::from_millis(200)).await;

    let signalled = Instant::now();
    sigterm(&keel);

    // 1. Readiness fails at once.
    let mut not_ready = None;
    for _ in 0..100 {
        let (status, _, _) = get(keel.admin, "/readyz").await.expect("readyz");
        if status == StatusCode::SERVICE_UNAVAILABLE {
            not_ready = Some(signalled.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let not_ready = not_ready.expect("readiness never failed");
    assert!(not_ready < Duration::from_millis(500), "{not_ready:?}");

    // 2. Traffic is still served during the shutdown delay, on the kept-alive
    // connection and on new ones.
    let r = h1
        .send_request(get_req("/during"))
        .await
        .expect("served during the delay");
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers().get(header::CONNECTION).is_none());
    r.into_body().collect().await.expect("body");
    let (status, _, _) = get(keel.listen, "/new").await.expect("new connection");
    assert_eq!(status, StatusCode::OK);
    assert!(signalled.elapsed() < delay, "the checks took too long");

    // 3. After the delay the idle HTTP/1 and HTTP/2 connections are closed
    // (GOAWAY for HTTP/2), the slow request still completes.
    let h1_end = tokio::time::timeout(Duration::from_secs(5), h1_conn).await;
    assert!(h1_end.is_ok(), "idle HTTP/1 connection not closed");
    assert!(signalled.elapsed() >= delay);
    // The listener is closed: new connections are refused at once.
    assert!(
        TcpStream::connect(keel.listen).await.is_err(),
        "still accepting"
    );
    let h2_end = tokio::time::timeout(Duration::from_secs(5), h2_conn).await;
    assert!(h2_end.is_ok(), "HTTP/2 connection not closed by GOAWAY");
    let (status, _, body) = slow.await.expect("join").expect("slow request completes");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, Bytes::from_static(b"slow done"));

    // 4. Every WebSocket client got 1012 with a reconnect hint, paced.
    let mut closes = Vec::with_capacity(n);
    for client in clients {
        closes.push(client.await.expect("client"));
    }
    let mut hints = Vec::new();
    for c in &closes {
        assert_eq!(c.code, Some(u16::from(CloseCode::Restart)), "{c:?}");
        let hint = keel_drain::parse_reconnect_hint(&c.reason).expect("hint in the reason");
        assert!(hint < Duration::from_secs(5));
        hints.push(hint);
    }
    hints.sort();
    hints.dedup();
    assert!(
        hints.len() > n / 4,
        "hints are spread: {} distinct",
        hints.len()
    );
    let mut at: Vec<Duration> = closes.iter().map(|c| c.at - signalled).collect();
    at.sort();
    // Batch k starts at delay + k * interval; no client hears early.
    for (i, t) in at.iter().enumerate() {
        let batch_start = delay + interval * (i / batch) as u32;
        assert!(
            *t + Duration::from_millis(30) >= batch_start,
            "close {i} at {t:?}, before its batch at {batch_start:?}"
        );
    }
    let planned_end = delay + interval * ((n - 1) / batch) as u32;
    let last = *at.last().expect("closes");
    assert!(
        last >= planned_end && last < planned_end + Duration::from_secs(3),
        "last close at {last:?}, plan {planned_end:?}"
    );

    // 5. The process exits 0, well before the deadline.
    let (status, exited) = wait_exit(&mut keel, deadline).await;
    assert!(status.success(), "{status}");
    assert!(exited - signalled < deadline, "{:?}", exited - signalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_longer_than_the_deadline_still_closes_every_client_with_1012() {
    // Gradually over 60 s, but only 3 s from the signal: the drain cannot
    // keep its pace, and the clients it has not reached must still hear
    // 1012 with a hint (a close grace before the deadline), not a bare cut.
    let upstream = TestUpstream::start().await;
    let mut keel = keel_draining(
        upstream.addr,
        "shutdown_delay = \"100ms\"\nstrategy = \"gradual\"\ngradual_over = \"60s\"\n\
         deadline = \"3s\"\njitter = false\nreconnect_window = \"5s\"\n",
    )
    .await;
    let n = clients_allowed(50);
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        clients.push(ws_client(keel.listen).await);
    }
    let signalled = Instant::now();
    sigterm(&keel);
    let mut early = 0;
    for client in clients {
        let closed = client.await.expect("client");
        assert_eq!(
            closed.code,
            Some(u16::from(CloseCode::Restart)),
            "a close frame, not a cut: {closed:?}"
        );
        assert!(
            keel_drain::parse_reconnect_hint(&closed.reason).is_some(),
            "{closed:?}"
        );
        // Heard before the cut at 3 s (with room for a loaded machine).
        assert!(closed.at - signalled < Duration::from_secs(4), "{closed:?}");
        if closed.at - signalled < Duration::from_millis(2500) {
            early += 1;
        }
    }
    // At 60 s for all of them, the pace reaches only the first few before
    // the grace; the rest hear together, 2.7 s after the signal.
    assert!(early < n / 2, "{early} of {n} closed on the pace");
    let (status, exited) = wait_exit(&mut keel, Duration::from_secs(10)).await;
    assert!(status.success(), "{status}");
    assert!(exited - signalled < Duration::from_secs(5));
}

/// A raw WebSocket client that never answers the close frame.
async fn stubborn_client(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: keel.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .await
        .expect("write");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        stream.read_exact(&mut b).await.expect("response head");
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_ignoring_the_close_is_cut_at_the_deadline() {
    let upstream = TestUpstream::start().await;
    let mut keel = keel_draining(
        upstream.addr,
        "shutdown_delay = \"200ms\"\ndeadline = \"2s\"\njitter = false\n",
    )
    .await;
    // Without jitter the one tunnel is asked to close as soon as the drain
    // begins (with it, anywhere in the 2 s batch interval up to a close
    // grace before the deadline: too late for this test's "heard before
    // 2 s" check).
    let mut stream = stubborn_client(keel.listen).await;
    let signalled = Instant::now();
    sigterm(&keel);
    // The close frame arrives (1012, with the hint), then the FIN after it.
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        let n = stream.read(&mut buf).await.expect("read");
        got.extend_from_slice(&buf[..n]);
        if n == 0 {
            break;
        }
    }
    let heard = signalled.elapsed();
    assert_eq!(got[0], 0x88, "a close frame: {got:?}");
    assert_eq!(u16::from_be_bytes([got[2], got[3]]), 1012);
    let reason = String::from_utf8_lossy(&got[4..usize::from(got[1]) + 2]).into_owned();
    assert!(
        keel_drain::parse_reconnect_hint(&reason).is_some(),
        "{reason}"
    );
    assert!(heard < Duration::from_secs(2), "{heard:?}");
    // Still connected in the other direction: we may write, nobody answers,
    // until the deadline cuts the connection.
    let cut = loop {
        if stream.write_all(b"\x81\x80\0\0\0\0").await.is_err() {
            break signalled.elapsed();
        }
        let (status, exited) = match keel.child.try_wait().expect("try_wait") {
            Some(status) => (status, signalled.elapsed()),
            None => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        assert!(status.success(), "{status}");
        break exited;
    };
    assert!(
        cut >= Duration::from_millis(1900),
        "cut at {cut:?}, before the deadline"
    );
    let (status, exited) = wait_exit(&mut keel, Duration::from_secs(10)).await;
    assert!(status.success(), "{status}");
    assert!(exited - signalled < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_drain_moves_tunnels_to_the_other_endpoint() {
    let blue = TestUpstream::start().await;
    let green = TestUpstream::start().await;
    let blue_url = format!("http://{}", blue.addr);
    let keel = Keel::start(
        "",
        &format!(
            "[upstreams.app]\nendpoints = [\"{blue_url}\", \"http://{}\"]\nload_balancing = \"round_robin\"\n\n[[routes]]\npath_prefix = \"/\"\nupstream = \"app\"\n\n\
             [drain]\nbatch_size = 5\nbatch_interval = \"100ms\"\nreconnect_window = \"300ms\"\n",
            green.addr
        ),
    )
    .await;
    let n = 40;
    let mut clients = Vec::new();
    for _ in 0..n {
        clients.push(ws_client(keel.listen).await);
    }
    let on_blue = blue.connections();
    assert!(on_blue == n / 2, "round robin: {on_blue} on blue");

    let out = keel_drain_cli(keel.admin, &["--upstream", "app", "--endpoint", &blue_url]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("drain done"), "{stdout}");
    assert!(
        stdout.contains(&format!("closed {on_blue}/{on_blue}")),
        "{stdout}"
    );

    // The blue tunnels were closed with 1012 and a hint; the green ones stay.
    let mut closed = 0;
    let mut open = Vec::new();
    for client in clients {
        if client.is_finished() {
            let c = client.await.expect("client");
            assert_eq!(c.code, Some(1012));
            assert!(
                keel_drain::parse_reconnect_hint(&c.reason).expect("hint")
                    < Duration::from_millis(300)
            );
            closed += 1;
        } else {
            open.push(client);
        }
    }
    assert_eq!(closed, on_blue);
    // The clients reconnect through the gateway, which stays up: all land
    // on green.
    let green_before = green.connections();
    for _ in 0..closed {
        open.push(ws_client(keel.listen).await);
    }
    let (status, _, _) = get(keel.listen, "/after").await.expect("gateway up");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        blue.connections(),
        on_blue,
        "nothing new on the drained endpoint"
    );
    assert_eq!(green.connections(), green_before + closed + 1);
    let (_, _, report) = get(keel.admin, "/drain").await.expect("GET /drain");
    let report: serde_json::Value = serde_json::from_slice(&report).expect("json");
    assert_eq!(report["phase"], "serving");
    assert_eq!(report["endpoints"][0]["draining"], true);
    assert_eq!(report["endpoints"][0]["progress"]["done"], true);

    // Green is now the only endpoint in service: draining it is refused.
    let green_url = format!("http://{}", green.addr);
    let refused =
        keel_drain_cli(keel.admin, &["--upstream", "app", "--endpoint", &green_url]).await;
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("last endpoint"));

    // Resumed, blue takes new connections again.
    let resumed = keel_drain_cli(
        keel.admin,
        &["--upstream", "app", "--endpoint", &blue_url, "--resume"],
    )
    .await;
    assert!(resumed.status.success());
    for _ in 0..4 {
        let (status, _, _) = get(keel.listen, "/again").await.expect("request");
        assert_eq!(status, StatusCode::OK);
    }
    assert!(blue.connections() > on_blue, "blue is back in service");
    drop(open);
}

/// Runs `keel drain --admin ADDR ARGS...` (its output is not a terminal,
/// so progress comes as plain lines).
async fn keel_drain_cli(admin: SocketAddr, args: &[&str]) -> std::process::Output {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_keel"))
            .args(["drain", "--admin", &admin.to_string()])
            .args(&args)
            .output()
            .expect("keel drain")
    })
    .await
    .expect("join")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keel_drain_on_the_admin_api_drains_the_gateway_and_it_exits_zero() {
    let upstream = TestUpstream::start().await;
    let mut keel = keel_draining(
        upstream.addr,
        "shutdown_delay = \"300ms\"\nstrategy = \"percent\"\npercent = 25.0\n\
         batch_interval = \"100ms\"\ndeadline = \"10s\"\nreconnect_window = \"1s\"\n",
    )
    .await;
    let mut clients = Vec::new();
    for _ in 0..60 {
        clients.push(ws_client(keel.listen).await);
    }
    let (_, _, before) = get(keel.admin, "/drain").await.expect("GET /drain");
    let before: serde_json::Value = serde_json::from_slice(&before).expect("json");
    assert_eq!(before["phase"], "serving");
    assert!(before["tunnels"].is_null());

    let cli = tokio::spawn(keel_drain_cli(keel.admin, &[]));
    // The admin API answers through the drain and shows where it is.
    let mut phases = Vec::new();
    for _ in 0..200 {
        match get(keel.admin, "/drain").await {
            Ok((StatusCode::OK, _, body)) => {
                let report: serde_json::Value = serde_json::from_slice(&body).expect("json");
                let phase = report["phase"].as_str().expect("phase").to_owned();
                if phase == "draining" || phase == "done" {
                    assert_eq!(report["tunnels"]["total"], 60, "{report}");
                }
                if phases.last() != Some(&phase) {
                    phases.push(phase);
                }
            }
            _ => break,
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(phases.iter().any(|p| p == "shutdown_delay"), "{phases:?}");
    assert!(
        phases.iter().any(|p| p == "draining" || p == "done"),
        "{phases:?}"
    );
    let out = cli.await.expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("drain done"), "{stdout}");
    for client in clients {
        let c = client.await.expect("client");
        assert_eq!(c.code, Some(1012));
        assert!(
            keel_drain::parse_reconnect_hint(&c.reason).expect("hint") < Duration::from_secs(1)
        );
    }
    let (status, _) = wait_exit(&mut keel, Duration::from_secs(10)).await;
    assert!(status.success(), "{status}");
    // A second `keel drain` finds nobody to talk to: exit 1 with the reason.
    let out = keel_drain_cli(keel.admin, &[]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach"));
}
