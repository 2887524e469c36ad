//! Retention and compaction of the change log.
//!
//! Each collection has a **horizon**, a seq stored in `sg_horizons` that only grows. Behind it
//! (seq at or below it) the log keeps only the latest version of each live document whose
//! latest change is there: superseded versions and tombstones are removed, and so are
//! `sg_documents` rows of documents deleted at or below it. Changes after the horizon are never
//! touched, so a reader whose position is at or after the horizon reads a complete log; one
//! whose position is older is told so ([`StoreError::CursorTooOld`]) and starts over from a
//! snapshot.
//!
//! **Ordering against readers.** The horizon is stored (and committed) before anything behind
//! it is removed, and every reader that could be affected reads the horizon *after* its rows:
//! [`Store::read_changes`] and the group commit's conflict history
//! ([`super::GroupTxn::horizons`]). A reader that found rows missing therefore also finds the
//! horizon that explains it.
//!
//! **Exactly-once survives.** A removed change that a client's mutation made leaves its
//! `(client, mutation, seq)` in `sg_applied`, where [`super::GroupTxn::earlier_outcomes`]
//! finds it: a replay of that mutation is still answered "applied", with no time window.
//!
//! **Ingest is never held for long.** Removal runs in transactions of at most
//! `compaction_batch_rows` rows that touch only rows behind the horizon; none takes the log head
//! lock. On SQLite (one writer at a time) each waits for the process's log-writer turn, as a
//! group commit does, so the two alternate instead of meeting in SQLite's busy handler.

use std::collections::BTreeMap;

use sea_orm::sea_query::{Alias, Expr, ExprTrait, Func, OnConflict, Order, Query};
use sea_orm::{ConnectionTrait, TransactionTrait};

use super::{Store, StoreError, now_ms};

/// A change behind the horizon that may go.
struct Removable {
    seq: u64,
    /// A delete (a tombstone), not a superseded version.
    tombstone: bool,
    /// The client and mutation that made it, if any.
    origin: Option<(String, u64)>,
}

/// A collection's retention: how long and how many of its changes the log keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Retention {
    /// Keep changes younger than this (milliseconds); 0 = no age limit.
    pub(crate) max_age_ms: u64,
    /// Keep the newest this many changes; 0 = no count limit.
    pub(crate) max_changes: u64,
    /// Rows removed per transaction (at least 1).
    pub(crate) batch_rows: u64,
}

/// The horizon a collection moves to (pure): the newest change beyond either limit, never
/// behind the stored horizon. `past_age` is the newest change older than the age limit,
/// `past_count` the newest change beyond the count limit (`None`: no such change, or no limit).
pub(crate) fn next_horizon(stored: u64, past_age: Option<u64>, past_count: Option<u64>) -> u64 {
    Ord::max(
        stored,
        Ord::max(past_age.unwrap_or(0), past_count.unwrap_or(0)),
    )
}

/// What one compaction did (or, dry, would do) to one collection.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CompactionReport {
    /// The collection.
    pub collection: String,
    /// The horizon before this compaction.
    pub previous_horizon: u64,
    /// The horizon after it (dry: the one it would set).
    pub horizon: u64,
    /// Superseded versions removed from the log.
    pub superseded: u64,
    /// Tombstones (delete changes) removed from the log.
    pub tombstones: u64,
    /// Deleted documents' rows removed from the document table.
    pub deleted_documents: u64,
    /// Nothing was changed: the counts say what would have been removed.
    pub dry_run: bool,
    /// The longest removal transaction, in microseconds (0 for a dry run).
    pub longest_batch_us: u64,
}

impl Store {
    /// Every collection's stored horizon (collections never compacted are absent).
    pub async fn horizons(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        let select = Query::select()
            .columns(["collection", "seq"])
            .from("sg_horizons")
            .to_owned();
        let mut out = BTreeMap::new();
        for r in self.db.query_all_raw(self.backend.build(&select)).await? {
            out.insert(
                r.try_get::<String>("", "collection")?,
                r.try_get::<i64>("", "seq")? as u64,
            );
        }
        Ok(out)
    }

    /// One collection's stored horizon (0: never compacted).
    pub async fn horizon(&self, collection: &str) -> Result<u64, StoreError> {
        let select = Query::select()
            .column("seq")
            .from("sg_horizons")
            .and_where(Expr::col("collection").eq(collection))
            .to_owned();
        Ok(self
            .db
            .query_one_raw(self.backend.build(&select))
            .await?
            .map(|r| r.try_get::<i64>("", "seq"))
            .transpose()?
            .map_or(0, |s| s as u64))
    }

    /// Moves `collection`'s horizon by `retention` (as of `now_ms`) and removes what is behind
    /// it, `retention.batch_rows` rows per transaction, each transaction's duration given to
    /// `observe`; `dry_run` only counts.
    pub(crate) async fn compact(
        &self,
        collection: &str,
        retention: Retention,
        now_ms: u64,
        dry_run: bool,
        observe: &(dyn Fn(std::time::Duration) + Sync),
    ) -> Result<CompactionReport, StoreError> {
        let previous = self.horizon(collection).await?;
        let past_age = if retention.max_age_ms > 0 {
            let cutoff = now_ms.saturating_sub(retention.max_age_ms);
            let select = Query::select()
                .expr_as(Func::max(Expr::col("seq")), "s")
                .from("sg_changes")
                .and_where(Expr::col("collection").eq(collection))
                .and_where(Expr::col("committed_at").lt(cutoff as i64))
                .to_owned();
            self.optional_seq(select).await?
        } else {
            None
        };
        let past_count = if retention.max_changes > 0 {
            let select = Query::select()
                .expr_as(Expr::col("seq"), "s")
                .from("sg_changes")
                .and_where(Expr::col("collection").eq(collection))
                .order_by("seq", Order::Desc)
                .limit(1)
                .offset(retention.max_changes)
                .to_owned();
            self.optional_seq(select).await?
        } else {
            None
        };
        let horizon = next_horizon(previous, past_age, past_count);
        let mut report = CompactionReport {
            collection: collection.to_owned(),
            previous_horizon: previous,
            horizon,
            dry_run,
            ..CompactionReport::default()
        };
        if horizon == 0 {
            return Ok(report);
        }
        if !dry_run && horizon > previous {
            // Committed before anything behind it is removed (see the module docs).
            self.store_horizon(collection, horizon).await?;
        }
        let batch_rows = Ord::max(retention.batch_rows, 1);
        let mut after = 0u64;
        loop {
            let batch = self
                .removable(collection, after, horizon, batch_rows)
                .await?;
            let Some(last) = batch.last() else {
                break;
            };
            after = last.seq;
            let tombstones = batch.iter().filter(|r| r.tombstone).count() as u64;
            report.tombstones += tombstones;
            report.superseded += batch.len() as u64 - tombstones;
            if !dry_run {
                let held = self.remove_changes(&batch).await?;
                observe(held);
                report.longest_batch_us =
                    Ord::max(report.longest_batch_us, held.as_micros() as u64);
            }
            if (batch.len() as u64) < batch_rows {
                break;
            }
        }
        let mut after_id = String::new();
        loop {
            let select = Query::select()
                .column("doc_id")
                .from("sg_documents")
                .and_where(Expr::col("collection").eq(collection))
                .and_where(Expr::col("deleted").ne(0))
                .and_where(Expr::col("version").lte(horizon as i64))
                .and_where(Expr::col("doc_id").gt(after_id.as_str()))
                .order_by("doc_id", Order::Asc)
                .limit(batch_rows)
                .to_owned();
            let ids: Vec<String> = self
                .db
                .query_all_raw(self.backend.build(&select))
                .await?
                .iter()
                .map(|r| r.try_get::<String>("", "doc_id"))
                .collect::<Result<_, _>>()?;
            let Some(last) = ids.last() else { break };
            after_id = last.clone();
            report.deleted_documents += ids.len() as u64;
            if !dry_run {
                // The condition is checked again by the delete itself: a document created
                // again meanwhile is live (or newer) and stays.
                let delete = Query::delete()
                    .from_table("sg_documents")
                    .and_where(Expr::col("collection").eq(collection))
                    .and_where(Expr::col("doc_id").is_in(ids.iter().map(String::as_str)))
                    .and_where(Expr::col("deleted").ne(0))
                    .and_where(Expr::col("version").lte(horizon as i64))
                    .to_owned();
                let turn = self.log_writer_turn().await;
                let started = std::time::Instant::now();
                let delete = self.backend.build(&delete);
                match &turn {
                    Some(writer) => writer.execute_raw(delete).await?,
                    None => self.db.execute_raw(delete).await?,
                };
                drop(turn);
                observe(started.elapsed());
                report.longest_batch_us = Ord::max(
                    report.longest_batch_us,
                    started.elapsed().as_micros() as u64,
                );
            }
            if (ids.len() as u64) < batch_rows {
                break;
            }
        }
        Ok(report)
    }

    async fn optional_seq(
        &self,
        select: sea_orm::sea_query::SelectStatement,
    ) -> Result<Option<u64>, StoreError> {
        Ok(self
            .db
            .query_one_raw(self.backend.build(&select))
            .await?
            .map(|r| r.try_get::<Option<i64>>("", "s"))
            .transpose()?
            .flatten()
            .map(|s| s as u64))
    }

    async fn store_horizon(&self, collection: &str, horizon: u64) -> Result<(), StoreError> {
        let insert = Query::insert()
            .into_table("sg_horizons")
            .columns(["collection", "seq", "updated_at"])
            .values_panic([collection.into(), (horizon as i64).into(), now_ms().into()])
            .on_conflict(
                OnConflict::column("collection")
                    .update_columns(["seq", "updated_at"])
                    // Never backwards, whichever node compacts.
                    .action_and_where(
                        Expr::col((Alias::new("sg_horizons"), Alias::new("seq")))
                            .lt(horizon as i64),
                    )
                    .to_owned(),
            )
            .to_owned();
        self.db.execute_raw(self.backend.build(&insert)).await?;
        Ok(())
    }

    /// The next up to `batch_rows` changes behind `horizon` after seq `after` that
    /// may go: tombstones and versions a later change of the same document supersedes.
    async fn removable(
        &self,
        collection: &str,
        after: u64,
        horizon: u64,
        batch_rows: u64,
    ) -> Result<Vec<Removable>, StoreError> {
        let later = Query::select()
            .expr(Expr::val(1))
            .from_as("sg_changes", Alias::new("n"))
            .and_where(
                Expr::col((Alias::new("n"), Alias::new("collection")))
                    .equals((Alias::new("c"), Alias::new("collection"))),
            )
            .and_where(
                Expr::col((Alias::new("n"), Alias::new("doc_id")))
                    .equals((Alias::new("c"), Alias::new("doc_id"))),
            )
            .and_where(
                Expr::col((Alias::new("n"), Alias::new("seq")))
                    .gt(Expr::col((Alias::new("c"), Alias::new("seq")))),
            )
            .to_owned();
        let select = Query::select()
            .columns(["seq", "op", "origin_client", "origin_mutation"])
            .from_as("sg_changes", Alias::new("c"))
            .and_where(Expr::col((Alias::new("c"), Alias::new("collection"))).eq(collection))
            .and_where(Expr::col((Alias::new("c"), Alias::new("seq"))).gt(after as i64))
            .and_where(Expr::col((Alias::new("c"), Alias::new("seq"))).lte(horizon as i64))
            .and_where(
                Expr::col((Alias::new("c"), Alias::new("op")))
                    .ne(0)
                    .or(Expr::exists(later)),
            )
            .order_by((Alias::new("c"), Alias::new("seq")), Order::Asc)
            .limit(batch_rows)
            .to_owned();
        self.db
            .query_all_raw(self.backend.build(&select))
            .await?
            .iter()
            .map(|r| {
                let client: Option<String> = r.try_get("", "origin_client")?;
                let mutation: Option<i64> = r.try_get("", "origin_mutation")?;
                Ok(Removable {
                    seq: r.try_get::<i64>("", "seq")? as u64,
                    tombstone: r.try_get::<i64>("", "op")? != 0,
                    origin: client.zip(mutation.map(|m| m as u64)),
                })
            })
            .collect()
    }

    /// Removes changes from the log in one transaction, keeping each one's exactly-once
    /// record in `sg_applied`. Returns how long the transaction took (after its turn).
    async fn remove_changes(&self, batch: &[Removable]) -> Result<std::time::Duration, StoreError> {
        let turn = self.log_writer_turn().await;
        let started = std::time::Instant::now();
        let txn = match &turn {
            Some(writer) => writer.begin().await?,
            None => self.db.begin().await?,
        };
        let origins: Vec<(&str, u64, u64)> = batch
            .iter()
            .filter_map(|r| r.origin.as_ref().map(|(c, m)| (c.as_str(), *m, r.seq)))
            .collect();
        for chunk in origins.chunks(200) {
            let mut insert = Query::insert()
                .into_table("sg_applied")
                .columns(["client_id", "mutation_id", "seq"])
                .on_conflict(
                    OnConflict::columns(["client_id", "mutation_id"])
                        .do_nothing()
                        .to_owned(),
                )
                .to_owned();
            for (client, mutation, seq) in chunk {
                insert.values_panic([
                    (*client).into(),
                    (*mutation as i64).into(),
                    (*seq as i64).into(),
                ]);
            }
            txn.execute_raw(self.backend.build(&insert)).await?;
        }
        let seqs: Vec<i64> = batch.iter().map(|r| r.seq as i64).collect();
        for chunk in seqs.chunks(200) {
            let delete = Query::delete()
                .from_table("sg_changes")
                .and_where(Expr::col("seq").is_in(chunk.iter().copied()))
                .to_owned();
            txn.execute_raw(self.backend.build(&delete)).await?;
        }
        txn.commit().await?;
        Ok(started.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_horizon_takes_the_stricter_limit_and_never_goes_back() {
        assert_eq!(next_horizon(0, None, None), 0);
        assert_eq!(next_horizon(0, Some(40), None), 40);
        assert_eq!(next_horizon(0, None, Some(70)), 70);
        assert_eq!(next_horizon(0, Some(40), Some(70)), 70);
        assert_eq!(next_horizon(0, Some(90), Some(70)), 90);
        assert_eq!(next_horizon(100, Some(90), Some(70)), 100);
    }
}
