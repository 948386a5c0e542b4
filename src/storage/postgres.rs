//! The PostgreSQL backend: many stateless servers on one database.
//!
//! One table holds the entries (`key bytea PRIMARY KEY`, so keys compare as
//! bytes), and one sequence hands out revisions. Every write sets the version
//! and the revision in the statement that writes the row, and takes its
//! revision only once it holds the row's lock, so that per key the revision
//! goes up with the version, whichever server wrote:
//!
//! - A single put or delete is one autocommitted statement: it locks the row
//!   (`SELECT .. FOR UPDATE`), checks the condition against the locked
//!   version, then updates the row (`revision = nextval(..)`, evaluated after
//!   the lock) or inserts it (`INSERT .. ON CONFLICT (key) DO UPDATE ..
//!   RETURNING`, so two first writes of a key cannot both create it). A failed
//!   condition reports the locked version and takes no revision.
//! - A batch is one transaction: it locks the rows that exist in key order,
//!   checks every condition against them, takes one revision, and writes
//!   everything in one statement. A key that a concurrent write created after
//!   the lock was taken is noticed (its version is not 1) and the transaction
//!   is rolled back and tried again, so conditions and revisions stay exact.
//! - Batch reads and each range page are one statement, so one snapshot.
//!
//! Across keys, PostgreSQL commits concurrent writes in any order, so a reader
//! may see revision 11 before revision 10 is visible; a write that starts after
//! another was acknowledged always gets a higher revision. See
//! docs/postgres.md for the precise guarantees.

use std::ops::Bound;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use futures_util::StreamExt as _;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{AsyncMessage, NoTls, Row};

use super::{
    Condition, Entry, FailedCondition, OpResult, ScanPage, ScanRequest, Store, WriteOp,
    WriteOutcome,
};
use crate::error::{StoreError, StoreResult};

/// The schema version this build creates and understands.
const SCHEMA_VERSION: i32 = 1;
/// How often a batch is tried again after a concurrent write created one of
/// its keys, or after a deadlock or serialization failure.
const MAX_ATTEMPTS: usize = 10;
/// PostgreSQL's limit on a notification payload is 8000 bytes.
const MAX_NOTIFY_PAYLOAD: usize = 7900;

/// The database clock in microseconds since the Unix epoch: one clock for
/// every server.
const NOW_US: &str = "(extract(epoch from clock_timestamp()) * 1000000)::int8";

/// How to reach PostgreSQL.
#[derive(Clone)]
pub struct PostgresConfig {
    /// A libpq-style URL or key=value string.
    pub url: String,
    /// Connections the pool keeps at most.
    pub pool_size: usize,
    /// Longest wait for a new connection, and for a free one from the pool.
    pub connect_timeout: Duration,
    /// Statements running longer are cancelled by the server.
    pub statement_timeout: Duration,
    /// The schema that holds kvstore's table and sequence (created if missing).
    pub schema: String,
    /// Send a notification for every write, for the caches of other servers
    /// (`--cache local`).
    pub notify: bool,
    /// How the connections name themselves in `pg_stat_activity`.
    pub application_name: String,
}

impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &redact(&self.url))
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("statement_timeout", &self.statement_timeout)
            .field("schema", &self.schema)
            .field("notify", &self.notify)
            .field("application_name", &self.application_name)
            .finish()
    }
}

impl PostgresConfig {
    /// Defaults: 16 connections, a 5 s connect timeout, a 30 s statement
    /// timeout, schema `public`, no notifications.
    pub fn new(url: impl Into<String>) -> Self {
        PostgresConfig {
            url: url.into(),
            pool_size: 16,
            connect_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(30),
            schema: "public".into(),
            notify: false,
            application_name: "kvstore".into(),
        }
    }

    /// The connection settings of every connection kvstore opens.
    fn pg_config(&self) -> StoreResult<tokio_postgres::Config> {
        let mut config: tokio_postgres::Config = self
            .url
            .parse()
            .map_err(|e| StoreError::Unavailable(format!("bad PostgreSQL URL: {e}")))?;
        config.connect_timeout(self.connect_timeout);
        config.keepalives_idle(Duration::from_secs(10));
        config.application_name(&self.application_name);
        let timeout_ms = self.statement_timeout.as_millis();
        if timeout_ms > 0 {
            let options = match config.get_options() {
                Some(existing) => format!("{existing} -c statement_timeout={timeout_ms}"),
                None => format!("-c statement_timeout={timeout_ms}"),
            };
            config.options(&options);
        }
        Ok(config)
    }

    /// The notification channel of this schema.
    pub fn channel(&self) -> String {
        format!("kvstore_{}", self.schema)
    }
}

/// The URL without its password, for logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &credentials[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ if url.contains("password") => "(key=value settings)".to_owned(),
        _ => url.to_owned(),
    }
}

/// A quoted SQL identifier.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A quoted SQL string literal.
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Condition kinds as the statements take them.
fn condition_params(condition: Condition) -> (i32, i64) {
    match condition {
        Condition::Any => (0, 0),
        Condition::Version(v) => (1, i64::try_from(v).unwrap_or(i64::MAX)),
        Condition::Absent => (2, 0),
        Condition::Exists => (3, 0),
    }
}

/// The statements, with the schema's names filled in.
struct Sql {
    get: String,
    get_many: String,
    put: String,
    delete: String,
    lock: String,
    apply: String,
    notify: Option<String>,
    kv: String,
}

impl Sql {
    fn new(config: &PostgresConfig) -> Self {
        let schema = ident(&config.schema);
        let kv = format!("{schema}.kv");
        let seq = literal(&format!("{schema}.kv_revision"));
        let channel = literal(&config.channel());
        // The put's notification: `revision:written_at_us:hex(key)`.
        let put_notify = if config.notify {
            format!(
                ", CASE WHEN applied THEN pg_notify({channel}, revision::text || ':' || \
                 updated_at_us::text || ':' || encode($1, 'hex')) END"
            )
        } else {
            String::new()
        };
        let delete_notify = if config.notify {
            format!(
                ", CASE WHEN ok THEN pg_notify({channel}, revision::text || ':' || \
                 {NOW_US}::text || ':' || encode($1, 'hex')) END"
            )
        } else {
            String::new()
        };
        // $1 key, $2 value, $3 condition kind, $4 expected version.
        let put = format!(
            "WITH cur AS MATERIALIZED (
                SELECT version FROM {kv} WHERE key = $1 FOR UPDATE
            ), now AS MATERIALIZED (SELECT {NOW_US} AS us),
            upd AS (
                UPDATE {kv} SET value = $2, version = {kv}.version + 1,
                    revision = nextval({seq}),
                    updated_at_us = greatest({kv}.updated_at_us, (SELECT us FROM now))
                WHERE key = $1 AND EXISTS (SELECT 1 FROM cur)
                  AND ($3 = 0 OR $3 = 3 OR ($3 = 1 AND (SELECT version FROM cur) = $4))
                RETURNING version, revision, created_at_us, updated_at_us
            ), ins AS (
                INSERT INTO {kv} (key, value, version, revision, created_at_us, updated_at_us)
                SELECT $1, $2, 1, nextval({seq}), us, us FROM now
                WHERE NOT EXISTS (SELECT 1 FROM cur) AND ($3 = 0 OR $3 = 2)
                ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value,
                    version = {kv}.version + 1, revision = nextval({seq}),
                    updated_at_us = greatest({kv}.updated_at_us, EXCLUDED.updated_at_us)
                WHERE $3 = 0
                RETURNING version, revision, created_at_us, updated_at_us
            ), done AS (
                SELECT true AS applied, version, revision, created_at_us, updated_at_us FROM upd
                UNION ALL
                SELECT true, version, revision, created_at_us, updated_at_us FROM ins
            )
            SELECT * {put_notify} FROM (
                SELECT applied, version, revision, created_at_us, updated_at_us FROM done
                UNION ALL
                SELECT false, (SELECT version FROM cur), NULL::int8, NULL::int8, NULL::int8
                WHERE NOT EXISTS (SELECT 1 FROM done)
            ) result"
        );
        // $1 key, $2 condition kind, $3 expected version. The revision is
        // taken only when the delete goes ahead, after the row is locked.
        let delete = format!(
            "WITH cur AS MATERIALIZED (
                SELECT version FROM {kv} WHERE key = $1 FOR UPDATE
            ), ok AS MATERIALIZED (
                SELECT CASE $2
                    WHEN 0 THEN true
                    WHEN 1 THEN coalesce((SELECT version FROM cur) = $3, false)
                    WHEN 2 THEN NOT EXISTS (SELECT 1 FROM cur)
                    ELSE EXISTS (SELECT 1 FROM cur) END AS ok
            ), del AS (
                DELETE FROM {kv} WHERE key = $1 AND (SELECT ok FROM ok) RETURNING version
            )
            SELECT ok, current, revision, deleted {delete_notify} FROM (
                SELECT ok, current, CASE WHEN ok THEN nextval({seq}) END AS revision,
                       (SELECT count(*) FROM del) > 0 AS deleted
                FROM (SELECT (SELECT ok FROM ok) AS ok,
                             (SELECT version FROM cur) AS current OFFSET 0) locked
            ) result"
        );
        // A batch: lock what exists in key order, then write everything.
        let lock =
            format!("SELECT key, version FROM {kv} WHERE key = ANY($1) ORDER BY key FOR UPDATE");
        // $1 keys to delete (all locked), $2 keys to put, $3 their values.
        let apply = format!(
            "WITH rev AS MATERIALIZED (SELECT nextval({seq}) AS r, {NOW_US} AS us),
            del AS (DELETE FROM {kv} WHERE key = ANY($1) RETURNING key),
            ins AS (
                INSERT INTO {kv} (key, value, version, revision, created_at_us, updated_at_us)
                SELECT t.k, t.v, 1, rev.r, rev.us, rev.us
                FROM unnest($2::bytea[], $3::bytea[]) AS t(k, v), rev ORDER BY t.k
                ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value,
                    version = {kv}.version + 1, revision = EXCLUDED.revision,
                    updated_at_us = greatest({kv}.updated_at_us, EXCLUDED.updated_at_us)
                RETURNING key, version, created_at_us, updated_at_us
            )
            SELECT (SELECT r FROM rev), (SELECT us FROM rev), (SELECT count(*) FROM del),
                   key, version, created_at_us, updated_at_us
            FROM (SELECT 1) one LEFT JOIN ins ON true"
        );
        Sql {
            get: format!(
                "SELECT value, version, revision, created_at_us, updated_at_us \
                 FROM {kv} WHERE key = $1"
            ),
            get_many: format!(
                "SELECT key, value, version, revision, created_at_us, updated_at_us \
                 FROM {kv} WHERE key = ANY($1)"
            ),
            put,
            delete,
            lock,
            apply,
            notify: config
                .notify
                .then(|| format!("SELECT pg_notify({channel}, $1)")),
            kv,
        }
    }
}

/// What a notification of a write tells the caches of other servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    /// These keys were written at `revision`; `written_at_us` is the database
    /// clock when the write was made, to measure the notification delay.
    Keys {
        revision: u64,
        written_at_us: i64,
        keys: Vec<Vec<u8>>,
    },
    /// Notifications may have been lost (the listening connection broke):
    /// forget everything and serve nothing from the cache until `Resumed`.
    Lost,
    /// Listening again: forget everything, then serve from the cache again.
    Resumed,
}

/// Parses `revision:written_at_us:hexkey,hexkey,...`.
fn parse_notification(payload: &str) -> Option<Invalidation> {
    let mut parts = payload.splitn(3, ':');
    let revision = parts.next()?.parse().ok()?;
    let written_at_us = parts.next()?.parse().ok()?;
    let keys = parts
        .next()?
        .split(',')
        .map(decode_hex)
        .collect::<Option<Vec<_>>>()?;
    Some(Invalidation::Keys {
        revision,
        written_at_us,
        keys,
    })
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

fn encode_hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Maps a driver error: a full disk is `InsufficientStorage` (507); lost
/// connections, timeouts, cancellations and other shortages are
/// `Unavailable` (503); anything else is a bug (500).
fn map_pg(err: &tokio_postgres::Error) -> StoreError {
    match err.as_db_error() {
        Some(db) => {
            let code = db.code().code();
            let class = code.get(..2).unwrap_or_default();
            if *db.code() == tokio_postgres::error::SqlState::DISK_FULL {
                StoreError::InsufficientStorage(format!(
                    "PostgreSQL: {} ({code}); writes resume once space is freed on the database server",
                    db.message()
                ))
            } else if matches!(class, "08" | "40" | "53" | "57" | "58" | "55") {
                StoreError::Unavailable(format!("PostgreSQL: {} ({code})", db.message()))
            } else {
                StoreError::Internal(format!("PostgreSQL: {} ({code})", db.message()))
            }
        }
        None => StoreError::Unavailable(format!("PostgreSQL: {err}")),
    }
}

fn map_pool(err: PoolError) -> StoreError {
    match err {
        PoolError::Timeout(kind) => StoreError::Unavailable(format!(
            "PostgreSQL did not answer in time ({kind:?} of a connection)"
        )),
        PoolError::Backend(err) => map_pg(&err),
        PoolError::Closed => StoreError::Unavailable("the store is closed".into()),
        other => StoreError::Unavailable(format!("PostgreSQL pool: {other}")),
    }
}

/// Whether the error says the connection is gone (and the statement did not
/// run on it).
fn is_lost_connection(err: &tokio_postgres::Error) -> bool {
    err.is_closed()
        || err.as_db_error().is_some_and(|db| {
            let code = db.code().code();
            code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03")
        })
}

/// Whether the transaction may simply be tried again.
fn is_retryable(err: &tokio_postgres::Error) -> bool {
    err.as_db_error()
        .is_some_and(|db| matches!(db.code().code(), "40001" | "40P01"))
}

fn to_u64(n: i64) -> StoreResult<u64> {
    u64::try_from(n).map_err(|_| StoreError::Internal(format!("negative counter {n}")))
}

fn row_entry(key: Vec<u8>, row: &Row, first: usize) -> StoreResult<Entry> {
    let get = |i: usize| -> StoreResult<i64> {
        row.try_get::<_, i64>(first + i)
            .map_err(|e| StoreError::Internal(format!("reading an entry: {e}")))
    };
    let value: Option<Vec<u8>> = row
        .try_get(first)
        .map_err(|e| StoreError::Internal(format!("reading a value: {e}")))?;
    Ok(Entry {
        key,
        value: value.unwrap_or_default(),
        version: to_u64(get(1)?)?,
        revision: to_u64(get(2)?)?,
        created_at_us: get(3)?,
        updated_at_us: get(4)?,
    })
}

fn column<'a, T: tokio_postgres::types::FromSql<'a>>(row: &'a Row, i: usize) -> StoreResult<T> {
    row.try_get(i)
        .map_err(|e| StoreError::Internal(format!("reading column {i}: {e}")))
}

/// The PostgreSQL backend.
pub struct PostgresStore {
    pool: Pool,
    sql: Sql,
    config: PostgresConfig,
    closed: Arc<AtomicBool>,
    listener: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Set once the schema is known to be in place.
    schema_ready: tokio::sync::OnceCell<()>,
}

impl PostgresStore {
    /// The schema holding kvstore's table and sequence.
    pub fn schema(&self) -> &str {
        &self.config.schema
    }

    /// Connects, and creates or upgrades the schema. Several servers may do
    /// this at once: the work runs under a transaction-level advisory lock.
    /// When PostgreSQL cannot be reached, the store opens anyway (its
    /// operations answer `Unavailable`) and sets the schema up once it can.
    ///
    /// # Errors
    /// When the URL is malformed, or the schema was made by a newer kvstore.
    pub async fn open(config: PostgresConfig) -> StoreResult<Self> {
        let pg_config = config.pg_config()?;
        let manager = Manager::from_config(
            pg_config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(config.pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(config.connect_timeout))
            .create_timeout(Some(config.connect_timeout))
            .recycle_timeout(Some(config.connect_timeout))
            .build()
            .map_err(|e| StoreError::Internal(format!("building the pool: {e}")))?;
        let store = PostgresStore {
            pool,
            sql: Sql::new(&config),
            config,
            closed: Arc::new(AtomicBool::new(false)),
            listener: std::sync::Mutex::new(None),
            schema_ready: tokio::sync::OnceCell::new(),
        };
        match store.ensure_schema().await {
            Ok(()) => {}
            Err(StoreError::Unavailable(why)) => tracing::warn!(
                error = %why,
                "PostgreSQL is unreachable; answering 503 until it is back"
            ),
            Err(err) => return Err(err),
        }
        Ok(store)
    }

    /// Creates or upgrades the schema unless that was done already.
    async fn ensure_schema(&self) -> StoreResult<()> {
        self.schema_ready.get_or_try_init(|| self.migrate()).await?;
        Ok(())
    }

    async fn migrate(&self) -> StoreResult<()> {
        let mut client = self.pool.get().await.map_err(map_pool)?;
        let schema = ident(&self.config.schema);
        let tx = client.transaction().await.map_err(|e| map_pg(&e))?;
        // One lock per schema name: servers starting together take turns, and
        // the second finds everything in place.
        tx.execute(
            "SELECT pg_advisory_xact_lock(7070, hashtext($1))",
            &[&self.config.schema],
        )
        .await
        .map_err(|e| map_pg(&e))?;
        let ddl = format!(
            "CREATE SCHEMA IF NOT EXISTS {schema};
             CREATE TABLE IF NOT EXISTS {schema}.kvstore_schema (version int4 NOT NULL);
             CREATE TABLE IF NOT EXISTS {schema}.kv (
                 key bytea PRIMARY KEY,
                 value bytea NOT NULL,
                 version int8 NOT NULL,
                 revision int8 NOT NULL,
                 created_at_us int8 NOT NULL,
                 updated_at_us int8 NOT NULL
             );
             CREATE SEQUENCE IF NOT EXISTS {schema}.kv_revision AS int8;"
        );
        tx.batch_execute(&ddl).await.map_err(|e| map_pg(&e))?;
        let found: Option<i32> = tx
            .query_opt(
                &format!("SELECT max(version) FROM {schema}.kvstore_schema"),
                &[],
            )
            .await
            .map_err(|e| map_pg(&e))?
            .and_then(|row| row.get(0));
        match found {
            None => {
                tx.execute(
                    &format!("INSERT INTO {schema}.kvstore_schema VALUES ($1)"),
                    &[&SCHEMA_VERSION],
                )
                .await
                .map_err(|e| map_pg(&e))?;
            }
            Some(v) if v > SCHEMA_VERSION => {
                return Err(StoreError::Internal(format!(
                    "schema {} has version {v}, made by a newer kvstore (this one knows {SCHEMA_VERSION})",
                    self.config.schema
                )));
            }
            // Upgrades from older versions go here.
            Some(_) => {}
        }
        tx.commit().await.map_err(|e| map_pg(&e))
    }

    /// Listens for the writes of every server (which must run with `notify`)
    /// and hands them to `on` until the store is closed. When the listening
    /// connection breaks, `on` gets `Lost`, and `Resumed` once it listens again.
    pub fn listen(&self, on: Arc<dyn Fn(Invalidation) + Send + Sync>) -> StoreResult<()> {
        let config = self.config.pg_config()?;
        let channel = self.config.channel();
        let closed = Arc::clone(&self.closed);
        let task = tokio::spawn(async move {
            let mut listening = true;
            while !closed.load(Ordering::Acquire) {
                match listen_once(&config, &channel, &on, &closed).await {
                    Ok(()) => break,
                    Err(err) => {
                        if listening {
                            tracing::warn!(error = %err, "lost the PostgreSQL notification connection; the local cache is bypassed until it is back");
                        }
                        listening = false;
                        on(Invalidation::Lost);
                        metrics::counter!("kvstore_cache_listen_failures_total").increment(1);
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        });
        if let Ok(mut slot) = self.listener.lock() {
            *slot = Some(task);
        }
        Ok(())
    }

    async fn client(&self) -> StoreResult<deadpool_postgres::Object> {
        if self.schema_ready.get().is_none() {
            self.ensure_schema().await?;
        }
        self.pool.get().await.map_err(map_pool)
    }

    /// A connection for a write: refused once the store is closed.
    async fn writer(&self) -> StoreResult<deadpool_postgres::Object> {
        if self.closed.load(Ordering::Acquire) {
            return Err(StoreError::Unavailable("the store is closed".into()));
        }
        self.client().await
    }

    /// Runs a read; when the pooled connection turns out to be dead (the
    /// server restarted, an administrator ended it), tries once more on a
    /// new one.
    async fn read<T, F, Fut>(&self, work: F) -> StoreResult<T>
    where
        F: Fn(deadpool_postgres::Object) -> Fut,
        Fut: Future<Output = Result<T, tokio_postgres::Error>>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let client = self.client().await?;
            match work(client).await {
                Ok(value) => return Ok(value),
                Err(err) if attempt < 2 && is_lost_connection(&err) => continue,
                Err(err) => return Err(map_pg(&err)),
            }
        }
    }

    async fn put_one(
        &self,
        key: &[u8],
        value: &[u8],
        condition: Condition,
    ) -> StoreResult<WriteOutcome> {
        let (kind, expected) = condition_params(condition);
        for _ in 0..MAX_ATTEMPTS {
            let client = self.writer().await?;
            let statement = client
                .prepare_typed_cached(
                    &self.sql.put,
                    &[Type::BYTEA, Type::BYTEA, Type::INT4, Type::INT8],
                )
                .await
                .map_err(|e| map_pg(&e))?;
            let row = match client
                .query_one(&statement, &[&key, &value, &kind, &expected])
                .await
            {
                Ok(row) => row,
                Err(err) if is_retryable(&err) => continue,
                Err(err) => return Err(map_pg(&err)),
            };
            let applied: bool = column(&row, 0)?;
            let version: Option<i64> = column(&row, 1)?;
            if applied {
                let version = to_u64(version.unwrap_or_default())?;
                let revision: i64 = column(&row, 2)?;
                return Ok(WriteOutcome::Applied {
                    revision: to_u64(revision)?,
                    results: vec![OpResult::Put {
                        version,
                        created: version == 1,
                        created_at_us: column(&row, 3)?,
                        updated_at_us: column(&row, 4)?,
                    }],
                });
            }
            // A create-only put found no row but lost the race to insert one:
            // try again, to report the version of the row that won.
            if condition == Condition::Absent && version.is_none() {
                continue;
            }
            return Ok(WriteOutcome::Rejected {
                failed: vec![FailedCondition {
                    index: 0,
                    current_version: version.map(to_u64).transpose()?,
                }],
            });
        }
        Err(StoreError::Unavailable(
            "too much contention on one key; try again".into(),
        ))
    }

    async fn delete_one(&self, key: &[u8], condition: Condition) -> StoreResult<WriteOutcome> {
        let (kind, expected) = condition_params(condition);
        let client = self.writer().await?;
        let statement = client
            .prepare_typed_cached(&self.sql.delete, &[Type::BYTEA, Type::INT4, Type::INT8])
            .await
            .map_err(|e| map_pg(&e))?;
        let row = client
            .query_one(&statement, &[&key, &kind, &expected])
            .await
            .map_err(|e| map_pg(&e))?;
        let ok: bool = column(&row, 0)?;
        let current: Option<i64> = column(&row, 1)?;
        if !ok {
            return Ok(WriteOutcome::Rejected {
                failed: vec![FailedCondition {
                    index: 0,
                    current_version: current.map(to_u64).transpose()?,
                }],
            });
        }
        let revision: i64 = column(&row, 2)?;
        let deleted: bool = column(&row, 3)?;
        Ok(WriteOutcome::Applied {
            revision: to_u64(revision)?,
            results: vec![OpResult::Deleted { existed: deleted }],
        })
    }

    async fn write_batch(&self, ops: &[WriteOp]) -> StoreResult<WriteOutcome> {
        for _ in 0..MAX_ATTEMPTS {
            let mut client = self.writer().await?;
            match self.try_batch(&mut client, ops).await {
                Ok(Some(outcome)) => return Ok(outcome),
                Ok(None) => continue,
                Err(err) if is_retryable(&err) => continue,
                Err(err) => return Err(map_pg(&err)),
            }
        }
        Err(StoreError::Unavailable(
            "too much contention on the batch's keys; try again".into(),
        ))
    }

    /// One attempt at a batch; `None` when a concurrent write created one of
    /// its keys after the locks were taken, and it must be tried again.
    async fn try_batch(
        &self,
        client: &mut deadpool_postgres::Object,
        ops: &[WriteOp],
    ) -> Result<Option<WriteOutcome>, tokio_postgres::Error> {
        let lock = client
            .prepare_typed_cached(&self.sql.lock, &[Type::BYTEA_ARRAY])
            .await?;
        let apply = client
            .prepare_typed_cached(
                &self.sql.apply,
                &[Type::BYTEA_ARRAY, Type::BYTEA_ARRAY, Type::BYTEA_ARRAY],
            )
            .await?;
        let tx = client.transaction().await?;
        let keys: Vec<&[u8]> = ops.iter().map(WriteOp::key).collect();
        let locked = tx.query(&lock, &[&keys]).await?;
        let mut current = std::collections::HashMap::with_capacity(locked.len());
        for row in &locked {
            let key: &[u8] = row.try_get(0)?;
            let version: i64 = row.try_get(1)?;
            current.insert(key, version);
        }
        let failed: Vec<FailedCondition> = ops
            .iter()
            .enumerate()
            .filter_map(|(index, op)| {
                let version = current
                    .get(op.key())
                    .map(|v| u64::try_from(*v).unwrap_or_default());
                (!op.condition().holds(version)).then_some(FailedCondition {
                    index,
                    current_version: version,
                })
            })
            .collect();
        if !failed.is_empty() {
            tx.rollback().await?;
            return Ok(Some(WriteOutcome::Rejected { failed }));
        }
        let deletes: Vec<&[u8]> = ops
            .iter()
            .filter(|op| matches!(op, WriteOp::Delete { .. }) && current.contains_key(op.key()))
            .map(WriteOp::key)
            .collect();
        let (put_keys, put_values): (Vec<&[u8]>, Vec<&[u8]>) = ops
            .iter()
            .filter_map(|op| match op {
                WriteOp::Put { key, value, .. } => Some((key.as_slice(), value.as_slice())),
                WriteOp::Delete { .. } => None,
            })
            .unzip();
        let rows = tx
            .query(&apply, &[&deletes, &put_keys, &put_values])
            .await?;
        let Some(first) = rows.first() else {
            return Ok(None);
        };
        let revision: i64 = first.try_get(0)?;
        let written_at_us: i64 = first.try_get(1)?;
        let mut written = std::collections::HashMap::with_capacity(rows.len());
        for row in &rows {
            let Some(key) = row.try_get::<_, Option<&[u8]>>(3)? else {
                continue;
            };
            let version: i64 = row.try_get(4)?;
            // A key that was absent under the locks but is not new now was
            // created by a concurrent write: its revision may be above ours.
            if version != 1 && !current.contains_key(key) {
                return Ok(None);
            }
            written.insert(
                key.to_vec(),
                OpResult::Put {
                    version: u64::try_from(version).unwrap_or_default(),
                    created: version == 1,
                    created_at_us: row.try_get(5)?,
                    updated_at_us: row.try_get(6)?,
                },
            );
        }
        if let Some(notify) = &self.sql.notify {
            let keys: Vec<&[u8]> = ops
                .iter()
                .map(WriteOp::key)
                .filter(|k| written.contains_key(*k) || deletes.contains(k))
                .collect();
            for payload in notification_payloads(revision, written_at_us, &keys) {
                tx.execute(notify.as_str(), &[&payload]).await?;
            }
        }
        tx.commit().await?;
        let results = ops
            .iter()
            .map(|op| match op {
                // The apply statement returns a row for every put.
                WriteOp::Put { key, .. } => written.remove(key).unwrap_or(OpResult::Put {
                    version: 0,
                    created: false,
                    created_at_us: 0,
                    updated_at_us: 0,
                }),
                WriteOp::Delete { key, .. } => OpResult::Deleted {
                    existed: current.contains_key(key.as_slice()),
                },
            })
            .collect();
        Ok(Some(WriteOutcome::Applied {
            revision: u64::try_from(revision).unwrap_or_default(),
            results,
        }))
    }

    fn scan_sql(&self, request: &ScanRequest) -> String {
        let mut filters = Vec::new();
        let mut n = 3;
        for (bound, above) in [(&request.lower, true), (&request.upper, false)] {
            let op = match (bound, above) {
                (Bound::Included(_), true) => ">=",
                (Bound::Excluded(_), true) => ">",
                (Bound::Included(_), false) => "<=",
                (Bound::Excluded(_), false) => "<",
                (Bound::Unbounded, _) => continue,
            };
            n += 1;
            filters.push(format!("key {op} ${n}"));
        }
        let filter = if filters.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", filters.join(" AND "))
        };
        let order = if request.reverse { "DESC" } else { "ASC" };
        // $1 limit (one more than the page, to know whether more follow),
        // $2 keys only, $3 the page's value bytes. The running sum lets the
        // database leave out the values of rows the page will not return.
        format!(
            "SELECT key, CASE WHEN $2 OR (running > $3 AND n > 1) THEN NULL ELSE value END,
                    version, revision, created_at_us, updated_at_us, running
             FROM (
                SELECT key, value, version, revision, created_at_us, updated_at_us,
                       (sum(octet_length(value)) OVER w)::int8 AS running,
                       row_number() OVER w AS n
                FROM {kv} {filter}
                WINDOW w AS (ORDER BY key {order} ROWS UNBOUNDED PRECEDING)
                ORDER BY key {order}
                LIMIT $1
             ) page ORDER BY key {order}",
            kv = self.sql.kv
        )
    }
}

/// Splits the keys of a write into notification payloads under PostgreSQL's
/// size limit.
fn notification_payloads(revision: i64, written_at_us: i64, keys: &[&[u8]]) -> Vec<String> {
    let head = format!("{revision}:{written_at_us}:");
    let mut payloads = Vec::new();
    let mut current = head.clone();
    for key in keys {
        let hex = encode_hex(key);
        if current.len() > head.len() && current.len() + 1 + hex.len() > MAX_NOTIFY_PAYLOAD {
            payloads.push(std::mem::replace(&mut current, head.clone()));
        }
        if current.len() > head.len() {
            current.push(',');
        }
        current.push_str(&hex);
    }
    if current.len() > head.len() {
        payloads.push(current);
    }
    payloads
}

/// Listens until the connection breaks (an error) or the store closes (`Ok`).
async fn listen_once(
    config: &tokio_postgres::Config,
    channel: &str,
    on: &Arc<dyn Fn(Invalidation) + Send + Sync>,
    closed: &AtomicBool,
) -> Result<(), String> {
    let (client, mut connection) = config.connect(NoTls).await.map_err(|e| e.to_string())?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    if tx.send(n.payload().to_owned()).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(err) => {
                    tracing::debug!(error = %err, "notification connection ended");
                    break;
                }
            }
        }
    });
    let result = async {
        client
            .batch_execute(&format!("LISTEN {}", ident(channel)))
            .await
            .map_err(|e| e.to_string())?;
        // Anything written before LISTEN took effect may have been missed.
        on(Invalidation::Resumed);
        tracing::info!(channel, "listening for the writes of other servers");
        let mut ping = tokio::time::interval(Duration::from_secs(2));
        loop {
            tokio::select! {
                payload = rx.recv() => match payload {
                    Some(payload) => match parse_notification(&payload) {
                        Some(invalidation) => on(invalidation),
                        None => {
                            tracing::warn!(payload, "unreadable notification; clearing the cache");
                            on(Invalidation::Lost);
                            on(Invalidation::Resumed);
                        }
                    },
                    None => return Err("the notification connection closed".to_owned()),
                },
                _ = ping.tick() => {
                    if closed.load(Ordering::Acquire) {
                        return Ok(());
                    }
                    // A dead connection that the kernel has not noticed yet
                    // shows up here within a few seconds.
                    match tokio::time::timeout(Duration::from_secs(2), client.simple_query("SELECT 1")).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(err)) => return Err(err.to_string()),
                        Err(_) => return Err("the notification connection does not answer".to_owned()),
                    }
                }
            }
        }
    }
    .await;
    driver.abort();
    result
}

#[async_trait]
impl Store for PostgresStore {
    async fn get(&self, key: &[u8]) -> StoreResult<Option<Entry>> {
        let sql = &self.sql.get;
        let row = self
            .read(|client| async move {
                let statement = client.prepare_typed_cached(sql, &[Type::BYTEA]).await?;
                client.query_opt(&statement, &[&key]).await
            })
            .await?;
        row.map(|row| row_entry(key.to_vec(), &row, 0)).transpose()
    }

    async fn get_many(&self, keys: Vec<Vec<u8>>) -> StoreResult<Vec<Option<Entry>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let sql = &self.sql.get_many;
        let keys_ref = &keys;
        let rows = self
            .read(|client| async move {
                let statement = client
                    .prepare_typed_cached(sql, &[Type::BYTEA_ARRAY])
                    .await?;
                client.query(&statement, &[keys_ref]).await
            })
            .await?;
        let mut found = std::collections::HashMap::with_capacity(rows.len());
        for row in &rows {
            let key: Vec<u8> = column(row, 0)?;
            let entry = row_entry(key.clone(), row, 1)?;
            found.insert(key, entry);
        }
        Ok(keys.iter().map(|k| found.get(k).cloned()).collect())
    }

    async fn write(&self, ops: Vec<WriteOp>) -> StoreResult<WriteOutcome> {
        match ops.as_slice() {
            [] => Err(StoreError::Internal("a write without ops".into())),
            [
                WriteOp::Put {
                    key,
                    value,
                    condition,
                },
            ] => self.put_one(key, value, *condition).await,
            [WriteOp::Delete { key, condition }] => self.delete_one(key, *condition).await,
            _ => self.write_batch(&ops).await,
        }
    }

    async fn scan(&self, request: ScanRequest) -> StoreResult<ScanPage> {
        let sql = self.scan_sql(&request);
        let limit = i64::try_from(request.limit.saturating_add(1)).unwrap_or(i64::MAX);
        let max_bytes = i64::try_from(request.max_value_bytes).unwrap_or(i64::MAX);
        let keys_only = request.keys_only;
        let mut bounds: Vec<&[u8]> = Vec::new();
        for bound in [&request.lower, &request.upper] {
            if let Bound::Included(k) | Bound::Excluded(k) = bound {
                bounds.push(k);
            }
        }
        let (sql, bounds) = (&sql, &bounds);
        let rows = self
            .read(|client| async move {
                let types = [Type::INT8, Type::BOOL, Type::INT8, Type::BYTEA, Type::BYTEA];
                let statement = client
                    .prepare_typed_cached(sql, &types[..3 + bounds.len()])
                    .await?;
                let mut params: Vec<&(dyn ToSql + Sync)> = vec![&limit, &keys_only, &max_bytes];
                for bound in bounds {
                    params.push(bound);
                }
                client.query(&statement, &params).await
            })
            .await?;
        let mut entries = Vec::with_capacity(rows.len().min(request.limit));
        for row in &rows {
            if entries.len() == request.limit {
                return Ok(ScanPage {
                    entries,
                    more: true,
                });
            }
            let running: i64 = column(row, 6)?;
            if !entries.is_empty()
                && !request.keys_only
                && usize::try_from(running).unwrap_or(usize::MAX) > request.max_value_bytes
            {
                return Ok(ScanPage {
                    entries,
                    more: true,
                });
            }
            let key: Vec<u8> = column(row, 0)?;
            entries.push(row_entry(key, row, 1)?);
        }
        Ok(ScanPage {
            entries,
            more: false,
        })
    }

    async fn ready(&self) -> StoreResult<()> {
        let client = self.writer().await?;
        client
            .simple_query("SELECT 1")
            .await
            .map(|_| ())
            .map_err(|e| map_pg(&e))
    }

    /// Refuses writes from now on (each write was committed when it was
    /// answered, so nothing is left to flush); reads go on, as on the
    /// embedded engine, until the store is dropped.
    async fn close(&self) -> StoreResult<()> {
        self.closed.store(true, Ordering::Release);
        let task = self.listener.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            task.abort();
        }
        Ok(())
    }

    fn report_metrics(&self) {
        let status = self.pool.status();
        metrics::gauge!("kvstore_postgres_pool_connections").set(status.size as f64);
        metrics::gauge!("kvstore_postgres_pool_available").set(status.available as f64);
        metrics::gauge!("kvstore_postgres_pool_waiting").set(status.waiting as f64);
    }

    fn describe(&self) -> String {
        format!(
            "postgres ({}, schema {}, pool {})",
            redact(&self.config.url),
            self.config.schema,
            self.config.pool_size
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_round_trip_and_stay_under_the_limit() {
        let long = vec![0xabu8; 1024];
        let keys: Vec<&[u8]> = vec![b"a", &long, &long, &long, &long, b"\x00\xff"];
        let payloads = notification_payloads(42, 7, &keys);
        assert!(payloads.len() > 1);
        let mut seen = Vec::new();
        for payload in &payloads {
            assert!(payload.len() <= MAX_NOTIFY_PAYLOAD);
            match parse_notification(payload) {
                Some(Invalidation::Keys {
                    revision,
                    written_at_us,
                    keys,
                }) => {
                    assert_eq!((revision, written_at_us), (42, 7));
                    seen.extend(keys);
                }
                other => panic!("{other:?}"),
            }
        }
        let want: Vec<Vec<u8>> = keys.iter().map(|k| k.to_vec()).collect();
        assert_eq!(seen, want);
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact("postgres://kv:secret@db:5432/kv"),
            "postgres://kv:***@db:5432/kv"
        );
        assert_eq!(
            redact("postgres://postgres@127.0.0.1/test"),
            "postgres://postgres@127.0.0.1/test"
        );
    }
}
