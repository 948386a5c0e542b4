//! A failing disk, under the real binary: plfs (`tests/tools/plfs`) fails
//! every fsync on command and drops the unsynced pages of the file it failed
//! to sync, as Linux may after a write-back error. A sync that is retried and
//! "succeeds" has then lost data, so the server must not retry: no write that
//! a failed sync covered is acknowledged, and writes stay refused, with a
//! message that says why, until a restart; reads go on. After the restart
//! (and a power cycle of the disk, which keeps only what was synced), every
//! acknowledged write is there.
//!
//! Needs root, /dev/fuse, libfuse2 and python3; skipped without them, except
//! under `CI=true` (see `crate::harness::plfs`).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::harness::plfs::Plfs;
use crate::harness::{Binary, within};
use hyper::{Method, StatusCode};
use kvstore::client::{Client, ClientError};
use kvstore::storage::Condition;
use kvstore::types::PutResponse;

/// Acknowledged writes: key, (value, version).
type Acked = BTreeMap<String, (String, u64)>;

/// Deadline of one request to the server (plfs is slow, the machine may be busy).
const REQUEST_SECS: u64 = 60;

async fn put(client: &Client, key: &str, value: &str) -> Result<PutResponse, ClientError> {
    within(
        REQUEST_SECS,
        &format!("PUT {key}"),
        client.put(key, value.to_owned(), Condition::Any),
    )
    .await
}

/// Writes and records an acknowledged write; returns its revision.
async fn write(client: &Client, acked: &mut Acked, key: &str, value: &str) -> u64 {
    let answer = put(client, key, value)
        .await
        .expect("a write to a sound disk");
    acked.insert(key.to_owned(), (value.to_owned(), answer.version));
    answer.revision
}

/// The answer to a write after the disk failed: 503 `unavailable`, saying that
/// a sync failed and that writes are refused until a restart.
fn assert_refused(answer: Result<PutResponse, ClientError>, what: &str) {
    match answer {
        Err(ClientError::Api { status, error }) => {
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{what}: {error:?}");
            assert_eq!(error.code, "unavailable", "{what}");
            assert!(
                error.message.contains("sync")
                    && error
                        .message
                        .contains("writes are refused until the server is restarted"),
                "{what}: the message does not say why: {}",
                error.message
            );
        }
        other => panic!("{what}: expected a refusal, got {other:?}"),
    }
}

/// Every acknowledged write is there with its value and version.
async fn assert_acked(client: &Client, acked: &Acked) {
    for (key, (value, version)) in acked {
        let entry = within(REQUEST_SECS, &format!("GET {key}"), client.get(key))
            .await
            .expect("read")
            .unwrap_or_else(|| panic!("{key}: acknowledged write lost"));
        assert_eq!(entry.value.as_deref(), Some(value.as_str()), "{key}: value");
        assert_eq!(entry.version, *version, "{key}: version");
    }
}

async fn readyz(client: &Client) -> StatusCode {
    within(
        REQUEST_SECS,
        "GET /readyz",
        client.send(Method::GET, "/readyz", &[], Vec::new()),
    )
    .await
    .expect("readyz")
    .status
}

/// Writes, fails the disk, checks that writes are refused (also once the disk
/// works again) while reads go on, then restarts on the power-cycled disk.
async fn writes_stay_refused_until_restart(durability: &str) {
    let Some(mut disk) = Plfs::mount(false) else {
        return;
    };
    let args = ["--durability", durability];
    let mut server = Binary::start(&disk.data_dir(), &args);
    let client = server.client.clone();
    let mut acked = Acked::new();
    let mut max_revision = 0;
    for i in 0..20 {
        max_revision = write(&client, &mut acked, &format!("k{i}"), &format!("v{i}")).await;
    }
    max_revision = max_revision.max(write(&client, &mut acked, "k0", "v0 again").await);
    assert_eq!(acked["k0"].1, 2);

    if durability == "buffered" {
        // Acknowledged before their sync: wait until the background sync
        // has made them durable, so that the failure cannot take them.
        within(REQUEST_SECS, "the background sync", async {
            while disk.status("dirty_bytes") > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
    }

    disk.ctl("fail-fsync on");
    if durability == "fsync" {
        // The write whose sync fails is not acknowledged.
        assert_refused(
            put(&client, "doomed", "x").await,
            "the write whose sync failed",
        );
    } else {
        // Writes are acknowledged before their sync; the background sync
        // fails within an interval, and writes are refused from then on.
        // What was acknowledged meanwhile may be lost: plfs dropped it.
        let refused = within(
            REQUEST_SECS,
            "a write refused after the failed sync",
            async {
                let mut n = 0;
                loop {
                    match put(&client, &format!("late{n}"), "x").await {
                        Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                        refused => return refused,
                    }
                    n += 1;
                }
            },
        )
        .await;
        assert_refused(refused, "a write after the failed background sync");
    }
    assert_refused(
        put(&client, "after", "x").await,
        "a write after the failure",
    );
    let failed_fsyncs = disk.status("failed_fsyncs");
    assert!(failed_fsyncs >= 1, "no fsync failed");

    // The disk works again, but the server does not retry its sync.
    disk.ctl("fail-fsync off");
    let fsyncs = disk.status("fsyncs");
    assert_refused(
        put(&client, "healed", "x").await,
        "a write once the disk works again",
    );
    assert_eq!(readyz(&client).await, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        (disk.status("fsyncs"), disk.status("failed_fsyncs")),
        (fsyncs, failed_fsyncs),
        "the server synced again after a failed sync"
    );
    // Reads go on.
    assert_acked(&client, &acked).await;
    for key in ["doomed", "after", "healed"] {
        let found = within(REQUEST_SECS, "GET", client.get(key))
            .await
            .expect("read");
        assert!(found.is_none(), "{key}: a refused write is visible");
    }

    // The final sync fails too: the exit says so.
    assert!(!server.terminate(), "exited cleanly after a failed sync");
    let log = server.log();
    assert!(
        log.iter().any(|line| line.contains("ERROR")
            && line.contains("storage write failed; refusing writes until restart")),
        "no error in the log: {log:#?}"
    );
    drop(server);

    // Power off and on: the disk keeps only what was synced.
    disk.remount();
    let server = Binary::start(&disk.data_dir(), &args);
    assert_acked(&server.client, &acked).await;
    assert_eq!(readyz(&server.client).await, StatusCode::OK);
    let answer = put(&server.client, "new", "x")
        .await
        .expect("a write after the restart");
    assert!(
        answer.revision > max_revision,
        "revision went back: {} after {max_revision}",
        answer.revision
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fsync_refuses_writes_until_restart() {
    writes_stay_refused_until_restart("fsync").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_background_sync_refuses_writes_until_restart() {
    writes_stay_refused_until_restart("buffered").await;
}
