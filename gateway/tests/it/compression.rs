//! Negotiated frame compression (PROTOCOL.md §3.15) against a real gateway: a client that
//! offers `deflate` gets its snapshot in compressed frames that decode to exactly what a client
//! without compression gets, in several times fewer bytes; it may push compressed; a
//! decompression bomb is refused within the frame limit with a stable code and the session
//! goes on; a compressed frame on a connection that did not negotiate it is refused.

use std::time::Duration;

use syncgate_protocol::codec::decode_message;
use syncgate_protocol::compress::{Compression, compress, is_compressed};

use super::http_api::http;
use super::*;

const DOCS: usize = 2_000;

/// An ERP-like work order: repetitive field names and values, as real rows are.
fn work_order(i: usize) -> Body {
    body(&[
        ("number", format!("WO-{:06}", i).into()),
        (
            "status",
            ["open", "released", "in_progress", "done"][i % 4].into(),
        ),
        ("workcenter", format!("press-{:02}", i % 12).into()),
        ("article", format!("ART-{:05}", 10_000 + i % 300).into()),
        ("quantity", ((i % 50) as u64 * 10).into()),
        (
            "note",
            "check tooling before start; report scrap per shift".into(),
        ),
    ])
}

/// Subscribes to `work_orders` and reads the snapshot to `synced`: the documents and the
/// bytes and frames that crossed the wire, and how many of them were compressed.
async fn snapshot(conn: &mut Connection) -> (BTreeMap<String, Body>, usize, usize, usize) {
    conn.send(&Frame::Subscribe(Subscribe {
        sub: 1,
        collection: "work_orders".into(),
        filter: Body::new(),
        cursor: None,
    }))
    .await
    .unwrap();
    let limits = Limits::default();
    let (mut docs, mut bytes, mut frames, mut compressed) = (BTreeMap::new(), 0, 0, 0);
    loop {
        let raw = conn.recv_raw(DEADLINE).await.unwrap();
        bytes += raw.len();
        frames += 1;
        compressed += usize::from(is_compressed(&raw));
        if conn.compression().is_some() && !is_compressed(&raw) {
            // Only frames under compression_min_bytes (1 KiB) go as they are.
            assert!(
                raw.len() < 1024,
                "an uncompressed frame of {} bytes",
                raw.len()
            );
        }
        match decode_message(&raw, &limits, conn.compression()).unwrap() {
            Frame::Snapshot(s) => {
                for d in s.docs {
                    assert!(docs.insert(d.id, d.body).is_none(), "a document twice");
                }
            }
            Frame::Synced(_) => return (docs, bytes, frames, compressed),
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// The next frame that is not a live `changes` (the subscription goes on beside the test).
async fn next(conn: &mut Connection) -> Frame {
    loop {
        match conn.recv_timeout(DEADLINE).await.unwrap() {
            Frame::Changes(_) => continue,
            other => return other,
        }
    }
}

async fn error_code(conn: &mut Connection) -> u16 {
    match next(conn).await {
        Frame::Error(e) => e.code,
        other => panic!("expected an error, got {other:?}"),
    }
}

async fn still_serves(conn: &mut Connection) {
    conn.send(&Frame::Ping(Ping { nonce: 42 })).await.unwrap();
    match next(conn).await {
        Frame::Pong(p) => assert_eq!(p.nonce, 42),
        other => panic!("expected pong, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_offers_deflate_gets_compressed_frames_and_a_bomb_is_refused() {
    let db = TestDb::new(Backend::Sqlite).await;
    let gw = Gateway::start(db.config()).await.unwrap();
    let url = ws_url(&gw);
    let (mut writer, _) = connect(&gw, "writer").await;
    for (batch, chunk) in (0..DOCS).collect::<Vec<_>>().chunks(500).enumerate() {
        let mutations = chunk
            .iter()
            .map(|&i| {
                put(
                    i as u64 + 1,
                    "work_orders",
                    &format!("wo-{i}"),
                    work_order(i),
                )
            })
            .collect();
        let ack = push(&mut writer, batch as u64 + 1, mutations).await;
        assert!(
            ack.results
                .iter()
                .all(|r| r.status == MutationStatus::Applied)
        );
    }

    // Negotiated: the welcome names deflate, and the snapshot's large frames come deflated.
    let open = || async { Connection::open(&url).await.unwrap() };
    let (mut packed, welcome) = open()
        .await
        .offer_compression(true)
        .handshake("packed", &token("tester"))
        .await
        .unwrap();
    assert_eq!(welcome.compression.as_deref(), Some("deflate"));
    assert_eq!(packed.compression(), Some(Compression::Deflate));
    let (docs, packed_bytes, frames, compressed) = snapshot(&mut packed).await;
    assert_eq!(docs.len(), DOCS);
    assert!(compressed > 0, "{compressed} of {frames}");

    // Not offered: nothing compressed, and the same documents.
    let (mut plain, welcome) = open()
        .await
        .handshake("plain", &token("tester"))
        .await
        .unwrap();
    assert_eq!(welcome.compression, None);
    let (plain_docs, plain_bytes, _, none) = snapshot(&mut plain).await;
    assert_eq!(none, 0);
    assert_eq!(plain_docs, docs);
    assert!(
        packed_bytes * 3 < plain_bytes,
        "compressed {packed_bytes} bytes vs {plain_bytes}"
    );
    for (i, (id, b)) in docs.iter().enumerate().take(3) {
        assert_eq!(b, &work_order(id[3..].parse().unwrap()), "document {i}");
    }

    // The client may push compressed (the SDK's connection compresses frames >= 1 KiB).
    let big: Vec<Mutation> = (0..40)
        .map(|i| {
            put(
                i + 1,
                "work_orders",
                &format!("new-{i}"),
                work_order(i as usize),
            )
        })
        .collect();
    assert!(
        encode(&Frame::Push(Push {
            batch: 1,
            mutations: big.clone()
        }))
        .len()
            > 1024
    );
    let ack = push(&mut packed, 1, big).await;
    assert!(
        ack.results
            .iter()
            .all(|r| r.status == MutationStatus::Applied)
    );
    let server = server_docs(&gw, "work_orders").await;
    assert_eq!(server.len(), DOCS + 40);

    // A bomb that says how large it is: 4 MiB of zeros, refused on its declared size before
    // anything is inflated (frame_too_large), and the session goes on.
    let bomb = compress(&vec![0u8; 4 << 20], 9).unwrap();
    assert!(bomb.len() < 64 * 1024, "{}", bomb.len());
    packed.send_raw(bomb.clone()).await.unwrap();
    assert_eq!(
        error_code(&mut packed).await,
        ErrorCode::FrameTooLarge.code()
    );
    still_serves(&mut packed).await;
    // One that lies about its size (4 KiB declared): inflating stops at 4 KiB
    // (malformed_frame), and the session goes on.
    let mut liar = bomb.clone();
    assert_eq!(&liar[18..23], &[0xce, 0x00, 0x40, 0x00, 0x00], "size field");
    liar[18..23].copy_from_slice(&[0xce, 0x00, 0x00, 0x10, 0x00]);
    packed.send_raw(liar).await.unwrap();
    assert_eq!(
        error_code(&mut packed).await,
        ErrorCode::MalformedFrame.code()
    );
    still_serves(&mut packed).await;

    // Without negotiation a compressed frame is refused before it is inflated.
    plain
        .send_raw(compress(&vec![0x90; 2048], 9).unwrap())
        .await
        .unwrap();
    assert_eq!(
        error_code(&mut plain).await,
        ErrorCode::MalformedFrame.code()
    );
    still_serves(&mut plain).await;

    let value = |name: &'static str| {
        let gw = &gw;
        async move {
            let (_, _, metrics) = http(gw, "GET", "/metrics", &[], b"").await;
            String::from_utf8(metrics)
                .unwrap()
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("{name} missing"))
        }
    };
    assert!(value("syncgate_frames_compressed_total").await >= compressed as f64);
    assert!(value("syncgate_compression_saved_bytes_total").await > 0.0);
    // The 40 live changes went to both subscribers (one chunk each, or a few): each frame
    // counted from its publication to the socket, once written.
    let end = Instant::now() + DEADLINE;
    while value("syncgate_delivery_lag_seconds_count").await < 2.0 {
        assert!(Instant::now() < end, "no live delivery counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(packed);
    drop(plain);
    gw.shutdown().await;
    db.cleanup().await;
}
