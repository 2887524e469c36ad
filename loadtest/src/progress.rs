//! A progress bar on stderr (drawn only when stderr is a terminal, so CI logs and tests stay
//! clean; `--quiet` hides it everywhere).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

static QUIET: AtomicBool = AtomicBool::new(false);

/// Hides every progress bar of this process.
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// One bar. Cheap to clone; every clone moves the same bar.
#[derive(Clone)]
pub struct Progress(ProgressBar);

impl Progress {
    /// A bar counting to `total` (0 = a spinner that only counts).
    pub fn new(label: &str, total: u64) -> Progress {
        let target = if QUIET.load(Ordering::Relaxed) {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr_with_hz(4)
        };
        let bar = ProgressBar::with_draw_target((total > 0).then_some(total), target);
        let template = if total > 0 {
            "{prefix:>12} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} ({per_sec}, eta {eta})"
        } else {
            "{prefix:>12} [{elapsed_precise}] {spinner} {human_pos} ({per_sec})"
        };
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style);
        }
        bar.set_prefix(label.to_owned());
        bar.enable_steady_tick(Duration::from_millis(250));
        Progress(bar)
    }

    /// Advances by `n`.
    pub fn inc(&self, n: u64) {
        self.0.inc(n);
    }

    /// Removes the bar from the terminal.
    pub fn finish(&self) {
        self.0.finish_and_clear();
    }
}
