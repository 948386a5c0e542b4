//! A process kill cannot see a missing sync (the operating system keeps the
//! data), so these tests watch the writer and the sync thread through the
//! commit hook and prove that no write is answered before the sync that
//! covers it, that writes are committed while a sync runs, and that
//! concurrent writes share one sync.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::harness::{Gate, TestServer, eventually, within};
use kvstore::client::{ClientError, ListParams};
use kvstore::server::ServerConfig;
use kvstore::storage::embedded::{CommitEvent, Durability, EmbeddedConfig, EmbeddedStore};
use kvstore::storage::{Condition, Expiry, Store, WriteOp, WriteOutcome};
use kvstore::types::PutResponse;
use tokio::sync::mpsc;

/// A server whose commit hook reports every event on a channel, and holds
/// each sync's at the gate, with the writes that sync covers.
async fn gated_server(
    gate: Arc<Gate>,
    quiet_before_inline: Duration,
) -> (TestServer, mpsc::UnboundedReceiver<CommitEvent>) {
    let (events, received) = mpsc::unbounded_channel();
    let server = TestServer::start_with(ServerConfig::default(), move |engine| {
        engine.quiet_before_inline = quiet_before_inline;
        engine.commit_hook = Some(Arc::new(move |event: &CommitEvent| {
            let _ = events.send(*event);
            if let CommitEvent::Synced { .. } = event {
                gate.wait();
            }
        }));
    })
    .await;
    (server, received)
}

/// The next event the hook reported.
async fn next_event(events: &mut mpsc::UnboundedReceiver<CommitEvent>) -> CommitEvent {
    within(60, "a commit event", events.recv())
        .await
        .expect("a commit event")
}

/// Puts `key`, the store's first write, and waits until its sync is held at
/// the gate (its commit reported before).
async fn first_write_held_at_its_sync(
    server: &TestServer,
    events: &mut mpsc::UnboundedReceiver<CommitEvent>,
    key: &str,
) -> tokio::task::JoinHandle<Result<PutResponse, ClientError>> {
    let (client, key) = (server.client.clone(), key.to_owned());
    let put = tokio::spawn(async move { client.put(&key, "v", Condition::Any).await });
    assert_eq!(
        next_event(events).await,
        CommitEvent::Committed { last_revision: 1 }
    );
    assert_eq!(
        next_event(events).await,
        CommitEvent::Synced { revision: 1 }
    );
    put
}

/// The default: a write alone commits itself, and syncs on its own thread.
const INLINE_AFTER: Duration = Duration::from_millis(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_is_not_answered_while_its_sync_is_held() {
    let gate = Arc::new(Gate::default());
    let (server, mut events) = gated_server(Arc::clone(&gate), INLINE_AFTER).await;

    let put = first_write_held_at_its_sync(&server, &mut events, "k").await;
    // The sync is done, but the hook holds it: the answer must not have
    // gone out.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !put.is_finished(),
        "the write was answered before its sync was reported"
    );
    // Nor may any reader see it: it is in fjall's memtable, but readers
    // read as of the last sync that was reported.
    assert_eq!(server.client.get("k").await.expect("get"), None);
    let page = server
        .client
        .list(&ListParams::default())
        .await
        .expect("list");
    assert!(page.items.is_empty(), "listed before its sync: {page:?}");
    assert_eq!(page.revision, 0);

    gate.set(true);
    let answer = within(60, "the answer", put).await.unwrap().expect("put");
    assert_eq!(answer.revision, 1);
    let entry = server.client.get("k").await.expect("get").expect("k");
    assert_eq!(entry.version, 1);
    server.stop().await;
}

/// A condition that fails because of a write not yet synced is not answered
/// before that sync either: the 412 would tell of a version that a crash can
/// still take away, and a client that reads again to retry would read the
/// old one and fail again until the sync is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_condition_failed_by_an_unsynced_write_waits_for_its_sync() {
    let gate = Arc::new(Gate::default());
    // Through the committer, which hands the first write's sync to the sync
    // thread and goes on to judge the next write meanwhile.
    let (server, mut events) = gated_server(Arc::clone(&gate), Duration::from_secs(3600)).await;

    let put = first_write_held_at_its_sync(&server, &mut events, "k").await;
    let client = server.client.clone();
    let create = tokio::spawn(async move { client.put("k", "other", Condition::Absent).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !create.is_finished(),
        "a condition failed by an unsynced write was answered before its sync"
    );

    gate.set(true);
    within(60, "the answer", put).await.unwrap().expect("put");
    match within(60, "the refusal", create).await.unwrap() {
        Err(ClientError::Api { status, error }) => {
            assert_eq!(status, 412, "{error:?}");
            assert_eq!(error.code, "version_mismatch", "{error:?}");
        }
        other => panic!("expected 412, got {other:?}"),
    }
    // Once the store is quiet and synced, a failed condition is answered at
    // once, with no sync of its own.
    while events.try_recv().is_ok() {}
    let refused = server.client.put("k", "other", Condition::Absent).await;
    assert!(matches!(refused, Err(ClientError::Api { status, .. }) if status == 412));
    assert!(
        events.try_recv().is_err(),
        "a failed condition on a synced store took a commit or a sync"
    );
    server.stop().await;
}

/// Watchers get a change only once the sync that covers it is done: while
/// the hook holds the committer after the sync, the watch stays silent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_is_not_delivered_before_its_sync() {
    let gate = Arc::new(Gate::default());
    let (server, mut events) = gated_server(Arc::clone(&gate), INLINE_AFTER).await;
    let mut watch = crate::watch::watch(server.addr, "").await;

    let put = first_write_held_at_its_sync(&server, &mut events, "k").await;
    // Held at the hook: nothing may reach the watcher yet (a progress
    // message would come after 5 s at the earliest).
    let early = watch.next_within(1).await;
    assert!(
        early.is_none(),
        "delivered before its sync was reported: {early:?}"
    );

    gate.set(true);
    within(60, "the answer", put).await.unwrap().expect("put");
    let change = watch.next_change(30).await;
    assert_eq!(change.id, Some(1));
    server.stop().await;
}

/// The sync thread syncs a group while the writer commits the next ones:
/// writes that arrive during a sync are committed (not answered) meanwhile,
/// and the next sync covers them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_committed_during_a_sync_share_the_next_one() {
    let gate = Arc::new(Gate::default());
    // Every write goes to the committer thread, which hands its syncs over.
    let (server, mut events) = gated_server(Arc::clone(&gate), Duration::from_secs(3600)).await;

    // The first write's sync is held at the hook ...
    let first = first_write_held_at_its_sync(&server, &mut events, "first").await;

    // ... while ten more writes are committed behind it.
    let mut queued = Vec::new();
    for i in 0..10 {
        let client = server.client.clone();
        queued.push(tokio::spawn(async move {
            client.put(&format!("k{i}"), "v", Condition::Any).await
        }));
    }
    let mut committed = 1;
    while committed < 11 {
        match next_event(&mut events).await {
            CommitEvent::Committed { last_revision } => committed = last_revision,
            other => panic!("{other:?} while the first sync was held"),
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !first.is_finished() && queued.iter().all(|put| !put.is_finished()),
        "a write was answered while the sync was held"
    );
    gate.set(true);

    // All ten go out after one more sync.
    assert_eq!(
        next_event(&mut events).await,
        CommitEvent::Synced { revision: 11 }
    );
    within(60, "the first answer", first)
        .await
        .unwrap()
        .expect("first put");
    let mut revisions: Vec<u64> = Vec::new();
    for put in queued {
        let answer = within(60, "a queued answer", put).await.unwrap();
        revisions.push(answer.expect("put").revision);
    }
    revisions.sort_unstable();
    assert_eq!(revisions, (2..=11).collect::<Vec<_>>());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_write_was_synced_first() {
    let synced = Arc::new(AtomicU64::new(0));
    let seen = Arc::clone(&synced);
    let server = TestServer::start_with(ServerConfig::default(), move |engine| {
        engine.commit_hook = Some(Arc::new(move |event: &CommitEvent| {
            if let CommitEvent::Synced { revision } = event {
                seen.fetch_max(*revision, Ordering::SeqCst);
            }
        }));
    })
    .await;

    let mut writers = Vec::new();
    for w in 0..16 {
        let client = server.client.clone();
        let synced = Arc::clone(&synced);
        writers.push(tokio::spawn(async move {
            for i in 0..40 {
                let answer = client
                    .put(&format!("w{w}/{i}"), "v", Condition::Any)
                    .await
                    .expect("put");
                let covered = synced.load(Ordering::SeqCst);
                assert!(
                    covered >= answer.revision,
                    "revision {} answered when syncs covered only {covered}",
                    answer.revision
                );
            }
        }));
    }
    for writer in writers {
        within(120, "a writer", writer).await.unwrap();
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_mode_syncs_in_the_background() {
    let (events, mut received) = mpsc::unbounded_channel();
    let server = TestServer::start_with(ServerConfig::default(), move |engine| {
        engine.durability = Durability::Buffered;
        engine.sync_interval = Duration::from_millis(5);
        engine.commit_hook = Some(Arc::new(move |event: &CommitEvent| {
            let _ = events.send(*event);
        }));
    })
    .await;

    let answer = server
        .client
        .put("k", "v", Condition::Any)
        .await
        .expect("put");
    assert_eq!(
        within(60, "the commit event", received.recv()).await,
        Some(CommitEvent::Committed {
            last_revision: answer.revision,
        })
    );
    assert_eq!(
        within(60, "the sync event", received.recv()).await,
        Some(CommitEvent::Synced {
            revision: answer.revision
        })
    );
    server.stop().await;
}

/// Which thread ran each commit, as the commit hook saw it.
struct CommitThreads {
    store: Arc<EmbeddedStore>,
    threads: mpsc::UnboundedReceiver<Option<String>>,
    gate: Arc<Gate>,
    _dir: tempfile::TempDir,
}

const COMMITTER: Option<&str> = Some("kvstore-committer");

impl CommitThreads {
    fn open(quiet_before_inline: Duration) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let gate = Arc::new(Gate::default());
        gate.set(true);
        let (threads, seen) = mpsc::unbounded_channel();
        let mut config = EmbeddedConfig::new(dir.path());
        config.quiet_before_inline = quiet_before_inline;
        let at_hook = Arc::clone(&gate);
        config.commit_hook = Some(Arc::new(move |event: &CommitEvent| {
            if let CommitEvent::Committed { .. } = event {
                let _ = threads.send(std::thread::current().name().map(str::to_owned));
                at_hook.wait();
            }
        }));
        CommitThreads {
            store: Arc::new(EmbeddedStore::open(config).unwrap()),
            threads: seen,
            gate,
            _dir: dir,
        }
    }

    fn put(&self, key: &str) -> tokio::task::JoinHandle<u64> {
        let store = Arc::clone(&self.store);
        let ops = vec![WriteOp::Put {
            key: key.as_bytes().to_vec(),
            value: b"v".to_vec(),
            condition: Condition::Any,
            expiry: Expiry::Never,
        }];
        tokio::spawn(async move {
            match store.write(ops).await.expect("write") {
                WriteOutcome::Applied { revision, .. } => revision,
                other => panic!("unexpected outcome {other:?}"),
            }
        })
    }

    /// Writes `key`, and names the thread that committed it.
    async fn committed_by(&mut self, key: &str) -> Option<String> {
        within(60, "the write", self.put(key)).await.unwrap();
        self.next_commit().await
    }

    /// The thread of the next commit the hook sees.
    async fn next_commit(&mut self) -> Option<String> {
        within(60, "a commit at the hook", self.threads.recv())
            .await
            .unwrap()
    }

    async fn close(&self) {
        within(60, "the store's close", self.store.close())
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_alone_commits_itself_and_overlapping_writes_share_the_committer() {
    let mut commits = CommitThreads::open(Duration::from_millis(1));

    // Alone after a quiet spell: committed on the writing task's own thread.
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_ne!(commits.committed_by("a").await.as_deref(), COMMITTER);

    // Writes that arrive while another is being committed queue for the
    // committer thread, and share its next sync.
    commits.gate.set(false);
    tokio::time::sleep(Duration::from_millis(5)).await;
    let held = commits.put("b");
    assert_ne!(commits.next_commit().await.as_deref(), COMMITTER);
    let (c, d) = (commits.put("c"), commits.put("d"));
    eventually(60, "c and d queued", || commits.store.queue_depth() >= 2).await;
    commits.gate.set(true);
    assert_eq!(within(60, "b's answer", held).await.unwrap(), 2);
    assert_eq!(commits.next_commit().await.as_deref(), COMMITTER);
    let mut revisions = [
        within(60, "c's answer", c).await.unwrap(),
        within(60, "d's answer", d).await.unwrap(),
    ];
    revisions.sort_unstable();
    assert_eq!(revisions, [3, 4]);
    assert!(
        commits.threads.try_recv().is_err(),
        "c and d took two syncs"
    );

    // Quiet again: the next lone write commits itself.
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_ne!(commits.committed_by("e").await.as_deref(), COMMITTER);
    commits.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_writes_overlap_a_lone_write_goes_to_the_committer_until_quiet() {
    // A quiet spell longer than the test: once two writes have overlapped,
    // every lone write goes to the committer.
    let mut commits = CommitThreads::open(Duration::from_secs(3600));
    let (a, b) = (commits.put("a"), commits.put("b"));
    within(60, "a's answer", a).await.unwrap();
    within(60, "b's answer", b).await.unwrap();
    while commits.threads.try_recv().is_ok() {}
    for key in ["c", "d", "e"] {
        assert_eq!(commits.committed_by(key).await.as_deref(), COMMITTER);
    }
    commits.close().await;
}

#[tokio::test]
async fn on_a_single_threaded_runtime_every_write_goes_to_the_committer() {
    let mut commits = CommitThreads::open(Duration::ZERO);
    for key in ["a", "b"] {
        assert_eq!(commits.committed_by(key).await.as_deref(), COMMITTER);
    }
    commits.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_dropped_while_the_queue_is_full_leave_no_count_behind() {
    let mut commits = CommitThreads::open(Duration::from_millis(1));
    tokio::time::sleep(Duration::from_millis(5)).await;
    // One write holds the writer at the hook, whether it committed itself or
    // went to the committer. The others start only once it is there, so none
    // of them can take the writer first (and wait at the gate while the test
    // waits for it): they all queue behind it. The queue (4096 writes) fills
    // up, and the last writes wait for room in it.
    commits.gate.set(false);
    let held = commits.put("held");
    commits.next_commit().await;
    let writers: Vec<_> = (0..4200).map(|i| commits.put(&format!("k{i}"))).collect();
    eventually(60, "4200 writes waiting", || {
        commits.store.queue_depth() >= 4200
    })
    .await;
    for writer in &writers {
        writer.abort();
    }
    for writer in writers {
        let _ = within(60, "an aborted writer", writer).await;
    }
    commits.gate.set(true);
    within(60, "the held write", held).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while commits.store.queue_depth() != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} writes still counted as waiting",
            commits.store.queue_depth()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    commits.close().await;
}
