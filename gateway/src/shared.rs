//! The state every task of a node shares: configuration, store, hub, the ingest queue, the
//! authenticator, metrics, log limits and the drain signal. Its own module, so that the
//! connection and subscription tasks depend on it and not on the server that wires them
//! (no `connection -> server -> connection` circle).

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::auth::scope::Access;
use crate::auth::{Authenticator, allowed};
use crate::config::{Config, SyncMode};
use crate::error::GatewayError;
use crate::ingest::IngestRequest;
use crate::metrics::Metrics;
use crate::oplog::OpLog;
use crate::storage::ClientClaim;
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
    /// Cancelled when the node stops serving: connections drain, the listener closes.
    pub(crate) shutdown: CancellationToken,
    /// Cancelled when the drain begins (before `shutdown`, by `shutdown_delay_ms`): `/readyz`
    /// answers 503.
    pub(crate) draining: CancellationToken,
    /// Sessions per user, for `max_connections_per_user`.
    pub(crate) sessions_per_user: Arc<dashmap::DashMap<String, usize>>,
    /// Bytes of push frames the node may still take in (`node_inflight_push_bytes`); a permit
    /// travels with its job and is given back when ingest has answered it.
    pub(crate) push_bytes: Arc<tokio::sync::Semaphore>,
    /// Handshakes in progress (`max_concurrent_handshakes`; `None`: no limit). A permit is
    /// held from the accepted connection until `welcome`.
    pub(crate) handshakes: Option<Arc<tokio::sync::Semaphore>>,
    /// Turns for snapshot and catch-up pages read from the database (`node_concurrent_reads`).
    pub(crate) reads: Arc<tokio::sync::Semaphore>,
    /// Claims of client ids nobody holds yet, answered in groups (`storage::claims`).
    pub(crate) claims: mpsc::Sender<crate::storage::claims::Claim>,
    /// Established sessions of this node by session id, for `GET /admin/clients`.
    pub(crate) clients: dashmap::DashMap<u64, Arc<ClientInfo>>,
    /// TLS for both listeners (`None`: plain).
    pub(crate) tls: Option<Arc<rustls::ServerConfig>>,
}

impl Shared {
    /// Why `access` may not read `collection` this way (`mode_allows`: subscribe or fetch),
    /// if it may not: undeclared, no read role, the collection's mode, a scope claim missing.
    pub(crate) fn read_refusal(
        &self,
        collection: &str,
        access: &Access,
        mode_allows: fn(SyncMode) -> bool,
    ) -> Option<GatewayError> {
        match self.config.collections.get(collection) {
            None => Some(GatewayError::UnknownCollection(collection.to_owned())),
            Some(c) if !allowed(&c.read_roles, &access.roles) => {
                Some(GatewayError::ReadForbidden(collection.to_owned()))
            }
            Some(c) if !mode_allows(c.mode) => Some(not_downloadable(collection, c.mode)),
            Some(_) => access.scope(collection).and_then(|sc| {
                sc.missing_claim()
                    .map(|claim| GatewayError::ScopeClaimMissing {
                        collection: collection.to_owned(),
                        claim: claim.to_owned(),
                    })
            }),
        }
    }

    /// Who holds `client_id` for `user`: read directly when someone holds it already (a known
    /// installation or service), else claimed through the group queue (`storage::claims`,
    /// which also applies `max_client_ids_per_user`). `Err`: the database failed.
    pub(crate) async fn claim_client(
        &self,
        client_id: &str,
        user: &str,
    ) -> Result<ClientClaim, ()> {
        match self.store.client_owner(client_id, user).await {
            Ok(Some(claim)) => return Ok(claim),
            Ok(None) => {}
            Err(e) => {
                tracing::error!(error = %e, "reading the client's owner failed");
                return Err(());
            }
        }
        let (reply, answer) = oneshot::channel();
        let claim = crate::storage::claims::Claim {
            client_id: client_id.to_owned(),
            user: user.to_owned(),
            reply,
        };
        if self.claims.send(claim).await.is_err() {
            return Err(());
        }
        answer.await.ok().flatten().ok_or(())
    }
}

/// The refusal for a collection whose mode sends nothing down (the way of this request).
fn not_downloadable(collection: &str, mode: SyncMode) -> GatewayError {
    let (mode, what) = match mode {
        SyncMode::Never => ("mode \"never\"", "fetch its documents by id"),
        SyncMode::UploadOnly | SyncMode::All => {
            ("mode \"upload_only\"", "clients write it and never read it")
        }
    };
    GatewayError::NotDownloadable {
        collection: collection.to_owned(),
        mode,
        what,
    }
}

/// What `GET /admin/clients` tells of one session: who, since when, its subscriptions and
/// their positions, its outbound queue, its last push and applied mutation. Written by the
/// connection, read by the admin endpoint; nothing waits on it.
pub(crate) struct ClientInfo {
    pub(crate) client_id: String,
    pub(crate) user: String,
    pub(crate) agent: String,
    pub(crate) peer: std::net::SocketAddr,
    pub(crate) connected_at_ms: u64,
    pub(crate) out: Arc<crate::outbound::Outbound>,
    pub(crate) subs:
        std::sync::Mutex<std::collections::BTreeMap<u32, Arc<crate::sync::hub::SubEntry>>>,
    /// Unix milliseconds of the last push answered (0: none yet).
    pub(crate) last_push_ms: std::sync::atomic::AtomicU64,
    /// The highest mutation id of the client known applied (from `welcome`, then every ack).
    pub(crate) applied: std::sync::atomic::AtomicU64,
}
