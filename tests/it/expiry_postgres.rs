//! Deadlines and leases on PostgreSQL: expired keys vanish for every read at
//! once, are deleted within about a second as writes with events, once even
//! with several servers, and also when no server ran at the deadline.
//!
//! Skipped, printing why, unless `KVSTORE_TEST_POSTGRES_URL` is set.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::harness::{PgSchema, within};
use kvstore::StoreError;
use kvstore::storage::postgres::PostgresStore;
use kvstore::storage::{
    Change, Condition, DeleteReason, Event, Expiry, OpResult, ScanRequest, Store, WriteOp,
    WriteOutcome, system_now_us,
};

fn put(key: &str, value: &str, expiry: Expiry) -> WriteOp {
    WriteOp::Put {
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
        condition: Condition::Any,
        expiry,
    }
}

/// Applies a write that must apply; gives its revision and results.
async fn write(store: &PostgresStore, ops: Vec<WriteOp>) -> (u64, Vec<OpResult>) {
    match store.write(ops).await.expect("write") {
        WriteOutcome::Applied { revision, results } => (revision, results),
        WriteOutcome::Rejected { failed } => panic!("rejected: {failed:?}"),
    }
}

/// The deadline a put gave its key.
fn deadline(result: &OpResult) -> i64 {
    match result {
        OpResult::Put {
            expires_at_us: Some(at),
            ..
        } => *at,
        other => panic!("no deadline: {other:?}"),
    }
}

async fn sleep_past(deadline_us: i64) {
    let wait = deadline_us.saturating_sub(system_now_us()).max(0) + 20_000;
    tokio::time::sleep(Duration::from_micros(u64::try_from(wait).expect("wait"))).await;
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

async fn visible(store: &PostgresStore) -> Vec<String> {
    let page = store.scan(scan_everything()).await.expect("scan");
    page.entries
        .iter()
        .map(|e| String::from_utf8_lossy(&e.key).into_owned())
        .collect()
}

/// Every change so far (gaps left out).
async fn history(store: &PostgresStore) -> Vec<Change> {
    let mut changes = store.changes(0, 100_000).await.expect("changes");
    changes.retain(|c| !c.events.is_empty());
    changes
}

/// Every change up to `revision` (gaps left out), once the watermark passed
/// it; fails the test after 30 s.
async fn history_through(store: &PostgresStore, revision: u64) -> Vec<Change> {
    within(30, "the history up to a write", async {
        loop {
            let changes = history(store).await;
            if changes.last().is_some_and(|c| c.revision >= revision) {
                return changes;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

/// The deletes so far, as (revision, key, reason).
async fn deletes(store: &PostgresStore) -> Vec<(u64, String, DeleteReason)> {
    history(store)
        .await
        .iter()
        .flat_map(|c| {
            c.events.iter().filter_map(move |e| match e {
                Event::Delete { key, reason, .. } => Some((
                    c.revision,
                    String::from_utf8_lossy(key).into_owned(),
                    *reason,
                )),
                Event::Put { .. } => None,
            })
        })
        .collect()
}

/// Waits (at most `secs`) until `count` deletes are in the history.
async fn deletes_within(
    store: &PostgresStore,
    secs: u64,
    count: usize,
) -> Vec<(u64, String, DeleteReason)> {
    within(secs, "the expiry deletes", async {
        loop {
            let found = deletes(store).await;
            if found.len() >= count {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// Rows still in the table, deleted or not, as a plain connection sees them.
async fn rows_in_table(schema: &PgSchema) -> i64 {
    let client = schema.client().await;
    client
        .query_one(&format!("SELECT count(*) FROM \"{}\".kv", schema.name), &[])
        .await
        .expect("count")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(kvstore_test_postgres),
    ignore = "set KVSTORE_TEST_POSTGRES_URL to run it"
)]
async fn keys_vanish_at_their_deadline_and_are_deleted_once_with_an_event() {
    let schema = PgSchema::new();
    let store = schema.open().await;
    let (_, single) = write(&store, vec![put("one", "1", Expiry::Ttl(1500))]).await;
    let (_, batch) = write(
        &store,
        vec![
            put("two", "2", Expiry::Ttl(1500)),
            put("three", "3", Expiry::Ttl(1500)),
            put("stays", "s", Expiry::Never),
        ],
    )
    .await;
    let at = deadline(&single[0]).max(deadline(&batch[0]));
    let entry = store.get(b"one").await.expect("get").expect("one");
    assert_eq!(entry.expires_at_us, Some(deadline(&single[0])));
    // The change log carries a put's deadline.
    let (marker, _) = write(&store, vec![put("marker", "m", Expiry::Never)]).await;
    let logged: Vec<(Vec<u8>, Option<i64>)> = history_through(&store, marker)
        .await
        .iter()
        .flat_map(|c| c.events.clone())
        .filter_map(|e| match e {
            Event::Put {
                key, expires_at_us, ..
            } => Some((key, expires_at_us)),
            Event::Delete { .. } => None,
        })
        .collect();
    assert_eq!(logged[0], (b"one".to_vec(), Some(deadline(&single[0]))));
    assert_eq!(logged[1], (b"stays".to_vec(), None));
    assert_eq!(logged[3], (b"two".to_vec(), Some(deadline(&batch[0]))));
    assert_eq!(
        visible(&store).await,
        ["marker", "one", "stays", "three", "two"]
    );
    // A closed store serves reads but expires nothing: what it reads past
    // the deadline is gone although its row is still there.
    store.close().await.expect("close");
    sleep_past(at).await;
    assert_eq!(rows_in_table(&schema).await, 5);
    assert_eq!(store.get(b"one").await.expect("get"), None);
    let found = store
        .get_many(vec![b"two".to_vec(), b"stays".to_vec()])
        .await
        .expect("get_many");
    assert!(found.entries[0].is_none());
    assert!(found.entries[1].is_some());
    assert_eq!(visible(&store).await, ["marker", "stays"]);
    // A running store deletes them, each once, under a revision of its own.
    let running = schema.open().await;
    let gone = deletes_within(&running, 10, 3).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let gone_later = deletes(&running).await;
    assert_eq!(gone, gone_later, "deleted more than once");
    let mut keys: Vec<&str> = gone.iter().map(|(_, k, _)| k.as_str()).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["one", "three", "two"]);
    assert!(gone.iter().all(|(_, _, r)| *r == DeleteReason::Expired));
    assert!(gone.windows(2).all(|w| w[0].0 < w[1].0), "{gone:?}");
    assert_eq!(rows_in_table(&schema).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(kvstore_test_postgres),
    ignore = "set KVSTORE_TEST_POSTGRES_URL to run it"
)]
async fn rewrites_keep_or_drop_the_deadline_and_conditions_see_expired_keys_absent() {
    let schema = PgSchema::new();
    let store = schema.open().await;
    // Rewritten without a ttl just before its deadline: it stays.
    let (_, first) = write(&store, vec![put("rewritten", "1", Expiry::Ttl(2000))]).await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    write(&store, vec![put("rewritten", "2", Expiry::Never)]).await;
    // Keep keeps the deadline, also under a version condition; a Ttl put
    // under a condition sets one.
    let (_, kept) = write(&store, vec![put("kept", "1", Expiry::Ttl(60_000))]).await;
    let keep = WriteOp::Put {
        key: b"kept".to_vec(),
        value: b"2".to_vec(),
        condition: Condition::Version(1),
        expiry: Expiry::Keep,
    };
    let (_, after) = write(&store, vec![keep]).await;
    assert_eq!(deadline(&after[0]), deadline(&kept[0]));
    let (_, fresh) = write(&store, vec![put("fresh", "1", Expiry::Keep)]).await;
    assert!(matches!(
        fresh[0],
        OpResult::Put {
            expires_at_us: None,
            ..
        }
    ));
    let conditional = WriteOp::Put {
        key: b"fresh".to_vec(),
        value: b"2".to_vec(),
        condition: Condition::Version(1),
        expiry: Expiry::Ttl(1500),
    };
    let (_, timed) = write(&store, vec![conditional]).await;
    sleep_past(deadline(&first[0]).max(deadline(&timed[0]))).await;
    // Past its deadline, "fresh" is absent to conditions, deleted yet or not.
    let again = WriteOp::Put {
        key: b"fresh".to_vec(),
        value: b"3".to_vec(),
        condition: Condition::Version(2),
        expiry: Expiry::Never,
    };
    match store.write(vec![again]).await.expect("write") {
        WriteOutcome::Rejected { failed } => assert_eq!(failed[0].current_version, None),
        applied => panic!("a condition on an expired key held: {applied:?}"),
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let rewritten = store.get(b"rewritten").await.expect("get").expect("kept");
    assert_eq!((rewritten.version, rewritten.expires_at_us), (2, None));
    let gone = deletes(&store).await;
    assert_eq!(
        gone.iter()
            .map(|(_, k, r)| (k.as_str(), *r))
            .collect::<Vec<_>>(),
        [("fresh", DeleteReason::Expired)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(kvstore_test_postgres),
    ignore = "set KVSTORE_TEST_POSTGRES_URL to run it"
)]
async fn a_write_that_finds_an_expired_row_logs_its_delete_first() {
    let schema = PgSchema::new();
    let store = schema.open().await;
    let (_, old) = write(&store, vec![put("k", "old", Expiry::Ttl(60_000))]).await;
    write(&store, vec![put("b", "old", Expiry::Ttl(60_000))]).await;
    let client = schema.client().await;
    // Both deadlines pass now; the writes below come well before the next
    // round of the expirer (every 200 ms) most of the time, and must give
    // the same history either way.
    client
        .execute(
            &format!(
                "UPDATE \"{}\".kv SET expires_at_us = expires_at_us - 120000000",
                schema.name
            ),
            &[],
        )
        .await
        .expect("move the deadlines");
    let (put_revision, results) = write(&store, vec![put("k", "new", Expiry::Never)]).await;
    let (batch_revision, _) = write(
        &store,
        vec![
            put("b", "new", Expiry::Never),
            put("c", "new", Expiry::Never),
        ],
    )
    .await;
    match &results[0] {
        OpResult::Put {
            version,
            created,
            created_at_us,
            ..
        } => {
            assert_eq!((*version, *created), (1, true));
            let OpResult::Put {
                created_at_us: before,
                ..
            } = old[0]
            else {
                panic!("a put")
            };
            assert!(*created_at_us > before);
        }
        other => panic!("{other:?}"),
    }
    let changes = history_through(&store, batch_revision).await;
    let of = |key: &str| -> Vec<(u64, &'static str)> {
        changes
            .iter()
            .flat_map(|c| {
                c.events
                    .iter()
                    .filter(|e| e.key() == key.as_bytes())
                    .map(|e| match e {
                        Event::Put { version: 1, .. } => (c.revision, "put v1"),
                        Event::Delete {
                            reason: DeleteReason::Expired,
                            ..
                        } => (c.revision, "expired"),
                        _ => (c.revision, "other"),
                    })
            })
            .collect()
    };
    let k = of("k");
    assert_eq!(
        k.iter().map(|(_, e)| *e).collect::<Vec<_>>(),
        ["put v1", "expired", "put v1"]
    );
    assert_eq!(k[2].0, put_revision);
    let b = of("b");
    assert_eq!(
        b.iter().map(|(_, e)| *e).collect::<Vec<_>>(),
        ["put v1", "expired", "put v1"]
    );
    assert_eq!(b[2].0, batch_revision);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(kvstore_test_postgres),
    ignore = "set KVSTORE_TEST_POSTGRES_URL to run it"
)]
async fn leases_hold_keys_until_revoked_in_one_revision() {
    let schema = PgSchema::new();
    let store = schema.open().await;
    let lease = store
        .grant_lease(5_000, Some("owner".into()))
        .await
        .expect("grant");
    assert_ne!(lease.id, 0);
    let (_, single) = write(&store, vec![put("a", "1", Expiry::Lease(lease.id))]).await;
    write(
        &store,
        vec![
            put("b", "2", Expiry::Lease(lease.id)),
            put("c", "3", Expiry::Never),
        ],
    )
    .await;
    assert!(matches!(
        single[0],
        OpResult::Put { lease: Some(id), expires_at_us: Some(at), .. }
            if id == lease.id && at == lease.expires_at_us
    ));
    let (revision, _) = write(&store, vec![put("marker", "m", Expiry::Never)]).await;
    let logged = history_through(&store, revision).await;
    assert!(matches!(
        &logged[0].events[0],
        Event::Put { key, lease: Some(id), expires_at_us: Some(at), .. }
            if key == b"a" && *id == lease.id && *at == lease.expires_at_us
    ));
    let info = store.lease(lease.id).await.expect("lease").expect("live");
    let keys = store.lease_keys(lease.id).await.expect("lease keys");
    assert_eq!((keys, info.owner.as_deref()), (2, Some("owner")));
    tokio::time::sleep(Duration::from_millis(20)).await;
    let renewed = store.keep_lease_alive(lease.id).await.expect("keepalive");
    assert!(renewed.expires_at_us > lease.expires_at_us);
    let entry = store.get(b"b").await.expect("get").expect("b");
    assert_eq!(
        (entry.lease, entry.expires_at_us),
        (Some(lease.id), Some(renewed.expires_at_us))
    );
    // An unknown lease fails the whole write.
    for ops in [
        vec![put("x", "1", Expiry::Lease(42))],
        vec![
            put("y", "1", Expiry::Never),
            put("x", "1", Expiry::Lease(42)),
        ],
    ] {
        match store.write(ops).await {
            Err(StoreError::LeaseNotFound(42)) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(visible(&store).await, ["a", "b", "c", "marker"]);
    let revoked = store.revoke_lease(lease.id).await.expect("revoke");
    assert_eq!(revoked.keys, [b"a".to_vec(), b"b".to_vec()]);
    assert_eq!(visible(&store).await, ["c", "marker"]);
    let changes = history_through(&store, revoked.revision).await;
    let last = changes.last().expect("the revocation");
    assert_eq!(last.revision, revoked.revision);
    assert_eq!(
        last.events,
        [
            Event::Delete {
                key: b"a".to_vec(),
                version: 1,
                reason: DeleteReason::LeaseRevoked
            },
            Event::Delete {
                key: b"b".to_vec(),
                version: 1,
                reason: DeleteReason::LeaseRevoked
            },
        ]
    );
    assert_eq!(store.lease(lease.id).await.expect("lease"), None);
    for result in [
        store.keep_lease_alive(lease.id).await.map(|_| ()),
        store.revoke_lease(lease.id).await.map(|_| ()),
        store
            .write(vec![put("a", "1", Expiry::Lease(lease.id))])
            .await
            .map(|_| ()),
    ] {
        assert!(
            matches!(result, Err(StoreError::LeaseNotFound(id)) if id == lease.id),
            "{result:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(kvstore_test_postgres),
    ignore = "set KVSTORE_TEST_POSTGRES_URL to run it"
)]
async fn an_expired_lease_takes_its_keys_in_one_revision() {
    let schema = PgSchema::new();
    let store = schema.open().await;
    let lease = store.grant_lease(1500, None).await.expect("grant");
    let keys = ["k1", "k2", "k3"];
    let ops = keys
        .iter()
        .map(|k| put(k, "v", Expiry::Lease(lease.id)))
        .collect();
    write(&store, ops).await;
    // Keep on a leased key keeps the lease.
    let (_, kept) = write(&store, vec![put("k1", "w", Expiry::Keep)]).await;
    assert!(matches!(kept[0], OpResult::Put { lease: Some(id), .. } if id == lease.id));
    sleep_past(lease.expires_at_us).await;
    assert_eq!(visible(&store).await, Vec::<String>::new());
    assert_eq!(store.lease(lease.id).await.expect("lease"), None);
    assert!(matches!(
        store.keep_lease_alive(lease.id).await,
        Err(StoreError::LeaseNotFound(_))
    ));
    let gone = deletes_within(&store, 10, 3).await;
    assert!(
        gone.iter()
            .all(|(r, _, reason)| *r == gone[0].0 && *reason == DeleteReason::Expired),
        "{gone:?}"
    );
    assert_eq!(rows_in_table(&schema).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(kvstore_test_postgres),
    ignore = "set KVSTORE_TEST_POSTGRES_URL to run it"
)]
async fn two_servers_expire_the_same_keys_once_each() {
    let schema = PgSchema::new();
    let stores = [schema.open().await, schema.open().await];
    let lease = stores[0].grant_lease(2000, None).await.expect("grant");
    for chunk in 0..10 {
        let ops = (0..20)
            .map(|i| put(&format!("k{:03}", chunk * 20 + i), "v", Expiry::Ttl(2000)))
            .collect();
        write(&stores[chunk % 2], ops).await;
    }
    let leased = (0..20)
        .map(|i| put(&format!("l{i:02}"), "v", Expiry::Lease(lease.id)))
        .collect();
    write(&stores[1], leased).await;
    let gone = deletes_within(&stores[0], 15, 220).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    for store in &stores {
        let seen = deletes(store).await;
        assert_eq!(seen.len(), 220, "a key deleted twice");
        assert_eq!(seen, gone);
    }
    let mut per_key = BTreeMap::new();
    for (_, key, _) in &gone {
        *per_key.entry(key.clone()).or_insert(0) += 1;
    }
    assert_eq!(per_key.len(), 220);
    assert!(per_key.values().all(|n| *n == 1), "{per_key:?}");
    let revisions: Vec<u64> = history(&stores[0])
        .await
        .iter()
        .map(|c| c.revision)
        .collect();
    assert!(revisions.windows(2).all(|w| w[0] < w[1]));
    // The lease's keys went in one revision; each other key in its own.
    let leased: Vec<u64> = gone
        .iter()
        .filter(|(_, k, _)| k.starts_with('l'))
        .map(|(r, _, _)| *r)
        .collect();
    assert!(leased.iter().all(|r| *r == leased[0]));
    let mut own: Vec<u64> = gone
        .iter()
        .filter(|(_, k, _)| k.starts_with('k'))
        .map(|(r, _, _)| *r)
        .collect();
    own.dedup();
    assert_eq!(own.len(), 200);
    assert_eq!(rows_in_table(&schema).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(kvstore_test_postgres),
    ignore = "set KVSTORE_TEST_POSTGRES_URL to run it"
)]
async fn what_expired_while_no_server_ran_is_gone_at_start_and_deleted_soon() {
    let schema = PgSchema::new();
    let store = schema.open().await;
    let lease = store.grant_lease(1500, None).await.expect("grant");
    let (_, results) = write(
        &store,
        vec![
            put("timed", "v", Expiry::Ttl(1500)),
            put("leased", "v", Expiry::Lease(lease.id)),
            put("forever", "v", Expiry::Never),
        ],
    )
    .await;
    store.close().await.expect("close");
    drop(store);
    sleep_past(deadline(&results[0]).max(lease.expires_at_us)).await;
    assert_eq!(rows_in_table(&schema).await, 3);
    let store = schema.open().await;
    assert_eq!(visible(&store).await, ["forever"]);
    let gone = deletes_within(&store, 10, 2).await;
    assert!(gone.iter().all(|(_, _, r)| *r == DeleteReason::Expired));
    assert_eq!(rows_in_table(&schema).await, 1);
}

/// A store on `schema` holding "old" at version 1, taken back to an older
/// schema version by `downgrade` (with `{s}` for the schema's name), then
/// opened, which must upgrade it to version 5.
async fn upgraded_from(schema: &PgSchema, downgrade: &str) -> Arc<PostgresStore> {
    let store = schema.open().await;
    write(&store, vec![put("old", "v", Expiry::Never)]).await;
    store.close().await.expect("close");
    drop(store);
    let client = schema.client().await;
    client
        .batch_execute(&downgrade.replace("{s}", &schema.name))
        .await
        .expect("downgrade");
    let store = Arc::new(PostgresStore::open(schema.config()).await.expect("upgrade"));
    let version: i32 = client
        .query_one(
            &format!("SELECT version FROM \"{}\".kvstore_schema", schema.name),
            &[],
        )
        .await
        .expect("version")
        .get(0);
    assert_eq!(version, 5);
    store
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(kvstore_test_postgres),
    ignore = "set KVSTORE_TEST_POSTGRES_URL to run it"
)]
async fn a_version_2_schema_is_upgraded_with_its_data() {
    let schema = PgSchema::new();
    let store = upgraded_from(
        &schema,
        "DROP FUNCTION \"{s}\".kv_put_1;
         DROP TABLE \"{s}\".leases;
         ALTER TABLE \"{s}\".kv DROP COLUMN expires_at_us, DROP COLUMN lease;
         ALTER TABLE \"{s}\".kv_changes DROP COLUMN expires_at_us, DROP COLUMN lease;
         UPDATE \"{s}\".kvstore_schema SET version = 2;",
    )
    .await;
    let entry = store.get(b"old").await.expect("get").expect("kept");
    assert_eq!((entry.version, entry.expires_at_us), (1, None));
    let (_, results) = write(&store, vec![put("new", "v", Expiry::Ttl(60_000))]).await;
    deadline(&results[0]);
}

/// Version 4 adds the put function, which a version-3 schema lacks: every
/// single put calls it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(kvstore_test_postgres),
    ignore = "set KVSTORE_TEST_POSTGRES_URL to run it"
)]
async fn a_version_3_schema_is_upgraded_with_the_put_function() {
    let schema = PgSchema::new();
    let store = upgraded_from(
        &schema,
        "DROP FUNCTION \"{s}\".kv_put_1;
         UPDATE \"{s}\".kvstore_schema SET version = 3;",
    )
    .await;
    let (_, results) = write(&store, vec![put("old", "w", Expiry::Ttl(60_000))]).await;
    deadline(&results[0]);
    let entry = store.get(b"old").await.expect("get").expect("kept");
    assert_eq!((entry.version, entry.value.as_ref()), (2, &b"w"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(kvstore_test_postgres),
    ignore = "set KVSTORE_TEST_POSTGRES_URL to run it"
)]
async fn a_version_4_schema_is_upgraded_with_the_delete_function() {
    let schema = PgSchema::new();
    let store = upgraded_from(
        &schema,
        "DROP FUNCTION \"{s}\".kv_delete_1;
         UPDATE \"{s}\".kvstore_schema SET version = 4;",
    )
    .await;
    let outcome = store
        .write(vec![WriteOp::Delete {
            key: b"old".to_vec(),
            condition: Condition::Version(1),
        }])
        .await
        .expect("delete");
    assert!(
        matches!(
            outcome,
            WriteOutcome::Applied { ref results, .. }
                if results[0] == OpResult::Deleted { existed: true }
        ),
        "{outcome:?}"
    );
    assert!(store.get(b"old").await.expect("get").is_none());
}

/// A lease ended while puts attach keys to it takes its locks in the order
/// the puts take theirs (keys, then the lease): no deadlock for PostgreSQL
/// to break, which the server would count and wait out (a second each).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(kvstore_test_postgres),
    ignore = "set KVSTORE_TEST_POSTGRES_URL to run it"
)]
async fn ending_a_lease_while_its_keys_are_written_takes_no_deadlock() {
    use kvstore::client::ClientError;
    use kvstore::types::parse_lease_id;

    let schema = PgSchema::new();
    let dir = tempfile::tempdir().expect("temp dir");
    // A process of its own, so that its retry counter is its own.
    let mut server = crate::multi_server::start(&schema, dir.path(), &[]);
    let client = server.client.clone();
    let mut workers = Vec::new();
    for worker in 0..4 {
        let client = client.clone();
        workers.push(tokio::spawn(async move {
            for round in 0..15 {
                let lease = client.grant_lease(60_000).await.expect("grant");
                let id = parse_lease_id(&lease.lease).expect("lease id");
                let keys: Vec<String> = (0..5).map(|i| format!("race/{worker}/{i}")).collect();
                for key in &keys {
                    client
                        .put_with(key, "a", Condition::Any, Expiry::Lease(id))
                        .await
                        .expect("put");
                }
                let writer = {
                    let (client, keys) = (client.clone(), keys.clone());
                    tokio::spawn(async move {
                        for key in keys.iter().cycle().take(15) {
                            match client
                                .put_with(key, "b", Condition::Any, Expiry::Lease(id))
                                .await
                            {
                                Ok(_) | Err(ClientError::LeaseNotFound { .. }) => {}
                                Err(err) => panic!("put {key}: {err}"),
                            }
                        }
                    })
                };
                client.revoke_lease(id).await.expect("revoke");
                writer.await.expect("writer");
                // Whatever the writer put after the revoke failed: no key
                // outlives its lease.
                for key in &keys {
                    assert_eq!(
                        client.get(key).await.expect("get"),
                        None,
                        "{key}, round {round}"
                    );
                }
            }
        }));
    }
    for worker in workers {
        within(300, "the lease workers", worker)
            .await
            .expect("worker");
    }
    let metrics = client
        .send(hyper::Method::GET, "/metrics", &[], bytes::Bytes::new())
        .await
        .expect("metrics");
    let text = String::from_utf8_lossy(&metrics.body);
    let deadlocks = text
        .lines()
        .find_map(|line| line.strip_prefix("kvstore_postgres_retries_total{cause=\"deadlock\"} "))
        .map_or(0.0, |n| n.parse::<f64>().expect("a count"));
    assert_eq!(deadlocks, 0.0, "{text}");
    assert!(server.terminate());
}
