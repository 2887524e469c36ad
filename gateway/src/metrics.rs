//! Prometheus metrics behind one small type. Labels are bounded: error code names and mutation
//! statuses, never connection or client ids.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Every metric the gateway exports.
#[derive(Clone)]
pub struct Metrics {
    /// The registry served on `/metrics`.
    registry: Registry,
    /// Open WebSocket connections.
    pub connections: IntGauge,
    /// Active subscriptions.
    pub subscriptions: IntGauge,
    /// Frames received from clients.
    pub frames_in: IntCounter,
    /// Frames sent to clients.
    pub frames_out: IntCounter,
    /// Payload bytes received.
    pub bytes_in: IntCounter,
    /// Payload bytes sent (as on the wire: compressed frames count their compressed size).
    pub bytes_out: IntCounter,
    /// Frames sent compressed (PROTOCOL.md §3.15).
    pub frames_compressed: IntCounter,
    /// Bytes compression kept off the wire.
    pub compression_saved_bytes: IntCounter,
    /// Seconds from a chunk's publication on this node to its frame being handed to the
    /// subscriber's socket (live delivery; catch-up is not counted).
    pub delivery_lag: Histogram,
    /// Errors sent to clients, by code name (every code present from the start, at 0).
    pub errors: IntCounterVec,
    /// WebSocket connections upgraded.
    pub connections_opened: IntCounter,
    /// WebSocket connections ended, by [`CLOSE_REASONS`].
    pub connections_closed: IntCounterVec,
    /// `resync` sent, by reason.
    pub resyncs: IntCounterVec,
    /// Database pool connections, by state (`in_use`, `idle`), read at each scrape.
    pub db_pool: IntGaugeVec,
    /// The database pool's maximum size.
    pub db_pool_max: IntGauge,
    /// 1 when `/readyz` would answer 200, read at each scrape.
    pub ready: IntGauge,
    /// Subscriptions by how far behind the published head their queued position is
    /// ([`LAG_BUCKETS`]), read at each scrape.
    pub subscriber_lag: IntGaugeVec,
    /// Connections turned away because `max_concurrent_handshakes` were in progress and no
    /// turn came within `handshake_queue_ms`.
    pub admission_refused: IntCounter,
    /// How long connections that found every handshake turn taken waited for one (those sent
    /// away included, at `handshake_queue_ms`).
    pub admission_wait: Histogram,
    /// Connections waiting for a handshake turn now.
    pub admission_waiting: IntGauge,
    /// Log lines of dependencies suppressed by their rate limit, by target.
    pub log_lines_suppressed: IntCounterVec,
    /// Slow subscribers by what happened: `degraded` (its queue was full: switched to
    /// catch-up), `rejoined` (caught up and live again), `dropped` (still behind at the
    /// deadline: closed with `slow_consumer`).
    pub slow_consumers: IntCounterVec,
    /// Mutations by outcome (`applied`, `rejected`, `replayed`).
    pub mutations: IntCounterVec,
    /// Changes delivered to live subscribers (one per subscriber per change).
    pub deliveries: IntCounter,
    /// Seconds from a push's arrival to its acknowledgement being queued.
    pub push_seconds: Histogram,
    /// Seconds one group-commit transaction took.
    pub commit_seconds: Histogram,
    /// Mutations per group-commit transaction.
    pub group_size: Histogram,
    /// The last seq published to subscribers on this node.
    pub published_seq: IntGauge,
    /// Bytes queued in outbound buffers, summed over connections.
    pub outbound_bytes: IntGauge,
    /// Catch-up pages read, by source (`memory`: the hub's recent log tail; `database`).
    pub catch_up_pages: IntCounterVec,
    /// Snapshot pages read from the database.
    pub snapshot_pages: IntCounter,
    /// Bytes of push frames in flight on the node (set when metrics are read).
    pub inflight_push_bytes: IntGauge,
    /// Database pings made for `/readyz` (at most one per second, however often it is polled).
    pub readiness_checks: IntCounter,
    /// Frames refused for going over `max_frames_per_second`.
    pub rate_limited: IntCounter,
    /// Clients whose later pushes are refused until they replay a batch that was not applied.
    pub fenced_clients: IntGauge,
    /// What the per-user quotas refused, by quota: `documents` (creates rejected with 409),
    /// `client_ids` (hellos refused with 205), `sync_errors` (rejections not stored).
    pub quota_refusals: IntCounterVec,
    /// Work held back to its rate instead of refused, by kind: `push` (a connection stopped
    /// reading for `max_push_*_per_second`), `subscribe` (a subscription start waited for
    /// `max_subscribes_per_second`), `read` (a page read waited for `node_concurrent_reads`).
    pub paced: IntCounterVec,
    /// Conflict decisions audited, by policy (the collection's resolver) and outcome
    /// (`overwrote`, `kept_server`, `merged`, `refused`, `open`).
    pub conflicts: IntCounterVec,
    /// Rows compaction removed, by collection and kind (`superseded`, `tombstones`,
    /// `deleted_documents`).
    pub compaction_removed: IntCounterVec,
    /// Each collection's compaction horizon: cursors older than it get `cursor_too_old`.
    pub compaction_horizon: IntGaugeVec,
    /// Seconds each compaction transaction held the log's writer.
    pub compaction_batch_seconds: Histogram,
    /// Seconds each group commit waited for this process's log-writer turn (SQLite): how long
    /// compaction held ingest back.
    pub writer_wait_seconds: Histogram,
}

impl Metrics {
    /// Creates and registers every metric.
    #[allow(
        clippy::expect_used,
        reason = "names, help texts, labels and buckets are constants and unique: a failure is a \
                  programming error that every test that starts a gateway would show"
    )]
    pub fn new() -> Metrics {
        let registry = Registry::new();
        // The process's CPU, RSS, open and maximum file descriptors, threads, start time
        // (`process_*`, read from /proc at each scrape).
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("unique metric");
        // Which build runs where: a dashboard's version panel, a rolling upgrade's progress.
        let build = IntGaugeVec::new(
            Opts::new(
                "syncgate_build_info",
                "Always 1; the labels name the running build",
            ),
            &["version"],
        )
        .expect("valid metric");
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        registry.register(Box::new(build)).expect("unique metric");
        let gauge = |n: &str, h: &str| {
            let g = IntGauge::new(n, h).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let counter = |n: &str, h: &str| {
            let c = IntCounter::new(n, h).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let counter_vec = |n: &str, h: &str, l: &[&str]| {
            let c = IntCounterVec::new(Opts::new(n, h), l).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge_vec = |n: &str, h: &str, l: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(n, h), l).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let histogram = |n: &str, h: &str, buckets: Vec<f64>| {
            let m = Histogram::with_opts(HistogramOpts::new(n, h).buckets(buckets))
                .expect("valid metric");
            registry
                .register(Box::new(m.clone()))
                .expect("unique metric");
            m
        };
        let secs = vec![
            0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
        ];
        Metrics {
            connections: gauge("syncgate_connections", "Open WebSocket connections"),
            subscriptions: gauge("syncgate_subscriptions", "Active subscriptions"),
            frames_in: counter("syncgate_frames_in_total", "Frames received from clients"),
            frames_out: counter("syncgate_frames_out_total", "Frames sent to clients"),
            bytes_in: counter("syncgate_bytes_in_total", "Payload bytes received"),
            bytes_out: counter("syncgate_bytes_out_total", "Payload bytes sent"),
            frames_compressed: counter(
                "syncgate_frames_compressed_total",
                "Frames sent compressed",
            ),
            compression_saved_bytes: counter(
                "syncgate_compression_saved_bytes_total",
                "Bytes compression kept off the wire",
            ),
            delivery_lag: histogram(
                "syncgate_delivery_lag_seconds",
                "Seconds from a change's publication on this node to its frame written to a live subscriber's socket",
                secs.clone(),
            ),
            errors: {
                let errors = counter_vec(
                    "syncgate_errors_total",
                    "Errors sent to clients by code",
                    &["code"],
                );
                for code in syncgate_protocol::ErrorCode::ALL {
                    errors.with_label_values(&[code.name()]);
                }
                errors
            },
            connections_opened: counter(
                "syncgate_connections_opened_total",
                "WebSocket connections upgraded",
            ),
            connections_closed: {
                let closed = counter_vec(
                    "syncgate_connections_closed_total",
                    "WebSocket connections ended, by reason",
                    &["reason"],
                );
                for reason in CLOSE_REASONS {
                    closed.with_label_values(&[*reason]);
                }
                closed
            },
            resyncs: {
                let resyncs = counter_vec(
                    "syncgate_resyncs_total",
                    "Subscriptions told to start over from a snapshot, by reason",
                    &["reason"],
                );
                for reason in RESYNC_REASONS {
                    resyncs.with_label_values(&[*reason]);
                }
                resyncs
            },
            db_pool: gauge_vec(
                "syncgate_db_pool_connections",
                "Database pool connections by state (in_use, idle)",
                &["state"],
            ),
            db_pool_max: gauge(
                "syncgate_db_pool_max_connections",
                "The database pool's maximum size",
            ),
            slow_consumers: {
                let c = counter_vec(
                    "syncgate_slow_consumers_total",
                    "Slow subscribers: degraded to catch-up, rejoined live, or dropped at the deadline",
                    &["outcome"],
                );
                for outcome in ["degraded", "rejoined", "dropped"] {
                    c.with_label_values(&[outcome]);
                }
                c
            },
            admission_refused: counter(
                "syncgate_admission_refused_total",
                "Connections sent away with goaway because max_concurrent_handshakes were in progress and no turn came within handshake_queue_ms",
            ),
            admission_wait: histogram(
                "syncgate_admission_wait_seconds",
                "Seconds connections that found every handshake turn taken waited for one (those sent away included)",
                secs.clone(),
            ),
            admission_waiting: gauge(
                "syncgate_admission_waiting",
                "Connections waiting for a handshake turn (max_concurrent_handshakes) now",
            ),
            log_lines_suppressed: counter_vec(
                "syncgate_log_lines_suppressed_total",
                "Log lines of dependencies (sqlx ...) suppressed: over 10 per second from one call site",
                &["target"],
            ),
            subscriber_lag: {
                let g = gauge_vec(
                    "syncgate_subscribers_by_lag",
                    "Subscriptions by changes queued behind the published head (0, 1-10, 11-100, 101-1000, 1001-10000, >10000)",
                    &["lag"],
                );
                for (_, label) in LAG_BUCKETS {
                    g.with_label_values(&[*label]);
                }
                g
            },
            ready: gauge(
                "syncgate_ready",
                "1 when the node is ready (/readyz answers 200): not draining, database reachable",
            ),
            mutations: counter_vec(
                "syncgate_mutations_total",
                "Mutations by outcome",
                &["status"],
            ),
            deliveries: counter(
                "syncgate_deliveries_total",
                "Changes delivered to live subscribers",
            ),
            push_seconds: histogram("syncgate_push_seconds", "Push arrival to ack", secs.clone()),
            commit_seconds: histogram(
                "syncgate_commit_seconds",
                "Group-commit transaction time",
                secs.clone(),
            ),
            compaction_batch_seconds: histogram(
                "syncgate_compaction_batch_seconds",
                "Seconds each compaction transaction held the log's writer",
                secs.clone(),
            ),
            writer_wait_seconds: histogram(
                "syncgate_log_writer_wait_seconds",
                "Seconds each group commit waited for the log-writer turn (SQLite: held by compaction)",
                secs,
            ),
            compaction_removed: counter_vec(
                "syncgate_compaction_removed_total",
                "Rows compaction removed, by collection and kind (superseded, tombstones, deleted_documents)",
                &["collection", "kind"],
            ),
            compaction_horizon: gauge_vec(
                "syncgate_compaction_horizon",
                "Each collection's compaction horizon (older cursors resync with cursor_too_old)",
                &["collection"],
            ),
            group_size: histogram(
                "syncgate_group_commit_mutations",
                "Mutations per group-commit transaction",
                vec![1.0, 10.0, 100.0, 500.0, 1000.0, 2000.0, 5000.0],
            ),
            published_seq: gauge(
                "syncgate_published_seq",
                "Last seq published to subscribers",
            ),
            outbound_bytes: gauge("syncgate_outbound_queue_bytes", "Bytes queued for clients"),
            catch_up_pages: {
                let pages = counter_vec(
                    "syncgate_catch_up_pages_total",
                    "Catch-up pages read, by source (memory or database)",
                    &["source"],
                );
                for source in ["memory", "database"] {
                    pages.with_label_values(&[source]);
                }
                pages
            },
            snapshot_pages: counter(
                "syncgate_snapshot_pages_total",
                "Snapshot pages read from the database",
            ),
            quota_refusals: counter_vec(
                "syncgate_quota_refusals_total",
                "What per-user quotas refused, by quota (documents, client_ids, sync_errors)",
                &["quota"],
            ),
            paced: counter_vec(
                "syncgate_paced_total",
                "Work held back to its rate, by kind (push, subscribe, read)",
                &["kind"],
            ),
            conflicts: counter_vec(
                "syncgate_conflicts_total",
                "Conflict decisions that overwrote or refused a concurrent change, by policy and outcome",
                &["policy", "outcome"],
            ),
            rate_limited: counter(
                "syncgate_rate_limited_frames_total",
                "Frames refused for going over max_frames_per_second",
            ),
            readiness_checks: counter(
                "syncgate_readiness_checks_total",
                "Database pings made for /readyz",
            ),
            inflight_push_bytes: gauge(
                "syncgate_inflight_push_bytes",
                "Bytes of push frames in flight on the node (bounded by node_inflight_push_bytes)",
            ),
            fenced_clients: gauge(
                "syncgate_fenced_clients",
                "Clients that must replay a batch that was not applied before later ones apply",
            ),
            registry,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec only fails on invalid metric families, which `new` rules out.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Why WebSocket connections end (`syncgate_connections_closed_total{reason}`): `admission`
/// (turned away at once: `max_concurrent_handshakes` were in progress), `client`
/// (the client closed or went away cleanly), `network` (a read failed: reset, vanished peer),
/// `drain` (the node shut down), `slow_consumer`, `heartbeat_timeout`, `handshake` (no upgrade
/// or `hello` in time, or a refused `hello`), `token_expired`, `error` (any other fatal error).
pub(crate) const CLOSE_REASONS: &[&str] = &[
    "admission",
    "client",
    "network",
    "drain",
    "slow_consumer",
    "heartbeat_timeout",
    "handshake",
    "token_expired",
    "error",
];

/// The bounded labels of `syncgate_subscribers_by_lag`: the largest lag of each bucket.
pub(crate) const LAG_BUCKETS: &[(u64, &str)] = &[
    (0, "0"),
    (10, "1-10"),
    (100, "11-100"),
    (1_000, "101-1000"),
    (10_000, "1001-10000"),
    (u64::MAX, ">10000"),
];

/// The bucket label of a subscription `lag` changes behind.
pub(crate) fn lag_bucket(lag: u64) -> &'static str {
    LAG_BUCKETS
        .iter()
        .find(|(max, _)| lag <= *max)
        .map_or(">10000", |(_, label)| label)
}

/// The reasons of `resync`.
pub(crate) const RESYNC_REASONS: &[&str] = &["epoch_changed", "cursor_ahead", "cursor_too_old"];

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lags_fall_in_bounded_buckets() {
        assert_eq!(lag_bucket(0), "0");
        assert_eq!(lag_bucket(1), "1-10");
        assert_eq!(lag_bucket(10), "1-10");
        assert_eq!(lag_bucket(11), "11-100");
        assert_eq!(lag_bucket(1_000), "101-1000");
        assert_eq!(lag_bucket(10_000), "1001-10000");
        assert_eq!(lag_bucket(10_001), ">10000");
        assert_eq!(lag_bucket(u64::MAX), ">10000");
    }
}
