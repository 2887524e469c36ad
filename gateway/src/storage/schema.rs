//! The schema and its migrations. Migrations are idempotent and run on every start; on
//! PostgreSQL they hold an advisory lock so that several nodes starting together do not race.
//!
//! A node starts while others write (a rolling restart): on PostgreSQL a statement whose
//! object exists already is skipped, not run. `CREATE INDEX IF NOT EXISTS` takes a share lock
//! on its table before it finds the index, and held to the end of the migration that lock
//! met a running group commit's head lock in a deadlock: the starting node failed its start
//! and the group commit failed its clients' pushes (`storage_unavailable`). The head row is
//! created only if missing, by a plain read that waits for no row lock.

use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, DbErr, TransactionTrait};

use sea_orm::DatabaseTransaction;
use sea_orm::sea_query::{Expr, ExprTrait, OnConflict, Query};

/// Current schema version, recorded in `sg_meta`.
const SCHEMA_VERSION: i64 = 1;

const TABLES: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS sg_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS sg_head (id INTEGER PRIMARY KEY, seq BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS sg_changes (
        seq BIGINT PRIMARY KEY,
        collection TEXT NOT NULL,
        doc_id TEXT NOT NULL,
        op BIGINT NOT NULL,
        body {BLOB},
        prev_body {BLOB},
        origin_client TEXT,
        origin_mutation BIGINT,
        committed_at BIGINT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS sg_changes_collection ON sg_changes (collection, seq)",
    "CREATE INDEX IF NOT EXISTS sg_changes_origin ON sg_changes (origin_client, origin_mutation)",
    "CREATE INDEX IF NOT EXISTS sg_changes_doc ON sg_changes (collection, doc_id, seq)",
    "CREATE TABLE IF NOT EXISTS sg_documents (
        collection TEXT NOT NULL,
        doc_id TEXT NOT NULL,
        body {BLOB},
        version BIGINT NOT NULL,
        deleted BIGINT NOT NULL,
        PRIMARY KEY (collection, doc_id))",
    "CREATE TABLE IF NOT EXISTS sg_clients (
        client_id TEXT PRIMARY KEY,
        last_mutation BIGINT NOT NULL,
        user_id TEXT NOT NULL,
        updated_at BIGINT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS sg_clients_user ON sg_clients (user_id)",
    "CREATE TABLE IF NOT EXISTS sg_sync_errors (
        client_id TEXT NOT NULL,
        mutation_id BIGINT NOT NULL,
        batch BIGINT NOT NULL,
        code BIGINT NOT NULL,
        reason TEXT NOT NULL,
        mutation {BLOB} NOT NULL,
        created_at BIGINT NOT NULL,
        PRIMARY KEY (client_id, mutation_id))",
    "CREATE TABLE IF NOT EXISTS sg_sync_error_state (
        client_id TEXT NOT NULL,
        mutation_id BIGINT NOT NULL,
        state TEXT NOT NULL,
        attempts BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        PRIMARY KEY (client_id, mutation_id))",
    "CREATE TABLE IF NOT EXISTS sg_conflicts (
        client_id TEXT NOT NULL,
        mutation_id BIGINT NOT NULL,
        collection TEXT NOT NULL,
        doc_id TEXT NOT NULL,
        policy TEXT NOT NULL,
        outcome TEXT NOT NULL,
        base_version BIGINT NOT NULL,
        server_version BIGINT NOT NULL,
        server_body {BLOB},
        client_body {BLOB},
        applied_version BIGINT,
        other_clients TEXT NOT NULL,
        state TEXT NOT NULL,
        resolved_by TEXT,
        resolved_version BIGINT,
        created_at BIGINT NOT NULL,
        resolved_at BIGINT,
        PRIMARY KEY (client_id, mutation_id))",
    "CREATE INDEX IF NOT EXISTS sg_conflicts_doc ON sg_conflicts (collection, doc_id)",
    "CREATE TABLE IF NOT EXISTS sg_idempotency (
        client_id TEXT PRIMARY KEY,
        request_hash TEXT NOT NULL,
        created_at BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS sg_horizons (
        collection TEXT PRIMARY KEY,
        seq BIGINT NOT NULL,
        updated_at BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS sg_applied (
        client_id TEXT NOT NULL,
        mutation_id BIGINT NOT NULL,
        seq BIGINT NOT NULL,
        PRIMARY KEY (client_id, mutation_id))",
    "CREATE TABLE IF NOT EXISTS sg_captures (
        table_name TEXT PRIMARY KEY,
        collection TEXT NOT NULL UNIQUE,
        key_column TEXT NOT NULL,
        created_at BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS sg_api_keys (
        key_id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        user_id TEXT NOT NULL,
        roles TEXT NOT NULL,
        claims TEXT NOT NULL,
        secret_hash TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        revoked_at BIGINT)",
    "CREATE TABLE IF NOT EXISTS sg_usage (
        user_id TEXT PRIMARY KEY,
        documents BIGINT NOT NULL,
        sync_errors BIGINT NOT NULL)",
    "INSERT INTO sg_head (id, seq) SELECT 1, 0 WHERE NOT EXISTS (SELECT 1 FROM sg_head WHERE id = 1)",
];

/// The table or index a `CREATE ... IF NOT EXISTS` statement creates (`None`: another kind
/// of statement).
fn created_object(ddl: &str) -> Option<&str> {
    let rest = ddl
        .strip_prefix("CREATE TABLE IF NOT EXISTS ")
        .or_else(|| ddl.strip_prefix("CREATE INDEX IF NOT EXISTS "))?;
    rest.split(|c: char| c.is_whitespace() || c == '(')
        .next()
        .filter(|name| !name.is_empty())
}

/// Creates or upgrades the schema and returns the database's epoch.
pub(super) async fn migrate(db: &DatabaseConnection, backend: DbBackend) -> Result<String, DbErr> {
    let blob = if backend == DbBackend::Postgres {
        "BYTEA"
    } else {
        "BLOB"
    };
    let txn = db.begin().await?;
    if backend == DbBackend::Postgres {
        // An arbitrary constant: "syncgate" in ASCII.
        txn.execute_unprepared("SELECT pg_advisory_xact_lock(7310594436045332069)")
            .await?;
    }
    for ddl in TABLES {
        if backend == DbBackend::Postgres
            && let Some(object) = created_object(ddl)
        {
            let exists = txn
                .query_one_raw(sea_orm::Statement::from_sql_and_values(
                    backend,
                    "SELECT to_regclass($1) IS NOT NULL AS present",
                    [object.into()],
                ))
                .await?
                .map(|r| r.try_get::<bool>("", "present"))
                .transpose()?
                .unwrap_or(false);
            if exists {
                continue;
            }
        }
        txn.execute_unprepared(&ddl.replace("{BLOB}", blob)).await?;
    }
    let version = meta(&txn, backend, "schema_version").await?;
    match version.as_deref().map(str::parse::<i64>) {
        None => {
            let insert = Query::insert()
                .into_table("sg_meta")
                .columns(["key", "value"])
                .values_panic(["schema_version".into(), SCHEMA_VERSION.to_string().into()])
                .to_owned();
            txn.execute_raw(backend.build(&insert)).await?;
        }
        Some(Ok(v)) if v == SCHEMA_VERSION => {}
        Some(Ok(v)) if v > SCHEMA_VERSION => {
            return Err(DbErr::Custom(format!(
                "database schema version {v} is newer than this gateway ({SCHEMA_VERSION}); upgrade the gateway"
            )));
        }
        Some(other) => {
            return Err(DbErr::Custom(format!(
                "unreadable schema version in sg_meta: {other:?}"
            )));
        }
    }
    let epoch = hex_random();
    let insert = Query::insert()
        .into_table("sg_meta")
        .columns(["key", "value"])
        .values_panic(["epoch".into(), epoch.into()])
        .on_conflict(OnConflict::column("key").do_nothing().to_owned())
        .to_owned();
    txn.execute_raw(backend.build(&insert)).await?;
    let epoch = meta(&txn, backend, "epoch")
        .await?
        .ok_or_else(|| DbErr::Custom("epoch missing after insert".into()))?;
    txn.commit().await?;
    Ok(epoch)
}

/// A value of `sg_meta`.
async fn meta(
    txn: &DatabaseTransaction,
    backend: DbBackend,
    key: &str,
) -> Result<Option<String>, DbErr> {
    let select = Query::select()
        .column("value")
        .from("sg_meta")
        .and_where(Expr::col("key").eq(key))
        .to_owned();
    txn.query_one_raw(backend.build(&select))
        .await?
        .map(|r| r.try_get::<String>("", "value"))
        .transpose()
}

fn hex_random() -> String {
    hex::encode(rand::random::<[u8; 8]>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_create_names_its_object() {
        assert_eq!(
            created_object("CREATE TABLE IF NOT EXISTS sg_meta (key TEXT PRIMARY KEY)"),
            Some("sg_meta")
        );
        assert_eq!(
            created_object("CREATE INDEX IF NOT EXISTS sg_changes_doc ON sg_changes (collection)"),
            Some("sg_changes_doc")
        );
        assert_eq!(
            created_object("INSERT INTO sg_head (id, seq) SELECT 1, 0"),
            None
        );
        let creates = TABLES.iter().filter(|d| d.starts_with("CREATE")).count();
        let named = TABLES.iter().filter_map(|d| created_object(d)).count();
        assert_eq!(creates, named, "a CREATE the migration could not skip");
    }
}
