//! The `snapshot` scenario: what a new terminal's first sync costs on the wire. Seeds D
//! ERP-like documents (tagged with the run, ~200 bytes each), then downloads them as a
//! subscription's snapshot twice in one run, once without and once with the negotiated frame
//! compression (PROTOCOL.md §4.8), counting the bytes of every WebSocket message as it
//! arrived. Checks that both downloads hold every document once and are identical.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use syncgate_protocol::codec::decode_message;
use syncgate_protocol::compress::is_compressed;
use syncgate_protocol::{Body, Frame, Limits, Mutation, MutationOp, Push, Subscribe, Value};

use crate::common::{Report, Target, check_ack, left, run_filter, run_id};
use crate::stats::Recorder;

/// Scenario parameters.
#[derive(Debug, Clone)]
pub struct SnapshotConfig {
    /// Where to connect.
    pub target: Target,
    /// The collection written and read.
    pub collection: String,
    /// Documents seeded and downloaded.
    pub docs: u64,
    /// Give up (and fail) after this long.
    pub deadline: Duration,
}

/// A work order as an ERP keeps it: repetitive field names, codes and statuses, a free-text
/// note; about 200 bytes of MessagePack.
pub fn work_order(run: &str, n: u64) -> Body {
    let status = match n % 5 {
        0 => "open",
        1 => "released",
        2 => "in_progress",
        3 => "done",
        _ => "on_hold",
    };
    [
        ("run", Value::from(run)),
        ("number", Value::from(format!("WO-{:07}", n))),
        ("status", Value::from(status)),
        ("plant", Value::from(format!("P{}", n % 3 + 1))),
        ("workcenter", Value::from(format!("WC-{:03}", n % 40))),
        (
            "article",
            Value::from(format!("ART-{:06}", 100_000 + n * 7 % 2_500)),
        ),
        ("quantity", Value::from(n % 97 * 5 + 10)),
        ("qty_done", Value::from(n % 13)),
        ("due", Value::from(format!("2026-12-{:02}", n % 28 + 1))),
        (
            "note",
            Value::from(format!(
                "Check tooling before start; report scrap per shift (batch {}).",
                n % 500
            )),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// One download: bytes and frames as they crossed the wire.
struct Download {
    docs: BTreeMap<String, Body>,
    wire_bytes: u64,
    frame_bytes: u64,
    frames: u64,
    compressed: u64,
    seconds: f64,
}

/// Runs the scenario.
pub async fn run(cfg: &SnapshotConfig) -> anyhow::Result<Report> {
    let run = run_id();
    let end = Instant::now() + cfg.deadline;
    seed_docs(&cfg.target, &cfg.collection, &run, cfg.docs, end).await?;
    let mut failures = Vec::new();
    let plain = download(cfg, &run, false, end).await?;
    let packed = download(cfg, &run, true, end).await?;
    for (name, d) in [("uncompressed", &plain), ("compressed", &packed)] {
        if d.docs.len() as u64 != cfg.docs {
            failures.push(format!(
                "{name}: {} documents, expected {}",
                d.docs.len(),
                cfg.docs
            ));
        }
    }
    if plain.docs != packed.docs {
        failures.push("the two downloads differ".into());
    }
    if packed.compressed == 0 {
        failures.push("the gateway compressed nothing (compression = false?)".into());
    }
    let figures = |d: &Download| {
        serde_json::json!({"wire_bytes": d.wire_bytes, "frame_bytes": d.frame_bytes,
            "frames": d.frames, "compressed_frames": d.compressed, "seconds": d.seconds,
            "bytes_per_doc": d.wire_bytes as f64 / cfg.docs.max(1) as f64})
    };
    Ok(Report::new(
        "snapshot",
        serde_json::json!({"docs": cfg.docs}),
        serde_json::json!({
            "uncompressed": figures(&plain),
            "compressed": figures(&packed),
            "ratio": plain.wire_bytes as f64 / packed.wire_bytes.max(1) as f64,
        }),
        &Recorder::default(),
        failures,
    ))
}

/// Batches of the seed in flight at once per connection (the gateway allows 16 and 4 MiB).
const SEED_INFLIGHT: usize = 4;
/// Connections the seed is spread over (the gateway paces each connection's mutations, by
/// default to 5,000/s).
const SEED_CONNECTIONS: u64 = 8;

/// Writes `docs` documents of the run ([`work_order`], ids `{run}-{n}`) over a few
/// connections in batches as large as the gateway allows, a few in flight on each, every one
/// acknowledged as applied.
pub(crate) async fn seed_docs(
    target: &Target,
    collection: &str,
    run: &str,
    docs: u64,
    end: Instant,
) -> anyhow::Result<()> {
    let share = docs.div_ceil(SEED_CONNECTIONS).max(1);
    let mut tasks = tokio::task::JoinSet::new();
    for (i, from) in (0..docs).step_by(share as usize).enumerate() {
        let (target, collection, run) = (target.clone(), collection.to_owned(), run.to_owned());
        let to = (from + share).min(docs);
        tasks.spawn(async move { seed_range(&target, &collection, &run, i, from..to, end).await });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(())
}

/// One seeding connection: documents `range` of the run.
async fn seed_range(
    target: &Target,
    collection: &str,
    run: &str,
    i: usize,
    range: std::ops::Range<u64>,
    end: Instant,
) -> anyhow::Result<()> {
    let (mut c, welcome) = target
        .connect(i, &format!("lt-snapshot-seed-{run}-{i}"))
        .await?;
    let batch = u64::from(welcome.limits.max_mutations_per_batch.min(1000));
    let mut mid = welcome.last_applied_mutation;
    let docs = range.end;
    let (mut n, mut batch_id) = (range.start, 0u64);
    let mut inflight: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    while n < docs || !inflight.is_empty() {
        if n < docs && inflight.len() < SEED_INFLIGHT {
            let size = batch.min(docs - n);
            let mutations: Vec<Mutation> = (n..n + size)
                .map(|i| {
                    mid += 1;
                    Mutation {
                        mutation_id: mid,
                        collection: collection.to_owned(),
                        id: format!("{run}-{i}"),
                        op: MutationOp::Put,
                        body: Some(work_order(run, i)),
                        base_version: None,
                        resolves: None,
                    }
                })
                .collect();
            batch_id += 1;
            inflight.insert(batch_id, mutations.iter().map(|m| m.mutation_id).collect());
            c.send(&Frame::Push(Push {
                batch: batch_id,
                mutations,
            }))
            .await?;
            n += size;
            continue;
        }
        match c.recv_timeout(left(end)).await? {
            Frame::PushAck(a) => {
                let Some(ids) = inflight.remove(&a.batch) else {
                    bail!(
                        "seeding: an ack for batch {}, which is not in flight",
                        a.batch
                    );
                };
                check_ack(&ids, &a)?;
            }
            Frame::Error(e) => bail!("seeding: {} {}: {}", e.code, e.name, e.message),
            _ => {}
        }
    }
    c.close().await;
    Ok(())
}

/// Subscribes to the run's documents and reads the snapshot to `synced`.
async fn download(
    cfg: &SnapshotConfig,
    run: &str,
    compression: bool,
    end: Instant,
) -> anyhow::Result<Download> {
    let client_id = format!("lt-snapshot-{run}-{compression}");
    let (mut c, welcome) = cfg
        .target
        .connect_offering(0, &client_id, compression)
        .await?;
    if compression && welcome.compression.is_none() {
        bail!("the gateway did not agree to compression (compression = false in its config?)");
    }
    let started = Instant::now();
    c.send(&Frame::Subscribe(Subscribe {
        sub: 1,
        collection: cfg.collection.clone(),
        filter: run_filter(run),
        cursor: None,
    }))
    .await?;
    let limits = Limits {
        max_frame_bytes: 64 << 20,
        ..Limits::default()
    };
    let mut d = Download {
        docs: BTreeMap::new(),
        wire_bytes: 0,
        frame_bytes: 0,
        frames: 0,
        compressed: 0,
        seconds: 0.0,
    };
    loop {
        let raw = c
            .recv_raw(left(end))
            .await
            .context("reading the snapshot")?;
        d.wire_bytes += raw.len() as u64;
        d.frames += 1;
        d.compressed += u64::from(is_compressed(&raw));
        let inner = syncgate_protocol::compress::inflate(&raw, &limits, c.compression())?;
        d.frame_bytes += inner.len() as u64;
        match decode_message(&inner, &limits, None)? {
            Frame::Snapshot(s) => {
                for doc in s.docs {
                    if d.docs.insert(doc.id.clone(), doc.body).is_some() {
                        bail!("document {} twice in the snapshot", doc.id);
                    }
                }
            }
            Frame::Synced(_) => break,
            Frame::Error(e) => bail!("subscribe: {} {}: {}", e.code, e.name, e.message),
            _ => {}
        }
    }
    d.seconds = started.elapsed().as_secs_f64();
    c.close().await;
    Ok(d)
}
