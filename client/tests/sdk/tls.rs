//! `wss://` and `https://` end to end: a CA and a server certificate generated for the test
//! (with the `openssl` command line), a gateway serving both listeners over TLS, the SDK
//! syncing through it with the CA file, a client that does not trust the CA refused, and a
//! renewed certificate served without a restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use syncgate_gateway::config::TlsConfig;
use syncgate_protocol::tls::{client_config, connect};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

/// Runs `openssl` with `args` in `dir`; the suite's CI installs it (`.ci/run`).
fn openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl command line (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (`ca.pem`) and, signed by it, a certificate for `localhost` and 127.0.0.1 named
/// `{name}.pem` / `{name}.key`.
fn make_ca(dir: &Path) -> PathBuf {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=syncgate test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    dir.join("ca.pem")
}

fn make_leaf(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    std::fs::write(
        dir.join("leaf.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
         keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    let (key, csr, pem) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.pem"),
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            &key,
            "-out",
            &csr,
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "leaf.ext",
            "-out",
            &pem,
        ],
    );
    (dir.join(pem), dir.join(key))
}

/// The certificate a TLS server at `addr` presents, and what its `/healthz` answers.
async fn https_healthz(addr: std::net::SocketAddr, ca: &Path) -> (Vec<u8>, String) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let config = Arc::new(client_config(Some(ca)).unwrap());
    let mut tls = connect(tcp, "localhost", config).await.unwrap();
    let cert = tls.connection().peer_certificates().unwrap()[0].to_vec();
    tls.write_all(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tls.read_to_string(&mut answer).await.unwrap();
    (cert, answer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_syncs_over_wss_and_a_renewed_certificate_needs_no_restart() {
    let certs = tempfile::tempdir().unwrap();
    let ca = make_ca(certs.path());
    let (cert_file, key_file) = make_leaf(certs.path(), "server");
    let gw_dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(Config {
        tls: TlsConfig {
            cert_file: cert_file.clone(),
            key_file: key_file.clone(),
        },
        ..gateway_config(gw_dir.path())
    })
    .await
    .unwrap();
    let url = format!("wss://localhost:{}", gw.ws_addr.port());

    // Two SDK clients trusting the CA: one writes, the other receives it.
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = builder(&url, a_dir.path())
        .tls_ca_file(&ca)
        .open()
        .await
        .unwrap();
    a.put(COLL, "wo-tls", body(&[("over", Value::from("wss"))]))
        .await
        .unwrap();
    a.sync_now(DEADLINE).await.unwrap();
    let b = builder(&url, b_dir.path())
        .tls_ca_file(&ca)
        .open()
        .await
        .unwrap();
    b.sync_now(DEADLINE).await.unwrap();
    assert_eq!(
        b.get(COLL, "wo-tls").await.unwrap().unwrap().body["over"],
        Value::from("wss")
    );
    b.close().await;

    // A client that trusts only the public web PKI is refused, and says why.
    let c_dir = tempfile::tempdir().unwrap();
    let c = builder(&url, c_dir.path()).open().await.unwrap();
    match c.sync_now(DEADLINE).await {
        Err(e) => assert!(e.to_string().contains("TLS"), "{e}"),
        Ok(r) => panic!("a client that does not trust the CA synced: {r:?}"),
    }
    c.close().await;
    // Plain ws:// to the TLS listener gets no WebSocket.
    assert!(
        Connection::open(&format!("ws://{}", gw.ws_addr))
            .await
            .is_err()
    );

    // https:// on the HTTP listener; then the certificate is renewed on disk and the next
    // handshake presents the new one, with no restart.
    let (first, answer) = https_healthz(gw.http_addr, &ca).await;
    assert!(
        answer.starts_with("HTTP/1.0 200") && answer.ends_with("ok\n"),
        "{answer}"
    );
    let (new_cert, new_key) = make_leaf(certs.path(), "renewed");
    let tmp_cert = certs.path().join("swap.pem");
    std::fs::copy(&new_key, &key_file).unwrap();
    std::fs::copy(&new_cert, &tmp_cert).unwrap();
    std::fs::rename(&tmp_cert, &cert_file).unwrap();
    let (second, _) = https_healthz(gw.http_addr, &ca).await;
    assert_ne!(first, second, "the renewed certificate is served");
    assert_eq!(
        second,
        syncgate_protocol::tls::load_certs(&new_cert).unwrap()[0].to_vec()
    );
    // And the SDK keeps syncing over the renewed certificate.
    a.put(COLL, "wo-renewed", body(&[])).await.unwrap();
    a.sync_now(DEADLINE).await.unwrap();
    a.close().await;
    gw.shutdown().await;
}
