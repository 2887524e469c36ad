//! Lean decoding of `changes` frames for simulated subscribers: only what their checks need —
//! each change's `seq` and the `writer`, `n` and `t` stamps of its body (see
//! [`crate::common::put`]), and the frame's cursor — found by walking the MessagePack without
//! building a document. Decoding every body into maps of strings and values was the harness's
//! largest cost at high fan-out, so the harness, not the gateway, set the limit. Every other
//! frame is decoded in full.

use rmp::decode::{read_array_len, read_int, read_map_len, read_str_from_slice};
use syncgate_protocol::codec::{decode_with_limits, scan, scan_value};
use syncgate_protocol::{Cursor, DecodeError, Frame, Limits};

/// One change as the checks see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeanChange {
    /// Its position in the log.
    pub seq: u64,
    /// `(writer, n, t)` when the body carries them (a document of [`crate::common::put`]).
    pub stamp: Option<(usize, u64, u64)>,
}

/// A frame as a simulated subscriber sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum Lean {
    /// A `changes` frame, reduced to what the checks read.
    Changes {
        /// The subscription.
        sub: u32,
        /// Its changes, in order.
        changes: Vec<LeanChange>,
        /// The cursor after them.
        cursor: Cursor,
    },
    /// Any other frame, decoded in full.
    Other(Frame),
}

const CHANGES: &[u8] = b"\x92\xa7changes";

/// Decodes one message (uncompressed: the harness does not offer compression here).
pub fn decode(bytes: &[u8], limits: &Limits) -> Result<Lean, DecodeError> {
    let Some(rest) = bytes.strip_prefix(CHANGES) else {
        return decode_with_limits(bytes, limits).map(Lean::Other);
    };
    // The same structural check as a full decode: every length fits, nothing trails.
    scan(bytes, limits.max_depth)?;
    let bad = |what: &str| DecodeError::InvalidFields(format!("changes: {what}"));
    let mut rd = rest;
    let (mut sub, mut changes, mut cursor) = (None, Vec::new(), None);
    let fields = read_map_len(&mut rd).map_err(|_| bad("fields are not a map"))?;
    for _ in 0..fields {
        let (key, after) = read_str_from_slice(rd).map_err(|_| bad("a key is not a string"))?;
        rd = after;
        match key {
            "sub" => sub = Some(read_int::<u32, _>(&mut rd).map_err(|_| bad("sub"))?),
            "changes" => {
                let n = read_array_len(&mut rd).map_err(|_| bad("changes is not an array"))?;
                changes.reserve(n as usize);
                for _ in 0..n {
                    changes.push(change(&mut rd)?);
                }
            }
            "cursor" => cursor = Some(read_cursor(&mut rd)?),
            _ => skip(&mut rd)?,
        }
    }
    match (sub, cursor) {
        (Some(sub), Some(cursor)) => Ok(Lean::Changes {
            sub,
            changes,
            cursor,
        }),
        _ => Err(bad("sub or cursor missing")),
    }
}

fn skip(rd: &mut &[u8]) -> Result<(), DecodeError> {
    let used = scan_value(rd, 64)?;
    *rd = rd.get(used..).ok_or(DecodeError::Truncated)?;
    Ok(())
}

fn change(rd: &mut &[u8]) -> Result<LeanChange, DecodeError> {
    let bad = |what: &str| DecodeError::InvalidFields(format!("change: {what}"));
    let fields = read_map_len(rd).map_err(|_| bad("not a map"))?;
    let (mut seq, mut stamp) = (None, None);
    for _ in 0..fields {
        let (key, after) = read_str_from_slice(*rd).map_err(|_| bad("a key is not a string"))?;
        *rd = after;
        match key {
            "seq" => seq = Some(read_int::<u64, _>(rd).map_err(|_| bad("seq"))?),
            "body"
                if rd
                    .first()
                    .is_some_and(|m| matches!(m, 0x80..=0x8f | 0xde | 0xdf)) =>
            {
                stamp = body_stamp(rd)?;
            }
            _ => skip(rd)?,
        }
    }
    Ok(LeanChange {
        seq: seq.ok_or_else(|| bad("seq missing"))?,
        stamp,
    })
}

/// `writer`, `n` and `t` of a body, skipping every other field.
fn body_stamp(rd: &mut &[u8]) -> Result<Option<(usize, u64, u64)>, DecodeError> {
    let bad = |what: &str| DecodeError::InvalidFields(format!("body: {what}"));
    let fields = read_map_len(rd).map_err(|_| bad("not a map"))?;
    let (mut w, mut n, mut t) = (None, None, None);
    for _ in 0..fields {
        let (key, after) = read_str_from_slice(*rd).map_err(|_| bad("a key is not a string"))?;
        *rd = after;
        let slot = match key {
            "writer" => &mut w,
            "n" => &mut n,
            "t" => &mut t,
            _ => {
                skip(rd)?;
                continue;
            }
        };
        // A field of that name that is not an unsigned integer is not a stamp.
        let before = *rd;
        match read_int::<u64, _>(rd) {
            Ok(v) => *slot = Some(v),
            Err(_) => {
                *rd = before;
                skip(rd)?;
            }
        }
    }
    Ok(match (w, n, t) {
        (Some(w), Some(n), Some(t)) => Some((w as usize, n, t)),
        _ => None,
    })
}

fn read_cursor(rd: &mut &[u8]) -> Result<Cursor, DecodeError> {
    let bad = |what: &str| DecodeError::InvalidFields(format!("cursor: {what}"));
    let fields = read_map_len(rd).map_err(|_| bad("not a map"))?;
    let (mut epoch, mut seq) = (None, None);
    for _ in 0..fields {
        let (key, after) = read_str_from_slice(*rd).map_err(|_| bad("a key is not a string"))?;
        *rd = after;
        match key {
            "epoch" => {
                let (e, after) = read_str_from_slice(*rd).map_err(|_| bad("epoch"))?;
                epoch = Some(e.to_owned());
                *rd = after;
            }
            "seq" => seq = Some(read_int::<u64, _>(rd).map_err(|_| bad("seq"))?),
            _ => skip(rd)?,
        }
    }
    match (epoch, seq) {
        (Some(epoch), Some(seq)) => Ok(Cursor { epoch, seq }),
        _ => Err(bad("epoch or seq missing")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::{put_padded, stamp};
    use syncgate_protocol::codec::encode;
    use syncgate_protocol::{Change, ChangeOp, Changes};

    /// The lean decoding reads the same seqs, stamps and cursor as the full one, for frames
    /// with and without stamps, deletes and padding.
    #[test]
    fn agrees_with_the_full_decode() {
        let mut changes: Vec<Change> = (0..20u64)
            .map(|n| {
                let m = put_padded(
                    "run1",
                    (n % 3) as usize,
                    n,
                    n + 1,
                    "work_orders",
                    n as usize,
                );
                Change {
                    seq: 100 + n,
                    collection: m.collection,
                    id: m.id,
                    op: ChangeOp::Upsert,
                    body: m.body,
                }
            })
            .collect();
        changes.push(Change {
            seq: 200,
            collection: "work_orders".into(),
            id: "gone".into(),
            op: ChangeOp::Delete,
            body: None,
        });
        changes.push(Change {
            seq: 201,
            collection: "work_orders".into(),
            id: "other".into(),
            op: ChangeOp::Upsert,
            body: Some([("n".to_owned(), syncgate_protocol::Value::from("text"))].into()),
        });
        let cursor = Cursor {
            epoch: "e1".into(),
            seq: 201,
        };
        let frame = Frame::Changes(Changes {
            sub: 3,
            changes: changes.clone(),
            cursor: cursor.clone(),
        });
        let lean = decode(&encode(&frame), &Limits::default()).unwrap();
        let want: Vec<LeanChange> = changes
            .iter()
            .map(|c| LeanChange {
                seq: c.seq,
                stamp: stamp(c),
            })
            .collect();
        assert_eq!(
            lean,
            Lean::Changes {
                sub: 3,
                changes: want,
                cursor
            }
        );
        // Other frames decode in full; broken ones fail without panicking.
        let ping = Frame::Ping(syncgate_protocol::Ping { nonce: 9 });
        assert_eq!(
            decode(&encode(&ping), &Limits::default()).unwrap(),
            Lean::Other(ping)
        );
        let bytes = encode(&frame);
        for cut in 0..bytes.len() {
            let _ = decode(&bytes[..cut], &Limits::default());
        }
    }
}
