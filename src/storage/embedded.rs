//! The embedded engine: fjall, with our own group commit.
//!
//! Reads go straight to fjall. Writes have one writer at a time, the holder of
//! the writer lock: it checks conditions against the current versions (and
//! against the writes before it in the same group), assigns versions and
//! revisions, commits one fjall batch, syncs once, and only then answers every
//! write of the group.
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
//! fjall's batch with a sync durability writes its journal, syncs it, and only
//! then makes the batch visible to readers, so no reader sees a write that a
//! crash could still take away.
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
//! journal fills, and at most about two journals are kept.
//!
//! A full disk: the free-space guard ([`super::space`]) refuses writes before
//! the disk fills. If the engine runs out of space all the same (the guard
//! off, or another process filling the disk), fjall poisons the database and
//! refuses every later write; fjall cannot be un-poisoned, so once space is
//! back the watcher thread reopens the engine in this process, with the
//! writer held (see `reopen_after_full_disk`). Reads go through an
//! `ArcSwapOption` of the engine's handles for that: one load of an atomic
//! pointer, and a short 503 while the engine is being reopened.

use std::collections::HashMap;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use async_trait::async_trait;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode, Readable};
use tokio::runtime::{Handle, RuntimeFlavor};
use tokio::sync::{mpsc, oneshot};

use super::codec::{self, RecordMeta};
use super::space::{self, MinFree, SpaceGuard};
use super::{
    Entry, FailedCondition, OpResult, ScanPage, ScanRequest, Store, WriteOp, WriteOutcome,
};
use crate::error::{StoreError, StoreResult};
use crate::timing;

/// When an acknowledged write is on stable storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Durability {
    /// A write is answered after the sync (fdatasync) that covers it.
    Fsync,
    /// A write is answered once it is in the operating system's buffers, and a
    /// background sync runs at least every sync interval: a process crash loses
    /// nothing acknowledged, a machine crash loses at most the last interval.
    Buffered,
}

impl std::fmt::Display for Durability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Durability::Fsync => "fsync",
            Durability::Buffered => "buffered",
        })
    }
}

/// What the committer reports to a [`CommitHook`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitEvent {
    /// A group of writes was committed to the engine; no write of it has been
    /// answered yet. `synced` is true when the commit included the sync.
    Committed { last_revision: u64, synced: bool },
    /// A background sync (buffered mode) made everything up to `revision` durable.
    Synced { revision: u64 },
}

/// Called by the committer thread before it answers a group, and by the
/// background syncer after each sync. It may block: the writes it covers wait.
/// Tests use it to prove that nothing is answered before its sync.
pub type CommitHook = Arc<dyn Fn(&CommitEvent) + Send + Sync>;

/// How to open the embedded engine.
#[derive(Clone)]
pub struct EmbeddedConfig {
    pub path: PathBuf,
    pub durability: Durability,
    /// How often buffered mode syncs.
    pub sync_interval: Duration,
    /// A write commits itself on its own thread only when it is alone and no
    /// two writes have overlapped for this long (see the module's notes).
    pub quiet_before_inline: Duration,
    /// Memory for the writer's map of current key versions.
    pub key_directory_bytes: u64,
    /// Free space to keep on the data directory's file system: writes are
    /// refused (507) below it.
    pub min_free: MinFree,
    pub commit_hook: Option<CommitHook>,
}

impl EmbeddedConfig {
    /// Defaults: `fsync` durability, a 10 ms sync interval, 1 ms of quiet
    /// before a write commits itself, 32 MiB of key directory (about 250,000
    /// keys of 30 bytes), the default free space to keep ([`MinFree`]), no
    /// hook.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        EmbeddedConfig {
            path: path.into(),
            durability: Durability::Fsync,
            sync_interval: Duration::from_millis(10),
            quiet_before_inline: Duration::from_millis(1),
            key_directory_bytes: 32 << 20,
            min_free: MinFree::default(),
            commit_hook: None,
        }
    }
}

/// A commit group is cut at this many ops or bytes, so one huge group cannot
/// hold up the writes queued behind it for long.
const MAX_GROUP_KEYS: usize = 8192;
const MAX_GROUP_BYTES: usize = 64 << 20;
/// Writes waiting for the committer before new ones wait to be queued.
const QUEUE_DEPTH: usize = 4096;
const REVISION_KEY: &[u8] = b"revision";
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
    Write {
        ops: Vec<WriteOp>,
        reply: Reply,
    },
    Close {
        reply: oneshot::Sender<StoreResult<()>>,
    },
}

/// The engine's handles, replaced together when the engine is reopened.
struct Engine {
    db: Database,
    kv: Keyspace,
    meta: Keyspace,
}

impl Engine {
    /// Opens the engine in `path`; also gives the revision it holds.
    fn open(path: &Path) -> StoreResult<(Self, u64)> {
        let db = Database::builder(path)
            .manual_journal_persist(true)
            .max_journaling_size(MAX_JOURNALING_BYTES)
            .open()
            .map_err(|err| open_failed(path, err))?;
        let kv = db.keyspace("kv", KeyspaceCreateOptions::default)?;
        let meta = db.keyspace("meta", KeyspaceCreateOptions::default)?;
        // fjall creates `keyspaces/<id>` without an fsync of `keyspaces/`: a
        // power cut would take the new folder away, and with it every write
        // its journal holds for that keyspace. Syncing both levels here, before
        // the first write, makes the folders as durable as the journal.
        crate::files::sync_dir(&path.join(KEYSPACES_DIR))?;
        crate::files::sync_dir(path)?;
        let revision = match meta.get(REVISION_KEY)? {
            Some(raw) => u64::from_le_bytes(
                raw.as_ref()
                    .try_into()
                    .map_err(|_| StoreError::Internal("corrupt revision record".into()))?,
            ),
            None => 0,
        };
        Ok((Engine { db, kv, meta }, revision))
    }
}

/// Why writes are refused after a failed commit or sync.
#[derive(Clone)]
enum Failure {
    /// The engine ran out of space; it is reopened once space is back.
    OutOfSpace(String),
    /// Anything else, a failed sync above all: the engine's state is unknown
    /// until a restart recovers it from the journal.
    Fatal(String),
}

impl Failure {
    fn error(&self) -> StoreError {
        match self {
            Failure::OutOfSpace(why) => StoreError::InsufficientStorage(why.clone()),
            Failure::Fatal(why) => StoreError::Unavailable(why.clone()),
        }
    }
}

/// State shared by the store handle, the committer, the syncer and the
/// watcher.
struct Shared {
    /// `None` only while the engine is being reopened after a full disk (or
    /// when reopening it failed).
    engine: ArcSwapOption<Engine>,
    path: PathBuf,
    space: SpaceGuard,
    /// Set once a commit or sync fails; writes are refused from then on.
    failure: Mutex<Option<Failure>>,
    /// The last revision committed to the engine.
    committed_revision: AtomicU64,
    closed: AtomicBool,
    hook: Option<CommitHook>,
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
}

impl Shared {
    /// Runs a read on the engine; 503 while it is being reopened.
    fn with_engine<T>(&self, read: impl FnOnce(&Engine) -> StoreResult<T>) -> StoreResult<T> {
        match self.engine.load().as_deref() {
            Some(engine) => read(engine),
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

    fn lock_writer(&self) -> MutexGuard<'_, Writer> {
        // A panic while committing cannot leave the writer half-updated in a
        // way that matters: a failed commit resets the revision before it
        // returns, and the engine refuses writes after a failed sync.
        self.writer.lock().unwrap_or_else(PoisonError::into_inner)
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
        let (engine, revision) = Engine::open(&config.path)?;
        let shared = Arc::new(Shared {
            engine: ArcSwapOption::from_pointee(engine),
            space: SpaceGuard::new(&config.path, config.min_free),
            path: config.path.clone(),
            failure: Mutex::new(None),
            committed_revision: AtomicU64::new(revision),
            closed: AtomicBool::new(false),
            hook: config.commit_hook.clone(),
            writer: Mutex::new(Writer {
                persist: match config.durability {
                    Durability::Fsync => PersistMode::SyncData,
                    Durability::Buffered => PersistMode::Buffer,
                },
                revision,
                directory: KeyDirectory::new(config.key_directory_bytes),
            }),
            waiting: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            last_overlap_us: AtomicU64::new(0),
            opened: Instant::now(),
            quiet_before_inline_us: u64::try_from(config.quiet_before_inline.as_micros())
                .unwrap_or(u64::MAX),
        });

        let (jobs, queue) = mpsc::channel(QUEUE_DEPTH);
        let mut threads = Vec::new();
        let (syncer_stop, syncer) = match config.durability {
            Durability::Fsync => (None, None),
            Durability::Buffered => {
                let (stop, stopped) = std::sync::mpsc::channel::<()>();
                let shared = Arc::clone(&shared);
                let interval = config.sync_interval;
                let handle = std::thread::Builder::new()
                    .name("kvstore-syncer".into())
                    .spawn(move || run_syncer(&shared, interval, &stopped, revision))?;
                (Some(stop), Some(handle))
            }
        };
        let (watcher_stop, stopped) = std::sync::mpsc::channel::<()>();
        let watched = Arc::clone(&shared);
        threads.push(
            std::thread::Builder::new()
                .name("kvstore-watcher".into())
                .spawn(move || run_watcher(&watched, &stopped))?,
        );
        let committer = Committer {
            shared: Arc::clone(&shared),
            syncer_stop,
            watcher_stop: Some(watcher_stop),
        };
        threads.push(
            std::thread::Builder::new()
                .name("kvstore-committer".into())
                .spawn(move || committer.run(queue))?,
        );
        threads.extend(syncer);

        Ok(EmbeddedStore {
            shared,
            jobs,
            durability: config.durability,
            path: config.path,
            threads: Mutex::new(threads),
        })
    }

    /// The last revision committed to the engine.
    pub fn committed_revision(&self) -> u64 {
        self.shared.committed_revision.load(Ordering::Acquire)
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
        tokio::task::block_in_place(|| writer.commit_group(&self.shared, vec![(ops, reply)]));
        None
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
        self.shared.with_engine(|engine| match engine.kv.get(key)? {
            Some(record) => Ok(Some(to_entry(key.to_vec(), &record, false)?)),
            None => Ok(None),
        })
    }

    async fn get_many(&self, keys: Vec<Vec<u8>>) -> StoreResult<Vec<Option<Entry>>> {
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
                .send(Job::Write { ops, reply })
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

    async fn scan(&self, request: ScanRequest) -> StoreResult<ScanPage> {
        if range_is_empty(&request.lower, &request.upper) {
            return Ok(ScanPage {
                entries: Vec::new(),
                more: false,
            });
        }
        if request.limit <= INLINE_READ_ITEMS {
            return scan_snapshot(&self.shared, &request);
        }
        self.run_blocking(move |shared| scan_snapshot(shared, &request))
            .await
    }

    async fn ready(&self) -> StoreResult<()> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(StoreError::Unavailable("the store is closed".into()));
        }
        match self.shared.failure() {
            Some(fatal @ Failure::Fatal(_)) => Err(fatal.error()),
            // Out of space, reads are still served (see `read_only`), unless
            // the engine is being reopened.
            _ => self.shared.with_engine(|_| Ok(())),
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

/// fjall's errors name no file. An open that fails on corrupt data names the
/// files that can hold the damage, so that the operator knows what to restore.
fn open_failed(path: &Path, err: fjall::Error) -> StoreError {
    if !crate::error::is_corruption(&err) {
        return err.into();
    }
    let (suspects, or_else) = match err {
        fjall::Error::JournalRecovery(_)
        | fjall::Error::InvalidTrailer
        | fjall::Error::InvalidTag(_)
        | fjall::Error::Decompress(_) => (
            files_in(path, |file| file.extension().is_some_and(|e| e == "jnl")),
            "",
        ),
        fjall::Error::InvalidVersion(_) => (vec![path.join("version")], ""),
        // fjall reads every table's trailer, index and filter at open, and
        // the version file that lists a keyspace's tables.
        _ => (
            files_in(&path.join("keyspaces"), |_| true)
                .iter()
                .flat_map(|keyspace| files_in(&keyspace.join("tables"), |_| true))
                .collect(),
            " (or a keyspace's version file)",
        ),
    };
    // A big store has hundreds of tables.
    const SHOWN: usize = 20;
    let mut named: Vec<String> = suspects
        .iter()
        .take(SHOWN)
        .map(|file| file.display().to_string())
        .collect();
    if suspects.len() > SHOWN {
        named.push(format!("and {} more", suspects.len() - SHOWN));
    }
    let place = match named.as_slice() {
        [] => format!("under {}", path.display()),
        [file] => file.clone(),
        files => format!("one of {}", files.join(", ")),
    };
    match StoreError::from(err) {
        StoreError::Internal(why) => {
            StoreError::Internal(format!("{why}; the damaged file is {place}{or_else}"))
        }
        other => other,
    }
}

/// The entries of `dir` whose path passes `keep`, sorted; none if `dir`
/// cannot be read.
fn files_in(dir: &Path, keep: impl Fn(&Path) -> bool) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path())
        .filter(|file| keep(file))
        .collect();
    files.sort();
    files
}

fn get_snapshot(shared: &Shared, keys: Vec<Vec<u8>>) -> StoreResult<Vec<Option<Entry>>> {
    shared.with_engine(|engine| {
        let snapshot = engine.db.snapshot();
        keys.into_iter()
            .map(|key| match snapshot.get(&engine.kv, &key)? {
                Some(record) => Ok(Some(to_entry(key, &record, false)?)),
                None => Ok(None),
            })
            .collect()
    })
}

fn to_entry(key: Vec<u8>, record: &[u8], keys_only: bool) -> StoreResult<Entry> {
    let (meta, value) = codec::decode(record)?;
    Ok(Entry {
        key,
        value: if keys_only {
            Vec::new()
        } else {
            value.to_vec()
        },
        version: meta.version,
        revision: meta.revision,
        created_at_us: meta.created_at_us,
        updated_at_us: meta.updated_at_us,
    })
}

/// Whether no key can lie between the bounds (fjall, like `BTreeMap`, must not
/// be asked for an inverted range).
fn range_is_empty(lower: &Bound<Vec<u8>>, upper: &Bound<Vec<u8>>) -> bool {
    match (lower, upper) {
        (Bound::Included(l), Bound::Included(u)) => l > u,
        (Bound::Included(l), Bound::Excluded(u))
        | (Bound::Excluded(l), Bound::Included(u))
        | (Bound::Excluded(l), Bound::Excluded(u)) => l >= u,
        _ => false,
    }
}

fn scan_snapshot(shared: &Shared, request: &ScanRequest) -> StoreResult<ScanPage> {
    shared.with_engine(|engine| scan_engine(engine, request))
}

fn scan_engine(engine: &Engine, request: &ScanRequest) -> StoreResult<ScanPage> {
    let snapshot = engine.db.snapshot();
    let range = snapshot.range(&engine.kv, (request.lower.clone(), request.upper.clone()));
    let items: Box<dyn Iterator<Item = fjall::Guard>> = if request.reverse {
        Box::new(range.rev())
    } else {
        Box::new(range)
    };
    let mut entries = Vec::with_capacity(request.limit.min(1024));
    let mut value_bytes = 0usize;
    for item in items {
        let (key, record) = item.into_inner()?;
        if entries.len() == request.limit {
            return Ok(ScanPage {
                entries,
                more: true,
            });
        }
        let entry = to_entry(key.to_vec(), &record, request.keys_only)?;
        value_bytes = value_bytes.saturating_add(record.len() - codec::HEADER_LEN);
        if !entries.is_empty() && !request.keys_only && value_bytes > request.max_value_bytes {
            return Ok(ScanPage {
                entries,
                more: true,
            });
        }
        entries.push(entry);
    }
    Ok(ScanPage {
        entries,
        more: false,
    })
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// The thread that commits the writes that queued while another commit ran.
struct Committer {
    shared: Arc<Shared>,
    /// Dropped on close, which stops the buffered-mode syncer.
    syncer_stop: Option<std::sync::mpsc::Sender<()>>,
    /// Dropped on close, which stops the watcher.
    watcher_stop: Option<std::sync::mpsc::Sender<()>>,
}

/// The state of the engine's one writer.
struct Writer {
    persist: PersistMode,
    /// The last revision assigned.
    revision: u64,
    directory: KeyDirectory,
}

/// The current metadata of keys the writer has read or written, `None` for a
/// key that does not exist. Bounded by weight; a key it has dropped is read
/// from the engine again.
struct KeyDirectory(quick_cache::unsync::Cache<Vec<u8>, Option<RecordMeta>, DirectoryWeighter>);

#[derive(Clone)]
struct DirectoryWeighter;

/// Bytes of one directory entry besides its key: the metadata and the map's
/// own bookkeeping, roughly (the key's vector, the metadata, the entry and
/// its slot in the table).
const DIRECTORY_ENTRY_OVERHEAD: u64 = 96;

impl quick_cache::Weighter<Vec<u8>, Option<RecordMeta>> for DirectoryWeighter {
    fn weight(&self, key: &Vec<u8>, _: &Option<RecordMeta>) -> u64 {
        key.len() as u64 + DIRECTORY_ENTRY_OVERHEAD
    }
}

impl KeyDirectory {
    fn new(bytes: u64) -> Self {
        let items = usize::try_from(bytes / (DIRECTORY_ENTRY_OVERHEAD + 32)).unwrap_or(usize::MAX);
        KeyDirectory(quick_cache::unsync::Cache::with_weighter(
            items.max(1),
            bytes.max(1),
            DirectoryWeighter,
        ))
    }

    /// The key's current metadata, from the directory or else from the engine.
    fn current(&mut self, engine: &Engine, key: &[u8]) -> StoreResult<Option<RecordMeta>> {
        if let Some(meta) = self.0.get(key) {
            return Ok(*meta);
        }
        let meta = match engine.kv.get(key)? {
            Some(record) => Some(codec::decode(&record)?.0),
            None => None,
        };
        self.0.insert(key.to_vec(), meta);
        Ok(meta)
    }

    fn set(&mut self, key: Vec<u8>, meta: Option<RecordMeta>) {
        self.0.insert(key, meta);
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

/// A write of the current group that passed its conditions, waiting for the commit.
struct Accepted {
    reply: Reply,
    outcome: WriteOutcome,
}

impl Committer {
    fn run(mut self, mut queue: mpsc::Receiver<Job>) {
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
                    Job::Write { ops: w, reply } => {
                        let weight: usize = w.iter().map(WriteOp::weight).sum();
                        if !writes.is_empty()
                            && (ops + w.len() > MAX_GROUP_KEYS || bytes + weight > MAX_GROUP_BYTES)
                        {
                            carried = Some(Job::Write { ops: w, reply });
                            break;
                        }
                        ops += w.len();
                        bytes += weight;
                        writes.push((w, reply));
                        shared.waiting.fetch_sub(1, Ordering::AcqRel);
                    }
                }
                next = queue.try_recv().ok();
            }
            if !writes.is_empty() {
                writer.commit_group(&shared, writes);
            }
            if let Some(reply) = close {
                let _ = reply.send(self.close());
                drop(writer);
                queue.close();
                // Writes that were already queued behind the close are refused.
                while let Ok(job) = queue.try_recv() {
                    if let Job::Write { reply, .. } = job {
                        let _ = reply.send((
                            Err(StoreError::Unavailable("the store is closed".into())),
                            Duration::ZERO,
                        ));
                    }
                }
                break;
            }
        }
    }

    /// Called with the writer held, so no write commits itself after this.
    fn close(&mut self) -> StoreResult<()> {
        self.shared.closed.store(true, Ordering::Release);
        self.syncer_stop.take();
        self.watcher_stop.take();
        self.shared
            .with_engine(|engine| Ok(engine.db.persist(PersistMode::SyncAll)?))
    }
}

impl Writer {
    fn commit_group(&mut self, shared: &Shared, writes: Vec<(Vec<WriteOp>, Reply)>) {
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
        // The group's writes, one per key: two writes of one key must not share
        // a fjall batch (they would get the same sequence number).
        let mut pending = HashMap::new();
        for (ops, reply) in writes {
            match self.apply(engine, ops, &mut pending) {
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
        let mut bytes_written = 0;
        let mut batch = fjall::OwnedWriteBatch::with_capacity(engine.db.clone(), keys_written + 1)
            .durability(Some(self.persist));
        for (key, write) in &pending {
            bytes_written += key.len();
            match write {
                Some((_, record)) => {
                    bytes_written += record.len();
                    batch.insert(&engine.kv, key.as_slice(), record.as_slice());
                }
                None => batch.remove(&engine.kv, key.as_slice()),
            }
        }
        batch.insert(&engine.meta, REVISION_KEY, self.revision.to_le_bytes());
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
    }

    /// Checks one write's conditions and, when they hold, adds its ops to the
    /// group under the next revision.
    fn apply(
        &mut self,
        engine: &Engine,
        ops: Vec<WriteOp>,
        pending: &mut PendingWrites,
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
        for (op, meta) in ops.into_iter().zip(current) {
            match op {
                WriteOp::Put { key, value, .. } => {
                    let new = RecordMeta {
                        version: meta.map_or(1, |m| m.version + 1),
                        revision,
                        created_at_us: meta.map_or(now, |m| m.created_at_us),
                        // Never before the previous write, even if the clock steps back.
                        updated_at_us: meta.map_or(now, |m| now.max(m.updated_at_us)),
                    };
                    results.push(OpResult::Put {
                        version: new.version,
                        created: meta.is_none(),
                        created_at_us: new.created_at_us,
                        updated_at_us: new.updated_at_us,
                    });
                    pending.insert(key, Some((new, codec::encode(&new, &value))));
                }
                WriteOp::Delete { key, .. } => {
                    results.push(OpResult::Deleted {
                        existed: meta.is_some(),
                    });
                    if meta.is_some() {
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

/// Buffered mode: sync whatever was committed since the last sync, every interval.
///
/// `synced` is the revision recovered at open, which is on disk. It must not be
/// read when the thread starts: a write committed before the thread first ran
/// would then count as synced and wait for the next write to be synced.
fn run_syncer(
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

/// Whether a failed commit means the engine ran out of space, which a reopen
/// recovers from once space is back. `ENOSPC` (or `EDQUOT`) does. So does a
/// poisoned engine while the disk has no room: fjall's background flushes
/// and compactions poison it when they run out of space, without telling the
/// writer why. Any other I/O error, `EIO` from a sync above all, does not.
fn ran_out_of_space(err: &fjall::Error, disk_has_room: bool) -> bool {
    match err {
        fjall::Error::Io(io) => space::is_out_of_space(io),
        fjall::Error::Poisoned => !disk_has_room,
        _ => false,
    }
}

/// Reads the free space every poll interval, and reopens the engine once
/// space is back after it ran out.
fn run_watcher(shared: &Shared, stop: &std::sync::mpsc::Receiver<()>) {
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
                Err(still_used) => {
                    tracing::warn!(
                        "reads kept the old engine for {RELEASE_TIMEOUT:?}; reopening it later"
                    );
                    shared.engine.store(Some(still_used));
                    return;
                }
            }
        }
    }
    let (engine, revision) = match Engine::open(&shared.path) {
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
    shared.engine.store(Some(Arc::new(engine)));
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
