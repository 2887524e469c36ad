//! `syncgate-client`: talk to a syncgate gateway.
//!
//! # Layout
//! - [`conn`]: one WebSocket connection speaking the protocol frame by frame (handshake, send,
//!   receive). The building block for the command line, the load-test harness and the tests.
//! - [`json`]: conversions between JSON (what people type) and MessagePack values.
//!
//! The offline-first SDK (durable outbox, local replica, reconnection) builds on `conn`.

pub mod conn;
pub mod json;
pub mod store;

pub use conn::{ConnError, Connection};
