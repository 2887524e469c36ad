//! Child processes of the harness (`--workers N`), so that the simulated clients do not
//! compete with the writers (or with one another) for one process's cores and file
//! descriptors. The parent starts each worker as this binary with the run's common options, its
//! share of the source addresses and its scenario's arguments; a worker prints `READY` once its
//! clients are set up, may wait for `GO` on its standard input, and ends by printing its report
//! (JSON) on its standard output, which the parent merges.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout};

use crate::common::{Target, left};

/// The environment variable that hands a worker its parent's timeline clock (milliseconds
/// since it started), so that their latency timelines merge second by second.
pub const CLOCK_AGE_ENV: &str = "SYNCGATE_LOADTEST_CLOCK_AGE_MS";

/// What every worker of a run shares.
pub struct Spawn<'a> {
    /// The binary the workers run (default: this executable).
    pub exe: Option<&'a PathBuf>,
    /// Where they connect; each gets every `n`-th source address.
    pub target: &'a Target,
    /// Gateway nodes to deal the workers out to (worker `k` connects to node `k % len`);
    /// empty: every worker connects to `target`'s URL.
    pub nodes: &'a [String],
    /// The collection.
    pub collection: &'a str,
    /// Their deadline.
    pub deadline: Duration,
}

/// Running workers, in order.
pub struct Workers {
    children: Vec<(Child, ChildStdin, BufReader<ChildStdout>)>,
}

/// Worker `k`'s share of `total` among `n`.
pub fn share(total: usize, n: usize, k: usize) -> usize {
    total / n + usize::from(k < total % n)
}

impl Workers {
    /// Starts `n` workers; worker `k` gets `args(k)` after the common options (its scenario,
    /// `--worker` and the scenario's options).
    pub fn spawn(
        s: &Spawn<'_>,
        n: usize,
        args: impl Fn(usize) -> Vec<String>,
    ) -> anyhow::Result<Workers> {
        let exe = match s.exe {
            Some(p) => p.clone(),
            None => std::env::current_exe().context("locating this executable")?,
        };
        let clock_age = crate::stats::start_clock()
            .elapsed()
            .as_millis()
            .to_string();
        let mut children = Vec::with_capacity(n);
        for k in 0..n {
            let url = match s.nodes.len() {
                0 => None,
                len => s.nodes.get(k % len),
            }
            .unwrap_or(&s.target.url);
            let mut cmd = tokio::process::Command::new(&exe);
            cmd.args(["--url", url, "--quiet", "--deadline"])
                .arg(s.deadline.as_secs().max(1).to_string())
                .args(["--collection", s.collection])
                .env("SYNCGATE_TOKEN", &s.target.token)
                .env(CLOCK_AGE_ENV, &clock_age);
            for (i, a) in s.target.sources.iter().enumerate() {
                if i % n == k {
                    cmd.arg("--source").arg(a.to_string());
                }
            }
            cmd.args(args(k))
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .kill_on_drop(true);
            let mut child = cmd.spawn().context("starting a worker")?;
            let stdin = child.stdin.take().context("worker stdin")?;
            let stdout = BufReader::new(child.stdout.take().context("worker stdout")?);
            children.push((child, stdin, stdout));
        }
        Ok(Workers { children })
    }

    /// Waits until every worker has printed `READY`.
    pub async fn ready(&mut self, end: Instant) -> anyhow::Result<()> {
        for (k, (_, _, stdout)) in self.children.iter_mut().enumerate() {
            let mut line = String::new();
            tokio::time::timeout(left(end), stdout.read_line(&mut line))
                .await
                .with_context(|| format!("worker {k} did not get ready in time"))??;
            if line.trim() != "READY" {
                bail!("worker {k} did not get ready: {line:?}");
            }
        }
        Ok(())
    }

    /// Tells every worker to go on.
    pub async fn go(&mut self) -> anyhow::Result<()> {
        for (_, stdin, _) in self.children.iter_mut() {
            stdin.write_all(b"GO\n").await?;
            stdin.flush().await?;
        }
        Ok(())
    }

    /// Each worker's report, in order, or why there is none.
    pub async fn reports(
        self,
        end: Instant,
    ) -> anyhow::Result<Vec<Result<serde_json::Value, String>>> {
        let mut out = Vec::with_capacity(self.children.len());
        for (k, (mut child, _, mut stdout)) in self.children.into_iter().enumerate() {
            let mut text = String::new();
            tokio::time::timeout(left(end), stdout.read_to_string(&mut text))
                .await
                .with_context(|| format!("worker {k} did not finish in time"))??;
            let status = child.wait().await?;
            out.push(
                serde_json::from_str(&text)
                    .map_err(|_| format!("worker {k} ended with {status} and no report")),
            );
        }
        Ok(out)
    }
}

/// A worker's `READY`, on its standard output.
pub fn say_ready() -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "READY")?;
    out.flush()
}

/// A worker waits for its parent's `GO`.
pub async fn wait_for_go() -> anyhow::Result<()> {
    let mut line = String::new();
    BufReader::new(tokio::io::stdin())
        .read_line(&mut line)
        .await?;
    if line.trim() != "GO" {
        bail!("expected GO, got {line:?}");
    }
    Ok(())
}

/// The failures a worker's report lists, prefixed with the worker.
pub fn failures_of(k: usize, report: &serde_json::Value) -> Vec<String> {
    report
        .pointer("/failures")
        .and_then(serde_json::Value::as_array)
        .into_iter()
        .flatten()
        .map(|f| format!("worker {k}: {}", f.as_str().unwrap_or_default()))
        .collect()
}
