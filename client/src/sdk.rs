//! The offline-first client: [`Client`] and its [`ClientBuilder`].
//!
//! Writes go to the local store (the optimistic replica and the durable outbox, one local
//! transaction) and return at once; a background task (`session`) does everything that
//! needs the network. The two share:
//! - the [`LocalStore`] (SQLite; every step is one local transaction);
//! - a `Notify` by which a write wakes the task to upload;
//! - a `watch` of the connection state and a `broadcast` of [`Event`]s;
//! - an `mpsc` of [`Client::sync_now`] requests, answered by the task through oneshots.
//!
//! Dropping the client stops the task (every step it takes is already durable);
//! [`Client::close`] also waits for it to finish.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use syncgate_protocol::apply::check_shape;
use syncgate_protocol::codec::to_msgpack;
use syncgate_protocol::limits::{is_valid_collection_name, is_valid_id};
use syncgate_protocol::{Body, Cursor, ErrorCode, Filter, Limits, Mutation, MutationOp};
use tokio::sync::{Notify, broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::backoff::Backoff;
use crate::conn::Traffic;
use crate::store::{
    LocalConflict, LocalDoc, LocalStore, OutboxEntry, Rejection, StoreError, StoredSubscription,
    Take,
};

/// What a token provider returns: a token, or why none could be had.
pub type TokenFuture = Pin<Box<dyn Future<Output = Result<String, String>> + Send>>;

/// Asked for a token before every connection attempt (so an expired token is replaced).
pub type TokenProvider = Arc<dyn Fn() -> TokenFuture + Send + Sync>;

/// Errors of the client API. Input errors carry the same stable codes the gateway uses.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The call's input can never be accepted.
    #[error("{} ({}): {message}", code.name(), code.code())]
    Invalid {
        /// The stable code.
        code: ErrorCode,
        /// What is wrong.
        message: String,
    },
    /// `sync_now` could not reach the gateway before its timeout. Nothing is lost: the outbox
    /// keeps every pending mutation.
    #[error("offline: could not reach the gateway ({reason}); {pending} mutation(s) stay queued")]
    Offline {
        /// The last connection error.
        reason: String,
        /// Mutations waiting in the outbox.
        pending: u64,
    },
    /// `sync_now` was connected but did not finish before its timeout.
    #[error("sync did not finish in time; {pending} mutation(s) still queued")]
    Timeout {
        /// Mutations waiting in the outbox.
        pending: u64,
    },
    /// The gateway refused this client for a reason that retrying cannot fix: a bad or
    /// foreign token, an expired token the provider could not renew, an unsupported protocol
    /// version, an invalid client id, or a URL that is not a syncgate WebSocket endpoint. The
    /// client stops reconnecting (state [`ConnectionState::Stopped`]) until the next
    /// `sync_now`, which tries once more (after the application changed what was wrong).
    #[error("the gateway refused this client{}: {reason}", .code.map(|c| format!(" (error {c})")).unwrap_or_default())]
    Refused {
        /// The server's error code, when the refusal came as an `error` frame or close code.
        code: Option<u16>,
        /// What was refused and what to change.
        reason: String,
    },
    /// The client has no background task (opened with [`ClientBuilder::open_local`]) or is
    /// closing.
    #[error("the client is not syncing (opened locally, or closed)")]
    NotSyncing,
    /// The builder lacks something it needs.
    #[error("configuration: {0}")]
    Config(String),
}

/// The connection as the background task sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionState {
    /// Trying to connect (`attempt` counts failures since the last good session).
    Connecting {
        /// Failed attempts so far.
        attempt: u32,
    },
    /// Handshake done; subscriptions resume and the outbox uploads.
    Connected {
        /// The server's session id.
        session: String,
    },
    /// Not connected; the next attempt is in `retry_in`.
    Disconnected {
        /// Why the last attempt or session ended.
        reason: String,
        /// The wait before the next attempt.
        retry_in: Duration,
    },
    /// The gateway refused this client for a reason that retrying cannot fix (see
    /// [`ClientError::Refused`]): no more attempts until the next `sync_now`.
    Stopped {
        /// The server's error code, if it sent one.
        code: Option<u16>,
        /// What was refused and what to change.
        reason: String,
    },
    /// The client was closed.
    Closed,
}

/// Something that happened, for the application. Delivered on a bounded broadcast channel
/// ([`Client::events`]): a receiver that falls more than 4,096 events behind loses the oldest
/// (it sees `RecvError::Lagged`); the replica itself never loses anything.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The connection state changed.
    Connection(ConnectionState),
    /// A subscription finished its snapshot or catch-up; live changes follow.
    Synced {
        /// The collection.
        collection: String,
        /// Its cursor.
        cursor: Cursor,
    },
    /// A server change was applied to the replica.
    RemoteChange {
        /// The collection.
        collection: String,
        /// The document.
        id: String,
        /// The server version now held.
        version: u64,
        /// The server's body; `None` for a delete (or the document left the filter).
        body: Option<Body>,
    },
    /// A server change arrived for a document with local edits still waiting for their ack.
    /// The server orders writes (last writer wins): the local edits are re-applied on top of
    /// the server's version for now, and the server's answer to them decides.
    Conflict {
        /// The collection.
        collection: String,
        /// The document.
        id: String,
        /// The server version that arrived.
        server_version: u64,
        /// Local mutations of the document not acknowledged yet.
        pending_mutations: u64,
    },
    /// The server applied a local mutation.
    Uploaded {
        /// The mutation.
        mutation_id: u64,
        /// The version it wrote.
        version: u64,
    },
    /// The server's `manual` conflict policy refused a local mutation: the replica now holds
    /// the server's version, and the conflict (both versions) waits in
    /// [`Client::conflicts`] until [`Client::resolve`] settles it.
    ConflictOpened(LocalConflict),
    /// The server refused a local mutation; it is kept in the local `rejected` table and the
    /// server's sync-error table, and its optimistic effect is undone. A refusal by the
    /// `first_write_wins` policy (code 413, `conflict`) is one too: the replica then holds the
    /// server's version.
    Rejected {
        /// The whole mutation.
        mutation: Mutation,
        /// The stable code.
        code: u16,
        /// The server's reason.
        reason: String,
    },
    /// The server reset a subscription (`epoch_changed`, `cursor_ahead`, `cursor_too_old`): it
    /// is downloaded again; local edits stay in the outbox.
    Resync {
        /// The collection.
        collection: String,
        /// The server's reason.
        reason: String,
    },
    /// The server reported an error (a fatal one ends the session and the client reconnects).
    ServerError {
        /// The stable code.
        code: u16,
        /// Its name.
        name: String,
        /// The server's message.
        message: String,
    },
}

/// What [`Client::sync_now`] achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncReport {
    /// The server's log position the replica has caught up with.
    pub head: u64,
    /// Mutations still in the outbox that were written after the call began.
    pub pending: u64,
    /// Mutations the server refused during this session.
    pub rejected: u64,
}

/// The client's state, for `status` displays.
#[derive(Debug, Clone)]
pub struct Status {
    /// The client id.
    pub client_id: String,
    /// The data directory.
    pub data_dir: PathBuf,
    /// The connection (`None` for a client opened with [`ClientBuilder::open_local`]).
    pub connection: Option<ConnectionState>,
    /// Mutations not acknowledged yet.
    pub pending: u64,
    /// The last mutation id handed out.
    pub last_mutation_id: u64,
    /// Rejected mutations kept locally.
    pub rejected: u64,
    /// The subscriptions with their cursors.
    pub subscriptions: Vec<StoredSubscription>,
    /// Message bytes sent to the gateway since the client was opened, as on the wire
    /// (compressed frames count their compressed size).
    pub sent_bytes: u64,
    /// Message bytes received from the gateway since the client was opened, as on the wire.
    pub received_bytes: u64,
}

/// Settings of the background task.
#[derive(Clone)]
pub(crate) struct Settings {
    pub(crate) url: String,
    pub(crate) token: TokenProvider,
    pub(crate) heartbeat: Duration,
    pub(crate) dead_after: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) backoff: Backoff,
    pub(crate) batch_size: u32,
    /// Whether `hello` offers frame compression.
    pub(crate) compression: bool,
    /// How `wss://` servers are verified (`None`: the public web PKI).
    pub(crate) tls: Option<Arc<rustls::ClientConfig>>,
}

/// A `sync_now` request: answered once every mutation up to `upto` has its outcome and the
/// replica has caught up with the server's head.
pub(crate) struct SyncRequest {
    pub(crate) upto: u64,
    /// Fail with `Offline` as soon as a connection attempt fails, instead of retrying until
    /// the caller's timeout.
    pub(crate) fail_fast: bool,
    pub(crate) reply: oneshot::Sender<Result<SyncReport, SyncFailure>>,
}

/// Why the background task gave up on a `sync_now` before its timeout.
#[derive(Debug)]
pub(crate) enum SyncFailure {
    /// The gateway could not be reached (only for `fail_fast` requests).
    Offline(String),
    /// The gateway refused the client permanently.
    Refused { code: Option<u16>, reason: String },
}

/// What the client and its task share.
pub(crate) struct Shared {
    pub(crate) store: LocalStore,
    pub(crate) events: broadcast::Sender<Event>,
    pub(crate) state: watch::Sender<ConnectionState>,
    pub(crate) wake: Notify,
    /// Bytes sent and received over every connection of this client.
    pub(crate) traffic: Arc<Traffic>,
}

impl Shared {
    pub(crate) fn emit(&self, e: Event) {
        // No receiver is fine: events are a convenience, the store is the truth.
        let _ = self.events.send(e);
    }

    pub(crate) fn set_state(&self, s: ConnectionState) {
        self.state.send_replace(s.clone());
        self.emit(Event::Connection(s));
    }
}

/// Builds a [`Client`].
pub struct ClientBuilder {
    url: String,
    token: Option<TokenProvider>,
    data_dir: PathBuf,
    subscriptions: Option<Vec<(String, Body)>>,
    /// Add the builder's subscriptions to the stored ones instead of replacing them.
    keep_subscriptions: bool,
    heartbeat: Duration,
    dead_after: Option<Duration>,
    connect_timeout: Duration,
    backoff: Backoff,
    batch_size: u32,
    compression: bool,
    events: broadcast::Sender<Event>,
    encryption_key: Option<crate::store::EncryptionKey>,
    tls_ca_file: Option<PathBuf>,
}

impl ClientBuilder {
    /// A client of the gateway at `url` (`ws://host:port`), storing its data in
    /// `./syncgate-client-data` unless [`data_dir`](Self::data_dir) says otherwise.
    pub fn new(url: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            url: url.into(),
            token: None,
            data_dir: PathBuf::from("syncgate-client-data"),
            subscriptions: None,
            keep_subscriptions: false,
            heartbeat: Duration::from_secs(10),
            dead_after: None,
            connect_timeout: Duration::from_secs(10),
            backoff: Backoff::default(),
            batch_size: 500,
            compression: true,
            events: broadcast::channel(4096).0,
            encryption_key: None,
            tls_ca_file: None,
        }
    }

    /// The events stream, before the client opens: unlike [`Client::events`], it also sees
    /// the first connection attempt's events.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// A fixed token.
    pub fn token(self, token: impl Into<String>) -> ClientBuilder {
        let token: Arc<str> = token.into().into();
        self.token_provider(move || {
            let t = token.to_string();
            async move { Ok(t) }
        })
    }

    /// A token provider, asked before every connection attempt (and so again after the server
    /// said the token expired).
    pub fn token_provider<F, Fut>(mut self, f: F) -> ClientBuilder
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, String>> + Send + 'static,
    {
        self.token = Some(Arc::new(move || Box::pin(f()) as TokenFuture));
        self
    }

    /// Encrypts the local store at rest (AES-256-GCM): bodies, outbox and rejected mutations
    /// and subscription filters; collection names, document ids and versions stay readable.
    /// A new data directory is created encrypted; an encrypted one opens only with its key
    /// (`StoreError::WrongKey`, `StoreError::KeyRequired`), and a plain one that holds data
    /// is never opened with a key (`StoreError::NotEncrypted`).
    pub fn encryption_key(mut self, key: crate::store::EncryptionKey) -> ClientBuilder {
        self.encryption_key = Some(key);
        self
    }

    /// For `wss://` URLs: trust the CA certificates in this PEM file (a private CA) instead of
    /// the public web PKI.
    pub fn tls_ca_file(mut self, path: impl Into<PathBuf>) -> ClientBuilder {
        self.tls_ca_file = Some(path.into());
        self
    }

    /// Where the local store lives (one client per directory; it is locked while open).
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> ClientBuilder {
        self.data_dir = dir.into();
        self
    }

    /// Follows a collection, with an equality filter (empty = every document). Once any
    /// subscription is given, the set given replaces the stored one (collections no longer
    /// named are unsubscribed and their downloaded documents forgotten; local edits are kept),
    /// unless [`keep_subscriptions`](Self::keep_subscriptions) says to add to it; with none,
    /// the stored set is used (so a command line can read what a long-running client
    /// downloaded).
    pub fn subscribe(mut self, collection: impl Into<String>, filter: Body) -> ClientBuilder {
        let collection = collection.into();
        let subs = self.subscriptions.get_or_insert_with(Vec::new);
        subs.retain(|(c, _)| *c != collection);
        subs.push((collection, filter));
        self
    }

    /// The data directory's subscriptions become exactly `subscriptions` (empty: none):
    /// collections left out are unsubscribed and their downloaded documents forgotten (local
    /// edits are kept).
    pub fn replace_subscriptions(mut self, subscriptions: Vec<(String, Body)>) -> ClientBuilder {
        self.subscriptions = Some(subscriptions);
        self.keep_subscriptions = false;
        self
    }

    /// With `true`, the subscriptions given to this builder are added to those stored in the
    /// data directory (a collection already followed gets the new filter) and none is removed.
    pub fn keep_subscriptions(mut self, keep: bool) -> ClientBuilder {
        self.keep_subscriptions = keep;
        self
    }

    /// Heartbeat interval (the server's, if shorter, wins) and the silence after which the
    /// connection is presumed dead and replaced (default: three intervals).
    pub fn heartbeat(mut self, interval: Duration, dead_after: Option<Duration>) -> ClientBuilder {
        self.heartbeat = interval.max(Duration::from_millis(10));
        self.dead_after = dead_after;
        self
    }

    /// Reconnect backoff.
    pub fn backoff(mut self, backoff: Backoff) -> ClientBuilder {
        self.backoff = backoff;
        self
    }

    /// Time allowed for TCP + WebSocket + handshake.
    pub fn connect_timeout(mut self, t: Duration) -> ClientBuilder {
        self.connect_timeout = t;
        self
    }

    /// Most mutations per uploaded batch (the server's limit, if lower, wins).
    pub fn batch_size(mut self, n: u32) -> ClientBuilder {
        self.batch_size = n.max(1);
        self
    }

    /// Whether to offer frame compression (default: yes). With it, snapshot and catch-up
    /// pages (and large uploads) cross the link deflated, several times smaller for typical
    /// ERP documents, at some CPU on both ends (PROTOCOL.md §3.15).
    pub fn compression(mut self, on: bool) -> ClientBuilder {
        self.compression = on;
        self
    }

    async fn open_store(&self) -> Result<LocalStore, ClientError> {
        if let Some(subs) = &self.subscriptions {
            for (c, f) in subs {
                if !is_valid_collection_name(c) {
                    return Err(invalid(
                        ErrorCode::UnknownCollection,
                        format!("{c:?} is not a collection name ([a-z][a-z0-9_]{{0,63}})"),
                    ));
                }
                Filter::new(f).map_err(|m| invalid(ErrorCode::InvalidFilter, m))?;
            }
        }
        let store = LocalStore::open_with(&self.data_dir, self.encryption_key.as_ref()).await?;
        if let Some(subs) = &self.subscriptions {
            if self.keep_subscriptions {
                let mut all: Vec<(String, Body)> = store
                    .subscriptions()
                    .await?
                    .into_iter()
                    .filter(|s| !subs.iter().any(|(c, _)| *c == s.collection))
                    .map(|s| (s.collection, s.filter))
                    .collect();
                all.extend(subs.iter().cloned());
                store.set_subscriptions(&all).await?;
            } else {
                store.set_subscriptions(subs).await?;
            }
        }
        Ok(store)
    }

    /// Opens the local store and starts the background task.
    pub async fn open(self) -> Result<Client, ClientError> {
        let settings = self.settings()?.ok_or_else(|| {
            ClientError::Config("no token or token provider: the gateway needs one".into())
        })?;
        let store = self.open_store().await?;
        let shared = shared(store, self.events.clone());
        let (sync_tx, sync_rx) = mpsc::channel(64);
        let cancel = CancellationToken::new();
        let task = tokio::spawn(crate::session::run(
            shared.clone(),
            settings.clone(),
            sync_rx,
            cancel.clone(),
        ));
        Ok(Client {
            shared,
            sync_tx: Some(sync_tx),
            task: Some(task),
            cancel: Some(cancel.clone().drop_guard()),
            settings: Some(settings),
        })
    }

    /// Opens the local store only: reads, writes to the outbox and status work; nothing is
    /// sent in the background. For command-line tools that inspect or queue without
    /// connecting ([`Client::fetch`] still works when a token was given).
    pub async fn open_local(self) -> Result<Client, ClientError> {
        let settings = self.settings()?;
        let store = self.open_store().await?;
        Ok(Client {
            shared: shared(store, self.events.clone()),
            sync_tx: None,
            task: None,
            cancel: None,
            settings,
        })
    }

    /// How to reach the gateway; `None` without a token.
    fn settings(&self) -> Result<Option<Settings>, ClientError> {
        let Some(token) = self.token.clone() else {
            return Ok(None);
        };
        let tls = match &self.tls_ca_file {
            Some(path) => Some(Arc::new(
                syncgate_protocol::tls::client_config(Some(path))
                    .map_err(|e| ClientError::Config(format!("TLS CA file: {e}")))?,
            )),
            None => None,
        };
        Ok(Some(Settings {
            url: self.url.clone(),
            tls,
            token,
            heartbeat: self.heartbeat,
            dead_after: self.dead_after.unwrap_or(self.heartbeat * 3),
            connect_timeout: self.connect_timeout,
            backoff: self.backoff,
            batch_size: self.batch_size,
            compression: self.compression,
        }))
    }
}

fn shared(store: LocalStore, events: broadcast::Sender<Event>) -> Arc<Shared> {
    Arc::new(Shared {
        store,
        events,
        state: watch::channel(ConnectionState::Connecting { attempt: 0 }).0,
        wake: Notify::new(),
        traffic: Arc::default(),
    })
}

/// Why one fetch did not get its answer.
enum FetchError {
    /// No connection, or it broke: nothing to blame the request for.
    Offline(String),
    /// The server refused the request (or the session) with this error.
    Refused(syncgate_protocol::ErrorFrame),
}

/// One connection, one `fetch`, every `fetched` frame until `done`.
async fn fetch_once(
    settings: &Settings,
    client: &Client,
    collection: &str,
    ids: &[&str],
) -> Result<Fetched, FetchError> {
    use syncgate_protocol::Frame;
    let token = (settings.token)()
        .await
        .map_err(|e| FetchError::Offline(format!("token provider: {e}")))?;
    let connect = async {
        crate::conn::Connection::open_tls(&settings.url, None, None, settings.tls.clone())
            .await?
            .offer_compression(settings.compression)
            .count_into(client.shared.traffic.clone())
            .handshake(client.client_id(), &token)
            .await
    };
    let (mut conn, _) = connect.await.map_err(|e| match e {
        crate::conn::ConnError::Server(e) => FetchError::Refused(e),
        other => FetchError::Offline(other.to_string()),
    })?;
    let request = syncgate_protocol::Fetch {
        req: 1,
        collection: collection.to_owned(),
        ids: ids.iter().map(|id| (*id).to_owned()).collect(),
    };
    conn.send(&Frame::Fetch(request))
        .await
        .map_err(|e| FetchError::Offline(e.to_string()))?;
    let mut out = Fetched {
        docs: Vec::new(),
        missing: Vec::new(),
    };
    loop {
        // The caller's timeout bounds the whole fetch.
        match conn.recv_timeout(Duration::from_secs(3600)).await {
            Ok(Frame::Fetched(f)) => {
                out.docs.extend(f.docs);
                out.missing.extend(f.missing);
                if f.done {
                    conn.close().await;
                    return Ok(out);
                }
            }
            Ok(Frame::Error(e)) => return Err(FetchError::Refused(e)),
            Ok(_) => {}
            Err(e) => return Err(FetchError::Offline(e.to_string())),
        }
    }
}

fn invalid(code: ErrorCode, message: impl Into<String>) -> ClientError {
    ClientError::Invalid {
        code,
        message: message.into(),
    }
}

/// An offline-first syncgate client. See the crate documentation for a tour.
pub struct Client {
    shared: Arc<Shared>,
    sync_tx: Option<mpsc::Sender<SyncRequest>>,
    task: Option<JoinHandle<()>>,
    cancel: Option<DropGuard>,
    /// How to reach the gateway (`None`: opened with `open_local`).
    settings: Option<Settings>,
}

/// What [`Client::fetch`] found.
#[derive(Debug, Clone, PartialEq)]
pub struct Fetched {
    /// The documents that exist and that this user may see, now in the local replica.
    pub docs: Vec<syncgate_protocol::Doc>,
    /// Ids the server does not have (never written, deleted, or outside the user's scope).
    pub missing: Vec<String>,
}

impl Client {
    /// A builder for the gateway at `url`.
    pub fn builder(url: impl Into<String>) -> ClientBuilder {
        ClientBuilder::new(url)
    }

    /// The client id (created once per data directory).
    pub fn client_id(&self) -> &str {
        self.shared.store.client_id()
    }

    /// Creates or replaces a document. Returns the mutation id once it is durably queued.
    pub async fn put(&self, collection: &str, id: &str, body: Body) -> Result<u64, ClientError> {
        self.write(collection, id, MutationOp::Put, Some(body))
            .await
    }

    /// Sets some fields of a document (a nil value removes the field).
    pub async fn patch(
        &self,
        collection: &str,
        id: &str,
        fields: Body,
    ) -> Result<u64, ClientError> {
        self.write(collection, id, MutationOp::Patch, Some(fields))
            .await
    }

    /// Deletes a document.
    pub async fn delete(&self, collection: &str, id: &str) -> Result<u64, ClientError> {
        self.write(collection, id, MutationOp::Delete, None).await
    }

    async fn write(
        &self,
        collection: &str,
        id: &str,
        op: MutationOp,
        body: Option<Body>,
    ) -> Result<u64, ClientError> {
        let limits = Limits::default();
        if !is_valid_collection_name(collection) {
            return Err(invalid(
                ErrorCode::UnknownCollection,
                format!("{collection:?} is not a collection name ([a-z][a-z0-9_]{{0,63}})"),
            ));
        }
        if !is_valid_id(id, limits.max_id_bytes) {
            return Err(invalid(
                ErrorCode::InvalidDocumentId,
                format!(
                    "document id must be 1..={} bytes without control characters",
                    limits.max_id_bytes
                ),
            ));
        }
        check_shape(op, body.as_ref()).map_err(|(code, m)| invalid(code, m))?;
        if let Some(b) = &body {
            let size = to_msgpack(b).len();
            let max = self
                .shared
                .store
                .meta("max_document_bytes")
                .await?
                .and_then(|v| v.parse().ok())
                .unwrap_or(limits.max_document_bytes as usize);
            if size > max {
                return Err(invalid(
                    ErrorCode::DocumentTooLarge,
                    format!("document is {size} bytes, the limit is {max}"),
                ));
            }
        }
        let mutation_id = self.shared.store.write(collection, id, op, body).await?;
        self.shared.wake.notify_one();
        Ok(mutation_id)
    }

    /// The optimistic state of a document (`None` if absent or deleted).
    pub async fn get(&self, collection: &str, id: &str) -> Result<Option<LocalDoc>, ClientError> {
        Ok(self.shared.store.get(collection, id).await?)
    }

    /// Every document of a collection whose fields equal `filter`'s (empty = all), by id.
    pub async fn query(
        &self,
        collection: &str,
        filter: &Body,
    ) -> Result<Vec<LocalDoc>, ClientError> {
        let f = Filter::new(filter).map_err(|m| invalid(ErrorCode::InvalidFilter, m))?;
        Ok(self.shared.store.query(collection, &f).await?)
    }

    /// How many documents of a collection the optimistic state holds (deleted ones not
    /// counted), without reading them: a progress display for a large first sync.
    pub async fn count(&self, collection: &str) -> Result<u64, ClientError> {
        Ok(self.shared.store.count(collection).await?)
    }

    /// The outbox: mutations waiting for the server, oldest first.
    pub async fn outbox(&self) -> Result<Vec<OutboxEntry>, ClientError> {
        Ok(self.shared.store.outbox().await?)
    }

    /// Mutations the server rejected, kept until the application acknowledges them.
    pub async fn rejected(&self) -> Result<Vec<Rejection>, ClientError> {
        Ok(self.shared.store.rejected().await?)
    }

    /// `manual` conflicts waiting for a decision, oldest first: each with the refused local
    /// mutation and the server's version and body.
    pub async fn conflicts(&self) -> Result<Vec<LocalConflict>, ClientError> {
        Ok(self.shared.store.conflicts().await?)
    }

    /// Resolves a `manual` conflict: the server's version, the refused local edit (applied
    /// on top of the server's version), or a document of the caller's making, written as a
    /// mutation that names the conflict (the server applies it whatever changed since, and
    /// closes the conflict). Returns the mutation id.
    pub async fn resolve(&self, conflict_id: &str, take: Take) -> Result<u64, ClientError> {
        if let Take::Body(b) = &take {
            check_shape(MutationOp::Put, Some(b)).map_err(|(code, m)| invalid(code, m))?;
        }
        let Some(mutation_id) = self.shared.store.resolve(conflict_id, take).await? else {
            return Err(invalid(
                ErrorCode::UnknownConflict,
                format!("no open conflict {conflict_id:?} (see Client::conflicts)"),
            ));
        };
        self.shared.wake.notify_one();
        Ok(mutation_id)
    }

    /// Forgets rejected mutations the application has dealt with (shown to the operator,
    /// fixed and written again ...): those with these ids, or every one (`None`). Returns
    /// how many were removed.
    pub async fn acknowledge_rejected(
        &self,
        mutation_ids: Option<&[u64]>,
    ) -> Result<u64, ClientError> {
        Ok(self.shared.store.acknowledge_rejected(mutation_ids).await?)
    }

    /// The events stream.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.shared.events.subscribe()
    }

    /// The connection state (`None` for a local-only client).
    pub fn connection(&self) -> Option<ConnectionState> {
        self.task
            .as_ref()
            .map(|_| self.shared.state.borrow().clone())
    }

    /// Watches the connection state.
    pub fn watch_connection(&self) -> watch::Receiver<ConnectionState> {
        self.shared.state.subscribe()
    }

    /// A summary for status displays.
    pub async fn status(&self) -> Result<Status, ClientError> {
        let store = &self.shared.store;
        Ok(Status {
            client_id: store.client_id().to_owned(),
            data_dir: store.dir().to_owned(),
            connection: self.connection(),
            pending: store.pending_count().await?,
            last_mutation_id: store.last_mutation_id().await?,
            rejected: store.rejected().await?.len() as u64,
            subscriptions: store.subscriptions().await?,
            sent_bytes: self.shared.traffic.sent(),
            received_bytes: self.shared.traffic.received(),
        })
    }

    /// Uploads every mutation written before the call, then downloads until every subscription
    /// has caught up with the server's head, then returns. Fails with [`ClientError::Offline`]
    /// if the gateway cannot be reached within `timeout` (a connection attempt is made at once,
    /// cutting any backoff wait short), or [`ClientError::Timeout`] if it was reached but the
    /// work did not finish. Nothing is lost on failure: the outbox keeps what is pending.
    ///
    /// A refusal that retrying cannot fix (bad token, wrong URL ...) fails at once with
    /// [`ClientError::Refused`].
    pub async fn sync_now(&self, timeout: Duration) -> Result<SyncReport, ClientError> {
        self.sync(timeout, false).await
    }

    /// Like [`sync_now`](Self::sync_now), but gives up at once with [`ClientError::Offline`]
    /// when a connection attempt fails (refused, unreachable, no answer within the connect
    /// timeout) instead of retrying until `timeout`: for a command that has queued an edit
    /// and wants to upload it if the gateway is there, without making an offline user wait.
    /// `timeout` then bounds only the work on an established connection.
    pub async fn sync_now_if_reachable(
        &self,
        timeout: Duration,
    ) -> Result<SyncReport, ClientError> {
        self.sync(timeout, true).await
    }

    async fn sync(&self, timeout: Duration, fail_fast: bool) -> Result<SyncReport, ClientError> {
        let tx = self.sync_tx.as_ref().ok_or(ClientError::NotSyncing)?;
        let upto = self.shared.store.last_mutation_id().await?;
        let (reply, rx) = oneshot::channel();
        tx.send(SyncRequest {
            upto,
            fail_fast,
            reply,
        })
        .await
        .map_err(|_| ClientError::NotSyncing)?;
        self.shared.wake.notify_one();
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Ok(report))) => Ok(report),
            Ok(Ok(Err(SyncFailure::Offline(reason)))) => Err(ClientError::Offline {
                reason,
                pending: self.shared.store.pending_count().await?,
            }),
            Ok(Ok(Err(SyncFailure::Refused { code, reason }))) => {
                Err(ClientError::Refused { code, reason })
            }
            Ok(Err(_)) => Err(ClientError::NotSyncing),
            Err(_) => {
                let pending = self.shared.store.pending_count().await?;
                match self.shared.state.borrow().clone() {
                    ConnectionState::Connected { .. } => Err(ClientError::Timeout { pending }),
                    ConnectionState::Disconnected { reason, .. } => {
                        Err(ClientError::Offline { reason, pending })
                    }
                    other => Err(ClientError::Offline {
                        reason: format!("{other:?}"),
                        pending,
                    }),
                }
            }
        }
    }

    /// Reads documents by id from the gateway, once, and keeps them in the local replica (so
    /// [`get`](Self::get) finds them offline afterwards; local edits not yet acknowledged stay
    /// on top). The way to read a collection whose mode is `never`, and a selective read of
    /// any collection this user may read. Uses a connection of its own, so it does not wait
    /// for the background sync. Fails with [`ClientError::Offline`] when the gateway cannot be
    /// reached or does not answer within `timeout`, and with [`ClientError::Invalid`]
    /// carrying the server's code when the fetch is refused (`not_downloadable`,
    /// `read_forbidden`, `invalid_fetch` ...).
    pub async fn fetch(
        &self,
        collection: &str,
        ids: &[&str],
        timeout: Duration,
    ) -> Result<Fetched, ClientError> {
        let settings = self.settings.as_ref().ok_or(ClientError::NotSyncing)?;
        let offline = |reason: String| async {
            Err(ClientError::Offline {
                reason,
                pending: self.shared.store.pending_count().await?,
            })
        };
        let answer = tokio::time::timeout(timeout, fetch_once(settings, self, collection, ids));
        let fetched = match answer.await {
            Err(_) => return offline(format!("no answer within {timeout:?}")).await,
            Ok(Err(FetchError::Offline(reason))) => return offline(reason).await,
            Ok(Err(FetchError::Refused(e))) => {
                return Err(match ErrorCode::from_code(e.code) {
                    Some(code) => invalid(code, e.message),
                    None => ClientError::Refused {
                        code: Some(e.code),
                        reason: e.message,
                    },
                });
            }
            Ok(Ok(f)) => f,
        };
        self.shared
            .store
            .apply_snapshot(collection, &fetched.docs)
            .await?;
        Ok(fetched)
    }

    /// Stops the background task, waits for it, and closes the store (releasing the data
    /// directory).
    pub async fn close(mut self) {
        drop(self.cancel.take());
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        self.shared.store.clone().close().await;
    }
}
