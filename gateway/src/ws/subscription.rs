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
/// unsubscribes: the task that runs it stops on [`SubEntry::stopped`]). Reads nothing before `not_before` (the connection's
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
        entry.error(
            ErrorReply::from(GatewayError::Storage(Step::Subscription)),
            &shared.metrics,
        );
    }
}

/// Catches a degraded subscriber up (its queue was full for a live chunk, see
/// [`crate::sync::hub`]) from the position everything before was queued to, leaving out
/// superseded versions when it follows the whole collection, and brings it back live without
/// a `synced` (the client never saw it leave). Still behind after `slow_consumer_deadline_ms`:
/// closed with `slow_consumer`, and it resumes by cursor.
pub(crate) async fn resume(shared: Arc<Shared>, entry: Arc<SubEntry>) {
    let deadline = std::time::Duration::from_millis(shared.config.slow_consumer_deadline_ms);
    let from = entry.position();
    let catch_up = tokio::time::timeout(deadline, follow(&shared, &entry, from, Mode::Degraded));
    let outcome = tokio::select! {
        o = catch_up => o,
        // The node drains: the connection is being closed anyway.
        _ = shared.shutdown.cancelled() => return,
    };
    let metrics = &shared.metrics;
    match outcome {
        Ok(Ok(true)) => metrics
            .slow_consumers
            .with_label_values(&["rejoined"])
            .inc(),
        Ok(Ok(false)) => {} // unsubscribed, or the connection closed
        Ok(Err(e)) => {
            tracing::error!(error = %e, sub = entry.sub, "catch-up of a slow subscriber failed");
            entry.error(
                ErrorReply::from(GatewayError::Storage(Step::Subscription)),
                metrics,
            );
        }
        Err(_) => {
            metrics.slow_consumers.with_label_values(&["dropped"]).inc();
            crate::sync::hub::slow_consumer(&entry.out, metrics);
        }
    }
}

/// How [`follow`] serves a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// A new subscription: every change of the catch-up, then `synced`.
    Start,
    /// A degraded one catching up: superseded versions left out (whole-collection views),
    /// no `synced`.
    Degraded,
}

/// Of a page of changes in seq order, the latest change of each document (the client
/// applying them ends in the same state; the page's cursor covers the rest).
fn conflate(page: &[Arc<crate::changes::LogEntry>]) -> Vec<&crate::changes::LogEntry> {
    let mut last: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for (i, e) in page.iter().enumerate() {
        last.insert(e.change.id.as_str(), i);
    }
    page.iter()
        .enumerate()
        .filter(|(i, e)| last.get(e.change.id.as_str()) == Some(i))
        .map(|(_, e)| e.as_ref())
        .collect()
}

async fn run(shared: &Shared, entry: &SubEntry, cursor: Option<Cursor>) -> Result<(), StoreError> {
    let hub = &shared.hub;
    let position = match cursor {
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
    follow(shared, entry, position, Mode::Start).await?;
    Ok(())
}

/// Catches the subscription up from `position` and makes it live; `Ok(false)` when it ended
/// (or its connection closed) first.
async fn follow(
    shared: &Shared,
    entry: &SubEntry,
    mut position: u64,
    mode: Mode,
) -> Result<bool, StoreError> {
    let hub = &shared.hub;
    let mut published = hub.watch_published();
    // A degraded subscriber rejoins silently, unless it was told to start over (`resync`):
    // then it waits for the `synced` that ends the new snapshot, as at any subscribe.
    let mut announce = mode == Mode::Start;
    loop {
        if entry.is_ended() {
            return Ok(false);
        }
        let target = *published.borrow_and_update();
        if position > target {
            // The cursor is ahead of what this node has published (committed elsewhere, or
            // publication in progress): wait for the hub to get there.
            if published.changed().await.is_err() {
                return Ok(false);
            }
            continue;
        }
        if position == target {
            if hub.try_go_live(entry, position, announce) {
                return Ok(true);
            }
            continue;
        }
        let budget = page_bytes(shared);
        // Unless this page is conflated (a degraded whole-collection subscriber), a page from
        // memory is the same for every subscriber with this view at this position: it is
        // judged and encoded once for all of them, and this subscriber's head goes in front.
        let conflated = mode == Mode::Degraded && entry.view.is_everything();
        let shared_page = match conflated {
            true => None,
            false => hub.shared_page(
                &entry.collection,
                &entry.view,
                position,
                target,
                CATCH_UP_PAGE as usize,
                budget,
            ),
        };
        if let Some(page) = shared_page {
            shared
                .metrics
                .catch_up_pages
                .with_label_values(&["memory"])
                .inc();
            for tail in &page.tails {
                if !entry.push_paced_tail(tail.clone()).await {
                    return Ok(false); // the connection is closing
                }
            }
            entry.queued_up_to(page.upto);
            position = page.upto;
            continue;
        }
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
                        entry.queued_up_to(position);
                        announce = true;
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
        // A degraded subscriber of a whole collection gets each document's latest version
        // only. (With a filter, an older version may be the one that leaves the view.)
        let kept: Vec<&crate::changes::LogEntry> =
            if mode == Mode::Degraded && entry.view.is_everything() {
                conflate(&page)
            } else {
                page.iter().map(AsRef::as_ref).collect()
            };
        let parts: Vec<(u64, &[u8])> = kept
            .iter()
            .filter_map(|e| Some((e.change.seq, deliverable(e, &entry.view)?)))
            .collect();
        let frames = changes_frames(entry.sub, &parts, hub.epoch(), upto, hub.frame_budget());
        drop(parts);
        drop(kept);
        drop(page);
        // Never held while waiting for a client to read.
        drop(turn);
        for frame in frames {
            if !entry.push_paced(frame).await {
                return Ok(false); // the connection is closing
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
    entry.push(Bytes::from(encode(&Frame::Resync(Resync {
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
            if !entry.push_paced(frame).await {
                return Ok(position); // the connection is closing; its catch-up stops too
            }
        }
        if !full {
            return Ok(position);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::changes::LogEntry;
    use syncgate_protocol::{Change, ChangeOp};

    fn entry(seq: u64, id: &str) -> Arc<LogEntry> {
        Arc::new(LogEntry::new(
            Change {
                seq,
                collection: "c".into(),
                id: id.into(),
                op: ChangeOp::Upsert,
                body: Some(Default::default()),
            },
            None,
        ))
    }

    #[test]
    fn conflation_keeps_each_documents_latest_change_in_seq_order() {
        let page = vec![
            entry(1, "a"),
            entry(2, "b"),
            entry(3, "a"),
            entry(4, "c"),
            entry(5, "b"),
            entry(6, "a"),
        ];
        let kept: Vec<u64> = conflate(&page).iter().map(|e| e.change.seq).collect();
        assert_eq!(kept, vec![4, 5, 6]);
        assert!(conflate(&[]).is_empty());
    }
}
