//! `syncgate-client`: the offline-first client SDK for syncgate, and the building blocks of the
//! `syncgate-client` command line and the load-test harness.
//!
//! ```no_run
//! # async fn demo() -> Result<(), syncgate_client::ClientError> {
//! use std::time::Duration;
//! use syncgate_client::{Client, Event};
//! use syncgate_protocol::{Body, Value};
//!
//! let client = Client::builder("ws://127.0.0.1:7420")
//!     .token("eyJ...")                       // or .token_provider(|| async { fetch().await })
//!     .data_dir("/var/lib/terminal-7")       // replica, outbox and client id live here
//!     .subscribe("work_orders", Body::new()) // every work order
//!     .open()
//!     .await?;
//! let mut events = client.events();
//! // Returns as soon as the edit is durably queued, online or not.
//! let mut body = Body::new();
//! body.insert("status".into(), Value::from("done"));
//! client.patch("work_orders", "wo-17", body).await?;
//! // The optimistic state shows the edit at once.
//! let wo = client.get("work_orders", "wo-17").await?;
//! // A periodic job: upload everything, download everything, then return.
//! client.sync_now(Duration::from_secs(30)).await?;
//! while let Ok(e) = events.try_recv() {
//!     if let Event::Rejected { mutation, reason, .. } = e {
//!         eprintln!("mutation {} refused: {reason}", mutation.mutation_id);
//!     }
//! }
//! client.close().await;
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - [`sdk`]: [`Client`], [`ClientBuilder`], [`Event`], errors: the API applications use.
//! - `session` (private): the background task that connects, resumes subscriptions, uploads the
//!   outbox, applies incoming changes, keeps the heartbeat and reconnects.
//! - [`store`]: the local SQLite store (replica, outbox, client id, cursors) and the rebase of
//!   optimistic state.
//! - [`backoff`]: capped exponential backoff with full jitter.
//! - [`conn`]: one WebSocket connection speaking the protocol frame by frame; the building
//!   block of the session, the tests and the load-test harness.
//! - [`json`]: conversions between JSON (what people type) and MessagePack values.

pub mod backoff;
pub mod conn;
pub mod json;
pub mod sdk;
mod session;
pub mod store;

pub use backoff::Backoff;
pub use conn::{ConnError, Connection, Traffic};
pub use sdk::{
    Client, ClientBuilder, ClientError, ConnectionState, Event, Fetched, Status, SyncReport,
    TokenProvider,
};
pub use store::{
    EncryptionKey, LocalConflict, LocalDoc, OutboxEntry, OutboxState, Rejection, Take,
};
