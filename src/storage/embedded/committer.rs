//! The committer thread: it takes every write queued while another commit
//! ran, as one group, once the writer is free.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use fjall::PersistMode;
use tokio::sync::mpsc;

use super::full_disk::Failure;
use super::{Job, MAX_GROUP_BYTES, MAX_GROUP_KEYS, Shared, WriteOp};
use crate::error::{StoreError, StoreResult};

/// The thread that commits the writes that queued while another commit ran.
pub(super) struct Committer {
    pub(super) shared: Arc<Shared>,
    /// Dropped on close, which stops the background threads (the
    /// buffered-mode syncer, the watcher, the trimmer, the expirer, the
    /// flusher; the sync thread stops when the lane closes).
    pub(super) stops: Vec<std::sync::mpsc::Sender<()>>,
}

impl Committer {
    pub(super) fn run(mut self, mut queue: mpsc::Receiver<Job>) {
        let shared = Arc::clone(&self.shared);
        let mut carried: Option<Job> = None;
        loop {
            let Some(first) = carried.take().or_else(|| queue.blocking_recv()) else {
                break;
            };
            // The group is gathered only once the writer is ours: writes that
            // queue while a write commits itself join this group.
            let mut writer = shared.lock_writer();
            let mut writes = Vec::new();
            let (mut ops, mut bytes) = (0usize, 0usize);
            let mut close = None;
            let mut next = Some(first);
            while let Some(job) = next.take() {
                match job {
                    Job::Close { reply } => {
                        close = Some(reply);
                        break;
                    }
                    Job::Writes(batch) => {
                        let count: usize = batch.iter().map(|(w, _)| w.len()).sum();
                        let weight: usize = batch
                            .iter()
                            .flat_map(|(w, _)| w.iter())
                            .map(WriteOp::weight)
                            .sum();
                        // A job's writes stay in one group (a client's
                        // pipeline shares one sync), so only whole jobs are
                        // carried to the next group.
                        if !writes.is_empty()
                            && (ops + count > MAX_GROUP_KEYS || bytes + weight > MAX_GROUP_BYTES)
                        {
                            carried = Some(Job::Writes(batch));
                            break;
                        }
                        ops += count;
                        bytes += weight;
                        writes.extend(batch);
                        shared.waiting.fetch_sub(1, Ordering::AcqRel);
                    }
                }
                next = queue.try_recv().ok();
            }
            if !writes.is_empty() {
                writer.commit_group(&shared, writes, true);
            }
            if let Some(reply) = close {
                let _ = reply.send(self.close());
                drop(writer);
                queue.close();
                // Writes that were already queued behind the close are refused.
                while let Ok(job) = queue.try_recv() {
                    if let Job::Writes(batch) = job {
                        for (_, reply) in batch {
                            let _ = reply.send((
                                Err(StoreError::Unavailable("the store is closed".into())),
                                Duration::ZERO,
                            ));
                        }
                    }
                }
                break;
            }
        }
    }

    /// Called with the writer held, so no write commits itself after this.
    fn close(&mut self) -> StoreResult<()> {
        self.shared.closed.store(true, Ordering::Release);
        // The groups committed before the close are synced and answered
        // before the sync thread stops.
        self.shared.lane.drain(&self.shared);
        self.shared.lane.close();
        self.stops.clear();
        // After a failed sync, a sync that "succeeds" may have lost pages
        // (see `syncer`): none is tried.
        if let Some(fatal @ Failure::Fatal(_)) = self.shared.failure() {
            return Err(fatal.error());
        }
        match self.shared.engine.load().as_deref() {
            Some(engine) => Ok(engine.db.persist(PersistMode::SyncAll)?),
            None => Err(StoreError::Unavailable(
                "the engine is being reopened after its disk filled up".into(),
            )),
        }
    }
}
