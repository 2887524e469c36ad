//! The `reconnect-storm` scenario: N subscribers are live on the run's documents; all of them
//! drop; a writer commits K changes; then all N reconnect at the same moment, each resuming
//! from its own cursor. Measures the time until every client has caught up. Checks that each
//! receives exactly the K missed changes, once each, in order.
//!
//! With `workers` > 1 the clients live in child processes (source addresses dealt out): each
//! subscribes its share, prints `READY`, waits for `GO` on its standard input (written once the
//! K changes are committed), storms, and reports; the parent merges the reports. Clients decode
//! the catch-up leanly (`crate::lean`), so the harness is not what a run measures.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use syncgate_protocol::{Body, Cursor, Frame, Limits, Subscribe};

use crate::common::{Report, Target, left, push_and_check, put, run_filter, run_id, subscribe};
use crate::lean::{self, Lean};
use crate::stats::{Recorder, RecorderWire};
use crate::workers::{self, Workers};

/// Scenario parameters.
#[derive(Debug, Clone)]
pub struct StormConfig {
    /// Where to connect.
    pub target: Target,
    /// The collection.
    pub collection: String,
    /// Clients that reconnect together.
    pub clients: usize,
    /// Changes committed while they are away.
    pub missed: u64,
    /// Give up (and fail) after this long.
    pub deadline: Duration,
    /// Harness processes the clients are spread over (1: all in this one).
    pub workers: usize,
    /// The `syncgate-loadtest` binary the workers run (default: this executable).
    pub worker_exe: Option<std::path::PathBuf>,
}

/// Runs the scenario.
pub async fn run(cfg: &StormConfig) -> anyhow::Result<Report> {
    if cfg.workers > 1 {
        return run_in_workers(cfg).await;
    }
    let run = run_id();
    let end = Instant::now() + cfg.deadline;
    let prefix = format!("lt-storm-{run}");
    let cursors = setup(cfg, &run, &prefix, end).await?;
    commit_missed(cfg, &run, end).await?;
    let sent_away_before = crate::common::sent_away();
    let started = Instant::now();
    let (rec, failures) = storm(cfg, &run, &prefix, cursors, end).await?;
    let all = started.elapsed();
    Ok(report(
        cfg,
        all.as_secs_f64(),
        &rec,
        crate::common::sent_away() - sent_away_before,
        failures,
    ))
}

fn report(
    cfg: &StormConfig,
    all_sec: f64,
    rec: &Recorder,
    sent_away: u64,
    failures: Vec<String>,
) -> Report {
    Report::new(
        "reconnect-storm",
        serde_json::json!({"clients": cfg.clients, "missed": cfg.missed, "workers": cfg.workers}),
        serde_json::json!({"all_caught_up_sec": all_sec,
            "changes_delivered": rec.count() * cfg.missed,
            "deliveries": rec.count() * cfg.missed,
            "deliveries_per_sec": (rec.count() * cfg.missed) as f64 / all_sec.max(1e-9),
            "handshakes_sent_away": sent_away}),
        rec,
        failures,
    )
}

/// Every client subscribes once, remembers its cursor and drops (a few hundred at a time).
async fn setup(
    cfg: &StormConfig,
    run: &str,
    prefix: &str,
    end: Instant,
) -> anyhow::Result<Vec<Cursor>> {
    let filter = run_filter(run);
    let mut cursors = Vec::with_capacity(cfg.clients);
    let mut tasks = Vec::new();
    for i in 0..cfg.clients {
        let target = cfg.target.clone();
        let (collection, filter, id) = (
            cfg.collection.clone(),
            filter.clone(),
            format!("{prefix}-{i}"),
        );
        tasks.push(tokio::spawn(async move {
            let (mut c, w) = target.connect(i, &id).await?;
            let (cursor, _, _) = subscribe(&mut c, &w, &collection, &filter, None, end).await?;
            c.close().await;
            anyhow::Ok(cursor)
        }));
        if tasks.len() >= 256 {
            for t in tasks.drain(..) {
                cursors.push(t.await.context("setup task")??);
            }
        }
    }
    for t in tasks {
        cursors.push(t.await.context("setup task")??);
    }
    Ok(cursors)
}

/// The server moves on by K changes while the clients are away.
async fn commit_missed(cfg: &StormConfig, run: &str, end: Instant) -> anyhow::Result<()> {
    let (mut w, welcome) = cfg
        .target
        .connect(0, &format!("lt-storm-writer-{run}"))
        .await?;
    let mut mid = welcome.last_applied_mutation + 1;
    let (mut n, mut batch) = (0, 0);
    while n < cfg.missed {
        let size = 500.min(cfg.missed - n);
        let ms = (0..size)
            .map(|i| put(run, 0, n + i, mid + i, &cfg.collection))
            .collect();
        batch += 1;
        push_and_check(&mut w, batch, ms, end).await?;
        n += size;
        mid += size;
    }
    w.close().await;
    Ok(())
}

/// Everyone reconnects at once and resumes from its cursor; each must get exactly
/// `0..missed` in order. Returns each client's time to caught up, and the failures.
async fn storm(
    cfg: &StormConfig,
    run: &str,
    prefix: &str,
    cursors: Vec<Cursor>,
    end: Instant,
) -> anyhow::Result<(Recorder, Vec<String>)> {
    let filter = run_filter(run);
    let tasks: Vec<_> = cursors
        .into_iter()
        .enumerate()
        .map(|(i, cursor)| {
            let target = cfg.target.clone();
            let (collection, filter, id) = (
                cfg.collection.clone(),
                filter.clone(),
                format!("{prefix}-{i}"),
            );
            tokio::spawn(async move {
                let t0 = Instant::now();
                let (mut c, _) = target.connect(i, &id).await?;
                let ns = resume(&mut c, &collection, &filter, cursor, end).await?;
                let took = t0.elapsed();
                c.close().await;
                anyhow::Ok((took, ns))
            })
        })
        .collect();
    let mut rec = Recorder::default();
    let mut failures = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await.context("storm task")? {
            Ok((took, ns)) => {
                rec.record(took);
                if !ns.iter().copied().eq(0..cfg.missed) {
                    let missing = (0..cfg.missed).filter(|n| !ns.contains(n)).count();
                    failures.push(format!(
                        "client {i}: {} changes, {missing} missing (expected exactly 0..{} in order)",
                        ns.len(),
                        cfg.missed
                    ));
                }
            }
            Err(e) => failures.push(format!("client {i}: {e:#}")),
        }
    }
    Ok((rec, failures))
}

/// Resumes a subscription from `cursor` and reads the catch-up to `synced`, decoding leanly;
/// returns the `n` stamps of the changes, in arrival order.
async fn resume(
    c: &mut syncgate_client::Connection,
    collection: &str,
    filter: &Body,
    cursor: Cursor,
    end: Instant,
) -> anyhow::Result<Vec<u64>> {
    c.send(&Frame::Subscribe(Subscribe {
        sub: 1,
        collection: collection.to_owned(),
        filter: filter.clone(),
        cursor: Some(cursor),
    }))
    .await?;
    let limits = Limits {
        max_frame_bytes: 64 << 20,
        ..Limits::default()
    };
    let mut ns = Vec::new();
    loop {
        let raw = c.recv_raw(left(end)).await?;
        match lean::decode(&raw, &limits)? {
            Lean::Changes { changes, .. } => {
                ns.extend(changes.iter().filter_map(|ch| ch.stamp.map(|(_, n, _)| n)));
            }
            Lean::Other(Frame::Synced(_)) => return Ok(ns),
            Lean::Other(Frame::Error(e)) => bail!("subscribe failed: {} {}", e.name, e.message),
            Lean::Other(_) => {}
        }
    }
}

/// One worker of a `--workers` run: subscribes its share of clients to `run`, says `READY`,
/// waits for `GO`, storms, and reports (`latency_wire`, `all_caught_up_sec` from `GO`).
pub async fn worker(cfg: &StormConfig, run: &str) -> anyhow::Result<Report> {
    let end = Instant::now() + cfg.deadline;
    let prefix = format!("lt-storm-{run}-w{}", std::process::id());
    let cursors = setup(cfg, run, &prefix, end).await?;
    workers::say_ready()?;
    workers::wait_for_go().await?;
    let sent_away_before = crate::common::sent_away();
    let started = Instant::now();
    let (rec, failures) = storm(cfg, run, &prefix, cursors, end).await?;
    let all = started.elapsed().as_secs_f64();
    let sent_away = crate::common::sent_away() - sent_away_before;
    let mut r = report(cfg, all, &rec, sent_away, failures);
    if let Some(f) = r.figures.as_object_mut() {
        f.insert("latency_wire".into(), serde_json::to_value(rec.to_wire())?);
    }
    Ok(r)
}

/// `run` with the clients in `cfg.workers` child processes; the writer and the clock here.
async fn run_in_workers(cfg: &StormConfig) -> anyhow::Result<Report> {
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
        let share = workers::share(cfg.clients, cfg.workers, k);
        vec![
            "reconnect-storm".into(),
            "--worker".into(),
            "--run".into(),
            run.clone(),
            "--clients".into(),
            share.to_string(),
            "--missed".into(),
            cfg.missed.to_string(),
        ]
    })?;
    children.ready(end).await?;
    commit_missed(cfg, &run, end).await?;
    let started = Instant::now();
    children.go().await?;
    let (mut rec, mut failures, mut sent_away, mut workers_cpu) =
        (Recorder::default(), Vec::new(), 0u64, 0.0);
    for (k, r) in children.reports(end).await?.into_iter().enumerate() {
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                failures.push(e);
                continue;
            }
        };
        let at = |path: &str| r.pointer(path).cloned().unwrap_or_default();
        match serde_json::from_value::<RecorderWire>(at("/figures/latency_wire")) {
            Ok(w) => rec.merge(&Recorder::from_wire(&w)),
            Err(e) => failures.push(format!("worker {k}: unreadable latencies: {e}")),
        }
        sent_away += at("/figures/handshakes_sent_away").as_u64().unwrap_or(0);
        workers_cpu += at("/harness/cpu_seconds").as_f64().unwrap_or(0.0);
        failures.extend(workers::failures_of(k, &r));
    }
    // Until the last worker's last client had caught up (its report follows at once).
    let all = started.elapsed().as_secs_f64();
    if rec.count() != cfg.clients as u64 {
        failures.push(format!(
            "{} of {} clients reported",
            rec.count(),
            cfg.clients
        ));
    }
    let mut r = report(cfg, all, &rec, sent_away, failures);
    if let Some(f) = r.figures.as_object_mut() {
        f.insert("workers_cpu_seconds".into(), workers_cpu.into());
    }
    Ok(r)
}
