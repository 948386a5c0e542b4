//! `kvstore bench`: the arguments and the printing; the engine is
//! [`crate::loadgen`].

use std::io::IsTerminal as _;
use std::sync::Arc;
use std::time::Duration;

use crate::loadgen::{self, BenchConfig, Distribution, Stop, Workload};

use super::{Failure, OutputArgs, ServerArgs, progress_bar, with_stdout, write_json};

/// Operations of a run when neither --operations nor --duration is given.
const DEFAULT_OPERATIONS: u64 = 100_000;

#[derive(clap::Args)]
pub(crate) struct BenchArgs {
    /// What to run: a YCSB core workload (ycsb-a to ycsb-f, or a to f) or a
    /// single-operation scenario.
    #[arg(value_enum)]
    workload: Workload,
    /// Records loaded before the run, and picked from during it.
    #[arg(long, default_value_t = 100_000)]
    records: u64,
    /// Operations over all connections [default: 100000].
    #[arg(long, conflicts_with = "duration")]
    operations: Option<u64>,
    /// Run for this long instead of a number of operations (30s, 2m, 500ms).
    #[arg(long, value_parser = loadgen::parse_duration)]
    duration: Option<Duration>,
    /// Connections, each sending its next operation once the last is answered.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Bytes per value.
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// Key distribution [default: the workload's: zipfian for YCSB A, B, C,
    /// E, F; latest for D; uniform for the scenarios].
    #[arg(long, value_enum)]
    distribution: Option<Distribution>,
    /// Seed of the random choices (keys, values, operations) [default: a
    /// new one each run, printed in the report]. Runs with one seed read the
    /// same keys: a run after another would find them in the server's read
    /// cache.
    #[arg(long)]
    seed: Option<u64>,
    /// Puts per batch (`batch`) and keys per range read (`range`).
    #[arg(long, default_value_t = 100)]
    batch_size: usize,
    /// Skip the load phase: run on the records an earlier run loaded (with the
    /// same --records; the keys do not depend on the seed).
    #[arg(long)]
    skip_load: bool,
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    output: OutputArgs,
}

/// Loads the records, runs the workload, prints the report and its warnings.
pub(crate) async fn run(args: BenchArgs) -> Result<(), Failure> {
    let config = BenchConfig {
        url: args.server.url,
        workload: args.workload,
        distribution: args
            .distribution
            .unwrap_or_else(|| args.workload.default_distribution()),
        records: args.records,
        stop: match args.duration {
            Some(duration) => Stop::Duration(duration),
            None => Stop::Operations(args.operations.unwrap_or(DEFAULT_OPERATIONS)),
        },
        concurrency: args.concurrency,
        value_size: args.value_size,
        batch_size: args.batch_size,
        seed: args.seed.unwrap_or_else(rand::random),
    };
    config.validate().map_err(Failure::usage)?;
    let load = if args.skip_load {
        None
    } else {
        let bar = progress_bar(
            Some(config.records),
            "load {bar:40} {human_pos}/{human_len} records ({eta} left)",
        );
        let progress = bar.clone();
        let report = loadgen::load(&config, Arc::new(move |n| progress.inc(n)))
            .await
            .map_err(|err| Failure::from(err).context("load phase"))?;
        bar.finish_and_clear();
        Some(report)
    };
    if std::io::stderr().is_terminal() {
        let stop = match config.stop {
            Stop::Operations(n) => format!("{n} operations"),
            Stop::Duration(d) => format!("{} s", d.as_secs_f64()),
        };
        eprintln!(
            "running {} for {stop} on {} connections...",
            config.workload.name(),
            config.concurrency
        );
    }
    let report = loadgen::run(&config, load).await?;
    with_stdout(|out| {
        if args.output.json {
            write_json(out, &report)
        } else {
            write!(out, "{report}").map_err(Failure::output)
        }
    })?;
    for warning in report.warnings() {
        eprintln!("warning: {warning}");
    }
    Ok(())
}
