//! The `connect` scenario: ramp N connections at R per second, each with one subscription
//! (filtered on the run), and hold them idle. Measures the connect rate and, with the
//! gateway's pid, its RSS per connection. Checks the idle connections are alive at the end:
//! one probe change is written and every connection must receive it exactly once.

use std::time::{Duration, Instant};

use anyhow::Context;
use syncgate_protocol::{Frame, Ping};
use tokio::sync::{mpsc, watch};

use crate::common::{Report, Target, left, push_and_check, put, run_filter, run_id, subscribe};
use crate::procfs;
use crate::stats::Recorder;

/// Scenario parameters.
#[derive(Debug, Clone)]
pub struct ConnectConfig {
    /// Where to connect.
    pub target: Target,
    /// The collection.
    pub collection: String,
    /// Connections to open.
    pub connections: usize,
    /// New connections per second.
    pub rate: u64,
    /// How long to hold them idle once all are open.
    pub hold: Duration,
    /// The gateway's pid, for RSS readings.
    pub gateway_pid: Option<u32>,
    /// Give up (and fail) after this long.
    pub deadline: Duration,
    /// Run as one worker of several processes (`--workers`): instead of holding, print `READY`
    /// on stdout once every connection is open and wait for a line on stdin before the probe.
    pub worker: bool,
    /// The gateway the probe is written through (`None`: `target`'s); with several nodes,
    /// another node than the connections', so that they must get a change written elsewhere.
    pub probe_url: Option<String>,
}

async fn barrier(c: &mut syncgate_client::Connection, end: Instant) -> anyhow::Result<usize> {
    c.send(&Frame::Ping(Ping { nonce: 1 })).await?;
    let mut extra = 0;
    loop {
        match c.recv_timeout(left(end)).await? {
            Frame::Changes(ch) => extra += ch.changes.len(),
            Frame::Pong(p) if p.nonce == 1 => return Ok(extra),
            _ => {}
        }
    }
}

/// Runs the scenario.
pub async fn run(cfg: &ConnectConfig) -> anyhow::Result<Report> {
    let run = run_id();
    let end = Instant::now() + cfg.deadline;
    let filter = run_filter(&run);
    let rss_before = cfg.gateway_pid.and_then(procfs::read).map(|r| r.rss_kib);
    let (probe_tx, _) = watch::channel(false);
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<anyhow::Result<(Duration, usize)>>();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / cfg.rate.max(1) as f64));
    let started = Instant::now();
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<anyhow::Result<()>>();
    for i in 0..cfg.connections {
        tick.tick().await;
        let (target, collection, filter, run) = (
            cfg.target.clone(),
            cfg.collection.clone(),
            filter.clone(),
            run.clone(),
        );
        let (ready, done, mut probe) = (ready_tx.clone(), done_tx.clone(), probe_tx.subscribe());
        tokio::spawn(async move {
            let t0 = Instant::now();
            let setup = async {
                let (mut c, w) = target.connect(i, &format!("lt-conn-{run}-{i}")).await?;
                subscribe(&mut c, &w, &collection, &filter, None, end).await?;
                anyhow::Ok((c, w.heartbeat_ms))
            };
            let (mut c, heartbeat_ms) = match setup.await {
                Ok(x) => x,
                Err(e) => {
                    let _ = ready.send(Err(e));
                    return;
                }
            };
            let took = t0.elapsed();
            let _ = ready.send(Ok(()));
            // Idle: answer nothing but keep the heartbeat, until the probe is written.
            let mut beat = tokio::time::interval(Duration::from_millis(u64::from(heartbeat_ms)));
            beat.tick().await;
            let mut seen = 0usize;
            let result = loop {
                tokio::select! {
                    _ = beat.tick() => {
                        if let Err(e) = c.send(&Frame::Ping(Ping { nonce: 0 })).await {
                            break Err(e.into());
                        }
                    }
                    f = c.recv_timeout(left(end)) => match f {
                        Ok(Frame::Changes(ch)) => {
                            seen += ch.changes.len();
                            if *probe.borrow_and_update() { break Ok((took, seen)); }
                        }
                        Ok(_) => {}
                        Err(e) => break Err(e.into()),
                    },
                }
            };
            // A pong is queued after every change published before its ping: anything that
            // arrives before it would be a duplicate of the probe.
            let result = match result {
                Ok((took, mut seen)) => barrier(&mut c, end).await.map(|extra| {
                    seen += extra;
                    (took, seen)
                }),
                e => e,
            };
            c.close().await;
            let _ = done.send(result);
        });
    }
    drop(ready_tx);
    let mut failures = Vec::new();
    let mut opened = 0usize;
    // Every task reports once (its sender lives on in the task, so count, do not wait for
    // the channel to close).
    for _ in 0..cfg.connections {
        match ready_rx.recv().await {
            Some(Ok(())) => opened += 1,
            Some(Err(e)) => failures.push(format!("connect: {e:#}")),
            None => break,
        }
    }
    let ramp = started.elapsed();
    let rss_open = cfg.gateway_pid.and_then(procfs::read).map(|r| r.rss_kib);
    if cfg.worker {
        // The parent holds (and reads the gateway's RSS) while every worker is open.
        crate::workers::say_ready()?;
        crate::workers::wait_for_go().await?;
    } else {
        // Hold them idle (the point of the scenario: what idle connections cost).
        tokio::time::sleep(cfg.hold).await;
    }
    let rss_held = cfg.gateway_pid.and_then(procfs::read).map(|r| r.rss_kib);
    // The probe: every open connection must receive it exactly once.
    probe_tx.send_replace(true);
    let mut writer_target = cfg.target.clone();
    if let Some(url) = &cfg.probe_url {
        writer_target.url = url.clone();
    }
    let (mut w, welcome) = writer_target
        .connect(0, &format!("lt-conn-writer-{run}"))
        .await?;
    let probe = put(
        &run,
        0,
        0,
        welcome.last_applied_mutation + 1,
        &cfg.collection,
    );
    push_and_check(&mut w, 1, vec![probe], end).await?;
    w.close().await;
    drop(done_tx);
    let mut connect_time = Recorder::default();
    let mut alive = 0usize;
    for _ in 0..opened {
        match done_rx
            .recv()
            .await
            .context("connection tasks ended early")?
        {
            Ok((took, seen)) => {
                connect_time.record(took);
                if seen == 1 {
                    alive += 1;
                } else {
                    failures.push(format!("a connection received the probe {seen} times"));
                }
            }
            Err(e) => failures.push(format!("idle connection failed: {e:#}")),
        }
    }
    if opened < cfg.connections {
        failures.push(format!(
            "{} of {} connections opened",
            opened, cfg.connections
        ));
    }
    let per_conn = match (rss_before, rss_held) {
        (Some(b), Some(h)) if opened > 0 => {
            Some((h.saturating_sub(b)) as f64 * 1024.0 / opened as f64)
        }
        _ => None,
    };
    Ok(Report::new(
        "connect",
        serde_json::json!({"connections": cfg.connections, "rate": cfg.rate,
            "hold_sec": cfg.hold.as_secs_f64(), "sources": cfg.target.sources.len()}),
        serde_json::json!({"opened": opened, "alive_at_end": alive,
            "ramp_sec": ramp.as_secs_f64(), "connects_per_sec": opened as f64 / ramp.as_secs_f64().max(1e-9),
            "gateway_rss_kib": {"before": rss_before, "all_open": rss_open, "after_hold": rss_held},
            "gateway_rss_bytes_per_connection": per_conn}),
        &connect_time,
        failures,
    ))
}
