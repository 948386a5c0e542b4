//! The durable-write floor: write a small record to a file and fdatasync it,
//! over and over, on the disk of a given directory. A durable PUT cannot beat
//! this; benchmarks compare against it in the same run, because the disk's
//! sync time varies a lot on a shared machine.
//!
//! Two kinds of write, taken in turns so that both see the same phases of
//! the disk:
//! - an append, which grows the file: fdatasync must also commit the new
//!   size (on ext4, a journal commit), as for Redis's append-only file;
//! - a write into a file made 64 MiB long beforehand, as fjall makes its
//!   journal: the size does not change, and only the first write to each
//!   block allocates it. This is the floor of kvstore's own syncs.
//!
//! Run with `cargo run --release --example fsync_floor -- DIR [COUNT]`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::time::Instant;

/// How long fjall makes a journal before writing to it.
const PREALLOCATED_BYTES: u64 = 64 << 20;

/// Writes per turn of each kind.
const TURN: usize = 100;

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().unwrap_or_else(|| ".".to_owned());
    let count: usize = args.next().and_then(|n| n.parse().ok()).unwrap_or(2000);
    let dir = Path::new(&dir);
    let append_path = dir.join("fsync-floor-append.probe");
    let preallocated_path = dir.join("fsync-floor-preallocated.probe");
    let mut append = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&append_path)?;
    let mut preallocated = File::create(&preallocated_path)?;
    preallocated.set_len(PREALLOCATED_BYTES)?;
    preallocated.sync_all()?;
    let record = [b'x'; 128];
    let (mut appends, mut writes) = (Vec::with_capacity(count), Vec::with_capacity(count));
    while appends.len() < count {
        for (file, micros) in [
            (&mut append, &mut appends),
            (&mut preallocated, &mut writes),
        ] {
            for _ in 0..TURN.min(count - micros.len()) {
                let start = Instant::now();
                file.write_all(&record)?;
                file.sync_data()?;
                micros.push(start.elapsed().as_secs_f64() * 1e6);
            }
        }
    }
    drop((append, preallocated));
    std::fs::remove_file(&append_path)?;
    std::fs::remove_file(&preallocated_path)?;
    for (what, mut micros) in [
        ("append", appends),
        ("write into a preallocated file", writes),
    ] {
        micros.sort_by(f64::total_cmp);
        let at = |q: f64| {
            micros
                .get(((count as f64 * q) as usize).min(count.saturating_sub(1)))
                .copied()
                .unwrap_or(0.0)
        };
        println!(
            "fdatasync of a 128-byte {what}, {count} times: p50 {:.0} us, p99 {:.0} us",
            at(0.5),
            at(0.99)
        );
    }
    Ok(())
}
