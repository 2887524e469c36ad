//! One WebSocket connection: the handshake and reader loop ([`connection`]) and the start of
//! each of its subscriptions — snapshot, catch-up from the log, go-live ([`subscription`]).
//! Answers to `fetch` ([`fetch`]). The outbound queue and writer are in [`crate::outbound`],
//! shared with the hub's fan-out.

pub(crate) mod connection;
pub(crate) mod fetch;
pub(crate) mod rate;
pub(crate) mod subscription;
