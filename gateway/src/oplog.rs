//! The operator's log: one structured `info` line per event an operator needs (a connection
//! opened or closed, an authentication failure, a rejected mutation, a slow consumer, a
//! resync), each kind rate-limited so that a flood (a reconnect storm, a client replaying
//! thousands of bad mutations) cannot fill a disk. When lines were suppressed, the next line
//! of that kind carries `suppressed = N`.
//!
//! The decision is [`Window::check`], a pure function of the time; [`LogLimit`] is its
//! thread-safe shell.
//!
//! Lines of dependencies (any target outside `syncgate`) get the same treatment per call site
//! ([`DependencyLogLimit`], a `tracing` filter): sqlx, for one, warns once per slow pool
//! acquisition, and a connect storm on a saturated PostgreSQL pool wrote 28,000 such lines in
//! under a minute. What a filter drops is counted and reported every
//! [`SUPPRESSED_REPORT_EVERY`] by one `warn` line per target and
//! `syncgate_log_lines_suppressed_total{target}`.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::Metadata;
use tracing::subscriber::Interest;
use tracing_subscriber::layer::{Context, Filter};

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

/// Lines per second one call site of a dependency may write before it is suppressed.
pub(crate) const DEPENDENCY_LINES_PER_SECOND: u32 = 10;

/// How often suppressed dependency lines are reported.
pub(crate) const SUPPRESSED_REPORT_EVERY: Duration = Duration::from_secs(10);

/// The budgets of dependencies' call sites, and what was suppressed since the last report.
#[derive(Debug)]
pub(crate) struct DependencyLines {
    /// One window per call site (a hash of its identity; records bridged from the `log`
    /// crate share one call site per level, so the map stays as small as the code).
    windows: Mutex<BTreeMap<u64, Window>>,
    /// Lines suppressed per target since [`DependencyLines::take_suppressed`].
    suppressed: Mutex<BTreeMap<String, u64>>,
}

impl DependencyLines {
    pub(crate) const fn new() -> DependencyLines {
        DependencyLines {
            windows: Mutex::new(BTreeMap::new()),
            suppressed: Mutex::new(BTreeMap::new()),
        }
    }

    /// Whether a line of `target` from call site `site` may be written at `now`; a line that
    /// may not is counted for `target`.
    pub(crate) fn admit(&self, site: u64, target: &str, now: Instant) -> bool {
        let verdict = self
            .windows
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(site)
            .or_default()
            .check(now, DEPENDENCY_LINES_PER_SECOND);
        if verdict.is_none() {
            let mut suppressed = self.suppressed.lock().unwrap_or_else(|p| p.into_inner());
            match suppressed.get_mut(target) {
                Some(n) => *n += 1,
                None => {
                    suppressed.insert(target.to_owned(), 1);
                }
            }
        }
        verdict.is_some()
    }

    /// The lines suppressed per target since the last call.
    pub(crate) fn take_suppressed(&self) -> BTreeMap<String, u64> {
        std::mem::take(&mut *self.suppressed.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// The process's dependency line budgets (one subscriber per process).
pub(crate) static DEPENDENCY_LINES: DependencyLines = DependencyLines::new();

/// A `tracing` filter: spans and syncgate's own lines pass (those an operator needs are
/// rate-limited where they are written, see [`OpLog`]); an event of a dependency passes
/// while its call site is within [`DEPENDENCY_LINES_PER_SECOND`].
#[derive(Debug, Clone, Copy, Default)]
pub struct DependencyLogLimit;

fn own_or_span(meta: &Metadata<'_>) -> bool {
    !meta.is_event() || meta.target().starts_with("syncgate")
}

/// A call site's key: a hash of its identity (not the metadata's address, which for a record
/// bridged from the `log` crate is a temporary).
fn site_key(meta: &Metadata<'_>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    meta.callsite().hash(&mut h);
    h.finish()
}

impl<S> Filter<S> for DependencyLogLimit {
    fn enabled(&self, meta: &Metadata<'_>, _cx: &Context<'_, S>) -> bool {
        own_or_span(meta) || DEPENDENCY_LINES.admit(site_key(meta), meta.target(), Instant::now())
    }

    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        if own_or_span(meta) {
            Interest::always()
        } else {
            // Decided per event: the budget changes with time.
            Interest::sometimes()
        }
    }

    /// Every level: this filter limits rates, not levels. Without a hint, a filter combined
    /// with it (`EnvFilter::and`) has none either, the process's maximum level becomes TRACE,
    /// and every `log::trace!` of a dependency (tungstenite logs each frame it sends) goes
    /// through the subscriber instead of stopping at `log`'s one-load level check: 5-10 % of
    /// the gateway's CPU under fan-out (BENCHMARKS.md).
    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(tracing::level_filters::LevelFilter::TRACE)
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
    fn the_limit_keeps_the_level_filters_maximum_level() {
        use tracing::level_filters::LevelFilter;
        use tracing_subscriber::filter::FilterExt;
        type Registry = tracing_subscriber::Registry;
        for (directives, level) in [("info", LevelFilter::INFO), ("warn", LevelFilter::WARN)] {
            let filter = tracing_subscriber::EnvFilter::new(directives).and(DependencyLogLimit);
            assert_eq!(
                Filter::<Registry>::max_level_hint(&filter),
                Some(level),
                "{directives}"
            );
        }
    }

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
    fn a_dependencys_flood_is_cut_per_call_site_and_counted_per_target() {
        let lines = DependencyLines::new();
        let t0 = Instant::now();
        let admitted = (0..25)
            .filter(|_| lines.admit(1, "sqlx::pool::acquire", t0))
            .count();
        assert_eq!(admitted, DEPENDENCY_LINES_PER_SECOND as usize);
        // Another call site of the same target has a budget of its own.
        assert!(lines.admit(2, "sqlx::pool::acquire", t0));
        // A second later the flooding site writes again.
        assert!(lines.admit(1, "sqlx::pool::acquire", t0 + Duration::from_secs(1)));
        // What was cut is counted per target, once.
        let taken = lines.take_suppressed();
        assert_eq!(taken.len(), 1);
        assert_eq!(taken.get("sqlx::pool::acquire"), Some(&15));
        assert!(lines.take_suppressed().is_empty());
    }

    /// The filter as the binary installs it (after the level filter): a dependency's flood
    /// from one call site is cut to its budget and counted; syncgate's own lines all pass.
    #[test]
    fn the_filter_cuts_a_dependencys_flood_and_lets_syncgates_lines_through() {
        use std::io::Write;
        use std::sync::Arc;
        use tracing_subscriber::Layer;
        use tracing_subscriber::filter::FilterExt;
        use tracing_subscriber::layer::SubscriberExt;
        #[derive(Clone, Default)]
        struct Buffer(Arc<Mutex<Vec<u8>>>);
        impl Write for Buffer {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let out = Buffer::default();
        let writer = out.clone();
        let filter = tracing_subscriber::EnvFilter::new("info").and(DependencyLogLimit);
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .with_writer(move || writer.clone())
                .with_filter(filter),
        );
        DEPENDENCY_LINES.take_suppressed();
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..100 {
                tracing::warn!(target: "sqlx::pool::acquire", "acquired connection, but slowly");
                tracing::info!(target: "syncgate_gateway::test", "an operator's line");
                // Below the level filter: neither written nor counted.
                tracing::debug!(target: "sqlx::query", "a query");
            }
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let count = |needle: &str| text.lines().filter(|l| l.contains(needle)).count();
        // All within one second (or two, on a slow machine: at most twice the budget).
        let sqlx = count("acquired connection, but slowly");
        assert!(
            (DEPENDENCY_LINES_PER_SECOND as usize..=2 * DEPENDENCY_LINES_PER_SECOND as usize)
                .contains(&sqlx),
            "{sqlx} sqlx lines"
        );
        assert_eq!(count("an operator's line"), 100);
        assert_eq!(count("a query"), 0);
        let suppressed = DEPENDENCY_LINES.take_suppressed();
        assert_eq!(
            suppressed.get("sqlx::pool::acquire").copied(),
            Some(100 - sqlx as u64)
        );
        assert_eq!(suppressed.len(), 1, "{suppressed:?}");
    }

    #[test]
    fn client_text_is_cut_and_defused() {
        assert_eq!(printable("a\nb\u{1b}[2J"), "a?b?[2J");
        assert_eq!(printable(&"x".repeat(10_000)).len(), 64);
    }
}
