//! Key distributions of YCSB (Cooper et al., "Benchmarking Cloud Serving
//! Systems with YCSB", SoCC 2010), computed as YCSB's own generators do, so
//! that figures compare with published YCSB results.

use rand::{Rng, RngExt as _};
use serde::Serialize;

/// The skew of YCSB's zipfian distributions.
pub const ZIPFIAN_CONSTANT: f64 = 0.99;

/// How many items the scrambled zipfian draws from before hashing them onto
/// the records: YCSB's `ScrambledZipfianGenerator.ITEM_COUNT`.
const SCRAMBLED_ITEMS: u64 = 10_000_000_000;

/// zeta(10^10, 0.99), precomputed (YCSB's `ScrambledZipfianGenerator.ZETAN`);
/// summing it at start would take a minute.
const SCRAMBLED_ZETAN: f64 = 26.469_028_201_783_02;

/// How the keys of operations are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Distribution {
    /// Every record equally likely.
    Uniform,
    /// A few records are hot (YCSB's scrambled zipfian: the hot records are
    /// spread over the key space rather than clustered at its start).
    Zipfian,
    /// The most recently inserted records are the hottest (YCSB's "latest").
    Latest,
}

impl Distribution {
    pub fn name(self) -> &'static str {
        match self {
            Distribution::Uniform => "uniform",
            Distribution::Zipfian => "zipfian",
            Distribution::Latest => "latest",
        }
    }
}

/// 64-bit FNV-1a over the little-endian bytes of `value`, as YCSB's
/// `Utils.fnvhash64`: it scrambles zipfian ranks and key numbers.
pub fn fnv1a64(mut value: u64) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for _ in 0..8 {
        hash ^= value & 0xff;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
        value >>= 8;
    }
    // YCSB takes Math.abs of a signed long; keeping the same 63 bits keeps
    // the same key for the same rank.
    hash & (u64::MAX >> 1)
}

fn zeta_terms(from: u64, to: u64, theta: f64) -> f64 {
    (from..to).map(|i| 1.0 / ((i + 1) as f64).powf(theta)).sum()
}

/// Zipfian ranks over `[0, items)`: rank `i` is drawn with probability
/// proportional to `1 / (i + 1)^theta`. The algorithm of Gray et al.,
/// "Quickly generating billion-record synthetic databases" (SIGMOD 1994), as in
/// YCSB's `ZipfianGenerator`; the item count can grow (for "latest"), which
/// extends zeta by the new terms only.
#[derive(Debug, Clone)]
pub struct Zipfian {
    items: u64,
    theta: f64,
    alpha: f64,
    zeta2: f64,
    zetan: f64,
    eta: f64,
}

impl Zipfian {
    /// Ranks over `[0, items)`; `items` is at least 1.
    pub fn new(items: u64) -> Self {
        let items = items.max(1);
        Self::with_zetan(items, zeta_terms(0, items, ZIPFIAN_CONSTANT))
    }

    fn with_zetan(items: u64, zetan: f64) -> Self {
        let theta = ZIPFIAN_CONSTANT;
        let mut zipfian = Zipfian {
            items,
            theta,
            alpha: 1.0 / (1.0 - theta),
            zeta2: zeta_terms(0, 2, theta),
            zetan,
            eta: 0.0,
        };
        zipfian.eta = zipfian.eta_for();
        zipfian
    }

    fn eta_for(&self) -> f64 {
        (1.0 - (2.0 / self.items as f64).powf(1.0 - self.theta)) / (1.0 - self.zeta2 / self.zetan)
    }

    /// The probability of rank `i` under the exact distribution.
    #[cfg(test)]
    pub fn probability(&self, i: u64) -> f64 {
        1.0 / ((i + 1) as f64).powf(self.theta) / self.zetan
    }

    /// Grows the item count to `items` (never shrinks it).
    pub fn grow_to(&mut self, items: u64) {
        if items > self.items {
            self.zetan += zeta_terms(self.items, items, self.theta);
            self.items = items;
            self.eta = self.eta_for();
        }
    }

    /// The next rank.
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> u64 {
        let u: f64 = rng.random();
        let uz = u * self.zetan;
        if uz < 1.0 {
            return 0;
        }
        if uz < 1.0 + 0.5f64.powf(self.theta) {
            return 1;
        }
        let rank = (self.items as f64 * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64;
        rank.min(self.items - 1)
    }
}

/// Picks record numbers in `[0, count)`, where `count` is the number of
/// records that exist at the time of the pick (it grows when a workload
/// inserts).
#[derive(Debug, Clone)]
pub enum KeyChooser {
    Uniform,
    /// Zipfian ranks over 10^10 items, hashed onto the records: which records
    /// are hot does not depend on where they sit in key order. Like YCSB, the
    /// hash is taken modulo the current record count.
    ScrambledZipfian(Zipfian),
    /// `count - 1 - rank`: rank 0 is the newest record.
    Latest(Zipfian),
}

impl KeyChooser {
    /// A chooser of `distribution` over `records` records to start with.
    pub fn new(distribution: Distribution, records: u64) -> Self {
        match distribution {
            Distribution::Uniform => KeyChooser::Uniform,
            Distribution::Zipfian => {
                KeyChooser::ScrambledZipfian(Zipfian::with_zetan(SCRAMBLED_ITEMS, SCRAMBLED_ZETAN))
            }
            Distribution::Latest => KeyChooser::Latest(Zipfian::new(records)),
        }
    }

    /// A record number in `[0, count)`; `count` is at least 1.
    pub fn next<R: Rng + ?Sized>(&mut self, rng: &mut R, count: u64) -> u64 {
        let count = count.max(1);
        match self {
            KeyChooser::Uniform => rng.random_range(0..count),
            KeyChooser::ScrambledZipfian(zipfian) => fnv1a64(zipfian.sample(rng)) % count,
            KeyChooser::Latest(zipfian) => {
                zipfian.grow_to(count);
                count - 1 - zipfian.sample(rng).min(count - 1)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng as _;
    use rand::rngs::SmallRng;

    const DRAWS: usize = 1_000_000;

    fn histogram(chooser: &mut KeyChooser, count: u64) -> Vec<u64> {
        let mut rng = SmallRng::seed_from_u64(7);
        let mut hits = vec![0u64; count as usize];
        for _ in 0..DRAWS {
            hits[chooser.next(&mut rng, count) as usize] += 1;
        }
        hits
    }

    #[test]
    fn zipfian_constant_matches_a_direct_sum() {
        // The precomputed zeta(10^10) continues a direct sum to 10^6 by the
        // Euler-Maclaurin formula; both agree to 1e-9.
        let s = ZIPFIAN_CONSTANT;
        let (n0, n) = (1e6f64, 1e10f64);
        let f = |x: f64| x.powf(-s);
        let df = |x: f64| -s * x.powf(-s - 1.0);
        let tail = (n.powf(1.0 - s) - n0.powf(1.0 - s)) / (1.0 - s)
            + (f(n) - f(n0)) / 2.0
            + (df(n) - df(n0)) / 12.0;
        let zeta = zeta_terms(0, 1_000_000, s) + tail;
        assert!((zeta - SCRAMBLED_ZETAN).abs() < 1e-9, "{zeta}");
    }

    #[test]
    fn zipfian_frequencies_follow_the_theory() {
        let zipfian = Zipfian::new(1000);
        let mut rng = SmallRng::seed_from_u64(1);
        let mut hits = vec![0u64; 1000];
        for _ in 0..DRAWS {
            hits[zipfian.sample(&mut rng) as usize] += 1;
        }
        let share = |n: u64| n as f64 / DRAWS as f64;
        // Ranks 0 and 1 are exact in Gray's algorithm.
        for rank in 0..2 {
            let expected = zipfian.probability(rank);
            let got = share(hits[rank as usize]);
            assert!(
                (got - expected).abs() < 0.003,
                "rank {rank}: {got} vs {expected}"
            );
        }
        // The rest follows a continuous approximation: compare the mass of
        // the top 1%, 10% and 50% of ranks.
        for top in [10u64, 100, 500] {
            let expected: f64 = (0..top).map(|i| zipfian.probability(i)).sum();
            let got = share(hits[..top as usize].iter().sum());
            assert!(
                (got - expected).abs() < 0.02,
                "top {top}: {got} vs {expected}"
            );
        }
        // Skew: each decade of ranks is drawn less than the one before.
        assert!(hits[0] > hits[9] && hits[9] > hits[99] && hits[99] > hits[999]);
    }

    #[test]
    fn scrambled_zipfian_hot_record_has_the_top_rank_share() {
        let hits = histogram(&mut KeyChooser::new(Distribution::Zipfian, 1000), 1000);
        let top = *hits.iter().max().unwrap_or(&0) as f64 / DRAWS as f64;
        // Rank 0 of 10^10 items: 1 / zeta(10^10) = 3.78%, plus the ranks
        // beyond the record count that hash onto the same record (~0.1%).
        let expected = 1.0 / SCRAMBLED_ZETAN;
        assert!((top - expected).abs() < 0.005, "{top} vs {expected}");
        // The hot record is where rank 0 hashes to, not record 0.
        assert_eq!(
            hits[(fnv1a64(0) % 1000) as usize] as f64 / DRAWS as f64,
            top
        );
        assert!(hits.iter().all(|&h| h > 0), "every record is drawn");
    }

    #[test]
    fn latest_prefers_the_newest_records() {
        let mut chooser = KeyChooser::new(Distribution::Latest, 1000);
        let hits = histogram(&mut chooser, 1000);
        assert_eq!(
            hits.iter()
                .enumerate()
                .max_by_key(|(_, h)| **h)
                .map(|(i, _)| i),
            Some(999)
        );
        assert!(hits[999] > hits[990] && hits[990] > hits[900] && hits[900] > hits[0]);
        // After inserts, the new newest record is the hottest.
        let hits = histogram(&mut chooser, 1100);
        assert_eq!(
            hits.iter()
                .enumerate()
                .max_by_key(|(_, h)| **h)
                .map(|(i, _)| i),
            Some(1099)
        );
    }

    #[test]
    fn uniform_spreads_evenly() {
        let hits = histogram(&mut KeyChooser::new(Distribution::Uniform, 100), 100);
        let expected = DRAWS as f64 / 100.0;
        assert!(
            hits.iter()
                .all(|&h| (h as f64 - expected).abs() < expected * 0.05),
            "{hits:?}"
        );
    }

    #[test]
    fn picks_stay_in_range_when_the_count_is_small() {
        let mut rng = SmallRng::seed_from_u64(3);
        for distribution in [
            Distribution::Uniform,
            Distribution::Zipfian,
            Distribution::Latest,
        ] {
            let mut chooser = KeyChooser::new(distribution, 1);
            for count in [1, 2, 3, 50] {
                for _ in 0..1000 {
                    assert!(chooser.next(&mut rng, count) < count);
                }
            }
        }
    }
}
