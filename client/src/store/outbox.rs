//! The outbox: local writes, what goes up, what the server answered.

use sea_orm::{ConnectionTrait, DatabaseTransaction, QueryResult, TransactionTrait};
use syncgate_protocol::{Body, Mutation, MutationOp, MutationResult};

use super::model::{self, AckAction, ServerState};
use super::replica::{apply_server_version, drop_seen_acks, rebase};
use super::{
    AckOutcome, Kind, LocalConflict, LocalStore, OutboxEntry, OutboxState, Rejection, Sealer,
    StoreError, Take, corrupt, decode_body, encode_body, get_u64, meta, now_ms, sealed, set_meta,
    st, unseal,
};

impl LocalStore {
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
        let next = self.write_in(&txn, collection, id, op, body, None).await?;
        txn.commit().await?;
        Ok(next)
    }

    /// Open `manual` conflicts, oldest first.
    pub async fn conflicts(&self) -> Result<Vec<LocalConflict>, StoreError> {
        let rows = self
            .db
            .query_all_raw(st(
                "SELECT conflict_id, mutation, server_version, server_body FROM sgc_conflicts \
                 ORDER BY received_ms, mutation_id",
                [],
            ))
            .await?;
        rows.iter()
            .map(|r| {
                let raw: Vec<u8> = r.try_get("", "mutation")?;
                Ok(LocalConflict {
                    id: r.try_get("", "conflict_id")?,
                    mine: unseal(&self.sealer, Kind::Mutation, &raw)?,
                    server_version: get_u64(r, "server_version")?,
                    server_body: decode_body(&self.sealer, r.try_get("", "server_body")?)?,
                })
            })
            .collect()
    }

    /// Resolves a `manual` conflict: writes the chosen document (or a delete) as a mutation
    /// naming the conflict, and forgets the conflict, in one transaction. Returns the
    /// mutation id; `None`: no such open conflict.
    pub async fn resolve(&self, conflict_id: &str, take: Take) -> Result<Option<u64>, StoreError> {
        let Some(conflict) = self
            .conflicts()
            .await?
            .into_iter()
            .find(|c| c.id == conflict_id)
        else {
            return Ok(None);
        };
        let body = match take {
            Take::Server => conflict.server_body.clone(),
            Take::Mine => conflict.mine_body(),
            Take::Body(b) => Some(b),
        };
        let op = if body.is_some() {
            MutationOp::Put
        } else {
            MutationOp::Delete
        };
        let m = &conflict.mine;
        let txn = self.db.begin().await?;
        let removed = txn
            .execute_raw(st(
                "DELETE FROM sgc_conflicts WHERE conflict_id = ?",
                [conflict_id.into()],
            ))
            .await?
            .rows_affected();
        if removed == 0 {
            // Resolved meanwhile by another call.
            return Ok(None);
        }
        let next = self
            .write_in(&txn, &m.collection, &m.id, op, body, Some(conflict_id))
            .await?;
        txn.commit().await?;
        Ok(Some(next))
    }

    /// [`LocalStore::write`] inside a transaction, optionally resolving a conflict.
    async fn write_in(
        &self,
        txn: &DatabaseTransaction,
        collection: &str,
        id: &str,
        op: MutationOp,
        body: Option<Body>,
        resolves: Option<&str>,
    ) -> Result<u64, StoreError> {
        let next: u64 = meta(txn, "next_mutation")
            .await?
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| corrupt("next_mutation"))?;
        // Ids run out only if the gateway reported a horizon at the very top of the range.
        let after = next.checked_add(1).ok_or_else(|| {
            corrupt("mutation ids exhausted: this installation needs a new data directory")
        })?;
        set_meta(txn, "next_mutation", &after.to_string()).await?;
        let held = txn
            .query_one_raw(st(
                "SELECT server_version FROM sgc_docs WHERE collection = ? AND doc_id = ?",
                [collection.into(), id.into()],
            ))
            .await?
            .map(|r| get_u64(&r, "server_version"))
            .transpose()?;
        let base_version = model::base_version(held, op);
        let m = Mutation {
            mutation_id: next,
            collection: collection.to_owned(),
            id: id.to_owned(),
            op,
            body,
            base_version,
            resolves: resolves.map(str::to_owned),
        };
        txn.execute_raw(st(
            "INSERT INTO sgc_outbox (mutation_id, collection, doc_id, mutation, created_ms) \
             VALUES (?, ?, ?, ?, ?)",
            [
                (next as i64).into(),
                collection.into(),
                id.into(),
                sealed(&self.sealer, Kind::Mutation, &m).into(),
                now_ms().into(),
            ],
        ))
        .await?;
        rebase(txn, &self.sealer, collection, id).await?;
        Ok(next)
    }

    /// Every outbox entry, oldest first.
    pub async fn outbox(&self) -> Result<Vec<OutboxEntry>, StoreError> {
        let rows = self
            .db
            .query_all_raw(st(
                "SELECT mutation, acked_version, created_ms FROM sgc_outbox ORDER BY mutation_id",
                [],
            ))
            .await?;
        rows.iter().map(|r| outbox_entry(&self.sealer, r)).collect()
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
        let raws: Vec<Vec<u8>> = rows
            .iter()
            .map(|r| r.try_get("", "mutation"))
            .collect::<Result<_, _>>()?;
        let n = model::batch_len(raws.iter().map(Vec::len), max_bytes);
        raws.iter()
            .take(n)
            .map(|raw| unseal::<Mutation>(&self.sealer, Kind::Mutation, raw))
            .collect()
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
                    mutation: unseal(&self.sealer, Kind::Mutation, &raw)?,
                    code: get_u64(r, "code")? as u16,
                    reason: r.try_get("", "reason")?,
                })
            })
            .collect()
    }

    /// Forgets rejected mutations the application has dealt with (`None`: all of them).
    /// Returns how many were removed.
    pub async fn acknowledge_rejected(
        &self,
        mutation_ids: Option<&[u64]>,
    ) -> Result<u64, StoreError> {
        let result = match mutation_ids {
            None => {
                self.db
                    .execute_raw(st("DELETE FROM sgc_rejected", []))
                    .await?
            }
            Some(ids) => {
                let txn = self.db.begin().await?;
                let mut n = 0;
                for id in ids {
                    n += txn
                        .execute_raw(st(
                            "DELETE FROM sgc_rejected WHERE mutation_id = ?",
                            [(*id as i64).into()],
                        ))
                        .await?
                        .rows_affected();
                }
                txn.commit().await?;
                return Ok(n);
            }
        };
        Ok(result.rows_affected())
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
                    rebase(&txn, &self.sealer, &c, &d).await?;
                }
            }
            set_meta(&txn, "epoch", epoch).await?;
        }
        let next: u64 = meta(&txn, "next_mutation")
            .await?
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| corrupt("next_mutation"))?;
        let jumped = model::next_after_welcome(next, last_applied);
        if let Some(next) = jumped {
            set_meta(&txn, "next_mutation", &next.to_string()).await?;
        }
        txn.commit().await?;
        Ok(jumped.is_some())
    }

    /// Records a push acknowledgement: applied entries become `acked` (or are dropped at once
    /// when the replica already holds their version or does not follow their collection),
    /// rejected ones move to the `rejected` table; the documents are rebased.
    pub async fn on_ack(&self, results: &[MutationResult]) -> Result<AckOutcome, StoreError> {
        // Collections the gateway sends nothing of (its `welcome.upload_only`).
        let upload_only: std::collections::HashSet<String> = self
            .meta("upload_only")
            .await?
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect();
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
            let m: Mutation = unseal(&self.sealer, Kind::Mutation, &raw)?;
            let id = (r.mutation_id as i64).into();
            let decision = model::ack_action(
                r,
                followed.contains(&m.collection),
                upload_only.contains(&m.collection),
            );
            match decision {
                AckAction::Acked { version } => {
                    txn.execute_raw(st(
                        "UPDATE sgc_outbox SET acked_version = ? WHERE mutation_id = ?",
                        [(version as i64).into(), id],
                    ))
                    .await?;
                    out.applied.push((r.mutation_id, version));
                }
                AckAction::AckedUnfollowed { version } => {
                    // No change will ever come back for it: the ack is the last word. What
                    // the writer knows of the document at that version (its own writes, in
                    // order) becomes the replica's server state, so it can read back what it
                    // wrote without following the collection.
                    keep_own_write(&txn, &self.sealer, &m, version).await?;
                    txn.execute_raw(st("DELETE FROM sgc_outbox WHERE mutation_id = ?", [id]))
                        .await?;
                    out.applied.push((r.mutation_id, version));
                }
                AckAction::AckedUploadOnly { version } => {
                    // Nothing of it ever comes back: forget the local copy with the entry
                    // (later edits of the same document still pending stay on their own).
                    txn.execute_raw(st(
                        "DELETE FROM sgc_docs WHERE collection = ? AND doc_id = ?",
                        [m.collection.as_str().into(), m.id.as_str().into()],
                    ))
                    .await?;
                    txn.execute_raw(st("DELETE FROM sgc_outbox WHERE mutation_id = ?", [id]))
                        .await?;
                    out.applied.push((r.mutation_id, version));
                }
                AckAction::Rejected { code, reason } => {
                    txn.execute_raw(st(
                        "DELETE FROM sgc_outbox WHERE mutation_id = ?",
                        [id.clone()],
                    ))
                    .await?;
                    reject(&txn, id, raw, code, &reason).await?;
                    out.rejected.push(Rejection {
                        mutation: m.clone(),
                        code,
                        reason,
                    });
                }
                AckAction::Conflict { reason, conflict } => {
                    txn.execute_raw(st(
                        "DELETE FROM sgc_outbox WHERE mutation_id = ?",
                        [id.clone()],
                    ))
                    .await?;
                    // The server's side replaces the optimistic state (if it is newer than
                    // what the replica holds).
                    apply_server_version(
                        &txn,
                        &self.sealer,
                        &m.collection,
                        &m.id,
                        conflict.version,
                        conflict.body.as_ref(),
                    )
                    .await?;
                    match conflict.id {
                        Some(conflict_id) => {
                            txn.execute_raw(st(
                                "INSERT OR REPLACE INTO sgc_conflicts (conflict_id, mutation_id, \
                                 mutation, server_version, server_body, received_ms) \
                                 VALUES (?, ?, ?, ?, ?, ?)",
                                [
                                    conflict_id.as_str().into(),
                                    id,
                                    raw.into(),
                                    (conflict.version as i64).into(),
                                    encode_body(&self.sealer, conflict.body.as_ref()),
                                    now_ms().into(),
                                ],
                            ))
                            .await?;
                            out.conflicts.push(LocalConflict {
                                id: conflict_id,
                                mine: m.clone(),
                                server_version: conflict.version,
                                server_body: conflict.body,
                            });
                        }
                        None => {
                            let code = syncgate_protocol::ErrorCode::Conflict.code();
                            reject(&txn, id, raw, code, &reason).await?;
                            out.rejected.push(Rejection {
                                mutation: m.clone(),
                                code,
                                reason,
                            });
                        }
                    }
                }
            }
            drop_seen_acks(&txn, &m.collection, &m.id).await?;
            rebase(&txn, &self.sealer, &m.collection, &m.id).await?;
        }
        txn.commit().await?;
        Ok(out)
    }
}

/// Keeps a refused mutation in the rejected table until the application acknowledges it.
async fn reject(
    txn: &DatabaseTransaction,
    id: sea_orm::Value,
    raw: Vec<u8>,
    code: u16,
    reason: &str,
) -> Result<(), StoreError> {
    txn.execute_raw(st(
        "INSERT OR REPLACE INTO sgc_rejected (mutation_id, mutation, code, reason, rejected_ms) \
         VALUES (?, ?, ?, ?, ?)",
        [
            id,
            raw.into(),
            i64::from(code).into(),
            reason.into(),
            now_ms().into(),
        ],
    ))
    .await?;
    Ok(())
}

fn outbox_entry(s: &Sealer, r: &QueryResult) -> Result<OutboxEntry, StoreError> {
    let raw: Vec<u8> = r.try_get("", "mutation")?;
    let acked: Option<i64> = r.try_get("", "acked_version")?;
    Ok(OutboxEntry {
        mutation: unseal(s, Kind::Mutation, &raw)?,
        state: match acked {
            None => OutboxState::Pending,
            Some(v) => OutboxState::Acked { version: v as u64 },
        },
        created_ms: get_u64(r, "created_ms")?,
    })
}

/// Records an acknowledged write to a collection the replica does not follow as the
/// document's server state at `version`: the previous known state with the mutation applied.
/// (A patch of a document the replica never had leaves it unknown.)
async fn keep_own_write(
    txn: &DatabaseTransaction,
    s: &Sealer,
    m: &Mutation,
    version: u64,
) -> Result<(), StoreError> {
    let row = txn
        .query_one_raw(st(
            "SELECT server_body, server_version FROM sgc_docs WHERE collection = ? AND doc_id = ?",
            [m.collection.as_str().into(), m.id.as_str().into()],
        ))
        .await?;
    let previous = match &row {
        Some(r) => ServerState {
            body: decode_body(s, r.try_get("", "server_body")?)?,
            version: get_u64(r, "server_version")?,
            stale: false,
        },
        None => ServerState::default(),
    };
    let Some(known) = model::own_write(&previous, m, version) else {
        return Ok(());
    };
    txn.execute_raw(st(
        "INSERT INTO sgc_docs (collection, doc_id, server_body, server_version, stale) \
         VALUES (?, ?, ?, ?, 0) ON CONFLICT (collection, doc_id) DO UPDATE SET \
         server_body = excluded.server_body, server_version = excluded.server_version, stale = 0",
        [
            m.collection.as_str().into(),
            m.id.as_str().into(),
            encode_body(s, known.body.as_ref()),
            (known.version as i64).into(),
        ],
    ))
    .await?;
    Ok(())
}
