//! Conflict policies through two SDK clients, on SQLite and on PostgreSQL: a terminal edits
//! offline while another client changes the same documents; on reconnect `precedence` keeps
//! the cancellation, `field_merge` keeps both clients' fields, `first_write_wins` refuses the
//! stale edit (the SDK shows the server's state and lists the refusal), `lww` takes the later
//! commit, and a `manual` conflict reaches the terminal with both versions and is resolved. A
//! dangling reference and a schema violation in the same offline batch are rejected with
//! their codes while the edits after them apply.

use super::*;
use syncgate_client::Take;
use syncgate_gateway::config::{CollectionConfig, ConflictPolicy};
use syncgate_protocol::ErrorCode;

const COLLECTIONS: [&str; 5] = ["work_orders", "machines", "stock", "notes", "logs"];

fn terminal(url: &str, dir: &Path) -> ClientBuilder {
    COLLECTIONS
        .iter()
        .fold(builder(url, dir), |b, c| b.subscribe(*c, Body::new()))
}

fn s(v: &str) -> Value {
    Value::from(v)
}

async fn doc(client: &Client, collection: &str, id: &str) -> Body {
    client.get(collection, id).await.unwrap().unwrap().body
}

/// Every document of a collection in a client's replica: (id, body, version, pending).
async fn all(client: &Client, collection: &str) -> Vec<(String, Body, u64, bool)> {
    client
        .query(collection, &Body::new())
        .await
        .unwrap()
        .into_iter()
        .map(|d| (d.id, d.body, d.version, d.pending))
        .collect()
}

async fn policies_decide_between_two_clients(database: Option<String>) {
    let gw_dir = tempfile::tempdir().unwrap();
    let mut config = gateway_config(gw_dir.path());
    if let Some(url) = &database {
        config.database = url.clone();
    }
    config.collections.insert(
        "notes".into(),
        CollectionConfig {
            policy: ConflictPolicy::FirstWriteWins,
            ..Default::default()
        },
    );
    config.collections.insert(
        "logs".into(),
        CollectionConfig {
            schema: [(
                "text".to_owned(),
                syncgate_gateway::config::FieldType::String,
            )]
            .into(),
            ..Default::default()
        },
    );
    let gw = Gateway::start(config).await.unwrap();
    let url = format!("ws://{}", gw.ws_addr);
    let erp_dir = tempfile::tempdir().unwrap();
    let erp = terminal(&url, erp_dir.path()).open().await.unwrap();
    erp.put(
        "machines",
        "M1",
        body(&[("name", s("press")), ("speed", Value::from(10))]),
    )
    .await
    .unwrap();
    erp.put(
        "work_orders",
        "wo-1",
        body(&[
            ("status", s("open")),
            ("machine", s("M1")),
            ("qty", Value::from(5)),
        ]),
    )
    .await
    .unwrap();
    erp.put("stock", "s-1", body(&[("qty", Value::from(10))]))
        .await
        .unwrap();
    erp.put("notes", "n-1", body(&[("text", s("a"))]))
        .await
        .unwrap();
    erp.put("logs", "l-1", body(&[("text", s("a"))]))
        .await
        .unwrap();
    erp.sync_now(DEADLINE).await.unwrap();

    // The terminal downloads everything, then goes offline.
    let term_dir = tempfile::tempdir().unwrap();
    let term = terminal(&url, term_dir.path()).open().await.unwrap();
    term.sync_now(DEADLINE).await.unwrap();
    term.close().await;

    // Meanwhile the ERP cancels the order, changes the machine's speed, counts the stock and
    // edits the note.
    erp.patch("work_orders", "wo-1", body(&[("status", s("cancelled"))]))
        .await
        .unwrap();
    erp.patch("machines", "M1", body(&[("speed", Value::from(20))]))
        .await
        .unwrap();
    erp.patch("stock", "s-1", body(&[("qty", Value::from(8))]))
        .await
        .unwrap();
    erp.patch("notes", "n-1", body(&[("text", s("b"))]))
        .await
        .unwrap();
    erp.put("notes", "n-2", body(&[("text", s("erp's"))]))
        .await
        .unwrap();
    erp.patch("logs", "l-1", body(&[("text", s("b"))]))
        .await
        .unwrap();
    erp.sync_now(DEADLINE).await.unwrap();

    // Offline, the terminal completes the order, renames the machine, counts 12 and edits
    // the note.
    let offline = terminal(&url, term_dir.path()).open_local().await.unwrap();
    // First two edits the server will reject: a machine it has never seen, a wrong type.
    offline
        .put(
            "work_orders",
            "wo-2",
            body(&[("status", s("open")), ("machine", s("M-404"))]),
        )
        .await
        .unwrap();
    offline
        .put("logs", "l-9", body(&[("text", Value::from(5))]))
        .await
        .unwrap();
    offline
        .patch("logs", "l-1", body(&[("text", s("c"))]))
        .await
        .unwrap();
    offline
        .patch(
            "work_orders",
            "wo-1",
            body(&[("status", s("completed")), ("qty", Value::from(6))]),
        )
        .await
        .unwrap();
    offline
        .patch("machines", "M1", body(&[("name", s("press 2"))]))
        .await
        .unwrap();
    offline
        .patch("stock", "s-1", body(&[("qty", Value::from(12))]))
        .await
        .unwrap();
    offline
        .patch("notes", "n-1", body(&[("text", s("c"))]))
        .await
        .unwrap();
    // A note the terminal creates offline under an id the ERP creates meanwhile: a create
    // names base version 0, so this is a conflict too, not a silent overwrite.
    offline
        .put("notes", "n-2", body(&[("text", s("terminal's"))]))
        .await
        .unwrap();
    offline.close().await;

    // Back online.
    let b = terminal(&url, term_dir.path());
    let mut events = b.events();
    let term = b.open().await.unwrap();
    term.sync_now(DEADLINE).await.unwrap();
    let opened = wait_event(&mut events, "the manual conflict", |e| {
        matches!(e, Event::ConflictOpened(_))
    })
    .await;
    let Event::ConflictOpened(conflict) = opened else {
        unreachable!()
    };
    assert_eq!(conflict.mine.collection, "stock");
    assert_eq!(conflict.server_body, Some(body(&[("qty", Value::from(8))])));
    assert_eq!(
        conflict.mine_body(),
        Some(body(&[("qty", Value::from(12))]))
    );
    // The dangling reference and the wrong type are rejected with their codes (and stored
    // on the server as sync errors); first_write_wins refuses the stale note: all listed.
    let rejected: Vec<(String, u16)> = term
        .rejected()
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.mutation.id, r.code))
        .collect();
    let expected = [
        ("wo-2", ErrorCode::DanglingReference),
        ("l-9", ErrorCode::WrongType),
        ("n-1", ErrorCode::Conflict),
        ("n-2", ErrorCode::Conflict),
    ]
    .map(|(id, code)| (id.to_owned(), code.code()));
    assert_eq!(rejected, expected);
    let errors = gw.store.sync_errors(None, true, 100).await.unwrap();
    assert_eq!(
        errors.len(),
        2,
        "a conflict refusal is not a sync error: {errors:?}"
    );
    assert!(term.get("work_orders", "wo-2").await.unwrap().is_none());
    // lww: the later commit, the terminal's.
    assert_eq!(doc(&term, "logs", "l-1").await, body(&[("text", s("c"))]));
    assert_eq!(doc(&term, "notes", "n-1").await, body(&[("text", s("b"))]));
    assert_eq!(
        doc(&term, "notes", "n-2").await,
        body(&[("text", s("erp's"))])
    );
    // manual: the server's count until resolved.
    assert_eq!(
        doc(&term, "stock", "s-1").await,
        body(&[("qty", Value::from(8))])
    );
    // precedence: the cancellation stays; the quantity follows server order.
    assert_eq!(
        doc(&term, "work_orders", "wo-1").await,
        body(&[
            ("status", s("cancelled")),
            ("machine", s("M1")),
            ("qty", Value::from(6))
        ])
    );
    // field_merge: both clients' fields.
    assert_eq!(
        doc(&term, "machines", "M1").await,
        body(&[("name", s("press 2")), ("speed", Value::from(20))])
    );

    // The terminal's operator keeps their count.
    let conflicts = term.conflicts().await.unwrap();
    assert_eq!(conflicts, std::slice::from_ref(&conflict));
    term.resolve(&conflict.id, Take::Mine).await.unwrap();
    assert!(matches!(
        term.resolve(&conflict.id, Take::Server).await,
        Err(syncgate_client::ClientError::Invalid {
            code: ErrorCode::UnknownConflict,
            ..
        })
    ));
    term.sync_now(DEADLINE).await.unwrap();
    assert!(term.conflicts().await.unwrap().is_empty());
    erp.sync_now(DEADLINE).await.unwrap();
    assert_eq!(
        doc(&erp, "stock", "s-1").await,
        body(&[("qty", Value::from(12))])
    );
    // Both replicas hold the same documents, as the server does.
    for c in COLLECTIONS {
        assert_eq!(all(&term, c).await, all(&erp, c).await, "{c}");
    }
    let audit: Vec<(String, String)> = gw
        .store
        .conflict_records(None, false, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.policy, c.outcome))
        .collect();
    let expected = [
        ("lww", "overwrote"),
        ("precedence", "kept_server"),
        ("manual", "open"),
        ("first_write_wins", "refused"),
        ("first_write_wins", "refused"),
    ]
    .map(|(p, o)| (p.to_owned(), o.to_owned()));
    assert_eq!(audit, expected);
    term.close().await;
    erp.close().await;
    gw.shutdown().await;
    if let Some(url) = database {
        drop_database(&url).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_decide_between_two_clients_on_sqlite() {
    policies_decide_between_two_clients(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_decide_between_two_clients_on_postgres() {
    if let Some(url) = postgres_database().await {
        policies_decide_between_two_clients(Some(url)).await;
    }
}
