//! The watch of the typed client and of `kvstore watch`, against the
//! embedded engine: events in revision order, resuming across restarts of
//! the real binary with no revision missing or repeated, `compacted` as the
//! error that ends a watch, and the CLI's output and exit codes.

use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kvstore::client::{
    Change, ChangesRequest, Client, ClientError, Event, Value, WatchMessage, WatchRange,
    WatchRequest, WatchStream,
};
use kvstore::storage::Condition;
use kvstore::types::{BatchOp, BatchOpKind, BatchRequest};

use crate::harness::{Binary, TestServer, eventually, send_signal, wait_child, within};

/// The changes of `stream` up to `last` (progress messages skipped).
async fn changes_until(stream: &mut WatchStream, last: u64) -> Vec<Change> {
    within(60, &format!("the watch to reach revision {last}"), async {
        let mut changes: Vec<Change> = Vec::new();
        while changes.last().is_none_or(|change| change.revision < last) {
            match stream.next().await {
                Some(Ok(WatchMessage::Change(change))) => changes.push(change),
                Some(Ok(WatchMessage::Progress { .. })) => {}
                Some(Err(err)) => panic!("the watch failed: {err}"),
                None => panic!("the watch ended"),
            }
        }
        changes
    })
    .await
}

fn revisions(changes: &[Change]) -> Vec<u64> {
    changes.iter().map(|change| change.revision).collect()
}

/// Each change's events as (key, what), ordered by key.
fn summary(change: &Change) -> Vec<(String, String)> {
    let mut events: Vec<(String, String)> = change
        .events
        .iter()
        .map(|event| {
            let what = match event {
                Event::Put { value, version, .. } => format!("put v{version} {value:?}"),
                Event::Delete {
                    version, reason, ..
                } => format!("delete v{version} {reason}"),
            };
            (event.key().to_owned(), what)
        })
        .collect();
    events.sort();
    events
}

fn watch_from(client: &Client, range: WatchRange, from: u64) -> WatchStream {
    client.watch(WatchRequest {
        range,
        from_revision: Some(from),
    })
}

fn op(kind: BatchOpKind, key: &str, value: Option<&str>) -> BatchOp {
    BatchOp {
        value: value.map(str::to_owned),
        ..BatchOp::new(kind, key)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_yields_puts_deletes_and_batches_in_revision_order() {
    let server = TestServer::start().await;
    let client = &server.client;
    client.put("users/1", "a", Condition::Any).await.unwrap();
    client
        .put("users/bin", Bytes::from_static(b"\xff\x00"), Condition::Any)
        .await
        .unwrap();
    client.put("other", "o", Condition::Any).await.unwrap();
    client.delete("users/1", None).await.unwrap();
    let batch = client
        .batch(&BatchRequest {
            ops: vec![
                op(BatchOpKind::Put, "users/2", Some("b")),
                op(BatchOpKind::Delete, "users/bin", None),
                op(BatchOpKind::Put, "other2", Some("p")),
            ],
        })
        .await
        .unwrap();
    assert_eq!(batch.revision, 5);

    let all = changes_until(&mut watch_from(client, WatchRange::All, 1), 5).await;
    assert_eq!(revisions(&all), [1, 2, 3, 4, 5]);
    let put = |version: u64, value: Value| format!("put v{version} {value:?}");
    let text = |text: &str| Value::Text(text.into());
    assert_eq!(summary(&all[0]), [("users/1".into(), put(1, text("a")))]);
    assert_eq!(
        summary(&all[1]),
        [(
            "users/bin".into(),
            put(1, Value::Bytes(Bytes::from_static(b"\xff\x00")))
        )]
    );
    assert_eq!(
        summary(&all[3]),
        [("users/1".into(), "delete v1 deleted".into())]
    );
    assert_eq!(
        summary(&all[4]),
        [
            ("other2".into(), put(1, text("p"))),
            ("users/2".into(), put(1, text("b"))),
            ("users/bin".into(), "delete v1 deleted".into()),
        ]
    );

    let users = WatchRange::Prefix("users/".into());
    let prefixed = changes_until(&mut watch_from(client, users, 1), 5).await;
    assert_eq!(revisions(&prefixed), [1, 2, 4, 5]);
    assert_eq!(prefixed[3].events.len(), 2, "{:?}", prefixed[3]);
    let one = WatchRange::Key("users/1".into());
    assert_eq!(
        revisions(&changes_until(&mut watch_from(client, one, 1), 4).await),
        [1, 4]
    );
    let span = WatchRange::Span {
        start: Some("users/2".into()),
        end: Some("users/c".into()),
    };
    let spanned = changes_until(&mut watch_from(client, span, 2), 5).await;
    assert_eq!(revisions(&spanned), [2, 5]);
    assert_eq!(spanned[1].events.len(), 2, "{:?}", spanned[1]);

    // The same events as pages.
    let page = |after, limit| ChangesRequest {
        range: WatchRange::All,
        after: Some(after),
        limit: Some(limit),
        wait: None,
    };
    let first = client.changes(&page(0, 2)).await.unwrap();
    assert_eq!((revisions(&first.changes), first.revision), (vec![1, 2], 2));
    let rest = client.changes(&page(first.revision, 100)).await.unwrap();
    assert_eq!(rest.changes, all[2..]);
    let waited = client
        .changes(&ChangesRequest {
            wait: Some(Duration::from_millis(50)),
            ..page(5, 10)
        })
        .await
        .unwrap();
    assert_eq!((waited.changes.len(), waited.revision), (0, 5));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_without_a_start_begins_after_the_current_revision() {
    let server = TestServer::start().await;
    let client = server.client.clone();
    client.put("before", "b", Condition::Any).await.unwrap();
    let mut stream = client.watch(WatchRequest::default());
    let first = tokio::spawn(async move { stream.next().await });
    let mut last = 0;
    // The watch starts at some point during these writes; the first change it
    // delivers is one of them, never the write made before it.
    eventually(60, "a change of the watch", || {
        if first.is_finished() {
            return true;
        }
        last += 1;
        let client = client.clone();
        tokio::spawn(async move { client.put("after", format!("{last}"), Condition::Any).await });
        false
    })
    .await;
    match first.await.unwrap() {
        Some(Ok(WatchMessage::Change(change))) => {
            assert!(change.revision > 1, "{change:?}");
            assert_eq!(change.events[0].key(), "after");
        }
        other => panic!("not a change: {other:?}"),
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_resumes_across_restarts_with_no_revision_missing_or_repeated() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Binary::start(dir.path(), &[]);
    let address = server.addr.clone();
    let client = Client::new(&format!("http://{address}")).unwrap();
    let seen = Arc::new(Mutex::new(Vec::<u64>::new()));
    let failure = Arc::new(Mutex::new(None::<String>));
    let mut stream = watch_from(&client, WatchRange::All, 1);
    let watcher = {
        let (seen, failure) = (Arc::clone(&seen), Arc::clone(&failure));
        tokio::spawn(async move {
            while let Some(message) = stream.next().await {
                match message {
                    Ok(WatchMessage::Change(change)) => seen.lock().unwrap().push(change.revision),
                    Ok(WatchMessage::Progress { .. }) => {}
                    Err(err) => *failure.lock().unwrap() = Some(err.to_string()),
                }
            }
        })
    };
    let write = |round: u32| {
        let client = client.clone();
        async move {
            let mut revision = 0;
            for n in 0..10 {
                let key = format!("k{round}/{n}");
                revision = client
                    .put(&key, "v", Condition::Any)
                    .await
                    .unwrap()
                    .revision;
            }
            revision
        }
    };
    let done = |upto: u64| {
        let (seen, failure) = (Arc::clone(&seen), Arc::clone(&failure));
        move || {
            assert_eq!(*failure.lock().unwrap(), None, "the watch failed");
            seen.lock()
                .unwrap()
                .last()
                .is_some_and(|last| *last >= upto)
        }
    };

    let upto = write(0).await;
    eventually(60, "the watch to see the first writes", done(upto)).await;
    // A graceful stop ends the stream; the watch comes back to the restart.
    assert!(server.terminate(), "{:?}", server.log());
    server = Binary::start_on(&address, dir.path(), &[]);
    write(1).await;
    // A kill breaks the connection, with writes the watch may not have seen.
    let upto = write(2).await;
    server.child.kill().unwrap();
    server.wait();
    server = Binary::start_on(&address, dir.path(), &[]);
    let upto = upto.max(write(3).await);
    eventually(60, "the watch to catch up after the restarts", done(upto)).await;

    assert_eq!(*seen.lock().unwrap(), (1..=upto).collect::<Vec<_>>());
    watcher.abort();
    assert!(server.terminate());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_before_the_history_kept_ends_the_watch_with_compacted() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--watch-history-revisions",
        "5",
        "--watch-history-secs",
        "0",
    ];
    let mut server = Binary::start(dir.path(), &args);
    let client = server.client.clone();
    for n in 0..20 {
        client
            .put(&format!("k{n}"), "v", Condition::Any)
            .await
            .unwrap();
    }
    // A running server serves recent changes from memory whatever the
    // history kept on disk; a restart leaves only the history, which is
    // trimmed every second.
    assert!(server.terminate(), "{:?}", server.log());
    server = Binary::start_on(&server.addr.clone(), dir.path(), &args);
    let from_start = ChangesRequest {
        after: Some(0),
        ..ChangesRequest::default()
    };
    within(60, "the history to be trimmed", async {
        while client.changes(&from_start).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(matches!(
        client.changes(&from_start).await,
        Err(ClientError::Compacted { .. })
    ));

    let mut stream = watch_from(&client, WatchRange::All, 1);
    match within(60, "the watch's answer", stream.next()).await {
        Some(Err(ClientError::Compacted {
            compact_revision,
            revision,
        })) => {
            assert!(
                compact_revision > 1 && compact_revision <= 20,
                "{compact_revision}"
            );
            assert_eq!(revision, 20);
        }
        other => panic!("not compacted: {other:?}"),
    }
    assert!(within(60, "the watch's end", stream.next()).await.is_none());

    let url = format!("http://{}", server.addr);
    let mut cli = WatchCli::start(&url, &["--from-revision", "1"]);
    let status = cli.wait();
    assert_eq!(status.code(), Some(4), "{}", cli.stderr());
    assert!(cli.stderr().contains("no longer kept"), "{}", cli.stderr());
    assert!(server.terminate());
}

/// `kvstore watch ARGS` against `url`, its stdout read line by line as it
/// comes; killed when dropped.
struct WatchCli {
    child: Child,
    lines: Receiver<String>,
    stderr: Arc<Mutex<String>>,
}

impl WatchCli {
    fn start(url: &str, args: &[&str]) -> Self {
        use std::io::{BufRead as _, Read as _};
        let mut child = Command::new(env!("CARGO_BIN_EXE_kvstore"))
            .arg("watch")
            .args(args)
            .env("KVSTORE_URL", url)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start kvstore watch");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut pipe = child.stderr.take().unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let text = Arc::clone(&stderr);
        std::thread::spawn(move || {
            let mut all = String::new();
            let _ = pipe.read_to_string(&mut all);
            *text.lock().unwrap() = all;
        });
        WatchCli {
            child,
            lines,
            stderr,
        }
    }

    /// The next `n` lines of output, waiting at most a minute for them
    /// (off the runtime, which serves the server).
    async fn lines(&mut self, n: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut found = Vec::new();
        while found.len() < n {
            match tokio::task::block_in_place(|| {
                self.lines
                    .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            }) {
                Ok(line) => found.push(line),
                Err(RecvTimeoutError::Timeout) => panic!("only {found:?} within 60 s"),
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("the output ended after {found:?}: {}", self.stderr())
                }
            }
        }
        found
    }

    fn signal(&mut self, signal: libc::c_int) -> std::process::ExitStatus {
        send_signal(self.child.id(), signal).unwrap();
        self.wait()
    }

    fn wait(&mut self) -> std::process::ExitStatus {
        let status =
            tokio::task::block_in_place(|| wait_child(&mut self.child, Duration::from_secs(60)))
                .expect("kvstore watch did not exit within 60 s");
        // The stderr reader ends with the process; give it its deadline too.
        crate::harness::poll_until(Duration::from_secs(60), "stderr", || {
            Arc::strong_count(&self.stderr) == 1
        });
        status
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for WatchCli {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes to the test's keys; the revision of the first.
async fn cli_writes(client: &Client) -> u64 {
    let first = client
        .put("users/1", "hello", Condition::Any)
        .await
        .unwrap();
    client.put("other", "x", Condition::Any).await.unwrap();
    client.delete("users/1", None).await.unwrap();
    client
        .batch(&BatchRequest {
            ops: vec![
                op(BatchOpKind::Put, "users/2", Some("b")),
                op(BatchOpKind::Put, "users/3", Some("two\nlines")),
            ],
        })
        .await
        .unwrap();
    first.revision
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_prints_writes_as_they_come_and_exits_0_on_sigint() {
    let server = TestServer::start().await;
    let start = server
        .client
        .put("users/0", "old", Condition::Any)
        .await
        .unwrap()
        .revision
        + 1;
    let from = start.to_string();
    let mut cli = WatchCli::start(
        &server.base,
        &["--prefix", "users/", "--from-revision", &from],
    );
    let r = cli_writes(&server.client).await;
    assert_eq!(r, start);
    assert_eq!(
        cli.lines(4).await,
        [
            format!("{r} put users/1 v1 hello"),
            format!("{} delete users/1 v1 (deleted)", r + 2),
            format!("{} put users/2 v1 b", r + 3),
            format!("{} put users/3 v1 two\\nlines", r + 3),
        ]
    );
    let status = cli.signal(libc::SIGINT);
    assert_eq!(status.code(), Some(0), "{}", cli.stderr());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_prints_one_json_change_per_line_and_exits_0_on_sigterm() {
    let server = TestServer::start().await;
    let mut cli = WatchCli::start(&server.base, &["--json", "--from-revision", "1"]);
    cli_writes(&server.client).await;
    let lines = cli.lines(4).await;
    let changes: Vec<Change> = lines
        .iter()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    assert_eq!(revisions(&changes), [1, 2, 3, 4]);
    let raw: serde_json::Value = serde_json::from_str(&lines[3]).unwrap();
    assert_eq!(raw["events"][0]["type"], "put");
    assert_eq!(raw["events"].as_array().map(Vec::len), Some(2));
    let status = cli.signal(libc::SIGTERM);
    assert_eq!(status.code(), Some(0), "{}", cli.stderr());
    server.stop().await;
}

/// A server that answers each watch connection with the next of `bodies`
/// (as an event stream, then closes it) and hands the test each request's
/// head.
async fn scripted_server(bodies: Vec<String>) -> (String, Receiver<String>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (tx, heads) = std::sync::mpsc::channel();
    tokio::spawn(async move {
        for body in bodies {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.ends_with(b"\r\n\r\n") {
                match socket.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let _ = tx.send(String::from_utf8_lossy(&head).to_lowercase());
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n{body}"
            );
            let _ = socket.write_all(answer.as_bytes()).await;
        }
    });
    (base, heads)
}

fn change_event(revision: u64) -> String {
    format!(
        "id: {revision}\nevent: change\ndata: {{\"revision\":{revision},\"events\":[{{\"type\":\"delete\",\"key\":\"k\",\"version\":1,\"reason\":\"deleted\"}}]}}\n\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_sends_the_last_id_skips_repeats_and_compacted_mid_stream_ends_it() {
    let first = format!(":hi\n\n{}", change_event(3));
    let second = format!(
        "{}{}event: compacted\ndata: {{\"compact_revision\":9,\"revision\":12}}\n\n",
        change_event(3),
        change_event(4)
    );
    let (base, heads) = scripted_server(vec![first, second]).await;
    let client = Client::new(&base).unwrap();
    let mut stream = watch_from(&client, WatchRange::Prefix("k".into()), 3);
    let mut next = async || within(60, "the next message", stream.next()).await;
    let revision = |message: Option<Result<WatchMessage, ClientError>>| match message {
        Some(Ok(WatchMessage::Change(change))) => change.revision,
        other => panic!("not a change: {other:?}"),
    };
    assert_eq!(revision(next().await), 3);
    // The first connection ended; the repeat of 3 on the second is skipped.
    assert_eq!(revision(next().await), 4);
    assert!(matches!(
        next().await,
        Some(Err(ClientError::Compacted {
            compact_revision: 9,
            revision: 12
        }))
    ));
    assert!(next().await.is_none());
    let heads: Vec<String> = heads.try_iter().collect();
    assert_eq!(heads.len(), 2, "{heads:?}");
    assert!(
        heads[0].starts_with("get /v1/watch?prefix=k&from_revision=3 "),
        "{}",
        heads[0]
    );
    assert!(
        heads[1].contains("\r\nlast-event-id: 3\r\n"),
        "{}",
        heads[1]
    );
}
