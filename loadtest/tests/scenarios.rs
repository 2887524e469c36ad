//! A short run of each scenario against a real gateway: correctness is checked, no timing is
//! asserted.

use std::time::Duration;

use syncgate_gateway::auth::Authenticator;
use syncgate_gateway::{Config, Gateway};
use syncgate_loadtest::fanout::{FanoutConfig, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_short_run_delivers_everything_once() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_owned(),
        auth: syncgate_gateway::config::AuthConfig {
            jwt_secret: "lt".into(),
        },
        ..Config::default()
    };
    let gw = Gateway::start(config).await.unwrap();
    let cfg = FanoutConfig {
        url: format!("ws://{}", gw.ws_addr),
        token: Authenticator::new(b"lt").mint("loadtest", 600).unwrap(),
        collection: "work_orders".into(),
        subscribers: 5,
        writers: 2,
        changes_per_writer: 40,
        rate_per_writer: 400,
        deadline: Duration::from_secs(60),
    };
    let report = run(&cfg).await.unwrap();
    assert_eq!(report.failures, Vec::<String>::new());
    assert_eq!(report.committed, 80);
    assert_eq!(report.deliveries, 5 * 80);
    assert_eq!(report.latency.count, 400);
    gw.shutdown().await;
}
