//! `keel check`: exit 0 for valid configs (the shipped examples), exit 2
//! with `FILE:LINE:COL: message` for broken ones.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn check(path: &Path) -> (Option<i32>, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["check", "--config"])
        .arg(path)
        .output()
        .expect("run keel check");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn shipped_examples_are_valid() {
    let examples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let mut checked = Vec::new();
    for entry in std::fs::read_dir(&examples).expect("examples/") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            let (code, stderr) = check(&path);
            assert_eq!(code, Some(0), "{}: {stderr}", path.display());
            checked.push(path);
        }
    }
    assert!(checked.len() >= 3, "examples/*.toml: {checked:?}");
}

const BASE: &str = r#"[server]
listen = "127.0.0.1:8080"

[upstreams.app]
endpoints = ["http://127.0.0.1:3000"]

[[routes]]
path_prefix = "/"
upstream = "app"
"#;

#[test]
fn broken_configs_exit_2_with_file_line_col() {
    let cases: &[(&str, &str, &str)] = &[
        // (replace, with, expected "LINE:COL: message" start)
        ("listen =", "listn =", "2:1: unknown field `listn`"),
        (
            "upstream = \"app\"",
            "upstream = \"ap\"",
            "9:12: unknown upstream \"ap\"",
        ),
        (
            "http://127.0.0.1:3000",
            "ftp://x",
            "5:14: \"ftp://x\": write the URL",
        ),
        (
            "[[routes]]",
            "[[routes]]\nmethods = [\"get\"]",
            "8:12: \"get\" is not an HTTP method",
        ),
        (
            "[server]",
            "[server]\nidle_timeout = \"10 sec\"",
            "2:16: \"10 sec\": no spaces allowed; expected a duration such as \"30s\"",
        ),
        (
            "[server]",
            "[server]\nmax_body_size = \"1 PB\"",
            "2:17: \"1 PB\": no spaces allowed; expected a size",
        ),
        (
            "[upstreams.app]",
            "[store]\nkind = \"postgres\"\nurl = \"redis://x\"\n[upstreams.app]",
            "6:7: store.url must start with postgres://",
        ),
        (
            "[[routes]]",
            "[drain]\nbatch_size = \"many\"\n[[routes]]",
            "8:14:",
        ),
        (
            "path_prefix = \"/\"",
            "path_prefix = \"/\"\n[routes.idempotency]\nenabled = true\nttl = \"1 week\"",
            "11:7:",
        ),
        (
            "path_prefix = \"/\"",
            "path_prefix = \"/\"\n[routes.idempotency]\nenable = true",
            "10:1: unknown field `enable`",
        ),
        ("[server]", "[server\n", "1:8:"),
        (
            "[upstreams.app]",
            "[store]\nkind = \"redis\"\nurl = \"redis://x\"\nmax_bytes = \"1MiB\"\n[upstreams.app]",
            "7:13: store.max_bytes is only used by kind = \"memory\"",
        ),
        (
            "[upstreams.app]",
            "[store]\nkind = \"memory\"\nmax_bytes = \"1MiB\"\nmax_bytes_per_tenant = \"2MiB\"\n[upstreams.app]",
            "7:24: store.max_bytes_per_tenant cannot be above store.max_bytes",
        ),
        (
            "[upstreams.app]",
            "[store]\nkind = \"redis\"\nurl = \"redis://x\"\ncluster_nodes = [\"redis://y\"]\n[upstreams.app]",
            "6:7: give either store.url (one Redis server) or store.cluster_nodes",
        ),
        (
            "[upstreams.app]",
            "[store]\nkind = \"redis\"\ncluster_nodes = [\"redis://y\", \"http://z\"]\n[upstreams.app]",
            "6:31: a cluster node must start with redis://",
        ),
        (
            "path_prefix = \"/\"",
            "path_prefix = \"/\"\n[routes.idempotency]\nenabled = true\nlapsed_lease = \"maybe\"",
            "11:16: unknown variant `maybe`, expected `lock` or `rerun`",
        ),
    ];
    run_cases(cases);
    let missing = PathBuf::from("/nonexistent/keel.toml");
    let (code, stderr) = check(&missing);
    assert_eq!(code, Some(2));
    assert!(
        stderr.starts_with("/nonexistent/keel.toml:1:1: cannot read"),
        "{stderr}"
    );
}

/// Each case edits `BASE` (first match of `from` becomes `to`), and
/// `keel check` must exit 2 with stderr starting `FILE:` + `expected`.
fn run_cases(cases: &[(&str, &str, &str)]) {
    for (from, to, expected) in cases {
        let text = BASE.replacen(from, to, 1);
        assert_ne!(text, BASE, "case {expected} did not apply");
        let path = common::temp_file("broken.toml", &text);
        let (code, stderr) = check(&path);
        assert_eq!(code, Some(2), "{expected}: {stderr}");
        let want = format!("{}:{expected}", path.display());
        assert!(
            stderr.starts_with(&want),
            "want {want:?}\ngot  {stderr:?}\n---\n{text}"
        );
    }
}

/// Values `keel check` used to pass although `serve` then failed or
/// misbehaved with them: each must fail at its own key.
#[test]
fn values_serve_cannot_run_with_fail_at_their_key() {
    run_cases(&[
        // Serve tried to allocate ~24 GB of thread stacks and was killed.
        (
            "[server]",
            "[server]\nworkers = 100000000",
            "2:11: server.workers = 100000000 is too many; use at most 1024, or 0 for one per core",
        ),
        // Every request was closed unanswered.
        (
            "[server]",
            "[server]\nidle_timeout = \"0s\"",
            "2:16: server.idle_timeout must be above zero",
        ),
        // The admin server could not bind.
        (
            "[server]",
            "[server]\nadmin_listen = \"127.0.0.1:8080\"",
            "2:16: admin_listen \"127.0.0.1:8080\" takes the same port as listen \"127.0.0.1:8080\"; give the admin API a port of its own",
        ),
        (
            "listen = \"127.0.0.1:8080\"",
            "listen = \"0.0.0.0:8080\"\nadmin_listen = \"127.0.0.1:8080\"",
            "3:16: admin_listen \"127.0.0.1:8080\" takes the same port as listen \"0.0.0.0:8080\"",
        ),
        // The store never opened: every keyed request got 503.
        (
            "[upstreams.app]",
            "[store]\nkind = \"redis\"\nurl = \"redis://:pw@[::1\"\n[upstreams.app]",
            "6:7: store.url is not a Redis URL the store can open (Redis URL did not parse); write \"redis://[:PASSWORD@]HOST:PORT/[DB]\"",
        ),
        (
            "[upstreams.app]",
            "[store]\nkind = \"postgres\"\nurl = \"postgres://u@h:notaport/db\"\n[upstreams.app]",
            "6:7: store.url is not a PostgreSQL URL the store can open (invalid connection string: invalid value for option `port`); write \"postgres://",
        ),
        (
            "[upstreams.app]",
            "[store]\nkind = \"redis\"\nurl = \"redis://h/\"\ntimeout = \"0s\"\n[upstreams.app]",
            "7:11: store.timeout must be above zero",
        ),
        // A token no client sends.
        (
            "[[routes]]",
            "[[routes]]\nmethods = [\"GET\", \"POTS\"]",
            "8:19: \"POTS\" is not an HTTP method; use one of GET, HEAD, POST, PUT, DELETE, CONNECT, OPTIONS, TRACE, PATCH",
        ),
        // Strict duration syntax.
        (
            "[server]",
            "[server]\nidle_timeout = \"30 s\"",
            "2:16: \"30 s\": no spaces allowed; write \"30s\"",
        ),
        (
            "[server]",
            "[server]\nidle_timeout = \"400d\"",
            "2:16: \"400d\": too large; a duration is at most 365d",
        ),
        // A bare number: one "expected", and what to write.
        (
            "endpoints = [\"http://127.0.0.1:3000\"]",
            "endpoints = [\"http://127.0.0.1:3000\"]\nrequest_timeout = 30",
            "6:19: expected a duration such as \"30s\", found the number 30; write it as a string with a unit, such as \"30s\"",
        ),
        (
            "endpoints = [\"http://127.0.0.1:3000\"]",
            "endpoints = [\"http://127.0.0.1:3000\"]\nconnect_timeout = \"0s\"",
            "6:19: upstreams.app.connect_timeout must be above zero",
        ),
        // These used to point at 1:1.
        (
            "[[routes]]",
            "[drain]\nstrategy = \"percent\"\npercent = 0.0\n[[routes]]",
            "9:11: drain.percent must be above 0 and at most 100",
        ),
        (
            "upstream = \"app\"",
            "upstream = \"app\"\n[routes.idempotency]\nenabled = true\nttl = \"0s\"",
            "12:7: routes.idempotency.ttl must be above zero",
        ),
        (
            "upstream = \"app\"",
            "upstream = \"app\"\n[routes.idempotency]\nenabled = true\nlease = \"0s\"",
            "12:9: routes.idempotency.lease must be above zero",
        ),
        (
            "[server]",
            "[server]\nmax_header_size = \"0B\"",
            "2:19: server.max_header_size must be between 1KiB and 1MiB",
        ),
        (
            "[[routes]]",
            "[drain]\nshutdown_delay = \"30s\"\ndeadline = \"10s\"\n[[routes]]",
            "9:12: drain.shutdown_delay must be shorter than drain.deadline",
        ),
        (
            "[[routes]]",
            "[drain]\nshutdown_delay = \"40s\"\n[[routes]]",
            "8:18: drain.shutdown_delay must be shorter than drain.deadline",
        ),
        (
            "endpoints = [\"http://127.0.0.1:3000\"]",
            "endpoints = [\"http://127.0.0.1:3000\"]\n[upstreams.app.breaker]\nwindow = \"0s\"",
            "7:10: upstreams.app.breaker.window must be above zero",
        ),
    ]);
}

#[test]
fn a_buffer_budget_below_a_keyed_body_limit_is_refused() {
    let text = BASE
        .replacen(
            "listen = \"127.0.0.1:8080\"",
            "listen = \"127.0.0.1:8080\"\nbuffer_budget = \"64KiB\"",
            1,
        )
        .replacen(
            "upstream = \"app\"",
            "upstream = \"app\"\n[routes.idempotency]\nenabled = true",
            1,
        );
    let path = common::temp_file("budget.toml", &text);
    let (code, stderr) = check(&path);
    assert_eq!(code, Some(2), "{stderr}");
    let want = format!(
        "{}:3:17: server.buffer_budget (65536 bytes) must be above the largest idempotent route's max_body (1048576 bytes)",
        path.display()
    );
    assert!(stderr.starts_with(&want), "want {want:?}\ngot  {stderr:?}");
}

#[test]
fn serve_with_a_broken_config_exits_2() {
    let path = common::temp_file("broken.toml", "[server]\nlisten = 5\n");
    let output = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .expect("run keel serve");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.starts_with(&format!("{}:2:10:", path.display())),
        "{stderr}"
    );
}
