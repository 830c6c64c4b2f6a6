//! Embedded durable store: an append-only log on local disk, no server.
//!
//! The store is a directory of segment files. Every claim, renewal,
//! completion, release and removal appends one checksummed record to the
//! newest segment. Completions, releases and removals are `fdatasync`ed
//! before the call returns, so a stored result survives a process restart
//! and a crash (`kill -9`, power loss). Claims are too by default (see
//! [`EmbeddedStore::durable_claims`]): after a crash and a restart, a key
//! whose request was running when the process died is not executed again.
//!
//! - **Group commit.** One writer thread appends every record queued while
//!   the previous sync ran with one `write` and one `fdatasync`, so N
//!   concurrent requests share one sync. The disk sees a sequential append,
//!   not the scattered page writes of a B-tree.
//! - **In-memory index.** A sharded map from key to state, fingerprint,
//!   deadlines and the record's place on disk answers claims without
//!   touching the disk; only a replay reads its stored result back (one
//!   positioned read on tokio's blocking pool). No lock is held across
//!   requests: each key's shard is locked for a few map operations.
//! - **Compaction.** Records superseded, released, removed or expired are
//!   dead bytes. When at least half the oldest segment is dead (or dead
//!   bytes outgrow live ones by two segments), the writer appends that
//!   segment's live records to the newest one and deletes it; oldest first,
//!   so a release record never outlives the records it cancels. A claim
//!   whose lease lapsed under a locking lease is live until its lock ends,
//!   so compaction carries it along until then.
//! - **Recovery.** Opening reads the segments in order and rebuilds the
//!   index; the last record of a key wins. A torn append at the end of the
//!   newest segment (a crash mid-write) ends the log there and is cut off,
//!   as a database's write-ahead log does; damage anywhere else is reported
//!   with the file and byte offset, and nothing is opened.
//!
//! # Format
//!
//! Segments are named `<sequence>.log` and start with a magic naming the
//! format version (`KEELIDX2`) and the fencing-token counter when the
//! segment began. Each record holds its kind (claim, result, release,
//! removal), the key, the fencing token, the fingerprint, the payload (a
//! result's bytes), a BLAKE3 checksum, and two deadlines in milliseconds
//! since the Unix epoch: for a claim, when its lease ends and when its
//! record ends (the lease end plus the lock time under
//! [`Lapse::Lock`](crate::store::Lapse::Lock), the lease end itself under
//! [`Lapse::Free`](crate::store::Lapse::Free)); for a result, when it
//! expires. A renewal is a claim record for the same token with later
//! deadlines.
//!
//! Segments of the previous format (`KEELIDX1`) are read as they were
//! meant: their claim records carry one deadline, which is taken as the
//! lease end with a lapse that frees the key. They are never appended to:
//! opening such a directory starts a new segment, and compaction rewrites
//! their live records in the current format. A keel from before this
//! format cannot read it (it would delete the newest segment as one whose
//! header a crash cut short, and refuse the others): do not downgrade over
//! a directory this version has written. A directory
//! holding a `KEELIDX` segment of a later version, or the single file of
//! the older redb-based store, is refused rather than opened empty.
//!
//! # Leases, lapses and restarts
//!
//! A claim's record carries its lease end and its record's end, so a
//! restart reads the claim back as it was: in flight until the lease ends,
//! then, under a locking lease, abandoned ([`Claim::Abandoned`]) until its
//! lock ends, or, under a freeing lease, free. The holder of a claim read
//! back after a restart died with the process that held it and never
//! completes it: killing the process (`kill -9`) while a request runs locks
//! that request's key instead of letting a retry run it a second time.
//!
//! A renewal is written to the log before [`Store::renew`] returns (so a
//! full disk is reported to the renewer) but never synced on its own: the
//! next synced write (any claim with durable claims on, any completion,
//! release or removal) carries it to the disk. A `kill -9` cannot lose it
//! (the kernel has it); a power loss right after it can. Then the log
//! holds the claim's previous lease, which ends sooner than the renewal
//! said: the key locks (or, under a freeing lease, frees) earlier, but its
//! holder died in the same crash, so no second execution can overlap the
//! first. A lost renewal is therefore safe, and not worth a sync each.
//!
//! [`Store::remove`] writes a removal record and syncs it before it
//! returns, so a removed key stays free after a restart. Fencing tokens
//! come from one counter, recorded in every record and in each segment's
//! header, so they strictly increase per key across release, expiry,
//! removal, compaction and restarts.
//!
//! # Consistency
//!
//! The store serves one process on one machine: a lock file keeps a second
//! store (in this process or another) out of its directory, and nothing
//! is shared across machines (use Redis or PostgreSQL for that). Within
//! the process every operation is atomic per key. Across crashes:
//!
//! - with durable claims (the default), a claim whose [`Store::claim`]
//!   returned survives `kill -9` and power loss, and its key stays locked
//!   after the restart (in flight, then abandoned or free by its lease);
//!   a stored result survives both whatever the setting;
//! - without durable claims, a claim is answered before its record is
//!   written and is synced by a later write (the next group commit with a
//!   synced record in it). A `kill -9` loses only claims whose records the
//!   writer had not handed to the kernel yet (a millisecond or so); a power
//!   loss can lose the claims made since the last synced write. A lost
//!   claim leaves its key free after the restart, so a retry runs the
//!   operation again.
//!
//! # A full disk
//!
//! When a write or sync fails because the disk (or the user's quota) is
//! full, the writer cuts the log back to where the failed batch began, so
//! nothing already stored is lost, and every caller of that batch gets
//! [`StoreError::Full`]:
//!
//! - a new claim is refused (and leaves no trace in the index). Without
//!   durable claims, a claim is answered before its write, so those
//!   answered before the writer first meets the full disk stay held in
//!   memory for their holders (their records are lost, as a crash would
//!   lose them); from that failure on, until a write succeeds again, every
//!   new claim waits for its write and is refused;
//! - claims on keys already held, abandoned or completed need no write and
//!   are answered as always: stored results are replayed from disk;
//! - a completion that cannot be written returns the error and leaves the
//!   claim held by its holder, who may retry it; if it never succeeds, the
//!   claim lapses and, under a locking lease, locks the key;
//! - a release or removal that cannot be written returns the error and
//!   leaves the key as it was;
//! - a renewal that cannot be written returns the error, but the lease is
//!   extended in memory all the same (its holder is still working; only a
//!   crash would show the shorter lease on disk, which is safe, as above).
//!
//! The writer goes on: once space comes back the next write succeeds and
//! claims work again, without a restart. Other write failures (an I/O
//! error) are handled the same way but reported as
//! [`StoreError::Unavailable`]. Compaction and segment rotation that fail
//! are retried a second later.
//!
//! Expiry uses the wall clock (records outlive the process). Expired
//! records are ignored on read and dropped from the index by
//! [`Store::purge_expired`], which then compacts what that freed before it
//! returns; run it periodically with [`spawn_purger`].
//!
//! The index holds every live key (about 160 bytes each plus the key) but
//! not the stored results, which stay on disk.
//!
//! ```
//! use keel_idempotency::embedded::EmbeddedStore;
//! use keel_idempotency::store::{Claim, Fingerprint, Lease, Store, StoreKey};
//! use std::time::Duration;
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let dir = tempfile::tempdir().unwrap();
//! let store = EmbeddedStore::open_dir(dir.path()).unwrap();
//! let key = StoreKey::new("k").unwrap();
//! let Claim::Acquired { token } = store.claim(&key, Fingerprint::from_bytes([0; 32]), Lease::freeing(Duration::from_secs(5))).await.unwrap()
//! else { panic!() };
//! store.complete(&key, token, b"done", Duration::from_secs(60)).await.unwrap();
//! drop(store);
//!
//! // Reopened (as after a restart), the record is still there.
//! let store = EmbeddedStore::open_dir(dir.path()).unwrap();
//! let Claim::Completed { payload, .. } = store.claim(&key, Fingerprint::from_bytes([0; 32]), Lease::freeing(Duration::from_secs(5))).await.unwrap()
//! else { panic!() };
//! assert_eq!(payload, b"done");
//! # });
//! ```

mod log;

use std::collections::HashMap;
use std::fs::{File, OpenOptions, TryLockError};
use std::hash::{BuildHasher, RandomState};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::oneshot;

use self::log::{BadHeader, Decoded, Kind, Meta, SEGMENT_HEADER, Segment};
use crate::store::{
    BoxFuture, Claim, FencingToken, Fingerprint, KeyState, Lease, Store, StoreError, StoreKey,
};

/// The lock file [`EmbeddedStore::open_dir`] holds in its directory.
pub const LOCK_FILE: &str = "LOCK";

/// The single file earlier versions kept their records in (redb).
const LEGACY_FILE: &str = "idempotency.redb";

/// How often and how far apart opening tries the directory's lock: half a
/// second in all.
const LOCK_ATTEMPTS: u32 = 50;
const LOCK_RETRY: Duration = Duration::from_millis(10);

/// The most records one group commit takes.
const MAX_BATCH: usize = 1024;

/// Settings of an [`EmbeddedStore`].
///
/// ```
/// use keel_idempotency::embedded::EmbeddedConfig;
/// let config = EmbeddedConfig::default().segment_bytes(16 << 20).durable_claims(false);
/// assert_eq!(config.segment_size(), 16 << 20);
/// ```
#[derive(Clone, Debug)]
pub struct EmbeddedConfig {
    segment_bytes: u64,
    durable_claims: bool,
}

impl Default for EmbeddedConfig {
    /// 64 MiB segments, durable claims.
    fn default() -> Self {
        Self {
            segment_bytes: 64 << 20,
            durable_claims: true,
        }
    }
}

impl EmbeddedConfig {
    /// The size at which the newest segment is sealed and a new one begun
    /// (at least 4 KiB). Smaller segments are compacted sooner and in
    /// smaller steps; each compaction step reads one whole segment.
    ///
    /// ```
    /// # use keel_idempotency::embedded::EmbeddedConfig;
    /// assert_eq!(EmbeddedConfig::default().segment_bytes(1).segment_size(), 4096);
    /// ```
    pub fn segment_bytes(mut self, bytes: u64) -> Self {
        self.segment_bytes = bytes.max(4096);
        self
    }

    /// The segment size set.
    ///
    /// ```
    /// # use keel_idempotency::embedded::EmbeddedConfig;
    /// assert_eq!(EmbeddedConfig::default().segment_size(), 64 << 20);
    /// ```
    pub fn segment_size(&self) -> u64 {
        self.segment_bytes
    }

    /// Whether claims are synced before [`Store::claim`] returns; see
    /// [`EmbeddedStore::durable_claims`].
    ///
    /// ```
    /// # use keel_idempotency::embedded::EmbeddedConfig;
    /// let _ = EmbeddedConfig::default().durable_claims(false);
    /// ```
    pub fn durable_claims(mut self, on: bool) -> Self {
        self.durable_claims = on;
        self
    }
}

/// A snapshot of an [`EmbeddedStore`]'s size, from [`EmbeddedStore::stats`].
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// let store = keel_idempotency::embedded::EmbeddedStore::open_dir(dir.path()).unwrap();
/// let stats = store.stats();
/// assert_eq!((stats.entries, stats.segments, stats.dead_bytes), (0, 1, 0));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct EmbeddedStats {
    /// Keys in the index (live and abandoned claims and results; expired
    /// ones until purged).
    pub entries: usize,
    /// Segment files.
    pub segments: usize,
    /// Bytes in the segment files.
    pub bytes: u64,
    /// Bytes of records compaction would drop.
    pub dead_bytes: u64,
    /// Bytes of a torn append cut off the end of the log when the store
    /// was opened.
    pub truncated_on_open: u64,
}

/// Where [`EmbeddedStore::inject_faults`] makes the log writer fail.
///
/// ```
/// use keel_idempotency::embedded::FaultPoint;
/// assert_ne!(FaultPoint::Write, FaultPoint::Sync);
/// ```
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultPoint {
    /// An append to the log (a batch of records, or a compaction's copies).
    /// Half the bytes reach the file first, as when a disk fills up
    /// mid-write.
    Write,
    /// A data sync of the log (after a batch, a compaction's copies, or
    /// before a segment is sealed).
    Sync,
}

/// The error an injected fault fails with; see
/// [`EmbeddedStore::inject_faults`].
///
/// ```
/// use keel_idempotency::embedded::FaultError;
/// let full = FaultError::Os(28); // ENOSPC
/// assert_eq!(full.to_io().kind(), std::io::ErrorKind::StorageFull);
/// assert_eq!(FaultError::Kind(std::io::ErrorKind::Other).to_io().kind(), std::io::ErrorKind::Other);
/// ```
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultError {
    /// An error of this kind, with a message naming it as injected.
    Kind(std::io::ErrorKind),
    /// The operating system's error with this number (`ENOSPC` is 28 and
    /// `EDQUOT` 122 on Linux).
    Os(i32),
}

impl FaultError {
    /// The I/O error to fail with.
    ///
    /// ```
    /// # use keel_idempotency::embedded::FaultError;
    /// assert_eq!(FaultError::Os(5).to_io().raw_os_error(), Some(5));
    /// ```
    pub fn to_io(self) -> std::io::Error {
        match self {
            Self::Kind(kind) => std::io::Error::new(kind, "injected fault"),
            Self::Os(code) => std::io::Error::from_raw_os_error(code),
        }
    }
}

/// Faults planned for one [`FaultPoint`].
struct FaultSlot {
    left: AtomicU32,
    error: Mutex<FaultError>,
}

impl FaultSlot {
    fn new() -> Self {
        Self {
            left: AtomicU32::new(0),
            error: Mutex::new(FaultError::Kind(std::io::ErrorKind::Other)),
        }
    }

    /// The error to fail this operation with, if a fault is planned.
    fn take(&self) -> Option<std::io::Error> {
        // One relaxed load on the path of every batch when nothing is
        // planned.
        if self.left.load(Ordering::Relaxed) == 0 {
            return None;
        }
        self.left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .ok()
            .map(|_| lock(&self.error).to_io())
    }
}

/// The writer's planned failures (a test hook).
struct Faults {
    write: FaultSlot,
    sync: FaultSlot,
}

impl Faults {
    fn slot(&self, point: FaultPoint) -> &FaultSlot {
        match point {
            FaultPoint::Write => &self.write,
            FaultPoint::Sync => &self.sync,
        }
    }
}

/// Where a record is: its segment and byte range.
#[derive(Clone, Debug)]
struct Loc {
    seg: Arc<Segment>,
    offset: u64,
    len: u32,
}

impl Loc {
    fn is(&self, seg: &Arc<Segment>, offset: u64) -> bool {
        Arc::ptr_eq(&self.seg, seg) && self.offset == offset
    }

    fn bury(&self) {
        self.seg.bury(self.len);
    }
}

/// One key's current state.
struct Entry {
    completed: bool,
    /// A completion of this claim is on its way to the disk: the claim can
    /// no longer be renewed, completed or released (so no record of it can
    /// follow its result in the log), unless the completion fails.
    completing: bool,
    token: u64,
    /// When a claim's lease ends (ms since the epoch); unused for a result.
    lease_ms: u64,
    /// When the entry ends: a result's expiry, a claim's lease end plus its
    /// lock time (the lease end itself under a freeing lease).
    expires_ms: u64,
    fingerprint: Fingerprint,
    /// The record that says so; `None` while a claim's record is still on
    /// its way to the disk.
    loc: Option<Loc>,
}

impl Entry {
    /// The claim `token` holds on this key right now.
    fn held_by(&self, token: FencingToken, now: u64) -> bool {
        !self.completed && !self.completing && self.token == token.get() && self.lease_ms > now
    }

    fn bury(&self) {
        if let Some(loc) = &self.loc {
            loc.bury();
        }
    }
}

type Map = HashMap<Box<str>, Entry>;

/// One shard on cache lines of its own (no false sharing between shards).
#[repr(align(128))]
#[derive(Default)]
struct Shard(Mutex<Map>);

/// The in-memory index (key to state, spread over shards) and the little
/// state the callers and the writer share.
struct Index {
    shards: Box<[Shard]>,
    hasher: RandomState,
    last_token: AtomicU64,
    /// Set by the writer when a write failed for want of space, cleared by
    /// the next write that succeeds: while it is set, every new claim waits
    /// for its record to be written.
    disk_full: AtomicBool,
    /// How far this store's clock runs ahead of the wall clock (a test
    /// hook, [`EmbeddedStore::advance_clock`]).
    skew_ms: AtomicU64,
}

impl Index {
    fn new() -> Self {
        let cores = std::thread::available_parallelism().map_or(4, |n| n.get());
        let n = (cores * 16).next_power_of_two().clamp(16, 1024);
        Self {
            shards: (0..n).map(|_| Shard::default()).collect(),
            hasher: RandomState::new(),
            last_token: AtomicU64::new(0),
            disk_full: AtomicBool::new(false),
            skew_ms: AtomicU64::new(0),
        }
    }

    fn shard(&self, key: &str) -> MutexGuard<'_, Map> {
        // The shard count is a power of two.
        let i = self.hasher.hash_one(key) as usize & (self.shards.len() - 1);
        lock(&self.shards[i].0)
    }

    fn next_token(&self) -> u64 {
        self.last_token.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The store's time: ms since the epoch.
    fn now(&self) -> u64 {
        now_ms().saturating_add(self.skew_ms.load(Ordering::Relaxed))
    }

    /// Applies a record read back when opening the store.
    fn recover(&self, r: &log::Record<'_>, loc: Loc, now: u64) {
        let m = &r.meta;
        let mut map = self.shard(r.key);
        // The writer logs each key's records in the order the index
        // changed, so these never occur in a log it wrote; should one
        // anyway, an earlier claim's record, or a record of a claim that
        // follows its own result, must not bring that claim back.
        let stale = map.get(r.key).is_some_and(|e| {
            m.token < e.token || (m.token == e.token && e.completed && !m.kind.frees())
        });
        if stale {
            loc.bury();
            return;
        }
        if m.kind.frees() || m.expires_ms <= now {
            // The key is free from here on.
            if let Some(old) = map.remove(r.key) {
                old.bury();
            }
            loc.bury();
            return;
        }
        let entry = Entry {
            completed: m.kind == Kind::Completed,
            completing: false,
            token: m.token,
            lease_ms: m.lease_ms,
            expires_ms: m.expires_ms,
            fingerprint: m.fingerprint,
            loc: Some(loc),
        };
        if let Some(old) = map.insert(r.key.into(), entry) {
            old.bury();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn add_ms(now: u64, d: Duration) -> u64 {
    now.saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn ms(d: u64) -> Duration {
    Duration::from_millis(d)
}

/// A claim record (or a renewal: the same with later deadlines).
fn claim_record(key: &str, token: u64, lease_ms: u64, expires_ms: u64, fp: Fingerprint) -> Vec<u8> {
    let mut record = Vec::new();
    let meta = Meta {
        kind: Kind::InFlight,
        token,
        lease_ms,
        expires_ms,
        fingerprint: fp,
    };
    log::encode(&mut record, &meta, key, &[]);
    record
}

/// A durable [`Store`] in a directory of log segments. See the
/// [module docs](self).
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
    durable_claims: bool,
}

struct Inner {
    index: Arc<Index>,
    jobs: Option<mpsc::Sender<Msg>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Failures planned for the writer (a test hook).
    faults: Arc<Faults>,
    /// Every segment, oldest first; the last is the one appended to.
    segments: Arc<Mutex<Vec<Arc<Segment>>>>,
    truncated_on_open: u64,
    dir: PathBuf,
    /// Holds the directory's lock until the store is dropped.
    _lock: File,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the queue ends the writer after its last batch; joining
        // it closes the files before the store's drop returns, so the
        // directory can be reopened at once.
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The outcome of a queued record, for a caller that waits for it.
type Reply = oneshot::Receiver<Result<(), StoreError>>;

impl Inner {
    /// Queues `record` for the writer: synced if `durable`; with `wait`,
    /// the returned receiver gets the outcome once the record is written
    /// (and synced), and `undo` is applied to the index if it cannot be.
    fn queue(
        &self,
        record: Vec<u8>,
        durable: bool,
        wait: bool,
        undo: Undo,
    ) -> Result<Option<Reply>, StoreError> {
        let (reply, rx) = if wait {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let job = Job {
            record,
            durable,
            reply,
            undo,
        };
        let sent = self
            .jobs
            .as_ref()
            .is_some_and(|jobs| jobs.send(Msg::Write(job)).is_ok());
        if sent { Ok(rx) } else { Err(self.stopped()) }
    }

    /// Queues `record`, synced if `durable`, and returns the receiver of
    /// its outcome.
    fn queue_waiting(
        &self,
        record: Vec<u8>,
        durable: bool,
        undo: Undo,
    ) -> Result<Reply, StoreError> {
        self.queue(record, durable, true, undo)?
            .ok_or_else(|| self.stopped())
    }

    fn stopped(&self) -> StoreError {
        StoreError::Unavailable(format!(
            "embedded store {}: the writer has stopped (shutting down)",
            self.dir.display(),
        ))
    }

    async fn wait(&self, rx: Reply) -> Result<(), StoreError> {
        rx.await.map_err(|_| self.stopped())?
    }
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("dir", &self.inner.dir)
            .field("durable_claims", &self.durable_claims)
            .finish()
    }
}

impl EmbeddedStore {
    /// Opens (or creates) the store in directory `dir` with the default
    /// [`EmbeddedConfig`], creating the directory if missing.
    ///
    /// ```
    /// let dir = tempfile::tempdir().unwrap();
    /// let store = keel_idempotency::embedded::EmbeddedStore::open_dir(dir.path().join("keel-data")).unwrap();
    /// assert!(store.path().ends_with("keel-data"));
    /// ```
    pub fn open_dir(dir: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_dir_with(dir, EmbeddedConfig::default())
    }

    /// Opens (or creates) the store in directory `dir` with `config`.
    ///
    /// Fails with [`StoreError::Unavailable`] if another store (in this
    /// process or another) has the directory open (after waiting up to half
    /// a second for one that is closing) or it cannot be read, or it holds
    /// files this version does not read (a later format, the older redb
    /// file); with [`StoreError::Corrupt`] naming the file and byte offset
    /// if a segment other than the newest is damaged; and with
    /// [`StoreError::Full`] if the disk has no room for a new segment.
    ///
    /// ```
    /// use keel_idempotency::embedded::{EmbeddedConfig, EmbeddedStore};
    /// let dir = tempfile::tempdir().unwrap();
    /// let store = EmbeddedStore::open_dir_with(dir.path(), EmbeddedConfig::default()).unwrap();
    /// // One store per directory at a time.
    /// assert!(EmbeddedStore::open_dir(dir.path()).is_err());
    /// drop(store);
    /// assert!(EmbeddedStore::open_dir(dir.path()).is_ok());
    /// ```
    pub fn open_dir_with(
        dir: impl AsRef<Path>,
        config: EmbeddedConfig,
    ) -> Result<Self, StoreError> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot create the store directory {}: {e}",
                dir.display()
            ))
        })?;
        let lock_path = dir.join(LOCK_FILE);
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| log::io_err(&lock_path, &e))?;
        // A lock can outlive its store for a moment: a process still
        // exiting, or a child process forked by another thread just then
        // (it shares the descriptor until its exec closes it). So wait a
        // little before calling the directory taken.
        let mut attempts = LOCK_ATTEMPTS;
        loop {
            match lock_file.try_lock() {
                Ok(()) => break,
                Err(TryLockError::WouldBlock) if attempts > 1 => {
                    attempts -= 1;
                    std::thread::sleep(LOCK_RETRY);
                }
                Err(TryLockError::WouldBlock) => {
                    return Err(StoreError::Unavailable(format!(
                        "embedded store {} is in use by another store (this process or another)",
                        dir.display()
                    )));
                }
                Err(TryLockError::Error(e)) => return Err(log::io_err(&lock_path, &e)),
            }
        }
        let legacy = dir.join(LEGACY_FILE);
        if legacy.exists() {
            return Err(StoreError::Unavailable(format!(
                "{} was written by an earlier keel (redb format), which this version does not \
                 read; move it out of {} to start an empty store (its records are not carried over)",
                legacy.display(),
                dir.display()
            )));
        }
        let index = Arc::new(Index::new());
        let (segments, truncated_on_open) = recover(&dir, &index)?;
        let segments = Arc::new(Mutex::new(segments));
        let Some(active) = lock(&segments).last().cloned() else {
            return Err(StoreError::Unavailable("no segment after recovery".into()));
        };
        let faults = Arc::new(Faults {
            write: FaultSlot::new(),
            sync: FaultSlot::new(),
        });
        let writer = Writer {
            dir: dir.clone(),
            index: index.clone(),
            segments: segments.clone(),
            active_len: active.len.load(Ordering::Relaxed),
            active,
            segment_bytes: config.segment_bytes,
            buf: Vec::new(),
            maintain_after: Instant::now(),
            faults: faults.clone(),
        };
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("keel-idem-log".into())
            .spawn(move || writer.run(&rx))
            .map_err(|e| {
                StoreError::Unavailable(format!(
                    "cannot start the embedded store's writer thread: {e}"
                ))
            })?;
        Ok(Self {
            inner: Arc::new(Inner {
                index,
                jobs: Some(tx),
                thread: Some(thread),
                faults,
                segments,
                truncated_on_open,
                dir,
                _lock: lock_file,
            }),
            durable_claims: config.durable_claims,
        })
    }

    /// Whether claims are synced before [`Store::claim`] returns (default
    /// `true`). Completions, releases and removals always are; renewals
    /// never are (a lost renewal is safe: see the
    /// [module docs](self#leases-lapses-and-restarts)).
    ///
    /// With `false`, a claim costs no sync (it is made durable by the next
    /// synced write), which roughly halves the disk work of a new request.
    /// The price: if the process crashes while a request is in flight, its
    /// claim may be lost, and a retry after the restart may run the
    /// operation again (see the [module docs](self#consistency)).
    /// Completed records are never lost.
    ///
    /// ```
    /// let dir = tempfile::tempdir().unwrap();
    /// let store = keel_idempotency::embedded::EmbeddedStore::open_dir(dir.path()).unwrap().durable_claims(false);
    /// ```
    pub fn durable_claims(mut self, on: bool) -> Self {
        self.durable_claims = on;
        self
    }

    /// The store's directory.
    ///
    /// ```
    /// let dir = tempfile::tempdir().unwrap();
    /// let store = keel_idempotency::embedded::EmbeddedStore::open_dir(dir.path()).unwrap();
    /// assert!(store.path().join(keel_idempotency::embedded::LOCK_FILE).exists());
    /// ```
    pub fn path(&self) -> &Path {
        &self.inner.dir
    }

    /// Counts keys, segments and bytes (walks the index: for tests and
    /// status pages, not for every request).
    ///
    /// ```
    /// let dir = tempfile::tempdir().unwrap();
    /// let store = keel_idempotency::embedded::EmbeddedStore::open_dir(dir.path()).unwrap();
    /// assert_eq!(store.stats().entries, 0);
    /// ```
    pub fn stats(&self) -> EmbeddedStats {
        let entries = self
            .inner
            .index
            .shards
            .iter()
            .map(|s| lock(&s.0).len())
            .sum();
        let segments = lock(&self.inner.segments);
        EmbeddedStats {
            entries,
            segments: segments.len(),
            bytes: segments.iter().map(|s| s.len.load(Ordering::Relaxed)).sum(),
            dead_bytes: segments
                .iter()
                .map(|s| s.dead.load(Ordering::Relaxed))
                .sum(),
            truncated_on_open: self.inner.truncated_on_open,
        }
    }

    /// Test hook: the log writer's next `times` operations at `point` fail
    /// with `error` (`times` 0 cancels what is planned). Writes and syncs
    /// are counted apart; a failed write fails its whole batch, as a real
    /// one would, and is cut back off the log.
    ///
    /// ```
    /// use keel_idempotency::embedded::{EmbeddedStore, FaultError, FaultPoint};
    /// use keel_idempotency::store::{Fingerprint, Lease, Store, StoreError, StoreKey};
    /// use std::time::Duration;
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let dir = tempfile::tempdir().unwrap();
    /// let store = EmbeddedStore::open_dir(dir.path()).unwrap();
    /// store.inject_faults(FaultPoint::Write, 1, FaultError::Os(28)); // ENOSPC
    /// let key = StoreKey::new("k").unwrap();
    /// let lease = Lease::freeing(Duration::from_secs(5));
    /// let refused = store.claim(&key, Fingerprint::from_bytes([0; 32]), lease).await;
    /// assert!(matches!(refused, Err(StoreError::Full(_))));
    /// assert_eq!(store.faults_left(FaultPoint::Write), 0);
    /// assert!(store.claim(&key, Fingerprint::from_bytes([0; 32]), lease).await.is_ok());
    /// # });
    /// ```
    #[doc(hidden)]
    pub fn inject_faults(&self, point: FaultPoint, times: u32, error: FaultError) {
        let slot = self.inner.faults.slot(point);
        *lock(&slot.error) = error;
        slot.left.store(times, Ordering::Relaxed);
    }

    /// Test hook: how many faults planned by
    /// [`EmbeddedStore::inject_faults`] at `point` are still to strike.
    ///
    /// ```
    /// use keel_idempotency::embedded::{EmbeddedStore, FaultError, FaultPoint};
    /// let dir = tempfile::tempdir().unwrap();
    /// let store = EmbeddedStore::open_dir(dir.path()).unwrap();
    /// store.inject_faults(FaultPoint::Sync, 3, FaultError::Os(5));
    /// assert_eq!(store.faults_left(FaultPoint::Sync), 3);
    /// ```
    #[doc(hidden)]
    pub fn faults_left(&self, point: FaultPoint) -> u32 {
        self.inner.faults.slot(point).left.load(Ordering::Relaxed)
    }

    /// Test hook: moves this store's clock `by` further ahead of the wall
    /// clock, so tests can run leases, locks and TTLs out without waiting.
    /// Records are written with the moved clock's deadlines; a store opened
    /// later reads them against the wall clock again.
    ///
    /// ```
    /// use keel_idempotency::embedded::EmbeddedStore;
    /// use keel_idempotency::store::{Claim, Fingerprint, Lease, Store, StoreKey};
    /// use std::time::Duration;
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let dir = tempfile::tempdir().unwrap();
    /// let store = EmbeddedStore::open_dir(dir.path()).unwrap();
    /// let key = StoreKey::new("k").unwrap();
    /// let lease = Lease::locking(Duration::from_secs(30), Duration::from_secs(3600));
    /// store.claim(&key, Fingerprint::from_bytes([1; 32]), lease).await.unwrap();
    /// store.advance_clock(Duration::from_secs(31));
    /// assert!(matches!(
    ///     store.claim(&key, Fingerprint::from_bytes([1; 32]), lease).await.unwrap(),
    ///     Claim::Abandoned { .. }
    /// ));
    /// # });
    /// ```
    #[doc(hidden)]
    pub fn advance_clock(&self, by: Duration) {
        let by = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        let skew = &self.inner.index.skew_ms;
        let _ = skew.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
            Some(s.saturating_add(by))
        });
    }

    /// Reads a stored result back from its record.
    async fn read_payload(&self, key: &StoreKey, loc: Option<Loc>) -> Result<Vec<u8>, StoreError> {
        let Some(loc) = loc else {
            return Err(StoreError::Corrupt(
                "embedded store: a result without a record".into(),
            ));
        };
        let key = key.as_str().to_owned();
        tokio::task::spawn_blocking(move || read_result(&loc, &key))
            .await
            .map_err(|e| StoreError::Unavailable(format!("embedded store read failed: {e}")))?
    }
}

/// The payload of the completed record at `loc`, checked against its
/// checksum and key.
fn read_result(loc: &Loc, key: &str) -> Result<Vec<u8>, StoreError> {
    let mut buf = loc
        .seg
        .read_at(loc.offset, loc.len as usize)
        .map_err(|e| log::io_err(&loc.seg.path, &e))?;
    let corrupt = |why: &str| {
        StoreError::Corrupt(format!(
            "{}: record at byte {}: {why}",
            loc.seg.path.display(),
            loc.offset
        ))
    };
    let range = match log::decode(&buf, loc.seg.version) {
        Decoded::Record(r) if r.meta.kind == Kind::Completed && r.key == key => {
            let start = r.payload.as_ptr() as usize - buf.as_ptr() as usize;
            start..start + r.payload.len()
        }
        Decoded::Record(_) => return Err(corrupt("not this key's result")),
        Decoded::Truncated => return Err(corrupt("cut short")),
        Decoded::Invalid(why) => return Err(corrupt(why)),
    };
    buf.truncate(range.end);
    buf.drain(..range.start);
    Ok(buf)
}

/// What a claim found under its shard's lock.
enum Found {
    /// Held or abandoned: answered from the index.
    Answer(Claim),
    Completed(Option<Loc>, Fingerprint),
    Acquired(u64, Option<Reply>),
}

/// What an inspection found under its shard's lock.
enum Seen {
    State(KeyState),
    Completed(Option<Loc>, Fingerprint, Duration),
}

impl Store for EmbeddedStore {
    fn claim<'a>(
        &'a self,
        key: &'a StoreKey,
        fingerprint: Fingerprint,
        lease: Lease,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        Box::pin(async move {
            let index = &self.inner.index;
            let now = index.now();
            let k = key.as_str();
            let found = {
                let mut map = index.shard(k);
                match map.get(k).filter(|e| e.expires_ms > now) {
                    Some(e) if e.completed => Found::Completed(e.loc.clone(), e.fingerprint),
                    Some(e) if e.lease_ms > now => Found::Answer(Claim::InFlight {
                        fingerprint: e.fingerprint,
                        retry_after: ms(e.lease_ms - now),
                    }),
                    // The lease lapsed and the record lives on: a locking
                    // lease's lock.
                    Some(e) => Found::Answer(Claim::Abandoned {
                        fingerprint: e.fingerprint,
                    }),
                    None => {
                        let token = index.next_token();
                        let lease_ms = add_ms(now, lease.hold);
                        let expires_ms = add_ms(now, lease.record_life());
                        let record = claim_record(k, token, lease_ms, expires_ms, fingerprint);
                        // While the disk is full, even a claim that need
                        // not be synced waits for its write, so a claim the
                        // disk cannot hold is refused, not answered.
                        let wait = self.durable_claims || index.disk_full.load(Ordering::Relaxed);
                        // Queued under the shard's lock, so the log holds
                        // this key's records in the order the index saw.
                        let rx =
                            self.inner
                                .queue(record, self.durable_claims, wait, Undo::Claim)?;
                        let entry = Entry {
                            completed: false,
                            completing: false,
                            token,
                            lease_ms,
                            expires_ms,
                            fingerprint,
                            loc: None,
                        };
                        if let Some(old) = map.insert(k.into(), entry) {
                            old.bury();
                        }
                        Found::Acquired(token, rx)
                    }
                }
            };
            match found {
                Found::Answer(claim) => Ok(claim),
                Found::Completed(loc, fingerprint) => {
                    let payload = self.read_payload(key, loc).await?;
                    Ok(Claim::Completed {
                        fingerprint,
                        payload,
                    })
                }
                Found::Acquired(token, rx) => {
                    if let Some(rx) = rx {
                        self.inner.wait(rx).await?;
                    }
                    Ok(Claim::Acquired {
                        token: FencingToken::new(token),
                    })
                }
            }
        })
    }

    fn renew<'a>(
        &'a self,
        key: &'a StoreKey,
        token: FencingToken,
        lease: Lease,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let now = self.inner.index.now();
            let k = key.as_str();
            let rx = {
                let mut map = self.inner.index.shard(k);
                let Some(e) = map.get_mut(k).filter(|e| e.held_by(token, now)) else {
                    return Err(StoreError::Fenced);
                };
                let lease_ms = add_ms(now, lease.hold);
                let expires_ms = add_ms(now, lease.record_life());
                let record = claim_record(k, token.get(), lease_ms, expires_ms, e.fingerprint);
                // Written before the renewal returns, so a full disk is
                // reported, but not synced: losing it in a crash only
                // shortens the lease of a holder that died in the crash.
                let rx = self.inner.queue_waiting(record, false, Undo::Nothing)?;
                // Extended at once, whatever the write's fate: the holder
                // is working, and memory may run ahead of the disk this
                // way (a crash shows the shorter lease, which is safe).
                e.lease_ms = lease_ms;
                e.expires_ms = expires_ms;
                rx
            };
            self.inner.wait(rx).await
        })
    }

    fn inspect<'a>(
        &'a self,
        key: &'a StoreKey,
    ) -> BoxFuture<'a, Result<Option<KeyState>, StoreError>> {
        Box::pin(async move {
            let now = self.inner.index.now();
            let k = key.as_str();
            let seen = {
                let map = self.inner.index.shard(k);
                let Some(e) = map.get(k).filter(|e| e.expires_ms > now) else {
                    return Ok(None);
                };
                if e.completed {
                    Seen::Completed(e.loc.clone(), e.fingerprint, ms(e.expires_ms - now))
                } else if e.lease_ms > now {
                    Seen::State(KeyState::Held {
                        fingerprint: e.fingerprint,
                        token: FencingToken::new(e.token),
                        lease_left: ms(e.lease_ms - now),
                    })
                } else {
                    Seen::State(KeyState::Abandoned {
                        fingerprint: e.fingerprint,
                        token: FencingToken::new(e.token),
                        expires_in: ms(e.expires_ms - now),
                    })
                }
            };
            match seen {
                Seen::State(state) => Ok(Some(state)),
                Seen::Completed(loc, fingerprint, expires_in) => {
                    let payload = self.read_payload(key, loc).await?;
                    Ok(Some(KeyState::Completed {
                        fingerprint,
                        payload,
                        expires_in,
                    }))
                }
            }
        })
    }

    fn remove<'a>(&'a self, key: &'a StoreKey) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let now = self.inner.index.now();
            let k = key.as_str();
            let (rx, live) = {
                let mut map = self.inner.index.shard(k);
                // Nothing in the index: nothing on disk would come back
                // after a restart either (recovery drops what has expired),
                // so there is nothing to write.
                let Some(old) = map.remove(k) else {
                    return Ok(false);
                };
                let live = old.expires_ms > now;
                // Even an expired entry gets its removal logged: should the
                // wall clock step back before a restart, its record would
                // otherwise come back.
                let meta = Meta {
                    kind: Kind::Removed,
                    token: old.token,
                    lease_ms: 0,
                    expires_ms: 0,
                    fingerprint: old.fingerprint,
                };
                let mut record = Vec::new();
                log::encode(&mut record, &meta, k, &[]);
                // Out of the index at once, so nothing can be queued for
                // the removed claim behind its removal; it comes back if
                // the removal cannot be written.
                (
                    self.inner.queue_waiting(record, true, Undo::Restore(old))?,
                    live,
                )
            };
            self.inner.wait(rx).await?;
            Ok(live)
        })
    }

    fn complete<'a>(
        &'a self,
        key: &'a StoreKey,
        token: FencingToken,
        payload: &'a [u8],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            if payload.len() > log::MAX_PAYLOAD {
                return Err(StoreError::Unavailable(format!(
                    "embedded store: a {}-byte result is over the {}-byte record limit",
                    payload.len(),
                    log::MAX_PAYLOAD
                )));
            }
            let now = self.inner.index.now();
            let k = key.as_str();
            let rx = {
                let mut map = self.inner.index.shard(k);
                let Some(e) = map.get_mut(k).filter(|e| e.held_by(token, now)) else {
                    return Err(StoreError::Fenced);
                };
                let meta = Meta {
                    kind: Kind::Completed,
                    token: token.get(),
                    lease_ms: 0,
                    expires_ms: add_ms(now, ttl),
                    fingerprint: e.fingerprint,
                };
                let mut record = Vec::new();
                log::encode(&mut record, &meta, k, payload);
                // The index turns to completed once the record is on disk
                // (the writer does it), so no replay is ever served from a
                // result a crash could still lose. Meanwhile the claim
                // takes no renewal, completion or release: none of their
                // records may follow the result in the log.
                let rx = self.inner.queue_waiting(record, true, Undo::Completion)?;
                e.completing = true;
                rx
            };
            self.inner.wait(rx).await
        })
    }

    fn release<'a>(
        &'a self,
        key: &'a StoreKey,
        token: FencingToken,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let now = self.inner.index.now();
            let k = key.as_str();
            let rx = {
                let mut map = self.inner.index.shard(k);
                if !map.get(k).is_some_and(|e| e.held_by(token, now)) {
                    return Err(StoreError::Fenced);
                }
                let Some(old) = map.remove(k) else {
                    return Err(StoreError::Fenced);
                };
                let meta = Meta {
                    kind: Kind::Released,
                    token: token.get(),
                    lease_ms: 0,
                    expires_ms: 0,
                    fingerprint: old.fingerprint,
                };
                let mut record = Vec::new();
                log::encode(&mut record, &meta, k, &[]);
                // Free at once; held again if the release cannot be
                // written, as the log still says.
                self.inner.queue_waiting(record, true, Undo::Restore(old))?
            };
            self.inner.wait(rx).await
        })
    }

    fn purge_expired(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move {
            let now = self.inner.index.now();
            let mut removed = 0;
            for shard in self.inner.index.shards.iter() {
                // An abandoned claim lives until its lock ends.
                lock(&shard.0).retain(|_, e| {
                    let keep = e.expires_ms > now;
                    if !keep {
                        e.bury();
                        removed += 1;
                    }
                    keep
                });
            }
            // Dead bytes grew: have the writer compact what is worth it
            // now rather than at its next write, and wait for it, so the
            // files are settled when the purge returns.
            let (done, compacted) = oneshot::channel();
            if let Some(jobs) = &self.inner.jobs
                && jobs.send(Msg::Maintain(done)).is_ok()
            {
                let _ = compacted.await;
            }
            Ok(removed)
        })
    }

    fn name(&self) -> &'static str {
        "embedded"
    }
}

/// Reads every segment in `dir` into `index`, cutting a torn tail off the
/// newest; starts a segment in the current format when there is none (a
/// new store) or the newest is of the previous format. Returns the
/// segments, oldest first, and the bytes cut.
fn recover(dir: &Path, index: &Index) -> Result<(Vec<Arc<Segment>>, u64), StoreError> {
    let seqs = log::list_segments(dir)?;
    let now = index.now();
    let mut last_token = 0;
    let mut truncated = 0;
    let mut segments = Vec::with_capacity(seqs.len() + 1);
    for (i, &seq) in seqs.iter().enumerate() {
        let newest = i + 1 == seqs.len();
        let path = log::segment_path(dir, seq);
        let bytes = std::fs::read(&path).map_err(|e| log::io_err(&path, &e))?;
        let corrupt = |at: usize, why: &str| {
            StoreError::Corrupt(format!("{}: byte {at}: {why}", path.display()))
        };
        let (version, base) = match log::parse_segment_header(&bytes) {
            Ok(header) => header,
            Err(BadHeader::Later) => {
                return Err(StoreError::Unavailable(format!(
                    "{} was written by a later keel, in a format this version does not read; \
                     run that version, or move {} aside to start an empty store",
                    path.display(),
                    dir.display()
                )));
            }
            Err(BadHeader::Invalid) if newest => {
                // Created, but the crash came before its header was synced.
                std::fs::remove_file(&path).map_err(|e| log::io_err(&path, &e))?;
                truncated += bytes.len() as u64;
                continue;
            }
            Err(BadHeader::Invalid) => {
                return Err(corrupt(0, "not a keel log segment (bad header)"));
            }
        };
        last_token = last_token.max(base);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| log::io_err(&path, &e))?;
        let seg = Arc::new(Segment {
            seq,
            version,
            path: path.clone(),
            file,
            len: AtomicU64::new(0),
            dead: AtomicU64::new(0),
        });
        let mut at = SEGMENT_HEADER as usize;
        while at < bytes.len() {
            let why = match log::decode(&bytes[at..], version) {
                Decoded::Record(r) => {
                    last_token = last_token.max(r.meta.token);
                    let loc = Loc {
                        seg: seg.clone(),
                        offset: at as u64,
                        len: r.len as u32,
                    };
                    at += r.len;
                    index.recover(&r, loc, now);
                    continue;
                }
                Decoded::Truncated => "cut short",
                Decoded::Invalid(why) => why,
            };
            if !newest {
                return Err(corrupt(at, why));
            }
            // A torn append: the log ends at the last whole record.
            seg.file
                .set_len(at as u64)
                .and_then(|()| seg.file.sync_all())
                .map_err(|e| log::io_err(&path, &e))?;
            truncated += (bytes.len() - at) as u64;
            break;
        }
        seg.len.store(at as u64, Ordering::Relaxed);
        segments.push(seg);
    }
    index.last_token.store(last_token, Ordering::Relaxed);
    if segments.last().is_none_or(|s| s.version != log::CURRENT) {
        // Records are appended in the current format only: a directory of
        // the previous one goes on in a new segment, and its own segments
        // are compacted away in time.
        let seq = seqs.last().map_or(1, |s| s + 1);
        segments.push(create_segment(dir, seq, last_token)?);
    }
    Ok((segments, truncated))
}

/// Creates segment `seq` with its header on disk.
fn create_segment(dir: &Path, seq: u64, base_token: u64) -> Result<Arc<Segment>, StoreError> {
    let path = log::segment_path(dir, seq);
    let io = |e: std::io::Error| log::io_err(&path, &e);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(io)?;
    if let Err(e) = file
        .write_all_at(&log::segment_header(base_token), 0)
        .and_then(|()| file.sync_all())
    {
        // Leave no half-made segment behind to block the next attempt.
        let _ = std::fs::remove_file(&path);
        return Err(io(e));
    }
    log::sync_dir(dir).map_err(|e| log::io_err(dir, &e))?;
    Ok(Arc::new(Segment {
        seq,
        version: log::CURRENT,
        path: path.clone(),
        file,
        len: AtomicU64::new(SEGMENT_HEADER),
        dead: AtomicU64::new(0),
    }))
}

/// A message to the writer thread.
enum Msg {
    Write(Job),
    /// Compact what is worth it, then answer.
    Maintain(oneshot::Sender<()>),
}

/// One record to append.
struct Job {
    record: Vec<u8>,
    /// Sync before answering.
    durable: bool,
    reply: Option<oneshot::Sender<Result<(), StoreError>>>,
    /// What the index gets back if the record cannot be written (applied
    /// only when there is a caller to tell).
    undo: Undo,
}

/// How a record that could not be written is taken back out of the index.
enum Undo {
    /// Nothing changed in the index before the write (a renewal changes it
    /// and keeps the change; see [`Store::renew`]).
    Nothing,
    /// A claim: it leaves the index, unless it has moved on.
    Claim,
    /// A completion: the claim is back to held, for its holder to retry.
    Completion,
    /// A release or removal took this entry out of the index: it goes
    /// back, unless the key was claimed again meanwhile. Once the record is
    /// written, the entry's own record is dead.
    Restore(Entry),
}

/// The writer thread's state: it alone appends to the log.
struct Writer {
    dir: PathBuf,
    index: Arc<Index>,
    segments: Arc<Mutex<Vec<Arc<Segment>>>>,
    active: Arc<Segment>,
    active_len: u64,
    segment_bytes: u64,
    buf: Vec<u8>,
    /// No compaction or rotation attempt before this (set after one failed).
    maintain_after: Instant,
    faults: Arc<Faults>,
}

/// How long the writer waits after a failed compaction or rotation before
/// trying again (the disk may be full).
const MAINTAIN_BACKOFF: Duration = Duration::from_secs(1);

impl Writer {
    fn run(mut self, rx: &mpsc::Receiver<Msg>) {
        let mut batch = Vec::new();
        let mut waiting = Vec::new();
        while let Ok(first) = rx.recv() {
            for msg in std::iter::once(first).chain(std::iter::from_fn(|| rx.try_recv().ok())) {
                match msg {
                    Msg::Write(job) => batch.push(job),
                    Msg::Maintain(done) => waiting.push(done),
                }
                if batch.len() == MAX_BATCH {
                    break;
                }
            }
            self.commit(&mut batch);
            if Instant::now() >= self.maintain_after {
                let done = if self.active_len >= self.segment_bytes {
                    self.rotate()
                } else {
                    Ok(())
                };
                if done.and_then(|()| self.maintain()).is_err() {
                    // A full disk, most likely: writes go on in the
                    // current segment; try again in a while.
                    self.maintain_after = Instant::now() + MAINTAIN_BACKOFF;
                }
            }
            for done in waiting.drain(..) {
                let _ = done.send(());
            }
        }
    }

    /// Appends `self.buf` to the active segment.
    fn append(&mut self) -> std::io::Result<()> {
        if let Some(e) = self.faults.write.take() {
            // Half the bytes reach the file, as when the disk fills up.
            let half = &self.buf[..self.buf.len() / 2];
            let _ = self.active.file.write_all_at(half, self.active_len);
            return Err(e);
        }
        self.active.file.write_all_at(&self.buf, self.active_len)?;
        self.active_len += self.buf.len() as u64;
        self.active.len.store(self.active_len, Ordering::Relaxed);
        Ok(())
    }

    fn sync(&self) -> std::io::Result<()> {
        if let Some(e) = self.faults.sync.take() {
            return Err(e);
        }
        self.active.file.sync_data()
    }

    /// Writes and syncs a batch, updates the index and answers each job.
    ///
    /// If the write or the sync fails (a full disk, an I/O error), the
    /// batch is undone: the log is cut back to where the batch began (the
    /// next batch overwrites those bytes, so no page a failed sync may
    /// have dropped is relied on), the index changes of the callers told
    /// are taken back, and each gets [`StoreError::Full`] (no space) or
    /// [`StoreError::Unavailable`]. The writer goes on, so the store works
    /// again once the disk does.
    fn commit(&mut self, batch: &mut Vec<Job>) {
        if batch.is_empty() {
            return;
        }
        self.buf.clear();
        for job in batch.iter() {
            self.buf.extend_from_slice(&job.record);
        }
        let start = self.active_len;
        let durable = batch.iter().any(|j| j.durable);
        let written = self
            .append()
            .and_then(|()| if durable { self.sync() } else { Ok(()) });
        if let Err(e) = written {
            self.rewind(start);
            self.index
                .disk_full
                .store(log::is_no_space(&e), Ordering::Relaxed);
            // Latest first, so that a claim made after a release or
            // removal of its key is taken back before the released entry
            // is put back.
            for job in batch.drain(..).rev() {
                // An unsynced claim was answered already: its holder runs
                // and will complete it, so only the changes whose callers
                // hear of the failure are undone.
                if let Some(reply) = job.reply {
                    self.undo(&job.record, job.undo);
                    let _ = reply.send(Err(log::io_err(&self.active.path, &e)));
                }
            }
            return;
        }
        self.index.disk_full.store(false, Ordering::Relaxed);
        let mut offset = start;
        for job in batch.drain(..) {
            let outcome = self.settle(&job.record, offset);
            offset += job.record.len() as u64;
            if let Undo::Restore(old) = &job.undo {
                old.bury();
            }
            if let Some(reply) = job.reply {
                // A caller that went away no longer needs the answer; its
                // write stands.
                let _ = reply.send(outcome);
            }
        }
    }

    /// Cuts the active segment back to `len` after a failed batch.
    fn rewind(&mut self, len: u64) {
        self.active_len = len;
        self.active.len.store(len, Ordering::Relaxed);
        // Best effort: should the process die before the next write, the
        // bytes past `len` would read as a torn append and be cut then.
        let _ = self.active.file.set_len(len);
    }

    /// Takes a failed record's change back out of the index.
    fn undo(&self, record: &[u8], undo: Undo) {
        let Decoded::Record(r) = log::decode_own(record, log::CURRENT) else {
            return;
        };
        let token = r.meta.token;
        let mut map = self.index.shard(r.key);
        match undo {
            Undo::Nothing => {}
            Undo::Claim => {
                if map
                    .get(r.key)
                    .is_some_and(|e| !e.completed && e.token == token && e.loc.is_none())
                {
                    map.remove(r.key);
                }
            }
            Undo::Completion => {
                if let Some(e) = map.get_mut(r.key)
                    && !e.completed
                    && e.token == token
                {
                    e.completing = false;
                }
            }
            Undo::Restore(old) => {
                if map.contains_key(r.key) {
                    // Claimed again meanwhile: the newer claim's record
                    // follows the old one in the log and overrides it.
                    old.bury();
                } else {
                    map.insert(r.key.into(), old);
                }
            }
        }
    }

    /// Points the index at a record now on disk (or counts it dead).
    fn settle(&self, record: &[u8], offset: u64) -> Result<(), StoreError> {
        let Decoded::Record(r) = log::decode_own(record, log::CURRENT) else {
            return Err(StoreError::Corrupt(
                "embedded store: unreadable own record".into(),
            ));
        };
        let loc = Loc {
            seg: self.active.clone(),
            offset,
            len: r.len as u32,
        };
        let m = &r.meta;
        let mut map = self.index.shard(r.key);
        let entry = map.get_mut(r.key);
        match m.kind {
            // A claim or its renewal: the latest record of the claim is the
            // one to keep.
            Kind::InFlight => match entry {
                Some(e) if !e.completed && e.token == m.token => {
                    if let Some(old) = e.loc.replace(loc) {
                        old.bury();
                    }
                }
                _ => loc.bury(),
            },
            Kind::Completed => match entry {
                Some(e) if !e.completed && e.token == m.token => {
                    e.bury();
                    e.completed = true;
                    e.completing = false;
                    e.lease_ms = 0;
                    e.expires_ms = m.expires_ms;
                    e.loc = Some(loc);
                }
                _ => {
                    // Removed or purged meanwhile: a later record (or
                    // expiry) overrides this one, on disk as in the index.
                    loc.bury();
                    return Err(StoreError::Fenced);
                }
            },
            Kind::Released | Kind::Removed => loc.bury(),
        }
        Ok(())
    }

    /// Seals the active segment and starts the next.
    fn rotate(&mut self) -> Result<(), StoreError> {
        self.sync()
            .map_err(|e| log::io_err(&self.active.path, &e))?;
        let base = self.index.last_token.load(Ordering::Relaxed);
        let next = create_segment(&self.dir, self.active.seq + 1, base)?;
        lock(&self.segments).push(next.clone());
        self.active = next;
        self.active_len = SEGMENT_HEADER;
        Ok(())
    }

    /// Compacts the oldest sealed segments while they are worth it.
    fn maintain(&mut self) -> Result<(), StoreError> {
        let sealed = lock(&self.segments).len().saturating_sub(1);
        for _ in 0..sealed {
            let oldest = {
                let segs = lock(&self.segments);
                if segs.len() < 2 {
                    return Ok(());
                }
                let (mut total, mut dead) = (0, 0);
                for s in segs.iter() {
                    total += s.len.load(Ordering::Relaxed) - SEGMENT_HEADER;
                    dead += s.dead.load(Ordering::Relaxed);
                }
                let oldest = segs[0].clone();
                let records = oldest.len.load(Ordering::Relaxed) - SEGMENT_HEADER;
                // A segment of the previous format is compacted whatever
                // it holds, to move its records into the current one.
                let worth = oldest.version != log::CURRENT
                    || oldest.dead.load(Ordering::Relaxed) * 2 >= records
                    || dead > total.saturating_sub(dead) + 2 * self.segment_bytes;
                if !worth {
                    return Ok(());
                }
                oldest
            };
            self.compact(&oldest)?;
        }
        Ok(())
    }

    /// Appends `seg`'s live records to the active segment (rewritten in the
    /// current format if `seg` is of the previous one), points the index
    /// at the copies, and deletes `seg`.
    fn compact(&mut self, seg: &Arc<Segment>) -> Result<(), StoreError> {
        let len = seg.len.load(Ordering::Relaxed);
        let bytes = seg
            .read_at(0, len as usize)
            .map_err(|e| log::io_err(&seg.path, &e))?;
        let now = self.index.now();
        let start = self.active_len;
        self.buf.clear();
        // (offset in seg, offset in the active segment, length there)
        let mut moved = Vec::new();
        let mut at = SEGMENT_HEADER as usize;
        while at < bytes.len() {
            let Decoded::Record(r) = log::decode(&bytes[at..], seg.version) else {
                return Err(StoreError::Corrupt(format!(
                    "{}: byte {at}: unreadable while compacting",
                    seg.path.display()
                )));
            };
            // An abandoned claim's record lives until its lock ends, so it
            // is carried along like any live one.
            if !r.meta.kind.frees() && r.meta.expires_ms > now {
                let map = self.index.shard(r.key);
                let live = map
                    .get(r.key)
                    .and_then(|e| e.loc.as_ref())
                    .is_some_and(|l| l.is(seg, at as u64));
                if live {
                    // Copied while the shard is locked: any later change
                    // to this key queues its record behind the copy.
                    let to = self.buf.len();
                    if seg.version == log::CURRENT {
                        self.buf.extend_from_slice(&bytes[at..at + r.len]);
                    } else {
                        log::encode(&mut self.buf, &r.meta, r.key, r.payload);
                    }
                    let copied = (self.buf.len() - to) as u32;
                    moved.push((at as u64, start + to as u64, copied));
                }
            }
            at += r.len;
        }
        if !moved.is_empty()
            && let Err(e) = self.append().and_then(|()| self.sync())
        {
            // The copies are not used; the segment stays as it is.
            self.rewind(start);
            return Err(log::io_err(&self.active.path, &e));
        }
        for (from, to, len) in moved {
            let Decoded::Record(r) = log::decode_own(&bytes[from as usize..], seg.version) else {
                continue;
            };
            let copy = Loc {
                seg: self.active.clone(),
                offset: to,
                len,
            };
            let mut map = self.index.shard(r.key);
            match map.get_mut(r.key).and_then(|e| e.loc.as_mut()) {
                Some(loc) if loc.is(seg, from) => *loc = copy,
                _ => copy.bury(),
            }
        }
        lock(&self.segments).retain(|s| !Arc::ptr_eq(s, seg));
        // Were the file left behind, its records would be replayed before
        // their copies on the next open: the same records, harmless.
        std::fs::remove_file(&seg.path).map_err(|e| log::io_err(&seg.path, &e))?;
        log::sync_dir(&self.dir).map_err(|e| log::io_err(&self.dir, &e))?;
        if self.active_len >= self.segment_bytes {
            self.rotate()?;
        }
        Ok(())
    }
}

/// Spawns a task that calls [`Store::purge_expired`] on `store` every
/// `every`, until the returned handle is aborted or the runtime stops.
///
/// ```
/// use std::sync::Arc;
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let store = Arc::new(keel_idempotency::memory::MemoryStore::new());
/// let purger = keel_idempotency::embedded::spawn_purger(store, std::time::Duration::from_secs(60));
/// purger.abort();
/// # });
/// ```
pub fn spawn_purger<S: Store>(store: Arc<S>, every: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            // A failed sweep is retried at the next tick; records stay
            // invisible once expired whether or not they are swept.
            let _ = store.purge_expired().await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &str) -> StoreKey {
        StoreKey::new(k).expect("valid")
    }

    async fn acquire(store: &EmbeddedStore, k: &StoreKey) -> FencingToken {
        match store
            .claim(
                k,
                Fingerprint::from_bytes([1; 32]),
                Lease::freeing(Duration::from_secs(60)),
            )
            .await
        {
            Ok(Claim::Acquired { token }) => token,
            other => panic!("{k} should be free, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_failed_write_is_undone_and_the_store_goes_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (key("a"), key("b"));
        {
            let store = EmbeddedStore::open_dir(dir.path()).expect("open");
            let ta = acquire(&store, &a).await;
            let len = store.stats().bytes;

            // The disk fills up: the claim fails and is not left behind.
            store.inject_faults(
                FaultPoint::Write,
                1,
                FaultError::Kind(std::io::ErrorKind::Other),
            );
            let failed = store
                .claim(
                    &b,
                    Fingerprint::from_bytes([1; 32]),
                    Lease::freeing(Duration::from_secs(60)),
                )
                .await;
            assert!(
                matches!(failed, Err(StoreError::Unavailable(ref why)) if why.contains("injected")),
                "{failed:?}"
            );
            assert_eq!(
                store.stats().bytes,
                len,
                "the half-written batch was cut off"
            );
            assert_eq!(store.stats().entries, 1);

            // Space again: the same key can be claimed, and the earlier
            // claim completed.
            let tb = acquire(&store, &b).await;
            assert!(tb > ta);
            store
                .complete(&a, ta, b"result a", Duration::from_secs(60))
                .await
                .expect("complete");

            // A failed completion leaves the claim in flight for its
            // holder to retry.
            store.inject_faults(
                FaultPoint::Write,
                1,
                FaultError::Kind(std::io::ErrorKind::Other),
            );
            assert!(
                store
                    .complete(&b, tb, b"result b", Duration::from_secs(60))
                    .await
                    .is_err()
            );
            store
                .complete(&b, tb, b"result b", Duration::from_secs(60))
                .await
                .expect("complete after the failure");
        }
        let store = EmbeddedStore::open_dir(dir.path()).expect("reopen");
        assert_eq!(store.stats().truncated_on_open, 0);
        for (k, want) in [(&a, &b"result a"[..]), (&b, &b"result b"[..])] {
            match store
                .claim(
                    k,
                    Fingerprint::from_bytes([1; 32]),
                    Lease::freeing(Duration::from_secs(60)),
                )
                .await
            {
                Ok(Claim::Completed { payload, .. }) => assert_eq!(payload, want),
                other => panic!("{k}: {other:?}"),
            }
        }
    }

    /// Writes segment `seq` of the previous format (version 1) by hand.
    fn write_v1_segment(
        dir: &Path,
        seq: u64,
        base: u64,
        records: &[(Kind, &str, u64, u64, &[u8])],
    ) {
        let mut bytes = log::v1::segment_header(base).to_vec();
        for &(kind, key, token, expires_ms, payload) in records {
            let meta = Meta {
                kind,
                token,
                lease_ms: 0,
                expires_ms,
                fingerprint: Fingerprint::from_bytes([1; 32]),
            };
            log::v1::encode(&mut bytes, &meta, key, payload);
        }
        std::fs::write(log::segment_path(dir, seq), bytes).expect("write a version 1 segment");
    }

    fn header_magic(path: &Path) -> Vec<u8> {
        std::fs::read(path).expect("read")[..8].to_vec()
    }

    #[tokio::test]
    async fn a_directory_of_the_previous_format_is_read_and_carried_over() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = now_ms();
        let minute = now + 60_000;
        let hour = now + 3_600_000;
        write_v1_segment(
            dir.path(),
            1,
            0,
            &[
                (Kind::InFlight, "done", 1, minute, b""),
                (Kind::Completed, "done", 1, hour, b"v1 result"),
                (Kind::InFlight, "held", 2, minute, b""),
                (Kind::InFlight, "gone", 3, minute, b""),
                (Kind::Released, "gone", 3, 0, b""),
            ],
        );
        write_v1_segment(
            dir.path(),
            2,
            3,
            &[(Kind::InFlight, "late", 4, minute, b"")],
        );
        let (done, held, gone, late) = (key("done"), key("held"), key("gone"), key("late"));
        {
            let store = EmbeddedStore::open_dir(dir.path()).expect("open a version 1 directory");
            // Appends go to a new segment of the current format.
            assert_eq!(store.stats().segments, 3);
            assert_eq!(header_magic(&log::segment_path(dir.path(), 3)), b"KEELIDX2");
            assert!(matches!(
                store.claim(&done, Fingerprint::from_bytes([1; 32]), Lease::freeing(Duration::from_secs(5))).await,
                Ok(Claim::Completed { payload, .. }) if payload == b"v1 result"
            ));
            assert!(matches!(store.inspect(&gone).await, Ok(None)));
            for (k, token) in [(&held, 2), (&late, 4)] {
                assert!(matches!(
                    store.inspect(k).await,
                    Ok(Some(KeyState::Held { token: t, lease_left, .. }))
                        if t.get() == token && lease_left <= Duration::from_secs(60)
                ));
            }
            // Compaction rewrites the old segments' live records in the
            // current format and deletes them.
            store.purge_expired().await.expect("purge");
            assert_eq!(store.stats().segments, 1);
            let files = log::list_segments(dir.path()).expect("list");
            assert_eq!(files, [3]);
        }
        let store = EmbeddedStore::open_dir(dir.path()).expect("reopen");
        assert_eq!(store.stats().entries, 3);
        assert!(matches!(
            store.inspect(&done).await,
            Ok(Some(KeyState::Completed { payload, .. })) if payload == b"v1 result"
        ));
        assert!(matches!(
            store.inspect(&held).await,
            Ok(Some(KeyState::Held { token, .. })) if token == FencingToken::new(2)
        ));
        // A version 1 claim's lapse frees its key, as that version meant.
        store.advance_clock(Duration::from_secs(61));
        for k in [&held, &late] {
            assert!(acquire(&store, k).await > FencingToken::new(4));
        }
    }

    #[tokio::test]
    async fn a_segment_of_a_later_format_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(EmbeddedStore::open_dir(dir.path()).expect("open"));
        let path = log::segment_path(dir.path(), 1);
        let mut bytes = std::fs::read(&path).expect("read");
        bytes[7] = b'9';
        let sum = blake3::hash(&bytes[..16]);
        bytes[16..24].copy_from_slice(&sum.as_bytes()[..8]);
        std::fs::write(&path, &bytes).expect("write");
        let msg = EmbeddedStore::open_dir(dir.path())
            .expect_err("a later format must not be opened over")
            .to_string();
        assert!(msg.contains("later keel"), "{msg}");
        assert_eq!(
            std::fs::read(&path).expect("kept"),
            bytes,
            "the file is left alone"
        );
    }

    #[tokio::test]
    async fn an_unsynced_claim_stays_held_when_its_batch_fails() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedStore::open_dir(dir.path())
            .expect("open")
            .durable_claims(false);
        let k = key("k");
        // The claim is answered before its record is written; the write
        // then fails. Its holder already runs the operation, so the key
        // must stay held, not be handed to the next caller.
        store.inject_faults(
            FaultPoint::Write,
            1,
            FaultError::Kind(std::io::ErrorKind::Other),
        );
        let token = acquire(&store, &k).await;
        // A purge waits for the writer to get past the failed batch.
        store.purge_expired().await.expect("purge");
        assert_eq!(store.faults_left(FaultPoint::Write), 0);
        assert!(matches!(
            store
                .claim(
                    &k,
                    Fingerprint::from_bytes([1; 32]),
                    Lease::freeing(Duration::from_secs(60))
                )
                .await,
            Ok(Claim::InFlight { .. })
        ));
        store
            .complete(&k, token, b"done", Duration::from_secs(60))
            .await
            .expect("the holder completes once the disk works");
        drop(store);
        let store = EmbeddedStore::open_dir(dir.path()).expect("reopen");
        assert!(matches!(
            store.claim(&k, Fingerprint::from_bytes([1; 32]), Lease::freeing(Duration::from_secs(60))).await,
            Ok(Claim::Completed { payload, .. }) if payload == b"done"
        ));
    }
}
