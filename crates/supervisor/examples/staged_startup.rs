//! Staged startup: health first, the dependency when it comes.
//!
//! A supervision tree whose first child serves `/healthz`, `/readyz` and
//! `/status` over HTTP, and whose second child is a connector to Redis. The
//! HTTP server is up at once; `/readyz` answers 503 with a JSON reason while
//! the connector retries with backoff, turns 200 when Redis answers, and back
//! to 503 if Redis goes away — without the process dying or restarting.
//! This is "It's about the guarantees": a remote dependency is never a
//! precondition of `init`.
//!
//! ```text
//! cargo run -p keel-supervisor --example staged_startup
//! curl -i http://127.0.0.1:8080/readyz
//! curl -s http://127.0.0.1:8080/status
//! ```
//!
//! Environment: `KEEL_EXAMPLE_LISTEN` (default `127.0.0.1:8080`) and
//! `KEEL_EXAMPLE_REDIS` (default `127.0.0.1:6379`; a `redis://` URL works).

use std::time::Duration;

use keel_supervisor::{
    Application, ChildContext, ChildResult, ChildSpec, RestartBackoff, Supervisor, TreeProbe,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// How the example is wired; tests shorten the delays.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Address the health server listens on.
    pub listen: String,
    /// Redis `host:port`.
    pub redis: String,
    /// Reconnect backoff (full jitter).
    pub backoff: RestartBackoff,
    /// Time between health pings once connected.
    pub ping_every: Duration,
}

impl Settings {
    /// Reads the environment, with the defaults above.
    pub fn from_env() -> Self {
        let redis = std::env::var("KEEL_EXAMPLE_REDIS").unwrap_or_else(|_| "127.0.0.1:6379".into());
        Self {
            listen: std::env::var("KEEL_EXAMPLE_LISTEN")
                .unwrap_or_else(|_| "127.0.0.1:8080".into()),
            redis: host_port(&redis),
            backoff: RestartBackoff::new(Duration::from_millis(100), Duration::from_secs(5)),
            ping_every: Duration::from_secs(1),
        }
    }
}

/// `redis://host:port/db` or `host:port` to `host:port`.
pub fn host_port(url: &str) -> String {
    let rest = url.strip_prefix("redis://").unwrap_or(url);
    let hp = rest.split('/').next().unwrap_or(rest);
    let hp = hp.rsplit_once('@').map_or(hp, |(_, h)| h);
    if hp.contains(':') {
        hp.to_string()
    } else {
        format!("{hp}:6379")
    }
}

/// The tree: the health server first, then the Redis connector. The
/// server's listener is bound before the tree starts so its address is
/// known (and a busy port fails fast, before anything else runs).
pub fn tree(settings: Settings, listener: TcpListener) -> Supervisor {
    let listener = std::sync::Arc::new(tokio::sync::Mutex::new(Some(listener)));
    let probe_slot: std::sync::Arc<std::sync::OnceLock<TreeProbe>> = Default::default();
    let slot = probe_slot.clone();
    let listen = settings.listen.clone();
    let http = ChildSpec::new("http", move |ctx| {
        let listener = listener.clone();
        let slot = slot.clone();
        let listen = listen.clone();
        async move {
            // Reuse the pre-bound socket on the first run, bind anew after a
            // restart.
            let listener = match listener.lock().await.take() {
                Some(l) => l,
                None => TcpListener::bind(&listen).await?,
            };
            serve(ctx, listener, slot).await
        }
    });
    let s = settings.clone();
    let redis = ChildSpec::new("redis", move |ctx| connector(ctx, s.clone()));
    let root = Supervisor::builder("staged")
        .child(http)
        .child(redis)
        .build()
        .expect("the example's tree is valid");
    let _ = probe_slot.set(root.probe());
    root
}

async fn serve(
    ctx: ChildContext,
    listener: TcpListener,
    probe: std::sync::Arc<std::sync::OnceLock<TreeProbe>>,
) -> ChildResult {
    ctx.ready();
    loop {
        let (stream, _) = tokio::select! {
            _ = ctx.cancelled() => return Ok(()),
            accepted = listener.accept() => accepted?,
        };
        let probe = probe.get().cloned();
        tokio::spawn(async move {
            if let Some(probe) = probe {
                let _ = answer(stream, &probe).await;
            }
        });
    }
}

/// Answers one request and closes (enough for health checks).
async fn answer(stream: TcpStream, probe: &TreeProbe) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream);
    let mut request_line = String::new();
    // Bound what a client can make us read.
    (&mut reader)
        .take(8192)
        .read_line(&mut request_line)
        .await?;
    loop {
        let mut header = String::new();
        let n = (&mut reader).take(8192).read_line(&mut header).await?;
        if n == 0 || header == "\r\n" || header == "\n" {
            break;
        }
    }
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, body) = match (method, path) {
        ("GET", "/healthz") => ("200 OK", r#"{"status":"ok"}"#.to_string()),
        ("GET", "/readyz") => {
            let not_ready = probe.not_ready();
            if not_ready.is_empty() {
                ("200 OK", r#"{"ready":true}"#.to_string())
            } else {
                let body = serde_json::json!({ "ready": false, "not_ready": not_ready });
                ("503 Service Unavailable", body.to_string())
            }
        }
        ("GET", "/status") => (
            "200 OK",
            serde_json::to_string(&probe.snapshot()).unwrap_or_else(|_| "{}".into()),
        ),
        _ => ("404 Not Found", r#"{"error":"not found"}"#.to_string()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut stream = reader.into_inner();
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// Connects to Redis with backoff, reports readiness, and keeps checking.
/// It never exits because Redis is down: that is a state, not a crash.
async fn connector(ctx: ChildContext, settings: Settings) -> ChildResult {
    ctx.defer(format!("connecting to redis at {}", settings.redis));
    let mut attempt = 0u32;
    let mut rng = fastrand::Rng::new();
    loop {
        let mut connected = false;
        match ping_loop(&ctx, &settings, &mut connected).await {
            Ok(()) => return Ok(()), // cancelled
            Err(e) => {
                ctx.not_ready(format!("redis at {}: {e}", settings.redis));
                if connected {
                    attempt = 0; // it worked for a while: start the backoff over
                }
                let delay = settings.backoff.delay(attempt, rng.f64());
                attempt = attempt.saturating_add(1);
                tokio::select! {
                    _ = ctx.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// Connects and pings until the connection fails (Err) or the child is
/// cancelled (Ok).
async fn ping_loop(
    ctx: &ChildContext,
    settings: &Settings,
    connected: &mut bool,
) -> std::io::Result<()> {
    let timeout = Duration::from_secs(1);
    let mut conn = tokio::time::timeout(timeout, TcpStream::connect(&settings.redis))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    loop {
        tokio::time::timeout(timeout, ping(&mut conn))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "PING timed out"))??;
        *connected = true;
        ctx.ready();
        tokio::select! {
            _ = ctx.cancelled() => return Ok(()),
            _ = tokio::time::sleep(settings.ping_every) => {}
        }
    }
}

/// Sends a RESP `PING` and expects `+PONG`.
async fn ping(conn: &mut TcpStream) -> std::io::Result<()> {
    conn.write_all(b"*1\r\n$4\r\nPING\r\n").await?;
    let mut buf = [0u8; 64];
    let n = conn.read(&mut buf).await?;
    if n == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed",
        ));
    }
    if buf[..n].starts_with(b"+PONG") {
        Ok(())
    } else {
        let reply = String::from_utf8_lossy(&buf[..n]).trim().to_string();
        Err(std::io::Error::other(format!(
            "unexpected reply to PING: {reply}"
        )))
    }
}

#[allow(dead_code)] // tests include this file as a module and start the tree themselves
#[tokio::main]
async fn main() -> std::process::ExitCode {
    let settings = Settings::from_env();
    let listener = match TcpListener::bind(&settings.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "error: cannot listen on {}: {e} (set KEEL_EXAMPLE_LISTEN)",
                settings.listen
            );
            return std::process::ExitCode::from(2);
        }
    };
    let base = format!(
        "http://{}",
        listener
            .local_addr()
            .map_or(settings.listen.clone(), |a| a.to_string())
    );
    println!(
        "staged startup: health server on {base}, redis at {}",
        settings.redis
    );
    println!("  curl -i {base}/readyz    # 503 with a reason until redis answers, then 200");
    println!("  curl -s {base}/status    # the supervision tree as JSON");
    println!("stop redis and /readyz turns 503 again; the process stays up. Ctrl-C to stop.");
    match Application::new(tree(settings, listener)).run().await {
        Ok(_) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
