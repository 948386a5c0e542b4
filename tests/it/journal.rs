//! The embedded engine's journal stays small under sustained writes, so that
//! opening after a crash replays a couple of journal files, not half a
//! gigabyte of them.

use std::path::Path;
use std::time::{Duration, Instant};

use kvstore::storage::embedded::{Durability, EmbeddedConfig, EmbeddedStore};
use kvstore::storage::{Condition, Expiry, Store, WriteOp};
use rand::rngs::SmallRng;
use rand::{Rng as _, SeedableRng as _};

/// Bytes in the journal files of a data directory.
fn journal_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|entry| entry.path().extension().is_some_and(|ext| ext == "jnl"))
        .map(|entry| entry.metadata().map_or(0, |m| m.len()))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journals_are_deleted_as_their_writes_are_flushed() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = EmbeddedConfig::new(dir.path());
    config.durability = Durability::Buffered;
    let store = EmbeddedStore::open(config).unwrap();
    // 230 MB of values, journaled twice (the entry, and its change record
    // for watchers): 460 MB, all of which fjall would keep by default (it
    // starts freeing journals past 512 MiB). Random, because the journal
    // compresses what it can.
    let mut rng = SmallRng::seed_from_u64(7);
    for i in 0..3500 {
        let mut value = vec![0u8; 64 << 10];
        rng.fill_bytes(&mut value);
        store
            .write(vec![WriteOp::Put {
                key: format!("k{i:05}").into_bytes(),
                value,
                condition: Condition::Any,
                expiry: Expiry::Never,
            }])
            .await
            .unwrap();
    }
    // Flushes, and the deletion of the journals they free, run in the
    // background. fjall starts a new journal only when it flushes a memtable
    // and the journal has passed 64 MB, and the entries and the change
    // records each fill a 64 MiB memtable: a journal grows to about 135 MB
    // before it is followed, and the one before it stays until the
    // memtables holding its writes are flushed (228 MB seen at rest).
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let bytes = journal_bytes(dir.path());
        if bytes <= 300_000_000 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the journals still hold {bytes} bytes after 460 MB of journal"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    store.close().await.unwrap();
}
