//! Throwaway Redis servers for tests: a [`Cluster`] of three primaries (no
//! replicas), or a single [`Server`] a test may reconfigure or kill, on
//! free loopback ports, in a temporary directory, as child processes that
//! are killed when dropped (a failing test included). The shared Redis of
//! the other tests is never touched.
//!
//! Needs `redis-server` and `redis-cli` (5.0 or later, for
//! `redis-cli --cluster create`) on the `PATH`. When they are missing,
//! [`Cluster::start`] and [`Server::start`] return `None` after printing
//! why, so the test skips; under `CI=true` they panic instead, since CI
//! must run them.
//!
//! Every wait polls with a deadline: nothing sleeps a fixed time in the
//! hope that the cluster is ready.
//!
//! ```no_run
//! use keel_testkit::redis_server::{Cluster, Server};
//!
//! let Some(cluster) = Cluster::start() else { return }; // skipped: no Redis here
//! let seeds: Vec<String> = cluster.urls(); // one redis:// URL per primary
//! assert_eq!(seeds.len(), 3);
//! let Some(server) = Server::start() else { return };
//! assert_eq!(server.cli(&["PING"]).trim(), "PONG");
//! ```

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long a node gets to start, and the cluster to agree on its slots.
const READY_WITHIN: Duration = Duration::from_secs(30);
/// A node's cluster bus listens on its port plus this.
const BUS_OFFSET: u16 = 10_000;
/// Attempts at finding ports and starting nodes on them: a port found free
/// may be taken by someone else before the node binds it.
const START_ATTEMPTS: usize = 5;

/// One running node.
struct Node {
    port: u16,
    child: Child,
    killed: bool,
}

/// A running three-primary cluster; stops (nodes killed, files removed)
/// when dropped.
pub struct Cluster {
    nodes: Vec<Node>,
    // Removed once `drop` has killed the nodes writing into it.
    dir: tempfile::TempDir,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            // Already gone is fine: the drop only makes sure.
            let _ = node.child.kill();
            let _ = node.child.wait();
        }
    }
}

impl Cluster {
    /// Starts a three-primary cluster and waits until every node reports
    /// `cluster_state:ok`; `None` (printed reason) if Redis is not
    /// installed outside CI.
    /// ```no_run
    /// let cluster = keel_testkit::redis_server::Cluster::start();
    /// ```
    pub fn start() -> Option<Self> {
        if !tools_installed("Redis Cluster") {
            return None;
        }
        let mut last_error = String::new();
        for attempt in 0..START_ATTEMPTS {
            match Self::try_start() {
                Ok(cluster) => return Some(cluster),
                Err(e) => {
                    eprintln!("cluster start attempt {attempt} failed: {e}");
                    last_error = e;
                }
            }
        }
        panic!("could not start a Redis Cluster in {START_ATTEMPTS} attempts: {last_error}");
    }

    fn try_start() -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("temporary directory: {e}"))?;
        let ports = free_ports(3)?;
        let mut cluster = Self {
            nodes: Vec::new(),
            dir,
        };
        for &port in &ports {
            let child = spawn_node(cluster.dir.path(), port, true)?;
            cluster.nodes.push(Node {
                port,
                child,
                killed: false,
            });
        }
        for i in 0..cluster.nodes.len() {
            cluster.wait_for_node(i)?;
        }
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for port in &ports {
            create.arg(format!("127.0.0.1:{port}"));
        }
        create.args(["--cluster-replicas", "0", "--cluster-yes"]);
        let out = run(&mut create)?;
        if !out.status.success() {
            return Err(format!(
                "redis-cli --cluster create failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        cluster.wait_until_ok()?;
        Ok(cluster)
    }

    /// Waits until node `i` answers `PING`, or fails early if it exited
    /// (its port was taken after all).
    fn wait_for_node(&mut self, i: usize) -> Result<(), String> {
        let deadline = Instant::now() + READY_WITHIN;
        let port = self.nodes[i].port;
        loop {
            if let Ok(Some(status)) = self.nodes[i].child.try_wait() {
                return Err(format!(
                    "redis-server on port {port} exited with {status}: {}",
                    self.log(port)
                ));
            }
            if cli(port, &["PING"]).is_ok_and(|r| r.trim() == "PONG") {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "redis-server on port {port} did not answer within {READY_WITHIN:?}: {}",
                    self.log(port)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until every node reports `cluster_state:ok` (all 16384 slots
    /// assigned and the nodes agreeing), so that a client fetching the slot
    /// map from any of them sees the whole cluster.
    fn wait_until_ok(&self) -> Result<(), String> {
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            let states: Vec<String> = self
                .ports()
                .into_iter()
                .map(|port| {
                    cli(port, &["CLUSTER", "INFO"])
                        .ok()
                        .and_then(|info| {
                            info.lines()
                                .find_map(|l| l.trim().strip_prefix("cluster_state:"))
                                .map(str::to_owned)
                        })
                        .unwrap_or_else(|| "no answer".to_owned())
                })
                .collect();
            if states.iter().all(|s| s == "ok") {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "cluster not ok within {READY_WITHIN:?}: states {states:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The nodes' ports.
    /// ```no_run
    /// # let cluster = keel_testkit::redis_server::Cluster::start().unwrap();
    /// assert_eq!(cluster.ports().len(), 3);
    /// ```
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// A `redis://` URL per node, as a cluster client takes them.
    /// ```no_run
    /// # let cluster = keel_testkit::redis_server::Cluster::start().unwrap();
    /// assert!(cluster.urls()[0].starts_with("redis://127.0.0.1:"));
    /// ```
    pub fn urls(&self) -> Vec<String> {
        self.ports()
            .into_iter()
            .map(|p| format!("redis://127.0.0.1:{p}/"))
            .collect()
    }

    /// How many keys each node holds (`DBSIZE`), in node order.
    /// ```no_run
    /// # let cluster = keel_testkit::redis_server::Cluster::start().unwrap();
    /// let total: u64 = cluster.key_counts().iter().sum();
    /// ```
    pub fn key_counts(&self) -> Vec<u64> {
        self.ports()
            .into_iter()
            .map(|port| {
                let reply = cli(port, &["DBSIZE"]).unwrap_or_else(|e| panic!("DBSIZE: {e}"));
                reply
                    .trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("DBSIZE on port {port} answered {reply:?}"))
            })
            .collect()
    }

    /// Runs `redis-cli -p <port of node i> <args...>` and returns its
    /// output.
    /// ```no_run
    /// # let cluster = keel_testkit::redis_server::Cluster::start().unwrap();
    /// assert!(cluster.cli(0, &["CLUSTER", "INFO"]).contains("cluster_state:ok"));
    /// ```
    pub fn cli(&self, i: usize, args: &[&str]) -> String {
        assert!(!self.nodes[i].killed, "node {i} was killed");
        let port = self.nodes[i].port;
        cli(port, args).unwrap_or_else(|e| panic!("redis-cli -p {port} {args:?}: {e}"))
    }

    /// Like [`Cluster::cli`], and the reply must be `OK`.
    /// ```no_run
    /// # let cluster = keel_testkit::redis_server::Cluster::start().unwrap();
    /// cluster.cli_ok(0, &["SET", "k", "v"]);
    /// ```
    pub fn cli_ok(&self, i: usize, args: &[&str]) {
        let reply = self.cli(i, args);
        assert_eq!(reply.trim(), "OK", "{args:?} on node {i}");
    }

    /// Kills node `i` (SIGKILL: a crash, no goodbye to the cluster).
    /// ```no_run
    /// # let mut cluster = keel_testkit::redis_server::Cluster::start().unwrap();
    /// cluster.kill(0);
    /// assert_ne!(cluster.live(), 0);
    /// ```
    pub fn kill(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let _ = node.child.kill();
        let _ = node.child.wait();
        node.killed = true;
    }

    /// The index of a node still running, to ask about the cluster.
    /// ```no_run
    /// # let cluster = keel_testkit::redis_server::Cluster::start().unwrap();
    /// let node = cluster.live();
    /// ```
    pub fn live(&self) -> usize {
        self.nodes
            .iter()
            .position(|n| !n.killed)
            .expect("some node is still running")
    }

    /// `CLUSTER NODES` as a running node sees it: per line, the node's id,
    /// its index here (by port) and the slots or slot ranges it serves.
    fn nodes_view(&self) -> Vec<(String, usize, Vec<String>)> {
        self.cli(self.live(), &["CLUSTER", "NODES"])
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|line| {
                // <id> <ip:port@bus[,host]> <flags> <primary> <ping> <pong>
                // <epoch> <link> <slot or range>...
                let fields: Vec<&str> = line.split_whitespace().collect();
                let port: u16 = fields
                    .get(1)
                    .and_then(|a| a.split('@').next())
                    .and_then(|a| a.rsplit(':').next())
                    .and_then(|p| p.parse().ok())
                    .unwrap_or_else(|| panic!("CLUSTER NODES line {line:?}"));
                let index = self
                    .ports()
                    .iter()
                    .position(|&p| p == port)
                    .unwrap_or_else(|| panic!("unknown node port {port}"));
                let slots = fields.iter().skip(8).map(|s| (*s).to_owned()).collect();
                (fields[0].to_owned(), index, slots)
            })
            .collect()
    }

    /// Node `i`'s cluster id.
    ///
    /// ```no_run
    /// # let cluster = keel_testkit::redis_server::Cluster::start().unwrap();
    /// assert_eq!(cluster.node_id(0).len(), 40);
    /// ```
    pub fn node_id(&self, i: usize) -> String {
        self.nodes_view()
            .into_iter()
            .find(|(_, index, _)| *index == i)
            .map(|(id, _, _)| id)
            .unwrap_or_else(|| panic!("node {i} is not in CLUSTER NODES"))
    }

    /// The index of the node serving `slot`.
    ///
    /// ```no_run
    /// # let cluster = keel_testkit::redis_server::Cluster::start().unwrap();
    /// assert!(cluster.owner_of_slot(0) < 3);
    /// ```
    pub fn owner_of_slot(&self, slot: u16) -> usize {
        let serves = |item: &str| {
            // "5461", "0-5460"; "[5461->-<id>]" marks a migration, not
            // ownership.
            if item.starts_with('[') {
                return false;
            }
            match item.split_once('-') {
                Some((lo, hi)) => {
                    lo.parse::<u16>().is_ok_and(|lo| lo <= slot)
                        && hi.parse::<u16>().is_ok_and(|hi| slot <= hi)
                }
                None => item.parse::<u16>().is_ok_and(|s| s == slot),
            }
        };
        self.nodes_view()
            .into_iter()
            .find(|(_, _, slots)| slots.iter().any(|item| serves(item)))
            .map(|(_, index, _)| index)
            .unwrap_or_else(|| panic!("no node serves slot {slot}"))
    }

    /// The node's log, for failure messages.
    fn log(&self, port: u16) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("redis-{port}.log")))
            .unwrap_or_else(|e| format!("(no log: {e})"))
    }
}

/// A single Redis server of the test's own; killed (files removed) when
/// dropped.
pub struct Server {
    node: Node,
    dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.node.child.kill();
        let _ = self.node.child.wait();
    }
}

impl Server {
    /// Starts a standalone server and waits until it answers; `None`
    /// (printed reason) if Redis is not installed outside CI.
    /// ```no_run
    /// let server = keel_testkit::redis_server::Server::start();
    /// ```
    pub fn start() -> Option<Self> {
        if !tools_installed("Redis server") {
            return None;
        }
        let mut last_error = String::new();
        for attempt in 0..START_ATTEMPTS {
            match Self::try_start() {
                Ok(server) => return Some(server),
                Err(e) => {
                    eprintln!("server start attempt {attempt} failed: {e}");
                    last_error = e;
                }
            }
        }
        panic!("could not start a Redis server in {START_ATTEMPTS} attempts: {last_error}");
    }

    /// Starts a standalone server on `port` (to bring one back on the
    /// port of a server that was killed); `None` (printed reason) if Redis
    /// is not installed outside CI.
    ///
    /// ```no_run
    /// # use keel_testkit::redis_server::Server;
    /// let mut first = Server::start().unwrap();
    /// let port = first.port();
    /// first.kill();
    /// let again = Server::start_on(port).unwrap(); // empty: nothing was persisted
    /// ```
    pub fn start_on(port: u16) -> Option<Self> {
        if !tools_installed("Redis server") {
            return None;
        }
        Some(Self::try_start_on(port).unwrap_or_else(|e| panic!("{e}")))
    }

    fn try_start() -> Result<Self, String> {
        Self::try_start_on(free_ports(1)?[0])
    }

    fn try_start_on(port: u16) -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("temporary directory: {e}"))?;
        let child = spawn_node(dir.path(), port, false)?;
        let mut server = Self {
            node: Node {
                port,
                child,
                killed: false,
            },
            dir,
        };
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if let Ok(Some(status)) = server.node.child.try_wait() {
                let log =
                    std::fs::read_to_string(server.dir.path().join(format!("redis-{port}.log")));
                return Err(format!(
                    "redis-server on port {port} exited with {status}: {log:?}"
                ));
            }
            if cli(port, &["PING"]).is_ok_and(|r| r.trim() == "PONG") {
                return Ok(server);
            }
            if Instant::now() > deadline {
                return Err(format!("redis-server on port {port} did not answer"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The server's port.
    ///
    /// ```no_run
    /// # let server = keel_testkit::redis_server::Server::start().unwrap();
    /// assert!(server.url().contains(&server.port().to_string()));
    /// ```
    pub fn port(&self) -> u16 {
        self.node.port
    }

    /// SIGSTOP: the server is frozen; its connections stay open and
    /// nothing answers (a stalled store).
    ///
    /// ```no_run
    /// # let server = keel_testkit::redis_server::Server::start().unwrap();
    /// server.pause();
    /// server.resume();
    /// ```
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT, after [`Server::pause`].
    ///
    /// ```no_run
    /// # let server = keel_testkit::redis_server::Server::start().unwrap();
    /// server.pause();
    /// server.resume();
    /// ```
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    /// SIGKILL (a crash), and reaps the process; nothing is persisted.
    ///
    /// ```no_run
    /// # let mut server = keel_testkit::redis_server::Server::start().unwrap();
    /// server.kill();
    /// ```
    pub fn kill(&mut self) {
        let _ = self.node.child.kill();
        let _ = self.node.child.wait();
        self.node.killed = true;
    }

    fn signal(&self, signal: &str) {
        assert!(!self.node.killed, "the server was killed");
        let pid = self.node.child.id().to_string();
        let ok = Command::new("kill")
            .args([signal, &pid])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {signal} {pid}");
    }

    /// The server's `redis://` URL.
    /// ```no_run
    /// # let server = keel_testkit::redis_server::Server::start().unwrap();
    /// assert!(server.url().starts_with("redis://"));
    /// ```
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.node.port)
    }

    /// Runs `redis-cli -p <port> <args...>` and returns its output.
    /// ```no_run
    /// # let server = keel_testkit::redis_server::Server::start().unwrap();
    /// server.cli(&["CONFIG", "SET", "maxmemory", "1mb"]);
    /// ```
    pub fn cli(&self, args: &[&str]) -> String {
        let port = self.node.port;
        cli(port, args).unwrap_or_else(|e| panic!("redis-cli -p {port} {args:?}: {e}"))
    }
}

/// Whether `redis-server` and `redis-cli` can be run; if not, prints why
/// (the caller skips), or panics under `CI=true`.
fn tools_installed(what: &str) -> bool {
    let missing = ["redis-server", "redis-cli"].into_iter().find(|tool| {
        Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
    });
    let Some(missing) = missing else {
        return true;
    };
    let reason = format!("{missing} is not installed, so no {what} can be started");
    if crate::in_ci() {
        panic!("CI=true and {reason}: install redis-server and redis-cli (Redis 5+)");
    }
    eprintln!("skipping: {reason}");
    false
}

/// `n` distinct ports that are free now, each with its cluster bus port
/// (port + 10000) free too. The kernel picks them (binding port 0), so
/// tests running at the same time do not pick the same ones.
fn free_ports(n: usize) -> Result<Vec<u16>, String> {
    let mut held = Vec::new();
    let mut ports = Vec::new();
    for _ in 0..200 {
        if ports.len() == n {
            break;
        }
        let listener =
            TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind a free port: {e}"))?;
        let port = listener
            .local_addr()
            .map_err(|e| format!("local address: {e}"))?
            .port();
        let Some(bus) = port.checked_add(BUS_OFFSET) else {
            continue;
        };
        let Ok(bus_listener) = TcpListener::bind(("127.0.0.1", bus)) else {
            continue;
        };
        // Held until all are found, so the kernel does not hand the same
        // port out twice; released just before the nodes bind them.
        held.push((listener, bus_listener));
        ports.push(port);
    }
    if ports.len() == n {
        Ok(ports)
    } else {
        Err(format!("found only {} free port pairs", ports.len()))
    }
}

fn spawn_node(dir: &Path, port: u16, cluster: bool) -> Result<Child, String> {
    let log = std::fs::File::create(dir.join(format!("redis-{port}.log")))
        .map_err(|e| format!("log file: {e}"))?;
    let log_err = log.try_clone().map_err(|e| format!("log file: {e}"))?;
    let mut cmd = Command::new("redis-server");
    cmd.arg("--port")
        .arg(port.to_string())
        .args(["--bind", "127.0.0.1"]);
    if cluster {
        cmd.args(["--cluster-enabled", "yes"])
            .arg("--cluster-config-file")
            .arg(dir.join(format!("nodes-{port}.conf")));
    }
    cmd.arg("--dir")
        .arg(dir)
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .spawn()
        .map_err(|e| format!("spawn redis-server: {e}"))
}

fn run(cmd: &mut Command) -> Result<Output, String> {
    cmd.stdin(Stdio::null())
        .output()
        .map_err(|e| format!("run {cmd:?}: {e}"))
}

/// `redis-cli -p port args...`: its standard output, or why it failed.
fn cli(port: u16, args: &[&str]) -> Result<String, String> {
    let out = run(Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}
