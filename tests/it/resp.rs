//! The Redis protocol front door (`--resp-listen`), with the Rust `redis`
//! client and with raw bytes where the exact frames matter: one keyspace
//! with the HTTP API, expiry, pipelining, RESP3, errors worded as Redis
//! words them, and auth.

use std::sync::Arc;
use std::time::Duration;

use redis::AsyncCommands as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::harness::{TestServer, tool, within};
use kvstore::server::{Auth, TokenRules};
use kvstore::server::{RespConfig, Security};

async fn connection(server: &TestServer, resp3: bool) -> redis::aio::MultiplexedConnection {
    let addr = server.resp_addr.expect("a RESP address");
    let protocol = if resp3 { "?protocol=resp3" } else { "" };
    let client = redis::Client::open(format!("redis://{addr}/{protocol}")).expect("client");
    within(
        10,
        "a RESP connection",
        client.get_multiplexed_async_connection(),
    )
    .await
    .expect("connect")
}

/// Sends `request` as it is and reads until `expect` bytes came, or the
/// server closed the connection (`usize::MAX`: until then, after a QUIT or
/// an error); gives what came.
async fn raw(server: &TestServer, request: &[u8], expect: usize) -> Vec<u8> {
    let addr = server.resp_addr.expect("a RESP address");
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write");
    let mut got = Vec::new();
    within(10, "the replies", async {
        let mut buf = [0u8; 4096];
        while got.len() < expect {
            let n = stream.read(&mut buf).await.expect("read");
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    got
}

for_each_backend! {

async fn strings_are_the_http_api_keys_with_their_versions() {
    let server = TestServer::start_with_resp(Security::default(), |_| {}).await;
    let mut redis = connection(&server, false).await;
    let c = &server.client;
    let _: () = redis.set("greeting", "hello").await.unwrap();
    let entry = c.get("greeting").await.unwrap().expect("written over RESP");
    assert_eq!((entry.value.as_deref(), entry.version), (Some("hello"), 1));
    c.put("from-http", "v", kvstore::storage::Condition::Any).await.unwrap();
    let got: Option<String> = redis.get("from-http").await.unwrap();
    assert_eq!(got.as_deref(), Some("v"));
    let _: () = redis.set("greeting", "again").await.unwrap();
    assert_eq!(c.get("greeting").await.unwrap().expect("kept").version, 2);

    let _: () = redis.mset(&[("a", "1"), ("b", "2")]).await.unwrap();
    let both: Vec<Option<String>> = redis.mget(&["a", "b", "missing"]).await.unwrap();
    assert_eq!(both, vec![Some("1".into()), Some("2".into()), None]);
    let n: i64 = redis.incr("a", 41).await.unwrap();
    assert_eq!(n, 42);
    let n: i64 = redis.decr("counter", 2).await.unwrap();
    assert_eq!(n, -2);
    let len: i64 = redis.append("b", "34").await.unwrap();
    assert_eq!(len, 3);
    let len: i64 = redis.strlen("b").await.unwrap();
    assert_eq!(len, 3);
    let set: bool = redis.set_nx("a", "x").await.unwrap();
    assert!(!set);
    let old: Option<String> = redis::cmd("GETSET").arg("b").arg("new").query_async(&mut redis).await.unwrap();
    assert_eq!(old.as_deref(), Some("234"));
    let old: Option<String> = redis::cmd("GETDEL").arg("b").query_async(&mut redis).await.unwrap();
    assert_eq!(old.as_deref(), Some("new"));
    assert!(c.get("b").await.unwrap().is_none());
    let kind: String = redis::cmd("TYPE").arg("a").query_async(&mut redis).await.unwrap();
    assert_eq!(kind, "string");
    let exists: i64 = redis.exists(&["a", "a", "b"]).await.unwrap();
    assert_eq!(exists, 2);
    let deleted: i64 = redis.del(&["a", "a", "b", "greeting"]).await.unwrap();
    assert_eq!(deleted, 2);
    let old: Option<String> = redis::cmd("SET").arg("x").arg("1").arg("GET").query_async(&mut redis).await.unwrap();
    assert_eq!(old, None);
    let old: Option<String> = redis::cmd("SET").arg("x").arg("2").arg("NX").arg("GET").query_async(&mut redis).await.unwrap();
    assert_eq!(old.as_deref(), Some("1"), "NX with GET: the old value, nothing set");
    let x: String = redis.get("x").await.unwrap();
    assert_eq!(x, "1");
    let size: i64 = redis::cmd("DBSIZE").query_async(&mut redis).await.unwrap();
    assert_eq!(size, 3, "from-http, counter, x");
}

async fn deadlines_are_the_entries_deadlines() {
    let server = TestServer::start_with_resp(Security::default(), |_| {}).await;
    let mut redis = connection(&server, false).await;
    let c = &server.client;
    let _: () = redis.set_ex("session", "s", 100).await.unwrap();
    let ttl: i64 = redis.ttl("session").await.unwrap();
    assert!((99..=100).contains(&ttl), "{ttl}");
    assert!(c.get("session").await.unwrap().expect("there").expires_at.is_some());
    let _: () = redis::cmd("SET").arg("session").arg("t").arg("KEEPTTL").query_async(&mut redis).await.unwrap();
    let pttl: i64 = redis.pttl("session").await.unwrap();
    assert!(pttl > 90_000, "{pttl}");
    // GT: no deadline counts as infinite; LT sets a shorter one.
    let set: i64 = redis::cmd("EXPIRE").arg("session").arg(500).arg("GT").query_async(&mut redis).await.unwrap();
    assert_eq!(set, 1);
    let set: i64 = redis::cmd("EXPIRE").arg("session").arg(1000).arg("LT").query_async(&mut redis).await.unwrap();
    assert_eq!(set, 0);
    let persisted: bool = redis.persist("session").await.unwrap();
    assert!(persisted);
    let ttl: i64 = redis.ttl("session").await.unwrap();
    assert_eq!(ttl, -1);
    let set: i64 = redis::cmd("EXPIRE").arg("session").arg(10).arg("XX").query_async(&mut redis).await.unwrap();
    assert_eq!(set, 0, "XX on a key without a deadline");
    let ttl: i64 = redis.ttl("nothing").await.unwrap();
    assert_eq!(ttl, -2);
    // A deadline in the past deletes the key.
    let set: i64 = redis::cmd("EXPIREAT").arg("session").arg(1).query_async(&mut redis).await.unwrap();
    assert_eq!(set, 1);
    assert!(c.get("session").await.unwrap().is_none());
    let _: () = redis::cmd("SET").arg("brief").arg("b").arg("PX").arg(200).query_async(&mut redis).await.unwrap();
    within(10, "the key to expire", async {
        loop {
            let gone: Option<String> = redis.get("brief").await.unwrap();
            if gone.is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

async fn errors_are_worded_as_redis_words_them() {
    let server = TestServer::start_with_resp(Security::default(), |_| {}).await;
    let mut redis = connection(&server, false).await;
    let error = |result: redis::RedisResult<redis::Value>| result.expect_err("an error").to_string();
    let unknown = error(redis::cmd("NOSUCH").arg("a").query_async(&mut redis).await);
    assert!(unknown.contains("unknown command 'NOSUCH', with args beginning with: 'a'"), "{unknown}");
    let arity = error(redis::cmd("GET").query_async(&mut redis).await);
    assert!(arity.contains("wrong number of arguments for 'get' command"), "{arity}");
    let _: () = redis.set("text", "abc").await.unwrap();
    let not_int = error(redis::cmd("INCR").arg("text").query_async(&mut redis).await);
    assert!(not_int.contains("value is not an integer or out of range"), "{not_int}");
    let db = error(redis::cmd("SELECT").arg(1).query_async(&mut redis).await);
    assert!(db.contains("DB index is out of range"), "{db}");
    let key = error(redis::cmd("SET").arg(b"a\0b".as_slice()).arg("v").query_async(&mut redis).await);
    assert!(key.contains("invalid key"), "{key}");
    let syntax = error(redis::cmd("SET").arg("k").arg("v").arg("EX").query_async(&mut redis).await);
    assert!(syntax.contains("syntax error"), "{syntax}");
    let expire = error(redis::cmd("SET").arg("k").arg("v").arg("EX").arg(0).query_async(&mut redis).await);
    assert!(expire.contains("invalid expire time in 'set' command"), "{expire}");
    // Nothing of the above wrote anything.
    let size: i64 = redis::cmd("DBSIZE").query_async(&mut redis).await.unwrap();
    assert_eq!(size, 1);
}

async fn a_pipeline_is_answered_in_order_and_sees_its_own_writes() {
    let server = TestServer::start_with_resp(Security::default(), |_| {}).await;
    let request = b"*3\r\n$3\r\nSET\r\n$1\r\np\r\n$1\r\n1\r\n*2\r\n$4\r\nINCR\r\n$1\r\np\r\n*2\r\n$3\r\nGET\r\n$1\r\np\r\nPING\r\n";
    let expected = b"+OK\r\n:2\r\n$1\r\n2\r\n+PONG\r\n";
    let got = raw(&server, request, expected.len()).await;
    assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(expected));
}

async fn hello_3_speaks_resp3_and_inline_commands_work() {
    let server = TestServer::start_with_resp(Security::default(), |_| {}).await;
    let got = raw(&server, b"HELLO 3\r\nGET nothing\r\nQUIT\r\n", usize::MAX).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("%7\r\n$6\r\nserver\r\n"), "{text}");
    assert!(text.contains("$5\r\nproto\r\n:3\r\n"), "{text}");
    assert!(text.ends_with("_\r\n+OK\r\n"), "a RESP3 null, then QUIT's OK: {text}");
    let mut redis = connection(&server, true).await;
    let _: () = redis.set("k", "v").await.unwrap();
    let v: String = redis.get("k").await.unwrap();
    assert_eq!(v, "v");
}

async fn a_malformed_frame_gets_a_protocol_error_and_the_connection_closes() {
    let server = TestServer::start_with_resp(Security::default(), |_| {}).await;
    // Read until the server closes: the reply, then end of stream.
    let got = raw(&server, b"*1\r\n$x\r\nPING\r\n", usize::MAX).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("-ERR Protocol error: "), "{text}");
}

}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auth_on_commands_need_a_token_and_its_rights() {
    let rules = TokenRules::parse(
        r#"
[[token]]
name = "app"
token = "app-token"
read = ["users/"]
write = ["users/"]
"#,
        false,
    )
    .expect("rules");
    let mut security = Security::default();
    security.auth = Some(Arc::new(Auth::from_rules(rules, false)));
    let server = TestServer::start_with_resp(security, |_| {}).await;
    let request = b"GET users/1\r\nAUTH wrong\r\nAUTH app app-token\r\nSET users/1 v\r\nSET other v\r\nGET users/1\r\nQUIT\r\n";
    let got = raw(&server, request, usize::MAX).await;
    let text = String::from_utf8_lossy(&got);
    let lines: Vec<&str> = text.split("\r\n").filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), 8, "{text}");
    assert!(lines[0].starts_with("-NOAUTH"), "{text}");
    assert!(lines[1].starts_with("-WRONGPASS"), "{text}");
    assert_eq!(&lines[2..4], ["+OK", "+OK"], "{text}");
    assert!(
        lines[4].starts_with("-NOPERM token 'app' may not write key 'other'"),
        "{text}"
    );
    assert_eq!(&lines[5..], ["$1", "v", "+OK"], "{text}");
}

/// Runs a command (at most 120 s); gives its stdout, failing the test on a
/// non-zero exit.
fn run_tool(program: &str, args: &[String]) -> String {
    let output = crate::harness::output_within(
        std::process::Command::new(program).args(args),
        b"",
        Duration::from_secs(120),
    );
    let out = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{program} {args:?}: {}\n{out}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cli_and_redis_benchmark_work() {
    let Some(()) = tool("redis-cli", "apt-get install -y redis-tools") else {
        return;
    };
    let server = TestServer::start_with_resp(Security::default(), |_| {}).await;
    let port = server.resp_addr.expect("RESP").port().to_string();
    let (set, get, incr, report) = tokio::task::spawn_blocking(move || {
        let cli = |args: &[&str]| {
            let mut all = vec!["-p".to_owned(), port.clone()];
            all.extend(args.iter().map(|a| (*a).to_owned()));
            run_tool("redis-cli", &all).trim().to_owned()
        };
        let bench: Vec<String> = [
            "-p",
            &port,
            "-t",
            "set,get,ping",
            "-n",
            "2000",
            "-c",
            "8",
            "-q",
        ]
        .iter()
        .map(|a| (*a).to_owned())
        .collect();
        (
            cli(&["SET", "tool", "ok"]),
            cli(&["GET", "tool"]),
            cli(&["INCR", "hits"]),
            run_tool("redis-benchmark", &bench),
        )
    })
    .await
    .unwrap();
    assert_eq!(
        (set.as_str(), get.as_str(), incr.as_str()),
        ("OK", "ok", "1")
    );
    for test in ["SET", "GET", "PING_INLINE", "PING_MBULK"] {
        assert!(
            report.contains(&format!("{test}: ")) && report.contains("requests per second"),
            "{test}: {report}"
        );
    }
    // redis-benchmark's SETs are real writes, which the HTTP API reads.
    let written = server.client.get("key:__rand_int__").await.unwrap();
    assert_eq!(written.expect("written").value.map(|v| v.len()), Some(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_py_works_over_resp2_and_resp3() {
    let Some(()) = tool("python3", "apt-get install -y python3 python3-venv") else {
        return;
    };
    let server = TestServer::start_with_resp(Security::default(), |_| {}).await;
    let port = server.resp_addr.expect("RESP").port().to_string();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tools/redis-py/run");
    let out = tokio::task::spawn_blocking(move || run_tool(script, &[port]))
        .await
        .unwrap();
    assert!(out.contains("RESP2 and RESP3 ok"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ioredis_works() {
    let Some(()) = tool("npm", "apt-get install -y nodejs npm") else {
        return;
    };
    let server = TestServer::start_with_resp(Security::default(), |_| {}).await;
    let port = server.resp_addr.expect("RESP").port().to_string();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tools/ioredis/run");
    let out = tokio::task::spawn_blocking(move || run_tool(script, &[port]))
        .await
        .unwrap();
    assert!(out.contains("ioredis ok"), "{out}");
}

/// SIGKILL of the real binary while RESP clients pipeline writes: after a
/// restart, every write that was acknowledged is there, with its value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_resp_writes_survive_sigkill() {
    use crate::harness::Binary;
    use std::collections::HashMap;
    use std::sync::Mutex;
    let dir = tempfile::tempdir().expect("temp dir");
    // A free port for RESP (the harness reads the HTTP address from the log).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let resp = format!("127.0.0.1:{port}");
    let mut server = Binary::start(dir.path(), &["--resp-listen", &resp]);
    let client = redis::Client::open(format!("redis://{resp}/")).expect("client");
    let acked: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let mut writers = Vec::new();
    for writer in 0..4 {
        let mut connection = within(
            10,
            "a RESP connection",
            client.get_multiplexed_async_connection(),
        )
        .await
        .expect("connect");
        let acked = Arc::clone(&acked);
        writers.push(tokio::spawn(async move {
            for n in 0u64.. {
                // Eight at a time on one connection: a pipeline.
                let mut pipe = redis::pipe();
                let batch: Vec<(String, String)> = (0..8)
                    .map(|i| {
                        (
                            format!("w{writer}/k{}", (n * 8 + i) % 200),
                            format!("n{n}-{i}"),
                        )
                    })
                    .collect();
                for (key, value) in &batch {
                    pipe.set(key, value).ignore();
                }
                if pipe.query_async::<()>(&mut connection).await.is_err() {
                    return;
                }
                acked.lock().unwrap().extend(batch);
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.child.kill().expect("SIGKILL");
    server.wait();
    for writer in writers {
        within(30, "the writers to stop", writer)
            .await
            .expect("writer");
    }
    let server = Binary::start(dir.path(), &[]);
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 100,
        "too few writes acknowledged: {}",
        acked.len()
    );
    for (key, value) in acked {
        let entry = server
            .client
            .get(&key)
            .await
            .expect("get")
            .expect("acknowledged");
        // A later write of the key may have landed without its answer.
        let got = entry.value.unwrap_or_default();
        let (written, got_n) = (
            value.split('-').next().unwrap_or_default().to_owned(),
            got.split('-').next().unwrap_or_default().to_owned(),
        );
        let order = |v: &str| v.trim_start_matches('n').parse::<u64>().unwrap_or(0);
        assert!(
            order(&got_n) >= order(&written),
            "{key}: acknowledged {value}, found {got}"
        );
    }
}

/// A pipeline of writes reaches the store in one call and is committed in
/// one group, under one sync: the commit hook counts the syncs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_of_writes_shares_one_sync() {
    use kvstore::storage::embedded::CommitEvent;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let commits = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&commits);
    let server = TestServer::start_with_resp(Security::default(), move |engine| {
        engine.commit_hook = Some(Arc::new(move |event: &CommitEvent| {
            if matches!(event, CommitEvent::Synced { .. }) {
                counted.fetch_add(1, Ordering::SeqCst);
            }
        }));
    })
    .await;
    let mut request = Vec::new();
    for i in 0..50 {
        request.extend_from_slice(
            format!("*3\r\n$3\r\nSET\r\n$4\r\np{i:03}\r\n$1\r\nv\r\n").as_bytes(),
        );
    }
    request.extend_from_slice(b"*2\r\n$3\r\nGET\r\n$4\r\np049\r\n");
    let expected = "+OK\r\n".repeat(50) + "$1\r\nv\r\n";
    let before = commits.load(Ordering::SeqCst);
    let got = raw(&server, &request, expected.len()).await;
    assert_eq!(String::from_utf8_lossy(&got), expected);
    let used = commits.load(Ordering::SeqCst) - before;
    // One read of the 50 commands gives one group; a read split by TCP may
    // give a few. One per write would be 50.
    assert!(
        (1..=3).contains(&used),
        "{used} syncs for a pipeline of 50 writes"
    );
}

/// On PostgreSQL a pipeline whose writes cannot all go in one transaction
/// (here one meets an expired key) is answered all the same, write by
/// write, and counted as a retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(kvstore_test_postgres),
    ignore = "set KVSTORE_TEST_POSTGRES_URL to run it"
)]
async fn on_postgres_a_pipeline_made_one_write_at_a_time_is_counted() {
    crate::harness::Backend::Postgres
        .run(async {
            let server = TestServer::start_with_resp(Security::default(), |_| {}).await;
            let retries = || async {
                let text = crate::requests::get(&server.client, "/metrics").await;
                String::from_utf8_lossy(&text.body)
                    .lines()
                    .find_map(|line| {
                        line.strip_prefix("kvstore_postgres_retries_total{cause=\"pipeline\"} ")
                    })
                    .map_or(0.0, |n| n.parse::<f64>().expect("a count"))
            };
            let expected = "+OK\r\n";
            let got = raw(&server, b"SET e old PX 1\r\n", expected.len()).await;
            assert_eq!(String::from_utf8_lossy(&got), expected);
            tokio::time::sleep(Duration::from_millis(20)).await;
            let before = retries().await;
            let request = b"SET a 1\r\nSET e new NX\r\nSET b 1\r\nGET e\r\n";
            let expected = "+OK\r\n+OK\r\n+OK\r\n$3\r\nnew\r\n";
            let got = raw(&server, request, expected.len()).await;
            assert_eq!(String::from_utf8_lossy(&got), expected);
            assert!(retries().await > before, "the fallback was not counted");
        })
        .await;
}

/// SCAN, KEYS, RANDOMKEY, RENAME, COPY, GETRANGE, SETRANGE, FLUSHDB
/// (`src/resp/keyspace.rs`).
mod keyspace {
    use std::collections::{BTreeSet, HashMap};

    use super::*;
    use kvstore::storage::{Condition, Expiry};

    fn error(result: redis::RedisResult<redis::Value>) -> String {
        result.expect_err("an error").to_string()
    }

    /// Every key a SCAN loop returns, with how often, and how many calls
    /// it took.
    async fn scan_all(
        redis: &mut redis::aio::MultiplexedConnection,
        options: &[&str],
    ) -> (HashMap<String, usize>, usize) {
        let (mut seen, mut calls, mut cursor) = (HashMap::new(), 0, 0u64);
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg(options)
                .query_async(redis)
                .await
                .unwrap();
            calls += 1;
            for key in keys {
                *seen.entry(key).or_insert(0) += 1;
            }
            if next == 0 {
                return (seen, calls);
            }
            cursor = next;
        }
    }

    for_each_backend! {

    async fn scan_returns_every_key_once_with_match_count_and_type() {
        let server = TestServer::start_with_resp(Security::default(), |_| {}).await;
        let mut redis = connection(&server, false).await;
        let scanned: Vec<(String, String)> =
            (0..2500).map(|i| (format!("scan:{i:04}"), i.to_string())).collect();
        let others: Vec<(String, String)> =
            (0..300).map(|i| (format!("other:{i}"), "o".to_owned())).collect();
        let _: () = redis.mset(&scanned).await.unwrap();
        let _: () = redis.mset(&others).await.unwrap();

        // A literal prefix: only those keys, each once, about 25 calls.
        let (seen, calls) = scan_all(&mut redis, &["MATCH", "scan:*", "COUNT", "100"]).await;
        assert_eq!(seen.len(), 2500);
        assert!(seen.values().all(|n| *n == 1), "a key came twice");
        assert!((25..=27).contains(&calls), "{calls} calls");
        // No literal prefix: every key is read, the pattern filters.
        let (seen, _) = scan_all(&mut redis, &["MATCH", "*7", "COUNT", "100"]).await;
        let expected: BTreeSet<String> = scanned
            .iter()
            .chain(&others)
            .map(|(k, _)| k.clone())
            .filter(|k| k.ends_with('7'))
            .collect();
        assert_eq!(seen.keys().cloned().collect::<BTreeSet<_>>(), expected);
        assert!(seen.values().all(|n| *n == 1), "a key came twice");
        let (seen, _) = scan_all(&mut redis, &["COUNT", "1000", "TYPE", "string"]).await;
        assert_eq!(seen.len(), 2800);
        let (seen, _) = scan_all(&mut redis, &["COUNT", "1000", "TYPE", "hash"]).await;
        assert!(seen.is_empty());

        // The redis crate's iterator (COUNT left at its default of 10).
        let mut iter = redis.scan_match::<_, String>("other:*").await.unwrap();
        let mut got = Vec::new();
        while let Some(key) = iter.next_item().await {
            got.push(key);
        }
        drop(iter);
        got.sort();
        let mut want: Vec<String> = others.iter().map(|(k, _)| k.clone()).collect();
        want.sort();
        assert_eq!(got, want);

        // A cursor this connection never gave starts again from the start.
        let (_, first): (u64, Vec<String>) = redis::cmd("SCAN").arg(0).arg("COUNT").arg(3).query_async(&mut redis).await.unwrap();
        let (_, unknown): (u64, Vec<String>) = redis::cmd("SCAN").arg(123_456_789u64).arg("COUNT").arg(3).query_async(&mut redis).await.unwrap();
        assert_eq!(first, unknown);
        assert_eq!(first, ["other:0", "other:1", "other:10"]);
        let bad = error(redis::cmd("SCAN").arg("x").query_async(&mut redis).await);
        assert!(bad.contains("invalid cursor"), "{bad}");
        let bad = error(redis::cmd("SCAN").arg(0).arg("COUNT").arg(0).query_async(&mut redis).await);
        assert!(bad.contains("syntax error"), "{bad}");
        let bad = error(redis::cmd("SCAN").arg(0).arg("MATCH").query_async(&mut redis).await);
        assert!(bad.contains("syntax error"), "{bad}");
        let bad = error(redis::cmd("SCAN").query_async(&mut redis).await);
        assert!(bad.contains("wrong number of arguments for 'scan' command"), "{bad}");
    }

    async fn keys_and_randomkey_list_what_is_there() {
        let server = TestServer::start_with_resp(Security::default(), |_| {}).await;
        let mut redis = connection(&server, false).await;
        let none: Option<String> = redis::cmd("RANDOMKEY").query_async(&mut redis).await.unwrap();
        assert_eq!(none, None);
        let none: Vec<String> = redis.keys("*").await.unwrap();
        assert!(none.is_empty());
        let all = ["a", "b", "h*llo", "hello", "user:1", "user:2"];
        let pairs: Vec<(&str, &str)> = all.iter().map(|k| (*k, "v")).collect();
        let _: () = redis.mset(&pairs).await.unwrap();
        let keys: Vec<String> = redis.keys("*").await.unwrap();
        assert_eq!(keys, all, "every key, in key order");
        let keys: Vec<String> = redis.keys("user:*").await.unwrap();
        assert_eq!(keys, ["user:1", "user:2"]);
        let keys: Vec<String> = redis.keys("h\\*llo").await.unwrap();
        assert_eq!(keys, ["h*llo"]);
        let keys: Vec<String> = redis.keys("h[a-f]llo").await.unwrap();
        assert_eq!(keys, ["hello"]);
        let keys: Vec<String> = redis.keys("?").await.unwrap();
        assert_eq!(keys, ["a", "b"]);
        let bad = error(redis::cmd("KEYS").query_async(&mut redis).await);
        assert!(bad.contains("wrong number of arguments for 'keys' command"), "{bad}");

        let mut picked = BTreeSet::new();
        for _ in 0..200 {
            let key: String = redis::cmd("RANDOMKEY").query_async(&mut redis).await.unwrap();
            assert!(all.contains(&key.as_str()), "{key}");
            picked.insert(key);
        }
        assert!(picked.len() >= 3, "{picked:?}");
        // One key: that one.
        let _: i64 = redis.del(&all[1..]).await.unwrap();
        let key: String = redis::cmd("RANDOMKEY").query_async(&mut redis).await.unwrap();
        assert_eq!(key, "a");
    }

    async fn rename_and_copy_move_values_and_deadlines() {
        let server = TestServer::start_with_resp(Security::default(), |_| {}).await;
        let mut redis = connection(&server, false).await;
        let c = &server.client;
        let missing = error(redis::cmd("RENAME").arg("nothing").arg("x").query_async(&mut redis).await);
        assert!(missing.contains("no such key"), "{missing}");
        let missing = error(redis::cmd("RENAMENX").arg("nothing").arg("x").query_async(&mut redis).await);
        assert!(missing.contains("no such key"), "{missing}");
        let arity = error(redis::cmd("RENAME").arg("nothing").query_async(&mut redis).await);
        assert!(arity.contains("wrong number of arguments for 'rename' command"), "{arity}");

        // RENAME keeps the deadline.
        let _: () = redis.set_ex("src", "v", 100).await.unwrap();
        let _: () = redis.rename("src", "dst").await.unwrap();
        let gone: Option<String> = redis.get("src").await.unwrap();
        assert_eq!(gone, None);
        let moved: String = redis.get("dst").await.unwrap();
        assert_eq!(moved, "v");
        let pttl: i64 = redis.pttl("dst").await.unwrap();
        assert!((95_000..=100_000).contains(&pttl), "{pttl}");
        // Onto itself: nothing written, as in Redis.
        let version = c.get("dst").await.unwrap().expect("there").version;
        let _: () = redis.rename("dst", "dst").await.unwrap();
        let same: i64 = redis::cmd("RENAMENX").arg("dst").arg("dst").query_async(&mut redis).await.unwrap();
        assert_eq!(same, 0);
        assert_eq!(c.get("dst").await.unwrap().expect("there").version, version);

        // RENAMENX onto a key that exists: nothing; RENAME overwrites it,
        // and a key without a deadline stays without one.
        let _: () = redis.set("other", "x").await.unwrap();
        let moved: bool = redis.rename_nx("dst", "other").await.unwrap();
        assert!(!moved);
        let _: () = redis.set("plain", "p").await.unwrap();
        let _: () = redis.rename("plain", "other").await.unwrap();
        let other: String = redis.get("other").await.unwrap();
        assert_eq!(other, "p");
        let ttl: i64 = redis.ttl("other").await.unwrap();
        assert_eq!(ttl, -1);
        let moved: bool = redis.rename_nx("other", "fresh").await.unwrap();
        assert!(moved);

        // COPY: 1 or 0, REPLACE, DB 0 only, and the deadline copied.
        let copy = |args: &[&str]| {
            let mut cmd = redis::cmd("COPY");
            cmd.arg(args);
            cmd
        };
        let n: i64 = copy(&["dst", "c1"]).query_async(&mut redis).await.unwrap();
        assert_eq!(n, 1);
        let pttl: i64 = redis.pttl("c1").await.unwrap();
        assert!((90_000..=100_000).contains(&pttl), "{pttl}");
        let n: i64 = copy(&["fresh", "c1"]).query_async(&mut redis).await.unwrap();
        assert_eq!(n, 0, "the destination exists");
        let n: i64 = copy(&["fresh", "c1", "REPLACE", "DB", "0"]).query_async(&mut redis).await.unwrap();
        assert_eq!(n, 1);
        let c1: String = redis.get("c1").await.unwrap();
        assert_eq!(c1, "p");
        let ttl: i64 = redis.ttl("c1").await.unwrap();
        assert_eq!(ttl, -1, "REPLACE takes the source's (no) deadline");
        let src: String = redis.get("fresh").await.unwrap();
        assert_eq!(src, "p", "the source stays");
        let n: i64 = copy(&["nothing", "c2"]).query_async(&mut redis).await.unwrap();
        assert_eq!(n, 0);
        let same = error(copy(&["c1", "c1"]).query_async(&mut redis).await);
        assert!(same.contains("source and destination objects are the same"), "{same}");
        let db = error(copy(&["c1", "c2", "DB", "1"]).query_async(&mut redis).await);
        assert!(db.contains("DB index is out of range"), "{db}");
        let syntax = error(copy(&["c1", "c2", "NOW"]).query_async(&mut redis).await);
        assert!(syntax.contains("syntax error"), "{syntax}");

        // A key on a lease stays on it when renamed; a copy takes the
        // lease's deadline as its own.
        let lease = c.grant_lease(60_000).await.unwrap();
        let id = kvstore::types::parse_lease_id(&lease.lease).unwrap();
        c.put_with("leased", "l", Condition::Any, Expiry::Lease(id)).await.unwrap();
        let _: () = redis.rename("leased", "still-leased").await.unwrap();
        let entry = c.get("still-leased").await.unwrap().expect("moved");
        assert_eq!(entry.lease.as_deref(), Some(lease.lease.as_str()));
        let n: i64 = copy(&["still-leased", "copied"]).query_async(&mut redis).await.unwrap();
        assert_eq!(n, 1);
        let entry = c.get("copied").await.unwrap().expect("copied");
        assert_eq!(entry.lease, None);
        assert!(entry.expires_at.is_some());
    }

    async fn concurrent_renames_never_duplicate_or_lose_the_key() {
        let server = TestServer::start_with_resp(Security::default(), |_| {}).await;
        let mut redis = connection(&server, false).await;
        let _: () = redis.set("k0", "the one").await.unwrap();
        let mut tasks = Vec::new();
        for task in 0..4usize {
            let mut redis = connection(&server, false).await;
            tasks.push(tokio::spawn(async move {
                for n in 0..40usize {
                    let from = format!("k{}", (task + n) % 4);
                    let to = format!("k{}", (task + n + 1) % 4);
                    // Another task may have moved it first.
                    let result: redis::RedisResult<()> = redis.rename(&from, &to).await;
                    if let Err(err) = result {
                        assert!(err.to_string().contains("no such key"), "{err}");
                    }
                }
            }));
        }
        for task in tasks {
            within(60, "the renames", task).await.unwrap();
        }
        let values: Vec<Option<String>> = redis.mget(&["k0", "k1", "k2", "k3"]).await.unwrap();
        let present: Vec<&String> = values.iter().flatten().collect();
        assert_eq!(present, ["the one"], "{values:?}");
    }

    async fn getrange_and_setrange_follow_redis_indexes() {
        let server = TestServer::start_with_resp(Security::default(), |_| {}).await;
        let mut redis = connection(&server, false).await;
        let _: () = redis.set("s", "This is a string").await.unwrap();
        for (start, end, want) in [(0, 3, "This"), (-3, -1, "ing"), (0, -1, "This is a string"), (10, 100, "string"), (5, 3, "")] {
            let got: String = redis.getrange("s", start, end).await.unwrap();
            assert_eq!(got, want, "{start} {end}");
        }
        let got: String = redis.getrange("nothing", 0, -1).await.unwrap();
        assert_eq!(got, "");
        let bad = error(redis::cmd("GETRANGE").arg("s").arg("a").arg(1).query_async(&mut redis).await);
        assert!(bad.contains("value is not an integer or out of range"), "{bad}");

        // SETRANGE keeps the deadline, pads with zero bytes.
        let _: () = redis.set_ex("h", "Hello World", 100).await.unwrap();
        let len: i64 = redis.setrange("h", 6, "Redis").await.unwrap();
        assert_eq!(len, 11);
        let h: String = redis.get("h").await.unwrap();
        assert_eq!(h, "Hello Redis");
        let ttl: i64 = redis.ttl("h").await.unwrap();
        assert!((98..=100).contains(&ttl), "{ttl}");
        let len: i64 = redis.setrange("padded", 5, "x").await.unwrap();
        assert_eq!(len, 6);
        let padded: Vec<u8> = redis.get("padded").await.unwrap();
        assert_eq!(padded, b"\0\0\0\0\0x");
        // Nothing to write: the length, and no key made.
        let len: i64 = redis.setrange("empty", 3, "").await.unwrap();
        assert_eq!(len, 0);
        let exists: bool = redis.exists("empty").await.unwrap();
        assert!(!exists);
        let len: i64 = redis.setrange("h", 100, "").await.unwrap();
        assert_eq!(len, 11);
        let bad = error(redis::cmd("SETRANGE").arg("h").arg(-1).arg("x").query_async(&mut redis).await);
        assert!(bad.contains("offset is out of range"), "{bad}");
        let max = kvstore::server::Limits::default().max_value_bytes;
        let bad = error(redis::cmd("SETRANGE").arg("h").arg(max).arg("x").query_async(&mut redis).await);
        assert!(bad.contains("string exceeds maximum allowed size"), "{bad}");
        let h: String = redis.get("h").await.unwrap();
        assert_eq!(h, "Hello Redis", "nothing written");
    }

    async fn flushdb_is_refused_without_the_flag() {
        let server = TestServer::start_with_resp(Security::default(), |_| {}).await;
        let mut redis = connection(&server, false).await;
        let _: () = redis.set("kept", "v").await.unwrap();
        let refused = error(redis::cmd("FLUSHDB").query_async(&mut redis).await);
        assert!(refused.contains("FLUSHDB is disabled; start kvstore with --resp-allow-flush"), "{refused}");
        let refused = error(redis::cmd("FLUSHALL").arg("ASYNC").query_async(&mut redis).await);
        assert!(refused.contains("FLUSHALL is disabled"), "{refused}");
        let syntax = error(redis::cmd("FLUSHDB").arg("LATER").query_async(&mut redis).await);
        assert!(syntax.contains("syntax error"), "{syntax}");
        let kept: String = redis.get("kept").await.unwrap();
        assert_eq!(kept, "v");
    }

    }

    /// With `--resp-allow-flush` (the real binary, so the flag is tested
    /// too): FLUSHDB deletes every key, in several batches, and only for a
    /// token that may write every key.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn flushdb_with_the_flag_deletes_every_key() {
        use crate::harness::Binary;
        let dir = tempfile::tempdir().expect("temp dir");
        let tokens = dir.path().join("tokens.toml");
        std::fs::write(
            &tokens,
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
write = ["users/"]
"#,
        )
        .expect("token file");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let resp = format!("127.0.0.1:{port}");
        let data = dir.path().join("data");
        let tokens = tokens.to_string_lossy().into_owned();
        let _server = Binary::start(
            &data,
            &[
                "--resp-listen",
                &resp,
                "--resp-allow-flush",
                "--auth-file",
                &tokens,
            ],
        );
        let connect = |token: &'static str| {
            let url = format!("redis://{token}:{token}-token@{resp}/");
            async move {
                let client = redis::Client::open(url).expect("client");
                within(
                    10,
                    "a RESP connection",
                    client.get_multiplexed_async_connection(),
                )
                .await
                .expect("connect")
            }
        };
        let mut admin = connect("admin").await;
        let mut app = connect("app").await;
        let pairs: Vec<(String, String)> = (0..2500)
            .map(|i| (format!("users/{i}"), "v".into()))
            .collect();
        let _: () = admin.mset(&pairs).await.unwrap();
        let _: () = admin.set("elsewhere", "v").await.unwrap();

        // A token with a prefix lists only under it.
        let keys: Vec<String> = app.keys("*").await.unwrap();
        assert_eq!(keys.len(), 2500);
        let (seen, _) = scan_all(&mut app, &["COUNT", "500"]).await;
        assert_eq!(seen.len(), 2500);
        assert!(!seen.contains_key("elsewhere"));
        let refused = error(redis::cmd("FLUSHDB").query_async(&mut app).await);
        assert!(
            refused.starts_with("NOPERM") || refused.contains("may not write every key"),
            "{refused}"
        );
        let refused = error(
            redis::cmd("RENAME")
                .arg("elsewhere")
                .arg("users/stolen")
                .query_async(&mut app)
                .await,
        );
        assert!(
            refused.contains("may not read key 'elsewhere'"),
            "{refused}"
        );

        let _: () = redis::cmd("FLUSHDB").query_async(&mut admin).await.unwrap();
        let size: i64 = redis::cmd("DBSIZE").query_async(&mut admin).await.unwrap();
        assert_eq!(size, 0);
        let _: () = admin.set("again", "v").await.unwrap();
        let _: () = redis::cmd("FLUSHALL")
            .arg("ASYNC")
            .query_async(&mut admin)
            .await
            .unwrap();
        let size: i64 = redis::cmd("DBSIZE").query_async(&mut admin).await.unwrap();
        assert_eq!(size, 0);
    }
}

/// kvstore's own `KV.*` commands (`src/resp/versioned.rs`).
mod versioned {
    use super::*;

    for_each_backend! {

    async fn kv_commands_show_versions_and_write_conditionally() {
        let server = TestServer::start_with_resp(Security::default(), |_| {}).await;
        let mut redis = connection(&server, true).await;
        let set: std::collections::HashMap<String, redis::Value> = redis::cmd("KV.SET")
            .arg("k").arg("v1").arg("IFABSENT").arg("PX").arg(60_000)
            .query_async(&mut redis).await.unwrap();
        assert_eq!(set.get("version"), Some(&redis::Value::Int(1)), "{set:?}");
        let revision = match set.get("revision") { Some(redis::Value::Int(r)) => *r, other => panic!("{other:?}") };
        let entry = server.client.get("k").await.unwrap().expect("written");
        assert_eq!((entry.version, entry.revision as i64), (1, revision));
        let got: std::collections::HashMap<String, redis::Value> =
            redis::cmd("KV.GET").arg("k").query_async(&mut redis).await.unwrap();
        assert_eq!(got.get("version"), Some(&redis::Value::Int(1)), "{got:?}");
        assert!(matches!(got.get("expires_at"), Some(redis::Value::Int(_))), "{got:?}");
        let stale = redis::cmd("KV.SET").arg("k").arg("v2").arg("IFVERSION").arg(7)
            .query_async::<redis::Value>(&mut redis).await.expect_err("a stale version");
        // The crate writes the code, a colon, then the message.
        assert_eq!(stale.code(), Some("VERSION_MISMATCH"), "{stale}");
        assert!(stale.to_string().contains("the key is at version 1"), "{stale}");
        let _: redis::Value = redis::cmd("KV.SET").arg("k").arg("v2").arg("IFVERSION").arg(1)
            .query_async(&mut redis).await.unwrap();
        let current: i64 = redis::cmd("KV.REVISION").query_async(&mut redis).await.unwrap();
        assert_eq!(current, revision + 1);
        let refused = redis::cmd("KV.DEL").arg("k").arg("IFVERSION").arg(1)
            .query_async::<redis::Value>(&mut redis).await.expect_err("a stale version");
        assert_eq!(refused.code(), Some("VERSION_MISMATCH"), "{refused}");
        let deleted: i64 = redis::cmd("KV.DEL").arg("k").arg("IFVERSION").arg(2).query_async(&mut redis).await.unwrap();
        assert_eq!(deleted, 1);
        let gone: redis::Value = redis::cmd("KV.GET").arg("k").query_async(&mut redis).await.unwrap();
        assert_eq!(gone, redis::Value::Nil);
    }

    }
}

/// What Redis's own test suite (tests/redis-suite) found: EXPIRE's
/// overflow checks and option rules, absolute deadlines kept exactly, and
/// INCRBYFLOAT's infinities.
mod redis_rules {
    use super::*;

    fn error(result: redis::RedisResult<redis::Value>) -> String {
        result.expect_err("an error").to_string()
    }

    for_each_backend! {

    async fn expire_checks_overflow_and_combines_options_as_redis_does() {
        let server = TestServer::start_with_resp(Security::default(), |_| {}).await;
        let mut redis = connection(&server, false).await;
        let _: () = redis.set("foo", "bar").await.unwrap();
        for (command, time) in [
            ("EXPIRE", "9223370399119966"),
            ("EXPIRE", "-9223372036854776"),
            ("PEXPIRE", "9223372036854770000"),
        ] {
            let refused = error(redis::cmd(command).arg("foo").arg(time).query_async(&mut redis).await);
            assert!(refused.contains("invalid expire time"), "{command} {time}: {refused}");
        }
        let ttl: i64 = redis.ttl("foo").await.unwrap();
        assert_eq!(ttl, -1, "the refused EXPIREs changed nothing");
        let set: i64 = redis::cmd("EXPIRE").arg("foo").arg(200).arg("LT").arg("XX").query_async(&mut redis).await.unwrap();
        assert_eq!(set, 0, "XX: no deadline yet");
        let _: () = redis.set_ex("foo", "bar", 200).await.unwrap();
        let set: i64 = redis::cmd("EXPIRE").arg("foo").arg(100).arg("LT").arg("XX").query_async(&mut redis).await.unwrap();
        assert_eq!(set, 1);
        let ttl: i64 = redis.ttl("foo").await.unwrap();
        assert!((99..=100).contains(&ttl), "{ttl}");
        for (options, message) in [
            (vec!["LT", "GT"], "GT and LT options at the same time are not compatible"),
            (vec!["NX", "GT"], "NX and XX, GT or LT options at the same time are not compatible"),
            (vec!["NX", "XX"], "NX and XX, GT or LT options at the same time are not compatible"),
            (vec!["XX", "AB"], "Unsupported option AB"),
        ] {
            let refused = error(redis::cmd("EXPIRE").arg("foo").arg(10).arg(&options).query_async(&mut redis).await);
            assert!(refused.contains(message), "{options:?}: {refused}");
        }
        let _: () = redis.set("f", "0").await.unwrap();
        let refused = error(redis::cmd("INCRBYFLOAT").arg("f").arg("+inf").query_async(&mut redis).await);
        assert!(refused.contains("increment would produce NaN or Infinity"), "{refused}");
    }

    async fn absolute_deadlines_are_kept_exactly() {
        let server = TestServer::start_with_resp(Security::default(), |_| {}).await;
        let mut redis = connection(&server, false).await;
        let now_s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let _: () = redis.set("a", "v").await.unwrap();
        for _ in 0..20 {
            let _: i64 = redis::cmd("EXPIREAT").arg("a").arg(now_s + 1000).query_async(&mut redis).await.unwrap();
            let at: i64 = redis::cmd("EXPIRETIME").arg("a").query_async(&mut redis).await.unwrap();
            assert_eq!(at, now_s + 1000);
            let ms = (now_s + 2000) * 1000 + 341;
            let _: i64 = redis::cmd("PEXPIREAT").arg("a").arg(ms).query_async(&mut redis).await.unwrap();
            let at: i64 = redis::cmd("PEXPIRETIME").arg("a").query_async(&mut redis).await.unwrap();
            assert_eq!(at, ms);
            let _: () = redis::cmd("SET").arg("b").arg("v").arg("PXAT").arg(ms + 1).query_async(&mut redis).await.unwrap();
            let at: i64 = redis::cmd("PEXPIRETIME").arg("b").query_async(&mut redis).await.unwrap();
            assert_eq!(at, ms + 1);
        }
    }

    async fn a_relative_time_past_the_longest_kept_is_kept_as_that() {
        let server = TestServer::start_with_resp(Security::default(), |_| {}).await;
        let mut redis = connection(&server, false).await;
        let longest = kvstore::storage::MAX_TTL_MS as i64;
        for (command, ms) in [("PX", longest * 10), ("PX", longest - 5_000), ("EX", longest)] {
            let _: () = redis::cmd("SET").arg("far").arg("v").arg(command).arg(ms).query_async(&mut redis).await.unwrap();
            let pttl: i64 = redis.pttl("far").await.unwrap();
            let expected = ms.min(longest);
            assert!(
                (expected - 10_000..=expected).contains(&pttl),
                "SET {command} {ms}: PTTL {pttl}, expected about {expected}"
            );
        }
    }

    }
}

/// With a certificate, the RESP port speaks TLS: a client that trusts the
/// CA gets its answers; a plain client gets none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_resp_port_speaks_tls_with_the_servers_certificate() {
    let pki = crate::tls::make_pki();
    let server = TestServer::start_with_resp(crate::tls::tls_security(&pki), |_| {}).await;
    let addr = server.resp_addr.expect("RESP");
    let config = kvstore::tls::client_config(Some(pki.ca.as_bytes())).expect("client config");
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let mut tls = within(10, "the TLS handshake", connector.connect(name, tcp))
        .await
        .expect("handshake");
    tls.write_all(b"PING\r\n").await.expect("write");
    let mut reply = [0u8; 7];
    within(10, "PONG", tls.read_exact(&mut reply))
        .await
        .expect("read");
    assert_eq!(&reply, b"+PONG\r\n");
    // Plain RESP to the TLS port: no answer of RESP's.
    let got = raw(&server, b"PING\r\n", usize::MAX).await;
    assert!(
        !got.starts_with(b"+PONG"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
}

/// MULTI / EXEC / WATCH (`src/resp/transaction.rs`): one conditional batch.
mod transactions {
    use super::*;

    for_each_backend! {

    async fn exec_runs_the_queue_as_one_revision() {
        let server = TestServer::start_with_resp(Security::default(), |_| {}).await;
        let mut redis = connection(&server, false).await;
        let _: () = redis.set("n", "41").await.unwrap();
        let (set, n, a): (String, i64, String) = redis::pipe()
            .atomic()
            .set("a", "1")
            .incr("n", 1)
            .get("a")
            .query_async(&mut redis)
            .await
            .unwrap();
        assert_eq!((set.as_str(), n, a.as_str()), ("OK", 42, "1"));
        let c = &server.client;
        let (a, n) = (c.get("a").await.unwrap().unwrap(), c.get("n").await.unwrap().unwrap());
        assert_eq!(a.revision, n.revision, "one batch, one revision");
        assert_eq!(n.value.as_deref(), Some("42"));
    }

    async fn a_watched_key_changed_by_another_client_aborts_exec() {
        let server = TestServer::start_with_resp(Security::default(), |_| {}).await;
        let mut mine = connection(&server, false).await;
        let mut other = connection(&server, false).await;
        let _: () = mine.set("k", "start").await.unwrap();
        let _: () = redis::cmd("WATCH").arg("k").query_async(&mut mine).await.unwrap();
        let _: () = other.set("k", "theirs").await.unwrap();
        let _: () = redis::cmd("MULTI").query_async(&mut mine).await.unwrap();
        let queued: String = redis::cmd("SET").arg("k").arg("mine").query_async(&mut mine).await.unwrap();
        assert_eq!(queued, "QUEUED");
        let exec: redis::Value = redis::cmd("EXEC").query_async(&mut mine).await.unwrap();
        assert_eq!(exec, redis::Value::Nil);
        let k: String = mine.get("k").await.unwrap();
        assert_eq!(k, "theirs");
        // Unchanged since WATCH: it goes through.
        let _: () = redis::cmd("WATCH").arg("k").query_async(&mut mine).await.unwrap();
        let done: (String,) = redis::pipe().atomic().set("k", "mine").query_async(&mut mine).await.unwrap();
        assert_eq!(done.0, "OK");
    }

    async fn unwatch_inside_multi_is_queued_and_the_watch_still_holds() {
        let server = TestServer::start_with_resp(Security::default(), |_| {}).await;
        let mut mine = connection(&server, false).await;
        let mut other = connection(&server, false).await;
        let _: () = redis::cmd("WATCH").arg("w").query_async(&mut mine).await.unwrap();
        let _: () = other.set("w", "theirs").await.unwrap();
        let _: () = redis::cmd("MULTI").query_async(&mut mine).await.unwrap();
        let queued: String = redis::cmd("UNWATCH").query_async(&mut mine).await.unwrap();
        assert_eq!(queued, "QUEUED");
        let _: String = redis::cmd("SET").arg("w").arg("mine").query_async(&mut mine).await.unwrap();
        let exec: redis::Value = redis::cmd("EXEC").query_async(&mut mine).await.unwrap();
        assert_eq!(exec, redis::Value::Nil);
        let w: String = mine.get("w").await.unwrap();
        assert_eq!(w, "theirs");
    }

    async fn errors_while_queuing_discard_the_transaction() {
        let server = TestServer::start_with_resp(Security::default(), |_| {}).await;
        let request = b"MULTI\r\nSET a 1\r\nNOSUCH\r\nEXEC\r\nGET a\r\nEXEC\r\nDISCARD\r\nMULTI\r\nMULTI\r\nDISCARD\r\nQUIT\r\n";
        let got = raw(&server, request, usize::MAX).await;
        let text = String::from_utf8_lossy(&got);
        let lines: Vec<&str> = text.split("\r\n").filter(|l| !l.is_empty()).collect();
        assert_eq!(lines[0..2], ["+OK", "+QUEUED"], "{text}");
        assert!(lines[2].starts_with("-ERR unknown command 'NOSUCH'"), "{text}");
        assert!(lines[3].starts_with("-EXECABORT"), "{text}");
        assert_eq!(lines[4], "$-1", "nothing was written: {text}");
        assert!(lines[5].starts_with("-ERR EXEC without MULTI"), "{text}");
        assert!(lines[6].starts_with("-ERR DISCARD without MULTI"), "{text}");
        assert_eq!(lines[7], "+OK", "{text}");
        assert!(lines[8].starts_with("-ERR MULTI calls can not be nested"), "{text}");
        assert_eq!(lines[9..], ["+OK", "+OK"], "{text}");

        // A command with the wrong number of words is refused as it is
        // queued, not when EXEC runs it, and dooms the transaction.
        let request = b"MULTI\r\nSET a 1\r\nGET\r\nINCR a b\r\nEXEC\r\nEXISTS a\r\nQUIT\r\n";
        let got = raw(&server, request, usize::MAX).await;
        let text = String::from_utf8_lossy(&got);
        let lines: Vec<&str> = text.split("\r\n").filter(|l| !l.is_empty()).collect();
        assert_eq!(
            lines,
            [
                "+OK",
                "+QUEUED",
                "-ERR wrong number of arguments for 'get' command",
                "-ERR wrong number of arguments for 'incr' command",
                "-EXECABORT Transaction discarded because of previous errors.",
                ":0",
                "+OK"
            ],
            "{text}"
        );
    }

    async fn concurrent_transactions_are_serializable() {
        let server = TestServer::start_with_resp(Security::default(), |_| {}).await;
        let mut clients = Vec::new();
        for _ in 0..4 {
            let mut redis = connection(&server, false).await;
            clients.push(tokio::spawn(async move {
                for _ in 0..25 {
                    // Read, then write what was read plus one, under WATCH,
                    // retrying when EXEC says another client came between:
                    // a lost update shows as a total below 100.
                    loop {
                        let _: () = redis::cmd("WATCH").arg("total").query_async(&mut redis).await.unwrap();
                        let seen: Option<i64> = redis.get("total").await.unwrap();
                        let done: Option<(String,)> = redis::pipe()
                            .atomic()
                            .set("total", seen.unwrap_or(0) + 1)
                            .query_async(&mut redis)
                            .await
                            .unwrap();
                        if done.is_some() {
                            break;
                        }
                    }
                }
            }));
        }
        for client in clients {
            within(60, "the transactions", client).await.unwrap();
        }
        let mut redis = connection(&server, false).await;
        let total: i64 = redis.get("total").await.unwrap();
        assert_eq!(total, 100);
    }

    }
}

/// A connection that sends nothing for the idle timeout is closed; one that
/// keeps sending stays open, for however long.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed_after_the_idle_timeout() {
    let mut resp = RespConfig::default();
    resp.idle_timeout = Duration::from_secs(1);
    let server = TestServer::start_with_resp_config(Security::default(), |_| {}, resp).await;
    let addr = server.resp_addr.expect("a RESP address");
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut buf = [0u8; 64];
    // Three times the timeout, a PING every quarter of it.
    for ping in 0..12 {
        if ping > 0 {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        stream.write_all(b"PING\r\n").await.expect("write");
        let n = within(10, "a PONG", stream.read(&mut buf))
            .await
            .expect("read");
        assert_eq!(&buf[..n], b"+PONG\r\n", "still open after {ping} PINGs");
    }
    let quiet = std::time::Instant::now();
    let n = within(10, "the idle connection to close", stream.read(&mut buf))
        .await
        .expect("read");
    assert_eq!(n, 0, "closed, without a reply");
    assert!(
        quiet.elapsed() >= Duration::from_millis(500),
        "closed {:?} after the last reply",
        quiet.elapsed()
    );
}

/// Each command is counted and timed under its own name in `/metrics`
/// (unknown ones as `unknown`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_are_counted_by_name_in_the_metrics() {
    let server = TestServer::start_with_resp(Security::default(), |_| {}).await;
    let mut redis = connection(&server, false).await;
    let _: () = redis.set("m", "1").await.unwrap();
    let _: Option<String> = redis.get("m").await.unwrap();
    let _ = redis::cmd("NOSUCH")
        .query_async::<redis::Value>(&mut redis)
        .await;
    let response = crate::requests::get(&server.client, "/metrics").await;
    let text = String::from_utf8_lossy(&response.body);
    for series in [
        "kvstore_resp_commands_total{command=\"set\"}",
        "kvstore_resp_commands_total{command=\"get\"}",
        "kvstore_resp_commands_total{command=\"unknown\"}",
        "kvstore_resp_command_duration_seconds_count{command=\"get\"}",
    ] {
        assert!(text.contains(series), "{series} missing from /metrics");
    }
}
