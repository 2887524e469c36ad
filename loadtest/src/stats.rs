//! Latency histograms (HDR: constant relative error, constant memory) and their summaries.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Records latencies in microseconds, 1 µs to 10 minutes, 3 significant digits.
#[derive(Debug, Clone)]
pub struct Recorder {
    hist: Histogram<u64>,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder {
            hist: Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds"),
        }
    }
}

impl Recorder {
    /// Records one sample (clamped to the histogram's range).
    pub fn record(&mut self, d: Duration) {
        let us = (d.as_micros() as u64).clamp(1, 600_000_000);
        self.hist.saturating_record(us);
    }

    /// Adds another recorder's samples.
    pub fn merge(&mut self, other: &Recorder) {
        // Same bounds on both sides: adding cannot fail.
        let _ = self.hist.add(&other.hist);
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.hist.len()
    }

    /// Percentiles of what was recorded.
    pub fn summary(&self) -> Summary {
        if self.hist.is_empty() {
            return Summary::default();
        }
        let q = |q: f64| Duration::from_micros(self.hist.value_at_quantile(q));
        Summary {
            count: self.hist.len(),
            p50: q(0.50),
            p90: q(0.90),
            p99: q(0.99),
            p999: q(0.999),
            max: Duration::from_micros(self.hist.max()),
            mean: Duration::from_micros(self.hist.mean() as u64),
        }
    }

    /// `(percentile, milliseconds)` points for a percentile plot.
    pub fn percentile_curve(&self) -> Vec<(f64, f64)> {
        if self.hist.is_empty() {
            return Vec::new();
        }
        [
            0.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.99, 100.0,
        ]
        .iter()
        .map(|p| (*p, self.hist.value_at_percentile(*p) as f64 / 1000.0))
        .collect()
    }
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
        let close = |d: Duration, ms: f64| (d.as_secs_f64() * 1e3 - ms).abs() / ms < 0.002;
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
}
