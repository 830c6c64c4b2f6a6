//! Embedded durable store on [redb]: one file on local disk, no server.
//!
//! Every claim, completion and release is committed with immediate
//! durability (fsync) before the call returns, so a completed record
//! survives a process restart and a crash (`kill -9`, power loss). Claims
//! are durable too by default: after a crash and a quick restart, a key
//! whose first request was running stays in flight until its lease ends
//! instead of being executed again at once.
//!
//! Writes go through **group commit**: one thread owns redb's single writer
//! and commits every write queued while the previous commit was syncing in
//! one transaction, so N concurrent requests share one fsync. Replays and
//! in-flight answers are served from a read transaction (concurrent, no
//! writer) on tokio's blocking pool.
//!
//! Expiry uses the wall clock (records outlive the process). Expired records
//! are ignored on read and removed by [`Store::purge_expired`]; run it
//! periodically with [`spawn_purger`].
//!
//! Fencing tokens come from one counter kept in the same file, so they
//! strictly increase per key across release, expiry and restarts.
//!
//! ```
//! use keel_idempotency::embedded::EmbeddedStore;
//! use keel_idempotency::store::{Claim, Fingerprint, Store, StoreKey};
//! use std::time::Duration;
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let dir = tempfile::tempdir().unwrap();
//! let store = EmbeddedStore::open_dir(dir.path()).unwrap();
//! let key = StoreKey::new("k").unwrap();
//! let Claim::Acquired { token } = store.claim(&key, Fingerprint([0; 32]), Duration::from_secs(5)).await.unwrap()
//! else { panic!() };
//! store.complete(&key, token, b"done", Duration::from_secs(60)).await.unwrap();
//! drop(store);
//!
//! // Reopened (as after a restart), the record is still there.
//! let store = EmbeddedStore::open_dir(dir.path()).unwrap();
//! let Claim::Completed { payload, .. } = store.claim(&key, Fingerprint([0; 32]), Duration::from_secs(5)).await.unwrap()
//! else { panic!() };
//! assert_eq!(payload, b"done");
//! # });
//! ```
//!
//! [redb]: https://docs.rs/redb

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::oneshot;

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use crate::store::{BoxFuture, Claim, FencingToken, Fingerprint, Store, StoreError, StoreKey};

const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("keel_idempotency_records_v1");
const META: TableDefinition<&str, u64> = TableDefinition::new("keel_idempotency_meta_v1");
const LAST_TOKEN: &str = "last_token";

/// The file created inside a directory by [`EmbeddedStore::open_dir`].
pub const FILE_NAME: &str = "idempotency.redb";

const IN_FLIGHT: u8 = 0;
const COMPLETED: u8 = 1;
/// kind u8 | token u64 | expires (ms since the epoch) u64 | fingerprint 32.
const HEADER: usize = 1 + 8 + 8 + 32;

/// A durable [`Store`] in one redb file. See the [module docs](self).
#[derive(Clone)]
pub struct EmbeddedStore {
    writer: Arc<Writer>,
    db: Arc<Database>,
    path: PathBuf,
    durable_claims: bool,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.path)
            .finish()
    }
}

/// Parsed row.
struct Row<'a> {
    kind: u8,
    token: FencingToken,
    expires_ms: u64,
    fingerprint: Fingerprint,
    payload: &'a [u8],
}

fn parse(bytes: &[u8]) -> Result<Row<'_>, StoreError> {
    if bytes.len() < HEADER {
        return Err(StoreError::Corrupt(
            "embedded record shorter than its header".into(),
        ));
    }
    let mut token = [0; 8];
    token.copy_from_slice(&bytes[1..9]);
    let mut expires = [0; 8];
    expires.copy_from_slice(&bytes[9..17]);
    let mut fp = [0; 32];
    fp.copy_from_slice(&bytes[17..49]);
    let kind = bytes[0];
    if kind != IN_FLIGHT && kind != COMPLETED {
        return Err(StoreError::Corrupt(format!(
            "embedded record of unknown kind {kind}"
        )));
    }
    Ok(Row {
        kind,
        token: FencingToken(u64::from_be_bytes(token)),
        expires_ms: u64::from_be_bytes(expires),
        fingerprint: Fingerprint(fp),
        payload: &bytes[HEADER..],
    })
}

fn encode(
    kind: u8,
    token: FencingToken,
    expires_ms: u64,
    fp: &Fingerprint,
    payload: &[u8],
) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER + payload.len());
    v.push(kind);
    v.extend_from_slice(&token.0.to_be_bytes());
    v.extend_from_slice(&expires_ms.to_be_bytes());
    v.extend_from_slice(&fp.0);
    v.extend_from_slice(payload);
    v
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn add_ms(now: u64, d: Duration) -> u64 {
    now.saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn unavailable(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Unavailable(format!("embedded store: {}", e.into()))
}

/// Reads a live row for `key` in a read transaction; `None` if absent or
/// expired.
fn live_claim(row: &Row<'_>, now: u64) -> Option<Claim> {
    if row.expires_ms <= now {
        return None;
    }
    Some(match row.kind {
        IN_FLIGHT => Claim::InFlight {
            fingerprint: row.fingerprint,
            retry_after: Duration::from_millis(row.expires_ms - now),
        },
        _ => Claim::Completed {
            fingerprint: row.fingerprint,
            payload: row.payload.to_vec(),
        },
    })
}

impl EmbeddedStore {
    /// Opens (or creates) the store file at `path`. Fails if another
    /// process has it open.
    ///
    /// ```
    /// let dir = tempfile::tempdir().unwrap();
    /// let store = keel_idempotency::embedded::EmbeddedStore::open(dir.path().join("keys.redb")).unwrap();
    /// assert!(store.path().ends_with("keys.redb"));
    /// ```
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let db = Database::create(&path).map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot open the embedded store {}: {e}",
                path.display()
            ))
        })?;
        // Create the tables once, so readers never meet a missing table.
        let mut tx = db.begin_write().map_err(unavailable)?;
        tx.set_durability(Durability::Immediate)
            .map_err(unavailable)?;
        tx.open_table(RECORDS).map_err(unavailable)?;
        tx.open_table(META).map_err(unavailable)?;
        tx.commit().map_err(unavailable)?;
        let db = Arc::new(db);
        let writer = Writer::spawn(db.clone()).map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot start the embedded store's writer thread: {e}"
            ))
        })?;
        Ok(Self {
            writer: Arc::new(writer),
            db,
            path,
            durable_claims: true,
        })
    }

    /// Whether claims are fsynced before [`Store::claim`] returns (default
    /// `true`). Completions and releases always are.
    ///
    /// With `false`, a claim costs no fsync (it is made durable by the next
    /// durable commit), which roughly halves the disk work of a new
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

    /// Opens (or creates) the store in directory `dir`, creating the
    /// directory if missing; the file is [`FILE_NAME`].
    ///
    /// ```
    /// let dir = tempfile::tempdir().unwrap();
    /// let store = keel_idempotency::embedded::EmbeddedStore::open_dir(dir.path().join("keel-data")).unwrap();
    /// assert!(store.path().ends_with("keel-data/idempotency.redb"));
    /// ```
    pub fn open_dir(dir: impl AsRef<Path>) -> Result<Self, StoreError> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot create the store directory {}: {e}",
                dir.display()
            ))
        })?;
        Self::open(dir.join(FILE_NAME))
    }

    /// The file's path.
    ///
    /// ```
    /// let dir = tempfile::tempdir().unwrap();
    /// let store = keel_idempotency::embedded::EmbeddedStore::open_dir(dir.path()).unwrap();
    /// assert!(store.path().exists());
    /// ```
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| StoreError::Unavailable(format!("embedded store task failed: {e}")))?
    }

    /// A live row for `key` from a read transaction (no write lock), if
    /// there is one.
    fn read_live(db: &Database, key: &str) -> Result<Option<Claim>, StoreError> {
        let tx = db.begin_read().map_err(unavailable)?;
        let table = tx.open_table(RECORDS).map_err(unavailable)?;
        match table.get(key).map_err(unavailable)? {
            Some(v) => Ok(live_claim(&parse(v.value())?, now_ms())),
            None => Ok(None),
        }
    }

    /// Hands a job to the writer thread and waits for its outcome.
    async fn submit<T>(
        &self,
        job: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Job,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        let stopped = || StoreError::Unavailable("embedded store writer has stopped".into());
        self.writer
            .jobs
            .as_ref()
            .ok_or_else(stopped)?
            .send(job(tx))
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    fn purge_sync(db: &Database) -> Result<u64, StoreError> {
        let mut tx = db.begin_write().map_err(unavailable)?;
        tx.set_durability(Durability::Immediate)
            .map_err(unavailable)?;
        let mut removed = 0;
        {
            let mut table = tx.open_table(RECORDS).map_err(unavailable)?;
            let now = now_ms();
            table
                .retain(|_, v| {
                    // Unreadable rows are kept for inspection rather than
                    // silently dropped.
                    let keep = parse(v).map_or(true, |r| r.expires_ms > now);
                    removed += u64::from(!keep);
                    keep
                })
                .map_err(unavailable)?;
        }
        tx.commit().map_err(unavailable)?;
        Ok(removed)
    }
}

impl Store for EmbeddedStore {
    fn claim<'a>(
        &'a self,
        key: &'a StoreKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        Box::pin(async move {
            // Replays and in-flight answers: a read transaction, no writer.
            let k = key.as_str().to_owned();
            if let Some(live) = self.blocking(move |db| Self::read_live(db, &k)).await? {
                return Ok(live);
            }
            let durable = self.durable_claims;
            self.submit(|reply| Job::Claim {
                key: key.as_str().to_owned(),
                fingerprint,
                lease,
                durable,
                reply,
            })
            .await
        })
    }

    fn complete<'a>(
        &'a self,
        key: &'a StoreKey,
        token: FencingToken,
        payload: &'a [u8],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.submit(move |reply| Job::Complete {
            key: key.as_str().to_owned(),
            token,
            payload: payload.to_vec(),
            ttl,
            reply,
        }))
    }

    fn release<'a>(
        &'a self,
        key: &'a StoreKey,
        token: FencingToken,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.submit(move |reply| Job::Release {
            key: key.as_str().to_owned(),
            token,
            reply,
        }))
    }

    fn purge_expired(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(self.blocking(Self::purge_sync))
    }

    fn name(&self) -> &'static str {
        "embedded"
    }
}

/// The most jobs committed in one transaction.
const MAX_BATCH: usize = 1024;

/// One write, queued for the writer thread.
enum Job {
    Claim {
        key: String,
        fingerprint: Fingerprint,
        lease: Duration,
        durable: bool,
        reply: oneshot::Sender<Result<Claim, StoreError>>,
    },
    Complete {
        key: String,
        token: FencingToken,
        payload: Vec<u8>,
        ttl: Duration,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    Release {
        key: String,
        token: FencingToken,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
}

enum Outcome {
    Claim(Result<Claim, StoreError>),
    Done(Result<(), StoreError>),
}

impl Job {
    fn durable(&self) -> bool {
        match self {
            Job::Claim { durable, .. } => *durable,
            Job::Complete { .. } | Job::Release { .. } => true,
        }
    }

    fn answer(self, outcome: Outcome) {
        // A caller that went away (cancelled future) no longer needs the
        // answer; its write stands.
        match (self, outcome) {
            (Job::Claim { reply, .. }, Outcome::Claim(r)) => drop(reply.send(r)),
            (Job::Complete { reply, .. } | Job::Release { reply, .. }, Outcome::Done(r)) => {
                drop(reply.send(r))
            }
            (job, _) => job.fail("internal error: mismatched outcome"),
        }
    }

    fn fail(self, why: &str) {
        let err = || StoreError::Unavailable(format!("embedded store: {why}"));
        match self {
            Job::Claim { reply, .. } => drop(reply.send(Err(err()))),
            Job::Complete { reply, .. } | Job::Release { reply, .. } => {
                drop(reply.send(Err(err())))
            }
        }
    }
}

/// Group commit: one thread owns redb's single writer and commits every
/// job queued meanwhile in one transaction, so N concurrent requests pay
/// one fsync instead of N. redb allows one write transaction at a time in
/// any case; replays and in-flight answers never come here.
struct Writer {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn spawn(db: Arc<Database>) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("keel-idem-redb".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    while batch.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(job) => batch.push(job),
                            Err(_) => break,
                        }
                    }
                    match commit_batch(&db, &batch) {
                        Ok(outcomes) => {
                            for (job, outcome) in batch.into_iter().zip(outcomes) {
                                job.answer(outcome);
                            }
                        }
                        Err(e) => {
                            let why = e.to_string();
                            for job in batch {
                                job.fail(&why);
                            }
                        }
                    }
                }
            })?;
        Ok(Self {
            jobs: Some(tx),
            thread: Some(thread),
        })
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Closing the queue ends the thread after its last batch; joining
        // it releases the database before the store's drop returns, so the
        // file can be reopened at once.
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Applies `batch` in order in one transaction. Per-job refusals (fenced,
/// corrupt) are outcomes; a database error fails the whole batch, and
/// nothing of it is written.
fn commit_batch(db: &Database, batch: &[Job]) -> Result<Vec<Outcome>, redb::Error> {
    let mut tx = db.begin_write()?;
    let durable = batch.iter().any(Job::durable);
    tx.set_durability(if durable {
        Durability::Immediate
    } else {
        Durability::None
    })?;
    let mut outcomes = Vec::with_capacity(batch.len());
    let mut dirty = false;
    {
        let mut table = tx.open_table(RECORDS)?;
        let mut meta = tx.open_table(META)?;
        let first_token = meta.get(LAST_TOKEN)?.map_or(0, |v| v.value());
        let mut last = first_token;
        let now = now_ms();
        for job in batch {
            outcomes.push(apply(&mut table, &mut last, now, job, &mut dirty)?);
        }
        if last != first_token {
            meta.insert(LAST_TOKEN, last)?;
        }
    }
    if dirty {
        tx.commit()?;
    } else {
        // Nothing changed (every answer was a live row or a refusal): skip
        // the commit and its fsync.
        tx.abort()?;
    }
    Ok(outcomes)
}

fn apply(
    table: &mut redb::Table<&str, &[u8]>,
    last: &mut u64,
    now: u64,
    job: &Job,
    dirty: &mut bool,
) -> Result<Outcome, redb::Error> {
    match job {
        Job::Claim {
            key,
            fingerprint,
            lease,
            ..
        } => {
            // Check again under the writer: another claim may have won
            // since the caller's read.
            let live = match table.get(key.as_str())? {
                Some(v) => match parse(v.value()) {
                    Ok(row) => live_claim(&row, now).map(Ok),
                    Err(e) => Some(Err(e)),
                },
                None => None,
            };
            if let Some(r) = live {
                return Ok(Outcome::Claim(r));
            }
            *last += 1;
            let token = FencingToken(*last);
            let row = encode(IN_FLIGHT, token, add_ms(now, *lease), fingerprint, &[]);
            table.insert(key.as_str(), row.as_slice())?;
            *dirty = true;
            Ok(Outcome::Claim(Ok(Claim::Acquired { token })))
        }
        Job::Complete {
            key,
            token,
            payload,
            ttl,
            ..
        } => {
            let fp = match held(table, key, *token, now)? {
                Ok(fp) => fp,
                Err(e) => return Ok(Outcome::Done(Err(e))),
            };
            let row = encode(COMPLETED, *token, add_ms(now, *ttl), &fp, payload);
            table.insert(key.as_str(), row.as_slice())?;
            *dirty = true;
            Ok(Outcome::Done(Ok(())))
        }
        Job::Release { key, token, .. } => {
            if let Err(e) = held(table, key, *token, now)? {
                return Ok(Outcome::Done(Err(e)));
            }
            table.remove(key.as_str())?;
            *dirty = true;
            Ok(Outcome::Done(Ok(())))
        }
    }
}

/// The fingerprint of `key`'s claim if `token` holds it right now, else
/// `Fenced` (or `Corrupt`).
fn held(
    table: &redb::Table<&str, &[u8]>,
    key: &str,
    token: FencingToken,
    now: u64,
) -> Result<Result<Fingerprint, StoreError>, redb::Error> {
    Ok(match table.get(key)? {
        Some(v) => match parse(v.value()) {
            Ok(row) if row.kind == IN_FLIGHT && row.token == token && row.expires_ms > now => {
                Ok(row.fingerprint)
            }
            Ok(_) => Err(StoreError::Fenced),
            Err(e) => Err(e),
        },
        None => Err(StoreError::Fenced),
    })
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
