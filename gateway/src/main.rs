//! The `syncgate` binary: `serve`, `migrate`, `token`, `check-config`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use syncgate_gateway::auth::{Authenticator, load_or_create_secret};
use syncgate_gateway::storage::Store;
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
    #[arg(long, global = true, env = "SYNCGATE_LISTEN")]
    listen: Option<std::net::SocketAddr>,
    /// HTTP listen address for /healthz, /readyz, /metrics (default 127.0.0.1:7421).
    #[arg(long, global = true, env = "SYNCGATE_HTTP_LISTEN")]
    http_listen: Option<std::net::SocketAddr>,
    /// Database URL: sqlite://PATH or postgres://USER@HOST/DB (default sqlite in the data dir).
    #[arg(long, global = true, env = "SYNCGATE_DATABASE")]
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
    #[arg(long, global = true, env = "SYNCGATE_LOG_JSON")]
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
    /// Print a client token for a user, signed with the configured secret.
    Token {
        /// The user the token names (its `sub` claim).
        #[arg(long)]
        user: String,
        /// Validity in seconds.
        #[arg(long, default_value_t = 30 * 24 * 3600)]
        ttl: u64,
    },
    /// Validate the configuration, print the effective config as TOML and exit.
    CheckConfig,
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
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing(cli.log_json);
    let config = cli.effective_config()?;
    match cli.command.as_ref().unwrap_or(&Command::Serve) {
        Command::Serve => {
            // Every client is one file descriptor: lift the soft limit to the hard one.
            match rlimit::increase_nofile_limit(u64::MAX) {
                Ok(n) => tracing::info!(nofile = n, "open-file limit"),
                Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
            }
            let gw = Gateway::start(config).await?;
            println!(
                "syncgate listening: ws://{} (WebSocket), http://{} (/healthz /readyz /metrics)",
                gw.ws_addr, gw.http_addr
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
                std::fs::create_dir_all(&config.data_dir)?;
            }
            let store = Store::open(&config.database_url(), 2, config.sqlite_synchronous).await?;
            println!("migrations applied; epoch {}", store.epoch());
            store.close().await;
        }
        Command::Token { user, ttl } => {
            let secret = load_or_create_secret(&config.auth.jwt_secret, &config.data_dir)?;
            println!("{}", Authenticator::new(&secret).mint(user, *ttl)?);
        }
        Command::CheckConfig => {
            print!("{}", toml::to_string_pretty(&config)?);
        }
    }
    Ok(())
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

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
