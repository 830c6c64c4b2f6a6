//! A loopback TCP proxy the Redis and PostgreSQL tests put between a store
//! and the real server, to make the server "disappear" (connections cut,
//! or silently black-holed) without disturbing anyone else using it, and
//! to count PostgreSQL round trips on the wire.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does with traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forward both ways.
    Up,
    /// Cut every connection and close new ones at once: a dead server.
    Down,
    /// Accept, then never forward a byte: a hung server or a lost network.
    Blackhole,
}

/// A running proxy; stops when dropped.
pub struct Proxy {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    ready_for_query: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        let _ = self.mode.send(Mode::Down);
    }
}

impl Proxy {
    /// Starts a proxy on an ephemeral loopback port forwarding to `upstream`
    /// (`host:port`).
    pub async fn start(upstream: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let (mode, _) = watch::channel(Mode::Up);
        let ready_for_query = Arc::new(AtomicU64::new(0));
        let upstream = upstream.to_owned();
        let (tx, rfq) = (mode.clone(), ready_for_query.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let mode = tx.subscribe();
                tokio::spawn(serve(client, upstream.clone(), mode, rfq.clone()));
            }
        });
        Self {
            addr,
            mode,
            ready_for_query,
            task,
        }
    }

    /// The proxy's `127.0.0.1:port`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Switches every current and future connection to `mode`.
    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    /// PostgreSQL ReadyForQuery messages ('Z') seen from the server so far:
    /// one per client round trip (each Sync or simple Query ends in one).
    pub fn round_trips(&self) -> u64 {
        self.ready_for_query.load(Ordering::SeqCst)
    }
}

async fn serve(
    mut client: TcpStream,
    upstream: String,
    mut mode: watch::Receiver<Mode>,
    rfq: Arc<AtomicU64>,
) {
    let current = *mode.borrow_and_update();
    match current {
        Mode::Down => return,
        Mode::Blackhole => {
            // Hold the socket, forward nothing, until the mode changes.
            let _ = mode.changed().await;
            return;
        }
        Mode::Up => {}
    }
    let Ok(mut server) = TcpStream::connect(&upstream).await else {
        return;
    };
    let (mut cr, mut cw) = client.split();
    let (mut sr, mut sw) = server.split();
    let mut counter = PgCounter::default();
    let mut cbuf = vec![0u8; 64 * 1024];
    let mut sbuf = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            changed = mode.changed() => {
                if changed.is_err() || *mode.borrow() != Mode::Up {
                    // Black-holed connections hang until the next change.
                    if *mode.borrow() == Mode::Blackhole {
                        let _ = mode.changed().await;
                    }
                    return;
                }
            }
            n = cr.read(&mut cbuf) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => if sw.write_all(&cbuf[..n]).await.is_err() { return },
            },
            n = sr.read(&mut sbuf) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let z = counter.feed(&sbuf[..n]);
                    rfq.fetch_add(z, Ordering::SeqCst);
                    if cw.write_all(&sbuf[..n]).await.is_err() { return }
                }
            },
        }
    }
}

/// Splits the server-to-client PostgreSQL stream into messages (a type
/// byte, then a big-endian length that counts itself) and counts 'Z'.
/// Assumes no SSL negotiation (tests connect with `sslmode=disable`).
#[derive(Default)]
struct PgCounter {
    header: Vec<u8>,
    skip: usize,
}

impl PgCounter {
    fn feed(&mut self, mut bytes: &[u8]) -> u64 {
        let mut z = 0;
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            let need = 5 - self.header.len();
            let n = need.min(bytes.len());
            self.header.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.header.len() == 5 {
                if self.header[0] == b'Z' {
                    z += 1;
                }
                let len = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]) as usize;
                self.skip = len.saturating_sub(4);
                self.header.clear();
            }
        }
        z
    }
}

/// The `host[:port]` part of a `redis://` or `postgres://` URL, as written.
pub fn authority_host(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    authority.rsplit_once('@').map_or(authority, |(_, hp)| hp)
}

/// `host:port` of `url`, with `default_port` when it names none.
pub fn host_port(url: &str, default_port: u16) -> String {
    let hp = authority_host(url);
    if hp
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        hp.to_owned()
    } else {
        format!("{hp}:{default_port}")
    }
}

/// `url` with its `host[:port]` replaced by `addr`.
pub fn redirect(url: &str, addr: SocketAddr) -> String {
    let scheme_end = url.find("://").map_or(0, |i| i + 3);
    let hp = authority_host(url);
    let at = url[scheme_end..]
        .find(hp)
        .map_or(scheme_end, |i| scheme_end + i);
    format!("{}{}{}", &url[..at], addr, &url[at + hp.len()..])
}

#[test]
fn pg_counter_counts_split_messages() {
    let mut c = PgCounter::default();
    // 'C' CommandComplete "x\0" (len 6), then 'Z' ReadyForQuery 'I' (len 5).
    let stream = [b'C', 0, 0, 0, 6, b'x', 0, b'Z', 0, 0, 0, 5, b'I'];
    assert_eq!(c.feed(&stream), 1);
    let mut c = PgCounter::default();
    let total: u64 = stream.iter().map(|b| c.feed(std::slice::from_ref(b))).sum();
    assert_eq!(total, 1);
}

#[test]
fn redirect_replaces_only_the_host() {
    let addr: SocketAddr = "127.0.0.1:9".parse().expect("addr");
    assert_eq!(
        redirect("postgres://postgres@localhost/test", addr),
        "postgres://postgres@127.0.0.1:9/test"
    );
    assert_eq!(
        redirect("redis://127.0.0.1:6379/", addr),
        "redis://127.0.0.1:9/"
    );
}
