//! A short run of each scenario against a real gateway: correctness is checked, no timing is
//! asserted.

use std::time::Duration;

use syncgate_gateway::auth::Authenticator;
use syncgate_gateway::{Config, Gateway};
use syncgate_loadtest::common::Target;
use syncgate_loadtest::connect::ConnectConfig;
use syncgate_loadtest::fanout::FanoutConfig;
use syncgate_loadtest::ingest::IngestConfig;
use syncgate_loadtest::storm::StormConfig;

const DEADLINE: Duration = Duration::from_secs(60);

async fn gateway(dir: &std::path::Path) -> (Gateway, Target) {
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.to_owned(),
        auth: syncgate_gateway::config::AuthConfig {
            jwt_secret: "lt".into(),
        },
        ..Config::default()
    };
    let gw = Gateway::start(config).await.unwrap();
    let target = Target {
        url: format!("ws://{}", gw.ws_addr),
        token: Authenticator::new(b"lt").mint("loadtest", 600).unwrap(),
        // Two loopback source addresses: the multi-address path is exercised too.
        sources: vec!["127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap()],
    };
    (gw, target)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_short_run_delivers_everything_once() {
    let dir = tempfile::tempdir().unwrap();
    let (gw, target) = gateway(dir.path()).await;
    let cfg = FanoutConfig {
        url: target.url,
        token: target.token,
        collection: "work_orders".into(),
        subscribers: 5,
        writers: 2,
        changes_per_writer: 40,
        rate_per_writer: 400,
        deadline: DEADLINE,
    };
    let report = syncgate_loadtest::fanout::run(&cfg).await.unwrap();
    assert_eq!(report.failures, Vec::<String>::new());
    assert_eq!(report.committed, 80);
    assert_eq!(report.deliveries, 5 * 80);
    assert_eq!(report.latency.count, 400);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_short_run_acknowledges_everything_once() {
    let dir = tempfile::tempdir().unwrap();
    let (gw, target) = gateway(dir.path()).await;
    let report = syncgate_loadtest::ingest::run(&IngestConfig {
        target,
        collection: "work_orders".into(),
        writers: 3,
        batch: 50,
        inflight: 3,
        mutations_per_writer: 400,
        deadline: DEADLINE,
    })
    .await
    .unwrap();
    assert_eq!(report.failures, Vec::<String>::new());
    assert_eq!(report.figures["acknowledged"], 1200);
    assert_eq!(report.figures["visible"], 1200);
    assert_eq!(report.latency_ms.unwrap().count, 3 * 8);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_short_run_keeps_every_connection_alive() {
    let dir = tempfile::tempdir().unwrap();
    let (gw, target) = gateway(dir.path()).await;
    let report = syncgate_loadtest::connect::run(&ConnectConfig {
        target,
        collection: "work_orders".into(),
        connections: 60,
        rate: 2000,
        hold: Duration::ZERO,
        gateway_pid: Some(std::process::id()),
        deadline: DEADLINE,
    })
    .await
    .unwrap();
    assert_eq!(report.failures, Vec::<String>::new());
    assert_eq!(report.figures["opened"], 60);
    assert_eq!(report.figures["alive_at_end"], 60);
    assert!(
        report.figures["gateway_rss_kib"]["before"]
            .as_u64()
            .unwrap()
            > 0
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_storm_short_run_delivers_exactly_what_was_missed() {
    let dir = tempfile::tempdir().unwrap();
    let (gw, target) = gateway(dir.path()).await;
    let report = syncgate_loadtest::storm::run(&StormConfig {
        target,
        collection: "work_orders".into(),
        clients: 40,
        missed: 120,
        deadline: DEADLINE,
    })
    .await
    .unwrap();
    assert_eq!(report.failures, Vec::<String>::new());
    assert_eq!(report.latency_ms.unwrap().count, 40);
    assert_eq!(report.figures["changes_delivered"], 40 * 120);
    gw.shutdown().await;
}
