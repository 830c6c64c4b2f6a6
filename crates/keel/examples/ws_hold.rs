//! Opens N WebSocket connections through a proxy and holds them idle, for
//! the idle-tunnel memory figure in `benches/proxy/run.sh`.
//!
//! Usage: `ws_hold ADDR N HOLD_SECONDS [WAVE]` (WAVE connections opened
//! concurrently, 250 by default); prints `ready N` once every
//! connection has its `101`, then holds them for HOLD_SECONDS.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const UPGRADE: &[u8] = b"GET /ws HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

async fn open(addr: String) -> std::io::Result<TcpStream> {
    let mut stream = TcpStream::connect(&addr).await?;
    stream.write_all(UPGRADE).await?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || head.len() > 8192 {
            return Err(std::io::Error::other("closed before the 101"));
        }
        head.extend_from_slice(&buf[..n]);
    }
    if !head.starts_with(b"HTTP/1.1 101") {
        return Err(std::io::Error::other(format!(
            "expected 101, got {:?}",
            String::from_utf8_lossy(&head[..head.len().min(40)])
        )));
    }
    Ok(stream)
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:18082".to_owned());
    let count: usize = args.next().and_then(|n| n.parse().ok()).unwrap_or(10_000);
    let hold: u64 = args.next().and_then(|n| n.parse().ok()).unwrap_or(30);
    let wave_size: usize = args
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(250)
        .max(1);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let mut streams = Vec::with_capacity(count);
        // Open in waves so the listen backlog is never overrun.
        while streams.len() < count {
            let wave = (count - streams.len()).min(wave_size);
            let mut tasks = Vec::with_capacity(wave);
            for _ in 0..wave {
                tasks.push(tokio::spawn(open(addr.clone())));
            }
            for task in tasks {
                streams.push(task.await.map_err(std::io::Error::other)??);
            }
        }
        println!("ready {}", streams.len());
        tokio::time::sleep(Duration::from_secs(hold)).await;
        drop(streams);
        Ok(())
    })
}
