//! A full disk, on a small tmpfs of the test's own: the free-space guard
//! refuses writes (507) before the engine runs out of space, and an engine
//! that runs out all the same (guard off) answers 507 and is reopened in the
//! process once space is back. Both check, after a restart, every write that
//! was acknowledged.
//!
//! Mounting needs root (or CAP_SYS_ADMIN). Without it the tests print why and
//! pass, except under `CI=true`, where a missing prerequisite fails them.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::future::Future;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::harness::Binary;
use hyper::{Method, StatusCode};
use kvstore::client::{Client, ClientError, RawResponse};
use kvstore::storage::Condition;
use kvstore::types::ErrorCode;
use tempfile::TempDir;

/// The file system's size: a journal (fjall preallocates 64 MiB, sparse)
/// never fills it, so the data stays in the journal and the disk fills
/// with the writes themselves.
const FS_BYTES: u64 = 64 << 20;
/// A file on the same file system that the test deletes to free space.
const BALLAST_BYTES: usize = 12 << 20;
const VALUE_BYTES: usize = 100_000;
/// Bound of every request and of every wait for the server.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
const RESUME_DEADLINE: Duration = Duration::from_secs(20);

/// A tmpfs mounted on a temporary directory, unmounted when dropped (also
/// when the test fails).
struct Tmpfs {
    dir: TempDir,
}

impl Tmpfs {
    /// `None` (after printing why) when this process cannot mount; under
    /// `CI=true` that fails the test instead.
    #[allow(unsafe_code)] // std has no mount(2)
    fn mount(bytes: u64) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().expect("temp dir");
        let target = CString::new(dir.path().as_os_str().as_bytes()).expect("path");
        let options = CString::new(format!("size={bytes},mode=0700")).expect("options");
        // SAFETY: every pointer is a NUL-terminated string that outlives the call.
        let mounted = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                options.as_ptr().cast(),
            )
        };
        if mounted != 0 {
            let why = format!(
                "cannot mount a tmpfs ({}); run as root (or with CAP_SYS_ADMIN) to test a full disk",
                std::io::Error::last_os_error()
            );
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{why} (CI=true: a missing prerequisite fails the test)"
            );
            eprintln!("skipped: {why}");
            return None;
        }
        Some(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    #[allow(unsafe_code)] // std has no umount2(2)
    fn drop(&mut self) {
        let target = CString::new(self.dir.path().as_os_str().as_bytes()).expect("path");
        // SAFETY: a NUL-terminated path. MNT_DETACH unmounts even while the
        // server of a failed test still has files open there.
        if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
            eprintln!(
                "could not unmount {}: {}",
                self.dir.path().display(),
                std::io::Error::last_os_error()
            );
        }
    }
}

/// The value written under key number `i`: 100 KB of pseudo-random bytes
/// seeded by `i` (the journal compresses values, and these must fill the
/// disk as they are).
fn value(i: usize) -> Vec<u8> {
    // splitmix64
    let mut state = i as u64;
    let mut next = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    (0..VALUE_BYTES / 8)
        .flat_map(|_| next().to_le_bytes())
        .collect()
}

fn key(i: usize) -> String {
    format!("fill/{i:06}")
}

/// Bounds a request, so that no test can hang on a server that stopped answering.
async fn bounded<T>(request: impl Future<Output = T>) -> T {
    tokio::time::timeout(REQUEST_TIMEOUT, request)
        .await
        .expect("the server did not answer within the request timeout")
}

/// The status of a PUT of key number `i`, and the error code of a refusal.
async fn put(client: &Client, i: usize) -> (StatusCode, Option<ErrorCode>) {
    match bounded(client.put(&key(i), value(i), Condition::Any)).await {
        Ok(_) => (StatusCode::OK, None),
        Err(ClientError::Api { status, error }) => (status, Some(error.code)),
        Err(other) => panic!("PUT {}: {other}", key(i)),
    }
}

async fn get(client: &Client, path: &str) -> RawResponse {
    bounded(client.send(Method::GET, path, &[], Vec::new()))
        .await
        .expect("GET")
}

fn write_ballast(path: &Path) {
    std::fs::write(path, vec![0xa5u8; BALLAST_BYTES]).expect("write the ballast");
}

/// What a run did, printed so that the numbers can be quoted.
#[derive(Debug, Default)]
struct Tally {
    acknowledged: usize,
    refused: usize,
    resumed: usize,
    lost: usize,
}

/// Writes keys from `next` on until a write is refused, which must be a 507
/// (from the guard, or from ENOSPC in the engine: not a 503 or a 500), after
/// at least 100 acknowledged writes. Every acknowledged key goes into
/// `written`, the refused one into `refused`; gives the tally so far.
async fn fill(
    client: &Client,
    next: &mut usize,
    written: &mut BTreeMap<usize, Vec<u8>>,
    refused: &mut Vec<usize>,
) -> Tally {
    // The disk holds fewer than FS_BYTES / VALUE_BYTES values: a server that
    // never refuses fails here instead of looping.
    let most = usize::try_from(FS_BYTES).expect("size") / VALUE_BYTES + 100;
    for _ in 0..most {
        let i = *next;
        *next += 1;
        match put(client, i).await {
            (StatusCode::OK, _) => {
                written.insert(i, value(i));
            }
            refusal => {
                assert_eq!(
                    refusal,
                    (
                        StatusCode::INSUFFICIENT_STORAGE,
                        Some(ErrorCode::InsufficientStorage)
                    ),
                    "a full disk is a 507, not a 503 or a 500"
                );
                refused.push(i);
                let tally = Tally {
                    acknowledged: written.len(),
                    ..Tally::default()
                };
                assert!(
                    tally.acknowledged >= 100,
                    "only {} writes before the disk was full",
                    tally.acknowledged
                );
                return tally;
            }
        }
    }
    panic!("{most} writes of {VALUE_BYTES} bytes on a {FS_BYTES}-byte disk were all acknowledged")
}

/// Once space is freed: waits for writes to be acknowledged again, then
/// writes 20 more, every one of which must be; counts them in `tally`.
/// Gives how long writes took to resume.
async fn resume(
    client: &Client,
    next: &mut usize,
    written: &mut BTreeMap<usize, Vec<u8>>,
    refused: &mut Vec<usize>,
    tally: &mut Tally,
) -> Duration {
    let took = wait_for_writes(client, next, written, refused).await;
    let resumed_from = written.len();
    for _ in 0..20 {
        let i = *next;
        *next += 1;
        assert_eq!(put(client, i).await, (StatusCode::OK, None));
        written.insert(i, value(i));
    }
    tally.resumed = written.len() - resumed_from + 1;
    tally.refused = refused.len();
    took
}

/// Writes a new key every 50 ms until one is acknowledged; gives how long
/// that took. Every refusal must be a 507.
async fn wait_for_writes(
    client: &Client,
    next: &mut usize,
    written: &mut BTreeMap<usize, Vec<u8>>,
    refused: &mut Vec<usize>,
) -> Duration {
    let start = Instant::now();
    while start.elapsed() < RESUME_DEADLINE {
        let i = *next;
        *next += 1;
        match put(client, i).await {
            (StatusCode::OK, _) => {
                written.insert(i, value(i));
                return start.elapsed();
            }
            (status, code) => {
                assert_eq!(
                    (status, code),
                    (
                        StatusCode::INSUFFICIENT_STORAGE,
                        Some(ErrorCode::InsufficientStorage)
                    ),
                    "a write while space was coming back"
                );
                refused.push(i);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("writes did not resume within {RESUME_DEADLINE:?} after space was freed")
}

/// Reads every key the run wrote from a restarted server: counts the
/// acknowledged writes that are missing or wrong, and checks that refused
/// writes left nothing behind.
async fn lost_after_restart(
    data: &Path,
    args: &[&str],
    written: &BTreeMap<usize, Vec<u8>>,
    refused: &[usize],
) -> usize {
    let server = Binary::start(data, args);
    let mut lost = 0;
    for (i, expected) in written {
        match bounded(server.client.get_raw(&key(*i))).await {
            Ok(Some(raw)) if raw.value.as_ref() == expected.as_slice() => {}
            other => {
                lost += 1;
                eprintln!("{}: acknowledged, read back as {other:?}", key(*i));
            }
        }
    }
    for i in refused {
        let found = bounded(server.client.get_raw(&key(*i))).await.expect("GET");
        assert!(
            found.is_none(),
            "{} was refused, yet it is there after a restart",
            key(*i)
        );
    }
    lost
}

async fn read_back_sample(client: &Client, written: &BTreeMap<usize, Vec<u8>>) {
    for (i, expected) in written.iter().step_by(25) {
        let raw = bounded(client.get_raw(&key(*i)))
            .await
            .expect("a read on a full disk")
            .expect("an acknowledged key");
        assert_eq!(raw.value.as_ref(), expected.as_slice(), "{}", key(*i));
    }
}

/// While writes are refused for lack of space: acknowledged keys still read
/// back, and `/readyz` and `/metrics` say writes are refused. Gives the
/// metrics text.
async fn assert_reads_served_and_writes_refused(
    client: &Client,
    written: &BTreeMap<usize, Vec<u8>>,
) -> String {
    read_back_sample(client, written).await;
    let ready = get(client, "/readyz").await;
    assert_eq!(ready.status, StatusCode::OK, "reads are still served");
    let ready: serde_json::Value = ready.json().expect("JSON");
    assert_eq!(ready["writes"], "refused", "{ready}");
    let metrics = String::from_utf8(get(client, "/metrics").await.body.to_vec()).expect("UTF-8");
    assert!(metrics.contains("kvstore_storage_space_low 1"), "{metrics}");
    metrics
}

/// Shows what the server logged about the disk, for whoever reads the test's output.
fn print_space_lines(server: &Binary) {
    for line in server.lines_so_far() {
        if ["disk", "space", "reopen"].iter().any(|w| line.contains(w)) {
            eprintln!("  server: {line}");
        }
    }
}

fn data_dir(fs: &Tmpfs) -> PathBuf {
    fs.path().join("data")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guard_refuses_writes_before_the_disk_fills_and_lets_them_resume() {
    let Some(fs) = Tmpfs::mount(FS_BYTES) else {
        return;
    };
    let ballast = fs.path().join("ballast");
    write_ballast(&ballast);
    let data = data_dir(&fs);
    let min_free = (16u64 << 20).to_string();
    // No slow-request lines: a busy machine makes some refusals slow, and
    // this test checks that refusals are not logged as errors one by one.
    let args = ["--min-free-bytes", min_free.as_str(), "--slow-ms", "600000"];
    let server = Binary::start(&data, &args);
    let client = &server.client;
    let (mut next, mut written, mut refused) = (0, BTreeMap::new(), Vec::new());

    let mut tally = fill(client, &mut next, &mut written, &mut refused).await;
    // Refused again, with a message that says where to free space.
    for _ in 0..5 {
        let i = next;
        next += 1;
        let refusal = bounded(client.put(&key(i), value(i), Condition::Any))
            .await
            .expect_err("a write on a nearly full disk");
        let ClientError::Api { status, error } = refusal else {
            panic!("{refusal}")
        };
        assert_eq!(status, StatusCode::INSUFFICIENT_STORAGE);
        assert!(
            error.message.contains(&data.display().to_string()),
            "{}",
            error.message
        );
        refused.push(i);
    }
    tally.refused = refused.len();

    let metrics = assert_reads_served_and_writes_refused(client, &written).await;
    assert!(metrics.contains("kvstore_storage_free_bytes "), "{metrics}");
    assert!(
        metrics.contains(&format!("kvstore_storage_min_free_bytes {min_free}")),
        "{metrics}"
    );
    let warned = server.lines_so_far().into_iter().find(|line| {
        line.contains("WARN")
            && line.contains("disk nearly full")
            && line.contains(&data.display().to_string())
            && line.contains("free_bytes=")
    });
    assert!(warned.is_some(), "{:#?}", server.lines_so_far());
    // One WARN when the guard trips, not one per refused write.
    let warnings = server
        .lines_so_far()
        .iter()
        .filter(|line| line.contains("disk nearly full"))
        .count();
    assert_eq!(warnings, 1);
    assert!(
        !server
            .lines_so_far()
            .iter()
            .any(|line| line.contains("status=507")),
        "a refused write is not logged"
    );

    std::fs::remove_file(&ballast).expect("delete the ballast");
    let took = resume(client, &mut next, &mut written, &mut refused, &mut tally).await;
    let ready: serde_json::Value = get(client, "/readyz").await.json().expect("JSON");
    assert_eq!(ready, serde_json::json!({"status": "ready"}));
    assert!(
        server
            .lines_so_far()
            .iter()
            .any(|line| line.contains("INFO") && line.contains("accepting writes again")),
        "{:#?}",
        server.lines_so_far()
    );

    print_space_lines(&server);
    let mut server = server;
    assert!(server.terminate(), "a clean shutdown");
    tally.lost = lost_after_restart(&data, &args, &written, &refused).await;
    eprintln!("guard: {tally:?}; writes resumed {took:?} after the ballast was deleted");
    assert_eq!(tally.lost, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_out_of_space_answers_507_and_is_reopened_once_space_is_back() {
    engine_out_of_space("fsync").await;
}

/// Buffered mode: the background sync meets the poisoned engine too, and
/// the writes acknowledged before it are synced when the engine is reopened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buffered_engine_out_of_space_is_reopened_too() {
    engine_out_of_space("buffered").await;
}

async fn engine_out_of_space(durability: &str) {
    let Some(fs) = Tmpfs::mount(FS_BYTES) else {
        return;
    };
    let ballast = fs.path().join("ballast");
    write_ballast(&ballast);
    let data = data_dir(&fs);
    // The guard off: the engine itself runs into ENOSPC.
    let args = ["--min-free-bytes", "0", "--durability", durability];
    let server = Binary::start(&data, &args);
    let client = &server.client;
    let (mut next, mut written, mut refused) = (0, BTreeMap::new(), Vec::new());

    let mut tally = fill(client, &mut next, &mut written, &mut refused).await;
    for _ in 0..5 {
        let i = next;
        next += 1;
        assert_eq!(
            put(client, i).await,
            (
                StatusCode::INSUFFICIENT_STORAGE,
                Some(ErrorCode::InsufficientStorage)
            )
        );
        refused.push(i);
    }
    tally.refused = refused.len();
    assert_reads_served_and_writes_refused(client, &written).await;

    // Reads go on while the engine is reopened: each is the acknowledged
    // value, or a 503 for the moment the engine is closed.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = tokio::spawn({
        let (client, stop) = (client.clone(), std::sync::Arc::clone(&stop));
        async move {
            let (mut served, mut unavailable) = (0, 0);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match bounded(client.get_raw(&key(0))).await {
                    Ok(Some(raw)) if raw.value.as_ref() == value(0).as_slice() => served += 1,
                    Err(ClientError::Api { status, .. })
                        if status == StatusCode::SERVICE_UNAVAILABLE =>
                    {
                        unavailable += 1;
                    }
                    other => panic!("a read during the reopen: {other:?}"),
                }
            }
            (served, unavailable)
        }
    });

    std::fs::remove_file(&ballast).expect("delete the ballast");
    let took = resume(client, &mut next, &mut written, &mut refused, &mut tally).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (served, unavailable) = bounded(reader).await.expect("the reader");
    eprintln!("reads during the reopen: {served} served, {unavailable} answered 503");
    assert!(served > 0);
    read_back_sample(client, &written).await;
    assert!(
        server
            .lines_so_far()
            .iter()
            .any(|line| line.contains("engine reopened")),
        "{:#?}",
        server.lines_so_far()
    );

    print_space_lines(&server);
    let mut server = server;
    assert!(server.terminate(), "a clean shutdown");
    tally.lost = lost_after_restart(&data, &args, &written, &refused).await;
    eprintln!(
        "engine out of space ({durability}): {tally:?}; writes resumed {took:?} after the ballast was deleted"
    );
    assert_eq!(tally.lost, 0);
}
