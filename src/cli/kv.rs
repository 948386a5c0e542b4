//! `kvstore get`, `put`, `delete`, `list` and `batch`: one API call each (or
//! one per page), printed for people or, with `--json`, as the API's JSON.

use std::ffi::OsString;
use std::io::{IsTerminal as _, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use kvstore::client::{ClientError, ListParams, MAX_ITEMS, Value};
use kvstore::storage::{Condition, Expiry, LeaseId};
use kvstore::types::{BatchRequest, EntryBody};
use serde_json::json;

use super::{
    Failure, OutputArgs, RangeArgs, ServerArgs, deadline_text, lease_id, read_input, ttl_ms,
    with_stdout, write_json,
};

#[derive(clap::Args)]
pub(crate) struct GetArgs {
    /// The key (UTF-8; `/` is an ordinary character).
    key: String,
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    output: OutputArgs,
}

/// Prints the value of a key: its exact bytes (a newline is added only on a
/// terminal) and, on stderr so that stdout stays the value, its deadline when
/// it has one; or with `--json` the whole entry (value, version, revision,
/// times, deadline) as the API gives it.
pub(crate) async fn get(args: GetArgs) -> Result<(), Failure> {
    let client = args.server.client()?;
    let entry = client
        .get(&args.key)
        .await
        .map_err(|err| Failure::from(err).about_key(&args.key))?
        .ok_or_else(|| Failure::absent_key(&args.key))?;
    if args.output.json {
        return with_stdout(|out| write_json(out, &entry));
    }
    let deadline = deadline_text(entry.expires_at.as_deref(), entry.lease.as_deref());
    let value = Value::from_fields(&entry.key, entry.value, entry.value_base64)
        .map_err(|why| Failure::from(ClientError::Protocol(why.to_string())))?;
    let value = value.as_bytes();
    let newline = std::io::stdout().is_terminal() && !value.ends_with(b"\n");
    with_stdout(|out| {
        out.write_all(value).map_err(Failure::output)?;
        if newline {
            out.write_all(b"\n").map_err(Failure::output)?;
        }
        Ok(())
    })?;
    if let Some(deadline) = deadline {
        eprintln!("{deadline}");
    }
    Ok(())
}

#[derive(clap::Args)]
pub(crate) struct PutArgs {
    /// The key (UTF-8; `/` is an ordinary character).
    key: String,
    /// The value. Without it and without --file, the value is read from stdin.
    #[arg(conflicts_with = "file")]
    value: Option<OsString>,
    /// Read the value from this file (any bytes); `-` is stdin.
    #[arg(long, value_name = "PATH")]
    file: Option<PathBuf>,
    /// Write only if the key is at this version.
    #[arg(long, value_name = "N")]
    if_version: Option<u64>,
    /// Write only if the key does not exist.
    #[arg(long, conflicts_with = "if_version")]
    create_only: bool,
    /// Expire the key this long after the write (`30s`, `1500ms`, `2m`,
    /// `1h`). Without --ttl, --keep-ttl or --lease the key has no deadline.
    #[arg(long, value_name = "DURATION", value_parser = ttl_ms,
          conflicts_with_all = ["keep_ttl", "lease"])]
    ttl: Option<u64>,
    /// Keep the key's current deadline or lease (none for a new key).
    #[arg(long, conflicts_with = "lease")]
    keep_ttl: bool,
    /// Attach the key to a lease (`kvstore lease grant`): it expires with it.
    #[arg(long, value_name = "ID", value_parser = lease_id)]
    lease: Option<LeaseId>,
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    output: OutputArgs,
}

/// Writes a value, sent as raw bytes so that any value round-trips.
pub(crate) async fn put(args: PutArgs) -> Result<(), Failure> {
    let client = args.server.client()?;
    let value = match (args.value, &args.file) {
        (Some(value), _) => value.into_encoded_bytes(),
        (None, Some(path)) => read_input(path)?,
        (None, None) => read_input(Path::new("-"))?,
    };
    let condition = match (args.if_version, args.create_only) {
        (Some(version), _) => Condition::Version(version),
        (None, true) => Condition::Absent,
        (None, false) => Condition::Any,
    };
    let expiry = match (args.ttl, args.keep_ttl, args.lease) {
        (Some(ttl_ms), _, _) => Expiry::Ttl(ttl_ms),
        (None, true, _) => Expiry::Keep,
        (None, false, Some(id)) => Expiry::Lease(id),
        (None, false, None) => Expiry::Never,
    };
    let answer = client
        .put_with(&args.key, Bytes::from(value), condition, expiry)
        .await
        .map_err(|err| Failure::from(err).about_key(&args.key))?;
    with_stdout(|out| {
        if args.output.json {
            return write_json(out, &answer);
        }
        let what = if answer.created { "created" } else { "updated" };
        writeln!(
            out,
            "{what} {} (version {}, revision {})",
            answer.key, answer.version, answer.revision
        )
        .map_err(Failure::output)
    })
}

#[derive(clap::Args)]
pub(crate) struct DeleteArgs {
    /// The key (UTF-8; `/` is an ordinary character).
    key: String,
    /// Delete only if the key is at this version.
    #[arg(long, value_name = "N")]
    if_version: Option<u64>,
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    output: OutputArgs,
}

pub(crate) async fn delete(args: DeleteArgs) -> Result<(), Failure> {
    let client = args.server.client()?;
    let deleted = client
        .delete(&args.key, args.if_version)
        .await
        .map_err(|err| Failure::from(err).about_key(&args.key))?;
    if !deleted {
        return Err(Failure::absent_key(&args.key));
    }
    with_stdout(|out| {
        if args.output.json {
            write_json(out, &json!({"key": args.key, "deleted": true}))
        } else {
            writeln!(out, "deleted {}", args.key).map_err(Failure::output)
        }
    })
}

#[derive(clap::Args)]
pub(crate) struct ListArgs {
    #[command(flatten)]
    range: RangeArgs,
    /// At most this many items. Without --all, one page, which the server
    /// allows up to 1000 items.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    limit: Option<u64>,
    /// Descending key order.
    #[arg(long)]
    reverse: bool,
    /// Keys only, no values.
    #[arg(long)]
    keys_only: bool,
    /// Follow the cursors through the whole range (or up to --limit).
    #[arg(long)]
    all: bool,
    /// Continue from the cursor that an earlier listing printed.
    #[arg(long)]
    cursor: Option<String>,
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    output: OutputArgs,
}

/// Lists a range, one page or (`--all`) all of them, printing items as they
/// come, so that a long listing needs no memory.
pub(crate) async fn list(args: ListArgs) -> Result<(), Failure> {
    let client = args.server.client()?;
    let mut remaining = args.limit;
    let mut pages = client.pages(ListParams {
        start: args.range.start.clone(),
        end: args.range.end.clone(),
        prefix: args.range.prefix.clone(),
        limit: None,
        cursor: args.cursor.clone(),
        keys_only: args.keys_only,
        reverse: args.reverse,
    });
    let mut printer = ListPrinter {
        out: std::io::BufWriter::new(std::io::stdout().lock()),
        json: args.output.json,
        keys_only: args.keys_only,
        printed: 0,
    };
    printer.start().map_err(Failure::output)?;
    loop {
        // A page never holds more than the items still wanted, so the cursor
        // after it is exactly where a later listing continues.
        let page_limit = match (args.all, remaining) {
            (true, None) => Some(MAX_ITEMS as u64),
            (true, Some(r)) => Some(r.min(MAX_ITEMS as u64)),
            (false, limit) => limit,
        };
        if let Some(limit) = page_limit {
            pages.set_page_limit(usize::try_from(limit).unwrap_or(MAX_ITEMS));
        }
        let Some(items) = pages.next_page().await? else {
            break;
        };
        remaining = remaining.map(|r| r.saturating_sub(items.len() as u64));
        for item in &items {
            printer.item(item).map_err(Failure::output)?;
        }
        if !args.all || remaining == Some(0) {
            break;
        }
    }
    let cursor = pages.cursor();
    printer.finish(cursor).map_err(Failure::output)?;
    if let Some(cursor) = cursor.filter(|_| !args.output.json) {
        eprintln!(
            "more items follow: continue with --cursor {cursor}, or list them all with --all"
        );
    }
    Ok(())
}

/// The output of `list`: one line per entry for people, or the JSON of
/// GET /v1/kv (`{"items": [...], "next_cursor": ...}`) written piece by piece.
struct ListPrinter<W: Write> {
    out: W,
    json: bool,
    keys_only: bool,
    printed: u64,
}

impl<W: Write> ListPrinter<W> {
    fn start(&mut self) -> std::io::Result<()> {
        if self.json {
            self.out.write_all(b"{\"items\":[")?;
        }
        Ok(())
    }

    /// For people: the key, a tab, and the value with control characters
    /// escaped (so that every entry stays on one line), or `base64:` and the
    /// value when it is not UTF-8; then, for a key with a deadline, a tab
    /// and `expires at T` (`, lease L`).
    fn item(&mut self, item: &EntryBody) -> std::io::Result<()> {
        if self.json {
            if self.printed > 0 {
                self.out.write_all(b",")?;
            }
            serde_json::to_writer(&mut self.out, item)?;
        } else {
            write!(self.out, "{}", item.key)?;
            match (&item.value, &item.value_base64) {
                _ if self.keys_only => {}
                (Some(text), _) => write!(self.out, "\t{}", text.escape_debug())?,
                (None, Some(encoded)) => write!(self.out, "\tbase64:{encoded}")?,
                (None, None) => {}
            }
            if let Some(deadline) = deadline_text(item.expires_at.as_deref(), item.lease.as_deref())
            {
                write!(self.out, "\t{deadline}")?;
            }
            writeln!(self.out)?;
        }
        self.printed += 1;
        Ok(())
    }

    /// Ends the output (with the cursor to go on from, in JSON) and flushes
    /// it, so that it comes before any hint on stderr.
    fn finish(&mut self, cursor: Option<&str>) -> std::io::Result<()> {
        if self.json {
            self.out.write_all(b"],\"next_cursor\":")?;
            serde_json::to_writer(&mut self.out, &cursor)?;
            self.out.write_all(b"}\n")?;
        }
        self.out.flush()
    }
}

#[derive(clap::Args)]
pub(crate) struct BatchArgs {
    /// A JSON file with the body of POST /v1/batch (`{"ops": [...]}`), or `-`
    /// for stdin.
    file: PathBuf,
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    output: OutputArgs,
}

/// Applies an atomic batch of writes.
pub(crate) async fn batch(args: BatchArgs) -> Result<(), Failure> {
    let client = args.server.client()?;
    let request: BatchRequest =
        serde_json::from_slice(&read_input(&args.file)?).map_err(|err| {
            Failure::usage(format!(
                "{} is not a batch ({{\"ops\": [...]}} as in POST /v1/batch): {err}",
                args.file.display()
            ))
        })?;
    let answer = client.batch(&request).await?;
    with_stdout(|out| {
        if args.output.json {
            return write_json(out, &answer);
        }
        let mut text = format!(
            "applied {} ops at revision {}\n",
            answer.results.len(),
            answer.revision
        );
        for result in &answer.results {
            let line = match (result.version, result.deleted) {
                (Some(version), _) => format!("  put {} (version {version})\n", result.key),
                (None, Some(true)) => format!("  deleted {}\n", result.key),
                (None, _) => format!("  {} did not exist\n", result.key),
            };
            text.push_str(&line);
        }
        out.write_all(text.as_bytes()).map_err(Failure::output)
    })
}
