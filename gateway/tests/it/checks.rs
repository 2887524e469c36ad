//! References and schema checks over real connections: each violation is rejected with its
//! code and stored as a sync error, the mutations after it apply, and a replay of the batch
//! gets the same answers without applying anything twice.

use super::*;

pub async fn references_and_schema_checks_reject_and_the_rest_apply(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut config = db.config();
    // The default config already declares `work_orders.machine` a reference to `machines`.
    let orders = config.collections.get_mut("work_orders").unwrap();
    assert_eq!(orders.references["machine"], "machines");
    orders.required = vec!["plant".into()];
    orders
        .schema
        .insert("qty".into(), syncgate_gateway::config::FieldType::Integer);
    // Its precedence ranks `status`, which a schema must then declare.
    orders
        .schema
        .insert("status".into(), syncgate_gateway::config::FieldType::String);
    let gw = Gateway::start(config).await.unwrap();
    let order =
        |mid: u64, id: &str, fields: &[(&str, Value)]| put(mid, "work_orders", id, body(fields));
    let batch = vec![
        // The machine does not exist yet: dangling.
        order(
            1,
            "wo-1",
            &[("plant", Value::from("A")), ("machine", Value::from("M1"))],
        ),
        put(2, "machines", "M1", body(&[("name", Value::from("press"))])),
        // Created earlier in the batch: fine.
        order(
            3,
            "wo-2",
            &[("plant", Value::from("A")), ("machine", Value::from("M1"))],
        ),
        order(4, "wo-3", &[("machine", Value::from("M1"))]),
        order(
            5,
            "wo-4",
            &[("plant", Value::from("A")), ("qty", Value::from("five"))],
        ),
        patch(6, "work_orders", "wo-2", body(&[("qty", Value::from(5))])),
    ];
    let mut acks = Vec::new();
    for _ in 0..2 {
        let (mut c, _) = connect(&gw, "terminal-checks").await;
        acks.push(push(&mut c, 1, batch.clone()).await);
        c.close().await;
    }
    assert_eq!(acks[0], acks[1], "a replay gets the stored answers");
    let codes: Vec<Option<u16>> = acks[0].results.iter().map(|r| r.code).collect();
    assert_eq!(
        codes,
        [
            Some(ErrorCode::DanglingReference.code()),
            None,
            None,
            Some(ErrorCode::MissingField.code()),
            Some(ErrorCode::WrongType.code()),
            None,
        ]
    );
    let dangling = acks[0].results[0].reason.as_deref().unwrap();
    assert!(
        dangling.contains("\"machine\"") && dangling.contains("machines/M1"),
        "{dangling}"
    );
    assert_eq!(
        gw.store.head().await.unwrap(),
        3,
        "M1, wo-2 and its patch, once each"
    );
    assert_eq!(
        gw.store.sync_error_count("terminal-checks").await.unwrap(),
        3,
        "each rejection is stored"
    );
    // An operator discards the first one (`syncgate admin sync-errors discard`): it stays
    // stored, marked, and leaves the open ones.
    assert!(
        gw.store
            .discard_sync_error("terminal-checks", 1)
            .await
            .unwrap()
    );
    assert!(
        !gw.store
            .discard_sync_error("terminal-checks", 2)
            .await
            .unwrap()
    );
    let open = gw
        .store
        .sync_errors(Some("terminal-checks"), true, 100)
        .await
        .unwrap();
    let open: Vec<u64> = open.iter().map(|e| e.mutation_id).collect();
    assert_eq!(open, [4, 5]);
    let all = gw.store.sync_errors(None, false, 100).await.unwrap();
    let states: Vec<(u64, &str)> = all
        .iter()
        .map(|e| (e.mutation_id, e.state.as_str()))
        .collect();
    assert_eq!(states, [(1, "discarded"), (4, "open"), (5, "open")]);
    // Machine M1 exists now (mutation 2 created it): the operator retries the dangling wo-1
    // (`syncgate admin sync-errors retry`) and it applies — once, however often it is run;
    // wo-3 still lacks its plant and is rejected again.
    let mut config = db.config();
    config.collections.get_mut("work_orders").unwrap().required = vec!["plant".into()];
    use syncgate_gateway::server::{Retried, retry_sync_error};
    let again = retry_sync_error(&config, "terminal-checks", 4)
        .await
        .unwrap();
    assert!(
        matches!(again, Retried::Rejected { code: 410, .. }),
        "still missing its plant: {again:?}"
    );
    let first = retry_sync_error(&config, "terminal-checks", 1)
        .await
        .unwrap();
    let Retried::Applied { version } = first else {
        panic!("{first:?}")
    };
    let head = gw.store.head().await.unwrap();
    assert_eq!(head, version);
    let second = retry_sync_error(&config, "terminal-checks", 1)
        .await
        .unwrap();
    assert_eq!(
        second,
        Retried::Applied { version },
        "a replay, not a second write"
    );
    assert_eq!(gw.store.head().await.unwrap(), head);
    assert_eq!(
        retry_sync_error(&config, "terminal-checks", 99)
            .await
            .unwrap(),
        Retried::NotFound
    );
    let all = gw
        .store
        .sync_errors(Some("terminal-checks"), false, 100)
        .await
        .unwrap();
    assert_eq!(all[0].state, "retried");
    let docs = server_docs(&gw, "work_orders").await;
    assert_eq!(docs.keys().collect::<Vec<_>>(), ["wo-1", "wo-2"]);
    assert_eq!(docs["wo-2"].0["qty"], Value::from(5));
    gw.shutdown().await;
    db.cleanup().await;
}
