//! Conflict policies over real connections: an ERP backend and an offline terminal edit the
//! same documents from the same base versions; each collection's policy decides, a replay of
//! the terminal's batch gets the same answers, every overwrite or refusal is audited, and a
//! `manual` conflict is resolved by a mutation naming it.

use super::*;
use syncgate_gateway::config::{CollectionConfig, ConflictPolicy};

fn based(mut m: Mutation, base: u64) -> Mutation {
    m.base_version = Some(base);
    m
}

fn s(v: &str) -> Value {
    Value::from(v)
}

pub async fn each_policy_decides_concurrent_edits_and_audits_them(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut config = db.config();
    // The sample config: work_orders precedence on status, machines field_merge, stock manual.
    for (name, policy) in [
        ("notes", ConflictPolicy::FirstWriteWins),
        ("logs", ConflictPolicy::Lww),
    ] {
        config.collections.insert(
            name.into(),
            CollectionConfig {
                policy,
                ..Default::default()
            },
        );
    }
    let gw = Gateway::start(config).await.unwrap();
    let (mut erp, _) = connect(&gw, "erp").await;
    let (mut term, _) = connect(&gw, "terminal").await;
    let seeded = push(
        &mut erp,
        1,
        vec![
            put(
                1,
                "machines",
                "M1",
                body(&[("name", s("press")), ("speed", Value::from(10))]),
            ),
            put(
                2,
                "work_orders",
                "wo-1",
                body(&[
                    ("status", s("open")),
                    ("machine", s("M1")),
                    ("qty", Value::from(5)),
                ]),
            ),
            put(3, "stock", "s-1", body(&[("qty", Value::from(10))])),
            put(4, "notes", "n-1", body(&[("text", s("a"))])),
            put(5, "logs", "l-1", body(&[("text", s("a"))])),
        ],
    )
    .await;
    let v: Vec<u64> = seeded.results.iter().map(|r| r.version.unwrap()).collect();
    // The ERP changes every document while the terminal, which has seen the seeds, is offline.
    let erp_ack = push(
        &mut erp,
        2,
        vec![
            based(
                patch(6, "machines", "M1", body(&[("speed", Value::from(20))])),
                v[0],
            ),
            based(
                patch(
                    7,
                    "work_orders",
                    "wo-1",
                    body(&[("status", s("cancelled"))]),
                ),
                v[1],
            ),
            based(
                patch(8, "stock", "s-1", body(&[("qty", Value::from(8))])),
                v[2],
            ),
            based(patch(9, "notes", "n-1", body(&[("text", s("b"))])), v[3]),
            based(patch(10, "logs", "l-1", body(&[("text", s("b"))])), v[4]),
        ],
    )
    .await;
    assert!(
        erp_ack
            .results
            .iter()
            .all(|r| r.status == MutationStatus::Applied),
        "{erp_ack:?}"
    );
    let now: Vec<u64> = erp_ack.results.iter().map(|r| r.version.unwrap()).collect();
    let offline = vec![
        based(
            patch(1, "machines", "M1", body(&[("name", s("press 2"))])),
            v[0],
        ),
        based(
            patch(
                2,
                "work_orders",
                "wo-1",
                body(&[("status", s("completed")), ("qty", Value::from(6))]),
            ),
            v[1],
        ),
        based(
            patch(3, "stock", "s-1", body(&[("qty", Value::from(12))])),
            v[2],
        ),
        based(patch(4, "notes", "n-1", body(&[("text", s("c"))])), v[3]),
        based(patch(5, "logs", "l-1", body(&[("text", s("c"))])), v[4]),
        // Two edits of one document with the same base: the terminal's own first edit is
        // not a conflict for its second.
        based(patch(6, "notes", "n-1", body(&[("text", s("d"))])), v[3]),
    ];
    let ack = push(&mut term, 1, offline.clone()).await;
    let r = &ack.results;
    assert_eq!(r[0].status, MutationStatus::Applied, "field_merge: {r:?}");
    assert_eq!(r[1].status, MutationStatus::Applied, "precedence: {r:?}");
    // manual: refused, with the server's side and a conflict id.
    assert_eq!(r[2].code, Some(ErrorCode::Conflict.code()), "manual: {r:?}");
    let stock = r[2].conflict.clone().expect("manual conflict info");
    assert_eq!(stock.id.as_deref(), Some("3@terminal"));
    assert_eq!(stock.version, now[2]);
    assert_eq!(stock.body, Some(body(&[("qty", Value::from(8))])));
    // first_write_wins: refused with the server's side, no id.
    assert_eq!(r[3].code, Some(ErrorCode::Conflict.code()), "fww: {r:?}");
    let note = r[3].conflict.clone().expect("fww conflict info");
    assert_eq!((note.id, note.version), (None, now[3]));
    assert_eq!(note.body, Some(body(&[("text", s("b"))])));
    assert_eq!(r[4].status, MutationStatus::Applied, "lww: {r:?}");
    // The second edit of n-1 conflicts with the ERP's change, not with the terminal's own
    // (refused) first one.
    assert_eq!(r[5].code, Some(ErrorCode::Conflict.code()), "{r:?}");
    // A replay after a lost ack: the same answers, nothing applied twice.
    let replay = push(&mut term, 2, offline).await;
    assert_eq!(replay.results, ack.results);

    let docs = |c: &'static str| {
        let gw = &gw;
        async move { server_docs(gw, c).await }
    };
    assert_eq!(
        docs("machines").await["M1"].0,
        body(&[("name", s("press 2")), ("speed", Value::from(20))]),
        "field_merge keeps both operators' fields"
    );
    assert_eq!(
        docs("work_orders").await["wo-1"].0,
        body(&[
            ("status", s("cancelled")),
            ("machine", s("M1")),
            ("qty", Value::from(6))
        ]),
        "precedence keeps the cancellation over a later completion; qty follows lww"
    );
    assert_eq!(
        docs("stock").await["s-1"].0,
        body(&[("qty", Value::from(8))])
    );
    assert_eq!(docs("notes").await["n-1"].0, body(&[("text", s("b"))]));
    assert_eq!(docs("logs").await["l-1"].0, body(&[("text", s("c"))]));

    // The audit: one row per overwrite or refusal; the clean field merge has none.
    let audit = gw.store.conflict_records(None, false, 100).await.unwrap();
    let outcome = |id: &str| -> Vec<(String, String, String)> {
        audit
            .iter()
            .filter(|c| c.doc_id == id)
            .map(|c| (c.policy.clone(), c.outcome.clone(), c.state.clone()))
            .collect()
    };
    let row = |p: &str, o: &str, st: &str| vec![(p.to_owned(), o.to_owned(), st.to_owned())];
    assert!(outcome("M1").is_empty(), "{audit:?}");
    assert_eq!(outcome("wo-1"), row("precedence", "kept_server", "closed"));
    assert_eq!(outcome("s-1"), row("manual", "open", "open"));
    assert_eq!(
        outcome("n-1"),
        [
            row("first_write_wins", "refused", "closed"),
            row("first_write_wins", "refused", "closed")
        ]
        .concat()
    );
    assert_eq!(outcome("l-1"), row("lww", "overwrote", "closed"));
    let counted = |policy: &str, outcome: &str| {
        gw.metrics
            .conflicts
            .with_label_values(&[policy, outcome])
            .get()
    };
    assert_eq!(
        [
            counted("precedence", "kept_server"),
            counted("manual", "open"),
            counted("first_write_wins", "refused"),
            counted("lww", "overwrote"),
            counted("field_merge", "overwrote"),
        ],
        [1, 1, 2, 1, 0],
        "syncgate_conflicts_total counts what the audit holds"
    );
    // The document's history: every change, oldest first, with its origin.
    let history = gw.store.document_history("logs", "l-1", 100).await.unwrap();
    let seen: Vec<(u64, &str, Option<&str>, Option<u64>)> = history
        .iter()
        .map(|h| {
            (
                h.version,
                h.op,
                h.origin_client.as_deref(),
                h.origin_mutation,
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (v[4], "upsert", Some("erp"), Some(5)),
            (now[4], "upsert", Some("erp"), Some(10)),
            (r[4].version.unwrap(), "upsert", Some("terminal"), Some(5)),
        ]
    );
    assert_eq!(history[2].body, Some(body(&[("text", s("c"))])));
    let newest = gw.store.document_history("logs", "l-1", 1).await.unwrap();
    assert_eq!(newest.len(), 1);
    assert_eq!(newest[0].version, r[4].version.unwrap());
    let l1 = audit.iter().find(|c| c.doc_id == "l-1").unwrap();
    assert_eq!(
        (
            l1.base_version,
            l1.server_version,
            l1.applied_version,
            &l1.other_clients[..]
        ),
        (v[4], now[4], r[4].version, &["erp".to_owned()][..])
    );
    assert_eq!(l1.server_body, Some(body(&[("text", s("b"))])));
    assert_eq!(l1.client_body, Some(body(&[("text", s("c"))])));
    let open = gw
        .store
        .conflict_records(Some("stock"), true, 100)
        .await
        .unwrap();
    assert_eq!(open.len(), 1);
    assert_eq!(open[0].id, "3@terminal");

    // A resolution naming no conflict of the document is rejected.
    let mut wrong = based(
        put(7, "stock", "s-1", body(&[("qty", Value::from(1))])),
        now[2],
    );
    wrong.resolves = Some("99@terminal".into());
    let mut elsewhere = based(put(8, "notes", "n-1", body(&[("text", s("x"))])), now[3]);
    elsewhere.resolves = Some("3@terminal".into());
    // The resolution: based on an old version, applied anyway, and the conflict closes.
    let mut resolution = based(
        put(9, "stock", "s-1", body(&[("qty", Value::from(11))])),
        v[2],
    );
    resolution.resolves = Some("3@terminal".into());
    let ack = push(&mut term, 3, vec![wrong, elsewhere, resolution]).await;
    let r = &ack.results;
    assert_eq!(r[0].code, Some(ErrorCode::UnknownConflict.code()), "{r:?}");
    assert_eq!(r[1].code, Some(ErrorCode::UnknownConflict.code()), "{r:?}");
    assert_eq!(r[2].status, MutationStatus::Applied, "{r:?}");
    assert_eq!(
        docs("stock").await["s-1"].0,
        body(&[("qty", Value::from(11))])
    );
    let resolved = gw
        .store
        .conflict_records(Some("stock"), false, 100)
        .await
        .unwrap();
    assert_eq!(resolved[0].state, "resolved");
    assert_eq!(resolved[0].resolved_by.as_deref(), Some("9@terminal"));
    assert_eq!(resolved[0].resolved_version, r[2].version);
    assert!(
        gw.store
            .conflict_records(None, true, 100)
            .await
            .unwrap()
            .is_empty()
    );
    // Resolving it again (the ERP, from an old base) is an ordinary write: a new conflict.
    let mut late = based(
        put(11, "stock", "s-1", body(&[("qty", Value::from(3))])),
        now[2],
    );
    late.resolves = Some("3@terminal".into());
    let ack = push(&mut erp, 3, vec![late]).await;
    assert_eq!(
        ack.results[0].conflict.as_ref().and_then(|c| c.id.clone()),
        Some("11@erp".to_owned())
    );
    // A blind write (no base version) never conflicts.
    let ack = push(
        &mut erp,
        4,
        vec![patch(12, "notes", "n-1", body(&[("text", s("blind"))]))],
    )
    .await;
    assert_eq!(ack.results[0].status, MutationStatus::Applied);
    gw.shutdown().await;
    db.cleanup().await;
}

/// An embedder's resolver replaces a collection's configured policy: stock corrections that
/// conflict win unless they would make the count negative; the audit names the resolver. A
/// resolver for an undeclared collection is refused at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedders_resolver_decides_for_its_collection() {
    use std::sync::Arc;
    use syncgate_gateway::conflict::{Conflict, ConflictResolver, Resolution};

    #[derive(Debug)]
    struct NeverNegative;
    impl ConflictResolver for NeverNegative {
        fn name(&self) -> &str {
            "never_negative"
        }
        fn resolve(&self, c: &Conflict<'_>) -> Resolution {
            let qty = c.mine.and_then(|b| b.get("qty")).and_then(Value::as_i64);
            if qty.is_some_and(|q| q < 0) {
                Resolution::Server
            } else {
                Resolution::Mine
            }
        }
    }
    let resolvers = |collection: &str| {
        syncgate_gateway::server::Resolvers::from([(
            collection.to_owned(),
            Arc::new(NeverNegative) as Arc<dyn ConflictResolver>,
        )])
    };
    let db = TestDb::new(Backend::Sqlite).await;
    let err = Gateway::start_with_resolvers(db.config(), resolvers("nope"))
        .await
        .err()
        .expect("an undeclared collection is refused");
    assert!(err.to_string().contains("\"nope\""), "{err}");
    // `stock` is `manual` in the sample config; the resolver takes its place.
    let gw = Gateway::start_with_resolvers(db.config(), resolvers("stock"))
        .await
        .unwrap();
    let (mut erp, _) = connect(&gw, "erp").await;
    let (mut term, _) = connect(&gw, "terminal").await;
    let seeded = push(
        &mut erp,
        1,
        vec![
            put(1, "stock", "s-1", body(&[("qty", Value::from(5))])),
            put(2, "stock", "s-2", body(&[("qty", Value::from(5))])),
        ],
    )
    .await;
    let v: Vec<u64> = seeded.results.iter().map(|r| r.version.unwrap()).collect();
    push(
        &mut erp,
        2,
        vec![
            based(
                patch(3, "stock", "s-1", body(&[("qty", Value::from(4))])),
                v[0],
            ),
            based(
                patch(4, "stock", "s-2", body(&[("qty", Value::from(4))])),
                v[1],
            ),
        ],
    )
    .await;
    let ack = push(
        &mut term,
        1,
        vec![
            based(
                patch(1, "stock", "s-1", body(&[("qty", Value::from(7))])),
                v[0],
            ),
            based(
                patch(2, "stock", "s-2", body(&[("qty", Value::from(-1))])),
                v[1],
            ),
        ],
    )
    .await;
    assert_eq!(ack.results[0].status, MutationStatus::Applied);
    assert_eq!(ack.results[1].code, Some(ErrorCode::Conflict.code()));
    let info = ack.results[1].conflict.clone().unwrap();
    assert_eq!(
        (info.id, info.body),
        (None, Some(body(&[("qty", Value::from(4))])))
    );
    let audit: Vec<(String, String, String)> = gw
        .store
        .conflict_records(Some("stock"), false, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.doc_id, c.policy, c.outcome))
        .collect();
    let expected = [("s-1", "overwrote"), ("s-2", "refused")]
        .map(|(id, o)| (id.to_owned(), "never_negative".to_owned(), o.to_owned()));
    assert_eq!(audit, expected);
    gw.shutdown().await;
    db.cleanup().await;
}
