//! Each connection's outbound queue, bounded in bytes, and the writer task that drains it.
//!
//! Ownership: the writer task owns the WebSocket sink; everyone else (the connection's reader,
//! its subscription tasks, the hub's publisher) only appends encoded frames here.
//! Bounds: fan-out uses [`Outbound::try_push`], which refuses past the byte cap; the caller then
//! disconnects the subscriber with `slow_consumer`. Replies to the client's own requests use
//! [`Outbound::push`], and the reader stops reading requests while the queue is over its cap
//! ([`Outbound::wait_for_space`]), so a client that does not read cannot grow it either.

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::Bytes;
use futures_util::{Sink, SinkExt};
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

#[derive(Default)]
struct State {
    queue: VecDeque<Bytes>,
    bytes: usize,
    close: Option<Close>,
}

/// A byte-bounded queue of encoded frames.
pub(crate) struct Outbound {
    /// Queue, byte count and close request, under one short lock (never held across await).
    state: Mutex<State>,
    /// Wakes the writer (permit semantics: a wake-up before it waits is not lost).
    wake_writer: Notify,
    /// Wakes tasks waiting for the queue to drain.
    space: Notify,
    /// The byte cap.
    cap: usize,
    /// Cancelled when a close is requested, so the connection's reader stops at once.
    closed: tokio_util::sync::CancellationToken,
    /// The node-wide `syncgate_outbound_queue_bytes` gauge, kept equal to the sum of queues.
    gauge: prometheus::IntGauge,
}

impl Outbound {
    /// A queue holding at most `cap` bytes of fan-out, accounted in `gauge`.
    pub(crate) fn new(cap: usize, gauge: prometheus::IntGauge) -> Outbound {
        Outbound {
            state: Mutex::new(State::default()),
            wake_writer: Notify::new(),
            space: Notify::new(),
            cap,
            closed: tokio_util::sync::CancellationToken::new(),
            gauge,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the queue inconsistent (every update is
        // a single push or swap), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends a fan-out frame unless that would pass the cap. Returns false if refused or
    /// closed.
    pub(crate) fn try_push(&self, frame: Bytes) -> bool {
        let mut s = self.lock();
        if s.close.is_some() || s.bytes + frame.len() > self.cap {
            return false;
        }
        s.bytes += frame.len();
        self.gauge.add(frame.len() as i64);
        s.queue.push_back(frame);
        drop(s);
        self.wake_writer.notify_one();
        true
    }

    /// Appends a reply frame regardless of the cap (callers bound themselves with
    /// [`Outbound::wait_for_space`]). Ignored once closed.
    pub(crate) fn push(&self, frame: Bytes) {
        let mut s = self.lock();
        if s.close.is_some() {
            return;
        }
        s.bytes += frame.len();
        self.gauge.add(frame.len() as i64);
        s.queue.push_back(frame);
        drop(s);
        self.wake_writer.notify_one();
    }

    /// Whether the queue is below half its cap.
    pub(crate) fn has_space(&self) -> bool {
        let s = self.lock();
        s.close.is_some() || s.bytes <= self.cap / 2
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

    /// Bytes currently queued.
    #[cfg(test)]
    pub(crate) fn queued_bytes(&self) -> usize {
        self.lock().bytes
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
            s.queue.push_back(f);
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
        self.wake_writer.notify_one();
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

    /// Takes every queued frame and the close request, if any.
    fn take(&self) -> (VecDeque<Bytes>, usize, Option<Close>) {
        let mut s = self.lock();
        let q = std::mem::take(&mut s.queue);
        let bytes = std::mem::take(&mut s.bytes);
        self.gauge.sub(bytes as i64);
        (q, bytes, s.close.clone())
    }

    /// The writer task: drains everything queued, writes it, flushes once, repeats; ends
    /// after sending the close frame or when the socket fails.
    pub(crate) async fn run_writer<S>(&self, mut sink: S, metrics: Metrics)
    where
        S: Sink<Message> + Unpin,
    {
        loop {
            self.wake_writer.notified().await;
            loop {
                let (frames, _bytes, close) = self.take();
                let n = frames.len();
                if n == 0 && close.is_none() {
                    break;
                }
                let mut ok = true;
                for f in frames {
                    metrics.bytes_out.inc_by(f.len() as u64);
                    if sink.feed(Message::Binary(f)).await.is_err() {
                        ok = false;
                        break;
                    }
                }
                if ok && n > 0 {
                    ok = sink.flush().await.is_ok();
                }
                metrics.frames_out.inc_by(n as u64);
                self.space.notify_waiters();
                if !ok {
                    // The peer is gone: make every producer stop.
                    self.close(None, 1006, "write failed");
                    return;
                }
                if let Some(c) = close {
                    let frame = CloseFrame {
                        code: CloseCode::from(c.code),
                        reason: c.reason.into(),
                    };
                    let _ = sink.send(Message::Close(Some(frame))).await;
                    let _ = sink.close().await;
                    return;
                }
            }
        }
    }
}

impl Drop for Outbound {
    /// Frames still queued when the connection is gone (a writer aborted while the peer did
    /// not read) leave the node-wide gauge with the queue.
    fn drop(&mut self) {
        let bytes = self.lock().bytes;
        self.gauge.sub(bytes as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fan_out_is_bounded_replies_are_not() {
        let q = Outbound::new(10, prometheus::IntGauge::new("t", "t").unwrap());
        assert!(q.try_push(Bytes::from_static(b"12345")));
        assert!(q.try_push(Bytes::from_static(b"12345")));
        assert!(!q.try_push(Bytes::from_static(b"1")));
        q.push(Bytes::from_static(b"ack"));
        assert_eq!(q.queued_bytes(), 13);
        assert!(!q.has_space());
        q.close(Some(Bytes::from_static(b"err")), 4501, "slow");
        assert_eq!(q.queued_bytes(), 3);
        assert!(!q.try_push(Bytes::from_static(b"x")));
    }
}
