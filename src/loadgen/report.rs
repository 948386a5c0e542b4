//! Recording latencies per operation (HdrHistogram) and the report of a run,
//! as a table (`Display`) and as JSON (`Serialize`).

use std::fmt;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::distribution::Distribution;
use super::workload::{Op, Workload};
use kvstore::client::ClientError;

/// The share of all cores above which the client itself is taken to limit the
/// figures: past it, its threads queue for CPU and add their wait to every
/// latency.
pub const SATURATED_CPU_SHARE: f64 = 0.8;

/// When the whole machine is this busy and the client takes at least
/// [`CONTENDING_CPU_SHARE`] of it, client and server compete for the CPUs (the
/// usual case of a benchmark on one machine): the server would do better with
/// the client elsewhere.
pub const BUSY_MACHINE_SHARE: f64 = 0.9;

/// See [`BUSY_MACHINE_SHARE`].
pub const CONTENDING_CPU_SHARE: f64 = 0.25;

/// The highest latency a histogram tells apart (one hour, in ns); slower
/// operations are recorded as this.
const HIGHEST_NS: u64 = 3_600_000_000_000;

/// What one operation came to.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Done; `false` for a read that found no key.
    Done {
        found: bool,
    },
    Failed(ClientError),
}

/// The latencies and failures of one kind of operation.
#[derive(Debug, Clone)]
struct OpStats {
    /// Latencies of successful operations, in nanoseconds.
    latencies: Histogram<u64>,
    errors: u64,
    missing: u64,
    first_error: Option<String>,
}

impl OpStats {
    fn new() -> Self {
        OpStats {
            // 3 significant digits: 0.1% resolution at every scale. The
            // bounds are constants that hdrhistogram accepts (a unit test
            // builds one), so this cannot fail at run time.
            #[allow(clippy::expect_used)]
            latencies: Histogram::new_with_bounds(1, HIGHEST_NS, 3)
                .expect("constant histogram bounds are valid"),
            errors: 0,
            missing: 0,
            first_error: None,
        }
    }

    fn merge(&mut self, other: &OpStats) {
        // Both have the same bounds, so adding cannot fail.
        let _ = self.latencies.add(&other.latencies);
        self.errors += other.errors;
        self.missing += other.missing;
        if self.first_error.is_none() {
            self.first_error.clone_from(&other.first_error);
        }
    }
}

/// Per-operation statistics of one connection, or of several merged.
#[derive(Debug, Clone, Default)]
pub(crate) struct Recorder {
    /// Indexed by [`Op::index`]; `None` for ops that never ran.
    ops: Vec<Option<OpStats>>,
}

impl Recorder {
    fn stats(&mut self, op: Op) -> &mut OpStats {
        if self.ops.len() < Op::ALL.len() {
            self.ops.resize(Op::ALL.len(), None);
        }
        self.ops[op.index()].get_or_insert_with(OpStats::new)
    }

    pub(crate) fn record(&mut self, op: Op, latency: Duration, outcome: Outcome) {
        let stats = self.stats(op);
        match outcome {
            Outcome::Done { found } => {
                let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
                stats.latencies.saturating_record(ns.max(1));
                stats.missing += u64::from(!found);
            }
            Outcome::Failed(err) => {
                stats.errors += 1;
                if stats.first_error.is_none() {
                    stats.first_error = Some(err.to_string());
                }
            }
        }
    }

    pub(crate) fn merge(&mut self, other: &Recorder) {
        for (op, theirs) in Op::ALL.iter().zip(&other.ops) {
            if let Some(theirs) = theirs {
                self.stats(*op).merge(theirs);
            }
        }
    }

    /// One row per op that ran, and the row of all of them.
    fn summarize(&self, elapsed: Duration) -> (Vec<OpReport>, OpReport) {
        let mut all = OpStats::new();
        let mut rows = Vec::new();
        for (op, stats) in Op::ALL.iter().zip(&self.ops) {
            if let Some(stats) = stats {
                rows.push(OpReport::new(op.name(), stats, elapsed));
                all.merge(stats);
            }
        }
        (rows, OpReport::new("all", &all, elapsed))
    }
}

/// Latency percentiles, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p99_9: f64,
    pub max: f64,
}

/// The figures of one kind of operation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OpReport {
    pub op: &'static str,
    /// Successful operations.
    pub count: u64,
    pub errors: u64,
    /// Reads that found no key (they count as successful).
    pub missing: u64,
    /// Successful operations per second of the run.
    pub ops_per_sec: f64,
    pub latency_us: Latency,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
}

impl OpReport {
    fn new(op: &'static str, stats: &OpStats, elapsed: Duration) -> Self {
        let h = &stats.latencies;
        let us = |ns: u64| ns as f64 / 1000.0;
        OpReport {
            op,
            count: h.len(),
            errors: stats.errors,
            missing: stats.missing,
            ops_per_sec: h.len() as f64 / elapsed.as_secs_f64().max(f64::MIN_POSITIVE),
            latency_us: Latency {
                p50: us(h.value_at_quantile(0.5)),
                p90: us(h.value_at_quantile(0.9)),
                p99: us(h.value_at_quantile(0.99)),
                p99_9: us(h.value_at_quantile(0.999)),
                max: us(h.max()),
            },
            first_error: stats.first_error.clone(),
        }
    }
}

/// How the load phase went.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoadReport {
    pub records: u64,
    pub elapsed_secs: f64,
    pub records_per_sec: f64,
}

/// The CPU the bench process used during the run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CpuReport {
    /// CPU seconds (user + system) of the whole bench process.
    pub cpu_secs: f64,
    pub cores: usize,
    /// `cpu_secs / (elapsed × cores)`: 1.0 is every core busy all the time.
    pub share: f64,
    /// Whether `share` reached [`SATURATED_CPU_SHARE`].
    pub saturated: bool,
    /// How busy all the machine's CPUs were, every process included; `None`
    /// where the platform does not say.
    pub machine_busy: Option<f64>,
}

impl CpuReport {
    pub(crate) fn new(
        cpu: Duration,
        elapsed: Duration,
        cores: usize,
        machine_busy: Option<f64>,
    ) -> Self {
        let share =
            cpu.as_secs_f64() / (elapsed.as_secs_f64() * cores as f64).max(f64::MIN_POSITIVE);
        CpuReport {
            cpu_secs: cpu.as_secs_f64(),
            cores,
            share,
            saturated: share >= SATURATED_CPU_SHARE,
            machine_busy,
        }
    }
}

/// Everything a run measured, and how it was set up.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub workload: Workload,
    pub mix: String,
    pub distribution: Distribution,
    pub records: u64,
    pub value_size: usize,
    pub batch_size: usize,
    pub concurrency: usize,
    pub seed: u64,
    /// `None` when the load phase was skipped.
    pub load: Option<LoadReport>,
    pub elapsed_secs: f64,
    /// One entry per kind of operation that ran, in a fixed order.
    pub operations: Vec<OpReport>,
    /// All operations together.
    pub total: OpReport,
    /// `None` where the platform does not report CPU time.
    pub client_cpu: Option<CpuReport>,
}

impl Report {
    pub(crate) fn new(
        config: &super::BenchConfig,
        load: Option<LoadReport>,
        recorder: &Recorder,
        elapsed: Duration,
        client_cpu: Option<CpuReport>,
    ) -> Self {
        let (operations, total) = recorder.summarize(elapsed);
        Report {
            workload: config.workload,
            mix: config.workload.describe_mix(),
            distribution: config.distribution,
            records: config.records,
            value_size: config.value_size,
            batch_size: config.batch_size,
            concurrency: config.concurrency,
            seed: config.seed,
            load,
            elapsed_secs: elapsed.as_secs_f64(),
            operations,
            total,
            client_cpu,
        }
    }

    /// Lines that a reader of the figures must not miss: failed operations,
    /// reads of absent keys, a saturated client.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        for row in &self.operations {
            if row.errors > 0 {
                warnings.push(format!(
                    "{} {} operations failed; the first: {}",
                    row.errors,
                    row.op,
                    row.first_error.as_deref().unwrap_or("(no message)")
                ));
            }
            if row.missing > 0 {
                warnings.push(format!(
                    "{} of {} {} operations found no key; was the load phase skipped on a store \
                     without these records?",
                    row.missing, row.count, row.op
                ));
            }
        }
        match &self.client_cpu {
            Some(cpu) if cpu.saturated => warnings.push(format!(
                "the bench client used {:.0}% of {} cores: it, not the server, may limit these \
                 figures; run it on another machine, or compare with fewer --concurrency",
                cpu.share * 100.0,
                cpu.cores
            )),
            Some(CpuReport {
                share,
                machine_busy: Some(busy),
                ..
            }) if *busy >= BUSY_MACHINE_SHARE && *share >= CONTENDING_CPU_SHARE => {
                warnings.push(format!(
                    "the machine's CPUs were {:.0}% busy and the bench client used {:.0}% of \
                     them: client and server competed for CPU, so the server would do better \
                     with the client on another machine",
                    busy * 100.0,
                    share * 100.0
                ));
            }
            _ => {}
        }
        warnings
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} ({}), {} keys; {} records of {} bytes, {} connections, seed {}",
            self.workload.name(),
            self.mix,
            self.distribution.name(),
            self.records,
            self.value_size,
            self.concurrency,
            self.seed
        )?;
        if let Some(load) = &self.load {
            writeln!(
                f,
                "load: {} records in {:.2} s ({:.0} records/s)",
                load.records, load.elapsed_secs, load.records_per_sec
            )?;
        }
        writeln!(
            f,
            "run: {} operations in {:.2} s",
            self.total.count + self.total.errors,
            self.elapsed_secs
        )?;
        writeln!(f)?;
        writeln!(
            f,
            "{:<18} {:>9} {:>7} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8}",
            "operation",
            "count",
            "errors",
            "ops/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms"
        )?;
        let ms = |us: f64| us / 1000.0;
        for row in self.operations.iter().chain(std::iter::once(&self.total)) {
            let l = &row.latency_us;
            writeln!(
                f,
                "{:<18} {:>9} {:>7} {:>10.1} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3}",
                row.op,
                row.count,
                row.errors,
                row.ops_per_sec,
                ms(l.p50),
                ms(l.p90),
                ms(l.p99),
                ms(l.p99_9),
                ms(l.max)
            )?;
        }
        if let Some(cpu) = &self.client_cpu {
            write!(
                f,
                "\nclient CPU: {:.2} s, {:.0}% of {} cores",
                cpu.cpu_secs,
                cpu.share * 100.0,
                cpu.cores
            )?;
            match cpu.machine_busy {
                Some(busy) => writeln!(f, "; machine CPU {:.0}% busy", busy * 100.0)?,
                None => writeln!(f)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_merging() {
        let mut a = Recorder::default();
        let mut b = Recorder::default();
        for ms in 1..=100u64 {
            let target = if ms % 2 == 0 { &mut a } else { &mut b };
            target.record(
                Op::Read,
                Duration::from_millis(ms),
                Outcome::Done { found: true },
            );
        }
        b.record(
            Op::Update,
            Duration::from_millis(1),
            Outcome::Done { found: true },
        );
        b.record(
            Op::Update,
            Duration::from_millis(1),
            Outcome::Failed(ClientError::Transport("refused".into())),
        );
        a.merge(&b);
        let (rows, total) = a.summarize(Duration::from_secs(2));
        assert_eq!(rows.len(), 2);
        let read = &rows[0];
        assert_eq!((read.op, read.count, read.errors), ("read", 100, 0));
        assert!((read.ops_per_sec - 50.0).abs() < 1e-9);
        // 3 significant digits: within 0.1% of the exact values.
        assert!(
            (read.latency_us.p50 / 50_000.0 - 1.0).abs() < 0.002,
            "{read:?}"
        );
        assert!(
            (read.latency_us.p99 / 99_000.0 - 1.0).abs() < 0.002,
            "{read:?}"
        );
        assert!(
            (read.latency_us.max / 100_000.0 - 1.0).abs() < 0.002,
            "{read:?}"
        );
        let update = &rows[1];
        assert_eq!((update.count, update.errors), (1, 1));
        assert_eq!(
            update.first_error.as_deref(),
            Some("cannot reach the server: refused")
        );
        assert_eq!((total.count, total.errors), (101, 1));
    }

    #[test]
    fn cpu_share() {
        let (secs, two) = (Duration::from_secs, Duration::from_secs(2));
        let cpu = CpuReport::new(secs(3), two, 2, None);
        assert!((cpu.share - 0.75).abs() < 1e-9);
        assert!(!cpu.saturated);
        assert!(CpuReport::new(secs(4), two, 2, None).saturated);
    }

    #[test]
    fn cpu_warnings() {
        let config = crate::loadgen::BenchConfig {
            url: "http://127.0.0.1:1".into(),
            workload: Workload::Read,
            distribution: Distribution::Uniform,
            records: 1,
            stop: crate::loadgen::Stop::Operations(1),
            concurrency: 1,
            value_size: 1,
            batch_size: 1,
            seed: 1,
        };
        let (secs, two) = (Duration::from_secs, Duration::from_secs(2));
        let warnings =
            |cpu| Report::new(&config, None, &Recorder::default(), two, Some(cpu)).warnings();
        assert!(warnings(CpuReport::new(secs(1), two, 2, Some(0.5))).is_empty());
        let saturated = warnings(CpuReport::new(secs(4), two, 2, Some(1.0)));
        assert!(
            saturated[0].contains("used 100% of 2 cores"),
            "{saturated:?}"
        );
        let competing = warnings(CpuReport::new(secs(2), two, 2, Some(0.95)));
        assert!(competing[0].contains("competed for CPU"), "{competing:?}");
    }
}
