//! An axum service made idempotent with `IdempotencyLayer`.
//!
//! ```text
//! cargo run -p keel-idempotency --example axum_service            # listens on 127.0.0.1:3000
//! curl -si -X POST localhost:3000/orders -H 'Authorization: Bearer alice' -H 'Idempotency-Key: o-1' -d '{"sku":"A1"}'
//! curl -si -X POST localhost:3000/orders -H 'Authorization: Bearer alice' -H 'Idempotency-Key: o-1' -d '{"sku":"A1"}'   # replay
//! curl -si -X POST localhost:3000/orders -H 'Authorization: Bearer alice' -H 'Idempotency-Key: o-1' -d '{"sku":"B2"}'   # 422
//! curl -si -X POST localhost:3000/orders -H 'Idempotency-Key: o-1' -d '{"sku":"A1"}'   # 400: no caller to scope the key to
//! ```
//!
//! Keys are scoped to the caller (the `Authorization` value, by default),
//! so a keyed request without one is refused.
//!
//! With `--self-test` it serves on an ephemeral port, sends those requests
//! itself and exits, which is handy to see the whole flow in one command.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use keel_idempotency::{Engine, IdempotencyLayer, MemoryStore, Policy};

#[derive(Clone, Default)]
struct Orders {
    next: Arc<AtomicU64>,
}

async fn create_order(
    State(orders): State<Orders>,
    body: String,
) -> (StatusCode, [(&'static str, String); 2], String) {
    let id = orders.next.fetch_add(1, Ordering::SeqCst) + 1;
    println!("  handler ran: order {id} for {body}");
    (
        StatusCode::CREATED,
        [
            ("content-type", "application/json".into()),
            ("location", format!("/orders/{id}")),
        ],
        format!("{{\"id\":{id}}}"),
    )
}

fn app() -> Router {
    let engine = Engine::new(
        Arc::new(MemoryStore::new()),
        Policy::default()
            .with_required(true)
            .with_lease_for_timeout(Duration::from_secs(10)),
    );
    Router::new()
        .route("/orders", post(create_order))
        .with_state(Orders::default())
        .layer(IdempotencyLayer::new(engine))
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let self_test = std::env::args().any(|a| a == "--self-test");
    let addr = if self_test {
        "127.0.0.1:0"
    } else {
        "127.0.0.1:3000"
    };
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    println!("listening on http://{local}");
    let server = tokio::spawn(async move { axum::serve(listener, app()).await });
    if !self_test {
        return server.await.map_err(std::io::Error::other)?;
    }
    for (key, body) in [
        ("o-1", "{\"sku\":\"A1\"}"),
        ("o-1", "{\"sku\":\"A1\"}"),
        ("o-1", "{\"sku\":\"B2\"}"),
    ] {
        let response = raw_post(local, key, body).await?;
        println!(
            "POST /orders key={key} body={body}\n{}\n",
            response.trim_end()
        );
    }
    server.abort();
    Ok(())
}

/// A minimal HTTP/1.1 client, so the example needs no client crate.
async fn raw_post(addr: std::net::SocketAddr, key: &str, body: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!(
        "POST /orders HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer alice\r\nidempotency-key: {key}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut out = String::new();
    stream.read_to_string(&mut out).await?;
    Ok(out)
}
