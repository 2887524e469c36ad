//! Pacing: a connection over its push or subscription rate is slowed, never refused, and what
//! it sends is applied exactly once. (How much this protects other clients is a benchmark:
//! `syncgate-loadtest fairness`, BENCHMARKS.md.)

use std::time::Duration;

use super::*;

/// Pushes `batches` pipelined batches of `per_batch` documents (each `pad` bytes) and checks
/// that every mutation applied exactly once; returns how long until the last ack.
async fn pipelined_writer(gw: &Gateway, batches: u64, per_batch: u64, pad: usize) -> Duration {
    let (mut c, _) = connect(gw, "paced").await;
    let text = "p".repeat(pad);
    let pushed: Vec<(u64, Vec<Mutation>)> = (0..batches)
        .map(|b| {
            let m = (0..per_batch)
                .map(|i| {
                    let n = b * per_batch + i + 1;
                    let doc = body(&[("text", Value::from(text.as_str()))]);
                    put(n, "stock", &format!("p{n}"), doc)
                })
                .collect();
            (b + 1, m)
        })
        .collect();
    let started = Instant::now();
    let answers = push_pipelined(&mut c, &pushed).await;
    let took = started.elapsed();
    for (b, answer) in answers {
        match answer {
            Answer::Ack(a) => assert!(
                a.results
                    .iter()
                    .all(|r| r.status == MutationStatus::Applied),
                "batch {b}: {a:?}"
            ),
            Answer::Refused(e) => panic!("batch {b} refused: {e:?}"),
        }
    }
    let total = batches * per_batch;
    assert_eq!(gw.store.head().await.unwrap(), total, "each applied once");
    assert_eq!(server_docs(gw, "stock").await.len() as u64, total);
    took
}

/// 6,000 mutations at 2,000 a second (a burst of 2,000): the connection is paused (not
/// refused) until it is back under the rate, so the last ack cannot come before ~2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_over_its_mutation_rate_is_slowed_and_loses_nothing() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut config = db.config();
    config.max_push_mutations_per_second = 2000;
    let gw = Gateway::start(config).await.unwrap();
    let took = pipelined_writer(&gw, 12, 500, 0).await;
    let paced = gw.metrics.paced.with_label_values(&["push"]).get();
    assert!(paced >= 1, "{paced} pauses");
    // Before the last batch is read, 5,500 mutations were taken: 3,500 beyond the burst.
    assert!(took >= Duration::from_millis(1700), "{took:?}");
    gw.shutdown().await;
    db.cleanup().await;
}

/// The same for bytes: 8 frames of ~40 KB at 64 KiB a second (a burst of one 64 KiB frame).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_over_its_byte_rate_is_slowed_and_loses_nothing() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut config = db.config();
    config.limits.max_frame_bytes = 64 * 1024;
    config.limits.max_document_bytes = 32 * 1024;
    config.max_push_bytes_per_second = 64 * 1024;
    let gw = Gateway::start(config).await.unwrap();
    let took = pipelined_writer(&gw, 8, 2, 20 * 1024).await;
    assert!(gw.metrics.paced.with_label_values(&["push"]).get() >= 1);
    // Before the last frame is read, ~7 × 40 KB were taken: ~216 KB beyond the burst.
    assert!(took >= Duration::from_millis(2500), "{took:?}");
    gw.shutdown().await;
    db.cleanup().await;
}

/// Subscriptions beyond `max_subscribes_per_second` are accepted and wait for their turn
/// before reading anything: 50 subscribe/unsubscribe pairs beyond the burst cost the database
/// no snapshot page, and a subscription within the rate syncs as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_churn_beyond_the_rate_reads_nothing() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut config = db.config();
    config.max_subscribes_per_second = 1;
    config.limits.max_subscriptions = 2;
    let gw = Gateway::start(config).await.unwrap();
    let (mut w, _) = connect(&gw, "writer").await;
    push(&mut w, 1, vec![put(1, "stock", "s1", body(&[]))]).await;
    let (mut c, _) = connect(&gw, "churner").await;
    // The burst: two subscriptions sync at once.
    for sub in 1..=2 {
        assert_eq!(synced_docs(&mut c, sub).await, 1);
        c.send(&Frame::Unsubscribe(Unsubscribe { sub }))
            .await
            .unwrap();
    }
    let pages = gw.metrics.snapshot_pages.get();
    for sub in 3..=52 {
        c.send(&Frame::Subscribe(Subscribe {
            sub,
            collection: "stock".into(),
            filter: Body::new(),
            cursor: None,
        }))
        .await
        .unwrap();
        c.send(&Frame::Unsubscribe(Unsubscribe { sub }))
            .await
            .unwrap();
    }
    // A ping answered after the 100 frames: the gateway has handled them all.
    c.send(&Frame::Ping(Ping { nonce: 7 })).await.unwrap();
    let end = Instant::now() + DEADLINE;
    loop {
        match c
            .recv_timeout(end.saturating_duration_since(Instant::now()))
            .await
            .unwrap()
        {
            Frame::Pong(p) if p.nonce == 7 => break,
            Frame::Error(e) => panic!("{e:?}"),
            Frame::Snapshot(s) => panic!("subscription {} read a snapshot", s.sub),
            _ => {}
        }
    }
    assert_eq!(gw.metrics.paced.with_label_values(&["subscribe"]).get(), 50);
    assert_eq!(gw.metrics.snapshot_pages.get(), pages, "no page was read");
    // Another connection has its own rate.
    let (mut d, _) = connect(&gw, "other").await;
    assert_eq!(synced_docs(&mut d, 1).await, 1);
    gw.shutdown().await;
    db.cleanup().await;
}

/// Subscribes to all of `stock` as `sub` and counts the snapshot's documents until `synced`.
async fn synced_docs(c: &mut Connection, sub: u32) -> usize {
    c.send(&Frame::Subscribe(Subscribe {
        sub,
        collection: "stock".into(),
        filter: Body::new(),
        cursor: None,
    }))
    .await
    .unwrap();
    let end = Instant::now() + DEADLINE;
    let mut docs = 0;
    loop {
        match c
            .recv_timeout(end.saturating_duration_since(Instant::now()))
            .await
            .unwrap()
        {
            Frame::Snapshot(s) if s.sub == sub => docs += s.docs.len(),
            Frame::Synced(s) if s.sub == sub => return docs,
            Frame::Error(e) => panic!("{e:?}"),
            _ => {}
        }
    }
}
