//! Expiry under load, against a running server (docs/performance.md,
//! "Expiry").
//!
//! `lag URL SECONDS CONNECTIONS`: CONNECTIONS tasks PUT keys with a TTL of
//! 200 to 1000 ms for SECONDS; a watcher on their prefix notes each key's
//! `expires_at` from its put event and, at its `expired` delete, how late
//! the delete reached it. Prints the lag's percentiles.
//!
//! `mass URL KEYS`: loads KEYS keys that all expire at the same instant,
//! then runs GETs and PUTs of other keys (4 connections each, closed loop)
//! for three seconds before that instant and until every key is deleted
//! after it (as the server's `kvstore_keys_expired_total` counts them).
//! Prints how long the deletes took and the GET and PUT percentiles in both
//! windows.
//!
//! ```sh
//! cargo run --release --example expiry_bench -- lag http://127.0.0.1:7070 20 16
//! cargo run --release --example expiry_bench -- mass http://127.0.0.1:7070 1000000
//! ```

use std::collections::HashMap;
use std::error::Error;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use kvstore::client::{Client, Event, WatchMessage, WatchRange, WatchRequest};
use kvstore::storage::{Condition, Expiry};
use kvstore::types::{BatchOp, BatchOpKind, BatchRequest};

type Result<T> = std::result::Result<T, Box<dyn Error + Send + Sync>>;

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

fn micros(text: &str) -> Result<i64> {
    Ok(chrono::DateTime::parse_from_rfc3339(text)?.timestamp_micros())
}

fn histogram() -> Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 600_000_000, 3)?)
}

fn row(name: &str, h: &Histogram<u64>) {
    println!(
        "{name}: {} samples, p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        h.len(),
        h.value_at_quantile(0.5) as f64 / 1e3,
        h.value_at_quantile(0.99) as f64 / 1e3,
        h.max() as f64 / 1e3
    );
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [mode, url, seconds, connections] if mode == "lag" => {
            lag(url, seconds.parse()?, connections.parse()?).await
        }
        [mode, url, keys] if mode == "mass" => mass(url, keys.parse()?).await,
        _ => Err("usage: expiry_bench lag URL SECONDS CONNECTIONS | mass URL KEYS".into()),
    }
}

async fn lag(url: &str, seconds: u64, connections: usize) -> Result<()> {
    let client = Client::new(url)?;
    let mut watch = client.watch(WatchRequest {
        range: WatchRange::Prefix("lag/".into()),
        from_revision: None,
    });
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for writer in 0..connections {
        let client = Client::new(url)?;
        let stop = Arc::clone(&stop);
        writers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let ttl = 200 + (n * 7919 + writer as u64 * 104_729) % 800;
                let key = format!("lag/{writer}/{n}");
                client
                    .put_with(&key, "v", Condition::Any, Expiry::Ttl(ttl))
                    .await?;
                n += 1;
            }
            Ok::<u64, kvstore::client::ClientError>(n)
        }));
    }
    let until = Instant::now() + Duration::from_secs(seconds);
    let mut deadlines: HashMap<String, i64> = HashMap::new();
    let mut lags = histogram()?;
    let mut written = 0u64;
    let mut writing = true;
    // After the writers stop, until every key written has expired.
    while writing || !deadlines.is_empty() {
        if writing && Instant::now() >= until {
            stop.store(true, Ordering::Relaxed);
            for writer in writers.drain(..) {
                written += writer.await??;
            }
            writing = false;
        }
        let message = tokio::time::timeout(Duration::from_secs(5), watch.next()).await;
        let Ok(Some(message)) = message else {
            return Err(format!(
                "{} keys not deleted 5 s after the last event",
                deadlines.len()
            )
            .into());
        };
        let WatchMessage::Change(change) = message? else {
            continue;
        };
        let arrived = now_us();
        for event in change.events {
            match event {
                Event::Put {
                    key,
                    expires_at: Some(deadline),
                    ..
                } => {
                    deadlines.insert(key, micros(&deadline)?);
                }
                Event::Delete { key, reason, .. } if reason == "expired" => {
                    if let Some(deadline) = deadlines.remove(&key) {
                        lags.record(u64::try_from(arrived - deadline).unwrap_or(0).max(1))?;
                    }
                }
                _ => {}
            }
        }
    }
    println!("{written} PUTs with a ttl at {connections} connections for {seconds} s");
    row(
        "expiry lag (delete event at a watcher, after the deadline)",
        &lags,
    );
    Ok(())
}

/// GETs or PUTs of 1000 other keys from `connections` closed-loop clients
/// until `stop`; their latencies.
async fn load(
    url: &str,
    put: bool,
    connections: usize,
    stop: Arc<AtomicBool>,
) -> Result<Histogram<u64>> {
    let mut tasks = Vec::new();
    for connection in 0..connections {
        let client = Client::new(url)?;
        let stop = Arc::clone(&stop);
        tasks.push(tokio::spawn(async move {
            let mut latencies = histogram()?;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("other/{}", (n * 31 + connection as u64) % 1000);
                let start = Instant::now();
                if put {
                    client.put(&key, "v", Condition::Any).await?;
                } else {
                    client.get(&key).await?;
                }
                latencies.record(
                    u64::try_from(start.elapsed().as_micros())
                        .unwrap_or(u64::MAX)
                        .max(1),
                )?;
                n += 1;
            }
            Ok::<_, Box<dyn Error + Send + Sync>>(latencies)
        }));
    }
    let mut all = histogram()?;
    for task in tasks {
        all.add(task.await??)?;
    }
    Ok(all)
}

async fn mass(url: &str, keys: usize) -> Result<()> {
    let client = Client::new(url)?;
    for n in 0..1000 {
        client
            .put(&format!("other/{n}"), "v", Condition::Any)
            .await?;
    }
    // Load at about 20,000 keys/s, and leave room for the three seconds of
    // the first window.
    let load_secs = (keys / 20_000) as u64 + 5;
    let deadline = now_us() + i64::try_from(load_secs * 1_000_000)?;
    let started = Instant::now();
    let mut loaders = Vec::new();
    let chunks: Vec<Vec<usize>> = (0..keys)
        .collect::<Vec<_>>()
        .chunks(1000)
        .map(<[usize]>::to_vec)
        .collect();
    let per_loader = chunks.len().div_ceil(4);
    for part in chunks.chunks(per_loader.max(1)) {
        let client = Client::new(url)?;
        let part = part.to_vec();
        loaders.push(tokio::spawn(async move {
            for chunk in part {
                let ttl_ms = u64::try_from((deadline - now_us()) / 1000)
                    .map_err(|_| "the load took too long")?;
                let ops = chunk
                    .iter()
                    .map(|i| BatchOp {
                        value: Some("v".into()),
                        ttl_ms: Some(ttl_ms),
                        ..BatchOp::new(BatchOpKind::Put, format!("mass/{i:07}"))
                    })
                    .collect();
                client.batch(&BatchRequest { ops }).await?;
            }
            Ok::<(), Box<dyn Error + Send + Sync>>(())
        }));
    }
    for loader in loaders {
        loader.await??;
    }
    println!(
        "loaded {keys} keys in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let until_deadline = Duration::from_micros(u64::try_from(deadline - now_us()).unwrap_or(0));
    if until_deadline < Duration::from_secs(3) {
        return Err("the load left less than 3 s before the deadline".into());
    }
    let expired_before = expired_so_far(&client).await?;
    tokio::time::sleep(until_deadline - Duration::from_secs(3)).await;
    let window = |put| {
        let stop = Arc::new(AtomicBool::new(false));
        (
            tokio::spawn(load_owned(url.to_owned(), put, Arc::clone(&stop))),
            stop,
        )
    };
    let ((gets, stop_gets), (puts, stop_puts)) = (window(false), window(true));
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop_gets.store(true, Ordering::Relaxed);
    stop_puts.store(true, Ordering::Relaxed);
    row("GET before the deadline", &gets.await??);
    row("PUT before the deadline", &puts.await??);

    let ((gets, stop_gets), (puts, stop_puts)) = (window(false), window(true));
    // Counted from the server's metrics rather than a watch, which would
    // stream a million events and load the server it measures.
    loop {
        let deleted = expired_so_far(&client).await? - expired_before;
        if deleted >= keys as u64 {
            break;
        }
        if now_us() - deadline > 600_000_000 {
            return Err(format!("only {deleted} of {keys} deleted after 600 s").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = now_us() - deadline;
    stop_gets.store(true, Ordering::Relaxed);
    stop_puts.store(true, Ordering::Relaxed);
    println!(
        "all {keys} keys deleted {:.2} s after their deadline",
        took as f64 / 1e6
    );
    row("GET while they expire", &gets.await??);
    row("PUT while they expire", &puts.await??);
    Ok(())
}

/// `kvstore_keys_expired_total{reason="expired"}` on the server's `/metrics`.
async fn expired_so_far(client: &Client) -> Result<u64> {
    let response = client
        .send(hyper::Method::GET, "/metrics", &[], bytes::Bytes::new())
        .await?;
    let text = String::from_utf8_lossy(&response.body);
    Ok(text
        .lines()
        .find(|line| line.starts_with("kvstore_keys_expired_total{reason=\"expired\"}"))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|n| n.parse::<f64>().ok())
        .map_or(0, |n| n as u64))
}

async fn load_owned(url: String, put: bool, stop: Arc<AtomicBool>) -> Result<Histogram<u64>> {
    load(&url, put, 4, stop).await
}
