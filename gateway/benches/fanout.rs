//! The hub's fan-out, without sockets: one committed chunk handed to every live subscriber
//! (`publish`, what the log follower does under the publish lock) and then turned into each
//! subscriber's wire frames (`drain`, what every connection's writer does before the socket).
//!
//! - `publish_and_drain/*`: the node's CPU per chunk short of the socket writes.
//! - `publish_only/*`: the time the publish lock is held per chunk (go-live, unsubscribe and
//!   the next chunk wait that long).
//!
//! Cases: 1,000 unfiltered subscribers and one change (P2's shape), the same with 5 changes per
//! chunk, 10,000 subscribers (P3's shape), and 1,000 subscribers spread over 10 filters.
//!
//! `cargo bench -p syncgate-gateway --bench fanout`
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a bench fails by panicking"
)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use syncgate_gateway::bench::FanoutFixture;

/// (name, subscribers, distinct filters, changes per chunk)
const CASES: [(&str, usize, u64, u64); 4] = [
    ("1000_subs_1_change", 1000, 0, 1),
    ("1000_subs_5_changes", 1000, 0, 5),
    ("10000_subs_1_change", 10_000, 0, 1),
    ("1000_subs_10_filters_10_changes", 1000, 10, 10),
];

/// Times `iters` chunks published to `f`, with the writers' drain inside the timing or not.
fn time(f: &mut FanoutFixture, iters: u64, changes: u64, with_drain: bool) -> Duration {
    let mut spent = Duration::ZERO;
    for _ in 0..iters {
        let chunk = f.chunk(changes);
        let t = Instant::now();
        f.publish(&chunk);
        if with_drain {
            black_box(f.drain());
            spent += t.elapsed();
        } else {
            spent += t.elapsed();
            black_box(f.drain());
        }
    }
    spent
}

fn fanout(c: &mut Criterion) {
    for (group, with_drain) in [("publish_and_drain", true), ("publish_only", false)] {
        let mut g = c.benchmark_group(group);
        for (name, subs, views, changes) in CASES {
            let mut f = FanoutFixture::new(subs, views);
            g.throughput(Throughput::Elements(subs as u64));
            g.bench_function(name, |b| {
                b.iter_custom(|iters| time(&mut f, iters, changes, with_drain))
            });
        }
        g.finish();
    }
}

criterion_group!(benches, fanout);
criterion_main!(benches);
