//! The read cache: a decorator over any [`Store`] that never serves a version
//! older than one already acknowledged.
//!
//! The classic cache invalidated on write can: a read that misses, reads the
//! old row, and fills after a concurrent write has updated the cache puts the
//! old value back. Here every key belongs to one of `STRIPES` stripes, and all
//! cache changes of a stripe's keys happen under its lock, in revision order:
//!
//! - A write, once the store applied it and before it is answered, bumps its
//!   stripe's epoch and puts the new entry (or, for a delete, an "absent" marker
//!   carrying the delete's revision) in the cache, unless the cache already holds
//!   something newer.
//! - A read that misses notes its stripe's epoch, reads the store, and fills the
//!   cache only if that replaces an older cached revision, or if no write and no
//!   other read of the stripe completed meanwhile (also over an absence that a
//!   read found, which has no revision); then it bumps the epoch too.
//!   Without the epoch, a slow read could fill an old version after a newer one
//!   was evicted or expired.
//! - Writes and reads note the highest revision seen in their stripe, so a slow
//!   writer does not put its entry back over a newer one that was evicted; it
//!   removes the key instead.
//! - A write whose condition failed learnt the key's current version, which
//!   a concurrent write may have made before settling here: unless the cache
//!   holds that version, the key is forgotten, reads that began before may
//!   not fill it, and writes that began before may not put their entries in
//!   (any of them may be older), so a read after a 412 never finds an older
//!   version.
//!
//! A read that finds a key absent does not know since which revision, so only
//! entries are ordered this way; an absence seen before a concurrent delete is
//! acknowledged may be followed by the entry that delete removes, until it is.
//!
//! Batch reads and ranges go to the store, which reads them from one snapshot.
//!
//! Writes made by other servers (PostgreSQL) reach the cache through
//! `CachedStore::invalidate`, driven by notifications: the same stripe
//! epochs keep a read that began before the notification from filling the
//! old entry back. While notifications may be lost, `CachedStore::set_bypass`
//! sends every read to the store.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use quick_cache::Lifecycle;
use quick_cache::Weighter;

use crate::error::StoreResult;
use crate::storage::{
    Change, Entry, Feed, Found, Lease, LeaseId, OpResult, ReplicaReads, Revoked, ScanPage,
    ScanRequest, Store, WriteOp, WriteOutcome,
};

/// A write's keys, as [`CachedStore::plan`] notes them before the write.
type Plan = Vec<Planned>;

/// A key of a write, noted before the write goes to the store.
struct Planned {
    key: Vec<u8>,
    /// The value, when it may be cached.
    value: Option<Vec<u8>>,
    /// The key's stripe's [`Stripe::refusals`] then.
    refusals: u64,
}

/// Lock stripes; enough that unrelated keys rarely share one.
const STRIPES: usize = 4096;
/// Bytes counted per entry on top of its key and value (the slot, the `Arc`,
/// the entry's fields and the cache's own bookkeeping).
const ENTRY_OVERHEAD: u64 = 96;

named_enum! {
    /// Where reads are cached.
    pub enum CacheMode ("cache") {
        /// No cache: every read goes to storage.
        Off = "off",
        /// A cache in this process's memory (on PostgreSQL, kept coherent with
        /// other servers through LISTEN/NOTIFY, stale for the notification
        /// delay).
        Local = "local",
        /// A cache in Redis, shared by every server and updated by the writer
        /// before it answers.
        Redis = "redis",
    }
}

/// Bounds of the read cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheConfig {
    /// Entries held at most, "absent" markers included.
    pub max_entries: usize,
    /// Bytes held at most: keys, values and per-entry overhead.
    pub max_bytes: u64,
    /// How long an entry may be served from the cache; `None` keeps entries
    /// until they are evicted or replaced.
    pub ttl: Option<Duration>,
    /// Values larger than this are not cached (they would evict many small ones).
    pub max_value_bytes: usize,
}

impl Default for CacheConfig {
    /// One million entries, 256 MiB, a 300 s TTL, values up to 64 KiB.
    fn default() -> Self {
        CacheConfig {
            max_entries: 1_000_000,
            max_bytes: 256 << 20,
            ttl: Some(Duration::from_secs(300)),
            max_value_bytes: 64 << 10,
        }
    }
}

/// Counters of the cache since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Reads answered from the cache.
    pub hits: u64,
    /// Reads that went to the store.
    pub misses: u64,
    /// Entries evicted to stay within the bounds.
    pub evictions: u64,
    /// Entries cached now.
    pub entries: u64,
    /// Bytes of keys and values cached now.
    pub bytes: u64,
}

#[derive(Clone)]
enum Slot {
    Present(Arc<Entry>, Option<Instant>),
    /// The key is absent as of `revision` (0 when a read found it absent).
    Absent(u64, Option<Instant>),
}

impl Slot {
    fn revision(&self) -> u64 {
        match self {
            Slot::Present(entry, _) => entry.revision,
            Slot::Absent(revision, _) => *revision,
        }
    }

    /// The version the slot holds; `None` for an absent key.
    fn version(&self) -> Option<u64> {
        match self {
            Slot::Present(entry, _) => Some(entry.version),
            Slot::Absent(..) => None,
        }
    }

    fn is_fresh(&self, now: Option<Instant>) -> bool {
        let expires = match self {
            Slot::Present(_, expires) | Slot::Absent(_, expires) => *expires,
        };
        match (expires, now) {
            (Some(expires), Some(now)) => now < expires,
            _ => true,
        }
    }
}

/// Weighs an entry by its bytes, but at least `floor`, so that the byte bound
/// (the cache's capacity) also bounds the number of entries.
#[derive(Clone)]
struct SlotWeighter {
    floor: u64,
}

impl Weighter<Vec<u8>, Slot> for SlotWeighter {
    fn weight(&self, key: &Vec<u8>, slot: &Slot) -> u64 {
        let value = match slot {
            Slot::Present(entry, _) => entry.value.len() + entry.key.len(),
            Slot::Absent(..) => 0,
        };
        (key.len() as u64 + value as u64 + ENTRY_OVERHEAD).max(self.floor)
    }
}

/// Counts evictions for the metrics.
#[derive(Clone, Default)]
struct EvictionCounter(Arc<AtomicU64>);

impl Lifecycle<Vec<u8>, Slot> for EvictionCounter {
    type RequestState = ();

    fn on_evict(&self, (): &mut Self::RequestState, _key: Vec<u8>, _slot: Slot) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// What a stripe's lock guards.
#[derive(Default)]
struct Stripe {
    /// Bumped by every write of one of the stripe's keys.
    epoch: u64,
    /// The highest revision a write of the stripe's keys has put in the cache.
    max_revision: u64,
    /// Bumped when a failed condition told of a version of one of the
    /// stripe's keys that the cache did not hold: a write that began before
    /// may be older than that version without knowing it, so it puts no
    /// entry in.
    refusals: u64,
}

type SlotCache = quick_cache::sync::Cache<
    Vec<u8>,
    Slot,
    SlotWeighter,
    quick_cache::DefaultHashBuilder,
    EvictionCounter,
>;

/// A [`Store`] with a read cache in front.
pub struct CachedStore {
    inner: Arc<dyn Store>,
    cache: SlotCache,
    stripes: Box<[Mutex<Stripe>]>,
    hasher: quick_cache::DefaultHashBuilder,
    config: CacheConfig,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: EvictionCounter,
    /// Reads go to the store and fill nothing (see [`CachedStore::set_bypass`]).
    bypass: AtomicBool,
    /// How the cache is kept coherent, for `describe`.
    coherence: &'static str,
}

impl CachedStore {
    /// A cache in front of `inner`, within the bounds of `config`.
    pub fn new(inner: Arc<dyn Store>, config: CacheConfig) -> Self {
        let entries = config.max_entries.max(1);
        let floor = (config.max_bytes / entries as u64).max(1);
        let evictions = EvictionCounter::default();
        CachedStore {
            inner,
            cache: SlotCache::with(
                entries,
                config.max_bytes.max(1),
                SlotWeighter { floor },
                quick_cache::DefaultHashBuilder::default(),
                evictions.clone(),
            ),
            stripes: (0..STRIPES).map(|_| Mutex::default()).collect(),
            hasher: quick_cache::DefaultHashBuilder::default(),
            config,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions,
            bypass: AtomicBool::new(false),
            coherence: "",
        }
    }

    /// Names how the cache is kept coherent with other servers, for logs.
    #[must_use]
    pub(crate) fn with_coherence(mut self, how: &'static str) -> Self {
        self.coherence = how;
        self
    }

    /// Another server wrote `key` at `revision`: drop an older cached entry,
    /// and keep reads that began before now from filling one.
    pub(crate) fn invalidate(&self, key: &[u8], revision: u64) {
        // The same ordering as a local write that leaves no entry behind.
        self.apply_write(key.to_vec(), revision, None, None);
    }

    /// Forgets everything, and keeps every read that began before now from
    /// filling the cache.
    pub(crate) fn invalidate_all(&self) {
        for stripe in &*self.stripes {
            stripe
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .epoch += 1;
        }
        self.cache.clear();
    }

    /// While on, reads bypass the cache (for when invalidations may be
    /// lost); turning it off forgets everything first.
    pub(crate) fn set_bypass(&self, on: bool) {
        if on {
            self.bypass.store(true, Ordering::Release);
            self.invalidate_all();
        } else {
            self.invalidate_all();
            self.bypass.store(false, Ordering::Release);
        }
    }

    /// The counters so far.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            evictions: self.evictions.0.load(Ordering::Relaxed),
            entries: self.cache.len() as u64,
            bytes: self.cache.weight(),
        }
    }

    fn stripe(&self, key: &[u8]) -> MutexGuard<'_, Stripe> {
        let index = (self.hasher.hash_one(key) as usize) % STRIPES;
        // A poisoned stripe only means a panic elsewhere while it was held; its
        // two counters are still meaningful.
        self.stripes[index]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn now(&self) -> Option<Instant> {
        self.config.ttl.map(|_| Instant::now())
    }

    fn expiry(&self) -> Option<Instant> {
        self.config.ttl.map(|ttl| Instant::now() + ttl)
    }

    /// The cached slot of `key` if it may still be served.
    fn fresh(&self, key: &[u8]) -> Option<Slot> {
        self.cache
            .peek(key)
            .filter(|slot| slot.is_fresh(self.now()))
    }

    /// Whether an entry may be cached: not too large, and not on a lease,
    /// whose deadline a keepalive moves without a write to the key (a cached
    /// entry would show the old one).
    fn cacheable(&self, value_len: usize, lease: Option<LeaseId>) -> bool {
        value_len <= self.config.max_value_bytes && lease.is_none()
    }

    /// Fills the cache after a read of the store that began at `epoch`.
    fn fill(&self, key: &[u8], epoch: u64, found: Option<&Entry>) {
        let slot = match found {
            Some(entry) if self.cacheable(entry.value.len(), entry.lease) => {
                Some(Slot::Present(Arc::new(entry.clone()), self.expiry()))
            }
            Some(_) => None,
            None => Some(Slot::Absent(0, self.expiry())),
        };
        let revision = found.map_or(0, |e| e.revision);
        let mut stripe = self.stripe(key);
        // An absence a read found carries no revision (0), so it orders
        // nothing: over it, as over an empty slot, only a read that no write
        // or other read of the stripe has overtaken may fill.
        let allowed = match self.fresh(key).map(|cached| cached.revision()) {
            Some(cached) if cached > 0 => revision > cached,
            _ => stripe.epoch == epoch,
        };
        if let Some(slot) = slot.filter(|_| allowed) {
            self.cache.insert(key.to_vec(), slot);
        }
        // What this read saw is now the oldest state the cache may show: reads
        // that began before it may not fill an empty slot, and writes older
        // than it may not put their entry back.
        stripe.epoch += 1;
        stripe.max_revision = stripe.max_revision.max(revision);
    }

    /// Applies what a write did to the cache; `slot` is `None` for a put whose
    /// entry may not be cached.
    ///
    /// `refusals`: the stripe's refusals when the write began, for a write
    /// that may not put its entry in after a refusal since.
    fn apply_write(&self, key: Vec<u8>, revision: u64, slot: Option<Slot>, refusals: Option<u64>) {
        let mut stripe = self.stripe(&key);
        stripe.epoch += 1;
        let slot = slot.filter(|_| refusals.is_none_or(|began| began == stripe.refusals));
        // Whatever the cache holds of the stripe's keys was put there under
        // this lock, which raised `max_revision` to at least its revision. So
        // the newest write of the stripe replaces the key's slot without
        // looking at it (a slot of its own revision holds the same state).
        if revision >= stripe.max_revision {
            match slot {
                Some(slot) => self.cache.insert(key, slot),
                None => {
                    self.cache.remove(&key);
                }
            }
        } else if self.fresh(&key).is_none_or(|c| c.revision() < revision) {
            // An older write than one already applied: a newer write of the
            // stripe may have been evicted, so this one may not put its entry
            // back, only drop what is there unless it is newer.
            self.cache.remove(&key);
        }
        stripe.max_revision = stripe.max_revision.max(revision);
    }

    /// What the cache needs of a write, copied before the ops move into the
    /// store: each key, with its value when it may be cached.
    fn plan(&self, ops: &[WriteOp]) -> Plan {
        ops.iter()
            .map(|op| {
                let value = match op {
                    WriteOp::Put { value, .. } if self.cacheable(value.len(), None) => {
                        Some(value.clone())
                    }
                    _ => None,
                };
                Planned {
                    key: op.key().to_vec(),
                    value,
                    refusals: self.stripe(op.key()).refusals,
                }
            })
            .collect()
    }

    /// Applies a write's outcome to the cache.
    fn settle(&self, plan: Plan, outcome: &StoreResult<WriteOutcome>) {
        match outcome {
            Ok(WriteOutcome::Applied { revision, results }) => {
                for (
                    Planned {
                        key,
                        value,
                        refusals,
                    },
                    result,
                ) in plan.into_iter().zip(results)
                {
                    // A put on a lease (given, or kept by keep_ttl) is not cached.
                    let value =
                        value.filter(|_| !matches!(result, OpResult::Put { lease: Some(_), .. }));
                    let slot = match (result, value) {
                        (
                            OpResult::Put {
                                version,
                                created_at_us,
                                updated_at_us,
                                expires_at_us,
                                lease,
                                ..
                            },
                            Some(value),
                        ) => Some(Slot::Present(
                            Arc::new(Entry {
                                key: key.clone(),
                                value,
                                version: *version,
                                revision: *revision,
                                created_at_us: *created_at_us,
                                updated_at_us: *updated_at_us,
                                expires_at_us: *expires_at_us,
                                lease: *lease,
                            }),
                            self.expiry(),
                        )),
                        (OpResult::Put { .. }, None) => None,
                        (OpResult::Deleted { existed: true }, _) => {
                            Some(Slot::Absent(*revision, self.expiry()))
                        }
                        // A delete that found nothing locked nothing: on
                        // PostgreSQL a concurrent create may hold a lower
                        // revision, so its absence is not ordered.
                        // Nothing written.
                        (OpResult::Checked, _) => continue,
                        (OpResult::Deleted { existed: false }, _) => {
                            self.forget(&key);
                            continue;
                        }
                    };
                    self.apply_write(key, *revision, slot, Some(refusals));
                }
            }
            // Nothing was written, but a failed condition tells the key's
            // current version, which other writes may have made, or
            // overtaken, before settling here: a read after the 412 must not
            // find an older version in the cache.
            Ok(WriteOutcome::Rejected { failed }) => {
                for condition in failed {
                    if let Some(planned) = plan.get(condition.index) {
                        self.refused(&planned.key, condition.current_version);
                    }
                }
            }
            Err(_) => {
                for planned in &plan {
                    self.forget(&planned.key);
                }
            }
        }
    }

    /// A failed condition found `key` at `version`: unless the cache holds
    /// that version, forget the key, keep reads that began before from
    /// filling it, and writes that began before from putting their entry in
    /// (any of them may be older than `version`).
    fn refused(&self, key: &[u8], version: Option<u64>) {
        let mut stripe = self.stripe(key);
        if self.cache.peek(key).map(|slot| slot.version()) != Some(version) {
            stripe.epoch += 1;
            stripe.refusals += 1;
            self.cache.remove(key);
        }
    }

    /// After a write whose outcome is unknown: forget the keys, and keep reads
    /// that began before it from filling them.
    fn forget(&self, key: &[u8]) {
        let mut stripe = self.stripe(key);
        stripe.epoch += 1;
        self.cache.remove(key);
    }
}

#[async_trait]
impl Store for CachedStore {
    async fn get(&self, key: &[u8]) -> StoreResult<Option<Entry>> {
        if self.bypass.load(Ordering::Acquire) {
            return self.inner.get(key).await;
        }
        // An entry past its deadline is a miss: the store answers for it
        // (absent), whether or not the key's expiry delete has run yet.
        if let Some(slot) = self.cache.get(key)
            && slot.is_fresh(self.now())
            && !matches!(&slot, Slot::Present(entry, _) if entry.expired(self.inner.now_us()))
        {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(match slot {
                Slot::Present(entry, _) => Some(Entry::clone(&entry)),
                Slot::Absent(..) => None,
            });
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let epoch = self.stripe(key).epoch;
        let found = self.inner.get(key).await?;
        self.fill(key, epoch, found.as_ref());
        Ok(found)
    }

    async fn get_many(&self, keys: Vec<Vec<u8>>) -> StoreResult<Found> {
        self.inner.get_many(keys).await
    }

    async fn write(&self, ops: Vec<WriteOp>) -> StoreResult<WriteOutcome> {
        let plan = self.plan(&ops);
        let outcome = self.inner.write(ops).await;
        self.settle(plan, &outcome);
        outcome
    }

    async fn write_many(&self, writes: Vec<Vec<WriteOp>>) -> Vec<StoreResult<WriteOutcome>> {
        let plans: Vec<Plan> = writes.iter().map(|ops| self.plan(ops)).collect();
        let outcomes = self.inner.write_many(writes).await;
        for (plan, outcome) in plans.into_iter().zip(&outcomes) {
            self.settle(plan, outcome);
        }
        outcomes
    }

    async fn scan(&self, request: ScanRequest) -> StoreResult<ScanPage> {
        self.inner.scan(request).await
    }

    async fn changes(&self, after: u64, limit: usize) -> StoreResult<Vec<Change>> {
        self.inner.changes(after, limit).await
    }

    fn feed(&self) -> Arc<Feed> {
        self.inner.feed()
    }

    async fn grant_lease(&self, ttl_ms: u64, owner: Option<String>) -> StoreResult<Lease> {
        self.inner.grant_lease(ttl_ms, owner).await
    }

    async fn keep_lease_alive(&self, id: LeaseId) -> StoreResult<Lease> {
        self.inner.keep_lease_alive(id).await
    }

    async fn lease(&self, id: LeaseId) -> StoreResult<Option<Lease>> {
        self.inner.lease(id).await
    }

    async fn lease_keys(&self, id: LeaseId) -> StoreResult<u64> {
        self.inner.lease_keys(id).await
    }

    /// The revoked keys leave the cache as deletes do. (A lease that expires
    /// needs nothing: its keys' cached entries carry its deadline.)
    async fn revoke_lease(&self, id: LeaseId) -> StoreResult<Revoked> {
        let revoked = self.inner.revoke_lease(id).await?;
        for key in &revoked.keys {
            self.apply_write(
                key.clone(),
                revoked.revision,
                Some(Slot::Absent(revoked.revision, self.expiry())),
                None,
            );
        }
        Ok(revoked)
    }

    fn now_us(&self) -> i64 {
        self.inner.now_us()
    }

    async fn ready(&self) -> StoreResult<()> {
        self.inner.ready().await
    }

    fn read_only(&self) -> Option<String> {
        self.inner.read_only()
    }

    async fn close(&self) -> StoreResult<()> {
        self.inner.close().await
    }

    fn replicas(&self) -> Option<Arc<dyn ReplicaReads>> {
        self.inner.replicas()
    }

    fn cache_mode(&self) -> CacheMode {
        CacheMode::Local
    }

    fn report_metrics(&self) {
        let stats = self.stats();
        metrics::counter!("kvstore_cache_hits_total").absolute(stats.hits);
        metrics::counter!("kvstore_cache_misses_total").absolute(stats.misses);
        metrics::counter!("kvstore_cache_evictions_total").absolute(stats.evictions);
        metrics::gauge!("kvstore_cache_entries").set(stats.entries as f64);
        metrics::gauge!("kvstore_cache_bytes").set(stats.bytes as f64);
        self.inner.report_metrics();
    }

    fn describe(&self) -> String {
        format!(
            "{} with a local read cache{}",
            self.inner.describe(),
            self.coherence
        )
    }
}
