//! The `slow-consumer` scenario: S subscribers and one more that stops reading.
//!
//! Phase 1: W writers write at R changes/s each while everyone reads. Phase 2 (from change
//! `n = phase1`): the stalled subscriber stops reading its socket (its kernel receive buffer is
//! 4 KiB, so the backlog lands in the gateway quickly) while the writers go on. Afterwards it
//! reads again; if the gateway disconnected it (`slow_consumer`), it reconnects and resumes from
//! the cursor of the last frame it processed.
//!
//! Checks: every subscriber, the stalled one included, ends with every change exactly once and
//! in order. Reports the others' latency in each phase (P7: their p99 should not move by more
//! than 2×), the gateway's RSS before, during and after the stall, and how the stall ended.

use std::time::{Duration, Instant};

use anyhow::Context;
use syncgate_client::ConnError;
use syncgate_protocol::ErrorCode;
use tokio::sync::watch;

use crate::common::{Report, Target, open_subscribers, run_filter, run_id, subscribe};
use crate::fanout::{Pace, Received, check_sequences, receive};
use crate::procfs;
use crate::progress::Progress;
use crate::stats::Recorder;

/// Scenario parameters.
#[derive(Debug, Clone)]
pub struct SlowConfig {
    /// Where to connect.
    pub target: Target,
    /// The collection.
    pub collection: String,
    /// Subscribers that keep reading.
    pub subscribers: usize,
    /// Writers.
    pub writers: usize,
    /// Changes per writer while everyone reads.
    pub phase1: u64,
    /// Changes per writer while one subscriber does not read.
    pub phase2: u64,
    /// Changes per second per writer.
    pub rate_per_writer: u64,
    /// Padding bytes per document (bigger changes fill the stalled buffer sooner).
    pub pad: usize,
    /// The gateway's pid, for RSS readings at the phase boundaries.
    pub gateway_pid: Option<u32>,
    /// Give up (and fail) after this long.
    pub deadline: Duration,
}

/// Runs the scenario.
pub async fn run(cfg: &SlowConfig) -> anyhow::Result<Report> {
    let run = run_id();
    let end = Instant::now() + cfg.deadline;
    let filter = run_filter(&run);
    let per_writer = cfg.phase1 + cfg.phase2;
    let total = cfg.writers as u64 * per_writer;
    let subs = open_subscribers(
        &cfg.target,
        &cfg.collection,
        &filter,
        &format!("lt-slow-{run}"),
        0,
        cfg.subscribers,
        end,
    )
    .await?;
    let stalled_name = format!("lt-stalled-{run}");
    let (mut stalled, stalled_welcome) = cfg.target.connect_small_buffer(0, &stalled_name).await?;
    subscribe(
        &mut stalled,
        &stalled_welcome,
        &cfg.collection,
        &filter,
        None,
        end,
    )
    .await?;
    let rss = || cfg.gateway_pid.and_then(procfs::read).map(|r| r.rss_kib);
    let rss_start = rss();
    let progress = Progress::new("deliveries", total * (cfg.subscribers as u64 + 1));
    // Readers split their latency at the phase boundary.
    let readers: Vec<_> = subs
        .into_iter()
        .map(|(mut c, _)| {
            let progress = progress.clone();
            let split = cfg.phase1;
            tokio::spawn(async move {
                let mut got = Received {
                    split_at: Some(split),
                    ..Received::default()
                };
                let err = receive(&mut c, &mut got, total, end, None, &progress).await;
                c.close().await;
                (got, err)
            })
        })
        .collect();
    // The writers; `released` tells the stalled subscriber the stall is over.
    let (released_tx, released_rx) = watch::channel(false);
    let writers: Vec<_> = (0..cfg.writers)
        .map(|w| {
            let pace = Pace {
                target: cfg.target.clone(),
                collection: cfg.collection.clone(),
                run: run.clone(),
                writer: w,
                count: per_writer,
                rate: cfg.rate_per_writer,
                pad: cfg.pad,
                end,
            };
            tokio::spawn(async move { pace.write().await })
        })
        .collect();
    // The stalled subscriber: reads phase 1, stops until the writers are done, then reads on
    // (reconnecting from its cursor if the gateway dropped it).
    let stalled_task = {
        let (target, collection, filter, progress) = (
            cfg.target.clone(),
            cfg.collection.clone(),
            filter.clone(),
            progress.clone(),
        );
        let phase1_total = cfg.writers as u64 * cfg.phase1;
        let mut released = released_rx;
        tokio::spawn(async move {
            let mut got = Received::default();
            let mut outcome = StallOutcome::default();
            if let Some(e) =
                receive(&mut stalled, &mut got, phase1_total, end, None, &progress).await
            {
                outcome.errors.push(format!("before the stall: {e}"));
            }
            // The stall: not a single read until every writer has finished.
            let _ = released.wait_for(|r| *r).await;
            let mut conn = Some(stalled);
            while got.count < total && Instant::now() < end {
                let mut c = match conn.take() {
                    Some(c) => c,
                    None => {
                        outcome.reconnects += 1;
                        let (mut c, w) = target
                            .connect_small_buffer(0, &stalled_name)
                            .await
                            .context("stalled subscriber reconnecting")?;
                        let (cursor, catch_up, _) =
                            subscribe(&mut c, &w, &collection, &filter, got.cursor.clone(), end)
                                .await
                                .context("stalled subscriber resuming")?;
                        progress.inc(catch_up.len() as u64);
                        got.absorb(&catch_up, None);
                        got.cursor = Some(cursor);
                        c
                    }
                };
                match receive(&mut c, &mut got, total, end, None, &progress).await {
                    None => c.close().await,
                    Some(ConnError::Server(e)) if e.code == ErrorCode::SlowConsumer.code() => {
                        outcome.slow_consumer_error = true;
                    }
                    Some(ConnError::Closed(Some(code))) => {
                        outcome.close_codes.push(code);
                    }
                    // The gateway gave up on the stuck socket (its close could not get past
                    // the backlog): the connection ends without a close frame. Resume.
                    Some(ConnError::Ws(e)) => outcome.dropped.push(e.to_string()),
                    Some(e) => outcome.errors.push(e.to_string()),
                }
            }
            anyhow::Ok((got, outcome))
        })
    };
    let mut failures = Vec::new();
    let mut committed = 0;
    let rss_stall_start = rss();
    for (w, t) in writers.into_iter().enumerate() {
        match t.await.context("writer task")? {
            Ok(n) => committed += n,
            Err(e) => failures.push(format!("writer {w}: {e:#}")),
        }
    }
    let rss_stall_end = rss();
    released_tx.send_replace(true);
    let mut before = Recorder::default();
    let mut during = Recorder::default();
    for (i, t) in readers.into_iter().enumerate() {
        let (got, err) = t.await.context("reader task")?;
        before.merge(&got.latency);
        during.merge(&got.latency_late);
        failures.extend(got.verdict(&format!("subscriber {i}"), cfg.writers, per_writer, err));
    }
    let (stalled_got, outcome) = stalled_task.await.context("stalled task")??;
    failures.extend(check_sequences(
        "stalled subscriber",
        &stalled_got.seen,
        cfg.writers,
        per_writer,
    ));
    failures.extend(
        outcome
            .errors
            .iter()
            .map(|e| format!("stalled subscriber: {e}")),
    );
    progress.finish();
    let rss_end = rss();
    let (b, d) = (before.summary(), during.summary());
    let ratio = d.p99.as_secs_f64() / b.p99.as_secs_f64().max(1e-9);
    let mut all = before.clone();
    all.merge(&during);
    Ok(Report::new(
        "slow-consumer",
        serde_json::json!({"subscribers": cfg.subscribers, "writers": cfg.writers,
            "phase1": cfg.phase1, "phase2": cfg.phase2, "rate_per_writer": cfg.rate_per_writer,
            "pad": cfg.pad}),
        serde_json::json!({"committed": committed,
            "others_before_stall_ms": b, "others_during_stall_ms": d,
            "others_p99_ratio_during_vs_before": ratio,
            "stalled": {"disconnected_with_slow_consumer": outcome.slow_consumer_error
                            || outcome.close_codes.contains(&(4000 + ErrorCode::SlowConsumer.code())),
                        "close_codes": outcome.close_codes, "dropped": outcome.dropped,
                        "reconnects": outcome.reconnects,
                        "received": stalled_got.count},
            "gateway_rss_kib": {"start": rss_start, "stall_start": rss_stall_start,
                                "stall_end": rss_stall_end, "end": rss_end}}),
        &all,
        failures,
    ))
}

/// How the stalled subscriber's connection ended.
#[derive(Default)]
struct StallOutcome {
    slow_consumer_error: bool,
    close_codes: Vec<u16>,
    dropped: Vec<String>,
    reconnects: u32,
    errors: Vec<String>,
}
