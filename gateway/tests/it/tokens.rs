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

/// `refresh` replaces the session's token with a newer one of the same user and rights, and
/// the session outlives the old token; another user's token, other rights, a garbage token
/// and an API key are refused with 206 and the session goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_extends_the_session_only_for_the_same_user_and_rights() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut config = db.config();
    config.auth.leeway_secs = 0;
    config.collections.get_mut("work_orders").unwrap().scope =
        [("plant".to_owned(), "claims.plant".to_owned())].into();
    let gw = Gateway::start(config).await.unwrap();
    let auth = Authenticator::new(SECRET.as_bytes());
    let short = |user: &str, plant: &str, ttl: u64| {
        let mut claims = syncgate_gateway::auth::Claims::new(user, ttl);
        claims
            .extra
            .insert("plant".into(), serde_json::json!(plant));
        auth.mint_claims(claims).unwrap()
    };
    let (mut c, welcome) = Connection::connect(&ws_url(&gw), "term-r", &short("alice", "A", 2))
        .await
        .unwrap();
    let valid = welcome
        .token_valid_ms
        .expect("a JWT session says how long it lasts");
    assert!(valid <= 2000, "{valid}");
    let refresh = |token: String| Frame::Refresh(Refresh { token });
    for (name, token) in [
        ("another user", short("bob", "A", 3600)),
        ("other scope claims", short("alice", "B", 3600)),
        ("garbage", "not.a.token".to_owned()),
        (
            "an API key",
            format!("sgk_{}_{}", "0".repeat(16), "0".repeat(64)),
        ),
    ] {
        c.send(&refresh(token)).await.unwrap();
        match refresh_answer(&mut c).await {
            Frame::Error(e) => {
                assert_eq!(e.code, ErrorCode::RefreshRefused.code(), "{name}: {e:?}");
                assert!(!e.fatal, "{name}");
            }
            other => panic!("{name}: {other:?}"),
        }
    }
    c.send(&refresh(short("alice", "A", 3600))).await.unwrap();
    match refresh_answer(&mut c).await {
        Frame::Refreshed(r) => assert!(r.token_valid_ms > 3_000_000, "{r:?}"),
        other => panic!("{other:?}"),
    }
    // Past the first token's expiry (the clock is what is tested here: the old deadline
    // must pass), the session still answers.
    let expired_at = Instant::now() + std::time::Duration::from_millis(valid + 500);
    tokio::time::sleep_until(expired_at.into()).await;
    c.send(&Frame::Ping(Ping { nonce: 9 })).await.unwrap();
    loop {
        match c.recv_timeout(DEADLINE).await {
            Ok(Frame::Pong(p)) if p.nonce == 9 => break,
            Ok(Frame::Error(e)) => panic!("{e:?}"),
            Ok(_) => {}
            Err(e) => panic!("the session ended: {e:?}"),
        }
    }
    gw.shutdown().await;
    db.cleanup().await;
}

/// The answer to a `refresh`: `refreshed` or an error.
async fn refresh_answer(c: &mut Connection) -> Frame {
    let end = Instant::now() + DEADLINE;
    loop {
        match c
            .recv_timeout(end.saturating_duration_since(Instant::now()))
            .await
        {
            Ok(f @ (Frame::Refreshed(_) | Frame::Error(_))) => return f,
            Ok(_) => {}
            Err(e) => panic!("{e:?}"),
        }
    }
}
