//! `kvstore serve`: open the configured store and serve the API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kvstore::api::Limits;
use kvstore::cache::{CacheConfig, CacheMode, CachedStore};
use kvstore::server::{self, ServerConfig};
use kvstore::storage::Store;
use kvstore::storage::embedded::{Durability, EmbeddedConfig, EmbeddedStore};
use kvstore::storage::guarded::GuardedStore;

#[derive(clap::Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "KVSTORE_LISTEN", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Directory of the embedded engine's data; created if missing.
    #[arg(long, env = "KVSTORE_DATA_DIR", default_value = "./kvstore-data")]
    data_dir: PathBuf,
    /// When a write is acknowledged: after its fsync, or once in the OS's
    /// buffers with a background sync every --sync-interval-ms.
    #[arg(long, env = "KVSTORE_DURABILITY", value_enum, default_value_t = Durability::Fsync)]
    durability: Durability,
    /// Background sync interval of buffered durability, in milliseconds.
    #[arg(long, env = "KVSTORE_SYNC_INTERVAL_MS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..))]
    sync_interval_ms: u64,
    /// Longest key, in bytes.
    #[arg(long, env = "KVSTORE_MAX_KEY_BYTES", default_value_t = 1024,
          value_parser = clap::value_parser!(u64).range(1..=65_536))]
    max_key_bytes: u64,
    /// Largest value, in bytes (counted after base64 decoding).
    #[arg(long, env = "KVSTORE_MAX_VALUE_BYTES", default_value_t = 1 << 20)]
    max_value_bytes: usize,
    /// Largest request body, in bytes.
    #[arg(long, env = "KVSTORE_MAX_BODY_BYTES", default_value_t = 16 << 20)]
    max_body_bytes: usize,
    /// Seconds that in-flight requests get to finish after SIGINT or SIGTERM.
    #[arg(long, env = "KVSTORE_SHUTDOWN_TIMEOUT_SECS", default_value_t = 10)]
    shutdown_timeout_secs: u64,
    /// Read cache in front of storage: `local` (in this process) or `off`.
    #[arg(long, env = "KVSTORE_CACHE", value_enum, default_value_t = CacheMode::Local)]
    cache: CacheMode,
    /// Entries the cache holds at most ("absent" markers included).
    #[arg(long, env = "KVSTORE_CACHE_MAX_ENTRIES", default_value_t = 1_000_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    cache_max_entries: u64,
    /// Bytes the cache holds at most (keys, values and per-entry overhead).
    #[arg(long, env = "KVSTORE_CACHE_MAX_BYTES", default_value_t = 256 << 20,
          value_parser = clap::value_parser!(u64).range(1..))]
    cache_max_bytes: u64,
    /// Seconds an entry may be served from the cache; 0 keeps entries until
    /// they are replaced or evicted.
    #[arg(long, env = "KVSTORE_CACHE_TTL_SECS", default_value_t = 300)]
    cache_ttl_secs: u64,
    /// Values larger than this many bytes are not cached.
    #[arg(long, env = "KVSTORE_CACHE_MAX_VALUE_BYTES", default_value_t = CacheConfig::default().max_value_bytes)]
    cache_max_value_bytes: usize,
    /// Seconds a request may run before it is answered 503 unavailable.
    #[arg(long, env = "KVSTORE_REQUEST_TIMEOUT_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..))]
    request_timeout_secs: u64,
    /// Requests slower than this many milliseconds are logged at WARN, with
    /// where the time went.
    #[arg(long, env = "KVSTORE_SLOW_MS", default_value_t = 10)]
    slow_ms: u64,
    /// Connections served at once; more wait in the listen backlog.
    #[arg(long, env = "KVSTORE_MAX_CONNECTIONS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    max_connections: u64,
    /// Record Prometheus metrics and serve them at GET /metrics.
    #[arg(long, env = "KVSTORE_METRICS", default_value_t = true, action = clap::ArgAction::Set)]
    metrics: bool,
    #[command(flatten)]
    security: super::security::SecurityArgs,
}

/// Runs the server until SIGINT or SIGTERM.
pub(crate) async fn run(args: ServeArgs) -> Result<(), String> {
    let limits = Limits {
        max_key_bytes: usize::try_from(args.max_key_bytes).map_err(|e| e.to_string())?,
        max_value_bytes: args.max_value_bytes,
        max_body_bytes: args.max_body_bytes,
    };
    let mut engine = EmbeddedConfig::new(&args.data_dir);
    engine.durability = args.durability;
    engine.sync_interval = Duration::from_millis(args.sync_interval_ms);
    let store = tokio::task::spawn_blocking(move || EmbeddedStore::open(engine))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot open {}: {e}", args.data_dir.display()))?;
    let request_timeout = Duration::from_secs(args.request_timeout_secs);
    let mut store: Arc<dyn Store> = Arc::new(GuardedStore::new(
        Arc::new(store),
        request_timeout,
        args.metrics,
    ));
    let cache = CacheConfig {
        max_entries: usize::try_from(args.cache_max_entries).map_err(|e| e.to_string())?,
        max_bytes: args.cache_max_bytes,
        ttl: (args.cache_ttl_secs > 0).then(|| Duration::from_secs(args.cache_ttl_secs)),
        max_value_bytes: args.cache_max_value_bytes,
    };
    if args.cache == CacheMode::Local {
        store = Arc::new(CachedStore::new(store, cache));
    }
    let security = args.security.load(&args.data_dir)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let address = listener.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(
        %address,
        engine = "embedded (fjall)",
        data_dir = %args.data_dir.display(),
        durability = %args.durability,
        cache = %args.cache,
        tls = security.tls.is_some(),
        "kvstore listening"
    );
    let config = ServerConfig {
        limits,
        shutdown_timeout: Duration::from_secs(args.shutdown_timeout_secs),
        request_timeout,
        slow_request: Duration::from_millis(args.slow_ms),
        max_connections: usize::try_from(args.max_connections).map_err(|e| e.to_string())?,
        metrics: args.metrics,
        header_read_timeout: args.security.header_read_timeout(),
    };
    server::run_secured(listener, store, config, security, shutdown_signal())
        .await
        .map_err(|e| format!("shutdown: {e}"))
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
