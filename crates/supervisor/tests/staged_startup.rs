//! The staged-startup example, driven over real sockets: health first,
//! readiness following a Redis that comes, goes and comes back.

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/staged_startup.rs"]
mod staged;

use std::net::SocketAddr;
use std::time::Duration;

use keel_supervisor::RestartBackoff;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr)
        .await
        .expect("connect to the health server");
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status line");
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
    (status, body)
}

/// Polls `path` until it answers `status`, for at most 10 s.
async fn until_status(addr: SocketAddr, path: &str, status: u16) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (got, body) = get(addr, path).await;
        if got == status {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path} stayed {got}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A stand-in Redis that answers every PING with PONG until aborted.
fn fake_redis(listener: TcpListener) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            conns.spawn(async move {
                let mut buf = [0u8; 64];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(b"+PONG\r\n").await.is_err() {
                        return;
                    }
                }
            });
        }
    })
}

fn settings(redis: String) -> staged::Settings {
    staged::Settings {
        listen: "127.0.0.1:0".into(),
        redis,
        backoff: RestartBackoff::new(Duration::from_millis(10), Duration::from_millis(100)),
        ping_every: Duration::from_millis(20),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_dependency_without_the_process_dying() {
    // A port with nothing behind it yet.
    let redis_addr = {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        l.local_addr().expect("addr")
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind health");
    let addr = listener.local_addr().expect("addr");
    let handle = staged::tree(settings(redis_addr.to_string()), listener)
        .start()
        .await
        .expect("the tree starts although redis is down");

    assert_eq!(get(addr, "/healthz").await.0, 200, "health is up first");
    let body = until_status(addr, "/readyz", 503).await;
    let json: serde_json::Value = serde_json::from_str(&body).expect("json reason");
    assert_eq!(json["ready"], false);
    assert_eq!(json["not_ready"][0]["path"], "staged/redis");
    assert!(
        json["not_ready"][0]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("redis at"),
        "{json}"
    );

    // Redis arrives: ready.
    let server = fake_redis(
        TcpListener::bind(redis_addr)
            .await
            .expect("rebind the redis port"),
    );
    until_status(addr, "/readyz", 200).await;

    // Redis goes away: not ready, but alive, and nothing was restarted.
    server.abort();
    let _ = server.await;
    until_status(addr, "/readyz", 503).await;
    assert_eq!(get(addr, "/healthz").await.0, 200);

    // And back.
    let server = fake_redis(
        TcpListener::bind(redis_addr)
            .await
            .expect("rebind the redis port"),
    );
    until_status(addr, "/readyz", 200).await;
    let status: serde_json::Value =
        serde_json::from_str(&get(addr, "/status").await.1).expect("status json");
    assert_eq!(
        status["children"][1]["restarts"], 0,
        "a dependency outage is not a crash"
    );
    server.abort();
    handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn becomes_ready_against_a_real_redis() {
    let Some(url) = keel_testkit::service_url(keel_testkit::REDIS) else {
        return;
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind health");
    let addr = listener.local_addr().expect("addr");
    let handle = staged::tree(settings(staged::host_port(&url)), listener)
        .start()
        .await
        .expect("start");
    until_status(addr, "/readyz", 200).await;
    handle.shutdown().await;
}
