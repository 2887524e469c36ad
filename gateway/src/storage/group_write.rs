//! The group-commit transaction: the I/O half of ingest. It locks the log head, reads what the
//! planner ([`crate::ingest::plan`]) needs, writes the rows the plan made, and commits.
//!
//! Every mutation either writes exactly one change (and gets `applied(seq)`) or is rejected and
//! stored in `sg_sync_errors` with its whole body and the reason. Either way the client's
//! `last_mutation` advances in the same transaction, so a replay finds the earlier outcome
//! (from `sg_changes` by origin, or from `sg_sync_errors`) and gets the identical result.
//!
//! Every read is one statement per chunk of keys, never one per mutation: on PostgreSQL each
//! statement is a round trip made while the log head is locked for every node.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use sea_orm::sea_query::{ArrayType, Cond, Expr, ExprTrait, OnConflict, Order, Query};
use sea_orm::{ConnectionTrait, DbBackend, QueryResult, Statement, Value as DbValue};
use syncgate_protocol::{Body, ChangeOp, ErrorCode, MutationResult, MutationStatus};

use super::{LogEntry, NOTIFY_CHANNEL, Store, StoreError, Txn, decode_body, now_ms};
use crate::conflict::{Outcome, conflict_id, refusal_reason};
use syncgate_protocol::ConflictInfo;

/// A document as stored before the group: its decoded body, the bytes it is stored as (passed
/// on as the next change's previous body without encoding it again), version and tombstone.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredDoc {
    /// The body (`None` for a tombstone).
    pub body: Option<Body>,
    /// The body as stored (MessagePack).
    pub encoded: Option<Bytes>,
    /// The document's version (the seq of its last change).
    pub version: u64,
    /// Whether the document is deleted.
    pub deleted: bool,
}

/// A client id's exactly-once record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredClient {
    /// The highest mutation id handled.
    pub last_mutation: u64,
    /// The user that owns the client id.
    pub owner: String,
}

/// The stored outcome of a mutation handled by an earlier group.
#[derive(Debug, Clone, PartialEq)]
pub enum Earlier {
    /// It wrote the change at `seq`.
    Applied {
        /// The change's seq (the document's version it made).
        seq: u64,
    },
    /// It was rejected (stored in `sg_sync_errors`).
    Rejected {
        /// The numeric error code.
        code: u16,
        /// The reason given then.
        reason: String,
    },
    /// It was refused by a conflict (stored in `sg_conflicts`).
    Conflict(Box<RefusedConflict>),
}

/// A mutation refused by a conflict, as `sg_conflicts` holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct RefusedConflict {
    /// The conflict's id, if it is a `manual` one.
    pub id: Option<String>,
    /// The collection.
    pub collection: String,
    /// The document id.
    pub doc_id: String,
    /// The policy that refused it.
    pub policy: String,
    /// The mutation's base version.
    pub base_version: u64,
    /// The server's version then.
    pub server_version: u64,
    /// The server's body then.
    pub server_body: Option<Body>,
}

impl Earlier {
    /// The result the client was given then, given again.
    pub fn result(&self, mutation_id: u64) -> MutationResult {
        match self {
            Earlier::Applied { seq } => MutationResult::applied(mutation_id, *seq),
            Earlier::Rejected { code, reason } => MutationResult {
                mutation_id,
                status: MutationStatus::Rejected,
                version: None,
                code: Some(*code),
                reason: Some(reason.clone()),
                conflict: None,
            },
            Earlier::Conflict(c) => MutationResult::conflict(
                mutation_id,
                refusal_reason(
                    &c.collection,
                    &c.doc_id,
                    &c.policy,
                    c.base_version,
                    c.server_version,
                ),
                ConflictInfo {
                    id: c.id.clone(),
                    version: c.server_version,
                    body: c.server_body.clone(),
                },
            ),
        }
    }
}

/// A change of one document after some version, as conflict detection reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryRow {
    /// The change's seq.
    pub seq: u64,
    /// The client whose mutation made it.
    pub origin_client: Option<String>,
    /// The body it left (`None`: a delete).
    pub body: Option<Body>,
    /// The body before it (`None`: the document did not exist or was deleted).
    pub prev_body: Option<Body>,
}

/// A conflict decision to record in `sg_conflicts` (the audit).
#[derive(Debug, PartialEq)]
pub struct ConflictRow {
    /// The writer.
    pub client_id: String,
    /// The writer's mutation.
    pub mutation_id: u64,
    /// The collection.
    pub collection: String,
    /// The document id.
    pub id: String,
    /// The resolver's name.
    pub policy: String,
    /// What the decision did.
    pub outcome: Outcome,
    /// The mutation's base version.
    pub base_version: u64,
    /// The document's version before the decision.
    pub server_version: u64,
    /// The server's body before the decision (MessagePack; `None`: deleted).
    pub server_body: Option<Bytes>,
    /// The body the mutation would have left (MessagePack; `None`: a delete).
    pub client_body: Option<Bytes>,
    /// The version the decision wrote, if it applied anything.
    pub applied_version: Option<u64>,
    /// The other clients whose changes since the base were concurrent.
    pub other_clients: Vec<String>,
}

/// An open `manual` conflict closed by a resolving mutation.
#[derive(Debug, PartialEq, Eq)]
pub struct ResolutionRow {
    /// The conflict's writer.
    pub client_id: String,
    /// The conflict's mutation.
    pub mutation_id: u64,
    /// The resolving mutation, as `<mutation_id>@<client_id>`.
    pub resolved_by: String,
    /// The version the resolution wrote.
    pub version: u64,
}

/// A recorded conflict, as a resolving mutation looks it up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredConflict {
    /// The collection.
    pub collection: String,
    /// The document id.
    pub doc_id: String,
    /// Whether it is open (a `manual` conflict not yet resolved).
    pub open: bool,
}

/// A change to write to `sg_changes`, with its origin (for replays).
#[derive(Debug)]
pub struct ChangeRow {
    /// The change, as it is fanned out.
    pub entry: Arc<LogEntry>,
    /// The new body, encoded once by the planner.
    pub body: Option<Bytes>,
    /// The body before the change, as it was stored.
    pub prev_body: Option<Bytes>,
    /// The client whose mutation made it.
    pub origin_client: String,
    /// That mutation's id.
    pub origin_mutation: u64,
}

/// A document's final state in the group, for `sg_documents`.
#[derive(Debug, PartialEq)]
pub struct DocumentRow {
    /// The collection.
    pub collection: String,
    /// The document id.
    pub id: String,
    /// The body, encoded (`None` for a tombstone).
    pub body: Option<Bytes>,
    /// The new version.
    pub version: u64,
    /// Whether it is now deleted.
    pub deleted: bool,
}

/// A rejected mutation to write to `sg_sync_errors`: kept whole, with the reason.
#[derive(Debug, PartialEq)]
pub struct RejectionRow {
    /// The pushing client.
    pub client_id: String,
    /// The mutation's id.
    pub mutation_id: u64,
    /// The batch it came in.
    pub batch: u64,
    /// Why.
    pub code: ErrorCode,
    /// Why, for humans.
    pub reason: String,
    /// The whole mutation, MessagePack.
    pub mutation: Vec<u8>,
}

/// A client's new horizon, for `sg_clients`.
#[derive(Debug, PartialEq, Eq)]
pub struct ClientRow {
    /// The client.
    pub client_id: String,
    /// Its last handled mutation id.
    pub last_mutation: u64,
    /// The user it last pushed as.
    pub user: String,
}

/// What a group changes in one user's usage (`sg_usage`, for per-user quotas).
#[derive(Debug, PartialEq, Eq)]
pub struct UsageRow {
    /// The user.
    pub user: String,
    /// Documents created minus documents deleted.
    pub documents: i64,
    /// Rejected mutations stored.
    pub sync_errors: i64,
}

/// Every row a group writes.
#[derive(Debug, Default)]
pub struct GroupRows {
    /// New changes, in seq order.
    pub changes: Vec<ChangeRow>,
    /// The final state of every document the group changed.
    pub documents: Vec<DocumentRow>,
    /// Rejected mutations.
    pub rejections: Vec<RejectionRow>,
    /// Every pushing client's new horizon.
    pub clients: Vec<ClientRow>,
    /// Usage changes per user (only users whose usage changed).
    pub usage: Vec<UsageRow>,
    /// Conflict decisions to audit.
    pub conflicts: Vec<ConflictRow>,
    /// `manual` conflicts resolved by the group.
    pub resolutions: Vec<ResolutionRow>,
}

const INSERT_CHUNK: usize = 200;

/// An open group-commit transaction holding the log head lock. Dropped without
/// [`GroupTxn::commit`], it rolls back.
pub struct GroupTxn {
    txn: Txn,
    backend: DbBackend,
    head: u64,
    /// This process's turn to write the log (SQLite), until commit or rollback.
    _turn: Option<tokio::sync::OwnedMutexGuard<sea_orm::DatabaseConnection>>,
    /// How long the group waited for that turn (`None`: no turn, PostgreSQL).
    turn_wait: Option<std::time::Duration>,
}

impl Store {
    /// Begins a group: opens a transaction and locks the log head (see the module docs of
    /// [`crate::storage`]); every other writer, on every node, waits until it ends.
    pub async fn begin_group(&self) -> Result<GroupTxn, StoreError> {
        let backend = self.backend();
        let asked = std::time::Instant::now();
        let turn = self.log_writer_turn().await;
        let turn_wait = turn.as_ref().map(|_| asked.elapsed());
        let txn = match &turn {
            Some(writer) => sea_orm::TransactionTrait::begin(&**writer).await?,
            None => self.begin().await?,
        };
        let lock = Query::update()
            .table("sg_head")
            .value("seq", Expr::col("seq"))
            .and_where(Expr::col("id").eq(1))
            .returning_col("seq")
            .to_owned();
        let head = txn
            .query_one_raw(backend.build(&lock))
            .await?
            .ok_or_else(|| StoreError::Corrupt("sg_head has no row".into()))?
            .try_get::<i64>("", "seq")? as u64;
        Ok(GroupTxn {
            txn,
            backend,
            head,
            _turn: turn,
            turn_wait,
        })
    }
}

impl GroupTxn {
    /// The log head, as locked.
    pub fn head(&self) -> u64 {
        self.head
    }

    /// How long the group waited for this process's log-writer turn (SQLite: the turn a
    /// compaction transaction holds); `None` on PostgreSQL, which has no turn.
    pub fn turn_wait(&self) -> Option<std::time::Duration> {
        self.turn_wait
    }

    /// Each client's last handled mutation id and owner (absent: the client id was never
    /// used).
    pub async fn clients(
        &self,
        clients: &[&str],
    ) -> Result<HashMap<String, StoredClient>, StoreError> {
        let mut lasts = HashMap::new();
        for chunk in clients.chunks(INSERT_CHUNK) {
            let select = Query::select()
                .columns(["client_id", "last_mutation", "user_id"])
                .from("sg_clients")
                .and_where(Expr::col("client_id").is_in(chunk.iter().copied()))
                .to_owned();
            for r in self.txn.query_all_raw(self.backend.build(&select)).await? {
                lasts.insert(
                    r.try_get::<String>("", "client_id")?,
                    StoredClient {
                        last_mutation: r.try_get::<i64>("", "last_mutation")? as u64,
                        owner: r.try_get("", "user_id")?,
                    },
                );
            }
        }
        Ok(lasts)
    }

    /// What each of `users` holds (`sg_usage`; absent: nothing): documents created minus
    /// deleted, and rejections stored.
    pub async fn usage(&self, users: &[&str]) -> Result<HashMap<String, (i64, i64)>, StoreError> {
        let mut held = HashMap::new();
        for chunk in users.chunks(INSERT_CHUNK) {
            let select = Query::select()
                .columns(["user_id", "documents", "sync_errors"])
                .from("sg_usage")
                .and_where(Expr::col("user_id").is_in(chunk.iter().copied()))
                .to_owned();
            for r in self.txn.query_all_raw(self.backend.build(&select)).await? {
                held.insert(
                    r.try_get::<String>("", "user_id")?,
                    (
                        r.try_get::<i64>("", "documents")?,
                        r.try_get::<i64>("", "sync_errors")?,
                    ),
                );
            }
        }
        Ok(held)
    }

    /// The stored state of the given documents that exist: collection -> id -> state.
    pub async fn documents(
        &self,
        keys: &[(&str, &str)],
    ) -> Result<HashMap<String, HashMap<String, StoredDoc>>, StoreError> {
        // Grouped by collection: `collection = ? AND doc_id IN (...)` is one index range scan
        // on both backends (a row-value `IN` list is planned as one OR branch per key).
        let mut by_collection: HashMap<&str, Vec<&str>> = HashMap::new();
        for (c, id) in keys {
            by_collection.entry(c).or_default().push(id);
        }
        let mut out: HashMap<String, HashMap<String, StoredDoc>> = HashMap::new();
        for (collection, ids) in by_collection {
            let docs = out.entry(collection.to_owned()).or_default();
            let lookup = Lookup {
                columns: &["doc_id", "body", "version", "deleted"],
                table: "sg_documents",
                prefix_col: "collection",
                prefix: collection,
                key_col: "doc_id",
            };
            for r in self.keyed_rows(&lookup, KeyList::Text(&ids)).await? {
                let raw: Option<Vec<u8>> = r.try_get("", "body")?;
                docs.insert(
                    r.try_get::<String>("", "doc_id")?,
                    StoredDoc {
                        body: decode_body(raw.as_deref())?,
                        encoded: raw.map(Bytes::from),
                        version: r.try_get::<i64>("", "version")? as u64,
                        deleted: r.try_get::<i64>("", "deleted")? != 0,
                    },
                );
            }
        }
        Ok(out)
    }

    /// The stored outcomes of a client's earlier mutations (replays): mutation id -> outcome,
    /// for those ids that have one. One statement per chunk of ids and table.
    pub async fn earlier_outcomes(
        &self,
        client_id: &str,
        ids: &[u64],
    ) -> Result<HashMap<u64, Earlier>, StoreError> {
        let mut out = HashMap::new();
        let ids: Vec<i64> = ids.iter().map(|id| *id as i64).collect();
        let applied = Lookup {
            columns: &["origin_mutation", "seq"],
            table: "sg_changes",
            prefix_col: "origin_client",
            prefix: client_id,
            key_col: "origin_mutation",
        };
        for r in self.keyed_rows(&applied, KeyList::BigInt(&ids)).await? {
            let seq = r.try_get::<i64>("", "seq")? as u64;
            out.insert(
                r.try_get::<i64>("", "origin_mutation")? as u64,
                Earlier::Applied { seq },
            );
        }
        let mut rest: Vec<i64> = ids
            .into_iter()
            .filter(|id| !out.contains_key(&(*id as u64)))
            .collect();
        if !rest.is_empty() {
            // Changes removed by compaction left their record here (read after the log: a
            // compaction moves the record and removes the change in one transaction).
            let compacted = Lookup {
                columns: &["mutation_id", "seq"],
                table: "sg_applied",
                prefix_col: "client_id",
                prefix: client_id,
                key_col: "mutation_id",
            };
            for r in self.keyed_rows(&compacted, KeyList::BigInt(&rest)).await? {
                let seq = r.try_get::<i64>("", "seq")? as u64;
                out.insert(
                    r.try_get::<i64>("", "mutation_id")? as u64,
                    Earlier::Applied { seq },
                );
            }
            rest.retain(|id| !out.contains_key(&(*id as u64)));
        }
        let rejected = Lookup {
            columns: &["mutation_id", "code", "reason"],
            table: "sg_sync_errors",
            prefix_col: "client_id",
            prefix: client_id,
            key_col: "mutation_id",
        };
        for r in self.keyed_rows(&rejected, KeyList::BigInt(&rest)).await? {
            let rejected = Earlier::Rejected {
                code: r.try_get::<i64>("", "code")? as u16,
                reason: r.try_get("", "reason")?,
            };
            out.insert(r.try_get::<i64>("", "mutation_id")? as u64, rejected);
        }
        let rest: Vec<i64> = rest
            .into_iter()
            .filter(|id| !out.contains_key(&(*id as u64)))
            .collect();
        let refused = Lookup {
            columns: &[
                "mutation_id",
                "collection",
                "doc_id",
                "policy",
                "outcome",
                "base_version",
                "server_version",
                "server_body",
            ],
            table: "sg_conflicts",
            prefix_col: "client_id",
            prefix: client_id,
            key_col: "mutation_id",
        };
        for r in self.keyed_rows(&refused, KeyList::BigInt(&rest)).await? {
            let outcome: String = r.try_get("", "outcome")?;
            let Some(outcome) = Outcome::parse(&outcome).filter(|o| o.refused()) else {
                continue;
            };
            let mutation_id = r.try_get::<i64>("", "mutation_id")? as u64;
            let raw: Option<Vec<u8>> = r.try_get("", "server_body")?;
            let refused = RefusedConflict {
                id: (outcome == Outcome::Open).then(|| conflict_id(client_id, mutation_id)),
                collection: r.try_get("", "collection")?,
                doc_id: r.try_get("", "doc_id")?,
                policy: r.try_get("", "policy")?,
                base_version: r.try_get::<i64>("", "base_version")? as u64,
                server_version: r.try_get::<i64>("", "server_version")? as u64,
                server_body: decode_body(raw.as_deref())?,
            };
            out.insert(mutation_id, Earlier::Conflict(Box::new(refused)));
        }
        Ok(out)
    }

    /// The changes of each document after a version: `(collection, id, after)` ->
    /// (collection, id) -> its changes with `seq > after`, in seq order. For conflict
    /// detection; read only for documents changed since a mutation's base version.
    pub async fn history(
        &self,
        keys: &[(&str, &str, u64)],
    ) -> Result<HashMap<(String, String), Vec<HistoryRow>>, StoreError> {
        let mut out: HashMap<(String, String), Vec<HistoryRow>> = HashMap::new();
        for chunk in keys.chunks(50) {
            let mut any = Cond::any();
            for (c, id, after) in chunk {
                any = any.add(
                    Expr::col("collection")
                        .eq(*c)
                        .and(Expr::col("doc_id").eq(*id))
                        .and(Expr::col("seq").gt(*after as i64)),
                );
            }
            let select = Query::select()
                .columns([
                    "seq",
                    "collection",
                    "doc_id",
                    "origin_client",
                    "body",
                    "prev_body",
                ])
                .from("sg_changes")
                .cond_where(any)
                .order_by("seq", Order::Asc)
                .to_owned();
            for r in self.txn.query_all_raw(self.backend.build(&select)).await? {
                let body: Option<Vec<u8>> = r.try_get("", "body")?;
                let prev: Option<Vec<u8>> = r.try_get("", "prev_body")?;
                out.entry((r.try_get("", "collection")?, r.try_get("", "doc_id")?))
                    .or_default()
                    .push(HistoryRow {
                        seq: r.try_get::<i64>("", "seq")? as u64,
                        origin_client: r.try_get("", "origin_client")?,
                        body: decode_body(body.as_deref())?,
                        prev_body: decode_body(prev.as_deref())?,
                    });
            }
        }
        Ok(out)
    }

    /// The compaction horizons of `collections` (absent: never compacted). Read after
    /// [`GroupTxn::history`]: changes found missing there come with the horizon that explains
    /// them (see `storage::compaction`).
    pub async fn horizons(&self, collections: &[&str]) -> Result<HashMap<String, u64>, StoreError> {
        let mut out = HashMap::new();
        if collections.is_empty() {
            return Ok(out);
        }
        let select = Query::select()
            .columns(["collection", "seq"])
            .from("sg_horizons")
            .and_where(Expr::col("collection").is_in(collections.iter().copied()))
            .to_owned();
        for r in self.txn.query_all_raw(self.backend.build(&select)).await? {
            out.insert(
                r.try_get::<String>("", "collection")?,
                r.try_get::<i64>("", "seq")? as u64,
            );
        }
        Ok(out)
    }

    /// The collections captured from PostgreSQL tables (`storage::capture`): collection ->
    /// table. Read under the head lock, which attaching and detaching also take. SQLite
    /// never captures.
    pub async fn captured(&self) -> Result<HashMap<String, String>, StoreError> {
        let mut out = HashMap::new();
        if self.backend != DbBackend::Postgres {
            return Ok(out);
        }
        let select = Query::select()
            .columns(["collection", "table_name"])
            .from("sg_captures")
            .to_owned();
        for r in self.txn.query_all_raw(self.backend.build(&select)).await? {
            out.insert(r.try_get("", "collection")?, r.try_get("", "table_name")?);
        }
        Ok(out)
    }

    /// The recorded conflicts that resolving mutations name: (client id, mutation id) ->
    /// the conflict, for those that exist.
    pub async fn conflicts(
        &self,
        keys: &[(&str, u64)],
    ) -> Result<HashMap<(String, u64), StoredConflict>, StoreError> {
        let mut out = HashMap::new();
        for chunk in keys.chunks(50) {
            let mut any = Cond::any();
            for (client, mutation) in chunk {
                any = any.add(
                    Expr::col("client_id")
                        .eq(*client)
                        .and(Expr::col("mutation_id").eq(*mutation as i64)),
                );
            }
            let select = Query::select()
                .columns(["client_id", "mutation_id", "collection", "doc_id", "state"])
                .from("sg_conflicts")
                .cond_where(any)
                .to_owned();
            for r in self.txn.query_all_raw(self.backend.build(&select)).await? {
                let state: String = r.try_get("", "state")?;
                out.insert(
                    (
                        r.try_get("", "client_id")?,
                        r.try_get::<i64>("", "mutation_id")? as u64,
                    ),
                    StoredConflict {
                        collection: r.try_get("", "collection")?,
                        doc_id: r.try_get("", "doc_id")?,
                        open: state == "open",
                    },
                );
            }
        }
        Ok(out)
    }

    /// Writes the rows, moves the head to `new_head` (announcing it on PostgreSQL) and commits.
    pub async fn commit(self, rows: &GroupRows, new_head: u64) -> Result<(), StoreError> {
        write_rows(&self.txn, self.backend, rows).await?;
        if new_head != self.head {
            let update = Query::update()
                .table("sg_head")
                .value("seq", new_head as i64)
                .and_where(Expr::col("id").eq(1))
                .to_owned();
            self.txn.execute_raw(self.backend.build(&update)).await?;
            if self.backend == DbBackend::Postgres {
                self.txn
                    .execute_raw(Statement::from_sql_and_values(
                        DbBackend::Postgres,
                        "SELECT pg_notify($1, $2)",
                        [NOTIFY_CHANNEL.into(), new_head.to_string().into()],
                    ))
                    .await?;
            }
        }
        self.txn.commit().await?;
        Ok(())
    }

    /// The rows of [`GroupTxn::keyed_select`] for every chunk of `keys`.
    async fn keyed_rows(
        &self,
        lookup: &Lookup<'_>,
        keys: KeyList<'_>,
    ) -> Result<Vec<QueryResult>, StoreError> {
        let mut rows = Vec::new();
        for chunk in keys.chunks(self.keys_per_statement()) {
            let statement = self.keyed_select(lookup, chunk);
            rows.extend(self.txn.query_all_raw(statement).await?);
        }
        Ok(rows)
    }

    fn keys_per_statement(&self) -> usize {
        if self.backend == DbBackend::Postgres {
            1000
        } else {
            100
        }
    }

    /// `SELECT columns FROM table WHERE prefix_col = prefix AND key_col IN keys`.
    ///
    /// PostgreSQL takes the keys as one array parameter, each looked up through a `LATERAL`
    /// subquery on both key columns: an index lookup per key whatever the planner believes
    /// about the table. (`key IN (...)` or `= ANY(...)` were planned, with the statistics of a
    /// fast-growing table, as a scan of every row of the prefix filtered by key: 54 ms instead
    /// of 2 ms for 1,000 ids at 200,000 documents.) SQLite gets an `IN` list, which it always
    /// answers from the index.
    fn keyed_select(&self, lookup: &Lookup<'_>, keys: KeyList<'_>) -> Statement {
        let Lookup {
            columns,
            table,
            prefix_col,
            prefix,
            key_col,
        } = *lookup;
        if self.backend == DbBackend::Postgres {
            let (array, cast) = match keys {
                KeyList::Text(k) => (
                    DbValue::Array(
                        ArrayType::String,
                        Some(Box::new(k.iter().map(|v| DbValue::from(*v)).collect())),
                    ),
                    "text[]",
                ),
                KeyList::BigInt(k) => (
                    DbValue::Array(
                        ArrayType::BigInt,
                        Some(Box::new(k.iter().map(|v| DbValue::from(*v)).collect())),
                    ),
                    "bigint[]",
                ),
            };
            let columns = columns.join(", ");
            Statement::from_sql_and_values(
                DbBackend::Postgres,
                format!(
                    "SELECT d.* FROM unnest($1::{cast}) AS k(v) CROSS JOIN LATERAL \
                     (SELECT {columns} FROM {table} WHERE {prefix_col} = $2 AND {key_col} = k.v \
                     OFFSET 0) AS d"
                ),
                [array, DbValue::from(prefix)],
            )
        } else {
            let in_list: Vec<DbValue> = match keys {
                KeyList::Text(k) => k.iter().map(|v| DbValue::from(*v)).collect(),
                KeyList::BigInt(k) => k.iter().map(|v| DbValue::from(*v)).collect(),
            };
            let select = Query::select()
                .columns(columns.iter().copied())
                .from(table)
                .and_where(Expr::col(prefix_col).eq(prefix))
                .and_where(Expr::col(key_col).is_in(in_list))
                .to_owned();
            self.backend.build(&select)
        }
    }
}

/// What a [`GroupTxn::keyed_select`] reads: `columns` of `table` where `prefix_col` equals
/// `prefix` and `key_col` is one of the keys (an index on `(prefix_col, key_col)` serves it).
#[derive(Clone, Copy)]
struct Lookup<'a> {
    columns: &'a [&'static str],
    table: &'static str,
    prefix_col: &'static str,
    prefix: &'a str,
    key_col: &'static str,
}

/// The keys of a [`GroupTxn::keyed_select`].
#[derive(Clone, Copy)]
enum KeyList<'a> {
    Text(&'a [&'a str]),
    BigInt(&'a [i64]),
}

impl<'a> KeyList<'a> {
    fn chunks(&self, n: usize) -> Vec<KeyList<'a>> {
        match self {
            KeyList::Text(k) => k.chunks(n).map(KeyList::Text).collect(),
            KeyList::BigInt(k) => k.chunks(n).map(KeyList::BigInt).collect(),
        }
    }
}

/// A multi-row `INSERT` of `rows` into `table` (sea-query writes the placeholders for the
/// backend), with an optional conflict clause.
fn insert(
    backend: DbBackend,
    table: &'static str,
    columns: &[&'static str],
    rows: impl IntoIterator<Item = Vec<DbValue>>,
    on_conflict: Option<OnConflict>,
) -> Result<Statement, StoreError> {
    let mut insert = Query::insert();
    insert.into_table(table).columns(columns.iter().copied());
    for row in rows {
        insert
            .values(row.into_iter().map(Expr::from))
            .map_err(|e| StoreError::Statement(e.to_string()))?;
    }
    if let Some(c) = on_conflict {
        insert.on_conflict(c);
    }
    Ok(backend.build(&insert))
}

async fn write_rows(txn: &Txn, backend: DbBackend, rows: &GroupRows) -> Result<(), StoreError> {
    let now = now_ms();
    let change_size = |c: &ChangeRow| {
        c.body.as_ref().map_or(0, Bytes::len)
            + c.prev_body.as_ref().map_or(0, Bytes::len)
            + c.origin_client.len()
            + 64
    };
    for chunk in byte_chunks(&rows.changes, change_size) {
        let values = chunk.iter().map(|row| {
            let c = &row.entry.change;
            vec![
                (c.seq as i64).into(),
                c.collection.clone().into(),
                c.id.clone().into(),
                i64::from(c.op == ChangeOp::Delete).into(),
                row.body.as_ref().map(|b| b.to_vec()).into(),
                row.prev_body.as_ref().map(|b| b.to_vec()).into(),
                row.origin_client.clone().into(),
                (row.origin_mutation as i64).into(),
                now.into(),
            ]
        });
        let columns = [
            "seq",
            "collection",
            "doc_id",
            "op",
            "body",
            "prev_body",
            "origin_client",
            "origin_mutation",
            "committed_at",
        ];
        let statement = insert(backend, "sg_changes", &columns, values, None)?;
        txn.execute_raw(statement).await?;
    }
    let doc_size = |d: &DocumentRow| {
        d.collection.len() + d.id.len() + d.body.as_ref().map_or(0, Bytes::len) + 32
    };
    for chunk in byte_chunks(&rows.documents, doc_size) {
        let values = chunk.iter().map(|d| {
            vec![
                d.collection.clone().into(),
                d.id.clone().into(),
                d.body.as_ref().map(|b| b.to_vec()).into(),
                (d.version as i64).into(),
                i64::from(d.deleted).into(),
            ]
        });
        let columns = ["collection", "doc_id", "body", "version", "deleted"];
        let upsert = OnConflict::columns(["collection", "doc_id"])
            .update_columns(["body", "version", "deleted"])
            .to_owned();
        let statement = insert(backend, "sg_documents", &columns, values, Some(upsert))?;
        txn.execute_raw(statement).await?;
    }
    let error_size = |e: &RejectionRow| e.client_id.len() + e.reason.len() + e.mutation.len() + 48;
    for chunk in byte_chunks(&rows.rejections, error_size) {
        let values = chunk.iter().map(|e| {
            vec![
                e.client_id.clone().into(),
                (e.mutation_id as i64).into(),
                (e.batch as i64).into(),
                i64::from(e.code.code()).into(),
                e.reason.clone().into(),
                e.mutation.clone().into(),
                now.into(),
            ]
        });
        let columns = [
            "client_id",
            "mutation_id",
            "batch",
            "code",
            "reason",
            "mutation",
            "created_at",
        ];
        let statement = insert(backend, "sg_sync_errors", &columns, values, None)?;
        txn.execute_raw(statement).await?;
    }
    let conflict_size = |c: &ConflictRow| {
        c.server_body.as_ref().map_or(0, Bytes::len)
            + c.client_body.as_ref().map_or(0, Bytes::len)
            + c.client_id.len()
            + c.collection.len()
            + c.id.len()
            + c.other_clients.iter().map(|o| o.len() + 1).sum::<usize>()
            + 96
    };
    for chunk in byte_chunks(&rows.conflicts, conflict_size) {
        let values = chunk.iter().map(|c| {
            let state = if c.outcome == Outcome::Open {
                "open"
            } else {
                "closed"
            };
            vec![
                c.client_id.clone().into(),
                (c.mutation_id as i64).into(),
                c.collection.clone().into(),
                c.id.clone().into(),
                c.policy.clone().into(),
                c.outcome.as_str().into(),
                (c.base_version as i64).into(),
                (c.server_version as i64).into(),
                c.server_body.as_ref().map(|b| b.to_vec()).into(),
                c.client_body.as_ref().map(|b| b.to_vec()).into(),
                c.applied_version.map(|v| v as i64).into(),
                c.other_clients.join("\n").into(),
                state.into(),
                now.into(),
            ]
        });
        let columns = [
            "client_id",
            "mutation_id",
            "collection",
            "doc_id",
            "policy",
            "outcome",
            "base_version",
            "server_version",
            "server_body",
            "client_body",
            "applied_version",
            "other_clients",
            "state",
            "created_at",
        ];
        let statement = insert(backend, "sg_conflicts", &columns, values, None)?;
        txn.execute_raw(statement).await?;
    }
    for r in &rows.resolutions {
        let update = Query::update()
            .table("sg_conflicts")
            .value("state", "resolved")
            .value("resolved_by", r.resolved_by.clone())
            .value("resolved_version", r.version as i64)
            .value("resolved_at", now)
            .and_where(Expr::col("client_id").eq(r.client_id.clone()))
            .and_where(Expr::col("mutation_id").eq(r.mutation_id as i64))
            .and_where(Expr::col("state").eq("open"))
            .to_owned();
        txn.execute_raw(backend.build(&update)).await?;
    }
    for chunk in rows.clients.chunks(INSERT_CHUNK) {
        let values = chunk.iter().map(|c| {
            vec![
                c.client_id.clone().into(),
                (c.last_mutation as i64).into(),
                c.user.clone().into(),
                now.into(),
            ]
        });
        let columns = ["client_id", "last_mutation", "user_id", "updated_at"];
        // The owner (`user_id`) is set when the client id is first used and changed only by
        // an administrator: a push never moves it.
        let upsert = OnConflict::column("client_id")
            .update_columns(["last_mutation", "updated_at"])
            .to_owned();
        let statement = insert(backend, "sg_clients", &columns, values, Some(upsert))?;
        txn.execute_raw(statement).await?;
    }
    for chunk in rows.usage.chunks(INSERT_CHUNK) {
        let values = chunk.iter().map(|u| {
            vec![
                u.user.clone().into(),
                u.documents.into(),
                u.sync_errors.into(),
            ]
        });
        let columns = ["user_id", "documents", "sync_errors"];
        let add = OnConflict::column("user_id")
            .value(
                "documents",
                Expr::cust("sg_usage.documents + excluded.documents"),
            )
            .value(
                "sync_errors",
                Expr::cust("sg_usage.sync_errors + excluded.sync_errors"),
            )
            .to_owned();
        let statement = insert(backend, "sg_usage", &columns, values, Some(add))?;
        txn.execute_raw(statement).await?;
    }
    Ok(())
}

/// Bytes of parameters per multi-row statement. sqlx 0.9.0 leaves Nagle's algorithm on
/// (launchbadge/sqlx#4335): a statement that spans more than one TCP segment waits for the
/// server's delayed ACK, ~40 ms, on every round trip. Statements below one loopback segment
/// (64 KiB) avoid it; on a real network the same bound keeps each statement to a few segments.
const STATEMENT_BYTES: usize = 48 * 1024;

/// Splits `items` into runs of at most [`INSERT_CHUNK`] rows and about [`STATEMENT_BYTES`]
/// bytes (`size` estimates one row); a row larger than the budget goes alone.
fn byte_chunks<T>(items: &[T], size: impl Fn(&T) -> usize) -> Vec<&[T]> {
    let mut out = Vec::new();
    let mut rest = items;
    while !rest.is_empty() {
        let mut n = 0;
        let mut bytes = 0;
        for item in rest.iter().take(INSERT_CHUNK) {
            let s = size(item);
            if n > 0 && bytes + s > STATEMENT_BYTES {
                break;
            }
            bytes += s;
            n += 1;
        }
        let (chunk, tail) = rest.split_at(n);
        out.push(chunk);
        rest = tail;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_chunks_bound_rows_and_bytes() {
        let items: Vec<usize> = vec![10; 450];
        let sizes: Vec<usize> = byte_chunks(&items, |x| *x)
            .iter()
            .map(|c| c.len())
            .collect();
        assert_eq!(sizes, vec![INSERT_CHUNK, INSERT_CHUNK, 50]);
        let big = vec![STATEMENT_BYTES / 2 + 1; 5];
        let sizes: Vec<usize> = byte_chunks(&big, |x| *x).iter().map(|c| c.len()).collect();
        assert_eq!(sizes, vec![1, 1, 1, 1, 1]);
        let huge = vec![STATEMENT_BYTES * 3];
        assert_eq!(byte_chunks(&huge, |x| *x).len(), 1);
        assert!(byte_chunks(&Vec::<usize>::new(), |x| *x).is_empty());
    }
}
