//! The change feed on PostgreSQL: revisions commit out of order and rolled-back
//! ones leave holes, and watchers must still get every committed revision
//! once, in order, whichever server wrote it.
//!
//! Skipped, printing why, unless `KVSTORE_TEST_POSTGRES_URL` is set.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use crate::harness::{PgSchema, Proxy, within};
use kvstore::StoreError;
use kvstore::storage::postgres::PostgresStore;
use kvstore::storage::{
    Change, Condition, Event, Expiry, History, KeyRange, ScanRequest, Store, Watcher, WriteOp,
    WriteOutcome,
};

fn put(key: &str, value: &str) -> WriteOp {
    WriteOp::Put {
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
        condition: Condition::Any,
        expiry: Expiry::Never,
    }
}

fn delete(key: &str) -> WriteOp {
    WriteOp::Delete {
        key: key.as_bytes().to_vec(),
        condition: Condition::Any,
    }
}

async fn write(store: &PostgresStore, ops: Vec<WriteOp>) -> u64 {
    match store.write(ops).await.expect("write") {
        WriteOutcome::Applied { revision, .. } => revision,
        WriteOutcome::Rejected { failed } => panic!("rejected: {failed:?}"),
    }
}

/// A watcher of every key of `store`, from `from` (the next revision when
/// `None`).
async fn watch(store: &Arc<PostgresStore>, from: Option<u64>) -> Watcher {
    let dyn_store: Arc<dyn Store> = Arc::clone(store) as Arc<dyn Store>;
    Watcher::start(store.feed(), dyn_store, KeyRange::everything(), from)
        .await
        .expect("start a watcher")
}

/// The changes a watcher gives until `enough` holds for them; fails the test
/// after `secs` seconds.
async fn collect(
    watcher: &mut Watcher,
    secs: u64,
    what: &str,
    enough: impl Fn(&[Change]) -> bool,
) -> Vec<Change> {
    let mut changes = Vec::new();
    within(secs, what, async {
        while !enough(&changes) {
            if let Some(change) = watcher
                .next(Duration::from_millis(100))
                .await
                .expect("watch")
            {
                changes.push(change);
            }
        }
    })
    .await;
    changes
}

fn scan_everything() -> ScanRequest {
    ScanRequest {
        lower: std::ops::Bound::Unbounded,
        upper: std::ops::Bound::Unbounded,
        reverse: false,
        limit: 1000,
        keys_only: false,
        max_value_bytes: 4 << 20,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(kvstore_test_postgres),
    ignore = "set KVSTORE_TEST_POSTGRES_URL to run it"
)]
async fn writes_of_two_servers_reach_both_watchers_once_in_one_order() {
    let schema = PgSchema::new();
    let stores = [schema.open().await, schema.open().await];
    let mut watchers = Vec::new();
    for store in &stores {
        watchers.push(watch(store, None).await);
    }
    let mut writers = Vec::new();
    for (s, store) in stores.iter().enumerate() {
        for w in 0..4 {
            let store = Arc::clone(store);
            writers.push(tokio::spawn(async move {
                let mut revisions = Vec::new();
                for i in 0..40 {
                    let key = format!("k{s}-{w}-{}", i % 5);
                    let ops = if i % 7 == 6 {
                        vec![put(&key, "batch"), put(&format!("{key}-b"), "batch")]
                    } else {
                        vec![put(&key, &i.to_string())]
                    };
                    revisions.push(write(&store, ops).await);
                }
                revisions
            }));
        }
    }
    let mut written = BTreeSet::new();
    for writer in writers {
        written.extend(within(60, "a writer", writer).await.expect("writer"));
    }
    let last = *written.last().expect("revisions");
    let mut seen = Vec::new();
    for watcher in &mut watchers {
        let changes = collect(watcher, 30, "every revision", |changes| {
            changes.last().is_some_and(|c| c.revision >= last)
        })
        .await;
        let revisions: Vec<u64> = changes.iter().map(|c| c.revision).collect();
        assert!(
            revisions.windows(2).all(|w| w[0] < w[1]),
            "out of order or twice: {revisions:?}"
        );
        assert_eq!(
            revisions.iter().copied().collect::<BTreeSet<_>>(),
            written,
            "missing or extra revisions"
        );
        seen.push(changes);
    }
    assert_eq!(seen[0], seen[1], "the two servers' watchers disagree");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(kvstore_test_postgres),
    ignore = "set KVSTORE_TEST_POSTGRES_URL to run it"
)]
async fn revisions_rolled_back_or_held_do_not_stall_watchers() {
    let schema = PgSchema::new();
    let store = schema.open().await;
    let mut watcher = watch(&store, None).await;
    let sequence = format!("\"{}\".kv_revision", schema.name);
    let raw = schema.client().await;
    // A revision taken and rolled back, and one taken by a transaction that
    // stays open: both are holes below the next write.
    raw.batch_execute(&format!("BEGIN; SELECT nextval('{sequence}'); ROLLBACK;"))
        .await
        .expect("rolled back");
    let holder = schema.client().await;
    holder.batch_execute("BEGIN").await.expect("begin");
    let held: i64 = holder
        .query_one(&format!("SELECT nextval('{sequence}')"), &[])
        .await
        .expect("nextval")
        .get(0);
    let revision = write(&store, vec![put("after", "holes")]).await;
    assert!(revision > u64::try_from(held).expect("revision"));
    let changes = collect(&mut watcher, 10, "the write above the holes", |c| {
        !c.is_empty()
    })
    .await;
    assert_eq!(changes[0].revision, revision);
    // The held revision was settled as a gap: logging it now fails, so that
    // transaction could never commit a write under it.
    let late = holder
        .execute(
            &format!(
                "INSERT INTO \"{}\".kv_revisions (revision, written_at_us) VALUES ($1, 0)",
                schema.name
            ),
            &[&held],
        )
        .await
        .expect_err("a settled revision cannot be logged again");
    assert_eq!(
        late.code(),
        Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(kvstore_test_postgres),
    ignore = "set KVSTORE_TEST_POSTGRES_URL to run it"
)]
async fn a_write_that_logs_its_revision_too_late_is_retried_under_a_new_one() {
    let schema = PgSchema::new();
    let store = schema.open().await;
    let mut watcher = watch(&store, None).await;
    let raw = schema.client().await;
    // The first write to log a revision stalls for a second between taking
    // its revision and logging it, long enough for its revision to be filled.
    let s = &schema.name;
    raw.batch_execute(&format!(
        "CREATE SEQUENCE \"{s}\".stalls;
         CREATE FUNCTION \"{s}\".stall_once() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NOT NEW.gap THEN
                 IF nextval('\"{s}\".stalls') = 1 THEN PERFORM pg_sleep(1); END IF;
             END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER stall_once BEFORE INSERT ON \"{s}\".kv_revisions
             FOR EACH ROW EXECUTE FUNCTION \"{s}\".stall_once();"
    ))
    .await
    .expect("the stalling trigger");
    let late = {
        let store = Arc::clone(&store);
        tokio::spawn(async move { write(&store, vec![put("late", "1")]).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let on_time = write(&store, vec![put("on-time", "1")]).await;
    let late = within(30, "the late write", late).await.expect("task");
    assert!(late > on_time, "late {late}, on time {on_time}");
    let changes = collect(&mut watcher, 10, "both writes", |c| c.len() >= 2).await;
    let got: Vec<(u64, Vec<u8>)> = changes
        .iter()
        .map(|c| (c.revision, c.events[0].key().to_vec()))
        .collect();
    assert_eq!(
        got,
        vec![(on_time, b"on-time".to_vec()), (late, b"late".to_vec())]
    );
    assert_eq!(
        store
            .get(b"late")
            .await
            .expect("get")
            .expect("late")
            .revision,
        late
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(kvstore_test_postgres),
    ignore = "set KVSTORE_TEST_POSTGRES_URL to run it"
)]
async fn a_batch_is_one_change() {
    let schema = PgSchema::new();
    let store = schema.open().await;
    let gone = write(&store, vec![put("c", "old")]).await;
    let mut watcher = watch(&store, Some(gone + 1)).await;
    let revision = write(&store, vec![put("a", "1"), put("b", "2"), delete("c")]).await;
    let changes = collect(&mut watcher, 10, "the batch", |c| !c.is_empty()).await;
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].revision, revision);
    let mut events = changes[0].events.clone();
    events.sort_by(|x, y| x.key().cmp(y.key()));
    assert!(
        matches!(&events[0], Event::Put { key, value, version: 1, .. } if key == b"a" && value == b"1")
    );
    assert!(matches!(&events[1], Event::Put { key, version: 1, .. } if key == b"b"));
    assert!(matches!(&events[2], Event::Delete { key, version: 1, .. } if key == b"c"));
    // The change log gives the same, from the database.
    let logged = store.changes(gone, 10).await.expect("changes");
    assert_eq!(logged.len(), 1);
    assert_eq!(logged[0].revision, revision);
    assert_eq!(logged[0].events.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(kvstore_test_postgres),
    ignore = "set KVSTORE_TEST_POSTGRES_URL to run it"
)]
async fn history_past_both_windows_is_trimmed_and_then_compacted() {
    let schema = PgSchema::new();
    let mut config = schema.config();
    config.history = History {
        revisions: 3,
        age: Duration::ZERO,
    };
    let store = Arc::new(PostgresStore::open(config.clone()).await.expect("open"));
    let mut last = 0;
    for i in 0..10 {
        last = write(&store, vec![put(&format!("k{i}"), "v")]).await;
    }
    // The trimmer runs every second and keeps the last 3 revisions.
    let compacted = within(30, "the trim", async {
        loop {
            match store.changes(0, 100).await {
                Err(StoreError::Compacted {
                    compact_revision,
                    revision,
                }) if compact_revision == last - 2 => return (compact_revision, revision),
                Ok(_) | Err(StoreError::Compacted { .. }) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(err) => panic!("changes: {err}"),
            }
        }
    })
    .await;
    assert_eq!(compacted.1, last);
    let kept = store
        .changes(compacted.0 - 1, 100)
        .await
        .expect("the history kept");
    let kept: Vec<u64> = kept.iter().map(|c| c.revision).collect();
    assert_eq!(kept, vec![last - 2, last - 1, last]);
    // A server that starts now has none of the trimmed revisions in memory:
    // a watcher from before them learns that they are gone.
    let other = Arc::new(PostgresStore::open(config).await.expect("open"));
    let dyn_store: Arc<dyn Store> = Arc::clone(&other) as Arc<dyn Store>;
    match Watcher::start(other.feed(), dyn_store, KeyRange::everything(), Some(1)).await {
        Err(StoreError::Compacted {
            compact_revision, ..
        }) => assert_eq!(compact_revision, last - 2),
        Err(err) => panic!("{err}"),
        Ok(_) => panic!("a watcher from a trimmed revision started"),
    }
    let mut watcher = watch(&other, Some(last - 2)).await;
    let changes = collect(&mut watcher, 10, "the history kept", |c| c.len() == 3).await;
    assert_eq!(changes.last().map(|c| c.revision), Some(last));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(kvstore_test_postgres),
    ignore = "set KVSTORE_TEST_POSTGRES_URL to run it"
)]
async fn a_page_and_a_watch_from_its_revision_miss_nothing() {
    let schema = PgSchema::new();
    let store = schema.open().await;
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let mut last = 0;
                for i in 0..60u32 {
                    let key = format!("k{}", (i * 7 + w) % 10);
                    let op = if i % 5 == 4 {
                        delete(&key)
                    } else {
                        put(&key, &format!("{w}-{i}"))
                    };
                    last = write(&store, vec![op]).await;
                }
                last
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Read while writes commit: the page may show a write above its revision
    // (one below it was still committing), never miss one up to it.
    let page = store.scan(scan_everything()).await.expect("scan");
    // The page, then every change above its revision, is the final state.
    let mut state: BTreeMap<Vec<u8>, (u64, Vec<u8>)> = page
        .entries
        .iter()
        .map(|e| (e.key.clone(), (e.version, e.value.clone())))
        .collect();
    let mut watcher = watch(&store, Some(page.revision + 1)).await;
    let mut written = 0;
    for writer in writers {
        written = written.max(within(60, "a writer", writer).await.expect("writer"));
    }
    // Once nothing is committing, a read's revision is the last write's.
    let last = store.scan(scan_everything()).await.expect("scan");
    assert_eq!(last.revision, written);
    let keys: Vec<Vec<u8>> = (0..10).map(|i| format!("k{i}").into_bytes()).collect();
    assert_eq!(
        store.get_many(keys).await.expect("get_many").revision,
        written
    );
    assert_eq!(
        store.get_many(Vec::new()).await.expect("get_many").revision,
        written
    );
    // The last write may have changed nothing (a delete of an absent key).
    let mut changes = Vec::new();
    within(30, "every change after the page", async {
        loop {
            match watcher
                .next(Duration::from_millis(100))
                .await
                .expect("watch")
            {
                Some(change) => changes.push(change),
                None if watcher.progress() >= last.revision => break,
                None => {}
            }
        }
    })
    .await;
    for change in changes {
        for event in change.events {
            match event {
                Event::Put {
                    key,
                    value,
                    version,
                    ..
                } => {
                    state.insert(key, (version, value));
                }
                Event::Delete { key, .. } => {
                    state.remove(&key);
                }
            }
        }
    }
    let want: BTreeMap<Vec<u8>, (u64, Vec<u8>)> = last
        .entries
        .iter()
        .map(|e| (e.key.clone(), (e.version, e.value.clone())))
        .collect();
    assert_eq!(state, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(kvstore_test_postgres),
    ignore = "set KVSTORE_TEST_POSTGRES_URL to run it"
)]
async fn a_version_1_schema_is_upgraded() {
    let schema = PgSchema::new();
    let raw = schema.client().await;
    let s = &schema.name;
    // What kvstore made before the change log, with two writes in it.
    raw.batch_execute(&format!(
        "CREATE SCHEMA \"{s}\";
         CREATE TABLE \"{s}\".kvstore_schema (version int4 NOT NULL);
         INSERT INTO \"{s}\".kvstore_schema VALUES (1);
         CREATE TABLE \"{s}\".kv (
             key bytea PRIMARY KEY, value bytea NOT NULL, version int8 NOT NULL,
             revision int8 NOT NULL, created_at_us int8 NOT NULL, updated_at_us int8 NOT NULL);
         CREATE SEQUENCE \"{s}\".kv_revision AS int8;
         SELECT setval('\"{s}\".kv_revision', 41);
         INSERT INTO \"{s}\".kv VALUES ('old', 'v', 3, 41, 1, 2);"
    ))
    .await
    .expect("a version-1 schema");
    let store = schema.open().await;
    let version: i32 = raw
        .query_one(&format!("SELECT version FROM \"{s}\".kvstore_schema"), &[])
        .await
        .expect("version")
        .get(0);
    assert_eq!(version, 5);
    let old = store.get(b"old").await.expect("get").expect("old");
    assert_eq!((old.version, old.revision), (3, 41));
    let found = store
        .get_many(vec![b"old".to_vec()])
        .await
        .expect("get_many");
    assert_eq!(found.revision, 41);
    // The history starts at the upgrade.
    match store.changes(0, 10).await {
        Err(StoreError::Compacted {
            compact_revision,
            revision,
        }) => assert_eq!((compact_revision, revision), (42, 41)),
        other => panic!("{other:?}"),
    }
    let mut watcher = watch(&store, Some(42)).await;
    let revision = write(&store, vec![put("new", "v")]).await;
    assert_eq!(revision, 42);
    let changes = collect(&mut watcher, 10, "the first write after the upgrade", |c| {
        !c.is_empty()
    })
    .await;
    assert_eq!(changes[0].revision, 42);
    // Opening again finds version 2 and changes nothing.
    drop(schema.open().await);
    assert_eq!(store.changes(41, 10).await.expect("changes").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(kvstore_test_postgres),
    ignore = "set KVSTORE_TEST_POSTGRES_URL to run it"
)]
async fn a_store_opened_while_the_database_is_down_feeds_watchers_once_it_is_back() {
    let schema = PgSchema::new();
    let first = write(&*schema.open().await, vec![put("before", "v")]).await;
    let (target, _) = crate::postgres::through(&schema.url, "127.0.0.1:1".parse().expect("addr"));
    let mut proxy = Proxy::start(target).await;
    proxy.down().await;
    let (_, url) = crate::postgres::through(&schema.url, proxy.addr);
    let mut config = schema.config();
    config.url = url;
    config.connect_timeout = Duration::from_secs(1);
    let store = Arc::new(PostgresStore::open(config).await.expect("open while down"));
    // Its feed does not know where the history ends yet.
    let mut early = watch(&store, None).await;
    proxy.up().await;
    let revision = within(30, "a write once the database is back", async {
        loop {
            match store.write(vec![put("after", "v")]).await {
                Ok(WriteOutcome::Applied { revision, .. }) => return revision,
                Ok(other) => panic!("{other:?}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
    .await;
    let changes = collect(&mut early, 10, "the write after the outage", |c| {
        c.last().is_some_and(|c| c.revision >= revision)
    })
    .await;
    let revisions: Vec<u64> = changes.iter().map(|c| c.revision).collect();
    assert_eq!(revisions, vec![first, revision]);
    let mut late = watch(&store, Some(revision + 1)).await;
    let next = write(&store, vec![put("later", "v")]).await;
    let changes = collect(&mut late, 10, "a later write", |c| !c.is_empty()).await;
    assert_eq!(changes[0].revision, next);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(kvstore_test_postgres),
    ignore = "set KVSTORE_TEST_POSTGRES_URL to run it"
)]
async fn racing_creates_leave_no_hole_and_lose_no_change() {
    let schema = PgSchema::new();
    let store = schema.open().await;
    let mut watcher = watch(&store, None).await;
    // Every writer creates the same new keys at once, alone or in batches:
    // the losers of each race take a revision they cannot use, or retry.
    let writers: Vec<_> = (0..6)
        .map(|w| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let mut revisions = Vec::new();
                for i in 0..30 {
                    let ops = if w % 2 == 0 {
                        vec![put(&format!("n{i}"), &format!("{w}"))]
                    } else {
                        vec![
                            put(&format!("n{i}"), &format!("{w}")),
                            put(&format!("m{i}"), &format!("{w}")),
                        ]
                    };
                    revisions.push(write(&store, ops).await);
                }
                revisions
            })
        })
        .collect();
    let mut written = BTreeSet::new();
    for writer in writers {
        written.extend(within(60, "a writer", writer).await.expect("writer"));
    }
    let last = *written.last().expect("revisions");
    let changes = collect(&mut watcher, 30, "every write", |c| {
        c.last().is_some_and(|c| c.revision >= last)
    })
    .await;
    let revisions: Vec<u64> = changes.iter().map(|c| c.revision).collect();
    assert_eq!(revisions, written.into_iter().collect::<Vec<_>>());
    let mut state = BTreeMap::new();
    for event in changes.into_iter().flat_map(|c| c.events) {
        if let Event::Put {
            key,
            value,
            version,
            ..
        } = event
        {
            state.insert(key, (version, value));
        }
    }
    let page = store.scan(scan_everything()).await.expect("scan");
    let want: BTreeMap<Vec<u8>, (u64, Vec<u8>)> = page
        .entries
        .into_iter()
        .map(|e| (e.key, (e.version, e.value)))
        .collect();
    assert_eq!(state, want);
    assert_eq!(page.revision, last);
}
