//! Capture of a PostgreSQL table (PostgreSQL only): rows written by plain SQL reach WebSocket
//! subscribers exactly once, in commit order, also from 4 concurrent SQL sessions interleaved
//! with gateway pushes on two gateway nodes; a node that was down catches up; clients' writes
//! to the captured collection are refused; detach stops capture.

use sea_orm::{ConnectionTrait, Database, DatabaseConnection, TransactionTrait};
use syncgate_gateway::server::{capture_attach, capture_detach, list_captures};

use super::*;

const TABLE: &str = "CREATE SCHEMA erp;
CREATE TABLE erp.work_orders (
    id text PRIMARY KEY,
    status text NOT NULL,
    qty integer,
    price numeric,
    done boolean NOT NULL DEFAULT false,
    meta jsonb,
    note text)";

fn s(v: &str) -> Value {
    Value::from(v)
}

/// The table's rows as documents, as the type mapping says they arrive.
async fn table_docs(erp: &DatabaseConnection) -> BTreeMap<String, Body> {
    let rows = erp
        .query_all_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT id, status, qty, done FROM erp.work_orders",
        ))
        .await
        .unwrap();
    rows.iter()
        .map(|r| {
            let id: String = r.try_get("", "id").unwrap();
            let qty: Option<i32> = r.try_get("", "qty").unwrap();
            let b = body(&[
                ("status", s(&r.try_get::<String>("", "status").unwrap())),
                ("qty", qty.map_or(Value::Nil, Value::from)),
                ("done", Value::from(r.try_get::<bool>("", "done").unwrap())),
            ]);
            (id, b)
        })
        .collect()
}

/// The fields `table_docs` compares.
fn compared(docs: &BTreeMap<String, (Body, u64)>) -> BTreeMap<String, Body> {
    docs.iter()
        .map(|(id, (b, _))| {
            let keep = b
                .iter()
                .filter(|(k, _)| ["status", "qty", "done"].contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            (id.clone(), keep)
        })
        .collect()
}

/// One SQL session's work: 25 transactions of an insert, an update and (every third) a delete.
async fn sql_session(url: String, session: u64) {
    // Session 3 is an ERP application whose search_path does not reach syncgate's tables.
    let url = if session == 3 {
        format!("{url}?options=-c%20search_path%3Derp")
    } else {
        url
    };
    let erp = Database::connect(&url).await.unwrap();
    for i in 0..25u64 {
        let txn = erp.begin().await.unwrap();
        let id = format!("s{session}-{i}");
        txn.execute_unprepared(&format!(
            "INSERT INTO erp.work_orders (id, status, qty) VALUES ('{id}', 'open', {i})"
        ))
        .await
        .unwrap();
        txn.execute_unprepared(&format!(
            "UPDATE erp.work_orders SET status = 'in_progress', qty = qty + 1 WHERE id = 's{session}-{}'",
            i / 2
        ))
        .await
        .unwrap();
        if i % 3 == 2 {
            txn.execute_unprepared(&format!(
                "DELETE FROM erp.work_orders WHERE id = 's{session}-{}'",
                i - 1
            ))
            .await
            .unwrap();
        }
        txn.commit().await.unwrap();
    }
    erp.close().await.ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_writes_to_a_captured_table_reach_subscribers_once_in_commit_order() {
    if postgres_url().is_none() {
        return;
    }
    let db = TestDb::new(Backend::Postgres).await;
    let config = db.config();
    let erp = Database::connect(&db.url).await.unwrap();
    erp.execute_unprepared(TABLE).await.unwrap();
    erp.execute_unprepared(
        "INSERT INTO erp.work_orders (id, status, qty, price, meta) VALUES \
         ('wo-1', 'open', 5, 1.5, '{\"b\": [1, \"x\"], \"a\": {\"z\": null}}'), \
         ('wo-2', 'open', NULL, 2, NULL)",
    )
    .await
    .unwrap();
    let a = Gateway::start(config.clone()).await.unwrap();
    let b = Gateway::start(config.clone()).await.unwrap();
    // A client document that is not a row: attaching deletes it (the collection mirrors the
    // table).
    let (mut terminal, _) = connect(&a, "terminal").await;
    let before = push(
        &mut terminal,
        1,
        vec![put(
            1,
            "work_orders",
            "stray",
            body(&[("status", s("open"))]),
        )],
    )
    .await;
    assert_eq!(before.results[0].code, None);

    let attached = capture_attach(&config, "erp.work_orders", "work_orders", "id")
        .await
        .unwrap();
    assert_eq!(
        (attached.table.as_str(), attached.rows, attached.removed),
        ("erp.work_orders", 2, 1)
    );
    let listed = list_captures(&config).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].collection.as_str(), listed[0].key.as_str()),
        ("work_orders", "id")
    );
    for (table, collection, key, says) in [
        ("erp.work_orders", "work_orders", "id", "attached already"),
        ("erp.work_orders", "machines", "id", "attached already"),
        ("erp.nothing", "machines", "id", "no table"),
        ("erp.work_orders", "machines", "nope", "has no column"),
        (
            "erp.work_orders",
            "machines",
            "status",
            "not a unique column",
        ),
    ] {
        let e = capture_attach(&config, table, collection, key)
            .await
            .unwrap_err();
        assert!(format!("{e:#}").contains(says), "{e:#}");
    }

    let mut on_a = Replica::subscribe(&a, "on-a", "work_orders", Body::new(), None).await;
    let mut on_b = Replica::subscribe(&b, "on-b", "work_orders", Body::new(), None).await;
    let head = a.store.head().await.unwrap();
    on_a.until_seq(head).await;
    on_b.until_seq(head).await;
    // The type mapping: integers, numerics with a fraction as floats, booleans, NULL as nil,
    // jsonb nested (maps with their keys in order).
    let wo1 = &on_a.docs["wo-1"].0;
    assert_eq!(wo1["id"], s("wo-1"));
    assert_eq!(wo1["qty"], Value::from(5));
    assert_eq!(wo1["price"], Value::F64(1.5));
    assert_eq!(wo1["done"], Value::Boolean(false));
    assert_eq!(wo1["note"], Value::Nil);
    assert_eq!(
        wo1["meta"],
        Value::Map(vec![
            (s("a"), Value::Map(vec![(s("z"), Value::Nil)])),
            (s("b"), Value::Array(vec![Value::from(1), s("x")])),
        ])
    );
    assert_eq!(on_a.docs["wo-2"].0["price"], Value::from(2));
    assert!(!on_a.docs.contains_key("stray"));

    // Clients cannot write a captured collection.
    let refused = push(
        &mut terminal,
        2,
        vec![put(
            2,
            "work_orders",
            "wo-1",
            body(&[("status", s("done"))]),
        )],
    )
    .await;
    assert_eq!(
        refused.results[0].code,
        Some(ErrorCode::CapturedCollection.code())
    );

    // Four SQL sessions and gateway pushes to another collection on both nodes, at once.
    let sessions = (0..4).map(|k| tokio::spawn(sql_session(db.url.clone(), k)));
    let pushes = futures_util::future::join_all((0..2u64).map(|w| {
        let gw = if w == 0 { &a } else { &b };
        async move {
            let (mut c, _) = connect(gw, &format!("pusher-{w}")).await;
            for batch in 1..=20u64 {
                push(
                    &mut c,
                    batch,
                    vec![put(
                        batch,
                        "machines",
                        &format!("m{w}-{}", batch % 5),
                        body(&[("n", Value::from(batch))]),
                    )],
                )
                .await;
            }
        }
    }));
    let (done, _) = tokio::join!(futures_util::future::join_all(sessions), pushes);
    for d in done {
        d.unwrap();
    }
    let head = a.store.head().await.unwrap();
    on_a.until_seq(head).await;
    on_b.until_seq(head).await;
    on_a.assert_in_order_once();
    on_b.assert_in_order_once();
    assert_eq!(on_a.seqs, on_b.seqs, "both nodes deliver the same changes");
    let rows = table_docs(&erp).await;
    assert_eq!(compared(&on_a.docs), rows);
    assert_eq!(compared(&on_b.docs), rows);
    // 4 sessions x 25 transactions: 100 inserts, 100 updates, 32 deletes.
    assert_eq!(rows.len(), 2 + 100 - 32);

    // One statement that writes many rows, and an update that changes a key.
    erp.execute_unprepared(
        "UPDATE erp.work_orders SET qty = coalesce(qty, 0) + 100 WHERE id LIKE 's2-%'; \
         UPDATE erp.work_orders SET id = 'renamed' WHERE id = 's3-0'",
    )
    .await
    .unwrap();
    let head = a.store.head().await.unwrap();
    on_a.until_seq(head).await;
    on_b.until_seq(head).await;
    assert!(on_a.docs.contains_key("renamed") && !on_a.docs.contains_key("s3-0"));
    assert_eq!(compared(&on_b.docs), table_docs(&erp).await);

    // Node B goes away; the ERP keeps writing; B comes back and its subscriber resumes.
    let cursor = on_b.cursor.clone();
    let docs_b = on_b.docs.clone();
    let seen_before = on_b.seqs.len();
    drop(on_b);
    b.shutdown().await;
    erp.execute_unprepared(
        "UPDATE erp.work_orders SET status = 'cancelled' WHERE id LIKE 's0-%'; \
         DELETE FROM erp.work_orders WHERE id LIKE 's1-%'",
    )
    .await
    .unwrap();
    let b = Gateway::start(config.clone()).await.unwrap();
    let mut resumed = Replica::subscribe(&b, "on-b", "work_orders", Body::new(), cursor).await;
    resumed.docs = docs_b;
    let head = b.store.head().await.unwrap();
    resumed.until_seq(head).await;
    on_a.until_seq(head).await;
    assert!(resumed.resyncs.is_empty());
    resumed.assert_in_order_once();
    assert_eq!(resumed.seqs, on_a.seqs[seen_before..].to_vec());
    let rows = table_docs(&erp).await;
    assert_eq!(compared(&resumed.docs), rows);
    assert_eq!(compared(&on_a.docs), rows);

    // Detach: SQL writes no longer reach the log, and clients may write again.
    let detached = capture_detach(&config, "erp.work_orders").await.unwrap();
    assert_eq!(detached.map(|c| c.collection), Some("work_orders".into()));
    let head = a.store.head().await.unwrap();
    erp.execute_unprepared("INSERT INTO erp.work_orders (id, status) VALUES ('late', 'open')")
        .await
        .unwrap();
    assert_eq!(a.store.head().await.unwrap(), head);
    let written = push(
        &mut terminal,
        3,
        vec![put(
            3,
            "work_orders",
            "wo-1",
            body(&[("status", s("done"))]),
        )],
    )
    .await;
    assert_eq!(written.results[0].code, None);
    assert!(list_captures(&config).await.unwrap().is_empty());
    assert!(
        capture_detach(&config, "erp.work_orders")
            .await
            .unwrap()
            .is_none()
    );
    erp.close().await.ok();
    a.shutdown().await;
    b.shutdown().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_needs_postgresql_and_a_declared_collection() {
    let db = TestDb::new(Backend::Sqlite).await;
    let config = db.config();
    let e = capture_attach(&config, "erp.work_orders", "work_orders", "id")
        .await
        .unwrap_err();
    assert!(format!("{e:#}").contains("needs PostgreSQL"), "{e:#}");
    let e = capture_attach(&config, "erp.work_orders", "nope", "id")
        .await
        .unwrap_err();
    assert!(
        format!("{e:#}").contains("not a declared collection"),
        "{e:#}"
    );
    let e = capture_detach(&config, "erp.work_orders")
        .await
        .unwrap_err();
    assert!(format!("{e:#}").contains("needs PostgreSQL"), "{e:#}");
}

/// The log head, read from the database.
async fn head_of(erp: &DatabaseConnection) -> u64 {
    erp.query_one_raw(sea_orm::Statement::from_string(
        sea_orm::DbBackend::Postgres,
        "SELECT seq FROM sg_head WHERE id = 1",
    ))
    .await
    .unwrap()
    .unwrap()
    .try_get::<i64>("", "seq")
    .unwrap() as u64
}

/// The gateway process is SIGKILLed while four SQL sessions write the captured table: the
/// ERP's writes go on without it, and after a restart its subscriber resumes by cursor and
/// receives every change once, in order, ending equal to the table. Attach and list go
/// through the command line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_during_captured_sql_writes_catches_up() {
    if postgres_url().is_none() {
        return;
    }
    let db = TestDb::new(Backend::Postgres).await;
    let erp = Database::connect(&db.url).await.unwrap();
    erp.execute_unprepared(TABLE).await.unwrap();
    let dir = db.dir.path().to_str().unwrap().to_owned();
    let base = [
        "--database",
        db.url.as_str(),
        "--data-dir",
        dir.as_str(),
        "--jwt-secret",
        SECRET,
    ];
    let run = |extra: &[&str]| {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        super::cli::command(&args).output()
    };
    let attached = run(&[
        "capture",
        "attach",
        "--table",
        "erp.work_orders",
        "--collection",
        "work_orders",
        "--key",
        "id",
    ])
    .await
    .unwrap();
    assert!(attached.status.success(), "{attached:?}");
    let listed = run(&["capture", "list", "--json"]).await.unwrap();
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed[0]["table"], "erp.work_orders");

    let (mut gateway, ws, _) = super::cli::spawn_gateway(&base).await;
    let mut watcher = Replica::subscribe_at(&ws, "watcher", "work_orders", Body::new(), None).await;
    watcher.until_seq(0).await;
    let sessions: Vec<_> = (0..4)
        .map(|k| tokio::spawn(sql_session(db.url.clone(), k)))
        .collect();
    // Some changes arrive, then the gateway dies mid-run.
    let end = Instant::now() + DEADLINE;
    while watcher.seqs.len() < 20 {
        watcher.step(end).await;
    }
    gateway.start_kill().unwrap();
    gateway.wait().await.unwrap();
    for s in sessions {
        s.await.unwrap();
    }
    let (mut gateway, ws, _) = super::cli::spawn_gateway(&base).await;
    let mut resumed = Replica::subscribe_at(
        &ws,
        "watcher",
        "work_orders",
        Body::new(),
        watcher.cursor.clone(),
    )
    .await;
    resumed.docs = std::mem::take(&mut watcher.docs);
    resumed.seqs = std::mem::take(&mut watcher.seqs);
    resumed.until_seq(head_of(&erp).await).await;
    assert!(resumed.resyncs.is_empty());
    resumed.assert_in_order_once();
    assert_eq!(compared(&resumed.docs), table_docs(&erp).await);
    assert_eq!(table_docs(&erp).await.len(), 100 - 32);
    gateway.start_kill().unwrap();
    gateway.wait().await.unwrap();
    erp.close().await.ok();
    db.cleanup().await;
}
