//! Public keys of trusted identity providers (RS256 / ES256), from PEM files or JWKS files
//! that are re-read when they change, and the one rule that picks a key for a token.
//!
//! A key is always looked up by **issuer and `kid` together**: the token's `iss` selects one
//! [`IssuerKeys`], and only that issuer's keys are candidates. So a token that names issuer B
//! is never verified with issuer A's key, even when both publish a key with the same `kid`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};

use spki::der::DecodePem;
use spki::{ObjectIdentifier, SubjectPublicKeyInfoOwned};

use crate::config::{KeyAlgorithm, TrustedIssuer};
use crate::files::{Stamp, stamp};

/// One verification key.
#[derive(Clone)]
pub(crate) struct Key {
    /// The `kid` a token must name to use it (`None`: tokens without `kid`).
    pub kid: Option<String>,
    /// The one algorithm it verifies.
    pub alg: Algorithm,
    /// The key.
    pub key: DecodingKey,
}

/// Why no key verifies a token (all answered as `unauthorized`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum KeyError {
    /// The issuer does not sign with this algorithm.
    #[error("issuer {issuer:?} does not sign with {alg:?}")]
    Algorithm {
        /// The issuer.
        issuer: String,
        /// The token's algorithm.
        alg: Algorithm,
    },
    /// No key of the issuer has this `kid` (and algorithm).
    #[error("issuer {issuer:?} has no {alg:?} key with kid {kid:?}")]
    UnknownKid {
        /// The issuer.
        issuer: String,
        /// The token's `kid`.
        kid: Option<String>,
        /// The token's algorithm.
        alg: Algorithm,
    },
}

/// Picks the key for a token of `issuer` with header `alg` and `kid`: the algorithm must be
/// one the issuer signs with, and exactly the key with that `kid` and algorithm verifies (a
/// token without `kid` uses the issuer's key without `kid`). Pure.
pub(crate) fn select<'k>(
    issuer: &str,
    algorithms: &[Algorithm],
    keys: &'k [Key],
    alg: Algorithm,
    kid: Option<&str>,
) -> Result<&'k Key, KeyError> {
    if !algorithms.contains(&alg) {
        return Err(KeyError::Algorithm {
            issuer: issuer.to_owned(),
            alg,
        });
    }
    keys.iter()
        .find(|k| k.alg == alg && k.kid.as_deref() == kid)
        .ok_or_else(|| KeyError::UnknownKid {
            issuer: issuer.to_owned(),
            kid: kid.map(str::to_owned),
            alg,
        })
}

/// Where an issuer's keys come from.
enum Source {
    /// Fixed at startup.
    Pem(Arc<Vec<Key>>),
    /// Re-read whenever the file's modification time, length or inode changes.
    Jwks { path: PathBuf, state: Mutex<Loaded> },
}

/// The keys last read from a JWKS file, and the file's stamp then.
struct Loaded {
    stamp: Option<Stamp>,
    keys: Arc<Vec<Key>>,
}

/// One trusted issuer: its name, algorithms and keys.
pub(crate) struct IssuerKeys {
    /// The `iss` its tokens carry.
    pub issuer: String,
    /// The algorithms it signs with.
    pub algorithms: Vec<Algorithm>,
    source: Source,
}

impl IssuerKeys {
    /// Loads the issuer's keys; a file that cannot be read or holds no usable key is an error.
    pub(crate) fn load(t: &TrustedIssuer) -> anyhow::Result<IssuerKeys> {
        let algorithms: Vec<Algorithm> = t.algorithms.iter().map(|a| algorithm(*a)).collect();
        let source = if t.jwks_file.as_os_str().is_empty() {
            let pem = std::fs::read(&t.public_key_file).with_context(|| {
                format!("reading public_key_file {}", t.public_key_file.display())
            })?;
            let kid = (!t.kid.is_empty()).then(|| t.kid.clone());
            let keys = pem_keys(&pem, kid, &algorithms)
                .with_context(|| format!("public_key_file {}", t.public_key_file.display()))?;
            Source::Pem(Arc::new(keys))
        } else {
            let (stamp, keys) = read_jwks(&t.jwks_file)?;
            Source::Jwks {
                path: t.jwks_file.clone(),
                state: Mutex::new(Loaded {
                    stamp: Some(stamp),
                    keys: Arc::new(keys),
                }),
            }
        };
        Ok(IssuerKeys {
            issuer: t.issuer.clone(),
            algorithms,
            source,
        })
    }

    /// The issuer's current keys. A JWKS file is checked on every call (one `stat`) and read
    /// again when it changed; a file that cannot be read or parsed then keeps the last good
    /// keys (with a warning), so a half-written file never locks users out.
    pub(crate) fn keys(&self) -> Arc<Vec<Key>> {
        match &self.source {
            Source::Pem(keys) => keys.clone(),
            Source::Jwks { path, state } => {
                let mut loaded = state.lock().unwrap_or_else(|p| p.into_inner());
                let now = stamp(path).ok();
                if now.is_some() && now != loaded.stamp {
                    match read_jwks(path) {
                        Ok((stamp, keys)) => {
                            tracing::info!(
                                issuer = %self.issuer, file = %path.display(), keys = keys.len(),
                                "JWKS file changed: keys reloaded"
                            );
                            loaded.stamp = Some(stamp);
                            loaded.keys = Arc::new(keys);
                        }
                        Err(e) => {
                            tracing::warn!(
                                issuer = %self.issuer, file = %path.display(), error = %format!("{e:#}"),
                                "JWKS file changed but cannot be used; keeping the previous keys"
                            );
                            loaded.stamp = now;
                        }
                    }
                }
                loaded.keys.clone()
            }
        }
    }
}

fn algorithm(a: KeyAlgorithm) -> Algorithm {
    match a {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::ES256 => Algorithm::ES256,
    }
}

/// `rsaEncryption` (RFC 8017).
const RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
/// `id-ecPublicKey` (RFC 5480).
const EC: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
/// `secp256r1`, also known as P-256 (RFC 5480).
const P256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");

/// A PEM public key (`-----BEGIN PUBLIC KEY-----`, as `openssl pkey -pubout` writes it) as the
/// algorithm of its type (RSA: RS256, EC P-256: ES256), which must be one the issuer signs
/// with.
fn pem_keys(pem: &[u8], kid: Option<String>, algorithms: &[Algorithm]) -> anyhow::Result<Vec<Key>> {
    let text = std::str::from_utf8(pem).context("not a PEM file (not text)")?;
    let info = SubjectPublicKeyInfoOwned::from_pem(text.trim())
        .map_err(|e| anyhow::anyhow!("not a PEM public key (BEGIN PUBLIC KEY): {e}"))?;
    let point = info.subject_public_key.raw_bytes();
    let (alg, key) = match info.algorithm.oid {
        // The bit string holds the PKCS#1 RSAPublicKey, which is what jsonwebtoken verifies with.
        RSA => (Algorithm::RS256, DecodingKey::from_rsa_der(point)),
        EC => {
            let curve = info
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.decode_as::<ObjectIdentifier>().ok());
            if curve != Some(P256) {
                bail!("an EC key on a curve other than P-256");
            }
            // The bit string holds the uncompressed point 04 || x || y.
            if point.len() != 65 || point.first() != Some(&4) {
                bail!("an EC P-256 key that is not an uncompressed point");
            }
            (Algorithm::ES256, DecodingKey::from_ec_der(point))
        }
        other => bail!("a public key of algorithm {other}, not RSA or EC P-256"),
    };
    if !algorithms.contains(&alg) {
        bail!("it holds a key for {alg:?}, which the issuer's algorithms do not list");
    }
    Ok(vec![Key { kid, alg, key }])
}

/// Reads a JWKS file: its RSA keys (RS256) and P-256 keys (ES256) meant for signatures. Other
/// keys (symmetric, other curves, `use: enc`) are skipped: a JWKS never carries a secret that
/// could turn a public key into an HMAC one.
fn read_jwks(path: &Path) -> anyhow::Result<(Stamp, Vec<Key>)> {
    let stamp = stamp(path).with_context(|| format!("reading jwks_file {}", path.display()))?;
    let text =
        std::fs::read(path).with_context(|| format!("reading jwks_file {}", path.display()))?;
    let set: JwkSet = serde_json::from_slice(&text)
        .with_context(|| format!("jwks_file {} is not a JWK set", path.display()))?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
            continue;
        }
        let alg = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Algorithm::RS256,
            AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
                Algorithm::ES256
            }
            _ => continue,
        };
        let Ok(key) = DecodingKey::from_jwk(jwk) else {
            continue;
        };
        keys.push(Key {
            kid: jwk.common.key_id.clone(),
            alg,
            key,
        });
    }
    if keys.is_empty() {
        bail!(
            "jwks_file {} holds no RSA or P-256 signing key",
            path.display()
        );
    }
    Ok((stamp, keys))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(kid: Option<&str>, alg: Algorithm) -> Key {
        Key {
            kid: kid.map(str::to_owned),
            alg,
            key: DecodingKey::from_secret(b"unused"),
        }
    }

    #[test]
    fn a_key_is_chosen_by_kid_and_algorithm_within_the_issuer() {
        let keys = [
            key(Some("k1"), Algorithm::RS256),
            key(Some("k2"), Algorithm::ES256),
            key(None, Algorithm::RS256),
        ];
        let rs_es = [Algorithm::RS256, Algorithm::ES256];
        let pick = |alg, kid| select("idp", &rs_es, &keys, alg, kid).map(|k| k.kid.clone());
        assert_eq!(pick(Algorithm::RS256, Some("k1")), Ok(Some("k1".into())));
        assert_eq!(pick(Algorithm::ES256, Some("k2")), Ok(Some("k2".into())));
        assert_eq!(pick(Algorithm::RS256, None), Ok(None));
        // A kid of another algorithm, an unknown kid, no kid where only kids exist.
        assert!(matches!(
            pick(Algorithm::ES256, Some("k1")),
            Err(KeyError::UnknownKid { .. })
        ));
        assert!(matches!(
            pick(Algorithm::RS256, Some("k9")),
            Err(KeyError::UnknownKid { .. })
        ));
        assert!(matches!(
            pick(Algorithm::ES256, None),
            Err(KeyError::UnknownKid { .. })
        ));
        // HS256 is never an issuer's algorithm here, whatever its keys.
        assert!(matches!(
            select(
                "idp",
                &[Algorithm::RS256],
                &keys,
                Algorithm::HS256,
                Some("k1")
            ),
            Err(KeyError::Algorithm { .. })
        ));
        assert!(matches!(
            select(
                "idp",
                &[Algorithm::RS256],
                &keys,
                Algorithm::ES256,
                Some("k2")
            ),
            Err(KeyError::Algorithm { .. })
        ));
    }
}
