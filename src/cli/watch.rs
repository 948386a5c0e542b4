//! `kvstore watch`: the changes to a key or range, printed as they happen,
//! one line per event (or per revision with `--json`), until Ctrl-C.

use std::io::Write;

use kvstore::client::{Change, Event, Value, WatchMessage, WatchRange, WatchRequest};
use serde_json::json;

use super::{Failure, OutputArgs, RangeArgs, ServerArgs, stop_signal, write_json};

#[derive(clap::Args)]
pub(crate) struct WatchArgs {
    /// Watch only this key.
    #[arg(long, conflicts_with_all = ["prefix", "start", "end"])]
    key: Option<String>,
    #[command(flatten)]
    range: RangeArgs,
    /// Start at this revision, if the server still keeps it (default: the
    /// changes after the current revision).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    from_revision: Option<u64>,
    /// Also print the server's progress messages (no change up to a revision).
    #[arg(long)]
    progress: bool,
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    output: OutputArgs,
}

/// Prints changes until SIGINT or SIGTERM (exit 0), reconnecting as the
/// client does; a history that no longer reaches the start ends it with
/// exit code 4.
pub(crate) async fn watch(args: WatchArgs) -> Result<(), Failure> {
    let client = args.server.client()?;
    let RangeArgs { prefix, start, end } = args.range;
    let range = match (args.key, prefix) {
        (Some(key), _) => WatchRange::Key(key),
        (None, Some(prefix)) => WatchRange::Prefix(prefix),
        (None, None) if start.is_none() && end.is_none() => WatchRange::All,
        (None, None) => WatchRange::Span { start, end },
    };
    let mut stream = client.watch(WatchRequest {
        range,
        from_revision: args.from_revision,
    });
    // Installed before the first message can come, so that a signal in
    // between ends the watch cleanly rather than killing the process.
    let mut stop = std::pin::pin!(stop_signal());
    loop {
        let message = tokio::select! {
            () = &mut stop => return Ok(()),
            message = stream.next() => message,
        };
        let message = match message {
            Some(message) => message.map_err(|err| Failure::from(err).context("watch"))?,
            None => return Ok(()),
        };
        // A line a time, flushed: the reader is often a pipe that acts on
        // each change as it comes.
        let mut out = std::io::stdout().lock();
        match (&message, args.output.json) {
            (WatchMessage::Change(change), true) => write_json(&mut out, change)?,
            (WatchMessage::Change(change), false) => write_change(&mut out, change)?,
            (WatchMessage::Progress { revision }, json) if args.progress => {
                if json {
                    write_json(&mut out, &json!({ "revision": revision }))?;
                } else {
                    writeln!(out, "{revision} progress").map_err(Failure::output)?;
                }
            }
            (WatchMessage::Progress { .. }, _) => {}
        }
        out.flush().map_err(Failure::output)?;
    }
}

/// One line per event: `1207 put users/42 v4 hello`, or
/// `1208 delete users/42 v4 (deleted)`. Values are shown as `list` shows
/// them: control characters escaped, `base64:` and the base64 when they are
/// not UTF-8.
fn write_change(out: &mut impl Write, change: &Change) -> Result<(), Failure> {
    let revision = change.revision;
    for event in &change.events {
        match event {
            Event::Put {
                key,
                value: Value::Text(text),
                version,
                ..
            } => writeln!(
                out,
                "{revision} put {key} v{version} {}",
                text.escape_debug()
            ),
            Event::Put {
                key,
                value: Value::Bytes(bytes),
                version,
                ..
            } => {
                use base64::Engine as _;
                let encoded = base64::engine::general_purpose::STANDARD.encode(bytes);
                writeln!(out, "{revision} put {key} v{version} base64:{encoded}")
            }
            Event::Delete {
                key,
                version,
                reason,
            } => writeln!(out, "{revision} delete {key} v{version} ({reason})"),
        }
        .map_err(Failure::output)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_event() {
        let put = |key: &str, value: Value| Event::Put {
            key: key.into(),
            value,
            version: 4,
            created_at: "t".into(),
            updated_at: "t".into(),
            expires_at: None,
            lease: None,
        };
        let change = Change {
            revision: 1207,
            events: vec![
                put("users/42", Value::Text("hello\nworld".into())),
                put("blobs/1", Value::Bytes(bytes::Bytes::from_static(b"\xff"))),
                Event::Delete {
                    key: "users/7".into(),
                    version: 2,
                    reason: "expired".into(),
                },
            ],
        };
        let mut out = Vec::new();
        write_change(&mut out, &change).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "1207 put users/42 v4 hello\\nworld\n\
             1207 put blobs/1 v4 base64:/w==\n\
             1207 delete users/7 v2 (expired)\n"
        );
    }
}
