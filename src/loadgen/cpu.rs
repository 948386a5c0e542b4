//! The bench process's own CPU time, and how busy the whole machine is, to
//! tell when the client rather than the server limits the figures.

use std::time::Duration;

/// User plus system CPU time of this process so far; `None` where the
/// platform does not say.
// The one way to read the process's CPU time: a libc call (see the SAFETY notes).
#[allow(unsafe_code)]
pub fn process_cpu_time() -> Option<Duration> {
    #[cfg(unix)]
    {
        let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: getrusage writes a whole `rusage` into the pointer it is
        // given; RUSAGE_SELF is always a valid `who`.
        let status = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
        if status != 0 {
            return None;
        }
        // SAFETY: getrusage succeeded, so it filled the struct (which was
        // zeroed before anyway).
        let usage = unsafe { usage.assume_init() };
        let time = |t: libc::timeval| {
            Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
                + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
        };
        Some(time(usage.ru_utime) + time(usage.ru_stime))
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// Busy and total CPU time of the whole machine so far, in clock ticks
/// (Linux `/proc/stat`); `None` elsewhere.
pub fn machine_cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    parse_proc_stat(&stat)
}

/// `(busy, total)` from the first line of `/proc/stat`: `cpu user nice
/// system idle iowait irq softirq steal ...`; idle and iowait are not busy.
fn parse_proc_stat(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    let total: u64 = ticks.iter().sum();
    let idle = ticks.get(3)? + ticks.get(4).unwrap_or(&0);
    Some((total - idle, total))
}

/// The CPUs this process may run on.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat() {
        let stat = "cpu  100 5 50 800 40 0 5 0 0 0\ncpu0 50 2 25 400 20 0 3 0 0 0\n";
        assert_eq!(parse_proc_stat(stat), Some((160, 1000)));
        assert_eq!(parse_proc_stat("intr 1 2"), None);
    }

    #[test]
    #[cfg(unix)]
    fn cpu_time_grows_with_work() {
        let before = process_cpu_time().expect("getrusage");
        let mut x = 0u64;
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_millis(30) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let after = process_cpu_time().expect("getrusage");
        assert!(after > before);
    }
}
