//! A hostile-input run over real connections: 100,000 random and mutated frames from several
//! connections while a well-behaved writer pushes and a subscriber checks exactly-once. The
//! gateway runs on its own runtime, whose threads are counted by a panic hook: not one of
//! them may panic. Every frame the protocol cannot decode must be answered with an error (or
//! the connection closed); the honest writer's every mutation arrives once, in order.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;

/// Panics on threads of the gateway's runtime (named [`GATEWAY_THREADS`]).
static GATEWAY_PANICS: AtomicUsize = AtomicUsize::new(0);
const GATEWAY_THREADS: &str = "fuzzed-gateway";

const FRAMES: usize = 100_000;
const FUZZERS: usize = 4;
/// Barrier pings carry nonces from here up, which mutated pings are unlikely to hit.
const BARRIER: u64 = 1 << 63;

fn count_gateway_panics() {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().name() == Some(GATEWAY_THREADS) {
                GATEWAY_PANICS.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        }));
    });
}

/// A valid frame of any kind a client sends, with random contents.
fn valid(rng: &mut rand::rngs::StdRng) -> Vec<u8> {
    let collection = ["work_orders", "stock", "nope", ""][rng.random_range(0..4)];
    let frame = match rng.random_range(0..5) {
        0 => Frame::Push(Push {
            batch: rng.random_range(0..1000),
            mutations: (0..rng.random_range(0..4))
                .map(|i| Mutation {
                    mutation_id: rng.random_range(0..100) + i,
                    collection: collection.into(),
                    id: format!("f{}", rng.random_range(0..50)),
                    op: [MutationOp::Put, MutationOp::Patch, MutationOp::Delete]
                        [rng.random_range(0..3)],
                    body: rng
                        .random_bool(0.8)
                        .then(|| body(&[("v", Value::from(rng.random::<i32>()))])),
                    base_version: None,
                    resolves: None,
                })
                .collect(),
        }),
        1 => Frame::Subscribe(Subscribe {
            sub: rng.random_range(0..100),
            collection: collection.into(),
            filter: Body::new(),
            cursor: rng.random_bool(0.5).then(|| Cursor {
                epoch: "x".into(),
                seq: rng.random(),
            }),
        }),
        2 => Frame::Unsubscribe(Unsubscribe {
            sub: rng.random_range(0..100),
        }),
        3 => Frame::Ping(Ping {
            nonce: rng.random_range(0..1000),
        }),
        _ => Frame::Hello(Hello {
            versions: vec![1],
            client_id: "fuzz".into(),
            token: "x".into(),
            agent: String::new(),
            compression: vec![],
        }),
    };
    encode(&frame)
}

/// A hostile frame: invalid by construction, or a valid one with bytes flipped, inserted,
/// removed or cut off (which may or may not still decode).
fn hostile(rng: &mut rand::rngs::StdRng) -> Vec<u8> {
    if rng.random_bool(0.4) {
        return malformed(rng);
    }
    let mut b = valid(rng);
    for _ in 0..rng.random_range(1..5) {
        if b.is_empty() {
            b.push(rng.random());
            continue;
        }
        let at = rng.random_range(0..b.len());
        match rng.random_range(0..4) {
            0 => b[at] = rng.random(),
            1 => b[at] ^= 1 << rng.random_range(0..8),
            2 => b.insert(at, rng.random()),
            _ => {
                b.truncate(at.max(1));
            }
        }
    }
    b
}

/// One fuzzing connection: sends `n` hostile frames, each followed by a barrier ping, and checks
/// that every frame the protocol cannot decode got an error before the barrier's pong, or that
/// the connection was closed. Reconnects after a close. Returns (errors, closes).
async fn fuzz(gw: &Gateway, worker: usize, n: usize) -> (usize, usize) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xf022 + worker as u64);
    let client_id = format!("fuzzer-{worker}");
    let (mut conn, _) = connect(gw, &client_id).await;
    let (mut errors, mut closes) = (0, 0);
    for i in 0..n {
        let frame = hostile(&mut rng);
        let undecodable = syncgate_protocol::codec::decode(&frame).is_err();
        let nonce = BARRIER + i as u64;
        let sent = conn.send_raw(frame).await.is_ok()
            && conn.send(&Frame::Ping(Ping { nonce })).await.is_ok();
        let mut answered = false;
        let mut closed = !sent;
        while !closed {
            match conn.recv_timeout(DEADLINE).await {
                Ok(Frame::Pong(p)) if p.nonce == nonce => break,
                Ok(Frame::Error(_)) => {
                    answered = true;
                    errors += 1;
                }
                Ok(_) => {}
                Err(syncgate_client::ConnError::Closed(_) | syncgate_client::ConnError::Ws(_)) => {
                    closed = true
                }
                Err(e) => panic!("fuzzer {worker}, frame {i}: {e:?}"),
            }
        }
        assert!(
            !undecodable || answered || closed,
            "fuzzer {worker}, frame {i}: an undecodable frame got neither an error nor a close"
        );
        if closed {
            closes += 1;
            conn = connect(gw, &client_id).await.0;
        }
    }
    (errors, closes)
}

#[test]
fn a_hundred_thousand_hostile_frames_break_nothing() {
    count_gateway_panics();
    let gateway_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(GATEWAY_THREADS)
        .enable_all()
        .build()
        .unwrap();
    let clients = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let db = clients.block_on(TestDb::new(Backend::Sqlite));
    let mut config = db.config();
    // The fuzzers are judged on every frame: no frame-rate refusals in the way.
    config.max_frames_per_second = 0;
    let gw = gateway_rt.block_on(Gateway::start(config)).unwrap();
    clients.block_on(async {
        let mut reader = Replica::subscribe(&gw, "reader", "stock", Body::new(), None).await;
        reader.until_seq(0).await;
        let honest = async {
            let (mut w, _) = connect(&gw, "honest").await;
            let mut acked = Vec::new();
            for b in 1..=100u64 {
                let ack = push(
                    &mut w,
                    b,
                    (1..=10)
                        .map(|i| {
                            let mid = (b - 1) * 10 + i;
                            put(
                                mid,
                                "stock",
                                &format!("h{mid}"),
                                body(&[("qty", Value::from(mid))]),
                            )
                        })
                        .collect(),
                )
                .await;
                for r in &ack.results {
                    assert_eq!(r.status, MutationStatus::Applied, "{r:?}");
                    acked.push((r.mutation_id, r.version.unwrap()));
                }
            }
            acked
        };
        let fuzzers =
            futures_util::future::join_all((0..FUZZERS).map(|w| fuzz(&gw, w, FRAMES / FUZZERS)));
        let (acked, results) = tokio::join!(honest, fuzzers);
        let errors: usize = results.iter().map(|r| r.0).sum();
        let closes: usize = results.iter().map(|r| r.1).sum();
        assert!(
            errors > FRAMES / 4,
            "{errors} errors for {FRAMES} hostile frames"
        );
        eprintln!("{FRAMES} hostile frames: {errors} errors, {closes} closes");
        let head = acked.iter().map(|a| a.1).max().unwrap();
        reader.until_seq_resuming(&gw, "reader", head).await;
        reader.assert_in_order_once();
        for (mid, version) in &acked {
            let (b, v) = &reader.docs[&format!("h{mid}")];
            assert_eq!((b["qty"].as_u64(), *v), (Some(*mid), *version));
        }
        let stored = server_docs(&gw, "stock").await;
        for (mid, version) in &acked {
            assert_eq!(stored[&format!("h{mid}")].1, *version);
        }
    });
    assert_eq!(
        GATEWAY_PANICS.load(Ordering::SeqCst),
        0,
        "the gateway panicked"
    );
    gateway_rt.block_on(gw.shutdown());
    clients.block_on(db.cleanup());
}
