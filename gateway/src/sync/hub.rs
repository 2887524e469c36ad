//! Fan-out: who is subscribed to what, and the log follower that publishes committed changes
//! to live subscribers in strict seq order.
//!
//! # State and ownership
//! - `published`: the last seq handed to live subscribers, under a mutex that is held while a
//!   chunk is published and while a subscription goes live. That mutex is the handover point
//!   between catch-up (reading the log) and live delivery: a subscription goes live only when
//!   its position equals `published`, and from then on receives every later chunk. So between
//!   snapshot, catch-up and live no change is skipped or repeated.
//! - Only the follower task (`run_follower`) publishes. It gets committed groups straight from
//!   this node's ingest (no database read) and fills any gap — changes committed by other
//!   nodes — from the log, woken by PostgreSQL NOTIFY or a periodic poll.
//! - `subs`: per collection, the subscribers grouped by [`View`] (filter and row scope). A
//!   published chunk is judged against each view once, and the tail of its `Changes` frames
//!   (changes and cursor, [`changes_tails`]) is encoded once per view; every member is queued
//!   a reference to those shared bytes, and its connection's writer puts the member's own
//!   head (`sub`) in front, off the publish lock. Under the lock are only the order, one
//!   judgement and encoding per view, and a push of shared bytes per subscriber.
//!   Connections add and remove their own entries.
//!
//! A change is encoded once ([`LogEntry::encoded`]) and spliced into each view's tails.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use syncgate_protocol::codec::encode;
use syncgate_protocol::{Cursor, Frame, Synced};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::changes::{Committed, LogEntry};
use crate::error::{ErrorReply, GatewayError};
use crate::metrics::Metrics;
use crate::outbound::{OutFrame, Outbound, Pushed};
use crate::storage::{Page, Store};
use crate::sync::frames::{View, changes_tails, deliverable};

/// One subscription of one connection.
pub(crate) struct SubEntry {
    /// The subscriber's outbound queue.
    pub out: Arc<Outbound>,
    /// The client's subscription id.
    pub sub: u32,
    /// The followed collection.
    pub collection: String,
    /// What the subscription may see: the client's filter within the user's scope.
    pub view: View,
    /// Set (under the publish lock) once the subscription receives live chunks.
    live: AtomicBool,
    /// The seq up to which the subscription's frames are queued (catch-up or live), for
    /// `admin clients`: its lag is the published head minus this.
    position: AtomicU64,
    /// Set when the client unsubscribed or the connection ended: a catch-up still running
    /// for it stops.
    ended: AtomicBool,
    /// Wakes the subscription's start task when it ended ([`SubEntry::stopped`]). A signal,
    /// not an `AbortHandle`: a handle kept after the task finished keeps the task's whole
    /// allocation (its future's size, ~4.5 KB) alive for the subscription's life.
    stop: tokio::sync::Notify,
    /// Its index in the registry's list for its collection (`usize::MAX`: not registered),
    /// changed only under that list's lock, so that unregistering is a `swap_remove`, not a
    /// scan (a scan per subscriber made a collection's subscribers all leaving quadratic).
    slot: std::sync::atomic::AtomicUsize,
}

impl SubEntry {
    /// A subscription that is not live yet.
    pub(crate) fn new(out: Arc<Outbound>, sub: u32, collection: String, view: View) -> SubEntry {
        SubEntry {
            out,
            sub,
            collection,
            view,
            live: AtomicBool::new(false),
            position: AtomicU64::new(0),
            ended: AtomicBool::new(false),
            stop: tokio::sync::Notify::new(),
            slot: std::sync::atomic::AtomicUsize::new(usize::MAX),
        }
    }

    /// The subscription is over (unsubscribed, or its connection ended). When this returns
    /// every frame of it is queued that ever will be ([`Outbound::end_sub`]).
    pub(crate) fn end(&self) {
        self.out.end_sub(&self.ended);
        self.stop.notify_waiters();
    }

    /// Resolves once the subscription ended ([`SubEntry::end`]).
    pub(crate) async fn stopped(&self) {
        let notified = self.stop.notified();
        tokio::pin!(notified);
        // Registered before the flag is read: an `end` after the read wakes this waiter.
        notified.as_mut().enable();
        if self.is_ended() {
            return;
        }
        notified.await;
    }

    /// Queues a catch-up frame of this subscription, paced ([`Outbound::push_paced`]);
    /// false once the subscription ended or the connection is closing.
    pub(crate) async fn push_paced(&self, frame: Bytes) -> bool {
        self.out
            .push_paced(OutFrame::Whole(frame), &self.ended)
            .await
    }

    /// [`SubEntry::push_paced`] of a catch-up `changes` frame shared with other subscribers:
    /// its `tail` behind this subscription's head.
    pub(crate) async fn push_paced_tail(&self, tail: Bytes) -> bool {
        let frame = OutFrame::Changes {
            sub: self.sub,
            tail,
        };
        self.out.push_paced(frame, &self.ended).await
    }

    /// Queues a frame of this subscription unless it ended.
    pub(crate) fn push(&self, frame: Bytes) {
        self.out.push_unless(frame, &self.ended);
    }

    /// Sends an error about this subscription (a non-fatal one only while it has not ended).
    pub(crate) fn error(&self, reply: ErrorReply, metrics: &Metrics) {
        reply
            .sub(self.sub)
            .send_unless(&self.out, metrics, &self.ended);
    }

    /// Whether [`SubEntry::end`] was called.
    pub(crate) fn is_ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }

    /// Whether it receives live chunks.
    pub(crate) fn is_live(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }

    /// The seq up to which its frames are queued.
    pub(crate) fn position(&self) -> u64 {
        self.position.load(Ordering::Relaxed)
    }

    /// Records that its frames up to `seq` are queued.
    pub(crate) fn queued_up_to(&self, seq: u64) {
        self.position.fetch_max(seq, Ordering::Relaxed);
    }
}

/// Events for the follower.
#[derive(Debug)]
pub(crate) enum HubEvent {
    /// This node committed a group.
    Committed(Committed),
    /// The log head may have moved (another node committed).
    Wake,
}

/// The subscribers of one collection that share a view: a chunk is judged against the view
/// and its frames' tails are encoded once for all of them.
struct Group {
    view: View,
    members: Vec<Arc<SubEntry>>,
}

/// The subscribers of one collection, in groups by view, indexed by [`View::key`] (views with
/// equal keys but different terms — a hash collision, or a float filter value that is not
/// equal to itself — are separate groups under one key).
#[derive(Default)]
struct CollectionSubs {
    groups: std::collections::HashMap<u64, Vec<Group>>,
}

impl CollectionSubs {
    fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Every group.
    fn groups(&self) -> impl Iterator<Item = &Group> {
        self.groups.values().flatten()
    }
}

/// A catch-up page from the recent tail as every subscriber with one view receives it: the
/// tails of its `changes` frames and the position it brings a subscriber to.
pub(crate) struct SharedPage {
    /// The position after the page.
    pub(crate) upto: u64,
    /// The frames' tails (each subscriber's head goes in front).
    pub(crate) tails: Vec<Bytes>,
}

/// A page made for one view and range; the range of the tail never changes once published.
struct CachedPage {
    collection: String,
    view: View,
    after: u64,
    target: u64,
    page: Arc<SharedPage>,
}

/// Catch-up pages kept, most recently made, so that subscribers resuming together (a
/// reconnect storm: one view, one cursor) judge and encode each page once; at most this many
/// and [`SHARED_PAGE_BYTES`] of tails.
const SHARED_PAGES: usize = 16;
/// Bytes of frame tails the kept catch-up pages hold at most.
const SHARED_PAGE_BYTES: usize = 16 * 1024 * 1024;

/// The subscriber registry and publisher state.
pub(crate) struct Hub {
    /// Subscribers by collection, grouped by view.
    subs: DashMap<String, CollectionSubs>,
    /// The last published seq; locked while publishing and while going live.
    published: Mutex<u64>,
    /// Broadcasts `published` to catch-up tasks waiting for the hub to reach them.
    published_tx: watch::Sender<u64>,
    /// Where a live subscriber whose queue is full goes to catch up instead of being
    /// dropped (`None`: it is dropped with `slow_consumer`).
    degraded: Mutex<Option<mpsc::UnboundedSender<Arc<SubEntry>>>>,
    /// The database epoch, for cursors.
    epoch: String,
    /// Metrics.
    metrics: Metrics,
    /// Bytes of changes per `Changes` frame (see [`frame_budget`]).
    frame_budget: usize,
    /// The most recently published changes, so catch-ups read memory, not the database.
    tail: Mutex<Tail>,
    /// The catch-up pages last made from the tail, newest last (bounded by [`SHARED_PAGES`]
    /// and [`SHARED_PAGE_BYTES`]).
    pages: Mutex<std::collections::VecDeque<CachedPage>>,
}

/// Recently published changes: contiguous in seq (every seq is one change), oldest first,
/// bounded by an estimate of their memory. Appended only by [`Hub::publish`], under the publish
/// lock, so its last entry is always the published head (or it is empty).
struct Tail {
    entries: std::collections::VecDeque<Arc<LogEntry>>,
    bytes: usize,
    cap: usize,
}

impl Tail {
    /// Memory an entry holds: its encoding, its decoded change and previous body (maps of
    /// `rmpv` values: several small allocations per field), plus fixed overhead. Calibrated on
    /// RSS: 200,000 small changes held ~3× what `encoding × 3 + 160` estimated.
    fn cost(e: &LogEntry) -> usize {
        e.encoded.len() * 8 + 512
    }

    fn append(&mut self, from: u64, entries: &[Arc<LogEntry>]) {
        if self.cap == 0 {
            return;
        }
        let contiguous = match self.entries.back() {
            Some(last) => last.change.seq == from,
            None => true,
        };
        let complete = entries
            .iter()
            .enumerate()
            .all(|(i, e)| e.change.seq == from + 1 + i as u64);
        if !contiguous || !complete {
            // Never serve a range with a hole: start again from here.
            self.entries.clear();
            self.bytes = 0;
            if !complete {
                return;
            }
        }
        for e in entries {
            self.bytes += Tail::cost(e);
            self.entries.push_back(e.clone());
        }
        while self.bytes > self.cap {
            match self.entries.pop_front() {
                Some(e) => self.bytes -= Tail::cost(&e),
                None => break,
            }
        }
    }

    /// Changes of `collection` with `after < seq <= upto`, at most `limit` of them and about
    /// `max_bytes` of their encodings (at least one), if the tail holds the whole range.
    fn read(
        &self,
        collection: &str,
        after: u64,
        upto: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Option<Page<Arc<LogEntry>>> {
        let first = self.entries.front()?.change.seq;
        let last = self.entries.back()?.change.seq;
        if after + 1 < first || upto > last {
            return None;
        }
        let start = usize::try_from(after + 1 - first).ok()?;
        let mut items = Vec::new();
        let mut bytes = 0usize;
        for e in self.entries.range(start..) {
            if e.change.seq > upto {
                break;
            }
            if items.len() >= limit || (bytes >= max_bytes && !items.is_empty()) {
                return Some(Page { items, more: true });
            }
            if e.change.collection == collection {
                bytes += e.encoded.len();
                items.push(e.clone());
            }
        }
        Some(Page { items, more: false })
    }
}

impl Hub {
    /// A hub whose log is already published up to `head`; frames carry at most
    /// `frame_budget` bytes of changes; about `tail_bytes` of recent changes are kept for
    /// catch-ups.
    pub(crate) fn new(
        head: u64,
        epoch: String,
        metrics: Metrics,
        frame_budget: usize,
        tail_bytes: usize,
    ) -> Hub {
        metrics.published_seq.set(head as i64);
        Hub {
            subs: DashMap::new(),
            published: Mutex::new(head),
            published_tx: watch::channel(head).0,
            degraded: Mutex::new(None),
            epoch,
            metrics,
            frame_budget,
            tail: Mutex::new(Tail {
                entries: std::collections::VecDeque::new(),
                bytes: 0,
                cap: tail_bytes,
            }),
            pages: Mutex::new(std::collections::VecDeque::new()),
        }
    }

    /// Catch-up from memory: changes of `collection` with `after < seq <= upto` (at most
    /// `limit`, about `max_bytes`), or `None` when the recent tail does not reach back to
    /// `after`.
    pub(crate) fn read_tail(
        &self,
        collection: &str,
        after: u64,
        upto: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Option<Page<Arc<LogEntry>>> {
        let tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        tail.read(collection, after, upto, limit, max_bytes)
    }

    /// The next catch-up page from memory of a subscriber of `collection` with `view` at
    /// `after`, going to `upto` ([`Hub::read_tail`]'s page: at most `limit` changes, about
    /// `max_bytes`), judged and encoded once for every subscriber who asks for the same page;
    /// `None` when the recent tail does not reach back to `after`. `limit` and `max_bytes` must
    /// be the same for every caller (they are the node's constants).
    pub(crate) fn shared_page(
        &self,
        collection: &str,
        view: &View,
        after: u64,
        upto: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Option<Arc<SharedPage>> {
        let lock = || self.pages.lock().unwrap_or_else(|p| p.into_inner());
        let found = lock()
            .iter()
            .rev()
            .find(|c| {
                c.after == after
                    && c.target == upto
                    && c.view.key() == view.key()
                    && c.collection == collection
                    && c.view == *view
            })
            .map(|c| c.page.clone());
        if found.is_some() {
            return found;
        }
        let read = self.read_tail(collection, after, upto, limit, max_bytes)?;
        let page_upto = match read.items.last() {
            Some(last) if read.more => last.change.seq,
            _ => upto,
        };
        let parts: Vec<(u64, &[u8])> = read
            .items
            .iter()
            .filter_map(|e| Some((e.change.seq, deliverable(e, view)?)))
            .collect();
        let page = Arc::new(SharedPage {
            upto: page_upto,
            tails: changes_tails(&parts, &self.epoch, page_upto, self.frame_budget),
        });
        let mut pages = lock();
        pages.push_back(CachedPage {
            collection: collection.to_owned(),
            view: view.clone(),
            after,
            target: upto,
            page: page.clone(),
        });
        let bytes = |p: &CachedPage| p.page.tails.iter().map(Bytes::len).sum::<usize>();
        let mut held: usize = pages.iter().map(bytes).sum();
        while pages.len() > SHARED_PAGES || (held > SHARED_PAGE_BYTES && pages.len() > 1) {
            match pages.pop_front() {
                Some(old) => held -= bytes(&old),
                None => break,
            }
        }
        Some(page)
    }

    /// Bytes of changes per frame.
    pub(crate) fn frame_budget(&self) -> usize {
        self.frame_budget
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, u64> {
        self.published.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The last published seq.
    pub(crate) fn published(&self) -> u64 {
        *self.published_tx.borrow()
    }

    /// Watches the published seq.
    pub(crate) fn watch_published(&self) -> watch::Receiver<u64> {
        self.published_tx.subscribe()
    }

    /// The epoch cursors carry.
    pub(crate) fn epoch(&self) -> &str {
        &self.epoch
    }

    /// Adds a (not yet live) subscription, to the group of its view.
    pub(crate) fn register(&self, entry: Arc<SubEntry>) {
        self.metrics.subscriptions.inc();
        let mut subs = self.subs.entry(entry.collection.clone()).or_default();
        let same_key = subs.groups.entry(entry.view.key()).or_default();
        let i = match same_key.iter().position(|g| g.view == entry.view) {
            Some(i) => i,
            None => {
                same_key.push(Group {
                    view: entry.view.clone(),
                    members: Vec::new(),
                });
                same_key.len() - 1
            }
        };
        if let Some(group) = same_key.get_mut(i) {
            entry.slot.store(group.members.len(), Ordering::Relaxed);
            group.members.push(entry);
        }
    }

    /// Removes a subscription (its group goes with its last member).
    pub(crate) fn unregister(&self, entry: &Arc<SubEntry>) {
        let mut now_empty = false;
        if let Some(mut subs) = self.subs.get_mut(&entry.collection) {
            // The slot changes only under this lock: it is where the entry is in its group, if
            // registered. The group is the one under the view's key that holds it there.
            let i = entry.slot.swap(usize::MAX, Ordering::Relaxed);
            let key = entry.view.key();
            if let Some(same_key) = subs.groups.get_mut(&key) {
                let held = same_key
                    .iter()
                    .position(|g| g.members.get(i).is_some_and(|e| Arc::ptr_eq(e, entry)));
                if let Some(g) = held {
                    if let Some(group) = same_key.get_mut(g) {
                        group.members.swap_remove(i);
                        if let Some(moved) = group.members.get(i) {
                            moved.slot.store(i, Ordering::Relaxed);
                        }
                        if group.members.is_empty() {
                            same_key.swap_remove(g);
                        }
                    }
                    self.metrics.subscriptions.dec();
                }
                if same_key.is_empty() {
                    subs.groups.remove(&key);
                }
            }
            now_empty = subs.is_empty();
        }
        if now_empty {
            self.subs.remove_if(&entry.collection, |_, s| s.is_empty());
        }
    }

    /// Sends live subscribers whose queue is full to `sink` (a task that catches each up and
    /// brings it back live) instead of dropping them.
    pub(crate) fn degrade_to(&self, sink: mpsc::UnboundedSender<Arc<SubEntry>>) {
        *self.degraded.lock().unwrap_or_else(|p| p.into_inner()) = Some(sink);
    }

    /// Makes the subscription live if it has caught up with `published`; queues its `Synced`
    /// (when `announce`: not for a degraded subscriber rejoining, which the client never saw
    /// leave) before any live chunk can reach it.
    pub(crate) fn try_go_live(&self, entry: &SubEntry, position: u64, announce: bool) -> bool {
        let published = self.lock();
        if *published != position {
            return false;
        }
        if announce {
            entry.push(Bytes::from(encode(&Frame::Synced(Synced {
                sub: entry.sub,
                cursor: Cursor {
                    epoch: self.epoch.clone(),
                    seq: position,
                },
            }))));
        }
        entry.queued_up_to(position);
        entry.live.store(true, Ordering::Release);
        true
    }

    /// Publishes the chunk `from+1..=to` (entries in seq order) to live subscribers.
    /// Returns false if `from` is not the published head (the caller must fill the gap).
    pub(crate) fn publish(&self, from: u64, to: u64, entries: &[Arc<LogEntry>]) -> bool {
        let mut published = self.lock();
        if *published != from {
            return false;
        }
        let mut by_collection: BTreeMap<&str, Vec<&LogEntry>> = BTreeMap::new();
        for e in entries {
            by_collection
                .entry(e.change.collection.as_str())
                .or_default()
                .push(e);
        }
        let mut delivered = 0u64;
        let now = std::time::Instant::now();
        for (collection, changes) in by_collection {
            let Some(subs) = self.subs.get(collection) else {
                continue;
            };
            for group in subs.groups() {
                // Judged and encoded once per view; each member's writer adds its own head.
                let parts: Vec<(u64, &[u8])> = changes
                    .iter()
                    .filter_map(|e| Some((e.change.seq, deliverable(e, &group.view)?)))
                    .collect();
                if parts.is_empty() {
                    continue;
                }
                let n = parts.len() as u64;
                let mut tails: Option<Vec<Bytes>> = None;
                for entry in &group.members {
                    if !entry.live.load(Ordering::Acquire) {
                        continue;
                    }
                    let tails = tails.get_or_insert_with(|| {
                        changes_tails(&parts, &self.epoch, to, self.frame_budget)
                    });
                    match entry
                        .out
                        .try_push_changes(entry.sub, tails, now, &entry.ended)
                    {
                        Pushed::Queued => {
                            entry.queued_up_to(to);
                            delivered += n;
                        }
                        Pushed::Full => self.degrade(entry),
                        // Ending already (told once): its entry goes when the connection does.
                        Pushed::Closed => {}
                    }
                }
            }
        }
        self.tail
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .append(from, entries);
        *published = to;
        self.published_tx.send_replace(to);
        self.metrics.published_seq.set(to as i64);
        self.metrics.deliveries.inc_by(delivered);
        true
    }
}

impl Hub {
    /// A live subscriber whose queue has no room for a chunk (under the publish lock): it
    /// stops receiving live chunks and catches up from its position instead (everything up
    /// to it is queued), or, with no catch-up sink, is dropped.
    fn degrade(&self, entry: &Arc<SubEntry>) {
        entry.live.store(false, Ordering::Release);
        let sink = self.degraded.lock().unwrap_or_else(|p| p.into_inner());
        match sink.as_ref().map(|s| s.send(entry.clone())) {
            Some(Ok(())) => {
                self.metrics
                    .slow_consumers
                    .with_label_values(&["degraded"])
                    .inc();
            }
            _ => slow_consumer(&entry.out, &self.metrics),
        }
    }
}

/// Disconnects a subscriber whose queue overflowed; it resumes by cursor.
pub(crate) fn slow_consumer(out: &Outbound, metrics: &Metrics) {
    ErrorReply::from(GatewayError::SlowConsumer).send(out, metrics);
}

/// Publishes to live subscribers in strict seq order; see the module docs.
pub(crate) async fn run_follower(
    hub: Arc<Hub>,
    store: Store,
    mut events: mpsc::Receiver<HubEvent>,
    poll: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let res = tokio::select! {
            _ = shutdown.cancelled() => return,
            ev = events.recv() => match ev {
                None => return,
                Some(HubEvent::Committed(c)) => publish_committed(&hub, &store, c).await,
                Some(HubEvent::Wake) => catch_up(&hub, &store, None).await,
            },
            _ = tick.tick() => catch_up(&hub, &store, None).await,
        };
        if let Err(e) = res {
            tracing::warn!(error = %e, "log follower could not read the log; retrying");
        }
    }
}

async fn publish_committed(
    hub: &Hub,
    store: &Store,
    c: Committed,
) -> Result<(), crate::storage::StoreError> {
    if c.to <= hub.published() {
        return Ok(());
    }
    if c.from > hub.published() {
        catch_up(hub, store, Some(c.from)).await?;
    }
    if !hub.publish(c.from, c.to, &c.entries) {
        catch_up(hub, store, Some(c.to)).await?;
    }
    Ok(())
}

/// Publishes from the log up to `target` (or the committed head).
async fn catch_up(
    hub: &Hub,
    store: &Store,
    target: Option<u64>,
) -> Result<(), crate::storage::StoreError> {
    const PAGE: u64 = 1000;
    let target = match target {
        Some(t) => t,
        None => store.head().await?,
    };
    loop {
        let from = hub.published();
        if from >= target {
            return Ok(());
        }
        let page = store.read_log(from, target, PAGE).await?;
        let to = if (page.len() as u64) < PAGE {
            target
        } else {
            page.last().map_or(target, |e| e.change.seq)
        };
        let entries: Vec<Arc<LogEntry>> = page.into_iter().map(Arc::new).collect();
        hub.publish(from, to, &entries);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use syncgate_protocol::{Body, Change, ChangeOp};

    fn entry(seq: u64, collection: &str) -> Arc<LogEntry> {
        Arc::new(LogEntry::new(
            Change {
                seq,
                collection: collection.into(),
                id: format!("d{seq}"),
                op: ChangeOp::Upsert,
                body: None,
            },
            None,
        ))
    }

    /// A view filtering on `line` (or none, for `None`).
    fn line_view(line: Option<syncgate_protocol::Value>) -> View {
        let body: Body = line.map(|v| ("line".to_owned(), v)).into_iter().collect();
        View::new(syncgate_protocol::Filter::new(&body).unwrap(), None)
    }

    /// Change `seq` of document `d{seq % docs}`, moving it from line `(seq + 1) % lines` to
    /// `seq % lines`, with `pad` bytes of padding (so several changes fill several frames).
    fn moving(seq: u64, collection: &str, docs: u64, lines: u64, pad: usize) -> Arc<LogEntry> {
        let body = |line: u64| -> Body {
            [
                ("line".to_owned(), syncgate_protocol::Value::from(line)),
                (
                    "pad".to_owned(),
                    syncgate_protocol::Value::from("x".repeat(pad)),
                ),
            ]
            .into()
        };
        Arc::new(LogEntry::new(
            Change {
                seq,
                collection: collection.into(),
                id: format!("d{}", seq % docs),
                op: ChangeOp::Upsert,
                body: Some(body(seq % lines)),
            },
            Some(body((seq + 1) % lines)),
        ))
    }

    /// Entries leave the registry by their slot in any order, each once; the collection goes
    /// when its last one does, and the gauge follows.
    #[test]
    fn unregistering_removes_exactly_that_entry() {
        let metrics = Metrics::new();
        let hub = Hub::new(0, "e".into(), metrics.clone(), 1024, 0);
        let out = Arc::new(Outbound::new(1024, metrics.outbound_bytes.clone()));
        let view = || View::new(syncgate_protocol::Filter::new(&Body::new()).unwrap(), None);
        let entries: Vec<Arc<SubEntry>> = (0..6)
            .map(|i| Arc::new(SubEntry::new(out.clone(), i, "c".into(), view())))
            .collect();
        for e in &entries {
            hub.register(e.clone());
        }
        let subs = |hub: &Hub| -> Vec<u32> {
            let mut v: Vec<u32> = hub
                .subs
                .get("c")
                .map(|l| {
                    l.groups()
                        .flat_map(|g| g.members.iter().map(|e| e.sub))
                        .collect()
                })
                .unwrap_or_default();
            v.sort();
            v
        };
        for (gone, left) in [
            (1, vec![0, 2, 3, 4, 5]),
            (0, vec![2, 3, 4, 5]),
            (5, vec![2, 3, 4]),
            (1, vec![2, 3, 4]), // twice: nothing more happens
            (3, vec![2, 4]),
        ] {
            hub.unregister(&entries[gone]);
            assert_eq!(subs(&hub), left);
            assert_eq!(metrics.subscriptions.get(), left.len() as i64);
        }
        hub.unregister(&entries[2]);
        hub.unregister(&entries[4]);
        assert!(hub.subs.get("c").is_none());
        assert_eq!(metrics.subscriptions.get(), 0);
    }

    /// Live fan-out by group sends every subscriber exactly the frames the per-subscriber path
    /// (catch-up's `changes_frames` over what its own view lets through) would, whatever the
    /// mix of views: everything, two filters, a filter on NaN (not equal to itself, so each
    /// such subscriber is a group of its own under one key), a subscriber not live yet and one
    /// that left.
    #[test]
    fn grouped_fan_out_equals_the_per_subscriber_frames() {
        use syncgate_protocol::Value;
        let metrics = Metrics::new();
        let budget = 300;
        let hub = Hub::new(0, "e".into(), metrics.clone(), budget, 0);
        let views = [
            line_view(None),
            line_view(Some(Value::from(1))),
            line_view(Some(Value::from(2))),
            line_view(Some(Value::from(f64::NAN))),
        ];
        let mut subs = Vec::new();
        for i in 0..24u32 {
            let view = views[i as usize % views.len()].clone();
            let out = Arc::new(Outbound::new(1 << 20, metrics.outbound_bytes.clone()));
            let entry = Arc::new(SubEntry::new(out.clone(), 100 + i, "c".into(), view));
            hub.register(entry.clone());
            if i != 5 {
                assert!(hub.try_go_live(&entry, 0, false));
            }
            subs.push((entry, out));
        }
        hub.unregister(&subs[6].0);
        // Documents move between lines 0, 1 and 2, with bodies large enough for several
        // frames; one change is of another collection.
        let entries: Vec<Arc<LogEntry>> = (1..=12u64)
            .map(|seq| moving(seq, if seq == 7 { "other" } else { "c" }, 4, 3, 60))
            .collect();
        assert!(hub.publish(0, 12, &entries));
        let mut delivered = 0;
        for (i, (entry, out)) in subs.iter().enumerate() {
            let got = out.take_wire();
            let parts: Vec<(u64, &[u8])> = entries
                .iter()
                .filter(|e| e.change.collection == "c")
                .filter_map(|e| Some((e.change.seq, deliverable(e, &entry.view)?)))
                .collect();
            let want = match i {
                5 | 6 => Vec::new(),
                _ => crate::sync::frames::changes_frames(entry.sub, &parts, "e", 12, budget),
            };
            assert_eq!(got, want, "subscriber {i}");
            if !want.is_empty() {
                delivered += parts.len() as u64;
            }
        }
        assert!(delivered > 0);
        assert_eq!(metrics.deliveries.get(), delivered);
        // The NaN subscribers are groups of their own; the others share three groups.
        let c = hub.subs.get("c").unwrap();
        assert_eq!(c.groups().count(), 3 + 6);
        assert_eq!(c.groups().map(|g| g.members.len()).sum::<usize>(), 23);
    }

    /// The start task of a subscription stops when it ends, whether it ended before the task
    /// waited or while it waits.
    #[tokio::test]
    async fn stopped_resolves_once_the_subscription_ended() {
        let metrics = Metrics::new();
        let view = || View::new(syncgate_protocol::Filter::new(&Body::new()).unwrap(), None);
        let out = Arc::new(Outbound::new(1024, metrics.outbound_bytes.clone()));
        let early = SubEntry::new(out.clone(), 1, "c".into(), view());
        early.end();
        early.stopped().await;
        let late = Arc::new(SubEntry::new(out, 2, "c".into(), view()));
        let waiting = tokio::spawn({
            let late = late.clone();
            async move { late.stopped().await }
        });
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!waiting.is_finished());
        late.end();
        tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("stopped within the deadline")
            .unwrap();
    }

    /// A catch-up page from memory is made once per view and range and is, behind each
    /// subscriber's head, exactly the frames of the per-subscriber path; another view or range
    /// gets its own page, a range the tail does not hold gets none, and the kept pages stay
    /// bounded.
    #[test]
    fn catch_up_pages_are_shared_per_view_and_range() {
        use syncgate_protocol::Value;
        let metrics = Metrics::new();
        let budget = 300;
        let hub = Hub::new(0, "e".into(), metrics, budget, 1 << 20);
        let view = |line: Option<u64>| line_view(line.map(Value::from));
        let entries: Vec<Arc<LogEntry>> =
            (1..=40u64).map(|seq| moving(seq, "c", 5, 2, 40)).collect();
        assert!(hub.publish(0, 40, &entries));
        let page = |v: &View, after: u64| hub.shared_page("c", v, after, 40, 16, 10_000).unwrap();
        let a = page(&view(Some(1)), 0);
        assert!(
            Arc::ptr_eq(&a, &page(&view(Some(1)), 0)),
            "one page per view and range"
        );
        assert!(!Arc::ptr_eq(&a, &page(&view(Some(0)), 0)));
        assert!(!Arc::ptr_eq(&a, &page(&view(Some(1)), 4)));
        assert!(!Arc::ptr_eq(&a, &page(&view(None), 0)));
        for (v, after) in [(view(Some(1)), 0), (view(None), 7), (view(Some(0)), 30)] {
            let p = page(&v, after);
            let read = hub.read_tail("c", after, 40, 16, 10_000).unwrap();
            assert_eq!(
                p.upto,
                if read.more {
                    read.items.last().unwrap().change.seq
                } else {
                    40
                }
            );
            let parts: Vec<(u64, &[u8])> = read
                .items
                .iter()
                .filter_map(|e| Some((e.change.seq, deliverable(e, &v)?)))
                .collect();
            let whole = crate::sync::frames::changes_frames(9, &parts, "e", p.upto, budget);
            let assembled: Vec<Bytes> = p
                .tails
                .iter()
                .map(|t| {
                    OutFrame::Changes {
                        sub: 9,
                        tail: t.clone(),
                    }
                    .into_wire()
                })
                .collect();
            assert_eq!(assembled, whole);
        }
        assert!(
            hub.shared_page("c", &view(None), 0, 41, 16, 10_000)
                .is_none()
        );
        for after in 0..2 * SHARED_PAGES as u64 {
            page(&view(None), after);
        }
        assert!(hub.pages.lock().unwrap().len() <= SHARED_PAGES);
        assert!(
            !Arc::ptr_eq(&a, &page(&view(Some(1)), 0)),
            "evicted, made again"
        );
    }

    #[test]
    fn the_tail_serves_only_ranges_it_holds_whole() {
        let one = Tail::cost(&entry(1, "a"));
        let mut t = Tail {
            entries: Default::default(),
            bytes: 0,
            cap: one * 5,
        };
        let batch: Vec<_> = (1..=4)
            .map(|s| entry(s, if s % 2 == 0 { "b" } else { "a" }))
            .collect();
        t.append(0, &batch);
        let seqs = |v: Option<Page<Arc<LogEntry>>>| {
            v.map(|p| p.items.iter().map(|e| e.change.seq).collect::<Vec<_>>())
        };
        assert_eq!(seqs(t.read("a", 0, 4, 100, usize::MAX)), Some(vec![1, 3]));
        assert_eq!(seqs(t.read("b", 1, 4, 1, usize::MAX)), Some(vec![2]));
        assert_eq!(
            seqs(t.read("a", 0, 5, 100, usize::MAX)),
            None,
            "beyond the head"
        );
        // Capacity 5: appending 5..=6 evicts 1, so a catch-up from 0 must go to the database.
        t.append(4, &[entry(5, "a"), entry(6, "a")]);
        assert_eq!(seqs(t.read("a", 0, 6, 100, usize::MAX)), None);
        assert_eq!(
            seqs(t.read("a", 1, 6, 100, usize::MAX)),
            Some(vec![3, 5, 6])
        );
        // Pages are cut by bytes too (at least one change), and say that more follows.
        let one_encoding = entry(3, "a").encoded.len();
        let page = t.read("a", 1, 6, 100, one_encoding + 1).unwrap();
        assert_eq!(
            (
                page.items.iter().map(|e| e.change.seq).collect::<Vec<_>>(),
                page.more
            ),
            (vec![3, 5], true)
        );
        let page = t.read("a", 1, 6, 100, 0).unwrap();
        assert_eq!((page.items.len(), page.more), (1, true));
        assert!(!t.read("a", 1, 6, 100, usize::MAX).unwrap().more);
        // A hole (a chunk that does not follow the tail) resets it.
        t.append(7, &[entry(8, "a")]);
        assert_eq!(seqs(t.read("a", 6, 8, 100, usize::MAX)), None);
        assert_eq!(seqs(t.read("a", 7, 8, 100, usize::MAX)), Some(vec![8]));
    }
}
