//! The differential test against real Erlang/OTP (issue 14).
//!
//! Every scenario in `tests/otp/scenarios/*.toml` (a tree, a script of
//! crashes, exits, stops and control calls) runs twice: on OTP's own
//! `supervisor` through `tests/otp/runner.erl` (real time, scripted waits),
//! and on keel-supervisor's public API here (tokio's paused clock). Both
//! print the same canonical trace; the traces must be equal, except for
//! the lines a scenario lists as a deliberate difference, each with its
//! reason (and each of which must actually occur, so a difference that
//! went away is noticed).
//!
//! Needs `escript` (OTP 25's `erlang-base`). Missing, the test fails under
//! `CI=true` and otherwise says it skipped and why.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use keel_supervisor::{
    AutoShutdown, ChildError, ChildSpec, ControlError, Event, EventKind, ExitReason, Restart,
    Shutdown, StartError, Strategy, Supervisor, SupervisorControl, SupervisorHandle,
};
use serde::Deserialize;
use tokio::sync::{broadcast, mpsc};

// ---------------------------------------------------------------------------
// Scenario files.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Scenario {
    /// What the scenario shows (for the reader and the docs).
    #[allow(dead_code)]
    description: String,
    /// One step a line: `wait MS`, `crash|normal|shutdown PATH`,
    /// `terminate_child|restart_child|delete_child|start_child SUP NAME`,
    /// `stop`. Every step but `wait` is followed by 100 ms of settling.
    script: Vec<String>,
    tree: Node,
    /// Deliberate differences: where OTP's trace has line `otp`, Keel's
    /// has `keel`.
    #[serde(default)]
    difference: Vec<Difference>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Difference {
    otp: String,
    keel: String,
    /// Only this occurrence of `otp` (1 = the first); every one if absent.
    occurrence: Option<usize>,
    #[allow(dead_code)]
    why: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Node {
    name: String,
    #[serde(default)]
    restart: RestartType,
    /// Milliseconds, `"brutal_kill"` or `"infinity"`; OTP's defaults
    /// (5000 for a worker, infinity for a supervisor) when absent.
    shutdown: Option<toml::Value>,
    #[serde(default)]
    significant: bool,
    /// A worker that ignores the request to stop (killed at its timeout).
    #[serde(default)]
    stubborn: bool,
    /// Which of the worker's starts (1 = the first) fail.
    #[serde(default)]
    fail_starts: Vec<u32>,
    /// How long the worker's initialisation takes, in milliseconds.
    #[serde(default)]
    init_ms: u64,
    /// Present for a supervisor: `one_for_one`, `one_for_all`,
    /// `rest_for_one` or `dynamic` (OTP's `simple_one_for_one`).
    strategy: Option<String>,
    intensity: Option<u32>,
    /// In whole seconds, OTP's unit.
    period: Option<u64>,
    #[serde(default = "never")]
    auto_shutdown: String,
    #[serde(default)]
    children: Vec<Node>,
    /// A dynamic supervisor's child template (`start_child SUP NAME`).
    template: Option<Box<Node>>,
}

fn never() -> String {
    "never".to_string()
}

#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
enum RestartType {
    #[default]
    Permanent,
    Transient,
    Temporary,
}

impl Node {
    fn is_sup(&self) -> bool {
        self.strategy.is_some()
    }

    fn restart(&self) -> Restart {
        match self.restart {
            RestartType::Permanent => Restart::Permanent,
            RestartType::Transient => Restart::Transient,
            RestartType::Temporary => Restart::Temporary,
        }
    }

    fn shutdown(&self) -> Shutdown {
        match &self.shutdown {
            None if self.is_sup() => Shutdown::Infinity,
            None => Shutdown::Timeout(Duration::from_millis(5000)),
            Some(toml::Value::Integer(ms)) => {
                Shutdown::Timeout(Duration::from_millis(u64::try_from(*ms).expect("ms")))
            }
            Some(toml::Value::String(s)) if s == "brutal_kill" => Shutdown::Brutal,
            Some(toml::Value::String(s)) if s == "infinity" => Shutdown::Infinity,
            Some(v) => panic!("{}: bad shutdown {v:?}", self.name),
        }
    }

    fn strategy(&self) -> Strategy {
        match self.strategy.as_deref() {
            Some("one_for_one") => Strategy::OneForOne,
            Some("one_for_all") => Strategy::OneForAll,
            Some("rest_for_one") => Strategy::RestForOne,
            Some("dynamic") => Strategy::Dynamic { max_children: None },
            other => panic!("{}: bad strategy {other:?}", self.name),
        }
    }

    fn auto_shutdown(&self) -> AutoShutdown {
        match self.auto_shutdown.as_str() {
            "never" => AutoShutdown::Never,
            "any_significant" => AutoShutdown::AnySignificant,
            "all_significant" => AutoShutdown::AllSignificant,
            other => panic!("{}: bad auto_shutdown {other}", self.name),
        }
    }

    fn intensity(&self) -> (u32, u64) {
        let i = self.intensity.expect("a supervisor's intensity");
        let p = self.period.expect("a supervisor's period");
        (i, p)
    }

    /// The node as an Erlang map for the runner.
    fn to_erlang(&self) -> String {
        let restart = match self.restart {
            RestartType::Permanent => "permanent",
            RestartType::Transient => "transient",
            RestartType::Temporary => "temporary",
        };
        let shutdown = match self.shutdown() {
            Shutdown::Brutal => "brutal_kill".to_string(),
            Shutdown::Infinity => "infinity".to_string(),
            Shutdown::Timeout(d) => d.as_millis().to_string(),
        };
        let mut fields = vec![
            format!("name => {}", erl_string(&self.name)),
            format!("restart => {restart}"),
            format!("shutdown => {shutdown}"),
            format!("significant => {}", self.significant),
        ];
        if self.is_sup() {
            let (intensity, period) = self.intensity();
            fields.push("kind => sup".into());
            fields.push(format!(
                "strategy => {}",
                self.strategy.as_deref().unwrap_or_default()
            ));
            fields.push(format!("intensity => {intensity}"));
            fields.push(format!("period => {period}"));
            fields.push(format!("auto_shutdown => {}", self.auto_shutdown));
            let children: Vec<String> = self.children.iter().map(Node::to_erlang).collect();
            fields.push(format!("children => [{}]", children.join(", ")));
            if let Some(t) = &self.template {
                fields.push(format!("template => {}", t.to_erlang()));
            }
        } else {
            fields.push("kind => worker".into());
            fields.push(format!("stubborn => {}", self.stubborn));
            let fails: Vec<String> = self.fail_starts.iter().map(u32::to_string).collect();
            fields.push(format!("fail_starts => [{}]", fails.join(", ")));
            fields.push(format!("init_ms => {}", self.init_ms));
        }
        format!("#{{{}}}", fields.join(", "))
    }
}

fn erl_string(s: &str) -> String {
    assert!(
        s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
        "names are plain: {s}"
    );
    format!("\"{s}\"")
}

fn scenario_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/otp/scenarios")
}

fn load_scenarios() -> Vec<(String, Scenario)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(scenario_dir())
        .expect("scenario dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let name = p
                .file_stem()
                .and_then(|s| s.to_str())
                .expect("file name")
                .to_string();
            let text = std::fs::read_to_string(&p).expect("read scenario");
            let scenario: Scenario =
                toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (name, scenario)
        })
        .collect()
}

// ---------------------------------------------------------------------------
// The OTP side.

/// Runs every scenario on OTP at once; `None` (with why) if Erlang is
/// missing.
fn run_otp(scenarios: &[(String, Scenario)]) -> Result<HashMap<String, Vec<String>>, String> {
    let escript = std::env::var_os("KEEL_ESCRIPT").unwrap_or_else(|| "escript".into());
    let terms: String = scenarios
        .iter()
        .map(|(name, s)| {
            let script: Vec<String> = s.script.iter().map(|l| format!("{l:?}")).collect();
            format!(
                "#{{name => {}, script => [{}], tree => {}}}.\n",
                erl_string(name),
                script.join(", "),
                s.tree.to_erlang()
            )
        })
        .collect();
    let dir = std::env::temp_dir().join(format!("keel-otp-diff-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("scenarios.terms");
    std::fs::write(&file, terms).expect("write terms");
    let runner = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/otp/runner.erl");
    let out = Command::new(&escript).arg(&runner).arg(&file).output();
    let _ = std::fs::remove_dir_all(&dir);
    let out = out.map_err(|e| format!("cannot run {}: {e}", escript.to_string_lossy()))?;
    assert!(
        out.status.success(),
        "the OTP runner failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut traces = HashMap::new();
    let mut current: Option<(String, Vec<String>)> = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(name) = line.strip_prefix("=== ") {
            traces.extend(current.take());
            current = Some((name.to_string(), Vec::new()));
        } else if let Some((_, lines)) = current.as_mut() {
            lines.push(line.to_string());
        }
    }
    traces.extend(current.take());
    Ok(traces)
}

// ---------------------------------------------------------------------------
// The Keel side.

#[derive(Debug)]
enum Cmd {
    Crash,
    Normal,
    Shutdown,
}

/// One scenario's shared state: the trace, and what the script needs to
/// reach the children.
#[derive(Default)]
struct World {
    log: Mutex<Vec<String>>,
    events: Mutex<Option<broadcast::Receiver<Event>>>,
    /// Paths of supervisors: their starts and exits are read from the
    /// lifecycle events (a supervisor's body is not ours to instrument).
    supervisors: Mutex<HashSet<String>>,
    starts: Mutex<HashMap<String, u32>>,
    workers: Mutex<HashMap<String, mpsc::UnboundedSender<Cmd>>>,
    controls: Mutex<HashMap<String, SupervisorControl>>,
    templates: Mutex<HashMap<String, Node>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn class(reason: &ExitReason) -> &'static str {
    match reason {
        ExitReason::Normal => "normal",
        ExitReason::Shutdown => "shutdown",
        ExitReason::Killed => "killed",
        ExitReason::Error(_) | ExitReason::Panic(_) => "crash",
        // ExitReason is non_exhaustive: a reason added later needs its
        // OTP counterpart here before the comparison means anything.
        other => panic!("no OTP class for {other:?}"),
    }
}

impl World {
    /// Appends `line`, after the supervisor events emitted before it (so
    /// they keep their causal place: an event is emitted synchronously by
    /// the supervisor that acts, before whatever its action causes).
    fn log(&self, line: impl Into<String>) {
        let mut log = lock(&self.log);
        self.drain(&mut log);
        log.push(line.into());
    }

    fn drain(&self, log: &mut Vec<String>) {
        let mut events = lock(&self.events);
        let Some(events) = events.as_mut() else {
            return;
        };
        let supervisors = lock(&self.supervisors);
        loop {
            match events.try_recv() {
                Ok(e) if supervisors.contains(&*e.path) => match e.kind {
                    EventKind::Started => log.push(format!("start {}", e.path)),
                    EventKind::Exited { reason } | EventKind::StartFailed { reason } => {
                        log.push(format!("exit {} {}", e.path, class(&reason)));
                    }
                    _ => {}
                },
                Ok(_) => {}
                Err(
                    broadcast::error::TryRecvError::Empty | broadcast::error::TryRecvError::Closed,
                ) => {
                    return;
                }
                Err(e) => panic!("events: {e}"),
            }
        }
    }

    fn lines(&self) -> Vec<String> {
        let mut log = lock(&self.log);
        self.drain(&mut log);
        log.clone()
    }
}

/// Logs `exit PATH killed` unless disarmed: a worker aborted by its
/// supervisor is dropped without returning.
struct KilledGuard {
    world: Arc<World>,
    path: String,
    armed: bool,
}

impl KilledGuard {
    fn exit(mut self, class: &str) {
        self.armed = false;
        self.world.log(format!("exit {} {class}", self.path));
    }
}

impl Drop for KilledGuard {
    fn drop(&mut self) {
        if self.armed {
            self.world.log(format!("exit {} killed", self.path));
        }
    }
}

fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}/{name}")
    }
}

fn worker(world: &Arc<World>, parent: &str, node: &Node) -> ChildSpec {
    let path = join(parent, &node.name);
    let world = world.clone();
    let (stubborn, fail_starts) = (node.stubborn, node.fail_starts.clone());
    let init = Duration::from_millis(node.init_ms);
    ChildSpec::new(node.name.clone(), move |ctx| {
        let (world, path, fail_starts) = (world.clone(), path.clone(), fail_starts.clone());
        async move {
            let n = {
                let mut starts = lock(&world.starts);
                let n = starts.entry(path.clone()).or_default();
                *n += 1;
                *n
            };
            world.log(format!("start {path}"));
            let guard = KilledGuard {
                world: world.clone(),
                path: path.clone(),
                armed: true,
            };
            if fail_starts.contains(&n) {
                guard.exit("crash");
                return Err(ChildError::msg("scripted start failure"));
            }
            let (tx, mut rx) = mpsc::unbounded_channel();
            // Kept so that the channel never closes while this runs.
            let _tx = tx.clone();
            lock(&world.workers).insert(path.clone(), tx);
            tokio::time::sleep(init).await;
            ctx.ready();
            let stop = async {
                if stubborn {
                    std::future::pending::<()>().await;
                }
                ctx.cancelled().await;
            };
            tokio::select! {
                () = stop => {
                    guard.exit("shutdown");
                    Ok(())
                }
                cmd = rx.recv() => match cmd {
                    Some(Cmd::Crash) | None => {
                        guard.exit("crash");
                        Err(ChildError::msg("scripted crash"))
                    }
                    Some(Cmd::Normal) => {
                        guard.exit("normal");
                        Ok(())
                    }
                    Some(Cmd::Shutdown) => {
                        guard.exit("shutdown");
                        Err(ChildError::shutdown())
                    }
                },
            }
        }
    })
    .restart(node.restart())
    .shutdown(node.shutdown())
    .significant(node.significant)
}

fn supervisor(world: &Arc<World>, parent: &str, node: &Node) -> Supervisor {
    let path = join(parent, &node.name);
    lock(&world.supervisors).insert(path.clone());
    let (intensity, period) = node.intensity();
    let mut builder = Supervisor::builder(node.name.clone())
        .strategy(node.strategy())
        .intensity(intensity, Duration::from_secs(period))
        .auto_shutdown(node.auto_shutdown());
    for child in &node.children {
        builder = builder.child(child_spec(world, &path, child));
    }
    if let Some(t) = &node.template {
        lock(&world.templates).insert(path.clone(), (**t).clone());
    }
    let sup = builder.build().expect("a valid tree");
    lock(&world.controls).insert(path, sup.control());
    sup
}

fn child_spec(world: &Arc<World>, parent: &str, node: &Node) -> ChildSpec {
    if node.is_sup() {
        ChildSpec::from(supervisor(world, parent, node))
            .restart(node.restart())
            .shutdown(node.shutdown())
            .significant(node.significant)
    } else {
        worker(world, parent, node)
    }
}

fn control_result(r: Result<(), ControlError>) -> String {
    match r {
        Ok(()) => "ok".into(),
        Err(ControlError::NotFound { .. }) => "error not_found".into(),
        Err(ControlError::Running(_)) => "error running".into(),
        Err(ControlError::Restarting(_)) => "error restarting".into(),
        Err(ControlError::Dynamic(_)) => "error dynamic".into(),
        Err(ControlError::StartFailed { .. }) => "error start_failed".into(),
        Err(ControlError::NotRunning(_)) => "error not_running".into(),
        // ControlError is non_exhaustive: a new error needs its OTP
        // counterpart here.
        Err(other) => panic!("no OTP counterpart for {other:?}"),
    }
}

fn start_result(r: Result<(), StartError>) -> String {
    match r {
        Ok(()) => "ok".into(),
        Err(StartError::NotRunning(_)) => "error not_running".into(),
        Err(e) => {
            assert!(matches!(e, StartError::ChildFailed { .. }), "{e}");
            "error start_failed".into()
        }
    }
}

const SETTLE: Duration = Duration::from_millis(100);

async fn run_keel(scenario: &Scenario) -> Vec<String> {
    let world = Arc::new(World::default());
    let root = supervisor(&world, "", &scenario.tree);
    *lock(&world.events) = Some(root.events());
    let probe = root.probe();
    let root_path = scenario.tree.name.clone();
    // The root's own start, as OTP's root logs it in its init.
    lock(&world.supervisors).remove(&root_path);
    world.log(format!("start {root_path}"));
    let handle = match root.start().await {
        Ok(handle) => Arc::new(handle),
        Err(_) => {
            let last = probe.snapshot().last_exit.unwrap_or_default();
            let class = match last.as_str() {
                "normal" => "normal",
                "shutdown" => "shutdown",
                "killed" => "killed",
                _ => "crash",
            };
            world.log(format!("exit {root_path} {class}"));
            world.log("start_link error");
            return world.lines();
        }
    };
    world.log("start_link ok");
    let waiter = {
        let (handle, world, root_path) = (handle.clone(), world.clone(), root_path.clone());
        tokio::spawn(async move {
            let reason = handle.wait().await;
            world.log(format!("exit {root_path} {}", class(&reason)));
        })
    };
    for step in &scenario.script {
        let words: Vec<&str> = step.split(' ').collect();
        match words.as_slice() {
            ["wait", ms] => {
                tokio::time::sleep(Duration::from_millis(ms.parse().expect("ms"))).await;
                continue;
            }
            ["stop"] => {
                stop(&world, &handle).await;
            }
            [action @ ("crash" | "normal" | "shutdown"), path] => {
                let cmd = match *action {
                    "crash" => Cmd::Crash,
                    "normal" => Cmd::Normal,
                    _ => Cmd::Shutdown,
                };
                if let Some(tx) = lock(&world.workers).get(*path) {
                    let _ = tx.send(cmd);
                }
            }
            [op, sup, name] => {
                let control = lock(&world.controls)
                    .get(*sup)
                    .cloned()
                    .unwrap_or_else(|| panic!("no supervisor {sup}"));
                let result = match *op {
                    "terminate_child" => control_result(control.terminate_child(name).await),
                    "restart_child" => control_result(control.restart_child(name).await),
                    "delete_child" => control_result(control.delete_child(name).await),
                    "start_child" => {
                        let mut node = lock(&world.templates)
                            .get(*sup)
                            .cloned()
                            .unwrap_or_else(|| panic!("{sup} has no template"));
                        node.name = name.to_string();
                        start_result(control.start_child(worker(&world, sup, &node)).await)
                    }
                    other => panic!("unknown step {other}"),
                };
                world.log(format!("ctl {op} {sup}/{name} {result}"));
            }
            _ => panic!("bad step {step:?}"),
        }
        tokio::time::sleep(SETTLE).await;
    }
    stop(&world, &handle).await;
    waiter.await.expect("root waiter");
    world.lines()
}

/// Stops the root if it still runs, after a `stop` line that tells the
/// exits it causes from those of an escalation.
async fn stop(world: &World, handle: &SupervisorHandle) {
    if handle.exit_reason().is_none() {
        world.log("stop");
        handle.shutdown().await;
    }
}

fn run_keel_scenario(scenario: &Scenario) -> Vec<String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime")
        .block_on(run_keel(scenario))
}

// ---------------------------------------------------------------------------
// The comparison.

/// OTP's trace with the scenario's deliberate differences applied; an
/// error if a difference does not occur.
fn expected_keel(otp: &[String], scenario: &Scenario) -> Result<Vec<String>, String> {
    let mut expected = otp.to_vec();
    for d in &scenario.difference {
        let mut hits = 0;
        let mut seen = 0;
        for line in &mut expected {
            if *line == d.otp {
                seen += 1;
                if d.occurrence.is_none_or(|n| n == seen) {
                    *line = d.keel.clone();
                    hits += 1;
                }
            }
        }
        if hits == 0 {
            return Err(format!(
                "the documented difference {:?} -> {:?} does not occur in OTP's trace",
                d.otp, d.keel
            ));
        }
    }
    Ok(expected)
}

fn side_by_side(otp: &[String], keel: &[String]) -> String {
    let n = otp.len().max(keel.len());
    (0..n)
        .map(|i| {
            let o = otp.get(i).map_or("", String::as_str);
            let k = keel.get(i).map_or("", String::as_str);
            let mark = if o == k { " " } else { "≠" };
            format!("  {mark} {o:<40} | {k}\n")
        })
        .collect()
}

/// Writes to the real stderr, past the test harness's capture, so that a
/// skip is seen even when the test passes.
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

#[test]
fn keel_matches_otp_on_every_scenario() {
    let scenarios = load_scenarios();
    assert!(scenarios.len() >= 15, "{} scenarios", scenarios.len());
    let started = Instant::now();
    let otp = match run_otp(&scenarios) {
        Ok(traces) => traces,
        Err(why) => {
            let ci = std::env::var("CI").is_ok_and(|v| v == "true");
            assert!(
                !ci,
                "CI=true and Erlang/OTP cannot be run: {why} (install erlang-base)"
            );
            say(&format!(
                "SKIPPED keel_matches_otp_on_every_scenario: Erlang/OTP cannot be run ({why}); \
                 install erlang-base (escript) to compare with OTP"
            ));
            return;
        }
    };
    let otp_time = started.elapsed();
    let mut failures = Vec::new();
    for (name, scenario) in &scenarios {
        let otp = otp
            .get(name)
            .unwrap_or_else(|| panic!("no OTP trace for {name}"));
        assert!(
            otp.iter().any(|l| l.starts_with("start_link")),
            "{name}: OTP's trace is incomplete: {otp:?}"
        );
        let keel = run_keel_scenario(scenario);
        if std::env::var_os("KEEL_OTP_TRACES").is_some() {
            eprintln!("=== {name}\n{}", side_by_side(otp, &keel));
        }
        match expected_keel(otp, scenario) {
            Err(e) => failures.push(format!("{name}: {e}\n{}", side_by_side(otp, &keel))),
            Ok(expected) if expected != keel => failures.push(format!(
                "{name}: traces differ (OTP{} | Keel)\n{}",
                if scenario.difference.is_empty() {
                    ""
                } else {
                    " with documented differences applied"
                },
                side_by_side(&expected, &keel)
            )),
            Ok(_) => {}
        }
    }
    say(&format!(
        "{} scenarios compared with OTP (OTP runner {:.1} s, total {:.1} s)",
        scenarios.len(),
        otp_time.as_secs_f64(),
        started.elapsed().as_secs_f64()
    ));
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}
