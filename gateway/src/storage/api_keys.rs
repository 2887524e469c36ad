//! The `sg_api_keys` table: API keys by id, each with its name, user, roles, claims, the hash
//! of its secret, and when it was created and revoked. Revoked rows stay (an audit trail).

use sea_orm::ConnectionTrait;
use sea_orm::sea_query::{Expr, ExprTrait, Order, Query};

use super::{Store, StoreError, now_ms};
use crate::auth::api_key::ApiKey;

const COLUMNS: [&str; 7] = [
    "key_id",
    "name",
    "user_id",
    "roles",
    "claims",
    "secret_hash",
    "created_at",
];

/// Why a key could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateKeyError {
    /// Another key (revoked or not) has the name.
    #[error("an API key named {0:?} exists already (names stay taken after a revoke)")]
    NameTaken(String),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Store {
    /// Stores a new key; its name must be unused.
    pub async fn create_api_key(&self, key: &ApiKey) -> Result<(), CreateKeyError> {
        let txn = self.begin().await.map_err(StoreError::from)?;
        let taken = Query::select()
            .column("key_id")
            .from("sg_api_keys")
            .and_where(Expr::col("name").eq(key.name.as_str()))
            .to_owned();
        if txn
            .query_one_raw(self.backend.build(&taken))
            .await
            .map_err(StoreError::from)?
            .is_some()
        {
            return Err(CreateKeyError::NameTaken(key.name.clone()));
        }
        let json =
            |v: serde_json::Result<String>| v.map_err(|e| StoreError::Statement(e.to_string()));
        let insert = Query::insert()
            .into_table("sg_api_keys")
            .columns(COLUMNS)
            .values([
                key.id.as_str().into(),
                key.name.as_str().into(),
                key.user.as_str().into(),
                json(serde_json::to_string(&key.roles))?.into(),
                json(serde_json::to_string(&key.claims))?.into(),
                key.secret_hash.as_str().into(),
                key.created_at_ms.into(),
            ])
            .map_err(|e| StoreError::Statement(e.to_string()))?
            .to_owned();
        txn.execute_raw(self.backend.build(&insert))
            .await
            .map_err(StoreError::from)?;
        txn.commit().await.map_err(StoreError::from)?;
        Ok(())
    }

    /// The key with this id (revoked or not).
    pub async fn api_key(&self, id: &str) -> Result<Option<ApiKey>, StoreError> {
        let select = select().and_where(Expr::col("key_id").eq(id)).to_owned();
        self.db
            .query_one_raw(self.backend.build(&select))
            .await?
            .map(|r| row(&r))
            .transpose()
    }

    /// Every key, oldest first.
    pub async fn api_keys(&self) -> Result<Vec<ApiKey>, StoreError> {
        let select = select().order_by("created_at", Order::Asc).to_owned();
        self.db
            .query_all_raw(self.backend.build(&select))
            .await?
            .iter()
            .map(row)
            .collect()
    }

    /// Revokes the key with this id or name; returns it, or `None` if there is none. A key
    /// revoked before keeps its first revocation time.
    pub async fn revoke_api_key(&self, id_or_name: &str) -> Result<Option<ApiKey>, StoreError> {
        let update = Query::update()
            .table("sg_api_keys")
            .value("revoked_at", now_ms())
            .and_where(
                Expr::col("key_id")
                    .eq(id_or_name)
                    .or(Expr::col("name").eq(id_or_name)),
            )
            .and_where(Expr::col("revoked_at").is_null())
            .to_owned();
        self.db.execute_raw(self.backend.build(&update)).await?;
        let select = select()
            .and_where(
                Expr::col("key_id")
                    .eq(id_or_name)
                    .or(Expr::col("name").eq(id_or_name)),
            )
            .to_owned();
        self.db
            .query_one_raw(self.backend.build(&select))
            .await?
            .map(|r| row(&r))
            .transpose()
    }
}

fn select() -> sea_orm::sea_query::SelectStatement {
    Query::select()
        .columns(COLUMNS)
        .column("revoked_at")
        .from("sg_api_keys")
        .to_owned()
}

fn row(r: &sea_orm::QueryResult) -> Result<ApiKey, StoreError> {
    let json = |col: &str| -> Result<String, StoreError> { Ok(r.try_get("", col)?) };
    let corrupt = |e: serde_json::Error| StoreError::Corrupt(format!("sg_api_keys: {e}"));
    Ok(ApiKey {
        id: r.try_get("", "key_id")?,
        name: r.try_get("", "name")?,
        user: r.try_get("", "user_id")?,
        roles: serde_json::from_str(&json("roles")?).map_err(corrupt)?,
        claims: serde_json::from_str(&json("claims")?).map_err(corrupt)?,
        secret_hash: r.try_get("", "secret_hash")?,
        created_at_ms: r.try_get("", "created_at")?,
        revoked_at_ms: r.try_get("", "revoked_at")?,
    })
}
