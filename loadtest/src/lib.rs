//! `syncgate-loadtest`: load scenarios that also check correctness.
//!
//! Simulated clients are plain protocol connections ([`syncgate_client::Connection`]): no
//! SQLite, no SDK, a few KiB each; only [`initial_sync`] runs the real SDK with its store.
//!
//! # Layout
//! - [`fanout`]: S subscribers, W writers at R changes/s; every subscriber must receive every
//!   change of the run exactly once and in per-writer order; write→delivery latency.
//! - [`ingest`]: writers push batches as fast as acks come back; every mutation acknowledged
//!   once, in order, as applied, and visible afterwards; mutations/s.
//! - [`fairness`]: a calm writer's push→ack latency alone and beside a flooding or
//!   subscribe-churning aggressor; everything acknowledged once, every snapshot complete.
//! - [`connect`]: ramp and hold idle subscribed connections; connect rate, gateway RSS per
//!   connection; every idle connection must receive a final probe exactly once.
//! - [`storm`]: the reconnect storm; every client must receive exactly the changes it missed.
//! - [`slow`]: one subscriber stops reading; the others' latency before and during, the
//!   gateway's RSS, and the stalled one's recovery (degraded and caught up by the gateway, or by cursor if dropped), everything exactly once.
//! - [`chaos`]: kill -9 and restart a spawned gateway under write load; exactly-once ingest
//!   with identical replayed acks, exactly-once in-order delivery across restarts.
//! - [`capture`]: SQL sessions write a captured PostgreSQL table while terminals subscribe;
//!   every statement delivered once, in each session's order; SQL write→terminal latency.
//! - [`snapshot`]: a snapshot's bytes on the wire, without and with frame compression.
//! - [`initial_sync`]: P9, a new terminal's first sync of a large collection through the SDK
//!   into its SQLite replica; seconds, bytes, peak RSS; every document held once.
//! - [`mixed`]: an ERP shift: terminals per plant, backend writers, terminals offline a while;
//!   per-plant completeness and convergence.
//! - [`common`]: run ids and filters, subscribe-until-synced, push-and-check.
//! - [`report`]: the JSON and HTML (SVG plots) report. [`progress`]: the progress bar.
//! - [`spawn`]: a gateway process the harness starts, kills and restarts.
//! - [`stats`]: HDR histograms, summaries, per-second timeline. [`procfs`]: CPU/RSS sampling.

pub mod capture;
pub mod chaos;
pub mod common;
pub mod connect;
pub mod fairness;
pub mod fanout;
pub mod ingest;
pub mod initial_sync;
pub mod lean;
pub mod mixed;
pub mod procfs;
pub mod progress;
pub mod report;
pub mod slow;
pub mod snapshot;
pub mod spawn;
pub mod stats;
pub mod storm;
pub mod workers;
