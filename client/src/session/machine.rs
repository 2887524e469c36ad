//! One connection's protocol state machine, without I/O (sans-IO, in quinn's vocabulary).
//!
//! The shell ([`super`]) feeds it what happens — [`Machine::handle_frame`] for a frame from
//! the gateway, [`Machine::handle_timeout`] when [`Machine::poll_timeout`]'s instant has
//! passed, [`Machine::handle_outbox`] with the outbox entries it asked for,
//! [`Machine::set_waiting`] when `sync_now` callers come and go, [`Machine::outbox_changed`]
//! after a local write — and drains what it decided, in this order: [`Machine::poll_work`]
//! (local-store operations and events, in order), [`Machine::poll_transmit`] (frames to send),
//! [`Machine::poll_end`] (the session is over, and why). Time is a parameter, so the tests
//! drive it with virtual instants and no sockets, clock or gateway.
//!
//! The rules it keeps (PROTOCOL.md §3–§4):
//! - subscriptions are sent with their cursors in the order stored; one without a cursor asks
//!   for a snapshot, and its rows are marked stale before anything else happens;
//! - the outbox is uploaded in mutation-id order, at most [`MAX_INFLIGHT`] batches
//!   unacknowledged; acks must come in batch order;
//! - a `sync_now` is answered only when nothing is in flight, every subscription is synced
//!   (or refused) and a `pong` to a `ping` sent after that carries a head at or above every
//!   ack's `visible_at`;
//! - a `ping` goes out every heartbeat; nothing received for `dead_after` ends the session.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use syncgate_protocol::{
    Cursor, Doc, ErrorCode, ErrorFrame, Frame, Mutation, MutationResult, Ping, Pong, Push,
    Subscribe, Welcome,
};

use crate::sdk::Event;
use crate::store::StoredSubscription;

/// Most unacknowledged push batches per connection.
pub(crate) const MAX_INFLIGHT: usize = 4;

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum End {
    /// The client is closing.
    Shutdown,
    /// The server asked us to come back later.
    GoAway {
        reason: String,
        retry_after: Duration,
    },
    /// The token was refused as expired: ask the provider again.
    TokenExpired,
    /// Anything else: back off and retry.
    Lost { reason: String },
    /// Refused for a reason that retrying cannot fix: stop until the application asks again.
    Refused { code: Option<u16>, reason: String },
}

/// A server error code that says the request is wrong as sent: retrying cannot help. Codes
/// this client does not know are treated as retryable (a newer server's transient error).
pub(crate) fn permanent_code(code: u16) -> bool {
    ErrorCode::from_code(code).is_some_and(|c| !c.retryable())
}

/// What the session ends with when the server sends `e` (`None`: it goes on).
pub(crate) fn end_for_error(e: &ErrorFrame) -> Option<End> {
    if e.code == ErrorCode::TokenExpired.code() {
        return Some(End::TokenExpired);
    }
    let described = format!("{} ({}): {}", e.name, e.code, e.message);
    if e.fatal && permanent_code(e.code) {
        return Some(End::Refused {
            code: Some(e.code),
            reason: described,
        });
    }
    if e.fatal {
        return Some(End::Lost {
            reason: format!("server error {described}"),
        });
    }
    if e.batch.is_some() {
        // The batch was not committed: reconnect and upload it again, with every later one.
        return Some(End::Lost {
            reason: format!("push failed: {described}"),
        });
    }
    None
}

/// A local-store operation or an event, for the shell to carry out in order.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Work {
    /// Mark the collection's rows stale before its snapshot (`resync`: the server said the
    /// cursor is unusable).
    BeginSnapshot { collection: String, resync: bool },
    /// Apply a snapshot page.
    ApplySnapshot { collection: String, docs: Vec<Doc> },
    /// Apply changes and store the cursor, in one transaction.
    ApplyChanges {
        collection: String,
        changes: Vec<syncgate_protocol::Change>,
        cursor: Cursor,
    },
    /// The subscription is live at `cursor`: drop stale rows, store the cursor.
    Synced { collection: String, cursor: Cursor },
    /// Record the outcomes of an acknowledged batch.
    Ack { results: Vec<MutationResult> },
    /// Read up to `limit` pending outbox entries (and about `bytes`) with ids above `after`,
    /// and hand them to [`Machine::handle_outbox`].
    ReadOutbox {
        after: u64,
        limit: u32,
        bytes: usize,
    },
    /// Every synced subscription has seen everything up to `cursor`: store it, and answer the
    /// `sync_now` callers whose mutations all have their outcome.
    FinishSync {
        cursor: Cursor,
        collections: Vec<String>,
    },
    /// Tell the application.
    Emit(Event),
}

/// The limits a session runs under.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    /// Mutations per batch.
    pub(crate) batch_size: u32,
    /// About this many bytes of mutations per batch.
    pub(crate) batch_bytes: usize,
    /// A `ping` this often.
    pub(crate) heartbeat: Duration,
    /// Nothing received for this long: the connection is dead.
    pub(crate) dead_after: Duration,
}

impl Limits {
    /// The client's settings narrowed by what the server announced in `welcome`.
    pub(crate) fn negotiate(
        batch_size: u32,
        heartbeat: Duration,
        dead_after: Duration,
        welcome: &Welcome,
    ) -> Limits {
        Limits {
            batch_size: batch_size
                .min(welcome.limits.max_mutations_per_batch)
                .max(1),
            // Half the frame limit leaves room for the framing around the mutations.
            batch_bytes: welcome.limits.max_frame_bytes as usize / 2,
            heartbeat: heartbeat.min(Duration::from_millis(u64::from(
                welcome.heartbeat_ms.max(10),
            ))),
            dead_after,
        }
    }
}

/// One connection's protocol state.
#[derive(Debug)]
pub(crate) struct Machine {
    limits: Limits,
    epoch: String,
    /// Subscription id → collection.
    subs: HashMap<u32, String>,
    /// Subscriptions that are live.
    synced: HashSet<u32>,
    /// Subscriptions the server refused (final for the session).
    refused: HashSet<u32>,
    /// Unacknowledged batches: (batch id, its last mutation id, its number of mutations).
    inflight: VecDeque<(u64, u64, usize)>,
    /// After `batch_output_too_large`: the batch size the next session should use.
    batch_hint: Option<u32>,
    /// The highest mutation id sent on this connection.
    sent_upto: u64,
    next_batch: u64,
    /// An outbox read is outstanding.
    reading: bool,
    /// The last read found nothing after `sent_upto`; no read until a local write.
    drained: bool,
    /// The highest `visible_at` of this session's acks.
    max_visible: u64,
    /// The `ping` that closes a `sync_now`: (nonce, the head it must reach).
    barrier: Option<(u64, u64)>,
    nonce: u64,
    /// Someone waits for a `sync_now`.
    waiting: bool,
    last_recv: Instant,
    next_ping: Instant,
    work: VecDeque<Work>,
    transmit: VecDeque<Frame>,
    /// Why the session ended, until the shell takes it.
    end: Option<End>,
    /// The session has ended: no more frames, timeouts or work.
    closed: bool,
}

impl Machine {
    /// A session that has just been welcomed, with the subscriptions to resume.
    pub(crate) fn new(
        welcome: &Welcome,
        subscriptions: Vec<StoredSubscription>,
        limits: Limits,
        now: Instant,
    ) -> Machine {
        let mut m = Machine {
            next_ping: now + limits.heartbeat,
            limits,
            epoch: welcome.epoch.clone(),
            subs: HashMap::new(),
            synced: HashSet::new(),
            refused: HashSet::new(),
            inflight: VecDeque::new(),
            batch_hint: None,
            sent_upto: 0,
            next_batch: 1,
            reading: false,
            drained: false,
            max_visible: 0,
            barrier: None,
            nonce: 0,
            waiting: false,
            last_recv: now,
            work: VecDeque::new(),
            transmit: VecDeque::new(),
            end: None,
            closed: false,
        };
        for (id, sub) in (1u32..).zip(subscriptions) {
            if sub.cursor.is_none() {
                m.work.push_back(Work::BeginSnapshot {
                    collection: sub.collection.clone(),
                    resync: false,
                });
            }
            m.transmit.push_back(Frame::Subscribe(Subscribe {
                sub: id,
                collection: sub.collection.clone(),
                filter: sub.filter,
                cursor: sub.cursor,
            }));
            m.subs.insert(id, sub.collection);
        }
        m.step();
        m
    }

    /// A frame from the gateway.
    pub(crate) fn handle_frame(&mut self, frame: Frame, now: Instant) {
        if self.closed {
            return;
        }
        self.last_recv = now;
        if let Err(end) = self.frame(frame) {
            self.finish(end);
        }
        self.step();
    }

    /// Time has reached [`Machine::poll_timeout`]'s instant (or later).
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        if self.closed || now < self.next_ping {
            return;
        }
        let silent = now.saturating_duration_since(self.last_recv);
        if silent >= self.limits.dead_after {
            self.finish(End::Lost {
                reason: format!("nothing received for {silent:?}: connection presumed dead"),
            });
            return;
        }
        // Nonce 0 is never a barrier's.
        self.transmit.push_back(Frame::Ping(Ping { nonce: 0 }));
        while self.next_ping <= now {
            self.next_ping += self.limits.heartbeat;
        }
    }

    /// The outbox entries of the last [`Work::ReadOutbox`], in mutation-id order.
    pub(crate) fn handle_outbox(&mut self, batch: Vec<Mutation>) {
        self.reading = false;
        match batch.last().map(|m| m.mutation_id) {
            None => self.drained = true,
            Some(last) => {
                let id = self.next_batch;
                self.next_batch += 1;
                let count = batch.len();
                self.transmit.push_back(Frame::Push(Push {
                    batch: id,
                    mutations: batch,
                }));
                self.inflight.push_back((id, last, count));
                self.sent_upto = last;
            }
        }
        self.step();
    }

    /// A local write may have added outbox entries.
    pub(crate) fn outbox_changed(&mut self) {
        self.drained = false;
        self.step();
    }

    /// Whether some `sync_now` caller is waiting.
    pub(crate) fn set_waiting(&mut self, waiting: bool) {
        self.waiting = waiting;
        self.step();
    }

    /// When [`Machine::handle_timeout`] must next be called.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        (!self.closed).then_some(self.next_ping)
    }

    /// The next local-store operation or event.
    pub(crate) fn poll_work(&mut self) -> Option<Work> {
        self.work.pop_front()
    }

    /// The next frame to send.
    pub(crate) fn poll_transmit(&mut self) -> Option<Frame> {
        self.transmit.pop_front()
    }

    /// Why the session is over, once it is.
    pub(crate) fn poll_end(&mut self) -> Option<End> {
        self.end.take()
    }

    /// The batch size the next session should use, if the gateway refused a batch of this
    /// one for writing too much (`batch_output_too_large`).
    pub(crate) fn batch_hint(&self) -> Option<u32> {
        self.batch_hint
    }

    fn finish(&mut self, end: End) {
        self.closed = true;
        self.end = Some(end);
    }

    /// Asks for the next outbox batch and for a `sync_now` barrier when their time has come.
    fn step(&mut self) {
        if self.closed {
            return;
        }
        if !self.reading && !self.drained && self.inflight.len() < MAX_INFLIGHT {
            self.reading = true;
            self.work.push_back(Work::ReadOutbox {
                after: self.sent_upto,
                limit: self.limits.batch_size,
                bytes: self.limits.batch_bytes,
            });
        }
        if self.waiting
            && self.barrier.is_none()
            && self.drained
            && !self.reading
            && self.inflight.is_empty()
            && self.synced.len() + self.refused.len() == self.subs.len()
        {
            self.nonce += 1;
            self.barrier = Some((self.nonce, self.max_visible));
            self.transmit
                .push_back(Frame::Ping(Ping { nonce: self.nonce }));
        }
    }

    fn collection(&self, sub: u32) -> Result<String, End> {
        self.subs.get(&sub).cloned().ok_or_else(|| End::Lost {
            reason: format!("protocol violation: the server named unknown subscription {sub}"),
        })
    }

    fn frame(&mut self, frame: Frame) -> Result<(), End> {
        match frame {
            Frame::Snapshot(s) => {
                let collection = self.collection(s.sub)?;
                self.work.push_back(Work::ApplySnapshot {
                    collection,
                    docs: s.docs,
                });
            }
            Frame::Changes(ch) => {
                let collection = self.collection(ch.sub)?;
                self.work.push_back(Work::ApplyChanges {
                    collection,
                    changes: ch.changes,
                    cursor: ch.cursor,
                });
            }
            Frame::Synced(s) => {
                let collection = self.collection(s.sub)?;
                self.synced.insert(s.sub);
                self.work.push_back(Work::Synced {
                    collection: collection.clone(),
                    cursor: s.cursor.clone(),
                });
                self.work.push_back(Work::Emit(Event::Synced {
                    collection,
                    cursor: s.cursor,
                }));
            }
            Frame::Resync(r) => {
                let collection = self.collection(r.sub)?;
                self.synced.remove(&r.sub);
                self.work.push_back(Work::BeginSnapshot {
                    collection: collection.clone(),
                    resync: true,
                });
                self.work.push_back(Work::Emit(Event::Resync {
                    collection,
                    reason: r.reason,
                }));
            }
            Frame::PushAck(ack) => {
                match self.inflight.pop_front() {
                    Some((batch, _, _)) if batch == ack.batch => {}
                    other => {
                        return Err(End::Lost {
                            reason: format!(
                                "protocol violation: ack for batch {} while waiting for {:?}",
                                ack.batch,
                                other.map(|o| o.0)
                            ),
                        });
                    }
                }
                self.max_visible = self.max_visible.max(ack.visible_at);
                self.work.push_back(Work::Ack {
                    results: ack.results,
                });
            }
            Frame::Pong(p) => {
                if let Some((nonce, required)) = self.barrier
                    && p.nonce == nonce
                {
                    self.barrier = None;
                    let head = p.head.unwrap_or(0);
                    if head >= required {
                        let collections = self
                            .subs
                            .iter()
                            .filter(|(id, _)| self.synced.contains(id))
                            .map(|(_, c)| c.clone())
                            .collect();
                        self.work.push_back(Work::FinishSync {
                            cursor: Cursor {
                                epoch: self.epoch.clone(),
                                seq: head,
                            },
                            collections,
                        });
                        // The shell answers who it can and says whether anyone still waits.
                        self.waiting = false;
                    }
                    // Otherwise the node has not published our own writes yet: `step` pings
                    // again.
                }
            }
            Frame::Ping(p) => self.transmit.push_back(Frame::Pong(Pong {
                nonce: p.nonce,
                head: None,
            })),
            Frame::Error(e) => {
                if e.code == ErrorCode::BatchOutputTooLarge.code()
                    && let Some(&(_, _, count)) =
                        self.inflight.iter().find(|(id, _, _)| Some(*id) == e.batch)
                {
                    // The batch writes too much to the log as one: the next session sends
                    // the same mutations in halves (one mutation always fits).
                    self.batch_hint = Some(u32::try_from(count / 2).unwrap_or(u32::MAX).max(1));
                }
                self.work.push_back(Work::Emit(Event::ServerError {
                    code: e.code,
                    name: e.name.clone(),
                    message: e.message.clone(),
                }));
                if let Some(end) = end_for_error(&e) {
                    return Err(end);
                }
                if let Some(sub) = e.sub {
                    // A refused subscription is final for this session; do not wait for it.
                    self.refused.insert(sub);
                }
            }
            // The shell schedules the next `refresh` from it; nothing for the machine.
            Frame::Refreshed(_) => {}
            // The SDK does not unsubscribe on a live session; nothing to release.
            Frame::Unsubscribed(_) => {}
            Frame::GoAway(g) => {
                return Err(End::GoAway {
                    reason: g.reason,
                    retry_after: Duration::from_millis(u64::from(g.retry_after_ms)),
                });
            }
            other => {
                return Err(End::Lost {
                    reason: format!("protocol violation: unexpected {}", other.type_name()),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use syncgate_protocol::{
        Body, GoAway, Limits as ServerLimits, MutationOp, PushAck, Resync, Snapshot, Synced,
    };

    const BEAT: Duration = Duration::from_secs(10);
    const DEAD: Duration = Duration::from_secs(25);

    fn welcome() -> Welcome {
        Welcome {
            version: 1,
            session: "s".into(),
            epoch: "e1".into(),
            last_applied_mutation: 0,
            limits: ServerLimits::default(),
            heartbeat_ms: 15_000,
            upload_only: Vec::new(),
            token_valid_ms: None,
            compression: None,
        }
    }

    fn limits() -> Limits {
        Limits::negotiate(100, BEAT, DEAD, &welcome())
    }

    fn sub(collection: &str, seq: Option<u64>) -> StoredSubscription {
        StoredSubscription {
            collection: collection.into(),
            filter: Body::new(),
            cursor: seq.map(|seq| Cursor {
                epoch: "e1".into(),
                seq,
            }),
        }
    }

    fn mutation(id: u64) -> Mutation {
        Mutation {
            mutation_id: id,
            collection: "orders".into(),
            id: format!("o{id}"),
            op: MutationOp::Delete,
            body: None,
            base_version: None,
            resolves: None,
        }
    }

    fn cursor(seq: u64) -> Cursor {
        Cursor {
            epoch: "e1".into(),
            seq,
        }
    }

    fn works(m: &mut Machine) -> Vec<Work> {
        std::iter::from_fn(|| m.poll_work()).collect()
    }

    fn sent(m: &mut Machine) -> Vec<Frame> {
        std::iter::from_fn(|| m.poll_transmit()).collect()
    }

    /// Answers every outbox read from `outbox` (entries above `after`, at most `limit`) until
    /// the machine stops asking; returns the other work, in order.
    fn serve_outbox(m: &mut Machine, outbox: &[u64]) -> Vec<Work> {
        let mut other = Vec::new();
        while let Some(w) = m.poll_work() {
            match w {
                Work::ReadOutbox { after, limit, .. } => {
                    let batch = outbox
                        .iter()
                        .filter(|id| **id > after)
                        .take(limit as usize)
                        .map(|id| mutation(*id))
                        .collect();
                    m.handle_outbox(batch);
                }
                w => other.push(w),
            }
        }
        other
    }

    fn pushes(frames: &[Frame]) -> Vec<(u64, Vec<u64>)> {
        frames
            .iter()
            .filter_map(|f| match f {
                Frame::Push(p) => {
                    Some((p.batch, p.mutations.iter().map(|m| m.mutation_id).collect()))
                }
                _ => None,
            })
            .collect()
    }

    fn ack(batch: u64, visible_at: u64) -> Frame {
        Frame::PushAck(PushAck {
            batch,
            results: vec![MutationResult::applied(batch, visible_at)],
            visible_at,
        })
    }

    #[test]
    fn resume_sends_cursors_and_marks_snapshot_rows_stale_first() {
        let t0 = Instant::now();
        let mut m = Machine::new(
            &welcome(),
            vec![sub("orders", Some(42)), sub("machines", None)],
            limits(),
            t0,
        );
        let work = works(&mut m);
        assert_eq!(
            work.first(),
            Some(&Work::BeginSnapshot {
                collection: "machines".into(),
                resync: false
            }),
            "stale rows are marked before anything else"
        );
        let subs: Vec<(u32, String, Option<u64>)> = sent(&mut m)
            .into_iter()
            .filter_map(|f| match f {
                Frame::Subscribe(s) => Some((s.sub, s.collection, s.cursor.map(|c| c.seq))),
                _ => None,
            })
            .collect();
        assert_eq!(
            subs,
            vec![(1, "orders".into(), Some(42)), (2, "machines".into(), None)]
        );
    }

    #[test]
    fn the_outbox_goes_up_in_order_with_at_most_four_batches_in_flight() {
        let t0 = Instant::now();
        let small = Limits {
            batch_size: 2,
            ..limits()
        };
        let mut m = Machine::new(&welcome(), vec![], small, t0);
        let outbox: Vec<u64> = (1..=11).collect();
        serve_outbox(&mut m, &outbox);
        let frames = sent(&mut m);
        assert_eq!(
            pushes(&frames),
            vec![
                (1, vec![1, 2]),
                (2, vec![3, 4]),
                (3, vec![5, 6]),
                (4, vec![7, 8])
            ]
        );
        // Each ack frees a slot for the next batch.
        m.handle_frame(ack(1, 1), t0);
        let acks: Vec<Work> = serve_outbox(&mut m, &outbox);
        assert!(matches!(acks.as_slice(), [Work::Ack { .. }]), "{acks:?}");
        assert_eq!(pushes(&sent(&mut m)), vec![(5, vec![9, 10])]);
        // An ack out of order is a protocol violation: the session ends.
        m.handle_frame(ack(3, 3), t0);
        assert!(
            matches!(m.poll_end(), Some(End::Lost { reason }) if reason.contains("ack for batch 3"))
        );
    }

    #[test]
    fn after_a_lost_ack_the_next_session_sends_the_whole_outbox_again() {
        let t0 = Instant::now();
        // Session 1: the batch is sent, the connection dies before its ack.
        let mut m = Machine::new(&welcome(), vec![], limits(), t0);
        serve_outbox(&mut m, &[1, 2, 3]);
        assert_eq!(pushes(&sent(&mut m)), vec![(1, vec![1, 2, 3])]);
        m.handle_timeout(t0 + DEAD + BEAT);
        assert!(matches!(m.poll_end(), Some(End::Lost { .. })));
        // Session 2: the gateway says it applied up to 3; the entries are still pending, so
        // they go up again (the gateway answers with the stored outcomes).
        let mut w = welcome();
        w.last_applied_mutation = 3;
        let mut m = Machine::new(&w, vec![], limits(), t0 + DEAD + BEAT);
        serve_outbox(&mut m, &[1, 2, 3]);
        assert_eq!(pushes(&sent(&mut m)), vec![(1, vec![1, 2, 3])]);
    }

    #[test]
    fn heartbeat_pings_on_time_and_a_silent_connection_ends() {
        let t0 = Instant::now();
        let mut m = Machine::new(&welcome(), vec![], limits(), t0);
        serve_outbox(&mut m, &[]);
        assert_eq!(m.poll_timeout(), Some(t0 + BEAT));
        m.handle_timeout(t0 + BEAT - Duration::from_millis(1));
        assert!(sent(&mut m).is_empty(), "nothing before the deadline");
        m.handle_timeout(t0 + BEAT);
        assert_eq!(sent(&mut m), vec![Frame::Ping(Ping { nonce: 0 })]);
        assert_eq!(m.poll_timeout(), Some(t0 + 2 * BEAT));
        // A frame at 15 s keeps it alive at 30 s (15 s of silence) ...
        m.handle_frame(Frame::Ping(Ping { nonce: 9 }), t0 + Duration::from_secs(15));
        m.handle_timeout(t0 + 2 * BEAT + Duration::from_secs(10));
        assert!(m.poll_end().is_none());
        // ... but not at 40 s (25 s of silence).
        m.handle_timeout(t0 + 4 * BEAT);
        assert!(
            matches!(m.poll_end(), Some(End::Lost { reason }) if reason.contains("presumed dead"))
        );
        assert_eq!(m.poll_timeout(), None);
    }

    #[test]
    fn sync_now_waits_for_acks_synced_subscriptions_and_a_pong_at_the_acked_head() {
        let t0 = Instant::now();
        let mut m = Machine::new(&welcome(), vec![sub("orders", Some(0))], limits(), t0);
        serve_outbox(&mut m, &[1]);
        sent(&mut m);
        m.set_waiting(true);
        assert!(
            sent(&mut m).is_empty(),
            "a batch is in flight, the subscription not synced"
        );
        m.handle_frame(ack(1, 7), t0);
        serve_outbox(&mut m, &[1]);
        assert!(
            sent(&mut m).is_empty(),
            "the subscription is not synced yet"
        );
        m.handle_frame(
            Frame::Synced(Synced {
                sub: 1,
                cursor: cursor(5),
            }),
            t0,
        );
        let work = works(&mut m);
        assert!(matches!(
            work.as_slice(),
            [Work::Synced { .. }, Work::Emit(Event::Synced { .. })]
        ));
        assert_eq!(sent(&mut m), vec![Frame::Ping(Ping { nonce: 1 })]);
        // The node has published up to 6 only: not yet our write at 7; ping again.
        m.handle_frame(
            Frame::Pong(Pong {
                nonce: 1,
                head: Some(6),
            }),
            t0,
        );
        assert!(works(&mut m).is_empty());
        assert_eq!(sent(&mut m), vec![Frame::Ping(Ping { nonce: 2 })]);
        // A heartbeat pong (nonce 0) is not the barrier's.
        m.handle_frame(
            Frame::Pong(Pong {
                nonce: 0,
                head: Some(9),
            }),
            t0,
        );
        assert!(works(&mut m).is_empty());
        m.handle_frame(
            Frame::Pong(Pong {
                nonce: 2,
                head: Some(7),
            }),
            t0,
        );
        assert_eq!(
            works(&mut m),
            vec![Work::FinishSync {
                cursor: cursor(7),
                collections: vec!["orders".into()]
            }]
        );
        // The shell answered everyone: no more pings.
        m.set_waiting(false);
        assert!(sent(&mut m).is_empty());
    }

    #[test]
    fn server_errors_end_the_session_as_their_code_says() {
        let t0 = Instant::now();
        let frame = |code: ErrorCode, fatal: bool, batch: Option<u64>, sub: Option<u32>| {
            let mut e = ErrorFrame::new(code, "x", fatal);
            e.batch = batch;
            e.sub = sub;
            Frame::Error(e)
        };
        let end_of = |f: Frame| {
            let mut m = Machine::new(&welcome(), vec![sub("orders", None)], limits(), t0);
            serve_outbox(&mut m, &[]);
            m.handle_frame(f, t0);
            let events = works(&mut m);
            assert!(matches!(
                events.first(),
                Some(Work::Emit(Event::ServerError { .. }))
            ));
            m.poll_end()
        };
        assert_eq!(
            end_of(frame(ErrorCode::TokenExpired, true, None, None)),
            Some(End::TokenExpired)
        );
        assert!(matches!(
            end_of(frame(ErrorCode::Unauthorized, true, None, None)),
            Some(End::Refused {
                code: Some(200),
                ..
            })
        ));
        assert!(matches!(
            end_of(frame(ErrorCode::SlowConsumer, true, None, None)),
            Some(End::Lost { .. })
        ));
        assert!(matches!(
            end_of(frame(ErrorCode::ReplayRequired, false, Some(3), None)),
            Some(End::Lost { reason }) if reason.contains("push failed")
        ));
        assert_eq!(
            end_of(frame(ErrorCode::UnknownCollection, false, None, Some(1))),
            None
        );
    }

    #[test]
    fn a_batch_that_writes_too_much_is_sent_again_in_halves() {
        let t0 = Instant::now();
        let mut m = Machine::new(&welcome(), vec![], limits(), t0);
        serve_outbox(&mut m, &(1..=8).collect::<Vec<_>>());
        assert_eq!(pushes(&sent(&mut m)), vec![(1, (1..=8).collect())]);
        assert_eq!(m.batch_hint(), None);
        let mut e = ErrorFrame::new(ErrorCode::BatchOutputTooLarge, "too much", false);
        e.batch = Some(1);
        m.handle_frame(Frame::Error(e), t0);
        assert!(matches!(m.poll_end(), Some(End::Lost { .. })));
        assert_eq!(m.batch_hint(), Some(4));
        // The next session, with the hint, sends halves.
        let halves = Limits {
            batch_size: 4,
            ..limits()
        };
        let mut m = Machine::new(&welcome(), vec![], halves, t0);
        serve_outbox(&mut m, &(1..=8).collect::<Vec<_>>());
        assert_eq!(
            pushes(&sent(&mut m)),
            vec![(1, vec![1, 2, 3, 4]), (2, vec![5, 6, 7, 8])]
        );
    }

    #[test]
    fn goaway_resync_and_unknown_subscriptions() {
        let t0 = Instant::now();
        let mut m = Machine::new(&welcome(), vec![sub("orders", Some(3))], limits(), t0);
        serve_outbox(&mut m, &[]);
        m.handle_frame(
            Frame::Resync(Resync {
                sub: 1,
                reason: "epoch changed".into(),
            }),
            t0,
        );
        assert!(matches!(
            works(&mut m).as_slice(),
            [
                Work::BeginSnapshot { resync: true, .. },
                Work::Emit(Event::Resync { .. })
            ]
        ));
        m.handle_frame(
            Frame::Snapshot(Snapshot {
                sub: 9,
                docs: vec![],
            }),
            t0,
        );
        assert!(
            matches!(m.poll_end(), Some(End::Lost { reason }) if reason.contains("unknown subscription 9"))
        );
        let mut m = Machine::new(&welcome(), vec![], limits(), t0);
        m.handle_frame(
            Frame::GoAway(GoAway {
                reason: "draining".into(),
                retry_after_ms: 2_000,
            }),
            t0,
        );
        assert_eq!(
            m.poll_end(),
            Some(End::GoAway {
                reason: "draining".into(),
                retry_after: Duration::from_secs(2)
            })
        );
    }
}
