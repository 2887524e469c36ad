//! Test harness: real gateways on 127.0.0.1:0 over a real SQLite file or a real PostgreSQL
//! database, real WebSocket clients, waits bounded by deadlines (never sleeps).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use sea_orm::{ConnectionTrait, Database};
use syncgate_client::Connection;
use syncgate_gateway::auth::Authenticator;
use syncgate_gateway::{Config, Gateway};
use syncgate_protocol::*;

pub const SECRET: &str = "integration-test-secret";
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Where a test's data lives.
pub struct TestDb {
    pub url: String,
    pub dir: tempfile::TempDir,
    /// For PostgreSQL: (admin url, database name) to drop at the end.
    pg: Option<(String, String)>,
}

#[derive(Clone, Copy, Debug)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The PostgreSQL URL for tests, or None (with a note on how to enable them).
pub fn postgres_url() -> Option<String> {
    match std::env::var("SYNCGATE_TEST_POSTGRES_URL") {
        Ok(u) if !u.is_empty() => Some(u),
        _ => {
            eprintln!(
                "SKIPPED: PostgreSQL test (set SYNCGATE_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test to run it)"
            );
            None
        }
    }
}

impl TestDb {
    pub async fn new(backend: Backend) -> TestDb {
        let dir = tempfile::tempdir().expect("tempdir");
        match backend {
            Backend::Sqlite => TestDb {
                url: format!("sqlite://{}/syncgate.db", dir.path().display()),
                dir,
                pg: None,
            },
            Backend::Postgres => {
                let admin = std::env::var("SYNCGATE_TEST_POSTGRES_URL")
                    .expect("SYNCGATE_TEST_POSTGRES_URL is set for PostgreSQL tests");
                let name = format!("sg_it_{:016x}", rand::random::<u64>());
                let db = Database::connect(&admin)
                    .await
                    .unwrap_or_else(|e| panic!("PostgreSQL at {admin} is unreachable: {e}"));
                db.execute_unprepared(&format!("CREATE DATABASE {name}"))
                    .await
                    .expect("create test database");
                db.close().await.ok();
                let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
                TestDb {
                    url: format!("{base}/{name}"),
                    dir,
                    pg: Some((admin, name)),
                }
            }
        }
    }

    pub fn config(&self) -> Config {
        Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            http_listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: self.dir.path().to_owned(),
            database: self.url.clone(),
            auth: syncgate_gateway::config::AuthConfig {
                jwt_secret: SECRET.into(),
                ..Default::default()
            },
            ..Config::default()
        }
    }

    pub async fn cleanup(self) {
        if let Some((admin, name)) = self.pg
            && let Ok(db) = Database::connect(&admin).await
        {
            let _ = db
                .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await;
            db.close().await.ok();
        }
    }
}

pub fn token(user: &str) -> String {
    Authenticator::new(SECRET.as_bytes())
        .mint(user, 3600)
        .unwrap()
}

/// A token for `user` carrying `claims` (a JSON object: roles, a plant ...).
pub fn token_with(user: &str, claims: serde_json::Value) -> String {
    let mut c = syncgate_gateway::auth::Claims::new(user, 600);
    if let serde_json::Value::Object(m) = claims {
        c.extra.extend(m);
    }
    Authenticator::new(SECRET.as_bytes())
        .mint_claims(c)
        .unwrap()
}

/// Opens a session, or says with which code the server refused it.
pub async fn connect_code(
    url: &str,
    client_id: &str,
    token: &str,
) -> Result<(Connection, Welcome), u16> {
    match Connection::connect(url, client_id, token).await {
        Ok(c) => Ok(c),
        Err(syncgate_client::ConnError::Server(e)) => Err(e.code),
        Err(e) => panic!("connecting {client_id}: {e:?}"),
    }
}

pub fn ws_url(gw: &Gateway) -> String {
    format!("ws://{}", gw.ws_addr)
}

pub async fn connect(gw: &Gateway, client_id: &str) -> (Connection, Welcome) {
    Connection::connect(&ws_url(gw), client_id, &token("tester"))
        .await
        .expect("handshake")
}

pub fn body(pairs: &[(&str, Value)]) -> Body {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

pub fn put(mid: u64, collection: &str, id: &str, b: Body) -> Mutation {
    Mutation {
        mutation_id: mid,
        collection: collection.into(),
        id: id.into(),
        op: MutationOp::Put,
        body: Some(b),
        base_version: None,
        resolves: None,
    }
}

pub fn patch(mid: u64, collection: &str, id: &str, b: Body) -> Mutation {
    Mutation {
        op: MutationOp::Patch,
        ..put(mid, collection, id, b)
    }
}

pub fn delete(mid: u64, collection: &str, id: &str) -> Mutation {
    Mutation {
        mutation_id: mid,
        collection: collection.into(),
        id: id.into(),
        op: MutationOp::Delete,
        body: None,
        base_version: None,
        resolves: None,
    }
}

/// Pushes a batch and waits for its ack (other frames are ignored).
pub async fn push(conn: &mut Connection, batch: u64, mutations: Vec<Mutation>) -> PushAck {
    conn.send(&Frame::Push(Push { batch, mutations }))
        .await
        .unwrap();
    let end = Instant::now() + DEADLINE;
    loop {
        match conn
            .recv_timeout(end - Instant::now())
            .await
            .expect("push ack")
        {
            Frame::PushAck(a) if a.batch == batch => return a,
            Frame::Error(e) => panic!("push {batch} failed: {e:?}"),
            _ => {}
        }
    }
}

/// A subscriber's replica: documents, every change seq seen, cursor.
pub struct Replica {
    pub conn: Connection,
    pub sub: u32,
    pub docs: BTreeMap<String, (Body, u64)>,
    pub seqs: Vec<u64>,
    pub cursor: Option<Cursor>,
    pub synced: bool,
    pub snapshot_frames: usize,
    pub resyncs: Vec<String>,
    /// Set when the server dropped this subscriber as a slow consumer (only tolerated by
    /// `until_seq_resuming`, which then resumes from the cursor as a client must).
    pub dropped_slow: bool,
}

impl Replica {
    pub async fn subscribe(
        gw: &Gateway,
        client_id: &str,
        collection: &str,
        filter: Body,
        cursor: Option<Cursor>,
    ) -> Replica {
        Replica::subscribe_at(&ws_url(gw), client_id, collection, filter, cursor).await
    }

    /// [`Replica::subscribe`] to the gateway at a WebSocket URL (a spawned binary).
    pub async fn subscribe_at(
        url: &str,
        client_id: &str,
        collection: &str,
        filter: Body,
        cursor: Option<Cursor>,
    ) -> Replica {
        let (mut conn, _) = Connection::connect(url, client_id, &token("tester"))
            .await
            .expect("handshake");
        conn.send(&Frame::Subscribe(Subscribe {
            sub: 7,
            collection: collection.into(),
            filter,
            cursor: cursor.clone(),
        }))
        .await
        .unwrap();
        Replica {
            conn,
            sub: 7,
            docs: BTreeMap::new(),
            seqs: Vec::new(),
            cursor,
            synced: false,
            snapshot_frames: 0,
            resyncs: Vec::new(),
            dropped_slow: false,
        }
    }

    /// Like `until_seq`, but when the server drops this subscriber with `slow_consumer` (a
    /// loaded CI machine can make even a reading client fall behind), it reconnects and
    /// resumes from its cursor, keeping what it received: exactly what a client must do.
    pub async fn until_seq_resuming(&mut self, gw: &Gateway, client_id: &str, seq: u64) {
        let end = Instant::now() + DEADLINE;
        while !(self.synced && self.cursor.as_ref().is_some_and(|c| c.seq >= seq)) {
            self.step(end).await;
            if self.dropped_slow {
                let mut fresh =
                    Replica::subscribe(gw, client_id, "stock", Body::new(), self.cursor.clone())
                        .await;
                fresh.docs = std::mem::take(&mut self.docs);
                fresh.seqs = std::mem::take(&mut self.seqs);
                *self = fresh;
            }
        }
    }

    /// Receives one frame and applies it.
    pub async fn step(&mut self, end: Instant) {
        let f = self
            .conn
            .recv_timeout(end.saturating_duration_since(Instant::now()))
            .await
            .expect("frame before the deadline");
        match f {
            Frame::Snapshot(s) => {
                assert_eq!(s.sub, self.sub);
                self.snapshot_frames += 1;
                for d in s.docs {
                    self.docs.insert(d.id, (d.body, d.version));
                }
            }
            Frame::Changes(c) => {
                assert_eq!(c.sub, self.sub);
                for ch in c.changes {
                    self.seqs.push(ch.seq);
                    match ch.op {
                        ChangeOp::Upsert => {
                            self.docs
                                .insert(ch.id, (ch.body.expect("upsert has a body"), ch.seq));
                        }
                        ChangeOp::Delete => {
                            assert!(ch.body.is_none());
                            self.docs.remove(&ch.id);
                        }
                    }
                }
                self.cursor = Some(c.cursor);
            }
            Frame::Synced(s) => {
                self.synced = true;
                self.cursor = Some(s.cursor);
            }
            Frame::Resync(r) => {
                self.docs.clear();
                self.resyncs.push(r.reason);
            }
            Frame::Error(e) if e.code == ErrorCode::SlowConsumer.code() => {
                self.dropped_slow = true;
                self.synced = false;
            }
            Frame::Error(e) => panic!("subscriber got error {e:?}"),
            _ => {}
        }
    }

    /// Applies frames until the cursor reaches `seq` (and the subscription is live).
    pub async fn until_seq(&mut self, seq: u64) {
        let end = Instant::now() + DEADLINE;
        while !(self.synced && self.cursor.as_ref().is_some_and(|c| c.seq >= seq)) {
            self.step(end).await;
        }
    }

    /// Asserts the seqs seen are strictly increasing (no duplicates, in order).
    pub fn assert_in_order_once(&self) {
        for w in self.seqs.windows(2) {
            assert!(w[0] < w[1], "seq {} followed by {}", w[0], w[1]);
        }
    }
}

/// Every live document of a collection as the server holds it.
pub async fn server_docs(gw: &Gateway, collection: &str) -> BTreeMap<String, (Body, u64)> {
    let mut out = BTreeMap::new();
    let mut after: Option<String> = None;
    loop {
        let page = gw
            .store
            .documents_page(collection, after.as_deref(), 1000, 1 << 20)
            .await
            .unwrap()
            .items;
        if page.is_empty() {
            return out;
        }
        after = page.last().map(|d| d.id.clone());
        for d in page {
            out.insert(d.id, (d.body, d.version));
        }
    }
}

/// Waits until the gateway has published everything up to `seq` to its subscribers: pings on
/// `conn` until a pong's `head` covers it (a pong is queued after everything published before
/// the ping was read). Tests that need a change to be in the hub's recent tail, not merely
/// committed, wait on this instead of racing the publication.
pub async fn wait_published(conn: &mut Connection, seq: u64) {
    let end = Instant::now() + DEADLINE;
    let mut nonce = 1_000_000;
    loop {
        nonce += 1;
        conn.send(&Frame::Ping(Ping { nonce })).await.unwrap();
        loop {
            match conn
                .recv_timeout(end.saturating_duration_since(Instant::now()))
                .await
                .expect("pong before the deadline")
            {
                Frame::Pong(p) if p.nonce == nonce => {
                    if p.head.unwrap_or(0) >= seq {
                        return;
                    }
                    break;
                }
                _ => {}
            }
        }
    }
}

/// What a push was answered with: its ack, or the error sent with its batch id.
#[derive(Debug)]
pub enum Answer {
    Ack(PushAck),
    Refused(ErrorFrame),
}

/// Sends every batch without waiting, then collects one answer per batch (in push order).
pub async fn push_pipelined(
    conn: &mut Connection,
    batches: &[(u64, Vec<Mutation>)],
) -> BTreeMap<u64, Answer> {
    for (batch, mutations) in batches {
        conn.send(&Frame::Push(Push {
            batch: *batch,
            mutations: mutations.clone(),
        }))
        .await
        .unwrap();
    }
    let end = Instant::now() + DEADLINE;
    let mut answers = BTreeMap::new();
    while answers.len() < batches.len() {
        match conn
            .recv_timeout(end.saturating_duration_since(Instant::now()))
            .await
            .expect("an answer to every push")
        {
            Frame::PushAck(a) => {
                answers.insert(a.batch, Answer::Ack(a));
            }
            Frame::Error(e) if e.batch.is_some() => {
                answers.insert(e.batch.unwrap(), Answer::Refused(e));
            }
            Frame::Error(e) => panic!("unexpected error {e:?}"),
            _ => {}
        }
    }
    answers
}

/// A fault injected into the database a gateway writes to: while armed, a transaction that
/// writes a change of the document `poison` fails. On SQLite a trigger aborts the statement;
/// on PostgreSQL a trigger terminates the gateway's own database session (as an operator's
/// `pg_terminate_backend` or a failover would), so the group's connection dies mid-transaction.
pub struct Fault {
    db: sea_orm::DatabaseConnection,
}

impl Fault {
    pub const POISON: &'static str = "poison";

    pub async fn install(url: &str, backend: Backend) -> Fault {
        let db = Database::connect(url).await.expect("fault connection");
        let statements: &[&str] = match backend {
            Backend::Sqlite => &[
                "CREATE TABLE sg_test_fault (armed INTEGER NOT NULL)",
                "INSERT INTO sg_test_fault VALUES (1)",
                "CREATE TRIGGER sg_test_fault BEFORE INSERT ON sg_changes \
                 WHEN NEW.doc_id = 'poison' AND (SELECT armed FROM sg_test_fault) = 1 \
                 BEGIN SELECT RAISE(ABORT, 'injected fault'); END",
            ],
            Backend::Postgres => &[
                "CREATE TABLE sg_test_fault (armed BOOLEAN NOT NULL)",
                "INSERT INTO sg_test_fault VALUES (TRUE)",
                "CREATE FUNCTION sg_test_fault() RETURNS trigger LANGUAGE plpgsql AS $$ \
                 BEGIN IF NEW.doc_id = 'poison' AND (SELECT armed FROM sg_test_fault) THEN \
                 PERFORM pg_terminate_backend(pg_backend_pid()); END IF; RETURN NEW; END $$",
                "CREATE TRIGGER sg_test_fault BEFORE INSERT ON sg_changes \
                 FOR EACH ROW EXECUTE FUNCTION sg_test_fault()",
            ],
        };
        for s in statements {
            db.execute_unprepared(s).await.expect("install fault");
        }
        Fault { db }
    }

    pub async fn arm(&self, armed: bool) {
        let v = if armed { "1" } else { "0" };
        let sql = format!("UPDATE sg_test_fault SET armed = ({v} = 1)");
        self.db.execute_unprepared(&sql).await.expect("arm fault");
    }
}
