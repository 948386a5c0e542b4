//! The change log: reading it from a snapshot, and trimming it to the
//! retention in the background.
//!
//! The log is a keyspace of its own with one record per commit group, written
//! in the same fjall batch as the group's data and revision, so a crash never
//! keeps a write without its changes or changes without their write. The
//! trimmer deletes whole records from the oldest end, in small unsynced
//! batches on its own thread: a crash may bring a trimmed record back, which
//! only lengthens the history, never leaves a hole in it.

use std::ops::Bound;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fjall::Readable;

use super::Shared;
use super::engine::Engine;
use super::reads::View;
use crate::error::{StoreError, StoreResult};
use crate::storage::changes::{
    Change, OLDEST_GAUGE, REVISIONS_GAUGE, decode_record, record_first, record_header, record_key,
};

/// A page of changes ends once its records add up to this many bytes (after
/// at least one revision).
const PAGE_BYTES: usize = 4 << 20;
/// How often the trimmer looks for records past the retention.
const TRIM_EVERY: Duration = Duration::from_secs(1);
/// Records deleted per batch and per round: a round's work is bounded, so
/// that the trimmer never competes with the writer for long.
const TRIM_BATCH: usize = 1000;
const TRIM_ROUND: usize = 20_000;

/// The revisions after `after`, from the readers' view: a revision whose
/// sync is not done is not given.
pub(super) fn read_changes(view: &View, after: u64, limit: usize) -> StoreResult<Vec<Change>> {
    let (engine, snapshot, current) = (&view.engine, &view.snapshot, view.revision);
    if after >= current || limit == 0 {
        return Ok(Vec::new());
    }
    let oldest = match snapshot.first_key_value(&engine.changes) {
        Some(first) => record_first(&first.key()?)?,
        None => current + 1,
    };
    if after + 1 < oldest {
        return Err(StoreError::Compacted {
            compact_revision: oldest,
            revision: current,
        });
    }
    // The record holding `after + 1` starts at or before it.
    let start = snapshot
        .range(&engine.changes, ..=record_key(after + 1))
        .next_back()
        .map(|found| found.key().map(|k| k.to_vec()))
        .transpose()?
        .unwrap_or_else(|| record_key(after + 1).to_vec());
    let mut changes = Vec::new();
    let mut bytes = 0;
    for item in snapshot.range(&engine.changes, (Bound::Included(start), Bound::Unbounded)) {
        let (_, record) = item.into_inner()?;
        bytes += record.len();
        for change in decode_record(&record)? {
            if change.revision > after {
                changes.push(change);
                if changes.len() == limit {
                    return Ok(changes);
                }
            }
        }
        if bytes >= PAGE_BYTES && !changes.is_empty() {
            break;
        }
    }
    Ok(changes)
}

/// The oldest revision the log holds (the current one + 1 when it is empty).
pub(super) fn oldest_revision(engine: &Engine, current: u64) -> StoreResult<u64> {
    match engine.changes.first_key_value() {
        Some(first) => record_first(&first.key()?),
        None => Ok(current + 1),
    }
}

/// The trimmer thread: every second, deletes the records that are past both
/// windows of the retention, until `stop` is dropped.
pub(super) fn run_trimmer(shared: &Shared, stop: &Receiver<()>) {
    loop {
        match stop.recv_timeout(TRIM_EVERY) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
        let Some(engine) = shared.engine.load_full() else {
            continue;
        };
        if let Err(err) = trim(shared, &engine) {
            tracing::warn!(error = %err, "trimming the watch history failed; retrying later");
        }
    }
}

fn trim(shared: &Shared, engine: &Engine) -> StoreResult<()> {
    let current = shared.committed_revision.load(Ordering::Acquire);
    // A record is deleted only when all of it is past both windows.
    let keep_from = current.saturating_sub(shared.history.revisions);
    let now_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
    let age_us = i64::try_from(shared.history.age.as_micros()).unwrap_or(i64::MAX);
    let cutoff_us = now_us.saturating_sub(age_us);
    let mut deleted = 0;
    let mut doomed = Vec::with_capacity(TRIM_BATCH);
    let mut oldest = oldest_revision(engine, current)?;
    for item in engine.changes.iter() {
        let (key, record) = item.into_inner()?;
        let header = record_header(&record)?;
        if header.last_revision > keep_from || header.written_at_us >= cutoff_us {
            break;
        }
        oldest = header.last_revision + 1;
        doomed.push(key);
        if doomed.len() == TRIM_BATCH {
            deleted += delete(engine, &mut doomed)?;
            if deleted >= TRIM_ROUND {
                break;
            }
        }
    }
    deleted += delete(engine, &mut doomed)?;
    if deleted > 0 {
        // Readers see the records gone now, not at the next write.
        shared.republish_view();
    }
    shared.feed.forget_through(oldest.saturating_sub(1));
    metrics::gauge!(OLDEST_GAUGE).set(oldest as f64);
    metrics::gauge!(REVISIONS_GAUGE).set((current + 1).saturating_sub(oldest) as f64);
    Ok(())
}

fn delete(engine: &Engine, keys: &mut Vec<fjall::Slice>) -> StoreResult<usize> {
    let count = keys.len();
    if count == 0 {
        return Ok(0);
    }
    // Unsynced: a trimmed record that a crash brings back does no harm.
    let mut batch = fjall::OwnedWriteBatch::with_capacity(engine.db.clone(), count)
        .durability(Some(fjall::PersistMode::Buffer));
    for key in keys.drain(..) {
        batch.remove(&engine.changes, key);
    }
    batch.commit()?;
    Ok(count)
}
