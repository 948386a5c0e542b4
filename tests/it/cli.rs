//! The `kvstore` binary's client subcommands, run as a user runs them,
//! against a server on an ephemeral port: output, exit codes (0 success,
//! 1 not found or condition failed, 2 usage, 3 server unreachable or 5xx),
//! binary values, export then import, and every bench workload.

use std::process::{Command, Output};
use std::time::Duration;

use crate::harness::{TestServer, output_within};
use serde_json::Value;

/// Runs `kvstore ARGS` against `url` (through `KVSTORE_URL`) with `stdin`
/// as its input, off the async runtime so the in-process server keeps serving.
pub(crate) async fn kvstore(url: &str, args: &[&str], stdin: &[u8]) -> Output {
    let url = url.to_owned();
    let args: Vec<String> = args.iter().map(|&a| a.to_owned()).collect();
    let stdin = stdin.to_vec();
    tokio::task::spawn_blocking(move || {
        let mut command = Command::new(env!("CARGO_BIN_EXE_kvstore"));
        command
            .args(&args)
            .env("KVSTORE_URL", &url)
            .env_remove("RUST_LOG");
        output_within(&mut command, &stdin, Duration::from_secs(120))
    })
    .await
    .expect("join")
}

/// Output of a command that must succeed.
pub(crate) async fn ok(url: &str, args: &[&str], stdin: &[u8]) -> Output {
    let out = kvstore(url, args, stdin).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "kvstore {args:?}\nstdout: {}\nstderr: {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    out
}

/// Stderr of a command that must fail with exit code `code`.
pub(crate) async fn fails(url: &str, args: &[&str], stdin: &[u8], code: i32) -> String {
    let out = kvstore(url, args, stdin).await;
    assert_eq!(
        out.status.code(),
        Some(code),
        "kvstore {args:?}\nstdout: {}\nstderr: {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stderr)
}

pub(crate) fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

pub(crate) fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|err| panic!("{err}: not JSON: {}", text(&out.stdout)))
}

pub(crate) fn lines(out: &Output) -> Vec<String> {
    text(&out.stdout).lines().map(str::to_owned).collect()
}

/// Every byte value, so that any mangling (UTF-8, newlines, NUL) shows.
fn all_bytes() -> Vec<u8> {
    (0..=255u8).chain((0..=255u8).rev()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_put_delete_with_conditions() {
    let server = TestServer::start().await;
    let url = server.base.as_str();

    let out = ok(url, &["put", "users/42", "hello"], b"").await;
    assert_eq!(
        text(&out.stdout),
        "created users/42 (version 1, revision 1)\n"
    );
    // Not a terminal: the exact bytes, no newline added.
    assert_eq!(ok(url, &["get", "users/42"], b"").await.stdout, b"hello");
    let entry = json(&ok(url, &["get", "users/42", "--json"], b"").await);
    assert_eq!(
        (&entry["key"], &entry["value"], &entry["version"]),
        (&"users/42".into(), &"hello".into(), &1.into())
    );

    let out = ok(
        url,
        &["put", "users/42", "v2", "--if-version", "1", "--json"],
        b"",
    )
    .await;
    let answer = json(&out);
    assert_eq!(
        (&answer["version"], &answer["created"]),
        (&2.into(), &false.into())
    );

    let err = fails(url, &["put", "users/42", "v3", "--if-version", "1"], b"", 1).await;
    assert!(
        err.contains("condition failed") && err.contains("version 2"),
        "{err}"
    );
    let err = fails(url, &["put", "users/42", "v3", "--create-only"], b"", 1).await;
    assert!(err.contains("condition failed"), "{err}");
    let out = ok(url, &["put", "fresh", "v", "--create-only"], b"").await;
    assert!(text(&out.stdout).starts_with("created fresh"));

    let err = fails(url, &["delete", "users/42", "--if-version", "1"], b"", 1).await;
    assert!(err.contains("version_mismatch"), "{err}");
    let out = ok(url, &["delete", "users/42", "--if-version", "2"], b"").await;
    assert_eq!(text(&out.stdout), "deleted users/42\n");

    let err = fails(url, &["get", "users/42"], b"", 1).await;
    assert!(
        err.contains("key 'users/42': the key does not exist"),
        "{err}"
    );
    fails(url, &["get", "users/42", "--json"], b"", 1).await;
    let err = fails(url, &["delete", "users/42"], b"", 1).await;
    assert!(err.contains("does not exist"), "{err}");
    assert_eq!(server.client.get("users/42").await.unwrap(), None);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_values_through_stdin_and_file() {
    let server = TestServer::start().await;
    let url = server.base.as_str();
    let value = all_bytes();

    ok(url, &["put", "bin/stdin"], &value).await;
    assert_eq!(ok(url, &["get", "bin/stdin"], b"").await.stdout, value);
    let entry = json(&ok(url, &["get", "bin/stdin", "--json"], b"").await);
    assert!(entry.get("value").is_none() && entry["value_base64"].is_string());

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("value.bin");
    let large: Vec<u8> = value.iter().copied().cycle().take(300_000).collect();
    std::fs::write(&path, &large).unwrap();
    let path = path.to_str().unwrap();
    ok(url, &["put", "bin/file", "--file", path], b"").await;
    assert_eq!(ok(url, &["get", "bin/file"], b"").await.stdout, large);
    // `--file -` is stdin too; an empty value is a value.
    ok(url, &["put", "empty", "--file", "-"], b"").await;
    assert_eq!(ok(url, &["get", "empty"], b"").await.stdout, b"");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_errors_exit_2() {
    let server = TestServer::start().await;
    let url = server.base.as_str();
    fails(url, &["put"], b"", 2).await;
    fails(url, &["put", "k", "v", "--file", "x"], b"", 2).await;
    fails(
        url,
        &["put", "k", "v", "--if-version", "1", "--create-only"],
        b"",
        2,
    )
    .await;
    fails(url, &["list", "--prefix", "a", "--start", "b"], b"", 2).await;
    fails(url, &["list", "--limit", "0"], b"", 2).await;
    fails(url, &["bench", "ycsb-z"], b"", 2).await;
    fails(url, &["nonsense"], b"", 2).await;
    let err = fails(url, &["put", "k", "--file", "/nonexistent/value"], b"", 2).await;
    assert!(err.contains("cannot read /nonexistent/value"), "{err}");
    let err = fails(url, &["batch", "-"], b"{\"ops\": 3}", 2).await;
    assert!(err.contains("is not a batch"), "{err}");
    // Rejected by the server as invalid: the server's message.
    let err = fails(url, &["get", ""], b"", 2).await;
    assert!(err.contains("invalid_key"), "{err}");
    let err = fails(url, &["list", "--limit", "5000"], b"", 2).await;
    assert!(err.contains("invalid_request"), "{err}");
    let err = fails(
        url,
        &["bench", "batch", "--records", "10", "--batch-size", "20"],
        b"",
        2,
    )
    .await;
    assert!(err.contains("--batch-size"), "{err}");
    let err = fails(url, &["get", "k", "--url", "ftp://example"], b"", 2).await;
    assert!(err.contains("expected an http:// or https:// URL"), "{err}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_unreachable_or_failing_exits_3() {
    // A port that was just free: nothing listens there.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    for args in [
        &["get", "k"][..],
        &["put", "k", "v"],
        &["delete", "k"],
        &["list"],
        &["export"],
        &["bench", "read", "--records", "10", "--operations", "10"],
    ] {
        let err = fails(&closed, args, b"", 3).await;
        assert!(err.contains("cannot reach the server"), "{args:?}: {err}");
    }
    // --url wins over KVSTORE_URL.
    let server = TestServer::start().await;
    fails(&server.base, &["get", "k", "--url", &closed], b"", 3).await;

    // A server that answers 503 with the API's error body.
    let app = axum::Router::new().fallback(|| async {
        (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            r#"{"error":{"code":"unavailable","message":"the storage is down"}}"#,
        )
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let failing = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move { axum::serve(listener, app).await });
    let err = fails(&failing, &["get", "k"], b"", 3).await;
    assert!(
        err.contains("the storage is down (503 unavailable)"),
        "{err}"
    );
    fails(&failing, &["put", "k", "v"], b"", 3).await;
    task.abort();
    server.stop().await;
}

/// Writes keys `item00` to `item{n-1}` (values `value{i}`) through the
/// `batch` subcommand.
async fn fill(url: &str, n: usize) {
    let ops: Vec<Value> = (0..n)
        .map(|i| serde_json::json!({"op": "put", "key": format!("item{i:02}"), "value": format!("value{i}")}))
        .collect();
    let body = serde_json::to_vec(&serde_json::json!({ "ops": ops })).unwrap();
    ok(url, &["batch", "-"], &body).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_pages_ranges_and_cursors() {
    let server = TestServer::start().await;
    let url = server.base.as_str();
    fill(url, 25).await;
    ok(url, &["put", "other", "line one\nline two"], b"").await;

    let out = ok(url, &["list", "--prefix", "item", "--limit", "3"], b"").await;
    assert_eq!(
        lines(&out),
        ["item00\tvalue0", "item01\tvalue1", "item02\tvalue2"]
    );
    assert!(text(&out.stderr).contains("--cursor"), "a hint to go on");

    let out = ok(
        url,
        &["list", "--prefix", "item", "--all", "--keys-only"],
        b"",
    )
    .await;
    let expected: Vec<String> = (0..25).map(|i| format!("item{i:02}")).collect();
    assert_eq!(lines(&out), expected);
    assert!(text(&out.stderr).is_empty(), "nothing follows");

    let out = ok(
        url,
        &[
            "list",
            "--start",
            "item10",
            "--end",
            "item13",
            "--reverse",
            "--keys-only",
        ],
        b"",
    )
    .await;
    assert_eq!(lines(&out), ["item12", "item11", "item10"]);

    // A value with a newline stays on its line, escaped.
    let out = ok(url, &["list", "--prefix", "other"], b"").await;
    assert_eq!(lines(&out), ["other\tline one\\nline two"]);

    // --all with --limit: exactly that many, and the cursor to go on from.
    let page = json(
        &ok(
            url,
            &[
                "list", "--prefix", "item", "--all", "--limit", "15", "--json",
            ],
            b"",
        )
        .await,
    );
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 15);
    assert_eq!(items[14]["value"], "value14");
    let cursor = page["next_cursor"].as_str().expect("a cursor").to_owned();
    let rest = json(
        &ok(
            url,
            &[
                "list", "--prefix", "item", "--all", "--cursor", &cursor, "--json",
            ],
            b"",
        )
        .await,
    );
    let rest = rest["items"].as_array().unwrap().clone();
    assert_eq!(rest.len(), 10);
    assert_eq!(rest[0]["key"], "item15");
    assert!(
        json(&ok(url, &["list", "--json", "--prefix", "none"], b"").await)["items"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_from_file_and_stdin() {
    let server = TestServer::start().await;
    let url = server.base.as_str();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("batch.json");
    std::fs::write(
        &path,
        r#"{"ops": [{"op": "put", "key": "a", "value": "1"},
                   {"op": "put", "key": "b", "value_base64": "AAE="},
                   {"op": "delete", "key": "c"}]}"#,
    )
    .unwrap();
    let out = ok(url, &["batch", path.to_str().unwrap()], b"").await;
    assert_eq!(
        text(&out.stdout),
        "applied 3 ops at revision 1\n  put a (version 1)\n  put b (version 1)\n  c did not exist\n"
    );
    assert_eq!(ok(url, &["get", "b"], b"").await.stdout, [0, 1]);

    // A failed condition: exit 1, the failed op named, nothing written.
    let body = br#"{"ops": [{"op": "put", "key": "a", "value": "2"},
                           {"op": "put", "key": "b", "value": "x", "if_version": 7}]}"#;
    let err = fails(url, &["batch", "-"], body, 1).await;
    assert!(
        err.contains("version_mismatch") && err.contains("failed: [1]"),
        "{err}"
    );
    assert_eq!(ok(url, &["get", "a"], b"").await.stdout, b"1");

    let body = br#"{"ops": [{"op": "delete", "key": "a", "if_version": 1}]}"#;
    let answer = json(&ok(url, &["batch", "-", "--json"], body).await);
    assert_eq!(
        answer["results"][0],
        serde_json::json!({"key": "a", "deleted": true})
    );
    server.stop().await;
}

/// Every key with its value, through the library client.
async fn contents(server: &TestServer) -> Vec<(String, Option<String>, Option<String>)> {
    let mut pages = server.client.pages(kvstore::client::ListParams::default());
    let mut all = Vec::new();
    while let Some(items) = pages.next_page().await.unwrap() {
        all.extend(items.into_iter().map(|e| (e.key, e.value, e.value_base64)));
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_then_import_round_trips() {
    let source = TestServer::start().await;
    let from = source.base.as_str();
    fill(from, 25).await;
    ok(from, &["put", "bin/all", "--file", "-"], &all_bytes()).await;
    ok(from, &["put", "unicode/ключ 🔑", "значение"], b"").await;
    ok(from, &["put", "empty"], b"").await;
    // Written twice: the dump has version 2, the import starts at 1.
    ok(from, &["put", "item00", "changed"], b"").await;

    let dump = ok(from, &["export"], b"").await;
    assert!(
        text(&dump.stderr).contains("exported 28 keys"),
        "{}",
        text(&dump.stderr)
    );
    let first: Value = serde_json::from_str(&lines(&dump)[0]).unwrap();
    assert_eq!(first["key"], "bin/all");
    assert!(first["value_base64"].is_string() && first["revision"].is_u64());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dump.ndjson");
    std::fs::write(&path, &dump.stdout).unwrap();
    let path = path.to_str().unwrap();

    let target = TestServer::start().await;
    let to = target.base.as_str();
    let out = ok(to, &["import", path, "--batch-size", "10"], b"").await;
    assert_eq!(text(&out.stdout), "imported 28 keys in 3 batches\n");
    assert_eq!(contents(&target).await, contents(&source).await);
    assert_eq!(ok(to, &["get", "bin/all"], b"").await.stdout, all_bytes());

    // Twice: the same values (new versions).
    let summary = json(&ok(to, &["import", path, "--json"], b"").await);
    assert_eq!(
        summary,
        serde_json::json!({"imported": 28, "batches": 1, "skipped": 0})
    );
    assert_eq!(contents(&target).await, contents(&source).await);
    assert_eq!(
        target.client.get("item00").await.unwrap().unwrap().version,
        2
    );

    // From stdin, one prefix; a key twice in a dump goes to two batches.
    let third = TestServer::start().await;
    let items = ok(from, &["export", "--prefix", "item"], b"").await;
    assert_eq!(lines(&items).len(), 25);
    let mut input = items.stdout.clone();
    input.extend_from_slice(b"{\"key\":\"item01\",\"value\":\"last wins\"}\n\n");
    let out = ok(&third.base, &["import", "-"], &input).await;
    assert_eq!(text(&out.stdout), "imported 26 keys in 2 batches\n");
    assert_eq!(
        ok(&third.base, &["get", "item01"], b"").await.stdout,
        b"last wins"
    );

    let err = fails(
        &third.base,
        &["import", "-"],
        b"{\"key\":\"a\",\"value\":\"1\"}\nnot json\n",
        2,
    )
    .await;
    assert!(err.contains("line 2: not a dump record"), "{err}");
    for server in [source, target, third] {
        server.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_runs_every_workload() {
    let server = TestServer::start().await;
    let url = server.base.as_str();
    let workloads = [
        "ycsb-a", "ycsb-b", "ycsb-c", "ycsb-d", "ycsb-e", "ycsb-f", "read", "write", "batch",
        "range",
    ];
    for (i, workload) in workloads.into_iter().enumerate() {
        let mut args = vec![
            "bench",
            workload,
            "--records",
            "300",
            "--operations",
            "200",
            "--concurrency",
            "3",
            "--batch-size",
            "20",
            "--value-size",
            "50",
            "--json",
        ];
        // The load phase only once: later runs use the same records.
        if i > 0 {
            args.push("--skip-load");
        }
        let out = ok(url, &args, b"").await;
        let report = json(&out);
        assert_eq!(report["workload"], workload);
        assert_eq!(report["load"].is_null(), i > 0, "{workload}");
        let total = &report["total"];
        assert_eq!(total["count"], 200, "{workload}: {report}");
        assert_eq!(total["errors"], 0, "{workload}: {report}");
        assert_eq!(
            report["operations"][0]["missing"], 0,
            "{workload}: {report}"
        );
        for field in ["p50", "p90", "p99", "p99_9", "max"] {
            assert!(
                total["latency_us"][field].as_f64().unwrap() > 0.0,
                "{workload} {field}"
            );
        }
        let ops: Vec<&str> = report["operations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|op| op["op"].as_str().unwrap())
            .collect();
        let expected: &[&str] = match workload {
            "ycsb-a" | "ycsb-b" => &["read", "update"],
            "ycsb-c" | "read" => &["read"],
            "ycsb-d" => &["read", "insert"],
            "ycsb-e" => &["insert", "scan"],
            "ycsb-f" => &["read", "read-modify-write"],
            "write" => &["update"],
            "batch" => &["batch"],
            _ => &["scan"],
        };
        // Small shares (5%) may not come up in 200 operations.
        assert!(
            ops.iter().all(|op| expected.contains(op)),
            "{workload}: {ops:?}"
        );
        assert!(ops.contains(&expected[0]) || ops.contains(&expected[expected.len() - 1]));
    }
    let params = kvstore::client::ListParams {
        prefix: Some("bench/".into()),
        limit: Some(1000),
        keys_only: true,
        ..Default::default()
    };
    assert!(server.client.list(&params).await.unwrap().items.len() >= 300);

    // The table, by time instead of a count.
    let out = ok(
        url,
        &[
            "bench",
            "write",
            "--records",
            "50",
            "--duration",
            "300ms",
            "--concurrency",
            "2",
        ],
        b"",
    )
    .await;
    let table = text(&out.stdout);
    assert!(
        table.contains("write (100% update), uniform keys; 50 records"),
        "{table}"
    );
    assert!(
        table.contains("p99.9 ms") && table.contains("\nupdate ") && table.contains("\nall "),
        "{table}"
    );
    assert!(table.contains("client CPU"), "{table}");
    server.stop().await;
}
