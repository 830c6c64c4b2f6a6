//! The service end to end over real HTTP/1.1 on 127.0.0.1: each test
//! starts the app on an ephemeral port and talks to it with a minimal
//! client on a plain TCP stream (no client crate).

use std::net::SocketAddr;

use keel_example_axum_payments::outbound::{Outbound, Provider, Reachability};
use keel_example_axum_payments::{Sessions, app};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A running service and its provider.
struct Service {
    addr: SocketAddr,
    provider: Provider,
    outbound: Outbound,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Service {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn start() -> Service {
    let provider = Provider::new();
    let outbound = Outbound::new(provider.clone());
    let sessions = Sessions::new([("s-alice", "alice"), ("s-bob", "bob")]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    let router = app(sessions, outbound.clone());
    let server = tokio::spawn(async move {
        axum::serve(listener, router).await.expect("serve");
    });
    Service {
        addr,
        provider,
        outbound,
        server,
    }
}

/// One parsed response.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn replayed(&self) -> bool {
        self.header("idempotent-replayed") == Some("true")
    }

    fn problem_type(&self) -> String {
        let v: serde_json::Value = serde_json::from_str(&self.body).expect("problem+json");
        v["type"].as_str().expect("type").to_owned()
    }
}

/// `POST /payments` with `headers`, on a fresh connection.
async fn post(addr: SocketAddr, headers: &[(&str, &str)], body: &str) -> Reply {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut request = format!("POST /payments HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str(&format!("content-length: {}\r\n\r\n{body}", body.len()));
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send request");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.expect("read response");
    let raw = String::from_utf8(raw).expect("utf-8 response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a response head");
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    // Every response here has a known length (buffered, replayed or a
    // fixed string), so hyper sends Content-Length, never chunks.
    let length: usize = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .expect("content-length");
    assert_eq!(body.len(), length, "the whole body arrived");
    Reply {
        status,
        headers,
        body: body.to_owned(),
    }
}

const BODY: &str = r#"{"amount":500,"currency":"EUR"}"#;

#[tokio::test]
async fn two_users_with_the_same_key_and_body_each_get_their_own_payment() {
    let service = start().await;
    let alice = [("cookie", "session=s-alice"), ("idempotency-key", "p-1")];
    let bob = [
        ("cookie", "theme=dark; session=s-bob"),
        ("idempotency-key", "p-1"),
    ];

    let a = post(service.addr, &alice, BODY).await;
    assert_eq!(a.status, 201, "{a:?}");
    assert!(!a.replayed());
    assert!(a.body.contains("\"user\":\"alice\""), "{a:?}");

    // Same key, same body, another user: executed for bob, not alice's replay.
    let b = post(service.addr, &bob, BODY).await;
    assert_eq!(b.status, 201, "{b:?}");
    assert!(!b.replayed(), "bob must not get alice's stored response");
    assert!(b.body.contains("\"user\":\"bob\""), "{b:?}");
    assert_ne!(a.body, b.body);
    assert_eq!(service.provider.charges(), 2);

    // Each one's retry replays their own payment and charges nobody.
    let a2 = post(service.addr, &alice, BODY).await;
    assert!(a2.replayed());
    assert_eq!(a2.body, a.body);
    let b2 = post(service.addr, &bob, BODY).await;
    assert!(b2.replayed());
    assert_eq!(b2.body, b.body);
    assert_eq!(service.provider.charges(), 2);
}

#[tokio::test]
async fn a_keyed_request_without_a_session_gets_the_tenant_problem() {
    let service = start().await;
    for headers in [
        vec![("idempotency-key", "p-anon")],
        vec![
            ("cookie", "session=s-unknown"),
            ("idempotency-key", "p-anon"),
        ],
    ] {
        let r = post(service.addr, &headers, BODY).await;
        assert_eq!(r.status, 400, "{r:?}");
        assert_eq!(r.header("content-type"), Some("application/problem+json"));
        assert_eq!(
            r.problem_type(),
            "urn:keel:problem:idempotency-tenant-missing"
        );
    }
    assert_eq!(service.provider.charges(), 0);
    // The key was never claimed: alice may use it.
    let alice = [("cookie", "session=s-alice"), ("idempotency-key", "p-anon")];
    assert_eq!(post(service.addr, &alice, BODY).await.status, 201);
}

#[tokio::test]
async fn a_payment_that_was_not_sent_releases_the_key_and_the_retry_runs_once() {
    let service = start().await;
    let alice = [("cookie", "session=s-alice"), ("idempotency-key", "p-2")];

    // Every connection to the provider is refused: nothing was charged.
    service.provider.set(Reachability::Refusing);
    let refused = post(service.addr, &alice, BODY).await;
    assert_eq!(refused.status, 503, "{refused:?}");
    assert!(!refused.replayed());
    assert_eq!(service.provider.charges(), 0);

    // The breaker refuses the call outright: not sent either.
    service.provider.set(Reachability::Up);
    service.outbound.breaker().force_open(None);
    let open = post(service.addr, &alice, BODY).await;
    assert_eq!(open.status, 503, "{open:?}");
    assert!(!open.replayed(), "a not-executed answer is never stored");
    assert_eq!(service.provider.charges(), 0);

    // The provider is back: the same key runs, once, and is then replayed.
    service.outbound.breaker().enable();
    let paid = post(service.addr, &alice, BODY).await;
    assert_eq!(paid.status, 201, "{paid:?}");
    assert!(!paid.replayed());
    let again = post(service.addr, &alice, BODY).await;
    assert_eq!(again.status, 201);
    assert!(again.replayed());
    assert_eq!(again.body, paid.body);
    assert_eq!(service.provider.charges(), 1);
}

#[tokio::test]
async fn a_payment_whose_answer_was_lost_is_never_run_again() {
    let service = start().await;
    let bob = [("cookie", "session=s-bob"), ("idempotency-key", "p-3")];
    // The provider charges but its answer never arrives.
    service.provider.set(Reachability::LosesAnswers);
    let lost = post(service.addr, &bob, BODY).await;
    assert_eq!(lost.status, 502, "{lost:?}");
    assert_eq!(service.provider.charges(), 1);
    // Even with the provider healthy again, the retry replays the 502
    // instead of charging a second time.
    service.provider.set(Reachability::Up);
    let retry = post(service.addr, &bob, BODY).await;
    assert_eq!(retry.status, 502);
    assert!(retry.replayed());
    assert_eq!(service.provider.charges(), 1);
}
