//! The `fanout` scenario.
//!
//! Every writer puts documents `"{run}-{writer}-{n}"` carrying `run`, `writer`, `n` and the send
//! time; every subscriber subscribes with the filter `run = <this run>` (so other traffic on
//! the gateway does not disturb the check) and records, per writer, the `n`s it receives. At the
//! end each subscriber must hold exactly `0..changes_per_writer` for every writer, in increasing
//! order: anything missing, repeated or reordered fails the run.
//!
//! Besides write→delivery latency of every delivery, it reports the latency of the *last*
//! delivery of each change (the sweep: how long until every subscriber had it), which is P3's
//! figure when one change goes to many subscribers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use syncgate_client::{ConnError, Connection};
use syncgate_protocol::{Cursor, Frame, Ping};

use crate::common::open_subscribers;
use crate::common::{
    Report, Target, left, now_ns, push_and_check, put_padded, run_filter, run_id, stamp,
};
use crate::lean::{self, Lean, LeanChange};
use crate::progress::Progress;
use crate::stats::Recorder;

/// Scenario parameters.
#[derive(Debug, Clone)]
pub struct FanoutConfig {
    /// Where to connect.
    pub target: Target,
    /// The collection written and followed.
    pub collection: String,
    /// Number of subscribers.
    pub subscribers: usize,
    /// Number of writers.
    pub writers: usize,
    /// Changes each writer commits.
    pub changes_per_writer: u64,
    /// Target changes per second per writer.
    pub rate_per_writer: u64,
    /// Extra bytes of padding in each document.
    pub pad: usize,
    /// Give up (and fail) after this long.
    pub deadline: Duration,
    /// Harness processes the subscribers are spread over (1: all in this one). With more,
    /// this process runs the writers and `workers` children of `worker_exe` run the
    /// subscribers, so that decoding deliveries does not compete with writing.
    pub workers: usize,
    /// The `syncgate-loadtest` binary the workers run (default: this executable).
    pub worker_exe: Option<std::path::PathBuf>,
}

/// The environment variable that hands a worker its parent's timeline clock (milliseconds
/// since it started), so that their latency timelines merge second by second.
pub const CLOCK_AGE_ENV: &str = "SYNCGATE_LOADTEST_CLOCK_AGE_MS";

/// Runs the scenario.
pub async fn run(cfg: &FanoutConfig) -> anyhow::Result<Report> {
    if cfg.workers > 1 {
        return run_in_workers(cfg).await;
    }
    let run = run_id();
    let end = Instant::now() + cfg.deadline;
    let filter = run_filter(&run);
    let setup = Progress::new("subscribing", cfg.subscribers as u64);
    let subs = open_subscribers(
        &cfg.target,
        &cfg.collection,
        &filter,
        &format!("lt-sub-{run}"),
        0,
        cfg.subscribers,
        end,
    )
    .await?;
    setup.finish();
    let expected = cfg.changes_per_writer;
    let total = cfg.writers as u64 * expected;
    let sweep = Arc::new(Sweep::new(cfg.writers, expected));
    let progress = Progress::new("deliveries", total * cfg.subscribers as u64);
    let started = Instant::now();
    let sub_tasks: Vec<_> = subs
        .into_iter()
        .map(|(c, _)| {
            let (sweep, progress) = (sweep.clone(), progress.clone());
            tokio::spawn(async move {
                let mut c = c;
                let mut got = Received::default();
                let err = receive(&mut c, &mut got, total, end, Some(&sweep), &progress).await;
                c.close().await;
                (got, err)
            })
        })
        .collect();
    let writer_tasks: Vec<_> = (0..cfg.writers)
        .map(|w| {
            let pace = Pace {
                target: cfg.target.clone(),
                collection: cfg.collection.clone(),
                run: run.clone(),
                writer: w,
                count: expected,
                rate: cfg.rate_per_writer,
                pad: cfg.pad,
                end,
            };
            tokio::spawn(async move { pace.write().await })
        })
        .collect();
    let mut committed = 0;
    let mut failures = Vec::new();
    for (w, t) in writer_tasks.into_iter().enumerate() {
        match t.await.context("writer task")? {
            Ok(n) => committed += n,
            Err(e) => failures.push(format!("writer {w}: {e:#}")),
        }
    }
    let mut latencies = Recorder::default();
    let mut deliveries = 0u64;
    for (i, t) in sub_tasks.into_iter().enumerate() {
        let (got, err) = t.await.context("subscriber task")?;
        deliveries += got.latency.count();
        latencies.merge(&got.latency);
        failures.extend(got.verdict(&format!("subscriber {i}"), cfg.writers, expected, err));
    }
    progress.finish();
    let elapsed = started.elapsed().as_secs_f64();
    let last_delivery = sweep.recorder();
    Ok(Report::new(
        "fanout",
        serde_json::json!({"subscribers": cfg.subscribers, "writers": cfg.writers,
            "changes_per_writer": cfg.changes_per_writer, "rate_per_writer": cfg.rate_per_writer,
            "pad": cfg.pad}),
        serde_json::json!({"committed": committed, "deliveries": deliveries,
            "seconds": elapsed,
            "deliveries_per_sec": deliveries as f64 / elapsed.max(1e-9),
            "last_delivery_ms": last_delivery.summary()}),
        &latencies,
        failures,
    ))
}

/// One worker of a `--workers` run: opens its share of subscribers to run `run`'s documents,
/// prints `READY` on stdout, then receives every change; its report carries what the parent
/// merges (`latency_wire`, `sweep`, `deliveries`, failures).
pub async fn worker(cfg: &FanoutConfig, run: &str) -> anyhow::Result<Report> {
    let end = Instant::now() + cfg.deadline;
    let filter = run_filter(run);
    let subs = open_subscribers(
        &cfg.target,
        &cfg.collection,
        &filter,
        &format!("lt-sub-{run}-{}", std::process::id()),
        0,
        cfg.subscribers,
        end,
    )
    .await?;
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(out, "READY")?;
        out.flush()?;
    }
    let total = cfg.writers as u64 * cfg.changes_per_writer;
    let sweep = Arc::new(Sweep::new(cfg.writers, cfg.changes_per_writer));
    let progress = Progress::new("deliveries", 0);
    let tasks: Vec<_> = subs
        .into_iter()
        .map(|(c, _)| {
            let (sweep, progress) = (sweep.clone(), progress.clone());
            tokio::spawn(async move {
                let mut c = c;
                let mut got = Received::default();
                let err = receive(&mut c, &mut got, total, end, Some(&sweep), &progress).await;
                c.close().await;
                (got, err)
            })
        })
        .collect();
    let (mut latencies, mut deliveries, mut failures) = (Recorder::default(), 0u64, Vec::new());
    for (i, t) in tasks.into_iter().enumerate() {
        let (got, err) = t.await.context("subscriber task")?;
        deliveries += got.latency.count();
        latencies.merge(&got.latency);
        failures.extend(got.verdict(
            &format!("subscriber {i}"),
            cfg.writers,
            cfg.changes_per_writer,
            err,
        ));
    }
    let sweep: Vec<u64> = sweep
        .per_change
        .iter()
        .map(|s| s.load(Ordering::Relaxed))
        .collect();
    Ok(Report::new(
        "fanout-worker",
        serde_json::json!({"subscribers": cfg.subscribers, "run": run}),
        serde_json::json!({"deliveries": deliveries, "latency_wire": latencies.to_wire(),
            "sweep": sweep}),
        &latencies,
        failures,
    ))
}

/// `run` with the subscribers in `cfg.workers` child processes (source addresses dealt out
/// among them) and the writers here; the workers' figures are merged into one report.
async fn run_in_workers(cfg: &FanoutConfig) -> anyhow::Result<Report> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
    let run = run_id();
    let end = Instant::now() + cfg.deadline;
    let exe = match &cfg.worker_exe {
        Some(p) => p.clone(),
        None => std::env::current_exe().context("locating this executable")?,
    };
    let workers = cfg.workers;
    let clock_age = crate::stats::start_clock()
        .elapsed()
        .as_millis()
        .to_string();
    let mut children = Vec::new();
    for k in 0..workers {
        let share = cfg.subscribers / workers + usize::from(k < cfg.subscribers % workers);
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.args(["--url", &cfg.target.url, "--quiet", "--deadline"])
            .arg(cfg.deadline.as_secs().max(1).to_string())
            .args(["--collection", &cfg.collection])
            .env("SYNCGATE_TOKEN", &cfg.target.token)
            .env(CLOCK_AGE_ENV, &clock_age);
        for (i, s) in cfg.target.sources.iter().enumerate() {
            if i % workers == k {
                cmd.arg("--source").arg(s.to_string());
            }
        }
        cmd.args(["fanout", "--worker", "--run", &run, "--subscribers"])
            .arg(share.to_string())
            .arg("--writers")
            .arg(cfg.writers.to_string())
            .arg("--changes-per-writer")
            .arg(cfg.changes_per_writer.to_string())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().context("starting a worker")?;
        let stdout = BufReader::new(child.stdout.take().context("worker stdout")?);
        children.push((child, stdout));
    }
    // Every worker prints READY once its subscribers are synced.
    for (k, (_, stdout)) in children.iter_mut().enumerate() {
        let mut line = String::new();
        tokio::time::timeout(left(end), stdout.read_line(&mut line))
            .await
            .with_context(|| format!("worker {k} did not get ready in time"))??;
        if line.trim() != "READY" {
            anyhow::bail!("worker {k} did not get ready: {line:?}");
        }
    }
    let started = Instant::now();
    let writer_tasks: Vec<_> = (0..cfg.writers)
        .map(|w| {
            let pace = Pace {
                target: cfg.target.clone(),
                collection: cfg.collection.clone(),
                run: run.clone(),
                writer: w,
                count: cfg.changes_per_writer,
                rate: cfg.rate_per_writer,
                pad: cfg.pad,
                end,
            };
            tokio::spawn(async move { pace.write().await })
        })
        .collect();
    let mut committed = 0;
    let mut failures = Vec::new();
    for (w, t) in writer_tasks.into_iter().enumerate() {
        match t.await.context("writer task")? {
            Ok(n) => committed += n,
            Err(e) => failures.push(format!("writer {w}: {e:#}")),
        }
    }
    let (mut latencies, mut deliveries) = (Recorder::default(), 0u64);
    let mut sweep = vec![0u64; cfg.writers * cfg.changes_per_writer as usize];
    let mut harness_cpu_seconds = 0.0;
    for (k, (mut child, mut stdout)) in children.into_iter().enumerate() {
        let mut text = String::new();
        tokio::time::timeout(left(end), stdout.read_to_string(&mut text))
            .await
            .with_context(|| format!("worker {k} did not finish in time"))??;
        let status = child.wait().await?;
        let Ok(r) = serde_json::from_str::<serde_json::Value>(&text) else {
            failures.push(format!("worker {k} ended with {status} and no report"));
            continue;
        };
        let at = |path: &str| r.pointer(path).cloned().unwrap_or_default();
        deliveries += at("/figures/deliveries").as_u64().unwrap_or(0);
        match serde_json::from_value::<crate::stats::RecorderWire>(at("/figures/latency_wire")) {
            Ok(w) => latencies.merge(&Recorder::from_wire(&w)),
            Err(e) => failures.push(format!("worker {k}: unreadable latencies: {e}")),
        }
        let theirs = at("/figures/sweep");
        for (slot, us) in sweep
            .iter_mut()
            .zip(theirs.as_array().into_iter().flatten())
        {
            *slot = (*slot).max(us.as_u64().unwrap_or(0));
        }
        harness_cpu_seconds += at("/harness/cpu_seconds").as_f64().unwrap_or(0.0);
        for f in at("/failures").as_array().into_iter().flatten() {
            failures.push(format!("worker {k}: {}", f.as_str().unwrap_or_default()));
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mut last_delivery = Recorder::default();
    for us in sweep.into_iter().filter(|us| *us > 0) {
        last_delivery.record(Duration::from_micros(us));
    }
    Ok(Report::new(
        "fanout",
        serde_json::json!({"subscribers": cfg.subscribers, "writers": cfg.writers,
            "changes_per_writer": cfg.changes_per_writer, "rate_per_writer": cfg.rate_per_writer,
            "pad": cfg.pad, "workers": workers}),
        serde_json::json!({"committed": committed, "deliveries": deliveries,
            "seconds": elapsed,
            "deliveries_per_sec": deliveries as f64 / elapsed.max(1e-9),
            "last_delivery_ms": last_delivery.summary(),
            "workers_cpu_seconds": harness_cpu_seconds}),
        &latencies,
        failures,
    ))
}

/// The slowest delivery of each change, across subscribers (µs).
pub(crate) struct Sweep {
    per_change: Vec<AtomicU64>,
    changes_per_writer: u64,
}

impl Sweep {
    pub(crate) fn new(writers: usize, changes_per_writer: u64) -> Sweep {
        Sweep {
            per_change: (0..writers as u64 * changes_per_writer)
                .map(|_| AtomicU64::new(0))
                .collect(),
            changes_per_writer,
        }
    }

    pub(crate) fn note(&self, writer: usize, n: u64, latency_us: u64) {
        let i = writer as u64 * self.changes_per_writer + n;
        if let Some(slot) = self.per_change.get(i as usize) {
            slot.fetch_max(latency_us, Ordering::Relaxed);
        }
    }

    /// One sample per change that was delivered at all: its last delivery's latency.
    pub(crate) fn recorder(&self) -> Recorder {
        let mut r = Recorder::default();
        for slot in &self.per_change {
            let us = slot.load(Ordering::Relaxed);
            if us > 0 {
                r.record(Duration::from_micros(us));
            }
        }
        r
    }
}

/// What one subscriber received.
#[derive(Default)]
pub(crate) struct Received {
    /// Per writer, the `n`s in arrival order.
    pub(crate) seen: BTreeMap<usize, Vec<u64>>,
    /// Write→delivery latency of each change.
    pub(crate) latency: Recorder,
    /// The cursor of the last `changes` frame, to resume from.
    pub(crate) cursor: Option<Cursor>,
    /// Changes received.
    pub(crate) count: u64,
    /// Changes with `n` at or past this go to `latency_late` instead of `latency` (to compare
    /// two phases of a run).
    pub(crate) split_at: Option<u64>,
    /// Latency of the changes past `split_at`.
    pub(crate) latency_late: Recorder,
    /// If set, the seq of every change received, keyed by `(writer, n)` (repeats kept).
    pub(crate) seqs: Option<Vec<(usize, u64, u64)>>,
}

impl Received {
    /// What is wrong with what `who` received: each writer's `n`s must be exactly
    /// `0..expected` in order, and the connection must not have failed.
    pub(crate) fn verdict(
        &self,
        who: &str,
        writers: usize,
        expected: u64,
        err: Option<ConnError>,
    ) -> Vec<String> {
        let mut failures = check_sequences(who, &self.seen, writers, expected);
        failures.extend(err.map(|e| format!("{who}: {e}")));
        failures
    }

    /// Records the changes of one frame (or of a catch-up).
    pub(crate) fn absorb(&mut self, changes: &[syncgate_protocol::Change], sweep: Option<&Sweep>) {
        let lean: Vec<LeanChange> = changes
            .iter()
            .map(|c| LeanChange {
                seq: c.seq,
                stamp: stamp(c),
            })
            .collect();
        self.absorb_lean(&lean, sweep);
    }

    /// Records the changes of one frame as the lean decoding read them.
    pub(crate) fn absorb_lean(&mut self, changes: &[LeanChange], sweep: Option<&Sweep>) {
        let now = now_ns();
        for change in changes {
            let Some((w, n, t)) = change.stamp else {
                continue;
            };
            let us = now.saturating_sub(t) / 1000;
            if self.split_at.is_some_and(|s| n >= s) {
                self.latency_late.record(Duration::from_micros(us));
            } else {
                self.latency.record(Duration::from_micros(us));
            }
            if let Some(s) = sweep {
                s.note(w, n, us.max(1));
            }
            self.seen.entry(w).or_default().push(n);
            if let Some(seqs) = &mut self.seqs {
                seqs.push((w, n, change.seq));
            }
            self.count += 1;
        }
    }
}

/// Reads `changes` until `total` changes have arrived in `got`, the deadline passes or the
/// connection fails (returned as the error: the caller decides whether that is a failure).
pub(crate) async fn receive(
    c: &mut Connection,
    got: &mut Received,
    total: u64,
    end: Instant,
    sweep: Option<&Sweep>,
    progress: &Progress,
) -> Option<ConnError> {
    let mut ping = tokio::time::interval(Duration::from_secs(5));
    ping.tick().await;
    let mut err = None;
    let limits = syncgate_protocol::Limits {
        max_frame_bytes: 64 << 20,
        ..syncgate_protocol::Limits::default()
    };
    while got.count < total {
        let frame = tokio::select! {
            f = c.recv_raw(left(end)) => f.and_then(|b| Ok(lean::decode(&b, &limits)?)),
            _ = ping.tick() => match c.send(&Frame::Ping(Ping { nonce: 0 })).await {
                Ok(()) => continue,
                Err(e) => Err(e),
            },
        };
        match frame {
            Ok(Lean::Changes {
                changes, cursor, ..
            }) => {
                got.absorb_lean(&changes, sweep);
                progress.inc(changes.len() as u64);
                got.cursor = Some(cursor);
            }
            Ok(Lean::Other(Frame::Error(e))) => {
                err = Some(ConnError::Server(e));
                break;
            }
            Ok(_) => {}
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    err
}

/// Each writer's `n`s must be exactly `0..expected` in order.
pub(crate) fn check_sequences(
    who: &str,
    seen: &BTreeMap<usize, Vec<u64>>,
    writers: usize,
    expected: u64,
) -> Vec<String> {
    let mut failures = Vec::new();
    for w in 0..writers {
        let got = seen.get(&w).map(Vec::as_slice).unwrap_or_default();
        if !got.iter().copied().eq(0..expected) {
            let distinct: std::collections::BTreeSet<_> = got.iter().collect();
            let missing = (0..expected).filter(|n| !distinct.contains(n)).count();
            let duplicates = got.len() - distinct.len();
            failures.push(format!(
                "{who}, writer {w}: received {} changes: {missing} missing, {duplicates} duplicated{}",
                got.len(),
                if missing == 0 && duplicates == 0 { ", out of order" } else { "" },
            ));
        }
    }
    failures
}

/// A writer that puts `count` documents at `rate` per second, one push each, each checked.
pub(crate) struct Pace {
    pub(crate) target: Target,
    pub(crate) collection: String,
    pub(crate) run: String,
    pub(crate) writer: usize,
    pub(crate) count: u64,
    pub(crate) rate: u64,
    pub(crate) pad: usize,
    pub(crate) end: Instant,
}

impl Pace {
    /// Writes; returns the number of changes acknowledged as applied.
    pub(crate) async fn write(self) -> anyhow::Result<u64> {
        let w = self.writer;
        let (mut c, welcome) = self
            .target
            .connect(w, &format!("lt-writer-{}-{w}", self.run))
            .await?;
        let first_mid = welcome.last_applied_mutation + 1;
        let interval = Duration::from_secs_f64(1.0 / self.rate.max(1) as f64);
        let mut tick = tokio::time::interval(interval);
        // A writer that fell behind catches up at once rather than bursting later.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut applied = 0;
        for n in 0..self.count {
            tick.tick().await;
            let m = put_padded(&self.run, w, n, first_mid + n, &self.collection, self.pad);
            push_and_check(&mut c, n, vec![m], self.end)
                .await
                .with_context(|| format!("mutation {n}"))?;
            applied += 1;
        }
        c.close().await;
        Ok(applied)
    }
}
