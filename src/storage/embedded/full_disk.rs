//! Failures that refuse writes, and the one the engine recovers from by
//! itself: a full disk, after which the engine is reopened in the process.

use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use fjall::PersistMode;

use super::engine::Engine;
use super::reads::View;
use super::{Shared, space};
use crate::error::StoreError;

/// Why writes are refused after a failed commit or sync.
#[derive(Clone)]
pub(super) enum Failure {
    /// The engine ran out of space; it is reopened once space is back.
    OutOfSpace(String),
    /// Anything else, a failed sync above all: the engine's state is unknown
    /// until a restart recovers it from the journal.
    Fatal(String),
}

impl Failure {
    pub(super) fn error(&self) -> StoreError {
        match self {
            Failure::OutOfSpace(why) => StoreError::InsufficientStorage(why.clone()),
            Failure::Fatal(why) => StoreError::Unavailable(why.clone()),
        }
    }
}

/// Whether a failed commit means the engine ran out of space, which a reopen
/// recovers from once space is back. `ENOSPC` (or `EDQUOT`) does. So does a
/// poisoned engine while the disk has no room: fjall's background flushes
/// and compactions poison it when they run out of space, without telling the
/// writer why. Any other I/O error, `EIO` from a sync above all, does not.
pub(super) fn ran_out_of_space(err: &fjall::Error, disk_has_room: bool) -> bool {
    match err {
        fjall::Error::Io(io) => space::is_out_of_space(io),
        fjall::Error::Poisoned => !disk_has_room,
        _ => false,
    }
}

/// Reads the free space every poll interval, and reopens the engine once
/// space is back after it ran out.
pub(super) fn run_watcher(shared: &Shared, stop: &std::sync::mpsc::Receiver<()>) {
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
        stop.recv_timeout(space::POLL_INTERVAL)
    {
        shared.space.check();
        if shared.out_of_space() && shared.space.has_room() {
            reopen_after_full_disk(shared);
        }
    }
}

/// How long a reopen waits for the reads still using the old engine.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);

/// Replaces an engine that fjall poisoned for lack of space with a fresh one
/// on the same directory: fjall keeps a poisoned database poisoned, and its
/// lock file lets the new one open only once every handle of the old one is
/// gone.
///
/// With the writer held, nothing commits meanwhile. Opening replays the
/// journal as after a crash: the failed group's torn record is cut off. Every
/// acknowledged write must be there and nothing else, so the revision read
/// back must be the last one committed: a higher one means the failed
/// group's record was complete, its fsync failed, and the page cache may hold
/// what the disk does not (writes then stay refused until a restart).
fn reopen_after_full_disk(shared: &Shared) {
    let mut writer = shared.lock_writer();
    if !shared.out_of_space() || shared.closed.load(Ordering::Acquire) {
        return;
    }
    tracing::info!(data_dir = %shared.path.display(), free_bytes = shared.space.free(),
        "space is back: reopening the engine that ran out of space");
    // Groups committed before the failure are synced and answered first (or
    // refused, if a sync failed), which lets go of the old engine's
    // snapshots; so does the readers' view.
    shared.lane.drain_through_own_handle(shared);
    shared.lane.reopened();
    shared.view.store(None);
    if let Some(mut old) = shared.engine.swap(None) {
        // Reads that loaded the old engine finish within their request time.
        let deadline = Instant::now() + RELEASE_TIMEOUT;
        loop {
            match Arc::try_unwrap(old) {
                // Dropping it stops fjall's workers and releases its lock.
                Ok(engine) => {
                    drop(engine);
                    break;
                }
                Err(still_used) if Instant::now() < deadline => {
                    old = still_used;
                    std::thread::sleep(Duration::from_millis(1));
                }
                // Readers get the engine back as it is: after a failed sync it
                // may show groups refused since, whose writers were told it
                // failed.
                Err(still_used) => {
                    tracing::warn!(
                        "reads kept the old engine for {RELEASE_TIMEOUT:?}; reopening it later"
                    );
                    shared.view.store(Some(Arc::new(View::now(
                        Arc::clone(&still_used),
                        shared.committed_revision.load(Ordering::Acquire),
                    ))));
                    shared.engine.store(Some(still_used));
                    return;
                }
            }
        }
    }
    let (engine, revision) = match Engine::open(&shared.path, shared.block_cache_bytes) {
        Ok(opened) => opened,
        Err(err) => {
            // Out of space again: the next poll with room tries again. Reads
            // answer 503 until then, as there is no engine to read.
            shared.space.check();
            if !shared.space.has_room() {
                tracing::warn!(error = %err, "reopening the engine failed: the disk is full again");
            } else {
                shared.fail("reopening the engine after a full disk", err);
            }
            return;
        }
    };
    let committed = shared.committed_revision.load(Ordering::Acquire);
    // Buffered mode: the writes acknowledged since the last background sync
    // are in the page cache (fjall wrote them to the journal before the disk
    // filled); they are synced now.
    let synced = engine.db.persist(PersistMode::SyncData);
    let engine = Arc::new(engine);
    shared
        .view
        .store(Some(Arc::new(View::now(Arc::clone(&engine), revision))));
    shared.engine.store(Some(engine));
    if let Err(err) = synced {
        shared.fail("syncing the engine reopened after a full disk", err);
        return;
    }
    if revision != committed {
        shared.fail(
            "reopening the engine after a full disk",
            format_args!(
                "it holds revision {revision}, not {committed}, the last one committed: a write \
                 that failed was written whole and its sync failed"
            ),
        );
        return;
    }
    writer.revision = revision;
    // It only ever holds committed writes, which the check above found in the
    // reopened engine, so it is still exact; emptied all the same, so that
    // the first writes after a reopen read their versions from the engine
    // they are written to, at the cost of one read per key.
    writer.directory.clear();
    let mut failure = shared
        .failure
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if matches!(*failure, Some(Failure::OutOfSpace(_))) {
        *failure = None;
    }
    drop(failure);
    tracing::info!(data_dir = %shared.path.display(), revision, free_bytes = shared.space.free(),
        "engine reopened after the disk filled up: accepting writes again");
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::ran_out_of_space;

    #[test]
    fn only_a_full_disk_is_recoverable() {
        let io = |code| fjall::Error::Io(io::Error::from_raw_os_error(code));
        assert!(ran_out_of_space(&io(libc::ENOSPC), true));
        assert!(ran_out_of_space(&io(libc::EDQUOT), true));
        // A failed fsync keeps writes refused until a restart, whatever the
        // free space.
        assert!(!ran_out_of_space(&io(libc::EIO), false));
        assert!(!ran_out_of_space(&fjall::Error::Poisoned, true));
        assert!(ran_out_of_space(&fjall::Error::Poisoned, false));
        assert!(!ran_out_of_space(&fjall::Error::Unrecoverable, false));
    }
}
