//! The `reconnect-storm` scenario: N subscribers are live on the run's documents; all of them
//! drop; a writer commits K changes; then all N reconnect at the same moment, each resuming
//! from its own cursor. Measures the time until every client has caught up. Checks that each
//! receives exactly the K missed changes, once each, in order.

use std::time::{Duration, Instant};

use anyhow::Context;

use crate::common::{Report, Target, push_and_check, put, run_filter, run_id, subscribe};
use crate::stats::Recorder;

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
}

/// Runs the scenario.
pub async fn run(cfg: &StormConfig) -> anyhow::Result<Report> {
    let run = run_id();
    let end = Instant::now() + cfg.deadline;
    let filter = run_filter(&run);
    // Everyone subscribes once and remembers its cursor, then drops.
    let mut cursors = Vec::with_capacity(cfg.clients);
    let mut setup = Vec::new();
    for i in 0..cfg.clients {
        let target = cfg.target.clone();
        let (collection, filter, run) = (cfg.collection.clone(), filter.clone(), run.clone());
        setup.push(tokio::spawn(async move {
            let (mut c, _) = target.connect(i, &format!("lt-storm-{run}-{i}")).await?;
            let (cursor, _, _) = subscribe(&mut c, &collection, &filter, None, end).await?;
            c.close().await;
            anyhow::Ok(cursor)
        }));
        // Keep the setup bounded to a few hundred handshakes at once.
        if setup.len() >= 256 {
            for t in setup.drain(..) {
                cursors.push(t.await.context("setup task")??);
            }
        }
    }
    for t in setup {
        cursors.push(t.await.context("setup task")??);
    }
    // The server moves on by K changes.
    let (mut w, welcome) = cfg
        .target
        .connect(0, &format!("lt-storm-writer-{run}"))
        .await?;
    let mut mid = welcome.last_applied_mutation + 1;
    let mut n = 0;
    let mut batch = 0;
    while n < cfg.missed {
        let size = 500.min(cfg.missed - n);
        let ms = (0..size)
            .map(|i| put(&run, 0, n + i, mid + i, &cfg.collection))
            .collect();
        batch += 1;
        push_and_check(&mut w, batch, ms, end).await?;
        n += size;
        mid += size;
    }
    w.close().await;
    // The storm.
    let sent_away_before = crate::common::sent_away();
    let started = Instant::now();
    let tasks: Vec<_> = cursors
        .into_iter()
        .enumerate()
        .map(|(i, cursor)| {
            let target = cfg.target.clone();
            let (collection, filter, run) = (cfg.collection.clone(), filter.clone(), run.clone());
            tokio::spawn(async move {
                let t0 = Instant::now();
                let (mut c, _) = target.connect(i, &format!("lt-storm-{run}-{i}")).await?;
                let (_, changes, _) =
                    subscribe(&mut c, &collection, &filter, Some(cursor), end).await?;
                let took = t0.elapsed();
                let ns: Vec<u64> = changes
                    .iter()
                    .filter_map(|c| c.body.as_ref()?.get("n")?.as_u64())
                    .collect();
                c.close().await;
                anyhow::Ok((took, ns))
            })
        })
        .collect();
    let mut rec = Recorder::default();
    let mut failures = Vec::new();
    let expected: Vec<u64> = (0..cfg.missed).collect();
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await.context("storm task")? {
            Ok((took, ns)) => {
                rec.record(took);
                if ns != expected {
                    let missing = expected.iter().filter(|n| !ns.contains(n)).count();
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
    let all = started.elapsed();
    Ok(Report::new(
        "reconnect-storm",
        serde_json::json!({"clients": cfg.clients, "missed": cfg.missed}),
        serde_json::json!({"all_caught_up_sec": all.as_secs_f64(),
            "changes_delivered": rec.count() * cfg.missed,
            "deliveries_per_sec": (rec.count() * cfg.missed) as f64 / all.as_secs_f64().max(1e-9),
            "handshakes_sent_away": crate::common::sent_away() - sent_away_before}),
        &rec,
        failures,
    ))
}
