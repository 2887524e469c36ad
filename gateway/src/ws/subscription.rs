//! Starting a subscription: resume from a cursor or send a snapshot, catch up from the log,
//! then hand over to live fan-out with [`Hub::try_go_live`].
//!
//! A cursor older than the collection's compaction horizon (its catch-up would read changes
//! compaction removed: `StoreError::CursorTooOld`) is answered like one from another epoch:
//! `resync` with reason `cursor_too_old`, then a snapshot.
//!
//! The snapshot is taken at position `S` = the committed head, read *before* the documents, so
//! a document read later may already be newer than `S`; the catch-up from `S` then re-sends
//! those changes in order. A client applying changes in order therefore converges, and no
//! change can fall between snapshot and stream.

use std::sync::Arc;

use bytes::Bytes;
use syncgate_protocol::codec::{encode, to_msgpack};
use syncgate_protocol::{Cursor, Frame, Resync, Snapshot};

use crate::error::{ErrorReply, GatewayError, Step};
use crate::shared::Shared;
use crate::storage::{Page, StoreError};
use crate::sync::frames::{changes_frames, deliverable};
use crate::sync::hub::SubEntry;

/// Most documents per snapshot page.
const SNAPSHOT_PAGE: u64 = 500;
/// Most changes per catch-up page.
const CATCH_UP_PAGE: u64 = 1000;

/// Bytes of documents or changes a page may hold (at least one row): the connection's
/// outbound cap, since a page is written into that queue anyway. A subscription that starts
/// on a connection which does not read holds at most one page, whatever the documents' size.
fn page_bytes(shared: &Shared) -> usize {
    shared.config.outbound_buffer_bytes
}

/// Runs until the subscription is live (or the connection goes away, or the client
/// unsubscribes, and this task is aborted). Reads nothing before `not_before` (the connection's
/// `max_subscribes_per_second`).
pub(crate) async fn start(
    shared: Arc<Shared>,
    entry: Arc<SubEntry>,
    cursor: Option<Cursor>,
    not_before: Option<std::time::Instant>,
) {
    if let Some(t) = not_before {
        tokio::time::sleep_until(t.into()).await;
    }
    if let Err(e) = run(&shared, &entry, cursor).await {
        tracing::error!(error = %e, sub = entry.sub, "subscription start failed");
        ErrorReply::from(GatewayError::Storage(Step::Subscription))
            .sub(entry.sub)
            .send(&entry.out, &shared.metrics);
    }
}

async fn run(shared: &Shared, entry: &SubEntry, cursor: Option<Cursor>) -> Result<(), StoreError> {
    let hub = &shared.hub;
    let mut position = match cursor {
        Some(c) if c.epoch != hub.epoch() => {
            resync(shared, entry, "epoch_changed", &c);
            snapshot(shared, entry).await?
        }
        // A cursor at or below what this node has published is behind the committed head:
        // no database read. Only a cursor beyond it (committed on another node and not yet
        // seen here, or from a log that lost its tail) needs the head. A reconnect storm of
        // 10,000 clients otherwise queued 10,000 head reads on the pool, and some timed out.
        Some(c) if c.seq > hub.published() && c.seq > shared.store.head().await? => {
            resync(shared, entry, "cursor_ahead", &c);
            snapshot(shared, entry).await?
        }
        Some(c) => c.seq,
        None => snapshot(shared, entry).await?,
    };
    let mut published = hub.watch_published();
    loop {
        let target = *published.borrow_and_update();
        if position > target {
            // The cursor is ahead of what this node has published (committed elsewhere, or
            // publication in progress): wait for the hub to get there.
            if published.changed().await.is_err() {
                return Ok(());
            }
            continue;
        }
        if position == target {
            if hub.try_go_live(entry, position) {
                return Ok(());
            }
            continue;
        }
        let budget = page_bytes(shared);
        let tail = hub.read_tail(
            &entry.collection,
            position,
            target,
            CATCH_UP_PAGE as usize,
            budget,
        );
        // A page read from the database is read and encoded within one turn of the node's
        // reads; a page from memory needs none.
        let (page, turn) = match tail {
            Some(page) => {
                shared
                    .metrics
                    .catch_up_pages
                    .with_label_values(&["memory"])
                    .inc();
                (page, None)
            }
            None => {
                shared
                    .metrics
                    .catch_up_pages
                    .with_label_values(&["database"])
                    .inc();
                // A filtered or scoped subscriber needs the previous bodies (to see documents
                // leave its view); one that sees everything is never made to hold them.
                let with_prev = !entry.view.is_everything();
                let turn = read_turn(shared).await;
                let read = shared
                    .store
                    .read_changes(
                        &entry.collection,
                        position,
                        target,
                        CATCH_UP_PAGE,
                        budget,
                        with_prev,
                    )
                    .await;
                let page = match read {
                    Err(StoreError::CursorTooOld { .. }) => {
                        // Compaction removed changes after the position: start over from a
                        // snapshot (the client discards what this subscription gave it).
                        drop(turn);
                        let c = Cursor {
                            epoch: hub.epoch().to_owned(),
                            seq: position,
                        };
                        resync(shared, entry, "cursor_too_old", &c);
                        position = snapshot(shared, entry).await?;
                        continue;
                    }
                    other => other?,
                };
                let page = Page {
                    items: page.items.into_iter().map(Arc::new).collect(),
                    more: page.more,
                };
                (page, turn)
            }
        };
        let upto = match page.items.last() {
            Some(last) if page.more => last.change.seq,
            _ => target,
        };
        let page = page.items;
        let parts: Vec<(u64, &[u8])> = page
            .iter()
            .filter_map(|e| Some((e.change.seq, deliverable(e, &entry.view)?)))
            .collect();
        let frames = changes_frames(entry.sub, &parts, hub.epoch(), upto, hub.frame_budget());
        drop(parts);
        drop(page);
        // Never held while waiting for a client to read.
        drop(turn);
        for frame in frames {
            if !entry.out.push_paced(frame).await {
                return Ok(()); // the connection is closing
            }
        }
        entry.queued_up_to(upto);
        position = upto;
    }
}

/// A turn to read one page from the database and encode it (`node_concurrent_reads`).
pub(crate) async fn read_turn(shared: &Shared) -> Option<tokio::sync::SemaphorePermit<'_>> {
    if let Ok(turn) = shared.reads.try_acquire() {
        return Some(turn);
    }
    shared.metrics.paced.with_label_values(&["read"]).inc();
    // Closed only if the node is gone; the read then fails on its own.
    shared.reads.acquire().await.ok()
}

fn resync(shared: &Shared, entry: &SubEntry, reason: &str, cursor: &Cursor) {
    if let Some(suppressed) = shared.oplog.subscriptions.allow() {
        tracing::info!(
            sub = entry.sub,
            collection = %entry.collection,
            reason,
            cursor_epoch = %crate::oplog::printable(&cursor.epoch),
            cursor_seq = cursor.seq,
            suppressed,
            "resync: the subscription starts over from a snapshot"
        );
    }
    shared.metrics.resyncs.with_label_values(&[reason]).inc();
    entry.out.push(Bytes::from(encode(&Frame::Resync(Resync {
        sub: entry.sub,
        reason: reason.to_owned(),
    }))));
}

/// Sends the snapshot in chunks (at least one, possibly empty) and returns its position: the
/// committed head read before the documents, so everything committed before the subscription
/// is in the snapshot and is not sent again by the catch-up.
async fn snapshot(shared: &Shared, entry: &SubEntry) -> Result<u64, StoreError> {
    let position = shared.store.head().await?;
    let mut after: Option<String> = None;
    loop {
        let turn = read_turn(shared).await;
        let page = shared
            .store
            .documents_page(
                &entry.collection,
                after.as_deref(),
                SNAPSHOT_PAGE,
                page_bytes(shared),
            )
            .await?;
        shared.metrics.snapshot_pages.inc();
        let full = page.more;
        let page = page.items;
        after = page.last().map(|d| d.id.clone());
        // Chunks of at most the frame budget (a single larger document goes alone).
        let mut chunks: Vec<Vec<_>> = Vec::new();
        let mut bytes = usize::MAX;
        for d in page {
            if !entry.view.matches(&d.body) {
                continue;
            }
            let size = to_msgpack(&d.body).len() + d.id.len() + 16;
            if bytes.saturating_add(size) > shared.hub.frame_budget() {
                chunks.push(Vec::new());
                bytes = 0;
            }
            bytes += size;
            if let Some(c) = chunks.last_mut() {
                c.push(d);
            }
        }
        if chunks.is_empty() && !full {
            // The last page always sends a chunk, even an empty one.
            chunks.push(Vec::new());
        }
        let mut frames: Vec<Bytes> = Vec::with_capacity(chunks.len());
        for docs in chunks {
            frames.push(Bytes::from(encode(&Frame::Snapshot(Snapshot {
                sub: entry.sub,
                docs,
            }))));
        }
        // The page was read, filtered and encoded within one turn; never held while waiting
        // for a client to read.
        drop(turn);
        for frame in frames {
            if !entry.out.push_paced(frame).await {
                return Ok(position); // the connection is closing; its catch-up stops too
            }
        }
        if !full {
            return Ok(position);
        }
    }
}
