//! The engine's one writer: it checks a group's conditions, assigns versions
//! and revisions, and commits one fjall batch, which the sync that covers it
//! answers (see [`super::syncer`]).
//!
//! Expiry goes through here too (see [`super::expiry`]): a key past its
//! deadline is absent to conditions, and the first write to find it deletes
//! it first, under a revision of its own with the reason `expired`, so that a
//! watcher sees the delete before the key's next life. Leases are granted,
//! renewed and revoked by the writer, so a write attaching a key to a lease
//! and the lease's end are ordered.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use fjall::PersistMode;

use super::codec::{self, RecordMeta};
use super::engine::Engine;
use super::expiry::{
    ROUND_KEYS, deadline_key, due_end, encode_lease, lease_key, lease_keys, split_deadline_key,
};
use super::full_disk::Failure;
use super::key_directory::KeyDirectory;
use super::reads::View;
use super::syncer::Written;
use super::{
    COMMIT_SECONDS, CommitEvent, GROUP_KEYS, GROUP_WRITES, OpResult, REVISION_KEY, Reply, Shared,
    WriteOp, WriteOutcome,
};
use crate::error::{StoreError, StoreResult};
use crate::storage::changes::{DeleteReason, RecordBuilder, Stamp, count_expired, record_key};
use crate::storage::rules::{self, Effect, KeyMeta};
use crate::storage::{Expiry, Lease, LeaseId, Revoked};

/// The state of the engine's one writer.
pub(super) struct Writer {
    /// The last revision assigned.
    pub(super) revision: u64,
    pub(super) directory: KeyDirectory,
    /// Where the expirer's next round starts in the `deadlines` index: no
    /// entry below it is due, but a deleted entry stays in the LSM-tree as a
    /// tombstone until compaction, and a round that began at the start of
    /// the index would step over every one (a million keys expiring at
    /// once made each round slower than the last). A write that indexes a
    /// deadline below it moves it back.
    pub(super) expire_from: Vec<u8>,
}

/// Leases to store (`Some`) or remove (`None`).
type LeaseChanges = Vec<(LeaseId, Option<Lease>)>;

/// Where an index entry lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Index {
    Deadlines,
    LeaseKeys,
}

/// Everything one commit writes, in one fjall batch.
struct Group {
    first_revision: u64,
    /// The new record of each key written, or `None` for a delete. Two writes
    /// of one key must not share a fjall batch (they would get the same
    /// sequence number), so the last one wins here.
    pending: HashMap<Vec<u8>, Option<(RecordMeta, Vec<u8>)>>,
    /// Index entries to insert (with their value) or remove, last one winning.
    index: HashMap<(Index, Vec<u8>), Option<Vec<u8>>>,
    /// Lease records to store or remove.
    leases: LeaseChanges,
    /// The group's change record, committed with its data.
    record: RecordBuilder,
    /// Keys the group deletes for expiry, and for a lease's revocation.
    expired: usize,
    revoked: usize,
}

impl Group {
    fn new(first_revision: u64) -> Self {
        Group {
            first_revision,
            pending: HashMap::new(),
            index: HashMap::new(),
            leases: Vec::new(),
            record: RecordBuilder::new(),
            expired: 0,
            revoked: 0,
        }
    }

    /// Stores the key's new record (or its delete) and moves its index
    /// entries from `old` to `new`.
    fn set(&mut self, key: Vec<u8>, old: Option<RecordMeta>, new: Option<(RecordMeta, Vec<u8>)>) {
        let new_meta = new.as_ref().map(|(meta, _)| *meta);
        if let Some(deadline) = old.and_then(|m| m.expires_at_us) {
            self.index
                .insert((Index::Deadlines, deadline_key(deadline, &key)), None);
        }
        if let Some(lease) = old.and_then(|m| m.lease) {
            self.index
                .insert((Index::LeaseKeys, lease_key(lease, &key)), None);
        }
        if let Some(meta) = new_meta {
            if let Some(deadline) = meta.expires_at_us {
                self.index.insert(
                    (Index::Deadlines, deadline_key(deadline, &key)),
                    Some(meta.version.to_le_bytes().to_vec()),
                );
            }
            if let Some(lease) = meta.lease {
                self.index
                    .insert((Index::LeaseKeys, lease_key(lease, &key)), Some(Vec::new()));
            }
        }
        self.pending.insert(key, new);
    }

    /// Counts keys the group deletes for `reason` (a client's deletes are
    /// not counted).
    fn ended(&mut self, reason: DeleteReason, keys: usize) {
        match reason {
            DeleteReason::Expired => self.expired += keys,
            DeleteReason::LeaseRevoked => self.revoked += keys,
            DeleteReason::Deleted => {}
        }
    }

    /// The key's metadata as this group leaves it so far, if it wrote it.
    fn written(&self, key: &[u8]) -> Option<Option<RecordMeta>> {
        self.pending
            .get(key)
            .map(|write| write.as_ref().map(|(meta, _)| *meta))
    }
}

impl Writer {
    /// The key's current metadata: this group's write of it, else the
    /// directory's.
    fn current(
        &mut self,
        engine: &Engine,
        group: &Group,
        key: &[u8],
    ) -> StoreResult<Option<RecordMeta>> {
        match group.written(key) {
            Some(meta) => Ok(meta),
            None => self.directory.current(engine, key),
        }
    }

    /// Deletes `key`, whose metadata is `meta`, under a revision of its own.
    fn delete_alone(
        &mut self,
        group: &mut Group,
        key: &[u8],
        meta: RecordMeta,
        reason: DeleteReason,
    ) {
        self.revision += 1;
        group.record.revision(self.revision, 1);
        group.record.delete(key, meta.version, reason);
        group.set(key.to_vec(), Some(meta), None);
        group.ended(reason, 1);
    }

    /// The engine, unless writes are refused (then why, see [`refusal`]).
    fn engine_for(shared: &Shared) -> StoreResult<Arc<Engine>> {
        match (shared.failure(), shared.engine.load_full()) {
            (None, Some(engine)) if !shared.space.is_low() => Ok(engine),
            _ => Err(refusal(shared)),
        }
    }

    /// Commits `writes` as one group; the sync thread answers them after
    /// its sync (`hand_over`), or this thread does, now.
    pub(super) fn commit_group(
        &mut self,
        shared: &Shared,
        writes: Vec<(Vec<WriteOp>, Reply)>,
        hand_over: bool,
    ) {
        // Writes queued before the guard saw the disk nearly full are refused
        // here too, so that at most one group runs past the threshold.
        let Ok(engine) = Self::engine_for(shared) else {
            for (_, reply) in writes {
                let _ = reply.send((Err(refusal(shared)), Duration::ZERO));
            }
            return;
        };
        let now = shared.now_us();
        let mut group = Group::new(self.revision);
        let mut accepted = Vec::with_capacity(writes.len());
        let mut rejected = Vec::new();
        for (ops, reply) in writes {
            match self.apply(shared, &engine, ops, now, &mut group) {
                Ok(outcome @ WriteOutcome::Rejected { .. }) => rejected.push((reply, outcome)),
                Ok(outcome) => accepted.push((reply, outcome)),
                // Reading a current version failed (an I/O error, a corrupt
                // record), or a lease is gone: this write fails alone; it
                // added nothing to the group.
                Err(err) => {
                    let _ = reply.send((Err(err), Duration::ZERO));
                }
            }
        }
        if self.revision == group.first_revision {
            self.answer_rejected(shared, engine, rejected, hand_over);
            return;
        }
        // A condition was judged against this group's writes and the
        // groups before it: its answer waits for the sync that covers them.
        accepted.extend(rejected);
        if let Ok(leases) = self.commit(shared, engine, group, accepted) {
            // A group of writes ends only leases that have lapsed, which
            // readers already take for gone: they may leave the map before
            // the sync.
            shared.leases.apply(leases);
            shared.lane.finish(shared, hand_over);
        }
    }

    /// Answers writes whose conditions failed, in a group that wrote
    /// nothing. A condition is judged against every group committed, synced
    /// or not; its answer (and a retry's read, which sees only synced
    /// groups) must not come before the sync of the groups it saw, or a
    /// client would be told of a version that a crash can still take away
    /// and a read-modify-write loop would read the old one again and again.
    /// So unless readers already see the last group committed, the answers
    /// go through the lane with a snapshot of the engine as it is (which
    /// holds no write of its own), after the groups queued before them.
    fn answer_rejected(
        &self,
        shared: &Shared,
        engine: Arc<Engine>,
        rejected: Vec<(Reply, WriteOutcome)>,
        hand_over: bool,
    ) {
        if rejected.is_empty() {
            return;
        }
        let published = shared.view.load().as_ref().map(|view| view.revision);
        if published == Some(self.revision) {
            for (reply, outcome) in rejected {
                let _ = reply.send((Ok(outcome), Duration::ZERO));
            }
            return;
        }
        shared.lane.push(Written {
            view: View::now(engine, self.revision),
            answers: rejected,
            record: None,
            started: Instant::now(),
        });
        shared.lane.finish(shared, hand_over);
    }

    /// Commits a group in one fjall batch, updates the directory, and queues
    /// the group for its sync with the answers it owes. Gives the group's
    /// lease changes, for the caller to make once readers may see them. If
    /// the commit fails, the answers are that failure.
    fn commit(
        &mut self,
        shared: &Shared,
        engine: Arc<Engine>,
        group: Group,
        answers: Vec<(Reply, WriteOutcome)>,
    ) -> Result<LeaseChanges, Failure> {
        let Group {
            first_revision,
            pending,
            index,
            leases,
            record,
            expired,
            revoked,
        } = group;
        let keys_written = pending.len();
        let writes = answers.len();
        let record = record.finish(self.revision, shared.now_us());
        let mut bytes_written = record.len();
        let mut batch = fjall::OwnedWriteBatch::with_capacity(
            engine.db.clone(),
            keys_written + index.len() + leases.len() + 2,
        )
        // To the operating system, not to the disk: the sync thread syncs it
        // (see `syncer`).
        .durability(Some(PersistMode::Buffer));
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
        for ((space, key), value) in &index {
            let keyspace = match space {
                Index::Deadlines => &engine.deadlines,
                Index::LeaseKeys => &engine.lease_keys,
            };
            if *space == Index::Deadlines && value.is_some() && *key < self.expire_from {
                self.expire_from.clone_from(key);
            }
            bytes_written += key.len();
            match value {
                Some(value) => batch.insert(keyspace, key.as_slice(), value.as_slice()),
                None => batch.remove(keyspace, key.as_slice()),
            }
        }
        for (id, lease) in &leases {
            match lease {
                Some(lease) => batch.insert(&engine.leases, id.to_be_bytes(), encode_lease(lease)),
                None => batch.remove(&engine.leases, id.to_be_bytes()),
            }
        }
        batch.insert(&engine.meta, REVISION_KEY, self.revision.to_le_bytes());
        if self.revision > first_revision {
            batch.insert(
                &engine.changes,
                record_key(first_revision + 1),
                record.as_slice(),
            );
        }
        let start = Instant::now();
        let committed = batch.commit();
        metrics::histogram!(COMMIT_SECONDS).record(start.elapsed().as_secs_f64());
        metrics::histogram!(GROUP_WRITES).record(writes as f64);
        metrics::histogram!(GROUP_KEYS).record(keys_written as f64);
        if let Err(err) = committed {
            self.revision = first_revision;
            // The directory and the leases hold no write of this group: they
            // are updated below, after a commit that succeeded.
            let failure = shared.engine_failed("commit (journal write)", &err);
            for (reply, _) in answers {
                let _ = reply.send((Err(failure.error()), Duration::ZERO));
            }
            return Err(failure);
        }
        shared.space.committed(bytes_written as u64);
        for (reason, keys) in [
            (DeleteReason::Expired, expired),
            (DeleteReason::LeaseRevoked, revoked),
        ] {
            if keys > 0 {
                count_expired(reason, keys);
            }
        }
        for (key, write) in pending {
            self.directory.set(key, write.map(|(meta, _)| meta));
        }
        shared
            .committed_revision
            .store(self.revision, Ordering::Release);
        shared.notify(CommitEvent::Committed {
            last_revision: self.revision,
        });
        shared.lane.push(Written {
            view: View::now(engine, self.revision),
            answers,
            record: (self.revision > first_revision).then_some(record),
            started: start,
        });
        Ok(leases)
    }

    /// Checks one write's conditions and, when they hold, adds its ops to the
    /// group under the next revision. Keys it finds past their deadline are
    /// deleted first, each under a revision of its own, whatever the outcome.
    fn apply(
        &mut self,
        shared: &Shared,
        engine: &Engine,
        ops: Vec<WriteOp>,
        now: i64,
        group: &mut Group,
    ) -> StoreResult<WriteOutcome> {
        // Before anything is added to the group, so that a write naming a
        // lease that is gone adds nothing.
        let mut lease_deadlines = HashMap::new();
        for op in &ops {
            if let WriteOp::Put {
                expiry: Expiry::Lease(id),
                ..
            } = op
            {
                let lease = shared
                    .leases
                    .live(*id, now)
                    .ok_or(StoreError::LeaseNotFound(*id))?;
                lease_deadlines.insert(*id, lease.expires_at_us);
            }
        }
        let mut current = Vec::with_capacity(ops.len());
        for op in &ops {
            current.push(self.current(engine, group, op.key())?);
        }
        for (op, meta) in ops.iter().zip(current.iter_mut()) {
            match meta.filter(|m| !shared.alive(m, now)) {
                None => continue,
                // A key on a lapsed lease: the lease ends here, all its keys
                // in one revision, as the expirer would have ended it.
                Some(RecordMeta {
                    expires_at_us: None,
                    lease: Some(id),
                    ..
                }) if !group.leases.iter().any(|(ended, _)| *ended == id) => {
                    self.end_lease_in(engine, group, id, DeleteReason::Expired)?;
                }
                Some(RecordMeta {
                    expires_at_us: None,
                    lease: Some(_),
                    ..
                }) => {}
                Some(expired) => self.delete_alone(group, op.key(), expired, DeleteReason::Expired),
            }
            *meta = None;
        }
        let live: Vec<Option<KeyMeta>> = current
            .iter()
            .map(|meta| meta.map(|m| m.key_meta()))
            .collect();
        let effects = match rules::decide(&ops, &live, now) {
            Ok(effects) => effects,
            Err(failed) => return Ok(WriteOutcome::Rejected { failed }),
        };

        self.revision += 1;
        let revision = self.revision;
        group
            .record
            .revision(revision, effects.iter().filter(|e| e.changes()).count());
        let mut results = Vec::with_capacity(ops.len());
        for ((op, effect), old) in ops.into_iter().zip(effects).zip(current) {
            let result = effect.result(|id| {
                lease_deadlines
                    .get(&id)
                    .copied()
                    .or_else(|| shared.leases.deadline(id))
            });
            match (op, effect, &result) {
                (
                    WriteOp::Put { key, value, .. },
                    Effect::Put { meta, .. },
                    OpResult::Put { expires_at_us, .. },
                ) => {
                    group.record.put(
                        &key,
                        &value,
                        &Stamp {
                            version: meta.version,
                            created_at_us: meta.created_at_us,
                            updated_at_us: meta.updated_at_us,
                            expires_at_us: *expires_at_us,
                            lease: meta.lease,
                        },
                    );
                    let new = RecordMeta::new(meta, revision);
                    let stored = codec::encode(&new, &value);
                    group.set(key, old, Some((new, stored)));
                }
                (
                    WriteOp::Delete { key, .. },
                    Effect::Delete {
                        removed: Some(removed),
                    },
                    _,
                ) => {
                    group
                        .record
                        .delete(&key, removed.version, DeleteReason::Deleted);
                    group.set(key, old, None);
                }
                _ => {}
            }
            results.push(result);
        }
        Ok(WriteOutcome::Applied { revision, results })
    }

    /// Commits a group that answers no write (a lease's, the expirer's), and
    /// syncs and publishes it before returning.
    fn commit_and_publish(
        &mut self,
        shared: &Shared,
        engine: Arc<Engine>,
        group: Group,
    ) -> StoreResult<()> {
        let leases = self
            .commit(shared, engine, group, Vec::new())
            .map_err(|failure| failure.error())?;
        shared.lane.drain(shared);
        // The drain's sync may have failed; if not, the lease changes are
        // durable and may be seen.
        match shared.failure() {
            Some(failure) => Err(failure.error()),
            None => {
                shared.leases.apply(leases);
                Ok(())
            }
        }
    }

    /// Stores a new or renewed lease (no revision: a lease is not a key).
    pub(super) fn store_lease(&mut self, shared: &Shared, lease: Lease) -> StoreResult<Lease> {
        let engine = Self::engine_for(shared)?;
        let mut group = Group::new(self.revision);
        group.leases.push((lease.id, Some(lease.clone())));
        self.commit_and_publish(shared, engine, group)?;
        Ok(lease)
    }

    /// Ends a lease: deletes its keys in one revision with `reason`, and the
    /// lease. `None` when the lease does not exist.
    pub(super) fn end_lease(
        &mut self,
        shared: &Shared,
        id: LeaseId,
        reason: DeleteReason,
    ) -> StoreResult<Option<Revoked>> {
        if !shared.leases.contains(id) {
            return Ok(None);
        }
        let engine = Self::engine_for(shared)?;
        let mut group = Group::new(self.revision);
        let keys = self.end_lease_in(&engine, &mut group, id, reason)?;
        self.commit_and_publish(shared, engine, group)?;
        Ok(Some(Revoked {
            revision: self.revision,
            keys,
        }))
    }

    /// Adds the end of a lease to `group`: its keys deleted under one
    /// revision (none when it has no keys), and the lease. Gives the keys.
    fn end_lease_in(
        &mut self,
        engine: &Engine,
        group: &mut Group,
        id: LeaseId,
        reason: DeleteReason,
    ) -> StoreResult<Vec<Vec<u8>>> {
        let mut deleted = Vec::new();
        for key in lease_keys(engine, id)? {
            match self.current(engine, group, &key)? {
                Some(meta) if meta.lease == Some(id) => deleted.push((key, meta)),
                // An index entry the key has moved on from.
                _ => {
                    group
                        .index
                        .insert((Index::LeaseKeys, lease_key(id, &key)), None);
                }
            }
        }
        if !deleted.is_empty() {
            self.revision += 1;
            group.record.revision(self.revision, deleted.len());
        }
        group.ended(reason, deleted.len());
        let mut keys = Vec::with_capacity(deleted.len());
        for (key, meta) in deleted {
            group.record.delete(&key, meta.version, reason);
            keys.push(key.clone());
            group.set(key, Some(meta), None);
        }
        group.leases.push((id, None));
        Ok(keys)
    }

    /// One round of the expirer: deletes up to [`ROUND_KEYS`] keys past their
    /// deadline, each under a revision of its own, and ends expired leases.
    /// Tells whether keys were left for another round.
    pub(super) fn expire_round(&mut self, shared: &Shared) -> StoreResult<bool> {
        let now = shared.now_us();
        for id in shared.leases.due(now) {
            self.end_lease(shared, id, DeleteReason::Expired)?;
        }
        let engine = Self::engine_for(shared)?;
        let mut group = Group::new(self.revision);
        let mut more = false;
        let snapshot = engine.db.snapshot();
        let due = fjall::Readable::range(
            &snapshot,
            &engine.deadlines,
            self.expire_from.clone()..due_end(now).to_vec(),
        );
        let mut last = None;
        for (taken, item) in due.enumerate() {
            if taken == ROUND_KEYS {
                more = true;
                break;
            }
            let (raw, version) = item.into_inner()?;
            last = Some(raw.to_vec());
            let (deadline, key) = split_deadline_key(&raw)?;
            match self.current(&engine, &group, key)? {
                Some(meta)
                    if meta.expires_at_us == Some(deadline)
                        && *version == meta.version.to_le_bytes() =>
                {
                    self.delete_alone(&mut group, key, meta, DeleteReason::Expired);
                }
                // The key was rewritten or deleted since: the entry is stale.
                _ => {
                    group.index.insert((Index::Deadlines, raw.to_vec()), None);
                }
            }
        }
        if group.index.is_empty() && group.pending.is_empty() {
            return Ok(more);
        }
        self.commit_and_publish(shared, engine, group)?;
        // Everything up to `last` is handled: the next round starts after it
        // (the smallest key above it is it with a zero byte added).
        if let Some(mut after) = last {
            after.push(0);
            self.expire_from = after;
        }
        Ok(more)
    }
}

/// Why writes are refused: the failure kept, a disk nearly full, or the
/// engine being reopened.
fn refusal(shared: &Shared) -> StoreError {
    match shared.failure() {
        Some(failure) => failure.error(),
        None if shared.space.is_low() => StoreError::InsufficientStorage(shared.space.refusal()),
        None => StoreError::Unavailable("the engine is being reopened".into()),
    }
}
