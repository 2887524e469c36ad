//! `syncgate-client`: a small command line for the quickstart and scripts.

use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use syncgate_client::Connection;
use syncgate_client::json::{body_to_json, parse_body, to_value};
use syncgate_protocol::{
    ChangeOp, Frame, Mutation, MutationOp, MutationStatus, Ping, Push, Subscribe,
};

#[derive(Parser)]
#[command(
    name = "syncgate-client",
    version,
    about = "Talk to a syncgate gateway"
)]
struct Cli {
    /// Gateway WebSocket URL.
    #[arg(
        long,
        global = true,
        env = "SYNCGATE_URL",
        default_value = "ws://127.0.0.1:7420"
    )]
    url: String,
    /// Client token (mint one with `syncgate token --user NAME`).
    #[arg(long, global = true, env = "SYNCGATE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Client id. Default: a fresh random id per invocation.
    #[arg(long, global = true, env = "SYNCGATE_CLIENT_ID")]
    client_id: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a collection's documents, then every change as it arrives (one JSON line each).
    Subscribe {
        /// The collection.
        collection: String,
        /// Equality filter, repeatable: --filter plant=p1 (the value is parsed as JSON if it can be).
        #[arg(long = "filter", value_parser = parse_term)]
        filters: Vec<(String, serde_json::Value)>,
    },
    /// Create or replace a document: put COLLECTION ID '{"field": "value"}'.
    Put {
        collection: String,
        id: String,
        body: String,
    },
    /// Set some fields of a document: patch COLLECTION ID '{"field": "value"}'.
    Patch {
        collection: String,
        id: String,
        body: String,
    },
    /// Delete a document.
    Delete { collection: String, id: String },
}

fn parse_term(s: &str) -> Result<(String, serde_json::Value), String> {
    let (k, v) = s.split_once('=').ok_or("expected FIELD=VALUE")?;
    let v = serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.to_owned()));
    Ok((k.to_owned(), v))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let token = cli.token.clone().context(
        "no token: pass --token or set SYNCGATE_TOKEN (mint one with `syncgate token --user NAME`)",
    )?;
    let client_id = cli
        .client_id
        .clone()
        .unwrap_or_else(|| format!("cli-{:016x}", rand::random::<u64>()));
    let (mut conn, welcome) = Connection::connect(&cli.url, &client_id, &token)
        .await
        .with_context(|| format!("connecting to {}", cli.url))?;
    match cli.command {
        Command::Subscribe {
            collection,
            filters,
        } => {
            let filter = filters
                .iter()
                .map(|(k, v)| (k.clone(), to_value(v)))
                .collect();
            conn.send(&Frame::Subscribe(Subscribe {
                sub: 1,
                collection,
                filter,
                cursor: None,
            }))
            .await?;
            let mut ping =
                tokio::time::interval(Duration::from_millis(u64::from(welcome.heartbeat_ms)));
            loop {
                let frame = tokio::select! {
                    f = conn.recv() => f?,
                    _ = ping.tick() => { conn.send(&Frame::Ping(Ping { nonce: 0 })).await?; continue; }
                };
                match frame {
                    Frame::Snapshot(s) => {
                        for d in s.docs {
                            println!(
                                "{}",
                                serde_json::json!({"snapshot": d.id, "version": d.version, "body": body_to_json(&d.body)})
                            );
                        }
                    }
                    Frame::Synced(s) => {
                        eprintln!("synced at seq {} (live from here)", s.cursor.seq)
                    }
                    Frame::Changes(c) => {
                        for ch in c.changes {
                            let body = ch.body.as_ref().map(body_to_json);
                            let op = match ch.op {
                                ChangeOp::Upsert => "upsert",
                                ChangeOp::Delete => "delete",
                            };
                            println!(
                                "{}",
                                serde_json::json!({"seq": ch.seq, "op": op, "id": ch.id, "body": body})
                            );
                        }
                    }
                    Frame::Resync(r) => eprintln!("resync: {}", r.reason),
                    Frame::Error(e) => eprintln!("error {} {}: {}", e.code, e.name, e.message),
                    Frame::GoAway(g) => bail!("server going away: {}", g.reason),
                    _ => {}
                }
            }
        }
        Command::Put {
            collection,
            id,
            body,
        } => {
            let body = parse_body(&body).map_err(anyhow::Error::msg)?;
            write(&mut conn, collection, id, MutationOp::Put, Some(body)).await
        }
        Command::Patch {
            collection,
            id,
            body,
        } => {
            let body = parse_body(&body).map_err(anyhow::Error::msg)?;
            write(&mut conn, collection, id, MutationOp::Patch, Some(body)).await
        }
        Command::Delete { collection, id } => {
            write(&mut conn, collection, id, MutationOp::Delete, None).await
        }
    }
}

async fn write(
    conn: &mut Connection,
    collection: String,
    id: String,
    op: MutationOp,
    body: Option<syncgate_protocol::Body>,
) -> anyhow::Result<()> {
    let m = Mutation {
        mutation_id: 1,
        collection,
        id,
        op,
        body,
        base_version: None,
    };
    conn.send(&Frame::Push(Push {
        batch: 1,
        mutations: vec![m],
    }))
    .await?;
    loop {
        match conn.recv_timeout(Duration::from_secs(30)).await? {
            Frame::PushAck(ack) => {
                let r = ack.results.first().context("empty ack")?;
                if r.status == MutationStatus::Applied {
                    println!("applied at version {}", r.version.unwrap_or_default());
                    return Ok(());
                }
                bail!(
                    "rejected: {} ({})",
                    r.reason.clone().unwrap_or_default(),
                    r.code.unwrap_or_default()
                );
            }
            Frame::Error(e) => bail!("error {} {}: {}", e.code, e.name, e.message),
            _ => {}
        }
    }
}
