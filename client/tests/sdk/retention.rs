//! Compaction past an offline client, on SQLite and on PostgreSQL: the client's cursor is
//! older than the collection's new horizon (a document it holds was deleted and the tombstone
//! purged), so on reconnect the gateway answers `resync` (`cursor_too_old`); the SDK downloads
//! the collection again, the purged document disappears, and the edit it made offline is
//! uploaded, not lost.

use super::*;
use syncgate_gateway::server::compact;

async fn compaction_past_an_offline_client(database: Option<String>) {
    let gw_dir = tempfile::tempdir().unwrap();
    let client_dir = tempfile::tempdir().unwrap();
    let writer_dir = tempfile::tempdir().unwrap();
    let mut config = gateway_config(gw_dir.path());
    if let Some(url) = &database {
        config.database = url.clone();
    }
    // Catch-ups read the database, and only `compact` below compacts.
    config.catch_up_cache_bytes = 0;
    config.compaction_interval_secs = 0;
    let orders = config.collections.get_mut(COLL).unwrap();
    orders.retain_secs = 0;
    orders.retain_changes = 2;
    let gw = Gateway::start(config.clone()).await.unwrap();
    let url = format!("ws://{}", gw.ws_addr);
    let proxy = Proxy::start().await;
    proxy.set_target(Some(gw.ws_addr));
    let terminal = builder(&proxy.url(), client_dir.path())
        .open()
        .await
        .unwrap();
    let mut events = terminal.events();
    for id in ["wo-1", "wo-2"] {
        terminal
            .put(COLL, id, body(&[("status", Value::from("open"))]))
            .await
            .unwrap();
    }
    terminal.sync_now(DEADLINE).await.unwrap();
    // The terminal goes offline; the ERP deletes one order, changes another and adds three.
    proxy.set_target(None);
    proxy.cut_all();
    let erp = builder(&url, writer_dir.path()).open().await.unwrap();
    erp.sync_now(DEADLINE).await.unwrap();
    erp.delete(COLL, "wo-1").await.unwrap();
    erp.patch(COLL, "wo-2", body(&[("status", Value::from("cancelled"))]))
        .await
        .unwrap();
    for id in ["wo-3", "wo-4", "wo-5"] {
        erp.put(COLL, id, body(&[("status", Value::from("open"))]))
            .await
            .unwrap();
    }
    erp.sync_now(DEADLINE).await.unwrap();
    erp.close().await;
    let reports = compact(&config, Some(COLL), false).await.unwrap();
    let report = reports.first().unwrap();
    // Seqs 1-2 the terminal's puts, 3 the delete, 4 the patch, 5-7 the puts: the newest two
    // stay whole, so the horizon is 5; wo-1's put and its tombstone are gone, and so is wo-2's
    // first version.
    assert_eq!(
        (report.horizon, report.superseded, report.tombstones),
        (5, 2, 1),
        "{report:?}"
    );
    terminal
        .put(COLL, "wo-6", body(&[("status", Value::from("open"))]))
        .await
        .unwrap();
    proxy.set_target(Some(gw.ws_addr));
    terminal.sync_now(DEADLINE).await.unwrap();
    wait_event(
        &mut events,
        "the resync",
        |e| matches!(e, Event::Resync { reason, .. } if reason == "cursor_too_old"),
    )
    .await;
    let mut server = Observer::open(&url, None).await;
    server.barrier().await;
    assert_eq!(
        server.docs.keys().collect::<Vec<_>>(),
        ["wo-2", "wo-3", "wo-4", "wo-5", "wo-6"],
        "the offline edit arrived"
    );
    until("the replica to match the server", &mut events, || async {
        replica(&terminal).await == server.docs
    })
    .await;
    assert_eq!(
        terminal.get(COLL, "wo-2").await.unwrap().unwrap().body["status"],
        Value::from("cancelled")
    );
    terminal.close().await;
    gw.shutdown().await;
    if let Some(url) = &database {
        drop_database(url).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_past_an_offline_client_on_sqlite() {
    compaction_past_an_offline_client(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_past_an_offline_client_on_postgres() {
    if let Some(url) = postgres_database().await {
        compaction_past_an_offline_client(Some(url)).await;
    }
}
