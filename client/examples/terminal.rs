//! An ERP operator terminal, in miniature.
//!
//! It follows the work orders of one plant, shows every change as it arrives, and every few
//! seconds marks a work order as progressed — whether or not the network is there. Stop the
//! gateway while it runs: the terminal keeps editing (the edits queue in its outbox, the
//! replica shows them at once), reports the connection as down, and when the gateway is back
//! it reconnects, uploads the queued edits exactly once and catches up with what it missed.
//!
//! ```sh
//! cargo run --release -p syncgate-gateway --bin syncgate                # terminal 1
//! export SYNCGATE_TOKEN=$(cargo run -q -p syncgate-gateway --bin syncgate -- token --user op1)
//! cargo run -p syncgate-client --example terminal -- --plant p1          # terminal 2
//! ```

use std::time::Duration;

use clap::Parser;
use syncgate_client::{Client, ConnectionState, Event};
use syncgate_protocol::{Body, Value};

#[derive(Parser)]
struct Args {
    /// Gateway URL.
    #[arg(long, env = "SYNCGATE_URL", default_value = "ws://127.0.0.1:7420")]
    url: String,
    /// Token (`syncgate token --user NAME`).
    #[arg(long, env = "SYNCGATE_TOKEN", hide_env_values = true)]
    token: String,
    /// The plant whose work orders this terminal follows.
    #[arg(long, default_value = "p1")]
    plant: String,
    /// Where the terminal keeps its replica and outbox.
    #[arg(long, default_value = "terminal-data")]
    data_dir: String,
    /// Seconds between edits.
    #[arg(long, default_value_t = 3)]
    every: u64,
    /// Stop after this many edits (0 = run until Ctrl-C).
    #[arg(long, default_value_t = 0)]
    edits: u64,
}

fn field(pairs: &[(&str, Value)]) -> Body {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = field(&[("plant", Value::from(args.plant.as_str()))]);
    let client = Client::builder(&args.url)
        .token(args.token.clone())
        .data_dir(&args.data_dir)
        .subscribe("work_orders", filter.clone())
        .open()
        .await?;
    println!(
        "terminal {} following plant {}",
        client.client_id(),
        args.plant
    );
    let mut events = client.events();
    let mut tick = tokio::time::interval(Duration::from_secs(args.every.max(1)));
    let mut made = 0u64;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            e = events.recv() => match e {
                Ok(Event::Connection(ConnectionState::Connected { session })) => {
                    println!("online (session {session})");
                }
                Ok(Event::Connection(ConnectionState::Disconnected { reason, retry_in })) => {
                    println!("offline: {reason}; retrying in {retry_in:.1?}");
                }
                Ok(Event::Synced { cursor, .. }) => println!("up to date at seq {}", cursor.seq),
                Ok(Event::RemoteChange { id, version, body, .. }) => match body {
                    Some(b) => println!(
                        "  {id} v{version}: {}",
                        b.get("status").and_then(Value::as_str).unwrap_or("?")
                    ),
                    None => println!("  {id} v{version}: gone"),
                },
                Ok(Event::Uploaded { mutation_id, version }) => {
                    println!("  edit {mutation_id} stored by the server as v{version}");
                }
                Ok(Event::Rejected { mutation, reason, .. }) => {
                    println!("  edit {} refused: {reason}", mutation.mutation_id);
                }
                Ok(Event::Conflict { id, .. }) => println!("  {id}: changed elsewhere meanwhile"),
                Ok(_) => {}
                Err(e) => println!("(events: {e})"),
            },
            _ = tick.tick() => {
                // Progress the first work order of the plant, or open one if there is none.
                let orders = client.query("work_orders", &filter).await?;
                let pending = client.status().await?.pending;
                match orders.first() {
                    Some(wo) => {
                        let step = wo.body.get("step").and_then(Value::as_u64).unwrap_or(0) + 1;
                        client
                            .patch("work_orders", &wo.id, field(&[("step", Value::from(step)),
                                ("status", Value::from("in_progress"))]))
                            .await?;
                        println!("edited {} (step {step}); {} edit(s) waiting to upload", wo.id, pending + 1);
                    }
                    None => {
                        let id = format!("wo-{}-{}", args.plant, client.client_id());
                        client
                            .put("work_orders", &id, field(&[("plant", Value::from(args.plant.as_str())),
                                ("status", Value::from("open")), ("step", Value::from(0))]))
                            .await?;
                        println!("opened {id}");
                    }
                }
                made += 1;
                if args.edits > 0 && made >= args.edits {
                    match client.sync_now(Duration::from_secs(30)).await {
                        Ok(r) => println!("all edits uploaded; caught up at seq {}", r.head),
                        Err(e) => println!("stopping with edits queued: {e}"),
                    }
                    break;
                }
            }
        }
    }
    client.close().await;
    Ok(())
}
