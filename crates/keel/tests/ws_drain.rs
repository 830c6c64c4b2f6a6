//! Drains judged by a WebSocket implementation Keel was not written with:
//! Python's `websockets` on both ends (`ws_interop.py`), an upstream that
//! streams fragmented messages with pings between the fragments, and 50
//! clients checking every message's SHA-256. A drain must close each
//! client with 1012 at a message boundary (so it answers with a normal
//! close, not 1002 "incomplete fragmented message"), hand each upstream
//! connection the client's close frame and a FIN (never a reset), and
//! deliver every message it forwarded intact.

mod common;

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use common::Keel;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

const CLIENTS: usize = 50;
/// Messages up to 256 KiB in 4 KiB fragments 2 ms apart (a message takes
/// well under a second, inside the 6 s close grace below): fast enough that
/// the upstream is nearly always sending when its connection is closed,
/// which is when dropping a socket with unread bytes resets it.
const UPSTREAM_ARGS: [&str; 3] = ["262144", "4096", "2"];

fn script() -> String {
    format!("{}/tests/ws_interop.py", env!("CARGO_MANIFEST_DIR"))
}

/// A Python process and its stdout, line by line.
struct Py {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Py {
    fn spawn(args: &[&str]) -> Py {
        let mut child = Command::new("python3")
            .arg(script())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("python3");
        let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        Py { child, lines }
    }

    /// The next line starting with `prefix` (its rest), within `within`.
    async fn next(&mut self, prefix: &str, within: Duration) -> String {
        let read = async {
            loop {
                match self.lines.next_line().await.expect("read") {
                    Some(line) => {
                        if let Some(rest) = line.strip_prefix(prefix) {
                            return rest.trim().to_owned();
                        }
                    }
                    None => panic!("python exited before {prefix:?}"),
                }
            }
        };
        tokio::time::timeout(within, read)
            .await
            .unwrap_or_else(|_| panic!("no {prefix:?} line within {within:?}"))
    }

    /// `n` lines starting with `prefix`, as JSON.
    async fn records(&mut self, prefix: &str, n: usize) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        for _ in 0..n {
            let line = self.next(prefix, Duration::from_secs(60)).await;
            out.push(serde_json::from_str(&line).expect("json"));
        }
        out
    }
}

/// The upstream process and its two ports.
async fn upstream() -> (Py, u16, u16) {
    let mut up = Py::spawn(&[
        "upstream",
        UPSTREAM_ARGS[0],
        UPSTREAM_ARGS[1],
        UPSTREAM_ARGS[2],
    ]);
    let ports = up.next("PORTS", Duration::from_secs(30)).await;
    let ports: Vec<u16> = ports
        .split_whitespace()
        .map(|p| p.parse().expect("port"))
        .collect();
    (up, ports[0], ports[1])
}

/// `CLIENTS` clients through `keel`, each having received a message.
async fn clients(keel: &Keel) -> Py {
    let url = format!("ws://{}/", keel.listen);
    let mut clients = Py::spawn(&["clients", &url, &CLIENTS.to_string()]);
    clients.next("READY", Duration::from_secs(60)).await;
    clients
}

/// Every client was closed with 1012 and the reconnect hint, answered
/// with a normal close, and got only intact messages; returns how many
/// messages they got in all.
fn check_clients(results: &[serde_json::Value]) -> u64 {
    let mut intact = 0;
    for r in results {
        assert!(r.get("error").is_none(), "client failed: {r}");
        assert_eq!(r["corrupt"], 0, "a corrupt message: {r}");
        assert_eq!(r["rcvd"], 1012, "not closed with 1012: {r}");
        assert_eq!(
            r["sent"], 1012,
            "the client did not answer with a normal close (1002 means it saw the close inside a message): {r}"
        );
        let reason = r["reason"].as_str().expect("reason");
        assert!(
            keel_drain::parse_reconnect_hint(reason).is_some(),
            "no reconnect hint: {r}"
        );
        intact += r["intact"].as_u64().expect("intact");
    }
    intact
}

/// Every upstream connection got the client's close frame and a FIN.
fn check_upstream(conns: &[serde_json::Value]) {
    for c in conns {
        assert_eq!(c["rcvd"], 1012, "the upstream got no close frame: {c}");
        assert_eq!(c["reset"], false, "the upstream connection was reset: {c}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_every_websocket_at_a_message_boundary_and_resets_nothing() {
    if !keel_testkit::python_with("websockets") {
        return;
    }
    let (mut up, port, _) = upstream().await;
    let mut keel = Keel::start(
        "",
        &format!(
            "[upstreams.app]\nendpoints = [\"http://127.0.0.1:{port}\"]\n\n[[routes]]\npath_prefix = \"/\"\nupstream = \"app\"\n\n\
             [drain]\nshutdown_delay = \"0s\"\nbatch_size = 10\nbatch_interval = \"200ms\"\ndeadline = \"60s\"\nclose_grace = \"6s\"\nreconnect_window = \"1s\"\n"
        ),
    )
    .await;
    let mut clients = clients(&keel).await;
    let status = Command::new("kill")
        .args(["-TERM", &keel.child.id().to_string()])
        .status()
        .await
        .expect("kill");
    assert!(status.success());

    let results = clients.records("RESULT", CLIENTS).await;
    clients.next("DONE", Duration::from_secs(10)).await;
    let intact = check_clients(&results);
    check_upstream(&up.records("CONN", CLIENTS).await);
    let exit = tokio::task::spawn_blocking(move || keel.child.wait().expect("wait"))
        .await
        .expect("join");
    assert!(exit.success(), "keel exited with {exit}");
    eprintln!("{CLIENTS} clients closed cleanly after {intact} intact messages");
    up.child.kill().await.ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_drain_closes_its_websockets_as_cleanly() {
    if !keel_testkit::python_with("websockets") {
        return;
    }
    let (mut up, blue, green) = upstream().await;
    let blue_url = format!("http://127.0.0.1:{blue}");
    let keel = Keel::start(
        "",
        &format!(
            "[upstreams.app]\nendpoints = [\"{blue_url}\", \"http://127.0.0.1:{green}\"]\nload_balancing = \"round_robin\"\n\n[[routes]]\npath_prefix = \"/\"\nupstream = \"app\"\n\n\
             [drain]\nbatch_size = 10\nbatch_interval = \"200ms\"\ndeadline = \"60s\"\nclose_grace = \"6s\"\nreconnect_window = \"1s\"\n"
        ),
    )
    .await;
    let mut clients = clients(&keel).await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["drain", "--admin", &keel.admin.to_string()])
        .args(["--upstream", "app", "--endpoint", &blue_url])
        .output()
        .await
        .expect("keel drain");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("drain done"), "{stdout}");

    // Round robin put half on blue: exactly those are closed, cleanly.
    let results = clients.records("RESULT", CLIENTS / 2).await;
    check_clients(&results);
    let conns = up.records("CONN", CLIENTS / 2).await;
    check_upstream(&conns);
    let ports: HashMap<u64, usize> = conns.iter().fold(HashMap::new(), |mut m, c| {
        *m.entry(c["port"].as_u64().expect("port")).or_default() += 1;
        m
    });
    assert_eq!(
        ports.get(&u64::from(blue)),
        Some(&(CLIENTS / 2)),
        "{ports:?}"
    );
    // Green's clients are still streaming.
    let more = tokio::time::timeout(
        Duration::from_millis(500),
        clients.next("RESULT", Duration::from_secs(1)),
    )
    .await;
    assert!(more.is_err(), "a green client was closed: {more:?}");
    // Every close went at a message end: no bound was hit.
    let (_, _, metrics) = common::get(keel.admin, "/metrics").await.expect("metrics");
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(
        metrics.contains("keel_tunnel_closes_mid_message_total 0"),
        "{metrics}"
    );
    up.child.kill().await.ok();
}
