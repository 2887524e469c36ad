//! Tokens of trusted issuers (RS256 / ES256), adversarially: every way a token of the wrong
//! key, issuer, algorithm or `kid` might slip through, and JWKS rotation without a restart.

use std::path::{Path, PathBuf};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use syncgate_protocol::ErrorCode;

use super::{AuthConfig, Authenticator, Claims, unix_now};
use crate::config::{KeyAlgorithm, TrustedIssuer};

const SECRET: &[u8] = b"the-hs256-secret";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/keys")
        .join(name)
}

/// The private key of fixture `name` (PKCS#1 for RSA, PKCS#8 for EC: what jsonwebtoken reads).
fn signer(name: &str) -> EncodingKey {
    let key = syncgate_protocol::tls::load_key(&fixture(&format!("{name}.key.pem"))).unwrap();
    if name.starts_with("rs-") {
        EncodingKey::from_rsa_der(key.secret_der())
    } else {
        EncodingKey::from_ec_der(key.secret_der())
    }
}

/// A token signed by fixture key `key` (`None`: unsigned-looking garbage is not needed here).
fn token(alg: Algorithm, key: &EncodingKey, kid: Option<&str>, claims: &Claims) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

fn claims(iss: &str) -> Claims {
    Claims {
        iss: Some(iss.into()),
        ..Claims::new("alice", 600)
    }
}

/// Writes a JWKS file of fixture keys, each `(fixture name, kid)`.
fn write_jwks(path: &Path, keys: &[(&str, &str)]) {
    let keys: Vec<serde_json::Value> = keys
        .iter()
        .map(|(name, kid)| {
            let text = std::fs::read_to_string(fixture(&format!("{name}.jwk.json"))).unwrap();
            let mut jwk: serde_json::Value = serde_json::from_str(&text).unwrap();
            jwk["kid"] = serde_json::Value::from(*kid);
            jwk
        })
        .collect();
    // Written beside and renamed, as a key rotation job should.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::json!({ "keys": keys }).to_string()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn issuer(name: &str, algorithms: &[KeyAlgorithm]) -> TrustedIssuer {
    TrustedIssuer {
        issuer: name.into(),
        algorithms: algorithms.to_vec(),
        ..TrustedIssuer::default()
    }
}

#[test]
fn public_key_tokens_are_checked_against_their_own_issuers_keys_only() {
    let dir = tempfile::tempdir().unwrap();
    let (jwks_a, jwks_b) = (dir.path().join("a.json"), dir.path().join("b.json"));
    // Both issuers publish a key with kid "k1", each its own (CVE-2026-49998's setup).
    write_jwks(&jwks_a, &[("rs-a1", "k1")]);
    write_jwks(&jwks_b, &[("rs-b1", "k1")]);
    let config = AuthConfig {
        leeway_secs: 0,
        trusted_issuers: vec![
            TrustedIssuer {
                jwks_file: jwks_a.clone(),
                ..issuer("https://idp-a", &[KeyAlgorithm::RS256])
            },
            TrustedIssuer {
                jwks_file: jwks_b,
                ..issuer("https://idp-b", &[KeyAlgorithm::RS256])
            },
            TrustedIssuer {
                public_key_file: fixture("es-a1.pub.pem"),
                ..issuer("https://idp-ec", &[KeyAlgorithm::ES256])
            },
        ],
        ..AuthConfig::default()
    };
    let a = Authenticator::load(SECRET, &config).unwrap();
    let rs_a1 = signer("rs-a1");
    let ok = |t: &str| a.verify(t).map(|id| id.user);
    assert_eq!(
        ok(&token(
            Algorithm::RS256,
            &rs_a1,
            Some("k1"),
            &claims("https://idp-a")
        )),
        Ok("alice".into())
    );
    assert_eq!(
        ok(&token(
            Algorithm::RS256,
            &signer("rs-b1"),
            Some("k1"),
            &claims("https://idp-b")
        )),
        Ok("alice".into())
    );
    assert_eq!(
        ok(&token(
            Algorithm::ES256,
            &signer("es-a1"),
            None,
            &claims("https://idp-ec")
        )),
        Ok("alice".into())
    );
    // Still HS256 tokens of the gateway's own secret, which name no trusted issuer.
    assert_eq!(ok(&a.mint("bob", 60).unwrap()), Ok("bob".into()));

    let now = unix_now();
    let public_pem = std::fs::read(fixture("rs-a1.pub.pem")).unwrap();
    let cases: Vec<(&str, String, ErrorCode)> = vec![
        (
            "issuer A's key presented as issuer B's (same kid)",
            token(
                Algorithm::RS256,
                &rs_a1,
                Some("k1"),
                &claims("https://idp-b"),
            ),
            ErrorCode::Unauthorized,
        ),
        (
            "wrong key for the kid",
            token(
                Algorithm::RS256,
                &signer("rs-a2"),
                Some("k1"),
                &claims("https://idp-a"),
            ),
            ErrorCode::Unauthorized,
        ),
        (
            "unknown kid",
            token(
                Algorithm::RS256,
                &rs_a1,
                Some("k9"),
                &claims("https://idp-a"),
            ),
            ErrorCode::Unauthorized,
        ),
        (
            "no kid where the issuer's keys all have one",
            token(Algorithm::RS256, &rs_a1, None, &claims("https://idp-a")),
            ErrorCode::Unauthorized,
        ),
        (
            "algorithm confusion: the RS public key used as an HS256 secret, naming the issuer",
            token(
                Algorithm::HS256,
                &EncodingKey::from_secret(&public_pem),
                Some("k1"),
                &claims("https://idp-a"),
            ),
            ErrorCode::Unauthorized,
        ),
        (
            "algorithm confusion: the RS public key used as an HS256 secret, naming no issuer",
            token(
                Algorithm::HS256,
                &EncodingKey::from_secret(&public_pem),
                None,
                &Claims::new("alice", 600),
            ),
            ErrorCode::Unauthorized,
        ),
        (
            "an algorithm the issuer does not sign with",
            token(
                Algorithm::ES256,
                &signer("es-a1"),
                Some("k1"),
                &claims("https://idp-a"),
            ),
            ErrorCode::Unauthorized,
        ),
        (
            "the gateway's HS256 secret naming a trusted issuer",
            token(
                Algorithm::HS256,
                &EncodingKey::from_secret(SECRET),
                None,
                &claims("https://idp-a"),
            ),
            ErrorCode::Unauthorized,
        ),
        (
            "an RS256 token of an issuer nobody trusts",
            token(
                Algorithm::RS256,
                &rs_a1,
                Some("k1"),
                &claims("https://evil"),
            ),
            ErrorCode::Unauthorized,
        ),
        (
            "an RS256 token naming no issuer",
            token(
                Algorithm::RS256,
                &rs_a1,
                Some("k1"),
                &Claims::new("alice", 600),
            ),
            ErrorCode::Unauthorized,
        ),
        (
            "a kid on a PEM key configured without one",
            token(
                Algorithm::ES256,
                &signer("es-a1"),
                Some("x"),
                &claims("https://idp-ec"),
            ),
            ErrorCode::Unauthorized,
        ),
        (
            "expired",
            token(
                Algorithm::RS256,
                &rs_a1,
                Some("k1"),
                &Claims {
                    exp: now - 1,
                    ..claims("https://idp-a")
                },
            ),
            ErrorCode::TokenExpired,
        ),
        (
            "not yet valid",
            token(
                Algorithm::RS256,
                &rs_a1,
                Some("k1"),
                &Claims {
                    nbf: Some(now + 60),
                    ..claims("https://idp-a")
                },
            ),
            ErrorCode::Unauthorized,
        ),
        (
            "tampered payload",
            {
                let t = token(
                    Algorithm::RS256,
                    &rs_a1,
                    Some("k1"),
                    &claims("https://idp-a"),
                );
                let forged = token(
                    Algorithm::RS256,
                    &rs_a1,
                    Some("k1"),
                    &Claims {
                        sub: "root".into(),
                        ..claims("https://idp-a")
                    },
                );
                let (h, rest) = t.split_once('.').unwrap();
                let sig = rest.rsplit_once('.').unwrap().1;
                let payload = forged.split('.').nth(1).unwrap();
                format!("{h}.{payload}.{sig}")
            },
            ErrorCode::Unauthorized,
        ),
    ];
    for (name, token, code) in cases {
        match a.verify(&token) {
            Ok(id) => panic!("{name}: accepted as {:?}", id.user),
            Err(e) => assert_eq!(e.code(), code, "{name}: {e}"),
        }
    }
}

#[test]
fn a_rotated_jwks_key_is_picked_up_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    write_jwks(&jwks, &[("rs-a1", "2026-11")]);
    let config = AuthConfig {
        trusted_issuers: vec![TrustedIssuer {
            jwks_file: jwks.clone(),
            ..issuer("https://idp-a", &[KeyAlgorithm::RS256])
        }],
        ..AuthConfig::default()
    };
    let a = Authenticator::load(SECRET, &config).unwrap();
    let old = token(
        Algorithm::RS256,
        &signer("rs-a1"),
        Some("2026-11"),
        &claims("https://idp-a"),
    );
    let new = token(
        Algorithm::RS256,
        &signer("rs-a2"),
        Some("2026-12"),
        &claims("https://idp-a"),
    );
    assert!(a.verify(&old).is_ok());
    assert!(a.verify(&new).is_err(), "not published yet");
    // Overlap: both keys published.
    write_jwks(&jwks, &[("rs-a1", "2026-11"), ("rs-a2", "2026-12")]);
    assert!(a.verify(&old).is_ok());
    assert!(a.verify(&new).is_ok());
    // The old key retired: its tokens stop working at once.
    write_jwks(&jwks, &[("rs-a2", "2026-12")]);
    assert!(a.verify(&old).is_err());
    assert!(a.verify(&new).is_ok());
    // A broken file (a botched deploy) keeps the last good keys.
    std::fs::write(&jwks, "{\"keys\": [").unwrap();
    assert!(a.verify(&new).is_ok());
    assert!(a.verify(&old).is_err());
}

#[test]
fn unusable_key_files_stop_the_start_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.json");
    std::fs::write(&empty, r#"{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}"#).unwrap();
    let cases = [
        (
            TrustedIssuer {
                jwks_file: dir.path().join("missing.json"),
                ..issuer("i", &[KeyAlgorithm::RS256])
            },
            "missing.json",
        ),
        (
            TrustedIssuer {
                jwks_file: empty,
                ..issuer("i", &[KeyAlgorithm::RS256])
            },
            "no RSA or P-256 signing key",
        ),
        (
            TrustedIssuer {
                public_key_file: fixture("rs-a1.key.pem"),
                ..issuer("i", &[KeyAlgorithm::RS256])
            },
            "not a PEM public key",
        ),
        (
            TrustedIssuer {
                public_key_file: fixture("es-a1.pub.pem"),
                ..issuer("i", &[KeyAlgorithm::RS256])
            },
            "do not list",
        ),
    ];
    for (t, expected) in cases {
        let config = AuthConfig {
            trusted_issuers: vec![t],
            ..AuthConfig::default()
        };
        let err = match Authenticator::load(SECRET, &config) {
            Ok(_) => panic!("{expected}: loaded"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains(expected), "{err}");
    }
}
