//! `syncgate-loadtest`: run a scenario against a gateway, check correctness while it runs, and
//! report figures as JSON (stdout, and `--report FILE`). Exits non-zero when anything was lost,
//! doubled or reordered.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use syncgate_loadtest::common::{Report, Target};
use syncgate_loadtest::connect::ConnectConfig;
use syncgate_loadtest::fanout::FanoutConfig;
use syncgate_loadtest::ingest::IngestConfig;
use syncgate_loadtest::procfs::Sampler;
use syncgate_loadtest::storm::StormConfig;

#[derive(Parser)]
#[command(
    name = "syncgate-loadtest",
    version,
    about = "Load and correctness harness for syncgate"
)]
struct Cli {
    /// Gateway WebSocket URL.
    #[arg(long, global = true, default_value = "ws://127.0.0.1:7420")]
    url: String,
    /// Client token (`syncgate token --user loadtest`).
    #[arg(long, global = true, env = "SYNCGATE_TOKEN", hide_env_values = true)]
    token: String,
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
    /// S subscribers, W writers at R changes/s each: write→delivery latency, deliveries/s.
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
    },
    /// N clients drop, K changes are committed, all reconnect at once: time to catch up.
    ReconnectStorm {
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        #[arg(long, default_value_t = 1000)]
        missed: u64,
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
    // One connection is one file descriptor: lift the soft limit to the hard one.
    let nofile = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0);
    let cli = Cli::parse();
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
    let target = Target {
        url: cli.url.clone(),
        token: cli.token.clone(),
        sources: cli.sources.concat(),
    };
    let deadline = Duration::from_secs(cli.deadline);
    let sampler = cli
        .gateway_pid
        .map(|pid| Sampler::start(pid, Duration::from_millis(200)));
    let collection = cli.collection.clone();
    let mut report: Report = match cli.scenario {
        Scenario::Fanout {
            subscribers,
            writers,
            changes_per_writer,
            rate,
        } => {
            let cfg = FanoutConfig {
                url: cli.url,
                token: cli.token,
                collection,
                subscribers,
                writers,
                changes_per_writer,
                rate_per_writer: rate,
                deadline,
            };
            let r = syncgate_loadtest::fanout::run(&cfg).await?;
            Report {
                scenario: "fanout",
                params: serde_json::json!({"subscribers": subscribers, "writers": writers,
                    "changes_per_writer": changes_per_writer, "rate_per_writer": rate}),
                figures: serde_json::json!({"committed": r.committed, "deliveries": r.deliveries,
                    "deliveries_per_sec": r.deliveries_per_sec}),
                latency_ms: Some(r.latency),
                gateway: None,
                failures: r.failures,
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
        } => {
            syncgate_loadtest::connect::run(&ConnectConfig {
                target,
                collection,
                connections,
                rate,
                hold: Duration::from_secs(hold),
                gateway_pid: cli.gateway_pid,
                deadline,
            })
            .await?
        }
        Scenario::ReconnectStorm { clients, missed } => {
            syncgate_loadtest::storm::run(&StormConfig {
                target,
                collection,
                clients,
                missed,
                deadline,
            })
            .await?
        }
    };
    report.gateway = sampler.map(Sampler::finish);
    let mut json = serde_json::to_value(&report)?;
    json["harness"] = serde_json::json!({"nofile_limit": nofile, "pid": std::process::id()});
    let text = serde_json::to_string_pretty(&json)?;
    println!("{text}");
    if let Some(path) = &cli.report {
        std::fs::write(path, &text)?;
    }
    if !report.failures.is_empty() {
        eprintln!(
            "syncgate-loadtest: correctness check FAILED: {} problem(s)",
            report.failures.len()
        );
    }
    Ok(report.failures.is_empty())
}
