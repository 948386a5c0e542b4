//! The conformance suite: random sequences of puts, conditional puts,
//! deletes, batches, reads and scans, with the store closed and reopened in
//! between, checked step by step against a `BTreeMap` model, on every
//! backend (PostgreSQL when `KVSTORE_TEST_POSTGRES_URL` is set) under every
//! cache mode (off, local, and the Redis-shared cache when
//! `KVSTORE_TEST_REDIS_URL` is set), each store built as `serve` builds it
//! ([`Stack::build`]). Watchers check the change feed against the model's
//! history: one follows everything from revision 1 and resumes after every
//! reopen, and others start at random past revisions on random ranges.
//!
//! The model decides each write with the rules every backend shares
//! ([`kvstore::storage::rules::decide`]): where PostgreSQL restates them in
//! SQL (its single puts and deletes), this is what shows that they agree.
//! Timestamps are checked on their own too: a put of a live key keeps its
//! `created_at` and never moves `updated_at` back, a put of an absent key is
//! stamped anew, and every stamp lies within the clock's readings around the
//! call: the model's clock on the embedded engine, the real clock on
//! PostgreSQL (so the tests' PostgreSQL must share the tests' clock, as a
//! local one does). Reads and watchers must then show exactly those stamps.
//!
//! On the embedded engine the store runs on a clock the test controls, and
//! the steps add expiry: puts with a TTL, `keep_ttl` or a lease, leases
//! granted, renewed and revoked, and the clock moved on, after which the
//! expirer's deletes (each key under its own revision, a lease's keys under
//! one) must be exactly the model's.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use kvstore::StoreError;
use kvstore::stack::{Backend, Layers, Stack, StackConfig};
use kvstore::storage::embedded::EmbeddedConfig;
use kvstore::storage::layer::cache::CacheMode;
use kvstore::storage::layer::redis_cache::RedisConfig;
use kvstore::storage::rules::{self, Effect, KeyMeta};
use kvstore::storage::{
    Change, Condition, DeleteReason, Entry, Event, Expiry, KeyRange, LeaseId, OpResult,
    ScanRequest, Store, Watcher, WriteOp, WriteOutcome, system_now_us,
};
use proptest::prelude::*;

/// Few keys, so that writes collide; some share prefixes.
const KEYS: &[&str] = &["a", "a/", "a/b", "ab", "b", "b/c", "c", "é"];

#[derive(Debug, Clone)]
enum Step {
    Write(Vec<StepOp>),
    Get(usize),
    GetMany(Vec<usize>),
    Scan {
        lower: Bound<usize>,
        upper: Bound<usize>,
        reverse: bool,
        limit: usize,
        keys_only: bool,
    },
    Reopen,
    /// Watch `lower..upper` from `back` revisions before the current one.
    Watch {
        lower: Bound<usize>,
        upper: Bound<usize>,
        back: u64,
    },
    /// Move the clock on by this many milliseconds.
    Advance(u64),
    /// A write made while the clock reads this many milliseconds before the
    /// model's time (a clock that stepped back), which then steps forward
    /// again. Its puts name no lease: one that has just expired may not be
    /// ended yet, and would still be live to the store at the earlier time.
    Past(u64, Vec<StepOp>),
    Grant(u64),
    KeepAlive(usize),
    Revoke(usize),
}

/// A put's expiry as the steps name it: leases by their index in the order
/// granted (a step's lease index that was never granted names an unknown id).
#[derive(Debug, Clone, Copy)]
enum StepExpiry {
    Never,
    Ttl(u64),
    /// A deadline this many milliseconds after the model's time when the
    /// step runs (never past: the expirer's delete would then race the
    /// next step).
    At(i64),
    Keep,
    Lease(usize),
}

/// A lease id no grant gives (ids are random 64-bit numbers).
const UNKNOWN_LEASE: LeaseId = 0x00ab_cdef;

/// Where the clock starts: 2027-01-15.
const EPOCH_US: i64 = 1_800_000_000_000_000;

/// What one revision did to one key, as the model sees it: the key, what
/// happened (`put`, or a delete's reason), the version written or removed,
/// and a put's `created_at` and `updated_at`.
type ModelEvent = (Vec<u8>, &'static str, u64, Option<(i64, i64)>);

#[derive(Debug, Clone, PartialEq)]
struct ModelEntry {
    value: Vec<u8>,
    version: u64,
    revision: u64,
    /// As the store stamped them, once checked.
    created_at_us: i64,
    updated_at_us: i64,
    /// The key's own deadline.
    expires_at_us: Option<i64>,
    lease: Option<LeaseId>,
}

#[derive(Debug, Clone, PartialEq)]
struct ModelLease {
    id: LeaseId,
    ttl_ms: u64,
    expires_at_us: i64,
}

/// An entry as a read shows it: with its effective deadline.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    value: Vec<u8>,
    version: u64,
    revision: u64,
    created_at_us: i64,
    updated_at_us: i64,
    expires_at_us: Option<i64>,
    lease: Option<LeaseId>,
}

#[derive(Default)]
struct Model {
    entries: BTreeMap<Vec<u8>, ModelEntry>,
    revision: u64,
    /// The events of every revision, in order.
    history: Vec<(u64, Vec<ModelEvent>)>,
    now_us: i64,
    /// Leases by the index of their grant; `None` once ended.
    leases: Vec<Option<ModelLease>>,
    /// The ids of all leases granted, by index.
    ids: Vec<LeaseId>,
}

impl ModelEntry {
    fn meta(&self) -> KeyMeta {
        KeyMeta {
            version: self.version,
            created_at_us: self.created_at_us,
            updated_at_us: self.updated_at_us,
            expires_at_us: self.expires_at_us,
            lease: self.lease,
        }
    }
}

impl Seen {
    fn of(e: Entry) -> Self {
        Seen {
            value: e.value,
            version: e.version,
            revision: e.revision,
            created_at_us: e.created_at_us,
            updated_at_us: e.updated_at_us,
            expires_at_us: e.expires_at_us,
            lease: e.lease,
        }
    }
}

impl Model {
    fn lease_id(&self, index: usize) -> LeaseId {
        self.ids.get(index).copied().unwrap_or(UNKNOWN_LEASE)
    }

    fn live_lease(&self, id: LeaseId) -> Option<&ModelLease> {
        self.leases.iter().flatten().find(|lease| lease.id == id)
    }

    fn seen(&self, entry: &ModelEntry) -> Seen {
        Seen {
            value: entry.value.clone(),
            version: entry.version,
            revision: entry.revision,
            created_at_us: entry.created_at_us,
            updated_at_us: entry.updated_at_us,
            expires_at_us: entry.expires_at_us.or_else(|| {
                entry
                    .lease
                    .and_then(|id| self.live_lease(id).map(|l| l.expires_at_us))
            }),
            lease: entry.lease,
        }
    }

    fn record(&mut self, events: Vec<ModelEvent>) {
        self.revision += 1;
        self.history.push((self.revision, events));
    }

    /// Ends a lease: its keys go in one revision (none if it has no keys).
    fn end_lease(&mut self, index: usize, reason: &'static str) -> Vec<Vec<u8>> {
        let Some(lease) = self.leases[index].take() else {
            return Vec::new();
        };
        let keys: Vec<Vec<u8>> = self
            .entries
            .iter()
            .filter(|(_, e)| e.lease == Some(lease.id))
            .map(|(k, _)| k.clone())
            .collect();
        if !keys.is_empty() {
            let events = keys
                .iter()
                .map(|k| (k.clone(), reason, self.entries[k].version, None))
                .collect();
            for key in &keys {
                self.entries.remove(key);
            }
            self.record(events);
        }
        keys
    }

    /// The expirer's round at the model's time: due leases (earliest first),
    /// then due keys by deadline and key, each under its own revision.
    fn expire(&mut self) {
        let mut due: Vec<(i64, LeaseId, usize)> = self
            .leases
            .iter()
            .enumerate()
            .filter_map(|(i, l)| l.as_ref().map(|l| (l.expires_at_us, l.id, i)))
            .filter(|(deadline, _, _)| *deadline <= self.now_us)
            .collect();
        due.sort_unstable();
        for (_, _, index) in due {
            self.end_lease(index, "expired");
        }
        let mut keys: Vec<(i64, Vec<u8>)> = self
            .entries
            .iter()
            .filter_map(|(k, e)| e.expires_at_us.map(|d| (d, k.clone())))
            .filter(|(deadline, _)| *deadline <= self.now_us)
            .collect();
        keys.sort();
        for (_, key) in keys {
            let version = self.entries[&key].version;
            self.entries.remove(&key);
            self.record(vec![(key, "expired", version, None)]);
        }
    }

    /// Checks what the store answered to a write against the rules, decided
    /// over the model's entries with the clock read at `lo` (and read again
    /// at `hi` once the store answered), and applies it to the model.
    fn write(
        &mut self,
        ops: &[WriteOp],
        (lo, hi): (i64, i64),
        got: Result<WriteOutcome, StoreError>,
        n: usize,
    ) {
        let missing = ops.iter().find_map(|op| match op {
            WriteOp::Put {
                expiry: Expiry::Lease(id),
                ..
            } if self.live_lease(*id).is_none() => Some(*id),
            _ => None,
        });
        let got = match (got, missing) {
            (Err(StoreError::LeaseNotFound(got)), Some(want)) => {
                assert_eq!(got, want, "step {n}");
                return;
            }
            (Ok(got), None) => got,
            (got, missing) => {
                panic!("step {n}: {ops:?}: got {got:?}, want an outcome unless {missing:?}")
            }
        };
        let current: Vec<Option<ModelEntry>> = ops
            .iter()
            .map(|op| self.entries.get(op.key()).cloned())
            .collect();
        let metas: Vec<Option<KeyMeta>> = current
            .iter()
            .map(|e| e.as_ref().map(ModelEntry::meta))
            .collect();
        let effects = match rules::decide(ops, &metas, lo) {
            Ok(effects) => effects,
            Err(failed) => {
                assert_eq!(got, WriteOutcome::Rejected { failed }, "step {n}: {ops:?}");
                return;
            }
        };
        let WriteOutcome::Applied { revision, results } = got else {
            panic!("step {n}: {ops:?}: got {got:?}, want it applied");
        };
        self.revision += 1;
        assert_eq!(revision, self.revision, "step {n}: {ops:?}: revision");
        assert_eq!(results.len(), ops.len(), "step {n}: {ops:?}: {results:?}");
        let mut events = Vec::new();
        for (((op, effect), got), previous) in ops.iter().zip(effects).zip(results).zip(current) {
            let mut want = effect.result(|id| self.live_lease(id).map(|l| l.expires_at_us));
            if let (
                OpResult::Put {
                    created_at_us,
                    updated_at_us,
                    ..
                },
                OpResult::Put {
                    created_at_us: stamped_created,
                    updated_at_us: stamped_updated,
                    ..
                },
            ) = (&mut want, &got)
            {
                let stamps = (*stamped_created, *stamped_updated);
                check_stamps(n, op.key(), previous.as_ref(), stamps, (lo, hi));
                (*created_at_us, *updated_at_us) = stamps;
            }
            assert_eq!(got, want, "step {n}: {op:?}");
            match (op, effect, got) {
                (
                    WriteOp::Put { key, value, .. },
                    Effect::Put { meta, .. },
                    OpResult::Put {
                        created_at_us,
                        updated_at_us,
                        ..
                    },
                ) => {
                    events.push((
                        key.clone(),
                        "put",
                        meta.version,
                        Some((created_at_us, updated_at_us)),
                    ));
                    self.entries.insert(
                        key.clone(),
                        ModelEntry {
                            value: value.clone(),
                            version: meta.version,
                            revision,
                            created_at_us,
                            updated_at_us,
                            expires_at_us: meta.expires_at_us,
                            lease: meta.lease,
                        },
                    );
                }
                (
                    WriteOp::Delete { key, .. },
                    Effect::Delete {
                        removed: Some(removed),
                    },
                    _,
                ) => {
                    events.push((key.clone(), "deleted", removed.version, None));
                    self.entries.remove(key);
                }
                _ => {}
            }
        }
        self.history.push((revision, events));
    }
}

/// The timestamp rules, checked on their own: a put of a live key keeps its
/// `created_at` and never moves `updated_at` back; a put of an absent key
/// (new, or created again) is stamped with the clock; and the clock was read
/// between `lo` and `hi`.
fn check_stamps(
    n: usize,
    key: &[u8],
    previous: Option<&ModelEntry>,
    (created, updated): (i64, i64),
    (lo, hi): (i64, i64),
) {
    let key = String::from_utf8_lossy(key);
    match previous {
        Some(previous) => {
            assert_eq!(
                created, previous.created_at_us,
                "step {n}: {key}: created_at_us must be kept"
            );
            assert!(
                updated >= previous.updated_at_us,
                "step {n}: {key}: updated_at_us went back from {} to {updated}",
                previous.updated_at_us
            );
            assert!(
                (lo..=hi.max(previous.updated_at_us)).contains(&updated),
                "step {n}: {key}: updated_at_us {updated} outside the clock's {lo}..={hi}"
            );
        }
        None => {
            assert_eq!(
                created, updated,
                "step {n}: {key}: a new key's stamps must be equal"
            );
            assert!(
                (lo..=hi).contains(&created),
                "step {n}: {key}: created_at_us {created} outside the clock's {lo}..={hi}"
            );
        }
    }
}

fn key(i: usize) -> Vec<u8> {
    KEYS[i % KEYS.len()].as_bytes().to_vec()
}

fn condition() -> impl Strategy<Value = Condition> {
    prop_oneof![
        3 => Just(Condition::Any),
        2 => (1u64..4).prop_map(Condition::Version),
        1 => Just(Condition::Absent),
        1 => Just(Condition::Exists),
    ]
}

fn step_expiry(clocked: bool) -> BoxedStrategy<StepExpiry> {
    if !clocked {
        return Just(StepExpiry::Never).boxed();
    }
    prop_oneof![
        3 => Just(StepExpiry::Never),
        2 => prop_oneof![Just(100u64), Just(1000), Just(5000)].prop_map(StepExpiry::Ttl),
        1 => prop_oneof![Just(500i64), Just(3000)].prop_map(StepExpiry::At),
        1 => Just(StepExpiry::Keep),
        1 => (0usize..3).prop_map(StepExpiry::Lease),
    ]
    .boxed()
}

/// A write op; a put's expiry is resolved against the model's leases when
/// the step runs.
#[derive(Debug, Clone)]
struct StepOp {
    op: WriteOp,
    expiry: StepExpiry,
}

fn op(clocked: bool) -> impl Strategy<Value = StepOp> {
    prop_oneof![
        3 => (0..KEYS.len(), proptest::collection::vec(any::<u8>(), 0..16), condition(), step_expiry(clocked))
            .prop_map(|(k, value, condition, expiry)| StepOp {
                op: WriteOp::Put { key: key(k), value, condition, expiry: Expiry::Never },
                expiry,
            }),
        1 => (0..KEYS.len(), condition().prop_filter("absent delete", |c| *c != Condition::Absent))
            .prop_map(|(k, condition)| StepOp {
                op: WriteOp::Delete { key: key(k), condition },
                expiry: StepExpiry::Never,
            }),
        1 => (0..KEYS.len(), condition()).prop_map(|(k, condition)| StepOp {
            op: WriteOp::Check { key: key(k), condition },
            expiry: StepExpiry::Never,
        }),
    ]
}

/// The store's ops of a step, with leases named by their ids.
fn resolve(ops: &[StepOp], model: &Model) -> Vec<WriteOp> {
    ops.iter()
        .map(|StepOp { op, expiry }| match op {
            WriteOp::Put {
                key,
                value,
                condition,
                ..
            } => WriteOp::Put {
                key: key.clone(),
                value: value.clone(),
                condition: *condition,
                expiry: match expiry {
                    StepExpiry::Never => Expiry::Never,
                    StepExpiry::Ttl(ms) => Expiry::Ttl(*ms),
                    StepExpiry::At(ms) => Expiry::At(model.now_us + ms * 1000),
                    StepExpiry::Keep => Expiry::Keep,
                    StepExpiry::Lease(i) => Expiry::Lease(model.lease_id(*i)),
                },
            },
            delete => delete.clone(),
        })
        .collect()
}

fn bound() -> impl Strategy<Value = Bound<usize>> {
    prop_oneof![
        Just(Bound::Unbounded),
        (0..KEYS.len()).prop_map(Bound::Included),
        (0..KEYS.len()).prop_map(Bound::Excluded),
    ]
}

/// One op, or a batch of ops that names each key at most once.
fn write(clocked: bool) -> impl Strategy<Value = Vec<StepOp>> {
    prop_oneof![
        2 => op(clocked).prop_map(|op| vec![op]),
        1 => proptest::collection::vec(op(clocked), 1..5).prop_map(|ops| {
            let mut seen = std::collections::HashSet::new();
            ops.into_iter().filter(|op| seen.insert(op.op.key().to_vec())).collect()
        }),
    ]
}

fn step(clocked: bool) -> BoxedStrategy<Step> {
    let storage = prop_oneof![
        9 => write(clocked).prop_map(Step::Write),
        2 => (0..KEYS.len()).prop_map(Step::Get),
        1 => proptest::collection::vec(0..KEYS.len(), 0..5).prop_map(Step::GetMany),
        2 => (bound(), bound(), any::<bool>(), 1usize..6, any::<bool>()).prop_map(
            |(lower, upper, reverse, limit, keys_only)| Step::Scan { lower, upper, reverse, limit, keys_only }
        ),
        1 => Just(Step::Reopen),
        1 => (bound(), bound(), 0u64..12).prop_map(|(lower, upper, back)| Step::Watch { lower, upper, back }),
    ];
    if !clocked {
        return storage.boxed();
    }
    prop_oneof![
        16 => storage,
        2 => prop_oneof![Just(50u64), Just(600), Just(2000), Just(6000)].prop_map(Step::Advance),
        1 => prop_oneof![Just(500u64), Just(3000)].prop_map(Step::Grant),
        1 => (0usize..3).prop_map(Step::KeepAlive),
        1 => (0usize..3).prop_map(Step::Revoke),
        1 => (prop_oneof![Just(1u64), Just(700), Just(4000)], write(clocked))
            .prop_map(|(ms, ops)| Step::Past(ms, ops)),
    ]
    .boxed()
}

/// The events of a change, as the model keeps them, in key order.
fn model_events(change: &Change) -> Vec<ModelEvent> {
    let mut events: Vec<ModelEvent> = change
        .events
        .iter()
        .map(|event| match event {
            Event::Put {
                key,
                version,
                created_at_us,
                updated_at_us,
                ..
            } => (
                key.clone(),
                "put",
                *version,
                Some((*created_at_us, *updated_at_us)),
            ),
            Event::Delete {
                key,
                version,
                reason,
            } => (key.clone(), reason.name(), *version, None),
        })
        .collect();
    events.sort();
    events
}

/// Reads from `watcher` exactly the revisions after `after` that the model
/// says touched `range`, then nothing more.
async fn expect_changes(
    watcher: &mut Watcher,
    model: &Model,
    after: u64,
    range: &KeyRange,
    n: usize,
) {
    let want: Vec<(u64, Vec<ModelEvent>)> = model
        .history
        .iter()
        .filter(|(revision, _)| *revision > after)
        .filter_map(|(revision, events)| {
            let mut inside: Vec<ModelEvent> = events
                .iter()
                .filter(|e| range.contains(&e.0))
                .cloned()
                .collect();
            inside.sort();
            (!inside.is_empty()).then_some((*revision, inside))
        })
        .collect();
    let mut got = Vec::new();
    for _ in &want {
        match watcher.next(Duration::from_secs(10)).await.expect("watch") {
            Some(change) => got.push((change.revision, model_events(&change))),
            None => break,
        }
    }
    assert_eq!(got, want, "step {n}: watch after {after} of {range:?}");
    let extra = watcher.next(Duration::ZERO).await.expect("watch");
    assert_eq!(extra, None, "step {n}: watch after {after} of {range:?}");
}

fn key_bound(b: &Bound<usize>) -> Bound<Vec<u8>> {
    match b {
        Bound::Included(i) => Bound::Included(key(*i)),
        Bound::Excluded(i) => Bound::Excluded(key(*i)),
        Bound::Unbounded => Bound::Unbounded,
    }
}

/// Where the store under test keeps its data, so it can be reopened.
enum Data {
    /// A data directory, the bytes of the writer's key directory, and the
    /// clock the store runs on.
    Dir(tempfile::TempDir, u64, Arc<AtomicI64>),
    Schema(crate::harness::PgSchema),
}

/// The store under test: its data, and the layers over the engine.
struct Place {
    data: Data,
    layers: Layers,
}

impl Place {
    /// The layers `serve` builds for `cache`; a Redis cache gets a prefix of
    /// its own, so that runs sharing the tests' Redis do not meet.
    fn new(data: Data, cache: CacheMode) -> Self {
        use std::sync::atomic::AtomicU64;
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let mut layers = Layers::new(cache);
        layers.metrics = false;
        if cache == CacheMode::Redis {
            let mut redis = RedisConfig::new(crate::harness::redis_url());
            redis.prefix = format!(
                "kvstore_model:{}:{}:{}:",
                std::process::id(),
                system_now_us(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            );
            redis.ttl = Duration::from_secs(60);
            layers.redis = Some(redis);
        }
        Place { data, layers }
    }

    async fn open(&self) -> Arc<dyn Store> {
        let backend = match &self.data {
            Data::Dir(dir, key_directory_bytes, clock) => {
                let mut config = EmbeddedConfig::new(dir.path());
                config.key_directory_bytes = *key_directory_bytes;
                let clock = Arc::clone(clock);
                config.clock = Some(Arc::new(move || clock.load(Ordering::SeqCst)));
                Backend::Embedded(config)
            }
            Data::Schema(schema) => Backend::Postgres(schema.config()),
        };
        let mut config = StackConfig::new(backend);
        config.layers = self.layers.clone();
        Stack::build(config).await.expect("the store stack").store
    }

    fn clock(&self) -> Option<&AtomicI64> {
        match &self.data {
            Data::Dir(_, _, clock) => Some(clock),
            Data::Schema(_) => None,
        }
    }

    /// A reading of the clock the store stamps writes with.
    fn now_us(&self) -> i64 {
        self.clock()
            .map_or_else(system_now_us, |clock| clock.load(Ordering::SeqCst))
    }
}

/// The expirer's round at the model's time, on the model and the store.
async fn expire(model: &mut Model, store: &Arc<dyn Store>, n: usize) {
    let before = model.revision;
    model.expire();
    if model.revision > before {
        reach(store, model.revision, n).await;
    }
}

/// Waits until the store's history reaches the model's revision.
async fn reach(store: &Arc<dyn Store>, revision: u64, n: usize) {
    crate::harness::within(
        10,
        &format!("step {n}: the expirer's deletes up to {revision}"),
        async {
            loop {
                let changes = store
                    .changes(revision.saturating_sub(1), 1)
                    .await
                    .expect("changes");
                if changes.last().is_some_and(|c| c.revision >= revision) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        },
    )
    .await;
}

async fn check(steps: Vec<Step>, place: Place) {
    if let Some(clock) = place.clock() {
        clock.store(EPOCH_US, Ordering::SeqCst);
    }
    let mut store = place.open().await;
    let mut model = Model {
        now_us: EPOCH_US,
        ..Model::default()
    };
    let everything = KeyRange::everything();
    let mut follower = Watcher::start(
        store.feed(),
        Arc::clone(&store),
        everything.clone(),
        Some(1),
    )
    .await
    .expect("watch");
    let mut followed_through = 0;
    for (n, step) in steps.into_iter().enumerate() {
        match step {
            Step::Write(ops) => {
                let ops = resolve(&ops, &model);
                let lo = place.now_us();
                let got = store.write(ops.clone()).await;
                let hi = place.now_us();
                model.write(&ops, (lo, hi), got, n);
            }
            Step::Advance(ms) => {
                let clock = place.clock().expect("a clock");
                model.now_us += i64::try_from(ms).unwrap() * 1000;
                clock.store(model.now_us, Ordering::SeqCst);
                expire(&mut model, &store, n).await;
            }
            Step::Past(ms, mut ops) => {
                for op in &mut ops {
                    if let StepExpiry::Lease(_) = op.expiry {
                        op.expiry = StepExpiry::Never;
                    }
                }
                let clock = place.clock().expect("a clock");
                let present = model.now_us;
                model.now_us -= i64::try_from(ms).unwrap() * 1000;
                clock.store(model.now_us, Ordering::SeqCst);
                let ops = resolve(&ops, &model);
                let got = store.write(ops.clone()).await;
                model.write(&ops, (model.now_us, model.now_us), got, n);
                model.now_us = present;
                clock.store(present, Ordering::SeqCst);
                // A deadline counted from the earlier time may have passed.
                expire(&mut model, &store, n).await;
            }
            Step::Grant(ttl_ms) => {
                let lease = store.grant_lease(ttl_ms, None).await.expect("grant");
                assert_eq!(
                    lease.expires_at_us,
                    model.now_us + i64::try_from(ttl_ms).unwrap() * 1000
                );
                model.ids.push(lease.id);
                model.leases.push(Some(ModelLease {
                    id: lease.id,
                    ttl_ms,
                    expires_at_us: lease.expires_at_us,
                }));
            }
            Step::KeepAlive(i) => {
                let id = model.lease_id(i);
                let got = store.keep_lease_alive(id).await;
                let now = model.now_us;
                match (got, model.leases.get_mut(i).and_then(Option::as_mut)) {
                    (Ok(got), Some(lease)) => {
                        lease.expires_at_us = now + i64::try_from(lease.ttl_ms).unwrap() * 1000;
                        assert_eq!(got.expires_at_us, lease.expires_at_us, "step {n}");
                    }
                    (Err(StoreError::LeaseNotFound(got)), None) => assert_eq!(got, id),
                    (got, want) => panic!("step {n}: keepalive: got {got:?}, want {want:?}"),
                }
            }
            Step::Revoke(i) => {
                let id = model.lease_id(i);
                let got = store.revoke_lease(id).await;
                let live = model.leases.get(i).is_some_and(Option::is_some);
                match got {
                    Ok(revoked) if live => {
                        let mut keys = model.end_lease(i, DeleteReason::LeaseRevoked.name());
                        let mut got_keys = revoked.keys;
                        keys.sort();
                        got_keys.sort();
                        assert_eq!(
                            (got_keys, revoked.revision),
                            (keys, model.revision),
                            "step {n}"
                        );
                    }
                    Err(StoreError::LeaseNotFound(got)) if !live => assert_eq!(got, id),
                    got => panic!("step {n}: revoke of a lease live={live}: {got:?}"),
                }
            }
            Step::Get(i) => {
                let got = store.get(&key(i)).await.expect("get");
                let want = model.entries.get(&key(i)).map(|e| model.seen(e));
                assert_eq!(got.map(Seen::of), want, "step {n}: get {}", KEYS[i]);
            }
            Step::GetMany(keys) => {
                let got = store
                    .get_many(keys.iter().map(|i| key(*i)).collect())
                    .await
                    .expect("get_many");
                let got: Vec<Option<Seen>> =
                    got.entries.into_iter().map(|e| e.map(Seen::of)).collect();
                let want: Vec<Option<Seen>> = keys
                    .iter()
                    .map(|i| model.entries.get(&key(*i)).map(|e| model.seen(e)))
                    .collect();
                assert_eq!(got, want, "step {n}: get_many");
            }
            Step::Scan {
                lower,
                upper,
                reverse,
                limit,
                keys_only,
            } => {
                let (lower, upper) = (key_bound(&lower), key_bound(&upper));
                let page = store
                    .scan(ScanRequest {
                        lower: lower.clone(),
                        upper: upper.clone(),
                        reverse,
                        limit,
                        keys_only,
                        max_value_bytes: 4 << 20,
                    })
                    .await
                    .expect("scan");
                let inverted = match (&lower, &upper) {
                    (
                        Bound::Included(l) | Bound::Excluded(l),
                        Bound::Included(u) | Bound::Excluded(u),
                    ) => {
                        l > u
                            || (l == u
                                && !matches!(
                                    (&lower, &upper),
                                    (Bound::Included(_), Bound::Included(_))
                                ))
                    }
                    _ => false,
                };
                let mut want: Vec<(Vec<u8>, Seen)> = if inverted {
                    Vec::new()
                } else {
                    model
                        .entries
                        .range((lower, upper))
                        .map(|(k, e)| (k.clone(), model.seen(e)))
                        .collect()
                };
                if reverse {
                    want.reverse();
                }
                let more = want.len() > limit;
                want.truncate(limit);
                let got: Vec<(Vec<u8>, Seen)> = page
                    .entries
                    .into_iter()
                    .map(|e| (e.key.clone(), Seen::of(e)))
                    .collect();
                if keys_only {
                    for (_, e) in &mut want {
                        e.value.clear();
                    }
                }
                assert_eq!(got, want, "step {n}: scan");
                assert_eq!(page.more, more, "step {n}: scan more");
            }
            Step::Reopen => {
                expect_changes(&mut follower, &model, followed_through, &everything, n).await;
                followed_through = model.revision;
                drop(follower);
                store.close().await.expect("close");
                drop(store);
                store = place.open().await;
                // Resumes after what it saw, from the history the store kept.
                follower = Watcher::start(
                    store.feed(),
                    Arc::clone(&store),
                    everything.clone(),
                    Some(followed_through + 1),
                )
                .await
                .expect("resume the watch");
            }
            Step::Watch { lower, upper, back } => {
                let range = KeyRange {
                    lower: key_bound(&lower),
                    upper: key_bound(&upper),
                };
                let after = model.revision.saturating_sub(back);
                let mut watcher = Watcher::start(
                    store.feed(),
                    Arc::clone(&store),
                    range.clone(),
                    Some(after + 1),
                )
                .await
                .expect("watch");
                expect_changes(&mut watcher, &model, after, &range, n).await;
            }
        }
    }
    expect_changes(
        &mut follower,
        &model,
        followed_through,
        &everything,
        usize::MAX,
    )
    .await;
    drop(follower);
    store.close().await.expect("close");
}

/// The model on the embedded engine, running on the model's clock, under
/// `cache`. On a multi-threaded runtime most writes commit themselves; on a
/// single-threaded one every write goes through the committer thread. A
/// tiny key directory holds about one key, so versions keep being read back
/// from the engine.
fn embedded_matches_model(
    steps: Vec<Step>,
    multi_threaded: bool,
    tiny_key_directory: bool,
    cache: CacheMode,
) {
    let runtime = if multi_threaded {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    }
    .expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let key_directory_bytes = if tiny_key_directory {
        100
    } else {
        EmbeddedConfig::new("").key_directory_bytes
    };
    let clock = Arc::new(AtomicI64::new(EPOCH_US));
    let place = Place::new(Data::Dir(dir, key_directory_bytes, clock), cache);
    runtime.block_on(check(steps, place));
}

/// The model on PostgreSQL, on the real clock (so without expiry steps),
/// under `cache`.
fn postgres_matches_model(steps: Vec<Step>, cache: CacheMode) {
    let schema = crate::harness::PgSchema::new();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(check(steps, Place::new(Data::Schema(schema), cache)));
}

// Case counts keep the whole suite under about a minute of a debug build on
// two busy cores.

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn embedded_cache_off(
        steps in proptest::collection::vec(step(true), 1..40),
        multi_threaded in any::<bool>(),
        tiny_key_directory in any::<bool>(),
    ) {
        embedded_matches_model(steps, multi_threaded, tiny_key_directory, CacheMode::Off);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn embedded_cache_local(
        steps in proptest::collection::vec(step(true), 1..40),
        multi_threaded in any::<bool>(),
        tiny_key_directory in any::<bool>(),
    ) {
        embedded_matches_model(steps, multi_threaded, tiny_key_directory, CacheMode::Local);
    }

    #[test]
    #[cfg_attr(not(kvstore_test_redis), ignore = "set KVSTORE_TEST_REDIS_URL to run it")]
    fn embedded_cache_redis(
        steps in proptest::collection::vec(step(true), 1..40),
        multi_threaded in any::<bool>(),
        tiny_key_directory in any::<bool>(),
    ) {
        embedded_matches_model(steps, multi_threaded, tiny_key_directory, CacheMode::Redis);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    #[cfg_attr(not(kvstore_test_postgres), ignore = "set KVSTORE_TEST_POSTGRES_URL to run it")]
    fn postgres_cache_off(steps in proptest::collection::vec(step(false), 1..40)) {
        postgres_matches_model(steps, CacheMode::Off);
    }

    #[test]
    #[cfg_attr(not(kvstore_test_postgres), ignore = "set KVSTORE_TEST_POSTGRES_URL to run it")]
    fn postgres_cache_local(steps in proptest::collection::vec(step(false), 1..40)) {
        postgres_matches_model(steps, CacheMode::Local);
    }

    #[test]
    #[cfg_attr(
        not(all(kvstore_test_postgres, kvstore_test_redis)),
        ignore = "set KVSTORE_TEST_POSTGRES_URL and KVSTORE_TEST_REDIS_URL to run it"
    )]
    fn postgres_cache_redis(steps in proptest::collection::vec(step(false), 1..40)) {
        postgres_matches_model(steps, CacheMode::Redis);
    }
}
