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
use sea_orm::sea_query::ArrayType;
use sea_orm::{ConnectionTrait, DbBackend, QueryResult, Value as DbValue};
use syncgate_protocol::{Body, ErrorCode, MutationResult, MutationStatus};

use super::{LogEntry, NOTIFY_CHANNEL, Store, StoreError, Txn, decode_body, now_ms, stmt};

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

/// The stored outcome of a mutation handled by an earlier group.
#[derive(Debug, Clone, PartialEq, Eq)]
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
            },
        }
    }
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
}

const INSERT_CHUNK: usize = 200;

/// An open group-commit transaction holding the log head lock. Dropped without
/// [`GroupTxn::commit`], it rolls back.
pub struct GroupTxn {
    txn: Txn,
    backend: DbBackend,
    head: u64,
}

impl Store {
    /// Begins a group: opens a transaction and locks the log head (see the module docs of
    /// [`crate::storage`]); every other writer, on every node, waits until it ends.
    pub async fn begin_group(&self) -> Result<GroupTxn, StoreError> {
        let backend = self.backend();
        let txn = self.begin().await?;
        let head = txn
            .query_one_raw(stmt(
                backend,
                "UPDATE sg_head SET seq = seq WHERE id = 1 RETURNING seq",
                [],
            ))
            .await?
            .ok_or_else(|| StoreError::Corrupt("sg_head has no row".into()))?
            .try_get::<i64>("", "seq")? as u64;
        Ok(GroupTxn { txn, backend, head })
    }
}

impl GroupTxn {
    /// The log head, as locked.
    pub fn head(&self) -> u64 {
        self.head
    }

    /// Each client's last handled mutation id (absent: the client never pushed).
    pub async fn client_lasts(&self, clients: &[&str]) -> Result<HashMap<String, u64>, StoreError> {
        let mut lasts = HashMap::new();
        for chunk in clients.chunks(INSERT_CHUNK) {
            let sql = format!(
                "SELECT client_id, last_mutation FROM sg_clients WHERE client_id IN ({})",
                vec!["?"; chunk.len()].join(", ")
            );
            let values: Vec<DbValue> = chunk.iter().map(|c| (*c).into()).collect();
            for r in self
                .txn
                .query_all_raw(stmt(self.backend, &sql, values))
                .await?
            {
                lasts.insert(
                    r.try_get::<String>("", "client_id")?,
                    r.try_get::<i64>("", "last_mutation")? as u64,
                );
            }
        }
        Ok(lasts)
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
            let keys = KeyList::Text(&ids);
            let columns = "doc_id, body, version, deleted";
            for r in self
                .keyed_rows(
                    columns,
                    "sg_documents",
                    "collection",
                    collection,
                    "doc_id",
                    keys,
                )
                .await?
            {
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
        let keys = KeyList::BigInt(&ids);
        let columns = "origin_mutation, seq";
        for r in self
            .keyed_rows(
                columns,
                "sg_changes",
                "origin_client",
                client_id,
                "origin_mutation",
                keys,
            )
            .await?
        {
            let seq = r.try_get::<i64>("", "seq")? as u64;
            out.insert(
                r.try_get::<i64>("", "origin_mutation")? as u64,
                Earlier::Applied { seq },
            );
        }
        let rest: Vec<i64> = ids
            .into_iter()
            .filter(|id| !out.contains_key(&(*id as u64)))
            .collect();
        let keys = KeyList::BigInt(&rest);
        let columns = "mutation_id, code, reason";
        for r in self
            .keyed_rows(
                columns,
                "sg_sync_errors",
                "client_id",
                client_id,
                "mutation_id",
                keys,
            )
            .await?
        {
            let rejected = Earlier::Rejected {
                code: r.try_get::<i64>("", "code")? as u16,
                reason: r.try_get("", "reason")?,
            };
            out.insert(r.try_get::<i64>("", "mutation_id")? as u64, rejected);
        }
        Ok(out)
    }

    /// Writes the rows, moves the head to `new_head` (announcing it on PostgreSQL) and commits.
    pub async fn commit(self, rows: &GroupRows, new_head: u64) -> Result<(), StoreError> {
        write_rows(&self.txn, self.backend, rows).await?;
        if new_head != self.head {
            self.txn
                .execute_raw(stmt(
                    self.backend,
                    "UPDATE sg_head SET seq = ? WHERE id = 1",
                    [(new_head as i64).into()],
                ))
                .await?;
            if self.backend == DbBackend::Postgres {
                self.txn
                    .execute_raw(stmt(
                        self.backend,
                        "SELECT pg_notify(?, ?)",
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
        columns: &str,
        table: &str,
        prefix_col: &str,
        prefix: &str,
        key_col: &str,
        keys: KeyList<'_>,
    ) -> Result<Vec<QueryResult>, StoreError> {
        let mut rows = Vec::new();
        for chunk in keys.chunks(self.keys_per_statement()) {
            let (sql, values) =
                self.keyed_select(columns, table, prefix_col, prefix, key_col, chunk);
            rows.extend(
                self.txn
                    .query_all_raw(stmt(self.backend, &sql, values))
                    .await?,
            );
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

    /// `SELECT {columns} FROM {table} WHERE {prefix_col} = prefix AND {key_col} IN keys`.
    ///
    /// PostgreSQL takes the keys as one array parameter, each looked up through a `LATERAL`
    /// subquery on both key columns: an index lookup per key whatever the planner believes
    /// about the table. (`key IN (...)` or `= ANY(...)` were planned, with the statistics of a
    /// fast-growing table, as a scan of every row of the prefix filtered by key: 54 ms instead
    /// of 2 ms for 1,000 ids at 200,000 documents.) SQLite gets an `IN` list, which it always
    /// answers from the index.
    fn keyed_select(
        &self,
        columns: &str,
        table: &str,
        prefix_col: &str,
        prefix: &str,
        key_col: &str,
        keys: KeyList<'_>,
    ) -> (String, Vec<DbValue>) {
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
            (
                format!(
                    "SELECT d.* FROM unnest(?::{cast}) AS k(v) CROSS JOIN LATERAL \
                     (SELECT {columns} FROM {table} WHERE {prefix_col} = ? AND {key_col} = k.v \
                     OFFSET 0) AS d"
                ),
                vec![array, DbValue::from(prefix)],
            )
        } else {
            let n = keys.len();
            let mut values: Vec<DbValue> = Vec::with_capacity(n + 1);
            values.push(prefix.into());
            match keys {
                KeyList::Text(k) => values.extend(k.iter().map(|v| DbValue::from(*v))),
                KeyList::BigInt(k) => values.extend(k.iter().map(|v| DbValue::from(*v))),
            }
            (
                format!(
                    "SELECT {columns} FROM {table} WHERE {prefix_col} = ? AND {key_col} IN ({})",
                    vec!["?"; n].join(", ")
                ),
                values,
            )
        }
    }
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

    fn len(&self) -> usize {
        match self {
            KeyList::Text(k) => k.len(),
            KeyList::BigInt(k) => k.len(),
        }
    }
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
        let mut values: Vec<DbValue> = Vec::with_capacity(chunk.len() * 9);
        for row in chunk {
            let c = &row.entry.change;
            values.push((c.seq as i64).into());
            values.push(c.collection.clone().into());
            values.push(c.id.clone().into());
            values.push(i64::from(c.op == syncgate_protocol::ChangeOp::Delete).into());
            values.push(row.body.as_ref().map(|b| b.to_vec()).into());
            values.push(row.prev_body.as_ref().map(|b| b.to_vec()).into());
            values.push(row.origin_client.clone().into());
            values.push((row.origin_mutation as i64).into());
            values.push(now.into());
        }
        let sql = format!(
            "INSERT INTO sg_changes (seq, collection, doc_id, op, body, prev_body, origin_client, \
             origin_mutation, committed_at) VALUES {}",
            placeholders(chunk.len(), 9)
        );
        txn.execute_raw(stmt(backend, &sql, values)).await?;
    }
    let doc_size = |d: &DocumentRow| {
        d.collection.len() + d.id.len() + d.body.as_ref().map_or(0, Bytes::len) + 32
    };
    for chunk in byte_chunks(&rows.documents, doc_size) {
        let mut values: Vec<DbValue> = Vec::with_capacity(chunk.len() * 5);
        for d in chunk {
            values.push(d.collection.clone().into());
            values.push(d.id.clone().into());
            values.push(d.body.as_ref().map(|b| b.to_vec()).into());
            values.push((d.version as i64).into());
            values.push(i64::from(d.deleted).into());
        }
        let sql = format!(
            "INSERT INTO sg_documents (collection, doc_id, body, version, deleted) VALUES {} \
             ON CONFLICT (collection, doc_id) DO UPDATE SET body = excluded.body, \
             version = excluded.version, deleted = excluded.deleted",
            placeholders(chunk.len(), 5)
        );
        txn.execute_raw(stmt(backend, &sql, values)).await?;
    }
    let error_size = |e: &RejectionRow| e.client_id.len() + e.reason.len() + e.mutation.len() + 48;
    for chunk in byte_chunks(&rows.rejections, error_size) {
        let mut values: Vec<DbValue> = Vec::with_capacity(chunk.len() * 7);
        for e in chunk {
            values.push(e.client_id.clone().into());
            values.push((e.mutation_id as i64).into());
            values.push((e.batch as i64).into());
            values.push(i64::from(e.code.code()).into());
            values.push(e.reason.clone().into());
            values.push(e.mutation.clone().into());
            values.push(now.into());
        }
        let sql = format!(
            "INSERT INTO sg_sync_errors (client_id, mutation_id, batch, code, reason, mutation, \
             created_at) VALUES {}",
            placeholders(chunk.len(), 7)
        );
        txn.execute_raw(stmt(backend, &sql, values)).await?;
    }
    for chunk in rows.clients.chunks(INSERT_CHUNK) {
        let mut values: Vec<DbValue> = Vec::with_capacity(chunk.len() * 4);
        for c in chunk {
            values.push(c.client_id.clone().into());
            values.push((c.last_mutation as i64).into());
            values.push(c.user.clone().into());
            values.push(now.into());
        }
        let sql = format!(
            "INSERT INTO sg_clients (client_id, last_mutation, user_id, updated_at) VALUES {} \
             ON CONFLICT (client_id) DO UPDATE SET last_mutation = excluded.last_mutation, \
             user_id = excluded.user_id, updated_at = excluded.updated_at",
            placeholders(chunk.len(), 4)
        );
        txn.execute_raw(stmt(backend, &sql, values)).await?;
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

fn placeholders(rows: usize, cols: usize) -> String {
    let row = format!("({})", vec!["?"; cols].join(", "));
    vec![row; rows].join(", ")
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
