//! Once no write has been committed for `flush_when_quiet`, the embedded
//! engine flushes its memtables of 1 MiB or more to tables, so that reads
//! stop searching them; smaller ones stay in memory until fjall flushes them
//! when full. Either way, readers are then handed the engine as it is.

use std::path::Path;
use std::time::Duration;

use crate::harness::{eventually, table_files};
use kvstore::storage::embedded::{EmbeddedConfig, EmbeddedStore};
use kvstore::storage::{Condition, Expiry, Store, WriteOp};

fn open(dir: &Path, flush_when_quiet: Option<Duration>) -> EmbeddedStore {
    let mut config = EmbeddedConfig::new(dir);
    config.flush_when_quiet = flush_when_quiet;
    EmbeddedStore::open(config).expect("open")
}

fn value_of(n: usize, bytes: usize) -> Vec<u8> {
    format!("v{n}-").repeat(bytes / 4).into_bytes()
}

/// Puts keys `k0` to `k{count - 1}` with [`value_of`] values.
async fn put_values(store: &EmbeddedStore, count: usize, bytes: usize) {
    for n in 0..count {
        store
            .write(vec![WriteOp::Put {
                key: format!("k{n}").into_bytes(),
                value: value_of(n, bytes),
                condition: Condition::Any,
                expiry: Expiry::Never,
            }])
            .await
            .expect("put");
    }
}

async fn assert_values(store: &EmbeddedStore, count: usize, bytes: usize) {
    for n in 0..count {
        let entry = store
            .get(format!("k{n}").as_bytes())
            .await
            .expect("get")
            .unwrap_or_else(|| panic!("k{n} is gone"));
        assert_eq!(entry.value, value_of(n, bytes), "k{n}");
        assert_eq!(entry.version, 1, "k{n}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memtable_goes_to_a_table_once_writes_are_quiet() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), Some(Duration::from_millis(200)));
    let tables = table_files(dir.path()).len();
    // 1.3 MB: past the 1 MiB below which a memtable is left alone, far
    // below the 64 MiB at which fjall flushes one by itself.
    put_values(&store, 160, 8 << 10).await;
    let (_, written) = store.sequence_numbers().expect("a view");
    eventually(30, "a table written after writes went quiet", || {
        table_files(dir.path()).len() > tables
    })
    .await;
    // The flush ends after the last write, and gets a later sequence number
    // than its snapshot: without a new one, reads would go on searching the
    // flushed memtable.
    eventually(30, "the flush's table in the engine", || {
        store
            .sequence_numbers()
            .is_some_and(|(_, engine)| engine > written)
    })
    .await;
    eventually(30, "reads that see the flushed memtable's table", || {
        store
            .sequence_numbers()
            .is_some_and(|(reads, engine)| reads >= engine)
    })
    .await;
    assert_values(&store, 160, 8 << 10).await;
    store.close().await.unwrap();
    drop(store);
    let store = open(dir.path(), None);
    assert_values(&store, 160, 8 << 10).await;
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_memtable_stays_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), Some(Duration::from_millis(100)));
    let tables = table_files(dir.path());
    put_values(&store, 20, 100).await;
    // Eight quiet spells: any of them would have flushed a memtable worth it.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(table_files(dir.path()).len(), tables.len());
    assert_values(&store, 20, 100).await;
    store.close().await.unwrap();
}
