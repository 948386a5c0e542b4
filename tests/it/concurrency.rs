//! Concurrent clients against one server: conditional writes lose no update,
//! an acknowledged write is seen from any connection, and batch reads and
//! ranges never show part of a batch.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::harness::{TestServer, within};
use hyper::StatusCode;
use kvstore::client::{Client, ClientError, ListParams};
use kvstore::storage::Condition;
use kvstore::types::{BatchOp, BatchOpKind, BatchRequest, EntryBody};

const COUNTER: &str = "counter";

/// The counter's value and version.
async fn read_counter(client: &Client) -> (u64, u64) {
    let entry = client
        .get(COUNTER)
        .await
        .expect("read the counter")
        .expect("the counter exists");
    let value = entry.value.as_deref().expect("a text value");
    (value.parse().expect("a number"), entry.version)
}

/// Adds one to the counter with `If-Match`, reading again after every 412;
/// returns the version written. The version a 412 reports as current is
/// durable and readable by the time the 412 arrives, so the read after it
/// sees that version or a later one.
async fn increment(client: &Client) -> u64 {
    let mut reported = 0;
    loop {
        let (value, version) = read_counter(client).await;
        assert!(
            version >= reported,
            "read version {version} after a 412 that reported {reported}"
        );
        let next = (value + 1).to_string();
        match client.put(COUNTER, next, Condition::Version(version)).await {
            Ok(put) => {
                assert_eq!(put.version, version + 1);
                return put.version;
            }
            Err(ClientError::Api { status, error })
                if status == StatusCode::PRECONDITION_FAILED
                    && error.code == "version_mismatch" =>
            {
                let current = error
                    .details
                    .get("current_version")
                    .and_then(|v| v.as_u64());
                assert!(current.is_some_and(|c| c > version), "{error:?}");
                reported = current.unwrap_or(0);
            }
            Err(err) => panic!("increment: {err}"),
        }
    }
}

/// What a reader on another connection sees of `key`, by every read path.
async fn read_everywhere(client: &Client, key: &str) -> [Option<EntryBody>; 3] {
    let single = client.get(key).await.expect("get");
    let batch = client
        .batch_get(vec![key.to_owned()])
        .await
        .expect("batch get");
    let range = client
        .list(&ListParams {
            prefix: Some(key.to_owned()),
            limit: Some(1),
            ..ListParams::default()
        })
        .await
        .expect("list");
    [
        single,
        batch.items.into_iter().next(),
        range.items.into_iter().next(),
    ]
}

fn put_both(value: &str) -> BatchRequest {
    let op = |key: &str| BatchOp {
        value: Some(value.to_owned()),
        ..BatchOp::new(BatchOpKind::Put, key)
    };
    BatchRequest {
        ops: vec![op("pair/x"), op("pair/y")],
    }
}

fn delete_both() -> BatchRequest {
    let op = |key: &str| BatchOp::new(BatchOpKind::Delete, key);
    BatchRequest {
        ops: vec![op("pair/x"), op("pair/y")],
    }
}

/// Both keys of the pair or neither, with one value and one revision.
fn assert_whole_batch(items: &[EntryBody], how: &str) {
    match items {
        [] => {}
        [x, y] => {
            assert_eq!((&x.key[..], &y.key[..]), ("pair/x", "pair/y"), "{how}");
            assert_eq!(x.value, y.value, "{how} shows part of a batch");
            assert_eq!(x.revision, y.revision, "{how} shows part of a batch");
        }
        _ => panic!("{how} shows part of a batch: {items:?}"),
    }
}

for_each_backend! {

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_increments_lose_no_update() {
    const TASKS: u64 = 16;
    const INCREMENTS: u64 = 16;
    let server = TestServer::start().await;
    let created = server
        .client
        .put(COUNTER, "0", Condition::Absent)
        .await
        .expect("create the counter");
    assert_eq!(created.version, 1);

    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let client = server.client.clone();
            tokio::spawn(async move {
                let mut versions = Vec::new();
                for _ in 0..INCREMENTS {
                    versions.push(increment(&client).await);
                }
                versions
            })
        })
        .collect();
    let mut versions = Vec::new();
    for task in tasks {
        versions.extend(within(120, "an increment task", task).await.expect("increment task"));
    }

    // Every increment wrote its own version, and none was lost.
    versions.sort_unstable();
    let expected: Vec<u64> = (2..=TASKS * INCREMENTS + 1).collect();
    assert_eq!(versions, expected);
    assert_eq!(
        read_counter(&server.client).await,
        (TASKS * INCREMENTS, TASKS * INCREMENTS + 1)
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_acknowledged_on_one_connection_is_read_on_another() {
    let server = TestServer::start().await;
    let writer = Client::new(&server.base).expect("writer");
    let reader = Client::new(&server.base).expect("reader");
    let keys = ["k/a", "k/b", "k/c"];
    for round in 0..300u32 {
        let key = keys[round as usize % keys.len()];
        if round % 7 == 6 {
            writer.delete(key, None).await.expect("delete");
            assert_eq!(
                read_everywhere(&reader, key).await,
                [None, None, None],
                "round {round}"
            );
            continue;
        }
        let value = round.to_string();
        let put = writer
            .put(key, value.clone(), Condition::Any)
            .await
            .expect("put");
        for (path, seen) in read_everywhere(&reader, key).await.into_iter().enumerate() {
            let seen = seen.unwrap_or_else(|| panic!("round {round}: read {path} missed {key}"));
            assert_eq!(
                (seen.value.as_deref(), seen.version, seen.revision),
                (Some(value.as_str()), put.version, put.revision),
                "round {round}, read {path}"
            );
        }
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_reads_and_ranges_never_show_part_of_a_batch() {
    let server = TestServer::start().await;
    let done = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let client = Client::new(&server.base).expect("reader");
            let done = Arc::clone(&done);
            tokio::spawn(async move {
                let mut reads = 0u32;
                loop {
                    let finished = done.load(Ordering::Acquire);
                    let keys = vec!["pair/x".to_owned(), "pair/y".to_owned()];
                    let batch = client.batch_get(keys).await.expect("batch get");
                    assert_whole_batch(&batch.items, "batch/get");
                    let range = client
                        .list(&ListParams {
                            prefix: Some("pair/".into()),
                            ..ListParams::default()
                        })
                        .await
                        .expect("list");
                    assert_whole_batch(&range.items, "a range");
                    reads += 1;
                    if finished {
                        return reads;
                    }
                }
            })
        })
        .collect();

    let writer = Client::new(&server.base).expect("writer");
    for round in 0..150u32 {
        let request = if round % 5 == 4 {
            delete_both()
        } else {
            put_both(&round.to_string())
        };
        writer.batch(&request).await.expect("batch");
    }
    done.store(true, Ordering::Release);
    for reader in readers {
        assert!(within(60, "a reader", reader).await.expect("reader task") > 0);
    }
    server.stop().await;
}

}
