//! `syncgate-gateway`: the WebSocket sync gateway.
//!
//! # Layout
//! - [`config`]: the `Config` (TOML file, env, flags) and its validation.
//! - [`auth`]: HS256 JWT verification and minting; the generated secret.
//! - [`storage`]: the only module that knows sea-orm: schema, change log, documents,
//!   exactly-once records, the group-commit write path and the log head lock.
//! - [`ingest`]: the group-commit task.
//! - [`hub`]: subscriber registry, the log follower and fan-out.
//! - `frames`: what a subscriber is sent (deliverability, frames cut to a byte budget), pure.
//! - `subscription`: snapshot / catch-up / go-live of one subscription.
//! - `connection`: one WebSocket connection's reader loop.
//! - [`outbound`]: the byte-bounded outbound queue and the writer task.
//! - `reply`: `ErrorReply`, the one place an error becomes a frame, a metric and a close.
//! - [`server`]: wiring, listeners, HTTP endpoints, graceful shutdown.
//! - `shared`: the state every task of a node shares (`Shared`).
//! - [`metrics`]: Prometheus metrics.
//! - [`oplog`]: rate limits of the operator's `info` lines (connections, refusals, rejections).

pub mod auth;
mod changes;
pub mod config;
mod error;
mod http;
pub mod ingest;
pub mod metrics;
pub mod oplog;
pub mod outbound;
pub mod server;
mod shared;
pub mod storage;
pub mod sync;
mod ws;

pub use config::Config;
pub use server::Gateway;
