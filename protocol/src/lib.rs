//! `syncgate-protocol`: the wire contract between syncgate gateways and clients.
//!
//! Every message is one MessagePack value carried in one binary WebSocket frame: a two-element
//! array `[type, fields]` where `type` is a short string and `fields` a map keyed by field name.
//! PROTOCOL.md at the repository root is the normative description; this crate is its reference
//! implementation and the tests check the two agree byte for byte.
//!
//! The crate does no I/O, owns no runtime and never reads the clock — except the optional
//! `tls` module (feature `tls`): the TLS transport the gateway and the SDK share.
//!
//! # Layout
//! - [`messages`]: every frame and the value types they carry (`Mutation`, `Change`, `Cursor` ...).
//! - [`codec`]: [`encode`] / [`decode`], the structural pre-scan that bounds every length before
//!   anything is allocated, and the shared-encoding builder for `Changes` frames used by fan-out.
//! - [`compress`]: negotiated frame compression (raw deflate), inflated within the frame limit.
//! - [`error`]: stable numeric error codes with names.
//! - [`limits`]: the size limits a gateway announces in `Welcome` and enforces.
//! - [`filter`]: equality filters on top-level document fields.
//! - [`apply`]: what a put, patch or delete does to a document body (shared by the gateway and
//!   the client SDK's optimistic replica).

pub mod apply;
pub mod codec;
pub mod compress;
pub mod error;
pub mod filter;
pub mod limits;
pub mod messages;
#[cfg(feature = "tls")]
pub mod tls;

pub use codec::{DecodeError, decode, decode_message, decode_with_limits, encode};
pub use compress::Compression;
pub use error::ErrorCode;
pub use filter::Filter;
pub use limits::Limits;
pub use messages::*;

/// Protocol versions this crate speaks, oldest first.
pub const SUPPORTED_VERSIONS: &[u32] = &[1];

/// Picks the highest version both sides support, if any.
pub fn negotiate_version(offered: &[u32]) -> Option<u32> {
    SUPPORTED_VERSIONS
        .iter()
        .rev()
        .copied()
        .find(|v| offered.contains(v))
}
