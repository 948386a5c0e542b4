//! The change feed on PostgreSQL: a change log written with the data, a
//! watermark below which every revision is settled, a poller that publishes
//! what lies below it, and a trimmer.
//!
//! Every write logs one `kv_revisions` row for its revision and one
//! `kv_changes` row per event, in the statement that takes the revision, so
//! the log holds a revision exactly when its write committed. Sequence values
//! commit out of order, and a rolled-back write leaves its value unused, so a
//! missing revision may still commit or may never. The watermark
//! (`kv_watermark.settled`) is the revision up to which every revision has its
//! `kv_revisions` row; nothing can appear below it any more, so watchers and
//! `changes` read only up to it and never see revision r + 1 before r.
//!
//! A revision that stays missing below one that exists for [`FILL_AFTER`] is
//! *filled*: a `kv_revisions` row marks it as a gap. A write that still holds
//! that revision then fails on the primary key when it logs it, and is tried
//! again under a new revision (see `errors::is_retryable`); a write that has
//! logged it already makes the fill wait, and the fill gives up after
//! [`FILL_LOCK_TIMEOUT`] and tries again later. Any server may advance the
//! watermark or fill a gap: all of them run the same poller.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::types::Type;

use deadpool_postgres::Pool;

use super::Shared;
use super::errors::{map_pg, map_pool};
use super::rows::{column, first_row, to_u64};
use super::run::Runner;
use super::sql::{LOOK_AHEAD, Sql, lease_id};
use crate::error::{StoreError, StoreResult};
use crate::storage::changes::{OLDEST_GAUGE, REVISIONS_GAUGE};
use crate::storage::{Change, DeleteReason, Event};

/// How often the poller looks for new revisions when this server wrote
/// nothing (its own writes wake it at once).
pub(super) const POLL_EVERY: Duration = Duration::from_millis(10);
/// The least time from one round's start to the next one's.
const ROUND_SPACING: Duration = Duration::from_millis(2);
/// How long a revision may stay missing below an existing one before it is
/// filled as a gap: far longer than a write takes between its `nextval` and
/// its commit, so that a fill rarely makes a write start again.
const FILL_AFTER: Duration = Duration::from_millis(250);
/// The longest a fill waits for a write that has logged the revision but not
/// committed yet.
const FILL_LOCK_TIMEOUT: &str = "100ms";
/// Revisions published to the feed at a time.
const PUBLISH_PAGE: usize = 1000;
/// A page of changes ends once its events add up to this many bytes (after
/// at least one revision), as on the embedded engine.
const PAGE_BYTES: usize = 4 << 20;
/// The pause after a round that failed (PostgreSQL unreachable).
const RETRY_AFTER: Duration = Duration::from_millis(500);
/// How often the trimmer runs, and how much it deletes per transaction and
/// per round.
const TRIM_EVERY: Duration = Duration::from_secs(1);
const TRIM_BATCH: i64 = 1000;
const TRIM_ROUND: usize = 20;
/// The advisory lock (with the schema's hash) that lets one server trim.
const TRIM_LOCK: i32 = 7071;

const GAPS_FILLED: &str = "kvstore_postgres_revision_gaps_filled_total";

impl Shared {
    /// The revisions after `after` up to the watermark, at most `limit`,
    /// each with its events (none for a gap or a write that changed nothing).
    pub(super) async fn changes(&self, after: u64, limit: usize) -> StoreResult<Vec<Change>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let after_param = i64::try_from(after).unwrap_or(i64::MAX);
        let limit_param = i64::try_from(limit).unwrap_or(i64::MAX);
        let (run, sql) = (&self.run, &self.sql.changes);
        let rows = self
            .read(|client| async move {
                run.query(
                    &client,
                    sql,
                    &[(&after_param, Type::INT8), (&limit_param, Type::INT8)],
                )
                .await
            })
            .await?;
        let first = rows
            .first()
            .ok_or_else(|| StoreError::Internal("the watermark row is missing".into()))?;
        let settled = to_u64(column(first, 0)?)?;
        let trimmed = to_u64(column(first, 1)?)?;
        if after < trimmed {
            return Err(StoreError::Compacted {
                compact_revision: trimmed + 1,
                revision: settled,
            });
        }
        let mut changes: Vec<Change> = Vec::new();
        let mut bytes = 0;
        for row in &rows {
            let Some(revision) = column::<Option<i64>>(row, 2)? else {
                break;
            };
            let revision = to_u64(revision)?;
            if changes.last().map(|c| c.revision) != Some(revision) {
                if bytes >= PAGE_BYTES {
                    break;
                }
                changes.push(Change {
                    revision,
                    events: Vec::new(),
                });
            }
            if let (Some(event), Some(change)) = (row_event(row)?, changes.last_mut()) {
                bytes += event.weight();
                change.events.push(event);
            }
        }
        Ok(changes)
    }
}

/// The watermark, read when the store opens (the schema is in place).
pub(super) async fn settled_at_open(pool: &Pool, sql: &Sql, run: &Runner) -> StoreResult<u64> {
    let client = pool.get().await.map_err(map_pool)?;
    let rows = run
        .query(&client, &sql.watermark_row, &[])
        .await
        .map_err(|e| map_pg(&e))?;
    to_u64(column(&first_row(rows)?, 0)?)
}

/// The event of a row of `Sql::changes`, `None` when the revision has none.
fn row_event(row: &tokio_postgres::Row) -> StoreResult<Option<Event>> {
    let Some(key) = column::<Option<Vec<u8>>>(row, 3)? else {
        return Ok(None);
    };
    let version = to_u64(column(row, 5)?)?;
    let event = match column::<Option<Vec<u8>>>(row, 4)? {
        Some(value) => {
            let stamp = |i| {
                column::<Option<i64>>(row, i)?.ok_or_else(|| {
                    StoreError::Corrupt("a logged put without its timestamps".into())
                })
            };
            Event::Put {
                key,
                value,
                version,
                created_at_us: stamp(6)?,
                updated_at_us: stamp(7)?,
                expires_at_us: column(row, 9)?,
                lease: column::<Option<i64>>(row, 10)?.map(lease_id),
            }
        }
        None => {
            let reason: Option<i16> = column(row, 8)?;
            Event::Delete {
                key,
                version,
                reason: DeleteReason::from_code(
                    reason.and_then(|r| u8::try_from(r).ok()).unwrap_or(u8::MAX),
                )?,
            }
        }
    };
    Ok(Some(event))
}

/// Settles revisions and publishes them to the store's feed.
pub(super) struct Poller {
    shared: Arc<Shared>,
    /// Every revision up to here was published; `None` until the feed's
    /// start is known (PostgreSQL could not be reached at open).
    published: Option<u64>,
    /// Revisions missing below one that exists, and since when.
    missing: HashMap<u64, Instant>,
}

impl Poller {
    pub(super) fn new(shared: Arc<Shared>, published: Option<u64>) -> Self {
        Poller {
            shared,
            published,
            missing: HashMap::new(),
        }
    }

    /// Runs until the task is aborted (the store closed or dropped).
    pub(super) async fn run(mut self) {
        let mut failing = false;
        loop {
            let started = tokio::time::Instant::now();
            let round = self.round().await;
            // Under steady writes every round finds work and the next one
            // would start at once: one connection busy polling, taking the
            // database's CPU from the writes. Spaced rounds take what came
            // meanwhile in one page.
            tokio::time::sleep_until(started + ROUND_SPACING).await;
            match round {
                Ok(more) => {
                    if failing {
                        tracing::info!("publishing PostgreSQL's changes to watchers again");
                        failing = false;
                    }
                    if !more {
                        let _ = tokio::time::timeout(POLL_EVERY, self.shared.kick.notified()).await;
                    }
                }
                Err(err) => {
                    if !failing {
                        tracing::warn!(error = %err, "cannot read PostgreSQL's changes; watchers wait until it answers");
                        failing = true;
                    }
                    tokio::time::sleep(RETRY_AFTER).await;
                }
            }
        }
    }

    /// Settles what it can, then publishes; gives whether work is left.
    async fn round(&mut self) -> StoreResult<bool> {
        let (settled, filled) = self.settle().await?;
        let more = self.publish(settled).await?;
        Ok(more || filled)
    }

    /// Advances the watermark over the revisions that have their rows, and
    /// fills those missing for too long. Gives the watermark, and whether
    /// something was filled (so the watermark can move on at once).
    async fn settle(&mut self) -> StoreResult<(u64, bool)> {
        let mut client = self.shared.client().await?;
        let sql = &self.shared.sql;
        let run = &self.shared.run;
        let rows = run
            .query(&client, &sql.settle, &[(&LOOK_AHEAD, Type::INT8)])
            .await
            .map_err(|e| map_pg(&e))?;
        let first = rows
            .first()
            .ok_or_else(|| StoreError::Internal("the watermark row is missing".into()))?;
        let settled = to_u64(column(first, 0)?)?;
        // The revisions missing between those logged above the watermark.
        let mut next = settled + 1;
        let mut missing = Vec::new();
        for row in &rows {
            let Some(revision) = column::<Option<i64>>(row, 1)? else {
                break;
            };
            let revision = to_u64(revision)?;
            let room = usize::try_from(LOOK_AHEAD).unwrap_or(usize::MAX) - missing.len();
            missing.extend((next..revision).take(room));
            next = revision + 1;
        }
        let now = Instant::now();
        self.missing.retain(|revision, _| *revision > settled);
        let mut ripe = Vec::new();
        for revision in missing {
            let since = *self.missing.entry(revision).or_insert(now);
            if now.duration_since(since) >= FILL_AFTER {
                ripe.push(i64::try_from(revision).unwrap_or(i64::MAX));
            }
        }
        let filled = !ripe.is_empty() && self.fill(&mut client, &ripe).await?;
        Ok((settled, filled))
    }

    /// Marks `revisions` as gaps, unless a write logs one of them first;
    /// gives whether it did.
    async fn fill(
        &self,
        client: &mut deadpool_postgres::Object,
        revisions: &[i64],
    ) -> StoreResult<bool> {
        let tx = self
            .shared
            .run
            .begin(client)
            .await
            .map_err(|e| map_pg(&e))?;
        tx.batch_execute(&format!("SET LOCAL lock_timeout = '{FILL_LOCK_TIMEOUT}'"))
            .await
            .map_err(|e| map_pg(&e))?;
        match tx
            .execute(self.shared.sql.fill.as_str(), &[&revisions])
            .await
        {
            Ok(filled) => {
                tx.commit().await.map_err(|e| map_pg(&e))?;
                metrics::counter!(GAPS_FILLED).increment(filled);
                Ok(true)
            }
            // A write has logged one of them and not committed yet: its
            // commit (or rollback) settles it; look again next round.
            Err(err)
                if err.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) =>
            {
                Ok(false)
            }
            Err(err) => Err(map_pg(&err)),
        }
    }

    /// Publishes a page of what is settled above what was published; gives
    /// whether more is waiting.
    async fn publish(&mut self, settled: u64) -> StoreResult<bool> {
        let Some(published) = self.published else {
            self.skip_to(settled);
            return Ok(false);
        };
        if published >= settled {
            return Ok(false);
        }
        // A page read with no watcher open would be thrown away: under
        // steady batches of 100 that read, with every value written, cost
        // about 0.45 ms of PostgreSQL's CPU and 0.25 ms of the server's per
        // batch (docs/postgres.md).
        if !self.shared.feed.watched() {
            self.skip_to(settled);
            return Ok(false);
        }
        let mut changes = match self.shared.changes(published, PUBLISH_PAGE).await {
            Ok(changes) => changes,
            // This server fell behind the history (a long outage): its
            // watchers learn from the change log whether they are too.
            Err(StoreError::Compacted { .. }) => {
                self.skip_to(settled);
                return Ok(false);
            }
            Err(err) => return Err(err),
        };
        let Some(through) = changes.last().map(|c| c.revision) else {
            return Ok(false);
        };
        changes.retain(|change| !change.events.is_empty());
        self.shared.feed.publish_changes(changes, through);
        self.published = Some(through);
        Ok(through < settled)
    }

    /// Moves the feed on to `settled` without publishing what lies between:
    /// its watchers read that from the change log.
    fn skip_to(&mut self, settled: u64) {
        self.shared.feed.restart(settled);
        self.published = Some(settled);
    }
}

/// Trims the history every [`TRIM_EVERY`] until the task is aborted.
pub(super) async fn run_trimmer(shared: Arc<Shared>) {
    loop {
        tokio::time::sleep(TRIM_EVERY).await;
        match trim(&shared).await {
            Ok(()) => {}
            // The poller says so already.
            Err(StoreError::Unavailable(_)) => {}
            Err(err) => {
                tracing::warn!(error = %err, "trimming the watch history failed; retrying later");
            }
        }
    }
}

/// Deletes the revisions past both windows of the history, oldest first, in
/// short transactions, while this server holds the schema's trim lock.
async fn trim(shared: &Shared) -> StoreResult<()> {
    let mut client = shared.client().await?;
    let sql = &shared.sql;
    let keep_revisions = shared.config.history.revisions;
    let age_us = i64::try_from(shared.config.history.age.as_micros()).unwrap_or(i64::MAX);
    for _ in 0..TRIM_ROUND {
        let tx = shared
            .run
            .begin(&mut client)
            .await
            .map_err(|e| map_pg(&e))?;
        let locked: bool = column(
            &tx.query_one(
                "SELECT pg_try_advisory_xact_lock($1, hashtext($2))",
                &[&TRIM_LOCK, &shared.config.schema],
            )
            .await
            .map_err(|e| map_pg(&e))?,
            0,
        )?;
        let row = tx
            .query_one(sql.watermark_row.as_str(), &[])
            .await
            .map_err(|e| map_pg(&e))?;
        let settled: i64 = column(&row, 0)?;
        let trimmed: i64 = column(&row, 1)?;
        report(shared, settled, trimmed);
        if !locked {
            return Ok(());
        }
        let keep_from = settled.saturating_sub(i64::try_from(keep_revisions).unwrap_or(i64::MAX));
        let candidates = tx
            .query(
                sql.trim_candidates.as_str(),
                &[&trimmed, &keep_from, &age_us, &TRIM_BATCH],
            )
            .await
            .map_err(|e| map_pg(&e))?;
        // Revisions are trimmed from the oldest on, up to the first one that
        // is still young enough to keep.
        let mut through = None;
        for row in &candidates {
            if !column::<bool>(row, 1)? {
                break;
            }
            through = Some(column::<i64>(row, 0)?);
        }
        let Some(through) = through else {
            return Ok(());
        };
        tx.execute(sql.trim.as_str(), &[&trimmed, &through])
            .await
            .map_err(|e| map_pg(&e))?;
        tx.commit().await.map_err(|e| map_pg(&e))?;
        report(shared, settled, through);
        if candidates.len() < usize::try_from(TRIM_BATCH).unwrap_or(usize::MAX)
            || candidates.last().map(|r| column::<i64>(r, 0)).transpose()? != Some(through)
        {
            return Ok(());
        }
    }
    Ok(())
}

/// The history gauges, as the embedded engine reports them; and the feed
/// forgets what the history no longer holds, so that a watch from below it is
/// told it is compacted on every server alike.
fn report(shared: &Shared, settled: i64, trimmed: i64) {
    shared
        .feed
        .forget_through(u64::try_from(trimmed).unwrap_or_default());
    metrics::gauge!(OLDEST_GAUGE).set((trimmed + 1) as f64);
    metrics::gauge!(REVISIONS_GAUGE).set(settled.saturating_sub(trimmed) as f64);
}
