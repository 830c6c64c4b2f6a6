//! `keel demo` works as its printed walkthrough says.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{full, get, request};
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode, header};
use tokio_tungstenite::tungstenite::Message;

struct Demo(std::process::Child);

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn demo_serves_the_sample_api_through_the_gateway() {
    let listen = common::free_addr();
    let admin = common::free_addr();
    let mut demo = Demo(
        Command::new(env!("CARGO_BIN_EXE_keel"))
            .args([
                "demo",
                "--listen",
                &listen.to_string(),
                "--admin",
                &admin.to_string(),
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn keel demo"),
    );
    let mut healthy = false;
    for _ in 0..400 {
        assert!(
            demo.0.try_wait().expect("try_wait").is_none(),
            "demo exited"
        );
        if let Ok((StatusCode::OK, _, _)) = get(admin, "/healthz").await {
            healthy = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(healthy, "demo did not start");

    let (status, _, body) = request(
        listen,
        Request::post("/orders")
            .header(header::HOST, "demo")
            .header(header::CONTENT_TYPE, "application/json")
            .body(full(r#"{"sku":"42"}"#))
            .expect("request"),
    )
    .await
    .expect("create order");
    assert_eq!(status, StatusCode::CREATED);
    let order: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(order["executions"], 1);
    let id = order["id"].as_u64().expect("id");

    let (status, _, body) = get(listen, &format!("/orders/{id}"))
        .await
        .expect("get order");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&body).expect("json")["id"],
        id
    );

    let (status, _, _) = get(listen, "/slow").await.expect("slow");
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);

    let first = get(listen, "/flaky").await.expect("flaky").0;
    let second = get(listen, "/flaky").await.expect("flaky").0;
    // Every other call fails upstream with 503; GET is safe to repeat, so
    // the gateway retries it (docs/gateway-resilience.md) and both succeed.
    assert_eq!([first, second], [StatusCode::OK, StatusCode::OK]);

    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{listen}/ws"))
        .await
        .expect("websocket through the demo");
    ws.send(Message::text("ping through keel"))
        .await
        .expect("send");
    let back = ws.next().await.expect("frame").expect("ok");
    assert_eq!(
        back.into_text().expect("text").as_str(),
        "ping through keel"
    );
    let big = vec![3u8; 100_000];
    ws.send(Message::binary(big.clone())).await.expect("send");
    assert_eq!(
        ws.next()
            .await
            .expect("frame")
            .expect("ok")
            .into_data()
            .as_ref(),
        big.as_slice()
    );
    ws.close(None).await.expect("close");
}
