//! `Client::fetch`: a `never` collection is read by id into the local replica (and `get`
//! finds it offline afterwards), with local edits kept on top; a refusal carries its code.

use super::*;

/// A gateway (on `database`, else SQLite in `dir`) that also declares `manuals`, a collection
/// with mode `never`.
async fn with_manuals(dir: &Path, database: Option<&str>) -> Gateway {
    let mut config = gateway_config(dir);
    if let Some(url) = database {
        config.database = url.to_owned();
    }
    config.collections.insert(
        "manuals".into(),
        syncgate_gateway::config::CollectionConfig {
            mode: syncgate_gateway::config::SyncMode::Never,
            ..Default::default()
        },
    );
    Gateway::start(config).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_reads_named_documents_into_the_replica() {
    let gw_dir = tempfile::tempdir().unwrap();
    let gw = with_manuals(gw_dir.path(), None).await;
    let url = format!("ws://{}", gw.ws_addr);
    // An author writes two manuals (acknowledged once its sync is done).
    let author_dir = tempfile::tempdir().unwrap();
    let author = builder(&url, author_dir.path()).open().await.unwrap();
    for (id, title) in [("m-1", "Press"), ("m-2", "Lathe")] {
        author
            .put("manuals", id, body(&[("title", Value::from(title))]))
            .await
            .unwrap();
    }
    // One large enough that its bytes stand out from the session's heartbeats (hex: it
    // compresses only about 2x).
    let big: String = (0..10_000)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    author
        .put(
            "manuals",
            "m-big",
            body(&[("text", Value::from(big.as_str()))]),
        )
        .await
        .unwrap();
    author.sync_now(DEADLINE).await.unwrap();
    author.close().await;

    let dir = tempfile::tempdir().unwrap();
    let client = builder(&url, dir.path()).open().await.unwrap();
    assert!(client.get("manuals", "m-1").await.unwrap().is_none());
    let fetched = client
        .fetch("manuals", &["m-1", "m-404"], DEADLINE)
        .await
        .unwrap();
    assert_eq!(fetched.docs.len(), 1);
    assert_eq!(fetched.docs[0].body["title"], Value::from("Press"));
    assert_eq!(fetched.missing, ["m-404"]);
    // The fetch's own connection counts into the client's traffic.
    let before = client.status().await.unwrap().received_bytes;
    let fetched = client.fetch("manuals", &["m-big"], DEADLINE).await.unwrap();
    assert_eq!(fetched.docs[0].body["text"], Value::from(big.as_str()));
    let after = client.status().await.unwrap().received_bytes;
    assert!(after >= before + 8_000, "{before} -> {after}");
    // A local edit not yet uploaded stays on top of a later fetch.
    client
        .patch("manuals", "m-1", body(&[("note", Value::from("mine"))]))
        .await
        .unwrap();
    let _ = client.fetch("manuals", &["m-1"], DEADLINE).await.unwrap();
    let doc = client.get("manuals", "m-1").await.unwrap().unwrap();
    assert_eq!(doc.body["title"], Value::from("Press"));
    assert_eq!(doc.body["note"], Value::from("mine"));
    // An upload-only collection cannot be fetched: the server's code comes back.
    match client.fetch("feedback", &["f-1"], DEADLINE).await {
        Err(syncgate_client::ClientError::Invalid { code, .. }) => {
            assert_eq!(code, syncgate_protocol::ErrorCode::NotDownloadable)
        }
        other => panic!("{other:?}"),
    }
    client.close().await;
    // Offline afterwards, the fetched document is still there.
    gw.shutdown().await;
    let local = builder(&url, dir.path()).open_local().await.unwrap();
    assert!(local.get("manuals", "m-1").await.unwrap().is_some());
    local.close().await;
}

/// An `upload_only` collection (the default's `feedback`): the write reaches the server once,
/// and the client forgets its copy once the write is acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_only_write_is_forgotten_once_acknowledged() {
    let gw_dir = tempfile::tempdir().unwrap();
    let gw = start_gateway(gw_dir.path()).await;
    let url = format!("ws://{}", gw.ws_addr);
    let dir = tempfile::tempdir().unwrap();
    let client = builder(&url, dir.path()).open().await.unwrap();
    // Before any sync the write is readable locally (pending).
    client
        .put("feedback", "f-1", body(&[("stars", Value::from(5))]))
        .await
        .unwrap();
    assert!(client.get("feedback", "f-1").await.unwrap().is_some());
    client.sync_now(DEADLINE).await.unwrap();
    assert!(
        client.get("feedback", "f-1").await.unwrap().is_none(),
        "the local copy is forgotten"
    );
    assert!(client.outbox().await.unwrap().is_empty());
    let stored = gw.store.document("feedback", "f-1").await.unwrap().unwrap();
    assert_eq!(stored.body.unwrap()["stars"], Value::from(5));
    assert_eq!(stored.version, 1, "applied once");
    client.close().await;
    gw.shutdown().await;
}

/// Sync modes between two SDK clients, on SQLite and on PostgreSQL: an author writes
/// `upload_only` feedback (which it forgets once acknowledged and nobody can read back) and
/// manuals of a `never` collection; a reader that fetches one manual holds that one only.
async fn modes_between_two_clients(database: Option<String>) {
    let gw_dir = tempfile::tempdir().unwrap();
    let gw = with_manuals(gw_dir.path(), database.as_deref()).await;
    let url = format!("ws://{}", gw.ws_addr);
    let author_dir = tempfile::tempdir().unwrap();
    let author = builder(&url, author_dir.path()).open().await.unwrap();
    author
        .put("feedback", "f-1", body(&[("stars", Value::from(4))]))
        .await
        .unwrap();
    for id in ["m-1", "m-2"] {
        author
            .put("manuals", id, body(&[("title", Value::from(id))]))
            .await
            .unwrap();
    }
    author.sync_now(DEADLINE).await.unwrap();
    assert!(author.get("feedback", "f-1").await.unwrap().is_none());
    let reader_dir = tempfile::tempdir().unwrap();
    let reader = builder(&url, reader_dir.path())
        .subscribe("manuals", Body::new())
        .open()
        .await
        .unwrap();
    // Subscribing to a `never` collection is refused; the rest of the session goes on.
    let fetched = reader.fetch("manuals", &["m-1"], DEADLINE).await.unwrap();
    assert_eq!(fetched.docs.len(), 1);
    reader.sync_now(DEADLINE).await.unwrap();
    assert!(reader.get("manuals", "m-1").await.unwrap().is_some());
    assert!(
        reader.get("manuals", "m-2").await.unwrap().is_none(),
        "only the fetched id"
    );
    assert!(matches!(
        reader.fetch("feedback", &["f-1"], DEADLINE).await,
        Err(syncgate_client::ClientError::Invalid {
            code: syncgate_protocol::ErrorCode::NotDownloadable,
            ..
        })
    ));
    assert!(reader.get("feedback", "f-1").await.unwrap().is_none());
    let stored = gw.store.document("feedback", "f-1").await.unwrap().unwrap();
    assert_eq!(stored.body.unwrap()["stars"], Value::from(4));
    reader.close().await;
    author.close().await;
    gw.shutdown().await;
    if let Some(url) = database {
        drop_database(&url).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modes_between_two_clients_on_sqlite() {
    modes_between_two_clients(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modes_between_two_clients_on_postgres() {
    if let Some(url) = postgres_database().await {
        modes_between_two_clients(Some(url)).await;
    }
}
