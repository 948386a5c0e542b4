//! The engine's one writer: it checks a group's conditions, assigns versions
//! and revisions, commits one fjall batch with its sync, and answers.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fjall::PersistMode;

use super::codec::{self, RecordMeta};
use super::engine::Engine;
use super::key_directory::KeyDirectory;
use super::{
    COMMIT_SECONDS, CommitEvent, FailedCondition, GROUP_KEYS, GROUP_WRITES, OpResult, REVISION_KEY,
    Reply, Shared, WriteOp, WriteOutcome,
};
use crate::error::{StoreError, StoreResult};
use crate::storage::changes::{DeleteReason, RecordBuilder, Stamp, record_key};

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// The state of the engine's one writer.
pub(super) struct Writer {
    pub(super) persist: PersistMode,
    /// The last revision assigned.
    pub(super) revision: u64,
    pub(super) directory: KeyDirectory,
}

/// A write of the current group that passed its conditions, waiting for the commit.
struct Accepted {
    reply: Reply,
    outcome: WriteOutcome,
}

impl Writer {
    pub(super) fn commit_group(&mut self, shared: &Shared, writes: Vec<(Vec<WriteOp>, Reply)>) {
        let loaded = shared.engine.load();
        // Writes queued before the guard saw the disk nearly full are refused
        // here too, so that at most one group runs past the threshold.
        let engine = match (shared.failure(), loaded.as_deref()) {
            (None, Some(engine)) if !shared.space.is_low() => engine,
            (failure, _) => {
                let refusal = || match &failure {
                    Some(failure) => failure.error(),
                    None if shared.space.is_low() => {
                        StoreError::InsufficientStorage(shared.space.refusal())
                    }
                    None => StoreError::Unavailable("the engine is being reopened".into()),
                };
                for (_, reply) in writes {
                    let _ = reply.send((Err(refusal()), Duration::ZERO));
                }
                return;
            }
        };
        let first_revision = self.revision;
        let mut accepted = Vec::with_capacity(writes.len());
        // The group's change record, committed with its data.
        let mut record = RecordBuilder::new();
        // The group's writes, one per key: two writes of one key must not share
        // a fjall batch (they would get the same sequence number).
        let mut pending = HashMap::new();
        for (ops, reply) in writes {
            match self.apply(engine, ops, &mut pending, &mut record) {
                Ok(WriteOutcome::Rejected { failed }) => {
                    let _ = reply.send((Ok(WriteOutcome::Rejected { failed }), Duration::ZERO));
                }
                Ok(outcome) => accepted.push(Accepted { reply, outcome }),
                // Reading a current version failed (an I/O error, a corrupt
                // record): this write fails alone; it added nothing to the group.
                Err(err) => {
                    let _ = reply.send((Err(err), Duration::ZERO));
                }
            }
        }
        if accepted.is_empty() {
            return;
        }
        let keys_written = pending.len();
        let record = record.finish(self.revision, now_us());
        let mut bytes_written = record.len();
        let mut batch = fjall::OwnedWriteBatch::with_capacity(engine.db.clone(), keys_written + 2)
            .durability(Some(self.persist));
        for (key, write) in &pending {
            bytes_written += key.len();
            match write {
                Some((_, stored)) => {
                    bytes_written += stored.len();
                    batch.insert(&engine.kv, key.as_slice(), stored.as_slice());
                }
                None => batch.remove(&engine.kv, key.as_slice()),
            }
        }
        batch.insert(&engine.meta, REVISION_KEY, self.revision.to_le_bytes());
        batch.insert(
            &engine.changes,
            record_key(first_revision + 1),
            record.as_slice(),
        );
        let start = Instant::now();
        let committed = batch.commit();
        let commit = start.elapsed();
        metrics::histogram!(COMMIT_SECONDS).record(commit.as_secs_f64());
        metrics::histogram!(GROUP_WRITES).record(accepted.len() as f64);
        metrics::histogram!(GROUP_KEYS).record(keys_written as f64);
        if let Err(err) = committed {
            self.revision = first_revision;
            // The directory holds no write of this group: it is updated below,
            // after a commit that succeeded.
            let what = match self.persist {
                PersistMode::Buffer => "commit (journal write)",
                PersistMode::SyncData | PersistMode::SyncAll => "commit (journal write and sync)",
            };
            let failure = shared.engine_failed(what, &err);
            for Accepted { reply, .. } in accepted {
                let _ = reply.send((Err(failure.error()), Duration::ZERO));
            }
            return;
        }
        shared.space.committed(bytes_written as u64);
        for (key, write) in pending {
            self.directory.set(key, write.map(|(meta, _)| meta));
        }
        shared
            .committed_revision
            .store(self.revision, Ordering::Release);
        shared.notify(CommitEvent::Committed {
            last_revision: self.revision,
            synced: matches!(self.persist, PersistMode::SyncData | PersistMode::SyncAll),
        });
        for Accepted { reply, outcome } in accepted {
            let _ = reply.send((Ok(outcome), commit));
        }
        // After the commit's sync, so that no watcher sees a write a crash
        // could take away.
        shared.feed.publish_record(record, self.revision);
    }

    /// Checks one write's conditions and, when they hold, adds its ops to the
    /// group under the next revision.
    fn apply(
        &mut self,
        engine: &Engine,
        ops: Vec<WriteOp>,
        pending: &mut PendingWrites,
        record: &mut RecordBuilder,
    ) -> StoreResult<WriteOutcome> {
        let mut current = Vec::with_capacity(ops.len());
        let mut failed = Vec::new();
        for (index, op) in ops.iter().enumerate() {
            let meta = match pending.get(op.key()) {
                Some(write) => write.as_ref().map(|(meta, _)| *meta),
                None => self.directory.current(engine, op.key())?,
            };
            let version = meta.map(|m| m.version);
            if !op.condition().holds(version) {
                failed.push(FailedCondition {
                    index,
                    current_version: version,
                });
            }
            current.push(meta);
        }
        if !failed.is_empty() {
            return Ok(WriteOutcome::Rejected { failed });
        }

        self.revision += 1;
        let revision = self.revision;
        let now = now_us();
        let mut results = Vec::with_capacity(ops.len());
        let changed = ops
            .iter()
            .zip(&current)
            .filter(|(op, meta)| matches!(op, WriteOp::Put { .. }) || meta.is_some())
            .count();
        record.revision(revision, changed);
        for (op, meta) in ops.into_iter().zip(current) {
            match op {
                WriteOp::Put { key, value, .. } => {
                    let new = RecordMeta {
                        version: meta.map_or(1, |m| m.version + 1),
                        revision,
                        created_at_us: meta.map_or(now, |m| m.created_at_us),
                        // Never before the previous write, even if the clock steps back.
                        updated_at_us: meta.map_or(now, |m| now.max(m.updated_at_us)),
                        expires_at_us: None,
                        lease: None,
                    };
                    results.push(OpResult::Put {
                        version: new.version,
                        created: meta.is_none(),
                        created_at_us: new.created_at_us,
                        updated_at_us: new.updated_at_us,
                        expires_at_us: new.expires_at_us,
                        lease: new.lease,
                    });
                    record.put(
                        &key,
                        &value,
                        &Stamp {
                            version: new.version,
                            created_at_us: new.created_at_us,
                            updated_at_us: new.updated_at_us,
                            expires_at_us: new.expires_at_us,
                            lease: new.lease,
                        },
                    );
                    pending.insert(key, Some((new, codec::encode(&new, &value))));
                }
                WriteOp::Delete { key, .. } => {
                    results.push(OpResult::Deleted {
                        existed: meta.is_some(),
                    });
                    if let Some(meta) = meta {
                        record.delete(&key, meta.version, DeleteReason::Deleted);
                        pending.insert(key, None);
                    }
                }
            }
        }
        Ok(WriteOutcome::Applied { revision, results })
    }
}

/// The writes of a commit group by key: the new record, or `None` for a delete.
type PendingWrites = HashMap<Vec<u8>, Option<(RecordMeta, Vec<u8>)>>;
