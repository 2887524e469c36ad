//! API keys for backend services: `sgk_<id>_<secret>`, shown once when created and stored only
//! as the SHA-256 of the secret. Pure: making, parsing and checking a key; storage keeps the
//! rows (`storage::api_keys`), the connection looks a key up at `hello`.
//!
//! The secret is 32 random bytes, so a plain SHA-256 is a sound verifier (no password
//! stretching is needed for a value nobody could guess), and the comparison takes the same
//! time whatever the bytes.

use sha2::{Digest, Sha256};

use crate::auth::Identity;

/// What every API key starts with (so logs, scanners and `hello` can tell it from a JWT).
pub const PREFIX: &str = "sgk_";

/// A key as created: its public id and the full key to hand out once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewKey {
    /// The public id (16 hex digits), shown by `list` and accepted by `revoke`.
    pub id: String,
    /// The whole key, `sgk_<id>_<secret>`: shown once, never stored.
    pub key: String,
    /// What is stored: the SHA-256 of the secret, in hex.
    pub secret_hash: String,
}

/// Makes a new key from fresh randomness.
pub fn generate() -> NewKey {
    let id = hex::encode(rand::random::<[u8; 8]>());
    let secret = hex::encode(rand::random::<[u8; 32]>());
    NewKey {
        key: format!("{PREFIX}{id}_{secret}"),
        secret_hash: hash(&secret),
        id,
    }
}

/// The `(id, secret)` of something shaped like an API key, or `None` (then it is a JWT).
pub fn parse(token: &str) -> Option<(&str, &str)> {
    let (id, secret) = token.strip_prefix(PREFIX)?.split_once('_')?;
    let hex16 = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex16(id, 16) && hex16(secret, 64)).then_some((id, secret))
}

/// The stored verifier of a secret.
pub fn hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Whether `secret` is the one `stored_hash` was made from, in constant time.
pub fn matches(secret: &str, stored_hash: &str) -> bool {
    let computed = hash(secret);
    computed.len() == stored_hash.len()
        && computed
            .bytes()
            .zip(stored_hash.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// One stored key (never its secret).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ApiKey {
    /// The public id.
    pub id: String,
    /// Its unique name (which service holds it).
    pub name: String,
    /// The user its sessions act as (client ids are owned by it; several keys of one service
    /// may share it, so a rotated key keeps the service's installations).
    pub user: String,
    /// The roles it grants.
    pub roles: Vec<String>,
    /// Further claims (for row scopes), as a token would carry them.
    pub claims: std::collections::BTreeMap<String, serde_json::Value>,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_at_ms: i64,
    /// Revocation time, if revoked: from then on the key opens no session.
    pub revoked_at_ms: Option<i64>,
    /// The stored verifier (not serialized).
    #[serde(skip)]
    pub secret_hash: String,
}

impl ApiKey {
    /// The identity a session on this key has, if `secret` is its secret and it is not
    /// revoked. It does not expire (revoke it instead).
    pub fn identity(&self, secret: &str) -> Option<Identity> {
        if self.revoked_at_ms.is_some() || !matches(secret, &self.secret_hash) {
            return None;
        }
        Some(Identity {
            user: self.user.clone(),
            claims: self.claims.clone(),
            roles: self.roles.clone(),
            valid_until: u64::MAX,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_parses_and_verifies_only_with_its_own_secret() {
        let k = generate();
        let (id, secret) = parse(&k.key).unwrap();
        assert_eq!(id, k.id);
        assert!(matches(secret, &k.secret_hash));
        assert!(!matches(&secret.replace(&secret[..1], "x"), &k.secret_hash));
        assert!(
            !k.key.contains(&k.secret_hash),
            "the stored hash is not the secret"
        );
        let other = generate();
        assert_ne!(other.key, k.key);
        assert!(!matches(secret, &other.secret_hash));
    }

    #[test]
    fn only_the_exact_shape_is_an_api_key() {
        let k = generate();
        assert!(parse(&k.key).is_some());
        for not in [
            "eyJhbGciOiJIUzI1NiJ9.e30.x".to_owned(),
            "sgk_".to_owned(),
            format!("{}x", k.key),
            k.key.replacen('_', "-", 2),
            k.key.to_uppercase().replace("SGK_", "sgk_") + "0",
            format!("sgk_{}_{}", "g".repeat(16), "0".repeat(64)),
        ] {
            assert!(parse(&not).is_none(), "{not}");
        }
    }

    #[test]
    fn a_revoked_key_or_a_wrong_secret_has_no_identity() {
        let k = generate();
        let (_, secret) = parse(&k.key).unwrap();
        let mut row = ApiKey {
            id: k.id.clone(),
            name: "erp".into(),
            user: "erp-service".into(),
            roles: vec!["planner".into()],
            claims: [("plant".to_owned(), serde_json::json!(["A", "B"]))].into(),
            created_at_ms: 0,
            revoked_at_ms: None,
            secret_hash: k.secret_hash.clone(),
        };
        let id = row.identity(secret).unwrap();
        assert_eq!(
            (id.user.as_str(), id.roles.as_slice()),
            ("erp-service", &["planner".to_owned()][..])
        );
        assert_eq!(id.claims["plant"], serde_json::json!(["A", "B"]));
        assert!(row.identity(&"0".repeat(64)).is_none());
        row.revoked_at_ms = Some(1);
        assert!(row.identity(secret).is_none());
    }
}
