//! Workloads: which operations a run issues, in what proportions, on which
//! keys. The YCSB core workloads follow the mixes of the YCSB paper (Cooper et
//! al., SoCC 2010, section 4.1) and of YCSB's `workloads/workload[a-f]` files.

use rand::{Rng, RngExt as _};
use serde::Serialize;

use super::distribution::Distribution;

/// The longest scan of YCSB workload E (`maxscanlength`); lengths are uniform
/// in `1..=100` (`scanlengthdistribution=uniform`).
const YCSB_MAX_SCAN_LENGTH: usize = 100;

/// A workload to run: a YCSB core workload or a single-operation scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// YCSB A, update heavy: 50% read, 50% update, zipfian.
    #[value(name = "ycsb-a", alias = "a")]
    YcsbA,
    /// YCSB B, read mostly: 95% read, 5% update, zipfian.
    #[value(name = "ycsb-b", alias = "b")]
    YcsbB,
    /// YCSB C, read only: 100% read, zipfian.
    #[value(name = "ycsb-c", alias = "c")]
    YcsbC,
    /// YCSB D, read latest: 95% read, 5% insert, latest.
    #[value(name = "ycsb-d", alias = "d")]
    YcsbD,
    /// YCSB E, short ranges: 95% scan (1 to 100 keys), 5% insert, zipfian.
    #[value(name = "ycsb-e", alias = "e")]
    YcsbE,
    /// YCSB F, read-modify-write: 50% read, 50% read-modify-write, zipfian.
    #[value(name = "ycsb-f", alias = "f")]
    YcsbF,
    /// Single-key GETs, uniform.
    Read,
    /// Single-key PUTs of existing keys, uniform.
    Write,
    /// Atomic batches of --batch-size PUTs, uniform.
    Batch,
    /// Range reads of --batch-size keys, uniform.
    Range,
}

/// One kind of operation; a workload is a mix of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Op {
    /// GET of one key.
    Read,
    /// PUT of an existing key.
    Update,
    /// PUT of a new key.
    Insert,
    /// A range read from a key.
    Scan,
    /// GET then PUT of the same key; its latency covers both.
    ReadModifyWrite,
    /// POST /v1/batch of several PUTs.
    Batch,
}

impl Op {
    /// Every op, in the order of reports.
    pub const ALL: [Op; 6] = [
        Op::Read,
        Op::Update,
        Op::Insert,
        Op::Scan,
        Op::ReadModifyWrite,
        Op::Batch,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Update => "update",
            Op::Insert => "insert",
            Op::Scan => "scan",
            Op::ReadModifyWrite => "read-modify-write",
            Op::Batch => "batch",
        }
    }

    /// Its position in [`Op::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::YcsbA => "ycsb-a",
            Workload::YcsbB => "ycsb-b",
            Workload::YcsbC => "ycsb-c",
            Workload::YcsbD => "ycsb-d",
            Workload::YcsbE => "ycsb-e",
            Workload::YcsbF => "ycsb-f",
            Workload::Read => "read",
            Workload::Write => "write",
            Workload::Batch => "batch",
            Workload::Range => "range",
        }
    }

    /// The proportion of each op; they add up to 1.
    pub fn mix(self) -> &'static [(Op, f64)] {
        match self {
            Workload::YcsbA => &[(Op::Read, 0.5), (Op::Update, 0.5)],
            Workload::YcsbB => &[(Op::Read, 0.95), (Op::Update, 0.05)],
            Workload::YcsbC | Workload::Read => &[(Op::Read, 1.0)],
            Workload::YcsbD => &[(Op::Read, 0.95), (Op::Insert, 0.05)],
            Workload::YcsbE => &[(Op::Scan, 0.95), (Op::Insert, 0.05)],
            Workload::YcsbF => &[(Op::Read, 0.5), (Op::ReadModifyWrite, 0.5)],
            Workload::Write => &[(Op::Update, 1.0)],
            Workload::Batch => &[(Op::Batch, 1.0)],
            Workload::Range => &[(Op::Scan, 1.0)],
        }
    }

    /// The request distribution of the workload, unless the user picks one.
    pub fn default_distribution(self) -> Distribution {
        match self {
            Workload::YcsbA
            | Workload::YcsbB
            | Workload::YcsbC
            | Workload::YcsbE
            | Workload::YcsbF => Distribution::Zipfian,
            Workload::YcsbD => Distribution::Latest,
            Workload::Read | Workload::Write | Workload::Batch | Workload::Range => {
                Distribution::Uniform
            }
        }
    }

    /// The mix in words, e.g. "50% read, 50% update".
    pub fn describe_mix(self) -> String {
        self.mix()
            .iter()
            .map(|(op, share)| format!("{:.0}% {}", share * 100.0, op.name()))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// How many keys the next scan reads: YCSB E draws it, the `range`
    /// scenario reads `batch_size`.
    pub fn scan_length<R: Rng + ?Sized>(self, rng: &mut R, batch_size: usize) -> usize {
        match self {
            Workload::YcsbE => rng.random_range(1..=YCSB_MAX_SCAN_LENGTH),
            _ => batch_size,
        }
    }
}

/// Draws ops in the proportions of a mix.
#[derive(Debug, Clone)]
pub struct OpChooser {
    /// Each op with the running total of the proportions up to it.
    cumulative: Vec<(Op, f64)>,
}

impl OpChooser {
    pub fn new(mix: &[(Op, f64)]) -> Self {
        let mut total = 0.0;
        let cumulative = mix
            .iter()
            .map(|&(op, share)| {
                total += share;
                (op, total)
            })
            .collect();
        OpChooser { cumulative }
    }

    pub fn next<R: Rng + ?Sized>(&self, rng: &mut R) -> Op {
        let total = self.cumulative.last().map_or(0.0, |&(_, t)| t);
        let u = rng.random::<f64>() * total;
        self.cumulative
            .iter()
            .find(|&&(_, upto)| u < upto)
            .or(self.cumulative.last())
            .map_or(Op::Read, |&(op, _)| op)
    }
}

#[cfg(test)]
mod tests {
    use clap::ValueEnum as _;
    use rand::SeedableRng as _;
    use rand::rngs::SmallRng;

    use super::*;

    #[test]
    fn mixes_add_up_to_one() {
        for workload in Workload::value_variants() {
            let total: f64 = workload.mix().iter().map(|(_, share)| share).sum();
            assert!((total - 1.0).abs() < 1e-12, "{}", workload.name());
        }
    }

    #[test]
    fn drawn_proportions_match_each_mix() {
        const DRAWS: usize = 200_000;
        let mut rng = SmallRng::seed_from_u64(11);
        for workload in Workload::value_variants() {
            let chooser = OpChooser::new(workload.mix());
            let mut counts = [0usize; Op::ALL.len()];
            for _ in 0..DRAWS {
                counts[chooser.next(&mut rng).index()] += 1;
            }
            for op in Op::ALL {
                let expected = workload
                    .mix()
                    .iter()
                    .find(|(o, _)| *o == op)
                    .map_or(0.0, |(_, share)| *share);
                let got = counts[op.index()] as f64 / DRAWS as f64;
                assert!(
                    (got - expected).abs() < 0.005,
                    "{} {}: {got} vs {expected}",
                    workload.name(),
                    op.name()
                );
            }
        }
    }

    #[test]
    fn ycsb_workloads_use_the_papers_distributions() {
        assert_eq!(
            Workload::YcsbA.default_distribution(),
            Distribution::Zipfian
        );
        assert_eq!(Workload::YcsbD.default_distribution(), Distribution::Latest);
        assert_eq!(
            Workload::YcsbE.default_distribution(),
            Distribution::Zipfian
        );
        assert_eq!(Workload::YcsbA.describe_mix(), "50% read, 50% update");
        assert_eq!(Workload::YcsbD.describe_mix(), "95% read, 5% insert");
    }

    #[test]
    fn scan_lengths() {
        let mut rng = SmallRng::seed_from_u64(5);
        let lengths: Vec<usize> = (0..10_000)
            .map(|_| Workload::YcsbE.scan_length(&mut rng, 7))
            .collect();
        assert!(lengths.iter().all(|l| (1..=100).contains(l)));
        assert!(lengths.contains(&1) && lengths.contains(&100));
        assert_eq!(Workload::Range.scan_length(&mut rng, 7), 7);
    }

    #[test]
    fn value_names_are_the_report_names() {
        for workload in Workload::value_variants() {
            let value = workload
                .to_possible_value()
                .map(|v| v.get_name().to_owned());
            assert_eq!(value.as_deref(), Some(workload.name()));
        }
    }
}
