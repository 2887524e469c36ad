//! A short run of each scenario against a real gateway: correctness is checked, no timing is
//! asserted.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    reason = "a test fails by panicking"
)]

use std::time::Duration;

use sea_orm::ConnectionTrait;

use syncgate_gateway::auth::Authenticator;
use syncgate_gateway::{Config, Gateway};
use syncgate_loadtest::common::Target;
use syncgate_loadtest::connect::ConnectConfig;
use syncgate_loadtest::fanout::FanoutConfig;
use syncgate_loadtest::ingest::IngestConfig;
use syncgate_loadtest::mixed::MixedConfig;
use syncgate_loadtest::slow::SlowConfig;
use syncgate_loadtest::spawn::{GatewaySpec, SpawnedGateway};
use syncgate_loadtest::storm::StormConfig;

const DEADLINE: Duration = Duration::from_secs(60);

async fn gateway(dir: &std::path::Path) -> (Gateway, Target) {
    gateway_with(dir, Config::default()).await
}

async fn gateway_with(dir: &std::path::Path, base: Config) -> (Gateway, Target) {
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.to_owned(),
        auth: syncgate_gateway::config::AuthConfig {
            jwt_secret: "lt".into(),
            ..Default::default()
        },
        ..base
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
        target,
        collection: "work_orders".into(),
        subscribers: 5,
        writers: 2,
        changes_per_writer: 40,
        rate_per_writer: 400,
        pad: 16,
        deadline: DEADLINE,
        workers: 1,
        worker_exe: None,
    };
    let report = syncgate_loadtest::fanout::run(&cfg).await.unwrap();
    assert_eq!(report.failures, Vec::<String>::new());
    assert_eq!(report.figures["committed"], 80);
    assert_eq!(report.figures["deliveries"], 5 * 80);
    assert_eq!(report.latency_ms.as_ref().unwrap().count, 400);
    // One "last delivery" sample per change.
    assert_eq!(report.figures["last_delivery_ms"]["count"], 80);
    assert!(!report.latency_timeline.is_empty());
    let html = report.to_html();
    assert!(html.contains("nothing lost") && html.contains("<svg"));
    gw.shutdown().await;
}

/// The subscribers in two worker processes of the real binary, the writers here: every
/// subscriber in every worker receives every change once, in order, and the merged report
/// counts them all, with one "last delivery" per change across the workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_in_worker_processes_delivers_everything_once() {
    let dir = tempfile::tempdir().unwrap();
    let (gw, target) = gateway(dir.path()).await;
    let cfg = FanoutConfig {
        target,
        collection: "work_orders".into(),
        subscribers: 7,
        writers: 2,
        changes_per_writer: 40,
        rate_per_writer: 400,
        pad: 16,
        deadline: DEADLINE,
        workers: 2,
        worker_exe: Some(env!("CARGO_BIN_EXE_syncgate-loadtest").into()),
    };
    let report = syncgate_loadtest::fanout::run(&cfg).await.unwrap();
    assert_eq!(report.failures, Vec::<String>::new());
    assert_eq!(report.figures["committed"], 80);
    assert_eq!(report.figures["deliveries"], 7 * 80);
    assert_eq!(report.latency_ms.as_ref().unwrap().count, 7 * 80);
    assert_eq!(report.figures["last_delivery_ms"]["count"], 80);
    assert!(report.figures["workers_cpu_seconds"].as_f64().unwrap() >= 0.0);
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

/// The storm's clients in three worker processes of the real binary: every client of every
/// worker gets exactly the missed changes, in order, and the merged report counts them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_storm_in_worker_processes_delivers_exactly_what_was_missed() {
    let dir = tempfile::tempdir().unwrap();
    let (gw, target) = gateway(dir.path()).await;
    let report = syncgate_loadtest::storm::run(&StormConfig {
        target,
        collection: "work_orders".into(),
        clients: 31,
        missed: 70,
        deadline: DEADLINE,
        workers: 3,
        worker_exe: Some(env!("CARGO_BIN_EXE_syncgate-loadtest").into()),
    })
    .await
    .unwrap();
    assert_eq!(report.failures, Vec::<String>::new());
    assert_eq!(report.latency_ms.unwrap().count, 31);
    assert_eq!(report.figures["changes_delivered"], 31 * 70);
    gw.shutdown().await;
}

/// Both downloads hold every document once and agree; the compressed one is several times
/// smaller on the wire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_short_run_downloads_the_same_documents_compressed() {
    let dir = tempfile::tempdir().unwrap();
    let (gw, target) = gateway(dir.path()).await;
    let report = syncgate_loadtest::snapshot::run(&syncgate_loadtest::snapshot::SnapshotConfig {
        target,
        collection: "work_orders".into(),
        docs: 1_500,
        deadline: DEADLINE,
    })
    .await
    .unwrap();
    assert_eq!(report.failures, Vec::<String>::new());
    let f = &report.figures;
    assert!(f["compressed"]["compressed_frames"].as_u64().unwrap() > 0);
    assert_eq!(f["uncompressed"]["compressed_frames"], 0);
    assert_eq!(
        f["compressed"]["frame_bytes"], f["uncompressed"]["frame_bytes"],
        "the same frames, inflated"
    );
    assert!(f["ratio"].as_f64().unwrap() > 3.0, "{f}");
    gw.shutdown().await;
}

/// A fresh SDK client syncs every seeded document into its replica, both ways; the SDK's
/// traffic counter shows the compressed sync several times smaller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_sync_short_run_holds_every_document_in_the_sdk_replica() {
    let dir = tempfile::tempdir().unwrap();
    let (gw, target) = gateway(dir.path()).await;
    let report =
        syncgate_loadtest::initial_sync::run(&syncgate_loadtest::initial_sync::InitialSyncConfig {
            target,
            collection: "work_orders".into(),
            // Several snapshot pages, and more than one seed batch in flight.
            docs: 2_345,
            both: true,
            deadline: DEADLINE,
        })
        .await
        .unwrap();
    assert_eq!(report.failures, Vec::<String>::new());
    let f = &report.figures;
    for mode in ["uncompressed", "compressed"] {
        assert!(
            f[mode]["replica_bytes"].as_u64().unwrap() > 2_345 * 100,
            "{f}"
        );
        assert!(f[mode]["client_rss_max_kib"].as_u64().unwrap() > 0, "{f}");
    }
    // ~200 bytes of MessagePack per document arrive uncompressed.
    assert!(
        f["uncompressed"]["received_bytes"].as_u64().unwrap() > 2_345 * 150,
        "{f}"
    );
    assert!(f["wire_ratio"].as_f64().unwrap() > 3.0, "{f}");
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
        worker: false,
        probe_url: None,
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
        workers: 1,
        worker_exe: None,
    })
    .await
    .unwrap();
    assert_eq!(report.failures, Vec::<String>::new());
    assert_eq!(report.latency_ms.unwrap().count, 40);
    assert_eq!(report.figures["changes_delivered"], 40 * 120);
    gw.shutdown().await;
}

/// The storm against a node that admits 2 handshakes at a time: the excess is sent away with
/// a retry hint, the clients come back on it, and every one still gets exactly what it missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_storm_through_admission_control_catches_everyone_up() {
    let dir = tempfile::tempdir().unwrap();
    let (gw, target) = gateway_with(
        dir.path(),
        Config {
            max_concurrent_handshakes: 2,
            // Sent away at once: the clients must come back on the hint.
            handshake_queue_ms: 0,
            ..Config::default()
        },
    )
    .await;
    let report = syncgate_loadtest::storm::run(&StormConfig {
        target,
        collection: "work_orders".into(),
        clients: 60,
        missed: 50,
        deadline: DEADLINE,
        workers: 1,
        worker_exe: None,
    })
    .await
    .unwrap();
    assert_eq!(report.failures, Vec::<String>::new());
    assert_eq!(report.figures["changes_delivered"], 60 * 50);
    assert!(
        report.figures["handshakes_sent_away"].as_u64().unwrap() > 0,
        "{}",
        report.figures
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_short_run_recovers_the_stalled_client_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    // A small outbound cap so the stalled subscriber overflows within the run.
    let mut base = Config {
        outbound_buffer_bytes: 64 * 1024,
        ..Config::default()
    };
    base.limits.max_frame_bytes = 64 * 1024;
    base.limits.max_document_bytes = 32 * 1024;
    let (gw, target) = gateway_with(dir.path(), base).await;
    let report = syncgate_loadtest::slow::run(&SlowConfig {
        target,
        collection: "work_orders".into(),
        subscribers: 3,
        writers: 2,
        phase1: 20,
        phase2: 1500,
        rate_per_writer: 2000,
        pad: 4096,
        gateway_pid: Some(std::process::id()),
        deadline: DEADLINE,
    })
    .await
    .unwrap();
    assert_eq!(report.failures, Vec::<String>::new());
    let stalled = &report.figures["stalled"];
    assert_eq!(stalled["received"], 2 * 1520, "{stalled}");
    // 2 × 1500 changes of > 4 KiB (12 MiB) cannot fit a 64 KiB queue plus the kernel's socket
    // buffers (at most 4 MiB + 4 KiB on this loopback): the gateway must have taken the
    // stalled subscriber off live delivery (degraded), caught it up once it read again and
    // brought it back live — within `slow_consumer_deadline_ms`, so without a disconnect:
    // it received every change once, in order (its filter rules out conflation), on one
    // connection.
    let m = &gw.metrics.slow_consumers;
    assert!(
        m.with_label_values(&["degraded"]).get() >= 1,
        "the stalled subscriber was never degraded: {stalled}"
    );
    assert_eq!(m.with_label_values(&["dropped"]).get(), 0, "{stalled}");
    assert_eq!(stalled["reconnects"], 0, "{stalled}");
    assert_eq!(
        stalled["disconnected_with_slow_consumer"], false,
        "{stalled}"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_short_shift_converges_with_offline_terminals() {
    let dir = tempfile::tempdir().unwrap();
    let (gw, target) = gateway(dir.path()).await;
    let report = syncgate_loadtest::mixed::run(&MixedConfig {
        target,
        plants: 2,
        terminals: 8,
        backends: 2,
        duration: Duration::from_secs(3),
        terminal_rate: 10.0,
        backend_rate: 40.0,
        offline_share: 0.5,
        offline_for: Duration::from_secs(1),
        deadline: DEADLINE,
    })
    .await
    .unwrap();
    assert_eq!(report.failures, Vec::<String>::new());
    assert!(report.figures["terminal_edits"].as_u64().unwrap() > 0);
    assert!(report.figures["deliveries_checked"].as_u64().unwrap() > 0);
    gw.shutdown().await;
}

/// The `syncgate` binary of this build (built by `cargo test --workspace`, which builds every
/// target before running tests).
fn syncgate_bin() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|d| d.parent()).unwrap();
    let bin = dir.join(format!("syncgate{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} is missing: build it first (cargo build -p syncgate-gateway)",
        bin.display()
    );
    bin
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_short_run_survives_kill_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut gw = SpawnedGateway::start(GatewaySpec {
        bin: syncgate_bin(),
        args: vec!["--data-dir".into(), dir.path().display().to_string()],
        log: Some(dir.path().join("gateway.log")),
    })
    .await
    .unwrap();
    let token = gw.mint_token("loadtest").await.unwrap();
    let report = syncgate_loadtest::chaos::run(
        &syncgate_loadtest::chaos::ChaosConfig {
            collection: "work_orders".into(),
            writers: 3,
            subscribers: 2,
            mutations_per_writer: 600,
            rate_per_writer: 400,
            batch: 20,
            inflight: 2,
            kills: 2,
            kill_every: Duration::from_millis(500),
            downtime: Duration::from_millis(200),
            deadline: DEADLINE,
            db_faults: None,
            rolling: false,
        },
        std::slice::from_mut(&mut gw),
        token,
    )
    .await
    .unwrap();
    gw.stop().await;
    assert_eq!(report.failures, Vec::<String>::new());
    assert_eq!(report.figures["acknowledged"], 3 * 600);
    assert_eq!(report.figures["gateway_starts"], 3);
    // Each writer re-sends one already acknowledged batch per reconnect: those acks were
    // compared with the first ones.
    assert!(report.figures["replayed_acks_checked"].as_u64().unwrap() > 0);
}

/// The lost-write fault of PROTOCOL.md §3.7 under load: the gateway runs on PostgreSQL and the
/// harness ends its database sessions every 100–400 ms while writers keep batches in flight.
/// Every mutation must be acknowledged as applied exactly once, in order, and reach every
/// subscriber once at the version its writer was told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_short_run_survives_database_session_kills() {
    let Some(db) = ScratchDatabase::create().await else {
        return;
    };
    let url = db.url.clone();
    let dir = tempfile::tempdir().unwrap();
    let mut gw = SpawnedGateway::start(GatewaySpec {
        bin: syncgate_bin(),
        args: vec![
            "--data-dir".into(),
            dir.path().display().to_string(),
            "--database".into(),
            url.clone(),
        ],
        log: Some(dir.path().join("gateway.log")),
    })
    .await
    .unwrap();
    let token = gw.mint_token("loadtest").await.unwrap();
    let report = syncgate_loadtest::chaos::run(
        &syncgate_loadtest::chaos::ChaosConfig {
            collection: "work_orders".into(),
            writers: 3,
            subscribers: 2,
            mutations_per_writer: 4000,
            rate_per_writer: 4000,
            batch: 20,
            inflight: 8,
            kills: 0,
            kill_every: Duration::from_millis(500),
            downtime: Duration::from_millis(200),
            deadline: DEADLINE,
            db_faults: Some(syncgate_loadtest::chaos::DbFaults {
                url: url.clone(),
                min_every: Duration::from_millis(100),
                max_every: Duration::from_millis(400),
            }),
            rolling: false,
        },
        std::slice::from_mut(&mut gw),
        token,
    )
    .await
    .unwrap();
    gw.stop().await;
    db.drop().await;
    assert_eq!(report.failures, Vec::<String>::new());
    assert_eq!(report.figures["acknowledged"], 3 * 4000);
    assert!(
        report.figures["db_sessions_ended"].as_u64().unwrap() > 0,
        "{}",
        report.figures
    );
    eprintln!("database faults: {}", report.figures);
}

/// A fresh PostgreSQL database for one test, on the server of `SYNCGATE_TEST_POSTGRES_URL`.
struct ScratchDatabase {
    /// Its URL.
    url: String,
    name: String,
    /// A session on the server's admin database, to drop it with.
    admin: sea_orm::DatabaseConnection,
}

impl ScratchDatabase {
    /// `None` (saying so) when the PostgreSQL tests are off; an unreachable server fails.
    async fn create() -> Option<ScratchDatabase> {
        let Ok(admin_url) = std::env::var("SYNCGATE_TEST_POSTGRES_URL") else {
            eprintln!(
                "SKIPPED: PostgreSQL test (set SYNCGATE_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test to run it)"
            );
            return None;
        };
        let name = format!("sg_lt_{:016x}", rand::random::<u64>());
        let admin = sea_orm::Database::connect(&admin_url)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL at {admin_url} is unreachable: {e}"));
        admin
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        let base = admin_url
            .rsplit_once('/')
            .map(|(b, _)| b)
            .unwrap_or(&admin_url);
        Some(ScratchDatabase {
            url: format!("{base}/{name}"),
            name,
            admin,
        })
    }

    /// Drops it (its sessions ended first).
    async fn drop(self) {
        let _ = self
            .admin
            .execute_unprepared(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await;
    }
}

/// Three nodes on one PostgreSQL under a write load, restarted one after the other: by
/// SIGTERM (a rolling upgrade: each drains, its clients move to the other nodes) or by
/// SIGKILL. Every mutation is applied once with one version, every subscriber receives every
/// change once and in order, wherever it reconnects.
async fn three_nodes(rolling: bool) {
    let Some(db) = ScratchDatabase::create().await else {
        return;
    };
    let url = db.url.clone();
    let dir = tempfile::tempdir().unwrap();
    let spec = GatewaySpec {
        bin: syncgate_bin(),
        args: vec![
            "--data-dir".into(),
            dir.path().display().to_string(),
            "--database".into(),
            url.clone(),
            "--jwt-secret".into(),
            "three-nodes-secret".into(),
        ],
        log: Some(dir.path().join("gateway.log")),
    };
    let mut gws = Vec::new();
    for _ in 0..3 {
        gws.push(SpawnedGateway::start(spec.clone()).await.unwrap());
    }
    let token = gws[0].mint_token("loadtest").await.unwrap();
    let report = syncgate_loadtest::chaos::run(
        &syncgate_loadtest::chaos::ChaosConfig {
            collection: "work_orders".into(),
            writers: 3,
            subscribers: 3,
            mutations_per_writer: 1500,
            rate_per_writer: 500,
            batch: 20,
            inflight: 4,
            kills: 3,
            kill_every: Duration::from_millis(600),
            downtime: Duration::from_millis(200),
            deadline: DEADLINE,
            db_faults: None,
            rolling,
        },
        &mut gws,
        token,
    )
    .await
    .unwrap();
    for gw in gws {
        gw.stop().await;
    }
    db.drop().await;
    assert_eq!(report.failures, Vec::<String>::new());
    assert_eq!(report.figures["acknowledged"], 3 * 1500);
    assert_eq!(report.figures["nodes"], 3);
    // Every node was restarted once.
    assert_eq!(report.figures["gateway_starts"], 6);
    assert!(
        report.figures["subscriber_reconnects"].as_u64().unwrap() > 0,
        "{}",
        report.figures
    );
    if rolling {
        // A drained node answers what it took and a starting node takes no lock a running
        // group commit waits for: the writers never see an error (before the migration skipped
        // existing objects, each start deadlocked a group commit: storage_unavailable).
        assert_eq!(report.figures["batch_errors"], 0, "{}", report.figures);
    }
    eprintln!("three nodes (rolling: {rolling}): {}", report.figures);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_of_three_nodes_loses_and_doubles_nothing() {
    three_nodes(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_killed_in_turn_lose_and_double_nothing() {
    three_nodes(false).await;
}

/// ERP sessions write a captured table with plain SQL while terminals subscribe: every insert,
/// update and delete reaches every terminal once, in each session's commit order, and the
/// terminals and a fresh snapshot end equal to the table. The harness attaches the table
/// through the `syncgate` binary and detaches and drops it afterwards; a second run on the
/// now non-empty collection is refused before anything is attached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_short_run_delivers_every_sql_write_once() {
    let Some(db) = ScratchDatabase::create().await else {
        return;
    };
    let url = db.url.clone();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("syncgate.toml");
    std::fs::write(&config, "[collections.lt_capture]\n").unwrap();
    let args = vec![
        "--config".into(),
        config.display().to_string(),
        "--data-dir".into(),
        dir.path().display().to_string(),
        "--database".into(),
        url.clone(),
    ];
    let gw = SpawnedGateway::start(GatewaySpec {
        bin: syncgate_bin(),
        args: args.clone(),
        log: Some(dir.path().join("gateway.log")),
    })
    .await
    .unwrap();
    let cfg = syncgate_loadtest::capture::CaptureConfig {
        target: Target {
            url: gw.url(),
            token: gw.mint_token("loadtest").await.unwrap(),
            sources: Vec::new(),
        },
        collection: "lt_capture".into(),
        database: url.clone(),
        table: "erp.lt_orders".into(),
        syncgate: syncgate_loadtest::capture::SyncgateCommand {
            bin: syncgate_bin(),
            args,
        },
        sessions: 4,
        statements_per_session: 150,
        rate_per_session: 1000,
        subscribers: 3,
        pad: 32,
        deadline: DEADLINE,
    };
    let erp = sea_orm::Database::connect(&url).await.unwrap();
    erp.execute_unprepared("CREATE SCHEMA erp").await.unwrap();
    let report = syncgate_loadtest::capture::run(&cfg).await.unwrap();
    assert_eq!(report.failures, Vec::<String>::new());
    assert_eq!(report.figures["statements_committed"], 4 * 150);
    assert_eq!(report.figures["deliveries"], 3 * 4 * 150);
    assert_eq!(report.figures["terminals_converged"], 3);
    // Per session, rows 0..50: the odd ones deleted.
    assert_eq!(report.figures["rows_at_end"], 4 * 25);
    assert_eq!(report.figures["fresh_snapshot_docs"], 4 * 25);
    assert_eq!(report.figures["harness_attached"], true);
    assert_eq!(report.latency_ms.as_ref().unwrap().count, 3 * 4 * 150);
    // Detached and dropped again.
    let left: i64 = erp
        .query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT (SELECT count(*) FROM sg_captures) + \
             (SELECT count(*) FROM pg_tables WHERE tablename = 'lt_orders') AS n",
        ))
        .await
        .unwrap()
        .unwrap()
        .try_get("", "n")
        .unwrap();
    assert_eq!(left, 0);
    // The collection now holds the run's documents: attaching again would delete them.
    let e = syncgate_loadtest::capture::run(&cfg).await.unwrap_err();
    assert!(format!("{e:#}").contains("would make it mirror"), "{e:#}");
    gw.stop().await;
    erp.close().await.ok();
    db.drop().await;
}

/// The JSON report of a harness run that succeeded with no failure (else its output).
fn passed_report(out: &std::process::Output, json: &std::path::Path) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    assert_eq!(report["failures"], serde_json::json!([]));
    report
}

/// `connect --nodes 2 --workers 3` on one PostgreSQL database: the harness starts the second
/// node itself, each worker holds its connections on one node and writes its probe through
/// the other, so every connection must get, exactly once, a change written on another node;
/// the RSS figures are the sum over the nodes and each node's is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_connect_across_nodes_gets_every_probe_from_another_node() {
    let Some(db) = ScratchDatabase::create().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.json");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_syncgate-loadtest"))
        .args(["--quiet", "--deadline", "60", "--spawn-gateway"])
        .arg(syncgate_bin())
        .arg(format!("--gateway-arg=--data-dir={}", dir.path().display()))
        .arg(format!("--gateway-arg=--database={}", db.url))
        .arg("--gateway-log")
        .arg(dir.path().join("gw.log"))
        .args(["--source", "127.0.0.1-127.0.0.2", "--report"])
        .arg(&json)
        .args([
            "connect",
            "--connections",
            "31",
            "--workers",
            "3",
            "--nodes",
            "2",
            "--rate",
            "600",
            "--hold",
            "0",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap();
    db.drop().await;
    let report = passed_report(&out, &json);
    assert_eq!(report["params"]["nodes"], 2);
    assert_eq!(report["figures"]["opened"], 31);
    assert_eq!(report["figures"]["alive_at_end"], 31);
    let nodes = report["figures"]["node_rss_kib"]["after_hold"]
        .as_array()
        .unwrap();
    assert_eq!(nodes.len(), 2);
    let sum: u64 = nodes.iter().map(|n| n.as_u64().unwrap()).sum();
    assert_eq!(report["figures"]["gateway_rss_kib"]["after_hold"], sum);
}

/// Without PostgreSQL, or with fewer workers than nodes, `--nodes` refuses to start and says
/// what it needs.
#[test]
fn cli_connect_across_nodes_says_what_it_needs() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_syncgate-loadtest"))
            .args(["--quiet", "--deadline", "30", "--spawn-gateway"])
            .arg(syncgate_bin())
            .arg(format!("--gateway-arg=--data-dir={}", dir.path().display()))
            .args(["connect", "--connections", "4", "--hold", "0"])
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    let sqlite = run(&["--workers", "2", "--nodes", "2"]);
    assert!(!sqlite.status.success());
    let said = String::from_utf8_lossy(&sqlite.stderr);
    assert!(said.contains("needs one PostgreSQL database"), "{said}");
    let few = run(&["--workers", "1", "--nodes", "2"]);
    assert!(!few.status.success());
    let said = String::from_utf8_lossy(&few.stderr);
    assert!(said.contains("needs --workers 2 or more"), "{said}");
}

/// The command line end to end: `--spawn-gateway` (token minted by the gateway, CPU/RSS
/// sampled), `connect --workers 2` (two child processes, merged report), JSON and HTML files.
#[test]
fn cli_connect_with_workers_against_a_spawned_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let (json, html) = (dir.path().join("r.json"), dir.path().join("r.html"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_syncgate-loadtest"))
        .args(["--quiet", "--deadline", "60", "--spawn-gateway"])
        .arg(syncgate_bin())
        .arg(format!("--gateway-arg=--data-dir={}", dir.path().display()))
        .arg("--gateway-log")
        .arg(dir.path().join("gw.log"))
        .args(["--source", "127.0.0.1-127.0.0.2", "--report"])
        .arg(&json)
        .arg("--html")
        .arg(&html)
        .args([
            "connect",
            "--connections",
            "41",
            "--workers",
            "2",
            "--rate",
            "500",
            "--hold",
            "0",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let report = passed_report(&out, &json);
    assert_eq!(report["figures"]["opened"], 41);
    assert_eq!(report["figures"]["alive_at_end"], 41);
    assert_eq!(report["figures"]["workers"].as_array().unwrap().len(), 2);
    assert!(report["gateway"]["rss_max_kib"].as_u64().unwrap() > 0);
    // Self-describing: what was run, where, on which gateway and for how long.
    let run = &report["run"];
    assert!(
        run["command_line"][1].as_str().unwrap().starts_with("--"),
        "{run}"
    );
    assert!(run["started_at"].as_str().unwrap().ends_with('Z'), "{run}");
    assert!(run["duration_s"].as_f64().unwrap() > 0.0, "{run}");
    assert!(run["machine"]["cores"].as_u64().unwrap() >= 1, "{run}");
    assert!(run["machine"]["memory_kib"].as_u64().unwrap() > 0, "{run}");
    assert!(
        !run["machine"]["kernel"].as_str().unwrap().is_empty(),
        "{run}"
    );
    assert!(
        run["gateway"]["version"]
            .as_str()
            .unwrap()
            .starts_with("syncgate "),
        "{run}"
    );
    assert!(
        run["gateway"]["config"]
            .as_str()
            .unwrap()
            .contains("listen ="),
        "{run}"
    );
    assert!(report["harness"]["cpu_percent"].is_f64(), "{report}");
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("nothing lost"));
    assert!(page.contains("<h2>Run</h2>") && page.contains("CPU: gateway and harness"));
}
