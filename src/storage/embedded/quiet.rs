//! Flushing the memtables once writes have gone quiet.
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

use super::Shared;

/// A memtable smaller than this is left alone: searching it costs little,
/// and each flush adds a table for compaction to merge.
const MIN_FLUSH_BYTES: u64 = 1 << 20;

/// Memtables handed to fjall's flush because writes had gone quiet.
pub(crate) const QUIET_FLUSHES: &str = "kvstore_quiet_flushes_total";

/// Every `quiet`, flushes the memtables of at least [`MIN_FLUSH_BYTES`] if
/// no write was committed since the last look.
pub(super) fn run_flusher(shared: &Shared, quiet: Duration, stop: &Receiver<()>) {
    let mut seen = shared.committed_revision.load(Ordering::Acquire);
    loop {
        match stop.recv_timeout(quiet) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
        let now = shared.committed_revision.load(Ordering::Acquire);
        if std::mem::replace(&mut seen, now) != now {
            continue;
        }
        // A flush writes a table: not on a disk the guard keeps for
        // deletes, nor on an engine that has failed.
        if shared.failure().is_some() || shared.space.is_low() {
            continue;
        }
        let Some(engine) = shared.engine.load_full() else {
            continue;
        };
        match engine.flush_memtables(MIN_FLUSH_BYTES) {
            Ok(0) => {}
            Ok(flushed) => metrics::counter!(QUIET_FLUSHES).increment(flushed as u64),
            // fjall flushes on its own once a memtable is full; a later
            // quiet spell tries again.
            Err(err) => {
                tracing::warn!(error = %err, "flushing a memtable after writes went quiet failed")
            }
        }
    }
}
