//! The MessagePack codec.
//!
//! Decoding happens in two passes. [`scan`] walks the bytes without allocating and checks the
//! structure: every length fits in the bytes that remain, nesting stays within `max_depth`, no
//! reserved or extension markers, nothing after the value. Only then does serde build the typed
//! message, so a hostile length prefix can never make the decoder allocate more than the frame
//! itself. Both passes return errors, never panic.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::ErrorCode;
use crate::limits::Limits;
use crate::messages::{Change, ChangeOp, Cursor, Frame, decode_fields, encode_fields};

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The bytes end in the middle of a value.
    #[error("frame is truncated")]
    Truncated,
    /// Bytes follow the frame's value.
    #[error("{0} unexpected bytes after the frame")]
    TrailingBytes(usize),
    /// A reserved marker (0xc1) or an extension type.
    #[error("unsupported MessagePack marker 0x{0:02x}")]
    UnsupportedMarker(u8),
    /// Arrays and maps nest deeper than allowed.
    #[error("nesting deeper than {0}")]
    TooDeep(u32),
    /// The frame is larger than allowed.
    #[error("frame of {size} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// The frame's size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The frame is not `[type, fields]`.
    #[error("frame must be a 2-element array [type, fields]: {0}")]
    BadEnvelope(&'static str),
    /// The message type is unknown.
    #[error("unknown message type {0:?}")]
    UnknownType(String),
    /// A field is missing or has the wrong type.
    #[error("invalid fields: {0}")]
    InvalidFields(String),
    /// A `compressed` frame that may not be inflated: not negotiated, not a valid deflate
    /// stream, or not exactly its declared size.
    #[error("{0}")]
    Compression(String),
}

impl DecodeError {
    /// The stable error code to send back.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::TooDeep(_) => ErrorCode::NestingTooDeep,
            DecodeError::TooLarge { .. } => ErrorCode::FrameTooLarge,
            DecodeError::UnknownType(_) => ErrorCode::UnknownMessage,
            _ => ErrorCode::MalformedFrame,
        }
    }
}

/// Encodes a frame as `[type, fields]`.
pub fn encode(frame: &Frame) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    write_envelope(&mut out, frame.type_name());
    encode_fields(frame, &mut out);
    out
}

/// Decodes a frame with the default limits.
pub fn decode(bytes: &[u8]) -> Result<Frame, DecodeError> {
    decode_with_limits(bytes, &Limits::default())
}

/// Decodes one frame, enforcing `limits.max_frame_bytes` and `limits.max_depth`.
pub fn decode_with_limits(bytes: &[u8], limits: &Limits) -> Result<Frame, DecodeError> {
    if bytes.len() > limits.max_frame_bytes as usize {
        return Err(DecodeError::TooLarge {
            size: bytes.len(),
            limit: limits.max_frame_bytes as usize,
        });
    }
    scan(bytes, limits.max_depth)?;
    let mut rd = bytes;
    let n = rmp::decode::read_array_len(&mut rd)
        .map_err(|_| DecodeError::BadEnvelope("not an array"))?;
    if n != 2 {
        return Err(DecodeError::BadEnvelope("array length is not 2"));
    }
    let (type_name, rest) = rmp::decode::read_str_from_slice(rd)
        .map_err(|_| DecodeError::BadEnvelope("type is not a string"))?;
    if !matches!(rest.first(), Some(0x80..=0x8f | 0xde | 0xdf)) {
        return Err(DecodeError::BadEnvelope("fields are not a map"));
    }
    let (frame, used) = decode_fields(type_name, rest)?;
    if used != rest.len() {
        // The scan already proved there is exactly one value; this is defence in depth.
        return Err(DecodeError::TrailingBytes(rest.len() - used));
    }
    Ok(frame)
}

/// Decodes one WebSocket message: a frame, or, on a connection that negotiated `compression`,
/// a `compressed` frame holding one (inflated within `limits.max_frame_bytes` first; see
/// [`crate::compress`]).
pub fn decode_message(
    bytes: &[u8],
    limits: &Limits,
    compression: Option<crate::compress::Compression>,
) -> Result<Frame, DecodeError> {
    let frame = crate::compress::inflate(bytes, limits, compression)?;
    decode_with_limits(&frame, limits)
}

/// Checks the structure of one MessagePack value spanning all of `bytes`, without allocating
/// in proportion to any length prefix.
pub fn scan(bytes: &[u8], max_depth: u32) -> Result<(), DecodeError> {
    let pos = scan_value(bytes, max_depth)?;
    if pos != bytes.len() {
        return Err(DecodeError::TrailingBytes(bytes.len() - pos));
    }
    Ok(())
}

/// [`scan`] for the one value at the start of `bytes`; returns its length (to skip a value
/// without decoding it).
pub fn scan_value(bytes: &[u8], max_depth: u32) -> Result<usize, DecodeError> {
    // `pending[i]` counts the values still to read in the i-th open container; the root
    // "container" holds exactly one value.
    let mut pending: Vec<u64> = Vec::with_capacity(8);
    pending.push(1);
    let mut pos = 0usize;
    while let Some(top) = pending.last_mut() {
        if *top == 0 {
            pending.pop();
            continue;
        }
        *top -= 1;
        let marker = *bytes.get(pos).ok_or(DecodeError::Truncated)?;
        pos += 1;
        let (skip, children): (usize, u64) = match marker {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (0, 0),
            0x80..=0x8f => (0, 2 * u64::from(marker & 0x0f)),
            0x90..=0x9f => (0, u64::from(marker & 0x0f)),
            0xa0..=0xbf => (usize::from(marker & 0x1f), 0),
            0xc4 | 0xd9 => (read_len(bytes, &mut pos, 1)?, 0),
            0xc5 | 0xda => (read_len(bytes, &mut pos, 2)?, 0),
            0xc6 | 0xdb => (read_len(bytes, &mut pos, 4)?, 0),
            0xca => (4, 0),
            0xcb => (8, 0),
            0xcc | 0xd0 => (1, 0),
            0xcd | 0xd1 => (2, 0),
            0xce | 0xd2 => (4, 0),
            0xcf | 0xd3 => (8, 0),
            0xdc => (0, read_len(bytes, &mut pos, 2)? as u64),
            0xdd => (0, read_len(bytes, &mut pos, 4)? as u64),
            0xde => (0, 2 * read_len(bytes, &mut pos, 2)? as u64),
            0xdf => (0, 2 * read_len(bytes, &mut pos, 4)? as u64),
            // 0xc1 is reserved; 0xc7..=0xc9 and 0xd4..=0xd8 are extension types.
            other => return Err(DecodeError::UnsupportedMarker(other)),
        };
        let remaining = bytes.len() - pos;
        if skip > remaining {
            return Err(DecodeError::Truncated);
        }
        pos += skip;
        let is_container = matches!(marker, 0x80..=0x9f | 0xdc..=0xdf);
        if is_container {
            // Every child takes at least one byte: a count beyond the bytes left is a lie.
            if children > (bytes.len() - pos) as u64 {
                return Err(DecodeError::Truncated);
            }
            if pending.len() as u32 > max_depth {
                return Err(DecodeError::TooDeep(max_depth));
            }
            pending.push(children);
        }
    }
    Ok(pos)
}

fn read_len(bytes: &[u8], pos: &mut usize, width: usize) -> Result<usize, DecodeError> {
    let slice = bytes
        .get(*pos..*pos + width)
        .ok_or(DecodeError::Truncated)?;
    *pos += width;
    let mut n: usize = 0;
    for b in slice {
        n = (n << 8) | usize::from(*b);
    }
    Ok(n)
}

fn write_envelope(out: &mut Vec<u8>, type_name: &str) {
    // Writing into a Vec cannot fail.
    let _ = rmp::encode::write_array_len(out, 2);
    let _ = rmp::encode::write_str(out, type_name);
}

#[allow(
    clippy::expect_used,
    reason = "serialising the crate's own message types into a Vec cannot fail"
)]
pub(crate) fn write_struct<T: Serialize>(out: &mut Vec<u8>, value: &T) {
    // The message types contain only maps with string keys, strings, integers, booleans and
    // rmpv values: serialising them into a Vec cannot fail.
    rmp_serde::encode::write_named(out, value).expect("serialising a message cannot fail");
}

pub(crate) fn read_struct<T: DeserializeOwned>(bytes: &[u8]) -> Result<(T, usize), DecodeError> {
    let mut cur = std::io::Cursor::new(bytes);
    let value = {
        let mut de = rmp_serde::Deserializer::new(&mut cur);
        T::deserialize(&mut de).map_err(|e| DecodeError::InvalidFields(e.to_string()))?
    };
    Ok((value, cur.position() as usize))
}

/// Encodes one change on its own, so that fan-out serialises a change once and splices the
/// bytes into every subscriber's `Changes` frame with [`encode_changes_frame`].
pub fn encode_change(change: &Change) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    write_struct(&mut out, change);
    out
}

/// [`encode_change`] of a change whose body is already encoded (with [`to_msgpack`]): the
/// gateway encodes a new body once, stores those bytes and splices them here, instead of
/// serialising the body again. Byte-identical to `encode_change` of the same change.
pub fn encode_change_with_body(
    seq: u64,
    collection: &str,
    id: &str,
    op: ChangeOp,
    encoded_body: Option<&[u8]>,
) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(48 + collection.len() + id.len() + encoded_body.map_or(0, <[u8]>::len));
    // Writing into a Vec cannot fail.
    let _ = rmp::encode::write_map_len(&mut out, 5);
    let _ = rmp::encode::write_str(&mut out, "seq");
    let _ = rmp::encode::write_uint(&mut out, seq);
    let _ = rmp::encode::write_str(&mut out, "collection");
    let _ = rmp::encode::write_str(&mut out, collection);
    let _ = rmp::encode::write_str(&mut out, "id");
    let _ = rmp::encode::write_str(&mut out, id);
    let _ = rmp::encode::write_str(&mut out, "op");
    let _ = rmp::encode::write_str(
        &mut out,
        match op {
            ChangeOp::Upsert => "upsert",
            ChangeOp::Delete => "delete",
        },
    );
    let _ = rmp::encode::write_str(&mut out, "body");
    match encoded_body {
        Some(b) => out.extend_from_slice(b),
        None => {
            let _ = rmp::encode::write_nil(&mut out);
        }
    }
    out
}

/// Builds a `Changes` frame from pre-encoded changes (see [`encode_change`]). The output is
/// byte-identical to [`encode`] of the equivalent [`Frame::Changes`], and to
/// [`write_changes_head`] followed by [`encode_changes_tail`].
pub fn encode_changes_frame<'a>(
    sub: u32,
    encoded_changes: impl ExactSizeIterator<Item = &'a [u8]> + Clone,
    cursor: &Cursor,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(changes_head_len(sub) + tail_len(&encoded_changes, cursor));
    write_changes_head(&mut out, sub);
    write_changes_tail(&mut out, encoded_changes, cursor);
    out
}

/// The start of a `Changes` frame, up to and including its `sub`: the only part that differs
/// between subscribers who are sent the same changes. [`changes_head_len`] bytes.
pub fn write_changes_head(out: &mut Vec<u8>, sub: u32) {
    write_envelope(out, "changes");
    let _ = rmp::encode::write_map_len(out, 3);
    let _ = rmp::encode::write_str(out, "sub");
    let _ = rmp::encode::write_uint(out, u64::from(sub));
}

/// How many bytes [`write_changes_head`] writes for `sub`.
pub fn changes_head_len(sub: u32) -> usize {
    // [ (1) "changes" (1 + 7) { (1) "sub" (1 + 3) uint
    let uint = match sub {
        0..=127 => 1,
        128..=255 => 2,
        256..=65_535 => 3,
        _ => 5,
    };
    14 + uint
}

/// The rest of a `Changes` frame after its `sub`: the changes and the cursor. Encoded once per
/// chunk and filter, it is shared by every subscriber who is sent those changes; each one's
/// frame is its own [`write_changes_head`] followed by these bytes.
pub fn encode_changes_tail<'a>(
    encoded_changes: impl ExactSizeIterator<Item = &'a [u8]> + Clone,
    cursor: &Cursor,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(tail_len(&encoded_changes, cursor));
    write_changes_tail(&mut out, encoded_changes, cursor);
    out
}

/// An upper bound of the tail's size: the changes, the keys and the cursor (under 50 bytes
/// besides the epoch).
fn tail_len<'a>(
    encoded_changes: &(impl ExactSizeIterator<Item = &'a [u8]> + Clone),
    cursor: &Cursor,
) -> usize {
    let changes: usize = encoded_changes.clone().map(<[u8]>::len).sum();
    50 + cursor.epoch.len() + changes
}

fn write_changes_tail<'a>(
    out: &mut Vec<u8>,
    encoded_changes: impl ExactSizeIterator<Item = &'a [u8]>,
    cursor: &Cursor,
) {
    let _ = rmp::encode::write_str(out, "changes");
    let _ = rmp::encode::write_array_len(out, encoded_changes.len() as u32);
    for c in encoded_changes {
        out.extend_from_slice(c);
    }
    let _ = rmp::encode::write_str(out, "cursor");
    write_struct(out, cursor);
}

/// Encodes any protocol value (a body, a mutation) on its own, as stored by the gateway and the
/// client's outbox. Structs become maps keyed by field name, as on the wire.
pub fn to_msgpack<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    write_struct(&mut out, value);
    out
}

/// Decodes a value written by [`to_msgpack`], with the same structural checks as frames (a
/// generous depth of 128; no size limit: stored values were checked when they came in).
pub fn from_msgpack<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    scan(bytes, 128)?;
    let (value, used) = read_struct::<T>(bytes)?;
    if used != bytes.len() {
        return Err(DecodeError::TrailingBytes(bytes.len() - used));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::*;

    /// Encodes `[type, {k: v, ...}]` from rmpv values, whatever the field types.
    fn raw_frame(kind: &str, fields: Vec<(&str, Value)>) -> Vec<u8> {
        let map = Value::Map(
            fields
                .into_iter()
                .map(|(k, v)| (Value::from(k), v))
                .collect(),
        );
        let mut b = Vec::new();
        rmpv::encode::write_value(&mut b, &Value::Array(vec![Value::from(kind), map])).unwrap();
        b
    }

    #[test]
    fn a_change_with_a_spliced_body_is_byte_identical_to_encode_change() {
        let mut body = Body::new();
        body.insert("qty".into(), Value::from(12));
        body.insert("note".into(), Value::from("é".repeat(40)));
        body.insert("n".into(), Value::from(-3));
        for (seq, op, body) in [
            (1, ChangeOp::Upsert, Some(body.clone())),
            (u64::from(u32::MAX) + 7, ChangeOp::Upsert, Some(Body::new())),
            (300, ChangeOp::Delete, None),
            (u64::MAX, ChangeOp::Upsert, Some(body)),
        ] {
            let change = Change {
                seq,
                collection: "work_orders".into(),
                id: "wo-1".repeat(20),
                op,
                body,
            };
            let encoded_body = change.body.as_ref().map(to_msgpack);
            assert_eq!(
                encode_change_with_body(
                    change.seq,
                    &change.collection,
                    &change.id,
                    change.op,
                    encoded_body.as_deref()
                ),
                encode_change(&change),
                "{change:?}"
            );
        }
    }

    #[test]
    fn nil_means_not_given_for_every_optional_field() {
        let hello = raw_frame(
            "hello",
            vec![
                ("versions", Value::Array(vec![Value::from(1)])),
                ("client_id", Value::from("c1")),
                ("token", Value::from("t")),
                ("agent", Value::Nil),
            ],
        );
        match decode(&hello) {
            Ok(Frame::Hello(h)) => assert_eq!(h.agent, ""),
            other => panic!("{other:?}"),
        }
        let sub = raw_frame(
            "subscribe",
            vec![
                ("sub", Value::from(3)),
                ("collection", Value::from("machines")),
                ("filter", Value::Nil),
                ("cursor", Value::Nil),
            ],
        );
        match decode(&sub) {
            Ok(Frame::Subscribe(s)) => assert!(s.filter.is_empty() && s.cursor.is_none()),
            other => panic!("{other:?}"),
        }
        // A hello without a token decodes; the gateway answers it with 200, not 100.
        let no_token = raw_frame(
            "hello",
            vec![
                ("versions", Value::Array(vec![Value::from(1)])),
                ("client_id", Value::from("c1")),
            ],
        );
        match decode(&no_token) {
            Ok(Frame::Hello(h)) => assert_eq!(h.token, ""),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rejects_trailing_bytes() {
        let mut b = encode(&Frame::Ping(Ping { nonce: 7 }));
        b.push(0xc0);
        assert_eq!(decode(&b), Err(DecodeError::TrailingBytes(1)));
    }

    #[test]
    fn rejects_lying_lengths_without_allocating() {
        // array32 claiming 4 billion elements in a 5-byte frame.
        assert_eq!(
            decode(&[0xdd, 0xff, 0xff, 0xff, 0xff]),
            Err(DecodeError::Truncated)
        );
        // str32 claiming 4 GiB.
        assert_eq!(
            decode(&[0xdb, 0xff, 0xff, 0xff, 0xff]),
            Err(DecodeError::Truncated)
        );
    }

    #[test]
    fn rejects_deep_nesting() {
        let bytes = vec![0x91; 100]
            .into_iter()
            .chain([0xc0])
            .collect::<Vec<_>>();
        assert_eq!(decode(&bytes), Err(DecodeError::TooDeep(32)));
    }

    #[test]
    fn rejects_reserved_and_ext() {
        assert_eq!(decode(&[0xc1]), Err(DecodeError::UnsupportedMarker(0xc1)));
        assert_eq!(
            decode(&[0xd4, 0x01, 0x00]),
            Err(DecodeError::UnsupportedMarker(0xd4))
        );
    }

    #[test]
    fn unknown_type_and_bad_envelope() {
        let mut b = Vec::new();
        rmp::encode::write_array_len(&mut b, 2).unwrap();
        rmp::encode::write_str(&mut b, "nope").unwrap();
        rmp::encode::write_map_len(&mut b, 0).unwrap();
        assert_eq!(decode(&b), Err(DecodeError::UnknownType("nope".into())));
        assert!(matches!(decode(&[0x90]), Err(DecodeError::BadEnvelope(_))));
        // Fields given as an array are refused: the spec says map.
        assert!(matches!(
            decode(&[0x92, 0xa4, b'p', b'i', b'n', b'g', 0x91, 0x01]),
            Err(DecodeError::BadEnvelope(_))
        ));
    }

    #[test]
    fn too_large() {
        let limits = Limits {
            max_frame_bytes: 4,
            ..Limits::default()
        };
        let b = encode(&Frame::Ping(Ping { nonce: 7 }));
        assert!(matches!(
            decode_with_limits(&b, &limits),
            Err(DecodeError::TooLarge { .. })
        ));
    }

    #[test]
    fn changes_frame_builder_matches_encode() {
        let changes = vec![
            Change {
                seq: 5,
                collection: "machines".into(),
                id: "m1".into(),
                op: ChangeOp::Upsert,
                body: Some(Body::from([("state".to_owned(), Value::from("idle"))])),
            },
            Change {
                seq: 300,
                collection: "machines".into(),
                id: "m2".into(),
                op: ChangeOp::Delete,
                body: None,
            },
        ];
        let cursor = Cursor {
            epoch: "e1".into(),
            seq: 300,
        };
        let encoded: Vec<Vec<u8>> = changes.iter().map(encode_change).collect();
        let built = encode_changes_frame(70000, encoded.iter().map(|v| v.as_slice()), &cursor);
        let frame = Frame::Changes(Changes {
            sub: 70000,
            changes,
            cursor,
        });
        assert_eq!(built, encode(&frame));
        assert_eq!(decode(&built).unwrap(), frame);
    }

    /// A frame is its subscriber's head followed by the shared tail, for every width of `sub`,
    /// and the head's length is what `changes_head_len` says (the outbound cap counts on it).
    #[test]
    fn a_changes_frame_is_its_head_followed_by_the_shared_tail() {
        let change = Change {
            seq: 9,
            collection: "c".into(),
            id: "d".into(),
            op: ChangeOp::Delete,
            body: None,
        };
        let encoded = encode_change(&change);
        let cursor = Cursor {
            epoch: "e".into(),
            seq: 9,
        };
        let tail = encode_changes_tail(std::iter::once(&encoded[..]), &cursor);
        for sub in [0, 1, 127, 128, 255, 256, 65_535, 65_536, u32::MAX] {
            let mut frame = Vec::new();
            write_changes_head(&mut frame, sub);
            assert_eq!(frame.len(), changes_head_len(sub), "sub {sub}");
            frame.extend_from_slice(&tail);
            assert_eq!(
                frame,
                encode_changes_frame(sub, std::iter::once(&encoded[..]), &cursor)
            );
            assert_eq!(
                frame,
                encode(&Frame::Changes(Changes {
                    sub,
                    changes: vec![change.clone()],
                    cursor: cursor.clone(),
                }))
            );
        }
    }
}
