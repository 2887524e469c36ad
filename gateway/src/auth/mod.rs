//! Client authentication: JWTs whose `sub` claim names the user, signed either with the
//! gateway's HS256 secret or by a trusted identity provider's RS256 / ES256 key ([`keys`]).
//!
//! A token is accepted only if: its header names no `crit` extension (none is understood
//! here); if its `iss` names a trusted issuer, its `alg` is one that issuer signs with and its
//! signature verifies with that issuer's key of the token's `kid` (never another issuer's, never
//! the HS256 secret); otherwise its `alg` is HS256 and its signature verifies with the
//! gateway's secret; `exp` is present and,
//! like `nbf` when present, holds within `auth.leeway_secs`; `iss` equals `auth.issuer` when
//! one is configured; `aud` equals `auth.audience` when one is configured and is absent
//! otherwise; `sub` is 1..=[`MAX_SUBJECT_BYTES`] bytes without control characters.

pub mod api_key;
#[cfg(test)]
mod issuer_tests;
pub(crate) mod keys;
pub(crate) mod scope;

use std::path::Path;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};
use syncgate_protocol::ErrorCode;

use crate::config::AuthConfig;

/// The longest user name (`sub`) accepted.
pub const MAX_SUBJECT_BYTES: usize = 256;

/// The claims syncgate reads from a token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The user.
    pub sub: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Issued at, seconds since the Unix epoch.
    #[serde(default)]
    pub iat: u64,
    /// Not before, seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Issuer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// Audience: one string, or a list of them (RFC 7519 §4.1.3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<serde_json::Value>,
    /// Every other claim (a plant, roles ...), for per-collection rules and row scopes.
    #[serde(flatten)]
    pub extra: std::collections::BTreeMap<String, serde_json::Value>,
}

impl Claims {
    /// Claims for `user`, valid from now for `ttl_secs`.
    pub fn new(user: &str, ttl_secs: u64) -> Claims {
        let now = unix_now();
        Claims {
            sub: user.to_owned(),
            exp: now.saturating_add(ttl_secs),
            iat: now,
            nbf: None,
            iss: None,
            aud: None,
            extra: std::collections::BTreeMap::new(),
        }
    }
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Past its `exp`: the client fetches a new token and reconnects.
    #[error("token expired")]
    Expired,
    /// Its `nbf` lies in the future.
    #[error("token is not valid yet (nbf is in the future)")]
    NotYetValid,
    /// A valid token naming no usable user.
    #[error("token sub must be 1..={MAX_SUBJECT_BYTES} bytes without control characters")]
    BadSubject,
    /// Not a token this gateway accepts (signature, algorithm, issuer, audience, format).
    #[error("invalid token: {0}")]
    Invalid(String),
}

impl AuthError {
    /// The stable code: `token_expired` (retryable with a new token) or `unauthorized`.
    pub fn code(&self) -> ErrorCode {
        match self {
            AuthError::Expired => ErrorCode::TokenExpired,
            AuthError::NotYetValid | AuthError::BadSubject | AuthError::Invalid(_) => {
                ErrorCode::Unauthorized
            }
        }
    }
}

/// Who a valid token names, and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user (`sub`).
    pub user: String,
    /// The token's other claims (see [`Claims::extra`]).
    pub claims: std::collections::BTreeMap<String, serde_json::Value>,
    /// The user's roles: the `auth.roles_claim` claim, a string or a list of strings.
    pub roles: Vec<String>,
    /// When a session on this token must end: `exp` plus the leeway, seconds since the Unix
    /// epoch.
    pub valid_until: u64,
}

/// Verifies and mints tokens with one shared secret.
#[derive(Clone)]
pub struct Authenticator {
    /// Verifies signatures.
    decoding: DecodingKey,
    /// Signs tokens for `syncgate token`.
    encoding: EncodingKey,
    /// HS256 only; `exp` and `sub` required; `nbf`, `iss`, `aud` as configured.
    validation: Validation,
    /// `iss` and `aud` put into minted tokens.
    issuer: Option<String>,
    audience: Option<String>,
    /// The claim naming the user's roles.
    roles_claim: String,
    /// Identity providers with public keys, each checked against its own keys only.
    trusted: std::sync::Arc<Vec<keys::IssuerKeys>>,
}

/// The one claim read before a token is verified: which issuer's keys to verify it with.
#[derive(Deserialize)]
struct Issuer {
    #[serde(default)]
    iss: Option<String>,
}

impl Authenticator {
    /// An authenticator with the default settings ([`AuthConfig::default`]).
    pub fn new(secret: &[u8]) -> Authenticator {
        Authenticator::with_config(secret, &AuthConfig::default())
    }

    /// An authenticator for `secret` checking what `config` asks for.
    pub fn with_config(secret: &[u8], config: &AuthConfig) -> Authenticator {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = config.leeway_secs;
        validation.validate_nbf = true;
        // With no audience configured, a token that names one was meant for someone else.
        validation.validate_aud = true;
        let mut required = vec!["exp", "sub"];
        let issuer = (!config.issuer.is_empty()).then(|| config.issuer.clone());
        let audience = (!config.audience.is_empty()).then(|| config.audience.clone());
        if let Some(iss) = &issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        if let Some(aud) = &audience {
            validation.set_audience(&[aud]);
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);
        Authenticator {
            decoding: DecodingKey::from_secret(secret),
            encoding: EncodingKey::from_secret(secret),
            validation,
            issuer,
            audience,
            roles_claim: config.roles_claim.clone(),
            trusted: std::sync::Arc::new(Vec::new()),
        }
    }

    /// Like [`Authenticator::with_config`], and trusts `config.trusted_issuers` too: reads
    /// their PEM and JWKS files (an unreadable file, or one without a usable key, is an error).
    pub fn load(secret: &[u8], config: &AuthConfig) -> anyhow::Result<Authenticator> {
        let trusted = config
            .trusted_issuers
            .iter()
            .map(keys::IssuerKeys::load)
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Authenticator {
            trusted: std::sync::Arc::new(trusted),
            ..Authenticator::with_config(secret, config)
        })
    }

    /// The user named by a valid token, and when a session on it must end.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| AuthError::Invalid(e.to_string()))?;
        if header.crit.is_some() {
            return Err(AuthError::Invalid(
                "the token names critical header extensions (crit), none of which this \
                 gateway understands"
                    .into(),
            ));
        }
        // Which keys may verify it is decided by the issuer it names, before anything else.
        let named = jsonwebtoken::dangerous::insecure_decode_claims::<Issuer>(token)
            .map_err(|e| AuthError::Invalid(e.to_string()))?
            .iss;
        let trusted = named
            .as_deref()
            .and_then(|iss| self.trusted.iter().find(|t| t.issuer == iss));
        let decoded = match trusted {
            Some(t) => {
                let keys = t.keys();
                let key = keys::select(
                    &t.issuer,
                    &t.algorithms,
                    &keys,
                    header.alg,
                    header.kid.as_deref(),
                )
                .map_err(|e| AuthError::Invalid(e.to_string()))?;
                let mut validation = self.validation.clone();
                validation.algorithms = vec![key.alg];
                validation.set_issuer(&[&t.issuer]);
                let mut required = vec!["exp", "sub", "iss"];
                if self.audience.is_some() {
                    required.push("aud");
                }
                validation.set_required_spec_claims(&required);
                jsonwebtoken::decode::<Claims>(token, &key.key, &validation)
            }
            None if header.alg != Algorithm::HS256 => {
                return Err(AuthError::Invalid(match named {
                    Some(iss) => {
                        format!("{:?} tokens of issuer {iss:?} are not trusted", header.alg)
                    }
                    None => format!(
                        "a {:?} token must name a trusted issuer (iss); without one only HS256 \
                         is accepted",
                        header.alg
                    ),
                }));
            }
            None => jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation),
        };
        let claims = match decoded {
            Ok(data) => data.claims,
            Err(e) => {
                return Err(match e.kind() {
                    ErrorKind::ExpiredSignature => AuthError::Expired,
                    ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                    _ => AuthError::Invalid(e.to_string()),
                });
            }
        };
        if claims.sub.is_empty()
            || claims.sub.len() > MAX_SUBJECT_BYTES
            || claims.sub.chars().any(char::is_control)
        {
            return Err(AuthError::BadSubject);
        }
        let roles = match claims.extra.get(&self.roles_claim) {
            Some(serde_json::Value::String(r)) => vec![r.clone()],
            Some(serde_json::Value::Array(rs)) => rs
                .iter()
                .filter_map(|r| r.as_str().map(str::to_owned))
                .collect(),
            _ => Vec::new(),
        };
        Ok(Identity {
            user: claims.sub,
            roles,
            claims: claims.extra,
            valid_until: claims.exp.saturating_add(self.validation.leeway),
        })
    }

    /// Mints a token for `user`, valid for `ttl_secs`, with the configured issuer and audience.
    pub fn mint(&self, user: &str, ttl_secs: u64) -> anyhow::Result<String> {
        self.mint_claims(Claims::new(user, ttl_secs))
    }

    /// Signs `claims`, filling in the configured issuer and audience where they are unset.
    pub fn mint_claims(&self, mut claims: Claims) -> anyhow::Result<String> {
        if claims.iss.is_none() {
            claims.iss.clone_from(&self.issuer);
        }
        if claims.aud.is_none() {
            claims.aud = self.audience.clone().map(serde_json::Value::from);
        }
        Ok(jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &self.encoding,
        )?)
    }
}

/// Whether a user with `roles` may do what `required` guards: an empty list lets every user
/// with a valid token; otherwise one of the user's roles must be in it.
pub fn allowed(required: &[String], roles: &[String]) -> bool {
    required.is_empty() || roles.iter().any(|r| required.contains(r))
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The configured secret, or the one generated once into `data_dir/jwt_secret`.
pub fn load_or_create_secret(configured: &str, data_dir: &Path) -> anyhow::Result<Vec<u8>> {
    Ok(load_or_create_secret_reporting(configured, data_dir)?.0)
}

/// Where the token secret came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// `auth.jwt_secret` (config file, `SYNCGATE_JWT_SECRET` or `--jwt-secret`).
    Configured,
    /// Read from this file in the data directory.
    File(std::path::PathBuf),
    /// Generated just now into this file.
    Generated(std::path::PathBuf),
}

/// Like [`load_or_create_secret`], and says where the secret came from (for the startup log).
pub fn load_or_create_secret_reporting(
    configured: &str,
    data_dir: &Path,
) -> anyhow::Result<(Vec<u8>, SecretSource)> {
    use anyhow::Context;
    if let Some(found) = load_secret(configured, data_dir)? {
        return Ok(found);
    }
    let path = data_dir.join("jwt_secret");
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating data directory {}", data_dir.display()))?;
    let secret = hex::encode(rand::random::<[u8; 32]>());
    write_private(&path, &secret).with_context(|| format!("writing {}", path.display()))?;
    Ok((secret.into_bytes(), SecretSource::Generated(path)))
}

/// The configured secret, or the one stored in `<data_dir>/jwt_secret`; `None` if neither
/// exists. Never creates one: only the gateway that will verify tokens may do that.
pub fn load_secret(
    configured: &str,
    data_dir: &Path,
) -> anyhow::Result<Option<(Vec<u8>, SecretSource)>> {
    use anyhow::Context;
    if !configured.is_empty() {
        return Ok(Some((
            configured.as_bytes().to_vec(),
            SecretSource::Configured,
        )));
    }
    let path = data_dir.join("jwt_secret");
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => Ok(Some((
            s.trim().as_bytes().to_vec(),
            SecretSource::File(path),
        ))),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

#[cfg(unix)]
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()
}

#[cfg(not(unix))]
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    std::fs::write(path, contents)
}

#[cfg(test)]
mod tests {
    use super::*;

    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;

    fn signed(header: &Header, claims: &Claims, secret: &[u8]) -> String {
        jsonwebtoken::encode(header, claims, &EncodingKey::from_secret(secret)).unwrap()
    }

    /// A token with any header JSON, signed HS256 over exactly those bytes.
    fn raw_token(header_json: &str, claims: &Claims, secret: &[u8]) -> String {
        use hmac::{Hmac, Mac};
        let payload = B64.encode(serde_json::to_vec(claims).unwrap());
        let signing_input = format!("{}.{payload}", B64.encode(header_json));
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
        mac.update(signing_input.as_bytes());
        format!(
            "{signing_input}.{}",
            B64.encode(mac.finalize().into_bytes())
        )
    }

    #[test]
    fn mint_and_verify() {
        let a = Authenticator::new(b"secret");
        let t = a.mint("alice", 60).unwrap();
        let id = a.verify(&t).unwrap();
        assert_eq!(id.user, "alice");
        assert!(id.valid_until >= unix_now() + 60, "exp + leeway");
        let other = Authenticator::new(b"other");
        assert_eq!(
            other.verify(&t).unwrap_err().code(),
            ErrorCode::Unauthorized
        );
        assert_eq!(
            a.verify("garbage").unwrap_err().code(),
            ErrorCode::Unauthorized
        );
    }

    #[test]
    fn hostile_tokens_are_refused_with_their_codes() {
        const SECRET: &[u8] = b"secret";
        let config = AuthConfig {
            issuer: "syncgate-test".into(),
            audience: "terminals".into(),
            leeway_secs: 0,
            ..AuthConfig::default()
        };
        let a = Authenticator::with_config(SECRET, &config);
        let good = || Claims {
            iss: Some("syncgate-test".into()),
            aud: Some("terminals".into()),
            ..Claims::new("alice", 600)
        };
        let hs256 = Header::new(Algorithm::HS256);
        assert_eq!(
            a.verify(&signed(&hs256, &good(), SECRET)).unwrap().user,
            "alice"
        );
        let now = unix_now();
        let tampered = {
            let t = signed(&hs256, &good(), SECRET);
            let mut parts: Vec<String> = t.split('.').map(str::to_owned).collect();
            let other = Claims {
                sub: "root".into(),
                ..good()
            };
            parts[1] = B64.encode(serde_json::to_vec(&other).unwrap());
            parts.join(".")
        };
        let cases: Vec<(&str, String, ErrorCode)> = vec![
            (
                "expired",
                signed(
                    &hs256,
                    &Claims {
                        exp: now - 1,
                        ..good()
                    },
                    SECRET,
                ),
                ErrorCode::TokenExpired,
            ),
            (
                "not yet valid (nbf in the future)",
                signed(
                    &hs256,
                    &Claims {
                        nbf: Some(now + 60),
                        ..good()
                    },
                    SECRET,
                ),
                ErrorCode::Unauthorized,
            ),
            ("tampered payload", tampered, ErrorCode::Unauthorized),
            (
                "alg none",
                format!(
                    "{}.{}.",
                    B64.encode(r#"{"alg":"none","typ":"JWT"}"#),
                    B64.encode(serde_json::to_vec(&good()).unwrap())
                ),
                ErrorCode::Unauthorized,
            ),
            (
                "another HMAC algorithm",
                signed(&Header::new(Algorithm::HS512), &good(), SECRET),
                ErrorCode::Unauthorized,
            ),
            (
                "RS256 header signed with the secret as an HMAC key (algorithm confusion)",
                raw_token(r#"{"alg":"RS256","typ":"JWT"}"#, &good(), SECRET),
                ErrorCode::Unauthorized,
            ),
            (
                "wrong key",
                signed(&hs256, &good(), b"another secret"),
                ErrorCode::Unauthorized,
            ),
            (
                "another issuer",
                signed(
                    &hs256,
                    &Claims {
                        iss: Some("evil".into()),
                        ..good()
                    },
                    SECRET,
                ),
                ErrorCode::Unauthorized,
            ),
            (
                "no issuer",
                signed(
                    &hs256,
                    &Claims {
                        iss: None,
                        ..good()
                    },
                    SECRET,
                ),
                ErrorCode::Unauthorized,
            ),
            (
                "another service's audience",
                signed(
                    &hs256,
                    &Claims {
                        aud: Some("billing".into()),
                        ..good()
                    },
                    SECRET,
                ),
                ErrorCode::Unauthorized,
            ),
            (
                "an unknown critical header",
                raw_token(
                    r#"{"alg":"HS256","typ":"JWT","crit":["x-private"]}"#,
                    &good(),
                    SECRET,
                ),
                ErrorCode::Unauthorized,
            ),
            (
                "an empty sub",
                signed(
                    &hs256,
                    &Claims {
                        sub: String::new(),
                        ..good()
                    },
                    SECRET,
                ),
                ErrorCode::Unauthorized,
            ),
            (
                "a 10 KB sub",
                signed(
                    &hs256,
                    &Claims {
                        sub: "a".repeat(10_000),
                        ..good()
                    },
                    SECRET,
                ),
                ErrorCode::Unauthorized,
            ),
            (
                "a sub with control characters",
                signed(
                    &hs256,
                    &Claims {
                        sub: "bob\n\u{1b}[31m".into(),
                        ..good()
                    },
                    SECRET,
                ),
                ErrorCode::Unauthorized,
            ),
        ];
        for (name, token, code) in cases {
            match a.verify(&token) {
                Ok(id) => panic!("{name}: accepted as {:?}", id.user),
                Err(e) => assert_eq!(e.code(), code, "{name}: {e}"),
            }
        }
        // A list of audiences that includes ours is accepted.
        let listed = Claims {
            aud: Some(serde_json::json!(["billing", "terminals"])),
            ..good()
        };
        assert_eq!(
            a.verify(&signed(&hs256, &listed, SECRET)).unwrap().user,
            "alice"
        );
        // Without a configured audience, a token naming one is still refused.
        let plain = Authenticator::new(SECRET);
        let aud = Claims {
            aud: Some("billing".into()),
            ..Claims::new("alice", 600)
        };
        assert!(plain.verify(&signed(&hs256, &aud, SECRET)).is_err());
        // Minted tokens carry the configured issuer and audience.
        assert_eq!(a.verify(&a.mint("bob", 60).unwrap()).unwrap().user, "bob");
    }

    #[test]
    fn expired_tokens_have_their_own_code() {
        let a = Authenticator::new(b"secret");
        let claims = Claims {
            exp: 1_000,
            iat: 0,
            ..Claims::new("bob", 0)
        };
        let t = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &a.encoding).unwrap();
        assert_eq!(a.verify(&t).unwrap_err().code(), ErrorCode::TokenExpired);
    }

    #[test]
    fn secret_is_generated_once() {
        let dir = tempfile::tempdir().unwrap();
        let s1 = load_or_create_secret("", dir.path()).unwrap();
        let s2 = load_or_create_secret("", dir.path()).unwrap();
        assert_eq!(s1, s2);
        assert_eq!(load_or_create_secret("x", dir.path()).unwrap(), b"x");
    }
}
