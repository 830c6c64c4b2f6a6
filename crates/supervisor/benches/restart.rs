//! Restart latency and memory per child, keel-supervisor beside
//! task-supervisor, in one run.
//!
//! Restart latency: a child that crashes as soon as it is up; the time from
//! the moment it returns its error to the moment its replacement is running
//! again (for keel: has called `ready()`), over many restarts, on a
//! current-thread runtime (one core). Memory: RSS growth for 10,000 idle
//! supervised children, divided by 10,000.
//!
//! Run: `cargo bench -p keel-supervisor --bench restart`
//! (pin it for steadier numbers: `taskset -c 0 cargo bench ...`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_supervisor::{ChildError, ChildSpec, Strategy, Supervisor};
use task_supervisor::{CancellationToken, SupervisedTask, SupervisorBuilder, TaskResult};
use tokio::sync::mpsc;

const RESTARTS: usize = 20_000;
const CHILDREN: usize = 10_000;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Shared between runs of the crashing child: when the last run crashed.
#[derive(Clone)]
struct Probe {
    crashed_at: Arc<Mutex<Option<Instant>>>,
    samples: mpsc::UnboundedSender<Duration>,
}

impl Probe {
    fn up(&self) {
        if let Some(t) = self.crashed_at.lock().expect("lock").take() {
            let _ = self.samples.send(t.elapsed());
        }
    }

    fn crash(&self) {
        *self.crashed_at.lock().expect("lock") = Some(Instant::now());
    }
}

fn probe() -> (Probe, mpsc::UnboundedReceiver<Duration>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (
        Probe {
            crashed_at: Arc::default(),
            samples: tx,
        },
        rx,
    )
}

async fn collect(rx: &mut mpsc::UnboundedReceiver<Duration>) -> Vec<Duration> {
    let mut out = Vec::with_capacity(RESTARTS);
    while out.len() < RESTARTS {
        match rx.recv().await {
            Some(d) => out.push(d),
            None => break,
        }
    }
    out
}

fn keel_restart_latency() -> Vec<Duration> {
    rt().block_on(async {
        let (p, mut rx) = probe();
        let child = ChildSpec::new("crasher", move |ctx| {
            let p = p.clone();
            async move {
                ctx.ready();
                p.up();
                tokio::task::yield_now().await;
                p.crash();
                Err(ChildError::msg("crash"))
            }
        });
        let sup = Supervisor::builder("bench")
            .intensity(u32::MAX, Duration::from_secs(1))
            .child(child)
            .build()
            .expect("spec");
        let handle = sup.start().await.expect("start");
        let samples = collect(&mut rx).await;
        handle.abort();
        samples
    })
}

#[derive(Clone)]
struct TsCrasher(Probe);

impl SupervisedTask for TsCrasher {
    async fn run(self, _cancel: CancellationToken) -> TaskResult {
        self.0.up();
        tokio::task::yield_now().await;
        self.0.crash();
        Err("crash".into())
    }
}

fn task_supervisor_restart_latency() -> Vec<Duration> {
    rt().block_on(async {
        let (p, mut rx) = probe();
        let handle = SupervisorBuilder::new()
            .with_task("crasher", TsCrasher(p))
            .with_unlimited_restarts()
            .with_base_restart_delay(Duration::ZERO)
            .with_max_restart_delay(Duration::ZERO)
            .with_restart_jitter(0.0)
            .spawn();
        let samples = collect(&mut rx).await;
        let _ = handle.shutdown().await;
        samples
    })
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn keel_memory_per_child() -> f64 {
    rt().block_on(async {
        let sup = Supervisor::builder("mem")
            .strategy(Strategy::Dynamic { max_children: None })
            .build()
            .expect("spec");
        let control = sup.control();
        let handle = sup.start().await.expect("start");
        let before = rss_kib();
        for i in 0..CHILDREN {
            let spec = ChildSpec::new(format!("c{i}"), |ctx| async move {
                ctx.ready();
                ctx.cancelled().await;
                Ok(())
            });
            control.start_child(spec).await.expect("child");
        }
        let after = rss_kib();
        handle.abort();
        (after.saturating_sub(before) * 1024) as f64 / CHILDREN as f64
    })
}

#[derive(Clone)]
struct TsIdle(Arc<std::sync::atomic::AtomicUsize>);

impl SupervisedTask for TsIdle {
    async fn run(self, cancel: CancellationToken) -> TaskResult {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        cancel.cancelled().await;
        Ok(())
    }
}

fn task_supervisor_memory_per_child() -> f64 {
    rt().block_on(async {
        let before = rss_kib();
        let running = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let builder = (0..CHILDREN).fold(SupervisorBuilder::new(), |b, i| {
            b.with_task(&format!("c{i}"), TsIdle(running.clone()))
        });
        let handle = builder.spawn();
        // Wait (bounded) until every task runs.
        for _ in 0..1000 {
            if running.load(std::sync::atomic::Ordering::SeqCst) == CHILDREN {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(running.load(std::sync::atomic::Ordering::SeqCst), CHILDREN);
        let after = rss_kib();
        let _ = handle.shutdown().await;
        (after.saturating_sub(before) * 1024) as f64 / CHILDREN as f64
    })
}

fn stats(mut v: Vec<Duration>) -> (Duration, Duration, usize) {
    v.sort();
    let n = v.len();
    if n == 0 {
        return (Duration::ZERO, Duration::ZERO, 0);
    }
    (v[n / 2], v[(n * 99) / 100], n)
}

/// Measures memory in a fresh process, so that memory freed by an earlier
/// measurement cannot hide the growth of a later one.
fn in_child_process(which: &str) -> f64 {
    let exe = std::env::current_exe().expect("own path");
    let out = std::process::Command::new(exe)
        .arg(format!("--memory={which}"))
        .output()
        .expect("run the memory measurement");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(f64::NAN)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo test --benches` runs this with `--test`-like args; keep it cheap then.
    if args.iter().any(|a| a == "--test" || a == "--list") {
        return;
    }
    if let Some(which) = args.iter().find_map(|a| a.strip_prefix("--memory=")) {
        let bytes = match which {
            "keel" => keel_memory_per_child(),
            _ => task_supervisor_memory_per_child(),
        };
        println!("{bytes}");
        return;
    }
    let km = in_child_process("keel");
    let tm = in_child_process("task-supervisor");
    let (k50, k99, kn) = stats(keel_restart_latency());
    let (t50, t99, tn) = stats(task_supervisor_restart_latency());
    println!("| crate | restarts | median crash-to-running | p99 | RSS per idle child |");
    println!("| --- | --- | --- | --- | --- |");
    println!("| keel-supervisor | {kn} | {k50:.2?} | {k99:.2?} | {km:.0} B |");
    println!("| task-supervisor 0.5 | {tn} | {t50:.2?} | {t99:.2?} | {tm:.0} B |");
}
