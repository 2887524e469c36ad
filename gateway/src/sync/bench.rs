//! A fan-out fixture for the criterion benches (`gateway/benches/fanout.rs`); not an API.
//!
//! It drives the real `Hub` and `Outbound` queues without sockets: `publish` hands one
//! committed chunk to every live subscriber (what the log follower does, under the publish
//! lock), `drain` does what each connection's writer does with what it took off its queue up
//! to the socket (a frame's wire bytes), so a bench of both is the node's CPU per delivery
//! short of the write itself.

use std::sync::Arc;

use syncgate_protocol::{Body, Change, ChangeOp, Filter, Value};

use crate::changes::LogEntry;
use crate::metrics::Metrics;
use crate::outbound::{Batch, Outbound};
use crate::sync::frames::View;
use crate::sync::hub::{Hub, SubEntry};

/// A committed chunk, ready to publish.
pub struct Chunk {
    from: u64,
    to: u64,
    entries: Vec<Arc<LogEntry>>,
}

/// Live subscribers of one collection and a writer-less queue each.
pub struct FanoutFixture {
    hub: Hub,
    /// Each subscriber's queue and its writer's batch.
    outs: Vec<(Arc<Outbound>, Batch)>,
    /// How many distinct filters the subscribers use (0: none filters).
    views: u64,
    head: u64,
}

impl FanoutFixture {
    /// `subscribers` live subscribers of collection `c`; with `views > 0` subscriber `i`
    /// filters on `line == i % views`, otherwise none filters.
    pub fn new(subscribers: usize, views: u64) -> FanoutFixture {
        let metrics = Metrics::new();
        let hub = Hub::new(0, "bench-epoch".into(), metrics.clone(), 64 * 1024, 0);
        let mut outs = Vec::with_capacity(subscribers);
        for i in 0..subscribers {
            let out = Arc::new(Outbound::new(1 << 30, metrics.outbound_bytes.clone()));
            let filter = match views {
                0 => Body::new(),
                v => [("line".to_owned(), Value::from(i as u64 % v))].into(),
            };
            let view = View::new(Filter::new(&filter).unwrap_or_default(), None);
            let entry = Arc::new(SubEntry::new(out.clone(), 1, "c".into(), view));
            hub.register(entry.clone());
            hub.try_go_live(&entry, 0, false);
            outs.push((out, Batch::default()));
        }
        FanoutFixture {
            hub,
            outs,
            views,
            head: 0,
        }
    }

    /// The next chunk of `changes` new changes (~200-byte work orders, lines in turn),
    /// encoded as ingest hands it over.
    pub fn chunk(&self, changes: u64) -> Chunk {
        let from = self.head;
        let entries: Vec<Arc<LogEntry>> = (from + 1..=from + changes)
            .map(|seq| {
                let body: Body = [
                    ("plant".to_owned(), Value::from("p1")),
                    ("line".to_owned(), Value::from(seq % self.views.max(1))),
                    ("status".to_owned(), Value::from("in_progress")),
                    ("qty_planned".to_owned(), Value::from(400u64)),
                    ("qty_done".to_owned(), Value::from(seq)),
                    ("note".to_owned(), Value::from("checked by operator, ok")),
                ]
                .into();
                Arc::new(LogEntry::new(
                    Change {
                        seq,
                        collection: "c".into(),
                        id: format!("wo-{seq}"),
                        op: ChangeOp::Upsert,
                        body: Some(body),
                    },
                    None,
                ))
            })
            .collect();
        Chunk {
            from,
            to: from + changes,
            entries,
        }
    }

    /// Publishes `chunk` (made by [`FanoutFixture::chunk`] since the last publish).
    pub fn publish(&mut self, chunk: &Chunk) {
        assert!(self.hub.publish(chunk.from, chunk.to, &chunk.entries));
        self.head = chunk.to;
    }

    /// What the writers do with everything queued: each frame's wire bytes. Returns the total
    /// bytes (so nothing is optimised away).
    pub fn drain(&mut self) -> usize {
        let mut total = 0;
        for (out, batch) in &mut self.outs {
            for frame in out.take_wire_into(batch) {
                total += frame.len();
            }
        }
        total
    }
}
