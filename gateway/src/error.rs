//! Every error a client is sent: one enum ([`GatewayError`]) that knows its stable code,
//! whether it ends the session and its close code, and one place ([`ErrorReply::send`]) that
//! turns it into an `error` frame, a metric and, when it is fatal, the end of the connection.

use bytes::Bytes;
use syncgate_protocol::codec::{DecodeError, encode};
use syncgate_protocol::{ErrorCode, ErrorFrame, Frame};

use crate::auth::AuthError;
use crate::metrics::Metrics;
use crate::outbound::Outbound;

/// Where a database failure interrupted the work a client asked for; it decides what the
/// client is told to do and whether the session survives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Reading the client's exactly-once state for `welcome`: the handshake fails.
    Handshake,
    /// Snapshot or catch-up of a subscription: the connection ends at once (what is queued is
    /// dropped) and the client resumes by cursor.
    Subscription,
    /// A group commit: only the batch fails; the client pushes it again, with every later one.
    Push,
    /// Reading the documents of a `fetch`: only that request fails; the client asks again.
    Fetch,
}

/// Everything the gateway refuses or fails with, as a client sees it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum GatewayError {
    /// A frame that could not be decoded (its own code: malformed, too large, too deep,
    /// unknown type).
    #[error("{0}")]
    Decode(#[from] DecodeError),
    /// A WebSocket message over the frame limit: the transport stops reading.
    #[error("{0}")]
    MessageTooLarge(String),
    /// A text WebSocket message.
    #[error("send binary frames")]
    TextFrame,
    /// Anything but `hello` before the handshake.
    #[error("send hello first")]
    HelloFirst,
    /// No frame within the handshake or heartbeat timeout.
    #[error("no frame within the timeout")]
    Timeout {
        /// Whether the handshake had completed (heartbeat) or not (handshake).
        established: bool,
    },
    /// No protocol version in common.
    #[error("server speaks {0}")]
    UnsupportedVersion(String),
    /// The `client_id` is empty, too long or has control characters.
    #[error("client_id must be 1..={max_id_bytes} bytes without control characters")]
    InvalidClientId {
        /// The limit.
        max_id_bytes: u32,
    },
    /// The token was refused (or expired during the session).
    #[error("{0}")]
    Auth(#[from] AuthError),
    /// The user holds `max_connections_per_user` sessions already.
    #[error("this user already holds {limit} sessions on this node; retry after one ends")]
    TooManyConnections {
        /// The limit.
        limit: usize,
    },
    /// The `client_id` belongs to another user.
    #[error(
        "this client_id belongs to another user; use your own installation's client id, or \
         ask an administrator to reassign it (syncgate admin clients reassign)"
    )]
    ClientIdTaken,
    /// A new client id beyond the user's `max_client_ids_per_user`.
    #[error(
        "this user owns {limit} client ids already (max_client_ids_per_user); reuse an \
         installation's client id, or ask an administrator"
    )]
    ClientQuota {
        /// The quota.
        limit: u64,
    },
    /// A second `hello`.
    #[error("session already established")]
    DuplicateHello,
    /// A message only the server sends.
    #[error("{0} is a server-to-client message")]
    ServerMessage(&'static str),
    /// `unsubscribe` of a sub id not in use.
    #[error("no such subscription")]
    UnknownSubscription,
    /// `subscribe` with a sub id already in use.
    #[error("sub id already in use")]
    DuplicateSubscription,
    /// More subscriptions than `max_subscriptions`.
    #[error("too many subscriptions")]
    TooManySubscriptions,
    /// A collection that is not declared.
    #[error("collection {0:?} is not declared")]
    UnknownCollection(String),
    /// The user's roles may not read the collection.
    #[error("reading {0:?} needs one of the collection's read_roles")]
    ReadForbidden(String),
    /// The collection is scoped by a claim the token does not carry.
    #[error("reading {collection:?} needs the token claim {claim:?} for its scope")]
    ScopeClaimMissing {
        /// The collection.
        collection: String,
        /// The claim path its scope names.
        claim: String,
    },
    /// A subscription filter that is not valid.
    #[error("{0}")]
    InvalidFilter(String),
    /// The collection's mode sends nothing down (subscribe: `upload_only` and `never`;
    /// fetch: `upload_only`).
    #[error("collection {collection:?} is {mode}: {what}")]
    NotDownloadable {
        /// The collection.
        collection: String,
        /// Its mode, as configured.
        mode: &'static str,
        /// What the client may do instead.
        what: &'static str,
    },
    /// A `fetch` that names no ids, too many, or an invalid one.
    #[error("{0}")]
    InvalidFetch(String),
    /// A `refresh` whose token cannot replace the session's (the session goes on).
    #[error("refresh refused: {0}; the session ends when its current token expires")]
    RefreshRefused(String),
    /// A batch with more mutations than `max_mutations_per_batch`.
    #[error("at most {limit} mutations per batch")]
    BatchTooLarge {
        /// The limit.
        limit: u32,
    },
    /// A batch that would write more than `max_batch_output_bytes` to the log; nothing of it
    /// was applied. Its first `fitting` mutations fit.
    #[error(
        "the batch would write more than {limit} bytes to the log; nothing of it was applied. \
         Push it again in smaller batches (its first {fitting} mutations fit)"
    )]
    BatchOutputTooLarge {
        /// The limit.
        limit: usize,
        /// How many of the batch's changes fitted.
        fitting: usize,
    },
    /// A batch whose mutation ids do not strictly increase.
    #[error("mutation ids must strictly increase")]
    MutationIdsNotIncreasing,
    /// A batch of a client whose earlier batch, from mutation id `fence`, was not applied
    /// (PROTOCOL.md §3.7, "Order across failures").
    #[error(
        "an earlier batch of this client, from mutation id {fence}, was not applied; this \
         batch was not applied either. Push again from mutation id {fence}, in order"
    )]
    ReplayRequired {
        /// The first mutation id the client must push again.
        fence: u64,
    },
    /// The database failed; what was asked was not done.
    #[error("{}", storage_message(*.0))]
    Storage(Step),
    /// A batch pushed while the node drains.
    #[error("the gateway is shutting down; push the batch again after reconnecting")]
    Draining,
    /// The ingest task is gone (the node is stopping).
    #[error("ingest stopped; retry the batch")]
    IngestStopped,
    /// Frames faster than `max_frames_per_second`.
    #[error("more than {limit} frames a second; retry in {retry_ms} ms")]
    RateLimited {
        /// The limit.
        limit: u32,
        /// When the next frame would be accepted.
        retry_ms: u64,
        /// The connection kept going over the limit: it ends.
        closing: bool,
    },
    /// The outbound queue overflowed.
    #[error("outbound buffer full; reconnect and resume from your cursor")]
    SlowConsumer,
}

fn storage_message(step: Step) -> &'static str {
    match step {
        Step::Handshake => "database unavailable; reconnect later",
        Step::Subscription => "database unavailable; reconnect and resume",
        Step::Push => {
            "the batch was not committed; push it again (with every later batch, in order)"
        }
        Step::Fetch => "database unavailable; fetch again",
    }
}

impl GatewayError {
    /// The stable code (PROTOCOL.md §5).
    pub(crate) fn code(&self) -> ErrorCode {
        match self {
            GatewayError::Decode(e) => e.code(),
            GatewayError::MessageTooLarge(_) => ErrorCode::FrameTooLarge,
            GatewayError::TextFrame => ErrorCode::TextFrameNotSupported,
            GatewayError::HelloFirst | GatewayError::Timeout { established: false } => {
                ErrorCode::HandshakeRequired
            }
            GatewayError::Timeout { established: true } => ErrorCode::HeartbeatTimeout,
            GatewayError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            GatewayError::InvalidClientId { .. } => ErrorCode::InvalidClientId,
            GatewayError::Auth(e) => e.code(),
            GatewayError::ClientIdTaken => ErrorCode::ClientIdTaken,
            GatewayError::ClientQuota { .. } => ErrorCode::ClientQuotaExceeded,
            GatewayError::TooManyConnections { .. } => ErrorCode::TooManyConnections,
            GatewayError::DuplicateHello => ErrorCode::DuplicateHello,
            GatewayError::ServerMessage(_) => ErrorCode::UnknownMessage,
            GatewayError::UnknownSubscription => ErrorCode::UnknownSubscription,
            GatewayError::DuplicateSubscription => ErrorCode::DuplicateSubscription,
            GatewayError::TooManySubscriptions => ErrorCode::TooManySubscriptions,
            GatewayError::UnknownCollection(_) => ErrorCode::UnknownCollection,
            GatewayError::InvalidFilter(_) => ErrorCode::InvalidFilter,
            GatewayError::NotDownloadable { .. } => ErrorCode::NotDownloadable,
            GatewayError::InvalidFetch(_) => ErrorCode::InvalidFetch,
            GatewayError::RefreshRefused(_) => ErrorCode::RefreshRefused,
            GatewayError::ReadForbidden(_) | GatewayError::ScopeClaimMissing { .. } => {
                ErrorCode::ReadForbidden
            }
            GatewayError::BatchTooLarge { .. } => ErrorCode::BatchTooLarge,
            GatewayError::MutationIdsNotIncreasing => ErrorCode::MutationIdsNotIncreasing,
            GatewayError::BatchOutputTooLarge { .. } => ErrorCode::BatchOutputTooLarge,
            GatewayError::ReplayRequired { .. } => ErrorCode::ReplayRequired,
            GatewayError::Storage(_) => ErrorCode::StorageUnavailable,
            GatewayError::Draining => ErrorCode::ServerDraining,
            GatewayError::IngestStopped => ErrorCode::InternalError,
            GatewayError::SlowConsumer => ErrorCode::SlowConsumer,
            GatewayError::RateLimited { .. } => ErrorCode::RateLimited,
        }
    }

    /// Whether, and how, it ends an established session (before `welcome` every error is
    /// fatal: [`ErrorReply::before_handshake`]).
    pub(crate) fn ending(&self) -> Ending {
        match self {
            GatewayError::SlowConsumer | GatewayError::Storage(Step::Subscription) => {
                Ending::DropQueued
            }
            GatewayError::MessageTooLarge(_)
            | GatewayError::HelloFirst
            | GatewayError::Timeout { .. }
            | GatewayError::UnsupportedVersion(_)
            | GatewayError::InvalidClientId { .. }
            | GatewayError::Auth(_)
            | GatewayError::ClientIdTaken
            | GatewayError::ClientQuota { .. }
            | GatewayError::TooManyConnections { .. }
            | GatewayError::RateLimited { closing: true, .. }
            | GatewayError::Storage(Step::Handshake) => Ending::AfterFlush,
            _ => Ending::Continue,
        }
    }

    /// The WebSocket close code, when it ends the connection: 4000 + the numeric code.
    pub(crate) fn close_code(&self) -> u16 {
        close_code(self.code())
    }
}

/// What an error is about (the frame's `sub` or `batch`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum About {
    /// The connection, or one frame of it.
    Connection,
    /// One subscription.
    Subscription(u32),
    /// One push batch.
    Batch(u64),
    /// One `fetch` request.
    Fetch(u32),
}

/// Whether and how the connection ends after the error frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    /// Non-fatal: the session goes on.
    Continue,
    /// Fatal: everything queued before is still sent, then the error, then the close.
    AfterFlush,
    /// Fatal at once: what is queued is dropped (the client resumes by cursor), the error is
    /// sent, then the close. For a consumer too slow to take what is queued.
    DropQueued,
}

/// An error on its way to a client: what it is about and how the connection ends.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ErrorReply {
    /// The error.
    pub(crate) error: GatewayError,
    /// What it is about.
    pub(crate) about: About,
    /// What happens to the connection.
    pub(crate) ending: Ending,
}

impl From<GatewayError> for ErrorReply {
    fn from(error: GatewayError) -> ErrorReply {
        ErrorReply {
            ending: error.ending(),
            error,
            about: About::Connection,
        }
    }
}

impl ErrorReply {
    /// Before `welcome` nothing but a valid `hello` can follow: every error ends the
    /// connection (PROTOCOL.md §3.1).
    pub(crate) fn before_handshake(mut self, handshaking: bool) -> ErrorReply {
        if handshaking && self.ending == Ending::Continue {
            self.ending = Ending::AfterFlush;
        }
        self
    }

    /// About one subscription.
    pub(crate) fn sub(mut self, sub: u32) -> ErrorReply {
        self.about = About::Subscription(sub);
        self
    }

    /// About one push batch.
    pub(crate) fn batch(mut self, batch: u64) -> ErrorReply {
        self.about = About::Batch(batch);
        self
    }

    /// About one `fetch` request.
    pub(crate) fn req(mut self, req: u32) -> ErrorReply {
        self.about = About::Fetch(req);
        self
    }

    /// Whether the connection ends.
    pub(crate) fn is_fatal(&self) -> bool {
        self.ending != Ending::Continue
    }

    /// The wire frame.
    pub(crate) fn frame(&self) -> ErrorFrame {
        let mut e = ErrorFrame::new(self.error.code(), self.error.to_string(), self.is_fatal());
        match self.about {
            About::Connection => {}
            About::Subscription(s) => e.sub = Some(s),
            About::Batch(b) => e.batch = Some(b),
            About::Fetch(r) => e.req = Some(r),
        }
        e
    }

    /// Counts it, queues the frame and, if fatal, closes with `4000 + code`.
    pub(crate) fn send(self, out: &Outbound, metrics: &Metrics) {
        self.send_unless(out, metrics, &std::sync::atomic::AtomicBool::new(false));
    }

    /// [`ErrorReply::send`] of a subscription's error: a non-fatal one is dropped once the
    /// subscription (`gate`) ended (see [`Outbound::end_sub`]).
    pub(crate) fn send_unless(
        self,
        out: &Outbound,
        metrics: &Metrics,
        gate: &std::sync::atomic::AtomicBool,
    ) {
        let code = self.error.code();
        metrics.errors.with_label_values(&[code.name()]).inc();
        let bytes = Bytes::from(encode(&Frame::Error(self.frame())));
        match self.ending {
            Ending::Continue => out.push_unless(bytes, gate),
            Ending::AfterFlush => {
                out.push(bytes);
                out.close_after_flush(self.error.close_code(), code.name());
            }
            Ending::DropQueued => {
                out.close(Some(bytes), self.error.close_code(), code.name());
            }
        }
    }
}

/// The WebSocket close code for an error code: 4000 + the numeric code.
pub(crate) fn close_code(code: ErrorCode) -> u16 {
    4000 + code.code()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_say_what_they_are_about_and_whether_they_end_the_connection() {
        let e = ErrorReply::from(GatewayError::UnknownCollection("x".into())).sub(7);
        let f = e.frame();
        assert_eq!(
            (f.code, f.fatal, f.sub, f.batch),
            (300, false, Some(7), None)
        );
        assert_eq!(f.message, "collection \"x\" is not declared");
        let f = ErrorReply::from(GatewayError::Auth(AuthError::Expired)).frame();
        assert!(f.fatal && f.sub.is_none() && f.batch.is_none());
        let refused = GatewayError::ReplayRequired { fence: 3 };
        let f = ErrorReply::from(refused).batch(9).frame();
        assert_eq!((f.code, f.fatal, f.batch), (505, false, Some(9)));
        assert_eq!(
            ErrorReply::from(GatewayError::SlowConsumer).ending,
            Ending::DropQueued
        );
        let bad = GatewayError::Decode(DecodeError::Truncated);
        assert!(!ErrorReply::from(bad.clone()).is_fatal());
        assert!(ErrorReply::from(bad).before_handshake(true).is_fatal());
        assert_eq!(GatewayError::SlowConsumer.close_code(), 4501);
    }

    #[test]
    fn a_database_failure_ends_what_it_interrupted_and_no_more() {
        let cases = [
            (Step::Handshake, Ending::AfterFlush),
            (Step::Subscription, Ending::DropQueued),
            (Step::Push, Ending::Continue),
            (Step::Fetch, Ending::Continue),
        ];
        for (step, ending) in cases {
            let e = GatewayError::Storage(step);
            assert_eq!(e.code(), ErrorCode::StorageUnavailable);
            assert_eq!(e.ending(), ending, "{step:?}");
            assert!(
                !e.to_string().contains("database error"),
                "no driver detail leaks"
            );
        }
    }

    #[test]
    fn every_code_the_gateway_sends_is_retryable_exactly_when_it_is_not_the_clients_fault() {
        let transient = [
            GatewayError::Storage(Step::Push),
            GatewayError::Draining,
            GatewayError::IngestStopped,
            GatewayError::SlowConsumer,
            GatewayError::Timeout { established: true },
            GatewayError::Auth(AuthError::Expired),
        ];
        for e in transient {
            assert!(e.code().retryable(), "{e:?}");
        }
        let permanent = [
            GatewayError::TextFrame,
            GatewayError::HelloFirst,
            GatewayError::DuplicateHello,
            GatewayError::UnknownSubscription,
            GatewayError::InvalidClientId { max_id_bytes: 8 },
            GatewayError::Auth(AuthError::Invalid("bad signature".into())),
        ];
        for e in permanent {
            assert!(!e.code().retryable(), "{e:?}");
        }
    }
}
