//! What a subscriber is sent, as pure functions: which form of a change a filter lets through
//! ([`deliverable`]) and how a run of encoded changes is cut into `Changes` frames within a byte
//! budget, each with the exact cursor it covers ([`changes_frames`], [`frame_budget`]). Used by
//! live fan-out (the hub) and by catch-up (subscription tasks) alike.

use bytes::Bytes;
use syncgate_protocol::codec::encode_changes_frame;
use syncgate_protocol::{Body, Cursor, Filter};

use crate::auth::scope::Scope;
use crate::changes::LogEntry;

/// What one subscription may see of its collection: the documents that match the client's
/// filter *and* lie in the user's row scope (when the collection has one). The scope is the
/// server's; the client cannot widen it.
#[derive(Debug, Clone)]
pub(crate) struct View {
    filter: Filter,
    scope: Option<Scope>,
}

impl View {
    /// The client's `filter` within the user's `scope`.
    pub(crate) fn new(filter: Filter, scope: Option<Scope>) -> View {
        View { filter, scope }
    }

    /// Whether every document is visible (no filter, no scope): then no change needs its
    /// previous body to be judged.
    pub(crate) fn is_everything(&self) -> bool {
        self.filter.is_empty() && self.scope.is_none()
    }

    /// Whether a document with `body` is visible.
    pub(crate) fn matches(&self, body: &Body) -> bool {
        self.filter.matches(body) && self.scope.as_ref().is_none_or(|s| s.matches(body))
    }
}

/// How many bytes of changes one `Changes` (or `Snapshot`) frame carries at most: a quarter of
/// the smaller of the frame limit and the outbound cap, so a frame always fits both and a
/// backlog is cut into many frames rather than one huge one. A single change larger than this
/// still goes, alone in its frame (documents are capped below the frame limit).
pub(crate) fn frame_budget(max_frame_bytes: usize, outbound_cap: usize) -> usize {
    (max_frame_bytes.min(outbound_cap) / 4).max(1024)
}

/// Builds the `Changes` frames that carry `parts` (`(seq, encoded change)`, in seq order) with
/// at most `budget` bytes of changes each. Every frame but the last carries the seq of its last
/// change as its cursor; the last carries `upto` (the position the whole range covers).
pub(crate) fn changes_frames(
    sub: u32,
    parts: &[(u64, &[u8])],
    epoch: &str,
    upto: u64,
    budget: usize,
) -> Vec<Bytes> {
    let mut frames = Vec::new();
    let mut rest = parts;
    while !rest.is_empty() {
        // The first change always goes (a single larger change goes alone), then as many as
        // fit the budget.
        let mut bytes = 0;
        let mut n = 0;
        for p in rest {
            if n > 0 && bytes + p.1.len() > budget {
                break;
            }
            bytes += p.1.len();
            n += 1;
        }
        let (chunk, tail) = rest.split_at(n);
        let seq = if tail.is_empty() {
            upto
        } else {
            chunk.last().map_or(upto, |p| p.0)
        };
        let cursor = Cursor {
            epoch: epoch.to_owned(),
            seq,
        };
        frames.push(Bytes::from(encode_changes_frame(
            sub,
            chunk.iter().map(|p| p.1),
            &cursor,
        )));
        rest = tail;
    }
    frames
}

/// What a subscriber with `view` receives for `e`: the change itself if the document is
/// visible after the change, a delete if it was visible only before (it left the filter or the
/// scope), nothing otherwise — so a document never seen is never mentioned, not even its id.
pub(crate) fn deliverable<'a>(e: &'a LogEntry, view: &View) -> Option<&'a [u8]> {
    if view.is_everything() {
        return Some(&e.encoded);
    }
    if e.change.body.as_ref().is_some_and(|b| view.matches(b)) {
        return Some(&e.encoded);
    }
    if e.prev_body.as_ref().is_some_and(|b| view.matches(b)) {
        Some(e.leave_encoded())
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use syncgate_protocol::codec::{decode, encode_change};
    use syncgate_protocol::{Change, ChangeOp, Frame, Value};

    fn change(seq: u64, pad: usize) -> Vec<u8> {
        encode_change(&Change {
            seq,
            collection: "c".into(),
            id: format!("d{seq}"),
            op: ChangeOp::Upsert,
            body: Some([("x".to_owned(), Value::from("y".repeat(pad)))].into()),
        })
    }

    #[test]
    fn changes_frames_respect_the_budget_and_carry_exact_cursors() {
        let (a, b, c) = (change(3, 20), change(5, 20), change(9, 200));
        let parts: Vec<(u64, &[u8])> = vec![(3, &a), (5, &b), (9, &c)];
        let budget = a.len() + b.len();
        let frames = changes_frames(7, &parts, "e", 12, budget);
        // a and b fit the budget together; c goes alone; the last cursor is `upto`.
        let got: Vec<(Vec<u64>, u64)> = frames
            .iter()
            .map(|f| match decode(f).unwrap() {
                Frame::Changes(ch) => (ch.changes.iter().map(|c| c.seq).collect(), ch.cursor.seq),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(got, vec![(vec![3, 5], 5), (vec![9], 12)]);
        assert_eq!(changes_frames(7, &parts, "e", 12, 1 << 20).len(), 1);
        assert!(changes_frames(7, &[], "e", 12, 90).is_empty());
    }
}
