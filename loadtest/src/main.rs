//! `syncgate-loadtest`: run a scenario against a gateway and report figures and correctness.

use std::time::Duration;

use clap::{Parser, Subcommand};
use syncgate_loadtest::fanout::{FanoutConfig, run};

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
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// S subscribers, W writers at R changes/s each; checks exactly-once in-order delivery.
    Fanout {
        #[arg(long, default_value_t = 10)]
        subscribers: usize,
        #[arg(long, default_value_t = 2)]
        writers: usize,
        #[arg(long, default_value_t = 200)]
        changes_per_writer: u64,
        #[arg(long, default_value_t = 100)]
        rate: u64,
        #[arg(long, default_value = "work_orders")]
        collection: String,
        /// Seconds before the run gives up and fails.
        #[arg(long, default_value_t = 120)]
        deadline: u64,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.scenario {
        Scenario::Fanout {
            subscribers,
            writers,
            changes_per_writer,
            rate,
            collection,
            deadline,
        } => {
            let cfg = FanoutConfig {
                url: cli.url,
                token: cli.token,
                collection,
                subscribers,
                writers,
                changes_per_writer,
                rate_per_writer: rate,
                deadline: Duration::from_secs(deadline),
            };
            let r = run(&cfg).await?;
            println!(
                "{}",
                serde_json::json!({
                    "scenario": "fanout",
                    "committed": r.committed,
                    "deliveries": r.deliveries,
                    "deliveries_per_sec": r.deliveries_per_sec,
                    "latency_ms": {
                        "p50": r.latency.p50.as_secs_f64() * 1e3,
                        "p90": r.latency.p90.as_secs_f64() * 1e3,
                        "p99": r.latency.p99.as_secs_f64() * 1e3,
                        "max": r.latency.max.as_secs_f64() * 1e3,
                    },
                    "failures": r.failures,
                })
            );
            if !r.failures.is_empty() {
                anyhow::bail!("correctness check failed: {} problem(s)", r.failures.len());
            }
        }
    }
    Ok(())
}
