//! Stable error codes. The numbers and names are part of the wire contract: never renumber,
//! only add. PROTOCOL.md lists them; a test checks that list against this enum.

use std::fmt;

macro_rules! error_codes {
    ($( $(#[doc = $doc:literal])* $variant:ident = $num:literal, $name:literal, $retry:literal; )*) => {
        /// A stable error code, sent in `Error.code` and in rejected `PushAck` results.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum ErrorCode {
            $( $(#[doc = $doc])* $variant, )*
        }

        impl ErrorCode {
            /// Every code, in numeric order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant,)*];

            /// The numeric code carried on the wire.
            pub fn code(self) -> u16 {
                match self { $(ErrorCode::$variant => $num,)* }
            }

            /// The stable snake_case name carried beside the number.
            pub fn name(self) -> &'static str {
                match self { $(ErrorCode::$variant => $name,)* }
            }

            /// Whether retrying the same request later can succeed (after a reconnect, a
            /// backoff, or a fresh token) as opposed to a request that is wrong as sent.
            pub fn retryable(self) -> bool {
                match self { $(ErrorCode::$variant => $retry,)* }
            }

            /// Looks a code up by number.
            pub fn from_code(code: u16) -> Option<ErrorCode> {
                match code { $($num => Some(ErrorCode::$variant),)* _ => None }
            }
        }
    };
}

error_codes! {
    /// The frame is not MessagePack, or not `[type, fields]`, or a field has the wrong type.
    MalformedFrame = 100, "malformed_frame", false;
    /// The frame is larger than `max_frame_bytes`.
    FrameTooLarge = 101, "frame_too_large", false;
    /// The message type is not one this version knows.
    UnknownMessage = 102, "unknown_message", false;
    /// No protocol version in `Hello.versions` is supported by the server.
    UnsupportedVersion = 103, "unsupported_version", false;
    /// A message other than `Hello` arrived before the handshake completed.
    HandshakeRequired = 104, "handshake_required", false;
    /// A second `Hello` arrived on an established session.
    DuplicateHello = 105, "duplicate_hello", false;
    /// A text WebSocket frame arrived; syncgate speaks binary frames only.
    TextFrameNotSupported = 106, "text_frame_not_supported", false;
    /// Arrays and maps are nested deeper than `max_depth`.
    NestingTooDeep = 107, "nesting_too_deep", false;
    /// The token is missing, malformed, wrongly signed, or names no user.
    Unauthorized = 200, "unauthorized", false;
    /// The client id is empty, too long or contains control characters.
    InvalidClientId = 201, "invalid_client_id", false;
    /// The token has expired: fetch a new one and reconnect.
    TokenExpired = 202, "token_expired", true;
    /// The `client_id` belongs to another user (the subject that first used it); an
    /// administrator can reassign it.
    ClientIdTaken = 203, "client_id_taken", false;
    /// The user already holds `max_connections_per_user` sessions on this node; retry after
    /// one of them ends.
    TooManyConnections = 204, "too_many_connections", true;
    /// The user already owns `max_client_ids_per_user` client ids and this one is new: reuse
    /// an installation's id, or ask an administrator to raise the quota or reassign ids.
    ClientQuotaExceeded = 205, "client_quota_exceeded", false;
    /// A `refresh` was refused (an invalid or expired token, another user, other rights, an
    /// API key): the session goes on until its current token expires.
    RefreshRefused = 206, "refresh_refused", false;
    /// The collection is not declared on this gateway.
    UnknownCollection = 300, "unknown_collection", false;
    /// The subscription filter is invalid (a field name that is not a string, a nested value).
    InvalidFilter = 301, "invalid_filter", false;
    /// A subscription with this `sub` id is already active on the connection.
    DuplicateSubscription = 302, "duplicate_subscription", false;
    /// No active subscription has this `sub` id.
    UnknownSubscription = 303, "unknown_subscription", false;
    /// The connection already holds `max_subscriptions` subscriptions.
    TooManySubscriptions = 304, "too_many_subscriptions", false;
    /// The user's roles do not include one that may read the collection.
    ReadForbidden = 305, "read_forbidden", false;
    /// The collection's `mode` does not send documents down: `upload_only` (no subscription,
    /// no fetch) or `never` (no subscription; `fetch` its documents by id).
    NotDownloadable = 306, "not_downloadable", false;
    /// A `fetch` names no ids, more than `max_mutations_per_batch`, or an invalid id.
    InvalidFetch = 307, "invalid_fetch", false;
    /// A position to read the log from is older than the collection's compaction horizon:
    /// changes after it were removed. Over WebSocket this is a `resync` (reason
    /// `cursor_too_old`) and a fresh snapshot; over HTTP (`/v1/changes`) the reader starts
    /// again from a full read of the collection.
    CursorTooOld = 308, "cursor_too_old", false;
    /// The mutation is not well formed (a put or patch without a body, a delete with one ...).
    InvalidMutation = 400, "invalid_mutation", false;
    /// The batch holds more than `max_mutations_per_batch` mutations.
    BatchTooLarge = 401, "batch_too_large", false;
    /// A document body is larger than `max_document_bytes` once merged.
    DocumentTooLarge = 402, "document_too_large", false;
    /// A document id is empty, too long or contains control characters.
    InvalidDocumentId = 403, "invalid_document_id", false;
    /// Mutation ids in a batch are not strictly increasing.
    MutationIdsNotIncreasing = 404, "mutation_ids_not_increasing", false;
    /// A patch names a document that does not exist or is deleted.
    DocumentNotFound = 405, "document_not_found", false;
    /// The batch would write more than the gateway's `max_batch_output_bytes` to the log;
    /// nothing of it was applied: push the same mutations again in smaller batches.
    BatchOutputTooLarge = 406, "batch_output_too_large", false;
    /// The user's roles do not include one that may write the collection (the mutation is
    /// rejected and stored, like any rejection).
    WriteForbidden = 407, "write_forbidden", false;
    /// The document lies outside the user's row scope in its collection, or the mutation
    /// would put it outside (create it there or move it there), or the token lacks the claim
    /// the scope needs (the mutation is rejected and stored, like any rejection).
    OutOfScope = 408, "out_of_scope", false;
    /// A create beyond the writer's `max_documents_per_user` (the mutation is rejected and
    /// stored, like any rejection): delete documents first, or ask an administrator.
    QuotaExceeded = 409, "quota_exceeded", false;
    /// The document would lack a field its collection's `required` list names (or hold it as
    /// nil); the mutation is rejected and stored, like any rejection.
    MissingField = 410, "missing_field", false;
    /// A field the mutation writes has another type than its collection's `schema` declares,
    /// or a reference field holds something other than a string id; rejected and stored.
    WrongType = 411, "wrong_type", false;
    /// A reference field the mutation writes names a document its target collection does not
    /// have (and that no earlier mutation of the batch created); rejected and stored, and the
    /// mutations after it still apply.
    DanglingReference = 412, "dangling_reference", false;
    /// Another client changed the document after the mutation's `base_version`, and the
    /// collection's policy (`first_write_wins`, `manual`) keeps the server's version: the
    /// result's `conflict` holds it (and, for `manual`, the conflict's id). Recorded in the
    /// conflict audit, not as a sync error.
    Conflict = 413, "conflict", false;
    /// The mutation's `resolves` names no conflict of this document (unknown id, or a
    /// conflict of another document); rejected and stored, like any rejection.
    UnknownConflict = 414, "unknown_conflict", false;
    /// (HTTP API.) An `Idempotency-Key` already used for a different request of the same API
    /// key: nothing was applied; use a new key for a new request.
    IdempotencyKeyReused = 415, "idempotency_key_reused", false;
    /// The collection is captured from a PostgreSQL table (`syncgate capture attach`): the
    /// table is its only writer, so write the row with SQL instead.
    CapturedCollection = 416, "captured_collection", false;
    /// The gateway failed internally; the request may be retried.
    InternalError = 500, "internal_error", true;
    /// The connection's outbound buffer overflowed; reconnect and resume by cursor.
    SlowConsumer = 501, "slow_consumer", true;
    /// The gateway is draining; reconnect (elsewhere) after `retry_after_ms`.
    ServerDraining = 502, "server_draining", true;
    /// No frame arrived within the heartbeat timeout.
    HeartbeatTimeout = 503, "heartbeat_timeout", true;
    /// The database is unreachable; retry with backoff.
    StorageUnavailable = 504, "storage_unavailable", true;
    /// An earlier batch of this client was not committed, so this later one was not applied
    /// either (it would overtake it): push again from the first unacknowledged mutation, in order.
    ReplayRequired = 505, "replay_required", true;
    /// The connection sends frames faster than the gateway's `max_frames_per_second`: the frame
    /// was not handled (fatal when it keeps going). Pushes are not counted.
    RateLimited = 506, "rate_limited", true;
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_round_trip() {
        let mut seen = std::collections::HashSet::new();
        for c in ErrorCode::ALL {
            assert!(seen.insert(c.code()), "duplicate code {}", c.code());
            assert_eq!(ErrorCode::from_code(c.code()), Some(*c));
        }
        assert_eq!(ErrorCode::from_code(9999), None);
    }
}
