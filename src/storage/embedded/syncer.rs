//! Syncs: the sync that answers a group of writes, run while the next group
//! is written, and buffered mode's background sync.
//!
//! fjall syncs its journal while holding the journal's lock, which the next
//! commit needs: a group committed with its sync leaves the writer idle for
//! the whole fdatasync. So the writer commits a group to the journal
//! without a sync (fjall writes it to the operating system and makes it
//! visible in its memtables), takes a snapshot, and hands both to the
//! [`Lane`]. The sync thread then fdatasyncs the journal through a handle of
//! its own, outside fjall's lock, while the writer commits the next group;
//! only then does it hand the snapshot to readers (see [`View`]), answer the
//! group's writes and give its changes to watchers. One sync covers every
//! group written before it started.
//!
//! A write alone, a lease and the expirer do not hand over: they drain the
//! lane themselves, with the writer held, which costs no thread wake-up.
//! Drains take their turn, so groups are published in the order they were
//! committed.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use fjall::PersistMode;

use super::full_disk::Failure;
use super::reads::View;
use super::{CommitEvent, Reply, SYNC_SECONDS, Shared, WriteOutcome};

/// A group committed to the journal, whose answers and changes wait for the
/// sync that covers it.
pub(super) struct Written {
    /// The engine just after the group.
    pub(super) view: View,
    pub(super) answers: Vec<(Reply, WriteOutcome)>,
    /// The group's change record, when it took revisions.
    pub(super) record: Option<Vec<u8>>,
    /// When its commit started: its writes are told how long it took.
    pub(super) started: Instant,
}

/// Groups committed and not yet published, in commit order.
#[derive(Default)]
struct Queue {
    written: Vec<Written>,
    closed: bool,
    /// The sync thread waits for a group: a hand-over wakes it. While it
    /// syncs, groups are queued without a wake-up (a futex call each).
    idle: bool,
}

/// Where the writer leaves committed groups for the sync that publishes them.
pub(super) struct Lane {
    /// Whether a group waits for an fdatasync (`fsync` durability) or is
    /// published at once (`buffered`).
    sync: bool,
    queue: Mutex<Queue>,
    /// Wakes the sync thread when a group is queued or the lane closes.
    queued: Condvar,
    /// Held by a drain from taking its groups to publishing them, so that
    /// drains publish in commit order.
    turn: Mutex<ActiveJournal>,
}

impl Lane {
    pub(super) fn new(sync: bool) -> Self {
        Lane {
            sync,
            queue: Mutex::default(),
            queued: Condvar::new(),
            turn: Mutex::new(ActiveJournal::default()),
        }
    }

    /// Queues a group the writer has just committed.
    pub(super) fn push(&self, written: Written) {
        self.lock_queue().written.push(written);
    }

    /// After a group was queued: the sync thread syncs and publishes it
    /// (`hand_over`), or the caller does, now.
    pub(super) fn finish(&self, shared: &Shared, hand_over: bool) {
        if !(hand_over && self.sync) {
            self.drain(shared);
        } else if self.lock_queue().idle {
            self.queued.notify_one();
        }
    }

    /// Syncs and publishes every group queued (see [`Lane::drain_by`]), for
    /// a holder of the writer: no commit can wait for fjall's journal lock
    /// meanwhile, so fjall's own sync serves, with no lookup of the journal.
    pub(super) fn drain(&self, shared: &Shared) {
        self.drain_by(shared, SyncThrough::Fjall);
    }

    /// Syncs and publishes every group queued through the journal handle of
    /// the lane's own, which works whatever state fjall is in: for the sync
    /// thread, and for the reopen after a full disk, when fjall has
    /// poisoned itself and refuses to sync.
    pub(super) fn drain_through_own_handle(&self, shared: &Shared) {
        self.drain_by(shared, SyncThrough::OwnHandle);
    }

    /// Syncs (in `fsync` durability) and publishes every group queued: the
    /// readers' view moves to the last one, and the writes are answered and
    /// their changes given to watchers, group by group. Once a sync has
    /// failed, nothing is synced until the engine is reopened, and the
    /// writes are refused: the failed sync may have lost pages that a later
    /// one would claim to cover.
    fn drain_by(&self, shared: &Shared, through: SyncThrough) {
        let mut journal = self.turn.lock().unwrap_or_else(PoisonError::into_inner);
        let mut written = std::mem::take(&mut self.lock_queue().written);
        let Some(last) = written.pop() else {
            return;
        };
        let revision = last.view.revision;
        let synced = match &journal.failed {
            Some(failure) => Err(failure.clone()),
            None if self.sync => {
                let start = Instant::now();
                let synced = match through {
                    SyncThrough::OwnHandle => {
                        journal.sync(&shared.path).map_err(fjall::Error::from)
                    }
                    SyncThrough::Fjall => match shared.engine.load().as_deref() {
                        Some(engine) => engine.db.persist(PersistMode::SyncData),
                        None => Err(fjall::Error::Io(io::Error::other(
                            "the engine is being reopened",
                        ))),
                    },
                };
                metrics::histogram!(SYNC_SECONDS).record(start.elapsed().as_secs_f64());
                synced.map_err(|err| {
                    let failure = shared.engine_failed("journal sync", &err);
                    journal.failed = Some(failure.clone());
                    failure
                })
            }
            None => Ok(()),
        };
        if let Err(failure) = synced {
            for group in written.into_iter().chain([last]) {
                for (reply, _) in group.answers {
                    let _ = reply.send((Err(failure.error()), Duration::ZERO));
                }
            }
            return;
        }
        if self.sync {
            shared.notify(CommitEvent::Synced { revision });
        }
        // The last group's snapshot holds every group before it: readers get
        // it once, before any of them is answered.
        let Written {
            view,
            answers,
            record,
            started,
        } = last;
        shared.view.store(Some(Arc::new(view)));
        for group in written {
            publish(
                shared,
                group.view.revision,
                group.answers,
                group.record,
                group.started,
            );
        }
        publish(shared, revision, answers, record, started);
    }

    /// The sync thread: drains the lane whenever a group is queued, until
    /// the lane is closed and empty.
    pub(super) fn run(&self, shared: &Shared) {
        loop {
            {
                let mut queue = self.lock_queue();
                while queue.written.is_empty() && !queue.closed {
                    queue.idle = true;
                    queue = self
                        .queued
                        .wait(queue)
                        .unwrap_or_else(PoisonError::into_inner);
                }
                queue.idle = false;
                if queue.written.is_empty() {
                    return;
                }
            }
            self.drain_through_own_handle(shared);
        }
    }

    /// Stops the sync thread once the lane is empty.
    pub(super) fn close(&self) {
        self.lock_queue().closed = true;
        self.queued.notify_one();
    }

    /// Gives readers the engine as it is now, for a holder of the writer
    /// (which gives `revision`, the last one committed; see
    /// `Shared::republish_view`): every group queued is synced and published
    /// first. Not after a failed sync, whose groups are in the engine but
    /// refused.
    pub(super) fn republish(&self, shared: &Shared, revision: u64) {
        self.drain(shared);
        let journal = self.turn.lock().unwrap_or_else(PoisonError::into_inner);
        if let (None, Some(engine)) = (&journal.failed, shared.engine.load_full()) {
            shared
                .view
                .store(Some(Arc::new(View::now(engine, revision))));
        }
    }

    /// Forgets the journal's handle and a failed sync: the engine is being
    /// reopened (and checked), and its journal may be a new file.
    pub(super) fn reopened(&self) {
        *self.turn.lock().unwrap_or_else(PoisonError::into_inner) = ActiveJournal::default();
    }

    fn lock_queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Answers a synced group's writes, and gives its changes to watchers.
fn publish(
    shared: &Shared,
    revision: u64,
    answers: Vec<(Reply, WriteOutcome)>,
    record: Option<Vec<u8>>,
    started: Instant,
) {
    let took = started.elapsed();
    for (reply, outcome) in answers {
        let _ = reply.send((Ok(outcome), took));
    }
    if let Some(record) = record {
        shared.feed.publish_record(record, revision);
    }
}

/// How a drain syncs the journal.
#[derive(Clone, Copy)]
enum SyncThrough {
    /// The lane's own handle ([`ActiveJournal`]), outside fjall's journal
    /// lock, which the writer's next commit takes meanwhile.
    OwnHandle,
    /// fjall's `persist`, under that lock.
    Fjall,
}

/// fjall's active journal, opened again by kvstore to be synced outside
/// fjall's lock.
#[derive(Default)]
struct ActiveJournal {
    /// The journal's number and handle.
    open: Option<(u64, File)>,
    /// Why the last sync failed, if it did.
    failed: Option<Failure>,
}

/// Attempts at opening the newest journal, which fjall may seal and delete
/// between its listing and its opening.
const JOURNAL_OPEN_ATTEMPTS: usize = 3;

impl ActiveJournal {
    /// Makes everything written to the journal so far durable.
    ///
    /// fjall writes to one journal at a time (`<n>.jnl` in the data
    /// directory); sealing one for the next, it syncs it whole, under the
    /// lock every commit takes. So whatever a commit wrote before this call
    /// is in the newest journal, or in a sealed one that fjall has synced.
    /// The newest is listed afresh each time: a handle kept from before a
    /// seal would sync the sealed journal instead.
    fn sync(&mut self, dir: &Path) -> io::Result<()> {
        for _ in 0..JOURNAL_OPEN_ATTEMPTS {
            let newest = newest_journal(dir)?;
            if let Some((id, file)) = &self.open
                && *id == newest
            {
                return file.sync_data();
            }
            // Opened for writing, though nothing is written through it: some
            // file systems sync only through a handle that may write.
            match OpenOptions::new()
                .write(true)
                .open(dir.join(format!("{newest}.jnl")))
            {
                Ok(file) => {
                    let synced = file.sync_data();
                    self.open = Some((newest, file));
                    return synced;
                }
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => return Err(err),
            }
        }
        Err(io::Error::other(
            "the journal was sealed at each attempt to open it",
        ))
    }
}

/// The number of the newest journal in the data directory.
fn newest_journal(dir: &Path) -> io::Result<u64> {
    let mut newest = None;
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let id = name
            .to_str()
            .and_then(|name| name.strip_suffix(".jnl"))
            .and_then(|id| id.parse::<u64>().ok());
        newest = newest.max(id);
    }
    newest.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("no journal in {}", dir.display()),
        )
    })
}

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

#[cfg(test)]
mod tests {
    use super::{ActiveJournal, newest_journal};

    #[test]
    fn the_newest_journal_is_the_highest_number() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["9.jnl", "10.jnl", "2.jnl", "11.jnl.tmp", "version", "99"] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        assert_eq!(newest_journal(dir.path()).unwrap(), 10);
    }

    #[test]
    fn a_sync_follows_the_journal_once_it_is_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = ActiveJournal::default();
        assert!(
            journal.sync(dir.path()).is_err(),
            "synced without a journal"
        );
        std::fs::write(dir.path().join("1.jnl"), b"").unwrap();
        journal.sync(dir.path()).unwrap();
        assert_eq!(journal.open.as_ref().map(|(id, _)| *id), Some(1));
        std::fs::write(dir.path().join("2.jnl"), b"").unwrap();
        std::fs::remove_file(dir.path().join("1.jnl")).unwrap();
        journal.sync(dir.path()).unwrap();
        assert_eq!(journal.open.as_ref().map(|(id, _)| *id), Some(2));
    }
}
