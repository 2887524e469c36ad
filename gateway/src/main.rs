//! The `syncgate` binary: `serve`, `migrate`, `token`, `check-config`, `admin`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use syncgate_gateway::auth::{Authenticator, SecretSource, load_secret};
use syncgate_gateway::config::redact_url;
use syncgate_gateway::server::{
    ApiKeyRequest, ConflictTake, Resolution, Retried, capture_attach, capture_detach, compact,
    create_api_key, discard_sync_error, document_history, list_api_keys, list_captures,
    list_conflicts, list_sync_errors, migrate, reassign_client, resolve_conflict, retry_sync_error,
    revoke_api_key, status,
};
use syncgate_gateway::{Config, Gateway};

/// mimalloc instead of glibc's malloc: under ingest load glibc spent a third of the gateway's
/// CPU in `_int_malloc`, `free` and `malloc_consolidate` once the catch-up tail kept recent
/// changes alive (perf profile in BENCHMARKS.md, P5).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "syncgate", version, about = "WebSocket real-time sync gateway")]
struct Cli {
    /// TOML config file. Without one, built-in defaults apply (see deploy/syncgate.toml).
    #[arg(long, short, global = true, env = "SYNCGATE_CONFIG")]
    config: Option<PathBuf>,
    /// WebSocket listen address (default 127.0.0.1:7420).
    #[arg(long, env = "SYNCGATE_LISTEN")]
    listen: Option<std::net::SocketAddr>,
    /// HTTP listen address for /healthz, /readyz, /metrics (default 127.0.0.1:7421).
    #[arg(long, env = "SYNCGATE_HTTP_LISTEN")]
    http_listen: Option<std::net::SocketAddr>,
    /// Database URL: sqlite://PATH or postgres://USER@HOST/DB (default sqlite in the data dir).
    #[arg(long, env = "SYNCGATE_DATABASE")]
    database: Option<String>,
    /// Data directory (SQLite file, generated JWT secret). Default ./data.
    #[arg(long, global = true, env = "SYNCGATE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// HS256 secret for client tokens (default: generated into the data dir).
    #[arg(
        long,
        global = true,
        env = "SYNCGATE_JWT_SECRET",
        hide_env_values = true
    )]
    jwt_secret: Option<String>,
    /// Log as JSON lines.
    #[arg(long, env = "SYNCGATE_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve WebSocket clients (the default command).
    Serve,
    /// Run database migrations and exit.
    Migrate,
    /// Print a client token for a user, signed with the secret of the gateway that will
    /// verify it: `auth.jwt_secret` (--jwt-secret, SYNCGATE_JWT_SECRET, --config) or
    /// `<data dir>/jwt_secret` (--data-dir). Never creates a secret.
    Token {
        /// The user the token names (its `sub` claim).
        #[arg(long)]
        user: String,
        /// Validity in seconds.
        #[arg(long, default_value_t = 30 * 24 * 3600)]
        ttl: u64,
        /// Another claim, KEY=VALUE (repeatable): `plant=p1`, `roles=["planner"]`. VALUE is
        /// read as JSON when it parses as JSON (a number, list, true ...), else as a string.
        #[arg(long = "claim", value_name = "KEY=VALUE", value_parser = parse_claim)]
        claims: Vec<(String, serde_json::Value)>,
    },
    /// Validate the configuration, print the effective config as TOML and exit.
    CheckConfig,
    /// Ask the gateway on this host (`http_listen`, an unspecified address meaning loopback)
    /// whether it is alive (`/healthz`) or ready (`--ready`: `/readyz`); exit 0 if so, 1 if
    /// not. For container health checks in images without curl.
    Health {
        /// Check readiness (database reachable, not draining) instead of liveness.
        #[arg(long)]
        ready: bool,
        /// Seconds to wait for the answer.
        #[arg(long, default_value_t = 3)]
        timeout: u64,
    },
    /// Administration of the database (the gateway may keep running).
    Admin {
        #[command(subcommand)]
        command: Admin,
    },
    /// Capture of existing PostgreSQL tables: every INSERT, UPDATE and DELETE on an attached
    /// table, by any SQL client, becomes a change of a collection in the same transaction.
    Capture {
        #[command(subcommand)]
        command: CaptureCommand,
    },
}

#[derive(Subcommand)]
enum CaptureCommand {
    /// Attach a table to a declared collection: install the trigger and copy every row in
    /// (the collection then mirrors the table; clients' writes to it are refused with
    /// captured_collection, 416).
    Attach {
        /// The table (`schema.table`, or a name on the search path).
        #[arg(long)]
        table: String,
        /// The declared collection its rows become documents of.
        #[arg(long)]
        collection: String,
        /// The column whose value (as text) is the document id.
        #[arg(long)]
        key: String,
    },
    /// Detach a table: drop the trigger; the collection keeps its documents and clients may
    /// write it again.
    Detach {
        /// The table.
        #[arg(long)]
        table: String,
    },
    /// List the attached tables.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum Admin {
    /// Client installations (client ids).
    Clients {
        #[command(subcommand)]
        command: AdminClients,
    },
    /// API keys for backend services (WebSocket `hello`, and the HTTP API).
    ApiKeys {
        #[command(subcommand)]
        command: AdminApiKeys,
    },
    /// List stored sync errors (rejected mutations, each with its code, reason, state and the
    /// whole mutation), oldest first; `discard` marks one as dealt with. Uses the database the
    /// gateway uses; works while it runs.
    SyncErrors {
        #[command(subcommand)]
        command: Option<AdminSyncErrors>,
        /// Only this client's.
        #[arg(long)]
        client: Option<String>,
        /// Only those not discarded.
        #[arg(long)]
        open: bool,
        /// At most this many.
        #[arg(long, default_value_t = 1000)]
        limit: u64,
        /// Print JSON (one array) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Compact the change log now: move each collection's horizon by its `retain_secs` /
    /// `retain_changes` and remove the superseded versions and tombstones behind it (the
    /// background compaction does the same every `compaction_interval_secs`). Clients whose
    /// cursor is older than the new horizon download the collection again. Uses the database
    /// the gateway uses; works while it runs, in small transactions.
    Compact {
        /// Only this collection.
        #[arg(long)]
        collection: Option<String>,
        /// Count what would be removed; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON (one array) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// What the database holds: the log head and epoch, client installations, open sync
    /// errors, and per collection the live and deleted documents, the compaction horizon,
    /// open conflicts and the captured table. Uses the database the gateway uses; works while
    /// it runs.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Every retained change of one document, oldest first: version, time, origin (client
    /// and mutation), operation, body. Uses the database the gateway uses; works while it
    /// runs.
    History {
        /// The collection.
        collection: String,
        /// The document id.
        id: String,
        /// At most the newest this many.
        #[arg(long, default_value_t = 1000)]
        limit: u64,
        /// Print JSON (one array) instead of one line per change.
        #[arg(long)]
        json: bool,
    },
    /// List the conflict audit, oldest first: every decision of a conflict policy that
    /// overwrote or refused a concurrent change (collection, id, policy, outcome, base and
    /// server versions, both bodies, both origins, time), and the `manual` conflicts with
    /// their state. Uses the database the gateway uses; works while it runs.
    Conflicts {
        #[command(subcommand)]
        command: Option<AdminConflicts>,
        /// Only this collection's.
        #[arg(long)]
        collection: Option<String>,
        /// Only open `manual` conflicts (waiting for a resolution).
        #[arg(long)]
        open: bool,
        /// At most this many.
        #[arg(long, default_value_t = 1000)]
        limit: u64,
        /// Print JSON (one array, with both bodies) instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum AdminConflicts {
    /// Resolve an open `manual` conflict as an operator: keep the server's current document
    /// (`--take server`), write the refused edit's document (`--take mine`), or write a
    /// document of your own (`--take '{"qty": 11}'`). Applied through the same group commit as
    /// a client's resolution, exactly once however often it is run.
    Resolve {
        /// The conflict's id (`<mutation_id>@<client_id>`, from `syncgate admin conflicts`).
        id: String,
        /// `server`, `mine`, or a JSON document.
        #[arg(long)]
        take: String,
    },
}

#[derive(Subcommand)]
enum AdminSyncErrors {
    /// Push the rejected mutation again (after the data was fixed), through the same checks
    /// as a client's push but with an operator's rights, exactly once however often it is
    /// run; applied, it is marked `retried`.
    Retry {
        /// The client that pushed the mutation.
        client_id: String,
        /// The mutation's id.
        mutation_id: u64,
    },
    /// Mark a sync error as dealt with (the data was fixed, or the edit is not wanted): it
    /// stays stored, as `discarded`, and no longer shows with `--open`.
    Discard {
        /// The client that pushed the mutation.
        client_id: String,
        /// The mutation's id.
        mutation_id: u64,
    },
}

#[derive(Subcommand)]
enum AdminApiKeys {
    /// Create a key and print it once (only a hash of its secret is stored).
    Create {
        /// Unique name: which service holds it.
        #[arg(long)]
        name: String,
        /// The user its sessions act as (owns their client ids); default: the name. Give
        /// a rotated key the same user so it keeps the service's installations.
        #[arg(long, default_value = "")]
        user: String,
        /// A role it grants (repeatable).
        #[arg(long = "role", value_name = "ROLE")]
        roles: Vec<String>,
        /// A claim for row scopes, KEY=VALUE (repeatable), as with `syncgate token`.
        #[arg(long = "claim", value_name = "KEY=VALUE", value_parser = parse_claim)]
        claims: Vec<(String, serde_json::Value)>,
    },
    /// List keys (id, name, user, roles, claims, created, revoked); never a secret.
    List {
        /// Print JSON (one array) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by id or name: it opens no further session.
    Revoke {
        /// The key's id or name.
        key: String,
    },
}

#[derive(Subcommand)]
enum AdminClients {
    /// The clients connected to each node given (its HTTP listener, `GET /admin/clients` with
    /// the admin key): client id, user, agent, subscriptions with their lag behind the
    /// node's published head, outbound bytes, connected since, last push, applied mutation.
    List {
        /// A node's HTTP address (HOST:PORT), repeatable; default: this config's `http_listen`.
        #[arg(long = "node")]
        nodes: Vec<String>,
        /// The nodes' `auth.admin_key` (default: this config's).
        #[arg(long, env = "SYNCGATE_ADMIN_KEY", hide_env_values = true)]
        admin_key: Option<String>,
        /// Print JSON (one object per node) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Give a client id to another user: the installation was handed over. Its exactly-once
    /// record (horizon, stored outcomes) goes with it; the previous user is refused with
    /// `client_id_taken` from their next connection.
    Reassign {
        /// The client id.
        client_id: String,
        /// The user (token `sub`) that owns it from now on.
        #[arg(long)]
        user: String,
    },
}

impl Cli {
    fn effective_config(&self) -> anyhow::Result<Config> {
        let mut c = match &self.config {
            Some(p) => Config::from_file(p)?,
            None => Config::default(),
        };
        if let Some(v) = self.listen {
            c.listen = v;
        }
        if let Some(v) = self.http_listen {
            c.http_listen = v;
        }
        if let Some(v) = &self.database {
            c.database = v.clone();
        }
        if let Some(v) = &self.data_dir {
            c.data_dir = v.clone();
        }
        if let Some(v) = &self.jwt_secret {
            c.auth.jwt_secret = v.clone();
        }
        c.validate()?;
        Ok(c)
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_json);
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Each cause once, on one line: "what failed: why".
            eprintln!("syncgate: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = cli.effective_config()?;
    match cli.command.as_ref().unwrap_or(&Command::Serve) {
        Command::Serve => {
            // Every client is one file descriptor: lift the soft limit to the hard one.
            match rlimit::increase_nofile_limit(u64::MAX) {
                Ok(n) => tracing::info!(nofile = n, "open-file limit"),
                Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
            }
            let data_dir =
                std::path::absolute(&config.data_dir).unwrap_or_else(|_| config.data_dir.clone());
            let database = redact_url(&config.database_url());
            let (ws, http) = if config.tls.cert_file.as_os_str().is_empty() {
                ("ws", "http")
            } else {
                ("wss", "https")
            };
            let gw = Gateway::start(config).await?;
            // The first line is machine-read (the load harness takes the addresses from it).
            println!(
                "syncgate listening: {ws}://{} (WebSocket), {http}://{} (/healthz /readyz /metrics)",
                gw.ws_addr, gw.http_addr
            );
            println!("  data directory: {}", data_dir.display());
            println!("  database:       {database}");
            let secret = match &gw.secret_source {
                SecretSource::Configured => "configured (auth.jwt_secret)".to_owned(),
                SecretSource::File(p) => format!("{}", p.display()),
                SecretSource::Generated(p) => format!("{} (generated now)", p.display()),
            };
            println!("  token secret:   {secret}");
            let dir_flag = match &gw.secret_source {
                SecretSource::Configured => String::new(),
                _ => format!(" --data-dir {}", data_dir.display()),
            };
            println!(
                "  mint a token:   syncgate{dir_flag} token --user NAME{}",
                if cli.config.is_some() {
                    " --config FILE"
                } else {
                    ""
                }
            );
            tokio::select! {
                r = tokio::signal::ctrl_c() => { r.context("waiting for ctrl-c")?; }
                _ = terminate() => {}
            }
            tracing::info!("shutting down: draining connections");
            gw.shutdown().await;
        }
        Command::Migrate => {
            if config.database_url().starts_with("sqlite:") {
                std::fs::create_dir_all(&config.data_dir).with_context(|| {
                    format!("creating data directory {}", config.data_dir.display())
                })?;
            }
            let epoch = migrate(&config).await?;
            println!("migrations applied; epoch {epoch}");
        }
        Command::Capture { command } => match command {
            CaptureCommand::Attach {
                table,
                collection,
                key,
            } => {
                let a = capture_attach(&config, table, collection, key).await?;
                println!(
                    "attached {} to {collection:?} (key {key}): {} rows copied, {} documents \
                     that were not rows deleted",
                    a.table, a.rows, a.removed
                );
            }
            CaptureCommand::Detach { table } => match capture_detach(&config, table).await? {
                Some(c) => println!("detached {} from {:?}", c.table, c.collection),
                None => anyhow::bail!("{table} is not attached"),
            },
            CaptureCommand::List { json } => {
                let captures = list_captures(&config).await?;
                if *json {
                    println!("{}", serde_json::to_string_pretty(&captures)?);
                } else {
                    println!("TABLE                          COLLECTION            KEY");
                    for c in captures {
                        println!("{:<30} {:<21} {}", c.table, c.collection, c.key);
                    }
                }
            }
        },
        Command::Token { user, ttl, claims } => {
            let Some((secret, _)) = load_secret(&config.auth.jwt_secret, &config.data_dir)? else {
                let path = std::path::absolute(config.data_dir.join("jwt_secret"))
                    .unwrap_or_else(|_| config.data_dir.join("jwt_secret"));
                anyhow::bail!(
                    "no token secret: auth.jwt_secret is not set and {} does not exist. A token \
                     must be signed with the secret of the gateway that will verify it: pass \
                     that gateway's --data-dir (or --config FILE, or SYNCGATE_JWT_SECRET). Only \
                     `syncgate serve` creates a secret",
                    path.display()
                );
            };
            let mut token = syncgate_gateway::auth::Claims::new(user, *ttl);
            for (k, v) in claims {
                if matches!(k.as_str(), "sub" | "exp" | "iat" | "nbf" | "iss" | "aud") {
                    anyhow::bail!(
                        "--claim {k}: set by syncgate token itself (use --user, --ttl or the config)"
                    );
                }
                token.extra.insert(k.clone(), v.clone());
            }
            println!(
                "{}",
                Authenticator::with_config(&secret, &config.auth).mint_claims(token)?
            );
        }
        Command::CheckConfig => {
            print!("{}", config.to_redacted_toml()?);
        }
        Command::Health { ready, timeout } => {
            if !config.tls.cert_file.as_os_str().is_empty() {
                anyhow::bail!(
                    "the HTTP listener uses TLS: probe https://{}/healthz with an HTTPS client",
                    config.http_listen
                );
            }
            let path = if *ready { "/readyz" } else { "/healthz" };
            let (status, text) = probe_http(
                config.http_listen,
                path,
                &[],
                std::time::Duration::from_secs(*timeout),
            )
            .with_context(|| format!("asking {} for {path}", config.http_listen))?;
            println!("{status} {}", text.trim());
            if status != 200 {
                std::process::exit(1);
            }
        }
        Command::Admin {
            command:
                Admin::Clients {
                    command: AdminClients::Reassign { client_id, user },
                },
        } => match reassign_client(&config, client_id, user).await? {
            Some(previous) => println!("client {client_id:?}: {previous:?} -> {user:?}"),
            None => anyhow::bail!(
                "client {client_id:?} has never connected; it belongs to whoever uses it first"
            ),
        },
        Command::Admin {
            command:
                Admin::Clients {
                    command:
                        AdminClients::List {
                            nodes,
                            admin_key,
                            json,
                        },
                },
        } => {
            let key = admin_key.clone().unwrap_or(config.auth.admin_key.clone());
            if key.is_empty() {
                anyhow::bail!(
                    "no admin key: --admin-key, SYNCGATE_ADMIN_KEY or auth.admin_key in --config"
                );
            }
            let nodes = if nodes.is_empty() {
                vec![config.http_listen.to_string()]
            } else {
                nodes.clone()
            };
            let mut all = Vec::new();
            for node in &nodes {
                let addr = tokio::net::lookup_host(node.as_str())
                    .await
                    .with_context(|| format!("resolving {node}"))?
                    .next()
                    .with_context(|| format!("{node} has no address"))?;
                let auth = format!("Authorization: Bearer {key}");
                let (status, text) = probe_http(
                    addr,
                    "/admin/clients",
                    &[auth.as_str()],
                    std::time::Duration::from_secs(10),
                )
                .with_context(|| format!("asking {node} for /admin/clients"))?;
                if status != 200 {
                    anyhow::bail!("{node}: HTTP {status}: {}", text.trim());
                }
                let mut v: serde_json::Value =
                    serde_json::from_str(&text).with_context(|| format!("{node}: not JSON"))?;
                if let Some(o) = v.as_object_mut() {
                    o.insert("node".into(), node.clone().into());
                }
                all.push(v);
            }
            if *json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                print_clients(&all);
            }
        }
        Command::Admin {
            command: Admin::ApiKeys { command },
        } => api_keys(&config, command).await?,
        Command::Admin {
            command:
                Admin::SyncErrors {
                    command:
                        Some(AdminSyncErrors::Discard {
                            client_id,
                            mutation_id,
                        }),
                    ..
                },
        } => {
            if !discard_sync_error(&config, client_id, *mutation_id).await? {
                anyhow::bail!(
                    "no sync error of client {client_id:?} has mutation id {mutation_id}"
                );
            }
            println!("sync error {client_id}/{mutation_id} discarded");
        }
        Command::Admin {
            command:
                Admin::SyncErrors {
                    command:
                        Some(AdminSyncErrors::Retry {
                            client_id,
                            mutation_id,
                        }),
                    ..
                },
        } => match retry_sync_error(&config, client_id, *mutation_id).await? {
            Retried::Applied { version } => {
                println!(
                    "sync error {client_id}/{mutation_id} retried: applied at version {version}"
                );
            }
            Retried::Rejected { code, reason } => {
                let name = syncgate_protocol::ErrorCode::from_code(code).map_or("?", |c| c.name());
                anyhow::bail!("retried and rejected again: {name} ({code}): {reason}");
            }
            Retried::NotFound => {
                anyhow::bail!("no sync error of client {client_id:?} has mutation id {mutation_id}")
            }
        },
        Command::Admin {
            command:
                Admin::SyncErrors {
                    command: None,
                    client,
                    open,
                    limit,
                    json,
                },
        } => {
            let errors = list_sync_errors(&config, client.as_deref(), *open, *limit).await?;
            print_sync_errors(&errors, *json)?;
        }
        Command::Admin {
            command:
                Admin::Compact {
                    collection,
                    dry_run,
                    json,
                },
        } => {
            let reports = compact(&config, collection.as_deref(), *dry_run).await?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&reports)?);
            } else {
                if *dry_run {
                    println!("dry run: nothing was removed");
                }
                println!(
                    "COLLECTION            HORIZON (WAS)          SUPERSEDED  TOMBSTONES  DELETED DOCS"
                );
                for r in reports {
                    println!(
                        "{:<20}  {:>10} ({:>10})  {:>10}  {:>10}  {:>12}",
                        r.collection,
                        r.horizon,
                        r.previous_horizon,
                        r.superseded,
                        r.tombstones,
                        r.deleted_documents
                    );
                }
            }
        }
        Command::Admin {
            command: Admin::Status { json },
        } => {
            let s = status(&config).await?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!("head {}   epoch {}", s.head, s.epoch);
                println!(
                    "clients {}   sync errors open {}",
                    s.clients, s.sync_errors_open
                );
                println!(
                    "COLLECTION            DOCUMENTS     DELETED     HORIZON  CONFLICTS OPEN  CAPTURED FROM"
                );
                for (name, c) in &s.collections {
                    println!(
                        "{:<20}  {:>9}  {:>10}  {:>10}  {:>14}  {}",
                        name,
                        c.documents,
                        c.deleted,
                        c.horizon,
                        c.conflicts_open,
                        c.captured_from.as_deref().unwrap_or("-")
                    );
                }
            }
        }
        Command::Admin {
            command:
                Admin::History {
                    collection,
                    id,
                    limit,
                    json,
                },
        } => {
            let history = document_history(&config, collection, id, *limit).await?;
            if history.is_empty() {
                anyhow::bail!("{collection}/{id} has no retained change");
            }
            if *json {
                println!("{}", serde_json::to_string_pretty(&history)?);
            } else {
                println!(
                    "VERSION  COMMITTED (UNIX MS)  OP      ORIGIN                        BODY"
                );
                for h in history {
                    let origin = format!(
                        "{}:{}",
                        h.origin_client.as_deref().unwrap_or("-"),
                        h.origin_mutation.map_or("-".to_owned(), |m| m.to_string())
                    );
                    let body = h.body.as_ref().map_or("null".to_owned(), |b| {
                        serde_json::to_string(b).unwrap_or_default()
                    });
                    println!(
                        "{:>7}  {:>19}  {:<6}  {origin:<29} {body}",
                        h.version, h.committed_at_ms, h.op
                    );
                }
            }
        }
        Command::Admin {
            command:
                Admin::Conflicts {
                    command: Some(AdminConflicts::Resolve { id, take }),
                    ..
                },
        } => {
            let take = match take.as_str() {
                "server" => ConflictTake::Server,
                "mine" => ConflictTake::Mine,
                json => ConflictTake::Body(
                    serde_json::from_str(json)
                        .with_context(|| "--take is server, mine or a JSON object".to_owned())?,
                ),
            };
            match resolve_conflict(&config, id, take).await? {
                Resolution::Applied { version } => {
                    println!("resolved: written at version {version}")
                }
                Resolution::AlreadyResolved { by, version } => {
                    println!("already resolved by {by} at version {version}")
                }
                Resolution::Rejected { code, reason } => {
                    let name =
                        syncgate_protocol::ErrorCode::from_code(code).map_or("?", |c| c.name());
                    anyhow::bail!("the resolution was rejected: {name} ({code}): {reason}");
                }
                Resolution::NotFound => {
                    anyhow::bail!("no conflict {id:?} (see `syncgate admin conflicts`)")
                }
                Resolution::NotManual => {
                    anyhow::bail!("conflict {id:?} was decided by its policy; nothing to resolve")
                }
            }
        }
        Command::Admin {
            command:
                Admin::Conflicts {
                    command: None,
                    collection,
                    open,
                    limit,
                    json,
                },
        } => {
            let conflicts = list_conflicts(&config, collection.as_deref(), *open, *limit).await?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&conflicts)?);
            } else {
                println!(
                    "ID                        COLLECTION/ID                  POLICY            \
                     OUTCOME      STATE     BASE  SERVER  APPLIED  OTHERS"
                );
                for c in conflicts {
                    let doc = format!("{}/{}", c.collection, c.doc_id);
                    let applied = c
                        .applied_version
                        .or(c.resolved_version)
                        .map_or("-".to_owned(), |v| v.to_string());
                    println!(
                        "{:<25} {doc:<30} {:<17} {:<12} {:<8} {:>5} {:>7} {applied:>8}  {}",
                        c.id,
                        c.policy,
                        c.outcome,
                        c.state,
                        c.base_version,
                        c.server_version,
                        c.other_clients.join(",")
                    );
                }
            }
        }
    }
    Ok(())
}

fn print_sync_errors(
    errors: &[syncgate_gateway::server::SyncError],
    json: bool,
) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(errors)?);
        return Ok(());
    }
    println!("CLIENT               MUTATION  CODE  COLLECTION/ID                  REASON");
    for e in errors {
        let name = syncgate_protocol::ErrorCode::from_code(e.code).map_or("?", |c| c.name());
        let doc = format!("{}/{}", e.mutation.collection, e.mutation.id);
        println!(
            "{:<20} {:>8}  {:>4}  {:<9}  {doc:<30} {name}: {}",
            e.client_id, e.mutation_id, e.code, e.state, e.reason
        );
    }
    Ok(())
}

async fn api_keys(config: &Config, command: &AdminApiKeys) -> anyhow::Result<()> {
    if config.database_url().starts_with("sqlite:") {
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
    }
    match command {
        AdminApiKeys::Create {
            name,
            user,
            roles,
            claims,
        } => {
            let (key, stored) = create_api_key(
                config,
                ApiKeyRequest {
                    name: name.clone(),
                    user: user.clone(),
                    roles: roles.clone(),
                    claims: claims.iter().cloned().collect(),
                },
            )
            .await?;
            println!("{key}");
            eprintln!(
                "API key {:?} (id {}) created for user {:?}. It is shown only now: store it \
                 in the service's secret store. Use it as the `token` of hello.",
                stored.name, stored.id, stored.user
            );
        }
        AdminApiKeys::List { json } => {
            let keys = list_api_keys(config).await?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&keys)?);
            } else {
                println!(
                    "ID                NAME                 USER                 ROLES / CLAIMS                 STATE"
                );
                for k in keys {
                    let grants = format!(
                        "{} {}",
                        serde_json::to_string(&k.roles)?,
                        serde_json::to_string(&k.claims)?
                    );
                    let state = match k.revoked_at_ms {
                        Some(ms) => format!("revoked at {ms} ms"),
                        None => "active".to_owned(),
                    };
                    println!(
                        "{:<17} {:<20} {:<20} {grants:<30} {state}",
                        k.id, k.name, k.user
                    );
                }
            }
        }
        AdminApiKeys::Revoke { key } => match revoke_api_key(config, key).await? {
            Some(k) => println!("API key {:?} (id {}) is revoked", k.name, k.id),
            None => anyhow::bail!("no API key has the id or name {key:?}"),
        },
    }
    Ok(())
}

/// The table of `syncgate admin clients list`: one line per session.
fn print_clients(nodes: &[serde_json::Value]) {
    println!(
        "NODE                   CLIENT                USER          SUBS  MAX LAG  OUTBOUND  APPLIED  LAST PUSH (ms ago)  AGENT"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    for n in nodes {
        let node = n["node"].as_str().unwrap_or_default();
        for c in n["clients"].as_array().into_iter().flatten() {
            let subs = c["subscriptions"].as_array().map_or(0, Vec::len);
            let max_lag = c["subscriptions"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s["lag"].as_u64())
                .max()
                .unwrap_or(0);
            let last = c["last_push_at_ms"].as_u64().unwrap_or(0);
            let ago = if last == 0 {
                "-".to_owned()
            } else {
                now.saturating_sub(last).to_string()
            };
            println!(
                "{:<22} {:<21} {:<13} {:>4} {:>8} {:>9} {:>8} {:>19}  {}",
                node,
                c["client_id"].as_str().unwrap_or_default(),
                c["user"].as_str().unwrap_or_default(),
                subs,
                max_lag,
                c["outbound_bytes"].as_u64().unwrap_or(0),
                c["applied_mutation"].as_u64().unwrap_or(0),
                ago,
                c["agent"].as_str().unwrap_or_default()
            );
        }
    }
}

/// `GET path` on this host's HTTP listener (an unspecified address means loopback): the
/// status and the body.
fn probe_http(
    mut addr: std::net::SocketAddr,
    path: &str,
    headers: &[&str],
    timeout: std::time::Duration,
) -> anyhow::Result<(u16, String)> {
    use std::io::{Read, Write};
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{extra}\r\n"
    )?;
    let mut raw = Vec::new();
    s.take(64 * 1024).read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let status = text
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .context("not an HTTP answer")?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok((status, body.to_owned()))
}

async fn terminate() {
    #[cfg(unix)]
    {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
            return;
        }
    }
    std::future::pending::<()>().await
}

/// `KEY=VALUE` of `syncgate token --claim`.
fn parse_claim(s: &str) -> Result<(String, serde_json::Value), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    if k.is_empty() {
        return Err(format!("{s:?} has an empty key"));
    }
    let value = serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::from(v));
    Ok((k.to_owned(), value))
}

fn init_tracing(json: bool) {
    use tracing_subscriber::Layer;
    use tracing_subscriber::filter::FilterExt;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx::postgres::notice=warn"));
    // The level filter first: the rate limit counts only lines that would be written.
    let filter = filter.and(syncgate_gateway::DependencyLogLimit);
    let lines = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    if json {
        tracing_subscriber::registry()
            .with(lines.json().with_filter(filter))
            .init();
    } else {
        tracing_subscriber::registry()
            .with(lines.with_filter(filter))
            .init();
    }
}
