//! kvstore inside your own program: open the store stack that `kvstore
//! serve` runs (the embedded engine, its guard and read cache) on a
//! directory, use it directly, then serve it over HTTP on a port of your
//! choosing and stop it when you are done.
//!
//! Run with `cargo run --example embedded -- [DATA_DIR]` (default: a new
//! directory under the system's temporary directory).

use std::sync::Arc;

use kvstore::client::Client;
use kvstore::server::{self, ServerConfig};
use kvstore::stack::{Backend, Stack, StackConfig};
use kvstore::storage::embedded::EmbeddedConfig;
use kvstore::storage::{Condition, Expiry, Store, WriteOp, WriteOutcome};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args().nth(1).map_or_else(
        || std::env::temp_dir().join(format!("kvstore-example-{}", std::process::id())),
        Into::into,
    );
    let stack = Stack::build(StackConfig::new(Backend::Embedded(EmbeddedConfig::new(
        &dir,
    ))))
    .await?;
    let store: Arc<dyn Store> = stack.store;

    // The store itself: one atomic group of writes, durable when it returns.
    let outcome = store
        .write(vec![WriteOp::Put {
            key: b"greeting".to_vec(),
            value: b"hello".to_vec(),
            condition: Condition::Absent,
            expiry: Expiry::Never,
        }])
        .await?;
    match outcome {
        WriteOutcome::Applied { revision, .. } => println!("written at revision {revision}"),
        WriteOutcome::Rejected { .. } => println!("greeting was already there"),
    }

    // The same store over HTTP, on an ephemeral port, until told to stop.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server::run(
        listener,
        store.clone(),
        ServerConfig::default(),
        async move {
            let _ = stopped.await;
        },
    ));
    let entry = Client::new(&url)?.get("greeting").await?;
    println!(
        "read over HTTP from {url}: {:?}",
        entry.and_then(|e| e.value)
    );

    // Stopping drains the server and closes the store with a final sync.
    let _ = stop.send(());
    serving.await??;
    println!("data kept in {}", dir.display());
    Ok(())
}
