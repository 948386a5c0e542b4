//! What only the PostgreSQL backend has to prove: writes of many connections
//! racing on one key, servers starting together on one schema, and outages
//! (a database that cannot be reached, connections ended under load), each
//! answered 503 and recovered from without a restart.
//!
//! Skipped, printing why, unless `KVSTORE_TEST_POSTGRES_URL` is set.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::harness::{PgSchema, Proxy, within};
use crate::requests::*;
use kvstore::client::Client;
use kvstore::server::{self, ServerConfig};
use kvstore::storage::layer::cache::{CacheConfig, CachedStore};
use kvstore::storage::postgres::{Pooler, PostgresConfig, PostgresStore};
use kvstore::storage::{Condition, Expiry, OpResult, Store, WriteOp, WriteOutcome};
use tokio::net::TcpListener;

fn put(key: &str, value: &str, condition: Condition) -> WriteOp {
    WriteOp::Put {
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
        condition,
        expiry: Expiry::Never,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(kvstore_test_postgres),
    ignore = "set KVSTORE_TEST_POSTGRES_URL to run it"
)]
async fn two_first_writes_of_a_key_cannot_both_create_it() {
    let schema = PgSchema::new();
    let store = schema.open().await;
    for round in 0..20 {
        let key = format!("new-{round}");
        let writers: Vec<_> = (0..8)
            .map(|i| {
                let (store, key) = (Arc::clone(&store), key.clone());
                let condition = if i % 2 == 0 {
                    Condition::Absent
                } else {
                    Condition::Any
                };
                // Some write it in a batch, whose insert meets the others'
                // after its locks were taken.
                let mut ops = vec![put(&key, "v", condition)];
                if i % 4 == 3 {
                    ops.push(put(&format!("{key}-{i}"), "w", Condition::Any));
                }
                tokio::spawn(async move { store.write(ops).await.expect("write") })
            })
            .collect();
        let mut created = 0;
        let mut versions = Vec::new();
        for writer in writers {
            match within(60, "a writer", writer).await.expect("task") {
                WriteOutcome::Applied { results, .. } => match results[0] {
                    OpResult::Put {
                        version,
                        created: c,
                        ..
                    } => {
                        created += usize::from(c);
                        versions.push(version);
                    }
                    OpResult::Deleted { .. } | OpResult::Checked => {
                        panic!("a put answered as a delete")
                    }
                },
                WriteOutcome::Rejected { failed } => {
                    assert!(failed[0].current_version.is_some(), "{failed:?}");
                }
            }
        }
        assert_eq!(created, 1, "round {round}: {versions:?}");
        versions.sort_unstable();
        let expected: Vec<u64> = (1..=versions.len() as u64).collect();
        assert_eq!(versions, expected, "round {round}");
    }
    store.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(kvstore_test_postgres),
    ignore = "set KVSTORE_TEST_POSTGRES_URL to run it"
)]
async fn per_key_revisions_rise_with_versions_under_contention() {
    let schema = PgSchema::new();
    let store = schema.open().await;
    const KEYS: [&str; 3] = ["a", "b", "c"];
    let writers: Vec<_> = (0..8u64)
        .map(|w| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let mut seen = Vec::new();
                for i in 0..60u64 {
                    let n = (w * 7 + i) as usize;
                    // Single puts and two-key batches, naming keys in both orders.
                    let ops = if i % 3 == 0 {
                        vec![
                            put(KEYS[n % 3], "x", Condition::Any),
                            put(KEYS[(n + 1) % 3], "y", Condition::Any),
                        ]
                    } else if i % 3 == 1 {
                        vec![
                            put(KEYS[(n + 2) % 3], "x", Condition::Any),
                            put(KEYS[n % 3], "y", Condition::Any),
                        ]
                    } else {
                        vec![put(KEYS[n % 3], "z", Condition::Any)]
                    };
                    let keys: Vec<String> = ops
                        .iter()
                        .map(|op| String::from_utf8_lossy(op.key()).into_owned())
                        .collect();
                    match store.write(ops).await.expect("write") {
                        WriteOutcome::Applied { revision, results } => {
                            for (key, result) in keys.into_iter().zip(results) {
                                if let OpResult::Put {
                                    version,
                                    updated_at_us,
                                    ..
                                } = result
                                {
                                    seen.push((key, version, revision, updated_at_us));
                                }
                            }
                        }
                        WriteOutcome::Rejected { failed } => panic!("rejected: {failed:?}"),
                    }
                }
                seen
            })
        })
        .collect();
    let mut by_key: HashMap<String, Vec<(u64, u64, i64)>> = HashMap::new();
    for writer in writers {
        for (key, version, revision, updated) in
            within(120, "a writer", writer).await.expect("task")
        {
            by_key
                .entry(key)
                .or_default()
                .push((version, revision, updated));
        }
    }
    for (key, mut writes) in by_key {
        writes.sort_unstable();
        for pair in writes.windows(2) {
            let ((v1, r1, u1), (v2, r2, u2)) = (pair[0], pair[1]);
            assert_eq!(v2, v1 + 1, "{key}: versions {v1} then {v2}");
            assert!(r2 > r1, "{key}: version {v2} has revision {r2} <= {r1}");
            assert!(u2 >= u1, "{key}: updated_at went back at version {v2}");
        }
    }
    store.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(kvstore_test_postgres),
    ignore = "set KVSTORE_TEST_POSTGRES_URL to run it"
)]
async fn servers_starting_together_set_the_schema_up_once() {
    let schema = PgSchema::new();
    let opens: Vec<_> = (0..6)
        .map(|_| {
            let config = schema.config();
            tokio::spawn(async move { PostgresStore::open(config).await })
        })
        .collect();
    let mut stores = Vec::new();
    for open in opens {
        stores.push(
            within(60, "a store's open", open)
                .await
                .expect("task")
                .expect("open"),
        );
    }
    for (i, store) in stores.iter().enumerate() {
        store
            .write(vec![put(&format!("k{i}"), "v", Condition::Absent)])
            .await
            .expect("write");
    }
    let revisions: Vec<u64> = {
        let mut all = Vec::new();
        for i in 0..stores.len() {
            let entry = stores[0]
                .get(format!("k{i}").as_bytes())
                .await
                .expect("get")
                .expect("present");
            all.push(entry.revision);
        }
        all
    };
    assert_eq!(revisions, (1..=stores.len() as u64).collect::<Vec<_>>());
}

/// The host and port of a postgres:// URL, and the URL with them replaced.
pub(crate) fn through(url: &str, addr: SocketAddr) -> (SocketAddr, String) {
    let config: tokio_postgres::Config = url.parse().expect("URL");
    let host = match &config.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(host) => host.clone(),
        #[cfg(unix)]
        tokio_postgres::config::Host::Unix(_) => panic!("use a TCP URL"),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let target = std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
        .expect("resolve")
        .next()
        .expect("an address");
    let user = config.get_user().unwrap_or("postgres");
    let db = config.get_dbname().unwrap_or("postgres");
    (target, format!("postgres://{user}@{addr}/{db}"))
}

/// An in-process server on `config`, with the local cache as by default
/// in the tests.
async fn serve(config: PostgresConfig) -> (Client, tokio::sync::oneshot::Sender<()>) {
    let store: Arc<dyn Store> = Arc::new(PostgresStore::open(config).await.expect("open"));
    let store: Arc<dyn Store> = Arc::new(CachedStore::new(store, CacheConfig::default()));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let mut config = ServerConfig::default();
    config.metrics = false;
    tokio::spawn(server::run(listener, store, config, async move {
        let _ = rx.await;
    }));
    (Client::new(&format!("http://{addr}")).expect("client"), tx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_answers_503_within_the_connect_timeout() {
    // A port with nothing listening: the server still starts.
    let mut config = PostgresConfig::new("postgres://postgres@127.0.0.1:1/test");
    config.connect_timeout = Duration::from_secs(1);
    let (client, stop) = serve(config).await;
    for (method, path, body) in [
        (Method::GET, "/v1/kv/a", ""),
        (Method::PUT, "/v1/kv/a", r#"{"value": "v"}"#),
        (Method::GET, "/v1/kv", ""),
        (Method::GET, "/readyz", ""),
    ] {
        let start = Instant::now();
        let response = send(&client, method.clone(), path, &[JSON], body).await;
        expect_error(&response, StatusCode::SERVICE_UNAVAILABLE, "unavailable");
        assert!(
            start.elapsed() < Duration::from_millis(2500),
            "{method} {path} took {:?}",
            start.elapsed()
        );
    }
    assert_eq!(get(&client, "/healthz").await.status, StatusCode::OK);
    let _ = stop.send(());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(kvstore_test_postgres),
    ignore = "set KVSTORE_TEST_POSTGRES_URL to run it"
)]
async fn a_database_that_goes_away_and_comes_back_needs_no_restart() {
    let schema = PgSchema::new();
    let (target, _) = through(&schema.url, "127.0.0.1:1".parse().expect("addr"));
    let mut proxy = Proxy::start(target).await;
    let (_, url) = through(&schema.url, proxy.addr);
    let mut config = schema.config();
    config.url = url;
    config.connect_timeout = Duration::from_secs(1);
    let (client, stop) = serve(config).await;
    put_text(&client, "k", "before").await;
    assert_eq!(get(&client, "/readyz").await.status, StatusCode::OK);

    proxy.down().await;
    let start = Instant::now();
    let response = put_json(&client, "k", &json!({"value": "during"}), &[]).await;
    expect_error(&response, StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    let response = get(&client, "/readyz").await;
    expect_error(&response, StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "{:?}",
        start.elapsed()
    );

    proxy.up().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(&client, "/readyz").await.status != StatusCode::OK {
        assert!(Instant::now() < deadline, "did not recover");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let answer = put_text(&client, "k", "after").await;
    assert_eq!(version_of(&answer), 2, "{answer}");
    assert_eq!(entry(&client, "k").await["value"], "after");
    let _ = stop.send(());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(kvstore_test_postgres),
    ignore = "set KVSTORE_TEST_POSTGRES_URL to run it"
)]
async fn a_host_that_accepts_but_never_answers_is_passed_over() {
    // The URL's first host accepts TCP connections and never answers, as a
    // frozen primary does; the second is the database.
    let frozen = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let schema = PgSchema::new();
    let (target, _) = through(&schema.url, "127.0.0.1:1".parse().expect("addr"));
    let config: tokio_postgres::Config = schema.url.parse().expect("URL");
    let url = format!(
        "postgres://{}@{},{target}/{}",
        config.get_user().unwrap_or("postgres"),
        frozen.local_addr().expect("addr"),
        config.get_dbname().unwrap_or("postgres"),
    );
    let mut config = schema.config();
    config.url = url;
    config.connect_timeout = Duration::from_secs(1);
    let (client, stop) = within(10, "the server's start", serve(config)).await;
    let start = Instant::now();
    put_text(&client, "k", "v").await;
    // New connections start with the host that answered.
    for i in 0..20 {
        put_text(&client, &format!("k{i}"), "v").await;
    }
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    let _ = stop.send(());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(kvstore_test_postgres),
    ignore = "set KVSTORE_TEST_POSTGRES_URL to run it"
)]
async fn a_server_that_refuses_writes_answers_503() {
    // A session that is read-only, as on a standby or a demoted primary.
    let schema = PgSchema::new();
    let separator = if schema.url.contains('?') { '&' } else { '?' };
    let mut config = schema.config();
    config.url = format!(
        "{}{separator}options=-c%20default_transaction_read_only%3Don",
        schema.url
    );
    config.connect_timeout = Duration::from_secs(1);
    let (client, stop) = serve(config).await;
    for (method, path, body) in [
        (Method::PUT, "/v1/kv/a", r#"{"value": "v"}"#),
        (Method::GET, "/v1/kv/a", ""),
    ] {
        let response = send(&client, method.clone(), path, &[JSON], body).await;
        expect_error(&response, StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    }
    let _ = stop.send(());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(kvstore_test_postgres),
    ignore = "set KVSTORE_TEST_POSTGRES_URL to run it"
)]
async fn connections_ended_under_load_are_replaced() {
    let schema = PgSchema::new();
    let (client, stop) = serve(schema.config()).await;
    let running = Arc::new(AtomicBool::new(true));
    let (ok, unavailable) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let (client, running) = (client.clone(), Arc::clone(&running));
            let (ok, unavailable) = (Arc::clone(&ok), Arc::clone(&unavailable));
            tokio::spawn(async move {
                let mut i = 0u64;
                while running.load(Ordering::Acquire) {
                    i += 1;
                    let key = format!("w{w}-{}", i % 10);
                    let response = if i.is_multiple_of(2) {
                        put_json(&client, &key, &json!({"value": "v"}), &[]).await
                    } else {
                        get(&client, &Client::key_path(&key)).await
                    };
                    match response.status {
                        StatusCode::OK | StatusCode::CREATED | StatusCode::NOT_FOUND => {
                            ok.fetch_add(1, Ordering::Relaxed)
                        }
                        StatusCode::SERVICE_UNAVAILABLE => {
                            unavailable.fetch_add(1, Ordering::Relaxed)
                        }
                        other => panic!("{other}: {:?}", response.body),
                    };
                }
            })
        })
        .collect();
    let admin = schema.client().await;
    let mut ended = 0;
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let rows = admin
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE application_name = $1",
                &[&schema.name],
            )
            .await
            .expect("terminate");
        ended += rows.len();
    }
    // After the last kill, every request must succeed again: once the
    // workers are past it (the pool has had time to replace what was
    // ended), no 503 may follow.
    let after_kills = ok.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    within(30, "requests after the last kill", async {
        while ok.load(Ordering::Relaxed) < after_kills + 50 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let before = unavailable.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(500)).await;
    running.store(false, Ordering::Release);
    for worker in workers {
        within(60, "a worker", worker).await.expect("worker");
    }
    assert!(ended > 0, "no connection was ended");
    assert_eq!(
        unavailable.load(Ordering::Relaxed),
        before,
        "503s after the database was back"
    );
    assert!(ok.load(Ordering::Relaxed) > 100);
    assert_eq!(get(&client, "/readyz").await.status, StatusCode::OK);
    eprintln!(
        "ended {ended} connections; {} requests answered, {} answered 503",
        ok.load(Ordering::Relaxed),
        unavailable.load(Ordering::Relaxed)
    );
    let _ = stop.send(());
}

/// Behind a pooler in transaction mode, LISTEN needs a direct connection: a
/// store without one is refused before it connects, and the command line
/// names the missing flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_pooler_without_a_listen_url_is_refused() {
    let url = "postgres://kv@127.0.0.1:1/kv";
    let mut config = PostgresConfig::new(url);
    config.pooler = Pooler::Transaction;
    let refused = PostgresStore::open(config).await.err().expect("refused");
    assert!(refused.to_string().contains("listen URL"), "{refused}");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kvstore"))
        .args(["serve", "--backend", "postgres", "--postgres-url", url])
        .args(["--postgres-pooler", "transaction"])
        .output()
        .expect("run kvstore");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--postgres-listen-url"), "{stderr}");
}

fn delete(key: &str, condition: Condition) -> WriteOp {
    WriteOp::Delete {
        key: key.as_bytes().to_vec(),
        condition,
    }
}

fn revision(outcome: &kvstore::StoreResult<WriteOutcome>) -> u64 {
    match outcome {
        Ok(WriteOutcome::Applied { revision, .. }) => *revision,
        other => panic!("not applied: {other:?}"),
    }
}

/// The transactions that logged `revisions`, told apart by their rows' xmin.
async fn transactions_of(schema: &PgSchema, revisions: &[u64]) -> i64 {
    let client = schema.client().await;
    let revisions: Vec<i64> = revisions.iter().map(|r| *r as i64).collect();
    client
        .query_one(
            &format!(
                "SELECT count(DISTINCT xmin::text) FROM \"{}\".kv_revisions WHERE revision = ANY($1)",
                schema.name
            ),
            &[&revisions],
        )
        .await
        .expect("xmin")
        .get(0)
}

/// A RESP pipeline's single puts and deletes go in one transaction, each
/// under a revision of its own, in order, each seeing the ones before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(kvstore_test_postgres),
    ignore = "set KVSTORE_TEST_POSTGRES_URL to run it"
)]
async fn a_pipeline_of_single_writes_commits_once_in_order() {
    let schema = PgSchema::new();
    let store = schema.open().await;
    let outcomes = store
        .write_many(vec![
            vec![put("k", "1", Condition::Any)],
            vec![put("k", "2", Condition::Absent)],
            vec![put("k", "3", Condition::Version(1))],
            vec![delete("k", Condition::Any)],
            vec![put("k", "4", Condition::Absent)],
            vec![put("other", "x", Condition::Any)],
        ])
        .await;
    match &outcomes[1] {
        Ok(WriteOutcome::Rejected { failed }) => assert_eq!(failed[0].current_version, Some(1)),
        other => panic!("a create-only put of an existing key: {other:?}"),
    }
    let applied: Vec<u64> = [0, 2, 3, 4, 5]
        .iter()
        .map(|&i| revision(&outcomes[i]))
        .collect();
    assert!(applied.windows(2).all(|w| w[0] < w[1]), "{applied:?}");
    match &outcomes[4] {
        Ok(WriteOutcome::Applied { results, .. }) => assert!(
            matches!(
                results[0],
                OpResult::Put {
                    version: 1,
                    created: true,
                    ..
                }
            ),
            "{results:?}"
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(transactions_of(&schema, &applied).await, 1);
    let entry = store.get(b"k").await.expect("get").expect("k");
    assert_eq!((entry.value.as_slice(), entry.version), (&b"4"[..], 1));
}

/// A pipeline that meets a key past its deadline is made one write at a
/// time, the expired key deleted under a revision of its own first; the
/// revisions its first try took are settled at once, not left as holes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(kvstore_test_postgres),
    ignore = "set KVSTORE_TEST_POSTGRES_URL to run it"
)]
async fn a_pipeline_meeting_an_expired_key_is_made_one_write_at_a_time() {
    let schema = PgSchema::new();
    let store = schema.open().await;
    let short = WriteOp::Put {
        key: b"e".to_vec(),
        value: b"old".to_vec(),
        condition: Condition::Any,
        expiry: Expiry::Ttl(1),
    };
    let before = revision(&store.write(vec![short]).await);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let outcomes = store
        .write_many(vec![
            vec![put("a", "1", Condition::Any)],
            vec![put("e", "new", Condition::Absent)],
            vec![put("b", "1", Condition::Any)],
        ])
        .await;
    let revisions: Vec<u64> = outcomes.iter().map(revision).collect();
    assert_eq!(transactions_of(&schema, &revisions).await, 3);
    // What the first try took is settled as a gap before the answer, not
    // left for the poller to fill after 250 ms.
    let client = schema.client().await;
    let gaps: i64 = client
        .query_one(
            &format!(
                "SELECT count(*) FROM \"{}\".kv_revisions WHERE gap AND revision > $1 AND revision < $2",
                schema.name
            ),
            &[&(before as i64), &(revisions[0] as i64)],
        )
        .await
        .expect("gaps")
        .get(0);
    assert!(gaps >= 1, "no gap row for the first try's revision");
    let changes = within(10, "the change log", async {
        loop {
            let changes = store.changes(before, 100).await.expect("changes");
            if changes.last().is_some_and(|c| c.revision >= revisions[2]) {
                return changes;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let keys: Vec<(u64, String)> = changes
        .iter()
        .flat_map(|c| {
            c.events
                .iter()
                .map(move |e| (c.revision, String::from_utf8_lossy(e.key()).into_owned()))
        })
        .collect();
    let e: Vec<&(u64, String)> = keys.iter().filter(|(_, k)| k == "e").collect();
    assert_eq!(e.len(), 2, "the expiry's delete, then the put: {keys:?}");
    assert_eq!(e[1].0, revisions[1]);
}

/// A pipeline that finds a row locked by another transaction waits for it
/// only briefly (its lock timeout), then makes its writes one at a time:
/// the write before the locked row is visible while the lock is still held,
/// which a pipeline waiting in its one transaction could not show.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(kvstore_test_postgres),
    ignore = "set KVSTORE_TEST_POSTGRES_URL to run it"
)]
async fn a_pipeline_meeting_a_held_row_lock_gives_up_its_transaction() {
    let schema = PgSchema::new();
    let store = schema.open().await;
    revision(&store.write(vec![put("held", "0", Condition::Any)]).await);
    let holder = schema.client().await;
    holder
        .batch_execute(&format!(
            "BEGIN; SELECT 1 FROM \"{}\".kv WHERE key = 'held'::bytea FOR UPDATE",
            schema.name
        ))
        .await
        .expect("lock the row");
    let pipeline = {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            store
                .write_many(vec![
                    vec![put("before", "1", Condition::Any)],
                    vec![put("held", "1", Condition::Any)],
                    vec![put("after", "1", Condition::Any)],
                ])
                .await
        })
    };
    within(10, "the write before the locked row, alone", async {
        while store.get(b"before").await.expect("get").is_none() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(
        store.get(b"after").await.expect("get").is_none(),
        "a write behind the locked row went ahead of it"
    );
    holder.batch_execute("COMMIT").await.expect("release");
    let outcomes = within(10, "the pipeline", pipeline)
        .await
        .expect("pipeline");
    let revisions: Vec<u64> = outcomes.iter().map(revision).collect();
    assert!(revisions.windows(2).all(|w| w[0] < w[1]), "{revisions:?}");
    assert_eq!(transactions_of(&schema, &revisions).await, 3);
    let held = store.get(b"held").await.expect("get").expect("held");
    assert_eq!((held.value.as_slice(), held.version), (&b"1"[..], 2));
}

/// Two clients pipelining writes to the same keys in opposite orders: their
/// transactions would deadlock; they wait at most briefly for a lock and
/// are then made one write at a time, and every write is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(kvstore_test_postgres),
    ignore = "set KVSTORE_TEST_POSTGRES_URL to run it"
)]
async fn pipelines_taking_rows_in_opposite_orders_all_complete() {
    let schema = PgSchema::new();
    let store = schema.open().await;
    let rounds = 40;
    let clients: Vec<_> = [["x", "y"], ["y", "x"]]
        .into_iter()
        .map(|order| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                for _ in 0..rounds {
                    let writes = order
                        .iter()
                        .map(|key| vec![put(key, "v", Condition::Any)])
                        .collect();
                    for outcome in store.write_many(writes).await {
                        revision(&outcome);
                    }
                }
            })
        })
        .collect();
    for client in clients {
        within(30, "the pipelines", client).await.expect("client");
    }
    for key in [&b"x"[..], b"y"] {
        let entry = store.get(key).await.expect("get").expect("written");
        assert_eq!(entry.version, 2 * rounds);
    }
}
