//! How fast a connection may make the node work (pure decisions; the connection asks them for
//! every frame it reads):
//! - [`Bucket`]: frames other than pushes. A frame over the rate is answered with
//!   `rate_limited` and not handled; a connection that keeps going over it is closed.
//! - [`Pace`]: what pushes and subscription starts cost (mutations, bytes, snapshots). Nothing
//!   is refused: work over the rate runs into debt, and the connection stops reading (pushes)
//!   or the subscription waits (snapshots) until the debt is paid. So a flooding client is
//!   slowed to its rate by TCP backpressure, loses nothing, and cannot take the group commit
//!   or the database from other clients.

use std::time::{Duration, Instant};

/// What to do with one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Within the rate: handle it.
    Allow,
    /// Over the rate: answer `rate_limited`, do not handle it.
    Refuse,
    /// Over the rate `max_strikes` times more than it was within it: close the connection.
    Close,
}

/// A token bucket: `rate` tokens per second, at most `burst` saved up; every frame takes one.
#[derive(Debug, Clone)]
pub(crate) struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
    /// Refusals, less one for every allowed frame since: a client that keeps sending faster
    /// than the rate gathers them even though the refill lets a frame through now and then.
    strikes: u32,
    max_strikes: u32,
}

impl Bucket {
    /// A full bucket. `rate` 0 means no limit.
    pub(crate) fn new(rate: u32, burst: u32, max_strikes: u32, now: Instant) -> Bucket {
        Bucket {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            tokens: f64::from(burst.max(1)),
            last: now,
            strikes: 0,
            max_strikes: max_strikes.max(1),
        }
    }

    /// Takes a token for a frame read at `now`.
    pub(crate) fn frame(&mut self, now: Instant) -> Verdict {
        if self.rate <= 0.0 {
            return Verdict::Allow;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.strikes = self.strikes.saturating_sub(1);
            return Verdict::Allow;
        }
        self.strikes += 1;
        if self.strikes >= self.max_strikes {
            Verdict::Close
        } else {
            Verdict::Refuse
        }
    }

    /// How long until the next frame would be allowed (for the error's text).
    pub(crate) fn wait(&self) -> Duration {
        if self.rate <= 0.0 || self.tokens >= 1.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64((1.0 - self.tokens) / self.rate)
    }
}

/// A token bucket that may go into debt: `rate` tokens per second, at most `burst` saved up.
/// Taking more than there is is allowed once; the caller then waits until the debt is paid.
#[derive(Debug, Clone)]
pub(crate) struct Pace {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Pace {
    /// A full bucket. `rate` 0 means no limit.
    pub(crate) fn new(rate: u64, burst: u64, now: Instant) -> Pace {
        let burst = burst.max(1) as f64;
        Pace {
            rate: rate as f64,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes `n` tokens at `now`; returns when the debt, if any, is paid (the time before
    /// which the caller should start no more work of this kind).
    pub(crate) fn take(&mut self, n: u64, now: Instant) -> Option<Instant> {
        if self.rate <= 0.0 {
            return None;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst) - n as f64;
        if self.tokens >= 0.0 {
            return None;
        }
        Some(now + Duration::from_secs_f64(-self.tokens / self.rate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate_then_a_close_for_a_client_that_keeps_going() {
        let t0 = Instant::now();
        let mut b = Bucket::new(10, 5, 3, t0);
        // The burst is allowed at once.
        for _ in 0..5 {
            assert_eq!(b.frame(t0), Verdict::Allow);
        }
        // Then frames are refused, and the third refusal in a row closes.
        assert_eq!(b.frame(t0), Verdict::Refuse);
        assert_eq!(b.frame(t0), Verdict::Refuse);
        assert_eq!(b.frame(t0), Verdict::Close);
        // Time refills at the rate: 100 ms is one frame at 10/s, and it clears the strikes.
        let mut b = Bucket::new(10, 5, 3, t0);
        for _ in 0..5 {
            b.frame(t0);
        }
        assert_eq!(b.frame(t0), Verdict::Refuse);
        assert!(b.wait() > Duration::ZERO && b.wait() <= Duration::from_millis(100));
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(b.frame(t1), Verdict::Allow, "one strike forgiven");
        assert_eq!(b.frame(t1), Verdict::Refuse);
        assert_eq!(b.frame(t1), Verdict::Refuse);
        assert_eq!(b.frame(t1), Verdict::Close);
        // A long pause refills only up to the burst.
        let t2 = t1 + Duration::from_secs(60);
        let allowed = (0..20).filter(|_| b.frame(t2) == Verdict::Allow).count();
        assert_eq!(allowed, 5);
    }

    #[test]
    fn a_flood_that_the_refill_lets_through_now_and_then_is_still_closed() {
        // 10 frames a second allowed; the client sends 100 a second.
        let t0 = Instant::now();
        let mut b = Bucket::new(10, 10, 50, t0);
        let closed_after = (0..10_000u64)
            .position(|i| b.frame(t0 + Duration::from_millis(i * 10)) == Verdict::Close);
        assert!(closed_after.is_some_and(|i| i < 200), "{closed_after:?}");
    }

    #[test]
    fn a_steady_client_within_the_rate_is_never_refused() {
        let t0 = Instant::now();
        let mut b = Bucket::new(100, 10, 3, t0);
        for i in 0..10_000u64 {
            // 50 frames a second, for 200 seconds.
            let now = t0 + Duration::from_millis(i * 20);
            assert_eq!(b.frame(now), Verdict::Allow, "frame {i}");
        }
    }

    #[test]
    fn rate_zero_means_no_limit() {
        let t0 = Instant::now();
        let mut b = Bucket::new(0, 1, 1, t0);
        assert!((0..1000).all(|_| b.frame(t0) == Verdict::Allow));
    }

    #[test]
    fn a_pace_lets_a_burst_through_then_holds_work_to_its_rate() {
        let t0 = Instant::now();
        // 1,000 mutations a second, a burst of 1,000.
        let mut p = Pace::new(1000, 1000, t0);
        assert_eq!(p.take(600, t0), None);
        assert_eq!(p.take(400, t0), None, "the burst is used up exactly");
        // A batch beyond it runs into debt: 500 mutations wait half a second.
        assert_eq!(p.take(500, t0), Some(t0 + Duration::from_millis(500)));
        // Taken when the debt is paid, the next batch waits for its own cost only.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(p.take(100, t1), Some(t1 + Duration::from_millis(100)));
        // A client that waits as told is held to the rate: 100 batches of 100 take 10 s.
        let mut now = t1 + Duration::from_millis(100);
        for _ in 0..100 {
            if let Some(until) = p.take(100, now) {
                now = until;
            }
        }
        let took = now.duration_since(t1).as_secs_f64();
        assert!((10.0..10.2).contains(&took), "{took}");
        // A long idle time refills only up to the burst.
        let later = now + Duration::from_secs(3600);
        assert_eq!(p.take(1000, later), None);
        assert!(p.take(1, later).is_some());
    }

    #[test]
    fn a_pace_of_rate_zero_never_waits() {
        let t0 = Instant::now();
        let mut p = Pace::new(0, 1, t0);
        assert!((0..1000).all(|_| p.take(1_000_000, t0).is_none()));
    }
}
