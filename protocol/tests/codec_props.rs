//! Property tests: every message round-trips through the codec, and no byte sequence makes
//! the decoder panic.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    reason = "a test fails by panicking"
)]

use proptest::prelude::*;
use syncgate_protocol::*;

fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Nil),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1e12f64..1e12).prop_map(Value::from),
        "[a-z0-9 ]{0,12}".prop_map(Value::from),
        proptest::collection::vec(any::<u8>(), 0..8).prop_map(Value::Binary),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::vec(("[a-z]{1,4}".prop_map(Value::from), inner), 0..4)
                .prop_map(Value::Map),
        ]
    })
}

fn body() -> impl Strategy<Value = Body> {
    proptest::collection::btree_map("[a-z_]{1,8}", value(), 0..5)
}

fn cursor() -> impl Strategy<Value = Cursor> {
    ("[0-9a-f]{16}", any::<u64>()).prop_map(|(epoch, seq)| Cursor { epoch, seq })
}

fn change() -> impl Strategy<Value = Change> {
    (
        any::<u64>(),
        "[a-z_]{1,10}",
        "[a-zA-Z0-9-]{1,20}",
        proptest::option::of(body()),
    )
        .prop_map(|(seq, collection, id, body)| Change {
            seq,
            collection,
            id,
            op: if body.is_some() {
                ChangeOp::Upsert
            } else {
                ChangeOp::Delete
            },
            body,
        })
}

fn mutation() -> impl Strategy<Value = Mutation> {
    (
        any::<u64>(),
        "[a-z_]{1,10}",
        "[a-zA-Z0-9-]{1,20}",
        prop_oneof![
            Just(MutationOp::Put),
            Just(MutationOp::Patch),
            Just(MutationOp::Delete)
        ],
        proptest::option::of(body()),
        proptest::option::of(any::<u64>()),
    )
        .prop_map(
            |(mutation_id, collection, id, op, body, base_version)| Mutation {
                mutation_id,
                collection,
                id,
                op,
                body,
                base_version,
                resolves: None,
            },
        )
}

fn result() -> impl Strategy<Value = MutationResult> {
    prop_oneof![
        (any::<u64>(), any::<u64>()).prop_map(|(m, v)| MutationResult::applied(m, v)),
        (any::<u64>(), 0..ErrorCode::ALL.len(), ".{0,20}")
            .prop_map(|(m, c, r)| MutationResult::rejected(m, ErrorCode::ALL[c], r)),
    ]
}

fn limits() -> impl Strategy<Value = Limits> {
    (
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
    )
        .prop_map(|(a, b, c, d, e, f)| Limits {
            max_frame_bytes: a,
            max_mutations_per_batch: b,
            max_document_bytes: c,
            max_id_bytes: d,
            max_subscriptions: e,
            max_depth: f,
        })
}

fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (
            proptest::collection::vec(any::<u32>(), 0..4),
            ".{0,20}",
            ".{0,40}",
            ".{0,10}",
            proptest::collection::vec("[a-z]{1,8}", 0..3)
        )
            .prop_map(
                |(versions, client_id, token, agent, compression)| Frame::Hello(Hello {
                    versions,
                    client_id,
                    token,
                    agent,
                    compression
                })
            ),
        (
            any::<u32>(),
            ".{0,10}",
            "[0-9a-f]{16}",
            any::<u64>(),
            limits(),
            any::<u32>()
        )
            .prop_map(
                |(version, session, epoch, last_applied_mutation, limits, heartbeat_ms)| {
                    Frame::Welcome(Welcome {
                        version,
                        session,
                        epoch,
                        last_applied_mutation,
                        limits,
                        heartbeat_ms,
                        upload_only: Vec::new(),
                        token_valid_ms: None,
                        compression: None,
                    })
                }
            ),
        (
            any::<u32>(),
            "[a-z_]{1,10}",
            body(),
            proptest::option::of(cursor())
        )
            .prop_map(
                |(sub, collection, filter, cursor)| Frame::Subscribe(Subscribe {
                    sub,
                    collection,
                    filter,
                    cursor
                })
            ),
        any::<u32>().prop_map(|sub| Frame::Unsubscribe(Unsubscribe { sub })),
        any::<u32>().prop_map(|sub| Frame::Unsubscribed(Unsubscribed { sub })),
        (
            any::<u32>(),
            proptest::collection::vec(("[a-z0-9]{1,8}", body(), any::<u64>()), 0..4)
        )
            .prop_map(|(sub, docs)| Frame::Snapshot(Snapshot {
                sub,
                docs: docs
                    .into_iter()
                    .map(|(id, body, version)| Doc { id, body, version })
                    .collect(),
            })),
        (any::<u32>(), cursor()).prop_map(|(sub, cursor)| Frame::Synced(Synced { sub, cursor })),
        (
            any::<u32>(),
            proptest::collection::vec(change(), 0..4),
            cursor()
        )
            .prop_map(|(sub, changes, cursor)| Frame::Changes(Changes {
                sub,
                changes,
                cursor
            })),
        (any::<u64>(), proptest::collection::vec(mutation(), 0..4))
            .prop_map(|(batch, mutations)| Frame::Push(Push { batch, mutations })),
        (
            any::<u64>(),
            proptest::collection::vec(result(), 0..4),
            any::<u64>()
        )
            .prop_map(|(batch, results, visible_at)| Frame::PushAck(PushAck {
                batch,
                results,
                visible_at
            })),
        any::<u64>().prop_map(|nonce| Frame::Ping(Ping { nonce })),
        (any::<u64>(), proptest::option::of(any::<u64>()))
            .prop_map(|(nonce, head)| Frame::Pong(Pong { nonce, head })),
        (
            0..ErrorCode::ALL.len(),
            ".{0,30}",
            any::<bool>(),
            proptest::option::of(any::<u32>()),
            proptest::option::of(any::<u64>())
        )
            .prop_map(|(c, message, fatal, sub, batch)| {
                let mut e = ErrorFrame::new(ErrorCode::ALL[c], message, fatal);
                e.sub = sub;
                e.batch = batch;
                Frame::Error(e)
            }),
        (any::<u32>(), "[a-z_]{1,16}")
            .prop_map(|(sub, reason)| Frame::Resync(Resync { sub, reason })),
        (".{0,16}", any::<u32>()).prop_map(|(reason, retry_after_ms)| Frame::GoAway(GoAway {
            reason,
            retry_after_ms
        })),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_frame_round_trips(f in frame()) {
        let bytes = encode(&f);
        let back = decode_with_limits(&bytes, &Limits { max_frame_bytes: u32::MAX, ..Limits::default() })
            .expect("decodes");
        prop_assert_eq!(&back, &f);
        // Canonical: re-encoding gives the same bytes.
        prop_assert_eq!(encode(&back), bytes);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode(&bytes);
    }

    #[test]
    fn mutated_frames_never_panic(
        f in frame(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = encode(&f);
        for (i, b) in flips {
            let i = i.index(bytes.len());
            bytes[i] = b;
        }
        let _ = decode(&bytes);
        let cut = cut.index(bytes.len() + 1);
        let _ = decode(&bytes[..cut]);
    }
}

#[test]
fn version_negotiation() {
    assert_eq!(negotiate_version(&[1]), Some(1));
    assert_eq!(negotiate_version(&[1, 2, 7]), Some(1));
    assert_eq!(negotiate_version(&[2]), None);
    assert_eq!(negotiate_version(&[]), None);
}
