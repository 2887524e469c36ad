//! The deployment files in `deploy/` are checked, each by the tool that reads it where one is
//! installed (`.ci/run` installs promtool and haproxy; systemd-analyze and kubectl are on the
//! CI machine) and by structure here: a unit with a typo, an alert rule that no longer fires,
//! a probe on a path the gateway does not serve, a dashboard panel on a metric that does not
//! exist, a grace period shorter than the drain all fail.

use std::path::{Path, PathBuf};

use serde_yaml::Value as Yaml;
use syncgate_gateway::Config;

use super::cli::command;
use super::http_api::http;
use super::*;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn read(rel: &str) -> String {
    let path = deploy().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn yaml_docs(text: &str) -> Vec<Yaml> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(text)
        .map(|d| Yaml::deserialize(d).unwrap())
        .filter(|d| !d.is_null())
        .collect()
}

/// Runs a tool; `None` when it is not installed (a failure under `CI=true`, where `.ci/run`
/// installs what the suite needs). Returns its status and everything it printed.
fn tool(program: &str, args: &[&str]) -> Option<(bool, String)> {
    run_tool(program, args, true)
}

/// [`tool`] for one that no Debian package provides (kubectl): skipped wherever it is missing.
fn optional_tool(program: &str, args: &[&str]) -> Option<(bool, String)> {
    run_tool(program, args, false)
}

fn run_tool(program: &str, args: &[&str], in_ci: bool) -> Option<(bool, String)> {
    match std::process::Command::new(program)
        .args(args)
        .current_dir(deploy())
        .output()
    {
        Ok(out) => Some((
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            assert!(
                !in_ci || std::env::var("CI").is_err(),
                "{program} is not installed (CI=true: .ci/run installs it)"
            );
            eprintln!("SKIPPED: {program} is not installed; its check of deploy/ did not run");
            None
        }
        Err(e) => panic!("{program}: {e}"),
    }
}

#[test]
fn systemd_units_verify_cleanly() {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_syncgate"));
    let client = bin.with_file_name("syncgate-client");
    let dir = tempfile::tempdir().unwrap();
    let units: Vec<_> = std::fs::read_dir(deploy().join("systemd"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(units.iter().any(|u| u.ends_with("syncgate.service")));
    // systemd-analyze checks that ExecStart's binary exists: point the copies at this build.
    for unit in &units {
        let text = std::fs::read_to_string(unit)
            .unwrap()
            .replace(
                "/usr/local/bin/syncgate-client",
                &client.display().to_string(),
            )
            .replace("/usr/local/bin/syncgate ", &format!("{} ", bin.display()));
        std::fs::write(dir.path().join(unit.file_name().unwrap()), text).unwrap();
    }
    let gateway = read("systemd/syncgate.service");
    for needed in [
        "LimitNOFILE=",
        "Restart=on-failure",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "KillSignal=SIGTERM",
    ] {
        assert!(gateway.contains(needed), "syncgate.service lacks {needed}");
    }
    let paths: Vec<String> = units
        .iter()
        .filter(|u| {
            u.extension()
                .is_some_and(|e| e == "service" || e == "timer")
        })
        .map(|u| {
            dir.path()
                .join(u.file_name().unwrap())
                .display()
                .to_string()
        })
        .collect();
    let mut args = vec!["verify"];
    args.extend(paths.iter().map(String::as_str));
    if let Some((ok, printed)) = tool("systemd-analyze", &args) {
        // It reports unknown keys and bad values without failing: any word from it is one.
        assert!(
            ok && printed.trim().is_empty(),
            "systemd-analyze: {printed}"
        );
    }
}

#[test]
fn prometheus_config_and_alert_rules_pass_promtool_and_their_unit_tests() {
    if let Some((ok, printed)) = tool(
        "promtool",
        &["check", "config", "prometheus/prometheus.yml"],
    ) {
        assert!(ok, "{printed}");
    }
    if let Some((ok, printed)) = tool("promtool", &["test", "rules", "prometheus/alerts_test.yml"])
    {
        assert!(ok, "{printed}");
    }
    // Every alert says how bad it is and what it means.
    let rules = &yaml_docs(&read("prometheus/alerts.yml"))[0]["groups"][0]["rules"];
    let rules = rules.as_sequence().unwrap();
    assert!(rules.len() >= 6);
    for r in rules {
        let name = r["alert"].as_str().unwrap();
        assert!(r["labels"]["severity"].is_string(), "{name}: no severity");
        assert!(
            r["annotations"]["summary"].is_string(),
            "{name}: no summary"
        );
    }
}

#[test]
fn haproxy_config_is_valid() {
    if let Some((ok, printed)) = tool("haproxy", &["-c", "-f", "haproxy/haproxy.cfg"]) {
        assert!(ok, "{printed}");
    }
    let cfg = read("haproxy/haproxy.cfg");
    assert!(cfg.contains("option httpchk GET /readyz"));
    assert!(cfg.contains("timeout tunnel"));
}

/// The drain must fit in what the supervisor waits for: `shutdown_delay_ms` and
/// `shutdown_grace_ms` of the configuration the files run with.
fn drain_secs(toml: &str) -> u64 {
    let config = Config::from_toml(toml).unwrap();
    config.validate().unwrap();
    (config.shutdown_delay_ms + config.shutdown_grace_ms).div_ceil(1000)
}

fn container_checks(what: &str, pod: &Yaml, drain: u64) {
    let spec = &pod["spec"];
    let c = &spec["containers"][0];
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz", "{what}");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz", "{what}");
    let pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
        .as_sequence()
        .unwrap();
    assert_eq!(pre_stop[0], "sleep", "{what}");
    let pre_stop: u64 = pre_stop[1].as_str().unwrap().parse().unwrap();
    let grace = spec["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        grace > pre_stop + drain,
        "{what}: terminationGracePeriodSeconds {grace} <= preStop {pre_stop} + drain {drain}"
    );
    assert!(c["resources"]["requests"]["cpu"].is_string(), "{what}");
    assert!(c["resources"]["limits"]["memory"].is_string(), "{what}");
    assert_eq!(spec["securityContext"]["runAsNonRoot"], true, "{what}");
    assert_eq!(
        c["securityContext"]["allowPrivilegeEscalation"], false,
        "{what}"
    );
}

#[test]
fn kubernetes_manifests_probe_drain_and_size_the_gateway() {
    for dir in ["k8s", "k8s/single-node"] {
        if let Some((ok, printed)) = optional_tool("kubectl", &["kustomize", dir]) {
            assert!(ok, "kubectl kustomize {dir}: {printed}");
            assert!(printed.contains("kind: Service"), "{printed}");
        }
    }
    let drain = drain_secs(&read("k8s/syncgate.toml"));
    let deployment = &yaml_docs(&read("k8s/deployment.yaml"))[0];
    assert_eq!(deployment["kind"], "Deployment");
    assert!(deployment["spec"]["replicas"].as_u64().unwrap() >= 2);
    container_checks("deployment", &deployment["spec"]["template"], drain);
    let pdb = &yaml_docs(&read("k8s/pdb.yaml"))[0];
    assert_eq!(pdb["kind"], "PodDisruptionBudget");
    // An empty selector would cover every pod of the namespace.
    assert!(pdb["spec"]["selector"]["matchLabels"].is_mapping());
    let single = &yaml_docs(&read("k8s/single-node/statefulset.yaml"))[0];
    assert_eq!(single["spec"]["replicas"], 1, "SQLite has one writer");
    let pod = &single["spec"]["template"];
    container_checks(
        "single node",
        pod,
        drain_secs(&read("k8s/single-node/syncgate.toml")),
    );
    assert!(
        pod["spec"]["securityContext"]["fsGroup"].is_u64(),
        "the volume must be writable by the non-root user"
    );
    // Both listen beyond loopback, or the probes and the Service reach nothing.
    for file in ["k8s/syncgate.toml", "k8s/single-node/syncgate.toml"] {
        let config = Config::from_toml(&read(file)).unwrap();
        assert!(config.listen.ip().is_unspecified(), "{file}");
        assert!(config.http_listen.ip().is_unspecified(), "{file}");
    }
}

#[test]
fn compose_runs_three_nodes_behind_a_balancer_with_monitoring() {
    let mut compose = yaml_docs(&read("compose.yaml")).remove(0);
    // The gateways share one definition (`<<: *gateway`).
    compose.apply_merge().unwrap();
    let compose = &compose;
    let services = compose["services"].as_mapping().unwrap();
    for s in [
        "postgres",
        "gw1",
        "gw2",
        "gw3",
        "lb",
        "prometheus",
        "grafana",
    ] {
        assert!(services.contains_key(s), "compose.yaml lacks {s}");
    }
    let drain = drain_secs(&read("k8s/syncgate.toml"));
    for gw in ["gw1", "gw2", "gw3"] {
        let g = &services[gw];
        assert!(g["healthcheck"]["test"].is_sequence(), "{gw}");
        let stop: u64 = g["stop_grace_period"]
            .as_str()
            .unwrap()
            .trim_end_matches('s')
            .parse()
            .unwrap();
        assert!(
            stop > drain,
            "{gw}: stop_grace_period {stop}s <= drain {drain}s"
        );
        assert_eq!(g["build"]["dockerfile"], "deploy/Dockerfile");
    }
    // Every file a service mounts is in the repository.
    for (name, s) in services {
        for v in s["volumes"].as_sequence().into_iter().flatten() {
            let v = v.as_str().unwrap();
            if let Some(rel) = v.strip_prefix("./") {
                let rel = rel.split(':').next().unwrap();
                assert!(
                    deploy().join(rel).exists(),
                    "{}: mounts {rel}, which is missing",
                    name.as_str().unwrap()
                );
            }
        }
    }
    let dockerfile = read("Dockerfile");
    let froms = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .count();
    assert!(froms >= 2, "a multi-stage build");
    let user = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("the image runs as a user of its own");
    assert!(
        !user.starts_with('0') && !user.starts_with("root"),
        "{user}"
    );
    assert!(dockerfile.contains("HEALTHCHECK"));
}

/// The metric names a PromQL expression reads (`syncgate_*`, `process_*`), histogram series
/// folded to their family.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let starts = expr[i..].starts_with("syncgate_") || expr[i..].starts_with("process_");
        let boundary = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if starts && boundary {
            let end = expr[i..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(expr.len(), |n| i + n);
            let name = &expr[i..end];
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            names.push(family.to_owned());
            i = end;
        } else {
            i += 1;
        }
    }
    names
}

fn dashboard_exprs() -> Vec<String> {
    let dash: serde_json::Value =
        serde_json::from_str(&read("grafana/dashboards/syncgate.json")).unwrap();
    let mut exprs = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            exprs.push(t["expr"].as_str().unwrap().to_owned());
        }
    }
    exprs.push(
        dash["templating"]["list"][1]["query"]["query"]
            .as_str()
            .unwrap()
            .to_owned(),
    );
    exprs
}

#[test]
fn metric_names_are_read_from_promql() {
    assert_eq!(
        metric_names(
            "histogram_quantile(0.99, sum by (le) (rate(syncgate_push_seconds_bucket[5m]))) / \
             process_max_fds{job=\"x\"} - my_syncgate_x"
        ),
        vec!["syncgate_push_seconds", "process_max_fds"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_of_the_dashboard_and_the_alerts_is_served() {
    let mut exprs = dashboard_exprs();
    assert!(
        exprs.len() >= 20,
        "the dashboard has {} queries",
        exprs.len()
    );
    let rules = &yaml_docs(&read("prometheus/alerts.yml"))[0]["groups"][0]["rules"];
    for r in rules.as_sequence().unwrap() {
        exprs.push(r["expr"].as_str().unwrap().to_owned());
    }
    let db = TestDb::new(Backend::Sqlite).await;
    let gw = Gateway::start(db.config()).await.unwrap();
    // Some traffic, so that labelled families without preset labels have a series.
    let (mut w, _) = connect(&gw, "metrics-writer").await;
    let ack = push(
        &mut w,
        1,
        vec![put(1, "machines", "m1", body(&[("name", "press".into())]))],
    )
    .await;
    assert_eq!(ack.results[0].status, MutationStatus::Applied);
    let mut sub = Replica::subscribe(&gw, "metrics-reader", "machines", Body::new(), None).await;
    sub.until_seq(ack.visible_at).await;
    let (_, _, text) = http(&gw, "GET", "/metrics", &[], b"").await;
    let text = String::from_utf8(text).unwrap();
    let mut missing: Vec<String> = exprs
        .iter()
        .flat_map(|e| metric_names(e))
        .filter(|name| !text.contains(&format!("# TYPE {name} ")))
        .collect();
    missing.sort();
    missing.dedup();
    assert!(
        missing.is_empty(),
        "queried but not served: {missing:?}\n{text}"
    );
    assert!(text.contains("syncgate_ready 1"), "{text}");
    gw.shutdown().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_command_asks_the_gateway_on_this_host() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut config = db.config();
    config.http_listen = "0.0.0.0:0".parse().unwrap();
    let gw = Gateway::start(config).await.unwrap();
    let listen = format!("0.0.0.0:{}", gw.http_addr.port());
    for (args, says) in [
        (vec!["--http-listen", &listen, "health"], "200 ok"),
        (
            vec!["--http-listen", &listen, "health", "--ready"],
            "200 ready",
        ),
    ] {
        let out = command(&args).output().await.unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), says);
    }
    gw.shutdown().await;
    // Nobody listens there now.
    let out = command(&["--http-listen", &listen, "health"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("asking"),
        "{out:?}"
    );
    db.cleanup().await;
}

/// `syncgate admin clients list` reads each node's `GET /admin/clients` with the admin key:
/// every session with its user, subscriptions (position, lag), last push and applied
/// mutation; without the key the endpoint answers 401, and a node without one 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_clients_lists_each_session_with_its_lag_and_last_push() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut config = db.config();
    config.auth.admin_key = "adm-key".into();
    let gw = Gateway::start(config).await.unwrap();
    assert_eq!(http(&gw, "GET", "/admin/clients", &[], b"").await.0, 401);
    let wrong = [("Authorization", "Bearer adm-kez")];
    assert_eq!(http(&gw, "GET", "/admin/clients", &wrong, b"").await.0, 401);
    let (mut w, _) = connect(&gw, "admin-writer").await;
    let ack = push(
        &mut w,
        1,
        vec![
            put(1, "machines", "m1", body(&[("name", "press".into())])),
            put(2, "machines", "m2", body(&[("name", "saw".into())])),
        ],
    )
    .await;
    let mut reader = Replica::subscribe(&gw, "admin-reader", "machines", Body::new(), None).await;
    reader.until_seq(ack.visible_at).await;
    let node = gw.http_addr.to_string();
    let out = command(&["admin", "clients", "list", "--node", &node, "--json"])
        .env("SYNCGATE_ADMIN_KEY", "adm-key")
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let nodes: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let n = &nodes[0];
    assert_eq!(n["node"], node.as_str());
    assert_eq!(n["published"], ack.visible_at);
    let clients = n["clients"].as_array().unwrap();
    let find = |id: &str| {
        clients
            .iter()
            .find(|c| c["client_id"] == id)
            .unwrap_or_else(|| panic!("{id} not listed: {clients:?}"))
    };
    let writer = find("admin-writer");
    assert_eq!(writer["user"], "tester");
    assert_eq!(writer["applied_mutation"], 2);
    assert!(writer["last_push_at_ms"].as_u64().unwrap() > 0);
    assert_eq!(writer["subscriptions"], serde_json::json!([]));
    let r = find("admin-reader");
    assert_eq!(r["last_push_at_ms"], 0);
    let sub = &r["subscriptions"][0];
    assert_eq!(
        (
            &sub["collection"],
            &sub["live"],
            &sub["position"],
            &sub["lag"]
        ),
        (
            &serde_json::json!("machines"),
            &serde_json::json!(true),
            &serde_json::json!(ack.visible_at),
            &serde_json::json!(0)
        )
    );
    // /metrics counts the one subscription in the "0 behind" bucket.
    let (_, _, text) = http(&gw, "GET", "/metrics", &[], b"").await;
    let text = String::from_utf8(text).unwrap();
    assert!(
        text.contains("syncgate_subscribers_by_lag{lag=\"0\"} 1\n")
            && text.contains("syncgate_subscribers_by_lag{lag=\">10000\"} 0\n"),
        "{text}"
    );
    // The table names them too; a session that ended is gone.
    drop(w);
    let end = Instant::now() + DEADLINE;
    loop {
        let out = command(&["admin", "clients", "list", "--node", &node])
            .env("SYNCGATE_ADMIN_KEY", "adm-key")
            .output()
            .await
            .unwrap();
        let table = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(table.contains("admin-reader"), "{table}");
        if !table.contains("admin-writer") {
            break;
        }
        assert!(
            Instant::now() < end,
            "the ended session is still listed: {table}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    gw.shutdown().await;
    // No admin key configured: there is no endpoint.
    let gw = Gateway::start(db.config()).await.unwrap();
    let key = [("Authorization", "Bearer adm-key")];
    assert_eq!(http(&gw, "GET", "/admin/clients", &key, b"").await.0, 404);
    gw.shutdown().await;
    db.cleanup().await;
}
