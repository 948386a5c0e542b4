//! Damaged files of a stopped store, under the real binary: bytes flipped in,
//! or cut off, the journal and a table. The server either recovers a prefix
//! of the writes (a torn journal tail is normal after a crash) or refuses to
//! start with a message that names the file; it never serves a wrong value.
//! Corruption found while serving is 500 `internal`, logged at `error`,
//! never 503 (which tells clients to retry). docs/durability.md
//! ("Corruption") says what fjall does in each case.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::harness::{Binary, poll_until, within};
use hyper::StatusCode;
use kvstore::client::{Client, ClientError, ListParams};
use kvstore::storage::Condition;
use tempfile::TempDir;

const REQUEST_SECS: u64 = 60;

/// The end marker of every journal batch (fjall's `MAGIC_BYTES`).
const BATCH_END: &[u8] = b"FJL\x03";

/// A store written through the binary and stopped: its keys and values, in
/// the order written (one write each).
struct Written {
    dir: TempDir,
    writes: Vec<(String, String)>,
}

impl Written {
    /// Writes `n` keys with values of about `value_len` bytes, then stops the
    /// server with SIGKILL (`kill`) or SIGTERM.
    async fn new(n: usize, value_len: usize, kill: bool) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut server = Binary::start(dir.path(), &[]);
        let mut writes = Vec::new();
        for i in 0..n {
            let key = format!("key{i:04}");
            let value = format!("{key}={}", "v".repeat(value_len));
            within(
                REQUEST_SECS,
                "PUT",
                server.client.put(&key, value.clone(), Condition::Any),
            )
            .await
            .expect("put");
            writes.push((key, value));
        }
        if kill {
            server.child.kill().expect("SIGKILL");
            server.wait();
        } else {
            assert!(server.terminate(), "unclean stop");
        }
        Written { dir, writes }
    }

    /// A copy of the stopped store to damage, and the path in it of `file`
    /// (a path inside the original).
    fn copy_with(&self, file: &Path) -> (TempDir, PathBuf) {
        let copy = tempfile::tempdir().expect("temp dir");
        let status = std::process::Command::new("cp")
            .arg("-a")
            .arg(self.dir.path().join("."))
            .arg(copy.path())
            .status()
            .expect("cp");
        assert!(status.success(), "cp failed");
        let inside = copy.path().join(
            file.strip_prefix(self.dir.path())
                .expect("a file of the store"),
        );
        (copy, inside)
    }

    /// The store's one journal file.
    fn journal(&self) -> PathBuf {
        let journals: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .expect("data dir")
            .map(|entry| entry.expect("entry").path())
            .filter(|path| path.extension().is_some_and(|e| e == "jnl"))
            .collect();
        assert_eq!(journals.len(), 1, "one journal expected: {journals:?}");
        journals.into_iter().next().expect("journal")
    }

    /// Flushes the keys' memtable into a table with fjall itself (the server
    /// flushes only past 64 MiB); returns the table files.
    fn flush_to_tables(&self) -> Vec<PathBuf> {
        let db = fjall::Database::builder(self.dir.path())
            .open()
            .expect("open with fjall");
        let kv = db
            .keyspace("kv", fjall::KeyspaceCreateOptions::default)
            .expect("the kv keyspace");
        kv.rotate_memtable().expect("rotate the memtable");
        poll_until(Duration::from_secs(60), "the flush", || {
            kv.table_count() > 0
        });
        let tables = kv.path().join("tables");
        drop(kv);
        drop(db);
        std::fs::read_dir(tables)
            .expect("tables")
            .map(|entry| entry.expect("entry").path())
            .collect()
    }
}

/// Where a journal's data ends: fjall preallocates journals with zeros.
fn data_end(journal: &[u8]) -> usize {
    journal.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1)
}

/// Flips the bits of one byte of `file`.
fn flip(file: &Path, at: usize) {
    let mut bytes = std::fs::read(file).expect("read");
    bytes[at] ^= 0x55;
    std::fs::write(file, bytes).expect("write");
}

/// Cuts `file` to `len` bytes.
fn cut(file: &Path, len: usize) {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(file)
        .expect("open");
    file.set_len(len as u64).expect("truncate");
}

/// What one read of a written key gave.
#[derive(Debug, PartialEq)]
enum Read {
    Right,
    Missing,
    /// 500 `internal`: the read hit damaged data.
    Corrupt,
}

async fn read(client: &Client, key: &str, value: &str) -> Read {
    match within(REQUEST_SECS, &format!("GET {key}"), client.get(key)).await {
        Ok(Some(entry)) => {
            assert_eq!(entry.value.as_deref(), Some(value), "{key}: a wrong value");
            Read::Right
        }
        Ok(None) => Read::Missing,
        Err(ClientError::Api { status, error })
            if status == StatusCode::INTERNAL_SERVER_ERROR && error.code == "internal" =>
        {
            Read::Corrupt
        }
        Err(err) => panic!("{key}: {err}"),
    }
}

/// Every item of one page of every key: right, or the page is refused with
/// 500 `internal`. No key that was not written.
async fn check_list(client: &Client, written: &Written) {
    let params = ListParams {
        limit: Some(1000),
        ..ListParams::default()
    };
    match within(REQUEST_SECS, "list", client.list(&params)).await {
        Ok(page) => {
            for item in page.items {
                let value = written
                    .writes
                    .iter()
                    .find(|(key, _)| *key == item.key)
                    .map(|(_, value)| value.as_str());
                assert_eq!(item.value.as_deref(), value, "{}: listed wrong", item.key);
            }
        }
        Err(ClientError::Api { status, error }) => {
            assert_eq!(
                (status, error.code.as_str()),
                (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
                "{}",
                error.message
            );
        }
        Err(err) => panic!("list: {err}"),
    }
}

/// What the server did on a damaged store.
#[derive(Debug)]
enum Started {
    /// It served, and kept this many of the writes (a prefix).
    Served {
        kept: usize,
        corrupt_reads: usize,
    },
    Refused,
}

/// Starts the binary on a damaged store. When it refuses, its message must
/// name `damaged`; when it serves, every read must be right, absent (only
/// for a suffix of the writes) or 500 `internal`, and a read that hit
/// corrupt data must be logged at `error`.
async fn start_damaged(dir: &Path, damaged: &Path, written: &Written) -> Started {
    let mut server = match Binary::try_start(dir, &[]) {
        Ok(server) => server,
        Err(log) => {
            let name = damaged.display().to_string();
            assert!(
                log.iter()
                    .any(|line| line.contains("corrupt") && line.contains(&name)),
                "refused without naming {name}: {log:#?}"
            );
            return Started::Refused;
        }
    };
    let mut reads = Vec::new();
    for (key, value) in &written.writes {
        reads.push(read(&server.client, key, value).await);
    }
    check_list(&server.client, written).await;
    let kept = reads
        .iter()
        .position(|read| *read == Read::Missing)
        .unwrap_or(reads.len());
    assert!(
        reads[kept..].iter().all(|read| *read == Read::Missing),
        "not a prefix of the writes: {reads:?}"
    );
    let corrupt_reads = reads.iter().filter(|read| **read == Read::Corrupt).count();
    assert!(server.terminate(), "unclean stop");
    if corrupt_reads > 0 {
        let log = server.log();
        assert!(
            log.iter()
                .any(|line| line.contains("ERROR") && line.contains("stored data is corrupt")),
            "corrupt reads were not logged as errors: {log:#?}"
        );
    }
    Started::Served {
        kept,
        corrupt_reads,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_journal_tail_loses_only_the_torn_write() {
    let written = Written::new(20, 20, true).await;
    let journal = written.journal();
    let end = data_end(&std::fs::read(&journal).expect("journal"));
    let (copy, damaged) = written.copy_with(&journal);
    // The last write's batch, cut short as a crash mid-write leaves it.
    cut(&damaged, end - 3);
    let started = start_damaged(copy.path(), &damaged, &written).await;
    assert!(
        matches!(
            started,
            Started::Served {
                kept: 19,
                corrupt_reads: 0
            }
        ),
        "{started:?}"
    );
    // The cut batch is gone for good: the journal takes new writes.
    let server = Binary::start(copy.path(), &[]);
    within(
        REQUEST_SECS,
        "PUT",
        server.client.put("after", "x", Condition::Any),
    )
    .await
    .expect("a write after recovery");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_journal_bytes_are_cut_off_or_refused_never_served() {
    let written = Written::new(20, 20, true).await;
    let journal = written.journal();
    let bytes = std::fs::read(&journal).expect("journal");
    let end = data_end(&bytes);
    let last_value = written.writes.last().expect("a write").1.as_bytes();
    let in_last_value = bytes[..end]
        .windows(last_value.len())
        .rposition(|window| window == last_value)
        .expect("the last value in the journal");
    let batch_ends: Vec<usize> = bytes[..end]
        .windows(BATCH_END.len())
        .enumerate()
        .filter(|(_, window)| *window == BATCH_END)
        .map(|(at, _)| at + BATCH_END.len())
        .collect();
    // An end marker is a tag, an 8-byte checksum and the 4 magic bytes.
    let cases = [
        ("the last batch's end magic", end - 1),
        ("the last batch's checksum", end - 8),
        ("the last batch's end tag", end - 13),
        ("the last batch's value", in_last_value + 6),
        ("the first batch's start tag", 0),
        ("the first batch's items", 20),
        ("the tenth batch's start tag", batch_ends[8]),
    ];
    for (what, at) in cases {
        let (copy, damaged) = written.copy_with(&journal);
        flip(&damaged, at);
        let started = start_damaged(copy.path(), &damaged, &written).await;
        eprintln!("flipped {what}: {started:?}");
        if let Started::Served { corrupt_reads, .. } = started {
            assert_eq!(
                corrupt_reads, 0,
                "{what}: the journal is read whole at open"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_table_answers_500_or_is_refused_never_a_wrong_value() {
    // About 100 KB: some 24 data blocks of 4 KiB in one table.
    let written = Written::new(400, 200, false).await;
    let tables = written.flush_to_tables();
    assert_eq!(tables.len(), 1, "{tables:?}");
    let table = &tables[0];
    let len = usize::try_from(std::fs::metadata(table).expect("table").len()).expect("len");

    // A data block: the keys in it answer 500, every other key is right.
    let (copy, damaged) = written.copy_with(table);
    flip(&damaged, 100);
    let started = start_damaged(copy.path(), &damaged, &written).await;
    eprintln!("flipped the first data block: {started:?}");
    assert!(
        matches!(started, Started::Served { kept: 400, corrupt_reads } if corrupt_reads > 0),
        "{started:?}"
    );

    // The end of the file (its table of contents and index), and a cut.
    for (what, damage) in [
        (
            "the table's trailer",
            Box::new(|file: &Path| flip(file, len - 100)) as Box<dyn Fn(&Path)>,
        ),
        (
            "the table's index",
            Box::new(|file: &Path| flip(file, len - 300)),
        ),
        (
            "the table cut short",
            Box::new(|file: &Path| cut(file, len - 100)),
        ),
    ] {
        let (copy, damaged) = written.copy_with(table);
        damage(&damaged);
        let started = start_damaged(copy.path(), &damaged, &written).await;
        eprintln!("{what}: {started:?}");
    }
}
