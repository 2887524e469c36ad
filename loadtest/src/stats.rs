//! Latency histograms (HDR: constant relative error, constant memory), their summaries, and a
//! coarse per-second timeline for the latency-over-time plot.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// The process-wide origin of timelines: every recorder buckets samples by whole seconds since
/// this instant, so recorders of different tasks merge bucket by bucket.
static ORIGIN: OnceLock<Instant> = OnceLock::new();

/// Starts the timeline clock (idempotent); the first recorder use starts it otherwise.
pub fn start_clock() -> Instant {
    *ORIGIN.get_or_init(Instant::now)
}

/// Starts the timeline clock as if it had started `age` ago (a worker process given its
/// parent's clock, so that their timelines merge second by second); call it first.
pub fn start_clock_aged(age: Duration) -> Instant {
    *ORIGIN.get_or_init(|| Instant::now().checked_sub(age).unwrap_or_else(Instant::now))
}

/// A [`Recorder`] as a worker process hands it to its parent (JSON): every recorded value
/// with its count, and the timeline's non-empty buckets.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RecorderWire {
    /// `(µs, count)` of every histogram value recorded.
    pub values: Vec<(u64, u64)>,
    /// Every second with samples.
    pub timeline: Vec<WireSecond>,
}

/// `(second, [(bucket, count)], max µs)`: one second of a [`RecorderWire`]'s timeline.
pub type WireSecond = (u64, Vec<(u8, u32)>, u64);

/// Log-spaced buckets of a timeline second: bucket `i` holds samples of `[1.25^i, 1.25^(i+1))`
/// µs, so per-second percentiles are within 25 % (enough for a plot; the run's own percentiles
/// come from the HDR histogram).
const TIMELINE_BUCKETS: usize = 96;

fn timeline_bucket(us: u64) -> usize {
    let b = ((us.max(1) as f64).ln() / 1.25f64.ln()) as usize;
    b.min(TIMELINE_BUCKETS - 1)
}

fn timeline_bucket_upper_us(i: usize) -> f64 {
    1.25f64.powi(i as i32 + 1)
}

/// Records latencies in microseconds, 1 µs to 10 minutes, 2 significant digits (values within
/// 1 %), plus a coarse per-second timeline. The histogram is allocated on the first sample
/// (~22 KiB): the harness keeps one recorder per simulated subscriber, 10,000 of them for P3.
#[derive(Debug, Clone, Default)]
pub struct Recorder {
    hist: Option<Histogram<u64>>,
    /// Per second since [`start_clock`]: bucket counts (384 bytes a second) and the exact
    /// largest sample.
    timeline: Vec<Second>,
}

/// One second of the timeline.
#[derive(Debug, Clone)]
struct Second {
    buckets: [u32; TIMELINE_BUCKETS],
    /// The largest sample of the second, µs (as recorded in the histogram, so a second's
    /// maximum never exceeds the run's).
    max_us: u64,
}

impl Default for Second {
    fn default() -> Self {
        Second {
            buckets: [0; TIMELINE_BUCKETS],
            max_us: 0,
        }
    }
}

#[allow(
    clippy::expect_used,
    reason = "constant bounds that hdrhistogram accepts: a failure is a programming error"
)]
fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 2).expect("valid histogram bounds")
}

/// One second of the latency timeline.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TimePoint {
    /// Seconds since the run's clock started.
    pub sec: u64,
    /// Samples recorded in that second.
    pub count: u64,
    /// Median, milliseconds (within 25 %).
    pub p50_ms: f64,
    /// 99th percentile, milliseconds (within 25 %).
    pub p99_ms: f64,
    /// Largest sample, milliseconds, as the run's histogram stores it (so never above the
    /// run's maximum).
    pub max_ms: f64,
}

impl Recorder {
    /// Records one sample (clamped to the histogram's range), timed now.
    pub fn record(&mut self, d: Duration) {
        self.record_n(d, 1);
    }

    /// Records `n` samples of the same latency (a frame of `n` changes), timed now.
    pub fn record_n(&mut self, d: Duration, n: u64) {
        if n == 0 {
            return;
        }
        let us = (d.as_micros() as u64).clamp(1, 600_000_000);
        let hist = self.hist.get_or_insert_with(new_histogram);
        let _ = hist.record_n(us, n);
        // The value the histogram stores for this sample (its bucket's highest equivalent), so
        // that per-second maxima and the run's maximum are the same measure.
        let stored = hist.highest_equivalent(us);
        let sec = start_clock().elapsed().as_secs() as usize;
        if self.timeline.len() <= sec {
            self.timeline.resize(sec + 1, Second::default());
        }
        let Some(second) = self.timeline.get_mut(sec) else {
            return;
        };
        if let Some(slot) = second.buckets.get_mut(timeline_bucket(us)) {
            *slot = slot.saturating_add(n.min(u64::from(u32::MAX)) as u32);
        }
        second.max_us = second.max_us.max(stored);
    }

    /// The recorder in the form a worker process prints.
    pub fn to_wire(&self) -> RecorderWire {
        let values = self.hist.as_ref().map_or_else(Vec::new, |h| {
            h.iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect()
        });
        let timeline = self
            .timeline
            .iter()
            .enumerate()
            .filter(|(_, s)| s.buckets.iter().any(|c| *c > 0))
            .map(|(sec, s)| {
                let buckets = s
                    .buckets
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| **c > 0)
                    .map(|(i, c)| (i as u8, *c))
                    .collect();
                (sec as u64, buckets, s.max_us)
            })
            .collect();
        RecorderWire { values, timeline }
    }

    /// A recorder from what a worker printed (its samples keep their seconds).
    pub fn from_wire(w: &RecorderWire) -> Recorder {
        let mut r = Recorder::default();
        if !w.values.is_empty() {
            let hist = r.hist.get_or_insert_with(new_histogram);
            for (us, n) in &w.values {
                let _ = hist.record_n((*us).clamp(1, 600_000_000), *n);
            }
        }
        for (sec, buckets, max_us) in &w.timeline {
            let sec = *sec as usize;
            if sec > 24 * 3600 {
                continue; // not a timeline this harness wrote
            }
            if r.timeline.len() <= sec {
                r.timeline.resize(sec + 1, Second::default());
            }
            if let Some(second) = r.timeline.get_mut(sec) {
                for (i, c) in buckets {
                    if let Some(slot) = second.buckets.get_mut(usize::from(*i)) {
                        *slot = slot.saturating_add(*c);
                    }
                }
                second.max_us = second.max_us.max(*max_us);
            }
        }
        r
    }

    /// Adds another recorder's samples.
    pub fn merge(&mut self, other: &Recorder) {
        if let Some(theirs) = &other.hist {
            // Same bounds on both sides: adding cannot fail.
            let _ = self.hist.get_or_insert_with(new_histogram).add(theirs);
        }
        if self.timeline.len() < other.timeline.len() {
            self.timeline
                .resize(other.timeline.len(), Second::default());
        }
        for (mine, theirs) in self.timeline.iter_mut().zip(&other.timeline) {
            for (a, b) in mine.buckets.iter_mut().zip(&theirs.buckets) {
                *a = a.saturating_add(*b);
            }
            mine.max_us = mine.max_us.max(theirs.max_us);
        }
    }

    /// The seconds in which samples were recorded, with their coarse percentiles.
    pub fn timeline(&self) -> Vec<TimePoint> {
        let mut out = Vec::new();
        for (sec, second) in self.timeline.iter().enumerate() {
            let buckets = &second.buckets;
            let count: u64 = buckets.iter().map(|c| u64::from(*c)).sum();
            if count == 0 {
                continue;
            }
            let max_ms = second.max_us as f64 / 1000.0;
            // A bucket's upper bound may lie above every sample in it: never report a
            // percentile above the second's exact maximum.
            let at = |q: f64| {
                let rank = ((count as f64) * q).ceil().max(1.0) as u64;
                let mut seen = 0u64;
                for (i, c) in buckets.iter().enumerate() {
                    seen += u64::from(*c);
                    if seen >= rank {
                        return timeline_bucket_upper_us(i) / 1000.0;
                    }
                }
                timeline_bucket_upper_us(TIMELINE_BUCKETS - 1) / 1000.0
            };
            out.push(TimePoint {
                sec: sec as u64,
                count,
                p50_ms: at(0.5).min(max_ms),
                p99_ms: at(0.99).min(max_ms),
                max_ms,
            });
        }
        out
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.hist.as_ref().map_or(0, Histogram::len)
    }

    /// Percentiles of what was recorded.
    pub fn summary(&self) -> Summary {
        let Some(hist) = self.hist.as_ref().filter(|h| !h.is_empty()) else {
            return Summary::default();
        };
        let q = |q: f64| Duration::from_micros(hist.value_at_quantile(q));
        Summary {
            count: hist.len(),
            p50: q(0.50),
            p90: q(0.90),
            p99: q(0.99),
            p999: q(0.999),
            max: Duration::from_micros(hist.max()),
            mean: Duration::from_micros(hist.mean() as u64),
        }
    }

    /// Points of the latency-by-percentile plot.
    pub fn percentile_curve(&self) -> Vec<PercentilePoint> {
        let Some(hist) = self.hist.as_ref().filter(|h| !h.is_empty()) else {
            return Vec::new();
        };
        [
            0.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.99, 100.0,
        ]
        .iter()
        .map(|p| PercentilePoint {
            percentile: *p,
            ms: hist.value_at_percentile(*p) as f64 / 1000.0,
        })
        .collect()
    }
}

/// One point of the percentile curve.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PercentilePoint {
    /// The percentile (0–100).
    pub percentile: f64,
    /// Its latency, milliseconds.
    pub ms: f64,
}

/// Percentiles of a set of latency samples.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Number of samples.
    pub count: u64,
    /// Median.
    #[serde(serialize_with = "ms")]
    pub p50: Duration,
    /// 90th percentile.
    #[serde(serialize_with = "ms")]
    pub p90: Duration,
    /// 99th percentile.
    #[serde(serialize_with = "ms")]
    pub p99: Duration,
    /// 99.9th percentile.
    #[serde(serialize_with = "ms")]
    pub p999: Duration,
    /// Largest sample.
    #[serde(serialize_with = "ms")]
    pub max: Duration,
    /// Mean.
    #[serde(serialize_with = "ms")]
    pub mean: Duration,
}

/// Durations are reported in milliseconds (fractional).
fn ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64((d.as_secs_f64() * 1e6).round() / 1e3)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_within_histogram_precision() {
        let mut r = Recorder::default();
        for ms in 1..=1000u64 {
            r.record(Duration::from_millis(ms));
        }
        let s = r.summary();
        assert_eq!(s.count, 1000);
        let close = |d: Duration, ms: f64| (d.as_secs_f64() * 1e3 - ms).abs() / ms < 0.01;
        assert!(close(s.p50, 500.0), "{s:?}");
        assert!(close(s.p99, 990.0), "{s:?}");
        assert!(close(s.p999, 999.0), "{s:?}");
        assert!(close(s.max, 1000.0), "{s:?}");
        let mut other = Recorder::default();
        other.record(Duration::from_secs(5));
        r.merge(&other);
        assert_eq!(r.summary().count, 1001);
        assert!(close(r.summary().max, 5000.0));
        assert_eq!(Recorder::default().summary(), Summary::default());
    }

    #[test]
    fn timeline_buckets_samples_by_second_within_a_quarter() {
        let mut r = Recorder::default();
        r.record_n(Duration::from_millis(10), 99);
        r.record(Duration::from_millis(200));
        let t = r.timeline();
        assert_eq!(t.len(), 1, "{t:?}");
        assert_eq!(t[0].count, 100);
        let within = |got: f64, want: f64| got >= want && got <= want * 1.26;
        assert!(within(t[0].p50_ms, 10.0), "{t:?}");
        assert!(within(t[0].p99_ms, 10.0), "{t:?}");
        assert!(within(t[0].max_ms, 200.0), "{t:?}");
        let mut other = Recorder::default();
        other.record(Duration::from_millis(1));
        r.merge(&other);
        assert_eq!(r.timeline()[0].count, 101);
        assert_eq!(r.summary().count, 101);
    }

    /// A second's maximum is the run's measure of a maximum: never above the run's own (the
    /// timeline's log buckets once reported 9.40 ms against a run maximum of 8.895 ms).
    #[test]
    fn per_second_maxima_never_exceed_the_run_maximum() {
        let mut r = Recorder::default();
        for us in [8_895u64, 7_000, 120, 8_000, 1] {
            r.record(Duration::from_micros(us));
        }
        let run_max = r.summary().max.as_secs_f64() * 1e3;
        for p in r.timeline() {
            assert!(p.max_ms <= run_max, "{p:?} vs {run_max}");
            assert!(p.p99_ms <= p.max_ms && p.p50_ms <= p.max_ms, "{p:?}");
        }
        assert_eq!(
            r.timeline().iter().map(|p| p.max_ms).fold(0.0, f64::max),
            run_max
        );
    }

    /// A worker's recorder crosses to its parent as JSON and comes back the same.
    #[test]
    fn a_recorder_survives_the_wire() {
        let mut r = Recorder::default();
        for us in [1u64, 150, 150, 9_999, 2_000_000] {
            r.record(Duration::from_micros(us));
        }
        let text = serde_json::to_string(&r.to_wire()).unwrap();
        let back = Recorder::from_wire(&serde_json::from_str(&text).unwrap());
        assert_eq!(back.summary(), r.summary());
        assert_eq!(back.timeline(), r.timeline());
        assert_eq!(
            Recorder::from_wire(&RecorderWire::default())
                .summary()
                .count,
            0
        );
    }
}
