//! The command line as a new user meets it: refusals that stop at once with their own exit
//! status, offline writes that do not wait, subscriptions that are only added to, reading back
//! one's own writes, usage errors. Each drives the real binary against a real gateway.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use syncgate_gateway::auth::{Authenticator, Claims};

use super::*;

/// Longer than any wait these commands may legitimately make: a command that retried until
/// its (much longer) `--timeout` instead of stopping would miss it.
const PROMPT: Duration = Duration::from_secs(45);

/// Runs the CLI with `token` (None: no token) and standard input `stdin`, and fails the test
/// if it has not finished within [`PROMPT`].
async fn run(dir: &Path, url: &str, token: Option<&str>, args: &[&str], stdin: &[u8]) -> Output {
    use tokio::io::AsyncWriteExt;
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_syncgate-client"));
    cmd.args(["--url", url, "--data-dir"])
        .arg(dir)
        .args(args)
        .env_remove("SYNCGATE_TOKEN")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    if let Some(t) = token {
        cmd.env("SYNCGATE_TOKEN", t);
    }
    let mut child = cmd.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin).await.unwrap();
    drop(input);
    tokio::time::timeout(PROMPT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("`syncgate-client {}` did not stop in time", args.join(" ")))
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn signed(secret: &[u8], exp: u64) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &Claims {
            exp,
            iat: 0,
            ..Claims::new("operator", 0)
        },
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_stop_at_once_with_exit_status_5() {
    let gw_dir = tempfile::tempdir().unwrap();
    let gw = start_gateway(gw_dir.path()).await;
    let ws = format!("ws://{}", gw.ws_addr);
    let foreign = Authenticator::new(b"another-gateway's-secret")
        .mint("operator", 3600)
        .unwrap();
    let expired = signed(SECRET.as_bytes(), 1_000);
    let good = token();
    let cases: Vec<(&str, String, String)> = vec![
        ("garbage token", ws.clone(), "not-a-jwt".into()),
        ("token of another secret", ws.clone(), foreign),
        ("expired token", ws.clone(), expired),
        (
            "http:// URL",
            format!("http://{}", gw.ws_addr),
            good.clone(),
        ),
        (
            "the HTTP listener instead of the WebSocket one",
            format!("ws://{}", gw.http_addr),
            good,
        ),
    ];
    for (what, url, tok) in &cases {
        let dir = tempfile::tempdir().unwrap();
        for args in [
            &["put", "--timeout", "300s", COLL, "wo-1", r#"{"qty": 1}"#][..],
            &["--sub", COLL, "sync", "--once", "--timeout", "300s"][..],
            &["subscribe", COLL][..],
        ] {
            let out = run(dir.path(), url, Some(tok), args, b"").await;
            assert_eq!(out.status.code(), Some(5), "{what}: {args:?}: {out:?}");
            assert!(stderr(&out).contains("refused"), "{what}: {}", stderr(&out));
        }
        // The edit is kept for when the configuration is fixed.
        let out = run(dir.path(), url, None, &["outbox"], b"").await;
        assert_eq!(stdout(&out).lines().count(), 1, "{what}: {out:?}");
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_write_returns_at_once_and_stays_queued() {
    // A port nobody listens on: the connection is refused at once.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("ws://127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let tok = token();
    let out = run(
        dir.path(),
        &url,
        Some(&tok),
        &["put", "--timeout", "300s", COLL, "wo-1", r#"{"qty": 1}"#],
        b"",
    )
    .await;
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(stderr(&out).contains("stays in the outbox"), "{out:?}");
    let out = run(dir.path(), &url, None, &["outbox"], b"").await;
    assert!(stdout(&out).contains(r#""state":"pending""#), "{out:?}");
    // And it reads back at once, before any upload.
    let out = run(dir.path(), &url, None, &["get", COLL, "wo-1"], b"").await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(stdout(&out).contains(r#""pending":true"#), "{out:?}");
    // A listener that never answers (the kernel completes the TCP handshake, nobody speaks
    // WebSocket): given up on after the write's connect timeout, not the upload's 300 s.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!("ws://{}", silent.local_addr().unwrap());
    let out = run(
        dir.path(),
        &silent_url,
        Some(&tok),
        &["put", "--timeout", "300s", COLL, "wo-2", r#"{"qty": 2}"#],
        b"",
    )
    .await;
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let out = run(dir.path(), &url, None, &["outbox"], b"").await;
    assert_eq!(stdout(&out).lines().count(), 2, "{out:?}");
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_reads_back_its_write_without_subscribing() {
    let gw_dir = tempfile::tempdir().unwrap();
    let gw = start_gateway(gw_dir.path()).await;
    let url = format!("ws://{}", gw.ws_addr);
    let dir = tempfile::tempdir().unwrap();
    let tok = token();
    let out = run(
        dir.path(),
        &url,
        Some(&tok),
        &["put", "machines", "m-1", r#"{"state": "idle", "speed": 3}"#],
        b"",
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let out = run(
        dir.path(),
        &url,
        Some(&tok),
        &["patch", "machines", "m-1", "-"],
        br#"{"state": "running"}"#,
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let out = run(dir.path(), &url, None, &["get", "machines", "m-1"], b"").await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let doc: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(doc["body"]["state"], "running", "{doc}");
    assert_eq!(doc["body"]["speed"], 3, "{doc}");
    assert_eq!(doc["pending"], false, "{doc}");
    assert_eq!(doc["version"], 2, "{doc}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_adds_a_subscription_and_unsubscribe_says_what_it_drops() {
    let gw_dir = tempfile::tempdir().unwrap();
    let gw = start_gateway(gw_dir.path()).await;
    let url = format!("ws://{}", gw.ws_addr);
    let tok = token();
    let writer = tempfile::tempdir().unwrap();
    for i in 0..10 {
        let out = run(
            writer.path(),
            &url,
            Some(&tok),
            &[
                "put",
                "--no-upload",
                COLL,
                &format!("wo-{i}"),
                r#"{"plant": "p1"}"#,
            ],
            b"",
        )
        .await;
        assert!(out.status.success(), "{out:?}");
    }
    let out = run(
        writer.path(),
        &url,
        Some(&tok),
        &["put", "machines", "m-1", r#"{"state": "idle"}"#],
        b"",
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");

    let dir = tempfile::tempdir().unwrap();
    let sync = |sub: &'static str| {
        let (dir, url, tok) = (dir.path().to_owned(), url.clone(), tok.clone());
        async move {
            run(
                &dir,
                &url,
                Some(&tok),
                &["--sub", sub, "sync", "--once"],
                b"",
            )
            .await
        }
    };
    assert_eq!(sync(COLL).await.status.code(), Some(0));
    let count = |c: &'static str| {
        let (dir, url) = (dir.path().to_owned(), url.clone());
        async move {
            let out = run(&dir, &url, None, &["query", c], b"").await;
            stdout(&out).lines().count()
        }
    };
    assert_eq!(count(COLL).await, 10);
    // Following a second collection keeps the first one's data.
    assert_eq!(sync("machines").await.status.code(), Some(0));
    assert_eq!(
        count(COLL).await,
        10,
        "--sub must not drop other collections"
    );
    assert_eq!(count("machines").await, 1);
    // Removing one is explicit and says what it drops.
    let out = run(dir.path(), &url, None, &["unsubscribe", COLL], b"").await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        stdout(&out).contains(r#""documents_forgotten":10"#),
        "{out:?}"
    );
    assert_eq!(count(COLL).await, 0);
    assert_eq!(count("machines").await, 1);
    let out = run(dir.path(), &url, None, &["unsubscribe", "stock"], b"").await;
    assert_eq!(out.status.code(), Some(2), "not followed: {out:?}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_errors_exit_2_and_bodies_come_from_files() {
    let dir = tempfile::tempdir().unwrap();
    let url = "ws://127.0.0.1:9"; // never contacted
    let tok = token();
    let cases: &[(&[&str], Option<&str>)] = &[
        (&["put", COLL, "wo-1", "{not json"], Some(&tok)),
        (&["put", COLL, "wo-1", "[1, 2]"], Some(&tok)),
        (
            &["put", COLL, "wo-1", "@/nonexistent/body.json"],
            Some(&tok),
        ),
        (&["sync", "--once"], None),
        (&["subscribe"], Some(&tok)),
        (&["get", COLL], None),
        (&["put", "Not A Collection", "x", "{}"], Some(&tok)),
    ];
    for (args, t) in cases {
        let out = run(dir.path(), url, *t, args, b"").await;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        assert!(!stderr(&out).is_empty());
    }
    let file = dir.path().join("body.json");
    std::fs::write(&file, r#"{"qty_done": 7}"#).unwrap();
    let at = format!("@{}", file.display());
    let out = run(dir.path(), url, None, &["put", COLL, "wo-7", &at], b"").await;
    assert_eq!(out.status.code(), Some(4), "queued, no token: {out:?}");
    let out = run(dir.path(), url, None, &["get", COLL, "wo-7"], b"").await;
    assert!(stdout(&out).contains(r#""qty_done":7"#), "{out:?}");
    let out = run(dir.path(), url, None, &["get", COLL, "missing"], b"").await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}

/// `--key-file` encrypts the data directory: `keygen` makes a key, a write offline is stored
/// encrypted, reading it needs the key, and the wrong key or none is a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_file_encrypts_the_data_directory() {
    let url = "ws://127.0.0.1:9"; // never contacted: no token, so nothing uploads
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let keygen = run(&data, url, None, &["keygen"], b"").await;
    assert_eq!(keygen.status.code(), Some(0), "{keygen:?}");
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, stdout(&keygen)).unwrap();
    let key = key_file.to_str().unwrap();
    let out = run(
        &data,
        url,
        None,
        &[
            "--key-file",
            key,
            "put",
            COLL,
            "wo-1",
            r#"{"note": "CLI-SECRET"}"#,
        ],
        b"",
    )
    .await;
    assert_eq!(out.status.code(), Some(4), "queued, not uploaded: {out:?}");
    let out = run(
        &data,
        url,
        None,
        &["--key-file", key, "get", COLL, "wo-1"],
        b"",
    )
    .await;
    assert!(stdout(&out).contains("CLI-SECRET"), "{out:?}");
    let out = run(&data, url, None, &["get", COLL, "wo-1"], b"").await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("encrypted"), "{out:?}");
    let other = dir.path().join("other");
    std::fs::write(&other, [9u8; 32]).unwrap();
    let out = run(
        &data,
        url,
        None,
        &["--key-file", other.to_str().unwrap(), "get", COLL, "wo-1"],
        b"",
    )
    .await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("another key"), "{out:?}");
    for entry in std::fs::read_dir(&data).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        assert!(!bytes.windows(10).any(|w| w == b"CLI-SECRET"));
    }
}

/// `fetch` reads named documents from the gateway into another data directory (exit 1 when
/// one is missing), `get` then finds them offline, and an upload-only collection is refused
/// with its code (exit 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_reads_documents_by_id_as_a_person_would() {
    let gw_dir = tempfile::tempdir().unwrap();
    let gw = start_gateway(gw_dir.path()).await;
    let url = format!("ws://{}", gw.ws_addr);
    let tok = token();
    let writer = tempfile::tempdir().unwrap();
    let out = run(
        writer.path(),
        &url,
        Some(&tok),
        &["put", "machines", "m-1", r#"{"state": "idle"}"#],
        b"",
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let reader = tempfile::tempdir().unwrap();
    let args = ["fetch", "machines", "m-1", "m-404"];
    let out = run(reader.path(), &url, Some(&tok), &args, b"").await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let doc: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(
        (doc["id"].as_str(), doc["version"].as_u64()),
        (Some("m-1"), Some(1))
    );
    assert!(
        stderr(&out).contains("machines/m-404: not on the server"),
        "{out:?}"
    );
    let out = run(
        reader.path(),
        &url,
        Some(&tok),
        &["fetch", "feedback", "f-1"],
        b"",
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(stderr(&out).contains("not_downloadable"), "{out:?}");
    gw.shutdown().await;
    let out = run(reader.path(), &url, None, &["get", "machines", "m-1"], b"").await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(stdout(&out).contains("idle"), "{out:?}");
}

/// A mutation the server rejects (a dangling reference) is reported by the sync (exit 3),
/// listed by `rejected` with its code and the whole mutation until `rejected --ack` forgets
/// it; the mutation after it in the outbox applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_lists_refused_edits_until_acknowledged() {
    let gw_dir = tempfile::tempdir().unwrap();
    let gw = start_gateway(gw_dir.path()).await;
    let url = format!("ws://{}", gw.ws_addr);
    let dir = tempfile::tempdir().unwrap();
    let tok = token();
    for (id, body) in [
        ("wo-1", r#"{"plant": "p1", "machine": "press-9"}"#),
        ("wo-2", r#"{"plant": "p1"}"#),
    ] {
        let args = ["put", "--no-upload", "work_orders", id, body];
        let out = run(dir.path(), &url, Some(&tok), &args, b"").await;
        assert_eq!(out.status.code(), Some(0), "{out:?}");
    }
    let out = run(dir.path(), &url, Some(&tok), &["sync", "--once"], b"").await;
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let out = run(dir.path(), &url, None, &["rejected"], b"").await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let lines: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["name"], "dangling_reference");
    assert_eq!(lines[0]["code"], 412);
    assert_eq!(lines[0]["id"], "wo-1");
    assert_eq!(lines[0]["body"]["machine"], "press-9");
    let mid = lines[0]["mutation_id"].as_u64().unwrap().to_string();
    assert!(
        gw.store
            .document("work_orders", "wo-2")
            .await
            .unwrap()
            .is_some()
    );
    let out = run(dir.path(), &url, None, &["rejected", "--ack", &mid], b"").await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        stderr(&out).contains("1 rejected mutation(s) forgotten"),
        "{out:?}"
    );
    let out = run(dir.path(), &url, None, &["rejected"], b"").await;
    assert!(stdout(&out).trim().is_empty(), "{out:?}");
    gw.shutdown().await;
}
