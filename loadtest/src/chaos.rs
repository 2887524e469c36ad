//! The `chaos` scenario: the harness kills the gateway it spawned (SIGKILL: no drain, no
//! flush) and starts it again, several times, while writers push and subscribers follow.
//!
//! With several nodes (`--nodes N`, on one PostgreSQL) the faults go round the nodes, one at
//! a time, and a client whose connection ends reconnects to the next node (as through a load
//! balancer); `--rolling` restarts each node with SIGTERM (its drain: pushes in flight
//! answered, `goaway` to every client) instead of killing it — a rolling upgrade.
//!
//! Writers keep a local outbox, as a real client does: edits are produced at R per second
//! whether the gateway is up or not; on every (re)connection the writer re-sends everything not
//! yet acknowledged, in order, with the same mutation ids. Subscribers reconnect and resume
//! from the cursor of the last frame they processed.
//!
//! With [`DbFaults`] (PostgreSQL only) the harness also ends the gateway's database sessions
//! every few hundred milliseconds (`pg_terminate_backend`, as an operator, a failover or a
//! pooler would): group commits fail mid-transaction while writers keep several batches in
//! flight, so a later batch of a writer must never commit past an earlier one that failed
//! (PROTOCOL.md §3.7); the writers replay from their first unacknowledged mutation, as a
//! client must.
//!
//! Checks (invariants 1, 3, 4, 5, 11 under faults): every mutation is acknowledged as applied,
//! and an ack seen twice (a replay) carries the same version; every subscriber receives every
//! change exactly once, in order; the seq a subscriber sees for a change equals the version
//! its writer was told.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use syncgate_client::Connection;
use syncgate_protocol::{Frame, Mutation, MutationStatus, Push};

use crate::common::{Report, Target, left, put, run_filter, run_id, subscribe};
use crate::fanout::{Received, check_sequences, receive};
use crate::progress::Progress;
use crate::spawn::SpawnedGateway;
use crate::stats::Recorder;

/// Scenario parameters.
#[derive(Debug, Clone)]
pub struct ChaosConfig {
    /// The collection.
    pub collection: String,
    /// Writers.
    pub writers: usize,
    /// Subscribers.
    pub subscribers: usize,
    /// Mutations each writer produces.
    pub mutations_per_writer: u64,
    /// Mutations produced per second per writer.
    pub rate_per_writer: u64,
    /// Largest batch a writer pushes.
    pub batch: usize,
    /// Batches a writer keeps in flight (PROTOCOL.md §3.10 allows up to 16).
    pub inflight: usize,
    /// How many times the gateway is killed.
    pub kills: u32,
    /// Time between a (re)start and the next kill.
    pub kill_every: Duration,
    /// How long the gateway stays down after each kill.
    pub downtime: Duration,
    /// Give up (and fail) after this long.
    pub deadline: Duration,
    /// Also end the gateway's database sessions while writes run.
    pub db_faults: Option<DbFaults>,
    /// Restart nodes with SIGTERM (a drain) instead of SIGKILL, one after the other.
    pub rolling: bool,
}

/// Database sessions ended on a schedule (PostgreSQL).
#[derive(Debug, Clone)]
pub struct DbFaults {
    /// The gateway's database (the harness connects to it to end the other sessions).
    pub url: String,
    /// Shortest pause between two rounds.
    pub min_every: Duration,
    /// Longest pause between two rounds.
    pub max_every: Duration,
}

/// Ends every other client session of the database once per round until `stop`; returns the
/// number of sessions ended and of rounds.
async fn kill_db_sessions(
    f: DbFaults,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<(u64, u64)> {
    use rand::{Rng, SeedableRng};
    use sea_orm::sqlx::{Connection, PgConnection};
    let mut conn = PgConnection::connect(&f.url)
        .await
        .context("connecting to PostgreSQL to end the gateway's sessions")?;
    let mut rng = rand::rngs::StdRng::from_os_rng();
    let (mut ended, mut rounds) = (0u64, 0u64);
    loop {
        let wait = rng.random_range(f.min_every..=f.max_every.max(f.min_every));
        tokio::select! {
            _ = stop.changed() => break,
            _ = tokio::time::sleep(wait) => {} // the fault schedule, not synchronisation
        }
        let n: i64 = sea_orm::sqlx::query_scalar(
            "SELECT count(*) FILTER (WHERE ended) FROM (SELECT pg_terminate_backend(pid) AS ended \
             FROM pg_stat_activity WHERE datname = current_database() \
             AND pid <> pg_backend_pid() AND backend_type = 'client backend') s",
        )
        .fetch_one(&mut conn)
        .await
        .context("ending the gateway's database sessions")?;
        ended += n as u64;
        rounds += 1;
    }
    let _ = conn.close().await;
    Ok((ended, rounds))
}

/// Runs the scenario against a gateway the harness spawned.
pub async fn run(
    cfg: &ChaosConfig,
    gws: &mut [SpawnedGateway],
    token: String,
) -> anyhow::Result<Report> {
    let run = run_id();
    let end = Instant::now() + cfg.deadline;
    if gws.is_empty() {
        bail!("chaos needs at least one spawned gateway");
    }
    let target = Nodes(
        gws.iter()
            .map(|gw| Target {
                url: gw.url(),
                token: token.clone(),
                sources: Vec::new(),
            })
            .collect(),
    );
    let total = cfg.writers as u64 * cfg.mutations_per_writer;
    let progress = Progress::new("deliveries", total * cfg.subscribers as u64);
    // Subscribers are live before anything is written: every change must reach them as a
    // change, not inside a snapshot.
    let (live_tx, mut live_rx) = tokio::sync::mpsc::channel::<()>(cfg.subscribers.max(1));
    let subscribers: Vec<_> = (0..cfg.subscribers)
        .map(|i| {
            let (target, collection, run, progress, live) = (
                target.clone(),
                cfg.collection.clone(),
                run.clone(),
                progress.clone(),
                live_tx.clone(),
            );
            tokio::spawn(async move {
                follow(&target, i, &collection, &run, total, end, &progress, live).await
            })
        })
        .collect();
    drop(live_tx);
    for _ in 0..cfg.subscribers {
        if live_rx.recv().await.is_none() {
            break; // a subscriber failed; its task reports why
        }
    }
    let writers: Vec<_> = (0..cfg.writers)
        .map(|w| {
            let writer = ChaosWriter {
                target: target.clone(),
                collection: cfg.collection.clone(),
                run: run.clone(),
                w,
                total: cfg.mutations_per_writer,
                rate: cfg.rate_per_writer,
                batch: cfg.batch.max(1),
                inflight: cfg.inflight.max(1),
                end,
            };
            tokio::spawn(writer.run())
        })
        .collect();
    let (stop_faults, stop_rx) = tokio::sync::watch::channel(false);
    let faults = cfg
        .db_faults
        .clone()
        .map(|f| tokio::spawn(kill_db_sessions(f, stop_rx)));
    // The chaos: kill (or drain), stay down, restart; node after node.
    let mut downtime = Recorder::default();
    let mut drains = Recorder::default();
    for k in 0..cfg.kills as usize {
        tokio::time::sleep(cfg.kill_every).await; // the fault schedule, not synchronisation
        let n = gws.len();
        let Some(gw) = gws.get_mut(k % n) else {
            break;
        };
        let t0 = Instant::now();
        if cfg.rolling {
            drains.record(gw.terminate().await?);
        } else {
            gw.kill().await?;
            tokio::time::sleep(cfg.downtime).await; // the fault schedule, not synchronisation
        }
        gw.restart().await?;
        downtime.record(t0.elapsed());
    }
    let mut failures = Vec::new();
    let mut versions: HashMap<(usize, u64), u64> = HashMap::new();
    let mut acked = 0u64;
    let mut replayed = 0u64;
    let mut batch_errors = 0u64;
    let mut batch_error_names: std::collections::BTreeMap<String, u64> = Default::default();
    let mut ack_latency = Recorder::default();
    for (w, t) in writers.into_iter().enumerate() {
        match t.await.context("writer task")? {
            Ok(log) => {
                acked += log.versions.iter().filter(|v| v.is_some()).count() as u64;
                replayed += log.replayed_acks;
                batch_errors += log.batch_errors;
                for (name, n) in &log.batch_error_names {
                    *batch_error_names.entry(name.clone()).or_default() += n;
                }
                ack_latency.merge(&log.latency);
                failures.extend(log.failures.iter().map(|f| format!("writer {w}: {f}")));
                for (n, v) in log.versions.iter().enumerate() {
                    match v {
                        Some(v) => {
                            versions.insert((w, n as u64), *v);
                        }
                        None => {
                            failures.push(format!("writer {w}: mutation {n} never acknowledged"))
                        }
                    }
                }
            }
            Err(e) => failures.push(format!("writer {w}: {e:#}")),
        }
    }
    let _ = stop_faults.send(true);
    let (mut db_sessions_ended, mut db_fault_rounds) = (0, 0);
    if let Some(t) = faults {
        match t.await.context("database fault task")? {
            Ok((ended, rounds)) => (db_sessions_ended, db_fault_rounds) = (ended, rounds),
            Err(e) => failures.push(format!("database faults: {e:#}")),
        }
    }
    let mut reconnects = 0u64;
    for (i, t) in subscribers.into_iter().enumerate() {
        match t.await.context("subscriber task")? {
            Ok((got, n_reconnects)) => {
                reconnects += n_reconnects;
                failures.extend(check_sequences(
                    &format!("subscriber {i}"),
                    &got.seen,
                    cfg.writers,
                    cfg.mutations_per_writer,
                ));
                let mut mismatched = 0;
                for (w, n, seq) in got.seqs.iter().flatten() {
                    if versions.get(&(*w, *n)).is_some_and(|v| v != seq) {
                        mismatched += 1;
                    }
                }
                if mismatched > 0 {
                    failures.push(format!(
                        "subscriber {i}: {mismatched} changes arrived at a seq other than the version their writer was told"
                    ));
                }
            }
            Err(e) => failures.push(format!("subscriber {i}: {e:#}")),
        }
    }
    progress.finish();
    Ok(Report::new(
        "chaos",
        serde_json::json!({"writers": cfg.writers, "subscribers": cfg.subscribers,
            "mutations_per_writer": cfg.mutations_per_writer, "rate_per_writer": cfg.rate_per_writer,
            "batch": cfg.batch, "kills": cfg.kills, "kill_every_ms": cfg.kill_every.as_millis() as u64,
            "downtime_ms": cfg.downtime.as_millis() as u64,
            "db_faults": cfg.db_faults.as_ref().map(|f| serde_json::json!({
                "min_every_ms": f.min_every.as_millis() as u64,
                "max_every_ms": f.max_every.as_millis() as u64}))}),
        serde_json::json!({"acknowledged": acked, "replayed_acks_checked": replayed,
            "db_sessions_ended": db_sessions_ended, "db_fault_rounds": db_fault_rounds,
            "batch_errors": batch_errors, "batch_errors_by_name": batch_error_names,
            "inflight": cfg.inflight,
            "nodes": gws.len(), "rolling": cfg.rolling,
            "gateway_starts": gws.iter().map(|g| g.starts).sum::<u32>(),
            "subscriber_reconnects": reconnects,
            "restart_ms": downtime.summary(),
            "drain_ms": cfg.rolling.then(|| drains.summary())}),
        &ack_latency,
        failures,
    ))
}

/// The gateway nodes, one [`Target`] each.
#[derive(Debug, Clone)]
struct Nodes(Vec<Target>);

/// Connects, retrying while the gateway is down, until `end`. Client `i`'s `attempt`-th
/// connection goes to node `i + attempt` (mod the node count), and every failed try to the
/// next: a client whose node went away lands on another, as through a load balancer.
async fn connect_retrying(
    nodes: &Nodes,
    i: usize,
    attempt: &mut usize,
    client_id: &str,
    end: Instant,
) -> anyhow::Result<(Connection, syncgate_protocol::Welcome)> {
    let mut wait = Duration::from_millis(20);
    loop {
        let node = nodes
            .0
            .get((i + *attempt) % nodes.0.len().max(1))
            .context("no gateway nodes")?;
        *attempt += 1;
        match node.connect(i, client_id).await {
            Ok(x) => return Ok(x),
            Err(e) if Instant::now() + wait >= end => return Err(e),
            Err(_) => {
                tokio::time::sleep(wait).await; // reconnect backoff, as a client does
                wait = (wait * 2).min(Duration::from_millis(500));
            }
        }
    }
}

/// A subscriber that resumes from its cursor after every disconnect; says `live` once first
/// synced.
#[allow(clippy::too_many_arguments)]
async fn follow(
    target: &Nodes,
    i: usize,
    collection: &str,
    run: &str,
    total: u64,
    end: Instant,
    progress: &Progress,
    live: tokio::sync::mpsc::Sender<()>,
) -> anyhow::Result<(Received, u64)> {
    let mut live = Some(live);
    let filter = run_filter(run);
    let name = format!("lt-chaos-sub-{run}-{i}");
    let mut got = Received {
        seqs: Some(Vec::new()),
        ..Received::default()
    };
    let mut connections = 0u64;
    let mut attempt = 0;
    while got.count < total {
        if Instant::now() >= end {
            bail!("deadline passed with {} of {total} changes", got.count);
        }
        let Ok((mut c, w)) = connect_retrying(target, i, &mut attempt, &name, end).await else {
            continue;
        };
        connections += 1;
        let Ok((cursor, catch_up, docs)) =
            subscribe(&mut c, &w, collection, &filter, got.cursor.clone(), end).await
        else {
            continue;
        };
        if docs > 0 {
            bail!("got a snapshot of {docs} documents (a resync, or writes before it was live)");
        }
        if let Some(l) = live.take() {
            let _ = l.send(()).await;
        }
        got.absorb(&catch_up, None);
        progress.inc(catch_up.len() as u64);
        got.cursor = Some(cursor);
        if receive(&mut c, &mut got, total, end, None, progress)
            .await
            .is_none()
        {
            c.close().await;
        }
    }
    Ok((got, connections.saturating_sub(1)))
}

/// What a writer saw.
struct WriterLog {
    /// The version each mutation was acknowledged with.
    versions: Vec<Option<u64>>,
    /// Acks received again for an already acknowledged mutation (each checked equal).
    replayed_acks: u64,
    /// Push→ack latency of answered batches.
    latency: Recorder,
    /// Batches answered with an error (not committed) instead of an ack.
    batch_errors: u64,
    /// Those errors by name.
    batch_error_names: std::collections::BTreeMap<String, u64>,
    failures: Vec<String>,
}

struct ChaosWriter {
    target: Nodes,
    collection: String,
    run: String,
    w: usize,
    total: u64,
    rate: u64,
    batch: usize,
    inflight: usize,
    end: Instant,
}

impl ChaosWriter {
    async fn run(self) -> anyhow::Result<WriterLog> {
        let name = format!("lt-chaos-writer-{}-{}", self.run, self.w);
        let started = Instant::now();
        // The outbox: every edit, made once (same id, same body on every replay).
        let mut outbox: Vec<Mutation> = Vec::with_capacity(self.total as usize);
        let mut log = WriterLog {
            versions: vec![None; self.total as usize],
            replayed_acks: 0,
            latency: Recorder::default(),
            batch_errors: 0,
            batch_error_names: std::collections::BTreeMap::new(),
            failures: Vec::new(),
        };
        let mut acked = 0usize; // contiguous prefix of acknowledged mutations
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let mut attempt = 0;
        while acked < self.total as usize {
            if Instant::now() >= self.end {
                bail!(
                    "deadline passed with {acked} of {} acknowledged",
                    self.total
                );
            }
            let (mut c, _) =
                match connect_retrying(&self.target, self.w, &mut attempt, &name, self.end).await {
                    Ok(x) => x,
                    Err(_) => continue,
                };
            // Everything not acknowledged is sent again, in order, starting one batch early:
            // mutations already acknowledged must be answered again with the same version.
            let mut next = acked.saturating_sub(self.batch);
            let mut batch_id = 0u64;
            let mut inflight: VecDeque<(u64, usize, usize, Instant)> = VecDeque::new();
            loop {
                let due = ((started.elapsed().as_secs_f64() * self.rate as f64) as u64)
                    .min(self.total) as usize;
                while outbox.len() < due {
                    let n = outbox.len() as u64;
                    outbox.push(put(&self.run, self.w, n, n + 1, &self.collection));
                }
                while inflight.len() < self.inflight && next < outbox.len() {
                    let upto = (next + self.batch).min(outbox.len());
                    batch_id += 1;
                    let push = Frame::Push(Push {
                        batch: batch_id,
                        mutations: outbox.get(next..upto).unwrap_or_default().to_vec(),
                    });
                    if c.send(&push).await.is_err() {
                        break;
                    }
                    inflight.push_back((batch_id, next, upto, Instant::now()));
                    next = upto;
                }
                if acked >= self.total as usize {
                    break;
                }
                let frame = tokio::select! {
                    f = c.recv_timeout(left(self.end)) => f,
                    _ = tick.tick() => continue,
                };
                match frame {
                    Ok(Frame::PushAck(a)) => {
                        let Some((id, from, upto, sent)) = inflight.pop_front() else {
                            log.failures
                                .push(format!("ack {} with nothing in flight", a.batch));
                            break;
                        };
                        if a.batch != id || a.results.len() != upto - from {
                            log.failures.push(format!(
                                "ack {} ({} results) does not match batch {id} ({} mutations)",
                                a.batch,
                                a.results.len(),
                                upto - from
                            ));
                            break;
                        }
                        log.latency.record(sent.elapsed());
                        for (k, r) in a.results.iter().enumerate() {
                            let n = from + k;
                            if r.mutation_id != n as u64 + 1 {
                                log.failures
                                    .push(format!("ack order: {} at {n}", r.mutation_id));
                            }
                            let Some(slot) = log.versions.get_mut(n) else {
                                log.failures
                                    .push(format!("ack for mutation {n}, which was never sent"));
                                continue;
                            };
                            match (r.status, r.version, *slot) {
                                (MutationStatus::Applied, Some(v), None) => *slot = Some(v),
                                (MutationStatus::Applied, Some(v), Some(old)) => {
                                    log.replayed_acks += 1;
                                    if v != old {
                                        log.failures.push(format!(
                                            "mutation {n} acknowledged with version {old}, then {v}"
                                        ));
                                    }
                                }
                                _ => log
                                    .failures
                                    .push(format!("mutation {n} not applied: {r:?}")),
                            }
                        }
                        acked = acked.max(upto);
                    }
                    Ok(Frame::Error(e)) if !e.fatal => {
                        // e.g. storage_unavailable while the database recovers, or
                        // replay_required for the batches behind it: reconnect and resend
                        // from the first unacknowledged mutation.
                        if e.batch.is_some() {
                            log.batch_errors += 1;
                            *log.batch_error_names.entry(e.name.clone()).or_default() += 1;
                        }
                        break;
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            c.close().await;
        }
        Ok(log)
    }
}
