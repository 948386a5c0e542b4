//! `kvstore export` and `kvstore import`: a store (or a prefix of it) as
//! NDJSON, one entry per line:
//!
//! ```text
//! {"key":"users/42","value":"hello","version":3,"revision":1207}
//! {"key":"blobs/1","value_base64":"AAE=","version":1,"revision":9}
//! ```
//!
//! `version` and `revision` say what was exported; import ignores them, as
//! the target store assigns its own. Import writes plain puts in batches, so
//! importing the same dump twice leaves the same values.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;

use kvstore::api::types::{BatchOp, BatchOpKind, BatchRequest};
use kvstore::client::{Client, ListParams, MAX_ITEMS};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{Failure, OutputArgs, ServerArgs, progress_bar, with_stdout, write_json};

/// Request bodies of an import stay below this, well within the server's
/// 16 MiB default, whatever the values weigh.
const IMPORT_BATCH_BYTES: usize = 4 << 20;

/// One line of a dump.
#[derive(Debug, Serialize, Deserialize)]
struct DumpRecord {
    key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value_base64: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    version: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    revision: Option<u64>,
}

#[derive(clap::Args)]
pub(crate) struct ExportArgs {
    /// Only keys that begin with this.
    #[arg(long)]
    prefix: Option<String>,
    #[command(flatten)]
    server: ServerArgs,
}

/// Writes every entry (of a prefix) to stdout, page by page. Each key that
/// exists for the whole export is written exactly once; writes during it may
/// or may not be in it (pages are not one snapshot).
pub(crate) async fn export(args: ExportArgs) -> Result<(), Failure> {
    let client = args.server.client()?;
    let mut pages = client.pages(ListParams {
        prefix: args.prefix,
        limit: Some(MAX_ITEMS),
        ..ListParams::default()
    });
    let bar = progress_bar(None, "{spinner} {human_pos} keys exported");
    let mut count = 0u64;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    while let Some(items) = pages.next_page().await? {
        for item in items {
            let record = DumpRecord {
                key: item.key,
                value: item.value,
                value_base64: item.value_base64,
                version: Some(item.version),
                revision: Some(item.revision),
            };
            write_json(&mut out, &record)?;
            count += 1;
            bar.inc(1);
        }
    }
    out.flush().map_err(Failure::output)?;
    bar.finish_and_clear();
    eprintln!("exported {count} keys");
    Ok(())
}

#[derive(clap::Args)]
pub(crate) struct ImportArgs {
    /// An NDJSON dump as `kvstore export` writes it, or `-` for stdin.
    file: PathBuf,
    /// Puts per POST /v1/batch.
    #[arg(long, default_value_t = 500,
          value_parser = clap::value_parser!(u64).range(1..=MAX_ITEMS as u64))]
    batch_size: u64,
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    output: OutputArgs,
}

/// The puts waiting to be sent as one batch.
struct PendingBatch {
    ops: Vec<BatchOp>,
    /// The keys in `ops`: a batch may name a key only once.
    keys: HashSet<String>,
    /// The dump bytes of `ops`, close to the size of the request body.
    bytes: usize,
    /// The line of the first op, for error messages.
    first_line: usize,
    /// Puts per batch.
    size: usize,
    /// Batches sent so far.
    sent: u64,
}

impl PendingBatch {
    /// Whether a put of `key`, from a line of `len` bytes, must wait for the
    /// next batch.
    fn is_full_for(&self, key: &str, len: usize) -> bool {
        !self.ops.is_empty()
            && (self.ops.len() >= self.size
                || self.bytes + len > IMPORT_BATCH_BYTES
                || self.keys.contains(key))
    }

    fn push(&mut self, op: BatchOp, line: usize, len: usize) {
        if self.ops.is_empty() {
            self.first_line = line;
        }
        self.bytes += len;
        self.keys.insert(op.key.clone());
        self.ops.push(op);
    }

    /// Sends the waiting puts, if any; `last_line` is for error messages.
    async fn send(&mut self, client: &Client, last_line: usize) -> Result<(), Failure> {
        if self.ops.is_empty() {
            return Ok(());
        }
        let ops = std::mem::take(&mut self.ops);
        client.batch(&BatchRequest { ops }).await.map_err(|err| {
            Failure::from(err).context(format!("lines {}-{last_line}", self.first_line))
        })?;
        self.keys.clear();
        self.bytes = 0;
        self.sent += 1;
        Ok(())
    }
}

/// Reads a dump line by line and writes it in batches of plain puts.
pub(crate) async fn import(args: ImportArgs) -> Result<(), Failure> {
    let client = args.server.client()?;
    let cannot_read =
        |err: std::io::Error| Failure::usage(format!("cannot read {}: {err}", args.file.display()));
    // A file's progress is in bytes, of its known length; stdin's in keys.
    let (input, len): (Box<dyn Read>, _) = if args.file.as_os_str() == "-" {
        (Box::new(std::io::stdin()), None)
    } else {
        let file = std::fs::File::open(&args.file).map_err(cannot_read)?;
        let len = file.metadata().map_err(cannot_read)?.len();
        (Box::new(file), Some(len))
    };
    let bar = match len {
        Some(len) => progress_bar(
            Some(len),
            "{bar:40} {binary_bytes}/{binary_total_bytes} ({binary_bytes_per_sec}, {eta} left)",
        ),
        None => progress_bar(None, "{spinner} {human_pos} keys imported"),
    };
    let mut pending = PendingBatch {
        ops: Vec::new(),
        keys: HashSet::new(),
        bytes: 0,
        first_line: 0,
        size: usize::try_from(args.batch_size).unwrap_or(MAX_ITEMS),
        sent: 0,
    };
    let (mut imported, mut number) = (0u64, 0usize);
    for line in BufReader::new(input).lines() {
        number += 1;
        let line = line.map_err(cannot_read)?;
        bar.inc(if len.is_some() {
            line.len() as u64 + 1
        } else {
            1
        });
        if line.trim().is_empty() {
            continue;
        }
        let op = parse_line(&line)
            .map_err(|why| Failure::usage(why).context(format!("line {number}")))?;
        if pending.is_full_for(&op.key, line.len()) {
            pending.send(&client, number - 1).await?;
        }
        pending.push(op, number, line.len());
        imported += 1;
    }
    pending.send(&client, number).await?;
    bar.finish_and_clear();
    let batches = pending.sent;
    with_stdout(|out| {
        if args.output.json {
            write_json(out, &json!({"imported": imported, "batches": batches}))
        } else {
            writeln!(
                out,
                "imported {imported} keys in {batches} {}",
                if batches == 1 { "batch" } else { "batches" }
            )
            .map_err(Failure::output)
        }
    })
}

/// The put of one dump line.
fn parse_line(line: &str) -> Result<BatchOp, String> {
    let record: DumpRecord =
        serde_json::from_str(line).map_err(|err| format!("not a dump record: {err}"))?;
    if record.value.is_some() == record.value_base64.is_some() {
        return Err(format!(
            "the record of '{}' needs exactly one of value and value_base64",
            record.key
        ));
    }
    Ok(BatchOp {
        value: record.value,
        value_base64: record.value_base64,
        ..BatchOp::new(BatchOpKind::Put, record.key)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dump_lines() {
        let op = parse_line(r#"{"key":"a","value":"1","version":3,"revision":9}"#).unwrap();
        assert_eq!((op.key.as_str(), op.value.as_deref()), ("a", Some("1")));
        let op = parse_line(r#"{"key":"b","value_base64":"AAE=","created_at":"x"}"#).unwrap();
        assert_eq!(op.value_base64.as_deref(), Some("AAE="));
        assert!(
            parse_line(r#"{"key":"c"}"#)
                .unwrap_err()
                .contains("exactly one")
        );
        assert!(parse_line(r#"{"key":"c","value":"1","value_base64":"AA=="}"#).is_err());
        assert!(parse_line("[1]").unwrap_err().contains("not a dump record"));
    }
}
