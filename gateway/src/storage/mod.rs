//! Storage: the only module that knows sea-orm. It owns the schema, the change log, the
//! document table, the per-client exactly-once record, and the group-commit transaction
//! (which reads and writes; what a group does is decided by [`crate::ingest::plan`]).
//!
//! # The log head lock (why a subscriber never skips a change)
//! Every write transaction starts by locking the single row of `sg_head`
//! (`UPDATE sg_head SET seq = seq WHERE id = 1 RETURNING seq`) and assigns its changes the
//! sequence numbers after the head it read; it stores the new head before it commits. The row
//! lock is held until commit, so write transactions are serialised across every process sharing
//! the database: seq ranges are handed out in commit order and without gaps. A reader that has
//! seen seq n committed therefore knows every seq below n is committed too (invariant 2), on
//! PostgreSQL with several gateway nodes as on SQLite. Group commit keeps the cost of this
//! serialisation to one lock per group, not one per mutation.

mod api_keys;
mod capture;
pub(crate) mod claims;
mod compaction;
mod group_write;
mod schema;
mod status;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sea_orm::sea_query::{Asterisk, Expr, ExprTrait, Func, Order, Query, SelectStatement};
use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
use sea_orm::{
    AccessMode, ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, DbErr,
    IsolationLevel, QueryResult, TransactionTrait,
};
use syncgate_protocol::codec::from_msgpack;

pub(crate) use crate::changes::LogEntry;
use syncgate_protocol::{Body, Change, ChangeOp, Doc};

pub use capture::{Attached, Capture};
pub use compaction::CompactionReport;
pub(crate) use compaction::Retention;
#[cfg(test)]
pub(crate) use group_write::RefusedConflict;
pub(crate) use group_write::{
    ChangeRow, ClientRow, ConflictRow, DocumentRow, Earlier, GroupRows, HistoryRow, RejectionRow,
    ResolutionRow, StoredConflict, StoredDoc, UsageRow,
};
pub use status::{CollectionStatus, Status};

/// The PostgreSQL NOTIFY channel on which committed heads are announced.
pub(crate) const NOTIFY_CHANNEL: &str = "syncgate_log";

/// A handle on the database. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    /// The sea-orm connection pool.
    db: DatabaseConnection,
    /// Which SQL dialect to speak.
    backend: DbBackend,
    /// The database's epoch, read once at start.
    epoch: Arc<str>,
    /// SQLite only: the log writers' own connection (a pool of exactly one), held by every
    /// writer of the log (a group commit, a compaction batch) for its whole transaction. So
    /// they queue here, in order, instead of in SQLite's busy handler, which sleeps in steps
    /// of up to 100 ms and made a group commit wait hundreds of milliseconds behind a
    /// compaction batch of a few. And one connection does every log write, so its page cache
    /// stays valid from one group to the next: SQLite drops a connection's whole cache when
    /// another connection wrote since it last read, and the pool used to hand each group the
    /// connection that had been idle longest, which had always missed the last write.
    log_writer: Option<Arc<tokio::sync::Mutex<DatabaseConnection>>>,
}

/// One page of a read bounded by count and bytes.
#[derive(Debug)]
pub struct Page<T> {
    /// The rows, in order.
    pub items: Vec<T>,
    /// The read stopped at its limit (of rows or bytes): there may be more after the last.
    pub more: bool,
}

/// Who holds a client id, as [`Store::client_owner`] or [`Store::claim_clients`] found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientClaim {
    /// The asking user holds it; this is its exactly-once horizon.
    Owned {
        /// The highest mutation id handled for it.
        last_applied: u64,
    },
    /// Another user holds it.
    Taken,
    /// It is new, and the user owns the most client ids allowed already.
    OverQuota,
}

/// Storage failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused or failed.
    #[error("database error: {0}")]
    Db(#[from] DbErr),
    /// A stored value could not be decoded.
    #[error("corrupt stored value: {0}")]
    Corrupt(String),
    /// A statement could not be built (a row with the wrong number of values: a bug).
    #[error("building a statement: {0}")]
    Statement(String),
    /// The database server could not be reached or refused the connection.
    #[error("cannot connect to {url}: {cause}")]
    Connect {
        /// The URL, password hidden.
        url: String,
        /// What the driver said (connection refused, password authentication failed ...).
        cause: String,
        /// Whether trying again later can succeed (a server still starting, a dropped
        /// session) as opposed to a wrong address, password or database name.
        transient: bool,
    },
    /// A read of the log from a position older than the collection's compaction horizon:
    /// changes after the position were removed.
    #[error("position {after} of {collection:?} is older than its compaction horizon {horizon}")]
    CursorTooOld {
        /// The collection.
        collection: String,
        /// The position asked for.
        after: u64,
        /// The horizon.
        horizon: u64,
    },
}

impl StoreError {
    /// Whether the same operation can succeed later without a configuration change: the
    /// connection failed or was cut (I/O error, pool timeout, a session terminated by the
    /// server, a server starting up or out of connection slots).
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Connect { transient, .. } => *transient,
            StoreError::Db(DbErr::ConnectionAcquire(_)) => true,
            StoreError::Db(DbErr::Conn(e) | DbErr::Exec(e) | DbErr::Query(e)) => match e {
                sea_orm::RuntimeErr::SqlxError(e) => sqlx_transient(e),
                _ => false,
            },
            _ => false,
        }
    }
}

/// Whether an sqlx error is about the connection rather than the request.
fn sqlx_transient(e: &sea_orm::sqlx::Error) -> bool {
    use sea_orm::sqlx::Error;
    match e {
        Error::Io(_) | Error::PoolTimedOut | Error::PoolClosed | Error::WorkerCrashed => true,
        Error::Protocol(_) => true,
        Error::Database(db) => db.code().is_some_and(|c| transient_sqlstate(&c)),
        _ => false,
    }
}

/// PostgreSQL SQLSTATEs that mean "this session or server, not your request": connection
/// exceptions (class 08), operator intervention (57P01 admin shutdown, 57P02 crash shutdown,
/// 57P03 cannot connect now, 57P05 idle session timeout), too many connections (53300).
/// SQLite's busy and locked codes (5, 6) also pass with time.
pub(crate) fn transient_sqlstate(code: &str) -> bool {
    code.starts_with("08")
        || matches!(
            code,
            "57P01" | "57P02" | "57P03" | "57P05" | "53300" | "5" | "6"
        )
}

/// One direct connection to a PostgreSQL server, to fail fast with the driver's own words
/// (a pool only reports "timed out" after its whole acquire timeout).
async fn probe_postgres(url: &str) -> Result<(), StoreError> {
    use sea_orm::sqlx::Connection;
    const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
    let shown = crate::config::redact_url(url);
    match tokio::time::timeout(PROBE_TIMEOUT, sea_orm::sqlx::PgConnection::connect(url)).await {
        Err(_) => Err(StoreError::Connect {
            url: shown,
            cause: format!("no answer within {PROBE_TIMEOUT:?}"),
            transient: true,
        }),
        Ok(Err(e)) => Err(StoreError::Connect {
            url: shown,
            transient: sqlx_transient(&e),
            cause: e.to_string(),
        }),
        Ok(Ok(c)) => {
            let _ = c.close().await;
            Ok(())
        }
    }
}

impl Store {
    /// Connects, configures SQLite for WAL and the chosen durability, and runs migrations.
    pub async fn open(
        url: &str,
        pool_size: u32,
        synchronous: crate::config::SqliteSynchronous,
    ) -> Result<Store, StoreError> {
        if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            probe_postgres(url).await?;
        }
        let options = |connections: u32| {
            let mut opts = ConnectOptions::new(url.to_owned());
            opts.max_connections(connections)
                .min_connections(1)
                .connect_timeout(Duration::from_secs(10))
                .acquire_timeout(Duration::from_secs(30))
                // A connection in use within the last few seconds is handed out without a
                // ping first: the ping was one more round trip (PostgreSQL) or hand-over to
                // the worker thread (SQLite) before every group commit. A connection that
                // broke meanwhile fails its statement, which is a transient storage error.
                .test_before_acquire_if_idle_for(Duration::from_secs(10))
                .sqlx_logging(false);
            opts.map_sqlx_sqlite_opts(move |o| {
                o.create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(match synchronous {
                        crate::config::SqliteSynchronous::Full => SqliteSynchronous::Full,
                        crate::config::SqliteSynchronous::Normal => SqliteSynchronous::Normal,
                    })
                    .busy_timeout(Duration::from_secs(10))
            });
            opts
        };
        let db = Database::connect(options(Ord::max(pool_size, 2))).await?;
        let backend = db.get_database_backend();
        let epoch = schema::migrate(&db, backend).await?;
        let log_writer = match backend {
            DbBackend::Sqlite => {
                let mut opts = options(1);
                // Kept open for the process's life: its page cache is the point.
                opts.idle_timeout(None).max_lifetime(None);
                let writer = Database::connect(opts).await?;
                Some(Arc::new(tokio::sync::Mutex::new(writer)))
            }
            _ => None,
        };
        Ok(Store {
            db,
            backend,
            epoch: epoch.into(),
            log_writer,
        })
    }

    /// The database's epoch.
    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    /// Whether this is PostgreSQL (several nodes may share it).
    pub fn is_postgres(&self) -> bool {
        self.backend == DbBackend::Postgres
    }

    /// PostgreSQL: calls `wake` whenever any node commits (LISTEN on [`NOTIFY_CHANNEL`]), and
    /// once after every (re)connection of the listener, which may have missed notifications.
    /// Reconnects after a lost connection; returns at `shutdown`. SQLite: returns at once (one
    /// process writes; it wakes its own follower).
    pub async fn run_commit_listener(
        &self,
        wake: impl Fn() + Send,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        use sea_orm::sqlx::postgres::PgListener;
        if !self.is_postgres() {
            return;
        }
        let pool = self.db.get_postgres_connection_pool().clone();
        loop {
            let listener = async {
                let mut l = PgListener::connect_with(&pool).await?;
                l.listen(NOTIFY_CHANNEL).await?;
                Ok::<_, sea_orm::sqlx::Error>(l)
            };
            let mut l = tokio::select! {
                _ = shutdown.cancelled() => return,
                l = listener => match l {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::warn!(error = %e, "LISTEN failed; retrying");
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        }
                    }
                },
            };
            wake();
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    n = l.recv() => match n {
                        Ok(_) => wake(),
                        Err(e) => {
                            tracing::warn!(error = %e, "LISTEN connection lost; reconnecting");
                            break;
                        }
                    },
                }
            }
        }
    }

    /// Closes the pool (and the log writers' connection).
    pub async fn close(self) {
        if let Some(w) = &self.log_writer {
            let _ = w.lock().await.close_by_ref().await;
        }
        let _ = self.db.close().await;
    }

    /// A cheap query that proves the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.db.ping().await?;
        Ok(())
    }

    /// The committed head of the log.
    pub async fn head(&self) -> Result<u64, StoreError> {
        let select = Query::select()
            .column("seq")
            .from("sg_head")
            .and_where(Expr::col("id").eq(1))
            .to_owned();
        let row = self
            .db
            .query_one_raw(self.backend.build(&select))
            .await?
            .ok_or_else(|| StoreError::Corrupt("sg_head has no row".into()))?;
        Ok(row.try_get::<i64>("", "seq")? as u64)
    }

    /// Who holds `client_id`, as seen by `user`, without writing; `None`: nobody yet.
    pub(crate) async fn client_owner(
        &self,
        client_id: &str,
        user: &str,
    ) -> Result<Option<ClientClaim>, StoreError> {
        let select = Query::select()
            .columns(["last_mutation", "user_id"])
            .from("sg_clients")
            .and_where(Expr::col("client_id").eq(client_id))
            .to_owned();
        let Some(row) = self.db.query_one_raw(self.backend.build(&select)).await? else {
            return Ok(None);
        };
        let owner: String = row.try_get("", "user_id")?;
        Ok(Some(if owner == user {
            ClientClaim::Owned {
                last_applied: row.try_get::<i64>("", "last_mutation")? as u64,
            }
        } else {
            ClientClaim::Taken
        }))
    }

    /// Gives `client_id` to `user` (an installation handed to another operator); returns the
    /// previous owner, or `None` if the client id was never used.
    pub async fn reassign_client(
        &self,
        client_id: &str,
        user: &str,
    ) -> Result<Option<String>, StoreError> {
        let txn = self.begin().await?;
        let select = Query::select()
            .column("user_id")
            .from("sg_clients")
            .and_where(Expr::col("client_id").eq(client_id))
            .to_owned();
        let Some(row) = txn.query_one_raw(self.backend.build(&select)).await? else {
            return Ok(None);
        };
        let previous: String = row.try_get("", "user_id")?;
        let update = Query::update()
            .table("sg_clients")
            .value("user_id", user)
            .value("updated_at", now_ms())
            .and_where(Expr::col("client_id").eq(client_id))
            .to_owned();
        txn.execute_raw(self.backend.build(&update)).await?;
        txn.commit().await?;
        Ok(Some(previous))
    }

    /// Changes of one collection with `after < seq <= upto`, in seq order: at most `limit`,
    /// and no more than about `max_bytes` of bodies (at least one change). The previous
    /// bodies are read only `with_prev` (a filtered subscriber needs them to see documents
    /// leave its filter); rows are streamed, so a page never holds more than that in memory.
    pub async fn read_changes(
        &self,
        collection: &str,
        after: u64,
        upto: u64,
        limit: u64,
        max_bytes: usize,
        with_prev: bool,
    ) -> Result<Page<LogEntry>, StoreError> {
        let size = if with_prev {
            r#"CAST(COALESCE(LENGTH("body"), 0) + COALESCE(LENGTH("prev_body"), 0) AS BIGINT)"#
        } else {
            r#"CAST(COALESCE(LENGTH("body"), 0) AS BIGINT)"#
        };
        let range = |select: &mut SelectStatement| {
            select
                .from("sg_changes")
                .and_where(Expr::col("collection").eq(collection))
                .and_where(Expr::col("seq").gt(after as i64))
                .and_where(Expr::col("seq").lte(upto as i64))
                .order_by("seq", Order::Asc);
        };
        let mut sizes = Query::select()
            .expr_as(Expr::col("seq"), "k")
            .expr_as(Expr::cust(size), "n")
            .limit(limit)
            .to_owned();
        range(&mut sizes);
        let mut rows = Query::select()
            .columns(["seq", "collection", "doc_id", "op", "body"])
            .to_owned();
        if with_prev {
            rows.column("prev_body");
        } else {
            rows.expr_as(Expr::cust("NULL"), "prev_body");
        }
        range(&mut rows);
        let page = self
            .read_page(
                sizes,
                rows,
                limit,
                max_bytes,
                |r| r.try_get::<i64>("", "k"),
                |select, last| {
                    select.and_where(Expr::col("seq").lte(last));
                },
            )
            .await?;
        // After the rows: a compaction stores its horizon before it removes anything, so
        // rows found missing come with the horizon that explains them.
        let horizon = self.horizon(collection).await?;
        if after < horizon {
            return Err(StoreError::CursorTooOld {
                collection: collection.to_owned(),
                after,
                horizon,
            });
        }
        Ok(Page {
            items: page
                .items
                .iter()
                .map(entry_from_row)
                .collect::<Result<_, _>>()?,
            more: page.more,
        })
    }

    /// Changes of every collection with `after < seq <= upto`, in seq order, at most `limit`.
    pub async fn read_log(
        &self,
        after: u64,
        upto: u64,
        limit: u64,
    ) -> Result<Vec<LogEntry>, StoreError> {
        let select = Query::select()
            .columns(["seq", "collection", "doc_id", "op", "body", "prev_body"])
            .from("sg_changes")
            .and_where(Expr::col("seq").gt(after as i64))
            .and_where(Expr::col("seq").lte(upto as i64))
            .order_by("seq", Order::Asc)
            .limit(limit)
            .to_owned();
        let rows = self.db.query_all_raw(self.backend.build(&select)).await?;
        rows.iter().map(entry_from_row).collect()
    }

    /// Live documents of a collection with id greater than `after_id`, in id order: at most
    /// `limit`, and no more than about `max_bytes` of bodies (at least one document).
    pub async fn documents_page(
        &self,
        collection: &str,
        after_id: Option<&str>,
        limit: u64,
        max_bytes: usize,
    ) -> Result<Page<Doc>, StoreError> {
        let range = |select: &mut SelectStatement| {
            select
                .from("sg_documents")
                .and_where(Expr::col("collection").eq(collection))
                .and_where(Expr::col("doc_id").gt(after_id.unwrap_or("")))
                .and_where(Expr::col("deleted").eq(0))
                .order_by("doc_id", Order::Asc);
        };
        let mut sizes = Query::select()
            .expr_as(Expr::col("doc_id"), "k")
            .expr_as(
                Expr::cust(r#"CAST(COALESCE(LENGTH("body"), 0) AS BIGINT)"#),
                "n",
            )
            .limit(limit)
            .to_owned();
        range(&mut sizes);
        let mut rows = Query::select()
            .columns(["doc_id", "body", "version"])
            .to_owned();
        range(&mut rows);
        let page = self
            .read_page(
                sizes,
                rows,
                limit,
                max_bytes,
                |r| r.try_get::<String>("", "k"),
                |select, last| {
                    select.and_where(Expr::col("doc_id").lte(last));
                },
            )
            .await?;
        let items = page
            .items
            .iter()
            .map(|r| {
                let body: Option<Vec<u8>> = r.try_get("", "body")?;
                Ok(Doc {
                    id: r.try_get("", "doc_id")?,
                    body: decode_body(body.as_deref())?.unwrap_or_default(),
                    version: r.try_get::<i64>("", "version")? as u64,
                })
            })
            .collect::<Result<_, StoreError>>()?;
        Ok(Page {
            items,
            more: page.more,
        })
    }

    /// One page of a range read, bounded by rows and bytes without reading more than it
    /// returns: `sizes` (the range's keys `k` and body sizes `n`, with the row limit) says how
    /// many rows fit in `max_bytes` (at least one); `rows` (the same range) is then read up to
    /// the last of them (`upto` adds `key <= last`). Both run in one read-only snapshot, so
    /// the rows are the ones measured.
    async fn read_page<K: Clone + Into<sea_orm::Value>>(
        &self,
        sizes: SelectStatement,
        mut rows: SelectStatement,
        limit: u64,
        max_bytes: usize,
        key: impl Fn(&QueryResult) -> Result<K, DbErr>,
        upto: impl Fn(&mut SelectStatement, K),
    ) -> Result<Page<QueryResult>, StoreError> {
        let txn = if self.is_postgres() {
            self.db
                .begin_with_config(
                    Some(IsolationLevel::RepeatableRead),
                    Some(AccessMode::ReadOnly),
                )
                .await?
        } else {
            // SQLite in WAL mode: a read transaction sees one snapshot throughout.
            self.db.begin().await?
        };
        let measured = txn.query_all_raw(self.backend.build(&sizes)).await?;
        let mut bytes = 0usize;
        let mut take = 0usize;
        let mut last = None;
        for r in &measured {
            if take > 0 && bytes >= max_bytes {
                break;
            }
            let n = r.try_get::<Option<i64>>("", "n")?.unwrap_or(0);
            bytes += usize::try_from(n).unwrap_or(0);
            take += 1;
            last = Some(key(r)?);
        }
        let Some(last) = last else {
            txn.commit().await?;
            return Ok(Page {
                items: Vec::new(),
                more: false,
            });
        };
        upto(&mut rows, last);
        let items = txn.query_all_raw(self.backend.build(&rows)).await?;
        txn.commit().await?;
        let more = take < measured.len() || measured.len() as u64 >= limit;
        Ok(Page { items, more })
    }

    /// One document (deleted ones included), for tests and admin tools.
    pub async fn document(
        &self,
        collection: &str,
        id: &str,
    ) -> Result<Option<StoredDoc>, StoreError> {
        let select = Query::select()
            .columns(["body", "version", "deleted"])
            .from("sg_documents")
            .and_where(Expr::col("collection").eq(collection))
            .and_where(Expr::col("doc_id").eq(id))
            .to_owned();
        let row = self.db.query_one_raw(self.backend.build(&select)).await?;
        row.map(|r| {
            let raw: Option<Vec<u8>> = r.try_get("", "body")?;
            Ok(StoredDoc {
                body: decode_body(raw.as_deref())?,
                encoded: raw.map(bytes::Bytes::from),
                version: r.try_get::<i64>("", "version")? as u64,
                deleted: r.try_get::<i64>("", "deleted")? != 0,
            })
        })
        .transpose()
    }

    /// One recorded conflict decision; `None`: there is none of this id.
    pub async fn conflict_record(&self, id: &str) -> Result<Option<ConflictRecord>, StoreError> {
        let Some((client, mutation)) = crate::conflict::parse_conflict_id(id) else {
            return Ok(None);
        };
        let select = Query::select()
            .column(Asterisk)
            .from("sg_conflicts")
            .and_where(Expr::col("client_id").eq(client))
            .and_where(Expr::col("mutation_id").eq(mutation as i64))
            .to_owned();
        let row = self.db.query_one_raw(self.backend.build(&select)).await?;
        row.as_ref().map(conflict_record).transpose()
    }

    /// Records the request an HTTP `Idempotency-Key` stands for (its client id and a hash of
    /// its mutations), first come first kept: `Ok(true)` the first time or again for the same
    /// request, `Ok(false)` when the key was used for another request. Written before the
    /// request is applied: a crash in between leaves a row whose retry matches it.
    pub async fn remember_request(
        &self,
        client_id: &str,
        request_hash: &str,
    ) -> Result<bool, StoreError> {
        let insert = Query::insert()
            .into_table("sg_idempotency")
            .columns(["client_id", "request_hash", "created_at"])
            .values_panic([client_id.into(), request_hash.into(), now_ms().into()])
            .on_conflict(
                sea_orm::sea_query::OnConflict::column("client_id")
                    .do_nothing()
                    .to_owned(),
            )
            .to_owned();
        self.db.execute_raw(self.backend.build(&insert)).await?;
        let select = Query::select()
            .column("request_hash")
            .from("sg_idempotency")
            .and_where(Expr::col("client_id").eq(client_id))
            .to_owned();
        let stored = self
            .db
            .query_one_raw(self.backend.build(&select))
            .await?
            .map(|r| r.try_get::<String>("", "request_hash"))
            .transpose()?;
        Ok(stored.as_deref() == Some(request_hash))
    }

    /// Every retained change of one document, oldest first, at most `limit` (the newest
    /// `limit` when there are more): `syncgate admin history`. One index range
    /// (`sg_changes_doc`).
    pub async fn document_history(
        &self,
        collection: &str,
        id: &str,
        limit: u64,
    ) -> Result<Vec<HistoryEntry>, StoreError> {
        let select = Query::select()
            .columns([
                "seq",
                "op",
                "body",
                "origin_client",
                "origin_mutation",
                "committed_at",
            ])
            .from("sg_changes")
            .and_where(Expr::col("collection").eq(collection))
            .and_where(Expr::col("doc_id").eq(id))
            .order_by("seq", Order::Desc)
            .limit(Ord::min(limit, i64::MAX as u64))
            .to_owned();
        let rows = self.db.query_all_raw(self.backend.build(&select)).await?;
        let mut out = rows
            .iter()
            .map(|r| {
                let raw: Option<Vec<u8>> = r.try_get("", "body")?;
                Ok(HistoryEntry {
                    version: r.try_get::<i64>("", "seq")? as u64,
                    op: if r.try_get::<i64>("", "op")? != 0 {
                        "delete"
                    } else {
                        "upsert"
                    },
                    body: decode_body(raw.as_deref())?,
                    origin_client: r.try_get("", "origin_client")?,
                    origin_mutation: r
                        .try_get::<Option<i64>>("", "origin_mutation")?
                        .map(|m| m as u64),
                    committed_at_ms: r.try_get::<i64>("", "committed_at")? as u64,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        out.reverse();
        Ok(out)
    }

    /// The stored state of the documents among `ids` that exist in `collection` (deleted
    /// ones too): id -> state. One statement.
    pub async fn documents_by_id(
        &self,
        collection: &str,
        ids: &[&str],
    ) -> Result<HashMap<String, StoredDoc>, StoreError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let select = Query::select()
            .columns(["doc_id", "body", "version", "deleted"])
            .from("sg_documents")
            .and_where(Expr::col("collection").eq(collection))
            .and_where(Expr::col("doc_id").is_in(ids.iter().copied()))
            .to_owned();
        let rows = self.db.query_all_raw(self.backend.build(&select)).await?;
        rows.into_iter()
            .map(|r| {
                let raw: Option<Vec<u8>> = r.try_get("", "body")?;
                Ok((
                    r.try_get::<String>("", "doc_id")?,
                    StoredDoc {
                        body: decode_body(raw.as_deref())?,
                        encoded: raw.map(bytes::Bytes::from),
                        version: r.try_get::<i64>("", "version")? as u64,
                        deleted: r.try_get::<i64>("", "deleted")? != 0,
                    },
                ))
            })
            .collect()
    }

    /// Stored sync errors (rejected mutations), oldest first, of one client or of all, only
    /// those nobody discarded or retried when `open_only`; at most `limit`.
    pub async fn sync_errors(
        &self,
        client_id: Option<&str>,
        open_only: bool,
        limit: u64,
    ) -> Result<Vec<SyncError>, StoreError> {
        let mut select = sync_errors_select(limit);
        if let Some(c) = client_id {
            select.and_where(Expr::col(("sg_sync_errors", "client_id")).eq(c));
        }
        if open_only {
            let state = || Expr::col(("sg_sync_error_state", "state"));
            select.and_where(state().is_null().or(state().eq("open")));
        }
        self.read_sync_errors(&select).await
    }

    /// Recorded conflict decisions, oldest first, of one collection or of all, only the open
    /// `manual` ones when `open_only`; at most `limit`.
    pub async fn conflict_records(
        &self,
        collection: Option<&str>,
        open_only: bool,
        limit: u64,
    ) -> Result<Vec<ConflictRecord>, StoreError> {
        let mut select = Query::select()
            .column(Asterisk)
            .from("sg_conflicts")
            .order_by("created_at", Order::Asc)
            .order_by("client_id", Order::Asc)
            .order_by("mutation_id", Order::Asc)
            .limit(Ord::min(limit, i64::MAX as u64))
            .to_owned();
        if let Some(c) = collection {
            select.and_where(Expr::col("collection").eq(c));
        }
        if open_only {
            select.and_where(Expr::col("state").eq("open"));
        }
        let rows = self.db.query_all_raw(self.backend.build(&select)).await?;
        rows.iter().map(conflict_record).collect()
    }

    /// One stored sync error; `None`: there is no such sync error.
    pub async fn sync_error(
        &self,
        client_id: &str,
        mutation_id: u64,
    ) -> Result<Option<SyncError>, StoreError> {
        let mut select = sync_errors_select(1);
        select
            .and_where(Expr::col(("sg_sync_errors", "client_id")).eq(client_id))
            .and_where(Expr::col(("sg_sync_errors", "mutation_id")).eq(mutation_id as i64));
        Ok(self.read_sync_errors(&select).await?.pop())
    }

    async fn read_sync_errors(
        &self,
        select: &SelectStatement,
    ) -> Result<Vec<SyncError>, StoreError> {
        let rows = self.db.query_all_raw(self.backend.build(select)).await?;
        rows.into_iter()
            .map(|r| {
                let raw: Vec<u8> = r.try_get("", "mutation")?;
                Ok(SyncError {
                    state: r
                        .try_get::<Option<String>>("", "state")?
                        .unwrap_or_else(|| "open".to_owned()),
                    client_id: r.try_get("", "client_id")?,
                    mutation_id: r.try_get::<i64>("", "mutation_id")? as u64,
                    batch: r.try_get::<i64>("", "batch")? as u64,
                    code: u16::try_from(r.try_get::<i64>("", "code")?).unwrap_or(0),
                    reason: r.try_get("", "reason")?,
                    mutation: from_msgpack(&raw)
                        .map_err(|e| StoreError::Corrupt(format!("sync error mutation: {e}")))?,
                    created_at_ms: r.try_get::<i64>("", "created_at")? as u64,
                })
            })
            .collect()
    }

    /// Marks a stored sync error as dealt with (`discarded`): it no longer shows among the
    /// open ones. `false`: there is no such sync error.
    pub async fn discard_sync_error(
        &self,
        client_id: &str,
        mutation_id: u64,
    ) -> Result<bool, StoreError> {
        let attempts = self
            .sync_error_state(client_id, mutation_id)
            .await?
            .map_or(0, |(_, a)| a);
        self.set_sync_error_state(client_id, mutation_id, "discarded", attempts)
            .await
    }

    /// What became of a stored sync error so far: its state and how many retries of it were
    /// rejected again. `None`: open, never retried (or no such sync error).
    pub async fn sync_error_state(
        &self,
        client_id: &str,
        mutation_id: u64,
    ) -> Result<Option<(String, u64)>, StoreError> {
        let select = Query::select()
            .columns(["state", "attempts"])
            .from("sg_sync_error_state")
            .and_where(Expr::col("client_id").eq(client_id))
            .and_where(Expr::col("mutation_id").eq(mutation_id as i64))
            .to_owned();
        self.db
            .query_one_raw(self.backend.build(&select))
            .await?
            .map(|r| {
                Ok((
                    r.try_get::<String>("", "state")?,
                    r.try_get::<i64>("", "attempts")? as u64,
                ))
            })
            .transpose()
    }

    /// Records what became of a stored sync error (`open`, `discarded`, `retried`) and how
    /// many retries of it were rejected again. `false`: there is no such sync error.
    pub async fn set_sync_error_state(
        &self,
        client_id: &str,
        mutation_id: u64,
        state: &str,
        attempts: u64,
    ) -> Result<bool, StoreError> {
        let exists = Query::select()
            .expr(Expr::val(1))
            .from("sg_sync_errors")
            .and_where(Expr::col("client_id").eq(client_id))
            .and_where(Expr::col("mutation_id").eq(mutation_id as i64))
            .to_owned();
        if self
            .db
            .query_one_raw(self.backend.build(&exists))
            .await?
            .is_none()
        {
            return Ok(false);
        }
        let upsert = Query::insert()
            .into_table("sg_sync_error_state")
            .columns([
                "client_id",
                "mutation_id",
                "state",
                "attempts",
                "updated_at",
            ])
            .values_panic([
                client_id.into(),
                (mutation_id as i64).into(),
                state.into(),
                i64::try_from(attempts).unwrap_or(i64::MAX).into(),
                now_ms().into(),
            ])
            .on_conflict(
                sea_orm::sea_query::OnConflict::columns(["client_id", "mutation_id"])
                    .update_columns(["state", "attempts", "updated_at"])
                    .to_owned(),
            )
            .to_owned();
        self.db.execute_raw(self.backend.build(&upsert)).await?;
        Ok(true)
    }

    /// The user that owns `client_id`; `None`: nobody yet.
    pub async fn owner_of(&self, client_id: &str) -> Result<Option<String>, StoreError> {
        let select = Query::select()
            .column("user_id")
            .from("sg_clients")
            .and_where(Expr::col("client_id").eq(client_id))
            .to_owned();
        self.db
            .query_one_raw(self.backend.build(&select))
            .await?
            .map(|r| r.try_get::<String>("", "user_id").map_err(StoreError::from))
            .transpose()
    }

    /// Counts stored sync errors (rejected mutations) of a client.
    pub async fn sync_error_count(&self, client_id: &str) -> Result<u64, StoreError> {
        let select = Query::select()
            .expr_as(Func::count(Expr::col(Asterisk)), "n")
            .from("sg_sync_errors")
            .and_where(Expr::col("client_id").eq(client_id))
            .to_owned();
        let row = self.db.query_one_raw(self.backend.build(&select)).await?;
        Ok(match row {
            Some(r) => r.try_get::<i64>("", "n")? as u64,
            None => 0,
        })
    }
}

/// Sync errors with their state (absent: open), oldest first, at most `limit`.
fn sync_errors_select(limit: u64) -> SelectStatement {
    let e = |c: &'static str| ("sg_sync_errors", c);
    let st = |c: &'static str| ("sg_sync_error_state", c);
    Query::select()
        .columns([
            e("client_id"),
            e("mutation_id"),
            e("batch"),
            e("code"),
            e("reason"),
            e("mutation"),
            e("created_at"),
        ])
        .expr_as(Expr::col(st("state")), "state")
        .from("sg_sync_errors")
        .left_join(
            "sg_sync_error_state",
            Expr::col(st("client_id"))
                .equals(e("client_id"))
                .and(Expr::col(st("mutation_id")).equals(e("mutation_id"))),
        )
        .order_by(e("created_at"), Order::Asc)
        .order_by(e("client_id"), Order::Asc)
        .order_by(e("mutation_id"), Order::Asc)
        // The drivers bind a limit as a signed integer (a larger one panics inside them).
        .limit(Ord::min(limit, i64::MAX as u64))
        .to_owned()
}

/// One retained change of a document: `syncgate admin history`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct HistoryEntry {
    /// The document's version this change made (its seq).
    pub version: u64,
    /// `upsert` or `delete`.
    pub op: &'static str,
    /// The body it left (`null`: a delete).
    pub body: Option<Body>,
    /// The client whose mutation made it.
    pub origin_client: Option<String>,
    /// That mutation's id.
    pub origin_mutation: Option<u64>,
    /// When it was committed (Unix milliseconds).
    pub committed_at_ms: u64,
}

/// A conflict decision as the audit holds it (`sg_conflicts`): `syncgate admin conflicts`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ConflictRecord {
    /// The conflict's id, `<mutation_id>@<client_id>` (what a `manual` resolution names).
    pub id: String,
    /// The collection.
    pub collection: String,
    /// The document id.
    pub doc_id: String,
    /// The policy (resolver) that decided.
    pub policy: String,
    /// `overwrote`, `kept_server`, `merged`, `refused` or `open` (a `manual` conflict).
    pub outcome: String,
    /// `open` (a `manual` conflict waiting for its resolution), `resolved` or `closed`.
    pub state: String,
    /// The writer whose mutation conflicted.
    pub client_id: String,
    /// Its mutation id.
    pub mutation_id: u64,
    /// The version the writer had seen.
    pub base_version: u64,
    /// The document's version when the mutation arrived.
    pub server_version: u64,
    /// The server's body then (`null`: deleted).
    pub server_body: Option<Body>,
    /// The body the mutation would have left (`null`: a delete).
    pub client_body: Option<Body>,
    /// The version the decision wrote (`null`: refused).
    pub applied_version: Option<u64>,
    /// The other clients whose changes after the base version were concurrent.
    pub other_clients: Vec<String>,
    /// The mutation that resolved it, `<mutation_id>@<client_id>`.
    pub resolved_by: Option<String>,
    /// The version the resolution wrote.
    pub resolved_version: Option<u64>,
    /// When it was recorded (Unix milliseconds).
    pub created_at_ms: u64,
    /// When it was resolved (Unix milliseconds).
    pub resolved_at_ms: Option<u64>,
}

/// A rejected mutation as stored (`sg_sync_errors`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SyncError {
    /// `open`, or `discarded` (dealt with: `syncgate admin sync-errors discard`).
    pub state: String,
    /// The client that pushed it.
    pub client_id: String,
    /// Its id.
    pub mutation_id: u64,
    /// The batch it came in.
    pub batch: u64,
    /// The rejection's code.
    pub code: u16,
    /// Why, for a person.
    pub reason: String,
    /// The whole mutation.
    pub mutation: syncgate_protocol::Mutation,
    /// When it was rejected (Unix milliseconds).
    pub created_at_ms: u64,
}

fn conflict_record(r: &QueryResult) -> Result<ConflictRecord, StoreError> {
    let body = |col: &str| -> Result<Option<Body>, StoreError> {
        let raw: Option<Vec<u8>> = r.try_get("", col)?;
        decode_body(raw.as_deref())
    };
    let opt_u64 = |col: &str| -> Result<Option<u64>, StoreError> {
        Ok(r.try_get::<Option<i64>>("", col)?.map(|v| v as u64))
    };
    let client_id: String = r.try_get("", "client_id")?;
    let mutation_id = r.try_get::<i64>("", "mutation_id")? as u64;
    let others: String = r.try_get("", "other_clients")?;
    Ok(ConflictRecord {
        id: crate::conflict::conflict_id(&client_id, mutation_id),
        collection: r.try_get("", "collection")?,
        doc_id: r.try_get("", "doc_id")?,
        policy: r.try_get("", "policy")?,
        outcome: r.try_get("", "outcome")?,
        state: r.try_get("", "state")?,
        client_id,
        mutation_id,
        base_version: r.try_get::<i64>("", "base_version")? as u64,
        server_version: r.try_get::<i64>("", "server_version")? as u64,
        server_body: body("server_body")?,
        client_body: body("client_body")?,
        applied_version: opt_u64("applied_version")?,
        other_clients: others
            .split('\n')
            .filter(|o| !o.is_empty())
            .map(str::to_owned)
            .collect(),
        resolved_by: r.try_get("", "resolved_by")?,
        resolved_version: opt_u64("resolved_version")?,
        created_at_ms: r.try_get::<i64>("", "created_at")? as u64,
        resolved_at_ms: opt_u64("resolved_at")?,
    })
}

fn decode_body(bytes: Option<&[u8]>) -> Result<Option<Body>, StoreError> {
    bytes
        .map(|b| from_msgpack::<Body>(b).map_err(|e| StoreError::Corrupt(format!("body: {e}"))))
        .transpose()
}

fn entry_from_row(r: &QueryResult) -> Result<LogEntry, StoreError> {
    let body: Option<Vec<u8>> = r.try_get("", "body")?;
    let prev: Option<Vec<u8>> = r.try_get("", "prev_body")?;
    let op = match r.try_get::<i64>("", "op")? {
        0 => ChangeOp::Upsert,
        1 => ChangeOp::Delete,
        other => return Err(StoreError::Corrupt(format!("op {other}"))),
    };
    // The stored body bytes are spliced into the change's encoding, not serialised again.
    Ok(LogEntry::with_encoded_body(
        Change {
            seq: r.try_get::<i64>("", "seq")? as u64,
            collection: r.try_get("", "collection")?,
            id: r.try_get("", "doc_id")?,
            op,
            body: decode_body(body.as_deref())?,
        },
        decode_body(prev.as_deref())?,
        body.as_deref(),
    ))
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Transactions are used by the submodules through this alias.
pub(crate) use sea_orm::DatabaseTransaction as Txn;

impl Store {
    pub(crate) async fn begin(&self) -> Result<Txn, DbErr> {
        self.db.begin().await
    }

    pub(crate) fn backend(&self) -> DbBackend {
        self.backend
    }

    /// The connection pool now: `(open, idle, max)` connections.
    pub fn pool_stats(&self) -> (u32, u32, u32) {
        fn of<DB: sea_orm::sqlx::Database>(p: &sea_orm::sqlx::Pool<DB>) -> (u32, u32, u32) {
            let idle = u32::try_from(p.num_idle()).unwrap_or(u32::MAX);
            (p.size(), idle, p.options().get_max_connections())
        }
        match self.backend {
            DbBackend::Postgres => of(self.db.get_postgres_connection_pool()),
            _ => of(self.db.get_sqlite_connection_pool()),
        }
    }

    /// Waits for this process's turn to write the log (SQLite; see `Store::log_writer`): the
    /// log writers' connection, held until the guard drops.
    pub(crate) async fn log_writer_turn(
        &self,
    ) -> Option<tokio::sync::OwnedMutexGuard<DatabaseConnection>> {
        match &self.log_writer {
            Some(m) => Some(m.clone().lock_owned().await),
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ended_sessions_and_starting_servers_are_transient_wrong_settings_are_not() {
        for code in ["57P01", "57P03", "08006", "08001", "53300"] {
            assert!(transient_sqlstate(code), "{code}");
        }
        // Wrong password, unknown database, missing table, unique violation.
        for code in ["28P01", "3D000", "42P01", "23505"] {
            assert!(!transient_sqlstate(code), "{code}");
        }
        let refused = StoreError::Db(DbErr::Conn(sea_orm::RuntimeErr::SqlxError(Arc::new(
            sea_orm::sqlx::Error::Io(std::io::ErrorKind::ConnectionRefused.into()),
        ))));
        assert!(refused.is_transient());
        assert!(!StoreError::Corrupt("x".into()).is_transient());
    }

    /// `PRAGMA data_version` on a connection: changes when another connection committed
    /// since this one last asked (and only then).
    async fn data_version(db: &impl ConnectionTrait) -> i64 {
        let row = db
            .query_one_raw(sea_orm::Statement::from_string(
                DbBackend::Sqlite,
                "PRAGMA data_version",
            ))
            .await
            .unwrap()
            .unwrap();
        row.try_get_by_index::<i64>(0).unwrap()
    }

    #[tokio::test]
    async fn every_group_commit_on_sqlite_writes_through_the_one_log_writer_connection() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("log.db").display());
        let store = Store::open(&url, 4, crate::config::SqliteSynchronous::Normal)
            .await
            .unwrap();
        let writer = store.log_writer.clone().unwrap();
        // A connection of the pool (a reader), held throughout.
        let mut reader = store
            .db
            .get_sqlite_connection_pool()
            .acquire()
            .await
            .unwrap();
        let pragma = || sea_orm::sqlx::query_scalar::<_, i64>("PRAGMA data_version");
        let reader_before = pragma().fetch_one(&mut *reader).await.unwrap();
        let writer_before = data_version(&*writer.lock().await).await;
        for _ in 0..3 {
            let group = store.begin_group().await.unwrap();
            let head = group.head();
            group.commit(&GroupRows::default(), head + 1).await.unwrap();
        }
        assert_eq!(store.head().await.unwrap(), 3);
        // The writer saw no other connection's commit: all three were its own, so its page
        // cache stayed valid; the pool's connections saw them as someone else's.
        assert_eq!(data_version(&*writer.lock().await).await, writer_before);
        assert_ne!(
            pragma().fetch_one(&mut *reader).await.unwrap(),
            reader_before
        );
        drop(reader);
        store.close().await;
    }
}
