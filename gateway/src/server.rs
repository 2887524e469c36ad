//! Wiring: opens storage, starts the follower, ingest, PostgreSQL listener, the WebSocket
//! accept loop and the HTTP endpoint, and shuts them down in order.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use crate::storage::{
    Attached, Capture, CollectionStatus, CompactionReport, ConflictRecord, HistoryEntry, Status,
    SyncError,
};

use sha2::Digest;

use crate::auth::api_key::ApiKey;
use crate::auth::{Authenticator, SecretSource, load_or_create_secret_reporting};
use crate::config::{Config, redact_url};
use crate::conflict::ConflictResolver;
use crate::ingest::checks::DocChecks;
use crate::ingest::plan::Rules;
use crate::ingest::{IngestRequest, run_ingest};
use crate::metrics::Metrics;
use crate::oplog::OpLog;
use crate::shared::Shared;
use crate::storage::Store;
use crate::sync::hub::{Hub, HubEvent, run_follower};

/// A running gateway.
pub struct Gateway {
    /// The bound WebSocket address.
    pub ws_addr: SocketAddr,
    /// The bound HTTP address.
    pub http_addr: SocketAddr,
    /// The store (for admin commands and tests).
    pub store: Store,
    /// Metrics of this node.
    pub metrics: Metrics,
    /// Where the token secret came from (configured, read, or generated at this start).
    pub secret_source: SecretSource,
    shutdown: CancellationToken,
    /// Cancelled first when the node drains: `/readyz` answers 503 from then on.
    draining: CancellationToken,
    /// Stops the HTTP listener, last (it answers `/readyz` and `/metrics` during the drain).
    http_stop: CancellationToken,
    connections: TaskTracker,
    background: TaskTracker,
    grace: Duration,
    delay: Duration,
}

/// Pending connections the kernel queues for the WebSocket listener (capped by
/// `net.core.somaxconn`, 4096 on current Linux). With tokio's default of 1024, a reconnect
/// storm of 10,000 clients overflowed the queue: dropped SYNs are retried by the clients'
/// kernels after 1, 3, 7 ... seconds, which is what the storm's tail was made of.
const WS_BACKLOG: u32 = 4096;

/// Binds a listener with a chosen backlog (and `SO_REUSEADDR`, as tokio's `bind` sets it, so a
/// restarted gateway gets its port back at once).
fn bind(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

impl Gateway {
    /// Validates the configuration, opens the database (running migrations), binds both
    /// listeners and starts serving.
    pub async fn start(config: Config) -> anyhow::Result<Gateway> {
        Self::start_with_resolvers(config, Resolvers::new()).await
    }

    /// [`Gateway::start`], with business rules of the embedder's own for some collections:
    /// collection -> its [`ConflictResolver`], used instead of the collection's configured
    /// `policy` (which the command-line tools, `syncgate admin sync-errors retry`, still
    /// use). Every node of a deployment must be started with the same resolvers.
    pub async fn start_with_resolvers(
        config: Config,
        resolvers: Resolvers,
    ) -> anyhow::Result<Gateway> {
        config.validate()?;
        if let Some(unknown) = resolvers
            .keys()
            .find(|c| !config.collections.contains_key(*c))
        {
            anyhow::bail!(
                "a conflict resolver is given for {unknown:?}, which is not a declared collection"
            );
        }
        let url = config.database_url();
        if url.starts_with("sqlite:") {
            std::fs::create_dir_all(&config.data_dir).with_context(|| {
                format!("creating data directory {}", config.data_dir.display())
            })?;
        }
        let (secret, secret_source) =
            load_or_create_secret_reporting(&config.auth.jwt_secret, &config.data_dir)?;
        let auth = Authenticator::load(&secret, &config.auth)?;
        let tls = crate::tls::server_config(&config.tls)?;
        let store = open_store(&config).await?;
        let ws = bind(config.listen, WS_BACKLOG)
            .with_context(|| format!("binding WebSocket listener {}", config.listen))?;
        let http = TcpListener::bind(config.http_listen)
            .await
            .with_context(|| format!("binding HTTP listener {}", config.http_listen))?;
        let ws_addr = ws.local_addr()?;
        let http_addr = http.local_addr()?;

        let metrics = Metrics::new();
        let oplog = Arc::new(OpLog::default());
        let shutdown = CancellationToken::new();
        let draining = CancellationToken::new();
        let http_stop = CancellationToken::new();
        let background = TaskTracker::new();
        let connections = TaskTracker::new();
        let head = store.head().await?;
        let budget = crate::sync::frames::frame_budget(
            config.limits.max_frame_bytes as usize,
            config.outbound_buffer_bytes,
        );
        let hub = Arc::new(Hub::new(
            head,
            store.epoch().to_owned(),
            metrics.clone(),
            budget,
            config.catch_up_cache_bytes,
        ));
        let (hub_tx, hub_rx) = mpsc::channel::<HubEvent>(1024);
        background.spawn(run_follower(
            hub.clone(),
            store.clone(),
            hub_rx,
            Duration::from_secs(1),
            shutdown.clone(),
        ));
        if store.is_postgres() {
            // Wakes the follower whenever any node commits; the follower also polls, so a
            // lost notification only delays delivery.
            let (store, hub, shutdown) = (store.clone(), hub_tx.clone(), shutdown.clone());
            background.spawn(async move {
                store
                    .run_commit_listener(
                        move || {
                            let _ = hub.try_send(HubEvent::Wake);
                        },
                        shutdown,
                    )
                    .await
            });
        }
        let (ingest_tx, ingest_rx) = mpsc::channel::<IngestRequest>(4096);
        let (claims_tx, claims_rx) = mpsc::channel(crate::storage::claims::QUEUE);
        background.spawn(crate::storage::claims::run(
            store.clone(),
            claims_rx,
            config.max_client_ids_per_user,
        ));
        let rules = rules(&config, &resolvers);
        background.spawn(run_ingest(
            store.clone(),
            rules,
            ingest_rx,
            hub_tx,
            config.group_commit_max_mutations,
            metrics.clone(),
            oplog.clone(),
        ));
        background.spawn(report_suppressed_lines(metrics.clone(), shutdown.clone()));
        if config.compaction_interval_secs > 0 {
            background.spawn(run_compaction(
                store.clone(),
                config.clone(),
                metrics.clone(),
                shutdown.clone(),
            ));
        }
        // Every declared collection's series from the start, at 0 (a rate over a series that
        // appears with its first event misses that event; dashboards show the policy in use).
        for (name, c) in &config.collections {
            for kind in ["superseded", "tombstones", "deleted_documents"] {
                metrics
                    .compaction_removed
                    .with_label_values(&[name.as_str(), kind]);
            }
            // The policy's configured name (a resolver registered in code may record another).
            let policy = serde_json::to_value(c.policy)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            for outcome in crate::conflict::Outcome::ALL {
                metrics
                    .conflicts
                    .with_label_values(&[policy.as_str(), outcome.as_str()]);
            }
        }
        match store.horizons().await {
            Ok(horizons) => {
                for (c, h) in horizons {
                    metrics
                        .compaction_horizon
                        .with_label_values(&[c.as_str()])
                        .set(h as i64);
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading the compaction horizons failed"),
        }
        let grace = Duration::from_millis(config.shutdown_grace_ms);
        let delay = Duration::from_millis(config.shutdown_delay_ms);
        let shared = Arc::new(Shared {
            auth,
            store: store.clone(),
            hub,
            ingest: ingest_tx,
            metrics: metrics.clone(),
            oplog,
            shutdown: shutdown.clone(),
            draining: draining.clone(),
            push_bytes: Arc::new(Semaphore::new(config.node_inflight_push_bytes)),
            reads: Arc::new(Semaphore::new(config.concurrent_reads())),
            handshakes: (config.max_concurrent_handshakes > 0)
                .then(|| Arc::new(Semaphore::new(config.max_concurrent_handshakes))),
            sessions_per_user: Arc::new(dashmap::DashMap::new()),
            clients: dashmap::DashMap::new(),
            tls,
            claims: claims_tx,
            config,
        });
        // Live subscribers whose queue filled are caught up (and brought back live) by a task
        // each instead of being dropped (`ws::subscription::resume`).
        let (degraded_tx, mut degraded_rx) = mpsc::unbounded_channel();
        shared.hub.degrade_to(degraded_tx);
        {
            let shared = shared.clone();
            background.spawn(async move {
                loop {
                    let entry = tokio::select! {
                        e = degraded_rx.recv() => e,
                        _ = shared.shutdown.cancelled() => None,
                    };
                    let Some(entry) = entry else { return };
                    if !entry.is_ended() {
                        tokio::spawn(crate::ws::subscription::resume(shared.clone(), entry));
                    }
                }
            });
        }
        background.spawn(accept_loop(ws, shared.clone(), connections.clone()));
        background.spawn(crate::http::serve(http, shared, http_stop.clone()));
        tracing::info!(%ws_addr, %http_addr, "syncgate serving");
        Ok(Gateway {
            ws_addr,
            http_addr,
            store,
            metrics,
            secret_source,
            shutdown,
            draining,
            http_stop,
            connections,
            background,
            grace,
            delay,
        })
    }

    /// Resolves when shutdown has been requested.
    pub async fn cancelled(&self) {
        self.shutdown.cancelled().await
    }

    /// Drains (see [`crate::ws::connection`] for a connection's part):
    /// 1. `/readyz` answers 503 at once; for `shutdown_delay_ms` the node still serves as
    ///    before, so load balancers take it out of rotation before anyone is sent away;
    /// 2. stops accepting; every connection stops reading, answers the pushes it already took
    ///    (ingest keeps committing), sends `goaway` with a jittered `retry_after_ms` and
    ///    closes with 1012;
    /// 3. within `shutdown_grace_ms` of step 2 the HTTP listener and the background tasks
    ///    stop and the database is closed, whatever is still open.
    pub async fn shutdown(self) {
        self.draining.cancel();
        if !self.delay.is_zero() {
            tracing::info!(
                delay_ms = self.delay.as_millis() as u64,
                "draining: /readyz answers 503; serving until the delay has passed"
            );
            tokio::time::sleep(self.delay).await; // the configured delay is the point
        }
        let deadline = tokio::time::Instant::now() + self.grace;
        self.shutdown.cancel();
        self.connections.close();
        if tokio::time::timeout_at(deadline, self.connections.wait())
            .await
            .is_err()
        {
            tracing::warn!("connections did not drain within the grace period");
        }
        self.http_stop.cancel();
        self.background.close();
        // Whatever is left of the grace, and a moment for tasks to see their stop signal.
        let last = deadline.max(tokio::time::Instant::now() + Duration::from_millis(500));
        if tokio::time::timeout_at(last, self.background.wait())
            .await
            .is_err()
        {
            tracing::warn!("background tasks did not stop within the grace period");
        }
        self.store.close().await;
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, tracker: TaskTracker) {
    let limit = Arc::new(Semaphore::new(shared.config.max_connections));
    loop {
        let permit = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
        };
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((tcp, _peer)) => {
                let shared = shared.clone();
                tracker.spawn(async move {
                    crate::ws::connection::serve(shared, tcp).await;
                    drop(permit);
                });
            }
            Err(e) => {
                // Usually EMFILE: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Opens the configured database (retrying while it is starting up), applies the migrations and
/// returns the database's epoch: `syncgate migrate`.
pub async fn migrate(config: &Config) -> anyhow::Result<String> {
    let store = open_store(config).await?;
    let epoch = store.epoch().to_owned();
    store.close().await;
    Ok(epoch)
}

/// Gives `client_id` to `user`: `syncgate admin clients reassign`. Returns the previous owner,
/// or `None` if the client id was never used.
pub async fn reassign_client(
    config: &Config,
    client_id: &str,
    user: &str,
) -> anyhow::Result<Option<String>> {
    let store = open_store(config).await?;
    let previous = store.reassign_client(client_id, user).await;
    store.close().await;
    Ok(previous?)
}

/// What `syncgate admin api-keys create` makes.
#[derive(Debug, Clone)]
pub struct ApiKeyRequest {
    /// Unique name (which service holds it): 1..=64 of `A-Z a-z 0-9 _ . -`.
    pub name: String,
    /// The user its sessions act as; empty = the name.
    pub user: String,
    /// Roles it grants.
    pub roles: Vec<String>,
    /// Further claims (row scopes).
    pub claims: std::collections::BTreeMap<String, serde_json::Value>,
}

/// Creates an API key: returns the full key (to show once) and what was stored.
pub async fn create_api_key(
    config: &Config,
    request: ApiKeyRequest,
) -> anyhow::Result<(String, ApiKey)> {
    let name_ok = (1..=64).contains(&request.name.len())
        && request
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if !name_ok {
        anyhow::bail!(
            "API key name {:?} must be 1..=64 of A-Z a-z 0-9 _ . -",
            request.name
        );
    }
    let user = if request.user.is_empty() {
        request.name.clone()
    } else {
        request.user
    };
    if user.len() > crate::auth::MAX_SUBJECT_BYTES || user.chars().any(char::is_control) {
        anyhow::bail!("--user must be at most 256 bytes without control characters");
    }
    let new = crate::auth::api_key::generate();
    let key = ApiKey {
        id: new.id,
        name: request.name,
        user,
        roles: request.roles,
        claims: request.claims,
        created_at_ms: crate::storage::now_ms(),
        revoked_at_ms: None,
        secret_hash: new.secret_hash,
    };
    let store = open_store(config).await?;
    let created = store.create_api_key(&key).await;
    store.close().await;
    created?;
    Ok((new.key, key))
}

/// Every API key (never a secret): `syncgate admin api-keys list`.
pub async fn list_api_keys(config: &Config) -> anyhow::Result<Vec<ApiKey>> {
    let store = open_store(config).await?;
    let keys = store.api_keys().await;
    store.close().await;
    Ok(keys?)
}

/// Conflict resolvers an embedder supplies, by collection; each replaces the collection's
/// configured `policy` on this node (see [`Gateway::start_with_resolvers`]).
pub type Resolvers = HashMap<String, Arc<dyn ConflictResolver>>;

/// What every mutation is checked against, from the configuration (and an embedder's
/// resolvers).
fn rules(config: &Config, resolvers: &Resolvers) -> Rules {
    Rules {
        resolvers: config
            .collections
            .iter()
            .map(|(name, c)| {
                let r = resolvers
                    .get(name)
                    .cloned()
                    .unwrap_or_else(|| crate::conflict::builtin(c));
                (name.clone(), r)
            })
            .collect(),
        max_documents_per_user: config.max_documents_per_user,
        max_sync_errors_per_user: config.max_sync_errors_per_user,
        collections: config.collections.keys().cloned().collect::<HashSet<_>>(),
        limits: config.limits,
        max_batch_output_bytes: config.max_batch_output_bytes,
        write_roles: config
            .collections
            .iter()
            .filter(|(_, c)| !c.write_roles.is_empty())
            .map(|(name, c)| (name.clone(), c.write_roles.clone()))
            .collect(),
        checks: config
            .collections
            .iter()
            .filter_map(|(name, c)| Some((name.clone(), DocChecks::from_config(c)?)))
            .collect(),
    }
}

/// What `syncgate admin sync-errors retry` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Retried {
    /// Applied (now, or by an earlier retry of the same sync error) at this version.
    Applied {
        /// The document's version (the change's seq).
        version: u64,
    },
    /// Rejected again (kept as a new sync error of the retry's client id); the original stays
    /// open.
    Rejected {
        /// The code.
        code: u16,
        /// Why.
        reason: String,
    },
    /// No such sync error.
    NotFound,
}

/// Pushes a stored rejected mutation again, through the same planner and group commit as a
/// client's push (schema, references, quotas), with an operator's rights (no role or scope
/// check), as the client id `retry-<16 hex>` derived from the original client id, mutation id
/// and the number of earlier retries that were rejected again, mutation id 1: running the
/// same retry twice (two operators, or a crash before the answer was recorded) is a replay
/// and applies nothing twice, while a retry after a rejected one is a new attempt. An
/// applied retry marks the sync error `retried`. A running gateway publishes the
/// change when it next reads the log (at once on PostgreSQL, within a second on SQLite).
pub async fn retry_sync_error(
    config: &Config,
    client_id: &str,
    mutation_id: u64,
) -> anyhow::Result<Retried> {
    let store = open_store(config).await?;
    let result = retry_with(&store, config, client_id, mutation_id).await;
    store.close().await;
    result
}

async fn retry_with(
    store: &Store,
    config: &Config,
    client_id: &str,
    mutation_id: u64,
) -> anyhow::Result<Retried> {
    let Some(error) = store.sync_error(client_id, mutation_id).await? else {
        return Ok(Retried::NotFound);
    };
    let user = store
        .owner_of(client_id)
        .await?
        .unwrap_or_else(|| "syncgate-admin".to_owned());
    let attempts = store
        .sync_error_state(client_id, mutation_id)
        .await?
        .map_or(0, |(_, a)| a);
    let digest = sha2::Sha256::digest(format!("{client_id}\n{mutation_id}\n{attempts}").as_bytes());
    let short: Vec<u8> = digest.iter().take(8).copied().collect();
    let retry_client = format!("retry-{}", hex::encode(short));
    let mut mutation = error.mutation;
    mutation.mutation_id = 1;
    let result = commit_as_operator(store, config, retry_client, user, mutation).await?;
    Ok(match result.status {
        syncgate_protocol::MutationStatus::Applied => {
            store
                .set_sync_error_state(client_id, mutation_id, "retried", attempts)
                .await?;
            Retried::Applied {
                version: result.version.unwrap_or(0),
            }
        }
        syncgate_protocol::MutationStatus::Rejected => {
            // The next retry is a new attempt, under a new client id.
            store
                .set_sync_error_state(client_id, mutation_id, "open", attempts + 1)
                .await?;
            Retried::Rejected {
                code: result.code.unwrap_or(0),
                reason: result.reason.unwrap_or_default(),
            }
        }
    })
}

/// Stored sync errors (rejected mutations), oldest first: `syncgate admin sync-errors`.
pub async fn list_sync_errors(
    config: &Config,
    client_id: Option<&str>,
    open_only: bool,
    limit: u64,
) -> anyhow::Result<Vec<crate::storage::SyncError>> {
    let store = open_store(config).await?;
    let errors = store.sync_errors(client_id, open_only, limit).await;
    store.close().await;
    Ok(errors?)
}

/// Every retained change of a document, oldest first (the newest `limit`): `syncgate admin
/// history`.
pub async fn document_history(
    config: &Config,
    collection: &str,
    id: &str,
    limit: u64,
) -> anyhow::Result<Vec<HistoryEntry>> {
    let store = open_store(config).await?;
    let history = store.document_history(collection, id, limit).await;
    store.close().await;
    Ok(history?)
}

/// Attaches a PostgreSQL table to a declared collection: `syncgate capture attach` (see
/// README, "Capture of PostgreSQL tables").
pub async fn capture_attach(
    config: &Config,
    table: &str,
    collection: &str,
    key: &str,
) -> anyhow::Result<Attached> {
    if !config.collections.contains_key(collection) {
        anyhow::bail!("{collection:?} is not a declared collection");
    }
    let store = open_store(config).await?;
    let attached = store.capture_attach(table, collection, key).await;
    store.close().await;
    Ok(attached?)
}

/// Detaches a table (`None`: it was not attached): `syncgate capture detach`.
pub async fn capture_detach(config: &Config, table: &str) -> anyhow::Result<Option<Capture>> {
    let store = open_store(config).await?;
    let detached = store.capture_detach(table).await;
    store.close().await;
    Ok(detached?)
}

/// What the database holds: `syncgate admin status`.
pub async fn status(config: &Config) -> anyhow::Result<Status> {
    let store = open_store(config).await?;
    let declared: Vec<&str> = config.collections.keys().map(String::as_str).collect();
    let status = store.status(&declared).await;
    store.close().await;
    Ok(status?)
}

/// Every attached table: `syncgate capture list`.
pub async fn list_captures(config: &Config) -> anyhow::Result<Vec<Capture>> {
    let store = open_store(config).await?;
    let captures = store.captures().await;
    store.close().await;
    Ok(captures?)
}

/// Compacts every declared collection (or only `only`) by its retention: `syncgate admin
/// compact [--dry-run]`.
pub async fn compact(
    config: &Config,
    only: Option<&str>,
    dry_run: bool,
) -> anyhow::Result<Vec<CompactionReport>> {
    if let Some(c) = only
        && !config.collections.contains_key(c)
    {
        anyhow::bail!("{c:?} is not a declared collection");
    }
    let store = open_store(config).await?;
    let reports = compact_collections(&store, config, only, dry_run, None).await;
    store.close().await;
    reports
}

/// The compaction of each collection in turn; with `metrics`, counted there.
async fn compact_collections(
    store: &Store,
    config: &Config,
    only: Option<&str>,
    dry_run: bool,
    metrics: Option<&Metrics>,
) -> anyhow::Result<Vec<CompactionReport>> {
    let mut reports = Vec::new();
    for (name, c) in &config.collections {
        if only.is_some_and(|o| o != name) {
            continue;
        }
        let retention = crate::storage::Retention {
            max_age_ms: c.retain_secs.saturating_mul(1000),
            max_changes: c.retain_changes,
            batch_rows: config.compaction_batch_rows,
        };
        let now = crate::storage::now_ms() as u64;
        let observe = |held: Duration| {
            if let Some(m) = metrics {
                m.compaction_batch_seconds.observe(held.as_secs_f64());
            }
        };
        let report = store
            .compact(name, retention, now, dry_run, &observe)
            .await
            .with_context(|| format!("compacting {name:?}"))?;
        if let Some(m) = metrics {
            for (kind, n) in [
                ("superseded", report.superseded),
                ("tombstones", report.tombstones),
                ("deleted_documents", report.deleted_documents),
            ] {
                m.compaction_removed
                    .with_label_values(&[name.as_str(), kind])
                    .inc_by(n);
            }
            m.compaction_horizon
                .with_label_values(&[name.as_str()])
                .set(report.horizon as i64);
        }
        reports.push(report);
    }
    Ok(reports)
}

/// Every [`crate::oplog::SUPPRESSED_REPORT_EVERY`]: one `warn` line per dependency whose log
/// lines were suppressed meanwhile ([`crate::oplog::DependencyLogLimit`]), and the counter.
async fn report_suppressed_lines(metrics: Metrics, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(crate::oplog::SUPPRESSED_REPORT_EVERY) => {}
            _ = shutdown.cancelled() => return,
        }
        for (target, n) in crate::oplog::DEPENDENCY_LINES.take_suppressed() {
            metrics
                .log_lines_suppressed
                .with_label_values(&[target.as_str()])
                .inc_by(n);
            tracing::warn!(
                target_of_lines = %target,
                suppressed = n,
                "log lines of a dependency suppressed: more than {} per second from one place",
                crate::oplog::DEPENDENCY_LINES_PER_SECOND
            );
        }
    }
}

/// The background compaction: every `compaction_interval_secs`, each collection in turn.
/// Failures are logged and tried again at the next interval.
async fn run_compaction(
    store: Store,
    config: Config,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let every = Duration::from_secs(config.compaction_interval_secs);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.cancelled() => return,
        }
        let run = compact_collections(&store, &config, None, false, Some(&metrics));
        let reports = tokio::select! {
            r = run => r,
            _ = shutdown.cancelled() => return,
        };
        match reports {
            Ok(reports) => {
                for r in reports.iter().filter(|r| {
                    r.superseded + r.tombstones + r.deleted_documents > 0
                        || r.horizon > r.previous_horizon
                }) {
                    tracing::info!(
                        collection = %r.collection,
                        horizon = r.horizon,
                        superseded = r.superseded,
                        tombstones = r.tombstones,
                        deleted_documents = r.deleted_documents,
                        longest_batch_us = r.longest_batch_us,
                        "compacted"
                    );
                }
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "compaction failed; trying again at the next interval")
            }
        }
    }
}

/// What `syncgate admin conflicts resolve` writes.
#[derive(Debug, Clone, PartialEq)]
pub enum ConflictTake {
    /// The server's current document (written again, which closes the conflict).
    Server,
    /// The document the refused mutation would have left.
    Mine,
    /// This document.
    Body(syncgate_protocol::Body),
}

/// What `syncgate admin conflicts resolve` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// The resolution was written at this version (now, or by an earlier run of the same
    /// command).
    Applied {
        /// The document's version.
        version: u64,
    },
    /// Someone resolved it already.
    AlreadyResolved {
        /// The resolving mutation, `<mutation_id>@<client_id>`.
        by: String,
        /// The version it wrote.
        version: u64,
    },
    /// The resolution was rejected (a check failed); the conflict stays open.
    Rejected {
        /// The code.
        code: u16,
        /// Why.
        reason: String,
    },
    /// No conflict has this id.
    NotFound,
    /// The conflict was decided by its policy (not `manual`): there is nothing to resolve.
    NotManual,
}

/// Resolves an open `manual` conflict as an operator: the chosen document (or a delete)
/// written as a mutation that names the conflict, through the same planner and group commit as
/// a client's resolution, with an operator's rights, as client `resolve-<hash of the id>`
/// mutation 1 — running it again is a replay.
pub async fn resolve_conflict(
    config: &Config,
    id: &str,
    take: ConflictTake,
) -> anyhow::Result<Resolution> {
    let store = open_store(config).await?;
    let result = resolve_with(&store, config, id, take).await;
    store.close().await;
    result
}

/// Commits one mutation of an administration command — through the same planner and group
/// commit as a client's push, with an operator's rights (no role or scope check) — and
/// returns its result.
async fn commit_as_operator(
    store: &Store,
    config: &Config,
    client_id: String,
    user: String,
    mutation: syncgate_protocol::Mutation,
) -> anyhow::Result<syncgate_protocol::MutationResult> {
    let job = crate::ingest::plan::PushJob {
        client_id,
        user,
        access: Arc::new(crate::auth::scope::Access::operator(&config.collections)),
        batch: 1,
        mutations: vec![mutation],
    };
    let (outcomes, _) =
        crate::ingest::commit_group(store, &[job], &rules(config, &Resolvers::new()), None).await?;
    outcomes
        .into_iter()
        .next()
        .context("the group answered no job")?
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .results
        .into_iter()
        .next()
        .context("the job answered no mutation")
}

/// What a [`ConflictTake`] chose, as hashed into the resolving client id.
fn take_name(take: &ConflictTake) -> (String, Option<&syncgate_protocol::Body>) {
    match take {
        ConflictTake::Server => ("server".to_owned(), None),
        ConflictTake::Mine => ("mine".to_owned(), None),
        ConflictTake::Body(b) => ("body".to_owned(), Some(b)),
    }
}

async fn resolve_with(
    store: &Store,
    config: &Config,
    id: &str,
    take: ConflictTake,
) -> anyhow::Result<Resolution> {
    let Some(record) = store.conflict_record(id).await? else {
        return Ok(Resolution::NotFound);
    };
    // The same command (same conflict, same choice) is one client id: run again, it is a
    // replay; another choice after a rejected one is a new attempt.
    let mut digest = sha2::Sha256::new();
    digest.update(format!("resolve\n{id}\n").as_bytes());
    digest.update(syncgate_protocol::codec::to_msgpack(&take_name(&take)));
    let short: Vec<u8> = digest.finalize().iter().take(8).copied().collect();
    let client = format!("resolve-{}", hex::encode(short));
    if record.state == "resolved" {
        let by = record.resolved_by.unwrap_or_default();
        let version = record.resolved_version.unwrap_or(0);
        // This command's own earlier run is the same answer as then.
        if by == crate::conflict::conflict_id(&client, 1) {
            return Ok(Resolution::Applied { version });
        }
        return Ok(Resolution::AlreadyResolved { by, version });
    }
    if record.state != "open" {
        return Ok(Resolution::NotManual);
    }
    let current = store.document(&record.collection, &record.doc_id).await?;
    let version = current.as_ref().map(|d| d.version);
    let body = match take {
        ConflictTake::Server => current.filter(|d| !d.deleted).and_then(|d| d.body),
        ConflictTake::Mine => record.client_body,
        ConflictTake::Body(b) => Some(b),
    };
    let op = if body.is_some() {
        syncgate_protocol::MutationOp::Put
    } else {
        syncgate_protocol::MutationOp::Delete
    };
    let mutation = syncgate_protocol::Mutation {
        mutation_id: 1,
        collection: record.collection,
        id: record.doc_id,
        op,
        body,
        base_version: version,
        resolves: Some(id.to_owned()),
    };
    let result =
        commit_as_operator(store, config, client, "syncgate-admin".to_owned(), mutation).await?;
    Ok(match result.status {
        syncgate_protocol::MutationStatus::Applied => Resolution::Applied {
            version: result.version.unwrap_or(0),
        },
        syncgate_protocol::MutationStatus::Rejected => Resolution::Rejected {
            code: result.code.unwrap_or(0),
            reason: result.reason.unwrap_or_default(),
        },
    })
}

/// The conflict audit, oldest first: `syncgate admin conflicts`.
pub async fn list_conflicts(
    config: &Config,
    collection: Option<&str>,
    open_only: bool,
    limit: u64,
) -> anyhow::Result<Vec<ConflictRecord>> {
    let store = open_store(config).await?;
    let conflicts = store.conflict_records(collection, open_only, limit).await;
    store.close().await;
    Ok(conflicts?)
}

/// Marks a sync error as dealt with: `syncgate admin sync-errors discard`. `false`: no such
/// sync error.
pub async fn discard_sync_error(
    config: &Config,
    client_id: &str,
    mutation_id: u64,
) -> anyhow::Result<bool> {
    let store = open_store(config).await?;
    let done = store.discard_sync_error(client_id, mutation_id).await;
    store.close().await;
    Ok(done?)
}

/// Revokes a key by id or name: `syncgate admin api-keys revoke`. `None`: no such key.
pub async fn revoke_api_key(config: &Config, id_or_name: &str) -> anyhow::Result<Option<ApiKey>> {
    let store = open_store(config).await?;
    let revoked = store.revoke_api_key(id_or_name).await;
    store.close().await;
    Ok(revoked?)
}

/// Opens the configured database, retrying with capped exponential backoff for up to
/// `database_startup_wait_ms` while the failure is transient (the server is starting or
/// restarting, the session was ended); each failed attempt is logged with its cause. An error
/// retrying cannot fix ends at once.
pub(crate) async fn open_store(config: &Config) -> anyhow::Result<Store> {
    let url = config.database_url();
    let deadline = Instant::now() + Duration::from_millis(config.database_startup_wait_ms);
    let mut delay = Duration::from_millis(250);
    loop {
        match Store::open(&url, config.database_pool_size, config.sqlite_synchronous).await {
            Ok(store) => return Ok(store),
            Err(e) if e.is_transient() && Instant::now() + delay < deadline => {
                tracing::warn!(
                    database = %redact_url(&url),
                    error = %e,
                    retry_in_ms = delay.as_millis() as u64,
                    "database not available yet; retrying"
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                let hint = if e.is_transient() {
                    format!(
                        " (gave up after database_startup_wait_ms = {})",
                        config.database_startup_wait_ms
                    )
                } else {
                    String::new()
                };
                return Err(anyhow::anyhow!(
                    "opening database {}{hint}: {e}",
                    redact_url(&url)
                ));
            }
        }
    }
}
