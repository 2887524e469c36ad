//! The state every task of a node shares: configuration, store, hub, the ingest queue, the
//! authenticator, metrics, log limits and the drain signal. Its own module, so that the
//! connection and subscription tasks depend on it and not on the server that wires them
//! (no `connection -> server -> connection` circle).

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::auth::Authenticator;
use crate::config::Config;
use crate::ingest::IngestRequest;
use crate::metrics::Metrics;
use crate::oplog::OpLog;
use crate::storage::Store;
use crate::sync::hub::Hub;

/// Everything a connection needs, shared by all connections of the node.
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) store: Store,
    pub(crate) hub: Arc<Hub>,
    pub(crate) ingest: mpsc::Sender<IngestRequest>,
    pub(crate) auth: Authenticator,
    pub(crate) metrics: Metrics,
    /// Rate limits of the operator's log lines.
    pub(crate) oplog: Arc<OpLog>,
    /// Cancelled when the node starts draining.
    pub(crate) shutdown: CancellationToken,
    /// Sessions per user, for `max_connections_per_user`.
    pub(crate) sessions_per_user: Arc<dashmap::DashMap<String, usize>>,
    /// Bytes of push frames the node may still take in (`node_inflight_push_bytes`); a permit
    /// travels with its job and is given back when ingest has answered it.
    pub(crate) push_bytes: Arc<tokio::sync::Semaphore>,
    /// Turns for snapshot and catch-up pages read from the database (`node_concurrent_reads`).
    pub(crate) reads: Arc<tokio::sync::Semaphore>,
    /// Claims of client ids nobody holds yet, answered in groups (`storage::claims`).
    pub(crate) claims: mpsc::Sender<crate::storage::claims::Claim>,
    /// TLS for both listeners (`None`: plain).
    pub(crate) tls: Option<Arc<rustls::ServerConfig>>,
}
