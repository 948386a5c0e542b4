//! The load phase and the run: N connections, each its own task with its own
//! client (and so its own keep-alive connection), in a closed loop: a
//! connection sends its next operation when the previous one is answered.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rand::distr::Alphanumeric;
use rand::rngs::SmallRng;
use rand::{Rng, RngExt as _, SeedableRng as _};
use tokio::task::JoinSet;

use super::distribution::{KeyChooser, fnv1a64};
use super::report::{CpuReport, LoadReport, Outcome, Recorder, Report};
use super::workload::{Op, OpChooser};
use super::{BenchConfig, Stop, cpu};
use kvstore::client::{Client, ClientError, ListParams};
use kvstore::storage::Condition;
use kvstore::types::{BatchOp, BatchOpKind, BatchRequest};

/// Every key the bench writes starts with this, so that its data is easy to
/// tell apart (and to delete) in a store that holds other data.
pub const KEY_PREFIX: &str = "bench/";

/// Puts per batch of the load phase, within the API's 1000.
const LOAD_BATCH_KEYS: u64 = 500;

/// Value bytes per batch of the load phase, well within the 16 MiB body limit.
const LOAD_BATCH_BYTES: u64 = 4 << 20;

/// The key of record `n`: YCSB's hashed insert order (`"user" +
/// fnvhash64(n)`), so that consecutive records land all over the key space.
pub fn record_key(n: u64) -> String {
    format!("{KEY_PREFIX}user{:019}", fnv1a64(n))
}

/// Random printable values, sliced from one buffer so that an operation does
/// not pay for generating its value.
#[derive(Debug)]
struct Values {
    /// ASCII only, so that any byte offset is a char boundary and a value can
    /// travel as a JSON string in a batch.
    text: String,
    size: usize,
}

impl Values {
    fn new(size: usize, seed: u64) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed);
        let text = (&mut rng)
            .sample_iter(Alphanumeric)
            .take(size + 4096)
            .map(char::from)
            .collect();
        Values { text, size }
    }

    fn pick<R: Rng + ?Sized>(&self, rng: &mut R) -> &str {
        let start = rng.random_range(0..=self.text.len() - self.size);
        &self.text[start..start + self.size]
    }
}

fn put_op(key: String, value: &str) -> BatchOp {
    BatchOp {
        value: Some(value.to_owned()),
        ..BatchOp::new(BatchOpKind::Put, key)
    }
}

/// One client per connection, each checked to reach the server, so that no
/// measured operation pays for a TCP connect.
async fn connect(url: &str, connections: usize) -> Result<Vec<Client>, ClientError> {
    let mut clients = Vec::with_capacity(connections);
    for _ in 0..connections {
        let client = Client::new(url)?;
        client.health().await?;
        clients.push(client);
    }
    Ok(clients)
}

/// Waits for every task; the first error aborts the others (when the set is
/// dropped).
async fn join_all<T: 'static>(
    mut tasks: JoinSet<Result<T, ClientError>>,
) -> Result<Vec<T>, ClientError> {
    let mut results = Vec::with_capacity(tasks.len());
    while let Some(joined) = tasks.join_next().await {
        let result =
            joined.map_err(|err| ClientError::Protocol(format!("a bench task failed: {err}")))?;
        results.push(result?);
    }
    Ok(results)
}

/// Writes records `0..config.records` in batches over `config.concurrency`
/// connections, calling `progress` with the number of records of each batch
/// written. Plain puts: loading twice gives the same store.
///
/// # Errors
/// The first error of any batch.
pub async fn load(
    config: &BenchConfig,
    progress: Arc<dyn Fn(u64) + Send + Sync>,
) -> Result<LoadReport, ClientError> {
    let per_batch = (LOAD_BATCH_BYTES / (config.value_size as u64 + 64)).clamp(1, LOAD_BATCH_KEYS);
    let batches = config.records.div_ceil(per_batch);
    let connections =
        usize::try_from(batches).map_or(config.concurrency, |b| b.min(config.concurrency));
    let clients = connect(&config.url, connections.max(1)).await?;
    let values = Arc::new(Values::new(config.value_size, config.seed));
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for (i, client) in clients.into_iter().enumerate() {
        let (values, next, progress) = (values.clone(), next.clone(), progress.clone());
        let records = config.records;
        let mut rng = SmallRng::seed_from_u64(config.seed.wrapping_add(i as u64));
        tasks.spawn(async move {
            loop {
                let first = next.fetch_add(per_batch, Ordering::Relaxed);
                if first >= records {
                    return Ok(());
                }
                let last = (first + per_batch).min(records);
                let ops = (first..last)
                    .map(|n| put_op(record_key(n), values.pick(&mut rng)))
                    .collect();
                client.batch(&BatchRequest { ops }).await?;
                progress(last - first);
            }
        });
    }
    join_all(tasks).await?;
    let elapsed = started.elapsed();
    Ok(LoadReport {
        records: config.records,
        elapsed_secs: elapsed.as_secs_f64(),
        records_per_sec: config.records as f64 / elapsed.as_secs_f64().max(f64::MIN_POSITIVE),
    })
}

/// What the connections of a run share.
struct Shared {
    config: BenchConfig,
    values: Values,
    /// Operations started so far (for [`Stop::Operations`]).
    started: AtomicU64,
    deadline: Option<Instant>,
    /// The record number of the next insert.
    next_insert: AtomicU64,
    /// How many records reads may pick from: records `0..existing` all exist.
    existing: AtomicU64,
    /// Acknowledged inserts above `existing`, waiting for the ones below them
    /// that are still in flight (YCSB's `AcknowledgedCounterGenerator`): a
    /// read must never pick a record whose insert was not acknowledged.
    acknowledged_ahead: Mutex<BTreeSet<u64>>,
}

impl Shared {
    /// Whether the connection may start one more operation.
    fn take_ticket(&self) -> bool {
        match self.config.stop {
            Stop::Operations(total) => self.started.fetch_add(1, Ordering::Relaxed) < total,
            Stop::Duration(_) => self.deadline.is_none_or(|d| Instant::now() < d),
        }
    }

    /// Records that the insert of record `n` was acknowledged.
    fn acknowledge(&self, n: u64) {
        // Poisoning cannot leave the set inconsistent: it is only inserted
        // into and drained below.
        let mut ahead = self
            .acknowledged_ahead
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        ahead.insert(n);
        let mut existing = self.existing.load(Ordering::Relaxed);
        while ahead.remove(&existing) {
            existing += 1;
        }
        self.existing.store(existing, Ordering::Relaxed);
    }

    async fn execute(
        &self,
        client: &Client,
        op: Op,
        rng: &mut SmallRng,
        keys: &mut KeyChooser,
    ) -> Result<bool, ClientError> {
        let existing = self.existing.load(Ordering::Relaxed);
        let value =
            |rng: &mut SmallRng| bytes::Bytes::copy_from_slice(self.values.pick(rng).as_bytes());
        match op {
            Op::Read => {
                let key = record_key(keys.next(rng, existing));
                Ok(client.get(&key).await?.is_some())
            }
            Op::Update => {
                let key = record_key(keys.next(rng, existing));
                client.put(&key, value(rng), Condition::Any).await?;
                Ok(true)
            }
            Op::Insert => {
                let n = self.next_insert.fetch_add(1, Ordering::Relaxed);
                client
                    .put(&record_key(n), value(rng), Condition::Any)
                    .await?;
                self.acknowledge(n);
                Ok(true)
            }
            Op::Scan => {
                let params = ListParams {
                    start: Some(record_key(keys.next(rng, existing))),
                    limit: Some(
                        self.config
                            .workload
                            .scan_length(rng, self.config.batch_size),
                    ),
                    ..ListParams::default()
                };
                client.list(&params).await?;
                Ok(true)
            }
            Op::ReadModifyWrite => {
                let key = record_key(keys.next(rng, existing));
                let found = client.get(&key).await?.is_some();
                client.put(&key, value(rng), Condition::Any).await?;
                Ok(found)
            }
            Op::Batch => {
                // Consecutive record numbers are distinct keys (a batch may
                // name a key once) spread over the key space.
                let first = keys.next(rng, existing);
                let ops = (0..self.config.batch_size as u64)
                    .map(|i| put_op(record_key((first + i) % existing), self.values.pick(rng)))
                    .collect();
                client.batch(&BatchRequest { ops }).await?;
                Ok(true)
            }
        }
    }
}

async fn connection(shared: Arc<Shared>, client: Client, seed: u64) -> Recorder {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut keys = KeyChooser::new(shared.config.distribution, shared.config.records);
    let ops = OpChooser::new(shared.config.workload.mix());
    let mut recorder = Recorder::default();
    while shared.take_ticket() {
        let op = ops.next(&mut rng);
        let started = Instant::now();
        let outcome = match shared.execute(&client, op, &mut rng, &mut keys).await {
            Ok(found) => Outcome::Done { found },
            Err(err) => Outcome::Failed(err),
        };
        recorder.record(op, started.elapsed(), outcome);
    }
    recorder
}

/// Runs the workload of `config` on records that exist (see [`load`]), and
/// reports; `load` is the load phase's report, to carry into it.
///
/// # Errors
/// When the server cannot be reached before the run; failed operations during
/// the run are counted in the report instead.
pub async fn run(config: &BenchConfig, load: Option<LoadReport>) -> Result<Report, ClientError> {
    let clients = connect(&config.url, config.concurrency).await?;
    let started = Instant::now();
    let cpu_before = cpu::process_cpu_time();
    let machine_before = cpu::machine_cpu_ticks();
    let shared = Arc::new(Shared {
        config: config.clone(),
        values: Values::new(config.value_size, config.seed),
        started: AtomicU64::new(0),
        deadline: match config.stop {
            Stop::Duration(duration) => Some(started + duration),
            Stop::Operations(_) => None,
        },
        next_insert: AtomicU64::new(config.records),
        existing: AtomicU64::new(config.records),
        acknowledged_ahead: Mutex::new(BTreeSet::new()),
    });
    let mut tasks = JoinSet::new();
    for (i, client) in clients.into_iter().enumerate() {
        let seed = config.seed.wrapping_add(1 + i as u64);
        let shared = shared.clone();
        tasks.spawn(async move { Ok(connection(shared, client, seed).await) });
    }
    let recorders = join_all(tasks).await?;
    let elapsed = started.elapsed();
    let machine_busy = cpu::machine_cpu_ticks().zip(machine_before).and_then(
        |((busy, total), (busy_before, total_before))| {
            let total = total.saturating_sub(total_before);
            (total > 0).then(|| busy.saturating_sub(busy_before) as f64 / total as f64)
        },
    );
    let client_cpu = cpu::process_cpu_time()
        .zip(cpu_before)
        .map(|(after, before)| {
            CpuReport::new(
                after.saturating_sub(before),
                elapsed,
                cpu::cores(),
                machine_busy,
            )
        });
    let mut all = Recorder::default();
    for recorder in &recorders {
        all.merge(recorder);
    }
    Ok(Report::new(config, load, &all, elapsed, client_cpu))
}

/// How long a run lasts, for [`Stop::Duration`] parsing: `30`, `30s`, `2m`,
/// `500ms`.
///
/// # Errors
/// A message saying what was expected.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("'{text}' is not a duration such as 30s, 2m or 500ms"))?;
    let seconds = match unit {
        "" | "s" => number,
        "ms" => number / 1000.0,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        _ => {
            return Err(format!(
                "unknown unit '{unit}' in '{text}': use ms, s, m or h"
            ));
        }
    };
    Duration::try_from_secs_f64(seconds)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("'{text}' is not a positive duration"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5d").is_err());
    }

    #[test]
    fn record_keys_are_hashed_and_fixed_width() {
        let keys: Vec<String> = (0..1000).map(record_key).collect();
        assert!(keys.iter().all(|k| k.len() == KEY_PREFIX.len() + 4 + 19));
        let mut sorted = keys.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), keys.len(), "distinct");
        assert_ne!(sorted, keys, "not in insert order");
    }

    #[test]
    fn values_have_the_asked_size() {
        let values = Values::new(100, 1);
        let mut rng = SmallRng::seed_from_u64(2);
        for _ in 0..100 {
            let v = values.pick(&mut rng);
            assert_eq!(v.len(), 100);
            assert!(v.bytes().all(|b| b.is_ascii_alphanumeric()));
        }
        assert_eq!(Values::new(0, 1).pick(&mut rng), "");
    }
}
