//! Tokens of a trusted identity provider over real connections: an RS256 token from the
//! provider's JWKS opens a session, and rotating the JWKS file on disk takes effect for the
//! next handshake without a restart.

use std::path::Path;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use syncgate_gateway::auth::Claims;
use syncgate_gateway::config::{KeyAlgorithm, TrustedIssuer};

use super::*;

const ISSUER: &str = "https://login.plant.example";

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/keys")
        .join(name)
}

fn rs256(key: &str, kid: &str) -> String {
    let der = syncgate_protocol::tls::load_key(&fixture(&format!("{key}.key.pem"))).unwrap();
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.into());
    let claims = Claims {
        iss: Some(ISSUER.into()),
        ..Claims::new("olga", 600)
    };
    jsonwebtoken::encode(
        &header,
        &claims,
        &EncodingKey::from_rsa_der(der.secret_der()),
    )
    .unwrap()
}

fn publish(jwks: &Path, keys: &[(&str, &str)]) {
    let keys: Vec<serde_json::Value> = keys
        .iter()
        .map(|(key, kid)| {
            let text = std::fs::read_to_string(fixture(&format!("{key}.jwk.json"))).unwrap();
            let mut jwk: serde_json::Value = serde_json::from_str(&text).unwrap();
            jwk["kid"] = (*kid).into();
            jwk
        })
        .collect();
    let tmp = jwks.with_extension("tmp");
    std::fs::write(&tmp, serde_json::json!({ "keys": keys }).to_string()).unwrap();
    std::fs::rename(tmp, jwks).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_providers_rs256_tokens_work_and_its_key_rotation_needs_no_restart() {
    let db = TestDb::new(Backend::Sqlite).await;
    let keys = tempfile::tempdir().unwrap();
    let jwks = keys.path().join("jwks.json");
    publish(&jwks, &[("rs-a1", "2026-11")]);
    let mut config = db.config();
    config.auth.trusted_issuers = vec![TrustedIssuer {
        issuer: ISSUER.into(),
        algorithms: vec![KeyAlgorithm::RS256],
        jwks_file: jwks.clone(),
        ..TrustedIssuer::default()
    }];
    let gw = Gateway::start(config).await.unwrap();
    let url = ws_url(&gw);
    let hello = |token: String| {
        let url = url.clone();
        async move {
            connect_code(&url, "term-olga", &token)
                .await
                .map(|(_, w)| w.session)
        }
    };
    let old = rs256("rs-a1", "2026-11");
    let new = rs256("rs-a2", "2026-12");
    assert!(hello(old.clone()).await.is_ok());
    assert_eq!(
        hello(new.clone()).await,
        Err(ErrorCode::Unauthorized.code())
    );
    publish(&jwks, &[("rs-a2", "2026-12")]);
    assert!(hello(new).await.is_ok());
    assert_eq!(hello(old).await, Err(ErrorCode::Unauthorized.code()));
    // The gateway's own HS256 tokens keep working beside the provider's.
    assert!(hello(token("olga")).await.is_ok());
    gw.shutdown().await;
    db.cleanup().await;
}
