//! `syncgate-client`: the SDK's command line. Every command works on a data directory (the
//! local replica, the outbox and the client id); commands that need the gateway connect to it.
//!
//! Exit status (README "Exit status"): 0 done; 1 failed (not found, local error); 2 usage
//! error (bad arguments, invalid JSON, no token, nothing to subscribe); 3 synced, but the
//! server rejected some mutations (listed on stderr); 4 not synced: the gateway could not be
//! reached or did not finish in time (edits stay queued in the outbox); 5 the gateway refused
//! this client (bad token, wrong URL ...): retrying will not help until that is fixed.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use syncgate_client::json::{body_to_json, parse_body, to_value};
use syncgate_client::{
    Client, ClientBuilder, ClientError, ConnectionState, EncryptionKey, Event, OutboxState,
    SyncReport, Take,
};
use syncgate_protocol::{Body, ErrorCode, MutationOp};

#[derive(Parser)]
#[command(
    name = "syncgate-client",
    version,
    about = "Offline-first syncgate client: local replica, durable outbox, sync"
)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct Common {
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
    /// The data directory: replica, outbox and client id (one client per directory).
    #[arg(
        long,
        global = true,
        env = "SYNCGATE_CLIENT_DATA",
        default_value = "syncgate-client-data"
    )]
    data_dir: PathBuf,
    /// Follow a collection, optionally filtered: `work_orders` or `work_orders:plant=p1,line=2`
    /// (repeatable). Added to the stored subscriptions (a collection already followed gets
    /// the new filter); `unsubscribe` removes one.
    #[arg(long = "sub", global = true, value_parser = parse_sub)]
    subs: Vec<(String, Body)>,
    /// For wss:// URLs: trust the CA certificates in this PEM file (a private CA) instead of
    /// the public web PKI.
    #[arg(long, global = true, env = "SYNCGATE_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// Encrypt the data directory at rest with the key in this file (32 bytes, or 64 hex
    /// digits; `syncgate-client keygen` makes one). A new directory is created encrypted; an
    /// encrypted one opens only with its key.
    #[arg(long, global = true, env = "SYNCGATE_CLIENT_KEY_FILE")]
    key_file: Option<PathBuf>,
    /// The encryption key itself, as 64 hex digits (prefer --key-file: a command line is
    /// visible to other users of the machine).
    #[arg(
        long,
        global = true,
        env = "SYNCGATE_CLIENT_KEY",
        hide_env_values = true,
        conflicts_with = "key_file"
    )]
    key: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Print a new random encryption key (64 hex digits) for --key-file.
    Keygen,
    /// Upload the outbox and download every subscription, once or periodically.
    Sync {
        /// Sync once; the exit status says whether everything was uploaded and downloaded.
        #[arg(long, conflicts_with = "every", required_unless_present = "every")]
        once: bool,
        /// Sync periodically (`15m`, `30s`, `1h`), disconnected in between.
        #[arg(long, value_parser = parse_duration)]
        every: Option<Duration>,
        /// Give up a round after this long.
        #[arg(long, value_parser = parse_duration, default_value = "60s")]
        timeout: Duration,
    },
    /// Stay connected: print the replica, then every event as a JSON line.
    Subscribe {
        /// Add (or re-filter) this collection's subscription.
        collection: Option<String>,
        /// Equality filter for COLLECTION, repeatable: --filter plant=p1 (JSON value if it parses).
        #[arg(long = "filter", value_parser = parse_term, requires = "collection")]
        filters: Vec<(String, serde_json::Value)>,
    },
    /// Create or replace a document: put COLLECTION ID '{"field": "value"}'.
    Put {
        /// The collection (declared on the gateway), e.g. work_orders.
        collection: String,
        /// The document id (1..=128 bytes, no control characters).
        id: String,
        /// The whole document as a JSON object; `@FILE` reads it from a file, `-` from
        /// standard input.
        body: String,
        #[command(flatten)]
        upload: Upload,
    },
    /// Set some fields of a document (null removes a field): patch COLLECTION ID '{"f": 1}'.
    Patch {
        /// The collection.
        collection: String,
        /// The document id.
        id: String,
        /// The fields to set, as a JSON object (null removes a field); `@FILE` reads it from a
        /// file, `-` from standard input.
        body: String,
        #[command(flatten)]
        upload: Upload,
    },
    /// Delete a document.
    Delete {
        /// The collection.
        collection: String,
        /// The document id.
        id: String,
        #[command(flatten)]
        upload: Upload,
    },
    /// Print a document from the local replica (with local edits applied). Documents of
    /// followed collections are there, and so is everything this client wrote.
    Get {
        /// The collection.
        collection: String,
        /// The document id.
        id: String,
    },
    /// Read documents from the gateway by id, once, and keep them in the local replica (the
    /// way to read a collection whose mode is `never`); prints each as a JSON line. Exit 1 if
    /// some id was not found (never written, deleted, or outside your scope).
    Fetch {
        /// The collection.
        collection: String,
        /// The document ids.
        #[arg(required = true)]
        ids: Vec<String>,
        /// Give up after this long.
        #[arg(long, value_parser = parse_duration, default_value = "10s")]
        timeout: Duration,
    },
    /// Print the documents of a collection from the local replica, optionally filtered.
    Query {
        /// The collection.
        collection: String,
        /// Equality filter, repeatable: --filter plant=p1 (the value is JSON if it parses as
        /// JSON, a string otherwise).
        #[arg(long = "filter", value_parser = parse_term)]
        filters: Vec<(String, serde_json::Value)>,
    },
    /// Stop following collections: their downloaded documents are forgotten (local edits
    /// still waiting for the server are kept). Says what it removed.
    Unsubscribe {
        /// The collections to stop following.
        #[arg(required = true)]
        collections: Vec<String>,
    },
    /// Print the outbox: mutations waiting for the server.
    Outbox,
    /// Print the mutations the server rejected (code, reason, the whole mutation), one JSON
    /// line each; with --ack, forget the named ones (or --ack-all) once dealt with.
    Rejected {
        /// Forget these rejected mutations (their mutation ids).
        #[arg(long = "ack", value_name = "MUTATION_ID", num_args = 1.., conflicts_with = "ack_all")]
        ack: Vec<u64>,
        /// Forget every rejected mutation.
        #[arg(long)]
        ack_all: bool,
    },
    /// Print the open `manual` conflicts, one JSON line each: its id, the refused local edit
    /// (and the document it would have left), the server's version and body.
    Conflicts,
    /// Resolve a `manual` conflict, then upload the resolution like `put`: keep the server's
    /// version (`--take server`), the refused local edit on top of it (`--take mine`), or a
    /// document of your own (`--take '{"qty": 11}'`, `@file` or `-` for standard input).
    Resolve {
        /// The conflict's id (from `conflicts`).
        conflict_id: String,
        /// `server`, `mine`, or a JSON document.
        #[arg(long)]
        take: String,
        #[command(flatten)]
        upload: Upload,
    },
    /// Print the client id, subscriptions and cursors, pending and rejected counts.
    Status,
}

#[derive(Args)]
struct Upload {
    /// Only queue the edit; upload on the next sync.
    #[arg(long)]
    no_upload: bool,
    /// How long to wait for the upload once the gateway accepted the connection. An
    /// unreachable gateway is not waited for (a refused connection at once, one that does not
    /// answer after 3 s): the edit stays queued and the command exits 4.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    timeout: Duration,
}

/// How long `put`, `patch` and `delete` wait for a connection (TCP, WebSocket and `welcome`)
/// before leaving the edit queued.
const WRITE_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Exit statuses; the README's "Exit status" section lists them.
mod status {
    pub(crate) const FAILED: u8 = 1;
    pub(crate) const USAGE: u8 = 2;
    pub(crate) const REJECTED: u8 = 3;
    pub(crate) const NOT_SYNCED: u8 = 4;
    pub(crate) const REFUSED: u8 = 5;
}

/// An error in how the command was called (exit status 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Usage(String);

fn usage(msg: impl Into<String>) -> anyhow::Error {
    Usage(msg.into()).into()
}

/// Reads a JSON body argument: inline text, `@FILE`, or `-` for standard input.
fn read_body(arg: &str) -> anyhow::Result<Body> {
    let text = if arg == "-" {
        let mut t = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut t)
            .map_err(|e| usage(format!("reading the body from standard input: {e}")))?;
        t
    } else if let Some(path) = arg.strip_prefix('@') {
        std::fs::read_to_string(path)
            .map_err(|e| usage(format!("reading the body from {path}: {e}")))?
    } else {
        arg.to_owned()
    };
    parse_body(&text).map_err(usage)
}

/// The exit status for an error.
fn exit_status(e: &anyhow::Error) -> u8 {
    if e.downcast_ref::<Usage>().is_some() {
        return status::USAGE;
    }
    match e.downcast_ref::<ClientError>() {
        Some(ClientError::Invalid { .. } | ClientError::Config(_)) => status::USAGE,
        Some(ClientError::Refused { .. }) => status::REFUSED,
        Some(ClientError::Offline { .. } | ClientError::Timeout { .. }) => status::NOT_SYNCED,
        _ => status::FAILED,
    }
}

fn parse_term(s: &str) -> Result<(String, serde_json::Value), String> {
    let (k, v) = s.split_once('=').ok_or("expected FIELD=VALUE")?;
    let v = serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.to_owned()));
    Ok((k.to_owned(), v))
}

fn terms_to_body(terms: &[(String, serde_json::Value)]) -> Body {
    terms
        .iter()
        .map(|(k, v)| (k.clone(), to_value(v)))
        .collect()
}

fn parse_sub(s: &str) -> Result<(String, Body), String> {
    let (collection, filter) = match s.split_once(':') {
        Some((c, f)) => (c, f),
        None => (s, ""),
    };
    let terms = filter
        .split(',')
        .filter(|t| !t.is_empty())
        .map(parse_term)
        .collect::<Result<Vec<_>, _>>()?;
    Ok((collection.to_owned(), terms_to_body(&terms)))
}

/// Parses `500ms`, `30s`, `15m`, `2h` (a bare number is seconds).
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?}: expected a number with a unit (500ms, 30s, 15m, 2h)"))?;
    Ok(match unit {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        other => return Err(format!("unknown unit {other:?} (use ms, s, m or h)")),
    })
}

/// A builder for the data directory: `--sub` subscriptions are added to the stored ones.
fn builder(common: &Common) -> anyhow::Result<ClientBuilder> {
    let mut b = Client::builder(&common.url)
        .data_dir(&common.data_dir)
        .keep_subscriptions(true);
    if let Some(key) = encryption_key(common)? {
        b = b.encryption_key(key);
    }
    if let Some(ca) = &common.ca_file {
        b = b.tls_ca_file(ca);
    }
    if let Some(t) = &common.token {
        b = b.token(t.clone());
    }
    for (c, f) in &common.subs {
        b = b.subscribe(c.clone(), f.clone());
    }
    Ok(b)
}

/// The key of `--key-file` or `--key` (or their environment variables), if any.
fn encryption_key(common: &Common) -> anyhow::Result<Option<EncryptionKey>> {
    let key = match (&common.key_file, &common.key) {
        (Some(path), _) => Some(EncryptionKey::from_file(path)),
        (None, Some(hex)) => Some(EncryptionKey::from_hex(hex)),
        (None, None) => None,
    };
    key.transpose()
        .map_err(|e| usage(format!("encryption key: {e}")))
}

fn need_token(common: &Common) -> anyhow::Result<()> {
    if common.token.is_none() {
        return Err(usage(
            "no token: pass --token or set SYNCGATE_TOKEN (mint one with `syncgate token --user NAME`)",
        ));
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            // Each cause once, on one line: "what failed: why".
            eprintln!("syncgate-client: {e:#}");
            ExitCode::from(exit_status(&e))
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let common = &cli.common;
    match cli.command {
        Command::Sync {
            once,
            every,
            timeout,
        } => {
            need_token(common)?;
            if once {
                return sync_round(common, timeout).await;
            }
            let every = every.context("--every needs a duration")?;
            loop {
                // A failed round is reported and retried next period; the outbox keeps its
                // work. A refusal (bad token, wrong URL) ends the loop: waiting cannot fix it.
                if let Err(e) = sync_round(common, timeout).await {
                    eprintln!("syncgate-client: {e:#}");
                    if exit_status(&e) == status::REFUSED {
                        return Err(e);
                    }
                }
                tokio::time::sleep(every).await;
            }
        }
        Command::Subscribe {
            collection,
            filters,
        } => {
            need_token(common)?;
            let mut b = builder(common)?;
            if let Some(c) = collection {
                b = b.subscribe(c, terms_to_body(&filters));
            }
            subscribe(b).await
        }
        Command::Put {
            collection,
            id,
            body,
            upload,
        } => {
            let body = read_body(&body)?;
            write(common, &upload, collection, id, MutationOp::Put, Some(body)).await
        }
        Command::Resolve {
            conflict_id,
            take,
            upload,
        } => {
            let take = match take.as_str() {
                "server" => Take::Server,
                "mine" => Take::Mine,
                other => Take::Body(read_body(other)?),
            };
            upload_edit(common, &upload, Edit::Resolve(conflict_id, take)).await
        }
        Command::Conflicts => {
            let client = builder(common)?.open_local().await?;
            let conflicts = client.conflicts().await;
            client.close().await;
            for c in conflicts? {
                let m = &c.mine;
                println!(
                    "{}",
                    serde_json::json!({"id": c.id, "collection": m.collection, "doc_id": m.id,
                        "mutation_id": m.mutation_id, "op": op_name(m.op),
                        "mine": m.body.as_ref().map(body_to_json),
                        "mine_result": c.mine_body().as_ref().map(body_to_json),
                        "server_version": c.server_version,
                        "server": c.server_body.as_ref().map(body_to_json)})
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Patch {
            collection,
            id,
            body,
            upload,
        } => {
            let body = read_body(&body)?;
            write(
                common,
                &upload,
                collection,
                id,
                MutationOp::Patch,
                Some(body),
            )
            .await
        }
        Command::Delete {
            collection,
            id,
            upload,
        } => write(common, &upload, collection, id, MutationOp::Delete, None).await,
        Command::Keygen => {
            println!("{}", EncryptionKey::generate().to_hex());
            Ok(ExitCode::SUCCESS)
        }
        Command::Get { collection, id } => {
            let client = builder(common)?.open_local().await?;
            let doc = client.get(&collection, &id).await?;
            client.close().await;
            match doc {
                Some(d) => {
                    println!(
                        "{}",
                        serde_json::json!({"collection": d.collection, "id": d.id,
                            "version": d.version, "pending": d.pending, "body": body_to_json(&d.body)})
                    );
                    Ok(ExitCode::SUCCESS)
                }
                None => {
                    eprintln!("{collection}/{id}: not in the local replica");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Command::Fetch {
            collection,
            ids,
            timeout,
        } => {
            need_token(common)?;
            let client = builder(common)?.open_local().await?;
            let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
            let fetched = client.fetch(&collection, &ids, timeout).await;
            client.close().await;
            let fetched = fetched?;
            for d in &fetched.docs {
                println!(
                    "{}",
                    serde_json::json!({"collection": collection, "id": d.id,
                        "version": d.version, "body": body_to_json(&d.body)})
                );
            }
            for id in &fetched.missing {
                eprintln!("{collection}/{id}: not on the server (or outside your scope)");
            }
            Ok(if fetched.missing.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Query {
            collection,
            filters,
        } => {
            let client = builder(common)?.open_local().await?;
            let docs = client.query(&collection, &terms_to_body(&filters)).await?;
            client.close().await;
            for d in docs {
                println!(
                    "{}",
                    serde_json::json!({"id": d.id, "version": d.version, "pending": d.pending,
                        "body": body_to_json(&d.body)})
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Unsubscribe { collections } => {
            let local = builder(common)?.open_local().await?;
            let stored = local.status().await?.subscriptions;
            let mut keep = Vec::new();
            let mut removed = Vec::new();
            for s in stored {
                if collections.contains(&s.collection) {
                    removed.push(s.collection);
                } else {
                    keep.push((s.collection, s.filter));
                }
            }
            let mut counts = Vec::new();
            for c in &removed {
                let docs = local.query(c, &Body::new()).await?;
                let pending = docs.iter().filter(|d| d.pending).count();
                counts.push((c.clone(), docs.len(), pending));
            }
            local.close().await;
            if let Some(unknown) = collections.iter().find(|c| !removed.contains(c)) {
                return Err(usage(format!("{unknown} is not a followed collection")));
            }
            builder(common)?
                .replace_subscriptions(keep)
                .open_local()
                .await?
                .close()
                .await;
            for (c, docs, pending) in counts {
                println!(
                    "{}",
                    serde_json::json!({"unsubscribed": c, "documents_forgotten": docs - pending,
                        "documents_with_local_edits_kept": pending})
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Outbox => {
            let client = builder(common)?.open_local().await?;
            let entries = client.outbox().await?;
            client.close().await;
            for e in &entries {
                let m = &e.mutation;
                let (state, version) = match e.state {
                    OutboxState::Pending => ("pending", None),
                    OutboxState::Acked { version } => ("acked", Some(version)),
                };
                println!(
                    "{}",
                    serde_json::json!({"mutation_id": m.mutation_id, "state": state,
                        "version": version, "collection": m.collection, "id": m.id,
                        "op": op_name(m.op), "body": m.body.as_ref().map(body_to_json),
                        "created_ms": e.created_ms})
                );
            }
            eprintln!(
                "{} entr{}",
                entries.len(),
                if entries.len() == 1 { "y" } else { "ies" }
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Rejected { ack, ack_all } => {
            let client = builder(common)?.open_local().await?;
            if ack_all || !ack.is_empty() {
                let ids = (!ack_all).then_some(ack.as_slice());
                let n = client.acknowledge_rejected(ids).await;
                client.close().await;
                eprintln!("{} rejected mutation(s) forgotten", n?);
                return Ok(ExitCode::SUCCESS);
            }
            let rejected = client.rejected().await;
            client.close().await;
            for r in rejected? {
                let m = &r.mutation;
                let name = ErrorCode::from_code(r.code).map_or("?", |c| c.name());
                println!(
                    "{}",
                    serde_json::json!({"mutation_id": m.mutation_id, "code": r.code, "name": name,
                        "reason": r.reason, "collection": m.collection, "id": m.id,
                        "op": op_name(m.op), "body": m.body.as_ref().map(body_to_json)})
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status => {
            let client = builder(common)?.open_local().await?;
            let st = client.status().await?;
            let rejected = client.rejected().await?;
            client.close().await;
            let subs: Vec<_> = st
                .subscriptions
                .iter()
                .map(|s| {
                    serde_json::json!({"collection": s.collection, "filter": body_to_json(&s.filter),
                        "cursor": s.cursor.as_ref().map(|c| serde_json::json!({"epoch": c.epoch, "seq": c.seq}))})
                })
                .collect();
            let rej: Vec<_> = rejected
                .iter()
                .map(|r| serde_json::json!({"mutation_id": r.mutation.mutation_id, "collection": r.mutation.collection,
                    "id": r.mutation.id, "code": r.code, "reason": r.reason}))
                .collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "client_id": st.client_id,
                    "data_dir": st.data_dir,
                    "pending": st.pending,
                    "last_mutation_id": st.last_mutation_id,
                    "subscriptions": subs,
                    "rejected": rej,
                }))?
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn op_name(op: MutationOp) -> &'static str {
    match op {
        MutationOp::Put => "put",
        MutationOp::Patch => "patch",
        MutationOp::Delete => "delete",
    }
}

/// One `sync --once` round: exit 0 when everything was uploaded and downloaded.
async fn sync_round(common: &Common, timeout: Duration) -> anyhow::Result<ExitCode> {
    let b = builder(common)?;
    let mut events = b.events();
    let client = b.open().await?;
    let result = client.sync_now(timeout).await;
    let rejected = drain_rejections(&mut events);
    client.close().await;
    report(result, rejected)
}

fn drain_rejections(events: &mut tokio::sync::broadcast::Receiver<Event>) -> u64 {
    let mut n = 0;
    while let Ok(e) = events.try_recv() {
        if let Event::ConflictOpened(c) = &e {
            n += 1;
            eprintln!(
                "conflict {}: mutation {} ({} {}/{}) was not applied; the server keeps version {} \
                 (`syncgate-client conflicts`, then `resolve {} --take server|mine|JSON`)",
                c.id,
                c.mine.mutation_id,
                op_name(c.mine.op),
                c.mine.collection,
                c.mine.id,
                c.server_version,
                c.id
            );
        }
        if let Event::Rejected {
            mutation,
            code,
            reason,
        } = e
        {
            n += 1;
            eprintln!(
                "rejected: mutation {} ({} {}/{}): {code} {reason}",
                mutation.mutation_id,
                op_name(mutation.op),
                mutation.collection,
                mutation.id
            );
        }
    }
    n
}

fn report(result: Result<SyncReport, ClientError>, rejected: u64) -> anyhow::Result<ExitCode> {
    match result {
        Ok(r) => {
            println!(
                "{}",
                serde_json::json!({"synced": true, "head": r.head, "pending": r.pending, "rejected": rejected})
            );
            Ok(if rejected > 0 {
                ExitCode::from(status::REJECTED)
            } else {
                ExitCode::SUCCESS
            })
        }
        Err(e) => Err(anyhow::Error::from(e).context("sync failed")),
    }
}

/// A local edit a command makes.
enum Edit {
    /// A put, patch or delete of `collection/id`.
    Write {
        collection: String,
        id: String,
        op: MutationOp,
        body: Option<Body>,
    },
    /// The resolution of a `manual` conflict.
    Resolve(String, Take),
}

async fn write(
    common: &Common,
    upload: &Upload,
    collection: String,
    id: String,
    op: MutationOp,
    body: Option<Body>,
) -> anyhow::Result<ExitCode> {
    let edit = Edit::Write {
        collection,
        id,
        op,
        body,
    };
    upload_edit(common, upload, edit).await
}

/// Makes a local edit, then uploads it unless told not to (or without a token).
async fn upload_edit(common: &Common, upload: &Upload, edit: Edit) -> anyhow::Result<ExitCode> {
    let upload_now = !upload.no_upload && common.token.is_some();
    // A gateway that does not even answer the TCP handshake (a dead Wi-Fi link drops the
    // packets) is given up on after this, not after the SDK's default 10 s.
    let b = builder(common)?.connect_timeout(WRITE_CONNECT_TIMEOUT);
    let mut events = b.events();
    let client = if upload_now {
        b.open().await?
    } else {
        b.open_local().await?
    };
    let result = match edit {
        Edit::Write {
            collection,
            id,
            op,
            body,
        } => match op {
            MutationOp::Put => client.put(&collection, &id, body.unwrap_or_default()).await,
            MutationOp::Patch => {
                client
                    .patch(&collection, &id, body.unwrap_or_default())
                    .await
            }
            MutationOp::Delete => client.delete(&collection, &id).await,
        },
        Edit::Resolve(conflict_id, take) => client.resolve(&conflict_id, take).await,
    };
    let mutation_id = match result {
        Ok(m) => m,
        Err(e) => {
            client.close().await;
            return Err(e.into());
        }
    };
    eprintln!("queued as mutation {mutation_id}");
    if !upload_now {
        client.close().await;
        if upload.no_upload {
            return Ok(ExitCode::SUCCESS);
        }
        eprintln!(
            "no token: not uploaded; it stays in the outbox (`syncgate-client sync --once` with a token uploads it)"
        );
        return Ok(ExitCode::from(status::NOT_SYNCED));
    }
    // An unreachable gateway is not waited for: offline-first means the edit is safe now.
    let result = client.sync_now_if_reachable(upload.timeout).await;
    let rejected = drain_rejections(&mut events);
    client.close().await;
    match result {
        Ok(r) => report(Ok(r), rejected),
        Err(e) => {
            let code = match &e {
                ClientError::Refused { .. } => status::REFUSED,
                ClientError::Offline { .. } | ClientError::Timeout { .. } => status::NOT_SYNCED,
                _ => status::FAILED,
            };
            // The edit is durable in the outbox whatever happened to the upload.
            eprintln!(
                "syncgate-client: not uploaded: {e}; mutation {mutation_id} stays in the outbox for the next sync"
            );
            Ok(ExitCode::from(code))
        }
    }
}

/// Live mode: prints the replica, then every event, as JSON lines, until interrupted, or until
/// the gateway refuses the client (exit status 5).
async fn subscribe(b: ClientBuilder) -> anyhow::Result<ExitCode> {
    let mut events = b.events();
    let client = b.open().await?;
    let collections: Vec<String> = client
        .status()
        .await?
        .subscriptions
        .into_iter()
        .map(|s| s.collection)
        .collect();
    if collections.is_empty() {
        client.close().await;
        return Err(usage(
            "nothing to subscribe: name a COLLECTION or pass --sub",
        ));
    }
    for c in &collections {
        for d in client.query(c, &Body::new()).await? {
            println!(
                "{}",
                serde_json::json!({"event": "doc", "collection": c, "id": d.id,
                    "version": d.version, "pending": d.pending, "body": body_to_json(&d.body)})
            );
        }
    }
    loop {
        let e = tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            e = events.recv() => e,
        };
        let line = match e {
            Ok(Event::RemoteChange {
                collection,
                id,
                version,
                body,
            }) => serde_json::json!({"event": "change", "collection": collection, "id": id,
                "version": version, "op": if body.is_some() { "upsert" } else { "delete" },
                "body": body.as_ref().map(body_to_json)}),
            Ok(Event::Synced { collection, cursor }) => {
                serde_json::json!({"event": "synced", "collection": collection, "seq": cursor.seq})
            }
            Ok(Event::Connection(ConnectionState::Stopped { code, reason })) => {
                println!(
                    "{}",
                    serde_json::json!({"event": "connection", "state": "stopped", "code": code, "reason": reason})
                );
                client.close().await;
                return Err(anyhow::Error::from(ClientError::Refused { code, reason }));
            }
            Ok(Event::Connection(state)) => {
                serde_json::json!({"event": "connection", "state": format!("{state:?}")})
            }
            Ok(Event::Conflict {
                collection,
                id,
                server_version,
                pending_mutations,
            }) => serde_json::json!({"event": "conflict", "collection": collection, "id": id,
                "server_version": server_version, "pending_mutations": pending_mutations}),
            Ok(Event::Uploaded {
                mutation_id,
                version,
            }) => {
                serde_json::json!({"event": "uploaded", "mutation_id": mutation_id, "version": version})
            }
            Ok(Event::ConflictOpened(c)) => serde_json::json!({"event": "conflict_opened",
                "conflict_id": c.id, "collection": c.mine.collection, "id": c.mine.id,
                "mutation_id": c.mine.mutation_id, "server_version": c.server_version,
                "server": c.server_body.as_ref().map(body_to_json),
                "mine": c.mine_body().as_ref().map(body_to_json)}),
            Ok(Event::Rejected {
                mutation,
                code,
                reason,
            }) => serde_json::json!({"event": "rejected", "mutation_id": mutation.mutation_id,
                "collection": mutation.collection, "id": mutation.id, "code": code, "reason": reason}),
            Ok(Event::Resync { collection, reason }) => {
                serde_json::json!({"event": "resync", "collection": collection, "reason": reason})
            }
            Ok(Event::ServerError {
                code,
                name,
                message,
            }) => {
                serde_json::json!({"event": "server_error", "code": code, "name": name, "message": message})
            }
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                serde_json::json!({"event": "lagged", "missed_events": n})
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
        };
        println!("{line}");
    }
    client.close().await;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("m").is_err());
    }

    #[test]
    fn sub_specs() {
        let (c, f) = parse_sub("work_orders:plant=p1,line=2").unwrap();
        assert_eq!(c, "work_orders");
        assert_eq!(f.len(), 2);
        assert_eq!(f["line"], syncgate_protocol::Value::from(2u64));
        assert!(parse_sub("machines").unwrap().1.is_empty());
        assert!(parse_sub("x:novalue").is_err());
    }
}
