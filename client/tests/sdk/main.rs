//! The SDK against a real gateway (SQLite in a temporary directory, real WebSockets), with a
//! loopback proxy in between where the network has to misbehave. No sleeps: every wait is on
//! a condition with a deadline.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    reason = "a test fails by panicking"
)]

mod cli;
mod compression;
mod conflicts;
mod encrypted;
mod fetch;
mod proxy;
mod retention;
mod tls;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use proxy::{Chaos, Hold, Proxy};
use syncgate_client::{
    Backoff, Client, ClientBuilder, Connection, ConnectionState, Event, OutboxState,
};
use syncgate_gateway::auth::{Authenticator, Claims};
use syncgate_gateway::config::AuthConfig;
use syncgate_gateway::{Config, Gateway};
use syncgate_protocol::{Body, ChangeOp, Cursor, Frame, Ping, Subscribe, Value};
use tokio::sync::broadcast;

const SECRET: &str = "sdk-test-secret";
const DEADLINE: Duration = Duration::from_secs(60);
const COLL: &str = "work_orders";

/// A test gateway's configuration: ports 0, `dir`, the test secret.
fn gateway_config(dir: &Path) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.to_owned(),
        auth: AuthConfig {
            jwt_secret: SECRET.into(),
            ..Default::default()
        },
        shutdown_grace_ms: 500,
        ..Config::default()
    }
}

async fn start_gateway(dir: &Path) -> Gateway {
    Gateway::start(gateway_config(dir))
        .await
        .expect("gateway starts")
}

/// A gateway, and a fault proxy in front of it.
async fn proxied_gateway(dir: &Path) -> (Gateway, Proxy) {
    let gw = start_gateway(dir).await;
    let proxy = Proxy::start().await;
    proxy.set_target(Some(gw.ws_addr));
    (gw, proxy)
}

fn token() -> String {
    Authenticator::new(SECRET.as_bytes())
        .mint("operator", 3600)
        .unwrap()
}

fn builder(url: &str, dir: &Path) -> ClientBuilder {
    Client::builder(url)
        .token(token())
        .data_dir(dir)
        .subscribe(COLL, Body::new())
        .heartbeat(Duration::from_millis(250), Some(Duration::from_secs(3)))
        .connect_timeout(Duration::from_secs(3))
        .backoff(Backoff {
            base: Duration::from_millis(20),
            cap: Duration::from_millis(500),
        })
}

fn body(pairs: &[(&str, Value)]) -> Body {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

/// Waits until `check` holds, polling after every event of `events` (or every 50 ms of
/// silence, for conditions that are not announced by an event), up to the deadline.
async fn until<F, Fut>(what: &str, events: &mut broadcast::Receiver<Event>, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        let _ = tokio::time::timeout(Duration::from_millis(50), events.recv()).await;
    }
}

/// Waits for an event matching `pred` (events are not lossy, unlike the state `watch`).
async fn wait_event(
    events: &mut broadcast::Receiver<Event>,
    what: &str,
    pred: impl Fn(&Event) -> bool,
) -> Event {
    tokio::time::timeout(DEADLINE, async {
        loop {
            let e = events.recv().await.expect("event stream");
            if pred(&e) {
                return e;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// A raw protocol subscriber that records what the server sends.
struct Observer {
    conn: Connection,
    /// Live documents: id → (body, version).
    docs: BTreeMap<String, (Body, u64)>,
    /// Changes received (catch-up and live), in order.
    changes: Vec<syncgate_protocol::Change>,
    nonce: u64,
}

impl Observer {
    /// Subscribes to the collection (from `from_seq`, or a snapshot) and waits for `synced`.
    async fn open(url: &str, from_seq: Option<u64>) -> Observer {
        let (mut conn, welcome) = Connection::connect(
            url,
            &format!("observer-{:08x}", rand::random::<u32>()),
            &token(),
        )
        .await
        .unwrap();
        conn.send(&Frame::Subscribe(Subscribe {
            sub: 1,
            collection: COLL.into(),
            filter: Body::new(),
            cursor: from_seq.map(|seq| Cursor {
                epoch: welcome.epoch.clone(),
                seq,
            }),
        }))
        .await
        .unwrap();
        let mut o = Observer {
            conn,
            docs: BTreeMap::new(),
            changes: Vec::new(),
            nonce: 0,
        };
        loop {
            if let Frame::Synced(_) = o.next().await {
                return o;
            }
        }
    }

    async fn next(&mut self) -> Frame {
        let f = self
            .conn
            .recv_timeout(DEADLINE)
            .await
            .expect("observer frame");
        match &f {
            Frame::Snapshot(s) => {
                for d in &s.docs {
                    self.docs.insert(d.id.clone(), (d.body.clone(), d.version));
                }
            }
            Frame::Changes(c) => {
                for ch in &c.changes {
                    match ch.op {
                        ChangeOp::Upsert => {
                            self.docs
                                .insert(ch.id.clone(), (ch.body.clone().unwrap(), ch.seq));
                        }
                        ChangeOp::Delete => {
                            self.docs.remove(&ch.id);
                        }
                    }
                    self.changes.push(ch.clone());
                }
            }
            Frame::Error(e) => panic!("observer got an error: {e:?}"),
            _ => {}
        }
        f
    }

    async fn until_changes(&mut self, n: usize) {
        while self.changes.len() < n {
            self.next().await;
        }
    }

    /// Pings and returns the pong's head: everything up to it has been received.
    async fn barrier(&mut self) -> u64 {
        self.nonce += 1;
        let nonce = self.nonce;
        self.conn.send(&Frame::Ping(Ping { nonce })).await.unwrap();
        loop {
            if let Frame::Pong(p) = self.next().await
                && p.nonce == nonce
            {
                return p.head.unwrap();
            }
        }
    }
}

/// A fresh PostgreSQL database for one test, or `None` (with a note) when the variable is
/// unset.
async fn postgres_database() -> Option<String> {
    use sea_orm::ConnectionTrait;
    let Ok(admin) = std::env::var("SYNCGATE_TEST_POSTGRES_URL") else {
        eprintln!(
            "SKIPPED: PostgreSQL test (set SYNCGATE_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test to run it)"
        );
        return None;
    };
    let name = format!("sg_sdk_{:016x}", rand::random::<u64>());
    let db = sea_orm::Database::connect(&admin)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {admin} is unreachable: {e}"));
    db.execute_unprepared(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    db.close().await.ok();
    let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
    Some(format!("{base}/{name}"))
}

/// Drops a database [`postgres_database`] made.
async fn drop_database(url: &str) {
    use sea_orm::ConnectionTrait;
    let (Ok(admin), Some((_, name))) = (
        std::env::var("SYNCGATE_TEST_POSTGRES_URL"),
        url.rsplit_once('/'),
    ) else {
        return;
    };
    if let Ok(db) = sea_orm::Database::connect(&admin).await {
        let _ = db
            .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await;
        db.close().await.ok();
    }
}

/// The client's replica as id → (body, version).
async fn replica(client: &Client) -> BTreeMap<String, (Body, u64)> {
    client
        .query(COLL, &Body::new())
        .await
        .unwrap()
        .into_iter()
        .map(|d| {
            assert!(!d.pending, "{} still pending", d.id);
            (d.id, (d.body, d.version))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_edits_survive_a_restart_and_arrive_once_in_order() {
    let gw_dir = tempfile::tempdir().unwrap();
    let client_dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start().await; // no gateway behind it yet: every connection is refused

    let client = builder(&proxy.url(), client_dir.path())
        .open()
        .await
        .unwrap();
    for k in 0..1000i64 {
        let id = format!("wo-{}", k % 200);
        if k < 200 {
            client
                .put(
                    COLL,
                    &id,
                    body(&[("n", Value::from(k)), ("first", Value::from(k))]),
                )
                .await
                .unwrap();
        } else {
            client
                .patch(COLL, &id, body(&[("n", Value::from(k))]))
                .await
                .unwrap();
        }
    }
    // Optimistic state and the outbox, while offline.
    let doc = client.get(COLL, "wo-7").await.unwrap().unwrap();
    assert_eq!(doc.body["n"], Value::from(807));
    assert!(doc.pending);
    assert_eq!(client.outbox().await.unwrap().len(), 1000);
    let offline = client
        .sync_now(Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(offline.to_string().contains("offline"), "{offline}");
    client.close().await;

    // The gateway comes up; a subscriber is already watching when the client returns.
    let gw = start_gateway(gw_dir.path()).await;
    let url = format!("ws://{}", gw.ws_addr);
    let mut watcher = Observer::open(&url, None).await;
    let client = builder(&proxy.url(), client_dir.path())
        .open()
        .await
        .unwrap();
    assert_eq!(
        client.outbox().await.unwrap().len(),
        1000,
        "reopened from disk"
    );
    proxy.set_target(Some(gw.ws_addr));
    let report = client.sync_now(DEADLINE).await.unwrap();
    assert_eq!(report.head, 1000);
    assert!(client.outbox().await.unwrap().is_empty());

    watcher.until_changes(1000).await;
    assert_eq!(watcher.barrier().await, 1000);
    assert_eq!(watcher.changes.len(), 1000, "each edit exactly once");
    for (i, ch) in watcher.changes.iter().enumerate() {
        assert_eq!(ch.seq, i as u64 + 1);
        assert_eq!(ch.id, format!("wo-{}", i % 200), "edit {i} in order");
        assert_eq!(ch.body.as_ref().unwrap()["n"], Value::from(i as i64));
    }
    assert_eq!(replica(&client).await, watcher.docs);
    // A fresh client downloads the same state.
    let other_dir = tempfile::tempdir().unwrap();
    let other = builder(&url, other_dir.path()).open().await.unwrap();
    other.sync_now(DEADLINE).await.unwrap();
    assert_eq!(replica(&other).await, watcher.docs);
    other.close().await;
    client.close().await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_ack_is_replayed_without_applying_anything_twice() {
    let gw_dir = tempfile::tempdir().unwrap();
    let client_dir = tempfile::tempdir().unwrap();
    let (gw, proxy) = proxied_gateway(gw_dir.path()).await;
    let client = builder(&proxy.url(), client_dir.path())
        .open()
        .await
        .unwrap();
    let mut events = client.events();
    client.sync_now(DEADLINE).await.unwrap();
    let mut watcher = Observer::open(&format!("ws://{}", gw.ws_addr), None).await;

    // Ten edits made offline ...
    proxy.set_target(None);
    proxy.cut_all();
    for k in 0..10i64 {
        client
            .put(COLL, &format!("wo-{k}"), body(&[("k", Value::from(k))]))
            .await
            .unwrap();
    }
    // ... go up in one batch when the network returns, but after the gateway's `welcome`
    // nothing it sends reaches the client: the batch is committed, its ack is not read.
    proxy.hold_downstream(Hold::AfterWelcome);
    proxy.set_target(Some(gw.ws_addr));
    watcher.until_changes(10).await;
    // The gateway goes away before the client ever read the ack.
    proxy.cut_all();
    gw.shutdown().await;
    let outbox = client.outbox().await.unwrap();
    assert_eq!(outbox.len(), 10);
    assert!(outbox.iter().all(|e| e.state == OutboxState::Pending));

    let gw = start_gateway(gw_dir.path()).await;
    proxy.set_target(Some(gw.ws_addr));
    proxy.hold_downstream(Hold::Nothing);
    let report = client.sync_now(DEADLINE).await.unwrap();
    assert_eq!(report.head, 10, "nothing was applied a second time");
    assert!(client.outbox().await.unwrap().is_empty());
    // The replay got the stored outcomes: the versions of the first (lost) ack.
    let mut uploaded = Vec::new();
    while let Ok(e) = events.try_recv() {
        if let Event::Uploaded {
            mutation_id,
            version,
        } = e
        {
            uploaded.push((mutation_id, version));
        }
    }
    assert_eq!(uploaded, (1..=10).map(|i| (i, i)).collect::<Vec<_>>());
    let mut log = Observer::open(&format!("ws://{}", gw.ws_addr), Some(0)).await;
    assert_eq!(log.barrier().await, 10);
    assert_eq!(log.changes.len(), 10);
    assert_eq!(replica(&client).await, log.docs);
    client.close().await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_clients_on_a_flaky_network_converge() {
    const PER_CLIENT: i64 = 100;
    let gw_dir = tempfile::tempdir().unwrap();
    let (gw, proxy) = proxied_gateway(gw_dir.path()).await;
    proxy.set_chaos(Some(Chaos {
        lifetime_ms: (30, 400),
        delay_ms: (0, 4),
    }));
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut clients = Vec::new();
    for d in &dirs {
        clients.push(Arc::new(
            builder(&proxy.url(), d.path()).open().await.unwrap(),
        ));
    }
    // Each client writes its own documents and overwrites five shared ones, paced so that the
    // writes span many cut connections.
    let mut writers = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        let c = c.clone();
        writers.push(tokio::spawn(async move {
            let mut pace = tokio::time::interval(Duration::from_millis(8));
            for k in 0..PER_CLIENT {
                pace.tick().await;
                c.put(COLL, &format!("c{i}-{k}"), body(&[("k", Value::from(k))]))
                    .await
                    .unwrap();
                c.put(
                    COLL,
                    &format!("shared-{}", k % 5),
                    body(&[("by", Value::from(i as i64)), ("k", Value::from(k))]),
                )
                .await
                .unwrap();
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    let cuts = proxy.accepted();
    // The network heals; everyone uploads, then everyone downloads everyone else's writes.
    proxy.set_chaos(None);
    for round in 0..2 {
        for c in &clients {
            c.sync_now(DEADLINE)
                .await
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
        }
    }
    assert!(cuts > 6, "the proxy cut connections ({cuts} accepted)");

    let mut server = Observer::open(&format!("ws://{}", gw.ws_addr), None).await;
    let head = server.barrier().await;
    assert_eq!(head, 3 * 2 * PER_CLIENT as u64);
    assert_eq!(server.docs.len(), 3 * PER_CLIENT as usize + 5);
    for c in &clients {
        assert_eq!(replica(c).await, server.docs);
        assert!(c.outbox().await.unwrap().is_empty());
        assert!(c.rejected().await.unwrap().is_empty());
    }
    // The whole log: each mutation exactly once.
    let mut log = Observer::open(&format!("ws://{}", gw.ws_addr), Some(0)).await;
    assert_eq!(log.barrier().await, head);
    assert_eq!(log.changes.len() as u64, head);
    let mut per_doc: BTreeMap<&str, usize> = BTreeMap::new();
    for ch in &log.changes {
        *per_doc.entry(ch.id.as_str()).or_default() += 1;
    }
    for i in 0..3 {
        for k in 0..PER_CLIENT {
            assert_eq!(per_doc.get(format!("c{i}-{k}").as_str()), Some(&1));
        }
    }
    for c in clients {
        Arc::into_inner(c).unwrap().close().await;
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_provider_is_asked_again_after_expiry() {
    let gw_dir = tempfile::tempdir().unwrap();
    let client_dir = tempfile::tempdir().unwrap();
    let gw = start_gateway(gw_dir.path()).await;
    let calls = Arc::new(AtomicU32::new(0));
    let c2 = calls.clone();
    let builder =
        builder(&format!("ws://{}", gw.ws_addr), client_dir.path()).token_provider(move || {
            let n = c2.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    let expired = Claims {
                        exp: 1_000,
                        iat: 0,
                        ..Claims::new("operator", 0)
                    };
                    Ok(jsonwebtoken::encode(
                        &jsonwebtoken::Header::default(),
                        &expired,
                        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
                    )
                    .unwrap())
                } else {
                    Ok(token())
                }
            }
        });
    // Subscribed before the client opens: the first attempt's events are seen too.
    let mut events = builder.events();
    let client = builder.open().await.unwrap();
    client
        .put(COLL, "wo-1", body(&[("a", Value::from(1))]))
        .await
        .unwrap();
    client.sync_now(DEADLINE).await.unwrap();
    assert!(calls.load(Ordering::SeqCst) >= 2);
    let mut saw_expired = false;
    while let Ok(e) = events.try_recv() {
        saw_expired |= matches!(e, Event::ServerError { code: 202, .. });
    }
    assert!(saw_expired, "the expiry was reported as an event");
    client.close().await;
    gw.shutdown().await;
}

/// A token that expires during a session: the gateway ends the session with 202, the SDK asks
/// its provider for a new token at once and resumes, and nothing written meanwhile is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_expiring_mid_session_is_renewed_and_nothing_is_lost() {
    let gw_dir = tempfile::tempdir().unwrap();
    let client_dir = tempfile::tempdir().unwrap();
    let mut config = gateway_config(gw_dir.path());
    config.auth.leeway_secs = 0;
    let gw = Gateway::start(config).await.unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let c2 = calls.clone();
    // Every token the provider hands out is valid for one second; its second call (the
    // session's attempt to refresh) fails, so the first session runs into its expiry.
    let builder =
        builder(&format!("ws://{}", gw.ws_addr), client_dir.path()).token_provider(move || {
            let n = c2.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 1 {
                    return Err("identity provider unreachable".into());
                }
                Ok(Authenticator::new(SECRET.as_bytes())
                    .mint("operator", 1)
                    .unwrap())
            }
        });
    let mut events = builder.events();
    let client = builder.open().await.unwrap();
    client
        .put(COLL, "wo-1", body(&[("a", Value::from(1))]))
        .await
        .unwrap();
    wait_event(&mut events, "the session to end with token_expired", |e| {
        matches!(e, Event::ServerError { code: 202, .. })
    })
    .await;
    client
        .put(COLL, "wo-2", body(&[("a", Value::from(2))]))
        .await
        .unwrap();
    client.sync_now(DEADLINE).await.unwrap();
    assert!(
        calls.load(Ordering::SeqCst) >= 2,
        "the provider was asked again"
    );
    assert!(
        client.outbox().await.unwrap().is_empty(),
        "nothing left unsent"
    );
    for id in ["wo-1", "wo-2"] {
        let doc = client.get(COLL, id).await.unwrap().expect(id);
        assert!(doc.version > 0, "{id} reached the server");
    }
    client.close().await;
    gw.shutdown().await;
}

/// A session sends a newer token before its own expires (`refresh` at three quarters of its
/// validity): with tokens valid for two seconds, it outlives several of them without a
/// `token_expired` or a reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_refreshes_its_token_before_it_expires() {
    let gw_dir = tempfile::tempdir().unwrap();
    let client_dir = tempfile::tempdir().unwrap();
    let mut config = gateway_config(gw_dir.path());
    config.auth.leeway_secs = 0;
    let gw = Gateway::start(config).await.unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let c2 = calls.clone();
    let builder =
        builder(&format!("ws://{}", gw.ws_addr), client_dir.path()).token_provider(move || {
            c2.fetch_add(1, Ordering::SeqCst);
            async move {
                Ok(Authenticator::new(SECRET.as_bytes())
                    .mint("operator", 2)
                    .unwrap())
            }
        });
    let mut events = builder.events();
    let client = builder.open().await.unwrap();
    // The hello's token, then three refreshes: more than the first token's two seconds.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut connected = 0;
    let mut look = |e: Event| match e {
        Event::ServerError { code, .. } => panic!("server error {code} during the session"),
        Event::Connection(ConnectionState::Connected { .. }) => connected += 1,
        _ => {}
    };
    while calls.load(Ordering::SeqCst) < 4 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for four tokens"
        );
        if let Ok(Ok(e)) = tokio::time::timeout(Duration::from_millis(100), events.recv()).await {
            look(e);
        }
    }
    while let Ok(e) = events.try_recv() {
        look(e);
    }
    assert_eq!(connected, 1, "one session throughout");
    client
        .put(COLL, "wo-1", body(&[("a", Value::from(1))]))
        .await
        .unwrap();
    client.sync_now(DEADLINE).await.unwrap();
    client.close().await;
    gw.shutdown().await;
}

/// Patches of a large document write its whole body (and the previous one) to the log each
/// time: a batch of them is refused as writing too much (406), and the SDK sends the same
/// mutations again in smaller batches until they fit. Nothing is lost or applied twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_writes_too_much_is_split_and_nothing_is_lost() {
    let gw_dir = tempfile::tempdir().unwrap();
    let client_dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(Config {
        max_batch_output_bytes: 512 * 1024,
        ..gateway_config(gw_dir.path())
    })
    .await
    .unwrap();
    let builder = builder(&format!("ws://{}", gw.ws_addr), client_dir.path());
    let mut events = builder.events();
    let client = builder.open().await.unwrap();
    let text = "z".repeat(200 * 1024);
    client
        .put(COLL, "big", body(&[("text", Value::from(text.as_str()))]))
        .await
        .unwrap();
    client.sync_now(DEADLINE).await.unwrap();
    // Ten small patches, each writing ~400 KB to the log: 4 MB as one batch.
    for i in 0..10 {
        client
            .patch(COLL, "big", body(&[("n", Value::from(i))]))
            .await
            .unwrap();
    }
    client.sync_now(DEADLINE).await.unwrap();
    assert!(
        client.outbox().await.unwrap().is_empty(),
        "every patch went up"
    );
    assert!(
        client.rejected().await.unwrap().is_empty(),
        "none was rejected"
    );
    let doc = client.get(COLL, "big").await.unwrap().unwrap();
    assert_eq!(doc.body["n"], Value::from(9));
    assert_eq!(
        doc.version, 11,
        "one put and ten patches, each applied once"
    );
    let mut refused = false;
    while let Ok(e) = events.try_recv() {
        refused |= matches!(e, Event::ServerError { code: 406, .. });
    }
    assert!(refused, "the first attempt was refused as too large");
    client.close().await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_noticed_and_replaced() {
    let gw_dir = tempfile::tempdir().unwrap();
    let client_dir = tempfile::tempdir().unwrap();
    let (gw, proxy) = proxied_gateway(gw_dir.path()).await;
    let client = builder(&proxy.url(), client_dir.path())
        .heartbeat(Duration::from_millis(100), Some(Duration::from_millis(600)))
        .open()
        .await
        .unwrap();
    client.sync_now(DEADLINE).await.unwrap();
    let mut events = client.events();
    // The link goes silent (a dead Wi-Fi access point: no FIN, no RST).
    proxy.hold_downstream(Hold::Everything);
    wait_event(&mut events, "the dead connection to be noticed", |e| {
        matches!(e, Event::Connection(ConnectionState::Disconnected { reason, .. }) if reason.contains("presumed dead"))
    })
    .await;
    proxy.cut_all();
    proxy.hold_downstream(Hold::Nothing);
    client
        .put(COLL, "wo-9", body(&[("x", Value::from(1))]))
        .await
        .unwrap();
    client.sync_now(DEADLINE).await.unwrap();
    until("the reconnect", &mut events, || async {
        matches!(client.connection(), Some(ConnectionState::Connected { .. }))
    })
    .await;
    client.close().await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goaway_is_honoured() {
    let gw_dir = tempfile::tempdir().unwrap();
    let client_dir = tempfile::tempdir().unwrap();
    let gw = start_gateway(gw_dir.path()).await;
    let client = builder(&format!("ws://{}", gw.ws_addr), client_dir.path())
        .open()
        .await
        .unwrap();
    client.sync_now(DEADLINE).await.unwrap();
    let mut events = client.events();
    gw.shutdown().await;
    let e = wait_event(&mut events, "the disconnect", |e| {
        matches!(e, Event::Connection(ConnectionState::Disconnected { .. }))
    })
    .await;
    let Event::Connection(ConnectionState::Disconnected { reason, retry_in }) = e else {
        unreachable!()
    };
    assert!(reason.contains("going away"), "{reason}");
    assert!(retry_in >= Duration::from_millis(1000), "{retry_in:?}");
    client.close().await;
}

/// A node whose handshakes are all in progress sends a new client away before `welcome`
/// (admission): the SDK plans its retry from the server's hint, not its own backoff, and gets
/// in once a turn is free (here at once: `sync_now` does not wait for the planned retry);
/// nothing it wrote meanwhile is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_sent_away_at_the_handshake_retries_on_the_hint_and_gets_in() {
    let gw_dir = tempfile::tempdir().unwrap();
    let client_dir = tempfile::tempdir().unwrap();
    let mut config = gateway_config(gw_dir.path());
    config.max_concurrent_handshakes = 1;
    // Sent away at once rather than after waiting for a turn.
    config.handshake_queue_ms = 0;
    let gw = Gateway::start(config).await.unwrap();
    // A connection that upgrades and never says hello holds the only turn.
    let mut pending = tokio::net::TcpStream::connect(gw.ws_addr).await.unwrap();
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        pending
            .write_all(
                b"GET / HTTP/1.1\r\nHost: gateway\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                  Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            )
            .await
            .unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            head.push(pending.read_u8().await.unwrap());
        }
    }
    let client = builder(&format!("ws://{}", gw.ws_addr), client_dir.path())
        .open()
        .await
        .unwrap();
    let mut events = client.events();
    client
        .put(COLL, "while-away", body(&[("v", Value::from(1))]))
        .await
        .unwrap();
    let e = wait_event(&mut events, "being sent away", |e| {
        matches!(e, Event::Connection(ConnectionState::Disconnected { .. }))
    })
    .await;
    let Event::Connection(ConnectionState::Disconnected { reason, retry_in }) = e else {
        unreachable!()
    };
    assert!(reason.contains("busy"), "{reason}");
    // The hint (0.1–1 s) plus up to half of it again.
    assert!(
        retry_in >= Duration::from_millis(100) && retry_in <= Duration::from_millis(1_500),
        "{retry_in:?}"
    );
    drop(pending);
    client.sync_now(DEADLINE).await.unwrap();
    assert!(replica(&client).await.contains_key("while-away"));
    assert!(gw.metrics.admission_refused.get() >= 1);
    client.close().await;
    gw.shutdown().await;
}

/// Runs the command line.
async fn cli(dir: &Path, url: &str, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_syncgate-client"))
        .args(["--url", url, "--data-dir"])
        .arg(dir)
        .args(args)
        .env("SYNCGATE_TOKEN", token())
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_once_exit_status_says_whether_everything_synced() {
    let gw_dir = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gw = start_gateway(gw_dir.path()).await;
    let url = format!("ws://{}", gw.ws_addr);
    // Someone else writes on the server.
    let other_dir = tempfile::tempdir().unwrap();
    let other = builder(&url, other_dir.path()).open().await.unwrap();
    other
        .put(COLL, "from-server", body(&[("v", Value::from(1))]))
        .await
        .unwrap();
    other.sync_now(DEADLINE).await.unwrap();

    let out = cli(
        dir.path(),
        &url,
        &["put", "--no-upload", COLL, "wo-1", r#"{"qty": 5}"#],
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    let out = cli(dir.path(), &url, &["--sub", COLL, "sync", "--once"]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains(r#""synced":true"#));
    let out = cli(dir.path(), &url, &["outbox"]).await;
    assert!(out.stdout.is_empty(), "uploaded: {out:?}");
    let out = cli(dir.path(), &url, &["get", COLL, "from-server"]).await;
    assert!(out.status.success(), "downloaded: {out:?}");
    let out = cli(dir.path(), &url, &["status"]).await;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(r#""seq": 2"#),
        "{out:?}"
    );

    gw.shutdown().await;
    let out = cli(
        dir.path(),
        &url,
        &["put", "--no-upload", COLL, "wo-2", r#"{"qty": 6}"#],
    )
    .await;
    assert!(out.status.success());
    let out = cli(dir.path(), &url, &["sync", "--once", "--timeout", "2s"]).await;
    assert_eq!(out.status.code(), Some(4), "not synced: {out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("offline") && stderr.contains("1 mutation(s) stay queued"),
        "{stderr}"
    );
    let out = cli(dir.path(), &url, &["outbox"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(stdout.contains(r#""id":"wo-2""#) && stdout.contains(r#""state":"pending""#));
    other.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_redownloads_and_keeps_the_outbox() {
    let old_dir = tempfile::tempdir().unwrap();
    let new_dir = tempfile::tempdir().unwrap();
    let client_dir = tempfile::tempdir().unwrap();
    let old = start_gateway(old_dir.path()).await;
    let proxy = Proxy::start().await;
    proxy.set_target(Some(old.ws_addr));
    let client = builder(&proxy.url(), client_dir.path())
        .open()
        .await
        .unwrap();
    let mut events = client.events();
    client
        .put(COLL, "old-only", body(&[("a", Value::from(1))]))
        .await
        .unwrap();
    client.sync_now(DEADLINE).await.unwrap();
    // The server's database is replaced (a restore, a new deployment): a new epoch. Someone
    // already wrote there; the client has an edit it has not uploaded.
    proxy.set_target(None);
    proxy.cut_all();
    let new = start_gateway(new_dir.path()).await;
    let seed_dir = tempfile::tempdir().unwrap();
    let seed = builder(&format!("ws://{}", new.ws_addr), seed_dir.path())
        .open()
        .await
        .unwrap();
    seed.put(COLL, "new-doc", body(&[("b", Value::from(2))]))
        .await
        .unwrap();
    seed.sync_now(DEADLINE).await.unwrap();
    seed.close().await;
    client
        .put(COLL, "offline-edit", body(&[("c", Value::from(3))]))
        .await
        .unwrap();
    proxy.set_target(Some(new.ws_addr));
    client.sync_now(DEADLINE).await.unwrap();
    wait_event(
        &mut events,
        "the resync",
        |e| matches!(e, Event::Resync { reason, .. } if reason == "epoch_changed"),
    )
    .await;
    let mut server = Observer::open(&format!("ws://{}", new.ws_addr), None).await;
    server.barrier().await;
    assert_eq!(
        server.docs.keys().collect::<Vec<_>>(),
        ["new-doc", "offline-edit"],
        "the offline edit reached the new database"
    );
    assert_eq!(
        replica(&client).await,
        server.docs,
        "the old epoch's data is gone"
    );
    client.close().await;
    old.shutdown().await;
    new.shutdown().await;
}

/// A refusal that retrying cannot fix is an event and a final state, not a reconnect loop:
/// `sync_now` fails at once with `Refused`, and the client tries again only when asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_token_stops_the_client_until_asked_again() {
    let gw_dir = tempfile::tempdir().unwrap();
    let client_dir = tempfile::tempdir().unwrap();
    let gw = start_gateway(gw_dir.path()).await;
    let b = builder(&format!("ws://{}", gw.ws_addr), client_dir.path()).token("not-a-jwt");
    let mut events = b.events();
    let client = b.open().await.unwrap();
    client
        .put(COLL, "wo-1", body(&[("a", Value::from(1))]))
        .await
        .unwrap();
    let err = client.sync_now(Duration::from_secs(600)).await.unwrap_err();
    assert!(
        matches!(
            err,
            syncgate_client::ClientError::Refused {
                code: Some(200),
                ..
            }
        ),
        "{err:?}"
    );
    assert!(matches!(
        client.connection(),
        Some(ConnectionState::Stopped {
            code: Some(200),
            ..
        })
    ));
    // Asked again, it makes exactly one more attempt and stops again.
    let err = client.sync_now(Duration::from_secs(600)).await.unwrap_err();
    assert!(matches!(err, syncgate_client::ClientError::Refused { .. }));
    let mut attempts = 0;
    let mut stops = 0;
    while let Ok(e) = events.try_recv() {
        match e {
            Event::Connection(ConnectionState::Connecting { .. }) => attempts += 1,
            Event::Connection(ConnectionState::Stopped { .. }) => stops += 1,
            Event::Connection(ConnectionState::Disconnected { .. }) => {
                panic!("a refusal is not a disconnect to retry")
            }
            _ => {}
        }
    }
    // The attempt made at open, then one per `sync_now`; each ended stopped.
    assert_eq!((attempts, stops), (3, 3));
    assert_eq!(
        client.status().await.unwrap().pending,
        1,
        "the edit is kept"
    );
    client.close().await;
    gw.shutdown().await;
}
