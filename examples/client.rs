//! Talk to a running kvstore from Rust with the typed client: write, read,
//! update under a version condition, an atomic batch, and a range.
//!
//! Run a server (`cargo run --release -- serve`), then
//! `cargo run --example client` (or set `KVSTORE_URL` to reach another one).

use kvstore::client::{Client, ClientError, ListParams};
use kvstore::storage::Condition;
use kvstore::types::{BatchOp, BatchOpKind, BatchRequest};

#[tokio::main]
async fn main() -> Result<(), ClientError> {
    let url = std::env::var("KVSTORE_URL").unwrap_or_else(|_| "http://127.0.0.1:7070".into());
    let client = Client::new(&url)?;

    let written = client.put("users/42", "hello", Condition::Any).await?;
    println!("wrote users/42 at version {}", written.version);

    if let Some(entry) = client.get("users/42").await? {
        println!("read {:?} (version {})", entry.value, entry.version);
    }

    // Optimistic concurrency: write only if nobody else wrote since we read.
    let condition = Condition::Version(written.version);
    client.put("users/42", "hello again", condition).await?;
    match client.put("users/42", "lost update", condition).await {
        Err(ClientError::Api { status, error }) => {
            println!("a stale write is refused: {status} {}", error.code);
        }
        other => println!("unexpected: {other:?}"),
    }

    // Several keys in one atomic write: all land, or none.
    let ops = ["users/43", "users/44"]
        .into_iter()
        .map(|key| BatchOp {
            value: Some("new".into()),
            ..BatchOp::new(BatchOpKind::Put, key)
        })
        .collect();
    let batch = client.batch(&BatchRequest { ops }).await?;
    println!("batch written at revision {}", batch.revision);

    let page = client
        .list(&ListParams {
            prefix: Some("users/".into()),
            ..ListParams::default()
        })
        .await?;
    for item in page.items {
        println!("{} = {:?}", item.key, item.value);
    }
    Ok(())
}
