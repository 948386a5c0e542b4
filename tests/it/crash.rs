//! Crash tests of the real binary: writers run against `kvstore serve`, the
//! server dies mid-stream, restarts on the same data directory, and every
//! acknowledged write must be there with its version. A write in flight at the
//! crash may or may not have landed, but a batch lands whole or not at all,
//! and revisions never go back.
//!
//! Two kinds of crash: SIGKILL, after which the kernel's page cache still
//! holds every write the process made; and a power cut under plfs in strict
//! mode, after which only what was fsynced is left, and a file or directory
//! only if its parent directory was fsynced after it was made.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::harness::plfs::Plfs;
use crate::harness::{Binary, eventually, metric_value, table_files, within};
use kvstore::client::{ChangesRequest, Client, Event, WatchRange};
use kvstore::storage::Condition;
use kvstore::types::{BatchOp, BatchOpKind, BatchRequest};

/// What the writers know: per key, the last acknowledged (value, version), and
/// the write in flight when the server died, if any.
#[derive(Default)]
struct Ledger {
    acked: HashMap<String, (String, u64)>,
    in_flight: HashMap<String, String>,
    /// Batches: (keys, value, acknowledged).
    batches: Vec<(Vec<String>, String, bool)>,
    max_revision: u64,
}

async fn single_writer(client: Client, ledger: Arc<Mutex<Ledger>>, writer: usize, cycle: u64) {
    for n in 0.. {
        let key = format!("w{writer}/k{}", n % 25);
        let value = format!("c{cycle}-w{writer}-n{n}");
        ledger
            .lock()
            .unwrap()
            .in_flight
            .insert(key.clone(), value.clone());
        let Ok(answer) = client.put(&key, value.clone(), Condition::Any).await else {
            return;
        };
        let mut ledger = ledger.lock().unwrap();
        ledger.in_flight.remove(&key);
        ledger.max_revision = ledger.max_revision.max(answer.revision);
        ledger.acked.insert(key, (value, answer.version));
    }
}

async fn batch_writer(client: Client, ledger: Arc<Mutex<Ledger>>, cycle: u64) {
    for n in 0.. {
        let value = format!("c{cycle}-b{n}");
        let keys: Vec<String> = (0..10).map(|i| format!("b/c{cycle}/n{n}/{i}")).collect();
        let index = {
            let mut ledger = ledger.lock().unwrap();
            ledger.batches.push((keys.clone(), value.clone(), false));
            ledger.batches.len() - 1
        };
        let request = BatchRequest {
            ops: keys
                .iter()
                .map(|key| BatchOp {
                    value: Some(value.clone()),
                    if_absent: Some(true),
                    ..BatchOp::new(BatchOpKind::Put, key.clone())
                })
                .collect(),
        };
        let Ok(answer) = client.batch(&request).await else {
            return;
        };
        let mut ledger = ledger.lock().unwrap();
        ledger.batches[index].2 = true;
        ledger.max_revision = ledger.max_revision.max(answer.revision);
    }
}

async fn verify(client: &Client, ledger: &mut Ledger) {
    for (key, (value, version)) in &mut ledger.acked {
        let entry = client
            .get(key)
            .await
            .expect("get")
            .expect("acknowledged key is missing");
        let got = entry.value.expect("text value");
        match ledger.in_flight.get(key) {
            Some(pending) if *pending == got => {
                assert_eq!(
                    entry.version,
                    *version + 1,
                    "{key}: in-flight write with a wrong version"
                );
                *value = got;
                *version = entry.version;
            }
            _ => {
                assert_eq!(&got, value, "{key}: acknowledged value lost");
                assert_eq!(entry.version, *version, "{key}: wrong version");
            }
        }
    }
    ledger.in_flight.clear();
    for (keys, value, acked) in &mut ledger.batches {
        let found = client.batch_get(keys.clone()).await.expect("batch get");
        if *acked {
            assert!(
                found.missing.is_empty(),
                "acknowledged batch lost keys {:?}",
                found.missing
            );
        } else {
            // A batch in flight at the kill: all or nothing.
            assert!(
                found.missing.is_empty() || found.items.is_empty(),
                "a batch landed in part: {} of {} keys",
                found.items.len(),
                keys.len()
            );
            *acked = found.missing.is_empty();
        }
        assert!(
            found
                .items
                .iter()
                .all(|e| e.value.as_deref() == Some(value.as_str()))
        );
    }
    ledger.batches.retain(|(_, _, acked)| *acked);
}

/// Takes the ledger out, checks it against the restarted server, and puts the
/// updated ledger back; then checks that a new write gets a newer revision.
async fn verify_after_restart(client: &Client, shared: &Mutex<Ledger>) {
    let mut ledger = std::mem::take(&mut *shared.lock().unwrap());
    verify(client, &mut ledger).await;
    let answer = client
        .put("probe", "p", Condition::Any)
        .await
        .expect("probe put");
    assert!(
        answer.revision > ledger.max_revision,
        "revision went back after a crash: {} after {}",
        answer.revision,
        ledger.max_revision
    );
    ledger.max_revision = answer.revision;
    verify_history(client, &ledger, answer.revision).await;
    *shared.lock().unwrap() = ledger;
}

/// The change history survived with the data: from revision 1 to `through`,
/// in order, each key's last event is its entry now.
async fn verify_history(client: &Client, ledger: &Ledger, through: u64) {
    let mut last: HashMap<String, u64> = HashMap::new();
    let mut after = 0;
    while after < through {
        let page = client
            .changes(&ChangesRequest {
                range: WatchRange::All,
                after: Some(after),
                limit: Some(1000),
                wait: Some(Duration::from_secs(5)),
            })
            .await
            .expect("changes");
        for change in &page.changes {
            assert!(
                change.revision > after,
                "history out of order at {}",
                change.revision
            );
            after = change.revision;
            for event in &change.events {
                match event {
                    Event::Put { key, version, .. } => last.insert(key.clone(), *version),
                    Event::Delete { key, .. } => last.remove(key),
                };
            }
        }
        after = after.max(page.revision);
    }
    for (key, (_, version)) in &ledger.acked {
        assert_eq!(
            last.get(key),
            Some(version),
            "{key}: the history ends elsewhere"
        );
    }
}

/// How each cycle of [`crash_cycles`] ends.
enum Crash<'a> {
    /// SIGKILL of the server.
    Kill,
    /// A power cut of the file system under the data directory, then SIGKILL
    /// of the server, then the file system mounted again.
    PowerCut(&'a mut Plfs),
}

/// Cuts the power (when given the file system), kills the server with
/// SIGKILL, and waits for its writers to see it gone.
async fn crash_under(
    server: &mut Binary,
    writers: Vec<tokio::task::JoinHandle<()>>,
    cut: Option<&Plfs>,
) {
    if let Some(fs) = cut {
        fs.cut();
    }
    server.child.kill().expect("SIGKILL");
    server.wait();
    for writer in writers {
        within(60, "a writer to see the server gone", writer)
            .await
            .unwrap();
    }
}

async fn crash_cycles(data_dir: &Path, durability: &str, cycles: u64, mut crash: Crash<'_>) {
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut cursor_secret = None;
    for cycle in 0..cycles {
        let mut server = start(data_dir, durability);
        if cycle > 0 {
            verify_after_restart(&server.client, &ledger).await;
        }
        // The secret was made at the first start: a crash must not replace
        // it, or every cursor handed out before would be refused.
        let secret = std::fs::read(data_dir.join("cursor-secret")).expect("cursor secret");
        assert_eq!(
            cursor_secret.get_or_insert_with(|| secret.clone()),
            &secret,
            "the cursor secret changed across a crash"
        );
        let acked_before = ledger.lock().unwrap().acked.len();
        let mut writers = Vec::new();
        for w in 0..6 {
            let ledger = Arc::clone(&ledger);
            writers.push(tokio::spawn(single_writer(
                server.client.clone(),
                ledger,
                w,
                cycle,
            )));
        }
        writers.push(tokio::spawn(batch_writer(
            server.client.clone(),
            Arc::clone(&ledger),
            cycle,
        )));
        // Vary the moment of the crash from cycle to cycle. plfs is slow, so
        // a power cut waits longer for writes to pile up; the first cut comes
        // soon after the first start, when the engine's files are newest.
        let delay = match crash {
            Crash::Kill => 250 + 120 * cycle,
            Crash::PowerCut(_) => 1000 + (cycle * 700) % 2000,
        };
        tokio::time::sleep(Duration::from_millis(delay)).await;
        let cut = match &crash {
            Crash::PowerCut(fs) => Some(&**fs),
            Crash::Kill => None,
        };
        crash_under(&mut server, writers, cut).await;
        if let Crash::PowerCut(fs) = &mut crash {
            drop(server);
            fs.remount();
        }
        let ledger = ledger.lock().unwrap();
        assert!(
            ledger.acked.len() + ledger.batches.len() > acked_before,
            "nothing was written in cycle {cycle}"
        );
    }
    let server = start(data_dir, durability);
    verify_after_restart(&server.client, &ledger).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_sigkill() {
    let dir = tempfile::tempdir().expect("temp dir");
    crash_cycles(dir.path(), "fsync", 4, Crash::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_mode_loses_nothing_acknowledged_on_a_process_crash() {
    let dir = tempfile::tempdir().expect("temp dir");
    crash_cycles(dir.path(), "buffered", 3, Crash::Kill).await;
}

/// Power cuts in strict mode, from the very first start: the server makes its
/// data directory inside the mount itself, so every directory and file it or
/// its engine creates must be made durable before a write depending on it is
/// acknowledged. `KVSTORE_POWER_CUT_CYCLES` sets the number of cycles (3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_power_cuts() {
    let Some(mut fs) = Plfs::mount(true) else {
        return;
    };
    let cycles = std::env::var("KVSTORE_POWER_CUT_CYCLES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(3);
    let data_dir = fs.data_dir().join("store");
    crash_cycles(&data_dir, "fsync", cycles, Crash::PowerCut(&mut fs)).await;
}

/// Puts `count` keys `{prefix}/kN` of `bytes` bytes each, one at a time,
/// into the ledger as they are acknowledged.
async fn put_values(
    client: &Client,
    ledger: &Mutex<Ledger>,
    prefix: &str,
    count: usize,
    bytes: usize,
) {
    for n in 0..count {
        let key = format!("{prefix}/k{n}");
        let value = format!("{key}-").repeat(bytes / (key.len() + 1) + 1);
        let answer = client
            .put(&key, value.clone(), Condition::Any)
            .await
            .expect("put");
        let mut ledger = ledger.lock().unwrap();
        ledger.max_revision = ledger.max_revision.max(answer.revision);
        ledger.acked.insert(key, (value, answer.version));
    }
}

/// Once writes go quiet, the server flushes its memtables to tables (fjall
/// writes a table file and a new version file, and may then drop journal
/// data): a power cut after such a flush, in strict mode, loses nothing
/// acknowledged before or after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_a_power_cut_after_a_quiet_flush() {
    let Some(mut fs) = Plfs::mount(true) else {
        return;
    };
    let data_dir = fs.data_dir().join("store");
    let ledger = Mutex::new(Ledger::default());
    let mut server = Binary::start(&data_dir, &["--flush-when-quiet-ms", "200"]);
    let tables = table_files(&data_dir).len();
    // 1.3 MB: past the 1 MiB below which a memtable is left in memory.
    put_values(&server.client, &ledger, "before", 160, 8 << 10).await;
    eventually(120, "a quiet spell's flush to write a table", || {
        table_files(&data_dir).len() > tables
    })
    .await;
    // Counted as it is handed to fjall's worker, which may write the table
    // before the count is seen.
    within(30, "the quiet flush's count", async {
        loop {
            let metrics = server
                .client
                .send(hyper::Method::GET, "/metrics", &[], bytes::Bytes::new())
                .await
                .expect("metrics");
            let metrics = String::from_utf8_lossy(&metrics.body);
            if metric_value(&metrics, "kvstore_quiet_flushes_total").is_some_and(|n| n >= 1.0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    put_values(&server.client, &ledger, "after", 20, 8 << 10).await;
    fs.cut();
    server.child.kill().expect("SIGKILL");
    server.wait();
    drop(server);
    fs.remount();
    let server = start(&data_dir, "fsync");
    verify_after_restart(&server.client, &ledger).await;
}

/// The numbers of fjall's journals (`<n>.jnl`) in `data_dir`.
fn journals(data_dir: &Path) -> Vec<u64> {
    std::fs::read_dir(data_dir)
        .expect("the data directory")
        .filter_map(|entry| {
            let name = entry.expect("an entry").file_name();
            name.to_str()?.strip_suffix(".jnl")?.parse().ok()
        })
        .collect()
}

/// Four writers at once, 25 writes of 1 KiB each, so that their writes meet
/// at the committer and the sync thread syncs them (and opens the journal).
async fn writers_at_once(client: &Client, ledger: &Arc<Mutex<Ledger>>, prefix: &str) {
    let mut writers = Vec::new();
    for w in 0..4 {
        let (client, ledger) = (client.clone(), Arc::clone(ledger));
        let prefix = format!("{prefix}{w}");
        writers.push(tokio::spawn(async move {
            put_values(&client, &ledger, &prefix, 25, 1 << 10).await;
        }));
    }
    for writer in writers {
        within(600, "a writer", writer).await.unwrap();
    }
}

/// fjall moves on to a new journal once the current one passes 64 MB, and
/// the sync thread syncs the journal through a handle of its own: it must
/// follow. A power cut after writes to the new journal loses nothing
/// acknowledged, before the move or after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_a_power_cut_after_the_journal_moves_on() {
    let Some(mut fs) = Plfs::mount(true) else {
        return;
    };
    let data_dir = fs.data_dir().join("store");
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut server = start(&data_dir, "fsync");
    let first = journals(&data_dir).into_iter().max();
    // The sync thread opens the first journal ...
    writers_at_once(&server.client, &ledger, "before").await;
    // ... which large writes, one at a time, fill until fjall moves on.
    within(600, "a new journal", async {
        // Values that fjall's journal compression cannot shrink: random hex.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut round = 0;
        while journals(&data_dir).into_iter().max() == first {
            assert!(
                round < 400,
                "no new journal after {round} values of 512 KiB"
            );
            let value: String = (0..(512 << 10) / 16)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    format!("{state:016x}")
                })
                .collect();
            let key = format!("big/{round}");
            let answer = within(
                60,
                "a large put",
                server.client.put(&key, value.clone(), Condition::Any),
            )
            .await
            .expect("put");
            let mut ledger = ledger.lock().unwrap();
            ledger.max_revision = ledger.max_revision.max(answer.revision);
            ledger.acked.insert(key, (value, answer.version));
            round += 1;
        }
    })
    .await;
    // Writers at once, cut off mid-stream: the sync thread syncs their
    // writes, in the new journal, until the cut.
    let writers: Vec<_> = (0..4)
        .map(|w| {
            tokio::spawn(single_writer(
                server.client.clone(),
                Arc::clone(&ledger),
                w,
                1,
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    crash_under(&mut server, writers, Some(&fs)).await;
    drop(server);
    fs.remount();
    let server = start(&data_dir, "fsync");
    verify_after_restart(&server.client, &ledger).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_cleanly() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut server = start(dir.path(), "fsync");
    let mut writers = Vec::new();
    for w in 0..4 {
        writers.push(tokio::spawn(single_writer(
            server.client.clone(),
            Arc::clone(&ledger),
            w,
            0,
        )));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    crate::harness::send_signal(server.child.id(), libc::SIGTERM).expect("SIGTERM");
    let status = server.wait();
    assert!(
        status.success(),
        "kvstore exited with {status} after SIGTERM"
    );
    for writer in writers {
        within(60, "a writer to see the server gone", writer)
            .await
            .unwrap();
    }
    let server = start(dir.path(), "fsync");
    verify_after_restart(&server.client, &ledger).await;
}

fn start(data_dir: &Path, durability: &str) -> Binary {
    Binary::start(data_dir, &["--durability", durability])
}
