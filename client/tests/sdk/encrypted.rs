//! The encrypted local store: nothing of the documents, the offline edits or the filters is
//! readable in the data directory; a wrong or missing key is a clear error; offline edits
//! survive a restart encrypted and then arrive once.

use syncgate_client::EncryptionKey;
use syncgate_client::store::StoreError;

use super::*;

/// Text that must never be readable on the terminal's disk.
const SECRETS: [&str; 3] = ["SERVER-SECRET", "OFFLINE-SECRET", "PLANT-SECRET"];

fn plant() -> Body {
    body(&[("plant", Value::from("PLANT-SECRET-7"))])
}

/// Every byte of every file of the data directory (database, WAL, shared memory).
fn disk_bytes(dir: &Path) -> Vec<u8> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            all.extend(std::fs::read(&path).unwrap());
        }
    }
    all
}

fn readable(bytes: &[u8]) -> Vec<&'static str> {
    SECRETS
        .into_iter()
        .filter(|s| bytes.windows(s.len()).any(|w| w == s.as_bytes()))
        .collect()
}

async fn open_error(url: &str, dir: &Path, key: Option<EncryptionKey>) -> StoreError {
    let mut b = builder(url, dir).replace_subscriptions(vec![(COLL.into(), plant())]);
    if let Some(k) = key {
        b = b.encryption_key(k);
    }
    match b.open_local().await {
        Ok(_) => panic!("opened"),
        Err(syncgate_client::ClientError::Store(e)) => e,
        Err(other) => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_store_keeps_nothing_readable_and_opens_only_with_its_key() {
    let gw_dir = tempfile::tempdir().unwrap();
    let (gw, proxy) = proxied_gateway(gw_dir.path()).await;
    let url = format!("ws://{}", gw.ws_addr);
    // The server holds documents of the terminal's plant.
    let writer_dir = tempfile::tempdir().unwrap();
    let writer = builder(&url, writer_dir.path()).open().await.unwrap();
    for i in 0..20 {
        let mut b = plant();
        b.insert("note".into(), Value::from(format!("SERVER-SECRET-{i}")));
        writer.put(COLL, &format!("wo-{i}"), b).await.unwrap();
    }
    writer.sync_now(DEADLINE).await.unwrap();
    writer.close().await;

    let key = EncryptionKey::generate();
    let dir = tempfile::tempdir().unwrap();
    let open = |key: EncryptionKey| {
        builder(&proxy.url(), dir.path())
            .replace_subscriptions(vec![(COLL.into(), plant())])
            .encryption_key(key)
    };
    let client = open(key.clone()).open().await.unwrap();
    client.sync_now(DEADLINE).await.unwrap();
    assert_eq!(client.query(COLL, &Body::new()).await.unwrap().len(), 20);
    client.close().await;
    // Offline (the store opened without connecting): edits wait in the outbox.
    let client = open(key.clone()).open_local().await.unwrap();
    for i in 0..5 {
        let mut b = plant();
        b.insert("note".into(), Value::from(format!("OFFLINE-SECRET-{i}")));
        client.put(COLL, &format!("new-{i}"), b).await.unwrap();
    }
    client
        .patch(
            COLL,
            "wo-3",
            body(&[("done", Value::from("OFFLINE-SECRET-patch"))]),
        )
        .await
        .unwrap();
    assert_eq!(client.outbox().await.unwrap().len(), 6);
    client.close().await;
    assert_eq!(readable(&disk_bytes(dir.path())), Vec::<&str>::new());

    // The wrong key, no key: clear errors, nothing opened, nothing changed.
    let url_p = proxy.url();
    assert!(matches!(
        open_error(&url_p, dir.path(), Some(EncryptionKey::generate())).await,
        StoreError::WrongKey
    ));
    assert!(matches!(
        open_error(&url_p, dir.path(), None).await,
        StoreError::KeyRequired
    ));

    // The right key after a restart: the offline edits are there and arrive once.
    let client = open(key).open().await.unwrap();
    assert_eq!(client.outbox().await.unwrap().len(), 6);
    assert_eq!(
        client.get(COLL, "wo-3").await.unwrap().unwrap().body["done"],
        Value::from("OFFLINE-SECRET-patch")
    );
    client.sync_now(DEADLINE).await.unwrap();
    assert!(client.outbox().await.unwrap().is_empty());
    client.close().await;
    assert_eq!(readable(&disk_bytes(dir.path())), Vec::<&str>::new());
    let check_dir = tempfile::tempdir().unwrap();
    let check = builder(&url, check_dir.path()).open().await.unwrap();
    check.sync_now(DEADLINE).await.unwrap();
    let docs = replica(&check).await;
    assert_eq!(docs.len(), 25);
    assert_eq!(docs["new-4"].0["note"], Value::from("OFFLINE-SECRET-4"));
    // 20 server documents (seq 1..=20), then the six offline edits once each, in order.
    assert_eq!(
        (docs["new-0"].1, docs["new-4"].1, docs["wo-3"].1),
        (21, 25, 26)
    );
    check.close().await;

    // A plain store that holds data is never opened with a key (no mixing); the plain store
    // really is readable, which is what the key protects against.
    assert!(!readable(&disk_bytes(check_dir.path())).is_empty());
    assert!(matches!(
        open_error(&url, check_dir.path(), Some(EncryptionKey::generate())).await,
        StoreError::NotEncrypted
    ));
    gw.shutdown().await;
}
