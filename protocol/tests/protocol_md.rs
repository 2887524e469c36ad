//! Every hex example in PROTOCOL.md decodes, and re-encodes to the same bytes; every error
//! code of the crate is listed in PROTOCOL.md with its name.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    reason = "a test fails by panicking"
)]

use syncgate_protocol::codec::{decode, encode};
use syncgate_protocol::{ErrorCode, Frame};

const DOC: &str = include_str!("../../PROTOCOL.md");

fn hex_blocks() -> Vec<Vec<u8>> {
    blocks("```hex\n")
}

fn blocks(fence: &str) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut rest = DOC;
    while let Some(start) = rest.find(fence) {
        let body = &rest[start + fence.len()..];
        let end = body.find("```").expect("unterminated hex block");
        let hex: String = body[..end].split_whitespace().collect();
        out.push(hex::decode(&hex).expect("valid hex"));
        rest = &body[end + 3..];
    }
    out
}

#[test]
fn every_hex_example_round_trips_byte_for_byte() {
    let blocks = hex_blocks();
    assert!(
        blocks.len() >= Frame::TYPE_NAMES.len(),
        "one example per message at least"
    );
    let mut seen = std::collections::BTreeSet::new();
    for bytes in blocks {
        let frame = decode(&bytes)
            .unwrap_or_else(|e| panic!("example {} does not decode: {e}", hex::encode(&bytes)));
        assert_eq!(
            encode(&frame),
            bytes,
            "example {} re-encodes differently",
            frame.type_name()
        );
        seen.insert(frame.type_name());
    }
    for name in Frame::TYPE_NAMES {
        assert!(
            seen.contains(name),
            "PROTOCOL.md has no hex example of {name}"
        );
    }
}

/// The `compressed` example inflates (bounded, as a receiver must) to the snapshot it names,
/// whose bytes re-encode identically.
#[test]
fn the_compressed_example_inflates_to_its_snapshot() {
    use syncgate_protocol::compress::{Compression, inflate, is_compressed};
    let examples = blocks("```compressed-hex\n");
    assert_eq!(examples.len(), 1);
    let packed = &examples[0];
    assert!(is_compressed(packed));
    let limits = syncgate_protocol::Limits::default();
    let inner = inflate(packed, &limits, Some(Compression::Deflate)).unwrap();
    assert_eq!(inner.len(), 234);
    let frame = decode(&inner).unwrap();
    assert_eq!(encode(&frame), &inner[..]);
    let Frame::Snapshot(s) = frame else {
        panic!("not a snapshot: {frame:?}")
    };
    let ids: Vec<_> = s.docs.iter().map(|d| (d.id.as_str(), d.version)).collect();
    assert_eq!(
        ids,
        [("wo-1", 41), ("wo-2", 42), ("wo-3", 43), ("wo-4", 44)]
    );
    assert!(s.docs.iter().all(|d| d.body == s.docs[0].body));
}

#[test]
fn every_error_code_is_documented() {
    for c in ErrorCode::ALL {
        let row = format!("| {} | `{}` |", c.code(), c.name());
        assert!(DOC.contains(&row), "PROTOCOL.md lacks the row {row}");
    }
}
