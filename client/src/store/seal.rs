//! Encryption at rest of the local store: every body, outbox and rejected mutation and
//! subscription filter is sealed with AES-256-GCM under a key the application supplies
//! ([`EncryptionKey`]). Collection names, document ids, versions and cursors stay readable
//! (the store indexes them).
//!
//! A sealed value is `0x01 || nonce (12 random bytes) || ciphertext || tag (16 bytes)`; the
//! associated data names the kind of value (a body can never be opened as a mutation). With
//! random nonces one key may seal about 2^32 values before it should be replaced.
//!
//! The store records whether it is encrypted (`sgc_meta.encryption`) and a sealed check value,
//! so a wrong key fails when the store opens ([`super::StoreError::WrongKey`]) instead of
//! producing garbage later, and an encrypted store is never opened without its key or a plain
//! one with a key (no mixing).

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};

use super::StoreError;

/// Marks the sealing format.
const VERSION: u8 = 1;
/// What the check value seals.
const CHECK: &[u8] = b"syncgate local store key check";

/// The application's 256-bit key for the local store.
#[derive(Clone, PartialEq, Eq)]
pub struct EncryptionKey([u8; 32]);

impl std::fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EncryptionKey(<hidden>)")
    }
}

impl EncryptionKey {
    /// A key from 32 bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> EncryptionKey {
        EncryptionKey(bytes)
    }

    /// A key from 64 hexadecimal digits (surrounding whitespace ignored).
    pub fn from_hex(text: &str) -> Result<EncryptionKey, String> {
        let bytes = hex::decode(text.trim())
            .map_err(|e| format!("an encryption key is 64 hex digits: {e}"))?;
        let bytes: [u8; 32] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| format!("an encryption key is 32 bytes, not {}", b.len()))?;
        Ok(EncryptionKey(bytes))
    }

    /// A key from a file holding 32 raw bytes or 64 hex digits.
    pub fn from_file(path: &std::path::Path) -> Result<EncryptionKey, String> {
        let raw = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        match <[u8; 32]>::try_from(raw.as_slice()) {
            Ok(bytes) => Ok(EncryptionKey(bytes)),
            Err(_) => std::str::from_utf8(&raw)
                .map_err(|_| "neither 32 bytes nor 64 hex digits".to_owned())
                .and_then(EncryptionKey::from_hex)
                .map_err(|e| format!("{}: {e}", path.display())),
        }
    }

    /// A fresh random key.
    pub fn generate() -> EncryptionKey {
        EncryptionKey(rand::random())
    }

    /// The key as 64 hex digits (to store it in a key file).
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

/// The kinds of sealed value (the associated data).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
    /// A document body.
    Body,
    /// An outbox or rejected mutation.
    Mutation,
    /// A subscription filter.
    Filter,
    /// The key check.
    Check,
}

impl Kind {
    fn aad(self) -> &'static [u8] {
        match self {
            Kind::Body => b"sgc:body",
            Kind::Mutation => b"sgc:mutation",
            Kind::Filter => b"sgc:filter",
            Kind::Check => b"sgc:check",
        }
    }
}

/// Seals and opens stored values; without a key, values pass through unchanged.
pub(crate) struct Sealer {
    key: Option<LessSafeKey>,
}

impl Sealer {
    /// A sealer for `key` (`None`: a plain store).
    pub(crate) fn new(key: Option<&EncryptionKey>) -> Sealer {
        Sealer {
            key: key.and_then(|k| {
                UnboundKey::new(&AES_256_GCM, &k.0)
                    .ok()
                    .map(LessSafeKey::new)
            }),
        }
    }

    /// Whether values are encrypted.
    pub(crate) fn encrypts(&self) -> bool {
        self.key.is_some()
    }

    /// The stored form of `plain`.
    pub(crate) fn seal(&self, kind: Kind, plain: Vec<u8>) -> Vec<u8> {
        let Some(key) = &self.key else {
            return plain;
        };
        let nonce: [u8; NONCE_LEN] = rand::random();
        let mut sealed = Vec::with_capacity(1 + NONCE_LEN + plain.len() + 16);
        sealed.push(VERSION);
        sealed.extend_from_slice(&nonce);
        let mut body = plain;
        // Sealing in place fails only for inputs beyond AES-GCM's 64 GiB limit, which no
        // stored value (bounded by the gateway's document limit) approaches.
        if key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(kind.aad()),
                &mut body,
            )
            .is_err()
        {
            body.clear();
        }
        sealed.extend_from_slice(&body);
        sealed
    }

    /// The plain form of a stored value; a value this key did not seal (another key, damage)
    /// is [`StoreError::WrongKey`].
    pub(crate) fn open(&self, kind: Kind, stored: &[u8]) -> Result<Vec<u8>, StoreError> {
        let Some(key) = &self.key else {
            return Ok(stored.to_vec());
        };
        let (Some(&VERSION), Some(nonce), Some(rest)) = (
            stored.first(),
            stored.get(1..1 + NONCE_LEN),
            stored.get(1 + NONCE_LEN..),
        ) else {
            return Err(StoreError::WrongKey);
        };
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| StoreError::WrongKey)?;
        let mut buf = rest.to_vec();
        let plain = key
            .open_in_place(nonce, Aad::from(kind.aad()), &mut buf)
            .map_err(|_| StoreError::WrongKey)?;
        Ok(plain.to_vec())
    }

    /// The check value stored with an encrypted store.
    pub(crate) fn check_value(&self) -> Vec<u8> {
        self.seal(Kind::Check, CHECK.to_vec())
    }

    /// Whether `stored` is the check value of this key.
    pub(crate) fn verify_check(&self, stored: &[u8]) -> bool {
        self.open(Kind::Check, stored).is_ok_and(|p| p == CHECK)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_their_key_and_kind() {
        let key = EncryptionKey::generate();
        let s = Sealer::new(Some(&key));
        let plain = b"qty=12 plant=A".to_vec();
        let sealed = s.seal(Kind::Body, plain.clone());
        assert!(!sealed.windows(plain.len()).any(|w| w == plain));
        assert_ne!(
            s.seal(Kind::Body, plain.clone()),
            sealed,
            "a fresh nonce each time"
        );
        assert_eq!(s.open(Kind::Body, &sealed).unwrap(), plain);
        assert!(matches!(
            s.open(Kind::Mutation, &sealed),
            Err(StoreError::WrongKey)
        ));
        let other = Sealer::new(Some(&EncryptionKey::generate()));
        assert!(matches!(
            other.open(Kind::Body, &sealed),
            Err(StoreError::WrongKey)
        ));
        let mut flipped = sealed;
        if let Some(b) = flipped.last_mut() {
            *b ^= 1;
        }
        assert!(matches!(
            s.open(Kind::Body, &flipped),
            Err(StoreError::WrongKey)
        ));
        assert!(matches!(
            s.open(Kind::Body, &[1, 2]),
            Err(StoreError::WrongKey)
        ));
        assert!(s.verify_check(&s.check_value()));
        assert!(!other.verify_check(&s.check_value()));
        let plain_store = Sealer::new(None);
        assert_eq!(plain_store.seal(Kind::Body, plain.clone()), plain);
    }

    #[test]
    fn keys_from_text_and_files() {
        let k = EncryptionKey::generate();
        assert_eq!(
            EncryptionKey::from_hex(&format!(" {}\n", k.to_hex())).unwrap(),
            k
        );
        assert!(EncryptionKey::from_hex("abcd").is_err());
        assert!(EncryptionKey::from_hex(&"zz".repeat(32)).is_err());
        let dir = tempfile::tempdir().unwrap();
        let hex_file = dir.path().join("hex");
        std::fs::write(&hex_file, format!("{}\n", k.to_hex())).unwrap();
        assert_eq!(EncryptionKey::from_file(&hex_file).unwrap(), k);
        let raw = dir.path().join("raw");
        std::fs::write(&raw, [7u8; 32]).unwrap();
        assert_eq!(
            EncryptionKey::from_file(&raw).unwrap(),
            EncryptionKey::from_bytes([7; 32])
        );
        assert!(EncryptionKey::from_file(&dir.path().join("missing")).is_err());
        assert!(format!("{k:?}").contains("hidden"));
    }
}
