//! Error replies: the one place where a refusal becomes an `error` frame, a metric and, when
//! it is fatal, the end of the connection.

use bytes::Bytes;
use syncgate_protocol::codec::encode;
use syncgate_protocol::{ErrorCode, ErrorFrame, Frame};

use crate::metrics::Metrics;
use crate::outbound::Outbound;

/// What an error is about (the frame's `sub` or `batch`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum About {
    /// The connection, or one frame of it.
    Connection,
    /// One subscription.
    Subscription(u32),
    /// One push batch.
    Batch(u64),
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

/// An error to send to a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ErrorReply {
    /// The stable code.
    pub(crate) code: ErrorCode,
    /// Human text (not stable).
    pub(crate) message: String,
    /// What it is about.
    pub(crate) about: About,
    /// What happens to the connection.
    pub(crate) ending: Ending,
}

impl ErrorReply {
    /// A non-fatal answer to one frame.
    pub(crate) fn answer(code: ErrorCode, message: impl Into<String>) -> ErrorReply {
        ErrorReply {
            code,
            message: message.into(),
            about: About::Connection,
            ending: Ending::Continue,
        }
    }

    /// The last frame of the connection, after everything already queued.
    pub(crate) fn fatal(code: ErrorCode, message: impl Into<String>) -> ErrorReply {
        ErrorReply {
            ending: Ending::AfterFlush,
            ..ErrorReply::answer(code, message)
        }
    }

    /// The last frame of the connection, dropping what is queued.
    pub(crate) fn dropping_queued(code: ErrorCode, message: impl Into<String>) -> ErrorReply {
        ErrorReply {
            ending: Ending::DropQueued,
            ..ErrorReply::answer(code, message)
        }
    }

    /// Fatal or not, as `fatal` says (before the handshake every error is fatal).
    pub(crate) fn fatal_if(fatal: bool, code: ErrorCode, message: impl Into<String>) -> Self {
        if fatal {
            ErrorReply::fatal(code, message)
        } else {
            ErrorReply::answer(code, message)
        }
    }

    /// About one subscription.
    pub(crate) fn sub(mut self, sub: u32) -> ErrorReply {
        self.about = About::Subscription(sub);
        self
    }

    /// About one subscription, if `sub` names one.
    pub(crate) fn maybe_sub(self, sub: Option<u32>) -> ErrorReply {
        match sub {
            Some(s) => self.sub(s),
            None => self,
        }
    }

    /// About one push batch.
    pub(crate) fn batch(mut self, batch: u64) -> ErrorReply {
        self.about = About::Batch(batch);
        self
    }

    /// Whether the connection ends.
    pub(crate) fn is_fatal(&self) -> bool {
        self.ending != Ending::Continue
    }

    /// The wire frame.
    pub(crate) fn frame(&self) -> ErrorFrame {
        let mut e = ErrorFrame::new(self.code, &self.message, self.is_fatal());
        match self.about {
            About::Connection => {}
            About::Subscription(s) => e.sub = Some(s),
            About::Batch(b) => e.batch = Some(b),
        }
        e
    }

    /// Counts it, queues the frame and, if fatal, closes with `4000 + code`.
    pub(crate) fn send(self, out: &Outbound, metrics: &Metrics) {
        metrics.errors.with_label_values(&[self.code.name()]).inc();
        let bytes = Bytes::from(encode(&Frame::Error(self.frame())));
        match self.ending {
            Ending::Continue => out.push(bytes),
            Ending::AfterFlush => {
                out.push(bytes);
                out.close_after_flush(close_code(self.code), self.code.name());
            }
            Ending::DropQueued => {
                out.close(Some(bytes), close_code(self.code), self.code.name());
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
        let e = ErrorReply::answer(ErrorCode::UnknownCollection, "no").sub(7);
        let f = e.frame();
        assert_eq!(
            (f.code, f.fatal, f.sub, f.batch),
            (300, false, Some(7), None)
        );
        let f = ErrorReply::fatal(ErrorCode::Unauthorized, "bad").frame();
        assert!(f.fatal && f.sub.is_none() && f.batch.is_none());
        let f = ErrorReply::answer(ErrorCode::ReplayRequired, "x")
            .batch(9)
            .frame();
        assert_eq!((f.fatal, f.batch), (false, Some(9)));
        assert!(ErrorReply::dropping_queued(ErrorCode::SlowConsumer, "s").is_fatal());
        assert!(ErrorReply::fatal_if(true, ErrorCode::MalformedFrame, "m").is_fatal());
        assert!(!ErrorReply::fatal_if(false, ErrorCode::MalformedFrame, "m").is_fatal());
        assert_eq!(close_code(ErrorCode::SlowConsumer), 4501);
    }
}
