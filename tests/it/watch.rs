//! `GET /v1/watch` and `GET /v1/changes` (docs/api.md, "Watching changes"):
//! every acknowledged write once, in revision order, a batch as one message;
//! resuming by `Last-Event-ID` or `from_revision`; list-then-watch; filters
//! and token rights; progress; `compacted`; slow watchers that neither block
//! writers nor lose changes; the history surviving SIGKILL; shutdown.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::BodyExt as _;
use hyper_util::rt::TokioIo;
use kvstore::client::Client;
use kvstore::server::ServerConfig;
use kvstore::storage::History;
use tokio::task::JoinHandle;

use crate::harness::{Backend, Binary, TestServer, eventually, within};
use crate::requests::*;

/// One message of an event stream.
#[derive(Debug, Clone)]
pub struct Message {
    pub id: Option<u64>,
    pub event: String,
    pub data: Value,
}

/// A watch read as a client reads it: the raw event stream on a connection
/// of its own, parsed line by line.
pub struct EventStream {
    body: hyper::body::Incoming,
    pending: String,
    connection: JoinHandle<()>,
}

impl Drop for EventStream {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

/// Opens `GET /v1/watch?{query}`; the error status and JSON body when the
/// server refuses it.
pub async fn open_watch(
    addr: SocketAddr,
    query: &str,
    headers: &[(&str, &str)],
) -> Result<EventStream, (StatusCode, Value)> {
    let stream = within(30, "connect", tokio::net::TcpStream::connect(addr))
        .await
        .expect("connect");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    let connection = tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut request = hyper::Request::get(format!("/v1/watch?{query}")).header("host", "kvstore");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .expect("request");
    let response = within(30, "the watch's answer", sender.send_request(request))
        .await
        .expect("send");
    let status = response.status();
    if status != StatusCode::OK {
        let body = within(30, "the error body", response.into_body().collect())
            .await
            .expect("body")
            .to_bytes();
        let body: Value = serde_json::from_slice(&body).expect("a JSON error");
        return Err((status, body));
    }
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "text/event-stream",
        "a watch is an event stream"
    );
    assert_eq!(response.headers()["x-accel-buffering"], "no");
    Ok(EventStream {
        body: response.into_body(),
        pending: String::new(),
        connection,
    })
}

/// [`open_watch`] that must succeed.
pub async fn watch(addr: SocketAddr, query: &str) -> EventStream {
    open_watch(addr, query, &[])
        .await
        .unwrap_or_else(|(status, body)| panic!("watch ?{query}: {status} {body}"))
}

impl EventStream {
    /// The next message within `secs` seconds; `None` when the stream ended
    /// or nothing came in time. Comments (keep-alives) are skipped.
    pub async fn next_within(&mut self, secs: u64) -> Option<Message> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            while let Some(end) = self.pending.find("\n\n") {
                let block: String = self.pending.drain(..end + 2).collect();
                if let Some(message) = parse_block(&block) {
                    return Some(message);
                }
            }
            let frame = tokio::time::timeout_at(deadline, self.body.frame()).await;
            match frame {
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        self.pending
                            .push_str(std::str::from_utf8(&data).expect("UTF-8 events"));
                    }
                }
                Ok(Some(Err(_)) | None) | Err(_) => return None,
            }
        }
    }

    /// The next message, which must come within `secs` seconds.
    pub async fn next(&mut self, secs: u64) -> Message {
        self.next_within(secs)
            .await
            .unwrap_or_else(|| panic!("no message within {secs} s"))
    }

    /// The next `change` message, skipping progress.
    pub async fn next_change(&mut self, secs: u64) -> Message {
        loop {
            let message = self.next(secs).await;
            if message.event != "progress" {
                assert_eq!(message.event, "change", "{message:?}");
                return message;
            }
        }
    }

    /// Changes until one at `revision` or above.
    pub async fn changes_through(&mut self, revision: u64) -> Vec<Message> {
        let mut seen = Vec::new();
        while seen
            .last()
            .is_none_or(|m: &Message| m.id.expect("id") < revision)
        {
            seen.push(self.next_change(30).await);
        }
        seen
    }
}

/// A message from one SSE block; `None` for a block of comments only.
fn parse_block(block: &str) -> Option<Message> {
    let (mut id, mut event, mut data) = (None, None, Vec::new());
    for line in block.lines() {
        if line.starts_with(':') || line.is_empty() {
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "id" => id = Some(value.parse::<u64>().expect("a numeric id")),
            "event" => event = Some(value.to_owned()),
            "data" => data.push(value),
            other => panic!("unexpected SSE field {other}: {block}"),
        }
    }
    let event = event?;
    let data = serde_json::from_str(&data.join("\n")).expect("JSON data");
    Some(Message { id, event, data })
}

/// A change message's revision, checking that `id`, the revision in `data`
/// and the documented shape agree.
fn change_revision(message: &Message) -> u64 {
    assert_eq!(message.event, "change");
    assert_fields(&message.data, &["revision", "events"]);
    let revision = message.data["revision"].as_u64().expect("revision");
    assert_eq!(message.id, Some(revision), "{message:?}");
    let events = message.data["events"].as_array().expect("events");
    assert!(!events.is_empty(), "a change message without events");
    for event in events {
        match event["type"].as_str() {
            Some("put") => {
                let value = if event.get("value_base64").is_some() {
                    "value_base64"
                } else {
                    "value"
                };
                assert_fields(
                    event,
                    &["type", "key", value, "version", "created_at", "updated_at"],
                );
                assert_timestamp(event["created_at"].as_str().expect("created_at"));
                assert_timestamp(event["updated_at"].as_str().expect("updated_at"));
            }
            Some("delete") => {
                assert_fields(event, &["type", "key", "version", "reason"]);
            }
            other => panic!("unknown event type {other:?}: {event}"),
        }
    }
    revision
}

/// `(key, version, type)` of every event of the messages, in order.
fn events_of(messages: &[Message]) -> Vec<(String, u64, String)> {
    messages
        .iter()
        .flat_map(|m| m.data["events"].as_array().cloned().unwrap_or_default())
        .map(|e| {
            (
                e["key"].as_str().expect("key").to_owned(),
                e["version"].as_u64().expect("version"),
                e["type"].as_str().expect("type").to_owned(),
            )
        })
        .collect()
}

/// Asserts that the messages' revisions only go up.
fn assert_increasing(messages: &[Message]) {
    let revisions: Vec<u64> = messages.iter().map(change_revision).collect();
    assert!(
        revisions.windows(2).all(|w| w[0] < w[1]),
        "revisions out of order or repeated: {revisions:?}"
    );
}

/// One `GET /v1/changes?{query}`, checked for shape.
async fn changes_page(client: &Client, query: &str) -> Value {
    let response = get(client, &format!("/v1/changes?{query}")).await;
    let page = expect_json(&response, StatusCode::OK);
    assert_fields(&page, &["changes", "revision"]);
    page
}

/// Every change to the range of `query` after `after` up to `through`, read
/// page by page (on PostgreSQL the feed settles a write a little after its
/// answer, so the pages are read until they reach `through`).
async fn all_changes(client: &Client, query: &str, mut after: u64, through: u64) -> Vec<Message> {
    let mut messages = Vec::new();
    while after < through {
        let page = changes_page(
            client,
            &format!("{query}&after={after}&limit=1000&wait_ms=5000"),
        )
        .await;
        for change in page["changes"].as_array().expect("changes") {
            let revision = change["revision"].as_u64().expect("revision");
            messages.push(Message {
                id: Some(revision),
                event: "change".into(),
                data: change.clone(),
            });
        }
        let next = page["revision"].as_u64().expect("revision");
        assert!(next >= after, "a page's revision went back");
        after = next;
    }
    messages
}

async fn write_batch(client: &Client, ops: Value) -> Value {
    let response = post_json(client, "/v1/batch", &json!({ "ops": ops })).await;
    expect_json(&response, StatusCode::OK)
}

async fn metric(client: &Client, name: &str) -> f64 {
    let text = get(client, "/metrics").await;
    let text = String::from_utf8_lossy(&text.body).into_owned();
    text.lines()
        .filter(|line| line.starts_with(name))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

for_each_backend! {

/// Concurrent writers, single and batched, puts and deletes: the watch
/// shows each acknowledged write once, in revision order, a batch as one
/// message with all its events, and nothing that was not written.
async fn a_watch_sees_every_acknowledged_write_once_in_order() {
    let server = TestServer::start().await;
    let mut stream = watch(server.addr, "").await;
    let mut writers = Vec::new();
    for writer in 0..4 {
        let client = server.client.clone();
        writers.push(tokio::spawn(async move {
            let mut written = BTreeMap::new();
            for i in 0..25 {
                let key = format!("w{writer}/{i}");
                if i % 5 == 4 {
                    let body = write_batch(
                        &client,
                        json!([
                            {"op": "put", "key": format!("{key}/a"), "value": "a"},
                            {"op": "put", "key": format!("{key}/b"), "value": "b"},
                            {"op": "delete", "key": format!("w{writer}/{}", i - 1)},
                        ]),
                    )
                    .await;
                    written.insert(revision_of(&body), 3);
                } else {
                    let body = put_text(&client, &key, "v").await;
                    written.insert(revision_of(&body), 1);
                }
            }
            written
        }));
    }
    let mut acknowledged = BTreeMap::new();
    for writer in writers {
        acknowledged.extend(within(60, "the writers", writer).await.expect("writer"));
    }
    let last = *acknowledged.keys().last().expect("writes");
    let messages = stream.changes_through(last).await;
    assert_increasing(&messages);
    let seen: BTreeMap<u64, usize> = messages
        .iter()
        .map(|m| (m.id.expect("id"), m.data["events"].as_array().expect("events").len()))
        .collect();
    assert_eq!(seen, acknowledged, "revision -> events");
    // Nothing more is delivered: the next message is progress or a new write.
    let probe = probe_revision(&server.client).await;
    let next = stream.next_change(30).await;
    assert_eq!(change_revision(&next), probe);
}

/// A client that reconnects with `Last-Event-ID` or `from_revision` gets
/// exactly the revisions after the last one it saw; `Last-Event-ID` wins.
async fn resuming_gives_exactly_the_rest() {
    let server = TestServer::start().await;
    let mut revisions = Vec::new();
    for i in 0..10 {
        revisions.push(revision_of(&put_text(&server.client, &format!("k{i}"), "v").await));
    }
    let mut first = watch(server.addr, &format!("from_revision={}", revisions[0])).await;
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(change_revision(&first.next_change(30).await));
    }
    drop(first);
    assert_eq!(seen, revisions[..4]);
    let last_id = seen[3].to_string();
    // Last-Event-ID wins over a from_revision that would repeat everything.
    let mut resumed = open_watch(
        server.addr,
        &format!("from_revision={}", revisions[0]),
        &[("last-event-id", &last_id)],
    )
    .await
    .expect("resume");
    let rest = resumed.changes_through(revisions[9]).await;
    assert_eq!(rest.iter().map(change_revision).collect::<Vec<_>>(), revisions[4..]);
    let mut again = watch(server.addr, &format!("from_revision={}", revisions[4])).await;
    let rest = again.changes_through(revisions[9]).await;
    assert_eq!(rest.iter().map(change_revision).collect::<Vec<_>>(), revisions[4..]);
}

/// Watchers that come and go one at a time, each resuming where the one
/// before stopped, while a writer goes on: between two of them nobody
/// watches and the feed keeps nothing, and together they still see every
/// revision once, in order.
async fn watchers_coming_and_going_miss_nothing() {
    let server = TestServer::start().await;
    let mut written = Vec::new();
    for i in 0..20 {
        let body = put_text(&server.client, &format!("k{}", i % 7), "v").await;
        written.push(revision_of(&body));
    }
    let writer = {
        let client = server.client.clone();
        tokio::spawn(async move {
            let mut revisions = Vec::new();
            for i in 0..100 {
                let body = put_text(&client, &format!("k{}", i % 7), &i.to_string()).await;
                revisions.push(revision_of(&body));
            }
            revisions
        })
    };
    let mut seen: Vec<u64> = Vec::new();
    let all = written.len() + 100;
    within(60, "every revision, watcher after watcher", async {
        while seen.len() < all {
            let from = seen.last().map_or(written[0], |last| last + 1);
            let mut stream = watch(server.addr, &format!("from_revision={from}")).await;
            let mut taken = 0;
            while taken < 7 && seen.len() < all {
                let Some(message) = stream.next_within(5).await else {
                    break;
                };
                if message.event != "progress" {
                    seen.push(change_revision(&message));
                    taken += 1;
                }
            }
        }
    })
    .await;
    written.extend(within(30, "the writer", writer).await.expect("writer"));
    assert_eq!(seen, written, "missing, repeated or out of order");
}

/// List a range, then watch it from the list's `revision + 1`: the keys
/// and versions the list showed, updated by the events, are the range's
/// final state, with writers running throughout.
async fn list_then_watch_misses_nothing() {
    let server = TestServer::start().await;
    seed_keys(&server.client, &["r/a", "r/b", "r/c"]).await;
    let writer = {
        let client = server.client.clone();
        tokio::spawn(async move {
            for i in 0..60 {
                put_text(&client, &format!("r/{}", ["a", "b", "c", "d"][i % 4]), "v").await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    let page = list(&server.client, "prefix=r/&limit=1000").await;
    let listed_at = page["revision"].as_u64().expect("revision");
    let mut state: BTreeMap<String, u64> = page["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|e| (e["key"].as_str().expect("key").to_owned(), version_of(e)))
        .collect();
    let mut stream = watch(server.addr, &format!("prefix=r/&from_revision={}", listed_at + 1)).await;
    within(60, "the writer", writer).await.expect("writer");
    let last = probe_revision(&server.client).await;
    let mut messages = Vec::new();
    // The probe is outside the prefix: read until progress passes it.
    loop {
        let message = stream.next(30).await;
        if message.event == "progress" {
            if message.data["revision"].as_u64().expect("revision") >= last {
                break;
            }
            continue;
        }
        messages.push(message);
    }
    assert_increasing(&messages);
    for (key, version, kind) in events_of(&messages) {
        let before = state.get(&key).copied();
        if Backend::current() == Backend::Embedded {
            // Exact on the embedded engine: each event follows the listed state.
            assert_eq!(before.map_or(1, |v| v + 1), version, "{key} after {before:?}");
        }
        assert_eq!(kind, "put");
        state.insert(key, version);
    }
    let final_page = list(&server.client, "prefix=r/&limit=1000").await;
    let now: BTreeMap<String, u64> = final_page["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|e| (e["key"].as_str().expect("key").to_owned(), version_of(e)))
        .collect();
    assert_eq!(state, now);
}

/// `key`, `prefix` and `start`/`end` watch only their keys; a batch that
/// touches keys inside and outside shows only the inside ones.
async fn filters_watch_only_their_keys() {
    let server = TestServer::start().await;
    let from = probe_revision(&server.client).await + 1;
    let batch = write_batch(
        &server.client,
        json!([
            {"op": "put", "key": "a/1", "value": "x"},
            {"op": "put", "key": "b/1", "value": "x"},
            {"op": "put", "key": "c", "value": "x"},
        ]),
    )
    .await;
    put_text(&server.client, "a/2", "y").await;
    put_text(&server.client, "b/2", "y").await;
    let deleted = delete(&server.client, "/v1/kv/c", &[]).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    let last = probe_revision(&server.client).await;
    for (query, want) in [
        ("key=a/1", &["a/1"][..]),
        ("key=c", &["c", "c"]),
        ("prefix=a/", &["a/1", "a/2"]),
        ("start=a/2&end=c", &["b/1", "a/2", "b/2"]),
        ("start=b", &["b/1", "c", "b/2", "c", "zz-probe"]),
        ("end=b", &["a/1", "a/2"]),
        ("", &["a/1", "b/1", "c", "a/2", "b/2", "c", "zz-probe"]),
    ] {
        let messages = all_changes(&server.client, query, from - 1, last).await;
        assert_increasing(&messages);
        let keys: Vec<String> = events_of(&messages).into_iter().map(|(k, _, _)| k).collect();
        assert_eq!(keys, want, "?{query}");
    }
    // The stream filters as the pages do: the batch is one message with
    // only the key watched.
    let mut stream = watch(server.addr, &format!("key=a/1&from_revision={from}")).await;
    let message = stream.next_change(30).await;
    assert_eq!(Some(change_revision(&message)), batch["revision"].as_u64());
    assert_eq!(events_of(&[message]), [("a/1".to_owned(), 1, "put".to_owned())]);
}

/// Bad parameters are 400 `invalid_request` (or `invalid_key`) and open
/// nothing.
async fn bad_watch_parameters_are_400() {
    let server = TestServer::start().await;
    for query in [
        "from_revision=0",
        "from_revision=abc",
        "from_revision=-1",
        "key=a&prefix=a",
        "prefix=a&start=b",
        "bogus=1",
    ] {
        let (status, body) = match open_watch(server.addr, query, &[]).await {
            Err(refused) => refused,
            Ok(_) => panic!("?{query} was accepted"),
        };
        assert_eq!(status, StatusCode::BAD_REQUEST, "?{query}");
        assert_eq!(body["error"]["code"], "invalid_request", "?{query}: {body}");
    }
    let (status, body) = match open_watch(server.addr, "", &[("last-event-id", "x")]).await {
        Err(refused) => refused,
        Ok(_) => panic!("a bad Last-Event-ID was accepted"),
    };
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["code"], "invalid_request");
    for query in ["limit=0", "limit=1001", "wait_ms=60001", "after=x"] {
        let response = get(&server.client, &format!("/v1/changes?{query}")).await;
        assert_eq!(response.status, StatusCode::BAD_REQUEST, "?{query}");
    }
    assert_eq!(server.store.feed().watchers(), 0, "a refused watch holds nothing");
}

/// `/v1/changes`: pages of at most `limit` revisions, `revision` where the
/// next page starts, `wait_ms` holding the answer until a change comes.
async fn changes_pages_and_waits() {
    let server = TestServer::start().await;
    let start = probe_revision(&server.client).await;
    let mut revisions = Vec::new();
    for i in 0..5 {
        revisions.push(revision_of(&put_text(&server.client, &format!("p/{i}"), "v").await));
    }
    // The history reaches the last write (on PostgreSQL a little after it
    // was answered).
    all_changes(&server.client, "", start, revisions[4]).await;
    let page = changes_page(&server.client, &format!("after={start}&limit=2")).await;
    let listed: Vec<u64> = page["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .map(|c| c["revision"].as_u64().expect("revision"))
        .collect();
    assert_eq!(listed, revisions[..2]);
    assert_eq!(page["revision"], revisions[1], "a full page ends at its last");
    let page = changes_page(&server.client, &format!("after={}&prefix=p/", revisions[1])).await;
    assert_eq!(page["changes"].as_array().expect("changes").len(), 3);
    assert_eq!(page["revision"], revisions[4]);
    // Nothing new: an empty page at the current revision, at once.
    let page = changes_page(&server.client, &format!("after={}", revisions[4])).await;
    assert_eq!(page, json!({"changes": [], "revision": revisions[4]}));
    // A write while a call waits ends the wait with it.
    let waiting = {
        let client = server.client.clone();
        let after = revisions[4];
        tokio::spawn(async move {
            changes_page(&client, &format!("after={after}&wait_ms=30000")).await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let written = revision_of(&put_text(&server.client, "p/late", "v").await);
    let page = within(30, "the waiting call", waiting).await.expect("call");
    assert_eq!(page["changes"][0]["revision"], written);
    assert_eq!(page["changes"][0]["events"][0]["key"], "p/late");
}

/// With nothing changing in its range, a watch says how far it got, and a
/// later change is above that.
async fn progress_is_never_ahead_of_a_later_change() {
    let server = TestServer::start().await;
    let mut stream = watch(server.addr, "prefix=quiet/").await;
    let outside = revision_of(&put_text(&server.client, "loud", "v").await);
    let progress = loop {
        let message = stream.next(30).await;
        assert_eq!(message.event, "progress", "{message:?}");
        assert_fields(&message.data, &["revision"]);
        let revision = message.data["revision"].as_u64().expect("revision");
        assert_eq!(message.id, Some(revision));
        if revision >= outside {
            break revision;
        }
    };
    let written = revision_of(&put_text(&server.client, "quiet/1", "v").await);
    let change = stream.next_change(30).await;
    assert_eq!(change_revision(&change), written);
    assert!(written > progress);
}

/// A server that shuts down ends its open watches, so that it can stop and
/// clients resume elsewhere.
async fn a_shutdown_ends_open_watches() {
    let server = TestServer::start().await;
    let mut stream = watch(server.addr, "").await;
    let written = revision_of(&put_text(&server.client, "k", "v").await);
    assert_eq!(change_revision(&stream.next_change(30).await), written);
    let stopping = tokio::spawn(server.stop());
    // The stream ends (rather than holding the shutdown up).
    loop {
        match stream.next_within(60).await {
            None => break,
            Some(message) => assert_eq!(message.event, "progress", "{message:?}"),
        }
    }
    within(60, "the shutdown", stopping).await.expect("stop");
}

}

/// A watcher that reads nothing while writers write far more than its
/// queue holds: writers are not slowed into failure, and once it reads it
/// gets every revision, in order, from the change log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_watcher_neither_blocks_writers_nor_loses_changes() {
    let server = TestServer::start().await;
    let mut stalled = watch(server.addr, "").await;
    let start = probe_revision(&server.client).await;
    let value = "x".repeat(64 * 1024);
    let mut writers = Vec::new();
    for writer in 0..4 {
        let (client, value) = (server.client.clone(), value.clone());
        writers.push(tokio::spawn(async move {
            let mut revisions = Vec::new();
            for i in 0..200 {
                let body = put_text(&client, &format!("s{writer}/{i}"), &value).await;
                revisions.push(revision_of(&body));
            }
            revisions
        }));
    }
    let mut acknowledged = BTreeSet::new();
    for writer in writers {
        acknowledged.extend(within(120, "the writers", writer).await.expect("writer"));
    }
    // 800 changes of 64 KiB: far past a watcher's 16 MiB queue.
    assert!(metric(&server.client, "kvstore_watchers_lagged_total").await >= 1.0);
    let last = *acknowledged.last().expect("writes");
    let messages = stalled.changes_through(last).await;
    assert_increasing(&messages);
    let seen: BTreeSet<u64> = messages
        .iter()
        .filter_map(|m| m.id)
        .filter(|r| *r > start)
        .collect();
    let missing: Vec<&u64> = acknowledged.difference(&seen).collect();
    let extra: Vec<&u64> = seen.difference(&acknowledged).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:?}, not written {extra:?}"
    );
}

/// A stalled watcher that falls behind the history kept is told so: its
/// stream ends with `event: compacted`, after only changes in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_falls_behind_the_history_ends_with_compacted() {
    let server = TestServer::start_with(ServerConfig::default(), |engine| {
        engine.history = History {
            revisions: 5,
            age: Duration::ZERO,
        };
    })
    .await;
    let mut stalled = watch(server.addr, "").await;
    let value = "x".repeat(64 * 1024);
    let mut last = 0;
    for i in 0..600 {
        last = revision_of(&put_text(&server.client, &format!("t/{}", i % 50), &value).await);
    }
    // The trimmer runs every second: wait until the history starts past
    // what the watcher's queue and the sockets can hold.
    let mut trimmed = false;
    for _ in 0..100 {
        if let Err(kvstore::StoreError::Compacted {
            compact_revision, ..
        }) = server.store.changes(0, 1).await
            && compact_revision > 100
        {
            trimmed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(trimmed, "the history was never trimmed");
    let mut revisions = Vec::new();
    let ended = loop {
        let message = stalled.next(30).await;
        match message.event.as_str() {
            "change" => revisions.push(change_revision(&message)),
            "compacted" => break message,
            other => panic!("unexpected {other}: {message:?}"),
        }
    };
    assert_fields(&ended.data, &["compact_revision", "revision"]);
    let compact = ended.data["compact_revision"]
        .as_u64()
        .expect("compact_revision");
    assert!(compact > 100 && compact <= last, "{ended:?}");
    assert!(
        revisions.windows(2).all(|w| w[1] == w[0] + 1),
        "a gap before the end"
    );
    assert!(
        revisions.last().is_none_or(|r| *r < compact),
        "{revisions:?}"
    );
    assert!(
        stalled.next_within(10).await.is_none(),
        "the stream goes on"
    );
}

/// A watch from below the history kept is 410 `compacted` with the oldest
/// watchable revision, from which a watch works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_below_the_history_is_410_compacted() {
    let server = TestServer::start_with(ServerConfig::default(), |engine| {
        engine.history = History {
            revisions: 5,
            age: Duration::ZERO,
        };
    })
    .await;
    let mut last = 0;
    for i in 0..30 {
        last = revision_of(&put_text(&server.client, &format!("h/{i}"), "v").await);
    }
    // The trimmer runs every second.
    let mut refused = None;
    for _ in 0..100 {
        if let Err(answer) = open_watch(server.addr, "from_revision=1", &[]).await {
            refused = Some(answer);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, body) = refused.expect("the history was never trimmed");
    assert_eq!(status, StatusCode::GONE);
    assert_eq!(body["error"]["code"], "compacted", "{body}");
    let oldest = body["error"]["compact_revision"]
        .as_u64()
        .expect("compact_revision");
    assert_eq!(body["error"]["revision"], last);
    assert!(
        oldest > 1 && oldest + 4 <= last,
        "{oldest} of {last}: keep 5 at least"
    );
    let response = get(&server.client, "/v1/changes?after=0").await;
    expect_error(&response, StatusCode::GONE, "compacted");
    let mut stream = watch(server.addr, &format!("from_revision={oldest}")).await;
    let first = stream.next_change(30).await;
    assert_eq!(change_revision(&first), oldest);
}

/// SIGKILL while writers write: after the restart, the history from
/// revision 1 holds every acknowledged write exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_survives_sigkill_with_every_acknowledged_write() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut server = Binary::start(dir.path(), &[]);
    let mut writers = Vec::new();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for writer in 0..4 {
        let client = server.client.clone();
        let stop = std::sync::Arc::clone(&stop);
        writers.push(tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            for i in 0.. {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let key = format!("k{writer}/{}", i % 20);
                let sent = client
                    .send(
                        Method::PUT,
                        &Client::key_path(&key),
                        &[JSON],
                        json!({"value": "v"}).to_string(),
                    )
                    .await;
                match sent {
                    Ok(response) if response.status.is_success() => {
                        let body: Value = serde_json::from_slice(&response.body).expect("JSON");
                        acknowledged.push((revision_of(&body), key, version_of(&body)));
                    }
                    _ => break,
                }
            }
            acknowledged
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    server.child.kill().expect("SIGKILL");
    server.wait();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut acknowledged = Vec::new();
    for writer in writers {
        acknowledged.extend(within(60, "the writers", writer).await.expect("writer"));
    }
    assert!(acknowledged.len() > 10, "too few writes before the kill");
    acknowledged.sort();
    let server = Binary::start(dir.path(), &[]);
    let through = probe_revision(&server.client).await - 1;
    let messages = all_changes(&server.client, "", 0, through).await;
    assert_increasing(&messages);
    let history: BTreeMap<u64, (String, u64)> = messages
        .iter()
        .map(|m| {
            let events = events_of(std::slice::from_ref(m));
            assert_eq!(events.len(), 1);
            let (key, version, _) = events.into_iter().next().expect("event");
            (m.id.expect("id"), (key, version))
        })
        .collect();
    for (revision, key, version) in &acknowledged {
        assert_eq!(
            history.get(revision),
            Some(&(key.clone(), *version)),
            "acknowledged revision {revision} is not in the history"
        );
    }
    // The log and the data agree: every key's last event is its entry.
    let mut last_version: BTreeMap<&str, u64> = BTreeMap::new();
    for (key, version) in history.values() {
        last_version.insert(key, *version);
    }
    for (key, version) in last_version {
        assert_eq!(
            version_of(&entry(&server.client, key).await),
            version,
            "{key}"
        );
    }
}

/// The feed counts open watchers, and the history gauge moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_are_counted_until_they_disconnect() {
    let server = TestServer::start().await;
    let feed = server.store.feed();
    let stream = watch(server.addr, "").await;
    assert_eq!(feed.watchers(), 1);
    put_text(&server.client, "m", "v").await;
    drop(stream);
    eventually(30, "the watcher to close", || feed.watchers() == 0).await;
    assert!(metric(&server.client, "kvstore_watch_history_revisions").await >= 1.0);
}

/// `admin` reads everything; `app` reads users/ only.
fn security() -> kvstore::server::Security {
    use kvstore::server::{Auth, TokenRules};
    let rules = TokenRules::parse(
        r#"
[[token]]
name = "admin"
token = "admin-token"
read = [""]
write = [""]

[[token]]
name = "app"
token = "app-token"
read = ["users/"]
"#,
        false,
    )
    .expect("rules");
    let mut security = kvstore::server::Security::default();
    security.auth = Some(std::sync::Arc::new(Auth::from_rules(rules, false)));
    security
}

/// A token watches only what it may read: a watch of everything is clipped
/// to its prefixes; a key or range outside them is 403; no token is 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_watches_only_what_it_may_read() {
    let mut options = kvstore::client::ClientOptions::default();
    options.token = Some("admin-token".into());
    let server = TestServer::start_secured(ServerConfig::default(), security(), &options).await;
    let app = [("authorization", "Bearer app-token")];
    let mut stream = open_watch(server.addr, "", &app)
        .await
        .expect("app watches");
    put_text(&server.client, "config/x", "secret").await;
    let written = revision_of(&put_text(&server.client, "users/1", "v").await);
    let message = stream.next_change(30).await;
    assert_eq!(change_revision(&message), written);
    assert_eq!(events_of(&[message])[0].0, "users/1");
    for query in ["key=config/x", "prefix=config/", "start=a&end=b"] {
        let (status, body) = match open_watch(server.addr, query, &app).await {
            Err(refused) => refused,
            Ok(_) => panic!("?{query} was watched"),
        };
        assert_eq!(status, StatusCode::FORBIDDEN, "?{query}: {body}");
        assert_eq!(body["error"]["code"], "forbidden");
    }
    let (status, body) = match open_watch(server.addr, "", &[]).await {
        Err(refused) => refused,
        Ok(_) => panic!("a watch without a token"),
    };
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"]["code"], "unauthenticated");
}

/// Idle watchers are mostly a connection's small buffers spread over the
/// heap; with transparent huge pages the kernel backs each touched 2 MiB of
/// it in full, which made an idle watcher cost 21.5 KiB instead of 13.7
/// (docs/operations.md). The server turns them off for itself.
#[test]
fn the_server_runs_without_transparent_huge_pages() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Binary::start(dir.path(), &[]);
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.child.id())).unwrap();
    let thp = status
        .lines()
        .find_map(|line| line.strip_prefix("THP_enabled:"))
        .map(str::trim);
    assert!(server.terminate());
    assert_eq!(thp, Some("0"), "{status}");
}
