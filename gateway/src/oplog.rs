//! The operator's log: one structured `info` line per event an operator needs (a connection
//! opened or closed, an authentication failure, a rejected mutation, a slow consumer, a
//! resync), each kind rate-limited so that a flood (a reconnect storm, a client replaying
//! thousands of bad mutations) cannot fill a disk. When lines were suppressed, the next line
//! of that kind carries `suppressed = N`.
//!
//! The decision is [`Window::check`], a pure function of the time; [`LogLimit`] is its
//! thread-safe shell.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines per second each kind may write before it is suppressed for the rest of the second.
pub(crate) const LINES_PER_SECOND: u32 = 50;

/// One kind's budget.
#[derive(Debug)]
pub(crate) struct LogLimit {
    per_second: u32,
    window: Mutex<Window>,
}

impl LogLimit {
    /// A budget of `per_second` lines per second.
    pub(crate) fn new(per_second: u32) -> LogLimit {
        LogLimit {
            per_second,
            window: Mutex::new(Window::default()),
        }
    }

    /// `Some(n)`: write the line, mentioning `n` suppressed lines if `n > 0`; `None`: skip it.
    pub(crate) fn allow(&self) -> Option<u64> {
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        w.check(Instant::now(), self.per_second)
    }
}

/// Lines written and suppressed in the current one-second window.
#[derive(Debug, Default, Clone)]
pub(crate) struct Window {
    start: Option<Instant>,
    written: u32,
    /// Suppressed since the last line written.
    suppressed: u64,
}

impl Window {
    /// Whether a line at `now` may be written; see [`LogLimit::allow`].
    pub(crate) fn check(&mut self, now: Instant, per_second: u32) -> Option<u64> {
        let fresh = self
            .start
            .is_none_or(|s| now.saturating_duration_since(s) >= Duration::from_secs(1));
        if fresh {
            self.start = Some(now);
            self.written = 0;
        }
        if self.written < per_second {
            self.written += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

/// The budgets of every kind of line, shared by a node's tasks.
#[derive(Debug)]
pub(crate) struct OpLog {
    /// Connections opened and closed.
    pub connections: LogLimit,
    /// Refused handshakes (bad token, bad client id, unsupported version).
    pub auth: LogLimit,
    /// Rejected mutations and refused batches.
    pub rejections: LogLimit,
    /// Slow-consumer disconnects and resyncs.
    pub subscriptions: LogLimit,
}

impl Default for OpLog {
    fn default() -> Self {
        OpLog {
            connections: LogLimit::new(LINES_PER_SECOND),
            auth: LogLimit::new(LINES_PER_SECOND),
            rejections: LogLimit::new(LINES_PER_SECOND),
            subscriptions: LogLimit::new(LINES_PER_SECOND),
        }
    }
}

/// Client-supplied text for a log line: at most 64 characters, control characters replaced,
/// so that a hostile value cannot forge lines or flood one.
pub(crate) fn printable(s: &str) -> String {
    s.chars()
        .take(64)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_cut_and_the_next_line_counts_what_was_skipped() {
        let t0 = Instant::now();
        let mut w = Window::default();
        let answers: Vec<Option<u64>> = (0..5).map(|_| w.check(t0, 3)).collect();
        assert_eq!(answers, vec![Some(0), Some(0), Some(0), None, None]);
        // Still the same second: still suppressed.
        assert_eq!(w.check(t0 + Duration::from_millis(999), 3), None);
        // A new second: written, carrying the three lines skipped.
        assert_eq!(w.check(t0 + Duration::from_secs(1), 3), Some(3));
        assert_eq!(w.check(t0 + Duration::from_secs(1), 3), Some(0));
    }

    #[test]
    fn client_text_is_cut_and_defused() {
        assert_eq!(printable("a\nb\u{1b}[2J"), "a?b?[2J");
        assert_eq!(printable(&"x".repeat(10_000)).len(), 64);
    }
}
