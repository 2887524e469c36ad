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
use crate::workers::{self, Workers};

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

/// Runs the scenario.
pub async fn run(cfg: &FanoutConfig) -> anyhow::Result<Report> {
    if cfg.workers > 1 {
        return run_in_workers(cfg).await;
    }
    let run = run_id();
    let end = Instant::now() + cfg.deadline;
    let setup = Progress::new("subscribing", cfg.subscribers as u64);
    let subs = subscribe_all(cfg, &run, &format!("lt-sub-{run}"), end).await?;
    setup.finish();
    let total = cfg.writers as u64 * cfg.changes_per_writer;
    let sweep = Arc::new(Sweep::new(cfg.writers, cfg.changes_per_writer));
    let progress = Progress::new("deliveries", total * cfg.subscribers as u64);
    let started = Instant::now();
    let receivers = spawn_receivers(subs, total, end, &sweep, &progress);
    let (committed, mut failures) = write_all(cfg, &run, end).await?;
    let (latencies, deliveries, received_failures) = join_receivers(cfg, receivers).await?;
    failures.extend(received_failures);
    progress.finish();
    let elapsed = started.elapsed().as_secs_f64();
    Ok(report(
        cfg,
        committed,
        deliveries,
        elapsed,
        &sweep.recorder(),
        &latencies,
        failures,
    ))
}

fn report(
    cfg: &FanoutConfig,
    committed: u64,
    deliveries: u64,
    elapsed: f64,
    last_delivery: &Recorder,
    latencies: &Recorder,
    failures: Vec<String>,
) -> Report {
    Report::new(
        "fanout",
        serde_json::json!({"subscribers": cfg.subscribers, "writers": cfg.writers,
            "changes_per_writer": cfg.changes_per_writer, "rate_per_writer": cfg.rate_per_writer,
            "pad": cfg.pad, "workers": cfg.workers}),
        serde_json::json!({"committed": committed, "deliveries": deliveries,
            "seconds": elapsed,
            "deliveries_per_sec": deliveries as f64 / elapsed.max(1e-9),
            "last_delivery_ms": last_delivery.summary()}),
        latencies,
        failures,
    )
}

/// Opens the subscribers (ids starting with `prefix`), each synced on `run`'s documents.
async fn subscribe_all(
    cfg: &FanoutConfig,
    run: &str,
    prefix: &str,
    end: Instant,
) -> anyhow::Result<Vec<(Connection, Cursor)>> {
    open_subscribers(
        &cfg.target,
        &cfg.collection,
        &run_filter(run),
        prefix,
        0,
        cfg.subscribers,
        end,
    )
    .await
}

type Receiver = tokio::task::JoinHandle<(Received, Option<ConnError>)>;

/// One task per subscriber, receiving until `total` changes have arrived.
fn spawn_receivers(
    subs: Vec<(Connection, Cursor)>,
    total: u64,
    end: Instant,
    sweep: &Arc<Sweep>,
    progress: &Progress,
) -> Vec<Receiver> {
    subs.into_iter()
        .map(|(mut c, _)| {
            let (sweep, progress) = (sweep.clone(), progress.clone());
            tokio::spawn(async move {
                let mut got = Received::default();
                let err = receive(&mut c, &mut got, total, end, Some(&sweep), &progress).await;
                c.close().await;
                (got, err)
            })
        })
        .collect()
}

/// The subscribers' latencies, deliveries and failures.
async fn join_receivers(
    cfg: &FanoutConfig,
    receivers: Vec<Receiver>,
) -> anyhow::Result<(Recorder, u64, Vec<String>)> {
    let (mut latencies, mut deliveries, mut failures) = (Recorder::default(), 0u64, Vec::new());
    for (i, t) in receivers.into_iter().enumerate() {
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
    Ok((latencies, deliveries, failures))
}

/// Runs the writers to the end: changes acknowledged, and the writers that failed.
async fn write_all(
    cfg: &FanoutConfig,
    run: &str,
    end: Instant,
) -> anyhow::Result<(u64, Vec<String>)> {
    let tasks: Vec<_> = (0..cfg.writers)
        .map(|w| {
            let pace = Pace {
                target: cfg.target.clone(),
                collection: cfg.collection.clone(),
                run: run.to_owned(),
                writer: w,
                count: cfg.changes_per_writer,
                rate: cfg.rate_per_writer,
                pad: cfg.pad,
                end,
            };
            tokio::spawn(async move { pace.write().await })
        })
        .collect();
    let (mut committed, mut failures) = (0, Vec::new());
    for (w, t) in tasks.into_iter().enumerate() {
        match t.await.context("writer task")? {
            Ok(n) => committed += n,
            Err(e) => failures.push(format!("writer {w}: {e:#}")),
        }
    }
    Ok((committed, failures))
}

/// One worker of a `--workers` run: opens its share of subscribers to run `run`'s documents,
/// says `READY`, then receives every change; its report carries what the parent merges
/// (`latency_wire`, `sweep`, `deliveries`, failures).
pub async fn worker(cfg: &FanoutConfig, run: &str) -> anyhow::Result<Report> {
    let end = Instant::now() + cfg.deadline;
    let prefix = format!("lt-sub-{run}-{}", std::process::id());
    let subs = subscribe_all(cfg, run, &prefix, end).await?;
    workers::say_ready()?;
    let total = cfg.writers as u64 * cfg.changes_per_writer;
    let sweep = Arc::new(Sweep::new(cfg.writers, cfg.changes_per_writer));
    let receivers = spawn_receivers(subs, total, end, &sweep, &Progress::new("deliveries", 0));
    let (latencies, deliveries, failures) = join_receivers(cfg, receivers).await?;
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
    let run = run_id();
    let end = Instant::now() + cfg.deadline;
    let spawn = workers::Spawn {
        exe: cfg.worker_exe.as_ref(),
        target: &cfg.target,
        nodes: &[],
        collection: &cfg.collection,
        deadline: cfg.deadline,
    };
    let mut children = Workers::spawn(&spawn, cfg.workers, |k| {
        let share = workers::share(cfg.subscribers, cfg.workers, k);
        [
            "fanout",
            "--worker",
            "--run",
            &run,
            "--subscribers",
            &share.to_string(),
        ]
        .into_iter()
        .map(str::to_owned)
        .chain([
            "--writers".into(),
            cfg.writers.to_string(),
            "--changes-per-writer".into(),
            cfg.changes_per_writer.to_string(),
        ])
        .collect()
    })?;
    // Every worker says READY once its subscribers are synced.
    children.ready(end).await?;
    let started = Instant::now();
    let (committed, mut failures) = write_all(cfg, &run, end).await?;
    let (mut latencies, mut deliveries) = (Recorder::default(), 0u64);
    let mut sweep = vec![0u64; cfg.writers * cfg.changes_per_writer as usize];
    let mut workers_cpu_seconds = 0.0;
    for (k, r) in children.reports(end).await?.into_iter().enumerate() {
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                failures.push(e);
                continue;
            }
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
        workers_cpu_seconds += at("/harness/cpu_seconds").as_f64().unwrap_or(0.0);
        failures.extend(workers::failures_of(k, &r));
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mut last_delivery = Recorder::default();
    for us in sweep.into_iter().filter(|us| *us > 0) {
        last_delivery.record(Duration::from_micros(us));
    }
    let mut r = report(
        cfg,
        committed,
        deliveries,
        elapsed,
        &last_delivery,
        &latencies,
        failures,
    );
    if let Some(f) = r.figures.as_object_mut() {
        f.insert("workers_cpu_seconds".into(), workers_cpu_seconds.into());
    }
    Ok(r)
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
