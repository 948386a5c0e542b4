//! The durable-write floor: append a small record to a file and fdatasync it,
//! over and over, on the disk of a given directory. A durable PUT cannot beat
//! this; benchmarks compare against it in the same run, because the disk's
//! sync time varies a lot on a shared machine.
//!
//! Run with `cargo run --release --example fsync_floor -- DIR [COUNT]`.

use std::io::Write;
use std::time::Instant;

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().unwrap_or_else(|| ".".to_owned());
    let count: usize = args.next().and_then(|n| n.parse().ok()).unwrap_or(2000);
    let path = std::path::Path::new(&dir).join("fsync-floor.probe");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)?;
    let record = [b'x'; 128];
    let mut micros = Vec::with_capacity(count);
    for _ in 0..count {
        let start = Instant::now();
        file.write_all(&record)?;
        file.sync_data()?;
        micros.push(start.elapsed().as_secs_f64() * 1e6);
    }
    drop(file);
    std::fs::remove_file(&path)?;
    micros.sort_by(f64::total_cmp);
    let at = |q: f64| {
        micros
            .get(((count as f64 * q) as usize).min(count.saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    println!(
        "fdatasync of a 128-byte append, {count} times: p50 {:.0} us, p99 {:.0} us",
        at(0.5),
        at(0.99)
    );
    Ok(())
}
