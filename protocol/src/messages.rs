//! Every frame of the protocol and the values they carry.
//!
//! Field order in each struct is the order on the wire (encoders write maps in declaration
//! order). Decoders accept fields in any order, ignore unknown fields, and treat a missing
//! optional field as nil.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::ErrorCode;
use crate::limits::Limits;

/// Any MessagePack value (document fields, filter values).
pub type Value = rmpv::Value;

/// A document body: a map from field name to value, kept sorted by field name so that equal
/// bodies encode to equal bytes.
pub type Body = BTreeMap<String, Value>;

/// A position in a gateway's change log. `epoch` names the database the log lives in; `seq` is
/// the last change the holder has been given (0 = nothing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// The database's random epoch id; a cursor from another epoch is answered with `Resync`.
    pub epoch: String,
    /// The last change sequence number covered by this cursor.
    pub seq: u64,
}

/// PROTOCOL.md §2: an optional field may be absent or nil, and both mean "not given". For a
/// field whose "not given" is a default value rather than `None`, nil takes that default.
fn nil_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Client → server: opens the session. Must be the first frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// Protocol versions the client speaks.
    pub versions: Vec<u32>,
    /// A stable id for this client installation (its outbox); exactly-once ingest is keyed by it.
    pub client_id: String,
    /// A JWT (HS256) naming the user in its `sub` claim. Absent or nil decodes as empty, which
    /// the gateway refuses with `unauthorized` (200), not as a malformed frame.
    #[serde(default, deserialize_with = "nil_as_default")]
    pub token: String,
    /// Free-form client description, for logs (for example `syncgate-client/0.1`).
    #[serde(default, deserialize_with = "nil_as_default")]
    pub agent: String,
    /// Compression algorithms the client accepts, most preferred first (PROTOCOL.md §3.15;
    /// `"deflate"` is the one defined). Absent or empty: no compression.
    #[serde(
        default,
        deserialize_with = "nil_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub compression: Vec<String>,
}

/// Server → client: the handshake succeeded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// The negotiated protocol version.
    pub version: u32,
    /// An id for this session, for logs and support.
    pub session: String,
    /// The database epoch; cursors carry it.
    pub epoch: String,
    /// The highest `mutation_id` of this client the server has durably applied (0 = none). The
    /// client drops every outbox entry at or below it before replaying the rest.
    pub last_applied_mutation: u64,
    /// Limits the server enforces.
    pub limits: Limits,
    /// The client should send a frame (a `Ping` if idle) at least this often; the server closes
    /// connections silent for three intervals.
    pub heartbeat_ms: u32,
    /// Collections whose mode is `upload_only`: written by clients, never sent down. A client
    /// forgets its copy of such a document once the write is acknowledged. Absent when none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upload_only: Vec<String>,
    /// Milliseconds until the session's token expires (and the session with it, unless a
    /// `refresh` brings a newer token first). Absent for an API key, which does not expire.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_valid_ms: Option<u64>,
    /// The compression algorithm chosen from `hello.compression`: from the `welcome` on,
    /// either side may send any frame compressed with it. Absent: no compression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<String>,
}

/// Client → server: a newer token for the running session (same user, same roles and scope
/// claims), so that the session outlives the token it began with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Refresh {
    /// The new token (a JWT; an API key does not expire and is not refreshed).
    pub token: String,
}

/// Server → client: the `refresh` was accepted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Refreshed {
    /// Milliseconds until the new token expires, and the session with it.
    pub token_valid_ms: u64,
}

/// Client → server: start receiving a collection (optionally filtered).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Subscribe {
    /// Client-chosen id of the subscription, unique on the connection.
    pub sub: u32,
    /// The collection to follow.
    pub collection: String,
    /// Equality filter on top-level fields; an empty map (or nil, or absent) matches every
    /// document.
    #[serde(default, deserialize_with = "nil_as_default")]
    pub filter: Body,
    /// Resume point; nil asks for a snapshot first.
    #[serde(default)]
    pub cursor: Option<Cursor>,
}

/// Client → server: stop a subscription.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Unsubscribe {
    /// The subscription to stop.
    pub sub: u32,
}

/// Server → client: the `unsubscribe` of `sub` is done. Every frame of that subscription
/// came before this one and none comes after it, so the id may be used again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unsubscribed {
    /// The subscription that ended.
    pub sub: u32,
}

/// A document as it exists on the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Doc {
    /// Document id, unique within its collection.
    pub id: String,
    /// The document's fields.
    pub body: Body,
    /// The `seq` of the change that last wrote the document.
    pub version: u64,
}

/// Client → server: read documents by id, once (no subscription). The way into a collection
/// whose `mode` is `never`, and a selective read of any collection the user may read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fetch {
    /// Client-chosen id of the request; the answers carry it.
    pub req: u32,
    /// The collection to read.
    pub collection: String,
    /// The document ids (at most `max_mutations_per_batch`).
    pub ids: Vec<String>,
}

/// Server → client: part of the answer to a `fetch`, in one or more frames; the last has
/// `done`. Every requested id is in exactly one frame's `docs` or `missing`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fetched {
    /// The request answered.
    pub req: u32,
    /// Documents that exist (live) and that the user may see.
    pub docs: Vec<Doc>,
    /// Ids with no such document: never written, deleted, or outside the user's scope (the
    /// three are not told apart).
    pub missing: Vec<String>,
    /// Whether this is the answer's last frame.
    pub done: bool,
}

/// Server → client: one chunk of a subscription's initial snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The subscription this chunk belongs to.
    pub sub: u32,
    /// Live (non-deleted) documents that match the filter.
    pub docs: Vec<Doc>,
}

/// Server → client: the snapshot (or catch-up) is complete; live changes follow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Synced {
    /// The subscription that is now live.
    pub sub: u32,
    /// The position the subscription has reached; store it to resume later.
    pub cursor: Cursor,
}

/// What a change did to a document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeOp {
    /// The document now has `body` (created or replaced; patches arrive merged).
    Upsert,
    /// The document is deleted (a tombstone), or left the subscription's filter.
    Delete,
}

/// One committed change of the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    /// Position in the log; also the document's new version.
    pub seq: u64,
    /// The document's collection.
    pub collection: String,
    /// The document id.
    pub id: String,
    /// Upsert or delete.
    pub op: ChangeOp,
    /// The complete document after the change; nil for a delete.
    #[serde(default)]
    pub body: Option<Body>,
}

/// Server → client: live changes for one subscription, in `seq` order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Changes {
    /// The subscription the changes match.
    pub sub: u32,
    /// The changes, in increasing `seq`.
    pub changes: Vec<Change>,
    /// The position after these changes; store it to resume later.
    pub cursor: Cursor,
}

/// What a mutation asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MutationOp {
    /// Replace the whole body (creating the document if needed).
    Put,
    /// Set the given top-level fields; a nil value removes the field. The document must exist.
    Patch,
    /// Delete the document (a tombstone stays in the log).
    Delete,
}

/// One client write.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Mutation {
    /// Client-assigned, strictly increasing per `client_id`; the exactly-once key.
    pub mutation_id: u64,
    /// Target collection.
    pub collection: String,
    /// Target document id.
    pub id: String,
    /// Put, patch or delete.
    pub op: MutationOp,
    /// The body (put) or the fields to set (patch); nil for delete.
    #[serde(default)]
    pub body: Option<Body>,
    /// The version of the document the client based its edit on: the server version it had
    /// seen, or 0 when it had seen none (a create). A change to the document after that version
    /// by *another* client is a conflict, decided by the collection's policy. Nil: a "blind"
    /// write, which never conflicts (it follows server order, like `lww`).
    #[serde(default)]
    pub base_version: Option<u64>,
    /// The id of a `manual` conflict this mutation resolves (from a result's `conflict.id`):
    /// the mutation is applied as the resolution, whatever changed since its base, and the
    /// conflict is closed. Absent in every other mutation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolves: Option<String>,
}

/// Client → server: a batch of mutations, applied atomically in one transaction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Push {
    /// Client-chosen batch id, echoed in `PushAck`.
    pub batch: u64,
    /// The mutations, in strictly increasing `mutation_id`.
    pub mutations: Vec<Mutation>,
}

/// The outcome of one mutation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MutationStatus {
    /// Applied; `version` is the seq of the change it wrote.
    Applied,
    /// Refused and stored server-side as a sync error; `code` and `reason` say why.
    Rejected,
}

/// The server's side of a conflict that refused a mutation (`first_write_wins`, `manual`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConflictInfo {
    /// The conflict's id, for a `manual` conflict (resolve it with a mutation whose
    /// `resolves` names it); absent for `first_write_wins`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The document's version on the server when the mutation was refused.
    pub version: u64,
    /// The document's body on the server then (nil: deleted).
    #[serde(default)]
    pub body: Option<Body>,
}

/// Per-mutation result inside `PushAck`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MutationResult {
    /// The mutation this result is for.
    pub mutation_id: u64,
    /// Applied or rejected.
    pub status: MutationStatus,
    /// For applied mutations: the document's new version (= the change's seq).
    #[serde(default)]
    pub version: Option<u64>,
    /// For rejected mutations: the numeric error code.
    #[serde(default)]
    pub code: Option<u16>,
    /// For rejected mutations: a human-readable reason.
    #[serde(default)]
    pub reason: Option<String>,
    /// For a mutation refused by a conflict (code 413): the server's version and body, and
    /// for a `manual` conflict its id. Absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conflict: Option<ConflictInfo>,
}

impl MutationResult {
    /// An applied result.
    pub fn applied(mutation_id: u64, version: u64) -> Self {
        MutationResult {
            mutation_id,
            status: MutationStatus::Applied,
            version: Some(version),
            code: None,
            reason: None,
            conflict: None,
        }
    }

    /// A rejected result.
    pub fn rejected(mutation_id: u64, code: ErrorCode, reason: impl Into<String>) -> Self {
        MutationResult {
            mutation_id,
            status: MutationStatus::Rejected,
            version: None,
            code: Some(code.code()),
            reason: Some(reason.into()),
            conflict: None,
        }
    }

    /// A mutation refused by a conflict (`conflict`, 413), with the server's side.
    pub fn conflict(mutation_id: u64, reason: impl Into<String>, conflict: ConflictInfo) -> Self {
        MutationResult {
            conflict: Some(conflict),
            ..MutationResult::rejected(mutation_id, ErrorCode::Conflict, reason)
        }
    }
}

/// Server → client: the batch is durably committed (or was already).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PushAck {
    /// The batch id from `Push`.
    pub batch: u64,
    /// One result per mutation, in the batch's order.
    pub results: Vec<MutationResult>,
    /// The seq at which every effect of the batch is visible: a subscription whose cursor has
    /// reached it has seen the batch's changes (0 if the batch changed nothing).
    pub visible_at: u64,
}

/// Either direction: a heartbeat; the receiver answers with `Pong` carrying the same nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ping {
    /// Echoed in the `Pong`.
    pub nonce: u64,
}

/// Either direction: the answer to `Ping`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pong {
    /// The nonce of the `Ping` answered.
    pub nonce: u64,
    /// Server → client only: the log position the server had published when it answered. Every
    /// change at or below it that matches a subscription which was live (had sent `synced`)
    /// when the `ping` was read has been sent before this `pong`, so such a subscription may
    /// advance its cursor to `head`. Nil when a client answers a ping.
    #[serde(default)]
    pub head: Option<u64>,
}

/// Server → client: something went wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorFrame {
    /// Stable numeric code (see PROTOCOL.md).
    pub code: u16,
    /// Stable name of the code.
    pub name: String,
    /// Human-readable detail; not stable.
    pub message: String,
    /// When true the server closes the connection after this frame.
    pub fatal: bool,
    /// The subscription concerned, if any.
    #[serde(default)]
    pub sub: Option<u32>,
    /// The push batch concerned, if any.
    #[serde(default)]
    pub batch: Option<u64>,
    /// The `fetch` request concerned, if any (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub req: Option<u32>,
}

impl ErrorFrame {
    /// Builds an error frame for a code.
    pub fn new(code: ErrorCode, message: impl Into<String>, fatal: bool) -> Self {
        ErrorFrame {
            code: code.code(),
            name: code.name().to_owned(),
            message: message.into(),
            fatal,
            sub: None,
            batch: None,
            req: None,
        }
    }
}

/// Server → client: the subscription's cursor cannot be resumed; a fresh snapshot follows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resync {
    /// The subscription being reset. Discard its local documents; the snapshot follows.
    pub sub: u32,
    /// Why: `epoch_changed`, `cursor_ahead` or `cursor_too_old`.
    pub reason: String,
}

/// Server → client: the server is going away; reconnect after `retry_after_ms` (with jitter).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GoAway {
    /// Why (for logs).
    pub reason: String,
    /// Wait at least this long, plus random jitter, before reconnecting.
    pub retry_after_ms: u32,
}

macro_rules! frames {
    ($( $variant:ident($ty:ty) = $name:literal ),* $(,)?) => {
        /// Every message of the protocol.
        #[derive(Debug, Clone, PartialEq)]
        pub enum Frame {
            $( #[doc = concat!("`", $name, "`")] $variant($ty), )*
        }

        impl Frame {
            /// The type string written as the first element of the frame array.
            pub fn type_name(&self) -> &'static str {
                match self { $(Frame::$variant(_) => $name,)* }
            }

            /// Every type string, in declaration order.
            pub const TYPE_NAMES: &'static [&'static str] = &[$($name,)*];
        }

        $( impl From<$ty> for Frame { fn from(v: $ty) -> Frame { Frame::$variant(v) } } )*

        pub(crate) fn encode_fields(frame: &Frame, out: &mut Vec<u8>) {
            match frame {
                $(Frame::$variant(v) => crate::codec::write_struct(out, v),)*
            }
        }

        pub(crate) fn decode_fields(
            type_name: &str,
            bytes: &[u8],
        ) -> Result<(Frame, usize), crate::codec::DecodeError> {
            match type_name {
                $($name => {
                    let (v, used) = crate::codec::read_struct::<$ty>(bytes)?;
                    Ok((Frame::$variant(v), used))
                })*
                other => Err(crate::codec::DecodeError::UnknownType(other.to_owned())),
            }
        }
    };
}

frames! {
    Hello(Hello) = "hello",
    Welcome(Welcome) = "welcome",
    Subscribe(Subscribe) = "subscribe",
    Unsubscribe(Unsubscribe) = "unsubscribe",
    Snapshot(Snapshot) = "snapshot",
    Synced(Synced) = "synced",
    Changes(Changes) = "changes",
    Push(Push) = "push",
    PushAck(PushAck) = "push_ack",
    Ping(Ping) = "ping",
    Pong(Pong) = "pong",
    Error(ErrorFrame) = "error",
    Resync(Resync) = "resync",
    GoAway(GoAway) = "goaway",
    Fetch(Fetch) = "fetch",
    Fetched(Fetched) = "fetched",
    Refresh(Refresh) = "refresh",
    Refreshed(Refreshed) = "refreshed",
    Unsubscribed(Unsubscribed) = "unsubscribed",
}
