//! Model-based test of the storage contract: random sequences of puts,
//! conditional puts, deletes, batches, reads and scans, with the store closed
//! and reopened in between, checked step by step against a `BTreeMap` model,
//! on every backend (PostgreSQL when `KVSTORE_TEST_POSTGRES_URL` is set).
//! Watchers check the change feed against the model's history: one follows
//! everything from revision 1 and resumes after every reopen, and others
//! start at random past revisions on random ranges.
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
use kvstore::storage::embedded::{EmbeddedConfig, EmbeddedStore};
use kvstore::storage::{
    Change, Condition, DeleteReason, Event, Expiry, FailedCondition, KeyRange, LeaseId, OpResult,
    ScanRequest, Store, Watcher, WriteOp, WriteOutcome,
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
/// happened (`put`, or a delete's reason), and the version written or removed.
type ModelEvent = (Vec<u8>, &'static str, u64);

#[derive(Debug, Clone, PartialEq)]
struct ModelEntry {
    value: Vec<u8>,
    version: u64,
    revision: u64,
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
                .map(|k| (k.clone(), reason, self.entries[k].version))
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
            self.record(vec![(key, "expired", version)]);
        }
    }

    fn write(&mut self, ops: &[WriteOp]) -> Result<WriteOutcome, LeaseId> {
        for op in ops {
            if let WriteOp::Put {
                expiry: Expiry::Lease(id),
                ..
            } = op
                && self.live_lease(*id).is_none()
            {
                return Err(*id);
            }
        }
        Ok(self.apply(ops))
    }

    fn apply(&mut self, ops: &[WriteOp]) -> WriteOutcome {
        let failed: Vec<FailedCondition> = ops
            .iter()
            .enumerate()
            .filter_map(|(index, op)| {
                let current = self.entries.get(op.key()).map(|e| e.version);
                (!op.condition().holds(current)).then_some(FailedCondition {
                    index,
                    current_version: current,
                })
            })
            .collect();
        if !failed.is_empty() {
            return WriteOutcome::Rejected { failed };
        }
        self.revision += 1;
        let revision = self.revision;
        let mut events = Vec::new();
        for op in ops {
            match op {
                WriteOp::Put { key, .. } => {
                    let version = self.entries.get(key).map_or(1, |e| e.version + 1);
                    events.push((key.clone(), "put", version));
                }
                WriteOp::Delete { key, .. } => {
                    if let Some(entry) = self.entries.get(key) {
                        events.push((key.clone(), "deleted", entry.version));
                    }
                }
                WriteOp::Check { .. } => {}
            }
        }
        self.history.push((revision, events));
        let results = ops
            .iter()
            .map(|op| match op {
                WriteOp::Put {
                    key, value, expiry, ..
                } => {
                    let previous = self.entries.get(key).cloned();
                    let version = previous.as_ref().map_or(1, |e| e.version + 1);
                    let (expires_at_us, lease) = match expiry {
                        Expiry::Never => (None, None),
                        Expiry::Ttl(ms) => {
                            (Some(self.now_us + i64::try_from(*ms).unwrap() * 1000), None)
                        }
                        Expiry::At(deadline) => (Some(*deadline), None),
                        Expiry::Keep => previous
                            .as_ref()
                            .map_or((None, None), |e| (e.expires_at_us, e.lease)),
                        Expiry::Lease(id) => (None, Some(*id)),
                    };
                    let entry = ModelEntry {
                        value: value.clone(),
                        version,
                        revision,
                        expires_at_us,
                        lease,
                    };
                    let seen = self.seen(&entry);
                    self.entries.insert(key.clone(), entry);
                    OpResult::Put {
                        version,
                        created: previous.is_none(),
                        created_at_us: 0,
                        updated_at_us: 0,
                        expires_at_us: seen.expires_at_us,
                        lease,
                    }
                }
                WriteOp::Delete { key, .. } => OpResult::Deleted {
                    existed: self.entries.remove(key).is_some(),
                },
                WriteOp::Check { .. } => OpResult::Checked,
            })
            .collect();
        WriteOutcome::Applied { revision, results }
    }
}

/// The model has no clock: compare outcomes with the timestamps zeroed.
fn without_timestamps(mut outcome: WriteOutcome) -> WriteOutcome {
    if let WriteOutcome::Applied { results, .. } = &mut outcome {
        for result in results {
            if let OpResult::Put {
                created_at_us,
                updated_at_us,
                ..
            } = result
            {
                *created_at_us = 0;
                *updated_at_us = 0;
            }
        }
    }
    outcome
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

fn step(clocked: bool) -> BoxedStrategy<Step> {
    let storage = prop_oneof![
        6 => op(clocked).prop_map(|op| Step::Write(vec![op])),
        3 => proptest::collection::vec(op(clocked), 1..5).prop_map(|ops| {
            // A batch names each key at most once.
            let mut seen = std::collections::HashSet::new();
            Step::Write(ops.into_iter().filter(|op| seen.insert(op.op.key().to_vec())).collect())
        }),
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
    ]
    .boxed()
}

/// The events of a change, as the model keeps them, in key order.
fn model_events(change: &Change) -> Vec<ModelEvent> {
    let mut events: Vec<ModelEvent> = change
        .events
        .iter()
        .map(|event| match event {
            Event::Put { key, version, .. } => (key.clone(), "put", *version),
            Event::Delete {
                key,
                version,
                reason,
            } => (key.clone(), reason.name(), *version),
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
enum Place {
    /// A data directory, the bytes of the writer's key directory, and the
    /// clock the store runs on.
    Dir(tempfile::TempDir, u64, Arc<AtomicI64>),
    Schema(crate::harness::PgSchema),
}

impl Place {
    async fn open(&self) -> Arc<dyn Store> {
        match self {
            Place::Dir(dir, key_directory_bytes, clock) => {
                let mut config = EmbeddedConfig::new(dir.path());
                config.key_directory_bytes = *key_directory_bytes;
                let clock = Arc::clone(clock);
                config.clock = Some(Arc::new(move || clock.load(Ordering::SeqCst)));
                Arc::new(EmbeddedStore::open(config).expect("open store"))
            }
            Place::Schema(schema) => schema.open().await,
        }
    }

    fn clock(&self) -> Option<&AtomicI64> {
        match self {
            Place::Dir(_, _, clock) => Some(clock),
            Place::Schema(_) => None,
        }
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
                match (store.write(ops.clone()).await, model.write(&ops)) {
                    (Ok(got), Ok(want)) => {
                        assert_eq!(without_timestamps(got), want, "step {n}: {ops:?}")
                    }
                    (Err(StoreError::LeaseNotFound(got)), Err(want)) => {
                        assert_eq!(got, want, "step {n}")
                    }
                    (got, want) => panic!("step {n}: {ops:?}: got {got:?}, want {want:?}"),
                }
            }
            Step::Advance(ms) => {
                let clock = place.clock().expect("a clock");
                model.now_us += i64::try_from(ms).unwrap() * 1000;
                clock.store(model.now_us, Ordering::SeqCst);
                let before = model.revision;
                model.expire();
                if model.revision > before {
                    reach(&store, model.revision, n).await;
                }
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
                assert_eq!(
                    got.map(|e| Seen {
                        value: e.value,
                        version: e.version,
                        revision: e.revision,
                        expires_at_us: e.expires_at_us,
                        lease: e.lease,
                    }),
                    want,
                    "step {n}: get {}",
                    KEYS[i]
                );
            }
            Step::GetMany(keys) => {
                let got = store
                    .get_many(keys.iter().map(|i| key(*i)).collect())
                    .await
                    .expect("get_many");
                let got: Vec<Option<u64>> = got
                    .entries
                    .iter()
                    .map(|e| e.as_ref().map(|e| e.version))
                    .collect();
                let want: Vec<Option<u64>> = keys
                    .iter()
                    .map(|i| model.entries.get(&key(*i)).map(|e| e.version))
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
                    .map(|e| {
                        (
                            e.key,
                            Seen {
                                value: e.value,
                                version: e.version,
                                revision: e.revision,
                                expires_at_us: e.expires_at_us,
                                lease: e.lease,
                            },
                        )
                    })
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

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// On a multi-threaded runtime most writes commit themselves; on a
    /// single-threaded one every write goes through the committer thread. A
    /// tiny key directory holds about one key, so versions keep being read
    /// back from the engine.
    #[test]
    fn store_matches_model(
        steps in proptest::collection::vec(step(true), 1..40),
        multi_threaded in any::<bool>(),
        tiny_key_directory in any::<bool>(),
    ) {
        let runtime = if multi_threaded {
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()
        } else {
            tokio::runtime::Builder::new_current_thread().enable_all().build()
        }
        .expect("runtime");
        let dir = tempfile::tempdir().expect("temp dir");
        let key_directory_bytes = if tiny_key_directory { 100 } else { EmbeddedConfig::new("").key_directory_bytes };
        let clock = Arc::new(AtomicI64::new(EPOCH_US));
        runtime.block_on(check(steps, Place::Dir(dir, key_directory_bytes, clock)));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    #[cfg_attr(not(kvstore_test_postgres), ignore = "set KVSTORE_TEST_POSTGRES_URL to run it")]
    fn postgres_store_matches_model(steps in proptest::collection::vec(step(false), 1..40)) {
        let schema = crate::harness::PgSchema::new();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        runtime.block_on(check(steps, Place::Schema(schema)));
    }
}
