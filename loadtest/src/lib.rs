//! `syncgate-loadtest`: load scenarios that also check correctness.
//!
//! # Layout
//! - [`fanout`]: S subscribers, W writers at R changes/s; checks every subscriber receives every
//!   change of the run exactly once and in per-writer order, and measures write→delivery latency.
//!
//! The remaining scenarios of issue 4 (connect, ingest, reconnect-storm, slow-consumer, chaos,
//! mixed), HDR histograms and reports build on the same pieces.

pub mod fanout;
pub mod stats;
