//! The client's local store: one SQLite file (through sea-orm) in the client's data directory.
//!
//! # Layout
//! - `model`: the replica's rules without I/O (rebase, which server state wins, what an ack
//!   does to an outbox entry, subscription changes, batch cutting), table-driven tests.
//! - persistence, one SQLite transaction per operation that reads rows, asks the model and
//!   writes what it decided: this module (schema, directory lock, metadata), `outbox`
//!   (local writes, upload, acks, rejections, `welcome`) and `replica` (reads,
//!   subscriptions, snapshots, changes, cursors, rebase).
//!
//! It holds, durably:
//! - the **client id**, created once with the store and never changed (exactly-once ingest on
//!   the gateway is keyed by it) and the next mutation id;
//! - the **replica**: per document, the server's version and body (`server_*`) and the
//!   optimistic body the application sees (`local_body`) = the server's body with every
//!   not-yet-visible outbox mutation of that document applied on top, in mutation-id order;
//! - the **outbox**: every local mutation until the server's answer is known. An entry is
//!   `pending` until its ack arrives, then `acked` (with the version it wrote) until the
//!   replica has caught up with that version, then it is deleted. A rejected mutation moves to
//!   the `rejected` table with the server's code and reason;
//! - each **subscription**'s filter and cursor.
//!
//! Every method is one local transaction, so a crash at any point leaves a state from which the
//! background task simply carries on (re-sending a pending mutation is safe: the gateway
//! applies each `(client_id, mutation_id)` at most once and answers a replay with the stored
//! outcome). The data directory is locked (an OS file lock) while a store is open, so two
//! processes can never share an outbox.

mod model;
mod outbox;
mod replica;
mod seal;

pub use seal::EncryptionKey;
use seal::{Kind, Sealer};

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, DbErr, QueryResult,
    Statement, Value as DbValue,
};
use syncgate_protocol::codec::{from_msgpack, to_msgpack};
use syncgate_protocol::{Body, Cursor, Mutation};

/// Local store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("local database: {0}")]
    Db(#[from] DbErr),
    /// The data directory could not be created or locked.
    #[error("data directory {path}: {message}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A stored value could not be decoded (the file was damaged or written by a newer version).
    #[error("corrupt local value: {0}")]
    Corrupt(String),
    /// The store is encrypted with another key (or a stored value was tampered with).
    #[error("the local store is encrypted with another key (or was tampered with)")]
    WrongKey,
    /// The store is encrypted and no key was given.
    #[error("the local store is encrypted: give its key (encryption_key / --key-file)")]
    KeyRequired,
    /// A key was given for a store that holds unencrypted data; it is not mixed.
    #[error(
        "the local store was created without encryption and holds data; refusing to mix \
         encrypted values into it (sync, then start a new data directory with the key)"
    )]
    NotEncrypted,
}

/// A document as the application sees it: the optimistic state.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalDoc {
    /// The collection.
    pub collection: String,
    /// The document id.
    pub id: String,
    /// The optimistic body (the server's body with pending local edits applied).
    pub body: Body,
    /// The server version this state is based on (0 = the server's version is not known yet).
    pub version: u64,
    /// True while local edits of this document wait for the server's answer.
    pub pending: bool,
}

/// A subscription as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredSubscription {
    /// The collection.
    pub collection: String,
    /// The equality filter.
    pub filter: Body,
    /// Where to resume; `None` asks for a snapshot.
    pub cursor: Option<Cursor>,
}

/// State of an outbox entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboxState {
    /// Not yet acknowledged by the server.
    Pending,
    /// Applied by the server at `version`; kept until the replica has caught up with it.
    Acked {
        /// The version the mutation wrote.
        version: u64,
    },
}

/// One outbox entry.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxEntry {
    /// The mutation as it is sent.
    pub mutation: Mutation,
    /// Pending or acknowledged.
    pub state: OutboxState,
    /// When it was written locally (milliseconds since the Unix epoch).
    pub created_ms: u64,
}

/// A mutation the server refused, kept locally with its reason.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    /// The whole mutation.
    pub mutation: Mutation,
    /// The stable error code.
    pub code: u16,
    /// The server's reason.
    pub reason: String,
}

/// A server change that was applied to the replica.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    /// The collection.
    pub collection: String,
    /// The document.
    pub id: String,
    /// The server version now held.
    pub version: u64,
    /// The server body (`None` = deleted or left the filter).
    pub body: Option<Body>,
    /// Local mutations of this document still waiting for an ack when the change arrived:
    /// a concurrent edit (the server orders writes; the local edits are re-applied on top).
    pub concurrent_pending: u64,
}

/// What applying a push acknowledgement did.
#[derive(Debug, Default)]
pub struct AckOutcome {
    /// `(mutation_id, version)` of applied mutations.
    pub applied: Vec<(u64, u64)>,
    /// Rejected mutations, now in the `rejected` table.
    pub rejected: Vec<Rejection>,
    /// `manual` conflicts the server opened, now in the `conflicts` table.
    pub conflicts: Vec<LocalConflict>,
}

/// A `manual` conflict: the server kept its version of a document and refused a local
/// mutation; it waits until the application resolves it ([`LocalStore::resolve`]).
#[derive(Debug, Clone, PartialEq)]
pub struct LocalConflict {
    /// The conflict's id (what the resolving mutation names).
    pub id: String,
    /// The refused local mutation (the writer's intent).
    pub mine: Mutation,
    /// The server's version when it refused it.
    pub server_version: u64,
    /// The server's body then (`None`: deleted).
    pub server_body: Option<Body>,
}

impl LocalConflict {
    /// The document the refused mutation would have left on top of the server's version
    /// (`None`: a delete). A patch of a document the server deleted becomes its fields.
    pub fn mine_body(&self) -> Option<Body> {
        let m = &self.mine;
        syncgate_protocol::apply::apply(self.server_body.as_ref(), m.op, m.body.as_ref())
            .unwrap_or_else(|_| m.body.clone())
    }
}

/// How a `manual` conflict is resolved.
#[derive(Debug, Clone, PartialEq)]
pub enum Take {
    /// The server's version (written again, so that the conflict closes).
    Server,
    /// The refused local mutation, applied on top of the server's version.
    Mine,
    /// This document (a merge made by the application or the user).
    Body(Body),
}

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS sgc_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS sgc_subscriptions (
        collection TEXT PRIMARY KEY,
        filter BLOB NOT NULL,
        cursor_epoch TEXT,
        cursor_seq INTEGER
    )",
    "CREATE TABLE IF NOT EXISTS sgc_docs (
        collection TEXT NOT NULL,
        doc_id TEXT NOT NULL,
        server_body BLOB,
        server_version INTEGER NOT NULL DEFAULT 0,
        stale INTEGER NOT NULL DEFAULT 0,
        local_body BLOB,
        PRIMARY KEY (collection, doc_id)
    )",
    "CREATE TABLE IF NOT EXISTS sgc_outbox (
        mutation_id INTEGER PRIMARY KEY,
        collection TEXT NOT NULL,
        doc_id TEXT NOT NULL,
        mutation BLOB NOT NULL,
        acked_version INTEGER,
        created_ms INTEGER NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS sgc_outbox_doc ON sgc_outbox (collection, doc_id, mutation_id)",
    "CREATE TABLE IF NOT EXISTS sgc_conflicts (
        conflict_id TEXT PRIMARY KEY,
        mutation_id INTEGER NOT NULL,
        mutation BLOB NOT NULL,
        server_version INTEGER NOT NULL,
        server_body BLOB,
        received_ms INTEGER NOT NULL
    )",
    "CREATE TABLE IF NOT EXISTS sgc_rejected (
        mutation_id INTEGER PRIMARY KEY,
        mutation BLOB NOT NULL,
        code INTEGER NOT NULL,
        reason TEXT NOT NULL,
        rejected_ms INTEGER NOT NULL
    )",
];

/// The local store. Cheap to clone; the directory lock is held until the last clone is dropped.
#[derive(Clone)]
pub struct LocalStore {
    db: DatabaseConnection,
    client_id: std::sync::Arc<str>,
    dir: std::sync::Arc<DirLock>,
    sealer: std::sync::Arc<Sealer>,
}

/// The exclusive lock on the data directory.
struct DirLock {
    path: PathBuf,
    _file: File,
}

fn st(sql: &str, values: impl IntoIterator<Item = DbValue>) -> Statement {
    Statement::from_sql_and_values(DbBackend::Sqlite, sql, values)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

/// A stored body (sealed when the store is encrypted).
fn decode_body(s: &Sealer, bytes: Option<Vec<u8>>) -> Result<Option<Body>, StoreError> {
    bytes.map(|b| unseal::<Body>(s, Kind::Body, &b)).transpose()
}

/// The stored form of a body.
fn encode_body(s: &Sealer, body: Option<&Body>) -> DbValue {
    DbValue::Bytes(body.map(|b| s.seal(Kind::Body, to_msgpack(b))))
}

/// The stored form of a value of `kind`.
fn sealed<T: serde::Serialize>(s: &Sealer, kind: Kind, value: &T) -> Vec<u8> {
    s.seal(kind, to_msgpack(value))
}

/// A stored value of `kind`.
fn unseal<T: serde::de::DeserializeOwned>(
    s: &Sealer,
    kind: Kind,
    stored: &[u8],
) -> Result<T, StoreError> {
    from_msgpack::<T>(&s.open(kind, stored)?).map_err(corrupt)
}

fn get_u64(r: &QueryResult, col: &str) -> Result<u64, StoreError> {
    Ok(r.try_get::<i64>("", col)? as u64)
}

impl LocalStore {
    /// Opens (creating if needed) the store in `dir` and locks the directory.
    pub async fn open(dir: &Path) -> Result<LocalStore, StoreError> {
        LocalStore::open_with(dir, None).await
    }

    /// Opens the store in `dir`, encrypted with `key` (see [`EncryptionKey`]): a new store is
    /// created encrypted; an encrypted one must be given its key ([`StoreError::KeyRequired`],
    /// [`StoreError::WrongKey`]); a plain one that holds data is not opened with a key
    /// ([`StoreError::NotEncrypted`]).
    pub async fn open_with(
        dir: &Path,
        key: Option<&EncryptionKey>,
    ) -> Result<LocalStore, StoreError> {
        let dir_err = |message: String| StoreError::DataDir {
            path: dir.to_owned(),
            message,
        };
        std::fs::create_dir_all(dir).map_err(|e| dir_err(format!("cannot create: {e}")))?;
        let lock_path = dir.join("lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| dir_err(format!("cannot open the lock file: {e}")))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(dir_err(
                    "in use by another syncgate client (one process per data directory)".into(),
                ));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(dir_err(format!("cannot lock: {e}")));
            }
        }
        let db_path = dir.join("replica.sqlite");
        let mut opts = ConnectOptions::new(format!("sqlite://{}", db_path.display()));
        // One connection: the store's transactions are short and serialised, and SQLite never
        // answers "busy" inside the process.
        opts.max_connections(1)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(60))
            .sqlx_logging(false);
        opts.map_sqlx_sqlite_opts(|o| {
            o.create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                // The outbox is the user's unsent work: a write returns only once it is on disk.
                .synchronous(SqliteSynchronous::Full)
                .busy_timeout(Duration::from_secs(10))
        });
        let db = Database::connect(opts).await?;
        for sql in SCHEMA {
            db.execute_unprepared(sql).await?;
        }
        let fresh_id = format!("c-{:032x}", rand::random::<u128>());
        db.execute_raw(st(
            "INSERT OR IGNORE INTO sgc_meta (key, value) VALUES ('client_id', ?), ('next_mutation', '1')",
            [fresh_id.into()],
        ))
        .await?;
        let client_id = meta(&db, "client_id")
            .await?
            .ok_or_else(|| corrupt("no client id"))?;
        let sealer = Sealer::new(key);
        if let Err(e) = check_encryption(&db, &sealer).await {
            let _ = db.close().await;
            return Err(e);
        }
        Ok(LocalStore {
            db,
            client_id: client_id.into(),
            dir: std::sync::Arc::new(DirLock {
                path: dir.to_owned(),
                _file: file,
            }),
            sealer: std::sync::Arc::new(sealer),
        })
    }

    /// Whether values are encrypted at rest.
    pub fn is_encrypted(&self) -> bool {
        self.sealer.encrypts()
    }

    /// The client id, created with the store.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir.path
    }

    /// Closes the database (the lock is released when the last clone is dropped).
    pub async fn close(self) {
        let _ = self.db.close().await;
    }

    /// A value from the metadata table.
    pub async fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        meta(&self.db, key).await
    }

    /// Writes a metadata value.
    pub async fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        set_meta(&self.db, key, value).await
    }
}

/// Records a new store's encryption, or checks that the key fits the store: the encrypted
/// mark and a sealed check value (hex) live in `sgc_meta`.
async fn check_encryption(db: &DatabaseConnection, sealer: &Sealer) -> Result<(), StoreError> {
    let check = meta(db, "key_check").await?;
    match (meta(db, "encryption").await?.as_deref(), sealer.encrypts()) {
        (Some("aes-256-gcm"), false) => Err(StoreError::KeyRequired),
        (Some("aes-256-gcm"), true) => {
            let stored = check
                .and_then(|h| hex::decode(h).ok())
                .ok_or_else(|| corrupt("encrypted store without its key check"))?;
            if sealer.verify_check(&stored) {
                Ok(())
            } else {
                Err(StoreError::WrongKey)
            }
        }
        (Some("none"), true) => Err(StoreError::NotEncrypted),
        (Some("none"), false) => Ok(()),
        (Some(other), _) => Err(corrupt(format!("unknown store encryption {other:?}"))),
        // A store from before encryption existed, or a new one: a new one (no data yet) takes
        // the key; an old one with data stays plain.
        (None, encrypt) => {
            let mut has_data = false;
            for table in [
                "sgc_docs",
                "sgc_outbox",
                "sgc_rejected",
                "sgc_subscriptions",
            ] {
                has_data |= db
                    .query_one_raw(st(&format!("SELECT 1 AS x FROM {table} LIMIT 1"), []))
                    .await?
                    .is_some();
            }
            if encrypt && has_data {
                return Err(StoreError::NotEncrypted);
            }
            if encrypt {
                set_meta(db, "key_check", &hex::encode(sealer.check_value())).await?;
            }
            set_meta(
                db,
                "encryption",
                if encrypt { "aes-256-gcm" } else { "none" },
            )
            .await
        }
    }
}

async fn meta(db: &impl ConnectionTrait, key: &str) -> Result<Option<String>, StoreError> {
    Ok(db
        .query_one_raw(st("SELECT value FROM sgc_meta WHERE key = ?", [key.into()]))
        .await?
        .map(|r| r.try_get::<String>("", "value"))
        .transpose()?)
}

async fn set_meta(db: &impl ConnectionTrait, key: &str, value: &str) -> Result<(), StoreError> {
    db.execute_raw(st(
        "INSERT INTO sgc_meta (key, value) VALUES (?, ?) \
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        [key.into(), value.into()],
    ))
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use syncgate_protocol::Value;
    use syncgate_protocol::{Change, ChangeOp, Doc, ErrorCode, Filter, MutationOp, MutationResult};

    fn body(n: i64) -> Body {
        [("n".to_owned(), Value::from(n))].into_iter().collect()
    }

    fn cursor(seq: u64) -> Cursor {
        Cursor {
            epoch: "e1".into(),
            seq,
        }
    }

    fn change(seq: u64, id: &str, b: Option<Body>) -> Change {
        Change {
            seq,
            collection: "c".into(),
            id: id.into(),
            op: if b.is_some() {
                ChangeOp::Upsert
            } else {
                ChangeOp::Delete
            },
            body: b,
        }
    }

    async fn store() -> (tempfile::TempDir, LocalStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path()).await.unwrap();
        s.set_subscriptions(&[("c".into(), Body::new())])
            .await
            .unwrap();
        (dir, s)
    }

    #[tokio::test]
    async fn a_horizon_at_the_top_of_the_id_range_gives_an_error_not_a_wrapped_id() {
        let (_dir, s) = store().await;
        assert!(s.on_welcome("e", u64::MAX - 2).await.unwrap());
        let id = s
            .write("c", "a", MutationOp::Put, Some(body(1)))
            .await
            .unwrap();
        assert_eq!(id, u64::MAX - 1);
        match s.write("c", "b", MutationOp::Put, Some(body(2))).await {
            Err(StoreError::Corrupt(m)) => assert!(m.contains("exhausted"), "{m}"),
            other => panic!("expected an error, got {other:?}"),
        }
        // Nothing was written by the refused edit.
        assert_eq!(s.outbox().await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn client_id_is_kept_and_the_directory_is_locked() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path()).await.unwrap();
        let id = s.client_id().to_owned();
        let err = LocalStore::open(dir.path()).await.err().unwrap();
        assert!(err.to_string().contains("in use"), "{err}");
        s.close().await;
        let s = LocalStore::open(dir.path()).await.unwrap();
        assert_eq!(s.client_id(), id);
    }

    #[tokio::test]
    async fn optimistic_edit_survives_until_the_server_version_arrives() {
        let (_d, s) = store().await;
        let m1 = s
            .write("c", "a", MutationOp::Put, Some(body(1)))
            .await
            .unwrap();
        let doc = s.get("c", "a").await.unwrap().unwrap();
        assert_eq!(
            (doc.body.clone(), doc.pending, doc.version),
            (body(1), true, 0)
        );
        // Ack: applied at version 7; the change has not arrived yet.
        s.on_ack(&[MutationResult::applied(m1, 7)]).await.unwrap();
        let doc = s.get("c", "a").await.unwrap().unwrap();
        assert_eq!((doc.body.clone(), doc.pending), (body(1), false));
        assert_eq!(s.outbox().await.unwrap().len(), 1);
        // Someone else's older change arrives first: the local edit stays on top.
        s.apply_changes("c", &[change(5, "a", Some(body(0)))], &cursor(5))
            .await
            .unwrap();
        assert_eq!(s.get("c", "a").await.unwrap().unwrap().body, body(1));
        // The ack's own change arrives: the entry is gone and the state is the server's.
        s.apply_changes("c", &[change(7, "a", Some(body(1)))], &cursor(7))
            .await
            .unwrap();
        assert!(s.outbox().await.unwrap().is_empty());
        let doc = s.get("c", "a").await.unwrap().unwrap();
        assert_eq!((doc.body, doc.version), (body(1), 7));
    }

    #[tokio::test]
    async fn concurrent_remote_change_is_rebased_under_pending_patch() {
        let (_d, s) = store().await;
        let mut both = body(1);
        both.insert("m".into(), Value::from("x"));
        s.apply_snapshot(
            "c",
            &[Doc {
                id: "a".into(),
                body: both,
                version: 3,
            }],
        )
        .await
        .unwrap();
        let patch: Body = [("m".to_owned(), Value::from("local"))]
            .into_iter()
            .collect();
        s.write("c", "a", MutationOp::Patch, Some(patch))
            .await
            .unwrap();
        let out = s
            .apply_changes("c", &[change(4, "a", Some(body(2)))], &cursor(4))
            .await
            .unwrap();
        assert_eq!(out[0].concurrent_pending, 1);
        let doc = s.get("c", "a").await.unwrap().unwrap();
        assert_eq!(doc.body["n"], Value::from(2));
        assert_eq!(doc.body["m"], Value::from("local"));
        assert_eq!(doc.version, 4);
    }

    #[tokio::test]
    async fn rejection_removes_the_optimistic_edit_and_keeps_the_mutation() {
        let (_d, s) = store().await;
        let m = s
            .write("c", "a", MutationOp::Put, Some(body(1)))
            .await
            .unwrap();
        let out = s
            .on_ack(&[MutationResult::rejected(
                m,
                ErrorCode::InvalidMutation,
                "no",
            )])
            .await
            .unwrap();
        assert_eq!(out.rejected.len(), 1);
        assert!(s.get("c", "a").await.unwrap().is_none());
        assert!(s.outbox().await.unwrap().is_empty());
        let r = s.rejected().await.unwrap();
        assert_eq!((r[0].mutation.mutation_id, r[0].reason.as_str()), (m, "no"));
    }

    #[tokio::test]
    async fn snapshot_replaces_stale_rows_but_keeps_local_edits() {
        let (_d, s) = store().await;
        s.apply_changes(
            "c",
            &[
                change(1, "gone", Some(body(1))),
                change(2, "kept", Some(body(2))),
            ],
            &cursor(2),
        )
        .await
        .unwrap();
        s.write("c", "mine", MutationOp::Put, Some(body(9)))
            .await
            .unwrap();
        s.begin_snapshot("c", true).await.unwrap();
        assert_eq!(s.subscriptions().await.unwrap()[0].cursor, None);
        // Readers still see the old data until the snapshot completes.
        assert!(s.get("c", "gone").await.unwrap().is_some());
        s.apply_snapshot(
            "c",
            &[Doc {
                id: "kept".into(),
                body: body(3),
                version: 1,
            }],
        )
        .await
        .unwrap();
        s.synced("c", &cursor(1)).await.unwrap();
        assert!(s.get("c", "gone").await.unwrap().is_none());
        assert_eq!(s.get("c", "kept").await.unwrap().unwrap().body, body(3));
        assert_eq!(s.get("c", "mine").await.unwrap().unwrap().body, body(9));
        assert_eq!(s.subscriptions().await.unwrap()[0].cursor, Some(cursor(1)));
    }

    #[tokio::test]
    async fn query_filters_the_optimistic_state_and_mutation_ids_are_dense() {
        let (_d, s) = store().await;
        for i in 0..5 {
            let id = s
                .write("c", &format!("d{i}"), MutationOp::Put, Some(body(i % 2)))
                .await
                .unwrap();
            assert_eq!(id, i as u64 + 1);
        }
        s.write("c", "d0", MutationOp::Delete, None).await.unwrap();
        let f = |n| Filter::new(&body(n)).unwrap();
        let odd = s.query("c", &f(1)).await.unwrap();
        assert_eq!(
            odd.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(),
            ["d1", "d3"]
        );
        assert_eq!(s.query("c", &f(0)).await.unwrap().len(), 2);
        // d0 is deleted: four live documents.
        assert_eq!(s.count("c").await.unwrap(), 4);
        assert_eq!(s.count("other").await.unwrap(), 0);
        assert_eq!(s.pending_count().await.unwrap(), 6);
        let batch = s.pending_after(2, 10, 1 << 20).await.unwrap();
        assert_eq!(batch.first().unwrap().mutation_id, 3);
        assert_eq!(batch.len(), 4);
        // A restored backup: the server has applied more than this store handed out.
        assert!(s.on_welcome("e1", 50).await.unwrap());
        let next = s
            .write("c", "x", MutationOp::Put, Some(body(0)))
            .await
            .unwrap();
        assert_eq!(next, 51);
    }
}
