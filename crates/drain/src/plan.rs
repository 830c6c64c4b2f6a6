//! Drain plans (how fast connections are asked to leave) and the drain
//! that carries one out.

use std::time::Duration;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::registry::{CloseRequest, ConnId, Registry, Tally, Target};

/// How fast connections are asked to close. New pacings may be added, so
/// a `match` on it needs a wildcard arm.
///
/// ```
/// use std::time::Duration;
/// use keel_drain::Pacing;
///
/// // Phoenix's defaults: 10,000 every 2 s.
/// let phoenix = Pacing::Batches { size: 10_000, interval: Duration::from_secs(2) };
/// // Socket Drano's: 25 % every 100 ms.
/// let drano = Pacing::Percent { percent: 25.0, interval: Duration::from_millis(100) };
/// // Envoy's gradual: spread evenly over 10 minutes.
/// let envoy = Pacing::Gradual { over: Duration::from_secs(600), tick: Duration::from_millis(100) };
/// assert_eq!(phoenix.batch_size(150_000), 10_000);
/// assert_eq!(drano.batch_size(1_000), 250);
/// assert_eq!(envoy.batch_size(6_000), 1);
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum Pacing {
    /// `size` connections every `interval` (Phoenix).
    Batches {
        /// Connections per batch.
        size: usize,
        /// Time between batches.
        interval: Duration,
    },
    /// `percent` of the connections present when the drain began, every
    /// `interval` (Socket Drano).
    Percent {
        /// Share per interval, in (0, 100].
        percent: f64,
        /// Time between batches.
        interval: Duration,
    },
    /// Evenly over `over`, one batch every `tick` (Envoy's gradual drain).
    Gradual {
        /// The whole drain's duration.
        over: Duration,
        /// Time between batches.
        tick: Duration,
    },
}

impl Pacing {
    /// Connections per batch when `total` are to be drained (at least 1).
    pub fn batch_size(&self, total: usize) -> usize {
        let size = match *self {
            Pacing::Batches { size, .. } => size,
            Pacing::Percent { percent, .. } => {
                (total as f64 * percent.clamp(0.0, 100.0) / 100.0).ceil() as usize
            }
            Pacing::Gradual { over, tick } => {
                let ticks = (over.as_secs_f64() / tick.as_secs_f64().max(1e-9))
                    .ceil()
                    .max(1.0);
                (total as f64 / ticks).ceil() as usize
            }
        };
        size.max(1)
    }

    /// Time between batches.
    pub fn interval(&self) -> Duration {
        match *self {
            Pacing::Batches { interval, .. } | Pacing::Percent { interval, .. } => interval,
            Pacing::Gradual { tick, .. } => tick,
        }
    }
}

/// A complete drain: pacing, jitter, the hard deadline and the reconnect
/// hint. Made with [`new`](Self::new), [`batches`](Self::batches),
/// [`percent`](Self::percent) or [`gradual`](Self::gradual) and the
/// setters (its fields are public to read; more may be added, so it is not
/// built as a struct literal).
///
/// ```
/// use std::time::Duration;
/// use keel_drain::DrainPlan;
///
/// let plan = DrainPlan::batches(2, Duration::from_secs(1))
///     .deadline(Duration::from_secs(30))
///     .jitter(false);
/// // Five connections: two at 0 s, two at 1 s, one at 2 s.
/// let at: Vec<u64> = plan.schedule(5).iter().map(|d| d.as_secs()).collect();
/// assert_eq!(at, [0, 0, 1, 1, 2]);
/// ```
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct DrainPlan {
    /// How fast.
    pub pacing: Pacing,
    /// Spread each batch's closes randomly across its interval, so a batch
    /// is not one spike (on by default).
    pub jitter: bool,
    /// After this, whatever is left is closed by force.
    pub deadline: Duration,
    /// How long before the deadline the last gentle close is asked. A plan
    /// that does not fit in the deadline asks every connection it has not
    /// reached yet at `deadline - close_grace`, so each still gets its
    /// close frame and reconnect hint before anything is cut (a cut client
    /// sees an abnormal close and reconnects at once). At most a tenth of
    /// the deadline is used; 1 s by default.
    pub close_grace: Duration,
    /// Each closed connection is told to wait a random time in
    /// `[0, reconnect_window)` before reconnecting (zero: no hint).
    pub reconnect_window: Duration,
    /// How long forced connections get to go before the drain reports done
    /// anyway.
    pub force_grace: Duration,
    /// Seeds the jitter and the hints, for reproducible runs.
    pub seed: u64,
}

impl DrainPlan {
    /// A plan with `pacing`, jitter on, a 30 s deadline, a 5 s reconnect
    /// window and a 1 s grace after the forced close.
    pub fn new(pacing: Pacing) -> Self {
        Self {
            pacing,
            jitter: true,
            deadline: Duration::from_secs(30),
            close_grace: Duration::from_secs(1),
            reconnect_window: Duration::from_secs(5),
            force_grace: Duration::from_secs(1),
            seed: 0x6b65_656c_6472_6169,
        }
    }

    /// `size` every `interval`.
    pub fn batches(size: usize, interval: Duration) -> Self {
        Self::new(Pacing::Batches { size, interval })
    }

    /// `percent` % of the initial connections every `interval`.
    pub fn percent(percent: f64, interval: Duration) -> Self {
        Self::new(Pacing::Percent { percent, interval })
    }

    /// Evenly over `over`, in 100 ms ticks.
    pub fn gradual(over: Duration) -> Self {
        Self::new(Pacing::Gradual {
            over,
            tick: Duration::from_millis(100),
        })
    }

    /// Sets the hard deadline.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// Sets how long before the deadline the last gentle close is asked
    /// (at most a tenth of the deadline is used).
    ///
    /// ```
    /// use std::time::Duration;
    /// use keel_drain::DrainPlan;
    ///
    /// // One a second for ten connections, but only 5 s to do it: the five
    /// // not reached by 4.5 s are all asked then, and cut at 5 s if still
    /// // open.
    /// let plan = DrainPlan::batches(1, Duration::from_secs(1))
    ///     .jitter(false)
    ///     .deadline(Duration::from_secs(5))
    ///     .close_grace(Duration::from_millis(500));
    /// let at: Vec<u64> = plan.schedule(10).iter().map(|d| d.as_millis() as u64).collect();
    /// assert_eq!(at, [0, 1000, 2000, 3000, 4000, 4500, 4500, 4500, 4500, 4500]);
    /// ```
    pub fn close_grace(mut self, grace: Duration) -> Self {
        self.close_grace = grace;
        self
    }

    /// When the last gentle close may be asked: `deadline` less the
    /// close grace (at most a tenth of the deadline).
    ///
    /// ```
    /// use std::time::Duration;
    /// use keel_drain::DrainPlan;
    ///
    /// let plan = DrainPlan::batches(1, Duration::from_secs(1)).deadline(Duration::from_secs(30));
    /// assert_eq!(plan.last_close(), Duration::from_secs(29));
    /// let short = plan.deadline(Duration::from_secs(2));
    /// assert_eq!(short.last_close(), Duration::from_millis(1800));
    /// ```
    pub fn last_close(&self) -> Duration {
        self.deadline.saturating_sub(self.effective_close_grace())
    }

    /// The close grace as the plan uses it: at most a tenth of the
    /// deadline. It is also how long a connection asked gently may take to
    /// reach a clean point to close at (a WebSocket's message end).
    ///
    /// ```
    /// use std::time::Duration;
    /// use keel_drain::DrainPlan;
    ///
    /// let plan = DrainPlan::batches(1, Duration::from_secs(1)).deadline(Duration::from_secs(5));
    /// assert_eq!(plan.effective_close_grace(), Duration::from_millis(500));
    /// ```
    pub fn effective_close_grace(&self) -> Duration {
        self.close_grace.min(self.deadline / 10)
    }

    /// Turns jitter inside each batch on or off.
    pub fn jitter(mut self, jitter: bool) -> Self {
        self.jitter = jitter;
        self
    }

    /// Sets the reconnect hint window.
    pub fn reconnect_window(mut self, window: Duration) -> Self {
        self.reconnect_window = window;
        self
    }

    /// Sets how long connections closed by force get to go before the drain
    /// reports done anyway.
    ///
    /// ```
    /// use std::time::Duration;
    /// use keel_drain::DrainPlan;
    ///
    /// let plan = DrainPlan::gradual(Duration::from_secs(10)).force_grace(Duration::from_millis(200));
    /// assert_eq!(plan.force_grace, Duration::from_millis(200));
    /// ```
    pub fn force_grace(mut self, grace: Duration) -> Self {
        self.force_grace = grace;
        self
    }

    /// Seeds jitter and hints: the same seed gives the same schedule.
    ///
    /// ```
    /// use keel_drain::DrainPlan;
    /// use std::time::Duration;
    ///
    /// let plan = |seed| DrainPlan::batches(2, Duration::from_secs(1)).seed(seed);
    /// assert_eq!(plan(7).schedule(10), plan(7).schedule(10));
    /// assert_ne!(plan(7).schedule(10), plan(8).schedule(10));
    /// ```
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// When, from the start of the drain, each of `total` connections is
    /// asked to close, in order; never past [`last_close`](Self::last_close).
    pub fn schedule(&self, total: usize) -> Vec<Duration> {
        let size = self.pacing.batch_size(total);
        let interval = self.pacing.interval();
        let mut rng = fastrand::Rng::with_seed(self.seed);
        let last = self.last_close();
        (0..total)
            .map(|i| {
                let batch = u32::try_from(i / size).unwrap_or(u32::MAX);
                let base = interval.saturating_mul(batch);
                let offset = if self.jitter {
                    interval.mul_f64(rng.f64())
                } else {
                    Duration::ZERO
                };
                (base + offset).min(last)
            })
            .collect()
    }

    /// When the last connection is asked to close, if the plan keeps
    /// pace.
    pub fn expected_duration(&self, total: usize) -> Duration {
        self.schedule(total).into_iter().max().unwrap_or_default()
    }
}

/// A drain's progress, readable at any time. Made by a [`Drain`] (or by
/// [`combine`](Self::combine)); more fields may be added, so it is not
/// built as a struct literal.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct Progress {
    /// Connections the drain set out to close.
    pub total: usize,
    /// Of those, asked to close so far.
    pub signalled: usize,
    /// Of those, gone.
    pub closed: usize,
    /// Of those, still connected.
    pub remaining: usize,
    /// Asked to close by force at the deadline.
    pub forced: usize,
    /// Milliseconds since the drain began.
    pub elapsed_ms: u64,
    /// Milliseconds from the start at which the plan expects to have asked
    /// every connection.
    pub expected_finish_ms: u64,
    /// The drain is over (everything gone, or the grace after the deadline
    /// ran out).
    pub done: bool,
}

impl Progress {
    /// The progress of two drains running side by side, reported as one
    /// (for example one drain per connection kind): counts add up, times
    /// are the later of the two, and it is done when both are.
    ///
    /// ```
    /// use std::time::Duration;
    /// use keel_drain::{ConnKind, DrainPlan, Registry, Target};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let registry = Registry::new();
    /// let h1 = registry.register(ConnKind::HTTP1, None);
    /// let _h2 = registry.register(ConnKind::HTTP2, None);
    /// let plan = DrainPlan::batches(10, Duration::from_secs(1));
    /// let a = keel_drain::start(&registry, Target::Kind(ConnKind::HTTP1), plan.clone());
    /// let b = keel_drain::start(&registry, Target::Kind(ConnKind::HTTP2), plan);
    /// drop(h1);
    /// let first = a.finished().await;
    /// let both = first.combine(&b.progress());
    /// assert_eq!((both.total, both.closed, both.remaining), (2, 1, 1));
    /// assert!(first.done && !both.done);
    /// # }
    /// ```
    pub fn combine(&self, other: &Progress) -> Progress {
        Progress {
            total: self.total + other.total,
            signalled: self.signalled + other.signalled,
            closed: self.closed + other.closed,
            remaining: self.remaining + other.remaining,
            forced: self.forced + other.forced,
            elapsed_ms: self.elapsed_ms.max(other.elapsed_ms),
            expected_finish_ms: self.expected_finish_ms.max(other.expected_finish_ms),
            done: self.done && other.done,
        }
    }
}

/// A running drain.
///
/// ```
/// use std::time::Duration;
/// use keel_drain::{ConnKind, DrainPlan, Registry, Target};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let registry = Registry::new();
/// for _ in 0..4 {
///     let mut conn = registry.register(ConnKind::TUNNEL, None);
///     // Each connection's task closes when asked.
///     tokio::spawn(async move {
///         conn.closing().await;
///         drop(conn);
///     });
/// }
/// let drain = keel_drain::start(&registry, Target::All, DrainPlan::batches(2, Duration::from_secs(1)));
/// let done = drain.finished().await;
/// assert_eq!((done.total, done.closed, done.remaining), (4, 4, 0));
/// assert!(registry.is_empty());
/// # }
/// ```
#[derive(Debug)]
pub struct Drain {
    progress: watch::Receiver<Progress>,
    task: JoinHandle<()>,
}

impl Drain {
    /// The progress now.
    pub fn progress(&self) -> Progress {
        self.progress.borrow().clone()
    }

    /// A receiver that changes with every step of the drain.
    pub fn watch(&self) -> watch::Receiver<Progress> {
        self.progress.clone()
    }

    /// Waits until the drain is done and returns its final progress.
    pub async fn finished(mut self) -> Progress {
        let _ = (&mut self.task).await;
        self.progress.borrow().clone()
    }

    /// Stops pacing (connections already asked keep closing).
    pub fn abort(&self) {
        self.task.abort();
    }
}

/// Starts draining the connections of `registry` that `target` selects,
/// at the pace of `plan`. Connections registered after the start are not
/// part of this drain.
pub fn start(registry: &Registry, target: Target, plan: DrainPlan) -> Drain {
    let tally = Arc::new(Tally::default());
    let ids = registry.enlist(&target, &tally);
    let schedule = plan.schedule(ids.len());
    let initial = Progress {
        total: ids.len(),
        signalled: 0,
        closed: 0,
        remaining: ids.len(),
        forced: 0,
        elapsed_ms: 0,
        expected_finish_ms: millis(schedule.iter().copied().max().unwrap_or_default()),
        done: ids.is_empty(),
    };
    let (tx, rx) = watch::channel(initial);
    let registry = registry.clone();
    let task = tokio::spawn(run(registry, tally, ids, schedule, plan, tx));
    Drain { progress: rx, task }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

async fn run(
    registry: Registry,
    tally: Arc<Tally>,
    ids: Vec<ConnId>,
    schedule: Vec<Duration>,
    plan: DrainPlan,
    tx: watch::Sender<Progress>,
) {
    let started = Instant::now();
    let deadline = started + plan.deadline;
    // A stream apart from the schedule's jitter, from the same seed.
    let mut hints = fastrand::Rng::with_seed(plan.seed).fork();
    // Ascending by time; stable so equal times keep registration order.
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by_key(|&i| schedule[i]);
    let mut next = 0;
    let mut signalled = vec![false; ids.len()];
    let mut forced = 0;

    let update = |signalled_n: usize, forced: usize, done: bool| {
        let remaining = tally.remaining.load(Ordering::SeqCst);
        tx.send_modify(|p| {
            p.signalled = signalled_n;
            p.remaining = remaining;
            p.closed = p.total - remaining;
            p.forced = forced;
            p.elapsed_ms = millis(started.elapsed());
            p.done = done || remaining == 0;
        });
        remaining
    };

    // First, paced, gentle closes until the schedule or the deadline ends.
    let mut signalled_n = 0;
    while next < order.len() {
        let due = started + schedule[order[next]];
        if due >= deadline {
            break;
        }
        tokio::select! {
            () = tokio::time::sleep_until(due) => {
                let now = Instant::now();
                while next < order.len() && started + schedule[order[next]] <= now {
                    let i = order[next];
                    let hint = plan.reconnect_window.mul_f64(hints.f64());
                    registry.close(ids[i], CloseRequest { force: false, reconnect_after: hint });
                    signalled[i] = true;
                    signalled_n += 1;
                    next += 1;
                }
                update(signalled_n, forced, false);
            }
            () = tally.left.notified() => {
                if update(signalled_n, forced, false) == 0 {
                    return;
                }
            }
        }
    }

    // Then wait for the rest to leave, until the deadline.
    loop {
        if update(signalled_n, forced, false) == 0 {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => break,
            () = tally.left.notified() => {}
        }
    }

    // Phase 3: the deadline passed; close whatever is left by force.
    for (i, id) in ids.iter().enumerate() {
        if registry.close(
            *id,
            CloseRequest {
                force: true,
                reconnect_after: plan.reconnect_window.mul_f64(hints.f64()),
            },
        ) {
            forced += 1;
            if !signalled[i] {
                signalled[i] = true;
                signalled_n += 1;
            }
        }
    }
    let grace_end = Instant::now() + plan.force_grace;
    loop {
        if update(signalled_n, forced, false) == 0 {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep_until(grace_end) => break,
            () = tally.left.notified() => {}
        }
    }
    update(signalled_n, forced, true);
}
