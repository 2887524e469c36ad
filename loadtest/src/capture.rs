//! The `capture` scenario: ERP sessions write a captured PostgreSQL table with plain SQL while
//! terminals subscribe to its collection.
//!
//! The harness creates the table (`id text PRIMARY KEY, run, writer, n, t, pad`) if it does
//! not exist and attaches it with `syncgate capture attach` if it is not attached (and
//! detaches and drops what it created at the end). It refuses to attach a collection that
//! holds documents: attaching makes the collection mirror the table, which deletes them.
//!
//! Each SQL session `w` runs its statements one transaction each, at a paced rate; statement
//! `n` works on row `j = n / 3` of the session: `n % 3 == 0` inserts `"{run}-{w}-{j}"`,
//! `1` updates it, `2` deletes it when `j` is odd and updates it again otherwise. Every
//! statement is one change, and a session's statements commit one after the other, so every
//! subscriber (filter `run = <this run>`) must receive exactly `0..statements` of every
//! session in increasing order (a delete is known by its id: `n = 3j + 2`). At the end each
//! subscriber's documents must equal the table's rows of the run, and so must a fresh
//! subscriber's snapshot.
//!
//! The latency is SQL write→terminal: from just before the statement is sent to PostgreSQL
//! (commit, trigger, notify, the gateway's read of the log, fan-out) to its delivery.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use sea_orm::sqlx::{self, AssertSqlSafe, Connection, PgConnection};
use syncgate_client::{ConnError, Connection as WsConnection};
use syncgate_protocol::{Body, Change, ChangeOp, Frame, Ping, Subscribe, Value};

use crate::common::{Report, Target, left, now_ns, open_subscribers, run_filter, run_id};
use crate::fanout::{Sweep, check_sequences};
use crate::progress::Progress;
use crate::stats::Recorder;

/// Scenario parameters.
#[derive(Debug, Clone)]
pub struct CaptureConfig {
    /// Where terminals connect.
    pub target: Target,
    /// The collection the table is attached to (declared in the gateway's configuration).
    pub collection: String,
    /// The gateway's PostgreSQL database, where the table lives.
    pub database: String,
    /// The table (`name` or `schema.name`).
    pub table: String,
    /// How to run `syncgate capture attach|detach|list`.
    pub syncgate: SyncgateCommand,
    /// Concurrent SQL sessions.
    pub sessions: usize,
    /// Statements (transactions) per session.
    pub statements_per_session: u64,
    /// Target statements per second per session.
    pub rate_per_session: u64,
    /// Subscribed terminals.
    pub subscribers: usize,
    /// Padding bytes per row.
    pub pad: usize,
    /// Give up (and fail) after this long.
    pub deadline: Duration,
}

/// The `syncgate` binary and the global arguments (`--config`, `--database`) that make it
/// act on the gateway's database and configuration.
#[derive(Debug, Clone)]
pub struct SyncgateCommand {
    /// The binary.
    pub bin: PathBuf,
    /// Arguments before the subcommand.
    pub args: Vec<String>,
}

impl SyncgateCommand {
    async fn run(&self, sub: &[&str]) -> anyhow::Result<String> {
        let out = tokio::process::Command::new(&self.bin)
            .args(&self.args)
            .args(sub)
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .with_context(|| format!("running {} {}", self.bin.display(), sub.join(" ")))?;
        if !out.status.success() {
            bail!(
                "{} {} failed ({}): {}",
                self.bin.display(),
                sub.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8(out.stdout)?)
    }
}

/// The row a statement works on and what it does: `(j, op)`.
fn statement(n: u64) -> (u64, Op) {
    let j = n / 3;
    let op = match n % 3 {
        0 => Op::Insert,
        1 => Op::Update,
        _ if j % 2 == 1 => Op::Delete,
        _ => Op::Update,
    };
    (j, op)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Insert,
    Update,
    Delete,
}

/// `(session, n)` of a change of this run: from the body, or for a delete from the id.
fn identify(run: &str, change: &Change) -> Option<(usize, u64)> {
    if let Some(b) = &change.body {
        return Some((b.get("writer")?.as_u64()? as usize, b.get("n")?.as_u64()?));
    }
    let rest = change.id.strip_prefix(run)?.strip_prefix('-')?;
    let (w, j) = rest.split_once('-')?;
    Some((w.parse().ok()?, j.parse::<u64>().ok()? * 3 + 2))
}

/// What the harness set up, to undo at the end.
struct Setup {
    /// The table as PostgreSQL names it (`to_regclass(..)::text`).
    regclass: String,
    created_table: bool,
    attached: bool,
}

/// Only plain (optionally schema-qualified) identifiers: the name goes into SQL text.
fn check_table_name(table: &str) -> anyhow::Result<()> {
    let ok = !table.is_empty()
        && table.split('.').count() <= 2
        && table.split('.').all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        });
    if !ok {
        bail!("--table {table:?}: use lowercase letters, digits and _ (schema.table allowed)");
    }
    Ok(())
}

async fn prepare(cfg: &CaptureConfig, db: &mut PgConnection) -> anyhow::Result<Setup> {
    check_table_name(&cfg.table)?;
    let found: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
        .bind(&cfg.table)
        .fetch_one(&mut *db)
        .await?;
    let created_table = found.is_none();
    if created_table {
        // The name was checked to be a plain identifier (check_table_name).
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE {} (id text PRIMARY KEY, run text NOT NULL, writer integer NOT NULL, \
             n bigint NOT NULL, t bigint NOT NULL, pad text)",
            cfg.table
        )))
        .execute(&mut *db)
        .await
        .with_context(|| format!("creating {}", cfg.table))?;
    }
    let regclass: String = sqlx::query_scalar("SELECT to_regclass($1)::text")
        .bind(&cfg.table)
        .fetch_one(&mut *db)
        .await?;
    let listed: serde_json::Value =
        serde_json::from_str(&cfg.syncgate.run(&["capture", "list", "--json"]).await?)
            .context("reading `capture list --json`")?;
    let captures = listed.as_array().cloned().unwrap_or_default();
    let field =
        |c: &serde_json::Value, k: &str| c.get(k).and_then(|v| v.as_str()).map(str::to_owned);
    let ours = captures
        .iter()
        .find(|c| field(c, "table").as_deref() == Some(regclass.as_str()));
    let attached = match ours {
        Some(c) if field(c, "collection").as_deref() == Some(cfg.collection.as_str()) => false,
        Some(c) => bail!(
            "{regclass} is attached to {:?}, not to {:?}",
            field(c, "collection").unwrap_or_default(),
            cfg.collection
        ),
        None => {
            let docs: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM sg_documents WHERE collection = $1 AND deleted = 0",
            )
            .bind(&cfg.collection)
            .fetch_one(&mut *db)
            .await
            .context("counting the collection's documents")?;
            if docs > 0 {
                bail!(
                    "collection {:?} holds {docs} documents; attaching {regclass} would make it \
                     mirror the table and delete them: use an empty collection declared for the \
                     test (--collection)",
                    cfg.collection
                );
            }
            cfg.syncgate
                .run(&[
                    "capture",
                    "attach",
                    "--table",
                    &regclass,
                    "--collection",
                    &cfg.collection,
                    "--key",
                    "id",
                ])
                .await?;
            true
        }
    };
    Ok(Setup {
        regclass,
        created_table,
        attached,
    })
}

async fn undo(cfg: &CaptureConfig, db: &mut PgConnection, setup: &Setup) -> anyhow::Result<()> {
    if setup.attached {
        cfg.syncgate
            .run(&["capture", "detach", "--table", &setup.regclass])
            .await?;
    }
    if setup.created_table {
        sqlx::query(AssertSqlSafe(format!("DROP TABLE {}", cfg.table)))
            .execute(&mut *db)
            .await?;
    }
    Ok(())
}

/// Runs the scenario.
pub async fn run(cfg: &CaptureConfig) -> anyhow::Result<Report> {
    let mut db = PgConnection::connect(&cfg.database)
        .await
        .with_context(|| format!("connecting to {}", cfg.database))?;
    let setup = prepare(cfg, &mut db).await?;
    let result = measure(cfg, &mut db).await;
    let undone = undo(cfg, &mut db, &setup).await;
    let _ = db.close().await;
    let mut report = result?;
    undone.context("detaching and dropping what the run set up")?;
    if let Some(f) = report.figures.as_object_mut() {
        f.insert("harness_attached".into(), setup.attached.into());
        f.insert("harness_created_table".into(), setup.created_table.into());
    }
    Ok(report)
}

async fn measure(cfg: &CaptureConfig, db: &mut PgConnection) -> anyhow::Result<Report> {
    let run = run_id();
    let end = Instant::now() + cfg.deadline;
    let filter = run_filter(&run);
    let setup = Progress::new("subscribing", cfg.subscribers as u64);
    let subs = open_subscribers(
        &cfg.target,
        &cfg.collection,
        &filter,
        &format!("lt-capture-{run}"),
        0,
        cfg.subscribers,
        end,
    )
    .await?;
    setup.finish();
    let per = cfg.statements_per_session;
    let total = cfg.sessions as u64 * per;
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..total).map(|_| AtomicU64::new(0)).collect());
    let sweep = Arc::new(Sweep::new(cfg.sessions, per));
    let progress = Progress::new("deliveries", total * cfg.subscribers as u64);
    let started = Instant::now();
    let sub_tasks: Vec<_> = subs
        .into_iter()
        .map(|(c, _)| {
            let (sweep, progress, sent, run) =
                (sweep.clone(), progress.clone(), sent.clone(), run.clone());
            tokio::spawn(async move {
                let mut c = c;
                let mut t = Terminal::new(run, per, sent);
                let err = t.receive(&mut c, total, end, &sweep, &progress).await;
                c.close().await;
                (t, err)
            })
        })
        .collect();
    let sessions: Vec<_> = (0..cfg.sessions)
        .map(|w| {
            let session = Session {
                database: cfg.database.clone(),
                table: cfg.table.clone(),
                run: run.clone(),
                writer: w,
                count: per,
                rate: cfg.rate_per_session,
                pad: cfg.pad,
                sent: sent.clone(),
                end,
            };
            tokio::spawn(session.write())
        })
        .collect();
    let mut failures = Vec::new();
    let mut committed = 0u64;
    let mut commit = Recorder::default();
    for (w, t) in sessions.into_iter().enumerate() {
        match t.await.context("SQL session task")? {
            Ok((n, rec)) => {
                committed += n;
                commit.merge(&rec);
            }
            Err(e) => failures.push(format!("SQL session {w}: {e:#}")),
        }
    }
    let write_secs = started.elapsed().as_secs_f64();
    let rows: BTreeMap<String, u64> = sqlx::query_as::<_, (String, i64)>(AssertSqlSafe(format!(
        "SELECT id, n FROM {} WHERE run = $1",
        cfg.table
    )))
    .bind(&run)
    .fetch_all(&mut *db)
    .await?
    .into_iter()
    .map(|(id, n)| (id, n as u64))
    .collect();
    let mut latencies = Recorder::default();
    let mut deliveries = 0u64;
    let mut converged = 0usize;
    for (i, t) in sub_tasks.into_iter().enumerate() {
        let (term, err) = t.await.context("terminal task")?;
        let who = format!("terminal {i}");
        deliveries += term.count;
        latencies.merge(&term.latency);
        failures.extend(check_sequences(&who, &term.seen, cfg.sessions, per));
        failures.extend(err.map(|e| format!("{who}: {e}")));
        if term.docs == rows {
            converged += 1;
        } else {
            failures.push(format!(
                "{who}: holds {} documents of the run, the table {} rows (or other versions)",
                term.docs.len(),
                rows.len()
            ));
        }
    }
    progress.finish();
    let elapsed = started.elapsed().as_secs_f64();
    // A terminal that arrives afterwards downloads the same state.
    let (mut fresh, _) = cfg
        .target
        .connect(cfg.subscribers, &format!("lt-capture-{run}-fresh"))
        .await?;
    let snapshot = snapshot(&mut fresh, &cfg.collection, &filter, end).await?;
    fresh.close().await;
    if snapshot != rows {
        failures.push(format!(
            "a fresh subscriber's snapshot holds {} documents, the table {} rows (or other \
             versions)",
            snapshot.len(),
            rows.len()
        ));
    }
    Ok(Report::new(
        "capture",
        serde_json::json!({"sessions": cfg.sessions, "statements_per_session": per,
            "rate_per_session": cfg.rate_per_session, "subscribers": cfg.subscribers,
            "pad": cfg.pad, "table": cfg.table, "collection": cfg.collection}),
        serde_json::json!({"statements_committed": committed,
            "statements_per_sec": committed as f64 / write_secs.max(1e-9),
            "sql_commit_ms": commit.summary(),
            "deliveries": deliveries,
            "deliveries_per_sec": deliveries as f64 / elapsed.max(1e-9),
            "last_delivery_ms": sweep.recorder().summary(),
            "rows_at_end": rows.len(),
            "terminals_converged": converged,
            "fresh_snapshot_docs": snapshot.len()}),
        &latencies,
        failures,
    ))
}

/// One ERP session: its statements, paced, one transaction each.
struct Session {
    database: String,
    table: String,
    run: String,
    writer: usize,
    count: u64,
    rate: u64,
    pad: usize,
    sent: Arc<Vec<AtomicU64>>,
    end: Instant,
}

impl Session {
    /// Returns the statements committed and their round trips.
    async fn write(self) -> anyhow::Result<(u64, Recorder)> {
        let mut conn = PgConnection::connect(&self.database).await?;
        let t = &self.table;
        // The table name was checked to be a plain identifier (check_table_name).
        let insert: Arc<str> = Arc::from(
            format!("INSERT INTO {t} (id, run, writer, n, t, pad) VALUES ($1, $2, $3, $4, $5, $6)")
                .as_str(),
        );
        let update: Arc<str> = Arc::from(format!("UPDATE {t} SET n = $2, t = $3 WHERE id = $1"));
        let delete: Arc<str> = Arc::from(format!("DELETE FROM {t} WHERE id = $1"));
        let pad = "x".repeat(self.pad);
        let mut tick =
            tokio::time::interval(Duration::from_secs_f64(1.0 / self.rate.max(1) as f64));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut rec = Recorder::default();
        let w = self.writer;
        for n in 0..self.count {
            tick.tick().await;
            if Instant::now() >= self.end {
                bail!("deadline passed after {n} statements");
            }
            let (j, op) = statement(n);
            let id = format!("{}-{w}-{j}", self.run);
            let stamp = now_ns();
            if let Some(slot) = self.sent.get(w * self.count as usize + n as usize) {
                slot.store(stamp, Ordering::Relaxed);
            }
            let began = Instant::now();
            let q = match op {
                Op::Insert => sqlx::query(AssertSqlSafe(insert.clone()))
                    .bind(&id)
                    .bind(&self.run)
                    .bind(w as i32)
                    .bind(n as i64)
                    .bind(stamp as i64)
                    .bind(&pad),
                Op::Update => sqlx::query(AssertSqlSafe(update.clone()))
                    .bind(&id)
                    .bind(n as i64)
                    .bind(stamp as i64),
                Op::Delete => sqlx::query(AssertSqlSafe(delete.clone())).bind(&id),
            };
            let done = q
                .execute(&mut conn)
                .await
                .with_context(|| format!("statement {n} ({op:?} {id})"))?;
            if done.rows_affected() != 1 {
                bail!(
                    "statement {n} ({op:?} {id}) touched {} rows",
                    done.rows_affected()
                );
            }
            rec.record(began.elapsed());
        }
        let _ = conn.close().await;
        Ok((self.count, rec))
    }
}

/// One subscribed terminal: per session the `n`s in arrival order, and its documents.
struct Terminal {
    run: String,
    per: u64,
    sent: Arc<Vec<AtomicU64>>,
    seen: BTreeMap<usize, Vec<u64>>,
    docs: BTreeMap<String, u64>,
    latency: Recorder,
    count: u64,
}

impl Terminal {
    fn new(run: String, per: u64, sent: Arc<Vec<AtomicU64>>) -> Terminal {
        Terminal {
            run,
            per,
            sent,
            seen: BTreeMap::new(),
            docs: BTreeMap::new(),
            latency: Recorder::default(),
            count: 0,
        }
    }

    fn absorb(&mut self, changes: &[Change], sweep: &Sweep) {
        let now = now_ns();
        for change in changes {
            let Some((w, n)) = identify(&self.run, change) else {
                continue;
            };
            let sent = self
                .sent
                .get(w * self.per as usize + n as usize)
                .map_or(0, |s| s.load(Ordering::Relaxed));
            if sent > 0 {
                let us = now.saturating_sub(sent) / 1000;
                self.latency.record(Duration::from_micros(us));
                sweep.note(w, n, us.max(1));
            }
            self.seen.entry(w).or_default().push(n);
            match change.op {
                ChangeOp::Upsert => {
                    self.docs.insert(change.id.clone(), n);
                }
                ChangeOp::Delete => {
                    self.docs.remove(&change.id);
                }
            }
            self.count += 1;
        }
    }

    async fn receive(
        &mut self,
        c: &mut WsConnection,
        total: u64,
        end: Instant,
        sweep: &Sweep,
        progress: &Progress,
    ) -> Option<ConnError> {
        let mut ping = tokio::time::interval(Duration::from_secs(5));
        ping.tick().await;
        while self.count < total {
            let frame = tokio::select! {
                f = c.recv_timeout(left(end)) => f,
                _ = ping.tick() => match c.send(&Frame::Ping(Ping { nonce: 0 })).await {
                    Ok(()) => continue,
                    Err(e) => Err(e),
                },
            };
            match frame {
                Ok(Frame::Changes(ch)) => {
                    self.absorb(&ch.changes, sweep);
                    progress.inc(ch.changes.len() as u64);
                }
                Ok(Frame::Error(e)) => return Some(ConnError::Server(e)),
                Ok(_) => {}
                Err(e) => return Some(e),
            }
        }
        None
    }
}

/// A fresh subscription's documents (id → `n`) once it is synced.
async fn snapshot(
    c: &mut WsConnection,
    collection: &str,
    filter: &Body,
    end: Instant,
) -> anyhow::Result<BTreeMap<String, u64>> {
    c.send(&Frame::Subscribe(Subscribe {
        sub: 1,
        collection: collection.to_owned(),
        filter: filter.clone(),
        cursor: None,
    }))
    .await?;
    let n_of = |b: &Body| b.get("n").and_then(Value::as_u64).unwrap_or(u64::MAX);
    let mut docs = BTreeMap::new();
    loop {
        match c.recv_timeout(left(end)).await? {
            Frame::Synced(_) => return Ok(docs),
            Frame::Snapshot(s) => {
                for d in s.docs {
                    docs.insert(d.id, n_of(&d.body));
                }
            }
            Frame::Changes(ch) => {
                for change in ch.changes {
                    match &change.body {
                        Some(b) => docs.insert(change.id, n_of(b)),
                        None => docs.remove(&change.id),
                    };
                }
            }
            Frame::Error(e) => bail!("subscribe failed: {} {}", e.name, e.message),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_cycle_insert_update_then_delete_or_update() {
        let ops: Vec<_> = (0..6).map(statement).collect();
        assert_eq!(
            ops,
            vec![
                (0, Op::Insert),
                (0, Op::Update),
                (0, Op::Update),
                (1, Op::Insert),
                (1, Op::Update),
                (1, Op::Delete),
            ]
        );
    }

    #[test]
    fn a_delete_is_identified_by_its_id() {
        let change = |id: &str, body: Option<Body>| Change {
            seq: 1,
            collection: "c".into(),
            id: id.into(),
            op: if body.is_some() {
                ChangeOp::Upsert
            } else {
                ChangeOp::Delete
            },
            body,
        };
        assert_eq!(identify("ab12", &change("ab12-3-5", None)), Some((3, 17)));
        let body: Body = [
            ("writer".to_owned(), Value::from(2u64)),
            ("n".to_owned(), Value::from(7u64)),
        ]
        .into();
        assert_eq!(
            identify("ab12", &change("ab12-2-2", Some(body))),
            Some((2, 7))
        );
        assert_eq!(identify("ab12", &change("zz-3-5", None)), None);
        assert_eq!(identify("ab12", &change("ab12-x-5", None)), None);
    }

    #[test]
    fn table_names_are_plain_identifiers() {
        assert!(check_table_name("erp.work_orders").is_ok());
        assert!(check_table_name("t1").is_ok());
        for bad in ["", "a.b.c", "a;drop", "A", ".t", "t."] {
            assert!(check_table_name(bad).is_err(), "{bad}");
        }
    }
}
