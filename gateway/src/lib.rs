//! `syncgate-gateway`: the WebSocket sync gateway.
//!
//! # Layout (folders by concern; ARCHITECTURE.md has the map and the dependency direction)
//! - [`config`]: the `Config` (TOML file, env, flags) and its validation.
//! - [`conflict`]: conflict policies (pure) and the public [`conflict::ConflictResolver`].
//! - [`auth`]: HS256 JWT verification and minting; the generated secret.
//! - [`server`]: wiring, listeners, graceful shutdown; `migrate`.
//! - `http`: `/healthz`, `/readyz`, `/metrics`.
//! - `ws`: one WebSocket connection (handshake, reader loop) and the start of its
//!   subscriptions (snapshot, catch-up, go-live).
//! - `sync`: the hub (subscriber registry, log follower, catch-up tail) and `frames` (pure).
//! - `ingest`: the group-commit task; `order` and `plan`, its pure decisions.
//! - `storage`: the only module that knows sea-orm: schema, reads, the group transaction.
//! - `changes`: committed changes with their encoding (`LogEntry`, `Committed`).
//! - `outbound`: the byte-bounded outbound queue and the writer that drains it.
//! - `error`: `GatewayError` and `ErrorReply`, every error a client is sent.
//! - `shared`: the state every task of a node shares (`Shared`).
//! - `metrics`: Prometheus metrics. `oplog`: rate limits of the operator's `info` lines.

pub mod auth;
mod changes;
pub mod config;
pub mod conflict;
mod error;
mod files;
mod http;
mod ingest;
mod metrics;
mod oplog;
mod outbound;
pub mod server;
mod shared;
mod storage;
mod sync;
mod tls;
mod ws;

pub use config::Config;
pub use oplog::DependencyLogLimit;
pub use server::Gateway;
/// Fixtures for the criterion benches (`gateway/benches`); not part of the API.
#[doc(hidden)]
pub use sync::bench;
