//! Claiming client ids in groups: many `hello`s that bring a client id nobody holds yet are
//! answered from one transaction (one commit, one fsync), the way pushes share a group commit.
//! A reconnect storm of 10,000 new installations otherwise queued 10,000 durable single-row
//! commits, and the connections waiting on them held their handshake memory meanwhile.
//!
//! What a group decides is [`decide`], pure; [`Store::claim_clients`] reads, decides, writes;
//! [`run`] is the task that takes queued claims ([`Claim`]) and answers them a group at a time.
//! A client id that is already held (every reconnect of a known installation) never comes
//! here: the connection reads its owner directly ([`Store::client_owner`]). The queue is
//! bounded: a full queue makes a handshake wait (within `handshake_timeout_ms`).

use std::collections::HashMap;

use sea_orm::ConnectionTrait;
use sea_orm::sea_query::{Expr, ExprTrait, OnConflict, Query};
use tokio::sync::{mpsc, oneshot};

use super::{ClientClaim, Store, StoreError, now_ms};

/// Rows per statement (SQLite allows 32,766 bound values; four per row).
const CHUNK: usize = 500;

/// Who holds a client id: the user and its horizon.
type Holder = (String, u64);

/// What a group of claims does, given who holds each id already and how many ids each user
/// owns: one claim per request, in order, and the `(client_id, user)` rows to insert. An id
/// nobody holds goes to the first request for it, unless that user owns `quota` ids already
/// (0 = no quota); a later request for it in the same group finds it held.
pub(crate) fn decide(
    requests: &[(String, String)],
    holders: &mut HashMap<String, Holder>,
    owned: &mut HashMap<String, u64>,
    quota: u64,
) -> (Vec<ClientClaim>, Vec<(String, String)>) {
    let mut claims = Vec::with_capacity(requests.len());
    let mut inserts = Vec::new();
    for (client_id, user) in requests {
        let claim = match holders.get(client_id) {
            Some((holder, last)) if holder == user => ClientClaim::Owned {
                last_applied: *last,
            },
            Some(_) => ClientClaim::Taken,
            None => {
                let count = owned.entry(user.clone()).or_insert(0);
                if quota > 0 && *count >= quota {
                    ClientClaim::OverQuota
                } else {
                    *count += 1;
                    holders.insert(client_id.clone(), (user.clone(), 0));
                    inserts.push((client_id.clone(), user.clone()));
                    ClientClaim::Owned { last_applied: 0 }
                }
            }
        };
        claims.push(claim);
    }
    (claims, inserts)
}

impl Store {
    /// Claims client ids for `(client_id, user)` requests in one transaction and says, per
    /// request, who holds the id now (see [`decide`]). Ids another node claimed at the same
    /// moment are read back after the insert, so every node agrees on the owner.
    pub async fn claim_clients(
        &self,
        requests: &[(String, String)],
        quota: u64,
    ) -> Result<Vec<ClientClaim>, StoreError> {
        let txn = self.begin().await?;
        if self.backend == sea_orm::DbBackend::Sqlite {
            // Take SQLite's write lock before reading: a deferred transaction that reads and
            // then writes fails with SQLITE_BUSY_SNAPSHOT (no busy wait) when a group commit
            // wrote in between. (PostgreSQL needs nothing: the insert below skips ids another
            // transaction claimed, and they are read back.)
            let lock = Query::update()
                .table("sg_meta")
                .value("value", Expr::col("value"))
                .and_where(Expr::col("key").eq("schema_version"))
                .to_owned();
            txn.execute_raw(self.backend.build(&lock)).await?;
        }
        let mut ids: Vec<&str> = requests.iter().map(|(c, _)| c.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        let mut holders = HashMap::new();
        for chunk in ids.chunks(CHUNK) {
            read_holders(&txn, self.backend, chunk, &mut holders).await?;
        }
        let mut owned: HashMap<String, u64> = HashMap::new();
        if quota > 0 {
            let mut users: Vec<&str> = requests
                .iter()
                .filter(|(c, _)| !holders.contains_key(c))
                .map(|(_, u)| u.as_str())
                .collect();
            users.sort_unstable();
            users.dedup();
            for chunk in users.chunks(CHUNK) {
                let count = Query::select()
                    .column("user_id")
                    .expr_as(Expr::col("client_id").count(), "n")
                    .from("sg_clients")
                    .and_where(Expr::col("user_id").is_in(chunk.iter().copied()))
                    .group_by_col("user_id")
                    .to_owned();
                for r in txn.query_all_raw(self.backend.build(&count)).await? {
                    let user: String = r.try_get("", "user_id")?;
                    owned.insert(user, r.try_get::<i64>("", "n")? as u64);
                }
            }
        }
        let (mut claims, inserts) = decide(requests, &mut holders, &mut owned, quota);
        if !inserts.is_empty() {
            let now = now_ms();
            for chunk in inserts.chunks(CHUNK) {
                let mut insert = Query::insert()
                    .into_table("sg_clients")
                    .columns(["client_id", "last_mutation", "user_id", "updated_at"])
                    .on_conflict(OnConflict::column("client_id").do_nothing().to_owned())
                    .to_owned();
                for (client_id, user) in chunk {
                    insert
                        .values([
                            client_id.as_str().into(),
                            0i64.into(),
                            user.as_str().into(),
                            now.into(),
                        ])
                        .map_err(|e| StoreError::Statement(e.to_string()))?;
                }
                txn.execute_raw(self.backend.build(&insert)).await?;
            }
            // Who holds the new ids now (another node may have inserted first).
            let new_ids: Vec<&str> = inserts.iter().map(|(c, _)| c.as_str()).collect();
            let mut now_held = HashMap::new();
            for chunk in new_ids.chunks(CHUNK) {
                read_holders(&txn, self.backend, chunk, &mut now_held).await?;
            }
            for ((client_id, user), claim) in requests.iter().zip(claims.iter_mut()) {
                if let (ClientClaim::Owned { .. }, Some((holder, last))) =
                    (&claim, now_held.get(client_id))
                {
                    *claim = if holder == user {
                        ClientClaim::Owned {
                            last_applied: *last,
                        }
                    } else {
                        ClientClaim::Taken
                    };
                }
            }
        }
        txn.commit().await?;
        Ok(claims)
    }
}

async fn read_holders(
    txn: &impl ConnectionTrait,
    backend: sea_orm::DbBackend,
    ids: &[&str],
    into: &mut HashMap<String, Holder>,
) -> Result<(), StoreError> {
    let select = Query::select()
        .columns(["client_id", "user_id", "last_mutation"])
        .from("sg_clients")
        .and_where(Expr::col("client_id").is_in(ids.iter().copied()))
        .to_owned();
    for r in txn.query_all_raw(backend.build(&select)).await? {
        let id: String = r.try_get("", "client_id")?;
        let user: String = r.try_get("", "user_id")?;
        let last = r.try_get::<i64>("", "last_mutation")? as u64;
        into.insert(id, (user, last));
    }
    Ok(())
}

/// Most claims answered by one transaction.
const GROUP: usize = 512;
/// Claims that may wait.
pub(crate) const QUEUE: usize = 4096;

/// One handshake's claim.
pub(crate) struct Claim {
    pub client_id: String,
    pub user: String,
    /// `None`: the database failed (the handshake is answered with a storage error).
    pub reply: oneshot::Sender<Option<ClientClaim>>,
}

/// Answers claims in groups until every sender is gone.
pub(crate) async fn run(store: Store, mut rx: mpsc::Receiver<Claim>, quota: u64) {
    let mut group = Vec::with_capacity(GROUP);
    while rx.recv_many(&mut group, GROUP).await > 0 {
        let requests: Vec<(String, String)> = group
            .iter()
            .map(|c| (c.client_id.clone(), c.user.clone()))
            .collect();
        match store.claim_clients(&requests, quota).await {
            Ok(claims) => {
                for (c, claim) in group.drain(..).zip(claims) {
                    let _ = c.reply.send(Some(claim));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, claims = group.len(), "claiming client ids failed");
                for c in group.drain(..) {
                    let _ = c.reply.send(None);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(c, u)| ((*c).to_owned(), (*u).to_owned()))
            .collect()
    }

    #[test]
    fn a_group_gives_each_new_id_to_its_first_requester_within_the_quota() {
        let mut holders: HashMap<String, Holder> =
            [("old".to_owned(), ("alice".to_owned(), 7))].into();
        let mut owned: HashMap<String, u64> = [("alice".to_owned(), 1)].into();
        let requests = req(&[
            ("old", "alice"),
            ("old", "bob"),
            ("new-1", "bob"),
            ("new-1", "alice"),
            ("new-1", "bob"),
            ("new-2", "alice"),
            ("new-3", "alice"),
        ]);
        let (claims, inserts) = decide(&requests, &mut holders, &mut owned, 2);
        use ClientClaim::*;
        assert_eq!(
            claims,
            [
                Owned { last_applied: 7 },
                Taken,
                Owned { last_applied: 0 },
                Taken,
                Owned { last_applied: 0 },
                Owned { last_applied: 0 },
                OverQuota,
            ]
        );
        assert_eq!(inserts, req(&[("new-1", "bob"), ("new-2", "alice")]));
        // Without a quota every new id is claimed.
        let (claims, _) = decide(&req(&[("new-9", "carol")]), &mut holders, &mut owned, 0);
        assert_eq!(claims, [Owned { last_applied: 0 }]);
    }
}
