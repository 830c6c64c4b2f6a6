//! The helper against a real WebSocket server that drains like keel: it
//! closes with 1012 and a hint, and the client comes back after the hint.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use keel_reconnect::Reconnect;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

#[tokio::test]
async fn reconnects_after_the_servers_hint() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(async move {
        let mut accepted = Vec::new();
        for i in 0..2 {
            let (stream, _) = listener.accept().await.expect("accept");
            accepted.push(Instant::now());
            let mut ws = tokio_tungstenite::accept_async(stream)
                .await
                .expect("handshake");
            if i == 0 {
                ws.send(Message::Close(Some(CloseFrame {
                    code: CloseCode::Restart,
                    reason: "keel drain; reconnect_after_ms=400".into(),
                })))
                .await
                .expect("close");
                while let Some(Ok(_)) = ws.next().await {}
            } else {
                ws.send(Message::text("welcome back")).await.expect("send");
                while let Some(Ok(_)) = ws.next().await {}
            }
        }
        accepted
    });
    let url = format!("ws://{addr}/");
    let mut reconnect = Reconnect::new().seed(5);
    let mut ws = reconnect
        .connect(&url, Duration::ZERO)
        .await
        .expect("connect");
    let mut close = None;
    while let Some(Ok(message)) = ws.next().await {
        if let Message::Close(frame) = message {
            close = frame;
        }
    }
    let close = close.expect("a close frame");
    assert_eq!(u16::from(close.code), 1012);
    let wait = reconnect.after_close(Some(&close));
    assert!(wait >= Duration::from_millis(400), "{wait:?}");
    let closed_at = Instant::now();
    let mut ws = reconnect.connect(&url, wait).await.expect("reconnect");
    assert!(closed_at.elapsed() >= Duration::from_millis(400));
    let message = ws.next().await.expect("message").expect("ok");
    assert_eq!(message, Message::text("welcome back"));
    drop(ws);
    let accepted = server.await.expect("server");
    assert!(accepted[1] - accepted[0] >= Duration::from_millis(400));
}
