//! Read replicas (`--postgres-replica-url`, `?consistency=replica`): each
//! test builds a streaming replica of its own with `pg_basebackup -R`, in a
//! temporary directory, runs it on a free port as the `postgres` user, and
//! stops and removes it when done, also when the test fails.
//!
//! The primary is the tests' PostgreSQL when it accepts replication
//! connections (a `replication` line in its pg_hba.conf); otherwise a
//! PostgreSQL of the test's own (initdb in the same temporary directory),
//! so that the machine's configuration is never changed. Needs root (to run PostgreSQL as `postgres`) and
//! `KVSTORE_TEST_POSTGRES_URL`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::{Backend, Binary, PgSchema, is_root, needs, poll_until};
use crate::requests::{
    Method, StatusCode, Value, expect_error, expect_json, get, json, post_json, put_text, send,
};
use kvstore::client::{Client, RawResponse};

/// The longest a PostgreSQL command (start, stop, a base backup) may take.
const PG_DEADLINE: Duration = Duration::from_secs(120);

/// Runs a PostgreSQL program as the `postgres` user; its output on failure.
fn as_postgres(bin: &Path, program: &str, args: &[&str]) -> Result<(), String> {
    let mut command = Command::new("runuser");
    command
        .args(["-u", "postgres", "--"])
        .arg(bin.join(program))
        .args(args);
    let output = crate::harness::output_within(&mut command, b"", PG_DEADLINE);
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {args:?}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// The directory of PostgreSQL's programs (the newest installed).
fn pg_bin() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|bin| bin.join("pg_basebackup").exists() && bin.join("pg_ctl").exists())
        .collect();
    dirs.sort();
    dirs.pop()
}

/// A free loopback port.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A PostgreSQL server this test started (a replica, or a primary of its
/// own): stopped when dropped.
struct Server {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
}

impl Server {
    /// Starts the data directory `data` on a free port, with its socket in
    /// `dir`.
    fn start(bin: &Path, dir: &Path, data: PathBuf) -> Result<Server, String> {
        let port = free_port();
        // A data directory copied from a Debian cluster has no configuration
        // files (they live in /etc): the copy gets its own.
        let config = data.join("postgresql.conf");
        if !config.exists() {
            std::fs::write(&config, "hot_standby = on\n").map_err(|e| e.to_string())?;
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all trust\nhost all all 127.0.0.1/32 trust\n\
                 host replication all 127.0.0.1/32 trust\n",
            )
            .map_err(|e| e.to_string())?;
            std::fs::write(data.join("pg_ident.conf"), "").map_err(|e| e.to_string())?;
            chown_postgres(&data)?;
        }
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c wal_level=replica",
            dir.display()
        );
        let data_arg = data.display().to_string();
        let log = dir.join(format!("{port}.log")).display().to_string();
        let server = Server {
            bin: bin.to_owned(),
            data,
            port,
        };
        as_postgres(
            bin,
            "pg_ctl",
            &[
                "-D", &data_arg, "-o", &options, "-l", &log, "-w", "-t", "60", "start",
            ],
        )
        .map_err(|e| format!("{e}\n{}", std::fs::read_to_string(&log).unwrap_or_default()))?;
        Ok(server)
    }

    /// Sends `signal` to the server's postmaster and every process it
    /// started (SIGSTOP: a frozen machine, whose connections hang).
    fn signal_all(&self, signal: libc::c_int) {
        let pid = std::fs::read_to_string(self.data.join("postmaster.pid"))
            .ok()
            .and_then(|text| text.lines().next()?.trim().parse::<u32>().ok())
            .expect("the postmaster's pid");
        let children = Command::new("pgrep")
            .args(["-P", &pid.to_string()])
            .output()
            .expect("pgrep");
        let mut pids = vec![pid];
        pids.extend(
            String::from_utf8_lossy(&children.stdout)
                .lines()
                .filter_map(|line| line.trim().parse::<u32>().ok()),
        );
        for pid in pids {
            let _ = crate::harness::send_signal(pid, signal);
        }
    }

    fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Stops the server (immediately, as a crash would), unless it is
    /// stopped already.
    fn stop(&self) {
        if !self.data.join("postmaster.pid").exists() {
            return;
        }
        let data = self.data.display().to_string();
        if let Err(err) = as_postgres(
            &self.bin,
            "pg_ctl",
            &["-D", &data, "-m", "immediate", "-w", "-t", "60", "stop"],
        ) {
            eprintln!("stopping the PostgreSQL at {data}: {err}");
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Thaws a server frozen with SIGSTOP when dropped, also when the test
/// fails (a frozen server would not stop).
struct Thaw<'a>(&'a Server);

impl Drop for Thaw<'_> {
    fn drop(&mut self) {
        self.0.signal_all(libc::SIGCONT);
    }
}

fn chown_postgres(path: &Path) -> Result<(), String> {
    let status = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(path)
        .status()
        .map_err(|e| e.to_string())?;
    status
        .success()
        .then_some(())
        .ok_or_else(|| format!("chown of {} failed", path.display()))
}

/// A primary and its streaming replica. Field order is drop order: the
/// replica stops before its primary, and the directory goes last.
struct Replicated {
    replica: Server,
    /// The primary of the test's own, when the tests' PostgreSQL refuses
    /// replication connections.
    _own_primary: Option<Server>,
    /// The kvstore schema on the tests' PostgreSQL, when it is the primary.
    _schema: Option<PgSchema>,
    _dir: tempfile::TempDir,
    primary_url: String,
    schema_name: String,
}

impl Replicated {
    /// `None` (the test is skipped, saying why) without root or the
    /// PostgreSQL programs.
    fn build() -> Option<Replicated> {
        needs(is_root(), "root", "run the tests as root")?;
        let bin = pg_bin();
        needs(
            bin.is_some(),
            "pg_basebackup and pg_ctl",
            "apt-get install postgresql",
        )?;
        let bin = bin?;
        let dir = tempfile::tempdir().expect("temp dir");
        chown_postgres(dir.path()).expect("chown the temp dir");
        let socket_dir = dir.path().to_owned();
        let replica_data = dir.path().join("replica");
        let replica_arg = replica_data.display().to_string();
        let base_backup = |host_port: (&str, &str)| {
            as_postgres(
                &bin,
                "pg_basebackup",
                &[
                    "-h",
                    host_port.0,
                    "-p",
                    host_port.1,
                    "-U",
                    "postgres",
                    "-D",
                    &replica_arg,
                    "-R",
                    "-X",
                    "stream",
                    "-c",
                    "fast",
                ],
            )
        };
        let tests_url = crate::harness::postgres_url();
        let tests_config: tokio_postgres::Config = tests_url.parse().expect("the tests' URL");
        let host = match tests_config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
            _ => "127.0.0.1".to_owned(),
        };
        let port = tests_config
            .get_ports()
            .first()
            .copied()
            .unwrap_or(5432)
            .to_string();
        let (own_primary, schema, primary_url, schema_name) = match base_backup((&host, &port)) {
            Ok(()) => {
                let schema = PgSchema::new();
                let (url, name) = (schema.url.clone(), schema.name.clone());
                (None, Some(schema), url, name)
            }
            Err(refused) => {
                eprintln!(
                    "the tests' PostgreSQL refused a base backup ({}); using a primary of the test's own",
                    refused.lines().last().unwrap_or_default()
                );
                let _ = std::fs::remove_dir_all(&replica_data);
                let primary_data = dir.path().join("primary");
                let primary_arg = primary_data.display().to_string();
                as_postgres(
                    &bin,
                    "initdb",
                    &["-D", &primary_arg, "-U", "postgres", "--auth=trust", "-N"],
                )
                .expect("initdb");
                let primary =
                    Server::start(&bin, &socket_dir, primary_data).expect("start the primary");
                let port = primary.port.to_string();
                base_backup(("127.0.0.1", &port)).expect("base backup of the own primary");
                let url = primary.url("postgres");
                (Some(primary), None, url, "kvstore_replica_test".to_owned())
            }
        };
        let replica = Server::start(&bin, &socket_dir, replica_data).expect("start the replica");
        Some(Replicated {
            replica,
            _own_primary: own_primary,
            _schema: schema,
            _dir: dir,
            primary_url,
            schema_name,
        })
    }

    /// A kvstore server on the primary with the replica.
    fn serve(&self, data_dir: &Path) -> Binary {
        Binary::start(
            data_dir,
            &[
                "--backend",
                "postgres",
                "--postgres-url",
                &self.primary_url,
                "--postgres-schema",
                &self.schema_name,
                "--postgres-replica-url",
                &self.replica.url(&self.database()),
                "--postgres-pool-size",
                "4",
                "--postgres-connect-timeout-ms",
                "2000",
                "--cursor-secret",
                "the secret of the replica tests",
            ],
        )
    }

    /// The database kvstore uses, on both servers.
    fn database(&self) -> String {
        let config: tokio_postgres::Config = self.primary_url.parse().expect("URL");
        config.get_dbname().unwrap_or("postgres").to_owned()
    }

    /// Runs `sql` on the replica.
    async fn on_replica(&self, sql: &str) {
        let (client, connection) =
            tokio_postgres::connect(&self.replica.url(&self.database()), tokio_postgres::NoTls)
                .await
                .expect("connect to the replica");
        tokio::spawn(connection);
        client.batch_execute(sql).await.expect(sql);
    }
}

/// A read through `client`, with who served it (`kv-served-by`).
async fn read(client: &Client, method: Method, path: &str, body: Option<&Value>) -> RawResponse {
    match body {
        Some(body) => post_json(client, path, body).await,
        None => send(client, method, path, &[], bytes::Bytes::new()).await,
    }
}

fn served_by(response: &RawResponse) -> &str {
    response
        .headers
        .get("kv-served-by")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// The value of `name{replica=...}` (the first such series) in `/metrics`.
async fn metric(client: &Client, name: &str) -> Option<f64> {
    let text = get(client, "/metrics").await;
    String::from_utf8_lossy(&text.body)
        .lines()
        .find(|line| line.starts_with(name) && !line.starts_with('#'))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

/// Waits until the server's replica is up and has replayed `revision`:
/// a read that opts in is then served by it.
fn until_replayed(client: &Client, key: &str, revision: u64) {
    let runtime = tokio::runtime::Handle::current();
    let path = format!("/v1/kv/{key}?consistency=replica&min_revision={revision}");
    poll_until(
        Duration::from_secs(30),
        "the replica to replay the write",
        || {
            let response = tokio::task::block_in_place(|| {
                runtime.block_on(read(client, Method::GET, &path, None))
            });
            response.status == StatusCode::OK && served_by(&response) == "replica"
        },
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(kvstore_test_postgres),
    ignore = "set KVSTORE_TEST_POSTGRES_URL to run it"
)]
async fn replica_reads_lag_and_revision_tokens() {
    let Some(cluster) = Replicated::build() else {
        return;
    };
    let data_dir = tempfile::tempdir().expect("temp dir");
    let server = cluster.serve(data_dir.path());
    let client = &server.client;

    // Once replayed, every read route serves it from the replica, with the
    // replica's revision.
    let first = put_text(client, "a", "one").await;
    let written = first["revision"].as_u64().expect("revision");
    until_replayed(client, "a", written);
    let entry = read(client, Method::GET, "/v1/kv/a?consistency=replica", None).await;
    assert_eq!(served_by(&entry), "replica");
    assert_eq!(expect_json(&entry, StatusCode::OK)["value"], "one");
    let page = read(
        client,
        Method::GET,
        &format!("/v1/kv?prefix=a&consistency=replica&min_revision={written}"),
        None,
    )
    .await;
    assert_eq!(served_by(&page), "replica");
    let page = expect_json(&page, StatusCode::OK);
    assert_eq!(page["items"][0]["value"], "one");
    assert!(page["revision"].as_u64().expect("revision") >= written);
    let batch = read(
        client,
        Method::POST,
        "/v1/batch/get?consistency=replica",
        Some(&json!({"keys": ["a", "b"]})),
    )
    .await;
    assert_eq!(served_by(&batch), "replica");
    let batch = expect_json(&batch, StatusCode::OK);
    assert_eq!(batch["missing"], json!(["b"]));
    assert!(batch["revision"].as_u64().expect("revision") >= written);

    // Replay paused: the replica stays behind.
    cluster.on_replica("SELECT pg_wal_replay_pause()").await;
    let second = put_text(client, "a", "two").await;
    let token = second["revision"].as_u64().expect("revision");

    // The default read never goes to the replica: it sees the write.
    for path in ["/v1/kv/a", "/v1/kv/a?consistency=primary"] {
        let response = read(client, Method::GET, path, None).await;
        assert_eq!(served_by(&response), "", "{path}");
        assert_eq!(expect_json(&response, StatusCode::OK)["value"], "two");
    }
    let page = expect_json(&get(client, "/v1/kv?prefix=a").await, StatusCode::OK);
    assert_eq!(page["items"][0]["value"], "two");
    // A key the replica has not replayed: its 404 says who answered.
    put_text(client, "new", "x").await;
    let missing = read(client, Method::GET, "/v1/kv/new?consistency=replica", None).await;
    let error = expect_error(&missing, StatusCode::NOT_FOUND, "not_found");
    assert_eq!(error["served_by"], "replica");
    let found = expect_json(&get(client, "/v1/kv/new").await, StatusCode::OK);
    assert_eq!(found["value"], "x");

    // A revision token above the replica's revision: served by the primary.
    let response = read(
        client,
        Method::GET,
        &format!("/v1/kv/a?consistency=replica&min_revision={token}"),
        None,
    )
    .await;
    assert_eq!(served_by(&response), "primary");
    assert_eq!(expect_json(&response, StatusCode::OK)["value"], "two");
    let response = read(
        client,
        Method::POST,
        &format!("/v1/batch/get?consistency=replica&min_revision={token}"),
        Some(&json!({"keys": ["a"]})),
    )
    .await;
    assert_eq!(served_by(&response), "primary");
    let batch = expect_json(&response, StatusCode::OK);
    assert!(batch["revision"].as_u64().expect("revision") >= token);

    // Without a token, the replica serves what it has, and says so: an
    // honest revision below the write.
    let page = read(
        client,
        Method::GET,
        "/v1/kv?prefix=a&consistency=replica",
        None,
    )
    .await;
    assert_eq!(served_by(&page), "replica");
    let page = expect_json(&page, StatusCode::OK);
    assert_eq!(page["items"][0]["value"], "one");
    assert!(page["revision"].as_u64().expect("revision") < token);

    // The lag shows, in revisions and in seconds.
    poll_until(Duration::from_secs(10), "the lag in revisions", || {
        let lag = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current()
                .block_on(metric(client, "kvstore_postgres_replica_lag_revisions"))
        });
        lag.is_some_and(|lag| lag >= 1.0)
    });
    let started = Instant::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    poll_until(Duration::from_secs(10), "the lag in seconds", || {
        let lag = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current()
                .block_on(metric(client, "kvstore_postgres_replica_lag_seconds"))
        });
        lag.is_some_and(|lag| lag >= 1.0)
    });
    assert!(
        metric(
            client,
            "kvstore_postgres_replica_fallbacks_total{reason=\"behind\"}"
        )
        .await
        .is_some_and(|n| n >= 2.0)
    );

    // Replay resumed: the token is honoured by the replica.
    cluster.on_replica("SELECT pg_wal_replay_resume()").await;
    until_replayed(client, "a", token);
    let response = read(
        client,
        Method::GET,
        &format!("/v1/kv/a?consistency=replica&min_revision={token}"),
        None,
    )
    .await;
    assert_eq!(expect_json(&response, StatusCode::OK)["value"], "two");
    assert!(started.elapsed() < Duration::from_secs(60));
    assert!(
        metric(client, "kvstore_postgres_replica_reads_total")
            .await
            .is_some_and(|n| n >= 4.0)
    );
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(kvstore_test_postgres),
    ignore = "set KVSTORE_TEST_POSTGRES_URL to run it"
)]
async fn a_replica_that_is_down_leaves_its_reads_to_the_primary() {
    let Some(cluster) = Replicated::build() else {
        return;
    };
    let data_dir = tempfile::tempdir().expect("temp dir");
    let server = cluster.serve(data_dir.path());
    let client = &server.client;
    let written = put_text(client, "k", "v").await["revision"]
        .as_u64()
        .expect("revision");
    until_replayed(client, "k", written);

    // A frozen replica (its connections hang): reads that opted in are
    // answered by the primary once the replica's read runs out of time
    // (the connect timeout, 2 s here), and the probe takes it out.
    cluster.replica.signal_all(libc::SIGSTOP);
    let thaw = Thaw(&cluster.replica);
    for _ in 0..3 {
        let started = Instant::now();
        let response = read(client, Method::GET, "/v1/kv/k?consistency=replica", None).await;
        assert_eq!(served_by(&response), "primary");
        assert_eq!(response.status, StatusCode::OK);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }
    poll_until(
        Duration::from_secs(10),
        "the frozen replica to be down",
        || {
            let up = tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current()
                    .block_on(metric(client, "kvstore_postgres_replica_up"))
            });
            up == Some(0.0)
        },
    );
    drop(thaw);
    until_replayed(client, "k", written);

    cluster.replica.stop();
    // Every read that opted in is answered, by the primary, from the first
    // one after the replica went away.
    for path in [
        "/v1/kv/k?consistency=replica",
        "/v1/kv?consistency=replica",
        "/v1/kv/k?consistency=replica",
    ] {
        let response = read(client, Method::GET, path, None).await;
        assert_eq!(served_by(&response), "primary", "{path}");
        assert_eq!(response.status, StatusCode::OK, "{path}");
    }
    let fallbacks = metric(client, "kvstore_postgres_replica_fallbacks_total")
        .await
        .unwrap_or_default();
    assert!(fallbacks >= 1.0, "{fallbacks}");
    poll_until(Duration::from_secs(10), "the replica to be down", || {
        let up = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current()
                .block_on(metric(client, "kvstore_postgres_replica_up"))
        });
        up == Some(0.0)
    });
    drop(server);
}

/// Bad `consistency` and `min_revision` values are 400 on every backend;
/// on one without replicas, `consistency=replica` is an ordinary read.
async fn read_params_are_checked() {
    let server = crate::harness::TestServer::start().await;
    let client = &server.client;
    put_text(client, "k", "v").await;
    for path in [
        "/v1/kv/k?consistency=eventual",
        "/v1/kv/k?min_revision=-1",
        "/v1/kv/k?min_revision=soon",
        "/v1/kv?consistency=REPLICA",
        "/v1/kv?consistency=replica&min_revision=1.5",
    ] {
        expect_error(
            &get(client, path).await,
            StatusCode::BAD_REQUEST,
            "invalid_request",
        );
    }
    expect_error(
        &post_json(
            client,
            "/v1/batch/get?consistency=all",
            &json!({"keys": ["k"]}),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    );
    // The change feed is the primary's alone.
    expect_error(
        &get(client, "/v1/changes?consistency=replica").await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    );
    if Backend::current() == Backend::Embedded {
        let response = get(client, "/v1/kv/k?consistency=replica&min_revision=1").await;
        assert_eq!(served_by(&response), "primary");
        assert_eq!(expect_json(&response, StatusCode::OK)["value"], "v");
    }
    server.stop().await;
}

for_each_backend! {
    async fn bad_read_params_are_refused() {
        read_params_are_checked().await;
    }
}
