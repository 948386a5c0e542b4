//! A kvstore server in the test process, on an ephemeral port, over a fresh
//! data directory or a fresh PostgreSQL schema; and what runs one test body
//! against every backend.

pub mod plfs;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use kvstore::client::{Client, ClientOptions};
use kvstore::server::{self, RespConfig, Security, ServerConfig};
use kvstore::stack::{self, Stack, StackConfig};
use kvstore::storage::Store;
use kvstore::storage::embedded::EmbeddedConfig;
use kvstore::storage::postgres::{Pooler, PostgresConfig, PostgresStore};
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

// Every wait in a test has a deadline: a bug must fail the test with what it
// waited for, not hang CI until its job is killed with nothing to show.

/// Awaits `future` for at most `secs` seconds; past that, fails the test
/// naming `what` it waited for.
pub async fn within<F: Future>(secs: u64, what: &str, future: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(secs), future)
        .await
        .unwrap_or_else(|_| panic!("{what}: not done within {secs} s"))
}

/// Polls `done` (every 5 ms, without blocking the runtime) until it holds;
/// fails the test naming `what` after `secs` seconds.
pub async fn eventually(secs: u64, what: &str, mut done: impl FnMut() -> bool) {
    within(secs, what, async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

/// [`eventually`] for a thread outside any runtime (Drop guards, helpers of
/// the std API): polls `done` every 10 ms for at most `deadline`.
pub fn poll_until(deadline: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + deadline;
    while !done() {
        assert!(
            Instant::now() < until,
            "{what}: not done within {deadline:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits at most `deadline` for a child process to exit; `None` if it has not.
pub fn wait_child(
    child: &mut std::process::Child,
    deadline: Duration,
) -> Option<std::process::ExitStatus> {
    let until = Instant::now() + deadline;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(10)),
            _ => return None,
        }
    }
}

/// Runs `command` to its end with `stdin` as its input and returns its
/// output; kills it and fails the test if it takes over `deadline`.
pub fn output_within(
    command: &mut std::process::Command,
    stdin: &[u8],
    deadline: Duration,
) -> std::process::Output {
    use std::io::Write as _;
    use std::process::Stdio;
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the command");
    let pid = child.id();
    let stdin = stdin.to_vec();
    let (done, output) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // A command that does not read its input may exit before the write.
        let _ = child.stdin.take().expect("stdin").write_all(&stdin);
        let _ = done.send(child.wait_with_output());
    });
    match output.recv_timeout(deadline) {
        Ok(output) => output.expect("the command's output"),
        Err(_) => {
            // Not reaped yet (the waiting thread has not returned), so the
            // pid is still the child's.
            let _ = send_signal(pid, libc::SIGKILL);
            panic!("{command:?} did not finish within {deadline:?}");
        }
    }
}

/// `Some(())` when `found`, else `None` with the reason printed: the test
/// is then skipped, except under `CI=true`, where a missing tool fails it
/// (CI must not pass by skipping). `install` says how to get `what`.
pub fn needs(found: bool, what: &str, install: &str) -> Option<()> {
    if found {
        return Some(());
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{what} is missing under CI: {install}"
    );
    eprintln!("skipped: {what} is missing ({install})");
    None
}

/// [`needs`] of a command on the PATH.
pub fn tool(name: &str, install: &str) -> Option<()> {
    let found = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .is_ok_and(|out| out.status.success());
    needs(found, name, install)
}

/// A gate that a hook (a commit hook, a store's) waits at until the test
/// opens it.
#[derive(Default)]
pub struct Gate {
    open: Mutex<bool>,
    changed: Condvar,
}

/// The longest a hook waits at a closed gate. Past it, the hook goes on:
/// a test that failed before opening its gate must not leave the committer
/// (and with it the store's close and the runtime's shutdown) stuck.
const GATE_DEADLINE: Duration = Duration::from_secs(60);

impl Gate {
    pub fn wait(&self) {
        let open = self.open.lock().unwrap();
        let (open, waited) = self
            .changed
            .wait_timeout_while(open, GATE_DEADLINE, |open| !*open)
            .unwrap();
        if waited.timed_out() && !*open {
            eprintln!("the gate stayed closed for {GATE_DEADLINE:?}; going on");
        }
    }

    pub fn set(&self, open: bool) {
        *self.open.lock().unwrap() = open;
        self.changed.notify_all();
    }
}

/// Sends `signal` to a child process that has not been reaped yet (so its
/// pid is still its own). The tests' one way to signal a process.
#[allow(unsafe_code)]
pub fn send_signal(pid: u32, signal: libc::c_int) -> std::io::Result<()> {
    let pid = i32::try_from(pid).map_err(std::io::Error::other)?;
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    if unsafe { libc::kill(pid, signal) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Whether the tests run as root (mounts need it).
#[allow(unsafe_code)]
pub fn is_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

/// The value of the unlabelled series `name` in a `/metrics` text.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// The table files of the embedded engine in `data_dir`, of every keyspace:
/// fjall writes one when it flushes a memtable.
pub fn table_files(data_dir: &Path) -> Vec<PathBuf> {
    let entries = |dir: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.path())
            .collect()
    };
    entries(&data_dir.join("keyspaces"))
        .iter()
        .flat_map(|keyspace| entries(&keyspace.join("tables")))
        .collect()
}

/// The storage backend a test body runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Embedded,
    Postgres,
    /// PostgreSQL through PgBouncer in transaction pooling mode.
    Pgbouncer,
}

tokio::task_local! {
    static BACKEND: Backend;
}

impl Backend {
    /// The backend of the running test (embedded outside [`Backend::run`]).
    pub fn current() -> Backend {
        BACKEND.try_with(|b| *b).unwrap_or(Backend::Embedded)
    }

    /// Runs a test body with this backend.
    pub async fn run(self, body: impl Future<Output = ()>) {
        BACKEND.scope(self, body).await;
    }
}

/// The value of a service's URL variable; a test that needs it is only
/// built as runnable when it was set at build time (see build.rs).
fn service_url(variable: &str) -> Option<String> {
    std::env::var(variable).ok().filter(|url| !url.is_empty())
}

/// The PostgreSQL of the tests, from `KVSTORE_TEST_POSTGRES_URL`.
pub fn postgres_url() -> String {
    service_url("KVSTORE_TEST_POSTGRES_URL")
        .expect("KVSTORE_TEST_POSTGRES_URL is unset: it must be set when the tests are run, as when they were built")
}

/// A PgBouncer in transaction pooling mode in front of the tests'
/// PostgreSQL, from `KVSTORE_TEST_PGBOUNCER_URL`.
pub fn pgbouncer_url() -> String {
    service_url("KVSTORE_TEST_PGBOUNCER_URL")
        .expect("KVSTORE_TEST_PGBOUNCER_URL is unset: it must be set when the tests are run, as when they were built")
}

/// The Redis of the tests, from `KVSTORE_TEST_REDIS_URL`.
pub fn redis_url() -> String {
    service_url("KVSTORE_TEST_REDIS_URL")
        .expect("KVSTORE_TEST_REDIS_URL is unset: it must be set when the tests are run, as when they were built")
}

/// CI must run every test: there, a service variable left unset fails the
/// run instead of leaving its tests ignored.
#[test]
fn ci_sets_every_service() {
    if std::env::var("CI").as_deref() != Ok("true") {
        return;
    }
    let unset: Vec<&str> = [
        "KVSTORE_TEST_POSTGRES_URL",
        "KVSTORE_TEST_REDIS_URL",
        "KVSTORE_TEST_PGBOUNCER_URL",
    ]
    .into_iter()
    .filter(|variable| service_url(variable).is_none())
    .collect();
    assert!(
        unset.is_empty(),
        "CI=true, but {unset:?} unset: their tests would not run"
    );
}

/// A schema of its own for one test, dropped (with everything in it) when
/// this is dropped, also when the test fails.
pub struct PgSchema {
    pub url: String,
    pub name: String,
    /// Set when `url` is PgBouncer's (the test runs on
    /// [`Backend::Pgbouncer`]): PostgreSQL's own, for LISTEN.
    pub direct_url: Option<String>,
}

impl PgSchema {
    /// A new, unique schema name on the tests' PostgreSQL, reached through
    /// PgBouncer when the test runs on [`Backend::Pgbouncer`].
    pub fn new() -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let url = postgres_url();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!(
            "kvstore_test_{}_{}_{}",
            std::process::id(),
            nanos,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        match Backend::current() {
            Backend::Pgbouncer => PgSchema {
                url: pgbouncer_url(),
                name,
                direct_url: Some(url),
            },
            _ => PgSchema {
                url,
                name,
                direct_url: None,
            },
        }
    }

    /// A plain connection to the schema's database, for a test to look at
    /// or change what a store wrote.
    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(connection);
        client
    }

    /// A store configuration on this schema.
    pub fn config(&self) -> PostgresConfig {
        let mut config = PostgresConfig::new(&self.url);
        config.schema.clone_from(&self.name);
        config.application_name.clone_from(&self.name);
        config.pool_size = 8;
        if let Some(direct) = &self.direct_url {
            config.pooler = Pooler::Transaction;
            config.listen_url = Some(direct.clone());
        }
        config
    }

    /// Opens a store on this schema.
    pub async fn open(&self) -> Arc<PostgresStore> {
        Arc::new(
            PostgresStore::open(self.config())
                .await
                .expect("open the PostgreSQL store"),
        )
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        let url = self.direct_url.clone().unwrap_or_else(|| self.url.clone());
        let name = self.name.clone();
        // Drop may run inside the test's runtime: use a thread of our own.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let drop_schema = async move {
                let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::spawn(connection);
                client
                    .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE"))
                    .await
                    .map_err(|e| e.to_string())
            };
            runtime.block_on(async {
                tokio::time::timeout(Duration::from_secs(60), drop_schema)
                    .await
                    .unwrap_or_else(|_| Err("no answer within 60 s".into()))
            })
        })
        .join();
        if let Ok(Err(err)) = dropped {
            eprintln!("could not drop test schema: {err}");
        }
    }
}

/// Declares each test body once and runs it against every backend, as
/// `embedded::name`, `postgres::name` and `pgbouncer::name` (PostgreSQL
/// through PgBouncer in transaction pooling mode); the latter two ignored,
/// with the reason, when the tests were built without
/// `KVSTORE_TEST_POSTGRES_URL` or `KVSTORE_TEST_PGBOUNCER_URL`. Attributes of the bodies
/// (`#[tokio::test]`, docs) are dropped: each generated test is a
/// two-thread tokio test.
#[macro_export]
macro_rules! for_each_backend {
    ($( $(#[$meta:meta])* async fn $name:ident() $body:block )*) => {
        $( async fn $name() $body )*

        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    $crate::harness::Backend::Embedded.run(super::$name()).await;
                }
            )*
        }

        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                #[cfg_attr(not(kvstore_test_postgres), ignore = "set KVSTORE_TEST_POSTGRES_URL to run it")]
                async fn $name() {
                    $crate::harness::Backend::Postgres.run(super::$name()).await;
                }
            )*
        }

        mod pgbouncer {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                #[cfg_attr(
                    not(all(kvstore_test_postgres, kvstore_test_pgbouncer)),
                    ignore = "set KVSTORE_TEST_POSTGRES_URL and KVSTORE_TEST_PGBOUNCER_URL to run it"
                )]
                async fn $name() {
                    $crate::harness::Backend::Pgbouncer.run(super::$name()).await;
                }
            )*
        }
    };
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub base: String,
    pub client: Client,
    /// The backend itself, under the metering and the cache.
    pub store: Arc<dyn Store>,
    dir: Option<TempDir>,
    path: PathBuf,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
    /// Dropped after the server stops.
    schema: Option<PgSchema>,
    /// Where it speaks RESP, if it does.
    pub resp_addr: Option<SocketAddr>,
}

impl TestServer {
    /// A server with the default configuration and engine.
    pub async fn start() -> Self {
        Self::start_with(ServerConfig::default(), |_| {}).await
    }

    /// A server on the test's backend (see [`Backend::run`]) whose
    /// configuration and embedded engine the caller may adjust (`engine` is
    /// not called on PostgreSQL).
    pub async fn start_with(
        config: ServerConfig,
        engine: impl FnOnce(&mut EmbeddedConfig),
    ) -> Self {
        match Backend::current() {
            Backend::Embedded => {
                let dir = tempfile::tempdir().expect("temp dir");
                let path = dir.path().to_path_buf();
                Self::start_in(Some(dir), path, config, engine).await
            }
            Backend::Postgres | Backend::Pgbouncer => {
                let schema = PgSchema::new();
                let backend = stack::Backend::Postgres(schema.config());
                let options = ClientOptions::default();
                let mut server =
                    Self::serve(backend, config, Security::default(), &options, None).await;
                server.schema = Some(schema);
                server
            }
        }
    }

    /// A server with tokens, TLS or a cursor secret; its `client` is made
    /// with `options` (a token, the CA of its certificate).
    pub async fn start_secured(
        config: ServerConfig,
        security: Security,
        options: &ClientOptions,
    ) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().to_path_buf();
        Self::start_in_secured(Some(dir), path, config, security, options, |_| {}).await
    }

    /// A server on an existing data directory (which the caller keeps).
    pub async fn start_in(
        dir: Option<TempDir>,
        path: PathBuf,
        config: ServerConfig,
        engine: impl FnOnce(&mut EmbeddedConfig),
    ) -> Self {
        let options = ClientOptions::default();
        Self::start_in_secured(dir, path, config, Security::default(), &options, engine).await
    }

    async fn start_in_secured(
        dir: Option<TempDir>,
        path: PathBuf,
        config: ServerConfig,
        security: Security,
        options: &ClientOptions,
        engine: impl FnOnce(&mut EmbeddedConfig),
    ) -> Self {
        let mut engine_config = EmbeddedConfig::new(&path);
        engine(&mut engine_config);
        let backend = stack::Backend::Embedded(engine_config);
        let mut server = Self::serve(backend, config, security, options, None).await;
        server.dir = dir;
        server.path = path;
        server
    }

    /// Serves `backend` as `kvstore serve` does by default: the stack that
    /// [`Stack::build`] makes for it.
    async fn serve(
        backend: stack::Backend,
        config: ServerConfig,
        security: Security,
        options: &ClientOptions,
        resp: Option<RespConfig>,
    ) -> Self {
        let mut stack_config = StackConfig::new(backend);
        stack_config.layers.request_timeout = config.request_timeout;
        stack_config.layers.metrics = config.metrics;
        let stack = Stack::build(stack_config).await.expect("the store stack");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (tx, rx) = oneshot::channel::<()>();
        let scheme = if security.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let resp = match resp {
            Some(resp) => {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind RESP");
                Some((listener, resp))
            }
            None => None,
        };
        let resp_addr = resp
            .as_ref()
            .map(|(listener, _)| listener.local_addr().expect("RESP address"));
        let task = tokio::spawn(server::run_all(
            listener,
            resp,
            stack.store,
            config,
            security,
            async move {
                let _ = rx.await;
            },
        ));
        let base = format!("{scheme}://{addr}");
        TestServer {
            addr,
            client: Client::with_options(&base, options).expect("client"),
            base,
            store: stack.engine,
            dir: None,
            path: PathBuf::new(),
            shutdown: Some(tx),
            task: Some(task),
            schema: None,
            resp_addr,
        }
    }

    /// A server on the test's backend that also speaks RESP, on `resp_addr`,
    /// with `security` (tokens) on both, and its embedded engine adjusted by
    /// `engine` (not called on PostgreSQL).
    pub async fn start_with_resp(
        security: Security,
        engine: impl FnOnce(&mut EmbeddedConfig),
    ) -> Self {
        Self::start_with_resp_config(security, engine, RespConfig::default()).await
    }

    /// [`TestServer::start_with_resp`], with the RESP front door's `resp`.
    pub async fn start_with_resp_config(
        security: Security,
        engine: impl FnOnce(&mut EmbeddedConfig),
        resp: RespConfig,
    ) -> Self {
        let (backend, dir, schema) = match Backend::current() {
            Backend::Embedded => {
                let dir = tempfile::tempdir().expect("temp dir");
                let mut engine_config = EmbeddedConfig::new(dir.path());
                engine(&mut engine_config);
                (stack::Backend::Embedded(engine_config), Some(dir), None)
            }
            Backend::Postgres | Backend::Pgbouncer => {
                let schema = PgSchema::new();
                (
                    stack::Backend::Postgres(schema.config()),
                    None,
                    Some(schema),
                )
            }
        };
        let options = ClientOptions::default();
        let config = ServerConfig::default();
        let mut server = Self::serve(backend, config, security, &options, Some(resp)).await;
        if let Some(dir) = &dir {
            server.path = dir.path().to_path_buf();
        }
        server.dir = dir;
        server.schema = schema;
        server
    }

    /// Shuts the server down gracefully; returns the data directory so a test
    /// can reopen it.
    pub async fn stop(mut self) -> Option<TempDir> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            within(60, "the server's shutdown", task)
                .await
                .expect("server task")
                .expect("server run");
        }
        self.dir.take()
    }
}

/// The `kvstore` binary running `serve` on an ephemeral port, killed when
/// dropped so that a failed assertion leaves no server behind.
pub struct Binary {
    pub child: std::process::Child,
    pub client: Client,
    /// The address it listens on (`127.0.0.1:PORT`).
    pub addr: String,
    log: Arc<std::sync::Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Binary {
    /// Starts `kvstore serve --listen 127.0.0.1:0 --data-dir DIR ARGS...` and
    /// waits for the line that names its address.
    pub fn start(data_dir: &Path, args: &[&str]) -> Self {
        Self::start_on("127.0.0.1:0", data_dir, args)
    }

    /// [`Binary::start`] on `listen` (`127.0.0.1:PORT`): a restart on the
    /// address of the server before it, so that its clients find it again.
    pub fn start_on(listen: &str, data_dir: &Path, args: &[&str]) -> Self {
        Self::try_start_on(listen, data_dir, args)
            .unwrap_or_else(|log| panic!("kvstore did not start: {log:#?}"))
    }

    /// [`Binary::start`], or the log lines of a server that exited (within a
    /// minute) without listening.
    pub fn try_start(data_dir: &Path, args: &[&str]) -> Result<Self, Vec<String>> {
        Self::try_start_on("127.0.0.1:0", data_dir, args)
    }

    fn try_start_on(listen: &str, data_dir: &Path, args: &[&str]) -> Result<Self, Vec<String>> {
        use std::io::BufRead;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kvstore"))
            .args(["serve", "--listen", listen, "--data-dir"])
            .arg(data_dir)
            .args(args)
            .env_remove("RUST_LOG")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start kvstore");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (address_tx, address_rx) = std::sync::mpsc::channel();
        let lines = Arc::clone(&log);
        // Reads the whole log (so the server never blocks on a full pipe) and
        // reports the port of the "listening" line, in text or JSON format.
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line
                    .contains("kvstore listening")
                    .then(|| line.split("127.0.0.1:").nth(1))
                    .flatten()
                {
                    let port: String = rest.chars().take_while(char::is_ascii_digit).collect();
                    let _ = address_tx.send(format!("127.0.0.1:{port}"));
                }
                lines.lock().unwrap().push(line);
            }
        });
        let address = match address_rx.recv_timeout(Duration::from_secs(60)) {
            Ok(address) => address,
            // The log ended without the line: the server exited.
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                let _ = wait_child(&mut child, Duration::from_secs(60));
                let _ = reader.join();
                return Err(log.lock().unwrap().clone());
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                panic!("kvstore did not report its address within 60 s");
            }
        };
        Ok(Binary {
            child,
            client: Client::new(&format!("http://{address}")).expect("client"),
            addr: address,
            log,
            reader: Some(reader),
        })
    }

    /// Sends SIGTERM, waits (at most a minute) for the exit, and returns
    /// whether it was clean.
    pub fn terminate(&mut self) -> bool {
        send_signal(self.child.id(), libc::SIGTERM).expect("SIGTERM");
        self.wait().success()
    }

    /// Waits (at most a minute) for the process to exit.
    pub fn wait(&mut self) -> std::process::ExitStatus {
        wait_child(&mut self.child, Duration::from_secs(60))
            .expect("kvstore did not exit within 60 s")
    }

    /// The log lines so far, while the process runs.
    pub fn lines_so_far(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Every log line, once the process has exited.
    pub fn log(&mut self) -> Vec<String> {
        if let Some(reader) = self.reader.take() {
            // The reader ends at the end of the log, when the process exits.
            poll_until(Duration::from_secs(60), "the log reader", || {
                reader.is_finished()
            });
            reader.join().expect("log reader");
        }
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP forwarder (to PostgreSQL or Redis) that the test can take down (closing every
/// connection through it) and bring back on the same port.
pub struct Proxy {
    pub addr: SocketAddr,
    target: SocketAddr,
    running: Option<(JoinHandle<()>, tokio::sync::oneshot::Sender<()>)>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        Proxy {
            addr,
            target,
            running: Some(Self::serve(listener, target)),
        }
    }

    fn serve(
        listener: tokio::net::TcpListener,
        target: SocketAddr,
    ) -> (JoinHandle<()>, tokio::sync::oneshot::Sender<()>) {
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    accepted = listener.accept() => {
                        let Ok((mut inbound, _)) = accepted else { break };
                        connections.spawn(async move {
                            if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound)
                                    .await;
                            }
                        });
                    }
                }
            }
            // Waits until every forwarded connection is closed.
            connections.shutdown().await;
        });
        (task, stop)
    }

    /// Returns once the port is closed and so is every connection through it:
    /// a request sent after this cannot slip through a connection still
    /// being torn down.
    pub async fn down(&mut self) {
        if let Some((task, stop)) = self.running.take() {
            let _ = stop.send(());
            let _ = within(60, "the proxy's connections to close", task).await;
        }
    }

    pub async fn up(&mut self) {
        let listener = tokio::net::TcpListener::bind(self.addr)
            .await
            .expect("rebind");
        self.running = Some(Self::serve(listener, self.target));
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some((task, _)) = self.running.take() {
            task.abort();
        }
    }
}
