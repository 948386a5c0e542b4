//! Watch delivery latency: from a write's acknowledgement to its event at a
//! watcher, with many watchers open.
//!
//! Opens `WATCHERS` watches (`GET /v1/watch?prefix=wNNNNN/`, each on a prefix
//! of its own) on `WATCH_URL`, then `WRITERS` tasks PUT `WRITES` values in
//! all to the first `ACTIVE` prefixes through `WRITE_URL` (the same server,
//! or another one on the same PostgreSQL). Prints the latency's percentiles
//! and, given the server's pid, its resident memory per open watcher.
//!
//! ```sh
//! cargo run --release --example watch_latency -- WATCH_URL WRITE_URL WATCHERS ACTIVE WRITES WRITERS [SERVER_PID]
//! ```

use std::collections::HashMap;
use std::error::Error;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper_util::rt::TokioIo;
use kvstore::client::Client;
use kvstore::storage::Condition;
use tokio::sync::mpsc;

type Result<T> = std::result::Result<T, Box<dyn Error + Send + Sync>>;

/// Arrivals: the revision of a change event and when it was read.
type Arrivals = mpsc::UnboundedSender<(u64, Instant)>;

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [
        watch_url,
        write_url,
        watchers,
        active,
        writes,
        writers,
        rest @ ..,
    ] = args.as_slice()
    else {
        return Err(
            "usage: watch_latency WATCH_URL WRITE_URL WATCHERS ACTIVE WRITES WRITERS [SERVER_PID]"
                .into(),
        );
    };
    let (watchers, active): (usize, usize) = (watchers.parse()?, active.parse()?);
    let (writes, writers): (usize, usize) = (writes.parse()?, writers.parse()?);
    let pid = rest.first().map(|p| p.parse::<u32>()).transpose()?;
    let authority = watch_url
        .strip_prefix("http://")
        .ok_or("WATCH_URL must be http://HOST:PORT")?
        .trim_end_matches('/')
        .to_owned();

    let rss_before = pid.map(rss_bytes).transpose()?;
    let (arrivals, mut arrived) = mpsc::unbounded_channel();
    let opened = Instant::now();
    for chunk in (0..watchers).collect::<Vec<_>>().chunks(200) {
        let mut opening = Vec::new();
        for &i in chunk {
            let (authority, arrivals) = (authority.clone(), arrivals.clone());
            opening.push(tokio::spawn(async move {
                open_watch(&authority, i, arrivals).await
            }));
        }
        for task in opening {
            task.await??;
        }
    }
    println!(
        "{watchers} watchers open in {:.1} s",
        opened.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    if let (Some(pid), Some(before)) = (pid, rss_before) {
        let after = rss_bytes(pid)?;
        println!(
            "server memory: {:.1} MiB before, {:.1} MiB with the watchers: {:.1} KiB per watcher",
            before as f64 / 1048576.0,
            after as f64 / 1048576.0,
            after.saturating_sub(before) as f64 / 1024.0 / watchers.max(1) as f64
        );
    }

    let acked: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let client = Client::new(write_url)?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for writer in 0..writers {
        let (client, acked) = (client.clone(), Arc::clone(&acked));
        tasks.push(tokio::spawn(async move {
            let mut n = writer;
            while n < writes {
                let key = format!("w{:05}/k{}", n % active.max(1), n / active.max(1));
                let answer = client.put(&key, Bytes::from_static(&[b'x'; 100]), Condition::Any);
                let revision = answer.await?.revision;
                let now = Instant::now();
                acked.lock().map_err(|_| "poisoned")?.insert(revision, now);
                n += writers;
            }
            Ok::<(), Box<dyn Error + Send + Sync>>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let elapsed = started.elapsed();
    drop(arrivals);

    let mut latency = hdrhistogram::Histogram::<u64>::new(3)?;
    let mut early = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut received = 0;
    while received < writes {
        let Ok(Some((revision, at))) = tokio::time::timeout_at(deadline, arrived.recv()).await
        else {
            break;
        };
        received += 1;
        let acked_at = acked
            .lock()
            .map_err(|_| "poisoned")?
            .get(&revision)
            .copied();
        match acked_at {
            Some(acked_at) if at >= acked_at => {
                latency.record(u64::try_from((at - acked_at).as_micros())?)?;
            }
            // The event was read before the writer had taken its answer.
            Some(_) => {
                early += 1;
                latency.record(0)?;
            }
            None => {}
        }
    }
    println!(
        "{writes} writes by {writers} writers in {:.2} s ({:.0}/s); {received} events received, {early} before the writer saw its answer",
        elapsed.as_secs_f64(),
        writes as f64 / elapsed.as_secs_f64()
    );
    println!(
        "delivery after the acknowledgement: p50 {} us, p99 {} us, p99.9 {} us, max {} us",
        latency.value_at_quantile(0.5),
        latency.value_at_quantile(0.99),
        latency.value_at_quantile(0.999),
        latency.max()
    );
    Ok(())
}

/// Opens one watch and spawns the task that reads it.
async fn open_watch(authority: &str, index: usize, arrivals: Arrivals) -> Result<()> {
    let stream = tokio::net::TcpStream::connect(authority).await?;
    stream.set_nodelay(true)?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = hyper::Request::get(format!("/v1/watch?prefix=w{index:05}/"))
        .header("host", authority)
        .body(http_body_util::Empty::<Bytes>::new())?;
    let response = sender.send_request(request).await?;
    if !response.status().is_success() {
        return Err(format!("watch {index}: {}", response.status()).into());
    }
    let mut body = response.into_body();
    tokio::spawn(async move {
        // Keeps the connection's sender alive while the watch is read.
        let _sender = sender;
        let mut pending = String::new();
        while let Some(Ok(frame)) = body.frame().await {
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let now = Instant::now();
            pending.push_str(&String::from_utf8_lossy(&data));
            while let Some(end) = pending.find("\n\n") {
                let block: String = pending.drain(..end + 2).collect();
                if block.contains("event: change") {
                    let id = block
                        .lines()
                        .find_map(|line| line.strip_prefix("id: "))
                        .and_then(|id| id.parse::<u64>().ok());
                    if let Some(id) = id {
                        let _ = arrivals.send((id, now));
                    }
                }
            }
        }
    });
    Ok(())
}

/// The resident memory of a process, from /proc.
fn rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .ok_or("no VmRSS")?
        .parse::<u64>()?;
    Ok(kib * 1024)
}
