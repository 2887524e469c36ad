//! Committed changes as the gateway holds them: each change with its wire encoding, made once
//! for every subscriber, and the groups the log follower publishes. A leaf module: storage
//! reads and writes these, ingest produces them, sync fans them out.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use syncgate_protocol::codec::{encode_change, encode_change_with_body};
use syncgate_protocol::{Body, Change, ChangeOp};

/// One committed change, with its wire encoding made once for every subscriber.
#[derive(Debug)]
pub struct LogEntry {
    /// The change as sent to clients.
    pub change: Change,
    /// The body before the change (for filter membership of deletes and of documents that
    /// moved out of a filter).
    pub prev_body: Option<Body>,
    /// `encode_change(&change)`, made once.
    pub encoded: Bytes,
    /// The "left the filter" form (a delete), made at most once, on first use.
    leave: OnceLock<Bytes>,
}

impl LogEntry {
    /// Builds an entry and encodes it.
    pub fn new(change: Change, prev_body: Option<Body>) -> LogEntry {
        let encoded = Bytes::from(encode_change(&change));
        LogEntry {
            change,
            prev_body,
            encoded,
            leave: OnceLock::new(),
        }
    }

    /// Builds an entry from a change whose body is already encoded (`to_msgpack` of the body,
    /// as stored): the body is spliced into the change's encoding, not serialised again.
    pub fn with_encoded_body(
        change: Change,
        prev_body: Option<Body>,
        encoded_body: Option<&[u8]>,
    ) -> LogEntry {
        let encoded = Bytes::from(encode_change_with_body(
            change.seq,
            &change.collection,
            &change.id,
            change.op,
            encoded_body,
        ));
        LogEntry {
            change,
            prev_body,
            encoded,
            leave: OnceLock::new(),
        }
    }

    /// The encoding sent to a filtered subscriber for whom the document left the filter: a
    /// delete of the same id at the same seq. Encoded once, on first use.
    pub fn leave_encoded(&self) -> &[u8] {
        self.leave.get_or_init(|| {
            Bytes::from(encode_change_with_body(
                self.change.seq,
                &self.change.collection,
                &self.change.id,
                ChangeOp::Delete,
                None,
            ))
        })
    }
}

/// A committed group: the seq range it covers and its entries in seq order.
#[derive(Debug)]
pub(crate) struct Committed {
    /// The head before the group (the group covers `from+1..=to`).
    pub from: u64,
    /// The head after the group.
    pub to: u64,
    /// The changes, in seq order.
    pub entries: Vec<Arc<LogEntry>>,
}
