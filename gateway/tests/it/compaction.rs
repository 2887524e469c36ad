//! Retention and compaction, on both backends: what the log keeps behind the horizon, a
//! cursor older than it resyncs (WebSocket) or gets 410 `cursor_too_old` (HTTP), replays of
//! compacted mutations still answer "applied", a base version older than the horizon is a
//! conflict, and the background job moves the horizon and reports it in `/metrics`.

use syncgate_gateway::server::{
    CompactionReport, compact, document_history, list_conflicts, list_sync_errors, status,
};

use super::http_api::{bearer_for, http, json, problem};
use super::*;

fn qty(n: i64) -> Body {
    body(&[("qty", Value::from(n))])
}

fn stock_report(reports: &[CompactionReport]) -> CompactionReport {
    reports
        .iter()
        .find(|r| r.collection == "stock")
        .cloned()
        .expect("a report for stock")
}

fn first_batch() -> Vec<Mutation> {
    vec![
        put(1, "stock", "s1", qty(1)),
        put(2, "stock", "s2", qty(1)),
        put(3, "stock", "s3", qty(1)),
    ]
}

/// s1 twice more, s2 deleted, four new documents: seqs 4 to 10.
fn second_batch() -> Vec<Mutation> {
    vec![
        patch(4, "stock", "s1", qty(2)),
        delete(5, "stock", "s2"),
        put(6, "stock", "s4", qty(1)),
        patch(7, "stock", "s1", qty(3)),
        put(8, "stock", "s5", qty(1)),
        put(9, "stock", "s6", qty(1)),
        put(10, "stock", "s7", qty(1)),
    ]
}

pub async fn the_log_is_compacted_behind_the_horizon_and_old_cursors_resync(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut config = db.config();
    // Every catch-up reads the database (the in-memory tail would serve old cursors whole).
    config.catch_up_cache_bytes = 0;
    config.compaction_interval_secs = 0;
    // One row per transaction: every removal pages through several batches.
    config.compaction_batch_rows = 1;
    let stock = config.collections.get_mut("stock").unwrap();
    stock.retain_secs = 0;
    stock.retain_changes = 3;
    let gw = Gateway::start(config.clone()).await.unwrap();
    let (mut w, _) = connect(&gw, "w").await;
    let first = push(&mut w, 1, first_batch()).await;
    // A terminal syncs to seq 3 and goes offline.
    let mut offline = Replica::subscribe(&gw, "offline", "stock", Body::new(), None).await;
    offline.until_seq(3).await;
    let old_cursor = offline.cursor.clone().unwrap();
    drop(offline);
    let second = push(&mut w, 2, second_batch()).await;
    assert_eq!(second.visible_at, 10);
    let horizon_cursor = Cursor {
        epoch: gw.store.epoch().to_owned(),
        seq: 7,
    };

    // Keep the newest 3 changes: the horizon is seq 7. Behind it s1@1 and s1@4 are
    // superseded by s1@7, s2@2 by its delete at 5, which is a tombstone; s3@3, s4@6 and s1@7
    // are the latest versions of live documents and stay.
    let dry = stock_report(&compact(&config, Some("stock"), true).await.unwrap());
    let expected = CompactionReport {
        collection: "stock".into(),
        previous_horizon: 0,
        horizon: 7,
        superseded: 3,
        tombstones: 1,
        deleted_documents: 1,
        dry_run: true,
        longest_batch_us: 0,
    };
    assert_eq!(dry, expected);
    let s1 = document_history(&config, "stock", "s1", 100).await.unwrap();
    assert_eq!(s1.len(), 3, "a dry run removes nothing");
    // Before compaction, the old cursor resumes without a resync.
    let mut before = Replica::subscribe(
        &gw,
        "before",
        "stock",
        Body::new(),
        Some(old_cursor.clone()),
    )
    .await;
    before.until_seq(10).await;
    assert!(before.resyncs.is_empty());
    assert_eq!(before.seqs, (4..=10).collect::<Vec<_>>());
    drop(before);

    let done = stock_report(&compact(&config, Some("stock"), false).await.unwrap());
    assert_eq!(
        (
            done.horizon,
            done.superseded,
            done.tombstones,
            done.deleted_documents,
            done.dry_run
        ),
        (7, 3, 1, 1, false)
    );
    let versions = |h: Vec<syncgate_gateway::server::HistoryEntry>| {
        h.iter().map(|e| e.version).collect::<Vec<_>>()
    };
    assert_eq!(
        versions(document_history(&config, "stock", "s1", 100).await.unwrap()),
        vec![7]
    );
    assert_eq!(
        versions(document_history(&config, "stock", "s2", 100).await.unwrap()),
        Vec::<u64>::new()
    );
    assert_eq!(
        versions(document_history(&config, "stock", "s3", 100).await.unwrap()),
        vec![3]
    );
    // Compacting again finds nothing more.
    let again = stock_report(&compact(&config, Some("stock"), false).await.unwrap());
    assert_eq!(
        (
            again.horizon,
            again.superseded + again.tombstones + again.deleted_documents
        ),
        (7, 0)
    );

    // The old cursor resyncs and gets the whole collection again; one at the horizon does not.
    let mut old = Replica::subscribe(&gw, "old", "stock", Body::new(), Some(old_cursor)).await;
    old.until_seq(10).await;
    assert_eq!(old.resyncs, vec!["cursor_too_old".to_owned()]);
    let server = server_docs(&gw, "stock").await;
    assert_eq!(old.docs, server);
    assert!(!server.contains_key("s2"));
    let mut current =
        Replica::subscribe(&gw, "current", "stock", Body::new(), Some(horizon_cursor)).await;
    current.until_seq(10).await;
    assert!(current.resyncs.is_empty());
    assert_eq!(current.seqs, vec![8, 9, 10]);

    // Replays of compacted mutations still answer "applied" at their versions.
    drop(w);
    let (mut w, welcome) = connect(&gw, "w").await;
    assert_eq!(welcome.last_applied_mutation, 10);
    let replayed = push(&mut w, 1, first_batch()).await;
    assert_eq!(replayed.results, first.results);
    let replayed = push(&mut w, 2, second_batch()).await;
    assert_eq!(replayed.results, second.results);
    assert_eq!(
        server_docs(&gw, "stock").await,
        server,
        "nothing applied twice"
    );

    // A base version older than the horizon cannot be checked against a history compaction
    // removed: it counts as a conflict (stock is `manual`) even where only the writer's own
    // client changed the document since (s1, by w), and for a document whose tombstone was
    // purged (s2). A base at the current version, or at or after the horizon, is checked as
    // usual.
    let own = push(
        &mut w,
        3,
        vec![Mutation {
            base_version: Some(4),
            ..put(11, "stock", "s1", qty(9))
        }],
    )
    .await;
    assert_eq!(
        own.results[0].code,
        Some(ErrorCode::Conflict.code()),
        "{own:?}"
    );
    let (mut t, _) = connect(&gw, "terminal").await;
    let ack = push(
        &mut t,
        1,
        vec![
            Mutation {
                base_version: Some(2),
                ..put(1, "stock", "s2", qty(9))
            },
            Mutation {
                base_version: Some(10),
                ..put(2, "stock", "s7", qty(9))
            },
            Mutation {
                base_version: Some(3),
                ..put(3, "stock", "s3", qty(9))
            },
        ],
    )
    .await;
    let codes: Vec<Option<u16>> = ack.results.iter().map(|r| r.code).collect();
    assert_eq!(
        codes,
        vec![Some(ErrorCode::Conflict.code()), None, None],
        "{:?}",
        ack.results
    );
    let purged = ack.results[0].conflict.as_ref().unwrap();
    assert_eq!((purged.version, purged.body.is_none()), (7, true));
    assert_eq!(ack.visible_at, 12);

    // HTTP readers: a position older than the horizon is gone; the list says where to go on.
    let bearer = bearer_for(&config, "reader").await;
    let auth = [("Authorization", bearer.as_str())];
    let gone = http(
        &gw,
        "GET",
        "/v1/changes?collection=stock&after=3",
        &auth,
        b"",
    )
    .await;
    problem(&gone, 410, ErrorCode::CursorTooOld);
    let listed = http(&gw, "GET", "/v1/collections/stock/documents", &auth, b"").await;
    let as_of = json(&listed.2)["as_of"].as_u64().unwrap();
    assert!(as_of >= 12, "as_of {as_of}");
    let feed = http(
        &gw,
        "GET",
        &format!("/v1/changes?collection=stock&after={as_of}"),
        &auth,
        b"",
    )
    .await;
    assert_eq!(feed.0, 200, "{}", String::from_utf8_lossy(&feed.2));
    gw.shutdown().await;

    // The background compaction moves the horizon as changes arrive and reports it.
    config.compaction_interval_secs = 1;
    let gw = Gateway::start(config.clone()).await.unwrap();
    let (mut w, _) = connect(&gw, "w").await;
    let ack = push(
        &mut w,
        4,
        (12..=15)
            .map(|m| patch(m, "stock", "s1", qty(m as i64)))
            .collect(),
    )
    .await;
    assert_eq!(ack.visible_at, 16);
    let newest_behind = ack.visible_at - 3;
    let end = Instant::now() + DEADLINE;
    let horizon_line = "syncgate_compaction_horizon{collection=\"stock\"}";
    loop {
        let metrics = http(&gw, "GET", "/metrics", &[], b"").await;
        let text = String::from_utf8_lossy(&metrics.2).into_owned();
        let horizon = text
            .lines()
            .find_map(|l| l.strip_prefix(horizon_line))
            .and_then(|v| v.trim().parse::<u64>().ok());
        if horizon == Some(newest_behind) {
            assert!(
                text.contains(
                    "syncgate_compaction_removed_total{collection=\"stock\",kind=\"superseded\"}"
                ),
                "{text}"
            );
            // On SQLite every group commit reports how long it waited for the writer turn.
            let waits = text
                .lines()
                .find_map(|l| l.strip_prefix("syncgate_log_writer_wait_seconds_count "))
                .and_then(|v| v.trim().parse::<u64>().ok());
            let expected = u64::from(matches!(backend, Backend::Sqlite));
            assert!(waits.is_some_and(|n| n >= expected), "{waits:?}");
            break;
        }
        assert!(
            Instant::now() < end,
            "the horizon never reached {newest_behind}: {horizon:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // s1@7 and s1@13 are superseded behind the horizon (13).
    let s1 = document_history(&config, "stock", "s1", 100).await.unwrap();
    assert_eq!(versions(s1), vec![14, 15, 16]);
    // `admin status` sums it up: the head, the horizon, the live documents (s2's deleted row
    // purged behind the horizon), nothing open; declared collections are listed even empty.
    let s = status(&config).await.unwrap();
    assert_eq!((s.head, s.epoch.len()), (16, 16));
    let stock = &s.collections["stock"];
    assert_eq!(stock.horizon, newest_behind);
    assert_eq!(
        stock.documents,
        server_docs(&gw, "stock").await.len() as u64
    );
    assert_eq!(stock.deleted, 0);
    let open = list_conflicts(&config, Some("stock"), true, 1000)
        .await
        .unwrap();
    assert_eq!(stock.conflicts_open, open.len() as u64);
    let errors = list_sync_errors(&config, None, true, 1000).await.unwrap();
    assert_eq!(s.sync_errors_open, errors.len() as u64);
    assert_eq!(s.collections["machines"], Default::default());
    assert!(s.clients >= 1);
    gw.shutdown().await;
    db.cleanup().await;
}
