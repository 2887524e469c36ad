//! Row scopes, adversarially: a terminal of plant A tries every way to see or touch plant B's
//! documents — a filter naming B, resuming from a cursor across B's changes (from the hub's
//! memory and, after a restart, from the log), an undeclared and a forbidden collection,
//! writing B's documents, creating one in B, moving its own from A to B — and every byte it
//! receives is checked for B's data.

use super::*;

/// Text that only plant B's documents carry.
const B_SECRET: &str = "SECRET-OF-PLANT-B";
/// Ids of plant B's documents (never mentioned to plant A outside its own push acks).
const B_ID: &str = "bbb-";

fn order(plant: &str, text: &str) -> Body {
    body(&[("plant", Value::from(plant)), ("text", Value::from(text))])
}

/// Plant A's terminal: a raw connection that keeps every byte it is sent.
struct Spy {
    conn: Connection,
    received: Vec<Vec<u8>>,
}

impl Spy {
    async fn connect(gw: &Gateway) -> Spy {
        let mut conn = Connection::open(&ws_url(gw)).await.unwrap();
        conn.send(&hello_as(
            "term-a",
            token_with("alice", serde_json::json!({"plant": "A"})),
        ))
        .await
        .unwrap();
        let mut spy = Spy {
            conn,
            received: Vec::new(),
        };
        spy.until(|f| matches!(f, Frame::Welcome(_))).await;
        spy
    }

    /// Reads frames (keeping them) until one satisfies `pred`; returns every frame read.
    async fn until(&mut self, pred: impl Fn(&Frame) -> bool) -> Vec<Frame> {
        let mut frames = Vec::new();
        loop {
            let raw = self.conn.recv_raw(DEADLINE).await.unwrap();
            let frame = syncgate_protocol::codec::decode(&raw).unwrap();
            self.received.push(raw);
            let done = pred(&frame);
            frames.push(frame);
            if done {
                return frames;
            }
        }
    }

    async fn subscribe(
        &mut self,
        sub: u32,
        collection: &str,
        filter: Body,
        cursor: Option<Cursor>,
    ) {
        self.conn
            .send(&Frame::Subscribe(Subscribe {
                sub,
                collection: collection.into(),
                filter,
                cursor,
            }))
            .await
            .unwrap();
    }

    /// Document ids (and ops) the subscription `sub` received until it reached `seq`.
    async fn changes_until(&mut self, sub: u32, seq: u64) -> Vec<(String, ChangeOp)> {
        let frames = self
            .until(|f| matches!(f, Frame::Changes(c) if c.sub == sub && c.cursor.seq >= seq))
            .await;
        frames
            .into_iter()
            .filter_map(|f| match f {
                Frame::Changes(c) if c.sub == sub => Some(c.changes),
                _ => None,
            })
            .flatten()
            .map(|c| (c.id, c.op))
            .collect()
    }

    /// Snapshot ids of `sub` up to its `synced`, and the cursor.
    async fn snapshot(&mut self, sub: u32) -> (Vec<String>, Cursor) {
        let frames = self
            .until(|f| matches!(f, Frame::Synced(s) if s.sub == sub))
            .await;
        let mut ids = Vec::new();
        let mut cursor = None;
        for f in frames {
            match f {
                Frame::Snapshot(s) if s.sub == sub => ids.extend(s.docs.into_iter().map(|d| d.id)),
                Frame::Changes(c) if c.sub == sub => {
                    ids.extend(c.changes.into_iter().map(|c| c.id))
                }
                Frame::Synced(s) => cursor = Some(s.cursor),
                Frame::Error(e) => panic!("unexpected error {e:?}"),
                _ => {}
            }
        }
        (ids, cursor.unwrap())
    }

    async fn push(&mut self, batch: u64, mutations: Vec<Mutation>) -> PushAck {
        self.conn
            .send(&Frame::Push(Push { batch, mutations }))
            .await
            .unwrap();
        let frames = self
            .until(|f| matches!(f, Frame::PushAck(a) if a.batch == batch))
            .await;
        match frames.into_iter().last() {
            Some(Frame::PushAck(a)) => a,
            other => panic!("{other:?}"),
        }
    }

    /// No frame ever carried B's text; none but A's own push acks and fetch answers (ids she
    /// named herself, answered as missing) named a B id.
    fn assert_nothing_of_b_leaked(&self) {
        for raw in &self.received {
            let has = |needle: &str| raw.windows(needle.len()).any(|w| w == needle.as_bytes());
            assert!(!has(B_SECRET), "B's data reached plant A: {raw:?}");
            let frame = syncgate_protocol::codec::decode(raw).unwrap();
            if !matches!(frame, Frame::PushAck(_) | Frame::Fetched(_)) {
                assert!(!has(B_ID), "a B id reached plant A: {frame:?}");
            }
        }
    }
}

pub(crate) async fn a_plant_scoped_terminal_sees_and_writes_only_its_plant(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut config = db.config();
    let orders = config.collections.get_mut("work_orders").unwrap();
    orders.scope = [("plant".to_owned(), "claims.plant".to_owned())].into();
    config.collections.get_mut("machines").unwrap().read_roles = vec!["maintenance".into()];
    let gw = Gateway::start(config.clone()).await.unwrap();
    // The central planner's token reaches both plants.
    let (mut central, _) = Connection::connect(
        &ws_url(&gw),
        "central",
        &token_with("planner", serde_json::json!({"plant": ["A", "B"]})),
    )
    .await
    .unwrap();
    let secret = |n: u32| format!("{B_SECRET}-{n}");
    let ack = push(
        &mut central,
        1,
        vec![
            put(1, "work_orders", "aaa-1", order("A", "a one")),
            put(2, "work_orders", "aaa-2", order("A", "a two")),
            put(
                3,
                "work_orders",
                &format!("{B_ID}1"),
                order("B", &secret(1)),
            ),
            put(
                4,
                "work_orders",
                &format!("{B_ID}2"),
                order("B", &secret(2)),
            ),
        ],
    )
    .await;
    assert!(
        ack.results
            .iter()
            .all(|r| r.status == MutationStatus::Applied)
    );

    let mut alice = Spy::connect(&gw).await;
    // The snapshot holds A's documents only; a filter naming B finds nothing.
    alice.subscribe(1, "work_orders", Body::new(), None).await;
    let (ids, before_b) = alice.snapshot(1).await;
    assert_eq!(ids, ["aaa-1", "aaa-2"]);
    alice
        .subscribe(2, "work_orders", body(&[("plant", Value::from("B"))]), None)
        .await;
    assert_eq!(alice.snapshot(2).await.0, Vec::<String>::new());
    // A forbidden and an undeclared collection are refused.
    alice.subscribe(3, "machines", Body::new(), None).await;
    alice
        .subscribe(4, "plant_b_orders", Body::new(), None)
        .await;
    let errors = alice
        .until(|f| matches!(f, Frame::Error(e) if e.sub == Some(4)))
        .await;
    let codes: Vec<_> = errors
        .iter()
        .filter_map(|f| match f {
            Frame::Error(e) => Some((e.sub, e.code)),
            _ => None,
        })
        .collect();
    assert_eq!(
        codes,
        [
            (Some(3), ErrorCode::ReadForbidden.code()),
            (Some(4), ErrorCode::UnknownCollection.code())
        ]
    );

    // Live: B's new and changed documents never arrive; A's do; a document moved from A to B
    // arrives as a delete (A saw it, and sees it leave), without its new body.
    let ack = push(
        &mut central,
        2,
        vec![
            put(
                5,
                "work_orders",
                &format!("{B_ID}3"),
                order("B", &secret(3)),
            ),
            patch(
                6,
                "work_orders",
                &format!("{B_ID}1"),
                body(&[("text", Value::from(secret(4)))]),
            ),
            patch(7, "work_orders", "aaa-2", order("B", &secret(5))),
            put(8, "work_orders", "aaa-3", order("A", "a three")),
        ],
    )
    .await;
    assert!(
        ack.results
            .iter()
            .all(|r| r.status == MutationStatus::Applied)
    );
    let live = alice.changes_until(1, ack.visible_at).await;
    assert_eq!(
        live,
        [
            ("aaa-2".to_owned(), ChangeOp::Delete),
            ("aaa-3".to_owned(), ChangeOp::Upsert)
        ]
    );

    // Writes: B's documents, a new document in B, and moving A's own document to B are
    // refused with out_of_scope; an edit inside A applies.
    let ack = alice
        .push(
            1,
            vec![
                put(
                    1,
                    "work_orders",
                    &format!("{B_ID}1"),
                    order("A", "mine now"),
                ),
                patch(
                    2,
                    "work_orders",
                    &format!("{B_ID}2"),
                    body(&[("text", Value::from("x"))]),
                ),
                delete(3, "work_orders", &format!("{B_ID}3")),
                put(
                    4,
                    "work_orders",
                    &format!("{B_ID}9"),
                    order("B", "planted in B"),
                ),
                patch(
                    5,
                    "work_orders",
                    "aaa-1",
                    body(&[("plant", Value::from("B"))]),
                ),
                put(6, "work_orders", "aaa-1", order("B", "moved")),
                put(
                    7,
                    "work_orders",
                    "aaa-9",
                    body(&[("text", Value::from("no plant"))]),
                ),
                patch(
                    8,
                    "work_orders",
                    "aaa-1",
                    body(&[("text", Value::from("edited in A"))]),
                ),
            ],
        )
        .await;
    let codes: Vec<_> = ack.results.iter().map(|r| r.code).collect();
    let oos = Some(ErrorCode::OutOfScope.code());
    assert_eq!(codes, [oos, oos, oos, oos, oos, oos, oos, None]);
    for r in &ack.results {
        assert!(!r.reason.as_deref().unwrap_or("").contains(B_SECRET));
    }
    let docs = server_docs(&gw, "work_orders").await;
    assert_eq!(
        docs[&format!("{B_ID}1")].0,
        order("B", &secret(4)),
        "B's document is B's"
    );
    assert!(docs.contains_key(&format!("{B_ID}3")));
    assert!(!docs.contains_key(&format!("{B_ID}9")));
    assert_eq!(docs["aaa-1"].0["plant"], Value::from("A"));

    // Resuming from before B's changes, from the hub's memory: A's changes only.
    alice
        .subscribe(5, "work_orders", Body::new(), Some(before_b.clone()))
        .await;
    let head = ack.visible_at;
    let resumed = alice.changes_until(5, head).await;
    assert_eq!(
        resumed,
        [
            ("aaa-2".to_owned(), ChangeOp::Delete),
            ("aaa-3".to_owned(), ChangeOp::Upsert),
            ("aaa-1".to_owned(), ChangeOp::Upsert)
        ]
    );
    // Fetching B's ids by name: every one is "missing", like an id never written.
    let wanted: Vec<String> = ["aaa-1", "bbb-1", "bbb-2", "bbb-3", "bbb-9", "aaa-3"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    alice
        .conn
        .send(&Frame::Fetch(Fetch {
            req: 1,
            collection: "work_orders".into(),
            ids: wanted,
        }))
        .await
        .unwrap();
    let frames = alice
        .until(|f| matches!(f, Frame::Fetched(a) if a.done))
        .await;
    let (mut got, mut missing) = (Vec::new(), Vec::new());
    for f in frames {
        if let Frame::Fetched(a) = f {
            got.extend(a.docs.into_iter().map(|d| d.id));
            missing.extend(a.missing);
        }
    }
    assert_eq!(got, ["aaa-1", "aaa-3"]);
    assert_eq!(missing.len(), 4, "{missing:?}");
    alice.assert_nothing_of_b_leaked();
    central.close().await;
    drop(alice);
    gw.shutdown().await;

    // After a restart the hub holds nothing: the same resumes read the log.
    let gw = Gateway::start(config).await.unwrap();
    let mut alice = Spy::connect(&gw).await;
    alice
        .subscribe(1, "work_orders", Body::new(), Some(before_b.clone()))
        .await;
    assert_eq!(alice.changes_until(1, head).await, resumed);
    let from_start = Cursor {
        epoch: before_b.epoch.clone(),
        seq: 0,
    };
    alice
        .subscribe(
            2,
            "work_orders",
            body(&[("plant", Value::from("B"))]),
            Some(from_start.clone()),
        )
        .await;
    alice
        .subscribe(3, "work_orders", Body::new(), Some(from_start))
        .await;
    let (ids, _) = alice.snapshot(3).await;
    assert_eq!(ids, ["aaa-1", "aaa-2", "aaa-2", "aaa-3", "aaa-1"]);
    alice.assert_nothing_of_b_leaked();
    assert!(
        alice.received.iter().all(|raw| !matches!(
            syncgate_protocol::codec::decode(raw),
            Ok(Frame::Changes(c)) if c.sub == 2 && !c.changes.is_empty()
        )),
        "the filter on B found nothing"
    );
    // A token without the plant claim reaches nothing of the scoped collection.
    let mut stranger = Connection::open(&ws_url(&gw)).await.unwrap();
    stranger
        .send(&hello_as(
            "term-x",
            token_with("xavier", serde_json::json!({})),
        ))
        .await
        .unwrap();
    assert!(matches!(
        stranger.recv_timeout(DEADLINE).await,
        Ok(Frame::Welcome(_))
    ));
    stranger
        .send(&Frame::Subscribe(Subscribe {
            sub: 1,
            collection: "work_orders".into(),
            filter: Body::new(),
            cursor: None,
        }))
        .await
        .unwrap();
    match stranger.recv_timeout(DEADLINE).await {
        Ok(Frame::Error(e)) => {
            assert_eq!((e.code, e.sub), (ErrorCode::ReadForbidden.code(), Some(1)));
            assert!(e.message.contains("claims.plant"), "{e:?}");
        }
        other => panic!("{other:?}"),
    }
    gw.shutdown().await;
    db.cleanup().await;
}
