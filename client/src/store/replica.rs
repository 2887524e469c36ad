//! The replica: the optimistic state the application reads, subscriptions and their cursors,
//! and incoming server data.

use sea_orm::{ConnectionTrait, DatabaseTransaction, QueryResult, TransactionTrait};
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
        let mut out = Vec::with_capacity(docs.len());
        for d in docs {
            if let Some(a) = apply_server_version(
                &txn,
                &self.sealer,
                collection,
                &d.id,
                d.version,
                Some(&d.body),
            )
            .await?
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
            if let Some(a) =
                apply_server_version(&txn, &self.sealer, collection, &c.id, c.seq, body).await?
            {
                out.push(a);
            }
        }
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
