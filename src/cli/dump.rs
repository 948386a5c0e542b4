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
//!
//! A key with a deadline carries `expires_at` (RFC 3339), and import writes
//! it with `ttl_ms` = the time left when its batch is sent, so it expires
//! when it would have; a key whose deadline has passed is skipped. Leases are
//! not dumped: a key attached to one keeps only the lease's deadline at
//! export time, as a ttl of its own.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;

use chrono::{DateTime, Utc};

use kvstore::client::{Client, ListParams, MAX_ITEMS};
use kvstore::types::{BatchOp, BatchOpKind, BatchRequest};
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
    /// The key's deadline (its own, or its lease's) when it was exported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_at: Option<String>,
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
                expires_at: item.expires_at,
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

/// The put of one dump line, and its key's deadline, if it has one.
#[derive(Debug)]
struct Restore {
    op: BatchOp,
    expires_at: Option<DateTime<Utc>>,
}

/// The puts waiting to be sent as one batch.
struct PendingBatch {
    restores: Vec<Restore>,
    /// The keys in `restores`: a batch may name a key only once.
    keys: HashSet<String>,
    /// The dump bytes of `restores`, close to the size of the request body.
    bytes: usize,
    /// The line of the first put, for error messages.
    first_line: usize,
    /// Puts per batch.
    size: usize,
    /// Batches sent so far.
    sent: u64,
    /// Keys written so far.
    imported: u64,
    /// Keys left out because their deadline had passed.
    skipped: u64,
}

impl PendingBatch {
    /// Whether a put of `key`, from a line of `len` bytes, must wait for the
    /// next batch.
    fn is_full_for(&self, key: &str, len: usize) -> bool {
        !self.restores.is_empty()
            && (self.restores.len() >= self.size
                || self.bytes + len > IMPORT_BATCH_BYTES
                || self.keys.contains(key))
    }

    fn push(&mut self, restore: Restore, line: usize, len: usize) {
        if self.restores.is_empty() {
            self.first_line = line;
        }
        self.bytes += len;
        self.keys.insert(restore.op.key.clone());
        self.restores.push(restore);
    }

    /// Sends the waiting puts, if any, each with the time its key has left;
    /// `last_line` is for error messages.
    async fn send(&mut self, client: &Client, last_line: usize) -> Result<(), Failure> {
        let restores = std::mem::take(&mut self.restores);
        self.keys.clear();
        self.bytes = 0;
        let waiting = restores.len();
        let now = Utc::now();
        let ops: Vec<BatchOp> = restores
            .into_iter()
            .filter_map(|restore| with_time_left(restore, now))
            .collect();
        self.skipped += (waiting - ops.len()) as u64;
        if ops.is_empty() {
            return Ok(());
        }
        let count = ops.len() as u64;
        client.batch(&BatchRequest { ops }).await.map_err(|err| {
            Failure::from(err).context(format!("lines {}-{last_line}", self.first_line))
        })?;
        self.imported += count;
        self.sent += 1;
        Ok(())
    }
}

/// The put of `restore`, with `ttl_ms` = the time its key has left at
/// `now`; `None` when its deadline has passed.
fn with_time_left(restore: Restore, now: DateTime<Utc>) -> Option<BatchOp> {
    let Restore { mut op, expires_at } = restore;
    if let Some(deadline) = expires_at {
        let left_us = (deadline - now).num_microseconds().unwrap_or(i64::MAX);
        let left_us = u64::try_from(left_us).ok().filter(|us| *us > 0)?;
        // Rounded up: a key with microseconds left still gets its millisecond.
        op.ttl_ms = Some(left_us.div_ceil(1000));
    }
    Some(op)
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
        restores: Vec::new(),
        keys: HashSet::new(),
        bytes: 0,
        first_line: 0,
        size: usize::try_from(args.batch_size).unwrap_or(MAX_ITEMS),
        sent: 0,
        imported: 0,
        skipped: 0,
    };
    let mut number = 0usize;
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
        let restore = parse_line(&line)
            .map_err(|why| Failure::usage(why).context(format!("line {number}")))?;
        if pending.is_full_for(&restore.op.key, line.len()) {
            pending.send(&client, number - 1).await?;
        }
        pending.push(restore, number, line.len());
    }
    pending.send(&client, number).await?;
    bar.finish_and_clear();
    let PendingBatch {
        imported,
        skipped,
        sent: batches,
        ..
    } = pending;
    with_stdout(|out| {
        if args.output.json {
            return write_json(
                out,
                &json!({"imported": imported, "batches": batches, "skipped": skipped}),
            );
        }
        let mut text = format!(
            "imported {imported} keys in {batches} {}",
            if batches == 1 { "batch" } else { "batches" }
        );
        if skipped > 0 {
            text.push_str(&format!(
                "; skipped {skipped} {} whose deadline had passed",
                if skipped == 1 { "key" } else { "keys" }
            ));
        }
        writeln!(out, "{text}").map_err(Failure::output)
    })
}

/// The put of one dump line, and the deadline its key had.
fn parse_line(line: &str) -> Result<Restore, String> {
    let record: DumpRecord =
        serde_json::from_str(line).map_err(|err| format!("not a dump record: {err}"))?;
    if record.value.is_some() == record.value_base64.is_some() {
        return Err(format!(
            "the record of '{}' needs exactly one of value and value_base64",
            record.key
        ));
    }
    let expires_at = record
        .expires_at
        .map(|text| {
            DateTime::parse_from_rfc3339(&text)
                .map(|at| at.with_timezone(&Utc))
                .map_err(|err| {
                    format!(
                        "expires_at of '{}' is not an RFC 3339 time such as \
                         2026-12-06T23:00:00.000000Z: {err}",
                        record.key
                    )
                })
        })
        .transpose()?;
    Ok(Restore {
        op: BatchOp {
            value: record.value,
            value_base64: record.value_base64,
            ..BatchOp::new(BatchOpKind::Put, record.key)
        },
        expires_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dump_lines() {
        let op = parse_line(r#"{"key":"a","value":"1","version":3,"revision":9}"#)
            .unwrap()
            .op;
        assert_eq!((op.key.as_str(), op.value.as_deref()), ("a", Some("1")));
        let op = parse_line(r#"{"key":"b","value_base64":"AAE=","created_at":"x"}"#)
            .unwrap()
            .op;
        assert_eq!(op.value_base64.as_deref(), Some("AAE="));
        assert!(
            parse_line(r#"{"key":"c"}"#)
                .unwrap_err()
                .contains("exactly one")
        );
        assert!(parse_line(r#"{"key":"c","value":"1","value_base64":"AA=="}"#).is_err());
        assert!(parse_line("[1]").unwrap_err().contains("not a dump record"));
        assert!(
            parse_line(r#"{"key":"d","value":"1","expires_at":"soon"}"#)
                .unwrap_err()
                .contains("RFC 3339")
        );
    }

    #[test]
    fn a_deadline_becomes_the_time_left() {
        let restore =
            parse_line(r#"{"key":"a","value":"1","expires_at":"2026-12-06T23:00:00.000000Z"}"#)
                .unwrap();
        let deadline = restore.expires_at.unwrap();
        let at = |ms: i64| deadline - chrono::TimeDelta::milliseconds(ms);
        let ttl = |restore, now| with_time_left(restore, now).map(|op| op.ttl_ms);
        let again = || {
            parse_line(r#"{"key":"a","value":"1","expires_at":"2026-12-06T23:00:00Z"}"#).unwrap()
        };
        assert_eq!(ttl(restore, at(30_000)), Some(Some(30_000)));
        // Microseconds left still make a millisecond; none left, no put.
        assert_eq!(
            ttl(again(), deadline - chrono::TimeDelta::microseconds(10)),
            Some(Some(1))
        );
        assert_eq!(ttl(again(), deadline), None);
        assert_eq!(ttl(again(), at(-5)), None);
        // A key without a deadline is written without one.
        let plain = parse_line(r#"{"key":"b","value":"1"}"#).unwrap();
        assert_eq!(ttl(plain, deadline), Some(None));
    }
}
