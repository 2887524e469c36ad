//! `syncgate-loadtest`: load scenarios that also check correctness.
//!
//! Simulated clients are plain protocol connections ([`syncgate_client::Connection`]): no
//! SQLite, no SDK, a few KiB each.
//!
//! # Layout
//! - [`fanout`]: S subscribers, W writers at R changes/s; every subscriber must receive every
//!   change of the run exactly once and in per-writer order; write→delivery latency.
//! - [`ingest`]: writers push batches as fast as acks come back; every mutation acknowledged
//!   once, in order, as applied, and visible afterwards; mutations/s.
//! - [`connect`]: ramp and hold idle subscribed connections; connect rate, gateway RSS per
//!   connection; every idle connection must receive a final probe exactly once.
//! - [`storm`]: the reconnect storm; every client must receive exactly the changes it missed.
//! - [`common`]: run ids and filters, subscribe-until-synced, push-and-check, the report.
//! - [`stats`]: HDR histograms and their summaries. [`procfs`]: CPU/RSS sampling from /proc.

pub mod common;
pub mod connect;
pub mod fanout;
pub mod ingest;
pub mod procfs;
pub mod stats;
pub mod storm;
