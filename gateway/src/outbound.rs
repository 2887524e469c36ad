//! Each connection's outbound queue, bounded in bytes, and the writer that drains it.
//!
//! Ownership: the connection's one task owns the WebSocket and drives its [`Writer`] beside
//! its reads ([`Writer::poll_write`]); everyone else (its subscription tasks, the hub's
//! publisher) only appends encoded frames here and wakes that task.
//! Bounds: the cap counts the frames queued *and* the batch the writer has taken and is still
//! writing (a stalled socket holds that batch: counting it only as queued let a stalled
//! connection hold about twice the cap while the gauge showed less). Live fan-out uses
//! [`Outbound::try_push_changes`], all of a chunk's frames or none, refused past the cap; the
//! caller then disconnects the subscriber with `slow_consumer` (once: a closed queue says so
//! and counts nothing). Catch-up uses [`Outbound::push_paced`], which waits until the frame
//! fits in half the cap and pushes under the same lock as the check, so several subscriptions
//! starting on one connection cannot overfill it and leave live chunks no room. Replies to the
//! client's own requests use [`Outbound::push`], and the reader stops reading requests while
//! the queue is over half its cap ([`Outbound::wait_for_space`]), so a client that does not
//! read cannot grow it either.
//!
//! Compression (PROTOCOL.md §3.15) happens in the writer, off every lock, once the session
//! negotiated it ([`Outbound::compress_from_now`]); the cap counts frames as queued
//! (uncompressed). Live chunks carry the instant they were published, and the writer records
//! how long each waited until the socket took it (`syncgate_delivery_lag_seconds`).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use futures_util::Sink;
use futures_util::task::AtomicWaker;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::metrics::Metrics;

/// How the connection ends.
#[derive(Debug, Clone)]
pub(crate) struct Close {
    /// The WebSocket close code.
    pub code: u16,
    /// The close reason (short, for logs).
    pub reason: String,
}

impl Close {
    /// A close with the reason cut to 100 characters (WebSocket reasons are short).
    fn new(code: u16, reason: &str) -> Close {
        Close {
            code,
            reason: reason.chars().take(100).collect(),
        }
    }
}

/// The metrics a writer records: handles to five of them, not a clone of the whole
/// [`Metrics`] (every idle connection's writer carries these for its life).
pub(crate) struct WriterMetrics {
    frames_out: prometheus::IntCounter,
    bytes_out: prometheus::IntCounter,
    frames_compressed: prometheus::IntCounter,
    compression_saved_bytes: prometheus::IntCounter,
    delivery_lag: prometheus::Histogram,
}

impl WriterMetrics {
    /// The writer's handles of `m`.
    pub(crate) fn of(m: &Metrics) -> WriterMetrics {
        WriterMetrics {
            frames_out: m.frames_out.clone(),
            bytes_out: m.bytes_out.clone(),
            frames_compressed: m.frames_compressed.clone(),
            compression_saved_bytes: m.compression_saved_bytes.clone(),
            delivery_lag: m.delivery_lag.clone(),
        }
    }
}

/// A frame as queued.
#[derive(Debug, Clone)]
pub(crate) enum OutFrame {
    /// A whole frame.
    Whole(Bytes),
    /// A live `changes` frame of subscription `sub`: the chunk's tail, encoded once and shared
    /// by every subscriber sent the same changes; the writer puts the head (with `sub`) in
    /// front, off every lock ([`syncgate_protocol::codec::write_changes_head`]).
    Changes {
        /// The subscription.
        sub: u32,
        /// The frame after its `sub`.
        tail: Bytes,
    },
}

impl OutFrame {
    /// Its size on the wire (uncompressed): what the cap counts.
    pub(crate) fn len(&self) -> usize {
        match self {
            OutFrame::Whole(b) => b.len(),
            OutFrame::Changes { sub, tail } => {
                syncgate_protocol::codec::changes_head_len(*sub) + tail.len()
            }
        }
    }

    /// The frame's bytes as they go on the wire (before compression).
    pub(crate) fn into_wire(self) -> Bytes {
        match self {
            OutFrame::Whole(b) => b,
            OutFrame::Changes { sub, tail } => {
                let mut frame = Vec::with_capacity(
                    syncgate_protocol::codec::changes_head_len(sub) + tail.len(),
                );
                syncgate_protocol::codec::write_changes_head(&mut frame, sub);
                frame.extend_from_slice(&tail);
                Bytes::from(frame)
            }
        }
    }
}

/// A queued frame and, for a live chunk, when it was published.
type Queued = (OutFrame, Option<Instant>);

/// The frames a writer took to write (its buffer swaps with the queue's at every take).
#[derive(Default)]
pub(crate) struct Batch(VecDeque<Queued>);

impl Batch {
    /// Frames of room an idle connection keeps in each of its two buffers: none. Most
    /// connections are idle most of the time (P1), and a busy one rarely finds its queue
    /// empty; when it does, the next frame allocates a few hundred bytes again.
    const KEEP: usize = 0;
}

#[derive(Default)]
struct State {
    queue: VecDeque<Queued>,
    /// Bytes in `queue`.
    bytes: usize,
    /// Bytes the writer has taken and not finished writing.
    writing: usize,
    close: Option<Close>,
}

impl State {
    /// Everything the connection holds for its client.
    fn held(&self) -> usize {
        self.bytes + self.writing
    }
}

/// What [`Outbound::try_push_changes`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pushed {
    /// Every frame was queued.
    Queued,
    /// Nothing was queued: the frames do not fit under the cap.
    Full,
    /// Nothing was queued: the connection is closing.
    Closed,
}

/// A byte-bounded queue of encoded frames.
pub(crate) struct Outbound {
    /// Queue, byte count and close request, under one short lock (never held across await).
    state: Mutex<State>,
    /// Wakes the connection's task to write ([`Writer::poll_write`] registers before it looks
    /// at the queue, so a frame queued after the look wakes it).
    wake_writer: AtomicWaker,
    /// Wakes tasks waiting for the queue to drain.
    space: Notify,
    /// The byte cap.
    cap: usize,
    /// Cancelled when a close is requested, so the connection's reader stops at once.
    closed: tokio_util::sync::CancellationToken,
    /// The node-wide `syncgate_outbound_queue_bytes` gauge, kept equal to the sum of queues.
    gauge: prometheus::IntGauge,
    /// How the writer compresses frames, once the session negotiated it.
    packer: OnceLock<Packer>,
}

/// Which frames the writer compresses, and how hard.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Packer {
    /// Frames of at least this many bytes are compressed (when that makes them smaller).
    pub(crate) min_bytes: usize,
    /// The deflate level, 1 (fastest) to 9 (smallest).
    pub(crate) level: u32,
}

impl Outbound {
    /// A queue holding at most `cap` bytes of fan-out, accounted in `gauge`.
    pub(crate) fn new(cap: usize, gauge: prometheus::IntGauge) -> Outbound {
        Outbound {
            state: Mutex::new(State::default()),
            wake_writer: AtomicWaker::new(),
            space: Notify::new(),
            cap,
            closed: tokio_util::sync::CancellationToken::new(),
            gauge,
            packer: OnceLock::new(),
        }
    }

    /// From now on the writer sends frames of at least `packer.min_bytes` compressed (the
    /// session negotiated deflate; the client accepts a compressed frame from its `hello` on).
    pub(crate) fn compress_from_now(&self, packer: Packer) {
        let _ = self.packer.set(packer);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the queue inconsistent (every update is
        // a single push or swap), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks a subscription ended, under the queue's lock: a frame pushed for it (with its
    /// `ended` flag as the gate) is either queued before this returns or not at all. So a
    /// frame the reader queues right after (`unsubscribed`) follows every frame of the
    /// subscription, and a catch-up task still running cannot add one behind it.
    pub(crate) fn end_sub(&self, ended: &AtomicBool) {
        let _s = self.lock();
        ended.store(true, Ordering::Release);
    }

    /// Appends the live frames of subscription `sub` for a chunk published at `published` —
    /// each of the shared `tails` behind the subscription's own head —, all or none: none if
    /// together they would pass the cap, the connection is closing or the subscription
    /// (`gate`) ended.
    pub(crate) fn try_push_changes(
        &self,
        sub: u32,
        tails: &[Bytes],
        published: Instant,
        gate: &AtomicBool,
    ) -> Pushed {
        let head = syncgate_protocol::codec::changes_head_len(sub);
        let len: usize = tails.iter().map(|t| head + t.len()).sum();
        let mut s = self.lock();
        if s.close.is_some() || gate.load(Ordering::Acquire) {
            return Pushed::Closed;
        }
        if s.held() + len > self.cap {
            return Pushed::Full;
        }
        s.bytes += len;
        self.gauge.add(len as i64);
        s.queue.extend(tails.iter().map(|t| {
            (
                OutFrame::Changes {
                    sub,
                    tail: t.clone(),
                },
                Some(published),
            )
        }));
        drop(s);
        self.wake_writer.wake();
        Pushed::Queued
    }

    /// Appends a catch-up frame (whole, or a shared tail behind its subscription's head)
    /// once it fits in half the cap (or the connection holds
    /// nothing, so a frame larger than that still goes), checked and pushed under one lock.
    /// Returns false if the connection closed or the subscription (`gate`) ended first.
    pub(crate) async fn push_paced(&self, frame: OutFrame, gate: &AtomicBool) -> bool {
        let len = frame.len();
        loop {
            let notified = self.space.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut s = self.lock();
                if s.close.is_some() || gate.load(Ordering::Acquire) {
                    return false;
                }
                if s.held() == 0 || s.held() + len <= self.cap / 2 {
                    s.bytes += len;
                    self.gauge.add(len as i64);
                    s.queue.push_back((frame, None));
                    drop(s);
                    self.wake_writer.wake();
                    return true;
                }
            }
            notified.await;
        }
    }

    /// Appends a reply frame regardless of the cap (callers bound themselves with
    /// [`Outbound::wait_for_space`]). Ignored once closed.
    pub(crate) fn push(&self, frame: Bytes) {
        self.push_unless(frame, &AtomicBool::new(false));
    }

    /// [`Outbound::push`] of a subscription's frame: ignored once the subscription (`gate`)
    /// ended.
    pub(crate) fn push_unless(&self, frame: Bytes, gate: &AtomicBool) {
        let mut s = self.lock();
        if s.close.is_some() || gate.load(Ordering::Acquire) {
            return;
        }
        s.bytes += frame.len();
        self.gauge.add(frame.len() as i64);
        s.queue.push_back((OutFrame::Whole(frame), None));
        drop(s);
        self.wake_writer.wake();
    }

    /// Whether the connection holds less than half its cap.
    pub(crate) fn has_space(&self) -> bool {
        let s = self.lock();
        s.close.is_some() || s.held() <= self.cap / 2
    }

    /// Waits until the queue is below half its cap (or closed).
    pub(crate) async fn wait_for_space(&self) {
        loop {
            let notified = self.space.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.has_space() {
                return;
            }
            notified.await;
        }
    }

    /// Bytes held: queued and being written.
    pub(crate) fn queued_bytes(&self) -> usize {
        self.lock().held()
    }

    /// Asks the writer to send `last` (if any) and then close with `code`. Frames still queued
    /// are dropped: the client resumes by cursor.
    pub(crate) fn close(&self, last: Option<Bytes>, code: u16, reason: &str) {
        let mut s = self.lock();
        if s.close.is_some() {
            return;
        }
        s.queue.clear();
        let new_bytes = last.as_ref().map_or(0, Bytes::len);
        self.gauge.add(new_bytes as i64 - s.bytes as i64);
        s.bytes = new_bytes;
        if let Some(f) = last {
            s.queue.push_back((OutFrame::Whole(f), None));
        }
        s.close = Some(Close::new(code, reason));
        drop(s);
        self.signal_closed();
    }

    /// Asks the writer to flush everything queued and then close (graceful).
    pub(crate) fn close_after_flush(&self, code: u16, reason: &str) {
        let mut s = self.lock();
        if s.close.is_none() {
            s.close = Some(Close::new(code, reason));
        }
        drop(s);
        self.signal_closed();
    }

    /// Wakes everyone who waits on this queue after a close was recorded.
    fn signal_closed(&self) {
        self.closed.cancel();
        self.wake_writer.wake();
        self.space.notify_waiters();
    }

    /// The close requested, if any (for the connection's closing log line).
    pub(crate) fn close_request(&self) -> Option<Close> {
        self.lock().close.clone()
    }

    /// Whether a close was requested.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Resolves once a close is requested.
    pub(crate) async fn closed(&self) {
        self.closed.cancelled().await
    }

    /// Takes every queued frame into `batch` (empty; the two buffers swap, so neither is
    /// allocated again per chunk) and the close request, if any; their bytes stay held (and in
    /// the gauge) until [`Outbound::written`].
    fn take_into(&self, batch: &mut Batch) -> (usize, Option<Close>) {
        let mut s = self.lock();
        std::mem::swap(&mut s.queue, &mut batch.0);
        if batch.0.is_empty() {
            // Idle: neither buffer keeps a burst's room.
            s.queue.shrink_to(Batch::KEEP);
            batch.0.shrink_to(Batch::KEEP);
        }
        let bytes = std::mem::take(&mut s.bytes);
        s.writing += bytes;
        (bytes, s.close.clone())
    }

    /// [`Outbound::take_into`] a new batch.
    #[cfg(test)]
    fn take(&self) -> (VecDeque<Queued>, usize, Option<Close>) {
        let mut batch = Batch::default();
        let (bytes, close) = self.take_into(&mut batch);
        (batch.0, bytes, close)
    }

    /// What the writer does short of the socket, for the fan-out bench: takes everything
    /// queued into `batch` and returns each frame's wire bytes (uncompressed).
    pub(crate) fn take_wire_into(&self, batch: &mut Batch) -> Vec<Bytes> {
        let (bytes, _) = self.take_into(batch);
        let wire = batch.0.drain(..).map(|(f, _)| f.into_wire()).collect();
        self.written(bytes);
        wire
    }

    /// [`Outbound::take_wire_into`] a new batch.
    #[cfg(test)]
    pub(crate) fn take_wire(&self) -> Vec<Bytes> {
        self.take_wire_into(&mut Batch::default())
    }

    /// The writer has written (or given up on) `bytes` it took.
    fn written(&self, bytes: usize) {
        let mut s = self.lock();
        s.writing = s.writing.saturating_sub(bytes);
        self.gauge.sub(bytes as i64);
    }
}

/// Drains an [`Outbound`] into a WebSocket sink: takes everything queued, hands it to the
/// sink, flushes once, repeats; finishes after the close frame or when the socket fails. Not
/// a task: the connection's task polls it beside its reads, so an idle writer is these fields
/// and nothing else (it used to be a task of its own, ~900 bytes per idle connection).
pub(crate) struct Writer {
    metrics: WriterMetrics,
    /// The batch being written; it swaps with the queue's buffer at every take.
    batch: Batch,
    /// Publish instants of the live frames of the batch handed to the sink (reused).
    stamps: Vec<Instant>,
    step: WriterStep,
}

/// Where a [`Writer`] is.
enum WriterStep {
    /// Waiting for frames.
    Idle,
    /// Handing the batch taken (`bytes` of it, `n` frames) to the sink, then `close`, if any.
    Feeding(Taken),
    /// Flushing what was handed to the sink.
    Flushing(Taken),
    /// Sending the close frame (`Some` until handed to the sink), then closing the sink.
    Closing(Option<Message>),
    /// The close frame is out or the socket failed.
    Done,
}

/// A batch taken from the queue.
struct Taken {
    bytes: usize,
    n: usize,
    close: Option<Close>,
}

impl Writer {
    pub(crate) fn new(metrics: WriterMetrics) -> Writer {
        Writer {
            metrics,
            batch: Batch::default(),
            stamps: Vec::new(),
            step: WriterStep::Idle,
        }
    }

    /// Writes what `out` holds to `sink` as far as the socket takes it. `Ready` once finished:
    /// the close frame was sent (after everything queued before the close request) or the
    /// socket failed (then `out` is closed, so every producer stops).
    pub(crate) fn poll_write<S>(
        &mut self,
        out: &Outbound,
        sink: &mut S,
        cx: &mut Context<'_>,
    ) -> Poll<()>
    where
        S: Sink<Message> + Unpin,
    {
        loop {
            let step = std::mem::replace(&mut self.step, WriterStep::Done);
            self.step = match step {
                WriterStep::Done => return Poll::Ready(()),
                WriterStep::Idle => {
                    out.wake_writer.register(cx.waker());
                    let (bytes, close) = out.take_into(&mut self.batch);
                    let n = self.batch.0.len();
                    if n == 0 && close.is_none() {
                        self.stamps.shrink_to(Batch::KEEP);
                        self.step = WriterStep::Idle;
                        return Poll::Pending;
                    }
                    self.stamps.clear();
                    WriterStep::Feeding(Taken { bytes, n, close })
                }
                WriterStep::Feeding(taken) => {
                    while !self.batch.0.is_empty() {
                        match Pin::new(&mut *sink).poll_ready(cx) {
                            Poll::Pending => {
                                self.step = WriterStep::Feeding(taken);
                                return Poll::Pending;
                            }
                            Poll::Ready(Err(_)) => return self.fail(out, &taken),
                            Poll::Ready(Ok(())) => {}
                        }
                        let Some((frame, published)) = self.batch.0.pop_front() else {
                            break;
                        };
                        let frame = out.pack(frame.into_wire(), &self.metrics);
                        self.metrics.bytes_out.inc_by(frame.len() as u64);
                        if Pin::new(&mut *sink)
                            .start_send(Message::Binary(frame))
                            .is_err()
                        {
                            return self.fail(out, &taken);
                        }
                        self.stamps.extend(published);
                    }
                    match taken.n {
                        0 => self.written(out, taken),
                        _ => WriterStep::Flushing(taken),
                    }
                }
                WriterStep::Flushing(taken) => match Pin::new(&mut *sink).poll_flush(cx) {
                    Poll::Pending => {
                        self.step = WriterStep::Flushing(taken);
                        return Poll::Pending;
                    }
                    Poll::Ready(Err(_)) => return self.fail(out, &taken),
                    Poll::Ready(Ok(())) => {
                        // Handed to the socket: the end of this node's part of the delivery.
                        for p in &self.stamps {
                            self.metrics.delivery_lag.observe(p.elapsed().as_secs_f64());
                        }
                        self.written(out, taken)
                    }
                },
                WriterStep::Closing(Some(frame)) => match Pin::new(&mut *sink).poll_ready(cx) {
                    Poll::Pending => {
                        self.step = WriterStep::Closing(Some(frame));
                        return Poll::Pending;
                    }
                    Poll::Ready(Err(_)) => WriterStep::Done,
                    Poll::Ready(Ok(())) => match Pin::new(&mut *sink).start_send(frame) {
                        Ok(()) => WriterStep::Closing(None),
                        Err(_) => WriterStep::Done,
                    },
                },
                // Flushes the close frame and closes the socket's sending side.
                WriterStep::Closing(None) => match Pin::new(&mut *sink).poll_close(cx) {
                    Poll::Pending => {
                        self.step = WriterStep::Closing(None);
                        return Poll::Pending;
                    }
                    Poll::Ready(_) => WriterStep::Done,
                },
            };
        }
    }

    /// A batch is written: its bytes are no longer held, producers waiting for room are woken,
    /// and the close frame follows if one was asked for.
    fn written(&mut self, out: &Outbound, taken: Taken) -> WriterStep {
        out.written(taken.bytes);
        self.metrics.frames_out.inc_by(taken.n as u64);
        out.space.notify_waiters();
        match taken.close {
            Some(c) => WriterStep::Closing(Some(Message::Close(Some(CloseFrame {
                code: CloseCode::from(c.code),
                reason: c.reason.into(),
            })))),
            None => WriterStep::Idle,
        }
    }

    /// The peer is gone: the batch is given up and every producer is made to stop.
    fn fail(&mut self, out: &Outbound, taken: &Taken) -> Poll<()> {
        self.batch.0.clear();
        out.written(taken.bytes);
        self.metrics.frames_out.inc_by(taken.n as u64);
        out.space.notify_waiters();
        out.close(None, 1006, "write failed");
        self.step = WriterStep::Done;
        Poll::Ready(())
    }
}

impl Outbound {
    /// `frame` as it goes on the wire: compressed if the session negotiated it, the frame is
    /// large enough and compressing makes it smaller.
    fn pack(&self, frame: Bytes, metrics: &WriterMetrics) -> Bytes {
        let Some(p) = self.packer.get() else {
            return frame;
        };
        if frame.len() < p.min_bytes {
            return frame;
        }
        match syncgate_protocol::compress::compress(&frame, p.level) {
            Some(z) => {
                metrics.frames_compressed.inc();
                metrics
                    .compression_saved_bytes
                    .inc_by((frame.len() - z.len()) as u64);
                Bytes::from(z)
            }
            None => frame,
        }
    }
}

impl Drop for Outbound {
    /// Frames still queued when the connection is gone (a writer aborted while the peer did
    /// not read) leave the node-wide gauge with the queue.
    fn drop(&mut self) {
        let held = self.lock().held();
        self.gauge.sub(held as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &'static [u8]) -> Bytes {
        Bytes::from_static(s)
    }

    /// The gate of a subscription that has not ended.
    fn open() -> AtomicBool {
        AtomicBool::new(false)
    }

    /// The head every live frame of subscription 0 carries in front of its tail.
    const H: usize = 15;

    /// Queues a live chunk of subscription 0 with these tails.
    fn chunk(q: &Outbound, tails: &[&'static [u8]]) -> Pushed {
        let tails: Vec<Bytes> = tails.iter().map(|t| b(t)).collect();
        q.try_push_changes(0, &tails, Instant::now(), &open())
    }

    #[test]
    fn a_live_frame_is_its_subscriptions_head_and_the_shared_tail() {
        assert_eq!(syncgate_protocol::codec::changes_head_len(0), H);
        let q = Outbound::new(1000, prometheus::IntGauge::new("t", "t").unwrap());
        let tail = b(b"TAIL");
        for sub in [0, 300] {
            q.try_push_changes(sub, std::slice::from_ref(&tail), Instant::now(), &open());
        }
        let wire = q.take_wire();
        for (frame, sub) in wire.iter().zip([0, 300]) {
            let mut want = Vec::new();
            syncgate_protocol::codec::write_changes_head(&mut want, sub);
            want.extend_from_slice(b"TAIL");
            assert_eq!(&frame[..], &want[..]);
        }
        assert_eq!(wire.len(), 2);
    }

    #[test]
    fn an_idle_connection_keeps_no_queue_buffer() {
        let q = Outbound::new(1000, prometheus::IntGauge::new("t", "t").unwrap());
        let mut batch = Batch::default();
        for _ in 0..3 {
            for f in [&b"welcome"[..], b"subscribed", b"synced"] {
                q.push(b(f));
            }
            assert!(q.lock().queue.capacity() >= 3);
            assert_eq!(q.take_wire_into(&mut batch).len(), 3);
            // The writer's next take finds nothing: the connection is idle.
            assert!(q.take_wire_into(&mut batch).is_empty());
            assert_eq!(q.lock().queue.capacity(), 0);
            assert_eq!(batch.0.capacity(), 0);
        }
    }

    #[tokio::test]
    async fn nothing_of_an_ended_subscription_is_queued_after_it_ended() {
        let q = Outbound::new(100, prometheus::IntGauge::new("t", "t").unwrap());
        let gate = AtomicBool::new(false);
        assert!(q.push_paced(OutFrame::Whole(b(b"page")), &gate).await);
        q.end_sub(&gate);
        q.push(b(b"unsubscribed"));
        assert!(!q.push_paced(OutFrame::Whole(b(b"late page")), &gate).await);
        assert_eq!(
            q.try_push_changes(0, &[b(b"late chunk")], Instant::now(), &gate),
            Pushed::Closed
        );
        q.push_unless(b(b"late resync"), &gate);
        let frames = q.take_wire();
        assert_eq!(frames, [b(b"page"), b(b"unsubscribed")]);
    }

    #[test]
    fn fan_out_is_bounded_replies_are_not() {
        let q = Outbound::new(2 * (H + 5), prometheus::IntGauge::new("t", "t").unwrap());
        assert_eq!(chunk(&q, &[b"12345"]), Pushed::Queued);
        assert_eq!(chunk(&q, &[b"12345"]), Pushed::Queued);
        assert_eq!(chunk(&q, &[b"1"]), Pushed::Full);
        q.push(b(b"ack"));
        assert_eq!(q.queued_bytes(), 2 * (H + 5) + 3);
        assert!(!q.has_space());
        q.close(Some(b(b"err")), 4501, "slow");
        assert_eq!(q.queued_bytes(), 3);
        // A closed queue says so: the caller counts no second slow consumer.
        assert_eq!(chunk(&q, &[b"x"]), Pushed::Closed);
    }

    #[test]
    fn a_chunk_goes_whole_or_not_at_all() {
        let q = Outbound::new(3 * H + 10, prometheus::IntGauge::new("t", "t").unwrap());
        assert_eq!(chunk(&q, &[b"1234", b"1234"]), Pushed::Queued);
        // One of these two frames would fit, both do not.
        assert_eq!(chunk(&q, &[b"1", b"234"]), Pushed::Full);
        assert_eq!(q.queued_bytes(), 2 * H + 8);
    }

    #[test]
    fn what_the_writer_took_counts_until_it_is_written() {
        let gauge = prometheus::IntGauge::new("t", "t").unwrap();
        let q = Outbound::new(2 * H + 10, gauge.clone());
        assert_eq!(chunk(&q, &[b"12345678"]), Pushed::Queued);
        // The writer takes the batch; the socket has not taken it yet.
        let (frames, bytes, _) = q.take();
        assert_eq!((frames.len(), bytes), (1, H + 8));
        assert_eq!(q.queued_bytes(), H + 8);
        assert_eq!(gauge.get(), (H + 8) as i64);
        assert_eq!(chunk(&q, &[b"123"]), Pushed::Full);
        assert!(!q.has_space());
        q.written(bytes);
        assert_eq!((q.queued_bytes(), gauge.get()), (0, 0));
        assert_eq!(chunk(&q, &[b"123"]), Pushed::Queued);
        drop(q);
        assert_eq!(gauge.get(), 0);
    }

    #[tokio::test]
    async fn catch_up_waits_for_half_the_cap_and_never_overfills() {
        let q = std::sync::Arc::new(Outbound::new(
            10,
            prometheus::IntGauge::new("t", "t").unwrap(),
        ));
        // Nothing held: even a frame over half the cap goes.
        assert!(q.push_paced(OutFrame::Whole(b(b"123456")), &open()).await);
        // Two more subscriptions starting now wait instead of pushing past the cap.
        let waiting: Vec<_> = (0..2)
            .map(|_| {
                let q = q.clone();
                tokio::spawn(
                    async move { q.push_paced(OutFrame::Whole(b(b"1234")), &open()).await },
                )
            })
            .collect();
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(q.queued_bytes(), 6);
        // The writer writes it all: one waiting frame fits (4 <= 5), the other waits again.
        let (_, bytes, _) = q.take();
        q.written(bytes);
        q.space.notify_waiters();
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while q.queued_bytes() < 4 {
            assert!(std::time::Instant::now() < end);
            tokio::task::yield_now().await;
        }
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(q.queued_bytes(), 4);
        let (_, bytes, _) = q.take();
        q.written(bytes);
        q.space.notify_waiters();
        for w in waiting {
            assert!(w.await.unwrap());
        }
        assert_eq!(q.queued_bytes(), 4);
        // A closed queue releases the waiters with false.
        let late = {
            let q = q.clone();
            tokio::spawn(async move { q.push_paced(OutFrame::Whole(b(b"12345")), &open()).await })
        };
        q.close(None, 1000, "bye");
        assert!(!late.await.unwrap());
    }
}
