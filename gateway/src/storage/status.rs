//! `syncgate admin status`: what the database holds, read in a few grouped counts (no scan of
//! the change log: its size is told by the head and the horizons).

use std::collections::BTreeMap;

use sea_orm::{ConnectionTrait, Statement};

use super::{Store, StoreError};

/// One collection's part of [`Status`].
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CollectionStatus {
    /// Live documents.
    pub documents: u64,
    /// Deleted documents whose rows are kept until compaction purges them.
    pub deleted: u64,
    /// The compaction horizon (0: never compacted): cursors older than it resync.
    pub horizon: u64,
    /// `manual` conflicts waiting for a resolution.
    pub conflicts_open: u64,
    /// The table attached to it (`capture attach`), if any.
    pub captured_from: Option<String>,
}

/// The database's state for an operator.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Status {
    /// The log head: the newest committed change.
    pub head: u64,
    /// The database's epoch (cursors of another epoch resync).
    pub epoch: String,
    /// Client installations (client ids) ever seen.
    pub clients: u64,
    /// Sync errors (rejected mutations) nobody has discarded or retried.
    pub sync_errors_open: u64,
    /// Per collection: the declared ones, and any other found in the database.
    pub collections: BTreeMap<String, CollectionStatus>,
}

impl Store {
    /// Counts per collection from one grouped query: `collection, n`.
    async fn counts_by_collection(&self, sql: &str) -> Result<Vec<(String, u64)>, StoreError> {
        let rows = self
            .db
            .query_all_raw(Statement::from_string(self.backend, sql))
            .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get::<String>("", "collection")?,
                    r.try_get::<i64>("", "n")? as u64,
                ))
            })
            .collect()
    }

    async fn count(&self, sql: &str) -> Result<u64, StoreError> {
        Ok(self
            .db
            .query_one_raw(Statement::from_string(self.backend, sql))
            .await?
            .map(|r| r.try_get::<i64>("", "n"))
            .transpose()?
            .unwrap_or(0) as u64)
    }

    /// The database's state; `declared` collections are listed even when empty.
    pub async fn status(&self, declared: &[&str]) -> Result<Status, StoreError> {
        let mut collections: BTreeMap<String, CollectionStatus> = declared
            .iter()
            .map(|c| ((*c).to_owned(), CollectionStatus::default()))
            .collect();
        for (c, n) in self
            .counts_by_collection(
                "SELECT collection, COUNT(*) AS n FROM sg_documents WHERE deleted = 0 \
                 GROUP BY collection",
            )
            .await?
        {
            collections.entry(c).or_default().documents = n;
        }
        for (c, n) in self
            .counts_by_collection(
                "SELECT collection, COUNT(*) AS n FROM sg_documents WHERE deleted <> 0 \
                 GROUP BY collection",
            )
            .await?
        {
            collections.entry(c).or_default().deleted = n;
        }
        for (c, n) in self
            .counts_by_collection(
                "SELECT collection, COUNT(*) AS n FROM sg_conflicts WHERE state = 'open' \
                 GROUP BY collection",
            )
            .await?
        {
            collections.entry(c).or_default().conflicts_open = n;
        }
        for (c, h) in self.horizons().await? {
            collections.entry(c).or_default().horizon = h;
        }
        for capture in self.captures().await? {
            collections
                .entry(capture.collection)
                .or_default()
                .captured_from = Some(capture.table);
        }
        Ok(Status {
            head: self.head().await?,
            epoch: self.epoch().to_owned(),
            clients: self.count("SELECT COUNT(*) AS n FROM sg_clients").await?,
            sync_errors_open: self
                .count(
                    "SELECT COUNT(*) AS n FROM sg_sync_errors e LEFT JOIN sg_sync_error_state s \
                     ON s.client_id = e.client_id AND s.mutation_id = e.mutation_id \
                     WHERE s.state IS NULL OR s.state = 'open'",
                )
                .await?,
            collections,
        })
    }
}
