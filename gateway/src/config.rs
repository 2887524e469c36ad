//! Gateway configuration: one serde `Config`, every field defaulted and documented. Sources,
//! lowest precedence first: built-in defaults, the TOML file, `SYNCGATE_*` environment
//! variables, command-line flags (the last two are merged in `main.rs`).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use syncgate_protocol::Limits;
use syncgate_protocol::limits::is_valid_collection_name;

/// The default WebSocket port (chosen clear of PostgreSQL, Redis, NATS, MQTT and RabbitMQ).
pub const DEFAULT_PORT: u16 = 7420;
/// The default HTTP port for `/healthz`, `/readyz` and `/metrics`.
pub const DEFAULT_HTTP_PORT: u16 = 7421;

/// The whole gateway configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address of the WebSocket listener.
    pub listen: SocketAddr,
    /// Address of the HTTP listener (`/healthz`, `/readyz`, `/metrics`).
    pub http_listen: SocketAddr,
    /// Directory for the SQLite database and the generated JWT secret.
    pub data_dir: PathBuf,
    /// Database URL: `sqlite://PATH` or `postgres://...`. Empty means
    /// `sqlite://<data_dir>/syncgate.db`.
    pub database: String,
    /// Maximum pooled database connections.
    pub database_pool_size: u32,
    /// SQLite durability: `full` (the default) syncs the WAL on every commit, so an
    /// acknowledged push survives a power loss; `normal` syncs at checkpoints only, so an
    /// acknowledged push survives a crash of the process but the last commits before a power
    /// loss or kernel crash can be lost. PostgreSQL ignores this (use its `synchronous_commit`).
    pub sqlite_synchronous: SqliteSynchronous,
    /// Authentication settings.
    pub auth: AuthConfig,
    /// TLS for both listeners (`wss://`, `https://`). Off unless a certificate is given; plain
    /// listeners are for use behind a proxy that terminates TLS.
    pub tls: TlsConfig,
    /// Limits announced in `Welcome` and enforced on every connection. Each key of the
    /// `[limits]` table defaults on its own.
    #[serde(with = "limits_table")]
    pub limits: Limits,
    /// Interval at which clients should send a frame; silence for 3 intervals closes.
    pub heartbeat_ms: u32,
    /// Byte cap of each connection's outbound queue (frames counted uncompressed). A live
    /// subscriber whose queue would exceed it is degraded to paged catch-up (see
    /// `slow_consumer_deadline_ms`).
    pub outbound_buffer_bytes: usize,
    /// Whether a client that offers compression in `hello` gets it (PROTOCOL.md §3.15).
    pub compression: bool,
    /// Frames of at least this many bytes are sent compressed on a session that negotiated
    /// it (snapshot and catch-up pages, large live chunks), when compressing makes them
    /// smaller.
    pub compression_min_bytes: usize,
    /// The deflate level, 1 (fastest) to 9 (smallest).
    pub compression_level: u32,
    /// Memory (estimated) for the most recently published changes, from which resuming
    /// subscriptions catch up without reading the database; 0 turns it off.
    pub catch_up_cache_bytes: usize,
    /// Maximum concurrent WebSocket connections; further connections wait in the kernel backlog.
    pub max_connections: usize,
    /// Frames per second a connection may send, pushes not counted (a burst of one second's
    /// worth is allowed); beyond it frames get `rate_limited` (506), and a connection that keeps
    /// going over it is closed. 0 = no limit.
    pub max_frames_per_second: u32,
    /// Mutations per second a connection may push (a burst of one second's worth). Pushes
    /// beyond it are not refused: the connection stops reading until it is back under the
    /// rate, so a flooding client is slowed by backpressure and loses nothing. 0 = no limit.
    pub max_push_mutations_per_second: u32,
    /// Bytes of push frames per second a connection may send, paced like
    /// `max_push_mutations_per_second` (a burst of one second's worth, at least one frame).
    /// 0 = no limit.
    pub max_push_bytes_per_second: u64,
    /// Subscriptions per second a connection may start (a burst of `limits.max_subscriptions`
    /// or one second's worth, whichever is more). A subscription beyond it is accepted and its
    /// snapshot or catch-up waits for its turn, so subscribe/unsubscribe churn cannot scan the
    /// database faster than this. 0 = no limit.
    pub max_subscribes_per_second: u32,
    /// Snapshot and catch-up pages the whole node reads from the database (and encodes) at
    /// once; further pages wait for a turn, so subscriptions starting cannot take every core
    /// and pool connection from the group commit. 0 = half the machine's cores (at least one).
    pub node_concurrent_reads: usize,
    /// Origins (`scheme://host[:port]`) whose browser pages may open a WebSocket; empty = any.
    /// Requests without an `Origin` header (clients that are not browsers) are not affected.
    pub allowed_origins: Vec<String>,
    /// How long a new connection has to complete the WebSocket upgrade, and then to send
    /// `hello`, in milliseconds; a connection that does not is closed.
    pub handshake_timeout_ms: u64,
    /// How long a subscriber whose outbound queue filled may stay behind, in milliseconds: it
    /// stops receiving live changes and catches up in pages (superseded versions of a
    /// document left out when it follows a whole collection), then rejoins live with no gap;
    /// only if it is still behind after this long is it closed with `slow_consumer`.
    pub slow_consumer_deadline_ms: u64,
    /// How long a closing connection waits, at most, for its client to take the last frames
    /// (the error that says why, `goaway`) and the close frame, in milliseconds, reading and
    /// dropping what the client still sends meanwhile so that the close is never a reset. A
    /// client silent for three heartbeats is not waited for.
    pub close_linger_ms: u64,
    /// Handshakes (from the accepted connection to `welcome`) a node runs at once; a
    /// connection beyond them waits up to `handshake_queue_ms` for a turn (first come, first
    /// served; its upgrade is answered once it has one), and then gets `goaway` with a
    /// jittered `retry_after_ms` (0.1–1 s) and close 1013, instead of queueing behind the
    /// others until it times out, so a reconnect storm becomes a ramp. 0 = no limit.
    pub max_concurrent_handshakes: usize,
    /// How long a connection beyond `max_concurrent_handshakes` waits for a turn before it is
    /// sent away, in milliseconds (0 = sent away at once). A waiting connection holds only
    /// its socket; coming back on a retry hint costs a client a new connection and 0.1–1 s.
    pub handshake_queue_ms: u64,
    /// Sessions one user (token `sub`) may hold at once on this node; 0 = no limit. Further
    /// handshakes of that user get `too_many_connections` (204).
    pub max_connections_per_user: usize,
    /// Documents one user may hold (created minus deleted, counted from when this gateway
    /// version first ran); a create beyond it is rejected with `quota_exceeded` (409). 0 = no
    /// limit.
    pub max_documents_per_user: u64,
    /// Rejected mutations stored per user (counted from when this gateway version first
    /// ran); beyond it a rejection is still answered with its code but no longer stored (a
    /// replay of it after a lost acknowledgement gets 400), so one client that keeps sending
    /// bad mutations cannot fill the disk. 0 = no limit.
    pub max_sync_errors_per_user: u64,
    /// Client ids (installations) one user may own; a `hello` with a new one beyond it gets
    /// `client_quota_exceeded` (205). 0 = no limit (the default: a shared service account
    /// or a load test may drive thousands); set it where each person has their own user.
    pub max_client_ids_per_user: u64,
    /// Pushes a connection may have in flight before the gateway stops reading its frames.
    pub max_inflight_pushes: usize,
    /// Bytes of push frames a connection may have in flight before the gateway stops reading
    /// its frames. At least `limits.max_frame_bytes`.
    pub max_inflight_push_bytes: usize,
    /// Bytes of push frames the whole node may have in flight (decoded, queued for or in the
    /// group commit); a connection whose push does not fit waits before reading on. At least
    /// `limits.max_frame_bytes`.
    pub node_inflight_push_bytes: usize,
    /// Most bytes of bodies (new and previous) one push batch may write to the log; a batch
    /// that would write more is refused whole (`batch_output_too_large`) and the client splits
    /// it. At least twice `limits.max_document_bytes`, so one mutation always fits.
    pub max_batch_output_bytes: usize,
    /// Most mutations committed in one group-commit transaction.
    pub group_commit_max_mutations: usize,
    /// Grace period for connections to drain on shutdown, in milliseconds: in-flight pushes
    /// are answered, then every client gets `goaway` and a close; whatever is still open when
    /// it ends is dropped.
    pub shutdown_grace_ms: u64,
    /// After SIGTERM, how long `/readyz` answers 503 while the node goes on serving, before
    /// the drain, in milliseconds: long enough for load balancers to stop sending new clients
    /// (Kubernetes: a few seconds). 0 = drain at once.
    pub shutdown_delay_ms: u64,
    /// How long `serve` and `migrate` keep retrying (with backoff) a database that cannot be
    /// reached at startup (still starting, restarting, session ended) before giving up, in
    /// milliseconds; 0 = one attempt. Errors that retrying cannot fix (wrong password,
    /// missing database, bad URL) end the start at once.
    pub database_startup_wait_ms: u64,
    /// How often the background compaction runs, in seconds: it moves each collection's
    /// horizon by its `retain_secs` / `retain_changes` and removes superseded versions and
    /// tombstones behind it, a small batch per transaction. 0 = never (compact with
    /// `syncgate admin compact`).
    pub compaction_interval_secs: u64,
    /// Rows compaction removes per transaction (1–10,000). Each transaction holds the log's
    /// writer (SQLite: group commits wait for it) for its duration: smaller is shorter holds
    /// and slower compaction.
    pub compaction_batch_rows: u64,
    /// Declared collections. A client may only use collections named here.
    pub collections: BTreeMap<String, CollectionConfig>,
}

/// The prefix every claim path of a row scope starts with.
pub const CLAIM_PREFIX: &str = "claims.";

/// Whether a scope's claim path is well formed: `claims.` then dot-separated non-empty names.
pub fn is_valid_claim_path(path: &str) -> bool {
    path.strip_prefix(CLAIM_PREFIX)
        .is_some_and(|rest| !rest.is_empty() && rest.split('.').all(|p| !p.is_empty()))
}

/// When SQLite makes a commit durable (see [`Config::sqlite_synchronous`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SqliteSynchronous {
    /// Every commit is on disk before it is acknowledged or delivered (`synchronous=FULL`).
    #[default]
    Full,
    /// Commits are durable against process crashes; the WAL is synced at checkpoints
    /// (`synchronous=NORMAL`).
    Normal,
}

/// TLS certificate and key files (PEM). Both are read again when either changes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// The certificate chain, leaf first. Empty: TLS is off.
    pub cert_file: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

/// Authentication settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// HS256 secret for client JWTs. Empty: a random secret is generated once into
    /// `<data_dir>/jwt_secret` and reused.
    pub jwt_secret: String,
    /// Required `iss` claim. Empty: `iss` is not checked.
    pub issuer: String,
    /// Required `aud` claim. Empty: a token that names any audience is refused (it was meant
    /// for another service); one without `aud` is accepted.
    pub audience: String,
    /// The token claim that lists the user's roles (a string or a list of strings), for
    /// collections' `read_roles` and `write_roles`.
    pub roles_claim: String,
    /// Clock skew allowed when checking `exp` and `nbf`, in seconds. A session ends when its
    /// token's `exp` plus this leeway has passed.
    pub leeway_secs: u64,
    /// Identity providers whose RS256 / ES256 tokens are accepted, each with its own public
    /// keys (`[[auth.trusted_issuers]]`). A token naming one of these issuers is verified only
    /// with that issuer's keys, selected by the token's `kid`; HS256 tokens (signed with
    /// `jwt_secret`) may not name them.
    pub trusted_issuers: Vec<TrustedIssuer>,
    /// The key of the node's admin endpoint (`GET /admin/clients` with
    /// `Authorization: Bearer <key>`, which `syncgate admin clients list` reads). Empty: the
    /// endpoint answers 404.
    pub admin_key: String,
}

/// One identity provider that signs tokens with public-key algorithms.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrustedIssuer {
    /// The `iss` its tokens carry (required, unique).
    pub issuer: String,
    /// The algorithms it signs with (RS256, ES256); a token with any other `alg` is refused.
    pub algorithms: Vec<KeyAlgorithm>,
    /// A JWKS file (`{"keys": [...]}`) with its public keys; re-read whenever it changes on
    /// disk, so keys rotate without a restart (replace the file atomically: write, rename).
    /// Keys without `kid` are used only by tokens without `kid`.
    pub jwks_file: PathBuf,
    /// Instead of `jwks_file`: one PEM public key (RSA or P-256).
    pub public_key_file: PathBuf,
    /// With `public_key_file`: the `kid` tokens must name (empty: tokens name none).
    pub kid: String,
}

/// A public-key JWT algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyAlgorithm {
    /// RSASSA-PKCS1-v1_5 with SHA-256 (RSA keys).
    RS256,
    /// ECDSA on P-256 with SHA-256 (EC P-256 keys).
    ES256,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            jwt_secret: String::new(),
            issuer: String::new(),
            audience: String::new(),
            roles_claim: "roles".into(),
            leeway_secs: 5,
            trusted_issuers: Vec::new(),
            admin_key: String::new(),
        }
    }
}

/// One declared collection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CollectionConfig {
    /// What wins when a mutation was based on a version another client has changed since:
    /// `lww` (default: the later commit, in server order), `field_merge`, `first_write_wins`,
    /// `manual` or `precedence` (see README, "Conflicts"). Every overwrite or refusal is
    /// recorded in the conflict audit (`syncgate admin conflicts`).
    pub policy: ConflictPolicy,
    /// For `policy = "precedence"`: field -> its values, highest first
    /// (`{ status = ["cancelled", "completed", "in_progress", "open"] }`). On a field both
    /// sides changed, the higher-ranked value wins whatever the arrival order; an unlisted
    /// value ranks below every listed one; fields without a ranking follow `lww`.
    pub precedence: BTreeMap<String, Vec<String>>,
    /// What clients download: `all` (subscriptions and `fetch`), `upload_only` (clients
    /// write, never read: subscribing and fetching get `not_downloadable`, 306) or `never`
    /// (not part of automatic sync: subscribing gets 306, clients `fetch` the ids they need).
    pub mode: SyncMode,
    /// Roles (from the token claim `auth.roles_claim`) that may subscribe; empty = any user.
    pub read_roles: Vec<String>,
    /// Roles that may write; empty = any user.
    pub write_roles: Vec<String>,
    /// Row scope: document field -> token claim path (`claims.NAME`, `claims.sub`, or a dotted
    /// path into a nested claim). A user sees and writes only documents whose every scoped
    /// field equals the claim's value (or one of them, for a list claim). Empty = every
    /// document.
    pub scope: BTreeMap<String, String>,
    /// Field types checked on every write: field -> `string`, `integer`, `number` (integer or
    /// float), `boolean`, `array`, `map`, `binary` or `any`. Fields not named here are not
    /// checked; a nil value counts as absent. A write that gives a named field another type
    /// is rejected with `wrong_type` (411).
    pub schema: BTreeMap<String, FieldType>,
    /// Fields every document must hold (not nil) after each write; a write that would leave
    /// one out is rejected with `missing_field` (410). Deletes are not checked.
    pub required: Vec<String>,
    /// Reference fields: field -> the declared collection whose document id it holds. A write
    /// that sets such a field to an id its target collection does not have (live, or created
    /// earlier in the same batch) is rejected with `dangling_reference` (412); a value that is
    /// not a string id gets `wrong_type`. Deleting a referenced document is not checked.
    pub references: BTreeMap<String, String>,
    /// Keep the log's changes for at least this many seconds (default 30 days); 0 = no age
    /// limit. Older changes fall behind the collection's compaction horizon: superseded
    /// versions and tombstones there are removed (`syncgate admin compact`), and a client whose
    /// cursor is older than the horizon gets `resync` (`cursor_too_old`) and downloads the
    /// collection again, keeping its unsent edits.
    pub retain_secs: u64,
    /// Keep at least the collection's newest this many changes; 0 = no count limit. With
    /// both limits set, a change falls behind the horizon when it is beyond either.
    pub retain_changes: u64,
}

/// Thirty days: how long a collection's changes are kept by default.
pub const DEFAULT_RETAIN_SECS: u64 = 30 * 24 * 3600;

impl Default for CollectionConfig {
    fn default() -> Self {
        CollectionConfig {
            policy: ConflictPolicy::default(),
            precedence: BTreeMap::new(),
            mode: SyncMode::default(),
            read_roles: Vec::new(),
            write_roles: Vec::new(),
            scope: BTreeMap::new(),
            schema: BTreeMap::new(),
            required: Vec::new(),
            references: BTreeMap::new(),
            retain_secs: DEFAULT_RETAIN_SECS,
            retain_changes: 0,
        }
    }
}

/// What clients download from a collection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncMode {
    /// Subscriptions and `fetch`.
    #[default]
    All,
    /// Clients write, never read (for example feedback forms).
    UploadOnly,
    /// No subscriptions; clients `fetch` explicit ids.
    Never,
}

impl SyncMode {
    /// Whether a client may subscribe.
    pub fn subscribable(self) -> bool {
        self == SyncMode::All
    }

    /// Whether a client may `fetch`.
    pub fn fetchable(self) -> bool {
        self != SyncMode::UploadOnly
    }
}

/// The type a collection's `schema` declares for a field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldType {
    /// UTF-8 text.
    String,
    /// A whole number.
    Integer,
    /// A whole number or a float.
    Number,
    /// `true` or `false`.
    Boolean,
    /// A list.
    Array,
    /// A nested document (string keys).
    Map,
    /// Raw bytes.
    Binary,
    /// Anything (for `required` fields of any type, or to document a field).
    Any,
}

/// How concurrent writes to one document are resolved (`crate::conflict` has each rule).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConflictPolicy {
    /// Server-order last-write-wins: the mutation committed last wins.
    #[default]
    Lww,
    /// Fields changed only by one side are kept from that side; a field both changed takes
    /// the later commit's value.
    FieldMerge,
    /// A mutation based on an outdated version is refused (`conflict`, 413) and the writer
    /// gets the server's version and body.
    FirstWriteWins,
    /// A mutation based on an outdated version is refused and an open conflict recorded,
    /// which a later mutation naming its id resolves.
    Manual,
    /// Per-field value rankings (`precedence`) decide; other fields follow `lww`.
    Precedence,
}

impl Default for Config {
    fn default() -> Self {
        let mut collections: BTreeMap<String, CollectionConfig> =
            ["work_orders", "machines", "stock", "feedback"]
                .into_iter()
                .map(|c| (c.to_owned(), CollectionConfig::default()))
                .collect();
        // The sample's work orders name the machine they run on.
        // ... and the central ERP's cancellation outranks a terminal's completion.
        if let Some(w) = collections.get_mut("work_orders") {
            w.references.insert("machine".into(), "machines".into());
            w.policy = ConflictPolicy::Precedence;
            w.precedence.insert(
                "status".into(),
                ["cancelled", "completed", "in_progress", "open"]
                    .map(String::from)
                    .to_vec(),
            );
        }
        // Two operators editing different fields of a machine both keep their edit.
        if let Some(m) = collections.get_mut("machines") {
            m.policy = ConflictPolicy::FieldMerge;
        }
        // A stock count is never overwritten silently: someone decides.
        if let Some(s) = collections.get_mut("stock") {
            s.policy = ConflictPolicy::Manual;
        }
        // Feedback forms go up and never come back down.
        if let Some(f) = collections.get_mut("feedback") {
            f.mode = SyncMode::UploadOnly;
        }
        Config {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, DEFAULT_PORT)),
            http_listen: SocketAddr::from((Ipv4Addr::LOCALHOST, DEFAULT_HTTP_PORT)),
            data_dir: PathBuf::from("./data"),
            database: String::new(),
            database_pool_size: 8,
            sqlite_synchronous: SqliteSynchronous::Full,
            auth: AuthConfig::default(),
            tls: TlsConfig::default(),
            limits: Limits::default(),
            heartbeat_ms: 15_000,
            outbound_buffer_bytes: 1024 * 1024,
            compression: true,
            compression_min_bytes: 1024,
            compression_level: 1,
            catch_up_cache_bytes: 64 * 1024 * 1024,
            max_connections: 19_000,
            max_frames_per_second: 1000,
            max_push_mutations_per_second: 5_000,
            max_push_bytes_per_second: 4 * 1024 * 1024,
            max_subscribes_per_second: 20,
            node_concurrent_reads: 0,
            allowed_origins: Vec::new(),
            handshake_timeout_ms: 10_000,
            max_concurrent_handshakes: 2_048,
            handshake_queue_ms: 2_000,
            slow_consumer_deadline_ms: 60_000,
            close_linger_ms: 30_000,
            max_connections_per_user: 0,
            max_client_ids_per_user: 0,
            max_documents_per_user: 0,
            max_sync_errors_per_user: 0,
            max_inflight_pushes: 16,
            max_inflight_push_bytes: 4 * 1024 * 1024,
            node_inflight_push_bytes: 256 * 1024 * 1024,
            max_batch_output_bytes: 16 * 1024 * 1024,
            group_commit_max_mutations: 5_000,
            shutdown_grace_ms: 5_000,
            shutdown_delay_ms: 0,
            database_startup_wait_ms: 60_000,
            compaction_interval_secs: 600,
            compaction_batch_rows: 25,
            collections,
        }
    }
}

/// Checks a collection's `policy` against its `precedence` rankings.
fn check_precedence(name: &str, c: &CollectionConfig) -> Result<(), ConfigError> {
    let bad = |m: String| Err(ConfigError::Invalid(m));
    if c.policy != ConflictPolicy::Precedence {
        if !c.precedence.is_empty() {
            return bad(format!(
                "collections.{name}.precedence is set but the policy is {:?}: rankings are used \
                 only with policy = \"precedence\"",
                c.policy
            ));
        }
        return Ok(());
    }
    if c.precedence.is_empty() {
        return bad(format!(
            "collections.{name}: policy = \"precedence\" needs at least one ranking, e.g. \
             precedence = {{ status = [\"cancelled\", \"completed\", \"open\"] }}"
        ));
    }
    for (field, ranking) in &c.precedence {
        if field.is_empty() {
            return bad(format!(
                "collections.{name}.precedence: a field name is empty"
            ));
        }
        if ranking.is_empty() {
            return bad(format!(
                "collections.{name}.precedence.{field}: the ranking lists no value"
            ));
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(twice) = ranking.iter().find(|v| !seen.insert(v.as_str())) {
            return bad(format!(
                "collections.{name}.precedence.{field}: {twice:?} is listed twice"
            ));
        }
        if !c.schema.is_empty() {
            match c.schema.get(field) {
                None => {
                    return bad(format!(
                        "collections.{name}.precedence.{field}: not a field of the \
                         collection's schema"
                    ));
                }
                Some(t) if !matches!(t, FieldType::String | FieldType::Any) => {
                    return bad(format!(
                        "collections.{name}.precedence.{field}: rankings hold strings, but the \
                         schema type is {t:?}"
                    ));
                }
                Some(_) => {}
            }
        }
    }
    Ok(())
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("invalid config file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: Box<toml::de::Error>,
    },
    /// A value is out of range or inconsistent.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The `[limits]` table: like [`Limits`], but every key optional (defaulting on its own) and
/// unknown keys refused, as everywhere else in the file.
mod limits_table {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use syncgate_protocol::Limits;

    #[derive(Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Table {
        max_frame_bytes: u32,
        max_mutations_per_batch: u32,
        max_document_bytes: u32,
        max_id_bytes: u32,
        max_subscriptions: u32,
        max_depth: u32,
    }

    impl Default for Table {
        fn default() -> Self {
            Table::from(Limits::default())
        }
    }

    impl From<Limits> for Table {
        fn from(l: Limits) -> Self {
            Table {
                max_frame_bytes: l.max_frame_bytes,
                max_mutations_per_batch: l.max_mutations_per_batch,
                max_document_bytes: l.max_document_bytes,
                max_id_bytes: l.max_id_bytes,
                max_subscriptions: l.max_subscriptions,
                max_depth: l.max_depth,
            }
        }
    }

    pub(super) fn serialize<S: Serializer>(l: &Limits, s: S) -> Result<S::Ok, S::Error> {
        Table::from(*l).serialize(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Limits, D::Error> {
        let t = Table::deserialize(d)?;
        Ok(Limits {
            max_frame_bytes: t.max_frame_bytes,
            max_mutations_per_batch: t.max_mutations_per_batch,
            max_document_bytes: t.max_document_bytes,
            max_id_bytes: t.max_id_bytes,
            max_subscriptions: t.max_subscriptions,
            max_depth: t.max_depth,
        })
    }
}

impl Config {
    /// The configuration as TOML with secrets hidden: `auth.jwt_secret` and the password of
    /// the database URL (for `check-config` and logs).
    pub fn to_redacted_toml(&self) -> Result<String, toml::ser::Error> {
        let mut shown = self.clone();
        if !shown.auth.jwt_secret.is_empty() {
            shown.auth.jwt_secret = "<redacted>".into();
        }
        if !shown.auth.admin_key.is_empty() {
            shown.auth.admin_key = "<redacted>".into();
        }
        shown.database = redact_url(&shown.database);
        toml::to_string_pretty(&shown)
    }

    /// Reads a TOML file; absent fields take their defaults.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_toml(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Config, toml::de::Error> {
        toml::from_str(text)
    }

    /// The database URL, with the SQLite default filled in.
    pub fn database_url(&self) -> String {
        if self.database.is_empty() {
            format!("sqlite://{}/syncgate.db", self.data_dir.display())
        } else {
            self.database.clone()
        }
    }

    /// `node_concurrent_reads`, 0 resolved to half the machine's cores (at least one).
    pub fn concurrent_reads(&self) -> usize {
        match self.node_concurrent_reads {
            0 => std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1)),
            n => n,
        }
    }

    /// Checks ranges and names.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        for name in self.collections.keys() {
            if !is_valid_collection_name(name) {
                return bad(format!(
                    "collection name {name:?} must match [a-z][a-z0-9_]{{0,63}}"
                ));
            }
        }
        for (name, c) in &self.collections {
            for (field, claim) in &c.scope {
                if field.is_empty() {
                    return bad(format!("collections.{name}.scope: a field name is empty"));
                }
                if !is_valid_claim_path(claim) {
                    return bad(format!(
                        "collections.{name}.scope.{field} = {claim:?}: a claim path must be \
                         \"claims.NAME\" (dots walk nested claims; \"claims.sub\" is the user)"
                    ));
                }
            }
            let mut named = c
                .schema
                .keys()
                .chain(&c.required)
                .chain(c.references.keys());
            if named.any(String::is_empty) {
                return bad(format!(
                    "collections.{name}: a field name in schema, required or references is empty"
                ));
            }
            check_precedence(name, c)?;
            for (field, target) in &c.references {
                if !self.collections.contains_key(target) {
                    return bad(format!(
                        "collections.{name}.references.{field} = {target:?}: not a declared \
                         collection"
                    ));
                }
                if let Some(t) = c.schema.get(field)
                    && !matches!(t, FieldType::String | FieldType::Any)
                {
                    return bad(format!(
                        "collections.{name}: {field} is a reference (a document id, a string) \
                         but its schema type is {t:?}"
                    ));
                }
            }
        }
        if !(1..=10_000).contains(&self.compaction_batch_rows) {
            return bad(format!(
                "compaction_batch_rows = {}: must be between 1 and 10000",
                self.compaction_batch_rows
            ));
        }
        if self.tls.cert_file.as_os_str().is_empty() != self.tls.key_file.as_os_str().is_empty() {
            return bad("tls.cert_file and tls.key_file go together: set both or neither".into());
        }
        let mut issuers = std::collections::HashSet::new();
        for t in &self.auth.trusted_issuers {
            let name = &t.issuer;
            if name.is_empty() {
                return bad("auth.trusted_issuers: every entry needs an issuer".into());
            }
            if !issuers.insert(name) {
                return bad(format!(
                    "auth.trusted_issuers: issuer {name:?} is listed twice"
                ));
            }
            if *name == self.auth.issuer {
                return bad(format!(
                    "auth.trusted_issuers: {name:?} is also auth.issuer (the issuer of HS256 \
                     tokens); a token's issuer selects exactly one kind of key"
                ));
            }
            if t.algorithms.is_empty() {
                return bad(format!(
                    "auth.trusted_issuers {name:?}: algorithms must name RS256 and/or ES256"
                ));
            }
            let jwks = !t.jwks_file.as_os_str().is_empty();
            let pem = !t.public_key_file.as_os_str().is_empty();
            if jwks == pem {
                return bad(format!(
                    "auth.trusted_issuers {name:?}: set exactly one of jwks_file and \
                     public_key_file"
                ));
            }
            if jwks && !t.kid.is_empty() {
                return bad(format!(
                    "auth.trusted_issuers {name:?}: kid belongs to public_key_file; a JWKS \
                     names its keys' kids itself"
                ));
            }
        }
        let l = &self.limits;
        if l.max_frame_bytes < 1024 {
            return bad("limits.max_frame_bytes must be at least 1024".into());
        }
        if l.max_document_bytes == 0 || l.max_document_bytes >= l.max_frame_bytes {
            return bad("limits.max_document_bytes must be in 1..max_frame_bytes".into());
        }
        if l.max_mutations_per_batch == 0 || l.max_id_bytes == 0 || l.max_subscriptions == 0 {
            return bad("limits must be positive".into());
        }
        if !(4..=128).contains(&l.max_depth) {
            return bad("limits.max_depth must be in 4..=128".into());
        }
        if self.outbound_buffer_bytes < l.max_frame_bytes as usize {
            return bad("outbound_buffer_bytes must be at least limits.max_frame_bytes".into());
        }
        if self.close_linger_ms < 1000 {
            return bad("close_linger_ms must be at least 1000".into());
        }
        if !(1..=9).contains(&self.compression_level) {
            return bad("compression_level must be in 1..=9".into());
        }
        if self.handshake_timeout_ms < 100 {
            return bad("handshake_timeout_ms must be at least 100".into());
        }
        if self.handshake_queue_ms > 60_000 {
            return bad("handshake_queue_ms must be at most 60000".into());
        }
        if self.heartbeat_ms < 100 {
            return bad("heartbeat_ms must be at least 100".into());
        }
        if self.max_connections == 0 || self.max_inflight_pushes == 0 {
            return bad("max_connections and max_inflight_pushes must be positive".into());
        }
        let frame = l.max_frame_bytes as usize;
        if self.max_inflight_push_bytes < frame || self.node_inflight_push_bytes < frame {
            return bad(
                "max_inflight_push_bytes and node_inflight_push_bytes must be at least \
                 limits.max_frame_bytes"
                    .into(),
            );
        }
        if self.max_batch_output_bytes < 2 * l.max_document_bytes as usize {
            return bad(
                "max_batch_output_bytes must be at least 2 × limits.max_document_bytes".into(),
            );
        }
        if u32::try_from(frame).is_err() || self.node_inflight_push_bytes > 1 << 40 {
            return bad("node_inflight_push_bytes must be at most 1 TiB".into());
        }
        if self.group_commit_max_mutations < l.max_mutations_per_batch as usize {
            return bad(
                "group_commit_max_mutations must be at least limits.max_mutations_per_batch".into(),
            );
        }
        let url = self.database_url();
        if !(url.starts_with("sqlite:")
            || url.starts_with("postgres:")
            || url.starts_with("postgresql:"))
        {
            return bad(format!(
                "database must be sqlite://... or postgres://..., got {url:?}"
            ));
        }
        Ok(())
    }
}

/// Hides the password of a database URL (`postgres://user:***@host/db`).
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &creds[..c], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_table_defaults_key_by_key() {
        let c = Config::from_toml(
            "heartbeat_ms = 5000\n[limits]\nmax_depth = 16\n[auth]\njwt_secret = \"s\"\n\
             [collections.orders]\n",
        )
        .expect("partial tables parse");
        assert_eq!(c.limits.max_depth, 16);
        assert_eq!(
            c.limits.max_mutations_per_batch,
            Limits::default().max_mutations_per_batch
        );
        assert_eq!(c.heartbeat_ms, 5000);
        assert_eq!(c.auth.jwt_secret, "s");
        assert_eq!(c.collections["orders"], CollectionConfig::default());
        assert!(
            Config::from_toml("[limits]\nmax_dept = 3\n").is_err(),
            "typos are caught"
        );
    }

    #[test]
    fn redacted_toml_hides_secrets() {
        let c = Config {
            database: "postgres://app:hunter2@db:5432/erp".into(),
            auth: AuthConfig {
                jwt_secret: "top-secret-value".into(),
                ..AuthConfig::default()
            },
            ..Config::default()
        };
        let text = c.to_redacted_toml().unwrap();
        assert!(
            !text.contains("hunter2") && !text.contains("top-secret-value"),
            "{text}"
        );
        assert!(text.contains("postgres://app:***@db:5432/erp"), "{text}");
        assert_eq!(redact_url("sqlite://./data/x.db"), "sqlite://./data/x.db");
    }

    #[test]
    fn sample_config_in_deploy_matches_defaults() {
        let text = include_str!("../../deploy/syncgate.toml");
        let parsed = Config::from_toml(text).expect("deploy/syncgate.toml parses");
        assert_eq!(
            parsed,
            Config::default(),
            "deploy/syncgate.toml drifted from the defaults"
        );
    }

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn unknown_fields_are_errors() {
        assert!(Config::from_toml("lisen = \"127.0.0.1:1\"").is_err());
    }

    #[test]
    fn invalid_values_are_reported() {
        let mut c = Config::default();
        c.collections
            .insert("Bad-Name".into(), CollectionConfig::default());
        assert!(c.validate().is_err());
        let c = Config {
            database: "mysql://x".into(),
            ..Config::default()
        };
        assert!(c.validate().is_err());
    }

    /// Asserts that `toml` is refused (by parsing or validation) with a message saying `says`.
    fn invalid(toml: &str, says: &str) {
        let err = match Config::from_toml(toml) {
            Err(e) => e.to_string(),
            Ok(c) => c.validate().expect_err(toml).to_string(),
        };
        assert!(err.contains(says), "{toml}: {err}");
    }

    #[test]
    fn the_handshake_queue_waits_at_most_a_minute() {
        invalid(
            "handshake_queue_ms = 60001",
            "handshake_queue_ms must be at most 60000",
        );
        for ok in ["handshake_queue_ms = 0", "handshake_queue_ms = 60000"] {
            Config::from_toml(ok).unwrap().validate().unwrap();
        }
    }

    #[test]
    fn compaction_batches_hold_at_least_one_row_and_at_most_ten_thousand() {
        for rows in ["0", "10001"] {
            invalid(
                &format!("compaction_batch_rows = {rows}"),
                &format!("compaction_batch_rows = {rows}: must be between 1 and 10000"),
            );
        }
        let c = Config::from_toml("compaction_batch_rows = 1").unwrap();
        assert!(c.validate().is_ok());
    }

    #[test]
    fn schema_required_and_references_are_checked_with_a_clear_message() {
        invalid(
            "[collections.orders]\nreferences = { machine = \"machinez\" }",
            "collections.orders.references.machine = \"machinez\": not a declared collection",
        );
        invalid(
            "[collections.orders]\nschema = { qty = \"int\" }",
            "unknown variant `int`",
        );
        invalid(
            "[collections.orders]\nrequired = [\"\"]",
            "a field name in schema, required or references is empty",
        );
        invalid(
            "[collections.machines]\n[collections.orders]\nreferences = { machine = \"machines\" }\n\
             schema = { machine = \"integer\" }",
            "machine is a reference (a document id, a string) but its schema type is Integer",
        );
        let ok = Config::from_toml(
            "[collections.machines]\n[collections.orders]\nreferences = { machine = \"machines\" }\n\
             schema = { machine = \"string\", qty = \"integer\", weight = \"number\" }\n\
             required = [\"plant\"]",
        )
        .unwrap();
        ok.validate().unwrap();
        let orders = &ok.collections["orders"];
        assert_eq!(orders.schema["qty"], FieldType::Integer);
        assert_eq!(orders.required, ["plant"]);
    }

    #[test]
    fn policies_and_rankings_are_checked_with_a_clear_message() {
        invalid(
            "[collections.orders]\npolicy = \"newest\"",
            "unknown variant `newest`",
        );
        invalid(
            "[collections.orders]\npolicy = \"precedence\"",
            "policy = \"precedence\" needs at least one ranking",
        );
        invalid(
            "[collections.orders]\nprecedence = { status = [\"a\"] }",
            "collections.orders.precedence is set but the policy is Lww",
        );
        invalid(
            "[collections.orders]\npolicy = \"precedence\"\nprecedence = { status = [] }",
            "collections.orders.precedence.status: the ranking lists no value",
        );
        invalid(
            "[collections.orders]\npolicy = \"precedence\"\nprecedence = { status = [\"a\", \"a\"] }",
            "\"a\" is listed twice",
        );
        invalid(
            "[collections.orders]\npolicy = \"precedence\"\nprecedence = { status = [\"a\"] }\n\
             schema = { qty = \"integer\" }",
            "collections.orders.precedence.status: not a field of the collection's schema",
        );
        invalid(
            "[collections.orders]\npolicy = \"precedence\"\nprecedence = { qty = [\"1\"] }\n\
             schema = { qty = \"integer\" }",
            "rankings hold strings, but the schema type is Integer",
        );
        for policy in ["lww", "field_merge", "first_write_wins", "manual"] {
            let c =
                Config::from_toml(&format!("[collections.orders]\npolicy = \"{policy}\"")).unwrap();
            c.validate().unwrap();
        }
        let d = Config::default();
        assert_eq!(
            d.collections["work_orders"].policy,
            ConflictPolicy::Precedence
        );
        assert_eq!(d.collections["machines"].policy, ConflictPolicy::FieldMerge);
        assert_eq!(d.collections["stock"].policy, ConflictPolicy::Manual);
        d.validate().unwrap();
    }
}
