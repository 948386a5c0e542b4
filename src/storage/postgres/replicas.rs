//! Read replicas: streaming standbys of the primary that a read may opt
//! into, to take reads off the primary.
//!
//! Each replica URL gets a pool of its own, opened like the primary's (the
//! same settings, timeouts and keepalives) but without the read-write check
//! and without LISTEN. A probe reads, every [`PROBE_EVERY`], the revision the
//! replica holds (every write up to it replayed: the revision a read there
//! would report, computed by the same statement as the primary's reads) and
//! how far its replay is behind; a replica that does not answer it within
//! the connect timeout is down until a probe succeeds again, and its
//! connections are dropped.
//!
//! A read that opts in goes to a replica that is up and whose last probed
//! revision is at least the read's `min_revision` (replicas in turn). A
//! replica only moves forward, so the probed revision is a lower bound of
//! what the read sees there, and a client's revision token is honoured.
//! Otherwise, or when the replica's read fails or runs out of time, the read
//! is left to the caller, who reads from the primary: never an error because
//! of a replica.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::Pool;
use tokio::task::JoinHandle;

use super::connect::Connector;
use super::errors::map_pool;
use super::rows::{column, first_row, to_u64};
use super::{Connections, Shared, build_pool};
use crate::error::{StoreError, StoreResult};
use crate::storage::{Entry, Found, ReplicaReads, ScanPage, ScanRequest};

/// How often each replica's revision and lag are read.
pub(super) const PROBE_EVERY: Duration = Duration::from_millis(200);

/// How far the replica's replay is behind, in seconds: the age of the last
/// transaction it replayed while WAL it received waits to be replayed, 0 when
/// it has replayed all it received (an idle primary is no lag) or when it is
/// not a standby (promoted since).
const LAG_SECONDS: &str = "CASE WHEN NOT pg_is_in_recovery()
          OR pg_last_wal_receive_lsn() IS NOT DISTINCT FROM pg_last_wal_replay_lsn() THEN 0
     ELSE coalesce(extract(epoch from now() - pg_last_xact_replay_timestamp()), 0)
     END::float8";

/// The read replicas of a store.
pub(super) struct Replicas {
    shared: Arc<Shared>,
    replicas: Vec<Replica>,
    /// Where the next read starts looking, so that reads take turns.
    next: AtomicUsize,
    /// The replica's revision and lag.
    probe: String,
}

/// One read replica.
struct Replica {
    /// Its `host:port`, the label of its metrics.
    name: String,
    pool: Pool,
    connector: Arc<Connector>,
    /// The revision it held at the last probe.
    revision: AtomicU64,
    /// Whether the last probe, and every read since, succeeded.
    up: AtomicBool,
}

impl Connections for Replica {
    async fn connection(&self) -> StoreResult<deadpool_postgres::Object> {
        self.pool.get().await.map_err(map_pool)
    }
}

/// Why a read that opted into a replica was served by the primary.
#[derive(Clone, Copy)]
enum Fallback {
    /// No replica was up.
    Down,
    /// The replicas that were up had not replayed the read's `min_revision`.
    Behind,
    /// The replica's read failed or ran out of time.
    Failed,
}

impl Fallback {
    fn count(self) {
        let reason = match self {
            Fallback::Down => "down",
            Fallback::Behind => "behind",
            Fallback::Failed => "error",
        };
        metrics::counter!("kvstore_postgres_replica_fallbacks_total", "reason" => reason)
            .increment(1);
    }
}

impl Replicas {
    /// A pool for each of the configured replicas; `None` without any.
    pub(super) fn open(shared: &Arc<Shared>) -> StoreResult<Option<Arc<Self>>> {
        let config = &shared.config;
        if config.replica_urls.is_empty() {
            return Ok(None);
        }
        let mut replicas = Vec::with_capacity(config.replica_urls.len());
        for url in &config.replica_urls {
            let pg_config = config.replica_config(url)?;
            let connector = Arc::new(Connector::for_replica(&pg_config, config.connect_timeout)?);
            replicas.push(Replica {
                name: connector.describe_hosts(),
                pool: build_pool(pg_config, &connector, config)?,
                connector,
                revision: AtomicU64::new(0),
                up: AtomicBool::new(false),
            });
        }
        let revision = shared
            .sql
            .at_revision("SELECT NULL::int8 AS revision WHERE false", "");
        Ok(Some(Arc::new(Replicas {
            shared: Arc::clone(shared),
            replicas,
            next: AtomicUsize::new(0),
            probe: format!("SELECT r.run, {LAG_SECONDS} FROM ({revision}) r"),
        })))
    }

    /// Starts probing each replica, until the tasks are aborted.
    pub(super) fn spawn_probes(self: &Arc<Self>) -> Vec<JoinHandle<()>> {
        (0..self.replicas.len())
            .map(|index| {
                let replicas = Arc::clone(self);
                tokio::spawn(async move {
                    let mut every = tokio::time::interval(PROBE_EVERY);
                    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    loop {
                        every.tick().await;
                        replicas.probe(index).await;
                    }
                })
            })
            .collect()
    }

    /// Reads replica `index`'s revision and lag into its state and metrics.
    async fn probe(&self, index: usize) {
        let Some(replica) = self.replicas.get(index) else {
            return;
        };
        let (run, sql) = (&self.shared.run, &self.probe);
        let probed = tokio::time::timeout(
            self.shared.config.connect_timeout,
            Shared::read_on(replica, |client| async move {
                run.query(&client, sql, &[]).await
            }),
        )
        .await;
        let read = match probed {
            Ok(Ok(rows)) => first_row(rows)
                .and_then(|row| Ok((to_u64(column(&row, 0)?)?, column::<f64>(&row, 1)?))),
            Ok(Err(err)) => Err(err),
            Err(_) => {
                // A replica that hangs: its connections would hold reads
                // until TCP gives up on them.
                replica.connector.condemn_all();
                Err(StoreError::Unavailable(
                    "the replica did not answer in time".into(),
                ))
            }
        };
        let label = [("replica", replica.name.clone())];
        match read {
            Ok((revision, lag_seconds)) => {
                replica.revision.store(revision, Ordering::Release);
                if !replica.up.swap(true, Ordering::AcqRel) {
                    tracing::info!(replica = %replica.name, revision, "read replica is up");
                }
                let behind = self.shared.feed.latest().saturating_sub(revision);
                metrics::gauge!("kvstore_postgres_replica_lag_seconds", &label).set(lag_seconds);
                metrics::gauge!("kvstore_postgres_replica_lag_revisions", &label)
                    .set(behind as f64);
                metrics::gauge!("kvstore_postgres_replica_revision", &label).set(revision as f64);
            }
            Err(err) => {
                if replica.up.swap(false, Ordering::AcqRel) {
                    tracing::warn!(replica = %replica.name, error = %err, "read replica is down; its reads go to the primary");
                }
            }
        }
        let up = if replica.up.load(Ordering::Acquire) {
            1.0
        } else {
            0.0
        };
        metrics::gauge!("kvstore_postgres_replica_up", &label).set(up);
    }

    /// A replica that is up and holds `min_revision`, the replicas taking
    /// turns; `None`, counted, when there is none.
    fn pick(&self, min_revision: u64) -> Option<&Replica> {
        let count = self.replicas.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut any_up = false;
        for offset in 0..count {
            let replica = &self.replicas[(start + offset) % count];
            if !replica.up.load(Ordering::Acquire) {
                continue;
            }
            any_up = true;
            if replica.revision.load(Ordering::Acquire) >= min_revision {
                return Some(replica);
            }
        }
        if any_up {
            Fallback::Behind.count();
        } else {
            Fallback::Down.count();
        }
        None
    }

    /// Runs `read` on a replica that holds `min_revision`; `None` when none
    /// could serve it. `revision_of` gives the revision a result was read
    /// at, when it has one: a replica found behind it (one rebuilt from an
    /// older copy since the probe) does not serve it.
    async fn serve<'a, T, F, Fut>(
        &'a self,
        min_revision: u64,
        read: F,
        revision_of: fn(&T) -> Option<u64>,
    ) -> Option<T>
    where
        F: FnOnce(&'a Replica) -> Fut,
        Fut: Future<Output = StoreResult<T>>,
    {
        let replica = self.pick(min_revision)?;
        match tokio::time::timeout(self.shared.config.connect_timeout, read(replica)).await {
            Ok(Ok(value)) if revision_of(&value).is_some_and(|r| r < min_revision) => {
                Fallback::Behind.count();
                None
            }
            Ok(Ok(value)) => {
                metrics::counter!("kvstore_postgres_replica_reads_total", "replica" => replica.name.clone())
                    .increment(1);
                Some(value)
            }
            outcome => {
                let why = match outcome {
                    Ok(Err(err)) => err.to_string(),
                    _ => "no answer in time".to_owned(),
                };
                if replica.up.swap(false, Ordering::AcqRel) {
                    tracing::warn!(replica = %replica.name, error = %why, "read replica failed a read; reads go to the primary until it answers a probe");
                }
                Fallback::Failed.count();
                None
            }
        }
    }
}

#[async_trait]
impl ReplicaReads for Replicas {
    async fn get(&self, key: &[u8], min_revision: u64) -> Option<Option<Entry>> {
        self.serve(
            min_revision,
            |replica| self.shared.get_on(replica, key),
            |_| None,
        )
        .await
    }

    async fn get_many(&self, keys: &[Vec<u8>], min_revision: u64) -> Option<Found> {
        self.serve(
            min_revision,
            |replica| self.shared.get_many_on(replica, keys),
            |found| Some(found.revision),
        )
        .await
    }

    async fn scan(&self, request: &ScanRequest, min_revision: u64) -> Option<ScanPage> {
        self.serve(
            min_revision,
            |replica| self.shared.scan_on(replica, request),
            |page| Some(page.revision),
        )
        .await
    }
}
