//! `kvstore lease grant`, `keepalive`, `get` and `revoke`: deadlines that
//! many keys share (keys join one with `kvstore put --lease ID`).

use std::io::Write;
use std::time::Duration;

use kvstore::storage::LeaseId;
use kvstore::types::LeaseBody;
use serde_json::json;

use super::{
    Failure, OutputArgs, ServerArgs, lease_id, stop_signal, ttl_ms, ttl_text, with_stdout,
    write_json,
};
use crate::loadgen::parse_duration;

#[derive(clap::Args)]
pub(crate) struct LeaseArgs {
    #[command(subcommand)]
    command: LeaseCommand,
}

#[derive(clap::Subcommand)]
enum LeaseCommand {
    /// Grant a lease that expires after TTL unless kept alive; print its id.
    Grant(GrantArgs),
    /// Renew a lease for its full ttl: once, or --every DURATION until
    /// Ctrl-C or SIGTERM.
    Keepalive(KeepaliveArgs),
    /// Show a lease: its ttl, its deadline and how many keys are attached.
    Get(LeaseIdArgs),
    /// End a lease now, deleting every key attached to it.
    Revoke(LeaseIdArgs),
}

#[derive(clap::Args)]
struct GrantArgs {
    /// How long the lease lives without a keepalive (`10s`, `1500ms`, `2m`).
    #[arg(value_name = "TTL", value_parser = ttl_ms)]
    ttl: u64,
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(clap::Args)]
struct KeepaliveArgs {
    /// The lease's id, as `kvstore lease grant` printed it.
    #[arg(value_name = "ID", value_parser = lease_id)]
    id: LeaseId,
    /// Renew it at this interval (`3s`) until Ctrl-C or SIGTERM, printing
    /// each renewal; keep it well under the lease's ttl.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    every: Option<Duration>,
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(clap::Args)]
struct LeaseIdArgs {
    /// The lease's id, as `kvstore lease grant` printed it.
    #[arg(value_name = "ID", value_parser = lease_id)]
    id: LeaseId,
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    output: OutputArgs,
}

pub(crate) async fn lease(args: LeaseArgs) -> Result<(), Failure> {
    match args.command {
        LeaseCommand::Grant(args) => grant(args).await,
        LeaseCommand::Keepalive(args) => keepalive(args).await,
        LeaseCommand::Get(args) => get(args).await,
        LeaseCommand::Revoke(args) => revoke(args).await,
    }
}

async fn grant(args: GrantArgs) -> Result<(), Failure> {
    let lease = args.server.client()?.grant_lease(args.ttl).await?;
    with_stdout(|out| write_lease(out, "granted ", &lease, args.output.json))
}

async fn get(args: LeaseIdArgs) -> Result<(), Failure> {
    let lease = args.server.client()?.lease(args.id).await?;
    with_stdout(|out| write_lease(out, "", &lease, args.output.json))
}

async fn revoke(args: LeaseIdArgs) -> Result<(), Failure> {
    args.server.client()?.revoke_lease(args.id).await?;
    let id = kvstore::types::lease_text(args.id);
    with_stdout(|out| {
        if args.output.json {
            write_json(out, &json!({"lease": id, "revoked": true}))
        } else {
            writeln!(out, "revoked lease {id}").map_err(Failure::output)
        }
    })
}

/// Renews once, or every `--every` until SIGINT or SIGTERM (exit 0). A lease
/// that expired or was revoked ends it (exit 1); an unreachable or failing
/// server does not, as the lease may outlive the outage: the next renewal
/// tries again.
async fn keepalive(args: KeepaliveArgs) -> Result<(), Failure> {
    let client = args.server.client()?;
    let json = args.output.json;
    let Some(every) = args.every else {
        let lease = client.keep_lease_alive(args.id).await?;
        return with_stdout(|out| write_lease(out, "renewed ", &lease, json));
    };
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Installed before the first renewal, so that a signal at any point ends
    // the loop cleanly, also while a renewal waits for its answer.
    let mut stop = std::pin::pin!(stop_signal());
    let mut renewals = 0u64;
    loop {
        let renewal = tokio::select! {
            () = &mut stop => return Ok(()),
            renewal = async {
                ticks.tick().await;
                client.keep_lease_alive(args.id).await
            } => renewal,
        };
        match renewal {
            Ok(lease) => {
                if renewals == 0 && every.as_millis() >= u128::from(lease.ttl_ms) {
                    eprintln!(
                        "kvstore: warning: --every {} is not shorter than the lease's ttl ({}): \
                         it may expire between renewals",
                        interval_text(every),
                        ttl_text(lease.ttl_ms)
                    );
                }
                renewals += 1;
                // A line a time, flushed: a pipe sees each renewal as it comes.
                let mut out = std::io::stdout().lock();
                write_lease(&mut out, "renewed ", &lease, json)?;
                out.flush().map_err(Failure::output)?;
            }
            Err(err) if err.is_transient() => {
                eprintln!(
                    "kvstore: renewing the lease failed, trying again in {}: {err}",
                    interval_text(every)
                );
            }
            Err(err) => {
                return Err(Failure::from(err).context(format_args!(
                    "keepalive, after {renewals} renewal{}",
                    if renewals == 1 { "" } else { "s" }
                )));
            }
        }
    }
}

/// An interval as people wrote it, to whole milliseconds.
fn interval_text(every: Duration) -> String {
    ttl_text(u64::try_from(every.as_millis()).unwrap_or(u64::MAX))
}

/// `lease L: ttl 10s, expires at T` (`, 3 keys` when the answer counts them),
/// after `what` (`granted `); or the API's JSON.
fn write_lease(
    out: &mut (impl Write + ?Sized),
    what: &str,
    lease: &LeaseBody,
    json: bool,
) -> Result<(), Failure> {
    if json {
        return write_json(out, lease);
    }
    let keys = match lease.keys {
        None => String::new(),
        Some(1) => ", 1 key".to_owned(),
        Some(n) => format!(", {n} keys"),
    };
    writeln!(
        out,
        "{what}lease {}: ttl {}, expires at {}{keys}",
        lease.lease,
        ttl_text(lease.ttl_ms),
        lease.expires_at
    )
    .map_err(Failure::output)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_lease() {
        let mut lease = LeaseBody {
            lease: "00000000000000ab".into(),
            ttl_ms: 10_000,
            expires_at: "2026-12-06T23:00:00.000000Z".into(),
            keys: None,
        };
        let mut out = Vec::new();
        write_lease(&mut out, "granted ", &lease, false).unwrap();
        lease.keys = Some(2);
        lease.ttl_ms = 1500;
        write_lease(&mut out, "", &lease, false).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "granted lease 00000000000000ab: ttl 10s, expires at 2026-12-06T23:00:00.000000Z\n\
             lease 00000000000000ab: ttl 1500ms, expires at 2026-12-06T23:00:00.000000Z, 2 keys\n"
        );
    }
}
