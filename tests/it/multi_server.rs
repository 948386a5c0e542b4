//! Two kvstore processes on one PostgreSQL (and one Redis): thousands of
//! rounds of a write on one server and a read of the same key on the other.
//! The default cache mode and `redis` must never serve a stale value, also
//! across a Redis outage; `local` (LISTEN/NOTIFY) is measured, not required
//! to be fresh.
//!
//! Skipped, printing why, unless `KVSTORE_TEST_POSTGRES_URL` (and for Redis
//! `KVSTORE_TEST_REDIS_URL`) are set.

use std::time::{Duration, Instant};

use crate::harness::{Backend, Binary, PgSchema, Proxy, redis_url};
use kvstore::client::Client;
use kvstore::storage::Condition;

const KEYS: u64 = 25;

/// Starts one server on the schema with extra flags (and, when the schema is
/// reached through PgBouncer, the pooler's).
pub(crate) fn start(schema: &PgSchema, dir: &std::path::Path, extra: &[&str]) -> Binary {
    let mut args: Vec<&str> = vec![
        "--backend",
        "postgres",
        "--postgres-url",
        &schema.url,
        "--postgres-schema",
        &schema.name,
        "--postgres-pool-size",
        "4",
        "--cursor-secret",
        "the secret every server of this test shares",
    ];
    if let Some(direct) = &schema.direct_url {
        args.extend([
            "--postgres-pooler",
            "transaction",
            "--postgres-listen-url",
            direct,
        ]);
    }
    args.extend_from_slice(extra);
    Binary::start(dir, &args)
}

/// `rounds` of: write `round` to a key on one server (alternating), then read
/// it on the other; returns how many reads were stale.
async fn rounds(a: &Client, b: &Client, from: u64, rounds: u64) -> u64 {
    let mut stale = 0;
    for round in from..from + rounds {
        let (writer, reader) = if round % 2 == 0 { (a, b) } else { (b, a) };
        let key = format!("k{}", round % KEYS);
        // Read first so that the reader's cache holds the key.
        let _ = reader.get(&key).await.expect("warm read");
        let written = writer
            .put(&key, round.to_string(), Condition::Any)
            .await
            .expect("write");
        let read = reader.get(&key).await.expect("read");
        let fresh = read.as_ref().is_some_and(|read| {
            read.version == written.version && read.value.as_deref() == Some(&*round.to_string())
        });
        if !fresh {
            eprintln!(
                "stale read in round {round}: wrote version {}, read {:?}",
                written.version,
                read.map(|r| r.version)
            );
            stale += 1;
        }
    }
    stale
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(kvstore_test_postgres),
    ignore = "set KVSTORE_TEST_POSTGRES_URL to run it"
)]
async fn the_default_mode_never_reads_stale_across_servers() {
    let schema = PgSchema::new();
    let dir = tempfile::tempdir().expect("temp dir");
    let a = start(&schema, dir.path(), &[]);
    let b = start(&schema, dir.path(), &[]);
    let stale = rounds(&a.client, &b.client, 0, 2000).await;
    assert_eq!(stale, 0, "stale reads in the default mode");
}

/// Writers on both servers, a watcher on each: both see every acknowledged
/// write once, in revision order, whichever server took it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(kvstore_test_postgres),
    ignore = "set KVSTORE_TEST_POSTGRES_URL to run it"
)]
async fn watchers_on_each_server_see_every_servers_writes_in_order() {
    let schema = PgSchema::new();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start(&schema, dir_a.path(), &[]);
    let b = start(&schema, dir_b.path(), &[]);
    let mut streams = Vec::new();
    for server in [&a, &b] {
        streams.push(crate::watch::watch(server.addr.parse().expect("address"), "").await);
    }
    let mut writers = Vec::new();
    for writer in 0..8 {
        let client = if writer % 2 == 0 {
            a.client.clone()
        } else {
            b.client.clone()
        };
        writers.push(tokio::spawn(async move {
            let mut revisions = Vec::new();
            for i in 0..40 {
                let key = format!("w{writer}/{}", i % 5);
                let written = client.put(&key, "v", Condition::Any).await.expect("put");
                revisions.push(written.revision);
            }
            revisions
        }));
    }
    let mut acknowledged = std::collections::BTreeSet::new();
    for writer in writers {
        acknowledged.extend(
            crate::harness::within(120, "the writers", writer)
                .await
                .unwrap(),
        );
    }
    let last = *acknowledged.last().expect("writes");
    for stream in &mut streams {
        let revisions: Vec<u64> = stream
            .changes_through(last)
            .await
            .iter()
            .map(|message| message.id.expect("id"))
            .collect();
        assert!(
            revisions.windows(2).all(|w| w[0] < w[1]),
            "out of order or repeated: {revisions:?}"
        );
        let seen: std::collections::BTreeSet<u64> = revisions.into_iter().collect();
        assert_eq!(seen, acknowledged, "every acknowledged write, nothing else");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(kvstore_test_postgres),
    ignore = "set KVSTORE_TEST_POSTGRES_URL to run it"
)]
async fn a_range_cursor_from_one_server_continues_on_another() {
    let schema = PgSchema::new();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start(&schema, dir_a.path(), &[]);
    let b = start(&schema, dir_b.path(), &[]);
    for key in ["r/1", "r/2", "r/3"] {
        a.client.put(key, "v", Condition::Any).await.expect("put");
    }
    let params = |cursor: Option<String>| kvstore::client::ListParams {
        prefix: Some("r/".into()),
        limit: Some(2),
        cursor,
        ..Default::default()
    };
    let first = a.client.list(&params(None)).await.expect("first page");
    let second = b
        .client
        .list(&params(first.next_cursor))
        .await
        .expect("a cursor of server A on server B");
    let keys: Vec<&str> = second.items.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, ["r/3"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(kvstore_test_postgres),
    ignore = "set KVSTORE_TEST_POSTGRES_URL to run it"
)]
async fn the_postgres_backend_refuses_to_start_without_a_shared_cursor_secret() {
    let schema = PgSchema::new();
    let dir = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kvstore"))
        .args(["serve", "--listen", "127.0.0.1:0", "--backend", "postgres"])
        .args([
            "--postgres-url",
            &schema.url,
            "--postgres-schema",
            &schema.name,
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .env_remove("KVSTORE_CURSOR_SECRET")
        .output()
        .expect("run kvstore");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("KVSTORE_CURSOR_SECRET"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(all(kvstore_test_postgres, kvstore_test_redis)),
    ignore = "set KVSTORE_TEST_POSTGRES_URL and KVSTORE_TEST_REDIS_URL to run it"
)]
async fn redis_mode_never_reads_stale_across_servers_or_outages() {
    let schema = PgSchema::new();
    let redis = redis_url();
    let target = redis
        .trim_start_matches("redis://")
        .split('/')
        .next()
        .and_then(|hostport| std::net::ToSocketAddrs::to_socket_addrs(hostport).ok())
        .and_then(|mut addrs| addrs.next())
        .expect("a redis://host:port URL");
    let mut proxy = Proxy::start(target).await;
    let url = format!("redis://{}", proxy.addr);
    let prefix = format!("{}:", schema.name);
    let dir = tempfile::tempdir().expect("temp dir");
    let flags = [
        "--cache",
        "redis",
        "--redis-url",
        &url,
        "--redis-prefix",
        &prefix,
        "--cache-ttl-secs",
        "120",
    ];
    let mut a = start(&schema, dir.path(), &flags);
    let mut b = start(&schema, dir.path(), &flags);
    let mut stale = rounds(&a.client, &b.client, 0, 1500).await;
    let hits = cache_hits(&b.client).await;
    assert!(hits > 0, "the shared cache was never hit");

    // Redis goes away: reads go to PostgreSQL, writes stay correct.
    proxy.down().await;
    stale += rounds(&a.client, &b.client, 1500, 100).await;
    proxy.up().await;
    // And comes back: entries from before the outage must not be served.
    stale += rounds(&a.client, &b.client, 1600, 1000).await;
    let metrics = metrics_text(&a.client).await;
    assert!(a.terminate() && b.terminate());
    if stale > 0 {
        for line in a.log().iter().chain(b.log().iter()) {
            eprintln!("{line}");
        }
    }
    assert_eq!(stale, 0, "stale reads with the Redis cache");
    assert!(
        metrics.contains("kvstore_redis_errors_total"),
        "no error metric"
    );
    let log = a.log();
    assert!(
        log.iter().any(|l| l.contains("Redis is unreachable")),
        "no log line about Redis: {log:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(kvstore_test_postgres),
    ignore = "set KVSTORE_TEST_POSTGRES_URL to run it"
)]
async fn local_mode_is_invalidated_by_notifications() {
    local_mode_invalidation().await;
}

/// Behind PgBouncer in transaction mode, the servers LISTEN on the direct
/// URL: the notifications still arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(all(kvstore_test_postgres, kvstore_test_pgbouncer)),
    ignore = "set KVSTORE_TEST_POSTGRES_URL and KVSTORE_TEST_PGBOUNCER_URL to run it"
)]
async fn local_mode_behind_pgbouncer_is_invalidated_through_the_listen_url() {
    Backend::Pgbouncer.run(local_mode_invalidation()).await;
}

/// Two servers with local caches: a write on one reaches the other's cache
/// within the notification delay.
async fn local_mode_invalidation() {
    let schema = PgSchema::new();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut a = start(&schema, dir.path(), &["--cache", "local"]);
    let b = start(&schema, dir.path(), &["--cache", "local"]);
    // Fresh after the notification delay: wait for it instead of racing it.
    for round in 0..200u64 {
        let key = format!("k{}", round % KEYS);
        let _ = b.client.get(&key).await.expect("warm read");
        let written = a
            .client
            .put(&key, round.to_string(), Condition::Any)
            .await
            .expect("write");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let read = b.client.get(&key).await.expect("read");
            if read.is_some_and(|r| r.version == written.version) {
                break;
            }
            assert!(Instant::now() < deadline, "never invalidated: {key}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let stale = rounds(&a.client, &b.client, 200, 1000).await;
    eprintln!("local mode: {stale} of 1000 immediate reads on the other server were stale");
    assert!(a.terminate());
    assert!(
        a.log().iter().any(|l| l.contains("may serve")),
        "the server did not warn about staleness"
    );
}

async fn metrics_text(client: &Client) -> String {
    let response = client
        .send(hyper::Method::GET, "/metrics", &[], bytes::Bytes::new())
        .await
        .expect("metrics");
    String::from_utf8_lossy(&response.body).into_owned()
}

async fn cache_hits(client: &Client) -> u64 {
    let metrics = metrics_text(client).await;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("kvstore_cache_hits_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}
