//! The embedded engine: fjall, with our own group commit.
//!
//! Reads go to fjall, through a snapshot (below). Writes have one writer at a
//! time, the holder of the writer lock: it checks conditions against the
//! current versions (and against the writes before it in the same group),
//! assigns versions and revisions, and commits one fjall batch; every write
//! of the group is answered once a sync covers it.
//!
//! A write that is the only one in flight, when no two writes have overlapped
//! for a while, commits itself on its own thread: handing it to another thread
//! and back would cost two thread wake-ups, about 30 µs on a small VM, on top
//! of the sync. Any other write queues for the committer thread, which takes
//! every queued write as one group once the writer lock is free. Under load
//! many writes share one sync; alone, a write costs one sync and no hand-off.
//! (Under load a write often finds itself alone just after a commit; letting it
//! commit itself then would sync it alone instead of with the writes arriving
//! just behind it, which cost 17% of the write rate at 16 connections.)
//!
//! Every write needs the current version of each key it writes. Reading it
//! from fjall's memtable skiplist and tables was the largest cost of a commit
//! (over 40% of the server's CPU in a batch of 100), so the writer keeps the
//! metadata of the keys it has read or written in a bounded map of its own, a
//! small cousin of Bitcask's key directory. It is exact, not a hint: nothing
//! writes the engine but the writer, which updates the map after each commit.
//!
//! A group is committed to fjall's journal without a sync, and synced by the
//! sync thread while the next group is written: the writer never waits for
//! the disk (see `syncer`). Readers read a snapshot taken after the last
//! group synced, so none sees a write that a crash could still take away
//! (see `reads::View`).
//!
//! The store-wide revision is kept in a `meta` keyspace and written in the same
//! batch as the entries it orders, so it never goes back, across restarts and
//! deletes too.
//!
//! That keyspace holds one small key, so its memtable never fills and is never
//! flushed on its own, and a journal file can only be deleted once every
//! keyspace has flushed what it holds. fjall then keeps journals until they
//! reach its journaling limit, and only there flushes the keyspaces holding
//! them back. With fjall's default limit of 512 MiB, a crash at the peak left
//! half a gigabyte to replay: opening took 4.4 s with 100,000 keys. The limit
//! is set to fjall's smallest, so the `meta` keyspace is flushed each time a
//! journal fills, and at most about two journals are kept (docs/durability.md
//! gives their size).
//!
//! A full disk: the free-space guard (`space`) refuses writes before
//! the disk fills. If the engine runs out of space all the same (the guard
//! off, or another process filling the disk), fjall poisons the database and
//! refuses every later write; fjall cannot be un-poisoned, so once space is
//! back the watcher thread reopens the engine in this process, with the
//! writer held (see `reopen_after_full_disk`). Reads go through an
//! `ArcSwapOption` of the engine's handles for that: one load of an atomic
//! pointer, and a short 503 while the engine is being reopened.

mod committer;
mod engine;
mod expiry;
mod full_disk;
mod history;
mod key_directory;
mod quiet;
mod reads;
mod space;
mod syncer;
mod writer;

use committer::Committer;
use engine::Engine;
use expiry::{Leases, count_lease_keys, run_expirer};
use full_disk::{Failure, ran_out_of_space, run_watcher};
use history::{read_changes, run_trimmer};
use key_directory::KeyDirectory;
pub(crate) use quiet::QUIET_FLUSHES;
use quiet::{DEFAULT_QUIET, run_quiet};
use reads::{View, get_snapshot, range_is_empty, scan_snapshot, to_entry};
use syncer::{Lane, run_syncer};
use writer::Writer;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use async_trait::async_trait;
use fjall::Readable;
use tokio::runtime::{Handle, RuntimeFlavor};
use tokio::sync::{mpsc, oneshot};

use super::Entry;
use super::codec;
use super::{
    Change, Clock, DeleteReason, Feed, Found, History, Lease, LeaseId, OpResult, Revoked, ScanPage,
    ScanRequest, Store, WriteOp, WriteOutcome, deadline_after, new_lease_id, system_now_us,
};
use crate::error::{StoreError, StoreResult};
use crate::timing;
pub use space::MinFree;
use space::SpaceGuard;

named_enum! {
    /// When an acknowledged write is on stable storage.
    pub enum Durability ("durability") {
        /// A write is answered after the sync (fdatasync) that covers it.
        Fsync = "fsync",
        /// A write is answered once it is in the operating system's buffers,
        /// and a background sync runs at least every sync interval: a process
        /// crash loses nothing acknowledged, a machine crash loses at most the
        /// last interval.
        Buffered = "buffered",
    }
}

/// What the committer reports to a [`CommitHook`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitEvent {
    /// A group of writes was committed to the engine's journal, not yet
    /// synced; no write of it has been answered yet.
    Committed {
        /// The revision of the group's last write.
        last_revision: u64,
    },
    /// A sync made everything up to `revision` durable: in `fsync`
    /// durability, before any write it covers is answered; in buffered mode,
    /// in the background.
    Synced {
        /// Everything up to this revision is durable.
        revision: u64,
    },
}

/// Called by the writer after each commit and by the sync threads after each
/// sync, before the writes they cover are answered. It may block: the writes
/// it covers wait.
/// Tests use it to prove that nothing is answered before its sync.
pub type CommitHook = Arc<dyn Fn(&CommitEvent) + Send + Sync>;

/// How to open the embedded engine.
#[derive(Clone)]
#[non_exhaustive]
pub struct EmbeddedConfig {
    /// The data directory; created if missing.
    pub path: PathBuf,
    /// When a write is acknowledged: after its fsync, or once buffered.
    pub durability: Durability,
    /// How often buffered mode syncs.
    pub sync_interval: Duration,
    /// A write commits itself on its own thread only when it is alone and no
    /// two writes have overlapped for this long (see the module's notes).
    pub quiet_before_inline: Duration,
    /// Memory for the writer's map of current key versions.
    pub key_directory_bytes: u64,
    /// Memory for fjall's cache of table blocks (data, index and filter
    /// blocks), which a read that misses the memtable goes through.
    pub block_cache_bytes: u64,
    /// Free space to keep on the data directory's file system: writes are
    /// refused (507) below it.
    pub min_free: MinFree,
    /// How much change history to keep for watchers.
    pub history: History,
    /// Once no write has been committed for this long, memtables of at least
    /// 1 MiB are flushed to tables, so that reads stop searching them (see
    /// `quiet.rs`); `None` leaves flushing to fjall, which flushes a memtable
    /// when it is full. Either way, readers are handed the engine as it is
    /// after each quiet spell (2 s when `None`), flushes and compactions
    /// included.
    pub flush_when_quiet: Option<Duration>,
    /// Called at every commit and sync (tests use it to prove ordering).
    #[cfg(feature = "internals")]
    pub commit_hook: Option<CommitHook>,
    /// The clock deadlines are kept by; `None` is the wall clock. Tests set
    /// one they control.
    #[cfg(feature = "internals")]
    pub clock: Option<Clock>,
}

impl EmbeddedConfig {
    /// Defaults: `fsync` durability, a 10 ms sync interval, 1 ms of quiet
    /// before a write commits itself, 32 MiB of key directory (about 250,000
    /// keys of 30 bytes), 32 MiB of block cache, the default free space to
    /// keep ([`MinFree`]), the default history ([`History`]), memtables
    /// flushed after 2 s without writes, no hook.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        EmbeddedConfig {
            path: path.into(),
            durability: Durability::Fsync,
            sync_interval: Duration::from_millis(10),
            quiet_before_inline: Duration::from_millis(1),
            key_directory_bytes: 32 << 20,
            block_cache_bytes: DEFAULT_BLOCK_CACHE_BYTES,
            min_free: MinFree::default(),
            history: History::default(),
            flush_when_quiet: Some(DEFAULT_QUIET),
            #[cfg(feature = "internals")]
            commit_hook: None,
            #[cfg(feature = "internals")]
            clock: None,
        }
    }

    /// The commit hook and the clock: a test's (they are set only with the
    /// `internals` feature), else none and the wall clock.
    fn test_hooks(&self) -> (Option<CommitHook>, Option<Clock>) {
        #[cfg(feature = "internals")]
        return (self.commit_hook.clone(), self.clock.clone());
        #[cfg(not(feature = "internals"))]
        (None, None)
    }
}

/// A commit group is cut at this many ops or bytes, so one huge group cannot
/// hold up the writes queued behind it for long.
const MAX_GROUP_KEYS: usize = 8192;
const MAX_GROUP_BYTES: usize = 64 << 20;
/// Writes waiting for the committer before new ones wait to be queued.
const QUEUE_DEPTH: usize = 4096;
const REVISION_KEY: &[u8] = b"revision";
/// fjall's own default. A larger cache pays little on this engine: with
/// 5,000,000 keys (774 MB of tables) and uniform reads that miss the read
/// cache, 1 GiB (holding every block) took the server's CPU per read from
/// 28-31 µs to 24-30 µs, 256 MiB to 26-29 µs (docs/performance.md).
const DEFAULT_BLOCK_CACHE_BYTES: u64 = 32 << 20;
/// fjall's folder of keyspaces inside the data directory.
const KEYSPACES_DIR: &str = "keyspaces";
/// The journal size past which fjall flushes the keyspaces that hold old
/// journals back: its smallest allowed (see the module's notes).
const MAX_JOURNALING_BYTES: u64 = 64 << 20;
/// Reads of at most this many items run on the async worker itself: a range
/// of 100 takes about 20 µs in fjall, while handing it to a blocking thread
/// costs 25-30 µs of thread wake-up on this kind of machine (measured with
/// `cargo bench --bench hot_paths`). Larger reads go to a blocking thread.
const INLINE_READ_ITEMS: usize = 128;

/// A background thread's work, given the store and the channel whose
/// closing stops it.
type Background = Box<dyn FnOnce(&Shared, &std::sync::mpsc::Receiver<()>) + Send>;

/// A write's outcome, and how long the commit of its group took (zero when
/// it was not committed).
type Reply = oneshot::Sender<(StoreResult<WriteOutcome>, Duration)>;

/// Metric names of the committer.
const GROUP_WRITES: &str = "kvstore_commit_group_writes";
const GROUP_KEYS: &str = "kvstore_commit_group_keys";
const COMMIT_SECONDS: &str = "kvstore_commit_duration_seconds";
const SYNC_SECONDS: &str = "kvstore_background_sync_duration_seconds";
const QUEUE_DEPTH_GAUGE: &str = "kvstore_commit_queue_depth";

enum Job {
    /// Writes to apply in this order, in one group: one client's write, or
    /// the writes of its pipeline.
    Writes(Vec<(Vec<WriteOp>, Reply)>),
    Close {
        reply: oneshot::Sender<StoreResult<()>>,
    },
}

/// State shared by the store handle, the committer, the syncer and the
/// watcher.
struct Shared {
    /// `None` only while the engine is being reopened after a full disk (or
    /// when reopening it failed). The writer's: readers go through `view`.
    engine: ArcSwapOption<Engine>,
    /// What readers see: the engine as of the last sync; `None` when
    /// `engine` is.
    view: ArcSwapOption<View>,
    /// Committed groups on their way to their sync.
    lane: Lane,
    path: PathBuf,
    /// fjall's block cache, to open the engine with again after a full disk.
    block_cache_bytes: u64,
    space: SpaceGuard,
    /// Set once a commit or sync fails; writes are refused from then on.
    failure: Mutex<Option<Failure>>,
    /// The last revision committed to the engine (maybe not yet synced).
    committed_revision: AtomicU64,
    closed: AtomicBool,
    hook: Option<CommitHook>,
    /// Watchers' live delivery, fed after each commit.
    feed: Arc<Feed>,
    history: History,
    /// The one writer's state. Whoever holds it commits: the committer thread,
    /// or a write committing itself.
    writer: Mutex<Writer>,
    /// Writes handed (or being handed) to the committer thread and not yet
    /// taken into a group.
    waiting: AtomicUsize,
    /// Writes between the start of `Store::write` and its answer.
    in_flight: AtomicUsize,
    /// When two writes last overlapped, in microseconds since `opened`.
    last_overlap_us: AtomicU64,
    opened: Instant,
    quiet_before_inline_us: u64,
    /// The leases, in memory (see [`expiry`]).
    leases: Leases,
    clock: Option<Clock>,
    /// The latest reading of `clock` (see [`EmbeddedStore::now_us`]).
    latest_now_us: AtomicI64,
}

impl Shared {
    /// Runs a read on the readers' view; 503 while the engine is being reopened.
    fn with_view<T>(&self, read: impl FnOnce(&View) -> StoreResult<T>) -> StoreResult<T> {
        match self.view.load().as_deref() {
            Some(view) => read(view),
            None => Err(StoreError::Unavailable(
                "the engine is being reopened after its disk filled up; retry in a moment".into(),
            )),
        }
    }

    /// Refuses writes until a restart; gives the failure kept, whose reason
    /// every later write gets too. `what` failed with `err`; the reason says
    /// so and that only a restart helps: after a failed sync the kernel may
    /// have dropped the unsynced data, so a retried sync could succeed
    /// without it.
    fn fail(&self, what: &str, err: impl std::fmt::Display) -> Failure {
        let why =
            format!("{what} failed ({err}); writes are refused until the server is restarted");
        tracing::error!(error = %why, "storage write failed; refusing writes until restart");
        self.set_failure(Failure::Fatal(why))
    }

    /// Records why writes are refused: a fatal failure replaces an
    /// out-of-space one, never the other way round. Gives the failure kept.
    fn set_failure(&self, new: Failure) -> Failure {
        let mut failure = self.failure.lock().unwrap_or_else(PoisonError::into_inner);
        match (&*failure, &new) {
            (None, _) | (Some(Failure::OutOfSpace(_)), Failure::Fatal(_)) => {
                *failure = Some(new.clone());
                new
            }
            (Some(kept), _) => kept.clone(),
        }
    }

    fn failure(&self) -> Option<Failure> {
        self.failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn out_of_space(&self) -> bool {
        matches!(self.failure(), Some(Failure::OutOfSpace(_)))
    }

    /// Records a failed commit (or a background sync that found the engine
    /// poisoned): out of space, see [`ran_out_of_space`], it is recoverable;
    /// anything else refuses writes until a restart.
    fn engine_failed(&self, what: &str, err: &fjall::Error) -> Failure {
        // A fresh reading, for the poisoned case and for the message.
        self.space.check();
        if !ran_out_of_space(err, self.space.has_room()) {
            return self.fail(what, err);
        }
        let why = format!(
            "the disk of the data directory {} is full ({} bytes free; the engine reported: {err}): \
             writes are refused until space is freed there; reads are still served, and writes \
             resume by themselves",
            self.path.display(),
            self.space.free()
        );
        let kept = self.set_failure(Failure::OutOfSpace(why));
        if matches!(kept, Failure::OutOfSpace(_)) {
            tracing::warn!(
                data_dir = %self.path.display(),
                free_bytes = self.space.free(),
                error = %err,
                "disk full: the engine ran out of space; refusing writes (507) until space is freed, then reopening the engine"
            );
        }
        kept
    }

    fn notify(&self, event: CommitEvent) {
        if let Some(hook) = &self.hook {
            hook(&event);
        }
    }

    /// Counts a write in flight until the returned guard is dropped, and tells
    /// whether it is alone after a quiet spell; records an overlap when not.
    fn write_started(&self) -> (bool, Counted<'_>) {
        let (others, in_flight) = Counted::new(&self.in_flight);
        let now = u64::try_from(self.opened.elapsed().as_micros()).unwrap_or(u64::MAX);
        if others > 0 {
            self.last_overlap_us.store(now, Ordering::Release);
            return (false, in_flight);
        }
        let quiet = now.saturating_sub(self.last_overlap_us.load(Ordering::Acquire));
        (quiet >= self.quiet_before_inline_us, in_flight)
    }

    /// The clock's reading now, which the store's own decisions use.
    fn now_us(&self) -> i64 {
        let now = self
            .clock
            .as_ref()
            .map_or_else(system_now_us, |clock| clock());
        self.latest_now_us.fetch_max(now, Ordering::AcqRel);
        now
    }

    /// Whether a key with this metadata is there at `now_us`: before its
    /// deadline, and on a lease that has not expired, if on one.
    fn alive(&self, meta: &codec::RecordMeta, now_us: i64) -> bool {
        self.deadline_of(meta)
            .is_none_or(|deadline| deadline > now_us)
    }

    /// The key's effective deadline: its own, or its lease's (`i64::MIN`
    /// for a lease that is gone).
    fn deadline_of(&self, meta: &codec::RecordMeta) -> Option<i64> {
        meta.expires_at_us.or_else(|| {
            meta.lease
                .map(|id| self.leases.deadline(id).unwrap_or(i64::MIN))
        })
    }

    fn lock_writer(&self) -> MutexGuard<'_, Writer> {
        // A panic while committing cannot leave the writer half-updated in a
        // way that matters: a failed commit resets the revision before it
        // returns, and the engine refuses writes after a failed sync.
        self.writer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Hands readers the engine as it is now, for what changed it outside a
    /// write (the trimmer's deletes, a flush, a compaction); with the writer
    /// held, so that no group is committed meanwhile. Not once the store is
    /// closed.
    fn republish_view(&self) {
        let writer = self.lock_writer();
        if !self.closed.load(Ordering::Acquire) {
            self.lane.republish(self, writer.revision);
        }
    }
}

/// The embedded, durable engine.
pub struct EmbeddedStore {
    shared: Arc<Shared>,
    jobs: mpsc::Sender<Job>,
    durability: Durability,
    path: PathBuf,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl EmbeddedStore {
    /// Opens (or creates) the engine in `config.path` and starts its committer.
    ///
    /// # Errors
    /// When the directory cannot be created or opened, holds data fjall cannot
    /// recover, or is in use by another process.
    pub fn open(config: EmbeddedConfig) -> StoreResult<Self> {
        crate::files::create_dir_all_durably(&config.path)?;
        let (engine, revision) = Engine::open(&config.path, config.block_cache_bytes)?;
        let leases = Leases::load(&engine)?;
        let (hook, clock) = config.test_hooks();
        let engine = Arc::new(engine);
        let shared = Arc::new(Shared {
            view: ArcSwapOption::from_pointee(View::now(Arc::clone(&engine), revision)),
            engine: ArcSwapOption::new(Some(engine)),
            lane: Lane::new(config.durability == Durability::Fsync),
            space: SpaceGuard::new(&config.path, config.min_free),
            path: config.path.clone(),
            block_cache_bytes: config.block_cache_bytes,
            failure: Mutex::new(None),
            committed_revision: AtomicU64::new(revision),
            closed: AtomicBool::new(false),
            hook,
            feed: Feed::start(revision)?,
            history: config.history,
            writer: Mutex::new(Writer {
                revision,
                directory: KeyDirectory::new(config.key_directory_bytes),
                expire_from: Vec::new(),
            }),
            waiting: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            last_overlap_us: AtomicU64::new(0),
            opened: Instant::now(),
            quiet_before_inline_us: u64::try_from(config.quiet_before_inline.as_micros())
                .unwrap_or(u64::MAX),
            leases,
            clock,
            latest_now_us: AtomicI64::new(i64::MIN),
        });

        let (jobs, queue) = mpsc::channel(QUEUE_DEPTH);
        let mut threads = Vec::new();
        let mut stops = Vec::new();
        let mut background = |name: &str, run: Background| -> std::io::Result<()> {
            let (stop, stopped) = std::sync::mpsc::channel::<()>();
            let shared = Arc::clone(&shared);
            threads.push(
                std::thread::Builder::new()
                    .name(name.into())
                    .spawn(move || run(&shared, &stopped))?,
            );
            stops.push(stop);
            Ok(())
        };
        match config.durability {
            // Stopped by closing the lane, once the groups before the close
            // are published.
            Durability::Fsync => background(
                "kvstore-syncer",
                Box::new(|shared, _| shared.lane.run(shared)),
            )?,
            Durability::Buffered => {
                let interval = config.sync_interval;
                background(
                    "kvstore-syncer",
                    Box::new(move |shared, stop| run_syncer(shared, interval, stop, revision)),
                )?;
            }
        }
        background("kvstore-watcher", Box::new(run_watcher))?;
        background("kvstore-trimmer", Box::new(run_trimmer))?;
        background("kvstore-expirer", Box::new(run_expirer))?;
        let (quiet, flush) = config
            .flush_when_quiet
            .map_or((DEFAULT_QUIET, false), |quiet| (quiet, true));
        background(
            "kvstore-quiet",
            Box::new(move |shared, stop| run_quiet(shared, quiet, flush, stop)),
        )?;
        let committer = Committer {
            shared: Arc::clone(&shared),
            stops,
        };
        threads.push(
            std::thread::Builder::new()
                .name("kvstore-committer".into())
                .spawn(move || committer.run(queue))?,
        );

        Ok(EmbeddedStore {
            shared,
            jobs,
            durability: config.durability,
            path: config.path,
            threads: Mutex::new(threads),
        })
    }

    /// The fjall sequence number that reads see, and the engine's own: a
    /// flush or a compaction moves the engine's on, and reads see what it
    /// changed once theirs catches up (see `quiet.rs`).
    #[cfg(feature = "internals")]
    pub fn sequence_numbers(&self) -> Option<(u64, u64)> {
        self.shared
            .view
            .load()
            .as_deref()
            .map(|view| (view.snapshot.seqno(), view.engine.db.snapshot().seqno()))
    }

    /// Writes waiting for the committer thread to take them into a group.
    pub fn queue_depth(&self) -> usize {
        self.shared.waiting.load(Ordering::Acquire)
    }

    /// Commits a write that is alone on this thread, when the writer is free;
    /// gives the write back otherwise.
    ///
    /// Only on a multi-threaded runtime: the sync blocks, and
    /// `block_in_place` moves this worker's other tasks to another thread
    /// meanwhile, which a single-threaded runtime cannot do.
    fn commit_inline(
        &self,
        alone: bool,
        ops: Vec<WriteOp>,
        reply: Reply,
    ) -> Option<(Vec<WriteOp>, Reply)> {
        let multi_threaded = || {
            Handle::try_current()
                .is_ok_and(|runtime| runtime.runtime_flavor() == RuntimeFlavor::MultiThread)
        };
        if !alone || !multi_threaded() {
            return Some((ops, reply));
        }
        let mut writer = match self.shared.writer.try_lock() {
            Ok(writer) => writer,
            Err(TryLockError::WouldBlock | TryLockError::Poisoned(_)) => {
                return Some((ops, reply));
            }
        };
        if self.shared.closed.load(Ordering::Acquire) {
            let _ = reply.send((
                Err(StoreError::Unavailable("the store is closed".into())),
                Duration::ZERO,
            ));
            return None;
        }
        tokio::task::block_in_place(|| {
            writer.commit_group(&self.shared, vec![(ops, reply)], false);
        });
        None
    }

    /// Runs `work` with the writer held, on a blocking thread.
    async fn with_writer<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Shared, &mut Writer) -> StoreResult<T> + Send + 'static,
    ) -> StoreResult<T> {
        self.run_blocking(move |shared| {
            if shared.closed.load(Ordering::Acquire) {
                return Err(StoreError::Unavailable("the store is closed".into()));
            }
            work(shared, &mut shared.lock_writer())
        })
        .await
    }

    async fn run_blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Shared) -> StoreResult<T> + Send + 'static,
    ) -> StoreResult<T> {
        let shared = Arc::clone(&self.shared);
        tokio::task::spawn_blocking(move || work(&shared))
            .await
            .map_err(|e| StoreError::Internal(format!("storage task failed: {e}")))?
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &[u8]) -> StoreResult<Option<Entry>> {
        // A point read is a memtable or block-cache lookup (under a
        // microsecond), far cheaper than handing it to a blocking thread.
        self.shared
            .with_view(|view| match view.snapshot.get(&view.engine.kv, key)? {
                Some(record) => to_entry(
                    &self.shared,
                    self.shared.now_us(),
                    key.to_vec(),
                    &record,
                    false,
                ),
                None => Ok(None),
            })
    }

    async fn get_many(&self, keys: Vec<Vec<u8>>) -> StoreResult<Found> {
        if keys.len() <= INLINE_READ_ITEMS {
            return get_snapshot(&self.shared, keys);
        }
        self.run_blocking(move |shared| get_snapshot(shared, keys))
            .await
    }

    async fn write(&self, ops: Vec<WriteOp>) -> StoreResult<WriteOutcome> {
        if self.shared.space.is_low() {
            return Err(StoreError::InsufficientStorage(self.shared.space.refusal()));
        }
        let start = Instant::now();
        let (alone, _in_flight) = self.shared.write_started();
        let (reply, answer) = oneshot::channel();
        if let Some((ops, reply)) = self.commit_inline(alone, ops, reply) {
            // Counted before the hand-off, because the committer counts it out
            // as soon as it has it; counted out here if the send fails or this
            // write is dropped while waiting for room in the queue.
            let (_, waiting) = Counted::new(&self.shared.waiting);
            self.jobs
                .send(Job::Writes(vec![(ops, reply)]))
                .await
                .map_err(|_| StoreError::Unavailable("the store is closed".into()))?;
            waiting.handed_over();
        }
        let (outcome, commit) = answer
            .await
            .map_err(|_| StoreError::Unavailable("the store closed before the write".into()))?;
        timing::record(|t| {
            t.commit += commit;
            t.queued += start.elapsed().saturating_sub(commit);
        });
        outcome
    }

    /// One job for the committer: the writes are applied in this order in
    /// one group, under one sync.
    async fn write_many(&self, writes: Vec<Vec<WriteOp>>) -> Vec<StoreResult<WriteOutcome>> {
        if self.shared.space.is_low() {
            return writes
                .iter()
                .map(|_| Err(StoreError::InsufficientStorage(self.shared.space.refusal())))
                .collect();
        }
        let (_, _in_flight) = self.shared.write_started();
        let mut job = Vec::with_capacity(writes.len());
        let mut answers = Vec::with_capacity(writes.len());
        for ops in writes {
            let (reply, answer) = oneshot::channel();
            job.push((ops, reply));
            answers.push(answer);
        }
        let (_, waiting) = Counted::new(&self.shared.waiting);
        let sent = self.jobs.send(Job::Writes(job)).await.is_ok();
        if sent {
            waiting.handed_over();
        }
        let mut outcomes = Vec::with_capacity(answers.len());
        for answer in answers {
            outcomes.push(match answer.await {
                Ok((outcome, _)) => outcome,
                Err(_) => Err(StoreError::Unavailable("the store is closed".into())),
            });
        }
        outcomes
    }

    async fn scan(&self, request: ScanRequest) -> StoreResult<ScanPage> {
        if range_is_empty(&request.lower, &request.upper) {
            return Ok(ScanPage {
                entries: Vec::new(),
                more: false,
                revision: self.shared.with_view(|view| Ok(view.revision))?,
            });
        }
        if request.limit <= INLINE_READ_ITEMS {
            return scan_snapshot(&self.shared, &request);
        }
        self.run_blocking(move |shared| scan_snapshot(shared, &request))
            .await
    }

    async fn changes(&self, after: u64, limit: usize) -> StoreResult<Vec<Change>> {
        if limit <= INLINE_READ_ITEMS {
            return self
                .shared
                .with_view(|view| read_changes(view, after, limit));
        }
        self.run_blocking(move |shared| shared.with_view(|view| read_changes(view, after, limit)))
            .await
    }

    fn feed(&self) -> Arc<Feed> {
        Arc::clone(&self.shared.feed)
    }

    async fn grant_lease(&self, ttl_ms: u64, owner: Option<String>) -> StoreResult<Lease> {
        self.with_writer(move |shared, writer| {
            let mut id = new_lease_id()?;
            while shared.leases.contains(id) {
                id = new_lease_id()?;
            }
            let lease = Lease {
                id,
                ttl_ms,
                expires_at_us: deadline_after(shared.now_us(), ttl_ms),
                owner,
            };
            writer.store_lease(shared, lease)
        })
        .await
    }

    async fn keep_lease_alive(&self, id: LeaseId) -> StoreResult<Lease> {
        self.with_writer(move |shared, writer| {
            let now = shared.now_us();
            let mut lease = shared
                .leases
                .live(id, now)
                .ok_or(StoreError::LeaseNotFound(id))?;
            lease.expires_at_us = deadline_after(now, lease.ttl_ms);
            writer.store_lease(shared, lease)
        })
        .await
    }

    async fn lease(&self, id: LeaseId) -> StoreResult<Option<Lease>> {
        Ok(self.shared.leases.live(id, self.shared.now_us()))
    }

    async fn lease_keys(&self, id: LeaseId) -> StoreResult<u64> {
        if self.shared.leases.live(id, self.shared.now_us()).is_none() {
            return Ok(0);
        }
        self.run_blocking(move |shared| shared.with_view(|view| count_lease_keys(view, id)))
            .await
    }

    async fn revoke_lease(&self, id: LeaseId) -> StoreResult<Revoked> {
        self.with_writer(move |shared, writer| {
            if shared.leases.live(id, shared.now_us()).is_none() {
                return Err(StoreError::LeaseNotFound(id));
            }
            writer
                .end_lease(shared, id, DeleteReason::LeaseRevoked)?
                .ok_or(StoreError::LeaseNotFound(id))
        })
        .await
    }

    /// Never goes back: the latest reading of the clock any decision of the
    /// store was based on. A cache is not told when the expirer deletes a
    /// key at its deadline, and takes an entry past its deadline for a miss;
    /// were the wall clock to step back after such a delete (an NTP
    /// correction), the clock's own reading would put the entry before its
    /// deadline again, and the cache would serve a key the store no longer
    /// holds.
    fn now_us(&self) -> i64 {
        let now = self.shared.now_us();
        self.shared.latest_now_us.load(Ordering::Acquire).max(now)
    }

    async fn ready(&self) -> StoreResult<()> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(StoreError::Unavailable("the store is closed".into()));
        }
        match self.shared.failure() {
            Some(fatal @ Failure::Fatal(_)) => Err(fatal.error()),
            // Out of space, reads are still served (see `read_only`), unless
            // the engine is being reopened.
            _ => self.shared.with_view(|_| Ok(())),
        }
    }

    fn read_only(&self) -> Option<String> {
        match self.shared.failure() {
            Some(Failure::OutOfSpace(why)) => Some(why),
            _ => self
                .shared
                .space
                .is_low()
                .then(|| self.shared.space.refusal()),
        }
    }

    async fn close(&self) -> StoreResult<()> {
        self.shared.feed.close();
        let (reply, done) = oneshot::channel();
        if self.jobs.send(Job::Close { reply }).await.is_ok() {
            done.await
                .map_err(|_| StoreError::Internal("committer stopped before closing".into()))??;
        }
        let threads = match self.threads.lock() {
            Ok(mut threads) => std::mem::take(&mut *threads),
            Err(_) => Vec::new(),
        };
        tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await
        .map_err(|e| StoreError::Internal(format!("joining storage threads: {e}")))
    }

    fn report_metrics(&self) {
        metrics::gauge!(QUEUE_DEPTH_GAUGE).set(self.queue_depth() as f64);
        // Adding nothing makes the series exist before the first flush.
        metrics::counter!(QUIET_FLUSHES).increment(0);
        self.shared.space.report_metrics(self.shared.out_of_space());
    }

    fn describe(&self) -> String {
        format!(
            "embedded (fjall, {}, durability {})",
            self.path.display(),
            self.durability
        )
    }
}

/// One write counted in a counter of `Shared`, counted out when dropped.
struct Counted<'a>(&'a AtomicUsize);

impl<'a> Counted<'a> {
    /// Counts one in; also gives the count before.
    fn new(counter: &'a AtomicUsize) -> (usize, Self) {
        (counter.fetch_add(1, Ordering::AcqRel), Counted(counter))
    }

    /// Leaves the count to whoever now holds the write (the committer).
    fn handed_over(self) {
        std::mem::forget(self);
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
