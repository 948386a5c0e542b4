//! What the engine does once writes have gone quiet: it flushes its
//! memtables, and hands readers a snapshot of the engine as it is now.
//!
//! A point read that misses the read cache searches fjall's memtable first:
//! a skiplist of up to 64 MiB holding every version written since the last
//! flush, which fjall makes only when the memtable is full. After a burst of
//! writes (a bulk load, say) a store may serve reads for hours from a
//! memtable that each of them searches, mostly for keys it does not hold:
//! with 5,000,000 keys loaded, that search was 13% of the server's CPU under
//! uniform GETs (docs/performance.md). Once no write has been committed for
//! a while, a memtable worth the flush goes to a table, where a read finds a
//! key through the table's filter and index instead.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

use fjall::AbstractTree;

use super::Shared;

/// A memtable smaller than this is left alone: searching it costs little,
/// and each flush adds a table for compaction to merge.
const MIN_FLUSH_BYTES: u64 = 1 << 20;

/// Memtables handed to fjall's flush because writes had gone quiet.
pub(crate) const QUIET_FLUSHES: &str = "kvstore_quiet_flushes_total";

/// How long writes must have stopped before the engine counts as quiet,
/// unless configured (`--flush-when-quiet-ms`).
pub(super) const DEFAULT_QUIET: Duration = Duration::from_secs(2);

/// Every `quiet`, if no write was committed since the last look: flushes
/// the memtables of at least [`MIN_FLUSH_BYTES`] when `flush` is set, and
/// gives readers the engine as it is now.
///
/// Readers read at the snapshot of the last synced group, and fjall picks
/// the memtables and tables a read searches by the snapshot's sequence
/// number. A flush or a compaction that ends after the snapshot was taken
/// is numbered after it, so until the next write, reads went on searching
/// the memtable just flushed (14% of the server's samples under uniform
/// GETs at 5,000,000 keys, as much as before the flush), and the snapshot
/// held back the cleanup of the tables a compaction replaced. A quiet spell
/// has nothing in the lane, so a new snapshot costs one look at it.
pub(super) fn run_quiet(shared: &Shared, quiet: Duration, flush: bool, stop: &Receiver<()>) {
    let mut seen = shared.committed_revision.load(Ordering::Acquire);
    loop {
        match stop.recv_timeout(quiet) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
        let now = shared.committed_revision.load(Ordering::Acquire);
        if std::mem::replace(&mut seen, now) != now || shared.failure().is_some() {
            continue;
        }
        // A flush writes a table: not on a disk the guard keeps for
        // deletes.
        if flush && !shared.space.is_low() {
            flush_memtables(shared);
        }
        // The flush just asked for ends in fjall's worker, after this: the
        // next quiet look hands it to readers.
        shared.republish_view();
    }
}

/// Hands every keyspace's memtable of at least [`MIN_FLUSH_BYTES`] to
/// fjall's flush, counting each as it goes: fjall's worker may write the
/// first one's table before the next is handed over.
///
/// `rotate_memtable` is public in fjall 3.1.13 but left out of its docs;
/// fjall's version is pinned, and `tests/it/quiet_flush.rs` fails if a
/// later one stops flushing here.
fn flush_memtables(shared: &Shared) {
    let Some(engine) = shared.engine.load_full() else {
        return;
    };
    for keyspace in engine.keyspaces() {
        if keyspace.tree.active_memtable().size() < MIN_FLUSH_BYTES {
            continue;
        }
        match keyspace.rotate_memtable() {
            Ok(true) => metrics::counter!(QUIET_FLUSHES).increment(1),
            Ok(false) => {}
            // fjall flushes on its own once a memtable is full; a later
            // quiet spell tries again.
            Err(err) => {
                tracing::warn!(error = %err, "flushing a memtable after writes went quiet failed");
                return;
            }
        }
    }
}
