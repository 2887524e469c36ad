//! Client authentication: HS256 JWTs whose `sub` claim names the user.

use std::path::Path;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};
use syncgate_protocol::ErrorCode;

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
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Past its `exp`: the client fetches a new token and reconnects.
    #[error("token expired")]
    Expired,
    /// A valid token naming no user.
    #[error("token has an empty sub")]
    EmptySubject,
    /// Not a token this gateway issued (signature, algorithm, format).
    #[error("invalid token: {0}")]
    Invalid(String),
}

impl AuthError {
    /// The stable code: `token_expired` (retryable with a new token) or `unauthorized`.
    pub fn code(&self) -> ErrorCode {
        match self {
            AuthError::Expired => ErrorCode::TokenExpired,
            AuthError::EmptySubject | AuthError::Invalid(_) => ErrorCode::Unauthorized,
        }
    }
}

/// Verifies and mints tokens with one shared secret.
#[derive(Clone)]
pub struct Authenticator {
    /// Verifies signatures.
    decoding: DecodingKey,
    /// Signs tokens for `syncgate token`.
    encoding: EncodingKey,
    /// HS256 only, expiry required.
    validation: Validation,
}

impl Authenticator {
    /// Builds an authenticator from a secret.
    pub fn new(secret: &[u8]) -> Authenticator {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 30;
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Authenticator {
            decoding: DecodingKey::from_secret(secret),
            encoding: EncodingKey::from_secret(secret),
            validation,
        }
    }

    /// Returns the user named by a valid token.
    pub fn verify(&self, token: &str) -> Result<String, AuthError> {
        match jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation) {
            Ok(data) if !data.claims.sub.is_empty() => Ok(data.claims.sub),
            Ok(_) => Err(AuthError::EmptySubject),
            Err(e) if matches!(e.kind(), ErrorKind::ExpiredSignature) => Err(AuthError::Expired),
            Err(e) => Err(AuthError::Invalid(e.to_string())),
        }
    }

    /// Mints a token for `user`, valid for `ttl_secs`.
    pub fn mint(&self, user: &str, ttl_secs: u64) -> anyhow::Result<String> {
        let now = unix_now();
        let claims = Claims {
            sub: user.to_owned(),
            exp: now + ttl_secs,
            iat: now,
        };
        Ok(jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &self.encoding,
        )?)
    }
}

fn unix_now() -> u64 {
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

    #[test]
    fn mint_and_verify() {
        let a = Authenticator::new(b"secret");
        let t = a.mint("alice", 60).unwrap();
        assert_eq!(a.verify(&t).unwrap(), "alice");
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
    fn expired_tokens_have_their_own_code() {
        let a = Authenticator::new(b"secret");
        let claims = Claims {
            sub: "bob".into(),
            exp: 1_000,
            iat: 0,
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
