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

use std::collections::HashMap;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode, Readable};
use tokio::runtime::{Handle, RuntimeFlavor};
use tokio::sync::{mpsc, oneshot};

use super::codec::{self, RecordMeta};
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
    pub commit_hook: Option<CommitHook>,
}

impl EmbeddedConfig {
    /// Defaults: `fsync` durability, a 10 ms sync interval, 1 ms of quiet
    /// before a write commits itself, 32 MiB of key directory (about 250,000
    /// keys of 30 bytes), no hook.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        EmbeddedConfig {
            path: path.into(),
            durability: Durability::Fsync,
            sync_interval: Duration::from_millis(10),
            quiet_before_inline: Duration::from_millis(1),
            key_directory_bytes: 32 << 20,
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

/// State shared by the store handle, the committer and the syncer.
struct Shared {
    db: Database,
    kv: Keyspace,
    meta: Keyspace,
    /// Set once a commit or sync fails; writes are refused from then on,
    /// because the engine's state after a failed sync is unknown.
    failure: Mutex<Option<String>>,
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
    /// Refuses writes from now on; gives the reason, which every later write
    /// gets too. `what` failed with `err`; the reason says so and that only a
    /// restart helps: after a failed sync the kernel may have dropped the
    /// unsynced data, so a retried sync could succeed without it.
    fn fail(&self, what: &str, err: impl std::fmt::Display) -> String {
        let why =
            format!("{what} failed ({err}); writes are refused until the server is restarted");
        tracing::error!(error = %why, "storage write failed; refusing writes until restart");
        if let Ok(mut failure) = self.failure.lock() {
            failure.get_or_insert(why.clone());
        }
        why
    }

    fn failure(&self) -> Option<String> {
        self.failure.lock().ok().and_then(|f| f.clone())
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
        let db = Database::builder(&config.path)
            .manual_journal_persist(true)
            .max_journaling_size(MAX_JOURNALING_BYTES)
            .open()
            .map_err(|err| open_failed(&config.path, err))?;
        let kv = db.keyspace("kv", KeyspaceCreateOptions::default)?;
        let meta = db.keyspace("meta", KeyspaceCreateOptions::default)?;
        // fjall creates `keyspaces/<id>` without an fsync of `keyspaces/`: a
        // power cut would take the new folder away, and with it every write
        // its journal holds for that keyspace. Syncing both levels here, before
        // the first write, makes the folders as durable as the journal.
        crate::files::sync_dir(&config.path.join(KEYSPACES_DIR))?;
        crate::files::sync_dir(&config.path)?;
        let revision = match meta.get(REVISION_KEY)? {
            Some(raw) => u64::from_le_bytes(
                raw.as_ref()
                    .try_into()
                    .map_err(|_| StoreError::Internal("corrupt revision record".into()))?,
            ),
            None => 0,
        };
        let shared = Arc::new(Shared {
            db,
            kv,
            meta,
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
        let committer = Committer {
            shared: Arc::clone(&shared),
            syncer_stop,
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
        match self.shared.kv.get(key)? {
            Some(record) => Ok(Some(to_entry(key.to_vec(), &record, false)?)),
            None => Ok(None),
        }
    }

    async fn get_many(&self, keys: Vec<Vec<u8>>) -> StoreResult<Vec<Option<Entry>>> {
        if keys.len() <= INLINE_READ_ITEMS {
            return get_snapshot(&self.shared, keys);
        }
        self.run_blocking(move |shared| get_snapshot(shared, keys))
            .await
    }

    async fn write(&self, ops: Vec<WriteOp>) -> StoreResult<WriteOutcome> {
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
            Some(why) => Err(StoreError::Unavailable(why)),
            None => Ok(()),
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
    let snapshot = shared.db.snapshot();
    keys.into_iter()
        .map(|key| match snapshot.get(&shared.kv, &key)? {
            Some(record) => Ok(Some(to_entry(key, &record, false)?)),
            None => Ok(None),
        })
        .collect()
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
    let snapshot = shared.db.snapshot();
    let range = snapshot.range(&shared.kv, (request.lower.clone(), request.upper.clone()));
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
    fn current(&mut self, shared: &Shared, key: &[u8]) -> StoreResult<Option<RecordMeta>> {
        if let Some(meta) = self.0.get(key) {
            return Ok(*meta);
        }
        let meta = match shared.kv.get(key)? {
            Some(record) => Some(codec::decode(&record)?.0),
            None => None,
        };
        self.0.insert(key.to_vec(), meta);
        Ok(meta)
    }

    fn set(&mut self, key: Vec<u8>, meta: Option<RecordMeta>) {
        self.0.insert(key, meta);
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
        self.shared.db.persist(PersistMode::SyncAll)?;
        Ok(())
    }
}

impl Writer {
    fn commit_group(&mut self, shared: &Shared, writes: Vec<(Vec<WriteOp>, Reply)>) {
        if let Some(why) = shared.failure() {
            for (_, reply) in writes {
                let _ = reply.send((Err(StoreError::Unavailable(why.clone())), Duration::ZERO));
            }
            return;
        }
        let first_revision = self.revision;
        let mut accepted = Vec::with_capacity(writes.len());
        // The group's writes, one per key: two writes of one key must not share
        // a fjall batch (they would get the same sequence number).
        let mut pending = HashMap::new();
        for (ops, reply) in writes {
            match self.apply(shared, ops, &mut pending) {
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
        let mut batch = fjall::OwnedWriteBatch::with_capacity(shared.db.clone(), keys_written + 1)
            .durability(Some(self.persist));
        for (key, write) in &pending {
            match write {
                Some((_, record)) => batch.insert(&shared.kv, key.as_slice(), record.as_slice()),
                None => batch.remove(&shared.kv, key.as_slice()),
            }
        }
        batch.insert(&shared.meta, REVISION_KEY, self.revision.to_le_bytes());
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
            let why = shared.fail(what, err);
            for Accepted { reply, .. } in accepted {
                let _ = reply.send((Err(StoreError::Unavailable(why.clone())), Duration::ZERO));
            }
            return;
        }
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
        shared: &Shared,
        ops: Vec<WriteOp>,
        pending: &mut PendingWrites,
    ) -> StoreResult<WriteOutcome> {
        let mut current = Vec::with_capacity(ops.len());
        let mut failed = Vec::new();
        for (index, op) in ops.iter().enumerate() {
            let meta = match pending.get(op.key()) {
                Some(write) => write.as_ref().map(|(meta, _)| *meta),
                None => self.directory.current(shared, op.key())?,
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
        let start = Instant::now();
        let persisted = shared.db.persist(PersistMode::SyncData);
        metrics::histogram!(SYNC_SECONDS).record(start.elapsed().as_secs_f64());
        match persisted {
            Ok(()) => {
                synced = committed;
                shared.notify(CommitEvent::Synced { revision: synced });
            }
            Err(err) => {
                shared.fail("background sync", err);
                return;
            }
        }
    }
}
