//! Limits that protect the server, and what it tells its operator: the
//! request timeout, the connection cap, the slow-request log and JSON logs.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use crate::harness::{Binary, Gate, TestServer, metric_value, within};
use hyper::{Method, StatusCode};
use kvstore::server::ServerConfig;
use kvstore::storage::Condition;
use kvstore::storage::embedded::CommitEvent;
use kvstore::types::ErrorResponse;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_over_the_timeout_is_answered_503() {
    // The commit hook holds the first commit until the test lets it go.
    let gate = Arc::new(Gate::default());
    let held = Arc::clone(&gate);
    let (committing, mut commits) = tokio::sync::mpsc::unbounded_channel();
    let mut config = ServerConfig::default();
    config.request_timeout = Duration::from_millis(200);
    let server = TestServer::start_with(config, move |engine| {
        engine.commit_hook = Some(Arc::new(move |_: &CommitEvent| {
            let _ = committing.send(());
            held.wait();
        }));
    })
    .await;

    // A write alone commits on its own thread, where a sync cannot be cut
    // short; the write queued behind it waits for the writer, and that wait
    // is what the timeout bounds.
    let client = server.client.clone();
    let first = tokio::spawn(async move { client.put("first", "v", Condition::Any).await });
    within(60, "the first commit", commits.recv())
        .await
        .expect("first commit");
    let response = server
        .client
        .send(
            Method::PUT,
            "/v1/kv/k",
            &[(hyper::header::CONTENT_TYPE, "application/octet-stream")],
            "v",
        )
        .await
        .expect("send");
    assert_eq!(response.status, StatusCode::SERVICE_UNAVAILABLE);
    let error: ErrorResponse = response.json().expect("error body");
    assert_eq!(error.error.code, "unavailable");
    assert!(
        error.error.message.contains("unknown"),
        "{}",
        error.error.message
    );

    gate.set(true);
    within(60, "the first write", first)
        .await
        .unwrap()
        .expect("first write");
    server.stop().await;
}

/// Sends one keep-alive request on a raw connection and reads its answer
/// (for at most 10 s).
fn request_on(stream: &mut TcpStream) -> String {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    let mut buf = [0u8; 1024];
    let n = stream.read(&mut buf).expect("read");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_wait_until_one_closes() {
    let mut config = ServerConfig::default();
    config.max_connections = 1;
    let server = TestServer::start_with(config, |_| {}).await;
    let addr = server.addr;
    let result = within(
        60,
        "two connections",
        tokio::task::spawn_blocking(move || {
            let mut first = TcpStream::connect(addr).expect("connect");
            assert!(request_on(&mut first).starts_with("HTTP/1.1 200"));

            // The second connection is accepted by the kernel but not served.
            let mut second = TcpStream::connect(addr).expect("connect");
            second
                .set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            second
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            let mut buf = [0u8; 1024];
            let early = second.read(&mut buf);
            assert!(early.is_err(), "a connection over the cap was served");

            // Once the first closes, the second is served.
            drop(first);
            second
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let n = second.read(&mut buf).expect("read after the first closed");
            String::from_utf8_lossy(&buf[..n]).into_owned()
        }),
    )
    .await
    .unwrap();
    assert!(result.starts_with("HTTP/1.1 200"), "{result}");
    server.stop().await;
}

/// Runs the binary with `args`, makes one PUT, stops it, and returns its log.
async fn log_of_one_put(args: &[&str]) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Binary::start(dir.path(), args);
    server
        .client
        .put("some/key", "v", Condition::Any)
        .await
        .expect("put");
    assert!(server.terminate());
    server.log()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_requests_are_logged_with_where_the_time_went() {
    let log = log_of_one_put(&["--slow-ms", "0"]).await;
    let slow = log
        .iter()
        .find(|l| l.contains("slow request"))
        .unwrap_or_else(|| panic!("no slow-request line in {log:#?}"));
    for field in [
        "WARN",
        "method=PUT",
        "key=\"some/key\"",
        "status=201",
        "total_ms=",
        "storage_ms=",
        "committer_wait_ms=",
        "commit_and_sync_ms=",
    ] {
        assert!(slow.contains(field), "{field} missing in {slow}");
    }
    let quiet = log_of_one_put(&["--slow-ms", "60000"]).await;
    assert!(
        !quiet.iter().any(|l| l.contains("slow request")),
        "{quiet:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line() {
    let log = log_of_one_put(&["--log-format", "json", "--slow-ms", "0"]).await;
    assert!(log.len() >= 3, "{log:#?}");
    for line in &log {
        let object: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            object["level"].is_string() && object["fields"].is_object(),
            "{line}"
        );
    }
    assert!(log.iter().any(|l| l.contains("\"slow request\"")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_sending_headers_slowly_is_disconnected() {
    let mut config = ServerConfig::default();
    config.header_read_timeout = Duration::from_millis(500);
    let server = TestServer::start_with(config, |_| {}).await;
    let addr = server.addr;
    let (elapsed, answer) = within(
        60,
        "the slow client",
        tokio::task::spawn_blocking(move || {
            let start = std::time::Instant::now();
            let mut stream = TcpStream::connect(addr).expect("connect");
            stream
                .set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            stream.write_all(b"GET /healthz HTTP/1.1\r\n").unwrap();
            // One header byte every 100 ms: the headers never end in time.
            let mut buf = [0u8; 1024];
            while start.elapsed() < Duration::from_secs(10) {
                if stream.write_all(b"X").is_err() {
                    break;
                }
                match stream.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        return (
                            start.elapsed(),
                            String::from_utf8_lossy(&buf[..n]).into_owned(),
                        );
                    }
                    Err(e)
                        if e.kind() == std::io::ErrorKind::WouldBlock
                            || e.kind() == std::io::ErrorKind::TimedOut => {}
                    Err(_) => break,
                }
            }
            (start.elapsed(), String::new())
        }),
    )
    .await
    .unwrap();
    assert!(
        elapsed >= Duration::from_millis(400) && elapsed < Duration::from_secs(5),
        "closed after {elapsed:?}"
    );
    // hyper may answer 408 before it closes; it never serves the request.
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
    // A client that sends its headers at once is still served.
    let fresh = within(
        60,
        "a fresh client",
        tokio::task::spawn_blocking(move || {
            let mut stream = TcpStream::connect(addr).expect("connect");
            request_on(&mut stream)
        }),
    )
    .await
    .unwrap();
    assert!(fresh.starts_with("HTTP/1.1 200"), "{fresh}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cursors_survive_a_restart_through_the_secret_in_the_data_dir() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let mut server = Binary::start(dir.path(), &[]);
    for key in ["k1", "k2", "k3"] {
        server.client.put(key, "v", Condition::Any).await.unwrap();
    }
    let page = server
        .client
        .list(&kvstore::client::ListParams {
            limit: Some(1),
            ..Default::default()
        })
        .await
        .unwrap();
    let cursor = page.next_cursor.expect("a cursor");
    assert!(server.terminate());
    let secret = dir.path().join("cursor-secret");
    let mode = std::fs::metadata(&secret).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");

    let mut again = Binary::start(dir.path(), &[]);
    let rest = again
        .client
        .list(&kvstore::client::ListParams {
            cursor: Some(cursor.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    let keys: Vec<&str> = rest.items.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, ["k2", "k3"]);
    assert!(again.terminate());

    // Another secret (given explicitly) refuses the old cursor.
    let mut other = Binary::start(
        dir.path(),
        &["--cursor-secret", "some other secret of enough bytes"],
    );
    let err = other
        .client
        .list(&kvstore::client::ListParams {
            cursor: Some(cursor),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("invalid_request"), "{err}");
    assert!(other.terminate());
}

/// `/metrics` of `server` (a process of its own: the counters of other
/// tests' servers do not mix in), after a write, a read of it and a read of
/// a missing key; stops the server.
async fn cache_metrics_of(mut server: Binary) -> String {
    server
        .client
        .put("k", "v", Condition::Any)
        .await
        .expect("put");
    for key in ["k", "k", "absent"] {
        server.client.get(key).await.expect("get");
    }
    let response = server
        .client
        .send(Method::GET, "/metrics", &[], bytes::Bytes::new())
        .await
        .expect("metrics");
    assert_eq!(response.status, StatusCode::OK);
    assert!(server.terminate());
    String::from_utf8(response.body.to_vec()).expect("UTF-8 metrics")
}

/// The embedded default runs a local cache: its mode is named, and its
/// counters count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_metrics_name_the_local_cache_of_the_embedded_default() {
    let dir = tempfile::tempdir().expect("temp dir");
    let text = cache_metrics_of(Binary::start(dir.path(), &[])).await;
    assert_eq!(
        metric_value(&text, "kvstore_cache_mode{mode=\"local\"}"),
        Some(1.0),
        "{text}"
    );
    assert!(!text.contains("mode=\"off\""), "{text}");
    let hits = metric_value(&text, "kvstore_cache_hits_total").expect("hits");
    let misses = metric_value(&text, "kvstore_cache_misses_total").expect("misses");
    assert!(hits >= 1.0 && misses >= 1.0, "hits {hits}, misses {misses}");
    for series in ["kvstore_cache_evictions_total", "kvstore_cache_entries"] {
        assert!(metric_value(&text, series).is_some(), "{series} missing");
    }
}

/// PostgreSQL runs without a cache by default: the cache's series are there
/// all the same, at zero, and the mode says `off`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(kvstore_test_postgres),
    ignore = "set KVSTORE_TEST_POSTGRES_URL to run it"
)]
async fn cache_metrics_are_zero_without_a_cache_on_postgres() {
    let schema = crate::harness::PgSchema::new();
    let dir = tempfile::tempdir().expect("temp dir");
    let text = cache_metrics_of(crate::multi_server::start(&schema, dir.path(), &[])).await;
    assert_eq!(
        metric_value(&text, "kvstore_cache_mode{mode=\"off\"}"),
        Some(1.0),
        "{text}"
    );
    for series in [
        "kvstore_cache_hits_total",
        "kvstore_cache_misses_total",
        "kvstore_cache_evictions_total",
        "kvstore_cache_entries",
        "kvstore_cache_bytes",
    ] {
        assert_eq!(
            metric_value(&text, series),
            Some(0.0),
            "{series} in:\n{text}"
        );
    }
}
