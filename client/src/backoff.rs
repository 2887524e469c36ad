//! Reconnect delays: capped exponential backoff with full jitter.
//!
//! Attempt `n` (0-based) waits a uniformly random time in `[0, min(cap, base · 2ⁿ)]`. Full
//! jitter spreads a crowd of clients that lost the same gateway at the same moment over the
//! whole window instead of bringing them back in synchronised waves. Pure: the random source is
//! passed in, so the computed delays are tested without a clock.

use std::time::Duration;

use rand::Rng;

/// Backoff parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The window of the first retry.
    pub base: Duration,
    /// The largest window.
    pub cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_millis(250),
            cap: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    /// The upper bound of attempt `attempt`'s delay: `min(cap, base · 2^attempt)`.
    pub fn window(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// A delay for attempt `attempt`, drawn uniformly from `[0, window(attempt)]`.
    pub fn delay(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        let window = self.window(attempt).as_micros() as u64;
        Duration::from_micros(rng.random_range(0..=window))
    }

    /// The wait after a server's `goaway`: its `retry_after` plus up to half of it again, so
    /// the clients of a draining node do not all return at the same instant.
    pub fn after_goaway(retry_after: Duration, rng: &mut impl Rng) -> Duration {
        let extra = retry_after.as_micros() as u64 / 2;
        retry_after + Duration::from_micros(rng.random_range(0..=extra))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn window_doubles_then_caps() {
        let b = Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(5),
        };
        let w: Vec<u128> = (0..10).map(|n| b.window(n).as_millis()).collect();
        assert_eq!(w, [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000, 5000]);
        // Huge attempt numbers neither overflow nor exceed the cap.
        assert_eq!(b.window(u32::MAX), Duration::from_secs(5));
    }

    #[test]
    fn delays_are_jittered_within_the_window() {
        let b = Backoff::default();
        let mut rng = StdRng::seed_from_u64(7);
        for attempt in 0..20 {
            let window = b.window(attempt);
            let delays: Vec<Duration> = (0..200).map(|_| b.delay(attempt, &mut rng)).collect();
            assert!(delays.iter().all(|d| *d <= window), "attempt {attempt}");
            let distinct: std::collections::BTreeSet<_> = delays.iter().collect();
            assert!(
                distinct.len() > 150,
                "jittered: {} distinct",
                distinct.len()
            );
            // Full jitter: the draws cover the window, low and high.
            let lo = delays.iter().filter(|d| **d < window / 4).count();
            let hi = delays.iter().filter(|d| **d > window * 3 / 4).count();
            assert!(lo > 20 && hi > 20, "attempt {attempt}: {lo} low, {hi} high");
        }
    }

    #[test]
    fn mean_delay_grows_until_the_cap() {
        let b = Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(2),
        };
        let mut rng = StdRng::seed_from_u64(1);
        let mean = |attempt, rng: &mut StdRng| {
            (0..2000)
                .map(|_| b.delay(attempt, rng).as_secs_f64())
                .sum::<f64>()
                / 2000.0
        };
        let means: Vec<f64> = (0..8).map(|a| mean(a, &mut rng)).collect();
        for a in 0..4 {
            assert!(means[a + 1] > means[a] * 1.6, "{means:?}");
        }
        // Capped: attempts 5, 6 and 7 draw from the same 2 s window (mean about 1 s).
        for m in &means[5..] {
            assert!((m - 1.0).abs() < 0.1, "{means:?}");
        }
    }

    #[test]
    fn goaway_waits_at_least_the_hint() {
        let mut rng = StdRng::seed_from_u64(3);
        let hint = Duration::from_millis(400);
        let waits: Vec<_> = (0..100)
            .map(|_| Backoff::after_goaway(hint, &mut rng))
            .collect();
        assert!(waits.iter().all(|w| *w >= hint && *w <= hint * 3 / 2));
        assert!(
            waits
                .iter()
                .collect::<std::collections::BTreeSet<_>>()
                .len()
                > 50
        );
    }
}
