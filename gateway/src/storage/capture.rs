//! Capture of existing PostgreSQL tables: every `INSERT`, `UPDATE` and `DELETE` on an attached
//! table, by any SQL client, becomes a change of a collection in the same transaction.
//!
//! `capture attach` (the key column must be unique: a primary key or a unique index of its
//! own) installs a type and three functions (idempotent) and three statement-level `AFTER`
//! triggers on the table:
//! - `syncgate_msgpack(jsonb)`: a row (`to_jsonb`) as a MessagePack map, keys in byte order.
//! - `syncgate_capture_apply(collection, changes, at_ms)`: what a group commit does for a run
//!   of changes (`syncgate_change`: id, op, body): takes the log head lock and moves the head
//!   by the run's length in one `UPDATE sg_head`, so the changes are numbered in commit order
//!   with every other writer on every node (the visibility-order invariant: the lock is held
//!   until the ERP's transaction commits), appends them to `sg_changes` with each document's
//!   previous body, updates `sg_documents`, and notifies the gateways (`NOTIFY syncgate_log`,
//!   folded to one per transaction).
//! - `syncgate_capture()`: three statement-level triggers (insert, update, delete) with
//!   transition tables, so a statement that writes 10,000 rows moves the head once (a head
//!   updated once per row in one transaction gets slower with every update: each walks the
//!   row's versions). The key column is the document id; an update that changes a key is a
//!   delete of the old id and an upsert of the new one.
//!
//! The functions keep the `search_path` they were created with (the gateway's, where the
//! `sg_*` tables are), so an ERP session with another `search_path` writes the same log.
//!
//! Nothing is queued for the gateway: the log *is* the table the gateway reads, so the ERP's
//! writes never wait for a gateway (down or up), and a gateway that was down catches up from
//! the log like any subscriber. Attaching also copies every existing row into the collection
//! (and deletes the collection's documents that are not rows), under a lock that holds the
//! table's writers for that moment, so the collection mirrors the table from then on.
//!
//! Gateway writes to a captured collection are refused (`captured_collection`): the table is
//! the collection's only writer. [`super::GroupTxn::captured`] reads the attached collections
//! inside each group transaction, after the head lock, which `attach` also takes: a group
//! either sees the capture or committed before it.

use sea_orm::{ConnectionTrait, DbBackend, Statement, TransactionTrait};

use super::{NOTIFY_CHANNEL, Store, StoreError, now_ms};

/// The functions `attach` installs (PostgreSQL).
const FUNCTIONS: &str = r#"
CREATE OR REPLACE FUNCTION syncgate_mp_head(fix int, fixmax int, c8 int, c16 int, c32 int, n bigint)
RETURNS bytea LANGUAGE sql IMMUTABLE AS $f$
  SELECT CASE
    WHEN n < fixmax THEN set_byte('\x00'::bytea, 0, fix + n::int)
    WHEN c8 > 0 AND n < 256 THEN set_byte(set_byte('\x0000'::bytea, 0, c8), 1, n::int)
    WHEN n < 65536 THEN set_byte('\x00'::bytea, 0, c16) || substring(int4send(n::int) from 3 for 2)
    ELSE set_byte('\x00'::bytea, 0, c32) || int4send(n::int)
  END
$f$;

CREATE OR REPLACE FUNCTION syncgate_msgpack(j jsonb) RETURNS bytea
LANGUAGE plpgsql IMMUTABLE STRICT SET search_path FROM CURRENT AS $f$
DECLARE
  r bytea;
  b bytea;
  num numeric;
  e record;
BEGIN
  CASE jsonb_typeof(j)
  WHEN 'null' THEN RETURN '\xc0'::bytea;
  WHEN 'boolean' THEN
    IF j::boolean THEN RETURN '\xc3'::bytea; END IF;
    RETURN '\xc2'::bytea;
  WHEN 'string' THEN
    b := convert_to(j #>> '{}', 'UTF8');
    RETURN syncgate_mp_head(160, 32, 217, 218, 219, length(b)) || b;
  WHEN 'number' THEN
    num := j::numeric;
    IF num = trunc(num) AND num BETWEEN -9223372036854775808 AND 9223372036854775807 THEN
      IF num >= 0 AND num < 128 THEN RETURN set_byte('\x00'::bytea, 0, num::int); END IF;
      IF num < 0 AND num >= -32 THEN RETURN set_byte('\x00'::bytea, 0, (256 + num)::int); END IF;
      RETURN '\xd3'::bytea || int8send(num::bigint);
    END IF;
    RETURN '\xcb'::bytea || float8send(num::float8);
  WHEN 'array' THEN
    r := syncgate_mp_head(144, 16, 0, 220, 221, jsonb_array_length(j));
    FOR e IN SELECT a.value FROM jsonb_array_elements(j) WITH ORDINALITY AS a(value, i) ORDER BY a.i LOOP
      r := r || syncgate_msgpack(e.value);
    END LOOP;
    RETURN r;
  ELSE
    r := syncgate_mp_head(128, 16, 0, 222, 223, (SELECT count(*) FROM jsonb_object_keys(j)));
    FOR e IN SELECT o.key, o.value FROM jsonb_each(j) AS o ORDER BY o.key COLLATE "C" LOOP
      b := convert_to(e.key, 'UTF8');
      r := r || syncgate_mp_head(160, 32, 217, 218, 219, length(b)) || b || syncgate_msgpack(e.value);
    END LOOP;
    RETURN r;
  END CASE;
END
$f$;

DO $d$ BEGIN
  CREATE TYPE syncgate_change AS (k text, op bigint, body bytea);
EXCEPTION WHEN duplicate_object THEN NULL;
END $d$;

CREATE OR REPLACE FUNCTION syncgate_capture_apply(coll text, changes syncgate_change[], at_ms bigint)
RETURNS bigint LANGUAGE plpgsql SET search_path FROM CURRENT AS $f$
DECLARE
  n bigint := coalesce(array_length(changes, 1), 0);
  last bigint;
BEGIN
  IF n = 0 THEN RETURN 0; END IF;
  UPDATE sg_head SET seq = seq + n WHERE sg_head.id = 1 RETURNING seq INTO last;
  INSERT INTO sg_changes (seq, collection, doc_id, op, body, prev_body, origin_client, origin_mutation, committed_at)
    SELECT last - n + c.i, coll, c.k, c.op, c.body, d.body, 'capture:' || coll, NULL, at_ms
    FROM unnest(changes) WITH ORDINALITY AS c(k, op, body, i)
    LEFT JOIN sg_documents d ON d.collection = coll AND d.doc_id = c.k AND d.deleted = 0;
  INSERT INTO sg_documents (collection, doc_id, body, version, deleted)
    SELECT coll, c.k, c.body, last - n + c.i, c.op
    FROM unnest(changes) WITH ORDINALITY AS c(k, op, body, i)
    ON CONFLICT (collection, doc_id) DO UPDATE
      SET body = EXCLUDED.body, version = EXCLUDED.version, deleted = EXCLUDED.deleted;
  PERFORM pg_notify('{NOTIFY}', '');
  RETURN n;
END
$f$;

CREATE OR REPLACE FUNCTION syncgate_capture() RETURNS trigger LANGUAGE plpgsql
SET search_path FROM CURRENT AS $f$
DECLARE
  coll text := TG_ARGV[0];
  keycol text := TG_ARGV[1];
  at_ms bigint := (extract(epoch from clock_timestamp()) * 1000)::bigint;
  changes syncgate_change[];
BEGIN
  IF TG_OP = 'INSERT' THEN
    changes := ARRAY(SELECT ROW(to_jsonb(x) ->> keycol, 0, syncgate_msgpack(to_jsonb(x)))::syncgate_change
                     FROM syncgate_new x);
  ELSIF TG_OP = 'DELETE' THEN
    changes := ARRAY(SELECT ROW(to_jsonb(x) ->> keycol, 1, NULL)::syncgate_change FROM syncgate_old x);
  ELSE
    -- Keys that went away first (an update that changed a key), then every new row.
    changes := ARRAY(SELECT ROW(o.k, 1, NULL)::syncgate_change
                     FROM (SELECT to_jsonb(x) ->> keycol AS k FROM syncgate_old x) o
                     WHERE o.k NOT IN (SELECT to_jsonb(y) ->> keycol FROM syncgate_new y))
            || ARRAY(SELECT ROW(to_jsonb(x) ->> keycol, 0, syncgate_msgpack(to_jsonb(x)))::syncgate_change
                     FROM syncgate_new x);
  END IF;
  PERFORM syncgate_capture_apply(coll, changes, at_ms);
  RETURN NULL;
END
$f$;
"#;

/// The triggers on every attached table: name, event, transition tables.
const TRIGGERS: [(&str, &str, &str); 3] = [
    (
        "syncgate_capture_insert",
        "INSERT",
        "NEW TABLE AS syncgate_new",
    ),
    (
        "syncgate_capture_update",
        "UPDATE",
        "OLD TABLE AS syncgate_old NEW TABLE AS syncgate_new",
    ),
    (
        "syncgate_capture_delete",
        "DELETE",
        "OLD TABLE AS syncgate_old",
    ),
];

/// One attached table.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Capture {
    /// The table, as PostgreSQL names it (`erp.work_orders`).
    pub table: String,
    /// The collection its rows are documents of.
    pub collection: String,
    /// The column whose value (as text) is the document id.
    pub key: String,
    /// When it was attached (Unix milliseconds).
    pub attached_at_ms: u64,
}

/// What `attach` did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Attached {
    /// The table as PostgreSQL names it.
    pub table: String,
    /// Rows copied into the collection.
    pub rows: u64,
    /// Documents of the collection that were not rows, deleted.
    pub removed: u64,
}

/// Why a capture could not be attached or detached.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// Capture needs PostgreSQL.
    #[error("capture needs PostgreSQL: the tables are captured by a trigger in the database")]
    NotPostgres,
    /// The table does not exist.
    #[error("no table {0:?} in the database")]
    NoTable(String),
    /// The key column does not exist.
    #[error("table {table} has no column {key:?}")]
    NoColumn {
        /// The table.
        table: String,
        /// The column asked for.
        key: String,
    },
    /// The key column has no unique index of its own.
    #[error(
        "{key} is not a unique column of {table}: the key must be the primary key or have a \
         unique index of its own, since it is the document id"
    )]
    KeyNotUnique {
        /// The table.
        table: String,
        /// The key column.
        key: String,
    },
    /// The table is attached already.
    #[error("{table} is attached already (to {collection:?}); detach it first")]
    Attached {
        /// The table.
        table: String,
        /// Its collection.
        collection: String,
    },
    /// Another table feeds the collection already.
    #[error("collection {collection:?} is captured from {table} already")]
    CollectionTaken {
        /// The collection.
        collection: String,
        /// The table that feeds it.
        table: String,
    },
    /// A row has no key value.
    #[error("a row of {table} has a NULL {key}: every row needs a key to be a document")]
    NullKey {
        /// The table.
        table: String,
        /// The key column.
        key: String,
    },
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sea_orm::DbErr> for CaptureError {
    fn from(e: sea_orm::DbErr) -> Self {
        CaptureError::Store(StoreError::Db(e))
    }
}

/// A row of `sg_captures`.
fn capture_of(r: &sea_orm::QueryResult) -> Result<Capture, StoreError> {
    Ok(Capture {
        table: r.try_get("", "table_name")?,
        collection: r.try_get("", "collection")?,
        key: r.try_get("", "key_column")?,
        attached_at_ms: r.try_get::<i64>("", "created_at")? as u64,
    })
}

/// `'text'` as an SQL string literal.
fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

impl Store {
    /// Every attached table.
    pub async fn captures(&self) -> Result<Vec<Capture>, StoreError> {
        let rows = self
            .db
            .query_all_raw(Statement::from_string(
                self.backend,
                "SELECT table_name, collection, key_column, created_at FROM sg_captures \
                 ORDER BY table_name",
            ))
            .await?;
        rows.iter().map(capture_of).collect()
    }

    /// Attaches `table` to `collection` with `key` as the document id (see the module docs).
    pub async fn capture_attach(
        &self,
        table: &str,
        collection: &str,
        key: &str,
    ) -> Result<Attached, CaptureError> {
        if self.backend != DbBackend::Postgres {
            return Err(CaptureError::NotPostgres);
        }
        let txn = self.db.begin().await?;
        let pg = |sql: &str, values: Vec<sea_orm::Value>| {
            Statement::from_sql_and_values(DbBackend::Postgres, sql, values)
        };
        let Some(found) = txn
            .query_one_raw(pg("SELECT to_regclass($1)::text AS t", vec![table.into()]))
            .await?
            .map(|r| r.try_get::<Option<String>>("", "t"))
            .transpose()?
            .flatten()
        else {
            return Err(CaptureError::NoTable(table.to_owned()));
        };
        let column = txn
            .query_one_raw(pg(
                "SELECT 1 AS x FROM pg_attribute WHERE attrelid = $1::regclass AND attname = $2 \
                 AND attnum > 0 AND NOT attisdropped",
                vec![found.clone().into(), key.into()],
            ))
            .await?;
        if column.is_none() {
            return Err(CaptureError::NoColumn {
                table: found,
                key: key.to_owned(),
            });
        }
        let unique = txn
            .query_one_raw(pg(
                "SELECT 1 AS x FROM pg_index i JOIN pg_attribute a \
                 ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] \
                 WHERE i.indrelid = $1::regclass AND i.indisunique AND i.indnatts = 1 \
                 AND a.attname = $2",
                vec![found.clone().into(), key.into()],
            ))
            .await?;
        if unique.is_none() {
            return Err(CaptureError::KeyNotUnique {
                table: found,
                key: key.to_owned(),
            });
        }
        // The table's writers wait until the copy below and the trigger are committed (taken
        // before the log head, which a writer of another captured table may hold while it
        // waits for this table).
        txn.execute_unprepared(&format!("LOCK TABLE {found} IN SHARE ROW EXCLUSIVE MODE"))
            .await?;
        // Every writer of the log, on every node, waits from here until this commits.
        txn.execute_unprepared("UPDATE sg_head SET seq = seq WHERE id = 1")
            .await?;
        for c in self.captures_in(&txn).await? {
            if c.table == found {
                return Err(CaptureError::Attached {
                    table: found,
                    collection: c.collection,
                });
            }
            if c.collection == collection {
                return Err(CaptureError::CollectionTaken {
                    collection: collection.to_owned(),
                    table: c.table,
                });
            }
        }
        txn.execute_unprepared(&FUNCTIONS.replace("{NOTIFY}", NOTIFY_CHANNEL))
            .await?;
        let nulls = txn
            .query_one_raw(pg(
                &format!(
                    "SELECT count(*) AS n FROM {found} t WHERE to_jsonb(t) ->> {} IS NULL",
                    literal(key)
                ),
                vec![],
            ))
            .await?
            .map(|r| r.try_get::<i64>("", "n"))
            .transpose()?
            .unwrap_or(0);
        if nulls > 0 {
            return Err(CaptureError::NullKey {
                table: found,
                key: key.to_owned(),
            });
        }
        let at = now_ms();
        let count = |r: Option<sea_orm::QueryResult>| {
            r.map(|r| r.try_get::<i64>("", "n"))
                .transpose()
                .map(|n| n.unwrap_or(0))
        };
        let rows = count(
            txn.query_one_raw(pg(
                &format!(
                    "SELECT syncgate_capture_apply($1, ARRAY(SELECT ROW(to_jsonb(t) ->> {k}, 0, \
                     syncgate_msgpack(to_jsonb(t)))::syncgate_change FROM {found} t), $2) AS n",
                    k = literal(key)
                ),
                vec![collection.into(), at.into()],
            ))
            .await?,
        )?;
        // One hash anti-join: a lookup per document through `to_jsonb` could use no index.
        let removed = count(
            txn.query_one_raw(pg(
                &format!(
                    "SELECT syncgate_capture_apply($1, ARRAY(SELECT ROW(d.doc_id, 1, NULL)::syncgate_change \
                     FROM sg_documents d \
                     LEFT JOIN (SELECT to_jsonb(t) ->> {k} AS k FROM {found} t) r ON r.k = d.doc_id \
                     WHERE d.collection = $1 AND d.deleted = 0 AND r.k IS NULL), $2) AS n",
                    k = literal(key)
                ),
                vec![collection.into(), at.into()],
            ))
            .await?,
        )?;
        for (name, event, tables) in TRIGGERS {
            txn.execute_unprepared(&format!(
                "CREATE TRIGGER {name} AFTER {event} ON {found} REFERENCING {tables} \
                 FOR EACH STATEMENT EXECUTE FUNCTION syncgate_capture({}, {})",
                literal(collection),
                literal(key)
            ))
            .await?;
        }
        txn.execute_raw(pg(
            "INSERT INTO sg_captures (table_name, collection, key_column, created_at) \
             VALUES ($1, $2, $3, $4)",
            vec![
                found.clone().into(),
                collection.into(),
                key.into(),
                now_ms().into(),
            ],
        ))
        .await?;
        txn.commit().await?;
        Ok(Attached {
            table: found,
            rows: rows as u64,
            removed: removed as u64,
        })
    }

    /// Detaches `table`: its trigger is dropped, the collection keeps its documents and is
    /// writable by clients again. `None`: it was not attached.
    pub async fn capture_detach(&self, table: &str) -> Result<Option<Capture>, CaptureError> {
        if self.backend != DbBackend::Postgres {
            return Err(CaptureError::NotPostgres);
        }
        let txn = self.db.begin().await?;
        txn.execute_unprepared("UPDATE sg_head SET seq = seq WHERE id = 1")
            .await?;
        let found = txn
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT to_regclass($1)::text AS t",
                [table.into()],
            ))
            .await?
            .map(|r| r.try_get::<Option<String>>("", "t"))
            .transpose()?
            .flatten()
            .unwrap_or_else(|| table.to_owned());
        let Some(capture) = self
            .captures_in(&txn)
            .await?
            .into_iter()
            .find(|c| c.table == found)
        else {
            return Ok(None);
        };
        // The table may have been dropped meanwhile (and its trigger with it).
        if txn
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT to_regclass($1) IS NOT NULL AS e",
                [found.clone().into()],
            ))
            .await?
            .map(|r| r.try_get::<bool>("", "e"))
            .transpose()?
            .unwrap_or(false)
        {
            for (name, _, _) in TRIGGERS {
                txn.execute_unprepared(&format!("DROP TRIGGER IF EXISTS {name} ON {found}"))
                    .await?;
            }
        }
        txn.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "DELETE FROM sg_captures WHERE table_name = $1",
            [found.into()],
        ))
        .await?;
        txn.commit().await?;
        Ok(Some(capture))
    }

    async fn captures_in(&self, txn: &super::Txn) -> Result<Vec<Capture>, StoreError> {
        let rows = txn
            .query_all_raw(Statement::from_string(
                self.backend,
                "SELECT table_name, collection, key_column, created_at FROM sg_captures",
            ))
            .await?;
        rows.iter().map(capture_of).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_are_quoted() {
        assert_eq!(literal("it's"), "'it''s'");
    }
}
