//! `herd`: measures reconnect storms through a real `keel serve`.
//!
//! It starts WebSocket upstreams in this process ("blue" and "green"), a
//! keel gateway (the binary, as a child process) in front of them, and N
//! WebSocket clients from many 127.0.0.x source addresses (so N can exceed
//! one address's ephemeral ports). Then, per mode:
//!
//! - `hold`: opens N idle tunnels and reports the gateway's RSS before and
//!   after, per tunnel;
//! - `immediate`, `fixed`, `jitter`: opens N tunnels to blue, drains blue
//!   through the admin API (`POST /upstreams/app/endpoints/drain`), and
//!   records, per 100 ms, how many clients reconnect at green until all
//!   are back. `immediate` reconnects at once, `fixed` after
//!   `--fixed-delay-ms`, `jitter` with keel-reconnect's helper (the server's
//!   reconnect hint plus full-jitter backoff). It also reports when the
//!   clients heard their close against the drain plan.
//!
//! Everything is on loopback and every wait is bounded. Run through
//! `benches/herd/run.sh`, which builds keel in release mode and raises
//! `ulimit -n`.
//!
//! ```text
//! cargo run --release -p keel --example herd -- --keel target/release/keel --mode jitter --clients 10000
//! ```

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use keel_reconnect::Reconnect;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

const BUCKET: Duration = Duration::from_millis(100);
const BUCKETS: usize = 3000;

type Error = Box<dyn std::error::Error + Send + Sync>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Hold,
    Immediate,
    Fixed,
    Jitter,
}

#[derive(Debug)]
struct Args {
    keel: PathBuf,
    mode: Mode,
    clients: usize,
    sources: usize,
    upstream_ports: usize,
    batch_size: usize,
    batch_interval_ms: u64,
    strategy: String,
    percent: f64,
    window_ms: u64,
    fixed_delay_ms: u64,
    workers: usize,
    seed: u64,
    in_flight: usize,
    drain_jitter: bool,
    gradual_over_ms: u64,
}

fn args() -> Result<Args, Error> {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let mut map = HashMap::new();
    for pair in raw.chunks(2) {
        let key = pair[0]
            .strip_prefix("--")
            .ok_or("arguments are --key value pairs")?;
        let value = pair.get(1).ok_or("a --key without a value")?;
        map.insert(key.to_owned(), value.clone());
    }
    let get = |k: &str, d: &str| map.get(k).cloned().unwrap_or_else(|| d.to_owned());
    Ok(Args {
        keel: PathBuf::from(get("keel", "target/release/keel")),
        mode: match get("mode", "jitter").as_str() {
            "hold" => Mode::Hold,
            "immediate" => Mode::Immediate,
            "fixed" => Mode::Fixed,
            "jitter" => Mode::Jitter,
            other => return Err(format!("unknown mode {other}").into()),
        },
        clients: get("clients", "10000").parse()?,
        sources: get("sources", "50").parse()?,
        upstream_ports: get("upstream-ports", "1").parse()?,
        batch_size: get("batch-size", "2500").parse()?,
        batch_interval_ms: get("batch-interval-ms", "500").parse()?,
        strategy: get("strategy", "batch"),
        percent: get("percent", "25").parse()?,
        window_ms: get("window-ms", "5000").parse()?,
        fixed_delay_ms: get("fixed-delay-ms", "1000").parse()?,
        workers: get("workers", "2").parse()?,
        seed: get("seed", "1").parse()?,
        in_flight: get("in-flight", "250").parse()?,
        drain_jitter: get("drain-jitter", "true").parse()?,
        gradual_over_ms: get("gradual-over-ms", "10000").parse()?,
    })
}

/// Accepts per 100 ms since the drain was triggered.
struct Buckets {
    t0: OnceLock<Instant>,
    counts: Vec<AtomicU64>,
}

impl Buckets {
    fn new() -> Self {
        Self {
            t0: OnceLock::new(),
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
    fn record(&self) {
        if let Some(t0) = self.t0.get() {
            let i = (t0.elapsed().as_millis() / BUCKET.as_millis()) as usize;
            self.counts[i.min(BUCKETS - 1)].fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A minimal WebSocket upstream: answers the handshake and holds the
/// connection until the peer closes; counts accepts.
async fn upstream(listener: TcpListener, buckets: Arc<Buckets>, live: Arc<AtomicUsize>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let buckets = buckets.clone();
        let live = live.clone();
        tokio::spawn(async move {
            let Ok(head) = read_head(&mut stream).await else {
                return;
            };
            let Some(key) = head.lines().find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("sec-websocket-key")
                    .then(|| value.trim().to_owned())
            }) else {
                return;
            };
            let accept =
                tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
            let response = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
            );
            if stream.write_all(response.as_bytes()).await.is_err() {
                return;
            }
            buckets.record();
            live.fetch_add(1, Ordering::Relaxed);
            let mut buf = [0u8; 256];
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
            live.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

async fn read_head(stream: &mut TcpStream) -> Result<String, Error> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || head.len() > 8192 {
            return Err("no request head".into());
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// Connects to `to` from `from` (any port) and upgrades to WebSocket.
async fn ws_connect(from: IpAddr, to: SocketAddr) -> Result<TcpStream, Error> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    let mut stream = socket.connect(to).await?;
    stream
        .write_all(
            format!(
                "GET /ws HTTP/1.1\r\nHost: {to}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            .as_bytes(),
        )
        .await?;
    let head = read_head(&mut stream).await?;
    if !head.starts_with("HTTP/1.1 101") {
        return Err(format!("no upgrade: {}", head.lines().next().unwrap_or("")).into());
    }
    Ok(stream)
}

/// Waits for the gateway's close frame; returns its code and reason.
async fn wait_close(stream: &mut TcpStream) -> Option<(u16, String)> {
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        let n = stream.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        got.extend_from_slice(&buf[..n]);
        if got.len() >= 2 && got[0] == 0x88 && got.len() >= 2 + usize::from(got[1] & 0x7f) {
            let len = usize::from(got[1] & 0x7f);
            if len < 2 {
                return Some((1005, String::new()));
            }
            let code = u16::from_be_bytes([got[2], got[3]]);
            return Some((code, String::from_utf8_lossy(&got[4..2 + len]).into_owned()));
        }
    }
}

#[derive(Default)]
struct ClientReport {
    heard_close: Option<Duration>,
    reconnected: Option<Duration>,
}

#[allow(clippy::too_many_arguments)]
async fn client(
    i: usize,
    source: IpAddr,
    gateway: SocketAddr,
    mode: Mode,
    fixed: Duration,
    seed: u64,
    t0: Arc<OnceLock<Instant>>,
    connected: Arc<AtomicUsize>,
    failures: Arc<AtomicUsize>,
    mut stop: watch::Receiver<bool>,
) -> ClientReport {
    let mut report = ClientReport::default();
    let mut stream = loop {
        match ws_connect(source, gateway).await {
            Ok(s) => break s,
            Err(_) => tokio::time::sleep(Duration::from_millis(50 + (i % 50) as u64)).await,
        }
    };
    connected.fetch_add(1, Ordering::Relaxed);
    if mode == Mode::Hold {
        let _ = stop.wait_for(|s| *s).await;
        return report;
    }
    let close = tokio::select! {
        c = wait_close(&mut stream) => c,
        _ = stop.wait_for(|s| *s) => return report,
    };
    let since = |t0: &OnceLock<Instant>| t0.get().map(|t| t.elapsed()).unwrap_or_default();
    report.heard_close = Some(since(&t0));
    // Answer the close (masked, as a client must) and leave.
    let _ = stream
        .write_all(&[0x88, 0x82, 0, 0, 0, 0, 0x03, 0xf4])
        .await;
    drop(stream);
    let wait = match mode {
        Mode::Immediate | Mode::Hold => Duration::ZERO,
        Mode::Fixed => fixed,
        Mode::Jitter => {
            let frame = close.map(|(code, reason)| CloseFrame {
                code: CloseCode::from(code),
                reason: reason.into(),
            });
            Reconnect::new()
                .seed(seed ^ i as u64)
                .after_close(frame.as_ref())
        }
    };
    let mut reconnect = Reconnect::new()
        .seed(seed ^ (i as u64) << 1)
        .max_attempts(Some(50));
    let stream = reconnect
        .connect_with(wait, || {
            let failures = failures.clone();
            async move {
                let result = ws_connect(source, gateway).await;
                if result.is_err() {
                    // Refused or reset: the accept queue overflowed.
                    failures.fetch_add(1, Ordering::Relaxed);
                }
                result
            }
        })
        .await;
    if let Ok(stream) = stream {
        report.reconnected = Some(since(&t0));
        connected.fetch_add(1, Ordering::Relaxed);
        let _ = stop.wait_for(|s| *s).await;
        drop(stream);
    }
    report
}

async fn admin(addr: SocketAddr, method: &str, path: &str) -> Result<String, Error> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn free_port() -> Result<SocketAddr, Error> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

struct Gateway(Child);

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args = args()?;
    let blue_buckets = Arc::new(Buckets::new());
    let green_buckets = Arc::new(Buckets::new());
    let blue_live = Arc::new(AtomicUsize::new(0));
    let green_live = Arc::new(AtomicUsize::new(0));
    let mut blue = Vec::new();
    for _ in 0..args.upstream_ports.max(1) {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        blue.push(format!("http://{}", l.local_addr()?));
        tokio::spawn(upstream(l, blue_buckets.clone(), blue_live.clone()));
    }
    let green_listener = TcpListener::bind("127.0.0.1:0").await?;
    let green = format!("http://{}", green_listener.local_addr()?);
    tokio::spawn(upstream(
        green_listener,
        green_buckets.clone(),
        green_live.clone(),
    ));

    let listen = free_port()?;
    let admin_addr = free_port()?;
    let mut endpoints: Vec<String> = blue.iter().map(|b| format!("\"{b}\"")).collect();
    endpoints.push(format!("\"{green}\""));
    let dir = std::env::temp_dir().join(format!("keel-herd-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("keel.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"{listen}\"\nadmin_listen = \"{admin_addr}\"\nworkers = {workers}\n\n\
             [upstreams.app]\nendpoints = [{endpoints}]\n\n[[routes]]\npath_prefix = \"/\"\nupstream = \"app\"\n\n\
             [drain]\nstrategy = \"{strategy}\"\nbatch_size = {batch}\nbatch_interval = \"{interval}ms\"\npercent = {percent}\n\
             jitter = {jitter}\ngradual_over = \"{over}ms\"\ndeadline = \"120s\"\nreconnect_window = \"{window}ms\"\n\n[log]\nlevel = \"warn\"\n",
            workers = args.workers,
            endpoints = endpoints.join(", "),
            strategy = args.strategy,
            batch = args.batch_size,
            interval = args.batch_interval_ms,
            percent = args.percent,
            window = args.window_ms,
            jitter = args.drain_jitter,
            over = args.gradual_over_ms,
        ),
    )?;
    let gateway = Gateway(
        Command::new(&args.keel)
            .args(["serve", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .spawn()?,
    );
    let pid = gateway.0.id();
    let mut up = false;
    for _ in 0..200 {
        if admin(admin_addr, "GET", "/healthz")
            .await
            .is_ok_and(|r| r.starts_with("HTTP/1.1 200"))
        {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    if !up {
        return Err("keel did not start".into());
    }
    // Every client starts on blue: green is drained (it has no tunnels yet)
    // while they connect, and resumed before blue is drained.
    let path =
        |action: &str, url: &str| format!("/upstreams/app/endpoints/{action}?endpoint={url}");
    admin(admin_addr, "POST", &path("drain", &green)).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_before = rss_kib(pid);

    let t0 = Arc::new(OnceLock::new());
    let connected = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(AtomicUsize::new(0));
    let (stop, stop_rx) = watch::channel(false);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(args.clients);
    for i in 0..args.clients {
        let s = i % args.sources.clamp(1, 60_000);
        let source = IpAddr::V4(Ipv4Addr::new(
            127,
            1 + (s / 250 / 250) as u8,
            (s / 250 % 250) as u8,
            (2 + s % 250) as u8,
        ));
        tasks.push(tokio::spawn(client(
            i,
            source,
            listen,
            args.mode,
            Duration::from_millis(args.fixed_delay_ms),
            args.seed,
            t0.clone(),
            connected.clone(),
            failures.clone(),
            stop_rx.clone(),
        )));
        // At most `in_flight` handshakes at once.
        if i + 1 - connected.load(Ordering::Relaxed) >= args.in_flight {
            while i + 1 - connected.load(Ordering::Relaxed) >= args.in_flight {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    }
    let until = Instant::now() + Duration::from_secs(600);
    while connected.load(Ordering::Relaxed) < args.clients && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let held = blue_live.load(Ordering::Relaxed);
    let setup = started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = rss_kib(pid);
    println!(
        "tunnels: {held} held (of {} clients) in {:.1}s; gateway RSS {} KiB -> {} KiB: {:.2} KiB per idle tunnel",
        args.clients,
        setup.as_secs_f64(),
        rss_before,
        rss_after,
        (rss_after.saturating_sub(rss_before)) as f64 / held.max(1) as f64
    );
    if args.mode == Mode::Hold {
        let _ = stop.send(true);
        return Ok(());
    }

    admin(admin_addr, "POST", &path("resume", &green)).await?;
    let now = Instant::now();
    let _ = t0.set(now);
    let _ = green_buckets.t0.set(now);
    let answer = admin(admin_addr, "POST", &path("drain", &blue[0])).await?;
    if !answer.starts_with("HTTP/1.1 202") {
        return Err(format!("drain refused: {answer}").into());
    }
    let until = Instant::now() + Duration::from_secs(120);
    while green_live.load(Ordering::Relaxed) < held && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let back_after = now.elapsed();
    let _ = stop.send(true);
    let mut heard = Vec::new();
    let mut reconnected = 0;
    for t in tasks {
        if let Ok(r) = t.await {
            heard.extend(r.heard_close);
            reconnected += usize::from(r.reconnected.is_some());
        }
    }
    heard.sort();
    let counts: Vec<u64> = green_buckets
        .counts
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .collect();
    let last = counts.iter().rposition(|c| *c > 0).unwrap_or(0);
    let peak = counts.iter().copied().max().unwrap_or(0);
    println!(
        "mode {:?}: {reconnected}/{held} reconnected, all back after {:.2}s; peak {peak} reconnects per 100 ms; {} failed reconnect attempts",
        args.mode,
        back_after.as_secs_f64(),
        failures.load(Ordering::Relaxed)
    );
    println!("reconnects per 100 ms: {:?}", &counts[..=last]);
    if let (Some(first), Some(last)) = (heard.first(), heard.last()) {
        // The plan's last batch starts at (batches - 1) * interval and, with
        // jitter, ends one interval later.
        let (size, interval) = match args.strategy.as_str() {
            "percent" => (
                ((held as f64) * args.percent / 100.0).ceil() as usize,
                args.batch_interval_ms,
            ),
            // 100 ms ticks over the whole duration.
            "gradual" => (
                held.div_ceil(args.gradual_over_ms.div_ceil(100).max(1) as usize),
                100,
            ),
            _ => (args.batch_size, args.batch_interval_ms),
        };
        let batches = held.div_ceil(size.max(1)) as u64;
        let planned = Duration::from_millis(batches * interval);
        println!(
            "closes heard from {:.3}s to {:.3}s; planned {} batches over {:.3}s: {:+.1} % off the plan",
            first.as_secs_f64(),
            last.as_secs_f64(),
            batches,
            planned.as_secs_f64(),
            (last.as_secs_f64() - planned.as_secs_f64()) / planned.as_secs_f64() * 100.0
        );
        let mut per_interval = vec![0usize; batches as usize + 2];
        for h in &heard {
            let k = (h.as_millis() as u64 / interval.max(1)) as usize;
            let last = per_interval.len() - 1;
            per_interval[k.min(last)] += 1;
        }
        println!("closes heard per batch interval: {per_interval:?} (plan: {size} each)");
    }
    drop(gateway);
    Ok(())
}
