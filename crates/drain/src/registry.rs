//! The connection registry: who is connected, and how to ask each to close.
//!
//! Registering and unregistering are O(1) and touch one shard of a sharded
//! map, chosen by the connection's id, so accepts on different cores do not
//! contend on one lock and no single task sits on the path.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::sync::Notify;

/// What kind of connection an entry is, so a drain can pick some kinds and
/// leave others (an HTTP/1 connection closes after its next response, a
/// tunnel closes with a WebSocket close frame, so a server drains them on
/// different schedules).
///
/// Kinds are open: [`HTTP1`](Self::HTTP1), [`HTTP2`](Self::HTTP2) and
/// [`TUNNEL`](Self::TUNNEL) are the ones an HTTP server or gateway needs,
/// and any other is named with [`ConnKind::new`]. Two kinds are the same
/// when their names are equal. A kind serializes as its name.
///
/// ```
/// use keel_drain::{ConnKind, Registry, Target};
///
/// // A service with its own kinds next to the predefined ones.
/// const GRPC_STREAM: ConnKind = ConnKind::new("grpc_stream");
/// const MQTT: ConnKind = ConnKind::new("mqtt");
///
/// let registry = Registry::new();
/// let _a = registry.register(GRPC_STREAM, None);
/// let _b = registry.register(MQTT, None);
/// let _c = registry.register(ConnKind::HTTP1, None);
/// assert_eq!(registry.count(&Target::Kind(MQTT)), 1);
/// assert_eq!(registry.count(&Target::Kind(ConnKind::new("mqtt"))), 1);
/// assert_eq!(MQTT.name(), "mqtt");
/// assert_eq!(ConnKind::TUNNEL.to_string(), "tunnel");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnKind(&'static str);

impl ConnKind {
    /// A downstream HTTP/1.1 connection.
    pub const HTTP1: ConnKind = ConnKind("http1");
    /// A downstream HTTP/2 connection.
    pub const HTTP2: ConnKind = ConnKind("http2");
    /// An upgraded connection (WebSocket or other) tunnelled to an upstream.
    pub const TUNNEL: ConnKind = ConnKind("tunnel");

    /// The kind called `name`. A `&'static str` keeps the kind `Copy` and
    /// free to register: kinds are a small fixed set a program names in
    /// constants, not data read at run time.
    ///
    /// ```
    /// use keel_drain::ConnKind;
    /// assert_eq!(ConnKind::new("http1"), ConnKind::HTTP1);
    /// ```
    pub const fn new(name: &'static str) -> Self {
        Self(name)
    }

    /// The kind's name, as given to [`new`](Self::new) (`"http1"`,
    /// `"http2"` and `"tunnel"` for the predefined kinds).
    ///
    /// ```
    /// use keel_drain::ConnKind;
    /// assert_eq!(ConnKind::HTTP2.name(), "http2");
    /// ```
    pub const fn name(self) -> &'static str {
        self.0
    }
}

impl std::fmt::Display for ConnKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl serde::Serialize for ConnKind {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.0)
    }
}

/// How a connection is asked to close.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloseRequest {
    /// Finish what is in flight and close (`Connection: close`, GOAWAY, a
    /// WebSocket close frame), or close now (the deadline passed).
    pub force: bool,
    /// A suggested wait before reconnecting, spread across connections so
    /// clients do not come back together; send it to the client (for
    /// example in the WebSocket close reason).
    pub reconnect_after: Duration,
}

impl CloseRequest {
    /// The WebSocket close code a drained tunnel sends: 1012, Service
    /// Restart (RFC 6455 registry).
    pub const WEBSOCKET_CODE: u16 = 1012;

    /// The WebSocket close reason carrying the reconnect hint, for example
    /// `keel drain; reconnect_after_ms=1234` (well under the 123-byte limit
    /// of a close reason). [`parse_reconnect_hint`] reads it back.
    ///
    /// ```
    /// use std::time::Duration;
    /// use keel_drain::{CloseRequest, parse_reconnect_hint};
    ///
    /// let req = CloseRequest { force: false, reconnect_after: Duration::from_millis(1234) };
    /// assert_eq!(req.close_reason(), "keel drain; reconnect_after_ms=1234");
    /// assert_eq!(parse_reconnect_hint(&req.close_reason()), Some(Duration::from_millis(1234)));
    /// ```
    pub fn close_reason(&self) -> String {
        format!(
            "keel drain; reconnect_after_ms={}",
            self.reconnect_after.as_millis()
        )
    }
}

/// Reads the reconnect hint from a close reason written by
/// [`CloseRequest::close_reason`]; `None` when there is none.
///
/// ```
/// use keel_drain::parse_reconnect_hint;
/// assert_eq!(parse_reconnect_hint("going away"), None);
/// assert_eq!(parse_reconnect_hint("reconnect_after_ms=x"), None);
/// ```
pub fn parse_reconnect_hint(reason: &str) -> Option<Duration> {
    reason
        .split(';')
        .find_map(|part| part.trim().strip_prefix("reconnect_after_ms="))
        .and_then(|ms| ms.parse::<u64>().ok())
        .map(Duration::from_millis)
}

/// Identifies one registered connection: unique within its [`Registry`],
/// in registration order.
///
/// ```
/// use keel_drain::{ConnKind, Registry};
///
/// let registry = Registry::new();
/// let first = registry.register(ConnKind::HTTP1, None);
/// let second = registry.register(ConnKind::HTTP1, None);
/// assert!(first.id() < second.id());
/// assert_eq!(first.id(), keel_drain::ConnId::new(first.id().get()));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(u64);

impl ConnId {
    /// The id with the number `raw`, as [`get`](Self::get) returned it. An
    /// id no registry handed out names no connection: [`Registry::close`]
    /// returns false for it.
    ///
    /// ```
    /// use keel_drain::{ConnId, Registry};
    /// assert!(!Registry::new().contains(ConnId::new(7)));
    /// ```
    pub const fn new(raw: u64) -> Self {
        Self(raw)
    }

    /// The id's number, for logs and for spreading work by connection
    /// (hashing, sharding).
    ///
    /// ```
    /// use keel_drain::ConnId;
    /// assert_eq!(ConnId::new(7).get(), 7);
    /// ```
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl std::fmt::Display for ConnId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

struct Entry {
    kind: ConnKind,
    endpoint: Option<Arc<str>>,
    close: Arc<Signal>,
    /// The drains this connection is part of (usually none or one); each
    /// counts its members down as they leave.
    drains: Vec<Arc<Tally>>,
}

/// How many of a drain's connections are still here, and a wake-up for the
/// drain when one leaves.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    pub(crate) remaining: AtomicUsize,
    pub(crate) left: Notify,
}

struct Shared {
    shards: Box<[Mutex<HashMap<u64, Entry>>]>,
    next_id: AtomicU64,
    live: AtomicUsize,
}

/// All live connections of a server.
///
/// ```
/// use keel_drain::{ConnKind, Registry};
///
/// let registry = Registry::new();
/// let conn = registry.register(ConnKind::HTTP1, None);
/// assert_eq!(registry.len(), 1);
/// drop(conn); // unregisters
/// assert_eq!(registry.len(), 0);
/// ```
#[derive(Clone)]
pub struct Registry {
    shared: Arc<Shared>,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("live", &self.len())
            .finish()
    }
}

impl Registry {
    /// A registry with one shard per available core (at least 8).
    pub fn new() -> Self {
        let n = std::thread::available_parallelism()
            .map_or(8, |n| n.get() * 4)
            .max(8)
            .next_power_of_two();
        Self {
            shared: Arc::new(Shared {
                shards: (0..n).map(|_| Mutex::new(HashMap::new())).collect(),
                next_id: AtomicU64::new(1),
                live: AtomicUsize::new(0),
            }),
        }
    }

    fn shard(&self, id: u64) -> MutexGuard<'_, HashMap<u64, Entry>> {
        let shards = &self.shared.shards;
        // Every write under a shard lock is a single map operation, so a
        // poisoned lock still holds a consistent map.
        shards[(id as usize) & (shards.len() - 1)]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a connection of `kind`, optionally tied to an upstream
    /// `endpoint` (for tunnels, so one endpoint can be drained). The
    /// connection stays registered until the returned guard is dropped.
    pub fn register(&self, kind: ConnKind, endpoint: Option<Arc<str>>) -> Registration {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let close = Arc::new(Signal::default());
        let rx = close.clone();
        self.shard(id).insert(
            id,
            Entry {
                kind,
                endpoint,
                close,
                drains: Vec::new(),
            },
        );
        self.shared.live.fetch_add(1, Ordering::Relaxed);
        Registration {
            registry: self.clone(),
            id,
            close: rx,
            seen: 0,
        }
    }

    /// How many connections are registered.
    pub fn len(&self) -> usize {
        self.shared.live.load(Ordering::Relaxed)
    }

    /// True when no connection is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Enlists the registered connections that `filter` accepts in a
    /// drain counted by `tally`; returns their ids in registration order.
    pub(crate) fn enlist(&self, filter: &Target, tally: &Arc<Tally>) -> Vec<ConnId> {
        let mut ids = Vec::new();
        for shard in self.shared.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            for (id, entry) in shard.iter_mut() {
                if filter.accepts(entry.kind, entry.endpoint.as_deref()) {
                    entry.drains.push(tally.clone());
                    // Counted under the shard lock, so a connection leaving
                    // right now is either not enlisted or counted down.
                    tally.remaining.fetch_add(1, Ordering::SeqCst);
                    ids.push(ConnId(*id));
                }
            }
        }
        ids.sort_unstable();
        ids
    }

    /// Counts the registered connections `filter` accepts, by kind.
    pub fn count(&self, filter: &Target) -> usize {
        self.shared
            .shards
            .iter()
            .map(|s| {
                s.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .values()
                    .filter(|e| filter.accepts(e.kind, e.endpoint.as_deref()))
                    .count()
            })
            .sum()
    }

    /// Asks connection `id` to close. Returns false if it is already gone.
    pub fn close(&self, id: ConnId, request: CloseRequest) -> bool {
        match self.shard(id.0).get(&id.0) {
            Some(entry) => {
                entry.close.raise(&request);
                true
            }
            None => false,
        }
    }

    /// True while connection `id` is registered.
    pub fn contains(&self, id: ConnId) -> bool {
        self.shard(id.0).contains_key(&id.0)
    }

    fn unregister(&self, id: u64) {
        let removed = self.shard(id).remove(&id);
        if let Some(entry) = removed {
            self.shared.live.fetch_sub(1, Ordering::Relaxed);
            for tally in entry.drains {
                tally.remaining.fetch_sub(1, Ordering::SeqCst);
                tally.left.notify_one();
            }
        }
    }
}

/// Which connections a drain applies to. New ways to select connections
/// may be added, so a `match` on it needs a wildcard arm.
///
/// ```
/// use keel_drain::{ConnKind, Target};
///
/// let all = Target::All;
/// assert!(all.accepts(ConnKind::HTTP1, None));
/// let blue = Target::Endpoint("http://10.0.0.1:3000".into());
/// assert!(blue.accepts(ConnKind::TUNNEL, Some("http://10.0.0.1:3000")));
/// assert!(!blue.accepts(ConnKind::TUNNEL, Some("http://10.0.0.2:3000")));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Target {
    /// Every connection (the whole server is leaving).
    All,
    /// Only connections of one kind.
    Kind(ConnKind),
    /// Only connections tied to this upstream endpoint (blue/green).
    Endpoint(String),
}

impl Target {
    /// True when a connection of `kind` tied to `endpoint` is targeted.
    pub fn accepts(&self, kind: ConnKind, endpoint: Option<&str>) -> bool {
        match self {
            Target::All => true,
            Target::Kind(k) => *k == kind,
            Target::Endpoint(e) => endpoint == Some(e.as_str()),
        }
    }
}

/// A registered connection; dropping it unregisters.
///
/// The connection's task waits on [`closing`](Self::closing) next to its
/// own work, and closes the way its protocol does when asked.
///
/// ```
/// use keel_drain::{CloseRequest, ConnKind, Registry};
/// use std::time::Duration;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let registry = Registry::new();
/// let mut conn = registry.register(ConnKind::TUNNEL, None);
/// registry.close(conn.id(), CloseRequest { force: false, reconnect_after: Duration::from_secs(2) });
/// let request = conn.closing().await;
/// assert_eq!(request.reconnect_after, Duration::from_secs(2));
/// # }
/// ```
#[derive(Debug)]
pub struct Registration {
    registry: Registry,
    id: u64,
    close: Arc<Signal>,
    /// The state `closing` last returned, so it waits for a newer one.
    seen: u64,
}

impl Registration {
    /// This connection's id.
    pub fn id(&self) -> ConnId {
        ConnId(self.id)
    }

    /// Resolves when the connection is asked to close (again, when a
    /// gentle request is upgraded to a forced one). Cancel-safe.
    pub async fn closing(&mut self) -> CloseRequest {
        std::future::poll_fn(|cx| self.poll_closing(cx)).await
    }

    /// The poll form of [`closing`](Self::closing), for hand-written
    /// futures: `Ready` with a request newer than the last one returned,
    /// otherwise `Pending` with `cx`'s waker kept (one waker per
    /// registration: the last task to poll is the one woken).
    ///
    /// ```
    /// use keel_drain::{CloseRequest, ConnKind, Registry};
    /// use std::task::{Context, Poll, Waker};
    /// use std::time::Duration;
    ///
    /// let registry = Registry::new();
    /// let mut conn = registry.register(ConnKind::TUNNEL, None);
    /// let mut cx = Context::from_waker(Waker::noop());
    /// assert!(conn.poll_closing(&mut cx).is_pending());
    /// registry.close(conn.id(), CloseRequest { force: true, reconnect_after: Duration::ZERO });
    /// assert!(matches!(conn.poll_closing(&mut cx), Poll::Ready(CloseRequest { force: true, .. })));
    /// assert!(conn.poll_closing(&mut cx).is_pending(), "each request is returned once");
    /// ```
    pub fn poll_closing(&mut self, cx: &mut Context<'_>) -> Poll<CloseRequest> {
        // The waker is stored before the state is read, so a close raised
        // in between still finds it (`raise` writes the state, then takes
        // the waker under the same lock).
        self.close.park(cx.waker());
        let state = self.close.state.load(Ordering::Acquire);
        if state != self.seen {
            self.seen = state;
            if let Some(req) = Signal::decode(state) {
                return Poll::Ready(req);
            }
        }
        Poll::Pending
    }

    /// The close request received so far, if any.
    pub fn requested(&self) -> Option<CloseRequest> {
        Signal::decode(self.close.state.load(Ordering::Acquire))
    }
}

/// A connection's close request: one atomic word and one waker slot, a
/// small fraction of what a `watch` channel costs, because the gateway
/// holds one per idle connection. The slot's lock is only ever taken by
/// the connection's own task and, once, by the drain that closes it.
///
/// The word is 0 (not asked), or bit 63 (asked) with bit 62 (forced) and
/// the reconnect hint in milliseconds in the low bits.
#[derive(Debug, Default)]
struct Signal {
    state: AtomicU64,
    waker: Mutex<Option<Waker>>,
}

impl Signal {
    const ASKED: u64 = 1 << 63;
    const FORCED: u64 = 1 << 62;
    const HINT: u64 = Self::FORCED - 1;

    fn encode(req: &CloseRequest) -> u64 {
        let ms = u64::try_from(req.reconnect_after.as_millis())
            .unwrap_or(u64::MAX)
            .min(Self::HINT);
        Self::ASKED | if req.force { Self::FORCED } else { 0 } | ms
    }

    fn decode(state: u64) -> Option<CloseRequest> {
        (state & Self::ASKED != 0).then(|| CloseRequest {
            force: state & Self::FORCED != 0,
            reconnect_after: Duration::from_millis(state & Self::HINT),
        })
    }

    /// Raises `req`: a forced close always replaces a gentle one; a gentle
    /// one never downgrades a forced one or repeats itself.
    fn raise(&self, req: &CloseRequest) {
        let new = Self::encode(req);
        let raised = self
            .state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |current| {
                let upgrade = current == 0 || (current & Self::FORCED == 0 && req.force);
                upgrade.then_some(new)
            })
            .is_ok();
        if raised {
            let waker = self.waker.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(waker) = waker {
                waker.wake();
            }
        }
    }

    /// Keeps `waker` to be woken by the next [`raise`](Self::raise).
    fn park(&self, waker: &Waker) {
        let mut slot = self.waker.lock().unwrap_or_else(|p| p.into_inner());
        match slot.as_ref() {
            Some(kept) if kept.will_wake(waker) => {}
            _ => *slot = Some(waker.clone()),
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.unregister(self.id);
    }
}
