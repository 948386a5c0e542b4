//! Buffered mode's background sync.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use fjall::PersistMode;

use super::full_disk::Failure;
use super::{CommitEvent, SYNC_SECONDS, Shared};

/// Buffered mode: sync whatever was committed since the last sync, every interval.
///
/// `synced` is the revision recovered at open, which is on disk. It must not be
/// read when the thread starts: a write committed before the thread first ran
/// would then count as synced and wait for the next write to be synced.
pub(super) fn run_syncer(
    shared: &Shared,
    interval: Duration,
    stop: &std::sync::mpsc::Receiver<()>,
    mut synced: u64,
) {
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(interval) {
        let committed = shared.committed_revision.load(Ordering::Acquire);
        if committed == synced {
            continue;
        }
        // A poisoned engine syncs nothing: the writes committed since the
        // last sync are synced when the engine is reopened after a full disk.
        let loaded = shared.engine.load();
        let Some(engine) = loaded.as_deref().filter(|_| !shared.out_of_space()) else {
            continue;
        };
        let start = Instant::now();
        let persisted = engine.db.persist(PersistMode::SyncData);
        metrics::histogram!(SYNC_SECONDS).record(start.elapsed().as_secs_f64());
        match persisted {
            Ok(()) => {
                synced = committed;
                shared.notify(CommitEvent::Synced { revision: synced });
            }
            // Poisoned by a commit or a background flush (maybe out of
            // space), not by this sync.
            Err(err @ fjall::Error::Poisoned) => {
                if let Failure::Fatal(_) = shared.engine_failed("background sync", &err) {
                    return;
                }
            }
            // A failed fsync, even for lack of space, may have dropped
            // acknowledged writes from the page cache: never recoverable here.
            Err(err) => {
                shared.fail("background sync", err);
                return;
            }
        }
    }
}
