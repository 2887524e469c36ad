//! Negotiated frame compression (PROTOCOL.md §3.15).
//!
//! A client lists the algorithms it accepts in `hello.compression`; the gateway picks one and
//! names it in `welcome.compression`. From then on either side may send any frame as a
//! `compressed` frame, `["compressed", {"size": N, "data": bin}]`, where `data` is the raw
//! deflate stream (RFC 1951, no zlib or gzip header) of the frame's bytes and `size` is their
//! exact length.
//!
//! Inflating is bounded before it starts: `size` must be within the receiver's
//! `max_frame_bytes`, and the output buffer is allocated once at `size` bytes and never grows;
//! a stream that would produce more (a decompression bomb) or fewer bytes is refused, and so is
//! a `compressed` frame inside a `compressed` frame. So the memory a frame costs is bounded by
//! the frame limit whatever the compressed bytes say.

use std::borrow::Cow;

use flate2::{Compress, Decompress, FlushCompress, FlushDecompress, Status};

use crate::codec::{DecodeError, scan_value};
use crate::limits::Limits;

/// The `compressed` frame's type name.
pub const COMPRESSED: &str = "compressed";

/// The bytes every `compressed` frame starts with: a 2-element array and the 10-byte string
/// `"compressed"`.
const PREFIX: &[u8] = b"\x92\xaacompressed";

/// A compression algorithm both sides may use once negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Raw deflate (RFC 1951).
    Deflate,
}

impl Compression {
    /// Every algorithm this crate implements, in the order a client offers them.
    pub const ALL: &'static [Compression] = &[Compression::Deflate];

    /// The algorithm's name on the wire.
    pub fn name(self) -> &'static str {
        match self {
            Compression::Deflate => "deflate",
        }
    }

    /// The algorithm named `name`, if this crate implements it.
    pub fn from_name(name: &str) -> Option<Compression> {
        Compression::ALL.iter().copied().find(|c| c.name() == name)
    }

    /// The names a client puts in `hello.compression`.
    pub fn offer() -> Vec<String> {
        Compression::ALL
            .iter()
            .map(|c| c.name().to_owned())
            .collect()
    }

    /// The first offered algorithm this crate implements (the client's preference wins).
    pub fn choose(offered: &[String]) -> Option<Compression> {
        offered.iter().find_map(|n| Compression::from_name(n))
    }
}

/// Wraps an encoded frame in a `compressed` frame at deflate `level` (0–9), or returns `None`
/// when that would not make it smaller.
pub fn compress(frame: &[u8], level: u32) -> Option<Vec<u8>> {
    wrap(frame, level).filter(|out| out.len() < frame.len())
}

/// `frame` as a `compressed` frame, whatever its size.
fn wrap(frame: &[u8], level: u32) -> Option<Vec<u8>> {
    let mut c = Compress::new(flate2::Compression::new(level.min(9)), false);
    // The output never grows: deflate's worst case (stored blocks) adds 5 bytes per 64 KiB.
    let mut deflated = Vec::with_capacity(frame.len() + frame.len() / 16_000 + 64);
    match c.compress_vec(frame, &mut deflated, FlushCompress::Finish) {
        Ok(Status::StreamEnd) => {}
        _ => return None,
    }
    let mut out = Vec::with_capacity(deflated.len() + 32);
    out.extend_from_slice(PREFIX);
    // Writing into a Vec cannot fail.
    let _ = rmp::encode::write_map_len(&mut out, 2);
    let _ = rmp::encode::write_str(&mut out, "size");
    let _ = rmp::encode::write_uint(&mut out, frame.len() as u64);
    let _ = rmp::encode::write_str(&mut out, "data");
    let _ = rmp::encode::write_bin(&mut out, &deflated);
    Some(out)
}

/// Whether `bytes` is a `compressed` frame (by its first bytes; nothing is checked).
pub fn is_compressed(bytes: &[u8]) -> bool {
    bytes.starts_with(PREFIX)
}

/// The frame `bytes` carries: `bytes` itself, or, for a `compressed` frame on a connection
/// that negotiated `negotiated`, the inflated frame (bounded as the module docs say).
pub fn inflate<'a>(
    bytes: &'a [u8],
    limits: &Limits,
    negotiated: Option<Compression>,
) -> Result<Cow<'a, [u8]>, DecodeError> {
    let Some(rest) = bytes.strip_prefix(PREFIX) else {
        return Ok(Cow::Borrowed(bytes));
    };
    let Some(Compression::Deflate) = negotiated else {
        return Err(DecodeError::Compression(
            "compressed frame on a connection that did not negotiate compression".into(),
        ));
    };
    if bytes.len() > limits.max_frame_bytes as usize {
        return Err(DecodeError::TooLarge {
            size: bytes.len(),
            limit: limits.max_frame_bytes as usize,
        });
    }
    let (size, data) = fields(rest)?;
    let limit = limits.max_frame_bytes as usize;
    let size = usize::try_from(size)
        .ok()
        .filter(|s| *s <= limit)
        .ok_or(DecodeError::TooLarge {
            size: usize::try_from(size).unwrap_or(usize::MAX),
            limit,
        })?;
    // The only allocation: exactly the declared size, which the limit bounds.
    let mut out = Vec::with_capacity(size);
    let mut d = Decompress::new(false);
    let status = d
        .decompress_vec(data, &mut out, FlushDecompress::Finish)
        .map_err(|e| DecodeError::Compression(format!("invalid deflate stream: {e}")))?;
    if status != Status::StreamEnd {
        // Either the output is full and the stream goes on, or the stream is cut short.
        return Err(DecodeError::Compression(if out.len() >= size {
            format!("inflates to more than its declared size of {size} bytes")
        } else {
            "deflate stream is truncated".into()
        }));
    }
    if out.len() != size {
        return Err(DecodeError::Compression(format!(
            "inflates to {} bytes, not its declared size of {size}",
            out.len()
        )));
    }
    if d.total_in() != data.len() as u64 {
        return Err(DecodeError::Compression(
            "bytes after the end of the deflate stream".into(),
        ));
    }
    if is_compressed(&out) {
        return Err(DecodeError::Compression(
            "a compressed frame inside a compressed frame".into(),
        ));
    }
    Ok(Cow::Owned(out))
}

/// `size` and `data` of a `compressed` frame's field map (`rest`: the bytes after the type).
fn fields(rest: &[u8]) -> Result<(u64, &[u8]), DecodeError> {
    let mut rd = rest;
    let n = rmp::decode::read_map_len(&mut rd)
        .map_err(|_| DecodeError::BadEnvelope("fields are not a map"))?;
    let (mut size, mut data) = (None, None);
    for _ in 0..n {
        let (key, after) = rmp::decode::read_str_from_slice(rd)
            .map_err(|_| DecodeError::InvalidFields("field names must be strings".into()))?;
        rd = after;
        match key {
            "size" => {
                size = Some(rmp::decode::read_int::<u64, _>(&mut rd).map_err(|_| {
                    DecodeError::InvalidFields("size must be a non-negative integer".into())
                })?)
            }
            "data" => {
                let len = rmp::decode::read_bin_len(&mut rd)
                    .map_err(|_| DecodeError::InvalidFields("data must be binary".into()))?;
                let (d, after) = rd
                    .split_at_checked(len as usize)
                    .ok_or(DecodeError::Truncated)?;
                data = Some(d);
                rd = after;
            }
            // Unknown fields are ignored (PROTOCOL.md §2).
            _ => {
                let used = scan_value(rd, 8)?;
                rd = rd.get(used..).ok_or(DecodeError::Truncated)?;
            }
        }
    }
    if !rd.is_empty() {
        return Err(DecodeError::TrailingBytes(rd.len()));
    }
    match (size, data) {
        (Some(s), Some(d)) => Ok((s, d)),
        (None, _) => Err(DecodeError::InvalidFields("missing field `size`".into())),
        (_, None) => Err(DecodeError::InvalidFields("missing field `data`".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode_message, encode};
    use crate::messages::{Doc, Frame, Snapshot};

    fn snapshot(n: usize) -> Vec<u8> {
        let docs = (0..n)
            .map(|i| Doc {
                id: format!("wo-{i}"),
                body: [("status".to_owned(), rmpv::Value::from("open"))].into(),
                version: i as u64 + 1,
            })
            .collect();
        encode(&Frame::Snapshot(Snapshot { sub: 1, docs }))
    }

    const DEFLATE: Option<Compression> = Some(Compression::Deflate);

    #[test]
    fn a_compressed_frame_decodes_to_the_frame() {
        let frame = snapshot(200);
        let packed = compress(&frame, 6).unwrap();
        assert!(
            packed.len() * 4 < frame.len(),
            "{} vs {}",
            packed.len(),
            frame.len()
        );
        let limits = Limits::default();
        assert_eq!(inflate(&packed, &limits, DEFLATE).unwrap(), &frame[..]);
        assert_eq!(
            decode_message(&packed, &limits, DEFLATE).unwrap(),
            decode_message(&frame, &limits, None).unwrap()
        );
        // A frame that does not shrink is not wrapped.
        assert!(compress(b"\x92\xa4ping\x80", 6).is_none());
    }

    #[test]
    fn only_a_negotiated_connection_accepts_one() {
        let packed = compress(&snapshot(50), 6).unwrap();
        let e = inflate(&packed, &Limits::default(), None).unwrap_err();
        assert!(matches!(e, DecodeError::Compression(_)), "{e:?}");
    }

    /// A bomb: a few hundred bytes that would inflate to 16 MiB. Refused on the declared size
    /// before anything is inflated, and, when it lies about its size, after exactly that many
    /// bytes.
    #[test]
    fn a_decompression_bomb_is_refused_within_the_frame_limit() {
        let big = vec![0u8; 16 << 20];
        let mut c = Compress::new(flate2::Compression::best(), false);
        let mut deflated = Vec::with_capacity(1 << 20);
        assert_eq!(
            c.compress_vec(&big, &mut deflated, FlushCompress::Finish)
                .unwrap(),
            Status::StreamEnd
        );
        assert!(deflated.len() < 64 * 1024);
        let frame = |size: u64| {
            let mut out = PREFIX.to_vec();
            rmp::encode::write_map_len(&mut out, 2).unwrap();
            rmp::encode::write_str(&mut out, "size").unwrap();
            rmp::encode::write_uint(&mut out, size).unwrap();
            rmp::encode::write_str(&mut out, "data").unwrap();
            rmp::encode::write_bin(&mut out, &deflated).unwrap();
            out
        };
        let limits = Limits::default();
        let honest = inflate(&frame(16 << 20), &limits, DEFLATE).unwrap_err();
        assert_eq!(
            honest,
            DecodeError::TooLarge {
                size: 16 << 20,
                limit: 1 << 20
            }
        );
        assert_eq!(honest.code(), crate::ErrorCode::FrameTooLarge);
        let liar = inflate(&frame(1000), &limits, DEFLATE).unwrap_err();
        assert!(
            matches!(&liar, DecodeError::Compression(m) if m.contains("more than its declared")),
            "{liar:?}"
        );
        assert_eq!(liar.code(), crate::ErrorCode::MalformedFrame);
        let huge = inflate(&frame(u64::MAX), &limits, DEFLATE).unwrap_err();
        assert!(matches!(huge, DecodeError::TooLarge { .. }), "{huge:?}");
    }

    #[test]
    fn broken_compressed_frames_get_errors_not_panics() {
        let frame = snapshot(100);
        let packed = compress(&frame, 6).unwrap();
        let limits = Limits::default();
        for cut in 0..packed.len() {
            let _ = inflate(&packed[..cut], &limits, DEFLATE);
        }
        for i in PREFIX.len()..packed.len() {
            let mut bad = packed.clone();
            bad[i] ^= 0x5a;
            if let Ok(inner) = inflate(&bad, &limits, DEFLATE) {
                let _ = decode_message(&inner, &limits, DEFLATE);
            }
        }
        // A size that is too small for what the stream holds, or too large.
        let size = frame.len() as u64;
        for wrong in [size - 1, size + 1] {
            let e = inflate(&rewrite_size(&packed, wrong), &limits, DEFLATE).unwrap_err();
            assert!(matches!(e, DecodeError::Compression(_)), "{e:?}");
        }
        // The right size with an unknown field beside it decodes.
        let fine = rewrite_size(&packed, size);
        assert_eq!(inflate(&fine, &limits, DEFLATE).unwrap(), &frame[..]);
        // A compressed frame inside a compressed frame.
        let nested = inflate(&wrap(&packed, 6).unwrap(), &limits, DEFLATE).unwrap_err();
        assert!(
            matches!(&nested, DecodeError::Compression(m) if m.contains("inside")),
            "{nested:?}"
        );
    }

    fn rewrite_size(packed: &[u8], size: u64) -> Vec<u8> {
        let (_, data) = fields(&packed[PREFIX.len()..]).unwrap();
        let mut out = PREFIX.to_vec();
        rmp::encode::write_map_len(&mut out, 3).unwrap();
        rmp::encode::write_str(&mut out, "size").unwrap();
        rmp::encode::write_uint(&mut out, size).unwrap();
        // An unknown field is skipped.
        rmp::encode::write_str(&mut out, "note").unwrap();
        rmp::encode::write_array_len(&mut out, 1).unwrap();
        rmp::encode::write_str(&mut out, "x").unwrap();
        rmp::encode::write_str(&mut out, "data").unwrap();
        rmp::encode::write_bin(&mut out, data).unwrap();
        out
    }
}
