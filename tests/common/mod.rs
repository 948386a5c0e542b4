//! A kvstore server in the test process, on an ephemeral port, over a fresh
//! data directory.

#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kvstore::cache::{CacheConfig, CachedStore};
use kvstore::client::Client;
use kvstore::server::{self, ServerConfig};
use kvstore::storage::Store;
use kvstore::storage::embedded::{EmbeddedConfig, EmbeddedStore};
use kvstore::storage::metered::MeteredStore;
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

    /// A server on an existing data directory (which the caller keeps).
    pub async fn start_in(
        dir: Option<TempDir>,
        path: PathBuf,
        config: ServerConfig,
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
            Arc::new(MeteredStore::new(store.clone())),
            CacheConfig::default(),
        ));
        let task = tokio::spawn(server::run(listener, dyn_store, config, async move {
            let _ = rx.await;
        }));
        let base = format!("http://{addr}");
        TestServer {
            addr,
            client: Client::new(&base).expect("client"),
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
