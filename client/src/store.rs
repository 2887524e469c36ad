//! The client's local store: one SQLite file (through sea-orm) in the client's data directory.
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

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DatabaseTransaction, DbBackend,
    DbErr, QueryResult, Statement, TransactionTrait, Value as DbValue,
};
use syncgate_protocol::apply::apply;
use syncgate_protocol::codec::{from_msgpack, to_msgpack};
use syncgate_protocol::{
    Body, Change, ChangeOp, Cursor, Doc, ErrorCode, Filter, Mutation, MutationOp, MutationResult,
    MutationStatus,
};

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

fn decode_body(bytes: Option<Vec<u8>>) -> Result<Option<Body>, StoreError> {
    bytes
        .map(|b| from_msgpack::<Body>(&b).map_err(corrupt))
        .transpose()
}

fn encode_body(body: Option<&Body>) -> DbValue {
    DbValue::Bytes(body.map(to_msgpack))
}

fn get_u64(r: &QueryResult, col: &str) -> Result<u64, StoreError> {
    Ok(r.try_get::<i64>("", col)? as u64)
}

impl LocalStore {
    /// Opens (creating if needed) the store in `dir` and locks the directory.
    pub async fn open(dir: &Path) -> Result<LocalStore, StoreError> {
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
        Ok(LocalStore {
            db,
            client_id: client_id.into(),
            dir: std::sync::Arc::new(DirLock {
                path: dir.to_owned(),
                _file: file,
            }),
        })
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

    // ----- local writes and reads -------------------------------------------------------------

    /// Applies a local mutation to the replica and appends it to the outbox, in one transaction.
    /// Returns its mutation id. The caller has validated collection, id and shape.
    pub async fn write(
        &self,
        collection: &str,
        id: &str,
        op: MutationOp,
        body: Option<Body>,
    ) -> Result<u64, StoreError> {
        let txn = self.db.begin().await?;
        let next: u64 = meta(&txn, "next_mutation")
            .await?
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| corrupt("next_mutation"))?;
        set_meta(&txn, "next_mutation", &(next + 1).to_string()).await?;
        let base_version = txn
            .query_one_raw(st(
                "SELECT server_version FROM sgc_docs WHERE collection = ? AND doc_id = ?",
                [collection.into(), id.into()],
            ))
            .await?
            .map(|r| get_u64(&r, "server_version"))
            .transpose()?
            .filter(|v| *v > 0);
        let m = Mutation {
            mutation_id: next,
            collection: collection.to_owned(),
            id: id.to_owned(),
            op,
            body,
            base_version,
        };
        txn.execute_raw(st(
            "INSERT INTO sgc_outbox (mutation_id, collection, doc_id, mutation, created_ms) \
             VALUES (?, ?, ?, ?, ?)",
            [
                (next as i64).into(),
                collection.into(),
                id.into(),
                to_msgpack(&m).into(),
                now_ms().into(),
            ],
        ))
        .await?;
        rebase(&txn, collection, id).await?;
        txn.commit().await?;
        Ok(next)
    }

    /// The optimistic state of one document (`None` if absent or deleted).
    pub async fn get(&self, collection: &str, id: &str) -> Result<Option<LocalDoc>, StoreError> {
        let rows = self
            .db
            .query_all_raw(st(
                &format!("{DOC_SELECT} WHERE d.collection = ? AND d.doc_id = ?"),
                [collection.into(), id.into()],
            ))
            .await?;
        Ok(docs_from_rows(&rows)?.into_iter().next())
    }

    /// Every live document of a collection matching an equality filter, by id.
    pub async fn query(
        &self,
        collection: &str,
        filter: &Filter,
    ) -> Result<Vec<LocalDoc>, StoreError> {
        let rows = self
            .db
            .query_all_raw(st(
                &format!("{DOC_SELECT} WHERE d.collection = ? ORDER BY d.doc_id"),
                [collection.into()],
            ))
            .await?;
        Ok(docs_from_rows(&rows)?
            .into_iter()
            .filter(|d| filter.matches(&d.body))
            .collect())
    }

    // ----- the outbox ------------------------------------------------------------------------

    /// Every outbox entry, oldest first.
    pub async fn outbox(&self) -> Result<Vec<OutboxEntry>, StoreError> {
        let rows = self
            .db
            .query_all_raw(st(
                "SELECT mutation, acked_version, created_ms FROM sgc_outbox ORDER BY mutation_id",
                [],
            ))
            .await?;
        rows.iter().map(outbox_entry).collect()
    }

    /// Pending (unacknowledged) mutations with an id above `after`, oldest first: at most
    /// `limit` of them and, after the first, no more than `max_bytes` of encoded mutations.
    pub async fn pending_after(
        &self,
        after: u64,
        limit: u32,
        max_bytes: usize,
    ) -> Result<Vec<Mutation>, StoreError> {
        let rows = self
            .db
            .query_all_raw(st(
                "SELECT mutation FROM sgc_outbox WHERE mutation_id > ? AND acked_version IS NULL \
                 ORDER BY mutation_id LIMIT ?",
                [(after as i64).into(), i64::from(limit).into()],
            ))
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        let mut bytes = 0;
        for r in &rows {
            let raw: Vec<u8> = r.try_get("", "mutation")?;
            bytes += raw.len();
            if !out.is_empty() && bytes > max_bytes {
                break;
            }
            out.push(from_msgpack::<Mutation>(&raw).map_err(corrupt)?);
        }
        Ok(out)
    }

    /// The number of mutations not yet acknowledged.
    pub async fn pending_count(&self) -> Result<u64, StoreError> {
        let row = self
            .db
            .query_one_raw(st(
                "SELECT COUNT(*) AS n FROM sgc_outbox WHERE acked_version IS NULL",
                [],
            ))
            .await?
            .ok_or_else(|| corrupt("count"))?;
        get_u64(&row, "n")
    }

    /// The highest mutation id handed out so far (0 = none).
    pub async fn last_mutation_id(&self) -> Result<u64, StoreError> {
        let next: u64 = self
            .meta("next_mutation")
            .await?
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| corrupt("next_mutation"))?;
        Ok(next - 1)
    }

    /// Mutations the server rejected, oldest first.
    pub async fn rejected(&self) -> Result<Vec<Rejection>, StoreError> {
        let rows = self
            .db
            .query_all_raw(st(
                "SELECT mutation, code, reason FROM sgc_rejected ORDER BY mutation_id",
                [],
            ))
            .await?;
        rows.iter()
            .map(|r| {
                let raw: Vec<u8> = r.try_get("", "mutation")?;
                Ok(Rejection {
                    mutation: from_msgpack(&raw).map_err(corrupt)?,
                    code: get_u64(r, "code")? as u16,
                    reason: r.try_get("", "reason")?,
                })
            })
            .collect()
    }

    /// Records a `Welcome`: the server's epoch and the last mutation it applied for this client.
    ///
    /// - If the epoch changed (the server's database was replaced), acknowledged entries refer
    ///   to versions of the old log: they are dropped and their documents rebased (the
    ///   subscriptions get `resync` from the server and re-download).
    /// - If the server has applied mutation ids this store has not handed out yet (the data
    ///   directory was restored from a backup), the counter jumps past them so that new edits
    ///   are never mistaken for replays. Returns true in that case.
    pub async fn on_welcome(&self, epoch: &str, last_applied: u64) -> Result<bool, StoreError> {
        let txn = self.db.begin().await?;
        let old = meta(&txn, "epoch").await?;
        if old.as_deref() != Some(epoch) {
            if old.is_some() {
                let rows = txn
                    .query_all_raw(st(
                        "SELECT DISTINCT collection, doc_id FROM sgc_outbox WHERE acked_version IS NOT NULL",
                        [],
                    ))
                    .await?;
                txn.execute_raw(st(
                    "DELETE FROM sgc_outbox WHERE acked_version IS NOT NULL",
                    [],
                ))
                .await?;
                for r in &rows {
                    let c: String = r.try_get("", "collection")?;
                    let d: String = r.try_get("", "doc_id")?;
                    rebase(&txn, &c, &d).await?;
                }
            }
            set_meta(&txn, "epoch", epoch).await?;
        }
        let next: u64 = meta(&txn, "next_mutation")
            .await?
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| corrupt("next_mutation"))?;
        let jumped = last_applied >= next;
        if jumped {
            set_meta(&txn, "next_mutation", &(last_applied + 1).to_string()).await?;
        }
        txn.commit().await?;
        Ok(jumped)
    }

    /// Records a push acknowledgement: applied entries become `acked` (or are dropped at once
    /// when the replica already holds their version or does not follow their collection),
    /// rejected ones move to the `rejected` table; the documents are rebased.
    pub async fn on_ack(&self, results: &[MutationResult]) -> Result<AckOutcome, StoreError> {
        let txn = self.db.begin().await?;
        let mut out = AckOutcome::default();
        let followed: std::collections::HashSet<String> = txn
            .query_all_raw(st("SELECT collection FROM sgc_subscriptions", []))
            .await?
            .iter()
            .map(|r| r.try_get("", "collection"))
            .collect::<Result<_, _>>()?;
        for r in results {
            let Some(row) = txn
                .query_one_raw(st(
                    "SELECT mutation FROM sgc_outbox WHERE mutation_id = ?",
                    [(r.mutation_id as i64).into()],
                ))
                .await?
            else {
                // Already resolved (a duplicate answer to a replay): nothing to do.
                continue;
            };
            let raw: Vec<u8> = row.try_get("", "mutation")?;
            let m: Mutation = from_msgpack(&raw).map_err(corrupt)?;
            match r.status {
                MutationStatus::Applied => {
                    let version = r.version.unwrap_or(0);
                    txn.execute_raw(st(
                        "UPDATE sgc_outbox SET acked_version = ? WHERE mutation_id = ?",
                        [(version as i64).into(), (r.mutation_id as i64).into()],
                    ))
                    .await?;
                    if !followed.contains(&m.collection) {
                        // No change will ever come back for it: the ack is the last word. What
                        // the writer knows of the document at that version (its own writes,
                        // in order) becomes the replica's server state, so it can read back
                        // what it wrote without following the collection.
                        keep_own_write(&txn, &m, version).await?;
                        txn.execute_raw(st(
                            "DELETE FROM sgc_outbox WHERE mutation_id = ?",
                            [(r.mutation_id as i64).into()],
                        ))
                        .await?;
                    }
                    out.applied.push((r.mutation_id, version));
                }
                MutationStatus::Rejected => {
                    let code = r.code.unwrap_or(ErrorCode::InternalError.code());
                    let reason = r.reason.clone().unwrap_or_default();
                    txn.execute_raw(st(
                        "DELETE FROM sgc_outbox WHERE mutation_id = ?",
                        [(r.mutation_id as i64).into()],
                    ))
                    .await?;
                    txn.execute_raw(st(
                        "INSERT OR REPLACE INTO sgc_rejected (mutation_id, mutation, code, reason, rejected_ms) \
                         VALUES (?, ?, ?, ?, ?)",
                        [
                            (r.mutation_id as i64).into(),
                            raw.into(),
                            i64::from(code).into(),
                            reason.as_str().into(),
                            now_ms().into(),
                        ],
                    ))
                    .await?;
                    out.rejected.push(Rejection {
                        mutation: m.clone(),
                        code,
                        reason,
                    });
                }
            }
            drop_seen_acks(&txn, &m.collection, &m.id).await?;
            rebase(&txn, &m.collection, &m.id).await?;
        }
        txn.commit().await?;
        Ok(out)
    }

    // ----- subscriptions and incoming data ---------------------------------------------------

    /// The stored subscriptions, by collection.
    pub async fn subscriptions(&self) -> Result<Vec<StoredSubscription>, StoreError> {
        let rows = self
            .db
            .query_all_raw(st(
                "SELECT collection, filter, cursor_epoch, cursor_seq FROM sgc_subscriptions ORDER BY collection",
                [],
            ))
            .await?;
        rows.iter()
            .map(|r| {
                let filter: Vec<u8> = r.try_get("", "filter")?;
                let epoch: Option<String> = r.try_get("", "cursor_epoch")?;
                let seq: Option<i64> = r.try_get("", "cursor_seq")?;
                Ok(StoredSubscription {
                    collection: r.try_get("", "collection")?,
                    filter: from_msgpack(&filter).map_err(corrupt)?,
                    cursor: epoch.zip(seq).map(|(epoch, seq)| Cursor {
                        epoch,
                        seq: seq as u64,
                    }),
                })
            })
            .collect()
    }

    /// Makes the stored subscriptions equal to `wanted` (collection → filter). A subscription
    /// whose filter changed restarts from a snapshot; the server data of a collection no longer
    /// followed is forgotten (documents with outbox entries keep their optimistic state).
    pub async fn set_subscriptions(&self, wanted: &[(String, Body)]) -> Result<(), StoreError> {
        let txn = self.db.begin().await?;
        let current = txn
            .query_all_raw(st("SELECT collection, filter FROM sgc_subscriptions", []))
            .await?;
        for r in &current {
            let c: String = r.try_get("", "collection")?;
            let f: Vec<u8> = r.try_get("", "filter")?;
            match wanted.iter().find(|(wc, _)| *wc == c) {
                Some((_, wf)) if to_msgpack(wf) == f => {}
                Some((_, wf)) => {
                    txn.execute_raw(st(
                        "UPDATE sgc_subscriptions SET filter = ?, cursor_epoch = NULL, cursor_seq = NULL \
                         WHERE collection = ?",
                        [to_msgpack(wf).into(), c.as_str().into()],
                    ))
                    .await?;
                }
                None => {
                    txn.execute_raw(st(
                        "DELETE FROM sgc_subscriptions WHERE collection = ?",
                        [c.as_str().into()],
                    ))
                    .await?;
                    forget_server_state(&txn, &c).await?;
                }
            }
        }
        for (c, f) in wanted {
            txn.execute_raw(st(
                "INSERT OR IGNORE INTO sgc_subscriptions (collection, filter) VALUES (?, ?)",
                [c.as_str().into(), to_msgpack(f).into()],
            ))
            .await?;
        }
        txn.commit().await?;
        Ok(())
    }

    /// A snapshot of `collection` is about to arrive (first subscription, changed filter, or
    /// `resync`): every server row is marked stale until the snapshot completes, and the cursor
    /// is cleared. With `resync`, acknowledged entries are dropped as well (their versions
    /// belong to a log the server no longer continues).
    pub async fn begin_snapshot(&self, collection: &str, resync: bool) -> Result<(), StoreError> {
        let txn = self.db.begin().await?;
        txn.execute_raw(st(
            "UPDATE sgc_docs SET stale = 1, server_version = 0 \
             WHERE collection = ? AND (server_version > 0 OR server_body IS NOT NULL)",
            [collection.into()],
        ))
        .await?;
        txn.execute_raw(st(
            "UPDATE sgc_subscriptions SET cursor_epoch = NULL, cursor_seq = NULL WHERE collection = ?",
            [collection.into()],
        ))
        .await?;
        if resync {
            let rows = txn
                .query_all_raw(st(
                    "SELECT DISTINCT doc_id FROM sgc_outbox WHERE collection = ? AND acked_version IS NOT NULL",
                    [collection.into()],
                ))
                .await?;
            txn.execute_raw(st(
                "DELETE FROM sgc_outbox WHERE collection = ? AND acked_version IS NOT NULL",
                [collection.into()],
            ))
            .await?;
            for r in &rows {
                let d: String = r.try_get("", "doc_id")?;
                rebase(&txn, collection, &d).await?;
            }
        }
        txn.commit().await?;
        Ok(())
    }

    /// Applies snapshot documents.
    pub async fn apply_snapshot(
        &self,
        collection: &str,
        docs: &[Doc],
    ) -> Result<Vec<Applied>, StoreError> {
        let txn = self.db.begin().await?;
        let mut out = Vec::with_capacity(docs.len());
        for d in docs {
            if let Some(a) =
                apply_server_version(&txn, collection, &d.id, d.version, Some(&d.body)).await?
            {
                out.push(a);
            }
        }
        txn.commit().await?;
        Ok(out)
    }

    /// Applies a `changes` frame and stores its cursor, in one transaction.
    pub async fn apply_changes(
        &self,
        collection: &str,
        changes: &[Change],
        cursor: &Cursor,
    ) -> Result<Vec<Applied>, StoreError> {
        let txn = self.db.begin().await?;
        let mut out = Vec::with_capacity(changes.len());
        for c in changes {
            let body = match c.op {
                ChangeOp::Upsert => c.body.as_ref(),
                ChangeOp::Delete => None,
            };
            if let Some(a) = apply_server_version(&txn, collection, &c.id, c.seq, body).await? {
                out.push(a);
            }
        }
        advance_cursor(&txn, collection, cursor).await?;
        txn.commit().await?;
        Ok(out)
    }

    /// The subscription is synced at `cursor`: rows still stale after a snapshot are gone on
    /// the server (or left the filter) and are removed; the cursor is stored.
    pub async fn synced(
        &self,
        collection: &str,
        cursor: &Cursor,
    ) -> Result<Vec<Applied>, StoreError> {
        let txn = self.db.begin().await?;
        let stale = txn
            .query_all_raw(st(
                "SELECT doc_id FROM sgc_docs WHERE collection = ? AND stale = 1",
                [collection.into()],
            ))
            .await?;
        let mut out = Vec::with_capacity(stale.len());
        for r in &stale {
            let id: String = r.try_get("", "doc_id")?;
            txn.execute_raw(st(
                "UPDATE sgc_docs SET server_body = NULL, server_version = 0, stale = 0 \
                 WHERE collection = ? AND doc_id = ?",
                [collection.into(), id.as_str().into()],
            ))
            .await?;
            let concurrent_pending = rebase(&txn, collection, &id).await?;
            out.push(Applied {
                collection: collection.to_owned(),
                id,
                version: cursor.seq,
                body: None,
                concurrent_pending,
            });
        }
        advance_cursor(&txn, collection, cursor).await?;
        txn.commit().await?;
        Ok(out)
    }

    /// Moves a live subscription's cursor forward to `cursor` (a `pong` head), if it is ahead.
    pub async fn advance(&self, collection: &str, cursor: &Cursor) -> Result<(), StoreError> {
        let txn = self.db.begin().await?;
        advance_cursor(&txn, collection, cursor).await?;
        txn.commit().await?;
        Ok(())
    }
}

const DOC_SELECT: &str = "SELECT d.collection, d.doc_id, d.local_body, d.server_version, \
     EXISTS (SELECT 1 FROM sgc_outbox o WHERE o.collection = d.collection AND o.doc_id = d.doc_id \
             AND o.acked_version IS NULL) AS pending \
     FROM sgc_docs d";

fn docs_from_rows(rows: &[QueryResult]) -> Result<Vec<LocalDoc>, StoreError> {
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let Some(body) = decode_body(r.try_get("", "local_body")?)? else {
            continue;
        };
        out.push(LocalDoc {
            collection: r.try_get("", "collection")?,
            id: r.try_get("", "doc_id")?,
            body,
            version: get_u64(r, "server_version")?,
            pending: r.try_get::<i64>("", "pending")? != 0,
        });
    }
    Ok(out)
}

fn outbox_entry(r: &QueryResult) -> Result<OutboxEntry, StoreError> {
    let raw: Vec<u8> = r.try_get("", "mutation")?;
    let acked: Option<i64> = r.try_get("", "acked_version")?;
    Ok(OutboxEntry {
        mutation: from_msgpack(&raw).map_err(corrupt)?,
        state: match acked {
            None => OutboxState::Pending,
            Some(v) => OutboxState::Acked { version: v as u64 },
        },
        created_ms: get_u64(r, "created_ms")?,
    })
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

/// Records the server's state of a document at `version` if it is newer than what the replica
/// holds (a snapshot may already be newer than the catch-up that follows it), then rebases.
async fn apply_server_version(
    txn: &DatabaseTransaction,
    collection: &str,
    id: &str,
    version: u64,
    body: Option<&Body>,
) -> Result<Option<Applied>, StoreError> {
    let held = txn
        .query_one_raw(st(
            "SELECT server_version, stale FROM sgc_docs WHERE collection = ? AND doc_id = ?",
            [collection.into(), id.into()],
        ))
        .await?;
    if let Some(r) = &held {
        let stale = r.try_get::<i64>("", "stale")? != 0;
        if !stale && get_u64(r, "server_version")? >= version {
            return Ok(None);
        }
    }
    txn.execute_raw(st(
        "INSERT INTO sgc_docs (collection, doc_id, server_body, server_version, stale) \
         VALUES (?, ?, ?, ?, 0) \
         ON CONFLICT (collection, doc_id) DO UPDATE SET server_body = excluded.server_body, \
         server_version = excluded.server_version, stale = 0",
        [
            collection.into(),
            id.into(),
            encode_body(body),
            (version as i64).into(),
        ],
    ))
    .await?;
    drop_seen_acks(txn, collection, id).await?;
    let concurrent_pending = rebase(txn, collection, id).await?;
    Ok(Some(Applied {
        collection: collection.to_owned(),
        id: id.to_owned(),
        version,
        body: body.cloned(),
        concurrent_pending,
    }))
}

/// Records an acknowledged write to a collection the replica does not follow as the
/// document's server state at `version`: the previous known state with the mutation applied.
/// (A patch of a document the replica never had leaves it unknown.)
async fn keep_own_write(
    txn: &DatabaseTransaction,
    m: &Mutation,
    version: u64,
) -> Result<(), StoreError> {
    let row = txn
        .query_one_raw(st(
            "SELECT server_body, server_version FROM sgc_docs WHERE collection = ? AND doc_id = ?",
            [m.collection.as_str().into(), m.id.as_str().into()],
        ))
        .await?;
    let (prev, prev_version) = match &row {
        Some(r) => (
            decode_body(r.try_get("", "server_body")?)?,
            get_u64(r, "server_version")?,
        ),
        None => (None, 0),
    };
    if version <= prev_version {
        return Ok(());
    }
    let Ok(body) = apply(prev.as_ref(), m.op, m.body.as_ref()) else {
        return Ok(());
    };
    txn.execute_raw(st(
        "INSERT INTO sgc_docs (collection, doc_id, server_body, server_version, stale) \
         VALUES (?, ?, ?, ?, 0) ON CONFLICT (collection, doc_id) DO UPDATE SET \
         server_body = excluded.server_body, server_version = excluded.server_version, stale = 0",
        [
            m.collection.as_str().into(),
            m.id.as_str().into(),
            encode_body(body.as_ref()),
            (version as i64).into(),
        ],
    ))
    .await?;
    Ok(())
}

/// Deletes acknowledged entries of a document whose version the replica has reached.
async fn drop_seen_acks(
    txn: &DatabaseTransaction,
    collection: &str,
    id: &str,
) -> Result<(), StoreError> {
    txn.execute_raw(st(
        "DELETE FROM sgc_outbox WHERE collection = ? AND doc_id = ? AND acked_version IS NOT NULL \
         AND acked_version <= (SELECT server_version FROM sgc_docs WHERE collection = ? AND doc_id = ?)",
        [collection.into(), id.into(), collection.into(), id.into()],
    ))
    .await?;
    Ok(())
}

/// Stores a newer cursor, and drops acknowledged entries at or below it: the subscription has
/// seen everything up to the cursor, so an acked write it did not receive does not match its
/// filter. Their documents are rebased.
async fn advance_cursor(
    txn: &DatabaseTransaction,
    collection: &str,
    cursor: &Cursor,
) -> Result<(), StoreError> {
    txn.execute_raw(st(
        "UPDATE sgc_subscriptions SET cursor_epoch = ?, cursor_seq = ? \
         WHERE collection = ? AND (cursor_seq IS NULL OR cursor_epoch IS NOT ? OR cursor_seq < ?)",
        [
            cursor.epoch.as_str().into(),
            (cursor.seq as i64).into(),
            collection.into(),
            cursor.epoch.as_str().into(),
            (cursor.seq as i64).into(),
        ],
    ))
    .await?;
    let rows = txn
        .query_all_raw(st(
            "SELECT DISTINCT doc_id FROM sgc_outbox WHERE collection = ? \
             AND acked_version IS NOT NULL AND acked_version <= ?",
            [collection.into(), (cursor.seq as i64).into()],
        ))
        .await?;
    if rows.is_empty() {
        return Ok(());
    }
    txn.execute_raw(st(
        "DELETE FROM sgc_outbox WHERE collection = ? AND acked_version IS NOT NULL AND acked_version <= ?",
        [collection.into(), (cursor.seq as i64).into()],
    ))
    .await?;
    for r in &rows {
        let d: String = r.try_get("", "doc_id")?;
        rebase(txn, collection, &d).await?;
    }
    Ok(())
}

/// Forgets the server's data of a collection that is no longer followed.
async fn forget_server_state(
    txn: &DatabaseTransaction,
    collection: &str,
) -> Result<(), StoreError> {
    txn.execute_raw(st(
        "DELETE FROM sgc_outbox WHERE collection = ? AND acked_version IS NOT NULL",
        [collection.into()],
    ))
    .await?;
    txn.execute_raw(st(
        "UPDATE sgc_docs SET server_body = NULL, server_version = 0, stale = 0 WHERE collection = ?",
        [collection.into()],
    ))
    .await?;
    let rows = txn
        .query_all_raw(st(
            "SELECT doc_id FROM sgc_docs WHERE collection = ?",
            [collection.into()],
        ))
        .await?;
    for r in &rows {
        let d: String = r.try_get("", "doc_id")?;
        rebase(txn, collection, &d).await?;
    }
    Ok(())
}

/// Recomputes a document's optimistic body: the server's body with every outbox entry that the
/// server state does not reflect yet (pending ones, and acked ones above the server version)
/// applied in mutation-id order. A mutation that cannot apply locally (a patch of a document
/// the replica does not have) leaves the state as it was; the server has the last word.
/// Returns the number of pending entries. Deletes the row when nothing is left of it.
async fn rebase(txn: &DatabaseTransaction, collection: &str, id: &str) -> Result<u64, StoreError> {
    let row = txn
        .query_one_raw(st(
            "SELECT server_body, server_version, stale FROM sgc_docs WHERE collection = ? AND doc_id = ?",
            [collection.into(), id.into()],
        ))
        .await?;
    let (mut body, version, stale) = match &row {
        Some(r) => (
            decode_body(r.try_get("", "server_body")?)?,
            get_u64(r, "server_version")?,
            r.try_get::<i64>("", "stale")? != 0,
        ),
        None => (None, 0, false),
    };
    let entries = txn
        .query_all_raw(st(
            "SELECT mutation, acked_version FROM sgc_outbox WHERE collection = ? AND doc_id = ? \
             AND (acked_version IS NULL OR acked_version > ?) ORDER BY mutation_id",
            [collection.into(), id.into(), (version as i64).into()],
        ))
        .await?;
    let mut pending = 0;
    for r in &entries {
        let raw: Vec<u8> = r.try_get("", "mutation")?;
        let acked: Option<i64> = r.try_get("", "acked_version")?;
        if acked.is_none() {
            pending += 1;
        }
        let m: Mutation = from_msgpack(&raw).map_err(corrupt)?;
        if let Ok(b) = apply(body.as_ref(), m.op, m.body.as_ref()) {
            body = b;
        }
    }
    if body.is_none() && version == 0 && !stale && entries.is_empty() {
        txn.execute_raw(st(
            "DELETE FROM sgc_docs WHERE collection = ? AND doc_id = ?",
            [collection.into(), id.into()],
        ))
        .await?;
    } else {
        txn.execute_raw(st(
            "INSERT INTO sgc_docs (collection, doc_id, local_body) VALUES (?, ?, ?) \
             ON CONFLICT (collection, doc_id) DO UPDATE SET local_body = excluded.local_body",
            [collection.into(), id.into(), encode_body(body.as_ref())],
        ))
        .await?;
    }
    Ok(pending)
}

#[cfg(test)]
mod tests {
    use super::*;
    use syncgate_protocol::Value;

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
