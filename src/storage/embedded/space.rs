//! The free-space guard of the embedded engine.
//!
//! An engine that runs out of space in the middle of a commit is poisoned by
//! fjall and refuses every later write, so the server refuses writes (507
//! `insufficient_storage`) a little before that, while the engine still has
//! the room it needs to finish what it started: the commit group already
//! admitted, the flush of its memtables, the compactions behind them.
//!
//! The free space of the data directory's file system (`statvfs`:
//! `f_bavail * f_frsize`, the space an unprivileged process may use) is read
//! by the engine's watcher thread every [`POLL_INTERVAL`] and by the writer
//! after every [`CHECK_EVERY_BYTES`] it commits. The write path reads only an
//! atomic flag: no system call per write.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::error::InvalidValue;

/// How often the watcher thread reads the free space.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// The writer reads the free space again once it has committed this much
/// since the last reading, so a burst of writes between two polls cannot run
/// far past the threshold: at most this plus one commit group (64 MiB).
const CHECK_EVERY_BYTES: u64 = 4 << 20;
/// Writes resume only once the free space is this much above the threshold
/// (a tenth of it, at most 64 MiB), so that a disk hovering around the
/// threshold does not flip between refusing and accepting on every poll.
const RESUME_MARGIN_MAX: u64 = 64 << 20;
/// An engine that ran out of space is reopened only once this much is free
/// as well, however low the threshold: with the guard off
/// (`--min-free-bytes 0`) it would otherwise be reopened onto a disk that
/// is still full.
const REOPEN_FLOOR: u64 = 8 << 20;

/// How much space to keep free on the data directory's file system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MinFree {
    /// A number of bytes; 0 turns the guard off.
    Bytes(u64),
    /// A percentage (0 to 100) of the file system's size.
    Percent(u8),
    /// The smaller of the two.
    SmallerOf(u64, u8),
}

impl Default for MinFree {
    /// 256 MiB or 10% of the file system, whichever is smaller.
    ///
    /// 256 MiB leaves the engine room, past a threshold it may overrun by one
    /// commit group (64 MiB), for a flush of a full memtable (64 MiB), a new
    /// journal (fjall rotates at 64 MB) and the output of a compaction
    /// before it deletes its input. A fixed amount suits any large disk (a
    /// percentage of 10 TB would leave a terabyte idle); on a small one
    /// (under 2.5 GiB) 10% keeps the guard from taking a quarter of it.
    fn default() -> Self {
        MinFree::SmallerOf(256 << 20, 10)
    }
}

impl MinFree {
    /// The bytes to keep free on a file system of `total` bytes.
    pub fn threshold(self, total: u64) -> u64 {
        let percent = |p: u8| total / 100 * u64::from(p) + total % 100 * u64::from(p) / 100;
        match self {
            MinFree::Bytes(bytes) => bytes,
            MinFree::Percent(p) => percent(p),
            MinFree::SmallerOf(bytes, p) => bytes.min(percent(p)),
        }
    }
}

impl std::str::FromStr for MinFree {
    type Err = InvalidValue;

    /// A number of bytes (`268435456`) or a percentage of the file system
    /// (`5%`).
    fn from_str(s: &str) -> Result<Self, InvalidValue> {
        let s = s.trim();
        match s.strip_suffix('%') {
            Some(p) => match p.trim().parse::<u8>() {
                Ok(p) if p <= 100 => Ok(MinFree::Percent(p)),
                _ => Err(InvalidValue(format!(
                    "{s:?}: a percentage must be a whole number from 0 to 100"
                ))),
            },
            None => s.parse::<u64>().map(MinFree::Bytes).map_err(|_| {
                InvalidValue(format!(
                    "{s:?}: give a number of bytes (268435456) or a percentage (5%)"
                ))
            }),
        }
    }
}

impl std::fmt::Display for MinFree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MinFree::Bytes(bytes) => write!(f, "{bytes}"),
            MinFree::Percent(p) => write!(f, "{p}%"),
            MinFree::SmallerOf(bytes, p) => write!(f, "min({bytes}, {p}%)"),
        }
    }
}

/// Metric names of the guard.
const FREE_BYTES: &str = "kvstore_storage_free_bytes";
const MIN_FREE_BYTES: &str = "kvstore_storage_min_free_bytes";
const SPACE_LOW: &str = "kvstore_storage_space_low";

/// The free space of one data directory and whether writes must stop.
pub(crate) struct SpaceGuard {
    path: PathBuf,
    min_free: MinFree,
    /// Whether writes are refused for lack of space.
    low: AtomicBool,
    /// The last reading, and the threshold it was compared with.
    free: AtomicU64,
    threshold: AtomicU64,
    /// Bytes committed since the last reading.
    written: AtomicU64,
    /// Whether a failed reading was logged (once is enough).
    unreadable: AtomicBool,
}

impl SpaceGuard {
    /// A guard of `path`'s file system; reads the free space once.
    pub(crate) fn new(path: &Path, min_free: MinFree) -> Self {
        let guard = SpaceGuard {
            path: path.to_path_buf(),
            min_free,
            low: AtomicBool::new(false),
            free: AtomicU64::new(u64::MAX),
            threshold: AtomicU64::new(0),
            written: AtomicU64::new(0),
            unreadable: AtomicBool::new(false),
        };
        guard.check();
        guard
    }

    /// Whether writes are refused for lack of space (one atomic load).
    pub(crate) fn is_low(&self) -> bool {
        self.low.load(Ordering::Acquire)
    }

    /// Free bytes at the last reading.
    pub(crate) fn free(&self) -> u64 {
        self.free.load(Ordering::Acquire)
    }

    /// Whether the last reading leaves room to reopen an engine that ran out
    /// of space (or, for a poisoned engine, whether the disk was far from
    /// full, so that the poison had another cause).
    pub(crate) fn has_room(&self) -> bool {
        !self.is_low() && self.free() >= REOPEN_FLOOR.max(self.resume_level())
    }

    fn resume_level(&self) -> u64 {
        let threshold = self.threshold.load(Ordering::Acquire);
        threshold.saturating_add((threshold / 10).min(RESUME_MARGIN_MAX))
    }

    /// Counts bytes just committed; reads the free space again once enough
    /// have been written since the last reading.
    pub(crate) fn committed(&self, bytes: u64) {
        if self.written.fetch_add(bytes, Ordering::AcqRel) + bytes >= CHECK_EVERY_BYTES {
            self.check();
        }
    }

    /// Reads the free space, and starts or stops refusing writes (logging
    /// either change once).
    pub(crate) fn check(&self) {
        self.written.store(0, Ordering::Release);
        let (free, total) = match free_space(&self.path) {
            Ok(reading) => reading,
            Err(err) => {
                // Without a reading the guard cannot tell: it lets writes
                // through, and a full disk is caught when the engine fails.
                if !self.unreadable.swap(true, Ordering::AcqRel) {
                    tracing::warn!(data_dir = %self.path.display(), error = %err,
                        "cannot read the free space of the data directory; the free-space guard is off");
                }
                return;
            }
        };
        let threshold = self.min_free.threshold(total);
        self.threshold.store(threshold, Ordering::Release);
        self.free.store(free, Ordering::Release);
        let low = if self.is_low() {
            free < self.resume_level()
        } else {
            free < threshold
        };
        if self.low.swap(low, Ordering::AcqRel) == low {
            return;
        }
        if low {
            tracing::warn!(
                data_dir = %self.path.display(),
                free_bytes = free,
                min_free_bytes = threshold,
                "disk nearly full: refusing writes (507) until space is freed in the data directory's file system; reads go on"
            );
        } else {
            tracing::info!(
                data_dir = %self.path.display(),
                free_bytes = free,
                min_free_bytes = threshold,
                "disk space is back above the threshold: accepting writes again"
            );
        }
    }

    /// The message of a write refused by the guard.
    pub(crate) fn refusal(&self) -> String {
        format!(
            "the disk of the data directory {} has {} bytes free, under the {} bytes kept free \
             (--min-free-bytes): writes are refused until space is freed there; reads are still \
             served, and writes resume by themselves",
            self.path.display(),
            self.free(),
            self.threshold.load(Ordering::Acquire)
        )
    }

    /// Sets the guard's gauges; `out_of_space` when the engine itself ran out.
    pub(crate) fn report_metrics(&self, out_of_space: bool) {
        let free = self.free();
        if free != u64::MAX {
            metrics::gauge!(FREE_BYTES).set(free as f64);
        }
        metrics::gauge!(MIN_FREE_BYTES).set(self.threshold.load(Ordering::Acquire) as f64);
        metrics::gauge!(SPACE_LOW).set(if self.is_low() || out_of_space {
            1.0
        } else {
            0.0
        });
    }
}

/// Whether an I/O error means the disk (or the user's quota) is full.
pub(crate) fn is_out_of_space(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}

/// Free bytes (for an unprivileged process) and the size of the file system
/// holding `path`.
// std has no statvfs: a libc call (see the SAFETY notes).
#[cfg(unix)]
#[allow(unsafe_code)]
fn free_space(path: &Path) -> io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let mut stats = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a NUL-terminated string and `stats` is memory for
    // one `statvfs`, which the call fills when it returns 0.
    if unsafe { libc::statvfs(path.as_ptr(), stats.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it initialised `stats`.
    let stats = unsafe { stats.assume_init() };
    #[allow(clippy::useless_conversion)] // the field types differ between platforms
    let (available, blocks, fragment) = (
        u64::from(stats.f_bavail),
        u64::from(stats.f_blocks),
        u64::from(stats.f_frsize),
    );
    Ok((
        available.saturating_mul(fragment),
        blocks.saturating_mul(fragment),
    ))
}

#[cfg(not(unix))]
fn free_space(_: &Path) -> io::Result<(u64, u64)> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "statvfs is not available on this platform",
    ))
}

#[cfg(test)]
mod tests {
    use super::MinFree;

    #[test]
    fn thresholds() {
        let gib = 1u64 << 30;
        assert_eq!(MinFree::default().threshold(100 * gib), 256 << 20);
        assert_eq!(MinFree::default().threshold(gib), gib / 10);
        assert_eq!(MinFree::Percent(5).threshold(200), 10);
        assert_eq!(MinFree::Percent(100).threshold(u64::MAX), u64::MAX);
        assert_eq!(MinFree::Bytes(0).threshold(gib), 0);
    }

    #[test]
    fn parsing() {
        assert_eq!("1048576".parse(), Ok(MinFree::Bytes(1 << 20)));
        assert_eq!("5%".parse(), Ok(MinFree::Percent(5)));
        assert_eq!("0".parse(), Ok(MinFree::Bytes(0)));
        assert!("101%".parse::<MinFree>().is_err());
        assert!("1.5%".parse::<MinFree>().is_err());
        assert!("lots".parse::<MinFree>().is_err());
    }
}
