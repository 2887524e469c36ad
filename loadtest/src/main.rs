//! `syncgate-loadtest`: run a scenario against a gateway, check correctness while it runs, and
//! report figures as JSON (stdout, and `--report FILE`) and HTML (`--html FILE`). Exits 2 when
//! anything was lost, doubled or reordered, 1 when the run itself failed.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use syncgate_loadtest::capture::{CaptureConfig, SyncgateCommand};
use syncgate_loadtest::chaos::ChaosConfig;
use syncgate_loadtest::common::{Report, Target};
use syncgate_loadtest::connect::ConnectConfig;
use syncgate_loadtest::fairness::{Aggressor, FairnessConfig};
use syncgate_loadtest::fanout::FanoutConfig;
use syncgate_loadtest::ingest::IngestConfig;
use syncgate_loadtest::initial_sync::InitialSyncConfig;
use syncgate_loadtest::mixed::MixedConfig;
use syncgate_loadtest::procfs::{self, Sampler};
use syncgate_loadtest::report::{RunInfo, rfc3339};
use syncgate_loadtest::slow::SlowConfig;
use syncgate_loadtest::snapshot::SnapshotConfig;
use syncgate_loadtest::spawn::{GatewaySpec, SpawnedGateway};
use syncgate_loadtest::storm::StormConfig;
use syncgate_loadtest::workers::{self, Workers};

#[derive(Parser)]
#[command(
    name = "syncgate-loadtest",
    version,
    about = "Load and correctness harness for syncgate"
)]
struct Cli {
    /// Gateway WebSocket URL (ignored with --spawn-gateway).
    #[arg(long, global = true, default_value = "ws://127.0.0.1:7420")]
    url: String,
    /// Client token (`syncgate token --user loadtest`); minted by the harness with
    /// --spawn-gateway.
    #[arg(long, global = true, env = "SYNCGATE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Start this `syncgate` binary, run against it, and stop it afterwards (required by
    /// `chaos`). Its CPU and RSS are sampled.
    #[arg(long, global = true)]
    spawn_gateway: Option<PathBuf>,
    /// An argument for the spawned gateway, repeatable (`--gateway-arg=--data-dir=/tmp/gw`).
    #[arg(long = "gateway-arg", global = true, allow_hyphen_values = true)]
    gateway_args: Vec<String>,
    /// Append the spawned gateway's log (stderr) to this file instead of inheriting it.
    #[arg(long, global = true)]
    gateway_log: Option<PathBuf>,
    /// Local source addresses for connections, repeatable or as a range
    /// (`--source 127.0.0.2-127.0.0.9`): each address pair has ~28,000 ephemeral ports.
    #[arg(long = "source", global = true, value_parser = parse_sources)]
    sources: Vec<Vec<IpAddr>>,
    /// The gateway's pid: its CPU and RSS are sampled from /proc during the run.
    #[arg(long, global = true)]
    gateway_pid: Option<u32>,
    /// Also write the JSON report to this file.
    #[arg(long, global = true)]
    report: Option<PathBuf>,
    /// Write an HTML report with SVG plots (latency over time, percentiles, gateway RSS/CPU).
    #[arg(long, global = true)]
    html: Option<PathBuf>,
    /// No progress bar.
    #[arg(long, short, global = true)]
    quiet: bool,
    /// Seconds before the run gives up and fails.
    #[arg(long, global = true, default_value_t = 300)]
    deadline: u64,
    /// The collection used.
    #[arg(long, global = true, default_value = "work_orders")]
    collection: String,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// S subscribers, W writers at R changes/s each: write→delivery latency, deliveries/s, and
    /// the latency of each change's last delivery.
    Fanout {
        #[arg(long, default_value_t = 10)]
        subscribers: usize,
        #[arg(long, default_value_t = 2)]
        writers: usize,
        #[arg(long, default_value_t = 200)]
        changes_per_writer: u64,
        /// Changes per second per writer.
        #[arg(long, default_value_t = 100)]
        rate: u64,
        /// Padding bytes per document.
        #[arg(long, default_value_t = 0)]
        pad: usize,
        /// Harness processes to run the subscribers in (the writers stay in this one), so
        /// that decoding deliveries is not what limits the run; source addresses are dealt
        /// out among them.
        #[arg(long, default_value_t = 1)]
        workers: usize,
        /// Internal: run as one worker of a `--workers` run.
        #[arg(long, hide = true)]
        worker: bool,
        /// Internal: the run a worker subscribes to.
        #[arg(long, hide = true)]
        run: Option<String>,
    },
    /// W writers push batches as fast as acks come back: mutations/s acknowledged.
    Ingest {
        #[arg(long, default_value_t = 4)]
        writers: usize,
        #[arg(long, default_value_t = 100)]
        batch: usize,
        #[arg(long, default_value_t = 4)]
        inflight: usize,
        #[arg(long, default_value_t = 10_000)]
        mutations_per_writer: u64,
    },
    /// Ramp N idle subscribed connections at R/s and hold them: connect rate, RSS/connection.
    Connect {
        #[arg(long, default_value_t = 1000)]
        connections: usize,
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        /// Seconds to hold them idle.
        #[arg(long, default_value_t = 5)]
        hold: u64,
        /// Harness processes to spread the connections over (one process may open at most
        /// ~19,000 here); source addresses are dealt out among them.
        #[arg(long, default_value_t = 1)]
        workers: usize,
        /// Gateway nodes to spawn on one PostgreSQL database (needs --spawn-gateway,
        /// --gateway-arg=--database=postgres://... and --workers of at least N): worker k
        /// holds its connections on node k mod N and writes its probe through the next node,
        /// so every connection must get a change written on another node.
        #[arg(long, default_value_t = 1)]
        nodes: usize,
        /// Internal: run as one worker of a `--workers` run.
        #[arg(long, hide = true)]
        worker: bool,
        /// Internal: the node a worker writes its probe through (default: --url).
        #[arg(long, hide = true)]
        probe_url: Option<String>,
    },
    /// A calm writer's push→ack latency alone, then beside an aggressor (`flood`: large
    /// batches, many in flight; `churn`: subscribe, snapshot, unsubscribe, again).
    Fairness {
        #[arg(long, value_enum, default_value_t = Aggressor::Flood)]
        aggressor: Aggressor,
        /// Aggressor connections.
        #[arg(long, default_value_t = 2)]
        aggressors: usize,
        /// Batches the calm writer pushes in each of its two runs.
        #[arg(long, default_value_t = 300)]
        calm_batches: u64,
        /// Mutations per calm batch.
        #[arg(long, default_value_t = 10)]
        calm_batch: usize,
        #[arg(long, default_value_t = 1000)]
        flood_batch: usize,
        #[arg(long, default_value_t = 16)]
        flood_inflight: usize,
        /// Padding bytes per flooded document.
        #[arg(long, default_value_t = 0)]
        flood_pad: usize,
        /// Documents seeded for the churners to snapshot.
        #[arg(long, default_value_t = 5000)]
        seed_docs: u64,
        /// Padding bytes per seeded document.
        #[arg(long, default_value_t = 200)]
        seed_pad: usize,
        /// Milliseconds the aggressor runs before the calm writer's second run starts.
        #[arg(long, default_value_t = 2000)]
        warmup_ms: u64,
    },
    /// N clients drop, K changes are committed, all reconnect at once: time to catch up.
    ReconnectStorm {
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        #[arg(long, default_value_t = 1000)]
        missed: u64,
        /// Harness processes to spread the clients over (the writer and the clock stay in
        /// this one); source addresses are dealt out among them.
        #[arg(long, default_value_t = 1)]
        workers: usize,
        /// Internal: run as one worker of a `--workers` run.
        #[arg(long, hide = true)]
        worker: bool,
        /// Internal: the run a worker's clients follow.
        #[arg(long, hide = true)]
        run: Option<String>,
    },
    /// A new terminal's first sync: seed D ERP-like documents, then download them as a
    /// snapshot without and with frame compression; bytes on the wire of each.
    Snapshot {
        #[arg(long, default_value_t = 10_000)]
        docs: u64,
    },
    /// P9: a new terminal's first sync through the SDK: seed D documents, then a fresh SDK
    /// client syncs them into its SQLite replica (uncompressed, then compressed); seconds,
    /// bytes received, replica size, client peak RSS.
    InitialSync {
        #[arg(long, default_value_t = 100_000)]
        docs: u64,
        /// Only the compressed sync (skip the uncompressed one).
        #[arg(long)]
        compressed_only: bool,
    },
    /// One subscriber stops reading while others go on: their latency before and during,
    /// the gateway's RSS, and how the stalled one recovers.
    SlowConsumer {
        #[arg(long, default_value_t = 20)]
        subscribers: usize,
        #[arg(long, default_value_t = 2)]
        writers: usize,
        /// Changes per writer before the stall.
        #[arg(long, default_value_t = 500)]
        phase1: u64,
        /// Changes per writer during the stall.
        #[arg(long, default_value_t = 2000)]
        phase2: u64,
        #[arg(long, default_value_t = 200)]
        rate: u64,
        #[arg(long, default_value_t = 1024)]
        pad: usize,
    },
    /// Kill -9 and restart a spawned gateway during a write load (needs --spawn-gateway);
    /// with --nodes N (on PostgreSQL: --gateway-arg=--database=... and a shared
    /// --gateway-arg=--jwt-secret=...) round the nodes, and with --rolling as a rolling
    /// restart (SIGTERM: each node drains).
    Chaos {
        /// Gateway nodes to spawn (they must share a PostgreSQL database and a token secret).
        #[arg(long, default_value_t = 1)]
        nodes: usize,
        /// Restart each node in turn with SIGTERM (its drain) instead of SIGKILL.
        #[arg(long)]
        rolling: bool,
        #[arg(long, default_value_t = 4)]
        writers: usize,
        #[arg(long, default_value_t = 4)]
        subscribers: usize,
        #[arg(long, default_value_t = 5000)]
        mutations_per_writer: u64,
        #[arg(long, default_value_t = 500)]
        rate: u64,
        #[arg(long, default_value_t = 50)]
        batch: usize,
        /// Batches each writer keeps in flight.
        #[arg(long, default_value_t = 8)]
        inflight: usize,
        #[arg(long, default_value_t = 3)]
        kills: u32,
        /// Milliseconds between a start and the next kill.
        #[arg(long, default_value_t = 2000)]
        kill_every_ms: u64,
        /// Milliseconds the gateway stays down.
        #[arg(long, default_value_t = 500)]
        downtime_ms: u64,
        /// Also end the gateway's PostgreSQL sessions (`pg_terminate_backend`) every
        /// --db-fault-min-ms..--db-fault-max-ms while writes run; the URL of the gateway's
        /// database. Use --kills 0 for database faults alone.
        #[arg(long)]
        kill_db_sessions: Option<String>,
        /// Shortest pause between two rounds of ended sessions.
        #[arg(long, default_value_t = 100)]
        db_fault_min_ms: u64,
        /// Longest pause between two rounds of ended sessions.
        #[arg(long, default_value_t = 400)]
        db_fault_max_ms: u64,
    },
    /// SQL sessions write a captured PostgreSQL table (insert, update, delete; one transaction
    /// per statement) while terminals subscribe: SQL write→terminal latency, every statement
    /// delivered once in order. Creates and attaches the table unless it is (`syncgate capture
    /// attach`, run with the --gateway-arg arguments), and undoes what it set up afterwards.
    Capture {
        /// The gateway's PostgreSQL database (the table is created and written there).
        #[arg(long)]
        database: String,
        /// The captured table (created if missing).
        #[arg(long, default_value = "syncgate_loadtest_capture")]
        table: String,
        /// The `syncgate` binary that attaches and detaches (default: --spawn-gateway's, else
        /// `syncgate` on PATH).
        #[arg(long)]
        syncgate: Option<PathBuf>,
        /// Concurrent SQL sessions.
        #[arg(long, default_value_t = 4)]
        sessions: usize,
        #[arg(long, default_value_t = 600)]
        statements_per_session: u64,
        /// Statements per second per session.
        #[arg(long, default_value_t = 100)]
        rate: u64,
        #[arg(long, default_value_t = 10)]
        subscribers: usize,
        /// Padding bytes per row.
        #[arg(long, default_value_t = 0)]
        pad: usize,
    },
    /// An ERP shift: terminals per plant, backend writers, some terminals offline a while.
    Mixed {
        #[arg(long, default_value_t = 4)]
        plants: usize,
        #[arg(long, default_value_t = 200)]
        terminals: usize,
        #[arg(long, default_value_t = 2)]
        backends: usize,
        /// Shift length, seconds.
        #[arg(long, default_value_t = 30)]
        duration: u64,
        /// Edits per second per terminal.
        #[arg(long, default_value_t = 0.5)]
        terminal_rate: f64,
        /// Writes per second per backend.
        #[arg(long, default_value_t = 50.0)]
        backend_rate: f64,
        /// Share of terminals that go offline once.
        #[arg(long, default_value_t = 0.2)]
        offline_share: f64,
        /// Seconds an offline terminal stays away.
        #[arg(long, default_value_t = 5)]
        offline_for: u64,
    },
}

fn parse_sources(s: &str) -> Result<Vec<IpAddr>, String> {
    let parse = |a: &str| {
        a.trim()
            .parse::<std::net::Ipv4Addr>()
            .map_err(|e| format!("{a}: {e}"))
    };
    match s.split_once('-') {
        None => Ok(vec![IpAddr::V4(parse(s)?)]),
        Some((a, b)) => {
            let (a, b) = (u32::from(parse(a)?), u32::from(parse(b)?));
            if b < a || b - a > 1024 {
                return Err("a range must go upwards and hold at most 1024 addresses".into());
            }
            Ok((a..=b).map(|x| IpAddr::V4(x.into())).collect())
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    // A worker process starts its timeline clock where its parent's is.
    match std::env::var(syncgate_loadtest::workers::CLOCK_AGE_ENV)
        .ok()
        .and_then(|ms| ms.parse().ok())
    {
        Some(ms) => syncgate_loadtest::stats::start_clock_aged(Duration::from_millis(ms)),
        None => syncgate_loadtest::stats::start_clock(),
    };
    // One connection is one file descriptor: lift the soft limit to the hard one.
    let nofile = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0);
    let cli = Cli::parse();
    syncgate_loadtest::progress::set_quiet(cli.quiet);
    match run(cli, nofile).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(2),
        Err(e) => {
            eprintln!("syncgate-loadtest: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli, nofile: u64) -> anyhow::Result<bool> {
    let started = std::time::SystemTime::now();
    let started_clock = std::time::Instant::now();
    let mut spawned = match &cli.spawn_gateway {
        Some(bin) => Some(
            SpawnedGateway::start(GatewaySpec {
                bin: bin.clone(),
                args: cli.gateway_args.clone(),
                log: cli.gateway_log.clone(),
            })
            .await?,
        ),
        None => None,
    };
    let (url, token) = match &spawned {
        Some(gw) => (gw.url(), gw.mint_token("loadtest").await?),
        None => (
            cli.url.clone(),
            cli.token
                .clone()
                .context("a token is needed: --token or SYNCGATE_TOKEN")?,
        ),
    };
    let gateway_info = match &spawned {
        Some(gw) => Some(gw.describe().await),
        None => None,
    };
    let run_url = url.clone();
    let target = Target {
        url,
        token,
        sources: cli.sources.concat(),
    };
    let gateway_pid = cli
        .gateway_pid
        .or_else(|| spawned.as_ref().and_then(SpawnedGateway::pid));
    let deadline = Duration::from_secs(cli.deadline);
    let worker = matches!(cli.scenario, Scenario::Connect { worker: true, .. });
    let sampler = (!worker)
        .then_some(gateway_pid)
        .flatten()
        .map(|pid| Sampler::start(pid, Duration::from_millis(200)));
    let collection = cli.collection.clone();
    // The harness samples itself like the gateway: its CPU over time goes beside the
    // gateway's in the report (a harness at 100 % bounds what a run can show).
    let harness_sampler =
        (!worker).then(|| Sampler::start(std::process::id(), Duration::from_millis(200)));
    let result = scenario(
        &cli,
        target,
        collection,
        gateway_pid,
        deadline,
        &mut spawned,
    )
    .await;
    if let Some(gw) = spawned {
        gw.stop().await;
    }
    let mut report = result?;
    report.gateway = sampler.map(Sampler::finish);
    report.harness = harness_sampler.map(Sampler::finish);
    report.add_cost_figures();
    report.run = Some(RunInfo {
        command_line: std::env::args().collect(),
        started_at: rfc3339(
            started
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        ),
        duration_s: started_clock.elapsed().as_secs_f64(),
        harness_version: format!("syncgate-loadtest {}", env!("CARGO_PKG_VERSION")),
        machine: procfs::machine(),
        gateway: gateway_info,
        url: run_url,
        nofile_limit: nofile,
    });
    let text = serde_json::to_string_pretty(&report)?;
    println!("{text}");
    if let Some(path) = &cli.report {
        std::fs::write(path, &text).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &cli.html {
        std::fs::write(path, report.to_html())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if !report.failures.is_empty() {
        eprintln!(
            "syncgate-loadtest: correctness check FAILED: {} problem(s)",
            report.failures.len()
        );
    }
    Ok(report.failures.is_empty())
}

async fn scenario(
    cli: &Cli,
    target: Target,
    collection: String,
    gateway_pid: Option<u32>,
    deadline: Duration,
    spawned: &mut Option<SpawnedGateway>,
) -> anyhow::Result<Report> {
    Ok(match cli.scenario {
        Scenario::Fanout {
            subscribers,
            writers,
            changes_per_writer,
            rate,
            pad,
            workers,
            worker,
            ref run,
        } => {
            let cfg = FanoutConfig {
                target,
                collection,
                subscribers,
                writers,
                changes_per_writer,
                rate_per_writer: rate,
                pad,
                deadline,
                workers,
                worker_exe: None,
            };
            match (worker, run) {
                (true, Some(run)) => syncgate_loadtest::fanout::worker(&cfg, run).await?,
                (true, None) => bail!("--worker needs --run"),
                (false, _) => syncgate_loadtest::fanout::run(&cfg).await?,
            }
        }
        Scenario::Ingest {
            writers,
            batch,
            inflight,
            mutations_per_writer,
        } => {
            syncgate_loadtest::ingest::run(&IngestConfig {
                target,
                collection,
                writers,
                batch,
                inflight,
                mutations_per_writer,
                deadline,
            })
            .await?
        }
        Scenario::Connect {
            connections,
            rate,
            hold,
            workers,
            nodes,
            worker,
            ref probe_url,
        } => {
            let shape = ConnectShape {
                connections,
                rate,
                hold,
                workers,
            };
            if nodes > 1 {
                if workers < nodes {
                    bail!("--nodes {nodes} needs --workers {nodes} or more (one or more per node)");
                }
                if spawned.is_none() {
                    bail!("--nodes {nodes} starts the nodes itself: it needs --spawn-gateway PATH");
                }
                let gws = start_nodes(cli, spawned, nodes).await?;
                let urls: Vec<String> = gws.iter().map(SpawnedGateway::url).collect();
                let pids: Vec<u32> = gws.iter().filter_map(SpawnedGateway::pid).collect();
                let result = connect_workers(cli, &target, &shape, &urls, &pids).await;
                let mut gws = gws.into_iter();
                *spawned = gws.next();
                for gw in gws {
                    gw.stop().await;
                }
                return result;
            }
            if workers > 1 {
                let pids: Vec<u32> = gateway_pid.into_iter().collect();
                return connect_workers(cli, &target, &shape, &[], &pids).await;
            }
            syncgate_loadtest::connect::run(&ConnectConfig {
                target,
                collection,
                connections,
                rate,
                hold: Duration::from_secs(hold),
                gateway_pid,
                deadline,
                worker,
                probe_url: probe_url.clone(),
            })
            .await?
        }
        Scenario::Fairness {
            aggressor,
            aggressors,
            calm_batches,
            calm_batch,
            flood_batch,
            flood_inflight,
            flood_pad,
            seed_docs,
            seed_pad,
            warmup_ms,
        } => {
            syncgate_loadtest::fairness::run(&FairnessConfig {
                target,
                collection,
                aggressor,
                calm_batches,
                calm_batch,
                aggressors,
                flood_batch,
                flood_inflight,
                flood_pad,
                seed_docs,
                seed_pad,
                warmup: Duration::from_millis(warmup_ms),
                deadline,
            })
            .await?
        }
        Scenario::ReconnectStorm {
            clients,
            missed,
            workers,
            worker,
            ref run,
        } => {
            let cfg = StormConfig {
                target,
                collection,
                clients,
                missed,
                deadline,
                workers,
                worker_exe: None,
            };
            match (worker, run) {
                (true, Some(run)) => syncgate_loadtest::storm::worker(&cfg, run).await?,
                (true, None) => bail!("--worker needs --run"),
                (false, _) => syncgate_loadtest::storm::run(&cfg).await?,
            }
        }
        Scenario::Snapshot { docs } => {
            syncgate_loadtest::snapshot::run(&SnapshotConfig {
                target,
                collection,
                docs,
                deadline,
            })
            .await?
        }
        Scenario::InitialSync {
            docs,
            compressed_only,
        } => {
            syncgate_loadtest::initial_sync::run(&InitialSyncConfig {
                target,
                collection,
                docs,
                both: !compressed_only,
                deadline,
            })
            .await?
        }
        Scenario::SlowConsumer {
            subscribers,
            writers,
            phase1,
            phase2,
            rate,
            pad,
        } => {
            syncgate_loadtest::slow::run(&SlowConfig {
                target,
                collection,
                subscribers,
                writers,
                phase1,
                phase2,
                rate_per_writer: rate,
                pad,
                gateway_pid,
                deadline,
            })
            .await?
        }
        Scenario::Chaos {
            nodes,
            rolling,
            writers,
            subscribers,
            mutations_per_writer,
            rate,
            batch,
            kills,
            inflight,
            kill_every_ms,
            downtime_ms,
            ref kill_db_sessions,
            db_fault_min_ms,
            db_fault_max_ms,
        } => {
            if spawned.is_none() {
                bail!("chaos kills and restarts the gateway: it needs --spawn-gateway PATH");
            }
            let mut gws = start_nodes(cli, spawned, nodes).await?;
            let cfg = ChaosConfig {
                collection,
                writers,
                subscribers,
                mutations_per_writer,
                rate_per_writer: rate,
                batch,
                inflight,
                kills,
                kill_every: Duration::from_millis(kill_every_ms),
                downtime: Duration::from_millis(downtime_ms),
                deadline,
                db_faults: match kill_db_sessions.clone() {
                    Some(url) if url.starts_with("postgres") => {
                        Some(syncgate_loadtest::chaos::DbFaults {
                            url,
                            min_every: Duration::from_millis(db_fault_min_ms),
                            max_every: Duration::from_millis(db_fault_max_ms),
                        })
                    }
                    Some(url) => bail!(
                        "--kill-db-sessions needs the gateway's PostgreSQL URL (postgres://...), got {url:?}"
                    ),
                    None => None,
                },
                rolling,
            };
            let result = syncgate_loadtest::chaos::run(&cfg, &mut gws, target.token).await;
            // The first node goes back to the caller (sampled, stopped there), the others stop.
            for gw in gws.drain(1..) {
                gw.stop().await;
            }
            *spawned = gws.pop();
            result?
        }
        Scenario::Capture {
            ref database,
            ref table,
            ref syncgate,
            sessions,
            statements_per_session,
            rate,
            subscribers,
            pad,
        } => {
            let bin = syncgate
                .clone()
                .or_else(|| cli.spawn_gateway.clone())
                .unwrap_or_else(|| PathBuf::from("syncgate"));
            syncgate_loadtest::capture::run(&CaptureConfig {
                target,
                collection,
                database: database.clone(),
                table: table.clone(),
                syncgate: SyncgateCommand {
                    bin,
                    args: cli.gateway_args.clone(),
                },
                sessions,
                statements_per_session,
                rate_per_session: rate,
                subscribers,
                pad,
                deadline,
            })
            .await?
        }
        Scenario::Mixed {
            plants,
            terminals,
            backends,
            duration,
            terminal_rate,
            backend_rate,
            offline_share,
            offline_for,
        } => {
            syncgate_loadtest::mixed::run(&MixedConfig {
                target,
                plants,
                terminals,
                backends,
                duration: Duration::from_secs(duration),
                terminal_rate,
                backend_rate,
                offline_share,
                offline_for: Duration::from_secs(offline_for),
                deadline,
            })
            .await?
        }
    })
}

/// The run a `connect --workers N` run deals out.
struct ConnectShape {
    connections: usize,
    rate: u64,
    hold: u64,
    workers: usize,
}

/// Starts `nodes` gateways like the spawned one (it becomes the first; the others share its
/// arguments, so they must name one PostgreSQL database). On failure the ones started here
/// stop and the first goes back to `spawned`.
async fn start_nodes(
    cli: &Cli,
    spawned: &mut Option<SpawnedGateway>,
    nodes: usize,
) -> anyhow::Result<Vec<SpawnedGateway>> {
    let Some(first) = spawned.take() else {
        bail!("starting nodes needs --spawn-gateway PATH");
    };
    if nodes > 1
        && !cli
            .gateway_args
            .iter()
            .any(|a| a.contains("postgres://") || a.contains("postgresql://"))
    {
        *spawned = Some(first);
        bail!(
            "--nodes {nodes} needs one PostgreSQL database for all nodes: \
             --gateway-arg=--database=postgres://..."
        );
    }
    let mut gws = vec![first];
    for _ in 1..nodes {
        match SpawnedGateway::start(GatewaySpec {
            bin: cli.spawn_gateway.clone().unwrap_or_default(),
            args: cli.gateway_args.clone(),
            log: cli.gateway_log.clone(),
        })
        .await
        {
            Ok(gw) => gws.push(gw),
            Err(e) => {
                for gw in gws.drain(1..) {
                    gw.stop().await;
                }
                *spawned = gws.pop();
                return Err(e.context("starting another node"));
            }
        }
    }
    Ok(gws)
}

/// `connect --workers N`: N child processes of this binary each open their share (on node
/// `k mod nodes` when there are `nodes`); the parent reads the gateways' RSS (the sum over
/// `pids`) while all of them hold, then lets them run the probe.
async fn connect_workers(
    cli: &Cli,
    target: &Target,
    shape: &ConnectShape,
    nodes: &[String],
    pids: &[u32],
) -> anyhow::Result<Report> {
    let &ConnectShape {
        connections,
        rate,
        hold,
        workers,
    } = shape;
    // Each node's RSS, and their sum (`None` once a node cannot be read).
    let rss = || -> Option<(u64, Vec<u64>)> {
        let each: Option<Vec<u64>> = pids
            .iter()
            .map(|&p| procfs::read(p).map(|r| r.rss_kib))
            .collect();
        each.filter(|e| !e.is_empty()).map(|e| (e.iter().sum(), e))
    };
    let rss_before = rss();
    let started = std::time::Instant::now();
    let end = started + Duration::from_secs(cli.deadline);
    let spawn = workers::Spawn {
        exe: None,
        target,
        nodes,
        collection: &cli.collection,
        deadline: Duration::from_secs(cli.deadline),
    };
    let mut children = Workers::spawn(&spawn, workers, |k| {
        let mut args: Vec<String> = vec![
            "connect".into(),
            "--worker".into(),
            "--connections".into(),
            workers::share(connections, workers, k).to_string(),
            "--rate".into(),
            (rate / workers as u64).max(1).to_string(),
        ];
        // The probe goes through the next node: a change written on another node.
        if let Some(next) = nodes.get((k + 1) % nodes.len().max(1)) {
            args.extend(["--probe-url".into(), next.clone()]);
        }
        args
    })?;
    // Every worker says READY once all its connections are open (or fails).
    children.ready(end).await?;
    let ramp = started.elapsed();
    let rss_open = rss();
    tokio::time::sleep(Duration::from_secs(hold)).await; // the hold is the measurement
    let rss_held = rss();
    children.go().await?;
    let mut failures = Vec::new();
    let (mut opened, mut alive) = (0u64, 0u64);
    let mut per_worker = Vec::new();
    for (k, r) in children.reports(end).await?.into_iter().enumerate() {
        match r {
            Ok(r) => {
                let field = |path: &str| r.pointer(path).cloned().unwrap_or_default();
                opened += field("/figures/opened").as_u64().unwrap_or(0);
                alive += field("/figures/alive_at_end").as_u64().unwrap_or(0);
                failures.extend(workers::failures_of(k, &r));
                per_worker.push(serde_json::json!({"opened": field("/figures/opened"),
                    "alive_at_end": field("/figures/alive_at_end"),
                    "connect_ms": field("/latency_ms")}));
            }
            Err(e) => failures.push(e),
        }
    }
    if alive < connections as u64 {
        failures.push(format!(
            "{alive} of {connections} connections alive at the end"
        ));
    }
    let per_conn = match (&rss_before, &rss_held) {
        (Some((b, _)), Some((h, _))) if opened > 0 => {
            Some(h.saturating_sub(*b) as f64 * 1024.0 / opened as f64)
        }
        _ => None,
    };
    let sum = |r: &Option<(u64, Vec<u64>)>| r.as_ref().map(|(s, _)| *s);
    let each = |r: &Option<(u64, Vec<u64>)>| r.as_ref().map(|(_, e)| e.clone());
    Ok(Report {
        scenario: "connect",
        params: serde_json::json!({"connections": connections, "rate": rate, "hold_sec": hold,
            "workers": workers, "nodes": nodes.len().max(1), "sources": target.sources.len()}),
        figures: serde_json::json!({"opened": opened, "alive_at_end": alive,
            "ramp_sec": ramp.as_secs_f64(),
            "connects_per_sec": opened as f64 / ramp.as_secs_f64().max(1e-9),
            "gateway_rss_kib": {"before": sum(&rss_before), "all_open": sum(&rss_open),
                "after_hold": sum(&rss_held)},
            "node_rss_kib": {"before": each(&rss_before), "after_hold": each(&rss_held)},
            "gateway_rss_bytes_per_connection": per_conn, "workers": per_worker}),
        failures,
        ..Report::default()
    })
}
