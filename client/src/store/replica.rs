//! The replica: the optimistic state the application reads, subscriptions and their cursors,
//! and incoming server data.

use std::collections::{HashMap, HashSet};

use sea_orm::{
    ConnectionTrait, DatabaseTransaction, QueryResult, TransactionTrait, Value as DbValue,
};
use syncgate_protocol::codec::to_msgpack;
use syncgate_protocol::{Body, Change, ChangeOp, Cursor, Doc, Filter};

use super::model::{self, Entry, ServerState, SubscriptionChange};
use super::{
    Applied, Kind, LocalDoc, LocalStore, Sealer, StoreError, StoredSubscription, decode_body,
    encode_body, get_u64, st, unseal,
};

impl LocalStore {
    /// The optimistic state of one document (`None` if absent or deleted).
    pub async fn get(&self, collection: &str, id: &str) -> Result<Option<LocalDoc>, StoreError> {
        let rows = self
            .db
            .query_all_raw(st(
                &format!("{DOC_SELECT} WHERE d.collection = ? AND d.doc_id = ?"),
                [collection.into(), id.into()],
            ))
            .await?;
        Ok(docs_from_rows(&self.sealer, &rows)?.into_iter().next())
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
        Ok(docs_from_rows(&self.sealer, &rows)?
            .into_iter()
            .filter(|d| filter.matches(&d.body))
            .collect())
    }

    /// How many documents of `collection` the optimistic state holds (deleted ones not
    /// counted).
    pub async fn count(&self, collection: &str) -> Result<u64, StoreError> {
        let row = self
            .db
            .query_one_raw(st(
                "SELECT COUNT(*) AS n FROM sgc_docs WHERE collection = ? AND local_body IS NOT NULL",
                [collection.into()],
            ))
            .await?;
        row.map_or(Ok(0), |r| get_u64(&r, "n"))
    }

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
                    filter: unseal(&self.sealer, Kind::Filter, &filter)?,
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
        let wanted: Vec<(String, Vec<u8>)> = wanted
            .iter()
            .map(|(c, f)| (c.clone(), to_msgpack(f)))
            .collect();
        for r in &current {
            let c: String = r.try_get("", "collection")?;
            // Compared as plain MessagePack: sealed bytes differ on every write.
            let f = self
                .sealer
                .open(Kind::Filter, &r.try_get::<Vec<u8>>("", "filter")?)?;
            match model::subscription_change(&c, &f, &wanted) {
                SubscriptionChange::Keep => {}
                SubscriptionChange::Refilter(filter) => {
                    txn.execute_raw(st(
                        "UPDATE sgc_subscriptions SET filter = ?, cursor_epoch = NULL, cursor_seq = NULL \
                         WHERE collection = ?",
                        [
                            self.sealer.seal(Kind::Filter, filter).into(),
                            c.as_str().into(),
                        ],
                    ))
                    .await?;
                }
                SubscriptionChange::Forget => {
                    txn.execute_raw(st(
                        "DELETE FROM sgc_subscriptions WHERE collection = ?",
                        [c.as_str().into()],
                    ))
                    .await?;
                    forget_server_state(&txn, &self.sealer, &c).await?;
                }
            }
        }
        for (c, f) in wanted {
            txn.execute_raw(st(
                "INSERT OR IGNORE INTO sgc_subscriptions (collection, filter) VALUES (?, ?)",
                [c.into(), self.sealer.seal(Kind::Filter, f).into()],
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
                rebase(&txn, &self.sealer, collection, &d).await?;
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
        let states: Vec<_> = docs
            .iter()
            .map(|d| (d.id.as_str(), d.version, Some(&d.body)))
            .collect();
        let out = apply_server_states(&txn, &self.sealer, collection, &states).await?;
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
        let states: Vec<_> = changes
            .iter()
            .map(|c| {
                let body = match c.op {
                    ChangeOp::Upsert => c.body.as_ref(),
                    ChangeOp::Delete => None,
                };
                (c.id.as_str(), c.seq, body)
            })
            .collect();
        let out = apply_server_states(&txn, &self.sealer, collection, &states).await?;
        advance_cursor(&txn, &self.sealer, collection, cursor).await?;
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
            let concurrent_pending = rebase(&txn, &self.sealer, collection, &id).await?;
            out.push(Applied {
                collection: collection.to_owned(),
                id,
                version: cursor.seq,
                body: None,
                concurrent_pending,
            });
        }
        advance_cursor(&txn, &self.sealer, collection, cursor).await?;
        txn.commit().await?;
        Ok(out)
    }

    /// Moves a live subscription's cursor forward to `cursor` (a `pong` head), if it is ahead.
    pub async fn advance(&self, collection: &str, cursor: &Cursor) -> Result<(), StoreError> {
        let txn = self.db.begin().await?;
        advance_cursor(&txn, &self.sealer, collection, cursor).await?;
        txn.commit().await?;
        Ok(())
    }
}

const DOC_SELECT: &str = "SELECT d.collection, d.doc_id, d.local_body, d.server_version, \
     EXISTS (SELECT 1 FROM sgc_outbox o WHERE o.collection = d.collection AND o.doc_id = d.doc_id \
             AND o.acked_version IS NULL) AS pending \
     FROM sgc_docs d";

fn docs_from_rows(s: &Sealer, rows: &[QueryResult]) -> Result<Vec<LocalDoc>, StoreError> {
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let Some(body) = decode_body(s, r.try_get("", "local_body")?)? else {
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

/// Ids per `IN (...)` list and rows per multi-row `INSERT` (6 values each): far below
/// SQLite's limit of 32,766 bound values per statement.
const IDS_PER_STATEMENT: usize = 500;
const ROWS_PER_INSERT: usize = 100;

/// A server state to record: document id, version, body (`None`: deleted).
type ServerStateIn<'a> = (&'a str, u64, Option<&'a Body>);

/// [`apply_server_version`] for a frame's worth of documents, in a few statements instead of
/// six per document: a document without outbox entries (every document of a first sync) has
/// the server's body as its optimistic body, so its row is written once, in a multi-row
/// upsert. A document with outbox entries takes the per-document path (rebase). Which server
/// state wins is [`model::takes_server_version`] either way, judged against what the replica
/// held and what earlier entries of the same frame set.
async fn apply_server_states(
    txn: &DatabaseTransaction,
    s: &Sealer,
    collection: &str,
    states: &[ServerStateIn<'_>],
) -> Result<Vec<Applied>, StoreError> {
    let mut held: HashMap<String, (u64, bool)> = HashMap::new();
    let mut with_outbox: HashSet<String> = HashSet::new();
    for ids in states.chunks(IDS_PER_STATEMENT) {
        let marks = vec!["?"; ids.len()].join(", ");
        let mut values: Vec<DbValue> = Vec::with_capacity(ids.len() + 1);
        values.push(collection.into());
        values.extend(ids.iter().map(|(id, _, _)| DbValue::from(*id)));
        let rows = txn
            .query_all_raw(st(
                &format!(
                    "SELECT doc_id, server_version, stale FROM sgc_docs \
                     WHERE collection = ? AND doc_id IN ({marks})"
                ),
                values.clone(),
            ))
            .await?;
        for r in &rows {
            held.insert(
                r.try_get("", "doc_id")?,
                (
                    get_u64(r, "server_version")?,
                    r.try_get::<i64>("", "stale")? != 0,
                ),
            );
        }
        let rows = txn
            .query_all_raw(st(
                &format!(
                    "SELECT DISTINCT doc_id FROM sgc_outbox WHERE collection = ? AND doc_id IN ({marks})"
                ),
                values,
            ))
            .await?;
        for r in &rows {
            with_outbox.insert(r.try_get("", "doc_id")?);
        }
    }
    let mut out = Vec::with_capacity(states.len());
    // Plain documents to upsert: id → index into `rows` (a later state of the same document
    // in this frame replaces the earlier row).
    let mut rows: Vec<(&str, u64, DbValue)> = Vec::new();
    let mut row_of: HashMap<&str, usize> = HashMap::new();
    for &(id, version, body) in states {
        if with_outbox.contains(id) {
            if let Some(a) = apply_server_version(txn, s, collection, id, version, body).await? {
                out.push(a);
            }
            continue;
        }
        if !model::takes_server_version(held.get(id).copied(), version) {
            continue;
        }
        held.insert(id.to_owned(), (version, false));
        let row = (id, version, encode_body(s, body));
        match row_of.get(id) {
            Some(&i) => {
                if let Some(slot) = rows.get_mut(i) {
                    *slot = row;
                }
            }
            None => {
                row_of.insert(id, rows.len());
                rows.push(row);
            }
        }
        out.push(Applied {
            collection: collection.to_owned(),
            id: id.to_owned(),
            version,
            body: body.cloned(),
            concurrent_pending: 0,
        });
    }
    for chunk in rows.chunks(ROWS_PER_INSERT) {
        let marks = vec!["(?, ?, ?, ?, 0, ?)"; chunk.len()].join(", ");
        let mut values: Vec<DbValue> = Vec::with_capacity(chunk.len() * 5);
        for (id, version, body) in chunk {
            values.push(collection.into());
            values.push((*id).into());
            values.push(body.clone());
            values.push((*version as i64).into());
            // No outbox entry: the optimistic body is the server's.
            values.push(body.clone());
        }
        txn.execute_raw(st(
            &format!(
                "INSERT INTO sgc_docs (collection, doc_id, server_body, server_version, stale, \
                 local_body) VALUES {marks} \
                 ON CONFLICT (collection, doc_id) DO UPDATE SET server_body = excluded.server_body, \
                 server_version = excluded.server_version, stale = 0, \
                 local_body = excluded.local_body"
            ),
            values,
        ))
        .await?;
    }
    Ok(out)
}

/// Records the server's state of a document at `version` if it is newer than what the replica
/// holds (a snapshot may already be newer than the catch-up that follows it), then rebases.
pub(super) async fn apply_server_version(
    txn: &DatabaseTransaction,
    s: &Sealer,
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
    let held = held
        .map(|r| {
            Ok::<_, StoreError>((
                get_u64(&r, "server_version")?,
                r.try_get::<i64>("", "stale")? != 0,
            ))
        })
        .transpose()?;
    if !model::takes_server_version(held, version) {
        return Ok(None);
    }
    txn.execute_raw(st(
        "INSERT INTO sgc_docs (collection, doc_id, server_body, server_version, stale) \
         VALUES (?, ?, ?, ?, 0) \
         ON CONFLICT (collection, doc_id) DO UPDATE SET server_body = excluded.server_body, \
         server_version = excluded.server_version, stale = 0",
        [
            collection.into(),
            id.into(),
            encode_body(s, body),
            (version as i64).into(),
        ],
    ))
    .await?;
    drop_seen_acks(txn, collection, id).await?;
    let concurrent_pending = rebase(txn, s, collection, id).await?;
    Ok(Some(Applied {
        collection: collection.to_owned(),
        id: id.to_owned(),
        version,
        body: body.cloned(),
        concurrent_pending,
    }))
}

/// Deletes acknowledged entries of a document whose version the replica has reached.
pub(super) async fn drop_seen_acks(
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
    s: &Sealer,
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
        rebase(txn, s, collection, &d).await?;
    }
    Ok(())
}

/// Forgets the server's data of a collection that is no longer followed.
async fn forget_server_state(
    txn: &DatabaseTransaction,
    s: &Sealer,
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
        rebase(txn, s, collection, &d).await?;
    }
    Ok(())
}

/// Recomputes a document's optimistic body ([`model::rebase`]) and stores it, or deletes the
/// row when nothing is left of it. Returns the number of pending entries.
pub(super) async fn rebase(
    txn: &DatabaseTransaction,
    s: &Sealer,
    collection: &str,
    id: &str,
) -> Result<u64, StoreError> {
    let row = txn
        .query_one_raw(st(
            "SELECT server_body, server_version, stale FROM sgc_docs WHERE collection = ? AND doc_id = ?",
            [collection.into(), id.into()],
        ))
        .await?;
    let server = match &row {
        Some(r) => ServerState {
            body: decode_body(s, r.try_get("", "server_body")?)?,
            version: get_u64(r, "server_version")?,
            stale: r.try_get::<i64>("", "stale")? != 0,
        },
        None => ServerState::default(),
    };
    let entries = txn
        .query_all_raw(st(
            "SELECT mutation, acked_version FROM sgc_outbox WHERE collection = ? AND doc_id = ? \
             AND (acked_version IS NULL OR acked_version > ?) ORDER BY mutation_id",
            [collection.into(), id.into(), (server.version as i64).into()],
        ))
        .await?
        .iter()
        .map(|r| {
            let raw: Vec<u8> = r.try_get("", "mutation")?;
            let acked: Option<i64> = r.try_get("", "acked_version")?;
            Ok(Entry {
                mutation: unseal(s, Kind::Mutation, &raw)?,
                acked_version: acked.map(|v| v as u64),
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    let rebased = model::rebase(&server, &entries);
    if rebased.forget {
        txn.execute_raw(st(
            "DELETE FROM sgc_docs WHERE collection = ? AND doc_id = ?",
            [collection.into(), id.into()],
        ))
        .await?;
    } else {
        txn.execute_raw(st(
            "INSERT INTO sgc_docs (collection, doc_id, local_body) VALUES (?, ?, ?) \
             ON CONFLICT (collection, doc_id) DO UPDATE SET local_body = excluded.local_body",
            [
                collection.into(),
                id.into(),
                encode_body(s, rebased.local_body.as_ref()),
            ],
        ))
        .await?;
    }
    Ok(rebased.pending)
}

#[cfg(test)]
mod tests {
    //! The batched [`apply_server_states`] against the per-document path it replaces
    //! ([`apply_server_version`] for every state, in order): the same script of local edits,
    //! acknowledgements, change frames and snapshots must leave two stores with the same rows
    //! and report the same applied states.
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use syncgate_protocol::{MutationOp, MutationResult, Value};

    async fn one_by_one(
        s: &LocalStore,
        collection: &str,
        states: &[(String, u64, Option<Body>)],
        cursor: Option<&Cursor>,
    ) -> Vec<Applied> {
        let txn = s.db.begin().await.unwrap();
        let mut out = Vec::new();
        for (id, version, body) in states {
            if let Some(a) =
                apply_server_version(&txn, &s.sealer, collection, id, *version, body.as_ref())
                    .await
                    .unwrap()
            {
                out.push(a);
            }
        }
        if let Some(c) = cursor {
            advance_cursor(&txn, &s.sealer, collection, c)
                .await
                .unwrap();
        }
        txn.commit().await.unwrap();
        out
    }

    /// Every row of the replica and the outbox, bodies decoded (sealed bytes differ per write).
    async fn dump(s: &LocalStore) -> Vec<String> {
        let docs =
            s.db.query_all_raw(st(
                "SELECT doc_id, server_body, server_version, stale, local_body FROM sgc_docs \
                 ORDER BY collection, doc_id",
                [],
            ))
            .await
            .unwrap();
        let mut out: Vec<String> = docs
            .iter()
            .map(|r| {
                let id: String = r.try_get("", "doc_id").unwrap();
                let server = decode_body(&s.sealer, r.try_get("", "server_body").unwrap()).unwrap();
                let local = decode_body(&s.sealer, r.try_get("", "local_body").unwrap()).unwrap();
                format!(
                    "doc {id} v{} stale{} server={server:?} local={local:?}",
                    get_u64(r, "server_version").unwrap(),
                    r.try_get::<i64>("", "stale").unwrap()
                )
            })
            .collect();
        for e in s.outbox().await.unwrap() {
            // Not `created_ms`: the two stores were written a moment apart.
            out.push(format!("outbox {:?} {:?}", e.mutation, e.state));
        }
        out
    }

    fn body(n: u64) -> Body {
        [("n".to_owned(), Value::from(n))].into_iter().collect()
    }

    fn key(a: &Applied) -> (String, u64, Option<Body>, u64) {
        (
            a.id.clone(),
            a.version,
            a.body.clone(),
            a.concurrent_pending,
        )
    }

    #[tokio::test]
    async fn batched_apply_equals_the_per_document_path() {
        for seed in 0..3u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
            let batched = LocalStore::open(da.path()).await.unwrap();
            let reference = LocalStore::open(db.path()).await.unwrap();
            for s in [&batched, &reference] {
                s.set_subscriptions(&[("c".into(), Body::new())])
                    .await
                    .unwrap();
                s.on_welcome("e", 0).await.unwrap();
            }
            let mut seq = 0u64;
            let mut pending: Vec<u64> = Vec::new();
            for step in 0..100 {
                let cursor = |seq| Cursor {
                    epoch: "e".into(),
                    seq,
                };
                match rng.random_range(0..10) {
                    // A local edit of one of the first 40 documents.
                    0..=2 => {
                        let id = format!("d{:04}", rng.random_range(0..40));
                        let (op, b) = match rng.random_range(0..3) {
                            0 => (MutationOp::Put, Some(body(rng.random_range(0..100)))),
                            1 => (MutationOp::Patch, Some(body(rng.random_range(0..100)))),
                            _ => (MutationOp::Delete, None),
                        };
                        let m = batched.write("c", &id, op, b.clone()).await.unwrap();
                        assert_eq!(reference.write("c", &id, op, b).await.unwrap(), m);
                        pending.push(m);
                    }
                    // The oldest pending edit is acknowledged at a new version.
                    3 if !pending.is_empty() => {
                        seq += 1;
                        let m = pending.remove(0);
                        for s in [&batched, &reference] {
                            s.on_ack(&[MutationResult::applied(m, seq)]).await.unwrap();
                        }
                    }
                    // A snapshot: every row stale, then frames of (possibly older) versions,
                    // some large enough to cross the statement chunks, then `synced`.
                    4 => {
                        let resync = rng.random_bool(0.3);
                        for s in [&batched, &reference] {
                            s.begin_snapshot("c", resync).await.unwrap();
                        }
                        for _ in 0..rng.random_range(1..3) {
                            let n = if rng.random_bool(0.2) { 1_200 } else { 30 };
                            let docs: Vec<Doc> = (0..n)
                                .map(|_| Doc {
                                    id: format!("d{:04}", rng.random_range(0..1_500)),
                                    body: body(rng.random_range(0..100)),
                                    version: rng.random_range(0..=seq + 1),
                                })
                                .collect();
                            let a = batched.apply_snapshot("c", &docs).await.unwrap();
                            let states: Vec<_> = docs
                                .iter()
                                .map(|d| (d.id.clone(), d.version, Some(d.body.clone())))
                                .collect();
                            let b = one_by_one(&reference, "c", &states, None).await;
                            assert_eq!(
                                a.iter().map(key).collect::<Vec<_>>(),
                                b.iter().map(key).collect::<Vec<_>>(),
                                "seed {seed} step {step}: snapshot applied"
                            );
                        }
                        for s in [&batched, &reference] {
                            s.synced("c", &cursor(seq)).await.unwrap();
                        }
                    }
                    // A changes frame: new versions, deletes, a document twice.
                    _ => {
                        let changes: Vec<Change> = (0..rng.random_range(1..40))
                            .map(|_| {
                                seq += 1;
                                let upsert = rng.random_bool(0.8);
                                Change {
                                    seq,
                                    collection: "c".into(),
                                    id: format!("d{:04}", rng.random_range(0..60)),
                                    op: if upsert {
                                        ChangeOp::Upsert
                                    } else {
                                        ChangeOp::Delete
                                    },
                                    body: upsert.then(|| body(rng.random_range(0..100))),
                                }
                            })
                            .collect();
                        let a = batched
                            .apply_changes("c", &changes, &cursor(seq))
                            .await
                            .unwrap();
                        let states: Vec<_> = changes
                            .iter()
                            .map(|c| (c.id.clone(), c.seq, c.body.clone()))
                            .collect();
                        let b = one_by_one(&reference, "c", &states, Some(&cursor(seq))).await;
                        assert_eq!(
                            a.iter().map(key).collect::<Vec<_>>(),
                            b.iter().map(key).collect::<Vec<_>>(),
                            "seed {seed} step {step}: changes applied"
                        );
                    }
                }
                assert_eq!(
                    dump(&batched).await,
                    dump(&reference).await,
                    "seed {seed} step {step}"
                );
            }
        }
    }
}
