//! Model-based test of the storage contract: random sequences of puts,
//! conditional puts, deletes, batches, reads and scans, with the store closed
//! and reopened in between, checked step by step against a `BTreeMap` model,
//! on every backend (PostgreSQL when `KVSTORE_TEST_POSTGRES_URL` is set).
//! Watchers check the change feed against the model's history: one follows
//! everything from revision 1 and resumes after every reopen, and others
//! start at random past revisions on random ranges.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;
use std::time::Duration;

use kvstore::storage::embedded::{EmbeddedConfig, EmbeddedStore};
use kvstore::storage::{
    Change, Condition, Event, Expiry, FailedCondition, KeyRange, OpResult, ScanRequest, Store,
    Watcher, WriteOp, WriteOutcome,
};
use proptest::prelude::*;

/// Few keys, so that writes collide; some share prefixes.
const KEYS: &[&str] = &["a", "a/", "a/b", "ab", "b", "b/c", "c", "é"];

#[derive(Debug, Clone)]
enum Step {
    Write(Vec<WriteOp>),
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
}

/// What one revision did to one key, as the model sees it: the key, whether
/// it was put (else deleted), and the version written or removed.
type ModelEvent = (Vec<u8>, bool, u64);

#[derive(Debug, Clone, PartialEq)]
struct ModelEntry {
    value: Vec<u8>,
    version: u64,
    revision: u64,
}

#[derive(Default)]
struct Model {
    entries: BTreeMap<Vec<u8>, ModelEntry>,
    revision: u64,
    /// The events of every revision, in order.
    history: Vec<(u64, Vec<ModelEvent>)>,
}

impl Model {
    fn write(&mut self, ops: &[WriteOp]) -> WriteOutcome {
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
                    events.push((key.clone(), true, version));
                }
                WriteOp::Delete { key, .. } => {
                    if let Some(entry) = self.entries.get(key) {
                        events.push((key.clone(), false, entry.version));
                    }
                }
            }
        }
        self.history.push((revision, events));
        let results = ops
            .iter()
            .map(|op| match op {
                WriteOp::Put { key, value, .. } => {
                    let previous = self.entries.get(key).map(|e| e.version);
                    let version = previous.map_or(1, |v| v + 1);
                    self.entries.insert(
                        key.clone(),
                        ModelEntry {
                            value: value.clone(),
                            version,
                            revision,
                        },
                    );
                    OpResult::Put {
                        version,
                        created: previous.is_none(),
                        created_at_us: 0,
                        updated_at_us: 0,
                        expires_at_us: None,
                        lease: None,
                    }
                }
                WriteOp::Delete { key, .. } => OpResult::Deleted {
                    existed: self.entries.remove(key).is_some(),
                },
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

fn op() -> impl Strategy<Value = WriteOp> {
    prop_oneof![
        3 => (0..KEYS.len(), proptest::collection::vec(any::<u8>(), 0..16), condition())
            .prop_map(|(k, value, condition)| WriteOp::Put { key: key(k), value, condition, expiry: Expiry::Never }),
        1 => (0..KEYS.len(), condition().prop_filter("absent delete", |c| *c != Condition::Absent))
            .prop_map(|(k, condition)| WriteOp::Delete { key: key(k), condition }),
    ]
}

fn bound() -> impl Strategy<Value = Bound<usize>> {
    prop_oneof![
        Just(Bound::Unbounded),
        (0..KEYS.len()).prop_map(Bound::Included),
        (0..KEYS.len()).prop_map(Bound::Excluded),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => op().prop_map(|op| Step::Write(vec![op])),
        3 => proptest::collection::vec(op(), 1..5).prop_map(|ops| {
            // A batch names each key at most once.
            let mut seen = std::collections::HashSet::new();
            Step::Write(ops.into_iter().filter(|op| seen.insert(op.key().to_vec())).collect())
        }),
        2 => (0..KEYS.len()).prop_map(Step::Get),
        1 => proptest::collection::vec(0..KEYS.len(), 0..5).prop_map(Step::GetMany),
        2 => (bound(), bound(), any::<bool>(), 1usize..6, any::<bool>()).prop_map(
            |(lower, upper, reverse, limit, keys_only)| Step::Scan { lower, upper, reverse, limit, keys_only }
        ),
        1 => Just(Step::Reopen),
        1 => (bound(), bound(), 0u64..12).prop_map(|(lower, upper, back)| Step::Watch { lower, upper, back }),
    ]
}

/// The events of a change, as the model keeps them, in key order.
fn model_events(change: &Change) -> Vec<ModelEvent> {
    let mut events: Vec<ModelEvent> = change
        .events
        .iter()
        .map(|event| match event {
            Event::Put { key, version, .. } => (key.clone(), true, *version),
            Event::Delete { key, version, .. } => (key.clone(), false, *version),
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
    /// A data directory, and the bytes of the writer's key directory.
    Dir(tempfile::TempDir, u64),
    Schema(crate::harness::PgSchema),
}

impl Place {
    async fn open(&self) -> Arc<dyn Store> {
        match self {
            Place::Dir(dir, key_directory_bytes) => {
                let mut config = EmbeddedConfig::new(dir.path());
                config.key_directory_bytes = *key_directory_bytes;
                Arc::new(EmbeddedStore::open(config).expect("open store"))
            }
            Place::Schema(schema) => schema.open().await,
        }
    }
}

async fn check(steps: Vec<Step>, place: Place) {
    let mut store = place.open().await;
    let mut model = Model::default();
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
                let got = without_timestamps(store.write(ops.clone()).await.expect("write"));
                assert_eq!(got, model.write(&ops), "step {n}: {ops:?}");
            }
            Step::Get(i) => {
                let got = store.get(&key(i)).await.expect("get");
                let want = model.entries.get(&key(i));
                assert_eq!(
                    got.map(|e| ModelEntry {
                        value: e.value,
                        version: e.version,
                        revision: e.revision
                    }),
                    want.cloned(),
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
                let mut want: Vec<(Vec<u8>, ModelEntry)> = if inverted {
                    Vec::new()
                } else {
                    model
                        .entries
                        .range((lower, upper))
                        .map(|(k, e)| (k.clone(), e.clone()))
                        .collect()
                };
                if reverse {
                    want.reverse();
                }
                let more = want.len() > limit;
                want.truncate(limit);
                let got: Vec<(Vec<u8>, ModelEntry)> = page
                    .entries
                    .into_iter()
                    .map(|e| {
                        (
                            e.key,
                            ModelEntry {
                                value: e.value,
                                version: e.version,
                                revision: e.revision,
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
        steps in proptest::collection::vec(step(), 1..40),
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
        runtime.block_on(check(steps, Place::Dir(dir, key_directory_bytes)));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    #[cfg_attr(not(kvstore_test_postgres), ignore = "set KVSTORE_TEST_POSTGRES_URL to run it")]
    fn postgres_store_matches_model(steps in proptest::collection::vec(step(), 1..40)) {
        let schema = crate::harness::PgSchema::new();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        runtime.block_on(check(steps, Place::Schema(schema)));
    }
}
