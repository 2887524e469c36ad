//! The graceful drain (PostgreSQL, where another session can hold the log head and so keep a
//! push in flight for as long as the test wants): `/readyz` turns unready first and the node
//! still serves for `shutdown_delay_ms`; then a push already taken is committed and
//! acknowledged before the client gets `goaway` with a retry hint in the jitter window and a
//! close with 1012; the node then refuses connections and the shutdown ends in time.

use sea_orm::{ConnectionTrait, Database, TransactionTrait};
use syncgate_client::ConnError;
use syncgate_protocol::Push;

use super::http_api::http_at;
use super::*;

async fn waiting_on_a_lock(db: &sea_orm::DatabaseConnection) -> i64 {
    db.query_one_raw(sea_orm::Statement::from_string(
        sea_orm::DbBackend::Postgres,
        "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() \
         AND wait_event_type = 'Lock'",
    ))
    .await
    .unwrap()
    .unwrap()
    .try_get("", "n")
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_answers_pushes_in_flight_then_sends_goaway() {
    if postgres_url().is_none() {
        return;
    }
    let db = TestDb::new(Backend::Postgres).await;
    let mut config = db.config();
    // Long enough for a handshake on a busy machine: the test connects during the delay.
    config.shutdown_delay_ms = 3_000;
    config.shutdown_grace_ms = 20_000;
    let gw = Gateway::start(config).await.unwrap();
    let (ws, http) = (gw.ws_addr, gw.http_addr);
    assert_eq!(http_at(http, "GET", "/readyz", &[], b"").await.0, 200);
    let (mut c, _) = connect(&gw, "drainee").await;

    // Another session holds the log head: the group commit of the push waits for it.
    let other = Database::connect(&db.url).await.unwrap();
    let holder = other.begin().await.unwrap();
    holder
        .execute_unprepared("UPDATE sg_head SET seq = seq WHERE id = 1")
        .await
        .unwrap();
    c.send(&Frame::Push(Push {
        batch: 1,
        mutations: vec![put(1, "machines", "m1", body(&[("name", "press".into())]))],
    }))
    .await
    .unwrap();
    let end = Instant::now() + DEADLINE;
    while waiting_on_a_lock(&other).await == 0 {
        assert!(Instant::now() < end, "the push never reached the database");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    let shutdown = tokio::spawn(gw.shutdown());
    // Unready at once; during the delay the node still takes new connections.
    assert_eq!(http_at(http, "GET", "/readyz", &[], b"").await.0, 503);
    let during_delay =
        syncgate_client::Connection::connect(&format!("ws://{ws}"), "late", &token("tester")).await;
    // Once the drain proper has begun, no new connection is taken; /readyz still answers.
    while tokio::net::TcpStream::connect(ws).await.is_ok() {
        assert!(Instant::now() < end, "the listener never closed");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let (status, _, text) = http_at(http, "GET", "/readyz", &[], b"").await;
    assert_eq!(
        (status, String::from_utf8_lossy(&text).trim()),
        (503, "draining")
    );
    // The drainee has been told nothing yet: its push is still being committed.
    assert!(matches!(
        c.recv_timeout(std::time::Duration::from_millis(200)).await,
        Err(ConnError::Timeout)
    ));

    holder.commit().await.unwrap();
    match c.recv_timeout(DEADLINE).await.unwrap() {
        Frame::PushAck(a) => {
            assert_eq!(a.batch, 1);
            assert_eq!(a.results[0].status, MutationStatus::Applied);
        }
        other => panic!("expected the push's ack first, got {other:?}"),
    }
    match c.recv_timeout(DEADLINE).await.unwrap() {
        Frame::GoAway(g) => assert!(
            (1_000..=5_000).contains(&g.retry_after_ms),
            "retry_after_ms {}",
            g.retry_after_ms
        ),
        other => panic!("expected goaway, got {other:?}"),
    }
    match c.recv_timeout(DEADLINE).await {
        Err(ConnError::Closed(Some(code))) => assert_eq!(code, 1012),
        other => panic!("expected a close with 1012, got {other:?}"),
    }
    // The connection taken during the delay was sent away the same way.
    let (mut late, _) = during_delay.expect("a connection during the delay is taken");
    let mut saw_goaway = false;
    loop {
        match late.recv_timeout(DEADLINE).await {
            Ok(Frame::GoAway(_)) => saw_goaway = true,
            Ok(_) => {}
            Err(ConnError::Closed(Some(1012))) => break,
            Err(e) => panic!("late connection: {e}"),
        }
    }
    assert!(saw_goaway);
    tokio::time::timeout(DEADLINE, shutdown)
        .await
        .expect("the shutdown ends")
        .unwrap();
    // Nothing was lost: the push is in the log.
    let head: i64 = other
        .query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT seq FROM sg_head WHERE id = 1",
        ))
        .await
        .unwrap()
        .unwrap()
        .try_get("", "seq")
        .unwrap();
    assert_eq!(head, 1);
    other.close().await.ok();
    db.cleanup().await;
}
