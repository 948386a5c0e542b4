//! The `kvstore` binary: argument parsing and wiring only.
//!
//! Run the server with `kvstore serve` (see `kvstore serve --help`); talk to
//! it with `kvstore get`, `put`, `delete`, `list`, `batch`, `watch`,
//! `lease`, `export`, `import`, and measure it with `kvstore bench` (see
//! `kvstore --help`).

mod cli;
mod loadgen;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mimalloc::MiMalloc;
use tracing_subscriber::EnvFilter;

/// glibc's allocator spent 10-14% of the server's CPU under load (contention
/// between the runtime's workers and the committer); mimalloc's per-thread
/// heaps take most of that away.
#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

/// Turns transparent huge pages off for this process, unless the operator
/// chose with mimalloc's own `MIMALLOC_ALLOW_THP`.
///
/// mimalloc asks for huge pages on its arena, and the kernel then backs
/// each touched 2 MiB of it in full: an idle watch (a connection's few
/// small buffers spread over the heap) cost 21.5 KiB of resident memory
/// with huge pages and 13.7 KiB without. A failure here only leaves the
/// kernel's default, so it is not an error.
fn keep_small_pages() {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        let _ = rustix::thread::disable_transparent_huge_pages(true);
    }
}

#[derive(Parser)]
#[command(
    name = "kvstore",
    version,
    about = "A low-latency, durable key-value store"
)]
struct Cli {
    /// Log lines as human-readable text or as JSON objects (one per line).
    /// Levels follow RUST_LOG (default: info).
    #[arg(long, global = true, env = "KVSTORE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve(Box<cli::serve::ServeArgs>),
    /// Print the value of a key.
    Get(cli::kv::GetArgs),
    /// Write a value (from the argument, --file, or stdin).
    Put(cli::kv::PutArgs),
    /// Delete a key.
    Delete(cli::kv::DeleteArgs),
    /// List a range of keys.
    List(cli::kv::ListArgs),
    /// Apply an atomic batch of writes from a JSON file.
    Batch(cli::kv::BatchArgs),
    /// Print the changes to a key or range as they happen.
    Watch(cli::watch::WatchArgs),
    /// Grant, renew, show or revoke a lease: a deadline that keys share.
    Lease(cli::lease::LeaseArgs),
    /// Write entries to stdout as NDJSON.
    Export(cli::dump::ExportArgs),
    /// Write the entries of an NDJSON dump, in batches.
    Import(cli::dump::ImportArgs),
    /// Measure a server with YCSB workloads or single-operation scenarios.
    Bench(cli::bench::BenchArgs),
    /// Make tokens and their hashes for the token file (--auth-file).
    Token(cli::security::TokenArgs),
}

fn main() -> ExitCode {
    keep_small_pages();
    let cli = Cli::parse();
    init_logging(cli.log_format);
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
        Command::Serve(args) => runtime
            .block_on(cli::serve::run(*args))
            .map_err(cli::Failure::general),
        Command::Get(args) => runtime.block_on(cli::kv::get(args)),
        Command::Put(args) => runtime.block_on(cli::kv::put(args)),
        Command::Delete(args) => runtime.block_on(cli::kv::delete(args)),
        Command::List(args) => runtime.block_on(cli::kv::list(args)),
        Command::Batch(args) => runtime.block_on(cli::kv::batch(args)),
        Command::Watch(args) => runtime.block_on(cli::watch::watch(args)),
        Command::Lease(args) => runtime.block_on(cli::lease::lease(args)),
        Command::Export(args) => runtime.block_on(cli::dump::export(args)),
        Command::Import(args) => runtime.block_on(cli::dump::import(args)),
        Command::Bench(args) => runtime.block_on(cli::bench::run(args)),
        Command::Token(args) => cli::security::token(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => failure.report(),
    }
}

fn init_logging(format: LogFormat) {
    // The engine's own info lines (table flushes, ingestion) are noise for an
    // operator; RUST_LOG can bring them back.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,fjall=warn,lsm_tree=warn"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => logs.json().init(),
    }
}
