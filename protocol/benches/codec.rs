//! Codec and fan-out micro-benchmarks.
//!
//! - `encode_push` / `decode_push`: a 100-mutation batch, the ingest path.
//! - `decode_changes`: what a client does per received frame.
//! - `fanout_*`: one committed change delivered to 1,000 subscribers — encoding the change once
//!   and splicing it into each subscriber's frame (`encode_changes_frame`, what the gateway
//!   does) against encoding a whole `Changes` frame per subscriber.
//!
//! - `compress_snapshot_1000` / `inflate_snapshot_1000`: a 1,000-document snapshot page
//!   (~110 KB) deflated at levels 1 and 6 (what the gateway's writer does per large frame on
//!   a session that negotiated compression) and inflated (what a client does).
//!
//! `cargo bench -p syncgate-protocol --bench codec`
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    reason = "a test fails by panicking"
)]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use syncgate_protocol::codec::{decode, encode, encode_change, encode_changes_frame};
use syncgate_protocol::{
    Body, Change, ChangeOp, Changes, Cursor, Frame, Mutation, MutationOp, Push, Value,
};

fn body(i: u64) -> Body {
    [
        ("plant".to_owned(), Value::from("p1")),
        ("line".to_owned(), Value::from(i % 8)),
        ("status".to_owned(), Value::from("in_progress")),
        ("qty_planned".to_owned(), Value::from(400u64)),
        ("qty_done".to_owned(), Value::from(i)),
        ("note".to_owned(), Value::from("checked by operator, ok")),
    ]
    .into()
}

fn push(n: u64) -> Frame {
    Frame::Push(Push {
        batch: 1,
        mutations: (0..n)
            .map(|i| Mutation {
                mutation_id: i + 1,
                collection: "work_orders".into(),
                id: format!("wo-{i}"),
                op: MutationOp::Put,
                body: Some(body(i)),
                base_version: Some(i),
                resolves: None,
            })
            .collect(),
    })
}

fn change(seq: u64) -> Change {
    Change {
        seq,
        collection: "work_orders".into(),
        id: format!("wo-{seq}"),
        op: ChangeOp::Upsert,
        body: Some(body(seq)),
    }
}

fn cursor(seq: u64) -> Cursor {
    Cursor {
        epoch: "4f3c2a1b0e9d8c7b".into(),
        seq,
    }
}

fn codec(c: &mut Criterion) {
    let p = push(100);
    let bytes = encode(&p);
    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Elements(100));
    g.bench_function("encode_push_100", |b| b.iter(|| encode(black_box(&p))));
    g.bench_function("decode_push_100", |b| {
        b.iter(|| decode(black_box(&bytes)).unwrap())
    });
    let changes = encode(&Frame::Changes(Changes {
        sub: 1,
        changes: (1..=100).map(change).collect(),
        cursor: cursor(100),
    }));
    g.bench_function("decode_changes_100", |b| {
        b.iter(|| decode(black_box(&changes)).unwrap())
    });
    g.finish();
}

fn fanout(c: &mut Criterion) {
    const SUBSCRIBERS: u64 = 1000;
    let ch = change(42);
    let mut g = c.benchmark_group("fanout_1000_subscribers");
    g.throughput(Throughput::Elements(SUBSCRIBERS));
    g.bench_function("encode_once_splice", |b| {
        b.iter(|| {
            let encoded = encode_change(black_box(&ch));
            let cur = cursor(42);
            let mut total = 0;
            for sub in 0..SUBSCRIBERS as u32 {
                total += encode_changes_frame(sub, std::iter::once(&encoded[..]), &cur).len();
            }
            total
        })
    });
    g.bench_function("encode_per_subscriber", |b| {
        b.iter(|| {
            let mut total = 0;
            for sub in 0..SUBSCRIBERS as u32 {
                total += encode(&Frame::Changes(Changes {
                    sub,
                    changes: vec![black_box(&ch).clone()],
                    cursor: cursor(42),
                }))
                .len();
            }
            total
        })
    });
    g.finish();
}

fn compression(c: &mut Criterion) {
    use syncgate_protocol::compress::{Compression, compress, inflate};
    let page = encode(&Frame::Snapshot(syncgate_protocol::Snapshot {
        sub: 1,
        docs: (0..1000)
            .map(|i| syncgate_protocol::Doc {
                id: format!("wo-{i}"),
                body: body(i),
                version: i + 1,
            })
            .collect(),
    }));
    let mut g = c.benchmark_group("compression");
    g.throughput(Throughput::Bytes(page.len() as u64));
    for level in [1, 6] {
        g.bench_function(format!("compress_snapshot_1000_level_{level}"), |b| {
            b.iter(|| compress(black_box(&page), level).unwrap())
        });
    }
    let packed = compress(&page, 6).unwrap();
    let limits = syncgate_protocol::Limits::default();
    g.bench_function("inflate_snapshot_1000", |b| {
        b.iter(|| inflate(black_box(&packed), &limits, Some(Compression::Deflate)).unwrap())
    });
    g.finish();
}

criterion_group!(benches, codec, fanout, compression);
criterion_main!(benches);
