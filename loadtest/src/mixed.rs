//! The `mixed` scenario: an ERP shift.
//!
//! Terminals belong to plants; each follows its plant's `work_orders` and `machines` (filter
//! `run` + `plant`) and reports progress (`qty_done`, `status`) on its plant's work orders at a
//! steady rate. A few backend writers (the ERP server) release new work orders, cancel some,
//! and update machine states. Some terminals go offline mid-shift (the connection is dropped
//! without a close, as Wi-Fi does), keep editing into their outbox, and come back: they resume
//! both subscriptions from their cursors and replay the outbox.
//!
//! Every write names the version its writer had seen (`base_version`: a terminal's replica
//! version, the backend's last acknowledged version of the order it cancels), so terminals
//! and backends contend on the same work orders under the gateway's conflict policies (the
//! sample config: `precedence` on `work_orders.status`, `field_merge` on `machines`).
//!
//! Checks, per terminal and subscription: seqs strictly increase (nothing doubled or
//! reordered); the seqs received are exactly those of every change committed to that plant's
//! documents after the terminal's snapshot (nothing lost: the harness knows them from every
//! writer's acks); every edit is answered once — applied, or refused by a conflict policy
//! (413, counted, for `first_write_wins` / `manual` collections) — and at the end each
//! terminal's replica equals a fresh snapshot of its plant (convergence).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rand::{Rng, SeedableRng};
use syncgate_client::Connection;
use syncgate_protocol::{
    Body, Cursor, ErrorCode, Frame, Mutation, MutationOp, MutationStatus, Ping, Push, Subscribe,
    Value,
};
use tokio::sync::watch;

use crate::common::{Report, Target, left, push_and_check, run_id};
use crate::progress::Progress;
use crate::stats::Recorder;

const COLLECTIONS: [&str; 2] = ["work_orders", "machines"];

/// The collection of a terminal's subscription id (1: work orders, 2: machines; the terminal
/// subscribes in [`COLLECTIONS`] order).
fn collection_of(sub: u32) -> &'static str {
    if sub <= 1 { "work_orders" } else { "machines" }
}

/// Scenario parameters.
#[derive(Debug, Clone)]
pub struct MixedConfig {
    /// Where to connect.
    pub target: Target,
    /// Plants (terminals are spread over them).
    pub plants: usize,
    /// Operator terminals.
    pub terminals: usize,
    /// Backend writers.
    pub backends: usize,
    /// How long the shift lasts.
    pub duration: Duration,
    /// Edits per second per terminal.
    pub terminal_rate: f64,
    /// Writes per second per backend writer.
    pub backend_rate: f64,
    /// Share of terminals that go offline once during the shift.
    pub offline_share: f64,
    /// How long an offline terminal stays away.
    pub offline_for: Duration,
    /// Give up (and fail) after this long.
    pub deadline: Duration,
}

/// Shift phases, broadcast to terminals.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// Working.
    Shift,
    /// Stop editing, get online, upload everything.
    Flush,
    /// Everything committed up to this head; read until a pong covers it, then report.
    Barrier(u64),
}

/// Applied writes: `(collection, plant) → seqs`.
type Committed = BTreeMap<(String, String), BTreeSet<u64>>;

fn doc_plant(body: &Body) -> String {
    body.get("plant")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

fn filter(run: &str, plant: &str) -> Body {
    [
        ("run".to_owned(), Value::from(run)),
        ("plant".to_owned(), Value::from(plant)),
    ]
    .into()
}

/// Runs the scenario.
pub async fn run(cfg: &MixedConfig) -> anyhow::Result<Report> {
    let run = run_id();
    let end = Instant::now() + cfg.deadline;
    let plants: Vec<String> = (0..cfg.plants.max(1)).map(|p| format!("p{p}")).collect();
    // Before the shift: the backend plans 5 work orders and 3 machines per plant.
    let mut backend = Backend::connect(&cfg.target, &run, 0, end).await?;
    let mut committed = Committed::new();
    for plant in &plants {
        for k in 0..3 {
            backend
                .put(
                    "machines",
                    &format!("{run}-{plant}-m{k}"),
                    machine(&run, plant, "idle"),
                    &mut committed,
                )
                .await?;
        }
        for _ in 0..5 {
            backend.new_work_order(plant, &mut committed).await?;
        }
    }
    let (phase_tx, phase_rx) = watch::channel(Phase::Shift);
    let (flushed_tx, mut flushed_rx) = tokio::sync::mpsc::unbounded_channel::<Committed>();
    let progress = Progress::new("shift", 0);
    let mut rng = rand::rng();
    let terminals: Vec<_> = (0..cfg.terminals)
        .map(|i| {
            let offline = rng.random_bool(cfg.offline_share.clamp(0.0, 1.0)).then(|| {
                let at = cfg.duration.mul_f64(rng.random_range(0.1..0.6));
                (at, cfg.offline_for)
            });
            let t = Terminal {
                target: cfg.target.clone(),
                run: run.clone(),
                i,
                plant: plants
                    .get(i % plants.len().max(1))
                    .cloned()
                    .unwrap_or_default(),
                rate: cfg.terminal_rate,
                offline,
                end,
                phase: phase_rx.clone(),
                flushed: flushed_tx.clone(),
                progress: progress.clone(),
            };
            tokio::spawn(t.run())
        })
        .collect();
    drop(flushed_tx);
    // The shift: backends write until it ends.
    let shift_end = Instant::now() + cfg.duration;
    let backends: Vec<_> = (0..cfg.backends)
        .map(|b| {
            let (target, run, plants) = (cfg.target.clone(), run.clone(), plants.clone());
            let rate = cfg.backend_rate;
            let progress = progress.clone();
            tokio::spawn(async move {
                let mut be = Backend::connect(&target, &run, b + 1, end).await?;
                let mut committed = Committed::new();
                let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.01)));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                let mut k = 0usize;
                while Instant::now() < shift_end {
                    tick.tick().await;
                    let Some(plant) = plants.get(k % plants.len().max(1)) else {
                        break;
                    };
                    // Every plant gets every kind of write in turn (with `k % 4`, a plant
                    // count divisible by 4 gave each plant one kind only: no cancellations).
                    match (k / plants.len().max(1)) % 4 {
                        0 | 1 => be.new_work_order(plant, &mut committed).await?,
                        2 => be.cancel_one(plant, &mut committed).await?,
                        _ => {
                            let states = ["running", "idle", "fault", "maintenance"];
                            let state = states.get((k / 4) % 4).copied().unwrap_or("running");
                            let id = format!("{run}-{plant}-m{}", k % 3);
                            be.put("machines", &id, machine(&run, plant, state), &mut committed)
                                .await?;
                        }
                    }
                    progress.inc(1);
                    k += 1;
                }
                be.conn.close().await;
                anyhow::Ok(committed)
            })
        })
        .collect();
    let mut failures = Vec::new();
    for (b, t) in backends.into_iter().enumerate() {
        match t.await.context("backend task")? {
            Ok(c) => merge(&mut committed, c),
            Err(e) => failures.push(format!("backend {b}: {e:#}")),
        }
    }
    backend.conn.close().await;
    // Flush: every terminal gets online and uploads its outbox, then reports what it committed.
    phase_tx.send_replace(Phase::Flush);
    let mut flushed = 0;
    while flushed < terminals.len() {
        match flushed_rx.recv().await {
            Some(c) => {
                merge(&mut committed, c);
                flushed += 1;
            }
            None => break,
        }
    }
    // Barrier: every terminal reads until a pong covers the final head.
    let head = committed
        .values()
        .flat_map(|s| s.iter().copied())
        .max()
        .unwrap_or(0);
    phase_tx.send_replace(Phase::Barrier(head));
    let mut states = Vec::new();
    for (i, t) in terminals.into_iter().enumerate() {
        match t.await.context("terminal task")? {
            Ok(s) => states.push(s),
            Err(e) => failures.push(format!("terminal {i}: {e:#}")),
        }
    }
    progress.finish();
    // Convergence reference: a fresh snapshot of every plant.
    let mut reference: HashMap<(String, String), BTreeMap<String, u64>> = HashMap::new();
    let (mut v, _) = cfg
        .target
        .connect(0, &format!("lt-mixed-verify-{run}"))
        .await?;
    for plant in &plants {
        for coll in COLLECTIONS {
            let docs = snapshot(&mut v, coll, &filter(&run, plant), end).await?;
            reference.insert((coll.to_owned(), plant.clone()), docs);
        }
    }
    v.close().await;
    let mut edit_latency = Recorder::default();
    let mut delivered = 0u64;
    let mut edits = 0u64;
    let mut refused = 0u64;
    let mut offline = 0usize;
    for s in &states {
        edit_latency.merge(&s.ack_latency);
        edits += s.edits;
        refused += s.refused;
        offline += usize::from(s.went_offline);
        failures.extend(s.failures.iter().map(|f| format!("terminal {}: {f}", s.i)));
        for coll in COLLECTIONS {
            let key = (coll.to_owned(), s.plant.clone());
            let Some(sub) = s.subs.get(coll) else {
                failures.push(format!("terminal {}: no subscription of {coll}", s.i));
                continue;
            };
            delivered += sub.seqs.len() as u64;
            let all: Vec<u64> = committed
                .get(&key)
                .map(|set| set.iter().copied().collect())
                .unwrap_or_default();
            if let Some(problem) = check_stream(&all, &sub.seqs, sub.start) {
                failures.push(format!("terminal {} {coll}: {problem}", s.i));
            }
            if reference.get(&key) != Some(&sub.replica) {
                failures.push(format!(
                    "terminal {} {coll}: replica ({} documents) differs from the server's snapshot ({} documents)",
                    s.i,
                    sub.replica.len(),
                    reference.get(&key).map_or(0, BTreeMap::len)
                ));
            }
        }
    }
    let total_commits: usize = committed.values().map(BTreeSet::len).sum();
    Ok(Report::new(
        "mixed",
        serde_json::json!({"plants": cfg.plants, "terminals": cfg.terminals,
            "backends": cfg.backends, "duration_sec": cfg.duration.as_secs_f64(),
            "terminal_rate": cfg.terminal_rate, "backend_rate": cfg.backend_rate,
            "offline_share": cfg.offline_share, "offline_for_sec": cfg.offline_for.as_secs_f64()}),
        serde_json::json!({"changes_committed": total_commits, "terminal_edits": edits,
            "edits_refused_by_policy": refused,
            "changes_per_sec": total_commits as f64 / cfg.duration.as_secs_f64().max(0.001),
            "deliveries_checked": delivered, "terminals_that_went_offline": offline,
            "final_head": head}),
        &edit_latency,
        failures,
    ))
}

/// Checks what one subscription received against every seq committed to its documents
/// (`all`, sorted). The subscription started with a snapshot whose position the protocol does
/// not reveal (it lies at or before `synced_at`, the first `synced` cursor), so: what arrived
/// must be a contiguous run at the end of `all` (nothing unexpected, nothing skipped or doubled
/// in between) that includes every seq after `synced_at` (nothing lost once live). The
/// snapshot's share is checked by the convergence check.
fn check_stream(all: &[u64], got: &[u64], synced_at: u64) -> Option<String> {
    let after_live = all.iter().filter(|s| **s > synced_at).count();
    let first = match got.first() {
        None if after_live == 0 => return None,
        None => {
            return Some(format!(
                "received nothing, {after_live} changes committed after it went live"
            ));
        }
        Some(f) => *f,
    };
    let Ok(k) = all.binary_search(&first) else {
        return Some(format!(
            "received seq {first}, which was never committed to its documents"
        ));
    };
    let (_, suffix) = all.split_at(k);
    if suffix != got {
        let got_set: BTreeSet<u64> = got.iter().copied().collect();
        let missing = suffix.iter().filter(|s| !got_set.contains(s)).count();
        let unexpected = got.iter().filter(|s| all.binary_search(s).is_err()).count();
        return Some(format!(
            "received {} changes from seq {first}, expected {}: {missing} missing, {unexpected} unexpected, {} doubled",
            got.len(),
            all.len() - k,
            got.len() - got_set.len()
        ));
    }
    if got.len() < after_live {
        return Some(format!(
            "received {} changes, but {after_live} were committed after it went live",
            got.len()
        ));
    }
    None
}

fn merge(into: &mut Committed, from: Committed) {
    for (k, v) in from {
        into.entry(k).or_default().extend(v);
    }
}

fn machine(run: &str, plant: &str, state: &str) -> Body {
    [
        ("run".to_owned(), Value::from(run)),
        ("plant".to_owned(), Value::from(plant)),
        ("state".to_owned(), Value::from(state)),
        (
            "speed".to_owned(),
            Value::from(if state == "running" { 120 } else { 0 }),
        ),
    ]
    .into()
}

/// Reads a whole snapshot: id → version.
async fn snapshot(
    c: &mut Connection,
    collection: &str,
    filter: &Body,
    end: Instant,
) -> anyhow::Result<BTreeMap<String, u64>> {
    c.send(&Frame::Subscribe(Subscribe {
        sub: 9,
        collection: collection.to_owned(),
        filter: filter.clone(),
        cursor: None,
    }))
    .await?;
    let mut docs = BTreeMap::new();
    loop {
        match c.recv_timeout(left(end)).await? {
            Frame::Snapshot(s) if s.sub == 9 => {
                docs.extend(s.docs.into_iter().map(|d| (d.id, d.version)));
            }
            Frame::Synced(s) if s.sub == 9 => break,
            Frame::Error(e) => bail!("verify snapshot: {} {}", e.name, e.message),
            _ => {}
        }
    }
    c.send(&Frame::Unsubscribe(syncgate_protocol::Unsubscribe {
        sub: 9,
    }))
    .await?;
    Ok(docs)
}

/// The ERP backend: one always-online connection writing plans, cancellations and machine
/// states, each push checked.
struct Backend {
    conn: Connection,
    run: String,
    next_mid: u64,
    batch: u64,
    /// Work orders it created, per plant, with the version it last wrote, for
    /// cancellations.
    orders: HashMap<String, Vec<(String, u64)>>,
    seq_no: u64,
    end: Instant,
}

impl Backend {
    async fn connect(
        target: &Target,
        run: &str,
        b: usize,
        end: Instant,
    ) -> anyhow::Result<Backend> {
        let (conn, w) = target
            .connect(b, &format!("lt-mixed-erp-{run}-{b}"))
            .await?;
        Ok(Backend {
            conn,
            run: run.to_owned(),
            next_mid: w.last_applied_mutation + 1,
            batch: 0,
            orders: HashMap::new(),
            seq_no: 0,
            end,
        })
    }

    /// Pushes one mutation, checked as applied; returns its version.
    async fn push(
        &mut self,
        m: Mutation,
        plant: &str,
        committed: &mut Committed,
    ) -> anyhow::Result<u64> {
        let coll = m.collection.clone();
        self.batch += 1;
        self.next_mid += 1;
        // One mutation, checked as applied: the batch's `visible_at` is its version.
        let version = push_and_check(&mut self.conn, self.batch, vec![m], self.end)
            .await
            .context("backend write")?;
        committed
            .entry((coll, plant.to_owned()))
            .or_default()
            .insert(version);
        Ok(version)
    }

    async fn put(
        &mut self,
        coll: &str,
        id: &str,
        body: Body,
        committed: &mut Committed,
    ) -> anyhow::Result<u64> {
        let plant = doc_plant(&body);
        let m = Mutation {
            mutation_id: self.next_mid,
            collection: coll.to_owned(),
            id: id.to_owned(),
            op: MutationOp::Put,
            body: Some(body),
            base_version: None,
            resolves: None,
        };
        self.push(m, &plant, committed).await
    }

    async fn new_work_order(
        &mut self,
        plant: &str,
        committed: &mut Committed,
    ) -> anyhow::Result<()> {
        self.seq_no += 1;
        let id = format!("{}-{plant}-wo{}-{}", self.run, self.next_mid, self.seq_no);
        let body: Body = [
            ("run".to_owned(), Value::from(self.run.as_str())),
            ("plant".to_owned(), Value::from(plant)),
            ("line".to_owned(), Value::from(self.seq_no % 4)),
            ("status".to_owned(), Value::from("open")),
            ("qty_planned".to_owned(), Value::from(100)),
            ("qty_done".to_owned(), Value::from(0)),
        ]
        .into();
        let version = self.put("work_orders", &id, body, committed).await?;
        self.orders
            .entry(plant.to_owned())
            .or_default()
            .push((id, version));
        Ok(())
    }

    async fn cancel_one(&mut self, plant: &str, committed: &mut Committed) -> anyhow::Result<()> {
        let Some((id, base)) = self.orders.get_mut(plant).and_then(Vec::pop) else {
            return Ok(());
        };
        // Based on the version it wrote: terminals have usually edited the order since.
        let m = Mutation {
            mutation_id: self.next_mid,
            collection: "work_orders".to_owned(),
            id,
            op: MutationOp::Patch,
            body: Some([("status".to_owned(), Value::from("cancelled"))].into()),
            base_version: Some(base),
            resolves: None,
        };
        self.push(m, plant, committed).await.map(|_| ())
    }
}

/// What a terminal knows of one subscription.
#[derive(Default)]
struct SubState {
    /// The cursor of the first `synced`: every change after it must arrive.
    start: u64,
    /// Whether the first `synced` has arrived.
    started: bool,
    /// Seqs of changes received, in arrival order.
    seqs: Vec<u64>,
    /// id → version of live documents.
    replica: BTreeMap<String, u64>,
    /// Where to resume.
    cursor: Option<Cursor>,
    /// Synced on the current connection.
    synced: bool,
}

/// What a terminal reports at the end.
struct TerminalState {
    i: usize,
    plant: String,
    subs: HashMap<&'static str, SubState>,
    ack_latency: Recorder,
    edits: u64,
    /// Edits refused by a conflict policy (413).
    refused: u64,
    went_offline: bool,
    failures: Vec<String>,
}

struct Terminal {
    target: Target,
    run: String,
    i: usize,
    plant: String,
    rate: f64,
    /// When (after the start) to drop offline, and for how long.
    offline: Option<(Duration, Duration)>,
    end: Instant,
    phase: watch::Receiver<Phase>,
    flushed: tokio::sync::mpsc::UnboundedSender<Committed>,
    progress: Progress,
}

impl Terminal {
    async fn run(mut self) -> anyhow::Result<TerminalState> {
        let name = format!("lt-mixed-term-{}-{}", self.run, self.i);
        let started = Instant::now();
        let mut st = TerminalState {
            i: self.i,
            plant: self.plant.clone(),
            subs: COLLECTIONS
                .iter()
                .map(|c| (*c, SubState::default()))
                .collect(),
            ack_latency: Recorder::default(),
            edits: 0,
            refused: 0,
            went_offline: false,
            failures: Vec::new(),
        };
        let mut outbox: Vec<(Mutation, Instant)> = Vec::new();
        let mut acked = 0usize;
        let mut first_mid = None;
        let mut committed = Committed::new();
        let mut conn: Option<Connection> = None;
        let mut sent = 0usize;
        let mut offline_until: Option<Instant> = None;
        let mut edit_tick =
            tokio::time::interval(Duration::from_secs_f64(1.0 / self.rate.max(0.01)));
        edit_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut flushed = false;
        let mut barrier: Option<u64> = None;
        let mut rng = rand::rngs::StdRng::from_os_rng();
        loop {
            if Instant::now() >= self.end {
                bail!("deadline passed");
            }
            let phase = *self.phase.borrow();
            // Connectivity: offline window, else (re)connect.
            if let Some((at, dur)) = self.offline
                && phase == Phase::Shift
                && started.elapsed() >= at
            {
                self.offline = None;
                st.went_offline = true;
                conn = None; // dropped without a close frame
                offline_until = Some(Instant::now() + dur);
            }
            if offline_until.is_some_and(|u| Instant::now() >= u || phase != Phase::Shift) {
                offline_until = None;
            }
            if conn.is_none() && offline_until.is_none() {
                let (mut c, w) = self.target.connect(self.i, &name).await?;
                first_mid.get_or_insert(w.last_applied_mutation + 1);
                for (k, coll) in COLLECTIONS.iter().enumerate() {
                    let sub = st.subs.get_mut(coll).context("sub")?;
                    sub.synced = false;
                    c.send(&Frame::Subscribe(Subscribe {
                        sub: k as u32 + 1,
                        collection: (*coll).to_owned(),
                        filter: filter(&self.run, &self.plant),
                        cursor: sub.cursor.clone(),
                    }))
                    .await?;
                }
                // Replay everything not acknowledged, in order.
                sent = acked;
                conn = Some(c);
            }
            // Upload what is pending (at most 4 batches of 50 ahead of the acks).
            if let Some(c) = conn.as_mut() {
                while sent < outbox.len() && sent < acked + 200 {
                    let upto = (sent + 50).min(outbox.len()).min(acked + 200);
                    let mutations = outbox
                        .get(sent..upto)
                        .unwrap_or_default()
                        .iter()
                        .map(|(m, _)| m.clone())
                        .collect();
                    if c.send(&Frame::Push(Push {
                        batch: sent as u64,
                        mutations,
                    }))
                    .await
                    .is_err()
                    {
                        conn = None;
                        break;
                    }
                    sent = upto;
                }
            }
            if phase == Phase::Flush && !flushed && acked == outbox.len() && conn.is_some() {
                flushed = true;
                let _ = self.flushed.send(std::mem::take(&mut committed));
            }
            if let Phase::Barrier(h) = phase
                && barrier.is_none()
                && let Some(c) = conn.as_mut()
            {
                barrier = Some(h);
                c.send(&Frame::Ping(Ping { nonce: h })).await?;
            }
            let frame = {
                let phase_rx = &mut self.phase;
                match conn.as_mut() {
                    Some(c) => tokio::select! {
                        f = c.recv_timeout(Duration::from_millis(500)) => Some(f),
                        _ = edit_tick.tick() => None,
                        _ = phase_rx.changed() => None,
                    },
                    None => tokio::select! {
                        _ = edit_tick.tick() => None,
                        _ = phase_rx.changed() => None,
                    },
                }
            };
            // An edit per tick during the shift, online or not.
            if frame.is_none() && phase == Phase::Shift {
                let orders: Vec<&String> = st
                    .subs
                    .get("work_orders")
                    .map(|s| s.replica.keys().collect())
                    .unwrap_or_default();
                let pick = (!orders.is_empty()).then(|| rng.random_range(0..orders.len()));
                if let Some(id) = pick.and_then(|i| orders.get(i)).map(|id| (*id).clone()) {
                    // The version this terminal has seen: what conflict policies decide on.
                    let base = st
                        .subs
                        .get("work_orders")
                        .and_then(|s| s.replica.get(&id))
                        .copied();
                    let n = outbox.len() as u64;
                    let mid = first_mid.unwrap_or(1) + n;
                    let body: Body = [
                        ("qty_done".to_owned(), Value::from(n + 1)),
                        ("status".to_owned(), Value::from("in_progress")),
                        ("operator".to_owned(), Value::from(format!("op-{}", self.i))),
                    ]
                    .into();
                    outbox.push((
                        Mutation {
                            mutation_id: mid,
                            collection: "work_orders".to_owned(),
                            id,
                            op: MutationOp::Patch,
                            body: Some(body),
                            base_version: base,
                            resolves: None,
                        },
                        Instant::now(),
                    ));
                    st.edits += 1;
                }
                continue;
            }
            let Some(frame) = frame else { continue };
            let frame = match frame {
                Ok(f) => f,
                Err(syncgate_client::ConnError::Timeout) => continue,
                Err(e) => {
                    if barrier.is_some() || phase == Phase::Flush {
                        st.failures.push(format!("connection lost at the end: {e}"));
                    }
                    conn = None;
                    barrier = None;
                    continue;
                }
            };
            match frame {
                Frame::Snapshot(s) => {
                    let sub = st.subs.get_mut(collection_of(s.sub)).context("sub")?;
                    if sub.cursor.is_some() {
                        st.failures
                            .push("snapshot on a resumed subscription".into());
                    }
                    for d in s.docs {
                        sub.replica.insert(d.id, d.version);
                    }
                }
                Frame::Synced(s) => {
                    let sub = st.subs.get_mut(collection_of(s.sub)).context("sub")?;
                    if !sub.started {
                        sub.started = true;
                        sub.start = s.cursor.seq;
                    }
                    sub.cursor = Some(s.cursor);
                    sub.synced = true;
                }
                Frame::Changes(ch) => {
                    let sub = st.subs.get_mut(collection_of(ch.sub)).context("sub")?;
                    for c in &ch.changes {
                        if sub.seqs.last().is_some_and(|l| *l >= c.seq) {
                            st.failures
                                .push(format!("seq {} after {:?}", c.seq, sub.seqs.last()));
                        }
                        sub.seqs.push(c.seq);
                        match c.op {
                            syncgate_protocol::ChangeOp::Delete => {
                                sub.replica.remove(&c.id);
                            }
                            _ => {
                                sub.replica.insert(c.id.clone(), c.seq);
                            }
                        }
                    }
                    self.progress.inc(ch.changes.len() as u64);
                    sub.cursor = Some(ch.cursor);
                }
                Frame::PushAck(a) => {
                    for r in &a.results {
                        let k = (r.mutation_id - first_mid.unwrap_or(1)) as usize;
                        let Some((m, at)) = outbox.get(k) else {
                            st.failures
                                .push(format!("ack for unknown mutation {}", r.mutation_id));
                            continue;
                        };
                        match (r.status, r.version) {
                            (MutationStatus::Applied, Some(v)) => {
                                committed
                                    .entry((m.collection.clone(), self.plant.clone()))
                                    .or_default()
                                    .insert(v);
                                if k >= acked {
                                    st.ack_latency.record(at.elapsed());
                                }
                            }
                            // Refused by the collection's conflict policy: decided, once.
                            (MutationStatus::Rejected, _)
                                if r.code == Some(ErrorCode::Conflict.code()) =>
                            {
                                if k >= acked {
                                    st.refused += 1;
                                    st.ack_latency.record(at.elapsed());
                                }
                            }
                            _ => st
                                .failures
                                .push(format!("edit {} not applied: {r:?}", r.mutation_id)),
                        }
                        acked = acked.max(k + 1);
                    }
                }
                Frame::Pong(p) if barrier.is_some() && Some(p.nonce) == barrier => {
                    let h = barrier.unwrap_or(0);
                    if p.head.unwrap_or(0) >= h && st.subs.values().all(|s| s.synced) {
                        return Ok(st);
                    }
                    // Not there yet (still catching up): ask again.
                    if let Some(c) = conn.as_mut() {
                        c.send(&Frame::Ping(Ping { nonce: h })).await?;
                    }
                }
                Frame::Error(e) => st
                    .failures
                    .push(format!("server error {} {}", e.name, e.message)),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::check_stream;

    #[test]
    fn a_stream_must_be_a_complete_suffix_of_the_commits() {
        let all = [3, 5, 8, 13, 21];
        assert_eq!(check_stream(&all, &[8, 13, 21], 8), None);
        assert_eq!(check_stream(&all, &[], 21), None);
        assert!(
            check_stream(&all, &[8, 21], 8)
                .unwrap()
                .contains("1 missing")
        );
        assert!(check_stream(&all, &[8, 13, 13, 21], 8).is_some());
        assert!(
            check_stream(&all, &[9, 13, 21], 8)
                .unwrap()
                .contains("never committed")
        );
        // Live from 8, but 13 and 21 never came.
        assert!(
            check_stream(&all, &[8], 8).unwrap().contains("1 missing")
                || check_stream(&all, &[8], 8).is_some()
        );
        assert!(
            check_stream(&all, &[], 8)
                .unwrap()
                .contains("received nothing")
        );
        // A suffix that starts before the live point is fine (catch-up after the snapshot).
        assert_eq!(check_stream(&all, &[5, 8, 13, 21], 13), None);
    }
}
