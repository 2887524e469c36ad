//! The SDK offers frame compression by default: its uploads and the snapshot it downloads
//! cross the wire deflated, and the replica is the same as with compression turned off.

use super::*;

const DOCS: usize = 1_000;

fn work_order(i: usize) -> Body {
    body(&[
        ("number", Value::from(format!("WO-{i:06}"))),
        ("status", Value::from(["open", "released", "done"][i % 3])),
        (
            "article",
            Value::from(format!("ART-{:05}", 10_000 + i % 300)),
        ),
        (
            "note",
            Value::from("check tooling before start; report scrap per shift"),
        ),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_syncs_compressed_and_converges_like_without() {
    let gw_dir = tempfile::tempdir().unwrap();
    let gw = start_gateway(gw_dir.path()).await;
    let url = format!("ws://{}", gw.ws_addr);
    let m = &gw.metrics;

    let writer_dir = tempfile::tempdir().unwrap();
    let writer = builder(&url, writer_dir.path()).open().await.unwrap();
    for i in 0..DOCS {
        writer
            .put(COLL, &format!("wo-{i}"), work_order(i))
            .await
            .unwrap();
    }
    let (bytes_in, compressed_before) = (m.bytes_in.get(), m.frames_compressed.get());
    writer.sync_now(DEADLINE).await.unwrap();
    let uploaded = m.bytes_in.get() - bytes_in;
    let expected = replica(&writer).await;
    assert_eq!(expected.len(), DOCS);

    // Each reader downloads the whole collection as its snapshot.
    let mut wire = Vec::new();
    for compression in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let before = m.bytes_out.get();
        let reader = builder(&url, dir.path())
            .compression(compression)
            .open()
            .await
            .unwrap();
        reader.sync_now(DEADLINE).await.unwrap();
        assert_eq!(
            replica(&reader).await,
            expected,
            "compression {compression}"
        );
        reader.close().await;
        wire.push(m.bytes_out.get() - before);
    }
    let (packed, plain) = (wire[0], wire[1]);
    assert!(
        packed * 3 < plain,
        "snapshot: {packed} bytes compressed, {plain} without"
    );
    assert!(m.frames_compressed.get() > compressed_before);
    // The uploads went deflated too: well under the size of the same pushes uncompressed.
    let mutations = (0..DOCS)
        .map(|i| syncgate_protocol::Mutation {
            mutation_id: i as u64 + 1,
            collection: COLL.into(),
            id: format!("wo-{i}"),
            op: syncgate_protocol::MutationOp::Put,
            body: Some(work_order(i)),
            base_version: Some(0),
            resolves: None,
        })
        .collect();
    let raw = syncgate_protocol::encode(&Frame::Push(syncgate_protocol::Push {
        batch: 1,
        mutations,
    }))
    .len();
    assert!(
        (uploaded as usize) * 2 < raw,
        "uploaded {uploaded} bytes for pushes of {raw}"
    );
    writer.close().await;
    gw.shutdown().await;
}
