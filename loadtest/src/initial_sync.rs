//! The `initial-sync` scenario (P9): a new terminal's first sync of a large collection through
//! the real SDK. Seeds D ERP-like documents ([`work_order`], ~200 bytes each), then opens an
//! SDK [`Client`] on an empty data directory subscribed to them and calls `sync_now` until
//! the subscription is `synced` with every document persisted in the client's SQLite
//! replica: once without and once with the negotiated frame compression. Reports per run the
//! seconds, the message bytes received (the SDK's own traffic counter), the replica's size on
//! disk and the harness process's peak RSS while it synced (the harness holds nothing else
//! then); the gateway's peak RSS over the whole run is in the report's `gateway` section.
//!
//! Checks: the replica counts exactly D live documents, and every 1,000th document (and the
//! last) reads back equal to what was written.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use syncgate_client::Client;

use crate::common::{Report, Target, left, run_filter, run_id};
use crate::procfs::Sampler;
use crate::snapshot::{seed_docs, work_order};
use crate::stats::Recorder;

/// Scenario parameters.
#[derive(Debug, Clone)]
pub struct InitialSyncConfig {
    /// Where to connect.
    pub target: Target,
    /// The collection written and read.
    pub collection: String,
    /// Documents seeded and synced.
    pub docs: u64,
    /// Sync without compression first (for the bytes it saves); else only compressed.
    pub both: bool,
    /// Give up (and fail) after this long.
    pub deadline: Duration,
}

/// One client's first sync.
struct Synced {
    compression: bool,
    seconds: f64,
    received_bytes: u64,
    sent_bytes: u64,
    replica_bytes: u64,
    client_rss_start_kib: u64,
    client_rss_max_kib: u64,
    client_cpu_seconds: f64,
}

/// Runs the scenario.
pub async fn run(cfg: &InitialSyncConfig) -> anyhow::Result<Report> {
    let run = run_id();
    let end = Instant::now() + cfg.deadline;
    let seeding = Instant::now();
    seed_docs(&cfg.target, &cfg.collection, &run, cfg.docs, end).await?;
    let seed_seconds = seeding.elapsed().as_secs_f64();
    let mut failures = Vec::new();
    let mut runs = Vec::new();
    let modes: &[bool] = if cfg.both { &[false, true] } else { &[true] };
    for &compression in modes {
        runs.push(sync_once(cfg, &run, compression, end, &mut failures).await?);
    }
    let figures = |s: &Synced| {
        serde_json::json!({
            "seconds": s.seconds,
            "docs_per_second": cfg.docs as f64 / s.seconds.max(1e-9),
            "received_bytes": s.received_bytes,
            "received_bytes_per_doc": s.received_bytes as f64 / cfg.docs.max(1) as f64,
            "sent_bytes": s.sent_bytes,
            "replica_bytes": s.replica_bytes,
            "client_rss_start_kib": s.client_rss_start_kib,
            "client_rss_max_kib": s.client_rss_max_kib,
            "client_cpu_seconds": s.client_cpu_seconds,
        })
    };
    let mut out = serde_json::Map::new();
    out.insert("docs".into(), cfg.docs.into());
    out.insert("seed_seconds".into(), seed_seconds.into());
    for s in &runs {
        let key = if s.compression {
            "compressed"
        } else {
            "uncompressed"
        };
        out.insert(key.into(), figures(s));
    }
    if let [plain, packed] = runs.as_slice() {
        out.insert(
            "wire_ratio".into(),
            (plain.received_bytes as f64 / packed.received_bytes.max(1) as f64).into(),
        );
    }
    Ok(Report::new(
        "initial-sync",
        serde_json::json!({"docs": cfg.docs, "both": cfg.both}),
        out.into(),
        &Recorder::default(),
        failures,
    ))
}

/// A fresh SDK client syncs the run's documents to `synced`; then its replica is checked.
async fn sync_once(
    cfg: &InitialSyncConfig,
    run: &str,
    compression: bool,
    end: Instant,
    failures: &mut Vec<String>,
) -> anyhow::Result<Synced> {
    let dir = std::env::temp_dir().join(format!("syncgate-initial-sync-{run}-{compression}"));
    let _cleanup = RemoveOnDrop(dir.clone());
    let mut builder = Client::builder(cfg.target.url.clone())
        .data_dir(&dir)
        .subscribe(cfg.collection.clone(), run_filter(run))
        .compression(compression);
    if !cfg.target.token.is_empty() {
        builder = builder.token(cfg.target.token.clone());
    }
    let sampler = Sampler::start(std::process::id(), Duration::from_millis(100));
    let started = Instant::now();
    let client = builder.open().await.context("opening the SDK client")?;
    client
        .sync_now(left(end))
        .await
        .with_context(|| format!("the first sync (compression {compression})"))?;
    let seconds = started.elapsed().as_secs_f64();
    let proc = sampler.finish();
    let status = client.status().await?;
    let held = client.count(&cfg.collection).await?;
    let mode = if compression {
        "compressed"
    } else {
        "uncompressed"
    };
    if held != cfg.docs {
        failures.push(format!(
            "{mode}: the replica holds {held} documents, expected {}",
            cfg.docs
        ));
    }
    let mut checked: Vec<u64> = (0..cfg.docs).step_by(1000).collect();
    checked.extend(cfg.docs.checked_sub(1));
    for i in checked {
        let id = format!("{run}-{i}");
        match client.get(&cfg.collection, &id).await? {
            Some(d) if d.body == work_order(run, i) => {}
            Some(_) => failures.push(format!(
                "{mode}: document {id} differs from what was written"
            )),
            None => failures.push(format!("{mode}: document {id} is missing")),
        }
    }
    client.close().await;
    let replica_bytes = dir_bytes(&dir);
    if status.received_bytes == 0 {
        bail!("the SDK counted no bytes received");
    }
    Ok(Synced {
        compression,
        seconds,
        received_bytes: status.received_bytes,
        sent_bytes: status.sent_bytes,
        replica_bytes,
        client_rss_start_kib: proc.rss_start_kib,
        client_rss_max_kib: proc.rss_max_kib,
        client_cpu_seconds: proc.cpu_seconds,
    })
}

/// Bytes of the files directly in `dir` (the replica, its WAL, the lock).
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Removes the client's data directory when the run ends, whichever way.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
