//! The SDK store's apply path: what a client does per received snapshot or changes frame.
//!
//! - `apply_snapshot_500_new`: a 500-document snapshot frame of documents the replica does not
//!   hold yet (a first sync), ~200-byte ERP bodies, one transaction.
//! - `apply_changes_100_held`: a 100-change frame updating documents the replica holds, with
//!   its cursor, one transaction.
//!
//! Both commit with the store's own settings (WAL, `synchronous = FULL`), so the fsync per
//! frame is part of the figure, as it is in a client.
//!
//! `cargo bench -p syncgate-client --bench store`
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    reason = "a bench fails by panicking"
)]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use syncgate_client::store::LocalStore;
use syncgate_protocol::{Body, Change, ChangeOp, Cursor, Doc, Value};

fn body(n: u64) -> Body {
    [
        ("number", Value::from(format!("WO-{n:07}"))),
        ("status", Value::from("in_progress")),
        ("plant", Value::from(format!("P{}", n % 3 + 1))),
        ("workcenter", Value::from(format!("WC-{:03}", n % 40))),
        (
            "article",
            Value::from(format!("ART-{:06}", 100_000 + n % 2_500)),
        ),
        ("quantity", Value::from(n % 97 * 5 + 10)),
        ("due", Value::from(format!("2026-12-{:02}", n % 28 + 1))),
        (
            "note",
            Value::from("Check tooling before start; report scrap per shift."),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

fn store_benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = rt.block_on(async {
        let s = LocalStore::open(dir.path()).await.unwrap();
        s.set_subscriptions(&[("c".into(), Body::new())])
            .await
            .unwrap();
        s
    });
    let mut next = 0u64;
    let mut group = c.benchmark_group("store");
    group.throughput(Throughput::Elements(500));
    group.bench_function("apply_snapshot_500_new", |b| {
        b.iter(|| {
            let docs: Vec<Doc> = (next..next + 500)
                .map(|n| Doc {
                    id: format!("wo-{n}"),
                    body: body(n),
                    version: n + 1,
                })
                .collect();
            next += 500;
            rt.block_on(store.apply_snapshot("c", black_box(&docs)))
                .unwrap()
        })
    });
    // Updates of the first 1,000 documents written above, at ever newer versions.
    let mut seq = next + 1;
    group.throughput(Throughput::Elements(100));
    group.bench_function("apply_changes_100_held", |b| {
        b.iter(|| {
            let changes: Vec<Change> = (0..100)
                .map(|_| {
                    seq += 1;
                    Change {
                        seq,
                        collection: "c".into(),
                        id: format!("wo-{}", seq % 1_000),
                        op: ChangeOp::Upsert,
                        body: Some(body(seq)),
                    }
                })
                .collect();
            let cursor = Cursor {
                epoch: "e".into(),
                seq,
            };
            rt.block_on(store.apply_changes("c", black_box(&changes), &cursor))
                .unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, store_benches);
criterion_main!(benches);
