//! The `syncgate` binary as a new operator meets it: where things are at startup, tokens only
//! from an existing secret, partial config tables, no secrets in `check-config`, a database
//! that cannot be reached named with its cause within seconds.

use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};

use super::*;
use syncgate_client::Connection;
use syncgate_gateway::Config;

/// Longer than any of these commands may take; a command still running then has hung.
const PROMPT: Duration = Duration::from_secs(45);

/// The `syncgate` binary with `args`, isolated from the caller's `SYNCGATE_*` settings, its
/// stdout and stderr piped.
pub fn command(args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_syncgate"));
    cmd.args(args)
        .env_remove("SYNCGATE_CONFIG")
        .env_remove("SYNCGATE_JWT_SECRET")
        .env_remove("SYNCGATE_DATA_DIR")
        .env_remove("SYNCGATE_DATABASE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// Runs a command of the binary to its end (within [`PROMPT`]).
async fn syncgate(args: &[&str]) -> Output {
    let child = command(args).spawn().unwrap();
    tokio::time::timeout(PROMPT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("`syncgate {}` did not finish in time", args.join(" ")))
        .unwrap()
}

/// Starts a gateway on port 0 with `args` before the command (stopped by `kill`).
fn serve(args: &[&str]) -> tokio::process::Child {
    let mut all = args.to_vec();
    all.extend([
        "--listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "serve",
    ]);
    command(&all).spawn().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_never_creates_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_s = data.to_str().unwrap();
    let out = syncgate(&["--data-dir", data_s, "token", "--user", "alice"]).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = text(&out.stderr);
    assert!(err.contains("no token secret"), "{err}");
    assert!(err.contains("jwt_secret"), "says where it looked: {err}");
    assert!(err.contains("--data-dir"), "says how to point it: {err}");
    assert_eq!(err.lines().count(), 1, "one line, each cause once: {err}");
    assert!(!data.exists(), "token must not create the data directory");
    // Its help shows what matters to it, not the listeners or the database.
    let help = text(&syncgate(&["token", "--help"]).await.stdout);
    assert!(
        help.contains("--user") && help.contains("--data-dir"),
        "{help}"
    );
    assert!(
        !help.contains("--listen") && !help.contains("--database"),
        "{help}"
    );
    // With the gateway's secret it signs, and the gateway accepts the token.
    let out = syncgate(&["--jwt-secret", SECRET, "token", "--user", "alice"]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let db = TestDb::new(Backend::Sqlite).await;
    let gw = Gateway::start(db.config()).await.unwrap();
    let tok = text(&out.stdout).trim().to_owned();
    Connection::connect(&ws_url(&gw), "cli-token", &tok)
        .await
        .expect("the minted token is accepted");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_tables_load_and_check_config_hides_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("syncgate.toml");
    std::fs::write(
        &file,
        "database = \"postgres://erp:hunter2@db.example:5432/erp\"\n\
         [auth]\njwt_secret = \"very-secret-signing-key\"\n\
         [limits]\nmax_depth = 16\n\
         [collections.orders]\n",
    )
    .unwrap();
    let out = syncgate(&["--config", file.to_str().unwrap(), "check-config"]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let shown = text(&out.stdout);
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(!shown.contains("very-secret-signing-key"), "{shown}");
    assert!(shown.contains("erp:***@db.example"), "{shown}");
    assert!(shown.contains("max_depth = 16"), "{shown}");
    assert!(
        shown.contains("max_mutations_per_batch = 1000"),
        "defaulted: {shown}"
    );
    // A typo inside a table is still an error that names it.
    std::fs::write(&file, "[limits]\nmax_dept = 16\n").unwrap();
    let out = syncgate(&["--config", file.to_str().unwrap(), "check-config"]).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(text(&out.stderr).contains("max_dept"), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_is_named_with_its_cause() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("syncgate.toml");
    std::fs::write(&file, "database_startup_wait_ms = 0\n").unwrap();
    let url = format!("postgres://nobody:pw@127.0.0.1:{port}/x");
    let out = syncgate(&[
        "--config",
        file.to_str().unwrap(),
        "--database",
        &url,
        "migrate",
    ])
    .await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = text(&out.stderr).to_lowercase();
    assert!(err.contains("connection refused"), "{err}");
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    assert!(!err.contains(":pw@"), "password hidden: {err}");

    // With the default wait the gateway keeps retrying, and says why at once.
    let mut child = serve(&[
        "--database",
        &url,
        "--data-dir",
        dir.path().to_str().unwrap(),
    ]);
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let end = Instant::now() + PROMPT;
    loop {
        let line = tokio::time::timeout(end - Instant::now(), lines.next_line())
            .await
            .expect("a retry line naming the cause")
            .unwrap()
            .expect("the gateway keeps retrying");
        if line.contains("retrying") {
            assert!(line.to_lowercase().contains("connection refused"), "{line}");
            break;
        }
    }
    child.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_says_where_things_are_and_how_to_mint_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut child = serve(&["--data-dir", data.to_str().unwrap()]);
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    let end = Instant::now() + PROMPT;
    while !seen.iter().any(|l: &String| l.contains("mint a token")) {
        let line = tokio::time::timeout(end - Instant::now(), lines.next_line())
            .await
            .expect("startup lines")
            .unwrap()
            .expect("more startup lines");
        seen.push(line);
    }
    let all = seen.join("\n");
    assert!(
        seen[0].starts_with("syncgate listening: ws://127.0.0.1:"),
        "{all}"
    );
    assert!(
        all.contains("data directory:") && all.contains("syncgate.db"),
        "{all}"
    );
    assert!(all.contains("(generated now)"), "{all}");
    let ws = seen[0].split_whitespace().nth(2).unwrap().to_owned();
    // The printed command works as printed.
    let cmd = seen
        .last()
        .unwrap()
        .split("mint a token:")
        .nth(1)
        .unwrap()
        .trim();
    let args: Vec<String> = cmd
        .split_whitespace()
        .skip(1)
        .map(|a| {
            if a == "NAME" {
                "bob".into()
            } else {
                a.to_owned()
            }
        })
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = syncgate(&args).await;
    assert_eq!(out.status.code(), Some(0), "{cmd}: {out:?}");
    let tok = text(&out.stdout).trim().to_owned();
    Connection::connect(&ws, "cli-serve", &tok)
        .await
        .expect("the token minted as printed is accepted");
    child.kill().await.unwrap();
}

/// The lines an operator needs, as structured JSON at `info`: a refused handshake (without the
/// token), a session established, a rejected mutation, a connection closed with its reason and
/// duration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_tells_an_operator_what_happened() {
    let dir = tempfile::tempdir().unwrap();
    // RUST_LOG=info whatever the caller's environment says.
    let mut cmd = command(&[
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--jwt-secret",
        SECRET,
        "--listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--log-json",
        "serve",
    ]);
    let mut child = cmd.env("RUST_LOG", "info").spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(PROMPT, out.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    tokio::spawn(async move { while let Ok(Some(_)) = out.next_line().await {} });
    let ws = first.split_whitespace().nth(2).unwrap().to_owned();
    let forged = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJtYWxsb3J5In0.c2VjcmV0LXRva2VuLXZhbHVl";
    assert!(Connection::connect(&ws, "intruder", forged).await.is_err());
    let (mut c, _) = Connection::connect(&ws, "terminal-7", &token("alice"))
        .await
        .unwrap();
    let ack = push(
        &mut c,
        1,
        vec![patch(1, "machines", "nope", body(&[("a", Value::from(1))]))],
    )
    .await;
    assert_eq!(ack.results[0].status, MutationStatus::Rejected);
    c.close().await;

    let mut err = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen: Vec<serde_json::Value> = Vec::new();
    let wanted = [
        "handshake refused",
        "session established",
        "mutation rejected",
    ];
    let end = Instant::now() + PROMPT;
    let has = |seen: &[serde_json::Value], m: &str| {
        seen.iter().any(|l| {
            l["fields"]["message"]
                .as_str()
                .is_some_and(|s| s.starts_with(m))
        })
    };
    let terminal_closed = |seen: &[serde_json::Value]| {
        seen.iter().any(|l| {
            l["fields"]["message"] == "connection closed"
                && l["fields"]["client_id"] == "terminal-7"
        })
    };
    while !(wanted.iter().all(|m| has(&seen, m)) && terminal_closed(&seen)) {
        let line = tokio::time::timeout(end - Instant::now(), err.next_line())
            .await
            .expect("the expected log lines")
            .unwrap()
            .expect("more log lines");
        assert!(!line.contains(forged), "a token in the log: {line}");
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
            seen.push(v);
        }
    }
    let find = |m: &str| {
        seen.iter()
            .find(|l| {
                l["fields"]["message"]
                    .as_str()
                    .is_some_and(|s| s.starts_with(m))
            })
            .unwrap()
            .clone()
    };
    let refused = find("handshake refused");
    assert_eq!(refused["level"], "INFO");
    assert_eq!(refused["fields"]["code"], 200);
    let rejected = find("mutation rejected");
    assert_eq!(rejected["fields"]["client_id"], "terminal-7");
    assert_eq!(rejected["fields"]["code"], 405);
    let closed = seen
        .iter()
        .find(|l| {
            l["fields"]["message"] == "connection closed"
                && l["fields"]["client_id"] == "terminal-7"
        })
        .expect("the terminal's close line");
    assert_eq!(closed["fields"]["reason"], "closed by the client");
    assert!(closed["fields"]["duration_ms"].is_u64(), "{closed}");
    child.kill().await.unwrap();
}

/// `syncgate admin clients reassign` hands an installation to another user: the new owner
/// connects with its horizon, the previous one is refused; an unknown client id is an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_reassigns_a_client_id() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let unknown = syncgate(&[
        "--data-dir",
        data,
        "admin",
        "clients",
        "reassign",
        "term-9",
        "--user",
        "bob",
    ])
    .await;
    assert!(!unknown.status.success());
    assert!(
        text(&unknown.stderr).contains("never connected"),
        "{}",
        text(&unknown.stderr)
    );
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_owned(),
        auth: syncgate_gateway::config::AuthConfig {
            jwt_secret: SECRET.into(),
            ..Default::default()
        },
        ..Config::default()
    };
    let gw = Gateway::start(config.clone()).await.unwrap();
    let (mut alice, _) = Connection::connect(&ws_url(&gw), "term-9", &token("alice"))
        .await
        .unwrap();
    push(
        &mut alice,
        1,
        vec![put(1, "work_orders", "wo-1", body(&[]))],
    )
    .await;
    drop(alice);
    gw.shutdown().await;
    let out = syncgate(&[
        "--data-dir",
        data,
        "--jwt-secret",
        SECRET,
        "admin",
        "clients",
        "reassign",
        "term-9",
        "--user",
        "bob",
    ])
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains(r#""alice" -> "bob""#),
        "{}",
        text(&out.stdout)
    );
    let gw = Gateway::start(config).await.unwrap();
    let (_bob, welcome) = Connection::connect(&ws_url(&gw), "term-9", &token("bob"))
        .await
        .unwrap();
    assert_eq!(
        welcome.last_applied_mutation, 1,
        "the horizon went with the installation"
    );
    match Connection::connect(&ws_url(&gw), "term-9", &token("alice")).await {
        Err(syncgate_client::ConnError::Server(e)) => {
            assert_eq!(e.code, ErrorCode::ClientIdTaken.code(), "{e:?}")
        }
        other => panic!("alice must be refused: {:?}", other.map(|_| ())),
    }
    gw.shutdown().await;
}

/// A `syncgate serve` process with `args`: its WebSocket URL and HTTP address (from its first
/// line). Everything else it prints is drained (a full pipe would stall the gateway) and
/// shown as the test's output.
pub async fn spawn_gateway(args: &[&str]) -> (tokio::process::Child, String, String) {
    let mut child = serve(args);
    let mut err = BufReader::new(child.stderr.take().unwrap()).lines();
    tokio::spawn(async move {
        while let Ok(Some(line)) = err.next_line().await {
            eprintln!("gateway: {line}");
        }
    });
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(PROMPT, out.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    tokio::spawn(async move {
        while let Ok(Some(line)) = out.next_line().await {
            eprintln!("gateway: {line}");
        }
    });
    let mut words = first.split_whitespace();
    let ws = words.nth(2).unwrap().to_owned();
    let http = words
        .nth(1)
        .unwrap()
        .trim_start_matches("http://")
        .to_owned();
    (child, ws, http)
}

/// Resident memory of a process, in bytes (Linux).
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib * 1024
}

/// The value of a metric (summed over its label sets) from a gateway's `/metrics`.
async fn metric(http: &str, name: &str) -> f64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(http).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    // The series of exactly `name` (all its labels, or the ones `name` gives), not of every
    // metric whose name starts with it (`syncgate_connections_opened_total`).
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(key, _)| {
            key.strip_prefix(name)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('{'))
        })
        .filter_map(|(_, v)| v.parse::<f64>().ok())
        .sum()
}

/// Invariant 8 against a hostile client: subscriptions that never read, over large documents,
/// from a snapshot and from a catch-up out of the database, hold at most one page of about the
/// outbound cap each — not the whole collection — and the memory comes back when they close.
/// (Before pages were cut by bytes, each of these held all 48 documents: over 600 MB here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_that_never_read_hold_one_page_each() {
    const DOCS: usize = 48;
    const DOC_BYTES: usize = 200 * 1024;
    const CONNECTIONS: usize = 64;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let (mut child, ws, http) = spawn_gateway(&["--data-dir", data, "--jwt-secret", SECRET]).await;
    let pid = child.id().unwrap();
    let (mut writer, welcome) = Connection::connect(&ws, "writer", &token("w"))
        .await
        .unwrap();
    let big = |i: usize| {
        body(&[
            ("n", Value::from(i as i64)),
            ("text", Value::from("x".repeat(DOC_BYTES))),
        ])
    };
    for (batch, ids) in (0..DOCS).collect::<Vec<_>>().chunks(4).enumerate() {
        let mutations = ids
            .iter()
            .map(|i| put(*i as u64 + 1, "stock", &format!("f-{i:03}"), big(*i)))
            .collect();
        push(&mut writer, batch as u64 + 1, mutations).await;
    }
    let baseline = rss_bytes(pid);
    // Connections that never read, one subscription each: half start from a snapshot, half
    // catch up from seq 0 (the in-memory tail does not reach back that far for documents this
    // large, so it is read from the database).
    let mut hogs = Vec::new();
    for c in 0..CONNECTIONS {
        let (mut hog, _) = Connection::connect(&ws, &format!("hog-{c}"), &token("hog"))
            .await
            .unwrap();
        let cursor = (c % 2 == 1).then(|| Cursor {
            epoch: welcome.epoch.clone(),
            seq: 0,
        });
        hog.send(&Frame::Subscribe(Subscribe {
            sub: 1,
            collection: "stock".into(),
            filter: Body::new(),
            cursor,
        }))
        .await
        .unwrap();
        hogs.push(hog);
    }
    // Every subscription has read its first page from the database.
    let want = (CONNECTIONS / 2) as f64;
    let end = Instant::now() + PROMPT;
    while metric(&http, "syncgate_snapshot_pages_total").await < want
        || metric(&http, "syncgate_catch_up_pages_total{source=\"database\"}").await < want
    {
        assert!(Instant::now() < end, "the subscriptions did not start");
        tokio::task::yield_now().await;
    }
    let held = rss_bytes(pid).saturating_sub(baseline);
    assert!(
        held < 300 << 20,
        "{} MiB held by {CONNECTIONS} subscriptions that never read",
        held >> 20
    );
    // The connections go away: the memory is released.
    drop(hogs);
    let end = Instant::now() + PROMPT;
    while metric(&http, "syncgate_connections").await > 1.0 {
        assert!(Instant::now() < end, "the connections were not closed");
        tokio::task::yield_now().await;
    }
    assert_eq!(
        metric(&http, "syncgate_outbound_queue_bytes").await,
        0.0,
        "nothing stays queued for connections that are gone"
    );
    while rss_bytes(pid) > baseline + (200 << 20) {
        assert!(
            Instant::now() < end,
            "RSS stayed at {} MiB after the connections closed (baseline {} MiB)",
            rss_bytes(pid) >> 20,
            baseline >> 20
        );
        tokio::task::yield_now().await;
    }
    child.kill().await.unwrap();
}

/// 5,000 connections that never finish the handshake — half never send the WebSocket upgrade,
/// half never send `hello` — are all closed by the handshake timeout, twice over, and nothing
/// of them stays behind: the second 5,000 do not grow the gateway's memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_never_say_hello_are_closed() {
    use tokio::io::AsyncReadExt;
    const EACH: usize = 2_500;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("syncgate.toml");
    // Long enough that all 5,000 of a round are open at once however busy the machine is:
    // with a shorter timeout, how many were alive together (and so the allocator's high-water
    // mark) depended on how fast this test could open them, and the rounds differed by that.
    std::fs::write(&config, "handshake_timeout_ms = 5000\n").unwrap();
    let (mut child, ws, _http) = spawn_gateway(&[
        "--config",
        config.to_str().unwrap(),
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--jwt-secret",
        SECRET,
    ])
    .await;
    let pid = child.id().unwrap();
    let addr = ws.trim_start_matches("ws://").to_owned();
    // A session works before, so the baseline includes a warmed-up gateway.
    drop(Connection::connect(&ws, "warm", &token("w")).await.unwrap());
    let baseline = rss_bytes(pid);
    let mut after = Vec::new();
    for _round in 0..2 {
        let mut waits = tokio::task::JoinSet::new();
        for _ in 0..EACH {
            // No upgrade: the TCP connection is closed by the gateway.
            let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
            waits.spawn(async move {
                let mut buf = [0u8; 64];
                while tcp.read(&mut buf).await.is_ok_and(|n| n > 0) {}
            });
            // Upgraded, but no hello: a fatal handshake_required, then the close.
            let mut c = syncgate_client::Connection::open(&ws).await.unwrap();
            waits.spawn(async move { while c.recv().await.is_ok() {} });
        }
        let end = Instant::now() + PROMPT;
        while !waits.is_empty() {
            tokio::time::timeout(
                end.saturating_duration_since(Instant::now()),
                waits.join_next(),
            )
            .await
            .expect("every silent connection is closed by the handshake timeout");
        }
        after.push(rss_bytes(pid));
    }
    // What the first 5,000 left behind is the allocator's and runtime's reusable memory (about
    // 20 MiB measured), not a leak: the next 5,000 reuse it instead of adding to it.
    let (first, second) = (after[0], after[1]);
    assert!(
        first < baseline + (96 << 20),
        "{} MiB after 5,000 silent connections (baseline {} MiB)",
        first >> 20,
        baseline >> 20
    );
    assert!(
        second < first + (16 << 20),
        "RSS grew from {} to {} MiB with the second 5,000: memory is kept per connection",
        first >> 20,
        second >> 20
    );
    child.kill().await.unwrap();
}

/// `syncgate token --claim` puts claims into the token (for roles and row scopes), JSON values
/// as JSON and anything else as text; the registered claims are not overridable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_claims_are_carried() {
    use base64::Engine;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let out = syncgate(&[
        "--data-dir",
        data,
        "--jwt-secret",
        SECRET,
        "token",
        "--user",
        "op-7",
        "--claim",
        "plant=p1",
        "--claim",
        r#"roles=["planner","operator"]"#,
        "--claim",
        "level=3",
    ])
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let token = text(&out.stdout).trim().to_owned();
    let payload = token.split('.').nth(1).unwrap();
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["sub"], "op-7");
    assert_eq!(claims["plant"], "p1");
    assert_eq!(claims["roles"], serde_json::json!(["planner", "operator"]));
    assert_eq!(claims["level"], 3);
    let id = syncgate_gateway::auth::Authenticator::new(SECRET.as_bytes())
        .verify(&token)
        .unwrap();
    assert_eq!(id.claims["plant"], "p1");
    let refused = syncgate(&[
        "--data-dir",
        data,
        "--jwt-secret",
        SECRET,
        "token",
        "--user",
        "op",
        "--claim",
        "exp=1",
    ])
    .await;
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("--claim exp"),
        "{}",
        text(&refused.stderr)
    );
}

/// `syncgate admin api-keys`: `create` prints the key once (stdout) and how to use it
/// (stderr), `list` never shows it, `revoke` takes a name, and an unknown key is an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_keys_create_list_revoke() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let created = syncgate(&[
        "--data-dir",
        data,
        "admin",
        "api-keys",
        "create",
        "--name",
        "erp",
        "--role",
        "planner",
        "--claim",
        "plant=A",
    ])
    .await;
    assert!(created.status.success(), "{}", text(&created.stderr));
    let key = text(&created.stdout).trim().to_owned();
    assert!(key.starts_with("sgk_"), "{key}");
    assert!(text(&created.stderr).contains("shown only now"));
    let listed = syncgate(&["--data-dir", data, "admin", "api-keys", "list", "--json"]).await;
    assert!(listed.status.success(), "{}", text(&listed.stderr));
    let list: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(list[0]["name"], "erp");
    assert_eq!(list[0]["roles"], serde_json::json!(["planner"]));
    assert_eq!(list[0]["claims"], serde_json::json!({"plant": "A"}));
    assert!(list[0]["revoked_at_ms"].is_null());
    let secret = key.rsplit_once('_').unwrap().1;
    assert!(!text(&listed.stdout).contains(secret));
    let revoked = syncgate(&["--data-dir", data, "admin", "api-keys", "revoke", "erp"]).await;
    assert!(revoked.status.success(), "{}", text(&revoked.stderr));
    let table = syncgate(&["--data-dir", data, "admin", "api-keys", "list"]).await;
    assert!(
        text(&table.stdout).contains("revoked at"),
        "{}",
        text(&table.stdout)
    );
    let unknown = syncgate(&["--data-dir", data, "admin", "api-keys", "revoke", "nope"]).await;
    assert!(!unknown.status.success());
    assert!(
        text(&unknown.stderr).contains("no API key"),
        "{}",
        text(&unknown.stderr)
    );
    let bad = syncgate(&[
        "--data-dir",
        data,
        "admin",
        "api-keys",
        "create",
        "--name",
        "a b",
    ])
    .await;
    assert!(!bad.status.success());
}

/// `admin sync-errors` lists what the gateway rejected — code, reason and the whole mutation
/// as JSON — while the gateway runs, filtered by client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_sync_errors_lists_rejections_with_the_whole_mutation() {
    let db = TestDb::new(Backend::Sqlite).await;
    let config = db.config();
    let gw = Gateway::start(config.clone()).await.unwrap();
    let (mut c, _) = connect(&gw, "terminal-9").await;
    let ack = push(
        &mut c,
        1,
        vec![
            put(
                1,
                "work_orders",
                "wo-1",
                body(&[
                    ("plant", Value::from("A")),
                    ("machine", Value::from("M-404")),
                ]),
            ),
            put(2, "stock", "s-1", body(&[("qty", Value::from(3))])),
            patch(3, "stock", "nope", body(&[("qty", Value::from(1))])),
        ],
    )
    .await;
    let codes: Vec<_> = ack.results.iter().map(|r| r.code).collect();
    assert_eq!(codes, [Some(412), None, Some(405)]);
    let (mut other, _) = connect(&gw, "terminal-10").await;
    let ack = push(
        &mut other,
        1,
        vec![patch(
            1,
            "stock",
            "never-was",
            body(&[("qty", Value::from(1))]),
        )],
    )
    .await;
    assert_eq!(ack.results[0].code, Some(405));
    let data = config.data_dir.to_str().unwrap();
    let out = syncgate(&[
        "--data-dir",
        data,
        "admin",
        "sync-errors",
        "--client",
        "terminal-9",
        "--json",
    ])
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2, "{list:?}");
    assert_eq!(list[0]["mutation_id"], 1);
    assert_eq!(list[0]["code"], 412);
    assert!(
        list[0]["reason"]
            .as_str()
            .unwrap()
            .contains("machines/M-404")
    );
    assert_eq!(list[0]["mutation"]["collection"], "work_orders");
    assert_eq!(list[0]["mutation"]["body"]["machine"], "M-404");
    assert_eq!(list[1]["code"], 405);
    assert_eq!(list[0]["state"], "open");
    let table = syncgate(&["--data-dir", data, "admin", "sync-errors"]).await;
    assert!(table.status.success(), "{}", text(&table.stderr));
    let table = text(&table.stdout);
    assert!(table.contains("dangling_reference"), "{table}");
    assert!(table.contains("terminal-10"), "{table}");
    // Discarding one: it stays stored, marked, and leaves the open ones.
    let admin = |args: &'static [&'static str]| {
        let mut all = vec!["--data-dir", data, "admin", "sync-errors"];
        all.extend_from_slice(args);
        async move { syncgate(&all).await }
    };
    let out = admin(&["discard", "terminal-9", "1"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = admin(&["--open", "--json"]).await;
    let open: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut open: Vec<_> = open
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["client_id"].as_str().unwrap().to_owned(),
                e["mutation_id"].as_u64().unwrap(),
            )
        })
        .collect();
    // Sorted: the two clients' rows may carry the same millisecond.
    open.sort();
    assert_eq!(
        open,
        [("terminal-10".to_owned(), 1), ("terminal-9".to_owned(), 3)]
    );
    let out = admin(&["--client", "terminal-9", "--json"]).await;
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(all[0]["state"], "discarded");
    // Retrying the dangling reference: rejected again until the machine exists, then
    // applied once however often it is run.
    let out = admin(&["retry", "terminal-9", "1"]).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("rejected again: dangling_reference"),
        "{}",
        text(&out.stderr)
    );
    push(&mut c, 2, vec![put(4, "machines", "M-404", body(&[]))]).await;
    let out = admin(&["retry", "terminal-9", "1"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(said.contains("applied at version"), "{said}");
    let again = admin(&["retry", "terminal-9", "1"]).await;
    assert_eq!(
        text(&again.stdout),
        said,
        "the same answer, nothing applied twice"
    );
    assert!(server_docs(&gw, "work_orders").await.contains_key("wo-1"));
    // A huge limit is a limit, not a crash.
    let out = admin(&["--limit", "18446744073709551615"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = admin(&["discard", "terminal-9", "2"]).await;
    assert!(
        !out.status.success(),
        "mutation 2 was applied, not rejected"
    );
    assert!(
        text(&out.stderr).contains("no sync error"),
        "{}",
        text(&out.stderr)
    );
    gw.shutdown().await;
}

/// `syncgate admin conflicts`: a terminal's stale stock count becomes an open `manual`
/// conflict and a stale machine edit an audited overwrite; the command lists both (JSON with
/// both bodies and origins, or a table), filters by collection and by open, and shows the
/// conflict resolved once a mutation names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_conflicts_lists_the_audit() {
    let db = TestDb::new(Backend::Sqlite).await;
    let config = db.config();
    let gw = Gateway::start(config.clone()).await.unwrap();
    let (mut erp, _) = connect(&gw, "erp").await;
    let (mut term, _) = connect(&gw, "terminal-7").await;
    let seeded = push(
        &mut erp,
        1,
        vec![
            put(1, "stock", "s-1", body(&[("qty", Value::from(10))])),
            put(2, "machines", "M1", body(&[("speed", Value::from(1))])),
        ],
    )
    .await;
    let base: Vec<u64> = seeded.results.iter().map(|r| r.version.unwrap()).collect();
    let mut erp_edit = vec![
        patch(3, "stock", "s-1", body(&[("qty", Value::from(8))])),
        patch(4, "machines", "M1", body(&[("speed", Value::from(2))])),
    ];
    let mut stale = vec![
        patch(1, "stock", "s-1", body(&[("qty", Value::from(12))])),
        patch(2, "machines", "M1", body(&[("speed", Value::from(3))])),
    ];
    for (m, b) in erp_edit
        .iter_mut()
        .chain(stale.iter_mut())
        .zip(base.iter().cycle())
    {
        m.base_version = Some(*b);
    }
    push(&mut erp, 2, erp_edit).await;
    let ack = push(&mut term, 1, stale).await;
    assert_eq!(ack.results[0].code, Some(413));
    assert_eq!(ack.results[1].status, MutationStatus::Applied);
    let data = config.data_dir.to_str().unwrap();
    let admin = |args: &'static [&'static str]| {
        let mut all = vec!["--data-dir", data, "admin", "conflicts"];
        all.extend_from_slice(args);
        async move { syncgate(&all).await }
    };
    let out = admin(&["--json"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let all = all.as_array().unwrap();
    assert_eq!(all.len(), 2, "{all:?}");
    let stock = all.iter().find(|c| c["collection"] == "stock").unwrap();
    assert_eq!(stock["id"], "1@terminal-7");
    assert_eq!(stock["policy"], "manual");
    assert_eq!(
        (&stock["outcome"], &stock["state"]),
        (&"open".into(), &"open".into())
    );
    assert_eq!(stock["server_body"]["qty"], 8);
    assert_eq!(stock["client_body"]["qty"], 12);
    assert_eq!(stock["other_clients"][0], "erp");
    assert_eq!(stock["base_version"], base[0]);
    let machine = all.iter().find(|c| c["collection"] == "machines").unwrap();
    // Both changed `speed`: field_merge takes the later commit's and audits the overwrite.
    assert_eq!(
        (&machine["policy"], &machine["outcome"]),
        (&"field_merge".into(), &"overwrote".into())
    );
    assert_eq!(machine["applied_version"], ack.results[1].version.unwrap());
    let out = admin(&["--collection", "machines", "--json"]).await;
    let only: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(only.as_array().unwrap().len(), 1);
    let table = admin(&["--open"]).await;
    assert!(table.status.success(), "{}", text(&table.stderr));
    let table = text(&table.stdout);
    assert!(
        table.contains("1@terminal-7") && table.contains("stock/s-1"),
        "{table}"
    );
    assert!(!table.contains("machines/M1"), "{table}");
    // The terminal resolves it: the open list empties, the record stays, resolved.
    let mut resolution = put(3, "stock", "s-1", body(&[("qty", Value::from(11))]));
    resolution.resolves = Some("1@terminal-7".into());
    let ack = push(&mut term, 2, vec![resolution]).await;
    assert_eq!(ack.results[0].status, MutationStatus::Applied);
    let out = admin(&["--open", "--json"]).await;
    assert_eq!(text(&out.stdout).trim(), "[]");
    let out = admin(&["--collection", "stock", "--json"]).await;
    let stock: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stock[0]["state"], "resolved");
    assert_eq!(stock[0]["resolved_by"], "3@terminal-7");
    // A second conflict, resolved by an operator from the command line.
    let version = server_docs(&gw, "stock").await["s-1"].1;
    let mut erp_count = patch(5, "stock", "s-1", body(&[("qty", Value::from(20))]));
    erp_count.base_version = Some(version);
    push(&mut erp, 3, vec![erp_count]).await;
    let mut stale = patch(4, "stock", "s-1", body(&[("qty", Value::from(30))]));
    stale.base_version = Some(version);
    let ack = push(&mut term, 3, vec![stale]).await;
    let id = ack.results[0]
        .conflict
        .as_ref()
        .and_then(|c| c.id.clone())
        .unwrap();
    assert_eq!(id, "4@terminal-7");
    let resolve = |take: &'static str| {
        let id = id.clone();
        async move {
            syncgate(&[
                "--data-dir",
                data,
                "admin",
                "conflicts",
                "resolve",
                &id,
                "--take",
                take,
            ])
            .await
        }
    };
    let out = resolve("{\"qty\": 25, \"note\": \"counted twice\"}").await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(said.starts_with("resolved: written at version"), "{said}");
    // The same command again is a replay: the same answer, nothing written twice.
    let again = resolve("{\"qty\": 25, \"note\": \"counted twice\"}").await;
    assert_eq!(text(&again.stdout), said);
    let (doc, _) = server_docs(&gw, "stock").await["s-1"].clone();
    assert_eq!(doc["qty"], Value::from(25));
    assert_eq!(
        gw.store
            .document_history("stock", "s-1", 100)
            .await
            .unwrap()
            .len(),
        5
    );
    // Another choice once it is resolved: says who did it; an unknown id fails.
    let other = resolve("server").await;
    assert!(
        text(&other.stdout).starts_with("already resolved by 1@resolve-"),
        "{}",
        text(&other.stdout)
    );
    let unknown = syncgate(&[
        "--data-dir",
        data,
        "admin",
        "conflicts",
        "resolve",
        "9@nobody",
        "--take",
        "mine",
    ])
    .await;
    assert!(!unknown.status.success());
    assert!(
        text(&unknown.stderr).contains("no conflict"),
        "{}",
        text(&unknown.stderr)
    );
    let out = admin(&["--open", "--json"]).await;
    assert_eq!(text(&out.stdout).trim(), "[]");
    gw.shutdown().await;
}

/// The client's command line, `syncgate-client`, next to this package's binary (built first if
/// this test runs without the client package's own targets).
fn client_binary() -> std::path::PathBuf {
    let gateway = std::path::Path::new(env!("CARGO_BIN_EXE_syncgate"));
    let client = gateway.with_file_name(format!("syncgate-client{}", std::env::consts::EXE_SUFFIX));
    if !client.exists() {
        let release = gateway
            .parent()
            .and_then(|p| p.file_name())
            .is_some_and(|n| n == "release");
        let mut build = std::process::Command::new(env!("CARGO"));
        build.args(["build", "-p", "syncgate-client", "--bin", "syncgate-client"]);
        if release {
            build.arg("--release");
        }
        assert!(
            build.status().unwrap().success(),
            "building syncgate-client"
        );
    }
    client
}

/// Runs `syncgate-client` on `dir` against `gw` as the user `operator`.
async fn client_cli(gw: &Gateway, dir: &std::path::Path, args: &[&str]) -> Output {
    let child = tokio::process::Command::new(client_binary())
        .args(["--url", &ws_url(gw), "--data-dir"])
        .arg(dir)
        .args(args)
        .env("SYNCGATE_TOKEN", token("operator"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::time::timeout(PROMPT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "`syncgate-client {}` did not finish in time",
                args.join(" ")
            )
        })
        .unwrap()
}

/// The conflict scenarios of the sample config as a person types them, with both binaries: a
/// terminal edits offline (`--no-upload`) while the ERP changes the same documents; `sync
/// --once` reports the refused edits (exit 3); `get` shows what each policy kept; `rejected`
/// lists the dangling reference; `conflicts` shows the `manual` one with both versions, and
/// `syncgate admin conflicts` and `admin sync-errors` see the same on the server; `resolve
/// --take mine` settles it and the ERP downloads the result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicts_from_both_command_lines() {
    let db = TestDb::new(Backend::Sqlite).await;
    let config = db.config();
    let gw = Gateway::start(config.clone()).await.unwrap();
    let (erp, term) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ok = |o: &Output| assert!(o.status.success(), "{}", text(&o.stderr));
    let body_of = |o: &Output| -> serde_json::Value {
        ok(o);
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["body"].clone()
    };
    for (c, id, b) in [
        ("machines", "M1", r#"{"name": "press", "speed": 10}"#),
        (
            "work_orders",
            "wo-1",
            r#"{"status": "open", "machine": "M1", "qty": 5}"#,
        ),
        ("stock", "s-1", r#"{"qty": 10}"#),
    ] {
        ok(&client_cli(&gw, erp.path(), &["put", c, id, b]).await);
    }
    let subs = [
        "--sub",
        "machines",
        "--sub",
        "work_orders",
        "--sub",
        "stock",
    ];
    let mut first = subs.to_vec();
    first.extend(["sync", "--once"]);
    ok(&client_cli(&gw, term.path(), &first).await);
    for (verb, c, id, b) in [
        (
            "patch",
            "work_orders",
            "wo-1",
            r#"{"status": "completed", "qty": 6}"#,
        ),
        ("patch", "machines", "M1", r#"{"name": "press 2"}"#),
        ("patch", "stock", "s-1", r#"{"qty": 12}"#),
        (
            "put",
            "work_orders",
            "wo-2",
            r#"{"status": "open", "machine": "M-404"}"#,
        ),
    ] {
        ok(&client_cli(&gw, term.path(), &[verb, c, id, b, "--no-upload"]).await);
    }
    for (c, id, b) in [
        ("work_orders", "wo-1", r#"{"status": "cancelled"}"#),
        ("machines", "M1", r#"{"speed": 20}"#),
        ("stock", "s-1", r#"{"qty": 8}"#),
    ] {
        ok(&client_cli(&gw, erp.path(), &["patch", c, id, b]).await);
    }
    let sync = client_cli(&gw, term.path(), &["sync", "--once"]).await;
    assert_eq!(sync.status.code(), Some(3), "{}", text(&sync.stderr));
    let said = text(&sync.stderr);
    assert!(
        said.contains("conflict ") && said.contains("--take server|mine|JSON"),
        "{said}"
    );
    assert!(said.contains("412"), "{said}");
    let get = |c: &'static str, id: &'static str| {
        let dir = term.path().to_owned();
        let gw = &gw;
        async move { client_cli(gw, &dir, &["get", c, id]).await }
    };
    assert_eq!(
        body_of(&get("work_orders", "wo-1").await),
        serde_json::json!({"status": "cancelled", "machine": "M1", "qty": 6})
    );
    assert_eq!(
        body_of(&get("machines", "M1").await),
        serde_json::json!({"name": "press 2", "speed": 20})
    );
    assert_eq!(
        body_of(&get("stock", "s-1").await),
        serde_json::json!({"qty": 8})
    );
    let rejected = client_cli(&gw, term.path(), &["rejected"]).await;
    ok(&rejected);
    assert!(
        text(&rejected.stdout).contains("\"code\":412"),
        "{}",
        text(&rejected.stdout)
    );
    let listed = client_cli(&gw, term.path(), &["conflicts"]).await;
    ok(&listed);
    let conflict: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(conflict["server"], serde_json::json!({"qty": 8}));
    assert_eq!(conflict["mine_result"], serde_json::json!({"qty": 12}));
    let id = conflict["id"].as_str().unwrap().to_owned();
    let data = config.data_dir.to_str().unwrap();
    let admin = syncgate(&["--data-dir", data, "admin", "conflicts", "--open", "--json"]).await;
    ok(&admin);
    let open: serde_json::Value = serde_json::from_slice(&admin.stdout).unwrap();
    assert_eq!(open[0]["id"], id.as_str());
    let errors = syncgate(&["--data-dir", data, "admin", "sync-errors", "--json"]).await;
    ok(&errors);
    let errors: serde_json::Value = serde_json::from_slice(&errors.stdout).unwrap();
    assert_eq!(errors[0]["code"], 412);
    assert_eq!(errors[0]["mutation"]["id"], "wo-2");
    ok(&client_cli(&gw, term.path(), &["resolve", &id, "--take", "mine"]).await);
    let listed = client_cli(&gw, term.path(), &["conflicts"]).await;
    assert_eq!(text(&listed.stdout), "");
    let mut down = subs.to_vec();
    down.extend(["sync", "--once"]);
    ok(&client_cli(&gw, erp.path(), &down).await);
    let erp_stock = client_cli(&gw, erp.path(), &["get", "stock", "s-1"]).await;
    assert_eq!(body_of(&erp_stock), serde_json::json!({"qty": 12}));
    let admin = syncgate(&["--data-dir", data, "admin", "conflicts", "--open", "--json"]).await;
    assert_eq!(text(&admin.stdout).trim(), "[]");
    gw.shutdown().await;
}

/// `syncgate admin history COLLECTION ID`: every retained change of a document, oldest first,
/// with version, time, origin, operation and body (JSON or lines); `--limit` keeps the
/// newest; a document without changes is an error that says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_history_shows_every_change_of_a_document() {
    let db = TestDb::new(Backend::Sqlite).await;
    let config = db.config();
    let gw = Gateway::start(config.clone()).await.unwrap();
    let (mut a, _) = connect(&gw, "terminal-1").await;
    let (mut b, _) = connect(&gw, "erp-2").await;
    push(
        &mut a,
        1,
        vec![put(1, "stock", "s-1", body(&[("qty", Value::from(3))]))],
    )
    .await;
    push(
        &mut b,
        1,
        vec![patch(1, "stock", "s-1", body(&[("qty", Value::from(4))]))],
    )
    .await;
    push(&mut a, 2, vec![delete(2, "stock", "s-1")]).await;
    push(
        &mut b,
        2,
        vec![put(2, "stock", "s-1", body(&[("qty", Value::from(9))]))],
    )
    .await;
    let data = config.data_dir.to_str().unwrap();
    let out = syncgate(&[
        "--data-dir",
        data,
        "admin",
        "history",
        "stock",
        "s-1",
        "--json",
    ])
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let history: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows: Vec<(String, String, u64)> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            assert!(h["committed_at_ms"].as_u64().unwrap() > 0);
            (
                h["op"].as_str().unwrap().to_owned(),
                h["origin_client"].as_str().unwrap().to_owned(),
                h["origin_mutation"].as_u64().unwrap(),
            )
        })
        .collect();
    let expected = [
        ("upsert", "terminal-1", 1),
        ("upsert", "erp-2", 1),
        ("delete", "terminal-1", 2),
        ("upsert", "erp-2", 2),
    ]
    .map(|(op, c, m)| (op.to_owned(), c.to_owned(), m));
    assert_eq!(rows, expected);
    assert_eq!(history[1]["body"]["qty"], 4);
    assert!(history[2]["body"].is_null());
    let versions: Vec<u64> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["version"].as_u64().unwrap())
        .collect();
    assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");
    let out = syncgate(&[
        "--data-dir",
        data,
        "admin",
        "history",
        "stock",
        "s-1",
        "--limit",
        "2",
    ])
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines = text(&out.stdout);
    assert_eq!(
        lines.lines().count(),
        3,
        "a header and the newest two: {lines}"
    );
    assert!(
        lines.contains("delete") && lines.contains("erp-2:2"),
        "{lines}"
    );
    assert!(!lines.contains("terminal-1:1"), "{lines}");
    let out = syncgate(&["--data-dir", data, "admin", "history", "stock", "nope"]).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("stock/nope has no retained change"),
        "{}",
        text(&out.stderr)
    );
    gw.shutdown().await;
}
