//! The PostgreSQL backend: many stateless servers on one database.
//!
//! One table holds the entries (`key bytea PRIMARY KEY`, so keys compare as
//! bytes), and one sequence hands out revisions. Every write sets the version
//! and the revision in the statement that writes the row, and takes its
//! revision only once it holds the row's lock, so that per key the revision
//! goes up with the version, whichever server wrote:
//!
//! - A single put or delete is one autocommitted statement, a call of the
//!   schema's put or delete function: it locks the row (`SELECT .. FOR
//!   UPDATE`), checks the condition against the locked version, then
//!   updates the row (`revision = nextval(..)`, evaluated after the lock) or
//!   inserts it (`INSERT .. ON CONFLICT (key) DO UPDATE .. RETURNING`, so two
//!   first writes of a key cannot both create it), or deletes it. A failed
//!   condition reports the locked version and takes no revision.
//! - A RESP pipeline's single writes are made in one transaction, each with
//!   its own statement, all sent together (see `write_together`).
//! - A batch is one transaction: it locks the rows that exist in key order
//!   (reading their metadata and the database clock), lets
//!   [`rules::decide`] check every condition and decide each key's new
//!   metadata, takes one revision, and writes everything in one statement. A key that a concurrent write created after the lock was
//!   taken is noticed (the statement leaves it alone) and the transaction is
//!   rolled back and tried again, so conditions and revisions stay exact.
//! - Batch reads and each range page are one statement, so one snapshot.
//! - Every write also logs its changes, for watchers (see `watch.rs`).
//! - Keys may expire, by their own deadline or their lease's, judged by the
//!   database clock: reads leave expired keys out at once, and an expirer on
//!   every server deletes them as writes (see `expiry.rs`).
//!
//! Across keys, PostgreSQL commits concurrent writes in any order, so a reader
//! may see revision 11 before revision 10 is visible; a write that starts after
//! another was acknowledged always gets a higher revision. See
//! docs/postgres.md for the precise guarantees.

mod config;
mod connect;
mod errors;
mod expiry;
mod notify;
mod replicas;
mod rows;
mod run;
mod schema;
mod sql;
mod watch;

pub use config::{Pooler, PostgresConfig};
pub(crate) use errors::RETRIES;
pub(crate) use notify::Invalidation;

use config::redact;
use connect::{Connector, PoolConnect};
use errors::{is_lost_connection, is_retryable, map_pg, map_pool};
use expiry::{Stale, run_expirer};
use notify::{Hearing, invalidations, keep_listening, notification_payloads};
use replicas::Replicas;
use rows::{column, first_row, row_entry, to_u64};
use run::{Param, Runner};
use schema::migrate;
use sql::{
    ENTRY_COLUMNS, EXPIRED, LEASE_ENDED, Sql, condition_params, expiry_params, lease_id,
    lease_param,
};
use watch::{Poller, run_trimmer, settled_at_open};

use std::ops::Bound;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::task::JoinHandle;
use tokio_postgres::Row;
use tokio_postgres::types::Type;

use super::rules::{self, Effect, KeyMeta};
use super::{
    Change, Condition, DeleteReason, Entry, Expiry, FailedCondition, Feed, Found, Lease, LeaseId,
    OpResult, ReplicaReads, Revoked, ScanPage, ScanRequest, Store, WriteOp, WriteOutcome,
    write_each,
};
use crate::error::{StoreError, StoreResult};

/// The schema version this build creates and understands.
const SCHEMA_VERSION: i32 = 5;
/// How often a batch is tried again after a concurrent write created one of
/// its keys, or after a deadlock or serialization failure.
const MAX_ATTEMPTS: usize = 10;
/// How often a read is made when a revision below the highest one it shows
/// had not settled in its snapshot (a write still committing, or a hole not
/// filled yet), before it answers a revision below what it shows (pauses of
/// 1 and 4 ms: enough for a commit under light load, and bounded under heavy
/// load, where some write is always committing).
const READ_ATTEMPTS: u32 = 3;

/// How long a pipeline's writes made together wait for a row lock: they
/// take their rows in the pipeline's order, not in key order as a batch
/// does, so two pipelines can deadlock, and PostgreSQL would take a second
/// to tell. Past this wait they are made one at a time instead.
const TOGETHER_LOCK_TIMEOUT: &str = "SELECT set_config('lock_timeout', '50ms', true)";

/// How one attempt at a batch ended.
enum Attempt {
    Done(WriteOutcome),
    /// A concurrent write created one of its keys after the locks were
    /// taken: it must be made again.
    Again,
    /// Some of its keys had expired and were not deleted yet: they are
    /// deleted as expired (these keys one by one, those of these leases
    /// lease by lease), and the batch made again.
    Expired {
        keys: Vec<Vec<u8>>,
        leases: Vec<i64>,
    },
    /// It attaches keys to a lease that does not exist or has expired.
    NoLease(LeaseId),
}

/// A batch's puts as the `apply` statement takes them, a column each: the
/// key, the value, and the metadata the rules decided.
#[derive(Default)]
struct PutColumns<'a> {
    keys: Vec<&'a [u8]>,
    values: Vec<&'a [u8]>,
    versions: Vec<i64>,
    created: Vec<i64>,
    updated: Vec<i64>,
    deadlines: Vec<Option<i64>>,
    leases: Vec<Option<i64>>,
}

impl<'a> PutColumns<'a> {
    fn push(&mut self, key: &'a [u8], value: &'a [u8], meta: &KeyMeta) {
        self.keys.push(key);
        self.values.push(value);
        self.versions
            .push(i64::try_from(meta.version).unwrap_or(i64::MAX));
        self.created.push(meta.created_at_us);
        self.updated.push(meta.updated_at_us);
        self.deadlines.push(meta.expires_at_us);
        self.leases.push(meta.lease.map(lease_param));
    }
}

/// The PostgreSQL backend.
pub struct PostgresStore {
    shared: Arc<Shared>,
    listener: std::sync::Mutex<Option<JoinHandle<()>>>,
    /// The read replicas, when any are configured.
    replicas: Option<Arc<Replicas>>,
    /// The watermark poller, the history trimmer, the feed's listener and
    /// the expirer, and the replicas' probes.
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

/// What the store's requests and its background tasks share.
struct Shared {
    pool: Pool,
    /// Opens the listeners' connections: the pool's connector (so that the
    /// listener's pings find a hung host for the pool too), or, behind a
    /// transaction pooler, one of their own for the direct listen URL.
    listener: Arc<Connector>,
    sql: Sql,
    run: Runner,
    config: PostgresConfig,
    closed: Arc<AtomicBool>,
    /// Set once the schema is known to be in place.
    schema_ready: tokio::sync::OnceCell<()>,
    /// Fed by the poller.
    feed: Arc<Feed>,
    /// Wakes the poller once this server's write committed, so that its
    /// watchers see it without waiting for the next poll.
    kick: tokio::sync::Notify,
}

impl PostgresStore {
    /// The schema holding kvstore's table and sequence.
    pub(crate) fn schema(&self) -> &str {
        &self.shared.config.schema
    }

    /// Connects, and creates or upgrades the schema. Several servers may do
    /// this at once: the work runs under a transaction-level advisory lock.
    /// When PostgreSQL cannot be reached, the store opens anyway (its
    /// operations answer `Unavailable`) and sets the schema up once it can.
    ///
    /// # Errors
    /// When the URL is malformed, or the schema was made by a newer kvstore.
    pub async fn open(config: PostgresConfig) -> StoreResult<Self> {
        if config.pooler == Pooler::Transaction && config.listen_url.is_none() {
            return Err(StoreError::Unavailable(
                "behind a pooler in transaction mode, LISTEN needs a direct connection: \
                 set the listen URL"
                    .into(),
            ));
        }
        let pg_config = config.pg_config()?;
        let connector = Arc::new(Connector::new(&pg_config, config.connect_timeout)?);
        let listener = match &config.listen_url {
            Some(_) => Arc::new(Connector::new(
                &config.listen_config()?,
                config.connect_timeout,
            )?),
            None => Arc::clone(&connector),
        };
        let pool = build_pool(pg_config, &connector, &config)?;
        let sql = Sql::new(&config);
        let run = Runner::new(&config);
        // The feed starts at the watermark; when it cannot be read, the
        // poller restarts the feed there once PostgreSQL answers (until
        // then, watchers wait).
        let settled = match async {
            migrate(&pool, &config).await?;
            settled_at_open(&pool, &sql, &run).await
        }
        .await
        {
            Ok(settled) => Some(settled),
            Err(StoreError::Unavailable(why)) => {
                tracing::warn!(
                    error = %why,
                    "PostgreSQL is unreachable; answering 503 until it is back"
                );
                None
            }
            Err(err) => return Err(err),
        };
        let shared = Shared {
            pool,
            listener,
            sql,
            run,
            config,
            closed: Arc::new(AtomicBool::new(false)),
            schema_ready: tokio::sync::OnceCell::new_with(settled.map(|_| ())),
            feed: Feed::start(settled.unwrap_or_default())
                .map_err(|e| StoreError::Internal(e.to_string()))?,
            kick: tokio::sync::Notify::new(),
        };
        let shared = Arc::new(shared);
        let replicas = Replicas::open(&shared)?;
        // A watermark advanced by another server wakes the poller at once;
        // without the connection, it still polls.
        let (listening, heard) = (Arc::clone(&shared), Arc::clone(&shared));
        let feed_wakeups = Hearing {
            listening: Box::new(move || listening.kick.notify_one()),
            heard: Box::new(move |_| heard.kick.notify_one()),
            lost: Box::new(
                |err| tracing::debug!(error = %err, "the feed's notification connection broke"),
            ),
        };
        let mut tasks = vec![
            tokio::spawn(Poller::new(Arc::clone(&shared), settled).run()),
            tokio::spawn(run_trimmer(Arc::clone(&shared))),
            tokio::spawn(run_expirer(Arc::clone(&shared))),
            tokio::spawn(keep_listening(
                Arc::clone(&shared.listener),
                shared.config.feed_channel(),
                Arc::clone(&shared.closed),
                feed_wakeups,
            )),
        ];
        tasks.extend(replicas.iter().flat_map(|r| r.spawn_probes()));
        Ok(PostgresStore {
            shared,
            replicas,
            listener: std::sync::Mutex::new(None),
            tasks: std::sync::Mutex::new(tasks),
        })
    }

    /// Listens for the writes of every server (which must run with `notify`)
    /// and hands them to `on` until the store is closed. When the listening
    /// connection breaks, `on` gets `Lost`, and `Resumed` once it listens again.
    pub(crate) fn listen(&self, on: Arc<dyn Fn(Invalidation) + Send + Sync>) -> StoreResult<()> {
        let task = tokio::spawn(keep_listening(
            Arc::clone(&self.shared.listener),
            self.shared.config.channel(),
            Arc::clone(&self.shared.closed),
            invalidations(on),
        ));
        if let Ok(mut slot) = self.listener.lock() {
            *slot = Some(task);
        }
        Ok(())
    }

    /// Stops the background tasks and the feed.
    fn stop_tasks(&self) {
        let tasks = self
            .tasks
            .lock()
            .map(|mut tasks| std::mem::take(&mut *tasks))
            .unwrap_or_default();
        for task in tasks {
            task.abort();
        }
        self.shared.feed.close();
    }
}

/// A pool of connections opened by `connector`, bounded as `config` says.
fn build_pool(
    pg_config: tokio_postgres::Config,
    connector: &Arc<Connector>,
    config: &PostgresConfig,
) -> StoreResult<Pool> {
    let manager = Manager::from_connect(
        pg_config,
        PoolConnect(Arc::clone(connector)),
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(config.pool_size.max(1))
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(config.connect_timeout))
        // The connector bounds each host's attempt.
        .create_timeout(None)
        .recycle_timeout(Some(config.connect_timeout))
        .build()
        .map_err(|e| StoreError::Internal(format!("building the pool: {e}")))
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        self.stop_tasks();
    }
}

impl Shared {
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

    /// Runs a read on the primary; see [`Shared::read_on`].
    async fn read<T, F, Fut>(&self, work: F) -> StoreResult<T>
    where
        F: Fn(deadpool_postgres::Object) -> Fut,
        Fut: Future<Output = Result<T, tokio_postgres::Error>>,
    {
        Self::read_on(self, work).await
    }

    /// Runs a read on a connection of `from`; when the pooled connection
    /// turns out to be dead (the server restarted, an administrator ended
    /// it), tries once more on a new one.
    async fn read_on<C, T, F, Fut>(from: &C, work: F) -> StoreResult<T>
    where
        C: Connections,
        F: Fn(deadpool_postgres::Object) -> Fut,
        Fut: Future<Output = Result<T, tokio_postgres::Error>>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let client = from.connection().await?;
            match work(client).await {
                Ok(value) => return Ok(value),
                Err(err) if attempt < 2 && is_lost_connection(&err) => continue,
                Err(err) => return Err(map_pg(&err)),
            }
        }
    }

    /// Runs a read made by [`Sql::at_revision`] and gives its rows (without
    /// the placeholder of an empty read) and the revision it was read at:
    /// the revision up to which every write is visible to it, which is also
    /// at least every revision it shows unless a lower one was still
    /// committing after a few tries.
    async fn read_at<C, F, Fut>(from: &C, work: F) -> StoreResult<(Vec<Row>, u64)>
    where
        C: Connections,
        F: Fn(deadpool_postgres::Object) -> Fut,
        Fut: Future<Output = Result<Vec<Row>, tokio_postgres::Error>>,
    {
        let mut pause = Duration::from_millis(1);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut rows = Self::read_on(from, &work).await?;
            let first = rows
                .first()
                .ok_or_else(|| StoreError::Internal("the watermark row is missing".into()))?;
            let number = |i: usize| to_u64(column(first, first.len().saturating_sub(2) + i)?);
            let (shown, settled) = (number(0)?, number(1)?);
            if settled >= shown || attempt == READ_ATTEMPTS {
                rows.retain(|row| matches!(row.try_get::<_, Option<&[u8]>>(0), Ok(Some(_))));
                return Ok((rows, settled));
            }
            // A write below the highest revision shown is still committing.
            tokio::time::sleep(pause).await;
            pause *= 4;
        }
    }
}

/// A single put's parameters, as the put function takes them.
struct PutArgs<'a> {
    key: &'a [u8],
    value: &'a [u8],
    condition: Condition,
    expiry: Expiry,
    condition_params: (i32, i64),
    expiry_params: (i32, i64),
}

impl<'a> PutArgs<'a> {
    fn new(key: &'a [u8], value: &'a [u8], condition: Condition, expiry: Expiry) -> Self {
        PutArgs {
            key,
            value,
            condition,
            expiry,
            condition_params: condition_params(condition),
            expiry_params: expiry_params(expiry),
        }
    }

    fn params(&self) -> [Param<'_>; 6] {
        [
            (&self.key, Type::BYTEA),
            (&self.value, Type::BYTEA),
            (&self.condition_params.0, Type::INT4),
            (&self.condition_params.1, Type::INT8),
            (&self.expiry_params.0, Type::INT4),
            (&self.expiry_params.1, Type::INT8),
        ]
    }

    /// What the put function's row says.
    fn outcome(&self, row: &Row) -> StoreResult<Single> {
        let applied: bool = column(row, 0)?;
        let version: Option<i64> = column(row, 1)?;
        let lease: Option<i64> = column(row, 6)?;
        if applied {
            let version = to_u64(version.unwrap_or_default())?;
            let revision: i64 = column(row, 2)?;
            return Ok(Single::Done(Ok(WriteOutcome::Applied {
                revision: to_u64(revision)?,
                results: vec![OpResult::Put {
                    version,
                    created: version == 1,
                    created_at_us: column(row, 3)?,
                    updated_at_us: column(row, 4)?,
                    expires_at_us: column(row, 5)?,
                    lease: lease.map(lease_id),
                }],
            })));
        }
        if let Some(stale) = Stale::of(column(row, 7)?, lease) {
            return Ok(Single::Stale(stale));
        }
        if let (false, Expiry::Lease(id)) = (column(row, 8)?, self.expiry) {
            return Ok(Single::Done(Err(StoreError::LeaseNotFound(id))));
        }
        // A create-only put found no row but lost the race to insert one:
        // made again, to report the version of the row that won.
        if self.condition == Condition::Absent && version.is_none() {
            return Ok(Single::Again);
        }
        Ok(Single::Done(Ok(rejected(version)?)))
    }
}

/// A single delete's parameters, as its statement takes them.
struct DeleteArgs<'a> {
    key: &'a [u8],
    condition_params: (i32, i64),
}

impl<'a> DeleteArgs<'a> {
    fn new(key: &'a [u8], condition: Condition) -> Self {
        DeleteArgs {
            key,
            condition_params: condition_params(condition),
        }
    }

    fn params(&self) -> [Param<'_>; 3] {
        [
            (&self.key, Type::BYTEA),
            (&self.condition_params.0, Type::INT4),
            (&self.condition_params.1, Type::INT8),
        ]
    }

    /// What the delete statement's row says.
    fn outcome(row: &Row) -> StoreResult<Single> {
        let ok: bool = column(row, 0)?;
        if !ok {
            if let Some(stale) = Stale::of(column(row, 4)?, column(row, 5)?) {
                return Ok(Single::Stale(stale));
            }
            return Ok(Single::Done(Ok(rejected(column(row, 1)?)?)));
        }
        let revision: i64 = column(row, 2)?;
        Ok(Single::Done(Ok(WriteOutcome::Applied {
            revision: to_u64(revision)?,
            results: vec![OpResult::Deleted {
                existed: column(row, 3)?,
            }],
        })))
    }
}

/// How the row of a single put or delete ends it.
enum Single {
    Done(StoreResult<WriteOutcome>),
    /// Something expired stood in its way: it is deleted as expired, and
    /// the write made again.
    Stale(Stale),
    /// It is to be made again.
    Again,
}

/// A single write's failed condition, with the key's current version.
fn rejected(current: Option<i64>) -> StoreResult<WriteOutcome> {
    Ok(WriteOutcome::Rejected {
        failed: vec![FailedCondition {
            index: 0,
            current_version: current.map(to_u64).transpose()?,
        }],
    })
}

/// A write of one put or one delete: one statement.
enum SingleWrite<'a> {
    Put(PutArgs<'a>),
    Delete(DeleteArgs<'a>),
}

impl<'a> SingleWrite<'a> {
    fn of(ops: &'a [WriteOp]) -> Option<Self> {
        match ops {
            [
                WriteOp::Put {
                    key,
                    value,
                    condition,
                    expiry,
                },
            ] => Some(SingleWrite::Put(PutArgs::new(
                key, value, *condition, *expiry,
            ))),
            [WriteOp::Delete { key, condition }] => {
                Some(SingleWrite::Delete(DeleteArgs::new(key, *condition)))
            }
            _ => None,
        }
    }

    fn key(&self) -> &[u8] {
        match self {
            SingleWrite::Put(args) => args.key,
            SingleWrite::Delete(args) => args.key,
        }
    }

    fn statement<'s>(&self, sql: &'s Sql) -> &'s str {
        match self {
            SingleWrite::Put(_) => &sql.put,
            SingleWrite::Delete(_) => &sql.delete,
        }
    }

    fn params(&self) -> Vec<Param<'_>> {
        match self {
            SingleWrite::Put(args) => args.params().to_vec(),
            SingleWrite::Delete(args) => args.params().to_vec(),
        }
    }

    fn outcome(&self, row: &Row) -> StoreResult<Single> {
        match self {
            SingleWrite::Put(args) => args.outcome(row),
            SingleWrite::Delete(_) => DeleteArgs::outcome(row),
        }
    }
}

impl PostgresStore {
    /// Runs a single write's statement until its row says it is done.
    async fn write_single(&self, write: &SingleWrite<'_>) -> StoreResult<WriteOutcome> {
        let (sql, params) = (write.statement(&self.shared.sql), write.params());
        for _ in 0..MAX_ATTEMPTS {
            let client = self.shared.writer().await?;
            let rows = match self.shared.run.query(&client, sql, &params).await {
                Ok(rows) => rows,
                Err(err) if is_retryable(&err) => continue,
                Err(err) => return Err(map_pg(&err)),
            };
            drop(client);
            match write.outcome(&first_row(rows)?)? {
                Single::Done(outcome) => return outcome,
                Single::Stale(stale) => self.shared.clear_stale(write.key(), stale).await?,
                Single::Again => {}
            }
        }
        Err(StoreError::Unavailable(
            "too much contention on one key; try again".into(),
        ))
    }

    /// A pipeline's single writes in one transaction, their statements sent
    /// together: one round trip and one commit for all of them, each still
    /// under a revision of its own, in order. `None`, with nothing written,
    /// when one of them is not a single write, needs more than its
    /// statement (something expired in its way, a lost race), or failed
    /// before the commit: the caller then makes them one at a time. The
    /// revisions its writes took are settled as gaps at once, as a batch's are.
    async fn write_together(
        &self,
        writes: &[Vec<WriteOp>],
    ) -> Option<Vec<StoreResult<WriteOutcome>>> {
        let singles: Vec<SingleWrite> = writes
            .iter()
            .map(|ops| SingleWrite::of(ops))
            .collect::<Option<_>>()?;
        let (run, sql) = (&self.shared.run, &self.shared.sql);
        let mut client = self.shared.writer().await.ok()?;
        let tx = run.begin(&mut client).await.ok()?;
        let params: Vec<Vec<Param>> = singles.iter().map(SingleWrite::params).collect();
        let statements: Vec<(&str, &[Param])> = std::iter::once((TOGETHER_LOCK_TIMEOUT, &[][..]))
            .chain(
                singles
                    .iter()
                    .zip(&params)
                    .map(|(write, params)| (write.statement(sql), params.as_slice())),
            )
            .collect();
        let results = run.query_all_in(&tx, &statements).await;
        let mut outcomes = Vec::with_capacity(singles.len());
        let mut complete = results
            .as_ref()
            .is_ok_and(|all| all.first().is_some_and(Result::is_ok));
        for (write, rows) in singles
            .iter()
            .zip(results.unwrap_or_default().into_iter().skip(1))
        {
            match rows.map_err(|e| map_pg(&e)).and_then(first_row) {
                Ok(row) => match write.outcome(&row) {
                    Ok(Single::Done(outcome)) => outcomes.push(outcome),
                    Ok(_) | Err(_) => complete = false,
                },
                Err(_) => complete = false,
            }
        }
        if complete {
            // Not made again if the commit fails: it may have committed.
            return Some(match tx.commit().await {
                Ok(()) => outcomes,
                Err(err) => writes.iter().map(|_| Err(map_pg(&err))).collect(),
            });
        }
        let _ = tx.rollback().await;
        metrics::counter!(RETRIES, "cause" => "pipeline").increment(1);
        let taken: Vec<i64> = outcomes
            .iter()
            .filter_map(|outcome| match outcome {
                Ok(WriteOutcome::Applied { revision, .. }) => i64::try_from(*revision).ok(),
                _ => None,
            })
            .collect();
        if !taken.is_empty() {
            let _ = run
                .query(&client, &sql.fill, &[(&taken, Type::INT8_ARRAY)])
                .await;
        }
        None
    }

    async fn write_batch(&self, ops: &[WriteOp]) -> StoreResult<WriteOutcome> {
        for _ in 0..MAX_ATTEMPTS {
            let mut client = self.shared.writer().await?;
            let attempt = self.try_batch(&mut client, ops).await;
            drop(client);
            match attempt {
                Ok(Attempt::Done(outcome)) => return Ok(outcome),
                Ok(Attempt::Again) => continue,
                Ok(Attempt::Expired { keys, leases }) => {
                    let keys: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
                    self.shared.clear_expired(&keys, &leases).await?;
                }
                Ok(Attempt::NoLease(id)) => return Err(StoreError::LeaseNotFound(id)),
                Err(err) if is_retryable(&err) => continue,
                Err(err) => return Err(map_pg(&err)),
            }
        }
        Err(StoreError::Unavailable(
            "too much contention on the batch's keys; try again".into(),
        ))
    }

    /// One attempt at a batch.
    async fn try_batch(
        &self,
        client: &mut deadpool_postgres::Object,
        ops: &[WriteOp],
    ) -> Result<Attempt, tokio_postgres::Error> {
        let (run, sql) = (&self.shared.run, &self.shared.sql);
        let tx = run.begin(client).await?;
        let keys: Vec<&[u8]> = ops.iter().map(WriteOp::key).collect();
        let locked = run
            .query_in(&tx, &sql.lock, &[(&keys, Type::BYTEA_ARRAY)])
            .await?;
        // The live rows' metadata, and the database clock once every row is
        // locked: what the rules decide from.
        let mut current = std::collections::HashMap::with_capacity(locked.len());
        let (mut expired, mut ended) = (Vec::new(), Vec::new());
        let mut now_us: Option<i64> = None;
        for row in &locked {
            now_us = now_us.max(Some(row.try_get(0)?));
            let Some(key) = row.try_get::<_, Option<&[u8]>>(1)? else {
                continue;
            };
            let lease: Option<i64> = row.try_get(4)?;
            match (row.try_get::<_, i32>(5)?, lease) {
                (EXPIRED, _) => expired.push(key.to_vec()),
                (LEASE_ENDED, Some(lease)) => ended.push(lease),
                _ => {
                    current.insert(
                        key,
                        KeyMeta {
                            version: u64::try_from(row.try_get::<_, i64>(2)?).unwrap_or_default(),
                            created_at_us: row.try_get(6)?,
                            updated_at_us: row.try_get(7)?,
                            expires_at_us: row.try_get(3)?,
                            lease: lease.map(lease_id),
                        },
                    );
                }
            }
        }
        if !expired.is_empty() || !ended.is_empty() {
            tx.rollback().await?;
            ended.sort_unstable();
            ended.dedup();
            return Ok(Attempt::Expired {
                keys: expired,
                leases: ended,
            });
        }
        // The statement gives a row even when no key exists.
        let Some(now_us) = now_us else {
            tx.rollback().await?;
            return Ok(Attempt::Again);
        };
        // The leases the batch attaches keys to, held until it commits.
        let mut wanted: Vec<LeaseId> = ops
            .iter()
            .filter_map(|op| match op {
                WriteOp::Put {
                    expiry: Expiry::Lease(id),
                    ..
                } => Some(*id),
                _ => None,
            })
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        if !wanted.is_empty() {
            let params: Vec<i64> = wanted.iter().copied().map(lease_param).collect();
            let held: std::collections::HashSet<i64> = run
                .query_in(&tx, &sql.hold_leases, &[(&params, Type::INT8_ARRAY)])
                .await?
                .iter()
                .map(|row| row.try_get(0))
                .collect::<Result<_, _>>()?;
            if let Some(missing) = wanted.iter().find(|id| !held.contains(&lease_param(**id))) {
                tx.rollback().await?;
                return Ok(Attempt::NoLease(*missing));
            }
        }
        let live: Vec<Option<KeyMeta>> = keys.iter().map(|k| current.get(k).copied()).collect();
        let effects = match rules::decide(ops, &live, now_us) {
            Ok(effects) => effects,
            Err(failed) => {
                tx.rollback().await?;
                return Ok(Attempt::Done(WriteOutcome::Rejected { failed }));
            }
        };
        let deletes: Vec<&[u8]> = ops
            .iter()
            .zip(&effects)
            .filter(|(_, effect)| matches!(effect, Effect::Delete { removed: Some(_) }))
            .map(|(op, _)| op.key())
            .collect();
        let mut puts = PutColumns::default();
        for (op, effect) in ops.iter().zip(&effects) {
            if let (WriteOp::Put { key, value, .. }, Effect::Put { meta, .. }) = (op, effect) {
                puts.push(key, value, meta);
            }
        }
        let rows = run
            .query_in(
                &tx,
                &sql.apply,
                &[
                    (&deletes, Type::BYTEA_ARRAY),
                    (&puts.keys, Type::BYTEA_ARRAY),
                    (&puts.values, Type::BYTEA_ARRAY),
                    (&puts.versions, Type::INT8_ARRAY),
                    (&puts.created, Type::INT8_ARRAY),
                    (&puts.updated, Type::INT8_ARRAY),
                    (&puts.deadlines, Type::INT8_ARRAY),
                    (&puts.leases, Type::INT8_ARRAY),
                ],
            )
            .await?;
        let Some(first) = rows.first() else {
            return Ok(Attempt::Again);
        };
        let revision: i64 = first.try_get(0)?;
        let written_at_us: i64 = first.try_get(1)?;
        // The effective deadline of each key put (its lease's for a key on
        // a lease).
        let mut written = std::collections::HashMap::with_capacity(rows.len());
        for row in &rows {
            if let Some(key) = row.try_get::<_, Option<&[u8]>>(3)? {
                written.insert(key, row.try_get::<_, Option<i64>>(7)?);
            }
        }
        // A key that was absent under the locks but that a concurrent write
        // created since: its revision may be above ours.
        if written.len() < puts.keys.len() {
            tx.rollback().await?;
            // The revision this attempt took is settled as a gap at once,
            // rather than left as a hole that watchers wait for until the
            // poller fills it.
            run.query(client, &sql.fill, &[(&vec![revision], Type::INT8_ARRAY)])
                .await?;
            return Ok(Attempt::Again);
        }
        if let Some(notify) = &sql.notify {
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
            .zip(&effects)
            .map(|(op, effect)| effect.result(|_| written.get(op.key()).copied().flatten()))
            .collect();
        Ok(Attempt::Done(WriteOutcome::Applied {
            revision: u64::try_from(revision).unwrap_or_default(),
            results,
        }))
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn get(&self, key: &[u8]) -> StoreResult<Option<Entry>> {
        self.shared.get_on(&*self.shared, key).await
    }

    async fn get_many(&self, keys: Vec<Vec<u8>>) -> StoreResult<Found> {
        self.shared.get_many_on(&*self.shared, &keys).await
    }

    async fn write(&self, ops: Vec<WriteOp>) -> StoreResult<WriteOutcome> {
        let outcome = match SingleWrite::of(&ops) {
            _ if ops.is_empty() => Err(StoreError::Internal("a write without ops".into())),
            Some(single) => self.write_single(&single).await,
            None => self.write_batch(&ops).await,
        }?;
        if matches!(outcome, WriteOutcome::Applied { .. }) {
            self.shared.kick.notify_one();
        }
        Ok(outcome)
    }

    /// Together in one transaction when each is a single put or delete
    /// (see `write_together`), else one at a time.
    async fn write_many(&self, writes: Vec<Vec<WriteOp>>) -> Vec<StoreResult<WriteOutcome>> {
        let Some(outcomes) = self.write_together(&writes).await else {
            return write_each(self, writes).await;
        };
        if outcomes
            .iter()
            .any(|outcome| matches!(outcome, Ok(WriteOutcome::Applied { .. })))
        {
            self.shared.kick.notify_one();
        }
        outcomes
    }

    async fn scan(&self, request: ScanRequest) -> StoreResult<ScanPage> {
        self.shared.scan_on(&*self.shared, &request).await
    }

    async fn changes(&self, after: u64, limit: usize) -> StoreResult<Vec<Change>> {
        self.shared.changes(after, limit).await
    }

    fn feed(&self) -> Arc<Feed> {
        Arc::clone(&self.shared.feed)
    }

    async fn grant_lease(&self, ttl_ms: u64, owner: Option<String>) -> StoreResult<Lease> {
        self.shared.grant_lease(ttl_ms, owner).await
    }

    async fn keep_lease_alive(&self, id: LeaseId) -> StoreResult<Lease> {
        self.shared.keep_lease_alive(id).await
    }

    async fn lease(&self, id: LeaseId) -> StoreResult<Option<Lease>> {
        self.shared.lease(id).await
    }

    async fn lease_keys(&self, id: LeaseId) -> StoreResult<u64> {
        self.shared.lease_keys(id).await
    }

    async fn revoke_lease(&self, id: LeaseId) -> StoreResult<Revoked> {
        self.shared
            .end_lease(lease_param(id), DeleteReason::LeaseRevoked)
            .await?
            .ok_or(StoreError::LeaseNotFound(id))
    }

    async fn ready(&self) -> StoreResult<()> {
        let client = self.shared.writer().await?;
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
        self.shared.closed.store(true, Ordering::Release);
        self.stop_tasks();
        let task = self.listener.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            task.abort();
        }
        Ok(())
    }

    fn report_metrics(&self) {
        let status = self.shared.pool.status();
        metrics::gauge!("kvstore_postgres_pool_connections").set(status.size as f64);
        metrics::gauge!("kvstore_postgres_pool_available").set(status.available as f64);
        metrics::gauge!("kvstore_postgres_pool_waiting").set(status.waiting as f64);
    }

    fn replicas(&self) -> Option<Arc<dyn ReplicaReads>> {
        self.replicas
            .clone()
            .map(|replicas| replicas as Arc<dyn ReplicaReads>)
    }

    fn describe(&self) -> String {
        let replicas = match self.shared.config.replica_urls.len() {
            0 => String::new(),
            n => format!(", {n} read replica(s)"),
        };
        format!(
            "postgres ({}, schema {}, pool {}{replicas})",
            redact(&self.shared.config.url),
            self.shared.config.schema,
            self.shared.config.pool_size
        )
    }
}

/// The reads, on the primary or on a replica (`from`): the same statements.
impl Shared {
    async fn get_on<C: Connections>(&self, from: &C, key: &[u8]) -> StoreResult<Option<Entry>> {
        let (run, sql) = (&self.run, &self.sql.get);
        let rows = Self::read_on(from, |client| async move {
            run.query(&client, sql, &[(&key, Type::BYTEA)]).await
        })
        .await?;
        rows.first()
            .map(|row| row_entry(key.to_vec(), row, 0))
            .transpose()
    }

    async fn get_many_on<C: Connections>(&self, from: &C, keys: &[Vec<u8>]) -> StoreResult<Found> {
        let (run, sql) = (&self.run, &self.sql.get_many);
        let (rows, revision) = Self::read_at(from, |client| async move {
            run.query(&client, sql, &[(&keys, Type::BYTEA_ARRAY)]).await
        })
        .await?;
        let mut found = std::collections::HashMap::with_capacity(rows.len());
        for row in &rows {
            let key: Vec<u8> = column(row, 0)?;
            let entry = row_entry(key.clone(), row, 1)?;
            found.insert(key, entry);
        }
        Ok(Found {
            entries: keys.iter().map(|k| found.get(k).cloned()).collect(),
            revision,
        })
    }

    async fn scan_on<C: Connections>(
        &self,
        from: &C,
        request: &ScanRequest,
    ) -> StoreResult<ScanPage> {
        let sql = self.scan_sql(request);
        let limit = i64::try_from(request.limit.saturating_add(1)).unwrap_or(i64::MAX);
        let max_bytes = i64::try_from(request.max_value_bytes).unwrap_or(i64::MAX);
        let keys_only = request.keys_only;
        let mut bounds: Vec<&[u8]> = Vec::new();
        for bound in [&request.lower, &request.upper] {
            if let Bound::Included(k) | Bound::Excluded(k) = bound {
                bounds.push(k);
            }
        }
        let (run, sql, bounds) = (&self.run, &sql, &bounds);
        let (rows, revision) = Self::read_at(from, |client| async move {
            let mut params: Vec<Param<'_>> = vec![
                (&limit, Type::INT8),
                (&keys_only, Type::BOOL),
                (&max_bytes, Type::INT8),
            ];
            for bound in bounds {
                params.push((bound, Type::BYTEA));
            }
            run.query(&client, sql, &params).await
        })
        .await?;
        let mut entries = Vec::with_capacity(rows.len().min(request.limit));
        for row in &rows {
            if entries.len() == request.limit {
                return Ok(ScanPage {
                    entries,
                    more: true,
                    revision,
                });
            }
            let running: i64 = column(row, 8)?;
            if !entries.is_empty()
                && !request.keys_only
                && usize::try_from(running).unwrap_or(usize::MAX) > request.max_value_bytes
            {
                return Ok(ScanPage {
                    entries,
                    more: true,
                    revision,
                });
            }
            let key: Vec<u8> = column(row, 0)?;
            entries.push(row_entry(key, row, 1)?);
        }
        Ok(ScanPage {
            entries,
            more: false,
            revision,
        })
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
            filters.push(format!("AND e.key {op} ${n}"));
        }
        let filter = filters.join(" ");
        let order = if request.reverse { "DESC" } else { "ASC" };
        // $1 limit (one more than the page, to know whether more follow),
        // $2 keys only, $3 the page's value bytes. The running sum lets the
        // database leave out the values of rows the page will not return.
        let rows = format!(
            "SELECT key, CASE WHEN $2 OR (running > $3 AND n > 1) THEN NULL ELSE value END,
                    version, revision, created_at_us, updated_at_us, expires_at_us, lease,
                    running, n
             FROM (
                SELECT e.key, {ENTRY_COLUMNS},
                       (sum(octet_length(e.value)) OVER w)::int8 AS running,
                       row_number() OVER w AS n
                FROM {live} {filter}
                WINDOW w AS (ORDER BY e.key {order} ROWS UNBOUNDED PRECEDING)
                ORDER BY e.key {order}
                LIMIT $1
             ) page",
            live = self.sql.live_entries()
        );
        self.sql.at_revision(&rows, "ORDER BY page.n")
    }
}

/// Where a read gets its connection: the primary's pool, or a replica's.
trait Connections: Sync {
    fn connection(&self) -> impl Future<Output = StoreResult<deadpool_postgres::Object>> + Send;
}

impl Connections for Shared {
    async fn connection(&self) -> StoreResult<deadpool_postgres::Object> {
        self.client().await
    }
}
