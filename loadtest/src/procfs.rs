//! Samples a process's CPU time and resident memory from `/proc` (Linux), for the gateway the
//! harness spawned or was pointed at with `--gateway-pid`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

/// One reading.
#[derive(Debug, Clone, Copy)]
pub struct Reading {
    /// Resident set size, KiB.
    pub rss_kib: u64,
    /// User + system CPU time, clock ticks.
    pub cpu_ticks: u64,
    /// When it was taken.
    pub at: Instant,
}

/// Reads `/proc/<pid>` once (`None` if the process is gone or this is not Linux).
pub fn read(pid: u32) -> Option<Reading> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Reading {
        rss_kib,
        cpu_ticks: utime + stime,
        at: Instant::now(),
    })
}

/// CPU use between two readings of one process, in percent of one core.
pub fn cpu_percent(a: &Reading, b: &Reading) -> f64 {
    let secs = b.at.duration_since(a.at).as_secs_f64();
    if secs <= 0.0 {
        return 0.0;
    }
    b.cpu_ticks.saturating_sub(a.cpu_ticks) as f64 / TICKS_PER_SEC / secs * 100.0
}

/// What the sampler saw over a run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProcStats {
    /// The process.
    pub pid: u32,
    /// RSS at the start, KiB.
    pub rss_start_kib: u64,
    /// Highest RSS seen, KiB.
    pub rss_max_kib: u64,
    /// RSS at the end, KiB.
    pub rss_end_kib: u64,
    /// Average CPU use over the run, in percent of one core.
    pub cpu_percent: f64,
    /// CPU time used over the run (user + system), seconds: the figure that does not depend
    /// on how busy the rest of the machine was (per million deliveries in the reports).
    pub cpu_seconds: f64,
    /// Samples taken.
    pub samples: u64,
    /// The readings over time, for the report's plot.
    pub series: Vec<SeriesPoint>,
}

/// One point of a sampled process's series.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct SeriesPoint {
    /// Seconds since the run's clock started.
    pub sec: f64,
    /// Resident set size, KiB.
    pub rss_kib: u64,
    /// CPU use since the previous reading, in percent of one core.
    pub cpu_percent: f64,
}

/// The machine a run happened on.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Machine {
    /// Logical CPUs this process may use.
    pub cores: usize,
    /// Total memory, KiB (`MemTotal`).
    pub memory_kib: u64,
    /// Kernel release (`uname -r`).
    pub kernel: String,
    /// Host name.
    pub hostname: String,
}

/// Reads the machine's description from /proc (fields it cannot read stay empty).
pub fn machine() -> Machine {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .trim()
            .to_owned()
    };
    let memory_kib = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    Machine {
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        memory_kib,
        kernel: read("/proc/sys/kernel/osrelease"),
        hostname: read("/proc/sys/kernel/hostname"),
    }
}

/// Samples a process every `every` on a thread until [`Sampler::finish`].
pub struct Sampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<ProcStats>,
}

/// Clock ticks per second (`getconf CLK_TCK`); 100 on every Linux this runs on.
const TICKS_PER_SEC: f64 = 100.0;

impl Sampler {
    /// Starts sampling `pid`.
    pub fn start(pid: u32, every: Duration) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let first = read(pid);
            let mut stats = ProcStats {
                pid,
                ..ProcStats::default()
            };
            let Some(first) = first else { return stats };
            stats.rss_start_kib = first.rss_kib;
            stats.rss_max_kib = first.rss_kib;
            let mut last = first;
            while !s.load(Ordering::Relaxed) {
                // Sampling cadence, not synchronisation.
                std::thread::sleep(every);
                let Some(r) = read(pid) else { break };
                let cpu = cpu_percent(&last, &r);
                let t =
                    r.at.duration_since(crate::stats::start_clock())
                        .as_secs_f64();
                stats.series.push(SeriesPoint {
                    sec: t,
                    rss_kib: r.rss_kib,
                    cpu_percent: cpu,
                });
                stats.rss_max_kib = stats.rss_max_kib.max(r.rss_kib);
                stats.samples += 1;
                last = r;
            }
            stats.rss_end_kib = last.rss_kib;
            stats.cpu_percent = cpu_percent(&first, &last);
            stats.cpu_seconds =
                last.cpu_ticks.saturating_sub(first.cpu_ticks) as f64 / TICKS_PER_SEC;
            stats
        });
        Sampler { stop, thread }
    }

    /// Stops and returns what was seen.
    pub fn finish(self) -> ProcStats {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let r = read(std::process::id()).expect("/proc is readable");
        assert!(r.rss_kib > 100);
        let s = Sampler::start(std::process::id(), Duration::from_millis(5));
        // Burn some CPU so the sampler has something to see.
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        let stats = s.finish();
        assert!(stats.rss_max_kib >= stats.rss_start_kib);
        assert!(stats.samples > 0);
        let m = machine();
        assert!(
            m.cores >= 1 && m.memory_kib > 0 && !m.kernel.is_empty(),
            "{m:?}"
        );
    }
}
