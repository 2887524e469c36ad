#![allow(unreachable_pub)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    reason = "a test fails by panicking"
)]
//! Integration tests: one binary, every test on SQLite and on PostgreSQL.

mod cli;
mod layout;
mod util;

use std::collections::BTreeMap;
use std::time::Instant;

use rand::{Rng, SeedableRng};
use syncgate_client::Connection;
use syncgate_gateway::Gateway;
use syncgate_gateway::auth::Authenticator;
use syncgate_protocol::codec::encode;
use syncgate_protocol::*;
use util::*;

/// Runs an async test body on SQLite and on PostgreSQL.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name(Backend::Sqlite).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                if postgres_url().is_some() {
                    super::$name(Backend::Postgres).await;
                }
            }
        }
    )*};
}

mod api_keys;
mod capture;
mod checks;
mod compaction;
mod compression;
mod conflicts;
mod deploy;
mod drain;
mod fuzz;
mod http_api;
mod modes;
mod pacing;
mod scopes;
mod tokens;
use api_keys::api_keys_grant_roles_and_claims_until_revoked;
use checks::references_and_schema_checks_reject_and_the_rest_apply;
use compaction::the_log_is_compacted_behind_the_horizon_and_old_cursors_resync;
use conflicts::each_policy_decides_concurrent_edits_and_audits_them;
use http_api::the_http_api_writes_through_ingest_and_reads_with_scopes;
use modes::modes_and_fetch;
use scopes::a_plant_scoped_terminal_sees_and_writes_only_its_plant;

on_both_backends!(
    concurrent_writers_reach_every_subscriber_once_in_order,
    resume_from_cursor_after_disconnect,
    replayed_batch_applies_once_with_identical_acks,
    restart_keeps_changes_and_mutation_horizon,
    tombstones_reach_subscribers,
    filters_exclude_what_does_not_match,
    malformed_frames_get_errors_while_others_sync,
    bad_handshakes_get_fatal_errors,
    foreign_cursor_gets_resync,
    slow_consumer_is_disconnected_others_keep_syncing,
    failed_group_is_never_overtaken_by_a_later_batch,
    a_client_id_belongs_to_the_user_that_first_used_it,
    hostile_tokens_get_nothing,
    a_plant_scoped_terminal_sees_and_writes_only_its_plant,
    api_keys_grant_roles_and_claims_until_revoked,
    a_user_owns_at_most_max_client_ids,
    concurrent_new_client_ids_are_claimed_once_each,
    a_user_holds_at_most_max_documents,
    rejections_beyond_the_quota_are_answered_not_stored,
    references_and_schema_checks_reject_and_the_rest_apply,
    modes_and_fetch,
    each_policy_decides_concurrent_edits_and_audits_them,
    the_http_api_writes_through_ingest_and_reads_with_scopes,
    the_log_is_compacted_behind_the_horizon_and_old_cursors_resync,
);

const WRITERS: u64 = 4;
const BATCHES: u64 = 25;
const PER_BATCH: u64 = 8;

async fn writer(gw: &Gateway, w: u64) -> u64 {
    let (mut conn, _) = connect(gw, &format!("writer-{w}")).await;
    let mut max_seq = 0;
    let mut mid = 0;
    for b in 1..=BATCHES {
        let mutations = (0..PER_BATCH)
            .map(|i| {
                mid += 1;
                // Own documents plus one document all writers fight over.
                let id = if i == 0 {
                    "shared".to_owned()
                } else {
                    format!("w{w}-{}", (b * PER_BATCH + i) % 37)
                };
                put(
                    mid,
                    "work_orders",
                    &id,
                    body(&[
                        ("plant", Value::from("p1")),
                        ("writer", Value::from(w)),
                        ("qty_done", Value::from(mid)),
                    ]),
                )
            })
            .collect();
        let ack = push(&mut conn, b, mutations).await;
        assert_eq!(ack.results.len() as u64, PER_BATCH);
        assert!(
            ack.results
                .iter()
                .all(|r| r.status == MutationStatus::Applied)
        );
        max_seq = max_seq.max(ack.visible_at);
    }
    conn.close().await;
    max_seq
}

async fn concurrent_writers_reach_every_subscriber_once_in_order(backend: Backend) {
    let db = TestDb::new(backend).await;
    let gw = Gateway::start(db.config()).await.unwrap();
    let total = WRITERS * BATCHES * PER_BATCH;
    // Subscribed before any write: must see exactly seqs 1..=total.
    let mut early = Replica::subscribe(&gw, "early", "work_orders", Body::new(), None).await;
    early.until_seq(0).await;
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let gw = &gw;
            async move { writer(gw, w).await }
        })
        .collect();
    // Subscribers joining while the writers run: snapshot + catch-up + live must converge.
    let late = async {
        let mut late = Vec::new();
        for i in 0..3 {
            late.push(
                Replica::subscribe(&gw, &format!("late-{i}"), "work_orders", Body::new(), None)
                    .await,
            );
        }
        late
    };
    let (heads, mut late) = tokio::join!(futures_util::future::join_all(writers), late);
    let head = heads.into_iter().max().unwrap();
    assert_eq!(
        head, total,
        "seqs are contiguous: {total} mutations end at seq {total}"
    );
    early.until_seq(head).await;
    assert_eq!(
        early.seqs,
        (1..=total).collect::<Vec<_>>(),
        "every change exactly once, in order"
    );
    let expected = server_docs(&gw, "work_orders").await;
    assert_eq!(early.docs, expected);
    for r in &mut late {
        r.until_seq(head).await;
        r.assert_in_order_once();
        assert_eq!(
            r.docs, expected,
            "snapshot + changes converge on the server state"
        );
    }
    gw.shutdown().await;
    db.cleanup().await;
}

async fn resume_from_cursor_after_disconnect(backend: Backend) {
    let db = TestDb::new(backend).await;
    let gw = Gateway::start(db.config()).await.unwrap();
    let (mut w, _) = connect(&gw, "writer").await;
    let mut sub = Replica::subscribe(&gw, "reader", "machines", Body::new(), None).await;
    let ack = push(
        &mut w,
        1,
        (1..=10)
            .map(|i| {
                put(
                    i,
                    "machines",
                    &format!("m{i}"),
                    body(&[("state", Value::from("idle"))]),
                )
            })
            .collect(),
    )
    .await;
    sub.until_seq(ack.visible_at).await;
    let cursor = sub.cursor.clone().unwrap();
    let seen_before = sub.seqs.clone();
    sub.conn.close().await;
    // Missed while offline.
    let ack2 = push(
        &mut w,
        2,
        (11..=20)
            .map(|i| {
                put(
                    i,
                    "machines",
                    &format!("m{i}"),
                    body(&[("state", Value::from("running"))]),
                )
            })
            .collect(),
    )
    .await;
    // The ack can arrive before the hub has published the group; resuming before that would
    // get the changes live instead of from the tail.
    wait_published(&mut w, ack2.visible_at).await;
    let mut again =
        Replica::subscribe(&gw, "reader", "machines", Body::new(), Some(cursor.clone())).await;
    again.until_seq(ack2.visible_at).await;
    assert_eq!(
        again.snapshot_frames, 0,
        "a usable cursor needs no snapshot"
    );
    assert_eq!(
        again.seqs,
        ((cursor.seq + 1)..=ack2.visible_at).collect::<Vec<_>>()
    );
    assert!(seen_before.iter().all(|s| *s <= cursor.seq));
    // Everything missed was published by this node since it started: the catch-up came from
    // the hub's recent tail, not from the database.
    let pages = |source: &str| gw.metrics.catch_up_pages.with_label_values(&[source]).get();
    assert!(pages("memory") >= 1);
    assert_eq!(pages("database"), 0);
    // And live after the resume.
    let ack3 = push(&mut w, 3, vec![delete(21, "machines", "m1")]).await;
    again.until_seq(ack3.visible_at).await;
    assert_eq!(*again.seqs.last().unwrap(), ack3.visible_at);
    gw.shutdown().await;
    db.cleanup().await;
}

async fn replayed_batch_applies_once_with_identical_acks(backend: Backend) {
    let db = TestDb::new(backend).await;
    let gw = Gateway::start(db.config()).await.unwrap();
    let batch = vec![
        put(
            1,
            "work_orders",
            "wo-1",
            body(&[
                ("status", Value::from("open")),
                ("qty_done", Value::from(0)),
            ]),
        ),
        patch(
            2,
            "work_orders",
            "wo-1",
            body(&[("qty_done", Value::from(5))]),
        ),
        patch(
            3,
            "work_orders",
            "missing",
            body(&[("qty_done", Value::from(1))]),
        ),
        put(
            4,
            "work_orders",
            "wo-2",
            body(&[("status", Value::from("open"))]),
        ),
        delete(5, "work_orders", "wo-2"),
        put(6, "nope", "x", body(&[])),
    ];
    let mut acks = Vec::new();
    for attempt in 0..3 {
        // Each attempt on a fresh connection, as after a lost ack.
        let (mut c, welcome) = connect(&gw, "terminal-7").await;
        assert_eq!(
            welcome.last_applied_mutation,
            if attempt == 0 { 0 } else { 6 }
        );
        acks.push(push(&mut c, 42, batch.clone()).await);
        c.close().await;
    }
    assert_eq!(acks[0], acks[1]);
    assert_eq!(acks[1], acks[2]);
    let r = &acks[0].results;
    assert_eq!(r[0], MutationResult::applied(1, 1));
    assert_eq!(r[1], MutationResult::applied(2, 2));
    assert_eq!(r[2].status, MutationStatus::Rejected);
    assert_eq!(r[2].code, Some(ErrorCode::DocumentNotFound.code()));
    assert_eq!(r[5].code, Some(ErrorCode::UnknownCollection.code()));
    assert_eq!(
        acks[0].visible_at, 4,
        "three writes plus the delete: seqs 1..=4"
    );
    assert_eq!(gw.store.head().await.unwrap(), 4, "nothing applied twice");
    assert_eq!(
        gw.store.sync_error_count("terminal-7").await.unwrap(),
        2,
        "rejections are stored"
    );
    let doc = gw
        .store
        .document("work_orders", "wo-1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(doc.body.unwrap()["qty_done"], Value::from(5));
    assert_eq!((doc.version, doc.deleted), (2, false));
    gw.shutdown().await;
    db.cleanup().await;
}

async fn restart_keeps_changes_and_mutation_horizon(backend: Backend) {
    let db = TestDb::new(backend).await;
    let gw = Gateway::start(db.config()).await.unwrap();
    let epoch = gw.store.epoch().to_owned();
    let (mut c, _) = connect(&gw, "t1").await;
    let ack = push(
        &mut c,
        1,
        (1..=50)
            .map(|i| {
                put(
                    i * 2,
                    "stock",
                    &format!("s{i}"),
                    body(&[("qty", Value::from(i))]),
                )
            })
            .collect(),
    )
    .await;
    c.close().await;
    gw.shutdown().await;

    let gw = Gateway::start(db.config()).await.unwrap();
    assert_eq!(gw.store.epoch(), epoch, "the epoch survives restarts");
    let (_c, welcome) = connect(&gw, "t1").await;
    assert_eq!(welcome.last_applied_mutation, 100);
    let mut r = Replica::subscribe(
        &gw,
        "r",
        "stock",
        Body::new(),
        Some(Cursor { epoch, seq: 0 }),
    )
    .await;
    r.until_seq(ack.visible_at).await;
    assert_eq!(r.seqs, (1..=50).collect::<Vec<_>>());
    assert_eq!(r.docs.len(), 50);
    // A new process holds no recent tail: that catch-up was read from the database.
    assert!(
        gw.metrics
            .catch_up_pages
            .with_label_values(&["database"])
            .get()
            >= 1
    );
    gw.shutdown().await;
    db.cleanup().await;
}

async fn tombstones_reach_subscribers(backend: Backend) {
    let db = TestDb::new(backend).await;
    let gw = Gateway::start(db.config()).await.unwrap();
    let (mut w, _) = connect(&gw, "w").await;
    push(
        &mut w,
        1,
        vec![put(
            1,
            "machines",
            "m1",
            body(&[("state", Value::from("fault"))]),
        )],
    )
    .await;
    let mut r = Replica::subscribe(&gw, "r", "machines", Body::new(), None).await;
    r.until_seq(1).await;
    assert!(r.docs.contains_key("m1"));
    let ack = push(&mut w, 2, vec![delete(2, "machines", "m1")]).await;
    r.until_seq(ack.visible_at).await;
    assert!(!r.docs.contains_key("m1"), "the tombstone removed it");
    // A fresh snapshot does not contain deleted documents.
    let mut fresh = Replica::subscribe(&gw, "f", "machines", Body::new(), None).await;
    fresh.until_seq(ack.visible_at).await;
    assert!(fresh.docs.is_empty());
    let deleted = gw
        .store
        .document("machines", "m1")
        .await
        .unwrap()
        .unwrap()
        .deleted;
    assert!(deleted);
    gw.shutdown().await;
    db.cleanup().await;
}

async fn filters_exclude_what_does_not_match(backend: Backend) {
    let db = TestDb::new(backend).await;
    let gw = Gateway::start(db.config()).await.unwrap();
    let (mut w, _) = connect(&gw, "w").await;
    push(
        &mut w,
        1,
        vec![
            put(1, "work_orders", "a", body(&[("plant", Value::from("p1"))])),
            put(2, "work_orders", "b", body(&[("plant", Value::from("p2"))])),
        ],
    )
    .await;
    let filter = body(&[("plant", Value::from("p1"))]);
    let mut r = Replica::subscribe(&gw, "r", "work_orders", filter, None).await;
    r.until_seq(2).await;
    assert_eq!(r.docs.keys().collect::<Vec<_>>(), vec!["a"]);
    let ack = push(
        &mut w,
        2,
        vec![
            put(3, "work_orders", "c", body(&[("plant", Value::from("p2"))])),
            put(4, "work_orders", "d", body(&[("plant", Value::from("p1"))])),
            // "a" moves to plant p2: the p1 subscriber must see it leave.
            patch(5, "work_orders", "a", body(&[("plant", Value::from("p2"))])),
        ],
    )
    .await;
    r.until_seq(ack.visible_at).await;
    assert_eq!(r.docs.keys().collect::<Vec<_>>(), vec!["d"]);
    assert_eq!(
        r.seqs,
        vec![4, 5],
        "p2 documents never reach a p1 subscriber"
    );
    gw.shutdown().await;
    db.cleanup().await;
}

/// Frames that are invalid by construction (so each must produce an Error).
fn malformed(rng: &mut rand::rngs::StdRng) -> Vec<u8> {
    let valid = encode(&Frame::Push(Push {
        batch: rng.random(),
        mutations: vec![put(
            1,
            "work_orders",
            "x",
            body(&[("k", Value::from(rng.random::<u32>()))]),
        )],
    }));
    match rng.random_range(0..6) {
        // Random bytes that do not start with the 2-array marker every frame starts with.
        0 => {
            let n = rng.random_range(1..200);
            let mut b: Vec<u8> = (0..n).map(|_| rng.random()).collect();
            if b[0] == 0x92 {
                b[0] = 0x93;
            }
            b
        }
        // A valid frame cut short.
        1 => valid[..rng.random_range(0..valid.len())].to_vec(),
        // A valid frame with trailing garbage.
        2 => {
            let mut b = valid.clone();
            b.extend((0..rng.random_range(1..10)).map(|_| rng.random::<u8>()));
            b
        }
        // An unknown message type.
        3 => [0x92, 0xa3, b'z', b'z', b'z', 0x80].to_vec(),
        // A server-to-client message.
        4 => encode(&Frame::Synced(Synced {
            sub: 1,
            cursor: Cursor {
                epoch: "e".into(),
                seq: 1,
            },
        })),
        // Deep nesting.
        _ => {
            let mut b = vec![0x92, 0xa4, b'p', b'u', b's', b'h'];
            b.extend(std::iter::repeat_n(0x91, 40));
            b.push(0xc0);
            b
        }
    }
}

async fn malformed_frames_get_errors_while_others_sync(backend: Backend) {
    let db = TestDb::new(backend).await;
    let gw = Gateway::start(db.config()).await.unwrap();
    let mut r = Replica::subscribe(&gw, "reader", "stock", Body::new(), None).await;
    // Live before the writes start, so every change arrives as a change, not in the snapshot.
    r.until_seq(0).await;
    let attacker = async {
        let (mut bad, _) = connect(&gw, "fuzzer").await;
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        let mut codes = BTreeMap::new();
        for i in 0..1000u32 {
            bad.send_raw(malformed(&mut rng)).await.unwrap();
            match bad.recv_timeout(DEADLINE).await {
                Ok(Frame::Error(e)) => {
                    assert!(!e.fatal, "frame {i}: malformed input is not fatal: {e:?}");
                    *codes.entry(e.name).or_insert(0) += 1;
                }
                other => panic!("frame {i}: expected an error, got {other:?}"),
            }
        }
        // Still usable afterwards.
        bad.send(&Frame::Ping(Ping { nonce: 9 })).await.unwrap();
        match bad.recv_timeout(DEADLINE).await.unwrap() {
            Frame::Pong(p) => assert!(p.nonce == 9 && p.head.is_some(), "{p:?}"),
            other => panic!("expected a pong, got {other:?}"),
        }
        codes
    };
    let honest = async {
        let (mut w, _) = connect(&gw, "honest").await;
        let mut last = 0;
        for b in 1..=20 {
            last = push(
                &mut w,
                b,
                vec![put(
                    b,
                    "stock",
                    &format!("s{b}"),
                    body(&[("qty", Value::from(b))]),
                )],
            )
            .await
            .visible_at;
        }
        last
    };
    let (codes, last) = tokio::join!(attacker, honest);
    assert!(codes.len() >= 3, "several distinct error codes: {codes:?}");
    r.until_seq(last).await;
    assert_eq!(r.seqs, (1..=20).collect::<Vec<_>>());
    gw.shutdown().await;
    db.cleanup().await;
}

async fn expect_fatal(conn: &mut syncgate_client::Connection, code: ErrorCode) {
    match conn.recv_timeout(DEADLINE).await {
        Ok(Frame::Error(e)) => {
            assert_eq!(e.code, code.code(), "{e:?}");
            assert!(e.fatal);
        }
        other => panic!("expected fatal {code}, got {other:?}"),
    }
    // Then the server closes with 4000 + code.
    match conn.recv_timeout(DEADLINE).await {
        Err(syncgate_client::ConnError::Closed(Some(c))) => assert_eq!(c, 4000 + code.code()),
        other => panic!("expected close, got {other:?}"),
    }
}

async fn bad_handshakes_get_fatal_errors(backend: Backend) {
    let db = TestDb::new(backend).await;
    let gw = Gateway::start(db.config()).await.unwrap();
    let url = ws_url(&gw);
    let hello = |versions: Vec<u32>, client_id: &str, token: String| {
        Frame::Hello(Hello {
            versions,
            client_id: client_id.into(),
            token,
            agent: "it".into(),
            compression: vec![],
        })
    };
    let cases = [
        (
            hello(vec![99], "c", token("u")),
            ErrorCode::UnsupportedVersion,
        ),
        (
            hello(vec![1], "c", "not-a-jwt".into()),
            ErrorCode::Unauthorized,
        ),
        (hello(vec![1], "", token("u")), ErrorCode::InvalidClientId),
        (Frame::Ping(Ping { nonce: 1 }), ErrorCode::HandshakeRequired),
    ];
    for (frame, code) in cases {
        let mut c = syncgate_client::Connection::open(&url).await.unwrap();
        c.send(&frame).await.unwrap();
        expect_fatal(&mut c, code).await;
    }
    // PROTOCOL.md §3.1: before `welcome`, anything but a valid hello ends the connection; a
    // hello without a token is refused as unauthorized (200), not as malformed.
    let raw = |kind: &str, fields: Vec<(&str, Value)>| {
        syncgate_protocol::codec::to_msgpack(&Value::Array(vec![
            Value::from(kind),
            Value::Map(
                fields
                    .into_iter()
                    .map(|(k, v)| (Value::from(k), v))
                    .collect(),
            ),
        ]))
    };
    let v1 = || Value::Array(vec![Value::from(1)]);
    let raw_cases = [
        (vec![0xc1, 0x00], ErrorCode::MalformedFrame),
        (
            raw(
                "hello",
                vec![("versions", v1()), ("client_id", Value::from("c"))],
            ),
            ErrorCode::Unauthorized,
        ),
        (
            raw(
                "hello",
                vec![
                    ("versions", v1()),
                    ("client_id", Value::from("c")),
                    ("token", Value::Nil),
                ],
            ),
            ErrorCode::Unauthorized,
        ),
    ];
    for (bytes, code) in raw_cases {
        let mut c = syncgate_client::Connection::open(&url).await.unwrap();
        c.send_raw(bytes).await.unwrap();
        expect_fatal(&mut c, code).await;
    }
    // A text frame before the handshake ends the connection too (106, fatal).
    {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .unwrap();
        ws.send(Message::Text("hello?".into())).await.unwrap();
        let end = Instant::now() + DEADLINE;
        let mut got_error = false;
        loop {
            let msg = tokio::time::timeout(end - Instant::now(), ws.next())
                .await
                .expect("an answer before the deadline");
            match msg {
                Some(Ok(Message::Binary(b))) => match syncgate_protocol::codec::decode(&b) {
                    Ok(Frame::Error(e)) => {
                        assert_eq!(e.code, ErrorCode::TextFrameNotSupported.code());
                        assert!(e.fatal, "{e:?}");
                        got_error = true;
                    }
                    other => panic!("{other:?}"),
                },
                Some(Ok(Message::Close(Some(c)))) => {
                    assert_eq!(u16::from(c.code), 4106);
                    break;
                }
                Some(Ok(_)) => {}
                None | Some(Err(_)) => break,
            }
        }
        assert!(got_error);
    }
    // Optional fields sent as nil mean "not given" (§2): a hello without an agent and a
    // subscription without a filter are served.
    let mut c = syncgate_client::Connection::open(&url).await.unwrap();
    c.send_raw(raw(
        "hello",
        vec![
            ("versions", v1()),
            ("client_id", Value::from("nil-fields")),
            ("token", Value::from(token("u"))),
            ("agent", Value::Nil),
        ],
    ))
    .await
    .unwrap();
    assert!(matches!(
        c.recv_timeout(DEADLINE).await.unwrap(),
        Frame::Welcome(_)
    ));
    c.send_raw(raw(
        "subscribe",
        vec![
            ("sub", Value::from(1)),
            ("collection", Value::from("stock")),
            ("filter", Value::Nil),
            ("cursor", Value::Nil),
        ],
    ))
    .await
    .unwrap();
    loop {
        match c.recv_timeout(DEADLINE).await.unwrap() {
            Frame::Synced(s) => {
                assert_eq!(s.sub, 1);
                break;
            }
            Frame::Snapshot(_) => {}
            other => panic!("{other:?}"),
        }
    }
    // An empty batch is acknowledged with no results and applies nothing (§4.5).
    let ack = push(&mut c, 1, Vec::new()).await;
    assert!(ack.results.is_empty() && ack.visible_at == 0, "{ack:?}");
    // A frame over the size limit is refused before it is read.
    let mut cfg = db.config();
    cfg.limits.max_frame_bytes = 4096;
    cfg.limits.max_document_bytes = 1024;
    cfg.outbound_buffer_bytes = 8192;
    gw.shutdown().await;
    let gw = Gateway::start(cfg).await.unwrap();
    let (mut c, w) = connect(&gw, "big").await;
    assert_eq!(w.limits.max_frame_bytes, 4096);
    c.send_raw(vec![0u8; 10_000]).await.unwrap();
    expect_fatal(&mut c, ErrorCode::FrameTooLarge).await;
    gw.shutdown().await;
    db.cleanup().await;
}

async fn foreign_cursor_gets_resync(backend: Backend) {
    let db = TestDb::new(backend).await;
    let gw = Gateway::start(db.config()).await.unwrap();
    let (mut w, _) = connect(&gw, "w").await;
    let ack = push(
        &mut w,
        1,
        vec![put(1, "stock", "s1", body(&[("qty", Value::from(1))]))],
    )
    .await;
    let foreign = Cursor {
        epoch: "0000000000000000".into(),
        seq: 1,
    };
    let mut r = Replica::subscribe(&gw, "r", "stock", Body::new(), Some(foreign)).await;
    r.until_seq(ack.visible_at).await;
    assert_eq!(r.resyncs, vec!["epoch_changed".to_owned()]);
    assert_eq!(r.docs.len(), 1, "the resync is followed by a full snapshot");
    let ahead = Cursor {
        epoch: gw.store.epoch().to_owned(),
        seq: 1_000_000,
    };
    let mut r = Replica::subscribe(&gw, "r2", "stock", Body::new(), Some(ahead)).await;
    r.until_seq(ack.visible_at).await;
    assert_eq!(r.resyncs, vec!["cursor_ahead".to_owned()]);
    gw.shutdown().await;
    db.cleanup().await;
}

/// Two gateway processes' worth of nodes on one PostgreSQL database: writers on both, every
/// subscriber on either node sees every change exactly once and in order (invariant 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_two_gateways_one_database() {
    if postgres_url().is_none() {
        return;
    }
    let db = TestDb::new(Backend::Postgres).await;
    let a = Gateway::start(db.config()).await.unwrap();
    let b = Gateway::start(db.config()).await.unwrap();
    assert_eq!(a.store.epoch(), b.store.epoch());
    let mut subs_a = Replica::subscribe(&a, "ra", "work_orders", Body::new(), None).await;
    let mut subs_b = Replica::subscribe(&b, "rb", "work_orders", Body::new(), None).await;
    subs_a.until_seq(0).await;
    subs_b.until_seq(0).await;
    let started = Instant::now();
    let heads = futures_util::future::join_all([
        writer(&a, 0),
        writer(&b, 1),
        writer(&a, 2),
        writer(&b, 3),
    ])
    .await;
    let head = heads.into_iter().max().unwrap();
    let total = WRITERS * BATCHES * PER_BATCH;
    assert_eq!(head, total);
    for r in [&mut subs_a, &mut subs_b] {
        r.until_seq(head).await;
        assert_eq!(
            r.seqs,
            (1..=total).collect::<Vec<_>>(),
            "every change once, in order"
        );
    }
    assert_eq!(subs_a.docs, subs_b.docs);
    eprintln!("two-node run took {:?}", started.elapsed());
    a.shutdown().await;
    b.shutdown().await;
    db.cleanup().await;
}

/// A subscriber that never reads: its outbound queue hits the byte cap, it is degraded to
/// catch-up, still behind at `slow_consumer_deadline_ms` it is disconnected (`slow_consumer`),
/// and a reading subscriber still receives everything.
async fn slow_consumer_is_disconnected_others_keep_syncing(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut cfg = db.config();
    cfg.slow_consumer_deadline_ms = 500;
    cfg.limits.max_frame_bytes = 64 * 1024;
    cfg.limits.max_document_bytes = 8 * 1024;
    cfg.outbound_buffer_bytes = 64 * 1024;
    let gw = Gateway::start(cfg).await.unwrap();
    let mut stalled = Replica::subscribe(&gw, "stalled", "stock", Body::new(), None).await;
    stalled.until_seq(0).await;
    let mut reader = Replica::subscribe(&gw, "reader", "stock", Body::new(), None).await;
    reader.until_seq(0).await;
    // About 24 MiB of changes: more than loopback socket buffers can absorb.
    let (mut w, _) = connect(&gw, "w").await;
    let pad = Value::from("x".repeat(4000));
    let writes = async {
        let mut last = 0;
        for b in 0..400u64 {
            let ms = (0..15)
                .map(|i| {
                    put(
                        b * 15 + i + 1,
                        "stock",
                        &format!("s{i}"),
                        body(&[("pad", pad.clone()), ("b", Value::from(b))]),
                    )
                })
                .collect();
            last = push(&mut w, b, ms).await.visible_at;
        }
        last
    };
    let (last, ()) = tokio::join!(writes, async {
        reader.until_seq_resuming(&gw, "reader", 6000).await;
    });
    assert_eq!(last, 6000);
    reader.assert_in_order_once();
    assert_eq!(reader.seqs.len(), 6000);
    // The stalled client now reads: whatever was buffered, then the end of the connection.
    let end = Instant::now() + DEADLINE;
    let closed = loop {
        match stalled.conn.recv_timeout(end - Instant::now()).await {
            Ok(Frame::Error(e)) => {
                assert_eq!(e.code, ErrorCode::SlowConsumer.code());
                assert!(e.fatal);
            }
            Ok(_) => {}
            Err(syncgate_client::ConnError::Timeout) => {
                panic!("the stalled client was never disconnected")
            }
            Err(e) => break e,
        }
    };
    eprintln!("stalled client ended with: {closed}");
    assert!(
        gw.metrics
            .errors
            .with_label_values(&["slow_consumer"])
            .get()
            >= 1
    );
    gw.shutdown().await;
    db.cleanup().await;
}

/// Several subscriptions started together on one connection (what the SDK does on every
/// reconnect) share its outbound cap: their snapshots wait for room instead of overfilling it,
/// so live chunks for the subscriptions already live still fit, and a client that reads is
/// never closed as a slow consumer. (The unit test
/// `outbound::tests::catch_up_waits_for_half_the_cap_and_never_overfills` pins the mechanism;
/// over loopback this run rarely comes near the cap either way, so it guards the whole path
/// rather than proving the fix.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_starting_together_on_a_reading_connection_are_not_slow_consumers() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut cfg = db.config();
    small_queues(&mut cfg);
    let gw = Gateway::start(cfg).await.unwrap();
    let pad = Value::from("x".repeat(4000));
    let (mut w, _) = connect(&gw, "w").await;
    let mut mid = 0;
    let batch = |b: u64, mid: &mut u64| {
        (0..15)
            .map(|i| {
                *mid += 1;
                put(
                    *mid,
                    "stock",
                    &format!("s{}", (b * 15 + i) % 240),
                    body(&[("pad", pad.clone()), ("b", Value::from(b))]),
                )
            })
            .collect::<Vec<_>>()
    };
    // 240 documents of ~4 KB: every snapshot is ~1 MB, 16 times the cap.
    for b in 0..16 {
        push(&mut w, b, batch(b, &mut mid)).await;
    }
    let (mut c, _) = connect(&gw, "reader").await;
    const SUBS: u32 = 8;
    for sub in 1..=SUBS {
        c.send(&Frame::Subscribe(syncgate_protocol::Subscribe {
            sub,
            collection: "stock".into(),
            filter: Body::new(),
            cursor: None,
        }))
        .await
        .unwrap();
    }
    // Live writes while the snapshots are under way.
    let writes = async {
        let mut last = 0;
        for b in 16..56 {
            last = push(&mut w, b, batch(b, &mut mid)).await.visible_at;
        }
        last
    };
    let read = async {
        let mut synced = std::collections::BTreeSet::new();
        let mut reached: BTreeMap<u32, u64> = BTreeMap::new();
        let end = Instant::now() + DEADLINE;
        loop {
            // Done once every subscription is live and has everything the writer committed
            // (`u64::MAX` until the writer is done is handled by the caller's join).
            let frame = c.recv_timeout(end - Instant::now()).await.unwrap();
            match frame {
                Frame::Synced(s) => {
                    synced.insert(s.sub);
                    let r = reached.entry(s.sub).or_default();
                    *r = (*r).max(s.cursor.seq);
                }
                Frame::Changes(ch) => {
                    let r = reached.entry(ch.sub).or_default();
                    *r = (*r).max(ch.cursor.seq);
                }
                Frame::Error(e) => panic!("a reading client got {} {}", e.name, e.message),
                _ => {}
            }
            if synced.len() == SUBS as usize && reached.values().all(|r| *r >= 56 * 15) {
                return reached;
            }
        }
    };
    let (last, reached) = tokio::join!(writes, read);
    assert_eq!(last, 56 * 15);
    assert_eq!(reached.len(), SUBS as usize);
    assert_eq!(
        gw.metrics
            .errors
            .with_label_values(&["slow_consumer"])
            .get(),
        0
    );
    gw.shutdown().await;
    db.cleanup().await;
}

/// 64 KiB frames and outbound queue (8 KiB documents): a stalled subscriber fills its queue
/// after a few changes.
fn small_queues(cfg: &mut syncgate_gateway::Config) {
    cfg.limits.max_frame_bytes = 64 * 1024;
    cfg.limits.max_document_bytes = 8 * 1024;
    cfg.outbound_buffer_bytes = 64 * 1024;
}

/// A subscriber of `stock` with a 4 KiB kernel receive buffer (when it stops reading, the
/// stall backs up into the gateway after a few KiB), synced.
async fn synced_small_buffer_subscriber(gw: &Gateway, client_id: &str) -> Connection {
    let conn = syncgate_client::Connection::open_with(&ws_url(gw), None, Some(4096))
        .await
        .unwrap();
    let (mut slow, _) = conn.handshake(client_id, &token("tester")).await.unwrap();
    slow.send(&Frame::Subscribe(syncgate_protocol::Subscribe {
        sub: 1,
        collection: "stock".into(),
        filter: Body::new(),
        cursor: None,
    }))
    .await
    .unwrap();
    loop {
        if let Frame::Synced(_) = slow.recv_timeout(DEADLINE).await.unwrap() {
            return slow;
        }
    }
}

/// Invariant 8, the graceful side: a subscriber that falls behind (it stops reading while
/// 12 MB of changes go by, then reads again) is not disconnected. Its queue fills, it is
/// degraded to catch-up, receives each document's latest version per page instead of every
/// version (far fewer changes than were written), rejoins live, and ends with exactly the
/// server's documents; it never sees an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_falls_behind_is_degraded_and_converges_without_a_disconnect() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut cfg = db.config();
    small_queues(&mut cfg);
    let gw = Gateway::start(cfg).await.unwrap();
    let mut slow = synced_small_buffer_subscriber(&gw, "behind").await;
    // 12,000 changes to 4 documents of ~1 KB while it reads nothing.
    let (mut w, _) = connect(&gw, "w").await;
    let pad = Value::from("x".repeat(1000));
    const BATCHES: u64 = 800;
    let mut last = 0;
    for b in 0..BATCHES {
        let ms = (0..15)
            .map(|i| {
                put(
                    b * 15 + i + 1,
                    "stock",
                    &format!("s{}", i % 4),
                    body(&[("pad", pad.clone()), ("n", Value::from(b * 15 + i))]),
                )
            })
            .collect();
        last = push(&mut w, b, ms).await.visible_at;
    }
    assert_eq!(last, BATCHES * 15);
    assert!(
        gw.metrics
            .slow_consumers
            .with_label_values(&["degraded"])
            .get()
            >= 1,
        "the stalled subscriber was never degraded"
    );
    // It reads again.
    let mut docs: BTreeMap<String, Value> = BTreeMap::new();
    let (mut frames, mut changes, mut reached) = (0u64, 0u64, 0u64);
    while reached < last {
        match slow.recv_timeout(DEADLINE).await.unwrap() {
            Frame::Changes(ch) => {
                frames += 1;
                changes += ch.changes.len() as u64;
                reached = reached.max(ch.cursor.seq);
                for c in ch.changes {
                    let n = c.body.as_ref().and_then(|b| b.get("n")).cloned();
                    docs.insert(c.id, n.unwrap_or(Value::Nil));
                }
            }
            Frame::Error(e) => panic!("the slow subscriber got {} {}", e.name, e.message),
            _ => {}
        }
    }
    let server: BTreeMap<String, Value> = server_docs(&gw, "stock")
        .await
        .into_iter()
        .map(|(id, (b, _))| (id, b["n"].clone()))
        .collect();
    assert_eq!(docs, server);
    eprintln!("caught up with {changes} changes in {frames} frames for {last} written");
    assert!(
        changes < last / 2 && frames < changes,
        "{changes} changes in {frames} frames for {last} written"
    );
    // Live again: the next change arrives as it happens.
    let next = push(
        &mut w,
        BATCHES,
        vec![put(
            BATCHES * 15 + 1,
            "stock",
            "s0",
            body(&[("n", Value::from(-1))]),
        )],
    )
    .await;
    loop {
        match slow.recv_timeout(DEADLINE).await.unwrap() {
            Frame::Changes(ch) if ch.cursor.seq == next.visible_at => break,
            Frame::Error(e) => panic!("{} {}", e.name, e.message),
            _ => {}
        }
    }
    let m = &gw.metrics.slow_consumers;
    assert!(m.with_label_values(&["rejoined"]).get() >= 1);
    assert_eq!(m.with_label_values(&["dropped"]).get(), 0);
    assert_eq!(
        gw.metrics
            .errors
            .with_label_values(&["slow_consumer"])
            .get(),
        0
    );
    gw.shutdown().await;
    db.cleanup().await;
}

/// A subscriber that reads slowly — all the time, one frame every 25 ms, slower than the
/// changes come — is degraded to catch-up whenever its queue fills, receives fewer frames
/// than there were changes (superseded versions left out), is never disconnected and never
/// sees an error, and ends with exactly the server's documents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_reads_slowly_converges_with_fewer_frames_and_no_disconnect() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut cfg = db.config();
    small_queues(&mut cfg);
    let gw = Gateway::start(cfg).await.unwrap();
    let mut slow = synced_small_buffer_subscriber(&gw, "dawdler").await;
    let (target_tx, mut target_rx) = tokio::sync::watch::channel(u64::MAX);
    let reader = tokio::spawn(async move {
        let mut docs: BTreeMap<String, Value> = BTreeMap::new();
        let (mut frames, mut changes, mut reached) = (0u64, 0u64, 0u64);
        while reached < *target_rx.borrow_and_update() {
            let frame = tokio::select! {
                f = slow.recv_timeout(DEADLINE) => f.unwrap(),
                // The writes ended: check whether everything has arrived.
                _ = target_rx.changed() => continue,
            };
            match frame {
                Frame::Changes(ch) => {
                    frames += 1;
                    changes += ch.changes.len() as u64;
                    reached = reached.max(ch.cursor.seq);
                    for c in ch.changes {
                        let n = c.body.as_ref().and_then(|b| b.get("n")).cloned();
                        docs.insert(c.id, n.unwrap_or(Value::Nil));
                    }
                }
                Frame::Error(e) => panic!("the slow reader got {} {}", e.name, e.message),
                _ => {}
            }
            // The reader's own pace: slower than the changes come.
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        (docs, frames, changes)
    });
    // 12,000 changes of ~1 KB to 4 documents, as fast as the gateway acknowledges them.
    let (mut w, _) = connect(&gw, "w").await;
    let pad = Value::from("x".repeat(1000));
    const BATCHES: u64 = 800;
    let mut last = 0;
    for b in 0..BATCHES {
        let ms = (0..15)
            .map(|i| {
                put(
                    b * 15 + i + 1,
                    "stock",
                    &format!("s{}", i % 4),
                    body(&[("pad", pad.clone()), ("n", Value::from(b * 15 + i))]),
                )
            })
            .collect();
        last = push(&mut w, b, ms).await.visible_at;
    }
    target_tx.send_replace(last);
    let (docs, frames, changes) = reader.await.unwrap();
    let server: BTreeMap<String, Value> = server_docs(&gw, "stock")
        .await
        .into_iter()
        .map(|(id, (b, _))| (id, b["n"].clone()))
        .collect();
    assert_eq!(docs, server);
    eprintln!("read {changes} changes in {frames} frames for {last} written");
    assert!(frames < last, "{frames} frames for {last} changes");
    let m = &gw.metrics.slow_consumers;
    assert!(
        m.with_label_values(&["degraded"]).get() >= 1,
        "a reader of 40 frames/s kept up with the writes: the test shows nothing"
    );
    assert_eq!(m.with_label_values(&["dropped"]).get(), 0);
    assert_eq!(
        gw.metrics
            .errors
            .with_label_values(&["slow_consumer"])
            .get(),
        0
    );
    gw.shutdown().await;
    db.cleanup().await;
}

/// A subscriber that stops reading but goes on sending `ping` (as PROTOCOL.md §3.11 asks) and
/// stays behind past `slow_consumer_deadline_ms` is closed with `slow_consumer`, and it sees
/// that close when it reads again: the frames before it, the error 501 and close code 4501,
/// not a reset (1006). The gateway keeps reading its pings while it waits for the client to
/// take its last frames: a socket closed with unread bytes is reset, and a reset discards what
/// the client had not read yet. The stall lasts longer than the 5 s the gateway used to wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinging_subscriber_that_stopped_reading_sees_slow_consumer_not_a_reset() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut cfg = db.config();
    small_queues(&mut cfg);
    cfg.slow_consumer_deadline_ms = 200;
    cfg.close_linger_ms = 60_000;
    let gw = Gateway::start(cfg).await.unwrap();
    let mut slow = synced_small_buffer_subscriber(&gw, "pinger").await;
    // Changes of ~2 KB while it reads nothing but pings, until the gateway gives up on it.
    let (mut w, _) = connect(&gw, "w").await;
    let pad = Value::from("x".repeat(2000));
    let dropped = || {
        gw.metrics
            .slow_consumers
            .with_label_values(&["dropped"])
            .get()
    };
    let end = Instant::now() + DEADLINE;
    let mut b = 0u64;
    while dropped() == 0 {
        assert!(
            Instant::now() < end,
            "the stalled subscriber was never dropped"
        );
        let ms = (0..10)
            .map(|i| {
                put(
                    b * 10 + i + 1,
                    "stock",
                    &format!("s{}", (b * 10 + i) % 40),
                    body(&[("pad", pad.clone())]),
                )
            })
            .collect();
        push(&mut w, b, ms).await;
        slow.send(&Frame::Ping(Ping { nonce: b })).await.unwrap();
        b += 1;
    }
    // Still not reading, still pinging, for longer than the gateway used to wait.
    let stall = Instant::now() + std::time::Duration::from_secs(6);
    while Instant::now() < stall {
        slow.send(&Frame::Ping(Ping { nonce: b })).await.unwrap();
        b += 1;
        // The client's own pace of pings, not a synchronisation.
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    // It reads again: whatever was on its way, then the error, then the close.
    let mut error = None;
    let code = loop {
        match slow.recv_timeout(DEADLINE).await {
            Ok(Frame::Error(e)) => error = Some(e),
            Ok(_) => {}
            Err(syncgate_client::ConnError::Closed(code)) => break code,
            Err(e) => panic!("expected the close, got {e:?} (error frame: {error:?})"),
        }
    };
    let error = error.expect("an error frame before the close");
    assert_eq!(error.code, ErrorCode::SlowConsumer.code());
    assert!(error.fatal);
    assert_eq!(code, Some(4000 + ErrorCode::SlowConsumer.code()));
    gw.shutdown().await;
    db.cleanup().await;
}

/// PROTOCOL.md §3.7: when a batch is not committed, no later batch of the same client may
/// commit before it is pushed again. One client keeps 8 batches of 20 in flight; one of them
/// writes a document whose change row makes the database fail the transaction (SQLite: a
/// trigger aborts it; PostgreSQL: a trigger kills the gateway's session). Every batch from the
/// failed one on must be refused as retryable, and every mutation the client was told to push
/// again must then apply exactly once.
async fn failed_group_is_never_overtaken_by_a_later_batch(backend: Backend) {
    const PER: u64 = 20;
    const IN_FLIGHT: u64 = 8;
    const ROUNDS: u64 = 4;
    let db = TestDb::new(backend).await;
    let gw = Gateway::start(db.config()).await.unwrap();
    let fault = Fault::install(&db.url, backend).await;
    let mut reader = Replica::subscribe(&gw, "reader", "work_orders", Body::new(), None).await;
    let (mut conn, _) = connect(&gw, "pipeliner").await;
    let mut next_batch = 1;
    let mut versions: BTreeMap<u64, u64> = BTreeMap::new();
    let mut retried = 0;
    for (round, poisoned) in [(0u64, 0usize), (1, 3), (2, 1), (3, 6)] {
        fault.arm(true).await;
        let batches: Vec<(u64, Vec<Mutation>)> = (0..IN_FLIGHT)
            .map(|b| {
                let mutations = (0..PER)
                    .map(|i| {
                        let mid = round * IN_FLIGHT * PER + b * PER + i + 1;
                        let id = if b as usize == poisoned && i == PER / 2 {
                            Fault::POISON.to_owned()
                        } else {
                            format!("wo-{mid}")
                        };
                        put(
                            mid,
                            "work_orders",
                            &id,
                            body(&[("qty_done", Value::from(mid))]),
                        )
                    })
                    .collect();
                (next_batch + b, mutations)
            })
            .collect();
        next_batch += IN_FLIGHT;
        let answers = push_pipelined(&mut conn, &batches).await;
        let mut failed_from = None;
        for (i, (batch, mutations)) in batches.iter().enumerate() {
            match &answers[batch] {
                Answer::Ack(a) => {
                    assert!(
                        failed_from.is_none(),
                        "round {round}: batch {batch} applied after an earlier batch failed"
                    );
                    for (r, m) in a.results.iter().zip(mutations) {
                        assert_eq!(r.status, MutationStatus::Applied, "{r:?}");
                        versions.insert(m.mutation_id, r.version.unwrap());
                    }
                }
                Answer::Refused(e) => {
                    assert!(
                        [504, 505].contains(&e.code) && !e.fatal,
                        "round {round}: batch {batch}: {e:?}"
                    );
                    failed_from.get_or_insert(i);
                    retried += mutations.len();
                }
            }
        }
        let failed_from = failed_from.expect("the poisoned batch failed");
        assert!(failed_from <= poisoned);
        // Push again from the first batch not applied, in order, as PROTOCOL.md §3.7 says.
        fault.arm(false).await;
        for (_, mutations) in &batches[failed_from..] {
            let ack = push(&mut conn, next_batch, mutations.clone()).await;
            next_batch += 1;
            for (r, m) in ack.results.iter().zip(mutations) {
                assert_eq!(r.status, MutationStatus::Applied, "replay: {r:?}");
                versions.insert(m.mutation_id, r.version.unwrap());
            }
        }
    }
    assert!(retried >= (PER * ROUNDS) as usize);
    // Every mutation applied exactly once: one change each, in mutation order.
    let total = ROUNDS * IN_FLIGHT * PER;
    assert_eq!(versions.len() as u64, total);
    let seqs: Vec<u64> = versions.values().copied().collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "applied out of order");
    let head = *seqs.last().unwrap();
    reader.until_seq(head).await;
    reader.assert_in_order_once();
    assert_eq!(reader.seqs, seqs, "the log holds each mutation once");
    let docs = server_docs(&gw, "work_orders").await;
    // One document per mutation, but the poison document is written once per round.
    assert_eq!(docs.len() as u64, total - ROUNDS + 1);
    gw.shutdown().await;
    db.cleanup().await;
}

/// A hello as an adversary sends it.
fn hello_as(client_id: &str, token: String) -> Frame {
    Frame::Hello(Hello {
        versions: vec![1],
        client_id: client_id.into(),
        token,
        agent: "adversary".into(),
        compression: vec![],
    })
}

/// Another user presenting a client id gets nothing of it (not even its horizon), cannot
/// advance it, and the owner's edits and replays still apply exactly once. An administrator can
/// hand the installation over.
async fn a_client_id_belongs_to_the_user_that_first_used_it(backend: Backend) {
    let db = TestDb::new(backend).await;
    let gw = Gateway::start(db.config()).await.unwrap();
    let url = ws_url(&gw);
    let doc = |n: i64| body(&[("qty", Value::from(n))]);
    let (mut alice, welcome) = Connection::connect(&url, "term-7", &token("alice"))
        .await
        .unwrap();
    assert_eq!(welcome.last_applied_mutation, 0);
    let first: Vec<Mutation> = (1..=5)
        .map(|i| put(i, "work_orders", &format!("wo-{i}"), doc(i as i64)))
        .collect();
    let ack = push(&mut alice, 1, first.clone()).await;
    // Bob presents alice's client id: refused before any welcome, whatever he then sends.
    for attempt in [
        vec![hello_as("term-7", token("bob"))],
        vec![
            hello_as("term-7", token("bob")),
            Frame::Push(Push {
                batch: 1,
                mutations: vec![put(1000, "work_orders", "wo-x", doc(0))],
            }),
        ],
    ] {
        let mut bob = syncgate_client::Connection::open(&url).await.unwrap();
        for f in &attempt {
            let _ = bob.send(f).await;
        }
        expect_fatal(&mut bob, ErrorCode::ClientIdTaken).await;
    }
    // Alice's next edit and her replay of everything apply exactly once, unaffected.
    let (mut alice, welcome) = Connection::connect(&url, "term-7", &token("alice"))
        .await
        .unwrap();
    assert_eq!(welcome.last_applied_mutation, 5, "bob moved nothing");
    let sixth = put(6, "work_orders", "wo-6", doc(6));
    let next = push(&mut alice, 2, vec![sixth.clone()]).await;
    assert_eq!(next.results[0].status, MutationStatus::Applied);
    let mut all = first;
    all.push(sixth);
    let replay = push(&mut alice, 3, all).await;
    let mut expected = ack.results.clone();
    expected.extend(next.results.clone());
    assert_eq!(
        replay.results, expected,
        "the replay gets the stored outcomes"
    );
    assert_eq!(gw.store.head().await.unwrap(), 6, "nothing applied twice");
    assert!(!server_docs(&gw, "work_orders").await.contains_key("wo-x"));
    // The installation is handed over to bob: now he holds it and alice is refused.
    let previous = gw.store.reassign_client("term-7", "bob").await.unwrap();
    assert_eq!(previous.as_deref(), Some("alice"));
    let (_bob, welcome) = Connection::connect(&url, "term-7", &token("bob"))
        .await
        .unwrap();
    assert_eq!(welcome.last_applied_mutation, 6);
    let mut again = syncgate_client::Connection::open(&url).await.unwrap();
    again
        .send(&hello_as("term-7", token("alice")))
        .await
        .unwrap();
    expect_fatal(&mut again, ErrorCode::ClientIdTaken).await;
    gw.shutdown().await;
    db.cleanup().await;
}

/// Tokens that are not yet valid, meant for another service, unsigned, or with extensions the
/// gateway does not understand get a fatal `unauthorized` and nothing else.
async fn hostile_tokens_get_nothing(backend: Backend) {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use syncgate_gateway::auth::Claims;
    let db = TestDb::new(backend).await;
    let gw = Gateway::start(db.config()).await.unwrap();
    let url = ws_url(&gw);
    let auth = Authenticator::new(SECRET.as_bytes());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let unsigned = format!(
        "{}.{}.",
        B64.encode(r#"{"alg":"none","typ":"JWT"}"#),
        B64.encode(serde_json::to_vec(&Claims::new("root", 600)).unwrap())
    );
    let tokens = [
        (
            "not yet valid",
            auth.mint_claims(Claims {
                nbf: Some(now + 120),
                ..Claims::new("alice", 600)
            })
            .unwrap(),
        ),
        (
            "another service's audience",
            auth.mint_claims(Claims {
                aud: Some("billing".into()),
                ..Claims::new("alice", 600)
            })
            .unwrap(),
        ),
        ("alg none", unsigned),
        (
            "a control character in sub",
            auth.mint("ali\u{7}ce", 600).unwrap(),
        ),
    ];
    for (name, t) in tokens {
        let mut c = syncgate_client::Connection::open(&url).await.unwrap();
        c.send(&hello_as(&format!("c-{}", name.len()), t))
            .await
            .unwrap();
        match c.recv_timeout(DEADLINE).await {
            Ok(Frame::Error(e)) => {
                assert_eq!(e.code, ErrorCode::Unauthorized.code(), "{name}: {e:?}");
                assert!(e.fatal, "{name}");
            }
            other => panic!("{name}: expected a fatal error, got {other:?}"),
        }
    }
    gw.shutdown().await;
    db.cleanup().await;
}

/// A token that expires during the session ends it with `token_expired` (202) and close code
/// 4202: the session does not outlive its token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ends_when_its_token_expires() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut config = db.config();
    config.auth.leeway_secs = 0;
    let gw = Gateway::start(config).await.unwrap();
    let short = Authenticator::new(SECRET.as_bytes())
        .mint("alice", 1)
        .unwrap();
    let (mut c, _) = Connection::connect(&ws_url(&gw), "term-1", &short)
        .await
        .unwrap();
    let end = Instant::now() + DEADLINE;
    loop {
        match c
            .recv_timeout(end.saturating_duration_since(Instant::now()))
            .await
        {
            Ok(Frame::Error(e)) => {
                assert_eq!(e.code, ErrorCode::TokenExpired.code(), "{e:?}");
                assert!(e.fatal);
                break;
            }
            Ok(_) => {}
            Err(e) => panic!("expected token_expired, got {e:?}"),
        }
    }
    match c.recv_timeout(DEADLINE).await {
        Err(syncgate_client::ConnError::Closed(Some(code))) => assert_eq!(code, 4202),
        other => panic!("expected close 4202, got {other:?}"),
    }
    gw.shutdown().await;
    db.cleanup().await;
}

/// With the node's push budget no larger than one frame, two writers that pipeline large
/// batches are slowed (a push waits for the budget before its connection reads on) but nothing
/// deadlocks and everything applies exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_push_budget_slows_writers_and_loses_nothing() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut config = db.config();
    let frame = config.limits.max_frame_bytes as usize;
    config.node_inflight_push_bytes = frame;
    config.max_inflight_push_bytes = frame;
    let gw = Gateway::start(config).await.unwrap();
    let text = "y".repeat(60 * 1024);
    let writer = |w: usize| {
        let url = ws_url(&gw);
        let text = text.clone();
        async move {
            let (mut c, _) = Connection::connect(&url, &format!("big-{w}"), &token("tester"))
                .await
                .unwrap();
            // 12 batches of 5 documents of 60 KB (~300 KB each), all sent before any ack.
            let batches: Vec<(u64, Vec<Mutation>)> = (0..12u64)
                .map(|b| {
                    let m = (0..5u64)
                        .map(|i| {
                            let n = b * 5 + i + 1;
                            let doc = body(&[("text", Value::from(text.as_str()))]);
                            put(n, "stock", &format!("w{w}-{n}"), doc)
                        })
                        .collect();
                    (b + 1, m)
                })
                .collect();
            let answers = push_pipelined(&mut c, &batches).await;
            let mut applied = 0;
            for (b, answer) in answers {
                match answer {
                    Answer::Ack(a) => {
                        assert!(
                            a.results
                                .iter()
                                .all(|r| r.status == MutationStatus::Applied),
                            "batch {b}: {a:?}"
                        );
                        applied += a.results.len();
                    }
                    Answer::Refused(e) => panic!("batch {b} refused: {e:?}"),
                }
            }
            applied
        }
    };
    let (a, b) = tokio::join!(writer(1), writer(2));
    assert_eq!((a, b), (60, 60));
    assert_eq!(
        gw.store.head().await.unwrap(),
        120,
        "each mutation applied once"
    );
    assert_eq!(server_docs(&gw, "stock").await.len(), 120);
    gw.shutdown().await;
    db.cleanup().await;
}

/// New installations that say `hello` at the same moment are claimed in groups: every one of
/// 200 concurrent new client ids is owned by its user, and of two users racing for one id
/// exactly one gets it (the other 203) — also across the group boundary.
async fn concurrent_new_client_ids_are_claimed_once_each(backend: Backend) {
    let db = TestDb::new(backend).await;
    let gw = Gateway::start(db.config()).await.unwrap();
    let url = ws_url(&gw);
    let hello = |client_id: String, user: &'static str| {
        let url = url.clone();
        async move {
            connect_code(&url, &client_id, &token(user))
                .await
                .map(|(_, w)| w.last_applied_mutation)
        }
    };
    let mut all = Vec::new();
    for i in 0..200 {
        all.push(hello(format!("new-{i}"), "alice"));
        if i % 20 == 0 {
            all.push(hello(format!("contested-{i}"), "alice"));
            all.push(hello(format!("contested-{i}"), "bob"));
        }
    }
    let results = futures_util::future::join_all(all).await;
    let owned = results.iter().filter(|r| r.is_ok()).count();
    let taken = results
        .iter()
        .filter(|r| **r == Err(ErrorCode::ClientIdTaken.code()))
        .count();
    assert_eq!((owned, taken, results.len()), (210, 10, 220), "{results:?}");
    // Each contested id belongs to exactly one of the two, who keeps it.
    for i in (0..200).step_by(20) {
        let id = format!("contested-{i}");
        let a = hello(id.clone(), "alice").await.is_ok();
        let b = hello(id, "bob").await.is_ok();
        assert!(a != b, "contested-{i}: alice {a}, bob {b}");
    }
    gw.shutdown().await;
    db.cleanup().await;
}

/// One user cannot fill the database: beyond `max_documents_per_user`, a create is rejected
/// with 409 (edits go on), a delete frees room, the count survives a restart, and other
/// users are not affected.
async fn a_user_holds_at_most_max_documents(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut config = db.config();
    config.max_documents_per_user = 3;
    let gw = Gateway::start(config.clone()).await.unwrap();
    let (mut m, _) = Connection::connect(&ws_url(&gw), "m-1", &token("mallory"))
        .await
        .unwrap();
    let doc = |n: i64| body(&[("n", Value::from(n))]);
    let ack = push(
        &mut m,
        1,
        (1..=4)
            .map(|i| put(i, "stock", &format!("s{i}"), doc(i as i64)))
            .chain([patch(5, "stock", "s1", doc(9))])
            .collect(),
    )
    .await;
    let codes: Vec<_> = ack.results.iter().map(|r| r.code).collect();
    let over = Some(ErrorCode::QuotaExceeded.code());
    assert_eq!(codes, [None, None, None, over, None]);
    let ack = push(
        &mut m,
        2,
        vec![delete(6, "stock", "s2"), put(7, "stock", "s4", doc(4))],
    )
    .await;
    assert!(ack.results.iter().all(|r| r.code.is_none()), "{ack:?}");
    drop(m);
    gw.shutdown().await;
    let gw = Gateway::start(config).await.unwrap();
    let (mut m, _) = Connection::connect(&ws_url(&gw), "m-1", &token("mallory"))
        .await
        .unwrap();
    let ack = push(&mut m, 3, vec![put(8, "stock", "s5", doc(5))]).await;
    assert_eq!(ack.results[0].code, over, "the count survived the restart");
    let (mut a, _) = Connection::connect(&ws_url(&gw), "a-1", &token("alice"))
        .await
        .unwrap();
    let ack = push(&mut a, 1, vec![put(1, "stock", "a1", doc(1))]).await;
    assert_eq!(ack.results[0].code, None);
    gw.shutdown().await;
    db.cleanup().await;
}

/// Beyond `max_sync_errors_per_user`, rejections are still answered with their codes but no
/// longer stored: a replay of the batch gets the stored outcomes for the first ones and 400
/// (never seen) for the rest.
async fn rejections_beyond_the_quota_are_answered_not_stored(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut config = db.config();
    config.max_sync_errors_per_user = 2;
    let gw = Gateway::start(config).await.unwrap();
    let (mut m, _) = Connection::connect(&ws_url(&gw), "m-1", &token("mallory"))
        .await
        .unwrap();
    let bad = |i: u64| {
        patch(
            i,
            "stock",
            &format!("missing-{i}"),
            body(&[("qty", Value::from(1))]),
        )
    };
    let batch = vec![bad(1), bad(2), bad(3)];
    let ack = push(&mut m, 1, batch.clone()).await;
    let codes: Vec<_> = ack.results.iter().map(|r| r.code).collect();
    let missing = Some(ErrorCode::DocumentNotFound.code());
    assert_eq!(codes, [missing, missing, missing]);
    let replay = push(&mut m, 2, batch).await;
    let codes: Vec<_> = replay.results.iter().map(|r| r.code).collect();
    assert_eq!(
        codes,
        [missing, missing, Some(ErrorCode::InvalidMutation.code())],
        "the third was not stored"
    );
    gw.shutdown().await;
    db.cleanup().await;
}

/// One user cannot fill the client table: beyond `max_client_ids_per_user`, a new client id
/// is refused (205); the user's existing installations and other users are not affected.
async fn a_user_owns_at_most_max_client_ids(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut config = db.config();
    config.max_client_ids_per_user = 3;
    let gw = Gateway::start(config).await.unwrap();
    let url = ws_url(&gw);
    for i in 0..3 {
        Connection::connect(&url, &format!("m-{i}"), &token("mallory"))
            .await
            .unwrap();
    }
    let mut fourth = syncgate_client::Connection::open(&url).await.unwrap();
    fourth
        .send(&hello_as("m-3", token("mallory")))
        .await
        .unwrap();
    expect_fatal(&mut fourth, ErrorCode::ClientQuotaExceeded).await;
    let (_again, welcome) = Connection::connect(&url, "m-1", &token("mallory"))
        .await
        .unwrap();
    assert_eq!(
        welcome.last_applied_mutation, 0,
        "an existing installation still connects"
    );
    Connection::connect(&url, "a-0", &token("alice"))
        .await
        .unwrap();
    gw.shutdown().await;
    db.cleanup().await;
}

/// One user cannot take every connection slot: beyond `max_connections_per_user` sessions its
/// handshakes get 204 (retryable), other users are not affected, and a slot comes back when a
/// session ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_holds_at_most_max_connections_per_user() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut config = db.config();
    config.max_connections_per_user = 2;
    let gw = Gateway::start(config).await.unwrap();
    let url = ws_url(&gw);
    let (first, _) = Connection::connect(&url, "m-1", &token("mallory"))
        .await
        .unwrap();
    let (_second, _) = Connection::connect(&url, "m-2", &token("mallory"))
        .await
        .unwrap();
    let mut third = syncgate_client::Connection::open(&url).await.unwrap();
    third
        .send(&hello_as("m-3", token("mallory")))
        .await
        .unwrap();
    expect_fatal(&mut third, ErrorCode::TooManyConnections).await;
    // Another user is not affected.
    let (_alice, _) = Connection::connect(&url, "a-1", &token("alice"))
        .await
        .unwrap();
    // When a session ends its slot comes back.
    first.close().await;
    let end = Instant::now() + DEADLINE;
    loop {
        match Connection::connect(&url, "m-3", &token("mallory")).await {
            Ok(_) => break,
            Err(syncgate_client::ConnError::Server(e))
                if e.code == ErrorCode::TooManyConnections.code() && Instant::now() < end =>
            {
                // The server has not seen the close yet: ask again.
                tokio::task::yield_now().await;
            }
            Err(e) => panic!("expected a session after a slot was freed: {e:?}"),
        }
    }
    gw.shutdown().await;
    db.cleanup().await;
}

/// A raw HTTP/1.0 GET: the status code and body.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

/// Polling `/readyz` hard costs the database one ping per second, not one per poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_polls_share_one_database_ping_per_second() {
    let db = TestDb::new(Backend::Sqlite).await;
    let gw = Gateway::start(db.config()).await.unwrap();
    let started = Instant::now();
    for _ in 0..300 {
        assert_eq!(http_get(gw.http_addr, "/readyz").await.0, 200);
    }
    let checks = gw.metrics.readiness_checks.get();
    let allowed = started.elapsed().as_secs() + 2;
    assert!(checks <= allowed, "{checks} pings for 300 polls");
    gw.shutdown().await;
    db.cleanup().await;
}

/// Silent HTTP sockets cannot hold the gateway: beyond the cap they are closed at once, the
/// others after the idle time, and WebSocket clients connect all along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_http_sockets_are_closed_and_websockets_still_connect() {
    use tokio::io::AsyncReadExt;
    let db = TestDb::new(Backend::Sqlite).await;
    let gw = Gateway::start(db.config()).await.unwrap();
    let mut silent = tokio::task::JoinSet::new();
    for _ in 0..300 {
        let mut s = tokio::net::TcpStream::connect(gw.http_addr).await.unwrap();
        silent.spawn(async move {
            let mut buf = [0u8; 16];
            while s.read(&mut buf).await.is_ok_and(|n| n > 0) {}
        });
    }
    // The WebSocket listener is not affected.
    let (_c, _) = connect(&gw, "while-flooded").await;
    let end = Instant::now() + DEADLINE;
    while !silent.is_empty() {
        tokio::time::timeout(
            end.saturating_duration_since(Instant::now()),
            silent.join_next(),
        )
        .await
        .expect("every silent HTTP socket is closed");
    }
    assert_eq!(http_get(gw.http_addr, "/healthz").await.0, 200);
    gw.shutdown().await;
    db.cleanup().await;
}

/// Opens a WebSocket by hand (the upgrade request written byte by byte), for frames no client
/// library would send.
/// Admission (`max_concurrent_handshakes`): while the node's handshakes are all in progress,
/// a new connection that gets no turn within `handshake_queue_ms` is sent away with `goaway`
/// (a retry hint of 0.1–1 s) and close 1013; once a handshake ends, connections are taken
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_handshakes_in_progress_are_sent_away_with_a_hint() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let db = TestDb::new(Backend::Sqlite).await;
    let mut cfg = db.config();
    cfg.max_concurrent_handshakes = 1;
    cfg.handshake_queue_ms = 200;
    let gw = Gateway::start(cfg).await.unwrap();
    // Upgraded, no hello yet: it holds the node's one handshake turn.
    let pending = raw_websocket(gw.ws_addr).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url(&gw)).await.unwrap();
    match ws.next().await.unwrap().unwrap() {
        Message::Binary(b) => match syncgate_protocol::codec::decode(&b).unwrap() {
            Frame::GoAway(g) => {
                assert!((100..=1_000).contains(&g.retry_after_ms), "{g:?}");
            }
            other => panic!("expected goaway, got {other:?}"),
        },
        other => panic!("expected goaway, got {other:?}"),
    }
    match ws.next().await.unwrap().unwrap() {
        Message::Close(Some(c)) => assert_eq!(u16::from(c.code), 1013),
        other => panic!("expected close 1013, got {other:?}"),
    }
    assert_eq!(gw.metrics.admission_refused.get(), 1);
    // It waited its `handshake_queue_ms` for a turn first.
    assert_eq!(gw.metrics.admission_wait.get_sample_count(), 1);
    assert!(gw.metrics.admission_wait.get_sample_sum() >= 0.2);
    assert_eq!(gw.metrics.admission_waiting.get(), 0);
    // The pending one completes its handshake: the turn is free for the next client.
    drop(pending);
    let end = Instant::now() + DEADLINE;
    loop {
        match syncgate_client::Connection::connect(&ws_url(&gw), "after", &token("t")).await {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < end, "never admitted again: {e}"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // An established session holds no turn: another client gets in beside it.
    let (_a, _) = connect(&gw, "a").await;
    let (_b, _) = connect(&gw, "b").await;
    gw.shutdown().await;
    db.cleanup().await;
}

/// Admission with a queue: a connection that finds every handshake turn taken waits for one
/// (its upgrade is answered then) instead of being sent away, and gets in as soon as a turn is
/// given back; connections waiting are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_waits_for_a_handshake_turn_before_it_is_sent_away() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut cfg = db.config();
    cfg.max_concurrent_handshakes = 1;
    cfg.handshake_queue_ms = 60_000;
    let gw = Gateway::start(cfg).await.unwrap();
    // Upgraded, no hello yet: it holds the node's one handshake turn.
    let pending = raw_websocket(gw.ws_addr).await;
    let url = ws_url(&gw);
    let queued = tokio::spawn(async move {
        syncgate_client::Connection::connect(&url, "queued", &token("t")).await
    });
    let end = Instant::now() + DEADLINE;
    while gw.metrics.admission_waiting.get() != 1 {
        assert!(
            Instant::now() < end,
            "the second connection never waited for a turn"
        );
        tokio::task::yield_now().await;
    }
    assert!(!queued.is_finished());
    // The pending connection goes: its turn passes to the waiting one, which gets in.
    drop(pending);
    let (_conn, welcome) = tokio::time::timeout(DEADLINE, queued)
        .await
        .expect("the waiting connection got no turn")
        .unwrap()
        .expect("admitted after waiting");
    assert!(!welcome.session.is_empty());
    assert_eq!(gw.metrics.admission_refused.get(), 0);
    assert_eq!(gw.metrics.admission_waiting.get(), 0);
    assert_eq!(gw.metrics.admission_wait.get_sample_count(), 1);
    gw.shutdown().await;
    db.cleanup().await;
}

async fn raw_websocket(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"GET / HTTP/1.1\r\nHost: gateway\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(s.read_u8().await.unwrap());
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s
}

/// The close code of the first close frame the server sends (skipping other frames).
async fn close_code_of(s: &mut tokio::net::TcpStream) -> u16 {
    use tokio::io::AsyncReadExt;
    loop {
        let b0 = s.read_u8().await.unwrap();
        let mut len = u64::from(s.read_u8().await.unwrap() & 0x7f);
        if len == 126 {
            len = u64::from(s.read_u16().await.unwrap());
        } else if len == 127 {
            len = s.read_u64().await.unwrap();
        }
        let mut payload = vec![0u8; len as usize];
        s.read_exact(&mut payload).await.unwrap();
        if b0 & 0x0f == 0x8 {
            return u16::from_be_bytes([payload[0], payload[1]]);
        }
    }
}

/// Frames that break the WebSocket protocol are closed with the codes RFC 6455 names (1002
/// protocol error, 1007 invalid text), not with a normal closure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_protocol_violations_get_their_close_codes() {
    use tokio::io::AsyncWriteExt;
    let db = TestDb::new(Backend::Sqlite).await;
    let gw = Gateway::start(db.config()).await.unwrap();
    let mask = [1u8, 2, 3, 4];
    let masked = |b0: u8, payload: &[u8]| {
        let mut f = vec![b0, 0x80 | payload.len() as u8];
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    };
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "a reserved bit set",
            masked(0x80 | 0x40 | 0x2, &[0x90]),
            1002,
        ),
        ("a reserved opcode", masked(0x80 | 0x3, &[]), 1002),
        ("an unmasked client frame", vec![0x82, 0x01, 0x90], 1002),
        (
            "text that is not UTF-8",
            masked(0x80 | 0x1, &[0xc3, 0x28]),
            1007,
        ),
    ];
    for (name, frame, code) in cases {
        let mut s = raw_websocket(gw.ws_addr).await;
        s.write_all(&frame).await.unwrap();
        let got = tokio::time::timeout(DEADLINE, close_code_of(&mut s))
            .await
            .unwrap_or_else(|_| panic!("{name}: no close frame"));
        assert_eq!(got, code, "{name}");
    }
    gw.shutdown().await;
    db.cleanup().await;
}

/// With `allowed_origins` set, a browser page from another origin cannot open a WebSocket
/// (HTTP 403); an allowed origin and clients that send no `Origin` can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_from_other_origins_are_refused() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let db = TestDb::new(Backend::Sqlite).await;
    let mut config = db.config();
    config.allowed_origins = vec!["https://erp.example.com".into()];
    let gw = Gateway::start(config).await.unwrap();
    let with_origin = |origin: &str| {
        let mut r = ws_url(&gw).into_client_request().unwrap();
        r.headers_mut().insert("origin", origin.parse().unwrap());
        r
    };
    match tokio_tungstenite::connect_async(with_origin("https://evil.example.net")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 403),
        other => panic!("expected 403, got {:?}", other.map(|_| ())),
    }
    assert!(
        tokio_tungstenite::connect_async(with_origin("https://erp.example.com"))
            .await
            .is_ok()
    );
    let (_c, _) = connect(&gw, "native").await;
    gw.shutdown().await;
    db.cleanup().await;
}

/// A connection that floods frames is refused frame by frame (506) and closed when it keeps
/// going; pushes are not counted, and another client goes on undisturbed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_connection_is_throttled_then_closed() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut config = db.config();
    config.max_frames_per_second = 50;
    let gw = Gateway::start(config).await.unwrap();
    let (mut flood, _) = connect(&gw, "flood").await;
    for nonce in 0..1000 {
        if flood.send(&Frame::Ping(Ping { nonce })).await.is_err() {
            break;
        }
    }
    let (mut calm, _) = connect(&gw, "calm").await;
    // Pushes are not counted: 60 batches in a row on a 50-frames-a-second gateway all apply.
    for b in 1..=60u64 {
        let ack = push(
            &mut calm,
            b,
            vec![put(b, "machines", &format!("m{b}"), body(&[]))],
        )
        .await;
        assert_eq!(ack.results[0].status, MutationStatus::Applied);
    }
    let mut refused = 0;
    let end = Instant::now() + DEADLINE;
    loop {
        match flood
            .recv_timeout(end.saturating_duration_since(Instant::now()))
            .await
        {
            Ok(Frame::Error(e)) => {
                assert_eq!(e.code, ErrorCode::RateLimited.code(), "{e:?}");
                refused += 1;
                if e.fatal {
                    break;
                }
            }
            Ok(_) => {}
            Err(e) => panic!("expected a fatal rate_limited, got {e:?}"),
        }
    }
    assert!(refused >= 100, "{refused} refusals before the close");
    match flood.recv_timeout(DEADLINE).await {
        Err(syncgate_client::ConnError::Closed(Some(code))) => assert_eq!(code, 4506),
        other => panic!("expected close 4506, got {other:?}"),
    }
    assert!(gw.metrics.rate_limited.get() >= 100);
    gw.shutdown().await;
    db.cleanup().await;
}

/// Per-collection roles: a user whose token lacks a collection's read role cannot subscribe to
/// it (305, and no byte of its documents reaches them); one without its write role gets every
/// mutation to it rejected (407, stored like any rejection) while other collections work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collection_roles_guard_reads_and_writes() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut config = db.config();
    let orders = config.collections.get_mut("work_orders").unwrap();
    orders.read_roles = vec!["operator".into(), "planner".into()];
    orders.write_roles = vec!["planner".into()];
    let gw = Gateway::start(config).await.unwrap();
    let url = ws_url(&gw);
    let with_roles = |user: &str, roles: serde_json::Value| {
        token_with(user, serde_json::json!({ "roles": roles }))
    };
    let secret_text = "ORDER-FOR-PLANT-B-0042";
    let (mut planner, _) = Connection::connect(
        &url,
        "planner-1",
        &with_roles("pat", serde_json::json!("planner")),
    )
    .await
    .unwrap();
    let ack = push(
        &mut planner,
        1,
        vec![put(
            1,
            "work_orders",
            "wo-1",
            body(&[("title", Value::from(secret_text))]),
        )],
    )
    .await;
    assert_eq!(ack.results[0].status, MutationStatus::Applied);
    // An operator reads work orders, may not write them, and writes machines.
    let (mut op, _) = Connection::connect(
        &url,
        "op-1",
        &with_roles("olga", serde_json::json!(["operator"])),
    )
    .await
    .unwrap();
    let ack = push(
        &mut op,
        1,
        vec![
            put(1, "work_orders", "wo-2", body(&[])),
            put(2, "machines", "m-1", body(&[])),
        ],
    )
    .await;
    assert_eq!(ack.results[0].code, Some(ErrorCode::WriteForbidden.code()));
    assert_eq!(ack.results[1].status, MutationStatus::Applied);
    op.send(&Frame::Subscribe(Subscribe {
        sub: 1,
        collection: "work_orders".into(),
        filter: Body::new(),
        cursor: None,
    }))
    .await
    .unwrap();
    let mut seen = Vec::new();
    loop {
        match op.recv_timeout(DEADLINE).await.unwrap() {
            Frame::Snapshot(s) => seen.extend(s.docs.into_iter().map(|d| d.id)),
            Frame::Synced(_) => break,
            Frame::Error(e) => panic!("the operator may read work orders: {e:?}"),
            _ => {}
        }
    }
    assert_eq!(seen, vec!["wo-1".to_owned()]);
    // A guest (no roles) is refused the subscription and receives nothing of it.
    let mut guest = syncgate_client::Connection::open(&url).await.unwrap();
    guest
        .send(&hello_as("guest-1", token("guest")))
        .await
        .unwrap();
    guest
        .send(&Frame::Subscribe(Subscribe {
            sub: 1,
            collection: "work_orders".into(),
            filter: Body::new(),
            cursor: None,
        }))
        .await
        .unwrap();
    guest.send(&Frame::Ping(Ping { nonce: 7 })).await.unwrap();
    let mut refused = false;
    loop {
        let raw = guest.recv_raw(DEADLINE).await.unwrap();
        assert!(
            !raw.windows(secret_text.len())
                .any(|w| w == secret_text.as_bytes()),
            "a byte of the forbidden collection reached the guest"
        );
        match syncgate_protocol::codec::decode(&raw).unwrap() {
            Frame::Error(e) => {
                assert_eq!((e.code, e.sub), (ErrorCode::ReadForbidden.code(), Some(1)));
                refused = true;
            }
            Frame::Pong(p) if p.nonce == 7 => break,
            _ => {}
        }
    }
    assert!(refused);
    gw.shutdown().await;
    db.cleanup().await;
}

/// `unsubscribe` is answered with `unsubscribed`, after every frame of the subscription and
/// before anything else of it: a catch-up still running when the client unsubscribes queues
/// nothing behind it, so the client can reuse the id at once. Twenty subscriptions of a
/// many-page snapshot are cut off mid-way, each followed by a ping whose pong must come with no
/// frame of the old subscription before it; the id's last subscription gets every document once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsubscribed_subscription_sends_nothing_after_its_unsubscribed() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut cfg = db.config();
    cfg.limits.max_frame_bytes = 16 * 1024;
    cfg.limits.max_document_bytes = 4 * 1024;
    cfg.outbound_buffer_bytes = 64 * 1024;
    cfg.max_subscribes_per_second = 0;
    let gw = Gateway::start(cfg).await.unwrap();
    let (mut w, _) = connect(&gw, "w").await;
    const DOCS: u64 = 3_000;
    let pad = Value::from("y".repeat(300));
    for b in 0..DOCS / 40 {
        let ms = (0..40)
            .map(|i| {
                let n = b * 40 + i;
                put(
                    n + 1,
                    "stock",
                    &format!("s{n}"),
                    body(&[("pad", pad.clone())]),
                )
            })
            .collect();
        push(&mut w, b, ms).await;
    }
    let (mut c, _) = connect(&gw, "churn").await;
    let subscribe = Frame::Subscribe(Subscribe {
        sub: 5,
        collection: "stock".into(),
        filter: Body::new(),
        cursor: None,
    });
    let frame_sub = |f: &Frame| match f {
        Frame::Snapshot(s) => Some(s.sub),
        Frame::Changes(ch) => Some(ch.sub),
        Frame::Synced(s) => Some(s.sub),
        Frame::Resync(r) => Some(r.sub),
        Frame::Error(e) => e.sub,
        _ => None,
    };
    for round in 0..20u64 {
        c.send(&subscribe).await.unwrap();
        // Read a few pages of it first in some rounds, none in others.
        for _ in 0..round % 3 {
            let f = c.recv_timeout(DEADLINE).await.unwrap();
            assert_eq!(frame_sub(&f), Some(5), "{f:?}");
        }
        c.send(&Frame::Unsubscribe(Unsubscribe { sub: 5 }))
            .await
            .unwrap();
        loop {
            match c.recv_timeout(DEADLINE).await.unwrap() {
                Frame::Unsubscribed(u) => {
                    assert_eq!(u.sub, 5);
                    break;
                }
                f => assert_eq!(frame_sub(&f), Some(5), "{f:?}"),
            }
        }
        c.send(&Frame::Ping(Ping { nonce: round })).await.unwrap();
        match c.recv_timeout(DEADLINE).await.unwrap() {
            Frame::Pong(p) => assert_eq!(p.nonce, round),
            f => panic!("round {round}: {f:?} after unsubscribed"),
        }
    }
    // The id once more, read to the end: every document once.
    c.send(&subscribe).await.unwrap();
    let mut seen = std::collections::BTreeSet::new();
    loop {
        match c.recv_timeout(DEADLINE).await.unwrap() {
            Frame::Snapshot(s) => {
                for d in s.docs {
                    assert!(seen.insert(d.id.clone()), "{} twice", d.id);
                }
            }
            Frame::Synced(_) => break,
            f => panic!("{f:?}"),
        }
    }
    assert_eq!(seen.len() as u64, DOCS);
    gw.shutdown().await;
    db.cleanup().await;
}
