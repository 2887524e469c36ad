//! The `fanout` scenario.
//!
//! Every writer puts documents `"{run}-{writer}-{n}"` carrying `run`, `writer`, `n` and the send
//! time; every subscriber subscribes with the filter `run = <this run>` (so other traffic on the
//! gateway does not disturb the check) and records, per writer, the `n`s it receives. At the end
//! each subscriber must hold exactly `0..changes_per_writer` for every writer, in increasing
//! order: anything missing, repeated or reordered fails the run.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use syncgate_client::Connection;
use syncgate_protocol::{
    Body, Frame, Mutation, MutationOp, MutationStatus, Ping, Push, Subscribe, Value,
};

use crate::stats::{Recorder, Summary};

/// Scenario parameters.
#[derive(Debug, Clone)]
pub struct FanoutConfig {
    /// Gateway WebSocket URL.
    pub url: String,
    /// Client token.
    pub token: String,
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
    /// Give up (and fail) after this long.
    pub deadline: Duration,
}

/// What a run measured and found.
#[derive(Debug, Clone)]
pub struct FanoutReport {
    /// Changes committed (acknowledged as applied).
    pub committed: u64,
    /// Deliveries received across subscribers.
    pub deliveries: u64,
    /// Deliveries per second over the run.
    pub deliveries_per_sec: f64,
    /// Write (send) to delivery latency.
    pub latency: Summary,
    /// Human-readable correctness failures (empty = every change exactly once, in order).
    pub failures: Vec<String>,
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Runs the scenario.
pub async fn run(cfg: &FanoutConfig) -> anyhow::Result<FanoutReport> {
    let run_id = format!("{:08x}", rand::random::<u32>());
    let end = Instant::now() + cfg.deadline;
    let filter: Body = [("run".to_owned(), Value::from(run_id.as_str()))].into();
    // Subscribe everyone first and wait until each is live.
    let mut subs = Vec::with_capacity(cfg.subscribers);
    for i in 0..cfg.subscribers {
        let (mut c, _) = Connection::connect(&cfg.url, &format!("lt-sub-{run_id}-{i}"), &cfg.token)
            .await
            .context("subscriber connect")?;
        c.send(&Frame::Subscribe(Subscribe {
            sub: 1,
            collection: cfg.collection.clone(),
            filter: filter.clone(),
            cursor: None,
        }))
        .await?;
        loop {
            match c
                .recv_timeout(end.saturating_duration_since(Instant::now()))
                .await?
            {
                Frame::Synced(_) => break,
                Frame::Error(e) => bail!("subscribe failed: {} {}", e.name, e.message),
                _ => {}
            }
        }
        subs.push(c);
    }
    let expected = cfg.changes_per_writer;
    let writers = cfg.writers;
    let started = Instant::now();
    let sub_tasks: Vec<_> = subs
        .into_iter()
        .map(|c| tokio::spawn(receive(c, writers, expected, end)))
        .collect();
    let writer_tasks: Vec<_> = (0..cfg.writers)
        .map(|w| tokio::spawn(write(cfg.clone(), run_id.clone(), w, end)))
        .collect();
    let mut committed = 0;
    for t in writer_tasks {
        committed += t.await.context("writer task")??;
    }
    let mut failures = Vec::new();
    let mut latencies = Recorder::default();
    let mut deliveries = 0u64;
    for (i, t) in sub_tasks.into_iter().enumerate() {
        let (seen, lat) = t.await.context("subscriber task")??;
        deliveries += lat.count();
        latencies.merge(&lat);
        for w in 0..writers {
            let got = seen.get(&w).cloned().unwrap_or_default();
            if got != (0..expected).collect::<Vec<_>>() {
                let missing = (0..expected).filter(|n| !got.contains(n)).count();
                failures.push(format!(
                    "subscriber {i}, writer {w}: received {} changes ({missing} missing, {} extra or out of order)",
                    got.len(),
                    got.len() + missing - expected as usize,
                ));
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    Ok(FanoutReport {
        committed,
        deliveries,
        deliveries_per_sec: deliveries as f64 / elapsed.max(1e-9),
        latency: latencies.summary(),
        failures,
    })
}

async fn write(cfg: FanoutConfig, run_id: String, w: usize, end: Instant) -> anyhow::Result<u64> {
    let (mut c, welcome) =
        Connection::connect(&cfg.url, &format!("lt-writer-{run_id}-{w}"), &cfg.token).await?;
    let first_mid = welcome.last_applied_mutation + 1;
    let interval = Duration::from_secs_f64(1.0 / cfg.rate_per_writer.max(1) as f64);
    let mut tick = tokio::time::interval(interval);
    let mut applied = 0;
    for n in 0..cfg.changes_per_writer {
        tick.tick().await;
        let mid = first_mid + n;
        let body: Body = [
            ("run".to_owned(), Value::from(run_id.as_str())),
            ("writer".to_owned(), Value::from(w as u64)),
            ("n".to_owned(), Value::from(n)),
            ("t".to_owned(), Value::from(now_ns())),
        ]
        .into();
        let m = Mutation {
            mutation_id: mid,
            collection: cfg.collection.clone(),
            id: format!("{run_id}-{w}-{n}"),
            op: MutationOp::Put,
            body: Some(body),
            base_version: None,
        };
        c.send(&Frame::Push(Push {
            batch: n,
            mutations: vec![m],
        }))
        .await?;
        loop {
            match c
                .recv_timeout(end.saturating_duration_since(Instant::now()))
                .await?
            {
                Frame::PushAck(a) if a.batch == n => {
                    if a.results
                        .iter()
                        .any(|r| r.status != MutationStatus::Applied)
                    {
                        bail!("writer {w}: mutation {n} rejected: {:?}", a.results);
                    }
                    applied += 1;
                    break;
                }
                Frame::Error(e) => bail!("writer {w}: {} {}", e.name, e.message),
                _ => {}
            }
        }
    }
    c.close().await;
    Ok(applied)
}

type Seen = (BTreeMap<usize, Vec<u64>>, Recorder);

async fn receive(
    mut c: Connection,
    writers: usize,
    expected: u64,
    end: Instant,
) -> anyhow::Result<Seen> {
    let mut seen: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
    let mut latencies = Recorder::default();
    let total = writers as u64 * expected;
    let mut got = 0u64;
    let mut ping = tokio::time::interval(Duration::from_secs(5));
    while got < total {
        let frame = tokio::select! {
            f = c.recv_timeout(end.saturating_duration_since(Instant::now())) => f,
            _ = ping.tick() => { c.send(&Frame::Ping(Ping { nonce: 0 })).await?; continue; }
        };
        match frame {
            Ok(Frame::Changes(ch)) => {
                let now = now_ns();
                for change in ch.changes {
                    let Some(b) = change.body else { continue };
                    let w = b.get("writer").and_then(Value::as_u64).unwrap_or(u64::MAX) as usize;
                    let n = b.get("n").and_then(Value::as_u64).unwrap_or(u64::MAX);
                    let t = b.get("t").and_then(Value::as_u64).unwrap_or(now);
                    latencies.record(Duration::from_nanos(now.saturating_sub(t)));
                    seen.entry(w).or_default().push(n);
                    got += 1;
                }
            }
            Ok(Frame::Error(e)) => bail!("subscriber: {} {}", e.name, e.message),
            Ok(_) => {}
            // Out of time: report what arrived; the caller lists what is missing.
            Err(_) => break,
        }
    }
    c.close().await;
    Ok((seen, latencies))
}
