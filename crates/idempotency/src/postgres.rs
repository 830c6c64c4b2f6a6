//! PostgreSQL store: one statement per operation, schema created (and
//! migrated) on first use, an expiry index and a periodic sweep.
//!
//! # Model
//!
//! One row per [`StoreKey`]: `state` 1 (a claim) or 2 (a completed result),
//! the holder's fencing `token`, the `fingerprint`, the `payload`, and two
//! deadlines:
//!
//! - `expires_at`: when the row is gone and the key free. For a result, the
//!   end of its TTL; for a claim, the end of its lease plus, under
//!   [`Lapse::Lock`], the lock ([`Lease::record_life`]).
//! - `lease_until`: when the claim's lease ends, valid while `lease_token`
//!   (the token of the claim that set it) equals `token`. Otherwise, in rows
//!   written by the version before leases could lock, the lease ends at
//!   `expires_at`, which is what that version meant.
//!
//! A claim row is *held* while its lease end is ahead, *abandoned* once its
//! lease ended while the row still lives (only a locking lease makes a row
//! outlive its lease), and gone once `expires_at` has passed. All times come
//! from the database clock (`clock_timestamp()`), so instances with skewed
//! clocks still agree on when a lease ends.
//!
//! Fencing tokens come from a sequence (`<table>_fence_seq`): they increase
//! across the whole table, so per key too, across release, lapse, expiry,
//! sweeping and removal (deleting rows never sets the sequence back), and
//! they never depend on a clock.
//!
//! # One statement per operation
//!
//! - **claim** is `SELECT ... FROM <table>_claim_v2($1, $2, $3, $4)` (key,
//!   fingerprint, hold and lock in milliseconds; lock 0 for [`Lapse::Free`]),
//!   a PL/pgSQL function created with the table. It returns a kind: 1
//!   acquired, 2 in flight, 3 completed, 4 abandoned. It reads the live row
//!   first (a replay, an in-flight duplicate or an abandoned key is a plain
//!   read, no write, no row lock), and only when there is none runs `INSERT
//!   ... ON CONFLICT (key) DO UPDATE ... WHERE <table>.expires_at <= now
//!   RETURNING token`. An abandoned row's `expires_at` is the end of its
//!   lock, so no claim takes it over before then, whatever its own lease. A
//!   plain `INSERT ... ON CONFLICT` with a fallback `SELECT` in the same
//!   statement would not do: when a concurrent claim commits the row after
//!   the statement's snapshot was taken, the fallback cannot see it and the
//!   statement returns nothing. Inside the function every statement takes a
//!   fresh snapshot (READ COMMITTED, volatile function), so a claim that
//!   loses that race loops once and reads the winner's row. Still one round
//!   trip.
//! - **renew** is one `UPDATE ... SET lease_until = now + hold, expires_at =
//!   now + hold + lock, lease_token = token FROM (SELECT clock_timestamp() AS
//!   now) ... WHERE key = $1 AND token = $2 AND state = 1 AND <lease end> >
//!   now`, one reading of the clock for the check and both deadlines; no row
//!   updated means [`StoreError::Fenced`].
//! - **complete** is one `UPDATE ... SET state = 2, payload = $3, expires_at
//!   = clock_timestamp() + ttl, lease_until = NULL, lease_token = NULL WHERE
//!   key = $1 AND token = $2 AND state = 1 AND <lease end> >
//!   clock_timestamp()`; no row updated means [`StoreError::Fenced`].
//! - **release** is one `DELETE` with the same condition.
//! - **inspect** is one `SELECT` of the live row, its kind (held, abandoned,
//!   completed) and the time left computed in SQL from one reading of the
//!   clock.
//! - **remove** is one `DELETE ... WHERE key = $1 RETURNING expires_at >
//!   clock_timestamp()`: whatever the key held goes, and the answer says
//!   whether it was live.
//! - **purge** deletes rows whose `expires_at` has passed (see below); an
//!   abandoned row's lasts until its lock ends, so a sweep never frees a
//!   locked key early.
//!
//! Statements are prepared once per pooled connection (deadpool's statement
//! cache), so after a connection's first use each operation is exactly one
//! round trip: a new request costs two (claim, complete), a replay one.
//!
//! # Schema
//!
//! Created on first use unless [`PostgresOptions::create_schema`] is off:
//! the DDL runs in one transaction under `pg_advisory_xact_lock`, so several
//! processes starting at once do not trip over `CREATE TABLE IF NOT EXISTS`
//! (which is not safe against concurrent creation on its own). To manage the
//! schema with your own migrations, run the SQL that
//! [`PostgresStore::migration_sql`] returns; for the default table
//! `keel_idempotency` it is:
//!
//! ```sql
//! CREATE SEQUENCE IF NOT EXISTS keel_idempotency_fence_seq;
//! CREATE TABLE IF NOT EXISTS keel_idempotency (
//!     key         text        PRIMARY KEY,
//!     state       smallint    NOT NULL CHECK (state IN (1, 2)),
//!     token       bigint      NOT NULL,
//!     fingerprint bytea       NOT NULL,
//!     payload     bytea,
//!     expires_at  timestamptz NOT NULL,
//!     lease_until timestamptz,
//!     lease_token bigint
//! );
//! DO $keel$
//! BEGIN
//!     IF (SELECT count(*) FROM pg_attribute
//!          WHERE attrelid = 'keel_idempotency'::regclass AND NOT attisdropped
//!            AND attname IN ('lease_until', 'lease_token')) < 2 THEN
//!         ALTER TABLE keel_idempotency
//!             ADD COLUMN IF NOT EXISTS lease_until timestamptz,
//!             ADD COLUMN IF NOT EXISTS lease_token bigint;
//!     END IF;
//! END
//! $keel$;
//! CREATE INDEX IF NOT EXISTS keel_idempotency_expires_at_idx ON keel_idempotency (expires_at);
//! CREATE OR REPLACE FUNCTION keel_idempotency_claim_v2(
//!     p_key text, p_fingerprint bytea, p_lease_ms bigint, p_lock_ms bigint,
//!     OUT o_kind smallint, OUT o_token bigint, OUT o_fingerprint bytea,
//!     OUT o_payload bytea, OUT o_remaining_ms bigint)
//! LANGUAGE plpgsql VOLATILE AS $keel$
//! DECLARE
//!     cur record;
//!     now_at timestamptz;
//!     new_token bigint;
//! BEGIN
//!     FOR attempt IN 1..16 LOOP
//!         now_at := clock_timestamp();
//!         SELECT r.state, r.fingerprint, r.payload,
//!                CASE WHEN r.lease_token = r.token THEN r.lease_until ELSE r.expires_at END AS lease_end
//!           INTO cur
//!           FROM keel_idempotency r
//!          WHERE r.key = p_key AND r.expires_at > now_at;
//!         IF FOUND THEN
//!             o_fingerprint := cur.fingerprint;
//!             IF cur.state = 2 THEN
//!                 o_kind := 3;
//!                 o_payload := cur.payload;
//!             ELSIF cur.lease_end > now_at THEN
//!                 o_kind := 2;
//!                 o_remaining_ms := GREATEST(1, ceil(extract(epoch FROM cur.lease_end - now_at) * 1000))::bigint;
//!             ELSE
//!                 o_kind := 4;
//!             END IF;
//!             RETURN;
//!         END IF;
//!         new_token := nextval('keel_idempotency_fence_seq');
//!         INSERT INTO keel_idempotency AS r (key, state, token, fingerprint, payload, expires_at, lease_until, lease_token)
//!         VALUES (p_key, 1, new_token, p_fingerprint, NULL,
//!                 now_at + (p_lease_ms + p_lock_ms) * interval '1 millisecond',
//!                 now_at + p_lease_ms * interval '1 millisecond', new_token)
//!         ON CONFLICT (key) DO UPDATE
//!             SET state = 1, token = EXCLUDED.token, fingerprint = EXCLUDED.fingerprint,
//!                 payload = NULL, expires_at = EXCLUDED.expires_at,
//!                 lease_until = EXCLUDED.lease_until, lease_token = EXCLUDED.lease_token
//!             WHERE r.expires_at <= now_at
//!         RETURNING r.token INTO o_token;
//!         IF FOUND THEN
//!             o_kind := 1;
//!             RETURN;
//!         END IF;
//!     END LOOP;
//!     RAISE EXCEPTION 'keel-idempotency: claim of % kept losing races', p_key
//!         USING ERRCODE = '40001';
//! END
//! $keel$;
//! ```
//!
//! Expired rows are harmless (every statement checks `expires_at`), but they
//! take space: [`Store::purge_expired`] deletes them in batches using the
//! expiry index, and [`PostgresStore::spawn_sweeper`] runs it periodically.
//! Several instances may sweep at once (`FOR UPDATE SKIP LOCKED`).
//!
//! ## Upgrading a table of the previous version
//!
//! Tables created before leases could lock lack `lease_until` and
//! `lease_token`. The setup ([`PostgresStore::ensure_schema`], or the SQL of
//! [`PostgresStore::migration_sql`]) adds them in place (`ALTER TABLE ... ADD
//! COLUMN IF NOT EXISTS`; nullable and without a default, so no row is
//! rewritten), under the same advisory lock, so processes upgrading at once do
//! it once. It runs only while a column is missing, because `ALTER TABLE` takes
//! the table's exclusive lock even when there is nothing to add; and the setup
//! sets `lock_timeout` to one operation timeout, so an `ALTER` waiting behind a
//! long transaction gives up (the next operation tries again) instead of
//! queueing every claim behind it. Rows written by the previous version have no
//! `lease_token`: their lease ends at `expires_at`, as before, so their
//! holders' completions still succeed and their lapse frees the key as it did.
//!
//! The claim function takes the lock time now, so it has a new name,
//! `<table>_claim_v2`. The previous `<table>_claim(text, bytea, bigint)` is not
//! dropped: processes of the previous version still running during a rolling
//! upgrade call it, and it stays correct on the upgraded table (as do that
//! version's complete and release, which only touch its own claims). It takes a
//! row over only once `expires_at` has passed, so never an abandoned key before
//! its lock ends (it answers "in flight" until then); a row it takes over keeps
//! the `lease_token` of an earlier claim, so it reads as a row of the previous
//! version, its lease ending at `expires_at`, as that version set it. Once no
//! process of the previous version is left, drop it: `DROP FUNCTION IF EXISTS
//! keel_idempotency_claim(text, bytea, bigint);`.
//!
//! # Consistency
//!
//! Each operation is one statement, its own transaction, serialised with
//! every other operation on the key by the row (primary key, row locks), so
//! no interleaving can let two claims of one key win; when it returns `Ok`,
//! it has committed. What survives a failure is what PostgreSQL keeps of a
//! commit. With the defaults (`synchronous_commit = on`, `fsync = on`) a
//! commit is acknowledged only once its WAL is flushed, so a claim or result
//! survives a crash of the server. With `synchronous_commit = off` (set for
//! the server, a database, a role or the store's connections) the server
//! acknowledges first and flushes within three `wal_writer_delay`s: a crash
//! can lose the last commits, and a lost claim or result lets a retry run the
//! operation again. A failover to an asynchronous standby loses likewise what
//! it had not received. Keep `synchronous_commit = on`. For strict
//! exactly-once across failover, run synchronous standbys
//! (`synchronous_standby_names`), fail over only to one of them, and set
//! `synchronous_commit = remote_apply`: a commit is then acknowledged only
//! once the standby has applied it, so every claim or result a caller saw
//! succeed is on the new primary and visible to the first claim it serves
//! (`on` with synchronous standbys already has it on the standby's disk).
//! Deadlines read the server's clock: a failover to a server whose
//! clock differs moves leases by the difference, so keep the servers' clocks
//! synchronised. An operation that timed out on the client may still have
//! committed: a claim then holds the key for its lease (and, locking, its
//! lock), the safe direction.
//!
//! # Failures
//!
//! Each operation, taking a pooled connection included, is bounded by
//! [`PostgresOptions::op_timeout`] (500 ms by default); a refused or broken
//! connection, a full pool or no answer in time is
//! [`StoreError::Unavailable`]. Broken connections are dropped by the pool
//! and replaced on the next use, so the store recovers by itself. Until
//! the schema exists (or is upgraded), the first operation may also spend up
//! to four operation timeouts (at least 2 s) creating it.
//!
//! ```
//! use std::time::Duration;
//! use keel_idempotency::postgres::{PostgresOptions, PostgresStore};
//! use keel_idempotency::store::{Claim, Fingerprint, Lease, Store, StoreKey};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # // Runs against the test server when one is configured (CI), else skips.
//! # let Ok(url) = std::env::var("KEEL_TEST_POSTGRES_URL") else { return Ok(()) };
//! # let table = format!("keel_doc_{}", std::process::id());
//! let store = PostgresStore::connect(&url, PostgresOptions::default().table(&table)?)?;
//! let sweeper = store.spawn_sweeper(Duration::from_secs(60));
//! let key = StoreKey::new("tenant1:POST:/orders:abc").unwrap();
//! let fp = Fingerprint::from_bytes([1; 32]);
//! let Claim::Acquired { token } = store.claim(&key, fp, Lease::freeing(Duration::from_secs(30))).await? else {
//!     panic!("a fresh key is free");
//! };
//! // ... run the operation, then keep its result for a day ...
//! store.complete(&key, token, b"201 Created", Duration::from_secs(86_400)).await?;
//! assert!(matches!(
//!     store.claim(&key, fp, Lease::freeing(Duration::from_secs(30))).await?,
//!     Claim::Completed { .. }
//! ));
//! sweeper.abort();
//! # let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
//! # tokio::spawn(conn);
//! # client.batch_execute(&format!("DROP TABLE {table}; DROP SEQUENCE {table}_fence_seq; \
//! #     DROP FUNCTION {table}_claim_v2(text, bytea, bigint, bigint);")).await?;
//! # Ok(())
//! # }
//! ```

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::OnceCell;
use tokio_postgres::NoTls;

use crate::store::{
    BoxFuture, Claim, FencingToken, Fingerprint, KeyState, Lapse, Lease, Store, StoreError,
    StoreKey,
};

/// The longest table name accepted (without the schema), leaving room for
/// the derived names (`_fence_seq`, `_expires_at_idx`, `_claim_v2`) within
/// PostgreSQL's 63-byte identifier limit.
pub const MAX_TABLE_NAME_LEN: usize = 40;

/// Settings of a [`PostgresStore`]; configuration, separate from the
/// running store.
///
/// ```
/// use std::time::Duration;
/// use keel_idempotency::postgres::PostgresOptions;
///
/// let options = PostgresOptions::default()
///     .table("billing.idempotency")
///     .unwrap()
///     .op_timeout(Duration::from_millis(250))
///     .pool_size(16);
/// assert_eq!(options.table_name(), "billing.idempotency");
/// assert!(PostgresOptions::default().table("drop table x;").is_err());
/// ```
#[derive(Clone, Debug)]
pub struct PostgresOptions {
    table: TableName,
    op_timeout: Duration,
    pool_size: usize,
    create_schema: bool,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self {
            table: TableName {
                schema: None,
                name: "keel_idempotency".to_owned(),
            },
            op_timeout: Duration::from_millis(500),
            pool_size: 16,
            create_schema: true,
        }
    }
}

impl PostgresOptions {
    /// The table to use (default `keel_idempotency`): a lower-case SQL
    /// identifier (`[a-z_][a-z0-9_]*`, at most [`MAX_TABLE_NAME_LEN`]
    /// bytes), optionally qualified by a schema (`schema.table`). Anything
    /// else is refused, since the name is written into SQL.
    ///
    /// ```
    /// # use keel_idempotency::postgres::{PostgresOptions, SetupError};
    /// assert!(PostgresOptions::default().table("idem_v2").is_ok());
    /// assert!(matches!(
    ///     PostgresOptions::default().table("Idem"),
    ///     Err(SetupError::InvalidTable(_))
    /// ));
    /// ```
    pub fn table(mut self, table: &str) -> Result<Self, SetupError> {
        self.table = TableName::parse(table)?;
        Ok(self)
    }

    /// The configured table, as given.
    ///
    /// ```
    /// # use keel_idempotency::postgres::PostgresOptions;
    /// assert_eq!(PostgresOptions::default().table_name(), "keel_idempotency");
    /// ```
    pub fn table_name(&self) -> String {
        self.table.qualified()
    }

    /// The most one operation may take, waiting for a pooled connection or
    /// opening one included, before it fails with
    /// [`StoreError::Unavailable`] (default 500 ms).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use keel_idempotency::postgres::PostgresOptions;
    /// let o = PostgresOptions::default().op_timeout(Duration::from_millis(100));
    /// ```
    pub fn op_timeout(mut self, timeout: Duration) -> Self {
        self.op_timeout = timeout;
        self
    }

    /// How many connections [`PostgresStore::connect`] may open (default
    /// 16, at least 1).
    ///
    /// ```
    /// # use keel_idempotency::postgres::PostgresOptions;
    /// let o = PostgresOptions::default().pool_size(4);
    /// ```
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = size.max(1);
        self
    }

    /// Whether the store creates its table, sequence, index and function on
    /// first use, and upgrades a table of the previous version in place
    /// (default true). Turn it off when the application's role may not run
    /// DDL and the schema comes from [`PostgresStore::migration_sql`].
    ///
    /// ```
    /// # use keel_idempotency::postgres::PostgresOptions;
    /// let o = PostgresOptions::default().create_schema(false);
    /// ```
    pub fn create_schema(mut self, create: bool) -> Self {
        self.create_schema = create;
        self
    }
}

/// Why a [`PostgresStore`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The connection URL could not be parsed.
    #[error("invalid PostgreSQL URL: {0}")]
    InvalidUrl(String),
    /// The table name is not a plain identifier.
    #[error(
        "invalid table name {0:?}: use a lower-case identifier [a-z_][a-z0-9_]* of at most 40 bytes, optionally schema-qualified (schema.table)"
    )]
    InvalidTable(String),
    /// The connection pool could not be built.
    #[error("cannot build the PostgreSQL pool: {0}")]
    Pool(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct TableName {
    schema: Option<String>,
    name: String,
}

impl TableName {
    fn parse(raw: &str) -> Result<Self, SetupError> {
        let invalid = || SetupError::InvalidTable(raw.to_owned());
        let (schema, name) = match raw.split_once('.') {
            Some((s, n)) => (Some(s), n),
            None => (None, raw),
        };
        let ident_ok = |s: &str| {
            let mut bytes = s.bytes();
            matches!(bytes.next(), Some(b'a'..=b'z' | b'_'))
                && bytes.all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_'))
                && s.len() <= MAX_TABLE_NAME_LEN
        };
        if !ident_ok(name) || schema.is_some_and(|s| !ident_ok(s)) {
            return Err(invalid());
        }
        Ok(Self {
            schema: schema.map(str::to_owned),
            name: name.to_owned(),
        })
    }

    fn qualified(&self) -> String {
        self.with_suffix("")
    }

    /// A derived object in the same schema: `schema.name<suffix>`.
    fn with_suffix(&self, suffix: &str) -> String {
        match &self.schema {
            Some(s) => format!("{s}.{}{suffix}", self.name),
            None => format!("{}{suffix}", self.name),
        }
    }
}

/// The SQL text of each operation, built once from the table name.
struct Sql {
    claim: String,
    renew: String,
    inspect: String,
    remove: String,
    complete: String,
    release: String,
    purge: String,
    ddl: String,
    lock_id: i64,
}

const PURGE_BATCH: u64 = 1000;

/// The end of the lease of the claim in row `r`: `lease_until`, but only
/// while the claim that wrote it still holds the row (`lease_token =
/// token`). A row without one (written by the version before leases could
/// lock, or taken over by that version's claim function during a rolling
/// upgrade, which leaves the previous claim's `lease_until` behind) ends
/// its lease at `expires_at`, which is what that version meant.
fn lease_end(r: &str) -> String {
    format!("CASE WHEN {r}.lease_token = {r}.token THEN {r}.lease_until ELSE {r}.expires_at END")
}

/// Whole milliseconds from `now` to `at`, rounded up, at least 1.
fn millis_until(at: &str, now: &str) -> String {
    format!("GREATEST(1, ceil(extract(epoch FROM {at} - {now}) * 1000))::bigint")
}

impl Sql {
    fn new(table: &TableName) -> Self {
        let t = table.qualified();
        let func = table.with_suffix(CLAIM_FUNCTION_SUFFIX);
        let lease_end = lease_end("r");
        let lease_left = millis_until(&lease_end, "c.now");
        let expires_in = millis_until("r.expires_at", "c.now");
        Self {
            claim: format!(
                "SELECT o_kind, o_token, o_fingerprint, o_payload, o_remaining_ms \
                 FROM {func}($1::text, $2::bytea, $3::bigint, $4::bigint)"
            ),
            // One reading of the clock (`c.now`) for the check and both new
            // deadlines, so the record outlives the lease by exactly the
            // lock.
            renew: format!(
                "UPDATE {t} AS r \
                 SET lease_until = c.now + $3::bigint * interval '1 millisecond', \
                 expires_at = c.now + ($3::bigint + $4::bigint) * interval '1 millisecond', \
                 lease_token = r.token \
                 FROM (SELECT clock_timestamp() AS now) c \
                 WHERE r.key = $1::text AND r.token = $2::bigint AND r.state = 1 \
                 AND {lease_end} > c.now"
            ),
            // Kinds as the claim function's: 2 held, 3 completed, 4
            // abandoned (a claim whose lease ended while its record lives).
            inspect: format!(
                "SELECT CASE WHEN r.state = 2 THEN 3 WHEN {lease_end} > c.now THEN 2 ELSE 4 END::smallint, \
                 r.token, r.fingerprint, r.payload, {lease_left}, {expires_in} \
                 FROM {t} r, (SELECT clock_timestamp() AS now) c \
                 WHERE r.key = $1::text AND r.expires_at > c.now"
            ),
            remove: format!(
                "DELETE FROM {t} WHERE key = $1::text RETURNING expires_at > clock_timestamp()"
            ),
            complete: format!(
                "UPDATE {t} AS r SET state = 2, payload = $3::bytea, \
                 expires_at = clock_timestamp() + $4::bigint * interval '1 millisecond', \
                 lease_until = NULL, lease_token = NULL \
                 WHERE r.key = $1::text AND r.token = $2::bigint AND r.state = 1 \
                 AND {lease_end} > clock_timestamp()"
            ),
            release: format!(
                "DELETE FROM {t} AS r WHERE r.key = $1::text AND r.token = $2::bigint \
                 AND r.state = 1 AND {lease_end} > clock_timestamp()"
            ),
            purge: format!(
                "DELETE FROM {t} WHERE key IN (SELECT key FROM {t} \
                 WHERE expires_at <= clock_timestamp() ORDER BY expires_at \
                 LIMIT {PURGE_BATCH} FOR UPDATE SKIP LOCKED)"
            ),
            ddl: migration_sql(table),
            lock_id: lock_id(&t),
        }
    }
}

/// The claim function's name after the table's: `<table>_claim_v2`. The
/// version before leases could lock had `<table>_claim(text, bytea,
/// bigint)`; the new one takes the lock time too, so it got a new name
/// rather than an overload of the old one, which the migration leaves in
/// place for processes of that version still running during an upgrade.
const CLAIM_FUNCTION_SUFFIX: &str = "_claim_v2";

fn migration_sql(table: &TableName) -> String {
    let t = table.qualified();
    let seq = table.with_suffix("_fence_seq");
    let func = table.with_suffix(CLAIM_FUNCTION_SUFFIX);
    // An index name takes no schema: it lives in its table's schema.
    let idx = format!("{}_expires_at_idx", table.name);
    let lease_end = lease_end("r");
    format!(
        r"CREATE SEQUENCE IF NOT EXISTS {seq};
CREATE TABLE IF NOT EXISTS {t} (
    key         text        PRIMARY KEY,
    state       smallint    NOT NULL CHECK (state IN (1, 2)),
    token       bigint      NOT NULL,
    fingerprint bytea       NOT NULL,
    payload     bytea,
    expires_at  timestamptz NOT NULL,
    lease_until timestamptz,
    lease_token bigint
);
DO $keel$
BEGIN
    IF (SELECT count(*) FROM pg_attribute
         WHERE attrelid = '{t}'::regclass AND NOT attisdropped
           AND attname IN ('lease_until', 'lease_token')) < 2 THEN
        ALTER TABLE {t}
            ADD COLUMN IF NOT EXISTS lease_until timestamptz,
            ADD COLUMN IF NOT EXISTS lease_token bigint;
    END IF;
END
$keel$;
CREATE INDEX IF NOT EXISTS {idx} ON {t} (expires_at);
CREATE OR REPLACE FUNCTION {func}(
    p_key text, p_fingerprint bytea, p_lease_ms bigint, p_lock_ms bigint,
    OUT o_kind smallint, OUT o_token bigint, OUT o_fingerprint bytea,
    OUT o_payload bytea, OUT o_remaining_ms bigint)
LANGUAGE plpgsql VOLATILE AS $keel$
DECLARE
    cur record;
    now_at timestamptz;
    new_token bigint;
BEGIN
    FOR attempt IN 1..16 LOOP
        now_at := clock_timestamp();
        SELECT r.state, r.fingerprint, r.payload,
               {lease_end} AS lease_end
          INTO cur
          FROM {t} r
         WHERE r.key = p_key AND r.expires_at > now_at;
        IF FOUND THEN
            o_fingerprint := cur.fingerprint;
            IF cur.state = 2 THEN
                o_kind := 3;
                o_payload := cur.payload;
            ELSIF cur.lease_end > now_at THEN
                o_kind := 2;
                o_remaining_ms := GREATEST(1, ceil(extract(epoch FROM cur.lease_end - now_at) * 1000))::bigint;
            ELSE
                o_kind := 4;
            END IF;
            RETURN;
        END IF;
        new_token := nextval('{seq}');
        INSERT INTO {t} AS r (key, state, token, fingerprint, payload, expires_at, lease_until, lease_token)
        VALUES (p_key, 1, new_token, p_fingerprint, NULL,
                now_at + (p_lease_ms + p_lock_ms) * interval '1 millisecond',
                now_at + p_lease_ms * interval '1 millisecond', new_token)
        ON CONFLICT (key) DO UPDATE
            SET state = 1, token = EXCLUDED.token, fingerprint = EXCLUDED.fingerprint,
                payload = NULL, expires_at = EXCLUDED.expires_at,
                lease_until = EXCLUDED.lease_until, lease_token = EXCLUDED.lease_token
            WHERE r.expires_at <= now_at
        RETURNING r.token INTO o_token;
        IF FOUND THEN
            o_kind := 1;
            RETURN;
        END IF;
    END LOOP;
    RAISE EXCEPTION 'keel-idempotency: claim of % kept losing races', p_key
        USING ERRCODE = '40001';
END
$keel$;
"
    )
}

/// A stable advisory-lock id for the table (FNV-1a), so every process
/// creating the same table serialises on the same lock.
fn lock_id(table: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in "keel-idempotency:".bytes().chain(table.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    i64::from_ne_bytes(h.to_ne_bytes())
}

/// Claims, renews, completes, releases, inspects and removes keys with one
/// SQL statement each.
///
/// Cheap to clone: clones share the pool.
///
/// ```no_run
/// use keel_idempotency::postgres::{PostgresOptions, PostgresStore};
///
/// # async fn demo() -> Result<(), keel_idempotency::postgres::SetupError> {
/// let store = PostgresStore::connect(
///     "postgres://postgres@127.0.0.1:5432/app",
///     PostgresOptions::default(),
/// )?;
/// store.ensure_schema().await.expect("database reachable");
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    table: TableName,
    sql: Sql,
    op_timeout: Duration,
    create_schema: bool,
    schema_ready: OnceCell<()>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("table", &self.inner.table.qualified())
            .field("op_timeout", &self.inner.op_timeout)
            .finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// Builds a pool of [`PostgresOptions::pool_size`] connections to `url`
    /// (`postgres://user@host:5432/db`, or the `key=value` form), without
    /// TLS. Connections open on first use; for TLS, build a pool yourself
    /// and use [`PostgresStore::from_pool`].
    ///
    /// ```
    /// use keel_idempotency::postgres::{PostgresOptions, PostgresStore, SetupError};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let ok = PostgresStore::connect("postgres://u@127.0.0.1:1/db", PostgresOptions::default());
    /// assert!(ok.is_ok()); // nothing is contacted yet
    /// let bad = PostgresStore::connect("postgres://u@h:notaport/db", PostgresOptions::default());
    /// assert!(matches!(bad, Err(SetupError::InvalidUrl(_))));
    /// # }
    /// ```
    pub fn connect(url: &str, options: PostgresOptions) -> Result<Self, SetupError> {
        let mut config = tokio_postgres::Config::from_str(url)
            .map_err(|e| SetupError::InvalidUrl(e.to_string()))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(options.op_timeout);
        }
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                // Fast: no health-check query on checkout, so an operation
                // stays one round trip; broken connections are still
                // detected (closed) and replaced.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(options.op_timeout))
            .create_timeout(Some(options.op_timeout))
            .build()
            .map_err(|e| SetupError::Pool(e.to_string()))?;
        Ok(Self::from_pool(pool, options))
    }

    /// Uses an existing deadpool-postgres pool (TLS, custom settings, a pool
    /// shared with the application). [`PostgresOptions::pool_size`] is
    /// ignored.
    ///
    /// ```no_run
    /// # use keel_idempotency::postgres::{PostgresOptions, PostgresStore};
    /// # fn demo(pool: deadpool_postgres::Pool) {
    /// let store = PostgresStore::from_pool(pool, PostgresOptions::default());
    /// # }
    /// ```
    pub fn from_pool(pool: Pool, options: PostgresOptions) -> Self {
        Self {
            inner: Arc::new(Inner {
                pool,
                sql: Sql::new(&options.table),
                table: options.table,
                op_timeout: options.op_timeout,
                create_schema: options.create_schema,
                schema_ready: OnceCell::new(),
            }),
        }
    }

    /// The SQL that creates the schema for `table` (sequence, table, expiry
    /// index, claim function `<table>_claim_v2`), or upgrades a table of the
    /// previous version in place (adding the lease columns), for your own
    /// migrations. Idempotent: every statement is `IF NOT EXISTS` or `OR
    /// REPLACE`, and the column upgrade runs only while a column is missing.
    ///
    /// ```
    /// use keel_idempotency::postgres::PostgresStore;
    ///
    /// let sql = PostgresStore::migration_sql("idem").unwrap();
    /// assert!(sql.contains("CREATE TABLE IF NOT EXISTS idem ("));
    /// assert!(sql.contains("ADD COLUMN IF NOT EXISTS lease_until timestamptz"));
    /// assert!(sql.contains("CREATE INDEX IF NOT EXISTS idem_expires_at_idx"));
    /// assert!(sql.contains("CREATE OR REPLACE FUNCTION idem_claim_v2("));
    /// assert!(PostgresStore::migration_sql("idem; drop table x").is_err());
    /// ```
    pub fn migration_sql(table: &str) -> Result<String, SetupError> {
        Ok(migration_sql(&TableName::parse(table)?))
    }

    /// The table this store uses, schema-qualified if configured so.
    ///
    /// ```
    /// # use keel_idempotency::postgres::{PostgresOptions, PostgresStore};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let o = PostgresOptions::default().table("idem").unwrap();
    /// let store = PostgresStore::connect("postgres://u@127.0.0.1/db", o).unwrap();
    /// assert_eq!(store.table(), "idem");
    /// # }
    /// ```
    pub fn table(&self) -> String {
        self.inner.table.qualified()
    }

    /// Creates the schema now if it is not there yet, or upgrades a table of
    /// the previous version (if [`PostgresOptions::create_schema`] is on);
    /// otherwise the first operation does it. Safe to call from many
    /// processes at once. An upgrade waits for the table's exclusive lock
    /// for at most [`PostgresOptions::op_timeout`], then fails with
    /// [`StoreError::Unavailable`] and is tried again on the next call.
    ///
    /// ```no_run
    /// # async fn demo(store: keel_idempotency::postgres::PostgresStore) {
    /// store.ensure_schema().await.expect("database reachable");
    /// # }
    /// ```
    pub async fn ensure_schema(&self) -> Result<(), StoreError> {
        if !self.inner.create_schema {
            return Ok(());
        }
        self.inner
            .schema_ready
            .get_or_try_init(|| async {
                self.bounded(schema_timeout(self.inner.op_timeout), async {
                    let mut client = self.inner.pool.get().await.map_err(pool_error)?;
                    let tx = client.transaction().await.map_err(pg_error)?;
                    tx.execute(
                        "SELECT pg_advisory_xact_lock($1::bigint)",
                        &[&self.inner.sql.lock_id],
                    )
                    .await
                    .map_err(pg_error)?;
                    // Adding a column (once, on upgrade) takes the table's
                    // exclusive lock, and every claim queues behind a lock
                    // request that waits: give up after one operation's
                    // time rather than stall the traffic behind a long
                    // transaction. The next operation tries again.
                    tx.batch_execute(&format!(
                        "SET LOCAL lock_timeout = {}; {}",
                        millis(self.inner.op_timeout),
                        self.inner.sql.ddl
                    ))
                    .await
                    .map_err(pg_error)?;
                    tx.commit().await.map_err(pg_error)
                })
                .await
            })
            .await
            .map(|_| ())
    }

    /// Runs [`Store::purge_expired`] every `every` on a background task,
    /// until the returned handle is aborted or the runtime shuts down.
    /// Failures are skipped: the next tick tries again.
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # async fn demo(store: keel_idempotency::postgres::PostgresStore) {
    /// let sweeper = store.spawn_sweeper(Duration::from_secs(60));
    /// // ... on shutdown:
    /// sweeper.abort();
    /// # }
    /// ```
    pub fn spawn_sweeper(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let store = self.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every.max(Duration::from_millis(1)));
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                // An unreachable database is the engine's concern on the
                // request path; the sweep just tries again next tick.
                let _ = store.purge_expired_impl().await;
            }
        })
    }

    async fn bounded<T>(
        &self,
        limit: Duration,
        op: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(limit, op).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Unavailable(format!(
                "postgres: no answer within {limit:?}"
            ))),
        }
    }

    /// Runs one prepared statement on a pooled connection, schema first if
    /// needed, all within the operation timeout.
    async fn run<T>(
        &self,
        sql: &str,
        f: impl AsyncFnOnce(
            &deadpool_postgres::Client,
            &tokio_postgres::Statement,
        ) -> Result<T, tokio_postgres::Error>,
    ) -> Result<T, StoreError> {
        self.ensure_schema().await?;
        self.bounded(self.inner.op_timeout, async {
            let client = self.inner.pool.get().await.map_err(pool_error)?;
            let stmt = client.prepare_cached(sql).await.map_err(pg_error)?;
            f(&client, &stmt).await.map_err(pg_error)
        })
        .await
    }

    async fn claim_impl(
        &self,
        key: &StoreKey,
        fingerprint: Fingerprint,
        lease: Lease,
    ) -> Result<Claim, StoreError> {
        let (lease_ms, lock_ms) = lease_millis(lease);
        let row = self
            .run(&self.inner.sql.claim, async |c, s| {
                c.query_one(
                    s,
                    &[
                        &key.as_str(),
                        &&fingerprint.as_bytes()[..],
                        &lease_ms,
                        &lock_ms,
                    ],
                )
                .await
            })
            .await?;
        decode_claim(&row)
    }

    async fn renew_impl(
        &self,
        key: &StoreKey,
        token: FencingToken,
        lease: Lease,
    ) -> Result<(), StoreError> {
        // A token beyond i64 was never issued by the sequence.
        let Ok(token) = i64::try_from(token.get()) else {
            return Err(StoreError::Fenced);
        };
        let (lease_ms, lock_ms) = lease_millis(lease);
        let n = self
            .run(&self.inner.sql.renew, async |c, s| {
                c.execute(s, &[&key.as_str(), &token, &lease_ms, &lock_ms])
                    .await
            })
            .await?;
        if n == 1 {
            Ok(())
        } else {
            Err(StoreError::Fenced)
        }
    }

    async fn inspect_impl(&self, key: &StoreKey) -> Result<Option<KeyState>, StoreError> {
        let row = self
            .run(&self.inner.sql.inspect, async |c, s| {
                c.query_opt(s, &[&key.as_str()]).await
            })
            .await?;
        row.as_ref().map(decode_key_state).transpose()
    }

    async fn remove_impl(&self, key: &StoreKey) -> Result<bool, StoreError> {
        let row = self
            .run(&self.inner.sql.remove, async |c, s| {
                c.query_opt(s, &[&key.as_str()]).await
            })
            .await?;
        // No row: nothing was there. A row that had expired but was not
        // swept yet is gone now too, yet nothing live was there.
        match row {
            None => Ok(false),
            Some(r) => r
                .try_get::<_, Option<bool>>(0)
                .map(|live| live.unwrap_or(false))
                .map_err(|e| StoreError::Corrupt(format!("postgres: {e}"))),
        }
    }

    async fn complete_impl(
        &self,
        key: &StoreKey,
        token: FencingToken,
        payload: &[u8],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        // A token beyond i64 was never issued by the sequence.
        let Ok(token) = i64::try_from(token.get()) else {
            return Err(StoreError::Fenced);
        };
        let ttl_ms = millis(ttl);
        let n = self
            .run(&self.inner.sql.complete, async |c, s| {
                c.execute(s, &[&key.as_str(), &token, &payload, &ttl_ms])
                    .await
            })
            .await?;
        if n == 1 {
            Ok(())
        } else {
            Err(StoreError::Fenced)
        }
    }

    async fn release_impl(&self, key: &StoreKey, token: FencingToken) -> Result<(), StoreError> {
        let Ok(token) = i64::try_from(token.get()) else {
            return Err(StoreError::Fenced);
        };
        let n = self
            .run(&self.inner.sql.release, async |c, s| {
                c.execute(s, &[&key.as_str(), &token]).await
            })
            .await?;
        if n == 1 {
            Ok(())
        } else {
            Err(StoreError::Fenced)
        }
    }

    async fn purge_expired_impl(&self) -> Result<u64, StoreError> {
        let mut total = 0;
        loop {
            let n = self
                .run(&self.inner.sql.purge, async |c, s| c.execute(s, &[]).await)
                .await?;
            total += n;
            if n < PURGE_BATCH {
                return Ok(total);
            }
        }
    }
}

impl Store for PostgresStore {
    fn claim<'a>(
        &'a self,
        key: &'a StoreKey,
        fingerprint: Fingerprint,
        lease: Lease,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        Box::pin(self.claim_impl(key, fingerprint, lease))
    }

    fn renew<'a>(
        &'a self,
        key: &'a StoreKey,
        token: FencingToken,
        lease: Lease,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.renew_impl(key, token, lease))
    }

    fn inspect<'a>(
        &'a self,
        key: &'a StoreKey,
    ) -> BoxFuture<'a, Result<Option<KeyState>, StoreError>> {
        Box::pin(self.inspect_impl(key))
    }

    fn remove<'a>(&'a self, key: &'a StoreKey) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(self.remove_impl(key))
    }

    fn complete<'a>(
        &'a self,
        key: &'a StoreKey,
        token: FencingToken,
        payload: &'a [u8],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.complete_impl(key, token, payload, ttl))
    }

    fn release<'a>(
        &'a self,
        key: &'a StoreKey,
        token: FencingToken,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.release_impl(key, token))
    }

    fn purge_expired(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(self.purge_expired_impl())
    }

    fn name(&self) -> &'static str {
        "postgres"
    }
}

/// How long creating the schema may take: DDL under a lock that other
/// starting processes may hold for a moment, so more than one operation,
/// but still bounded so a hung database fails the first request in seconds.
fn schema_timeout(op_timeout: Duration) -> Duration {
    (op_timeout * 4).max(Duration::from_secs(2))
}

/// Whole milliseconds, rounded up and at least 1, capped at ten years so
/// the interval arithmetic cannot overflow.
fn millis(d: Duration) -> i64 {
    const CAP: u128 = 10 * 365 * 24 * 3600 * 1000;
    let ms = d.as_nanos().div_ceil(1_000_000).clamp(1, CAP);
    i64::try_from(ms).unwrap_or(i64::MAX)
}

/// A lease in whole milliseconds: the hold (at least 1) and the lock after
/// a lapse (0 when the lapse frees the key).
fn lease_millis(lease: Lease) -> (i64, i64) {
    let lock = match lease.lapse {
        Lapse::Lock(d) if !d.is_zero() => millis(d),
        Lapse::Lock(_) | Lapse::Free => 0,
    };
    (millis(lease.hold), lock)
}

fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    StoreError::Unavailable(format!("postgres pool: {e}"))
}

fn pg_error(e: tokio_postgres::Error) -> StoreError {
    // Data exceptions (22xxx) and internal errors (XX000 data corrupted...)
    // will not go away by waiting; everything else (connection lost,
    // shutting down, too many connections, serialization failures, a
    // missing table because someone dropped it) means the store cannot
    // serve right now.
    match e.code().map(tokio_postgres::error::SqlState::code) {
        Some(code) if code.starts_with("22") || code.starts_with("XX") => {
            StoreError::Corrupt(format!("postgres: {e}"))
        }
        _ => StoreError::Unavailable(format!("postgres: {e}")),
    }
}

fn corrupt(e: tokio_postgres::Error) -> StoreError {
    StoreError::Corrupt(format!("postgres: {e}"))
}

/// Column `i` of `row` as a fingerprint (32 bytes).
fn fingerprint_at(row: &tokio_postgres::Row, i: usize) -> Result<Fingerprint, StoreError> {
    row.try_get::<_, Option<Vec<u8>>>(i)
        .map_err(corrupt)?
        .and_then(|fp| <[u8; 32]>::try_from(fp.as_slice()).ok())
        .map(Fingerprint::from_bytes)
        .ok_or_else(|| StoreError::Corrupt("postgres: a fingerprint that is not 32 bytes".into()))
}

/// Column `i` of `row` as a non-negative count of milliseconds.
fn millis_at(row: &tokio_postgres::Row, i: usize, what: &str) -> Result<Duration, StoreError> {
    row.try_get::<_, Option<i64>>(i)
        .map_err(corrupt)?
        .and_then(|ms| u64::try_from(ms).ok())
        .map(|ms| Duration::from_millis(ms.max(1)))
        .ok_or_else(|| StoreError::Corrupt(format!("postgres: no valid {what}")))
}

/// Column `i` of `row` as a fencing token (issued by the sequence, so
/// positive).
fn token_at(row: &tokio_postgres::Row, i: usize) -> Result<FencingToken, StoreError> {
    row.try_get::<_, Option<i64>>(i)
        .map_err(corrupt)?
        .and_then(|t| u64::try_from(t).ok())
        .map(FencingToken::new)
        .ok_or_else(|| StoreError::Corrupt("postgres: no valid token".into()))
}

/// Column `i` of `row` as a stored result's payload.
fn payload_at(row: &tokio_postgres::Row, i: usize) -> Result<Vec<u8>, StoreError> {
    row.try_get::<_, Option<Vec<u8>>>(i)
        .map_err(corrupt)?
        .ok_or_else(|| StoreError::Corrupt("postgres: a completed record without payload".into()))
}

/// Reads the claim function's row: `o_kind` 1 acquired, 2 in flight, 3
/// completed, 4 abandoned, then token, fingerprint, payload and the time
/// left on the holder's lease.
fn decode_claim(row: &tokio_postgres::Row) -> Result<Claim, StoreError> {
    let kind: Option<i16> = row.try_get(0).map_err(corrupt)?;
    match kind {
        Some(1) => Ok(Claim::Acquired {
            token: token_at(row, 1)?,
        }),
        Some(2) => Ok(Claim::InFlight {
            fingerprint: fingerprint_at(row, 2)?,
            retry_after: millis_at(row, 4, "remaining lease")?,
        }),
        Some(3) => Ok(Claim::Completed {
            fingerprint: fingerprint_at(row, 2)?,
            payload: payload_at(row, 3)?,
        }),
        Some(4) => Ok(Claim::Abandoned {
            fingerprint: fingerprint_at(row, 2)?,
        }),
        other => Err(StoreError::Corrupt(format!(
            "postgres: claim returned kind {other:?}"
        ))),
    }
}

/// Reads the inspect statement's row: kind (2 held, 3 completed, 4
/// abandoned), token, fingerprint, payload, lease left, expiry left.
fn decode_key_state(row: &tokio_postgres::Row) -> Result<KeyState, StoreError> {
    let kind: Option<i16> = row.try_get(0).map_err(corrupt)?;
    match kind {
        Some(2) => Ok(KeyState::Held {
            fingerprint: fingerprint_at(row, 2)?,
            token: token_at(row, 1)?,
            lease_left: millis_at(row, 4, "remaining lease")?,
        }),
        Some(3) => Ok(KeyState::Completed {
            fingerprint: fingerprint_at(row, 2)?,
            payload: payload_at(row, 3)?,
            expires_in: millis_at(row, 5, "remaining time")?,
        }),
        Some(4) => Ok(KeyState::Abandoned {
            fingerprint: fingerprint_at(row, 2)?,
            token: token_at(row, 1)?,
            expires_in: millis_at(row, 5, "remaining time")?,
        }),
        other => Err(StoreError::Corrupt(format!(
            "postgres: inspect returned kind {other:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_validated() {
        for ok in ["keel_idempotency", "_t", "a1", "s.t", "billing.idem_v2"] {
            assert!(TableName::parse(ok).is_ok(), "{ok:?} must be accepted");
        }
        let long = "a".repeat(MAX_TABLE_NAME_LEN + 1);
        for bad in [
            "",
            "1abc",
            "Abc",
            "a-b",
            "a b",
            "a;drop table x",
            "a.b.c",
            ".a",
            "a.",
            "\"a\"",
            "é",
            long.as_str(),
        ] {
            assert!(
                matches!(TableName::parse(bad), Err(SetupError::InvalidTable(_))),
                "{bad:?} must be refused"
            );
        }
    }

    #[test]
    fn derived_names_stay_in_the_schema() {
        let t = TableName::parse("s.idem").expect("valid");
        let sql = migration_sql(&t);
        assert!(sql.contains("CREATE SEQUENCE IF NOT EXISTS s.idem_fence_seq;"));
        assert!(sql.contains("CREATE INDEX IF NOT EXISTS idem_expires_at_idx ON s.idem"));
        assert!(sql.contains("FUNCTION s.idem_claim_v2("));
        assert!(sql.contains("'s.idem'::regclass"));
        assert!(sql.contains("ALTER TABLE s.idem\n"));
    }

    #[test]
    fn module_docs_show_the_current_migration() {
        // The migration SQL in the module docs must not drift from the code.
        let source = include_str!("postgres.rs");
        let default = migration_sql(&PostgresOptions::default().table);
        for line in default.lines() {
            let doc_line = format!("//! {line}");
            assert!(
                source.contains(doc_line.trim_end()),
                "module docs lack migration line {line:?}"
            );
        }
    }

    #[test]
    fn lock_ids_differ_per_table() {
        assert_ne!(lock_id("a"), lock_id("b"));
        assert_eq!(lock_id("a"), lock_id("a"));
    }

    #[test]
    fn leases_pass_hold_and_lock_in_millis() {
        let s = Duration::from_secs;
        assert_eq!(lease_millis(Lease::freeing(s(5))), (5_000, 0));
        assert_eq!(lease_millis(Lease::locking(s(5), s(60))), (5_000, 60_000));
        // A lock of nothing frees the key at the lapse, like `Lapse::Free`.
        assert_eq!(
            lease_millis(Lease::locking(s(5), Duration::ZERO)),
            (5_000, 0)
        );
        let (hold, lock) = lease_millis(Lease::locking(Duration::MAX, Duration::MAX));
        assert!(
            hold.checked_add(lock).is_some(),
            "hold + lock cannot overflow"
        );
    }

    #[test]
    fn every_statement_reads_the_lease_end_the_same_way() {
        let sql = Sql::new(&PostgresOptions::default().table);
        let end = lease_end("r");
        for (name, text) in [
            ("renew", &sql.renew),
            ("inspect", &sql.inspect),
            ("complete", &sql.complete),
            ("release", &sql.release),
            ("claim function", &sql.ddl),
        ] {
            assert!(text.contains(&end), "{name} must use the shared lease end");
        }
    }

    #[test]
    fn millis_rounds_up_and_is_bounded() {
        assert_eq!(millis(Duration::ZERO), 1);
        assert_eq!(millis(Duration::from_micros(1001)), 2);
        assert_eq!(millis(Duration::MAX), 10 * 365 * 24 * 3600 * 1000);
    }
}
