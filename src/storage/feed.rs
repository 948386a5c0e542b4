//! Live delivery of changes to watchers, the same on every backend.
//!
//! A backend publishes each revision once it is durable and readable: the
//! embedded engine hands over the change record it has just committed, the
//! PostgreSQL poller the changes below its watermark. Publishing only queues
//! the work (or, while no watcher is open, drops it: the change log has it);
//! the feed's own thread decodes it, keeps the most recent changes
//! in a bounded ring, and hands each change to the registered watchers whose
//! range it touches, so that neither the writer nor a watcher that touches
//! nothing pays for the others.
//!
//! A watcher is either *live* (registered: the feed thread sends it what
//! touches its range through a bounded queue) or *catching up* (reading older
//! revisions itself, from the ring or else from the backend's change log with
//! [`Store::changes`]). A watcher whose queue fills up is dropped from the
//! registry and catches up from where it was, so a slow watcher never stalls
//! the feed and never holds more than its queue's bound; once it reaches the
//! head again it registers again. A watcher that falls behind the history the
//! backend keeps gets [`StoreError::Compacted`].

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use tokio::sync::mpsc;

use super::Store;
use super::changes::{Change, KeyRange, decode_record};
use crate::error::{StoreError, StoreResult};

/// The ring keeps at most this many recent changes, and this many bytes of them.
const RING_CHANGES: usize = 65_536;
const RING_BYTES: usize = 64 << 20;
/// Published work not yet taken by the feed thread, at most: past it the feed
/// forgets what it holds and every watcher catches up from the change log.
const INBOX_BYTES: usize = 64 << 20;
/// A live watcher's queue: past this many changes or bytes it is dropped to
/// catching up.
const WATCHER_QUEUE: usize = 1024;
const WATCHER_QUEUE_BYTES: usize = 16 << 20;
/// Revisions read from the change log at a time while catching up.
const CATCH_UP_PAGE: usize = 1000;

/// Metric names of the feed.
const WATCHERS_GAUGE: &str = "kvstore_watchers";
const EVENTS_SENT: &str = "kvstore_watch_events_sent_total";
const WATCHER_LAG: &str = "kvstore_watcher_lag_revisions";
const LAGGED: &str = "kvstore_watchers_lagged_total";

/// What a backend publishes.
enum Published {
    /// An embedded change record, still encoded.
    Record(Vec<u8>),
    /// Decoded changes, in revision order.
    Changes(Vec<Change>),
}

#[derive(Default)]
struct Inbox {
    items: VecDeque<Published>,
    bytes: usize,
    /// Revisions up to this one were dropped, not queued (the inbox was
    /// full, nobody watched, or the feed restarted): they are only in the
    /// change log now.
    forgotten_through: Option<u64>,
    /// The highest revision published so far. Taken with the items, under
    /// the same lock: a revision published after the items were taken must
    /// not count as dispatched with them.
    through: u64,
}

impl Inbox {
    /// Drops what is queued, up to the latest revision published; the feed
    /// thread then starts over from there.
    fn forget(&mut self) {
        self.items.clear();
        self.bytes = 0;
        self.forgotten_through = Some(self.through);
    }
}

struct Registration {
    range: KeyRange,
    /// Changes up to this revision were read by the watcher itself.
    skip_through: u64,
    queue: mpsc::Sender<Arc<Change>>,
    queued_bytes: Arc<AtomicUsize>,
}

struct State {
    /// Every change with a revision in `(covered_from, head]`, in order.
    ring: VecDeque<Arc<Change>>,
    ring_bytes: usize,
    covered_from: u64,
    head: u64,
    watchers: Watchers,
    next_id: u64,
}

impl State {
    /// Empties the ring, which then covers nothing up to `revision`.
    fn start_over(&mut self, revision: u64) {
        self.ring.clear();
        self.ring_bytes = 0;
        self.covered_from = revision;
        self.head = revision;
    }
}

/// The live watchers, indexed so that a change finds the ones its keys
/// concern without a look at every watcher: single keys and prefixes by
/// hash (as etcd keeps its key watchers in a map), any other range in a
/// list that every change goes through.
#[derive(Default)]
struct Watchers {
    all: HashMap<u64, Registration>,
    keys: HashMap<Vec<u8>, Vec<u64>>,
    prefixes: HashMap<Vec<u8>, Vec<u64>>,
    /// How many watched prefixes have each length.
    prefix_lengths: BTreeMap<usize, usize>,
    others: Vec<u64>,
}

impl Watchers {
    fn insert(&mut self, id: u64, registration: Registration) {
        let range = &registration.range;
        if let Some(key) = range.single_key() {
            self.keys.entry(key.to_vec()).or_default().push(id);
        } else if let Some(prefix) = range.prefix() {
            self.prefixes.entry(prefix.to_vec()).or_default().push(id);
            *self.prefix_lengths.entry(prefix.len()).or_default() += 1;
        } else {
            self.others.push(id);
        }
        self.all.insert(id, registration);
    }

    fn remove(&mut self, id: u64) {
        let Some(registration) = self.all.remove(&id) else {
            return;
        };
        let range = &registration.range;
        if let Some(key) = range.single_key() {
            remove_from(&mut self.keys, key, id);
        } else if let Some(prefix) = range.prefix() {
            remove_from(&mut self.prefixes, prefix, id);
            if let Some(count) = self.prefix_lengths.get_mut(&prefix.len()) {
                *count -= 1;
                if *count == 0 {
                    self.prefix_lengths.remove(&prefix.len());
                }
            }
        } else {
            self.others.retain(|other| *other != id);
        }
    }

    fn clear(&mut self) {
        *self = Watchers::default();
    }

    fn len(&self) -> usize {
        self.all.len()
    }

    /// The watchers whose ranges may hold a key of `change`, each once.
    fn concerned(&self, change: &Change) -> Vec<u64> {
        let mut ids = self.others.clone();
        for event in &change.events {
            let key = event.key();
            ids.extend(self.keys.get(key).into_iter().flatten());
            for &length in self.prefix_lengths.keys() {
                if length > key.len() {
                    break;
                }
                ids.extend(self.prefixes.get(&key[..length]).into_iter().flatten());
            }
        }
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

fn remove_from(index: &mut HashMap<Vec<u8>, Vec<u64>>, key: &[u8], id: u64) {
    if let Some(ids) = index.get_mut(key) {
        ids.retain(|other| *other != id);
        if ids.is_empty() {
            index.remove(key);
        }
    }
}

/// The live change feed of one store.
pub struct Feed {
    inbox: Mutex<Inbox>,
    inbox_ready: Condvar,
    state: Mutex<State>,
    /// The last revision published (it may not have been dispatched yet).
    latest: AtomicU64,
    /// The ring's head: every change up to it has been sent to the live
    /// watchers it touches.
    dispatched: AtomicU64,
    open_watchers: AtomicUsize,
    closed: AtomicBool,
}

impl Feed {
    /// A feed whose history so far ends at `revision`; starts its thread.
    ///
    /// # Errors
    /// When the thread cannot be started.
    pub fn start(revision: u64) -> std::io::Result<Arc<Feed>> {
        let feed = Arc::new(Feed::new(revision));
        let weak = Arc::downgrade(&feed);
        std::thread::Builder::new()
            .name("kvstore-feed".into())
            .spawn(move || run(&weak))?;
        Ok(feed)
    }

    /// A feed whose history so far ends at `revision`, without its thread.
    fn new(revision: u64) -> Feed {
        Feed {
            inbox: Mutex::new(Inbox {
                through: revision,
                ..Inbox::default()
            }),
            inbox_ready: Condvar::new(),
            state: Mutex::new(State {
                ring: VecDeque::new(),
                ring_bytes: 0,
                covered_from: revision,
                head: revision,
                watchers: Watchers::default(),
                next_id: 0,
            }),
            latest: AtomicU64::new(revision),
            dispatched: AtomicU64::new(revision),
            open_watchers: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
        }
    }

    /// The last revision published: where a watch without a starting
    /// revision begins (after it).
    pub fn latest(&self) -> u64 {
        self.latest.load(Ordering::Acquire)
    }

    /// Publishes an encoded change record of the embedded engine whose last
    /// revision is `last_revision`. Never blocks on watchers.
    pub(crate) fn publish_record(&self, record: Vec<u8>, last_revision: u64) {
        let bytes = record.len();
        self.publish(Published::Record(record), bytes, last_revision);
    }

    /// Publishes decoded changes, in revision order, ending at `through`
    /// (which may be above the last change: revisions that changed nothing).
    pub fn publish_changes(&self, changes: Vec<Change>, through: u64) {
        let bytes = changes.iter().map(Change::weight).sum();
        self.publish(Published::Changes(changes), bytes, through);
    }

    /// Forgets what the feed holds and goes on from `revision`: every
    /// watcher reads from the change log again (and so learns whether its
    /// position is still kept). For a backend that could not tell where its
    /// history ended when the feed started, whose position was trimmed, or
    /// that has no watcher to read its changes for.
    pub fn restart(&self, revision: u64) {
        let mut inbox = lock(&self.inbox);
        inbox.through = inbox.through.max(revision);
        inbox.forget();
        self.latest.fetch_max(revision, Ordering::AcqRel);
        drop(inbox);
        self.inbox_ready.notify_one();
    }

    fn publish(&self, item: Published, bytes: usize, through: u64) {
        let mut inbox = lock(&self.inbox);
        inbox.through = inbox.through.max(through);
        self.latest.fetch_max(through, Ordering::AcqRel);
        // Unwatched, what is published is dropped at once and the feed
        // thread is not woken for it: a thread woken after every commit cost
        // a write about 3% of the server's CPU (RESP SETs at 50
        // connections). A watcher that opens wakes it (see `Watcher::start`).
        let watched = self.watched();
        if !watched || (inbox.bytes + bytes > INBOX_BYTES && !inbox.items.is_empty()) {
            // Or the feed thread is far behind: forget, and let every watcher
            // read from the change log, rather than hold memory without bound.
            inbox.forget();
        } else {
            inbox.bytes += bytes;
            inbox.items.push_back(item);
        }
        drop(inbox);
        if watched {
            self.inbox_ready.notify_one();
        }
    }

    /// Has the feed thread settle what was published while nobody watched.
    fn wake(&self) {
        // Taken so that the thread is either before its look at the inbox or
        // waiting: the notification cannot fall between the two.
        drop(lock(&self.inbox));
        self.inbox_ready.notify_one();
    }

    /// Ends every watcher's live delivery and stops the feed thread; watchers
    /// then fail their next read from the closed store.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        lock(&self.state).watchers.clear();
        self.inbox_ready.notify_one();
    }

    /// Forgets the changes up to `revision`, which the change log no longer
    /// keeps either: a watcher from below it is told it is compacted, as the
    /// log would tell it, rather than served or refused depending on what the
    /// ring happens to hold.
    pub fn forget_through(&self, revision: u64) {
        let mut state = lock(&self.state);
        while let Some(old) = state.ring.front() {
            if old.revision > revision {
                break;
            }
            state.ring_bytes -= old.weight();
            state.ring.pop_front();
        }
        state.covered_from = state.covered_from.max(revision);
    }

    /// Watchers open now.
    pub fn watchers(&self) -> usize {
        self.open_watchers.load(Ordering::Acquire)
    }

    /// Whether a watcher is open: without one, what is published is not
    /// kept, so a backend need not read its changes to publish them (it can
    /// [`Feed::restart`] instead).
    pub fn watched(&self) -> bool {
        self.watchers() > 0
    }

    /// The changes after `position` that the ring holds, at most `max`;
    /// `None` when the ring no longer reaches back that far. Also gives the
    /// revision up to which the answer covers.
    fn read_ring(&self, position: u64, max: usize) -> Option<(Vec<Arc<Change>>, u64)> {
        let state = lock(&self.state);
        if position < state.covered_from {
            return None;
        }
        let start = state.ring.partition_point(|c| c.revision <= position);
        let taken: Vec<Arc<Change>> = state.ring.iter().skip(start).take(max).cloned().collect();
        let through = if start + taken.len() == state.ring.len() {
            state.head.max(position)
        } else {
            taken.last().map_or(position, |c| c.revision)
        };
        Some((taken, through))
    }

    /// Registers a watcher that has read everything up to `position`, unless
    /// the feed has dispatched past it (then the watcher reads on first).
    fn register(&self, range: &KeyRange, position: u64) -> Option<Live> {
        let mut state = lock(&self.state);
        if state.head > position || self.closed.load(Ordering::Acquire) {
            return None;
        }
        let (queue, changes) = mpsc::channel(WATCHER_QUEUE);
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let id = state.next_id;
        state.next_id += 1;
        state.watchers.insert(
            id,
            Registration {
                range: range.clone(),
                skip_through: position,
                queue,
                queued_bytes: Arc::clone(&queued_bytes),
            },
        );
        Some(Live {
            id,
            changes,
            queued_bytes,
        })
    }

    fn unregister(&self, id: u64) {
        lock(&self.state).watchers.remove(id);
    }

    /// Takes what was published, up to revision `latest`, decodes it, and
    /// hands it out.
    fn dispatch(&self, items: Vec<Published>, forgotten_through: Option<u64>, latest: u64) {
        if let Some(forgotten) = forgotten_through {
            // What was dropped is only in the change log now: the ring
            // starts over after it, and a watcher registered below it reads
            // it from the log.
            let mut state = lock(&self.state);
            let from = state.head.max(forgotten);
            state.start_over(from);
            let behind: Vec<u64> = state
                .watchers
                .all
                .iter()
                .filter(|(_, watcher)| watcher.skip_through < forgotten)
                .map(|(&id, _)| id)
                .collect();
            if !behind.is_empty() {
                metrics::counter!(LAGGED).increment(behind.len() as u64);
                for id in behind {
                    state.watchers.remove(id);
                }
            }
        }
        // With no watcher open, nothing is decoded or kept: one that opens
        // later reads from the change log, and one that opens meanwhile is
        // moved there.
        if !self.watched() {
            let mut state = lock(&self.state);
            state.start_over(latest);
            if state.watchers.len() > 0 {
                metrics::counter!(LAGGED).increment(state.watchers.len() as u64);
                state.watchers.clear();
            }
            self.dispatched.store(latest, Ordering::Release);
            return;
        }
        let mut changes = Vec::new();
        for item in items {
            match item {
                Published::Changes(decoded) => changes.extend(decoded),
                Published::Record(record) => match decode_record(&record) {
                    Ok(decoded) => changes.extend(decoded),
                    Err(err) => {
                        // The record was committed from these bytes: a bug.
                        tracing::error!(error = %err, "a published change record does not decode");
                    }
                },
            }
        }
        let mut state = lock(&self.state);
        let mut dropped = Vec::new();
        for change in changes {
            if change.revision <= state.head {
                continue;
            }
            let change = Arc::new(change);
            let weight = change.weight();
            for id in state.watchers.concerned(&change) {
                let Some(watcher) = state.watchers.all.get(&id) else {
                    continue;
                };
                if change.revision <= watcher.skip_through
                    || !change
                        .events
                        .iter()
                        .any(|event| watcher.range.contains(event.key()))
                {
                    continue;
                }
                let queued = watcher.queued_bytes.load(Ordering::Acquire);
                let sent = (queued == 0 || queued + weight <= WATCHER_QUEUE_BYTES)
                    && watcher.queue.try_send(Arc::clone(&change)).is_ok();
                if sent {
                    watcher.queued_bytes.fetch_add(weight, Ordering::AcqRel);
                } else {
                    dropped.push(id);
                }
            }
            for id in dropped.drain(..) {
                state.watchers.remove(id);
                metrics::counter!(LAGGED).increment(1);
            }
            state.head = change.revision;
            state.ring_bytes += weight;
            state.ring.push_back(change);
            while state.ring.len() > RING_CHANGES || state.ring_bytes > RING_BYTES {
                match state.ring.pop_front() {
                    Some(old) => {
                        state.ring_bytes -= old.weight();
                        state.covered_from = old.revision;
                    }
                    None => break,
                }
            }
        }
        // Revisions that changed nothing move the head too.
        if latest > state.head {
            state.head = latest;
        }
        self.dispatched.store(state.head, Ordering::Release);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the state whole between statements.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The feed thread: it holds the feed only while there is work, so that a
/// dropped store lets it end.
fn run(feed: &Weak<Feed>) {
    loop {
        let Some(feed) = feed.upgrade() else { return };
        if feed.closed.load(Ordering::Acquire) {
            return;
        }
        let mut inbox = lock(&feed.inbox);
        // Unwatched, what was dropped waits for the timeout (or a watcher):
        // settling it after every commit would wake the thread as often as
        // queueing did.
        if inbox.items.is_empty() && (inbox.forgotten_through.is_none() || !feed.watched()) {
            inbox = feed
                .inbox_ready
                .wait_timeout(inbox, Duration::from_millis(500))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        feed.dispatch_inbox(inbox);
    }
}

impl Feed {
    /// Takes everything from the inbox, and dispatches it if there is
    /// anything to do.
    fn dispatch_inbox(&self, mut inbox: MutexGuard<'_, Inbox>) {
        let items: Vec<Published> = inbox.items.drain(..).collect();
        let forgotten_through = inbox.forgotten_through.take();
        let through = inbox.through;
        inbox.bytes = 0;
        drop(inbox);
        if !items.is_empty()
            || forgotten_through.is_some()
            || through > self.dispatched.load(Ordering::Acquire)
        {
            self.dispatch(items, forgotten_through, through);
        }
    }
}

/// A live watcher's end of its queue.
struct Live {
    id: u64,
    changes: mpsc::Receiver<Arc<Change>>,
    queued_bytes: Arc<AtomicUsize>,
}

/// One client's view of the feed: the changes to a range, from a revision on,
/// in order, each once.
pub struct Watcher {
    feed: Arc<Feed>,
    store: Arc<dyn Store>,
    range: KeyRange,
    /// Every change to the range up to here has been handed out (or is in
    /// `ready`).
    position: u64,
    ready: VecDeque<Change>,
    live: Option<Live>,
}

impl Watcher {
    /// A watcher of `range` from revision `from` (after the latest published
    /// one when `None`).
    ///
    /// # Errors
    /// [`StoreError::Compacted`] when `from` is older than the history kept;
    /// the store's errors.
    pub async fn start(
        feed: Arc<Feed>,
        store: Arc<dyn Store>,
        range: KeyRange,
        from: Option<u64>,
    ) -> StoreResult<Watcher> {
        let position = match from {
            Some(from) => from.saturating_sub(1),
            None => feed.latest(),
        };
        if feed.read_ring(position, 0).is_none() {
            // Older than the ring: the change log says whether it is kept.
            store.changes(position, 1).await?;
        }
        if feed.open_watchers.fetch_add(1, Ordering::AcqRel) == 0 {
            // What was published while nobody watched was dropped unseen by
            // the feed thread: it settles that now, not at its next timeout.
            feed.wake();
        }
        metrics::gauge!(WATCHERS_GAUGE).increment(1.0);
        Ok(Watcher {
            feed,
            store,
            range,
            position,
            ready: VecDeque::new(),
            live: None,
        })
    }

    /// The next change to the range, waiting for it at most `wait`; `None`
    /// when none came in time.
    ///
    /// # Errors
    /// [`StoreError::Compacted`] when the watcher fell behind the history
    /// kept; the store's errors (the store closed, say).
    pub async fn next(&mut self, wait: Duration) -> StoreResult<Option<Change>> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(change) = self.ready.pop_front() {
                self.sent(&change);
                return Ok(Some(change));
            }
            if let Some(live) = &mut self.live {
                let received = match live.changes.try_recv() {
                    Ok(change) => Some(change),
                    Err(mpsc::error::TryRecvError::Empty) => {
                        match tokio::time::timeout_at(deadline, live.changes.recv()).await {
                            Ok(received) => received,
                            Err(_) => return Ok(None),
                        }
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => None,
                };
                match received {
                    Some(change) => {
                        live.queued_bytes
                            .fetch_sub(change.weight(), Ordering::AcqRel);
                        self.take(&change);
                    }
                    // Dropped for falling behind, or the feed closed: catch up.
                    None => self.go_offline(),
                }
                continue;
            }
            if self.feed.closed.load(Ordering::Acquire) {
                return Err(StoreError::Unavailable("the store is closed".into()));
            }
            let caught_up = self.catch_up().await?;
            if caught_up && self.ready.is_empty() {
                self.live = self.feed.register(&self.range, self.position);
                if self.live.is_none() {
                    tokio::task::yield_now().await;
                }
            }
        }
    }

    /// The revision up to which the range is known to be unchanged beyond
    /// what [`Watcher::next`] has given (for progress messages). Moves the
    /// watcher's position there.
    pub fn progress(&mut self) -> u64 {
        if let Some(live) = &mut self.live {
            // Everything up to `dispatched` that touches the range is in the
            // queue by the time it is read (the feed thread sends first).
            let dispatched = self.feed.dispatched.load(Ordering::Acquire);
            let mut received = Vec::new();
            while let Ok(change) = live.changes.try_recv() {
                live.queued_bytes
                    .fetch_sub(change.weight(), Ordering::AcqRel);
                received.push(change);
            }
            let dropped = live.changes.is_closed();
            for change in received {
                self.take(&change);
            }
            if dropped {
                // Dropped for falling behind: what came after its last
                // change was never queued, and is read from the ring or log.
                self.go_offline();
            } else if self.ready.is_empty() {
                self.position = self.position.max(dispatched);
            }
        }
        self.ready
            .front()
            .map_or(self.position, |c| c.revision.saturating_sub(1))
    }

    /// Reads older changes from the ring, or else from the change log; gives
    /// whether the watcher has reached the feed's head.
    async fn catch_up(&mut self) -> StoreResult<bool> {
        if let Some((changes, through)) = self.feed.read_ring(self.position, CATCH_UP_PAGE) {
            let reached = changes.len() < CATCH_UP_PAGE;
            for change in &changes {
                self.take(change);
            }
            self.position = self.position.max(through);
            return Ok(reached);
        }
        let changes = self.store.changes(self.position, CATCH_UP_PAGE).await?;
        if changes.is_empty() {
            // The log holds nothing newer yet; the ring will.
            tokio::task::yield_now().await;
        }
        for change in changes {
            self.take(&change);
        }
        Ok(false)
    }

    /// Takes one change in order: queues it when it touches the range.
    fn take(&mut self, change: &Change) {
        if change.revision <= self.position {
            return;
        }
        self.position = change.revision;
        if let Some(mine) = change.within(&self.range) {
            self.ready.push_back(mine);
        }
    }

    fn sent(&self, change: &Change) {
        metrics::counter!(EVENTS_SENT).increment(change.events.len() as u64);
        let lag = self.feed.latest().saturating_sub(change.revision);
        metrics::histogram!(WATCHER_LAG).record(lag as f64);
    }

    fn go_offline(&mut self) {
        if let Some(live) = self.live.take() {
            self.feed.unregister(live.id);
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.go_offline();
        self.feed.open_watchers.fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!(WATCHERS_GAUGE).decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use std::ops::Bound;

    use super::*;
    use crate::storage::changes::{DeleteReason, Event, prefix_end};

    fn registration(range: KeyRange) -> Registration {
        let (queue, _) = mpsc::channel(1);
        Registration {
            range,
            skip_through: 0,
            queue,
            queued_bytes: Arc::default(),
        }
    }

    fn key(k: &str) -> KeyRange {
        KeyRange {
            lower: Bound::Included(k.as_bytes().to_vec()),
            upper: Bound::Included(k.as_bytes().to_vec()),
        }
    }

    fn prefix(p: &str) -> KeyRange {
        KeyRange {
            lower: Bound::Included(p.as_bytes().to_vec()),
            upper: prefix_end(p.as_bytes()).map_or(Bound::Unbounded, Bound::Excluded),
        }
    }

    fn change(keys: &[&str]) -> Change {
        Change {
            revision: 1,
            events: keys
                .iter()
                .map(|k| Event::Delete {
                    key: k.as_bytes().to_vec(),
                    version: 1,
                    reason: DeleteReason::Deleted,
                })
                .collect(),
        }
    }

    /// Unwatched, what is published is dropped at once. A watcher that
    /// registered below the dropped revisions before the feed thread settled
    /// them is moved to the change log; one registered at the latest
    /// revision stays live and gets what comes next.
    #[test]
    fn revisions_published_unwatched_are_read_from_the_log() {
        let feed = Feed::new(100);
        let at = |revision| Change {
            revision,
            ..change(&["a"])
        };
        for revision in 101..=105 {
            feed.publish_changes(vec![at(revision)], revision);
        }
        assert_eq!(feed.latest(), 105);
        assert!(lock(&feed.inbox).items.is_empty(), "nothing is queued");
        feed.open_watchers.fetch_add(2, Ordering::AcqRel);
        let everything = KeyRange::everything();
        let mut behind = feed.register(&everything, 102).expect("the head is 100");
        let mut current = feed.register(&everything, 105).expect("the head is 100");
        feed.dispatch_inbox(lock(&feed.inbox));
        assert!(matches!(
            behind.changes.try_recv(),
            Err(mpsc::error::TryRecvError::Disconnected)
        ));
        assert!(
            feed.read_ring(102, 10).is_none(),
            "the ring claims nothing it dropped"
        );
        feed.publish_changes(vec![at(106)], 106);
        feed.dispatch_inbox(lock(&feed.inbox));
        assert_eq!(current.changes.try_recv().map(|c| c.revision), Ok(106));
        let (ring, through) = feed.read_ring(105, 10).expect("the ring starts at 105");
        assert_eq!((ring.len(), through), (1, 106));
    }

    /// Every watcher whose range holds a key of the change is found, by the
    /// index or the list of other ranges, and only those of the index.
    #[test]
    fn a_change_finds_the_watchers_of_its_keys() {
        let mut watchers = Watchers::default();
        watchers.insert(0, registration(key("a/1")));
        watchers.insert(1, registration(prefix("a/")));
        watchers.insert(2, registration(prefix("b/")));
        watchers.insert(3, registration(KeyRange::everything()));
        watchers.insert(4, registration(prefix("a/1")));
        watchers.insert(5, registration(prefix("\u{ff}")));
        watchers.insert(
            6,
            registration(KeyRange {
                lower: Bound::Included(b"a".to_vec()),
                upper: Bound::Excluded(b"c".to_vec()),
            }),
        );
        assert_eq!(watchers.concerned(&change(&["a/1"])), [0, 1, 3, 4, 6]);
        assert_eq!(watchers.concerned(&change(&["b/2", "a/2"])), [1, 2, 3, 6]);
        assert_eq!(watchers.concerned(&change(&["z"])), [3, 6]);
        assert_eq!(watchers.concerned(&change(&["\u{ff}x"])), [3, 5, 6]);
        for id in [0, 1, 3, 6] {
            watchers.remove(id);
        }
        assert_eq!(watchers.concerned(&change(&["a/1", "b/1"])), [2, 4]);
        assert_eq!(watchers.len(), 3);
        watchers.remove(4);
        assert_eq!(
            watchers.prefix_lengths.get(&3),
            None,
            "no prefix of length 3 left"
        );
    }
}
