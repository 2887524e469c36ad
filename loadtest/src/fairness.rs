//! The `fairness` scenario: how much one aggressive client hurts a calm one. A calm writer
//! (batches of B, one in flight) measures its push→ack latency alone, then again while an
//! aggressor works against the same gateway:
//! - `flood`: F connections push batches of `--flood-batch` mutations with `--flood-inflight`
//!   in flight, as fast as acks come back;
//! - `churn`: C connections subscribe to a seeded collection (a full snapshot each time), wait
//!   for `synced`, unsubscribe, and start over.
//!
//! The report holds both latency summaries, their ratios and the aggressor's own rate during
//! the calm writer's second run. Checks: every calm and flood batch acknowledged once, in
//! order, as applied; every churn snapshot holds exactly the seeded documents.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use syncgate_protocol::{Frame, Push, Subscribe, Unsubscribe};

use crate::common::{
    Report, Target, check_ack, left, push_and_check, put, put_padded, run_filter, run_id,
};
use crate::stats::Recorder;

/// What the aggressor does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Aggressor {
    /// Large batches, many in flight.
    Flood,
    /// Subscribe to a large collection, wait for `synced`, unsubscribe, again.
    Churn,
}

/// Scenario parameters.
#[derive(Debug, Clone)]
pub struct FairnessConfig {
    /// Where to connect.
    pub target: Target,
    /// The collection used.
    pub collection: String,
    /// What the aggressor does.
    pub aggressor: Aggressor,
    /// Batches the calm writer pushes in each of its two runs.
    pub calm_batches: u64,
    /// Mutations per calm batch.
    pub calm_batch: usize,
    /// Aggressor connections.
    pub aggressors: usize,
    /// Mutations per flood batch.
    pub flood_batch: usize,
    /// Flood batches in flight per connection.
    pub flood_inflight: usize,
    /// Padding bytes per flooded document.
    pub flood_pad: usize,
    /// Documents seeded for the churners to snapshot.
    pub seed_docs: u64,
    /// Padding bytes per seeded document.
    pub seed_pad: usize,
    /// How long the aggressor runs before the calm writer's second run starts.
    pub warmup: Duration,
    /// Give up (and fail) after this long.
    pub deadline: Duration,
}

/// What the aggressor got done while the calm writer ran beside it.
#[derive(Default)]
struct Progress {
    /// Flood: mutations acknowledged. Churn: snapshots completed.
    done: AtomicU64,
    /// Told once, when the first work is done.
    started: tokio::sync::Notify,
    stop: AtomicBool,
}

impl Progress {
    fn add(&self, n: u64) {
        if self.done.fetch_add(n, Ordering::Relaxed) == 0 {
            self.started.notify_one();
        }
    }
}

/// Runs the scenario.
pub async fn run(cfg: &FairnessConfig) -> anyhow::Result<Report> {
    let run = run_id();
    let end = Instant::now() + cfg.deadline;
    let mut failures = Vec::new();
    let seed = format!("{run}-seed");
    if cfg.aggressor == Aggressor::Churn {
        seed_documents(cfg, &seed, end).await?;
    }
    let (calm_cid, alone) = {
        let cid = format!("lt-calm-{run}");
        let rec = calm(cfg, &run, &cid, 0, end).await?;
        (cid, rec)
    };
    let progress = Arc::new(Progress::default());
    let tasks: Vec<_> = (0..cfg.aggressors)
        .map(|a| {
            let (cfg, run, seed, progress) =
                (cfg.clone(), run.clone(), seed.clone(), progress.clone());
            tokio::spawn(async move {
                let result = match cfg.aggressor {
                    Aggressor::Flood => flooder(&cfg, &run, a, &progress, end).await,
                    Aggressor::Churn => churner(&cfg, &seed, a, &progress, end).await,
                };
                // An aggressor that failed before doing anything must not keep the run waiting.
                progress.started.notify_one();
                result
            })
        })
        .collect();
    // The second run starts once the aggressor is under way (its first ack or snapshot).
    if tokio::time::timeout(left(end), progress.started.notified())
        .await
        .is_err()
    {
        failures.push("the aggressor did nothing before the deadline".to_owned());
    }
    // Past its first burst: what a client's own rate allows at the start is not the steady
    // state the calm writer should be measured against.
    tokio::time::sleep(cfg.warmup).await;
    let before = progress.done.load(Ordering::Relaxed);
    let started = Instant::now();
    let under = calm(cfg, &run, &calm_cid, cfg.calm_batches, end).await;
    let seconds = started.elapsed().as_secs_f64();
    let aggressor_done = progress.done.load(Ordering::Relaxed) - before;
    progress.stop.store(true, Ordering::Relaxed);
    for (a, t) in tasks.into_iter().enumerate() {
        if let Err(e) = t.await.context("aggressor task")? {
            failures.push(format!("aggressor {a}: {e:#}"));
        }
    }
    let under = under?;
    let (a, u) = (alone.summary(), under.summary());
    let ratio = |x: Duration, y: Duration| y.as_secs_f64() / x.as_secs_f64().max(1e-9);
    let unit = match cfg.aggressor {
        Aggressor::Flood => "mutations_per_sec",
        Aggressor::Churn => "snapshots_per_sec",
    };
    Ok(Report::new(
        "fairness",
        serde_json::json!({"aggressor": format!("{:?}", cfg.aggressor).to_lowercase(),
            "calm_batches": cfg.calm_batches, "calm_batch": cfg.calm_batch,
            "aggressors": cfg.aggressors, "flood_batch": cfg.flood_batch,
            "flood_inflight": cfg.flood_inflight, "flood_pad": cfg.flood_pad,
            "seed_docs": cfg.seed_docs, "seed_pad": cfg.seed_pad,
            "warmup_ms": cfg.warmup.as_millis() as u64}),
        serde_json::json!({"calm_alone_ms": a, "calm_under_aggressor_ms": u,
            "p50_ratio": ratio(a.p50, u.p50), "p99_ratio": ratio(a.p99, u.p99),
            "aggressor": {unit: aggressor_done as f64 / seconds.max(1e-9)}}),
        &under,
        failures,
    ))
}

/// The calm writer: `calm_batches` batches, one in flight; returns their push→ack latency.
/// `first` numbers its documents on from an earlier run of the same client.
async fn calm(
    cfg: &FairnessConfig,
    run: &str,
    client_id: &str,
    first: u64,
    end: Instant,
) -> anyhow::Result<Recorder> {
    let (mut c, welcome) = cfg.target.connect(0, client_id).await?;
    let mut next_mid = welcome.last_applied_mutation + 1;
    let mut rec = Recorder::default();
    let size = cfg.calm_batch.max(1) as u64;
    for b in 0..cfg.calm_batches {
        let n0 = (first + b) * size;
        let mutations = (0..size)
            .map(|i| put(run, 0, n0 + i, next_mid + i, &cfg.collection))
            .collect();
        next_mid += size;
        let sent = Instant::now();
        push_and_check(&mut c, b + 1, mutations, end)
            .await
            .context("calm writer")?;
        rec.record(sent.elapsed());
    }
    c.close().await;
    Ok(rec)
}

/// Writes `seed_docs` documents of run `seed` for the churners to snapshot.
async fn seed_documents(cfg: &FairnessConfig, seed: &str, end: Instant) -> anyhow::Result<()> {
    let (mut c, welcome) = cfg.target.connect(0, &format!("lt-seed-{seed}")).await?;
    let per_batch = (welcome.limits.max_mutations_per_batch as u64).clamp(1, 500);
    let mut next_mid = welcome.last_applied_mutation + 1;
    let mut n = 0;
    let mut batch = 0;
    while n < cfg.seed_docs {
        let size = per_batch.min(cfg.seed_docs - n);
        let mutations = (0..size)
            .map(|i| put_padded(seed, 0, n + i, next_mid + i, &cfg.collection, cfg.seed_pad))
            .collect();
        batch += 1;
        push_and_check(&mut c, batch, mutations, end)
            .await
            .context("seeding")?;
        n += size;
        next_mid += size;
    }
    c.close().await;
    Ok(())
}

/// One flooding connection: full batches, `flood_inflight` in flight, until told to stop.
async fn flooder(
    cfg: &FairnessConfig,
    run: &str,
    a: usize,
    progress: &Progress,
    end: Instant,
) -> anyhow::Result<()> {
    let w = a + 1;
    let (mut c, welcome) = cfg
        .target
        .connect(w, &format!("lt-flood-{run}-{a}"))
        .await?;
    let batch = cfg
        .flood_batch
        .clamp(1, welcome.limits.max_mutations_per_batch as usize) as u64;
    let mut next_mid = welcome.last_applied_mutation + 1;
    let mut n = 0u64;
    let mut batch_id = 0u64;
    let mut inflight: VecDeque<(u64, Vec<u64>)> = VecDeque::new();
    loop {
        let stopping = progress.stop.load(Ordering::Relaxed);
        while !stopping && inflight.len() < cfg.flood_inflight.max(1) {
            let mutations: Vec<_> = (0..batch)
                .map(|i| put_padded(run, w, n + i, next_mid + i, &cfg.collection, cfg.flood_pad))
                .collect();
            let ids = mutations.iter().map(|m| m.mutation_id).collect();
            n += batch;
            next_mid += batch;
            batch_id += 1;
            c.send(&Frame::Push(Push {
                batch: batch_id,
                mutations,
            }))
            .await?;
            inflight.push_back((batch_id, ids));
        }
        if stopping && inflight.is_empty() {
            break;
        }
        match c.recv_timeout(left(end)).await? {
            Frame::PushAck(ack) => {
                let Some((id, ids)) = inflight.pop_front() else {
                    bail!("ack for batch {} with nothing in flight", ack.batch);
                };
                if ack.batch != id {
                    bail!("ack for batch {} while batch {id} was next", ack.batch);
                }
                check_ack(&ids, &ack)?;
                progress.add(ids.len() as u64);
            }
            Frame::Error(e) => bail!("{} {}: {}", e.code, e.name, e.message),
            _ => {}
        }
    }
    c.close().await;
    Ok(())
}

/// One churning connection: subscribe to the seeded documents, wait for `synced`,
/// unsubscribe, again, until told to stop.
async fn churner(
    cfg: &FairnessConfig,
    seed: &str,
    a: usize,
    progress: &Progress,
    end: Instant,
) -> anyhow::Result<()> {
    let (mut c, _) = cfg
        .target
        .connect(a + 1, &format!("lt-churn-{seed}-{a}"))
        .await?;
    let filter = run_filter(seed);
    let mut sub = 0u32;
    while !progress.stop.load(Ordering::Relaxed) {
        sub = sub.wrapping_add(1);
        c.send(&Frame::Subscribe(Subscribe {
            sub,
            collection: cfg.collection.clone(),
            filter: filter.clone(),
            cursor: None,
        }))
        .await?;
        let mut docs = 0u64;
        loop {
            match c.recv_timeout(left(end)).await? {
                Frame::Snapshot(s) if s.sub == sub => docs += s.docs.len() as u64,
                Frame::Synced(s) if s.sub == sub => break,
                Frame::Error(e) => bail!("{} {}: {}", e.code, e.name, e.message),
                _ => {}
            }
        }
        if docs != cfg.seed_docs {
            bail!(
                "snapshot {sub} held {docs} seeded documents, expected {}",
                cfg.seed_docs
            );
        }
        c.send(&Frame::Unsubscribe(Unsubscribe { sub })).await?;
        progress.add(1);
    }
    c.close().await;
    Ok(())
}
