//! `keel demo` end to end: the curl commands it prints behave as it says.
//! The test runs the printed lines themselves with `sh`, in order.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};

struct Demo(Child);

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_addr() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").to_string()
}

fn sh(command: &str) -> String {
    let out = Command::new("sh")
        .args(["-c", command])
        .output()
        .expect("run sh");
    String::from_utf8_lossy(&out.stdout).to_lowercase()
}

#[test]
fn the_printed_curl_commands_show_replay_mismatch_and_conflict() {
    if Command::new("curl").arg("--version").output().is_err() {
        eprintln!("skipping: curl is not installed");
        return;
    }
    let mut demo = Demo(
        Command::new(env!("CARGO_BIN_EXE_keel"))
            .args(["demo", "--listen", &free_addr(), "--admin", &free_addr()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn keel demo"),
    );
    let stdout = demo.0.stdout.take().expect("stdout");
    let mut commands = Vec::new();
    let mut store_dir = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("demo output");
        let line = line.trim();
        if let Some(dir) = line
            .strip_prefix("Idempotency keys are on for POST /orders, kept in an embedded store in ")
        {
            store_dir = Some(dir.to_owned());
        }
        if line.starts_with("curl ") && !line.ends_with('\\') {
            commands.push(line.to_owned());
        }
        if line.starts_with("Press Ctrl-C") {
            break;
        }
    }
    assert!(commands.len() >= 5, "{commands:?}");
    let store_dir = store_dir.expect("the demo names its store folder");
    assert!(std::path::Path::new(&store_dir).is_dir(), "{store_dir}");

    // 1. created, one execution
    let out = sh(&commands[0]);
    assert!(out.starts_with("http/1.1 201"), "{out}");
    assert!(out.contains(r#""executions":1"#), "{out}");
    assert!(!out.contains("idempotent-replayed"), "{out}");
    // 2. replayed
    let again = sh(&commands[1]);
    assert!(again.starts_with("http/1.1 201"), "{again}");
    assert!(again.contains("idempotent-replayed: true"), "{again}");
    assert!(again.contains("original-request-id: "), "{again}");
    assert_eq!(
        again.rsplit("\r\n\r\n").next(),
        out.rsplit("\r\n\r\n").next()
    );
    // ... executed once
    assert_eq!(sh(&commands[2]).trim(), r#"{"executions":1}"#);
    // 3. mismatch
    let out = sh(&commands[3]);
    assert!(out.starts_with("http/1.1 422"), "{out}");
    assert!(out.contains("application/problem+json"), "{out}");
    // 4. conflict while the first runs
    let out = sh(&commands[4]);
    assert!(out.starts_with("http/1.1 409"), "{out}");
    assert!(out.contains("retry-after: "), "{out}");
    assert!(out.contains("idempotency-in-flight"), "{out}");
    // The gateway is ready (the embedded store is connected).
    let readyz = commands
        .iter()
        .find(|c| c.ends_with("/readyz"))
        .expect("readyz command");
    assert!(sh(readyz).contains(r#""ready":true"#));

    // Ctrl-C drains, exits 0 and removes the store folder.
    let pid = demo.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .expect("kill")
            .success()
    );
    let status = demo.0.wait().expect("wait");
    assert!(status.success(), "{status}");
    assert!(
        !std::path::Path::new(&store_dir).exists(),
        "{store_dir} left behind"
    );
}
