//! Crash tests' child processes: this test binary re-run for one ignored
//! test that does some store work and prints a marker, then SIGKILLed.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

/// Runs the ignored test `child_test` of this binary in a child process
/// with `env_var` set to `dir`, waits for a line with `marker`, then kills
/// the child with SIGKILL (no destructors, no flush) and reaps it. Returns
/// what followed the marker on its line, or `None` if the child ended
/// without printing it.
pub async fn run_until_then_kill(
    child_test: &str,
    env_var: &str,
    dir: &Path,
    marker: &str,
) -> Option<String> {
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            child_test,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(env_var, dir)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("piped");
    let marker = marker.to_owned();
    let rest = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            // libtest may print the test's name on the same line first.
            .find_map(|l| {
                l.split_once(marker.as_str())
                    .map(|(_, rest)| rest.to_owned())
            })
    })
    .await
    .expect("reader");
    child.kill().expect("kill -9");
    child.wait().expect("reap");
    rest
}
