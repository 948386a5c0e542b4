//! The `kvstore` binary: argument parsing and wiring only.
//!
//! Run the server with `kvstore serve` (see `kvstore serve --help`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use kvstore::api::Limits;
use kvstore::server::{self, ServerConfig};
use kvstore::storage::Store;
use kvstore::storage::embedded::{Durability, EmbeddedConfig, EmbeddedStore};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "kvstore",
    version,
    about = "A low-latency, durable key-value store"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve(ServeArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
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
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            // The engine's own info lines (table flushes, ingestion) are noise
            // for an operator; RUST_LOG can bring them back.
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("info,fjall=warn,lsm_tree=warn")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("kvstore: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Serve(args) => runtime.block_on(serve(args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("kvstore: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> Result<(), String> {
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
    let store: Arc<dyn Store> = Arc::new(store);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let address = listener.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(
        %address,
        engine = "embedded (fjall)",
        data_dir = %args.data_dir.display(),
        durability = %args.durability,
        "kvstore listening"
    );
    let config = ServerConfig {
        limits,
        shutdown_timeout: Duration::from_secs(args.shutdown_timeout_secs),
    };
    server::run(listener, store, config, shutdown_signal())
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
