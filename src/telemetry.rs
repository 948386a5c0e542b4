//! Prometheus metrics: one process-wide recorder of the `metrics` facade,
//! rendered in the text format by `GET /metrics`.
//!
//! Counters and histograms are recorded where things happen (HTTP layer,
//! storage decorator, committer); gauges that are read rather than counted
//! (queue depth, cache size, process figures) are brought up to date when the
//! metrics are rendered.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::storage::Store;
use crate::storage::layer::cache::CacheMode;

/// The cache's counters, and its gauges, in every cache mode.
const CACHE_COUNTERS: [&str; 3] = [
    "kvstore_cache_hits_total",
    "kvstore_cache_misses_total",
    "kvstore_cache_evictions_total",
];
const CACHE_GAUGES: [&str; 2] = ["kvstore_cache_entries", "kvstore_cache_bytes"];

/// How often histogram samples are folded into their buckets.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Latency buckets from 10 µs to 10 s: the interesting range of a request
/// that can be answered from memory or wait for a sync on a slow disk.
const SECONDS_BUCKETS: &[f64] = &[
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Commit group sizes, from a lone write to the committer's cap.
const GROUP_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
];

/// Why the Prometheus recorder could not be installed. The first attempt's
/// answer is kept for every later call, hence `Clone` and the messages.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MetricsError {
    /// The histogram buckets were refused, or another recorder was installed
    /// first.
    #[error("{0}")]
    Recorder(String),
    /// The thread that folds histogram samples did not start.
    #[error("cannot start the metrics upkeep thread: {0}")]
    Upkeep(String),
}

static RECORDER: OnceLock<Result<PrometheusHandle, MetricsError>> = OnceLock::new();

/// The renderer of `GET /metrics`.
pub struct Metrics {
    handle: PrometheusHandle,
    process: metrics_process::Collector,
}

impl Metrics {
    /// Installs the process-wide recorder on the first call; later calls
    /// (several servers in one test process) share it.
    ///
    /// # Errors
    /// When another recorder was installed first.
    pub fn install() -> Result<Self, MetricsError> {
        let handle = RECORDER
            .get_or_init(|| {
                let builder = PrometheusBuilder::new()
                    .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                    .and_then(|b| {
                        b.set_buckets_for_metric(
                            Matcher::Prefix("kvstore_commit_group".into()),
                            GROUP_BUCKETS,
                        )
                    })
                    .map_err(|e| MetricsError::Recorder(e.to_string()))?;
                let handle = builder
                    .install_recorder()
                    .map_err(|e| MetricsError::Recorder(e.to_string()))?;
                // Histogram samples wait in a lock-free bucket until upkeep
                // folds them into the buckets. Folding them only when scraped
                // let an unscraped server grow by about 19 bytes per request.
                let upkeep = handle.clone();
                std::thread::Builder::new()
                    .name("kvstore-metrics".into())
                    .spawn(move || {
                        loop {
                            std::thread::sleep(UPKEEP_INTERVAL);
                            upkeep.run_upkeep();
                        }
                    })
                    .map_err(|e| MetricsError::Upkeep(e.to_string()))?;
                describe();
                Ok(handle)
            })
            .clone()?;
        let process = metrics_process::Collector::default();
        process.describe();
        Ok(Metrics { handle, process })
    }

    /// The metrics in Prometheus text format.
    pub fn render(&self, store: &dyn Store) -> String {
        store.report_metrics();
        report_cache_mode(store.cache_mode());
        self.process.collect();
        self.handle.run_upkeep();
        self.handle.render()
    }
}

/// The cache's series exist in every mode, so that one dashboard fits every
/// deployment: zero where nothing counts them (no cache; Redis, which evicts
/// and sizes itself, for evictions, entries and bytes), and
/// `kvstore_cache_mode{mode}` at 1 names the mode that runs.
fn report_cache_mode(mode: CacheMode) {
    metrics::gauge!("kvstore_cache_mode", "mode" => mode.name()).set(1.0);
    // Adding nothing creates a series that is missing and leaves one that a
    // cache reports as it is.
    for counter in CACHE_COUNTERS {
        metrics::counter!(counter).increment(0);
    }
    for gauge in CACHE_GAUGES {
        metrics::gauge!(gauge).increment(0.0);
    }
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "kvstore_http_requests_total",
        "HTTP requests answered, by route, method and status."
    );
    describe_histogram!(
        "kvstore_http_request_duration_seconds",
        Unit::Seconds,
        "Time from a request's arrival to its answer, by route and method."
    );
    describe_histogram!(
        crate::storage::layer::guard::STORAGE_SECONDS,
        Unit::Seconds,
        "Storage backend calls, by operation (below the cache)."
    );
    describe_histogram!(
        "kvstore_commit_duration_seconds",
        Unit::Seconds,
        "Commits of a write group to the embedded engine's journal, without its sync."
    );
    describe_histogram!(
        "kvstore_background_sync_duration_seconds",
        Unit::Seconds,
        "Syncs of the embedded engine's journal: each answers the groups it covers in fsync mode; every interval in buffered mode."
    );
    describe_histogram!(
        "kvstore_commit_group_writes",
        "Write requests (single writes and batches) committed together in one group."
    );
    describe_histogram!(
        "kvstore_commit_group_keys",
        "Keys written by one commit group."
    );
    describe_gauge!(
        "kvstore_commit_queue_depth",
        "Writes waiting for the committer."
    );
    describe_counter!(
        crate::storage::embedded::QUIET_FLUSHES,
        "Memtables the embedded engine flushed to tables because writes had gone quiet (--flush-when-quiet-ms)."
    );
    describe_gauge!(
        "kvstore_storage_free_bytes",
        Unit::Bytes,
        "Free space of the data directory's file system (embedded engine), at the last reading."
    );
    describe_gauge!(
        "kvstore_storage_min_free_bytes",
        Unit::Bytes,
        "Free space kept on the data directory's file system (--min-free-bytes); writes are refused below it."
    );
    describe_gauge!(
        "kvstore_storage_space_low",
        "1 while writes are refused for lack of disk space (507), 0 otherwise."
    );
    let [hits, misses, evictions] = CACHE_COUNTERS;
    let [entries, bytes] = CACHE_GAUGES;
    describe_counter!(hits, "Reads answered by the cache (0 without one).");
    describe_counter!(misses, "Reads the cache passed to storage (0 without one).");
    describe_counter!(
        evictions,
        "Entries the local cache dropped to stay within its bounds."
    );
    describe_gauge!(entries, "Entries in the local cache.");
    describe_gauge!(
        bytes,
        Unit::Bytes,
        "Bytes the local cache counts for its entries."
    );
    describe_counter!(
        crate::storage::postgres::RETRIES,
        "PostgreSQL transactions tried again, by cause: deadlock, serialization or settled_gap."
    );
    describe_gauge!(
        "kvstore_cache_mode",
        "1 for the read cache that runs: mode=\"local\", \"redis\" or \"off\"."
    );
}
