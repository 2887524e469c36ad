//! A gateway process the harness starts itself (`--spawn-gateway PATH`): it mints its token,
//! samples its CPU and RSS, and — for `chaos` — kills it with SIGKILL and starts it again on
//! the same addresses and data.
//!
//! The first start binds port 0 (`--listen 127.0.0.1:0 --http-listen 127.0.0.1:0` are added
//! after the caller's arguments, so they win); the bound addresses are read from the line the
//! gateway prints on stdout, and every restart reuses them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How to start the gateway.
#[derive(Debug, Clone)]
pub struct GatewaySpec {
    /// The `syncgate` binary.
    pub bin: PathBuf,
    /// Arguments before the harness's own (`--data-dir ...`, `--database ...`, `--config ...`).
    pub args: Vec<String>,
    /// Where the gateway's stderr (its log) goes; `None` = inherited.
    pub log: Option<PathBuf>,
}

/// A running gateway process.
pub struct SpawnedGateway {
    spec: GatewaySpec,
    child: Child,
    /// Its WebSocket address.
    pub ws_addr: SocketAddr,
    /// Its HTTP address.
    pub http_addr: SocketAddr,
    /// Times it was started.
    pub starts: u32,
}

impl SpawnedGateway {
    /// Starts the gateway on fresh ports and waits until it serves.
    pub async fn start(spec: GatewaySpec) -> anyhow::Result<SpawnedGateway> {
        let any: SocketAddr = "127.0.0.1:0".parse()?;
        let (child, ws_addr, http_addr) = launch(&spec, any, any).await?;
        Ok(SpawnedGateway {
            spec,
            child,
            ws_addr,
            http_addr,
            starts: 1,
        })
    }

    /// The WebSocket URL.
    pub fn url(&self) -> String {
        format!("ws://{}", self.ws_addr)
    }

    /// The process id (for /proc sampling).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Mints a client token with the gateway's own secret (`syncgate ... token --user`).
    pub async fn mint_token(&self, user: &str) -> anyhow::Result<String> {
        let out = Command::new(&self.spec.bin)
            .args(&self.spec.args)
            .args(["token", "--user", user, "--ttl", "86400"])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .await
            .with_context(|| format!("running {} token", self.spec.bin.display()))?;
        if !out.status.success() {
            bail!("{} token failed: {}", self.spec.bin.display(), out.status);
        }
        Ok(String::from_utf8(out.stdout)?.trim().to_owned())
    }

    /// Its version and effective configuration (`--version`, `check-config`: secrets
    /// redacted), for the report.
    pub async fn describe(&self) -> crate::report::GatewayInfo {
        let run = |extra: &'static [&'static str], with_args: bool| {
            let mut cmd = Command::new(&self.spec.bin);
            if with_args {
                cmd.args(&self.spec.args);
            }
            cmd.args(extra).stdin(Stdio::null()).stderr(Stdio::null());
            async move {
                match cmd.output().await {
                    Ok(o) if o.status.success() => {
                        String::from_utf8_lossy(&o.stdout).trim().to_owned()
                    }
                    Ok(o) => format!("(failed: {})", o.status),
                    Err(e) => format!("(failed: {e})"),
                }
            }
        };
        crate::report::GatewayInfo {
            version: run(&["--version"], false).await,
            args: self.spec.args.clone(),
            config: run(&["check-config"], true).await,
        }
    }

    /// Kills the process with SIGKILL (no drain, nothing flushed) and waits for it to exit.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill().await.context("killing the gateway")
    }

    /// Asks it to drain (SIGTERM) and waits until it has exited (SIGKILL after 30 s); returns
    /// how long the drain took. [`SpawnedGateway::restart`] starts it again.
    pub async fn terminate(&mut self) -> anyhow::Result<Duration> {
        let started = Instant::now();
        if let Some(pid) = self.child.id() {
            Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await
                .context("sending SIGTERM")?;
        }
        if tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .is_err()
        {
            self.child.kill().await.context("killing the gateway")?;
            bail!("the gateway did not drain within 30 s");
        }
        Ok(started.elapsed())
    }

    /// Starts it again on the same addresses and data.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        let (child, ws, http) = launch(&self.spec, self.ws_addr, self.http_addr).await?;
        if ws != self.ws_addr {
            bail!(
                "restarted gateway listens on {ws}, expected {}",
                self.ws_addr
            );
        }
        self.child = child;
        self.http_addr = http;
        self.starts += 1;
        Ok(())
    }

    /// Asks it to drain (SIGTERM) and waits up to 30 s, then kills it.
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
        if tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

async fn launch(
    spec: &GatewaySpec,
    ws: SocketAddr,
    http: SocketAddr,
) -> anyhow::Result<(Child, SocketAddr, SocketAddr)> {
    let stderr = match &spec.log {
        Some(path) => Stdio::from(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?,
        ),
        None => Stdio::inherit(),
    };
    let mut cmd = Command::new(&spec.bin);
    cmd.args(&spec.args)
        .args([
            "--listen",
            &ws.to_string(),
            "--http-listen",
            &http.to_string(),
        ])
        .arg("serve")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .kill_on_drop(true);
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "warn");
    }
    // The port of a gateway killed a moment ago can stay busy briefly: retry the bind for a
    // few seconds, as a supervisor would.
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", spec.bin.display()))?;
        let stdout = child.stdout.take().context("gateway stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let first = tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await;
        match first {
            Ok(Ok(Some(line))) => {
                let (ws, http) = parse_listening(&line)
                    .with_context(|| format!("unexpected first line from the gateway: {line}"))?;
                // Keep draining stdout so the gateway never blocks on a full pipe.
                tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
                return Ok((child, ws, http));
            }
            Ok(Ok(None)) | Ok(Err(_)) => {
                let status = child.wait().await?;
                if Instant::now() >= until {
                    bail!("the gateway exited before serving: {status}");
                }
                tokio::time::sleep(Duration::from_millis(200)).await; // retry pacing
            }
            Err(_) => {
                let _ = child.kill().await;
                bail!("the gateway did not start serving within 60 s");
            }
        }
    }
}

/// Parses `syncgate listening: ws://A (WebSocket), http://B (...)`.
fn parse_listening(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let ws = line.split("ws://").nth(1)?.split_whitespace().next()?;
    let http = line.split("http://").nth(1)?.split_whitespace().next()?;
    Some((ws.parse().ok()?, http.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_gateways_listening_line() {
        let line = "syncgate listening: ws://127.0.0.1:41234 (WebSocket), http://127.0.0.1:41235 (/healthz /readyz /metrics)";
        let (ws, http) = parse_listening(line).unwrap();
        assert_eq!(ws.port(), 41234);
        assert_eq!(http.port(), 41235);
        assert!(parse_listening("something else").is_none());
    }
}
