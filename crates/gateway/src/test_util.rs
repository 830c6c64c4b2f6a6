//! Helpers for tests that run gateways in-process (feature `test-util`): a
//! gateway from TOML text, a small upstream, and a one-request client.
//! Each gateway owns its state, so a test may start several.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

use crate::serve::{Running, start};

/// Starts a gateway from config text (listen on `127.0.0.1:0` to get a
/// free port; `Running::listen` says which). Panics with every config
/// error, as a test wants.
///
/// ```no_run
/// # async fn example() {
/// let gateway = keel_gateway::test_util::start_toml(
///     "[server]\nlisten = \"127.0.0.1:0\"\n",
/// )
/// .await;
/// println!("{}", gateway.listen);
/// gateway.drain_now().await.expect("drained");
/// # }
/// ```
pub async fn start_toml(toml: &str) -> Running {
    let config = match keel_config::parse(Path::new("test.toml"), toml) {
        Ok(config) => config,
        Err(errors) => {
            let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
            panic!("config errors:\n{}", lines.join("\n"));
        }
    };
    start(&config).await.expect("the gateway starts")
}

/// An HTTP/1.1 upstream on a free loopback port that answers every request
/// with `answer`; returns its address. It runs until the test ends.
pub async fn upstream<F, Fut>(answer: F) -> SocketAddr
where
    F: Fn(Request<Bytes>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Bytes>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let answer = answer.clone();
                    async move {
                        let (parts, body) = request.into_parts();
                        let body = body
                            .collect()
                            .await
                            .map(|c| c.to_bytes())
                            .unwrap_or_default();
                        let response = answer(Request::from_parts(parts, body)).await;
                        Ok::<_, Infallible>(response.map(Full::new))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// Sends one request on a new connection and reads the whole answer.
pub async fn send(addr: SocketAddr, request: Request<Bytes>) -> (StatusCode, HeaderMap, Bytes) {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(connection);
    let response = sender
        .send_request(request.map(Full::new))
        .await
        .expect("response");
    let (parts, body) = response.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    (parts.status, parts.headers, body)
}

/// `GET path` with `Host: host`.
pub async fn get(addr: SocketAddr, host: &str, path: &str) -> (StatusCode, HeaderMap, Bytes) {
    let request = Request::get(path)
        .header(http::header::HOST, host)
        .body(Bytes::new())
        .expect("request");
    send(addr, request).await
}
