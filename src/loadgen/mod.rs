//! The load generator behind `kvstore bench`: YCSB core workloads and
//! single-operation scenarios, run over N connections through [`kvstore::client`],
//! with latencies recorded in HdrHistograms.
//!
//! - [`distribution`]: key distributions (uniform, scrambled zipfian, latest).
//! - [`workload`]: the workloads, their operation mixes and [`workload::OpChooser`].
//! - [`runner`]: the load phase ([`load`]) and the timed run ([`run`]).
//! - [`report`]: the figures, as a table or as JSON.
//! - [`cpu`]: the bench process's own CPU time, to flag a saturated client.

pub mod cpu;
pub mod distribution;
pub mod report;
pub mod runner;
pub mod workload;

use std::time::Duration;

use kvstore::client::MAX_ITEMS;

pub use distribution::Distribution;
pub use runner::{load, parse_duration, run};
pub use workload::Workload;

/// When a run ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// After this many operations, over all connections.
    Operations(u64),
    /// Once this much time has passed.
    Duration(Duration),
}

/// How to run a benchmark.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchConfig {
    /// The server, `http://host:port`.
    pub url: String,
    pub workload: Workload,
    pub distribution: Distribution,
    /// Records loaded before the run, and picked from during it.
    pub records: u64,
    pub stop: Stop,
    /// Connections, each with its own task.
    pub concurrency: usize,
    /// Bytes per value.
    pub value_size: usize,
    /// Puts per batch (`batch`) and keys per range (`range`).
    pub batch_size: usize,
    /// Seed of every random choice; the same seed makes the same choices on
    /// each connection.
    pub seed: u64,
}

impl BenchConfig {
    /// Checks the numbers against each other and the API's limits.
    ///
    /// # Errors
    /// A message naming the flag to change.
    pub fn validate(&self) -> Result<(), String> {
        if self.records == 0 {
            return Err("--records must be at least 1".into());
        }
        if self.concurrency == 0 {
            return Err("--concurrency must be at least 1".into());
        }
        if self.stop == Stop::Operations(0) {
            return Err("--operations must be at least 1".into());
        }
        if !(1..=MAX_ITEMS).contains(&self.batch_size) {
            return Err(format!("--batch-size must be 1 to {MAX_ITEMS}"));
        }
        if self.workload == Workload::Batch && self.batch_size as u64 > self.records {
            return Err("--batch-size cannot exceed --records: a batch names each key once".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BenchConfig {
        BenchConfig {
            url: "http://127.0.0.1:7070".into(),
            workload: Workload::Batch,
            distribution: Distribution::Uniform,
            records: 100,
            stop: Stop::Operations(10),
            concurrency: 1,
            value_size: 100,
            batch_size: 100,
            seed: 1,
        }
    }

    #[test]
    fn validation_names_the_flag() {
        assert_eq!(config().validate(), Ok(()));
        let batch_too_big = BenchConfig {
            batch_size: 101,
            ..config()
        };
        assert!(
            batch_too_big
                .validate()
                .unwrap_err()
                .contains("--batch-size")
        );
        let over_api = BenchConfig {
            batch_size: 1001,
            records: 5000,
            ..config()
        };
        assert!(over_api.validate().unwrap_err().contains("1000"));
        let no_records = BenchConfig {
            records: 0,
            ..config()
        };
        assert!(no_records.validate().unwrap_err().contains("--records"));
    }
}
