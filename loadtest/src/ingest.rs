//! The `ingest` scenario: W writers push batches of B puts as fast as acks come back (at most K
//! batches in flight each). Measures mutations/s durably acknowledged and the push→ack latency
//! of batches. Checks that every mutation is acknowledged exactly once, in order, as applied,
//! and that afterwards every written document is visible (a snapshot of the run holds them all).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use syncgate_protocol::{Frame, Push};

use crate::common::{Report, Target, check_ack, left, put, run_filter, run_id, subscribe};
use crate::stats::Recorder;

/// Scenario parameters.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// Where to connect.
    pub target: Target,
    /// The collection written.
    pub collection: String,
    /// Concurrent writers (connections).
    pub writers: usize,
    /// Mutations per batch.
    pub batch: usize,
    /// Batches in flight per writer.
    pub inflight: usize,
    /// Mutations each writer pushes.
    pub mutations_per_writer: u64,
    /// Give up (and fail) after this long.
    pub deadline: Duration,
}

/// Runs the scenario.
pub async fn run(cfg: &IngestConfig) -> anyhow::Result<Report> {
    let run = run_id();
    let end = Instant::now() + cfg.deadline;
    let started = Instant::now();
    let tasks: Vec<_> = (0..cfg.writers)
        .map(|w| tokio::spawn(writer(cfg.clone(), run.clone(), w, end)))
        .collect();
    let mut latency = Recorder::default();
    let mut acked = 0u64;
    let mut failures = Vec::new();
    for (w, t) in tasks.into_iter().enumerate() {
        match t.await.context("writer task")? {
            Ok((n, rec)) => {
                acked += n;
                latency.merge(&rec);
            }
            Err(e) => failures.push(format!("writer {w}: {e:#}")),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    // Visibility: a snapshot of the run must hold every document once.
    let expected = cfg.writers as u64 * cfg.mutations_per_writer;
    let (mut c, w) = cfg.target.connect(0, &format!("lt-verify-{run}")).await?;
    let (_, _, docs) = subscribe(&mut c, &w, &cfg.collection, &run_filter(&run), None, end).await?;
    c.close().await;
    if docs as u64 != expected {
        failures.push(format!(
            "{docs} documents visible after the run, expected {expected}"
        ));
    }
    Ok(Report::new(
        "ingest",
        serde_json::json!({"writers": cfg.writers, "batch": cfg.batch,
            "inflight": cfg.inflight, "mutations_per_writer": cfg.mutations_per_writer}),
        serde_json::json!({"acknowledged": acked, "seconds": elapsed,
            "mutations_per_sec": acked as f64 / elapsed.max(1e-9), "visible": docs}),
        &latency,
        failures,
    ))
}

async fn writer(
    cfg: IngestConfig,
    run: String,
    w: usize,
    end: Instant,
) -> anyhow::Result<(u64, Recorder)> {
    let (mut c, welcome) = cfg
        .target
        .connect(w, &format!("lt-ingest-{run}-{w}"))
        .await?;
    let batch = cfg
        .batch
        .clamp(1, welcome.limits.max_mutations_per_batch as usize);
    let mut next_mid = welcome.last_applied_mutation + 1;
    let mut n = 0u64;
    let mut batch_id = 0u64;
    let mut inflight: VecDeque<(u64, Vec<u64>, Instant)> = VecDeque::new();
    let mut rec = Recorder::default();
    let mut acked = 0u64;
    while acked < cfg.mutations_per_writer {
        while inflight.len() < cfg.inflight.max(1) && n < cfg.mutations_per_writer {
            let size = batch.min((cfg.mutations_per_writer - n) as usize);
            let mutations: Vec<_> = (0..size as u64)
                .map(|i| put(&run, w, n + i, next_mid + i, &cfg.collection))
                .collect();
            let ids = mutations.iter().map(|m| m.mutation_id).collect();
            n += size as u64;
            next_mid += size as u64;
            batch_id += 1;
            c.send(&Frame::Push(Push {
                batch: batch_id,
                mutations,
            }))
            .await?;
            inflight.push_back((batch_id, ids, Instant::now()));
        }
        match c.recv_timeout(left(end)).await? {
            Frame::PushAck(a) => {
                let Some((id, ids, sent)) = inflight.pop_front() else {
                    bail!("ack for batch {} with nothing in flight", a.batch);
                };
                if a.batch != id {
                    bail!("ack for batch {} while batch {id} was next", a.batch);
                }
                check_ack(&ids, &a)?;
                rec.record(sent.elapsed());
                acked += ids.len() as u64;
            }
            Frame::Error(e) => bail!("{} {}: {}", e.code, e.name, e.message),
            _ => {}
        }
    }
    c.close().await;
    Ok((acked, rec))
}
