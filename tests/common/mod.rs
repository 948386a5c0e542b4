//! A kvstore server in the test process, on an ephemeral port, over a fresh
//! data directory.

#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kvstore::cache::{CacheConfig, CachedStore};
use kvstore::client::{Client, ClientOptions};
use kvstore::server::{self, Security, ServerConfig};
use kvstore::storage::Store;
use kvstore::storage::embedded::{EmbeddedConfig, EmbeddedStore};
use kvstore::storage::guarded::GuardedStore;
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub struct TestServer {
    pub addr: SocketAddr,
    pub base: String,
    pub client: Client,
    pub store: Arc<EmbeddedStore>,
    dir: Option<TempDir>,
    path: PathBuf,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    /// A server with the default configuration and engine.
    pub async fn start() -> Self {
        Self::start_with(ServerConfig::default(), |_| {}).await
    }

    /// A server whose configuration and engine the caller may adjust.
    pub async fn start_with(
        config: ServerConfig,
        engine: impl FnOnce(&mut EmbeddedConfig),
    ) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().to_path_buf();
        Self::start_in(Some(dir), path, config, engine).await
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
        let store = Arc::new(EmbeddedStore::open(engine_config).expect("open store"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (tx, rx) = oneshot::channel::<()>();
        // The store as `kvstore serve` builds it by default: measured, with
        // the read cache in front.
        let dyn_store: Arc<dyn Store> = Arc::new(CachedStore::new(
            Arc::new(GuardedStore::new(
                store.clone(),
                config.request_timeout,
                config.metrics,
            )),
            CacheConfig::default(),
        ));
        let scheme = if security.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let task = tokio::spawn(server::run_secured(
            listener,
            dyn_store,
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
            store,
            dir,
            path,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    pub fn data_dir(&self) -> &Path {
        &self.path
    }

    /// Shuts the server down gracefully; returns the data directory so a test
    /// can reopen it.
    pub async fn stop(mut self) -> Option<TempDir> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("server task").expect("server run");
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
        use std::io::BufRead;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kvstore"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
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
                if let Some(rest) = line.split("127.0.0.1:").nth(1) {
                    let port: String = rest.chars().take_while(char::is_ascii_digit).collect();
                    let _ = address_tx.send(format!("127.0.0.1:{port}"));
                }
                lines.lock().unwrap().push(line);
            }
        });
        let address = address_rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("kvstore did not report its address");
        Binary {
            child,
            client: Client::new(&format!("http://{address}")).expect("client"),
            addr: address,
            log,
            reader: Some(reader),
        }
    }

    /// Sends SIGTERM, waits for the exit, and returns whether it was clean.
    pub fn terminate(&mut self) -> bool {
        let pid = i32::try_from(self.child.id()).expect("pid");
        // SAFETY: kill(2) on our own child's pid has no memory effects.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        self.child.wait().expect("wait").success()
    }

    /// Every log line, once the process has exited.
    pub fn log(&mut self) -> Vec<String> {
        if let Some(reader) = self.reader.take() {
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
