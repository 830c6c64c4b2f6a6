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
    for name in [
        "keel-embedded.toml",
        "keel-redis.toml",
        "keel-postgres.toml",
    ] {
        let (code, stderr) = check(&examples.join(name));
        assert_eq!(code, Some(0), "{name}: {stderr}");
    }
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
            "2:16: \"10 sec\": unknown unit",
        ),
        (
            "[server]",
            "[server]\nmax_body_size = \"1 PB\"",
            "2:17: \"1 PB\": unknown unit",
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
    let missing = PathBuf::from("/nonexistent/keel.toml");
    let (code, stderr) = check(&missing);
    assert_eq!(code, Some(2));
    assert!(
        stderr.starts_with("/nonexistent/keel.toml:1:1: cannot read"),
        "{stderr}"
    );
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
