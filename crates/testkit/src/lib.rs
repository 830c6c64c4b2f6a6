//! Test support shared by Keel's crates.
//!
//! Tests that need a real service (Redis, PostgreSQL, NATS) find it through an
//! environment variable that `.ci/run` exports. Under `CI=true` a missing or
//! unreachable service is a loud failure; elsewhere the test prints why it
//! skipped and returns, so `cargo test --workspace` works on a laptop with no
//! servers running.
//!
//! ```no_run
//! // In a test: returns early (skips) when the service is not configured.
//! fn my_test() {
//!     let Some(url) = keel_testkit::service_url(keel_testkit::REDIS) else { return };
//!     assert!(url.starts_with("redis://"));
//! }
//! # my_test();
//! ```

use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

pub mod redis_server;

/// Environment variable holding the Redis URL (`redis://127.0.0.1:6379/`).
pub const REDIS: &str = "KEEL_TEST_REDIS_URL";
/// Environment variable holding the PostgreSQL URL (`postgres://postgres@127.0.0.1:5432/test`).
pub const POSTGRES: &str = "KEEL_TEST_POSTGRES_URL";
/// Environment variable holding the NATS URL (`nats://127.0.0.1:4222`).
pub const NATS: &str = "KEEL_TEST_NATS_URL";

/// True when running under CI (`CI=true`), where skipping is not allowed.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Returns the URL in the environment variable `var` if the service answers
/// on its TCP port.
///
/// Under `CI=true` a missing variable or an unreachable service panics with a
/// message that says what to start. Elsewhere it prints the reason to stderr
/// and returns `None`, so the caller can skip.
///
/// ```no_run
/// if let Some(url) = keel_testkit::service_url(keel_testkit::POSTGRES) {
///     println!("testing against {url}");
/// }
/// ```
pub fn service_url(var: &str) -> Option<String> {
    let url = match std::env::var(var) {
        Ok(url) if !url.is_empty() => url,
        _ => return skip(&format!("{var} is not set (bash .ci/run sets it)")),
    };
    match host_port(&url) {
        Some(addr) if reachable(&addr) => Some(url),
        Some(addr) => skip(&format!("{var}={url}: nothing answers at {addr}")),
        None => skip(&format!("{var}={url}: cannot find host:port in the URL")),
    }
}

/// True when `python3` can import `module` (a test drives a real
/// third-party client or server written in Python).
///
/// Under `CI=true` a missing module panics (`.ci/run` installs it); elsewhere
/// the test is skipped with the reason on stderr.
///
/// ```no_run
/// if keel_testkit::python_with("websockets") {
///     // run python3 with a script that imports websockets
/// }
/// ```
pub fn python_with(module: &str) -> bool {
    let imported = std::process::Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    imported
        || skip(&format!(
            "python3 cannot import {module} (pip install {module}; bash .ci/run installs it)"
        ))
        .is_some()
}

fn skip(reason: &str) -> Option<String> {
    if in_ci() {
        panic!("CI=true and a required service is missing: {reason}");
    }
    eprintln!("skipping: {reason}");
    None
}

/// Extracts `host:port` from a URL such as `redis://127.0.0.1:6379/` or
/// `postgres://user@host:5432/db`.
fn host_port(url: &str) -> Option<String> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?']).next()?;
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
    if host_port.is_empty() {
        return None;
    }
    let default_port = match url.split_once("://").map(|(s, _)| s) {
        Some("redis") => 6379,
        Some("postgres" | "postgresql") => 5432,
        Some("nats") => 4222,
        _ => return Some(host_port.to_string()),
    };
    if host_port
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        Some(host_port.to_string())
    } else {
        Some(format!("{host_port}:{default_port}"))
    }
}

fn reachable(addr: &str) -> bool {
    let Ok(addrs) = addr.to_socket_addrs() else {
        return false;
    };
    addrs
        .into_iter()
        .any(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok())
}

#[cfg(test)]
mod tests {
    use super::host_port;

    #[test]
    fn finds_host_and_port() {
        assert_eq!(
            host_port("redis://127.0.0.1:6379/").as_deref(),
            Some("127.0.0.1:6379")
        );
        assert_eq!(
            host_port("redis://localhost").as_deref(),
            Some("localhost:6379")
        );
        assert_eq!(
            host_port("postgres://postgres@127.0.0.1:5432/test").as_deref(),
            Some("127.0.0.1:5432")
        );
        assert_eq!(
            host_port("nats://127.0.0.1").as_deref(),
            Some("127.0.0.1:4222")
        );
        assert_eq!(host_port("redis://"), None);
    }
}
