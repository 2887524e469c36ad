//! What a subscriber is sent, as pure functions: which form of a change a filter lets through
//! ([`deliverable`]) and how a run of encoded changes is cut into `Changes` frames within a byte
//! budget, each with the exact cursor it covers ([`changes_frames`], [`frame_budget`]). Used by
//! live fan-out (the hub) and by catch-up (subscription tasks) alike.

use bytes::Bytes;
use syncgate_protocol::codec::{encode_changes_frame, encode_changes_tail};
use syncgate_protocol::{Body, Cursor, Filter};

use crate::auth::scope::Scope;
use crate::changes::LogEntry;

/// What one subscription may see of its collection: the documents that match the client's
/// filter *and* lie in the user's row scope (when the collection has one). The scope is the
/// server's; the client cannot widen it.
///
/// Views compare equal when their filter and scope are the same terms: the hub groups the
/// subscribers of a collection by view and judges and encodes each chunk once per group.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct View {
    filter: Filter,
    scope: Option<Scope>,
    /// A hash of the terms (equal views have equal keys; the registry's index).
    key: u64,
}

impl View {
    /// The client's `filter` within the user's `scope`.
    pub(crate) fn new(filter: Filter, scope: Option<Scope>) -> View {
        use std::hash::{Hash, Hasher};
        // The terms hold msgpack values, which are not `Hash` (floats): their debug form is,
        // and it is the same for equal terms.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        format!("{filter:?}{scope:?}").hash(&mut h);
        View {
            filter,
            scope,
            key: h.finish(),
        }
    }

    /// The registry's index of this view: equal views have equal keys.
    pub(crate) fn key(&self) -> u64 {
        self.key
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

/// Cuts `parts` (`(seq, encoded change)`, in seq order) into runs of at most `budget` bytes of
/// changes each (a single larger change goes alone), each with the seq its frame's cursor
/// carries: a run's last seq, or `upto` (the position the whole range covers) for the last run.
fn cut<'p, 'a>(
    parts: &'p [(u64, &'a [u8])],
    upto: u64,
    budget: usize,
) -> impl Iterator<Item = (&'p [(u64, &'a [u8])], u64)> {
    let mut rest = parts;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut bytes = 0;
        let mut n = 0;
        for p in rest {
            if n > 0 && bytes + p.1.len() > budget {
                break;
            }
            bytes += p.1.len();
            n += 1;
        }
        let (run, tail) = rest.split_at(n);
        let seq = if tail.is_empty() {
            upto
        } else {
            run.last().map_or(upto, |p| p.0)
        };
        rest = tail;
        Some((run, seq))
    })
}

/// Builds the `Changes` frames of subscription `sub` that carry `parts` (`(seq, encoded
/// change)`, in seq order) with at most `budget` bytes of changes each. Every frame but the
/// last carries the seq of its last change as its cursor; the last carries `upto`.
pub(crate) fn changes_frames(
    sub: u32,
    parts: &[(u64, &[u8])],
    epoch: &str,
    upto: u64,
    budget: usize,
) -> Vec<Bytes> {
    encode_runs(parts, epoch, upto, budget, |changes, cursor| {
        encode_changes_frame(sub, changes, cursor)
    })
}

/// The same frames as [`changes_frames`] without their heads: the tails every subscriber who
/// is sent `parts` shares (PROTOCOL.md's frame with its `sub` cut off; see
/// [`syncgate_protocol::codec::encode_changes_tail`]). Live fan-out encodes these once per
/// chunk and view; each connection's writer puts its own `sub` in front.
pub(crate) fn changes_tails(
    parts: &[(u64, &[u8])],
    epoch: &str,
    upto: u64,
    budget: usize,
) -> Vec<Bytes> {
    encode_runs(parts, epoch, upto, budget, |changes, cursor| {
        encode_changes_tail(changes, cursor)
    })
}

/// The encoded changes of a run.
type Encoded<'a> =
    std::iter::Map<std::slice::Iter<'a, (u64, &'a [u8])>, fn(&(u64, &'a [u8])) -> &'a [u8]>;

/// Each run [`cut`] gives, encoded by `encode` with its cursor.
fn encode_runs<'a>(
    parts: &'a [(u64, &'a [u8])],
    epoch: &str,
    upto: u64,
    budget: usize,
    encode: impl Fn(Encoded<'a>, &Cursor) -> Vec<u8>,
) -> Vec<Bytes> {
    cut(parts, upto, budget)
        .map(|(run, seq)| {
            let cursor = Cursor {
                epoch: epoch.to_owned(),
                seq,
            };
            let changes: Encoded<'a> = run.iter().map(|p| p.1);
            Bytes::from(encode(changes, &cursor))
        })
        .collect()
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
        // The tails are the same frames without their heads.
        let tails = changes_tails(&parts, "e", 12, budget);
        assert_eq!(tails.len(), frames.len());
        for (frame, tail) in frames.iter().zip(&tails) {
            let mut whole = Vec::new();
            syncgate_protocol::codec::write_changes_head(&mut whole, 7);
            whole.extend_from_slice(tail);
            assert_eq!(&whole[..], &frame[..]);
        }
    }

    #[test]
    fn equal_views_have_equal_keys() {
        let f = |line: u64| Filter::new(&[("line".to_owned(), Value::from(line))].into()).unwrap();
        assert_eq!(View::new(f(1), None), View::new(f(1), None));
        assert_eq!(View::new(f(1), None).key(), View::new(f(1), None).key());
        assert_ne!(View::new(f(1), None), View::new(f(2), None));
        assert_ne!(View::new(f(1), None).key(), View::new(f(2), None).key());
        let everything = View::new(Filter::default(), None);
        assert!(everything.is_everything());
        assert_ne!(everything, View::new(f(1), None));
    }
}
