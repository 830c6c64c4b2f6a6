//! Embedded durable store: an append-only log on local disk, no server.
//!
//! The store is a directory of segment files. Every claim, completion and
//! release appends one checksummed record to the newest segment and is
//! `fdatasync`ed before the call returns, so a completed record survives a
//! process restart and a crash (`kill -9`, power loss). Claims are durable
//! too by default: after a crash and a quick restart, a key whose first
//! request was running stays in flight until its lease ends instead of
//! being executed again at once.
//!
//! - **Group commit.** One writer thread appends every record queued while
//!   the previous sync ran with one `write` and one `fdatasync`, so N
//!   concurrent requests share one sync. The disk sees a sequential append,
//!   not the scattered page writes of a B-tree.
//! - **In-memory index.** A sharded map from key to state, fingerprint,
//!   expiry and the record's place on disk answers claims without touching
//!   the disk; only a replay reads its stored result back (one positioned
//!   read on tokio's blocking pool). No lock is held across requests: each
//!   key's shard is locked for a few map operations.
//! - **Compaction.** Records superseded, released or expired are dead
//!   bytes. When at least half the oldest segment is dead (or dead bytes
//!   outgrow live ones by two segments), the writer appends that segment's
//!   live records to the newest one and deletes it; oldest first, so a
//!   release record never outlives the records it cancels.
//! - **Recovery.** Opening reads the segments in order and rebuilds the
//!   index; the last record of a key wins. A torn append at the end of the
//!   newest segment (a crash mid-write) ends the log there and is cut off,
//!   as a database's write-ahead log does; damage anywhere else is reported
//!   with the file and byte offset, and nothing is opened.
//! - **Failures.** A write or sync that fails (a full disk, an I/O error)
//!   fails the callers of its batch with [`StoreError::Unavailable`] and is
//!   undone: the log is cut back to where the batch began and its claims
//!   leave the index. The writer goes on, so the store answers again as
//!   soon as the disk does; meanwhile the engine applies each route's
//!   store-down policy (503 by default).
//!
//! Expiry uses the wall clock (records outlive the process). Expired
//! records are ignored on read and dropped from the index by
//! [`Store::purge_expired`], which then compacts what that freed before it
//! returns; run it periodically with [`spawn_purger`].
//! Fencing tokens come from one counter, recorded in every record and in
//! each segment's header, so they strictly increase per key across
//! release, expiry, compaction and restarts.
//!
//! The index holds every live key (about 150 bytes each plus the key) but
//! not the stored results, which stay on disk. A directory is used by one
//! store at a time: a lock file keeps a second process out.
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
//! let Claim::Acquired { token } = store.claim(&key, Fingerprint([0; 32]), Lease::freeing(Duration::from_secs(5))).await.unwrap()
//! else { panic!() };
//! store.complete(&key, token, b"done", Duration::from_secs(60)).await.unwrap();
//! drop(store);
//!
//! // Reopened (as after a restart), the record is still there.
//! let store = EmbeddedStore::open_dir(dir.path()).unwrap();
//! let Claim::Completed { payload, .. } = store.claim(&key, Fingerprint([0; 32]), Lease::freeing(Duration::from_secs(5))).await.unwrap()
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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::oneshot;

use self::log::{Decoded, Kind, SEGMENT_HEADER, Segment};
use crate::store::{
    BoxFuture, Claim, FencingToken, Fingerprint, Lease, Store, StoreError, StoreKey,
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
    /// Keys in the index (live claims and results; expired ones until
    /// purged).
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
    token: u64,
    expires_ms: u64,
    fingerprint: Fingerprint,
    /// The record that says so; `None` while a claim's record is still on
    /// its way to the disk.
    loc: Option<Loc>,
}

impl Entry {
    /// The claim `token` holds on this key right now.
    fn held_by(&self, token: FencingToken, now: u64) -> bool {
        !self.completed && self.token == token.0 && self.expires_ms > now
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

/// The in-memory index: key to state, spread over shards.
struct Index {
    shards: Box<[Shard]>,
    hasher: RandomState,
    last_token: AtomicU64,
}

impl Index {
    fn new() -> Self {
        let cores = std::thread::available_parallelism().map_or(4, |n| n.get());
        let n = (cores * 16).next_power_of_two().clamp(16, 1024);
        Self {
            shards: (0..n).map(|_| Shard::default()).collect(),
            hasher: RandomState::new(),
            last_token: AtomicU64::new(0),
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

    /// Applies a record read back when opening the store.
    fn recover(&self, r: &log::Record<'_>, loc: Loc, now: u64) {
        let mut map = self.shard(r.key);
        if r.kind == Kind::Released || r.expires_ms <= now {
            // The key is free from here on.
            if let Some(old) = map.remove(r.key) {
                old.bury();
            }
            loc.bury();
            return;
        }
        let entry = Entry {
            completed: r.kind == Kind::Completed,
            token: r.token,
            expires_ms: r.expires_ms,
            fingerprint: r.fingerprint,
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
    /// Test hook: the writer fails this many appends.
    #[cfg(test)]
    fail_appends: Arc<std::sync::atomic::AtomicU32>,
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

impl Inner {
    fn send(&self, job: Job) -> Result<(), StoreError> {
        let sent = self
            .jobs
            .as_ref()
            .is_some_and(|jobs| jobs.send(Msg::Write(job)).is_ok());
        if sent { Ok(()) } else { Err(self.stopped()) }
    }

    /// Queues `record` to be synced; the receiver gets its outcome.
    fn send_durable(
        &self,
        record: Vec<u8>,
    ) -> Result<oneshot::Receiver<Result<(), StoreError>>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Job {
            record,
            durable: true,
            reply: Some(reply),
        })?;
        Ok(rx)
    }

    fn stopped(&self) -> StoreError {
        StoreError::Unavailable(format!(
            "embedded store {}: the writer has stopped (shutting down)",
            self.dir.display(),
        ))
    }

    async fn wait(&self, rx: oneshot::Receiver<Result<(), StoreError>>) -> Result<(), StoreError> {
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
    /// a second for one that is closing) or it cannot be read,
    /// and with [`StoreError::Corrupt`] naming the file and byte offset if
    /// a segment other than the newest is damaged.
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
        let active_len = segments
            .last()
            .map_or(SEGMENT_HEADER, |s| s.len.load(Ordering::Relaxed));
        let segments = Arc::new(Mutex::new(segments));
        #[cfg(test)]
        let fail_appends = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let Some(active) = lock(&segments).last().cloned() else {
            return Err(StoreError::Unavailable("no segment after recovery".into()));
        };
        let writer = Writer {
            dir: dir.clone(),
            index: index.clone(),
            segments: segments.clone(),
            active,
            active_len,
            segment_bytes: config.segment_bytes,
            buf: Vec::new(),
            maintain_after: Instant::now(),
            #[cfg(test)]
            fail_appends: fail_appends.clone(),
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
                #[cfg(test)]
                fail_appends,
                segments,
                truncated_on_open,
                dir,
                _lock: lock_file,
            }),
            durable_claims: config.durable_claims,
        })
    }

    /// Whether claims are synced before [`Store::claim`] returns (default
    /// `true`). Completions and releases always are.
    ///
    /// With `false`, a claim costs no sync (it is made durable by the next
    /// durable write), which roughly halves the disk work of a new
    /// request. The price: if the process crashes while a request is in
    /// flight, its claim may be lost, and a retry after the restart may
    /// run the operation again. Completed records are never lost.
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

    /// Reads a stored result back from its record.
    async fn replay(
        &self,
        key: &StoreKey,
        loc: Option<Loc>,
        fingerprint: Fingerprint,
    ) -> Result<Claim, StoreError> {
        let Some(loc) = loc else {
            return Err(StoreError::Corrupt(
                "embedded store: a result without a record".into(),
            ));
        };
        let key = key.as_str().to_owned();
        let payload = tokio::task::spawn_blocking(move || read_result(&loc, &key))
            .await
            .map_err(|e| StoreError::Unavailable(format!("embedded store read failed: {e}")))??;
        Ok(Claim::Completed {
            fingerprint,
            payload,
        })
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
    let range = match log::decode(&buf) {
        Decoded::Record(r) if r.kind == Kind::Completed && r.key == key => {
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
    InFlight(Claim),
    Completed(Option<Loc>, Fingerprint),
    Acquired(u64, Option<oneshot::Receiver<Result<(), StoreError>>>),
}

impl Store for EmbeddedStore {
    fn claim<'a>(
        &'a self,
        key: &'a StoreKey,
        fingerprint: Fingerprint,
        lease: Lease,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        Box::pin(async move {
            let now = now_ms();
            let k = key.as_str();
            let found = {
                let mut map = self.inner.index.shard(k);
                match map.get(k) {
                    Some(e) if e.expires_ms > now && !e.completed => {
                        Found::InFlight(Claim::InFlight {
                            fingerprint: e.fingerprint,
                            retry_after: Duration::from_millis(e.expires_ms - now),
                        })
                    }
                    Some(e) if e.expires_ms > now => Found::Completed(e.loc.clone(), e.fingerprint),
                    _ => {
                        let token = self.inner.index.next_token();
                        let expires_ms = add_ms(now, lease.hold);
                        let mut record = Vec::new();
                        log::encode(
                            &mut record,
                            Kind::InFlight,
                            k,
                            token,
                            expires_ms,
                            &fingerprint,
                            &[],
                        );
                        // Queued under the shard's lock, so the log holds
                        // this key's records in the order the index saw.
                        let rx = if self.durable_claims {
                            Some(self.inner.send_durable(record)?)
                        } else {
                            self.inner.send(Job {
                                record,
                                durable: false,
                                reply: None,
                            })?;
                            None
                        };
                        let entry = Entry {
                            completed: false,
                            token,
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
                Found::InFlight(claim) => Ok(claim),
                Found::Completed(loc, fp) => self.replay(key, loc, fp).await,
                Found::Acquired(token, rx) => {
                    if let Some(rx) = rx {
                        self.inner.wait(rx).await?;
                    }
                    Ok(Claim::Acquired {
                        token: FencingToken(token),
                    })
                }
            }
        })
    }

    // TEMPORARY (issue 12 in progress): replaced by the store's own renew,
    // inspect and remove before this lands.
    fn renew<'a>(
        &'a self,
        _key: &'a StoreKey,
        _token: FencingToken,
        _lease: Lease,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async { Err(StoreError::Unavailable("renew: not implemented".into())) })
    }

    fn inspect<'a>(
        &'a self,
        _key: &'a StoreKey,
    ) -> BoxFuture<'a, Result<Option<crate::store::KeyState>, StoreError>> {
        Box::pin(async { Err(StoreError::Unavailable("inspect: not implemented".into())) })
    }

    fn remove<'a>(&'a self, _key: &'a StoreKey) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async { Err(StoreError::Unavailable("remove: not implemented".into())) })
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
            let now = now_ms();
            let k = key.as_str();
            let rx = {
                let map = self.inner.index.shard(k);
                let Some(e) = map.get(k).filter(|e| e.held_by(token, now)) else {
                    return Err(StoreError::Fenced);
                };
                let mut record = Vec::new();
                let expires_ms = add_ms(now, ttl);
                log::encode(
                    &mut record,
                    Kind::Completed,
                    k,
                    token.0,
                    expires_ms,
                    &e.fingerprint,
                    payload,
                );
                // The index turns to completed once the record is on disk
                // (the writer does it), so no replay is ever served from a
                // result a crash could still lose.
                self.inner.send_durable(record)?
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
            let now = now_ms();
            let k = key.as_str();
            let rx = {
                let mut map = self.inner.index.shard(k);
                if !map.get(k).is_some_and(|e| e.held_by(token, now)) {
                    return Err(StoreError::Fenced);
                }
                let mut record = Vec::new();
                log::encode(
                    &mut record,
                    Kind::Released,
                    k,
                    token.0,
                    0,
                    &Fingerprint([0; 32]),
                    &[],
                );
                let rx = self.inner.send_durable(record)?;
                if let Some(old) = map.remove(k) {
                    old.bury();
                }
                rx
            };
            self.inner.wait(rx).await
        })
    }

    fn purge_expired(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move {
            let now = now_ms();
            let mut removed = 0;
            for shard in self.inner.index.shards.iter() {
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
/// newest; creates the first segment of a new store. Returns the segments,
/// oldest first, and the bytes cut.
fn recover(dir: &Path, index: &Index) -> Result<(Vec<Arc<Segment>>, u64), StoreError> {
    let seqs = log::list_segments(dir)?;
    let now = now_ms();
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
        let Some(base) = log::parse_segment_header(&bytes) else {
            if newest {
                // Created, but the crash came before its header was synced.
                std::fs::remove_file(&path).map_err(|e| log::io_err(&path, &e))?;
                truncated += bytes.len() as u64;
                continue;
            }
            return Err(corrupt(0, "not a keel log segment (bad header)"));
        };
        last_token = last_token.max(base);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| log::io_err(&path, &e))?;
        let seg = Arc::new(Segment {
            seq,
            path: path.clone(),
            file,
            len: AtomicU64::new(0),
            dead: AtomicU64::new(0),
        });
        let mut at = SEGMENT_HEADER as usize;
        while at < bytes.len() {
            let why = match log::decode(&bytes[at..]) {
                Decoded::Record(r) => {
                    last_token = last_token.max(r.token);
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
    if segments.is_empty() {
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
    #[cfg(test)]
    fail_appends: Arc<std::sync::atomic::AtomicU32>,
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
    fn append(&mut self) -> Result<(), StoreError> {
        #[cfg(test)]
        if self
            .fail_appends
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
        {
            // Half the bytes reach the file, as when the disk fills up.
            let half = &self.buf[..self.buf.len() / 2];
            let _ = self.active.file.write_all_at(half, self.active_len);
            return Err(StoreError::Unavailable("injected write failure".into()));
        }
        self.active
            .file
            .write_all_at(&self.buf, self.active_len)
            .map_err(|e| log::io_err(&self.active.path, &e))?;
        self.active_len += self.buf.len() as u64;
        self.active.len.store(self.active_len, Ordering::Relaxed);
        Ok(())
    }

    fn sync(&self) -> Result<(), StoreError> {
        self.active
            .file
            .sync_data()
            .map_err(|e| log::io_err(&self.active.path, &e))
    }

    /// Writes and syncs a batch, updates the index and answers each job.
    ///
    /// If the write or the sync fails (a full disk, an I/O error), the
    /// batch is undone: the log is cut back to where the batch began (the
    /// next batch overwrites those bytes, so no page a failed sync may
    /// have dropped is relied on), its claims leave the index, and every
    /// caller gets [`StoreError::Unavailable`]. The writer goes on, so the
    /// store works again once the disk does.
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
            let why = e.to_string();
            for job in batch.drain(..) {
                // An unsynced claim was answered already: its holder runs
                // and will complete it, so only the claims whose callers
                // hear of the failure leave the index.
                if let Some(reply) = job.reply {
                    self.undo(&job.record);
                    let _ = reply.send(Err(StoreError::Unavailable(why.clone())));
                }
            }
            return;
        }
        let mut offset = start;
        for job in batch.drain(..) {
            let outcome = self.settle(&job.record, offset);
            offset += job.record.len() as u64;
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

    /// Takes a failed batch's claim back out of the index.
    fn undo(&self, record: &[u8]) {
        let Decoded::Record(r) = log::decode_own(record) else {
            return;
        };
        if r.kind != Kind::InFlight {
            // A failed completion leaves the claim in flight (its caller
            // was told); a failed release already freed the key in memory
            // and its claim record stays on disk until its lease ends.
            return;
        }
        let mut map = self.index.shard(r.key);
        if map
            .get(r.key)
            .is_some_and(|e| !e.completed && e.token == r.token && e.loc.is_none())
        {
            map.remove(r.key);
        }
    }

    /// Points the index at a record now on disk (or counts it dead).
    fn settle(&self, record: &[u8], offset: u64) -> Result<(), StoreError> {
        let Decoded::Record(r) = log::decode(record) else {
            return Err(StoreError::Corrupt(
                "embedded store: unreadable own record".into(),
            ));
        };
        let loc = Loc {
            seg: self.active.clone(),
            offset,
            len: r.len as u32,
        };
        let mut map = self.index.shard(r.key);
        let entry = map.get_mut(r.key);
        match r.kind {
            Kind::InFlight => match entry {
                Some(e) if !e.completed && e.token == r.token && e.loc.is_none() => {
                    e.loc = Some(loc);
                }
                _ => loc.bury(),
            },
            Kind::Completed => match entry {
                Some(e) if !e.completed && e.token == r.token => {
                    e.bury();
                    e.completed = true;
                    e.expires_ms = r.expires_ms;
                    e.loc = Some(loc);
                }
                _ => {
                    // Released, reclaimed after its lease or purged
                    // meanwhile: a later record (or expiry) overrides
                    // this one, on disk as in the index.
                    loc.bury();
                    return Err(StoreError::Fenced);
                }
            },
            Kind::Released => loc.bury(),
        }
        Ok(())
    }

    /// Seals the active segment and starts the next.
    fn rotate(&mut self) -> Result<(), StoreError> {
        self.sync()?;
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
                let worth = oldest.dead.load(Ordering::Relaxed) * 2 >= records
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

    /// Appends `seg`'s live records to the active segment, points the
    /// index at the copies, and deletes `seg`.
    fn compact(&mut self, seg: &Arc<Segment>) -> Result<(), StoreError> {
        let len = seg.len.load(Ordering::Relaxed);
        let bytes = seg
            .read_at(0, len as usize)
            .map_err(|e| log::io_err(&seg.path, &e))?;
        let now = now_ms();
        let start = self.active_len;
        self.buf.clear();
        // (offset in seg, offset in the active segment, length)
        let mut moved = Vec::new();
        let mut at = SEGMENT_HEADER as usize;
        while at < bytes.len() {
            let Decoded::Record(r) = log::decode(&bytes[at..]) else {
                return Err(StoreError::Corrupt(format!(
                    "{}: byte {at}: unreadable while compacting",
                    seg.path.display()
                )));
            };
            if r.kind != Kind::Released && r.expires_ms > now {
                let map = self.index.shard(r.key);
                let live = map
                    .get(r.key)
                    .and_then(|e| e.loc.as_ref())
                    .is_some_and(|l| l.is(seg, at as u64));
                if live {
                    // Copied while the shard is locked: any later change
                    // to this key queues its record behind the copy.
                    moved.push((at as u64, start + self.buf.len() as u64, r.len as u32));
                    self.buf.extend_from_slice(&bytes[at..at + r.len]);
                }
            }
            at += r.len;
        }
        if !moved.is_empty()
            && let Err(e) = self.append().and_then(|()| self.sync())
        {
            // The copies are not used; the segment stays as it is.
            self.rewind(start);
            return Err(e);
        }
        for (from, to, len) in moved {
            let Decoded::Record(r) = log::decode_own(&bytes[from as usize..]) else {
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
        // their copies on the next open, which then win: harmless.
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
                Fingerprint([1; 32]),
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
            store.inner.fail_appends.store(1, Ordering::Relaxed);
            let failed = store
                .claim(
                    &b,
                    Fingerprint([1; 32]),
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
            store.inner.fail_appends.store(1, Ordering::Relaxed);
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
                    Fingerprint([1; 32]),
                    Lease::freeing(Duration::from_secs(60)),
                )
                .await
            {
                Ok(Claim::Completed { payload, .. }) => assert_eq!(payload, want),
                other => panic!("{k}: {other:?}"),
            }
        }
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
        store.inner.fail_appends.store(1, Ordering::Relaxed);
        let token = acquire(&store, &k).await;
        // A purge waits for the writer to get past the failed batch.
        store.purge_expired().await.expect("purge");
        assert_eq!(store.inner.fail_appends.load(Ordering::Relaxed), 0);
        assert!(matches!(
            store
                .claim(
                    &k,
                    Fingerprint([1; 32]),
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
            store.claim(&k, Fingerprint([1; 32]), Lease::freeing(Duration::from_secs(60))).await,
            Ok(Claim::Completed { payload, .. }) if payload == b"done"
        ));
    }
}
