//! Tunnels for upgraded connections (WebSocket and other `Upgrade`s).
//!
//! The gateway is meant to hold very many idle tunnels, so an idle tunnel
//! holds no copy buffer: each direction waits for readability with no
//! buffer alive, then reads into a per-thread scratch buffer and writes
//! straight out without awaiting. Only when the destination cannot take
//! everything at once is the remainder copied to the heap, and freed as
//! soon as it is written.

use std::cell::RefCell;
use std::io;
use std::task::{Context, Waker};

use bytes::Bytes;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use crate::upstream::CountedIo;

const SCRATCH_SIZE: usize = 16 * 1024;

thread_local! {
    // One scratch buffer per worker thread, borrowed only between a
    // readiness wake-up and the end of the non-blocking write.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH_SIZE].into_boxed_slice());
}

/// Waits for both sides to finish upgrading, then copies bytes both ways
/// until both sides have closed.
pub async fn splice(downstream: OnUpgrade, upstream: OnUpgrade) {
    let (down, up) = match tokio::try_join!(downstream, upstream) {
        Ok(both) => both,
        Err(error) => {
            tracing::debug!(%error, "upgrade failed");
            return;
        }
    };
    let down = match down.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => (parts.io.into_inner(), parts.read_buf),
        Err(other) => {
            tracing::debug!("downstream upgrade is not a plain TCP stream; buffered copy");
            return fallback(other, up).await;
        }
    };
    let (up_stream, up_pending, guard) = match up.downcast::<CountedIo>() {
        Ok(parts) => {
            let (stream, guard) = parts.io.into_parts();
            (stream, parts.read_buf, guard)
        }
        Err(_) => {
            tracing::warn!("upstream upgrade is not a TCP stream; closing the tunnel");
            return;
        }
    };
    let up_stream = forget_wakers(up_stream);
    let down = (forget_wakers(down.0), down.1);
    // A task of its own, so the long-lived future holds only the tunnel's
    // state, not the (larger) upgrade futures above.
    tokio::spawn(async move {
        let _guard = guard;
        if let Err(error) = tunnel(down.0, down.1, up_stream, up_pending).await {
            tracing::debug!(%error, "tunnel closed with an error");
        }
    });
}

/// Replaces the wakers the HTTP connection tasks left in the socket's
/// read and write slots with no-op ones. `readable()` waits in a separate
/// list, so without this the finished connection task (a few KiB) would stay
/// allocated, through its waker, for as long as the tunnel is idle.
fn forget_wakers(stream: TcpStream) -> TcpStream {
    let mut cx = Context::from_waker(Waker::noop());
    let _ = stream.poll_read_ready(&mut cx);
    let _ = stream.poll_write_ready(&mut cx);
    stream
}

/// Copies both ways between two sockets; `*_pending` are bytes already read
/// from that side by the HTTP parser.
pub async fn tunnel(
    a: TcpStream,
    a_pending: Bytes,
    b: TcpStream,
    b_pending: Bytes,
) -> io::Result<()> {
    let (a_read, a_write) = a.into_split();
    let (b_read, b_write) = b.into_split();
    tokio::try_join!(
        pump(a_read, b_write, a_pending),
        pump(b_read, a_write, b_pending)
    )?;
    Ok(())
}

enum Step {
    Done,
    Eof,
    Rest(Vec<u8>),
}

/// Copies one direction until end of stream, then half-closes the writer.
async fn pump(src: OwnedReadHalf, mut dst: OwnedWriteHalf, pending: Bytes) -> io::Result<()> {
    if !pending.is_empty() {
        dst.write_all(&pending).await?;
    }
    drop(pending);
    loop {
        src.readable().await?;
        let step = SCRATCH.with_borrow_mut(|scratch| -> io::Result<Step> {
            let n = match src.try_read(scratch) {
                Ok(0) => return Ok(Step::Eof),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Step::Done),
                Err(e) => return Err(e),
            };
            let mut written = 0;
            while written < n {
                match dst.try_write(&scratch[written..n]) {
                    Ok(m) => written += m,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
            Ok(if written == n {
                Step::Done
            } else {
                Step::Rest(scratch[written..n].to_vec())
            })
        })?;
        match step {
            Step::Done => {}
            Step::Rest(rest) => dst.write_all(&rest).await?,
            Step::Eof => {
                // Half-close: the other direction may still be talking.
                dst.shutdown().await.ok();
                return Ok(());
            }
        }
    }
}

/// For upgraded connections that are not plain TCP (none today): a
/// buffered copy, correct but without the idle-memory property.
async fn fallback(down: Upgraded, up: Upgraded) {
    let mut down = TokioIo::new(down);
    let mut up = TokioIo::new(up);
    if let Err(error) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
        tracing::debug!(%error, "tunnel closed with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.expect("connect"), server.expect("accept").0)
    }

    #[tokio::test]
    async fn copies_both_ways_with_pending_bytes_and_half_close() {
        let (mut client, proxy_a) = pair().await;
        let (proxy_b, mut server) = pair().await;
        let task = tokio::spawn(tunnel(
            proxy_a,
            Bytes::from_static(b"early-"),
            proxy_b,
            Bytes::from_static(b"hello-"),
        ));
        let big = vec![7u8; 1 << 20];
        client.write_all(&big).await.expect("write");
        client.shutdown().await.expect("shutdown");
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.expect("read");
        assert_eq!(&got[..6], b"early-");
        assert_eq!(got.len(), 6 + big.len());
        server.write_all(b"world").await.expect("write");
        drop(server);
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.expect("read");
        assert_eq!(back, b"hello-world");
        task.await.expect("join").expect("tunnel");
    }
}
